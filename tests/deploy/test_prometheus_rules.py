"""The Prometheus rules (deploy/prometheus/rules/) pass `promtool check rules` and their unit
tests (deploy/prometheus/tests/), and hold together: every alert has a severity, a summary, a
description and a runbook section (deploy/runbooks.md), and a promtool test where it fires
and one where it stays silent; the rules use only the metrics of deploy/prometheus/metrics.md;
every SLO window is the same expression; the latency SLO's threshold is a histogram bucket and
the load test's p99 bound."""

import pathlib
import re
import shutil
import subprocess

import pytest
import yaml
from prometheus_client.utils import floatToGoString

from loadtest import run as loadtest_run
from services.api.metrics import LATENCY_BUCKETS_SECONDS, SLO_LATENCY_THRESHOLD_SECONDS

REPO = pathlib.Path(__file__).resolve().parents[2]
PROMETHEUS_DIR = REPO / "deploy" / "prometheus"
RULE_FILES = sorted((PROMETHEUS_DIR / "rules").glob("*.yml"))
TEST_FILES = sorted((PROMETHEUS_DIR / "tests").glob("*.yml"))
RUNBOOKS = REPO / "deploy" / "runbooks.md"
METRICS_MD = PROMETHEUS_DIR / "metrics.md"
AUDIT_LOG_METRICS = REPO / "services" / "audit_log" / "metrics.py"

PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed (apt-get install prometheus); CI installs it")
PROMTOOL_SECONDS_MAX = 120

