"""The audit sees everything, even under load.

Two kinds of tests:
- On the session's live cluster, the audit runs again and again while same-shard and
  cross-shard transfers and payments to a collecting merchant run, and must raise no
  false alarm. Those tests only read the databases (and try a DELETE that is refused,
  inside a transaction rolled back).
- Every invariant is broken on purpose, but never on the live cluster: each such test
  clones the live shards into scratch databases of its own ("audit_scratch", one per
  shard's PostgreSQL, created and dropped as the superuser), checks that the clone
  audits clean, breaks one thing there and asserts that the audit names it. The live
  cluster is shared by the whole session and audited by later tests; a clone cannot
  leave it broken, whatever the test does or wherever it fails.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import pathlib
import subprocess
import sys
import time

import grpc
import psycopg
import pytest

from corebank.v1 import accounts_pb2, transfers_pb2
from deploy.postgres import dsn as postgres_dsn
from services.ledger.coordination import CoordinatorState
from services.ledger.ids import IdNamespace
from services.ledger.transfers import Branch, TransferStatus
from services.storage import audit as audit_module
from services.storage.audit import Invariant, ShardUnreadable, audit_cluster
from services.storage.schema import apply_schema
from tests.fixtures.ledger import mixed_load

REPO_ROOT = pathlib.Path(__file__).resolve().parents[3]
SCRATCH_DATABASE = "audit_scratch"
CLONED_TABLES = ("accounts", "transfers", "tcc_transfers", "tcc_barriers")
# A clone is taken shard by shard; a transfer between shards (a sweep, say) that moves
# during it can leave the clone half-way in a state no single instant had. Then clone again.
CLONE_ATTEMPTS_MAX = 5
QUIET_WAIT_SECONDS_MAX = 30
QUIET_POLL_SECONDS = 0.2

LOAD_SECONDS = 12
LOAD_CLIENTS = 12
AUDITS_UNDER_LOAD_MIN = 5
AMOUNT_MINOR = 7
FUNDING_MINOR = 1_000_000
CLI_TIMEOUT_SECONDS = 120
UNUSED_PORT = 1  # nothing listens there: a shard that cannot be read

REGISTRY_TABLE = """
    CREATE TABLE IF NOT EXISTS id_registry (
        namespace smallint NOT NULL, id text NOT NULL, fields jsonb NOT NULL,
        created_at timestamptz NOT NULL DEFAULT now(), PRIMARY KEY (namespace, id))"""
# One registry row for every transfer a shard is the home of (rows of branches 0, 1, 3),
# where the live registry is not filled in yet.
FILL_REGISTRY = f"""
    INSERT INTO id_registry (namespace, id, fields)
    SELECT {IdNamespace.TRANSFER:d}, transfer_id, jsonb_build_object(
        'debit_account_id', debit_account_id, 'credit_account_id', credit_account_id,
        'amount_minor', amount_minor, 'currency', currency, 'reference', reference)
    FROM transfers WHERE branch IN ({Branch.SAME_SHARD:d}, {Branch.DEBIT:d}, {Branch.COLLECTED:d})
    ON CONFLICT DO NOTHING"""


def superuser_dsn(shard: dict, dbname: str) -> str:
    """The shard's superuser (on its unix socket: never over TCP), on database `dbname`."""
    return psycopg.conninfo.make_conninfo(shard["superuser_dsn"], dbname=dbname)


def invariants(audit) -> set[Invariant]:
    return {violation.invariant for violation in audit.findings()}


def subjects(audit, invariant: Invariant) -> set[str]:
    return {violation.subject for violation in audit.findings() if violation.invariant == invariant}


def wait_until_quiet(shards: list[dict]) -> None:
    """No transfer between shards in doubt (sweeps of collecting merchants start every second)."""
    deadline = time.monotonic() + QUIET_WAIT_SECONDS_MAX
    while audit_cluster(shards).in_doubt:
        assert time.monotonic() < deadline, f"transfers still in doubt after {QUIET_WAIT_SECONDS_MAX}s"
        time.sleep(QUIET_POLL_SECONDS)


# The live cluster's data that the clones are made of: one of every kind of transfer.


