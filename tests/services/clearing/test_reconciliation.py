"""Clearing reconciliation (services/storage/reconciliation.py) on real PostgreSQL shards.

Never on the session's live cluster, which other tests change as they please (and tamper with
here would break): every test runs on scratch databases of its own on the cluster's PostgreSQL
instances, made by the schema (services/storage/schema.py, grants included) and filled by
`Books` below, which writes clearing state as the design says the hot path and the Clearing
service write it (services/ledger/clearing.py): accounts of participants, cleared transfers of
every branch with their window totals and position shares, window closes, settlements, legs,
resets and caps. The checks then read those databases through the service role's pools (the
RPC's path) and the auditor role (the command's).

A rich state is built once per module in a template database; each test copies it (CREATE
DATABASE ... TEMPLATE), breaks one thing as the superuser, past the triggers, and asserts which
findings that gives.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import pathlib
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator

import psycopg
import pytest
from psycopg import conninfo

from services import bootstrap
from services.ledger import clearing
from services.ledger.accounts import AccountKind
from services.ledger.clearing import ParticipantTotal, SettlementModel, SettlementState, WindowState
from services.ledger.transfers import Branch, TransferStatus
from services.storage import reconciliation
from services.storage.reconciliation import Check, ReconcileReport
from services.storage.schema import apply_schema
from sharding.router import ShardRouter
from sharding.shard_map import Shard, ShardMap

REPO_ROOT = pathlib.Path(__file__).resolve().parents[3]
TEMPLATE_DATABASE = "reconcile_template"
SCRATCH_DATABASE = "reconcile_scratch"
RECONCILE_TIMEOUT_SECONDS = 30.0
CLI_TIMEOUT_SECONDS = 120
FUNDING_MINOR = 10_000_000
CAP_MINOR = 1_000_000
UNUSED_PORT = 1  # nothing listens there: a shard that cannot be read
CONCURRENT_SECONDS = 6
# The reads are held open this long inside each snapshot while a writer keeps committing.
SNAPSHOT_HELD_SECONDS = 0.5
# A writer's statement may wait at most this long for a lock: a reconciliation that blocked it would fail it.
WRITER_LOCK_TIMEOUT_MS = 2_000

USD = "USD"
BANK_A, BANK_B, HOSTING = "bank-a", "bank-b", clearing.HOSTING_PARTICIPANT_ID


def superuser(shard: dict, dbname: str) -> str:
    return conninfo.make_conninfo(shard["superuser_dsn"], dbname=dbname)


class Books:
    """Clearing state written straight into scratch shards, as the superuser, the way the design
    has the service write it (common brief / services/ledger/clearing.py), one local transaction
    per step: what reconciliation must find consistent at every commit."""

    def __init__(self, shards: list[dict], dbname: str) -> None:
        self.names = [shard["name"] for shard in shards]
        self.dsns = {shard["name"]: superuser(shard, dbname) for shard in shards}
        self.map = ShardMap.evenly([Shard(name, "") for name in self.names])
        self.home = self.map.shard_name_for_key(clearing.CLEARING_HOME_KEY)
        self.participant_of: dict[str, str] = {}
        self.shard_of: dict[str, str] = {}
        self.ids = itertools.count()
        self.tag = uuid.uuid4().hex[:6]  # ids of this writer's own, whoever wrote the books before it
        self.connections: dict[str, psycopg.Connection] = {}

    def connection(self, shard_name: str) -> psycopg.Connection:
        if shard_name not in self.connections:
            self.connections[shard_name] = psycopg.connect(self.dsns[shard_name])
        return self.connections[shard_name]

    def load_accounts(self) -> Books:
        """The participant and shard of every account already there (a copy of a built state)."""
        for name in self.names:
            for account_id, participant_id in self.rows(name, "SELECT account_id, participant_id FROM accounts"):
                self.participant_of[account_id], self.shard_of[account_id] = participant_id, name
        return self

    def close(self) -> None:
        for connection in self.connections.values():
            connection.close()
        self.connections.clear()

    @contextlib.contextmanager
    def transaction(self, shard_name: str) -> Iterator[psycopg.Connection]:
        connection = self.connection(shard_name)
        with connection.transaction():
            connection.execute(f"SET LOCAL lock_timeout = {WRITER_LOCK_TIMEOUT_MS}")
            yield connection

    def rows(self, shard_name: str, sql: str, params=()) -> list[tuple]:
        with self.transaction(shard_name) as connection:
            return connection.execute(sql, params).fetchall()

    # Participants and accounts.

    def account_id_on(self, shard_name: str, prefix: str) -> str:
        while True:
            account_id = f"{prefix}_{self.tag}_{next(self.ids)}"
            if self.map.shard_name_for_key(account_id) == shard_name:
                return account_id

    def open(self, participant_id: str, shard_name: str, kind: AccountKind = AccountKind.CUSTOMER, account_id: str | None = None,
             parent: str | None = None, currency: str = USD) -> str:
        account_id = account_id or self.account_id_on(shard_name, "acc")
        funding = 0 if kind == AccountKind.SYSTEM else FUNDING_MINOR
        with self.transaction(shard_name) as connection:
            connection.execute(
                "INSERT INTO accounts (account_id, request_id, owner_id, currency, kind, tier, status, credits_posted_minor,"
                " participant_id, parent_account_id) VALUES (%s, %s, %s, %s, %s, 3, 1, %s, %s, %s)",
                [account_id, account_id, participant_id, currency, int(kind), funding, participant_id, parent],
            )
        self.participant_of[account_id], self.shard_of[account_id] = participant_id, shard_name
        return account_id

    def register(self, participant_id: str, currencies=(USD,)) -> None:
        with self.transaction(self.home) as connection:
            connection.execute("INSERT INTO participants (participant_id, request_id, name) VALUES (%s, %s, %s) ON CONFLICT DO NOTHING",
                               [participant_id, f"reg-{participant_id}", participant_id])
            for currency in currencies:
                connection.execute("INSERT INTO participant_currencies (participant_id, currency, settlement_account_id) VALUES (%s, %s, %s)"
                                   " ON CONFLICT DO NOTHING",
                                   [participant_id, currency, clearing.settlement_account_id(participant_id, currency)])
        for currency in currencies:
            for account_id, owner in ((clearing.settlement_account_id(participant_id, currency), participant_id),
                                      (clearing.settlement_bank_account_id(currency), HOSTING)):
                if account_id not in self.shard_of:
                    self.open(owner, self.map.shard_name_for_key(account_id), AccountKind.SYSTEM, account_id, currency=currency)

    def set_cap(self, participant_id: str, currency: str, cap_minor: int) -> None:
        """Shares first (each its allotment), then the cap on the home: clearing.commit_phases' order."""
        each, remainder = divmod(cap_minor, len(self.names))
        for index, name in enumerate(sorted(self.names)):
            with self.transaction(name) as connection:
                connection.execute(
                    "INSERT INTO clearing_positions (participant_id, currency, allotment_minor) VALUES (%s, %s, %s)"
                    " ON CONFLICT (participant_id, currency) DO UPDATE SET allotment_minor = EXCLUDED.allotment_minor",
                    [participant_id, currency, each + (1 if index < remainder else 0)],
                )
        with self.transaction(self.home) as connection:
            connection.execute("UPDATE participant_currencies SET net_debit_cap_minor = %s WHERE participant_id = %s AND currency = %s",
                               [cap_minor, participant_id, currency])

    # Transfers.

    @staticmethod
    def _move(connection, account_id: str, column: str, amount_minor: int) -> None:
        connection.execute(f"UPDATE accounts SET {column} = {column} + %s WHERE account_id = %s", [amount_minor, account_id])

    @staticmethod
    def _clear(connection, window_id: int, payer: str, payee: str, currency: str, amount_minor: int, positions: bool = True) -> None:
        """Window totals and positions of one cleared transfer, on its debit shard."""
        for participant_id, debits, credits, paid in ((payer, amount_minor, 0, 1), (payee, 0, amount_minor, 0)):
            connection.execute(
                "INSERT INTO clearing_window_totals (window_id, participant_id, currency, debits_minor, credits_minor, transfers)"
                " VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (window_id, participant_id, currency) DO UPDATE SET"
                " debits_minor = clearing_window_totals.debits_minor + EXCLUDED.debits_minor,"
                " credits_minor = clearing_window_totals.credits_minor + EXCLUDED.credits_minor,"
                " transfers = clearing_window_totals.transfers + EXCLUDED.transfers",
                [window_id, participant_id, currency, debits, credits, paid],
            )
        if positions:
            for participant_id, change in sorted(((payer, amount_minor), (payee, -amount_minor))):
                connection.execute(
                    "INSERT INTO clearing_positions (participant_id, currency, position_minor) VALUES (%s, %s, %s)"
                    " ON CONFLICT (participant_id, currency) DO UPDATE SET position_minor = clearing_positions.position_minor + EXCLUDED.position_minor",
                    [participant_id, currency, change],
                )

    @staticmethod
    def _window(connection) -> int:
        connection.execute("SELECT pg_advisory_xact_lock_shared(%s)", [clearing.WINDOW_LOCK_KEY])
        return connection.execute("SELECT window_id FROM clearing_shard_window").fetchone()[0]

    def _cleared(self, debit_account_id: str, credited_id: str) -> tuple[str, str] | None:
        return clearing.cleared_between(debit_account_id, self.participant_of[debit_account_id], credited_id, self.participant_of[credited_id])

    def post(self, debit_account_id: str, credited_id: str, amount_minor: int, merchant_id: str | None = None,
             transfer_id: str | None = None, currency: str = USD) -> str:
        """Both accounts on one shard: SAME_SHARD, or COLLECTED for a merchant's sub-account."""
        shard_name = self.shard_of[debit_account_id]
        assert self.shard_of[credited_id] == shard_name
        transfer_id = transfer_id or f"t-{self.tag}-{next(self.ids)}"
        cleared = self._cleared(debit_account_id, credited_id)
        branch = Branch.COLLECTED if merchant_id else Branch.SAME_SHARD
        with self.transaction(shard_name) as connection:
            window_id = self._window(connection) if cleared else None
            connection.execute(
                "INSERT INTO transfers (transfer_id, debit_account_id, credit_account_id, amount_minor, currency, status, finalized_at,"
                " branch, clearing_account_id, payer_participant_id, payee_participant_id, window_id)"
                " VALUES (%s, %s, %s, %s, %s, %s, now(), %s, %s, %s, %s, %s)",
                [transfer_id, debit_account_id, merchant_id or credited_id, amount_minor, currency, int(TransferStatus.POSTED),
                 int(branch), credited_id if merchant_id else None, *(cleared or (None, None)), window_id],
            )
            self._move(connection, debit_account_id, "debits_posted_minor", amount_minor)
            self._move(connection, credited_id, "credits_posted_minor", amount_minor)
            if cleared:
                self._clear(connection, window_id, *cleared, currency, amount_minor)
        return transfer_id

    def between(self, debit_account_id: str, credit_account_id: str, amount_minor: int, confirm: bool = True,
                transfer_id: str | None = None, currency: str = USD) -> str:
        """Between shards: the debit try (reserves), the credit branch, the debit confirm."""
        debit_shard, credit_shard = self.shard_of[debit_account_id], self.shard_of[credit_account_id]
        assert debit_shard != credit_shard
        transfer_id = transfer_id or f"t-{self.tag}-{next(self.ids)}"
        cleared = self._cleared(debit_account_id, credit_account_id)
        with self.transaction(debit_shard) as connection:
            connection.execute(
                "INSERT INTO transfers (transfer_id, debit_account_id, credit_account_id, amount_minor, currency, status,"
                " branch, clearing_account_id, payer_participant_id, payee_participant_id)"
                " VALUES (%s, %s, %s, %s, %s, %s, %s, 'clr_test', %s, %s)",
                [transfer_id, debit_account_id, credit_account_id, amount_minor, currency, int(TransferStatus.PENDING),
                 int(Branch.DEBIT), *(cleared or (None, None))],
            )
            self._move(connection, debit_account_id, "debits_pending_minor", amount_minor)
            if cleared:
                connection.execute(
                    "INSERT INTO clearing_positions (participant_id, currency, reserved_minor) VALUES (%s, %s, %s)"
                    " ON CONFLICT (participant_id, currency) DO UPDATE SET reserved_minor = clearing_positions.reserved_minor + EXCLUDED.reserved_minor",
                    [cleared[0], currency, amount_minor],
                )
        with self.transaction(credit_shard) as connection:
            connection.execute(
                "INSERT INTO transfers (transfer_id, debit_account_id, credit_account_id, amount_minor, currency, status, finalized_at,"
                " branch, clearing_account_id) VALUES (%s, %s, %s, %s, %s, %s, now(), %s, 'clr_test')",
                [transfer_id, debit_account_id, credit_account_id, amount_minor, currency, int(TransferStatus.POSTED), int(Branch.CREDIT)],
            )
            self._move(connection, credit_account_id, "credits_posted_minor", amount_minor)
        if confirm:
            self.confirm(transfer_id, debit_account_id, credit_account_id, amount_minor, currency)
        return transfer_id

    def confirm(self, transfer_id: str, debit_account_id: str, credit_account_id: str, amount_minor: int, currency: str = USD) -> None:
        cleared = self._cleared(debit_account_id, credit_account_id)
        with self.transaction(self.shard_of[debit_account_id]) as connection:
            window_id = self._window(connection) if cleared else None
            connection.execute("UPDATE transfers SET status = %s, finalized_at = now(), window_id = %s WHERE transfer_id = %s",
                               [int(TransferStatus.POSTED), window_id, transfer_id])
            self._move(connection, debit_account_id, "debits_pending_minor", -amount_minor)
            self._move(connection, debit_account_id, "debits_posted_minor", amount_minor)
            if cleared:
                connection.execute("UPDATE clearing_positions SET reserved_minor = reserved_minor - %s WHERE participant_id = %s AND currency = %s",
                                   [amount_minor, cleared[0], currency])
                self._clear(connection, window_id, *cleared, currency, amount_minor)

    def ledger_transfer(self, transfer_id: str, debit_account_id: str, credit_account_id: str, amount_minor: int, currency: str) -> None:
        """A transfer of the ledger's own (settlement legs: never cleared), as the service posts it."""
        if self.shard_of[debit_account_id] == self.shard_of[credit_account_id]:
            self.post(debit_account_id, credit_account_id, amount_minor, transfer_id=transfer_id, currency=currency)
        else:
            self.between(debit_account_id, credit_account_id, amount_minor, transfer_id=transfer_id, currency=currency)

    # Windows and settlements.

    def open_window(self) -> int:
        return self.rows(self.home, "SELECT window_id FROM settlement_windows WHERE state = %s", [int(WindowState.OPEN)])[0][0]

    def close_window(self) -> int:
        """CLOSING + the next OPEN on the home, every shard moved on, then CLOSED."""
        closing = self.open_window()
        with self.transaction(self.home) as connection:
            connection.execute("UPDATE settlement_windows SET state = %s, closed_at = now() WHERE window_id = %s", [int(WindowState.CLOSING), closing])
            connection.execute("INSERT INTO settlement_windows (window_id, state) VALUES (%s, %s)", [closing + 1, int(WindowState.OPEN)])
        for name in self.names:
            with self.transaction(name) as connection:
                connection.execute("SELECT pg_advisory_xact_lock(%s)", [clearing.WINDOW_LOCK_KEY])
                connection.execute("UPDATE clearing_shard_window SET window_id = %s, switched_at = now() WHERE window_id = %s", [closing + 1, closing])
        with self.transaction(self.home) as connection:
            connection.execute("UPDATE settlement_windows SET state = %s WHERE window_id = %s", [int(WindowState.CLOSED), closing])
        return closing

    def totals(self, window_ids: list[int]) -> list[ParticipantTotal]:
        rows = []
        for name in self.names:
            rows += self.rows(name, "SELECT participant_id, currency, debits_minor, credits_minor, transfers FROM clearing_window_totals"
                              " WHERE window_id = ANY(%s)", [window_ids])
        return clearing.summed_totals(rows)

    def settle(self, window_ids: list[int], model: SettlementModel) -> int:
        totals = self.totals(window_ids)
        with self.transaction(self.home) as connection:
            settlement_id = connection.execute("SELECT coalesce(max(settlement_id), 0) + 1 FROM settlements").fetchone()[0]
            connection.execute("INSERT INTO settlements (settlement_id, request_id, model, state, window_ids) VALUES (%s, %s, %s, %s, %s)",
                               [settlement_id, f"stl-{settlement_id}", int(model), int(SettlementState.PENDING), window_ids])
            for t in totals:
                connection.execute(
                    "INSERT INTO settlement_entries (settlement_id, participant_id, currency, debits_minor, credits_minor, transfers)"
                    " VALUES (%s, %s, %s, %s, %s, %s)", [settlement_id, t.participant_id, t.currency, t.debits_minor, t.credits_minor, t.transfer_count])
            connection.execute("UPDATE settlement_windows SET state = %s, settlement_id = %s WHERE window_id = ANY(%s)",
                               [int(WindowState.PENDING_SETTLEMENT), settlement_id, window_ids])
        return settlement_id

    def record(self, settlement_id: int, participant_id: str, currency: str = USD) -> None:
        """RecordParticipantSettled's steps: the legs, a reset on every shard, the entry settled."""
        (model, window_ids), = self.rows(self.home, "SELECT model, window_ids FROM settlements WHERE settlement_id = %s", [settlement_id])
        (debits, credits, count), = self.rows(
            self.home, "SELECT debits_minor, credits_minor, transfers FROM settlement_entries WHERE settlement_id = %s"
            " AND participant_id = %s AND currency = %s", [settlement_id, participant_id, currency])
        total = ParticipantTotal(participant_id, currency, debits, credits, count)
        for leg in clearing.settlement_legs(settlement_id, SettlementModel(model), total):
            self.ledger_transfer(leg.transfer_id, leg.debit_account_id, leg.credit_account_id, leg.amount_minor, leg.currency)
        for name in self.names:
            with self.transaction(name) as connection:
                (net,) = connection.execute(
                    "SELECT coalesce(sum(debits_minor - credits_minor), 0) FROM clearing_window_totals"
                    " WHERE window_id = ANY(%s) AND participant_id = %s AND currency = %s", [window_ids, participant_id, currency]).fetchone()
                connection.execute("INSERT INTO clearing_position_resets (settlement_id, participant_id, currency, amount_minor) VALUES (%s, %s, %s, %s)",
                                   [settlement_id, participant_id, currency, net])
                if net:
                    connection.execute(
                        "INSERT INTO clearing_positions (participant_id, currency, position_minor) VALUES (%s, %s, %s)"
                        " ON CONFLICT (participant_id, currency) DO UPDATE SET position_minor = clearing_positions.position_minor + EXCLUDED.position_minor",
                        [participant_id, currency, -net],
                    )
        with self.transaction(self.home) as connection:
            connection.execute("UPDATE settlement_entries SET settled_at = now() WHERE settlement_id = %s AND participant_id = %s AND currency = %s",
                               [settlement_id, participant_id, currency])
            if not connection.execute("SELECT 1 FROM settlement_entries WHERE settlement_id = %s AND settled_at IS NULL", [settlement_id]).fetchall():
                connection.execute("UPDATE settlements SET state = %s, settled_at = now() WHERE settlement_id = %s", [int(SettlementState.SETTLED), settlement_id])
                connection.execute("UPDATE settlement_windows SET state = %s WHERE settlement_id = %s", [int(WindowState.SETTLED), settlement_id])

    def entry_participants(self, settlement_id: int) -> list[str]:
        return [row[0] for row in self.rows(self.home, "SELECT participant_id FROM settlement_entries WHERE settlement_id = %s ORDER BY 1", [settlement_id])]


