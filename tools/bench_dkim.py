"""CPU per DKIM signature: dkimpy alone (its pure-Python RSA) against the notifier's signer
(dkimpy + OpenSSL through `cryptography`), on a rendered recovery mail, RSA 2048 (no stack needed).

    .venv/bin/python -m tools.bench_dkim [--n 300] [--rounds 5]

Each round signs the same mail n times with each path and takes the process CPU time; the
median round is printed (ms per signature). Compare figures from one run: this machine's
speed drifts from run to run.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from datetime import UTC, datetime

import dkim
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from services.notifier.rendering import MailRenderer, build_message
from services.notifier.signing import SIGNED_HEADERS, DkimSigner, envelope


def recovery_mail() -> bytes:
    rendered = MailRenderer().render(
        "recovery_link", "es", name="María", link="https://portal/x", code="123456", link_minutes=30, code_minutes=15
    )
    message = build_message(
        rendered,
        to="maria.perez@example.org",
        mail_from="Clave <no-reply@clave.example.org>",
        reply_to="soporte@clave.example.org",
        message_id="<bench@clave.example.org>",
        date=datetime.now(UTC),
    )
    return envelope(message, None).data


def ms_per_call(fn: Callable[[], object], n: int, rounds: int) -> float:
    per_round = []
    for _ in range(rounds):
        started = time.process_time()
        for _ in range(n):
            fn()
        per_round.append((time.process_time() - started) / n * 1000)
    return statistics.median(per_round)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tools.bench_dkim", description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=300, help="signatures per round and path [300]")
    parser.add_argument("--rounds", type=int, default=5, help="rounds; the median is printed [5]")
    args = parser.parse_args(argv)
    pem = rsa.generate_private_key(public_exponent=65537, key_size=2048).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()
    )
    data = recovery_mail()
    signer = DkimSigner("clave1", "clave.example.org", pem)
    headers = [h for h in SIGNED_HEADERS if h + b":" in data.lower()]

    def dkimpy_alone() -> bytes:
        return bytes(
            dkim.sign(
                data,
                b"clave1",
                b"clave.example.org",
                pem,
                canonicalize=(b"relaxed", b"relaxed"),
                include_headers=headers,
            )
        )

    before = ms_per_call(dkimpy_alone, args.n, args.rounds)
    after = ms_per_call(lambda: signer.sign(data), args.n, args.rounds)
    print(f"mail of {len(data)} bytes, RSA 2048, median of {args.rounds} rounds x {args.n} signatures (CPU time)")
    print(f"  dkimpy alone (pure-Python RSA): {before:.3f} ms/signature")
    print(f"  DkimSigner (dkimpy + OpenSSL):  {after:.3f} ms/signature  ({before / after:.1f}x less CPU)")


if __name__ == "__main__":
    main()