@pytest.fixture(scope="module")
def seeded(ledger, shard_map):
    """Accounts and transfers of this module: same shard, between shards, collected for a merchant."""
    first, second = shard_map.shards[0].name, shard_map.shards[1].name
    payer = ledger.funded(FUNDING_MINOR, first)
    same_shard_payee = ledger.open(shard=first)
    far_payee = ledger.open(shard=second)
    merchant = ledger.open(kind=accounts_pb2.MERCHANT, tier=3, collect_on_every_shard=True)
    same_shard = ledger.transfer(payer.account_id, same_shard_payee.account_id, 100)
    between = ledger.transfer(payer.account_id, far_payee.account_id, 200)
    collected = ledger.transfer(payer.account_id, merchant.account_id, 300)
    assert {t.status for t in (same_shard, between, collected)} == {transfers_pb2.POSTED}
    # Refused by the credit side after the debit was reserved: undone on the credit shard's word.
    frozen_payee = ledger.open(shard=second)
    ledger.accounts.UpdateAccountStatus(accounts_pb2.UpdateAccountStatusRequest(account_id=frozen_payee.account_id, status=accounts_pb2.FROZEN))
    refused_between = ledger.unique_id("refused-between")
    with pytest.raises(grpc.RpcError):
        ledger.transfer(payer.account_id, frozen_payee.account_id, 50, transfer_id=refused_between)
    return {
        "refused_between": refused_between,
        "payer": payer.account_id, "same_shard_payee": same_shard_payee.account_id, "far_payee": far_payee.account_id,
        "same_shard": same_shard.transfer_id, "between": between.transfer_id, "collected": collected.transfer_id,
        "first": first, "second": second,
    }


class Scratch:
    """Clones of the live shards, one database per shard's PostgreSQL, as the superuser."""

    def __init__(self, live_shards: list[dict]) -> None:
        self.live_shards = live_shards
        self.shards = [{"name": s["name"], "dsn": superuser_dsn(s, SCRATCH_DATABASE)} for s in live_shards]

    def dsn(self, shard_name: str) -> str:
        return next(s["dsn"] for s in self.shards if s["name"] == shard_name)

    def create(self) -> None:
        for shard in self.live_shards:
            with psycopg.connect(superuser_dsn(shard, "postgres"), autocommit=True) as connection:
                connection.execute(f"DROP DATABASE IF EXISTS {SCRATCH_DATABASE} WITH (FORCE)")
                connection.execute(f"CREATE DATABASE {SCRATCH_DATABASE}")
        for shard in self.shards:
            apply_schema(shard["dsn"])

    def drop(self) -> None:
        for shard in self.live_shards:
            with psycopg.connect(superuser_dsn(shard, "postgres"), autocommit=True) as connection:
                connection.execute(f"DROP DATABASE IF EXISTS {SCRATCH_DATABASE} WITH (FORCE)")

    def clone(self) -> None:
        """Copy every table of every live shard, each shard in one snapshot, all shards at once."""

        def copy(pair: tuple[dict, dict]) -> None:
            live, scratch = pair
            with psycopg.connect(live["auditor_dsn"]) as source, psycopg.connect(scratch["dsn"]) as target:
                source.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
                tables = list(CLONED_TABLES)
                if source.execute("SELECT to_regclass('id_registry') IS NOT NULL").fetchone()[0]:
                    tables.append("id_registry")
                for table in tables:
                    with source.cursor().copy(f"COPY {table} TO STDOUT") as out, target.cursor().copy(f"COPY {table} FROM STDIN") as into:
                        for data in out:
                            into.write(data)
                # Rows this test adds later take fresh sequence numbers.
                target.execute("SELECT setval(pg_get_serial_sequence('transfers', 'seq'), (SELECT coalesce(max(seq), 0) + 1 FROM transfers))")
                target.commit()

        with concurrent.futures.ThreadPoolExecutor(len(self.shards)) as pool:
            list(pool.map(copy, zip(self.live_shards, self.shards)))

    def execute(self, shard_name: str, sql: str, params=None, bypass_triggers: bool = True) -> list[tuple]:
        """Change the clone behind the service's back, past the triggers that would refuse it."""
        return self.execute_all(shard_name, [(sql, params)], bypass_triggers)[-1]

    def execute_all(self, shard_name: str, statements: list[tuple], bypass_triggers: bool = True) -> list[list[tuple]]:
        """Several (sql, params) statements in one transaction."""
        results = []
        with psycopg.connect(self.dsn(shard_name)) as connection:
            if bypass_triggers:
                connection.execute("SET session_replication_role = replica")
            for sql, params in statements:
                cursor = connection.execute(sql, params)
                results.append(cursor.fetchall() if cursor.description else [])
        return results

    def fill_registry(self) -> None:
        for shard in self.shards:
            self.execute(shard["name"], REGISTRY_TABLE)
            # A coordinator record's id is its debit branch's, registered with it.
            self.execute(shard["name"], FILL_REGISTRY)

    def audit(self):
        return audit_cluster(self.shards)


