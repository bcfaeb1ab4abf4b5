"""The one driver every gRPC scenario runs under, and the figures it returns.

A scenario is a picklable object with a `name` and an async
`call(stubs, worker_label, sequence, rng)` that makes one logical request and
raises grpc.aio.AioRpcError when it fails. A call that carries several
operations (CreateTransfers: one call, many transfers) returns a CallOutcome,
and the figures then count operations, not calls. The driver runs `clients` copies of
it in a closed loop (each worker waits for its answer before the next call),
spread over one or more client processes, for a warm-up and then a measured
window, and times every call.

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
from typing import Protocol

import grpc
from corebank.v1 import accounts_pb2_grpc, payments_pb2_grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

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


class Scenario(Protocol):
    name: str

    async def call(self, stubs: Stubs, worker_label: str, sequence: int, rng: random.Random) -> CallOutcome | None: ...


@dataclasses.dataclass(frozen=True)
class ScenarioResult:
    """One row of the report; every figure comes from one measured window."""

    scenario: str
    clients: int
    seconds: float
    ok_count: int
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
    # Calls answered OK in the window; differs from ok_count when a call carries many operations.
    ok_call_count: int | None = None

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

    def stop(self) -> dict[str, float]:
        """Percent of one core per name over the window."""
        ended = self._sample()
        elapsed_seconds = time.monotonic() - self._started_at
        percent_by_name = {}
        for name, ticks_by_pid in ended.items():
            before = self._started.get(name, {})
            ticks = sum(ticks - before.get(pid, 0) for pid, ticks in ticks_by_pid.items())
            percent_by_name[name] = round(100.0 * ticks / self._ticks_per_second / elapsed_seconds, 1)
        return percent_by_name


class WindowCpu:
    """The machine's busy share and the watched processes' CPU over one window."""

    def __init__(self, pid_by_name: dict[str, int] | None = None) -> None:
        self._machine = MachineCpu()
        self._processes = ProcessTreeCpu(pid_by_name or {})

    def start(self) -> None:
        self._machine.start()
        self._processes.start()

    def stop(self) -> tuple[float | None, dict[str, float]]:
        return self._machine.stop(), self._processes.stop()


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
    # Operations that succeeded in the window (one per OK call unless the scenario says otherwise).
    ok_operation_count: int = 0


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
        # Only calls wholly inside the window count: warm-up and tail are left out.
        if started < window_start or finished > window_end:
            continue
        _record(sample, code, outcome, finished - started)


def _record(sample: _ProcessSample, code: str, outcome: CallOutcome | None, latency_seconds: float) -> None:
    if code != "OK":
        sample.error_count_by_code[code] += 1
        return
    sample.latencies_seconds.append(latency_seconds)
    if outcome is None:
        sample.ok_operation_count += 1
    else:
        sample.ok_operation_count += outcome.ok_count
        sample.error_count_by_code.update(outcome.error_count_by_code)


async def _run_workers(
    scenario: Scenario, grpc_endpoint: str, worker_labels: list[str], window_start: float, window_end: float
) -> _ProcessSample:
    sample = _ProcessSample([], collections.Counter(), 0.0)
    async with contextlib.AsyncExitStack() as channels:
        # Several connections, as many client services would open: the service's
        # worker processes share the port through SO_REUSEPORT, which balances
        # connections, not calls. A local subchannel pool keeps the channels apart.
        stubs_by_channel = []
        for _ in range(min(CHANNELS_PER_CLIENT_PROCESS, len(worker_labels))):
            channel = await channels.enter_async_context(
                grpc.aio.insecure_channel(grpc_endpoint, options=[("grpc.use_local_subchannel_pool", 1)])
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
    grpc_endpoint: str,
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
        sample = asyncio.run(_run_workers(scenario, grpc_endpoint, worker_labels, window[0], window[1]))
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
    grpc_endpoint: str,
    clients: int,
    seconds: float,
    warmup_seconds: float,
    client_processes: int = 1,
    watched_pid_by_name: dict[str, int] | None = None,
) -> ScenarioResult:
    """Run `clients` closed-loop workers of `scenario`; return the measured window's figures."""
    assert clients >= 1 and seconds > 0 and warmup_seconds >= 0
    client_processes = max(1, min(client_processes, clients))
    labels = _worker_labels(clients, client_processes)
    window_cpu = WindowCpu(watched_pid_by_name)

    if client_processes == 1:
        window_start = time.monotonic() + warmup_seconds
        window_end = window_start + seconds

        async def measured() -> tuple[_ProcessSample, tuple[float | None, dict[str, float]]]:
            run = asyncio.create_task(_run_workers(scenario, grpc_endpoint, labels[0], window_start, window_end))
            await asyncio.sleep(max(0.0, window_start - time.monotonic()))
            window_cpu.start()
            await asyncio.sleep(max(0.0, window_end - time.monotonic()))
            cpu_figures = window_cpu.stop()
            return await run, cpu_figures

        sample, (machine_percent, process_percent) = asyncio.run(measured())
        samples = [sample]
    else:
        samples, (machine_percent, process_percent) = _run_in_processes(
            scenario, grpc_endpoint, labels, seconds, warmup_seconds, window_cpu
        )

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
        machine_cpu_percent=machine_percent,
        process_cpu_percent=process_percent,
        notes=dict(getattr(scenario, "notes", {})),
    )


