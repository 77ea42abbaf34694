"""Kafka connection settings shared by the FastStream broker, the outbox relay,
the CLI and the tests: one place for bootstrap servers, TLS and SASL/SCRAM.

The connection comes from the KAFKA_* settings, or from a client properties file
(KAFKA_CLIENT_PROPERTIES, librdkafka syntax as `kcat -F` reads it) that names the
principal: the local stack writes one per principal in `var/secrets/kafka/`.
"""

from __future__ import annotations

import logging
import ssl
from pathlib import Path
from typing import Any, TypeVar, get_args

from faststream import AckPolicy
from faststream.kafka import KafkaBroker
from faststream.security import BaseSecurity, SASLPlaintext, SASLScram256, SASLScram512

from shared.logsafe import BrokerLogger
from shared.settings import PlatformSettings

S = TypeVar("S", bound=PlatformSettings)

# librdkafka property -> setting. Anything else in the file is refused (fail closed: a key we
# would silently ignore, e.g. a client certificate, would connect differently than intended).
PROPERTIES = {
    "bootstrap.servers": "kafka_bootstrap_servers",
    "security.protocol": "kafka_security_protocol",
    "sasl.mechanism": "kafka_sasl_mechanism",
    "sasl.mechanisms": "kafka_sasl_mechanism",  # librdkafka's older spelling
    "sasl.username": "kafka_sasl_username",
    "sasl.password": "kafka_sasl_password",
    "ssl.ca.location": "kafka_ssl_cafile",
}
IGNORED_PROPERTIES = {"client.id"}
_CHOICES = {
    "kafka_security_protocol": get_args(PlatformSettings.model_fields["kafka_security_protocol"].annotation),
    "kafka_sasl_mechanism": get_args(PlatformSettings.model_fields["kafka_sasl_mechanism"].annotation),
}


def read_properties(path: str | Path) -> dict[str, str]:
    """The settings a client properties file gives (`key=value` lines, `#` comments).
    Errors name the file and the key, never a value (it may be the password)."""
    values: dict[str, str] = {}
    for number, raw in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key:
            raise ValueError(f"{path}:{number}: expected key=value")
        if key in IGNORED_PROPERTIES:
            continue
        field = PROPERTIES.get(key)
        if field is None:
            raise ValueError(f"{path}:{number}: unsupported property {key!r} (supported: {', '.join(PROPERTIES)})")
        if field in ("kafka_security_protocol", "kafka_sasl_mechanism"):
            value = value.upper()
            if value not in _CHOICES[field]:
                raise ValueError(f"{path}:{number}: {key} must be one of {', '.join(_CHOICES[field])}")
        values[field] = value
    return values


def connection(settings: S) -> S:
    """`settings` with the connection of its KAFKA_CLIENT_PROPERTIES file, if one is set."""
    if not settings.kafka_client_properties:
        return settings
    return settings.model_copy(update=read_properties(settings.kafka_client_properties))


def render_properties(
    bootstrap_servers: str, security_protocol: str, mechanism: str, username: str, password: str, cafile: str = ""
) -> str:
    """A client properties file for one principal, readable by `kcat -F` and by `read_properties`."""
    lines = [
        f"bootstrap.servers={bootstrap_servers}",
        f"security.protocol={security_protocol}",
        f"sasl.mechanism={mechanism}",
        f"sasl.username={username}",
        f"sasl.password={password}",
    ]
    if cafile:
        lines.append(f"ssl.ca.location={cafile}")
    return "\n".join(lines) + "\n"


def _ssl_context(settings: PlatformSettings) -> ssl.SSLContext | None:
    if settings.kafka_security_protocol not in ("SSL", "SASL_SSL"):
        return None
    return ssl.create_default_context(cafile=settings.kafka_ssl_cafile or None)


def client_kwargs(settings: PlatformSettings) -> dict[str, Any]:
    """Keyword arguments for aiokafka clients (producer, consumer, admin)."""
    settings = connection(settings)
    kwargs: dict[str, Any] = {
        "bootstrap_servers": settings.kafka_bootstrap_servers,
        "security_protocol": settings.kafka_security_protocol,
    }
    context = _ssl_context(settings)
    if context is not None:
        kwargs["ssl_context"] = context
    if settings.kafka_security_protocol.startswith("SASL"):
        kwargs["sasl_mechanism"] = settings.kafka_sasl_mechanism
        kwargs["sasl_plain_username"] = settings.kafka_sasl_username
        kwargs["sasl_plain_password"] = settings.kafka_sasl_password
    return kwargs


def _security(settings: PlatformSettings) -> BaseSecurity | None:
    context = _ssl_context(settings)
    use_ssl = context is not None
    if settings.kafka_security_protocol.startswith("SASL"):
        user, password = settings.kafka_sasl_username, settings.kafka_sasl_password
        cls = {
            "SCRAM-SHA-256": SASLScram256,
            "SCRAM-SHA-512": SASLScram512,
            "PLAIN": SASLPlaintext,
        }[settings.kafka_sasl_mechanism]
        return cls(username=user, password=password, ssl_context=context, use_ssl=use_ssl)
    if use_ssl:
        return BaseSecurity(ssl_context=context, use_ssl=True)
    return None


def make_broker(settings: PlatformSettings, service: str) -> KafkaBroker:
    # At-least-once: offsets are committed only after a handler returned (NACK_ON_ERROR
    # seeks back on an exception), never on receipt (ACK_FIRST would auto-commit).
    settings = connection(settings)
    # FastStream's log lines (a failing handler, a consume loop that died, a failed commit, the
    # partitions assigned) go to `clave.broker` rewritten without message text or exception
    # messages, which may quote input (shared/logsafe.py). Its per-record "Received" and
    # "Processed" lines are DEBUG.
    logger = BrokerLogger()
    broker = KafkaBroker(
        settings.kafka_bootstrap_servers,
        client_id=f"clave-{service}",
        security=_security(settings),
        enable_idempotence=True,
        acks="all",
        ack_policy=AckPolicy.NACK_ON_ERROR,
        # Topics are provisioned (deploy/local/create_topics.py, the chart's provision job) and a
        # service's principal may not create them: FastStream's attempt at every subscriber's
        # start was a refused admin request and a warning per topic.
        allow_auto_create_topics=False,
        logger=logger,
        log_level=logging.DEBUG,
    )
    logger.context = broker.context
    return broker
