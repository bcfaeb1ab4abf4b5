"""The database itself refuses what the service must never do, whatever code runs against it.

Two lines: the service role's privileges (services/storage/grants.sql) refuse it DELETE,
TRUNCATE, DDL and any change to a final transfer; the triggers (schema.sql) refuse the
same deletions and changes to everyone, the owner included, and are tested as the owner.
"""

import psycopg
import pytest

from corebank.v1 import transfers_pb2
from services.ledger.coordination import CoordinatorState
from services.storage.roles import DatabaseRole


def shard_entry(cluster, shard_name: str) -> dict:
    return next(shard for shard in cluster["shards"] if shard["name"] == shard_name)


@pytest.fixture
def posted(ledger, shard_map, cluster):
    """(the shard's cluster.json entry, a posted same-shard transfer, its payer)."""
    shard = shard_map.shards[0]
    payer, payee = ledger.funded(100, shard.name), ledger.open(shard=shard.name)
    return shard_entry(cluster, shard.name), ledger.transfer(payer.account_id, payee.account_id, 40), payer


@pytest.fixture
def posted_between_shards(ledger, shard_map, cluster):
    """(the debit shard's cluster.json entry, a posted transfer between shards): its
    coordinator record on the debit shard is final."""
    debit_shard, credit_shard = shard_map.shards[0].name, shard_map.shards[1].name
    payer, payee = ledger.funded(100, debit_shard), ledger.open(shard=credit_shard)
    transfer = ledger.transfer(payer.account_id, payee.account_id, 30)
    assert transfer.status == transfers_pb2.POSTED
    return shard_entry(cluster, debit_shard), transfer


# The service role: refused by privileges (or, for final rows, by row-level security).


def test_the_cluster_json_dsn_is_the_service_role_and_names_no_password(cluster):
    for shard in cluster["shards"]:
        fields = psycopg.conninfo.conninfo_to_dict(shard["dsn"])
        assert fields["user"] == DatabaseRole.SERVICE and "password" not in fields and fields["passfile"]
        with psycopg.connect(shard["dsn"]) as connection:
            assert connection.execute("SELECT current_user, rolsuper FROM pg_roles WHERE rolname = current_user").fetchone() == (
                DatabaseRole.SERVICE, False,
            )


@pytest.mark.parametrize(
    "statement",
    [
        "DELETE FROM transfers",
        "DELETE FROM accounts",
        "DELETE FROM tcc_transfers",
        "DELETE FROM tcc_barriers",
        "DELETE FROM id_registry",
        "TRUNCATE transfers",
        "TRUNCATE accounts",
        "TRUNCATE tcc_transfers",
        "ALTER TABLE transfers ADD COLUMN guard_probe int",
        "ALTER TABLE transfers DISABLE TRIGGER transfers_are_immutable",
        "ALTER TABLE transfers DISABLE ROW LEVEL SECURITY",
        "DROP TABLE tcc_barriers",
        "DROP TRIGGER transfers_are_immutable ON transfers",
        "CREATE TABLE guard_probe (note text)",
        "CREATE TEMPORARY TABLE guard_probe (note text)",
        "CREATE FUNCTION guard_probe() RETURNS int LANGUAGE sql AS 'SELECT 1'",
        "SET session_replication_role = replica",
        "UPDATE transfers SET amount_minor = 1",
        "UPDATE tcc_transfers SET amount_minor = 1",
        "UPDATE accounts SET owner_id = 'someone else'",
        "UPDATE tcc_barriers SET outcome = 'applied'",
        "UPDATE id_registry SET fields = '{}'",
    ],
)
def test_the_service_role_may_not(cluster, statement):
    with psycopg.connect(cluster["shards"][0]["dsn"]) as connection:
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            connection.execute(statement)
        connection.rollback()


