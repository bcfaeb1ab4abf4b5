"""An in-memory shard for the coordinator's simulation: the TccPort of one shard, with the
semantics of services/storage/tcc_store.py's SQL and schema.sql's constraints.

Each method is one local transaction: it runs without an await, so nothing
interleaves with it, and it checks everything before it changes anything, so a
refused change leaves no trace (a CHECK constraint rolls the whole transaction back,
raising errors.InternalFault like the storage boundary does). What it keeps:

- accounts with posted and pending counters (customers, the shard's genesis account,
  clearing accounts opened on first use like ENSURE_CLEARING_ACCOUNTS);
- transfer rows (branch 1 on the debit shard, branch 2 on the credit shard);
- tcc_transfers records, with the settle CAS on (state = TRYING, lease_epoch) to the
  final state, lease claims that bump the epoch, and faults;
- tcc_barriers, insert-only, keyed (transfer, branch, operation): a repeated operation
  changes nothing; the credit try's row is the decision: applied (the credit branch
  posted in the same transaction), refused, or blocked by a cancel stored first (then
  a late try never applies); a try past its pending timeout is blocked by the try itself.

Refusals come from the real rule book (services.ledger.transfers).
"""

from __future__ import annotations

import dataclasses
import datetime
from collections.abc import Callable

from services.ledger import errors
from services.ledger.accounts import Account, AccountKind, AccountStatus
from services.ledger.coordination import BarrierOperation, CancelCause, CoordinatorState, TryOutcome, blocked_outcome, refused_outcome
from services.ledger.limits import TierLimits
from services.ledger.transfers import Branch, TransferRequest, TransferStatus, clearing_refusal, credit_side_refusal, debit_side_refusal
from services.storage.tcc_store import Begun, BeginItem, BlockCreditItem, BranchResult, SettleCreditItem, SettleDebitItem, Settled, TccRecord

CLEARING_OWNER_ID = "corebank-clearing"


@dataclasses.dataclass
class AccountRow:
    account_id: str
    currency: str
    kind: AccountKind
    tier: int
    status: AccountStatus
    debits_posted_minor: int = 0
    credits_posted_minor: int = 0
    debits_pending_minor: int = 0
    credits_pending_minor: int = 0

    def as_account(self) -> Account:
        return Account(
            self.account_id, self.account_id, CLEARING_OWNER_ID if self.kind == AccountKind.SYSTEM else "owner",
            self.currency, self.kind, self.tier, self.status, self.debits_posted_minor, self.credits_posted_minor,
            self.debits_pending_minor, self.credits_pending_minor,
        )


@dataclasses.dataclass
class TransferRow:
    transfer_id: str
    debit_account_id: str
    credit_account_id: str
    amount_minor: int
    currency: str
    status: TransferStatus
    reason: str
    branch: Branch
    clearing_account_id: str

    @property
    def debited_account_id(self) -> str:
        """The account whose debit counters this row moves (tcc_store's settle statements' `debited`)."""
        return self.debit_account_id if self.branch == Branch.DEBIT else self.clearing_account_id

    @property
    def credited_account_id(self) -> str:
        return self.clearing_account_id if self.branch == Branch.DEBIT else self.credit_account_id


