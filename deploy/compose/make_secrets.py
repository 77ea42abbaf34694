"""Make the secrets of the compose stack (deploy/compose/compose.yaml); idempotent.

    .venv/bin/python deploy/compose/make_secrets.py [DIR]     # default: deploy/compose/secrets

Writes, once each (an existing file is never overwritten: delete one to rotate it):

- kafka/<principal>.password: one random password per SCRAM principal (deploy/kafka/provision.py
  PRINCIPALS) and the brokers' controller listener; kafka/cluster.id;
- mongodb/root.password, mongodb/keyfile (the replica set's internal authentication),
  mongodb/<service>.uri: each service's own MongoDB user, allowed only its own database;
  mongodb/auditor.uri: the auditor job's user, allowed only to read the audit read model;
- keys/<VARIABLE>: every key the services load (their settings classes' key lists: Fernet
  keys for the sealing lists, 32 random bytes for the HMAC keys);
- audit/<service>.pem: each service's own Ed25519 audit signing key (PKCS#8 PEM, its
  AUDIT_SIGNING_KEY), and audit/public/<service>-<kid>.json: its public key, in the form
  `clave audit keygen` writes. The public folder is not secret (it is made here because
  it comes from the private keys): the verifiers mount it as AUDIT_PUBLIC_KEYS. Rotate a
  service's key by deleting its .pem: the next run makes a new pair and adds its public
  entry, and every older entry stays (the events they signed are verified with them);
  set the old entry's `not_after` (README, "Auditing Clave");
- portal/sealing.pem: Clave's X25519 private key for sealed portal input (PORTAL_SEALING_KEY of
  identity, tokens and password), and portal/sealing-public.pem, the public key to give the
  portal (not secret);
- dkim/private.pem: the notifier's DKIM key (RSA 2048, DKIM_PRIVATE_KEY), and
  dkim/dns-record.txt: the TXT value to publish at <selector>._domainkey.<domain>; rotate by
  a new selector (README, "Mail that lands in the inbox");
- grafana/admin.password;
- tls/: a private CA and a certificate for each broker, store member and the mail catcher
  (with the compose host names), since production mode refuses Kafka and MongoDB without TLS.
  tls/ca.key stays here: no container mounts it.

The directory is created owner-only (0700). The files themselves are 0644: Compose
bind-mounts them as they are, and each container reads them as its own non-root user
(audit/public/ is 0755 for the same reason: it is bind-mounted as a folder).
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import functools
import importlib
import inspect
import ipaddress
import secrets
import sys
import typing
from collections.abc import Callable
from pathlib import Path

from cryptography import x509
from cryptography.fernet import Fernet
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "deploy" / "kafka"))

import provision  # noqa: E402

from shared.auditkeys import PublicKeyEntry, kid_of, load_signing_key, private_pem  # noqa: E402
from shared.portal_input import make_key_pair  # noqa: E402
from shared.settings import PlatformSettings  # noqa: E402

SERVICES = ("identity", "tokens", "notifier", "password", "audit")
KAFKA_BROKERS = ("kafka-1", "kafka-2", "kafka-3")
MONGO_MEMBERS = ("mongo-1", "mongo-2", "mongo-3")
REPLICA_SET = "rs0"
MAIL_HOST = "mailpit"
# Where the containers see the CA (a compose secret), for the URIs written here.
CA_IN_CONTAINER = "/run/secrets/tls_ca"
CERT_DAYS = 825


def settings_class(service: str) -> type[PlatformSettings]:
    """The settings class service <service> runs with: the one its app's `build(settings=...)`
    loads (a settings module may hold others, e.g. the auditor's next to the audit service's)."""
    build = importlib.import_module(f"services.{service}.app").build
    hint = typing.get_type_hints(build).get("settings")
    found = [
        cls for cls in typing.get_args(hint) or (hint,) if inspect.isclass(cls) and issubclass(cls, PlatformSettings)
    ]
    if len(found) != 1:
        raise LookupError(f"services/{service}/app.py: build(settings=...) names not one settings class: {hint}")
    return found[0]


def service_keys(service: str) -> dict[str, bool]:
    """The key variables a service loads: name -> True for a Fernet list, False for HMAC.
    From the class's defaults, not this process's environment (an optional key, such as the
    audit service's legacy AUDIT_HMAC_KEY, is loaded only when given, so it is not made)."""
    settings = settings_class(service).model_construct()
    return {**dict.fromkeys(settings.fernet_keys(), True), **dict.fromkeys(settings.hmac_keys(), False)}


def signs_audit(service: str) -> bool:
    """Does the service sign an audit chain (and so need its own AUDIT_SIGNING_KEY)?"""
    return settings_class(service).signs_audit


def verifies_audit(service: str) -> bool:
    """Does the service check the producers' signatures (and so need AUDIT_PUBLIC_KEYS)?"""
    return "audit_public_keys" in settings_class(service).model_fields


def all_keys() -> dict[str, bool]:
    keys: dict[str, bool] = {}
    for service in SERVICES:
        keys.update(service_keys(service))
    return keys


def mongodb_uri(user: str, password: str) -> str:
    hosts = ",".join(f"{h}:27017" for h in MONGO_MEMBERS)
    return (
        f"mongodb://{user}:{password}@{hosts}/?replicaSet={REPLICA_SET}"
        f"&tls=true&tlsCAFile={CA_IN_CONTAINER}&authSource=admin"
    )


class Writer:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.created: list[str] = []

    def file(self, name: str, make: Callable[[], bytes | str]) -> Path:
        path = self.root / name
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            data = make()
            path.write_bytes(data.encode() if isinstance(data, str) else data)
            path.chmod(0o600 if name.endswith(".key") and name.startswith("tls/ca") else 0o644)
            self.created.append(name)
        return path


def _password() -> str:
    # URL- and JAAS-safe (letters, digits, - and _): it goes into URIs and Kafka configs as is.
    return secrets.token_urlsafe(32)


def _service_uri(service: str) -> str:
    return mongodb_uri(service, _password())


def _fernet_key() -> str:
    return Fernet.generate_key().decode()


def _key_pem(key: rsa.RSAPrivateKey) -> bytes:
    # PKCS#8, unencrypted: the form Kafka's PEM key store, mongod and mailpit all read.
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _cert(
    subject: str,
    key: rsa.RSAPrivateKey,
    issuer: x509.Certificate | None,
    issuer_key: rsa.RSAPrivateKey,
    names: tuple[str, ...] = (),
) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer.subject if issuer else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=CERT_DAYS if issuer else 10 * 365))
    )
    if issuer is None:
        builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True).add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )
    else:
        sans: list[x509.GeneralName] = [x509.DNSName(n) for n in (*names, "localhost")]
        sans.append(x509.IPAddress(ipaddress.ip_address("127.0.0.1")))
        builder = (
            builder.add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(
                # serverAuth for clients, clientAuth for broker-to-broker and member-to-member links.
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                critical=False,
            )
        )
    return builder.sign(issuer_key, hashes.SHA256())


