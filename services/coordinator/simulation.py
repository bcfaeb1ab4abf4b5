"""A deterministic simulation of the coordinator, in the spirit of TigerBeetle's VOPR and
FoundationDB's simulation testing.

The real TransferDriver and Recovery run over in-memory shards (memory_tcc.py: the
same semantics as tcc_store.py's SQL) on an asyncio event loop whose clock is
virtual: nothing sleeps, time jumps to the next timer, and the order of everything
follows from the seed. At every call into a store a seeded RNG may:

- crash the caller there, before or after the store applied the call (its task is
  cancelled; a crashed coordinator process is restarted, and recovery takes over
  after the lease expires);
- fail transiently before or after applying (ShardUnavailable: outcome unknown);
- delay it, or let other tasks run first (reordering);
- freeze the caller past its lease and resume it later (a zombie);
- rarely, fail permanently (InternalFault): then the fault must be loud (counted,
  logged, recorded) and no money may move beyond what the decision allows.

Each seed builds 2-3 shards with a few accounts (some frozen, blocked, short of
funds, of another currency), runs a handful of concurrent transfers through
"gRPC workers" and two coordinator processes, heals the faults (within
FAULT_WINDOW_SECONDS_MAX), waits for quiescence, has an operator retry what is
faulted, and checks the invariants from the stores alone (never from what the
drivers answered).

    python -m services.coordinator.simulation --seeds 1000          # seeds 0..999
    python -m services.coordinator.simulation --seed 42 --trace     # replay one, printing its trace
    make sim SEEDS=100000   /   make sim SEED=42
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import contextvars
import dataclasses
import datetime
import enum
import hashlib
import logging
import os
import random
import selectors
import time
from collections.abc import Callable

from services.coordinator import driver as driver_module
from services.coordinator import metrics
from services.coordinator.driver import LEASE_SECONDS, TransferDriver
from services.coordinator.memory_tcc import AccountRow, MemoryTcc
from services.coordinator.recovery import RECOVERY_SCAN_INTERVAL_SECONDS, Recovery
from services.ledger import errors
from services.ledger.accounts import AccountKind, AccountStatus
from services.ledger.coordination import FINAL_STATES, SYSTEM_CANCEL_CAUSES, BarrierOperation, CoordinatorState, TryOutcome, parse_try_outcome
from services.ledger.limits import TierLimits
from services.ledger.transfers import Branch, TransferRequest, TransferStatus
from services.storage.tcc_store import Begun, Settled

# Faults are injected during this much virtual time at most (drawn per seed), then the system heals.
FAULT_WINDOW_SECONDS_MAX = 25.0
# After healing, everything not faulted must be final, and every task done, within this bound:
# the longest freeze (ZOMBIE_FREEZE_SECONDS_MAX) plus a lease, a scan and some drives.
QUIESCENCE_SECONDS_MAX = 60.0
ZOMBIE_FREEZE_SECONDS_MAX = 4 * LEASE_SECONDS
DELAY_SECONDS_MAX = 1.5  # below PARTICIPANT_CALL_TIMEOUT_SECONDS: a slower call is a transient failure
REORDER_YIELDS_MAX = 5
COORDINATOR_RESTART_SECONDS_MAX = 3.0
CLIENT_BEGIN_ATTEMPTS_MAX = 5
TRANSFERS_PER_SEED_MIN, TRANSFERS_PER_SEED_MAX = 3, 8
ACCOUNTS_PER_SHARD_MIN, ACCOUNTS_PER_SHARD_MAX = 2, 3
COORDINATORS = 2
# Seeds in which a CreateTransfers call begins and drives some of the transfers together.
BATCH_SEEDS_SHARE = 0.4
EPOCH = datetime.datetime(2030, 1, 1, tzinfo=datetime.timezone.utc)
TIER = 1  # USD/EUR: balance cap 1,000,000, transfer cap 500,000 (tier_limits.json)
SEEDS_PER_CHUNK = 50

LOGGERS = (driver_module.log, logging.getLogger("corebank.coordinator"))


class Fault(enum.Enum):
    NONE = "none"
    CRASH_BEFORE = "crash_before"
    CRASH_AFTER = "crash_after"
    TRANSIENT_BEFORE = "transient_before"
    TRANSIENT_AFTER = "transient_after"
    DELAY = "delay"
    REORDER = "reorder"
    FREEZE_BEFORE = "freeze_before"  # a zombie: frozen past its lease, then resumes
    FREEZE_AFTER = "freeze_after"
    PERMANENT = "permanent"


# --- A virtual clock under asyncio: the loop's time only moves when nothing is runnable. ---

class SimulationStuck(Exception):
    """Nothing runnable and no timer: every task waits for something that never comes."""


class _NoIoSelector(selectors.BaseSelector):
    """Holds the loop's self-pipe registration and never waits: it advances virtual time instead."""

    def __init__(self, loop: VirtualTimeLoop) -> None:
        self._loop = loop
        self._keys: dict[int, selectors.SelectorKey] = {}

    def register(self, fileobj, events, data=None) -> selectors.SelectorKey:
        fd = fileobj if isinstance(fileobj, int) else fileobj.fileno()
        key = selectors.SelectorKey(fileobj, fd, events, data)
        self._keys[fd] = key
        return key

    def unregister(self, fileobj) -> selectors.SelectorKey:
        return self._keys.pop(fileobj if isinstance(fileobj, int) else fileobj.fileno())

    def select(self, timeout=None) -> list:
        if timeout is None:
            raise SimulationStuck("no task runnable and no timer pending")
        self._loop.virtual_seconds += timeout
        return []

    def get_map(self):
        return self._keys

    def close(self) -> None:
        self._keys.clear()


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    def __init__(self) -> None:
        self.virtual_seconds = 0.0
        super().__init__(selector=_NoIoSelector(self))

    def time(self) -> float:
        return self.virtual_seconds