SEVERITIES = {"page", "ticket", "none"}
# The Google SRE workbook's windows of multi-window, multi-burn-rate alerts.
SLO_WINDOWS = ("5m", "30m", "1h", "2h", "6h", "1d", "3d")
# Metrics that are not corebank's: Prometheus' own `up`, postgres_exporter's and etcd's.
FOREIGN_METRICS = {"up", "pg_up"}
FOREIGN_METRIC_PREFIXES = ("etcd_",)
# level:metric:operations (https://prometheus.io/docs/practices/rules/).
RECORDING_NAME = re.compile(r"^[a-z_]+:[a-z0-9_]+:[a-z0-9_]+$")
PROMQL_WORDS = {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset", "inf", "nan"}


def rule_groups() -> list[dict]:
    return [group for path in RULE_FILES for group in yaml.safe_load(path.read_text())["groups"]]


def alerts() -> list[dict]:
    return [rule for group in rule_groups() for rule in group["rules"] if "alert" in rule]


def recording_rules() -> dict[str, str]:
    return {rule["record"]: rule["expr"] for group in rule_groups() for rule in group["rules"] if "record" in rule}


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def runbook_headings() -> list[str]:
    """Headings outside fenced code (a shell comment in a code block is no heading)."""
    headings, in_code = [], False
    for line in RUNBOOKS.read_text().splitlines():
        if line.startswith("```"):
            in_code = not in_code
        elif not in_code and (match := re.match(r"^#{1,6} (.+)$", line)):
            headings.append(match.group(1))
    return headings


def metric_names_in(expr: str) -> set[str]:
    """The metric names an expression selects: what is left once strings, label matchers,
    ranges, grouping clauses, numbers, functions and keywords are taken out."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)
    expr = re.sub(r"\{[^}]*\}|\[[^\]]*\]", " ", expr)
    expr = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)
    expr = re.sub(r"\boffset\s+\w+", " ", expr)
    names = set()
    for match in re.finditer(r"(?<![\w:.])([a-zA-Z_:][a-zA-Z0-9_:]*)(\s*\()?", expr):
        name, is_call = match.group(1), match.group(2)
        if not is_call and name.lower() not in PROMQL_WORDS:
            names.add(name)
    return names


def documented_metrics() -> set[str]:
    """metrics.md's names (a histogram's series too), and the audit log writer's names that its
    `corebank_audit_log_*` row refers to services/audit_log/metrics.py for."""
    names = set()
    for name, kind in re.findall(r"^\| `([a-z_]+)` \| (\w+)", METRICS_MD.read_text(), flags=re.MULTILINE):
        names.add(name)
        if kind == "histogram":
            names |= {f"{name}_bucket", f"{name}_count", f"{name}_sum"}
    for kind, name in re.findall(r'\b(Counter|Gauge)\(\s*"(corebank_audit_log_\w+)"', AUDIT_LOG_METRICS.read_text()):
        names.add(f"{name}_total" if kind == "Counter" else name)
    return names


def promtool_cases() -> list[tuple[str, str, bool]]:
    """(test name, alert name, whether it is expected to fire) of every alert_rule_test."""
    cases = []
    for path in TEST_FILES:
        for test in yaml.safe_load(path.read_text())["tests"]:
            for case in test.get("alert_rule_test", []):
                cases.append((test.get("name", path.name), case["alertname"], bool(case.get("exp_alerts"))))
    return cases


def run_promtool(*arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [PROMTOOL, *arguments], cwd=REPO, capture_output=True, text=True, timeout=PROMTOOL_SECONDS_MAX, check=False
    )


def test_there_are_rules_and_tests():
    assert RULE_FILES and TEST_FILES
    assert alerts() and recording_rules()


@needs_promtool
def test_promtool_accepts_the_rules():
    checked = run_promtool("check", "rules", *map(str, RULE_FILES))
    assert checked.returncode == 0, checked.stdout + checked.stderr


@needs_promtool
def test_promtool_unit_tests_pass():
    tested = run_promtool("test", "rules", *map(str, TEST_FILES))
    assert tested.returncode == 0, tested.stdout + tested.stderr


def test_every_alert_has_a_severity_a_summary_a_description_and_its_runbook_section():
    anchors = {github_anchor(heading) for heading in runbook_headings()}
    names = [rule["alert"] for rule in alerts()]
    assert len(names) == len(set(names)), "two alerts share a name"
    for rule in alerts():
        name = rule["alert"]
        assert rule.get("labels", {}).get("severity") in SEVERITIES, name
        annotations = rule.get("annotations", {})
        assert annotations.get("summary") and annotations.get("description"), name
        assert annotations.get("runbook_url") == f"deploy/runbooks.md#{name.lower()}", name
        assert name.lower() in anchors, f"deploy/runbooks.md has no section {name}"


def test_every_runbook_section_after_the_introduction_is_an_alert():
    names = {rule["alert"] for rule in alerts()}
    headings = runbook_headings()
    sections = headings[headings.index("Before you start") + 1:]
    assert set(sections) == names, f"sections without an alert: {set(sections) - names}; alerts without a section: {names - set(sections)}"


def test_every_alert_fires_in_one_promtool_test_and_stays_silent_in_another():
    cases = promtool_cases()
    fired = {alert for _, alert, fires in cases if fires}
    silent = {alert for _, alert, fires in cases if not fires}
    for rule in alerts():
        name = rule["alert"]
        assert name in fired, f"no promtool test fires {name}"
        # An always-firing alert (the Watchdog) has no silent case.
        if rule["expr"].strip() != "vector(1)":
            assert name in silent, f"no promtool test where {name} stays silent"
    unknown = {alert for _, alert, _ in cases} - {rule["alert"] for rule in alerts()}
    assert not unknown, f"promtool tests of alerts that do not exist: {unknown}"


def test_the_rules_use_only_documented_metrics():
    allowed = documented_metrics() | set(recording_rules())
    assert "corebank_grpc_requests_total" in allowed and "corebank_audit_log_write_failures_total" in allowed
    rules = [rule for group in rule_groups() for rule in group["rules"]]
    for rule in rules:
        for name in metric_names_in(rule["expr"]):
            foreign = name in FOREIGN_METRICS or name.startswith(FOREIGN_METRIC_PREFIXES)
            assert foreign or name in allowed, f"{rule.get('alert') or rule.get('record')} uses {name}, not in metrics.md"


def test_metric_names_are_read_out_of_an_expression():
    expr = 'sum by (job) (rate(a_total{code=~"X|Y"}[5m])) / on (job) group_left b offset 1h > scalar(max(c:d:e)) and absent(up{job="x"})'
    assert metric_names_in(expr) == {"a_total", "b", "c:d:e", "up"}


def test_recording_rules_are_named_level_metric_operations():
    for name in recording_rules():
        assert RECORDING_NAME.match(name), name


def test_every_slo_window_is_the_same_expression():
    """The 5m rule of each family, with its window changed, is the rule of every other window."""
    recorded = recording_rules()
    windowed = [rule["record"] for group in rule_groups() if group["name"].startswith("corebank_slo_") for rule in group["rules"] if "record" in rule]
    families = [name for name in windowed if name.endswith("5m")]
    assert {"corebank:grpc_errors:ratio_rate5m", "corebank:slo_errors:burnrate5m", "corebank:slo_latency_slow:burnrate5m"} <= set(families)
    for family in families:
        base = " ".join(recorded[family].split())
        for window in SLO_WINDOWS:
            name = family.removesuffix("5m") + window
            assert name in recorded, f"{name} is missing"
            expected = base.replace("[5m]", f"[{window}]").replace("rate5m", f"rate{window}")
            assert " ".join(recorded[name].split()) == expected, name


def test_the_slo_targets_are_recorded_once_and_the_latency_threshold_is_a_bucket():
    recorded = recording_rules()
    targets = {name: float(re.fullmatch(r"vector\(([0-9.]+)\)", recorded[name].strip()).group(1)) for name in (
        "corebank:slo_availability:target", "corebank:slo_latency:target", "corebank:slo_latency:threshold_seconds",
    )}
    threshold = targets["corebank:slo_latency:threshold_seconds"]
    assert threshold in LATENCY_BUCKETS_SECONDS
    # One number: the SLO's threshold is the p99 past which a load test fails (loadtest/run.py).
    assert threshold == SLO_LATENCY_THRESHOLD_SECONDS == loadtest_run.MAX_P99_MS_DEFAULT / 1000
    for alert in alerts():
        if alert["alert"].startswith("CorebankLatencyBudget"):
            assert f"within {threshold:g} s" in alert["annotations"]["description"], alert["alert"]
    latency_rules = [expr for name, expr in recorded.items() if name.startswith("corebank:slo_latency_slow:ratio_rate")]
    assert latency_rules
    for expr in latency_rules:
        # prometheus_client writes the `le` label as floatToGoString does.
        assert set(re.findall(r'le="([^"]*)"', expr)) == {floatToGoString(threshold)}, expr
    # The SLO rules and the alerts divide by the recorded targets, never by a copy of them.
    constants = {str(targets[name]) for name in ("corebank:slo_availability:target", "corebank:slo_latency:target")}
    slo_exprs = {name: expr for name, expr in recorded.items() if name.startswith("corebank:slo_") and name not in targets}
    slo_exprs |= {rule["alert"]: rule["expr"] for rule in alerts()}
    for name, expr in slo_exprs.items():
        assert not any(re.search(rf"(?<![\d.]){re.escape(value)}(?!\d)", expr) for value in constants), name


def test_every_exit_status_the_runbook_names_is_the_command_s_own():
    """Each `exit N` of the runbook is pinned to the constant the command returns, and there is no other."""
    from services.coordinator import operator
    from services.storage import audit

    text = RUNBOOKS.read_text()
    claims = [
        f"(exit {audit.EXIT_VIOLATIONS}: broken, {audit.EXIT_SHARD_UNREADABLE}: a shard unreadable)",
        f"Exit status {audit.EXIT_VIOLATIONS} confirms it",
        f"The on-demand audit exits {audit.EXIT_SHARD_UNREADABLE} and names the shard it cannot read",
        f"names the others (`unreachable_shards`, exit {operator.EXIT_SHARD_UNREACHABLE})",
    ]
    for claim in claims:
        assert claim in text, claim
    mentioned = re.findall(r"\bexit(?:s| status)? \d", text, flags=re.IGNORECASE)
    assert len(mentioned) == len(claims), f"an exit status the test does not pin: {mentioned}"