@pytest.fixture
def scratch(cluster, seeded):
    """A clean clone of the live cluster; dropped after the test, whatever it did to it."""
    clone = Scratch(cluster["shards"])
    try:
        for _ in range(CLONE_ATTEMPTS_MAX):
            wait_until_quiet(cluster["shards"])
            clone.create()
            clone.clone()
            found = clone.audit().findings()
            # A registry not yet filled in by the service is the registry tests' business.
            if not [v for v in found if v.invariant not in (Invariant.ID_NOT_REGISTERED, Invariant.ID_REGISTRY_DIFFERS)]:
                break
        else:
            raise AssertionError(f"no clean clone in {CLONE_ATTEMPTS_MAX} attempts: {found[:5]}")
        clone.fill_registry()
        assert clone.audit().violations() == []
        yield clone
    finally:
        clone.drop()


def shard_of_transfer(scratch: Scratch, transfer_id: str, branch: Branch) -> str:
    for shard in scratch.shards:
        if scratch.execute(shard["name"], "SELECT 1 FROM transfers WHERE transfer_id = %s AND branch = %s", [transfer_id, int(branch)]):
            return shard["name"]
    raise AssertionError(f"no {branch.name} row for {transfer_id}")


# The live cluster, under load: no false alarms.


def test_the_audit_holds_on_a_busy_cluster_while_transfers_run(ledger, cluster):
    audits = []
    with mixed_load(ledger, LOAD_CLIENTS, FUNDING_MINOR, AMOUNT_MINOR) as done:
        time.sleep(1)  # let the load build up
        deadline = time.monotonic() + LOAD_SECONDS
        while time.monotonic() < deadline or len(audits) < AUDITS_UNDER_LOAD_MIN:
            audits.append(audit_cluster(cluster["shards"]))
    report = [
        (round(a.duration_seconds, 2), a.figures.transfer_ids, a.figures.transfers_in_doubt, a.figures.rechecked_transfers)
        for a in audits
    ]
    print(f"\naudits under load (seconds, transfer ids, in doubt, read again): {report}; load: {done}")
    assert done["transfers"] > 0
    assert sum(a.figures.transfers_in_doubt for a in audits) > 0, "the load never had a transfer in flight during an audit"
    alarms = [violation for a in audits for violation in a.violations()]
    assert alarms == []
    wait_until_quiet(cluster["shards"])
    assert audit_cluster(cluster["shards"]).violations() == []


def test_accounts_and_tcc_rows_are_never_deleted_on_the_live_cluster(cluster, seeded, shard_map):
    live = next(s for s in cluster["shards"] if s["name"] == seeded["first"])
    for sql, params in [
        ("DELETE FROM accounts WHERE account_id = %s", [seeded["same_shard_payee"]]),
        ("DELETE FROM tcc_transfers WHERE transfer_id = %s", [seeded["between"]]),
        ("DELETE FROM tcc_barriers WHERE transfer_id = %s", [seeded["between"]]),
    ]:
        # In a transaction that is rolled back: even a missing trigger could delete nothing.
        # The service role has no DELETE at all; the owner meets the triggers.
        for dsn, refusal, match in [
            (live["dsn"], psycopg.errors.InsufficientPrivilege, "permission denied"),
            (live["owner_dsn"], psycopg.errors.RestrictViolation, "never deleted"),
        ]:
            with psycopg.connect(dsn) as connection:
                with pytest.raises(refusal, match=match):
                    connection.execute(sql, params)
                connection.rollback()


# Each invariant, broken in a clone.


def test_a_clean_clone_has_every_kind_of_transfer(scratch, seeded):
    audit = scratch.audit()
    assert audit.violations() == []
    assert shard_of_transfer(scratch, seeded["between"], Branch.DEBIT) == seeded["first"]
    assert shard_of_transfer(scratch, seeded["between"], Branch.CREDIT) == seeded["second"]
    assert shard_of_transfer(scratch, seeded["collected"], Branch.COLLECTED) == seeded["first"]
    assert audit.figures.transfers_between_shards > 0 and audit.figures.id_registry_shards == len(scratch.shards)


