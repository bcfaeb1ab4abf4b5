"""The writer, over an in-memory store: batching, order, retries, failover, bounds, close."""

from __future__ import annotations

import asyncio
import itertools
import json

from services.audit_log import chain, writer
from services.audit_log.chain import Link
from services.audit_log.writer import AuditWriter
from services.ledger import errors


class MemoryStore:
    """Shards as dicts keyed like the table's primary key; inserts are ON CONFLICT DO NOTHING."""

    def __init__(self, shard_names=("shard-0", "shard-1", "shard-2")) -> None:
        self.rows: dict[str, dict[tuple[str, int], Link]] = {name: {} for name in shard_names}
        self.failing: set[str] = set()
        self.commits_unseen: set[str] = set()  # stores, then fails as if the answer was lost
        self.inserts: list[tuple[str, int]] = []  # (shard, links) per insert that reached a shard

    def shard_names(self) -> list[str]:
        return list(self.rows)

    def home_shard(self, chain_id: str) -> str:
        return "shard-0"

    async def insert(self, shard_name: str, links: list[Link], timeout_seconds: float) -> None:
        await asyncio.sleep(0.001)
        if shard_name in self.failing:
            raise errors.ShardUnavailable(f"{shard_name} down", shard=shard_name)
        self.inserts.append((shard_name, len(links)))
        for link in links:
            self.rows[shard_name].setdefault((link.entry.chain_id, link.entry.seq), link)
        if shard_name in self.commits_unseen:
            raise errors.DeadlineExceeded(f"{shard_name}: the answer was lost")

    def chains(self, shard_name: str) -> dict[str, list[Link]]:
        rows = sorted(self.rows[shard_name].items())
        return {chain_id: [link for _, link in group] for chain_id, group in itertools.groupby(rows, key=lambda item: item[0][0])}

    def all_links(self) -> list[Link]:
        return [link for shard in self.rows.values() for link in shard.values()]


def events(count: int, start: int = 0) -> list[chain.Event]:
    return [chain.event(n, "gateway", "service", "transfer", f"t-{n}", "", "POSTED") for n in range(start, start + count)]


def targets(links: list[Link], action: str = "transfer") -> list[str]:
    return [link.entry.target for link in links if link.entry.action == action]


def test_events_are_stored_in_order_in_one_chain_that_holds_and_is_closed():
    store = MemoryStore()

    async def scenario():
        log = AuditWriter(store, "grpc-0", {"tier_limits_sha256": "ab"})
        log.start()
        futures = [log.append(events(700, start)) for start in range(0, 2100, 700)]
        assert all([await log.written(future, 5) for future in futures])
        assert await log.close()
        return log.chain_id

    chain_id = asyncio.run(scenario())
    (stored,) = store.chains("shard-0").values()
    assert chain.verify(stored) is None
    report = chain.check(chain_id, stored)
    assert report.closed and report.last_seq == 2100 + 2
    assert targets(stored) == [f"t-{n}" for n in range(2100)]
    opening = stored[0].entry
    assert (opening.seq, opening.action, opening.target) == (1, chain.CHAIN_OPENED, chain_id)
    assert json.loads(opening.detail)["tier_limits_sha256"] == "ab"
    assert chain_id.startswith("grpc-0:")
    assert max(size for _, size in store.inserts) <= writer.BATCH_ENTRIES_MAX


def test_concurrent_callers_share_batches():
    store = MemoryStore()

    async def scenario():
        log = AuditWriter(store, "grpc-0")
        log.start()

        async def call(n):
            return await log.written(log.append(events(1, n)), 5)

        assert all(await asyncio.gather(*(call(n) for n in range(500))))
        await log.close()

    asyncio.run(scenario())
    assert len(store.inserts) < 50  # not one insert per call
    (stored,) = store.chains("shard-0").values()
    assert chain.verify(stored) is None and len(targets(stored)) == 500


