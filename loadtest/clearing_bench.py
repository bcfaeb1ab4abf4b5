"""What clearing costs (issue 11), measured on the running cluster.

    python -m loadtest.clearing_bench [--seconds 10] [--warmup-seconds 3] [--clients 16]
        [--batch-size 1000] [--batch-clients 4] [--customers 400]
        [--window-sizes 100000,1000000] [--close-runs 3] [--stream-clients 4]

Reads the cluster from $COREBANK_STATE_DIR/cluster.json (make up writes it) and registers four
participants of its own (`cbench-<id>.a` .. `.d`, a cap of CAP_MINOR in USD: so the position
check compares against a real allotment, and never refuses), with funded customers of each.

(a) The position check's cost per transfer. The same load, in the same run, within one
    participant (never cleared) and between two (the cap check, the position and the window
    totals written with the transfer): single Transfer calls on one shard, between two shards,
    and CreateTransfers batches on one shard. Per row: TPS and wall µs per transfer at that
    concurrency (1e6 / TPS), CPU µs per transfer (service workers, coordinators and PostgreSQL,
    loadtest.costs), p99; per pair the ratio between / within and the difference in µs. Against
    pgbench's TPS too when a `make bench` report (reports/bench-*.json) holds one.
(b) The window close with 100,000 and 1,000,000 cleared transfers in the window. Loaded fast,
    straight into the databases AS THE OWNER ROLE with generate_series-style SQL (not through the
    API), and honestly: each transfer a POSTED same-shard row between two of the bench's
    participants with its participants and the open window, its id in the id registry, the
    accounts' posted counters, the window totals and the position shares moved by the same
    amounts, in one transaction per shard under the window lock's shared side, as posting does.
    So the audit and the Reconcile RPC hold over it. Then, through gRPC: CloseSettlementWindow
    (CLOSE_RUNS loads and closes per size, median), CreateSettlement of that window,
    Reconcile over it, and RecordParticipantSettled for each entry. A background stream of
    single transfers between the participants runs during each close: the p99 of the transfers
    that overlapped a close (and a storm of closes of small windows) against the others.

Prints the figures (no timed asserts) and writes them to
$COREBANK_STATE_DIR/reports/clearing-bench-<timestamp>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import concurrent.futures
import dataclasses
import datetime
import json
import pathlib
import random
import statistics
import sys
import threading
import time

import grpc
import psycopg
from corebank.v1 import clearing_pb2, clearing_pb2_grpc, payments_pb2, payments_pb2_grpc

from loadtest import costs
from loadtest.accounts import (
    CURRENCY, TRANSFER_AMOUNT_MINOR_MAX, AccountSet, ParticipantSpec, describe_rpc_error, load_shard_map, new_run_id,
    open_participant_accounts,
)  # fmt: skip
from loadtest.bench import PGBENCH_SCENARIO, REPORTS_FOLDER, checkpoint, machine, watched_pids
from loadtest.cluster import Cluster, load_cluster
from loadtest.driver import CALL_TIMEOUT_SECONDS, CallOutcome, ScenarioResult, Stubs, latency_figures_ms, run_scenario
from services.ledger import clearing

PARTICIPANTS = (
    ParticipantSpec("a", "clearing bench participant A", (CURRENCY,)),
    ParticipantSpec("b", "clearing bench participant B", (CURRENCY,)),
    ParticipantSpec("c", "clearing bench participant C", (CURRENCY,)),
    ParticipantSpec("d", "clearing bench participant D", (CURRENCY,)),
)
# 100 billion USD: allotments are set on every shard (the check runs for real) and never run out.
CAP_MINOR = 10**13
# 100,000.00 USD per customer: the loaded windows debit each account by at most tens of
# thousands of minor units per million transfers (amounts 1..LOAD_AMOUNT_MINOR_MAX).
FUNDING_AMOUNT_MINOR = 10_000_000
CUSTOMERS_DEFAULT = 400
CLIENTS_DEFAULT = 16
BATCH_CLIENTS_DEFAULT = 4
BATCH_SIZE_DEFAULT = 1000
SECONDS_DEFAULT = 10
WARMUP_SECONDS_DEFAULT = 3
WINDOW_SIZES_DEFAULT = "100000,1000000"
CLOSE_RUNS_DEFAULT = 3
STREAM_CLIENTS_DEFAULT = 4
# The stream runs this long before and after each timed call, so the close meets it at full pace.
STREAM_LEAD_SECONDS = 1.0
# The storm: closes of small windows back to back under the stream, for enough overlapping transfers.
STORM_CLOSES = 20
STORM_PAUSE_SECONDS = 0.2
# Loaded transfers: amounts 1..9 minor units; each debit account pays over this many pairs.
LOAD_AMOUNT_MINOR_MAX = 9
LOAD_PAIRS_PER_ACCOUNT = 8
# The first participant pays in this many times as many pairs as the others: nets are not zero.
LOAD_HEAVY_PAYER_FACTOR = 2
LOAD_REFERENCE = "clearing bench load"
LOAD_STATEMENT_TIMEOUT = "30min"
RECONCILE_TIMEOUT_SECONDS = 600.0
CLEARING_CALL_TIMEOUT_SECONDS = 120.0
POSTED_STATUS, SAME_SHARD_BRANCH, TRANSFER_NAMESPACE = 2, 0, 1
REPORT_PREFIX = "clearing-bench"


# (a) The position check's cost.


@dataclasses.dataclass(frozen=True)
class GroupTransfers:
    """Transfers between an account of `first` and one of `second`, in a random direction (two
    distinct accounts when the groups are one); CreateTransfers of `batch_size` when it is set."""

    run_id: str
    name: str
    first: tuple[str, ...]
    second: tuple[str, ...]
    batch_size: int = 0

    @property
    def notes(self) -> dict:
        return {"first_accounts": len(self.first), "second_accounts": len(self.second), "batch_size": self.batch_size}

    def draw(self, rng: random.Random) -> tuple[str, str]:
        if self.first == self.second:
            debit, credit = rng.sample(self.first, 2)
            return debit, credit
        pair = (rng.choice(self.first), rng.choice(self.second))
        return pair if rng.random() < 0.5 else (pair[1], pair[0])

    def request(self, transfer_id: str, rng: random.Random) -> payments_pb2.TransferRequest:
        debit, credit = self.draw(rng)
        return payments_pb2.TransferRequest(
            transfer_id=transfer_id, debit_account_id=debit, credit_account_id=credit,
            amount_minor=rng.randint(1, TRANSFER_AMOUNT_MINOR_MAX), currency=CURRENCY, reference="clearing bench",
        )  # fmt: skip

    async def call(self, stubs: Stubs, worker_label: str, sequence: int, rng: random.Random) -> CallOutcome | None:
        prefix = f"{self.run_id}:{self.name}:{worker_label}:{sequence}"
        if not self.batch_size:
            await stubs.payments.Transfer(self.request(prefix, rng), timeout=CALL_TIMEOUT_SECONDS)
            return None
        requests = [self.request(f"{prefix}:{index}", rng) for index in range(self.batch_size)]
        response = await stubs.payments.CreateTransfers(payments_pb2.CreateTransfersRequest(transfers=requests), timeout=CALL_TIMEOUT_SECONDS)
        errors = collections.Counter(f"code {result.error.code}" for result in response.results if result.HasField("error"))
        return CallOutcome(len(response.results) - sum(errors.values()), dict(errors))


@dataclasses.dataclass(frozen=True)
class CheckPair:
    """Two rows measured alike, within one participant and between two."""

    label: str
    within: str
    between: str


SAME_SHARD, CROSS_SHARD, BATCH_SAME_SHARD = "same shard", "between shards", "CreateTransfers, same shard"
PAIRS = (
    CheckPair(SAME_SHARD, "clearing_same_shard_within", "clearing_same_shard_between"),
    CheckPair(CROSS_SHARD, "clearing_cross_shard_within", "clearing_cross_shard_between"),
    CheckPair(BATCH_SAME_SHARD, "clearing_batch_same_shard_within", "clearing_batch_same_shard_between"),
)


def accounts_of(account_set: AccountSet, participant_id: str, shard_name: str) -> tuple[str, ...]:
    return tuple(a for a in account_set.customer_account_ids_by_shard.get(shard_name, [])
                 if account_set.participant_by_account_id.get(a) == participant_id)  # fmt: skip


def check_scenarios(account_set: AccountSet, batch_size: int) -> list[GroupTransfers]:
    """The rows of (a): participant A with itself and with B, on the first shard and across the first two."""
    shards = sorted(account_set.customer_account_ids_by_shard)
    first_participant, second_participant = account_set.participant_ids[:2]
    a_here, b_here = accounts_of(account_set, first_participant, shards[0]), accounts_of(account_set, second_participant, shards[0])
    rows = [
        GroupTransfers(account_set.run_id, PAIRS[0].within, a_here, a_here),
        GroupTransfers(account_set.run_id, PAIRS[0].between, a_here, b_here),
    ]
    if len(shards) > 1:
        a_there, b_there = accounts_of(account_set, first_participant, shards[1]), accounts_of(account_set, second_participant, shards[1])
        rows += [
            GroupTransfers(account_set.run_id, PAIRS[1].within, a_here, a_there),
            GroupTransfers(account_set.run_id, PAIRS[1].between, a_here, b_there),
        ]
    rows += [
        GroupTransfers(account_set.run_id, PAIRS[2].within, a_here, a_here, batch_size),
        GroupTransfers(account_set.run_id, PAIRS[2].between, a_here, b_here, batch_size),
    ]
    return rows


def cpu_us_per_transfer(result: ScenarioResult, roles: dict[str, str]) -> float | None:
    """CPU µs per transfer of the service workers, coordinators and PostgreSQL together."""
    split = costs.cost_split(result, roles)
    if split is None:
        return None
    parts = [split.service_cpu_ms, split.coordinator_cpu_ms, split.database_cpu_ms]
    known = [part for part in parts if part is not None]
    return sum(known) * 1000 if known else None


def row_figures(result: ScenarioResult, roles: dict[str, str], pgbench_tps: float | None) -> dict:
    tps = result.transactions_per_second
    return {
        "scenario": result.scenario, "clients": result.clients, "tps": tps,
        "wall_us_per_transfer": 1e6 / tps if tps else None, "cpu_us_per_transfer": cpu_us_per_transfer(result, roles),
        "p50_ms": result.latency_ms_p50, "p99_ms": result.latency_ms_p99, "errors": result.error_count_by_code,
        "ratio_to_pgbench": tps / pgbench_tps if pgbench_tps and tps else None,
    }  # fmt: skip


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    return numerator / denominator if numerator is not None and denominator else None


def _difference(later: float | None, earlier: float | None) -> float | None:
    return later - earlier if later is not None and earlier is not None else None


def check_costs(rows: list[dict]) -> list[dict]:
    """Per pair of rows: between / within (> 1: clearing costs that much more) and between - within, in µs."""
    by_name = {row["scenario"]: row for row in rows}
    figures = []
    for pair in PAIRS:
        within, between = by_name.get(pair.within), by_name.get(pair.between)
        if within is None or between is None:
            continue
        figures.append({
            "path": pair.label,
            "wall_us_within": within["wall_us_per_transfer"], "wall_us_between": between["wall_us_per_transfer"],
            "wall_ratio": _ratio(between["wall_us_per_transfer"], within["wall_us_per_transfer"]),
            "wall_us_added": _difference(between["wall_us_per_transfer"], within["wall_us_per_transfer"]),
            "cpu_us_within": within["cpu_us_per_transfer"], "cpu_us_between": between["cpu_us_per_transfer"],
            "cpu_ratio": _ratio(between["cpu_us_per_transfer"], within["cpu_us_per_transfer"]),
            "cpu_us_added": _difference(between["cpu_us_per_transfer"], within["cpu_us_per_transfer"]),
        })  # fmt: skip
    return figures


def latest_pgbench_tps(state_dir: pathlib.Path) -> tuple[float | None, str | None]:
    """pgbench's TPS from the newest `make bench` report that measured it, and which report."""
    for path in sorted((state_dir / REPORTS_FOLDER).glob("bench-*.json"), reverse=True):
        try:
            rows = json.loads(path.read_text()).get("results", [])
        except (OSError, ValueError):
            continue
        for row in rows:
            if row.get("scenario") == PGBENCH_SCENARIO and row.get("transactions_per_second"):
                return float(row["transactions_per_second"]), str(path)
    return None, None