class VirtualClock:
    """ports.Clock on the loop's virtual time."""

    def __init__(self, loop: VirtualTimeLoop) -> None:
        self._loop = loop

    def monotonic(self) -> float:
        return self._loop.time()

    def now(self) -> datetime.datetime:
        return EPOCH + datetime.timedelta(seconds=self._loop.time())

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


# --- Fault injection at every call into a store. ---

@dataclasses.dataclass
class FaultPlan:
    """How often each fault happens in one seed (chosen from the seed)."""

    probability: float
    weights: dict[Fault, float]
    heal_at: float

    @classmethod
    def draw(cls, rng: random.Random) -> FaultPlan:
        # Each kind is absent, rare, common or dominant in a seed, so that some seeds are
        # mostly crashes, or mostly zombies, rather than every seed the same average mix.
        weights = {fault: rng.choice([0.0, 0.1, 1.0, 5.0]) for fault in Fault if fault is not Fault.NONE}
        # Permanent failures in one seed in four only; the others must end without any fault.
        if rng.random() >= 0.25:
            weights[Fault.PERMANENT] = 0.0
        if not any(weights.values()):
            weights[Fault.TRANSIENT_BEFORE] = 1.0
        return cls(rng.choice([0.0, 0.05, 0.15, 0.3, 0.5]), weights, rng.uniform(LEASE_SECONDS, FAULT_WINDOW_SECONDS_MAX))


class Simulation:
    """The shared state of one seed's run: RNG, trace, and what was injected."""

    def __init__(self, seed: int, loop: VirtualTimeLoop, tracing: bool) -> None:
        self.seed = seed
        self.rng = random.Random(seed)
        self.loop = loop
        self.clock = VirtualClock(loop)
        self.tracing = tracing
        self.trace: list[str] = []
        self._digest = hashlib.blake2b(digest_size=16)
        self.plan = FaultPlan.draw(self.rng)
        self.permanent_faults_in_drives = 0
        self.injected: dict[Fault, int] = {fault: 0 for fault in Fault}
        self.stats: dict[str, int] = {}
        # Tasks that ended with an exception other than a crash: a bug in the code under test.
        self.task_errors: list[str] = []

    def watch(self, task: asyncio.Task) -> asyncio.Task:
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task) -> None:
        if not task.cancelled() and task.exception() is not None:
            error = task.exception()
            self.task_errors.append(f"task {task.get_name()} raised {type(error).__name__}: {error}")

    def note(self, line: str, digested: bool = True) -> None:
        """Add a line to the trace; its digest covers what every run of the seed notes, traced or not."""
        line = f"{self.loop.time():9.3f} {line}"
        if digested:
            self._digest.update(line.encode())
        if self.tracing:
            self.trace.append(line)

    @property
    def trace_digest(self) -> str:
        return self._digest.hexdigest()

    def choose_fault(self, operation: str) -> Fault:
        if self.loop.time() >= self.plan.heal_at or self.rng.random() >= self.plan.probability:
            return Fault.NONE
        faults = list(self.plan.weights)
        return self.rng.choices(faults, [self.plan.weights[fault] for fault in faults])[0]


# The caller a task without a name of its own works for: the batch client's drive_many
# runs its calls in tasks asyncio.gather creates (and names Task-N); they inherit this.
_CALLER: contextvars.ContextVar[str] = contextvars.ContextVar("caller", default="?")
_ROOT: contextvars.ContextVar[asyncio.Task | None] = contextvars.ContextVar("root", default=None)


def _task_name() -> str:
    task = asyncio.current_task()
    if task is None:
        return "?"
    return _CALLER.get() if task.get_name().startswith("Task-") else task.get_name()


def _summary(result: object) -> str:
    if isinstance(result, list):
        return f"[{', '.join(_summary(item) for item in result)}]"
    state = getattr(result, "state", None)
    if state is not None:
        return f"{result.transfer_id}:{state.name}@{result.lease_epoch}"
    if isinstance(result, Begun):
        return f"begun({_summary(result.record)}, created={result.created})"
    if isinstance(result, Settled):
        return f"settled({_summary(result.record)}, {result.branch})"
    return repr(result)


