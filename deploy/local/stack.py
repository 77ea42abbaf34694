"""Local Clave stack without Docker: Kafka (KRaft, jars from Maven Central), SecantusDB
(MongoDB protocol), an SMTP capture server and the services, each one a plain process
with a pid file under $VAR_DIR/run and a log under $VAR_DIR/log.

Usage: deploy/local/stack.sh COMMAND [ARGS]   (or .venv/bin/python deploy/local/stack.py)

  up                    start everything that is not running, wait until all is ready
                        (PROMETHEUS=1: also a local Prometheus, see below)
  down [--only-started] stop Prometheus, services, mail catcher, store, Kafka (only the
                        pids in our pid files); --only-started: only what `ensure` started
  status                one line per component and instance; exit 0 when all run, 3 otherwise
  ensure                like `up`, but prints "already running" when nothing is missing
                        and records what it started in $VAR_DIR/run/started-by-ensure
  run -- CMD [ARG...]   ensure, run CMD with the stack's environment, then stop what
                        ensure started; exits with CMD's status (make test/demo/bench)
  infra-up              store + Kafka (+ topics) + mail catcher only
  services-up           the services only, INSTANCES of each (infra must be up)
  services-down         stop every instance of every service
  kafka-restart         stop Kafka (SIGTERM, clean shutdown) and start it again
  store-stop | store-start
  store-build           only build secantusd-rs into the cache (skipped when cached)
  start-service NAME | stop-service NAME | restart-service NAME
  kill-service NAME     SIGKILL, no clean shutdown (NAME: a service or one of its instances,
                        kafka, store, mailcatcher); after a service, the store's open
                        transactions are aborted at once (killAllSessions; see "The store")
  topics                create missing topics and ACLs, list every topic and ACL
  kafka-fetch           only fetch the Kafka jars into the cache (skipped when complete)
  prometheus-start | prometheus-stop
                        start (as with PROMETHEUS=1) or stop the local Prometheus alone

Components: store kafka mailcatcher, then the services of shared/contract.py SERVICES
(identity tokens notifier password audit).  Instances: `INSTANCES=N make up` runs N of each
service; instance 1 is named after its service (identity), instance k >= 2 `identity-k`.
A service's instances share its consumer group (clave-<service>, Kafka spreads the
partitions over them) and its audit signing key (the outbox relay's lease keeps one writer
per chain); each has its own metrics port, its pid file and its log (identity-2.log).
Every command that names a component takes an instance name too (kill-service tokens-2).

Environment (defaults in brackets; relative paths are relative to the repository root):
  VAR_DIR [var]  MAIL_DIR [$VAR_DIR/mail]  CLAVE_CACHE [~/.cache/clave] (Kafka jars,
  the secantusd-rs build)
  KAFKA_PORT [9092]  KAFKA_CONTROLLER_PORT [9093]  STORE_PORT [27017]  PROMETHEUS_PORT [9090]
  SMTP_HOST, SMTP_PORT, METRICS_HOST, <SERVICE>_METRICS_PORT: the services' own settings
  (shared/settings.py, services/notifier/settings.py; defaults 127.0.0.1:1025, 127.0.0.1,
  9401..9405)
  INSTANCES [1]  METRICS_PORT_STEP [10]: instance k of a service serves its metrics on
  <SERVICE>_METRICS_PORT + (k-1) * METRICS_PORT_STEP (lane 9, identity: 19401, 19411, ...)
  KAFKA_BOOTSTRAP_SERVERS, MONGODB_URI: derived from the ports above unless set
  KAFKA_HEAP_OPTS [-Xms256m -Xmx1g]  CLAVE_PYTHON [.venv/bin/python]
  STORE_ENGINE [rs]  rs: SecantusDB's Rust server secantusd-rs; py: its Python server
  secantusd-py (the fallback, through deploy/local/secantusd.py).  See "The store" below.
  STORE_CACHE_SIZE [256M] (secantusd-rs's WiredTiger cache)
  STORE_TXN_LIFETIME_S [10] (STORE_ENGINE=py only: a dead client's open transaction is
  aborted after this idle time, instead of SecantusDB's 60 s)
  *_READY_TIMEOUT: KAFKA [120] STORE [60] SMTP [30] SERVICE [90] PROMETHEUS [60] seconds
  PROMETHEUS [0]  PROMETHEUS_BIN [prometheus]
Every process inherits this environment, so the services, the tests run through
`run` and the infrastructure agree on addresses.

Local Prometheus (optional): `PROMETHEUS=1 make up` (or PROMETHEUS=1 for `up`, `ensure`,
`run`) also starts the machine's `prometheus` binary (Debian/Ubuntu: apt-get install -y
prometheus) with deploy/prometheus/prometheus.yml and alerts.yml, the scrape targets
rewritten to the metrics ports of every instance ($VAR_DIR/run/prometheus.yml), data in
$VAR_DIR/prometheus, on http://127.0.0.1:$PROMETHEUS_PORT.  If the binary is missing or
the port is taken (the Debian package's own prometheus.service listens on 9090), it says
so and the stack starts without it.  `status` shows it; `down` stops it.

The store: SecantusDB, MongoDB wire protocol, single-node replica set "secantus", data in
$VAR_DIR/store-data (both engines read and write the same files).  secantusd-rs is built
once from crates.io (secantus-mdb SECANTUS_RS_VERSION below, `cargo install --locked`,
4-8 min on 2 cores; needs cargo) into $CLAVE_CACHE/secantusd-rs-VERSION, like the Kafka
jars: later starts and other clones reuse it.  Its build log: $VAR_DIR/log/store-build.log.
secantusd-rs aborts a transaction idle for 60 s (fixed; MongoDB's default
transactionLifetimeLimitSeconds, production sets ~15): a service killed inside one would
block writes to the same documents for that long.  So kill-service, which knows the
client is dead, aborts the store's open transactions at once (killAllSessions; the live
services' transactions it aborts are retried, as any transient error).
Kafka runs SASL/SCRAM-SHA-512 with ACLs (KRaft's StandardAuthorizer, nothing allowed
without an ACL): one principal per service plus admin, portal, operator and auditor
(shared/acl.py). Their random passwords are made on the first start and kept in
$VAR_DIR/secrets/kafka/ (0600), with each principal's client settings in
<principal>.properties (`kcat -F FILE`, or KAFKA_CLIENT_PROPERTIES=FILE for `clave`).
Each service gets its own principal in KAFKA_SASL_USERNAME/PASSWORD; a command run by
`run` gets KAFKA_CLIENT_PROPERTIES=.../admin.properties.

Audit signing keys: on the first start of a service, an Ed25519 key pair per service is
made in $VAR_DIR/secrets/audit (<service>.pem, mode 0600; public keys in public/). Each
service gets its own private key only (AUDIT_SIGNING_KEY); everything else run by the
stack (tests, the CLI) gets AUDIT_PUBLIC_KEYS, the folder of public keys, and no
private key.

Sealed portal input: before the first service starts, Clave's X25519 key pair is made
(deploy/local/portal_keys.py): $VAR_DIR/secrets/portal/sealing.pem (0600) goes to identity,
tokens and password as PORTAL_SEALING_KEY; everything else gets PORTAL_SEALING_PUBLIC_KEY
($VAR_DIR/portal/sealing-public.pem), the public key the portal seals to.

Operator keys: with the topics, development operators (op-1, op-2, demo, bench) get an
Ed25519 key pair each in $VAR_DIR/secrets/operators (<operator>.pem, 0600), registered by
admin on identity.operator_keys (deploy/local/operator_keys.py); `run` gives its command
OPERATOR_KEYS_DIR and OPERATOR_ID=op-1, so `clave accounts ...` signs as op-1.

Pid files: a pid is ours only while /proc/PID/cmdline carries the component's signature
(a reused pid is never signalled).  A pid file is written once /proc/PID/cmdline shows the
command: Popen returns a little before that (the kernel closes the child's close-on-exec
pipe, then sets up the new program's arguments; /proc/PID/cmdline reads empty meanwhile,
up to tens of ms on a loaded machine), so a starting component is never taken for one that
exited.  Every verdict is checked: "exited" only when the process has exited (its exit
status is shown), "ready" only when the probe answers and the listening sockets are the
started pid's, "stopped" only when the pid is gone and its ports are free (a start waits
for that, so a restart never meets the old process).  Every launched process gets its own
session and none of our descriptors (the stack's lock is never inherited by a daemon).
Fault flags read by the mail catcher: $VAR_DIR/run/smtp-tempfail, smtp-permfail
(see mailcatcher.py); `down` removes them together with the mail catcher.
$VAR_DIR/log/stack.log gets one line per start/stop command, with its caller.
What `ensure` started stays recorded (and is stopped by `down --only-started`) until
a stop; `up` takes ownership of the whole stack and clears the record.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime
from functools import cache
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
HERE = ROOT / "deploy" / "local"
sys.path[:0] = [str(ROOT), str(HERE)]  # the `shared` package; probe.py

# secantusd-rs: crates.io secantus-mdb at this version, built with its own Cargo.lock.
SECANTUS_RS_VERSION = "0.5.3-beta.193"
# The services that open what the portal may seal (answers, new keys, login keys): they alone
# get PORTAL_SEALING_KEY.
PORTAL_INPUT_READERS = frozenset({"identity", "tokens", "password"})
STORE_RS_MARK = f"secantus-mdb {SECANTUS_RS_VERSION} --locked"
KAFKA_POM = HERE / "kafka" / "pom.xml"
KAFKA_LOG4J = HERE / "kafka" / "log4j2.yaml"
PROM_DIR = ROOT / "deploy" / "prometheus"

# Development operators the stack makes and registers (deploy/local/operator_keys.py).
DEV_OPERATORS = ("op-1", "op-2", "demo", "bench")
INFRA = ("store", "kafka", "mailcatcher")
TIERS = ("prometheus", "services", "mailcatcher", "store", "kafka")  # stop order
READY_TIMEOUT = {"kafka": 120, "store": 60, "mailcatcher": 30, "prometheus": 60, "service": 90}
TIMEOUT_VAR = {"kafka": "KAFKA", "store": "STORE", "mailcatcher": "SMTP", "prometheus": "PROMETHEUS"}
INSTANCE = re.compile(r"(?P<service>[a-z]+)-(?P<k>[0-9]+)")
EXEC_WAIT_S = 10.0  # a launched process shows its command line by then
PORTS_FREE_S = 10.0  # a stopped process's listening sockets are closed by then


class StackError(Exception):
    """A command cannot go on: printed as `stack: MESSAGE`, exit 1."""


def say(*parts: object) -> None:
    print(*parts, flush=True)


def since(t0: float) -> str:
    return f"{time.monotonic() - t0:.1f}s"


def env_int(name: str, default: int) -> int:
    raw = os.environ.get(name, "")
    try:
        return int(raw) if raw else default
    except ValueError:
        raise StackError(f"{name}={raw!r}: expected a whole number") from None


def read_secret(path: Path) -> str:
    """A file's text as bash's $(<file) reads it: trailing newlines dropped."""
    try:
        return path.read_text(encoding="utf-8").rstrip("\n")
    except OSError as exc:
        raise StackError(f"{path}: {exc.strerror}") from None


def write_private(path: Path, text: str) -> None:
    """Owner-only file (it holds passwords), written atomically."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------- processes