# (b) The window close.


@dataclasses.dataclass(frozen=True)
class Call:
    """One call of the stream: when it started and ended (time.monotonic) and whether it was answered OK."""

    started: float
    ended: float
    ok: bool


def overlaps(call: Call, intervals: list[tuple[float, float]]) -> bool:
    return any(call.started < end and start < call.ended for start, end in intervals)


def latency_split(calls: list[Call], intervals: list[tuple[float, float]]) -> dict:
    """p50/p99 (ms) and counts of the OK calls that overlapped one of `intervals` and of the others."""
    during = [c.ended - c.started for c in calls if c.ok and overlaps(c, intervals)]
    outside = [c.ended - c.started for c in calls if c.ok and not overlaps(c, intervals)]
    during_p50, during_p99, _ = latency_figures_ms(during)
    outside_p50, outside_p99, _ = latency_figures_ms(outside)
    return {"during": {"transfers": len(during), "p50_ms": during_p50, "p99_ms": during_p99},
            "outside": {"transfers": len(outside), "p50_ms": outside_p50, "p99_ms": outside_p99},
            "failed": sum(1 for c in calls if not c.ok)}  # fmt: skip


class TransferStream:
    """`clients` closed loops of single transfers between the bench's participants, in a thread
    of its own, each call timed; start() and stop() it around what it should run under."""

    def __init__(self, cluster: Cluster, run_id: str, account_ids: tuple[str, ...], clients: int) -> None:
        self.cluster, self.run_id, self.account_ids, self.clients = cluster, run_id, account_ids, clients
        self.calls: list[Call] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._sequence = 0

    def start(self) -> None:
        self.calls, self._stop = [], threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)
        self._thread.start()

    def stop(self) -> list[Call]:
        self._stop.set()
        assert self._thread is not None
        self._thread.join(timeout=CALL_TIMEOUT_SECONDS * 2)
        return list(self.calls)

    async def _run(self) -> None:
        async with self.cluster.traffic_target().channel(aio=True) as channel:
            stub = payments_pb2_grpc.PaymentsStub(channel)
            await asyncio.gather(*(self._loop(stub, random.Random(index)) for index in range(self.clients)))

    async def _loop(self, stub, rng: random.Random) -> None:
        while not self._stop.is_set():
            self._sequence += 1
            debit, credit = rng.sample(self.account_ids, 2)
            request = payments_pb2.TransferRequest(
                transfer_id=f"{self.run_id}:stream:{self._sequence}", debit_account_id=debit, credit_account_id=credit,
                amount_minor=rng.randint(1, TRANSFER_AMOUNT_MINOR_MAX), currency=CURRENCY, reference="clearing bench stream",
            )  # fmt: skip
            started = time.monotonic()
            try:
                await stub.Transfer(request, timeout=CALL_TIMEOUT_SECONDS)
                ok = True
            except grpc.aio.AioRpcError:
                ok = False
            self.calls.append(Call(started, time.monotonic(), ok))


