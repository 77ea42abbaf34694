"""DKIM signatures (RFC 6376) on every mail the notifier sends: dkimpy builds the signature
(canonicalisation, header selection, the DKIM-Signature header), OpenSSL computes its RSA part.

A receiver looks up `<selector>._domainkey.<domain>` in DNS and checks the signature, so mail
from Clave can be told from a forgery and lands in the inbox (with SPF and DMARC, see README,
"Mail that lands in the inbox"). The message is serialised once, signed, and those very bytes
go over SMTP: nothing can re-encode it between the signature and the wire.

Rotation is by selector: publish the new selector's record, switch DKIM_SELECTOR and
DKIM_PRIVATE_KEY, and remove the old record once mail signed with it is no longer in transit
(a few days). Each DkimSigner loads its key once.

Why OpenSSL: dkimpy signs with its own pure-Python RSA (about 6 ms a signature, a third of the
notifier's CPU); `cryptography` does it in about 0.25 ms. RSASSA-PKCS1-v1_5 is deterministic, so
the signature bytes are the same either way (tests/unit/test_dkim_signing.py checks it).
"""

from __future__ import annotations

import email.policy
import email.utils
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import dkim
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

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


# RFC 8301: signers use RSA keys of at least 1024 bits, and verifiers (dkimpy's among them)
# refuse shorter ones, so a shorter key would sign mail nobody accepts.
MIN_KEY_BITS = 1024


# --- The OpenSSL adapter (dkimpy 1.1.8, pinned) --------------------------------------------
# dkimpy has no hook for the RSA step: DomainSigner.gen_header, which hashes the canonical
# headers, places b= and folds the header, calls the module-level name RSASSA_PKCS1_v1_5_sign
# (dkim/crypto.py, pure-Python RSA) with the header hash and the private key. Rather than
# replace that name in dkim's namespace for the whole process (dkim.verify, ARC, any other user),
# _OpenSSLDKIM runs gen_header's own code with that one name bound to _openssl_rsa_sign.
# tests/unit/test_dkim_signing.py fails if a dkimpy upgrade moves this seam.
SEAM = "RSASSA_PKCS1_v1_5_sign"


def _openssl_rsa_sign(header_hash: Any, key: rsa.RSAPrivateKey) -> bytes:
    """RSASSA-PKCS1-v1_5 over dkimpy's finished header hash (a hashlib-like object), by OpenSSL."""
    if header_hash.name != "sha256":  # only rsa-sha256 is ever asked for (rsa-sha1 is obsolete)
        raise dkim.ParameterError(f"unexpected DKIM hash {header_hash.name}")
    return key.sign(header_hash.digest(), padding.PKCS1v15(), Prehashed(hashes.SHA256()))


def _with_openssl_rsa(method: Callable[..., bytes]) -> Callable[..., bytes]:
    """`method` (a function of dkim's module) with SEAM resolved to _openssl_rsa_sign."""
    code = method.__code__
    if SEAM not in code.co_names:
        raise ImportError(f"dkimpy changed: {method.__qualname__} no longer calls {SEAM} (see signing.py)")
    namespace = {**method.__globals__, SEAM: _openssl_rsa_sign}  # a copy of dkim's names, taken at import
    rebound = types.FunctionType(code, namespace, method.__name__, method.__defaults__, method.__closure__)
    rebound.__kwdefaults__ = method.__kwdefaults__
    rebound.__qualname__ = method.__qualname__
    return rebound


class _OpenSSLDKIM(dkim.DKIM):
    """dkimpy's DKIM signer, whose RSA signature OpenSSL makes with an already loaded key."""

    _dkimpy_gen_header = _with_openssl_rsa(dkim.DomainSigner.gen_header)

    def __init__(self, message: bytes, key: rsa.RSAPrivateKey) -> None:
        super().__init__(message)
        self._key = key

    def gen_header(
        self,
        fields: list[tuple[bytes, bytes]],
        include_headers: tuple[bytes, ...],
        canon_policy: Any,
        header_name: bytes,
        pk: object,
        standardize: bool = False,
    ) -> bytes:
        # `pk` is dkimpy's own parse of the same PEM (plain numbers for its pure-Python RSA).
        return self._dkimpy_gen_header(fields, include_headers, canon_policy, header_name, self._key, standardize)


def load_key(pem: bytes) -> rsa.RSAPrivateKey:
    """The RSA private key in `pem`, for OpenSSL; DkimKeyError if it is not one that can sign."""
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:  # TypeError: a passphrase-protected key
        raise DkimKeyError(f"cannot load it ({exc.__class__.__name__}: an RSA key in PEM is needed)") from None
    if not isinstance(key, rsa.RSAPrivateKey):
        raise DkimKeyError(f"not an RSA key ({key.__class__.__name__}): DKIM here signs with rsa-sha256")
    if key.key_size < MIN_KEY_BITS:
        raise DkimKeyError(f"an RSA key of {key.key_size} bits; receivers refuse less than {MIN_KEY_BITS}")
    return key


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
    private_key: bytes = field(repr=False)  # PEM (RSA, PKCS#1 or PKCS#8, unencrypted), as dkimpy reads it
    key: rsa.RSAPrivateKey = field(init=False, repr=False, compare=False)  # the same, loaded once

    def __post_init__(self) -> None:
        object.__setattr__(self, "key", load_key(self.private_key))

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
            header = _OpenSSLDKIM(data, self.key).sign(
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
