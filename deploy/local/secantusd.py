"""The fallback local store (STORE_ENGINE=py): SecantusDB's own `secantusd-py`, patched.

    .venv/bin/python deploy/local/secantusd.py --host 127.0.0.1 --port 27017 --storage-path DIR
    (deploy/local/stack.py starts it; every argument goes to secantusd-py unchanged)

The default local store is SecantusDB's Rust server, secantusd-rs (see stack.py).  This
launcher keeps the Python one usable, with three changes secantusd-py has no option for:

1. A shorter transaction lifetime.  A transaction whose client died (a service SIGKILLed
   between its first write and its commit) keeps its writes until the server reaps it;
   until then every write that touches the same documents fails with WriteConflict, so a
   partition stalls.  The server reaps it after STORE_TXN_LIFETIME_S seconds without
   activity (default 10; SecantusDB's built-in default is 60, like mongod's
   transactionLifetimeLimitSeconds).  Clave's transactions do no waiting inside, so 10 s
   is ample.  Production: set MongoDB's `transactionLifetimeLimitSeconds` likewise.
2. The retryable-write reply cache in O(1) per write.  secantusd-py scans every cached
   reply on each retryable write and sorts all 10,000 once the cache is full (1.0 -> 4.4
   ms a write as the stack ages).  Records are kept oldest first (an OrderedDict), so
   expiry and the size cap only ever look at the front.
3. The TTL sweep through the TTL index.  secantusd-py decodes every document of every
   TTL-indexed collection each minute, under the storage's global lock.  The patched
   sweep asks the TTL index for the documents past their cutoff and decodes only those.

The patches replace private code of SecantusDB 0.7.0b3 (pinned in pyproject.toml); with
any other version the launcher refuses to start rather than patch code it was not
written against.
"""

from __future__ import annotations

import datetime as dt
import functools
import os
import sys
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

PATCHED_FOR = "0.7.0b3"
EARLIEST = dt.datetime.min.replace(tzinfo=dt.UTC)  # BSON dates before year 1 are not expired


# ---------------------------------------------------------------------------- reply cache


def patch_reply_cache(transactions: Any) -> None:
    """Keep `TransactionRegistry._retryable` oldest first; prune from the front only."""
    registry = transactions.TransactionRegistry
    lifetime = float(transactions._RETRYABLE_RECORD_LIFETIME_SECONDS)
    cap = int(transactions._RETRYABLE_RECORD_MAX)
    recordable = transactions._is_recordable_reply
    strip = transactions._strip_per_attempt_fields
    original_init = registry.__init__

    @functools.wraps(original_init)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        original_init(self, *args, **kwargs)
        self._retryable = OrderedDict(self._retryable)

    def record_retryable(self: Any, lsid_bytes: bytes, txn_number: int, identity: bytes, reply: dict[str, Any]) -> None:
        # As the original (only successful replies are recorded), plus: a re-recorded key
        # moves to the end, so the order stays the order of `stored_at`.
        if not recordable(reply):
            return
        with self._lock:
            key = (lsid_bytes, txn_number)
            self._retryable[key] = (strip(reply), self._time(), identity)
            self._retryable.move_to_end(key)
            self._prune_retryable_locked()

    def _prune_retryable_locked(self: Any) -> None:
        # The oldest record is first: drop it while it is stale or the cache is over its cap.
        records: OrderedDict[Any, tuple[Any, float, bytes]] = self._retryable
        cutoff = self._time() - lifetime
        while records:
            _reply, stored_at, _identity = records[next(iter(records))]
            if stored_at >= cutoff and len(records) <= cap:
                return
            records.popitem(last=False)

    registry.__init__ = __init__
    registry.record_retryable = record_retryable
    registry._prune_retryable_locked = _prune_retryable_locked


# ---------------------------------------------------------------------------- TTL sweep


def _ttl_filters(storage: Any, db: str, coll: str, when: dt.datetime) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(exact filter, index-routable filter) per TTL index, by the original's rules."""
    out: list[tuple[dict[str, Any], dict[str, Any]]] = []
    for _name, key_spec, opts in storage._iter_indexes(db, coll):
        ttl = opts.get("expireAfterSeconds")
        if isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or ttl != ttl or ttl < 0:
            continue
        # mongod expires by a single-field index only, never by _id nor a geo/text/hashed key.
        if len(key_spec) != 1:
            continue
        field, direction = next(iter(key_spec.items()))
        if not isinstance(field, str) or field == "_id":
            continue
        if isinstance(direction, bool) or not isinstance(direction, (int, float)):
            continue
        try:
            cutoff = when - dt.timedelta(seconds=float(ttl))
        except OverflowError:
            continue
        exact: dict[str, Any] = {field: {"$lt": cutoff}}
        # The same set (`$lt` a date matches dates only), bounded below for the index scan:
        # a bare `$lt` range starts at the index's bottom, where documents without the
        # field (the still-pending ones, say) sit.
        routed: dict[str, Any] = {field: {"$gte": EARLIEST, "$lt": cutoff}}
        partial = opts.get("partialFilterExpression")
        if isinstance(partial, Mapping) and partial:
            exact = {"$and": [exact, dict(partial)]}
            # A flat filter lets the planner use the partial index itself; one it cannot
            # flatten is still correct (a collection scan, as before).
            flat = field not in partial and not any(k.startswith("$") for k in partial)
            routed = {**partial, **routed} if flat else exact
        out.append((exact, routed))
    return out


