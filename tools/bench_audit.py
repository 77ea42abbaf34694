"""Memory and speed of `clave audit verify` as the log grows (no stack needed).

    .venv/bin/python -m tools.bench_audit [--sizes 10000,100000] [--producers 5]

For each size it writes a log of that many signed audit events (the producers' chains
interleaved, as `replay --json` exports them), then verifies it twice, each time in a
fresh process:

- the verification loop alone (`shared.audit.ChainVerifier` fed from `file_events`),
  with tracemalloc's peak of Python allocations during the loop;
- the real command, `clave audit verify --file LOG --no-heads`, with only
  AUDIT_PUBLIC_KEYS and CLAVE_ENV in its environment, and its peak resident set
  (ru_maxrss of the child: interpreter and imports included).

Flat memory means the peak does not grow with the size of the log.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from shared.audit import GENESIS, ChainVerifier, Signer, audit_event, seal
from shared.auditkeys import KeyRing, PublicKeyEntry
from shared.schemas import AuditRecord
from tools.workbench import SERVICES


def write_log(path: Path, keys_dir: Path, n: int, producers: int) -> None:
    names = SERVICES[:producers]
    keys = {name: Ed25519PrivateKey.generate() for name in names}
    keys_dir.mkdir(parents=True, exist_ok=True)
    for name, key in keys.items():
        entry = PublicKeyEntry.of(name, key.public_key())
        (keys_dir / f"{name}.json").write_text(entry.model_dump_json(exclude_none=True), encoding="utf-8")
    heads = {name: (0, GENESIS) for name in names}
    signers = {name: Signer(key) for name, key in keys.items()}
    with path.open("wb") as out:
        for i in range(n):
            name = names[i % len(names)]
            record = AuditRecord(
                service=name,
                action="recovery_requested",
                outcome="success",
                account_id=f"acc-{i:08d}",
                request_id=f"req-{i:08d}",
                reasons=["answers_wrong"] if i % 7 == 0 else [],
                details={"attempt": i % 5},
            )
            doc = json.loads(
                audit_event(record, correlationid=f"req-{i}", causationid=None, source=f"/clave/{name}").to_document()[
                    "value"
                ]
            )
            seq, prev = heads[name]
            value, digest = seal(doc, producer=name, seq=seq + 1, prev=prev, signer=signers[name])
            heads[name] = (seq + 1, digest)
            out.write(value + b"\n")


def verify_loop(path: Path, keys_dir: Path) -> dict[str, float]:
    """Run in a child: the verification loop alone, under tracemalloc."""
    from clave.auditlog import file_events

    keys = KeyRing.load(str(keys_dir))
    tracemalloc.start()
    t = time.perf_counter()
    verifier = ChainVerifier(keys).feed_all(file_events(path))
    elapsed = time.perf_counter() - t
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert verifier.ok, verifier.breaks[:3]
    return {
        "events": verifier.count,
        "seconds": round(elapsed, 2),
        "events_per_s": round(verifier.count / elapsed),
        "tracemalloc_peak_mib": round(peak / 2**20, 2),
        "maxrss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def measure(path: Path, keys_dir: Path) -> dict[str, float]:
    loop = subprocess.run(  # noqa: S603 - this module, fixed arguments
        [sys.executable, "-m", "tools.bench_audit", "--child-loop", str(path), str(keys_dir)],
        capture_output=True,
        text=True,
        check=True,
        timeout=3600,
    )
    result = json.loads(loop.stdout)
    cli = subprocess.run(  # noqa: S603 - this module, fixed arguments
        [sys.executable, "-m", "tools.bench_audit", "--child-cli", str(path), str(keys_dir)],
        capture_output=True,
        text=True,
        check=True,
        timeout=3600,
    )
    result.update(json.loads(cli.stdout))
    return result


def cli_child(path: Path, keys_dir: Path) -> dict[str, object]:
    """Run in a child: the real command, with no secret in its environment; report its peak RSS."""
    env = {"PATH": os.environ.get("PATH", ""), "CLAVE_ENV": "development", "AUDIT_PUBLIC_KEYS": str(keys_dir)}
    t = time.perf_counter()
    result = subprocess.run(  # noqa: S603 - our own CLI, fixed arguments
        [sys.executable, "-m", "clave.cli", "audit", "verify", "--file", str(path), "--no-heads"],
        capture_output=True,
        text=True,
        check=False,
        env=env,
        timeout=3600,
    )
    elapsed = time.perf_counter() - t
    assert result.returncode == 0, result.stdout + result.stderr
    return {
        "cli_seconds": round(elapsed, 2),
        "cli_maxrss_mib": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1),
        "cli_output": result.stdout.strip(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10000,100000", help="log sizes to verify, comma-separated")
    parser.add_argument("--producers", type=int, default=5, choices=range(1, len(SERVICES) + 1))
    parser.add_argument("--child-loop", nargs=2, metavar=("LOG", "KEYS"), help=argparse.SUPPRESS)
    parser.add_argument("--child-cli", nargs=2, metavar=("LOG", "KEYS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_loop:
        print(json.dumps(verify_loop(Path(args.child_loop[0]), Path(args.child_loop[1]))))
        return
    if args.child_cli:
        print(json.dumps(cli_child(Path(args.child_cli[0]), Path(args.child_cli[1]))))
        return
    rows = []
    with tempfile.TemporaryDirectory(prefix="clave-bench-audit-") as tmp:
        for size in (int(s) for s in args.sizes.split(",")):
            log, keys_dir = Path(tmp) / f"audit-{size}.jsonl", Path(tmp) / f"keys-{size}"
            t = time.perf_counter()
            write_log(log, keys_dir, size, args.producers)
            generated = time.perf_counter() - t
            row = {"size": size, "log_mib": round(log.stat().st_size / 2**20, 1), "generate_s": round(generated, 1)}
            row.update(measure(log, keys_dir))
            rows.append(row)
            print(json.dumps(row), flush=True)
            log.unlink()
    print()
    print(f"{'events':>8} {'log MiB':>8} {'verify s':>9} {'events/s':>9} {'loop peak MiB':>14} {'CLI RSS MiB':>12}")
    for r in rows:
        print(
            f"{r['events']:>8} {r['log_mib']:>8} {r['seconds']:>9} {r['events_per_s']:>9} "
            f"{r['tracemalloc_peak_mib']:>14} {r['cli_maxrss_mib']:>12}"
        )


if __name__ == "__main__":
    main()
