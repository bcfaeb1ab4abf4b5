"""The monitoring `up` starts with the cluster: Prometheus scrapes every process, Alertmanager answers.

Against the session's test cluster (tests/fixtures/cluster.py), read only.
"""

from __future__ import annotations

import json
import pathlib
import time
import urllib.parse
import urllib.request

import pytest

from deploy import monitoring
from deploy.cluster import PROCESS_STATES, Cluster

pytestmark = pytest.mark.cluster

HTTP_TIMEOUT_SECONDS = 5
# Prometheus scrapes every SCRAPE_INTERVAL_SECONDS; a target's first scrape may also wait for its start.
SCRAPED_TIMEOUT_SECONDS = 6 * monitoring.SCRAPE_INTERVAL_SECONDS
POLL_INTERVAL_SECONDS = 0.5
# An alert is evaluated, then sent; one sent before Alertmanager was discovered is sent again after the resend delay.
ALERT_DELIVERED_TIMEOUT_SECONDS = 3 * (monitoring.RULE_EVALUATION_INTERVAL_SECONDS + monitoring.ALERT_RESEND_DELAY_SECONDS)


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=HTTP_TIMEOUT_SECONDS) as response:
        return json.loads(response.read())


def query(prometheus_url: str, promql: str) -> list[dict]:
    answer = get_json(f"{prometheus_url}/api/v1/query?{urllib.parse.urlencode({'query': promql})}")
    assert answer["status"] == "success", answer
    return answer["data"]["result"]


def expected_targets(cluster: dict) -> set[tuple[str, str]]:
    """(job, process) of every process the cluster runs, from cluster.json."""
    job_of_role = {
        "grpc": monitoring.JOB_GRPC, "coordinator": monitoring.JOB_COORDINATOR, "etcd": monitoring.JOB_ETCD,
        "postgres": monitoring.JOB_POSTGRES, "prometheus": monitoring.JOB_PROMETHEUS,
        "alertmanager": monitoring.JOB_ALERTMANAGER, "supervisor": monitoring.JOB_SUPERVISOR,
    }  # fmt: skip
    return {(job_of_role[p["role"]], p["name"]) for p in cluster["processes"] if p["role"] in job_of_role}


def test_cluster_json_names_the_monitoring_and_every_metrics_endpoint(cluster: dict) -> None:
    control = Cluster(cluster["state_dir"])
    assert cluster["prometheus_url"] == control.prometheus.url
    assert cluster["alertmanager_url"] == control.alertmanager.url
    served = [p["metrics"] for p in cluster["processes"] if p["role"] in ("grpc", "coordinator")]
    assert any(p["role"] == "coordinator" for p in cluster["processes"])
    assert cluster["metrics_endpoints"] == served


def test_prometheus_scrapes_every_process_of_every_job(cluster: dict) -> None:
    wanted = expected_targets(cluster)
    deadline = time.monotonic() + SCRAPED_TIMEOUT_SECONDS
    while True:
        active = get_json(f"{cluster['prometheus_url']}/api/v1/targets?state=active")["data"]["activeTargets"]
        found = {(t["labels"]["job"], t["labels"]["process"]): t for t in active}
        down = {key: target["lastError"] or target["health"] for key, target in found.items() if target["health"] != "up"}
        if set(found) == wanted and not down:
            break
        assert time.monotonic() < deadline, f"targets: missing {wanted - set(found)}, extra {set(found) - wanted}, not up {down}"
        time.sleep(POLL_INTERVAL_SECONDS)
    assert {job for job, _ in found} == set(monitoring.SCRAPE_JOBS)
    for (job, process), target in found.items():
        if job == monitoring.JOB_POSTGRES:
            assert target["labels"]["shard"] == process


