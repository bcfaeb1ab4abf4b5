"""The one driver every gRPC scenario runs under, and the figures it returns.

A scenario is a picklable object with a `name` and an async
`call(stubs, worker_label, sequence, rng)` that makes one logical request and
raises grpc.aio.AioRpcError when it fails. A call that carries several
operations (CreateTransfers: one call, many transfers) returns a CallOutcome,
and the figures then count operations, not calls. The driver runs `clients` copies of
it in a closed loop (each worker waits for its answer before the next call),
spread over one or more client processes, for a warm-up and then a measured
window, and times every call. At both edges of the window it also reads the
cluster's processes' CPU and, when given, counters of the cluster (commits,
database round trips: loadtest.costs), so that costs per transfer come from the
same window as the rate.

Several processes exist because one Python process may not issue calls fast
enough: `client_cpu_percent` in the result says how busy the client processes
were, so a run can tell whether it measured the server or the client.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import itertools
import math
import multiprocessing
import os
import pathlib
import queue
import random
import time
from collections.abc import Callable
from typing import Protocol

import grpc
from corebank.v1 import accounts_pb2_grpc, payments_pb2_grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from services.auth.client import Target

# A call that takes longer than this counts as DEADLINE_EXCEEDED: a bench must end.
CALL_TIMEOUT_SECONDS = 10.0
# Spawned client processes import grpc and connect before the clock starts.
CLIENT_PROCESS_START_TIMEOUT_SECONDS = 60.0
# Past the end of the window, wait this long for in-flight calls and the results.
CLIENT_PROCESS_DRAIN_TIMEOUT_SECONDS = CALL_TIMEOUT_SECONDS + 30.0
CHANNEL_READY_TIMEOUT_SECONDS = 10.0
# Connections per client process (at most one per worker): enough to reach every service worker.
CHANNELS_PER_CLIENT_PROCESS = 8


@dataclasses.dataclass
class Stubs:
    accounts: accounts_pb2_grpc.AccountsStub
    payments: payments_pb2_grpc.PaymentsStub

    @classmethod
    def for_channel(cls, channel: grpc.aio.Channel) -> Stubs:
        return cls(accounts_pb2_grpc.AccountsStub(channel), payments_pb2_grpc.PaymentsStub(channel))


@dataclasses.dataclass(frozen=True)
class CallOutcome:
    """What one call of a batch scenario did: operations that succeeded, and the others by code."""

    ok_count: int
    error_count_by_code: dict[str, int] = dataclasses.field(default_factory=dict)


# Reads monotonic counters of the cluster (name -> value) at one instant; a name missing
# from either edge's reading is left out of the window's deltas.
CounterSampler = Callable[[], dict[str, float]]


class Scenario(Protocol):
    name: str

    async def call(self, stubs: Stubs, worker_label: str, sequence: int, rng: random.Random) -> CallOutcome | None: ...


@dataclasses.dataclass(frozen=True)
class ScenarioResult:
    """One row of the report; every figure comes from one measured window."""

    scenario: str
    clients: int
    seconds: float
    # Operations that succeeded in the window; a call across an edge of the window counts for
    # the share of its duration inside it (so calls lasting seconds still add up to the rate).
    ok_count: float
    transactions_per_second: float
    latency_ms_p50: float | None
    latency_ms_p99: float | None
    latency_ms_mean: float | None
    error_count_by_code: dict[str, int]
    client_processes: int
    # CPU seconds used by the client processes per wall second, in percent of one core.
    client_cpu_percent: float | None
    # The whole machine's busy CPU share during the window, in percent of all cores.
    machine_cpu_percent: float | None
    # Cluster processes (gRPC workers, shards with their backends), percent of one core each.
    process_cpu_percent: dict[str, float] = dataclasses.field(default_factory=dict)
    notes: dict = dataclasses.field(default_factory=dict)
    # Calls answered OK wholly inside the window (the ones timed); differs from ok_count when a
    # call carries many operations.
    ok_call_count: int | None = None
    # The same processes' CPU seconds over the window, and the increase of the cluster's counters.
    process_cpu_seconds: dict[str, float] = dataclasses.field(default_factory=dict)
    counter_deltas: dict[str, float] = dataclasses.field(default_factory=dict)

    @property
    def error_count(self) -> int:
        return sum(self.error_count_by_code.values())


def percentile(sorted_values: list[float], fraction: float) -> float | None:
    """Nearest-rank percentile of an ascending list; None when it is empty."""
    if not sorted_values:
        return None
    rank = max(1, math.ceil(fraction * len(sorted_values)))
    return sorted_values[rank - 1]


def latency_figures_ms(latencies_seconds: list[float]) -> tuple[float | None, float | None, float | None]:
    ordered = sorted(latencies_seconds)
    if not ordered:
        return None, None, None
    p50 = percentile(ordered, 0.50)
    p99 = percentile(ordered, 0.99)
    return p50 * 1000, p99 * 1000, sum(ordered) / len(ordered) * 1000


class MachineCpu:
    """Busy share of all cores between start() and stop(), from /proc/stat."""

    @staticmethod
    def _sample() -> tuple[int, int]:
        with open("/proc/stat") as stat:
            fields = [int(value) for value in stat.readline().split()[1:]]
        idle = fields[3] + fields[4]  # idle + iowait
        return sum(fields) - idle, sum(fields)

    def start(self) -> None:
        self._busy_start, self._total_start = self._sample()

    def stop(self) -> float | None:
        busy, total = self._sample()
        if total == self._total_start:
            return None
        return 100.0 * (busy - self._busy_start) / (total - self._total_start)


class ProcessTreeCpu:
    """CPU seconds of named processes and their direct children, between start() and stop().

    Children count because a PostgreSQL postmaster does no work itself: its
    backends, one per connection, do. A child born in the window counts from
    zero; one that ended in the window was reaped by its parent, whose
    cutime/cstime then hold its CPU, so the parent is read with them.
    """

    _ticks_per_second = os.sysconf("SC_CLK_TCK")

    def __init__(self, pid_by_name: dict[str, int]) -> None:
        self._pid_by_name = {name: pid for name, pid in pid_by_name.items() if pid}

    @classmethod
    def _cpu_ticks_by_pid(cls) -> tuple[dict[int, int], dict[int, int], dict[int, int]]:
        """Own CPU ticks, parent pid, and own plus reaped children's ticks, by pid."""
        ticks_by_pid, parent_by_pid, with_reaped_by_pid = {}, {}, {}
        for stat_path in pathlib.Path("/proc").glob("[0-9]*/stat"):
            try:
                text = stat_path.read_text()
            except (FileNotFoundError, ProcessLookupError, PermissionError):
                continue
            # Fields after the parenthesised command name, which may hold spaces.
            fields = text[text.rindex(")") + 2 :].split()
            pid = int(stat_path.parent.name)
            parent_by_pid[pid] = int(fields[1])
            ticks_by_pid[pid] = int(fields[11]) + int(fields[12])  # utime + stime
            with_reaped_by_pid[pid] = ticks_by_pid[pid] + int(fields[13]) + int(fields[14])  # + cutime + cstime
        return ticks_by_pid, parent_by_pid, with_reaped_by_pid

    def _sample(self) -> dict[str, dict[int, int]]:
        ticks_by_pid, parent_by_pid, with_reaped_by_pid = self._cpu_ticks_by_pid()
        by_name = {}
        for name, root in self._pid_by_name.items():
            children = {pid for pid, parent in parent_by_pid.items() if parent == root}
            by_name[name] = {pid: ticks_by_pid[pid] for pid in children}
            if root in with_reaped_by_pid:
                by_name[name][root] = with_reaped_by_pid[root]
        return by_name

    def start(self) -> None:
        self._started = self._sample()
        self._started_at = time.monotonic()

    def stop(self) -> tuple[dict[str, float], float]:
        """CPU seconds per name over the window, and the window's length in seconds."""
        ended = self._sample()
        elapsed_seconds = time.monotonic() - self._started_at
        cpu_seconds_by_name = {}
        for name, ticks_by_pid in ended.items():
            before = self._started.get(name, {})
            ticks = sum(ticks - before.get(pid, 0) for pid, ticks in ticks_by_pid.items())
            cpu_seconds_by_name[name] = ticks / self._ticks_per_second
        return cpu_seconds_by_name, elapsed_seconds