class FaultyTcc:
    """A TccPort in front of a MemoryTcc that injects the seed's faults at every call."""

    def __init__(self, inner: MemoryTcc, simulation: Simulation) -> None:
        self.inner = inner
        self.simulation = simulation
        self.shard_name = inner.shard_name

    def __getattr__(self, operation: str):
        method = getattr(self.inner, operation)

        async def call(*arguments, **keywords):
            simulation = self.simulation
            fault = simulation.choose_fault(operation)
            simulation.injected[fault] += 1
            task_name = _task_name()
            subject = next((a.transfer_id for a in arguments if hasattr(a, "transfer_id")), "")
            simulation.note(f"{task_name} {self.shard_name}.{operation}({subject}) {fault.value}")
            if fault in (Fault.CRASH_BEFORE, Fault.CRASH_AFTER) and not task_name.startswith(("client:", "batch:", "drive:", "coordinator-")):
                fault = Fault.TRANSIENT_BEFORE  # the simulation's own tasks (operator, checks) do not crash
            if fault is Fault.CRASH_BEFORE:
                await _crash()
            if fault is Fault.TRANSIENT_BEFORE:
                raise errors.ShardUnavailable(f"{self.shard_name} unavailable (simulated)", shard=self.shard_name)
            if fault is Fault.PERMANENT:
                if not operation.startswith("begin") and task_name.startswith(("client:", "batch:", "drive:", "operator")):
                    # A list operation fails each of its items (services/coordinator/driver.py drive_many).
                    simulation.permanent_faults_in_drives += len(arguments[0]) if isinstance(arguments[0], list) else 1
                raise errors.InternalFault(f"{self.shard_name} refused {operation} (simulated)", shard=self.shard_name)
            if fault is Fault.DELAY:
                await asyncio.sleep(simulation.rng.uniform(0, DELAY_SECONDS_MAX))
            if fault is Fault.REORDER:
                for _ in range(simulation.rng.randint(1, REORDER_YIELDS_MAX)):
                    await asyncio.sleep(0)
            if fault is Fault.FREEZE_BEFORE:
                await asyncio.sleep(simulation.rng.uniform(LEASE_SECONDS, ZOMBIE_FREEZE_SECONDS_MAX))
            result = await method(*arguments, **keywords)
            simulation.note(f"{task_name} {self.shard_name}.{operation} -> {_summary(result)}")
            if fault is Fault.CRASH_AFTER:
                await _crash()
            if fault is Fault.TRANSIENT_AFTER:
                raise errors.ShardUnavailable(f"{self.shard_name} lost the connection after commit (simulated)", shard=self.shard_name)
            if fault is Fault.FREEZE_AFTER:
                await asyncio.sleep(simulation.rng.uniform(LEASE_SECONDS, ZOMBIE_FREEZE_SECONDS_MAX))
            return result

        return call


async def _crash() -> None:
    """kill -9 of the calling task: nothing after this point of it runs, nor in the tasks its
    caller runs beside it (a batch client's calls on other shards die with the process)."""
    root = _ROOT.get()
    if root is not None:
        root.cancel()
    asyncio.current_task().cancel()
    await asyncio.sleep(0)
    raise AssertionError("a crashed task went on")


# --- One seed: the world, the workload, the run. ---

@dataclasses.dataclass(frozen=True)
class Variant:
    """A deliberately broken variant, to show the invariants catch what they should."""

    name: str
    store_class: type[MemoryTcc] = MemoryTcc
    driver_class: type[TransferDriver] = TransferDriver


CORRECT = Variant("correct")


@dataclasses.dataclass
class World:
    shards: dict[str, MemoryTcc]
    shard_of_account: dict[str, str]
    initial_balance_by_currency: dict[str, int]
    initial_accounts: dict[str, dict[str, AccountRow]]  # shard -> account id -> row before the run


@dataclasses.dataclass
class SeedResult:
    seed: int
    violations: list[str]
    trace_digest: str
    stats: dict[str, int]
    trace: list[str] = dataclasses.field(default_factory=list)


