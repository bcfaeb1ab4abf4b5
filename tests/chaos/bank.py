"""A bank test in the style of Jepsen's: random transfers and balance reads under faults, then a checker.

    python -m tests.chaos.bank --minutes 5 --seed 42 [--cross-shard-share 0.5] [--clients 8]
                               [--faults kill-grpc,crash-shard,...] [--port-base 17700] [--keep]

It starts a cluster of its own (its own state folder and ports: faults are
destructive) and routes every shard through a TCP proxy in this process, so
that links can be cut or slowed. Then:

- the workload: CLIENTS threads, each with its own gRPC channel (so the kernel
  spreads them over the service workers), make random transfers among a few
  funded customer accounts on every shard (a share of them between shards) and
  read balances; every call has a short deadline, so faults produce unknowns.
  Every operation goes into the history: invoked and completed times, and an
  outcome: `ok`, `fail` (a definite refusal) or `unknown` (the outcome cannot
  be told from the answer).
- the nemesis: a seeded schedule of faults (tests/fixtures/faults.py), each
  healed after at most FAULT_HOLD_SECONDS_MAX.
- the checker, once all is healed: every unknown transfer must become final
  within FINAL_WITHIN_SECONDS; then the shards themselves must show every
  acknowledged transfer posted exactly once per side, no trace of a failed
  one, the test's total unchanged, no customer below zero (in any read, too),
  nothing left pending, each account's balance equal to what the resolved
  history says, and services.storage.audit content.
- clearing (--participants N, default 3; 0 leaves it out): the customers belong to N
  participants in turn (funded by a SYSTEM account of their own participant, so funding is
  not cleared), the first participant has a net debit cap (--cap-minor), and a closer thread
  closes the settlement window every --close-every-seconds under the faults. After healing,
  every close whose answer was unknown is retried with its request id, every CLOSED window is
  settled and recorded, and the checker adds: no window CLOSING, the clearing invariants from
  the databases (tests/fixtures/clearing.py), the capped participant within its cap, and
  Reconcile consistent.

A failure prints the seed; the same seed replays the same plan of operations
and faults (the interleaving of threads is the one thing it cannot replay).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import concurrent.futures
import contextlib
import dataclasses
import itertools
import json
import logging
import os
import random
import shutil
import statistics
import sys
import threading
import time
import uuid
from collections.abc import Iterator

import grpc
import psycopg
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from corebank.v1 import accounts_pb2, accounts_pb2_grpc, payments_pb2, payments_pb2_grpc, transfers_pb2
from deploy.cluster import Cluster
from services.auth.client import Target
from services.storage.audit import audit_cluster
from tests.fixtures import faults
from tests.fixtures import clearing as clearing_books
from tests.fixtures.cluster import make_state_dir
from tests.fixtures.ledger import LedgerClient, _load_shard_map
from tests.fixtures.proxy import TcpProxy

SHARD_COUNT = 3
GRPC_WORKERS = 2
DEFAULT_PORT_BASE = 17700  # `make chaos`; the pytest form uses 17500, the session cluster 17100

CLIENTS_DEFAULT = 8
ACCOUNTS_PER_SHARD_DEFAULT = 4  # few accounts: contention, and refusals for lack of funds
OPENING_BALANCE_MINOR = 10_000
# Up to a third of an opening balance: transfers often succeed, and sometimes find the funds gone.
TRANSFER_AMOUNT_MINOR_MAX = 3_000
READ_SHARE_DEFAULT = 0.2
CROSS_SHARD_SHARE_DEFAULT = 0.5
# Short, so that a fault turns calls into unknowns rather than slow successes.
CLIENT_DEADLINE_SECONDS = 2.0
# A client that got UNAVAILABLE at once (no worker listening) waits this long
# before its next call, so a dead endpoint does not become a busy loop.
CLIENT_BACKOFF_SECONDS = 0.05

FAULT_HOLD_SECONDS_MIN = 1.0
FAULT_HOLD_SECONDS_MAX = 4.0
FAULT_QUIET_SECONDS_MIN = 0.3
FAULT_QUIET_SECONDS_MAX = 2.0
PROXY_DELAY_SECONDS_MIN = 0.2
PROXY_DELAY_SECONDS_MAX = 1.5

# A run goes on past its duration until the nemesis has injected every kind once, for at most this long.
EXTENSION_SECONDS_MAX = 120
# After the last fault heals: the cluster must be healthy within this, and every
# unknown transfer final within FINAL_WITHIN_SECONDS.
HEAL_TIMEOUT_SECONDS = 120
FINAL_WITHIN_SECONDS = 60
RESOLVE_ROUND_DELAY_SECONDS = 0.5
CHECK_IN_FLIGHT_MAX = 64
CHECK_DEADLINE_SECONDS = 5.0
CHANNEL_READY_TIMEOUT_SECONDS = 10
PROBE_DEADLINE_SECONDS = 10.0

OK, FAIL, UNKNOWN = "ok", "fail", "unknown"
# Definite answers: the server says the transfer did not (and will not) happen.
DEFINITE_FAILURE_CODES = frozenset(
    {
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.ALREADY_EXISTS,
        grpc.StatusCode.ABORTED,
    }
)
FINAL_STATUSES = {transfers_pb2.POSTED: "POSTED", transfers_pb2.REJECTED: "REJECTED", transfers_pb2.VOIDED: "VOIDED"}
NEVER_STARTED = "NOT_FOUND"
POSTED_ROW_STATUS = 2  # transfers.status in the shards' schema

# Clearing: participants the customers belong to, the first one's net debit cap (about one and a
# half opening balances: some of its payments are refused NET_DEBIT_CAP_EXCEEDED), and how often
# the closer closes the window.
PARTICIPANTS_DEFAULT = 3
CAP_MINOR_DEFAULT = 15_000
CLOSE_EVERY_SECONDS_DEFAULT = 2.0
CLEARING_CURRENCY = "USD"
# After healing: retries of unknown closes and of settlement calls, each bounded.
CLEARING_RETRY_SECONDS = 30.0

FAULT_KINDS = ("kill-grpc", "crash-shard", "freeze-shard", "stop-etcd", "cut-shard", "delay-shard", "kill-coordinator")
ROLE_COORDINATOR = "coordinator"

log = logging.getLogger("bank")


@dataclasses.dataclass(frozen=True)
class Config:
    seed: int
    duration_seconds: float
    clients: int = CLIENTS_DEFAULT
    accounts_per_shard: int = ACCOUNTS_PER_SHARD_DEFAULT
    cross_shard_share: float = CROSS_SHARD_SHARE_DEFAULT
    read_share: float = READ_SHARE_DEFAULT
    faults: tuple[str, ...] = FAULT_KINDS
    fault_hold_seconds_max: float = FAULT_HOLD_SECONDS_MAX
    fault_quiet_seconds_max: float = FAULT_QUIET_SECONDS_MAX
    participants: int = PARTICIPANTS_DEFAULT
    cap_minor: int = CAP_MINOR_DEFAULT
    close_every_seconds: float = CLOSE_EVERY_SECONDS_DEFAULT

    def __post_init__(self) -> None:
        unknown = set(self.faults) - set(FAULT_KINDS)
        if unknown:
            raise ValueError(f"unknown faults {sorted(unknown)}; known: {', '.join(FAULT_KINDS)}")
        if not 0 <= self.cross_shard_share <= 1 or not 0 <= self.read_share <= 1:
            raise ValueError("shares are fractions in 0..1")


# The history.


@dataclasses.dataclass
class Op:
    client: int
    kind: str  # "transfer" or "read"
    invoked_seconds: float  # since the workload began
    completed_seconds: float = 0.0
    outcome: str = ""  # OK, FAIL or UNKNOWN
    code: str = ""  # the gRPC status code's name when the call failed
    reason: str = ""  # ErrorInfo reason, when there is one
    transfer_id: str = ""
    debit_account_id: str = ""
    credit_account_id: str = ""
    amount_minor: int = 0
    cross_shard: bool = False
    account_id: str = ""  # reads
    balance_minor: int | None = None  # reads
    final_status: str = ""  # transfers, after resolution: POSTED, REJECTED, VOIDED or NOT_FOUND
    final_after_seconds: float | None = None  # from the end of healing (or the call's end, if later) to the final state


class History:
    def __init__(self) -> None:
        self._ops: list[Op] = []
        self._lock = threading.Lock()

    def add(self, op: Op) -> None:
        with self._lock:
            self._ops.append(op)

    @property
    def ops(self) -> list[Op]:
        with self._lock:
            return list(self._ops)

    def transfers(self) -> list[Op]:
        return [op for op in self.ops if op.kind == "transfer"]


@dataclasses.dataclass
class FaultRecord:
    kind: str
    target: str
    started_seconds: float
    held_seconds: float = 0.0
    heal_seconds: float = 0.0
    detail: str = ""
    error: str = ""


def error_reason(error: grpc.RpcError) -> str:
    """The ErrorInfo reason when the server sent one; failures from the gRPC layer itself have none."""
    try:
        status = rpc_status.from_call(error)
    except ValueError:
        return ""
    if status is None:
        return ""
    info = error_details_pb2.ErrorInfo()
    for detail in status.details:
        if detail.Unpack(info):
            return info.reason
    return ""


def open_channel(target: Target) -> grpc.Channel:
    # A private subchannel pool: otherwise every channel to the same target shares
    # one connection, and so one service worker.
    return target.channel(options=[("grpc.use_local_subchannel_pool", 1)])


# The cluster.


class ChaosCluster:
    """A cluster of our own with every shard reached through a proxy of this process."""

    def __init__(self, state_dir, port_base: int) -> None:
        self.control = Cluster(state_dir, shard_count=SHARD_COUNT, port_base=port_base, grpc_workers=GRPC_WORKERS)
        self.description: dict = {}
        self.proxies: dict[str, TcpProxy] = {}

    def up(self) -> ChaosCluster:
        self.description = self.control.up()
        for shard in self.description["shards"]:
            if shard["name"] not in self.proxies:
                self.proxies[shard["name"]] = TcpProxy(target_port=shard["port"]).start()
            faults.route_shard_through_proxy(self.description, shard["name"], self.proxies[shard["name"]].port)
        return self

    def refresh(self) -> dict:
        self.description = self.control.describe()
        return self.description

    def coordinators(self) -> list[str]:
        return [p["name"] for p in self.refresh()["processes"] if p["role"] == ROLE_COORDINATOR]

    def heal(self) -> None:
        """Whatever a fault left behind: links restored, every process started."""
        for proxy in self.proxies.values():
            proxy.delay(0)
            proxy.restore()
        if not self.control.is_healthy():
            self.control.up()
        faults.wait_adopted(self.refresh(), current_shard_map_version(self.description))

    def close(self, keep: bool = False) -> None:
        for proxy in self.proxies.values():
            proxy.close()
        if keep:
            self.control.down()
        else:
            self.control.clean()
            shutil.rmtree(self.control.state_dir, ignore_errors=True)


def current_shard_map_version(description: dict) -> int:
    return asyncio.run(_load_shard_map(description["etcd_endpoint"])).version


# The nemesis.


class Nemesis(threading.Thread):
    """Injects one fault at a time from a seeded schedule, each healed within its hold time."""

    def __init__(self, chaos: ChaosCluster, config: Config, clock) -> None:
        super().__init__(name="nemesis", daemon=True)
        self.chaos = chaos
        self.config = config
        self.clock = clock
        self.rng = random.Random(f"nemesis-{config.seed}")
        self.records: list[FaultRecord] = []
        self.stopping = threading.Event()
        # Set once every kind has been injected and healed: a run lasts at least that long.
        self.every_kind_done = threading.Event()

    def kinds(self) -> list[str]:
        kinds = [kind for kind in self.config.faults if kind != "kill-coordinator"]
        if "kill-coordinator" in self.config.faults and self.chaos.coordinators():
            kinds.append("kill-coordinator")
        return kinds

    def schedule(self) -> Iterator[str]:
        """Every kind once in a shuffled order, then again: a short run still sees each kind."""
        kinds = self.kinds()
        while kinds:
            self.rng.shuffle(kinds)
            yield from list(kinds)

    def run(self) -> None:
        kinds_left = set(self.kinds())
        if not kinds_left:
            self.every_kind_done.set()
        for kind in self.schedule():
            quiet_seconds = self.rng.uniform(FAULT_QUIET_SECONDS_MIN, max(FAULT_QUIET_SECONDS_MIN, self.config.fault_quiet_seconds_max))
            if self.stopping.wait(quiet_seconds):
                return
            hold_seconds = self.rng.uniform(FAULT_HOLD_SECONDS_MIN, max(FAULT_HOLD_SECONDS_MIN, self.config.fault_hold_seconds_max))
            self.records.append(self.inject(kind, hold_seconds))
            kinds_left.discard(kind)
            if not kinds_left:
                self.every_kind_done.set()

    def inject(self, kind: str, hold_seconds: float) -> FaultRecord:
        control = self.chaos.control
        shard_names = [s["name"] for s in self.chaos.description["shards"]]
        record = FaultRecord(kind, "", self.clock())
        try:
            if kind == "kill-grpc":
                record.target = self.rng.choice([w.name for w in control.grpc_workers])
                fault = faults.killed(control, record.target)
            elif kind == "kill-coordinator":
                record.target = self.rng.choice(self.chaos.coordinators())
                fault = faults.killed(control, record.target)
            elif kind == "crash-shard":
                record.target = self.rng.choice(shard_names)
                fault = faults.shard_crashed(control, record.target)
            elif kind == "freeze-shard":
                record.target = self.rng.choice(shard_names)
                fault = faults.shard_frozen(control, record.target, seconds_max=faults.FREEZE_SECONDS_MAX)
            elif kind == "stop-etcd":
                record.target = "etcd"
                fault = faults.etcd_stopped(control)
            elif kind == "cut-shard":
                record.target = self.rng.choice(shard_names)
                fault = proxy_cut(self.chaos.proxies[record.target])
            elif kind == "delay-shard":
                record.target = self.rng.choice(shard_names)
                delay_seconds = self.rng.uniform(PROXY_DELAY_SECONDS_MIN, PROXY_DELAY_SECONDS_MAX)
                record.detail = f"{delay_seconds:.2f}s per chunk"
                fault = proxy_delayed(self.chaos.proxies[record.target], delay_seconds)
            else:
                raise ValueError(kind)
            with fault:
                time.sleep(hold_seconds)
                record.held_seconds = self.clock() - record.started_seconds
                healing_seconds = self.clock()
            record.heal_seconds = self.clock() - healing_seconds
        except Exception as error:  # a fault that did not heal: note it, then repair everything
            record.error = f"{type(error).__name__}: {error}"
            log.warning("nemesis: %s on %s: %s; healing everything", kind, record.target, record.error)
            with contextlib.suppress(Exception):
                self.chaos.heal()
        log.info("nemesis: %s %s held %.1fs, healed in %.1fs %s", kind, record.target, record.held_seconds,
                 record.heal_seconds, record.detail)  # fmt: skip
        return record


@contextlib.contextmanager
def proxy_cut(proxy: TcpProxy) -> Iterator[None]:
    proxy.cut()
    try:
        yield
    finally:
        proxy.restore()


@contextlib.contextmanager
def proxy_delayed(proxy: TcpProxy, seconds: float) -> Iterator[None]:
    proxy.delay(seconds)
    try:
        yield
    finally:
        proxy.delay(0)


# The workload.


@dataclasses.dataclass
class Accounts:
    customers_by_shard: dict[str, list[str]]
    banks: list[str]  # the SYSTEM accounts that funded the customers
    participants: list[str] = dataclasses.field(default_factory=list)  # the first one is capped
    participant_of: dict[str, str] = dataclasses.field(default_factory=dict)  # customer -> participant

    @property
    def customers(self) -> list[str]:
        return [a for accounts in self.customers_by_shard.values() for a in accounts]


def open_participant_accounts(clearing: clearing_books.ClearingClient, shard_names: list[str], config: Config) -> Accounts:
    """Customers of `config.participants` participants in turn, each funded by a SYSTEM account of
    its own participant on its shard (not cleared); the first participant capped."""
    token = uuid.uuid4().hex[:8]
    participants = [f"bank-{token}-{i}" for i in range(config.participants)]
    for participant in participants:
        clearing.register(participant, [CLEARING_CURRENCY])
    customers: dict[str, list[str]] = {}
    participant_of: dict[str, str] = {}
    banks = []
    for shard in shard_names:
        customers[shard] = []
        for k in range(config.accounts_per_shard):
            participant = participants[(k + shard_names.index(shard)) % len(participants)]
            account = clearing.funded(participant, shard, OPENING_BALANCE_MINOR, CLEARING_CURRENCY).account_id
            customers[shard].append(account)
            participant_of[account] = participant
            banks.append(clearing.system(participant, shard, CLEARING_CURRENCY).account_id)
    clearing.set_cap(participants[0], CLEARING_CURRENCY, config.cap_minor)
    return Accounts(customers, sorted(set(banks)), participants, participant_of)


def clearing_supported(channel: grpc.Channel) -> bool:
    """Whether the server implements Clearing (asked, not assumed)."""
    try:
        clearing_books.clearing_pb2_grpc.ClearingStub(channel).GetSettlementWindow(
            clearing_books.clearing_pb2.GetSettlementWindowRequest(), timeout=PROBE_DEADLINE_SECONDS)
    except grpc.RpcError as error:
        return error.code() != grpc.StatusCode.UNIMPLEMENTED
    return True


class Closer(threading.Thread):
    """Closes the settlement window every `every_seconds` while the workload runs; remembers the
    request ids whose answer was unknown (to retry once healed)."""

    def __init__(self, endpoint: Target, every_seconds: float, token: str) -> None:
        super().__init__(name="closer", daemon=True)
        self.endpoint, self.every_seconds, self.token = endpoint, every_seconds, token
        self.stopping = threading.Event()
        self.closed: dict[str, tuple[int, int]] = {}
        self.unknown: list[str] = []
        self.failed: list[str] = []

    def run(self) -> None:
        with open_channel(self.endpoint) as channel:
            stub = clearing_books.clearing_pb2_grpc.ClearingStub(channel)
            for n in itertools.count():
                if self.stopping.wait(self.every_seconds):
                    return
                request_id = f"bank-close-{self.token}-{n}"
                try:
                    answer = stub.CloseSettlementWindow(clearing_books.clearing_pb2.CloseSettlementWindowRequest(
                        request_id=request_id, reason="bank test"), timeout=CLIENT_DEADLINE_SECONDS)
                    self.closed[request_id] = clearing_books.closed_pair(answer)
                except grpc.RpcError as error:
                    if error.code() in DEFINITE_FAILURE_CODES or error.code() == grpc.StatusCode.INTERNAL:
                        self.failed.append(f"close {request_id}: {error.code().name}/{error_reason(error)}")
                    else:
                        self.unknown.append(request_id)


def _retried(call, seconds: float = CLEARING_RETRY_SECONDS):
    """A clearing call retried (same request) while its answer is unknown."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            return call()
        except grpc.RpcError as error:
            if error.code() in DEFINITE_FAILURE_CODES or error.code() == grpc.StatusCode.INTERNAL or time.monotonic() > deadline:
                raise
            time.sleep(RESOLVE_ROUND_DELAY_SECONDS)


