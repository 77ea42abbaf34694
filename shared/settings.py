"""Settings from environment variables, with defaults for the local stack.

Every variable is documented in the README ("Configuration"). Keys with a
`dev-only` default must be set in production; `Settings.insecure_defaults()`
names those still at their development value so services can warn loudly.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

# Development-only keys (Fernet keys are 32 url-safe base64 bytes). Never use in production.
DEV_NOTIFIER_KEY = "ZGV2LW5vdGlmaWVyLWtleS1ub3QtZm9yLXByb2QtMDE="
DEV_PASSWORD_KEY = "ZGV2LXBhc3N3b3JkLWtleS1ub3QtZm9yLXByb2QtMDE="
DEV_DLQ_KEY = "ZGV2LWRscS1wYXlsb2FkLWtleS1ub3QtZm9yLXByb2Q="
DEV_AUDIT_KEY = "dev-audit-hmac-key-not-for-production"
DEV_PSEUDONYM_KEY = "dev-pseudonym-key-not-for-production"
DEV_CODE_KEY = "dev-code-hmac-key-not-for-production"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="", case_sensitive=False, extra="ignore")

    # Infrastructure
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
    mongodb_uri: str = "mongodb://127.0.0.1:27017/?replicaSet=secantus"
    mongodb_db_prefix: str = "clave_"
    smtp_host: str = "127.0.0.1"
    smtp_port: int = 1025
    smtp_username: str = ""
    smtp_password: str = ""
    smtp_starttls: bool = False
    smtp_timeout_s: float = 10.0
    mail_from: str = "Clave <no-reply@clave.example.org>"
    mail_reply_to: str = "soporte@clave.example.org"
    mail_dir: str = "var/mail"
    portal_base_url: str = "http://127.0.0.1:8080"
    metrics_host: str = "127.0.0.1"
    identity_metrics_port: int = 9401
    tokens_metrics_port: int = 9402
    notifier_metrics_port: int = 9403
    password_metrics_port: int = 9404
    audit_metrics_port: int = 9405
    log_level: str = "INFO"

    # Secrets (rotatable: comma-separated, the first encrypts, all decrypt)
    notifier_keys: str = DEV_NOTIFIER_KEY
    password_keys: str = DEV_PASSWORD_KEY
    dlq_keys: str = DEV_DLQ_KEY
    audit_hmac_key: str = DEV_AUDIT_KEY
    pseudonym_key: str = DEV_PSEUDONYM_KEY
    code_hmac_key: str = DEV_CODE_KEY

    # Identity rules
    security_questions: str = "birth_date,fingerprint_code,mother_surname"
    lockout_max_failures: int = 5
    lockout_window_s: int = 15 * 60
    lockout_duration_s: int = 30 * 60
    ip_max_requests: int = 30
    ip_window_s: int = 15 * 60
    recovery_mails_per_hour: int = 3

    # Token rules
    link_ttl_s: int = 30 * 60
    code_ttl_s: int = 10 * 60
    code_max_attempts: int = 5
    reservation_timeout_s: int = 120

    # Password rules
    password_policy: Literal["seed", "nist"] = "seed"
    password_history: int = 5
    argon2_time_cost: int = 2
    argon2_memory_kib: int = 19 * 1024
    argon2_parallelism: int = 1

    # Notifier
    templates_dir: str = ""  # overrides shipped templates, file by file
    smtp_max_attempts: int = 8
    smtp_backoff_initial_s: float = 0.5
    smtp_backoff_max_s: float = 30.0

    # Delivery
    max_event_bytes: int = Field(default=64 * 1024)
    consumer_workers: int = 3  # consumers per hot topic and service instance (<= partitions)

    def db_name(self, service: str) -> str:
        return f"{self.mongodb_db_prefix}{service}"

    def question_ids(self) -> list[str]:
        return [q.strip() for q in self.security_questions.split(",") if q.strip()]

    def insecure_defaults(self) -> list[str]:
        dev = {
            "NOTIFIER_KEYS": (self.notifier_keys, DEV_NOTIFIER_KEY),
            "PASSWORD_KEYS": (self.password_keys, DEV_PASSWORD_KEY),
            "DLQ_KEYS": (self.dlq_keys, DEV_DLQ_KEY),
            "AUDIT_HMAC_KEY": (self.audit_hmac_key, DEV_AUDIT_KEY),
            "PSEUDONYM_KEY": (self.pseudonym_key, DEV_PSEUDONYM_KEY),
            "CODE_HMAC_KEY": (self.code_hmac_key, DEV_CODE_KEY),
        }
        return [name for name, (value, default) in dev.items() if value == default]


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
