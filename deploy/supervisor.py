"""The supervisor: watches every process of the cluster, and restarts one that died, within a restart limit.

    python -m deploy.supervisor --state-dir DIR --metrics-listen HOST:PORT [--log-file PATH]
                                [--restarts-max N] [--window-seconds S] [--check-interval-seconds S]

`make up` starts it (deploy/cluster.py; its pid in run/supervisor.pid, its JSON log in
logs/supervisor.log) and `make down` stops it before anything else, so that it never
restarts what `down` stops.

It watches: every OBSERVE_INTERVAL_SECONDS, on a thread of its own, it reads the state of
each process as `make status` does (healthy, unhealthy, stopped, dead, down; a shard is
healthy when a new connection to it works within its connect timeout) and serves it on its
metrics port (corebank_process_state and the figures of deploy/prometheus/metrics.md), job
`corebank_supervisor`. That is what sees a frozen shard: postgres_exporter may keep one open
connection, whose backend keeps answering while the frozen postmaster accepts no new one. Its
first reading is made before it serves, so its metrics never show a cluster not yet read.

It restarts, when the cluster is supervised (`make up`; not `up --no-restarts`, nor the
tests' clusters, which only get the watching): every CHECK_INTERVAL_SECONDS it restarts,
through the cluster's own `start(name)`, a process that is dead: its pid gone (crashed,
killed). It leaves alone:
- a stopped process (SIGSTOP): it is alive and resumes with SIGCONT; restarting it
  would leave two of it;
- a process held down on purpose: `Cluster.stop(name)` and `Cluster.kill(name)` (fault
  injection) mark it held until `start(name)` or `up`;
- a process it gave up on: past RESTARTS_MAX restarts within RESTART_WINDOW_SECONDS it
  logs an ERROR and stops trying (a crash loop needs a human); `make up` starts the
  process and resets the limit.
It restarts only while it holds the cluster's lock, which it never waits for: when an `up`,
`down` or `start` runs, that command is in charge and the supervisor skips the round.

Restarts are recorded in run/supervisor.json (the RestartLedger), which `make status` reads.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import pathlib
import signal
import sys
import threading
import time
from typing import TYPE_CHECKING

import prometheus_client
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from deploy import processes
from deploy.grpc_worker import metrics_answer

if TYPE_CHECKING:
    from collections.abc import Iterable

    from deploy.cluster import Cluster, ProcessStatus

SUPERVISOR_MODULE = "deploy.supervisor"
HOST = "127.0.0.1"
# Three crashes in ten minutes is a crash loop, not bad luck: restarting again only hides it.
RESTARTS_MAX = 3
RESTART_WINDOW_SECONDS = 600.0
# How soon a dead process is noticed; each check reads /proc and a pid file per process.
CHECK_INTERVAL_SECONDS = 2.0
# How often it reads every process's state for its metrics: each reading probes every process
# (a new connection to each shard, a health check of each server, each bounded by its own
# timeout), so no more often than Prometheus scrapes (deploy/monitoring.py).
OBSERVE_INTERVAL_SECONDS = 5.0
# Python's start and imports, on a busy machine.
START_TIMEOUT_SECONDS = 30
LEDGER_FILE = "supervisor.json"
HELD_SUFFIX = ".held"
# Why a process is held down, as `status` says it (the held file's content).
HELD_BY_DOWN = "stopped by `make down`"
HELD_BY_STOP = "stopped on purpose (Cluster.stop)"
HELD_BY_KILL = "killed on purpose (Cluster.kill)"
HELD_ON_PURPOSE = "taken down on purpose"
# Its role in corebank_build_info and `status`.
ROLE = "supervisor"

log = logging.getLogger("deploy.supervisor")


@dataclasses.dataclass(frozen=True)
class RestartPolicy:
    restarts_max: int = RESTARTS_MAX
    window_seconds: float = RESTART_WINDOW_SECONDS
    check_interval_seconds: float = CHECK_INTERVAL_SECONDS

    def __post_init__(self) -> None:
        if self.restarts_max < 0 or self.window_seconds <= 0 or self.check_interval_seconds <= 0:
            raise ValueError(f"a restart policy needs restarts_max >= 0 and positive seconds, not {self}")

    def arguments(self) -> list[str]:
        return [
            "--restarts-max", str(self.restarts_max),
            "--window-seconds", str(self.window_seconds),
            "--check-interval-seconds", str(self.check_interval_seconds),
        ]  # fmt: skip


# Held processes: one file each in the run folder saying why, made before the process is signalled.


def held_path(run_dir: pathlib.Path, name: str) -> pathlib.Path:
    return run_dir / f"{name}{HELD_SUFFIX}"


def hold(run_dir: pathlib.Path, name: str, reason: str = HELD_ON_PURPOSE) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    held_path(run_dir, name).write_text(f"{reason}\n")


def held_reason(run_dir: pathlib.Path, name: str) -> str | None:
    """Why `name` is held down, or None when it is not."""
    try:
        return held_path(run_dir, name).read_text().strip() or HELD_ON_PURPOSE
    except FileNotFoundError:
        return None


def release(run_dir: pathlib.Path, name: str) -> None:
    held_path(run_dir, name).unlink(missing_ok=True)


def release_all(run_dir: pathlib.Path) -> None:
    for path in run_dir.glob(f"*{HELD_SUFFIX}"):
        path.unlink(missing_ok=True)


def is_held(run_dir: pathlib.Path, name: str) -> bool:
    return held_path(run_dir, name).exists()


# The restart ledger.


@dataclasses.dataclass
class ProcessRestarts:
    restarts: int = 0  # by the supervisor, since the state folder was made
    recent_seconds: list[float] = dataclasses.field(default_factory=list)  # wall-clock times within the window
    gave_up: bool = False


class RestartLedger:
    """run/supervisor.json: the supervisor's restarts per process. Written only under the
    cluster's lock (by the supervisor, or by `up` resetting it), atomically."""

    def __init__(self, run_dir: pathlib.Path) -> None:
        self.path = run_dir / LEDGER_FILE
        self.by_name: dict[str, ProcessRestarts] = {}
        try:
            stored = json.loads(self.path.read_text())
        except (FileNotFoundError, ValueError):
            return
        for name, fields in stored.get("processes", {}).items():
            self.by_name[name] = ProcessRestarts(
                restarts=int(fields.get("restarts", 0)),
                recent_seconds=[float(t) for t in fields.get("recent_seconds", [])],
                gave_up=bool(fields.get("gave_up", False)),
            )

    def of(self, name: str) -> ProcessRestarts:
        return self.by_name.setdefault(name, ProcessRestarts())

    def save(self) -> None:
        data = {"processes": {name: dataclasses.asdict(entry) for name, entry in sorted(self.by_name.items())}}
        scratch = self.path.with_name(f".{self.path.name}.tmp")
        scratch.write_text(json.dumps(data, indent=2) + "\n")
        scratch.replace(self.path)

    def reset_limits(self) -> None:
        """What `up` does: every process may be restarted again (the totals stay)."""
        for entry in self.by_name.values():
            entry.recent_seconds.clear()
            entry.gave_up = False


