"""The ledger's invariants, checked from the databases themselves, on a busy cluster too.

    python -m services.storage.audit [--cluster PATH] [--json]

Exit status: 0 when every invariant holds, 1 when any is broken, 2 when a shard
cannot be read. Tests and load tests call `audit_cluster(shards).violations()`.
It connects as the auditor role (cluster.json's "auditor_dsn"), which may only read.

How it reads a cluster that keeps moving:
1. Each shard is read in one snapshot (REPEATABLE READ READ ONLY: plain reads, so
   writers never wait for the audit). Everything that is true at every commit of
   one shard is checked inside that snapshot: debits = credits, counters = transfer
   rows, no customer below zero, no transfer naming a missing account, clearing
   accounts = what is in flight from and to the shard, a coordinator record and its
   debit branch (written in the same local transactions) agree.
2. Shards are read at different instants, so a transfer between shards that moved
   between two snapshots can look inconsistent. The protocol only moves forward
   (record TRYING + debit try; credit try and confirm in one transaction, or a cancel
   stored in its place; record final + debit confirm/cancel), so each suspicious
   transfer is read again, in an
   order in which every check is sound: its credit branch, then its record and
   debit branch (one snapshot), then its credit branch again. A violation is
   reported only if those later reads still contradict the protocol.
3. Id registries (when the table exists) are read after every shard's transfers:
   an id is registered before its transfer is written, so a transfer seen in step 1
   has its registry row visible in step 3.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import dataclasses
import enum
import json
import os
import pathlib
import sys
import time
from collections.abc import Iterable

import psycopg
from psycopg import conninfo

from services.ledger.accounts import AccountKind
from services.ledger.coordination import FINAL_STATES, BarrierOperation, CoordinatorState
from services.ledger import ids
from services.ledger.ids import IdNamespace
from services.ledger.transfers import Branch, TransferStatus
from services.storage.roles import DatabaseRole

# Bounds. The audit is an operator's tool, but it still must not hang on a dead shard
# nor hold a snapshot (and with it vacuum) open for ever.
CONNECT_TIMEOUT_SECONDS = 5
STATEMENT_TIMEOUT_SECONDS = 300
# Shards are read concurrently, so that their snapshots are close together in time
# (fewer transfers look suspicious) and the audit takes as long as the slowest shard.
SHARD_READERS_MAX = 16
# Transfer ids sent in one re-read query (an array parameter).
RECHECK_IDS_PER_QUERY_MAX = 1000
# Violations of one invariant that `violations()` spells out; the rest are counted.
VIOLATIONS_LISTED_PER_INVARIANT_MAX = 20

EXIT_HOLDS, EXIT_VIOLATIONS, EXIT_SHARD_UNREADABLE = 0, 1, 2

STATE_DIR_ENV = "COREBANK_STATE_DIR"
DEFAULT_STATE_DIR = ".corebank"
CLUSTER_FILE_NAME = "cluster.json"

# Clearing accounts are opened by the coordinator (services/storage/tcc_store.py) as SYSTEM
# accounts of this owner; their ids start with the clearing prefix, which no client can
# choose (OpenAccount ids start with acc_ or hot_), so a client account that happens to
# name this owner is never mistaken for one.
CLEARING_OWNER_ID = ids.CLEARING_OWNER_ID
CLEARING_ACCOUNT_ID_PREFIX = "clr_"

# Branches that own a transfer id on their shard: a transfer's "home". A credit branch
# (Branch.CREDIT) is the far half of a transfer whose home is its debit shard.
OWNER_BRANCHES = (Branch.SAME_SHARD, Branch.DEBIT, Branch.COLLECTED)
# Statuses of rows that moved counters: their accounts must exist. A REJECTED row may name
# an account that never existed (a transfer naming an unknown account is recorded REJECTED).
COUNTED_STATUSES = (TransferStatus.PENDING, TransferStatus.POSTED, TransferStatus.VOIDED)
# What the debit branch must be in each state of its record: both change in the same
# local transaction on the debit shard (services/storage/tcc_store.py).
DEBIT_BRANCH_STATUSES_BY_STATE = {
    CoordinatorState.TRYING: {TransferStatus.PENDING},
    CoordinatorState.POSTED: {TransferStatus.POSTED},
    CoordinatorState.VOIDED: {TransferStatus.VOIDED},
    # Refused at its try (the row is REJECTED) or by the credit side (the try was cancelled).
    CoordinatorState.REJECTED: {TransferStatus.REJECTED, TransferStatus.VOIDED},
}
LIVE_STATUSES = {TransferStatus.PENDING, TransferStatus.POSTED}
# A credit branch is posted in the transaction that decides (last-participant optimisation),
# before its record leaves TRYING for POSTED.
CREDIT_POSTED_STATES = {CoordinatorState.TRYING, CoordinatorState.POSTED}
UNDONE_STATES = {CoordinatorState.REJECTED, CoordinatorState.VOIDED}
# The fields an id registry row holds for a transfer id (services/storage/id_registry.py).
REGISTERED_TRANSFER_FIELDS = ("debit_account_id", "credit_account_id", "amount_minor", "currency", "reference")


class Invariant(enum.StrEnum):
    """What a violation breaks; the JSON output and tests name violations by these."""

    SHARD_UNBALANCED = "shard_unbalanced"  # debits != credits (posted or pending) on a shard
    COUNTERS_DIFFER = "counters_differ_from_transfers"
    BELOW_ZERO = "customer_below_zero"
    MISSING_ACCOUNT = "transfer_names_missing_account"
    CLEARING_NOT_IN_FLIGHT = "clearing_differs_from_in_flight"  # on one shard
    CURRENCY_NOT_ZERO = "currency_does_not_sum_to_zero"
    RECORD_VS_DEBIT_BRANCH = "record_disagrees_with_debit_branch"
    RECORD_VS_CREDIT_BRANCH = "record_disagrees_with_credit_branch"
    BRANCH_WITHOUT_RECORD = "branch_without_record"
    BRANCH_FIELDS_DIFFER = "branch_differs_from_record"
    GLOBAL_CLEARING = "global_clearing_differs_from_in_flight"
    TRANSFER_ID_REUSED = "transfer_id_names_several_transfers"
    ID_NOT_REGISTERED = "transfer_id_not_registered"
    ID_REGISTRY_DIFFERS = "transfer_differs_from_registry"
    # Undone after its debit was reserved, with no refusal or cancel stored on the credit shard:
    # nothing keeps a late credit try from applying ("no hanging").
    UNDONE_WITHOUT_CREDIT_DECISION = "undone_without_credit_decision"


@dataclasses.dataclass(frozen=True)
class Violation:
    invariant: Invariant
    shard_name: str  # "" when it is about the cluster as a whole
    subject: str  # an account id, a transfer id or a currency
    detail: str

    def __str__(self) -> str:
        where = f"{self.shard_name}: " if self.shard_name else ""
        return f"{where}{self.invariant}: {self.subject}: {self.detail}"

    def as_json(self) -> dict:
        return {"invariant": str(self.invariant), "shard": self.shard_name, "subject": self.subject, "detail": self.detail}


class ShardUnreadable(Exception):
    """A shard that a check (this audit, the audit log's verify) cannot read: exit 2."""

    def __init__(self, shard_name: str, problem: BaseException | str) -> None:
        described = problem if isinstance(problem, str) else f"{type(problem).__name__}: {problem}".strip()
        super().__init__(f"{shard_name}: cannot be read: {described}")
        self.shard_name = shard_name


# The SQL of one shard's snapshot.

SHARD_TOTALS_BY_CURRENCY = """
    SELECT currency, count(*), sum(debits_posted_minor), sum(credits_posted_minor),
           sum(debits_pending_minor), sum(credits_pending_minor)
    FROM accounts GROUP BY currency ORDER BY currency"""
ACCOUNTS_BELOW_ZERO = f"""
    SELECT account_id, credits_posted_minor::numeric - debits_posted_minor::numeric - debits_pending_minor::numeric
    FROM accounts
    WHERE kind IN ({AccountKind.CUSTOMER:d}, {AccountKind.MERCHANT:d})
      AND credits_posted_minor::numeric - debits_posted_minor::numeric - debits_pending_minor::numeric < 0
    ORDER BY account_id"""  # nosec B608 # constants only, no request data
# Which account each row debits and credits on this shard: a row of a transfer between
# shards (Branch.DEBIT, Branch.CREDIT) has the shard's clearing account on its far side;
# a payment collected for a merchant (Branch.COLLECTED) credits the merchant's sub-account
# on this shard (clearing_account_id), while credit_account_id names the merchant itself.
ENTRIES = f"""
    SELECT transfer_id, branch, status, amount_minor::numeric AS amount,
           CASE WHEN branch = {Branch.CREDIT:d} THEN clearing_account_id ELSE debit_account_id END AS debited,
           CASE WHEN branch IN ({Branch.DEBIT:d}, {Branch.COLLECTED:d}) THEN clearing_account_id
                ELSE credit_account_id END AS credited
    FROM transfers"""  # nosec B608 # constants only, no request data
# Every account's four counters must be exactly what its transfer rows say.
ACCOUNTS_NOT_MATCHING_TRANSFERS = f"""
    WITH entries AS ({ENTRIES} WHERE status IN ({TransferStatus.PENDING:d}, {TransferStatus.POSTED:d})
    ), legs AS (
        SELECT debited AS account_id,
               CASE WHEN status = {TransferStatus.POSTED:d} THEN amount ELSE 0 END AS debits_posted,
               0 AS credits_posted,
               CASE WHEN status = {TransferStatus.PENDING:d} THEN amount ELSE 0 END AS debits_pending,
               0 AS credits_pending
        FROM entries
        UNION ALL
        SELECT credited, 0, CASE WHEN status = {TransferStatus.POSTED:d} THEN amount ELSE 0 END,
               0, CASE WHEN status = {TransferStatus.PENDING:d} THEN amount ELSE 0 END
        FROM entries
    ), sums AS (
        SELECT account_id, sum(debits_posted) AS debits_posted, sum(credits_posted) AS credits_posted,
               sum(debits_pending) AS debits_pending, sum(credits_pending) AS credits_pending
        FROM legs GROUP BY account_id
    )
    SELECT a.account_id,
           ARRAY[a.debits_posted_minor, a.credits_posted_minor, a.debits_pending_minor, a.credits_pending_minor]::numeric[],
           ARRAY[coalesce(s.debits_posted, 0), coalesce(s.credits_posted, 0),
                 coalesce(s.debits_pending, 0), coalesce(s.credits_pending, 0)]::numeric[]
    FROM accounts a LEFT JOIN sums s USING (account_id)
    WHERE (a.debits_posted_minor, a.credits_posted_minor, a.debits_pending_minor, a.credits_pending_minor)
          IS DISTINCT FROM (coalesce(s.debits_posted, 0), coalesce(s.credits_posted, 0),
                            coalesce(s.debits_pending, 0), coalesce(s.credits_pending, 0))
    ORDER BY a.account_id"""  # nosec B608 # constants only, no request data
# Every account a counted row moves must exist on this shard (debited and credited above
# are exactly the accounts of this shard that the row names, for every branch).
TRANSFERS_NAMING_MISSING_ACCOUNTS = f"""
    WITH entries AS ({ENTRIES} WHERE status IN ({", ".join(f"{s:d}" for s in COUNTED_STATUSES)}))
    SELECT e.transfer_id, e.branch, named.account_id
    FROM entries e CROSS JOIN LATERAL (VALUES (e.debited), (e.credited)) AS named (account_id)
    WHERE named.account_id IS NULL
       OR NOT EXISTS (SELECT 1 FROM accounts a WHERE a.account_id = named.account_id)
    ORDER BY e.transfer_id"""  # nosec B608 # constants only, no request data
CLEARING_BALANCE_BY_CURRENCY = f"""
    SELECT currency, sum(credits_posted_minor::numeric - debits_posted_minor::numeric) FROM accounts
    WHERE owner_id = '{CLEARING_OWNER_ID}' AND kind = {AccountKind.SYSTEM:d}
      AND starts_with(account_id, '{CLEARING_ACCOUNT_ID_PREFIX}')
    GROUP BY currency"""  # nosec B608 # constants only, no request data
# What this shard's clearing accounts must hold: every posted debit branch credited one of
# them, every posted credit branch debited one.
IN_FLIGHT_BY_CURRENCY = f"""
    SELECT currency, sum(CASE WHEN branch = {Branch.DEBIT:d} THEN amount_minor::numeric ELSE -amount_minor::numeric END)
    FROM transfers WHERE status = {TransferStatus.POSTED:d} AND branch IN ({Branch.DEBIT:d}, {Branch.CREDIT:d})
    GROUP BY currency"""  # nosec B608 # constants only, no request data
TRANSFER_FIELDS = "transfer_id, debit_account_id, credit_account_id, amount_minor, currency, reference"
RECORDS = f"SELECT {TRANSFER_FIELDS}, state, credit_shard FROM tcc_transfers"  # nosec B608 # constants only, no request data
TRANSFER_ROWS = f"SELECT {TRANSFER_FIELDS}, branch, status FROM transfers"  # nosec B608 # constants only, no request data
ID_REGISTRY_EXISTS = "SELECT to_regclass('id_registry') IS NOT NULL"
REGISTERED_TRANSFER_IDS = f"SELECT id, fields FROM id_registry WHERE namespace = {IdNamespace.TRANSFER:d}"  # nosec B608 # constants only, no request data
# Fresh reads of suspicious transfers.
RECORDS_OF = f"{RECORDS} WHERE transfer_id = ANY(%s)"
BRANCHES_OF = f"{TRANSFER_ROWS} WHERE transfer_id = ANY(%s) AND branch = %s"
CREDIT_TRY_OUTCOMES_OF = f"""
    SELECT transfer_id, outcome FROM tcc_barriers
    WHERE transfer_id = ANY(%s) AND branch = {int(Branch.CREDIT)} AND operation = '{BarrierOperation.TRY}'"""  # nosec B608 # constants only, no request data


@dataclasses.dataclass(frozen=True)
class Fields:
    """What a transfer is: the fields a retry must repeat, as its rows and record store them."""

    debit_account_id: str
    credit_account_id: str
    amount_minor: int
    currency: str
    reference: str

    def differences(self, other: Fields) -> list[str]:
        return [f.name for f in dataclasses.fields(self) if getattr(self, f.name) != getattr(other, f.name)]


@dataclasses.dataclass(frozen=True)
class Record:
    """A coordinator record (tcc_transfers) as read."""

    shard_name: str
    fields: Fields
    state: CoordinatorState
    credit_shard: str


@dataclasses.dataclass(frozen=True)
class Row:
    """A transfers row as read."""

    shard_name: str
    fields: Fields
    branch: Branch
    status: TransferStatus


def _record(shard_name: str, row: tuple) -> tuple[str, Record]:
    return row[0], Record(shard_name, Fields(*row[1:6]), CoordinatorState(row[6]), row[7])


def _row(shard_name: str, row: tuple) -> tuple[str, Row]:
    return row[0], Row(shard_name, Fields(*row[1:6]), Branch(row[6]), TransferStatus(row[7]))


# What one shard's snapshot proves alone, with no other shard read: sound on a busy cluster
# without any re-read, and cheap (PostgreSQL sums; only violations come back). The
# coordinators' periodic audit checks these (services/coordinator/integrity.py).
SHARD_INVARIANTS = (
    Invariant.SHARD_UNBALANCED, Invariant.COUNTERS_DIFFER, Invariant.BELOW_ZERO, Invariant.MISSING_ACCOUNT,
    Invariant.CLEARING_NOT_IN_FLIGHT,
)


@dataclasses.dataclass
class ShardBooks:
    """One shard's books as of one snapshot: the figures its SHARD_INVARIANTS are checked on."""

    shard_name: str
    # currency -> (debits posted, credits posted, debits pending, credits pending)
    totals_by_currency: dict[str, tuple[int, int, int, int]]
    accounts_below_zero: dict[str, int]  # account id -> available (balance less pending debits)
    accounts_not_matching_transfers: dict[str, tuple[list[int], list[int]]]  # id -> (counters, transfer sums)
    transfers_naming_missing_accounts: list[tuple[str, Branch, str | None]]
    clearing_balance_by_currency: dict[str, int]
    in_flight_by_currency: dict[str, int]  # posted debit branches less posted credit branches
    snapshot_seconds: float

    @property
    def negative_customer_accounts(self) -> int:
        return len(self.accounts_below_zero)

    @property
    def balance_by_currency(self) -> dict[str, int]:
        return {currency: totals[1] - totals[0] for currency, totals in self.totals_by_currency.items()}

    def violations(self) -> list[Violation]:
        """What is wrong with these books (SHARD_INVARIANTS)."""
        found = []
        name = self.shard_name

        def add(invariant: Invariant, subject: str, detail: str) -> None:
            found.append(Violation(invariant, name, subject, detail))

        for currency, (debits, credits, debits_pending, credits_pending) in self.totals_by_currency.items():
            if (debits, debits_pending) != (credits, credits_pending):
                add(Invariant.SHARD_UNBALANCED, currency,
                    f"debits {debits}/{debits_pending} != credits {credits}/{credits_pending} (posted/pending)")
        for account_id, (counters, sums) in self.accounts_not_matching_transfers.items():
            add(Invariant.COUNTERS_DIFFER, account_id,
                f"counters {counters} != transfers {sums} (debits posted, credits posted, debits pending, credits pending)")
        for account_id, available in self.accounts_below_zero.items():
            add(Invariant.BELOW_ZERO, account_id, f"balance less pending debits is {available}")
        for transfer_id, branch, account_id in self.transfers_naming_missing_accounts:
            add(Invariant.MISSING_ACCOUNT, transfer_id, f"{branch.name} row names account {account_id}, not on this shard")
        for currency in sorted(self.clearing_balance_by_currency.keys() | self.in_flight_by_currency.keys()):
            clearing = self.clearing_balance_by_currency.get(currency, 0)
            in_flight = self.in_flight_by_currency.get(currency, 0)
            if clearing != in_flight:
                add(Invariant.CLEARING_NOT_IN_FLIGHT, currency,
                    f"clearing accounts net to {clearing}, posted debit branches less posted credit branches are {in_flight}")
        return found


@dataclasses.dataclass
class ShardAudit(ShardBooks):
    """One shard, as of one snapshot: its books, and its transfers between shards to check against the others."""

    accounts: int
    transfers: int
    debits_posted_minor: int
    credits_posted_minor: int
    debits_pending_minor: int
    credits_pending_minor: int
    records: dict[str, Record]
    debit_branches: dict[str, Row]
    credit_branches: dict[str, Row]
    owned_transfers: dict[str, Fields]  # transfer ids this shard is the home of (see OWNER_BRANCHES)
    has_id_registry: bool

    @property
    def balanced(self) -> bool:
        return (self.debits_posted_minor, self.debits_pending_minor) == (self.credits_posted_minor, self.credits_pending_minor)

    @property
    def in_doubt(self) -> list[str]:
        return [transfer_id for transfer_id, record in self.records.items() if record.state not in FINAL_STATES]

    def violations(self) -> list[Violation]:
        """What is wrong inside this snapshot alone."""
        found = super().violations()
        for transfer_id, record in self.records.items():
            found += debit_branch_violations(transfer_id, record, self.debit_branches.get(transfer_id))
        for transfer_id, row in self.debit_branches.items():
            if transfer_id not in self.records:
                found.append(Violation(Invariant.BRANCH_WITHOUT_RECORD, self.shard_name, transfer_id,
                                       f"{row.branch.name} branch {row.status.name} has no record here"))
        return found


def debit_branch_violations(transfer_id: str, record: Record, debit: Row | None) -> list[Violation]:
    """A record and its debit branch are written together: they agree in any one snapshot."""
    name = record.shard_name
    if debit is None:
        return [Violation(Invariant.RECORD_VS_DEBIT_BRANCH, name, transfer_id, f"record {record.state.name} has no debit branch")]
    found = []
    if debit.status not in DEBIT_BRANCH_STATUSES_BY_STATE.get(record.state, set()):
        found.append(Violation(Invariant.RECORD_VS_DEBIT_BRANCH, name, transfer_id,
                               f"record {record.state.name} but its debit branch is {debit.status.name}"))
    differences = record.fields.differences(debit.fields)
    if differences:
        found.append(Violation(Invariant.BRANCH_FIELDS_DIFFER, name, transfer_id, f"debit branch differs in {differences}"))
    return found


def credit_branch_violations(
    transfer_id: str, record: Record | None, debit: Row | None, credit_before: Row | None, credit_after: Row | None
) -> list[Violation]:
    """The record against its credit branch, on another shard.

    Sound when `credit_before` was read before `record` and `debit`, and `credit_after`
    after them: a branch only moves forward, and each implication below looks from a
    later read back at an earlier step of the protocol.
    """
    found = []
    if record is None:
        if credit_before is not None:
            # The record is written before the credit branch is tried.
            found.append(Violation(Invariant.BRANCH_WITHOUT_RECORD, credit_before.shard_name, transfer_id,
                                   f"CREDIT branch {credit_before.status.name} has no record on any shard"))
        return found
    where = record.shard_name
    # A branch row never changes but its status, so either read tells where and what it is.
    credit = credit_before or credit_after
    if credit is not None:
        if credit.shard_name != record.credit_shard:
            found.append(Violation(Invariant.BRANCH_FIELDS_DIFFER, credit.shard_name, transfer_id,
                                   f"credit branch found on {credit.shard_name}, its record names {record.credit_shard}"))
        differences = record.fields.differences(credit.fields)
        if differences:
            found.append(Violation(Invariant.BRANCH_FIELDS_DIFFER, credit.shard_name, transfer_id,
                                   f"credit branch differs from its record in {differences}"))
    # A posted credit branch is the decision to confirm: its record can only be in doubt or POSTED.
    if credit_before is not None and credit_before.status == TransferStatus.POSTED and record.state not in CREDIT_POSTED_STATES:
        debit_status = debit.status.name if debit else "missing"
        found.append(Violation(Invariant.RECORD_VS_CREDIT_BRANCH, where, transfer_id,
                               f"credit branch POSTED but the record is {record.state.name}, debit branch {debit_status}"))
    # A record is final only after the credit shard decided: posted, or refused or blocked
    # (which also keeps a late try from ever applying).
    credit_status = credit_after.status.name if credit_after else "absent"
    if record.state == CoordinatorState.POSTED and (credit_after is None or credit_after.status != TransferStatus.POSTED):
        found.append(Violation(Invariant.RECORD_VS_CREDIT_BRANCH, where, transfer_id,
                               f"record POSTED but its credit branch is {credit_status}"))
    if record.state in UNDONE_STATES and credit_after is not None and credit_after.status in LIVE_STATUSES:
        found.append(Violation(Invariant.RECORD_VS_CREDIT_BRANCH, where, transfer_id,
                               f"record {record.state.name} but its credit branch is {credit_status}"))
    return found


@dataclasses.dataclass
class GlobalFigures:
    """Figures of the whole cluster, summed over the shards' snapshots."""

    balance_by_currency: dict[str, int]
    clearing_balance_by_currency: dict[str, int]
    # Sum of amounts of transfers seen with a posted debit branch and no posted credit branch.
    in_flight_by_currency: dict[str, int]
    in_flight_transfers: int
    # Transfers whose credit branch was seen posted but their debit branch not: decided, with the
    # debit not settled yet (or settled after its shard was read). Their amounts close the sum.
    credit_seen_before_debit_by_currency: dict[str, int]
    transfers_between_shards: int
    transfers_in_doubt: int
    transfer_ids: int
    rechecked_transfers: int
    id_registry_shards: int  # shards that have the id_registry table
    registered_transfer_ids: int


@dataclasses.dataclass
class ClusterAudit:
    shards: list[ShardAudit]
    figures: GlobalFigures | None = None
    cross_shard_findings: list[Violation] = dataclasses.field(default_factory=list)
    duration_seconds: float = 0.0

    @property
    def balance_by_currency(self) -> dict[str, int]:
        return _sum_by_currency(shard.balance_by_currency for shard in self.shards)

    @property
    def in_doubt(self) -> list[str]:
        """Transfers between shards whose record is not final yet."""
        return [transfer_id for shard in self.shards for transfer_id in shard.in_doubt]

    def findings(self) -> list[Violation]:
        """Every violation, structured."""
        found = [violation for shard in self.shards for violation in shard.violations()]
        found += [
            Violation(Invariant.CURRENCY_NOT_ZERO, "", currency, f"balances sum to {total}, not 0")
            for currency, total in sorted(self.balance_by_currency.items()) if total != 0
        ]
        return found + self.cross_shard_findings

    def violations(self) -> list[str]:
        """One line per violation (at most VIOLATIONS_LISTED_PER_INVARIANT_MAX per invariant, then a count)."""
        lines = []
        by_invariant = collections.defaultdict(list)
        for violation in self.findings():
            by_invariant[violation.invariant].append(violation)
        for invariant, violations in by_invariant.items():
            lines += [str(violation) for violation in violations[:VIOLATIONS_LISTED_PER_INVARIANT_MAX]]
            if len(violations) > VIOLATIONS_LISTED_PER_INVARIANT_MAX:
                lines.append(f"{invariant}: {len(violations) - VIOLATIONS_LISTED_PER_INVARIANT_MAX} more")
        return lines

    def as_json(self) -> dict:
        findings = self.findings()
        counts = collections.Counter(str(violation.invariant) for violation in findings)
        listed = collections.Counter()
        shown = []
        for violation in findings:
            listed[violation.invariant] += 1
            if listed[violation.invariant] <= VIOLATIONS_LISTED_PER_INVARIANT_MAX:
                shown.append(violation.as_json())
        return {
            "verdict": "invariants hold" if not findings else "invariants broken",
            "holds": not findings,
            "duration_seconds": round(self.duration_seconds, 3),
            "shards": [_shard_json(shard) for shard in self.shards],
            "global": dataclasses.asdict(self.figures) if self.figures else {},
            "violation_counts": dict(counts),
            "violations": shown,
        }


def _shard_json(shard: ShardAudit) -> dict:
    return {
        "name": shard.shard_name,
        "accounts": shard.accounts,
        "transfers": shard.transfers,
        "debits_posted_minor": shard.debits_posted_minor,
        "credits_posted_minor": shard.credits_posted_minor,
        "debits_pending_minor": shard.debits_pending_minor,
        "credits_pending_minor": shard.credits_pending_minor,
        "balanced": shard.balanced,
        "balance_by_currency": shard.balance_by_currency,
        "clearing_balance_by_currency": shard.clearing_balance_by_currency,
        "in_flight_by_currency": shard.in_flight_by_currency,
        "accounts_below_zero": shard.negative_customer_accounts,
        "accounts_not_matching_transfers": len(shard.accounts_not_matching_transfers),
        "transfers_naming_missing_accounts": len(shard.transfers_naming_missing_accounts),
        "coordinator_records": len(shard.records),
        "records_in_doubt": len(shard.in_doubt),
        "has_id_registry": shard.has_id_registry,
        "snapshot_seconds": round(shard.snapshot_seconds, 3),
    }


def _sum_by_currency(parts: Iterable[dict[str, int]]) -> dict[str, int]:
    totals: dict[str, int] = collections.defaultdict(int)
    for part in parts:
        for currency, amount in part.items():
            totals[currency] += amount
    return dict(sorted(totals.items()))


# Reading.


def reader_dsn(shard: dict) -> str:
    """The auditor role's DSN (cluster.json's "auditor_dsn": SELECT only), else "dsn"
    (cluster.json files and scratch shards that name one DSN)."""
    return shard.get("auditor_dsn") or shard["dsn"]


def auditor_dsn(service_dsn: str, passfile: str) -> str:
    """The auditor role's DSN to the shard a service DSN reaches (the shard map's): same host, port
    and database, the auditor's name and passfile. The coordinators' periodic audit reads through it."""
    return conninfo.make_conninfo(service_dsn, user=DatabaseRole.AUDITOR.value, passfile=passfile)


def connect_for_reading(
    shard_name: str, dsn: str, statement_timeout_seconds: int = STATEMENT_TIMEOUT_SECONDS
) -> psycopg.Connection:
    """A check's connection to one shard (this audit's, the audit log's verify), bounded in time."""
    try:
        connection = psycopg.connect(dsn, connect_timeout=CONNECT_TIMEOUT_SECONDS, autocommit=True)
        connection.execute(f"SET statement_timeout = '{statement_timeout_seconds}s'")
        return connection
    except psycopg.Error as error:  # any database error here means this shard cannot be read: exit 2
        raise ShardUnreadable(shard_name, error) from error


def _snapshot(connection: psycopg.Connection) -> None:
    """A consistent read-only snapshot: plain reads take no lock a writer waits for."""
    connection.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")


def _read_books(connection: psycopg.Connection) -> tuple[dict, int]:
    """ShardBooks' figures (but its name and time), read in the caller's snapshot; and the number of accounts."""
    totals = connection.execute(SHARD_TOTALS_BY_CURRENCY).fetchall()
    books = {
        "totals_by_currency": {row[0]: tuple(int(value) for value in row[2:]) for row in totals},
        "accounts_below_zero": {row[0]: int(row[1]) for row in connection.execute(ACCOUNTS_BELOW_ZERO)},
        "accounts_not_matching_transfers": {
            row[0]: ([int(v) for v in row[1]], [int(v) for v in row[2]]) for row in connection.execute(ACCOUNTS_NOT_MATCHING_TRANSFERS)
        },
        "transfers_naming_missing_accounts": [
            (row[0], Branch(row[1]), row[2]) for row in connection.execute(TRANSFERS_NAMING_MISSING_ACCOUNTS)
        ],
        "clearing_balance_by_currency": {row[0]: int(row[1]) for row in connection.execute(CLEARING_BALANCE_BY_CURRENCY)},
        "in_flight_by_currency": {row[0]: int(row[1]) for row in connection.execute(IN_FLIGHT_BY_CURRENCY) if row[1]},
    }
    return books, sum(row[1] for row in totals)


def audit_books(shard_name: str, dsn: str, statement_timeout_seconds: int = STATEMENT_TIMEOUT_SECONDS) -> ShardBooks:
    """One shard's books, in one snapshot: what SHARD_INVARIANTS are checked on."""
    started = time.monotonic()
    try:
        with connect_for_reading(shard_name, dsn, statement_timeout_seconds) as connection:
            _snapshot(connection)
            books, _ = _read_books(connection)
            connection.execute("COMMIT")
    except psycopg.Error as error:  # any database error here means this shard cannot be read: exit 2
        raise ShardUnreadable(shard_name, error) from error
    return ShardBooks(shard_name=shard_name, **books, snapshot_seconds=time.monotonic() - started)


def audit_shard(shard_name: str, dsn: str) -> ShardAudit:
    """Everything the audit needs from one shard, in one snapshot."""
    started = time.monotonic()
    try:
        with connect_for_reading(shard_name, dsn) as connection:
            _snapshot(connection)
            books, accounts = _read_books(connection)
            records = dict(_record(shard_name, row) for row in connection.execute(RECORDS))
            debit_branches, credit_branches, owned = {}, {}, {}
            transfers = 0
            for row in connection.execute(TRANSFER_ROWS):
                transfer_id, transfer = _row(shard_name, row)
                transfers += 1
                if transfer.branch == Branch.DEBIT:
                    debit_branches[transfer_id] = transfer
                elif transfer.branch == Branch.CREDIT:
                    credit_branches[transfer_id] = transfer
                if transfer.branch in OWNER_BRANCHES:
                    owned[transfer_id] = transfer.fields
            # A record owns its id too (its debit branch row says the same, on the same shard).
            for transfer_id, record in records.items():
                owned.setdefault(transfer_id, record.fields)
            has_registry = connection.execute(ID_REGISTRY_EXISTS).fetchone()[0]
            connection.execute("COMMIT")
    except psycopg.Error as error:  # any database error here means this shard cannot be read: exit 2
        raise ShardUnreadable(shard_name, error) from error
    sums = [sum(figures[i] for figures in books["totals_by_currency"].values()) for i in range(4)]
    return ShardAudit(
        shard_name=shard_name,
        **books,
        accounts=accounts,
        transfers=transfers,
        debits_posted_minor=sums[0],
        credits_posted_minor=sums[1],
        debits_pending_minor=sums[2],
        credits_pending_minor=sums[3],
        records=records,
        debit_branches=debit_branches,
        credit_branches=credit_branches,
        owned_transfers=owned,
        has_id_registry=bool(has_registry),
        snapshot_seconds=time.monotonic() - started,
    )


def _chunks(ids: list[str]) -> Iterable[list[str]]:
    for start in range(0, len(ids), RECHECK_IDS_PER_QUERY_MAX):
        yield ids[start : start + RECHECK_IDS_PER_QUERY_MAX]


def _read_credit_branches(shards: list[dict], transfer_ids: list[str]) -> dict[str, Row]:
    found = {}
    for shard in shards:
        try:
            with connect_for_reading(shard["name"], reader_dsn(shard)) as connection:
                for chunk in _chunks(transfer_ids):
                    for row in connection.execute(BRANCHES_OF, [chunk, int(Branch.CREDIT)]):
                        transfer_id, branch = _row(shard["name"], row)
                        found[transfer_id] = branch
        except psycopg.Error as error:  # any database error here means this shard cannot be read: exit 2
            raise ShardUnreadable(shard["name"], error) from error
    return found


def _read_credit_try_outcomes(shards: list[dict], ids_by_shard: dict[str, list[str]]) -> dict[str, str]:
    """The stored credit try outcome of each transfer, read on the credit shard its record names."""
    found = {}
    for shard in shards:
        transfer_ids = ids_by_shard.get(shard["name"])
        if not transfer_ids:
            continue
        try:
            with connect_for_reading(shard["name"], reader_dsn(shard)) as connection:
                for chunk in _chunks(transfer_ids):
                    found.update(connection.execute(CREDIT_TRY_OUTCOMES_OF, [chunk]).fetchall())
        except psycopg.Error as error:  # any database error here means this shard cannot be read: exit 2
            raise ShardUnreadable(shard["name"], error) from error
    return found


def undone_without_credit_decision(records: dict[str, Record], debits: dict[str, Row], shards: list[dict]) -> list[Violation]:
    """A transfer undone after its debit was reserved (its debit branch VOIDED) was undone on the
    credit shard's word: a refusal, or a cancel stored in the credit try's place, which keeps a
    late try from ever applying. Final records never change, and that row is written before the
    record goes final, so one later read is sound."""
    undone = {
        transfer_id: record for transfer_id, record in records.items()
        if record.state in UNDONE_STATES and transfer_id in debits and debits[transfer_id].status == TransferStatus.VOIDED
    }
    ids_by_shard: dict[str, list[str]] = collections.defaultdict(list)
    for transfer_id, record in undone.items():
        ids_by_shard[record.credit_shard].append(transfer_id)
    stored = _read_credit_try_outcomes(shards, ids_by_shard) if undone else {}
    return [
        Violation(Invariant.UNDONE_WITHOUT_CREDIT_DECISION, record.credit_shard, transfer_id,
                  f"record {record.state.name} with its debit released, but no credit try outcome is stored")
        for transfer_id, record in sorted(undone.items()) if transfer_id not in stored
    ]


def _read_records_and_debit_branches(shards: list[dict], transfer_ids: list[str]) -> tuple[dict[str, Record], dict[str, Row]]:
    records, debits = {}, {}
    for shard in shards:
        try:
            with connect_for_reading(shard["name"], reader_dsn(shard)) as connection:
                # One snapshot: a record and its debit branch change together.
                _snapshot(connection)
                for chunk in _chunks(transfer_ids):
                    records.update(_record(shard["name"], row) for row in connection.execute(RECORDS_OF, [chunk]))
                    debits.update(_row(shard["name"], row) for row in connection.execute(BRANCHES_OF, [chunk, int(Branch.DEBIT)]))
                connection.execute("COMMIT")
        except psycopg.Error as error:  # any database error here means this shard cannot be read: exit 2
            raise ShardUnreadable(shard["name"], error) from error
    return records, debits


def _read_registries(shards: list[dict], audits: list[ShardAudit]) -> dict[str, list[tuple[str, dict]]]:
    """Registered transfer ids -> [(shard, fields)], from every shard that has the table."""
    registered = collections.defaultdict(list)
    for shard, audit in zip(shards, audits):
        if not audit.has_id_registry:
            continue
        try:
            with connect_for_reading(shard["name"], reader_dsn(shard)) as connection:
                for transfer_id, fields in connection.execute(REGISTERED_TRANSFER_IDS):
                    registered[transfer_id].append((shard["name"], fields))
        except psycopg.Error as error:  # any database error here means this shard cannot be read: exit 2
            raise ShardUnreadable(shard["name"], error) from error
    return registered


def _registered_fields(fields: dict) -> Fields | None:
    try:
        return Fields(*(fields[name] for name in REGISTERED_TRANSFER_FIELDS[:2]), int(fields["amount_minor"]),
                      fields["currency"], fields.get("reference", ""))
    except (KeyError, TypeError, ValueError):
        return None


def audit_cluster(shards: list[dict]) -> ClusterAudit:
    """Audit every shard (dicts with "name" and "dsn", as in cluster.json); raises ShardUnreadable."""
    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, min(SHARD_READERS_MAX, len(shards)))) as pool:
        audits = list(pool.map(lambda shard: audit_shard(shard["name"], reader_dsn(shard)), shards))
    registered = _read_registries(shards, audits) if any(audit.has_id_registry for audit in audits) else None
    findings: list[Violation] = []

    # Transfers between shards, as the snapshots show them.
    records = {t: r for audit in audits for t, r in audit.records.items()}
    debits = {t: r for audit in audits for t, r in audit.debit_branches.items()}
    credits: dict[str, Row] = {}
    for audit in audits:
        for transfer_id, row in audit.credit_branches.items():
            if transfer_id in credits:  # never two credit branches for one id
                findings.append(Violation(Invariant.TRANSFER_ID_REUSED, row.shard_name, transfer_id,
                                          f"credit branch on {credits[transfer_id].shard_name} and on {row.shard_name}"))
            credits[transfer_id] = row
    suspicious = sorted(
        transfer_id
        for transfer_id in records.keys() | credits.keys()
        if credit_branch_violations(transfer_id, records.get(transfer_id), debits.get(transfer_id),
                                    credits.get(transfer_id), credits.get(transfer_id))
    )
    if suspicious:
        # Step 2: fresh reads, in the order that makes each check sound.
        credits_before = _read_credit_branches(shards, suspicious)
        fresh_records, fresh_debits = _read_records_and_debit_branches(shards, suspicious)
        credits_after = _read_credit_branches(shards, suspicious)
        for transfer_id in suspicious:
            findings += credit_branch_violations(
                transfer_id, fresh_records.get(transfer_id), fresh_debits.get(transfer_id),
                credits_before.get(transfer_id), credits_after.get(transfer_id),
            )

    findings += undone_without_credit_decision(records, debits, shards)

    # The clearing accounts of all shards net to what is in flight. Per shard that is an
    # identity checked inside one snapshot; summed, and with every posted credit branch
    # matched to a posted debit branch of the same amount (checked above), it says that
    # clearing holds exactly the transfers whose debit is posted and credit is not, less those
    # whose credit is posted and debit is not (the normal order: the credit posts first).
    clearing = _sum_by_currency(audit.clearing_balance_by_currency for audit in audits)
    in_flight: dict[str, int] = collections.defaultdict(int)
    credit_first: dict[str, int] = collections.defaultdict(int)
    in_flight_transfers = 0
    for transfer_id in debits.keys() | credits.keys():
        debit, credit = debits.get(transfer_id), credits.get(transfer_id)
        debit_posted = debit is not None and debit.status == TransferStatus.POSTED
        credit_posted = credit is not None and credit.status == TransferStatus.POSTED
        if debit_posted and not credit_posted:
            in_flight[debit.fields.currency] += debit.fields.amount_minor
            in_flight_transfers += 1
        if credit_posted and not debit_posted:
            credit_first[credit.fields.currency] += credit.fields.amount_minor
    for currency in sorted(clearing.keys() | in_flight.keys() | credit_first.keys()):
        expected = in_flight.get(currency, 0) - credit_first.get(currency, 0)
        if clearing.get(currency, 0) != expected:
            findings.append(Violation(
                Invariant.GLOBAL_CLEARING, "", currency,
                f"clearing accounts of all shards net to {clearing.get(currency, 0)}, in flight"
                f" {in_flight.get(currency, 0)} less credited before debited {credit_first.get(currency, 0)}",
            ))

    # Every transfer id names at most one transfer: one home shard.
    homes: dict[str, list[str]] = collections.defaultdict(list)
    for audit in audits:
        for transfer_id in audit.owned_transfers:
            homes[transfer_id].append(audit.shard_name)
    for transfer_id, shard_names in homes.items():
        if len(shard_names) > 1:
            findings.append(Violation(Invariant.TRANSFER_ID_REUSED, "", transfer_id, f"a transfer on each of {shard_names}"))
    if registered is not None:
        findings += _registry_violations(audits, registered)

    figures = GlobalFigures(
        balance_by_currency=_sum_by_currency(audit.balance_by_currency for audit in audits),
        clearing_balance_by_currency=clearing,
        in_flight_by_currency=dict(sorted(in_flight.items())),
        in_flight_transfers=in_flight_transfers,
        credit_seen_before_debit_by_currency=dict(sorted(credit_first.items())),
        transfers_between_shards=len(records),
        transfers_in_doubt=sum(len(audit.in_doubt) for audit in audits),
        transfer_ids=len(homes),
        rechecked_transfers=len(suspicious),
        id_registry_shards=sum(audit.has_id_registry for audit in audits),
        registered_transfer_ids=len(registered) if registered is not None else 0,
    )
    return ClusterAudit(audits, figures, findings, time.monotonic() - started)


