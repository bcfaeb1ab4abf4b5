"""Transfers between shards (TCC) against the real cluster: posting, refusals,
pending amounts, deadlines, the pending timeout, and conservation."""

import concurrent.futures
import time

import grpc
import psycopg
import pytest

from corebank.v1 import accounts_pb2, payments_pb2, transfers_pb2
from services.storage.audit import audit_cluster
from tests.conftest import TEST_PENDING_TIMEOUT_SECONDS
from tests.fixtures.ledger import failure

FINAL_POLLS_MAX = 200
POLL_INTERVAL_SECONDS = 0.1


@pytest.fixture
def across(ledger, shard_map):
    """A funded payer on one shard, an empty payee on another, and the payee's shard."""
    payer = ledger.funded(10_000, shard_map.shards[0].name)
    payee = ledger.open(shard=shard_map.shards[1].name)
    return payer, payee, shard_map.shards[1]


def get_transfer(ledger, transfer_id):
    return ledger.payments.GetTransfer(payments_pb2.GetTransferRequest(transfer_id=transfer_id))


def wait_until_final(ledger, transfer_id):
    for _ in range(FINAL_POLLS_MAX):
        transfer = get_transfer(ledger, transfer_id)
        if transfer.status != transfers_pb2.PENDING:
            return transfer
        time.sleep(POLL_INTERVAL_SECONDS)
    raise AssertionError(f"{transfer_id} still PENDING after {FINAL_POLLS_MAX * POLL_INTERVAL_SECONDS}s")


def assert_quiet_ledger_holds(cluster):
    audit = audit_cluster(cluster["shards"])
    assert audit.violations() == []


def test_a_transfer_between_shards_posts_both_sides(ledger, across, cluster):
    payer, payee, _ = across
    transfer = ledger.transfer(payer.account_id, payee.account_id, 2_500, reference="invoice 7")
    assert (transfer.status, transfer.debit_account_id, transfer.credit_account_id) == (
        transfers_pb2.POSTED, payer.account_id, payee.account_id,
    )
    payer_now, payee_now = ledger.get(payer.account_id), ledger.get(payee.account_id)
    assert (payer_now.balance_minor, payer_now.debits_pending_minor, payer_now.available_minor) == (7_500, 0, 7_500)
    assert (payee_now.balance_minor, payee_now.credits_pending_minor) == (2_500, 0)
    assert get_transfer(ledger, transfer.transfer_id) == transfer
    for account in (payer, payee):  # both statements show it, newest first
        page = ledger.accounts.ListAccountTransfers(accounts_pb2.ListAccountTransfersRequest(account_id=account.account_id))
        assert page.transfers[0].transfer_id == transfer.transfer_id
        assert page.transfers[0].status == transfers_pb2.POSTED
    assert_quiet_ledger_holds(cluster)


def test_a_retry_returns_the_outcome_and_a_reused_id_names_the_conflict(ledger, across):
    payer, payee, _ = across
    transfer_id = ledger.unique_id("x-retry")
    first = ledger.transfer(payer.account_id, payee.account_id, 300, transfer_id=transfer_id)
    assert ledger.transfer(payer.account_id, payee.account_id, 300, transfer_id=transfer_id) == first
    with pytest.raises(grpc.RpcError) as raised:
        ledger.transfer(payer.account_id, payee.account_id, 301, transfer_id=transfer_id)
    code, reason, metadata = failure(raised.value)
    assert (code, reason, metadata["conflicting_fields"]) == (grpc.StatusCode.ALREADY_EXISTS, "IDEMPOTENCY_CONFLICT", "amount_minor")
    assert ledger.get(payer.account_id).balance_minor == 9_700


def test_a_debit_refusal_reserves_nothing(ledger, across, cluster):
    payer, payee, _ = across
    transfer_id = ledger.unique_id("x-poor")
    with pytest.raises(grpc.RpcError) as raised:
        ledger.transfer(payer.account_id, payee.account_id, 10_001, transfer_id=transfer_id)
    assert failure(raised.value)[:2] == (grpc.StatusCode.FAILED_PRECONDITION, "INSUFFICIENT_FUNDS")
    stored = get_transfer(ledger, transfer_id)
    assert (stored.status, stored.reason) == (transfers_pb2.REJECTED, "INSUFFICIENT_FUNDS")
    assert ledger.get(payer.account_id).available_minor == 10_000
    assert_quiet_ledger_holds(cluster)