def check_clearing(description: dict, accounts: Accounts, closer: Closer | None, config: Config) -> list[str]:
    """Once healed: finish the unknown closes by retrying them, settle every CLOSED window, then judge."""
    violations = [f"clearing: {text}" for text in (closer.failed if closer else [])]
    with open_channel(Target.of_cluster(description)) as channel:
        grpc.channel_ready_future(channel).result(timeout=CHANNEL_READY_TIMEOUT_SECONDS)
        ledger = LedgerClient(channel, asyncio.run(_load_shard_map(description["etcd_endpoint"])))
        clearing = clearing_books.ClearingClient(channel, ledger)
        try:
            for request_id in closer.unknown if closer else []:
                pair = clearing_books.closed_pair(_retried(lambda: clearing.close(request_id, reason="bank test")))
                if pair[1] != pair[0] + 1:
                    violations.append(f"clearing: close {request_id} answered {pair}")
            closed = [w.window_id for w in _retried(lambda: clearing.windows(clearing_books.clearing_pb2.WINDOW_CLOSED))]
            for first in range(0, len(closed), 100):
                window_ids = sorted(closed[first:first + 100])
                settlement = _retried(lambda: clearing.create_settlement(f"bank-settle-{config.seed}-{uuid.uuid4().hex[:8]}", window_ids))
                if sum(e.net_minor for e in settlement.entries):
                    violations.append(f"clearing: settlement {settlement.settlement_id} nets sum to {sum(e.net_minor for e in settlement.entries)}")
                for entry in settlement.entries:
                    _retried(lambda: clearing.record(settlement.settlement_id, entry.participant_id, entry.currency))
            home = clearing.home_shard
            state = clearing_books.wait_quiet(description["shards"], home)
            violations += [f"clearing: {text}" for text in state.violations()]
            if accounts.participants:
                position, reserved = state.position_total(accounts.participants[0], CLEARING_CURRENCY)
                if position + reserved > config.cap_minor:
                    violations.append(f"clearing: capped participant at {position} + {reserved}, past its cap {config.cap_minor}")
            report = _retried(lambda: clearing.reconcile())
            if not report.consistent:
                violations += [f"reconcile: {finding.check} {finding.shard} window {finding.window_id} {finding.participant_id} "
                               f"{finding.currency}: expected {finding.expected_minor}, found {finding.found_minor} {finding.detail}"
                               for finding in report.findings] or ["reconcile: not consistent, without findings"]
        except grpc.RpcError as error:
            violations.append(f"clearing: {error.code().name}/{error_reason(error)}: {error.details()}")
    return violations


