"""Clearing end to end against the real cluster: transfers between participants' accounts (on one
shard and between shards) move positions and window totals as they post, a cap refuses what
would pass it, and a settlement of their window takes them out of the positions again."""

from __future__ import annotations

import grpc
import pytest

from corebank.v1 import accounts_pb2
from corebank.v1 import clearing_pb2 as pb
from corebank.v1 import transfers_pb2
from services.ledger import clearing
from tests.fixtures.ledger import failure
from tests.services.clearing.conftest import close_window, register
from tests.services.clearing.test_clearing_api_settlement import create, open_for, position, record


def test_transfers_between_participants_are_cleared_and_settled(clearing_stub, ledger, shard_map):
    s0, s1 = shard_map.shards[0].name, shard_map.shards[1].name
    p, q = (register(clearing_stub, ("USD",)).participant_id for _ in range(2))
    hosting_before = position(clearing_stub, clearing.HOSTING_PARTICIPANT_ID)
    window_id = close_window(clearing_stub).open_window.window_id
    payer = open_for(ledger, p, s0)
    payees = [open_for(ledger, q, s0), open_for(ledger, q, s1)]
    assert ledger.transfer(ledger.bank(s0).account_id, payer.account_id, 10_000).status == transfers_pb2.POSTED  # corebank -> p
    assert ledger.transfer(payer.account_id, payees[0].account_id, 700).status == transfers_pb2.POSTED  # same shard
    assert ledger.transfer(payer.account_id, payees[1].account_id, 300).status == transfers_pb2.POSTED  # between shards
    assert [position(clearing_stub, x) for x in (p, q)] == [-9_000, -1_000]
    assert position(clearing_stub, clearing.HOSTING_PARTICIPANT_ID) == hosting_before + 10_000
    window = clearing_stub.GetSettlementWindow(pb.GetSettlementWindowRequest(window_id=window_id))
    amounts = {a.participant_id: (a.debits_minor, a.credits_minor) for a in window.amounts}
    assert amounts[p] == (1_000, 10_000) and amounts[q] == (0, 1_000)
    assert window.transfer_count == 3
    view = clearing_stub.GetPosition(pb.GetPositionRequest(participant_id=p, currency="USD"))
    assert (view.window_id, view.window_position_minor) == (window_id, -9_000)

    close_window(clearing_stub)
    settlement = create(clearing_stub, [window_id])
    assert {e.participant_id: e.net_minor for e in settlement.entries} == {clearing.HOSTING_PARTICIPANT_ID: 10_000, p: -9_000, q: -1_000}
    for participant_id in (clearing.HOSTING_PARTICIPANT_ID, p, q):
        done = record(clearing_stub, settlement.settlement_id, participant_id)
    assert done.state == pb.SETTLEMENT_SETTLED
    assert [position(clearing_stub, x) for x in (p, q)] == [0, 0]
    assert position(clearing_stub, clearing.HOSTING_PARTICIPANT_ID) == hosting_before
    assert [ledger.get(clearing.settlement_account_id(x, "USD")).balance_minor for x in (p, q)] == [9_000, 1_000]


def test_a_net_debit_cap_refuses_what_would_pass_it(clearing_stub, ledger, shard_map):
    s0, s1 = shard_map.shards[0].name, shard_map.shards[1].name
    r, q = (register(clearing_stub, ("USD",)).participant_id for _ in range(2))
    payer = open_for(ledger, r, s0)
    payee = open_for(ledger, q, s1)
    # Funded by r's own bank account (within one participant: not cleared).
    own_bank = open_for(ledger, r, s0, kind=accounts_pb2.SYSTEM)
    ledger.transfer(own_bank.account_id, payer.account_id, 5_000)
    capped = clearing_stub.SetNetDebitCap(pb.SetNetDebitCapRequest(participant_id=r, currency="USD", cap_minor=1_000, threshold_percent=50))
    assert (capped.position_minor, capped.headroom_minor) == (0, 1_000)
    assert ledger.transfer(payer.account_id, payee.account_id, 1_000 - 1).status == transfers_pb2.POSTED
    with pytest.raises(grpc.RpcError) as raised:
        ledger.transfer(payer.account_id, payee.account_id, 2)
    code, reason, metadata = failure(raised.value)
    assert (code, reason, metadata["participant_id"]) == (grpc.StatusCode.FAILED_PRECONDITION, "NET_DEBIT_CAP_EXCEEDED", r)
    now = clearing_stub.GetPosition(pb.GetPositionRequest(participant_id=r, currency="USD"))
    assert (now.position_minor, now.headroom_minor, now.threshold_reached) == (999, 1, True)
