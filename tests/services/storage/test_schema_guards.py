"""The database itself refuses what the service must never do, whatever code runs against it."""

import psycopg
import pytest

from corebank.v1 import transfers_pb2


@pytest.fixture
def posted(ledger, shard_map):
    shard = shard_map.shards[0]
    payer, payee = ledger.funded(100, shard.name), ledger.open(shard=shard.name)
    return shard.dsn, ledger.transfer(payer.account_id, payee.account_id, 40), payer


def test_a_final_transfer_cannot_be_updated(posted):
    dsn, transfer, _ = posted
    with psycopg.connect(dsn) as connection, pytest.raises(psycopg.errors.RestrictViolation, match="is final"):
        connection.execute("UPDATE transfers SET amount_minor = 1 WHERE transfer_id = %s", [transfer.transfer_id])


def test_transfers_are_never_deleted_or_truncated(posted):
    dsn, transfer, _ = posted
    with psycopg.connect(dsn) as connection, pytest.raises(psycopg.errors.RestrictViolation, match="never deleted"):
        connection.execute("DELETE FROM transfers WHERE transfer_id = %s", [transfer.transfer_id])
    with psycopg.connect(dsn) as connection, pytest.raises(psycopg.errors.RestrictViolation):
        connection.execute("TRUNCATE transfers")


def test_a_pending_transfer_may_only_change_status(posted):
    dsn, transfer, _ = posted
    with psycopg.connect(dsn) as connection:
        connection.execute(
            "INSERT INTO transfers (transfer_id, debit_account_id, credit_account_id, amount_minor, currency, status)"
            " VALUES ('guard-pending', %s, %s, 5, 'USD', %s)",
            [transfer.debit_account_id, transfer.credit_account_id, transfers_pb2.PENDING],
        )
        with pytest.raises(psycopg.errors.RestrictViolation, match="may only change status"):
            connection.execute("UPDATE transfers SET amount_minor = 6 WHERE transfer_id = 'guard-pending'")
        connection.rollback()


def test_a_customer_balance_below_zero_is_refused_by_the_database(posted):
    dsn, _, payer = posted
    with psycopg.connect(dsn) as connection, pytest.raises(psycopg.errors.CheckViolation):
        connection.execute(
            "UPDATE accounts SET debits_posted_minor = debits_posted_minor + 1000 WHERE account_id = %s", [payer.account_id]
        )
