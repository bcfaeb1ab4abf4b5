"""The cluster lifecycle with real processes: up, repair, down, status, clean.

One cluster of its own (2 shards, ports from 17300) for the whole module, so it
never touches the session's test cluster. Every test begins with `up()`, which
is idempotent, so each test also works alone.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import psycopg
import pytest

from deploy import postgres, processes, supervisor
from deploy.cluster import DOWN, HEALTHY, Cluster, ClusterError
from sharding import etcd_shard_map
from sharding.shard_map import Shard, ShardMap
from tests.fixtures.cluster import make_state_dir

LIFECYCLE_PORT_BASE = int(os.environ.get("COREBANK_TEST_LIFECYCLE_PORT_BASE") or 17300)
LIFECYCLE_SHARD_COUNT = 2
REPO_DIR = pathlib.Path(__file__).resolve().parents[2]
COMMAND_TIMEOUT_SECONDS = 120

CLUSTER_JSON_KEYS = {
    "grpc_endpoint", "etcd_endpoint", "metrics_endpoints", "prometheus_url", "alertmanager_url", "shards", "processes",
    "state_dir", "auth", "hosting_participant_id", "clearing_home_shard", "topology", "etcd_endpoints",
}  # fmt: skip
# The monitoring `up` starts beside the services (deploy/monitoring.py), and the supervisor, which
# only watches in this unsupervised cluster: all healthy in a healthy cluster.
MONITORING_ROLES = {
    "exporter-shard-0": "postgres-exporter", "exporter-shard-1": "postgres-exporter",
    "alertmanager": "alertmanager", "prometheus": "prometheus", "supervisor": "supervisor",
}  # fmt: skip
MONITORING_HEALTHY = {name: HEALTHY for name in MONITORING_ROLES}
SHARD_KEYS = {"name", "dsn", "pid", "port", "data_dir", "owner_dsn", "auditor_dsn", "superuser_dsn", "members"}


@pytest.fixture(scope="module")
def lifecycle() -> Iterator[Cluster]:
    state_dir = make_state_dir("corebank-lifecycle-")
    # One worker and no coordinators keep the kill-and-restart bookkeeping simple; the session cluster and the
    # chaos tests run several of each.
    cluster = Cluster(
        state_dir, shard_count=LIFECYCLE_SHARD_COUNT, port_base=LIFECYCLE_PORT_BASE, grpc_workers=1, coordinators=0
    )
    try:
        yield cluster
    finally:
        cluster.clean()
        shutil.rmtree(state_dir, ignore_errors=True)


def pids_by_name(description: dict) -> dict[str, int]:
    return {process["name"]: process["pid"] for process in description["processes"]}


def still_running(pid: int, cluster: Cluster) -> bool:
    """Whether `pid` is still one of this cluster's processes (not a reused pid)."""
    argv = processes.cmdline(pid)
    if argv is None:
        return False
    joined = " ".join(argv)
    return str(cluster.state_dir) in joined or f"127.0.0.1:{LIFECYCLE_PORT_BASE}" in joined


def run_cli(*args: str, state_dir: pathlib.Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "deploy.cluster", *args, "--state-dir", str(state_dir)],
        capture_output=True, text=True, cwd=REPO_DIR, timeout=COMMAND_TIMEOUT_SECONDS,
    )  # fmt: skip


def test_up_twice_keeps_every_pid(lifecycle: Cluster) -> None:
    first = lifecycle.up()
    second = lifecycle.up()

    assert pids_by_name(second) == pids_by_name(first)
    assert all(pid is not None for pid in pids_by_name(first).values())
    assert all(status.state == HEALTHY for status in lifecycle.status())


