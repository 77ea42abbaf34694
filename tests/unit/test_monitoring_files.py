"""The operators' monitoring files: Prometheus config and alerts, Grafana dashboard.

They must parse, pass promtool (and the alerts must fire on the incidents they are
written for), use only metric names the code defines (a renamed metric breaks this
test, not the operators' night), group only by labels that cannot carry personal
data, and point every alert at a runbook section that exists.

No YAML library is a dependency of the project: the YAML files are parsed by
promtool, and the few structural checks made here read them line by line.
"""

from __future__ import annotations

import ast
import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
PROM_DIR = ROOT / "deploy" / "prometheus"
CONFIG = PROM_DIR / "prometheus.yml"
ALERTS = PROM_DIR / "alerts.yml"
README = PROM_DIR / "README.md"
DASHBOARD = ROOT / "deploy" / "grafana" / "clave-dashboard.json"

SERVICE_PORTS = {"identity": 9401, "tokens": 9402, "notifier": 9403, "password": 9404}

# Labels an alert or a panel may group, match or print by: bounded, never personal.
ALLOWED_LABELS = frozenset(
    {"topic", "type", "reason", "error", "kind", "result", "service", "job", "instance", "le"}
    # loop, task: the names of a service's background loops and tasks, fixed in the code.
    | {"loop", "task"}
)
# Metrics Prometheus itself adds to every target.
PROMETHEUS_METRICS = frozenset({"up"})

PROMTOOL = shutil.which("promtool")
INSTALL_HINT = "install it with `apt-get install -y prometheus` (Debian/Ubuntu package)"
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason=f"promtool not found on PATH; {INSTALL_HINT}"
)

METRIC_NAME = re.compile(r"\bclave_[a-z0-9_]*[a-z0-9]\b")
GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^()]*)\)")
SELECTOR = re.compile(r"\{([^{}]*)\}")
MATCHER = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)")
TEMPLATE_LABEL = re.compile(r"\$labels\.([a-zA-Z_][a-zA-Z0-9_]*)")
LEGEND_LABEL = re.compile(r"\{\{\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*\}\}")


# ------------------------------------------------------------------ helpers


def promtool(*args: str | Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run(
        [PROMTOOL, *map(str, args)], capture_output=True, text=True, timeout=timeout, check=False
    )


def code_metrics() -> dict[str, str]:
    """Every `clave_*` metric the code creates, with its type, found in the source's AST.

    Matches `Counter("clave_...")`, `metrics.counter("clave_...")` and the gauge,
    histogram and summary equivalents, in shared/*.py and services/*/*.py.
    """
    factories = {
        "counter": "counter",
        "gauge": "gauge",
        "histogram": "histogram",
        "summary": "summary",
    }
    found: dict[str, str] = {}
    files = sorted([*ROOT.glob("shared/*.py"), *ROOT.glob("services/*/*.py")])
    for path in files:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call) or not node.args:
                continue
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            first = node.args[0]
            kind = factories.get(name.lower())
            if (
                kind
                and isinstance(first, ast.Constant)
                and isinstance(first.value, str)
                and first.value.startswith("clave_")
            ):
                found[first.value] = kind
    return found


def exposed_names(metrics: dict[str, str]) -> set[str]:
    """The series names prometheus_client exposes for each metric (suffixes included)."""
    names: set[str] = set()
    for name, kind in metrics.items():
        if kind == "counter":
            base = name.removesuffix("_total")
            names |= {f"{base}_total", f"{base}_created"}
        elif kind == "histogram":
            names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count", f"{name}_created"}
        elif kind == "summary":
            names |= {name, f"{name}_sum", f"{name}_count", f"{name}_created"}
        else:
            names.add(name)
    return names


def base_name(series: str, metrics: dict[str, str]) -> str:
    """The metric a series name belongs to (`x_bucket` -> `x`, `y_total` -> `y_total`)."""
    for name in metrics:
        if series in exposed_names({name: metrics[name]}):
            return name
    return series