# Databases.


def create_databases(shards: list[dict], dbname: str, template: str | None = None) -> None:
    for shard in shards:
        with psycopg.connect(superuser(shard, "postgres"), autocommit=True) as connection:
            connection.execute(f"DROP DATABASE IF EXISTS {dbname} WITH (FORCE)")
            connection.execute(f"CREATE DATABASE {dbname}" + (f" TEMPLATE {template}" if template else ""))
    if template is None:
        for shard in shards:
            apply_schema(superuser(shard, dbname))


def drop_databases(shards: list[dict], dbname: str) -> None:
    for shard in shards:
        with psycopg.connect(superuser(shard, "postgres"), autocommit=True) as connection:
            connection.execute(f"DROP DATABASE IF EXISTS {dbname} WITH (FORCE)")


def build_rich_state(books: Books) -> dict:
    """Every kind of cleared transfer, in three windows: window 1 settled (DEFERRED_NET, every
    participant recorded), window 2 in a GROSS settlement with one participant recorded, window 3
    open; a transfer between shards still pending; a cap on bank-a."""
    first, second, third = sorted(books.names)
    for participant_id in (HOSTING, BANK_A, BANK_B):
        books.register(participant_id)
    books.set_cap(BANK_A, USD, CAP_MINOR)
    a1, a2 = books.open(BANK_A, first), books.open(BANK_A, second)
    b1, b3 = books.open(BANK_B, first), books.open(BANK_B, third)
    c1, c2 = books.open(HOSTING, first), books.open(HOSTING, first)
    merchant = books.open(BANK_B, second, AccountKind.MERCHANT)
    sub = books.open(BANK_B, first, AccountKind.MERCHANT, parent=merchant)
    # Window 1.
    books.post(a1, b1, 100)
    books.post(c1, c2, 50)  # within one participant: not cleared
    books.post(a1, sub, 30, merchant_id=merchant)  # collected for bank-b's merchant
    books.between(a2, b3, 200)
    books.post(b1, a1, 40)
    books.post(c1, a1, 25)
    first_window = books.close_window()
    # Window 2.
    books.between(a1, b3, 70)
    books.post(b1, c1, 15)
    pending = books.between(a2, b3, 60, confirm=False)
    second_window = books.close_window()
    net_settlement = books.settle([first_window], SettlementModel.DEFERRED_NET)
    for participant_id in books.entry_participants(net_settlement):
        books.record(net_settlement, participant_id)
    gross_settlement = books.settle([second_window], SettlementModel.GROSS)
    books.record(gross_settlement, BANK_A)
    # Window 3, open.
    last = books.post(a1, b1, 5)
    books.close()
    return {
        "first": first, "second": second, "third": third, "a1": a1, "b1": b1, "pending": pending, "last": last,
        "net_settlement": net_settlement, "gross_settlement": gross_settlement, "windows": (first_window, second_window, first_window + 2),
    }


