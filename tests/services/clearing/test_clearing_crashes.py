"""Crashes during clearing's multi-step operations, recovered by retries of the same request and
by the coordinators, under load; judged from the databases.

To crash an operation in the middle (closes and settlements take milliseconds), one shard is
frozen (SIGSTOP, tests/fixtures/faults.py) so that the operation hangs at its first step on
that shard; every gRPC worker is then killed -9 (whichever served the call dies), the shard is
thawed and the workers started again. Then:

- CloseSettlementWindow: a retry of the same request id answers the same pair and finishes the
  close; without a retry, the coordinators finish it by themselves (bounded wait).
- CreateSettlement: the window is either untouched (CLOSED) or in the settlement, never half;
  the retry answers one settlement, the same on every retry.
- RecordParticipantSettled (each shard frozen in turn, so the crash falls at each step): the
  retry completes it; the settlement legs post once, positions are reset once per shard.

Throughout, transfers between participants stream on every shard (some die with the workers:
their outcome is found afterwards). At the end: no window CLOSING, the clearing invariants
(tests/fixtures/clearing.py), Reconcile consistent, and the ledger's conservation audit.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import pathlib
import threading
import time
from collections.abc import Iterator

import grpc
import psycopg
import pytest

from corebank.v1 import clearing_pb2, payments_pb2, transfers_pb2
from deploy.cluster import ClusterError
from services.storage.audit import audit_cluster, reader_dsn
from tests.fixtures import clearing as books
from tests.fixtures import faults
from tests.fixtures.clearing import ClearingClient, closed_pair
from tests.fixtures.ledger import failure

pytestmark = pytest.mark.cluster

CURRENCY = "USD"
FUNDING_MINOR = 10_000_000
FREEZE_SECONDS_MAX = 60
# How long the hung operation is left before the crash (it reaches the frozen shard well within).
HANG_SECONDS = 1.5
STEP_WAIT_SECONDS_MAX = 10.0
# The coordinators finish a close left CLOSING on their own within this.
COORDINATOR_RECOVERY_SECONDS_MAX = 60.0
AMBIGUOUS = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED, grpc.StatusCode.UNKNOWN}
CALL_TIMEOUT_SECONDS = 30.0
LOAD_THREADS = 4
# A killed worker's ports may take a moment to be free: its start is tried again.
STARTS_MAX = 20


@dataclasses.dataclass
class World:
    token: str
    participants: list[str]
    shards: list[str]
    accounts: dict[tuple[int, int], str]


@pytest.fixture(scope="module")
def clearing(grpc_channel, ledger) -> ClearingClient:
    return ClearingClient(grpc_channel, ledger)


@pytest.fixture(scope="module")
def world(clearing, shard_map) -> World:
    token = books.run_token()
    participants = [f"h4x-{token}-{i}" for i in range(3)]
    for participant in participants:
        clearing.register(participant, [CURRENCY])
    shards = [shard.name for shard in shard_map.shards]
    accounts = {(p, s): clearing.funded(participants[p], shards[s], FUNDING_MINOR, CURRENCY).account_id
                for p in range(3) for s in range(len(shards))}
    return World(token, participants, shards, accounts)


@contextlib.contextmanager
def load(ledger, world: World, tag: str) -> Iterator[dict]:
    """Transfers between participants on every shard until the block ends; their ids by answer."""
    stop = threading.Event()
    seen: dict = {"posted": [], "refused": [], "ambiguous": []}
    lock = threading.Lock()

    def pay(worker: int) -> None:
        n = 0
        while not stop.is_set():
            payer, payee = worker % 3, (worker + 1 + n) % 3
            if payer == payee:
                payee = (payee + 1) % 3
            transfer_id = f"h4xl-{world.token}-{tag}-{worker}-{n}"
            try:
                answer = ledger.transfer(world.accounts[payer, n % 3], world.accounts[payee, (n + worker) % 3], 1 + n % 97,
                                         CURRENCY, transfer_id=transfer_id, timeout=5)
                kind = "posted" if answer.status == transfers_pb2.POSTED else "ambiguous"
            except grpc.RpcError as error:
                kind = "ambiguous" if error.code() in AMBIGUOUS else "refused"
                if kind == "ambiguous":
                    time.sleep(0.05)
            with lock:
                seen[kind].append(transfer_id)
            n += 1

    with concurrent.futures.ThreadPoolExecutor(LOAD_THREADS) as pool:
        running = [pool.submit(pay, worker) for worker in range(LOAD_THREADS)]
        try:
            yield seen
        finally:
            stop.set()
            for future in running:
                future.result()


def crash_workers(cluster_control) -> list[int]:
    """kill -9 every gRPC worker: whichever serves a call in flight dies with it; their pids."""
    return [pid for pid in (faults.kill9(cluster_control, worker.name) for worker in cluster_control.grpc_workers) if pid]


def gone(pid: int) -> bool:
    """Dead (or a zombie: its sockets are closed)."""
    try:
        stat = pathlib.Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat[stat.rindex(")") + 2] in "ZX"


def start_workers(cluster_control, killed: list[int]) -> None:
    """Start the workers once the killed ones are gone (a SIGKILL takes a moment to free their ports)."""
    wait_for(lambda: all(gone(pid) for pid in killed), STEP_WAIT_SECONDS_MAX)
    for worker in cluster_control.grpc_workers:
        for attempt in range(STARTS_MAX):
            try:
                cluster_control.start(worker.name)
                break
            except ClusterError:
                if attempt == STARTS_MAX - 1:
                    raise
                time.sleep(0.5)


def in_background(call) -> concurrent.futures.Future:
    pool = concurrent.futures.ThreadPoolExecutor(1)
    future = pool.submit(call)
    pool.shutdown(wait=False)
    return future


def answer_of(future: concurrent.futures.Future):
    """(answer, None) or (None, code) of a call that ended."""
    try:
        return future.result(timeout=CALL_TIMEOUT_SECONDS), None
    except grpc.RpcError as error:
        return None, error.code()


def home_window_state(cluster, clearing: ClearingClient, window_id: int) -> int | None:
    home = next(s for s in cluster["shards"] if s["name"] == clearing.home_shard)
    with psycopg.connect(reader_dsn(home), autocommit=True) as connection:
        row = connection.execute("SELECT state FROM settlement_windows WHERE window_id = %s", [window_id]).fetchone()
    return row[0] if row else None


def wait_for(condition, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return condition()


def retried(call, attempts: int = 20):
    """A call retried while the answer is ambiguous (workers still starting)."""
    for attempt in range(attempts):
        try:
            return call()
        except grpc.RpcError as error:
            if error.code() not in AMBIGUOUS or attempt == attempts - 1:
                raise
            time.sleep(0.5)


def crash_while_hung(cluster, cluster_control, frozen_shard: str, call, hung=lambda: True) -> tuple:
    """Freeze `frozen_shard`, start `call`, wait until `hung()` (bounded) and HANG_SECONDS, crash
    every worker, thaw, restart the workers; the call's (answer, code)."""
    with faults.shard_frozen(cluster_control, frozen_shard, seconds_max=FREEZE_SECONDS_MAX):
        future = in_background(call)
        wait_for(hung, STEP_WAIT_SECONDS_MAX)
        time.sleep(HANG_SECONDS)
        killed = crash_workers(cluster_control)
    start_workers(cluster_control, killed)
    return answer_of(future)