@dataclasses.dataclass(frozen=True)
class WindowFigures:
    machine_cpu_percent: float | None
    # Percent of one core per watched process, and the same as CPU seconds.
    process_cpu_percent: dict[str, float]
    process_cpu_seconds: dict[str, float]
    counter_deltas: dict[str, float]


NO_WINDOW_FIGURES = WindowFigures(None, {}, {}, {})


class WindowMeter:
    """The machine's busy share, the watched processes' CPU and the cluster's counters over one window.

    start() and stop() block for a few milliseconds (they read /proc, and the counters over
    the network): callers inside an event loop run them in a thread.
    """

    def __init__(self, pid_by_name: dict[str, int] | None = None, counters: CounterSampler | None = None) -> None:
        self._machine = MachineCpu()
        self._processes = ProcessTreeCpu(pid_by_name or {})
        self._counters = counters

    def start(self) -> None:
        self._counters_started = self._counters() if self._counters else {}
        self._machine.start()
        self._processes.start()

    def stop(self) -> WindowFigures:
        machine_percent = self._machine.stop()
        cpu_seconds_by_name, elapsed_seconds = self._processes.stop()
        counters_ended = self._counters() if self._counters else {}
        return WindowFigures(
            machine_cpu_percent=machine_percent,
            process_cpu_percent={
                name: round(100.0 * cpu_seconds / elapsed_seconds, 1)
                for name, cpu_seconds in cpu_seconds_by_name.items()
            },
            process_cpu_seconds={name: round(cpu_seconds, 3) for name, cpu_seconds in cpu_seconds_by_name.items()},
            counter_deltas={
                name: counters_ended[name] - value
                for name, value in self._counters_started.items()
                if name in counters_ended
            },
        )


