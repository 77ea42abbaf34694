"""The portal principal's Kafka connection: a client properties file (librdkafka syntax, as
`kcat -F` reads; the local stack writes `var/secrets/kafka/portal.properties`) or arguments."""

from __future__ import annotations

import os
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_KEYS = {
    "bootstrap.servers": "bootstrap_servers",
    "security.protocol": "security_protocol",
    "sasl.mechanism": "sasl_mechanism",
    "sasl.mechanisms": "sasl_mechanism",
    "sasl.username": "sasl_username",
    "sasl.password": "sasl_password",
    "ssl.ca.location": "ssl_cafile",
}
_IGNORED = {"client.id"}


@dataclass(frozen=True)
class PortalSettings:
    bootstrap_servers: str = "127.0.0.1:9092"
    security_protocol: str = "SASL_SSL"
    sasl_mechanism: str = "SCRAM-SHA-512"
    sasl_username: str = "portal"
    sasl_password: str = ""
    ssl_cafile: str = ""

    def __repr__(self) -> str:  # never the password
        return f"PortalSettings({self.bootstrap_servers!r}, {self.security_protocol}, user={self.sasl_username!r})"

    @classmethod
    def from_properties(cls, path: str | Path) -> PortalSettings:
        """Read a client properties file. Unknown keys are refused (fail closed): a setting we
        would silently ignore, a client certificate say, would connect differently than meant.
        Errors name the line and key, never a value (it may be the password)."""
        values: dict[str, str] = {}
        for number, raw in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            key, sep, value = line.partition("=")
            key = key.strip()
            if not sep or not key:
                raise ValueError(f"{path}:{number}: expected key=value")
            if key in _IGNORED:
                continue
            if key not in _KEYS:
                raise ValueError(f"{path}:{number}: unsupported property {key!r}")
            values[_KEYS[key]] = value.strip()
        for upper in ("security_protocol", "sasl_mechanism"):
            if upper in values:
                values[upper] = values[upper].upper()
        return cls(**values)

    @classmethod
    def from_env(cls) -> PortalSettings:
        """`KAFKA_CLIENT_PROPERTIES` (a properties file), else the defaults."""
        path = os.environ.get("KAFKA_CLIENT_PROPERTIES")
        return cls.from_properties(path) if path else cls()

    def kafka_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for aiokafka's producer and consumer."""
        kwargs: dict[str, Any] = {
            "bootstrap_servers": self.bootstrap_servers,
            "security_protocol": self.security_protocol,
        }
        if self.security_protocol in ("SSL", "SASL_SSL"):
            kwargs["ssl_context"] = ssl.create_default_context(cafile=self.ssl_cafile or None)
        if self.security_protocol.startswith("SASL"):
            kwargs["sasl_mechanism"] = self.sasl_mechanism
            kwargs["sasl_plain_username"] = self.sasl_username
            kwargs["sasl_plain_password"] = self.sasl_password
        return kwargs
