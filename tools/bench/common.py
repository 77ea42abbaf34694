"""Helpers the bench's parts share: percentiles, formatting, the console, the stack's parts."""

import sys
from pathlib import Path

from rich.console import Console

from tools.workbench import RECOVERY_SERVICES

SERVICES = RECOVERY_SERVICES
INFRA = ("kafka", "store", "mailcatcher")
OPTIONAL = ("audit",)  # the audit read model, when the stack runs it
STACK_SH = str(Path(__file__).resolve().parents[2] / "deploy" / "local" / "stack.sh")
console = Console(width=None if sys.stdout.isatty() else 120)


# ------------------------------------------------------------------------------ helpers


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100) of raw samples; None when there are none."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.1f}"


def ratio(num: float | None, den: float | None) -> float | None:
    return None if num is None or not den else num / den
