"""The gRPC server workers (`python -m services.server`).

Workers share one gRPC port through SO_REUSEPORT (gRPC's default) and each has
its own metrics port. The kernel picks the worker for each new connection, so
the gRPC health check on the shared port cannot aim at one worker; the
per-worker metrics endpoint is what shows that each worker is up.
"""

from __future__ import annotations

import dataclasses
import pathlib
import urllib.request

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from deploy import processes

HOST = "127.0.0.1"
SERVER_MODULE = "services.server"
HEALTH_TIMEOUT_SECONDS = 2
# The client certificate `make up` and `make status` probe health with.
PROBE_CERTIFICATE = "deploy"


def probe_credentials(auth_dir: pathlib.Path) -> grpc.ChannelCredentials:
    """TLS with the deploy tool's own client certificate: health checks need no token."""
    from services.auth import pki
    from services.auth.client import ClientTls

    authority = pki.CertificateAuthority(auth_dir)
    paths = authority.paths(PROBE_CERTIFICATE)
    return ClientTls.from_paths(authority.cert_path, paths.cert, paths.key).credentials()


def grpc_is_serving(endpoint: str, auth_dir: pathlib.Path, timeout_seconds: float = HEALTH_TIMEOUT_SECONDS) -> bool:
    """grpc.health.v1 Check for the whole server (service "") answers SERVING, over mTLS."""
    with grpc.secure_channel(endpoint, probe_credentials(auth_dir)) as channel:
        try:
            response = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=timeout_seconds
            )
        except grpc.RpcError:
            return False
    return response.status == health_pb2.HealthCheckResponse.SERVING


def metrics_answer(endpoint: str, timeout_seconds: float = HEALTH_TIMEOUT_SECONDS) -> bool:
    try:
        with urllib.request.urlopen(f"http://{endpoint}/metrics", timeout=timeout_seconds) as response:  # nosec B310 # a literal http:// URL to a cluster endpoint
            return response.status == 200
    except (OSError, ValueError):
        return False


@dataclasses.dataclass(frozen=True)
class GrpcWorker(processes.PythonModuleProcess):
    index: int
    grpc_port: int
    metrics_port: int
    etcd_endpoint: str
    log_path: pathlib.Path
    pid_path: pathlib.Path
    auth_dir: pathlib.Path

    module = SERVER_MODULE
    name_prefix = "grpc"

    @property
    def endpoint(self) -> str:
        return f"{HOST}:{self.grpc_port}"


    def is_healthy(self) -> bool:
        return self.is_running() and metrics_answer(self.metrics_endpoint) and grpc_is_serving(self.endpoint, self.auth_dir)

    def arguments(self) -> list[str]:
        return [
            "--listen", self.endpoint,
            "--metrics-listen", self.metrics_endpoint,
            "--etcd", self.etcd_endpoint,
            "--process-name", self.name,
            "--auth-dir", str(self.auth_dir),
            "--certificate", self.name,
        ]  # fmt: skip