def test_truncate_and_delete_are_refused_by_triggers(scratch, seeded):
    # Applied again, as `make up` does: the id_registry trigger is there even if the
    # table came after the schema was first applied.
    apply_schema(scratch.dsn(seeded["first"]))
    for table in ("accounts", "transfers", "tcc_transfers", "tcc_barriers", "id_registry"):
        with pytest.raises(psycopg.errors.RestrictViolation):
            scratch.execute(seeded["first"], f"TRUNCATE {table}", bypass_triggers=False)
        with pytest.raises(psycopg.errors.RestrictViolation):
            scratch.execute(seeded["first"], f"DELETE FROM {table}", bypass_triggers=False)
    assert scratch.audit().violations() == []


def test_a_deleted_account_is_seen(scratch, seeded):
    scratch.execute(seeded["first"], "DELETE FROM accounts WHERE account_id = %s", [seeded["same_shard_payee"]])
    audit = scratch.audit()
    assert seeded["same_shard"] in subjects(audit, Invariant.MISSING_ACCOUNT)
    assert Invariant.SHARD_UNBALANCED in invariants(audit)


def test_a_bumped_counter_is_seen(scratch, seeded):
    scratch.execute(seeded["first"], "UPDATE accounts SET credits_posted_minor = credits_posted_minor + 1 WHERE account_id = %s",
                    [seeded["same_shard_payee"]])
    audit = scratch.audit()
    assert subjects(audit, Invariant.COUNTERS_DIFFER) == {seeded["same_shard_payee"]}
    assert subjects(audit, Invariant.SHARD_UNBALANCED) == {"USD"}
    assert subjects(audit, Invariant.CURRENCY_NOT_ZERO) == {"USD"}


def test_a_bumped_clearing_counter_is_seen(scratch, seeded):
    (clearing,) = scratch.execute(
        seeded["first"], "SELECT clearing_account_id FROM transfers WHERE transfer_id = %s", [seeded["between"]]
    )[0]
    scratch.execute(seeded["first"], "UPDATE accounts SET credits_posted_minor = credits_posted_minor + 5 WHERE account_id = %s", [clearing])
    audit = scratch.audit()
    assert subjects(audit, Invariant.COUNTERS_DIFFER) == {clearing}
    assert subjects(audit, Invariant.CLEARING_NOT_IN_FLIGHT) == {"USD"}
    assert subjects(audit, Invariant.GLOBAL_CLEARING) == {"USD"}
    assert Invariant.SHARD_UNBALANCED in invariants(audit)


def test_a_clearing_account_moved_by_an_ordinary_transfer_is_seen(scratch, seeded):
    """Counters and transfer rows agree, the shard balances, but clearing no longer nets to what is in flight."""
    (clearing,) = scratch.execute(
        seeded["first"], "SELECT clearing_account_id FROM transfers WHERE transfer_id = %s", [seeded["between"]]
    )[0]
    scratch.execute_all(seeded["first"], [
        (f"INSERT INTO transfers (transfer_id, debit_account_id, credit_account_id, amount_minor, currency, status, branch)"
         f" VALUES ('audit-into-clearing', %s, %s, 3, 'USD', {TransferStatus.POSTED:d}, {Branch.SAME_SHARD:d})",
         [seeded["payer"], clearing]),
        ("UPDATE accounts SET debits_posted_minor = debits_posted_minor + 3 WHERE account_id = %s", [seeded["payer"]]),
        ("UPDATE accounts SET credits_posted_minor = credits_posted_minor + 3 WHERE account_id = %s", [clearing]),
    ])
    scratch.fill_registry()
    audit = scratch.audit()
    assert invariants(audit) >= {Invariant.CLEARING_NOT_IN_FLIGHT, Invariant.GLOBAL_CLEARING}
    assert not invariants(audit) & {Invariant.COUNTERS_DIFFER, Invariant.SHARD_UNBALANCED}