def build_world(rng: random.Random, now: Callable[[], datetime.datetime], store_class: type[MemoryTcc]) -> World:
    shard_count = rng.choice([2, 3])
    shards = {f"shard-{number}": store_class(f"shard-{number}", now) for number in range(shard_count)}
    shard_of_account = {}
    initial_balance_by_currency: dict[str, int] = {}
    for shard_name, shard in shards.items():
        funded_by_currency: dict[str, int] = {}
        for number in range(rng.randint(ACCOUNTS_PER_SHARD_MIN, ACCOUNTS_PER_SHARD_MAX)):
            account_id = f"acct-{shard_name[-1]}{number}"
            currency = "USD" if rng.random() < 0.85 else "EUR"
            status = rng.choices(
                [AccountStatus.ACTIVE, AccountStatus.FROZEN, AccountStatus.BLOCK_CREDIT, AccountStatus.BLOCK_DEBIT], [20, 1, 1, 1]
            )[0]
            balance_minor = rng.choice([0, 1_000, 300_000, 700_000, 900_000])
            shard.accounts[account_id] = AccountRow(
                account_id, currency, AccountKind.CUSTOMER, TIER, status, credits_posted_minor=balance_minor
            )
            shard_of_account[account_id] = shard_name
            funded_by_currency[currency] = funded_by_currency.get(currency, 0) + balance_minor
            initial_balance_by_currency[currency] = initial_balance_by_currency.get(currency, 0) + balance_minor
        # Customer balances came from the shard's genesis account, so each shard balances from the start.
        for currency, funded_minor in funded_by_currency.items():
            genesis_id = f"genesis-{shard_name[-1]}-{currency.lower()}"
            shard.accounts[genesis_id] = AccountRow(
                genesis_id, currency, AccountKind.SYSTEM, 0, AccountStatus.ACTIVE, debits_posted_minor=funded_minor
            )
    initial_accounts = {name: {a: dataclasses.replace(row) for a, row in shard.accounts.items()} for name, shard in shards.items()}
    return World(shards, shard_of_account, initial_balance_by_currency, initial_accounts)


def draw_transfers(rng: random.Random, world: World) -> list[tuple[TransferRequest, float]]:
    """The workload: transfers between shards, each with the virtual time its client starts."""
    customers = sorted(world.shard_of_account)
    transfers = []
    for number in range(rng.randint(TRANSFERS_PER_SEED_MIN, TRANSFERS_PER_SEED_MAX)):
        debit_account_id = rng.choice(customers)
        others = [a for a in customers if world.shard_of_account[a] != world.shard_of_account[debit_account_id]]
        credit_account_id = rng.choice(others)
        debit_row = world.shards[world.shard_of_account[debit_account_id]].accounts[debit_account_id]
        # 600,000 is over the tier's transfer cap; large amounts meet the payee's balance cap.
        amount_minor = rng.choices([1, 500, 20_000, 250_000, 600_000], [2, 3, 3, 2, 1])[0]
        request = TransferRequest(f"t{number}", debit_account_id, credit_account_id, amount_minor, debit_row.currency)
        transfers.append((request, rng.uniform(0, 3)))
    # Some clients send the same transfer twice (a retry after a lost answer, or a duplicate).
    for request, started_at in list(transfers):
        if rng.random() < 0.15:
            transfers.append((request, started_at + rng.uniform(0, 2)))
    return transfers


def clearing_account_id_for(shard_name: str, currency: str, transfer_id: str) -> str:
    # Two lanes, as services/coordinator/clearing.py spreads clearing rows over lanes.
    lane = sum(transfer_id.encode()) % 2
    return f"clr-{shard_name[-1]}-{currency.lower()}-{lane}"


def run_seed(seed: int, variant: Variant = CORRECT, tracing: bool = False) -> SeedResult:
    loop = VirtualTimeLoop()
    simulation = Simulation(seed, loop, tracing)
    captured = _CapturedLogs(simulation)
    try:
        with captured.attached():
            violations = loop.run_until_complete(_run(simulation, variant, captured))
    finally:
        loop.close()
    stats = {f"injected_{fault.value}": count for fault, count in simulation.injected.items() if fault is not Fault.NONE}
    stats.update(simulation.stats)
    return SeedResult(seed, violations, simulation.trace_digest, stats, simulation.trace)


class _CapturedLogs(logging.Handler):
    """The coordinator's log lines during a run: ERROR lines are checked, all go to the trace."""

    def __init__(self, simulation: Simulation) -> None:
        super().__init__(logging.DEBUG if simulation.tracing else logging.ERROR)
        self.simulation = simulation
        self.errors: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if record.levelno >= logging.ERROR:
            self.errors.append(message)
        self.simulation.note(f"{_task_name()} log {record.levelname}: {message}", digested=record.levelno >= logging.ERROR)

    @contextlib.contextmanager
    def attached(self):
        saved = [(logger, logger.level, logger.propagate) for logger in LOGGERS]
        for logger in LOGGERS:
            logger.addHandler(self)
            logger.setLevel(self.level)
            logger.propagate = False
        try:
            yield
        finally:
            for logger, level, propagate in saved:
                logger.removeHandler(self)
                logger.setLevel(level)
                logger.propagate = propagate