def pid_alive(pid: int) -> bool:
    """Alive while any of its threads is not a zombie: after SIGKILL the main thread can be a
    zombie while other threads are still exiting and holding the process's sockets."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return False
    for task in tasks:
        try:
            state = (task / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state not in ("Z", "X"):
            return True
    return False


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=2):
            return True
    except OSError:
        return False


def listening_inodes(port: int) -> set[str]:
    """The inodes of the sockets listening on `port` (any address), from the kernel's tables:
    unlike a connection attempt, it neither waits on a busy listener nor misses one."""
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            f = row.split()
            if len(f) > 9 and f[3] == "0A" and int(f[1].rsplit(":", 1)[1], 16) == port:  # 0A: LISTEN
                inodes.add(f[9])
    return inodes


def socket_inodes(pid: int) -> set[str]:
    inodes: set[str] = set()
    try:
        fds = list(Path(f"/proc/{pid}/fd").iterdir())
    except OSError:
        return inodes
    for fd in fds:
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(target[len("socket:[") : -1])
    return inodes


def port_holders(port: int, pids: Iterable[int] | None = None) -> list[int]:
    """The processes (among `pids`, else all we may look at) that hold a socket listening on `port`."""
    inodes = listening_inodes(port)
    if not inodes:
        return []
    if pids is None:
        pids = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()]
    return sorted(pid for pid in pids if socket_inodes(pid) & inodes)


def holders_text(port: int) -> str:
    holders = port_holders(port)
    if not holders:
        return "a process we cannot see"
    return ", ".join(f"pid {pid} ({cmdline(pid)[:80].strip() or '?'})" for pid in holders)


@contextlib.contextmanager
def file_lock(path: Path, timeout: float, what: str) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise StackError(f"cannot lock {path} ({what})") from None
                time.sleep(0.1)  # waiting for the holder, bounded by the deadline
        yield


# ---------------------------------------------------------------------------- settings


@cache
def service_names() -> tuple[str, ...]:
    """The services, from the topic contract (every process it lists)."""
    try:
        from shared.contract import SERVICES
    except ImportError as exc:
        raise StackError(f"cannot import the project ({exc}): run 'make install' first") from None
    return tuple(SERVICES)


@cache
def platform_settings() -> Any:
    """The services' own settings (metrics host and ports), from this environment."""
    try:
        from shared.settings import PlatformSettings
    except ImportError as exc:
        raise StackError(f"cannot import the project ({exc}): run 'make install' first") from None
    return PlatformSettings()


def smtp_default() -> tuple[str, int]:
    try:
        from services.notifier.settings import NotifierSettings
    except ImportError as exc:
        raise StackError(f"cannot import the project ({exc}): run 'make install' first") from None
    fields = NotifierSettings.model_fields
    return str(fields["smtp_host"].default), int(fields["smtp_port"].default)


def split_instance(name: str) -> tuple[str, int]:
    """`tokens-2` -> ("tokens", 2); `tokens` -> ("tokens", 1)."""
    m = INSTANCE.fullmatch(name)
    if m and int(m["k"]) >= 2:
        return m["service"], int(m["k"])
    return name, 1


def instance_name(service: str, k: int) -> str:
    return service if k == 1 else f"{service}-{k}"


