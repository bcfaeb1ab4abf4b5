"""Many concurrent clients, random transfers among few accounts, half of them between shards.

Afterwards every shard balances, each currency sums to zero, no customer is
negative, every transfer between shards is all or nothing, and every
acknowledged transfer is posted exactly once.
"""

import collections
import concurrent.futures
import random

import grpc
import psycopg

from corebank.v1 import payments_pb2, transfers_pb2
from services.storage.audit import audit_cluster
from tests.fixtures.ledger import failure

CLIENTS = 16
TRANSFERS_PER_CLIENT = 40
ACCOUNTS_PER_SHARD = 4  # few accounts: maximal lock contention
CROSS_SHARD_SHARE = 0.5
OPENING_BALANCE_MINOR = 1_000
SEED = 20261121


def test_concurrent_transfers_conserve_money_and_never_deadlock(ledger, shard_map, cluster):
    rng = random.Random(SEED)
    accounts_by_shard = {
        shard.name: [ledger.funded(OPENING_BALANCE_MINOR, shard.name).account_id for _ in range(ACCOUNTS_PER_SHARD)]
        for shard in shard_map.shards
    }
    plans = []
    for client in range(CLIENTS):
        plan = []
        for _ in range(TRANSFERS_PER_CLIENT):
            if rng.random() < CROSS_SHARD_SHARE:
                debit_shard, credit_shard = rng.sample(list(accounts_by_shard), 2)
                debit, credit = rng.choice(accounts_by_shard[debit_shard]), rng.choice(accounts_by_shard[credit_shard])
            else:
                debit, credit = rng.sample(accounts_by_shard[rng.choice(list(accounts_by_shard))], 2)
            # Large amounts relative to balances, so INSUFFICIENT_FUNDS races happen too.
            plan.append((ledger.unique_id(f"c{client}"), debit, credit, rng.randint(1, 600)))
        plans.append(plan)

    def run(plan):
        outcomes = []
        for transfer_id, debit, credit, amount in plan:
            try:
                transfer = ledger.transfer(debit, credit, amount, transfer_id=transfer_id, timeout=30)
                outcomes.append((transfer_id, "ok", transfer))
            except grpc.RpcError as error:
                code, reason, _ = failure(error)
                outcomes.append((transfer_id, reason if code == grpc.StatusCode.FAILED_PRECONDITION else f"unknown:{code.name}", None))
        return outcomes

    with concurrent.futures.ThreadPoolExecutor(CLIENTS) as pool:
        outcomes = [outcome for result in pool.map(run, plans) for outcome in result]

    by_kind = {}
    for _, kind, _ in outcomes:
        by_kind[kind] = by_kind.get(kind, 0) + 1
    assert set(by_kind) <= {"ok", "INSUFFICIENT_FUNDS"}, by_kind  # no deadlocks, timeouts or internal errors
    assert by_kind["ok"] > len(outcomes) // 4 and by_kind.get("INSUFFICIENT_FUNDS", 0) > 0, by_kind

    audit = audit_cluster(cluster["shards"])
    assert audit.violations() == []
    every_account = [account_id for accounts in accounts_by_shard.values() for account_id in accounts]
    assert all(ledger.get(account_id).balance_minor >= 0 for account_id in every_account)
    assert sum(ledger.get(account_id).balance_minor for account_id in every_account) == OPENING_BALANCE_MINOR * len(every_account)

    # Every acknowledged transfer is posted exactly once: one posted row on its shard, or
    # one per side between shards. Every refused one is REJECTED and posted nowhere.
    posted_rows = collections.Counter()
    for shard in cluster["shards"]:
        with psycopg.connect(shard["dsn"]) as connection:
            posted_rows.update(
                row[0] for row in connection.execute(
                    "SELECT transfer_id FROM transfers WHERE status = %s AND transfer_id = ANY(%s)",
                    [transfers_pb2.POSTED, [o[0] for o in outcomes]],
                )
            )
    sides = {transfer_id: 1 if ledger.shard_of(debit) == ledger.shard_of(credit) else 2 for plan in plans for transfer_id, debit, credit, _ in plan}
    for transfer_id, kind, _ in outcomes:
        stored = ledger.payments.GetTransfer(payments_pb2.GetTransferRequest(transfer_id=transfer_id))
        if kind == "ok":
            assert stored.status == transfers_pb2.POSTED and posted_rows[transfer_id] == sides[transfer_id], transfer_id
        else:
            assert (stored.status, stored.reason) == (transfers_pb2.REJECTED, kind) and posted_rows[transfer_id] == 0, transfer_id
    assert sum(1 for sides_count in sides.values() if sides_count == 2) >= len(sides) * 0.4
