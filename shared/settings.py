"""Platform settings from environment variables, and the production gate.

`PlatformSettings` holds only what every Clave process shares: Kafka, the store,
the metrics endpoints, delivery limits and the keys of the platform itself (DLQ
sealing, and the service's own audit signing key). Each service subclasses it with its own section in
`services/<name>/settings.py`, so a process loads only the rules and keys it uses.

Fail closed: `CLAVE_ENV` is `production` unless set otherwise (the local stack and
the tests set `development`). In production `ensure_safe()` refuses to start on
any unsafe setting (`problems()` names each one), before anything connects.
Every variable is documented in the README ("Configuration").
"""

from __future__ import annotations

import base64
import binascii
import re
import sys
from functools import cache
from typing import ClassVar, Literal, TypeVar
from urllib.parse import parse_qs, urlsplit

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from shared.auditkeys import signing_key_problems

# Development-only keys (Fernet keys are 32 url-safe base64 bytes). Production refuses them.
DEV_NOTIFIER_KEY = "ZGV2LW5vdGlmaWVyLWtleS1ub3QtZm9yLXByb2QtMDE="
DEV_PASSWORD_KEY = "ZGV2LXBhc3N3b3JkLWtleS1ub3QtZm9yLXByb2QtMDE="
DEV_DLQ_KEY = "ZGV2LWRscS1wYXlsb2FkLWtleS1ub3QtZm9yLXByb2Q="
DEV_AUDIT_KEY = "dev-audit-hmac-key-not-for-production"  # legacy audit MACs (before signatures)
DEV_PSEUDONYM_KEY = "dev-pseudonym-key-not-for-production"
DEV_CODE_KEY = "dev-code-hmac-key-not-for-production"
DEV_IMPORT_KEY = "ZGV2LWFjY291bnQtaW1wb3J0LWtleS1ub3QtcHJvZCE="  # seals an account import for identity
DEV_KEYS = frozenset(
    {DEV_NOTIFIER_KEY, DEV_PASSWORD_KEY, DEV_DLQ_KEY, DEV_AUDIT_KEY, DEV_PSEUDONYM_KEY, DEV_CODE_KEY, DEV_IMPORT_KEY}
)

MIN_KEY_BYTES = 32
EXIT_UNSAFE_SETTINGS = 78  # EX_CONFIG (sysexits.h)


class PlatformSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="", case_sensitive=False, extra="ignore")

    clave_env: Literal["production", "development"] = "production"

    # Kafka
    kafka_bootstrap_servers: str = "127.0.0.1:9092"
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    kafka_sasl_mechanism: Literal["SCRAM-SHA-256", "SCRAM-SHA-512", "PLAIN"] = "SCRAM-SHA-512"
    kafka_sasl_username: str = ""
    kafka_sasl_password: str = ""
    kafka_ssl_cafile: str = ""
    # A client properties file (librdkafka syntax, as `kcat -F` reads): when set, its
    # bootstrap.servers, security.protocol, sasl.* and ssl.ca.location replace the kafka_* above.
    kafka_client_properties: str = ""
    kafka_topic_partitions: int = 6
    portal_topic_retention_ms: int = 3_600_000
    internal_topic_retention_ms: int = 7 * 24 * 3_600_000

    # Store
    mongodb_uri: str = "mongodb://127.0.0.1:27017/?replicaSet=secantus"
    mongodb_db_prefix: str = "clave_"

    # Health and metrics endpoints
    metrics_host: str = "127.0.0.1"
    identity_metrics_port: int = 9401
    tokens_metrics_port: int = 9402
    notifier_metrics_port: int = 9403
    password_metrics_port: int = 9404
    audit_metrics_port: int = 9405
    log_level: str = "INFO"

    # Delivery
    max_event_bytes: int = Field(default=64 * 1024)
    # Consumers per hot topic and service instance (<= partitions). 1: on 2 cores, 3 cost Kafka
    # 52 instead of 32 ms of CPU a recovery (more fetch loops) and were slower (make bench).
    consumer_workers: int = Field(default=1, ge=1)
    # Consumers of a hot topic whose handler waits on argon2 (identity's recovery requests,
    # password's resets), apart from the other hot topics: on a machine with idle cores, 2 let
    # two recoveries hash at once. 1 by default: on 2 shared cores, 19 paired `make bench` runs
    # showed no gain beyond noise (the cores were never idle: every run was CPU-bound). The
    # larger of this and CONSUMER_WORKERS applies.
    hashing_consumer_workers: int = Field(default=1, ge=1)
    # How long a fetch of a portal-input consumer (shared.topics.PORTAL_INPUTS: someone waits
    # for the answer) may wait at the broker for data. While a consumer handles a record, its
    # next fetch leaves that record's partition out; a record that then arrives there waits
    # for that fetch to come back: up to this long (aiokafka's default, 500 ms, made login's
    # p99 miss 100 ms). Each idle consumer sends 1000 / this many fetches a second.
    portal_fetch_max_wait_ms: int = Field(default=50, ge=10, le=500)

    # Platform keys: every consumer dead-letters, every relay signs its audit chain with the
    # service's own Ed25519 key (a PEM file path; empty: the public development key).
    dlq_keys: str = DEV_DLQ_KEY
    audit_signing_key: str = ""

    # Does this process sign an audit chain? Services do (their outbox relay); command-line
    # clients do not, and are neither given nor asked for a signing key.
    signs_audit: ClassVar[bool] = True

    @property
    def production(self) -> bool:
        return self.clave_env == "production"

    def db_name(self, service: str) -> str:
        return f"{self.mongodb_db_prefix}{service}"

    def metrics_port(self, service: str) -> int:
        return int(getattr(self, f"{service}_metrics_port"))

    # ---- the production gate -----------------------------------------------------------------

    def fernet_keys(self) -> dict[str, str]:
        """Fernet key lists this process loads, by variable name (subclasses add theirs)."""
        return {"DLQ_KEYS": self.dlq_keys}

    def hmac_keys(self) -> dict[str, str]:
        """HMAC keys this process loads, by variable name (subclasses add theirs)."""
        return {}

    def signing_key_problems(self) -> list[str]:
        if not self.signs_audit:
            return []
        return [f"AUDIT_SIGNING_KEY: {p}" for p in signing_key_problems(self.audit_signing_key)]

    def problems(self) -> list[str]:
        """Every setting production refuses, one line each (never the secret's value)."""
        found: list[str] = []
        for name, keys in self.fernet_keys().items():
            found += [f"{name}: {p}" for p in key_list_problems(keys, fernet=True)]
        for name, keys in self.hmac_keys().items():
            found += [f"{name}: {p}" for p in key_list_problems(keys, fernet=False)]
        found += self.signing_key_problems()
        if self.kafka_security_protocol in ("PLAINTEXT", "SASL_PLAINTEXT"):
            found.append(f"KAFKA_SECURITY_PROTOCOL: {self.kafka_security_protocol} sends credentials and data in clear")
        if not mongodb_uri_uses_tls(self.mongodb_uri):
            found.append("MONGODB_URI: no TLS (add tls=true, or use mongodb+srv://)")
        return found

    def insecure_defaults(self) -> list[str]:
        """Key variables still at their development value (development mode warns about them)."""
        keys = {**self.fernet_keys(), **self.hmac_keys()}
        found = [name for name, value in keys.items() if any(k.strip() in DEV_KEYS for k in value.split(","))]
        if any("development" in p for p in self.signing_key_problems()):
            found.append("AUDIT_SIGNING_KEY")
        return found

    def ensure_safe(self, process: str) -> None:
        """In production, refuse to start on any unsafe setting: name each, exit non-zero."""
        if not self.production:
            return
        problems = self.problems()
        if problems:
            lines = "\n".join(f"  - {p}" for p in problems)
            sys.stderr.write(
                f"{process}: refusing to start in production (CLAVE_ENV=production) because of:\n{lines}\n"
                "Fix these settings, or set CLAVE_ENV=development on a development machine.\n"
            )
            raise SystemExit(EXIT_UNSAFE_SETTINGS)


class ClientSettings(PlatformSettings):
    """A command-line client (operator commands): it publishes no audit event, so it signs
    no chain and needs no signing key."""

    signs_audit: ClassVar[bool] = False


def _decode_key(text: str) -> bytes | None:
    """A key as written in settings: url-safe base64 (Fernet's and secrets.token_urlsafe's
    form) or hex. None when it is neither."""
    text = text.strip()
    if re.fullmatch(r"(?:[0-9a-fA-F]{2})+", text):
        return bytes.fromhex(text)
    try:
        return base64.b64decode(text + "=" * (-len(text) % 4), altchars=b"-_", validate=True)
    except (binascii.Error, ValueError):
        return None


