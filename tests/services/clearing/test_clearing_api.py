"""corebank.v1.Clearing against the real cluster: participants, caps, positions, roles, validation."""

from __future__ import annotations

import grpc
import pytest

from corebank.v1 import accounts_pb2
from corebank.v1 import clearing_pb2 as pb
from services.ledger import clearing
from tests.fixtures.ledger import failure
from tests.services.clearing.conftest import register, unique


def refused(call, request) -> tuple:
    with pytest.raises(grpc.RpcError) as raised:
        call(request)
    return failure(raised.value)


def test_register_participant_opens_its_settlement_accounts(clearing_stub, ledger):
    participant_id = unique("bank")
    participant = register(clearing_stub, ("USD", "EUR"), participant_id, name="Bank of Tests")
    assert (participant.participant_id, participant.name, participant.hosting) == (participant_id, "Bank of Tests", False)
    assert [c.currency for c in participant.currencies] == ["EUR", "USD"]
    for currency in participant.currencies:
        assert currency.settlement_account_id == clearing.settlement_account_id(participant_id, currency.currency)
        assert not currency.net_debit_cap_set and currency.threshold_percent == clearing.DEFAULT_THRESHOLD_PERCENT
        account = ledger.get(currency.settlement_account_id)
        assert (account.kind, account.owner_id, account.currency, account.balance_minor) == (
            accounts_pb2.SYSTEM, participant_id, currency.currency, 0
        )
        bank = ledger.get(clearing.settlement_bank_account_id(currency.currency))
        assert bank.kind == accounts_pb2.SYSTEM
    assert clearing_stub.GetParticipant(pb.GetParticipantRequest(participant_id=participant_id)) == participant


def test_register_participant_is_idempotent_by_request_id(clearing_stub):
    request = pb.RegisterParticipantRequest(request_id=unique("reg"), participant_id=unique("bank"), name="B", currencies=["USD", "JPY"])
    first = clearing_stub.RegisterParticipant(request)
    # The same fields in another order are the same request.
    again = clearing_stub.RegisterParticipant(pb.RegisterParticipantRequest(
        request_id=request.request_id, participant_id=request.participant_id, name="B", currencies=["JPY", "USD"]
    ))
    assert again == first

    request.name, request.currencies[:] = "Other", ["USD"]
    code, reason, metadata = refused(clearing_stub.RegisterParticipant, request)
    assert (code, reason) == (grpc.StatusCode.ALREADY_EXISTS, "IDEMPOTENCY_CONFLICT")
    assert metadata["conflicting_fields"] == "name,currencies"

    other = pb.RegisterParticipantRequest(request_id=unique("reg"), participant_id=request.participant_id, name="B", currencies=["USD"])
    code, reason, metadata = refused(clearing_stub.RegisterParticipant, other)
    assert (code, reason, metadata["participant_id"]) == (grpc.StatusCode.ALREADY_EXISTS, "PARTICIPANT_EXISTS", request.participant_id)


@pytest.mark.parametrize("fields, reason, field", [
    ({"request_id": ""}, "MISSING_FIELD", "request_id"),
    ({"request_id": "bad id"}, "INVALID_ID", "request_id"),
    ({"participant_id": ""}, "MISSING_FIELD", "participant_id"),
    ({"participant_id": "no/slash"}, "INVALID_ID", "participant_id"),
    ({"participant_id": "x" * 33}, "FIELD_TOO_LONG", "participant_id"),
    ({"name": ""}, "MISSING_FIELD", "name"),
    ({"name": "a\nb"}, "INVALID_FIELD", "name"),
    ({"name": "n" * 257}, "FIELD_TOO_LONG", "name"),
    ({"currencies": []}, "MISSING_FIELD", "currencies"),
    ({"currencies": ["USD", "USD"]}, "INVALID_FIELD", "currencies"),
    ({"currencies": ["XXX"]}, "UNKNOWN_CURRENCY", None),
    ({"currencies": ["USD"] * 51}, "INVALID_FIELD", "currencies"),
])
def test_register_participant_refuses_bad_fields(clearing_stub, fields, reason, field):
    request = {"request_id": unique("reg"), "participant_id": unique("bank"), "name": "B", "currencies": ["USD"], **fields}
    code, got, metadata = refused(clearing_stub.RegisterParticipant, pb.RegisterParticipantRequest(**request))
    assert (code, got) == (grpc.StatusCode.INVALID_ARGUMENT, reason)
    if field:
        assert metadata["field"] == field
    if field != "participant_id":  # nothing was registered
        assert refused(clearing_stub.GetParticipant, pb.GetParticipantRequest(participant_id=request["participant_id"]))[1] == (
            "PARTICIPANT_NOT_FOUND"
        )


