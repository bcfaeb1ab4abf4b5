"""What one transfer costs, split across the cluster: CPU of the service workers, the
coordinators and PostgreSQL, commits, and database round trips (issue 8).

The driver reads everything at both edges of a measured window (driver.WindowMeter):
CPU from /proc for the processes cluster.json names, `pg_stat_database.xact_commit`
from every shard, and `corebank_db_round_trips_total` (one per batch of statements a
`Session` sends) from every process's metrics endpoint. Each increase is then divided
by the operations the window counted (transfers, or pgbench's transactions).

PostgreSQL publishes a backend's counts when it goes idle, at most once a second, so
the commit counts lag the window by up to a second at both edges: right over windows
of several seconds at a steady rate, not over one second.
"""

from __future__ import annotations

import dataclasses
import sys
import urllib.request
from collections.abc import Iterable

import psycopg
from prometheus_client.parser import text_string_to_metric_families

from loadtest.cluster import Cluster, ShardEndpoint
from loadtest.driver import ScenarioResult

COMMITS = "commits"
DB_ROUND_TRIPS = "db_round_trips"
# prometheus_client exposes a Counter named corebank_db_round_trips with this sample name.
DB_ROUND_TRIPS_SAMPLE = "corebank_db_round_trips_total"
# Reading counters must not stall a window's edge for long; a source that does not answer
# in time leaves its counter out of that window (printed as "-").
COUNTER_READ_TIMEOUT_SECONDS = 2

# Roles of cluster.json's processes, by the cost they stand for.
SERVICE_ROLE, COORDINATOR_ROLE, DATABASE_ROLE = "grpc", "coordinator", "postgres"


def commits(shards: Iterable[ShardEndpoint]) -> float:
    """Transactions committed so far on the shards' servers, every database included (so
    pgbench's baseline database counts for its own row)."""
    total = 0
    for shard in shards:
        with psycopg.connect(
            shard.superuser_conninfo("postgres"), autocommit=True, connect_timeout=COUNTER_READ_TIMEOUT_SECONDS
        ) as connection:
            total += connection.execute("SELECT coalesce(sum(xact_commit), 0) FROM pg_stat_database").fetchone()[0]
    return float(total)


def round_trips_in(metrics_text: str) -> float:
    """Sum of corebank_db_round_trips_total over its shards in one /metrics page."""
    return sum(
        sample.value
        for family in text_string_to_metric_families(metrics_text)
        for sample in family.samples
        if sample.name == DB_ROUND_TRIPS_SAMPLE
    )


def round_trips(metrics_endpoints: Iterable[str]) -> float:
    total = 0.0
    for endpoint in metrics_endpoints:
        with urllib.request.urlopen(f"http://{endpoint}/metrics", timeout=COUNTER_READ_TIMEOUT_SECONDS) as response:  # nosec B310 # a literal http:// URL to a cluster endpoint
            total += round_trips_in(response.read().decode())
    return total


def metrics_endpoints(cluster: Cluster) -> list[str]:
    """Every process's metrics endpoint: the gRPC workers' (`metrics_endpoints`) and the
    coordinators', whose recovery also talks to the shards."""
    found = list(cluster.raw.get("metrics_endpoints", []))
    found += [process["metrics"] for process in cluster.raw.get("processes", []) if process.get("metrics")]
    return list(dict.fromkeys(found))


class ClusterCounters:
    """A driver.CounterSampler: the cluster's commits and, unless left out, its round trips."""

    def __init__(self, cluster: Cluster, with_round_trips: bool = True) -> None:
        self._shards = cluster.shards
        self._metrics_endpoints = metrics_endpoints(cluster) if with_round_trips else []

    def __call__(self) -> dict[str, float]:
        counters = {}
        try:
            counters[COMMITS] = commits(self._shards)
        except psycopg.Error as error:
            print(f"[bench] commits not read: {error}", file=sys.stderr)
        if self._metrics_endpoints:
            try:
                counters[DB_ROUND_TRIPS] = round_trips(self._metrics_endpoints)
            except OSError as error:
                print(f"[bench] round trips not read: {error}", file=sys.stderr)
        return counters


def role_by_process(cluster: Cluster) -> dict[str, str]:
    """cluster.json's process names (grpc-0, coordinator-1, shard-2, etcd) -> their role."""
    return {process["name"]: process["role"] for process in cluster.raw.get("processes", [])}


@dataclasses.dataclass(frozen=True)
class CostSplit:
    """Per operation (a transfer; a transaction for pgbench) over one window; None: not measured."""

    service_cpu_ms: float | None
    coordinator_cpu_ms: float | None
    database_cpu_ms: float | None
    commits: float | None
    db_round_trips: float | None


def cost_split(result: ScenarioResult, roles: dict[str, str]) -> CostSplit | None:
    """The window's CPU seconds by role and counter increases, each divided by its operations."""
    if not result.ok_count:
        return None

    def cpu_ms(role: str) -> float | None:
        seconds = [cpu for name, cpu in result.process_cpu_seconds.items() if roles.get(name) == role]
        return 1000.0 * sum(seconds) / result.ok_count if seconds else None

    def per_operation(counter: str) -> float | None:
        delta = result.counter_deltas.get(counter)
        return None if delta is None else delta / result.ok_count

    return CostSplit(
        service_cpu_ms=cpu_ms(SERVICE_ROLE),
        coordinator_cpu_ms=cpu_ms(COORDINATOR_ROLE),
        database_cpu_ms=cpu_ms(DATABASE_ROLE),
        commits=per_operation(COMMITS),
        db_round_trips=per_operation(DB_ROUND_TRIPS),
    )


def _figure(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


COST_COLUMNS_HEADER = f"{'service ms':>10} {'coord. ms':>9} {'db ms':>7} {'commits':>8} {'round trips':>11}"
COST_LABEL_WIDTH = 34


def cost_cells(split: CostSplit | None) -> str:
    """The cost columns of one row, under COST_COLUMNS_HEADER."""
    if split is None:
        return f"{'(nothing measured)':>{len(COST_COLUMNS_HEADER)}}"
    return (
        f"{_figure(split.service_cpu_ms, 2):>10} {_figure(split.coordinator_cpu_ms, 2):>9} "
        f"{_figure(split.database_cpu_ms, 2):>7} {_figure(split.commits, 2):>8} {_figure(split.db_round_trips, 2):>11}"
    )


def format_cost_rows(rows: Iterable[tuple[str, CostSplit | None]]) -> list[str]:
    """A table of one line per (label, split)."""
    header = f"{'cost per transfer':<{COST_LABEL_WIDTH}} {COST_COLUMNS_HEADER}"
    lines = [header, "-" * len(header)]
    lines += [f"{label:<{COST_LABEL_WIDTH}} {cost_cells(split)}" for label, split in rows]
    return lines
