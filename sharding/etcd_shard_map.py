"""The shard map's home in etcd: bootstrap once, load, and watch for new versions."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import aetcd

from sharding.shard_map import ShardMap

SHARD_MAP_KEY = b"/corebank/shard_map"
WATCH_RETRY_DELAY_SECONDS_MAX = 5.0
ETCD_CALL_TIMEOUT_SECONDS = 5

log = logging.getLogger(__name__)


def etcd_client(endpoint: str) -> aetcd.Client:
    host, port = endpoint.rsplit(":", 1)
    return aetcd.Client(host=host, port=int(port), timeout=ETCD_CALL_TIMEOUT_SECONDS)


async def bootstrap(client: aetcd.Client, proposed: ShardMap) -> ShardMap:
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


async def load(client: aetcd.Client) -> ShardMap | None:
    stored = await client.get(SHARD_MAP_KEY)
    return ShardMap.from_json(stored.value) if stored is not None else None


async def publish(client: aetcd.Client, shard_map: ShardMap) -> None:
    """Replace the map (operators and tests); versions must only grow."""
    current = await load(client)
    if current is not None and shard_map.version <= current.version:
        raise ValueError(f"shard map version {shard_map.version} is not newer than {current.version}")
    await client.put(SHARD_MAP_KEY, shard_map.to_json().encode())


def _ignore_connection(connected: bool) -> None:
    pass


async def watch(
    client: aetcd.Client, on_change: Callable[[ShardMap], Awaitable[None]],
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
