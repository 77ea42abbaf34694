"""The fault suite prints its summary table at the end of the pytest run (even under -q)."""

from __future__ import annotations

from typing import Any

from tests.faults import harness


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if harness.LAST_SUMMARY:
        terminalreporter.write_line("")
        for line in harness.LAST_SUMMARY.splitlines():
            terminalreporter.write_line(line)
