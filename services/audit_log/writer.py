"""The audit log's writer: one per process, one chain at a time, entries stored in batches.

Callers append events and may await them being stored; a single task takes whatever has
queued (up to BATCH_ENTRIES_MAX), places it in the chain (seq, hashes) and stores it with one
multi-row INSERT, while the next batch fills: the group-commit pattern (services/group_commit.py),
so that a burst of CreateTransfers costs one round trip per thousand entries, not one each.

Each process writes a chain of its own (chain id: process name, pid, a random part), so no
two writers ever contend for a chain's head and none needs a lock. The chain lives on one
shard, picked by the hash of its id, so that the processes' audit load spreads over the
shards and no one shard is every process's audit log.

When that shard fails, the batch is retried (same entries, same seqs: an insert that had
committed unseen changes nothing the second time, ON CONFLICT DO NOTHING). Past
FAILOVER_AFTER_SECONDS of failures the writer opens a new chain on the next shard of the
map, whose first entry names the chain it leaves and that chain's last stored entry (seq
and hash: an anchor that a cut of the old chain's end would break), and stores the batch
there. Calls keep their real outcome meanwhile: a caller waits for its entries at most
until its deadline, then is answered anyway (an answer of a change is counted in
UNCONFIRMED_ANSWERS: services/api/audit_trail.py) and its entries stay queued. When the log falls too far behind (QUEUE_ENTRIES_MAX queued, or one batch
failing for STALLED_SECONDS_MAX: every shard tried has failed), `admits()` turns false and
the API refuses audited calls with OVERLOADED before doing anything: no money moves that
the log could not record (fail closed), and memory stays bounded.

What can still be lost: entries queued in a process that dies before storing them (a
crash, a kill -9, a close that times out): at most the queue, and each such loss leaves
its chain unclosed (no chain_closed entry).
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import logging
import os
import secrets
import socket
import time
from collections.abc import Callable
from typing import Protocol

from services.audit_log import chain, metrics
from services.audit_log.chain import Event, Link
from services.ledger import errors
from services.ledger.access import LEDGER

log = logging.getLogger(__name__)

# Entries stored by one INSERT: a few hundred KB of parameters; one round trip each.
BATCH_ENTRIES_MAX = 1_000
# Entries appended and not yet stored, past which audited calls are refused (OVERLOADED).
# About 300 bytes each: some 30 MB at most, a dozen seconds of a worker's peak rate.
# Calls admitted just before the bound may still append theirs (at most the calls in flight,
# IN_FLIGHT_CALLS_MAX, times their size), so the queue can pass it by that much.
QUEUE_ENTRIES_MAX = 100_000
# One insert's time limit: a healthy shard stores a batch in milliseconds.
INSERT_TIMEOUT_SECONDS = 2.0
# A failed insert is retried after a delay that doubles from the least to the most.
RETRY_DELAY_SECONDS_MIN = 0.05
RETRY_DELAY_SECONDS_MAX = 1.0
# A chain whose shard has failed every insert for this long is left for a new chain on the
# next shard: long enough not to open chains on a blip, short enough that the queue stays
# far below its bound at peak.
FAILOVER_AFTER_SECONDS = 3.0
# One batch failing for this long means every shard tried has failed: audited calls are
# refused until a batch is stored again.
STALLED_SECONDS_MAX = 15.0
# A caller without a deadline waits at most this long for its entries to be stored.
WRITE_WAIT_SECONDS_MAX = 5.0
# The chain's head (seq and hash) goes to the process log this often, and at close: a copy
# outside the database that `verify --anchors` can check the chain against later.
HEAD_LOG_INTERVAL_SECONDS = 60.0
# A stopping process stores its queue and its chain_closed entry within this time.
CLOSE_SECONDS_MAX = 5.0
# Failures are logged at most this often (each one is counted in WRITE_FAILURES).
FAILURE_LOG_INTERVAL_SECONDS = 5.0


class AuditStore(Protocol):
    """Where chains are stored (store.py: the shards; tests: memory)."""

    def shard_names(self) -> list[str]: ...

    def home_shard(self, chain_id: str) -> str: ...

    async def insert(self, shard_name: str, links: list[Link], timeout_seconds: float) -> None:
        """Store the links (idempotent per (chain_id, seq)); raise a LedgerError when it fails."""


def new_chain_id(process_name: str) -> str:
    return f"{process_name}:{os.getpid()}:{secrets.token_hex(6)}"


def now_us() -> int:
    return time.time_ns() // 1000


def limits_digest(limits) -> str:
    """SHA-256 of the tier limits in force (services/ledger/limits.py), for the chain's first
    entry: limits have no API, they change by restarting with another table, and this makes
    every such change visible in the audit log."""
    table = sorted(
        (tier, currency, limit.balance_cap_minor, limit.transfer_cap_minor)
        for (tier, currency), limit in limits.by_tier_and_currency.items()
    )
    return hashlib.sha256(repr(table).encode()).hexdigest()


class AuditWriter:
    def __init__(
        self, store: AuditStore, process_name: str, context: dict | None = None, *,
        queue_entries_max: int = QUEUE_ENTRIES_MAX, failover_after_seconds: float = FAILOVER_AFTER_SECONDS,
        stalled_seconds_max: float = STALLED_SECONDS_MAX, clock_us: Callable[[], int] = now_us,
    ) -> None:
        self._store = store
        self._process_name = process_name
        self._context = dict(context or {})  # goes into every chain_opened entry (limits in force, ...)
        self._queue_entries_max = queue_entries_max
        self._failover_after_seconds = failover_after_seconds
        self._stalled_seconds_max = stalled_seconds_max
        self.clock_us = clock_us
        self._queue: collections.deque[tuple[Event, asyncio.Future | None]] = collections.deque()
        self._in_flight = 0  # entries of the batch being stored
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._closed = False
        # The chain being written: its id and shard, and its last entry placed (seq, hash).
        self.chain_id = ""
        self.shard_name = ""
        self._last_seq = 0
        self._last_hash = chain.GENESIS_HASH
        self._opening: Event | None = None  # the chain's first entry, until it is stored
        # The last entry stored, in any chain: what a new chain's first entry names.
        self.stored_head: tuple[str, int, bytes] | None = None
        self._batch_failing_since: float | None = None  # event-loop time
        self._head_logged_at = 0.0
        self._failure_logged_at = -FAILURE_LOG_INTERVAL_SECONDS
        metrics.QUEUED_ENTRIES.set_function(lambda: len(self._queue) + self._in_flight)

    # The callers' side.

    def start(self) -> None:
        """Open the first chain (its first entry is stored at once) and start writing."""
        assert self._task is None, "the audit writer is started once"
        chain_id = new_chain_id(self._process_name)
        self._open_chain(self._store.home_shard(chain_id), {"cause": "start"}, chain_id)
        metrics.CHAINS_OPENED.labels("start").inc()
        self._task = asyncio.create_task(self._run(), name="audit-log-writer")
        self._wake.set()

    @property
    def backlog(self) -> int:
        """Entries appended and not yet stored."""
        return len(self._queue) + self._in_flight

    def admits(self) -> bool:
        """Whether an audited call may start: false when the log is too far behind (fail closed)."""
        if len(self._queue) >= self._queue_entries_max:
            return False
        failing_since = self._batch_failing_since
        return failing_since is None or asyncio.get_running_loop().time() - failing_since < self._stalled_seconds_max

    def append(self, events: list[Event]) -> asyncio.Future | None:
        """Queue events, in order, for this process's chain; a future that turns True once all
        of them are stored (`written` awaits it). Never refuses: `admits` is asked first."""
        if not events:
            return None
        future = asyncio.get_running_loop().create_future()
        if self._closed:
            log.error("audit log: %d entries appended after close are not stored: %s", len(events), events[:3])
            future.set_result(False)
            return future
        queue = self._queue
        for happened in events[:-1]:
            queue.append((happened, None))
        # Batches are stored in order, so the last entry stored means all of them are.
        queue.append((events[-1], future))
        self._wake.set()
        return future

    async def written(self, future: asyncio.Future | None, timeout_seconds: float) -> bool:
        """Wait until the entries of `future` are stored, at most `timeout_seconds`; whether they are.
        One timer and the call's own future: no task or shield per call."""
        if future is None:
            return True
        if not future.done():
            if timeout_seconds <= 0:
                return False
            expiry = asyncio.get_running_loop().call_later(timeout_seconds, _settle, future, False)
            try:
                await future
            finally:
                expiry.cancel()
        return future.result()

    async def close(self, timeout_seconds: float = CLOSE_SECONDS_MAX) -> bool:
        """Store what is queued and a chain_closed entry, then stop; whether all of it was stored."""
        if self._closed or self._task is None:
            return True
        done = self.append([self._lifecycle_event(chain.CHAIN_CLOSED, {"process": self._process_name})])
        self._closed = True
        stored = await self.written(done, timeout_seconds)
        self._task.cancel()
        try:
            await self._task
        except asyncio.CancelledError:
            pass
        if stored:
            log.info("audit log chain %s closed at seq %d, hash %s", self.chain_id, self._last_seq, self._last_hash.hex())
        else:
            log.error(
                "audit log: %d entries were not stored by close (chain %s stays open at stored head %s)",
                self.backlog, self.chain_id, self.stored_head,
            )
        return stored

    # The writing task.

    async def _run(self) -> None:
        while True:
            if not self._queue and self._opening is None:
                self._wake.clear()
                await self._wake.wait()
                continue
            # One place kept for a chain's opening entry, which goes first in its chain's first batch.
            count = min(len(self._queue), BATCH_ENTRIES_MAX - 1)
            batch = [self._queue.popleft() for _ in range(count)]
            self._in_flight = count
            try:
                await self._store_batch([happened for happened, _ in batch])
            finally:
                self._in_flight = 0
            for _, future in batch:
                if future is not None:
                    _settle(future, True)

    async def _store_batch(self, events: list[Event]) -> None:
        """Store the events in the current chain, retrying and moving to a new chain until it is done."""
        loop = asyncio.get_running_loop()
        links = self._place(events)
        delay_seconds = RETRY_DELAY_SECONDS_MIN
        failing_on_this_chain_since: float | None = None
        while True:
            try:
                await self._store.insert(self.shard_name, links, INSERT_TIMEOUT_SECONDS)
                break
            except Exception as error:  # noqa: BLE001 (LedgerErrors of the store; anything else is a bug, retried the same, loudly)
                now = loop.time()
                if self._batch_failing_since is None:
                    self._batch_failing_since = now
                if failing_on_this_chain_since is None:
                    failing_on_this_chain_since = now
                self._failed(error, now)
                # A taken seq stays taken: leave the chain at once.
                if isinstance(error, chain.LinkTaken) or now - failing_on_this_chain_since >= self._failover_after_seconds:
                    next_shard = self._next_shard()
                    if next_shard is not None:
                        self._fail_over(next_shard, error, links)
                        links = self._place(events)
                        failing_on_this_chain_since = None
                        delay_seconds = RETRY_DELAY_SECONDS_MIN
                        continue
                await asyncio.sleep(delay_seconds)
                delay_seconds = min(delay_seconds * 2, RETRY_DELAY_SECONDS_MAX)
        self._batch_failing_since = None
        self._opening = None
        last = links[-1]
        self.stored_head = (self.chain_id, last.entry.seq, last.hash)
        metrics.ENTRIES_WRITTEN.inc(len(links))
        if loop.time() - self._head_logged_at >= HEAD_LOG_INTERVAL_SECONDS:
            self._head_logged_at = loop.time()
            log.info("audit log chain %s head: seq %d, hash %s", self.chain_id, last.entry.seq, last.hash.hex())

    def _place(self, events: list[Event]) -> list[Link]:
        """The events as the next links of the current chain (after its opening entry while that is unstored)."""
        if self._opening is not None:
            events = [self._opening, *events]
            self._last_seq, self._last_hash = 0, chain.GENESIS_HASH
        links = chain.chained(self.chain_id, self._last_seq + 1, self._last_hash, events)
        if links:
            self._last_seq, self._last_hash = links[-1].entry.seq, links[-1].hash
        return links

    def _failed(self, error: BaseException, now: float) -> None:
        reason = error.reason if isinstance(error, errors.LedgerError) and error.reason else ""
        metrics.WRITE_FAILURES.labels(metrics.write_failure_reason(reason)).inc()
        if now - self._failure_logged_at >= FAILURE_LOG_INTERVAL_SECONDS:
            self._failure_logged_at = now
            if isinstance(error, errors.LedgerError):
                log.warning("audit log chain %s on %s: insert failed, retrying (%d entries waiting): %s",
                            self.chain_id, self.shard_name, self.backlog, error)
            else:
                log.error("audit log chain %s on %s: insert failed by a bug, retrying (%d entries waiting)",
                          self.chain_id, self.shard_name, self.backlog, exc_info=error)

    def _next_shard(self) -> str | None:
        names = self._store.shard_names()
        others = [name for name in names if name != self.shard_name]
        if not others:
            return None
        if self.shard_name not in names:
            return others[0]
        return names[(names.index(self.shard_name) + 1) % len(names)]

    def _fail_over(self, shard_name: str, error: BaseException, unstored: list[Link]) -> None:
        """Leave the current chain for a new one on `shard_name`; the new chain's first entry says why,
        names the last entry stored before (an anchor of the chain it leaves) and the seqs of the
        chain it leaves whose insert may have committed unseen (stored twice, then)."""
        previous_chain, previous_shard = self.chain_id, self.shard_name
        stored_chain, stored_seq, stored_hash = self.stored_head or ("", 0, chain.GENESIS_HASH)
        reason = error.reason if isinstance(error, errors.LedgerError) and error.reason else type(error).__name__
        detail = {
            "cause": f"failover: {reason}", "left_chain": previous_chain, "left_shard": previous_shard,
            "unconfirmed_seqs": f"{unstored[0].entry.seq}..{unstored[-1].entry.seq}" if unstored else "",
            "stored_chain": stored_chain, "stored_seq": stored_seq, "stored_hash": stored_hash.hex() if stored_chain else "",
        }
        self._open_chain(shard_name, detail, new_chain_id(self._process_name))
        metrics.CHAINS_OPENED.labels("failover").inc()
        log.error("audit log chain %s on %s kept failing (%s); continuing in chain %s on %s",
                  previous_chain, previous_shard, reason, self.chain_id, shard_name)

    def _open_chain(self, shard_name: str, detail: dict, chain_id: str) -> None:
        self.chain_id = chain_id
        self.shard_name = shard_name
        self._last_seq, self._last_hash = 0, chain.GENESIS_HASH
        self._opening = self._lifecycle_event(chain.CHAIN_OPENED, {
            "process": self._process_name, "pid": os.getpid(), "host": socket.gethostname(), "shard": shard_name,
            **self._context, **detail,
        })

    def _lifecycle_event(self, action: str, detail: dict) -> Event:
        return chain.event(self.clock_us(), LEDGER.subject, LEDGER.role.value, action, self.chain_id,
                           chain.detail_text(detail), "OK")


def _settle(future: asyncio.Future, stored: bool) -> None:
    if not future.done():
        future.set_result(stored)
