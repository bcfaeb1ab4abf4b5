"""Prometheus metrics of the audit log's writer (one per process). Names: corebank_audit_log_<what>."""

from prometheus_client import Counter, Gauge

ENTRIES_WRITTEN = Counter("corebank_audit_log_entries_written", "Audit log entries stored (chain openings and closings included)")
QUEUED_ENTRIES = Gauge("corebank_audit_log_queued_entries", "Audit log entries appended but not yet stored")
WRITE_FAILURES = Counter(
    "corebank_audit_log_write_failures", "Failed inserts of a batch of audit log entries (retried), by reason", ["reason"]
)
# A failure's label: the shard was out of reach, took too long, or anything else (a bug, a
# refused insert: the log names it). A fixed set, initialised at import, so alerts read 0.
WRITE_FAILURE_REASONS = ("SHARD_UNAVAILABLE", "DEADLINE_EXCEEDED", "OTHER")
for _reason in WRITE_FAILURE_REASONS:
    WRITE_FAILURES.labels(_reason)


def write_failure_reason(reason: str) -> str:
    return reason if reason in WRITE_FAILURE_REASONS else "OTHER"

CHAINS_OPENED = Counter(
    "corebank_audit_log_chains_opened", "Chains opened: at start, or after the chain's shard kept failing", ["cause"]
)
for _cause in ("start", "failover"):
    CHAINS_OPENED.labels(_cause)
UNCONFIRMED_ANSWERS = Counter(
    "corebank_audit_log_unconfirmed_answers",
    "Answers telling of a change (money posted or held, an account changed, an unknown outcome) sent before their"
    " audit log entries were stored (their deadline came first; the entries stay queued)",
)
REFUSED_CALLS = Counter(
    "corebank_audit_log_refused_calls", "Audited calls refused with OVERLOADED because the audit log was too far behind"
)