def key_problems(key: str, *, fernet: bool) -> list[str]:
    """Why one key is unfit for production: a development key, or under 32 random bytes."""
    if key.strip() in DEV_KEYS:
        return ["a development key (public in the source code)"]
    raw = _decode_key(key)
    if raw is None:
        return ["not url-safe base64 or hex"]
    if len(raw) < MIN_KEY_BYTES or (fernet and len(raw) != MIN_KEY_BYTES):
        return [f"{len(raw)} bytes, needs {MIN_KEY_BYTES} random bytes"]
    if all(32 <= b < 127 for b in raw):
        # 32 random bytes are all printable with probability (95/256)^32, about 1e-14: this is text.
        return ["decodes to printable text, not random bytes"]
    return []


def key_list_problems(keys: str, *, fernet: bool) -> list[str]:
    """A rotatable key list: every key in it must be fit (old keys still open old data)."""
    items = [k for k in keys.split(",") if k.strip()]
    if not items:
        return ["empty"]
    found: list[str] = []
    for position, key in enumerate(items, start=1):
        prefix = f"key {position} of {len(items)}: " if len(items) > 1 else ""
        found += [prefix + p for p in key_problems(key, fernet=fernet)]
    return found


def mongodb_uri_uses_tls(uri: str) -> bool:
    """TLS on: `tls=true`/`ssl=true`, or a `mongodb+srv://` URI that does not turn it off."""
    parts = urlsplit(uri)
    options = {k.lower(): v[-1].lower() for k, v in parse_qs(parts.query).items() if k.lower() in ("tls", "ssl")}
    if parts.scheme == "mongodb+srv":
        return "false" not in options.values()
    return "true" in options.values()


# OWASP Password Storage Cheat Sheet: argon2id configurations of equal strength
# (memory in KiB, iterations), all with parallelism 1.
ARGON2_OWASP_MINIMUMS = ((47_104, 1), (19_456, 2), (12_288, 3), (9_216, 4), (7_168, 5))


class Argon2Settings(BaseSettings):
    """argon2id cost, for the services that hash secrets (identity's answers, password's keys)."""

    argon2_time_cost: int = 2
    argon2_memory_kib: int = 19 * 1024
    argon2_parallelism: int = 1

    def argon2_problems(self) -> list[str]:
        strong = any(
            self.argon2_memory_kib >= m and self.argon2_time_cost >= t for m, t in ARGON2_OWASP_MINIMUMS
        )
        if strong and self.argon2_parallelism >= 1:
            return []
        return [
            f"ARGON2_MEMORY_KIB/ARGON2_TIME_COST: m={self.argon2_memory_kib} KiB, t={self.argon2_time_cost} is under "
            "OWASP's minimum (m=19456 KiB with t=2, or an equal row of its table)"
        ]


class PortalInputSettings(BaseSettings):
    """For the services that read what the portal may seal (identity: answers, tokens: new
    keys, password: login keys): shared/portal_input.py."""

    # `sealed` refuses secrets in the clear, `any` takes both; unset: `sealed` in production,
    # `any` in development.
    portal_input: Literal["sealed", "any"] | None = None
    # Clave's X25519 private key(s): PEM file path(s), comma-separated during a rotation.
    portal_sealing_key: str = ""

    def portal_input_mode(self, production: bool) -> Literal["sealed", "any"]:
        if self.portal_input is not None:
            return self.portal_input
        return "sealed" if production else "any"

    def portal_input_problems(self) -> list[str]:
        from shared.portal_input import sealing_key_problems  # cryptography's HPKE: loaded by readers only

        found = []
        if self.portal_input == "any":
            found.append("PORTAL_INPUT: any accepts the portal's secrets in the clear; production needs sealed")
        found += [f"PORTAL_SEALING_KEY: {p}" for p in sealing_key_problems(self.portal_sealing_key)]
        return found


S = TypeVar("S", bound=PlatformSettings)


@cache
def load(cls: type[S]) -> S:
    """One settings object per class and process."""
    return cls()


def get_settings() -> PlatformSettings:
    return load(PlatformSettings)
