"""Who owns each account, and its kind: what authorisation asks of the accounts a caller names;
and the participant it belongs to: what clearing asks of a transfer's payee before it begins.

An account's owner_id, kind and participant_id never change once it is opened, and accounts are never
deleted, so a cached answer stays exact without any invalidation: this per-process cache is
filled on first use and never asked to forget. "Not found" is never cached (the account
may be opened a moment later). Bounded: at most OWNERSHIPS_MAX entries, the oldest dropped
first (a dropped one is only looked up again). Per process: each gRPC worker fills its own.
"""

from __future__ import annotations

import asyncio

from services.ledger import errors
from services.ledger.authorization import AccountOwnership
from services.storage.shard_store import ShardStore
from sharding.router import ShardRouter

# Accounts remembered per process: about 300 bytes each (id, owner, a dict slot), so at most
# about 30 MB. A miss costs one indexed read on the account's shard.
OWNERSHIPS_MAX = 100_000
# When full, the oldest tenth is forgotten at once.
EVICTION_SHARE = 0.1


class AccountOwners:
    def __init__(self, router: ShardRouter[ShardStore], ownerships_max: int = OWNERSHIPS_MAX) -> None:
        assert ownerships_max >= 1
        self.router = router
        self.ownerships_max = ownerships_max
        self._known: dict[str, AccountOwnership] = {}
        # account_id -> participant_id, filled by the same reads (and bounded the same way).
        self._participants: dict[str, str] = {}

    def __len__(self) -> int:
        return len(self._known)

    def remember(self, account_id: str, ownership: AccountOwnership, participant_id: str | None = None) -> None:
        """Keep what a read of the account found anyway (GetAccount), so no lookup follows."""
        if participant_id is not None and account_id not in self._participants:
            if len(self._participants) >= self.ownerships_max:
                self._participants = dict(list(self._participants.items())[max(1, int(self.ownerships_max * EVICTION_SHARE)):])
            self._participants[account_id] = participant_id
        if account_id in self._known:
            return
        if len(self._known) >= self.ownerships_max:
            # The oldest share dropped at once, into a new table: a dict finds its first live entry by
            # scanning past every one deleted before it, so one deletion from the front per insert
            # would cost O(n) each; this costs O(1 / EVICTION_SHARE) per insert on average.
            kept = list(self._known.items())[max(1, int(self.ownerships_max * EVICTION_SHARE)):]
            self._known = dict(kept)
        self._known[account_id] = ownership

    async def of(self, account_id: str, timeout_seconds: float) -> AccountOwnership | None:
        """The account's owner and kind; None if it does not exist. Raises if its shard does not answer."""
        known = self._known.get(account_id)
        if known is not None:
            return known
        found = await self.of_many([account_id], timeout_seconds)
        answer = found.get(account_id)
        if isinstance(answer, errors.LedgerError):
            raise answer
        return answer

    async def of_many(self, account_ids: list[str], timeout_seconds: float) -> dict[str, AccountOwnership | None | errors.LedgerError]:
        """Each account's owner and kind, None if it does not exist, or the error of a shard that
        did not answer: one read per shard for all the accounts not known yet, the shards at once."""
        answers: dict[str, AccountOwnership | None | errors.LedgerError] = {}
        by_shard: dict[str, list[str]] = {}
        for account_id in account_ids:
            known = self._known.get(account_id)
            if known is not None:
                answers[account_id] = known
            elif account_id not in answers:
                answers[account_id] = None
                by_shard.setdefault(self.router.shard_name_for(account_id), []).append(account_id)

        async def look_up(shard_name: str, shard_account_ids: list[str]) -> None:
            try:
                rows = await self.router.handle(shard_name).get_owners(shard_account_ids, timeout_seconds)
            except errors.LedgerError as error:
                for account_id in shard_account_ids:
                    answers[account_id] = error
                return
            for account_id, owner_id, kind, *participant in rows:
                ownership = AccountOwnership(owner_id, kind)
                self.remember(account_id, ownership, *participant)
                answers[account_id] = ownership

        if len(by_shard) == 1:  # one account, or all on one shard: no task for one coroutine
            await look_up(*next(iter(by_shard.items())))
        elif by_shard:
            await asyncio.gather(*(look_up(shard_name, ids) for shard_name, ids in by_shard.items()))
        return answers

    async def participants_of(self, account_ids: list[str], timeout_seconds: float) -> dict[str, str | None]:
        """Each account's participant, None if the account does not exist. Raises if a shard does
        not answer (a transfer must not go on uncleared for want of its payee)."""
        unknown = list(dict.fromkeys(account_id for account_id in account_ids if account_id not in self._participants))
        if unknown:
            await self._read_participants(unknown, timeout_seconds)
        return {account_id: self._participants.get(account_id) for account_id in account_ids}

    async def _read_participants(self, account_ids: list[str], timeout_seconds: float) -> None:
        """One read per shard for the accounts not known yet (it fills their ownerships too)."""
        by_shard: dict[str, list[str]] = {}
        for account_id in account_ids:
            by_shard.setdefault(self.router.shard_name_for(account_id), []).append(account_id)

        async def look_up(shard_name: str, shard_account_ids: list[str]) -> None:
            rows = await self.router.handle(shard_name).get_owners(shard_account_ids, timeout_seconds)
            for account_id, owner_id, kind, *participant in rows:
                self.remember(account_id, AccountOwnership(owner_id, kind), *participant)

        if len(by_shard) == 1:
            await look_up(*next(iter(by_shard.items())))
        else:
            await asyncio.gather(*(look_up(shard_name, ids) for shard_name, ids in by_shard.items()))