def describe_error(error: grpc.aio.AioRpcError) -> str:
    """`CODE/REASON` with the reason from the status's google.rpc.ErrorInfo, or `CODE` alone."""
    status = rpc_status.from_call(error)
    info = error_details_pb2.ErrorInfo()
    if status is not None and status.details and status.details[0].Unpack(info):
        return f"{error.code().name}/{info.reason}"
    return error.code().name


@dataclasses.dataclass
class _ProcessSample:
    latencies_seconds: list[float]
    error_count_by_code: collections.Counter
    cpu_seconds_window: float
    failure: str | None = None
    # Operations that succeeded in the window (one per OK call unless the scenario says otherwise),
    # calls across an edge of the window counted for the share of their duration inside it.
    ok_operation_count: float = 0.0


async def _worker(
    scenario: Scenario,
    stubs: Stubs,
    worker_label: str,
    window_start: float,
    window_end: float,
    sample: _ProcessSample,
) -> None:
    rng = random.Random(f"{worker_label}:{os.getpid()}:{time.time_ns()}")
    sequence = 0
    while (started := time.monotonic()) < window_end:
        sequence += 1
        code = "OK"
        outcome = None
        try:
            outcome = await scenario.call(stubs, worker_label, sequence, rng)
        except grpc.aio.AioRpcError as error:
            code = describe_error(error)
        finished = time.monotonic()
        if started >= window_start and finished <= window_end:
            _record(sample, code, outcome, finished - started)
        elif code == "OK" and finished > window_start:
            # Across an edge: not timed, but its work partly fell in the window, as did the
            # cluster's CPU and counters for it. A closed loop of CreateTransfers calls that take
            # longer than the window would otherwise measure nothing at all.
            share = share_inside(started, finished, window_start, window_end)
            sample.ok_operation_count += _ok_operations(outcome) * share


def share_inside(started: float, finished: float, window_start: float, window_end: float) -> float:
    """The share of a call's duration (started..finished) that lies inside the window."""
    assert finished > started, "a call that crosses an edge of the window takes time"
    inside_seconds = min(finished, window_end) - max(started, window_start)
    return max(0.0, inside_seconds) / (finished - started)


def _ok_operations(outcome: CallOutcome | None) -> int:
    return 1 if outcome is None else outcome.ok_count


