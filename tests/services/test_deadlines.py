"""Handlers respect the client's deadline: database work is bounded by it."""

import time

import grpc
import psycopg
import pytest

from corebank.v1 import payments_pb2
from tests.fixtures.ledger import failure

DEADLINE_SECONDS = 0.5
LOCK_RELEASE_POLLS_MAX = 40


def wait_for_no_lock_waiters(dsn: str) -> bool:
    with psycopg.connect(dsn, autocommit=True) as observer:
        for _ in range(LOCK_RELEASE_POLLS_MAX):
            waiting = observer.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND datname = current_database()"
            ).fetchone()[0]
            if waiting == 0:
                return True
            time.sleep(0.05)
    return False


def test_a_transfer_stuck_behind_a_lock_gives_up_at_the_deadline_and_leaves_no_trace(ledger, shard_map):
    shard = shard_map.shards[1]
    payer, payee = ledger.funded(1_000, shard.name), ledger.open(shard=shard.name)
    transfer_id = ledger.unique_id("late")
    # Another session holds the payer's row lock, as a long transaction would.
    with psycopg.connect(shard.dsn) as blocker:
        blocker.execute("SELECT 1 FROM accounts WHERE account_id = %s FOR UPDATE", [payer.account_id])
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as raised:
            ledger.transfer(payer.account_id, payee.account_id, 10, transfer_id=transfer_id, timeout=DEADLINE_SECONDS)
        waited = time.monotonic() - started
        assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        # The server lets go of its lock wait too (statement_timeout), while the blocker still holds the lock.
        assert wait_for_no_lock_waiters(shard.dsn)
        blocker.rollback()
    assert waited < DEADLINE_SECONDS * 10  # generous: it gave up, it did not wait for the lock
    with pytest.raises(grpc.RpcError) as raised:
        ledger.payments.GetTransfer(payments_pb2.GetTransferRequest(transfer_id=transfer_id))
    assert failure(raised.value)[1] == "TRANSFER_NOT_FOUND"
    assert ledger.get(payer.account_id).balance_minor == 1_000
    # And the same transfer_id works once the lock is gone: retrying is safe.
    assert ledger.transfer(payer.account_id, payee.account_id, 10, transfer_id=transfer_id).amount_minor == 10