def test_the_service_role_cannot_update_a_final_transfer(posted):
    shard, transfer, _ = posted
    select = "SELECT status, finalized_at, amount_minor FROM transfers WHERE transfer_id = %s"
    with psycopg.connect(shard["dsn"]) as connection:
        before = connection.execute(select, [transfer.transfer_id]).fetchone()
        assert before[0] == transfers_pb2.POSTED
        # Row-level security: the final row is not there for an UPDATE, so nothing changes.
        changed = connection.execute(
            "UPDATE transfers SET status = %s, finalized_at = now() WHERE transfer_id = %s",
            [transfers_pb2.VOIDED, transfer.transfer_id],
        )
        assert changed.rowcount == 0
        connection.commit()
        assert connection.execute(select, [transfer.transfer_id]).fetchone() == before
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            connection.execute("UPDATE transfers SET amount_minor = 1 WHERE transfer_id = %s", [transfer.transfer_id])


def test_the_service_role_cannot_update_a_final_coordinator_record(posted_between_shards):
    shard, transfer = posted_between_shards
    select = "SELECT state, reason, lease_epoch, finalized_at FROM tcc_transfers WHERE transfer_id = %s"
    with psycopg.connect(shard["dsn"]) as connection:
        before = connection.execute(select, [transfer.transfer_id]).fetchone()
        assert before[0] == CoordinatorState.POSTED
        changed = connection.execute(
            "UPDATE tcc_transfers SET state = %s, reason = 'rewritten', lease_epoch = lease_epoch + 1 WHERE transfer_id = %s",
            [int(CoordinatorState.VOIDED), transfer.transfer_id],
        )
        assert changed.rowcount == 0
        connection.commit()
        assert connection.execute(select, [transfer.transfer_id]).fetchone() == before
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            connection.execute("UPDATE tcc_transfers SET amount_minor = 1 WHERE transfer_id = %s", [transfer.transfer_id])


def test_the_auditor_role_only_reads(cluster, posted):
    shard, transfer, _ = posted
    with psycopg.connect(shard["auditor_dsn"]) as connection:
        assert connection.execute("SELECT status FROM transfers WHERE transfer_id = %s", [transfer.transfer_id]).fetchone() == (
            transfers_pb2.POSTED,
        )
        with pytest.raises((psycopg.errors.InsufficientPrivilege, psycopg.errors.ReadOnlySqlTransaction)):
            connection.execute("UPDATE accounts SET status = status")
        connection.rollback()
        connection.execute("SET TRANSACTION READ WRITE")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            connection.execute("UPDATE accounts SET status = status")


# The triggers: they hold for the owner too.


def test_a_final_transfer_cannot_be_updated(posted):
    shard, transfer, _ = posted
    with psycopg.connect(shard["owner_dsn"]) as connection, pytest.raises(psycopg.errors.RestrictViolation, match="is final"):
        connection.execute("UPDATE transfers SET amount_minor = 1 WHERE transfer_id = %s", [transfer.transfer_id])


def test_transfers_are_never_deleted_or_truncated(posted):
    shard, transfer, _ = posted
    with psycopg.connect(shard["owner_dsn"]) as connection, pytest.raises(psycopg.errors.RestrictViolation, match="never deleted"):
        connection.execute("DELETE FROM transfers WHERE transfer_id = %s", [transfer.transfer_id])
    with psycopg.connect(shard["owner_dsn"]) as connection, pytest.raises(psycopg.errors.RestrictViolation):
        connection.execute("TRUNCATE transfers")


def test_a_pending_transfer_may_only_change_status(posted):
    shard, transfer, _ = posted
    with psycopg.connect(shard["owner_dsn"]) as connection:
        connection.execute(
            "INSERT INTO transfers (transfer_id, debit_account_id, credit_account_id, amount_minor, currency, status)"
            " VALUES ('guard-pending', %s, %s, 5, 'USD', %s)",
            [transfer.debit_account_id, transfer.credit_account_id, transfers_pb2.PENDING],
        )
        with pytest.raises(psycopg.errors.RestrictViolation, match="may only change status"):
            connection.execute("UPDATE transfers SET amount_minor = 6 WHERE transfer_id = 'guard-pending'")
        connection.rollback()


def test_a_customer_balance_below_zero_is_refused_by_the_database(posted):
    shard, _, payer = posted
    with psycopg.connect(shard["dsn"]) as connection, pytest.raises(psycopg.errors.CheckViolation):
        connection.execute(
            "UPDATE accounts SET debits_posted_minor = debits_posted_minor + 1000 WHERE account_id = %s", [payer.account_id]
        )