def patch_ttl_sweep(storage_module: Any) -> None:
    """`Storage.prune_ttl` deciding by the TTL index: only expired documents are decoded."""
    storage_class = storage_module.Storage

    def prune_ttl(self: Any, db: str, coll: str, *, now: dt.datetime | None = None) -> int:
        bson, matches = storage_module.bson, storage_module.matches  # the module's, at call time
        when = now if now is not None else dt.datetime.now(dt.UTC)
        if when.tzinfo is None:
            when = when.replace(tzinfo=dt.UTC)
        filters = _ttl_filters(self, db, coll, when)
        if not filters:
            return 0
        pruned = 0
        oplog_entries: list[dict[str, Any]] = []
        pre_images: list[bytes | None] = []
        with self._lock:
            ns = self._ns(db, coll)
            preimages_on = self._pre_post_images_enabled(db, coll)
            ui = self._collection_uuid(db, coll) if self._coll_options(db, coll) is not None else None
            indexes = self._all_indexes(db, coll)
            partials = self._partial_filters(db, coll)
            # The index gives the candidates (a range up to the cutoff); `matches` still
            # decides, as in the original.  One document may come from several indexes.
            candidates: dict[int, tuple[bytes, bytes]] = {}
            for _exact, routed in filters:
                for recordid, id_k, blob in self._candidates_iter(db, coll, routed):
                    candidates.setdefault(recordid, (id_k, blob))
            for recordid, (id_k, blob) in candidates.items():
                doc = bson.decode(blob)
                if not any(matches(doc, exact) for exact, _routed in filters):
                    continue
                self._delete_index_entries(db, coll, doc, indexes, partials, recordid=recordid)
                self._delete_doc_row(db, coll, recordid)
                self._delete_nat_entry(db, coll, id_k)
                pruned += 1
                entry: dict[str, Any] = {"op": "d", "ns": ns, "o": {"_id": doc["_id"]}, "o2": {"_id": doc["_id"]}}
                if ui is not None:
                    entry["ui"] = bson.Binary(ui.bytes, subtype=4)
                oplog_entries.append(entry)
                pre_images.append(bson.encode(doc) if preimages_on else None)
            if oplog_entries:
                self._emit_oplog(oplog_entries, pre_images)
        return pruned

    prune_ttl.__doc__ = storage_class.prune_ttl.__doc__
    storage_class.prune_ttl = prune_ttl


# ---------------------------------------------------------------------------- main


def apply_patches() -> str | None:
    """Patch the installed SecantusDB; returns an error message instead when it cannot."""
    import secantus
    from secantus import storage, transactions

    if secantus.__version__ != PATCHED_FOR:
        return (
            f"SecantusDB {secantus.__version__} is installed; these patches were written for "
            f"{PATCHED_FOR} (review deploy/local/secantusd.py against the new version)"
        )
    needed = {
        transactions: ("TransactionRegistry", "_RETRYABLE_RECORD_LIFETIME_SECONDS", "_RETRYABLE_RECORD_MAX"),
        storage: ("Storage", "bson", "matches"),
    }
    for module, names in needed.items():
        missing = [n for n in names if not hasattr(module, n)]
        if missing:
            return f"{module.__name__} has no {', '.join(missing)} (SecantusDB changed?)"
    patch_reply_cache(transactions)
    patch_ttl_sweep(storage)
    return None


def main() -> int:
    from secantus import cli

    lifetime = float(os.environ.get("STORE_TXN_LIFETIME_S", "10"))
    server_class = getattr(cli, "SecantusDBServer", None)
    if server_class is None:  # the package changed: say so rather than run with the default
        print("secantusd.py: secantus.cli.SecantusDBServer not found (SecantusDB changed?)", file=sys.stderr)
        return 2
    error = apply_patches()
    if error:
        print(f"secantusd.py: {error}", file=sys.stderr)
        return 2
    cli.SecantusDBServer = functools.partial(server_class, transaction_lifetime_seconds=lifetime)  # type: ignore[attr-defined]
    return cli.main()


if __name__ == "__main__":
    sys.exit(main())