def open_accounts(ledger: LedgerClient, shard_names: list[str], accounts_per_shard: int) -> Accounts:
    customers = {
        shard: [ledger.funded(OPENING_BALANCE_MINOR, shard).account_id for _ in range(accounts_per_shard)]
        for shard in shard_names
    }
    return Accounts(customers, [ledger.bank(shard).account_id for shard in shard_names])


class Workload:
    def __init__(self, endpoint: Target, accounts: Accounts, config: Config, history: History, clock) -> None:
        self.endpoint = endpoint
        self.accounts = accounts
        self.config = config
        self.history = history
        self.clock = clock
        self.stopping = threading.Event()
        self.run_token = uuid.uuid4().hex[:8]

    def client(self, index: int) -> None:
        rng = random.Random(f"client-{self.config.seed}-{index}")
        shard_names = list(self.accounts.customers_by_shard)
        with open_channel(self.endpoint) as channel:
            accounts = accounts_pb2_grpc.AccountsStub(channel)
            payments = payments_pb2_grpc.PaymentsStub(channel)
            for sequence in itertools.count():
                if self.stopping.is_set():
                    return
                if rng.random() < self.config.read_share:
                    op = Op(index, "read", self.clock(), account_id=rng.choice(self.accounts.customers))
                    call = lambda: accounts.GetAccount(  # noqa: E731
                        accounts_pb2.GetAccountRequest(account_id=op.account_id), timeout=CLIENT_DEADLINE_SECONDS
                    )
                else:
                    cross_shard = len(shard_names) > 1 and rng.random() < self.config.cross_shard_share
                    if cross_shard:
                        debit_shard, credit_shard = rng.sample(shard_names, 2)
                        debit = rng.choice(self.accounts.customers_by_shard[debit_shard])
                        credit = rng.choice(self.accounts.customers_by_shard[credit_shard])
                    else:
                        debit, credit = rng.sample(self.accounts.customers_by_shard[rng.choice(shard_names)], 2)
                    op = Op(
                        index, "transfer", self.clock(), transfer_id=f"bank-{self.config.seed}-{self.run_token}-{index}-{sequence}",
                        debit_account_id=debit, credit_account_id=credit,
                        amount_minor=rng.randint(1, TRANSFER_AMOUNT_MINOR_MAX), cross_shard=cross_shard,
                    )  # fmt: skip
                    request = payments_pb2.TransferRequest(
                        transfer_id=op.transfer_id, debit_account_id=debit, credit_account_id=credit,
                        amount_minor=op.amount_minor, currency="USD",
                    )  # fmt: skip
                    op.invoked_seconds = self.clock()
                    call = lambda request=request: payments.Transfer(request, timeout=CLIENT_DEADLINE_SECONDS)  # noqa: E731
                try:
                    answer = call()
                    op.outcome = OK
                    if op.kind == "read":
                        op.balance_minor = answer.balance_minor
                    elif answer.status != transfers_pb2.POSTED:
                        # Transfer answers only once final; anything else is not an acknowledgement.
                        op.outcome, op.reason = UNKNOWN, f"answered {transfers_pb2.TransferStatus.Name(answer.status)}"
                except grpc.RpcError as error:
                    op.code, op.reason = error.code().name, error_reason(error)
                    op.outcome = FAIL if error.code() in DEFINITE_FAILURE_CODES else UNKNOWN
                op.completed_seconds = self.clock()
                self.history.add(op)
                if op.code == grpc.StatusCode.UNAVAILABLE.name and op.completed_seconds - op.invoked_seconds < CLIENT_BACKOFF_SECONDS:
                    time.sleep(CLIENT_BACKOFF_SECONDS)

    def run(self, duration_seconds: float, also_until: threading.Event | None = None) -> None:
        """For `duration_seconds`, and then until `also_until` is set (at most EXTENSION_SECONDS_MAX more)."""
        with concurrent.futures.ThreadPoolExecutor(self.config.clients, thread_name_prefix="client") as pool:
            running = [pool.submit(self.client, index) for index in range(self.config.clients)]
            self.stopping.wait(duration_seconds)
            if also_until is not None:
                also_until.wait(EXTENSION_SECONDS_MAX)
            self.stopping.set()
            for future in running:
                future.result()


