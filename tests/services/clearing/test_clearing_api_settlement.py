"""corebank.v1.Clearing settlements against the real cluster: DEFERRED_NET and GROSS, the entries,
the settlement accounts' movements (read back from the ledger), positions reset on every shard,
idempotent retries, refusals, and a crash between any two steps completed by a retry.

Each test's windows hold only its own transfers between its own participants: it knows what they hold."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from corebank.v1 import accounts_pb2
from corebank.v1 import clearing_pb2 as pb
from corebank.v1 import payments_pb2, transfers_pb2
from services import clearing_service
from services.bootstrap import ShardConnections
from services.clearing_service import ClearingService
from services.coordinator import wiring
from services.ledger import clearing
from services.ledger.access import LEDGER
from services.ledger.limits import TierLimits
from services.ledger_service import LedgerService
from tests.fixtures.ledger import OPEN_ON_SHARD_ATTEMPTS_MAX, _account_id, failure
from tests.services.clearing.conftest import close_window, register, unique

def closed_window_with(stub, pay) -> int:
    """A fresh window holding what `pay()` posts, closed."""
    window_id = close_window(stub).open_window.window_id
    pay()
    assert close_window(stub).closed_window.window_id == window_id
    return window_id


def open_for(ledger, participant_id: str, shard: str, kind=accounts_pb2.CUSTOMER) -> accounts_pb2.Account:
    for _ in range(OPEN_ON_SHARD_ATTEMPTS_MAX):
        request_id = ledger.unique_id("open")
        if ledger.shard_of(_account_id(request_id)) == shard:
            return ledger.accounts.OpenAccount(accounts_pb2.OpenAccountRequest(
                request_id=request_id, owner_id="owner", currency="USD", kind=kind, tier=0 if kind == accounts_pb2.SYSTEM else 2,
                participant_id=participant_id,
            ))
    raise AssertionError(f"no request id landed on {shard}")


@pytest.fixture
def three_banks(clearing_stub, shard_map, ledger):
    """Three participants, and `pay()`: A pays B 300 and C 200 on one shard, B pays A 100 between
    shards (nets A +400, B -200, C -200). Funded from each one's own SYSTEM account: not cleared."""
    a, b, c = (register(clearing_stub, ("USD",)).participant_id for _ in range(3))
    s0, s1 = shard_map.shards[0].name, shard_map.shards[1].name
    a0, b0, c0, b1 = open_for(ledger, a, s0), open_for(ledger, b, s0), open_for(ledger, c, s0), open_for(ledger, b, s1)
    for participant_id, account, shard in ((a, a0, s0), (b, b1, s1)):
        own_bank = open_for(ledger, participant_id, shard, kind=accounts_pb2.SYSTEM)
        assert ledger.transfer(own_bank.account_id, account.account_id, 100_000).status == transfers_pb2.POSTED

    def pay() -> None:
        for debit, credit, amount in ((a0, b0, 300), (a0, c0, 200), (b1, a0, 100)):
            assert ledger.transfer(debit.account_id, credit.account_id, amount).status == transfers_pb2.POSTED

    return a, b, c, pay


def position(stub, participant_id: str, currency: str = "USD") -> int:
    return stub.GetPosition(pb.GetPositionRequest(participant_id=participant_id, currency=currency)).position_minor


def balance(ledger, account_id: str) -> int:
    return ledger.get(account_id).balance_minor


def record(stub, settlement_id: int, participant_id: str, currency: str = "USD") -> pb.Settlement:
    return stub.RecordParticipantSettled(pb.RecordParticipantSettledRequest(
        settlement_id=settlement_id, participant_id=participant_id, currency=currency
    ), timeout=30)


def create(stub, window_ids, model=pb.DEFERRED_NET, request_id=None) -> pb.Settlement:
    return stub.CreateSettlement(pb.CreateSettlementRequest(request_id=request_id or unique("stl"), window_ids=window_ids, model=model))