def _record(sample: _ProcessSample, code: str, outcome: CallOutcome | None, latency_seconds: float) -> None:
    if code != "OK":
        sample.error_count_by_code[code] += 1
        return
    sample.latencies_seconds.append(latency_seconds)
    sample.ok_operation_count += _ok_operations(outcome)
    if outcome is not None:
        sample.error_count_by_code.update(outcome.error_count_by_code)


async def _run_workers(
    scenario: Scenario, target: Target, worker_labels: list[str], window_start: float, window_end: float
) -> _ProcessSample:
    sample = _ProcessSample([], collections.Counter(), 0.0)
    async with contextlib.AsyncExitStack() as channels:
        # Several connections, as many client services would open: the service's
        # worker processes share the port through SO_REUSEPORT, which balances
        # connections, not calls. A local subchannel pool keeps the channels apart.
        stubs_by_channel = []
        for _ in range(min(CHANNELS_PER_CLIENT_PROCESS, len(worker_labels))):
            channel = await channels.enter_async_context(
                target.channel(aio=True, options=[("grpc.use_local_subchannel_pool", 1)])
            )
            await asyncio.wait_for(channel.channel_ready(), CHANNEL_READY_TIMEOUT_SECONDS)
            stubs_by_channel.append(Stubs.for_channel(channel))
        workers = [
            asyncio.create_task(
                _worker(scenario, stubs_by_channel[index % len(stubs_by_channel)], label, window_start, window_end, sample)
            )
            for index, label in enumerate(worker_labels)
        ]

        async def cpu_over_window() -> None:
            await asyncio.sleep(max(0.0, window_start - time.monotonic()))
            cpu_start = time.process_time()
            await asyncio.sleep(max(0.0, window_end - time.monotonic()))
            sample.cpu_seconds_window = time.process_time() - cpu_start

        await asyncio.gather(cpu_over_window(), *workers)
    return sample


def _client_process_main(
    scenario: Scenario,
    target: Target,
    worker_labels: list[str],
    ready_queue: multiprocessing.Queue,
    window: multiprocessing.Array,
    go: multiprocessing.Event,
    result_queue: multiprocessing.Queue,
) -> None:
    """Entry point of a spawned client process: report ready, wait for the clock, run."""
    ready_queue.put(os.getpid())
    if not go.wait(CLIENT_PROCESS_START_TIMEOUT_SECONDS):
        return
    try:
        sample = asyncio.run(_run_workers(scenario, target, worker_labels, window[0], window[1]))
    except Exception as error:  # noqa: BLE001  (any failure goes to the parent, which fails the run)
        sample = _ProcessSample([], collections.Counter(), 0.0, failure=repr(error))
    result_queue.put(sample)


def _worker_labels(clients: int, client_processes: int) -> list[list[str]]:
    """Deal `clients` workers round-robin onto processes: p0w0, p1w1, p0w2, ..."""
    labels: list[list[str]] = [[] for _ in range(client_processes)]
    for index in range(clients):
        process = index % client_processes
        labels[process].append(f"p{process}w{index}")
    return labels


