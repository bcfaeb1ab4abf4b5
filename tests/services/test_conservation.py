"""Many concurrent clients, random same-shard transfers among few accounts.

Afterwards every shard balances, each currency sums to zero, no customer is
negative, and every acknowledged transfer is posted exactly once.
"""

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

    # Every acknowledged transfer is stored once, POSTED; every refused one REJECTED, with no posting.
    acknowledged = {transfer_id for transfer_id, kind, _ in outcomes if kind == "ok"}
    stored = {}
    for shard in cluster["shards"]:
        with psycopg.connect(shard["dsn"]) as connection:
            stored.update(
                connection.execute(
                    "SELECT transfer_id, status FROM transfers WHERE transfer_id = ANY(%s)", [[o[0] for o in outcomes]]
                ).fetchall()
            )
    assert {t for t, status in stored.items() if status == transfers_pb2.POSTED} == acknowledged
    assert len(stored) == len(outcomes)
    sample = rng.choice(sorted(acknowledged))
    assert ledger.payments.GetTransfer(payments_pb2.GetTransferRequest(transfer_id=sample)).status == transfers_pb2.POSTED
