"""Middle-layer fixtures: a private SecantusDB (`secantusd-py`, the same server the local
stack runs) on a free port with its own data directory, so platform code (the relay, the
notifier's sender) runs against a real store in seconds, without the stack, its lock or
Kafka. Each test gets its own database."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pymongo import AsyncMongoClient, MongoClient, monitoring
from pymongo.errors import PyMongoError

SERVER = Path(sys.executable).parent / "secantusd-py"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def store_uri(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A private secantusd-py; CLAVE_MIDDLE_STORE_URI runs the tests against another server
    instead (e.g. secantusd-rs started by hand)."""
    if os.environ.get("CLAVE_MIDDLE_STORE_URI"):
        yield os.environ["CLAVE_MIDDLE_STORE_URI"]
        return
    port = _free_port()
    data = tmp_path_factory.mktemp("store")
    log = (data / "server.log").open("wb")
    proc = subprocess.Popen(
        [
            str(SERVER),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--storage-path",
            str(data / "db"),
            "--log-level",
            "WARNING",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    uri = f"mongodb://127.0.0.1:{port}/?replicaSet=secantus"
    deadline = time.monotonic() + 30
    try:
        while True:
            try:
                with MongoClient(uri, serverSelectionTimeoutMS=500) as probe:
                    probe.admin.command("ping")
                break
            except PyMongoError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"secantusd-py did not start: {(data / 'server.log').read_text()}") from None
                time.sleep(0.1)
        yield uri
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.fixture
def db_name() -> str:
    return f"clave_mid_{uuid.uuid4().hex[:10]}"


class Commands(monitoring.CommandListener):
    """Every command a client sends, with its collection: store round trips, counted."""

    def __init__(self) -> None:
        self.log: list[tuple[float, str, Any]] = []

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        self.log.append((time.monotonic(), event.command_name, event.command.get(event.command_name)))

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        return None

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        return None

    def since(self, t0: float) -> Counter[str]:
        return Counter(name for t, name, _ in self.log if t >= t0)

    def on(self, collection: str, name: str, t0: float = 0.0) -> int:
        return sum(1 for t, n, target in self.log if t >= t0 and n == name and target == collection)


async def listen(store: Any, uri: str) -> Commands:
    """Give a ServiceStore a client that also reports to a test listener (the store's own
    CommandCounter stays registered: the metric is checked too)."""
    commands = Commands()
    name = store.db.name
    await store.client.close()
    store.client = AsyncMongoClient(
        uri, tz_aware=True, serverSelectionTimeoutMS=5000, event_listeners=[commands, store.commands]
    )
    store.db = store.client[name]
    return commands
