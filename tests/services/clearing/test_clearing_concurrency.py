"""Clearing under concurrency, through the gRPC contract, judged from the databases.

- A net debit cap holds whatever the interleaving: one capped participant, payers on every
  shard, many concurrent transfers (Transfer and CreateTransfers mixed, same shard and between
  shards) asking for several times the cap. Sampled while they run, no shard's share is ever
  exposed past its allotment; at the end the allotments sum to the cap at most, the position
  is within the cap, and exactly as many transfers posted as fit (all amounts equal: position
  == cap - cap mod amount); every other one was refused NET_DEBIT_CAP_EXCEEDED, recorded.
- Two CreateSettlement with different request ids on the same window at once: exactly one wins,
  the window is in that settlement only, and the loser leaves nothing behind.
- Concurrent closes with different request ids: each closes a window of its own, the windows
  stay a clean sequence with exactly one OPEN, and a retry answers the same pair.

    CLEARING_CONCURRENCY_ROUNDS=20 pytest tests/services/clearing/test_clearing_concurrency.py   # the long form
"""

from __future__ import annotations

import concurrent.futures
import os
import threading

import grpc
import psycopg
import pytest
from google.rpc import error_details_pb2

from corebank.v1 import clearing_pb2, payments_pb2, transfers_pb2
from services.storage.audit import audit_cluster, reader_dsn
from tests.fixtures import clearing as books
from tests.fixtures.clearing import ClearingClient, closed_pair
from tests.fixtures.ledger import failure

pytestmark = pytest.mark.cluster

ROUNDS = int(os.environ.get("CLEARING_CONCURRENCY_ROUNDS") or 3)
CURRENCY = "CNY"
AMOUNT_MINOR = 700
CAP_MINOR = 10_100  # 14 transfers of 700 fit (9 800), the 15th would pass it
PAYERS_PER_SHARD = 3
TRANSFERS_PER_PAYER = 5  # 45 transfers asking for 31 500: three times the cap
BATCH_SIZE = 3
THREADS = 12
FUNDING_MINOR = 1_000_000
CALL_TIMEOUT_SECONDS = 20.0


@pytest.fixture(scope="module")
def clearing(grpc_channel, ledger) -> ClearingClient:
    return ClearingClient(grpc_channel, ledger)


def result_outcome(result) -> str:
    if result.HasField("transfer"):
        return transfers_pb2.TransferStatus.Name(result.transfer.status)
    info = error_details_pb2.ErrorInfo()
    assert result.error.details and result.error.details[0].Unpack(info), f"no ErrorInfo in {result.error}"
    return info.reason


def sample_shares(shards: list[dict], participant_id: str, currency: str) -> list[str]:
    """Each shard's share, in one snapshot each: never exposed past its allotment."""
    problems = []
    for shard in shards:
        with psycopg.connect(reader_dsn(shard), autocommit=True) as connection:
            for position, reserved, allotment in connection.execute(
                    "SELECT position_minor, reserved_minor, allotment_minor FROM clearing_positions WHERE participant_id = %s AND currency = %s",
                    [participant_id, currency]):
                if allotment is None:
                    problems.append(f"{shard['name']}: a capped participant's share has no allotment")
                elif position + reserved > allotment:
                    problems.append(f"{shard['name']}: position {position} + reserved {reserved} past the allotment {allotment}")
    return problems


