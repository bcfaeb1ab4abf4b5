"""The group committer's queueing logic, with a stand-in for the database."""

import asyncio
import gc

import pytest

from services.group_commit import BATCH_TRANSFERS_MAX, BATCHES_IN_FLIGHT_MAX, GroupCommitter
from services.ledger import errors
from services.ledger.limits import TierLimits
from services.ledger.transfers import TransferRequest
from services.storage.batch_posting import Outcome


def request(number: int) -> TransferRequest:
    return TransferRequest(f"t-{number}", "acc_a", "acc_b", 1, "USD")


class SlowDatabase:
    """Records each batch; commits only when released."""

    def __init__(self):
        self.batches: list[list[list[TransferRequest]]] = []
        self.release = asyncio.Event()

    async def post(self, store, chains, limits, timeout_seconds):
        self.batches.append(chains)
        await self.release.wait()
        return [[Outcome() for _ in chain] for chain in chains]


def committer(database, queue_transfers_max=10_000):
    return GroupCommitter("shard-0", lambda: None, TierLimits.load(), post=database.post, queue_transfers_max=queue_transfers_max)


def test_concurrent_transfers_share_batches_and_each_gets_its_own_outcomes():
    async def scenario():
        database = SlowDatabase()
        shard = committer(database)
        deadline = asyncio.get_running_loop().time() + 10
        calls = [asyncio.create_task(shard.submit([[request(n)]], deadline)) for n in range(50)]
        await asyncio.sleep(0.05)
        database.release.set()
        results = await asyncio.gather(*calls)
        return database.batches, results

    batches, results = asyncio.run(scenario())
    assert len(batches) < 50  # coalesced: the first batch commits while the rest queue up
    assert sorted(r.transfer_id for batch in batches for chain in batch for r in chain) == sorted(f"t-{n}" for n in range(50))
    assert all(len(result) == 1 and len(result[0]) == 1 for result in results)


def test_a_full_queue_refuses_at_once_with_overloaded():
    async def scenario():
        database = SlowDatabase()
        shard = committer(database, queue_transfers_max=10)
        deadline = asyncio.get_running_loop().time() + 10
        in_flight = []
        for worker in range(BATCHES_IN_FLIGHT_MAX):  # every worker takes a batch and waits on the database
            in_flight.append(asyncio.create_task(shard.submit([[request(100 + worker)]], deadline)))
            await asyncio.sleep(0.01)
        queued = [asyncio.create_task(shard.submit([[request(n)]], deadline)) for n in range(1, 11)]
        await asyncio.sleep(0.01)
        with pytest.raises(errors.Overloaded):
            await shard.submit([[request(99)]], deadline)
        database.release.set()
        await asyncio.gather(*in_flight, *queued)
        return shard.queued_transfers

    assert asyncio.run(scenario()) == 0


def test_chains_are_never_split_and_batches_stay_bounded():
    async def scenario():
        database = SlowDatabase()
        database.release.set()
        shard = committer(database)
        deadline = asyncio.get_running_loop().time() + 10
        chains = [[request(n), request(n + 1)] for n in range(0, 2 * BATCH_TRANSFERS_MAX + 2, 2)]
        await shard.submit(chains, deadline)
        return database.batches

    batches = asyncio.run(scenario())
    assert all(sum(len(chain) for chain in batch) <= BATCH_TRANSFERS_MAX for batch in batches)
    assert all(len(chain) == 2 for batch in batches for chain in batch)


def test_a_caller_whose_deadline_passes_gets_deadline_exceeded():
    async def scenario():
        database = SlowDatabase()
        shard = committer(database)
        with pytest.raises(errors.DeadlineExceeded):
            await shard.submit([[request(1)]], asyncio.get_running_loop().time() + 0.05)
        database.release.set()

    asyncio.run(scenario())


def test_a_queue_that_has_waited_too_long_refuses_new_callers_at_once():
    async def scenario():
        database = SlowDatabase()
        shard = GroupCommitter("shard-0", lambda: None, TierLimits.load(), post=database.post, queue_wait_seconds_max=0.05)
        deadline = asyncio.get_running_loop().time() + 10
        in_flight = []
        for worker in range(BATCHES_IN_FLIGHT_MAX + 1):  # the last one stays queued
            in_flight.append(asyncio.create_task(shard.submit([[request(worker)]], deadline)))
            await asyncio.sleep(0.01)
        accepted_while_fresh = asyncio.create_task(shard.submit([[request(50)]], deadline))
        await asyncio.sleep(0.1)  # the oldest queued transfer has now waited past the bound
        with pytest.raises(errors.Overloaded):
            await shard.submit([[request(99)]], deadline)
        database.release.set()
        await asyncio.gather(*in_flight, accepted_while_fresh)

    asyncio.run(scenario())


