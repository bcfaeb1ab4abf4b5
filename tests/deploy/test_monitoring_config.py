"""The monitoring's files, the supervisor's bookkeeping and process states, without a cluster."""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import pathlib
import shutil
import signal
import socket
import subprocess
import time

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from deploy import cluster as cluster_cli
from deploy import monitoring, postgres, processes, supervisor
from deploy.cluster import (
    COORDINATORS_MAX, DEAD, DOWN, HEALTHY, PROCESS_STATES, SHARD_COUNT_MAX, STOPPED, Cluster, ProcessStatus, Settings,
    format_uptime,
)  # fmt: skip
from deploy.postgres import PostgresShard
from deploy.supervisor import ProcessStates, RestartLedger, RestartPolicy, may_restart

PORT_BASE = 17300  # nothing is started: only the port plan is computed


def test_the_port_plan_fits_every_allowed_count_and_refuses_more() -> None:
    Settings(shard_count=SHARD_COUNT_MAX, port_base=PORT_BASE, grpc_workers=1, coordinators=COORDINATORS_MAX)
    with pytest.raises(ValueError):
        Settings(shard_count=3, port_base=PORT_BASE, grpc_workers=1, coordinators=COORDINATORS_MAX + 1)  # exporters' ports

    cluster = Cluster(pathlib.Path("/nonexistent-corebank"), shard_count=SHARD_COUNT_MAX, port_base=PORT_BASE, coordinators=COORDINATORS_MAX)
    ports = [
        cluster.grpc_worker(0).grpc_port, cluster.etcd.client_port, cluster.etcd.peer_port, cluster.prometheus.port,
        cluster.alertmanager.port, cluster.supervisor.port, *(w.metrics_port for w in cluster.grpc_workers),
        *(c.metrics_port for c in cluster.coordinators), *(e.port for e in cluster.postgres_exporters),
        *(s.port for s in cluster.shards),
    ]  # fmt: skip
    assert len(set(ports)) == len(ports)
    # The tests' clusters are 200 ports apart.
    assert PORT_BASE <= min(ports) and max(ports) < PORT_BASE + 200


def test_scrape_targets_follow_metrics_md(tmp_path: pathlib.Path) -> None:
    cluster = Cluster(tmp_path, shard_count=2, port_base=PORT_BASE, grpc_workers=2, coordinators=1)
    monitoring.write_targets(tmp_path / "targets", cluster.scrape_targets())

    def groups(job: str) -> list[dict]:
        return json.loads((tmp_path / "targets" / f"{job}.json").read_text())

    assert groups("corebank_grpc") == [
        {"targets": ["127.0.0.1:17310"], "labels": {"process": "grpc-0"}},
        {"targets": ["127.0.0.1:17311"], "labels": {"process": "grpc-1"}},
    ]
    assert groups("corebank_coordinator") == [{"targets": ["127.0.0.1:17320"], "labels": {"process": "coordinator-0"}}]
    assert groups("etcd") == [{"targets": ["127.0.0.1:17301"], "labels": {"process": "etcd"}}]
    assert groups("postgres") == [
        {"targets": ["127.0.0.1:17330"], "labels": {"process": "shard-0", "shard": "shard-0"}},
        {"targets": ["127.0.0.1:17331"], "labels": {"process": "shard-1", "shard": "shard-1"}},
    ]
    assert groups("prometheus") == [{"targets": ["127.0.0.1:17303"], "labels": {"process": "prometheus"}}]
    assert groups("alertmanager") == [{"targets": ["127.0.0.1:17304"], "labels": {"process": "alertmanager"}}]
    assert groups("corebank_supervisor") == [{"targets": ["127.0.0.1:17305"], "labels": {"process": "supervisor"}}]
    with pytest.raises(ValueError, match="not in deploy/prometheus/metrics.md"):
        monitoring.write_targets(tmp_path / "targets", [monitoring.ScrapeTarget("node", "127.0.0.1:1", {})])


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed")
def test_the_rendered_config_is_valid_for_prometheus(tmp_path: pathlib.Path) -> None:
    config = tmp_path / "prometheus.yml"
    config.write_text(monitoring.render_config(tmp_path / "targets", "127.0.0.1:17304"))

    checked = subprocess.run(["promtool", "check", "config", "--syntax-only", str(config)], capture_output=True, text=True)

    assert checked.returncode == 0, checked.stdout + checked.stderr
    text = config.read_text()
    assert f"scrape_interval: \"{monitoring.SCRAPE_INTERVAL_SECONDS}s\"" in text
    assert f"{monitoring.RULES_DIR}/*.yml" in text
    assert all(f"job_name: {job}\n" in text for job in monitoring.SCRAPE_JOBS)
    # The supervisor's series name the process they are about: its own `process` label is kept.
    assert f"job_name: {monitoring.JOB_SUPERVISOR}\n    honor_labels: true\n" in text


