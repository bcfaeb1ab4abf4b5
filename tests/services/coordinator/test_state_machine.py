"""The TCC protocol, without I/O: every transition, then a simulation that crashes
the coordinator at every step and recovers from the durable state alone."""

import collections
import itertools
import random

import pytest

from services.coordinator.state_machine import (
    Action, CoordinatorState as S, Event as E, FINAL_STATES, InvalidTransition, transition,
)

# (state, event, event_reason) -> (next state, reason, action), reason carried in from "R0".
TRANSITIONS = [
    (S.TRYING, E.RESUMED, "", S.TRYING, "R0", Action.TRY_CREDIT),
    (S.TRYING, E.CREDIT_TRY_FAILED, "", S.TRYING, "R0", Action.TRY_CREDIT),
    (S.TRYING, E.CREDIT_TRY_APPLIED, "", S.TRYING, "R0", Action.DECIDE_CONFIRM),
    (S.TRYING, E.CREDIT_TRY_REFUSED, "ACCOUNT_FROZEN", S.TRYING, "ACCOUNT_FROZEN", Action.DECIDE_CANCEL),
    (S.TRYING, E.CREDIT_TRY_BLOCKED, "", S.TRYING, "PENDING_TIMEOUT", Action.DECIDE_CANCEL),
    (S.TRYING, E.PENDING_EXPIRED, "", S.TRYING, "PENDING_TIMEOUT", Action.DECIDE_CANCEL),
    (S.TRYING, E.DECIDED_CONFIRM, "", S.CONFIRMING, "R0", Action.CONFIRM_CREDIT),
    (S.TRYING, E.DECIDED_CANCEL, "LIMIT_EXCEEDED", S.CANCELLING, "LIMIT_EXCEEDED", Action.CANCEL_CREDIT),
    (S.CONFIRMING, E.RESUMED, "", S.CONFIRMING, "R0", Action.CONFIRM_CREDIT),
    (S.CONFIRMING, E.CREDIT_FINISH_FAILED, "", S.CONFIRMING, "R0", Action.CONFIRM_CREDIT),
    (S.CONFIRMING, E.CREDIT_CONFIRMED, "", S.CONFIRMING, "R0", Action.FINISH),
    (S.CONFIRMING, E.FINISHED, "", S.POSTED, "R0", None),
    (S.CANCELLING, E.RESUMED, "", S.CANCELLING, "R0", Action.CANCEL_CREDIT),
    (S.CANCELLING, E.CREDIT_FINISH_FAILED, "", S.CANCELLING, "R0", Action.CANCEL_CREDIT),
    (S.CANCELLING, E.CREDIT_CANCELLED, "", S.CANCELLING, "R0", Action.FINISH),
    (S.POSTED, E.RESUMED, "", S.POSTED, "R0", None),
    (S.REJECTED, E.RESUMED, "", S.REJECTED, "R0", None),
    (S.VOIDED, E.RESUMED, "", S.VOIDED, "R0", None),
    # Permanent failures: before the decision, cancel (always safe); after it, record the fault.
    (S.TRYING, E.PARTICIPANT_FAULT, "try_credit: INTERNAL_FAULT", S.TRYING, "PARTICIPANT_FAULT", Action.DECIDE_CANCEL),
    (S.CONFIRMING, E.PARTICIPANT_FAULT, "confirm_credit: INTERNAL_FAULT", S.CONFIRMING, "R0", Action.RECORD_FAULT),
    (S.CANCELLING, E.PARTICIPANT_FAULT, "cancel_credit: INTERNAL_FAULT", S.CANCELLING, "R0", Action.RECORD_FAULT),
    (S.TRYING, E.FAULT_RECORDED, "", S.TRYING, "R0", None),
    (S.CONFIRMING, E.FAULT_RECORDED, "", S.CONFIRMING, "R0", None),
    (S.CANCELLING, E.FAULT_RECORDED, "", S.CANCELLING, "R0", None),
]


@pytest.mark.parametrize("state, event, event_reason, next_state, reason, action", TRANSITIONS)
def test_each_transition(state, event, event_reason, next_state, reason, action):
    step = transition(state, "R0", event, event_reason)
    assert (step.state, step.reason, step.action) == (next_state, reason, action)