def test_cluster_json_has_the_required_shape(lifecycle: Cluster) -> None:
    description = lifecycle.up()
    on_disk = lifecycle.cluster_json_path.read_text()

    assert set(description) == CLUSTER_JSON_KEYS
    assert description == json.loads(on_disk)
    assert lifecycle.cluster_json_path.stat().st_mode & 0o777 == 0o600  # it holds the admin token
    assert description["grpc_endpoint"] == f"127.0.0.1:{LIFECYCLE_PORT_BASE}"
    assert description["etcd_endpoint"] == f"127.0.0.1:{LIFECYCLE_PORT_BASE + 1}"
    assert description["metrics_endpoints"] == [f"127.0.0.1:{LIFECYCLE_PORT_BASE + 10}"]
    assert description["prometheus_url"] == f"http://127.0.0.1:{LIFECYCLE_PORT_BASE + 3}"
    assert description["alertmanager_url"] == f"http://127.0.0.1:{LIFECYCLE_PORT_BASE + 4}"
    assert [shard["name"] for shard in description["shards"]] == ["shard-0", "shard-1"]
    for index, shard in enumerate(description["shards"]):
        assert set(shard) == SHARD_KEYS
        assert shard["port"] == LIFECYCLE_PORT_BASE + 100 + index
        # The service role's DSN; its password is in the passfile it names, never in the DSN.
        secrets = lifecycle.state_dir / "secrets"
        assert shard["dsn"] == (
            f"host=127.0.0.1 port={shard['port']} dbname=corebank user=corebank passfile={secrets / 'service.pgpass'}"
        )
        assert shard["owner_dsn"].endswith(f"user=corebank_owner passfile={secrets / 'owner.pgpass'}")
        assert shard["auditor_dsn"].endswith(f"user=corebank_auditor passfile={secrets / 'auditor.pgpass'}")
        assert shard["superuser_dsn"].startswith(f"host={pathlib.Path(shard['data_dir']).parent} ")
        assert "password" not in json.dumps(shard)
    roles = {process["name"]: process["role"] for process in description["processes"]}
    assert roles == {"grpc-0": "grpc", "etcd": "etcd", "shard-0": "postgres", "shard-1": "postgres", **MONITORING_ROLES}
    assert description["processes"][0]["metrics"] == description["metrics_endpoints"][0]
    assert description["state_dir"] == str(lifecycle.state_dir)


def test_up_restarts_exactly_the_killed_processes(lifecycle: Cluster) -> None:
    before = pids_by_name(lifecycle.up())

    lifecycle.kill("grpc-0")
    lifecycle.kill("shard-1")
    states = {status.name: status.state for status in lifecycle.status()}
    # Killed through the cluster's API: held down on purpose.
    assert states == {"grpc-0": DOWN, "shard-1": DOWN, "etcd": HEALTHY, "shard-0": HEALTHY, **MONITORING_HEALTHY}

    after = pids_by_name(lifecycle.up())

    restarted = {name for name in before if after[name] != before[name]}
    assert restarted == {"grpc-0", "shard-1"}
    assert all(status.state == HEALTHY for status in lifecycle.status())


def test_stop_and_start_one_shard(lifecycle: Cluster) -> None:
    before = pids_by_name(lifecycle.up())

    lifecycle.stop("shard-0")
    assert lifecycle.pid("shard-0") is None
    assert lifecycle.pid("shard-1") == before["shard-1"]

    lifecycle.start("shard-0")
    assert lifecycle.pid("shard-0") is not None
    assert {status.name: status.state for status in lifecycle.status()}["shard-0"] == HEALTHY


def test_status_command_fails_when_a_process_is_down(lifecycle: Cluster) -> None:
    lifecycle.up()
    assert run_cli("status", state_dir=lifecycle.state_dir).returncode == 0

    # A crash, from outside the cluster's API: dead. This cluster's supervisor only watches, so it stays dead.
    os.kill(lifecycle.pid("grpc-0"), signal.SIGKILL)
    time.sleep(2 * supervisor.CHECK_INTERVAL_SECONDS)
    status = run_cli("status", state_dir=lifecycle.state_dir)

    assert status.returncode != 0
    grpc_line = next(line for line in status.stdout.splitlines() if line.startswith("grpc-0 "))
    assert " dead " in grpc_line and "nothing restarts it" in grpc_line
    lifecycle.up()


def test_down_then_up_keeps_the_data(lifecycle: Cluster) -> None:
    # Schema changes are the owner's: the service role may not create tables.
    shard_0_dsn = lifecycle.up()["shards"][0]["owner_dsn"]
    with psycopg.connect(shard_0_dsn, autocommit=True) as connection:
        connection.execute("CREATE TABLE IF NOT EXISTS lifecycle_scratch (note text)")
        connection.execute("INSERT INTO lifecycle_scratch VALUES ('written before down')")
    pids = pids_by_name(lifecycle.describe())

    lifecycle.down()

    assert all(status.state == DOWN for status in lifecycle.status())
    assert not any(still_running(pid, lifecycle) for pid in pids.values())
    lifecycle.up()
    with psycopg.connect(shard_0_dsn) as connection:
        notes = [row[0] for row in connection.execute("SELECT note FROM lifecycle_scratch")]
    assert notes == ["written before down"]


