"""etcd: it holds the shard map (and, TOPOLOGY=ha, Patroni's leader keys). One member in the
single topology (Etcd), three in the HA one (EtcdMember)."""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import shutil
import signal
import urllib.request
from collections.abc import Sequence

from deploy import processes

HOST = "127.0.0.1"
MEMBER_NAME = "corebank"
START_TIMEOUT_SECONDS = 30
HEALTH_TIMEOUT_SECONDS = 2


def etcd_binary() -> str:
    found = shutil.which("etcd")
    if found is None:
        raise FileNotFoundError("etcd not found on PATH; install it with `apt-get install etcd-server` (or run `make deps`)")
    return found


def answers_healthy(endpoint: str) -> bool:
    """etcd's /health says true: the member is up and a leader is elected."""
    try:
        with urllib.request.urlopen(f"http://{endpoint}/health", timeout=HEALTH_TIMEOUT_SECONDS) as response:  # nosec B310 # a literal http:// URL to a cluster endpoint
            return json.loads(response.read()).get("health") == "true"
    except (OSError, ValueError):
        return False


@dataclasses.dataclass(frozen=True)
class Etcd(processes.PidFileProcess):
    data_dir: pathlib.Path
    log_path: pathlib.Path
    pid_path: pathlib.Path
    client_port: int
    peer_port: int

    name = "etcd"

    @property
    def endpoint(self) -> str:
        return f"{HOST}:{self.client_port}"

    def _markers(self) -> list[str]:
        return [str(self.data_dir)]

    def is_healthy(self) -> bool:
        return answers_healthy(self.endpoint)

    def start(self) -> None:
        if not self.is_running():
            client_url = f"http://{self.endpoint}"
            peer_url = f"http://{HOST}:{self.peer_port}"
            argv = [
                etcd_binary(),
                "--name", MEMBER_NAME,
                "--data-dir", str(self.data_dir),
                "--listen-client-urls", client_url,
                "--advertise-client-urls", client_url,
                "--listen-peer-urls", peer_url,
                "--initial-advertise-peer-urls", peer_url,
                "--initial-cluster", f"{MEMBER_NAME}={peer_url}",
                # JSON lines (zap), like corebank's own logs, rather than capnslog's plain text; to
                # its standard error, which spawn_detached sends to etcd.log (never to journald).
                "--logger", "zap", "--log-outputs", "stderr",
            ]  # fmt: skip
            processes.spawn_detached(argv, self.log_path, self.pid_path)
        processes.wait_until(self.is_healthy, START_TIMEOUT_SECONDS, "etcd health", give_up=self._died)


@dataclasses.dataclass(frozen=True)
class EtcdMember(processes.PidFileProcess):
    """One member of a multi-member etcd (TOPOLOGY=ha: three, so that the shard map and Patroni's
    leader keys survive the loss of any one). `initial_cluster` names every member's peer URL.

    Spawned in a session of its own; `kill` signals the whole process group. `start()` takes an argv
    prefix (["ip", "netns", "exec", "h3"]) to run the member inside a network namespace, and does
    not wait: a member of a new cluster is healthy only once a quorum has started (wait_healthy).
    """

    name: str  # "etcd-0"
    data_dir: pathlib.Path
    log_path: pathlib.Path
    pid_path: pathlib.Path
    client_port: int
    peer_port: int
    initial_cluster: tuple[tuple[str, str], ...]  # (member name, peer URL) of every member
    host: str = HOST
    cluster_token: str = "corebank"

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://{self.host}:{self.peer_port}"

    def _markers(self) -> list[str]:
        return [str(self.data_dir)]

    def is_healthy(self) -> bool:
        """Answers /health with a leader elected (a quorum of members is up)."""
        return answers_healthy(self.endpoint)

    def argv(self) -> list[str]:
        client_url = f"http://{self.endpoint}"
        return [
            etcd_binary(),
            "--name", self.name,
            "--data-dir", str(self.data_dir),
            "--listen-client-urls", client_url,
            "--advertise-client-urls", client_url,
            "--listen-peer-urls", self.peer_url,
            "--initial-advertise-peer-urls", self.peer_url,
            "--initial-cluster", ",".join(f"{name}={url}" for name, url in self.initial_cluster),
            "--initial-cluster-state", "new",  # ignored once the data dir holds the cluster
            "--initial-cluster-token", self.cluster_token,
            "--logger", "zap", "--log-outputs", "stderr",
        ]  # fmt: skip

    def spawn(self, argv_prefix: Sequence[str] = ()) -> None:
        if not self.is_running():
            processes.spawn_detached([*argv_prefix, *self.argv()], self.log_path, self.pid_path)

    def wait_healthy(self, timeout_seconds: float = START_TIMEOUT_SECONDS) -> None:
        processes.wait_until(self.is_healthy, timeout_seconds, f"{self.name} health", give_up=self._died)

    def start(self, argv_prefix: Sequence[str] = ()) -> None:
        """Spawn and wait until healthy (the other members must be coming up too)."""
        self.spawn(argv_prefix)
        self.wait_healthy()

    def kill(self, signal_number: int = signal.SIGKILL) -> None:
        """The whole process group (spawn_detached made etcd its leader)."""
        pid = self.pid()
        if pid is None:
            return
        try:
            os.killpg(os.getpgid(pid), signal_number)
        except ProcessLookupError:
            return
        if signal_number == signal.SIGKILL:
            processes.wait_until(lambda: (processes.reap(pid), not self.is_running())[1], processes.KILL_WAIT_SECONDS_MAX, f"kill {self.name}")
