"""After a load test: check the ledger's invariants and every transfer the run sent.

    python -m loadtest.check FOLDER     (a run folder: setup.json, transfers.csv, merchant.csv; loadtest/swarm.py)

Checks, each printed with its figures:
1. the audit (services.storage.audit) finds no violation: every shard balanced,
   counters equal to their transfers, every currency summing to zero, no
   transfer between shards half done; first waiting a bounded time for the
   transfers still in doubt to become final;
2. no customer or merchant balance below zero;
3. every acknowledged transfer (funding included) is POSTED exactly once: in the
   shards' `transfers` tables, exactly one posted debit leg (branch 0, 1 or 3)
   and one posted credit leg (branch 0, 2 or 3) for its id, for all of them; and
   GetTransfer answers POSTED with the same accounts and amount, for a sample;
4. no refused transfer was posted (GetTransfer on a sample);
5. flash sale, during the run (merchant.csv, one read a second): the
   merchant's balance_minor + collecting_minor never below the payments
   answered POSTED before the read began, nor above those sent before it
   ended (by the wall-clock times in every process's log);
6. flash sale: the merchant's balance_minor + collecting_minor equals the sum of
   its posted payments (acknowledged, plus those whose answer was lost and that
   GetTransfer shows POSTED), and once the sweeps settle balance_minor alone does;
7. remittance (clearing): the Reconcile RPC answers consistent; from the databases, no
   transfer lost or doubled in windows: every POSTED cleared transfer row (on any shard)
   has a window_id, each acknowledged transfer of the run between two participants has
   exactly one posted row with a window_id and one within a participant none, every
   window's totals equal its transfers (per shard, participant and currency) and net to
   zero, and every position share equals its windows' nets less the settled resets; no
   participant of the run owes more than its net debit cap (NET_DEBIT_CAP_EXCEEDED refusals
   are counted, as the business answers they are).
Writes FOLDER/verdict.json (each check, ok or not, with its figures) and exits 1 on any violation.
"""

from __future__ import annotations

import argparse
import bisect
import collections
import csv
import dataclasses
import itertools
import json
import pathlib
import random
import sys
import time
from collections.abc import Callable

import grpc
import psycopg
from corebank.v1 import (
    accounts_pb2, accounts_pb2_grpc, clearing_pb2, clearing_pb2_grpc, payments_pb2, payments_pb2_grpc, transfers_pb2,
)

from loadtest import swarm
from loadtest.accounts import CURRENCY, RETRYABLE_CODES, AccountSet, describe_rpc_error
from loadtest.swarm import POSTED, REFUSED, SENT, UNKNOWN
from services.auth.client import Target
from services.ledger import clearing
from services.storage.audit import audit_cluster, reader_dsn

# Transfers between shards left in doubt become final within the pending timeout
# (30 s) plus a lease (5 s) and a recovery scan (1 s); wait a little longer, no more.
IN_DOUBT_WAIT_SECONDS_MAX = 45.0
IN_DOUBT_POLL_SECONDS = 1.0
# Sweeps of collection sub-accounts run every second.
SWEEP_SETTLE_SECONDS_MAX = 15.0
SWEEP_POLL_SECONDS = 0.5
# GetTransfer on every unresolved transfer up to this many, and on a sample of the acknowledged.
UNRESOLVED_LOOKUPS_MAX = 20_000
ACKNOWLEDGED_SAMPLE_SIZE = 2_000
REFUSED_SAMPLE_SIZE = 500
LOOKUP_CONCURRENCY_MAX = 64
LOOKUP_ATTEMPTS_MAX = 4
LOOKUP_RETRY_DELAY_SECONDS = 1.0
CALL_TIMEOUT_SECONDS = 10.0
# Ids per `= ANY(%s)` query on a shard.
SQL_ID_CHUNK_SIZE = 20_000
POSTED_STATUS = 2
# transfers.branch (services/storage/schema.sql): 0 same shard, 1 debit side and 2 credit
# side of a transfer between shards, 3 a payment credited to a collecting merchant's
# sub-account on the payer's shard. A row is a debit leg, a credit leg, or both.
DEBIT_BRANCHES, CREDIT_BRANCHES = (0, 1, 3), (0, 2, 3)
VIOLATIONS_SHOWN_MAX = 10
# The Reconcile RPC reads every window of every shard: longer than a lookup.
RECONCILE_TIMEOUT_SECONDS = 120.0
NET_DEBIT_CAP_EXCEEDED = "NET_DEBIT_CAP_EXCEEDED"