# Reading: the RPC's path (the service role's pools, as the service opens them) and the command's.


def role_dsn(dsn: str, dbname: str) -> str:
    """A role's DSN to `dbname`: its passfile names the cluster's database only, so a copy of it
    naming `dbname` is made beside it (in the test cluster's own secrets folder)."""
    passfile = pathlib.Path(conninfo.conninfo_to_dict(dsn)["passfile"])
    scratch_passfile = passfile.with_name(f"{dbname}-{passfile.name}")
    if not scratch_passfile.exists():
        lines = [line.split(":") for line in passfile.read_text().splitlines() if line]
        scratch_passfile.touch(mode=0o600)
        scratch_passfile.write_text("".join(":".join([*line[:2], dbname, *line[3:]]) + "\n" for line in lines))
    return conninfo.make_conninfo(dsn, dbname=dbname, passfile=str(scratch_passfile))


def service_shards(shards: list[dict], dbname: str) -> list[Shard]:
    return [Shard(shard["name"], role_dsn(shard["dsn"], dbname)) for shard in shards]


async def _with_router(shards: list[Shard], use):
    router: ShardRouter = ShardRouter(bootstrap.open_shard_store, bootstrap.close_shard_store)
    await router.apply(ShardMap.evenly(shards))
    try:
        return await use(router)
    finally:
        await router.close()


