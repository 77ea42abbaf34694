"""Make the local stack's sealing key pair for portal input, once (shared/portal_input.py).

    python deploy/local/portal_keys.py VAR_DIR

Writes VAR_DIR/secrets/portal/sealing.pem (Clave's X25519 private key, 0600: given to identity,
tokens and password as PORTAL_SEALING_KEY) and VAR_DIR/portal/sealing-public.pem (the public
key the portal seals to: PORTAL_SEALING_PUBLIC_KEY for the tests, the demo and the client
library). An existing key is kept; a missing public file is made again from it. Prints both
settings (NAME=value lines), as deploy/local/stack.py's key scripts do.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from shared.portal_input import make_key_pair  # noqa: E402

PRIVATE = Path("secrets/portal/sealing.pem")
PUBLIC = Path("portal/sealing-public.pem")


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        sys.stderr.write(__doc__ or "")
        return 2
    var = Path(argv[1]).resolve()
    for path in make_key_pair(var / PRIVATE, var / PUBLIC):
        print(f"portal sealing key: made {path}", file=sys.stderr)
    print(f"PORTAL_SEALING_KEY={var / PRIVATE}")
    print(f"PORTAL_SEALING_PUBLIC_KEY={var / PUBLIC}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