@pytest.mark.parametrize(
    "reason, final",
    [("PENDING_TIMEOUT", S.VOIDED), ("OPERATOR", S.VOIDED), ("PARTICIPANT_FAULT", S.VOIDED), ("INSUFFICIENT_FUNDS", S.REJECTED)],
)
def test_a_cancel_ends_voided_when_the_system_cancelled_and_rejected_when_a_rule_refused(reason, final):
    assert transition(S.CANCELLING, reason, E.FINISHED).state is final


@pytest.mark.parametrize("state", [s for s in S])
def test_a_lost_lease_always_stops_the_driver(state):
    step = transition(state, "", E.LEASE_LOST)
    assert (step.state, step.action) == (S.ABANDONED, None)


def test_every_other_pair_is_a_programmer_error():
    listed = {(state, event) for state, event, *_ in TRANSITIONS} | {(s, E.LEASE_LOST) for s in S} | {
        (S.CANCELLING, E.FINISHED), (S.ABANDONED, E.RESUMED)
    }
    for state, event in itertools.product(S, E):
        if (state, event) not in listed:
            with pytest.raises(InvalidTransition):
                transition(state, "", event)


def test_a_cancel_that_itself_fails_permanently_records_the_fault_instead_of_looping():
    step = transition(S.TRYING, "", E.PARTICIPANT_FAULT)
    assert (step.reason, step.action) == ("PARTICIPANT_FAULT", Action.DECIDE_CANCEL)
    step = transition(step.state, step.reason, E.PARTICIPANT_FAULT)
    assert (step.state, step.reason, step.action) == (S.TRYING, "PARTICIPANT_FAULT", Action.RECORD_FAULT)
    # A refusal's cancel that fails is tried once more, as a fault, then recorded.
    step = transition(S.TRYING, "ACCOUNT_FROZEN", E.PARTICIPANT_FAULT)
    assert (step.reason, step.action) == ("PARTICIPANT_FAULT", Action.DECIDE_CANCEL)


def test_a_fault_after_the_decision_never_changes_the_decision():
    for state in (S.CONFIRMING, S.CANCELLING):
        step = transition(state, "R0", E.PARTICIPANT_FAULT)
        assert (step.state, step.action) == (state, Action.RECORD_FAULT)
        assert transition(step.state, step.reason, E.FAULT_RECORDED) == type(step)(state, "R0", None)
        # An operator's retry resumes it where it was, with the same decision.
        assert transition(state, "R0", E.RESUMED).action in (Action.CONFIRM_CREDIT, Action.CANCEL_CREDIT)


def test_a_confirmed_transfer_is_never_cancelled():
    # Once CONFIRMING, no event leads anywhere but CONFIRMING, POSTED or ABANDONED.
    for event in E:
        try:
            step = transition(S.CONFIRMING, "", event)
        except InvalidTransition:
            continue
        assert step.state in (S.CONFIRMING, S.POSTED, S.ABANDONED)
        assert step.action not in (Action.CANCEL_CREDIT, Action.DECIDE_CANCEL)


# --- A simulation of the whole protocol: shards as dicts with barrier semantics. ---

class Shards:
    """The durable state the real participants keep, with the same barrier rules."""

    def __init__(self, credit_refusal: str | None):
        self.record_state, self.reason, self.epoch = S.TRYING, "", 1
        self.debit_branch = "pending"  # the debit try happened with the record
        self.credit_branch = None  # None, pending, posted, voided
        self.barriers: set[tuple[str, str]] = {("debit", "try")}
        self.credit_try_outcome = None
        self.credit_refusal = credit_refusal

    def try_credit(self):
        if ("credit", "try") in self.barriers:
            return self.credit_try_outcome
        self.barriers.add(("credit", "try"))
        self.credit_try_outcome = f"refused:{self.credit_refusal}" if self.credit_refusal else "applied"
        if not self.credit_refusal:
            self.credit_branch = "pending"
        return self.credit_try_outcome

    def decide(self, epoch, confirm, reason):
        if self.record_state is not S.TRYING or epoch != self.epoch:
            return False
        self.record_state, self.reason = (S.CONFIRMING, "") if confirm else (S.CANCELLING, reason)
        if ("debit", "confirm" if confirm else "cancel") not in self.barriers:
            self.barriers.add(("debit", "confirm" if confirm else "cancel"))
            self.debit_branch = "posted" if confirm else "voided"
        return True

    def finish_credit(self, confirm):
        if not confirm and ("credit", "try") not in self.barriers:
            self.barriers.add(("credit", "try"))  # empty cancel: the try can never apply now
            self.credit_try_outcome = "blocked_by_cancel"
        operation = "confirm" if confirm else "cancel"
        if ("credit", operation) not in self.barriers:
            self.barriers.add(("credit", operation))
            if self.credit_branch == "pending":
                self.credit_branch = "posted" if confirm else "voided"

    def finish(self, epoch, final):
        if epoch != self.epoch or self.record_state not in (S.CONFIRMING, S.CANCELLING):
            return False
        self.record_state = final
        return True


