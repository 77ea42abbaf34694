"""deploy/local/secantusd.py: the fallback store's two O(N) paths no longer grow with size.

Costs are counted, not timed: cached replies visited per retryable write, and documents
decoded per TTL sweep, at two sizes, before and after the launcher's patches.
"""

from __future__ import annotations

import datetime as dt
import importlib.util
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import bson
import pytest
from secantus import storage as storage_module
from secantus import transactions

LAUNCHER = Path(__file__).resolve().parents[2] / "deploy" / "local" / "secantusd.py"
REPLY = {"ok": 1.0, "n": 1}


def _launcher() -> Any:
    spec = importlib.util.spec_from_file_location("clave_secantusd_launcher", LAUNCHER)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def patch(monkeypatch: pytest.MonkeyPatch) -> Any:
    """Returns a function applying the launcher's patches; the classes are restored after."""
    registry, storage_class = transactions.TransactionRegistry, storage_module.Storage
    for name in ("__init__", "record_retryable", "_prune_retryable_locked"):
        monkeypatch.setattr(registry, name, getattr(registry, name))
    monkeypatch.setattr(storage_class, "prune_ttl", storage_class.prune_ttl)

    def apply() -> None:
        assert _launcher().apply_patches() is None

    return apply


# ---------------------------------------------------------------------------- reply cache


class CountingRecords(OrderedDict):  # type: ignore[type-arg]
    """The reply cache, counting every record that iteration hands out."""

    visits = 0

    def __iter__(self) -> Iterator[Any]:
        for key in super().__iter__():
            self.visits += 1
            yield key

    def items(self) -> Any:  # the original scans and sorts through items()
        for kv in super().items():
            self.visits += 1
            yield kv

    def keys(self) -> Any:
        return list(iter(self))

    def values(self) -> Any:
        return [self[k] for k in self]


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        self.now += 0.001
        return self.now


def _registry_with(size: int) -> tuple[Any, Clock]:
    clock = Clock()
    registry = transactions.TransactionRegistry(time_func=clock)
    records = CountingRecords()
    for i in range(size):  # filled directly: the original would take O(size^2) to get here
        records[(b"filler", i)] = (dict(REPLY), clock(), b"id")
    registry._retryable = records
    return registry, clock


def _visits_per_write(size: int, writes: int = 20) -> float:
    registry, _clock = _registry_with(size)
    records: CountingRecords = registry._retryable
    records.visits = 0
    for i in range(writes):
        registry.record_retryable(b"session", i, b"id", dict(REPLY))
    return records.visits / writes