def cross_shard_refused(description: dict) -> bool:
    """Whether the server answers a cross-shard transfer with CROSS_SHARD_NOT_SUPPORTED (asked, not assumed).

    The probe's accounts are its own, so a run's accounts and totals are untouched.
    """
    shard_names = [shard["name"] for shard in description["shards"]]
    with open_channel(Target.of_cluster(description)) as channel:
        grpc.channel_ready_future(channel).result(timeout=CHANNEL_READY_TIMEOUT_SECONDS)
        ledger = LedgerClient(channel, asyncio.run(_load_shard_map(description["etcd_endpoint"])))
        debit = ledger.funded(OPENING_BALANCE_MINOR, shard_names[0])
        credit = ledger.open(shard=shard_names[1])
        try:
            ledger.transfer(debit.account_id, credit.account_id, 1, timeout=PROBE_DEADLINE_SECONDS)
        except grpc.RpcError as error:
            return error.code() == grpc.StatusCode.FAILED_PRECONDITION and error_reason(error) == "CROSS_SHARD_NOT_SUPPORTED"
    return False


# The checker.


@dataclasses.dataclass
class Report:
    config: Config
    ops: list[Op]
    faults: list[FaultRecord]
    violations: list[str]
    workload_seconds: float
    unresolved: list[str]
    all_final_seconds: float  # after healing, until the last unknown was final
    clearing: str = ""  # what the clearing part did, when it ran

    def counts(self) -> dict[str, collections.Counter]:
        counts: dict[str, collections.Counter] = {"transfer": collections.Counter(), "read": collections.Counter()}
        for op in self.ops:
            counts[op.kind][op.outcome] += 1
        return counts

    def summary(self) -> str:
        transfers = [op for op in self.ops if op.kind == "transfer"]
        counts = self.counts()
        lines = [
            f"bank test seed={self.config.seed} duration={self.workload_seconds:.1f}s clients={self.config.clients} "
            f"cross_shard_share={self.config.cross_shard_share} accounts={self.config.accounts_per_shard}/shard",
            f"  transfers: {sum(counts['transfer'].values())} ({dict(counts['transfer'])}), "
            f"{sum(op.cross_shard for op in transfers)} cross-shard; "
            f"{sum(op.outcome == OK for op in transfers) / max(self.workload_seconds, 1e-9):.0f} acknowledged/s",
            f"  reads: {sum(counts['read'].values())} ({dict(counts['read'])})",
            "  failed by reason: " + _top(collections.Counter(op.reason or op.code for op in transfers if op.outcome == FAIL)),
            "  unknown by code: " + _top(collections.Counter(f"{op.code}/{op.reason}" if op.code else op.reason for op in transfers if op.outcome == UNKNOWN)),
            "  unknowns became: " + _top(collections.Counter(op.final_status or "never final" for op in transfers if op.outcome == UNKNOWN)),
        ]
        finals = sorted(op.final_after_seconds for op in transfers if op.outcome == UNKNOWN and op.final_after_seconds is not None)
        if finals:
            lines.append(
                f"  unknowns final after healing: p50 {statistics.median(finals):.2f}s max {finals[-1]:.2f}s; "
                f"all answered {self.all_final_seconds:.1f}s after healing (bound {FINAL_WITHIN_SECONDS}s)"
            )
        if self.clearing:
            lines.append(f"  clearing: {self.clearing}")
        lines.append(f"  faults: {len(self.faults)} " + _top(collections.Counter(f.kind for f in self.faults)))
        for fault in self.faults:
            lines.append(
                f"    t={fault.started_seconds:6.1f}s {fault.kind:<16} {fault.target:<14} held {fault.held_seconds:4.1f}s "
                f"healed in {fault.heal_seconds:4.1f}s {fault.detail}{'  ERROR ' + fault.error if fault.error else ''}"
            )
        lines.append(f"  violations: {len(self.violations)}")
        lines += [f"    {violation}" for violation in self.violations[:50]]
        if len(self.violations) > 50:
            lines.append(f"    ... and {len(self.violations) - 50} more")
        lines.append(f"{'FAIL' if self.violations else 'PASS'} (replay with --seed {self.config.seed})")
        return "\n".join(lines)