def test_unknown_participant_is_not_found(clearing_stub):
    code, reason, metadata = refused(clearing_stub.GetParticipant, pb.GetParticipantRequest(participant_id="nobody-here"))
    assert (code, reason, metadata["participant_id"]) == (grpc.StatusCode.NOT_FOUND, "PARTICIPANT_NOT_FOUND", "nobody-here")
    code, reason, _ = refused(clearing_stub.GetPosition, pb.GetPositionRequest(participant_id="nobody-here", currency="USD"))
    assert (code, reason) == (grpc.StatusCode.NOT_FOUND, "PARTICIPANT_NOT_FOUND")


def test_the_hosting_participant_exists_and_may_not_be_registered_again(clearing_stub):
    hosting = clearing_stub.GetParticipant(pb.GetParticipantRequest(participant_id=clearing.HOSTING_PARTICIPANT_ID))
    assert hosting.hosting and hosting.name
    assert refused(clearing_stub.RegisterParticipant, pb.RegisterParticipantRequest(
        request_id=unique("reg"), participant_id=clearing.HOSTING_PARTICIPANT_ID, name="x", currencies=["USD"]
    ))[1] == "PARTICIPANT_EXISTS"


def test_a_fresh_participant_owes_nothing_and_has_no_cap(clearing_stub):
    participant = register(clearing_stub, ("USD",))
    position = clearing_stub.GetPosition(pb.GetPositionRequest(participant_id=participant.participant_id, currency="USD"))
    open_window = clearing_stub.GetSettlementWindow(pb.GetSettlementWindowRequest())
    assert position.window_id == open_window.window_id
    assert (position.position_minor, position.reserved_minor, position.window_position_minor) == (0, 0, 0)
    assert (position.net_debit_cap_set, position.headroom_minor, position.threshold_reached) == (False, 0, False)
    assert position.threshold_percent == clearing.DEFAULT_THRESHOLD_PERCENT


def test_set_net_debit_cap_is_a_value_and_shows_in_the_registry(clearing_stub):
    participant = register(clearing_stub, ("USD", "EUR"))
    request = pb.SetNetDebitCapRequest(participant_id=participant.participant_id, currency="USD", cap_minor=100_000, threshold_percent=80)
    position = clearing_stub.SetNetDebitCap(request)
    assert (position.net_debit_cap_set, position.net_debit_cap_minor, position.threshold_percent) == (True, 100_000, 80)
    assert (position.headroom_minor, position.threshold_reached) == (100_000, False)
    assert clearing_stub.SetNetDebitCap(request) == position
    # 0 is a cap (it may owe nothing); threshold 0 is the default.
    zero = clearing_stub.SetNetDebitCap(pb.SetNetDebitCapRequest(participant_id=participant.participant_id, currency="USD", cap_minor=0))
    assert (zero.net_debit_cap_set, zero.net_debit_cap_minor, zero.threshold_percent, zero.headroom_minor) == (True, 0, 90, 0)
    # position 0 >= 90% of a cap of 0: the alarm is on.
    assert zero.threshold_reached
    registry = clearing_stub.GetParticipant(pb.GetParticipantRequest(participant_id=participant.participant_id))
    by_currency = {c.currency: c for c in registry.currencies}
    assert (by_currency["USD"].net_debit_cap_set, by_currency["USD"].net_debit_cap_minor) == (True, 0)
    assert not by_currency["EUR"].net_debit_cap_set


