"""The try / confirm / cancel protocol as a pure function: (state, event) -> (state, action).

The durable state lives in the coordinator record on the debit shard. The debit
branch's try happens in the same local transaction that creates the record, and
each decision (confirm or cancel) is written in the same local transaction as
the debit branch's confirm or cancel. So the only remote branch is the credit
one, and after any crash the next action follows from the durable state alone
(`transition(state, reason, Event.RESUMED)`).
"""

from __future__ import annotations

import dataclasses
import enum


class CoordinatorState(enum.IntEnum):
    """Stored in tcc_transfers.state."""

    TRYING = 1  # debit reserved; credit try outstanding; no decision yet
    CONFIRMING = 2  # decided to confirm; debit posted; credit confirm outstanding
    CANCELLING = 3  # decided to cancel; debit released; credit cancel outstanding
    POSTED = 4
    REJECTED = 5  # a business rule refused it (reason names the rule)
    VOIDED = 6  # the system cancelled it (reason names the cause)
    # Not stored: this driver lost its lease and must stop; another owns the transfer.
    ABANDONED = 7


FINAL_STATES = frozenset({CoordinatorState.POSTED, CoordinatorState.REJECTED, CoordinatorState.VOIDED})
# Causes of a cancel that are not business refusals: the transfer ends VOIDED, not REJECTED.
SYSTEM_CANCEL_CAUSES = frozenset({"PENDING_TIMEOUT", "OPERATOR"})


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


class Action(enum.Enum):
    TRY_CREDIT = "try_credit"
    DECIDE_CONFIRM = "decide_confirm"  # CAS TRYING -> CONFIRMING + confirm debit, one local transaction
    DECIDE_CANCEL = "decide_cancel"  # CAS TRYING -> CANCELLING + cancel debit, one local transaction
    CONFIRM_CREDIT = "confirm_credit"
    CANCEL_CREDIT = "cancel_credit"
    FINISH = "finish"  # CAS to the final state


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
                return Step(state, "PENDING_TIMEOUT", Action.DECIDE_CANCEL)
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


def final_state_after_cancel(reason: str) -> CoordinatorState:
    return CoordinatorState.VOIDED if reason in SYSTEM_CANCEL_CAUSES else CoordinatorState.REJECTED