def reconcile(shards: list[Shard], window_ids=()) -> ReconcileReport:
    return asyncio.run(_with_router(shards, lambda router: reconciliation.reconcile(router, list(window_ids), RECONCILE_TIMEOUT_SECONDS)))


def cluster_file(path: pathlib.Path, shards: list[dict], dbname: str) -> pathlib.Path:
    path.write_text(json.dumps({"shards": [
        {"name": s["name"], "dsn": role_dsn(s["dsn"], dbname), "auditor_dsn": role_dsn(s["auditor_dsn"], dbname)} for s in shards
    ]}))
    return path


def command(path: pathlib.Path, *arguments: str) -> tuple[int, dict]:
    completed = subprocess.run(
        [sys.executable, "-m", "services.storage.reconciliation", "--cluster", str(path), "--json", *arguments],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=CLI_TIMEOUT_SECONDS, check=False,
    )
    return completed.returncode, json.loads(completed.stdout or "{}")


def checks(report: ReconcileReport) -> set[str]:
    return {finding.check for finding in report.findings}


def of(report: ReconcileReport, check: Check) -> list:
    return [finding for finding in report.findings if finding.check == check]


# Fixtures.


@pytest.fixture(scope="module")
def rich(cluster) -> Iterator[dict]:
    shards = cluster["shards"]
    create_databases(shards, TEMPLATE_DATABASE)
    try:
        books = Books(shards, TEMPLATE_DATABASE)
        state = build_rich_state(books)
        yield state
    finally:
        drop_databases(shards, TEMPLATE_DATABASE)