def may_restart(entry: ProcessRestarts, policy: RestartPolicy, now_seconds: float) -> bool:
    """Forget restarts older than the window; whether one more stays within the limit."""
    entry.recent_seconds[:] = [t for t in entry.recent_seconds if now_seconds - t < policy.window_seconds]
    return len(entry.recent_seconds) < policy.restarts_max


# One round.


def supervise_once(cluster: Cluster, policy: RestartPolicy) -> list[str]:
    """Restart the dead processes that may be; the names restarted (tried). Skips the round
    (returns []) while another lifecycle command holds the cluster's lock."""
    try:
        with cluster.locked(timeout_seconds=0):
            return _restart_dead(cluster, policy)
    except TimeoutError:
        return []


def _restart_dead(cluster: Cluster, policy: RestartPolicy) -> list[str]:
    ledger = RestartLedger(cluster.run_dir)
    restarted = []
    for role, component in cluster.components():
        name = component.name
        # Read the pid before the hold: a hold is made before its process is signalled.
        if role == ROLE or component.pid() is not None or is_held(cluster.run_dir, name):
            continue
        entry = ledger.of(name)
        if entry.gave_up:
            continue
        now_seconds = time.time()
        if not may_restart(entry, policy, now_seconds):
            entry.gave_up = True
            ledger.save()
            log.error(
                "GIVING UP on %s: dead again after %d restarts within %.0f s; it stays down until "
                "`make up` (read its log under %s)",
                name, policy.restarts_max, policy.window_seconds, cluster.logs_dir,
            )  # fmt: skip
            continue
        entry.restarts += 1
        entry.recent_seconds.append(now_seconds)
        ledger.save()
        restarted.append(name)
        log.warning("%s is dead: restarting it (restart %d within %.0f s)", name, len(entry.recent_seconds), policy.window_seconds)
        try:
            cluster.start(name)
        except Exception:  # a failed start counts as a restart: the limit bounds a crash loop
            log.exception("restarting %s failed", name)
        else:
            log.info("%s is back", name)
    return restarted


