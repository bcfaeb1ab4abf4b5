"""What the gRPC workers and coordinators tell about the shards, the transfers between them, the
control plane and the ledger's integrity (deploy/prometheus/metrics.md), read from their /metrics."""

from __future__ import annotations

import pathlib
import time
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from corebank.v1 import payments_pb2
from deploy import processes
from deploy.postgres import passfile_path, secrets_dir
from services.coordinator.driver import PENDING_TIMEOUT_SECONDS
from services.coordinator.recovery import in_doubt_bound_seconds
from services.storage.audit import SHARD_INVARIANTS
from services.storage.metrics import ErrorKind
from services.storage.roles import DatabaseRole
from tests.fixtures.faults import etcd_stopped, shard_frozen
from tests.fixtures.ledger import mixed_load
from tests.services.coordinator.test_crash_recovery import service_process

SCRAPE_TIMEOUT_SECONDS = 5
POLL_INTERVAL_SECONDS = 0.2
# Our own coordinator audits this often, so that a short load sees several runs.
AUDIT_INTERVAL_SECONDS = 1
AUDIT_RUN_WAIT_SECONDS_MAX = 30
LOAD_CLIENTS = 6
LOAD_SECONDS = 8
AUDIT_RUNS_UNDER_LOAD_MIN = 3
FUNDING_MINOR = 10_000_000
AMOUNT_MINOR = 7
# A frozen shard: transfers sent to it, and how long they have to pile up before we look.
FROZEN_TRANSFERS = 40
FROZEN_CALL_TIMEOUT_SECONDS = 8
PILE_UP_SECONDS = 1.5
FREEZE_SECONDS_MAX = 30
WATCH_CHANGE_WAIT_SECONDS_MAX = 30

Samples = dict[tuple[str, frozenset], float]


def scrape(endpoint: str) -> Samples:
    with urllib.request.urlopen(f"http://{endpoint}/metrics", timeout=SCRAPE_TIMEOUT_SECONDS) as response:
        text = response.read().decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text) for sample in family.samples
    }


def value(samples: Samples, name: str, **labels) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def endpoints(cluster: dict, role: str) -> list[str]:
    return [p["metrics"] for p in cluster["processes"] if p.get("role") == role and p.get("metrics")]


def test_every_worker_and_coordinator_shows_every_shard(cluster, shard_map):
    shard_names = [shard.name for shard in shard_map.shards]
    workers, coordinators = endpoints(cluster, "grpc"), endpoints(cluster, "coordinator")
    assert workers and coordinators
    for endpoint in workers + coordinators:
        samples = scrape(endpoint)
        where = f"{endpoint}: "
        for shard in shard_names:
            for name, labels in [
                ("corebank_group_commit_queue_transfers", {}), ("corebank_group_commit_oldest_wait_seconds", {}),
                ("corebank_db_pool_connections", {"state": "in_use"}), ("corebank_db_pool_connections", {"state": "idle"}),
                ("corebank_db_pool_requests_waiting", {}), ("corebank_db_pool_timeouts_total", {}),
                ("corebank_shard_transaction_duration_seconds_count", {}), ("corebank_db_round_trips_total", {}),
                *(("corebank_shard_errors_total", {"kind": kind.value}) for kind in ErrorKind),
                *(("corebank_overload_refusals_total", {"cause": cause}) for cause in ("queue_full", "queue_wait")),
            ]:
                assert value(samples, name, shard=shard, **labels) is not None, where + f"no {name}{labels} for {shard}"
            assert value(samples, "corebank_db_pool_connections_max", shard=shard) > 0, where + shard
        assert value(samples, "corebank_group_commit_queue_transfers_limit") > 0
        assert value(samples, "corebank_group_commit_queue_wait_limit_seconds") > 0
        assert value(samples, "corebank_tcc_transfers_in_flight") is not None
        assert value(samples, "corebank_shard_map_version") >= shard_map.version
        assert value(samples, "corebank_etcd_watch_connected") == 1, where + "the shard-map watch is not connected"
        assert value(samples, "corebank_etcd_watch_reconnects_total") is not None
    for endpoint in workers:  # integrity is the coordinators' to tell
        assert value(scrape(endpoint), "corebank_audit_last_run_timestamp_seconds") is None
    for endpoint in coordinators:
        samples = scrape(endpoint)
        assert value(samples, "corebank_tcc_in_doubt_bound_seconds") == in_doubt_bound_seconds(PENDING_TIMEOUT_SECONDS)
        for invariant in SHARD_INVARIANTS:
            assert value(samples, "corebank_audit_violations", invariant=str(invariant)) == 0
        assert value(samples, "corebank_collection_backlog_minor", currency="USD") is not None
        # Sweeps run at every recovery scan (1 s): the last one is recent.
        assert time.time() - value(samples, "corebank_collection_last_sweep_timestamp_seconds") < AUDIT_RUN_WAIT_SECONDS_MAX


