"""The Grafana dashboards as files: generated, complete, and naming only metrics that exist.

Their queries are proven against a real Prometheus in test_dashboards_live.py; these checks
need no cluster.
"""

from __future__ import annotations

import importlib.util
import json
import pathlib
import re
import subprocess
import sys

import pytest
import yaml

from deploy import monitoring
from tests.deploy import promql

REPO = pathlib.Path(__file__).resolve().parents[2]
GRAFANA_DIR = REPO / "deploy" / "grafana"
DASHBOARDS_DIR = GRAFANA_DIR / "dashboards"
PROMETHEUS_DIR = REPO / "deploy" / "prometheus"
GENERATE_SECONDS_MAX = 60
GENERATOR_MODULE = "corebank_grafana_generate"
VARIABLES = ("datasource", "job", "instance")
# Metrics corebank does not define but may read: Prometheus' own, etcd's, postgres_exporter's,
# and prometheus_client's process collector (metrics.md's "Every process").
FOREIGN_METRIC = re.compile(r"up|etcd_\w+|pg_\w+|process_\w+")
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


def load_generator():
    """deploy/grafana/generate.py (a script beside the JSON it writes, not a package)."""
    if GENERATOR_MODULE not in sys.modules:
        spec = importlib.util.spec_from_file_location(GENERATOR_MODULE, GRAFANA_DIR / "generate.py")
        sys.modules[GENERATOR_MODULE] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[GENERATOR_MODULE])
    return sys.modules[GENERATOR_MODULE]


def dashboards() -> dict[str, dict]:
    return {path.stem: json.loads(path.read_text()) for path in sorted(DASHBOARDS_DIR.glob("*.json"))}


def panels(board: dict) -> list[dict]:
    return [panel for panel in board["panels"] if panel["type"] != "row"]


def documented_metrics() -> tuple[set[str], tuple[str, ...]]:
    """(names, name prefixes) of metrics.md's tables; a histogram's series names included."""
    names, prefixes = set(), []
    for name in re.findall(r"^\| `([a-z_:*]+)`", (PROMETHEUS_DIR / "metrics.md").read_text(), re.MULTILINE):
        if name.endswith("*"):
            prefixes.append(name.rstrip("*"))
        else:
            names |= {name, *(name + suffix for suffix in HISTOGRAM_SUFFIXES)}
    return names, tuple(prefixes)


def recording_rules() -> dict[str, str]:
    rules = {}
    for path in sorted((PROMETHEUS_DIR / "rules").glob("*.yml")):
        for group in yaml.safe_load(path.read_text())["groups"]:
            rules.update({rule["record"]: rule["expr"] for rule in group["rules"] if "record" in rule})
    return rules


def test_the_committed_json_is_what_the_generator_makes():
    answer = subprocess.run(
        [sys.executable, str(GRAFANA_DIR / "generate.py"), "--check"], capture_output=True, text=True, timeout=GENERATE_SECONDS_MAX,
    )
    assert answer.returncode == 0, answer.stderr
    assert set(dashboards()) == set(load_generator().DASHBOARDS)


def test_the_five_views_are_there_with_unique_uids_and_panel_ids():
    boards = dashboards()
    assert set(boards) == {"overview", "coordinator", "shards", "control-plane", "integrity"}
    assert len({board["uid"] for board in boards.values()}) == len(boards)
    for name, board in boards.items():
        ids = [panel["id"] for panel in board["panels"]]
        assert len(ids) == len(set(ids)) and 0 not in ids, name


@pytest.mark.parametrize("name", ["overview", "coordinator", "shards", "control-plane", "integrity"])
def test_every_panel_has_a_title_a_unit_a_description_and_the_variables(name):
    board = dashboards()[name]
    variables = {variable["name"]: variable for variable in board["templating"]["list"]}
    assert tuple(variables) == VARIABLES
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert '$job' in variables["instance"]["query"]
    problems = []
    for panel in panels(board):
        title = panel.get("title") or f"panel {panel['id']}"
        if not panel.get("description") or not panel.get("title"):
            problems.append(f"{title}: no title or description")
        if not panel["fieldConfig"]["defaults"].get("unit"):
            problems.append(f"{title}: no unit")
        if panel["datasource"]["uid"] != "${datasource}" or not panel["targets"]:
            problems.append(f"{title}: not on $datasource, or no query")
        for target in panel["targets"]:
            if target["datasource"]["uid"] != "${datasource}":
                problems.append(f"{title}: query {target['refId']} not on $datasource")
    assert problems == []