def alert_blocks() -> dict[str, str]:
    """alert name -> the text of its rule, split on `- alert:` lines."""
    blocks: dict[str, str] = {}
    current: str | None = None
    for line in ALERTS.read_text(encoding="utf-8").splitlines():
        m = re.match(r"\s*- alert:\s*(\S+)\s*$", line)
        if m:
            current = m.group(1)
            assert current not in blocks, f"alert {current} defined twice"
            blocks[current] = ""
        elif re.match(r"\s*- (name|record):", line):
            current = None
        elif current is not None:
            blocks[current] += line + "\n"
    return blocks


def rule_exprs() -> list[str]:
    """Every `expr:` of alerts.yml, inline or as an indented block scalar."""
    exprs: list[str] = []
    lines = ALERTS.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        m = re.match(r"(\s*)expr:\s*(.*)$", lines[i])
        i += 1
        if not m:
            continue
        indent, rest = len(m.group(1)), m.group(2).strip()
        if rest not in {"|", ">", "|-", ">-"}:
            exprs.append(rest)
            continue
        body: list[str] = []
        while i < len(lines) and (
            not lines[i].strip() or len(lines[i]) - len(lines[i].lstrip()) > indent
        ):
            body.append(lines[i])
            i += 1
        exprs.append("\n".join(body))
    return exprs


def without_annotations(text: str) -> str:
    """The rule file minus its `annotations:` mappings (promtool's unit tests compare them)."""
    out: list[str] = []
    skip_deeper_than: int | None = None
    for line in text.splitlines(keepends=True):
        indent = len(line) - len(line.lstrip())
        if skip_deeper_than is not None:
            if not line.strip() or indent > skip_deeper_than:
                continue
            skip_deeper_than = None
        if line.strip() == "annotations:":
            skip_deeper_than = indent
            continue
        out.append(line)
    return "".join(out)


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text(encoding="utf-8"))


def walk_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from walk_panels(panel.get("panels", []))


def dashboard_targets() -> list[tuple[str, dict[str, Any]]]:
    return [
        (panel["title"], target)
        for panel in walk_panels(dashboard()["panels"])
        for target in panel.get("targets", [])
    ]


def dashboard_queries() -> list[str]:
    queries = [target["expr"] for _, target in dashboard_targets()]
    for var in dashboard()["templating"]["list"]:
        query = var.get("query")
        if isinstance(query, dict):
            query = query.get("query")
        if var.get("type") == "query" and isinstance(query, str):
            queries.append(query)
    return queries


def label_problems(expr: str) -> list[str]:
    """Labels an expression groups, joins or filters by that are not on the allow list."""
    problems: list[str] = []
    for clause, labels in GROUPING.findall(expr):
        if clause in {"without", "ignoring"}:
            problems.append(f"`{clause}(...)` keeps labels nobody vetted; use by/on")
        for label in filter(None, (part.strip() for part in labels.split(","))):
            if label not in ALLOWED_LABELS:
                problems.append(f"{clause} ({label})")
    for selector in SELECTOR.findall(expr):
        for label in MATCHER.findall(selector):
            if label not in ALLOWED_LABELS:
                problems.append(f"matcher on {label}")
    return problems


def slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def readme_anchors() -> set[str]:
    return {
        slug(m.group(1))
        for m in re.finditer(r"^#{1,6}\s+(.+?)\s*#*\s*$", README.read_text(encoding="utf-8"), re.M)
    }


# ------------------------------------------------------------------ code metrics


def test_code_metrics_are_found() -> None:
    # Guards the collector itself: if it silently found nothing, every check below would pass.
    metrics = code_metrics()
    assert metrics.get("clave_events_consumed_total") == "counter"
    assert metrics.get("clave_handler_seconds") == "histogram"
    assert metrics.get("clave_outbox_pending") == "gauge"
    assert metrics.get("clave_mails_failed_total") == "counter"
    assert metrics.get("clave_event_to_mail_seconds") == "histogram"
    assert len(metrics) >= 15, sorted(metrics)


# ------------------------------------------------------------------ prometheus.yml