# Clearing (schema.sql's clearing section), each shard read in one snapshot. A row is a cleared
# transfer's debit leg when it is posted on branch 0, 1 or 3 between two participants and no
# settlement account is on a side (services.ledger.clearing.cleared_between).
_CLEARED = f"""status = {POSTED_STATUS} AND branch IN (0, 1, 3) AND payer_participant_id IS NOT NULL
      AND payer_participant_id <> payee_participant_id
      AND NOT starts_with(debit_account_id, '{clearing.SETTLEMENT_ACCOUNT_ID_PREFIX}')
      AND NOT starts_with(credit_account_id, '{clearing.SETTLEMENT_ACCOUNT_ID_PREFIX}')"""
CLEARED_WITHOUT_WINDOW = f"SELECT count(*), min(transfer_id) FROM transfers WHERE {_CLEARED} AND window_id IS NULL"  # nosec B608 # constants only
WINDOWED_TRANSFER_SUMS = f"""
    SELECT window_id, payer_participant_id, payee_participant_id, currency, sum(amount_minor), count(*)
    FROM transfers WHERE {_CLEARED} AND window_id IS NOT NULL GROUP BY 1, 2, 3, 4"""  # nosec B608 # constants only
WINDOW_TOTALS = "SELECT window_id, participant_id, currency, debits_minor, credits_minor, transfers FROM clearing_window_totals"
POSITIONS = "SELECT participant_id, currency, position_minor FROM clearing_positions"
RESETS = "SELECT participant_id, currency, sum(amount_minor) FROM clearing_position_resets GROUP BY 1, 2"
WINDOWS_OF = f"SELECT transfer_id, count(window_id) FROM transfers WHERE transfer_id = ANY(%s) AND status = {POSTED_STATUS} AND branch IN (0, 1, 3) GROUP BY 1"  # nosec B608 # constants only


@dataclasses.dataclass(frozen=True)
class SentTransfer:
    transfer_id: str
    debit_account_id: str
    credit_account_id: str
    amount_minor: int
    outcome: str  # posted | refused | unknown | sent (the answer never came)
    code: str
    # Wall-clock seconds (loadtest/swarm.py): just before the call, and once its answer was in (None: never).
    sent_at: float = 0.0
    answered_at: float | None = None


@dataclasses.dataclass(frozen=True)
class MerchantSample:
    """One read of the merchant during the run, and when it began and ended."""

    read_started_at: float
    read_ended_at: float
    balance_minor: int
    collecting_minor: int


def read_merchant_samples(path: pathlib.Path) -> list[MerchantSample]:
    """The merchant's reads, if the file exists."""
    if not path.exists():
        return []
    with path.open(newline="") as file:
        return [
            MerchantSample(float(row["read_started_at"]), float(row["read_ended_at"]), int(row["balance_minor"]),
                           int(row["collecting_minor"]))
            for row in csv.DictReader(file)
        ]  # fmt: skip


def read_transfers(path: pathlib.Path) -> list[SentTransfer]:
    with path.open(newline="") as file:
        return [
            SentTransfer(row["transfer_id"], row["debit_account_id"], row["credit_account_id"],
                         int(row["amount_minor"]), row["outcome"], row["code"], float(row["sent_at"]),
                         float(row["answered_at"]) if row["answered_at"] else None)
            for row in csv.DictReader(file)
        ]  # fmt: skip


def merchant_bounds(sample: MerchantSample, answered: tuple[list, list], sent: tuple[list, list]) -> tuple[int, int]:
    """(answered POSTED before the read began, sent before it ended), in minor units.

    `answered` and `sent` are payments_timeline(payments)'s: (times, running sums) each."""
    answered_times, answered_sums = answered
    sent_times, sent_sums = sent
    acknowledged_minor = answered_sums[bisect.bisect_left(answered_times, sample.read_started_at)]
    sent_minor = sent_sums[bisect.bisect_right(sent_times, sample.read_ended_at)]
    return acknowledged_minor, sent_minor


