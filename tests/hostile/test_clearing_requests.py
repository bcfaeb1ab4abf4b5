"""Hostile Clearing requests, fixed cases: each malformed or out-of-range request answers its
gRPC status with an ErrorInfo reason of corebank.v1 and changes nothing in the databases
(every clearing table and every account, compared before and after); customers may call no
Clearing method; nobody moves a settlement account by a transfer nor takes a sys: id.

The random form of the same (every Clearing method under every identity, with requests built
from the descriptors) is tests/hostile/test_fuzz_api.py.
"""

from __future__ import annotations

import base64
import json

import grpc
import psycopg
import pytest
from google.rpc import error_details_pb2

from corebank.v1 import accounts_pb2, clearing_pb2, clearing_pb2_grpc, payments_pb2, transfers_pb2
from tests.fixtures import clearing as books
from tests.fixtures.clearing import ClearingClient, closed_pair
from tests.fixtures.ledger import failure

pytestmark = [pytest.mark.cluster, pytest.mark.hostile]

INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND
REFUSED = grpc.StatusCode.FAILED_PRECONDITION
DENIED = grpc.StatusCode.PERMISSION_DENIED
UINT64_MAX = 2**64 - 1
# Every clearing table and every account's counters, per shard: what a refused call must leave alone.
FINGERPRINT_SQL = """
    SELECT md5(concat_ws('|',
      (SELECT string_agg(concat_ws(',', participant_id, currency, position_minor, reserved_minor, allotment_minor), ';' ORDER BY 1) FROM clearing_positions),
      (SELECT string_agg(concat_ws(',', window_id, participant_id, currency, debits_minor, credits_minor, transfers), ';' ORDER BY 1) FROM clearing_window_totals),
      (SELECT string_agg(window_id::text, ';') FROM clearing_shard_window),
      (SELECT string_agg(concat_ws(',', settlement_id, participant_id, currency, amount_minor), ';' ORDER BY 1) FROM clearing_position_resets),
      (SELECT string_agg(concat_ws(',', participant_id, request_id, name), ';' ORDER BY 1) FROM participants),
      (SELECT string_agg(concat_ws(',', participant_id, currency, settlement_account_id, net_debit_cap_minor, threshold_percent), ';' ORDER BY 1) FROM participant_currencies),
      (SELECT string_agg(concat_ws(',', window_id, state, closed_at, reason, close_request_id, settlement_id), ';' ORDER BY 1) FROM settlement_windows),
      (SELECT string_agg(concat_ws(',', settlement_id, request_id, model, state, window_ids, settled_at), ';' ORDER BY 1) FROM settlements),
      (SELECT string_agg(concat_ws(',', settlement_id, participant_id, currency, debits_minor, credits_minor, settled_at), ';' ORDER BY 1) FROM settlement_entries),
      (SELECT string_agg(concat_ws(',', account_id, participant_id, status, debits_posted_minor, credits_posted_minor, debits_pending_minor, credits_pending_minor), ';' ORDER BY 1)
         FROM accounts WHERE parent_account_id IS NULL AND NOT starts_with(account_id, 'hot_') AND NOT starts_with(account_id, 'clr_')),
      (SELECT count(*) FROM transfers WHERE NOT starts_with(transfer_id, 'sys:sw')),
      (SELECT count(*) FROM id_registry)))"""


def fingerprint(cluster) -> dict[str, str]:
    found = {}
    for shard in cluster["shards"]:
        with psycopg.connect(books.reader_dsn(shard), autocommit=True) as connection:
            found[shard["name"]] = connection.execute(FINGERPRINT_SQL).fetchone()[0]
    return found


@pytest.fixture(scope="module")
def clearing(grpc_channel, ledger) -> ClearingClient:
    return ClearingClient(grpc_channel, ledger)


