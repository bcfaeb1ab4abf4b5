"""TOPOLOGY=ha with real processes: three etcd members, a shard of three Patroni members
(synchronous replication), a gRPC worker and a coordinator, started by deploy/cluster.py.

One cluster for the module (ports from COREBANK_TEST_HA_PORT_BASE, default 18100: the HA plan
spans 484 ports). The failover test kills the primary's whole member (Patroni's and the
postmaster's process groups) while a client keeps transferring through gRPC, and judges the
outcome from the databases: every acknowledged transfer is there, posted, once; the audit finds
nothing; no two members were ever writable at once.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import threading
import time
from collections.abc import Iterator

import grpc
import psycopg
import pytest

from deploy import patroni, processes
from deploy.cluster import TOPOLOGY_HA, Cluster
from services.auth import client
from services.ledger.transfers import TransferStatus
from services.storage.audit import audit_cluster
from tests.fixtures.cluster import CHANNEL_READY_TIMEOUT_SECONDS, make_state_dir
from tests.fixtures.ledger import LedgerClient, _load_shard_map

HA_PORT_BASE = int(os.environ.get("COREBANK_TEST_HA_PORT_BASE") or 18100)
HA_SHARD_COUNT = 1
FUNDING_MINOR = 10_000_000
TRANSFER_AMOUNT_MINOR = 1
TRANSFER_TIMEOUT_SECONDS = 10
# Transfers before the kill, so that the failover happens under load.
TRANSFERS_BEFORE_KILL = 20
# Bounds of waiting, not timings under test: Patroni's ttl (20 s) plus generous slack.
RECOVERY_WAIT_SECONDS_MAX = 90
TRANSFERS_AFTER_RECOVERY = 20
RETRY_DELAY_SECONDS = 0.2
SAMPLE_INTERVAL_SECONDS = 0.2
SAMPLE_CONNECT_TIMEOUT_SECONDS = 1


@pytest.fixture(scope="module")
def ha_cluster() -> Iterator[Cluster]:
    state_dir = make_state_dir("corebank-ha-")
    cluster = Cluster(
        state_dir, shard_count=HA_SHARD_COUNT, port_base=HA_PORT_BASE, grpc_workers=1, coordinators=1,
        supervised=False, topology=TOPOLOGY_HA,
    )  # fmt: skip
    try:
        cluster.up()
        yield cluster
    finally:
        cluster.clean()
        shutil.rmtree(state_dir, ignore_errors=True)


def test_config_is_synchronous_and_strict(tmp_path) -> None:
    """The choices deploy/patroni.py's docstring states, in the config it writes."""
    member = Cluster(tmp_path, port_base=HA_PORT_BASE, topology=TOPOLOGY_HA).patroni_member(0, 1)
    dcs = member.config("secret", "rewind-secret")["bootstrap"]["dcs"]
    assert dcs["ttl"] == patroni.TTL_SECONDS == 20
    assert dcs["synchronous_mode"] is True and dcs["synchronous_mode_strict"] is True
    assert dcs["synchronous_node_count"] == 1
    assert dcs["loop_wait"] + 2 * dcs["retry_timeout"] <= dcs["ttl"]
    hba = member.config("secret", "rewind-secret")["postgresql"]["pg_hba"]
    assert "host replication replicator 127.0.0.1/32 scram-sha-256" in hba
    assert "host all postgres 127.0.0.1/32 reject" in hba


def test_cluster_json_describes_the_topology(ha_cluster: Cluster) -> None:
    description = ha_cluster.describe()
    assert description["topology"] == "ha"
    assert len(description["etcd_endpoints"]) == 3 == len(set(description["etcd_endpoints"]))
    assert description["etcd_endpoint"] == description["etcd_endpoints"][0]
    (shard,) = description["shards"]
    members = shard["members"]
    assert [m["name"] for m in members] == ["shard-0-m0", "shard-0-m1", "shard-0-m2"]
    assert all(m["pid"] and m["dsn"] for m in members)
    assert sorted(m["role"] for m in members) == ["primary", "replica", "replica"]
    assert "target_session_attrs=read-write" in shard["dsn"] and "target_session_attrs=read-write" in shard["owner_dsn"]
    for member in members:
        assert str(member["port"]) in shard["dsn"]
    # The services were given every etcd member.
    worker_argv = open(f"/proc/{ha_cluster.grpc_worker(0).pid()}/cmdline").read().split("\0")
    assert worker_argv[worker_argv.index("--etcd") + 1] == ",".join(description["etcd_endpoints"])


def test_replicas_stream_and_one_is_synchronous(ha_cluster: Cluster) -> None:
    (shard,) = ha_cluster.ha_shards
    shard.wait_replicated()
    with psycopg.connect(shard.superuser_dsn(), connect_timeout=SAMPLE_CONNECT_TIMEOUT_SECONDS) as connection:
        rows = connection.execute("SELECT application_name, state, sync_state FROM pg_stat_replication").fetchall()
        standby_names = connection.execute("SHOW synchronous_standby_names").fetchone()[0]
    assert len(rows) == 2 and all(state == "streaming" for _, state, _ in rows), rows
    assert [sync for _, _, sync in rows].count("sync") == 1, rows
    assert standby_names, "no synchronous standby configured"


