"""The shard map's home in etcd: bootstrap once, load, and watch for new versions.

etcd may run as several members (three in a highly available cluster). A client is given
them all, as one comma-separated string ("127.0.0.1:2379,127.0.0.1:2381,127.0.0.1:2383"), and
keeps working while any one of them is down, stopped or cut off from the others: each call
goes to one member and, when that member fails or does not answer in time, to the next
(EtcdClient). A single endpoint works as it always has.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, TypeVar

import aetcd
import aetcd.exceptions

from sharding.shard_map import ShardMap

SHARD_MAP_KEY = b"/corebank/shard_map"
WATCH_RETRY_DELAY_SECONDS_MAX = 5.0
# One etcd call, failover to a healthy member included (callers bound their calls by it).
ETCD_CALL_TIMEOUT_SECONDS = 5
# One member's share of a call when there are several: short enough that a stopped member
# (which accepts the TCP connection and never answers) leaves time for the next one within
# ETCD_CALL_TIMEOUT_SECONDS. A lone member keeps the whole ETCD_CALL_TIMEOUT_SECONDS.
ETCD_MEMBER_TIMEOUT_SECONDS = 2
# HTTP/2 keepalive pings on each member's channel: how a watch on a stopped member (whose TCP
# connection stays open and silent) is noticed and made again on another member. etcd answers
# pings sent more often than its --grpc-keepalive-min-time (5 s by default) with GOAWAY.
ETCD_KEEPALIVE_INTERVAL_SECONDS = 6
ETCD_KEEPALIVE_TIMEOUT_SECONDS = 3
ETCD_CHANNEL_OPTIONS = {
    "grpc.keepalive_time_ms": ETCD_KEEPALIVE_INTERVAL_SECONDS * 1000,
    "grpc.keepalive_timeout_ms": ETCD_KEEPALIVE_TIMEOUT_SECONDS * 1000,
    # gRPC stops pinging after two pings without data by default; a quiet watch sends none.
    "grpc.http2.max_pings_without_data": 0,
    # Each member client its own connections: gRPC otherwise shares them process-wide, and a new
    # client of a member that just came back would inherit the old one's reconnect backoff.
    "grpc.use_local_subchannel_pool": 1,
}
# etcd's "require leader" (clientv3.WithRequireLeader): a member cut off from the others
# refuses calls and closes its watch streams once it has no leader, instead of keeping
# a watch open that will never see another event.
REQUIRE_LEADER_METADATA = (("hasleader", "true"),)
# What a member that is down, stopped, partitioned or restarting gives: try the next one.
# Every other error (a refused compare, a bad argument) is the same on every member.
MEMBER_FAILURES = (
    aetcd.exceptions.ConnectionFailedError,
    aetcd.exceptions.ConnectionTimeoutError,
    aetcd.exceptions.WatchTimeoutError,
    TimeoutError,
)
ENDPOINT_SEPARATOR = ","

log = logging.getLogger(__name__)

Result = TypeVar("Result")


def parse_endpoints(endpoints: str | Sequence[str]) -> tuple[str, ...]:
    """ "HOST:PORT[,HOST:PORT...]" (or a list of HOST:PORT) as a tuple, in the given order."""
    items = endpoints.split(ENDPOINT_SEPARATOR) if isinstance(endpoints, str) else list(endpoints)
    parsed = tuple(item.strip() for item in items if item.strip())
    if not parsed:
        raise ValueError(f"no etcd endpoint in {endpoints!r}")
    for endpoint in parsed:
        host, separator, port = endpoint.rpartition(":")
        if not separator or not host or not port.isdigit():
            raise ValueError(f"etcd endpoint {endpoint!r} is not HOST:PORT")
    return parsed


def endpoints_of(description: dict) -> str:
    """The etcd members of a cluster.json, as one comma-separated string: its "etcd_endpoints"
    list when it has one, else its "etcd_endpoint" (one member, or several comma-separated)."""
    listed = description.get("etcd_endpoints")
    return ENDPOINT_SEPARATOR.join(listed) if listed else description["etcd_endpoint"]


class EtcdClient:
    """A client of an etcd cluster through any one of its members, moving on when one fails.

    aetcd.Client talks to one member. This keeps one at a time, for the member in use; a
    call that meets a member failure (MEMBER_FAILURES) drops that member's client and is
    sent again to the next member, each member tried at most once per call. Sending a call
    again is safe for what this module sends: reads, a put-if-absent transaction, and puts
    of a whole map whose version the watchers compare (the same put twice is one change).
    """

    def __init__(self, endpoints: Sequence[str]) -> None:
        self.endpoints = tuple(endpoints)
        self.member_timeout_seconds = ETCD_CALL_TIMEOUT_SECONDS if len(self.endpoints) == 1 else ETCD_MEMBER_TIMEOUT_SECONDS
        self._member_index = 0
        self._member: aetcd.Client | None = None
        # Members left for another, each with the task that closes it (see _drop).
        self._dropped: dict[aetcd.Client, asyncio.Task] = {}
        # The compare/put builders are plain data, the same for every member.
        self.transactions = aetcd.client.Transactions()

    @property
    def current_endpoint(self) -> str:
        """The member calls go to now (logs and tests)."""
        return self.endpoints[self._member_index]

    def _client(self) -> aetcd.Client:
        if self._member is None:
            host, port = self.current_endpoint.rsplit(":", 1)
            member = aetcd.Client(host=host, port=int(port), timeout=self.member_timeout_seconds, options=ETCD_CHANNEL_OPTIONS)
            # aetcd sends `metadata` with every call and on the watch stream; it sets it itself only to
            # carry an auth token, which corebank does not use.
            member.metadata = REQUIRE_LEADER_METADATA
            self._member = member
        return self._member

    async def _drop(self, member: aetcd.Client, error: BaseException) -> None:
        """Leave `member` for the next one, unless another call already did."""
        if self._member is not member:
            return
        failed_endpoint = self.current_endpoint
        self._member = None
        self._member_index = (self._member_index + 1) % len(self.endpoints)
        if len(self.endpoints) > 1:
            log.warning("etcd member %s failed (%s); going on with %s", failed_endpoint, str(error) or type(error).__name__, self.current_endpoint)
        # Closed only once the calls other tasks still have on it are over (each is bounded by
        # member_timeout_seconds): closing its channel now would cancel them, and a cancelled
        # call is not a member failure that sends them on to the next member.
        closing = asyncio.create_task(self._close_later(member))
        self._dropped[member] = closing
        closing.add_done_callback(lambda _: self._dropped.pop(member, None))

    async def _close_later(self, member: aetcd.Client) -> None:
        await asyncio.sleep(self.member_timeout_seconds)
        await self._close_member(member)

    async def _close_member(self, member: aetcd.Client) -> None:
        with contextlib.suppress(Exception):  # the member is gone or stuck: its channel is closed, whatever it says
            await asyncio.wait_for(member.close(), self.member_timeout_seconds)

    async def _call(self, operation: Callable[[aetcd.Client], Awaitable[Result]]) -> Result:
        for attempt in range(len(self.endpoints)):
            member = self._client()
            try:
                return await asyncio.wait_for(operation(member), self.member_timeout_seconds)
            except MEMBER_FAILURES as error:
                await self._drop(member, error)
                if attempt == len(self.endpoints) - 1:
                    raise
        raise AssertionError("unreachable: the last attempt returns or raises")

    async def get(self, key: bytes) -> Any:
        return await self._call(lambda member: member.get(key))

    async def put(self, key: bytes, value: bytes) -> Any:
        return await self._call(lambda member: member.put(key, value))

    async def transaction(self, compare: list, success: list | None = None, failure: list | None = None) -> Any:
        return await self._call(lambda member: member.transaction(compare=compare, success=success, failure=failure))

    async def watch(self, key: bytes, start_revision: int | None = None) -> AsyncIterator[Any]:
        """A watch made on one member; its events, until that member fails (then the error
        is raised, after the member is dropped: the next watch is made on another one)."""
        member = self._client()
        try:
            events = await member.watch(key, start_revision=start_revision)
        except MEMBER_FAILURES as error:
            await self._drop(member, error)
            raise
        return self._events(member, events)

    async def _events(self, member: aetcd.Client, events: Any) -> AsyncIterator[Any]:
        try:
            async for event in events:
                yield event
        except MEMBER_FAILURES as error:
            await self._drop(member, error)
            raise

    async def close(self) -> None:
        member, self._member = self._member, None
        if member is not None:
            await member.close()
        for dropped, closing in list(self._dropped.items()):
            closing.cancel()
            await self._close_member(dropped)


def etcd_client(endpoints: str | Sequence[str]) -> EtcdClient:
    """A client of the etcd members named by `endpoints` ("HOST:PORT[,HOST:PORT...]")."""
    return EtcdClient(parse_endpoints(endpoints))


async def bootstrap(client: EtcdClient, proposed: ShardMap) -> ShardMap:
    """Store `proposed` unless a map is already there; return the map in force.

    Put-if-absent in one etcd transaction, so two `make up` runs cannot both win.
    """
    await client.transaction(
        compare=[client.transactions.create(SHARD_MAP_KEY) == 0],
        success=[client.transactions.put(SHARD_MAP_KEY, proposed.to_json().encode())],
        failure=[],
    )
    current = await load(client)
    assert current is not None, "shard map vanished right after put-if-absent"
    return current


async def load(client: EtcdClient) -> ShardMap | None:
    stored = await client.get(SHARD_MAP_KEY)
    return ShardMap.from_json(stored.value) if stored is not None else None


async def publish(client: EtcdClient, shard_map: ShardMap) -> None:
    """Replace the map (operators and tests); versions must only grow."""
    current = await load(client)
    if current is not None and shard_map.version <= current.version:
        raise ValueError(f"shard map version {shard_map.version} is not newer than {current.version}")
    await client.put(SHARD_MAP_KEY, shard_map.to_json().encode())


def _ignore_connection(connected: bool) -> None:
    pass


async def watch(
    client: EtcdClient, on_change: Callable[[ShardMap], Awaitable[None]],
    on_connection: Callable[[bool], None] = _ignore_connection,
) -> None:
    """Call `on_change` with every new map, forever; reconnects with capped backoff.

    After a lost watch it re-reads the key, so a change made while etcd was out
    of reach is not missed. `on_connection` hears True once etcd has created the
    watch (aetcd's watch() returns only then), False when it is lost.
    """
    retry_delay_seconds = 0.1
    while True:
        connected = False
        try:
            current = await load(client)
            if current is not None:
                await on_change(current)
            stored = await client.get(SHARD_MAP_KEY)
            start_revision = stored.mod_revision + 1 if stored is not None else None
            events = await client.watch(SHARD_MAP_KEY, start_revision=start_revision)
            connected = True
            on_connection(True)
            async for event in events:
                retry_delay_seconds = 0.1
                if event.kind == "PUT":
                    await on_change(ShardMap.from_json(event.kv.value))
        except asyncio.CancelledError:
            if connected:
                on_connection(False)
            raise
        except Exception as error:  # etcd down or restarted: keep the last map, retry
            log.warning("shard map watch lost (%s); retrying in %.1fs", error, retry_delay_seconds)
        on_connection(False)
        await asyncio.sleep(retry_delay_seconds)
        retry_delay_seconds = min(retry_delay_seconds * 2, WATCH_RETRY_DELAY_SECONDS_MAX)
