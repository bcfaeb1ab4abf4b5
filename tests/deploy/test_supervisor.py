"""The supervisor and `status` with real processes: a crash is restarted and counted, a
frozen process is told apart from a dead one and left alone, a shard whose postmaster alone is
frozen is seen (by the supervisor's metrics and by Prometheus) though its exporter still
answers, a deliberate stop is not undone, a crash loop is given up on until `up`, and `down`
restarts nothing.

One supervised cluster of its own (1 shard, ports from 17900), with a supervisor that
looks every half second and gives up after two restarts, so the module runs in about a minute.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator

import pytest
import yaml

from deploy import monitoring, processes, supervisor
from deploy.cluster import DEAD, DOWN, HEALTHY, STOPPED, Cluster, ProcessStatus
from deploy.supervisor import RestartPolicy
from tests.fixtures import faults
from tests.fixtures.cluster import make_state_dir

SUPERVISED_PORT_BASE = int(os.environ.get("COREBANK_TEST_SUPERVISOR_PORT_BASE") or 17900)
POLICY = RestartPolicy(restarts_max=2, window_seconds=300, check_interval_seconds=0.5)
# Long enough for the supervisor to have acted several times, had it wanted to.
LEFT_ALONE_SECONDS = 4 * POLICY.check_interval_seconds
RESTART_TIMEOUT_SECONDS = 60
FREEZE_SECONDS_MAX = 30
COMMAND_TIMEOUT_SECONDS = 120
HTTP_TIMEOUT_SECONDS = 5
# A reading every OBSERVE_INTERVAL_SECONDS, each probe bounded; then a scrape, then a rule evaluation.
OBSERVED_TIMEOUT_SECONDS = 6 * supervisor.OBSERVE_INTERVAL_SECONDS
SCRAPED_TIMEOUT_SECONDS = OBSERVED_TIMEOUT_SECONDS + 4 * monitoring.SCRAPE_INTERVAL_SECONDS
ALERT_RULES = pathlib.Path(__file__).resolve().parents[2] / "deploy" / "prometheus" / "rules" / "corebank_alerts.yml"


@pytest.fixture(scope="module")
def supervised() -> Iterator[Cluster]:
    state_dir = make_state_dir("corebank-supervised-")
    cluster = Cluster(
        state_dir, shard_count=1, port_base=SUPERVISED_PORT_BASE, grpc_workers=1, coordinators=1, supervised=True,
        restart_policy=POLICY,
    )  # fmt: skip
    try:
        cluster.up()
        yield cluster
    finally:
        cluster.clean()
        shutil.rmtree(state_dir, ignore_errors=True)


def status_of(cluster: Cluster, name: str) -> ProcessStatus:
    return next(status for status in cluster.status() if status.name == name)


def wait_restarted(cluster: Cluster, name: str, old_pid: int) -> ProcessStatus:
    def back() -> bool:
        status = status_of(cluster, name)
        return status.pid not in (None, old_pid) and status.state == HEALTHY

    processes.wait_until(back, RESTART_TIMEOUT_SECONDS, f"{name} restarted by the supervisor")
    return status_of(cluster, name)


def supervisor_metrics(cluster: Cluster) -> str:
    with urllib.request.urlopen(f"http://{cluster.supervisor.endpoint}/metrics", timeout=HTTP_TIMEOUT_SECONDS) as response:
        return response.read().decode()


def wait_exposed(cluster: Cluster, line: str) -> None:
    """Until the supervisor's /metrics has `line` (a series and its value)."""
    processes.wait_until(lambda: line in supervisor_metrics(cluster).splitlines(), OBSERVED_TIMEOUT_SECONDS, f"the supervisor says {line}")


def prometheus_query(cluster: Cluster, promql: str) -> list[dict]:
    url = f"{cluster.prometheus.url}/api/v1/query?{urllib.parse.urlencode({'query': promql})}"
    with urllib.request.urlopen(url, timeout=HTTP_TIMEOUT_SECONDS) as response:
        answer = json.loads(response.read())
    assert answer["status"] == "success", answer
    return answer["data"]["result"]


def alert_expression(name: str) -> str:
    groups = yaml.safe_load(ALERT_RULES.read_text())["groups"]
    return next(rule["expr"] for group in groups for rule in group["rules"] if rule.get("alert") == name)


def crash(cluster: Cluster, name: str) -> int:
    """kill -9 from outside the cluster's API: what a crash looks like to the supervisor."""
    pid = cluster.pid(name)
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    return pid


def test_up_starts_the_supervisor_with_the_cluster(supervised: Cluster) -> None:
    description = supervised.up()
    supervisor_process = {"name": "supervisor", "role": "supervisor", "pid": supervised.supervisor.pid(), "endpoint": supervised.supervisor.endpoint}
    assert supervisor_process in description["processes"]
    assert all(status.state == HEALTHY for status in supervised.status())
    # Its log is JSON lines, like the services'.
    first = json.loads(supervised.supervisor.log_path.read_text().splitlines()[0])
    assert (first["process"], first["level"]) == ("supervisor", "INFO") and "watching" in first["message"]


def test_the_supervisor_restarts_a_crashed_worker_and_counts_it(supervised: Cluster) -> None:
    supervised.up()
    before = status_of(supervised, "grpc-0").restarts

    after = wait_restarted(supervised, "grpc-0", crash(supervised, "grpc-0"))

    assert after.restarts == before + 1
    assert after.uptime_seconds is not None and after.uptime_seconds < RESTART_TIMEOUT_SECONDS
    wait_exposed(supervised, f'corebank_process_restarts_total{{process="grpc-0"}} {float(before + 1)}')