def test_original_reply_cache_visits_every_record(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(transactions, "_RETRYABLE_RECORD_MAX", 1000)
    # The instrument sees the O(N) scan: the cost follows the size.
    assert _visits_per_write(100) >= 100
    assert _visits_per_write(900) >= 900
    assert _visits_per_write(1000) >= 2 * 1000  # full: the scan, then the sort


def test_patched_reply_cache_cost_does_not_grow(monkeypatch: pytest.MonkeyPatch, patch: Any) -> None:
    monkeypatch.setattr(transactions, "_RETRYABLE_RECORD_MAX", 1000)
    patch()
    costs = {size: _visits_per_write(size) for size in (100, 900, 1000)}
    assert all(cost <= 2 for cost in costs.values()), costs


def test_patched_reply_cache_keeps_its_cap_expiry_and_replies(monkeypatch: pytest.MonkeyPatch, patch: Any) -> None:
    monkeypatch.setattr(transactions, "_RETRYABLE_RECORD_MAX", 50)
    patch()
    registry, clock = _registry_with(0)
    for i in range(60):
        registry.record_retryable(b"s", i, b"id", {"ok": 1.0, "n": i})
    assert len(registry._retryable) == 50
    assert registry.retryable_reply(b"s", 9, b"id") is None  # the ten oldest were evicted
    assert registry.retryable_reply(b"s", 10, b"id") == {"ok": 1.0, "n": 10}
    assert registry.retryable_reply(b"s", 10, b"other") is None  # same key, other command
    # Recording an existing key again makes it the newest: it survives the next evictions.
    registry.record_retryable(b"s", 10, b"id", {"ok": 1.0, "n": 10})
    for i in range(60, 70):
        registry.record_retryable(b"s", i, b"id", {"ok": 1.0, "n": i})
    assert registry.retryable_reply(b"s", 10, b"id") == {"ok": 1.0, "n": 10}
    assert registry.retryable_reply(b"s", 11, b"id") is None
    # A failed write is never recorded.
    registry.record_retryable(b"s", 99, b"id", {"ok": 0.0})
    assert registry.retryable_reply(b"s", 99, b"id") is None
    # Past their lifetime every record goes at the next access.
    clock.now += transactions._RETRYABLE_RECORD_LIFETIME_SECONDS + 1
    assert registry.retryable_reply(b"s", 69, b"id") is None
    assert len(registry._retryable) == 0


# ---------------------------------------------------------------------------- TTL sweep

NOW = dt.datetime(2026, 11, 26, 12, 0, tzinfo=dt.UTC)
EXPIRED = 5


class CountingBson:
    """The storage module's `bson`, counting decodes."""

    def __init__(self) -> None:
        self.decodes = 0

    def decode(self, data: Any, *args: Any, **kwargs: Any) -> Any:
        self.decodes += 1
        return bson.decode(data, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(bson, name)


def _store(tmp_path: Path, live: int) -> Any:
    store = storage_module.Storage(str(tmp_path / f"s{live}"), ttl_sweep_seconds=0, enable_oplog=True)
    store.create_index("db", "c", "at_1", {"at": 1}, {"expireAfterSeconds": 60})
    store.create_index("db", "p", "at_1", {"at": 1}, {"expireAfterSeconds": 0, "partialFilterExpression": {"k": "x"}})
    old, new = NOW - dt.timedelta(hours=1), NOW + dt.timedelta(hours=1)
    docs = [{"_id": f"old{i}", "at": old} for i in range(EXPIRED)]
    docs += [{"_id": f"new{i}", "at": new} for i in range(live)]
    docs += [{"_id": f"none{i}"} for i in range(live // 10)]  # no date: never expires
    store.insert("db", "c", docs)
    partial = [{"_id": f"old{i}", "at": old, "k": "x"} for i in range(EXPIRED)]
    partial += [{"_id": f"out{i}", "at": old, "k": "y"} for i in range(live // 10)]  # outside the index
    partial += [{"_id": f"new{i}", "at": new, "k": "x"} for i in range(live)]
    store.insert("db", "p", partial)
    return store


def _sweep(store: Any, monkeypatch: pytest.MonkeyPatch) -> tuple[int, int]:
    counting = CountingBson()
    monkeypatch.setattr(storage_module, "bson", counting)
    pruned = store.prune_ttl("db", "c", now=NOW) + store.prune_ttl("db", "p", now=NOW)
    monkeypatch.setattr(storage_module, "bson", bson)
    return pruned, counting.decodes


def _ids(store: Any, coll: str) -> set[str]:
    return {bson.decode(blob)["_id"] for _rid, _k, blob in store._scan_docs("db", coll)}


def test_original_ttl_sweep_decodes_every_document(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for live in (200, 2000):
        store = _store(tmp_path, live)
        try:
            pruned, decodes = _sweep(store, monkeypatch)
        finally:
            store.close()
        assert pruned == 2 * EXPIRED
        assert decodes >= 2 * live


def test_patched_ttl_sweep_decodes_only_expired(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, patch: Any) -> None:
    patch()
    decodes: dict[int, list[int]] = {}
    for live in (200, 2000):
        store = _store(tmp_path, live)
        try:
            pruned, first = _sweep(store, monkeypatch)
            assert pruned == 2 * EXPIRED
            # Same result as the original: only the expired documents the indexes cover went.
            assert _ids(store, "c") == {f"new{i}" for i in range(live)} | {f"none{i}" for i in range(live // 10)}
            assert _ids(store, "p") == {f"new{i}" for i in range(live)} | {f"out{i}" for i in range(live // 10)}
            pruned_again, again = _sweep(store, monkeypatch)
            assert pruned_again == 0
            decodes[live] = [first, again]
        finally:
            store.close()
    # Ten times the documents, the same decodes: the expired ones plus a constant few
    # (index specifications, per sweep and per deletion), against thousands before.
    assert decodes[200] == decodes[2000], decodes
    first, again = decodes[2000]
    assert first < 100 and again < 50, decodes