def test_a_failing_shard_is_retried_with_the_same_links_and_an_unseen_commit_is_not_stored_twice():
    store = MemoryStore()
    store.commits_unseen.add("shard-0")

    async def scenario():
        log = AuditWriter(store, "grpc-0", failover_after_seconds=60)
        log.start()
        pending = log.append(events(10))
        assert not await log.written(pending, 0.3)  # the caller is answered anyway; its entries stay queued
        store.commits_unseen.clear()
        assert await log.close()

    asyncio.run(scenario())
    (stored,) = store.chains("shard-0").values()
    assert chain.verify(stored) is None
    assert targets(stored) == [f"t-{n}" for n in range(10)]


def test_a_chain_whose_shard_keeps_failing_continues_in_a_new_chain_that_anchors_the_old_one():
    store = MemoryStore()

    async def scenario():
        log = AuditWriter(store, "grpc-0", failover_after_seconds=0.1)
        log.start()
        assert await log.written(log.append(events(5)), 5)
        first_chain = log.chain_id
        store.failing.add("shard-0")
        assert await log.written(log.append(events(5, 5)), 5)
        assert log.shard_name == "shard-1" and log.chain_id != first_chain
        assert await log.close()
        return first_chain, log.chain_id

    first_chain, second_chain = asyncio.run(scenario())
    (old,) = store.chains("shard-0").values()
    (new,) = store.chains("shard-1").values()
    assert chain.verify(old) is None and chain.verify(new) is None
    assert targets(old) == [f"t-{n}" for n in range(5)] and targets(new) == [f"t-{n}" for n in range(5, 10)]
    opening = json.loads(new[0].entry.detail)
    assert opening["left_chain"] == first_chain and opening["cause"] == "failover: SHARD_UNAVAILABLE"
    assert (opening["stored_chain"], opening["stored_seq"], opening["stored_hash"]) == (first_chain, 6, old[-1].hash.hex())
    assert chain.check(second_chain, new).closed and not chain.check(first_chain, old).closed


def test_the_log_refuses_new_calls_when_its_queue_is_full_or_it_stalls():
    store = MemoryStore(("shard-0",))  # nowhere to fail over to
    store.failing.add("shard-0")

    async def scenario():
        log = AuditWriter(store, "grpc-0", queue_entries_max=100, stalled_seconds_max=0.2)
        log.start()
        assert log.admits()
        log.append(events(99))
        assert log.admits()
        log.append(events(1, 99))
        assert not log.admits()  # the queue is full
        await asyncio.sleep(0.05)
        store.failing.clear()
        assert await log.written(log.append(events(1, 100)), 5)
        assert log.admits() and log.backlog == 0
        store.failing.add("shard-0")
        log.append(events(1, 101))
        await asyncio.sleep(0.4)
        assert not log.admits()  # one batch has failed for longer than stalled_seconds_max
        store.failing.clear()
        await asyncio.sleep(0.5)
        assert log.admits()
        await log.close()

    asyncio.run(scenario())
    (stored,) = store.chains("shard-0").values()
    assert chain.verify(stored) is None and len(targets(stored)) == 102


def test_close_reports_entries_it_could_not_store():
    store = MemoryStore(("shard-0",))
    store.failing.add("shard-0")

    async def scenario():
        log = AuditWriter(store, "grpc-0")
        log.start()
        log.append(events(3))
        assert not await log.close(0.2)
        assert not await log.written(log.append(events(1)), 1)  # after close: not stored, and logged

    asyncio.run(scenario())
    assert store.all_links() == []


def test_limits_digest_changes_with_the_limits():
    from services.ledger.limits import TierLimit, TierLimits

    limits = TierLimits.load()
    changed = TierLimits({**limits.by_tier_and_currency, (0, "USD"): TierLimit(1, 1)})
    assert writer.limits_digest(limits) == writer.limits_digest(TierLimits.load())
    assert writer.limits_digest(limits) != writer.limits_digest(changed)
