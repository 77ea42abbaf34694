"""The production deployment files, checked against the code without Docker or a cluster.

- deploy/docker: the Dockerfile's rules (base pinned by digest, two stages, runtime
  dependencies only, numeric non-root USER, HEALTHCHECK, nothing written outside /tmp),
  its entry point (secrets from files, the service as argument) and its health check,
  run here for real;
- deploy/compose: the compose-spec JSON schema (shipped by the pinned check-jsonschema
  package: `docker compose config` needs a Docker CLI plugin these machines lack), and
  its structure: three KRaft nodes with SCRAM and ACLs, a three-member replica set, the
  jobs, the services, Prometheus, Grafana, Mailpit;
- deploy/helm/clave: `helm lint --strict` and `helm template` (helm built once from the
  Go module proxy by deploy/helm/ensure_helm.sh), then the rendered manifests;
- deploy/kafka/provision.py and deploy/local/create_topics.py: the topics and ACLs the job
  asks a broker for, recorded by an in-memory admin client.

Against the code, in every file: each environment variable set for a Clave process is a
field of that process's settings class (the class its app's `build` loads); each secret
comes from a secret (a compose secret file or a Kubernetes secretKeyRef), never a value;
each service signs its audit chain with its own Ed25519 key, a file from its own secret
(AUDIT_SIGNING_KEY is that file's path), and each verifier reads every producer's public
key (AUDIT_PUBLIC_KEYS: a folder, not secret); and each service's settings, filled from
the file and freshly made secrets and keys, pass the production gate (`problems()` is
empty with CLAVE_ENV=production). Ports, probe paths, principals and topics come from the code.
"""

from __future__ import annotations

import asyncio
import base64
import importlib.resources
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest
from aiokafka.protocol.admin import CreateAclsRequest, DescribeAclsRequest
from cryptography import x509
from cryptography.fernet import Fernet
from cryptography.x509.oid import ExtendedKeyUsageOID
from jsonschema.validators import validator_for
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from ruamel.yaml import YAML

from services.audit.settings import AuditorSettings, AuditSettings
from shared import topics as t
from shared.acl import ALLOW
from shared.auditkeys import KeyRing, is_dev_key, kid_of, load_signing_key
from shared.metrics import HealthServer, ServiceMetrics
from shared.settings import PlatformSettings

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
DOCKERFILE = DEPLOY / "docker" / "Dockerfile"
DOCKERIGNORE = DEPLOY / "docker" / "Dockerfile.dockerignore"
ENTRYPOINT = DEPLOY / "docker" / "entrypoint.sh"
HEALTHCHECK = DEPLOY / "docker" / "healthcheck.py"
COMPOSE_DIR = DEPLOY / "compose"
COMPOSE = COMPOSE_DIR / "compose.yaml"
CHART = DEPLOY / "helm" / "clave"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
DASHBOARD = DEPLOY / "grafana" / "clave-dashboard.json"
KUBE_VERSION = "1.31.0"

for extra in (DEPLOY / "compose", DEPLOY / "kafka", DEPLOY / "local", DEPLOY / "docker"):
    sys.path.insert(0, str(extra))

import create_topics  # noqa: E402
import healthcheck  # noqa: E402
import make_secrets  # noqa: E402
import provision  # noqa: E402

SERVICES = sorted(p.parent.name for p in ROOT.glob("services/*/__main__.py"))
# Variables a Clave container may set that are not Clave settings, and why.
NOT_SETTINGS = {"SSL_CERT_FILE": "OpenSSL's CA bundle: the notifier checks the compose SMTP relay's certificate"}
SECRET_FILE = "__FILE"  # VAR__FILE=path: the image's entry point reads VAR from the file
SIGNING_KEY, PUBLIC_KEYS = "AUDIT_SIGNING_KEY", "AUDIT_PUBLIC_KEYS"  # settings that are file paths
SEALING_KEY = "PORTAL_SEALING_KEY"  # a file path too: Clave's key for sealed portal input
KAFKA_ADMIN = "admin"  # the super user the provisioning job runs as


def default_metrics_port(service: str) -> int:
    """The code's default port (the deployment files ship the defaults), whatever this shell's
    environment says: a developer's own stack may run on other ports."""
    return int(PlatformSettings.model_fields[f"{service}_metrics_port"].default)


def yaml_load(text: str) -> Any:
    return YAML(typ="safe", pure=True).load(text)


def yaml_load_all(text: str) -> list[Any]:
    return [doc for doc in YAML(typ="safe", pure=True).load_all(text) if doc]


def field_env_names(cls: type[PlatformSettings]) -> set[str]:
    return {name.upper() for name in cls.model_fields}


def key_variables(service: str) -> set[str]:
    """The keys a service loads (its settings class says which)."""
    return set(make_secrets.service_keys(service))


def secret_variables(service: str) -> set[str]:
    """What must come from a secret: its keys, its Kafka password, its store URI (it holds
    the store user's password)."""
    return key_variables(service) | {"KAFKA_SASL_PASSWORD", "MONGODB_URI"}


def reads_portal_input(service: str) -> bool:
    """Does the service open sealed portal input (and so need PORTAL_SEALING_KEY)?"""
    return "portal_sealing_key" in make_secrets.settings_class(service).model_fields


def signing_kid(pem: Path) -> str:
    return kid_of(load_signing_key(str(pem)).public_key())


def gate(cls: type[PlatformSettings], env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The production gate's findings for settings read from exactly `env` (nothing inherited
    from the environment the tests run in)."""
    with monkeypatch.context() as m:
        for name in field_env_names(cls):
            m.delenv(name, raising=False)
        for name, value in env.items():
            m.setenv(name, value)
        settings = cls()
        assert settings.production, "CLAVE_ENV must be production"
        return settings.problems()


# ============================================================ Dockerfile


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    lines: list[str] = []
    current = ""
    for raw in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        lines.append(current + stripped)
        current = ""
    assert not current, "a continuation line ends the Dockerfile"
    out = []
    for line in lines:
        instruction, _, args = line.partition(" ")
        out.append((instruction.upper(), args.strip()))
    return out


def test_dockerfile_base_is_pinned_by_digest() -> None:
    steps = dockerfile_instructions()
    args = dict(re.match(r"(\w+)=(\S+)", a).groups() for i, a in steps if i == "ARG" and "=" in a)  # type: ignore[union-attr]
    froms = [a.split()[0] for i, a in steps if i == "FROM"]
    assert froms, "no FROM"
    for image in froms:
        resolved = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], image)
        assert re.fullmatch(r"python:3\.11[\w.-]*-slim[\w.-]*@sha256:[0-9a-f]{64}", resolved), resolved


def test_dockerfile_is_multi_stage_and_installs_runtime_dependencies_only() -> None:
    steps = dockerfile_instructions()
    stages = [a for i, a in steps if i == "FROM"]
    assert len(stages) >= 2 and stages[0].endswith("AS builder"), stages
    runtime_start = max(n for n, (i, _) in enumerate(steps) if i == "FROM")
    runtime = steps[runtime_start:]
    runs = [a for i, a in runtime if i == "RUN"]
    installs = [r for r in runs if "pip install" in r]
    assert installs, "the runtime stage installs nothing"
    for command in installs:
        # From the builder's wheels only: nothing fetched, and no extra ([dev]) asked for.
        assert "--no-index" in command and "from=builder" in command, command
        assert "[" not in command.split("pip install", 1)[1], command
    builds = [a for i, a in steps[:runtime_start] if i == "RUN" and "pip wheel" in a]
    assert builds and all("[" not in b and "--constraint requirements.lock" in b for b in builds), builds


def test_dockerfile_runs_as_numeric_non_root_user_with_a_healthcheck() -> None:
    steps = dockerfile_instructions()
    users = [n for n, (i, _) in enumerate(steps) if i == "USER"]
    assert users, "no USER: the image would run as root"
    last_user = steps[users[-1]][1]
    uid, _, gid = last_user.partition(":")
    assert uid.isdigit() and int(uid) != 0 and (not gid or int(gid) != 0), last_user
    assert all(i != "RUN" for i, _ in steps[users[-1] :]), "a RUN after USER runs as the service user at build"
    checks = [a for i, a in steps if i == "HEALTHCHECK"]
    assert len(checks) == 1 and "clave-healthcheck" in checks[0], checks
    assert any(i == "COPY" and "healthcheck.py /usr/local/bin/clave-healthcheck" in a for i, a in steps)
    env = " ".join(a for i, a in steps if i == "ENV")
    # Read-only root filesystem: no bytecode written at run time, HOME in /tmp.
    assert "PYTHONDONTWRITEBYTECODE=1" in env and "HOME=/tmp" in env


def test_dockerignore_lets_in_every_copied_path() -> None:
    """The build context is only what the ignore file lets in: a COPY of anything else fails."""
    allowed = [line[1:] for line in DOCKERIGNORE.read_text().splitlines() if line.startswith("!")]
    assert "*" in DOCKERIGNORE.read_text().splitlines()
    for instruction, args in dockerfile_instructions():
        if instruction != "COPY" or "--from=" in args:
            continue
        sources = [w for w in shlex.split(args) if not w.startswith("--")][:-1]
        for source in sources:
            assert (ROOT / source).exists(), f"COPY {source}: no such path"
            assert any(source.rstrip("/") == a.rstrip("/") or source.startswith(a) for a in allowed), source


def runtime_closure() -> set[str]:
    """Distributions installed for the runtime dependencies of pyproject, transitively."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pending = [Requirement(r) for r in project["dependencies"]]
    seen: set[str] = set()
    while pending:
        req = pending.pop()
        name = canonicalize_name(req.name)
        if name in seen:
            continue
        seen.add(name)
        for text in metadata.requires(req.name) or []:
            sub = Requirement(text)
            if sub.marker is None or any(sub.marker.evaluate({"extra": e}) for e in ("", *req.extras)):
                pending.append(sub)
    return seen


