"""The local stack's Kafka credentials (used by deploy/local/stack.py).

    kafka_secrets.py DIR BOOTSTRAP

For every principal of shared.acl.PRINCIPALS, makes sure DIR/<principal>.password holds a
random password (generated once, on the first `up`, and kept), writes
DIR/<principal>.properties (the client settings in librdkafka syntax: `kcat -F FILE`, or
KAFKA_CLIENT_PROPERTIES=FILE for Clave's own clients), and DIR/controller.password (the
broker's own login on its controller listener; no client uses it). DIR is 0700, every
file 0600. Prints the principal names, one a line, for stack.py.
"""

from __future__ import annotations

import os
import secrets
import sys
from pathlib import Path

# Runnable as a file from any directory: the repository root holds the `shared` package.
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from shared.acl import PRINCIPALS  # noqa: E402
from shared.kafka import render_properties  # noqa: E402

PROTOCOL = "SASL_PLAINTEXT"  # loopback only; production uses SASL_SSL
MECHANISM = "SCRAM-SHA-512"
CONTROLLER = "controller"


def write_private(path: Path, text: str) -> None:
    """Write `text` to `path`, readable by its owner only, atomically (a reader never sees half)."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text)
    os.chmod(tmp, 0o600)  # an existing tmp file kept its old mode
    os.replace(tmp, path)


def password(directory: Path, name: str) -> str:
    path = directory / f"{name}.password"
    if not path.exists():
        # URL-safe characters only: they need no quoting in JAAS, kafka-storage or properties files.
        write_private(path, secrets.token_urlsafe(32))
    value = path.read_text(encoding="utf-8").strip()
    if len(value) < 16:
        raise SystemExit(f"{path}: too short to be one of ours; remove it to have a new one made")
    return value


def main() -> int:
    if len(sys.argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    directory, bootstrap = Path(sys.argv[1]), sys.argv[2]
    directory.mkdir(parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    for name in PRINCIPALS:
        text = render_properties(bootstrap, PROTOCOL, MECHANISM, name, password(directory, name))
        write_private(directory / f"{name}.properties", text)
        print(name)
    password(directory, CONTROLLER)
    return 0


if __name__ == "__main__":
    sys.exit(main())
