"""Development operator keys for the local stack: one Ed25519 key pair per operator named on
the command line (kept across restarts: DIR/<operator>.pem, mode 0600, and its public part
DIR/<operator>.pem.pub.json), each registered on identity.operator_keys as `admin` (the
caller sets KAFKA_CLIENT_PROPERTIES to admin's file). Registering a key again is harmless:
identity audits it as already registered.

    python deploy/local/operator_keys.py var/secrets/operators op-1 op-2

Production: each operator makes their own pair (`clave operators keygen`) and keeps the
private key; admin registers the public part (`clave operators register`).
"""

from __future__ import annotations

import sys
from pathlib import Path

from clave import operators
from shared.settings import ClientSettings, load


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        sys.stderr.write("usage: operator_keys.py DIR OPERATOR...\n")
        return 2
    folder = Path(argv[0])
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    folder.chmod(0o700)
    events = []
    for operator in argv[1:]:
        entry = operators.keygen(operator, folder / f"{operator}.pem")
        events.append(operators.registration(entry, "local development operator", "stack.sh"))
    operators.publish_registry(load(ClientSettings), events)
    print(f"operator keys: {', '.join(argv[1:])} registered ({folder})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