def test_deferred_net_settlement_moves_each_net_once_and_resets_positions(clearing_stub, ledger, owner_sql, three_banks, shard_map):
    a, b, c, pay = three_banks
    window_id = closed_window_with(clearing_stub, pay)
    assert [position(clearing_stub, p) for p in (a, b, c)] == [400, -200, -200]
    request_id = unique("stl")
    settlement = create(clearing_stub, [window_id], request_id=request_id)
    assert (settlement.model, settlement.state, list(settlement.window_ids)) == (pb.DEFERRED_NET, pb.SETTLEMENT_PENDING, [window_id])
    entries = {e.participant_id: e for e in settlement.entries}
    assert [e.participant_id for e in settlement.entries] == sorted([a, b, c])
    assert {p: (e.debits_minor, e.credits_minor, e.net_minor) for p, e in entries.items()} == {
        a: (500, 100, 400), b: (100, 300, -200), c: (0, 200, -200)
    }
    assert sum(e.net_minor for e in settlement.entries) == 0
    assert list(entries[a].transfer_ids) == [f"sys:stl:{settlement.settlement_id}:{a}:USD:net"]
    assert not any(e.settled for e in settlement.entries) and not settlement.HasField("settled_at")
    assert create(clearing_stub, [window_id], request_id=request_id) == settlement
    window = clearing_stub.GetSettlementWindow(pb.GetSettlementWindowRequest(window_id=window_id))
    assert (window.state, window.settlement_id) == (pb.WINDOW_PENDING_SETTLEMENT, settlement.settlement_id)

    bank = clearing.settlement_bank_account_id("USD")
    bank_before = balance(ledger, bank)
    after_a = record(clearing_stub, settlement.settlement_id, a)
    assert after_a.state == pb.SETTLEMENT_PENDING and {e.participant_id: e.settled for e in after_a.entries} == {a: True, b: False, c: False}
    assert balance(ledger, clearing.settlement_account_id(a, "USD")) == -400
    assert balance(ledger, bank) == bank_before + 400
    assert position(clearing_stub, a) == 0
    # A retry changes nothing.
    assert record(clearing_stub, settlement.settlement_id, a) == after_a
    assert balance(ledger, clearing.settlement_account_id(a, "USD")) == -400 and position(clearing_stub, a) == 0
    leg = ledger.payments.GetTransfer(payments_pb2.GetTransferRequest(transfer_id=entries[a].transfer_ids[0]))
    assert (leg.status, leg.amount_minor, leg.debit_account_id, leg.credit_account_id) == (
        transfers_pb2.POSTED, 400, clearing.settlement_account_id(a, "USD"), bank
    )

    record(clearing_stub, settlement.settlement_id, b)
    done = record(clearing_stub, settlement.settlement_id, c)
    assert done.state == pb.SETTLEMENT_SETTLED and done.HasField("settled_at") and all(e.settled for e in done.entries)
    assert [balance(ledger, clearing.settlement_account_id(p, "USD")) for p in (b, c)] == [200, 200]
    assert balance(ledger, bank) == bank_before
    assert [position(clearing_stub, p) for p in (a, b, c)] == [0, 0, 0]
    assert clearing_stub.GetSettlementWindow(pb.GetSettlementWindowRequest(window_id=window_id)).state == pb.WINDOW_SETTLED
    assert clearing_stub.GetSettlement(pb.GetSettlementRequest(settlement_id=settlement.settlement_id)) == done
    # One reset per shard and participant: the barrier rows.
    for shard in shard_map.shards:
        resets = owner_sql(shard.name, "SELECT participant_id FROM clearing_position_resets WHERE settlement_id = %s", (settlement.settlement_id,))
        assert sorted(r[0] for r in resets) == sorted([a, b, c])


def test_gross_settlement_moves_what_was_paid_and_received_separately(clearing_stub, ledger, owner_sql, three_banks):
    a, b, c, pay = three_banks
    window_id = closed_window_with(clearing_stub, pay)
    settlement = create(clearing_stub, [window_id], model=pb.GROSS)
    entries = {e.participant_id: e for e in settlement.entries}
    sid = settlement.settlement_id
    assert list(entries[a].transfer_ids) == [f"sys:stl:{sid}:{a}:USD:paid", f"sys:stl:{sid}:{a}:USD:received"]
    assert list(entries[c].transfer_ids) == [f"sys:stl:{sid}:{c}:USD:received"]  # no zero leg
    for participant_id in (a, b, c):
        settled = record(clearing_stub, sid, participant_id)
    assert settled.state == pb.SETTLEMENT_SETTLED
    own = clearing.settlement_account_id(a, "USD")
    account = ledger.get(own)
    assert (account.debits_posted_minor, account.credits_posted_minor) == (500, 100)
    assert [balance(ledger, clearing.settlement_account_id(p, "USD")) for p in (b, c)] == [200, 200]
    assert [position(clearing_stub, p) for p in (a, b, c)] == [0, 0, 0]


def test_several_windows_settle_together_and_an_empty_one_is_settled_at_once(clearing_stub, owner_sql, three_banks):
    a, b, c, pay = three_banks
    first = closed_window_with(clearing_stub, pay)
    second = closed_window_with(clearing_stub, pay)
    settlement = create(clearing_stub, [second, first])
    assert list(settlement.window_ids) == [first, second]
    assert {e.participant_id: e.net_minor for e in settlement.entries} == {a: 800, b: -400, c: -400}
    empty = closed_window_with(clearing_stub, lambda: None)
    nothing = create(clearing_stub, [empty])
    assert (nothing.state, list(nothing.entries)) == (pb.SETTLEMENT_SETTLED, [])
    assert clearing_stub.GetSettlementWindow(pb.GetSettlementWindowRequest(window_id=empty)).state == pb.WINDOW_SETTLED


