"""Detached processes: start, find again by pid file, stop.

Every process the cluster starts outlives the command that started it, so it
is found again through a pid file. A pid alone is not proof: after a crash the
pid may belong to an unrelated process, so each check also reads
/proc/PID/cmdline and looks for markers only our process has (its data folder,
its port).
"""

from __future__ import annotations

import os
import pathlib
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence

POLL_INTERVAL_SECONDS = 0.1
LOG_TAIL_BYTES_MAX = 4000
# A file a process writes through its standard streams cannot be rotated while it runs (the
# process holds it open): at each start one past this bound is moved aside to NAME.1 (replacing
# the one there), so it holds at most what one run writes. Our Python processes rotate their own
# JSON log (services/observability/logs.py) and send only what it cannot hold to standard error.
STREAM_LOG_BYTES_MAX = 10 * 1024 * 1024
# SIGKILL cannot be caught, but the kernel still needs a moment to end the process.
KILL_WAIT_SECONDS_MAX = 5.0
CMDLINE_EMPTY_RETRIES_MAX = 20
CMDLINE_EMPTY_RETRY_DELAY_SECONDS = 0.005


def read_pid(pid_path: pathlib.Path) -> int | None:
    try:
        return int(pid_path.read_text().split()[0])
    except (FileNotFoundError, IndexError, ValueError):
        return None


def cmdline(pid: int) -> list[str] | None:
    """The argv of a live process, or None when it is gone or a zombie."""
    # Right after exec the kernel briefly shows an empty cmdline; kernel threads
    # always do. Retry a little, so a process we just started is not taken for dead.
    for _ in range(CMDLINE_EMPTY_RETRIES_MAX):
        try:
            stat = pathlib.Path(f"/proc/{pid}/stat").read_text()
            # The state letter follows the parenthesised command name, which may hold spaces.
            if stat[stat.rindex(")") + 2] in "ZX":
                return None
            raw = pathlib.Path(f"/proc/{pid}/cmdline").read_bytes()
        except (FileNotFoundError, ProcessLookupError, ValueError, IndexError):
            return None
        if raw:
            return [part.decode(errors="replace") for part in raw.split(b"\0") if part]
        time.sleep(CMDLINE_EMPTY_RETRY_DELAY_SECONDS)
    return []


def is_ours(pid: int | None, markers: Sequence[str]) -> bool:
    """True when `pid` is alive and every marker is one of its arguments.

    Whole arguments, not substrings: "grpc-1" must not match "grpc-10".
    """
    if pid is None or pid <= 0:
        return False
    argv = cmdline(pid)
    return argv is not None and set(markers) <= set(argv)


# The state letters of /proc/PID/stat that mean "stopped" (SIGSTOP, SIGTSTP; or by a tracer).
STOPPED_STATES = frozenset("Tt")


def _stat_fields(pid: int) -> list[str] | None:
    """/proc/PID/stat's fields from the state on (field 3 of proc(5) is index 0), or None when gone."""
    try:
        stat = pathlib.Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The state follows the parenthesised command name, which may hold spaces.
    return stat[stat.rindex(")") + 2 :].split()


def is_stopped(pid: int) -> bool:
    """Whether `pid` is frozen (SIGSTOP): alive, but it runs no more until SIGCONT."""
    fields = _stat_fields(pid)
    return fields is not None and fields[0] in STOPPED_STATES


def uptime_seconds(pid: int) -> float | None:
    """How long `pid` has run: its start time (proc(5) field 22, clock ticks after boot) against /proc/uptime."""
    fields = _stat_fields(pid)
    if fields is None:
        return None
    started_ticks = int(fields[22 - 3])
    since_boot_seconds = float(pathlib.Path("/proc/uptime").read_text().split()[0])
    return max(0.0, since_boot_seconds - started_ticks / os.sysconf("SC_CLK_TCK"))


