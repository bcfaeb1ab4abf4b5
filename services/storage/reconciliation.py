"""Clearing reconciliation: proves from the databases that window totals equal their transfers,
positions equal their windows less what was settled, settlements equal their windows' nets and
settlement accounts moved exactly as the recorded settlements say. Never blocks a writer.

    python -m services.storage.reconciliation [--cluster PATH] [--window ID ...] [--home SHARD] [--json]

Exit status as the audit's (services/storage/audit.py): 0 consistent, 1 findings, 2 a shard (or
the cluster's description) cannot be read. The command reads as the auditor role; the Clearing
service's Reconcile RPC calls `reconcile(router, window_ids, timeout_seconds)`, which reads
through the service's own pools. Both run the same checks (`reconcile_with`) over the same
queries; only the reader differs.

How it reads a cluster that keeps moving (plain reads in snapshots, never a lock):
1. The clearing home's registry (windows, settlements and their entries, caps) in one snapshot,
   first.
2. Then every shard in one REPEATABLE READ READ ONLY snapshot each, all at once. A shard's
   clearing changes happen in its local transactions, so every identity of one shard is checked
   inside its snapshot: window totals = its cleared transfers, each window nets to zero, positions
   = windows less resets, reservations = pending debit branches, transfers cleared exactly as their
   accounts say, no window past the shard's current one.
3. What the registry records as done was done on the shards before it was recorded (resets and
   settlement legs before an entry's settled_at; a share's first allotment before its cap), so
   a shard snapshot taken after the registry's must show it. Closed windows never change, so
   settlements are compared with their totals at any time. What a shard shows that the earlier
   registry cannot know yet (a reset or a leg of a settlement created since, a shard already on a
   newer window) is judged against a fresh read of the registry taken after that shard's snapshot.
4. Cap shares: a rebalance commits a participant's allotments shard by shard
   (clearing.commit_phases), so a sum over snapshots of different instants can exceed the cap
   when no instant did. A sum above the cap is read again, the cap and every share, until two
   passes in a row agree (a "double collect": each value then held at the instant between the
   passes), and only then reported.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import dataclasses
import enum
import json
import pathlib
import sys
import time
from collections.abc import Iterable, Sequence
from typing import Protocol

import psycopg

from services.ledger import clearing, errors
from services.ledger.clearing import ParticipantTotal, SettlementModel, WindowState
from services.ledger.transfers import Branch, TransferStatus
from services.storage import audit
from services.storage.audit import EXIT_HOLDS, EXIT_SHARD_UNREADABLE, EXIT_VIOLATIONS, ShardUnreadable

# Transfer rows breaking a clearing rule that one shard's snapshot sends back; the rest are counted.
TRANSFER_FINDINGS_PER_SHARD_MAX = 100
# Findings of one check listed in a report (an RPC answer must stay well under gRPC's 4 MiB);
# the rest are counted in findings_not_listed.
FINDINGS_LISTED_PER_CHECK_MAX = 100
# The double collect of suspicious cap shares: passes before giving up (then nothing is
# reported: no pass pair proved a sum above the cap; the next run reads again).
CAP_COLLECT_PASSES_MAX = 5
# The command's bound on the whole run (the RPC has the caller's deadline).
COMMAND_TIMEOUT_SECONDS = 300.0


class Check(enum.StrEnum):
    """What a finding breaks (ReconciliationFinding.check)."""

    WINDOW_TOTAL_MISMATCH = "WINDOW_TOTAL_MISMATCH"
    WINDOW_NET_NOT_ZERO = "WINDOW_NET_NOT_ZERO"
    POSITION_MISMATCH = "POSITION_MISMATCH"
    TRANSFER_NOT_CLEARED = "TRANSFER_NOT_CLEARED"
    TRANSFER_WRONGLY_CLEARED = "TRANSFER_WRONGLY_CLEARED"
    SETTLEMENT_NET_MISMATCH = "SETTLEMENT_NET_MISMATCH"
    RESET_MISMATCH = "RESET_MISMATCH"
    SETTLEMENT_ACCOUNT_MISMATCH = "SETTLEMENT_ACCOUNT_MISMATCH"
    WINDOW_STATE = "WINDOW_STATE"
    CAP_SHARES_EXCEED_CAP = "CAP_SHARES_EXCEED_CAP"


@dataclasses.dataclass(frozen=True)
class Finding:
    check: str
    shard: str = ""  # "" when it is about the registry or the cluster as a whole
    window_id: int = 0
    participant_id: str = ""
    currency: str = ""
    expected_minor: int = 0
    found_minor: int = 0
    detail: str = ""

    def __str__(self) -> str:
        where = ", ".join(
            part for part in (
                self.shard, f"window {self.window_id}" if self.window_id else "", self.participant_id, self.currency,
            ) if part
        )
        return f"{self.check} [{where}]: expected {self.expected_minor}, found {self.found_minor}: {self.detail}"

    def as_json(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class ReconcileReport:
    consistent: bool
    findings: list[Finding]
    windows_checked: int
    transfers_checked: int  # cleared transfers whose window totals were compared (all shards)
    participants_checked: int
    settlements_checked: int
    findings_not_listed: int = 0  # beyond FINDINGS_LISTED_PER_CHECK_MAX (or a shard's transfer rows)
    home_shard: str = ""
    duration_seconds: float = 0.0

    def as_json(self) -> dict:
        return {
            "verdict": "consistent" if self.consistent else "findings",
            **{field.name: getattr(self, field.name) for field in dataclasses.fields(self) if field.name != "findings"},
            "findings": [finding.as_json() for finding in self.findings],
        }


# The SQL. Every statement is a plain read; each reader runs a list of them in one snapshot.
# No `%` but placeholders (the service's cursor binds client-side).

POSTED, PENDING = int(TransferStatus.POSTED), int(TransferStatus.PENDING)
SAME_SHARD, DEBIT, CREDIT, COLLECTED = (int(branch) for branch in (Branch.SAME_SHARD, Branch.DEBIT, Branch.CREDIT, Branch.COLLECTED))
OPEN, CLOSING = int(WindowState.OPEN), int(WindowState.CLOSING)
STL = clearing.SETTLEMENT_ACCOUNT_ID_PREFIX

# The home's registry.
REGISTRY_WINDOWS = "SELECT window_id, state, settlement_id FROM settlement_windows"
REGISTRY_SETTLEMENTS = "SELECT settlement_id, model, window_ids FROM settlements"
REGISTRY_ENTRIES = """
    SELECT settlement_id, participant_id, currency, debits_minor, credits_minor, transfers, settled_at IS NOT NULL
    FROM settlement_entries"""
REGISTRY_CURRENCIES = "SELECT participant_id, currency, settlement_account_id, net_debit_cap_minor FROM participant_currencies"
REGISTRY_PARTICIPANTS = "SELECT participant_id FROM participants"
# Fresh reads of the registry, after the shards' snapshots.
SETTLEMENTS_OF = f"{REGISTRY_SETTLEMENTS} WHERE settlement_id = ANY(%s::bigint[])"
ENTRIES_OF = f"{REGISTRY_ENTRIES} WHERE settlement_id = ANY(%s::bigint[])"
UNFINISHED_WINDOWS = f"SELECT window_id, state FROM settlement_windows WHERE state IN ({OPEN}, {CLOSING})"  # nosec B608 # constants only
CAP_OF = "SELECT net_debit_cap_minor FROM participant_currencies WHERE participant_id = %s AND currency = %s"
ALLOTMENT_OF = "SELECT allotment_minor FROM clearing_positions WHERE participant_id = %s AND currency = %s"

# One shard's snapshot.
SHARD_WINDOW = "SELECT window_id FROM clearing_shard_window"
WINDOW_TOTALS = "SELECT window_id, participant_id, currency, debits_minor, credits_minor, transfers FROM clearing_window_totals"
# What the shard's cleared transfers add up to, per window (transfers_by_window); params: every
# window (bool), the windows otherwise.
CLEARED_TRANSFER_SUMS = f"""
    SELECT t.window_id, side.participant_id, t.currency, sum(side.debits_minor), sum(side.credits_minor), sum(side.paid)
    FROM transfers t CROSS JOIN LATERAL (VALUES
        (t.payer_participant_id, t.amount_minor, 0, 1),
        (t.payee_participant_id, 0, t.amount_minor, 0)
    ) AS side (participant_id, debits_minor, credits_minor, paid)
    WHERE t.window_id IS NOT NULL AND t.status = {POSTED} AND (%s OR t.window_id = ANY(%s::bigint[]))
      AND side.participant_id IS NOT NULL
    GROUP BY t.window_id, side.participant_id, t.currency"""  # nosec B608 # constants only
LATEST_TRANSFER_WINDOW = "SELECT coalesce(max(window_id), 0) FROM transfers WHERE window_id IS NOT NULL"
POSITIONS = "SELECT participant_id, currency, position_minor, reserved_minor, allotment_minor FROM clearing_positions"
# Debits between shards tried here and neither confirmed nor cancelled: the reservations.
RESERVATIONS = f"""
    SELECT payer_participant_id, currency, sum(amount_minor) FROM transfers
    WHERE status = {PENDING} AND branch = {DEBIT} AND payer_participant_id IS NOT NULL
      AND payee_participant_id IS NOT NULL AND payer_participant_id <> payee_participant_id
    GROUP BY payer_participant_id, currency"""  # nosec B608 # constants only
RESETS = "SELECT settlement_id, participant_id, currency, amount_minor FROM clearing_position_resets"
# Rows that may break a clearing rule; `transfer_findings` decides. The accounts' test is
# clearing.cleared_between's, in SQL, so that only suspicious rows leave the shard: a POSTED
# row of both accounts here is cleared exactly when they belong to two participants and neither
# is a settlement account. Param: the row limit.
TRANSFERS_BREAKING_CLEARING = f"""
    WITH checked AS (
        SELECT t.transfer_id, t.branch, t.status, t.window_id, t.payer_participant_id AS payer, t.payee_participant_id AS payee,
               t.currency, t.amount_minor, t.debit_account_id, c.credited_id, debited.participant_id AS debited_participant,
               credited.participant_id AS credited_participant
        FROM transfers t
        CROSS JOIN LATERAL (SELECT CASE t.branch WHEN {SAME_SHARD} THEN t.credit_account_id
                                                 WHEN {COLLECTED} THEN t.clearing_account_id END AS credited_id) AS c
        LEFT JOIN accounts debited ON debited.account_id = t.debit_account_id AND t.branch <> {CREDIT}
        LEFT JOIN accounts credited ON credited.account_id = c.credited_id
    ), judged AS (
        SELECT *, CASE WHEN debited_participant <> credited_participant AND NOT starts_with(debit_account_id, '{STL}')
                            AND NOT starts_with(credited_id, '{STL}') THEN debited_participant END AS cleared_payer,
                  CASE WHEN debited_participant <> credited_participant AND NOT starts_with(debit_account_id, '{STL}')
                            AND NOT starts_with(credited_id, '{STL}') THEN credited_participant END AS cleared_payee
        FROM checked
    )
    SELECT transfer_id, branch, status, window_id, payer, payee, currency, amount_minor, debit_account_id, credited_id,
           debited_participant, credited_participant, count(*) OVER ()
    FROM judged
    WHERE (window_id IS NOT NULL AND (status <> {POSTED} OR branch = {CREDIT} OR payer IS NULL OR payee IS NULL OR payer = payee))
       OR (window_id IS NULL AND status = {POSTED} AND branch <> {CREDIT} AND payer <> payee)
       OR (status = {POSTED} AND branch IN ({SAME_SHARD}, {COLLECTED}) AND (payer, payee) IS DISTINCT FROM (cleared_payer, cleared_payee))
       OR (branch = {DEBIT} AND payer IS NOT NULL AND payer IS DISTINCT FROM debited_participant)
    ORDER BY transfer_id LIMIT %s"""  # nosec B608 # constants only
# Settlement accounts (params: their ids) and the rows that move them here (params: the ids twice;
# transfers_by_debit_account and transfers_by_credit_account).
SETTLEMENT_ACCOUNTS = """
    SELECT account_id, participant_id, currency, credits_posted_minor::numeric - debits_posted_minor::numeric
    FROM accounts WHERE account_id = ANY(%s::text[])"""
SETTLEMENT_MOVEMENTS = f"""
    SELECT transfer_id, branch, status, debit_account_id, credit_account_id, amount_minor FROM transfers
    WHERE (debit_account_id = ANY(%s::text[]) AND branch <> {CREDIT})
       OR (credit_account_id = ANY(%s::text[]) AND branch IN ({SAME_SHARD}, {CREDIT}))"""  # nosec B608 # constants only

Query = tuple[str, list]


class SnapshotReader(Protocol):
    """Where the checks read: the service's pools (RPC) or the auditor's connections (command)."""

    home_shard: str
    shard_names: list[str]

    async def read(self, shard_name: str, queries: Sequence[Query]) -> list[list[tuple]]:
        """The rows of each query, all read in one REPEATABLE READ READ ONLY snapshot of the shard."""
        ...


# What was read, as plain data.


@dataclasses.dataclass(frozen=True)
class Entry:
    debits_minor: int
    credits_minor: int
    transfers: int
    settled: bool


@dataclasses.dataclass(frozen=True)
class SettlementRow:
    model: SettlementModel
    window_ids: tuple[int, ...]


@dataclasses.dataclass
class Registry:
    """The clearing home's registry as of one snapshot."""

    windows: dict[int, tuple[WindowState, int | None]]  # window -> (state, settlement_id)
    settlements: dict[int, SettlementRow]
    entries: dict[tuple[int, str, str], Entry]  # (settlement, participant, currency)
    currencies: dict[tuple[str, str], tuple[str, int | None]]  # (participant, currency) -> (settlement account, cap)
    participants: set[str]
    # Settlements read afresh after the shards (created since this snapshot): judged against
    # their windows' totals and what the shards show, never against this snapshot's windows.
    late_settlements: set[int] = dataclasses.field(default_factory=set)

    def settlement_account_ids(self) -> list[str]:
        currencies = {currency for _, currency in self.currencies} | {currency for _, _, currency in self.entries}
        own = {account for account, _ in self.currencies.values()}
        own |= {clearing.settlement_account_id(participant, currency) for _, participant, currency in self.entries}
        return sorted(own | {clearing.settlement_bank_account_id(currency) for currency in currencies})


