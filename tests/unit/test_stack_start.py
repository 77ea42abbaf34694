"""deploy/local/stack.py: a component is seen running as soon as `launch` returns, however long
the forked child takes to exec it (the start race: `start-service identity` once reported
"exited right after start" while identity was starting); pid-file safety; the names, ports and
environment of a service's instances (INSTANCES=N); Kafka's start, stop and restart against a
stand-in JVM (`kafka-restart` once said "kafka: exited right after start" while the new broker
ran: /proc/PID/cmdline was read before the kernel had finished the exec). Launches run
stand-ins on free ports, in a scratch VAR_DIR; nothing here needs a stack."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

STACK_PY = Path(__file__).resolve().parents[2] / "deploy" / "local" / "stack.py"
# Numbers for the arithmetic only: a launch listens on a free port.
SERVICE_PORTS = {
    "IDENTITY_METRICS_PORT": 29401,
    "TOKENS_METRICS_PORT": 29402,
    "NOTIFIER_METRICS_PORT": 29403,
    "PASSWORD_METRICS_PORT": 29404,
    "AUDIT_METRICS_PORT": 29405,
}


def load_stack() -> ModuleType:
    spec = importlib.util.spec_from_file_location("clave_local_stack", STACK_PY)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


STACK = load_stack()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def stack(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """A Stack over a scratch VAR_DIR whose python is a stand-in that sleeps 30 s; the stand-ins
    still running at the end are stopped (only their pids, only if they are the stand-in)."""
    saved = os.environ.copy()  # Stack() exports the stack's variables into os.environ
    module = STACK
    module.platform_settings.cache_clear()
    fake = tmp_path / "fake-python"
    fake.write_text(f"#!{sys.executable}\nimport time\ntime.sleep(30)\n")
    fake.chmod(0o755)
    # A service is launched with its Kafka principal's password, read from this file.
    secrets = tmp_path / "var" / "secrets" / "kafka"
    secrets.mkdir(parents=True)
    for service in module.service_names():
        (secrets / f"{service}.password").write_text(f"stand-in-password-of-{service}\n")
    for name, port in SERVICE_PORTS.items():
        monkeypatch.setenv(name, str(port))
    monkeypatch.setenv("VAR_DIR", str(tmp_path / "var"))
    monkeypatch.setenv("CLAVE_PYTHON", str(fake))
    monkeypatch.setenv("KAFKA_CLIENT_PROPERTIES", "/a/test/admin.properties")
    for name in ("INSTANCES", "METRICS_PORT_STEP", "METRICS_HOST"):
        monkeypatch.delenv(name, raising=False)
    stack = module.Stack()
    # The audit keys would be made by running the stand-in python as `clave audit keygen`.
    monkeypatch.setattr(stack, "local_keys", lambda: None)
    try:
        yield stack
    finally:
        for pid_file in (tmp_path / "var" / "run").glob("*.pid"):
            with contextlib.suppress(OSError, ValueError):
                pid = int(pid_file.read_text())
                if str(fake) in module.cmdline(pid):
                    os.kill(pid, signal.SIGTERM)
        os.environ.clear()
        os.environ.update(saved)


def slow_exec(module: ModuleType, monkeypatch: pytest.MonkeyPatch, *, fails: bool = False) -> None:
    """A loaded machine: the forked child takes 0.5 s before it execs the command (or, with
    `fails`, dies before it could)."""
    real = subprocess.Popen

    def child_setup() -> None:
        time.sleep(0.5)
        if fails:
            os._exit(3)

    def popen(*args: Any, **kwargs: Any) -> Any:
        return real(*args, **kwargs, preexec_fn=child_setup)  # noqa: PLW1509 - the test's point

    monkeypatch.setattr(module.subprocess, "Popen", popen)


def test_a_starting_component_is_running_as_soon_as_launch_returns(stack: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    module = STACK
    slow_exec(module, monkeypatch)
    monkeypatch.setenv("IDENTITY_METRICS_PORT", str(free_port()))
    module.platform_settings.cache_clear()
    pid = stack.launch("identity")
    assert stack.running_pid("identity") == pid == int((stack.run_dir / "identity.pid").read_text())
    cmd = module.cmdline(pid)
    assert "-m services.identity" in cmd and os.environ["CLAVE_PYTHON"] in cmd


def test_a_launch_that_dies_before_its_exec_fails_at_once(stack: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    module = STACK
    slow_exec(module, monkeypatch, fails=True)
    monkeypatch.setenv("IDENTITY_METRICS_PORT", str(free_port()))
    module.platform_settings.cache_clear()
    t0 = time.monotonic()
    with contextlib.suppress(module.StackError, subprocess.SubprocessError):
        stack.launch("identity")
    assert stack.running_pid("identity") is None
    assert time.monotonic() - t0 < 5  # the child's end ends the wait, nothing waits for an exec


def test_a_command_that_cannot_run_is_a_clear_error(stack: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    module = STACK
    monkeypatch.setattr(stack, "py", stack.var_dir / "no-such-python")
    monkeypatch.setenv("IDENTITY_METRICS_PORT", str(free_port()))
    module.platform_settings.cache_clear()
    with pytest.raises(module.StackError, match="identity: could not start"):
        stack.launch("identity")
    assert stack.running_pid("identity") is None


@pytest.mark.parametrize("component", ["identity", "tokens-2", "kafka", "store", "mailcatcher"])
def test_running_pid_refuses_a_pid_that_is_not_the_component(stack: Any, component: str) -> None:
    """Pid-file safety: a live pid whose command line is something else is never taken as ours."""
    (stack.run_dir / f"{component}.pid").write_text(f"{os.getpid()}\n")  # this pytest process
    assert stack.running_pid(component) is None


def test_instances_have_their_own_names_and_ports(stack: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(stack, "instances", 2)
    services = list(SERVICE_PORTS)
    names = stack.service_instances()
    assert len(names) == 2 * len(services) and len(set(names)) == len(names)
    assert names[: len(services)] == [n.split("_")[0].lower() for n in services]
    assert names[len(services) :] == [f"{n.split('_')[0].lower()}-2" for n in services]
    ports = [stack.metrics_port(n) for n in names]
    assert ports == [*SERVICE_PORTS.values(), *(p + 10 for p in SERVICE_PORTS.values())]
    monkeypatch.setattr(stack, "port_step", 100)
    assert stack.metrics_port("audit-2") == SERVICE_PORTS["AUDIT_METRICS_PORT"] + 100
    assert stack.check_component("audit-2") == "audit-2"
    for bad in ("audit-x", "nobody", "nobody-2", "prometheus"):
        with pytest.raises(Exception, match="expected a component name"):
            stack.check_component(bad)


def test_an_instance_runs_as_its_service_on_its_own_port(stack: Any) -> None:
    env = stack.service_env("tokens-2")
    assert env["KAFKA_SASL_USERNAME"] == "tokens"
    assert env["KAFKA_SASL_PASSWORD"] == "stand-in-password-of-tokens"
    assert env["AUDIT_SIGNING_KEY"].endswith("/tokens.pem")
    assert env["TOKENS_METRICS_PORT"] == str(SERVICE_PORTS["TOKENS_METRICS_PORT"] + 10)
    assert "KAFKA_CLIENT_PROPERTIES" not in env  # the test's admin file must not override it
    assert "AUDIT_SIGNING_KEY" not in os.environ  # only the service gets a private key


def test_instances_started_by_an_earlier_up_are_found(stack: Any) -> None:
    """`status`, `down` and `services-down` see the instances of a stack started with INSTANCES=3,
    whatever INSTANCES says now."""
    (stack.run_dir / "notifier-3.pid").write_text("1\n")
    assert stack.running_instances() == 3
    assert "identity-3" in stack.all_services() and "identity-2" in stack.all_services()
    assert stack.in_stop_order(["kafka", "notifier-3", "store", "prometheus", "audit"]) == [
        "prometheus",
        "audit",
        "notifier-3",
        "store",
        "kafka",
    ]


def test_the_wrapper_runs_stack_py() -> None:
    out = subprocess.run(
        ["bash", str(STACK_PY.with_name("stack.sh")), "help"], capture_output=True, text=True, timeout=60, check=False
    )
    assert out.returncode == 0 and "INSTANCES" in out.stdout, out.stderr


def test_prometheus_scrapes_every_instance(stack: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(stack, "instances", 2)
    stack.prometheus_config()
    text = stack.prom_config.read_text()
    for name, port in SERVICE_PORTS.items():
        assert f'targets: ["127.0.0.1:{port}", "127.0.0.1:{port + 10}"]' in text, name
    assert f"- {STACK.PROM_DIR}/alerts.yml" in text
    assert '"127.0.0.1:9401"' not in text  # no default target left: a stack on other ports scrapes its own


# ---------------------------------------------------------------------------- Kafka's start check

# A stand-in for the broker's JVM, run as `java SHUTDOWN_S kafka.Kafka PROPS` like the real one
# (`java [options] kafka.Kafka PROPS`): it listens on the two addresses of PROPS' `listeners=`
# line and, on SIGTERM, holds them SHUTDOWN_S more (a controlled shutdown) before it exits.
# FAKE_JAVA_FORK=1: it forks a child that inherits the listening sockets and outlives it.
FAKE_JAVA = """\
import os, re, signal, socket, sys, time
text = open(sys.argv[-1]).read()
line = re.search(r"^listeners=(.*)$", text, re.M).group(1)
socks = []
for host, port in re.findall(r"//([0-9.]+):([0-9]+)", line):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((host, int(port)))
    s.listen(16)
    socks.append(s)
