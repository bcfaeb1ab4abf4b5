"""A sub-account that a retried OpenAccount creates late follows the collecting merchant's
status as it is then, never as it was read before a concurrent freeze or close.

The sub-account's insert is held back with an uncommitted row of the same key on its shard
(a stand-in for a slow shard, or a first attempt that left the sub-account out) while
CloseAccount / UpdateAccountStatus(FROZEN) is called. Were the insert to land ACTIVE under a
CLOSED or FROZEN merchant, it would accept payments that can never be swept in (found by review).
"""

from __future__ import annotations

import threading
import time

import grpc
import psycopg
import pytest

from corebank.v1 import accounts_pb2, transfers_pb2
from services import collection
from services.ledger import ids

SUB_SHARD = "shard-2"


def _dsn(cluster: dict, shard: str) -> str:
    return next(s["dsn"] for s in cluster["shards"] if s["name"] == shard)


def _merchant_request_id(ledger, shard_map) -> tuple[str, str]:
    for _ in range(200):
        request_id = ledger.unique_id("hot")
        merchant_id = ids.account_id_for_request(request_id, True)
        if shard_map.shard_name_for_key(merchant_id) != SUB_SHARD:
            return request_id, merchant_id
    raise AssertionError("no merchant id off the sub-account's shard")


@pytest.mark.parametrize("change", ["close", "freeze"])
def test_a_missing_sub_account_created_late_follows_the_merchants_status(ledger, shard_map, cluster, change):
    request_id, merchant_id = _merchant_request_id(ledger, shard_map)
    sub_id = collection.collection_account_id(shard_map, SUB_SHARD, merchant_id)
    blocker = psycopg.connect(_dsn(cluster, SUB_SHARD))
    blocker.execute(
        "INSERT INTO accounts (account_id, request_id, owner_id, currency, kind, tier, status, collect_on_every_shard,"
        " parent_account_id) VALUES (%s, %s, 'owner', 'USD', 2, 3, 1, false, %s)",
        (sub_id, sub_id, merchant_id),
    )
    opened: dict = {}

    def open_merchant() -> None:
        try:
            opened["account"] = ledger.accounts.OpenAccount(
                accounts_pb2.OpenAccountRequest(
                    request_id=request_id, owner_id="owner", currency="USD", kind=accounts_pb2.MERCHANT, tier=3,
                    collect_on_every_shard=True,
                ),
                timeout=30,
            )
        except grpc.RpcError as error:
            opened["error"] = error

    opener = threading.Thread(target=open_merchant)
    opener.start()
    try:
        for _ in range(200):  # the merchant's own row is committed; its sub-account on SUB_SHARD is waiting
            try:
                ledger.get(merchant_id)
                break
            except grpc.RpcError:
                time.sleep(0.05)
        time.sleep(0.3)
        if change == "close":
            changed = ledger.accounts.CloseAccount(accounts_pb2.CloseAccountRequest(account_id=merchant_id))
            assert changed.status == accounts_pb2.CLOSED
        else:
            changed = ledger.accounts.UpdateAccountStatus(
                accounts_pb2.UpdateAccountStatusRequest(account_id=merchant_id, status=accounts_pb2.FROZEN)
            )
            assert changed.status == accounts_pb2.FROZEN
    finally:
        blocker.rollback()
        blocker.close()
        opener.join()

    # A buyer on the sub-account's shard pays the CLOSED / FROZEN merchant.
    buyer = ledger.funded(50_000, SUB_SHARD)
    try:
        paid = ledger.transfer(buyer.account_id, merchant_id, 12_345)
        accepted = paid.status == transfers_pb2.POSTED
    except grpc.RpcError:
        accepted = False
    merchant = ledger.get(merchant_id)
    assert not accepted, (
        f"a payment to a {accounts_pb2.AccountStatus.Name(merchant.status)} merchant was POSTED into its sub-account "
        f"{sub_id} (collecting_minor={merchant.collecting_minor}); it can never be swept in"
    )
