"""The try / confirm / cancel protocol as a pure function: (state, event) -> (state, action).

The durable state lives in the coordinator record on the debit shard. The debit
branch's try happens in the same local transaction that creates the record, and
each decision (confirm or cancel) is written in the same local transaction as
the debit branch's confirm or cancel. So the only remote branch is the credit
one, and after any crash the next action follows from the durable state alone
(`transition(state, reason, Event.RESUMED)`).

Failures come in two kinds. A transient one (shard unavailable, deadline) leaves
the outcome unknown: the same idempotent action is done again
(CREDIT_TRY_FAILED, CREDIT_FINISH_FAILED). A permanent one (a bug, a broken
constraint) is PARTICIPANT_FAULT: before the decision the transfer is cancelled,
which is always safe; once decided it cannot be undone, so the fault is recorded
on the durable record (RECORD_FAULT), for an operator, and the driver stops.
"""

from __future__ import annotations

import dataclasses
import enum

from services.ledger.coordination import FINAL_STATES, SYSTEM_CANCEL_CAUSES, CancelCause, CoordinatorState


class Event(enum.Enum):
    RESUMED = "resumed"  # a driver starts on a record (first time, or after a crash)
    CREDIT_TRY_APPLIED = "credit_try_applied"
    CREDIT_TRY_REFUSED = "credit_try_refused"  # with the refusal reason
    CREDIT_TRY_BLOCKED = "credit_try_blocked"  # a cancel reached the credit shard first
    CREDIT_TRY_FAILED = "credit_try_failed"  # outcome unknown (timeout, shard down)
    PENDING_EXPIRED = "pending_expired"
    DECIDED_CONFIRM = "decided_confirm"
    DECIDED_CANCEL = "decided_cancel"  # with the cause
    CREDIT_CONFIRMED = "credit_confirmed"
    CREDIT_CANCELLED = "credit_cancelled"
    CREDIT_FINISH_FAILED = "credit_finish_failed"  # confirm or cancel: outcome unknown, retry
    FINISHED = "finished"
    LEASE_LOST = "lease_lost"  # a compare-and-set found another owner or state
    PARTICIPANT_FAULT = "participant_fault"  # an action failed permanently (not worth doing again)
    FAULT_RECORDED = "fault_recorded"  # the record is marked faulted: recovery leaves it to an operator


class Action(enum.Enum):
    TRY_CREDIT = "try_credit"
    DECIDE_CONFIRM = "decide_confirm"  # CAS TRYING -> CONFIRMING + confirm debit, one local transaction
    DECIDE_CANCEL = "decide_cancel"  # CAS TRYING -> CANCELLING + cancel debit, one local transaction
    CONFIRM_CREDIT = "confirm_credit"
    CANCEL_CREDIT = "cancel_credit"
    FINISH = "finish"  # CAS to the final state
    RECORD_FAULT = "record_fault"  # mark the record faulted (CAS on the lease epoch)


@dataclasses.dataclass(frozen=True)
class Step:
    state: CoordinatorState
    reason: str
    action: Action | None  # None: nothing more for this driver to do


class InvalidTransition(AssertionError):
    """A programmer error: the driver fed an event that cannot happen in this state."""


def transition(state: CoordinatorState, reason: str, event: Event, event_reason: str = "") -> Step:
    if event is Event.LEASE_LOST:
        return Step(CoordinatorState.ABANDONED, reason, None)
    if state in IN_DOUBT_STATES:
        if event is Event.FAULT_RECORDED:
            # The durable state stays as it is (no money moves); an operator's retry resumes it.
            return Step(state, reason, None)
        if event is Event.PARTICIPANT_FAULT:
            if state is CoordinatorState.TRYING and reason != CancelCause.PARTICIPANT_FAULT:
                # No decision yet: cancelling is always safe. The cause replaces any
                # earlier reason, so a cancel that itself fails permanently is not tried
                # a third time.
                return Step(state, CancelCause.PARTICIPANT_FAULT, Action.DECIDE_CANCEL)
            # Decided (or even the cancel cannot be written): nothing safe is left to
            # do automatically. Make it loud and durable.
            return Step(state, reason, Action.RECORD_FAULT)
    if state in FINAL_STATES or state is CoordinatorState.ABANDONED:
        if event is Event.RESUMED:
            return Step(state, reason, None)
    elif state is CoordinatorState.TRYING:
        match event:
            case Event.RESUMED | Event.CREDIT_TRY_FAILED:
                return Step(state, reason, Action.TRY_CREDIT)
            case Event.CREDIT_TRY_APPLIED:
                return Step(state, reason, Action.DECIDE_CONFIRM)
            case Event.CREDIT_TRY_REFUSED:
                return Step(state, event_reason, Action.DECIDE_CANCEL)
            case Event.CREDIT_TRY_BLOCKED | Event.PENDING_EXPIRED:
                # Blocked means someone already cancelled; our CAS will then find out.
                return Step(state, CancelCause.PENDING_TIMEOUT, Action.DECIDE_CANCEL)
            case Event.DECIDED_CONFIRM:
                return Step(CoordinatorState.CONFIRMING, reason, Action.CONFIRM_CREDIT)
            case Event.DECIDED_CANCEL:
                return Step(CoordinatorState.CANCELLING, event_reason or reason, Action.CANCEL_CREDIT)
    elif state is CoordinatorState.CONFIRMING:
        # Once decided, a transfer is confirmed however long it takes: never cancelled.
        match event:
            case Event.RESUMED | Event.CREDIT_FINISH_FAILED:
                return Step(state, reason, Action.CONFIRM_CREDIT)
            case Event.CREDIT_CONFIRMED:
                return Step(state, reason, Action.FINISH)
            case Event.FINISHED:
                return Step(CoordinatorState.POSTED, reason, None)
    elif state is CoordinatorState.CANCELLING:
        match event:
            case Event.RESUMED | Event.CREDIT_FINISH_FAILED:
                return Step(state, reason, Action.CANCEL_CREDIT)
            case Event.CREDIT_CANCELLED:
                return Step(state, reason, Action.FINISH)
            case Event.FINISHED:
                return Step(final_state_after_cancel(reason), reason, None)
    raise InvalidTransition(f"{event.name} cannot happen in {state.name}")


# Stored and not final: the states a transfer can be in doubt in.
IN_DOUBT_STATES = frozenset({CoordinatorState.TRYING, CoordinatorState.CONFIRMING, CoordinatorState.CANCELLING})


def final_state_after_cancel(reason: str) -> CoordinatorState:
    return CoordinatorState.VOIDED if reason in SYSTEM_CANCEL_CAUSES else CoordinatorState.REJECTED
