"""The coordinator's production adapters behind its ports: PostgreSQL TCC stores over the
shard router, clearing accounts from the shard map. Used by the composition roots
(services/server.py, services/coordinator/__main__.py, operator.py)."""

from __future__ import annotations

from collections.abc import Callable

from services.coordinator.clearing import clearing_account_id
from services.coordinator.driver import TransferDriver
from services.ledger import errors
from services.ledger.limits import TierLimits
from services.storage.shard_store import ShardStore
from services.storage.tcc_store import TccStore
from sharding.router import ShardRouter


def tcc_for_shard(router: ShardRouter[ShardStore]) -> Callable[[str], TccStore]:
    """A shard name -> its TCC store; a name the shard map does not know is a permanent fault."""
    stores: dict[str, TccStore] = {}

    def tcc(shard_name: str) -> TccStore:
        try:
            handle = router.handle(shard_name)
        except KeyError:
            # A record names a shard the map no longer has: retrying cannot help.
            raise errors.InternalFault(f"no shard named {shard_name} in the shard map", shard=shard_name) from None
        cached = stores.get(shard_name)
        if cached is None or cached.store is not handle:  # a new map may have reopened the shard
            cached = stores[shard_name] = TccStore(handle)
        return cached

    return tcc


def shard_names(router: ShardRouter[ShardStore]) -> Callable[[], list[str]]:
    return lambda: [handle.shard_name for handle in router.handles()]


def transfer_driver(router: ShardRouter[ShardStore], limits: TierLimits, owner: str) -> TransferDriver:
    return TransferDriver(
        tcc_for_shard(router),
        router.shard_name_for,
        # The map is read at each call: it follows etcd.
        lambda shard_name, currency, transfer_id: clearing_account_id(router.shard_map, shard_name, currency, transfer_id),
        limits,
        owner,
    )