def test_a_frozen_process_is_stopped_not_dead_and_is_left_alone(supervised: Cluster) -> None:
    supervised.up()
    with faults.shard_frozen(supervised, "shard-0", seconds_max=FREEZE_SECONDS_MAX):
        frozen = status_of(supervised, "shard-0")
        assert frozen.state == STOPPED
        status = subprocess.run(
            [sys.executable, "-m", "deploy.cluster", "status", "--state-dir", str(supervised.state_dir)],
            capture_output=True, text=True, timeout=COMMAND_TIMEOUT_SECONDS,
        )  # fmt: skip
        assert status.returncode != 0
        assert " stopped " in next(line for line in status.stdout.splitlines() if line.startswith("shard-0 "))
        time.sleep(LEFT_ALONE_SECONDS)
        assert status_of(supervised, "shard-0").pid == frozen.pid
    processes.wait_until(lambda: status_of(supervised, "shard-0").state == HEALTHY, RESTART_TIMEOUT_SECONDS, "shard-0 thawed")
    assert status_of(supervised, "shard-0").restarts == 0


def test_a_shard_whose_postmaster_alone_is_frozen_is_down_for_the_supervisor_and_prometheus(supervised: Cluster) -> None:
    """The postmaster stopped, its backends running: no new connection is accepted, while the
    exporter's open connection may keep pg_up at 1 (whether it does depends on its pool, so this
    test does not count on it). The supervisor says stopped, CorebankShardDown's expression names
    the shard (its `for:` is not waited for), and nothing restarts it."""
    supervised.up()
    postmaster = supervised.pid("shard-0")
    supervised.kill("shard-0", signal.SIGSTOP)  # a shard's kill signals its postmaster alone
    try:
        wait_exposed(supervised, 'corebank_process_state{process="shard-0",role="postgres",state="stopped"} 1.0')
        wait_exposed(supervised, 'corebank_process_state{process="shard-0",role="postgres",state="healthy"} 0.0')

        def stopped_in_prometheus() -> bool:
            stopped = prometheus_query(supervised, 'corebank_process_state{job="corebank_supervisor", process="shard-0", state="stopped"}')
            return [series["value"][1] for series in stopped] == ["1"]

        processes.wait_until(stopped_in_prometheus, SCRAPED_TIMEOUT_SECONDS, "Prometheus has the supervisor's stopped shard-0")
        # The promtool tests prove the supervisor's view alone fires it; here, the real series do.
        shard_down = prometheus_query(supervised, alert_expression("CorebankShardDown"))
        assert "shard-0" in {series["metric"].get("shard") for series in shard_down}
        time.sleep(LEFT_ALONE_SECONDS)
        assert supervised.pid("shard-0") == postmaster and status_of(supervised, "shard-0").state == STOPPED
    finally:
        supervised.kill("shard-0", signal.SIGCONT)
    processes.wait_until(lambda: status_of(supervised, "shard-0").state == HEALTHY, RESTART_TIMEOUT_SECONDS, "shard-0 resumed")
    wait_exposed(supervised, 'corebank_process_state{process="shard-0",role="postgres",state="healthy"} 1.0')
    assert status_of(supervised, "shard-0").restarts == 0


def test_a_deliberate_stop_or_kill_is_not_undone(supervised: Cluster) -> None:
    supervised.up()
    restarts_before = status_of(supervised, "coordinator-0").restarts
    for take_down in (supervised.stop, supervised.kill):
        take_down("coordinator-0")
        time.sleep(LEFT_ALONE_SECONDS)
        held = status_of(supervised, "coordinator-0")
        assert held.state == DOWN and "held" in held.note
        supervised.start("coordinator-0")
        assert status_of(supervised, "coordinator-0").state == HEALTHY
    assert status_of(supervised, "coordinator-0").restarts == restarts_before


def test_the_supervisor_gives_up_past_its_limit_until_up(supervised: Cluster) -> None:
    supervised.up()  # resets the limit
    for _ in range(POLICY.restarts_max):
        wait_restarted(supervised, "coordinator-0", crash(supervised, "coordinator-0"))

    crash(supervised, "coordinator-0")
    time.sleep(LEFT_ALONE_SECONDS)

    given_up = status_of(supervised, "coordinator-0")
    assert given_up.state == DEAD and "gave up" in given_up.note
    lines = [json.loads(line) for line in supervised.supervisor.log_path.read_text().splitlines()]
    assert any(line["level"] == "ERROR" and "GIVING UP on coordinator-0" in line["message"] for line in lines)
    wait_exposed(supervised, 'corebank_supervisor_gave_up{process="coordinator-0"} 1.0')
    supervised.up()
    back = status_of(supervised, "coordinator-0")
    assert back.state == HEALTHY and back.note == ""
    wait_restarted(supervised, "coordinator-0", crash(supervised, "coordinator-0"))  # the limit starts over


def test_down_stops_the_supervisor_first_and_nothing_comes_back(supervised: Cluster) -> None:
    supervised.up()

    supervised.down()
    time.sleep(LEFT_ALONE_SECONDS)

    states = {status.name: status.state for status in supervised.status()}
    assert "supervisor" in states and set(states.values()) == {DOWN}
    supervised.up()
    assert all(status.state == HEALTHY for status in supervised.status())