def test_config_scrapes_the_four_services_with_a_service_label() -> None:
    from tools.workbench import WorkbenchSettings

    text = CONFIG.read_text(encoding="utf-8")
    assert re.search(r"^\s*scrape_interval:\s*5s\s*$", text, re.M), "scrape every 5 s"
    assert re.search(r"^rule_files:\s*\n\s*-\s*alerts\.yml\s*$", text, re.M), (
        "rule_files: [alerts.yml]"
    )
    assert re.search(r"^\s*- job_name:\s*clave\s*$", text, re.M), 'the alerts select job="clave"'
    for service, port in SERVICE_PORTS.items():
        assert WorkbenchSettings.model_fields[f"{service}_metrics_port"].default == port, (
            f"{service}'s metrics port moved: update prometheus.yml and this test"
        )
        pattern = (
            rf'- targets:\s*\[\s*"127\.0\.0\.1:{port}"\s*\]\s*\n'
            rf"\s*labels:\s*\n\s*service:\s*{service}\s*$"
        )
        assert re.search(pattern, text, re.M), (
            f"{service} target 127.0.0.1:{port} with service={service}"
        )


@needs_promtool
def test_promtool_accepts_the_config() -> None:
    result = promtool("check", "config", CONFIG)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 rule files found" in result.stdout, result.stdout


# ------------------------------------------------------------------ alerts.yml


@needs_promtool
def test_promtool_accepts_the_rules() -> None:
    result = promtool("check", "rules", ALERTS)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{len(alert_blocks())} rules found" in result.stdout, result.stdout


def test_every_alert_has_for_severity_and_annotations() -> None:
    blocks = alert_blocks()
    assert len(blocks) >= 12, sorted(blocks)
    anchors = readme_anchors()
    for name, block in blocks.items():
        assert re.search(r"^\s+for:\s*\d+[smh]\s*$", block, re.M), f"{name}: no `for:`"
        assert re.search(r"^\s+severity:\s*(critical|warning)\s*$", block, re.M), (
            f"{name}: severity"
        )
        for key in ("summary", "description", "runbook_url"):
            assert re.search(rf"^\s+{key}:\s*\S", block, re.M), f"{name}: no {key} annotation"
        runbook = re.search(r"runbook_url:\s*\"?([^\"\s]+)", block)
        assert runbook is not None
        path, _, anchor = runbook.group(1).partition("#")
        assert path == "deploy/prometheus/README.md", f"{name}: runbook {path}"
        assert anchor in anchors, f"{name}: README.md has no section #{anchor}"


def test_alerts_cover_what_operators_must_hear_about() -> None:
    used = {base_name(n, code_metrics()) for n in METRIC_NAME.findall(" ".join(rule_exprs()))}
    expected = {
        "clave_dlq_messages_total",
        "clave_mails_failed_total",
        "clave_mails_sent_total",
        "clave_mails_retried_total",
        "clave_consumer_lag_messages",
        "clave_consumer_stalled_partitions",
        "clave_outbox_pending",
        "clave_identity_lockouts_total",
        "clave_identity_requests_total",
        "clave_event_to_mail_seconds",
        "clave_reset_to_key_changed_seconds",
        "clave_handler_failures_total",
        "clave_relay_errors_total",
        "clave_audit_chain_breaks_total",
    }
    assert expected <= used, f"no alert on {sorted(expected - used)}"
    assert any(re.search(r"\bup\{[^}]*\}\s*==\s*0", e) for e in rule_exprs()), (
        "no service-down alert"
    )


# Incidents the alerts are written for, replayed through `promtool test rules`
# (1-minute samples; "0+5x20" counts up by 5 a minute, "_" is a missing sample).
T = 'job="clave"'
IDENTITY = f'{T}, instance="127.0.0.1:9401", service="identity"'
TOKENS = f'{T}, instance="127.0.0.1:9402", service="tokens"'
NOTIFIER = f'{T}, instance="127.0.0.1:9403", service="notifier"'
PASSWORD = f'{T}, instance="127.0.0.1:9404", service="password"'
AUDIT = f'{T}, instance="127.0.0.1:9405", service="audit"'
LINK = 'kind="recovery_link"'


def s(metric: str, labels: str, values: str) -> dict[str, str]:
    return {"series": f"{metric}{{{labels}}}", "values": values}


def ups(values: str = "1x40") -> list[dict[str, str]]:
    return [s("up", svc, values) for svc in (IDENTITY, TOKENS, NOTIFIER, PASSWORD, AUDIT)]