def check_everything(cluster, clearing: ClearingClient, seen: dict) -> None:
    state = books.wait_quiet(cluster["shards"], clearing.home_shard)
    assert state.violations() == []
    mine = books.read_books(cluster["shards"], clearing.home_shard, seen["posted"] + seen["ambiguous"])
    rows = {r.transfer_id: r for r in mine.rows if r.branch != books.CREDIT_BRANCH}
    assert [t for t in seen["posted"] if t not in rows or rows[t].status != books.POSTED] == []
    assert [t for t in seen["ambiguous"] if t in rows and rows[t].status == books.PENDING] == []
    assert audit_cluster(cluster["shards"]).violations() == []
    report = retried(lambda: clearing.reconcile())
    assert report.consistent, report.findings


def other_shard(clearing: ClearingClient, world: World) -> str:
    return next(s for s in world.shards if s != clearing.home_shard)


@pytest.mark.parametrize("recovery", ["retry", "coordinators"])
def test_a_close_crashed_midway_is_finished_by_its_retry_or_the_coordinators(cluster, cluster_control, clearing, world, ledger, recovery):
    request_id = f"h4xc-{world.token}-{recovery}"
    with load(ledger, world, f"close-{recovery}") as seen:
        time.sleep(0.5)
        open_before = clearing.window(0).window_id
        answer, code = crash_while_hung(
            cluster, cluster_control, other_shard(clearing, world), lambda: clearing.close(request_id, timeout=CALL_TIMEOUT_SECONDS),
            hung=lambda: home_window_state(cluster, clearing, open_before) == books.WINDOW_CLOSING,
        )
        assert answer is None and code in AMBIGUOUS, (answer, code)
        if recovery == "coordinators":
            finished = wait_for(lambda: home_window_state(cluster, clearing, open_before) != books.WINDOW_CLOSING, COORDINATOR_RECOVERY_SECONDS_MAX)
            assert finished, f"window {open_before} still CLOSING {COORDINATOR_RECOVERY_SECONDS_MAX}s after the crash, with no retry"
        pair = closed_pair(retried(lambda: clearing.close(request_id)))
        assert pair == (open_before, open_before + 1)
        assert closed_pair(retried(lambda: clearing.close(request_id))) == pair
        assert clearing.window(open_before).state == clearing_pb2.WINDOW_CLOSED
        time.sleep(0.5)
    check_everything(cluster, clearing, seen)