def run_scenario(
    scenario: Scenario,
    target: Target,
    clients: int,
    seconds: float,
    warmup_seconds: float,
    client_processes: int = 1,
    watched_pid_by_name: dict[str, int] | None = None,
    counters: CounterSampler | None = None,
) -> ScenarioResult:
    """Run `clients` closed-loop workers of `scenario`; return the measured window's figures."""
    assert clients >= 1 and seconds > 0 and warmup_seconds >= 0
    client_processes = max(1, min(client_processes, clients))
    labels = _worker_labels(clients, client_processes)
    meter = WindowMeter(watched_pid_by_name, counters)

    if client_processes == 1:
        window_start = time.monotonic() + warmup_seconds
        window_end = window_start + seconds

        async def measured() -> tuple[_ProcessSample, WindowFigures]:
            run = asyncio.create_task(_run_workers(scenario, target, labels[0], window_start, window_end))
            await asyncio.sleep(max(0.0, window_start - time.monotonic()))
            await asyncio.to_thread(meter.start)
            await asyncio.sleep(max(0.0, window_end - time.monotonic()))
            figures = await asyncio.to_thread(meter.stop)
            return await run, figures

        sample, figures = asyncio.run(measured())
        samples = [sample]
    else:
        samples, figures = _run_in_processes(scenario, target, labels, seconds, warmup_seconds, meter)

    failures = [sample.failure for sample in samples if sample.failure]
    if failures:
        raise RuntimeError(f"scenario {scenario.name}: client process failed: {failures[0]}")
    latencies = [latency for sample in samples for latency in sample.latencies_seconds]
    errors: collections.Counter = collections.Counter()
    for sample in samples:
        errors.update(sample.error_count_by_code)
    p50, p99, mean = latency_figures_ms(latencies)
    cpu_seconds = sum(sample.cpu_seconds_window for sample in samples)
    ok_operations = sum(sample.ok_operation_count for sample in samples)
    return ScenarioResult(
        scenario=scenario.name,
        clients=clients,
        seconds=seconds,
        ok_count=ok_operations,
        ok_call_count=len(latencies),
        transactions_per_second=ok_operations / seconds,
        latency_ms_p50=p50,
        latency_ms_p99=p99,
        latency_ms_mean=mean,
        error_count_by_code=dict(errors.most_common()),
        client_processes=client_processes,
        client_cpu_percent=100.0 * cpu_seconds / seconds,
        machine_cpu_percent=figures.machine_cpu_percent,
        process_cpu_percent=figures.process_cpu_percent,
        process_cpu_seconds=figures.process_cpu_seconds,
        counter_deltas=figures.counter_deltas,
        notes=dict(getattr(scenario, "notes", {})),
    )


def _run_in_processes(
    scenario: Scenario,
    target: Target,
    labels: list[list[str]],
    seconds: float,
    warmup_seconds: float,
    meter: WindowMeter,
) -> tuple[list[_ProcessSample], WindowFigures]:
    # spawn, not fork: grpc's threads do not survive a fork of a process that used them.
    context = multiprocessing.get_context("spawn")
    ready_queue = context.Queue()
    result_queue = context.Queue()
    go = context.Event()
    window = context.Array("d", 2)
    processes = [
        context.Process(
            target=_client_process_main,
            args=(scenario, target, process_labels, ready_queue, window, go, result_queue),
            daemon=True,
        )
        for process_labels in labels
    ]
    for process in processes:
        process.start()
    try:
        for _ in processes:
            ready_queue.get(timeout=CLIENT_PROCESS_START_TIMEOUT_SECONDS)
        # CLOCK_MONOTONIC is one clock for every process on the machine.
        window[0] = time.monotonic() + warmup_seconds
        window[1] = window[0] + seconds
        go.set()
        time.sleep(max(0.0, window[0] - time.monotonic()))
        meter.start()
        time.sleep(max(0.0, window[1] - time.monotonic()))
        figures = meter.stop()
        samples = [result_queue.get(timeout=CLIENT_PROCESS_DRAIN_TIMEOUT_SECONDS) for _ in processes]
    except queue.Empty:
        raise RuntimeError(f"scenario {scenario.name}: a client process did not report in time") from None
    finally:
        for process in processes:
            process.join(timeout=CLIENT_PROCESS_DRAIN_TIMEOUT_SECONDS)
            if process.is_alive():
                process.kill()
                process.join()
    return samples, figures


# Open loop: requests in flight at once, at most. Past it an arrival is not sent
# but counted (SKIPPED_IN_FLIGHT_MAX), so a stalled server cannot grow the client without bound.
OPEN_LOOP_IN_FLIGHT_MAX_DEFAULT = 256


