"""The coordinator's production adapters behind its ports: PostgreSQL TCC stores over the
shard router, clearing accounts from the shard map. Used by the composition roots
(services/server.py, services/coordinator/__main__.py, operator.py)."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable

from services.coordinator.clearing import clearing_account_id
from services.coordinator.driver import TransferDriver
from services.group_commit import GroupCommitter
from services.ledger import errors
from services.ledger.limits import TierLimits
from services.storage.shard_store import ShardStore
from services.storage.tcc_store import BeginItem, BlockCreditItem, SettleCreditItem, SettleDebitItem, TccStore
from sharding.router import ShardRouter


class BatchingTccStore(TccStore):
    """A shard's TCC store whose branch operations, from all the transfers this process drives
    at once, share transactions: group commit per shard and phase (services/group_commit.py).
    Each transfer keeps its own barrier rows and outcome, and its own error: the list
    operations answer one outcome or LedgerError per item, as separate jobs would (the
    single-item operations, TccStore's, go through them). The other operations are TccStore's."""

    def __init__(self, store: ShardStore, limits: TierLimits) -> None:
        super().__init__(store)

        def committer(operation, admits: bool = False) -> GroupCommitter:
            async def post(tcc: TccStore, chains: list[list], limits: TierLimits, timeout_seconds: float) -> list[list]:
                return [[outcome] for outcome in await operation(tcc, [item for (item,) in chains], limits, timeout_seconds)]

            if admits:  # a transfer's first step: a full queue answers OVERLOADED, and nothing was done
                return GroupCommitter(self.shard_name, lambda: self, limits, post=post)
            # A later step of a transfer already begun is never refused for load: the drives in
            # flight (bounded by the service) bound its queue, and a refusal would end as a fault.
            return GroupCommitter(
                self.shard_name, lambda: self, limits, post=post, queue_transfers_max=math.inf, queue_wait_seconds_max=math.inf
            )

        self._begins = committer(TccStore.begin_many, admits=True)
        self._credit_settles = committer(TccStore.settle_credits)
        self._credit_blocks = committer(lambda tcc, items, limits, timeout: TccStore.block_credits(tcc, items, timeout))
        self._debit_settles = committer(lambda tcc, items, limits, timeout: TccStore.settle_debits(tcc, items, timeout))

    @staticmethod
    async def _each(committer: GroupCommitter, items: list, timeout_seconds: float) -> list:
        return await committer.submit_each(items, asyncio.get_running_loop().time() + timeout_seconds)

    async def begin_many(self, items: list[BeginItem], limits: TierLimits, timeout_seconds: float) -> list:
        return await self._each(self._begins, items, timeout_seconds)

    async def settle_credits(self, items: list[SettleCreditItem], limits: TierLimits, timeout_seconds: float) -> list:
        return await self._each(self._credit_settles, items, timeout_seconds)

    async def block_credits(self, items: list[BlockCreditItem], timeout_seconds: float) -> list:
        return await self._each(self._credit_blocks, items, timeout_seconds)

    async def settle_debits(self, items: list[SettleDebitItem], timeout_seconds: float) -> list:
        return await self._each(self._debit_settles, items, timeout_seconds)


def tcc_for_shard(router: ShardRouter[ShardStore], limits: TierLimits | None = None) -> Callable[[str], TccStore]:
    """A shard name -> its TCC store; a name the shard map does not know is a permanent fault.
    Given the tier limits (drivers need them), the stores batch branch operations (BatchingTccStore)."""
    stores: dict[str, TccStore] = {}

    def tcc(shard_name: str) -> TccStore:
        try:
            handle = router.handle(shard_name)
        except KeyError:
            # A record names a shard the map no longer has: retrying cannot help.
            raise errors.InternalFault(f"no shard named {shard_name} in the shard map", shard=shard_name) from None
        cached = stores.get(shard_name)
        if cached is None or cached.store is not handle:  # a new map may have reopened the shard
            cached = stores[shard_name] = TccStore(handle) if limits is None else BatchingTccStore(handle, limits)
        return cached

    return tcc


def shard_names(router: ShardRouter[ShardStore]) -> Callable[[], list[str]]:
    return lambda: [handle.shard_name for handle in router.handles()]


def transfer_driver(router: ShardRouter[ShardStore], limits: TierLimits, owner: str) -> TransferDriver:
    return TransferDriver(
        tcc_for_shard(router, limits),
        router.shard_name_for,
        # The map is read at each call: it follows etcd.
        lambda shard_name, currency, transfer_id: clearing_account_id(router.shard_map, shard_name, currency, transfer_id),
        limits,
        owner,
    )
