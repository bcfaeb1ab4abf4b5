"""One error hierarchy for the whole service.

Each class declares a transport-free category and its machine-readable reason
(a name from corebank.v1.ErrorReason); the API layer alone maps categories to
gRPC status codes and builds the google.rpc.Status with an ErrorInfo. Errors
register themselves by reason, so a stored rejection reason maps back to its
class. `transient` says whether retrying the same operation may succeed (the
outcome is unknown); every other error is final for that request.
"""

from __future__ import annotations

import enum

ERROR_DOMAIN = "corebank.v1"


class Category(enum.Enum):
    """What kind of failure: the API layer maps each to one gRPC status code."""

    INVALID_ARGUMENT = "invalid_argument"  # malformed request; nothing recorded
    NOT_FOUND = "not_found"
    ALREADY_EXISTS = "already_exists"  # an idempotency key names something else
    REFUSED = "refused"  # a business rule said no; the refusal is recorded
    OVERLOADED = "overloaded"  # nothing recorded; retry with backoff
    VOIDED = "voided"  # the system cancelled the transfer; final
    UNAVAILABLE = "unavailable"  # outcome unknown; retry with the same ids
    DEADLINE = "deadline"  # outcome unknown; retry with the same ids
    INTERNAL = "internal"  # a bug or a broken invariant; never retried
    UNAUTHENTICATED = "unauthenticated"  # no valid token: nothing read or recorded
    PERMISSION_DENIED = "permission_denied"  # a valid identity without the right: nothing recorded
    RATE_LIMITED = "rate_limited"  # a rate or velocity limit is used up: nothing recorded, retry after a delay

_error_class_by_reason: dict[str, type[LedgerError]] = {}


class LedgerError(Exception):
    category: Category = Category.INTERNAL
    reason: str = ""
    transient: bool = False

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        if "reason" in cls.__dict__ and cls.reason:
            assert cls.reason not in _error_class_by_reason, f"reason {cls.reason} registered twice"
            _error_class_by_reason[cls.reason] = cls

    def __init__(self, message: str, **metadata: object) -> None:
        super().__init__(message)
        self.message = message
        self.metadata = {key: str(value) for key, value in metadata.items()}


def error_class_for_reason(reason: str) -> type[LedgerError]:
    return _error_class_by_reason[reason]


def registered_reasons() -> set[str]:
    return set(_error_class_by_reason)


# Malformed requests. Nothing is recorded.
class InvalidArgument(LedgerError):
    category = Category.INVALID_ARGUMENT


class MissingField(InvalidArgument):
    reason = "MISSING_FIELD"


class InvalidId(InvalidArgument):
    reason = "INVALID_ID"


class FieldTooLong(InvalidArgument):
    reason = "FIELD_TOO_LONG"


class InvalidField(InvalidArgument):
    reason = "INVALID_FIELD"


class BatchTooLarge(InvalidArgument):
    reason = "BATCH_TOO_LARGE"


class LinkedChainOpen(InvalidArgument):
    reason = "LINKED_CHAIN_OPEN"


class InvalidAmount(InvalidArgument):
    reason = "INVALID_AMOUNT"


class UnknownCurrency(InvalidArgument):
    reason = "UNKNOWN_CURRENCY"


class SameAccount(InvalidArgument):
    reason = "SAME_ACCOUNT"


class InvalidTier(InvalidArgument):
    reason = "INVALID_TIER"


class InvalidPageToken(InvalidArgument):
    reason = "INVALID_PAGE_TOKEN"


class InvalidPageSize(InvalidArgument):
    reason = "INVALID_PAGE_SIZE"


class InvalidStatus(InvalidArgument):
    reason = "INVALID_STATUS"


class InternalAccount(InvalidArgument):
    """Clearing and collection sub-accounts belong to the ledger itself: no client names them."""

    reason = "INTERNAL_ACCOUNT"


class ReservedId(InvalidArgument):
    """Ids in the ledger's own namespace (sweeps) cannot be chosen by a client."""

    reason = "RESERVED_ID"


class MalformedRequest(InvalidArgument):
    """The request's bytes do not decode as the method's message."""

    reason = "MALFORMED_REQUEST"


class DuplicateTransferId(InvalidArgument):
    """One CreateTransfers call names the same transfer_id twice."""

    reason = "DUPLICATE_TRANSFER_ID"


# Unknown entities.
class NotFound(LedgerError):
    category = Category.NOT_FOUND


class AccountNotFound(NotFound):
    reason = "ACCOUNT_NOT_FOUND"


class TransferNotFound(NotFound):
    reason = "TRANSFER_NOT_FOUND"


class ParticipantNotFound(NotFound):
    reason = "PARTICIPANT_NOT_FOUND"


class SettlementWindowNotFound(NotFound):
    reason = "SETTLEMENT_WINDOW_NOT_FOUND"


class SettlementNotFound(NotFound):
    reason = "SETTLEMENT_NOT_FOUND"


class SettlementEntryNotFound(NotFound):
    reason = "SETTLEMENT_ENTRY_NOT_FOUND"


