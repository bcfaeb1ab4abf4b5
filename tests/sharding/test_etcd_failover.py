"""The shard map in a real three-member etcd cluster: load, publish and watch keep working
while one member is stopped (SIGSTOP: its TCP connections stay open and silent) or killed.

The cluster is started here from /usr/bin/etcd (deploy/etcd.py starts one member the same
way); ports from COREBANK_TEST_PORT_BASE + ETCD_PORT_OFFSET, so that parallel runs on other
bases do not collide.
"""

from __future__ import annotations

import asyncio
import os
import pathlib
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator

import pytest

from deploy import etcd
from deploy.etcd import etcd_binary
from sharding import etcd_shard_map
from sharding.shard_map import Shard, ShardMap

MEMBER_COUNT = 3
HOST = "127.0.0.1"
PORT_BASE_ENV = "COREBANK_TEST_PORT_BASE"
DEFAULT_PORT_BASE = 22100
# Above the session cluster's ports (deploy/cluster.py uses the first hundred or so of a base).
ETCD_PORT_OFFSET = 400
START_TIMEOUT_SECONDS = 60
STOP_TIMEOUT_SECONDS = 10
# How long the watch may take to hear of a new version: a watch on a stopped member is found
# dead only by gRPC keepalive (etcd_shard_map.ETCD_KEEPALIVE_*), then made again elsewhere.
WATCH_FOLLOW_SECONDS_MAX = 90
POLL_INTERVAL_SECONDS = 0.1
PROPOSED_MAP = ShardMap.evenly([Shard(f"shard-{i}", f"host=127.0.0.1 port={5432 + i}") for i in range(3)])


class Member:
    """One etcd member process of the test's cluster."""

    def __init__(self, index: int, port_base: int, state_dir: pathlib.Path) -> None:
        self.name = f"member-{index}"
        self.client_port = port_base + 2 * index
        self.peer_port = port_base + 2 * index + 1
        self.data_dir = state_dir / self.name
        self.log_path = state_dir / f"{self.name}.log"
        self.process: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"{HOST}:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://{HOST}:{self.peer_port}"

    def start(self, initial_cluster: str) -> None:
        argv = [
            etcd_binary(), "--name", self.name, "--data-dir", str(self.data_dir),
            "--listen-client-urls", f"http://{self.endpoint}", "--advertise-client-urls", f"http://{self.endpoint}",
            "--listen-peer-urls", self.peer_url, "--initial-advertise-peer-urls", self.peer_url,
            "--initial-cluster", initial_cluster, "--initial-cluster-token", "corebank-h4-test",
            "--logger", "zap", "--log-outputs", "stderr",
        ]  # fmt: skip
        log_file = open(self.log_path, "ab")  # noqa: SIM115 (the child keeps it)
        self.process = subprocess.Popen(argv, stdout=log_file, stderr=log_file, stdin=subprocess.DEVNULL, start_new_session=True)
        log_file.close()

    def is_healthy(self) -> bool:
        return etcd.answers_healthy(self.endpoint)

    def signal(self, signal_number: int) -> None:
        assert self.process is not None and self.process.poll() is None, f"{self.name} is not running"
        os.kill(self.process.pid, signal_number)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGCONT)
            self.process.kill()
            self.process.wait(STOP_TIMEOUT_SECONDS)


def wait_until(condition, timeout_seconds: float, what: str) -> None:
    deadline = time.monotonic() + timeout_seconds
    while not condition():
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{what}: not within {timeout_seconds}s")
        time.sleep(POLL_INTERVAL_SECONDS)


class EtcdCluster:
    def __init__(self, members: list[Member]) -> None:
        self.members = members
        self.initial_cluster = ",".join(f"{member.name}={member.peer_url}" for member in members)

    @property
    def endpoints(self) -> str:
        return ",".join(member.endpoint for member in self.members)

    def member_at(self, endpoint: str) -> Member:
        return next(member for member in self.members if member.endpoint == endpoint)

    def wait_healthy(self) -> None:
        for member in self.members:
            wait_until(member.is_healthy, START_TIMEOUT_SECONDS, f"etcd {member.name} health")


@pytest.fixture(scope="module")
def etcd_cluster() -> Iterator[EtcdCluster]:
    port_base = int(os.environ.get(PORT_BASE_ENV) or DEFAULT_PORT_BASE) + ETCD_PORT_OFFSET
    state_dir = pathlib.Path(tempfile.mkdtemp(prefix="corebank-etcd3-"))
    cluster = EtcdCluster([Member(index, port_base, state_dir) for index in range(MEMBER_COUNT)])
    try:
        for member in cluster.members:
            member.start(cluster.initial_cluster)
        cluster.wait_healthy()
        yield cluster
    finally:
        for member in cluster.members:
            member.kill()
        shutil.rmtree(state_dir, ignore_errors=True)