REGISTRY_QUERIES: list[Query] = [
    (REGISTRY_WINDOWS, []), (REGISTRY_SETTLEMENTS, []), (REGISTRY_ENTRIES, []), (REGISTRY_CURRENCIES, []), (REGISTRY_PARTICIPANTS, []),
]


def parse_settlements(settlement_rows: Iterable[tuple], entry_rows: Iterable[tuple], settled_counts: bool = True):
    settlements = {int(s): SettlementRow(SettlementModel(model), tuple(int(w) for w in window_ids)) for s, model, window_ids in settlement_rows}
    entries = {
        (int(s), p, c): Entry(int(debits), int(credits), int(transfers), bool(settled) and settled_counts)
        for s, p, c, debits, credits, transfers, settled in entry_rows
    }
    return settlements, entries


def parse_registry(rows: list[list[tuple]]) -> Registry:
    windows, settlement_rows, entry_rows, currencies, participants = rows
    settlements, entries = parse_settlements(settlement_rows, entry_rows)
    return Registry(
        windows={int(w): (WindowState(state), None if s is None else int(s)) for w, state, s in windows},
        settlements=settlements,
        entries=entries,
        currencies={(p, c): (account, None if cap is None else int(cap)) for p, c, account, cap in currencies},
        participants={row[0] for row in participants},
    )


