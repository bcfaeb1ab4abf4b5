"""Prometheus metrics of a gRPC worker: its calls and the money they moved. Names: corebank_<what>_<unit>.

deploy/prometheus/metrics.md is the contract. Every label value comes from a fixed set
(the corebank.v1 methods, gRPC codes, ErrorReasons, roles, configured currencies, shards
of the map), never from a caller's text, and `initialise` sets each known one to 0 at
start so that a ratio reads 0, not "no data".
"""

from __future__ import annotations

from collections.abc import Iterable

import grpc
from prometheus_client import Counter, Gauge, Histogram

from services.ledger import errors
from services.ledger.access import Role
from services.ledger.rate_limits import LimitName
from services.ledger.transfers import Transfer, TransferStatus

# From 0.5 ms to 10 s: a same-shard transfer is a few ms; the tail shows lock waits and fsync stalls.
LATENCY_BUCKETS_SECONDS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)
# The latency SLO: 99% of Payments/Transfer calls answered within this, one of the buckets above.
# deploy/prometheus/rules/corebank_recording.yml records it (corebank:slo_latency:threshold_seconds,
# le="0.5"), and it is the p99 past which `make loadtest` fails (loadtest/run.py), so that a load
# test that passes does not spend the latency budget faster than the SLO allows;
# tests/deploy/test_prometheus_rules.py holds the three equal.
SLO_LATENCY_THRESHOLD_SECONDS = 0.5

GRPC_REQUESTS = Counter(
    "corebank_grpc_requests", "corebank.v1 calls by their final status code (CANCELLED, DEADLINE_EXCEEDED included)",
    ["service", "method", "code"],
)
GRPC_LATENCY = Histogram(
    "corebank_grpc_request_duration_seconds", "corebank.v1 calls, from arrival to answer", ["service", "method"],
    buckets=LATENCY_BUCKETS_SECONDS,
)
GRPC_ERRORS = Counter(
    "corebank_grpc_errors", "corebank.v1 calls answered with an error, by ErrorInfo reason ('' when the client went away)",
    ["service", "method", "code", "reason"],
)
GRPC_IN_FLIGHT = Gauge("corebank_grpc_requests_in_flight", "corebank.v1 calls being served now")
GRPC_IN_FLIGHT_LIMIT = Gauge("corebank_grpc_requests_in_flight_limit", "Calls in flight past which new ones get OVERLOADED")
OVERLOAD_REFUSALS = Counter(
    "corebank_overload_refusals", "OVERLOADED answers by cause (shard '' for limits of the whole process)", ["cause", "shard"]
)
RATE_LIMITED = Counter("corebank_rate_limited", "RATE_LIMITED answers by limit and caller role", ["limit", "role"])
TRANSFERS = Counter("corebank_transfers", "Transfers answered, by outcome and currency", ["outcome", "currency"])
TRANSFERS_AMOUNT = Counter(
    "corebank_transfers_amount_minor", "Amounts of the transfers answered, in minor units", ["outcome", "currency"]
)
TRANSFERS_FAILED = Counter("corebank_transfers_failed", "Transfer calls that did not post, by reason", ["reason"])
SHARD_MAP_VERSION = Gauge("corebank_shard_map_version", "Version of the shard map in force in this process")

# Overload causes. The admission limit of calls (services/api/interceptor.py) and of transfers
# between shards (services/ledger_service.py) belong to the whole process: shard "".
OVERLOAD_IN_FLIGHT_LIMIT = "in_flight_limit"
OVERLOAD_CROSS_SHARD_LIMIT = "cross_shard_limit"
# A shard's group-commit queue (services/group_commit.py): too many transfers queued, or the oldest waited too long.
OVERLOAD_QUEUE_FULL = "queue_full"
OVERLOAD_QUEUE_WAIT = "queue_wait"
PROCESS_CAUSES = (OVERLOAD_IN_FLIGHT_LIMIT, OVERLOAD_CROSS_SHARD_LIMIT)
SHARD_CAUSES = (OVERLOAD_QUEUE_FULL, OVERLOAD_QUEUE_WAIT)

# RATE_LIMITED's `limit` metadata -> the label: a caller's own rate, or a debit account's velocity.
RATE_LIMIT_LABELS = {LimitName.SUBJECT.value: "subject", LimitName.DEBIT_ACCOUNT.value: "velocity"}

OUTCOME_POSTED = "posted"
OUTCOME_REJECTED = "rejected"
OUTCOME_VOIDED = "voided"
OUTCOMES = (OUTCOME_POSTED, OUTCOME_REJECTED, OUTCOME_VOIDED)
# Any currency outside the configured set: a caller's typo or probe must not make a series.
CURRENCY_OTHER = "other"

_currency_labels: frozenset[str] = frozenset()


