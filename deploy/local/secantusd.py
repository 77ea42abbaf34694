"""The local store: SecantusDB's own `secantusd-py` command, with a shorter transaction lifetime.

    .venv/bin/python deploy/local/secantusd.py --host 127.0.0.1 --port 27017 --storage-path DIR
    (deploy/local/stack.sh starts it; every argument goes to secantusd-py unchanged)

Why: a transaction whose client died (a service SIGKILLed between its first write and its
commit) keeps its writes until the server reaps it.  Until then every write that touches
the same documents fails with WriteConflict -- typically the redelivered event's own
processed-event record, so the partition stalls.  The server reaps such a transaction
after STORE_TXN_LIFETIME_S seconds without activity (default 10; SecantusDB's built-in
default is 60, like mongod's transactionLifetimeLimitSeconds).  Clave's transactions do
no waiting inside (hashing, SMTP and Kafka happen outside them), so 10 s is ample.
secantusd-py has no option for it, hence this launcher.  Production: set MongoDB's
`transactionLifetimeLimitSeconds` likewise (see README, Guarantees).
"""

from __future__ import annotations

import functools
import os
import sys

from secantus import cli


def main() -> int:
    lifetime = float(os.environ.get("STORE_TXN_LIFETIME_S", "10"))
    server_class = getattr(cli, "SecantusDBServer", None)
    if server_class is None:  # the package changed: say so rather than run with the default
        print("secantusd.py: secantus.cli.SecantusDBServer not found (SecantusDB changed?)", file=sys.stderr)
        return 2
    cli.SecantusDBServer = functools.partial(server_class, transaction_lifetime_seconds=lifetime)  # type: ignore[attr-defined]
    return cli.main()


if __name__ == "__main__":
    sys.exit(main())