def auditing_coordinator(cluster: dict, name: str):
    """A coordinator of our own that audits every AUDIT_INTERVAL_SECONDS, as the auditor role; its metrics endpoint."""
    metrics_port = processes.free_port()
    passfile = passfile_path(secrets_dir(pathlib.Path(cluster["state_dir"])), DatabaseRole.AUDITOR)
    started = service_process(
        "services.coordinator", cluster, name, {"COREBANK_AUDIT_INTERVAL_SECONDS": str(AUDIT_INTERVAL_SECONDS)}, listen=False,
        metrics_port=metrics_port, arguments=("--audit-passfile", str(passfile)),
    )
    return started, f"127.0.0.1:{metrics_port}"


def audit_runs(endpoint: str) -> tuple[float, float | None, float]:
    """(last run's time, its ok, its violations) as the coordinator shows them now; (0, None, 0) before it answers."""
    try:
        samples = scrape(endpoint)
    except OSError:
        return 0.0, None, 0.0
    violations = sum(v for (name, _), v in samples.items() if name == "corebank_audit_violations")
    return value(samples, "corebank_audit_last_run_timestamp_seconds") or 0.0, value(samples, "corebank_audit_ok"), violations


def test_the_periodic_audit_stays_ok_while_transfers_between_shards_run(cluster, ledger):
    started, endpoint = auditing_coordinator(cluster, "auditing-coordinator")
    runs: dict[float, tuple[float | None, float]] = {}
    with started:
        deadline = time.monotonic() + AUDIT_RUN_WAIT_SECONDS_MAX
        while audit_runs(endpoint)[1] is None:  # its first run, before the load
            assert time.monotonic() < deadline, "no periodic audit run"
            time.sleep(POLL_INTERVAL_SECONDS)
        with mixed_load(ledger, LOAD_CLIENTS, FUNDING_MINOR, AMOUNT_MINOR) as done:
            load_started = time.time()
            load_deadline = time.monotonic() + LOAD_SECONDS
            while time.monotonic() < load_deadline or len([t for t in runs if t > load_started]) < AUDIT_RUNS_UNDER_LOAD_MIN:
                assert time.monotonic() < load_deadline + AUDIT_RUN_WAIT_SECONDS_MAX, f"too few audit runs under load: {runs}"
                finished_at, ok, violations = audit_runs(endpoint)
                if finished_at:
                    runs[finished_at] = (ok, violations)
                time.sleep(POLL_INTERVAL_SECONDS)
    under_load = {t: result for t, result in runs.items() if t > load_started}
    print(f"\nperiodic audits under load: {len(under_load)}; load: {done}")
    assert done["transfers"] > 0
    assert len(under_load) >= AUDIT_RUNS_UNDER_LOAD_MIN
    assert all(result == (1, 0) for result in runs.values()), f"a periodic audit found violations under load: {runs}"


def test_a_frozen_shard_shows_in_its_queue_or_its_pool(cluster, cluster_control, ledger, shard_map):
    shard = shard_map.shards[-1].name
    payer, payee = ledger.funded(FUNDING_MINOR, shard), ledger.open(shard=shard)
    workers = endpoints(cluster, "grpc")
    with shard_frozen(cluster_control, shard, FREEZE_SECONDS_MAX):
        calls = [
            ledger.payments.Transfer.future(
                payments_pb2.TransferRequest(
                    transfer_id=ledger.unique_id("frozen"), debit_account_id=payer.account_id,
                    credit_account_id=payee.account_id, amount_minor=1, currency="USD",
                ),
                timeout=FROZEN_CALL_TIMEOUT_SECONDS,
            )
            for _ in range(FROZEN_TRANSFERS)
        ]
        time.sleep(PILE_UP_SECONDS)
        seen = [scrape(endpoint) for endpoint in workers]
    for call in calls:  # answered, one way or another, once the shard is back
        call.exception()

    def most(name: str, **labels) -> float:
        return max(value(samples, name, shard=shard, **labels) or 0 for samples in seen)

    queued, waited_seconds = most("corebank_group_commit_queue_transfers"), most("corebank_group_commit_oldest_wait_seconds")
    waiting, in_use = most("corebank_db_pool_requests_waiting"), most("corebank_db_pool_connections", state="in_use")
    print(f"\nfrozen {shard}: queued {queued}, oldest wait {waited_seconds:.2f}s, pool waiting {waiting}, in use {in_use}")
    assert in_use >= 1  # held by transactions the frozen shard does not answer
    assert (queued > 0 and waited_seconds >= PILE_UP_SECONDS / 2) or waiting > 0


def test_the_shard_map_watch_says_when_etcd_is_lost_and_found_again(cluster, cluster_control):
    watched = endpoints(cluster, "grpc") + endpoints(cluster, "coordinator")
    reconnects_before = {e: value(scrape(e), "corebank_etcd_watch_reconnects_total") for e in watched}

    def wait_for(connected: int) -> None:
        deadline = time.monotonic() + WATCH_CHANGE_WAIT_SECONDS_MAX
        while any(value(scrape(e), "corebank_etcd_watch_connected") != connected for e in watched):
            assert time.monotonic() < deadline, f"the watch did not read {connected} in every process"
            time.sleep(POLL_INTERVAL_SECONDS)

    with etcd_stopped(cluster_control):
        wait_for(0)
    wait_for(1)
    for endpoint in watched:
        assert value(scrape(endpoint), "corebank_etcd_watch_reconnects_total") >= reconnects_before[endpoint] + 1