@pytest.fixture(scope="module")
def pool(clearing: ClearingClient, ledger, shard_map) -> dict:
    """Two participants (USD), a customer of each, a cleared transfer, a closed window, a settlement."""
    token = books.run_token()
    payer, payee = f"h4h-{token}-a", f"h4h-{token}-b"
    registered = {p: clearing.register(p, ["USD"]) for p in (payer, payee)}
    shards = [shard.name for shard in shard_map.shards]
    a = clearing.funded(payer, shards[0], 100_000).account_id
    b = clearing.open(payee, shards[1]).account_id
    assert ledger.transfer(a, b, 250, transfer_id=f"h4h-{token}-t").status == transfers_pb2.POSTED
    closed, open_id = closed_pair(clearing.close(f"h4h-{token}-close"))
    settlement = clearing.create_settlement(f"h4h-{token}-settle", [closed])
    return {
        "token": token, "payer": payer, "payee": payee, "a": a, "b": b, "closed": closed, "open": open_id,
        "settlement": settlement.settlement_id,
        "stl": next(c.settlement_account_id for c in registered[payer].currencies if c.currency == "USD"),
    }


def refused(call, request) -> tuple[grpc.StatusCode, str]:
    try:
        answer = call(request, timeout=books.CALL_TIMEOUT_SECONDS)
    except grpc.RpcError as error:
        code, reason, _ = failure(error)  # asserts the google.rpc.Status and its ErrorInfo of corebank.v1
        assert code not in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN), error.details()
        return code, reason
    raise AssertionError(f"expected a refusal, got {answer}")


def error_reason(status) -> str:
    info = error_details_pb2.ErrorInfo()
    assert status.details and status.details[0].Unpack(info), f"no ErrorInfo in {status}"
    return info.reason


def _token(payload) -> str:
    return base64.urlsafe_b64encode(json.dumps(payload).encode()).decode().rstrip("=")