def test_a_settlement_crashed_midway_is_all_or_nothing_and_its_retry_answers_one(cluster, cluster_control, clearing, world, ledger):
    request_id = f"h4xs-{world.token}"
    with load(ledger, world, "settle") as seen:
        time.sleep(0.5)
        window_id, _ = closed_pair(clearing.close(f"h4xs-{world.token}-close"))
        answer, code = crash_while_hung(
            cluster, cluster_control, other_shard(clearing, world),
            lambda: clearing.create_settlement(request_id, [window_id], timeout=CALL_TIMEOUT_SECONDS),
        )
        assert answer is None and code in AMBIGUOUS, (answer, code)
        state = books.read_books(cluster["shards"], clearing.home_shard)
        holding = [s for s, v in state.settlements.items() if window_id in v[3]]
        assert (state.windows[window_id][0], holding) in ((books.WINDOW_CLOSED, []), (books.WINDOW_PENDING_SETTLEMENT, holding[:1])), state.windows[window_id]
        settlement = retried(lambda: clearing.create_settlement(request_id, [window_id]))
        again = retried(lambda: clearing.create_settlement(request_id, [window_id]))
        assert again.settlement_id == settlement.settlement_id and list(again.entries) == list(settlement.entries)
        with pytest.raises(grpc.RpcError) as raised:
            clearing.create_settlement(f"{request_id}-other", [window_id])
        assert failure(raised.value)[:2] == (grpc.StatusCode.FAILED_PRECONDITION, "SETTLEMENT_WINDOW_ALREADY_SETTLED")
        recomputed = books.read_books(cluster["shards"], clearing.home_shard).recomputed_totals([window_id])
        assert {(e.participant_id, e.currency): (e.debits_minor, e.credits_minor) for e in settlement.entries} == {
            k: (d, c) for k, (d, c, _) in recomputed.items()}
        final = retried(lambda: clearing.settle_all(settlement))
        assert final.state == clearing_pb2.SETTLEMENT_SETTLED
    check_everything(cluster, clearing, seen)


@pytest.mark.parametrize("frozen_index", [0, 1, 2], ids=lambda i: f"shard-{i}-frozen")
def test_recording_a_participant_settled_crashed_at_any_step_completes_on_retry(cluster, cluster_control, clearing, world, ledger, frozen_index):
    with load(ledger, world, f"record-{frozen_index}") as seen:
        time.sleep(0.5)
        window_id, _ = closed_pair(clearing.close(f"h4xr-{world.token}-{frozen_index}-close"))
        settlement = clearing.create_settlement(f"h4xr-{world.token}-{frozen_index}", [window_id])
        entry = next(e for e in settlement.entries if e.participant_id == world.participants[0])
        answer, code = crash_while_hung(
            cluster, cluster_control, world.shards[frozen_index],
            lambda: clearing.record(settlement.settlement_id, entry.participant_id, entry.currency, timeout=CALL_TIMEOUT_SECONDS),
        )
        # The call may have finished before the freeze touched it; if not, its outcome is unknown.
        assert answer is not None or code in AMBIGUOUS, code
        recorded = retried(lambda: clearing.record(settlement.settlement_id, entry.participant_id, entry.currency))
        mine = next(e for e in recorded.entries if (e.participant_id, e.currency) == (entry.participant_id, entry.currency))
        assert mine.settled
        again = retried(lambda: clearing.record(settlement.settlement_id, entry.participant_id, entry.currency))
        assert [list(e.transfer_ids) for e in again.entries] == [list(e.transfer_ids) for e in recorded.entries]
        for leg in mine.transfer_ids:
            assert ledger.payments.GetTransfer(payments_pb2.GetTransferRequest(transfer_id=leg)).status == transfers_pb2.POSTED
        final = retried(lambda: clearing.settle_all(settlement))
        assert final.state == clearing_pb2.SETTLEMENT_SETTLED
        assert clearing.window(window_id).state == clearing_pb2.WINDOW_SETTLED
    check_everything(cluster, clearing, seen)
