"""corebank.v1.Payments against the real cluster: posting, refusals, idempotency."""

import grpc
import pytest

from corebank.v1 import accounts_pb2, payments_pb2, transfers_pb2
from services.ledger.limits import TierLimits
from services.ledger.money import INT64_MAX
from services.storage.audit import audit_cluster
from tests.fixtures.ledger import failure

TIER_0_USD = TierLimits.load().limit(0, "USD")


@pytest.fixture
def shard(shard_map):
    return shard_map.shards[0].name


def test_a_transfer_posts_both_sides_in_one_record(ledger, shard):
    payer, payee = ledger.funded(10_000, shard), ledger.open(shard=shard)
    transfer = ledger.transfer(payer.account_id, payee.account_id, 2_550, reference="rent")
    assert transfer.status == transfers_pb2.POSTED and transfer.reason == ""
    assert (transfer.amount_minor, transfer.currency, transfer.reference) == (2_550, "USD", "rent")
    assert transfer.created_at.seconds > 0 and transfer.finalized_at.seconds > 0
    payer, payee = ledger.get(payer.account_id), ledger.get(payee.account_id)
    assert (payer.balance_minor, payer.debits_posted_minor, payer.credits_posted_minor) == (7_450, 2_550, 10_000)
    assert (payee.balance_minor, payee.credits_posted_minor, payee.available_minor) == (2_550, 2_550, 2_550)
    assert ledger.payments.GetTransfer(payments_pb2.GetTransferRequest(transfer_id=transfer.transfer_id)) == transfer


def test_system_accounts_go_negative_and_each_currency_sums_to_zero(ledger, shard, cluster):
    bank = ledger.open(kind=accounts_pb2.SYSTEM, tier=0, currency="KWD", shard=shard)
    customer = ledger.open(currency="KWD", tier=1, shard=shard)
    ledger.transfer(bank.account_id, customer.account_id, 1_234, currency="KWD")
    assert ledger.get(bank.account_id).balance_minor == -1_234
    audit = audit_cluster(cluster["shards"])
    assert audit.balance_by_currency["KWD"] == 0
    assert audit.violations() == []


def test_a_retry_returns_the_original_outcome_and_changes_nothing(ledger, shard):
    payer, payee = ledger.funded(1_000, shard), ledger.open(shard=shard)
    transfer_id = ledger.unique_id("retry")
    first = ledger.transfer(payer.account_id, payee.account_id, 400, transfer_id=transfer_id)
    again = ledger.transfer(payer.account_id, payee.account_id, 400, transfer_id=transfer_id)
    assert again == first
    assert ledger.get(payer.account_id).balance_minor == 600


@pytest.mark.parametrize(
    "change, conflicting",
    [({"amount_minor": 401}, "amount_minor"), ({"reference": "other"}, "reference"), ({"swap": True}, "debit_account_id,credit_account_id")],
)
def test_a_reused_transfer_id_with_other_fields_names_the_conflict(ledger, shard, change, conflicting):
    payer, payee = ledger.funded(1_000, shard), ledger.funded(1_000, shard)
    transfer_id = ledger.unique_id("conflict")
    ledger.transfer(payer.account_id, payee.account_id, 400, transfer_id=transfer_id)
    debit, credit = (payee, payer) if change.pop("swap", False) else (payer, payee)
    fields = {"amount_minor": 400, **change}
    with pytest.raises(grpc.RpcError) as raised:
        ledger.transfer(debit.account_id, credit.account_id, fields.pop("amount_minor"), transfer_id=transfer_id, **fields)
    code, reason, metadata = failure(raised.value)
    assert (code, reason, metadata["conflicting_fields"]) == (grpc.StatusCode.ALREADY_EXISTS, "IDEMPOTENCY_CONFLICT", conflicting)
    assert ledger.get(payer.account_id).balance_minor == 600


