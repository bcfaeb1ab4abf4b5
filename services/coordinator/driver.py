"""Drives transfers between shards through the state machine, doing the I/O it asks for.

The gRPC workers start and drive new transfers inline (so a transfer usually
finishes in one request); coordinator processes (recovery.py) take over any
transfer whose lease has expired. Every participant operation is idempotent and
every record change is a compare-and-set on the lease epoch, so a driver that
wakes up after its lease was taken over changes nothing.

The driver sees the shards only through ports (ports.py): a TCC store per shard
name and a clock, injected. Failures are judged by kind, never by type of driver:
a transient error (`error.transient`: outcome unknown) repeats the same idempotent
action with capped exponential backoff, a bounded number of times per drive; a
permanent one is a PARTICIPANT_FAULT for the state machine (cancel before the
decision, record the fault after it).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
from collections.abc import Callable

from services.coordinator import crash_points, metrics
from services.coordinator.ports import SYSTEM_CLOCK, Clock, TccPort
from services.coordinator.state_machine import CREDIT_ACTIONS, Action, Event, Step, final_state_after_cancel, resume, transition
from services.ledger import errors
from services.ledger.coordination import FINAL_STATES, CancelCause, CoordinatorState, TryOutcome, parse_try_outcome
from services.ledger.limits import TierLimits
from services.ledger.transfers import Transfer, TransferRequest
from services.storage.tcc_store import Begun, BeginItem, BlockCreditItem, SettleCreditItem, SettleDebitItem, Settled, TccRecord

# A driver owns a transfer for this long without renewing; a dead driver's
# transfers are taken over at most LEASE_SECONDS + recovery's scan interval later.
LEASE_SECONDS = 5.0
# A transfer not confirmed this long after it started is cancelled, releasing the
# reservations. Tests shorten it through the environment to see it happen.
PENDING_TIMEOUT_SECONDS = float(os.environ.get("COREBANK_PENDING_TIMEOUT_SECONDS", "30"))
PARTICIPANT_CALL_TIMEOUT_SECONDS = 2.0
RETRY_DELAY_SECONDS_MIN = 0.05
RETRY_DELAY_SECONDS_MAX = 2.0
# Transient failures one drive rides out (about 20 s of backoff, longer than most shard
# fail-overs) before it stops. It then holds no state worth keeping: the record is durable,
# its lease expires, and a coordinator's recovery scan claims it and drives it again
# (LEASE_SECONDS + RECOVERY_SCAN_INTERVAL_SECONDS later). So no drive retries forever.
DRIVE_TRANSIENT_FAILURES_MAX = 16
# Permanent failures one drive meets before it stops: a failed try or confirm decision, a
# failed cancel decision, a failed attempt to record the fault. Past that not even the
# fault can be written; the drive stops, loudly, and the lease expires as above.
DRIVE_FAULTS_MAX = 3
# Waiting on a transfer another driver owns: poll its record this often at most...
POLL_INTERVAL_SECONDS_MAX = 0.5
# ... and this long at most. A request waits no longer than its own deadline anyway
# (services/ledger_service.py); this bounds the background wait it leaves behind.
FINAL_WAIT_SECONDS_MAX = 60.0

# What a stored credit try outcome tells the state machine.
_CREDIT_EVENTS = {TryOutcome.APPLIED: Event.CREDIT_APPLIED, TryOutcome.REFUSED: Event.CREDIT_REFUSED,
                  TryOutcome.BLOCKED_BY_CANCEL: Event.CREDIT_BLOCKED}

log = logging.getLogger(__name__)

TccForShard = Callable[[str], TccPort]
# (shard name, currency, transfer id) -> the clearing account of that shard's branch.
ClearingAccountIdFor = Callable[[str, str, str], str]


class TransferDriver:
    def __init__(
        self, tcc_for_shard: TccForShard, shard_name_for: Callable[[str], str], clearing_account_id_for: ClearingAccountIdFor,
        limits: TierLimits, owner: str, clock: Clock = SYSTEM_CLOCK, pending_timeout_seconds: float = PENDING_TIMEOUT_SECONDS,
    ) -> None:
        self.tcc = tcc_for_shard  # raises a permanent LedgerError for a shard name it does not know
        self.shard_name_for = shard_name_for  # account id -> shard name
        self.clearing_account_id_for = clearing_account_id_for
        self.limits = limits
        self.owner = owner
        self.clock = clock
        self.pending_timeout_seconds = pending_timeout_seconds

    async def begin(
        self, request: TransferRequest, debit_shard: str, credit_shard: str, timeout_seconds: float, register_id_here: bool = False
    ) -> Begun:
        clearing = self.clearing_account_id_for(debit_shard, request.currency, request.transfer_id)
        begun = await self.tcc(debit_shard).begin(
            request, credit_shard, clearing, self.limits, self.owner, LEASE_SECONDS, self.pending_timeout_seconds, timeout_seconds,
            register_id_here,
        )
        crash_points.reached(crash_points.AFTER_BEGIN)
        return begun

    async def begin_many(
        self, starts: list[tuple[TransferRequest, str, str, bool]], timeout_seconds: float
    ) -> list[Begun | errors.LedgerError]:
        """begin for many transfers, (request, debit shard, credit shard, register id here) each, in
        one call per debit shard: one outcome or error per transfer, in order."""
        outcomes: list = [None] * len(starts)
        by_shard: dict[str, list[int]] = {}
        for index, (_, debit_shard, _, _) in enumerate(starts):
            by_shard.setdefault(debit_shard, []).append(index)

        async def begin_on(debit_shard: str, indexes: list[int]) -> None:
            items = []
            for index in indexes:
                request, _, credit_shard, register_id_here = starts[index]
                clearing = self.clearing_account_id_for(debit_shard, request.currency, request.transfer_id)
                items.append(BeginItem(
                    request, credit_shard, clearing, self.owner, LEASE_SECONDS, self.pending_timeout_seconds, register_id_here
                ))
            try:
                begun = await self.tcc(debit_shard).begin_many(items, self.limits, timeout_seconds)
            except errors.LedgerError as error:
                begun = [error] * len(items)
            for index, outcome in zip(indexes, begun):
                outcomes[index] = outcome

        await asyncio.gather(*(begin_on(shard, indexes) for shard, indexes in by_shard.items()))
        crash_points.reached(crash_points.AFTER_BEGIN)
        return outcomes

    async def drive_many(
        self, records: list[TccRecord], on_final: Callable[[TccRecord], None] = lambda record: None, leased_at: float | None = None,
    ) -> dict[str, TccRecord]:
        """Drive many transfers together: each action of all of them in one call per shard (the
        stores take lists, and the production ones share transactions), so a batch of transfers
        between shards costs a few transactions per shard, not a few per transfer. A transfer
        that meets anything but an answer of its own (a failed call, a lost compare-and-set)
        goes on alone through drive(), from where it was, with drive's retries, backoff and
        lease renewals; so do all that are left once the lease needs renewing (`leased_at`: when
        the leases were last set, by default now). `on_final` hears of each transfer as soon as
        its driving ends, so that no caller waits for the slowest of the batch. The records as
        their drivers last knew them, by transfer id."""
        latest = {record.transfer_id: record for record in records}
        driving = set(latest)  # counted in TRANSFERS_IN_FLIGHT until each one's driving ends
        metrics.TRANSFERS_IN_FLIGHT.inc(len(driving))

        def ended(record: TccRecord) -> None:
            if record.transfer_id in driving:
                driving.discard(record.transfer_id)
                metrics.TRANSFERS_IN_FLIGHT.dec()
            on_final(record)

        try:
            return await self._drive_many(latest, ended, leased_at)
        finally:
            metrics.TRANSFERS_IN_FLIGHT.dec(len(driving))  # those a failure or a cancellation left

    async def _drive_many(
        self, latest: dict[str, TccRecord], on_final: Callable[[TccRecord], None], leased_at: float | None,
    ) -> dict[str, TccRecord]:
        started = self.clock.monotonic()
        leased_at = started if leased_at is None else leased_at
        steps = {transfer_id: resume(record.state, record.reason) for transfer_id, record in latest.items()}
        alone: dict[str, tuple[Step, str]] = {}  # transfer id -> (step, fault text)
        faults: dict[str, str] = {}
        while self.clock.monotonic() - leased_at < LEASE_SECONDS / 2:
            groups: dict[tuple[Action, str], list[str]] = {}
            for transfer_id, step in steps.items():
                if step.action is not None and transfer_id not in alone:
                    record = latest[transfer_id]
                    shard = record.credit_shard if step.action in CREDIT_ACTIONS else self._debit_shard(record)
                    groups.setdefault((step.action, shard), []).append(transfer_id)
            if not groups:
                break
            await asyncio.gather(*(
                self._perform_many(action, shard, transfer_ids, latest, steps, faults, alone)
                for (action, shard), transfer_ids in groups.items()
            ))
            for transfer_id in [t for t, step in steps.items() if step.action is None and t not in alone]:
                metrics.DRIVES.labels(steps.pop(transfer_id).state.name).inc()
                metrics.DRIVE_DURATION.observe(self.clock.monotonic() - started)
                on_final(latest[transfer_id])
        for transfer_id, step in steps.items():
            if transfer_id not in alone:
                alone[transfer_id] = (step, faults.get(transfer_id, ""))

        async def drive_alone(transfer_id: str, step: Step, fault: str) -> None:
            latest[transfer_id] = await self._drive(latest[transfer_id], step, fault, lease_renewed_at=leased_at)
            on_final(latest[transfer_id])

        await asyncio.gather(*(drive_alone(transfer_id, step, fault) for transfer_id, (step, fault) in alone.items()))
        return latest

    async def _perform_many(
        self, action: Action, shard: str, transfer_ids: list[str], latest: dict[str, TccRecord], steps: dict[str, Step],
        faults: dict[str, str], alone: dict[str, tuple[Step, str]],
    ) -> None:
        """One action for many transfers on one shard; each one's event moves its step on."""
        if action is Action.RECORD_FAULT:
            for transfer_id in transfer_ids:
                alone[transfer_id] = (steps[transfer_id], faults.get(transfer_id, ""))
            return
        if action is Action.SETTLE_CREDIT:
            expired = {t for t in transfer_ids if self._expired(latest[t])}
            for transfer_id in expired:
                steps[transfer_id] = transition(steps[transfer_id], Event.PENDING_EXPIRED)
            transfer_ids = [t for t in transfer_ids if t not in expired]
        if not transfer_ids:
            return
        records = [latest[transfer_id] for transfer_id in transfer_ids]
        try:
            tcc = self.tcc(shard)  # a shard the map no longer has is a permanent fault of these items
            if action is Action.SETTLE_CREDIT:
                outcomes = await tcc.settle_credits([self._settle_credit_item(r) for r in records], self.limits, PARTICIPANT_CALL_TIMEOUT_SECONDS)
            elif action is Action.BLOCK_CREDIT:
                outcomes = await tcc.block_credits(
                    [BlockCreditItem(r, CancelCause(steps[r.transfer_id].reason)) for r in records], PARTICIPANT_CALL_TIMEOUT_SECONDS
                )
            else:
                confirm = action is Action.CONFIRM_DEBIT
                outcomes = await tcc.settle_debits(
                    [SettleDebitItem(r, self._final_state(confirm, steps[r.transfer_id].reason), steps[r.transfer_id].reason)
                     for r in records],
                    PARTICIPANT_CALL_TIMEOUT_SECONDS,
                )
        except errors.LedgerError as error:
            outcomes = [error] * len(records)
        crash_points.reached(crash_points.AFTER_CREDIT if action in CREDIT_ACTIONS else crash_points.AFTER_DEBIT)
        for record, outcome in zip(records, outcomes):
            transfer_id, step = record.transfer_id, steps[record.transfer_id]
            if isinstance(outcome, errors.LedgerError):
                if outcome.transient:
                    alone[transfer_id] = (step, faults.get(transfer_id, ""))  # drive() retries it, with backoff
                    continue
                faults[transfer_id] = self._count_fault(step, record, outcome)
                steps[transfer_id] = transition(step, Event.PARTICIPANT_FAULT, faults[transfer_id])
            elif action in CREDIT_ACTIONS:
                outcome_kind, reason = parse_try_outcome(outcome)
                steps[transfer_id] = transition(step, _CREDIT_EVENTS[outcome_kind], reason)
            elif outcome.record is None:
                alone[transfer_id] = (step, faults.get(transfer_id, ""))  # lost the compare-and-set: drive() finds out why
            elif (fault := _unapplied_confirm(record, action is Action.CONFIRM_DEBIT, outcome)) is not None:
                faults[transfer_id] = self._count_fault(step, record, fault)
                steps[transfer_id] = transition(step, Event.PARTICIPANT_FAULT, faults[transfer_id])
            else:
                latest[transfer_id] = outcome.record
                steps[transfer_id] = transition(step, Event.FINISHED)

    async def drive(
        self, record: TccRecord, step: Step | None = None, fault: str = "", lease_renewed_at: float | None = None
    ) -> TccRecord:
        """Run the protocol until the transfer is final, another driver owns it, it is faulted,
        or the drive's failure budget is spent; the record as this driver last knew it. It starts
        from the durable record, or from `step` (with the `fault` met so far, and the lease last set at
        `lease_renewed_at`) where drive_many left it."""
        metrics.TRANSFERS_IN_FLIGHT.inc()
        try:
            return await self._drive(record, step, fault, lease_renewed_at)
        finally:
            metrics.TRANSFERS_IN_FLIGHT.dec()

    async def _drive(
        self, record: TccRecord, step: Step | None = None, fault: str = "", lease_renewed_at: float | None = None
    ) -> TccRecord:
        started = self.clock.monotonic()
        step = step or resume(record.state, record.reason)
        transient_failures = transient_failures_in_a_row = faults = 0
        lease_renewed_at = started if lease_renewed_at is None else lease_renewed_at
        while step.action is not None:
            event, event_reason, record = await self._perform(step, record, fault)
            if event is Event.PARTICIPANT_FAULT:
                faults += 1
                fault = event_reason
                if faults > DRIVE_FAULTS_MAX:
                    log.error("transfer %s: %d permanent faults in one drive, stopping (%s)", record.transfer_id, faults, fault)
                    break
            if event is None:  # the outcome is unknown: the same action again, after a backoff
                transient_failures += 1
                transient_failures_in_a_row += 1
                if transient_failures >= DRIVE_TRANSIENT_FAILURES_MAX:
                    # Recovery takes it over once the lease expires (see DRIVE_TRANSIENT_FAILURES_MAX).
                    log.warning("transfer %s: %d transient failures, leaving it to recovery", record.transfer_id, transient_failures)
                    metrics.DRIVES_STOPPED.inc()
                    break
                await self.clock.sleep(min(RETRY_DELAY_SECONDS_MIN * 2**transient_failures_in_a_row, RETRY_DELAY_SECONDS_MAX))
            else:
                transient_failures_in_a_row = 0
            if event is not None:
                step = transition(step, event, event_reason)
            # Slow but healthy drives renew too, so that recovery does not take them over midway.
            if step.action is not None and self.clock.monotonic() - lease_renewed_at > LEASE_SECONDS / 2:
                if not await self._renew(record):
                    step = transition(step, Event.LEASE_LOST)
                lease_renewed_at = self.clock.monotonic()
        metrics.DRIVES.labels(step.state.name).inc()
        metrics.DRIVE_DURATION.observe(self.clock.monotonic() - started)
        return record  # not final when abandoned, faulted or stopped: the caller waits for the next owner

    async def _perform(self, step: Step, record: TccRecord, fault: str) -> tuple[Event | None, str, TccRecord]:
        """Do one action; the event it produced, with its reason (for PARTICIPANT_FAULT: the fault)."""
        action = step.action
        try:
            return await self._act(step, record, fault)
        except errors.LedgerError as error:
            if error.transient:
                log.info("%s of %s failed, outcome unknown: %s", action.value, record.transfer_id, error)
                return None, "", record
            return Event.PARTICIPANT_FAULT, self._count_fault(step, record, error), record

    @staticmethod
    def _count_fault(step: Step, record: TccRecord, error: errors.LedgerError) -> str:
        """A permanent failure of an action, made loud (metric, ERROR log); the fault's text."""
        action = step.action
        metrics.FAULTS.labels(action.value).inc()
        decided = action is not Action.SETTLE_CREDIT
        log.error(
            "transfer %s: %s failed permanently in %s (%s: %s); %s", record.transfer_id, action.value, step.state.name,
            error.reason or type(error).__name__, error, "recording the fault" if decided else "cancelling it",
        )
        return f"{action.value}: {error.reason or type(error).__name__}: {error}"

    async def _act(self, step: Step, record: TccRecord, fault: str) -> tuple[Event, str, TccRecord]:
        action = step.action
        if action in CREDIT_ACTIONS:
            credit = self.tcc(record.credit_shard)
            if action is Action.SETTLE_CREDIT:
                if self._expired(record):
                    return Event.PENDING_EXPIRED, "", record
                item = self._settle_credit_item(record)
                stored = await credit.settle_credit(record, item.clearing_account_id, self.limits, PARTICIPANT_CALL_TIMEOUT_SECONDS)
            else:
                stored = await credit.block_credit(record, CancelCause(step.reason), PARTICIPANT_CALL_TIMEOUT_SECONDS)
            crash_points.reached(crash_points.AFTER_CREDIT)
            outcome, reason = parse_try_outcome(stored)
            return _CREDIT_EVENTS[outcome], reason, record
        if action in (Action.CONFIRM_DEBIT, Action.CANCEL_DEBIT):
            return await self._settle_debit(record, action is Action.CONFIRM_DEBIT, step.reason)
        if action is Action.RECORD_FAULT:
            if not await self.tcc(self._debit_shard(record)).mark_faulted(record, fault, PARTICIPANT_CALL_TIMEOUT_SECONDS):
                return Event.LEASE_LOST, "", record
            log.error(
                "transfer %s is FAULTED in %s (%s): recovery skips it; fix the cause, then "
                "`python -m services.coordinator.operator retry %s`", record.transfer_id, record.state.name, fault, record.transfer_id,
            )
            return Event.FAULT_RECORDED, "", dataclasses.replace(record, fault=fault)
        raise AssertionError(f"no handler for {action}")

    def _expired(self, record: TccRecord) -> bool:
        """Past the pending timeout on this driver's clock: block the credit try rather than send it."""
        return record.pending_expires_at <= self.clock.now()

    def _settle_credit_item(self, record: TccRecord) -> SettleCreditItem:
        return SettleCreditItem(record, self.clearing_account_id_for(record.credit_shard, record.currency, record.transfer_id))

    @staticmethod
    def _final_state(confirm: bool, reason: str) -> CoordinatorState:
        return CoordinatorState.POSTED if confirm else final_state_after_cancel(reason)

    async def _settle_debit(self, record: TccRecord, confirm: bool, reason: str) -> tuple[Event, str, TccRecord]:
        final_state = self._final_state(confirm, reason)
        debit = self.tcc(self._debit_shard(record))
        settled = await debit.settle_debit(record, final_state, reason, PARTICIPANT_CALL_TIMEOUT_SECONDS)
        if settled.record is not None:
            fault = _unapplied_confirm(record, confirm, settled)
            if fault is not None:
                raise fault
            crash_points.reached(crash_points.AFTER_DEBIT)
            return Event.FINISHED, "", settled.record
        # Lost the compare-and-set: an earlier attempt of ours may have committed before its
        # answer was lost, or another driver owns the record now.
        current = await debit.get_record(record.transfer_id, PARTICIPANT_CALL_TIMEOUT_SECONDS)
        if current is not None and current.lease_epoch == record.lease_epoch and current.state is final_state:
            return Event.FINISHED, "", current
        return Event.LEASE_LOST, "", current or record

    async def _renew(self, record: TccRecord) -> bool:
        """False only when the record is no longer ours; a failure to ask says True: the next CAS will tell."""
        try:
            return await self.tcc(self._debit_shard(record)).renew_lease(record, LEASE_SECONDS, PARTICIPANT_CALL_TIMEOUT_SECONDS)
        except errors.LedgerError as error:
            if not error.transient:
                metrics.FAULTS.labels(metrics.FAULT_STEP_RENEW_LEASE).inc()
                log.error("transfer %s: renewing the lease failed permanently: %s", record.transfer_id, error)
            return True

    def _debit_shard(self, record: TccRecord) -> str:
        return self.shard_name_for(record.debit_account_id)

    async def wait_until_final(self, transfer_id: str, debit_shard: str) -> TccRecord:
        """For a transfer another driver owns: poll its record until final, FINAL_WAIT_SECONDS_MAX at most
        (then the record as last seen, not final)."""
        started = self.clock.monotonic()
        delay_seconds = RETRY_DELAY_SECONDS_MIN
        record = None
        while True:
            try:
                record = await self.tcc(debit_shard).get_record(transfer_id, PARTICIPANT_CALL_TIMEOUT_SECONDS)
                if record is not None and record.state in FINAL_STATES:
                    return record
            except errors.LedgerError as error:
                if not error.transient:
                    raise
            if self.clock.monotonic() - started > FINAL_WAIT_SECONDS_MAX:
                if record is None:
                    raise errors.DeadlineExceeded(f"transfer {transfer_id} not readable for {FINAL_WAIT_SECONDS_MAX}s")
                return record
            await self.clock.sleep(delay_seconds)
            delay_seconds = min(delay_seconds * 2, POLL_INTERVAL_SECONDS_MAX)


def _unapplied_confirm(record: TccRecord, confirm: bool, settled: Settled) -> errors.InternalFault | None:
    """A confirm that won its compare-and-set and wrote its barrier must have found the reserved
    debit branch; if not, the decided transfer cannot be applied: a bug, recorded as a fault."""
    if confirm and settled.record is not None and settled.branch.barrier_new and not settled.branch.moved:
        return errors.InternalFault(f"debit branch of {record.transfer_id} was not pending when confirmed")
    return None


def outcome(record: TccRecord) -> Transfer:
    """The final transfer, or the error its final state answers with."""
    transfer = record.as_transfer()
    refusal = transfer.refusal()
    if refusal is not None:
        raise refusal
    return transfer
