"""A merchant that collects on every shard: buyers on every shard pay it, the money is
exact at every moment (swept + collecting), sweeps bring it home, refunds work."""

import concurrent.futures
import time

import grpc
import psycopg
import pytest

from corebank.v1 import accounts_pb2, payments_pb2, transfers_pb2
from services.coordinator.recovery import RECOVERY_SCAN_INTERVAL_SECONDS
from services.storage.audit import audit_cluster
from tests.fixtures.ledger import failure

BUYERS_PER_SHARD = 6
PAYMENTS_PER_BUYER = 5
PRICE_MINOR = 1_999
SWEEP_POLLS_MAX = 100


@pytest.fixture
def merchant(ledger):
    return ledger.open(kind=accounts_pb2.MERCHANT, tier=3, collect_on_every_shard=True)


def wait_until_swept(ledger, merchant_id):
    for _ in range(SWEEP_POLLS_MAX):
        account = ledger.get(merchant_id)
        if account.collecting_minor == 0:
            return account
        time.sleep(RECOVERY_SCAN_INTERVAL_SECONDS / 4)
    raise AssertionError(f"{merchant_id} still collecting {account.collecting_minor} after {SWEEP_POLLS_MAX} polls")


def test_a_collecting_merchant_has_a_sub_account_on_every_shard(merchant, cluster, shard_map):
    assert merchant.account_id.startswith("hot_") and merchant.collect_on_every_shard
    for shard in cluster["shards"]:
        with psycopg.connect(shard["dsn"]) as connection:
            subs = connection.execute(
                "SELECT account_id, kind, tier, status FROM accounts WHERE parent_account_id = %s", [merchant.account_id]
            ).fetchall()
        assert len(subs) == 1 and subs[0][1:] == (accounts_pb2.MERCHANT, 3, accounts_pb2.ACTIVE)
        assert shard_map.shard_name_for_key(subs[0][0]) == shard["name"]


def test_only_merchants_collect_on_every_shard(ledger):
    with pytest.raises(grpc.RpcError) as raised:
        ledger.open(kind=accounts_pb2.CUSTOMER, collect_on_every_shard=True)
    assert failure(raised.value)[:2] == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_FIELD")


def test_buyers_on_every_shard_pay_one_merchant_exactly(ledger, shard_map, merchant, cluster):
    buyers = [ledger.funded(PRICE_MINOR * PAYMENTS_PER_BUYER, shard.name) for shard in shard_map.shards for _ in range(BUYERS_PER_SHARD)]

    def pay(buyer):
        return [ledger.transfer(buyer.account_id, merchant.account_id, PRICE_MINOR, reference="order") for _ in range(PAYMENTS_PER_BUYER)]

    with concurrent.futures.ThreadPoolExecutor(len(buyers)) as pool:
        payments = [payment for result in pool.map(pay, buyers) for payment in result]
    total_minor = PRICE_MINOR * len(payments)
    assert all(p.status == transfers_pb2.POSTED and p.credit_account_id == merchant.account_id for p in payments)
    # Exact at every moment: swept plus collecting is everything paid so far.
    now = ledger.get(merchant.account_id)
    assert now.balance_minor + now.collecting_minor == total_minor
    # Each payment is traceable to its buyer, by id, naming the merchant.
    sample = ledger.payments.GetTransfer(payments_pb2.GetTransferRequest(transfer_id=payments[-1].transfer_id))
    assert (sample.debit_account_id, sample.credit_account_id) == (payments[-1].debit_account_id, merchant.account_id)
    swept = wait_until_swept(ledger, merchant.account_id)
    assert swept.balance_minor == total_minor
    assert all(ledger.get(b.account_id).balance_minor == 0 for b in buyers)
    # A refund from the merchant reaches a buyer on any shard.
    refund = ledger.transfer(merchant.account_id, buyers[-1].account_id, PRICE_MINOR, reference="refund")
    assert refund.status == transfers_pb2.POSTED
    assert ledger.get(buyers[-1].account_id).balance_minor == PRICE_MINOR
    audit = audit_cluster(cluster["shards"])
    assert audit.violations() == []


def test_a_frozen_collecting_merchant_refuses_payments_on_every_shard(ledger, shard_map, merchant):
    ledger.accounts.UpdateAccountStatus(accounts_pb2.UpdateAccountStatusRequest(account_id=merchant.account_id, status=accounts_pb2.FROZEN))
    for shard in shard_map.shards:
        buyer = ledger.funded(100, shard.name)
        with pytest.raises(grpc.RpcError) as raised:
            ledger.transfer(buyer.account_id, merchant.account_id, 100)
        assert failure(raised.value)[1] == "ACCOUNT_FROZEN"
        assert ledger.get(buyer.account_id).balance_minor == 100


def test_a_collecting_merchant_closes_only_once_everything_is_swept_and_paid_out(ledger, shard_map, merchant):
    buyer = ledger.funded(500, shard_map.shards[0].name)
    ledger.transfer(buyer.account_id, merchant.account_id, 500)
    swept = wait_until_swept(ledger, merchant.account_id)
    with pytest.raises(grpc.RpcError) as raised:
        ledger.accounts.CloseAccount(accounts_pb2.CloseAccountRequest(account_id=merchant.account_id))
    assert failure(raised.value)[1] == "ACCOUNT_BALANCE_NOT_ZERO"
    ledger.transfer(merchant.account_id, buyer.account_id, swept.balance_minor)
    closed = ledger.accounts.CloseAccount(accounts_pb2.CloseAccountRequest(account_id=merchant.account_id))
    assert closed.status == accounts_pb2.CLOSED
    with pytest.raises(grpc.RpcError) as raised:
        ledger.transfer(buyer.account_id, merchant.account_id, 1)
    assert failure(raised.value)[1] == "ACCOUNT_CLOSED"


READING_INTERVAL_SECONDS = 0.05
PAYING_SECONDS = 4.0


def test_the_merchant_total_is_exact_at_every_reading_while_sweeps_run(ledger, shard_map, merchant):
    """Every reading of balance + collecting lies between what was acknowledged before it
    and what had been sent by its end: sweeps moving money in between never show."""
    import threading

    buyers = [ledger.funded(1_000_000, shard.name) for shard in shard_map.shards for _ in range(3)]
    lock = threading.Lock()
    sent_minor = [0]
    acknowledged_minor = [0]
    stop = threading.Event()

    def pay(buyer):
        while not stop.is_set():
            with lock:
                sent_minor[0] += 7
            ledger.transfer(buyer.account_id, merchant.account_id, 7)
            with lock:
                acknowledged_minor[0] += 7

    readings = []

    def read():
        while not stop.is_set():
            with lock:
                acknowledged_before = acknowledged_minor[0]
            account = ledger.get(merchant.account_id)
            with lock:
                sent_by_end = sent_minor[0]
            readings.append((acknowledged_before, account.balance_minor + account.collecting_minor, sent_by_end, account.balance_minor))
            time.sleep(READING_INTERVAL_SECONDS)

    threads = [threading.Thread(target=pay, args=(buyer,)) for buyer in buyers] + [threading.Thread(target=read)]
    for thread in threads:
        thread.start()
    time.sleep(PAYING_SECONDS)
    stop.set()
    for thread in threads:
        thread.join()
    assert len(readings) > 10
    assert any(balance > 0 for *_, balance in readings), "no sweep happened while paying: the test saw nothing move"
    bad = [(low, total, high) for low, total, high, _ in readings if not low <= total <= high]
    assert bad == []
    assert wait_until_swept(ledger, merchant.account_id).balance_minor == acknowledged_minor[0]