async def _run(simulation: Simulation, variant: Variant, logs: _CapturedLogs) -> list[str]:
    rng, clock = simulation.rng, simulation.clock
    world = build_world(rng, clock.now, variant.store_class)
    faulty = {name: FaultyTcc(shard, simulation) for name, shard in world.shards.items()}
    limits = TierLimits.load()
    pending_timeout_seconds = rng.choice([4.0, 10.0, 30.0])
    faults_before = _faults_counted()
    simulation.note(f"world: {sorted(world.shards)}, pending timeout {pending_timeout_seconds}s, faults {simulation.plan}")

    def tcc_for_shard(shard_name: str) -> FaultyTcc:
        if shard_name not in faulty:
            raise errors.InternalFault(f"no shard named {shard_name}")
        return faulty[shard_name]

    def new_driver(owner: str) -> TransferDriver:
        return variant.driver_class(
            tcc_for_shard, world.shard_of_account.__getitem__, clearing_account_id_for, limits, owner, clock,
            pending_timeout_seconds,
        )

    tasks: list[asyncio.Task] = []
    worker = new_driver("grpc-0")
    transfers = draw_transfers(rng, world)
    # In some seeds a CreateTransfers call carries part of them: begun and driven together.
    batched = rng.sample(range(len(transfers)), rng.randint(2, len(transfers))) if rng.random() < BATCH_SEEDS_SHARE else []
    batch_requests = list({transfers[index][0].transfer_id: transfers[index][0] for index in sorted(batched)}.values())
    if batch_requests:
        batch = _batch_client(worker, world, batch_requests, rng.uniform(0, 3), clock)
        tasks.append(simulation.watch(asyncio.create_task(batch, name=f"batch:{len(batch_requests)}")))
    for index, (request, started_at) in enumerate(transfers):
        if index in batched:
            continue
        client = asyncio.create_task(_client(worker, world, request, started_at, clock), name=f"client:{request.transfer_id}:{index}")
        tasks.append(simulation.watch(client))
    stopping = asyncio.Event()
    coordinators = [
        asyncio.create_task(_coordinator(number, new_driver, tcc_for_shard, sorted(world.shards), stopping, simulation), name=f"supervisor-{number}")
        for number in range(COORDINATORS)
    ]

    # Run until quiescent: every record final or faulted, every client and drive done.
    deadline = simulation.plan.heal_at + QUIESCENCE_SECONDS_MAX
    violations: list[str] = []
    while True:
        await asyncio.sleep(RECOVERY_SCAN_INTERVAL_SECONDS)
        now = simulation.loop.time()
        quiet = all(task.done() for task in tasks) and all(
            record.state in FINAL_STATES or record.transfer_id in shard.faults
            for shard in world.shards.values() for record in shard.records.values()
        ) and not _live_drives
        if now >= simulation.plan.heal_at and quiet:
            break
        if now > deadline:
            stuck = [f"{r.transfer_id}:{r.state.name}" for s in world.shards.values() for r in s.records.values() if r.state not in FINAL_STATES]
            violations.append(f"liveness: not quiescent {QUIESCENCE_SECONDS_MAX}s after healing (in doubt: {stuck})")
            break
    stopping.set()
    await asyncio.wait(coordinators)
    leftover = [*tasks, *_live_drives]
    for task in leftover:
        task.cancel()
    await asyncio.gather(*leftover, return_exceptions=True)
    _live_drives.clear()
    violations += simulation.task_errors

    faulted = {tid: fault for shard in world.shards.values() for tid, (fault, _) in shard.faults.items()}
    simulation.stats.update(faulted=len(faulted), records=sum(len(s.records) for s in world.shards.values()))
    violations += check_faults(world, faulted, logs.errors)
    faults_counted = _faults_counted() - faults_before
    if faults_counted != simulation.permanent_faults_in_drives:
        violations.append(
            f"loudness: {simulation.permanent_faults_in_drives} permanent failures injected into drives, "
            f"{faults_counted} counted in corebank_tcc_faults_total"
        )
    if simulation.plan.weights[Fault.PERMANENT] == 0 and (faulted or logs.errors):
        violations.append(f"unexpected faults (none injected): {faulted or logs.errors}")
    violations += check_balances(world, all_final=False)

    # The operator fixes the cause (the faults are healed) and retries every faulted transfer.
    operator = new_driver("operator")
    for transfer_id in sorted(faulted):
        shard = next(name for name, s in world.shards.items() if transfer_id in s.records)
        claimed = await tcc_for_shard(shard).claim_now_clearing_fault(transfer_id, "operator", LEASE_SECONDS, 1.0)
        final = await simulation.watch(asyncio.create_task(operator.drive(claimed), name=f"operator:{transfer_id}"))
        if final.state not in FINAL_STATES:
            violations.append(f"operator retry of {transfer_id} ended {final.state.name}")
    violations += check_transfers(world)
    violations += check_balances(world, all_final=True)
    simulation.stats.update(_outcomes(world))
    return violations


# Drives started by recovery, across coordinator restarts, so the run can wait for them
# (a dict, not a set: its order must not depend on where tasks sit in memory).
_live_drives: dict[asyncio.Task, None] = {}


