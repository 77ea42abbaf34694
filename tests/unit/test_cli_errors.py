"""A newcomer's first hour without a traceback: each way `clave` is commonly got wrong ends in
one line on stderr that says what was wrong and what to do, and an exit code (clave/errors.py):
2 usage, 1 not found or a failed check, 3 infrastructure unreachable.

No stack is needed: "the stack is down" is played by ports nothing listens on (never the
default ones, which another stack on this machine may be using)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from clave import cli
from shared.auditkeys import PublicKeyEntry
from shared.settings import load

ROOT = Path(__file__).resolve().parents[2]
USAGE, FAILED, UNREACHABLE = 2, 1, 3


def unused_port() -> int:
    """A port nothing listens on right now (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("cli")
    keys = d / "public"
    keys.mkdir()
    entry = PublicKeyEntry.of("identity", Ed25519PrivateKey.generate().public_key())
    (keys / "identity.json").write_text(entry.model_dump_json(exclude_none=True), encoding="utf-8")
    (d / "garbage.jsonl").write_text('not json\n{"a": 1}\n', encoding="utf-8")
    (d / "binary.jsonl").write_bytes(b"\xcd\xff\xfe\x00binary\n")
    # The operator's signing key (every command is signed): a development operator's, as the stack makes.
    from clave.operators import keygen

    keygen("op-1", d / "operators" / "op-1.pem")
    (d / "accounts.jsonl").write_text(
        (ROOT / "deploy/local/sample/accounts.jsonl").read_text(encoding="utf-8"), encoding="utf-8"
    )
    return {"dir": d, "keys": keys}


@pytest.fixture(scope="module")
def down_env(files: dict[str, Path]) -> dict[str, str]:
    """The environment of a development machine whose stack is not running."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KAFKA_", "MONGODB_", "AUDIT_", "CLAVE_"))}
    env.update(
        CLAVE_ENV="development",
        KAFKA_BOOTSTRAP_SERVERS=f"127.0.0.1:{unused_port()}",
        MONGODB_URI=f"mongodb://127.0.0.1:{unused_port()}/?replicaSet=secantus",
        AUDIT_PUBLIC_KEYS=str(files["keys"]),
        OPERATOR_KEYS_DIR=str(files["dir"] / "operators"),
        OPERATOR_ID="op-1",
    )
    return env


def run(args: list[str], env: dict[str, str], cwd: Path) -> int:
    """`clave ARGS` in this process (fast), as the console script runs it: its exit code."""
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(env)
    old_cwd = os.getcwd()
    os.chdir(cwd)
    load.cache_clear()  # settings are read once per process: this "process" has its own environment
    try:
        with pytest.raises(SystemExit) as exited:
            cli.main(args)
    finally:
        os.chdir(old_cwd)
        os.environ.clear()
        os.environ.update(saved)
        load.cache_clear()
    return int(exited.value.code or 0)


VALID_ID = "1710034065"  # the sample citizen's cédula (valid check digit)

# (case, argv, extra environment, exit code, what the line must say)
CASES: list[tuple[str, list[str], dict[str, str], int, str]] = [
    ("since yesterday", ["audit", "replay", "--since", "yesterday"], {}, USAGE, "--since 'yesterday' is not a time"),
    ("until garbage", ["audit", "verify", "--until", "soon"], {}, USAGE, "--until 'soon' is not a time"),
    ("type misspelt", ["audit", "replay", "--type", "key_change"], {}, USAGE, "did you mean key_changed"),
    ("type unknown", ["audit", "replay", "--type", "nonsense"], {}, USAGE, "'nonsense' is not an audit action"),
    ("account neither", ["audit", "replay", "--account", "12345"], {}, USAGE, "not a valid cédula or RUC"),
    ("verify missing file", ["audit", "verify", "--file", "missing.jsonl"], {}, USAGE, "missing.jsonl: no such file"),
    ("verify folder", ["audit", "verify", "--file", "public"], {}, USAGE, "a folder, not a file"),
    ("verify garbage", ["audit", "verify", "--file", "garbage.jsonl", "--no-heads"], {}, FAILED, "no authentic"),
    ("verify binary", ["audit", "verify", "--file", "binary.jsonl", "--no-heads"], {}, FAILED, "not UTF-8"),
    ("no public keys", ["audit", "verify", "--no-heads"], {"AUDIT_PUBLIC_KEYS": ""}, USAGE, "AUDIT_PUBLIC_KEYS"),
    (
        "no properties file",
        ["audit", "replay"],
        {"KAFKA_CLIENT_PROPERTIES": "nowhere.properties"},
        USAGE,
        "KAFKA_CLIENT_PROPERTIES=nowhere.properties",
    ),
    ("bad setting", ["audit", "replay"], {"KAFKA_SECURITY_PROTOCOL": "TLS"}, USAGE, "setting KAFKA_SECURITY_PROTOCOL"),
    ("empty operator", ["accounts", "unlock", VALID_ID, "-o", "", "-r", "case 1"], {}, USAGE, "--operator is empty"),
    ("empty reason", ["accounts", "unlock", VALID_ID, "-o", "op-1", "-r", " "], {}, USAGE, "--reason is empty"),
    ("short reason", ["accounts", "unlock", VALID_ID, "-o", "op-1", "-r", "x"], {}, USAGE, "--reason: String"),
    ("bad cédula", ["accounts", "unlock", "1710034066", "-o", "op-1", "-r", "case 1"], {}, USAGE, "not a valid cédula"),
    ("unknown command", ["audit", "nope"], {}, USAGE, "clave audit: No such command 'nope'"),
    ("unknown option", ["audit", "replay", "--bogus"], {}, USAGE, "No such option: --bogus"),
    ("import missing", ["accounts", "import", "missing.jsonl"], {}, USAGE, "'missing.jsonl' does not exist"),
    ("cancel bad id", ["accounts", "cancel", "not an id!", "-o", "op-1"], {}, USAGE, "COMMAND_ID: String should"),
    ("cancel empty reason", ["accounts", "cancel", "5f0c1e", "-o", "op-1", "-r", " "], {}, USAGE, "--reason is empty"),
    ("cancel no operator", ["accounts", "cancel", "5f0c1e"], {}, USAGE, "Missing option '--operator'"),
    ("down: replay", ["audit", "replay"], {}, UNREACHABLE, "cannot reach Kafka at 127.0.0.1:"),
    ("down: replay json", ["audit", "replay", "--json"], {}, UNREACHABLE, "cannot reach Kafka at 127.0.0.1:"),
    ("down: command", ["accounts", "unlock", VALID_ID, "-o", "op-1", "-r", "case 1"], {}, UNREACHABLE, "reach Kafka"),
    ("down: cancel", ["accounts", "cancel", "5f0c1e", "-o", "op-1"], {}, UNREACHABLE, "reach Kafka"),
    ("down: timeline", ["audit", "timeline", "req-x"], {}, UNREACHABLE, "cannot reach the store at mongodb://"),
    ("down: verify", ["audit", "verify"], {}, UNREACHABLE, "cannot read the chain heads"),
    ("down: account by ID", ["audit", "replay", "--account", VALID_ID], {}, UNREACHABLE, "cannot reach the store"),
    # The import is signed commands on Kafka now (no side door into identity's store).
    ("down: import", ["accounts", "import", "accounts.jsonl"], {}, UNREACHABLE, "reach Kafka"),
]


@pytest.mark.parametrize(("argv", "extra", "code", "says"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_each_error_is_one_line_and_its_exit_code(
    argv: list[str],
    extra: dict[str, str],
    code: int,
    says: str,
    files: dict[str, Path],
    down_env: dict[str, str],
    capsys: pytest.CaptureFixture[str],
) -> None:
    capsys.readouterr()
    exit_code = run(argv, {**down_env, **extra}, files["dir"])
    out, err = capsys.readouterr()
    lines = err.splitlines()
    assert exit_code == code, err
    assert len(lines) == 1, err  # one line: no traceback, no log noise, no usage box
    assert lines[0].startswith("clave") and says in lines[0], lines[0]
    assert ";" in lines[0]  # ... what was wrong; what to do
    assert "Traceback" not in err and out == ""


def test_the_command_line_itself_prints_one_line_and_the_traceback_only_with_debug(
    files: dict[str, Path], down_env: dict[str, str]
) -> None:
    """The real entry point (`python -m clave.cli`, what .venv/bin/clave runs)."""

    def clave(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "clave.cli", *args],
            capture_output=True,
            text=True,
            check=False,
            timeout=60,
            env=down_env,
            cwd=files["dir"],
        )

    plain = clave("audit", "replay", "--since", "yesterday")
    assert plain.returncode == USAGE and plain.stderr.count("\n") == 1 and "Traceback" not in plain.stderr
    debug = clave("audit", "replay", "--since", "yesterday", "--debug")
    assert debug.returncode != 0 and "Traceback" in debug.stderr and "is not a time" in debug.stderr


@pytest.mark.parametrize(
    ("value", "ok"),
    [("2026-11-25", True), ("2026-11-25T10:00", True), ("2026-11-25T10:00+02:00", True), ("30m", True), ("7d", True)],
)
def test_times_people_give_are_accepted(value: str, ok: bool) -> None:
    when = cli._when(value)
    assert when is not None and when.tzinfo is not None


def test_a_cancel_result_says_what_became_of_the_change_and_a_refusal_what_to_do() -> None:
    from clave.operators import describe
    from shared.schemas import CommandResult
    from shared.topics import EventType

    def result(status: str, **fields: object) -> CommandResult:
        fields.setdefault("command", EventType.OPERATOR_CANCEL)
        return CommandResult(command_id="c9", operator_id="op-2", status=status, **fields)  # type: ignore[arg-type]

    done = describe(result("succeeded", effect="cancelled", change_id="5f0c1e"))
    assert done.startswith("succeeded cancelled") and "5f0c1e will not take effect" in done
    for reason, hint in [
        ("change_unknown", "no e-mail change has this id"),
        ("change_already_applied", "already took effect"),
        ("change_already_cancelled", "already cancelled"),
    ]:
        line = describe(result("rejected", reasons=[reason], change_id="5f0c1e"))
        assert line.startswith(f"rejected ({reason})") and hint in line and "\n" not in line
    pending = describe(
        result("pending", effect="approval_needed", change_id="5f0c1e", command=EventType.OPERATOR_EMAIL_UPDATE)
    )
    assert "clave accounts cancel 5f0c1e" in pending
