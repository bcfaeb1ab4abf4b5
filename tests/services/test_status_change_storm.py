"""A storm of status changes on one collecting merchant does not starve its shard's pool.

A status change holds a pooled connection (waiting for, then holding, the merchant's row
lock) while it takes more for the sub-accounts. Unbounded, concurrent changes would each
hold a connection blocked on the row lock while the holder waits for one more, and every
other request of that process to the shard would get SHARD_UNAVAILABLE (found by review).
"""

from __future__ import annotations

import asyncio
import random

import grpc

from corebank.v1 import accounts_pb2, accounts_pb2_grpc, payments_pb2, payments_pb2_grpc
from corebank.v1 import transfers_pb2
from services.auth import client

STORM_CALLS = 40
VICTIM_TRANSFERS = 30


def test_a_status_change_storm_on_one_merchant_does_not_fail_unrelated_transfers(ledger, cluster):
    merchant = ledger.open(kind=accounts_pb2.MERCHANT, tier=3, collect_on_every_shard=True)
    shard = ledger.shard_of(merchant.account_id)
    bank = ledger.bank(shard)
    customer = ledger.open(shard=shard)

    async def run() -> list[str]:
        channel = client.channel(cluster, aio=True)
        accounts = accounts_pb2_grpc.AccountsStub(channel)
        payments = payments_pb2_grpc.PaymentsStub(channel)
        stop = asyncio.Event()

        async def storm() -> None:
            while not stop.is_set():
                status = random.choice([accounts_pb2.ACTIVE, accounts_pb2.FROZEN])
                try:
                    await accounts.UpdateAccountStatus(
                        accounts_pb2.UpdateAccountStatusRequest(account_id=merchant.account_id, status=status), timeout=10
                    )
                except grpc.RpcError:
                    pass

        async def victim() -> list[str]:
            failures = []
            for _ in range(VICTIM_TRANSFERS):
                try:
                    posted = await payments.Transfer(
                        payments_pb2.TransferRequest(
                            transfer_id=ledger.unique_id("victim"), debit_account_id=bank.account_id,
                            credit_account_id=customer.account_id, amount_minor=1, currency="USD",
                        ),
                        timeout=10,
                    )
                    assert posted.status == transfers_pb2.POSTED
                except grpc.RpcError as error:
                    failures.append(error.code().name)
                await asyncio.sleep(0.1)
            return failures

        storms = [asyncio.create_task(storm()) for _ in range(STORM_CALLS)]
        try:
            await asyncio.sleep(1.0)
            return await victim()
        finally:
            stop.set()
            await asyncio.gather(*storms)
            await channel.close()

    failures = asyncio.run(run())
    assert not failures, f"{len(failures)}/{VICTIM_TRANSFERS} unrelated transfers on {shard} failed: {sorted(set(failures))}"