def test_up_gives_the_shard_map_of_an_older_cluster_its_passfiles(lifecycle: Cluster) -> None:
    """A map stored before the roles had passwords (DSNs without a passfile) is republished with them."""
    lifecycle.up()

    async def shard_map_after(publish_first: bool) -> ShardMap:
        client = etcd_shard_map.etcd_client(lifecycle.etcd.endpoint)
        try:
            current = await etcd_shard_map.load(client)
            if publish_first:
                # As deploy wrote them before: the service role's DSN, no passfile.
                older = [Shard(shard.name, postgres.dsn(shard.port)) for shard in lifecycle.shards]
                await etcd_shard_map.publish(client, dataclasses.replace(current, version=current.version + 1, shards=tuple(older)))
            return await etcd_shard_map.load(client)
        finally:
            await client.close()

    older = asyncio.run(shard_map_after(publish_first=True))
    assert all("passfile" not in shard.dsn for shard in older.shards)
    lifecycle.up()
    current = asyncio.run(shard_map_after(publish_first=False))
    assert current.version == older.version + 1
    assert [shard.dsn for shard in current.shards] == [shard.dsn for shard in lifecycle.shards]
    assert current.slot_ranges == older.slot_ranges


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_status_names_what_is_down(lifecycle: Cluster) -> None:
    if subprocess.run(["make", "-q", "venv"], cwd=REPO_DIR).returncode != 0:
        pytest.skip("the .venv is missing or stale; `make status` would build it first")
    lifecycle.up()
    lifecycle.stop("etcd")

    status = subprocess.run(
        ["make", "-s", "status"], capture_output=True, text=True, cwd=REPO_DIR, timeout=COMMAND_TIMEOUT_SECONDS,
        env={**os.environ, "COREBANK_STATE_DIR": str(lifecycle.state_dir)},
    )  # fmt: skip

    assert status.returncode != 0
    etcd_line = next(line for line in status.stdout.splitlines() if line.startswith("etcd "))
    assert " down " in etcd_line and "Cluster.stop" in etcd_line
    lifecycle.up()


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_status_never_installs_into_an_existing_venv() -> None:
    """`make status` during an incident: a pyproject.toml newer than the venv (-W: as if just
    edited) is no reason for pip to run first."""
    if not (REPO_DIR / ".venv" / "bin" / "python").exists():
        pytest.skip("no .venv: `make status` builds one, as it should")
    planned = subprocess.run(
        ["make", "-n", "-W", "pyproject.toml", "status"], capture_output=True, text=True, cwd=REPO_DIR, timeout=COMMAND_TIMEOUT_SECONDS,
    )  # fmt: skip
    assert planned.returncode == 0, planned.stderr
    assert "pip" not in planned.stdout and "deploy.cluster status" in planned.stdout


def test_clean_stops_everything_and_removes_the_state_dir(lifecycle: Cluster) -> None:
    pids = pids_by_name(lifecycle.up())

    result = run_cli("clean", state_dir=lifecycle.state_dir)

    assert result.returncode == 0, result.stderr
    assert not lifecycle.state_dir.exists()
    assert not any(still_running(pid, lifecycle) for pid in pids.values())
    assert run_cli("status", state_dir=lifecycle.state_dir).returncode != 0


def test_up_refuses_a_port_taken_by_a_stranger() -> None:
    state_dir = make_state_dir("corebank-port-taken-")
    stranger_port_base = LIFECYCLE_PORT_BASE + 50
    cluster = Cluster(state_dir, shard_count=1, port_base=stranger_port_base)
    with socket.socket() as stranger:
        stranger.bind(("127.0.0.1", stranger_port_base + 100))
        stranger.listen()
        try:
            with pytest.raises(ClusterError, match=f"port {stranger_port_base + 100} is in use"):
                cluster.up()
        finally:
            cluster.clean()
    assert not state_dir.exists()
