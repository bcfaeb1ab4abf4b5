"""Each shard's clearing (suspense) accounts: the local counterpart of a branch.

A transfer between shards debits the customer against the debit shard's
clearing account and credits the customer against the credit shard's, so each
shard balances on its own; across shards the clearing accounts net to zero.
Every cross-shard transfer on a shard updates a clearing row, so there are
several lanes per shard and currency to keep that row from being a hot spot.
A clearing account id must hash to its own shard like any account id: it is the
first of a numbered series that does.
"""

import functools

from services.ledger.ids import CLEARING_ACCOUNT_ID_PREFIX
from sharding.shard_map import ShardMap
from sharding.slots import slot_of

CLEARING_LANES = 8
CLEARING_ID_CANDIDATES_MAX = 100_000


def clearing_account_id(shard_map: ShardMap, shard_name: str, currency: str, transfer_id: str) -> str:
    return _clearing_account_id(shard_map, shard_name, currency, slot_of(transfer_id) % CLEARING_LANES)


@functools.lru_cache(maxsize=4096)
def _clearing_account_id(shard_map: ShardMap, shard_name: str, currency: str, lane: int) -> str:
    for number in range(CLEARING_ID_CANDIDATES_MAX):
        candidate = f"{CLEARING_ACCOUNT_ID_PREFIX}{currency.lower()}_{lane}_{number}"
        if shard_map.shard_name_for_key(candidate) == shard_name:
            return candidate
    raise AssertionError(f"no clearing account id hashes to {shard_name}")