def buckets(metric: str, labels: str, counts: dict[str, str]) -> list[dict[str, str]]:
    return [s(f"{metric}_bucket", f'{labels}, le="{le}"', v) for le, v in counts.items()]


QUIET_DAY = [
    *ups(),
    s("clave_events_consumed_total", f'{IDENTITY}, topic="recovery.requests", type="x"', "0+20x40"),
    # An old dead letter, from before Prometheus started: not news.
    s("clave_dlq_messages_total", f'{IDENTITY}, topic="recovery.requests", reason="x"', "3x40"),
    s("clave_mails_sent_total", f"{NOTIFIER}, {LINK}", "0+10x40"),
    s("clave_mails_failed_total", f"{NOTIFIER}, {LINK}", "1x40"),
    # 15 retries in 15 minutes, but against 150 mails sent: normal.
    s("clave_mails_retried_total", f"{NOTIFIER}, {LINK}", "0+1x40"),
    s("clave_identity_lockouts_total", IDENTITY, "0+1x40"),
    s("clave_identity_requests_total", f'{IDENTITY}, result="verified"', "0+20x40"),
    s("clave_identity_requests_total", f'{IDENTITY}, result="answers_wrong"', "0+3x40"),
    s("clave_outbox_pending", IDENTITY, "0x40"),
    s("clave_outbox_published_total", IDENTITY, "0+20x40"),
    s("clave_relay_errors_total", IDENTITY, "0x40"),
    s("clave_background_task_up", f'{NOTIFIER}, task="mail-sender"', "1x40"),
    # An item parked before Prometheus started: not news.
    s("clave_loop_items_parked_total", f'{NOTIFIER}, loop="mail-sender", reason="x"', "2x40"),
    # The read model's break counters exist from its start, at 0.
    s("clave_audit_chain_breaks_total", f'{AUDIT}, reason="unknown_key"', "0x40"),
    s("clave_audit_chain_breaks_total", f'{AUDIT}, reason="sequence"', "0x40"),
    s("clave_consumer_lag_messages", f'{NOTIFIER}, topic="tokens.issued"', "10x40"),
    # The lag monitor reports every consumed topic, at 0 while its partitions make progress.
    s("clave_consumer_stalled_partitions", f'{NOTIFIER}, topic="tokens.issued"', "0x40"),
    s("clave_consumer_stalled_partitions", f'{IDENTITY}, topic="recovery.requests"', "0x40"),
    *buckets(
        "clave_event_to_mail_seconds",
        f"{NOTIFIER}, {LINK}",
        {"1": "0+10x40", "30": "0+10x40", "+Inf": "0+10x40"},
    ),
    *buckets(
        "clave_reset_to_key_changed_seconds",
        PASSWORD,
        {"1": "0+5x40", "10": "0+5x40", "+Inf": "0+5x40"},
    ),
]

# The first dead letter of a topic/reason after a restart: a new series that starts at 1.
FIRST_DEAD_LETTER = [
    *ups(),
    s("clave_dlq_messages_total", f'{NOTIFIER}, topic="t", reason="undecryptable"', "_x12 1x28"),
]

# A forged event reaches the read model in the minute the audit service restarted: its
# counters come back with the break already counted, after a gap in the scrapes.
BREAK_AT_RESTART = [
    *(s("up", svc, "1x40") for svc in (IDENTITY, TOKENS, NOTIFIER, PASSWORD)),
    s("up", AUDIT, "1x19 0x2 1x19"),
    s("clave_audit_chain_breaks_total", f'{AUDIT}, reason="bad_signature"', "0x19 _x2 1x19"),
]

# A consumer of tokens stops serving one partition of recovery.resets: the lag monitor of
# both instances reports it from minute 5 (one minute after the last commit) to minute 19,
# when the stuck instance was restarted.
STALLED_PARTITION = [
    s("clave_consumer_stalled_partitions", f'{TOKENS}, topic="recovery.resets"', "0x5 1x14 0x20"),
    s(
        "clave_consumer_stalled_partitions",
        f'{T}, instance="127.0.0.1:19402", service="tokens", topic="recovery.resets"',
        "0x5 1x14 0x20",
    ),
    s("clave_consumer_stalled_partitions", f'{TOKENS}, topic="tokens.redeemed"', "0x40"),
]