def load_ids(run_id: str, tag: str, count: int, shard_map) -> dict[str, list[str]]:
    """`count` transfer ids by the shard their own hash picks (the id registry's shard): each
    loaded transfer then lives, with its registry row, on one shard."""
    by_shard: dict[str, list[str]] = collections.defaultdict(list)
    for index in range(count):
        transfer_id = f"{run_id}:{tag}:{index}"
        by_shard[shard_map.shard_name_for_key(transfer_id)].append(transfer_id)
    return by_shard


def load_pairs(account_set: AccountSet, shard_name: str, rng: random.Random) -> list[tuple[str, str, str, str]]:
    """(debit, credit, payer, payee) pairs between accounts of two participants on one shard."""
    participant_of = account_set.participant_by_account_id
    accounts = [a for a in account_set.customer_account_ids_by_shard.get(shard_name, []) if a in participant_of]
    pairs = []
    for debit in accounts:
        payer = participant_of[debit]
        others = [a for a in accounts if participant_of[a] != payer]
        if not others:
            continue
        heavy = LOAD_HEAVY_PAYER_FACTOR if payer == account_set.participant_ids[0] else 1
        for credit in rng.choices(others, k=LOAD_PAIRS_PER_ACCOUNT * heavy):
            pairs.append((debit, credit, payer, participant_of[credit]))
    return pairs


