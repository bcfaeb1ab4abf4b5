"""Use cases: authorise the caller, route each request to its shard, apply idempotency, bound it
by the deadline.

No gRPC here: servicers translate messages, this layer speaks domain types. Every use case
a client can call takes the authenticated Caller first and, before anything is registered
or recorded, applies in turn: the caller's rate limit (services/ledger/rate_limits.py), what
its role may never do, the request's validation, the rules on the accounts it names
(services/ledger/authorization.py: the table is there, owners looked up through a
per-process cache, services/account_owners.py) and, for transfers, the debit accounts'
velocity limit. A refused call changes nothing in the ledger. The ledger's own work
(sweeps) is access.LEDGER's and is neither authorised nor limited.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import functools
import logging
import time
from collections.abc import Callable

from services import collection
from services.account_owners import AccountOwners
from services.api import metrics
from services.coordinator.driver import TransferDriver, outcome
from services.ledger.coordination import FINAL_STATES
from services.group_commit import GroupCommitter
from services.ledger import authorization, clearing, errors, ids, paging
from services.ledger.access import Caller
from services.ledger.accounts import Account, AccountStatus, OpenAccountRequest, check_status_change, closed_status
from services.ledger.authorization import AccountOwnership, Action
from services.ledger.limits import TierLimits
from services.ledger.rate_limits import RateLimiter, RateLimits
from services.ledger.transfers import Transfer, TransferRequest, linked_transfer_failed
from services.storage import id_registry
from services.storage.batch_posting import Outcome, post_chains
from services.storage.positions import PositionStore
from services.storage.id_registry import Registration, transfer_registration
from services.storage.shard_store import ShardStore
from services.storage.tcc_store import Begun, TccStore
from sharding.router import ShardRouter

log = logging.getLogger(__name__)

# When a client sends no deadline, no request holds a database connection longer than this.
REQUEST_TIMEOUT_SECONDS_MAX = 10.0
# The service stops a request's work this much before the client's deadline (a share of the
# time left, at most the maximum), so it answers DEADLINE_EXCEEDED itself and cleans up
# before gRPC cancels the call.
DEADLINE_MARGIN_SHARE = 0.05
DEADLINE_MARGIN_SECONDS_MAX = 0.1
CREATE_TRANSFERS_BATCH_SIZE_MAX = 5_000
# Transfers between shards in flight in this process; past it, new ones get OVERLOADED
# at once (same-shard transfers are bounded by their group-commit queues). A few
# kilobytes each (a task and its record).
CROSS_SHARD_IN_FLIGHT_MAX = 5_000
# Status changes (and sub-account openings) of collecting merchants in progress at once in
# a process. Each holds a connection to the merchant's shard and needs one more per shard:
# far below POOL_SIZE_MAX (16), so the pools always have room for them and for transfers.
COLLECTING_STATUS_CHANGES_MAX = 4
# After a collecting merchant's status change failed halfway, setting its sub-accounts back
# to its row's status gets this long (the request's own deadline has passed by then).
RESYNC_TIMEOUT_SECONDS = 2.0
# A retry of a transfer another process drives polls its record at most this long (a
# caller's own deadline is usually shorter); after that it is recovery's to finish.
WAIT_FOR_OTHER_DRIVER_SECONDS_MAX = 60.0
# At shutdown, in-flight drives get this long to finish; recovery takes over the rest.
DRAIN_SECONDS_MAX = 5.0
# Drives (and waits on another driver) that outlive the requests that started them: one
# per transfer id at most, and at most this many in the process. Past it, new transfers
# between shards get OVERLOADED; recovery finishes whatever a full process leaves.
DRIVES_IN_FLIGHT_MAX = 10_000
# The reference of a settlement account's movements (post_settlement_leg).
SETTLEMENT_REFERENCE = "settlement"
# A debit whose payer's share of its net debit cap lacks headroom: at most this many rebalances
# before it is posted for good (final for the cap), so that debits racing for the same share
# on one shard do not take the headroom a rebalance moved there for another and get it refused
# while the cap as a whole still had room.
CAP_REBALANCES_MAX = 3


def bounded_timeout(time_remaining_seconds: float | None) -> float:
    """The time the service gives a request: the client's deadline less a margin, so that the
    service's own timeouts end its work (and give back its connections) before gRPC cancels it."""
    if time_remaining_seconds is None:
        return REQUEST_TIMEOUT_SECONDS_MAX
    margin_seconds = min(DEADLINE_MARGIN_SECONDS_MAX, time_remaining_seconds * DEADLINE_MARGIN_SHARE)
    if time_remaining_seconds - margin_seconds <= 0:
        raise errors.DeadlineExceeded("the deadline passed before the request started")
    return min(time_remaining_seconds - margin_seconds, REQUEST_TIMEOUT_SECONDS_MAX)