@pytest.mark.skipif(shutil.which("amtool") is None, reason="amtool is not installed")
def test_the_alertmanager_config_is_valid() -> None:
    checked = subprocess.run(["amtool", "check-config", str(monitoring.ALERTMANAGER_CONFIG_PATH)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_the_exporter_gets_no_password_only_the_passfile_path(tmp_path: pathlib.Path) -> None:
    exporter = Cluster(tmp_path, shard_count=1, port_base=PORT_BASE).postgres_exporters[0]
    assert exporter.passfile == tmp_path / "secrets" / "auditor.pgpass"
    assert "user=corebank_auditor" in exporter.data_source_name()
    assert "password" not in exporter.data_source_name()


def test_restarts_are_limited_per_window_and_up_resets_the_limit(tmp_path: pathlib.Path) -> None:
    policy = RestartPolicy(restarts_max=2, window_seconds=60)
    ledger = RestartLedger(tmp_path)
    entry = ledger.of("grpc-0")
    entry.recent_seconds += [1000.0, 1030.0]
    entry.restarts = 2

    assert not may_restart(entry, policy, now_seconds=1050.0)  # two within the last minute
    assert may_restart(entry, policy, now_seconds=1070.0)  # the first has left the window
    assert entry.recent_seconds == [1030.0]

    entry.gave_up = True
    ledger.save()
    stored = RestartLedger(tmp_path)
    assert stored.of("grpc-0").gave_up and stored.of("grpc-0").restarts == 2
    stored.reset_limits()
    assert not stored.of("grpc-0").gave_up and stored.of("grpc-0").recent_seconds == []
    assert stored.of("grpc-0").restarts == 2  # the total stays for `make status`


def test_kill_and_stop_hold_a_process_but_a_pause_does_not(tmp_path: pathlib.Path) -> None:
    cluster = Cluster(tmp_path, shard_count=1, port_base=PORT_BASE, grpc_workers=1, coordinators=0)

    cluster.kill("grpc-0", signal.SIGSTOP)
    assert not supervisor.is_held(cluster.run_dir, "grpc-0")
    cluster.kill("grpc-0")
    assert supervisor.is_held(cluster.run_dir, "grpc-0")

    statuses = {status.name: status for status in cluster.status()}
    assert statuses["grpc-0"].state == DOWN and "held" in statuses["grpc-0"].note and "Cluster.kill" in statuses["grpc-0"].note
    assert statuses["etcd"].state == DEAD and "held" not in statuses["etcd"].note


def test_a_cluster_taken_down_on_purpose_reads_down_not_dead_and_its_urls_do_not_answer(tmp_path: pathlib.Path, capsys) -> None:
    cluster = Cluster(tmp_path, shard_count=1, port_base=PORT_BASE, grpc_workers=1, coordinators=1, supervised=True)
    cluster.settings.save(cluster.settings_path)
    cluster.down()  # nothing runs: it only holds every process, as after a real `down`

    assert {status.state for status in cluster.status()} == {DOWN}
    assert cluster_cli.main(["status", "--state-dir", str(tmp_path)]) != 0
    printed = capsys.readouterr().out
    assert " dead " not in printed
    assert all(" down " in line and "make down" in line for line in printed.splitlines()[1:len(cluster.components()) + 1])
    assert f"prometheus   {cluster.prometheus.url} (down: not answering)" in printed
    assert f"alertmanager {cluster.alertmanager.url} (down: not answering)" in printed
    assert "is down, on purpose" in printed
    supervisor.release_all(cluster.run_dir)  # what `up` does first
    assert {status.state for status in cluster.status()} == {DEAD}


def test_the_supervisor_exposes_every_state_of_every_process_but_its_own() -> None:
    states = ProcessStates()
    registry = CollectorRegistry()
    registry.register(states)
    assert "corebank_process_state{" not in generate_latest(registry).decode()  # nothing read yet
    states.update([
        ProcessStatus("shard-0", "postgres", 41, STOPPED, "127.0.0.1:7100", 12.5, restarts=2),
        ProcessStatus("grpc-0", "grpc", 42, HEALTHY, "127.0.0.1:7000", 3.0),
        ProcessStatus("coordinator-0", "coordinator", None, DEAD, "-", None, restarts=3, gave_up=True),
        ProcessStatus("supervisor", "supervisor", 43, HEALTHY, "127.0.0.1:7105", 99.0),
    ], checked_seconds=1234.5)

    text = generate_latest(registry).decode()

    for state in PROCESS_STATES:
        assert f'corebank_process_state{{process="shard-0",role="postgres",state="{state}"}} {1.0 if state == STOPPED else 0.0}' in text
    assert 'corebank_process_state{process="grpc-0",role="grpc",state="healthy"} 1.0' in text
    assert 'process="supervisor"' not in text  # Prometheus' `up` of its own job says whether it runs
    assert 'corebank_process_restarts_total{process="shard-0"} 2.0' in text
    assert 'corebank_process_uptime_seconds{process="coordinator-0"} 0.0' in text
    assert 'corebank_supervisor_gave_up{process="coordinator-0"} 1.0' in text
    assert 'corebank_supervisor_gave_up{process="grpc-0"} 0.0' in text
    assert "corebank_supervisor_last_check_timestamp_seconds 1234.5" in text


def test_a_shard_whose_new_connections_hang_is_unhealthy_within_its_connect_timeout(tmp_path: pathlib.Path) -> None:
    """A postmaster that accepts but never answers (frozen, or past its limits): the health check,
    which the supervisor and `make status` run, gives up at CONNECT_TIMEOUT_SECONDS, not never."""
    port = processes.free_port()
    with contextlib.closing(socket.socket(socket.AF_UNIX)) as silent:
        silent.bind(str(tmp_path / f".s.PGSQL.{port}"))
        silent.listen()  # the kernel completes the connection; nobody ever reads or writes it
        shard = PostgresShard("shard-0", tmp_path, port, tmp_path / "secrets")
        with concurrent.futures.ThreadPoolExecutor(max_workers=1) as executor:
            healthy = executor.submit(shard.is_healthy)
            # Generous: the bound is what is proved, not how fast.
            assert healthy.result(timeout=10 * postgres.CONNECT_TIMEOUT_SECONDS) is False


def test_a_stopped_process_is_told_from_a_running_one() -> None:
    child = subprocess.Popen(["sleep", "30"])
    try:
        assert not processes.is_stopped(child.pid)
        child.send_signal(signal.SIGSTOP)
        processes.wait_until(lambda: processes.is_stopped(child.pid), 5, "sleep stopped")
        child.send_signal(signal.SIGCONT)
        processes.wait_until(lambda: not processes.is_stopped(child.pid), 5, "sleep resumed")
        time.sleep(0.2)
        uptime = processes.uptime_seconds(child.pid)
        assert uptime is not None and 0.1 <= uptime < 30
    finally:
        child.kill()
        child.wait()
    assert processes.uptime_seconds(child.pid) is None and not processes.is_stopped(child.pid)


def test_uptime_reads_in_its_two_largest_units() -> None:
    assert [format_uptime(s) for s in (None, 12.7, 250, 7500, 3 * 86400 + 4 * 3600 + 5)] == ["-", "12s", "4m10s", "2h5m", "3d4h"]