def payments_timeline(payments: list[SentTransfer]) -> tuple[tuple[list, list], tuple[list, list]]:
    """Sorted answer times of the POSTED payments and send times of all, each with running sums
    (sums[i] = the amount of the first i), for merchant_bounds."""
    posted = sorted((t.answered_at, t.amount_minor) for t in payments if t.outcome == POSTED)
    sent = sorted((t.sent_at, t.amount_minor) for t in payments)

    def timeline(pairs: list[tuple[float, int]]) -> tuple[list, list]:
        return [at for at, _ in pairs], [0, *itertools.accumulate(amount for _, amount in pairs)]

    return timeline(posted), timeline(sent)


class Report:
    def __init__(self, log: Callable[[str], None]) -> None:
        self.log = log
        self.violations: list[str] = []
        # Every check in order, for the verdict file: {"label", "ok", "detail"}.
        self.checks: list[dict] = []

    def check(self, ok: bool, label: str, detail: str = "") -> None:
        self.log(f"  [{'ok' if ok else 'VIOLATION'}] {label}" + (f": {detail}" if detail else ""))
        self.checks.append({"label": label, "ok": bool(ok), "detail": detail})
        if not ok:
            self.violations.append(f"{label}: {detail}" if detail else label)


def wait_for_final_audit(shards: list[dict], log: Callable[[str], None]):
    deadline = time.monotonic() + IN_DOUBT_WAIT_SECONDS_MAX
    while True:
        audit = audit_cluster(shards)
        if not audit.in_doubt or time.monotonic() >= deadline:
            return audit
        log(f"  waiting: {len(audit.in_doubt)} transfers between shards still in doubt")
        time.sleep(IN_DOUBT_POLL_SECONDS)


def posted_legs(shards: list[dict], transfer_ids: list[str]) -> tuple[collections.Counter, collections.Counter]:
    """Posted debit legs and credit legs per transfer id, over every shard's `transfers` table."""
    debit_legs: collections.Counter = collections.Counter()
    credit_legs: collections.Counter = collections.Counter()
    for shard in shards:
        with psycopg.connect(shard["dsn"]) as connection:
            for start in range(0, len(transfer_ids), SQL_ID_CHUNK_SIZE):
                chunk = transfer_ids[start : start + SQL_ID_CHUNK_SIZE]
                rows = connection.execute(
                    "SELECT transfer_id, branch FROM transfers WHERE transfer_id = ANY(%s) AND status = %s",
                    (chunk, POSTED_STATUS),
                )
                for transfer_id, branch in rows:
                    if branch in DEBIT_BRANCHES:
                        debit_legs[transfer_id] += 1
                    if branch in CREDIT_BRANCHES:
                        credit_legs[transfer_id] += 1
    return debit_legs, credit_legs


def get_transfers(channel: grpc.Channel, transfer_ids: list[str], retried: collections.Counter | None = None) -> dict:
    """GetTransfer for each id: the Transfer, or `CODE/REASON` of the failure.

    A lookup that fails with a retryable code (UNAVAILABLE, DEADLINE_EXCEEDED,
    RESOURCE_EXHAUSTED) is asked again, a bounded number of times; `retried`
    counts those failures by code, since a healthy cluster should have none."""
    payments = payments_pb2_grpc.PaymentsStub(channel)
    found: dict[str, transfers_pb2.Transfer | str] = {}
    pending = list(transfer_ids)
    for attempt in range(1, LOOKUP_ATTEMPTS_MAX + 1):
        again = []
        for start in range(0, len(pending), LOOKUP_CONCURRENCY_MAX):
            chunk = pending[start : start + LOOKUP_CONCURRENCY_MAX]
            futures = [
                payments.GetTransfer.future(payments_pb2.GetTransferRequest(transfer_id=t), timeout=CALL_TIMEOUT_SECONDS)
                for t in chunk
            ]
            for transfer_id, future in zip(chunk, futures):
                try:
                    found[transfer_id] = future.result()
                except grpc.RpcError as error:
                    found[transfer_id] = describe_rpc_error(error)
                    if error.code() in RETRYABLE_CODES and attempt < LOOKUP_ATTEMPTS_MAX:
                        again.append(transfer_id)
                        if retried is not None:
                            retried[found[transfer_id]] += 1
        pending = again
        if not pending:
            break
        time.sleep(LOOKUP_RETRY_DELAY_SECONDS)
    return found


def _status_name(answer: transfers_pb2.Transfer | str) -> str:
    return answer if isinstance(answer, str) else transfers_pb2.TransferStatus.Name(answer.status)


