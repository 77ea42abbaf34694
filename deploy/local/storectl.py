"""Store administration for the local stack (used by deploy/local/stack.py).

    storectl.py kill-sessions URI    abort every open transaction on the store (killAllSessions)

Why: secantusd-rs aborts a transaction only after 60 s idle (fixed, MongoDB's default
transactionLifetimeLimitSeconds).  A service SIGKILLed inside a transaction leaves it
open, and until then every write to the same documents fails with WriteConflict.  The
stack knows when it killed a service, and frees the store at once.  The other clients'
open transactions are aborted too; they retry, as after any transient error.
Exit 0 and a one-line summary on success, 1 with the error otherwise.
"""

from __future__ import annotations

import argparse
import sys

TIMEOUT_MS = 5000


def kill_sessions(uri: str) -> str:
    from pymongo import MongoClient

    client: MongoClient = MongoClient(
        uri, serverSelectionTimeoutMS=TIMEOUT_MS, connectTimeoutMS=TIMEOUT_MS, socketTimeoutMS=TIMEOUT_MS
    )
    try:
        client.admin.command("killAllSessions", [])
    finally:
        client.close()
    return "open transactions aborted (killAllSessions)"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["kill-sessions"])
    parser.add_argument("uri")
    args = parser.parse_args()
    try:
        print(kill_sessions(args.uri))
    except Exception as exc:  # reported by stack.py as a warning
        print(f"{type(exc).__name__}: {exc}".strip())
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