@pytest.fixture
def scratch(cluster, rich) -> Iterator[Books]:
    """A copy of the rich state; its Books write (tamper) as the superuser."""
    shards = cluster["shards"]
    create_databases(shards, SCRATCH_DATABASE, template=TEMPLATE_DATABASE)
    books = Books(shards, SCRATCH_DATABASE).load_accounts()
    try:
        yield books
    finally:
        books.close()
        drop_databases(shards, SCRATCH_DATABASE)


@pytest.fixture
def scratch_shards(cluster) -> list[Shard]:
    return service_shards(cluster["shards"], SCRATCH_DATABASE)


def tamper(books: Books, shard_name: str, sql: str, params=()) -> None:
    """Past the triggers (session_replication_role = replica), committed."""
    with books.transaction(shard_name) as connection:
        connection.execute("SET LOCAL session_replication_role = replica")
        connection.execute(sql, params)


# Consistent states.


def test_a_fresh_cluster_is_consistent(cluster, tmp_path):
    shards = cluster["shards"]
    create_databases(shards, SCRATCH_DATABASE)
    try:
        report = reconcile(service_shards(shards, SCRATCH_DATABASE))
        assert report.consistent and report.findings == [], report
        assert (report.windows_checked, report.transfers_checked, report.settlements_checked) == (1, 0, 0)
        code, answer = command(cluster_file(tmp_path / "cluster.json", shards, SCRATCH_DATABASE))
        assert (code, answer["verdict"], answer["findings"]) == (reconciliation.EXIT_HOLDS, "consistent", [])
    finally:
        drop_databases(shards, SCRATCH_DATABASE)