# One transaction per shard, as the owner role (not subject to the service's row policies).
LOAD_ROWS = f"""
    CREATE TEMP TABLE bench_rows ON COMMIT DROP AS
    SELECT i.transfer_id, p.debit, p.credit, p.payer, p.payee, 1 + i.g % {LOAD_AMOUNT_MINOR_MAX} AS amount
    FROM bench_ids i JOIN bench_pairs p ON p.k = i.g % %(pairs)s"""  # nosec B608 # constants only
LOAD_STATEMENTS = (
    """INSERT INTO transfers (transfer_id, debit_account_id, credit_account_id, amount_minor, currency, reference, status,
                              finalized_at, branch, payer_participant_id, payee_participant_id, window_id)
       SELECT transfer_id, debit, credit, amount, %(currency)s, %(reference)s, %(posted)s, now(), %(branch)s, payer, payee, %(window)s
       FROM bench_rows""",
    """INSERT INTO id_registry (namespace, id, fields)
       SELECT %(namespace)s::smallint, transfer_id, jsonb_build_object('debit_account_id', debit, 'credit_account_id', credit,
              'amount_minor', amount, 'currency', %(currency)s::text, 'reference', %(reference)s::text)
       FROM bench_rows""",
    """UPDATE accounts a SET debits_posted_minor = a.debits_posted_minor + s.amount, updated_at = now()
       FROM (SELECT debit, sum(amount) AS amount FROM bench_rows GROUP BY debit) s WHERE a.account_id = s.debit""",
    """UPDATE accounts a SET credits_posted_minor = a.credits_posted_minor + s.amount, updated_at = now()
       FROM (SELECT credit, sum(amount) AS amount FROM bench_rows GROUP BY credit) s WHERE a.account_id = s.credit""",
    """INSERT INTO clearing_window_totals (window_id, participant_id, currency, debits_minor, credits_minor, transfers)
       SELECT %(window)s::bigint, participant, %(currency)s::text, sum(debits), sum(credits), sum(transfers) FROM (
           SELECT payer AS participant, amount AS debits, 0 AS credits, 1 AS transfers FROM bench_rows
           UNION ALL SELECT payee, 0, amount, 0 FROM bench_rows) legs
       GROUP BY participant
       ON CONFLICT (window_id, participant_id, currency) DO UPDATE SET
           debits_minor = clearing_window_totals.debits_minor + EXCLUDED.debits_minor,
           credits_minor = clearing_window_totals.credits_minor + EXCLUDED.credits_minor,
           transfers = clearing_window_totals.transfers + EXCLUDED.transfers""",
    """INSERT INTO clearing_positions (participant_id, currency, position_minor)
       SELECT participant, %(currency)s::text, sum(net) FROM (
           SELECT payer AS participant, amount AS net FROM bench_rows UNION ALL SELECT payee, -amount FROM bench_rows) legs
       GROUP BY participant
       ON CONFLICT (participant_id, currency) DO UPDATE SET
           position_minor = clearing_positions.position_minor + EXCLUDED.position_minor, updated_at = now()""",
)


