"""Group commit: concurrent same-shard transfers of this process share one database transaction.

Requests wait in a bounded queue per shard; a few workers per shard each take
whatever has queued (up to BATCH_TRANSFERS_MAX) and apply it in one transaction
(services/storage/batch_posting.py). While one batch waits for its commit, the
next one fills, so under load batches grow by themselves and a commit's fsync
is shared by many transfers; when idle, a transfer goes alone at once.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import threading
import time
import weakref
from collections.abc import Callable, Iterable

from prometheus_client import REGISTRY
from prometheus_client.core import GaugeMetricFamily, Metric

from services.api import metrics
from services.ledger import errors
from services.ledger.limits import TierLimits
from services.ledger.transfers import TransferRequest
from services.observability import log_context
from services.storage.batch_posting import Outcome, post_chains
from services.storage import metrics as storage_metrics
from services.storage.shard_store import ShardStore

# Transfers waiting per shard in this process. Past it, callers get OVERLOADED at once,
# so memory stays bounded at any peak (a queued transfer is a few hundred bytes).
QUEUE_TRANSFERS_MAX = 20_000
# And latency: once the oldest queued transfer has waited this long, the shard is
# behind its load, and new callers get OVERLOADED at once instead of a longer wait.
QUEUE_WAIT_SECONDS_MAX = 0.5
BATCH_TRANSFERS_MAX = 1_000
# Batches of one shard in flight at once from this process: one filling while one commits.
BATCHES_IN_FLIGHT_MAX = 2
# A batch is bounded by the latest deadline among its transfers, and by this.
BATCH_TIMEOUT_SECONDS_MAX = 10.0

log = logging.getLogger(__name__)


@dataclasses.dataclass
class _Job:
    chains: list[list[TransferRequest]]
    size: int
    deadline: float  # event-loop time
    future: asyncio.Future
    queued_at: float = 0.0  # event-loop time


class GroupCommitter:
    def __init__(
        self, shard_name: str, store: Callable[[], ShardStore], limits: TierLimits,
        post=post_chains, queue_transfers_max: int = QUEUE_TRANSFERS_MAX, queue_wait_seconds_max: float = QUEUE_WAIT_SECONDS_MAX,
    ) -> None:
        self.shard_name = shard_name
        self._store = store  # looked up per batch: a new shard map may replace the pool
        self._limits = limits
        self._post = post  # batch_posting.post_chains; unit tests pass a stand-in
        self._queue_transfers_max = queue_transfers_max
        self._queue_wait_seconds_max = queue_wait_seconds_max
        self._queue: collections.deque[_Job] = collections.deque()
        self._queued_transfers = 0
        self._wake = asyncio.Event()
        self._workers: list[asyncio.Task] = []
        QUEUES.track(self)

    @property
    def queued_transfers(self) -> int:
        return self._queued_transfers

    async def submit(self, chains: list[list[TransferRequest]], deadline: float) -> list[list[Outcome]]:
        """Outcomes per chain, in order. Chains are never split across transactions."""
        self._admit(sum(len(chain) for chain in chains))
        jobs = [self._enqueue(part, deadline) for part in _parts(chains)]
        self._start_workers()
        if len(jobs) == 1:
            return await self._outcomes(jobs[0])
        gathered = asyncio.gather(*(job.future for job in jobs))
        # Read when done, also once this caller is gone: past its deadline, or cancelled (its
        # client gave up) while the shield kept the jobs going. Else asyncio logs the failure
        # of a batch nobody waits for as an ERROR ("exception was never retrieved").
        gathered.add_done_callback(_read_outcome)
        try:
            async with asyncio.timeout_at(deadline):
                results = await asyncio.shield(gathered)
        except TimeoutError:
            raise self._deadline_exceeded() from None
        return [outcome for result in results for outcome in result]

    async def submit_each(self, items: list, deadline: float) -> list:
        """One outcome per item, each a job of its own, so that an error (a LedgerError, returned
        in its place) fails only its item: a permanent fault in a shared transaction is retried
        job by job. Items still queued or committing at the deadline get DeadlineExceeded."""
        self._admit(len(items))
        futures = [self._enqueue([[item]], deadline).future for item in items]
        for future in futures:  # read when done, also if this caller is cancelled (see submit)
            future.add_done_callback(_read_outcome)
        self._start_workers()
        await asyncio.wait(futures, timeout=max(0.0, deadline - asyncio.get_running_loop().time()))
        outcomes: list = []
        for future in futures:
            if not future.done():
                outcomes.append(self._deadline_exceeded())
            else:
                outcomes.append(future.exception() or future.result()[0][0])
        return outcomes

    @property
    def oldest_queued_at(self) -> float | None:
        """Event-loop time the oldest queued job was queued at; None when the queue is empty.
        Read from a scrape thread too: the loop may take the job meanwhile."""
        try:
            return self._queue[0].queued_at
        except IndexError:
            return None

    def _admit(self, size: int) -> None:
        waited_seconds = asyncio.get_running_loop().time() - self._queue[0].queued_at if self._queue else 0.0
        full = self._queued_transfers + size > self._queue_transfers_max
        if full or waited_seconds > self._queue_wait_seconds_max:
            metrics.record_overload(metrics.OVERLOAD_QUEUE_FULL if full else metrics.OVERLOAD_QUEUE_WAIT, self.shard_name)
            raise errors.Overloaded(
                f"{self.shard_name}: {self._queued_transfers} transfers queued, the oldest for {waited_seconds:.2f}s;"
                " retry with backoff", shard=self.shard_name, queued=self._queued_transfers,
            )

    async def _outcomes(self, job: _Job) -> list[list[Outcome]]:
        """One job's outcomes: almost every call (one transfer, one registration) is one job.

        The caller waits on the job's own future with a timer at its deadline, instead of a
        timeout scope around a shielded gather: one timer, no extra futures, callbacks or
        task lookups per call. A caller that is cancelled cancels the future, and the worker
        leaves a finished future alone (_settle); the job stays queued and is applied, as it
        was behind the shield.
        """
        expiry = asyncio.get_running_loop().call_at(job.deadline, self._expire, job.future)
        try:
            return await job.future
        finally:
            expiry.cancel()

    def _expire(self, future: asyncio.Future) -> None:
        if not future.done():
            future.set_exception(self._deadline_exceeded())

    def _deadline_exceeded(self) -> errors.DeadlineExceeded:
        return errors.DeadlineExceeded(
            f"{self.shard_name}: the deadline passed while queued or committing; retrying with the same ids is safe"
        )

    def _enqueue(self, chains: list[list[TransferRequest]], deadline: float) -> _Job:
        loop = asyncio.get_running_loop()
        job = _Job(chains, sum(len(chain) for chain in chains), deadline, loop.create_future(), loop.time())
        self._queue.append(job)
        self._queued_transfers += job.size
        self._wake.set()
        return job

    def _start_workers(self) -> None:
        self._workers = [worker for worker in self._workers if not worker.done()]
        while len(self._workers) < BATCHES_IN_FLIGHT_MAX:
            # It serves every caller after this one: its log lines name none of them (log_context).
            self._workers.append(asyncio.create_task(self._work(), context=log_context.outside_any_call()))

    def _take_batch(self) -> list[_Job]:
        jobs, size = [], 0
        while self._queue and (not jobs or size + self._queue[0].size <= BATCH_TRANSFERS_MAX):
            job = self._queue.popleft()
            jobs.append(job)
            size += job.size
        self._queued_transfers -= size
        if not self._queue:
            self._wake.clear()
        return jobs

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wake.wait()
            jobs = self._take_batch()
            now = loop.time()
            live = []
            for job in jobs:
                if job.deadline <= now:  # its caller has given up: do not start work it will not see
                    _settle(job.future, error=errors.DeadlineExceeded("the deadline passed while queued; nothing was done"))
                else:
                    live.append(job)
            if not live:
                continue
            metrics.BATCH_TRANSFERS.observe(sum(job.size for job in live))
            timeout_seconds = min(max(job.deadline for job in live) - now, BATCH_TIMEOUT_SECONDS_MAX)
            try:
                outcomes = await self._post(
                    self._store(), [chain for job in live for chain in job.chains], self._limits, timeout_seconds
                )
            except errors.LedgerError as error:
                if error.transient or len(live) == 1:
                    # An outage: each job alone would have met it too.
                    for job in live:
                        _settle(job.future, error=error)
                else:
                    # A permanent fault may be one caller's doing: no caller's request may
                    # fail another's, so each job is tried again alone and fails on its own.
                    await self._post_each_alone(live, loop)
                continue
            except Exception as error:  # noqa: BLE001 (a bug: loud, and no caller is left waiting)
                log.exception("batch on %s failed", self.shard_name)
                for job in live:
                    _settle(job.future, error=errors.InternalFault(f"{self.shard_name}: batch failed ({type(error).__name__})"))
                continue
            position = 0
            for job in live:
                _settle(job.future, outcomes[position : position + len(job.chains)])
                position += len(job.chains)

    async def _post_each_alone(self, jobs: list[_Job], loop: asyncio.AbstractEventLoop) -> None:
        for job in jobs:
            remaining_seconds = min(job.deadline - loop.time(), BATCH_TIMEOUT_SECONDS_MAX)
            if remaining_seconds <= 0:
                _settle(job.future, error=errors.DeadlineExceeded("the deadline passed while the batch was retried"))
                continue
            try:
                _settle(job.future, await self._post(self._store(), job.chains, self._limits, remaining_seconds))
            except errors.LedgerError as error:
                _settle(job.future, error=error)


def _settle(future: asyncio.Future, result: list[list[Outcome]] | None = None, error: BaseException | None = None) -> None:
    """Complete a job's future, unless its caller is gone (cancelled, or past its deadline: _expire)."""
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