def test_image_code_imports_only_runtime_dependencies() -> None:
    """What the image installs (pyproject's dependencies, no [dev]) is enough for every
    module it ships: a dependency moved to [dev] (SecantusDB, aiosmtpd) must not be imported."""
    import ast

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    dev = {canonicalize_name(Requirement(r).name) for r in project["project"]["optional-dependencies"]["dev"]}
    runtime = {canonicalize_name(Requirement(r).name) for r in project["project"]["dependencies"]}
    assert not runtime & dev
    assert {"secantusdb", "aiosmtpd"} <= dev, "the local stack's store and mail catcher are dev-only"
    closure = runtime_closure()
    by_module = metadata.packages_distributions()
    local = {"shared", "services", "clave"}
    missing: set[str] = set()
    for path in [*ROOT.glob("shared/**/*.py"), *ROOT.glob("services/**/*.py"), *ROOT.glob("clave/**/*.py")]:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            for name in names:
                top = name.split(".")[0]
                if top in local or top in sys.stdlib_module_names:
                    continue
                dists = {canonicalize_name(d) for d in by_module.get(top, [])}
                if not dists & closure:
                    missing.add(f"{path.relative_to(ROOT)}: {top}")
    assert not missing, sorted(missing)


# ------------------------------------------------------------ entry point and health check


def run_entrypoint(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["sh", str(ENTRYPOINT), *args], env=env, capture_output=True, text=True, timeout=30, check=False
    )


def test_entrypoint_reads_secrets_from_files(tmp_path: Path) -> None:
    secret = tmp_path / "pw"
    secret.write_text("s3cret value\n")
    env = {"PATH": os.environ["PATH"], "KAFKA_SASL_PASSWORD__FILE": str(secret), "SSL_CERT_FILE": "/ca.pem"}
    done = run_entrypoint("env", env=env)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert "KAFKA_SASL_PASSWORD=s3cret value" in lines  # trailing newline dropped
    assert not any(line.startswith("KAFKA_SASL_PASSWORD__FILE=") for line in lines)
    assert "SSL_CERT_FILE=/ca.pem" in lines  # one underscore: not a secret reference

    missing = run_entrypoint("env", env={"PATH": env["PATH"], "DLQ_KEYS__FILE": str(tmp_path / "nope")})
    assert missing.returncode == 78 and "DLQ_KEYS__FILE" in missing.stderr