Key = tuple[str, str]  # (participant, currency)
WindowKey = tuple[int, str, str]  # (window, participant, currency)


@dataclasses.dataclass(frozen=True)
class Movement:
    """A transfers row that moves a settlement account on this shard."""

    transfer_id: str
    branch: Branch
    status: TransferStatus
    debit_account_id: str
    credit_account_id: str
    amount_minor: int

    def moves(self, account_ids: set[str]) -> list[tuple[str, int]]:
        """(account, signed amount) this row has posted on the accounts of `account_ids` here."""
        if self.status != TransferStatus.POSTED:
            return []
        moved = []
        if self.branch != Branch.CREDIT and self.debit_account_id in account_ids:
            moved.append((self.debit_account_id, -self.amount_minor))
        if self.branch in (Branch.SAME_SHARD, Branch.CREDIT) and self.credit_account_id in account_ids:
            moved.append((self.credit_account_id, self.amount_minor))
        return moved


@dataclasses.dataclass
class ShardClearing:
    """One shard's clearing as of one snapshot."""

    shard_name: str
    window_id: int
    totals: dict[WindowKey, tuple[int, int, int]]  # (debits, credits, transfers)
    transfer_sums: dict[WindowKey, tuple[int, int, int]]  # the same, from the cleared transfers of the checked windows
    latest_transfer_window_id: int
    positions: dict[Key, tuple[int, int, int | None]]  # (position, reserved, allotment)
    reservations: dict[Key, int]
    resets: dict[tuple[int, str, str], int]
    transfer_rows: list[tuple]  # TRANSFERS_BREAKING_CLEARING's
    transfer_rows_total: int
    settlement_accounts: dict[str, tuple[str, str, int]]  # id -> (participant, currency, balance)
    movements: list[Movement]