def _registry_violations(audits: list[ShardAudit], registered: dict[str, list[tuple[str, dict]]]) -> list[Violation]:
    """Every transfer has a registry row (namespace TRANSFER) on some shard, with its fields."""
    found = []
    for audit in audits:
        for transfer_id, fields in audit.owned_transfers.items():
            entries = registered.get(transfer_id)
            if not entries:
                found.append(Violation(Invariant.ID_NOT_REGISTERED, audit.shard_name, transfer_id, "no id_registry row on any shard"))
                continue
            matching = [shard_name for shard_name, stored in entries if _registered_fields(stored) == fields]
            if not matching:
                where, stored = entries[0]
                wanted = _registered_fields(stored)
                differences = fields.differences(wanted) if wanted else list(REGISTERED_TRANSFER_FIELDS)
                found.append(Violation(Invariant.ID_REGISTRY_DIFFERS, audit.shard_name, transfer_id,
                                       f"registered on {where} with other {differences}"))
    return found


# The command.


def default_cluster_path() -> pathlib.Path:
    return pathlib.Path(os.environ.get(STATE_DIR_ENV) or DEFAULT_STATE_DIR) / CLUSTER_FILE_NAME


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m services.storage.audit",
        description="Check the ledger's invariants on every shard of a cluster, under load too.",
        epilog=f"Exit status: {EXIT_HOLDS} the invariants hold, {EXIT_VIOLATIONS} a violation was found,"
        f" {EXIT_SHARD_UNREADABLE} a shard could not be read.",
    )
    parser.add_argument("--cluster", type=pathlib.Path, help=f"the cluster.json to audit (default: ${STATE_DIR_ENV}/{CLUSTER_FILE_NAME},"
                        f" {STATE_DIR_ENV} defaulting to {DEFAULT_STATE_DIR})")
    parser.add_argument("cluster_path", nargs="?", type=pathlib.Path, help="the same as --cluster (older form)")
    parser.add_argument("--json", action="store_true", help="print one JSON document: shard and global figures, violations, verdict")
    arguments = parser.parse_args(argv)
    if arguments.cluster and arguments.cluster_path:
        parser.error("give the cluster.json once: --cluster PATH or PATH")
    arguments.cluster = arguments.cluster or arguments.cluster_path or default_cluster_path()
    return arguments


