"""The group committer's queues as metrics: depth and oldest wait read at scrape time, refusals by cause."""

from __future__ import annotations

import asyncio
import time

from prometheus_client import REGISTRY

from services.group_commit import BATCHES_IN_FLIGHT_MAX, QUEUE_TRANSFERS_MAX, QUEUE_WAIT_SECONDS_MAX, GroupCommitter, queue_families
from services.ledger import errors
from services.ledger.limits import TierLimits
from services.ledger.transfers import TransferRequest
from services.storage.batch_posting import Outcome

WAIT_SECONDS = 0.3


class HeldDatabase:
    """Takes batches and commits none until released."""

    def __init__(self) -> None:
        self.release = asyncio.Event()

    async def post(self, store, chains, limits, timeout_seconds):
        await self.release.wait()
        return [[Outcome() for _ in chain] for chain in chains]


def request(number: int) -> TransferRequest:
    return TransferRequest(f"t-{number}", "acc_a", "acc_b", 1, "USD")


async def hold_every_worker(committer: GroupCommitter, deadline: float) -> list[asyncio.Task]:
    """One transfer per worker, each taken alone (a worker takes all that has queued) and held."""
    held = []
    for number in range(BATCHES_IN_FLIGHT_MAX):
        held.append(asyncio.create_task(committer.submit([[request(1000 + number)]], deadline)))
        await asyncio.sleep(0.01)
    return held


def sample(name: str, **labels) -> float | None:
    return REGISTRY.get_sample_value(name, labels)


def test_queue_depth_and_oldest_wait_are_read_at_scrape_time():
    shard = "shard-queue-metrics"

    async def scenario() -> tuple[float | None, float, float, float | None, float | None]:
        database = HeldDatabase()
        committer = GroupCommitter(shard, lambda: None, TierLimits.load(), post=database.post)
        before = sample("corebank_group_commit_queue_transfers", shard=shard)
        deadline = asyncio.get_running_loop().time() + 10
        calls = await hold_every_worker(committer, deadline)
        calls += [asyncio.create_task(committer.submit([[request(n)]], deadline)) for n in range(5)]  # these wait in the queue
        await asyncio.sleep(WAIT_SECONDS)
        queued = sample("corebank_group_commit_queue_transfers", shard=shard)
        waited_seconds = sample("corebank_group_commit_oldest_wait_seconds", shard=shard)
        time.sleep(0.1)  # the event loop does nothing meanwhile: the wait still grows, read by the scrape
        waited_later_seconds = sample("corebank_group_commit_oldest_wait_seconds", shard=shard)
        database.release.set()
        await asyncio.gather(*calls)
        return before, queued, waited_seconds, waited_later_seconds, sample("corebank_group_commit_queue_transfers", shard=shard)

    before, queued, waited_seconds, waited_later_seconds, after = asyncio.run(scenario())
    assert before == 0  # a committer's shard is shown from its start
    assert queued == 5
    assert WAIT_SECONDS <= waited_seconds < WAIT_SECONDS + 5
    assert waited_later_seconds >= waited_seconds + 0.1
    assert after == 0
    assert sample("corebank_group_commit_queue_transfers_limit") == QUEUE_TRANSFERS_MAX
    assert sample("corebank_group_commit_queue_wait_limit_seconds") == QUEUE_WAIT_SECONDS_MAX


def test_a_shards_queues_add_up_and_its_oldest_wait_is_the_longest():
    families = {family.name: family for family in queue_families({"shard-0": 7, "shard-1": 0}, {"shard-0": 0.25})}
    queued = {s.labels["shard"]: s.value for s in families["corebank_group_commit_queue_transfers"].samples}
    waited = {s.labels["shard"]: s.value for s in families["corebank_group_commit_oldest_wait_seconds"].samples}
    assert queued == {"shard-0": 7, "shard-1": 0}
    assert waited == {"shard-0": 0.25, "shard-1": 0.0}  # every shard shown, 0 when nothing waits


def test_refusals_are_counted_by_cause_and_shard():
    shard = "shard-refusal-metrics"

    def refusals(cause: str) -> float:
        return sample("corebank_overload_refusals_total", cause=cause, shard=shard) or 0.0

    async def scenario() -> None:
        database = HeldDatabase()
        committer = GroupCommitter(shard, lambda: None, TierLimits.load(), post=database.post, queue_transfers_max=3,
                                   queue_wait_seconds_max=WAIT_SECONDS)
        deadline = asyncio.get_running_loop().time() + 10
        held = await hold_every_worker(committer, deadline)
        held.append(asyncio.create_task(committer.submit([[request(1)]], deadline)))
        await asyncio.sleep(0)
        full_before = refusals("queue_full")
        try:
            await committer.submit([[request(100), request(101), request(102)]], deadline)  # 1 queued + 3 > 3
            raise AssertionError("a full queue admitted more")
        except errors.Overloaded:
            pass
        assert refusals("queue_full") == full_before + 1
        await asyncio.sleep(WAIT_SECONDS + 0.05)
        wait_before = refusals("queue_wait")
        try:
            await committer.submit([[request(200)]], deadline)  # room, but the oldest waited too long
            raise AssertionError("a slow queue admitted more")
        except errors.Overloaded:
            pass
        assert refusals("queue_wait") == wait_before + 1
        assert refusals("queue_full") == full_before + 1
        database.release.set()
        await asyncio.gather(*held)

    asyncio.run(scenario())