def shard_queries(window_ids: list[int], account_ids: list[str]) -> list[Query]:
    return [
        (SHARD_WINDOW, []),
        (WINDOW_TOTALS, []),
        (CLEARED_TRANSFER_SUMS, [not window_ids, window_ids]),
        (LATEST_TRANSFER_WINDOW, []),
        (POSITIONS, []),
        (RESERVATIONS, []),
        (RESETS, []),
        (TRANSFERS_BREAKING_CLEARING, [TRANSFER_FINDINGS_PER_SHARD_MAX]),
        (SETTLEMENT_ACCOUNTS, [account_ids]),
        (SETTLEMENT_MOVEMENTS, [account_ids, account_ids]),
    ]


def parse_shard(shard_name: str, rows: list[list[tuple]]) -> ShardClearing:
    window, totals, sums, latest, positions, reservations, resets, transfer_rows, accounts, movements = rows
    return ShardClearing(
        shard_name=shard_name,
        window_id=int(window[0][0]) if window else 0,
        totals={(int(w), p, c): (int(d), int(cr), int(n)) for w, p, c, d, cr, n in totals},
        transfer_sums={(int(w), p, c): (int(d), int(cr), int(n)) for w, p, c, d, cr, n in sums},
        latest_transfer_window_id=int(latest[0][0]) if latest else 0,
        positions={(p, c): (int(pos), int(res), None if allot is None else int(allot)) for p, c, pos, res, allot in positions},
        reservations={(p, c): int(amount) for p, c, amount in reservations},
        resets={(int(s), p, c): int(amount) for s, p, c, amount in resets},
        transfer_rows=[row[:-1] for row in transfer_rows],
        transfer_rows_total=int(transfer_rows[0][-1]) if transfer_rows else 0,
        settlement_accounts={a: (p, c, int(balance)) for a, p, c, balance in accounts},
        movements=[Movement(t, Branch(b), TransferStatus(s), d, cr, int(amount)) for t, b, s, d, cr, amount in movements],
    )


# The checks: pure functions over what was read.


def window_total_findings(shard: ShardClearing, window_ids: set[int] | None) -> list[Finding]:
    """Each window's totals (per participant and currency) = its cleared POSTED transfers here."""
    found = []
    checked = {key: value for key, value in shard.totals.items() if window_ids is None or key[0] in window_ids}
    for key in sorted(checked.keys() | shard.transfer_sums.keys()):
        stored = checked.get(key, (0, 0, 0))
        summed = shard.transfer_sums.get(key, (0, 0, 0))
        if stored == summed:
            continue
        window_id, participant_id, currency = key
        field = next(index for index in range(3) if stored[index] != summed[index])
        found.append(Finding(
            Check.WINDOW_TOTAL_MISMATCH, shard.shard_name, window_id, participant_id, currency, summed[field], stored[field],
            f"{('debits', 'credits', 'transfers paid')[field]}: totals (debits, credits, transfers) {stored},"
            f" its cleared transfers {summed}",
        ))
    nets: dict[tuple[int, str], int] = collections.defaultdict(int)
    for (window_id, _, currency), (debits, credits, _) in checked.items():
        nets[window_id, currency] += debits - credits
    for (window_id, currency), net in sorted(nets.items()):
        if net:
            found.append(Finding(Check.WINDOW_NET_NOT_ZERO, shard.shard_name, window_id, "", currency, 0, net,
                                 "the window's debits less credits over its participants"))
    return found


def position_findings(shard: ShardClearing) -> list[Finding]:
    """A share's position = what its windows moved here less the resets here; reserved = the
    pending debit branches between participants tried here."""
    expected: dict[Key, int] = collections.defaultdict(int)
    for (_, participant_id, currency), (debits, credits, _) in shard.totals.items():
        expected[participant_id, currency] += debits - credits
    for (_, participant_id, currency), amount in shard.resets.items():
        expected[participant_id, currency] -= amount
    found = []
    for key in sorted(expected.keys() | shard.positions.keys() | shard.reservations.keys()):
        position, reserved, _ = shard.positions.get(key, (0, 0, None))
        participant_id, currency = key
        if position != expected.get(key, 0):
            found.append(Finding(Check.POSITION_MISMATCH, shard.shard_name, 0, participant_id, currency, expected.get(key, 0), position,
                                 "position: its windows' debits less credits here, less the resets here"))
        if reserved != shard.reservations.get(key, 0):
            found.append(Finding(Check.POSITION_MISMATCH, shard.shard_name, 0, participant_id, currency, shard.reservations.get(key, 0),
                                 reserved, "reserved: its pending debit branches to other participants here"))
    return found


def transfer_findings(shard_name: str, row: tuple) -> list[Finding]:
    """The clearing rules of one transfers row: cleared (participants and a window) exactly when
    its accounts say so (clearing.cleared_between), and never a window without being cleared."""
    (transfer_id, branch, status, window_id, payer, payee, currency, amount_minor, debit_account_id, credited_id,
     debited_participant, credited_participant) = row
    branch, status = Branch(branch), TransferStatus(status)
    details: dict[Check, list[str]] = collections.defaultdict(list)
    if window_id is not None:
        if status != TransferStatus.POSTED:
            details[Check.TRANSFER_WRONGLY_CLEARED].append(f"in window {window_id} but {status.name}")
        if branch == Branch.CREDIT:
            details[Check.TRANSFER_WRONGLY_CLEARED].append(f"a credit branch in window {window_id} (cleared on the debit shard)")
        if payer is None or payee is None or payer == payee:
            details[Check.TRANSFER_WRONGLY_CLEARED].append(f"in window {window_id} but its participants are {payer}, {payee}")
    elif status == TransferStatus.POSTED and branch != Branch.CREDIT and payer is not None and payee is not None and payer != payee:
        details[Check.TRANSFER_NOT_CLEARED].append(f"POSTED from {payer} to {payee} in no window")
    if status == TransferStatus.POSTED and branch in (Branch.SAME_SHARD, Branch.COLLECTED):
        expected = clearing.cleared_between(debit_account_id, debited_participant, credited_id or "", credited_participant)
        stored = None if payer is None and payee is None else (payer, payee)
        if stored != expected:
            if stored is None:
                details[Check.TRANSFER_NOT_CLEARED].append(f"its accounts belong to {expected[0]} and {expected[1]}; no participants stored")
            else:
                details[Check.TRANSFER_WRONGLY_CLEARED].append(
                    f"participants {stored} stored, its accounts ({debit_account_id}, {credited_id}) say {expected or 'not cleared'}"
                )
    if branch == Branch.DEBIT and payer is not None and payer != debited_participant:
        details[Check.TRANSFER_WRONGLY_CLEARED].append(f"payer {payer} stored, its debit account belongs to {debited_participant}")
    return [
        Finding(check, shard_name, int(window_id or 0), payer or debited_participant or "", currency,
                amount_minor if check == Check.TRANSFER_NOT_CLEARED else 0,
                0 if check == Check.TRANSFER_NOT_CLEARED else amount_minor,
                f"transfer {transfer_id} ({branch.name}): " + "; ".join(reasons))
        for check, reasons in details.items()
    ]