def read_states(state_dir: pathlib.Path, states: ProcessStates) -> None:
    from deploy.cluster import Cluster

    try:
        states.update(Cluster(state_dir).status(), time.time())
    except Exception:  # one bad reading (a settings file mid-write) must not end the watching
        log.exception("reading the processes' states failed")


def observe(state_dir: pathlib.Path, states: ProcessStates, stopping: threading.Event) -> None:
    """Read every process's state every OBSERVE_INTERVAL_SECONDS until `stopping` is set. On a
    thread of its own: a restart (which waits for its process to be healthy) never delays it,
    and a probe (bounded by its timeout) never delays a restart."""
    while not stopping.wait(OBSERVE_INTERVAL_SECONDS):
        read_states(state_dir, states)


def run(state_dir: pathlib.Path, policy: RestartPolicy, stopping: threading.Event, states: ProcessStates) -> None:
    """Rounds until `stopping` is set, restarting only while the cluster is supervised. The
    cluster is read anew each round: `make up` may have changed how many workers or
    coordinators it runs, or whether it is supervised."""
    from deploy.cluster import Cluster

    log.info("watching %s; restarting by %s when supervised", state_dir, policy)
    observer = threading.Thread(target=observe, args=(state_dir, states, stopping), name="observer", daemon=True)
    observer.start()
    while True:
        # A plain sleep, not stopping.wait(): the SIGTERM handler sets `stopping`, and setting an
        # Event from a handler could deadlock on the lock wait() holds at that moment (the
        # observer waits on another thread, which the handler never interrupts).
        time.sleep(policy.check_interval_seconds)
        if stopping.is_set():
            break
        try:
            cluster = Cluster(state_dir)
            if cluster.settings.supervised:
                supervise_once(cluster, policy)
        except Exception:  # one bad round (a settings file mid-write) must not end supervision
            log.exception("supervision round failed")
    log.info("supervisor stopping")


# What it serves on its metrics port.


class ProcessStates:
    """The supervisor's last reading of every other process, exposed at scrape time
    (prometheus_client's Collector protocol). Each reading is replaced whole, so a scrape
    never mixes two."""

    def __init__(self) -> None:
        self.reading: tuple[float, list[ProcessStatus]] | None = None

    def update(self, statuses: list[ProcessStatus], checked_seconds: float) -> None:
        self.reading = (checked_seconds, [status for status in statuses if status.role != ROLE])

    def collect(self) -> Iterable[Metric]:
        return process_state_families(self.reading)