def check_run(
    cluster_raw: dict,
    accounts: AccountSet,
    sent: list[SentTransfer],
    scenario: str,
    log: Callable[[str], None] = print,
    merchant_samples: list[MerchantSample] | None = None,
) -> Report:
    """Run every check, print each; the report holds them and the violations."""
    report = Report(log)
    shards = cluster_raw["shards"]
    rng = random.Random(0)
    by_outcome = collections.Counter(t.outcome for t in sent)
    log(f"checking {scenario} run {accounts.run_id}: {len(sent)} transfers sent {dict(by_outcome)}, "
        f"{len(accounts.funding_transfers)} funding transfers")  # fmt: skip

    audit = wait_for_final_audit(shards, log)
    report.check(not audit.in_doubt, "no transfer between shards left in doubt", f"{len(audit.in_doubt)} in doubt")
    violations = audit.violations()
    report.check(not violations, "audit: shards balanced, counters match transfers, sums conserved",
                 "; ".join(violations[:VIOLATIONS_SHOWN_MAX]) or f"sum by currency {audit.balance_by_currency}")  # fmt: skip
    negative = sum(shard.negative_customer_accounts for shard in audit.shards)
    report.check(negative == 0, "no customer or merchant balance below zero", f"{negative} below zero")

    acknowledged = [SentTransfer(*row, POSTED, "funding") for row in accounts.funding_transfers]
    acknowledged += [t for t in sent if t.outcome == POSTED]
    unresolved = [t for t in sent if t.outcome in (UNKNOWN, SENT)]
    refused = [t for t in sent if t.outcome == REFUSED]

    # Every acknowledged id: exactly one posted debit leg and one posted credit leg across all shards.
    acknowledged_ids = [t.transfer_id for t in acknowledged]
    debit_legs, credit_legs = posted_legs(shards, acknowledged_ids)
    not_once = [t for t in acknowledged_ids if debit_legs[t] != 1 or credit_legs[t] != 1]
    report.check(
        not not_once, f"every acknowledged transfer posted exactly once in the shards ({len(acknowledged_ids)} ids)",
        ", ".join(f"{t} debit legs {debit_legs[t]} credit legs {credit_legs[t]}" for t in not_once[:VIOLATIONS_SHOWN_MAX]),
    )  # fmt: skip

    retried: collections.Counter = collections.Counter()
    with Target.of_cluster(cluster_raw).channel() as channel:
        sample = rng.sample(acknowledged, min(ACKNOWLEDGED_SAMPLE_SIZE, len(acknowledged)))
        answers = get_transfers(channel, [t.transfer_id for t in sample], retried)
        wrong = [
            f"{t.transfer_id}: {_status_name(answers[t.transfer_id])}"
            for t in sample
            if isinstance(answers[t.transfer_id], str)
            or answers[t.transfer_id].status != transfers_pb2.POSTED
            or (answers[t.transfer_id].debit_account_id, answers[t.transfer_id].credit_account_id,
                answers[t.transfer_id].amount_minor) != (t.debit_account_id, t.credit_account_id, t.amount_minor)
        ]  # fmt: skip
        report.check(not wrong, f"GetTransfer: acknowledged transfers POSTED as sent ({len(sample)} sampled)",
                     "; ".join(wrong[:VIOLATIONS_SHOWN_MAX]))  # fmt: skip

        lookups = unresolved[:UNRESOLVED_LOOKUPS_MAX]
        resolved = get_transfers(channel, [t.transfer_id for t in lookups], retried)
        resolved_counts = collections.Counter(_status_name(answer) for answer in resolved.values())
        log(f"  unacknowledged transfers (answer lost or unknown outcome), as GetTransfer tells now: "
            f"{dict(resolved_counts) or 'none'}")  # fmt: skip
        still_pending = [t for t, answer in resolved.items() if _status_name(answer) == "PENDING"]
        report.check(not still_pending, "no unacknowledged transfer still PENDING", ", ".join(still_pending[:5]))

        refused_sample = rng.sample(refused, min(REFUSED_SAMPLE_SIZE, len(refused)))
        refused_answers = get_transfers(channel, [t.transfer_id for t in refused_sample], retried)
        posted_refusals = [t for t, answer in refused_answers.items() if _status_name(answer) == "POSTED"]
        report.check(not posted_refusals, f"no refused transfer posted ({len(refused_sample)} sampled)",
                     ", ".join(posted_refusals[:VIOLATIONS_SHOWN_MAX]))  # fmt: skip

        if retried:
            log(f"  note: GetTransfer lookups failed and were retried: {dict(retried)}")
        if scenario == "flash-sale" and merchant_samples is not None and accounts.merchant_account_ids:
            check_merchant_during_run(accounts.merchant_account_ids[0], sent, merchant_samples, report)
        if scenario == "flash-sale" and accounts.merchant_account_ids:
            check_merchant(channel, accounts.merchant_account_ids[0], sent, resolved, report)
        if scenario == "remittance":
            check_clearing(channel, shards, accounts, acknowledged, sent, report)
    return report


