"""What the coordinators tell about the ledger's integrity, as metrics (deploy/prometheus/metrics.md,
"Integrity"): the invariant audit they run every AUDIT_INTERVAL_SECONDS, the last sweep of
collecting merchants, and how long a transfer may stay in doubt by design.

The periodic audit checks the invariants one shard's snapshot proves alone
(services.storage.audit.SHARD_INVARIANTS: debits = credits, counters = transfer rows, no
customer below zero, no row naming a missing account, clearing = in flight). They hold at
every commit of a shard, so they never raise a false alarm under load, and PostgreSQL sums
them: only violations come back, whatever the ledger's size. The invariants between shards
(a record against its credit branch, id registries, the clearing accounts of all shards)
need every transfer id of every shard read into memory, and re-reads of those that moved
between snapshots: that is the on-demand audit's job (`python -m services.storage.audit`),
not a coordinator's every minute.

It reads as the auditor role (SELECT only), in a REPEATABLE READ READ ONLY snapshot per
shard (writers never wait for it), on a thread of its own (the event loop never waits for it).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import logging
import os
import random
import threading
import time
from collections.abc import Callable, Iterable

from prometheus_client.core import GaugeMetricFamily, Metric

from services.collection import SweepPass
from services.coordinator.clearing_watch import ClearingFigures, read_clearing
from services.ledger.money import CURRENCY_EXPONENTS
from services.storage import audit

# Every coordinator audits the whole cluster this often; the first run comes after a random
# part of it, so that several coordinators do not read the shards at the same moments.
# Tests shorten it through the environment to see runs happen.
AUDIT_INTERVAL_SECONDS = float(os.environ.get("COREBANK_AUDIT_INTERVAL_SECONDS", "60"))
# One shard's snapshot is bounded: a periodic check must not hold a snapshot (and with it
# vacuum) open for long, nor pile up behind a slow shard.
AUDIT_STATEMENT_TIMEOUT_SECONDS = 30
# Label values are the configured currencies; anything else (never expected: accounts are
# opened in configured currencies only) is counted as this, as services/api/metrics.py does.
CURRENCY_OTHER = "other"

log = logging.getLogger("corebank.coordinator")


def currency_label(currency: str) -> str:
    return currency if currency in CURRENCY_EXPONENTS else CURRENCY_OTHER


@dataclasses.dataclass(frozen=True)
class AuditRun:
    """One periodic audit's findings: violations per checked invariant, and per shard and currency
    what its clearing accounts hold and what it has in flight."""

    finished_at: float  # wall clock (seconds since the epoch)
    duration_seconds: float
    violations: dict[str, int]  # every SHARD_INVARIANTS value, 0 when it holds
    clearing_minor: dict[tuple[str, str], int]  # (shard, currency label) -> amount
    in_flight_minor: dict[tuple[str, str], int]

    @property
    def ok(self) -> bool:
        return not any(self.violations.values())


def audit_run(books: list[audit.ShardBooks], finished_at: float, duration_seconds: float) -> AuditRun:
    """The run's findings from every shard's books."""
    violations = dict.fromkeys((str(invariant) for invariant in audit.SHARD_INVARIANTS), 0)
    clearing: dict[tuple[str, str], int] = collections.defaultdict(int)
    in_flight: dict[tuple[str, str], int] = collections.defaultdict(int)
    for shard in books:
        for violation in shard.violations():
            violations[str(violation.invariant)] += 1
        for currency in shard.clearing_balance_by_currency.keys() | shard.in_flight_by_currency.keys():
            key = (shard.shard_name, currency_label(currency))
            clearing[key] += shard.clearing_balance_by_currency.get(currency, 0)
            in_flight[key] += shard.in_flight_by_currency.get(currency, 0)
    return AuditRun(finished_at, duration_seconds, violations, dict(clearing), dict(in_flight))


@dataclasses.dataclass(frozen=True)
class SweepFigures:
    """The last complete sweep (every shard read): when, and the backlog it found."""

    finished_at: float  # wall clock
    backlog_minor: dict[str, int]  # currency label -> amount
    backlog_sub_accounts: int


class IntegrityCollector:
    """The coordinator's integrity figures, exposed at scrape time (prometheus_client's Collector
    protocol). Each result is replaced whole, so a scrape never sees half of a run. Registered by
    the coordinator process only: a gRPC worker has no such figures to show."""

    def __init__(self, in_doubt_bound_seconds: float) -> None:
        self.in_doubt_bound_seconds = in_doubt_bound_seconds
        self.audit: AuditRun | None = None
        self.sweep: SweepFigures | None = None
        self.clearing: ClearingFigures | None = None
        self.clearing_read_at = 0.0  # wall clock

    def audited(self, run: AuditRun) -> None:
        self.audit = run

    def swept(self, done: SweepPass) -> None:
        """A pass that could not read every shard leaves the last figures (and their time) as they were."""
        if not done.complete:
            return
        backlog: dict[str, int] = collections.defaultdict(int)
        for currency, amount_minor in done.backlog_minor_by_currency.items():
            backlog[currency_label(currency)] += amount_minor
        self.sweep = SweepFigures(time.time(), dict(backlog), done.backlog_sub_accounts)

    def read_clearing(self, figures: ClearingFigures) -> None:
        self.clearing = figures
        self.clearing_read_at = time.time()

    def collect(self) -> Iterable[Metric]:
        return integrity_families(self.in_doubt_bound_seconds, self.audit, self.sweep) + clearing_families(
            self.clearing, self.clearing_read_at
        )


def integrity_families(in_doubt_bound_seconds: float, run: AuditRun | None, sweep: SweepFigures | None) -> list[Metric]:
    """The exposition. Before the first run the timestamps read 0 and every count 0, and
    corebank_audit_ok is absent: nothing has been proved yet, nor found."""
    families: list[Metric] = [GaugeMetricFamily(
        "corebank_tcc_in_doubt_bound_seconds",
        "How long a transfer between shards may stay in doubt by design (pending timeout + lease + scan interval + cancel calls)",
        value=in_doubt_bound_seconds,
    )]
    families.append(GaugeMetricFamily(
        "corebank_audit_last_run_timestamp_seconds", "When the periodic invariant audit last finished reading every shard",
        value=run.finished_at if run else 0,
    ))
    violations = GaugeMetricFamily("corebank_audit_violations", "Findings of the last periodic audit, by invariant", labels=["invariant"])
    counts = run.violations if run else dict.fromkeys((str(invariant) for invariant in audit.SHARD_INVARIANTS), 0)
    for invariant, count in sorted(counts.items()):
        violations.add_metric([invariant], count)
    families.append(violations)
    families.append(GaugeMetricFamily(
        "corebank_audit_duration_seconds", "How long the last periodic audit took", value=run.duration_seconds if run else 0,
    ))
    clearing = GaugeMetricFamily(
        "corebank_audit_clearing_minor", "The shard's clearing balance at the last periodic audit", labels=["shard", "currency"]
    )
    in_flight = GaugeMetricFamily(
        "corebank_audit_in_flight_minor", "What the shard has in flight between shards at the last periodic audit",
        labels=["shard", "currency"],
    )
    if run is not None:
        families.append(GaugeMetricFamily("corebank_audit_ok", "1 when the last periodic audit found nothing wrong", value=int(run.ok)))
        for (shard_name, currency), amount_minor in sorted(run.clearing_minor.items()):
            clearing.add_metric([shard_name, currency], amount_minor)
        for (shard_name, currency), amount_minor in sorted(run.in_flight_minor.items()):
            in_flight.add_metric([shard_name, currency], amount_minor)
    families += [clearing, in_flight]
    families.append(GaugeMetricFamily(
        "corebank_collection_last_sweep_timestamp_seconds", "When the collecting merchants were last swept (every shard read)",
        value=sweep.finished_at if sweep else 0,
    ))
    backlog = GaugeMetricFamily(
        "corebank_collection_backlog_minor", "Collected but not yet swept, as the last sweep found it", labels=["currency"]
    )
    found = sweep.backlog_minor if sweep else {}
    for currency in sorted(set(CURRENCY_EXPONENTS) | found.keys()):
        backlog.add_metric([currency], found.get(currency, 0))
    families.append(backlog)
    families.append(GaugeMetricFamily(
        "corebank_collection_backlog_sub_accounts", "Sub-accounts holding an unswept balance, as the last sweep found them",
        value=sweep.backlog_sub_accounts if sweep else 0,
    ))
    return families


def clearing_families(figures: ClearingFigures | None, read_at: float) -> list[Metric]:
    """Clearing's exposition (deploy/prometheus/metrics.md, "Clearing"). Before the first read the
    timestamp reads 0, the counts 0, and no participant series exist."""
    families: list[Metric] = [GaugeMetricFamily(
        "corebank_clearing_last_read_timestamp_seconds", "When the coordinator last read every shard's clearing figures", value=read_at,
    )]
    position = GaugeMetricFamily(
        "corebank_clearing_position_minor", "What the participant owes, net, in the currency: every shard's share, reservations included",
        labels=["participant", "currency"],
    )
    cap = GaugeMetricFamily(
        "corebank_clearing_net_debit_cap_minor", "The participant's net debit cap in the currency (only where one is set)",
        labels=["participant", "currency"],
    )
    threshold = GaugeMetricFamily(
        "corebank_clearing_threshold_ratio", "The participant's alarm threshold, as a share of its cap (0.9 for 90%)",
        labels=["participant", "currency"],
    )
    if figures is not None:
        for (participant_id, currency), amount_minor in sorted(figures.positions_minor.items()):
            position.add_metric([participant_id, currency], amount_minor)
        for (participant_id, currency), (cap_minor, threshold_percent) in sorted(figures.caps.items()):
            cap.add_metric([participant_id, currency], cap_minor)
            threshold.add_metric([participant_id, currency], threshold_percent / 100)
    families += [position, cap, threshold]
    scalars = [
        ("corebank_clearing_open_window_id", "The settlement window open now", "open_window_id"),
        ("corebank_clearing_open_window_age_seconds", "How long the open settlement window has been open", "open_window_age_seconds"),
        ("corebank_clearing_closing_windows", "Settlement windows left CLOSING (a close interrupted before every shard moved on)", "closing_windows"),
        ("corebank_clearing_oldest_closing_window_age_seconds", "How long the oldest CLOSING window has been closing", "oldest_closing_age_seconds"),
        ("corebank_clearing_pending_settlements", "Settlements with participants not yet recorded as settled", "pending_settlements"),
        ("corebank_clearing_oldest_pending_settlement_age_seconds", "Age of the oldest settlement not fully recorded", "oldest_pending_settlement_age_seconds"),
        ("corebank_clearing_shards_on_another_window", "Shards whose current window is not the open one while no close runs", "shards_on_another_window"),
    ]
    for name, documentation, field in scalars:
        families.append(GaugeMetricFamily(name, documentation, value=getattr(figures, field) if figures else 0))
    return families


def audit_books_of(shards: list[tuple[str, str]]) -> list[audit.ShardBooks]:
    """Every shard's books, one after another: (name, DSN) each. Raises audit.ShardUnreadable."""
    return [audit.audit_books(name, dsn, AUDIT_STATEMENT_TIMEOUT_SECONDS) for name, dsn in shards]