def test_create_settlement_refusals(clearing_stub, owner_sql, three_banks):
    _, _, _, pay = three_banks
    window_id = closed_window_with(clearing_stub, pay)
    open_id = clearing_stub.GetSettlementWindow(pb.GetSettlementWindowRequest()).window_id
    request_id = unique("stl")
    settlement = create(clearing_stub, [window_id], request_id=request_id)

    def refused(request) -> tuple:
        with pytest.raises(grpc.RpcError) as raised:
            clearing_stub.CreateSettlement(request)
        return failure(raised.value)

    invalid = grpc.StatusCode.INVALID_ARGUMENT
    cases = [
        (pb.CreateSettlementRequest(request_id=unique("s"), model=pb.DEFERRED_NET), invalid, "MISSING_FIELD", "window_ids"),
        (pb.CreateSettlementRequest(request_id=unique("s"), window_ids=[1, 1], model=pb.DEFERRED_NET), invalid, "INVALID_FIELD", "window_ids"),
        (pb.CreateSettlementRequest(request_id=unique("s"), window_ids=list(range(1, 102)), model=pb.GROSS), invalid, "INVALID_FIELD", "window_ids"),
        (pb.CreateSettlementRequest(request_id=unique("s"), window_ids=[window_id]), invalid, "INVALID_FIELD", "model"),
        (pb.CreateSettlementRequest(request_id=unique("s"), window_ids=[window_id], model=7), invalid, "INVALID_FIELD", "model"),
        (pb.CreateSettlementRequest(window_ids=[window_id], model=pb.GROSS), invalid, "MISSING_FIELD", "request_id"),
        (pb.CreateSettlementRequest(request_id=unique("s"), window_ids=[10**12], model=pb.GROSS),
         grpc.StatusCode.NOT_FOUND, "SETTLEMENT_WINDOW_NOT_FOUND", None),
        (pb.CreateSettlementRequest(request_id=unique("s"), window_ids=[open_id], model=pb.GROSS),
         grpc.StatusCode.FAILED_PRECONDITION, "SETTLEMENT_WINDOW_NOT_CLOSED", None),
        (pb.CreateSettlementRequest(request_id=unique("s"), window_ids=[window_id], model=pb.GROSS),
         grpc.StatusCode.FAILED_PRECONDITION, "SETTLEMENT_WINDOW_ALREADY_SETTLED", None),
        (pb.CreateSettlementRequest(request_id=request_id, window_ids=[window_id], model=pb.GROSS),
         grpc.StatusCode.ALREADY_EXISTS, "IDEMPOTENCY_CONFLICT", None),
    ]
    for request, code, reason, field in cases:
        got_code, got_reason, metadata = refused(request)
        assert (got_code, got_reason) == (code, reason), request
        if field:
            assert metadata["field"] == field
        if reason == "SETTLEMENT_WINDOW_ALREADY_SETTLED":
            assert metadata["settlement_id"] == str(settlement.settlement_id)
        if reason == "IDEMPOTENCY_CONFLICT":
            assert metadata["conflicting_fields"] == "model"
    assert clearing_stub.GetSettlementWindow(pb.GetSettlementWindowRequest(window_id=open_id)).state == pb.WINDOW_OPEN


def test_record_refusals(clearing_stub, owner_sql, three_banks):
    a, _, _, pay = three_banks
    settlement = create(clearing_stub, [closed_window_with(clearing_stub, pay)])
    cases = [
        (pb.RecordParticipantSettledRequest(settlement_id=10**12, participant_id=a, currency="USD"), grpc.StatusCode.NOT_FOUND, "SETTLEMENT_NOT_FOUND"),
        (pb.RecordParticipantSettledRequest(settlement_id=settlement.settlement_id, participant_id=a, currency="EUR"),
         grpc.StatusCode.NOT_FOUND, "SETTLEMENT_ENTRY_NOT_FOUND"),
        (pb.RecordParticipantSettledRequest(settlement_id=settlement.settlement_id, participant_id="someone-else", currency="USD"),
         grpc.StatusCode.NOT_FOUND, "SETTLEMENT_ENTRY_NOT_FOUND"),
        (pb.RecordParticipantSettledRequest(participant_id=a, currency="USD"), grpc.StatusCode.INVALID_ARGUMENT, "MISSING_FIELD"),
        (pb.RecordParticipantSettledRequest(settlement_id=settlement.settlement_id, participant_id=a), grpc.StatusCode.INVALID_ARGUMENT, "MISSING_FIELD"),
    ]
    for request, code, reason in cases:
        with pytest.raises(grpc.RpcError) as raised:
            clearing_stub.RecordParticipantSettled(request)
        assert failure(raised.value)[:2] == (code, reason), request
    with pytest.raises(grpc.RpcError) as raised:
        clearing_stub.GetSettlement(pb.GetSettlementRequest(settlement_id=10**12))
    assert failure(raised.value)[:2] == (grpc.StatusCode.NOT_FOUND, "SETTLEMENT_NOT_FOUND")