class Crash(Exception):
    """The driver stopped after some actions; `step` is where it was, in memory."""

    def __init__(self, step):
        self.step = step


def run_driver(shards: Shards, epoch: int, crash_after: int | None, expire_at: int | None, clock: list, step=None):
    """Drive from `step` (default: from the durable state); raise Crash after `crash_after` actions."""
    step = step or transition(shards.record_state, shards.reason, E.RESUMED)
    if crash_after == 0:
        raise Crash(step)
    done = 0
    while step.action is not None:
        clock[0] += 1
        action = step.action
        if action is Action.TRY_CREDIT:
            if expire_at is not None and clock[0] >= expire_at:
                event, reason = E.PENDING_EXPIRED, ""
            else:
                outcome = shards.try_credit()
                event, reason = (
                    (E.CREDIT_TRY_APPLIED, "") if outcome == "applied"
                    else (E.CREDIT_TRY_REFUSED, outcome.removeprefix("refused:")) if outcome.startswith("refused:")
                    else (E.CREDIT_TRY_BLOCKED, "")
                )
        elif action in (Action.DECIDE_CONFIRM, Action.DECIDE_CANCEL):
            confirm = action is Action.DECIDE_CONFIRM
            if shards.decide(epoch, confirm, step.reason):
                event, reason = (E.DECIDED_CONFIRM, "") if confirm else (E.DECIDED_CANCEL, step.reason)
            elif shards.epoch == epoch and shards.record_state is S.CONFIRMING:
                event, reason = E.DECIDED_CONFIRM, ""
            elif shards.epoch == epoch and shards.record_state is S.CANCELLING:
                event, reason = E.DECIDED_CANCEL, shards.reason
            else:
                event, reason = E.LEASE_LOST, ""
        elif action in (Action.CONFIRM_CREDIT, Action.CANCEL_CREDIT):
            shards.finish_credit(action is Action.CONFIRM_CREDIT)
            event, reason = (E.CREDIT_CONFIRMED if action is Action.CONFIRM_CREDIT else E.CREDIT_CANCELLED), ""
        else:
            final = S.POSTED if shards.record_state is S.CONFIRMING else transition(S.CANCELLING, shards.reason, E.FINISHED).state
            event, reason = (E.FINISHED, "") if shards.finish(epoch, final) else (E.LEASE_LOST, "")
        done += 1
        step = transition(step.state, step.reason, event, reason)
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
@pytest.mark.parametrize("crash_after", [1, 2, 3, 4, 5])
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
    """The old owner wakes after the takeover and keeps going: the epoch fences it off."""
    rng = random.Random(7)
    outcomes = collections.Counter()
    for _ in range(500):
        shards = Shards(rng.choice([None, "LIMIT_EXCEEDED"]))
        clock = [0]
        zombie_step = successor_step = None
        try:
            run_driver(shards, 1, rng.randint(0, 4), rng.choice([None, 1, 2, 4]), clock)
        except Crash as paused:
            zombie_step = paused.step  # frozen (SIGSTOP), lease expires
        shards.epoch = 2
        try:
            run_driver(shards, 2, rng.randint(1, 5), rng.choice([None, 1, 3]), clock)
        except Crash as paused:
            successor_step = paused.step
        if zombie_step is not None:  # the zombie thaws and carries on from where it was
            run_driver(shards, 1, None, None, clock, step=zombie_step)
        run_driver(shards, 2, None, None, clock, step=successor_step)
        assert_all_or_nothing(shards)
        outcomes[(shards.credit_try_outcome, shards.record_state)] += 1
    # The interesting interleavings did happen, among them a try that came after its cancel.
    assert outcomes[("blocked_by_cancel", S.VOIDED)] > 0
    assert outcomes[("applied", S.POSTED)] > 0 and outcomes[("applied", S.VOIDED)] > 0