@pytest.mark.parametrize("payee_status, reason", [(accounts_pb2.FROZEN, "ACCOUNT_FROZEN"), (accounts_pb2.BLOCK_CREDIT, "ACCOUNT_CREDIT_BLOCKED")])
def test_a_credit_refusal_releases_the_reserved_debit(ledger, across, cluster, payee_status, reason):
    payer, payee, _ = across
    ledger.accounts.UpdateAccountStatus(accounts_pb2.UpdateAccountStatusRequest(account_id=payee.account_id, status=payee_status))
    transfer_id = ledger.unique_id("x-refused")
    with pytest.raises(grpc.RpcError) as raised:
        ledger.transfer(payer.account_id, payee.account_id, 1_000, transfer_id=transfer_id)
    assert failure(raised.value)[:2] == (grpc.StatusCode.FAILED_PRECONDITION, reason)
    stored = get_transfer(ledger, transfer_id)
    assert (stored.status, stored.reason) == (transfers_pb2.REJECTED, reason)
    payer_now = ledger.get(payer.account_id)
    assert (payer_now.balance_minor, payer_now.available_minor, payer_now.debits_pending_minor) == (10_000, 10_000, 0)
    with pytest.raises(grpc.RpcError) as raised:  # the retry gets the same answer
        ledger.transfer(payer.account_id, payee.account_id, 1_000, transfer_id=transfer_id)
    assert failure(raised.value)[1] == reason
    assert_quiet_ledger_holds(cluster)


def test_an_unknown_payee_on_another_shard(ledger, across, shard_map):
    payer, _, payee_shard = across
    ghost = "acc_" + "b" * 26
    while ledger.shard_of(ghost) != payee_shard.name:
        ghost = ghost[:-1] + chr(ord(ghost[-1]) + 1)
    with pytest.raises(grpc.RpcError) as raised:
        ledger.transfer(payer.account_id, ghost, 10)
    assert failure(raised.value)[:2] == (grpc.StatusCode.NOT_FOUND, "ACCOUNT_NOT_FOUND")
    assert ledger.get(payer.account_id).available_minor == 10_000


def transfer_in_background(ledger, payer, payee, amount, transfer_id, timeout):
    pool = concurrent.futures.ThreadPoolExecutor(1)
    return pool, pool.submit(ledger.transfer, payer.account_id, payee.account_id, amount, transfer_id=transfer_id, timeout=timeout)


def test_pending_amounts_show_while_in_flight_and_a_passed_deadline_does_not_stop_the_transfer(ledger, across, cluster):
    payer, payee, payee_shard = across
    transfer_id = ledger.unique_id("x-slow")
    with psycopg.connect(payee_shard.dsn) as blocker:
        # Hold the payee's row: the credit branch's try waits, the transfer stays PENDING.
        blocker.execute("SELECT 1 FROM accounts WHERE account_id = %s FOR UPDATE", [payee.account_id])
        pool, call = transfer_in_background(ledger, payer, payee, 700, transfer_id, timeout=1.0)
        with pytest.raises(grpc.RpcError) as raised:
            call.result()
        pool.shutdown()
        assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert get_transfer(ledger, transfer_id).status == transfers_pb2.PENDING
        payer_now = ledger.get(payer.account_id)
        assert (payer_now.balance_minor, payer_now.debits_pending_minor, payer_now.available_minor) == (10_000, 700, 9_300)
        blocker.rollback()
    assert wait_until_final(ledger, transfer_id).status == transfers_pb2.POSTED
    assert ledger.transfer(payer.account_id, payee.account_id, 700, transfer_id=transfer_id).status == transfers_pb2.POSTED
    assert ledger.get(payee.account_id).balance_minor == 700
    assert_quiet_ledger_holds(cluster)


def test_a_transfer_not_confirmed_within_its_pending_timeout_is_voided(ledger, across, cluster):
    payer, payee, payee_shard = across
    transfer_id = ledger.unique_id("x-timeout")
    with psycopg.connect(payee_shard.dsn) as blocker:
        blocker.execute("SELECT 1 FROM accounts WHERE account_id = %s FOR UPDATE", [payee.account_id])
        pool, call = transfer_in_background(ledger, payer, payee, 500, transfer_id, timeout=TEST_PENDING_TIMEOUT_SECONDS + 20)
        time.sleep(TEST_PENDING_TIMEOUT_SECONDS + 1)
        assert ledger.get(payer.account_id).debits_pending_minor == 500  # still held while the payee is locked
        blocker.rollback()
    with pytest.raises(grpc.RpcError) as raised:
        call.result()
    pool.shutdown()
    code, reason, metadata = failure(raised.value)
    assert (code, reason, metadata["cause"]) == (grpc.StatusCode.ABORTED, "TRANSFER_VOIDED", "PENDING_TIMEOUT")
    stored = wait_until_final(ledger, transfer_id)
    assert (stored.status, stored.reason) == (transfers_pb2.VOIDED, "PENDING_TIMEOUT")
    payer_now, payee_now = ledger.get(payer.account_id), ledger.get(payee.account_id)
    assert (payer_now.balance_minor, payer_now.available_minor, payee_now.balance_minor, payee_now.credits_pending_minor) == (10_000, 10_000, 0, 0)
    assert_quiet_ledger_holds(cluster)