@dataclasses.dataclass
class ShardClearing:
    """One shard's clearing, read in one snapshot."""

    cleared_without_window: int
    example_without_window: str | None
    # (window, participant, currency) -> [debits, credits, transfers], from the transfers and as stored.
    from_transfers: dict[tuple[int, str, str], list[int]]
    stored_totals: dict[tuple[int, str, str], list[int]]
    positions: dict[tuple[str, str], int]
    resets: dict[tuple[str, str], int]


def read_shard_clearing(dsn: str) -> ShardClearing:
    with psycopg.connect(dsn, autocommit=True) as connection:
        connection.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        without, example = connection.execute(CLEARED_WITHOUT_WINDOW).fetchone()
        from_transfers: dict[tuple[int, str, str], list[int]] = collections.defaultdict(lambda: [0, 0, 0])
        for window_id, payer, payee, currency, amount, count in connection.execute(WINDOWED_TRANSFER_SUMS):
            from_transfers[(window_id, payer, currency)][0] += int(amount)
            from_transfers[(window_id, payer, currency)][2] += int(count)
            from_transfers[(window_id, payee, currency)][1] += int(amount)
        stored = {(w, p, c): [int(d), int(cr), int(t)] for w, p, c, d, cr, t in connection.execute(WINDOW_TOTALS) if d or cr or t}
        positions = {(p, c): int(position) for p, c, position in connection.execute(POSITIONS)}
        resets = {(p, c): int(amount) for p, c, amount in connection.execute(RESETS)}
        connection.execute("COMMIT")
    return ShardClearing(int(without), example, dict(from_transfers), stored, positions, resets)


def clearing_findings(name: str, shard: ShardClearing) -> tuple[list[str], list[str], list[str]]:
    """(window totals that differ from their transfers, windows whose nets do not sum to zero,
    positions that differ from their windows' nets less the resets) on one shard."""
    totals = [
        f"{name} window {key[0]} {key[1]} {key[2]}: transfers {shard.from_transfers.get(key, [0, 0, 0])}, "
        f"totals {shard.stored_totals.get(key, [0, 0, 0])} (debits, credits, count)"
        for key in sorted(shard.from_transfers.keys() | shard.stored_totals.keys())
        if shard.from_transfers.get(key, [0, 0, 0]) != shard.stored_totals.get(key, [0, 0, 0])
    ]
    nets: dict[tuple[int, str], int] = collections.defaultdict(int)
    for (window_id, _participant, currency), (debits, credits, _count) in shard.stored_totals.items():
        nets[(window_id, currency)] += debits - credits
    unbalanced = [f"{name} window {w} {c}: nets sum to {net}" for (w, c), net in sorted(nets.items()) if net]
    expected: dict[tuple[str, str], int] = collections.defaultdict(int)
    for (_window_id, participant, currency), (debits, credits, _count) in shard.stored_totals.items():
        expected[(participant, currency)] += debits - credits
    for key, amount in shard.resets.items():
        expected[key] -= amount
    positions = [
        f"{name} {key[0]} {key[1]}: position {shard.positions.get(key, 0)}, windows' nets less resets {expected.get(key, 0)}"
        for key in sorted(expected.keys() | shard.positions.keys())
        if shard.positions.get(key, 0) != expected.get(key, 0)
    ]
    return totals, unbalanced, positions


