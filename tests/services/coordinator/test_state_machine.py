"""The TCC protocol (last-participant optimisation), without I/O: every transition, then a
small model of the shards that crashes the driver at every step and recovers from the
durable state alone."""

import collections
import itertools
import random

import pytest

from services.coordinator.state_machine import (
    Action, Event as E, InvalidTransition, Step, resume, transition,
)
from services.ledger.coordination import FINAL_STATES, CoordinatorState as S

TRYING = S.TRYING
# (action, reason, event, event_reason) -> (next state, reason, action), from a step in TRYING.
TRANSITIONS = [
    (Action.SETTLE_CREDIT, "", E.CREDIT_APPLIED, "", TRYING, "", Action.CONFIRM_DEBIT),
    (Action.SETTLE_CREDIT, "", E.CREDIT_REFUSED, "ACCOUNT_FROZEN", TRYING, "ACCOUNT_FROZEN", Action.CANCEL_DEBIT),
    (Action.SETTLE_CREDIT, "", E.CREDIT_BLOCKED, "PENDING_TIMEOUT", TRYING, "PENDING_TIMEOUT", Action.CANCEL_DEBIT),
    (Action.SETTLE_CREDIT, "", E.PENDING_EXPIRED, "", TRYING, "PENDING_TIMEOUT", Action.BLOCK_CREDIT),
    # A block finds whichever came first: the try (then it stands) or a cancel.
    (Action.BLOCK_CREDIT, "PENDING_TIMEOUT", E.CREDIT_APPLIED, "", TRYING, "", Action.CONFIRM_DEBIT),
    (Action.BLOCK_CREDIT, "PENDING_TIMEOUT", E.CREDIT_REFUSED, "LIMIT_EXCEEDED", TRYING, "LIMIT_EXCEEDED", Action.CANCEL_DEBIT),
    (Action.BLOCK_CREDIT, "PENDING_TIMEOUT", E.CREDIT_BLOCKED, "OPERATOR", TRYING, "OPERATOR", Action.CANCEL_DEBIT),
    (Action.CONFIRM_DEBIT, "", E.FINISHED, "", S.POSTED, "", None),
    (Action.CANCEL_DEBIT, "ACCOUNT_FROZEN", E.FINISHED, "", S.REJECTED, "ACCOUNT_FROZEN", None),
    (Action.CANCEL_DEBIT, "PENDING_TIMEOUT", E.FINISHED, "", S.VOIDED, "PENDING_TIMEOUT", None),
    # Permanent failures: while the credit shard may be undecided, block it and cancel; after, record the fault.
    (Action.SETTLE_CREDIT, "", E.PARTICIPANT_FAULT, "settle_credit: INTERNAL_FAULT", TRYING, "PARTICIPANT_FAULT", Action.BLOCK_CREDIT),
    (Action.BLOCK_CREDIT, "PARTICIPANT_FAULT", E.PARTICIPANT_FAULT, "block_credit: INTERNAL_FAULT", TRYING, "PARTICIPANT_FAULT", Action.RECORD_FAULT),
    (Action.CONFIRM_DEBIT, "", E.PARTICIPANT_FAULT, "confirm_debit: INTERNAL_FAULT", TRYING, "", Action.RECORD_FAULT),
    (Action.CANCEL_DEBIT, "ACCOUNT_FROZEN", E.PARTICIPANT_FAULT, "cancel_debit: x", TRYING, "ACCOUNT_FROZEN", Action.RECORD_FAULT),
    (Action.RECORD_FAULT, "", E.PARTICIPANT_FAULT, "record_fault: x", TRYING, "", Action.RECORD_FAULT),
    (Action.RECORD_FAULT, "", E.FAULT_RECORDED, "", TRYING, "", None),
]


@pytest.mark.parametrize("action, reason, event, event_reason, next_state, next_reason, next_action", TRANSITIONS)
def test_each_transition(action, reason, event, event_reason, next_state, next_reason, next_action):
    step = transition(Step(TRYING, reason, action), event, event_reason)
    assert (step.state, step.reason, step.action) == (next_state, next_reason, next_action)


def test_a_driver_resumes_a_record_in_doubt_by_asking_the_credit_shard_and_a_final_one_not_at_all():
    assert resume(TRYING, "") == Step(TRYING, "", Action.SETTLE_CREDIT)
    for state in FINAL_STATES:
        assert resume(state, "R").action is None


@pytest.mark.parametrize("action", list(Action))
def test_a_lost_lease_always_stops_the_driver(action):
    step = transition(Step(TRYING, "", action), E.LEASE_LOST)
    assert (step.state, step.action) == (S.ABANDONED, None)


def test_every_other_pair_is_a_programmer_error():
    listed = {(action, event) for action, _, event, *_ in TRANSITIONS} | {(action, E.LEASE_LOST) for action in Action}
    for action, event in itertools.product(Action, E):
        if (action, event) not in listed:
            with pytest.raises(InvalidTransition):
                transition(Step(TRYING, "", action), event)
    for state in FINAL_STATES:
        with pytest.raises(InvalidTransition):
            transition(Step(state, "", None), E.FINISHED)


def test_once_the_credit_is_posted_the_transfer_is_never_cancelled():
    step = transition(Step(TRYING, "", Action.SETTLE_CREDIT), E.CREDIT_APPLIED)
    for event in E:
        try:
            after = transition(step, event)
        except InvalidTransition:
            continue
        assert after.state in (TRYING, S.POSTED, S.ABANDONED)
        assert after.action not in (Action.CANCEL_DEBIT, Action.BLOCK_CREDIT)