# (alert, input series, evaluation time, labels of the alert expected to fire then)
INCIDENTS: list[tuple[str, list[dict[str, str]], str, dict[str, str]]] = [
    (
        "ClaveServiceDown",
        [s("up", TOKENS, "1x5 0x10")],
        "9m",
        {"job": "clave", "instance": "127.0.0.1:9402", "service": "tokens"},
    ),
    (
        "ClaveDeadLetters",
        FIRST_DEAD_LETTER,
        "14m",
        {"service": "notifier", "topic": "t", "reason": "undecryptable"},
    ),
    (
        "ClaveDeadLetters",
        [*ups(), s("clave_dlq_messages_total", f'{IDENTITY}, topic="t", reason="r"', "0x10 2x30")],
        "15m",
        {"service": "identity", "topic": "t", "reason": "r"},
    ),
    (
        "ClaveHandlerFailing",
        [s("clave_handler_failures_total", f'{TOKENS}, topic="t", error="E"', "_x5 1+12x30")],
        "25m",
        {"service": "tokens", "topic": "t", "error": "E"},
    ),
    (
        "ClaveConsumerLagHigh",
        [s("clave_consumer_lag_messages", f'{NOTIFIER}, topic="t"', "10x5 5000x20")],
        "15m",
        {"service": "notifier", "topic": "t"},
    ),
    (
        "ClaveConsumerStalled",  # one partition stops being served at minute 5
        STALLED_PARTITION,
        "9m",
        {"service": "tokens", "topic": "recovery.resets"},
    ),
    (
        "ClaveOutboxBacklog",  # still publishing, but not keeping up
        [
            s("clave_outbox_pending", IDENTITY, "0x5 800x20"),
            s("clave_outbox_published_total", IDENTITY, "0+600x30"),
        ],
        "15m",
        {"service": "identity"},
    ),
    (
        "ClaveOutboxStalled",  # stops publishing at minute 5
        [
            s("clave_outbox_pending", TOKENS, "600x30"),
            s("clave_outbox_published_total", TOKENS, "0+50x5 250x25"),
        ],
        "25m",
        {"service": "tokens"},
    ),
    (
        "ClaveRelayErrors",
        [s("clave_relay_errors_total", PASSWORD, "0x5 0+12x25")],
        "20m",
        {"service": "password"},
    ),
    (
        "ClaveBackgroundTaskDied",
        [*ups(), s("clave_background_task_up", f'{NOTIFIER}, task="mail-sender"', "1x5 0x20")],
        "10m",
        {"service": "notifier", "task": "mail-sender"},
    ),
    (
        "ClaveLoopItemsParked",  # the first one after a restart: a new series at 1
        [*ups(), s("clave_loop_items_parked_total", f'{NOTIFIER}, loop="relay", reason="r"', "_x12 1x28")],
        "14m",
        {"service": "notifier", "loop": "relay", "reason": "r"},
    ),
    (
        "ClaveMailFailureRatioHigh",  # 1 in 11
        [
            s("clave_mails_sent_total", f"{NOTIFIER}, {LINK}", "0+10x30"),
            s("clave_mails_failed_total", f"{NOTIFIER}, {LINK}", "0+1x30"),
        ],
        "25m",
        {},
    ),
    (
        "ClaveMailFailureRatioHigh",  # nothing gets through: there is no `sent` series at all
        [s("clave_mails_failed_total", f'{NOTIFIER}, kind="password_changed"', "0+1x30")],
        "25m",
        {},
    ),
    (
        "ClaveMailRetriesSpiking",
        [
            s("clave_mails_sent_total", f"{NOTIFIER}, {LINK}", "0+2x30"),
            s("clave_mails_retried_total", f"{NOTIFIER}, {LINK}", "0+3x30"),
        ],
        "25m",
        {},
    ),
    (
        "ClaveLockoutSpike",
        [s("clave_identity_lockouts_total", IDENTITY, "0x5 0+5x20")],
        "15m",
        {},
    ),
    (
        "ClaveRecoveryAbuse",
        [s("clave_identity_requests_total", f'{IDENTITY}, result="rate_limited"', "0+20x30")],
        "20m",
        {"result": "rate_limited"},
    ),
    (
        "ClaveAuditChainBroken",  # one forged event, counted by the running read model
        [*ups(), s("clave_audit_chain_breaks_total", f'{AUDIT}, reason="unknown_key"', "0x10 1x30")],
        "12m",
        {"service": "audit", "reason": "unknown_key"},
    ),
    (
        "ClaveAuditChainBroken",
        BREAK_AT_RESTART,
        "23m",
        {"service": "audit", "reason": "bad_signature"},
    ),
    (
        "ClaveMailLatencyHigh",  # every mail between 30 and 60 s
        buckets(
            "clave_event_to_mail_seconds",
            f"{NOTIFIER}, {LINK}",
            {"1": "0x40", "30": "0x40", "60": "0+10x40", "+Inf": "0+10x40"},
        ),
        "25m",
        {"kind": "recovery_link"},
    ),
    (
        "ClaveKeyChangeLatencyHigh",  # every key change between 10 and 30 s
        buckets(
            "clave_reset_to_key_changed_seconds",
            PASSWORD,
            {"1": "0x40", "10": "0x40", "30": "0+5x40", "+Inf": "0+5x40"},
        ),
        "25m",
        {},
    ),
]


