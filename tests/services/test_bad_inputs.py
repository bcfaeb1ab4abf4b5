"""Every bad input gets the right code and reason, and leaves the ledger unchanged."""

import grpc
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from corebank.v1 import accounts_pb2, payments_pb2
from services.ledger.money import CURRENCY_EXPONENTS
from tests.fixtures.ledger import failure

GRPC_EXAMPLES_MAX = 40  # each example is a real round trip
BAD_IDS = st.one_of(
    st.just(""),
    st.text(min_size=65, max_size=300),
    st.text(min_size=1, max_size=64).filter(lambda v: any(not (c.isascii() and (c.isalnum() or c in "._:-")) for c in v)),
)
grpc_settings = settings(max_examples=GRPC_EXAMPLES_MAX, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def pair(ledger, shard_map):
    shard = shard_map.shards[0].name
    return ledger.funded(5_000, shard), ledger.open(shard=shard)


def assert_refused_without_trace(ledger, pair, request, code, reasons):
    before = [ledger.get(account.account_id) for account in pair]
    with pytest.raises(grpc.RpcError) as raised:
        ledger.payments.Transfer(request)
    got_code, reason, _ = failure(raised.value)
    assert got_code == code and reason in reasons, (got_code, reason)
    assert [ledger.get(account.account_id) for account in pair] == before
    if request.transfer_id and len(request.transfer_id) <= 64:
        try:
            ledger.payments.GetTransfer(payments_pb2.GetTransferRequest(transfer_id=request.transfer_id))
        except grpc.RpcError as error:
            assert failure(error)[1] in ("TRANSFER_NOT_FOUND", "INVALID_ID")
        else:
            raise AssertionError("a malformed transfer was recorded")


def transfer_request(ledger, pair, **overrides):
    payer, payee = pair
    fields = dict(
        transfer_id=ledger.unique_id("bad"), debit_account_id=payer.account_id, credit_account_id=payee.account_id,
        amount_minor=10, currency="USD",
    )
    return payments_pb2.TransferRequest(**{**fields, **overrides})


@grpc_settings
@given(amount_minor=st.one_of(st.just(0), st.integers(min_value=-(2**63), max_value=0)))
def test_zero_and_negative_amounts(ledger, pair, amount_minor):
    request = transfer_request(ledger, pair, amount_minor=amount_minor)
    assert_refused_without_trace(ledger, pair, request, grpc.StatusCode.INVALID_ARGUMENT, {"INVALID_AMOUNT"})


@grpc_settings
@given(currency=st.text(min_size=1, max_size=8).filter(lambda c: c not in CURRENCY_EXPONENTS))
def test_unknown_currencies(ledger, pair, currency):
    request = transfer_request(ledger, pair, currency=currency)
    assert_refused_without_trace(ledger, pair, request, grpc.StatusCode.INVALID_ARGUMENT, {"UNKNOWN_CURRENCY"})


@grpc_settings
@given(field=st.sampled_from(["transfer_id", "debit_account_id", "credit_account_id"]), value=BAD_IDS)
def test_empty_oversized_and_malformed_ids(ledger, pair, field, value):
    request = transfer_request(ledger, pair, **{field: value})
    expected = {"MISSING_FIELD"} if value == "" else {"INVALID_ID"}
    assert_refused_without_trace(ledger, pair, request, grpc.StatusCode.INVALID_ARGUMENT, expected)


def test_same_debit_and_credit_account(ledger, pair):
    request = transfer_request(ledger, pair, credit_account_id=pair[0].account_id)
    assert_refused_without_trace(ledger, pair, request, grpc.StatusCode.INVALID_ARGUMENT, {"SAME_ACCOUNT"})


def test_missing_fields(ledger, pair):
    for field in ("currency", "transfer_id"):
        request = transfer_request(ledger, pair)
        request.ClearField(field)
        assert_refused_without_trace(ledger, pair, request, grpc.StatusCode.INVALID_ARGUMENT, {"MISSING_FIELD"})


def test_an_oversized_reference(ledger, pair):
    request = transfer_request(ledger, pair, reference="r" * 257)
    assert_refused_without_trace(ledger, pair, request, grpc.StatusCode.INVALID_ARGUMENT, {"FIELD_TOO_LONG"})


def test_int64_overflowing_amounts_cannot_even_be_sent():
    # The wire type is int64: a stub refuses to encode a larger number, so the
    # service never sees one. (Sums that overflow are BALANCE_OVERFLOW, see test_payments_api.)
    with pytest.raises(ValueError):
        payments_pb2.TransferRequest(amount_minor=2**63)


@pytest.mark.parametrize(
    "fields, reason",
    [
        ({"request_id": ""}, "MISSING_FIELD"),
        ({"request_id": "x" * 65}, "INVALID_ID"),
        ({"owner_id": ""}, "MISSING_FIELD"),
        ({"owner_id": "spaces are not ids"}, "INVALID_ID"),
        ({"currency": "XXX"}, "UNKNOWN_CURRENCY"),
        ({"currency": ""}, "MISSING_FIELD"),
        ({"kind": accounts_pb2.ACCOUNT_KIND_UNSPECIFIED}, "MISSING_FIELD"),
        ({"tier": 99}, "INVALID_TIER"),
        ({"tier": -1}, "INVALID_TIER"),
    ],
)
def test_bad_open_account_requests(ledger, fields, reason):
    request = accounts_pb2.OpenAccountRequest(
        **{"request_id": ledger.unique_id("bad-open"), "owner_id": "o", "currency": "USD", "kind": accounts_pb2.CUSTOMER, "tier": 0, **fields}
    )
    with pytest.raises(grpc.RpcError) as raised:
        ledger.accounts.OpenAccount(request)
    assert failure(raised.value)[:2] == (grpc.StatusCode.INVALID_ARGUMENT, reason)
    if request.request_id and len(request.request_id) <= 64:
        from services.ledger.ids import account_id_for_request

        with pytest.raises(grpc.RpcError) as raised:
            ledger.get(account_id_for_request(request.request_id))
        assert failure(raised.value)[1] == "ACCOUNT_NOT_FOUND"
