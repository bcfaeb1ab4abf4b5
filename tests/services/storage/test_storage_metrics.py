"""The storage adapter's metrics: pool figures read at scrape time, failures by kind, transactions timed."""

from __future__ import annotations

import asyncio

import psycopg
import psycopg.errors
import psycopg_pool
import pytest
from prometheus_client import REGISTRY

from services.ledger import errors
from services.storage import metrics
from services.storage.metrics import ErrorKind, PoolCollector
from services.storage.shard_store import ShardStore, error_kind


class FakePool:
    """What PoolCollector reads of a psycopg_pool pool: get_stats(), with its keys."""

    def __init__(self, size: int, available: int, max_size: int, waiting: int = 0, errors: int = 0, unstable_reads: int = 0):
        self.stats = {
            "pool_min": 2, "pool_max": max_size, "pool_size": size, "pool_available": available,
            "requests_waiting": waiting, "requests_errors": errors, "requests_num": 100,
        }
        self.unstable_reads = unstable_reads

    def get_stats(self) -> dict[str, int]:
        if self.unstable_reads:  # as when the event loop adds a key while a scrape copies the dict
            self.unstable_reads -= 1
            raise RuntimeError("dictionary changed size during iteration")
        return dict(self.stats)


def samples(collector) -> dict[tuple[str, tuple], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in collector.collect() for sample in family.samples
    }


def test_the_pool_collector_shows_each_shards_pools_summed_at_scrape_time():
    collector = PoolCollector()
    old, new, other = FakePool(10, 4, 16, waiting=0, errors=3), FakePool(2, 1, 16, waiting=5, errors=1), FakePool(3, 3, 8)
    collector.track("shard-0", old)
    collector.track("shard-0", new)  # a new map reopened shard-0 while the old pool still closes
    collector.track("shard-1", other)
    found = samples(collector)
    assert found[("corebank_db_pool_connections", (("shard", "shard-0"), ("state", "in_use")))] == (10 - 4) + (2 - 1)
    assert found[("corebank_db_pool_connections", (("shard", "shard-0"), ("state", "idle")))] == 4 + 1
    assert found[("corebank_db_pool_connections_max", (("shard", "shard-0"),))] == 32
    assert found[("corebank_db_pool_requests_waiting", (("shard", "shard-0"),))] == 5
    assert found[("corebank_db_pool_timeouts_total", (("shard", "shard-0"),))] == 4
    assert found[("corebank_db_pool_connections", (("shard", "shard-1"), ("state", "in_use")))] == 0
    assert found[("corebank_db_pool_connections_max", (("shard", "shard-1"),))] == 8
    # Figures change with the pool, with no call in between: they are read at scrape time.
    new.stats["requests_waiting"] = 0
    new.stats["requests_errors"] = 7
    found = samples(collector)
    assert found[("corebank_db_pool_requests_waiting", (("shard", "shard-0"),))] == 0
    assert found[("corebank_db_pool_timeouts_total", (("shard", "shard-0"),))] == 3 + 7


def test_a_closed_pools_timeouts_stay_counted_while_its_shard_has_a_pool():
    collector = PoolCollector()
    old, new = FakePool(2, 2, 16, errors=5), FakePool(2, 2, 16, errors=1)
    collector.track("shard-0", old)
    collector.track("shard-0", new)
    collector.forget(old)
    found = samples(collector)
    assert found[("corebank_db_pool_timeouts_total", (("shard", "shard-0"),))] == 6  # a counter never goes back
    assert found[("corebank_db_pool_connections_max", (("shard", "shard-0"),))] == 16
    assert collector.shard_names() == {"shard-0"}
    collector.forget(new)  # the shard left the map: its series go
    assert samples(collector) == {}
    assert collector.shard_names() == set()


def test_a_stats_read_that_meets_a_change_is_made_again():
    collector = PoolCollector()
    collector.track("shard-0", FakePool(4, 1, 16, unstable_reads=2))
    assert samples(collector)[("corebank_db_pool_connections", (("shard", "shard-0"), ("state", "in_use")))] == 3


