"""corebank_build_info: what is running, in every process (gRPC workers and coordinators alike)."""

from __future__ import annotations

import importlib.metadata
import pathlib
import platform
import tomllib

from prometheus_client import Gauge

DISTRIBUTION = "corebank"
UNKNOWN_VERSION = "unknown"
_PYPROJECT = pathlib.Path(__file__).resolve().parents[2] / "pyproject.toml"

BUILD_INFO = Gauge("corebank_build_info", "What is running: always 1, the facts are its labels", ["version", "python", "role"])


def version() -> str:
    """The installed corebank's version; from the source tree's pyproject.toml when it is not installed."""
    try:
        return importlib.metadata.version(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        pass
    try:
        return tomllib.loads(_PYPROJECT.read_text())["project"]["version"]
    except (OSError, KeyError, tomllib.TOMLDecodeError):
        return UNKNOWN_VERSION


def record(role: str) -> None:
    """Call once at start with the process's role (`grpc`, `coordinator`)."""
    BUILD_INFO.labels(version(), platform.python_version(), role).set(1)