def _top(counter: collections.Counter, shown_max: int = 8) -> str:
    return ", ".join(f"{key}: {count}" for key, count in counter.most_common(shown_max)) or "-"


def transfer_statuses(payments, transfer_ids: list[str]) -> list[str | None]:
    """POSTED / REJECTED / VOIDED / NOT_FOUND for each id, None while not final or not answerable.

    Asked CHECK_IN_FLIGHT_MAX at a time with call futures: thousands of ids take seconds, not minutes.
    """
    statuses: list[str | None] = []
    for first in range(0, len(transfer_ids), CHECK_IN_FLIGHT_MAX):
        calls = [
            payments.GetTransfer.future(payments_pb2.GetTransferRequest(transfer_id=transfer_id), timeout=CHECK_DEADLINE_SECONDS)
            for transfer_id in transfer_ids[first : first + CHECK_IN_FLIGHT_MAX]
        ]
        for call in calls:
            try:
                statuses.append(FINAL_STATUSES.get(call.result().status))
            except grpc.RpcError as error:
                statuses.append(NEVER_STARTED if error.code() == grpc.StatusCode.NOT_FOUND else None)
    return statuses


def resolve(endpoint: Target, transfers: list[Op], healed_seconds: float, clock) -> list[Op]:
    """Ask GetTransfer about each transfer until it is final or `deadline_seconds` passes; the ones never final."""
    waiting = list(transfers)
    with open_channel(endpoint) as channel:
        payments = payments_pb2_grpc.PaymentsStub(channel)
        while waiting:
            statuses = transfer_statuses(payments, [op.transfer_id for op in waiting])
            now = clock()
            for op, status in zip(waiting, statuses):
                if status is not None:
                    op.final_status = status
                    op.final_after_seconds = now - max(op.completed_seconds, healed_seconds)
            waiting = [op for op, status in zip(waiting, statuses) if status is None]
            if not waiting or clock() >= healed_seconds + FINAL_WITHIN_SECONDS:
                break
            time.sleep(RESOLVE_ROUND_DELAY_SECONDS)
    return waiting