def load_shard(owner_dsn: str, transfer_ids: list[str], pairs: list[tuple[str, str, str, str]]) -> int:
    """Post `transfer_ids` as cleared same-shard transfers over `pairs` into this shard's open
    window, in one transaction; returns that window. A customer whose balance would go below
    zero makes the accounts' CHECK refuse the whole load (nothing is half written)."""
    with psycopg.connect(owner_dsn) as connection:
        connection.execute(f"SET LOCAL statement_timeout = '{LOAD_STATEMENT_TIMEOUT}'")  # nosec B608 # a constant
        # As posting does: the window cannot move on while this transaction adds to it.
        connection.execute("SELECT pg_advisory_xact_lock_shared(%s)", (clearing.WINDOW_LOCK_KEY,))
        (window_id,) = connection.execute("SELECT window_id FROM clearing_shard_window").fetchone()
        connection.execute("CREATE TEMP TABLE bench_pairs (k int PRIMARY KEY, debit text, credit text, payer text, payee text) ON COMMIT DROP")
        connection.execute("CREATE TEMP TABLE bench_ids (g int, transfer_id text) ON COMMIT DROP")
        with connection.cursor() as cursor:
            with cursor.copy("COPY bench_pairs FROM STDIN") as copy:
                for k, pair in enumerate(pairs):
                    copy.write_row((k, *pair))
            with cursor.copy("COPY bench_ids FROM STDIN") as copy:
                for g, transfer_id in enumerate(transfer_ids):
                    copy.write_row((g, transfer_id))
            cursor.execute(LOAD_ROWS.replace("%(pairs)s", str(len(pairs))))
            parameters = {"currency": CURRENCY, "reference": LOAD_REFERENCE, "posted": POSTED_STATUS, "branch": SAME_SHARD_BRANCH,
                          "window": window_id, "namespace": TRANSFER_NAMESPACE}  # fmt: skip
            for statement in LOAD_STATEMENTS:
                cursor.execute(statement, {name: value for name, value in parameters.items() if f"%({name})s" in statement})
    return int(window_id)


def load_window(cluster: Cluster, account_set: AccountSet, size: int, tag: str, seed: int) -> dict:
    """`size` cleared transfers into the open window, on every shard at once; returns what was done."""
    started = time.monotonic()
    ids_by_shard = load_ids(account_set.run_id, tag, size, load_shard_map(cluster.etcd_endpoint))
    rng = random.Random(seed)
    work = {shard.name: (shard.owner_dsn, ids_by_shard.get(shard.name, []), load_pairs(account_set, shard.name, rng))
            for shard in cluster.shards}  # fmt: skip
    missing = [name for name, (_, ids, pairs) in work.items() if ids and not pairs]
    if missing:
        raise SystemExit(f"no accounts of two participants on {missing}: raise --customers")
    with concurrent.futures.ThreadPoolExecutor(max_workers=len(work)) as pool:
        futures = {name: pool.submit(load_shard, dsn, ids, pairs) for name, (dsn, ids, pairs) in work.items() if ids}
        windows = {name: future.result() for name, future in futures.items()}
    return {"transfers": size, "by_shard": {name: len(ids) for name, (_, ids, _) in work.items()},
            "windows": windows, "seconds": time.monotonic() - started}  # fmt: skip


def timed(call):
    started = time.monotonic()
    result = call()
    return result, started, time.monotonic()