class MemoryTcc:
    """One shard: its accounts, transfer rows, coordinator records and barriers."""

    def __init__(self, shard_name: str, now: Callable[[], datetime.datetime]) -> None:
        self.shard_name = shard_name
        self.now = now
        self.accounts: dict[str, AccountRow] = {}
        self.transfers: dict[str, TransferRow] = {}
        self.records: dict[str, TccRecord] = {}
        self.faults: dict[str, tuple[str, datetime.datetime]] = {}  # tcc_transfers.fault, faulted_at
        self.barriers: dict[tuple[str, Branch, BarrierOperation], str] = {}  # -> outcome

    # --- The schema's constraints: checked before a transaction changes anything. ---

    def _check_counters(self, changes: dict[str, dict[str, int]]) -> None:
        """Raise InternalFault (as a CHECK violation would, rolling back) if the changes break a constraint."""
        for account_id, deltas in changes.items():
            row = self.accounts.get(account_id)
            if row is None:
                continue  # an UPDATE ... WHERE account_id IN (...) that matches no row changes nothing
            after = {name: getattr(row, name) + delta for name, delta in deltas.items()}
            if any(value < 0 for value in after.values()):
                raise errors.InternalFault(f"{self.shard_name}: counter of {account_id} would go negative: {after}")
            credits_posted = after.get("credits_posted_minor", row.credits_posted_minor)
            debits_posted = after.get("debits_posted_minor", row.debits_posted_minor)
            debits_pending = after.get("debits_pending_minor", row.debits_pending_minor)
            if row.kind != AccountKind.SYSTEM and credits_posted - debits_posted - debits_pending < 0:
                raise errors.InternalFault(f"{self.shard_name}: only_system_accounts_go_negative violated by {account_id}")

    def _apply_counters(self, changes: dict[str, dict[str, int]]) -> None:
        self._check_counters(changes)
        for account_id, deltas in changes.items():
            row = self.accounts.get(account_id)
            if row is not None:
                for name, delta in deltas.items():
                    setattr(row, name, getattr(row, name) + delta)

    def _ensure_clearing(self, clearing_account_id: str, currency: str) -> None:
        if clearing_account_id not in self.accounts:
            self.accounts[clearing_account_id] = AccountRow(
                clearing_account_id, currency, AccountKind.SYSTEM, 0, AccountStatus.ACTIVE
            )

    def _account(self, account_id: str) -> Account | None:
        row = self.accounts.get(account_id)
        return row.as_account() if row is not None else None

    def _record(self, transfer_id: str, **changes: object) -> TccRecord:
        record = dataclasses.replace(self.records[transfer_id], updated_at=self.now(), **changes)
        self.records[transfer_id] = record
        return record

    # --- TccPort ---

    async def begin(
        self, request: TransferRequest, credit_shard: str, clearing_account_id: str, limits: TierLimits,
        owner: str, lease_seconds: float, pending_timeout_seconds: float, timeout_seconds: float,
        register_id_here: bool = False,
    ) -> Begun:
        del register_id_here  # the simulation drives transfers whose ids are unique by construction
        self._ensure_clearing(clearing_account_id, request.currency)
        existing = self.records.get(request.transfer_id)
        if existing is not None:
            return Begun(existing, created=False)
        refusal = debit_side_refusal(request, self._account(request.debit_account_id), limits) or (
            clearing_refusal(request, self._account(clearing_account_id), credited=True)
        )
        refused = refusal is not None
        amount = request.amount_minor
        if not refused:
            self._check_counters({request.debit_account_id: {"debits_pending_minor": amount},
                                  clearing_account_id: {"credits_pending_minor": amount}})
        now = self.now()
        record = TccRecord(
            request.transfer_id, request.debit_account_id, request.credit_account_id, amount, request.currency,
            request.reference, credit_shard, CoordinatorState.REJECTED if refused else CoordinatorState.TRYING,
            refusal.reason if refused else "", owner, 1, now + datetime.timedelta(seconds=lease_seconds),
            now + datetime.timedelta(seconds=pending_timeout_seconds), 0, now, now, now if refused else None,
        )
        self.records[request.transfer_id] = record
        self.barriers[(request.transfer_id, Branch.DEBIT, BarrierOperation.TRY)] = (
            refused_outcome(refusal.reason) if refused else TryOutcome.APPLIED
        )
        self.transfers[request.transfer_id] = TransferRow(
            request.transfer_id, request.debit_account_id, request.credit_account_id, amount, request.currency,
            TransferStatus.REJECTED if refused else TransferStatus.PENDING, refusal.reason if refused else "",
            Branch.DEBIT, clearing_account_id,
        )
        if not refused:
            self._apply_counters({request.debit_account_id: {"debits_pending_minor": amount},
                                  clearing_account_id: {"credits_pending_minor": amount}})
        return Begun(record, created=True, fresh_refusal=refusal)

    async def settle_credit(self, record: TccRecord, clearing_account_id: str, limits: TierLimits, timeout_seconds: float) -> str:
        self._ensure_clearing(clearing_account_id, record.currency)
        key = (record.transfer_id, Branch.CREDIT, BarrierOperation.TRY)
        if key in self.barriers:  # the barrier row decides: a retry, or a cancel that came first
            return self.barriers[key]
        if record.pending_expires_at <= self.now():
            self.barriers[key] = blocked_outcome(CancelCause.PENDING_TIMEOUT)
            return self.barriers[key]
        refusal = credit_side_refusal(record.request, self._account(record.credit_account_id), limits) or (
            clearing_refusal(record.request, self._account(clearing_account_id), credited=False)
        )
        if refusal is not None:
            self.barriers[key] = refused_outcome(refusal.reason)
            return self.barriers[key]
        amount = record.amount_minor
        changes = {clearing_account_id: {"debits_posted_minor": amount}, record.credit_account_id: {"credits_posted_minor": amount}}
        self._check_counters(changes)
        if record.transfer_id in self.transfers:  # the transfers primary key
            raise errors.InternalFault(f"{self.shard_name}: duplicate key transfers({record.transfer_id})")
        self.transfers[record.transfer_id] = TransferRow(
            record.transfer_id, record.debit_account_id, record.credit_account_id, amount, record.currency,
            TransferStatus.POSTED, "", Branch.CREDIT, clearing_account_id,
        )
        self._apply_counters(changes)
        self.barriers[key] = TryOutcome.APPLIED
        return self.barriers[key]

    async def block_credit(self, record: TccRecord, cause: CancelCause, timeout_seconds: float) -> str:
        # BLOCK_CREDIT_TRIES: insert-or-nothing, then read what is stored.
        return self.barriers.setdefault((record.transfer_id, Branch.CREDIT, BarrierOperation.TRY), blocked_outcome(cause))

    def _finish_branch(self, transfer_id: str, branch: Branch, operation: BarrierOperation) -> tuple[bool, bool]:
        """The settle's barrier and move of one branch: (barrier row new, reservation moved)."""
        key = (transfer_id, branch, operation)
        if key in self.barriers:
            return False, False
        row = self.transfers.get(transfer_id)
        moving = row is not None and row.branch == branch and row.status == TransferStatus.PENDING
        if moving:
            confirm = operation is BarrierOperation.CONFIRM
            amount = row.amount_minor
            debited = {"debits_pending_minor": -amount, **({"debits_posted_minor": amount} if confirm else {})}
            credited = {"credits_pending_minor": -amount, **({"credits_posted_minor": amount} if confirm else {})}
            changes = {row.debited_account_id: debited, row.credited_account_id: credited}
            self._apply_counters(changes)  # checks first: a violation changes nothing, barrier included
            row.status = TransferStatus.POSTED if confirm else TransferStatus.VOIDED
        self.barriers[key] = TryOutcome.DONE
        return True, moving

    async def settle_debit(self, record: TccRecord, final_state: CoordinatorState, reason: str, timeout_seconds: float) -> Settled:
        current = self.records.get(record.transfer_id)
        if current is None or current.state is not CoordinatorState.TRYING or current.lease_epoch != record.lease_epoch:
            return Settled(None, BranchResult(False, False, False))
        operation = BarrierOperation.CONFIRM if final_state is CoordinatorState.POSTED else BarrierOperation.CANCEL
        barrier_new, moved = self._finish_branch(record.transfer_id, Branch.DEBIT, operation)
        finished = self._record(record.transfer_id, state=final_state, reason=reason, finalized_at=self.now())
        return Settled(finished, BranchResult(True, barrier_new, moved))

    # The list operations: each item in a transaction of its own, as the production store's
    # group commit retries a failed shared transaction job by job; an error answers its item.

    async def begin_many(self, items: list[BeginItem], limits: TierLimits, timeout_seconds: float) -> list:
        return await _each(items, lambda item: self.begin(
            item.request, item.credit_shard, item.clearing_account_id, limits, item.owner, item.lease_seconds,
            item.pending_timeout_seconds, timeout_seconds, item.register_id_here,
        ))

    async def settle_credits(self, items: list[SettleCreditItem], limits: TierLimits, timeout_seconds: float) -> list:
        return await _each(items, lambda item: self.settle_credit(item.record, item.clearing_account_id, limits, timeout_seconds))

    async def block_credits(self, items: list[BlockCreditItem], timeout_seconds: float) -> list:
        return await _each(items, lambda item: self.block_credit(item.record, item.cause, timeout_seconds))

    async def settle_debits(self, items: list[SettleDebitItem], timeout_seconds: float) -> list:
        return await _each(items, lambda item: self.settle_debit(item.record, item.final_state, item.reason, timeout_seconds))

    async def renew_lease(self, record: TccRecord, lease_seconds: float, timeout_seconds: float) -> bool:
        current = self.records.get(record.transfer_id)
        if current is None or current.lease_epoch != record.lease_epoch or current.finalized_at is not None:
            return False
        self._record(
            record.transfer_id, lease_expires_at=self.now() + datetime.timedelta(seconds=lease_seconds), attempts=current.attempts + 1
        )
        return True

    async def get_record(self, transfer_id: str, timeout_seconds: float) -> TccRecord | None:
        return self.records.get(transfer_id)

    async def mark_faulted(self, record: TccRecord, fault: str, timeout_seconds: float) -> bool:
        current = self.records.get(record.transfer_id)
        if current is None or current.lease_epoch != record.lease_epoch or current.finalized_at is not None:
            return False
        self.faults[record.transfer_id] = (fault, self.now())
        self._record(record.transfer_id)
        return True

    def _claim(self, transfer_id: str, owner: str, lease_seconds: float) -> TccRecord:
        current = self.records[transfer_id]
        return self._record(
            transfer_id, lease_owner=owner, lease_epoch=current.lease_epoch + 1,
            lease_expires_at=self.now() + datetime.timedelta(seconds=lease_seconds),
        )

    async def claim_expired_unfaulted(
        self, owner: str, lease_seconds: float, batch_size: int, timeout_seconds: float
    ) -> list[TccRecord]:
        now = self.now()
        expired = sorted(
            (record for record in self.records.values()
             if record.finalized_at is None and record.lease_expires_at < now and record.transfer_id not in self.faults),
            key=lambda record: (record.lease_expires_at, record.transfer_id),
        )[:batch_size]
        return [self._claim(record.transfer_id, owner, lease_seconds) for record in expired]

    async def claim_now_clearing_fault(
        self, transfer_id: str, owner: str, lease_seconds: float, timeout_seconds: float
    ) -> TccRecord | None:
        current = self.records.get(transfer_id)
        if current is None or current.finalized_at is not None:
            return None
        self.faults.pop(transfer_id, None)
        return self._claim(transfer_id, owner, lease_seconds)

    async def in_doubt_summary(self, timeout_seconds: float) -> tuple[int, float]:
        open_records = [record for record in self.records.values() if record.finalized_at is None]
        if not open_records:
            return 0, 0.0
        return len(open_records), (self.now() - min(record.created_at for record in open_records)).total_seconds()

    async def list_in_doubt_with_faults(self, limit: int, timeout_seconds: float) -> list[TccRecord]:
        open_records = sorted(
            (record for record in self.records.values() if record.finalized_at is None), key=lambda record: record.created_at
        )[:limit]
        return [dataclasses.replace(record, fault=self.faults.get(record.transfer_id, ("", None))[0]) for record in open_records]


async def _each(items: list, operation) -> list:
    outcomes = []
    for item in items:
        try:
            outcomes.append(await operation(item))
        except errors.LedgerError as error:
            outcomes.append(error)
    return outcomes