class LedgerService:
    def __init__(
        self, router: ShardRouter[ShardStore], limits: TierLimits, driver: TransferDriver,
        rate_limits: RateLimits | None = None, clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.router = router
        self.limits = limits
        self.driver = driver
        # Per process, like every bucket of the limiter: see services/ledger/rate_limits.py.
        self.rate_limiter = RateLimiter(rate_limits or RateLimits.load(), clock)
        self.owners = AccountOwners(router)
        self.positions = PositionStore(router)
        # (participant_id, currency) pairs the clearing registry has: never removed, so cached for good.
        self._participant_currencies_known: set[tuple[str, str]] = set()
        # Drives outlive the request that started them (a client deadline does not stop a
        # transfer); keyed by transfer id, so retries of one transfer share one task.
        self._drives: dict[str, asyncio.Task] = {}
        self._committers: dict[str, GroupCommitter] = {}
        self._registrars: dict[str, GroupCommitter] = {}
        self._cross_shard_in_flight = 0
        self._background: set[asyncio.Task] = set()
        self._collecting_status_changes = asyncio.Semaphore(COLLECTING_STATUS_CHANGES_MAX)

    def committer(self, shard_name: str) -> GroupCommitter:
        if shard_name not in self._committers:
            self._committers[shard_name] = GroupCommitter(
                shard_name, lambda: self.router.handle(shard_name), self.limits,
                post=functools.partial(post_chains, registers_here=lambda transfer_id: self._registry_shard(transfer_id) == shard_name),
            )
        return self._committers[shard_name]

    def _registry_shard(self, key: str) -> str:
        """Where an idempotency key (a transfer_id, a request_id) is registered: its own hash's shard."""
        return self.router.shard_name_for(key)

    def _registered_by_its_batch(self, request: TransferRequest, debit_shard: str) -> bool:
        """A transfer whose id's registry lives on its debit shard is registered in the transaction
        that applies it there (batch_posting.post_chains, or the debit try of a transfer between
        shards): one round trip and one commit fewer."""
        return self._registry_shard(request.transfer_id) == debit_shard

    def registrar(self, shard_name: str) -> GroupCommitter:
        """Registrations of ids to one shard's registry share a transaction, like transfers."""
        if shard_name not in self._registrars:
            self._registrars[shard_name] = GroupCommitter(
                shard_name, lambda: self.router.handle(shard_name), self.limits, post=id_registry.register
            )
        return self._registrars[shard_name]

    async def _register(self, registrations: list[Registration], deadline: float) -> list[dict | errors.LedgerError]:
        """Register ids bank-wide, each on the shard its hash picks: per id, the fields of its
        first use, or the error that kept its shard from answering."""
        first_uses: list[dict | errors.LedgerError | None] = [None] * len(registrations)
        by_shard: dict[str, list[int]] = {}
        for index, registration in enumerate(registrations):
            by_shard.setdefault(self._registry_shard(registration.id), []).append(index)

        async def register_on(shard_name: str, indexes: list[int]) -> None:
            try:
                outcomes = await self.registrar(shard_name).submit([[registrations[i]] for i in indexes], deadline)
            except errors.LedgerError as error:
                for index in indexes:
                    first_uses[index] = error
                return
            for index, (fields,) in zip(indexes, outcomes):
                first_uses[index] = fields

        if len(by_shard) == 1:  # a single Transfer or OpenAccount: no task for one coroutine
            await register_on(*next(iter(by_shard.items())))
        else:
            await asyncio.gather(*(register_on(shard_name, indexes) for shard_name, indexes in by_shard.items()))
        return first_uses  # type: ignore[return-value]

    async def _claim_transfer_id(self, request: TransferRequest, deadline: float) -> None:
        """The transfer_id names this transfer bank-wide from now on, or it is a conflict."""
        (first_use,) = await self._register([transfer_registration(request)], deadline)
        _raise_on_transfer_conflict(request, first_use)

    async def open_account(self, caller: Caller, request: OpenAccountRequest, timeout_seconds: float) -> tuple[Account, bool]:
        self.rate_limiter.admit_call(caller)
        authorization.check_open_account(caller, request.owner_id, request.kind)
        request = request.validated(self.limits)
        deadline = asyncio.get_running_loop().time() + timeout_seconds
        await self._check_participant_currency(request.participant_id, request.currency, deadline)
        # Registered bank-wide first: two racing OpenAccount calls with one request_id and
        # different fields (collect_on_every_shard picks another id, maybe on another shard)
        # can never both open an account.
        (first_use,) = await self._register(
            [Registration(ids.IdNamespace.ACCOUNT_REQUEST, request.request_id, request.registry_fields())], deadline
        )
        _raise_on_conflict("request_id", request.request_id, request.registry_fields(), first_use)
        account, created = await self.router.handle_for(request.account_id).open_account(request, timeout_seconds)
        conflicts = [] if created else account.conflicting_fields(request)
        if conflicts:
            raise errors.IdempotencyConflict(
                f"request_id {request.request_id} opened an account with other {', '.join(conflicts)}",
                conflicting_fields=",".join(conflicts),
            )
        if account.collect_on_every_shard:
            # Every time, not only when created: a retry completes what a failed attempt left out.
            # Under the merchant's row lock, with the status it holds then: a sub-account created
            # late can never be ACTIVE under a merchant that was frozen or closed meanwhile.
            async def open_sub_accounts(merchant: Account, status: AccountStatus) -> None:
                await asyncio.gather(*(
                    self.router.handle(shard.name).open_collection_account(
                        dataclasses.replace(merchant, status=status),
                        collection.collection_account_id(self.router.shard_map, shard.name, merchant.account_id), timeout_seconds,
                    )
                    for shard in self.router.shard_map.shards
                ))

            await self._change_status(account.account_id, lambda merchant: merchant.status, open_sub_accounts, timeout_seconds)
        return account, created

    async def _check_participant_currency(self, participant_id: str, currency: str, deadline: float) -> None:
        """An account of a participant other than the hosting one needs it registered (on the
        clearing home shard) with the account's currency. Participants and their currencies are
        never removed, so a positive answer is kept for good."""
        if participant_id == clearing.HOSTING_PARTICIPANT_ID or (participant_id, currency) in self._participant_currencies_known:
            return
        home = self.router.handle_for(clearing.CLEARING_HOME_KEY)
        registered, enabled = await home.participant_currency(participant_id, currency, _time_left(deadline))
        if not registered:
            raise errors.ParticipantNotFound(f"participant {participant_id} is not registered", participant_id=participant_id)
        if not enabled:
            raise errors.ParticipantCurrencyNotEnabled(
                f"participant {participant_id} does not have {currency}", participant_id=participant_id, currency=currency
            )
        self._participant_currencies_known.add((participant_id, currency))

    async def get_account(self, caller: Caller, account_id: str, timeout_seconds: float) -> tuple[Account, int]:
        """The account, and what it is collecting on every shard and has not swept in yet."""
        self.rate_limiter.admit_call(caller)
        authorization.check_role(caller, Action.READ)
        ids.validate_client_account_id(account_id, "account_id")
        return await self._read_account(account_id, timeout_seconds, caller)

    async def _read_account(self, account_id: str, timeout_seconds: float, caller: Caller | None = None) -> tuple[Account, int]:
        """The account (authorised for `caller` from the row it reads: a read changes nothing)."""
        store = self.router.handle_for(account_id)
        if ids.is_collecting_account(account_id):
            account, swept_in_minor = await store.get_account_and_swept_in(account_id, timeout_seconds)
        else:
            account, swept_in_minor = await store.get_account(account_id, timeout_seconds), 0
        ownership = None if account is None else AccountOwnership(account.owner_id, account.kind)
        if ownership is not None:
            self.owners.remember(account_id, ownership, account.participant_id)
        if caller is not None and authorization.needs_ownership(caller, Action.READ):
            authorization.check_account(caller, Action.READ, account_id, ownership)
        if account is None:
            raise authorization.account_not_found(account_id)
        return account, await self._collecting(account, swept_in_minor, timeout_seconds)

    async def _authorise_account(self, caller: Caller, action: Action, account_id: str, deadline: float) -> None:
        """The role's rule for one account it names (check_role came first), looking its owner up
        only if the rule needs it."""
        if authorization.needs_ownership(caller, action):
            ownership = await self.owners.of(account_id, _time_left(deadline))
            authorization.check_account(caller, action, account_id, ownership)

    async def _collecting(self, account: Account, swept_in_minor: int, timeout_seconds: float) -> int:
        """Collected so far on every shard, less what sweeps brought in: exact while sweeps run.

        A sweep moves money from a sub-account to the merchant, but neither changes the
        sub-accounts' credits so far, and the merchant's balance and its swept-in total
        change in one transaction; so however the shards' reads interleave with sweeps,
        balance + collecting counts each payment once.
        """
        if not account.collect_on_every_shard:
            return 0
        collected = await asyncio.gather(
            *(store.collected_so_far(account.account_id, timeout_seconds) for store in self.router.handles())
        )
        return sum(collected) - swept_in_minor

    async def update_account_status(self, caller: Caller, account_id: str, status: int, timeout_seconds: float) -> tuple[Account, int]:
        deadline = asyncio.get_running_loop().time() + timeout_seconds
        self.rate_limiter.admit_call(caller)
        authorization.check_role(caller, Action.UPDATE_STATUS)
        ids.validate_client_account_id(account_id, "account_id")
        await self._authorise_account(caller, Action.UPDATE_STATUS, account_id, deadline)
        timeout_seconds = _time_left(deadline)

        async def to_sub_accounts(account: Account, new_status: AccountStatus) -> None:
            # Under the merchant's row lock, before its own row changes: once this call
            # returns FROZEN, no sub-account accepts a payment. Always sent, so a change
            # that died halfway is completed by the next one.
            if account.collect_on_every_shard:
                await self._set_sub_account_statuses(account_id, new_status, self.router.handles(), timeout_seconds)

        await self._change_status(account_id, lambda account: check_status_change(account, status), to_sub_accounts, timeout_seconds)
        return await self._read_account(account_id, timeout_seconds)

    async def close_account(self, caller: Caller, account_id: str, timeout_seconds: float) -> Account:
        deadline = asyncio.get_running_loop().time() + timeout_seconds
        self.rate_limiter.admit_call(caller)
        authorization.check_role(caller, Action.CLOSE)
        ids.validate_client_account_id(account_id, "account_id")
        await self._authorise_account(caller, Action.CLOSE, account_id, deadline)
        timeout_seconds = _time_left(deadline)

        async def close_sub_accounts(account: Account, new_status: AccountStatus) -> None:
            # Each shard closes its sub-accounts only if they hold nothing, under their row
            # locks: a payment in flight either committed before (then the close is refused,
            # the money is swept in) or is refused after. None is ever stranded in a closed one.
            if not account.collect_on_every_shard:
                return
            stores = self.router.handles()
            closed = await asyncio.gather(
                *(store.close_collection_accounts(account_id, timeout_seconds) for store in stores)
            )
            if all(closed):
                return
            reopened = [store for store, was_closed in zip(stores, closed) if was_closed]
            await self._set_sub_account_statuses(account_id, account.status, reopened, timeout_seconds)
            raise errors.AccountBalanceNotZero(
                f"account {account_id} is still collecting on other shards; retry once it is swept in", account_id=account_id
            )

        return await self._change_status(account_id, closed_status, close_sub_accounts, timeout_seconds)

    async def _change_status(self, account_id: str, rule, before_commit, timeout_seconds: float) -> Account:
        """A status change under the account's row lock (ShardStore.change_status).

        A collecting merchant's change holds one pooled connection to its shard while it
        takes more, on every shard, for its sub-accounts: an unbounded number of them at
        once could hold every connection of a pool and wait for one more. So at most
        COLLECTING_STATUS_CHANGES_MAX run at once in a process; the others wait here,
        holding nothing.
        """
        store = self.router.handle_for(account_id)
        if not ids.is_collecting_account(account_id):
            return await store.change_status(account_id, rule, before_commit, timeout_seconds)
        try:
            return await self._change_collecting_status(store, account_id, rule, before_commit, timeout_seconds)
        except BaseException:  # noqa: BLE001 (re-raised; a cancelled call included)
            # It may have changed some sub-accounts and not the merchant's row: set them back to
            # the row's status now, so that a frozen merchant never keeps a sub-account that takes
            # payments. Idempotent, so also done after a refusal that touched nothing. Shielded:
            # a cancelled caller must not leave it half done either.
            await asyncio.shield(self._resync_sub_accounts(store, account_id))
            raise

    async def _resync_sub_accounts(self, store: ShardStore, account_id: str) -> None:
        async def to_row_status(merchant: Account, status: AccountStatus) -> None:
            await self._set_sub_account_statuses(account_id, status, self.router.handles(), RESYNC_TIMEOUT_SECONDS)

        try:
            await store.change_status(account_id, lambda merchant: merchant.status, to_row_status, RESYNC_TIMEOUT_SECONDS)
        except errors.LedgerError as error:
            # The next status change of this merchant sets them all again (it always does).
            log.error("collecting merchant %s: sub-accounts may differ from its status until its next change: %s", account_id, error)

    @staticmethod
    async def _set_sub_account_statuses(
        merchant_id: str, status: AccountStatus, stores: list[ShardStore], timeout_seconds: float
    ) -> None:
        await asyncio.gather(*(store.set_collection_status(merchant_id, status, timeout_seconds) for store in stores))

    async def _change_collecting_status(self, store: ShardStore, account_id: str, rule, before_commit, timeout_seconds: float) -> Account:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_seconds
        try:
            async with asyncio.timeout_at(deadline):
                await self._collecting_status_changes.acquire()
        except TimeoutError:
            raise errors.DeadlineExceeded(f"other status changes of collecting merchants held {account_id}'s turn") from None
        try:
            return await store.change_status(account_id, rule, before_commit, deadline - loop.time())
        finally:
            self._collecting_status_changes.release()

    async def list_account_transfers(
        self, caller: Caller, account_id: str, page_size: int, page_token: str, timeout_seconds: float
    ) -> tuple[list[Transfer], str]:
        deadline = asyncio.get_running_loop().time() + timeout_seconds
        self.rate_limiter.admit_call(caller)
        authorization.check_role(caller, Action.READ)
        ids.validate_client_account_id(account_id, "account_id")
        limit = paging.validate_page_size(page_size)
        before_seq = paging.decode_page_token(page_token, account_id)
        await self._authorise_account(caller, Action.READ, account_id, deadline)
        # One row more than asked tells whether another page exists.
        transfers = await self.router.handle_for(account_id).list_account_transfers(
            account_id, before_seq, limit + 1, _time_left(deadline)
        )
        if len(transfers) <= limit:
            return transfers, ""
        page = transfers[:limit]
        return page, paging.encode_page_token(account_id, page[-1].seq)

    async def transfer(self, caller: Caller, request: TransferRequest, timeout_seconds: float) -> Transfer:
        """A client's transfer: the final transfer; a business refusal is raised after it is recorded,
        an authorisation or rate-limit refusal before anything is."""
        deadline = asyncio.get_running_loop().time() + timeout_seconds
        self.rate_limiter.admit_call(caller)
        authorization.check_role(caller, Action.DEBIT)
        request = collection.routed(request.validated(), self.router.shard_map)
        if authorization.needs_ownership(caller, Action.DEBIT):
            ownership = await self.owners.of(request.debit_account_id, _time_left(deadline))
            authorization.check_account(caller, Action.DEBIT, request.debit_account_id, ownership, transfer_id=request.transfer_id)
        if self.rate_limiter.debits_limited(caller):
            self.rate_limiter.admit_debits(caller, {request.debit_account_id: 1})
        return await self._transfer(request, _time_left(deadline))

    async def sweep(self, request: TransferRequest, timeout_seconds: float) -> Transfer:
        """A collecting merchant's sweep, made by the ledger itself (services/collection.py) as
        access.LEDGER: between the merchant's own accounts, so neither authorised nor limited."""
        return await self._transfer(request.validated_sweep(), timeout_seconds)

    async def post_settlement_leg(self, leg: clearing.SettlementLeg, timeout_seconds: float) -> Transfer:
        """A settlement account's movement (services/clearing_service.py), made by the ledger itself
        like a sweep: neither authorised nor limited, idempotent by its id (a retry answers from
        the transfer it made), never cleared (a settlement account is on a side)."""
        request = TransferRequest(
            leg.transfer_id, leg.debit_account_id, leg.credit_account_id, leg.amount_minor, leg.currency, SETTLEMENT_REFERENCE
        )
        return await self._transfer(request.validated_settlement(), timeout_seconds)

    async def _rebalance(self, participant_id: str, currency: str, shard_name: str, need_minor: int, deadline: float) -> tuple[bool, int | None]:
        """Move cap allotment to `shard_name` from the participant's other shards, its need on top
        when the whole cap has room for it: (whether it had, the cap)."""
        shares = await self.positions.rebalance(participant_id, currency, _time_left(deadline), need_shard=shard_name, need_minor=need_minor)
        allotments = [share.allotment_minor for share in shares.values()]
        cap = None if any(allotment is None for allotment in allotments) else sum(allotments)
        return shares[shard_name].fits(need_minor), cap

    async def _with_headroom(self, shard_name: str, items: list, needs_of, attempt_again, deadline: float) -> list:
        """The rebalance-and-retry loop of debits whose payer's share of its net debit cap lacked
        headroom on `shard_name` (same-shard chains or begins between shards). `needs_of(outcome)` is
        an outcome's need, `attempt_again(indexes, final)` posts those items again. One rebalance per
        participant and currency per round (needs summed); an item goes again final for the cap
        when the whole cap had no room for it, or at the last round: its refusal then means its
        participant's whole position would pass the cap (NET_DEBIT_CAP_EXCEEDED, recorded)."""
        outcomes = list(items)
        for attempt in range(CAP_REBALANCES_MAX):
            waiting: dict[int, tuple[str, str, int]] = {}  # index -> (participant, currency, need)
            for index, answer in enumerate(outcomes):
                need = needs_of(answer)
                if need is not None:
                    waiting[index] = need
            if not waiting:
                break
            needs: dict[tuple[str, str], int] = {}
            for participant_id, currency, need_minor in waiting.values():
                needs[participant_id, currency] = needs.get((participant_id, currency), 0) + need_minor
            rebalanced = dict(zip(needs, await asyncio.gather(
                *(self._rebalance(*key, shard_name, need, deadline) for key, need in needs.items())
            )))
            final = {index for index, need in waiting.items() if attempt == CAP_REBALANCES_MAX - 1 or not rebalanced[need[:2]][0]}
            again = list(waiting)
            for index, answer in zip(again, await attempt_again(again, final)):
                outcomes[index] = answer
                refusal, cap = _cap_refusal(answer), rebalanced[waiting[index][:2]][1]
                if refusal is not None and cap is not None:
                    refusal.metadata["net_debit_cap_minor"] = str(cap)
        return outcomes

    async def _post_same_shard(self, shard_name: str, chains: list[list[TransferRequest]], deadline: float) -> list[list[Outcome]]:
        """Post chains on their shard, with the rebalance-and-retry loop (_with_headroom) for those
        whose payer's share of its cap lacked headroom (nothing of them was recorded)."""
        outcomes = await self.committer(shard_name).submit(chains, deadline)
        if all(chain_outcomes[0].needs_headroom is None for chain_outcomes in outcomes):
            return outcomes

        async def post_again(indexes: list[int], final: set[int]) -> list[list[Outcome]]:
            return await self.committer(shard_name).submit(
                [[dataclasses.replace(request, final_for_cap=index in final) for request in chains[index]] for index in indexes], deadline
            )

        return await self._with_headroom(shard_name, outcomes, lambda chain_outcomes: chain_outcomes[0].needs_headroom, post_again, deadline)

    async def _transfer(self, request: TransferRequest, timeout_seconds: float) -> Transfer:
        deadline = asyncio.get_running_loop().time() + timeout_seconds
        debit_shard = self.router.shard_name_for(request.debit_account_id)
        credit_shard = self.router.shard_name_for(request.credited)
        if not self._registered_by_its_batch(request, debit_shard):
            await self._claim_transfer_id(request, deadline)
        if debit_shard != credit_shard:
            return await self._transfer_between_shards(request, debit_shard, credit_shard, _time_left(deadline))
        ((posted,),) = await self._post_same_shard(debit_shard, [[request]], deadline)
        return self._answer(request, posted.transfer, posted.fresh_refusal)

    async def create_transfers(
        self, caller: Caller, requests: list[TransferRequest], linked: list[bool], timeout_seconds: float
    ) -> list[Transfer | errors.LedgerError]:
        """One answer per request, in order: the final transfer or the error Transfer would raise.

        A transfer the caller may not make gets its own error (its linked chain fails whole);
        a call over a rate or velocity limit is refused whole. Neither records anything."""
        if len(requests) > CREATE_TRANSFERS_BATCH_SIZE_MAX:
            raise errors.BatchTooLarge(
                f"at most {CREATE_TRANSFERS_BATCH_SIZE_MAX} transfers per call", limit=CREATE_TRANSFERS_BATCH_SIZE_MAX
            )
        deadline = asyncio.get_running_loop().time() + timeout_seconds
        self.rate_limiter.admit_call(caller, max(1, len(requests)))
        authorization.check_role(caller, Action.DEBIT)
        _refuse_duplicate_ids(requests)
        answers: list[Transfer | errors.LedgerError | None] = [None] * len(requests)
        routed_chains = []  # (chain of request indexes, (debit shard, credit shard))
        for chain in _chains(linked):
            shard = self._route_chain(requests, chain, linked, answers)
            if shard is not None:
                routed_chains.append((chain, shard))
        routed_chains = await self._authorised_chains(caller, requests, routed_chains, answers, deadline)
        if self.rate_limiter.debits_limited(caller):
            # Per chain, in order: a payer over its velocity limit gets RATE_LIMITED on its own
            # transfers (its chain refused whole, nothing taken), the rest of a gateway's batch goes on.
            def admit_debits(chain: list[int]) -> tuple[int, errors.LedgerError] | None:
                try:
                    self.rate_limiter.admit_debits(caller, collections.Counter(requests[index].debit_account_id for index in chain))
                except (errors.RateLimited, errors.BatchTooLarge) as refusal:
                    return chain[0], refusal
                return None

            routed_chains = _keep_chains(requests, routed_chains, answers, admit_debits)
        # Every id is claimed bank-wide before anything is applied; a chain with a member
        # whose id names another transfer is refused whole, and nothing of it is recorded:
        # first read (its other members must not be claimed by a chain that fails), then claim.
        routed_chains = await self._without_conflicting_chains(requests, routed_chains, answers, deadline)
        indexes = [
            index for chain, shard in routed_chains for index in chain if not self._registered_by_its_batch(requests[index], shard[0])
        ]
        first_uses = dict(zip(indexes, await self._register([transfer_registration(requests[i]) for i in indexes], deadline)))

        def check_claim(index: int) -> None:
            if index in first_uses:
                _raise_on_transfer_conflict(requests[index], first_uses[index])

        routed_chains = _keep_chains(requests, routed_chains, answers, lambda chain: _first_failure(chain, check_claim))
        same_shard: dict[str, list[list[int]]] = {}  # shard -> chains of request indexes
        between_shards: list[int] = []
        for chain, shard in routed_chains:
            if shard[0] == shard[1]:
                same_shard.setdefault(shard[0], []).append(chain)
            else:
                between_shards.append(chain[0])

        async def commit_shard(shard_name: str, chains: list[list[int]]) -> None:
            try:
                outcomes = await self._post_same_shard(shard_name, [[requests[i] for i in chain] for chain in chains], deadline)
            except errors.LedgerError as error:
                for index in (i for chain in chains for i in chain):
                    answers[index] = error
                return
            for chain, chain_outcomes in zip(chains, outcomes):
                for index, posted in zip(chain, chain_outcomes):
                    answers[index] = _answer_or_error(lambda: self._answer(requests[index], posted.transfer, posted.fresh_refusal))

        await asyncio.gather(
            *(commit_shard(name, chains) for name, chains in same_shard.items()),
            self._transfers_between_shards(requests, between_shards, deadline, answers),
        )
        assert all(answer is not None for answer in answers), "a transfer of the batch got no answer"
        return answers  # type: ignore[return-value]

    async def _authorised_chains(
        self, caller: Caller, requests: list[TransferRequest], routed_chains: list, answers: list, deadline: float
    ) -> list:
        """The chains whose every debit the caller may make; each other chain is answered here,
        like a chain refused by validation (its failing member with its error, the others with
        LINKED_TRANSFER_FAILED), before anything of the call is registered."""
        if not routed_chains or not authorization.needs_ownership(caller, Action.DEBIT):
            return routed_chains
        debit_account_ids = list({requests[index].debit_account_id: None for chain, _ in routed_chains for index in chain})
        ownerships = await self.owners.of_many(debit_account_ids, _time_left(deadline))

        def check_debit(index: int) -> None:
            request = requests[index]
            ownership = ownerships[request.debit_account_id]
            if isinstance(ownership, errors.LedgerError):
                raise ownership
            authorization.check_account(caller, Action.DEBIT, request.debit_account_id, ownership, transfer_id=request.transfer_id)

        return _keep_chains(requests, routed_chains, answers, lambda chain: _first_failure(chain, check_debit))

    async def _without_conflicting_chains(
        self, requests: list[TransferRequest], routed_chains: list, answers: list, deadline: float
    ) -> list:
        """The chains none of whose members' ids was first used with other fields; the others are
        answered (refused whole) before any of their ids is claimed. Only chains of several
        transfers are read first: a lone transfer's claim is its own check. A use racing between
        this read and the claim is still refused, by the claim, but its chain's other ids stay
        claimed (with their own fields: a retry with them succeeds)."""
        linked_chains = [(chain, shard) for chain, shard in routed_chains if len(chain) > 1]
        if not linked_chains:
            return routed_chains
        by_shard: dict[str, list[int]] = {}
        for chain, _ in linked_chains:
            for index in chain:
                by_shard.setdefault(self._registry_shard(requests[index].transfer_id), []).append(index)
        loop = asyncio.get_running_loop()

        async def read(shard_name: str, indexes: list[int]) -> dict:
            try:
                return await id_registry.registered(
                    self.router.handle(shard_name), [transfer_registration(requests[i]) for i in indexes], deadline - loop.time()
                )
            except errors.LedgerError:
                return {}  # unknown here: the claim that follows meets the same shard and answers for it

        stored: dict = {}
        for found in await asyncio.gather(*(read(name, indexes) for name, indexes in by_shard.items())):
            stored.update(found)

        def check_first_use(index: int) -> None:
            first_use = stored.get((int(ids.IdNamespace.TRANSFER), requests[index].transfer_id))
            if first_use is not None:
                _raise_on_transfer_conflict(requests[index], first_use)

        return _keep_chains(
            requests, routed_chains, answers, lambda chain: _first_failure(chain, check_first_use) if len(chain) > 1 else None
        )

    def _route_chain(
        self, requests: list[TransferRequest], chain: list[int], linked: list[bool], answers: list
    ) -> tuple[str, str] | None:
        """(debit shard, credit shard) of a chain, or None after answering its members with an error."""
        failure: tuple[int, errors.LedgerError] | None = None
        if linked[chain[-1]]:
            failure = (chain[-1], errors.LinkedChainOpen("the last transfer of the call has linked set: the chain never closes"))
        for index in chain:
            try:
                requests[index] = collection.routed(requests[index].validated(), self.router.shard_map)
            except errors.LedgerError as error:
                failure = failure or (index, error)
        if failure is None:
            shards = {(self.router.shard_name_for(requests[i].debit_account_id), self.router.shard_name_for(requests[i].credited)) for i in chain}
            if len(chain) > 1 and (len(shards) > 1 or any(debit != credit for debit, credit in shards)):
                failure = (chain[0], errors.LinkedChainSpansShards("a linked chain must keep all its accounts on one shard"))
            else:
                return next(iter(shards))
        _fail_chain(requests, chain, *failure, answers)
        return None

    @staticmethod
    def _answer(request: TransferRequest, transfer: Transfer, fresh_refusal: errors.LedgerError | None) -> Transfer:
        if fresh_refusal is not None:
            fresh_refusal.metadata["transfer_id"] = request.transfer_id
            raise fresh_refusal
        conflicts = transfer.conflicting_fields(request)
        if conflicts:
            raise errors.IdempotencyConflict(
                f"transfer_id {request.transfer_id} was used with other {', '.join(conflicts)}",
                conflicting_fields=",".join(conflicts),
            )
        refusal = transfer.refusal()
        if refusal is not None:
            raise refusal
        return transfer

    def _admit_between_shards(self, count: int) -> int:
        """How many of `count` new transfers between shards this process takes on now (the rest
        get OVERLOADED); the caller takes them off `_cross_shard_in_flight` when it is done."""
        room = min(CROSS_SHARD_IN_FLIGHT_MAX - self._cross_shard_in_flight, DRIVES_IN_FLIGHT_MAX - len(self._drives))
        admitted = max(0, min(count, room))
        self._cross_shard_in_flight += admitted
        return admitted

    def _overloaded(self) -> errors.Overloaded:
        """The refusal of transfers between shards past the limits above, counted once per refusal."""
        metrics.record_overload(metrics.OVERLOAD_CROSS_SHARD_LIMIT)
        return errors.Overloaded(
            f"{self._cross_shard_in_flight} transfers between shards in flight, {len(self._drives)} drives; retry with backoff"
        )

    async def _transfer_between_shards(
        self, request: TransferRequest, debit_shard: str, credit_shard: str, timeout_seconds: float
    ) -> Transfer:
        if not self._admit_between_shards(1):
            raise self._overloaded()
        try:
            deadline = asyncio.get_running_loop().time() + timeout_seconds
            request = await self._with_payee(request, deadline)
            register_id_here = self._registered_by_its_batch(request, debit_shard)
            begun = await self.driver.begin(request, debit_shard, credit_shard, _time_left(deadline), register_id_here=register_id_here)
            if begun.needs_headroom is not None:
                async def begin_again(indexes: list[int], final: set[int]) -> list[Begun]:
                    return [await self.driver.begin(
                        dataclasses.replace(request, final_for_cap=bool(final)), debit_shard, credit_shard, _time_left(deadline),
                        register_id_here=register_id_here,
                    )]

                (begun,) = await self._with_headroom(debit_shard, [begun], lambda begun: begun.needs_headroom, begin_again, deadline)
            found = self._in_flight(request, begun, debit_shard, lambda record: asyncio.create_task(self.driver.drive(record)))
            return found if isinstance(found, Transfer) else await self._final(request, found, debit_shard, deadline)
        finally:
            self._cross_shard_in_flight -= 1

    async def _transfers_between_shards(
        self, requests: list[TransferRequest], indexes: list[int], deadline: float, answers: list
    ) -> None:
        """A CreateTransfers call's transfers between shards: begun in one call per debit shard, then
        driven together (TransferDriver.drive_many): a few transactions per shard for all of them."""
        admitted = self._admit_between_shards(len(indexes))
        if admitted < len(indexes):
            overloaded = self._overloaded()
            for index in indexes[admitted:]:
                answers[index] = overloaded
        indexes = indexes[:admitted]
        try:
            starts = []
            if not indexes:
                return
            try:
                payees = await self.owners.participants_of([requests[index].credited for index in indexes], _time_left(deadline))
            except errors.LedgerError as error:
                for index in indexes:
                    answers[index] = error
                return
            for index in indexes:
                request = requests[index] = dataclasses.replace(requests[index], payee_participant_id=_payee(payees[requests[index].credited]))
                debit_shard, credit_shard = (self.router.shard_name_for(a) for a in (request.debit_account_id, request.credited))
                starts.append((request, debit_shard, credit_shard, self._registered_by_its_batch(request, debit_shard)))
            leased_at = self.driver.clock.monotonic()  # the driver's clock: drive_many compares with it
            all_begun = await self._begin_many(starts, deadline)
            together = _DrivenTogether(self.driver, leased_at)
            waits = []
            for index, (request, debit_shard, _, _), begun in zip(indexes, starts, all_begun):
                try:
                    if isinstance(begun, errors.LedgerError):
                        raise begun
                    found = self._in_flight(request, begun, debit_shard, together.drive)
                except errors.LedgerError as error:
                    answers[index] = error
                    continue
                if isinstance(found, Transfer):
                    answers[index] = found
                else:
                    waits.append((index, request, debit_shard, found))
            self._keep(together.start())

            async def wait(index: int, request: TransferRequest, debit_shard: str, drive: asyncio.Future) -> None:
                try:
                    answers[index] = await self._final(request, drive, debit_shard, deadline)
                except errors.LedgerError as error:
                    answers[index] = error

            await asyncio.gather(*(wait(*waiting) for waiting in waits))
        finally:
            self._cross_shard_in_flight -= admitted

    async def _with_payee(self, request: TransferRequest, deadline: float) -> TransferRequest:
        """The request with its credited account's participant (cached per process): a transfer
        between shards checks the cap on its debit shard before its credit shard is asked."""
        payees = await self.owners.participants_of([request.credited], _time_left(deadline))
        return dataclasses.replace(request, payee_participant_id=_payee(payees[request.credited]))

    async def _begin_many(self, starts: list[tuple[TransferRequest, str, str, bool]], deadline: float) -> list:
        """driver.begin_many, with the rebalance-and-retry loop (_with_headroom) per debit shard for
        the transfers whose payer's share of its cap lacked headroom (nothing of them was recorded)."""
        all_begun = await self.driver.begin_many(starts, _time_left(deadline))

        def needs_of(begun) -> tuple[str, str, int] | None:
            return begun.needs_headroom if isinstance(begun, Begun) else None

        by_shard: dict[str, list[int]] = {}
        for index, begun in enumerate(all_begun):
            if needs_of(begun) is not None:
                by_shard.setdefault(starts[index][1], []).append(index)

        async def on_shard(shard_name: str, indexes: list[int]) -> None:
            async def begin_again(again: list[int], final: set[int]) -> list:
                return await self.driver.begin_many(
                    [(dataclasses.replace(starts[indexes[i]][0], final_for_cap=i in final), *starts[indexes[i]][1:]) for i in again],
                    _time_left(deadline),
                )

            try:
                outcomes = await self._with_headroom(shard_name, [all_begun[i] for i in indexes], needs_of, begin_again, deadline)
            except errors.LedgerError as error:
                outcomes = [error] * len(indexes)
            for index, begun in zip(indexes, outcomes):
                all_begun[index] = begun

        await asyncio.gather(*(on_shard(shard_name, indexes) for shard_name, indexes in by_shard.items()))
        return all_begun

    def _in_flight(self, request: TransferRequest, begun: Begun, debit_shard: str, drive_created) -> Transfer | asyncio.Future:
        """What a begin found: the final transfer (its refusal or a conflict is raised), or the drive
        to wait for: `drive_created(record)` for a transfer begun now, a drive of this process, or
        a wait for another process's driver."""
        if begun.record is None:  # the id belongs to a same-shard transfer
            return self._answer(request, begun.same_shard_transfer, None)
        record = begun.record
        if not begun.created or begun.fresh_refusal is not None:
            self._answer(request, record.as_transfer(), begun.fresh_refusal)  # raises on conflict or refusal
        if record.state in FINAL_STATES:
            return outcome(record)
        drive = self._drives.get(record.transfer_id)
        if begun.created or drive is None:
            if begun.created:
                # Whoever created it drives it, even if a retry that found the record meanwhile
                # registered a wait here: that wait ends on its own.
                drive = drive_created(record)
            else:  # a retry while the first attempt is still in flight: wait for its driver
                drive = asyncio.create_task(
                    asyncio.wait_for(self.driver.wait_until_final(record.transfer_id, debit_shard), WAIT_FOR_OTHER_DRIVER_SECONDS_MAX)
                )
            self._drives[record.transfer_id] = drive
            drive.add_done_callback(functools.partial(self._drive_ended, record.transfer_id))
        return drive

    def _drive_ended(self, transfer_id: str, drive: asyncio.Future) -> None:
        if self._drives.get(transfer_id) is drive:
            del self._drives[transfer_id]
        if not drive.cancelled():
            drive.exception()  # read: a drive whose callers all gave up must not be logged as lost

    async def _final(self, request: TransferRequest, drive: asyncio.Future, debit_shard: str, deadline: float) -> Transfer:
        """The transfer once its drive ends, by the caller's deadline (the drive goes on without it)."""
        try:
            async with asyncio.timeout_at(deadline):
                record = await asyncio.shield(drive)
                if record.state not in FINAL_STATES:  # our driver lost its lease: wait for the new owner
                    record = await self.driver.wait_until_final(record.transfer_id, debit_shard)
        except TimeoutError:
            raise errors.DeadlineExceeded(
                f"transfer {request.transfer_id} is still in flight; it will complete, GetTransfer tells its state",
                transfer_id=request.transfer_id,
            ) from None
        return outcome(record)

    def _keep(self, task: asyncio.Task | None) -> None:
        """Hold a background task until it ends (the event loop keeps only weak references)."""
        if task is not None:
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    async def drain(self) -> None:
        """Let in-flight drives finish (shutdown); recovery would take them over otherwise."""
        if self._drives:
            await asyncio.wait(list(self._drives.values()), timeout=DRAIN_SECONDS_MAX)

    async def get_transfer(self, caller: Caller, transfer_id: str, timeout_seconds: float) -> Transfer:
        """The transfer, if the caller may see it (a customer: only from or to its own accounts)."""
        deadline = asyncio.get_running_loop().time() + timeout_seconds
        self.rate_limiter.admit_call(caller)
        ids.validate_id(transfer_id, "transfer_id")
        transfer = await self._find_transfer(transfer_id, timeout_seconds)
        if authorization.needs_transfer_parties(caller):
            parties = await self.owners.of_many([transfer.debit_account_id, transfer.credit_account_id], _time_left(deadline))
            sides = [parties[transfer.debit_account_id], parties[transfer.credit_account_id]]
            known = [side for side in sides if not isinstance(side, errors.LedgerError)]
            if len(known) < len(sides) and not any(side is not None and authorization.owns(caller, side) for side in known):
                # A side whose shard did not answer may be the caller's: "not found" would be a guess.
                raise next(side for side in sides if isinstance(side, errors.LedgerError))
            authorization.check_transfer_visible(caller, transfer_id, known)
        return transfer

    async def _find_transfer(self, transfer_id: str, timeout_seconds: float) -> Transfer:
        """Ask every shard at once and answer as soon as the one that holds it does, so a
        shard that is down or frozen only slows the lookups it could matter to."""
        lookups = [
            asyncio.ensure_future(TccStore(store).find(transfer_id, timeout_seconds)) for store in self.router.handles()
        ]
        failures: list[BaseException] = []
        try:
            for lookup in asyncio.as_completed(lookups):
                try:
                    record, local = await lookup
                except Exception as error:  # noqa: BLE001 (a shard that did not answer is judged below)
                    failures.append(error)
                    continue
                # A coordinator record (between shards) or a same-shard row is the whole answer;
                # a branch row alone is not: its coordinator record may be on another shard.
                if record is not None:
                    return record.as_transfer()
                if local is not None and not local.is_half_of_a_cross_shard_transfer:
                    return local
        finally:
            for lookup in lookups:
                if not lookup.cancel() and not lookup.cancelled():
                    lookup.exception()  # ended unread (an answer came first, or the caller is gone): not "never retrieved"
        if failures:
            # A shard that did not answer might hold it: "not found" would be a guess.
            if isinstance(failures[0], errors.LedgerError):
                raise failures[0]
            # Not mapped by the storage layer, so a bug: its words go to the log, not to the client.
            log.error("looking up transfer %s failed", transfer_id, exc_info=failures[0])
            raise errors.ShardUnavailable(f"a shard did not answer the lookup of transfer {transfer_id}; retry")
        raise authorization.transfer_not_found(transfer_id)


def _payee(participant_id: str | None) -> str:
    """The payee a transfer between shards begins with: clearing.UNKNOWN_PAYEE for an account not
    found, so that one opened before the credit try is refused there, never posted uncleared."""
    return clearing.UNKNOWN_PAYEE if participant_id is None else participant_id


def _time_left(deadline: float) -> float:
    """What is left of a request's time (bounded_timeout's margin is already taken off)."""
    time_left_seconds = deadline - asyncio.get_running_loop().time()
    if time_left_seconds <= 0:
        raise errors.DeadlineExceeded("the deadline passed before the request was authorised")
    return time_left_seconds


def _chains(linked: list[bool]) -> list[list[int]]:
    """Indexes grouped into chains: each runs to the first transfer without `linked`."""
    chains, current = [], []
    for index, is_linked in enumerate(linked):
        current.append(index)
        if not is_linked:
            chains.append(current)
            current = []
    if current:
        chains.append(current)  # left open: _route_chain answers it with LINKED_CHAIN_OPEN
    return chains


def _raise_on_conflict(field: str, key: str, requested: dict, first_use: dict | errors.LedgerError) -> None:
    """An idempotency key whose first use (from the registry) had other fields names something else."""
    if isinstance(first_use, errors.LedgerError):
        raise first_use
    conflict = ids.conflict_with_first_use(field, key, first_use, requested)
    if conflict is not None:
        raise conflict


def _raise_on_transfer_conflict(request: TransferRequest, first_use: dict | errors.LedgerError) -> None:
    _raise_on_conflict("transfer_id", request.transfer_id, request.registry_fields(), first_use)


def _refuse_duplicate_ids(requests: list[TransferRequest]) -> None:
    seen: set[str] = set()
    for request in requests:
        if not request.transfer_id:
            continue  # answered MISSING_FIELD on its own
        if request.transfer_id in seen:
            raise errors.DuplicateTransferId(
                f"transfer_id {request.transfer_id[:64]!r} appears twice in one call", transfer_id=request.transfer_id[:64]
            )
        seen.add(request.transfer_id)


def _first_failure(chain: list[int], check) -> tuple[int, errors.LedgerError] | None:
    """The first member of a chain that `check` (request index -> None, or raises) refuses, with its error."""
    for index in chain:
        try:
            check(index)
        except errors.LedgerError as error:
            return index, error
    return None


def _keep_chains(requests: list[TransferRequest], routed_chains: list, answers: list, failure_of) -> list:
    """The (chain, shards) for which `failure_of(chain)` is None; every other chain is refused
    whole at the (index, error) it gives (_fail_chain), before anything of it is recorded."""
    kept = []
    for chain, shard in routed_chains:
        failure = failure_of(chain)
        if failure is None:
            kept.append((chain, shard))
        else:
            _fail_chain(requests, chain, *failure, answers)
    return kept


def _fail_chain(
    requests: list[TransferRequest], chain: list[int], failed_index: int, error: errors.LedgerError, answers: list
) -> None:
    """Answer every member of a chain that is refused before anything of it is applied:
    the failing member with its error, the others with LINKED_TRANSFER_FAILED; an error
    that is about the whole chain (it spans shards, or its shard did not answer) to all."""
    for index in chain:
        if index == failed_index or error.transient or isinstance(error, errors.LinkedChainSpansShards) or len(chain) == 1:
            answers[index] = error
        else:
            answers[index] = linked_transfer_failed(requests[failed_index].transfer_id)


def _cap_refusal(outcome) -> errors.NetDebitCapExceeded | None:
    """The fresh NET_DEBIT_CAP_EXCEEDED of a posting (a chain's outcomes) or a begin, if it is one."""
    if isinstance(outcome, list):
        refusals = [member.fresh_refusal for member in outcome]
    else:
        refusals = [getattr(outcome, "fresh_refusal", None)]
    return next((refusal for refusal in refusals if isinstance(refusal, errors.NetDebitCapExceeded)), None)


def _answer_or_error(answer) -> Transfer | errors.LedgerError:
    try:
        return answer()
    except errors.LedgerError as error:
        return error


class _DrivenTogether:
    """Transfers begun by one CreateTransfers call, driven by one TransferDriver.drive_many; each
    has a future of its own, so that a retry of one waits for it like for any drive."""

    def __init__(self, driver: TransferDriver, leased_at: float) -> None:
        self.driver = driver
        self.leased_at = leased_at  # the driver's clock, before their begin: their leases run from then at the latest
        self.records: list = []
        self.futures: dict[str, asyncio.Future] = {}

    def drive(self, record) -> asyncio.Future:
        future = asyncio.get_running_loop().create_future()
        self.records.append(record)
        self.futures[record.transfer_id] = future
        return future

    def start(self) -> asyncio.Task | None:
        if not self.records:
            return None
        task = asyncio.create_task(self.driver.drive_many(self.records, on_final=self._final, leased_at=self.leased_at))
        task.add_done_callback(self._ended)
        return task

    def _final(self, record) -> None:
        """One transfer's driving ended: its callers hear at once, not when the whole batch does."""
        future = self.futures[record.transfer_id]
        if not future.done():
            future.set_result(record)

    def _ended(self, task: asyncio.Task) -> None:
        for future in self.futures.values():
            if future.done():
                continue
            if task.cancelled():
                future.cancel()
            else:
                future.set_exception(task.exception() or AssertionError("drive_many ended without a transfer's outcome"))