def close_run(stub_operator, stub_admin, stream: TransferStream, run_id: str, tag: str) -> dict:
    """With the stream running: close the open window, settle it, reconcile it; every call timed."""
    stream.start()
    time.sleep(STREAM_LEAD_SECONDS)
    request = clearing_pb2.CloseSettlementWindowRequest(request_id=f"{run_id}:{tag}:close", reason="clearing bench")
    closed, close_started, close_ended = timed(lambda: stub_operator.CloseSettlementWindow(request, timeout=CLEARING_CALL_TIMEOUT_SECONDS))
    time.sleep(STREAM_LEAD_SECONDS)
    window_id = closed.closed_window.window_id
    window = stub_operator.GetSettlementWindow(clearing_pb2.GetSettlementWindowRequest(window_id=window_id), timeout=CLEARING_CALL_TIMEOUT_SECONDS)
    settle = clearing_pb2.CreateSettlementRequest(request_id=f"{run_id}:{tag}:settle", window_ids=[window_id], model=clearing_pb2.DEFERRED_NET)
    settlement, settle_started, settle_ended = timed(lambda: stub_operator.CreateSettlement(settle, timeout=CLEARING_CALL_TIMEOUT_SECONDS))
    reconcile = {"error": None}
    reconcile_started = reconcile_ended = time.monotonic()
    try:
        reconciled, reconcile_started, reconcile_ended = timed(
            lambda: stub_operator.Reconcile(clearing_pb2.ReconcileRequest(window_ids=[window_id]), timeout=RECONCILE_TIMEOUT_SECONDS)
        )
        reconcile.update(consistent=reconciled.consistent, findings=len(reconciled.findings),
                         transfers_checked=reconciled.transfers_checked, windows_checked=reconciled.windows_checked)  # fmt: skip
    except grpc.RpcError as error:
        reconcile["error"] = f"{describe_rpc_error(error)}: {error.details()}"
    recorded_started = time.monotonic()
    for entry in settlement.entries:
        stub_admin.RecordParticipantSettled(
            clearing_pb2.RecordParticipantSettledRequest(settlement_id=settlement.settlement_id, participant_id=entry.participant_id,
                                                         currency=entry.currency),
            timeout=CLEARING_CALL_TIMEOUT_SECONDS,
        )  # fmt: skip
    recorded_ended = time.monotonic()
    calls = stream.stop()
    reconcile["seconds"] = reconcile_ended - reconcile_started if reconcile["error"] is None else None
    return {
        "window_id": window_id, "window_transfers": window.transfer_count,
        "close_ms": (close_ended - close_started) * 1000, "create_settlement_ms": (settle_ended - settle_started) * 1000,
        "settlement_entries": len(settlement.entries),
        "settlement_nets_sum_to_zero": sum(entry.net_minor for entry in settlement.entries) == 0,
        "reconcile": reconcile, "record_participants_settled_ms": (recorded_ended - recorded_started) * 1000,
        "stream_during_close": latency_split(calls, [(close_started, close_ended)]),
        "stream_during_reconcile": latency_split(calls, [(reconcile_started, reconcile_ended)]) if reconcile["error"] is None else None,
    }  # fmt: skip


def close_storm(stub_operator, stream: TransferStream, run_id: str, closes: int) -> dict:
    """`closes` closes of small windows under the stream: enough transfers overlap a close for a p99."""
    stream.start()
    time.sleep(STREAM_LEAD_SECONDS)
    intervals, close_ms = [], []
    for index in range(closes):
        request = clearing_pb2.CloseSettlementWindowRequest(request_id=f"{run_id}:storm:{index}", reason="clearing bench storm")
        _, started, ended = timed(lambda request=request: stub_operator.CloseSettlementWindow(request, timeout=CLEARING_CALL_TIMEOUT_SECONDS))
        intervals.append((started, ended))
        close_ms.append((ended - started) * 1000)
        time.sleep(STORM_PAUSE_SECONDS)
    calls = stream.stop()
    return {"closes": closes, "close_ms_median": statistics.median(close_ms), "close_ms_max": max(close_ms),
            "stream": latency_split(calls, intervals)}  # fmt: skip


def window_figures(runs: list[dict]) -> dict:
    closes = [run["close_ms"] for run in runs]
    reconciles = [run["reconcile"]["seconds"] for run in runs if run["reconcile"]["seconds"] is not None]
    during = [c for run in runs for c in [run["stream_during_close"]["during"]["p99_ms"]] if c is not None]
    return {
        "close_ms_median": statistics.median(closes), "close_ms_min": min(closes), "close_ms_max": max(closes),
        "create_settlement_ms_median": statistics.median(run["create_settlement_ms"] for run in runs),
        "reconcile_seconds_median": statistics.median(reconciles) if reconciles else None,
        "record_participants_settled_ms_median": statistics.median(run["record_participants_settled_ms"] for run in runs),
        "stream_p99_ms_during_close_max": max(during) if during else None,
        "window_transfers_min": min(run["window_transfers"] for run in runs),
    }  # fmt: skip