def windows_of(registry: Registry, settlement_id: int) -> tuple[int, ...]:
    settlement = registry.settlements.get(settlement_id)
    return settlement.window_ids if settlement else ()


def settlement_findings(registry: Registry, shards: list[ShardClearing]) -> list[Finding]:
    """Each settlement's entries = its windows' totals summed over every shard
    (clearing.summed_totals); its nets sum to zero per currency. Closed windows never change, so
    snapshots of any instants agree."""
    found = []
    for settlement_id, settlement in sorted(registry.settlements.items()):
        windows = set(settlement.window_ids)
        rows = [(p, c, d, cr, n) for shard in shards for (w, p, c), (d, cr, n) in shard.totals.items() if w in windows]
        expected = {(t.participant_id, t.currency): t for t in clearing.summed_totals(rows)}
        entries = {(p, c): entry for (s, p, c), entry in registry.entries.items() if s == settlement_id}
        for key in sorted(expected.keys() | entries.keys()):
            total = expected.get(key, ParticipantTotal(*key))
            entry = entries.get(key)
            stored = (entry.debits_minor, entry.credits_minor, entry.transfers) if entry else None
            if stored != (total.debits_minor, total.credits_minor, total.transfer_count):
                found.append(Finding(
                    Check.SETTLEMENT_NET_MISMATCH, "", 0, key[0], key[1], total.net_minor,
                    entry.debits_minor - entry.credits_minor if entry else 0,
                    f"settlement {settlement_id}: entry (debits, credits, transfers) {stored or 'missing'}, its windows"
                    f" {sorted(windows)} total ({total.debits_minor}, {total.credits_minor}, {total.transfer_count}) over every shard",
                ))
        stored_totals = [ParticipantTotal(p, c, e.debits_minor, e.credits_minor, e.transfers) for (p, c), e in entries.items()]
        for currency, net in sorted(clearing.nets_balance(stored_totals).items()):
            found.append(Finding(Check.SETTLEMENT_NET_MISMATCH, "", 0, "", currency, 0, net,
                                 f"settlement {settlement_id}: its entries' nets sum to {net}"))
    return found


def reset_findings(registry: Registry, shards: list[ShardClearing]) -> list[Finding]:
    """A settled entry has its reset row on every shard (written before the entry was settled),
    of that participant's net over the settlement's windows there; no reset without its entry."""
    found = []
    for shard in shards:
        nets: dict[tuple[int, str, str], int] = collections.defaultdict(int)
        for (window_id, participant_id, currency), (debits, credits, _) in shard.totals.items():
            nets[window_id, participant_id, currency] += debits - credits

        def net(settlement_id: int, participant_id: str, currency: str) -> int:
            return sum(nets.get((w, participant_id, currency), 0) for w in windows_of(registry, settlement_id))

        for key, entry in sorted(registry.entries.items()):
            if entry.settled and key not in shard.resets:
                found.append(Finding(Check.RESET_MISMATCH, shard.shard_name, 0, key[1], key[2], net(*key), 0,
                                     f"settlement {key[0]}: entry settled, no reset row on this shard"))
        for key, amount in sorted(shard.resets.items()):
            if key not in registry.entries:
                found.append(Finding(Check.RESET_MISMATCH, shard.shard_name, 0, key[1], key[2], 0, amount,
                                     f"settlement {key[0]}: a reset row without its settlement entry"))
            elif amount != net(*key):
                found.append(Finding(Check.RESET_MISMATCH, shard.shard_name, 0, key[1], key[2], net(*key), amount,
                                     f"settlement {key[0]}: reset amount, the participant's net over windows {list(windows_of(registry, key[0]))} here"))
    return found


def legs_by_transfer(registry: Registry) -> dict[str, tuple[tuple[int, str, str], clearing.SettlementLeg]]:
    """Every settlement leg the registry's entries call for, by its transfer id."""
    legs = {}
    for key, entry in registry.entries.items():
        settlement = registry.settlements.get(key[0])
        if settlement is None:
            continue
        total = ParticipantTotal(key[1], key[2], entry.debits_minor, entry.credits_minor, entry.transfers)
        for leg in clearing.settlement_legs(key[0], settlement.model, total):
            legs[leg.transfer_id] = (key, leg)
    return legs


def settlement_id_of_leg(transfer_id: str) -> int | None:
    """The settlement a sys:stl:<settlement>:... transfer id names (None: not such an id)."""
    if not transfer_id.startswith(clearing.SETTLEMENT_TRANSFER_ID_PREFIX):
        return None
    head = transfer_id[len(clearing.SETTLEMENT_TRANSFER_ID_PREFIX):].split(":", 1)[0]
    return int(head) if head.isdigit() else None


