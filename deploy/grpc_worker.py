"""The gRPC server workers (`python -m services.server`).

Workers share one gRPC port through SO_REUSEPORT (gRPC's default) and each has
its own metrics port. The kernel picks the worker for each new connection, so
the gRPC health check on the shared port cannot aim at one worker; the
per-worker metrics endpoint is what shows that each worker is up.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import sys
import urllib.request

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from deploy import processes

HOST = "127.0.0.1"
SERVER_MODULE = "services.server"
START_TIMEOUT_SECONDS = 60
HEALTH_TIMEOUT_SECONDS = 2

REPO_DIR = pathlib.Path(__file__).resolve().parent.parent


def grpc_is_serving(endpoint: str, timeout_seconds: float = HEALTH_TIMEOUT_SECONDS) -> bool:
    """grpc.health.v1 Check for the whole server (service "") answers SERVING."""
    with grpc.insecure_channel(endpoint) as channel:
        try:
            response = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=timeout_seconds
            )
        except grpc.RpcError:
            return False
    return response.status == health_pb2.HealthCheckResponse.SERVING


def metrics_answer(endpoint: str, timeout_seconds: float = HEALTH_TIMEOUT_SECONDS) -> bool:
    try:
        with urllib.request.urlopen(f"http://{endpoint}/metrics", timeout=timeout_seconds) as response:
            return response.status == 200
    except (OSError, ValueError):
        return False


@dataclasses.dataclass(frozen=True)
class GrpcWorker(processes.PidFileProcess):
    index: int
    grpc_port: int
    metrics_port: int
    etcd_endpoint: str
    log_path: pathlib.Path
    pid_path: pathlib.Path

    @property
    def name(self) -> str:
        return f"grpc-{self.index}"

    @property
    def endpoint(self) -> str:
        return f"{HOST}:{self.grpc_port}"

    @property
    def metrics_endpoint(self) -> str:
        return f"{HOST}:{self.metrics_port}"

    def _markers(self) -> list[str]:
        return [SERVER_MODULE, self.name, self.metrics_endpoint]

    def is_healthy(self) -> bool:
        return self.is_running() and metrics_answer(self.metrics_endpoint) and grpc_is_serving(self.endpoint)

    def spawn(self) -> None:
        """Start the process when not running; does not wait (see wait_healthy)."""
        if self.is_running():
            return
        argv = [
            sys.executable, "-m", SERVER_MODULE,
            "--listen", self.endpoint,
            "--metrics-listen", self.metrics_endpoint,
            "--etcd", self.etcd_endpoint,
            "--process-name", self.name,
        ]  # fmt: skip
        env = dict(os.environ)
        # Also works from a venv without `pip install -e .` (the generated code
        # lives in protos/python).
        source_paths = [str(REPO_DIR), str(REPO_DIR / "protos" / "python")]
        env["PYTHONPATH"] = os.pathsep.join(source_paths + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
        env["PYTHONUNBUFFERED"] = "1"
        processes.spawn_detached(argv, self.log_path, self.pid_path, env=env, cwd=REPO_DIR)

    def wait_healthy(self, timeout_seconds: float = START_TIMEOUT_SECONDS) -> None:
        processes.wait_until(self.is_healthy, timeout_seconds, f"{self.name} health", give_up=self._died)

    def start(self) -> None:
        self.spawn()
        self.wait_healthy()