# The command.


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m loadtest.clearing_bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=SECONDS_DEFAULT, help="measured seconds per row of (a)")
    parser.add_argument("--warmup-seconds", type=int, default=WARMUP_SECONDS_DEFAULT, help="unmeasured seconds first")
    parser.add_argument("--clients", type=int, default=CLIENTS_DEFAULT, help="Transfer callers in (a)")
    parser.add_argument("--batch-clients", type=int, default=BATCH_CLIENTS_DEFAULT, help="CreateTransfers callers in (a)")
    parser.add_argument("--batch-size", type=int, default=BATCH_SIZE_DEFAULT, help="transfers per CreateTransfers call")
    parser.add_argument("--customers", type=int, default=CUSTOMERS_DEFAULT, help="customers of the bench's participants")
    parser.add_argument("--window-sizes", default=WINDOW_SIZES_DEFAULT, help="comma-separated transfers per loaded window")
    parser.add_argument("--close-runs", type=int, default=CLOSE_RUNS_DEFAULT, help="loads and closes per window size")
    parser.add_argument("--stream-clients", type=int, default=STREAM_CLIENTS_DEFAULT, help="transfer callers during the closes")
    parser.add_argument("--storm-closes", type=int, default=STORM_CLOSES, help="closes of small windows under the stream")
    parser.add_argument("--skip-position-check", action="store_true", help="measure (b) only")
    arguments = parser.parse_args(argv)
    try:
        arguments.window_sizes = [int(size) for size in arguments.window_sizes.split(",") if size]
    except ValueError:
        parser.error("--window-sizes is a comma-separated list of whole numbers")
    if min([arguments.seconds, arguments.clients, arguments.batch_clients, arguments.close_runs, arguments.stream_clients,
            arguments.customers, *arguments.window_sizes] or [0]) < 1 or not 1 <= arguments.batch_size <= 5000:  # fmt: skip
        parser.error("counts and --seconds must be positive, --batch-size 1..5000")
    return arguments


def _figure(value: float | None, digits: int = 1, suffix: str = "") -> str:
    return "-" if value is None else f"{value:.{digits}f}{suffix}"


def format_report(report: dict) -> str:
    lines = []
    if report["position_check"]["rows"]:
        header = f"{'(a) position check':<36} {'clients':>7} {'TPS':>9} {'wall µs/t':>10} {'CPU µs/t':>9} {'p99 ms':>8} {'vs pgbench':>10}"
        lines += [header, "-" * len(header)]
        for row in report["position_check"]["rows"]:
            lines.append(f"{row['scenario']:<36} {row['clients']:>7} {row['tps']:>9.1f} {_figure(row['wall_us_per_transfer']):>10} "
                         f"{_figure(row['cpu_us_per_transfer']):>9} {_figure(row['p99_ms'], 2):>8} {_figure(row['ratio_to_pgbench'], 3):>10}")  # fmt: skip
        lines.append("")
        header = f"{'between / within one participant':<30} {'wall ratio':>10} {'wall µs added':>13} {'CPU ratio':>9} {'CPU µs added':>12}"
        lines += [header, "-" * len(header)]
        for pair in report["position_check"]["pairs"]:
            lines.append(f"{pair['path']:<30} {_figure(pair['wall_ratio'], 3):>10} {_figure(pair['wall_us_added']):>13} "
                         f"{_figure(pair['cpu_ratio'], 3):>9} {_figure(pair['cpu_us_added']):>12}")  # fmt: skip
        pgbench = report["position_check"]["pgbench"]
        lines.append(f"pgbench TPC-B: {_figure(pgbench['tps'])} TPS from {pgbench['report']}" if pgbench["tps"]
                     else "pgbench TPC-B: no bench report with it under reports/ (make bench writes one)")  # fmt: skip
        lines.append("wall µs/t = 1e6 / TPS at that concurrency; CPU µs/t = service workers + coordinators + PostgreSQL, per transfer.")
        lines.append("")
    header = (f"{'(b) window close':<18} {'runs':>4} {'in window':>10} {'close ms (med, min-max)':>24} {'settle ms':>9} "
              f"{'reconcile s':>11} {'record ms':>9} {'p99 ms during close':>19}")  # fmt: skip
    lines += [header, "-" * len(header)]
    for size, block in report["window_close"]["sizes"].items():
        f = block["figures"]
        lines.append(
            f"{int(size):>18,} {len(block['runs']):>4} {f['window_transfers_min']:>10,} "
            f"{_figure(f['close_ms_median']) + ' (' + _figure(f['close_ms_min']) + '-' + _figure(f['close_ms_max']) + ')':>24} "
            f"{_figure(f['create_settlement_ms_median']):>9} {_figure(f['reconcile_seconds_median'], 2):>11} "
            f"{_figure(f['record_participants_settled_ms_median']):>9} {_figure(f['stream_p99_ms_during_close_max']):>19}"
        )
        loads = ", ".join(f"{run['load']['seconds']:.1f}" for run in block["runs"])
        lines.append(f"{'':>18} loaded straight into the databases as the owner role (SQL, not the API) in {loads} s")
        errors = {run["reconcile"]["error"] for run in block["runs"] if run["reconcile"]["error"]}
        if errors:
            lines.append(f"{'':>18} Reconcile failed: {'; '.join(sorted(errors))}")
        elif not all(run["reconcile"]["consistent"] for run in block["runs"]):
            lines.append(f"{'':>18} Reconcile found inconsistencies: see the report")
    storm = report["window_close"].get("storm")
    if storm:
        s = storm["stream"]
        lines.append(
            f"storm: {storm['closes']} closes of small windows, median {storm['close_ms_median']:.1f} ms; stream p99 "
            f"{_figure(s['during']['p99_ms'])} ms over {s['during']['transfers']} transfers overlapping a close, "
            f"{_figure(s['outside']['p99_ms'])} ms over {s['outside']['transfers']} others ({s['failed']} failed)"
        )
    return "\n".join(lines)