def posted_rows(shards: list[dict], transfer_ids: list[str]) -> dict[str, collections.Counter]:
    """transfer_id -> shard name -> rows with status POSTED, straight from the shards."""
    found: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for shard in shards:
        with psycopg.connect(shard["dsn"]) as connection:
            rows = connection.execute(
                "SELECT transfer_id, count(*) FROM transfers WHERE status = %s AND transfer_id = ANY(%s) GROUP BY transfer_id",
                [POSTED_ROW_STATUS, transfer_ids],
            )
            for transfer_id, count in rows:
                found[transfer_id][shard["name"]] += count
    return found


@dataclasses.dataclass(frozen=True)
class Balance:
    balance_minor: int
    debits_pending_minor: int
    credits_pending_minor: int


def balances(shards: list[dict], account_ids: list[str]) -> dict[str, Balance]:
    found = {}
    for shard in shards:
        with psycopg.connect(shard["dsn"]) as connection:
            for account_id, balance, debits_pending, credits_pending in connection.execute(
                "SELECT account_id, credits_posted_minor - debits_posted_minor, debits_pending_minor, credits_pending_minor"
                " FROM accounts WHERE account_id = ANY(%s)",
                [account_ids],
            ):
                found[account_id] = Balance(int(balance), int(debits_pending), int(credits_pending))
    return found