if os.environ.get("FAKE_JAVA_FORK") == "1" and os.fork() == 0:
    time.sleep(30)
    os._exit(0)
def shutdown(*_):
    time.sleep(float(sys.argv[1]))
    sys.exit(0)
signal.signal(signal.SIGTERM, shutdown)
while True:
    signal.pause()
"""


def listening(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
        return True
    return False


@pytest.fixture
def kafka(stack: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """The stack's Kafka is the stand-in JVM (its properties file written as for the real one),
    probed by a connection to its client port; every stand-in still running is stopped after."""
    java = tmp_path / "java"
    java.write_text(f"#!{sys.executable}\n{FAKE_JAVA}")
    java.chmod(0o755)
    secrets = stack.secrets_dir
    for principal in ("admin", "controller"):
        (secrets / f"{principal}.password").write_text(f"stand-in-password-of-{principal}\n")
    monkeypatch.setattr(stack, "kafka_port", free_port())
    monkeypatch.setattr(stack, "controller_port", free_port())
    monkeypatch.setattr(stack, "kafka_java", [str(java), "0.3"])
    props = stack.kafka_props
    monkeypatch.setattr(stack, "kafka_prepare", lambda: STACK.write_private(props, stack.kafka_properties()))

    def probe_check(c: str) -> Any:
        def check() -> str:
            with socket.create_connection(("127.0.0.1", stack.kafka_port), timeout=1):
                return "accepts connections"

        return check

    monkeypatch.setattr(stack, "probe_check", probe_check)
    try:
        yield stack
    finally:
        for entry in Path("/proc").iterdir():  # the stand-ins, and children they left
            if entry.name.isdigit() and str(java) in STACK.cmdline(int(entry.name)):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(entry.name), signal.SIGKILL)


def late_cmdline(module: ModuleType, monkeypatch: pytest.MonkeyPatch, delay: float) -> None:
    """What the kernel does (measured here: up to 30 ms for java on 2 busy cores): Popen returns
    once the child's close-on-exec pipe is closed, part-way through its exec, and /proc/PID/cmdline
    shows the command only once the exec has set up the new program's arguments. Made longer
    and certain: the child is a shell that sleeps `delay`, then execs the command it got in its
    environment, so its command line shows the command only `delay` after Popen returned."""
    real = subprocess.Popen

    def popen(cmd: list[str], **kwargs: Any) -> Any:
        env = {**kwargs.pop("env", os.environ), "LATE_EXEC": " ".join(map(shlex.quote, cmd))}
        return real(["/bin/sh", "-c", f'sleep {delay}; eval exec "$LATE_EXEC"'], env=env, **kwargs)

    monkeypatch.setattr(module.subprocess, "Popen", popen)


def test_a_broker_whose_exec_is_not_finished_is_not_taken_for_one_that_exited(
    kafka: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fault suite's `kafka-restart` once said "kafka: exited right after start" while the new
    broker ran (infra-up found it up a second later): the pid's command line was read before the
    exec had finished. The start now says ready only for the process that serves, and the pid
    file names it."""
    late_cmdline(STACK, monkeypatch, 0.3)
    STACK.restart(kafka, "kafka")  # nothing runs yet: the stop is a no-op, then the start
    pid = kafka.running_pid("kafka")
    assert pid is not None and int(kafka.pidfile("kafka").read_text()) == pid
    assert "kafka.Kafka" in STACK.cmdline(pid)
    assert STACK.port_holders(kafka.kafka_port, [pid]) == [pid]
    assert STACK.port_holders(kafka.controller_port, [pid]) == [pid]