def settlement_account_findings(registry: Registry, shards: list[ShardClearing]) -> list[Finding]:
    """Each settlement account's balance = the legs (clearing.settlement_legs of the entries, by
    their settlement's model) that have posted on it, and nothing else; every leg of a settled
    entry has posted. A leg between two shards posts on its two accounts at two moments, so each
    account is judged by the rows of its own shard's snapshot."""
    legs = legs_by_transfer(registry)
    owners = {account: participant for (participant, _), (account, _) in registry.currencies.items()}
    found = []
    posted_legs: set[str] = set()
    accounts: dict[str, tuple[str, str, str, int]] = {}  # id -> (shard, participant, currency, balance)
    expected: dict[str, int] = collections.defaultdict(int)
    strangers: dict[str, list[str]] = collections.defaultdict(list)
    for shard in shards:
        here = set(shard.settlement_accounts)
        for account_id, (participant_id, currency, balance) in shard.settlement_accounts.items():
            accounts[account_id] = (shard.shard_name, participant_id, currency, balance)
        for movement in shard.movements:
            if movement.status == TransferStatus.POSTED:
                posted_legs.add(movement.transfer_id)
            known = legs.get(movement.transfer_id)
            for account_id, amount in movement.moves(here):
                if known is None:
                    strangers[account_id].append(f"{movement.transfer_id} ({amount:+d}) is no settlement leg")
                    continue
                leg = known[1]
                if account_id == leg.debit_account_id:
                    expected[account_id] -= leg.amount_minor
                elif account_id == leg.credit_account_id:
                    expected[account_id] += leg.amount_minor
                else:
                    strangers[account_id].append(f"{movement.transfer_id} ({amount:+d}) is a leg of other accounts")
    for account_id in sorted(expected.keys() | strangers.keys() | {a for a, v in accounts.items() if v[3]}):
        shard_name, participant_id, currency, balance = accounts.get(account_id, ("", owners.get(account_id, ""), "", 0))
        if balance != expected.get(account_id, 0) or strangers.get(account_id):
            why = "; ".join(strangers.get(account_id, [])) or "its balance is not what its posted settlement legs moved"
            found.append(Finding(Check.SETTLEMENT_ACCOUNT_MISMATCH, shard_name, 0, participant_id, currency,
                                 expected.get(account_id, 0), balance, f"account {account_id}: {why}"))
    for transfer_id, (key, leg) in sorted(legs.items()):
        if registry.entries[key].settled and transfer_id not in posted_legs:
            found.append(Finding(Check.SETTLEMENT_ACCOUNT_MISMATCH, "", 0, key[1], key[2], leg.amount_minor, 0,
                                 f"settlement {key[0]}: entry settled, its leg {transfer_id} is not POSTED on any shard"))
    return found


def window_state_findings(registry: Registry, shards: list[ShardClearing], fresh_open_window_id: int | None) -> list[Finding]:
    """Exactly one OPEN window; every shard on the open window or a CLOSING one (or on a newer
    window than the registry's snapshot knew, no newer than a fresh read's open one:
    `fresh_open_window_id`); no totals nor transfers of a window past the shard's current one;
    a settlement's windows are PENDING_SETTLEMENT or SETTLED and name it."""
    found = []
    open_windows = sorted(w for w, (state, _) in registry.windows.items() if state == WindowState.OPEN)
    closing = {w for w, (state, _) in registry.windows.items() if state == WindowState.CLOSING}
    if len(open_windows) != 1:
        found.append(Finding(Check.WINDOW_STATE, "", 0, "", "", 1, len(open_windows), f"OPEN windows: {open_windows}"))
    open_window_id = open_windows[-1] if open_windows else 0
    for shard in shards:
        current = shard.window_id
        acceptable = current == open_window_id or current in closing
        if current > open_window_id and fresh_open_window_id is not None:
            acceptable = current <= fresh_open_window_id  # opened since the registry's snapshot
        if not acceptable:
            found.append(Finding(Check.WINDOW_STATE, shard.shard_name, current, "", "", open_window_id, current,
                                 f"the shard's window is neither the open one nor CLOSING (CLOSING: {sorted(closing)})"))
        latest_totals = max((w for w, _, _ in shard.totals), default=0)
        for what, latest in (("window totals", latest_totals), ("transfers", shard.latest_transfer_window_id)):
            if latest > current:
                found.append(Finding(Check.WINDOW_STATE, shard.shard_name, latest, "", "", current, latest,
                                     f"{what} of a window past the shard's current one"))
    for settlement_id, settlement in sorted(registry.settlements.items()):
        if settlement_id in registry.late_settlements:
            continue
        for window_id in settlement.window_ids:
            state, named = registry.windows.get(window_id, (None, None))
            if state not in (WindowState.PENDING_SETTLEMENT, WindowState.SETTLED) or named != settlement_id:
                found.append(Finding(Check.WINDOW_STATE, "", window_id, "", "", settlement_id, named or 0,
                                     f"in settlement {settlement_id} but {state.name if state else 'missing'}, settlement {named}"))
    for window_id, (state, named) in sorted(registry.windows.items()):
        in_settlement = named is not None and window_id in windows_of(registry, named)
        if (state in (WindowState.PENDING_SETTLEMENT, WindowState.SETTLED) or named is not None) and not in_settlement:
            found.append(Finding(Check.WINDOW_STATE, "", window_id, "", "", 0, named or 0,
                                 f"{state.name} naming settlement {named}, which does not list it"))
    return found


def cap_share_sums(registry: Registry, shards: list[ShardClearing]) -> tuple[list[Finding], dict[Key, tuple[int, int]]]:
    """Capped currencies: a share on every shard (each gets its allotment before the cap is
    written), and the sum of the allotments within the cap. The second part needs a double
    collect: returned as suspects (key -> (cap, sum)), not findings."""
    found = []
    suspects = {}
    for key, (_, cap) in sorted(registry.currencies.items()):
        if cap is None:
            continue
        total = 0
        for shard in shards:
            allotment = shard.positions.get(key, (0, 0, None))[2]
            if allotment is None:
                found.append(Finding(Check.CAP_SHARES_EXCEED_CAP, shard.shard_name, 0, key[0], key[1], cap, 0,
                                     "capped, but the share here has no allotment: its debits here are not capped"))
            else:
                total += allotment
        if total > cap:
            suspects[key] = (cap, total)
    return found, suspects


