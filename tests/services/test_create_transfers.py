"""Payments.CreateTransfers against the real cluster: per-transfer results in order,
neighbours unaffected by refusals, linked chains, idempotency, and group commit."""

import concurrent.futures

import grpc
import psycopg
import pytest
from google.rpc import error_details_pb2

from corebank.v1 import accounts_pb2, payments_pb2, transfers_pb2
from services.ledger_service import CREATE_TRANSFERS_BATCH_SIZE_MAX
from services.storage.audit import audit_cluster
from tests.fixtures.ledger import failure

CONCURRENT_CLIENTS = 48
TRANSFERS_PER_CLIENT = 10


def request(ledger, debit, credit, amount, **fields):
    return payments_pb2.TransferRequest(
        transfer_id=fields.pop("transfer_id", None) or ledger.unique_id("b"), debit_account_id=debit.account_id,
        credit_account_id=credit.account_id, amount_minor=amount, currency="USD", **fields,
    )


def reason(result) -> str:
    info = error_details_pb2.ErrorInfo()
    assert result.HasField("error") and result.error.details[0].Unpack(info)
    return info.reason


def create(ledger, requests):
    return ledger.payments.CreateTransfers(payments_pb2.CreateTransfersRequest(transfers=requests), timeout=30).results


def test_one_result_per_transfer_in_order_and_a_refusal_fails_no_neighbour(ledger, shard_map, cluster):
    shard, other = shard_map.shards[0].name, shard_map.shards[1].name
    payer, payee, far = ledger.funded(1_000, shard), ledger.open(shard=shard), ledger.open(shard=other)
    requests = [
        request(ledger, payer, payee, 100),
        request(ledger, payer, payee, 5_000),  # more than the payer has
        request(ledger, payer, payee, 0),  # malformed
        request(ledger, payer, far, 200),  # between shards
        request(ledger, payer, payee, 300),
    ]
    results = create(ledger, requests)
    assert len(results) == 5
    assert [r.transfer.transfer_id for r in results if r.HasField("transfer")] == [requests[i].transfer_id for i in (0, 3, 4)]
    assert [reason(results[1]), reason(results[2])] == ["INSUFFICIENT_FUNDS", "INVALID_AMOUNT"]
    assert results[1].error.code == grpc.StatusCode.FAILED_PRECONDITION.value[0]
    assert all(results[i].transfer.status == transfers_pb2.POSTED for i in (0, 3, 4))
    assert (ledger.get(payer.account_id).balance_minor, ledger.get(payee.account_id).balance_minor) == (400, 400)
    # Same idempotency as Transfer: the whole call again returns the same answers, changing nothing.
    again = create(ledger, requests)
    assert [r.HasField("transfer") for r in again] == [r.HasField("transfer") for r in results]
    assert [r.transfer.transfer_id for r in again if r.HasField("transfer")] == [r.transfer.transfer_id for r in results if r.HasField("transfer")]
    assert reason(again[1]) == "INSUFFICIENT_FUNDS"
    assert ledger.get(payer.account_id).balance_minor == 400
    assert audit_cluster(cluster["shards"]).violations() == []


def test_later_transfers_see_earlier_ones_of_the_same_call(ledger, shard_map):
    shard = shard_map.shards[2].name
    first, second, third = ledger.funded(500, shard), ledger.open(shard=shard), ledger.open(shard=shard)
    results = create(ledger, [request(ledger, first, second, 500), request(ledger, second, third, 500), request(ledger, second, third, 1)])
    assert [r.HasField("transfer") for r in results] == [True, True, False]
    assert reason(results[2]) == "INSUFFICIENT_FUNDS"


def test_a_linked_chain_posts_whole(ledger, shard_map):
    shard = shard_map.shards[1].name
    payer, fee, payee = ledger.funded(1_000, shard), ledger.open(shard=shard), ledger.open(shard=shard)
    results = create(ledger, [request(ledger, payer, payee, 600, linked=True), request(ledger, payer, fee, 50)])
    assert all(r.transfer.status == transfers_pb2.POSTED for r in results)
    assert ledger.get(payer.account_id).balance_minor == 350