def check_clearing(
    channel: grpc.Channel, shards: list[dict], accounts: AccountSet, acknowledged: list[SentTransfer],
    sent: list[SentTransfer], report: Report,
) -> None:
    """Check 7 (see the module's docstring)."""
    stub = clearing_pb2_grpc.ClearingStub(channel)
    try:
        reconciled = stub.Reconcile(clearing_pb2.ReconcileRequest(), timeout=RECONCILE_TIMEOUT_SECONDS)
    except grpc.RpcError as error:
        report.check(False, "Reconcile RPC: consistent", f"{describe_rpc_error(error)}: {error.details()}")
    else:
        report.check(
            reconciled.consistent and not reconciled.findings, "Reconcile RPC: consistent",
            f"{reconciled.windows_checked} windows, {reconciled.transfers_checked} transfers, "
            f"{reconciled.participants_checked} participants, {reconciled.settlements_checked} settlements checked"
            + "".join(f"; {f.check} {f.shard} window {f.window_id} {f.participant_id} {f.currency}: expected "
                      f"{f.expected_minor}, found {f.found_minor} {f.detail}" for f in reconciled.findings[:VIOLATIONS_SHOWN_MAX]),
        )  # fmt: skip

    read = {shard["name"]: read_shard_clearing(reader_dsn(shard)) for shard in shards}
    without = [f"{name}: {shard.cleared_without_window} (e.g. {shard.example_without_window})"
               for name, shard in read.items() if shard.cleared_without_window]  # fmt: skip
    report.check(not without, "every POSTED cleared transfer row has a window", "; ".join(without))
    participant_of = accounts.participant_by_account_id
    ids = [t.transfer_id for t in acknowledged]
    windowed: collections.Counter = collections.Counter()
    for shard in shards:
        with psycopg.connect(reader_dsn(shard)) as connection:
            for start in range(0, len(ids), SQL_ID_CHUNK_SIZE):
                for transfer_id, count in connection.execute(WINDOWS_OF, (ids[start : start + SQL_ID_CHUNK_SIZE],)):
                    windowed[transfer_id] += count
    cleared = [t for t in acknowledged if participant_of.get(t.debit_account_id, "") != participant_of.get(t.credit_account_id, "")]
    cleared_ids = {t.transfer_id for t in cleared}
    wrong = [f"{t.transfer_id} in {windowed[t.transfer_id]} windows" for t in cleared if windowed[t.transfer_id] != 1]
    wrong += [f"{t.transfer_id} (within one participant) in {windowed[t.transfer_id]} windows"
              for t in acknowledged if t.transfer_id not in cleared_ids and windowed[t.transfer_id]]  # fmt: skip
    report.check(
        not wrong, f"each acknowledged transfer between participants in exactly one window, within one in none "
        f"({len(cleared)} between, {len(acknowledged) - len(cleared)} within)", "; ".join(wrong[:VIOLATIONS_SHOWN_MAX]),
    )  # fmt: skip
    totals, unbalanced, positions = [], [], []
    for name, shard in read.items():
        shard_totals, shard_unbalanced, shard_positions = clearing_findings(name, shard)
        totals, unbalanced, positions = totals + shard_totals, unbalanced + shard_unbalanced, positions + shard_positions
    windows = {key[0] for shard in read.values() for key in shard.stored_totals}
    report.check(not totals, f"every window's totals equal its transfers, per shard ({len(windows)} windows)",
                 "; ".join(totals[:VIOLATIONS_SHOWN_MAX]))  # fmt: skip
    report.check(not unbalanced, "every window's nets sum to zero per currency, per shard", "; ".join(unbalanced[:VIOLATIONS_SHOWN_MAX]))
    report.check(not positions, "every position share equals its windows' nets less the settled resets",
                 "; ".join(positions[:VIOLATIONS_SHOWN_MAX]))  # fmt: skip

    refusals = sum(1 for t in sent if t.code.endswith("/" + NET_DEBIT_CAP_EXCEEDED))
    over = []
    for participant_id in accounts.participant_ids:
        position = stub.GetPosition(
            clearing_pb2.GetPositionRequest(participant_id=participant_id, currency=CURRENCY), timeout=CALL_TIMEOUT_SECONDS
        )
        if position.net_debit_cap_set and position.position_minor > position.net_debit_cap_minor:
            over.append(f"{participant_id}: position {position.position_minor} > cap {position.net_debit_cap_minor}")
    report.check(
        not over, f"no participant of the run owes more than its net debit cap ({refusals} transfers refused "
        f"{NET_DEBIT_CAP_EXCEEDED}, a business answer)", "; ".join(over),
    )  # fmt: skip