def test_restarts_say_what_is_true(kafka: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Restarts through the real exec, whose window before /proc/PID/cmdline is set is short:
    each one must end with the new broker serving both ports and the old one gone, never with a
    verdict the processes contradict."""
    monkeypatch.setattr(kafka, "kafka_java", [kafka.kafka_java[0], "0"])
    previous = 0
    for _ in range(10):
        STACK.restart(kafka, "kafka")
        pid = kafka.running_pid("kafka")
        assert pid is not None and pid != previous
        assert not (previous and STACK.pid_alive(previous))
        assert STACK.port_holders(kafka.kafka_port) == [pid]
        previous = pid


def test_a_restart_waits_for_the_old_broker_to_let_go_of_its_ports(kafka: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A controlled shutdown holds the ports for a while after SIGTERM: the new broker is started
    only once the old one is gone and its ports are free."""
    monkeypatch.setattr(kafka, "kafka_java", [kafka.kafka_java[0], "1.5"])
    kafka.start("kafka")
    old = kafka.running_pid("kafka")
    t0 = time.monotonic()
    STACK.restart(kafka, "kafka")
    new = kafka.running_pid("kafka")
    assert old is not None and new is not None and new != old
    assert not STACK.pid_alive(old) and time.monotonic() - t0 >= 1.5
    assert STACK.port_holders(kafka.kafka_port) == [new]


def test_stopped_is_said_only_when_the_ports_are_free(kafka: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A broker that left a child holding its listening sockets is not 'stopped': the stop names
    the process that holds the port (a start would otherwise meet it, or its answers be taken
    for the new broker's)."""
    monkeypatch.setenv("FAKE_JAVA_FORK", "1")
    monkeypatch.setattr(kafka, "kafka_java", [kafka.kafka_java[0], "0"])
    monkeypatch.setattr(STACK, "PORTS_FREE_S", 1.0)
    kafka.start("kafka")
    pid = kafka.running_pid("kafka")
    assert pid is not None
    port = kafka.kafka_port
    still = rf"kafka: pid {pid} exited, but 127.0.0.1:{port} is still in use by pid"
    with pytest.raises(STACK.StackError, match=still):
        kafka.stop("kafka")
    assert not STACK.pid_alive(pid) and listening(port)
    with pytest.raises(STACK.StackError, match=rf"127.0.0.1:{port} is already in use by pid"):
        kafka.start("kafka")


def test_a_broker_that_dies_at_once_is_reported_with_its_exit_status(
    kafka: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(kafka, "kafka_java", [sys.executable, "-c", "import sys; sys.exit(7)"])
    # Before or after its command line showed, as the scheduler has it: either verdict is true.
    exited = r"kafka: exited (right after start|before it was ready) .*exit status 7"
    with pytest.raises(STACK.StackError, match=exited):
        kafka.start("kafka")
    assert kafka.running_pid("kafka") is None


def test_ready_only_when_the_started_pid_serves(kafka: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """An older broker still answering on the port must not make the new pid 'ready'."""
    kafka.start("kafka")
    pid = kafka.running_pid("kafka")
    assert pid is not None
    with pytest.raises(STACK.StackError, match=rf"answers, but from .*not from pid {os.getpid()}"):
        kafka.check_serves("kafka", os.getpid())