def test_a_linked_chain_with_one_refusal_applies_nothing(ledger, shard_map, cluster):
    shard = shard_map.shards[1].name
    payer, fee, payee = ledger.funded(1_000, shard), ledger.open(shard=shard), ledger.open(shard=shard)
    chain = [request(ledger, payer, payee, 600, linked=True), request(ledger, payer, fee, 500, linked=True), request(ledger, payee, fee, 1)]
    alone = request(ledger, payer, fee, 10)  # after the chain: not part of it
    results = create(ledger, [*chain, alone])
    assert [reason(r) for r in results[:3]] == ["LINKED_TRANSFER_FAILED", "INSUFFICIENT_FUNDS", "LINKED_TRANSFER_FAILED"]
    assert results[3].transfer.status == transfers_pb2.POSTED
    assert (ledger.get(payer.account_id).balance_minor, ledger.get(payee.account_id).balance_minor) == (990, 0)
    stored = ledger.payments.GetTransfer(payments_pb2.GetTransferRequest(transfer_id=chain[0].transfer_id))
    assert (stored.status, stored.reason) == (transfers_pb2.REJECTED, "LINKED_TRANSFER_FAILED")
    assert reason(create(ledger, chain)[0]) == "LINKED_TRANSFER_FAILED"  # retried: same answer
    assert audit_cluster(cluster["shards"]).violations() == []


def test_chains_must_close_and_stay_on_one_shard(ledger, shard_map):
    payer = ledger.funded(1_000, shard_map.shards[0].name)
    near, far = ledger.open(shard=shard_map.shards[0].name), ledger.open(shard=shard_map.shards[2].name)
    open_chain = create(ledger, [request(ledger, payer, near, 1, linked=True)])
    assert reason(open_chain[0]) == "LINKED_CHAIN_OPEN"
    spanning = create(ledger, [request(ledger, payer, near, 1, linked=True), request(ledger, payer, far, 1)])
    assert [reason(r) for r in spanning] == ["LINKED_CHAIN_SPANS_SHARDS"] * 2
    with pytest.raises(grpc.RpcError) as raised:
        ledger.transfer(payer.account_id, near.account_id, 1, linked=True)
    assert failure(raised.value)[:2] == (grpc.StatusCode.INVALID_ARGUMENT, "LINKED_CHAIN_OPEN")
    assert ledger.get(payer.account_id).balance_minor == 1_000


def test_a_call_over_the_size_limit_is_refused_whole(ledger, shard_map):
    payer, payee = ledger.funded(10, shard_map.shards[0].name), ledger.open(shard=shard_map.shards[0].name)
    requests = [request(ledger, payer, payee, 1) for _ in range(CREATE_TRANSFERS_BATCH_SIZE_MAX + 1)]
    with pytest.raises(grpc.RpcError) as raised:
        create(ledger, requests)
    assert failure(raised.value)[:2] == (grpc.StatusCode.INVALID_ARGUMENT, "BATCH_TOO_LARGE")
    assert ledger.get(payer.account_id).balance_minor == 10


def test_a_full_size_call_posts_every_transfer(ledger, shard_map, cluster):
    shard = shard_map.shards[0].name
    payers = [ledger.funded(10_000, shard) for _ in range(10)]
    payees = [ledger.open(shard=shard) for _ in range(10)]
    requests = [request(ledger, payers[n % 10], payees[(n * 7) % 10], 1) for n in range(CREATE_TRANSFERS_BATCH_SIZE_MAX)]
    results = create(ledger, requests)
    assert all(r.transfer.status == transfers_pb2.POSTED for r in results)
    assert sum(ledger.get(p.account_id).balance_minor for p in payees) == CREATE_TRANSFERS_BATCH_SIZE_MAX
    assert audit_cluster(cluster["shards"]).violations() == []


def inserting_transactions(dsn: str, transfer_ids: list[str]) -> int:
    """How many database transactions wrote these rows: xmin is the inserting transaction's id."""
    with psycopg.connect(dsn) as connection:
        return connection.execute(
            "SELECT count(DISTINCT xmin::text) FROM transfers WHERE transfer_id = ANY(%s)", [transfer_ids]
        ).fetchone()[0]


def test_concurrent_single_transfers_share_commits(ledger, shard_map):
    """Group commit: many clients' Transfer calls on one shard take fewer transactions than transfers."""
    shard = shard_map.shards[2]
    payers = [ledger.funded(1_000, shard.name) for _ in range(CONCURRENT_CLIENTS)]
    payee = ledger.open(shard=shard.name)

    def pay(payer):
        return [ledger.transfer(payer.account_id, payee.account_id, 1) for _ in range(TRANSFERS_PER_CLIENT)]

    with concurrent.futures.ThreadPoolExecutor(CONCURRENT_CLIENTS) as pool:
        posted = [transfer for result in pool.map(pay, payers) for transfer in result]
    transfers = CONCURRENT_CLIENTS * TRANSFERS_PER_CLIENT
    transactions = inserting_transactions(shard.dsn, [transfer.transfer_id for transfer in posted])
    print(f"{transfers} transfers in {transactions} transactions")
    assert [transfer.status for transfer in posted] == [transfers_pb2.POSTED] * transfers
    assert ledger.get(payee.account_id).balance_minor == transfers
    assert 0 < transactions < transfers