def _joined(make: Callable[[str], tuple[bytes, bytes]], host: str) -> bytes:
    return b"".join(make(host))


def _public_entry(producer: str, key: Ed25519PrivateKey) -> str:
    # What `clave audit keygen` publishes (no validity bounds: set not_after when rotating).
    return PublicKeyEntry.of(producer, key.public_key()).model_dump_json(indent=1, exclude_none=True) + "\n"


def make_audit_keys(w: Writer) -> None:
    """Each signing service's Ed25519 key pair: its private key alone for it, every public
    key in the folder the verifiers read. A kept private key gets its public entry again
    if that is missing."""
    (w.root / "audit").mkdir(exist_ok=True, mode=0o700)
    public = w.root / "audit" / "public"
    public.mkdir(exist_ok=True)
    public.chmod(0o755)  # bind-mounted as a folder: the container's user must list it
    for service in SERVICES:
        if not signs_audit(service):
            continue
        private = w.root / "audit" / f"{service}.pem"
        key = load_signing_key(str(private)) if private.exists() else Ed25519PrivateKey.generate()
        w.file(f"audit/{service}.pem", functools.partial(private_pem, key))
        w.file(
            f"audit/public/{service}-{kid_of(key.public_key())}.json",
            functools.partial(_public_entry, service, key),
        )