@pytest.mark.parametrize("name", ["overview", "coordinator", "shards", "control-plane", "integrity"])
def test_every_query_selects_job_and_instance_and_rates_over_the_rate_interval(name):
    slo_window = load_generator().SLO_WINDOW
    recorded = set(recording_rules())
    problems = []
    for panel in panels(dashboards()[name]):
        for target in panel["targets"]:
            for selector in promql.selectors(target["expr"]):
                where = f"{panel['title']}/{target['refId']} {selector.metric}"
                if selector.metric in recorded:
                    continue  # cluster-wide: a recording rule keeps no job or instance
                if 'job=~"$job"' not in selector.matchers.split(",") or 'instance=~"$instance"' not in selector.matchers.split(","):
                    problems.append(f"{where}: does not select job=~\"$job\" and instance=~\"$instance\"")
                # The SLO budget reads its SLO's own window, by definition; every rate reads $__rate_interval.
                if selector.range and selector.range not in ("$__rate_interval", slo_window):
                    problems.append(f"{where}: range [{selector.range}]")
                if selector.range == slo_window and "budget" not in panel["title"]:
                    problems.append(f"{where}: the SLO window outside the budget panel")
    assert problems == []


def test_dashboards_name_only_documented_metrics_and_recording_rules():
    names, prefixes = documented_metrics()
    recorded = set(recording_rules())
    unknown = {
        f"{name}: {selector.metric}"
        for name, board in dashboards().items()
        for panel in panels(board)
        for target in panel["targets"]
        for selector in promql.selectors(target["expr"])
        if not (selector.metric in names or selector.metric in recorded or selector.metric.startswith(prefixes) or FOREIGN_METRIC.fullmatch(selector.metric))
    }
    assert unknown == set()


def test_the_slo_of_the_dashboards_is_the_slo_of_the_rules():
    generator, rules = load_generator(), recording_rules()
    assert f'code=~"{generator.SLO_FAILED_CODES}"' in rules["corebank:grpc_errors:rate5m"]
    assert f'reason=~"{generator.SLO_FAILED_REASONS}"' in rules["corebank:grpc_errors:rate5m"]
    assert rules["corebank:slo_latency:threshold_seconds"].strip() == f"vector({generator.SLO_LATENCY_THRESHOLD_SECONDS})"
    latency = rules["corebank:slo_latency_slow:ratio_rate5m"]
    assert f'service="{generator.SLO_LATENCY_SERVICE}"' in latency and f'method="{generator.SLO_LATENCY_METHOD}"' in latency
    assert f"over {generator.SLO_WINDOW.replace('d', ' days')}" in (PROMETHEUS_DIR / "rules" / "corebank_recording.yml").read_text()


def test_provisioning_points_grafana_at_prometheus_and_the_dashboards():
    datasources = yaml.safe_load((GRAFANA_DIR / "provisioning" / "datasources" / "corebank.yml").read_text())["datasources"]
    assert [(source["type"], source["url"]) for source in datasources] == [("prometheus", "${COREBANK_PROMETHEUS_URL}")]
    # $__rate_interval is four scrape intervals: Grafana must know Prometheus' scrape interval.
    assert datasources[0]["jsonData"]["timeInterval"] == f"{monitoring.SCRAPE_INTERVAL_SECONDS}s"
    providers = yaml.safe_load((GRAFANA_DIR / "provisioning" / "dashboards" / "corebank.yml").read_text())["providers"]
    assert [(provider["type"], provider["options"]["path"]) for provider in providers] == [("file", "${COREBANK_GRAFANA_DASHBOARDS}")]