def report(findings: list[Finding], **counters) -> ReconcileReport:
    listed, left_out = [], 0
    per_check: dict[str, int] = collections.defaultdict(int)
    for finding in findings:
        per_check[finding.check] += 1
        if per_check[finding.check] <= FINDINGS_LISTED_PER_CHECK_MAX:
            listed.append(finding)
        else:
            left_out += 1
    counters["findings_not_listed"] = counters.get("findings_not_listed", 0) + left_out
    return ReconcileReport(consistent=not findings and not counters["findings_not_listed"], findings=listed, **counters)


# The run: the reads in the order that makes each check sound (module docstring).


async def _on_every_shard(reader: SnapshotReader, queries_for) -> list:
    """Every shard at once; the first failure is raised once all have ended."""
    results = await asyncio.gather(
        *(reader.read(name, queries_for(name)) for name in reader.shard_names), return_exceptions=True
    )
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return results


async def _double_collect(reader: SnapshotReader, suspects: dict[Key, tuple[int, int]]) -> list[Finding]:
    """Re-read each suspect's cap and shares until two passes in a row agree; report it if they
    agree on a sum above the cap."""
    found = []
    for key, _ in sorted(suspects.items()):
        previous = None
        for _ in range(CAP_COLLECT_PASSES_MAX):
            (cap_rows,) = await reader.read(reader.home_shard, [(CAP_OF, list(key))])
            shares = [await reader.read(name, [(ALLOTMENT_OF, list(key))]) for name in reader.shard_names]
            current = (cap_rows[0][0] if cap_rows else None, tuple(rows[0][0][0] if rows[0] else None for rows in shares))
            if current == previous:
                cap, allotments = current
                total = sum(int(a) for a in allotments if a is not None)
                if cap is not None and total > cap:
                    found.append(Finding(Check.CAP_SHARES_EXCEED_CAP, "", 0, key[0], key[1], int(cap), total,
                                         f"the shares' allotments {dict(zip(reader.shard_names, allotments))} sum past the cap"))
                break
            previous = current
    return found


async def reconcile_with(reader: SnapshotReader, window_ids: list[int]) -> ReconcileReport:
    started = time.monotonic()
    registry = parse_registry(await reader.read(reader.home_shard, REGISTRY_QUERIES))
    window_filter = sorted(set(window_ids))
    account_ids = registry.settlement_account_ids()
    shards = [
        parse_shard(name, rows)
        for name, rows in zip(reader.shard_names, await _on_every_shard(reader, lambda name: shard_queries(window_filter, account_ids)))
    ]

    # What the shards show of settlements the registry's snapshot did not have yet: read afresh.
    unknown = {s for shard in shards for s, _, _ in shard.resets} | {
        settlement_id_of_leg(m.transfer_id) for shard in shards for m in shard.movements
    }
    unknown = sorted(s for s in unknown if s is not None and s not in registry.settlements)
    if unknown:
        settlement_rows, entry_rows = await reader.read(reader.home_shard, [(SETTLEMENTS_OF, [unknown]), (ENTRIES_OF, [unknown])])
        # Settled or not now, nothing of them was promised to the earlier shard snapshots.
        settlements, entries = parse_settlements(settlement_rows, entry_rows, settled_counts=False)
        registry.settlements.update(settlements)
        registry.entries.update(entries)
        registry.late_settlements.update(settlements)
    open_window_id = max((w for w, (state, _) in registry.windows.items() if state == WindowState.OPEN), default=0)
    fresh_open_window_id = None
    if any(shard.window_id > open_window_id for shard in shards):
        (unfinished,) = await reader.read(reader.home_shard, [(UNFINISHED_WINDOWS, [])])
        fresh_open_window_id = max((int(w) for w, state in unfinished if state == OPEN), default=0)

    checked_windows = set(window_filter) if window_filter else None
    findings: list[Finding] = []
    transfer_rows_left_out = 0
    for shard in shards:
        findings += window_total_findings(shard, checked_windows)
        findings += position_findings(shard)
        for row in shard.transfer_rows:
            findings += transfer_findings(shard.shard_name, row)
        transfer_rows_left_out += shard.transfer_rows_total - len(shard.transfer_rows)
    findings += settlement_findings(registry, shards)
    findings += reset_findings(registry, shards)
    findings += settlement_account_findings(registry, shards)
    findings += window_state_findings(registry, shards, fresh_open_window_id)
    cap_findings, suspects = cap_share_sums(registry, shards)
    findings += cap_findings
    if suspects:
        findings += await _double_collect(reader, suspects)

    windows = set(registry.windows) if checked_windows is None else checked_windows & set(registry.windows)
    participants = registry.participants | {p for shard in shards for p, _ in shard.positions}
    return report(
        findings,
        windows_checked=len(windows),
        transfers_checked=sum(n for shard in shards for (_, _, n) in shard.transfer_sums.values()),
        participants_checked=len(participants),
        settlements_checked=len(registry.settlements),
        findings_not_listed=transfer_rows_left_out,
        home_shard=reader.home_shard,
        duration_seconds=round(time.monotonic() - started, 3),
    )


# The RPC's reader: the service's pools (its ShardRouter of ShardStores).


class RouterReader:
    """Snapshots through ShardStore.session: the caller's deadline bounds every read, and the
    store maps database errors (ShardUnavailable, DeadlineExceeded, InternalFault)."""

    def __init__(self, router, timeout_seconds: float) -> None:
        self.router = router
        self.home_shard = router.shard_name_for(clearing.CLEARING_HOME_KEY)
        self.shard_names = sorted(store.shard_name for store in router.handles())
        self.deadline = time.monotonic() + timeout_seconds

    async def read(self, shard_name: str, queries: Sequence[Query]) -> list[list[tuple]]:
        remaining_seconds = self.deadline - time.monotonic()
        if remaining_seconds <= 0:
            raise errors.DeadlineExceeded("reconciliation: deadline passed before every shard was read")
        async with self.router.handle(shard_name).session(remaining_seconds) as session:
            statements = ["SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY", *(sql for sql, _ in queries), "COMMIT"]
            return await session.run(session.begin(*statements), [param for _, params in queries for param in params])


