"""Kafka connection settings shared by the FastStream broker, the outbox relay,
the CLI and the tests: one place for bootstrap servers, TLS and SASL/SCRAM."""

from __future__ import annotations

import ssl
from typing import Any

from faststream import AckPolicy
from faststream.kafka import KafkaBroker
from faststream.security import BaseSecurity, SASLPlaintext, SASLScram256, SASLScram512

from shared.settings import PlatformSettings


def _ssl_context(settings: PlatformSettings) -> ssl.SSLContext | None:
    if settings.kafka_security_protocol not in ("SSL", "SASL_SSL"):
        return None
    return ssl.create_default_context(cafile=settings.kafka_ssl_cafile or None)


def client_kwargs(settings: PlatformSettings) -> dict[str, Any]:
    """Keyword arguments for aiokafka clients (producer, consumer, admin)."""
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
    return KafkaBroker(
        settings.kafka_bootstrap_servers,
        client_id=f"clave-{service}",
        security=_security(settings),
        enable_idempotence=True,
        acks="all",
        ack_policy=AckPolicy.NACK_ON_ERROR,
        logger=None,
    )