class Stack:
    """One local stack: its folders, ports and processes, all from the environment."""

    def __init__(self) -> None:
        env = os.environ
        self.var_dir = Path(env.get("VAR_DIR") or "var")
        self.var_dir.mkdir(parents=True, exist_ok=True)
        self.var_dir = self.var_dir.resolve()
        self.run_dir = self.var_dir / "run"
        self.log_dir = self.var_dir / "log"
        self.mail_dir = Path(env.get("MAIL_DIR") or self.var_dir / "mail")
        for d in (self.run_dir, self.log_dir, self.mail_dir):
            d.mkdir(parents=True, exist_ok=True)
        self.kafka_data = self.var_dir / "kafka-data"
        self.store_data = self.var_dir / "store-data"
        self.secrets_dir = self.var_dir / "secrets" / "kafka"
        self.admin_props = self.secrets_dir / "admin.properties"
        self.started_file = self.run_dir / "started-by-ensure"
        self.audit_keys_dir = self.var_dir / "secrets" / "audit"
        self.dkim_env: dict[str, str] = {}  # the notifier's DKIM setting (local_keys)
        self.portal_env: dict[str, str] = {}  # the sealing key for sealed portal input (local_keys)
        self.operator_keys_dir = self.var_dir / "secrets" / "operators"
        self.audit_public = Path(env.get("AUDIT_PUBLIC_KEYS") or self.audit_keys_dir / "public")
        self.prometheus = env.get("PROMETHEUS", "0") == "1"
        self.prometheus_port = env_int("PROMETHEUS_PORT", 9090)
        self.prometheus_bin = env.get("PROMETHEUS_BIN") or "prometheus"
        self.prom_config = self.run_dir / "prometheus.yml"
        self.prom_data = self.var_dir / "prometheus"
        self.py = Path(env.get("CLAVE_PYTHON") or ROOT / ".venv" / "bin" / "python")
        self.kafka_port = env_int("KAFKA_PORT", 9092)
        self.controller_port = env_int("KAFKA_CONTROLLER_PORT", 9093)
        self.store_port = env_int("STORE_PORT", 27017)
        self.store_engine = env.get("STORE_ENGINE") or "rs"
        self.store_cache_size = env.get("STORE_CACHE_SIZE") or "256M"
        cache_dir = Path(env.get("CLAVE_CACHE") or Path.home() / ".cache" / "clave")
        self.store_rs_root = cache_dir / f"secantusd-rs-{SECANTUS_RS_VERSION}"
        self.store_rs_bin = self.store_rs_root / "bin" / "secantusd-rs"
        self.store_rs_config = self.run_dir / "secantusd.toml"
        self.kafka_version = re.findall(r"<kafka.version>(.*)</kafka.version>", KAFKA_POM.read_text())[0]
        self.kafka_cache = cache_dir / f"kafka-{self.kafka_version}"
        self.kafka_libs_dir = self.kafka_cache / "libs"
        self.kafka_props = self.run_dir / "kafka-server.properties"
        self.kafka_sasl_marker = self.kafka_data / ".clave-scram"  # hash of the passwords it was formatted with
        heap = env.get("KAFKA_HEAP_OPTS") or "-Xms256m -Xmx1g"
        jvm = env.get("KAFKA_JVM_OPTS") or "-XX:+UseG1GC -XX:MaxGCPauseMillis=20 -Djava.awt.headless=true"
        self.kafka_java = ["java", *heap.split(), *jvm.split(), f"-Dlog4j2.configurationFile={KAFKA_LOG4J}",
                           f"-Dkafka.logs.dir={self.log_dir}", "-cp", f"{self.kafka_libs_dir}/*"]
        self.bootstrap = env.get("KAFKA_BOOTSTRAP_SERVERS") or f"127.0.0.1:{self.kafka_port}"
        self.mongodb_uri = env.get("MONGODB_URI") or f"mongodb://127.0.0.1:{self.store_port}/?replicaSet=secantus"
        self.instances = env_int("INSTANCES", 1)
        self.port_step = env_int("METRICS_PORT_STEP", 10)
        if self.instances < 1:
            raise StackError(f"INSTANCES={self.instances}: at least 1")
        self.record = False  # `ensure` records what it starts
        self.launched: dict[str, subprocess.Popen[bytes]] = {}  # what this command started: exit statuses
        self._principals: list[str] = []
        # Every process inherits these, so the services, the tests run through `run` and the
        # infrastructure agree on addresses. The local stack is a development machine:
        # production mode would refuse its development keys and TLS-less connections.
        env.update(
            VAR_DIR=str(self.var_dir),
            MAIL_DIR=str(self.mail_dir),
            KAFKA_BOOTSTRAP_SERVERS=self.bootstrap,
            MONGODB_URI=self.mongodb_uri,
            CLAVE_ENV=env.get("CLAVE_ENV") or "development",
            AUDIT_PUBLIC_KEYS=str(self.audit_public),
            # The reference page (`make portal`, clients/page) listens on PAGE_PORT: the
            # recovery mail's link opens it.
            PAGE_PORT=str(env_int("PAGE_PORT", 8000)),
            # The public key the portal seals its secrets to (tests, demo); its private key goes to
            # identity, tokens and password alone (service_env).
            PORTAL_SEALING_PUBLIC_KEY=env.get("PORTAL_SEALING_PUBLIC_KEY")
            or str(self.var_dir / "portal" / "sealing-public.pem"),
        )
        env.setdefault("PORTAL_BASE_URL", f"http://127.0.0.1:{env['PAGE_PORT']}")
        env.pop("AUDIT_SIGNING_KEY", None)  # no private key for anyone but its service
        env.pop("PORTAL_SEALING_KEY", None)

    # ---- names and addresses

    @property
    def smtp(self) -> tuple[str, int]:
        host, port = smtp_default()
        return os.environ.get("SMTP_HOST") or host, env_int("SMTP_PORT", port)

    @property
    def metrics_host(self) -> str:
        return str(platform_settings().metrics_host)

    def service_instances(self, count: int | None = None) -> list[str]:
        """Every service's instances, instance by instance: identity tokens ... identity-2 ..."""
        n = max(count or self.instances, self.instances)
        return [instance_name(s, k) for k in range(1, n + 1) for s in service_names()]

    def running_instances(self) -> int:
        """The highest instance number with a pid file (a stack started with INSTANCES=N)."""
        highest = 1
        for f in self.run_dir.glob("*.pid"):
            service, k = split_instance(f.stem)
            if k > 1 and service in service_names():
                highest = max(highest, k)
        return highest

    def components(self) -> list[str]:
        return [*INFRA, *self.service_instances()]

    def is_service(self, name: str) -> bool:
        return name not in (*INFRA, "prometheus")

    def check_component(self, name: str) -> str:
        service, _ = split_instance(name)
        if name in INFRA or service in service_names():
            return name
        raise StackError(f"expected a component name: {' '.join(INFRA)} {' '.join(service_names())} (or <service>-K)")

    def metrics_port(self, name: str) -> int:
        service, k = split_instance(name)
        return int(platform_settings().metrics_port(service)) + (k - 1) * self.port_step

    def listen_addrs(self, c: str) -> list[tuple[str, int]]:
        if c == "kafka":
            return [("127.0.0.1", self.kafka_port), ("127.0.0.1", self.controller_port)]
        if c == "store":
            return [("127.0.0.1", self.store_port)]
        if c == "mailcatcher":
            return [self.smtp]
        if c == "prometheus":
            return [("127.0.0.1", self.prometheus_port)]
        return [(self.metrics_host, self.metrics_port(c))]

    def signature(self, c: str) -> str:
        """What /proc/PID/cmdline must contain for the pid file to still be ours (pid reuse)."""
        if c == "kafka":
            return "kafka.Kafka"
        if c == "store":
            return "secantusd"  # secantusd-rs, or deploy/local/secantusd.py (STORE_ENGINE=py)
        if c == "mailcatcher":
            return "mailcatcher.py"
        if c == "prometheus":
            return f"--config.file={self.prom_config}"
        return f"-m services.{split_instance(c)[0]}"

    def pidfile(self, c: str) -> Path:
        return self.run_dir / f"{c}.pid"

    def running_pid(self, c: str) -> int | None:
        """The pid when the component runs under our pid file, else None."""
        try:
            text = self.pidfile(c).read_text().strip()
        except OSError:
            return None
        if not text.isdigit():
            return None
        pid = int(text)
        if not pid_alive(pid) or self.signature(c) not in cmdline(pid):
            return None
        return pid

    def logs_of(self, c: str) -> list[Path]:
        if c == "kafka":
            return [self.log_dir / "kafka.log", self.log_dir / "kafka-console.log"]
        return [self.log_dir / f"{c}.log"]

    def show_logs(self, c: str, lines: int = 40) -> None:
        for f in self.logs_of(c):
            with contextlib.suppress(OSError):
                if f.stat().st_size:
                    tail = f.read_text(errors="replace").splitlines()[-lines:]
                    print(f"----- last lines of {f} -----", *tail, sep="\n", file=sys.stderr)
        print("-----", file=sys.stderr)

    def need_python(self) -> None:
        if not os.access(self.py, os.X_OK):
            raise StackError(f"{self.py} not found: run 'make install' first")

    # ---- readiness

    def ready_timeout(self, c: str) -> float:
        kind = c if c in TIMEOUT_VAR else "service"
        return float(env_int(f"{TIMEOUT_VAR.get(c, 'SERVICE')}_READY_TIMEOUT", READY_TIMEOUT[kind]))

    def probe_check(self, c: str) -> Callable[[], str]:
        import probe

        if c == "kafka":
            return lambda: probe.probe_kafka(self.bootstrap, str(self.admin_props))
        if c == "store":
            return lambda: probe.probe_store(self.mongodb_uri)
        if c == "mailcatcher":
            return lambda: probe.probe_smtp(*self.smtp)
        if c == "prometheus":
            base = f"http://127.0.0.1:{self.prometheus_port}"
            return lambda: probe.probe_http([f"{base}/-/healthy", f"{base}/-/ready"])
        # /healthz: the process serves; /readyz: its store and broker connections work.
        base = f"http://{self.metrics_host}:{self.metrics_port(c)}"
        return lambda: probe.probe_http([f"{base}/healthz", f"{base}/readyz"])

    def probe(self, c: str, timeout: float, pid: int = 0) -> tuple[int, str]:
        """Wait (up to `timeout` s) until it answers: (0, detail), (1, why not), (2, it died)."""
        import probe

        return probe.wait_for(self.probe_check(c), timeout, pid)

    # ---- Kafka

    def kafka_libs(self) -> None:
        """Fetch the broker's class path once into the cache; a marker holding the POM's hash
        says the copy is complete, so later starts (and other clones) skip Maven entirely."""
        want = hashlib.sha256(KAFKA_POM.read_bytes()).hexdigest()
        marker = self.kafka_libs_dir / ".complete"

        def complete() -> bool:
            return marker.is_file() and marker.read_text().strip() == want

        if complete():
            return
        if not shutil.which("mvn"):
            raise StackError(f"mvn not found (needed once to fetch Kafka {self.kafka_version} from Maven Central)")
        self.kafka_cache.mkdir(parents=True, exist_ok=True)
        with file_lock(self.kafka_cache / ".lock", 900, "another fetch of the Kafka jars"):
            if complete():
                return  # fetched meanwhile
            say(f"kafka: fetching Kafka {self.kafka_version} jars from Maven Central into {self.kafka_libs_dir} ...")
            t0 = time.monotonic()
            tmp = Path(tempfile.mkdtemp(prefix="libs.tmp.", dir=self.kafka_cache))
            log = self.log_dir / "kafka-fetch.log"
            with open(log, "w") as out:
                rc = subprocess.call(
                    ["mvn", "-B", "-q", "-Dstyle.color=never", "-f", str(KAFKA_POM), "dependency:copy-dependencies",
                     "-DincludeScope=runtime", f"-DoutputDirectory={tmp}"],
                    stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                )
            problem = ""
            if rc != 0:
                sys.stderr.write(log.read_text(errors="replace"))
                problem = f"mvn could not fetch the Kafka jars (log: {log})"
            elif not (tmp / f"kafka_2.13-{self.kafka_version}.jar").is_file():
                problem = f"fetch incomplete: kafka_2.13-{self.kafka_version}.jar missing"
            elif list(tmp.glob("slf4j-api-1.*.jar")):
                problem = f"slf4j-api 1.x on the class path: the broker would log nothing (check {KAFKA_POM})"
            if problem:
                shutil.rmtree(tmp, ignore_errors=True)
                raise StackError(problem)
            (tmp / ".complete").write_text(want + "\n")
            shutil.rmtree(self.kafka_libs_dir, ignore_errors=True)
            tmp.rename(self.kafka_libs_dir)
            say(f"kafka: fetched {len(list(self.kafka_libs_dir.glob('*.jar')))} jars in {since(t0)}")

    def kafka_secrets(self) -> list[str]:
        """Every principal's password (made once) and client properties file, in the secrets
        folder; the principals come from shared/acl.py, the one list of them."""
        if not self._principals:
            out = subprocess.run(
                [str(self.py), str(HERE / "kafka_secrets.py"), str(self.secrets_dir), self.bootstrap],
                stdout=subprocess.PIPE, text=True, check=False,
            )
            if out.returncode != 0:
                raise StackError(f"kafka: could not write the credentials in {self.secrets_dir}")
            self._principals = out.stdout.split()
        return self._principals

    def secret(self, principal: str) -> str:
        return read_secret(self.secrets_dir / f"{principal}.password")

    def kafka_credentials_hash(self) -> str:
        """What the storage was (or would be) formatted with: a change means the broker's SCRAM
        users and our password files disagree."""
        text = "".join(f"{p}={self.secret(p)}\n" for p in self.kafka_secrets())
        return hashlib.sha256(text.encode()).hexdigest()

    def kafka_properties(self) -> str:
        # Clients and the broker itself (inter-broker) log in with SCRAM on CLIENT; the broker logs
        # in to its own controller with PLAIN on CONTROLLER (SCRAM users live in the metadata the
        # controller serves). Super users: the broker (admin) and the controller.
        admin, controller = self.secret("admin"), self.secret("controller")
        scram = "org.apache.kafka.common.security.scram.ScramLoginModule"
        plain = "org.apache.kafka.common.security.plain.PlainLoginModule"
        return f"""\
# Written by deploy/local/stack.py at each start: single-node KRaft, static quorum,
# SASL/SCRAM-SHA-512 and ACLs (deploy/kafka/provision.py creates them from shared/acl.py).
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:{self.controller_port}
listeners=CLIENT://127.0.0.1:{self.kafka_port},CONTROLLER://127.0.0.1:{self.controller_port}
advertised.listeners=CLIENT://127.0.0.1:{self.kafka_port}
controller.listener.names=CONTROLLER
inter.broker.listener.name=CLIENT
listener.security.protocol.map=CLIENT:SASL_PLAINTEXT,CONTROLLER:SASL_PLAINTEXT
listener.name.client.sasl.enabled.mechanisms=SCRAM-SHA-512
sasl.mechanism.inter.broker.protocol=SCRAM-SHA-512
listener.name.client.scram-sha-512.sasl.jaas.config={scram} required username="admin" password="{admin}";
listener.name.controller.sasl.enabled.mechanisms=PLAIN
sasl.mechanism.controller.protocol=PLAIN
listener.name.controller.plain.sasl.jaas.config={plain} required username="controller" password="{controller}" \
user_controller="{controller}";
authorizer.class.name=org.apache.kafka.metadata.authorizer.StandardAuthorizer
allow.everyone.if.no.acl.found=false
super.users=User:admin;User:controller
log.dirs={self.kafka_data}
offsets.topic.replication.factor=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
auto.create.topics.enable=false
# How often retention is enforced: with segment.ms it bounds how long a portal input record
# outlives its retention (shared/topics.py). Production: 5 min (the default) or less.
log.retention.check.interval.ms=300000
"""

    def kafka_prepare(self) -> None:
        if not shutil.which("java"):
            raise StackError("java not found (Kafka needs Java 17+)")
        self.kafka_libs()
        principals = self.kafka_secrets()
        write_private(self.kafka_props, self.kafka_properties())
        want = self.kafka_credentials_hash()
        console = self.log_dir / "kafka-console.log"
        if not (self.kafka_data / "meta.properties").is_file():
            self.kafka_data.mkdir(parents=True, exist_ok=True)
            with open(console, "a") as log:
                cluster_id = subprocess.run(
                    [*self.kafka_java, "kafka.tools.StorageTool", "random-uuid"],
                    stdout=subprocess.PIPE, stderr=log, text=True, check=False,
                ).stdout.strip()
                # SCRAM users live in the metadata log: bootstrapped at format time (KIP-900),
                # every principal at once, so the broker and each client log in from the first start.
                scram = [
                    arg
                    for p in principals
                    for arg in ("--add-scram", f"SCRAM-SHA-512=[name={p},password={self.secret(p)}]")
                ]
                say(f"kafka: formatting {self.kafka_data} (cluster id {cluster_id}, {len(principals)} SCRAM users)")
                rc = subprocess.call(
                    [*self.kafka_java, "kafka.tools.StorageTool", "format", "-t", cluster_id,
                     "-c", str(self.kafka_props), *scram],
                    stdout=log, stderr=subprocess.STDOUT,
                )
            if rc != 0:
                self.show_logs("kafka")
                raise StackError("kafka: storage format failed")
            self.kafka_sasl_marker.write_text(want + "\n")
        elif not self.kafka_sasl_marker.is_file():
            raise StackError(
                f"kafka: {self.kafka_data} was formatted without SCRAM users (a stack from before Kafka ACLs); "
                f"start afresh: rm -rf {self.kafka_data} {self.store_data} (the audit chain spans both)"
            )
        elif self.kafka_sasl_marker.read_text().strip() != want:
            raise StackError(
                f"kafka: the passwords in {self.secrets_dir} are not those {self.kafka_data} was formatted with "
                f"(files removed, or principals added); start afresh: rm -rf {self.kafka_data} {self.store_data}"
            )

    def create_topics(self, *extra: str) -> None:
        """Topics and ACLs, as admin (the same script provisions a production cluster)."""
        t0 = time.monotonic()
        rc = subprocess.call(
            [str(self.py), str(ROOT / "deploy" / "kafka" / "provision.py"), "--replication-factor", "1", *extra],
            env={**os.environ, "KAFKA_CLIENT_PROPERTIES": str(self.admin_props)},
        )
        if rc != 0:
            raise StackError("topic or ACL provisioning failed")
        if "--describe" not in extra:
            self.operator_keys()
        say(f"topics and ACLs: done in {since(t0)}")

    def operator_keys(self) -> None:
        """Development operators (op-1, op-2; demo and bench for those programs): their key pairs
        in OPERATOR_KEYS_DIR, registered by admin on identity.operator_keys (every operator
        command is signed; deploy/local/operator_keys.py)."""
        rc = subprocess.call(
            [str(self.py), str(HERE / "operator_keys.py"), str(self.operator_keys_dir), *DEV_OPERATORS],
            env={**os.environ, "KAFKA_CLIENT_PROPERTIES": str(self.admin_props)},
        )
        if rc != 0:
            raise StackError("operator keys failed")

    # ---- the store

    def store_rs_cached(self) -> bool:
        """The cached secantusd-rs is complete: its marker names this version (written last)."""
        marker = self.store_rs_root / ".complete"
        if not (os.access(self.store_rs_bin, os.X_OK) and marker.is_file()):
            return False
        return marker.read_text().strip() == STORE_RS_MARK

    def store_rs_adopt(self) -> bool:
        """A root installed by hand with the same `cargo install ... --root` (no marker) is taken
        once cargo has recorded the install and the binary answers with this version."""
        if not os.access(self.store_rs_bin, os.X_OK):
            return False
        try:
            crates = (self.store_rs_root / ".crates2.json").read_text()
        except OSError:
            return False
        if f'"secantus-mdb {SECANTUS_RS_VERSION} (registry+' not in crates:
            return False
        got = subprocess.run([str(self.store_rs_bin), "--version"], capture_output=True, text=True, check=False)
        if (got.stdout.splitlines() or [""])[0] != f"secantusd-rs {SECANTUS_RS_VERSION}":
            return False
        (self.store_rs_root / ".complete").write_text(STORE_RS_MARK + "\n")
        say(f"store: using secantusd-rs {SECANTUS_RS_VERSION} already installed in {self.store_rs_root}")
        return True

    def store_rs_build(self) -> None:
        """Build secantusd-rs once into the cache (like the Kafka jars): a lock so two builds
        never race, a build in a temporary root moved into place with its marker when complete."""
        if self.store_rs_cached():
            return
        root = self.store_rs_root
        root.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_dir / "store-build.log"
        with file_lock(root.with_name(root.name + ".lock"), 1800, "another secantusd-rs build has run for 30 min"):
            if self.store_rs_cached() or self.store_rs_adopt():
                return  # built meanwhile
            if not shutil.which("cargo"):
                raise StackError(
                    f"cargo not found: secantusd-rs {SECANTUS_RS_VERSION} is built once from crates.io with Rust's "
                    "cargo (https://rustup.rs, or Debian's cargo package). Or run the Python store instead: "
                    "STORE_ENGINE=py"
                )
            for old in root.parent.glob(root.name + ".tmp.*"):  # what an interrupted build left (we hold the lock)
                shutil.rmtree(old, ignore_errors=True)
            tmp = Path(tempfile.mkdtemp(prefix=root.name + ".tmp.", dir=root.parent))
            tmp.chmod(0o755)  # mkdtemp's 0700 would outlive the rename
            say(f"store: building secantusd-rs {SECANTUS_RS_VERSION} with cargo, once "
                f"(4-8 min on 2 cores; log: {log}) ...")
            t0 = time.monotonic()
            with open(log, "w") as out:
                build = subprocess.Popen(
                    ["cargo", "install", "secantus-mdb", "--version", SECANTUS_RS_VERSION, "--locked",
                     "--ignore-rust-version", "--root", str(tmp)],
                    stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                )
                try:
                    while True:
                        try:
                            rc = build.wait(timeout=30)
                            break
                        except subprocess.TimeoutExpired:
                            # A line every 30 s, so a long quiet step does not look hung.
                            n = sum(1 for line in log.read_text(errors="replace").splitlines()
                                    if line.lstrip().startswith("Compiling "))
                            say(f"store: still building ({n} crates compiled, {since(t0)})")
                finally:
                    if build.poll() is None:
                        build.terminate()
            if rc != 0:
                shutil.rmtree(tmp, ignore_errors=True)
                sys.stderr.write("\n".join(log.read_text(errors="replace").splitlines()[-25:]) + "\n")
                raise StackError(
                    f"cargo could not build secantusd-rs {SECANTUS_RS_VERSION} (exit {rc}; log: {log}). "
                    "Or run the Python store: STORE_ENGINE=py"
                )
            got = subprocess.run([str(tmp / "bin" / "secantusd-rs"), "--version"], capture_output=True, text=True,
                                 check=False)
            first = ((got.stdout + got.stderr).splitlines() or [""])[0]
            if first != f"secantusd-rs {SECANTUS_RS_VERSION}":
                shutil.rmtree(tmp, ignore_errors=True)
                raise StackError(f"the build gave '{first}', not secantusd-rs {SECANTUS_RS_VERSION}")
            (tmp / ".complete").write_text(STORE_RS_MARK + "\n")
            shutil.rmtree(root, ignore_errors=True)
            tmp.rename(root)
            say(f"store: built secantusd-rs {SECANTUS_RS_VERSION} in {since(t0)} into {root}")

    def store_command(self) -> list[str]:
        if self.store_engine == "rs":
            self.store_rs_build()
            # Every setting is on the command line; naming a config file stops secantusd-rs from
            # reading ./secantusd.toml, ~/.secantus/ or /etc/secantus/.
            self.store_rs_config.write_text("# Written by deploy/local/stack.py: settings are on the command line\n")
            return [str(self.store_rs_bin), "--config", str(self.store_rs_config), "--host", "127.0.0.1",
                    "--port", str(self.store_port), "--storage-path", str(self.store_data),
                    "--cache-size", self.store_cache_size, "--log-level", "INFO"]
        if self.store_engine == "py":
            if not os.access(self.py.parent / "secantusd-py", os.X_OK):
                raise StackError(f"{self.py.parent / 'secantusd-py'} not found: run 'make install'")
            # secantusd-py through a launcher: shorter transaction lifetime, O(N) paths fixed.
            return [str(self.py), str(HERE / "secantusd.py"), "--host", "127.0.0.1", "--port", str(self.store_port),
                    "--storage-path", str(self.store_data), "--log-level", "WARNING"]
        raise StackError(
            f"STORE_ENGINE={self.store_engine}: expected rs (secantusd-rs, the default) or py (secantusd-py)"
        )

    def store_engine_check(self) -> None:
        """A running store of the other engine is kept (its data is the same): say so."""
        pid = self.running_pid("store")
        if pid is None:
            return
        running = "secantusd-rs" if "secantusd-rs" in cmdline(pid) else "secantusd-py"
        if running != f"secantusd-{self.store_engine}":
            say(f"store: note: {running} runs (pid {pid}), not STORE_ENGINE={self.store_engine}; "
                "to switch: stack.sh store-stop, then start again")

    def store_release_sessions(self) -> None:
        """After a service was SIGKILLed: abort the store's open transactions now (the dead
        service's among them) rather than when secantusd-rs's fixed 60 s lifetime runs out."""
        if self.running_pid("store") is None:
            return
        out = subprocess.run([str(self.py), str(HERE / "storectl.py"), "kill-sessions", self.mongodb_uri],
                             capture_output=True, text=True, check=False)
        text = (out.stdout + out.stderr).strip()
        if out.returncode == 0:
            say(f"store: {text}")
        else:
            say(f"store: warning: could not abort the open transactions ({text}); a dead client's ends within 60 s")

    # ---- keys the services need

    def audit_keys(self) -> None:
        """Make the missing signing keys, one Ed25519 key pair per service, kept across restarts
        (the log keeps their signatures forever): <service>.pem (0600, in a 0700 folder) and its
        public key in AUDIT_PUBLIC_KEYS/<service>-<kid>.json. A service's instances share it."""
        missing = [
            s for s in service_names()
            if not (self.audit_keys_dir / f"{s}.pem").is_file()
            or not (self.audit_keys_dir / f"{s}.pem").stat().st_size
            or not list(self.audit_public.glob(f"{s}-*.json"))
        ]
        if not missing:
            return
        self.need_python()
        self.audit_keys_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.audit_keys_dir.chmod(0o700)
        rc = subprocess.call([str(self.py), "-m", "clave.cli", "audit", "keygen", *missing,
                              "--key-dir", str(self.audit_keys_dir), "--public-dir", str(self.audit_public)])
        if rc != 0:
            raise StackError(f"audit keys: could not make the signing keys of {' '.join(missing)}")

    def local_keys(self) -> None:
        """Key material the services need, made once before the first of them starts (the small
        deploy/local/*.py scripts other features add are called from here, one line each)."""
        self.audit_keys()
        dkim_dirs = (self.var_dir / "secrets" / "dkim", self.var_dir / "dkim")
        self.dkim_env = self.dkim_env or self.key_script("dkim_key.py", *dkim_dirs)
        self.portal_env = self.portal_env or self.key_script("portal_keys.py", self.var_dir)

    def key_script(self, script: str, *args: Path) -> dict[str, str]:
        """Run a deploy/local key script; the settings it prints (NAME=value lines) for the
        service that uses them. DKIM: the notifier's key (made once) and its DNS record in
        var/dkim/."""
        self.need_python()
        done = subprocess.run([str(self.py), str(HERE / script), *map(str, args)], capture_output=True, text=True)
        if done.returncode != 0:
            raise StackError(f"{script}: {done.stderr.strip() or 'failed'}")
        return dict(line.split("=", 1) for line in done.stdout.splitlines() if "=" in line)

    def service_env(self, c: str) -> dict[str, str]:
        """What an instance runs with: the stack's environment, its service's own audit signing
        key and Kafka principal (the password goes from its file into the environment, never on
        a command line; an inherited KAFKA_CLIENT_PROPERTIES, a test's admin file, must not
        override it), and the instance's own metrics port."""
        service, _ = split_instance(c)
        env = {k: v for k, v in os.environ.items() if k != "KAFKA_CLIENT_PROPERTIES"}
        env.update(
            AUDIT_SIGNING_KEY=str(self.audit_keys_dir / f"{service}.pem"),
            KAFKA_SECURITY_PROTOCOL="SASL_PLAINTEXT",
            KAFKA_SASL_MECHANISM="SCRAM-SHA-512",
            KAFKA_SASL_USERNAME=service,
            KAFKA_SASL_PASSWORD=self.secret(service),
        )
        env[f"{service.upper()}_METRICS_PORT"] = str(self.metrics_port(c))
        if service == "notifier":  # the DKIM key is the notifier's alone
            env.update(self.dkim_env)
        if service in PORTAL_INPUT_READERS:  # they open the portal's sealed secrets (local_keys made it)
            env.update({k: v for k, v in self.portal_env.items() if k == "PORTAL_SEALING_KEY"})
        return env

    # ---- start / stop

    def command_of(self, c: str) -> tuple[list[str], dict[str, str]]:
        env = dict(os.environ)
        if c == "kafka":
            return [*self.kafka_java, "kafka.Kafka", str(self.kafka_props)], env
        if c == "store":
            return self.store_command(), env
        if c == "mailcatcher":
            return [str(self.py), str(HERE / "mailcatcher.py")], env
        if c == "prometheus":
            return [self.prometheus_bin, f"--config.file={self.prom_config}", f"--storage.tsdb.path={self.prom_data}",
                    f"--web.listen-address=127.0.0.1:{self.prometheus_port}"], env
        return [str(self.py), "-m", f"services.{split_instance(c)[0]}"], self.service_env(c)

    def launch(self, c: str) -> int:
        """Start it in the background, in its own session (a Ctrl-C in the terminal that ran
        `make up` does not reach it), with none of our descriptors, and write its pid file once
        /proc/PID/cmdline carries the signature (await_exec)."""
        for host, port in self.listen_addrs(c):
            if listening_inodes(port) or port_open(host, port):
                raise StackError(
                    f"{c}: {host}:{port} is already in use by {holders_text(port)}, not started by this stack "
                    f"(see: ss -ltnp | grep {port}); stop it or choose other ports"
                )
        if c == "kafka":
            self.kafka_prepare()
            self.kafka_data.mkdir(parents=True, exist_ok=True)
            log = self.log_dir / "kafka-console.log"
        elif c == "store":
            self.store_data.mkdir(parents=True, exist_ok=True)
            log = self.log_dir / "store.log"
        elif c == "prometheus":
            self.prometheus_config()
            self.prom_data.mkdir(parents=True, exist_ok=True)
            log = self.log_dir / "prometheus.log"
        else:
            if self.is_service(c):
                self.local_keys()
            log = self.log_dir / f"{c}.log"
        cmd, env = self.command_of(c)
        env["PYTHONUNBUFFERED"] = "1"
        with open(log, "a") as out:
            out.write(f"===== {datetime.now(UTC):%Y-%m-%dT%H:%M:%SZ} starting {c} =====\n")
            out.flush()
            try:
                proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                        env=env, cwd=ROOT, start_new_session=True, close_fds=True)
            except OSError as exc:
                raise StackError(f"{c}: could not start {cmd[0]}: {exc.strerror or exc}") from None
        self.launched[c] = proc
        self.await_exec(c, proc)
        self.pidfile(c).write_text(f"{proc.pid}\n")
        return proc.pid

    def await_exec(self, c: str, proc: subprocess.Popen[bytes]) -> None:
        """Popen returns when the kernel closes the child's close-on-exec pipe, part-way through
        the exec: the new program's arguments are set up after that, and until then
        /proc/PID/cmdline reads empty (measured: up to 30 ms for java on 2 loaded cores). A
        check in that window took a starting Kafka for one that exited ("exited right after
        start" while it ran). So wait until the command line shows, or the child has ended."""
        signature = self.signature(c)
        deadline = time.monotonic() + EXEC_WAIT_S
        while signature not in cmdline(proc.pid):
            if proc.poll() is not None:
                self.show_logs(c)
                raise StackError(f"{c}: exited right after start (exit status {proc.returncode})")
            if time.monotonic() > deadline:
                proc.kill()
                proc.wait()
                raise StackError(f"{c}: pid {proc.pid} showed no '{signature}' within {EXEC_WAIT_S:.0f}s; killed it")
            time.sleep(0.002)  # the rest of the exec, bounded by the deadline

    def start_one(self, c: str) -> bool:
        """Launch it unless it already runs; True when launched (recorded when `ensure` runs)."""
        pid = self.running_pid(c)
        if pid is not None:
            say(f"{c}: already running (pid {pid})")
            return False
        self.pidfile(c).unlink(missing_ok=True)
        if self.record:
            with open(self.started_file, "a") as f:
                f.write(c + "\n")
        self.launch(c)
        return True

    def wait_ready(self, c: str, t0: float) -> None:
        pid = self.running_pid(c)
        if pid is None:
            self.show_logs(c)
            raise StackError(f"{c}: {self.not_running_because(c)}")
        timeout = self.ready_timeout(c)
        rc, detail = self.probe(c, timeout, pid)
        if rc != 0:
            self.show_logs(c)
            if rc == 2:
                raise StackError(f"{c}: exited before it was ready{self.exit_status(c)} - {detail}")
            raise StackError(
                f"{c}: not ready within {timeout:.0f}s ({detail}); pid {pid} left running, 'stack.sh down' stops it"
            )
        self.check_serves(c, pid)
        say(f"{c}: ready (pid {pid}, {since(t0)}) - {detail}")

    def exit_status(self, c: str) -> str:
        proc = self.launched.get(c)
        return f" (exit status {proc.returncode})" if proc is not None and proc.poll() is not None else ""

    def not_running_because(self, c: str) -> str:
        """What was seen, not guessed: why its pid file names no running process."""
        try:
            text = self.pidfile(c).read_text().strip()
        except OSError:
            return f"no pid file {self.pidfile(c)}"
        if not text.isdigit():
            return f"pid file {self.pidfile(c)} holds {text[:20]!r}, not a pid"
        pid = int(text)
        if not pid_alive(pid):
            return f"exited right after start (pid {pid}){self.exit_status(c)}"
        return f"pid {pid} runs {cmdline(pid)[:80].strip() or '?'!r}, not {self.signature(c)!r}"

    def check_serves(self, c: str, pid: int) -> None:
        """The probe answered: make sure it was `pid` that did (it holds the listening sockets), not
        an older or foreign process on the same port."""
        for host, port in self.listen_addrs(c):
            if not port_holders(port, [pid]):
                raise StackError(f"{c}: {host}:{port} answers, but from {holders_text(port)}, not from pid {pid}")

    def start(self, *components: str) -> list[str]:
        """Launch all that are missing, then wait for each of them."""
        t0 = time.monotonic()
        started = [c for c in components if self.start_one(c)]
        for c in components:
            self.wait_ready(c, t0)
        return started

    def stop(self, *components: str) -> None:
        """Tier by tier - Prometheus, the services (together), the mail catcher, the store,
        Kafka - so each tier shuts down cleanly while what it talks to is still up. SIGTERM,
        wait up to the tier's deadline, then SIGKILL. Only pids from our pid files."""
        for tier in TIERS:
            members = [c for c in components if c == tier or (tier == "services" and self.is_service(c))]
            if members:
                self.stop_together(members)

    def stop_together(self, components: list[str]) -> None:
        """Stopped means verified: the pid is gone and no process listens on its ports any
        more (so a start right after, as in a restart, never meets the old one)."""
        pids: dict[str, int] = {}
        problems: list[str] = []
        for c in components:
            pid = self.running_pid(c)
            if pid is None:
                self.pidfile(c).unlink(missing_ok=True)
                continue
            pids[c] = pid
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        for c, pid in pids.items():
            grace = 60 if c == "kafka" else 20
            if not wait_gone(pid, grace):
                say(f"{c}: still running {grace}s after SIGTERM, sending SIGKILL (pid {pid})")
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                if not wait_gone(pid, 5):
                    problems.append(f"{c}: pid {pid} still alive 5s after SIGKILL (pid file kept)")
                    continue
            self.pidfile(c).unlink(missing_ok=True)
            busy = self.wait_ports_free(c, PORTS_FREE_S)
            if busy:
                problems.append(f"{c}: pid {pid} exited, but {busy}")
                continue
            say(f"{c}: stopped (pid {pid})")
            if c == "mailcatcher":
                for flag in ("smtp-tempfail", "smtp-permfail"):
                    (self.run_dir / flag).unlink(missing_ok=True)
        if problems:
            raise StackError("; ".join(problems))

    def wait_ports_free(self, c: str, timeout: float) -> str:
        """Wait until nothing listens on its ports (an exited process's sockets are closed with it;
        a child it left behind may hold them): "" when free, else what still holds one."""
        deadline = time.monotonic() + timeout
        for host, port in self.listen_addrs(c):
            while listening_inodes(port):
                if time.monotonic() > deadline:
                    return f"{host}:{port} is still in use by {holders_text(port)} {timeout:.0f}s later"
                time.sleep(0.05)  # the sockets' close, bounded by the deadline
        return ""

    def kill_one(self, c: str) -> None:
        pid = self.running_pid(c)
        if pid is None:
            self.pidfile(c).unlink(missing_ok=True)
            say(f"{c}: not running")
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        if not wait_gone(pid, 5):
            raise StackError(f"{c}: pid {pid} still alive 5s after SIGKILL (pid file kept)")
        self.pidfile(c).unlink(missing_ok=True)
        # A start right after must find the ports free (launch refuses a port in use).
        busy = self.wait_ports_free(c, PORTS_FREE_S)
        if busy:
            raise StackError(f"{c}: killed (pid {pid}), but {busy}")
        say(f"{c}: killed (SIGKILL, pid {pid})")

    def pid_files(self) -> list[str]:
        return sorted(f.stem for f in self.run_dir.glob("*.pid"))

    def in_stop_order(self, names: Iterable[str]) -> list[str]:
        wanted = set(names)
        services = sorted(c for c in wanted if self.is_service(c))
        order = ["prometheus", *services, "mailcatcher", "store", "kafka"]
        return [c for c in order if c in wanted]

    def all_running(self) -> bool:
        return all(self.running_pid(c) is not None for c in self.components())

    # ---- groups

    def infra_up(self, always_topics: bool = False) -> None:
        self.need_python()
        self.kafka_secrets()  # the services need their passwords even when Kafka is already running
        started = self.start(*INFRA)
        self.store_engine_check()
        if "kafka" in started or always_topics:
            self.create_topics()

    def services_up(self) -> None:
        self.need_python()
        self.start(*self.service_instances())

    def all_services(self) -> list[str]:
        """Every instance that is configured or has a pid file."""
        return self.service_instances(self.running_instances())

    # ---- Prometheus

    def prometheus_config(self) -> None:
        """deploy/prometheus/prometheus.yml scrapes the default metrics ports: write a copy whose
        targets are every instance's port, with the rule files found next to the original."""
        text = (PROM_DIR / "prometheus.yml").read_text()
        host = "127.0.0.1" if self.metrics_host == "0.0.0.0" else self.metrics_host  # noqa: S104
        from shared.settings import PlatformSettings

        for service in service_names():
            default = PlatformSettings.model_fields[f"{service}_metrics_port"].default
            target = f'"127.0.0.1:{default}"'
            if target not in text:
                say(f"prometheus: warning: {PROM_DIR / 'prometheus.yml'} has no target 127.0.0.1:{default} "
                    f"({service} is not scraped)")
                continue
            n = max(self.instances, self.running_instances())
            ports = [self.metrics_port(instance_name(service, k)) for k in range(1, n + 1)]
            text = text.replace(target, ", ".join(f'"{host}:{p}"' for p in ports))
        out, rules = [], False
        for line in text.splitlines():
            if line.startswith("rule_files:"):
                rules = True
            elif line[:1] not in ("", " ", "#"):
                rules = False
            elif rules and re.match(r"\s*-\s*[^\s/#]", line):
                line = re.sub(r"-\s*", f"- {PROM_DIR}/", line, count=1)
            out.append(line)
        tmp = self.prom_config.with_suffix(".tmp")
        tmp.write_text("\n".join(out) + "\n")
        tmp.replace(self.prom_config)

    def prometheus_up(self, wanted: bool | None = None) -> None:
        """Start the local Prometheus when PROMETHEUS=1. Optional: a missing binary, a taken port
        or a failed start is reported and the stack goes on without it."""
        if not (self.prometheus if wanted is None else wanted):
            return
        self.need_python()
        pid = self.running_pid("prometheus")
        if pid is not None:
            say(f"prometheus: already running (pid {pid})")
            return
        if not shutil.which(self.prometheus_bin):
            say(f"prometheus: '{self.prometheus_bin}' not found, continuing without it. To install it (Debian/Ubuntu):")
            say("  sudo apt-get install -y prometheus   # then, if its own service took port 9090:")
            say("  sudo systemctl disable --now prometheus   (or choose another PROMETHEUS_PORT)")
            return
        if port_open("127.0.0.1", self.prometheus_port):
            say(f"prometheus: 127.0.0.1:{self.prometheus_port} is already in use by a process this stack did not "
                f"start (see: ss -ltnp | grep {self.prometheus_port}); continuing without ours.")
            say("  Or choose another port: PROMETHEUS_PORT=19090 PROMETHEUS=1 make up")
            return
        t0 = time.monotonic()
        try:
            self.start_one("prometheus")
        except StackError as exc:
            say(f"{exc}; continuing without it")
            return
        pid = self.running_pid("prometheus")
        if pid is None:
            self.show_logs("prometheus")
            say(f"prometheus: {self.not_running_because('prometheus')}; continuing without it")
            return
        rc, detail = self.probe("prometheus", self.ready_timeout("prometheus"), pid)
        if rc != 0:
            self.show_logs("prometheus")
            say(f"prometheus: not ready ({detail}); stopping it, continuing without it")
            self.stop("prometheus")
            return
        say(f"prometheus: ready (pid {pid}, {since(t0)}) - http://127.0.0.1:{self.prometheus_port}/targets")

    # ---- commands

    def cmd_up(self) -> None:
        self.infra_up(always_topics=True)
        self.services_up()
        self.prometheus_up()
        self.started_file.unlink(missing_ok=True)  # whoever ran `up` owns the whole stack now
        self.summary()

    def cmd_ensure(self) -> None:
        t0 = time.monotonic()
        self.need_python()
        self.record = True
        if self.all_running():
            # Running: still make sure everything answers (it may be booting right now).
            for c in self.components():
                rc, _ = self.probe(c, self.ready_timeout(c), self.running_pid(c) or 0)
                if rc != 0:
                    self.show_logs(c)
                    raise StackError(f"{c}: running but not answering")
            self.prometheus_up()
            say("already running")
            return
        self.infra_up()
        self.services_up()
        self.prometheus_up()
        self.record = False
        started = sorted(set(self.started_file.read_text().split())) if self.started_file.exists() else []
        say(f"stack: ready in {since(t0)}; started by ensure: {' '.join(started)}")

    def cmd_down(self, only_started: bool) -> None:
        if only_started:
            names = self.started_file.read_text().split() if self.started_file.exists() else []
            if not names:
                say("nothing was started by ensure")
                self.started_file.unlink(missing_ok=True)
                return
            targets = self.in_stop_order(names)
        else:
            targets = self.in_stop_order(self.pid_files())  # every component with a pid file
        self.stop(*targets)
        self.started_file.unlink(missing_ok=True)

    def status_line(self, c: str) -> bool:
        pid = self.running_pid(c)
        if pid is not None:
            rc, detail = self.probe(c, 0)
            if rc == 0:
                if c == "store":
                    detail += " (secantusd-rs)" if "secantusd-rs" in cmdline(pid) else " (secantusd-py)"
                elif c == "prometheus":
                    detail = f"http://127.0.0.1:{self.prometheus_port}"
                elif self.is_service(c):
                    detail = f"{self.metrics_host}:{self.metrics_port(c)} {detail}"
                say(f"{c:<12} running (pid {pid}) - {detail}")
                return True
            say(f"{c:<12} running (pid {pid}) - NOT ANSWERING: {detail}")
            return False
        if self.pidfile(c).exists() and self.pidfile(c).stat().st_size:
            say(f"{c:<12} stopped - exited on its own or was killed (stale pid file; see {self.logs_of(c)[0]})")
            return False
        say(f"{c:<12} stopped")
        return False

    def cmd_status(self) -> int:
        ok = True
        for c in [*INFRA, *self.all_services()]:
            ok = self.status_line(c) and ok
        # Optional: counts against the exit status only when it should run (PROMETHEUS=1 or
        # started and died).
        if self.running_pid("prometheus") is not None or self.pidfile("prometheus").exists() or self.prometheus:
            ok = self.status_line("prometheus") and ok
        else:
            say(f"{'prometheus':<12} not started (optional: PROMETHEUS=1 make up)")
        if self.started_file.exists() and self.started_file.stat().st_size:
            say(f"started by ensure: {' '.join(sorted(set(self.started_file.read_text().split())))}")
        return 0 if ok else 3

    def summary(self) -> None:
        say("")
        say("Clave local stack is up.")
        say(f"  KAFKA_BOOTSTRAP_SERVERS={self.bootstrap} (SASL/SCRAM; client settings per principal:")
        say(f"    {self.secrets_dir}/<principal>.properties, e.g. "
            f"KAFKA_CLIENT_PROPERTIES={self.secrets_dir}/operator.properties clave ...)")
        say(f"  MONGODB_URI={self.mongodb_uri}")
        host, port = self.smtp
        say(f"  SMTP: {host}:{port}  captured mail (.eml): {self.mail_dir}")
        for c in self.all_services():
            say(f"  {c}: http://{self.metrics_host}:{self.metrics_port(c)}/metrics")
        if self.running_pid("prometheus") is not None:
            say(f"  prometheus: http://127.0.0.1:{self.prometheus_port} "
                f"(config {self.prom_config}, data {self.prom_data})")
        else:
            say("  prometheus: not running (PROMETHEUS=1 make up starts one)")
        say(f"  logs: {self.log_dir}   pids: {self.run_dir}   stop: make down")

    def audit_line(self, args: list[str]) -> None:
        """One line per command that starts or stops something, with its caller: who stopped my
        services? is answered by var/log/stack.log."""
        ppid = os.getppid()
        caller = cmdline(ppid).strip()[:160] or "?"
        stamp = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        with open(self.log_dir / "stack.log", "a") as f:
            f.write(f"{stamp} pid={os.getpid()} stack.py {' '.join(args)} (caller pid={ppid}: {caller})\n")


def wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while pid_alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)  # the process's exit, bounded by the deadline
    return True


def cmd_run(argv: list[str]) -> int:
    """ensure, CMD with the stack's environment, then `down --only-started`. ensure and down
    run as their own stack processes (each takes the lock), so the command in between may
    call stack.sh itself (fault tests restart components)."""
    if argv[:1] == ["--"]:
        argv = argv[1:]
    if not argv:
        raise StackError("usage: stack.sh run -- COMMAND [ARG...]")
    # Ctrl-C reaches ensure / the command (same process group) and stops them; this process
    # only has to survive it to clean up.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: print("stack: interrupted, cleaning up", file=sys.stderr, flush=True))
    stack = Stack()
    self_cmd = [sys.executable, str(Path(__file__).resolve())]
    if subprocess.call([*self_cmd, "ensure"]) != 0:
        print("stack: ensure failed; stopping what it started", file=sys.stderr, flush=True)
        subprocess.call([*self_cmd, "down", "--only-started"])
        return 1
    # The command (tests, demo, bench) observes as admin; it takes another principal's
    # properties file where it plays the portal, an operator or an auditor.
    try:
        # ... and signs operator commands as op-1 (op-2 is the second operator) unless told otherwise.
        env = {
            **os.environ,
            "KAFKA_CLIENT_PROPERTIES": str(stack.admin_props),
            "OPERATOR_KEYS_DIR": str(stack.operator_keys_dir),
            "OPERATOR_ID": os.environ.get("OPERATOR_ID", "op-1"),
        }
        rc = subprocess.call(argv, env=env)
    except OSError as exc:
        print(f"stack: cannot run {argv[0]}: {exc.strerror or exc}", file=sys.stderr, flush=True)
        rc = 127
    subprocess.call([*self_cmd, "down", "--only-started"])
    return rc