def test_transfers_windows_and_settlements_between_participants_are_consistent(scratch, scratch_shards, rich, cluster, tmp_path):
    report = reconcile(scratch_shards)
    assert report.consistent, [str(f) for f in report.findings]
    # Cleared: window 1 four (a->b, a->merchant, a2->b3, b->a, hosting->a: five), window 2 two, window 3 one.
    assert report.transfers_checked == 5 + 2 + 1
    assert (report.windows_checked, report.participants_checked, report.settlements_checked) == (3, 3, 2)
    assert reconcile(scratch_shards, [rich["windows"][1]]).transfers_checked == 2
    code, answer = command(cluster_file(tmp_path / "cluster.json", cluster["shards"], SCRATCH_DATABASE))
    assert (code, answer["consistent"], answer["transfers_checked"]) == (reconciliation.EXIT_HOLDS, True, 8)


def test_each_shard_is_read_in_one_repeatable_read_read_only_snapshot(scratch, scratch_shards):
    async def read(router):
        reader = reconciliation.RouterReader(router, RECONCILE_TIMEOUT_SECONDS)
        return await reader.read(reader.home_shard, [("SHOW transaction_isolation", []), ("SHOW transaction_read_only", [])])

    assert asyncio.run(_with_router(scratch_shards, read)) == [[("repeatable read",)], [("on",)]]


# Each tampering, named.


def test_a_changed_window_total(scratch, scratch_shards, rich):
    open_window = rich["windows"][2]
    tamper(scratch, rich["first"], "UPDATE clearing_window_totals SET debits_minor = debits_minor + 5"
           " WHERE window_id = %s AND participant_id = %s", [open_window, BANK_A])
    report = reconcile(scratch_shards)
    assert checks(report) == {Check.WINDOW_TOTAL_MISMATCH, Check.WINDOW_NET_NOT_ZERO, Check.POSITION_MISMATCH}
    (total,) = of(report, Check.WINDOW_TOTAL_MISMATCH)
    assert (total.shard, total.window_id, total.participant_id, total.expected_minor, total.found_minor) == (
        rich["first"], open_window, BANK_A, 5, 10)
    (net,) = of(report, Check.WINDOW_NET_NOT_ZERO)
    assert (net.window_id, net.currency, net.found_minor) == (open_window, USD, 5)
    # Only the other windows in detail: the window checks leave it out, the position check is global.
    assert checks(reconcile(scratch_shards, [rich["windows"][0]])) == {Check.POSITION_MISMATCH}


def test_a_changed_position_and_reservation(scratch, scratch_shards, rich):
    tamper(scratch, rich["second"], "UPDATE clearing_positions SET position_minor = position_minor + 1 WHERE participant_id = %s", [BANK_A])
    report = reconcile(scratch_shards)
    assert checks(report) == {Check.POSITION_MISMATCH}
    (finding,) = report.findings
    assert (finding.shard, finding.participant_id, finding.found_minor - finding.expected_minor) == (rich["second"], BANK_A, 1)

    tamper(scratch, rich["second"], "UPDATE clearing_positions SET position_minor = position_minor - 1, reserved_minor = 0 WHERE participant_id = %s", [BANK_A])
    (finding,) = reconcile(scratch_shards).findings
    assert (finding.check, finding.expected_minor, finding.found_minor) == (Check.POSITION_MISMATCH, 60, 0)
    assert finding.detail.startswith("reserved")


def test_a_changed_or_missing_reset(scratch, scratch_shards, rich):
    settlement = rich["net_settlement"]
    tamper(scratch, rich["first"], "UPDATE clearing_position_resets SET amount_minor = amount_minor + 3"
           " WHERE settlement_id = %s AND participant_id = %s", [settlement, BANK_B])
    report = reconcile(scratch_shards)
    assert checks(report) == {Check.RESET_MISMATCH, Check.POSITION_MISMATCH}
    (reset,) = of(report, Check.RESET_MISMATCH)
    assert (reset.shard, reset.participant_id, reset.found_minor - reset.expected_minor) == (rich["first"], BANK_B, 3)

    # The hosting participant moved nothing on the third shard in window 1: its reset there is 0,
    # and its position unchanged: a missing barrier row alone.
    tamper(scratch, rich["first"], "UPDATE clearing_position_resets SET amount_minor = amount_minor - 3"
           " WHERE settlement_id = %s AND participant_id = %s", [settlement, BANK_B])
    tamper(scratch, rich["third"], "DELETE FROM clearing_position_resets WHERE settlement_id = %s AND participant_id = %s", [settlement, HOSTING])
    report = reconcile(scratch_shards)
    assert checks(report) == {Check.RESET_MISMATCH}
    assert "no reset row" in report.findings[0].detail