def writable_members(cluster: Cluster) -> list[str]:
    """The members that answer pg_is_in_recovery() = false right now."""
    writable = []
    for member in cluster.patroni_members:
        try:
            with psycopg.connect(member.superuser_dsn(), connect_timeout=SAMPLE_CONNECT_TIMEOUT_SECONDS) as connection:
                if connection.execute("SELECT NOT pg_is_in_recovery()").fetchone()[0]:
                    writable.append(member.name)
        except psycopg.Error:
            continue
    return writable


def test_failover_loses_no_acknowledged_transfer(ha_cluster: Cluster) -> None:
    description = ha_cluster.describe()
    shard_map = asyncio.run(_load_shard_map(description["etcd_endpoint"]))
    (shard,) = ha_cluster.ha_shards
    worker_pid, coordinator_pid = ha_cluster.grpc_worker(0).pid(), ha_cluster.coordinator(0).pid()
    acknowledged: list[str] = []
    failures: list[str] = []
    samples: list[list[str]] = []
    stop = threading.Event()

    with client.channel(description) as channel:
        grpc.channel_ready_future(channel).result(timeout=CHANNEL_READY_TIMEOUT_SECONDS)
        ledger = LedgerClient(channel, shard_map)
        payer = ledger.funded(FUNDING_MINOR, shard.name)
        payee = ledger.open(shard=shard.name)

        def pay() -> None:
            while not stop.is_set():
                transfer_id = ledger.unique_id("ha")
                try:
                    answer = ledger.transfer(payer.account_id, payee.account_id, TRANSFER_AMOUNT_MINOR,
                                             transfer_id=transfer_id, timeout=TRANSFER_TIMEOUT_SECONDS)  # fmt: skip
                except grpc.RpcError as error:
                    failures.append(f"{transfer_id}: {error.code()}")
                    time.sleep(RETRY_DELAY_SECONDS)
                    continue
                if answer.status == TransferStatus.POSTED:
                    acknowledged.append(transfer_id)

        def sample() -> None:
            while not stop.is_set():
                samples.append(writable_members(ha_cluster))
                time.sleep(SAMPLE_INTERVAL_SECONDS)

        threads = [threading.Thread(target=pay), threading.Thread(target=sample)]
        for thread in threads:
            thread.start()
        try:
            deadline = time.monotonic() + RECOVERY_WAIT_SECONDS_MAX
            while len(acknowledged) < TRANSFERS_BEFORE_KILL and time.monotonic() < deadline:
                time.sleep(RETRY_DELAY_SECONDS)
            assert len(acknowledged) >= TRANSFERS_BEFORE_KILL, f"no load before the kill: {failures[-5:]}"
            primary = shard.wait_primary()
            postmaster_pid = primary.postmaster_pid()
            before_kill = len(acknowledged)
            killed_at = time.monotonic()
            ha_cluster.kill(primary.name)
            assert primary.pid() is None and primary.postmaster_pid() is None
            # Gone, or a zombie that its new parent has not reaped yet: nothing runs.
            assert processes.cmdline(postmaster_pid) is None, "the postmaster outlived its member"
            deadline = time.monotonic() + RECOVERY_WAIT_SECONDS_MAX
            while len(acknowledged) < before_kill + TRANSFERS_AFTER_RECOVERY and time.monotonic() < deadline:
                time.sleep(RETRY_DELAY_SECONDS)
            print(f"\nfailover: {len(acknowledged) - before_kill} transfers acknowledged within "
                  f"{time.monotonic() - killed_at:.1f}s of the kill; {len(failures)} calls failed")  # fmt: skip
        finally:
            stop.set()
            for thread in threads:
                thread.join()

    assert len(acknowledged) >= before_kill + TRANSFERS_AFTER_RECOVERY, f"transfers did not resume: {failures[-5:]}"
    # The services followed the failover without a restart.
    assert ha_cluster.grpc_worker(0).pid() == worker_pid and ha_cluster.coordinator(0).pid() == coordinator_pid
    new_primary = shard.wait_primary()
    assert new_primary.name != primary.name
    # Judged from the databases: every acknowledged transfer posted, once.
    with psycopg.connect(shard.auditor_dsn) as connection:
        rows = connection.execute(
            "SELECT transfer_id, status FROM transfers WHERE transfer_id = ANY(%s)", [acknowledged]
        ).fetchall()
    assert len(rows) == len(acknowledged) == len(set(acknowledged))
    assert {transfer_id for transfer_id, _ in rows} == set(acknowledged)
    assert all(status == TransferStatus.POSTED for _, status in rows)
    assert audit_cluster(ha_cluster.describe()["shards"]).violations() == []
    assert samples, "no member was sampled"
    assert all(len(writable) <= 1 for writable in samples), [w for w in samples if len(w) > 1]

    # The killed member comes back as a replica of the new primary.
    ha_cluster.start(primary.name)
    shard.wait_replicated()
    assert primary.role() == patroni.ROLE_REPLICA