def print_text(audit: ClusterAudit) -> None:
    for shard in audit.shards:
        print(
            f"{shard.shard_name}: accounts={shard.accounts} transfers={shard.transfers}"
            f" debits_posted={shard.debits_posted_minor} credits_posted={shard.credits_posted_minor}"
            f" debits_pending={shard.debits_pending_minor} credits_pending={shard.credits_pending_minor}"
            f" balanced={shard.balanced} clearing={shard.clearing_balance_by_currency} in_flight={shard.in_flight_by_currency}"
            f" records_in_doubt={len(shard.in_doubt)}"
        )
    figures = audit.figures
    print("sum of balances by currency:", figures.balance_by_currency or "{} (no accounts)")
    print(f"clearing accounts of all shards: {figures.clearing_balance_by_currency}; in flight:"
          f" {figures.in_flight_by_currency} ({figures.in_flight_transfers} transfers)")
    print(f"transfers between shards: {figures.transfers_between_shards}, not yet final: {figures.transfers_in_doubt},"
          f" read again: {figures.rechecked_transfers}; transfer ids: {figures.transfer_ids};"
          f" id registry on {figures.id_registry_shards} of {len(audit.shards)} shards")
    print(f"audit took {audit.duration_seconds:.2f}s")
    violations = audit.violations()
    print("invariants hold" if not violations else "INVARIANTS BROKEN:\n  " + "\n  ".join(violations))