def _read_outcome(future: asyncio.Future) -> None:
    """An outcome no caller waits for any more: read, so that asyncio does not log it as lost."""
    if not future.cancelled():
        future.exception()


def _parts(chains: list[list[TransferRequest]]) -> list[list[list[TransferRequest]]]:
    """Cut a long list of chains into jobs of at most BATCH_TRANSFERS_MAX transfers."""
    parts: list[list[list[TransferRequest]]] = [[]]
    size = 0
    for chain in chains:
        if parts[-1] and size + len(chain) > BATCH_TRANSFERS_MAX:
            parts.append([])
            size = 0
        parts[-1].append(chain)
        size += len(chain)
    return parts


class QueueCollector:
    """Every shard's group-commit queues in this process, read at scrape time (prometheus_client's
    Collector protocol): exact, and nothing is done per call.

    A shard has several committers (same-shard transfers, id registrations, each TCC phase:
    services/coordinator/wiring.py); its depth is their sum and its oldest wait their maximum.
    Every shard of the map is shown, at 0 until it has a queue.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()  # committers are made on the event loop, collect() runs on a scrape thread
        self._committers: weakref.WeakSet[GroupCommitter] = weakref.WeakSet()  # a replaced store's go with it

    def track(self, committer: GroupCommitter) -> None:
        with self._lock:
            self._committers.add(committer)

    def collect(self) -> Iterable[Metric]:
        with self._lock:
            committers = list(self._committers)
        # asyncio's and uvloop's loop time is CLOCK_MONOTONIC, as time.monotonic() is.
        now = time.monotonic()
        depth = {shard_name: 0 for shard_name in storage_metrics.POOLS.shard_names()}
        oldest_wait = dict.fromkeys(depth, 0.0)
        for committer in committers:
            shard_name = committer.shard_name
            depth[shard_name] = depth.get(shard_name, 0) + committer.queued_transfers
            queued_at = committer.oldest_queued_at
            waited_seconds = max(0.0, now - queued_at) if queued_at is not None else 0.0
            oldest_wait[shard_name] = max(oldest_wait.get(shard_name, 0.0), waited_seconds)
        return queue_families(depth, oldest_wait)


def queue_families(depth: dict[str, int], oldest_wait_seconds: dict[str, float]) -> list[Metric]:
    """The exposition of the queues (deploy/prometheus/metrics.md, "Shards"), limits included."""
    queued = GaugeMetricFamily("corebank_group_commit_queue_transfers", "Transfers waiting for a batch", labels=["shard"])
    waited = GaugeMetricFamily(
        "corebank_group_commit_oldest_wait_seconds", "How long the oldest queued transfer has waited (0 when none)", labels=["shard"]
    )
    for shard_name in sorted(depth):
        queued.add_metric([shard_name], depth[shard_name])
        waited.add_metric([shard_name], oldest_wait_seconds.get(shard_name, 0.0))
    return [
        queued, waited,
        GaugeMetricFamily("corebank_group_commit_queue_transfers_limit", "QUEUE_TRANSFERS_MAX: queued transfers past which"
                          " callers get OVERLOADED", value=QUEUE_TRANSFERS_MAX),
        GaugeMetricFamily("corebank_group_commit_queue_wait_limit_seconds", "QUEUE_WAIT_SECONDS_MAX: the oldest wait past which"
                          " callers get OVERLOADED", value=QUEUE_WAIT_SECONDS_MAX),
    ]


QUEUES = QueueCollector()
REGISTRY.register(QUEUES)
