"""Recovery: takes over transfers between shards whose driver died.

Every RECOVERY_SCAN_INTERVAL_SECONDS it claims, on every shard, the unfinished
transfers whose lease has expired (a compare-and-set that bumps the lease
epoch, so several coordinators never drive one transfer at once) and drives
them to a final state from their durable record alone. A transfer whose
driver died is picked up within LEASE_SECONDS + RECOVERY_SCAN_INTERVAL_SECONDS.
Faulted records (a decided transfer that could not be applied) are not
claimed: they wait for an operator (operator.py), instead of being retried
silently for ever.

Recovery sees the shards through ports (ports.py) and does one more periodic
job, injected: sweeping collecting merchants' sub-accounts. The process that runs
it is composed in services/coordinator/__main__.py.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from services.coordinator import metrics
from services.coordinator.driver import LEASE_SECONDS, PARTICIPANT_CALL_TIMEOUT_SECONDS, TccForShard, TransferDriver
from services.coordinator.ports import SYSTEM_CLOCK, Clock
from services.ledger import errors

# Each scan also runs the injected sweep (services/collection.py).
RECOVERY_SCAN_INTERVAL_SECONDS = 1.0
RECOVERY_CLAIM_BATCH_SIZE = 50
# Transfers one coordinator drives at once; more wait for the next scan.
RECOVERY_DRIVES_MAX = 64

# A transfer whose pending timeout has passed is settled by two participant calls: its credit
# try blocked (a cancel stored in its place), its debit cancelled.
CANCEL_CALLS = 2

log = logging.getLogger("corebank.coordinator")


def in_doubt_bound_seconds(pending_timeout_seconds: float) -> float:
    """How long a transfer between shards may stay in doubt by design, every shard up
    (corebank_tcc_in_doubt_bound_seconds): past its pending timeout it is cancelled; if its
    driver died just before, its lease expires LEASE_SECONDS later at most, the next recovery
    scan claims it within RECOVERY_SCAN_INTERVAL_SECONDS, and the cancel's calls take
    PARTICIPANT_CALL_TIMEOUT_SECONDS each at most. Older than this: a shard out for long, a
    drive that is stuck, or a fault waiting for an operator."""
    return (
        pending_timeout_seconds + LEASE_SECONDS + RECOVERY_SCAN_INTERVAL_SECONDS + CANCEL_CALLS * PARTICIPANT_CALL_TIMEOUT_SECONDS
    )


async def _no_sweep() -> None:
    return None


class Recovery:
    def __init__(
        self, tcc_for_shard: TccForShard, shard_names: Callable[[], list[str]], driver: TransferDriver,
        sweep: Callable[[], Awaitable[object]] = _no_sweep, clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self.tcc = tcc_for_shard
        self.shard_names = shard_names
        self.driver = driver
        self.sweep = sweep
        self.clock = clock
        self.drives: set[asyncio.Task] = set()

    async def scan_once(self) -> int:
        """Claim and start driving expired transfers on every shard; the number claimed."""
        claimed_total = 0
        for shard_name in self.shard_names():
            try:
                tcc = self.tcc(shard_name)
                count, oldest_seconds = await tcc.in_doubt_summary(PARTICIPANT_CALL_TIMEOUT_SECONDS)
                metrics.IN_DOUBT.labels(shard_name).set(count)
                metrics.OLDEST_IN_DOUBT_SECONDS.labels(shard_name).set(oldest_seconds)
                room = RECOVERY_DRIVES_MAX - len(self.drives)
                if count == 0 or room <= 0:
                    continue
                claimed = await tcc.claim_expired_unfaulted(
                    self.driver.owner, LEASE_SECONDS, min(room, RECOVERY_CLAIM_BATCH_SIZE), PARTICIPANT_CALL_TIMEOUT_SECONDS
                )
            except errors.LedgerError as error:
                # Transient or not, the next scan asks again; a permanent one is a bug to see.
                (log.info if error.transient else log.error)("scan of %s failed: %s", shard_name, error)
                continue
            for record in claimed:
                log.info("taking over %s (%s, epoch %d)", record.transfer_id, record.state.name, record.lease_epoch)
                metrics.RECOVERED.inc()
                drive = asyncio.create_task(
                    self.driver.drive(record), name=f"drive:{record.transfer_id}:{record.lease_epoch}"
                )
                self.drives.add(drive)
                drive.add_done_callback(self.drives.discard)
            claimed_total += len(claimed)
        return claimed_total

    async def run(self, stopping: asyncio.Event) -> None:
        while not stopping.is_set():
            await self.scan_once()
            await self.sweep()
            await self._pause(stopping)
        if self.drives:
            await asyncio.wait(self.drives, timeout=LEASE_SECONDS)

    async def _pause(self, stopping: asyncio.Event) -> None:
        """RECOVERY_SCAN_INTERVAL_SECONDS on the injected clock, or less if stopping."""
        pause = asyncio.ensure_future(self.clock.sleep(RECOVERY_SCAN_INTERVAL_SECONDS))
        stopped = asyncio.ensure_future(stopping.wait())
        try:
            await asyncio.wait((pause, stopped), return_when=asyncio.FIRST_COMPLETED)
        finally:
            pause.cancel()
            stopped.cancel()
