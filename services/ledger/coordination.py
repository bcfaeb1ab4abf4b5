"""The durable states of a transfer between shards, and what a participant's barrier records.

Pure names, shared by the coordinator's state machine (services/coordinator),
the storage adapter that persists them (services/storage) and the audit, so
that no lower layer imports an upper one and no number stands alone in SQL.
"""

from __future__ import annotations

import enum


class CoordinatorState(enum.IntEnum):
    """Stored in tcc_transfers.state.

    The protocol is TCC with the last-participant optimisation: the debit branch is tried
    (reserved) with the record, the credit branch is tried and confirmed in one local
    transaction on its own shard, whose commit is the decision, and the record then goes
    to its final state with the debit branch's confirm or cancel. So the only state in
    doubt is TRYING; values 2 and 3 (decided but not finished) are no longer written.
    """

    TRYING = 1  # debit reserved; the credit shard's barrier holds the decision, or will
    POSTED = 4
    REJECTED = 5  # a business rule refused it (reason names the rule)
    VOIDED = 6  # the system cancelled it (reason names the cause)
    # Not stored: this driver lost its lease and must stop; another owns the transfer.
    ABANDONED = 7


FINAL_STATES = frozenset({CoordinatorState.POSTED, CoordinatorState.REJECTED, CoordinatorState.VOIDED})


class CancelCause(enum.StrEnum):
    """Causes of a cancel that are not business refusals: the transfer ends VOIDED, not REJECTED."""

    PENDING_TIMEOUT = "PENDING_TIMEOUT"  # not confirmed within the pending timeout
    OPERATOR = "OPERATOR"
    # A participant failed permanently before the decision (a bug, a broken constraint):
    # cancelling is always safe then, and the fault is logged loudly.
    PARTICIPANT_FAULT = "PARTICIPANT_FAULT"


SYSTEM_CANCEL_CAUSES = frozenset(CancelCause)


class BarrierOperation(enum.StrEnum):
    """tcc_barriers.operation: one row per (transfer, branch, operation)."""

    TRY = "try"
    CONFIRM = "confirm"
    CANCEL = "cancel"


class TryOutcome(enum.StrEnum):
    """tcc_barriers.outcome of a row. A refused try stores "refused:<REASON>" (refused_outcome),
    a blocked one "blocked_by_cancel:<CAUSE>" (blocked_outcome)."""

    APPLIED = "applied"  # the debit try reserved; the credit try applied and confirmed at once
    REFUSED = "refused"
    BLOCKED_BY_CANCEL = "blocked_by_cancel"  # a cancel came first: the try may never apply
    DONE = "done"  # the debit branch's confirm and cancel rows


_REASON_SEPARATOR = ":"


def refused_outcome(reason: str) -> str:
    """The stored outcome of a refused try: it keeps the refusal's reason for the decision."""
    return f"{TryOutcome.REFUSED}{_REASON_SEPARATOR}{reason}"


def blocked_outcome(cause: CancelCause) -> str:
    """The stored outcome of a credit try that a cancel took the place of, with its cause."""
    return f"{TryOutcome.BLOCKED_BY_CANCEL}{_REASON_SEPARATOR}{cause}"


def parse_try_outcome(stored: str) -> tuple[TryOutcome, str]:
    """(outcome, refusal reason or cancel cause, or '') of a stored try outcome."""
    outcome, _, reason = stored.partition(_REASON_SEPARATOR)
    return TryOutcome(outcome), reason