def test_entrypoint_runs_the_named_service(tmp_path: Path) -> None:
    fake = tmp_path / "python"
    fake.write_text('#!/bin/sh\necho "python $*"\n')
    fake.chmod(0o755)
    env = {"PATH": f"{tmp_path}:{os.environ['PATH']}"}
    listed = re.search(r'^SERVICES="([^"]*)"', ENTRYPOINT.read_text(), re.M)
    assert listed and sorted(listed.group(1).split()) == SERVICES
    for service in SERVICES:
        done = run_entrypoint(service, env=env)
        assert done.stdout.strip() == f"python -m services.{service}", done.stderr
    assert run_entrypoint("echo", "other", env=env).stdout.strip() == "other"
    usage = run_entrypoint(env=env)
    assert usage.returncode == 64 and "identity" in usage.stdout


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_healthcheck_asks_the_running_service(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    proc = tmp_path / "proc"
    (proc / "1").mkdir(parents=True)
    (proc / "1" / "cmdline").write_bytes(b"/usr/bin/tini\x00--\x00clave-entrypoint\x00notifier\x00")
    (proc / "7").mkdir()
    (proc / "7" / "cmdline").write_bytes(b"python\x00-m\x00services.notifier\x00")
    assert healthcheck.running_service(proc) == "notifier"

    port = free_port()
    monkeypatch.setenv("NOTIFIER_METRICS_PORT", str(port))
    monkeypatch.setenv("METRICS_HOST", "0.0.0.0")  # noqa: S104 - what a container sets

    async def ready() -> bool:
        return False  # liveness must not depend on readiness

    server = HealthServer(ServiceMetrics("notifier"), ready, "127.0.0.1", port)
    await server.start()
    try:
        assert await asyncio.to_thread(healthcheck.main, proc) == 0
    finally:
        await server.stop()
    assert await asyncio.to_thread(healthcheck.main, proc) == 1  # nothing answers any more
    (proc / "7" / "cmdline").write_bytes(b"python\x00/app/deploy/kafka/provision.py\x00")
    assert healthcheck.main(proc) == 0  # a job container: no service to ask


# ============================================================ compose


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml_load(COMPOSE.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def compose_schema() -> dict[str, Any]:
    ref = importlib.resources.files("check_jsonschema.builtin_schemas.vendor") / "compose-spec.json"
    return json.loads(ref.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def made_secrets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("compose") / "secrets"
    make_secrets.make_all(root)
    return root


def test_compose_file_matches_the_compose_spec_schema(compose: dict[str, Any], compose_schema: dict[str, Any]) -> None:
    validator = validator_for(compose_schema)(compose_schema)  # the draft the schema declares (2020-12)
    errors = sorted(validator.iter_errors(compose), key=lambda e: list(e.path))
    assert not errors, [f"{'/'.join(map(str, e.path))}: {e.message}" for e in errors]
    # The schema can fail: a misspelt key and a wrong type are refused.
    broken = json.loads(json.dumps(compose))
    broken["services"]["identity"]["comand"] = ["identity"]
    broken["services"]["tokens"]["cap_drop"] = {"all": True}
    found = [e.message for e in validator.iter_errors(broken)]
    assert any("'comand' was unexpected" in m for m in found) and len(found) >= 2, found


def interpolate(value: str) -> str:
    """Compose's ${VAR:-default} with nothing set: the default."""
    return re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", value)


def compose_env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    assert isinstance(env, dict), "environment as a mapping"
    return {k: interpolate(str(v)) for k, v in env.items()}


def mounted_secrets(service: dict[str, Any]) -> dict[str, str]:
    """target path -> compose secret name."""
    out = {}
    for entry in service.get("secrets", []):
        source, target = (entry, entry) if isinstance(entry, str) else (entry["source"], entry.get("target"))
        out[f"/run/secrets/{target or source}"] = source
    return out


def bind_mounts(service: dict[str, Any]) -> dict[str, tuple[str, bool]]:
    """target path -> (host path as written, read-only)."""
    out = {}
    for volume in service.get("volumes", []):
        source, target, *mode = volume.split(":")
        if source.startswith("."):
            out[target] = (source, mode == ["ro"])
    return out


def made_file(relative_to_compose: str, secrets_dir: Path) -> Path:
    """Where a ./secrets/... path of the compose file is among the files make_secrets.py made."""
    source = (COMPOSE_DIR / relative_to_compose).resolve()
    return secrets_dir / source.relative_to((COMPOSE_DIR / "secrets").resolve())


def host_path(compose: dict[str, Any], service: dict[str, Any], path: str, secrets_dir: Path) -> Path:
    """The made file (or folder) a container sees at `path`: a mounted secret, or a file
    under a bind-mounted folder."""
    secrets = mounted_secrets(service)
    if path in secrets:
        return made_file(compose["secrets"][secrets[path]]["file"], secrets_dir)
    for target, (source, _) in bind_mounts(service).items():
        if path == target or path.startswith(target + "/"):
            return made_file(source, secrets_dir) / path.removeprefix(target).lstrip("/")
    raise AssertionError(f"{path}: neither a mounted secret nor under a bind mount")


DKIM_KEY = "DKIM_PRIVATE_KEY"  # a file path, as the signing key


def resolve_secret_files(
    compose: dict[str, Any], service: dict[str, Any], env: dict[str, str], secrets_dir: Path
) -> dict[str, str]:
    """The environment the entry point hands the process: VAR__FILE replaced by the file's
    content, read from the files make_secrets.py made; the settings that are file paths
    (the signing key, the public keys) pointed at those files."""
    mounts = mounted_secrets(service)
    out = {}
    for name, value in env.items():
        if name.endswith(SECRET_FILE):
            assert value in mounts, f"{name}={value}: no such secret mounted"
            out[name.removesuffix(SECRET_FILE)] = host_path(compose, service, value, secrets_dir).read_text().strip()
        elif name in (SIGNING_KEY, PUBLIC_KEYS, DKIM_KEY, SEALING_KEY):
            out[name] = str(host_path(compose, service, value, secrets_dir))
        else:
            out[name] = value
    return out


def test_compose_runs_each_service_with_its_settings_and_secrets(
    compose: dict[str, Any], made_secrets: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    services = compose["services"]
    for name in SERVICES:
        spec = services[name]
        cls = make_secrets.settings_class(name)
        env = compose_env(spec)
        assert spec["command"] == [name]
        # Every variable is a setting of this service (or a known non-setting).
        for var in env:
            base = var.removesuffix(SECRET_FILE)
            assert base in field_env_names(cls) or var in NOT_SETTINGS, f"{name}: {var} is not a setting"
        # Secrets only from files, and the container mounts exactly the secrets it reads.
        for var in secret_variables(name):
            assert var not in env and env.get(var + SECRET_FILE, "").startswith("/run/secrets/"), f"{name}: {var}"
        read = {v for v in env.values() if v.startswith("/run/secrets/")}
        assert set(mounted_secrets(spec)) == read, name
        # Own principal, own store user, own port, reachable metrics.
        assert env["KAFKA_SASL_USERNAME"] == name and name in provision.PRINCIPALS
        assert env["KAFKA_SASL_PASSWORD__FILE"] == f"/run/secrets/kafka_{name}_password"
        assert env["MONGODB_URI__FILE"] == f"/run/secrets/mongodb_{name}_uri"
        port = default_metrics_port(name)
        assert env[f"{name.upper()}_METRICS_PORT"] == str(port) and spec["expose"] == [str(port)]
        assert env["METRICS_HOST"] == "0.0.0.0"  # noqa: S104
        # The image's HEALTHCHECK (/healthz) stays on; the hardening is in place.
        assert "healthcheck" not in spec
        assert spec["read_only"] is True and spec["tmpfs"] == ["/tmp"] and spec["cap_drop"] == ["ALL"]
        assert spec["user"] == "10001:10001"
        # Its own audit signing key, from a secret of its own, read as a file.
        assert make_secrets.signs_audit(name)
        assert env[SIGNING_KEY] == "/run/secrets/audit_signing_key.pem" and SIGNING_KEY + SECRET_FILE not in env
        own = mounted_secrets(spec)[env[SIGNING_KEY]]
        assert own == f"{name}_audit_signing_key" and compose["secrets"][own]["file"] == f"./secrets/audit/{name}.pem"
        # Verifiers read the public keys, a read-only folder (not a secret); no one else gets them.
        assert (PUBLIC_KEYS in env) == make_secrets.verifies_audit(name), name
        if PUBLIC_KEYS in env:
            assert bind_mounts(spec)[env[PUBLIC_KEYS]] == ("./secrets/audit/public", True)
        # The readers of sealed portal input, and only they, mount Clave's sealing key.
        assert (SEALING_KEY in env) == reads_portal_input(name), name
        if SEALING_KEY in env:
            assert mounted_secrets(spec)[env[SEALING_KEY]] == "portal_sealing_key"
            assert compose["secrets"]["portal_sealing_key"]["file"] == "./secrets/portal/sealing.pem"
        # The notifier alone signs mail (DKIM), with a key from a secret of its own.
        assert (DKIM_KEY in env) == (name == "notifier"), name
        if DKIM_KEY in env:
            assert compose["secrets"][mounted_secrets(spec)[env[DKIM_KEY]]]["file"] == "./secrets/dkim/private.pem"
        # With the secrets make_secrets.py makes, production mode accepts every setting.
        resolved = resolve_secret_files(compose, spec, env, made_secrets)
        assert gate(cls, resolved, monkeypatch) == [], name


def test_compose_verifiers_know_every_producers_signing_key(compose: dict[str, Any], made_secrets: Path) -> None:
    """The public keys the audit service reads are those of the private keys the services
    sign with: one per producer, each a different key."""
    services = compose["services"]
    kids = {}
    for name in SERVICES:
        env = compose_env(services[name])
        kids[name] = signing_kid(host_path(compose, services[name], env[SIGNING_KEY], made_secrets))
    assert len(set(kids.values())) == len(SERVICES), "a key shared between services could sign for another"
    verifiers = [n for n in SERVICES if make_secrets.verifies_audit(n)]
    assert verifiers == ["audit"]
    for name in verifiers:
        env = compose_env(services[name])
        ring = KeyRing.load(str(host_path(compose, services[name], env[PUBLIC_KEYS], made_secrets)))
        assert ring.producers() == set(SERVICES)
        assert all(ring.get(producer, kid) is not None for producer, kid in kids.items())


def test_compose_gate_would_catch_a_missing_secret(
    compose: dict[str, Any], made_secrets: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The gate check above can fail: drop the notifier's key file, its signing key or its
    TLS, or the audit service's public keys, and it names them."""
    spec = compose["services"]["notifier"]
    env = compose_env(spec)
    env.pop("NOTIFIER_KEYS__FILE")
    env.pop(SIGNING_KEY)
    env["SMTP_STARTTLS"] = "false"
    problems = gate(
        make_secrets.settings_class("notifier"), resolve_secret_files(compose, spec, env, made_secrets), monkeypatch
    )
    assert any(p.startswith("NOTIFIER_KEYS") for p in problems) and any("SMTP_STARTTLS" in p for p in problems)
    assert any(p.startswith(f"{SIGNING_KEY}: not set") for p in problems), problems
    audit = compose["services"]["audit"]
    env = compose_env(audit)
    env.pop(PUBLIC_KEYS)
    problems = gate(AuditSettings, resolve_secret_files(compose, audit, env, made_secrets), monkeypatch)
    assert problems == [f"{PUBLIC_KEYS}: not set: no producer's signature can be checked"], problems


def test_compose_auditor_job_verifies_with_public_keys_only(
    compose: dict[str, Any], made_secrets: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The periodic `clave audit verify`: the auditor's principal and settings, the public keys
    and a read-only store user, and no secret of any service (it can check, never sign)."""
    spec = compose["services"]["auditor"]
    env = compose_env(spec)
    script = " ".join(spec["command"])
    assert "clave audit verify" in script and "--no-heads" not in script and "sleep 3600" in script
    for var in env:
        assert var.removesuffix(SECRET_FILE) in field_env_names(AuditorSettings), f"auditor: {var} is not a setting"
    assert env["KAFKA_SASL_USERNAME"] == "auditor" and "auditor" in provision.PRINCIPALS
    assert env["KAFKA_SASL_PASSWORD__FILE"] == "/run/secrets/kafka_auditor_password"
    assert env["MONGODB_URI__FILE"] == "/run/secrets/mongodb_auditor_uri"
    assert (made_secrets / "mongodb" / "auditor.uri").read_text().startswith("mongodb://auditor:")
    assert not {SIGNING_KEY, "DLQ_KEYS__FILE"} & set(env)
    assert set(mounted_secrets(spec)) == {v for v in env.values() if v.startswith("/run/secrets/")}
    assert not any("signing_key" in s or s == "dlq_keys" for s in mounted_secrets(spec).values())
    assert bind_mounts(spec)[env[PUBLIC_KEYS]] == ("./secrets/audit/public", True)
    assert spec["read_only"] is True and spec["cap_drop"] == ["ALL"] and spec["user"] == "10001:10001"
    assert spec["healthcheck"]["test"] == ["CMD", "test", "-f", "/tmp/verified"]
    assert gate(AuditorSettings, resolve_secret_files(compose, spec, env, made_secrets), monkeypatch) == []


def test_compose_secrets_are_files_made_by_make_secrets(compose: dict[str, Any], made_secrets: Path) -> None:
    for name, spec in compose["secrets"].items():
        assert set(spec) == {"file"}, f"secret {name}: only files (no inline values)"
        path = (COMPOSE_DIR / spec["file"]).resolve()
        relative = path.relative_to((COMPOSE_DIR / "secrets").resolve())
        assert (made_secrets / relative).is_file(), f"secret {name}: make_secrets.py does not make {relative}"
    used = {s for svc in compose["services"].values() for s in mounted_secrets(svc).values()}
    assert used == set(compose["secrets"]), "declared but unused, or used but undeclared"
    # Folders bind-mounted from ./secrets are made too (the public keys).
    for name, svc in compose["services"].items():
        for source, read_only in bind_mounts(svc).values():
            if source.startswith("./secrets/"):
                assert read_only and made_file(source, made_secrets).is_dir(), f"{name}: {source}"
    assert "secrets/" in (COMPOSE_DIR / ".gitignore").read_text().split()
    # No environment value anywhere looks like one of the secrets.
    values = {f.read_text().strip() for f in made_secrets.rglob("*") if f.is_file()}
    text = COMPOSE.read_text()
    assert not [v for v in values if v and v in text]


def test_make_secrets_is_idempotent_and_makes_usable_material(made_secrets: Path, tmp_path: Path) -> None:
    before = {p: p.read_bytes() for p in made_secrets.rglob("*") if p.is_file()}
    assert make_secrets.make_all(made_secrets) == []
    assert before == {p: p.read_bytes() for p in made_secrets.rglob("*") if p.is_file()}
    for name, fernet in make_secrets.all_keys().items():
        value = (made_secrets / "keys" / name).read_text()
        if fernet:
            Fernet(value)
        assert len(base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))) == 32
    # The shared audit HMAC key is gone: no setting loads it (only an optional legacy one).
    assert "AUDIT_HMAC_KEY" not in make_secrets.all_keys()
    assert not (made_secrets / "keys" / "AUDIT_HMAC_KEY").exists()
    assert oct((made_secrets).stat().st_mode & 0o777) == "0o700"
    # One Ed25519 signing key per service (none the development key) and its public entry.
    kids = {s: signing_kid(made_secrets / "audit" / f"{s}.pem") for s in make_secrets.SERVICES}
    assert not any(is_dev_key(load_signing_key(str(made_secrets / "audit" / f"{s}.pem"))) for s in kids)
    assert len(set(kids.values())) == len(kids)
    public = made_secrets / "audit" / "public"
    assert sorted(p.name for p in public.iterdir()) == sorted(f"{s}-{k}.json" for s, k in kids.items())
    ring = KeyRing.load(str(public))
    assert len(ring) == len(kids) and all(ring.get(s, k) for s, k in kids.items())
    assert oct(public.stat().st_mode & 0o777) == "0o755", "the container's user lists the mounted folder"
    assert oct((made_secrets / "audit").stat().st_mode & 0o777) == "0o700"
    ca = x509.load_pem_x509_certificate((made_secrets / "tls" / "ca.pem").read_bytes())
    hosts = {
        **{h: f"{h}.pem" for h in (*make_secrets.KAFKA_BROKERS, *make_secrets.MONGO_MEMBERS)},
        "mailpit": "mailpit.crt",
    }
    for host, file in hosts.items():
        cert = x509.load_pem_x509_certificate((made_secrets / "tls" / file).read_bytes())
        cert.verify_directly_issued_by(ca)
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert host in names.get_values_for_type(x509.DNSName)
        usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        assert ExtendedKeyUsageOID.SERVER_AUTH in usage and ExtendedKeyUsageOID.CLIENT_AUTH in usage


def test_make_secrets_rotates_one_signing_key_and_keeps_the_old_public_one(made_secrets: Path, tmp_path: Path) -> None:
    """Deleting a service's private key and running again makes a new pair; the old public
    entry stays (the events it signed are verified with it), the other services keep theirs."""
    copy = tmp_path / "secrets"
    shutil.copytree(made_secrets, copy)
    old = signing_kid(copy / "audit" / "identity.pem")
    (copy / "audit" / "identity.pem").unlink()
    created = make_secrets.make_all(copy)
    new = signing_kid(copy / "audit" / "identity.pem")
    assert new != old and created == ["audit/identity.pem", f"audit/public/identity-{new}.json"]
    ring = KeyRing.load(str(copy / "audit" / "public"))
    assert ring.get("identity", old) and ring.get("identity", new) and len(ring) == len(make_secrets.SERVICES) + 1


def test_settings_class_is_the_one_the_service_runs_with() -> None:
    """services/audit/settings.py holds the read model's class and the auditor's: the
    deployment files are checked against the one the audit service's app loads."""
    assert make_secrets.settings_class("audit") is AuditSettings
    assert AuditorSettings is not AuditSettings and issubclass(AuditorSettings, AuditSettings)
    for service in SERVICES:
        cls = make_secrets.settings_class(service)
        assert cls.__module__ == f"services.{service}.settings", cls


def test_compose_kafka_nodes_use_scram_and_acls(compose: dict[str, Any]) -> None:
    services = compose["services"]
    nodes = sorted(n for n in services if re.fullmatch(r"kafka-\d", n))
    assert nodes == list(make_secrets.KAFKA_BROKERS)
    broker = (COMPOSE_DIR / "kafka" / "broker.sh").read_text()
    for line in (
        "authorizer.class.name=org.apache.kafka.metadata.authorizer.StandardAuthorizer",
        "allow.everyone.if.no.acl.found=false",
        "listener.security.protocol.map=INTERNAL:SASL_SSL,CONTROLLER:SASL_SSL",
        "listener.name.internal.sasl.enabled.mechanisms=SCRAM-SHA-512",
        "process.roles=broker,controller",
        "min.insync.replicas=2",
        "default.replication.factor=3",
        "auto.create.topics.enable=false",
    ):
        assert re.search(rf"^{re.escape(line)}$", broker, re.M), line
    voters = re.search(r"^controller\.quorum\.voters=(.*)$", broker, re.M)
    assert voters and voters.group(1) == ",".join(f"{i}@{n}:9093" for i, n in enumerate(nodes, 1))
    bootstrap = ",".join(f"{n}:9092" for n in nodes)
    for i, node in enumerate(nodes, 1):
        spec = services[node]
        assert spec["hostname"] == node and spec["environment"]["CLAVE_NODE_ID"] == str(i)
        assert spec["image"].startswith("apache/kafka:") and spec["image"] != "apache/kafka:latest"
        assert {"source": f"kafka_{i}_pem", "target": "kafka_pem"} in spec["secrets"]
    for name in [*SERVICES, "kafka-provision"]:
        assert services[name]["environment"]["KAFKA_BOOTSTRAP_SERVERS"] == bootstrap
        assert services[name]["environment"]["KAFKA_SECURITY_PROTOCOL"] == "SASL_SSL"
    users = services["kafka-users"]
    principals = users["environment"]["CLAVE_KAFKA_PRINCIPALS"].split()
    assert principals == list(provision.PRINCIPALS)
    assert {f"kafka_{p}_password" for p in principals} <= set(users["secrets"])


def test_compose_provisioning_job_asks_for_durable_topics_and_acls(compose: dict[str, Any]) -> None:
    job = compose["services"]["kafka-provision"]
    env = compose_env(job)
    assert job["command"] == ["python", "/app/deploy/kafka/provision.py"]
    assert env["KAFKA_REPLICATION_FACTOR"] == "3" and env["KAFKA_MIN_INSYNC_REPLICAS"] == "2"
    assert env["PORTAL_TOPIC_RETENTION_MS"] == str(t.HOUR_MS) and env["INTERNAL_TOPIC_RETENTION_MS"] == str(t.WEEK_MS)
    fields = field_env_names(create_topics.ClusterSettings)
    assert all(k.removesuffix(SECRET_FILE) in fields for k in env), env
    assert env["KAFKA_SASL_USERNAME"] == KAFKA_ADMIN
    assert job["depends_on"]["kafka-users"]["condition"] == "service_completed_successfully"
    for name in SERVICES:
        assert (
            compose["services"][name]["depends_on"]["kafka-provision"]["condition"] == "service_completed_successfully"
        )


def test_compose_mongodb_replica_set(compose: dict[str, Any]) -> None:
    services = compose["services"]
    members = sorted(n for n in services if re.fullmatch(r"mongo-\d", n))
    assert members == list(make_secrets.MONGO_MEMBERS)
    conf = yaml_load((COMPOSE_DIR / "mongo" / "mongod.conf").read_text())
    assert conf["replication"]["replSetName"] == make_secrets.REPLICA_SET
    assert conf["security"]["keyFile"] and conf["security"]["authorization"] == "enabled"
    assert conf["net"]["tls"]["mode"] == "requireTLS"
    for member in members:
        assert services[member]["hostname"] == member
        assert "mongodb_keyfile" in services[member]["secrets"]
    init = services["mongo-init"]
    command = init["command"]
    assert command[command.index("--members") + 1] == ",".join(f"{m}:27017" for m in members)
    assert [c for c in command if c.endswith("_uri")] == [
        *(f"/run/secrets/mongodb_{s}_uri" for s in make_secrets.SERVICES),
        "/run/secrets/mongodb_auditor_uri",  # read-only on the audit read model (init_replica_set.READERS)
    ]
    assert sorted(make_secrets.SERVICES) == SERVICES
    for name in SERVICES:
        assert services[name]["depends_on"]["mongo-init"]["condition"] == "service_completed_successfully"


def test_compose_monitoring_and_mail(compose: dict[str, Any]) -> None:
    services = compose["services"]
    prom = services["prometheus"]
    mounts = {v.split(":")[1]: v.split(":")[0] for v in prom["volumes"] if v.count(":") >= 1}
    config = yaml_load((COMPOSE_DIR / "prometheus.yml").read_text())
    assert (COMPOSE_DIR / mounts[config["rule_files"][0]]).resolve() == ALERTS
    assert (COMPOSE_DIR / mounts["/etc/prometheus/prometheus.yml"]).resolve() == COMPOSE_DIR / "prometheus.yml"
    job = config["scrape_configs"][0]
    assert job["job_name"] == "clave"
    targets = {sd["names"][0]: sd["port"] for sd in job["dns_sd_configs"]}
    assert targets == {s: default_metrics_port(s) for s in SERVICES}
    grafana = services["grafana"]
    sources = {(COMPOSE_DIR / v.split(":")[0]).resolve() for v in grafana["volumes"] if v.startswith(".")}
    assert DASHBOARD in sources
    assert "GF_SECURITY_ADMIN_PASSWORD" not in grafana["environment"]
    mail = services["mailpit"]
    notifier = compose_env(services["notifier"])
    assert notifier["SMTP_HOST"] == "mailpit" and notifier["SMTP_STARTTLS"] == "true"
    assert mail["environment"]["MP_SMTP_REQUIRE_STARTTLS"] == "true"
    assert all(p.startswith("127.0.0.1:") for s in services.values() for p in s.get("ports", []))


# ============================================================ Helm


@pytest.fixture(scope="session")
def helm() -> str:
    """helm, built once from the Go module proxy into the cache (deploy/helm/ensure_helm.sh)."""
    if shutil.which("go") is None and not os.environ.get("CI"):
        pytest.skip("go not found: needed once to build helm (deploy/helm/ensure_helm.sh)")
    done = subprocess.run(
        ["bash", str(DEPLOY / "helm" / "ensure_helm.sh")], capture_output=True, text=True, timeout=900, check=False
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def render(helm: str, *sets: str, values: Path | None = None) -> list[dict[str, Any]]:
    args = [helm, "template", "clave", str(CHART), "--kube-version", KUBE_VERSION]
    for s in sets:
        args += ["--set", s]
    if values is not None:
        args += ["--values", str(values)]
    done = subprocess.run(args, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    return yaml_load_all(done.stdout)


@pytest.fixture(scope="module")
def manifests(helm: str) -> list[dict[str, Any]]:
    return render(helm)


@pytest.fixture(scope="module")
def keyed_manifests(helm: str, made_secrets: Path, tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """The chart with the producers' public keys in its values (the entries make_secrets.py
    made, as `clave audit keygen` writes them), so the chart makes their ConfigMap."""
    entries = [json.loads(f.read_text()) for f in sorted((made_secrets / "audit" / "public").glob("*.json"))]
    values = tmp_path_factory.mktemp("helm") / "values.json"  # JSON is YAML
    values.write_text(json.dumps({"auditKeys": {"publicKeys": entries}}))
    return render(helm, values=values)


def of_kind(docs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def test_helm_lint_passes(helm: str) -> None:
    done = subprocess.run(
        [helm, "lint", "--strict", str(CHART), "--kube-version", KUBE_VERSION],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_chart_has_each_kind(manifests: list[dict[str, Any]]) -> None:
    kinds = {d["kind"] for d in manifests}
    assert kinds >= {
        "Deployment",
        "Service",
        "ConfigMap",
        "PodDisruptionBudget",
        "HorizontalPodAutoscaler",
        "NetworkPolicy",
        "ServiceMonitor",
        "PrometheusRule",
        "Job",
    }
    assert "Secret" not in kinds, "the chart references Secrets, it never holds one"
    for kind in ("Deployment", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler"):
        assert sorted(of_kind(manifests, kind)) == [f"clave-{s}" for s in SERVICES], kind
    # A NetworkPolicy per service and one for the auditor CronJob's pods.
    assert sorted(of_kind(manifests, "NetworkPolicy")) == sorted([*(f"clave-{s}" for s in SERVICES), "clave-auditor"])
    assert sorted(of_kind(manifests, "CronJob")) == ["clave-auditor"]


def container_env(container: dict[str, Any], configmap: dict[str, str]) -> tuple[dict[str, str], set[str]]:
    """(variables with a value, including the ConfigMap's; variables read from a Secret)."""
    values = dict(configmap)
    from_secret = set()
    for item in container["env"]:
        if "value" in item:
            values[item["name"]] = str(item["value"])
        else:
            assert set(item["valueFrom"]) == {"secretKeyRef"}, item
            from_secret.add(item["name"])
    return values, from_secret


def fake_secret(name: str, fernet: bool | None) -> str:
    if name == "MONGODB_URI":
        return "mongodb://identity:pw@m1:27017,m2:27017,m3:27017/?replicaSet=rs0&tls=true&authSource=admin"
    if fernet:
        return Fernet.generate_key().decode()
    return base64.urlsafe_b64encode(os.urandom(32)).decode().rstrip("=")


def mounted_from(pod: dict[str, Any], container: dict[str, Any], path: str) -> dict[str, Any]:
    """The volume a container sees `path` in (the file or folder itself), mounted read-only."""
    (mount,) = [m for m in container["volumeMounts"] if path == m["mountPath"] or path.startswith(m["mountPath"] + "/")]
    assert mount.get("readOnly") is True, mount
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    return dict(volume)


def configmap_folder(configmap: dict[str, Any], folder: Path) -> Path:
    """A ConfigMap as the kubelet mounts it: one file per key."""
    folder.mkdir()
    for key, text in configmap["data"].items():
        (folder / key).write_text(text)
    return folder


def test_chart_deployments_match_the_code(
    keyed_manifests: list[dict[str, Any]], made_secrets: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    manifests = keyed_manifests
    deployments = of_kind(manifests, "Deployment")
    configmaps = of_kind(manifests, "ConfigMap")
    configmap = configmaps["clave-config"]["data"]
    public_keys = configmap_folder(configmaps["clave-audit-public-keys"], tmp_path / "public-keys")
    for name in SERVICES:
        cls = make_secrets.settings_class(name)
        pod = deployments[f"clave-{name}"]["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        assert container["args"] == [name]
        port = default_metrics_port(name)
        assert container["ports"] == [{"name": "metrics", "containerPort": port, "protocol": "TCP"}]
        # Probes on the paths shared/metrics.py serves, on the service's port.
        assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
        assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
        assert container["startupProbe"]["httpGet"]["path"] == "/healthz"
        for kind in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(container["resources"][kind]), kind
        # Hardened: non-root, read-only root, no capabilities, the runtime's seccomp profile.
        assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        sc = container["securityContext"]
        assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
        assert sc["capabilities"]["drop"] == ["ALL"]
        assert {"name": "tmp", "mountPath": "/tmp"} in container["volumeMounts"]
        assert pod["automountServiceAccountToken"] is False
        # Settings: every variable exists, secrets come from secretKeyRef, the gate passes.
        values, from_secret = container_env(container, configmap)
        for var in {*values, *from_secret}:
            assert var in field_env_names(cls), f"{name}: {var} is not a setting"
        assert secret_variables(name) <= from_secret, f"{name}: {secret_variables(name) - from_secret}"
        assert not secret_variables(name) & set(values)
        assert values["KAFKA_SASL_USERNAME"] == name and name in provision.PRINCIPALS
        assert values[f"{name.upper()}_METRICS_PORT"] == str(port) and values["METRICS_HOST"] == "0.0.0.0"  # noqa: S104
        # Its own signing key: a file from its own Secret (the one its secretKeyRefs name).
        secret_names = {i["valueFrom"]["secretKeyRef"]["name"] for i in container["env"] if "valueFrom" in i}
        signing = mounted_from(pod, container, values[SIGNING_KEY])["secret"]
        assert [signing["secretName"]] == sorted(secret_names), name
        assert signing["items"] == [{"key": SIGNING_KEY, "path": Path(values[SIGNING_KEY]).name}]
        assert signing["defaultMode"] & 0o007 == 0, "not readable by other users"
        # Verifiers, and only they, read the public keys: the chart's ConfigMap, as a folder.
        assert (PUBLIC_KEYS in values) == make_secrets.verifies_audit(name), name
        files: dict[str, str] = {}
        if PUBLIC_KEYS in values:
            folder = mounted_from(pod, container, values[PUBLIC_KEYS])
            assert folder["configMap"]["name"] == "clave-audit-public-keys"
            files[PUBLIC_KEYS] = str(public_keys)
        # The readers of sealed portal input mount Clave's sealing key from their own Secret.
        assert (SEALING_KEY in values) == reads_portal_input(name), name
        if SEALING_KEY in values:
            sealing = mounted_from(pod, container, values[SEALING_KEY])["secret"]
            assert [sealing["secretName"]] == sorted(secret_names), name
            assert sealing["items"] == [{"key": SEALING_KEY, "path": Path(values[SEALING_KEY]).name}]
            assert sealing["defaultMode"] & 0o007 == 0, "not readable by other users"
            files[SEALING_KEY] = str(made_secrets / "portal" / "sealing.pem")
        # The Secret holds the PEM make_secrets.py (or `clave audit keygen`) made for it.
        files[SIGNING_KEY] = str(made_secrets / "audit" / f"{name}.pem")
        # The notifier alone signs mail (DKIM): a file from its own Secret too.
        assert (DKIM_KEY in values) == (name == "notifier"), name
        if DKIM_KEY in values:
            dkim_volume = mounted_from(pod, container, values[DKIM_KEY])["secret"]
            assert dkim_volume["secretName"] == signing["secretName"] and dkim_volume["defaultMode"] & 0o007 == 0
            assert dkim_volume["items"] == [{"key": DKIM_KEY, "path": Path(values[DKIM_KEY]).name}]
            files[DKIM_KEY] = str(made_secrets / "dkim" / "private.pem")
        keys = make_secrets.service_keys(name)
        filled = {
            **values,
            **{k: fake_secret(k, keys.get(k)) for k in from_secret if not k.startswith("SMTP_")},
            **files,
        }
        assert gate(cls, filled, monkeypatch) == [], name


def test_chart_public_keys_configmap(
    manifests: list[dict[str, Any]], keyed_manifests: list[dict[str, Any]], made_secrets: Path, tmp_path: Path
) -> None:
    """With the entries in its values the chart makes the ConfigMap, one file per key, that
    reads back as every producer's key; without them it expects one made from `clave audit
    keygen`'s folder (kubectl create configmap ... --from-file), as it expects the Secrets."""
    made = KeyRing.load(str(made_secrets / "audit" / "public"))
    rendered = of_kind(keyed_manifests, "ConfigMap")["clave-audit-public-keys"]
    ring = KeyRing.load(str(configmap_folder(rendered, tmp_path / "rendered")))
    kids = {s: signing_kid(made_secrets / "audit" / f"{s}.pem") for s in SERVICES}
    assert len(ring) == len(made) == len(SERVICES) and all(ring.get(s, k) for s, k in kids.items())
    assert sorted(rendered["data"]) == sorted(f"{s}-{k}.json" for s, k in kids.items())
    assert "clave-audit-public-keys" not in of_kind(manifests, "ConfigMap")
    audit = of_kind(manifests, "Deployment")["clave-audit"]["spec"]["template"]["spec"]
    assert {"name": "audit-public-keys", "configMap": {"name": "clave-audit-public-keys"}} in audit["volumes"]


def test_chart_services_monitoring_and_policies(manifests: list[dict[str, Any]]) -> None:
    for name in SERVICES:
        port = default_metrics_port(name)
        service = of_kind(manifests, "Service")[f"clave-{name}"]
        assert service["spec"]["ports"] == [
            {"name": "metrics", "port": port, "targetPort": "metrics", "protocol": "TCP"}
        ]
        pdb = of_kind(manifests, "PodDisruptionBudget")[f"clave-{name}"]
        assert pdb["spec"]["minAvailable"] >= 1
        hpa = of_kind(manifests, "HorizontalPodAutoscaler")[f"clave-{name}"]["spec"]
        assert hpa["scaleTargetRef"]["name"] == f"clave-{name}"
        assert [m["resource"]["name"] for m in hpa["metrics"] if m["type"] == "Resource"] == ["cpu"]
        policy = of_kind(manifests, "NetworkPolicy")[f"clave-{name}"]["spec"]
        assert policy["policyTypes"] == ["Ingress", "Egress"]
        assert [p["port"] for rule in policy["ingress"] for p in rule["ports"]] == ["metrics"]
        egress = {p["port"] for rule in policy["egress"] for p in rule["ports"]}
        assert {53, 9093, 27017} <= egress and ((587 in egress) == (name == "notifier")), egress
    (monitor,) = of_kind(manifests, "ServiceMonitor").values()
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] == "metrics" and endpoint["path"] == "/metrics"
    assert {"targetLabel": "job", "replacement": "clave"} in endpoint["relabelings"]


def test_chart_prometheus_rule_carries_the_alert_file(manifests: list[dict[str, Any]]) -> None:
    link = CHART / "files" / "alerts.yml"
    assert link.is_symlink() and link.resolve() == ALERTS, "generated from deploy/prometheus/alerts.yml, not a copy"
    (rule,) = of_kind(manifests, "PrometheusRule").values()
    assert rule["spec"] == yaml_load(ALERTS.read_text())
    assert len(rule["spec"]["groups"]) >= 1


def test_chart_auditor_cronjob_verifies_with_public_keys_only(keyed_manifests: list[dict[str, Any]]) -> None:
    """The periodic `clave audit verify`: the auditor principal, AuditorSettings only, its
    secrets from its own Secret, the public keys mounted, no signing key, no ingress."""
    (cron,) = of_kind(keyed_manifests, "CronJob").values()
    assert cron["spec"]["concurrencyPolicy"] == "Forbid" and cron["spec"]["schedule"]
    job = cron["spec"]["jobTemplate"]["spec"]
    assert job["backoffLimit"] == 0  # a failed verification is a failed Job, not retried into silence
    pod = job["template"]["spec"]
    (container,) = pod["containers"]
    assert container["args"] == ["clave", "audit", "verify"]
    values, from_secret = container_env(container, {})
    assert set(values) | from_secret <= field_env_names(AuditorSettings), (set(values) | from_secret) - field_env_names(
        AuditorSettings
    )
    assert values["KAFKA_SASL_USERNAME"] == "auditor" and "auditor" in provision.PRINCIPALS
    assert from_secret == {"KAFKA_SASL_PASSWORD", "MONGODB_URI"}
    refs = {i["valueFrom"]["secretKeyRef"]["name"] for i in container["env"] if "valueFrom" in i}
    assert refs == {"clave-auditor"}
    assert SIGNING_KEY not in values and "DLQ_KEYS" not in from_secret
    volume = mounted_from(pod, container, values[PUBLIC_KEYS])
    assert volume["configMap"]["name"] == "clave-audit-public-keys"
    assert not any("secret" in v and v["name"] != "kafka-ca" for v in pod["volumes"])
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert pod["securityContext"]["runAsNonRoot"] is True
    policy = of_kind(keyed_manifests, "NetworkPolicy")["clave-auditor"]
    assert "ingress" not in policy["spec"] and policy["spec"]["policyTypes"] == ["Ingress", "Egress"]


def test_chart_provisioning_job(manifests: list[dict[str, Any]]) -> None:
    (job,) = of_kind(manifests, "Job").values()
    assert set(job["metadata"]["annotations"]["helm.sh/hook"].split(",")) == {"pre-install", "pre-upgrade"}
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["args"] == ["python", "/app/deploy/kafka/provision.py"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    values, from_secret = container_env(container, {})
    assert from_secret == {"KAFKA_SASL_PASSWORD"} and values["KAFKA_SASL_USERNAME"] == KAFKA_ADMIN
    assert values["KAFKA_REPLICATION_FACTOR"] == "3" and values["KAFKA_MIN_INSYNC_REPLICAS"] == "2"
    assert values["PORTAL_TOPIC_RETENTION_MS"] == str(t.HOUR_MS)
    assert values["INTERNAL_TOPIC_RETENTION_MS"] == str(t.WEEK_MS)
    fields = field_env_names(create_topics.ClusterSettings)
    assert {*values, *from_secret} <= fields


def test_chart_options(helm: str) -> None:
    digest = "sha256:" + "ab" * 32
    docs = render(
        helm,
        f"image.digest={digest}",
        "kafka.caSecret.name=kafka-ca",
        "autoscaling.consumerLag.enabled=true",
    )
    for deployment in of_kind(docs, "Deployment").values():
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        assert container["image"].endswith("@" + digest)
        values, _ = container_env(container, {})
        assert values["KAFKA_SSL_CAFILE"] == "/etc/clave/kafka-ca/ca.crt"
        assert {"name": "kafka-ca", "mountPath": "/etc/clave/kafka-ca", "readOnly": True} in container["volumeMounts"]
    for name, hpa in of_kind(docs, "HorizontalPodAutoscaler").items():
        external = [m["external"] for m in hpa["spec"]["metrics"] if m["type"] == "External"]
        assert external and external[0]["metric"]["selector"]["matchLabels"]["service"] == name.removeprefix("clave-")


def test_chart_refuses_more_consumers_than_partitions(helm: str) -> None:
    done = subprocess.run(
        [helm, "template", "clave", str(CHART), "--kube-version", KUBE_VERSION, "--set", "autoscaling.maxReplicas=7"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode != 0 and "7 consumers for 6 partitions" in done.stderr, done.stderr


# ============================================================ the provisioning job's requests


class RecordingAdmin:
    """An in-memory AIOKafkaAdminClient: an empty cluster that records what it is asked and
    keeps the ACLs created (DescribeAcls answers with them)."""

    created_topics: list[Any] = []
    acl_requests: list[Any] = []
    acls: set[tuple[Any, ...]] = set()

    def __init__(self, **kwargs: Any) -> None:
        self.kwargs = kwargs
        self._client = RecordingClient()

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def list_topics(self) -> list[str]:
        return []

    async def create_topics(self, topics: list[Any]) -> Any:
        RecordingAdmin.created_topics += topics
        return type("R", (), {"topic_errors": [(n.name, 0) for n in topics]})()


class RecordingClient:
    """The admin's connection: provision.py sends its ACL requests through it."""

    def get_random_node(self) -> int:
        return 1

    async def send(self, node: int, request: Any) -> Any:
        if isinstance(request, DescribeAclsRequest):
            resources = [
                (rtype, name, pattern, [(principal, "*", operation, ALLOW)])
                for rtype, name, pattern, principal, operation in sorted(RecordingAdmin.acls)
            ]
            return type("R", (), {"error_code": 0, "error_message": None, "resources": resources})()
        assert isinstance(request, CreateAclsRequest), request
        RecordingAdmin.acl_requests.append(request)
        r = request
        RecordingAdmin.acls.add(
            (r._resource_type, r._resource_name, r._resource_pattern_type_filter, r._principal, r._operation)
        )
        return type("R", (), {"creation_responses": [(0, None)]})()


@pytest.fixture
def provisioning_env(compose: dict[str, Any], made_secrets: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The compose job's environment (its password and CA file aside), nothing else."""
    for name in field_env_names(create_topics.ClusterSettings):
        monkeypatch.delenv(name, raising=False)
    for name, value in compose_env(compose["services"]["kafka-provision"]).items():
        if not name.endswith(SECRET_FILE):
            monkeypatch.setenv(name, value)
    monkeypatch.setenv("KAFKA_SASL_PASSWORD", "test")
    monkeypatch.setenv("KAFKA_SSL_CAFILE", str(made_secrets / "tls" / "ca.pem"))
    create_topics.load.cache_clear()
    monkeypatch.setattr(create_topics, "AIOKafkaAdminClient", RecordingAdmin)
    monkeypatch.setattr(provision, "AIOKafkaAdminClient", RecordingAdmin)
    RecordingAdmin.created_topics, RecordingAdmin.acl_requests, RecordingAdmin.acls = [], [], set()
    yield
    create_topics.load.cache_clear()


def test_provisioning_creates_every_topic_durably(provisioning_env: None) -> None:
    assert asyncio.run(create_topics.run(False)) == 0
    created = {n.name: n for n in RecordingAdmin.created_topics}
    wanted = t.all_topics(6, t.HOUR_MS, t.WEEK_MS)
    assert sorted(created) == sorted(s.name for s in wanted)
    for spec in wanted:
        topic = created[spec.name]
        configs = dict(topic.topic_configs)
        assert topic.replication_factor == 3 and topic.num_partitions == 6, spec.name
        assert configs["min.insync.replicas"] == "2", spec.name
        assert configs["retention.ms"] == str(spec.retention_ms), spec.name
    assert created[t.RECOVERY_REQUESTS].topic_configs["retention.ms"] == str(t.HOUR_MS)
    assert created[t.AUDIT_EVENTS].topic_configs["retention.ms"] == "-1"
    assert created[t.TOKENS_ISSUED].topic_configs["retention.ms"] == str(t.WEEK_MS)


def test_provisioning_refuses_more_in_sync_replicas_than_copies(
    provisioning_env: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KAFKA_MIN_INSYNC_REPLICAS", "4")
    assert asyncio.run(create_topics.run(False)) == 2
    assert RecordingAdmin.created_topics == []


def test_local_defaults_stay_single_broker(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("KAFKA_REPLICATION_FACTOR", "KAFKA_MIN_INSYNC_REPLICAS"):
        monkeypatch.delenv(name, raising=False)
    settings = create_topics.ClusterSettings()
    assert (settings.kafka_replication_factor, settings.kafka_min_insync_replicas) == (1, 1)


def test_provisioning_creates_every_acl_on_existing_topics(provisioning_env: None) -> None:
    assert asyncio.run(provision.provision_acls(dry_run=False, prune=False, describe=False)) == 0
    asked = {
        (r._principal, r._operation, r._resource_type, r._resource_name, r._resource_pattern_type_filter)
        for r in RecordingAdmin.acl_requests
    }
    wanted = provision.all_acls()
    assert asked == {(f"User:{a.principal}", a.operation, a.resource_type, a.resource_name, a.pattern) for a in wanted}
    topics = {s.name for s in t.all_topics(6, t.HOUR_MS, t.WEEK_MS)}
    for acl in wanted:
        if acl.resource_type is provision.ResourceType.TOPIC:
            assert acl.resource_name in topics, acl
        assert acl.principal in provision.PRINCIPALS and acl.principal != KAFKA_ADMIN
    # Every service principal reads what it consumes in its own group and writes the audit log.
    for service in SERVICES:
        mine = [a for a in wanted if a.principal == service]
        assert any(
            a.resource_type is provision.ResourceType.GROUP and a.resource_name == f"clave-{service}" for a in mine
        )
        assert any(a.operation is provision.Operation.WRITE and a.resource_name == t.AUDIT_EVENTS for a in mine)
    # The portal writes only its two inputs.
    portal_writes = {
        a.resource_name for a in wanted if a.principal == "portal" and a.operation is provision.Operation.WRITE
    }
    assert portal_writes == {t.RECOVERY_REQUESTS, t.RECOVERY_RESETS, t.LOGIN_CHECKS, t.CONTACT_UPDATES}
    # Idempotent: a second run finds every ACL in place and asks for none.
    RecordingAdmin.acl_requests = []
    assert asyncio.run(provision.provision_acls(dry_run=False, prune=False, describe=False)) == 0
    assert RecordingAdmin.acl_requests == []


def java_properties(text: str) -> dict[str, str]:
    """java.util.Properties, as far as the broker's file uses it: `\\` joins lines."""
    joined = re.sub(r"\\\n[ \t]*", "", text)
    return dict(line.split("=", 1) for line in joined.splitlines() if "=" in line and not line.startswith("#"))


def test_broker_key_and_chain_are_inline_pem_values(made_secrets: Path) -> None:
    """Kafka takes an unencrypted PKCS#8 key only inline (ssl.keystore.key): broker.sh's
    pem_value turns the node's PEM file into those property values."""
    script = (COMPOSE_DIR / "kafka" / "broker.sh").read_text()
    function = re.search(r"^pem_value\(\) \{.*?^\}", script, re.S | re.M)
    assert function
    pem = made_secrets / "tls" / "kafka-2.pem"
    shell = (
        f"{function.group(0)}\n"
        f"printf 'ssl.keystore.key=%s\\n' \"$(pem_value {pem} 'PRIVATE KEY')\"\n"
        f"printf 'ssl.keystore.certificate.chain=%s\\n' \"$(pem_value {pem} CERTIFICATE)\"\n"
    )
    done = subprocess.run(["bash", "-c", shell], capture_output=True, text=True, timeout=30, check=True)
    props = java_properties(done.stdout)

    def pem_blocks(value: str, kind: str) -> list[bytes]:
        found = re.findall(rf"-----BEGIN {kind}-----(.*?)-----END {kind}-----", value)
        return [f"-----BEGIN {kind}-----\n{''.join(b.split())}\n-----END {kind}-----\n".encode() for b in found]

    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    (key,) = pem_blocks(props["ssl.keystore.key"], "PRIVATE KEY")
    chain = [
        x509.load_pem_x509_certificate(c) for c in pem_blocks(props["ssl.keystore.certificate.chain"], "CERTIFICATE")
    ]
    assert len(chain) == 2 and "kafka-2" in chain[0].subject.rfc4514_string()
    assert load_pem_private_key(key, None).public_key() == chain[0].public_key()
    assert "ssl.keystore.location" not in script and "ssl.keystore.key=$(pem_value" in script


SHELL_SCRIPTS = [
    DEPLOY / "docker" / "entrypoint.sh",
    DEPLOY / "compose" / "kafka" / "broker.sh",
    DEPLOY / "compose" / "kafka" / "users.sh",
    DEPLOY / "compose" / "mongo" / "mongod.sh",
    DEPLOY / "helm" / "ensure_helm.sh",
]


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not found: apt-get install -y shellcheck")
def test_deploy_shell_scripts_pass_shellcheck() -> None:
    done = subprocess.run(
        ["shellcheck", *map(str, SHELL_SCRIPTS)], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stdout