def parent_pids() -> dict[int, int]:
    """pid -> parent pid of every process visible in /proc."""
    found = {}
    for stat_path in pathlib.Path("/proc").glob("[0-9]*/stat"):
        try:
            stat = stat_path.read_text()
            # Fields after the parenthesised command name (which may hold spaces): state, ppid, ...
            found[int(stat_path.parent.name)] = int(stat[stat.rindex(")") + 2 :].split()[1])
        except (FileNotFoundError, ProcessLookupError, ValueError, IndexError):
            continue  # gone between the listing and the read
    return found


def descendants(pid: int) -> list[int]:
    """Children, grandchildren, ... of `pid`, from one pass over /proc."""
    children_by_parent: dict[int, list[int]] = {}
    for child, parent in parent_pids().items():
        children_by_parent.setdefault(parent, []).append(child)
    found, frontier = [], [pid]
    while frontier:
        children = children_by_parent.get(frontier.pop(), [])
        found += children
        frontier += children
    return found


def reap(pid: int) -> None:
    """Collect the exit status if `pid` is our own child, so it leaves no zombie."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def spawn_detached(
    argv: Sequence[str],
    log_path: pathlib.Path,
    pid_path: pathlib.Path,
    env: dict[str, str] | None = None,
    cwd: pathlib.Path | None = None,
) -> int:
    """Start `argv` in its own session (so Ctrl-C on `make` does not reach it), its standard
    output and error appended to `log_path` (moved aside first when past STREAM_LOG_BYTES_MAX)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    pid_path.parent.mkdir(parents=True, exist_ok=True)
    rotate_stream_log(log_path)
    with open(log_path, "ab") as log_file:
        process = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=env,
            cwd=cwd,
        )
    pid_path.write_text(f"{process.pid}\n")
    return process.pid


def wait_until(
    condition: Callable[[], bool],
    timeout_seconds: float,
    what: str,
    give_up: Callable[[], str | None] = lambda: None,
) -> None:
    """Poll `condition` until true; raise TimeoutError after `timeout_seconds`.

    `give_up` returns a reason to stop early (the process died), else None.
    """
    deadline = time.monotonic() + timeout_seconds
    while True:
        if condition():
            return
        reason = give_up()
        if reason is not None:
            raise RuntimeError(f"{what}: {reason}")
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{what}: not done after {timeout_seconds:.0f}s")
        time.sleep(POLL_INTERVAL_SECONDS)


def terminate(pid: int, markers: Sequence[str], timeout_seconds: float) -> None:
    """SIGTERM, wait up to `timeout_seconds`, then SIGKILL."""
    if not is_ours(pid, markers):
        return
    os.kill(pid, signal.SIGTERM)
    try:
        wait_until(lambda: (reap(pid), not is_ours(pid, markers))[1], timeout_seconds, f"stop pid {pid}")
    except TimeoutError:
        kill(pid, markers)