def severity_of(block: str) -> str:
    m = re.search(r"severity:\s*(\w+)", block)
    assert m is not None
    return m.group(1)


@needs_promtool
def test_alerts_fire_on_their_incidents_and_stay_quiet_otherwise(tmp_path: Path) -> None:
    blocks = alert_blocks()
    assert {name for name, *_ in INCIDENTS} == set(blocks), "every alert needs an incident here"
    rules = tmp_path / "rules.yml"
    rules.write_text(without_annotations(ALERTS.read_text(encoding="utf-8")), encoding="utf-8")
    tests: list[dict[str, Any]] = [
        {
            "name": "a quiet day fires nothing (not even right after Prometheus starts)",
            "interval": "1m",
            "input_series": QUIET_DAY,
            "alert_rule_test": [
                {"eval_time": at, "alertname": name, "exp_alerts": []}
                for at in ("5m", "39m")
                for name in blocks
            ],
        }
    ]
    for name, series, at, labels in INCIDENTS:
        tests.append(
            {
                "name": f"{name} at {at}",
                "interval": "1m",
                "input_series": series,
                "alert_rule_test": [
                    {
                        "eval_time": at,
                        "alertname": name,
                        "exp_alerts": [
                            {"exp_labels": {**labels, "severity": severity_of(blocks[name])}}
                        ],
                    }
                ],
            }
        )
    # A chain break stops alerting once it is 15 minutes old and nothing new came (the
    # break itself stays recorded in the read model's chain_breaks collection).
    tests.append(
        {
            "name": "ClaveAuditChainBroken resolves",
            "interval": "1m",
            "input_series": [
                *ups(),
                s("clave_audit_chain_breaks_total", f'{AUDIT}, reason="unknown_key"', "0x10 1x30"),
            ],
            "alert_rule_test": [
                {"eval_time": "30m", "alertname": "ClaveAuditChainBroken", "exp_alerts": []}
            ],
        }
    )
    # The first dead letter stops alerting once it is 10 minutes old and nothing new came.
    tests.append(
        {
            "name": "ClaveDeadLetters resolves",
            "interval": "1m",
            "input_series": FIRST_DEAD_LETTER,
            "alert_rule_test": [
                {"eval_time": "35m", "alertname": "ClaveDeadLetters", "exp_alerts": []}
            ],
        }
    )
    # A stalled partition pages only once it has stayed stalled for the rule's `for:` (a
    # consumer that catches up within it does not), and stops once it is served again.
    tests.append(
        {
            "name": "ClaveConsumerStalled waits for its duration, then resolves",
            "interval": "1m",
            "input_series": STALLED_PARTITION,
            "alert_rule_test": [
                {"eval_time": at, "alertname": "ClaveConsumerStalled", "exp_alerts": []}
                for at in ("4m", "7m", "21m")
            ],
        }
    )
    spec = tmp_path / "alerts_test.yml"  # JSON is YAML: no YAML writer needed
    spec.write_text(
        json.dumps(
            {"rule_files": [str(rules)], "evaluation_interval": "1m", "tests": tests}, indent=1
        ),
        encoding="utf-8",
    )
    result = promtool("test", "rules", spec, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


# ------------------------------------------------------------------ dashboard


def test_dashboard_is_grafana_json_with_a_prometheus_datasource_variable() -> None:
    board = dashboard()
    assert board["uid"] and board["title"]
    assert board["schemaVersion"] >= 36
    variables = {v["name"]: v for v in board["templating"]["list"]}
    ds = variables["DS_PROMETHEUS"]
    assert (ds["type"], ds["query"]) == ("datasource", "prometheus")
    ids = [p["id"] for p in walk_panels(board["panels"])]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    ref = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
    for panel in walk_panels(board["panels"]):
        assert {"x", "y", "w", "h"} <= panel["gridPos"].keys(), panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == ref, f"{panel['title']}: datasource"
        assert panel["targets"], f"{panel['title']}: no query"
        refids = [t["refId"] for t in panel["targets"]]
        assert len(refids) == len(set(refids)), f"{panel['title']}: refIds"
        for target in panel["targets"]:
            assert target["datasource"] == ref, f"{panel['title']}: target datasource"
            assert target["expr"].strip(), f"{panel['title']}: empty query"


def test_dashboard_shows_every_metric_the_code_defines() -> None:
    metrics = code_metrics()
    shown = {base_name(n, metrics) for n in METRIC_NAME.findall(" ".join(dashboard_queries()))}
    missing = sorted(set(metrics) - shown)
    assert not missing, f"add a panel to {DASHBOARD.relative_to(ROOT)} for: {missing}"


# ------------------------------------------------------------------ both


@pytest.mark.parametrize("source", ["alerts", "dashboard"])
def test_only_metric_names_the_code_defines(source: str) -> None:
    text = (
        ALERTS.read_text(encoding="utf-8") if source == "alerts" else DASHBOARD.read_text("utf-8")
    )
    known = exposed_names(code_metrics())
    used = set(METRIC_NAME.findall(text))
    assert used, "no clave_ metric found at all"
    unknown = sorted(used - known)
    assert not unknown, f"{source} uses metrics the code does not define: {unknown}"
    queries = rule_exprs() if source == "alerts" else dashboard_queries()
    others = {
        word
        for query in queries
        for word in re.findall(r"\b([a-z_][a-z0-9_]*)\s*\{", query)
        if not word.startswith("clave_")
    }
    assert others <= PROMETHEUS_METRICS, f"{source}: unexpected metrics {sorted(others)}"


def test_nothing_groups_by_a_label_that_could_carry_personal_data() -> None:
    problems: list[str] = []
    for expr in rule_exprs():
        problems += [f"alerts.yml: {p} in {' '.join(expr.split())}" for p in label_problems(expr)]
    for label in TEMPLATE_LABEL.findall(ALERTS.read_text(encoding="utf-8")):
        if label not in ALLOWED_LABELS:
            problems.append(f"alerts.yml: annotation prints $labels.{label}")
    for title, target in dashboard_targets():
        problems += [f"dashboard {title!r}: {p}" for p in label_problems(target["expr"])]
        for label in LEGEND_LABEL.findall(target.get("legendFormat", "")):
            if label not in ALLOWED_LABELS:
                problems.append(f"dashboard {title!r}: legend prints {{{{{label}}}}}")
    for query in dashboard_queries():
        problems += [f"dashboard variable: {p}" for p in label_problems(query)]
    assert not problems, "\n".join(problems)


def test_label_check_catches_personal_labels() -> None:
    # The checker itself: a grouping by national_id or email must be reported.
    assert label_problems("sum by (topic) (rate(clave_events_consumed_total[5m]))") == []
    assert label_problems("sum by (national_id) (rate(clave_events_consumed_total[5m]))")
    assert label_problems('count(clave_mails_sent_total{email=~".+"})')
    assert label_problems("sum without (le) (clave_handler_seconds_bucket)")
    assert label_problems("a * on (account_id) group_left (email) b")