def check(
    description: dict, accounts: Accounts, start: dict[str, Balance], history: History, healed_seconds: float, clock
) -> tuple[list[str], list[str], float]:
    """(violations, ids never final, seconds until all were final)."""
    violations: list[str] = []
    transfers = history.transfers()

    # The unknowns first, timed; then every other transfer: an acknowledged one must read POSTED, a failed one must not.
    unresolved = resolve(Target.of_cluster(description), [op for op in transfers if op.outcome == UNKNOWN], healed_seconds, clock)
    all_final_seconds = clock() - healed_seconds
    unresolved += resolve(Target.of_cluster(description), [op for op in transfers if op.outcome != UNKNOWN], healed_seconds, clock)
    for op in unresolved[:20]:
        violations.append(f"{op.transfer_id} ({op.outcome}): not final {FINAL_WITHIN_SECONDS}s after healing")
    if len(unresolved) > 20:
        violations.append(f"... and {len(unresolved) - 20} more transfers not final")
    for op in transfers:
        if op.outcome == OK and op.final_status and op.final_status != "POSTED":
            violations.append(f"{op.transfer_id}: acknowledged POSTED, GetTransfer says {op.final_status}")
        if op.outcome == FAIL and op.final_status == "POSTED":
            violations.append(f"{op.transfer_id}: failed with {op.code}/{op.reason}, GetTransfer says POSTED")

    shard_of = {a: shard for shard, ids in accounts.customers_by_shard.items() for a in ids}
    rows = posted_rows(description["shards"], [op.transfer_id for op in transfers])
    expected_balance = {account_id: balance.balance_minor for account_id, balance in start.items()}
    for op in transfers:
        posted = op.outcome == OK or (op.outcome == UNKNOWN and op.final_status == "POSTED")
        # One row per side: a same-shard transfer is one row, a cross-shard one a row on each of its shards.
        expected_rows = collections.Counter(
            {shard_of[op.debit_account_id]: 1} | {shard_of[op.credit_account_id]: 1} if posted else {}
        )
        actual_rows = +rows.get(op.transfer_id, collections.Counter())
        if actual_rows != expected_rows:
            violations.append(
                f"{op.transfer_id} ({op.outcome}, {'cross' if op.cross_shard else 'same'}-shard, GetTransfer {op.final_status or '?'}): "
                f"posted rows {dict(actual_rows)}, expected {dict(expected_rows)}"
            )
        if actual_rows:
            # The shards are the truth for the model: whatever posted moved the money.
            expected_balance[op.debit_account_id] -= op.amount_minor
            expected_balance[op.credit_account_id] += op.amount_minor

    for op in history.ops:
        if op.kind == "read" and op.balance_minor is not None and op.balance_minor < 0:
            violations.append(f"read of {op.account_id} at t={op.completed_seconds:.1f}s saw balance {op.balance_minor}")

    end = balances(description["shards"], list(start))
    start_total = sum(b.balance_minor for b in start.values())
    end_total = sum(b.balance_minor for b in end.values())
    if end_total != start_total:
        violations.append(f"total of the test's accounts moved from {start_total} to {end_total}")
    for account_id, balance in end.items():
        if account_id in shard_of and balance.balance_minor < 0:
            violations.append(f"customer {account_id} ends at {balance.balance_minor}")
        if balance.debits_pending_minor or balance.credits_pending_minor:
            violations.append(
                f"{account_id} still has pending debits {balance.debits_pending_minor} / credits {balance.credits_pending_minor}"
            )
        if balance.balance_minor != expected_balance[account_id]:
            violations.append(f"{account_id} holds {balance.balance_minor}, its posted transfers say {expected_balance[account_id]}")

    violations += [f"audit: {violation}" for violation in audit_cluster(description["shards"]).violations()]
    return violations, [op.transfer_id for op in unresolved], all_final_seconds


# The whole run.


