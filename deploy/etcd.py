"""One single-member etcd: it holds the shard map."""

from __future__ import annotations

import dataclasses
import json
import pathlib
import shutil
import urllib.request

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
        try:
            with urllib.request.urlopen(f"http://{self.endpoint}/health", timeout=HEALTH_TIMEOUT_SECONDS) as response:  # nosec B310 # a literal http:// URL to a cluster endpoint
                return json.loads(response.read()).get("health") == "true"
        except (OSError, ValueError):
            return False

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
