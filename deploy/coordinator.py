"""The TCC coordinator processes (`python -m services.coordinator`).

They recover in-doubt transfers between shards and sweep collecting merchants'
sub-accounts (services/coordinator/recovery.py). Each has its own
metrics port, which is also how we tell that it is up: it serves no gRPC.
"""

from __future__ import annotations

import dataclasses
import pathlib

from deploy import processes
from deploy.grpc_worker import metrics_answer

COORDINATOR_MODULE = "services.coordinator"


@dataclasses.dataclass(frozen=True)
class Coordinator(processes.PythonModuleProcess):
    index: int
    metrics_port: int
    etcd_endpoint: str
    log_path: pathlib.Path
    pid_path: pathlib.Path
    # The auditor role's passfile: the periodic invariant audit reads as that role (SELECT only).
    audit_passfile: pathlib.Path | None = None

    module = COORDINATOR_MODULE
    name_prefix = "coordinator"

    @property
    def endpoint(self) -> str:
        return self.metrics_endpoint

    def is_healthy(self) -> bool:
        return self.is_running() and metrics_answer(self.metrics_endpoint)

    def arguments(self) -> list[str]:
        return [
            "--etcd", self.etcd_endpoint,
            "--metrics-listen", self.metrics_endpoint,
            "--process-name", self.name,
            *(["--audit-passfile", str(self.audit_passfile)] if self.audit_passfile else []),
        ]  # fmt: skip