async def _client(driver: TransferDriver, world: World, request: TransferRequest, started_at: float, clock: VirtualClock) -> None:
    """A gRPC worker handling Transfer: begin, then drive inline (services/ledger_service.py)."""
    await clock.sleep(started_at)
    debit_shard, credit_shard = world.shard_of_account[request.debit_account_id], world.shard_of_account[request.credit_account_id]
    for attempt in range(CLIENT_BEGIN_ATTEMPTS_MAX):
        try:
            begun = await driver.begin(request, debit_shard, credit_shard, 2.0)
            break
        except errors.LedgerError as error:
            if not error.transient:
                return  # rolled back: nothing recorded, the client sees the error
            await clock.sleep(0.1 * 2**attempt)
    else:
        return  # the client gives up; whatever began is recovery's
    if begun.created and begun.record.state not in FINAL_STATES:
        await driver.drive(begun.record)
    # A retry that found the record leaves it to its driver (or to recovery, if that died).


async def _batch_client(driver: TransferDriver, world: World, requests: list[TransferRequest], started_at: float, clock: VirtualClock) -> None:
    """A gRPC worker handling CreateTransfers: begin them all, then drive them together (services/ledger_service.py)."""
    _CALLER.set(asyncio.current_task().get_name())
    _ROOT.set(asyncio.current_task())
    await clock.sleep(started_at)
    starts = [
        (request, world.shard_of_account[request.debit_account_id], world.shard_of_account[request.credit_account_id], False)
        for request in requests
    ]
    begun = await driver.begin_many(starts, 2.0)
    records = [b.record for b in begun if not isinstance(b, errors.LedgerError) and b.created and b.record.state not in FINAL_STATES]
    if records:
        await driver.drive_many(records)
    # Whatever failed to begin is the client's to retry (or not); what began is driven or recovery's.


async def _coordinator(number: int, new_driver, tcc_for_shard, shard_names: list[str], stopping: asyncio.Event, simulation: Simulation) -> None:
    """A coordinator process, restarted after each crash (its drives die with it)."""
    incarnation = 0
    while not stopping.is_set():
        recovery = Recovery(tcc_for_shard, lambda: shard_names, new_driver(f"coordinator-{number}.{incarnation}"), clock=simulation.clock)
        run = asyncio.create_task(_tracked(recovery, stopping, simulation), name=f"coordinator-{number}.{incarnation}")
        await asyncio.wait([run])
        if not run.cancelled():
            run.result()  # a bug in recovery's loop must fail the run, not vanish
            return
        for drive in sorted(recovery.drives, key=asyncio.Task.get_name):
            drive.cancel()
        incarnation += 1
        simulation.note(f"coordinator-{number} crashed; restarting")
        await asyncio.sleep(simulation.rng.uniform(0, COORDINATOR_RESTART_SECONDS_MAX))


async def _tracked(recovery: Recovery, stopping: asyncio.Event, simulation: Simulation) -> None:
    original_scan = recovery.scan_once

    async def scan_and_track() -> int:
        claimed = await original_scan()
        for drive in sorted(recovery.drives, key=asyncio.Task.get_name):
            if drive not in _live_drives:
                _live_drives[drive] = None
                drive.add_done_callback(lambda done: _live_drives.pop(done, None))
                simulation.watch(drive)
        return claimed

    recovery.scan_once = scan_and_track
    await recovery.run(stopping)


def _faults_counted() -> float:
    return sum(sample.value for family in metrics.FAULTS.collect() for sample in family.samples if sample.name.endswith("_total"))


# --- Invariants, from the stores alone. ---

def check_faults(world: World, faulted: dict[str, str], error_lines: list[str]) -> list[str]:
    """A faulted transfer is loud (recorded, logged at ERROR) and moved nothing beyond its decision."""
    violations = []
    for transfer_id, fault in faulted.items():
        debit_shard = next(s for s in world.shards.values() if transfer_id in s.records)
        record = debit_shard.records[transfer_id]
        if not fault:
            violations.append(f"{transfer_id}: faulted without a fault text")
        if not any(transfer_id in line for line in error_lines):
            violations.append(f"{transfer_id}: faulted without an ERROR log line naming it")
        debit_row = debit_shard.transfers.get(transfer_id)
        credit_row = world.shards[record.credit_shard].transfers.get(transfer_id)
        debit_status = debit_row.status if debit_row else None
        credit_status = credit_row.status if credit_row else None
        # Faulted before or after the credit shard decided: the debit reserved, the credit posted or absent.
        allowed = {CoordinatorState.TRYING: ({TransferStatus.PENDING}, {None, TransferStatus.POSTED})}.get(record.state)
        if allowed is None:
            violations.append(f"{transfer_id}: faulted in {record.state.name}")
        elif debit_status not in allowed[0] or credit_status not in allowed[1]:
            violations.append(
                f"{transfer_id}: faulted in {record.state.name} with branches debit {debit_status and debit_status.name},"
                f" credit {credit_status and credit_status.name}"
            )
    return violations


