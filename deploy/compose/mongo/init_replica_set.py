"""One-off job of the compose stack (run from the Clave image): initiate the MongoDB
replica set, then give each service its own user, allowed only its own database.

    python init_replica_set.py --members mongo-1:27017,mongo-2:27017,mongo-3:27017 \
        --root-password-file /run/secrets/mongodb_root_password --ca-file /run/secrets/tls_ca \
        /run/secrets/mongodb_identity_uri ...

Each URI file is a service's MONGODB_URI (deploy/compose/make_secrets.py): its user name is
the service's name and gets `readWrite` on `<MONGODB_DB_PREFIX><service>` and nothing else;
the auditor job's user (`auditor`) gets `read` on the audit read model's database alone.
Idempotent: an initiated set is left as it is, an existing user gets its password and roles
set again. Waits up to --wait-s seconds for the members and for a primary.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from urllib.parse import quote

from pymongo import MongoClient
from pymongo.errors import OperationFailure, PyMongoError
from pymongo.uri_parser import parse_uri

from shared.settings import PlatformSettings

NOT_YET_INITIALIZED = 94
ALREADY_INITIALIZED = 23
USER_EXISTS = 51003


def client(hosts: str, password: str, ca_file: str, *, direct: bool, replica_set: str = "") -> MongoClient:
    options = f"tls=true&tlsCAFile={quote(ca_file)}&authSource=admin&serverSelectionTimeoutMS=5000"
    options += "&directConnection=true" if direct else f"&replicaSet={replica_set}"
    return MongoClient(f"mongodb://root:{quote(password, safe='')}@{hosts}/?{options}")


def wait(what: str, deadline: float, check) -> None:  # type: ignore[no-untyped-def]
    while True:
        try:
            check()
            return
        except PyMongoError as exc:
            if time.monotonic() > deadline:
                raise SystemExit(f"mongo-init: {what}: gave up: {exc.__class__.__name__}") from exc
            time.sleep(2)


def initiate(members: list[str], replica_set: str, password: str, ca_file: str, deadline: float) -> None:
    first = client(members[0], password, ca_file, direct=True)
    wait(f"{members[0]} answering", deadline, lambda: first.admin.command("ping"))
    try:
        first.admin.command("replSetGetStatus")
        print(f"mongo-init: replica set {replica_set} already initiated")
        return
    except OperationFailure as exc:
        if exc.code != NOT_YET_INITIALIZED:
            raise
    config = {
        "_id": replica_set,
        # The first member is preferred as primary; any of the three can take over.
        "members": [{"_id": i, "host": host, "priority": 2 if i == 0 else 1} for i, host in enumerate(members)],
    }
    try:
        first.admin.command("replSetInitiate", config)
    except OperationFailure as exc:
        if exc.code != ALREADY_INITIALIZED:
            raise
    print(f"mongo-init: replica set {replica_set} initiated with {', '.join(members)}")

# Users that only read another's database: the auditor job reads the chain heads the audit
# service recorded (`clave audit verify`'s cut-off tail check).
READERS = {"auditor": "audit"}


def ensure_user(admin_db, uri: str, prefix: str) -> str:  # type: ignore[no-untyped-def]
    parsed = parse_uri(uri)
    user, password = parsed["username"], parsed["password"]
    if not user or not password:
        raise SystemExit("mongo-init: a service URI has no user name or password")
    # A service writes its own database; a reader (the auditor job) only reads the one it checks.
    role, db = ("read", f"{prefix}{READERS[user]}") if user in READERS else ("readWrite", f"{prefix}{user}")
    roles = [{"role": role, "db": db}]
    try:
        admin_db.command("createUser", user, pwd=password, roles=roles)
        return f"created user {user} ({role} on {db})"
    except OperationFailure as exc:
        if exc.code != USER_EXISTS:
            raise
    admin_db.command("updateUser", user, pwd=password, roles=roles)
    return f"updated user {user} ({role} on {db})"


def main() -> int:
    parser = argparse.ArgumentParser(description="Initiate the replica set and create the services' users.")
    parser.add_argument("--members", required=True, help="host:port,host:port,... (the first is preferred)")
    parser.add_argument("--replica-set", default="rs0")
    parser.add_argument("--root-password-file", type=Path, required=True)
    parser.add_argument("--ca-file", required=True)
    parser.add_argument("--wait-s", type=float, default=180.0)
    parser.add_argument("uri_files", nargs="+", type=Path, help="each service's MONGODB_URI file")
    args = parser.parse_args()

    deadline = time.monotonic() + args.wait_s
    password = args.root_password_file.read_text().strip()
    members = [m.strip() for m in args.members.split(",") if m.strip()]
    initiate(members, args.replica_set, password, args.ca_file, deadline)

    rs = client(",".join(members), password, args.ca_file, direct=False, replica_set=args.replica_set)
    wait("a primary", deadline, lambda: rs.admin.command("ping"))
    prefix = PlatformSettings().mongodb_db_prefix
    for path in args.uri_files:
        print("mongo-init: " + ensure_user(rs.admin, path.read_text().strip(), prefix))
    return 0


if __name__ == "__main__":
    sys.exit(main())