def test_insufficient_funds_is_refused_recorded_and_replayed(ledger, shard):
    payer, payee = ledger.funded(100, shard), ledger.open(shard=shard)
    transfer_id = ledger.unique_id("poor")
    for _ in range(2):  # the retry gets the same answer, even once funds arrive
        with pytest.raises(grpc.RpcError) as raised:
            ledger.transfer(payer.account_id, payee.account_id, 101, transfer_id=transfer_id)
        assert failure(raised.value)[:2] == (grpc.StatusCode.FAILED_PRECONDITION, "INSUFFICIENT_FUNDS")
        ledger.transfer(ledger.bank(shard).account_id, payer.account_id, 1_000)
    stored = ledger.payments.GetTransfer(payments_pb2.GetTransferRequest(transfer_id=transfer_id))
    assert (stored.status, stored.reason) == (transfers_pb2.REJECTED, "INSUFFICIENT_FUNDS")
    assert ledger.get(payer.account_id).balance_minor == 2_100
    assert ledger.get(payee.account_id).balance_minor == 0


def test_unverified_tier_caps_balance_and_transfer_size(ledger, shard):
    wallet = ledger.open(tier=0, shard=shard)
    bank = ledger.bank(shard).account_id
    with pytest.raises(grpc.RpcError) as raised:
        ledger.transfer(bank, wallet.account_id, TIER_0_USD.transfer_cap_minor + 1)
    code, reason, metadata = failure(raised.value)
    assert (code, reason) == (grpc.StatusCode.FAILED_PRECONDITION, "LIMIT_EXCEEDED")
    assert (metadata["limit"], metadata["limit_minor"]) == ("TRANSFER_CAP", str(TIER_0_USD.transfer_cap_minor))
    deposits = TIER_0_USD.balance_cap_minor // TIER_0_USD.transfer_cap_minor
    for _ in range(deposits):
        ledger.transfer(bank, wallet.account_id, TIER_0_USD.transfer_cap_minor)
    with pytest.raises(grpc.RpcError) as raised:
        ledger.transfer(bank, wallet.account_id, 1)
    assert failure(raised.value)[1:] == (
        "LIMIT_EXCEEDED",
        {"account_id": wallet.account_id, "limit": "BALANCE_CAP", "limit_minor": str(TIER_0_USD.balance_cap_minor), "transfer_id": failure(raised.value)[2]["transfer_id"]},
    )
    assert ledger.get(wallet.account_id).balance_minor == TIER_0_USD.balance_cap_minor


def test_counters_that_would_overflow_int64_are_refused(ledger, shard):
    bank = ledger.open(kind=accounts_pb2.SYSTEM, tier=0, shard=shard)
    vault = ledger.open(kind=accounts_pb2.SYSTEM, tier=0, shard=shard)
    ledger.transfer(bank.account_id, vault.account_id, INT64_MAX)
    with pytest.raises(grpc.RpcError) as raised:
        ledger.transfer(bank.account_id, vault.account_id, 1)
    assert failure(raised.value)[:2] == (grpc.StatusCode.FAILED_PRECONDITION, "BALANCE_OVERFLOW")
    assert ledger.get(vault.account_id).balance_minor == INT64_MAX
    ledger.transfer(vault.account_id, bank.account_id, INT64_MAX)  # leave both at zero for the audits


def test_currency_mismatch(ledger, shard):
    payer, payee = ledger.funded(1_000, shard), ledger.open(currency="EUR", shard=shard)
    with pytest.raises(grpc.RpcError) as raised:
        ledger.transfer(payer.account_id, payee.account_id, 10)
    assert failure(raised.value)[:2] == (grpc.StatusCode.FAILED_PRECONDITION, "CURRENCY_MISMATCH")


def test_unknown_account_is_refused_and_recorded(ledger, shard):
    payer = ledger.funded(1_000, shard)
    ghost = "acc_" + "a" * 26
    while ledger.shard_of(ghost) != shard:
        ghost = ghost[:-1] + chr(ord(ghost[-1]) + 1)
    with pytest.raises(grpc.RpcError) as raised:
        ledger.transfer(payer.account_id, ghost, 10)
    code, reason, metadata = failure(raised.value)
    assert (code, reason, metadata["account_id"]) == (grpc.StatusCode.NOT_FOUND, "ACCOUNT_NOT_FOUND", ghost)
    assert ledger.get(payer.account_id).balance_minor == 1_000
