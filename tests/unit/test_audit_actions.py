"""shared/audit.py ACTIONS lists every audit action the code names, so `clave audit replay
--type` can refuse a misspelt one (a usage error) instead of printing an empty table."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

from shared.audit import ACTIONS

ROOT = Path(__file__).resolve().parents[2]


def _strings(node: ast.AST | None) -> Iterator[str]:
    """String constants an expression can evaluate to (`"a" if x else "b"` gives both)."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        yield node.value
    elif isinstance(node, ast.IfExp):
        yield from _strings(node.body)
        yield from _strings(node.orelse)


def _arg(call: ast.Call, index: int) -> ast.AST | None:
    return call.args[index] if len(call.args) > index else None


def named_actions(path: Path) -> set[str]:
    """Action names in a module: audit(ACTION, ...), AuditRecord(action=...), `action = "..."`,
    Settlement(move, ACTION, ...) and the identity service's operator helpers (cmd, ACTION)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "action" for t in node.targets):
            found.update(_strings(node.value))
        if not isinstance(node, ast.Call):
            continue
        name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
        if name == "audit":
            found.update(_strings(_arg(node, 0)))
        elif name == "Settlement":
            found.update(_strings(_arg(node, 1)))
        elif name in ("_operator_result", "_command_account"):
            found.update(_strings(_arg(node, 2)))
        found.update(s for kw in node.keywords if kw.arg == "action" for s in _strings(kw.value))
    return found


def test_every_action_the_code_names_is_listed() -> None:
    named = {a for path in [*ROOT.glob("services/*/*.py"), *ROOT.glob("shared/*.py")] for a in named_actions(path)}
    assert len(named) > 20, sorted(named)  # the scan finds them (not an empty set passing vacuously)
    missing = named - ACTIONS
    assert not missing, f"add these to shared/audit.py ACTIONS: {sorted(missing)}"


def test_the_scan_reads_each_form(tmp_path: Path) -> None:
    sample = tmp_path / "m.py"
    sample.write_text(
        "ctx.audit('a1', 'success')\n"
        "AuditRecord(service='s', action='a2' if ok else 'a3', outcome='info')\n"
        "action = 'a4'\n"
        "Settlement(None, 'a5', 'completed')\n"
        "self._operator_result(ctx, cmd, 'a6', 'success')\n"
        "other('not_an_action')\n",
        encoding="utf-8",
    )
    assert named_actions(sample) == {"a1", "a2", "a3", "a4", "a5", "a6"}
