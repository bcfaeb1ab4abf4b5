"""Where a process's words go: its JSON log (rotated by the process), its standard error file
(moved aside at a start once past its bound), and both in the message of a start that fails."""

from __future__ import annotations

import json
import pathlib

import pytest

from deploy import processes
from deploy.grpc_worker import GrpcWorker


def test_a_worker_that_dies_at_start_says_why_from_both_of_its_logs(tmp_path: pathlib.Path):
    # No auth folder: the worker fails once its logging is set up, on reading its certificate.
    worker = GrpcWorker(
        0, processes.free_port(), processes.free_port(), "127.0.0.1:1", tmp_path / "logs" / "grpc-0.log",
        tmp_path / "run" / "grpc-0.pid", tmp_path / "absent-auth",
    )
    with pytest.raises(RuntimeError) as died:
        worker.start()
    message = str(died.value)
    assert f"the end of {worker.stderr_path}" in message and f"the end of {worker.log_path}" in message
    assert worker.stderr_path.name == "grpc-0.stderr.log"
    assert "FileNotFoundError" in processes.log_tail(worker.stderr_path)
    last = json.loads(worker.log_path.read_text().splitlines()[-1])
    assert (last["level"], last["process"]) == ("CRITICAL", "grpc-0")
    assert "FileNotFoundError" in last["exception"]


def test_a_stream_log_past_its_bound_is_moved_aside_at_the_next_start(tmp_path: pathlib.Path, monkeypatch):
    monkeypatch.setattr(processes, "STREAM_LOG_BYTES_MAX", 100)
    log_path, pid_path = tmp_path / "etcd.log", tmp_path / "etcd.pid"
    log_path.write_text("old run\n" * 20)
    started = [processes.spawn_detached(["sh", "-c", "echo new run"], log_path, pid_path)]
    processes.wait_until(lambda: log_path.read_text() == "new run\n", 10, "the new run's line")
    assert (tmp_path / "etcd.log.1").read_text() == "old run\n" * 20
    # Under the bound, a file is kept and appended to.
    started.append(processes.spawn_detached(["sh", "-c", "echo third run"], log_path, pid_path))
    processes.wait_until(lambda: log_path.read_text() == "new run\nthird run\n", 10, "the third run's line")
    for pid in started:
        processes.reap(pid)