def run(chaos: ChaosCluster, config: Config) -> Report:
    """Accounts, workload with nemesis, healing, checks; on a cluster that is up."""
    description = chaos.description
    endpoint = Target.of_cluster(description)
    shard_names = [shard["name"] for shard in description["shards"]]
    with open_channel(endpoint) as channel:
        grpc.channel_ready_future(channel).result(timeout=CHANNEL_READY_TIMEOUT_SECONDS)
        ledger = LedgerClient(channel, asyncio.run(_load_shard_map(description["etcd_endpoint"])))
        if config.participants and clearing_supported(channel):
            accounts = open_participant_accounts(clearing_books.ClearingClient(channel, ledger), shard_names, config)
        else:
            accounts = open_accounts(ledger, shard_names, config.accounts_per_shard)
    start = balances(description["shards"], accounts.customers + accounts.banks)
    log.info("%d accounts open and funded; workload begins", len(start))

    began = time.monotonic()
    clock = lambda: time.monotonic() - began  # noqa: E731
    history = History()
    workload = Workload(endpoint, accounts, config, history, clock)
    nemesis = Nemesis(chaos, config, clock)
    closer = Closer(endpoint, config.close_every_seconds, workload.run_token) if accounts.participants else None
    nemesis.start()
    if closer:
        closer.start()
    try:
        workload.run(config.duration_seconds, also_until=nemesis.every_kind_done)
    finally:
        nemesis.stopping.set()
        if closer:
            closer.stopping.set()
            closer.join(HEAL_TIMEOUT_SECONDS)
        nemesis.join(HEAL_TIMEOUT_SECONDS)
    workload_seconds = clock()
    # Whatever the last fault left (or a fault that failed to heal): repair, bounded by deploy's own timeouts.
    chaos.heal()
    healed_seconds = clock()
    log.info("healed %.1fs after the workload ended; checking", healed_seconds - workload_seconds)
    violations, unresolved, all_final_seconds = check(chaos.refresh(), accounts, start, history, healed_seconds, clock)
    clearing_summary = ""
    if accounts.participants:
        violations += check_clearing(chaos.refresh(), accounts, closer, config)
        clearing_summary = (f"{len(accounts.participants)} participants (cap {config.cap_minor} on {accounts.participants[0]}), "
                            f"{len(closer.closed) if closer else 0} windows closed under faults, "
                            f"{len(closer.unknown) if closer else 0} closes answered unknown and retried once healed")
    log.info("checked in %.1fs", clock() - healed_seconds)
    violations += [f"nemesis: {f.kind} on {f.target} did not heal cleanly: {f.error}" for f in nemesis.records if f.error]
    return Report(config, history.ops, nemesis.records, violations, workload_seconds, unresolved, all_final_seconds, clearing_summary)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tests.chaos.bank", description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=None, help="default: a random one, printed")
    parser.add_argument("--clients", type=int, default=CLIENTS_DEFAULT)
    parser.add_argument("--accounts-per-shard", type=int, default=ACCOUNTS_PER_SHARD_DEFAULT)
    parser.add_argument("--cross-shard-share", type=float, default=CROSS_SHARD_SHARE_DEFAULT)
    parser.add_argument("--read-share", type=float, default=READ_SHARE_DEFAULT)
    parser.add_argument("--faults", default=",".join(FAULT_KINDS), help="comma-separated; '' for none")
    parser.add_argument("--fault-hold-seconds-max", type=float, default=FAULT_HOLD_SECONDS_MAX)
    parser.add_argument("--fault-quiet-seconds-max", type=float, default=FAULT_QUIET_SECONDS_MAX)
    parser.add_argument("--port-base", type=int, default=int(os.environ.get("COREBANK_CHAOS_PORT_BASE") or DEFAULT_PORT_BASE))
    parser.add_argument("--keep", action="store_true", help="keep the state folder (logs, data) even on success")
    parser.add_argument("--history", help="write the history as JSON lines to this file")
    parser.add_argument("--participants", type=int, default=PARTICIPANTS_DEFAULT, help="participants the customers belong to; 0: no clearing")
    parser.add_argument("--cap-minor", type=int, default=CAP_MINOR_DEFAULT, help="the first participant's net debit cap")
    parser.add_argument("--close-every-seconds", type=float, default=CLOSE_EVERY_SECONDS_DEFAULT)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    # deploy warns that the map in etcd differs from the direct DSNs: that is the proxies, on purpose.
    logging.getLogger("deploy").setLevel(logging.ERROR)
    args = parse_args(argv)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1, 10**9)
    config = Config(
        seed=seed, duration_seconds=args.minutes * 60, clients=args.clients, accounts_per_shard=args.accounts_per_shard,
        cross_shard_share=args.cross_shard_share, read_share=args.read_share,
        faults=tuple(kind for kind in args.faults.split(",") if kind), fault_hold_seconds_max=args.fault_hold_seconds_max,
        fault_quiet_seconds_max=args.fault_quiet_seconds_max, participants=args.participants, cap_minor=args.cap_minor,
        close_every_seconds=args.close_every_seconds,
    )  # fmt: skip
    print(f"bank test: seed {seed}, {args.minutes} min, port base {args.port_base}", flush=True)
    state_dir = make_state_dir("corebank-chaos-")
    chaos = ChaosCluster(state_dir, args.port_base)
    report = None
    try:
        chaos.up()
        report = run(chaos, config)
        if args.history:
            with open(args.history, "w") as history_file:
                for op in report.ops:
                    history_file.write(json.dumps(dataclasses.asdict(op)) + "\n")
        print(report.summary(), flush=True)
    finally:
        keep = args.keep or report is None or bool(report.violations)
        chaos.close(keep=keep)
        if keep:
            print(f"state folder kept (logs, data): {state_dir}", flush=True)
    return 1 if report.violations else 0


if __name__ == "__main__":
    sys.exit(main())