def test_a_transfer_naming_a_missing_account_is_seen(scratch, seeded):
    for branch, status in [(Branch.SAME_SHARD, TransferStatus.POSTED), (Branch.COLLECTED, TransferStatus.PENDING)]:
        clearing = "sub_nobody_0" if branch == Branch.COLLECTED else None
        scratch.execute(
            seeded["first"],
            "INSERT INTO transfers (transfer_id, debit_account_id, credit_account_id, amount_minor, currency, status, branch,"
            " clearing_account_id) VALUES (%s, 'acc_ghost_debit', 'acc_ghost_credit', 9, 'USD', %s, %s, %s)",
            [f"audit-ghost-{branch.name}", int(status), int(branch), clearing],
        )
    # A refusal may name an account that never existed: REJECTED rows are not counted.
    scratch.execute(
        seeded["first"],
        "INSERT INTO transfers (transfer_id, debit_account_id, credit_account_id, amount_minor, currency, status, reason)"
        " VALUES ('audit-ghost-rejected', 'acc_ghost_debit', 'acc_ghost_credit', 9, 'USD', %s, 'ACCOUNT_NOT_FOUND')",
        [int(TransferStatus.REJECTED)],
    )
    scratch.fill_registry()
    audit = scratch.audit()
    missing = [(v.subject, v.detail) for v in audit.findings() if v.invariant == Invariant.MISSING_ACCOUNT]
    assert {subject for subject, _ in missing} == {"audit-ghost-SAME_SHARD", "audit-ghost-COLLECTED"}
    assert any("sub_nobody_0" in detail for _, detail in missing)
    assert any("acc_ghost_credit" in detail for _, detail in missing)
    assert not any("acc_ghost_credit" in detail for subject, detail in missing if subject == "audit-ghost-COLLECTED")


def test_a_customer_below_zero_is_seen(scratch, seeded):
    # The database itself refuses it; drop that safety net in the clone to see the audit's.
    scratch.execute(seeded["first"], "ALTER TABLE accounts DROP CONSTRAINT only_system_accounts_go_negative")
    overdraft_minor = FUNDING_MINOR * 10
    scratch.execute_all(seeded["first"], [
        (f"INSERT INTO transfers (transfer_id, debit_account_id, credit_account_id, amount_minor, currency, status)"
         f" VALUES ('audit-overdraft', %s, %s, %s, 'USD', {TransferStatus.POSTED:d})",
         [seeded["payer"], seeded["same_shard_payee"], overdraft_minor]),
        ("UPDATE accounts SET debits_posted_minor = debits_posted_minor + %s WHERE account_id = %s", [overdraft_minor, seeded["payer"]]),
        ("UPDATE accounts SET credits_posted_minor = credits_posted_minor + %s WHERE account_id = %s",
         [overdraft_minor, seeded["same_shard_payee"]]),
    ])
    scratch.fill_registry()
    audit = scratch.audit()
    assert subjects(audit, Invariant.BELOW_ZERO) == {seeded["payer"]}
    assert invariants(audit) == {Invariant.BELOW_ZERO}


def test_a_posted_record_with_a_pending_credit_branch_is_seen(scratch, seeded):
    """The credit shard on its own is consistent (the amount moved back to pending);
    only the record on the debit shard contradicts it, and reading it again does not help."""
    ((amount_minor, clearing),) = scratch.execute(
        seeded["second"], "SELECT amount_minor, clearing_account_id FROM transfers WHERE transfer_id = %s", [seeded["between"]]
    )
    scratch.execute_all(seeded["second"], [
        (f"UPDATE transfers SET status = {TransferStatus.PENDING:d}, finalized_at = NULL WHERE transfer_id = %s", [seeded["between"]]),
        ("UPDATE accounts SET debits_posted_minor = debits_posted_minor - %(amount)s,"
         " debits_pending_minor = debits_pending_minor + %(amount)s WHERE account_id = %(account)s",
         {"amount": amount_minor, "account": clearing}),
        ("UPDATE accounts SET credits_posted_minor = credits_posted_minor - %(amount)s,"
         " credits_pending_minor = credits_pending_minor + %(amount)s WHERE account_id = %(account)s",
         {"amount": amount_minor, "account": seeded["far_payee"]}),
    ])
    audit = scratch.audit()
    assert subjects(audit, Invariant.RECORD_VS_CREDIT_BRANCH) == {seeded["between"]}
    assert invariants(audit) == {Invariant.RECORD_VS_CREDIT_BRANCH}
    assert audit.figures.rechecked_transfers >= 1


def test_an_undone_transfer_without_a_stored_credit_decision_is_seen(scratch, seeded):
    """Its debit was released, but nothing on the credit shard stops a late try from applying."""
    scratch.execute(seeded["second"], "DELETE FROM tcc_barriers WHERE transfer_id = %s", [seeded["refused_between"]])
    audit = scratch.audit()
    assert subjects(audit, Invariant.UNDONE_WITHOUT_CREDIT_DECISION) == {seeded["refused_between"]}
    assert invariants(audit) == {Invariant.UNDONE_WITHOUT_CREDIT_DECISION}