def test_a_permanent_fault_of_one_callers_batch_fails_that_caller_alone():
    """Issue 7, finding 6: no error in one caller's request may fail its neighbours in a shared batch."""

    class PoisonedDatabase(SlowDatabase):
        async def post(self, store, chains, limits, timeout_seconds):
            await super().post(store, chains, limits, timeout_seconds)
            if any(r.transfer_id == "t-poison" for chain in chains for r in chain):
                raise errors.InternalFault("a constraint the rules should have kept")
            return [[Outcome() for _ in chain] for chain in chains]

    async def scenario():
        database = PoisonedDatabase()
        database.release.set()
        shard = committer(database)
        deadline = asyncio.get_running_loop().time() + 10
        poisoned = asyncio.create_task(shard.submit([[TransferRequest("t-poison", "acc_a", "acc_b", 1, "USD")]], deadline))
        healthy = [asyncio.create_task(shard.submit([[request(n)]], deadline)) for n in range(20)]
        return await asyncio.gather(poisoned, *healthy, return_exceptions=True), database.batches

    (poisoned, *healthy), batches = asyncio.run(scenario())
    assert isinstance(poisoned, errors.InternalFault)
    assert all(isinstance(result, list) for result in healthy), healthy
    assert any(len(batch) > 1 and any(r.transfer_id == "t-poison" for c in batch for r in c) for batch in batches), (
        "the poisoned transfer never shared a batch: the test proves nothing"
    )


def test_an_outage_fails_the_whole_batch_without_retrying_each_job():
    class DownDatabase(SlowDatabase):
        async def post(self, store, chains, limits, timeout_seconds):
            self.batches.append(chains)
            raise errors.ShardUnavailable("shard-0 is down")

    async def scenario():
        database = DownDatabase()
        shard = committer(database)
        deadline = asyncio.get_running_loop().time() + 10
        results = await asyncio.gather(*(shard.submit([[request(n)]], deadline) for n in range(10)), return_exceptions=True)
        return results, database.batches

    results, batches = asyncio.run(scenario())
    assert all(isinstance(result, errors.ShardUnavailable) for result in results)
    assert sum(len(batch) for batch in batches) == 10  # each transfer was sent once, not once more alone


def test_callers_that_give_up_leave_the_workers_running_and_their_jobs_applied():
    """A caller past its deadline, or cancelled, leaves its job queued: the batch applies it (its
    outcome waits for a retry with the same id), and the worker that finishes it carries on."""

    async def scenario():
        database = SlowDatabase()
        shard = committer(database)
        loop = asyncio.get_running_loop()
        with pytest.raises(errors.DeadlineExceeded):
            await shard.submit([[request(1)]], loop.time() + 0.05)
        cancelled = asyncio.create_task(shard.submit([[request(2)]], loop.time() + 10))
        await asyncio.sleep(0.01)
        cancelled.cancel()
        with pytest.raises(asyncio.CancelledError):
            await cancelled
        database.release.set()
        later = await shard.submit([[request(3)]], loop.time() + 10)
        return later, database.batches, [worker for worker in shard._workers if worker.done()]

    later, batches, dead_workers = asyncio.run(scenario())
    assert len(later) == 1 and len(later[0]) == 1
    assert {r.transfer_id for batch in batches for chain in batch for r in chain} == {"t-1", "t-2", "t-3"}
    assert not dead_workers


class FailingWhenReleased(SlowDatabase):
    """Fails every batch (an outage), once released."""

    async def post(self, store, chains, limits, timeout_seconds):
        self.batches.append(chains)
        await self.release.wait()
        raise errors.ShardUnavailable("shard-0 is down")


@pytest.mark.parametrize("call", ["submit", "submit_each"])
def test_a_cancelled_caller_leaves_no_unread_failure_for_asyncio_to_log(call):
    """A client that gives up (its call cancelled) while its batches still run: when they fail
    later, nobody reads the failure, and asyncio must not report it as lost (an ERROR with a
    traceback, "exception was never retrieved"), for a call of several jobs (submit) and of
    one job per item (submit_each) alike."""
    transfers = BATCH_TRANSFERS_MAX + 1  # two jobs, two batches
    reported: list[str] = []

    async def scenario() -> int:
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(lambda _, context: reported.append(context["message"]))
        database = FailingWhenReleased()
        shard = committer(database)
        deadline = loop.time() + 10
        if call == "submit":
            caller = asyncio.create_task(shard.submit([[request(n)] for n in range(transfers)], deadline))
        else:
            caller = asyncio.create_task(shard.submit_each([request(n) for n in range(transfers)], deadline))
        await asyncio.sleep(0.01)
        caller.cancel()
        await asyncio.wait([caller])
        database.release.set()
        while shard.queued_transfers or len(database.batches) < 2:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)  # the last batch's failure reaches its jobs' futures
        return sum(len(chains) for chains in database.batches)

    assert asyncio.run(scenario()) == transfers  # every job was tried, and failed
    gc.collect()  # the loop and its tasks are gone: an unread failure is reported as its future is collected
    assert reported == []
