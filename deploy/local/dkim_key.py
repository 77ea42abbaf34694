"""The local stack's DKIM key: made once, and its DNS record published in a file.

    python deploy/local/dkim_key.py KEY_DIR DNS_DIR

Makes KEY_DIR/<selector>.pem (RSA 2048, PKCS#1 PEM as dkimpy reads it, mode 0600 in a 0700
folder) unless it exists, writes the TXT record a receiver would find in DNS to
DNS_DIR/<selector>._domainkey.<domain>.txt, and prints the notifier's setting for the key,
DKIM_PRIVATE_KEY=<path>. The selector and domain are the notifier's own settings
(DKIM_SELECTOR, DKIM_DOMAIN or the domain of MAIL_FROM), read the same way it reads them.
A development key: production keys come from the platform's secret store (see README).
"""

from __future__ import annotations

import base64
import os
import sys
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from services.notifier.settings import NotifierSettings


def dns_record(pem: bytes) -> str:
    """The TXT value of `<selector>._domainkey.<domain>` for this private key (RFC 6376, 3.6.1)."""
    key = serialization.load_pem_private_key(pem, password=None)
    der = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return f"v=DKIM1; k=rsa; p={base64.b64encode(der).decode()}"


def ensure_key(path: Path) -> bytes:
    if path.is_file() and path.stat().st_size > 0:
        return path.read_bytes()
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    pem = rsa.generate_private_key(public_exponent=65537, key_size=2048).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()
    )
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    os.replace(tmp, path)
    return pem


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        sys.stderr.write("usage: dkim_key.py KEY_DIR DNS_DIR\n")
        return 2
    settings = NotifierSettings()
    selector, domain = settings.dkim_selector, settings.signing_domain()
    key_path = Path(argv[0]).resolve() / f"{selector}.pem"
    pem = ensure_key(key_path)
    dns_dir = Path(argv[1])
    dns_dir.mkdir(parents=True, exist_ok=True)
    (dns_dir / f"{selector}._domainkey.{domain}.txt").write_text(dns_record(pem) + "\n", encoding="ascii")
    print(f"DKIM_PRIVATE_KEY={key_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