def check_transfers(world: World) -> list[str]:
    """Every transfer final, all or nothing, by the rules."""
    violations = []
    for shard in world.shards.values():
        for transfer_id, record in shard.records.items():
            credit_shard = world.shards[record.credit_shard]
            debit_row = shard.transfers.get(transfer_id)
            credit_row = credit_shard.transfers.get(transfer_id)
            statuses = (debit_row.status if debit_row else None, credit_row.status if credit_row else None)
            names = tuple(status.name if status else None for status in statuses)
            if record.state not in FINAL_STATES:
                violations.append(f"{transfer_id}: not final ({record.state.name})")
            elif record.state is CoordinatorState.POSTED:
                if statuses != (TransferStatus.POSTED, TransferStatus.POSTED):
                    violations.append(f"{transfer_id}: POSTED with branches {names}")
                credit = world.initial_accounts[record.credit_shard][record.credit_account_id]
                if credit.status not in (AccountStatus.ACTIVE, AccountStatus.BLOCK_DEBIT) or credit.currency != record.currency:
                    violations.append(f"{transfer_id}: POSTED to {credit.account_id}, which the rules refuse")
            else:
                if TransferStatus.POSTED in statuses or TransferStatus.PENDING in statuses:
                    violations.append(f"{transfer_id}: {record.state.name} with branches {names}")
                if record.state is CoordinatorState.VOIDED and record.reason not in SYSTEM_CANCEL_CAUSES:
                    violations.append(f"{transfer_id}: VOIDED with reason {record.reason!r}")
                if record.state is CoordinatorState.REJECTED and (record.reason in SYSTEM_CANCEL_CAUSES or not record.reason):
                    violations.append(f"{transfer_id}: REJECTED with reason {record.reason!r}")
            stored = credit_shard.barriers.get((transfer_id, Branch.CREDIT, BarrierOperation.TRY))
            if stored is not None and parse_try_outcome(stored)[0] is TryOutcome.BLOCKED_BY_CANCEL and credit_row is not None:
                violations.append(f"{transfer_id}: its credit try applied after a cancel (hanging)")
    return violations


def check_balances(world: World, all_final: bool) -> list[str]:
    """Double entry per shard, counters equal to their rows, no customer overdrawn; once all is
    final, no pending left, clearing accounts netting to zero and money conserved per currency."""
    violations = []
    clearing_net: dict[str, int] = {}
    customer_total: dict[str, int] = {}
    for shard_name, shard in world.shards.items():
        rows = list(shard.accounts.values())
        for kind in ("posted", "pending"):
            debits = sum(getattr(row, f"debits_{kind}_minor") for row in rows)
            credits = sum(getattr(row, f"credits_{kind}_minor") for row in rows)
            if debits != credits:
                violations.append(f"{shard_name}: {kind} debits {debits} != credits {credits}")
        expected = {a: dataclasses.replace(row) for a, row in world.initial_accounts[shard_name].items()}
        for row in shard.accounts.values():
            expected.setdefault(row.account_id, AccountRow(row.account_id, row.currency, row.kind, row.tier, row.status))
        for transfer in shard.transfers.values():
            if transfer.status in (TransferStatus.PENDING, TransferStatus.POSTED):
                kind = "pending" if transfer.status == TransferStatus.PENDING else "posted"
                debited, credited = expected[transfer.debited_account_id], expected[transfer.credited_account_id]
                setattr(debited, f"debits_{kind}_minor", getattr(debited, f"debits_{kind}_minor") + transfer.amount_minor)
                setattr(credited, f"credits_{kind}_minor", getattr(credited, f"credits_{kind}_minor") + transfer.amount_minor)
        for row in rows:
            if row != expected[row.account_id]:
                violations.append(f"{shard_name}: counters of {row.account_id} {row} do not match its transfer rows {expected[row.account_id]}")
            if row.kind != AccountKind.SYSTEM and row.credits_posted_minor - row.debits_posted_minor - row.debits_pending_minor < 0:
                violations.append(f"{shard_name}: {row.account_id} overdrawn: {row}")
            if all_final and (row.debits_pending_minor or row.credits_pending_minor):
                violations.append(f"{shard_name}: {row.account_id} still has pending amounts: {row}")
            if row.account_id.startswith("clr-"):
                clearing_net[row.currency] = clearing_net.get(row.currency, 0) + row.credits_posted_minor - row.debits_posted_minor
            elif row.kind != AccountKind.SYSTEM:
                customer_total[row.currency] = customer_total.get(row.currency, 0) + row.credits_posted_minor - row.debits_posted_minor
    if all_final:
        if any(clearing_net.values()):
            violations.append(f"clearing accounts do not net to zero across shards: {clearing_net}")
        for currency, initial_minor in world.initial_balance_by_currency.items():
            if customer_total.get(currency, 0) != initial_minor:
                violations.append(f"{currency}: customers hold {customer_total.get(currency, 0)}, started with {initial_minor}")
    return violations