def test_a_record_that_disagrees_with_its_debit_branch_is_seen(scratch, seeded):
    scratch.execute(seeded["first"], "UPDATE tcc_transfers SET state = %s WHERE transfer_id = %s",
                    [int(CoordinatorState.TRYING), seeded["between"]])
    audit = scratch.audit()
    assert subjects(audit, Invariant.RECORD_VS_DEBIT_BRANCH) == {seeded["between"]}


def test_a_voided_record_with_a_posted_credit_branch_is_seen(scratch, seeded):
    scratch.execute(seeded["first"], "UPDATE tcc_transfers SET state = %s WHERE transfer_id = %s",
                    [int(CoordinatorState.VOIDED), seeded["between"]])
    audit = scratch.audit()
    assert seeded["between"] in subjects(audit, Invariant.RECORD_VS_CREDIT_BRANCH)


def test_a_credit_branch_without_a_record_is_seen(scratch, seeded):
    scratch.execute(
        seeded["second"],
        "INSERT INTO transfers (transfer_id, debit_account_id, credit_account_id, amount_minor, currency, status, branch,"
        " clearing_account_id) SELECT 'audit-orphan', debit_account_id, credit_account_id, amount_minor, currency, %s, %s,"
        " clearing_account_id FROM transfers WHERE transfer_id = %s",
        [int(TransferStatus.VOIDED), int(Branch.CREDIT), seeded["between"]],
    )
    audit = scratch.audit()
    assert subjects(audit, Invariant.BRANCH_WITHOUT_RECORD) == {"audit-orphan"}
    assert invariants(audit) == {Invariant.BRANCH_WITHOUT_RECORD}


def test_the_same_transfer_id_on_two_shards_is_seen(scratch, seeded):
    # A refused transfer moves no counter, so only the reuse of the id is wrong here.
    scratch.execute(
        seeded["second"],
        "INSERT INTO transfers (transfer_id, debit_account_id, credit_account_id, amount_minor, currency, status, reason)"
        " VALUES (%s, %s, 'acc_someone', 5, 'USD', %s, 'INSUFFICIENT_FUNDS')",
        [seeded["same_shard"], seeded["far_payee"], int(TransferStatus.REJECTED)],
    )
    audit = scratch.audit()
    assert subjects(audit, Invariant.TRANSFER_ID_REUSED) == {seeded["same_shard"]}
    # The registry remembers the first use; the second one differs from it.
    assert subjects(audit, Invariant.ID_REGISTRY_DIFFERS) == {seeded["same_shard"]}


def test_a_transfer_missing_from_the_id_registry_or_differing_from_it_is_seen(scratch, seeded):
    for shard in scratch.shards:
        scratch.execute(shard["name"], "DELETE FROM id_registry WHERE namespace = %s AND id = %s",
                        [int(IdNamespace.TRANSFER), seeded["between"]])
        scratch.execute(shard["name"], "UPDATE id_registry SET fields = jsonb_set(fields, '{amount_minor}', '1')"
                        " WHERE namespace = %s AND id = %s", [int(IdNamespace.TRANSFER), seeded["collected"]])
    audit = scratch.audit()
    assert subjects(audit, Invariant.ID_NOT_REGISTERED) == {seeded["between"]}
    assert subjects(audit, Invariant.ID_REGISTRY_DIFFERS) == {seeded["collected"]}


def test_the_audit_works_without_an_id_registry(scratch):
    for shard in scratch.shards:
        scratch.execute(shard["name"], "DROP TABLE id_registry")
    audit = scratch.audit()
    assert audit.violations() == []
    assert audit.figures.id_registry_shards == 0 and not any(s.has_id_registry for s in audit.shards)


def test_the_violations_list_is_bounded(scratch, seeded):
    extra = audit_module.VIOLATIONS_LISTED_PER_INVARIANT_MAX + 5
    scratch.execute(
        seeded["first"],
        "INSERT INTO transfers (transfer_id, debit_account_id, credit_account_id, amount_minor, currency, status)"
        " SELECT 'audit-many-' || n, 'acc_ghost_a', 'acc_ghost_b', 1, 'USD', %s FROM generate_series(1, %s) n",
        [int(TransferStatus.POSTED), extra],
    )
    scratch.fill_registry()
    audit = scratch.audit()
    assert len([v for v in audit.findings() if v.invariant == Invariant.MISSING_ACCOUNT]) == 2 * extra
    lines = [line for line in audit.violations() if Invariant.MISSING_ACCOUNT in line]
    assert len(lines) == audit_module.VIOLATIONS_LISTED_PER_INVARIANT_MAX + 1 and lines[-1].endswith("more")