BETWEEN_SHARDS_BATCH = 600


def test_transfers_between_shards_of_one_call_share_a_few_transactions_and_each_keeps_its_outcome(ledger, shard_map, cluster):
    """A call's transfers between shards are begun and settled together: a handful of transactions
    per shard (read from the rows' inserting transactions), every refusal its own, and the money
    exactly where the answers say, checked from the databases."""
    debit_shard, credit_shard = shard_map.shards[0], shard_map.shards[1]
    payers = [ledger.funded(1_000, debit_shard.name) for _ in range(6)]
    payees = [ledger.open(shard=credit_shard.name) for _ in range(6)]
    frozen = ledger.open(shard=credit_shard.name)
    ledger.accounts.UpdateAccountStatus(accounts_pb2.UpdateAccountStatusRequest(account_id=frozen.account_id, status=accounts_pb2.FROZEN))
    requests = []
    for n in range(BETWEEN_SHARDS_BATCH):
        payee = frozen if n % 50 == 7 else payees[n % 6]
        requests.append(request(ledger, payers[n % 6], payee, 900 if n % 97 == 3 else 1))
    results = create(ledger, requests)
    posted = [n for n, result in enumerate(results) if result.HasField("transfer") and result.transfer.status == transfers_pb2.POSTED]
    refused = {n: reason(result) for n, result in enumerate(results) if result.HasField("error")}
    assert len(posted) + len(refused) == BETWEEN_SHARDS_BATCH
    assert all(refused.get(n) == "ACCOUNT_FROZEN" for n in range(BETWEEN_SHARDS_BATCH) if n % 50 == 7)
    assert set(refused.values()) <= {"ACCOUNT_FROZEN", "INSUFFICIENT_FUNDS"} and "INSUFFICIENT_FUNDS" in refused.values()
    # The money is where the answers say: every payee holds what was posted to it.
    for index, payee in enumerate(payees):
        expected = sum(requests[n].amount_minor for n in posted if n % 6 == index)
        assert ledger.get(payee.account_id).balance_minor == expected
    assert ledger.get(frozen.account_id).balance_minor == 0
    # Batched: the credit branches were written by a few transactions, not one each.
    credited = [requests[n].transfer_id for n in posted]
    assert inserting_transactions(credit_shard.dsn, credited) <= len(credited) // 20
    # A retry of the whole call answers the same and moves nothing.
    again = create(ledger, requests)
    assert [r.HasField("transfer") for r in again] == [r.HasField("transfer") for r in results]
    assert sum(ledger.get(p.account_id).balance_minor for p in payees) == sum(requests[n].amount_minor for n in posted)
    assert audit_cluster(cluster["shards"]).violations() == []


def test_a_chain_refused_for_a_reused_id_claims_none_of_its_other_ids(ledger, shard_map, cluster):
    """A linked chain whose member reuses an id with other fields is refused whole before any of
    its ids is claimed: its new ids stay free (no id_registry row on any shard) and can be used
    with other fields afterwards (helper review of issue 9)."""
    shard = shard_map.shards[0].name
    payer, payee = ledger.funded(1_000, shard), ledger.open(shard=shard)
    earlier = ledger.transfer(payer.account_id, payee.account_id, 1)
    # Several fresh ids, so that some have their registry on another shard than the debit's.
    fresh = [ledger.unique_id("chain-fresh") for _ in range(6)]
    requests = [request(ledger, payer, payee, 1, transfer_id=transfer_id, linked=True) for transfer_id in fresh]
    requests.append(request(ledger, payer, payee, 2, transfer_id=earlier.transfer_id))  # same id, other amount
    results = create(ledger, requests)
    assert [reason(r) for r in results] == ["LINKED_TRANSFER_FAILED"] * len(fresh) + ["IDEMPOTENCY_CONFLICT"]
    for shard_entry in cluster["shards"]:
        with psycopg.connect(shard_entry["dsn"]) as connection:
            claimed = connection.execute("SELECT id FROM id_registry WHERE id = ANY(%s)", [fresh]).fetchall()
        assert claimed == [], f"{shard_entry['name']} holds claims of a refused chain: {claimed}"
    again = create(ledger, [request(ledger, payer, payee, 3, transfer_id=fresh[0])])
    assert again[0].HasField("transfer") and again[0].transfer.status == transfers_pb2.POSTED