# --- A model of the whole protocol: shards as dicts with the barrier rules. ---

class Shards:
    """The durable state the real participants keep, with the same rules."""

    def __init__(self, credit_refusal: str | None):
        self.record_state, self.reason, self.epoch = TRYING, "", 1
        self.debit_branch = "pending"  # the debit try happened with the record
        self.credit_branch = None  # None or posted: the credit is tried and confirmed at once
        self.credit_try_outcome = None  # the decision, once stored
        self.credit_refusal = credit_refusal

    def settle_credit(self):
        if self.credit_try_outcome is None:
            self.credit_try_outcome = f"refused:{self.credit_refusal}" if self.credit_refusal else "applied"
            if not self.credit_refusal:
                self.credit_branch = "posted"
        return self.credit_try_outcome

    def block_credit(self, cause):
        if self.credit_try_outcome is None:
            self.credit_try_outcome = f"blocked_by_cancel:{cause}"
        return self.credit_try_outcome

    def settle_debit(self, epoch, final, reason):
        if self.record_state is not TRYING or epoch != self.epoch:
            return False
        self.record_state, self.reason = final, reason
        self.debit_branch = "posted" if final is S.POSTED else "voided"
        return True


class Crash(Exception):
    """The driver stopped after some actions; `step` is where it was, in memory."""

    def __init__(self, step):
        self.step = step


def credit_event(outcome: str) -> tuple[E, str]:
    kind, _, reason = outcome.partition(":")
    return {"applied": E.CREDIT_APPLIED, "refused": E.CREDIT_REFUSED, "blocked_by_cancel": E.CREDIT_BLOCKED}[kind], reason


def run_driver(shards: Shards, epoch: int, crash_after: int | None, expire_at: int | None, clock: list, step=None):
    """Drive from `step` (default: from the durable state); raise Crash after `crash_after` actions."""
    step = step or resume(shards.record_state, shards.reason)
    if crash_after == 0:
        raise Crash(step)
    done = 0
    while step.action is not None:
        clock[0] += 1
        action = step.action
        if action is Action.SETTLE_CREDIT and expire_at is not None and clock[0] >= expire_at:
            event, reason = E.PENDING_EXPIRED, ""
        elif action is Action.SETTLE_CREDIT:
            event, reason = credit_event(shards.settle_credit())
        elif action is Action.BLOCK_CREDIT:
            event, reason = credit_event(shards.block_credit(step.reason))
        else:
            final = S.POSTED if action is Action.CONFIRM_DEBIT else (S.VOIDED if step.reason == "PENDING_TIMEOUT" else S.REJECTED)
            won = shards.settle_debit(epoch, final, step.reason)
            event, reason = (E.FINISHED, "") if won or (shards.epoch == epoch and shards.record_state is final) else (E.LEASE_LOST, "")
        done += 1
        step = transition(step, event, reason)
        if crash_after is not None and done == crash_after and step.action is not None:
            raise Crash(step)


def assert_all_or_nothing(shards: Shards):
    assert shards.record_state in FINAL_STATES
    branches = (shards.debit_branch, shards.credit_branch)
    if shards.record_state is S.POSTED:
        assert branches == ("posted", "posted")
    else:
        assert "posted" not in branches and "pending" not in branches


@pytest.mark.parametrize("credit_refusal", [None, "ACCOUNT_FROZEN"])
@pytest.mark.parametrize("expire_at", [None, 1, 2, 3])
@pytest.mark.parametrize("crash_after", [0, 1, 2, 3])
def test_a_crash_at_any_step_ends_all_or_nothing_after_recovery(credit_refusal, expire_at, crash_after):
    shards = Shards(credit_refusal)
    clock = [0]
    try:
        run_driver(shards, epoch=1, crash_after=crash_after, expire_at=expire_at, clock=clock)
    except Crash:  # kill -9: the in-memory step is lost
        shards.epoch += 1  # recovery claims the lease
        run_driver(shards, epoch=shards.epoch, crash_after=None, expire_at=expire_at, clock=clock)
    assert_all_or_nothing(shards)
    if credit_refusal:
        assert shards.record_state is S.REJECTED or shards.reason == "PENDING_TIMEOUT"


def test_random_interleavings_of_a_zombie_and_its_successor_stay_all_or_nothing():
    """The old owner wakes after the takeover and keeps going: the credit shard's stored
    decision and the epoch fence it off."""
    rng = random.Random(7)
    outcomes = collections.Counter()
    for _ in range(500):
        shards = Shards(rng.choice([None, "LIMIT_EXCEEDED"]))
        clock = [0]
        zombie_step = successor_step = None
        try:
            run_driver(shards, 1, rng.randint(0, 3), rng.choice([None, 1, 2, 4]), clock)
        except Crash as paused:
            zombie_step = paused.step  # frozen (SIGSTOP), lease expires
        shards.epoch = 2
        try:
            run_driver(shards, 2, rng.randint(1, 3), rng.choice([None, 1, 3]), clock)
        except Crash as paused:
            successor_step = paused.step
        if zombie_step is not None:  # the zombie thaws and carries on from where it was
            run_driver(shards, 1, None, None, clock, step=zombie_step)
        run_driver(shards, 2, None, None, clock, step=successor_step)
        assert_all_or_nothing(shards)
        outcomes[(shards.credit_try_outcome, shards.record_state)] += 1
    # The interesting interleavings did happen: a cancel stored before a late try, and a
    # block that found the try had come first.
    assert outcomes[("blocked_by_cancel:PENDING_TIMEOUT", S.VOIDED)] > 0
    assert outcomes[("applied", S.POSTED)] > 0