# The command.


def run_cli(*arguments: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "services.storage.audit", *arguments], cwd=REPO_ROOT, capture_output=True, text=True,
        timeout=CLI_TIMEOUT_SECONDS, env={**os.environ, **(env or {})},
    )


def write_cluster_json(folder: pathlib.Path, shards: list[dict]) -> pathlib.Path:
    path = folder / audit_module.CLUSTER_FILE_NAME
    path.write_text(json.dumps({"shards": shards}))
    return path


def test_cli_help():
    completed = run_cli("--help")
    assert completed.returncode == 0
    assert "--cluster" in completed.stdout and "--json" in completed.stdout and "Exit status" in completed.stdout


def test_cli_json_on_the_live_cluster_and_the_state_dir(cluster, tmp_path):
    wait_until_quiet(cluster["shards"])
    write_cluster_json(tmp_path, cluster["shards"])
    # COREBANK_STATE_DIR names the folder of cluster.json when no path is given.
    completed = run_cli("--json", env={audit_module.STATE_DIR_ENV: str(tmp_path)})
    assert completed.returncode == audit_module.EXIT_HOLDS, completed.stdout + completed.stderr
    document = json.loads(completed.stdout)
    assert document["holds"] is True and document["violations"] == [] and document["verdict"] == "invariants hold"
    assert [shard["name"] for shard in document["shards"]] == [shard["name"] for shard in cluster["shards"]]
    assert all(shard["balanced"] for shard in document["shards"])
    assert document["global"]["transfer_ids"] > 0
    # The text form, with the older positional path.
    completed = run_cli(str(tmp_path / audit_module.CLUSTER_FILE_NAME))
    assert completed.returncode == audit_module.EXIT_HOLDS and "invariants hold" in completed.stdout


def test_cli_exit_codes_on_violations_and_unreadable_shards(scratch, seeded, tmp_path):
    scratch.execute(seeded["first"], "UPDATE accounts SET debits_posted_minor = debits_posted_minor + 1 WHERE account_id = %s",
                    [seeded["payer"]])
    broken = write_cluster_json(tmp_path, scratch.shards)
    completed = run_cli("--cluster", str(broken), "--json")
    assert completed.returncode == audit_module.EXIT_VIOLATIONS
    document = json.loads(completed.stdout)
    assert document["holds"] is False
    assert {v["invariant"] for v in document["violations"]} >= {Invariant.COUNTERS_DIFFER, Invariant.SHARD_UNBALANCED}
    assert document["violation_counts"][Invariant.COUNTERS_DIFFER] == 1
    completed = run_cli("--cluster", str(broken))
    assert completed.returncode == audit_module.EXIT_VIOLATIONS and "INVARIANTS BROKEN" in completed.stdout

    unreadable_dir = tmp_path / "unreadable"
    unreadable_dir.mkdir()
    unreadable = write_cluster_json(unreadable_dir, [*scratch.shards[:1], {"name": "shard-gone", "dsn": postgres_dsn(UNUSED_PORT)}])
    completed = run_cli("--cluster", str(unreadable), "--json")
    assert completed.returncode == audit_module.EXIT_SHARD_UNREADABLE
    assert json.loads(completed.stdout)["shard"] == "shard-gone"
    with pytest.raises(ShardUnreadable):
        audit_cluster([{"name": "shard-gone", "dsn": postgres_dsn(UNUSED_PORT)}])
    completed = run_cli("--cluster", str(tmp_path / "missing.json"))
    assert completed.returncode == audit_module.EXIT_SHARD_UNREADABLE


def test_unique_scratch_ids_do_not_leak_into_the_live_cluster(cluster):
    """The clones' made-up rows (audit-*) never reach the live shards."""
    for shard in cluster["shards"]:
        with psycopg.connect(shard["dsn"]) as connection:
            assert connection.execute("SELECT count(*) FROM transfers WHERE transfer_id LIKE 'audit-%'").fetchone()[0] == 0