def write_report(cluster: Cluster, report: dict) -> pathlib.Path:
    folder = cluster.state_dir / REPORTS_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{REPORT_PREFIX}-{datetime.datetime.now(datetime.UTC).strftime('%Y%m%dT%H%M%S.%fZ')}.json"
    path.write_text(json.dumps(report, indent=1) + "\n")
    return path


def log(line: str) -> None:
    print(f"[clearing-bench] {line}", file=sys.stderr, flush=True)


def run(arguments: argparse.Namespace, cluster: Cluster) -> dict:
    run_id = new_run_id("cbench")
    account_set = open_participant_accounts(
        cluster.target, cluster.etcd_endpoint, list(PARTICIPANTS), arguments.customers, CAP_MINOR, run_id=run_id,
        funding_amount_minor=FUNDING_AMOUNT_MINOR, log=log,
    )  # fmt: skip
    roles = costs.role_by_process(cluster)
    pgbench_tps, pgbench_report = latest_pgbench_tps(cluster.state_dir)
    rows = []
    if not arguments.skip_position_check:
        for scenario in check_scenarios(account_set, arguments.batch_size):
            clients = arguments.batch_clients if scenario.batch_size else arguments.clients
            log(f"{scenario.name}: {clients} clients, {arguments.seconds} s")
            checkpoint(cluster)
            result = run_scenario(scenario, cluster.traffic_target(), clients=clients, seconds=arguments.seconds,
                                  warmup_seconds=arguments.warmup_seconds, watched_pid_by_name=watched_pids(cluster),
                                  counters=costs.ClusterCounters(cluster))  # fmt: skip
            rows.append(row_figures(result, roles, pgbench_tps))
    report = {
        "started_at": datetime.datetime.now(datetime.UTC).isoformat(), "machine": machine(),
        "options": vars(arguments), "grpc_endpoint": cluster.grpc_endpoint, "participants": account_set.participant_ids,
        "position_check": {"rows": rows, "pairs": check_costs(rows), "pgbench": {"tps": pgbench_tps, "report": pgbench_report}},
        "window_close": {"loaded_by": "SQL as the owner role (not the API): transfers, id registry, account counters, "
                                      "window totals and positions in one transaction per shard", "sizes": {}},
    }  # fmt: skip
    stream_accounts = tuple(a for ids in account_set.customer_account_ids_by_shard.values() for a in ids)
    stream = TransferStream(cluster, run_id, stream_accounts, arguments.stream_clients)
    with cluster.target.channel() as admin_channel:
        admin = clearing_pb2_grpc.ClearingStub(admin_channel)
        # Closing and settling are an operator's acts; admin may do them too (one channel suffices).
        for size in arguments.window_sizes:
            runs = []
            for index in range(arguments.close_runs):
                tag = f"w{size}r{index}"
                # The window to load must hold nothing else: close what is open first.
                admin.CloseSettlementWindow(clearing_pb2.CloseSettlementWindowRequest(request_id=f"{run_id}:{tag}:before"),
                                            timeout=CLEARING_CALL_TIMEOUT_SECONDS)  # fmt: skip
                log(f"loading {size:,} cleared transfers into the open window (SQL, as the owner role)")
                loaded = load_window(cluster, account_set, size, tag, seed=index)
                log(f"loaded in {loaded['seconds']:.1f} s; closing, settling, reconciling under a stream of transfers")
                checkpoint(cluster)
                measured = close_run(admin, admin, stream, run_id, tag)
                measured["load"] = loaded
                log(f"closed {measured['window_transfers']:,} transfers in {measured['close_ms']:.1f} ms")
                runs.append(measured)
            report["window_close"]["sizes"][str(size)] = {"runs": runs, "figures": window_figures(runs)}
        if arguments.storm_closes:
            report["window_close"]["storm"] = close_storm(admin, stream, run_id, arguments.storm_closes)
    return report


def main(argv: list[str] | None = None) -> int:
    arguments = parse_arguments(argv)
    cluster = load_cluster()
    report = run(arguments, cluster)
    print(format_report(report))
    print(f"report: {write_report(cluster, report)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
