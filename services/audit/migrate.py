"""The audit read model's start-up migration: a store in an older format is projected again
from `audit.events` (the log of record, kept forever) before the service consumes live.

Version 1 (before commit 454e64b) kept chain heads and breaks in collections of their own and
nothing of them on the events; the live consumer now reads a producer's head from the events
alone, so on a version 1 store it saw every chain restart at 0 (one false `sequence` break per
producer) and lost the breaks recorded before. A copy of the old heads would not do: each entry
now carries its whole signed head. So the whole read model is projected again with the code
`clave audit rebuild` uses (`rebuild.Replay`), written over the live entries, and only then is
the version marker written. Every write is an idempotent replace keyed by event id: a
migration killed midway leaves no marker and simply runs again from the start.

A store with no marker is migrated whatever its entries hold (version 1, or entries written
between 454e64b and the marker, which may hold those false breaks): the log decides. A store
with no data at all is new: it gets the marker and nothing else.

A rolling upgrade runs an instance of the old version beside this one for a while: it goes on
consuming (from where the group's offsets are) and writes version 1 entries and heads, which
this migration did not cover. The live handler follows on from such a head (handlers.py), and
the marker keeps the version 1 heads as they were when the migration began: if they have moved
since, the next start projects the read model again."""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime
from typing import Any

from services.audit.rebuild import LogReader, Replay, replay_for
from services.audit.settings import AuditSettings
from services.audit.store import FORMAT_VERSION, AuditStore
from shared.metrics import ServiceMetrics

log = logging.getLogger(__name__)

BATCH = 500  # entries a write
PROGRESS_EVERY = 10_000  # events between progress lines
SHOWN_BREAKS = 20


class OlderCodeError(RuntimeError):
    """The store was written by a newer version of the read model than this code knows."""


class ReadModelMigration:
    def __init__(self, store: AuditStore, settings: AuditSettings, metrics: ServiceMetrics, log_reader: LogReader):
        self.store = store
        self.settings = settings
        self.read_log = log_reader
        self.format = metrics.gauge(
            "clave_audit_read_model_format", "The audit read model's format version (0 until start-up has checked it)"
        )
        self.running = metrics.gauge(
            "clave_audit_migration_running",
            "1 while start-up projects an older audit read model again from audit.events (not consuming, not ready)",
        )
        self.migrated = metrics.counter(
            "clave_audit_migration_events_total", "Audit events projected again by the start-up migration"
        )
        self.seconds = metrics.gauge("clave_audit_migration_seconds", "How long the last start-up migration took")

    async def run(self) -> None:
        """Bring the store to FORMAT_VERSION; a no-op when it is there already."""
        marker = await self.store.format_marker()
        found = int(marker["version"]) if marker is not None else None
        if found == FORMAT_VERSION and marker is not None and await self._old_writer_since(marker):
            await self._reproject(found, "an older version wrote to it after the migration (a rolling upgrade)")
        elif found == FORMAT_VERSION:
            log.info("audit read model: format %d, nothing to migrate", found)
        elif found is not None and found > FORMAT_VERSION:
            raise OlderCodeError(
                f"the audit read model is in format {found}, this code knows up to {FORMAT_VERSION}: "
                "run the newer version (or `clave audit rebuild` it into a copy to inspect)"
            )
        elif not await self.store.holds_data():
            await self.store.write_format({"created_at": _now()})
            log.info("audit read model: new store, format %d", FORMAT_VERSION)
        else:
            await self._reproject(found, f"format {found or 1} found, no version marker")
        self.format.set(FORMAT_VERSION)

    async def _old_writer_since(self, marker: dict[str, Any]) -> bool:
        return bool(await self.store.old_heads() != marker.get("v1_heads", {}))

    async def _reproject(self, found: int | None, why: str) -> None:
        old = found or 1
        log.warning(
            "audit read model: %s: projecting it again from audit.events before consuming (not ready until done)",
            why,
        )
        t0 = time.monotonic()
        self.running.set(1)
        try:
            v1_heads = await self.store.old_heads()  # before the replay: a move after it is seen
            replay = replay_for(self.settings)
            await self._write(replay)
            await self._report(replay, old, time.monotonic() - t0)
            await self.store.write_format(
                {
                    "migrated_from": old,
                    "migrated_at": _now(),
                    "events": replay.events,
                    "breaks": len(replay.broken),
                    "v1_heads": v1_heads,
                }
            )
        finally:
            self.running.set(0)
        self.seconds.set(time.monotonic() - t0)

    async def _write(self, replay: Replay) -> None:
        batch: list[dict[str, Any]] = []
        async for entry in replay.entries(self.read_log()):
            batch.append(entry)
            if len(batch) >= BATCH:
                await self._flush(batch, replay)
                batch = []
        await self._flush(batch, replay)

    async def _flush(self, batch: list[dict[str, Any]], replay: Replay) -> None:
        await self.store.record_many(batch)
        before = replay.events - len(batch)
        self.migrated.inc(len(batch))
        if replay.events // PROGRESS_EVERY > before // PROGRESS_EVERY:
            log.info("audit read model migration: %d events projected again", replay.events)

    async def _report(self, replay: Replay, old: int, seconds: float) -> None:
        # Breaks found again were counted and alerted when they first arrived: they are logged,
        # not added to clave_audit_chain_breaks_total (a new non-zero series pages, for old news).
        recorded = await self.store.old_breaks()
        lost = sorted(set(recorded) - set(replay.broken))
        log.warning(
            "audit read model: migrated from format %d to %d in %.1f s: %d events (%d exact redeliveries, "
            "%d invalid skipped), %d chain break(s) in the log, %d recorded by the old read model, %d of those "
            "not found again",
            old,
            FORMAT_VERSION,
            seconds,
            replay.events,
            replay.duplicates,
            replay.skipped,
            len(replay.broken),
            len(recorded),
            len(lost),
        )
        for line in replay.breaks[:SHOWN_BREAKS]:
            log.warning("audit chain break (in the log, found again by the migration): %s", line)
        for event_id in lost[:SHOWN_BREAKS]:
            log.warning(
                "audit read model: event %s was a break (%s) for the old read model and is not one now "
                "(a public key added since?)",
                event_id,
                recorded[event_id],
            )


def _now() -> str:
    return datetime.now(UTC).isoformat()