async def in_daemon_thread(function: Callable[[], object]) -> object:
    """`function()` on a daemon thread: the event loop goes on meanwhile, and a coordinator told to
    stop does not wait for a shard's snapshot to end (asyncio.to_thread's threads are joined at exit)."""
    loop = asyncio.get_running_loop()
    answer = loop.create_future()

    def settle(result: object, error: BaseException | None) -> None:
        if answer.done():
            return
        if error is not None:
            answer.set_exception(error)
        else:
            answer.set_result(result)

    def run() -> None:
        try:
            result, error = function(), None
        except BaseException as raised:  # noqa: BLE001 (handed to the awaiting coroutine)
            result, error = None, raised
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: nobody waits any more
            loop.call_soon_threadsafe(settle, result, error)

    threading.Thread(target=run, name="periodic-audit", daemon=True).start()
    return await answer


class PeriodicAudit:
    """Audits the shards of `shards()` ((name, auditor DSN) each) every `interval_seconds`."""

    def __init__(
        self, shards: Callable[[], list[tuple[str, str]]], collector: IntegrityCollector,
        interval_seconds: float = AUDIT_INTERVAL_SECONDS, clearing_home: Callable[[], str] | None = None,
    ) -> None:
        self.shards = shards
        self.collector = collector
        self.interval_seconds = interval_seconds
        # The clearing figures are read after each audit when the home shard is known.
        self.clearing_home = clearing_home

    async def run_once(self) -> AuditRun | None:
        """One audit; None (and the last figures kept, their time ageing) when a shard cannot be read."""
        started = time.monotonic()
        try:
            books = await in_daemon_thread(lambda: audit_books_of(self.shards()))
        except audit.ShardUnreadable as error:
            log.warning("periodic audit: %s; the last result stands", error)
            return None
        run = audit_run(books, time.time(), time.monotonic() - started)
        if not run.ok:
            found = [str(violation) for shard in books for violation in shard.violations()]
            log.error("periodic audit: INVARIANTS BROKEN (%d): %s", len(found), "; ".join(found[: audit.VIOLATIONS_LISTED_PER_INVARIANT_MAX]))
        self.collector.audited(run)
        if self.clearing_home is not None:
            home = self.clearing_home()
            try:
                figures = await in_daemon_thread(lambda: read_clearing(self.shards(), home, AUDIT_STATEMENT_TIMEOUT_SECONDS))
            except audit.ShardUnreadable as error:
                log.warning("clearing figures: %s; the last ones stand", error)
            else:
                self.collector.read_clearing(figures)  # type: ignore[arg-type]
        return run

    async def run(self, stopping: asyncio.Event) -> None:
        pause_seconds = random.uniform(0, self.interval_seconds)  # nosec B311 # spreading runs, not a secret
        while True:
            try:
                await asyncio.wait_for(stopping.wait(), pause_seconds)
                return
            except TimeoutError:
                pass
            try:
                await self.run_once()
            except Exception:  # noqa: BLE001 (a bug: loud, and the next run tries again)
                log.exception("periodic audit failed")
            pause_seconds = self.interval_seconds