# Idempotency.
class IdempotencyConflict(LedgerError):
    category = Category.ALREADY_EXISTS
    reason = "IDEMPOTENCY_CONFLICT"


class TransferExists(LedgerError):
    """A linked chain names a transfer that already exists while others of the chain are new:
    the chain is refused whole, since its existing member cannot be part of it."""

    category = Category.ALREADY_EXISTS
    reason = "TRANSFER_EXISTS"


class ParticipantExists(LedgerError):
    """RegisterParticipant with another request_id for a participant_id already registered."""

    category = Category.ALREADY_EXISTS
    reason = "PARTICIPANT_EXISTS"


# Business refusals. A refused transfer is recorded as REJECTED with the reason.
class Refusal(LedgerError):
    category = Category.REFUSED


class InsufficientFunds(Refusal):
    reason = "INSUFFICIENT_FUNDS"


class AccountFrozen(Refusal):
    reason = "ACCOUNT_FROZEN"


class AccountDebitBlocked(Refusal):
    reason = "ACCOUNT_DEBIT_BLOCKED"


class AccountCreditBlocked(Refusal):
    reason = "ACCOUNT_CREDIT_BLOCKED"


class AccountClosed(Refusal):
    reason = "ACCOUNT_CLOSED"


class CurrencyMismatch(Refusal):
    reason = "CURRENCY_MISMATCH"


class LimitExceeded(Refusal):
    reason = "LIMIT_EXCEEDED"


class BalanceOverflow(Refusal):
    reason = "BALANCE_OVERFLOW"


class AccountBalanceNotZero(Refusal):
    reason = "ACCOUNT_BALANCE_NOT_ZERO"


class AccountHasPending(Refusal):
    reason = "ACCOUNT_HAS_PENDING"


# Clearing (services/ledger/clearing.py).
class NetDebitCapExceeded(Refusal):
    """The payer's participant would owe more than its net debit cap: recorded REJECTED."""

    reason = "NET_DEBIT_CAP_EXCEEDED"


class ParticipantCurrencyNotEnabled(Refusal):
    reason = "PARTICIPANT_CURRENCY_NOT_ENABLED"


class SettlementWindowNotClosed(Refusal):
    reason = "SETTLEMENT_WINDOW_NOT_CLOSED"


class SettlementWindowAlreadySettled(Refusal):
    reason = "SETTLEMENT_WINDOW_ALREADY_SETTLED"


class LinkedTransferFailed(Refusal):
    reason = "LINKED_TRANSFER_FAILED"


class LinkedChainSpansShards(Refusal):
    reason = "LINKED_CHAIN_SPANS_SHARDS"


# The service's queues are full: nothing was recorded, retry with backoff.
class Overloaded(LedgerError):
    category = Category.OVERLOADED
    reason = "OVERLOADED"


# A rate limit of the caller or a velocity limit of a debit account is used up: nothing was
# recorded; the API layer adds a google.rpc.RetryInfo of `retry_after_seconds`.
class RateLimited(LedgerError):
    category = Category.RATE_LIMITED
    reason = "RATE_LIMITED"

    def __init__(self, message: str, retry_after_seconds: float, **metadata: object) -> None:
        super().__init__(message, retry_after_ms=max(1, round(retry_after_seconds * 1000)), **metadata)
        self.retry_after_seconds = retry_after_seconds


# Who is calling: no valid token. Nothing was read or recorded.
class Unauthenticated(LedgerError):
    category = Category.UNAUTHENTICATED


class TokenMissing(Unauthenticated):
    reason = "TOKEN_MISSING"


class TokenInvalid(Unauthenticated):
    reason = "TOKEN_INVALID"


class TokenExpired(Unauthenticated):
    reason = "TOKEN_EXPIRED"


# A valid identity whose role may not do this. Nothing was recorded. (A customer naming an
# account it does not own gets AccountNotFound instead: no existence oracle.)
class PermissionDenied(LedgerError):
    category = Category.PERMISSION_DENIED


class RoleNotAllowed(PermissionDenied):
    reason = "ROLE_NOT_ALLOWED"


class OwnerMismatch(PermissionDenied):
    reason = "OWNER_MISMATCH"


# The system cancelled the transfer: final, like a refusal, but not the client's doing.
class TransferVoided(LedgerError):
    category = Category.VOIDED
    reason = "TRANSFER_VOIDED"


# Operating errors: the outcome may be unknown; retrying with the same
# idempotency key is always safe.
class ShardUnavailable(LedgerError):
    category = Category.UNAVAILABLE
    reason = "SHARD_UNAVAILABLE"
    transient = True


class DeadlineExceeded(LedgerError):
    category = Category.DEADLINE
    reason = "DEADLINE_EXCEEDED"
    transient = True


# A bug or a broken invariant (a constraint the service's own checks should have kept,
# a configuration error): never retried, logged loudly where it happens. The message
# a client sees names no SQL and no internals.
class InternalFault(LedgerError):
    category = Category.INTERNAL
    reason = "INTERNAL_FAULT"