def test_a_changed_settlement_entry(scratch, scratch_shards, rich):
    # Not recorded yet (bank-b in the GROSS settlement): the entry against its windows only.
    tamper(scratch, scratch.home, "UPDATE settlement_entries SET debits_minor = debits_minor + 5"
           " WHERE settlement_id = %s AND participant_id = %s", [rich["gross_settlement"], BANK_B])
    report = reconcile(scratch_shards)
    assert checks(report) == {Check.SETTLEMENT_NET_MISMATCH}
    assert {f.participant_id for f in report.findings} == {BANK_B, ""}  # the entry, and its settlement's nets
    # Recorded (bank-a in the DEFERRED_NET one): its settlement account no longer matches either.
    tamper(scratch, scratch.home, "UPDATE settlement_entries SET debits_minor = debits_minor - 5"
           " WHERE settlement_id = %s AND participant_id = %s", [rich["gross_settlement"], BANK_B])
    tamper(scratch, scratch.home, "UPDATE settlement_entries SET credits_minor = credits_minor + 7"
           " WHERE settlement_id = %s AND participant_id = %s", [rich["net_settlement"], BANK_A])
    report = reconcile(scratch_shards)
    assert checks(report) == {Check.SETTLEMENT_NET_MISMATCH, Check.SETTLEMENT_ACCOUNT_MISMATCH}
    accounts = {f.detail.split(":")[0] for f in of(report, Check.SETTLEMENT_ACCOUNT_MISMATCH)}
    assert f"account {clearing.settlement_account_id(BANK_A, USD)}" in accounts


def test_a_moved_settlement_account(scratch, scratch_shards, rich):
    account_id = clearing.settlement_account_id(BANK_B, USD)
    tamper(scratch, scratch.shard_of[account_id], "UPDATE accounts SET credits_posted_minor = credits_posted_minor + 1 WHERE account_id = %s", [account_id])
    report = reconcile(scratch_shards)
    assert checks(report) == {Check.SETTLEMENT_ACCOUNT_MISMATCH}
    (finding,) = report.findings
    assert (finding.participant_id, finding.found_minor - finding.expected_minor) == (BANK_B, 1)


def test_a_transfer_moved_to_another_window_or_out_of_any(scratch, scratch_shards, rich):
    open_window, earlier = rich["windows"][2], rich["windows"][1]
    tamper(scratch, rich["first"], "UPDATE transfers SET window_id = %s WHERE transfer_id = %s", [earlier, rich["last"]])
    report = reconcile(scratch_shards)
    assert checks(report) == {Check.WINDOW_TOTAL_MISMATCH}
    assert {(f.window_id, f.participant_id) for f in report.findings} == {
        (open_window, BANK_A), (open_window, BANK_B), (earlier, BANK_A), (earlier, BANK_B)}

    tamper(scratch, rich["first"], "UPDATE transfers SET window_id = NULL WHERE transfer_id = %s", [rich["last"]])
    report = reconcile(scratch_shards)
    assert checks(report) == {Check.WINDOW_TOTAL_MISMATCH, Check.TRANSFER_NOT_CLEARED}
    (not_cleared,) = of(report, Check.TRANSFER_NOT_CLEARED)
    assert rich["last"] in not_cleared.detail and not_cleared.expected_minor == 5


def test_a_transfer_between_participants_posted_without_clearing(scratch, scratch_shards, rich):
    with scratch.transaction(rich["first"]) as connection:
        connection.execute(
            "INSERT INTO transfers (transfer_id, debit_account_id, credit_account_id, amount_minor, currency, status, branch)"
            " VALUES ('uncleared', %s, %s, 9, 'USD', %s, %s)", [rich["a1"], rich["b1"], int(TransferStatus.POSTED), int(Branch.SAME_SHARD)])
    report = reconcile(scratch_shards)
    assert checks(report) == {Check.TRANSFER_NOT_CLEARED}
    assert "uncleared" in report.findings[0].detail

    tamper(scratch, rich["first"], "UPDATE transfers SET payer_participant_id = %s, payee_participant_id = %s WHERE transfer_id = %s",
           [BANK_B, BANK_A, rich["last"]])
    assert Check.TRANSFER_WRONGLY_CLEARED in checks(reconcile(scratch_shards))


def test_a_shard_on_a_stale_window_and_a_settled_window_reopened(scratch, scratch_shards, rich):
    tamper(scratch, rich["second"], "UPDATE clearing_shard_window SET window_id = %s", [rich["windows"][0]])
    report = reconcile(scratch_shards)
    assert checks(report) == {Check.WINDOW_STATE}
    assert {f.shard for f in report.findings} == {rich["second"]}

    tamper(scratch, rich["second"], "UPDATE clearing_shard_window SET window_id = %s", [rich["windows"][2]])
    tamper(scratch, scratch.home, "UPDATE settlement_windows SET state = %s WHERE window_id = %s", [int(WindowState.CLOSED), rich["windows"][1]])
    report = reconcile(scratch_shards)
    assert checks(report) == {Check.WINDOW_STATE}
    assert [f.window_id for f in report.findings] == [rich["windows"][1]]


def test_cap_shares_past_the_cap_or_missing(scratch, scratch_shards, rich):
    tamper(scratch, rich["third"], "UPDATE clearing_positions SET allotment_minor = allotment_minor + 1 WHERE participant_id = %s", [BANK_A])
    report = reconcile(scratch_shards)
    assert checks(report) == {Check.CAP_SHARES_EXCEED_CAP}
    (finding,) = report.findings
    assert (finding.participant_id, finding.expected_minor, finding.found_minor) == (BANK_A, CAP_MINOR, CAP_MINOR + 1)

    tamper(scratch, rich["third"], "UPDATE clearing_positions SET allotment_minor = NULL WHERE participant_id = %s", [BANK_A])
    (finding,) = reconcile(scratch_shards).findings
    assert (finding.check, finding.shard) == (Check.CAP_SHARES_EXCEED_CAP, rich["third"])
    assert "not capped" in finding.detail