def test_the_supervisor_of_an_unsupervised_cluster_still_reports_every_process(cluster: dict) -> None:
    """The tests' cluster restarts nothing, but its supervisor watches: Prometheus has a state for
    every other process, under the process's own name (honor_labels), every state initialised."""
    others = {p["name"] for p in cluster["processes"] if p["role"] != "supervisor"}
    deadline = time.monotonic() + SCRAPED_TIMEOUT_SECONDS
    while True:
        series = query(cluster["prometheus_url"], 'corebank_process_state{job="corebank_supervisor"}')
        if {s["metric"]["process"] for s in series} == others:
            break
        assert time.monotonic() < deadline, f"states of {sorted({s['metric']['process'] for s in series})}, not {sorted(others)}"
        time.sleep(POLL_INTERVAL_SECONDS)
    assert len(series) == len(others) * len(PROCESS_STATES)
    assert all(s["metric"].get("exported_process") is None for s in series)
    assert {s["metric"]["process"] for s in series if s["metric"]["state"] == "healthy" and s["value"][1] == "1"} == others


def test_etcd_and_the_supervisor_log_json_lines(cluster: dict) -> None:
    logs_dir = pathlib.Path(cluster["state_dir"]) / "logs"
    for name, message_key in (("etcd", "msg"), ("supervisor", "message")):
        lines = (logs_dir / f"{name}.log").read_text().splitlines()
        assert lines, name
        assert all(message_key in json.loads(line) for line in lines), name


def test_every_shard_exporter_reaches_its_shard_as_the_auditor(cluster: dict) -> None:
    shards = {shard["name"] for shard in cluster["shards"]}
    deadline = time.monotonic() + SCRAPED_TIMEOUT_SECONDS
    while True:
        up = {sample["metric"]["shard"]: sample["value"][1] for sample in query(cluster["prometheus_url"], "pg_up")}
        if up == {shard: "1" for shard in shards}:
            break
        assert time.monotonic() < deadline, f"pg_up by shard: {up}"
        time.sleep(POLL_INTERVAL_SECONDS)


def test_no_password_reaches_an_exporter_s_command_line_or_environment(cluster: dict) -> None:
    control = Cluster(cluster["state_dir"])
    password = pathlib.Path(control.postgres_exporters[0].passfile).read_text().strip().rsplit(":", 1)[1]
    for exporter in control.postgres_exporters:
        pid = exporter.pid()
        assert pid is not None
        for view in ("cmdline", "environ"):
            assert password.encode() not in pathlib.Path(f"/proc/{pid}/{view}").read_bytes()


def test_prometheus_keeps_a_bounded_history_under_the_state_folder(cluster: dict) -> None:
    flags = get_json(f"{cluster['prometheus_url']}/api/v1/status/flags")["data"]
    assert flags["storage.tsdb.retention.time"] == monitoring.RETENTION_TIME
    assert flags["storage.tsdb.retention.size"] == monitoring.RETENTION_SIZE
    assert pathlib.Path(flags["storage.tsdb.path"]).is_relative_to(cluster["state_dir"])
    assert flags["web.listen-address"].startswith("127.0.0.1:")


def test_alertmanager_answers_and_receives_prometheus_alerts(cluster: dict) -> None:
    with urllib.request.urlopen(f"{cluster['alertmanager_url']}/-/healthy", timeout=HTTP_TIMEOUT_SECONDS) as response:
        assert response.status == 200
    alertmanagers = get_json(f"{cluster['prometheus_url']}/api/v1/alertmanagers")["data"]["activeAlertmanagers"]
    assert [am["url"] for am in alertmanagers] == [f"{cluster['alertmanager_url']}/api/v2/alerts"]
    status = get_json(f"{cluster['alertmanager_url']}/api/v2/status")
    assert status["cluster"]["status"] == "disabled"  # no gossip port


def test_the_always_firing_watchdog_reaches_its_own_receiver(cluster: dict) -> None:
    """The whole path: rules loaded, evaluated, sent to Alertmanager and routed by deploy/prometheus/alertmanager.yml."""
    deadline = time.monotonic() + ALERT_DELIVERED_TIMEOUT_SECONDS
    while True:
        alerts = get_json(f"{cluster['alertmanager_url']}/api/v2/alerts?filter=alertname%3D%22Watchdog%22")
        if alerts:
            break
        assert time.monotonic() < deadline, "the Watchdog alert did not reach Alertmanager"
        time.sleep(POLL_INTERVAL_SECONDS)
    assert [receiver["name"] for receiver in alerts[0]["receivers"]] == ["watchdog"]
