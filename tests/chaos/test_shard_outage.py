"""While one shard is down, the others keep serving; what touched the down shard ends
final once it is back."""

import time

import grpc
import pytest

from corebank.v1 import accounts_pb2, payments_pb2, transfers_pb2
from services.storage.audit import audit_cluster
from tests.fixtures import faults

CALL_TIMEOUT_SECONDS = 5.0
FINAL_WITHIN_SECONDS = 60.0
POLL_INTERVAL_SECONDS = 0.2


def wait_until_final(ledger, transfer_id):
    started = time.monotonic()
    while time.monotonic() - started < FINAL_WITHIN_SECONDS:
        try:
            transfer = ledger.payments.GetTransfer(payments_pb2.GetTransferRequest(transfer_id=transfer_id))
            if transfer.status != transfers_pb2.PENDING:
                return transfer
        except grpc.RpcError:
            pass
        time.sleep(POLL_INTERVAL_SECONDS)
    raise AssertionError(f"{transfer_id} not final {FINAL_WITHIN_SECONDS}s after the shard came back")


@pytest.mark.parametrize("outage", ["crashed", "frozen"])
def test_the_other_shards_keep_serving_while_one_is_down(cluster, cluster_control, ledger, shard_map, outage):
    first, second, down = (shard.name for shard in shard_map.shards[:3])
    payer, payee = ledger.funded(5_000, first), ledger.open(shard=first)
    elsewhere, stranded = ledger.open(shard=second), ledger.open(shard=down)
    earlier = ledger.transfer(payer.account_id, payee.account_id, 100)
    outage_context = faults.shard_crashed if outage == "crashed" else faults.shard_frozen
    up_id = ledger.unique_id_on  # an id registered (bank-wide uniqueness) on a shard that is up
    with outage_context(cluster_control, down):
        # Same-shard and between-shard work that does not touch the down shard goes on.
        assert ledger.transfer(
            payer.account_id, payee.account_id, 200, transfer_id=up_id("same", first), timeout=CALL_TIMEOUT_SECONDS
        ).status == transfers_pb2.POSTED
        assert ledger.transfer(
            payer.account_id, elsewhere.account_id, 300, transfer_id=up_id("between", second), timeout=CALL_TIMEOUT_SECONDS
        ).status == transfers_pb2.POSTED
        # A transfer whose id is registered on the down shard cannot be checked for reuse now:
        # it is refused as an outage and leaves nothing behind (a retry later completes it).
        registered_down = ledger.unique_id_on("registered-down", down)
        with pytest.raises(grpc.RpcError) as refused:
            ledger.transfer(payer.account_id, payee.account_id, 50, transfer_id=registered_down, timeout=2.0)
        assert refused.value.code() in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE)
        read = ledger.accounts.GetAccount(accounts_pb2.GetAccountRequest(account_id=payer.account_id), timeout=CALL_TIMEOUT_SECONDS)
        assert read.balance_minor == 5_000 - 600
        found = ledger.payments.GetTransfer(payments_pb2.GetTransferRequest(transfer_id=earlier.transfer_id), timeout=CALL_TIMEOUT_SECONDS)
        assert found.status == transfers_pb2.POSTED
        # A transfer to the down shard cannot finish now: its outcome is unknown to the client.
        stranded_id = up_id("stranded", first)
        with pytest.raises(grpc.RpcError) as raised:
            ledger.transfer(payer.account_id, stranded.account_id, 400, transfer_id=stranded_id, timeout=2.0)
        assert raised.value.code() in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE)
    assert ledger.transfer(payer.account_id, payee.account_id, 50, transfer_id=registered_down).status == transfers_pb2.POSTED
    try:
        ledger.payments.GetTransfer(payments_pb2.GetTransferRequest(transfer_id=stranded_id), timeout=CALL_TIMEOUT_SECONDS)
    except grpc.RpcError as error:
        # Refused before anything was recorded: the service could not learn the payee account's
        # participant (its shard was down and the account not in this worker's cache), and a
        # transfer between shards never begins without knowing whether it is cleared. Its retry
        # with the same id, now, posts it.
        assert error.code() == grpc.StatusCode.NOT_FOUND
        ledger.transfer(payer.account_id, stranded.account_id, 400, transfer_id=stranded_id)
    final = wait_until_final(ledger, stranded_id)
    # Back in time it posts; past the pending timeout it is voided. Either way, all or nothing.
    assert final.status in (transfers_pb2.POSTED, transfers_pb2.VOIDED)
    expected_payer = 5_000 - 650 - (400 if final.status == transfers_pb2.POSTED else 0)
    assert ledger.get(payer.account_id).balance_minor == expected_payer
    assert ledger.get(payer.account_id).debits_pending_minor == 0
    assert ledger.get(stranded.account_id).balance_minor == (400 if final.status == transfers_pb2.POSTED else 0)
    assert audit_cluster(cluster["shards"]).violations() == []