def test_the_process_wide_collector_answers_scrapes():
    pool = FakePool(5, 2, 16, waiting=1)
    metrics.POOLS.track("shard-metrics-registered", pool)
    try:
        labels = {"shard": "shard-metrics-registered"}
        assert REGISTRY.get_sample_value("corebank_db_pool_connections", {**labels, "state": "in_use"}) == 3
        assert REGISTRY.get_sample_value("corebank_db_pool_requests_waiting", labels) == 1
    finally:
        metrics.POOLS.forget(pool)
    assert REGISTRY.get_sample_value("corebank_db_pool_requests_waiting", labels) is None


@pytest.mark.parametrize(("error", "kind"), [
    (psycopg.errors.lookup("40001")("serialization"), ErrorKind.CONFLICT),
    (psycopg.errors.lookup("40P01")("deadlock"), ErrorKind.CONFLICT),
    (psycopg.errors.lookup("55P03")("lock not available"), ErrorKind.CONFLICT),
    (psycopg.errors.UniqueViolation("a racing transaction took the key"), ErrorKind.CONFLICT),
    (psycopg.errors.lookup("57014")("statement timeout"), ErrorKind.TIMEOUT),
    (TimeoutError(), ErrorKind.TIMEOUT),
    (psycopg.errors.lookup("08006")("connection failure"), ErrorKind.UNAVAILABLE),
    (psycopg.errors.lookup("57P01")("admin shutdown"), ErrorKind.UNAVAILABLE),
    (psycopg.OperationalError("server closed the connection"), ErrorKind.UNAVAILABLE),
    (psycopg_pool.PoolTimeout(), ErrorKind.UNAVAILABLE),
    (psycopg.errors.lookup("42P01")("undefined table"), ErrorKind.OTHER),
    (psycopg.errors.lookup("23514")("check violation"), ErrorKind.OTHER),
])
def test_each_database_failure_has_one_kind(error, kind):
    assert error_kind(error) is kind


class UnreachablePool:
    """A pool that never hands out a connection."""

    name = "shard-metrics-unreachable"

    async def getconn(self, timeout: float):
        raise psycopg_pool.PoolTimeout(f"couldn't get a connection after {timeout:.2f} sec")


class BrokenConnectionPool:
    """A pool whose connection fails its first statement with `error`, and is given back."""

    name = "shard-metrics-broken"

    def __init__(self, error: psycopg.Error) -> None:
        self.error = error
        self.returned = 0

    async def getconn(self, timeout: float):
        pool = self

        class Cursor:
            closed = False
            adapters = psycopg.adapters

            async def execute(self, statements, params=None):
                raise pool.error

        class Connection:
            _corebank_session_cursor = Cursor()
            broken = False

            class info:
                transaction_status = psycopg.pq.TransactionStatus.IDLE

        return Connection()

    async def putconn(self, connection) -> None:
        self.returned += 1


def value(name: str, **labels) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_a_shard_that_gives_no_connection_counts_as_unavailable():
    shard = UnreachablePool.name
    before = value("corebank_shard_errors_total", shard=shard, kind="unavailable")
    with pytest.raises(errors.ShardUnavailable):
        asyncio.run(ShardStore(shard, UnreachablePool()).get_account("acc_x", 1.0))
    assert value("corebank_shard_errors_total", shard=shard, kind="unavailable") == before + 1
    # No transaction ran, so none is timed; every kind is there, at 0 where nothing happened.
    assert value("corebank_shard_transaction_duration_seconds_count", shard=shard) == 0
    assert REGISTRY.get_sample_value("corebank_shard_errors_total", {"shard": shard, "kind": "conflict"}) == 0


def test_a_failed_transaction_is_timed_and_counted_by_kind():
    pool = BrokenConnectionPool(psycopg.errors.lookup("40P01")("deadlock detected"))
    shard = pool.name
    before = value("corebank_shard_errors_total", shard=shard, kind="conflict")
    timed_before = value("corebank_shard_transaction_duration_seconds_count", shard=shard)
    with pytest.raises(errors.ShardUnavailable):  # a deadlock victim: transient, retried by the caller
        asyncio.run(ShardStore(shard, pool).get_account("acc_x", 1.0))
    assert value("corebank_shard_errors_total", shard=shard, kind="conflict") == before + 1
    assert value("corebank_shard_errors_total", shard=shard, kind="other") == 0
    assert value("corebank_shard_transaction_duration_seconds_count", shard=shard) == timed_before + 1
    assert pool.returned == 1