def test_set_net_debit_cap_refusals(clearing_stub):
    participant = register(clearing_stub, ("USD",))
    pid = participant.participant_id
    cases = [
        (pb.SetNetDebitCapRequest(participant_id=pid, currency="USD", cap_minor=-1), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_FIELD"),
        (pb.SetNetDebitCapRequest(participant_id=pid, currency="USD", cap_minor=1, threshold_percent=101),
         grpc.StatusCode.INVALID_ARGUMENT, "INVALID_FIELD"),
        (pb.SetNetDebitCapRequest(participant_id=pid, currency="XXX", cap_minor=1), grpc.StatusCode.INVALID_ARGUMENT, "UNKNOWN_CURRENCY"),
        (pb.SetNetDebitCapRequest(participant_id=pid, currency="EUR", cap_minor=1), grpc.StatusCode.FAILED_PRECONDITION,
         "PARTICIPANT_CURRENCY_NOT_ENABLED"),
        (pb.SetNetDebitCapRequest(participant_id="nobody-here", currency="USD", cap_minor=1), grpc.StatusCode.NOT_FOUND,
         "PARTICIPANT_NOT_FOUND"),
    ]
    for request, code, reason in cases:
        assert refused(clearing_stub.SetNetDebitCap, request)[:2] == (code, reason), request
    assert refused(clearing_stub.GetPosition, pb.GetPositionRequest(participant_id=pid, currency="EUR"))[1] == "PARTICIPANT_CURRENCY_NOT_ENABLED"
    assert not clearing_stub.GetPosition(pb.GetPositionRequest(participant_id=pid, currency="USD")).net_debit_cap_set


def test_the_hosting_participant_has_every_currency(clearing_stub):
    position = clearing_stub.GetPosition(pb.GetPositionRequest(participant_id=clearing.HOSTING_PARTICIPANT_ID, currency="NOK"))
    assert not position.net_debit_cap_set
    capped = clearing_stub.SetNetDebitCap(pb.SetNetDebitCapRequest(
        participant_id=clearing.HOSTING_PARTICIPANT_ID, currency="NOK", cap_minor=10**12, threshold_percent=95
    ))
    assert (capped.net_debit_cap_minor, capped.threshold_percent) == (10**12, 95)
    hosting = clearing_stub.GetParticipant(pb.GetParticipantRequest(participant_id=clearing.HOSTING_PARTICIPANT_ID))
    assert "NOK" in [c.currency for c in hosting.currencies]


# Every method, and a request that passes validation (or fails only later): the role is refused first.
def _every_method() -> list[tuple[str, object]]:
    return [
        ("RegisterParticipant", pb.RegisterParticipantRequest(request_id="r", participant_id="p", name="n", currencies=["USD"])),
        ("GetParticipant", pb.GetParticipantRequest(participant_id="p")),
        ("SetNetDebitCap", pb.SetNetDebitCapRequest(participant_id="p", currency="USD", cap_minor=1)),
        ("GetPosition", pb.GetPositionRequest(participant_id="p", currency="USD")),
        ("GetSettlementWindow", pb.GetSettlementWindowRequest()),
        ("ListSettlementWindows", pb.ListSettlementWindowsRequest()),
        ("CloseSettlementWindow", pb.CloseSettlementWindowRequest(request_id="r")),
        ("CreateSettlement", pb.CreateSettlementRequest(request_id="r", window_ids=[1], model=pb.DEFERRED_NET)),
        ("GetSettlement", pb.GetSettlementRequest(settlement_id=1)),
        ("RecordParticipantSettled", pb.RecordParticipantSettledRequest(settlement_id=1, participant_id="p", currency="USD")),
        ("Reconcile", pb.ReconcileRequest()),
    ]


ALLOWED = {
    "customer": set(),
    "service": {"GetParticipant", "GetPosition", "GetSettlementWindow", "ListSettlementWindows", "GetSettlement", "Reconcile"},
    "operator": {"GetParticipant", "GetPosition", "GetSettlementWindow", "ListSettlementWindows", "GetSettlement", "Reconcile",
                 "CloseSettlementWindow", "CreateSettlement"},
}


@pytest.mark.parametrize("role", sorted(ALLOWED))
def test_each_role_may_do_only_its_share_of_clearing(clearing_as, role):
    stub = clearing_as(role)
    methods = {method for method, _ in _every_method()}
    assert methods == {method.name for method in pb.DESCRIPTOR.services_by_name["Clearing"].methods}
    for method, request in _every_method():
        if method in ALLOWED[role]:
            continue  # allowed: exercised by the other tests (a close here would disturb them)
        code, reason, metadata = refused(getattr(stub, method), request)
        assert (code, reason) == (grpc.StatusCode.PERMISSION_DENIED, "ROLE_NOT_ALLOWED"), method
        assert metadata["role"] == role


def test_reads_are_allowed_to_service_and_operator(clearing_as):
    for role in ("service", "operator"):
        stub = clearing_as(role)
        assert stub.GetSettlementWindow(pb.GetSettlementWindowRequest()).state == pb.WINDOW_OPEN
        assert stub.GetParticipant(pb.GetParticipantRequest(participant_id=clearing.HOSTING_PARTICIPANT_ID)).hosting
