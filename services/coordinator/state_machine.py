"""The protocol as a pure function: (step, event) -> next step, with the action to do.

TCC with the last-participant optimisation. The durable record lives on the debit
shard, written in the same local transaction as the debit branch's try (a
reservation). The credit branch is then tried and confirmed in one local
transaction on its shard (SETTLE_CREDIT): its commit, recorded by the credit try's
barrier row, IS the decision. Last, the record goes to its final state in the same
local transaction as the debit branch's confirm or cancel (CONFIRM_DEBIT,
CANCEL_DEBIT). Three local transactions, two of them on the debit shard.

To cancel before the credit shard has applied (the pending timeout passed, a
permanent fault), a driver first stores a cancel in the credit try's place
(BLOCK_CREDIT: insert-or-nothing of the barrier row, then read it). Whichever
came first, the try or the cancel, is the decision, and both readers see the same
one. So the only durable state in doubt is TRYING, and after any crash the next
action follows from it alone: SETTLE_CREDIT again, which returns the stored
outcome if there is one.

Failures come in two kinds. A transient one (shard unavailable, deadline) leaves
the outcome unknown: the same idempotent action is done again. A permanent one (a
bug, a broken constraint) is PARTICIPANT_FAULT: while the credit shard may still
be undecided, the transfer is cancelled through BLOCK_CREDIT, which is always
safe; once decided, the fault is recorded on the durable record (RECORD_FAULT),
for an operator, and the driver stops.
"""

from __future__ import annotations

import dataclasses
import enum

from services.ledger.coordination import SYSTEM_CANCEL_CAUSES, CancelCause, CoordinatorState


class Event(enum.Enum):
    CREDIT_APPLIED = "credit_applied"  # the credit branch is posted: decided to confirm
    CREDIT_REFUSED = "credit_refused"  # with the refusal reason: decided to cancel
    CREDIT_BLOCKED = "credit_blocked"  # with the cause a cancel stored first: decided to cancel
    PENDING_EXPIRED = "pending_expired"  # the driver's clock: past the pending timeout, block the credit try
    FINISHED = "finished"  # the record is final, with the debit branch
    LEASE_LOST = "lease_lost"  # a compare-and-set found another owner or state
    PARTICIPANT_FAULT = "participant_fault"  # an action failed permanently (not worth doing again)
    FAULT_RECORDED = "fault_recorded"  # the record is marked faulted: recovery leaves it to an operator


class Action(enum.Enum):
    SETTLE_CREDIT = "settle_credit"  # try and confirm the credit branch in one local transaction
    BLOCK_CREDIT = "block_credit"  # store a cancel in the credit try's place, unless the try came first
    CONFIRM_DEBIT = "confirm_debit"  # CAS TRYING -> POSTED with the debit branch's confirm
    CANCEL_DEBIT = "cancel_debit"  # CAS TRYING -> REJECTED / VOIDED with the debit branch's cancel
    RECORD_FAULT = "record_fault"  # mark the record faulted (CAS on the lease epoch)


# Actions that ask the credit shard for the decision (and answer with CREDIT_* events).
CREDIT_ACTIONS = frozenset({Action.SETTLE_CREDIT, Action.BLOCK_CREDIT})


@dataclasses.dataclass(frozen=True)
class Step:
    state: CoordinatorState
    # The refusal reason or cancel cause a cancel will record (for BLOCK_CREDIT: the cause to store).
    reason: str
    action: Action | None  # None: nothing more for this driver to do


class InvalidTransition(AssertionError):
    """A programmer error: the driver fed an event that cannot happen in this step."""


def resume(state: CoordinatorState, reason: str) -> Step:
    """Where a driver starts from a durable record (the first time, or after a crash)."""
    if state is CoordinatorState.TRYING:
        return Step(state, reason, Action.SETTLE_CREDIT)
    return Step(state, reason, None)


def transition(step: Step, event: Event, event_reason: str = "") -> Step:
    state, action = step.state, step.action
    if event is Event.LEASE_LOST:
        return Step(CoordinatorState.ABANDONED, step.reason, None)
    if state is not CoordinatorState.TRYING or action is None:
        raise InvalidTransition(f"{event.name} cannot happen in {state.name} with nothing to do")
    if event is Event.FAULT_RECORDED and action is Action.RECORD_FAULT:
        # The durable state stays as it is (no money moves); an operator's retry resumes it.
        return Step(state, step.reason, None)
    if event is Event.PARTICIPANT_FAULT:
        if action is Action.SETTLE_CREDIT:
            # The credit shard may not have decided: a cancel stored there first is always safe.
            return Step(state, CancelCause.PARTICIPANT_FAULT, Action.BLOCK_CREDIT)
        # Decided (or even the cancel cannot be stored): nothing safe is left to do
        # automatically. Make it loud and durable.
        return Step(state, step.reason, Action.RECORD_FAULT)
    if action in CREDIT_ACTIONS:
        match event:
            case Event.CREDIT_APPLIED:
                return Step(state, "", Action.CONFIRM_DEBIT)
            case Event.CREDIT_REFUSED | Event.CREDIT_BLOCKED:
                return Step(state, event_reason, Action.CANCEL_DEBIT)
            case Event.PENDING_EXPIRED if action is Action.SETTLE_CREDIT:
                return Step(state, CancelCause.PENDING_TIMEOUT, Action.BLOCK_CREDIT)
    if event is Event.FINISHED:
        if action is Action.CONFIRM_DEBIT:
            return Step(CoordinatorState.POSTED, step.reason, None)
        if action is Action.CANCEL_DEBIT:
            return Step(final_state_after_cancel(step.reason), step.reason, None)
    raise InvalidTransition(f"{event.name} cannot happen while doing {action.name}")


def final_state_after_cancel(reason: str) -> CoordinatorState:
    return CoordinatorState.VOIDED if reason in SYSTEM_CANCEL_CAUSES else CoordinatorState.REJECTED


# Stored and not final: the states a transfer can be in doubt in.
IN_DOUBT_STATES = frozenset({CoordinatorState.TRYING})