def test_the_command_exits_1_on_findings_and_2_on_an_unreadable_shard(scratch, cluster, rich, tmp_path):
    tamper(scratch, rich["second"], "UPDATE clearing_positions SET position_minor = position_minor + 1 WHERE participant_id = %s", [BANK_A])
    path = cluster_file(tmp_path / "cluster.json", cluster["shards"], SCRATCH_DATABASE)
    code, answer = command(path)
    assert (code, answer["verdict"]) == (reconciliation.EXIT_VIOLATIONS, "findings")
    assert [f["check"] for f in answer["findings"]] == [Check.POSITION_MISMATCH]

    description = json.loads(path.read_text())
    description["shards"][-1]["auditor_dsn"] = f"host=127.0.0.1 port={UNUSED_PORT} dbname={SCRATCH_DATABASE} user=nobody connect_timeout=1"
    path.write_text(json.dumps(description))
    code, answer = command(path)
    assert (code, answer["verdict"], answer["shard"]) == (reconciliation.EXIT_SHARD_UNREADABLE, "shard unreadable", description["shards"][-1]["name"])


# Under concurrent writes.


class HeldSnapshots:
    """The RPC's reader, each snapshot held open a while (pg_sleep first: the snapshot is taken
    by the first query, so the reads after it see the state of before the sleep)."""

    def __init__(self, router) -> None:
        self.inner = reconciliation.RouterReader(router, RECONCILE_TIMEOUT_SECONDS)
        self.home_shard, self.shard_names = self.inner.home_shard, self.inner.shard_names

    async def read(self, shard_name, queries):
        rows = await self.inner.read(shard_name, [(f"SELECT pg_sleep({SNAPSHOT_HELD_SECONDS})", []), *queries])
        return rows[1:]


def writer(books: Books, state: dict, stop: threading.Event, progress: dict) -> None:
    """Cleared transfers of every kind, window closes, settlements and their recording, until stopped."""
    first, second, third = sorted(books.names)
    a1, b1 = state["a1"], state["b1"]
    a2 = books.open(BANK_A, second)
    b3 = books.open(BANK_B, third)
    step = 0
    while not stop.is_set():
        step += 1
        books.post(a1, b1, 3)
        books.post(b1, a1, 2)
        books.between(a2, b3, 4)
        books.between(b3, a1, 1, confirm=step % 2 == 0)
        if step % 3 == 0:
            closed = books.close_window()
            settlement = books.settle([closed], SettlementModel.GROSS if step % 2 else SettlementModel.DEFERRED_NET)
            for participant_id in books.entry_participants(settlement):
                books.record(settlement, participant_id)
        progress["steps"] = step
        progress["commits_at"].append(time.monotonic())


def test_reconcile_under_concurrent_writes_blocks_none_and_finds_nothing(scratch, scratch_shards, rich, cluster):
    books = Books(cluster["shards"], SCRATCH_DATABASE).load_accounts()
    stop, progress = threading.Event(), {"steps": 0, "commits_at": []}
    failures: list[BaseException] = []

    def run() -> None:
        try:
            writer(books, rich, stop, progress)
        except BaseException as error:  # noqa: BLE001 (reported by the test)
            failures.append(error)
        finally:
            books.close()

    thread = threading.Thread(target=run)
    thread.start()
    reports = []
    try:
        deadline = time.monotonic() + CONCURRENT_SECONDS

        async def keep_reconciling(router):
            while time.monotonic() < deadline and not failures:
                started = time.monotonic()
                held = len(reports) % 2 == 0
                report = await reconciliation.reconcile_with(HeldSnapshots(router), []) if held else (
                    await reconciliation.reconcile(router, [], RECONCILE_TIMEOUT_SECONDS))
                reports.append((started, time.monotonic(), held, report))

        asyncio.run(_with_router(scratch_shards, keep_reconciling))
    finally:
        stop.set()
        thread.join(timeout=60)
    assert not failures, failures
    assert not thread.is_alive()
    findings = [str(f) for _, _, _, report in reports for f in report.findings]
    assert findings == []
    held = [(start, end) for start, end, was_held, _ in reports if was_held]
    assert len(held) >= 2
    # While snapshots were held open, the writer kept committing (every step several transactions on every shard).
    during = [sum(1 for at in progress["commits_at"] if start < at < end) for start, end in held]
    assert all(count >= 1 for count in during), (during, progress["steps"])
    assert reconcile(scratch_shards).consistent


def test_a_writer_holding_locks_does_not_block_reconcile(scratch, scratch_shards, rich):
    """A window close in progress holds the exclusive window lock and row locks of positions and
    totals, uncommitted: reconcile answers at once, from the committed state."""
    connection = psycopg.connect(scratch.dsns[rich["first"]])
    try:
        connection.execute("SELECT pg_advisory_xact_lock(%s)", [clearing.WINDOW_LOCK_KEY])
        connection.execute("UPDATE clearing_shard_window SET window_id = window_id + 1")
        connection.execute("UPDATE clearing_positions SET position_minor = position_minor + 1000")
        connection.execute("UPDATE clearing_window_totals SET debits_minor = debits_minor + 1000")
        started = time.monotonic()
        report = reconcile(scratch_shards)
        assert time.monotonic() - started < WRITER_LOCK_TIMEOUT_MS / 1000
        assert report.consistent, [str(f) for f in report.findings]
    finally:
        connection.rollback()
        connection.close()
