"""Cluster settings and pid checks, without starting anything."""

from __future__ import annotations

import logging
import os
import pathlib

import pytest

from deploy import processes
from deploy.cluster import DEFAULT_GRPC_WORKERS, Cluster, Settings, choose_settings
from deploy.grpc_worker import GrpcWorker


def test_first_start_takes_the_requested_settings_or_the_defaults() -> None:
    assert choose_settings(None, None, None, None) == Settings(shard_count=3, port_base=7100, grpc_workers=DEFAULT_GRPC_WORKERS)
    assert choose_settings(None, 2, 17300, 4) == Settings(shard_count=2, port_base=17300, grpc_workers=4)


def test_stored_shards_and_ports_win_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    stored = Settings(shard_count=3, port_base=7100, grpc_workers=1)

    with caplog.at_level(logging.WARNING):
        chosen = choose_settings(stored, 5, 9000, None)

    assert chosen == stored
    assert "ignoring SHARDS=5" in caplog.text
    assert "ignoring COREBANK_PORT_BASE=9000" in caplog.text


def test_grpc_workers_may_change_on_a_later_up() -> None:
    stored = Settings(shard_count=3, port_base=7100, grpc_workers=1)

    assert choose_settings(stored, None, None, 3).grpc_workers == 3


def test_coordinators_take_their_own_metrics_ports_and_may_change_on_a_later_up(tmp_path: pathlib.Path) -> None:
    stored = Settings(shard_count=3, port_base=7100, grpc_workers=2, coordinators=2)
    assert choose_settings(stored, None, None, None, 0).coordinators == 0
    assert choose_settings(stored, None, None, None).coordinators == 2
    with pytest.raises(ValueError):
        Settings(shard_count=3, port_base=7100, grpc_workers=2, coordinators=81)  # would reach the shards' ports

    cluster = Cluster(tmp_path, shard_count=2, port_base=17300, grpc_workers=2, coordinators=2)
    assert [c.metrics_endpoint for c in (cluster.coordinator(0), cluster.coordinator(1))] == ["127.0.0.1:17320", "127.0.0.1:17321"]


def test_settings_written_before_coordinators_existed_still_load(tmp_path: pathlib.Path) -> None:
    (tmp_path / "cluster-settings.json").write_text('{"shard_count": 2, "port_base": 17300, "grpc_workers": 1}')
    assert Settings.load(tmp_path / "cluster-settings.json") == Settings(shard_count=2, port_base=17300, grpc_workers=1)


def test_settings_outside_the_port_plan_are_refused() -> None:
    with pytest.raises(ValueError):
        Settings(shard_count=3, port_base=7100, grpc_workers=95)  # metrics would reach the shards' ports
    with pytest.raises(ValueError):
        Settings(shard_count=0, port_base=7100, grpc_workers=1)
    with pytest.raises(ValueError):
        Settings(shard_count=3, port_base=65500, grpc_workers=1)


def test_a_cluster_reads_its_stored_settings(tmp_path: pathlib.Path) -> None:
    Settings(shard_count=2, port_base=17300, grpc_workers=2).save(tmp_path / "cluster-settings.json")

    cluster = Cluster(tmp_path)

    assert [shard.port for shard in cluster.shards] == [17400, 17401]
    assert [worker.metrics_endpoint for worker in cluster.grpc_workers] == ["127.0.0.1:17310", "127.0.0.1:17311"]
    assert cluster.etcd.endpoint == "127.0.0.1:17301"


def test_a_reused_pid_is_not_taken_for_our_process(tmp_path: pathlib.Path) -> None:
    # This pytest process stands in for an unrelated process that got the pid of a dead worker.
    worker = GrpcWorker(0, 17300, 17310, "127.0.0.1:17301", tmp_path / "grpc-0.log", tmp_path / "grpc-0.pid", tmp_path / "auth")
    worker.pid_path.write_text(f"{os.getpid()}\n")

    assert worker.pid() is None
    assert processes.is_ours(os.getpid(), []) is True


def test_missing_or_garbled_pid_files_mean_not_running(tmp_path: pathlib.Path) -> None:
    assert processes.read_pid(tmp_path / "absent.pid") is None
    (tmp_path / "garbled.pid").write_text("not a pid\n")
    assert processes.read_pid(tmp_path / "garbled.pid") is None
    assert processes.is_ours(None, []) is False