def _outcomes(world: World) -> dict[str, int]:
    outcomes: dict[str, int] = {}
    for shard in world.shards.values():
        for record in shard.records.values():
            key = f"{record.state.name}:{record.reason}" if record.reason else record.state.name
            outcomes[key] = outcomes.get(key, 0) + 1
    return outcomes


# --- Many seeds. ---

def run_seeds(seeds: range, variant: Variant = CORRECT) -> tuple[list[SeedResult], dict[str, int]]:
    """The failing seeds' results, and the totals of every statistic."""
    failures, totals = [], {"seeds": 0}
    for seed in seeds:
        result = run_seed(seed, variant)
        totals["seeds"] += 1
        for key, value in result.stats.items():
            totals[key] = totals.get(key, 0) + value
        if result.violations:
            failures.append(result)
    return failures, totals


def run_seeds_in_parallel(first_seed: int, count: int, workers: int, variant: Variant = CORRECT) -> tuple[list[SeedResult], dict[str, int]]:
    chunks = [range(start, min(start + SEEDS_PER_CHUNK, first_seed + count)) for start in range(first_seed, first_seed + count, SEEDS_PER_CHUNK)]
    if workers <= 1:
        return run_seeds(range(first_seed, first_seed + count), variant)
    failures, totals = [], {}
    with concurrent.futures.ProcessPoolExecutor(workers) as pool:
        for chunk_failures, chunk_totals in pool.map(run_seeds, chunks, [variant] * len(chunks)):
            failures += chunk_failures
            for key, value in chunk_totals.items():
                totals[key] = totals.get(key, 0) + value
    return sorted(failures, key=lambda result: result.seed), totals


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, help="replay this one seed, printing its trace")
    parser.add_argument("--seeds", type=int, default=1000, help="how many seeds to run")
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--trace", action="store_true", help="with --seed: print the trace")
    arguments = parser.parse_args()
    if arguments.seed is not None:
        result = run_seed(arguments.seed, tracing=True)
        if arguments.trace or result.violations:
            print("\n".join(result.trace))
        print(f"seed {result.seed}: trace {result.trace_digest}, {result.stats}")
        for violation in result.violations:
            print(f"  VIOLATION {violation}")
        raise SystemExit(1 if result.violations else 0)
    started = time.monotonic()
    failures, totals = run_seeds_in_parallel(arguments.first_seed, arguments.seeds, arguments.workers)
    elapsed_seconds = time.monotonic() - started
    print(f"{totals.get('seeds', 0)} seeds from {arguments.first_seed} in {elapsed_seconds:.1f}s on {arguments.workers} worker(s)")
    print("  " + ", ".join(f"{key} {value}" for key, value in sorted(totals.items()) if key != "seeds"))
    for result in failures:
        print(f"seed {result.seed} FAILED, trace {result.trace_digest} (replay: make sim SEED={result.seed}):")
        for violation in result.violations:
            print(f"  {violation}")
    raise SystemExit(1 if failures else 0)


if __name__ == "__main__":
    main()


# --- Deliberately broken variants: the invariants must catch each within a few hundred seeds. ---

class HangingTryTcc(MemoryTcc):
    """Broken: a credit try ignores the row an earlier cancel wrote, and the pending timeout ("no hanging" lost)."""

    async def settle_credit(self, record, clearing_account_id, limits, timeout_seconds):
        key = (record.transfer_id, Branch.CREDIT, BarrierOperation.TRY)
        if parse_try_outcome(self.barriers.get(key, TryOutcome.APPLIED))[0] is TryOutcome.BLOCKED_BY_CANCEL:
            del self.barriers[key]
        never_expires = dataclasses.replace(record, pending_expires_at=datetime.datetime.max.replace(tzinfo=datetime.timezone.utc))
        return await super().settle_credit(never_expires, clearing_account_id, limits, timeout_seconds)


class DoubleCreditTcc(MemoryTcc):
    """Broken: a repeated credit settle (a retry after a lost answer) applies again."""

    async def settle_credit(self, record, clearing_account_id, limits, timeout_seconds):
        key = (record.transfer_id, Branch.CREDIT, BarrierOperation.TRY)
        if self.barriers.get(key) == TryOutcome.APPLIED:
            del self.barriers[key]
            del self.transfers[record.transfer_id]
        return await super().settle_credit(record, clearing_account_id, limits, timeout_seconds)


class CancelWithoutBlockDriver(TransferDriver):
    """Broken: cancels on its own clock without storing the cancel on the credit shard first."""

    async def _act(self, step, record, fault):
        if step.action.name == "BLOCK_CREDIT":
            return driver_module.Event.CREDIT_BLOCKED, step.reason, record
        return await super()._act(step, record, fault)


BROKEN_VARIANTS = (
    Variant("hanging-try", store_class=HangingTryTcc),
    Variant("double-credit", store_class=DoubleCreditTcc),
    Variant("cancel-without-block", driver_class=CancelWithoutBlockDriver),
)