def check_merchant_during_run(
    merchant_account_id: str, sent: list[SentTransfer], samples: list[MerchantSample], report: Report
) -> None:
    payments = [t for t in sent if t.credit_account_id == merchant_account_id]
    answered, sent_timeline = payments_timeline(payments)
    outside = []
    for sample in samples:
        acknowledged_minor, sent_minor = merchant_bounds(sample, answered, sent_timeline)
        total_minor = sample.balance_minor + sample.collecting_minor
        if not acknowledged_minor <= total_minor <= sent_minor:
            outside.append(f"read at {sample.read_started_at:.3f}: {sample.balance_minor} + {sample.collecting_minor} "
                           f"not in [{acknowledged_minor}, {sent_minor}]")  # fmt: skip
    swept_during_run = sum(1 for sample in samples if sample.balance_minor > 0)
    report.check(
        bool(samples) and not outside,
        f"merchant during the run: answered POSTED before the read <= balance + collecting <= sent before its end "
        f"({len(samples)} reads, {swept_during_run} with a swept balance)",
        "; ".join(outside[:VIOLATIONS_SHOWN_MAX]) or ("no reads" if not samples else ""),
    )


def check_merchant(
    channel: grpc.Channel, merchant_account_id: str, sent: list[SentTransfer], resolved: dict, report: Report
) -> None:
    payments = [t for t in sent if t.credit_account_id == merchant_account_id]
    acknowledged_minor = sum(t.amount_minor for t in payments if t.outcome == POSTED)
    late_posted_minor = sum(
        t.amount_minor for t in payments
        if t.transfer_id in resolved and _status_name(resolved[t.transfer_id]) == "POSTED"
    )  # fmt: skip
    expected_minor = acknowledged_minor + late_posted_minor
    unresolved_count = sum(1 for t in payments if t.outcome in (UNKNOWN, SENT) and t.transfer_id not in resolved)
    stub = accounts_pb2_grpc.AccountsStub(channel)
    account = stub.GetAccount(accounts_pb2.GetAccountRequest(account_id=merchant_account_id), timeout=CALL_TIMEOUT_SECONDS)
    report.check(
        account.balance_minor + account.collecting_minor == expected_minor and unresolved_count == 0,
        "merchant: balance + collecting equals its posted payments",
        f"balance {account.balance_minor} + collecting {account.collecting_minor} = "
        f"{account.balance_minor + account.collecting_minor}; payments acknowledged {acknowledged_minor} "
        f"+ posted without acknowledgement {late_posted_minor} = {expected_minor}"
        + (f"; {unresolved_count} payments not looked up" if unresolved_count else ""),
    )
    deadline = time.monotonic() + SWEEP_SETTLE_SECONDS_MAX
    while account.collecting_minor and time.monotonic() < deadline:
        time.sleep(SWEEP_POLL_SECONDS)
        account = stub.GetAccount(accounts_pb2.GetAccountRequest(account_id=merchant_account_id), timeout=CALL_TIMEOUT_SECONDS)
    report.check(
        account.collecting_minor == 0 and account.balance_minor == expected_minor,
        f"merchant: after the sweeps settle (at most {SWEEP_SETTLE_SECONDS_MAX:.0f} s), balance alone equals them",
        f"balance {account.balance_minor}, collecting {account.collecting_minor}, expected {expected_minor}"
        + ("" if account.collect_on_every_shard else "; NOTE: the server did not mark it collect_on_every_shard"),
    )


def check_folder(folder: pathlib.Path, log: Callable[[str], None] = print) -> Report:
    """Check a run folder's transfers against the cluster its setup.json names."""
    plan = swarm.read_plan(folder)
    sent = read_transfers(folder / swarm.TRANSFERS_FILE)
    samples = read_merchant_samples(folder / swarm.MERCHANT_FILE)
    cluster = plan.host_target().cluster()
    return check_run(cluster.raw, plan.accounts, sent, plan.scenario, log, merchant_samples=samples)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.check", description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=pathlib.Path, help="a run folder (setup.json, transfers.csv, ...)")
    arguments = parser.parse_args(argv)
    report = check_folder(arguments.folder)
    verdict = {"passed": not report.violations, "checks": report.checks, "violations": report.violations}
    (arguments.folder / swarm.VERDICT_FILE).write_text(json.dumps(verdict, indent=2) + "\n")
    print("invariants hold" if not report.violations else f"{len(report.violations)} VIOLATION(S)")
    print(f"verdict: {arguments.folder / swarm.VERDICT_FILE}")
    return 1 if report.violations else 0


if __name__ == "__main__":
    sys.exit(main())
