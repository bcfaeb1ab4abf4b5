"""What the coordinator needs from the world, as protocols: one shard's TCC store, and a clock.

The driver and recovery are written against these alone. Production wires
services.storage.tcc_store.TccStore (PostgreSQL) and the system clock
(services/coordinator/wiring.py); the simulation (services/coordinator/simulation.py)
wires in-memory stores with the same semantics and a virtual clock, so the real
protocol code runs under injected crashes, transient and permanent failures, delays
and frozen zombies, deterministically from a seed.

Errors: every method raises only services.ledger.errors.LedgerError subclasses.
`error.transient` says the outcome is unknown and the same call may be sent again
(every operation is idempotent or rolled back whole); any other error is permanent.
"""

from __future__ import annotations

import asyncio
import datetime
import time
from typing import Protocol

from services.ledger.coordination import CancelCause, CoordinatorState
from services.ledger.limits import TierLimits
from services.ledger.transfers import TransferRequest
# The records these ports exchange are plain frozen dataclasses defined beside their SQL.
from services.ledger.errors import LedgerError
from services.storage.tcc_store import Begun, BeginItem, BlockCreditItem, SettleCreditItem, SettleDebitItem, Settled, TccRecord


class TccPort(Protocol):
    """The TCC operations of one shard: the coordinator record (on the debit shard) and the
    participant branches, each guarded by the insert-only barrier (see tcc_store.py)."""

    shard_name: str

    async def begin(
        self, request: TransferRequest, credit_shard: str, clearing_account_id: str, limits: TierLimits,
        owner: str, lease_seconds: float, pending_timeout_seconds: float, timeout_seconds: float,
        register_id_here: bool = False,
    ) -> Begun:
        """Create the record and try the debit branch in one local transaction (or find the existing one);
        `register_id_here`: this shard is the transfer id's registry home, register it in that transaction."""
        ...

    async def begin_many(self, items: list[BeginItem], limits: TierLimits, timeout_seconds: float) -> list[Begun | LedgerError]:
        """begin for many transfers (items name each one's parameters): one outcome or error per item."""
        ...

    async def settle_credits(self, items: list[SettleCreditItem], limits: TierLimits, timeout_seconds: float) -> list[str | LedgerError]:
        """settle_credit for many: one stored outcome or error per item."""
        ...

    async def block_credits(self, items: list[BlockCreditItem], timeout_seconds: float) -> list[str | LedgerError]:
        """block_credit for many: one stored outcome or error per item."""
        ...

    async def settle_debits(self, items: list[SettleDebitItem], timeout_seconds: float) -> list[Settled | LedgerError]:
        """settle_debit for many: one Settled or error per item."""
        ...

    async def settle_credit(self, record: TccRecord, clearing_account_id: str, limits: TierLimits, timeout_seconds: float) -> str:
        """Try and confirm the credit branch in one local transaction, whose commit is the decision,
        unless a try barrier row is there already (a retry, a cancel that came first) or the
        pending timeout passed on this shard's clock (then a cancel is stored). The stored try
        outcome (services.ledger.coordination.parse_try_outcome reads it)."""
        ...

    async def block_credit(self, record: TccRecord, cause: CancelCause, timeout_seconds: float) -> str:
        """Store a cancel with its cause in the credit try's place, unless the try came first;
        the stored try outcome, whichever it is."""
        ...

    async def settle_debit(self, record: TccRecord, final_state: CoordinatorState, reason: str, timeout_seconds: float) -> Settled:
        """CAS (TRYING, lease epoch) -> the final state, with the debit branch's confirm (POSTED) or
        cancel, in one local transaction; Settled.record is None if the CAS lost."""
        ...

    async def renew_lease(self, record: TccRecord, lease_seconds: float, timeout_seconds: float) -> bool:
        ...

    async def get_record(self, transfer_id: str, timeout_seconds: float) -> TccRecord | None:
        ...

    async def mark_faulted(self, record: TccRecord, fault: str, timeout_seconds: float) -> bool:
        """Record a permanent fault on a record this driver still owns (CAS on the lease epoch)."""
        ...

    async def claim_expired_unfaulted(
        self, owner: str, lease_seconds: float, batch_size: int, timeout_seconds: float
    ) -> list[TccRecord]:
        """Take over records whose lease expired (bumping the epoch), skipping faulted ones."""
        ...

    async def claim_now_clearing_fault(
        self, transfer_id: str, owner: str, lease_seconds: float, timeout_seconds: float
    ) -> TccRecord | None:
        """An operator's retry: take the lease whoever holds it, and clear any recorded fault."""
        ...

    async def in_doubt_summary(self, timeout_seconds: float) -> tuple[int, float]:
        """How many records are not final, and the age in seconds of the oldest."""
        ...

    async def list_in_doubt_with_faults(self, limit: int, timeout_seconds: float) -> list[TccRecord]:
        """Records not final, oldest first, with their recorded fault (TccRecord.fault)."""
        ...


class Clock(Protocol):
    def monotonic(self) -> float:
        """Seconds, for durations and deadlines."""
        ...

    def now(self) -> datetime.datetime:
        """Wall-clock time (UTC), to compare with the database's timestamps."""
        ...

    async def sleep(self, seconds: float) -> None:
        ...


class SystemClock:
    def monotonic(self) -> float:
        return time.monotonic()

    def now(self) -> datetime.datetime:
        return datetime.datetime.now(datetime.timezone.utc)

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


SYSTEM_CLOCK = SystemClock()