def kill(pid: int, markers: Sequence[str], signal_number: int = signal.SIGKILL) -> None:
    if not is_ours(pid, markers):
        return
    try:
        os.kill(pid, signal_number)
    except ProcessLookupError:
        return
    if signal_number == signal.SIGKILL:
        deadline = time.monotonic() + KILL_WAIT_SECONDS_MAX
        while time.monotonic() < deadline:
            reap(pid)
            if not is_ours(pid, markers):
                return
            time.sleep(POLL_INTERVAL_SECONDS)


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on now, picked by the kernel (for processes of a test or a bench)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """Whether nothing listens on `port`.

    A plain bind fails against any listener, also one that set SO_REUSEPORT
    (gRPC does); SO_REUSEADDR only lets it past sockets in TIME_WAIT.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


def rotate_stream_log(log_path: pathlib.Path) -> None:
    """Move `log_path` to NAME.1 when it is past STREAM_LOG_BYTES_MAX (before a start)."""
    try:
        if log_path.stat().st_size > STREAM_LOG_BYTES_MAX:
            log_path.replace(log_path.with_name(log_path.name + ".1"))
    except FileNotFoundError:
        pass


def log_tail(log_path: pathlib.Path) -> str:
    try:
        with open(log_path, "rb") as log_file:
            log_file.seek(0, os.SEEK_END)
            size = log_file.tell()
            log_file.seek(max(0, size - LOG_TAIL_BYTES_MAX))
            return log_file.read().decode(errors="replace")
    except FileNotFoundError:
        return "(no log)"


class PidFileProcess:
    """A detached process we started, known by its pid file and cmdline markers.

    Subclasses provide `name`, `pid_path`, `log_path` and `_markers()`.
    """

    name: str
    pid_path: pathlib.Path
    log_path: pathlib.Path
    stop_timeout_seconds: float = 15

    def _markers(self) -> list[str]:
        raise NotImplementedError

    def pid(self) -> int | None:
        pid = read_pid(self.pid_path)
        return pid if is_ours(pid, self._markers()) else None

    def is_running(self) -> bool:
        return self.pid() is not None

    def _died(self) -> str | None:
        """None while running; else why it is gone, with the end of its logs (for wait_until's give_up)."""
        if self.is_running():
            return None
        return f"{self.name} exited; " + "\n".join(f"the end of {path}:\n{log_tail(path)}" for path in self.log_paths())

    def log_paths(self) -> list[pathlib.Path]:
        """The files that tell why the process ended."""
        return [self.log_path]

    def stop(self) -> None:
        pid = self.pid()
        if pid is not None:
            terminate(pid, self._markers(), self.stop_timeout_seconds)

    def kill(self, signal_number: int = signal.SIGKILL) -> None:
        pid = self.pid()
        if pid is not None:
            kill(pid, self._markers(), signal_number)


REPO_DIR = pathlib.Path(__file__).resolve().parent.parent


def python_environment() -> dict[str, str]:
    """Our environment for a `python -m` of the repo's code: it also works from a venv without
    `pip install -e .` (the generated code lives in protos/python)."""
    env = dict(os.environ)
    source_paths = [str(REPO_DIR), str(REPO_DIR / "protos" / "python")]
    env["PYTHONPATH"] = os.pathsep.join(source_paths + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env["PYTHONUNBUFFERED"] = "1"
    return env


class PythonModuleProcess(PidFileProcess):
    """A detached `python -m <module> <arguments>` of ours (gRPC workers, coordinators), named
    `<name_prefix>-<index>`, each with its own metrics port.

    Subclasses provide `module`, `name_prefix`, the fields `index` and `metrics_port`,
    `arguments()` and `is_healthy()`.
    """

    module: str
    name_prefix: str
    index: int
    metrics_port: int
    start_timeout_seconds: float = 60

    @property
    def name(self) -> str:
        return f"{self.name_prefix}-{self.index}"

    @property
    def metrics_endpoint(self) -> str:
        return f"127.0.0.1:{self.metrics_port}"

    def _markers(self) -> list[str]:
        return [self.module, self.name, self.metrics_endpoint]

    def arguments(self) -> list[str]:
        raise NotImplementedError

    def is_healthy(self) -> bool:
        raise NotImplementedError

    @property
    def stderr_path(self) -> pathlib.Path:
        """NAME.stderr.log, beside the JSON log the process writes and rotates itself (`log_path`):
        what it cannot log there (a crash before its logging starts, the gRPC C core's messages)."""
        return self.log_path.with_suffix(".stderr.log")

    def log_paths(self) -> list[pathlib.Path]:
        return [self.stderr_path, self.log_path]

    def spawn(self) -> None:
        """Start the process when not running; does not wait (see wait_healthy)."""
        if self.is_running():
            return
        argv = [sys.executable, "-m", self.module, *self.arguments(), "--log-file", str(self.log_path)]
        spawn_detached(argv, self.stderr_path, self.pid_path, env=python_environment(), cwd=REPO_DIR)

    def wait_healthy(self, timeout_seconds: float | None = None) -> None:
        wait_until(self.is_healthy, timeout_seconds or self.start_timeout_seconds, f"{self.name} health", give_up=self._died)

    def start(self) -> None:
        self.spawn()
        self.wait_healthy()
