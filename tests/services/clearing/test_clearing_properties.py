"""Clearing's properties, judged from the databases (tests/fixtures/clearing.py), through the
gRPC contract only: written as another team would, against protos/corebank/v1/clearing.proto.

- Windows under load: random sets of transfers between accounts of three participants (same
  shard, between shards, to a collecting merchant; some refused for lack of funds, an unknown
  account, a frozen payee) run concurrently with CloseSettlementWindow at random points. Then,
  from the databases: every POSTED cleared transfer is in exactly one window (on its debit
  shard), no refused one in any; every window's totals are its transfers'; every position is
  its windows' nets; nets sum to zero; exactly one window OPEN; a window's totals and
  transfers never change once it is closed; what was acknowledged before a close began is in
  the closed window or an earlier one, what was sent after the close answered is in a later one.
- Settlement (DEFERRED_NET and GROSS): entries sum to zero and are the ledger's transfers'
  sums; recording every entry moves the settlement accounts by its legs (GetAccount and the
  databases), takes the windows out of the positions, settles the settlement and its windows;
  retries answer the same and move nothing twice.
- The Mojaloop #2105 race: a settlement created the instant a close answers, while transfers
  stream, holds every transfer posted before the close and none sent after it.

    CLEARING_EXAMPLES=200 pytest tests/services/clearing/test_clearing_properties.py   # the long form
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import threading
import time

import grpc
import pytest
from hypothesis import HealthCheck, Phase, given, note, seed, settings
from hypothesis import strategies as st

from corebank.v1 import accounts_pb2, clearing_pb2, payments_pb2, transfers_pb2
from tests.fixtures import clearing as books
from tests.fixtures.clearing import ClearingClient, closed_pair
from tests.fixtures.ledger import failure

pytestmark = pytest.mark.cluster

EXAMPLES = int(os.environ.get("CLEARING_EXAMPLES") or 8)
SEED = int(os.environ.get("SEED") or 20240611)
CURRENCY = "EUR"
FUNDING_MINOR = 50_000_000
AMOUNT_MINOR_MAX = 20_000
# Past any funding: refused INSUFFICIENT_FUNDS (under tier 3's transfer cap).
TOO_MUCH_MINOR = 900_000_000
THREADS = 8
TRANSFERS_MIN = 10
TRANSFERS_MAX = 40
CALL_TIMEOUT_SECONDS = 15.0


@dataclasses.dataclass
class World:
    token: str
    participants: list[str]
    shards: list[str]
    accounts: dict[tuple[int, int], str]  # (participant index, shard index) -> a funded customer
    frozen: dict[tuple[int, int], str]  # (participant index, shard index) -> a frozen customer
    merchant: str  # collecting on every shard, of participant 2
    ghost: str  # well formed, never opened


@pytest.fixture(scope="module")
def clearing(grpc_channel, ledger) -> ClearingClient:
    return ClearingClient(grpc_channel, ledger)


@pytest.fixture(scope="module")
def world(clearing: ClearingClient, shard_map) -> World:
    token = books.run_token()
    participants = [f"h4p-{token}-{i}" for i in range(3)]
    for participant in participants:
        clearing.register(participant, [CURRENCY, "USD"])
    shards = [shard.name for shard in shard_map.shards]
    accounts = {(p, s): clearing.funded(participants[p], shards[s], FUNDING_MINOR, CURRENCY).account_id
                for p in range(3) for s in range(len(shards))}
    frozen = {}
    for p in range(3):
        for s in range(len(shards)):
            frozen[p, s] = clearing.open(participants[p], shards[s], currency=CURRENCY).account_id
            clearing.ledger.accounts.UpdateAccountStatus(accounts_pb2.UpdateAccountStatusRequest(account_id=frozen[p, s], status=accounts_pb2.FROZEN))
    merchant = clearing.open(participants[2], kind=accounts_pb2.MERCHANT, tier=3, currency=CURRENCY, collect_on_every_shard=True).account_id
    return World(token, participants, shards, accounts, frozen, merchant, "acc_" + "q" * 26)


def cluster_books(cluster, clearing: ClearingClient, transfer_ids=()) -> books.Books:
    return books.read_books(cluster["shards"], clearing.home_shard, transfer_ids)


def quiet_books(cluster, clearing: ClearingClient) -> books.Books:
    return books.wait_quiet(cluster["shards"], clearing.home_shard)


# ---------------------------------------------------------------------------------------
# Windows under load.

transfers = st.lists(
    st.tuples(
        st.integers(0, 2), st.integers(0, 2),  # payer participant, payer shard
        st.sampled_from(["account", "account", "account", "merchant", "unknown", "frozen", "poor"]),
        st.integers(0, 2), st.integers(0, 2),  # payee participant, payee shard
        st.integers(1, AMOUNT_MINOR_MAX),
        st.sampled_from(["transfer", "transfer", "batch"]),
    ),
    min_size=TRANSFERS_MIN, max_size=TRANSFERS_MAX,
)
close_points = st.lists(st.floats(0, 1), min_size=1, max_size=3)


@dataclasses.dataclass
class Sent:
    transfer_id: str
    sent: float = 0.0
    answered: float = 0.0
    outcome: str = ""  # POSTED, or the refusal's reason, or the ambiguous code


@dataclasses.dataclass
class Closed:
    request_id: str
    sent: float = 0.0
    answered: float = 0.0
    pair: tuple[int, int] | None = None
    state: int = 0
    snapshot: dict | None = None
    error: str = ""


def make_request(world: World, item, transfer_id: str) -> payments_pb2.TransferRequest:
    payer_p, payer_s, target, payee_p, payee_s, amount, _ = item
    debit = world.accounts[payer_p, payer_s]
    credit = {
        "account": lambda: world.accounts[payee_p, payee_s] if (payee_p, payee_s) != (payer_p, payer_s) else world.accounts[(payee_p + 1) % 3, payee_s],
        "merchant": lambda: world.merchant,
        "unknown": lambda: world.ghost,
        "frozen": lambda: world.frozen[payee_p, payee_s],
        "poor": lambda: world.accounts[(payer_p + 1) % 3, payee_s],
    }[target]()
    if target == "poor":
        amount = TOO_MUCH_MINOR
    return payments_pb2.TransferRequest(transfer_id=transfer_id, debit_account_id=debit, credit_account_id=credit,
                                        amount_minor=amount, currency=CURRENCY)


def send(ledger, requests: list[payments_pb2.TransferRequest], sents: list[Sent], batch: bool) -> None:
    now = time.monotonic()
    for sent in sents:
        sent.sent = now
    try:
        if batch:
            response = ledger.payments.CreateTransfers(payments_pb2.CreateTransfersRequest(transfers=requests), timeout=CALL_TIMEOUT_SECONDS)
            outcomes = []
            for result in response.results:
                if result.HasField("transfer"):
                    outcomes.append(transfers_pb2.TransferStatus.Name(result.transfer.status))
                else:
                    from google.rpc import error_details_pb2
                    info = error_details_pb2.ErrorInfo()
                    result.error.details[0].Unpack(info)
                    outcomes.append(info.reason)
        else:
            answer = ledger.payments.Transfer(requests[0], timeout=CALL_TIMEOUT_SECONDS)
            outcomes = [transfers_pb2.TransferStatus.Name(answer.status)]
    except grpc.RpcError as error:
        try:
            outcomes = [failure(error)[1]] * len(sents)
        except AssertionError:
            outcomes = [error.code().name] * len(sents)
    now = time.monotonic()
    for sent, outcome in zip(sents, outcomes):
        sent.answered, sent.outcome = now, outcome


def close_now(clearing: ClearingClient, cluster, closed: Closed) -> None:
    closed.sent = time.monotonic()
    try:
        answer = clearing.close(closed.request_id, reason="property test")
    except grpc.RpcError as error:
        closed.error = f"{error.code().name}: {error.details()}"
        return
    closed.answered = time.monotonic()
    closed.pair, closed.state = closed_pair(answer), answer.closed_window.state
    # What the closed window holds right after its close: it must never change again.
    closed.snapshot = cluster_books(cluster, clearing).window_snapshot([closed.pair[0]])


def test_windows_closed_under_load_lose_and_duplicate_no_transfer(cluster, clearing, world, ledger):
    counter = iter(range(10**9))
    tally = {"cleared": 0, "uncleared": 0, "refused": 0, "closes": 0, "between shards": 0, "collected": 0}

    @seed(SEED)
    @settings(max_examples=EXAMPLES, deadline=None, database=None, print_blob=True,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    @given(items=transfers, points=close_points)
    def example(items, points):
        run = next(counter)
        before = quiet_books(cluster, clearing)
        assert before.violations() == [], "the books were broken before this example"
        earlier_closed = [w for w, (state, _, _) in before.windows.items() if state != books.WINDOW_OPEN]
        earlier = before.window_snapshot(earlier_closed)
        # Transfers in the order they are submitted; closes at their fractions of that order.
        jobs: list[tuple[str, object]] = []
        sents: dict[str, Sent] = {}
        index = 0
        while index < len(items):
            item = items[index]
            group = [item]
            if item[6] == "batch":
                while index + len(group) < len(items) and len(group) < 4 and items[index + len(group)][6] == "batch":
                    group.append(items[index + len(group)])
            ids = [f"h4t-{world.token}-{run}-{index + i}" for i in range(len(group))]
            requests = [make_request(world, g, tid) for g, tid in zip(group, ids)]
            for tid in ids:
                sents[tid] = Sent(tid)
            jobs.append(("send", (requests, [sents[t] for t in ids], item[6] == "batch")))
            index += len(group)
        closes = [Closed(f"h4c-{world.token}-{run}-{i}") for i in range(len(points))]
        for point, closed in sorted(zip(points, closes), key=lambda pair: pair[0], reverse=True):
            jobs.insert(round(point * len(jobs)), ("close", closed))
        with concurrent.futures.ThreadPoolExecutor(THREADS) as pool:
            futures = [pool.submit(send, ledger, *job) if kind == "send" else pool.submit(close_now, clearing, cluster, job)
                       for kind, job in jobs]
            for future in futures:
                future.result()
        after = quiet_books(cluster, clearing)
        note(f"closes: {closes}")
        note(f"transfers: {list(sents.values())}")
        problems = after.violations()
        # Closes: answered, each closing a window of its own, CLOSED by the time it answered.
        pairs = [c.pair for c in closes if c.pair]
        problems += [f"close {c.request_id} failed: {c.error}" for c in closes if c.error]
        if len({p[0] for p in pairs}) != len(pairs):
            problems.append(f"two closes closed the same window: {pairs}")
        problems += [f"close {c.request_id} answered its window in state {c.state}, not CLOSED" for c in closes
                     if c.pair and c.state != clearing_pb2.WINDOW_CLOSED]
        for c in closes:
            if c.pair and c.pair[1] != c.pair[0] + 1:
                problems.append(f"close {c.request_id} answered {c.pair}: the next window is not the closed one's successor")
        # A closed window never changes: right after its close, at the end, and the ones closed before.
        for c in closes:
            if c.snapshot is not None and after.window_snapshot([c.pair[0]]) != c.snapshot:
                problems.append(f"window {c.pair[0]} changed after its close: {c.snapshot} -> {after.window_snapshot([c.pair[0]])}")
        if after.window_snapshot(earlier_closed) != earlier:
            problems.append("a window closed before this example changed during it")
        # Each of our transfers: POSTED and cleared -> one window, refused -> none; and on the right side of every close.
        mine = books.read_books(cluster["shards"], clearing.home_shard, list(sents))
        window_of = mine.window_of()
        rows = {r.transfer_id: r for r in mine.rows if r.branch != books.CREDIT_BRANCH and r.transfer_id in sents}
        for sent in sents.values():
            row = rows.get(sent.transfer_id)
            places = window_of.get(sent.transfer_id, [])
            if sent.outcome == "POSTED":
                if row is None or row.status != books.POSTED:
                    problems.append(f"{sent.transfer_id} answered POSTED, stored {row}")
                    continue
                cleared = mine.expected_clearing(row) is not None
                tally["cleared" if cleared else "uncleared"] += 1
                tally["between shards"] += row.branch == books.DEBIT_BRANCH
                tally["collected"] += row.branch == books.COLLECTED
                if cleared and len(places) != 1 or not cleared and places:
                    problems.append(f"{sent.transfer_id} (cleared: {cleared}) is in windows {places}")
                if places:
                    window = places[0][1]
                    for c in closes:
                        if not c.pair:
                            continue
                        if sent.answered < c.sent and window > c.pair[0]:
                            problems.append(f"{sent.transfer_id} acknowledged before close {c.request_id} began, yet in window {window} > {c.pair[0]}")
                        if sent.sent > c.answered and window <= c.pair[0]:
                            problems.append(f"{sent.transfer_id} sent after close {c.request_id} answered, yet in window {window} <= {c.pair[0]}")
            elif sent.outcome in ("INSUFFICIENT_FUNDS", "ACCOUNT_NOT_FOUND", "ACCOUNT_FROZEN", "LINKED_TRANSFER_FAILED"):
                tally["refused"] += 1
                if places:
                    problems.append(f"{sent.transfer_id} refused {sent.outcome}, yet in windows {places}")
                if row is not None and row.status == books.POSTED:
                    problems.append(f"{sent.transfer_id} refused {sent.outcome}, yet POSTED")
            else:
                problems.append(f"{sent.transfer_id} answered {sent.outcome}")
        # The service's own account of positions and windows agrees with the databases.
        for participant in world.participants:
            position = clearing.position(participant, CURRENCY)
            stored, reserved = after.position_total(participant, CURRENCY)
            if position.position_minor != stored + reserved:
                problems.append(f"GetPosition({participant}) = {position.position_minor}, the databases say {stored} + {reserved}")
        open_window = clearing.window(0)
        if [open_window.window_id] != after.open_windows or open_window.state != clearing_pb2.WINDOW_OPEN:
            problems.append(f"GetSettlementWindow(0) = {open_window.window_id} ({open_window.state}), the databases say {after.open_windows}")
        tally["closes"] += len(pairs)
        assert not problems, "\n  ".join(problems)

    example()
    print(f"clearing property test: {tally}")
    assert all(tally.values()), f"an example kind never happened (the checks would be vacuous): {tally}"
    report = clearing.reconcile()
    assert report.consistent, report.findings


# ---------------------------------------------------------------------------------------
# Settlement.


def pay_around(clearing: ClearingClient, world: World, rounds: int, tag: str) -> list[str]:
    """Cleared transfers between every ordered pair of participants, on every shard pair; their ids."""
    ids = []
    for r in range(rounds):
        for payer in range(3):
            for payee in range(3):
                if payer == payee:
                    continue
                s, t = (payer + r) % 3, (payee + 2 * r) % 3
                transfer_id = f"h4s-{world.token}-{tag}-{r}-{payer}-{payee}"
                amount = 100 * (payer + 1) + 7 * (payee + 1) + r
                answer = clearing.ledger.transfer(world.accounts[payer, s], world.accounts[payee, t], amount, CURRENCY, transfer_id=transfer_id)
                assert answer.status == transfers_pb2.POSTED
                ids.append(transfer_id)
    return ids


def settle_fresh_window(clearing: ClearingClient, world: World, cluster, model, tag: str):
    """Post transfers in a window of their own, close it, settle it; (settlement, window, ids)."""
    clearing.close(f"h4s-{world.token}-{tag}-before")  # the transfers below are alone in the next window
    ids = pay_around(clearing, world, 2, tag)
    closed_id, _ = closed_pair(clearing.close(f"h4s-{world.token}-{tag}-after"))
    settlement = clearing.create_settlement(f"h4s-{world.token}-{tag}", [closed_id], model)
    return settlement, closed_id, ids


def entry_map(settlement) -> dict[tuple[str, str], tuple[int, int, int]]:
    return {(e.participant_id, e.currency): (e.debits_minor, e.credits_minor, e.net_minor) for e in settlement.entries}


@pytest.mark.parametrize("model", [clearing_pb2.DEFERRED_NET, clearing_pb2.GROSS], ids=["deferred_net", "gross"])
def test_settlement_matches_the_ledger_and_recording_it_moves_accounts_once(cluster, clearing, world, ledger, model):
    tag = clearing_pb2.SettlementModel.Name(model).lower()
    settlement, window_id, ids = settle_fresh_window(clearing, world, cluster, model, tag)
    state = cluster_books(cluster, clearing, ids)
    # Entries: the windows' transfers summed per participant (recomputed from the rows), net = debits - credits, zero-sum.
    recomputed = state.recomputed_totals([window_id])
    assert {k: (d, c) for k, (d, c, _) in entry_map(settlement).items()} == {k: (d, c) for k, (d, c, _) in recomputed.items()}
    assert all(e.net_minor == e.debits_minor - e.credits_minor for e in settlement.entries)
    assert sum(e.net_minor for e in settlement.entries if e.currency == CURRENCY) == 0
    assert [(e.participant_id, e.currency) for e in settlement.entries] == sorted((e.participant_id, e.currency) for e in settlement.entries)
    assert settlement.state == clearing_pb2.SETTLEMENT_PENDING and list(settlement.window_ids) == [window_id]
    assert clearing.window(window_id).state == clearing_pb2.WINDOW_PENDING_SETTLEMENT
    assert clearing.window(window_id).settlement_id == settlement.settlement_id
    # Our participants' entries move exactly what we paid each other.
    paid = {p: 0 for p in world.participants}
    for row in state.rows:
        if row.transfer_id in ids and row.branch != books.CREDIT_BRANCH:
            paid[state.participant(row.debit_account_id)] += row.amount_minor
            paid[state.participant(row.credit_account_id)] -= row.amount_minor
    for participant in world.participants:
        assert entry_map(settlement)[participant, CURRENCY][2] == paid[participant]
    # A retry of the creation answers the same settlement.
    again = clearing.create_settlement(f"h4s-{world.token}-{tag}", [window_id], model)
    assert (again.settlement_id, entry_map(again)) == (settlement.settlement_id, entry_map(settlement))

    positions_before = {p: clearing.position(p, CURRENCY).position_minor for p in world.participants}
    participant_info = {p: clearing.stub.GetParticipant(clearing_pb2.GetParticipantRequest(participant_id=p)) for p in world.participants}
    accounts_of = {p: next(c.settlement_account_id for c in info.currencies if c.currency == CURRENCY) for p, info in participant_info.items()}
    for entry in settlement.entries:
        before = ledger.get(accounts_of[entry.participant_id]).balance_minor if entry.participant_id in accounts_of else None
        answer = clearing.record(settlement.settlement_id, entry.participant_id, entry.currency)
        recorded = next(e for e in answer.entries if (e.participant_id, e.currency) == (entry.participant_id, entry.currency))
        assert recorded.settled
        legs = [ledger.payments.GetTransfer(payments_pb2.GetTransferRequest(transfer_id=t)) for t in recorded.transfer_ids]
        assert all(leg.status == transfers_pb2.POSTED for leg in legs)
        expected_legs = (1 if entry.net_minor else 0) if model == clearing_pb2.DEFERRED_NET else (entry.debits_minor > 0) + (entry.credits_minor > 0)
        assert len(legs) == expected_legs, recorded
        retried = clearing.record(settlement.settlement_id, entry.participant_id, entry.currency)
        assert entry_map(retried) == entry_map(answer)
        assert [e.transfer_ids for e in retried.entries] == [e.transfer_ids for e in answer.entries]
        if before is not None:
            # The participant's settlement account moved by -net (it pays what it owes), once.
            assert ledger.get(accounts_of[entry.participant_id]).balance_minor == before - entry.net_minor
    final = clearing.settlement(settlement.settlement_id)
    assert final.state == clearing_pb2.SETTLEMENT_SETTLED and final.HasField("settled_at")
    assert all(e.settled for e in final.entries)
    assert clearing.window(window_id).state == clearing_pb2.WINDOW_SETTLED
    for participant in world.participants:
        # The settled window's net is out of the position (other windows stay in).
        assert clearing.position(participant, CURRENCY).position_minor == positions_before[participant] - entry_map(settlement)[participant, CURRENCY][2]
    # Recording again after SETTLED moves nothing.
    balances_before = {p: ledger.get(a).balance_minor for p, a in accounts_of.items()}
    for entry in settlement.entries:
        clearing.record(settlement.settlement_id, entry.participant_id, entry.currency)
    assert {p: ledger.get(a).balance_minor for p, a in accounts_of.items()} == balances_before
    after = quiet_books(cluster, clearing)
    assert after.violations() == []
    report = clearing.reconcile([window_id])
    assert report.consistent, report.findings


def test_a_settlement_created_the_instant_a_close_answers_holds_every_transfer_posted_before_it(cluster, clearing, world, ledger):
    """Mojaloop #2105: settle at once after a close while transfers stream; nothing posted before
    the close is missing, nothing sent after it is in."""
    clearing.close(f"h4r-{world.token}-start")
    stop = threading.Event()
    sents: list[Sent] = []
    lock = threading.Lock()

    def stream(worker: int) -> None:
        n = 0
        while not stop.is_set():
            payer, payee = worker % 3, (worker + 1 + n % 2) % 3
            sent = Sent(f"h4r-{world.token}-{worker}-{n}")
            request = payments_pb2.TransferRequest(
                transfer_id=sent.transfer_id, debit_account_id=world.accounts[payer, n % 3],
                credit_account_id=world.accounts[payee, (n + worker) % 3] if n % 5 else world.merchant, amount_minor=1 + n % 50, currency=CURRENCY)
            send(ledger, [request], [sent], False)
            with lock:
                sents.append(sent)
            n += 1

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        running = [pool.submit(stream, worker) for worker in range(6)]
        time.sleep(1.0)
        close_sent = time.monotonic()
        closed = clearing.close(f"h4r-{world.token}-close")
        close_answered = time.monotonic()
        settlement = clearing.create_settlement(f"h4r-{world.token}-settle", [closed.closed_window.window_id], clearing_pb2.DEFERRED_NET)
        time.sleep(0.5)
        stop.set()
        for future in running:
            future.result()
    window_id = closed.closed_window.window_id
    state = quiet_books(cluster, clearing)
    mine = books.read_books(cluster["shards"], clearing.home_shard, [s.transfer_id for s in sents])
    window_of = mine.window_of()
    rows = {r.transfer_id: r for r in mine.rows if r.branch != books.CREDIT_BRANCH}
    cleared = [s for s in sents if s.outcome == "POSTED" and s.transfer_id in rows and mine.expected_clearing(rows[s.transfer_id])]
    assert [s.transfer_id for s in sents if s.outcome == "POSTED" and s.transfer_id not in rows] == []
    before = [s for s in cleared if s.answered < close_sent]
    after = [s for s in cleared if s.sent > close_answered]
    assert before and after, f"the stream did not straddle the close: {len(before)} before, {len(after)} after"
    assert [s.transfer_id for s in before if [w for _, w in window_of.get(s.transfer_id, [])] != [window_id]] == []
    assert [s.transfer_id for s in after if [w for _, w in window_of.get(s.transfer_id, [])] == [window_id]] == []
    assert [s.transfer_id for s in cleared if len(window_of.get(s.transfer_id, [])) != 1] == []
    # The settlement is the window as it ended, recomputed from its transfers.
    assert {k: (d, c) for k, (d, c, _) in entry_map(settlement).items()} == {k: (d, c) for k, (d, c, _) in mine.recomputed_totals([window_id]).items()}
    assert state.violations() == []
    clearing.settle_all(settlement)
    assert clearing.settlement(settlement.settlement_id).state == clearing_pb2.SETTLEMENT_SETTLED
    assert quiet_books(cluster, clearing).violations() == []