def cluster_unreadable(message: str, as_json: bool) -> int:
    """The answer of a check that cannot read its cluster's description (the audit's and the
    audit log's CLIs): nothing can be proved, like an unreadable shard."""
    if as_json:
        print(json.dumps({"verdict": "cluster unreadable", "holds": None, "shard": "", "error": message}))
    print(message, file=sys.stderr)
    return EXIT_SHARD_UNREADABLE


def shard_unreadable(error: Exception, as_json: bool) -> int:
    """The answer of a check that could not read a shard (`error` names it: its `shard_name`)."""
    if as_json:
        print(json.dumps({"verdict": "shard unreadable", "holds": None, "shard": error.shard_name, "error": str(error)}))
    else:
        print(f"SHARD UNREADABLE: {error}", file=sys.stderr)
    return EXIT_SHARD_UNREADABLE


def main(argv: list[str] | None = None) -> int:
    arguments = parse_arguments(argv)
    try:
        shards = json.loads(arguments.cluster.read_text())["shards"]
    except (OSError, ValueError, KeyError) as error:
        # Without the description no shard can be read: the same answer as an unreadable shard.
        return cluster_unreadable(f"cannot read the cluster description {arguments.cluster}: {error}", arguments.json)
    try:
        audit = audit_cluster(shards)
    except ShardUnreadable as error:
        return shard_unreadable(error, arguments.json)
    if arguments.json:
        print(json.dumps(audit.as_json(), indent=1, sort_keys=True))
    else:
        print_text(audit)
    return EXIT_VIOLATIONS if audit.findings() else EXIT_HOLDS


if __name__ == "__main__":
    sys.exit(main())
