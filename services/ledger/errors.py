"""One error hierarchy for the whole service.

Each class declares its gRPC status code and its machine-readable reason (a
name from corebank.v1.ErrorReason); the API layer turns any of them into a
google.rpc.Status with an ErrorInfo, in one place. Errors register themselves
by reason, so a stored rejection reason maps back to its class.
"""

from __future__ import annotations

import grpc

ERROR_DOMAIN = "corebank.v1"

_error_class_by_reason: dict[str, type[LedgerError]] = {}


class LedgerError(Exception):
    code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    reason: str = ""

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        if cls.reason:
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
    code = grpc.StatusCode.INVALID_ARGUMENT


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


# Unknown entities.
class NotFound(LedgerError):
    code = grpc.StatusCode.NOT_FOUND


class AccountNotFound(NotFound):
    reason = "ACCOUNT_NOT_FOUND"


class TransferNotFound(NotFound):
    reason = "TRANSFER_NOT_FOUND"


# Idempotency.
class IdempotencyConflict(LedgerError):
    code = grpc.StatusCode.ALREADY_EXISTS
    reason = "IDEMPOTENCY_CONFLICT"


# Business refusals. A refused transfer is recorded as REJECTED with the reason.
class Refusal(LedgerError):
    code = grpc.StatusCode.FAILED_PRECONDITION


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


class LinkedTransferFailed(Refusal):
    reason = "LINKED_TRANSFER_FAILED"


class LinkedChainSpansShards(Refusal):
    reason = "LINKED_CHAIN_SPANS_SHARDS"


# The service's queues are full: nothing was recorded, retry with backoff.
class Overloaded(LedgerError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    reason = "OVERLOADED"


# The system cancelled the transfer: final, like a refusal, but not the client's doing.
class TransferVoided(LedgerError):
    code = grpc.StatusCode.ABORTED
    reason = "TRANSFER_VOIDED"


# Operating errors: the outcome may be unknown; retrying with the same
# idempotency key is always safe.
class ShardUnavailable(LedgerError):
    code = grpc.StatusCode.UNAVAILABLE
    reason = "SHARD_UNAVAILABLE"


class DeadlineExceeded(LedgerError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED
    reason = "DEADLINE_EXCEEDED"