def next_map(current: ShardMap) -> ShardMap:
    return ShardMap(version=current.version + 1, shards=current.shards, slot_ranges=current.slot_ranges)


async def follow_through_a_member_fault(cluster: EtcdCluster, fault: str) -> None:
    """Bootstrap, then watch; the fault hits the member the client (and so the watch) uses; a
    new version is published and loaded through the same client and heard by the watch."""
    client = etcd_shard_map.etcd_client(cluster.endpoints)
    heard: asyncio.Queue[int] = asyncio.Queue()
    connections: list[bool] = []
    watching = asyncio.Event()

    def on_connection(connected: bool) -> None:
        connections.append(connected)
        if connected:
            watching.set()

    async def on_change(shard_map: ShardMap) -> None:
        await heard.put(shard_map.version)

    async def heard_version(version: int) -> None:
        async with asyncio.timeout(WATCH_FOLLOW_SECONDS_MAX):
            while await heard.get() != version:
                pass

    current = await etcd_shard_map.bootstrap(client, PROPOSED_MAP)
    watch_task = asyncio.create_task(etcd_shard_map.watch(client, on_change, on_connection))
    try:
        await heard_version(current.version)
        async with asyncio.timeout(WATCH_FOLLOW_SECONDS_MAX):
            await watching.wait()
        # The member the watch was made on: the fault must move the watch, not only the calls.
        faulty = cluster.member_at(client.current_endpoint)
        if fault == "stop":
            faulty.signal(signal.SIGSTOP)
        else:
            faulty.kill()
        try:
            published = next_map(current)
            await etcd_shard_map.publish(client, published)
            assert client.current_endpoint != faulty.endpoint
            loaded = await etcd_shard_map.load(client)
            assert loaded is not None and loaded.version == published.version
            await heard_version(published.version)
            # A second version while the member is still out: the watch made again elsewhere follows it too.
            again = next_map(published)
            await etcd_shard_map.publish(client, again)
            await heard_version(again.version)
            assert connections.count(True) >= 2, f"the watch was not made again on another member: {connections}"
            # A fresh client whose first member is the faulty one finds the map through the others.
            others_last = ",".join([faulty.endpoint, *(m.endpoint for m in cluster.members if m is not faulty)])
            fresh = etcd_shard_map.etcd_client(others_last)
            try:
                found = await etcd_shard_map.load(fresh)
                assert found is not None and found.version == again.version
            finally:
                await fresh.close()
        finally:
            if fault == "stop":
                faulty.signal(signal.SIGCONT)
            else:
                faulty.start(cluster.initial_cluster)
    finally:
        watch_task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await watch_task
        await client.close()
    await asyncio.to_thread(cluster.wait_healthy)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("fault", ["stop", "kill"])
def test_load_publish_and_watch_survive_one_member_fault(etcd_cluster: EtcdCluster, fault: str) -> None:
    asyncio.run(follow_through_a_member_fault(etcd_cluster, fault))


def test_one_endpoint_works_as_before(etcd_cluster: EtcdCluster) -> None:
    """A lone HOST:PORT (what every single-member cluster.json holds) is one member, as before."""

    async def run() -> None:
        client = etcd_shard_map.etcd_client(etcd_cluster.members[0].endpoint)
        try:
            assert client.endpoints == (etcd_cluster.members[0].endpoint,)
            assert client.member_timeout_seconds == etcd_shard_map.ETCD_CALL_TIMEOUT_SECONDS
            current = await etcd_shard_map.bootstrap(client, PROPOSED_MAP)
            await etcd_shard_map.publish(client, next_map(current))
            loaded = await etcd_shard_map.load(client)
            assert loaded is not None and loaded.version == current.version + 1
        finally:
            await client.close()

    asyncio.run(run())


def test_endpoints_are_parsed_and_checked() -> None:
    assert etcd_shard_map.parse_endpoints("127.0.0.1:1, 127.0.0.1:2,") == ("127.0.0.1:1", "127.0.0.1:2")
    assert etcd_shard_map.parse_endpoints(["h:1"]) == ("h:1",)
    assert etcd_shard_map.endpoints_of({"etcd_endpoint": "h:1", "etcd_endpoints": ["h:1", "h:2"]}) == "h:1,h:2"
    assert etcd_shard_map.endpoints_of({"etcd_endpoint": "h:1"}) == "h:1"
    for bad in ["", "host", "host:port", ":1"]:
        with pytest.raises(ValueError):
            etcd_shard_map.parse_endpoints(bad)