def process_state_families(reading: tuple[float, list[ProcessStatus]] | None) -> list[Metric]:
    """The exposition. Every state of every process is there (1 for the one it is in, 0 for the
    others), so a query for one state reads 0, not "no data". Before the first reading only
    the time is, at 0. Process names come from the cluster's own settings, never a caller."""
    from deploy.cluster import PROCESS_STATES

    checked_seconds, statuses = reading or (0.0, [])
    state = GaugeMetricFamily(
        "corebank_process_state", "1 for the state each process of the cluster is in, 0 for the others", labels=["process", "role", "state"]
    )
    restarts = CounterMetricFamily("corebank_process_restarts", "Restarts of the process by the supervisor", labels=["process"])
    uptime = GaugeMetricFamily("corebank_process_uptime_seconds", "How long the process has run; 0 when it does not", labels=["process"])
    gave_up = GaugeMetricFamily(
        "corebank_supervisor_gave_up", "1 when the supervisor gave up restarting the process (its restart limit)", labels=["process"]
    )
    for status in statuses:
        for name in PROCESS_STATES:
            state.add_metric([status.name, status.role, name], 1 if status.state == name else 0)
        restarts.add_metric([status.name], status.restarts)
        uptime.add_metric([status.name], status.uptime_seconds or 0)
        gave_up.add_metric([status.name], int(status.gave_up))
    checked = GaugeMetricFamily(
        "corebank_supervisor_last_check_timestamp_seconds", "When the supervisor last read every process's state", value=checked_seconds
    )
    return [state, restarts, uptime, gave_up, checked]


@dataclasses.dataclass(frozen=True)
class Supervisor(processes.PidFileProcess):
    """The supervisor process of one state folder, as a cluster component."""

    state_dir: pathlib.Path
    policy: RestartPolicy
    port: int  # its metrics
    log_path: pathlib.Path  # its JSON log, which it rotates itself
    pid_path: pathlib.Path

    name = "supervisor"

    @property
    def endpoint(self) -> str:
        return f"{HOST}:{self.port}"

    @property
    def stderr_path(self) -> pathlib.Path:
        """What it cannot log as JSON (a crash before its logging starts), as for the services."""
        return self.log_path.with_suffix(".stderr.log")

    def log_paths(self) -> list[pathlib.Path]:
        return [self.stderr_path, self.log_path]

    def _markers(self) -> list[str]:
        return [SUPERVISOR_MODULE, str(self.state_dir)]

    def is_healthy(self) -> bool:
        pid = self.pid()
        return pid is not None and not processes.is_stopped(pid) and metrics_answer(self.endpoint)

    def start(self) -> None:
        if not self.is_running():
            argv = [
                sys.executable, "-m", SUPERVISOR_MODULE, "--state-dir", str(self.state_dir), "--metrics-listen", self.endpoint,
                "--log-file", str(self.log_path), *self.policy.arguments(),
            ]  # fmt: skip
            processes.spawn_detached(argv, self.stderr_path, self.pid_path, env=processes.python_environment(), cwd=processes.REPO_DIR)
        processes.wait_until(self.is_healthy, START_TIMEOUT_SECONDS, "supervisor health", give_up=self._died)


def main(argv: list[str] | None = None) -> int:
    from services.observability import build_info, logs

    parser = argparse.ArgumentParser(prog=f"python -m {SUPERVISOR_MODULE}", description=__doc__.split("\n\n")[0])
    parser.add_argument("--state-dir", required=True, type=pathlib.Path)
    parser.add_argument("--metrics-listen", required=True, help="HOST:PORT of its /metrics")
    parser.add_argument("--log-file", type=pathlib.Path, help="JSON log, rotated by size (default: standard error)")
    parser.add_argument("--restarts-max", type=int, default=RESTARTS_MAX)
    parser.add_argument("--window-seconds", type=float, default=RESTART_WINDOW_SECONDS)
    parser.add_argument("--check-interval-seconds", type=float, default=CHECK_INTERVAL_SECONDS)
    args = parser.parse_args(argv)
    logs.configure(ROLE, args.log_file)
    policy = RestartPolicy(args.restarts_max, args.window_seconds, args.check_interval_seconds)
    states = ProcessStates()
    metrics_host, metrics_port = args.metrics_listen.rsplit(":", 1)
    # No `_created` series beside every counter, as in the services.
    prometheus_client.disable_created_metrics()
    prometheus_client.REGISTRY.register(states)
    build_info.record(ROLE)
    read_states(args.state_dir.absolute(), states)
    prometheus_client.start_http_server(int(metrics_port), addr=metrics_host)
    stopping = threading.Event()
    # SIGTERM (`make down`) ends the wait between rounds; a restart under way is finished first.
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    signal.signal(signal.SIGINT, lambda *_: stopping.set())
    run(args.state_dir.absolute(), policy, stopping, states)
    return 0


if __name__ == "__main__":
    sys.exit(main())