def _run_in_processes(
    scenario: Scenario,
    grpc_endpoint: str,
    labels: list[list[str]],
    seconds: float,
    warmup_seconds: float,
    window_cpu: WindowCpu,
) -> tuple[list[_ProcessSample], tuple[float | None, dict[str, float]]]:
    # spawn, not fork: grpc's threads do not survive a fork of a process that used them.
    context = multiprocessing.get_context("spawn")
    ready_queue = context.Queue()
    result_queue = context.Queue()
    go = context.Event()
    window = context.Array("d", 2)
    processes = [
        context.Process(
            target=_client_process_main,
            args=(scenario, grpc_endpoint, process_labels, ready_queue, window, go, result_queue),
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
        window_cpu.start()
        time.sleep(max(0.0, window[1] - time.monotonic()))
        cpu_figures = window_cpu.stop()
        samples = [result_queue.get(timeout=CLIENT_PROCESS_DRAIN_TIMEOUT_SECONDS) for _ in processes]
    except queue.Empty:
        raise RuntimeError(f"scenario {scenario.name}: a client process did not report in time") from None
    finally:
        for process in processes:
            process.join(timeout=CLIENT_PROCESS_DRAIN_TIMEOUT_SECONDS)
            if process.is_alive():
                process.kill()
                process.join()
    return samples, cpu_figures


# Open loop: requests in flight at once, at most. Past it an arrival is not sent
# but counted (SKIPPED_IN_FLIGHT_MAX), so a stalled server cannot grow the client without bound.
OPEN_LOOP_IN_FLIGHT_MAX_DEFAULT = 256


def run_open_loop(
    scenario: Scenario,
    grpc_endpoint: str,
    rate_per_second: float,
    seconds: float,
    warmup_seconds: float,
    in_flight_max: int = OPEN_LOOP_IN_FLIGHT_MAX_DEFAULT,
    watched_pid_by_name: dict[str, int] | None = None,
) -> ScenarioResult:
    """Issue calls at a fixed arrival rate, whether or not earlier ones have answered.

    A closed loop slows down with the server and so hides its queueing; here
    each call's latency runs from its scheduled arrival time (not from when the
    client got round to sending it), so a stall shows in p99 instead of
    silently lowering the rate (no coordinated omission).
    """
    assert rate_per_second > 0 and seconds > 0 and warmup_seconds >= 0 and in_flight_max >= 1
    interval_seconds = 1.0 / rate_per_second
    window_cpu = WindowCpu(watched_pid_by_name)
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

    async def measured() -> tuple[float | None, dict[str, float]]:
        async with contextlib.AsyncExitStack() as channels:
            stubs_by_channel = []
            for _ in range(CHANNELS_PER_CLIENT_PROCESS):
                channel = await channels.enter_async_context(
                    grpc.aio.insecure_channel(grpc_endpoint, options=[("grpc.use_local_subchannel_pool", 1)])
                )
                await asyncio.wait_for(channel.channel_ready(), CHANNEL_READY_TIMEOUT_SECONDS)
                stubs_by_channel.append(Stubs.for_channel(channel))
            rng = random.Random(f"open-loop:{os.getpid()}:{time.time_ns()}")
            label = f"o{os.getpid()}"
            started = time.monotonic()
            window_start, window_end = started + warmup_seconds, started + warmup_seconds + seconds
            in_flight: set[asyncio.Task] = set()
            cpu_figures = None
            cpu_started = False
            for sequence in itertools.count():
                scheduled = started + sequence * interval_seconds
                if scheduled >= window_end:
                    break
                delay = scheduled - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                if not cpu_started and scheduled >= window_start:
                    window_cpu.start()
                    cpu_process_start = time.process_time()
                    cpu_started = True
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
            if cpu_started:
                cpu_figures = window_cpu.stop()
                sample.cpu_seconds_window = time.process_time() - cpu_process_start
            if in_flight:
                await asyncio.wait(in_flight, timeout=CALL_TIMEOUT_SECONDS + 1)
        return cpu_figures or (None, {})

    machine_percent, process_percent = asyncio.run(measured())
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
        machine_cpu_percent=machine_percent,
        process_cpu_percent=process_percent,
        notes={**dict(getattr(scenario, "notes", {})), "open_loop_rate_per_second": rate_per_second,
               "in_flight_max": in_flight_max},
    )
