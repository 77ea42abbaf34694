"""DKIM signatures (RFC 6376) on every mail the notifier sends, with dkimpy.

A receiver looks up `<selector>._domainkey.<domain>` in DNS and checks the signature, so mail
from Clave can be told from a forgery and lands in the inbox (with SPF and DMARC, see README,
"Mail that lands in the inbox"). The message is serialised once, signed, and those very bytes
go over SMTP: nothing can re-encode it between the signature and the wire.

Rotation is by selector: publish the new selector's record, switch DKIM_SELECTOR and
DKIM_PRIVATE_KEY, and remove the old record once mail signed with it is no longer in transit
(a few days).
"""

from __future__ import annotations

import email.policy
import email.utils
from dataclasses import dataclass
from email.message import EmailMessage
from pathlib import Path

import dkim

# Headers signed; a mail whose From, To, Subject, Date or links are altered fails the check.
SIGNED_HEADERS = (
    b"from",
    b"to",
    b"subject",
    b"date",
    b"message-id",
    b"reply-to",
    b"mime-version",
    b"content-type",
    b"content-language",
    b"auto-submitted",
)


class DkimKeyError(ValueError):
    """The DKIM key cannot be used (missing, unreadable, not an RSA key in PEM)."""


@dataclass(frozen=True)
class Envelope:
    """What goes over SMTP: the exact bytes, and the envelope addresses."""

    sender: str
    recipients: list[str]
    data: bytes
    utf8: bool  # an address needs SMTPUTF8 (RFC 6531)


@dataclass(frozen=True)
class DkimSigner:
    selector: str
    domain: str
    private_key: bytes  # PEM (RSAPrivateKey, PKCS#1), as dkimpy reads it

    @classmethod
    def from_file(cls, path: str, selector: str, domain: str) -> DkimSigner:
        try:
            pem = Path(path).read_bytes()
        except OSError as exc:
            raise DkimKeyError(f"DKIM_PRIVATE_KEY: cannot read {path} ({exc.__class__.__name__})") from None
        signer = cls(selector, domain, pem)
        signer.sign(b"From: check@" + domain.encode() + b"\r\nSubject: key check\r\n\r\nkey check\r\n")
        return signer

    def sign(self, data: bytes) -> bytes:
        """`data` with its DKIM-Signature header in front."""
        try:
            header = dkim.sign(
                data,
                self.selector.encode(),
                self.domain.encode(),
                self.private_key,
                canonicalize=(b"relaxed", b"relaxed"),
                include_headers=[h for h in SIGNED_HEADERS if h + b":" in data.lower()],
            )
        except dkim.DKIMException as exc:
            raise DkimKeyError(f"cannot sign with it ({exc.__class__.__name__}: an RSA key in PEM is needed)") from None
        return bytes(header) + data


def key_problems(path: str, selector: str, domain: str) -> list[str]:
    """Why this key cannot sign, for production's start-up gate (never the key itself)."""
    try:
        DkimSigner.from_file(path, selector, domain)
    except DkimKeyError as exc:
        return [str(exc) if str(exc).startswith("DKIM_PRIVATE_KEY") else f"DKIM_PRIVATE_KEY: {path}: {exc}"]
    return []


def envelope(message: EmailMessage, signer: DkimSigner | None) -> Envelope:
    """Serialise `message` for SMTP (CRLF lines), signed when a signer is given."""
    sender = email.utils.parseaddr(str(message["From"]))[1]
    recipients = [address for _, address in email.utils.getaddresses([str(message["To"])])]
    utf8 = not all(address.isascii() for address in (sender, *recipients))
    data = message.as_bytes(policy=email.policy.SMTPUTF8 if utf8 else email.policy.SMTP)
    return Envelope(sender, recipients, signer.sign(data) if signer else data, utf8)
