"""Prometheus metrics of the storage adapter (a storage module never imports the API layer).

Per shard, as this process sees it: the database work it does (round trips, transactions
and their latency, failures by kind) and its connection pool. The pool's figures are read
from psycopg_pool at scrape time (PoolCollector), so they are exact and cost nothing per call.
"""

from __future__ import annotations

import dataclasses
import enum
import threading
from collections.abc import Iterable, Iterator

from prometheus_client import REGISTRY, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

# One per batch of statements sent (Session.run), whichever layer sent it: `make bench` divides
# its increase by the transfers of a window to report round trips per transfer.
DB_ROUND_TRIPS = Counter(
    "corebank_db_round_trips", "Batches of statements sent to a shard, one round trip each", ["shard"]
)
# From 0.5 ms to 10 s: a batch's transaction is a few ms; lock waits, fsync stalls and a
# frozen shard show in the tail (a transaction is bounded by its caller's deadline, 10 s at most).
TRANSACTION_BUCKETS_SECONDS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)
TRANSACTION_DURATION = Histogram(
    "corebank_shard_transaction_duration_seconds",
    "One database transaction (a session: a batch, a TCC step), from holding its connection to its end",
    ["shard"], buckets=TRANSACTION_BUCKETS_SECONDS,
)
SHARD_ERRORS = Counter(
    "corebank_shard_errors", "Failed database work on a shard, by kind (unavailable, timeout, conflict, other)", ["shard", "kind"]
)


class ErrorKind(enum.StrEnum):
    """What went wrong with a shard's transaction (services/storage/shard_store.py, error_kind)."""

    UNAVAILABLE = "unavailable"  # no connection, a lost one, a server shutting down or full
    TIMEOUT = "timeout"  # the caller's deadline passed (statement_timeout or our own timer)
    CONFLICT = "conflict"  # deadlock, serialization failure, lock not available, a key a racing transaction took
    OTHER = "other"  # anything else: a bug or a broken invariant, logged where it is mapped


@dataclasses.dataclass(frozen=True)
class ShardInstruments:
    """A shard's metric children, looked up once: labels() takes a lock and builds a key each time,
    and these are touched by every transaction."""

    round_trips: Counter
    transaction_seconds: Histogram
    errors: dict[ErrorKind, Counter]


# One entry per shard of the map (names chosen by operators, never by callers).
_INSTRUMENTS_BY_SHARD: dict[str, ShardInstruments] = {}


def for_shard(shard_name: str) -> ShardInstruments:
    """The shard's children; the first call creates them, at 0 (so that rates read 0, not "no data")."""
    instruments = _INSTRUMENTS_BY_SHARD.get(shard_name)
    if instruments is None:
        instruments = _INSTRUMENTS_BY_SHARD[shard_name] = ShardInstruments(
            DB_ROUND_TRIPS.labels(shard_name),
            TRANSACTION_DURATION.labels(shard_name),
            {kind: SHARD_ERRORS.labels(shard_name, kind.value) for kind in ErrorKind},
        )
    return instruments


# psycopg_pool's get_stats() keys (psycopg_pool.base.BasePool).
POOL_MAX = "pool_max"
POOL_SIZE = "pool_size"
POOL_AVAILABLE = "pool_available"
REQUESTS_WAITING = "requests_waiting"
# Requests that ended in an error while waiting for a connection: a timeout (the pool's, or the
# caller's deadline cancelling the wait) or a full waiting queue.
REQUESTS_ERRORS = "requests_errors"
# The pool's counters are a dict the event loop thread updates while a scrape reads it from the
# HTTP server's thread; a copy that meets a new key being added is simply made again.
STATS_READ_ATTEMPTS_MAX = 5


def pool_stats(pool) -> dict[str, int]:
    for _ in range(STATS_READ_ATTEMPTS_MAX - 1):
        try:
            return pool.get_stats()
        except RuntimeError:  # "dictionary changed size during iteration"
            continue
    return pool.get_stats()


@dataclasses.dataclass(frozen=True)
class PoolFigures:
    """One shard's pool figures, summed over its pools in this process (a new shard map may open
    a new pool for a shard while the old one closes)."""

    in_use: int = 0
    idle: int = 0
    max: int = 0
    waiting: int = 0
    timeouts: int = 0

    def __add__(self, stats: dict[str, int]) -> PoolFigures:
        idle = stats.get(POOL_AVAILABLE, 0)
        return PoolFigures(
            self.in_use + stats.get(POOL_SIZE, 0) - idle, self.idle + idle, self.max + stats.get(POOL_MAX, 0),
            self.waiting + stats.get(REQUESTS_WAITING, 0), self.timeouts + stats.get(REQUESTS_ERRORS, 0),
        )


def pool_families(figures_by_shard: dict[str, PoolFigures]) -> Iterator[Metric]:
    """The exposition of every shard's pool figures (deploy/prometheus/metrics.md, "Shards")."""
    connections = GaugeMetricFamily("corebank_db_pool_connections", "Pool connections to the shard, by state", labels=["shard", "state"])
    connections_max = GaugeMetricFamily("corebank_db_pool_connections_max", "The pool's max size", labels=["shard"])
    waiting = GaugeMetricFamily("corebank_db_pool_requests_waiting", "Callers waiting for a connection now", labels=["shard"])
    timeouts = CounterMetricFamily(
        "corebank_db_pool_timeouts", "Callers that gave up waiting for a connection (a timeout, or their deadline)", labels=["shard"]
    )
    for shard_name, figures in sorted(figures_by_shard.items()):
        connections.add_metric([shard_name, "in_use"], figures.in_use)
        connections.add_metric([shard_name, "idle"], figures.idle)
        connections_max.add_metric([shard_name], figures.max)
        waiting.add_metric([shard_name], figures.waiting)
        timeouts.add_metric([shard_name], figures.timeouts)
    yield from (connections, connections_max, waiting, timeouts)


class PoolCollector:
    """Every shard pool of this process, read at scrape time (prometheus_client's Collector protocol).

    Pools are tracked while open (services/bootstrap.py). A closed pool's timeouts stay in its
    shard's count, so that the counter never goes back while the shard is in the map.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()  # tracking runs on the event loop, collect() on a scrape thread
        self._pools: dict[int, tuple[str, object]] = {}  # id(pool) -> (shard, pool)
        self._retired_timeouts: dict[str, int] = {}

    def track(self, shard_name: str, pool) -> None:
        with self._lock:
            self._pools[id(pool)] = (shard_name, pool)

    def forget(self, pool) -> None:
        timeouts = pool_stats(pool).get(REQUESTS_ERRORS, 0)
        with self._lock:
            tracked = self._pools.pop(id(pool), None)
            if tracked is not None:
                self._retired_timeouts[tracked[0]] = self._retired_timeouts.get(tracked[0], 0) + timeouts

    def shard_names(self) -> set[str]:
        """The shards this process has a pool for: the shard map in force."""
        with self._lock:
            return {shard_name for shard_name, _ in self._pools.values()}

    def figures(self) -> dict[str, PoolFigures]:
        with self._lock:
            pools = list(self._pools.values())
            retired = dict(self._retired_timeouts)
        figures: dict[str, PoolFigures] = {}
        for shard_name, pool in pools:
            figures[shard_name] = figures.get(shard_name, PoolFigures(timeouts=retired.get(shard_name, 0))) + pool_stats(pool)
        return figures

    def collect(self) -> Iterable[Metric]:
        return pool_families(self.figures())


POOLS = PoolCollector()
REGISTRY.register(POOLS)