def initialise(methods: Iterable[tuple[str, str]], answered_errors: Iterable[tuple[str, str]], currencies: Iterable[str]) -> None:
    """Every known label value at 0: (service, method) of each corebank.v1 method x every gRPC
    code; (code, reason) of every error a call can be answered with; the configured currencies
    (the only ones counted by name afterwards). The overload causes of each shard are set with
    the shard map (services/bootstrap.py), which may change."""
    global _currency_labels
    _currency_labels = frozenset(currencies)
    answered_errors = list(answered_errors)
    for service, method in methods:
        GRPC_LATENCY.labels(service, method)
        for code in grpc.StatusCode:
            GRPC_REQUESTS.labels(service, method, code.name)
        for code_name, reason in answered_errors:
            GRPC_ERRORS.labels(service, method, code_name, reason)
    for reason in errors.registered_reasons():
        TRANSFERS_FAILED.labels(reason)
    for cause in PROCESS_CAUSES:
        OVERLOAD_REFUSALS.labels(cause, "")
    for limit in RATE_LIMIT_LABELS.values():
        for role in Role:
            RATE_LIMITED.labels(limit, role.value)
    for outcome in OUTCOMES:
        for currency in (*_currency_labels, CURRENCY_OTHER):
            TRANSFERS.labels(outcome, currency)
            TRANSFERS_AMOUNT.labels(outcome, currency)


def currency_label(currency: str, configured: frozenset[str] | None = None) -> str:
    """The currency when it is one of the configured ones, else `other`."""
    return currency if currency in (_currency_labels if configured is None else configured) else CURRENCY_OTHER


def record_overload(cause: str, shard_name: str = "") -> None:
    """One OVERLOADED refusal: a cause of PROCESS_CAUSES with shard "", or of SHARD_CAUSES with its shard."""
    OVERLOAD_REFUSALS.labels(cause, shard_name).inc()


def record_rate_limited(error: errors.LedgerError, role: Role) -> None:
    """A RATE_LIMITED answer (a call, or a chain of CreateTransfers)."""
    limit = RATE_LIMIT_LABELS.get(error.metadata.get("limit", ""))
    if limit is not None:
        RATE_LIMITED.labels(limit, role.value).inc()


def outcome_of(answer: Transfer | BaseException) -> str | None:
    """posted, rejected (a business refusal, recorded as REJECTED) or voided; None when the
    answer says nothing final of the transfer (malformed, overloaded, timed out, ...)."""
    if isinstance(answer, Transfer):
        return OUTCOME_POSTED if answer.status == TransferStatus.POSTED else None
    if isinstance(answer, errors.TransferVoided):
        return OUTCOME_VOIDED
    if isinstance(answer, errors.Refusal):
        return OUTCOME_REJECTED
    return None


def record_transfer_answer(answer: Transfer | BaseException, currency: str, amount_minor: int) -> None:
    """A transfer's answer to Transfer or one result of CreateTransfers, counted when it is final.
    A retry with the same transfer_id is answered, and counted, again."""
    outcome = outcome_of(answer)
    if outcome is None:
        return
    key = (outcome, currency_label(currency))
    children = _TRANSFERS_BY_OUTCOME_AND_CURRENCY.get(key)
    if children is None:
        children = _TRANSFERS_BY_OUTCOME_AND_CURRENCY[key] = (TRANSFERS.labels(*key), TRANSFERS_AMOUNT.labels(*key))
    transfers, amounts = children
    transfers.inc()
    # A chain member refused for another's sake (LINKED_TRANSFER_FAILED) may carry an amount
    # that never passed validation: only amounts a transfer could have are added.
    if amount_minor > 0:
        amounts.inc(amount_minor)


# Metric children looked up once (labels() takes a lock and builds a key every time), and the
# hot path is where they are used most: one entry per outcome x (configured currency or other),
# one per ErrorReason (a fixed enum, corebank.v1.ErrorReason).
_TRANSFERS_BY_OUTCOME_AND_CURRENCY: dict[tuple[str, str], tuple[Counter, Counter]] = {}
_TRANSFERS_FAILED_BY_REASON: dict[str, Counter] = {}


def record_transfer_failure(error: BaseException) -> None:
    reason = error.reason if isinstance(error, errors.LedgerError) and error.reason else errors.InternalFault.reason
    counter = _TRANSFERS_FAILED_BY_REASON.get(reason)
    if counter is None:
        counter = _TRANSFERS_FAILED_BY_REASON[reason] = TRANSFERS_FAILED.labels(reason)
    counter.inc()


def split_method(full_method: str) -> tuple[str, str]:
    """'/corebank.v1.Payments/Transfer' -> ('corebank.v1.Payments', 'Transfer')."""
    service, _, method = full_method.lstrip("/").partition("/")
    return service, method


BATCH_TRANSFERS = Histogram(
    "corebank_group_commit_batch_transfers", "Transfers per group-commit transaction",
    buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000),
)