class Crash(Exception):
    """What the in-process service raises at its crash point, as the process's death would stop it."""


def crashing_at(step: str):
    def reached(at: str) -> None:
        if at == step:
            raise Crash(step)

    return reached


async def _in_process(cluster: dict, run) -> None:
    """`run(service)` with a ClearingService of this process on the test cluster's shards."""
    shards = await ShardConnections.open(cluster["etcd_endpoint"])
    limits = TierLimits.load()
    ledger_service = LedgerService(shards.router, limits, wiring.transfer_driver(shards.router, limits, owner="clearing-crash-test"))
    try:
        await run(ClearingService(shards.router, ledger_service))
    finally:
        await ledger_service.drain()
        await shards.close()


@pytest.mark.parametrize("step", [clearing_service.AFTER_ACCOUNTS, clearing_service.AFTER_LEGS, clearing_service.AFTER_RESETS])
def test_a_record_that_crashed_between_steps_is_completed_by_a_retry(cluster, clearing_stub, ledger, owner_sql, three_banks, step):
    a, b, c, pay = three_banks
    settlement = create(clearing_stub, [closed_window_with(clearing_stub, pay)], model=pb.GROSS)

    async def crash(service: ClearingService) -> None:
        service.reached = crashing_at(step)
        with pytest.raises(Crash):
            await service.record_participant_settled(LEDGER, settlement.settlement_id, a, "USD", 20)

    asyncio.run(_in_process(cluster, crash))
    half = clearing_stub.GetSettlement(pb.GetSettlementRequest(settlement_id=settlement.settlement_id))
    assert not half.entries[[e.participant_id for e in half.entries].index(a)].settled
    for participant_id in (a, b, c):
        done = record(clearing_stub, settlement.settlement_id, participant_id)
    assert done.state == pb.SETTLEMENT_SETTLED
    account = ledger.get(clearing.settlement_account_id(a, "USD"))
    assert (account.debits_posted_minor, account.credits_posted_minor) == (500, 100)
    assert [position(clearing_stub, p) for p in (a, b, c)] == [0, 0, 0]


def test_a_close_that_crashed_halfway_is_finished_by_its_retry(cluster, clearing_stub, owner_sql, shard_map):
    request_id = unique("close")
    open_before = clearing_stub.GetSettlementWindow(pb.GetSettlementWindowRequest()).window_id

    async def crash(service: ClearingService) -> None:
        service.reached = crashing_at(clearing_service.AFTER_CLOSE_STARTED)
        with pytest.raises(Crash):
            await service.close_settlement_window(LEDGER, request_id, "crash", 10)

    asyncio.run(_in_process(cluster, crash))
    assert clearing_stub.GetSettlementWindow(pb.GetSettlementWindowRequest(window_id=open_before)).state == pb.WINDOW_CLOSING
    answer = close_window(clearing_stub, reason="crash", request_id=request_id)
    assert (answer.closed_window.window_id, answer.closed_window.state, answer.open_window.window_id) == (
        open_before, pb.WINDOW_CLOSED, open_before + 1
    )
    for shard in shard_map.shards:
        assert owner_sql(shard.name, "SELECT window_id FROM clearing_shard_window")[0][0] == open_before + 1


def test_the_coordinators_finish_a_close_nobody_retries(cluster, clearing_stub, shard_map, owner_sql):
    from services.coordinator import window_recovery

    open_before = clearing_stub.GetSettlementWindow(pb.GetSettlementWindowRequest()).window_id

    async def crash(service: ClearingService) -> None:
        service.reached = crashing_at(clearing_service.AFTER_CLOSE_STARTED)
        with pytest.raises(Crash):
            await service.close_settlement_window(LEDGER, unique("close"), "abandoned", 10)

    asyncio.run(_in_process(cluster, crash))
    give_up_at = time.monotonic() + 3 * (window_recovery.CLOSING_GRACE_SECONDS + window_recovery.WINDOW_RECOVERY_INTERVAL_SECONDS)
    while clearing_stub.GetSettlementWindow(pb.GetSettlementWindowRequest(window_id=open_before)).state == pb.WINDOW_CLOSING:
        assert time.monotonic() < give_up_at, "no coordinator finished the close"
        time.sleep(0.5)
    assert clearing_stub.GetSettlementWindow(pb.GetSettlementWindowRequest(window_id=open_before)).state == pb.WINDOW_CLOSED
    for shard in shard_map.shards:
        assert owner_sql(shard.name, "SELECT window_id FROM clearing_shard_window")[0][0] == open_before + 1
