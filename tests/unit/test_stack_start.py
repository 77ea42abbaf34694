"""deploy/local/stack.sh: a component is seen running as soon as `launch` returns, however long
the forked shell takes to exec it (the start race: `start-service identity` once reported
"exited right after start" while identity was starting). The functions are sourced from
stack.sh with a stand-in for the service's python, on a free port, in a scratch VAR_DIR."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

STACK = Path(__file__).resolve().parents[2] / "deploy" / "local" / "stack.sh"

# Runs on `bash -s` (so no signature in bash's own command line). The setsid function stands
# for a loaded machine: the forked shell takes 0.5 s before it execs the command (or, with
# EXEC_FAILS, dies before it could). audit_keys and portal_keys are stubbed: they would run the
# stand-in python (sleeping 30 s) inside the launch being timed.
HARNESS = """
source "$STACK"
audit_keys() { :; }
portal_keys() { :; }
setsid() { sleep 0.5; [[ -z ${EXEC_FAILS:-} ]] || exit 3; exec "$(type -P setsid)" "$@"; }
t0=$(now_ms)
launch identity
echo "launched_ms=$(($(now_ms) - t0))"
if pid=$(running_pid identity); then echo "running=$pid"; else echo "running=none"; fi
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_harness(tmp_path: Path, python_body: str, **extra_env: str) -> dict[str, str]:
    fake = tmp_path / "fake-python"
    fake.write_text(f"#!{sys.executable}\n{python_body}\n")
    fake.chmod(0o755)
    # A service is launched with its Kafka principal's password (read from this file by the
    # wrapper that execs it, see command_of): a stand-in one.
    secrets = tmp_path / "var" / "secrets" / "kafka"
    secrets.mkdir(parents=True)
    (secrets / "identity.password").write_text("stand-in-password-for-the-test\n")
    env = {
        **os.environ,
        "STACK": str(STACK),
        "VAR_DIR": str(tmp_path / "var"),
        "CLAVE_PYTHON": str(fake),
        "IDENTITY_METRICS_PORT": str(free_port()),
        **extra_env,
    }
    result = subprocess.run(
        ["bash", "-s"], input=HARNESS, env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return dict(line.split("=", 1) for line in result.stdout.splitlines() if "=" in line)


def stop(pid_file: Path, fake: Path) -> None:
    """Stop the stand-in if it still runs: only that pid, and only if it is our stand-in."""
    with contextlib.suppress(FileNotFoundError, ValueError, ProcessLookupError):
        pid = int(pid_file.read_text())
        deadline = time.monotonic() + 5  # a pid file written too early: the exec may still come
        while time.monotonic() < deadline:
            if str(fake) in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace"):
                os.kill(pid, signal.SIGTERM)
                return
            time.sleep(0.05)


def test_a_starting_component_is_running_as_soon_as_launch_returns(tmp_path: Path) -> None:
    try:
        out = run_harness(tmp_path, "import time\ntime.sleep(30)")
        pid_file = tmp_path / "var" / "run" / "identity.pid"
        assert out["running"] == pid_file.read_text().strip()
        cmdline = Path(f"/proc/{out['running']}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        assert "-m services.identity" in cmdline and str(tmp_path / "fake-python") in cmdline
    finally:
        stop(tmp_path / "var" / "run" / "identity.pid", tmp_path / "fake-python")


def test_a_launch_that_dies_before_its_exec_is_not_waited_for(tmp_path: Path) -> None:
    out = run_harness(tmp_path, "import time\ntime.sleep(30)", EXEC_FAILS="1")
    assert out["running"] == "none"
    assert int(out["launched_ms"]) < 5000  # the process's end ends the wait, not the 10 s deadline


@pytest.mark.parametrize("component", ["identity", "kafka", "store", "mailcatcher"])
def test_running_pid_refuses_a_pid_that_is_not_the_component(tmp_path: Path, component: str) -> None:
    """Pid-file safety: a live pid whose command line is something else is never taken as ours."""
    run_dir = tmp_path / "var" / "run"
    run_dir.mkdir(parents=True)
    (run_dir / f"{component}.pid").write_text(f"{os.getpid()}\n")  # this pytest process
    script = f'source "$STACK"; running_pid {component} && echo ours || echo refused'
    result = subprocess.run(
        ["bash", "-c", script],
        env={**os.environ, "STACK": str(STACK), "VAR_DIR": str(tmp_path / "var")},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.stdout.strip() == "refused", result.stdout + result.stderr