# (method, request built from the pool, code, reasons allowed)
CASES = {
    "register: empty request_id": ("RegisterParticipant", lambda p: clearing_pb2.RegisterParticipantRequest(participant_id=f"h4n-{p['token']}", name="n", currencies=["USD"]), INVALID, {"MISSING_FIELD"}),
    "register: request_id of 65": ("RegisterParticipant", lambda p: clearing_pb2.RegisterParticipantRequest(request_id="r" * 65, participant_id=f"h4n-{p['token']}", name="n", currencies=["USD"]), INVALID, {"FIELD_TOO_LONG", "INVALID_ID"}),
    "register: request_id with a space": ("RegisterParticipant", lambda p: clearing_pb2.RegisterParticipantRequest(request_id="r 1", participant_id=f"h4n-{p['token']}", name="n", currencies=["USD"]), INVALID, {"INVALID_ID"}),
    "register: empty participant_id": ("RegisterParticipant", lambda p: clearing_pb2.RegisterParticipantRequest(request_id=f"h4n-{p['token']}-1", name="n", currencies=["USD"]), INVALID, {"MISSING_FIELD"}),
    "register: participant_id of 33": ("RegisterParticipant", lambda p: clearing_pb2.RegisterParticipantRequest(request_id=f"h4n-{p['token']}-2", participant_id="p" * 33, name="n", currencies=["USD"]), INVALID, {"FIELD_TOO_LONG"}),
    "register: participant_id with ':'": ("RegisterParticipant", lambda p: clearing_pb2.RegisterParticipantRequest(request_id=f"h4n-{p['token']}-3", participant_id="a:b", name="n", currencies=["USD"]), INVALID, {"INVALID_ID"}),
    "register: no name": ("RegisterParticipant", lambda p: clearing_pb2.RegisterParticipantRequest(request_id=f"h4n-{p['token']}-4", participant_id=f"h4n-{p['token']}", currencies=["USD"]), INVALID, {"MISSING_FIELD"}),
    "register: name of 257": ("RegisterParticipant", lambda p: clearing_pb2.RegisterParticipantRequest(request_id=f"h4n-{p['token']}-5", participant_id=f"h4n-{p['token']}", name="n" * 257, currencies=["USD"]), INVALID, {"FIELD_TOO_LONG"}),
    "register: name with a control character": ("RegisterParticipant", lambda p: clearing_pb2.RegisterParticipantRequest(request_id=f"h4n-{p['token']}-6", participant_id=f"h4n-{p['token']}", name="a\x00b", currencies=["USD"]), INVALID, {"INVALID_FIELD"}),
    "register: no currency": ("RegisterParticipant", lambda p: clearing_pb2.RegisterParticipantRequest(request_id=f"h4n-{p['token']}-7", participant_id=f"h4n-{p['token']}", name="n"), INVALID, {"MISSING_FIELD", "INVALID_FIELD"}),
    "register: unknown currency": ("RegisterParticipant", lambda p: clearing_pb2.RegisterParticipantRequest(request_id=f"h4n-{p['token']}-8", participant_id=f"h4n-{p['token']}", name="n", currencies=["USD", "XXX"]), INVALID, {"UNKNOWN_CURRENCY"}),
    "register: lower-case currency": ("RegisterParticipant", lambda p: clearing_pb2.RegisterParticipantRequest(request_id=f"h4n-{p['token']}-9", participant_id=f"h4n-{p['token']}", name="n", currencies=["usd"]), INVALID, {"UNKNOWN_CURRENCY"}),
    "register: a currency twice": ("RegisterParticipant", lambda p: clearing_pb2.RegisterParticipantRequest(request_id=f"h4n-{p['token']}-10", participant_id=f"h4n-{p['token']}", name="n", currencies=["USD", "USD"]), INVALID, {"INVALID_FIELD"}),
    "register: an existing participant under another request_id": ("RegisterParticipant", lambda p: clearing_pb2.RegisterParticipantRequest(request_id=f"h4n-{p['token']}-11", participant_id=p["payer"], name="n", currencies=["USD"]), grpc.StatusCode.ALREADY_EXISTS, {"PARTICIPANT_EXISTS"}),
    "register: the hosting bank again": ("RegisterParticipant", lambda p: clearing_pb2.RegisterParticipantRequest(request_id=f"h4n-{p['token']}-12", participant_id=books.HOSTING_PARTICIPANT_ID, name="n", currencies=["USD"]), grpc.StatusCode.ALREADY_EXISTS, {"PARTICIPANT_EXISTS"}),
    "register: a retry with other fields": ("RegisterParticipant", lambda p: clearing_pb2.RegisterParticipantRequest(request_id=f"reg-{p['payer']}", participant_id=p["payer"], name="another name", currencies=["USD"]), grpc.StatusCode.ALREADY_EXISTS, {"IDEMPOTENCY_CONFLICT"}),
    "get participant: unknown": ("GetParticipant", lambda p: clearing_pb2.GetParticipantRequest(participant_id=f"h4n-{p['token']}"), NOT_FOUND, {"PARTICIPANT_NOT_FOUND"}),
    "get participant: empty": ("GetParticipant", lambda p: clearing_pb2.GetParticipantRequest(), INVALID, {"MISSING_FIELD"}),
    "cap: negative": ("SetNetDebitCap", lambda p: clearing_pb2.SetNetDebitCapRequest(participant_id=p["payer"], currency="USD", cap_minor=-1), INVALID, {"INVALID_AMOUNT", "INVALID_FIELD"}),
    "cap: int64 min": ("SetNetDebitCap", lambda p: clearing_pb2.SetNetDebitCapRequest(participant_id=p["payer"], currency="USD", cap_minor=-(2**63)), INVALID, {"INVALID_AMOUNT", "INVALID_FIELD"}),
    "cap: threshold 101": ("SetNetDebitCap", lambda p: clearing_pb2.SetNetDebitCapRequest(participant_id=p["payer"], currency="USD", cap_minor=100, threshold_percent=101), INVALID, {"INVALID_FIELD"}),
    "cap: threshold -1": ("SetNetDebitCap", lambda p: clearing_pb2.SetNetDebitCapRequest(participant_id=p["payer"], currency="USD", cap_minor=100, threshold_percent=-1), INVALID, {"INVALID_FIELD"}),
    "cap: unknown currency": ("SetNetDebitCap", lambda p: clearing_pb2.SetNetDebitCapRequest(participant_id=p["payer"], currency="XXX", cap_minor=100), INVALID, {"UNKNOWN_CURRENCY"}),
    "cap: a currency it does not have": ("SetNetDebitCap", lambda p: clearing_pb2.SetNetDebitCapRequest(participant_id=p["payer"], currency="JPY", cap_minor=100), REFUSED, {"PARTICIPANT_CURRENCY_NOT_ENABLED"}),
    "cap: unknown participant": ("SetNetDebitCap", lambda p: clearing_pb2.SetNetDebitCapRequest(participant_id=f"h4n-{p['token']}", currency="USD", cap_minor=100), NOT_FOUND, {"PARTICIPANT_NOT_FOUND"}),
    "position: unknown participant": ("GetPosition", lambda p: clearing_pb2.GetPositionRequest(participant_id=f"h4n-{p['token']}", currency="USD"), NOT_FOUND, {"PARTICIPANT_NOT_FOUND"}),
    "position: a currency it does not have": ("GetPosition", lambda p: clearing_pb2.GetPositionRequest(participant_id=p["payer"], currency="EUR"), REFUSED, {"PARTICIPANT_CURRENCY_NOT_ENABLED"}),
    "position: no currency": ("GetPosition", lambda p: clearing_pb2.GetPositionRequest(participant_id=p["payer"]), INVALID, {"MISSING_FIELD", "UNKNOWN_CURRENCY"}),
    "window: huge id": ("GetSettlementWindow", lambda p: clearing_pb2.GetSettlementWindowRequest(window_id=UINT64_MAX), NOT_FOUND, {"SETTLEMENT_WINDOW_NOT_FOUND"}),
    "window: 2**63": ("GetSettlementWindow", lambda p: clearing_pb2.GetSettlementWindowRequest(window_id=2**63), NOT_FOUND, {"SETTLEMENT_WINDOW_NOT_FOUND"}),
    "window: the next one": ("GetSettlementWindow", lambda p: clearing_pb2.GetSettlementWindowRequest(window_id=p["open"] + 1000), NOT_FOUND, {"SETTLEMENT_WINDOW_NOT_FOUND"}),
    "list: page size -1": ("ListSettlementWindows", lambda p: clearing_pb2.ListSettlementWindowsRequest(page_size=-1), INVALID, {"INVALID_PAGE_SIZE"}),
    "list: page size 501": ("ListSettlementWindows", lambda p: clearing_pb2.ListSettlementWindowsRequest(page_size=501), INVALID, {"INVALID_PAGE_SIZE"}),
    "list: undeclared state": ("ListSettlementWindows", lambda p: clearing_pb2.ListSettlementWindowsRequest(state=99), INVALID, {"INVALID_FIELD", "INVALID_STATUS"}),
    "list: garbage page token": ("ListSettlementWindows", lambda p: clearing_pb2.ListSettlementWindowsRequest(page_token="!!!!"), INVALID, {"INVALID_PAGE_TOKEN"}),
    "list: page token nested 1000 deep": ("ListSettlementWindows", lambda p: clearing_pb2.ListSettlementWindowsRequest(page_token=base64.urlsafe_b64encode(("[" * 1000 + "]" * 1000).encode()).decode()), INVALID, {"INVALID_PAGE_TOKEN"}),
    "list: forged token of an account listing": ("ListSettlementWindows", lambda p: clearing_pb2.ListSettlementWindowsRequest(page_token=_token({"account_id": p["a"], "before_seq": 5})), INVALID, {"INVALID_PAGE_TOKEN"}),
    "list: forged token past int64": ("ListSettlementWindows", lambda p: clearing_pb2.ListSettlementWindowsRequest(page_token=_token({"before_window_id": 2**64})), INVALID, {"INVALID_PAGE_TOKEN"}),
    "list: forged token true": ("ListSettlementWindows", lambda p: clearing_pb2.ListSettlementWindowsRequest(page_token=_token({"before_window_id": True})), INVALID, {"INVALID_PAGE_TOKEN"}),
    "close: empty request_id": ("CloseSettlementWindow", lambda p: clearing_pb2.CloseSettlementWindowRequest(reason="x"), INVALID, {"MISSING_FIELD"}),
    "close: request_id of 65": ("CloseSettlementWindow", lambda p: clearing_pb2.CloseSettlementWindowRequest(request_id="c" * 65), INVALID, {"FIELD_TOO_LONG", "INVALID_ID"}),
    "close: request_id with a NUL": ("CloseSettlementWindow", lambda p: clearing_pb2.CloseSettlementWindowRequest(request_id="c\x00"), INVALID, {"INVALID_ID"}),
    "close: reason of 257": ("CloseSettlementWindow", lambda p: clearing_pb2.CloseSettlementWindowRequest(request_id=f"h4n-{p['token']}-c", reason="r" * 257), INVALID, {"FIELD_TOO_LONG"}),
    "settle: no windows": ("CreateSettlement", lambda p: clearing_pb2.CreateSettlementRequest(request_id=f"h4n-{p['token']}-s1", model=clearing_pb2.DEFERRED_NET), INVALID, {"MISSING_FIELD", "INVALID_FIELD"}),
    "settle: window 0": ("CreateSettlement", lambda p: clearing_pb2.CreateSettlementRequest(request_id=f"h4n-{p['token']}-s2", window_ids=[0], model=clearing_pb2.DEFERRED_NET), INVALID, {"INVALID_FIELD", "INVALID_ID"}),
    "settle: huge window": ("CreateSettlement", lambda p: clearing_pb2.CreateSettlementRequest(request_id=f"h4n-{p['token']}-s3", window_ids=[UINT64_MAX], model=clearing_pb2.DEFERRED_NET), (NOT_FOUND, INVALID), {"SETTLEMENT_WINDOW_NOT_FOUND", "INVALID_FIELD"}),
    "settle: a window twice": ("CreateSettlement", lambda p: clearing_pb2.CreateSettlementRequest(request_id=f"h4n-{p['token']}-s4", window_ids=[p["closed"], p["closed"]], model=clearing_pb2.DEFERRED_NET), INVALID, {"INVALID_FIELD"}),
    "settle: 101 windows": ("CreateSettlement", lambda p: clearing_pb2.CreateSettlementRequest(request_id=f"h4n-{p['token']}-s5", window_ids=list(range(1, 102)), model=clearing_pb2.DEFERRED_NET), INVALID, {"INVALID_FIELD", "BATCH_TOO_LARGE"}),
    "settle: no model": ("CreateSettlement", lambda p: clearing_pb2.CreateSettlementRequest(request_id=f"h4n-{p['token']}-s6", window_ids=[p["closed"]]), INVALID, {"MISSING_FIELD", "INVALID_FIELD"}),
    "settle: undeclared model": ("CreateSettlement", lambda p: clearing_pb2.CreateSettlementRequest(request_id=f"h4n-{p['token']}-s7", window_ids=[p["closed"]], model=99), INVALID, {"INVALID_FIELD"}),
    "settle: empty request_id": ("CreateSettlement", lambda p: clearing_pb2.CreateSettlementRequest(window_ids=[p["closed"]], model=clearing_pb2.DEFERRED_NET), INVALID, {"MISSING_FIELD"}),
    "settle: the open window": ("CreateSettlement", lambda p: clearing_pb2.CreateSettlementRequest(request_id=f"h4n-{p['token']}-s8", window_ids=[p["open"]], model=clearing_pb2.DEFERRED_NET), REFUSED, {"SETTLEMENT_WINDOW_NOT_CLOSED"}),
    "settle: a window already settled": ("CreateSettlement", lambda p: clearing_pb2.CreateSettlementRequest(request_id=f"h4n-{p['token']}-s9", window_ids=[p["closed"]], model=clearing_pb2.GROSS), REFUSED, {"SETTLEMENT_WINDOW_ALREADY_SETTLED"}),
    "settle: a retry with another model": ("CreateSettlement", lambda p: clearing_pb2.CreateSettlementRequest(request_id=f"h4h-{p['token']}-settle", window_ids=[p["closed"]], model=clearing_pb2.GROSS), grpc.StatusCode.ALREADY_EXISTS, {"IDEMPOTENCY_CONFLICT"}),
    "get settlement: huge": ("GetSettlement", lambda p: clearing_pb2.GetSettlementRequest(settlement_id=UINT64_MAX), NOT_FOUND, {"SETTLEMENT_NOT_FOUND"}),
    "record: unknown settlement": ("RecordParticipantSettled", lambda p: clearing_pb2.RecordParticipantSettledRequest(settlement_id=2**63, participant_id=p["payer"], currency="USD"), NOT_FOUND, {"SETTLEMENT_NOT_FOUND"}),
    "record: a participant without an entry": ("RecordParticipantSettled", lambda p: clearing_pb2.RecordParticipantSettledRequest(settlement_id=p["settlement"], participant_id=books.HOSTING_PARTICIPANT_ID, currency="KWD"), NOT_FOUND, {"SETTLEMENT_ENTRY_NOT_FOUND"}),
    "record: unknown participant": ("RecordParticipantSettled", lambda p: clearing_pb2.RecordParticipantSettledRequest(settlement_id=p["settlement"], participant_id=f"h4n-{p['token']}", currency="USD"), NOT_FOUND, {"SETTLEMENT_ENTRY_NOT_FOUND", "PARTICIPANT_NOT_FOUND"}),
    "record: empty participant": ("RecordParticipantSettled", lambda p: clearing_pb2.RecordParticipantSettledRequest(settlement_id=p["settlement"], currency="USD"), INVALID, {"MISSING_FIELD"}),
    "record: unknown currency": ("RecordParticipantSettled", lambda p: clearing_pb2.RecordParticipantSettledRequest(settlement_id=p["settlement"], participant_id=p["payer"], currency="XXX"), INVALID, {"UNKNOWN_CURRENCY"}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_hostile_clearing_request_is_refused_with_a_reason_and_changes_nothing(cluster, clearing, pool, case):
    method, build, code, reasons = CASES[case]
    before = fingerprint(cluster)
    answer = refused(getattr(clearing.stub, method), build(pool))
    codes = code if isinstance(code, tuple) else (code,)
    assert answer[0] in codes and answer[1] in reasons, f"{case}: answered {answer}, expected {[c.name for c in codes]} with one of {reasons}"
    assert fingerprint(cluster) == before, f"{case}: refused, yet the databases changed"


def valid_requests(pool: dict) -> dict[str, object]:
    """One well-formed request per Clearing method (it would succeed for an admin)."""
    return {
        "RegisterParticipant": clearing_pb2.RegisterParticipantRequest(request_id=f"h4d-{pool['token']}", participant_id=f"h4d-{pool['token']}", name="n", currencies=["USD"]),
        "GetParticipant": clearing_pb2.GetParticipantRequest(participant_id=pool["payer"]),
        "SetNetDebitCap": clearing_pb2.SetNetDebitCapRequest(participant_id=pool["payer"], currency="USD", cap_minor=10**9),
        "GetPosition": clearing_pb2.GetPositionRequest(participant_id=pool["payer"], currency="USD"),
        "GetSettlementWindow": clearing_pb2.GetSettlementWindowRequest(window_id=pool["closed"]),
        "ListSettlementWindows": clearing_pb2.ListSettlementWindowsRequest(),
        "CloseSettlementWindow": clearing_pb2.CloseSettlementWindowRequest(request_id=f"h4d-{pool['token']}"),
        "CreateSettlement": clearing_pb2.CreateSettlementRequest(request_id=f"h4d-{pool['token']}", window_ids=[pool["closed"]], model=clearing_pb2.DEFERRED_NET),
        "GetSettlement": clearing_pb2.GetSettlementRequest(settlement_id=pool["settlement"]),
        "RecordParticipantSettled": clearing_pb2.RecordParticipantSettledRequest(settlement_id=pool["settlement"], participant_id=pool["payer"], currency="USD"),
        "Reconcile": clearing_pb2.ReconcileRequest(),
    }


CLEARING_METHODS = [m.name for m in clearing_pb2.DESCRIPTOR.services_by_name["Clearing"].methods]
# Who may call what (clearing.proto): admin everything; operator closes and settles and reads; service reads.
WRITES_BY_ROLE = {
    "operator": {"RegisterParticipant", "SetNetDebitCap", "RecordParticipantSettled"},
    "service": {"RegisterParticipant", "SetNetDebitCap", "RecordParticipantSettled", "CloseSettlementWindow", "CreateSettlement"},
}


@pytest.mark.parametrize("method", CLEARING_METHODS)
def test_a_customer_may_call_no_clearing_method(cluster, channel_as, pool, method):
    stub = clearing_pb2_grpc.ClearingStub(channel_as("customer", f"h4-customer-{pool['token']}"))
    before = fingerprint(cluster)
    code, reason = refused(getattr(stub, method), valid_requests(pool)[method])
    assert (code, reason) == (DENIED, "ROLE_NOT_ALLOWED")
    assert fingerprint(cluster) == before


@pytest.mark.parametrize("role", sorted(WRITES_BY_ROLE))
def test_operators_and_services_may_not_do_what_their_role_may_not(cluster, channel_as, pool, role):
    stub = clearing_pb2_grpc.ClearingStub(channel_as(role, f"h4-{role}-{pool['token']}"))
    requests = valid_requests(pool)
    for method in CLEARING_METHODS:
        if method in WRITES_BY_ROLE[role]:
            before = fingerprint(cluster)
            assert refused(getattr(stub, method), requests[method]) == (DENIED, "ROLE_NOT_ALLOWED"), method
            assert fingerprint(cluster) == before, method
        elif method not in ("CloseSettlementWindow", "CreateSettlement"):  # reads: allowed
            getattr(stub, method)(requests[method], timeout=books.CALL_TIMEOUT_SECONDS)


def test_nobody_transfers_to_or_from_a_settlement_account_nor_takes_a_settlement_id(cluster, clearing, ledger, pool):
    a, stl = pool["a"], pool["stl"]
    bank = "stl_h_usd"
    before = fingerprint(cluster)
    cases = [
        payments_pb2.TransferRequest(transfer_id=f"h4st-{pool['token']}-1", debit_account_id=stl, credit_account_id=a, amount_minor=1, currency="USD"),
        payments_pb2.TransferRequest(transfer_id=f"h4st-{pool['token']}-2", debit_account_id=a, credit_account_id=stl, amount_minor=1, currency="USD"),
        payments_pb2.TransferRequest(transfer_id=f"h4st-{pool['token']}-3", debit_account_id=bank, credit_account_id=a, amount_minor=1, currency="USD"),
        payments_pb2.TransferRequest(transfer_id=f"h4st-{pool['token']}-4", debit_account_id=a, credit_account_id=bank, amount_minor=1, currency="USD"),
    ]
    for request in cases:
        assert refused(ledger.payments.Transfer, request) == (INVALID, "INTERNAL_ACCOUNT"), request
    # In a batch, each item naming one is refused on its own (INTERNAL_ACCOUNT), nothing posts.
    batch = [payments_pb2.TransferRequest(transfer_id=f"{r.transfer_id}-b", debit_account_id=r.debit_account_id,
                                          credit_account_id=r.credit_account_id, amount_minor=1, currency="USD") for r in cases]
    try:
        results = ledger.payments.CreateTransfers(payments_pb2.CreateTransfersRequest(transfers=batch), timeout=books.CALL_TIMEOUT_SECONDS).results
        answers = [("OK", r.transfer.status) if r.HasField("transfer") else (r.error.code, error_reason(r.error)) for r in results]
        assert answers == [(INVALID.value[0], "INTERNAL_ACCOUNT")] * len(batch), answers
    except grpc.RpcError as error:
        assert failure(error)[:2] == (INVALID, "INTERNAL_ACCOUNT")
    squatted = f"{books.SETTLEMENT_TRANSFER_PREFIX}{pool['settlement']}:{pool['payer']}:USD:net"
    request = payments_pb2.TransferRequest(transfer_id=squatted, debit_account_id=a, credit_account_id=pool["b"], amount_minor=1, currency="USD")
    assert refused(ledger.payments.Transfer, request) == (INVALID, "RESERVED_ID")
    assert fingerprint(cluster) == before
    # The squatted id stayed free: recording the settlement still posts its own movements.
    settled = clearing.settle_all(clearing.settlement(pool["settlement"]))
    assert settled.state == clearing_pb2.SETTLEMENT_SETTLED
    assert books.wait_quiet(cluster["shards"], clearing.home_shard).violations() == []


def test_accounts_name_only_registered_participants_with_the_currency(cluster, clearing, ledger, pool):
    before = fingerprint(cluster)
    token = pool["token"]
    for participant_id, currency, expected in (
        (f"h4n-{token}-ghost", "USD", (NOT_FOUND, "PARTICIPANT_NOT_FOUND")),
        (pool["payer"], "JPY", (REFUSED, "PARTICIPANT_CURRENCY_NOT_ENABLED")),
        ("a b", "USD", (INVALID, "INVALID_ID")),
        ("p" * 33, "USD", (INVALID, "FIELD_TOO_LONG")),
    ):
        request = accounts_pb2.OpenAccountRequest(request_id=f"h4o-{token}-{len(participant_id)}-{currency}", owner_id="o", currency=currency,
                                                  kind=accounts_pb2.CUSTOMER, tier=1, participant_id=participant_id)
        assert refused(ledger.accounts.OpenAccount, request) == expected, participant_id
    assert fingerprint(cluster) == before
    # A retry of an OpenAccount naming another participant is a conflict, not a second account.
    opened = accounts_pb2.OpenAccountRequest(request_id=f"h4o-{token}-retry", owner_id="o", currency="USD", kind=accounts_pb2.CUSTOMER, tier=1,
                                             participant_id=pool["payer"])
    account = ledger.accounts.OpenAccount(opened)
    assert account.participant_id == pool["payer"]
    opened.participant_id = pool["payee"]
    assert refused(ledger.accounts.OpenAccount, opened) == (grpc.StatusCode.ALREADY_EXISTS, "IDEMPOTENCY_CONFLICT")


def test_a_close_retried_with_another_reason_closes_nothing_more(cluster, clearing, pool):
    """The contract leaves open whether a retry with other fields is a conflict: either answer,
    never a second close."""
    before = fingerprint(cluster)
    request = clearing_pb2.CloseSettlementWindowRequest(request_id=f"h4h-{pool['token']}-close", reason="another")
    try:
        answer = clearing.stub.CloseSettlementWindow(request, timeout=books.CALL_TIMEOUT_SECONDS)
    except grpc.RpcError as error:
        assert failure(error)[:2] == (grpc.StatusCode.ALREADY_EXISTS, "IDEMPOTENCY_CONFLICT")
    else:
        assert closed_pair(answer) == (pool["closed"], pool["closed"] + 1)
    assert fingerprint(cluster) == before
