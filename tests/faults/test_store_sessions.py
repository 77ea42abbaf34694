"""A transaction left open by a SIGKILLed client, and what `stack.sh kill-service` does about it.

secantusd-rs aborts an idle transaction only after a fixed 60 s; until then a write to the
same document waits (secantusd-py answers WriteConflict, for up to STORE_TXN_LIFETIME_S).
`stack.sh kill-service` therefore frees the store as soon as it has killed a service, with
`deploy/local/storectl.py kill-sessions` (killAllSessions).  This checks, against the
stack's own store and in seconds, that the block is real and that the call lifts it.
"""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from pymongo import MongoClient
from pymongo.errors import PyMongoError

from tools.workbench import workbench_settings

pytestmark = pytest.mark.faults

STORECTL = Path(__file__).resolve().parents[2] / "deploy" / "local" / "storectl.py"
DB = "clave_faults_scratch"

# Opens a transaction, writes the document, says so, and waits to be killed.
HOLDER = """
import sys, time
from pymongo import MongoClient
client = MongoClient(sys.argv[1])
coll = client[sys.argv[2]]["held"]
session = client.start_session()
session.start_transaction()
coll.update_one({"_id": sys.argv[3]}, {"$set": {"by": "dead client"}}, session=session)
print("holding", flush=True)
time.sleep(600)
"""


def _write(client: MongoClient, doc_id: str, max_ms: int) -> str | None:
    """Update the document (no retry), bounded by the server's maxTimeMS; the error, if any."""
    try:
        client[DB].command(
            "update", "held", updates=[{"q": {"_id": doc_id}, "u": {"$set": {"by": "live client"}}}], maxTimeMS=max_ms
        )
    except PyMongoError as exc:
        return f"{type(exc).__name__}: {exc}"[:200]
    return None


def test_kill_sessions_frees_a_dead_clients_transaction() -> None:
    uri = workbench_settings().mongodb_uri
    doc_id = uuid.uuid4().hex
    client: MongoClient = MongoClient(uri, retryWrites=False, serverSelectionTimeoutMS=10_000)
    holder = subprocess.Popen(  # noqa: S603 - this interpreter, a fixed script
        [sys.executable, "-c", HOLDER, uri, DB, doc_id], stdout=subprocess.PIPE, text=True
    )
    try:
        client[DB]["held"].insert_one({"_id": doc_id, "by": "nobody"})
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "holding", "the holder did not open its transaction"
        holder.kill()
        holder.wait(timeout=10)

        # The dead client's transaction still holds the document.
        blocked = _write(client, doc_id, max_ms=2000)
        assert blocked is not None, "a write went through a dead client's open transaction"

        done = subprocess.run(  # noqa: S603
            [sys.executable, str(STORECTL), "kill-sessions", uri], capture_output=True, text=True, timeout=30
        )
        assert done.returncode == 0, done.stdout + done.stderr

        t0 = time.monotonic()
        assert _write(client, doc_id, max_ms=5000) is None
        assert time.monotonic() - t0 < 5
        assert client[DB]["held"].find_one({"_id": doc_id}) == {"_id": doc_id, "by": "live client"}
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait(timeout=10)
        client[DB]["held"].delete_one({"_id": doc_id})
        client.close()