def test_a_net_debit_cap_holds_under_concurrent_transfers_from_every_shard(cluster, clearing, ledger, shard_map):
    token = books.run_token()
    capped, payee = f"h4cap-{token}", f"h4rcv-{token}"
    for participant in (capped, payee):
        clearing.register(participant, [CURRENCY])
    shards = [shard.name for shard in shard_map.shards]
    payers = [clearing.funded(capped, shard, FUNDING_MINOR, CURRENCY).account_id for shard in shards for _ in range(PAYERS_PER_SHARD)]
    payees = [clearing.open(payee, shard, currency=CURRENCY).account_id for shard in shards]
    position = clearing.set_cap(capped, CURRENCY, CAP_MINOR, threshold_percent=50)
    assert (position.net_debit_cap_set, position.net_debit_cap_minor, position.position_minor) == (True, CAP_MINOR, 0)
    # The work: per payer, its transfers to every shard in turn; a third of them in CreateTransfers calls.
    work = []
    for p, payer in enumerate(payers):
        for n in range(TRANSFERS_PER_PAYER):
            work.append(payments_pb2.TransferRequest(
                transfer_id=f"h4cap-{token}-{p}-{n}", debit_account_id=payer, credit_account_id=payees[(p + n) % len(payees)],
                amount_minor=AMOUNT_MINOR, currency=CURRENCY))
    calls = []
    index = 0
    while index < len(work):
        size = BATCH_SIZE if (index // BATCH_SIZE) % 3 == 1 else 1
        calls.append(work[index:index + size])
        index += size
    outcomes: dict[str, str] = {}
    lock = threading.Lock()
    stop = threading.Event()
    sampled: list[str] = []

    def call(requests) -> None:
        try:
            if len(requests) == 1:
                answered = [transfers_pb2.TransferStatus.Name(ledger.payments.Transfer(requests[0], timeout=CALL_TIMEOUT_SECONDS).status)]
            else:
                response = ledger.payments.CreateTransfers(payments_pb2.CreateTransfersRequest(transfers=requests), timeout=CALL_TIMEOUT_SECONDS)
                answered = [result_outcome(r) for r in response.results]
        except grpc.RpcError as error:
            code, reason, metadata = failure(error)
            answered = [reason] * len(requests)
            if reason == "NET_DEBIT_CAP_EXCEEDED" and (metadata.get("participant_id"), metadata.get("currency")) != (capped, CURRENCY):
                with lock:
                    sampled.append(f"NET_DEBIT_CAP_EXCEEDED without its metadata (participant_id, currency): {metadata}")
        with lock:
            outcomes.update({r.transfer_id: a for r, a in zip(requests, answered)})

    def monitor() -> None:
        while not stop.is_set():
            sampled.extend(sample_shares(cluster["shards"], capped, CURRENCY))
            stop.wait(0.01)

    watcher = threading.Thread(target=monitor, daemon=True)
    watcher.start()
    try:
        with concurrent.futures.ThreadPoolExecutor(THREADS) as pool:
            for future in [pool.submit(call, requests) for requests in calls]:
                future.result()
    finally:
        stop.set()
        watcher.join()
    state = books.wait_quiet(cluster["shards"], clearing.home_shard)
    fit = CAP_MINOR // AMOUNT_MINOR
    posted = sorted(t for t, o in outcomes.items() if o == "POSTED")
    refused = {t: o for t, o in outcomes.items() if o != "POSTED"}
    assert sampled == [], sampled[:20]
    assert set(refused.values()) <= {"NET_DEBIT_CAP_EXCEEDED"}, refused
    assert len(posted) == fit, f"{len(posted)} posted, {fit} fit under the cap: {sorted(outcomes.items())}"
    stored, reserved = state.position_total(capped, CURRENCY)
    assert (stored, reserved) == (fit * AMOUNT_MINOR, 0)
    assert stored == CAP_MINOR - CAP_MINOR % AMOUNT_MINOR
    allotments = [a for (s, p, c), (_, _, a) in state.positions.items() if (p, c) == (capped, CURRENCY)]
    assert len(allotments) == len(shards) and None not in allotments and sum(allotments) <= CAP_MINOR, allotments
    assert state.violations() == []
    # Refusals are recorded REJECTED with their reason, and a retry answers the same.
    for transfer_id in list(refused)[:5]:
        stored_transfer = ledger.payments.GetTransfer(payments_pb2.GetTransferRequest(transfer_id=transfer_id))
        assert (stored_transfer.status, stored_transfer.reason) == (transfers_pb2.REJECTED, "NET_DEBIT_CAP_EXCEEDED")
        retry = next(r for r in work if r.transfer_id == transfer_id)
        with pytest.raises(grpc.RpcError) as raised:
            ledger.payments.Transfer(retry, timeout=CALL_TIMEOUT_SECONDS)
        code, reason, _ = failure(raised.value)
        assert (code, reason) == (grpc.StatusCode.FAILED_PRECONDITION, "NET_DEBIT_CAP_EXCEEDED")
    position = clearing.position(capped, CURRENCY)
    assert (position.position_minor, position.headroom_minor, position.threshold_reached) == (stored, CAP_MINOR - stored, True)
    # Money moved only as the posted transfers say.
    assert audit_cluster(cluster["shards"]).violations() == []


def test_a_capped_participant_pays_again_once_it_is_paid(cluster, clearing, ledger, shard_map):
    """A payment to the capped participant lowers its position: the headroom comes back at once."""
    token = books.run_token()
    capped, other = f"h4cap2-{token}", f"h4oth-{token}"
    for participant in (capped, other):
        clearing.register(participant, [CURRENCY])
    shards = [shard.name for shard in shard_map.shards]
    payer = clearing.funded(capped, shards[0], FUNDING_MINOR, CURRENCY).account_id
    friend = clearing.funded(other, shards[1], FUNDING_MINOR, CURRENCY).account_id
    clearing.set_cap(capped, CURRENCY, 1_000)
    assert ledger.transfer(payer, friend, 1_000, CURRENCY).status == transfers_pb2.POSTED
    with pytest.raises(grpc.RpcError) as raised:
        ledger.transfer(payer, friend, 1, CURRENCY)
    assert failure(raised.value)[:2] == (grpc.StatusCode.FAILED_PRECONDITION, "NET_DEBIT_CAP_EXCEEDED")
    assert ledger.transfer(friend, payer, 400, CURRENCY).status == transfers_pb2.POSTED
    assert ledger.transfer(payer, friend, 400, CURRENCY).status == transfers_pb2.POSTED
    with pytest.raises(grpc.RpcError) as raised:
        ledger.transfer(payer, friend, 1, CURRENCY)
    assert failure(raised.value)[1] == "NET_DEBIT_CAP_EXCEEDED"
    # A cap of 0: owes nothing more, can still receive.
    clearing.set_cap(capped, CURRENCY, 0)
    assert ledger.transfer(friend, payer, 5, CURRENCY).status == transfers_pb2.POSTED
    assert books.wait_quiet(cluster["shards"], clearing.home_shard).violations() == []


def post_one_cleared(clearing: ClearingClient, ledger, shards: list[str], payer: str, payee: str, tag: str) -> None:
    a = clearing.funded(payer, shards[0], 10_000, CURRENCY).account_id
    b = clearing.open(payee, shards[-1], currency=CURRENCY).account_id
    assert ledger.transfer(a, b, 123, CURRENCY, transfer_id=tag).status == transfers_pb2.POSTED


def race(*calls):
    """Run the calls at once (a barrier before each); their (answer or None, (code, reason) or None)."""
    barrier = threading.Barrier(len(calls))

    def run(call):
        barrier.wait()
        try:
            return call(), None
        except grpc.RpcError as error:
            return None, failure(error)[:2]

    with concurrent.futures.ThreadPoolExecutor(len(calls)) as pool:
        return [f.result() for f in [pool.submit(run, call) for call in calls]]


def test_two_settlements_of_one_window_at_once_exactly_one_wins(cluster, clearing, ledger, shard_map):
    token = books.run_token()
    payer, payee = f"h4sa-{token}", f"h4sb-{token}"
    for participant in (payer, payee):
        clearing.register(participant, [CURRENCY])
    shards = [shard.name for shard in shard_map.shards]
    for round_ in range(ROUNDS):
        windows = []
        for k in range(3):
            post_one_cleared(clearing, ledger, shards, payer, payee, f"h4s2-{token}-{round_}-{k}")
            windows.append(closed_pair(clearing.close(f"h4s2c-{token}-{round_}-{k}"))[0])
        # Same window, and overlapping sets: [w0, w1] against [w1, w2].
        for case, (left, right) in enumerate((([windows[0]], [windows[0]]), ([windows[1], windows[2]], [windows[2]]))):
            answers = race(lambda: clearing.create_settlement(f"h4s2a-{token}-{round_}-{case}", left),
                           lambda: clearing.create_settlement(f"h4s2b-{token}-{round_}-{case}", right))
            winners = [a for a, e in answers if a is not None]
            losers = [e for a, e in answers if e is not None]
            assert len(winners) == 1, answers
            assert losers == [(grpc.StatusCode.FAILED_PRECONDITION, "SETTLEMENT_WINDOW_ALREADY_SETTLED")], answers
            winner = winners[0]
            state = books.read_books(cluster["shards"], clearing.home_shard)
            holding = {w: [s for s, v in state.settlements.items() if w in v[3]] for w in set(left) | set(right)}
            for window, settlements in holding.items():
                if window in winner.window_ids:
                    assert settlements == [winner.settlement_id], holding
                    assert state.windows[window][:2] == (books.WINDOW_PENDING_SETTLEMENT, winner.settlement_id)
                else:
                    assert settlements == [], holding  # the loser's other window is left as it was
                    assert state.windows[window][:2] == (books.WINDOW_CLOSED, None)
            clearing.settle_all(winner)
        leftover = [w for w in windows if books.read_books(cluster["shards"], clearing.home_shard).windows[w][0] == books.WINDOW_CLOSED]
        if leftover:
            clearing.settle_all(clearing.create_settlement(f"h4s2l-{token}-{round_}", leftover))
    assert books.wait_quiet(cluster["shards"], clearing.home_shard).violations() == []


def test_concurrent_closes_keep_the_windows_a_clean_sequence(cluster, clearing, ledger):
    token = books.run_token()
    for round_ in range(ROUNDS):
        ids = [f"h4cc-{token}-{round_}-{i}" for i in range(4)]
        answers = race(*[lambda request_id=request_id: clearing.close(request_id) for request_id in ids],
                       *[lambda request_id=request_id: clearing.close(request_id) for request_id in ids[:2]])  # retries racing their first try
        assert [e for _, e in answers if e is not None] == [], [e for _, e in answers]
        pairs = [closed_pair(a) for a, _ in answers]
        first = dict(zip(ids, pairs[:4]))
        assert len({p[0] for p in first.values()}) == 4, first  # one window each
        assert [first[i] for i in ids[:2]] == pairs[4:], (first, pairs[4:])  # a retry answers the same pair
        closed = sorted(p[0] for p in first.values())
        assert closed == list(range(closed[0], closed[0] + 4)), closed
        assert all(p[1] == p[0] + 1 for p in first.values())
        for request_id in ids:  # later retries too, in any order
            assert closed_pair(clearing.close(request_id)) == first[request_id]
        state = books.wait_quiet(cluster["shards"], clearing.home_shard)
        assert state.open_windows == [closed[-1] + 1]
        assert all(state.windows[w][0] == books.WINDOW_CLOSED for w in closed)
        assert {state.windows[w][2] for w in closed} == set(ids)
        assert state.violations() == []
    assert clearing.window(0).state == clearing_pb2.WINDOW_OPEN
