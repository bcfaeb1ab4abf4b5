"""Prometheus metrics of a service process. Names: corebank_<what>_<unit>."""

from prometheus_client import Counter, Gauge, Histogram

from services.ledger import errors

# From 0.5 ms to 10 s: a same-shard transfer is a few ms; the tail shows lock waits and fsync stalls.
LATENCY_BUCKETS_SECONDS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)

GRPC_REQUESTS = Counter(
    "corebank_grpc_requests", "gRPC requests handled, by method and status code", ["service", "method", "code"]
)
GRPC_LATENCY = Histogram(
    "corebank_grpc_request_duration_seconds", "gRPC request latency", ["service", "method"], buckets=LATENCY_BUCKETS_SECONDS
)
TRANSFERS_FAILED = Counter(
    "corebank_transfers_failed", "Transfer calls that did not post, by reason", ["reason"]
)
SHARD_MAP_VERSION = Gauge("corebank_shard_map_version", "Version of the shard map in force in this process")


# One entry per ErrorReason at most (a fixed enum, corebank.v1.ErrorReason).
_TRANSFERS_FAILED_BY_REASON: dict[str, Counter] = {}


def record_transfer_failure(error: BaseException) -> None:
    reason = error.reason if isinstance(error, errors.LedgerError) and error.reason else "INTERNAL"
    # The child per reason, looked up once: labels() takes a lock and builds a key every time,
    # and a storm of refusals (funds, limits) is when this runs most.
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
OVERLOADED = Counter("corebank_overloaded", "Calls refused with OVERLOADED because a shard's queue was full or slow", ["shard"])