async def reconcile(router, window_ids: list[int], timeout_seconds: float) -> ReconcileReport:
    """What the Clearing service's Reconcile RPC answers. Raises the storage layer's errors
    (a shard unreachable: ShardUnavailable; the deadline: DeadlineExceeded)."""
    return await reconcile_with(RouterReader(router, timeout_seconds), list(window_ids))


# The command's reader: the auditor role (SELECT only), as the audit reads.


class AuditorReader:
    def __init__(self, shards: list[dict], home_shard: str) -> None:
        self.shards = {shard["name"]: shard for shard in shards}
        self.shard_names = sorted(self.shards)
        self.home_shard = home_shard
        self.readers = asyncio.Semaphore(audit.SHARD_READERS_MAX)

    async def read(self, shard_name: str, queries: Sequence[Query]) -> list[list[tuple]]:
        async with self.readers:
            return await asyncio.to_thread(self._read, shard_name, queries)

    def _read(self, shard_name: str, queries: Sequence[Query]) -> list[list[tuple]]:
        try:
            with audit.connect_for_reading(shard_name, audit.reader_dsn(self.shards[shard_name])) as connection:
                connection.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
                rows = [connection.execute(sql, params).fetchall() for sql, params in queries]
                connection.execute("COMMIT")
                return rows
        except psycopg.Error as error:  # any database error here means this shard cannot be read: exit 2
            raise ShardUnreadable(shard_name, error) from error


def home_shard_of(description: dict) -> str:
    """The clearing home: from the shard map in etcd when the cluster has one (cluster.json's
    etcd_endpoint), else cluster.json's clearing_home_shard, else from the map `make up`
    publishes for these shards (evenly, in order)."""
    from sharding.shard_map import Shard, ShardMap

    if description.get("etcd_endpoint") or description.get("etcd_endpoints"):
        from sharding import etcd_shard_map

        endpoint = etcd_shard_map.endpoints_of(description)

        async def load() -> ShardMap | None:
            client = etcd_shard_map.etcd_client(endpoint)
            try:
                return await asyncio.wait_for(etcd_shard_map.load(client), etcd_shard_map.ETCD_CALL_TIMEOUT_SECONDS)
            finally:
                await client.close()

        shard_map = asyncio.run(load())
        if shard_map is None:
            raise LookupError(f"no shard map in etcd at {endpoint}")
    elif description.get("clearing_home_shard"):
        return description["clearing_home_shard"]
    else:
        shard_map = ShardMap.evenly([Shard(shard["name"], shard["dsn"]) for shard in description["shards"]])
    return shard_map.shard_name_for_key(clearing.CLEARING_HOME_KEY)


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m services.storage.reconciliation",
        description="Reconcile clearing: window totals, positions, settlements and settlement accounts against the ledger.",
        epilog=f"Exit status: {EXIT_HOLDS} consistent, {EXIT_VIOLATIONS} findings, {EXIT_SHARD_UNREADABLE} a shard could not be read.",
    )
    parser.add_argument("--cluster", type=pathlib.Path, default=None,
                        help=f"the cluster.json to read (default: ${audit.STATE_DIR_ENV}/{audit.CLUSTER_FILE_NAME})")
    parser.add_argument("--window", type=int, action="append", default=[], metavar="ID",
                        help="check these windows in detail (repeat; default: every window); the global checks always run")
    parser.add_argument("--home", help="the clearing home shard (default: from the shard map)")
    parser.add_argument("--json", action="store_true", help="print one JSON document: verdict, counters, findings")
    arguments = parser.parse_args(argv)
    arguments.cluster = arguments.cluster or audit.default_cluster_path()
    if any(window_id < 1 for window_id in arguments.window):
        parser.error("window ids start at 1")
    return arguments


def print_text(result: ReconcileReport) -> None:
    print(f"home shard {result.home_shard}: windows checked {result.windows_checked}, cleared transfers {result.transfers_checked},"
          f" participants {result.participants_checked}, settlements {result.settlements_checked}"
          f" ({result.duration_seconds:.2f}s)")
    if result.consistent:
        print("consistent")
        return
    print("FINDINGS:")
    for finding in result.findings:
        print(f"  {finding}")
    if result.findings_not_listed:
        print(f"  ... and {result.findings_not_listed} more not listed")


def main(argv: list[str] | None = None) -> int:
    arguments = parse_arguments(argv)
    try:
        description = json.loads(arguments.cluster.read_text())
        shards = description["shards"]
        home = arguments.home or home_shard_of(description)
    except Exception as error:  # noqa: BLE001 (a missing file, bad JSON, etcd out of reach: nothing can be proved)
        return audit.cluster_unreadable(f"cannot read the cluster description {arguments.cluster} or its shard map: {error}", arguments.json)
    if home not in {shard["name"] for shard in shards}:
        return audit.cluster_unreadable(f"the clearing home {home} is not a shard of {arguments.cluster}", arguments.json)

    async def run() -> ReconcileReport:
        return await asyncio.wait_for(reconcile_with(AuditorReader(shards, home), arguments.window), COMMAND_TIMEOUT_SECONDS)

    try:
        result = asyncio.run(run())
    except ShardUnreadable as error:
        return audit.shard_unreadable(error, arguments.json)
    if arguments.json:
        print(json.dumps(result.as_json(), indent=1, sort_keys=True))
    else:
        print_text(result)
    return EXIT_HOLDS if result.consistent else EXIT_VIOLATIONS


if __name__ == "__main__":
    sys.exit(main())