def locked(stack: Stack) -> contextlib.AbstractContextManager[None]:
    """One lock per VAR_DIR so two commands never start/stop the same stack at once."""
    return file_lock(stack.run_dir / "stack.lock", 900, "another stack command holds it")


def dispatch(cmd: str, args: list[str]) -> int:  # noqa: C901 - one branch per command
    if cmd in ("help", "-h", "--help"):
        print(__doc__)
        return 0
    if cmd == "run":
        return cmd_run(args)
    stack = Stack()
    if cmd not in ("status", "topics"):
        stack.audit_line([cmd, *args])
    arg = args[0] if args else ""
    if cmd == "status":
        return stack.cmd_status()
    if cmd == "topics":
        stack.need_python()
        stack.create_topics("--describe")
    elif cmd == "kafka-fetch":
        stack.kafka_libs()
        say(f"kafka: jars in {stack.kafka_libs_dir}")
    elif cmd == "store-build":
        stack.store_rs_build()
        say(f"store: secantusd-rs in {stack.store_rs_bin}")
    elif cmd in COMMANDS:
        if cmd in NEEDS_COMPONENT:
            stack.check_component(arg)
        with locked(stack):
            COMMANDS[cmd](stack, arg)
    else:
        raise StackError(f"unknown command '{cmd}' (try: stack.sh help)")
    return 0