def run_open_loop(
    scenario: Scenario,
    target: Target,
    rate_per_second: float,
    seconds: float,
    warmup_seconds: float,
    in_flight_max: int = OPEN_LOOP_IN_FLIGHT_MAX_DEFAULT,
    watched_pid_by_name: dict[str, int] | None = None,
    counters: CounterSampler | None = None,
) -> ScenarioResult:
    """Issue calls at a fixed arrival rate, whether or not earlier ones have answered.

    A closed loop slows down with the server and so hides its queueing; here
    each call's latency runs from its scheduled arrival time (not from when the
    client got round to sending it), so a stall shows in p99 instead of
    silently lowering the rate (no coordinated omission).
    """
    assert rate_per_second > 0 and seconds > 0 and warmup_seconds >= 0 and in_flight_max >= 1
    interval_seconds = 1.0 / rate_per_second
    meter = WindowMeter(watched_pid_by_name, counters)
    sample = _ProcessSample([], collections.Counter(), 0.0)

    async def one(stubs: Stubs, label: str, sequence: int, rng: random.Random, scheduled: float, window_end: float,
                  window_start: float) -> None:  # fmt: skip
        code, outcome = "OK", None
        try:
            outcome = await scenario.call(stubs, label, sequence, rng)
        except grpc.aio.AioRpcError as error:
            code = describe_error(error)
        finished = time.monotonic()
        if window_start <= scheduled and finished <= window_end + CALL_TIMEOUT_SECONDS:
            # Arrivals inside the window count, whenever they finish (bounded by the call timeout).
            _record(sample, code, outcome, finished - scheduled)

    async def measured() -> WindowFigures:
        async with contextlib.AsyncExitStack() as channels:
            stubs_by_channel = []
            for _ in range(CHANNELS_PER_CLIENT_PROCESS):
                channel = await channels.enter_async_context(
                    target.channel(aio=True, options=[("grpc.use_local_subchannel_pool", 1)])
                )
                await asyncio.wait_for(channel.channel_ready(), CHANNEL_READY_TIMEOUT_SECONDS)
                stubs_by_channel.append(Stubs.for_channel(channel))
            rng = random.Random(f"open-loop:{os.getpid()}:{time.time_ns()}")
            label = f"o{os.getpid()}"
            started = time.monotonic()
            window_start, window_end = started + warmup_seconds, started + warmup_seconds + seconds
            in_flight: set[asyncio.Task] = set()
            figures = NO_WINDOW_FIGURES
            # Started in a thread, beside the arrivals: the meter's readings must not delay them.
            meter_started: asyncio.Task | None = None
            for sequence in itertools.count():
                scheduled = started + sequence * interval_seconds
                if scheduled >= window_end:
                    break
                delay = scheduled - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                if meter_started is None and scheduled >= window_start:
                    meter_started = asyncio.create_task(asyncio.to_thread(meter.start))
                    cpu_process_start = time.process_time()
                if len(in_flight) >= in_flight_max:
                    if scheduled >= window_start:
                        sample.error_count_by_code["SKIPPED_IN_FLIGHT_MAX"] += 1
                    continue
                task = asyncio.create_task(
                    one(stubs_by_channel[sequence % len(stubs_by_channel)], label, sequence, rng, scheduled,
                        window_end, window_start)
                )  # fmt: skip
                in_flight.add(task)
                task.add_done_callback(in_flight.discard)
            await asyncio.sleep(max(0.0, window_end - time.monotonic()))
            if meter_started is not None:
                await meter_started
                figures = await asyncio.to_thread(meter.stop)
                sample.cpu_seconds_window = time.process_time() - cpu_process_start
            if in_flight:
                await asyncio.wait(in_flight, timeout=CALL_TIMEOUT_SECONDS + 1)
        return figures

    figures = asyncio.run(measured())
    p50, p99, mean = latency_figures_ms(sample.latencies_seconds)
    return ScenarioResult(
        scenario=scenario.name,
        clients=in_flight_max,
        seconds=seconds,
        ok_count=sample.ok_operation_count,
        ok_call_count=len(sample.latencies_seconds),
        transactions_per_second=sample.ok_operation_count / seconds,
        latency_ms_p50=p50,
        latency_ms_p99=p99,
        latency_ms_mean=mean,
        error_count_by_code=dict(sample.error_count_by_code.most_common()),
        client_processes=1,
        client_cpu_percent=100.0 * sample.cpu_seconds_window / seconds,
        machine_cpu_percent=figures.machine_cpu_percent,
        process_cpu_percent=figures.process_cpu_percent,
        process_cpu_seconds=figures.process_cpu_seconds,
        counter_deltas=figures.counter_deltas,
        notes={**dict(getattr(scenario, "notes", {})), "open_loop_rate_per_second": rate_per_second,
               "in_flight_max": in_flight_max},
    )
