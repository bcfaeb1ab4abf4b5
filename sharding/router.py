"""Route an id to the shard that owns it, following the shard map in etcd.

The router knows nothing of what a shard holds: the composition root gives it
functions that open and close a per-shard handle (a store with its pool).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

from sharding.shard_map import Shard, ShardMap

Handle = TypeVar("Handle")
log = logging.getLogger(__name__)


class ShardRouter(Generic[Handle]):
    def __init__(
        self,
        open_shard: Callable[[Shard], Awaitable[Handle]],
        close_shard: Callable[[Handle], Awaitable[None]],
    ) -> None:
        self._open_shard = open_shard
        self._close_shard = close_shard
        self.shard_map: ShardMap | None = None
        self._handles: dict[str, tuple[Shard, Handle]] = {}

    async def apply(self, shard_map: ShardMap) -> None:
        """Adopt a new map: open handles for new or changed shards, then close the old ones."""
        if shard_map == self.shard_map:
            return  # the watch re-reads the map after every reconnect
        if self.shard_map is not None and shard_map.version < self.shard_map.version:
            log.warning("ignoring shard map version %d older than %d", shard_map.version, self.shard_map.version)
            return
        handles = {}
        retired = []
        for shard in shard_map.shards:
            current = self._handles.get(shard.name)
            if current is not None and current[0] == shard:
                handles[shard.name] = current
            else:
                handles[shard.name] = (shard, await self._open_shard(shard))
                if current is not None:
                    retired.append(current[1])
        retired += [handle for name, (_, handle) in self._handles.items() if name not in handles]
        # Swap map and handles together: no request sees one without the other.
        self.shard_map, self._handles = shard_map, handles
        for handle in retired:
            await self._close_shard(handle)
        log.info("shard map version %d in force (%d shards)", shard_map.version, len(handles))

    def shard_name_for(self, key: str) -> str:
        assert self.shard_map is not None, "router used before a shard map was applied"
        return self.shard_map.shard_name_for_key(key)

    def handle_for(self, key: str) -> Handle:
        return self._handles[self.shard_name_for(key)][1]

    def handle(self, shard_name: str) -> Handle:
        return self._handles[shard_name][1]

    def handles(self) -> list[Handle]:
        return [handle for _, handle in self._handles.values()]

    async def close(self) -> None:
        for _, handle in self._handles.values():
            await self._close_shard(handle)
        self._handles = {}