def restart(stack: Stack, c: str) -> None:
    stack.need_python()
    stack.stop(c)
    stack.start(c)


def kill(stack: Stack, c: str) -> None:
    stack.kill_one(c)
    if stack.is_service(c):
        stack.store_release_sessions()


def started(stack: Stack, c: str) -> None:
    stack.need_python()
    stack.start(c)


COMMANDS: dict[str, Callable[[Stack, str], object]] = {
    "up": lambda s, _: s.cmd_up(),
    "down": lambda s, a: s.cmd_down(a == "--only-started"),
    "ensure": lambda s, _: s.cmd_ensure(),
    "infra-up": lambda s, _: s.infra_up(always_topics=True),
    "services-up": lambda s, _: s.services_up(),
    "services-down": lambda s, _: s.stop(*s.all_services()),
    "kafka-restart": lambda s, _: restart(s, "kafka"),
    "store-stop": lambda s, _: s.stop("store"),
    "store-start": lambda s, _: started(s, "store"),
    "start-service": started,
    "stop-service": lambda s, c: s.stop(c),
    "restart-service": restart,
    "kill-service": kill,
    "prometheus-start": lambda s, _: s.prometheus_up(wanted=True),
    "prometheus-stop": lambda s, _: s.stop("prometheus"),
}
NEEDS_COMPONENT = ("start-service", "stop-service", "restart-service", "kill-service")


def main(argv: list[str]) -> int:
    os.chdir(ROOT)
    # The probes run in this process: a broker still booting makes its client log connection
    # errors, which are expected (the probe's result says what matters).
    logging.basicConfig(level=logging.CRITICAL)
    cmd, args = (argv[0], argv[1:]) if argv else ("help", [])
    try:
        return dispatch(cmd, args)
    except StackError as exc:
        print(f"stack: {exc}", file=sys.stderr, flush=True)
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