def make_dkim_key(w: Writer) -> None:
    """The notifier's DKIM key (RSA 2048, PKCS#1 PEM as dkimpy reads it) and the TXT record
    to publish at <selector>._domainkey.<domain> (README: "Mail that lands in the inbox")."""
    private = w.root / "dkim" / "private.pem"
    if private.exists():
        pem = private.read_bytes()
    else:
        pem = rsa.generate_private_key(public_exponent=65537, key_size=2048).private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()
        )
        w.file("dkim/private.pem", lambda: pem)
    key = serialization.load_pem_private_key(pem, password=None)
    der = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    w.file("dkim/dns-record.txt", lambda: f"v=DKIM1; k=rsa; p={base64.b64encode(der).decode()}\n")


def make_tls(w: Writer) -> None:
    ca_key_path = w.root / "tls" / "ca.key"
    if ca_key_path.exists():
        ca_key = serialization.load_pem_private_key(ca_key_path.read_bytes(), password=None)
        assert isinstance(ca_key, rsa.RSAPrivateKey)
        ca = x509.load_pem_x509_certificate((w.root / "tls" / "ca.pem").read_bytes())
    else:
        ca_key = rsa.generate_private_key(public_exponent=65537, key_size=3072)
        ca = _cert("Clave compose stack CA", ca_key, None, ca_key)
        w.file("tls/ca.key", lambda: _key_pem(ca_key))
        w.file("tls/ca.pem", lambda: ca.public_bytes(serialization.Encoding.PEM))

    def leaf(host: str) -> tuple[bytes, bytes]:
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        cert = _cert(host, key, ca, ca_key, (host,))
        return _key_pem(key), cert.public_bytes(serialization.Encoding.PEM) + ca.public_bytes(
            serialization.Encoding.PEM
        )

    for host in (*KAFKA_BROKERS, *MONGO_MEMBERS):
        # One file, key then chain: Kafka's PEM key store and mongod's certificateKeyFile.
        w.file(f"tls/{host}.pem", functools.partial(_joined, leaf, host))
    if not (w.root / "tls" / f"{MAIL_HOST}.key").exists():
        key_pem, chain = leaf(MAIL_HOST)
        w.file(f"tls/{MAIL_HOST}.key", lambda: key_pem)
        w.file(f"tls/{MAIL_HOST}.crt", lambda: chain)


def make_all(root: Path) -> list[str]:
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    root.chmod(0o700)
    w = Writer(root)
    for principal in (*provision.PRINCIPALS, "controller"):
        w.file(f"kafka/{principal}.password", _password)
    # A KRaft cluster id: 16 random bytes, url-safe base64 without padding (kafka-storage random-uuid).
    w.file("kafka/cluster.id", lambda: base64.urlsafe_b64encode(secrets.token_bytes(16)).decode().rstrip("="))
    w.file("mongodb/root.password", _password)
    w.file("mongodb/keyfile", lambda: base64.b64encode(secrets.token_bytes(756)).decode())
    for service in SERVICES:
        w.file(f"mongodb/{service}.uri", functools.partial(_service_uri, service))
    w.file("mongodb/auditor.uri", functools.partial(_service_uri, "auditor"))
    for name, fernet in all_keys().items():
        w.file(f"keys/{name}", _fernet_key if fernet else _password)
    make_audit_keys(w)
    private, public = w.root / "portal" / "sealing.pem", w.root / "portal" / "sealing-public.pem"
    for path in make_key_pair(private, public):
        path.chmod(0o644)  # as every file here: the containers read it as their own user
        w.created.append(str(path.relative_to(w.root)))
    make_dkim_key(w)
    w.file("grafana/admin.password", _password)
    make_tls(w)
    return w.created


def main() -> int:
    parser = argparse.ArgumentParser(description="Make the compose stack's secrets (never overwrites a file).")
    parser.add_argument("dir", nargs="?", type=Path, default=Path(__file__).resolve().parent / "secrets")
    args = parser.parse_args()
    created = make_all(args.dir)
    print(f"{args.dir}: {len(created)} file(s) created" + "".join(f"\n  {name}" for name in created))
    return 0


if __name__ == "__main__":
    sys.exit(main())
