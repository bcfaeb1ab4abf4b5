"""LedgerService's enforcement of authorisation and limits, over in-memory shard stores: every
refusal comes before anything is registered or posted, admins cost no lookup, lookups are
cached and batched per shard. (Against the real cluster: test_authorization_api.py.)"""

from __future__ import annotations

import asyncio

import pytest

from services.account_owners import AccountOwners
from services.ledger import errors
from services.ledger.access import Caller, Role
from services.ledger.authorization import AccountOwnership
from services.ledger.accounts import Account, AccountKind, AccountStatus, OpenAccountRequest
from services.ledger.limits import TierLimits
from services.ledger.rate_limits import RateLimit, RateLimits
from services.ledger.transfers import Transfer, TransferRequest, TransferStatus
from services.ledger_service import LedgerService
from services.storage.batch_posting import Outcome
from sharding.router import ShardRouter
from sharding.shard_map import Shard, ShardMap

SHARDS = [Shard(f"shard-{number}", f"dsn-{number}") for number in range(3)]
ALICE = Caller("alice", Role.CUSTOMER)
BOB = Caller("bob", Role.CUSTOMER)
GATEWAY = Caller("gateway", Role.SERVICE)
OPS = Caller("ops", Role.OPERATOR)
ROOT = Caller("root", Role.ADMIN)
TIMEOUT_SECONDS = 5.0
GENEROUS = RateLimit(10_000, 10_000.0)


class FakeStore:
    """One shard's accounts, and every read of owners it answered."""

    def __init__(self, shard: Shard, accounts: dict[str, Account], shard_map: ShardMap) -> None:
        self.shard_name = shard.name
        self.accounts = accounts
        self.shard_map = shard_map
        self.owner_reads: list[list[str]] = []

    async def get_owners(self, account_ids, timeout_seconds):
        assert all(self.shard_map.shard_name_for_key(account_id) == self.shard_name for account_id in account_ids)
        self.owner_reads.append(list(account_ids))
        return [(i, self.accounts[i].owner_id, self.accounts[i].kind) for i in account_ids if i in self.accounts]

    async def get_account(self, account_id, timeout_seconds):
        return self.accounts.get(account_id)

    async def list_account_transfers(self, account_id, before_seq, limit, timeout_seconds):
        if account_id not in self.accounts:
            raise errors.AccountNotFound(f"account {account_id} not found", account_id=account_id)
        return []

    async def change_status(self, account_id, rule, before_commit, timeout_seconds):
        raise AssertionError(f"status of {account_id} changed")


class FakeCommitter:
    def __init__(self, posted: list[str]) -> None:
        self.posted = posted

    async def submit(self, chains, deadline):
        self.posted += [request.transfer_id for chain in chains for request in chain]
        return [[Outcome(_posted(request)) for request in chain] for chain in chains]


def _posted(request: TransferRequest) -> Transfer:
    return Transfer(
        request.transfer_id, request.debit_account_id, request.credit_account_id, request.amount_minor, request.currency,
        request.reference, TransferStatus.POSTED,
    )


class Ledger:
    """A LedgerService whose registrations and postings are recorded, not stored."""

    def __init__(self, rate_limits: RateLimits) -> None:
        self.shard_map = ShardMap.evenly(SHARDS)
        self.accounts: dict[str, Account] = {}
        self.opened = 0
        self.stores = {shard.name: FakeStore(shard, self.accounts, self.shard_map) for shard in SHARDS}

        async def open_store(shard):
            return self.stores[shard.name]

        async def close_store(store):
            return None

        router = ShardRouter(open_store, close_store)
        asyncio.run(router.apply(self.shard_map))
        self.service = LedgerService(router, TierLimits.load(), driver=None, rate_limits=rate_limits)
        self.registered: list[str] = []
        self.posted: list[str] = []

        async def register(registrations, deadline):
            self.registered += [registration.id for registration in registrations]
            return [registration.fields for registration in registrations]

        async def transfer(request, timeout_seconds):
            self.posted.append(request.transfer_id)
            return _posted(request)

        async def between_shards(requests, indexes, deadline, answers):
            for index in indexes:
                self.posted.append(requests[index].transfer_id)
                answers[index] = _posted(requests[index])

        self.service._register = register
        self.service._transfers_between_shards = between_shards
        self.service._transfer = transfer
        self.service.committer = lambda shard_name: FakeCommitter(self.posted)

    def open(self, owner_id: str, kind=AccountKind.CUSTOMER, shard: str = "shard-0") -> str:
        while True:
            account_id = f"acc_{owner_id}_{self.opened}"
            self.opened += 1
            if self.shard_map.shard_name_for_key(account_id) == shard:
                break
        self.accounts[account_id] = Account(account_id, account_id, owner_id, "USD", kind, 2, AccountStatus.ACTIVE)
        return account_id

    def owner_reads(self) -> list[list[str]]:
        return [read for store in self.stores.values() for read in store.owner_reads]

    def run(self, coroutine):
        return asyncio.run(coroutine)


@pytest.fixture
def ledger() -> Ledger:
    return Ledger(RateLimits({role: GENEROUS for role in Role}, GENEROUS, frozenset({Role.CUSTOMER, Role.SERVICE})))


def request(transfer_id: str, debit: str, credit: str, amount_minor: int = 100) -> TransferRequest:
    return TransferRequest(transfer_id, debit, credit, amount_minor, "USD")


def refusal(ledger: Ledger, coroutine) -> tuple[str, str, dict]:
    with pytest.raises(errors.LedgerError) as raised:
        ledger.run(coroutine)
    return raised.value.reason, raised.value.message, raised.value.metadata


def test_a_customer_debiting_another_owners_account_records_nothing_and_answers_as_missing(ledger):
    mine, bobs, payee = ledger.open("alice"), ledger.open("bob"), ledger.open("carol", shard="shard-1")
    not_owned = refusal(ledger, ledger.service.transfer(ALICE, request("t-1", bobs, payee), TIMEOUT_SECONDS))
    missing = refusal(ledger, ledger.service.transfer(ALICE, request("t-1", "acc_nobody", payee), TIMEOUT_SECONDS))
    assert not_owned[0] == "ACCOUNT_NOT_FOUND"
    assert not_owned[1:] == (f"account {bobs} not found", {"account_id": bobs, "transfer_id": "t-1"})
    assert missing[1:] == ("account acc_nobody not found", {"account_id": "acc_nobody", "transfer_id": "t-1"})
    assert ledger.registered == ledger.posted == []
    assert ledger.run(ledger.service.transfer(ALICE, request("t-2", mine, payee), TIMEOUT_SECONDS)).status == TransferStatus.POSTED
    assert ledger.posted == ["t-2"]


def test_an_operator_moves_no_money_and_a_service_no_bank_money(ledger):
    bank, customer = ledger.open("bank", AccountKind.SYSTEM), ledger.open("dave")
    assert refusal(ledger, ledger.service.transfer(OPS, request("t-1", customer, bank), TIMEOUT_SECONDS))[0] == "ROLE_NOT_ALLOWED"
    assert refusal(ledger, ledger.service.transfer(GATEWAY, request("t-2", bank, customer), TIMEOUT_SECONDS))[2] == {
        "role": "service", "action": "transfer_from_system_account"
    }
    assert ledger.registered == ledger.posted == []
    ledger.run(ledger.service.transfer(GATEWAY, request("t-3", customer, bank), TIMEOUT_SECONDS))
    assert ledger.posted == ["t-3"]


def test_an_admin_costs_no_lookup_and_a_customer_one_per_account_at_most(ledger):
    bank, mine, payee = ledger.open("bank", AccountKind.SYSTEM), ledger.open("alice"), ledger.open("erin")
    for number in range(3):
        ledger.run(ledger.service.transfer(ROOT, request(f"fund-{number}", bank, mine), TIMEOUT_SECONDS))
    assert ledger.owner_reads() == []
    for number in range(3):
        ledger.run(ledger.service.transfer(ALICE, request(f"pay-{number}", mine, payee), TIMEOUT_SECONDS))
    assert ledger.owner_reads() == [[mine]]


def test_not_found_is_never_cached(ledger):
    payee = ledger.open("erin")
    later = "acc_opened_later"
    with pytest.raises(errors.AccountNotFound):
        ledger.run(ledger.service.transfer(ALICE, request("t-1", later, payee), TIMEOUT_SECONDS))
    ledger.accounts[later] = Account(later, later, "alice", "USD", AccountKind.CUSTOMER, 0, AccountStatus.ACTIVE)
    assert ledger.run(ledger.service.transfer(ALICE, request("t-2", later, payee), TIMEOUT_SECONDS)).transfer_id == "t-2"


def test_create_transfers_refuses_unauthorised_items_and_their_chains_only(ledger):
    mine, other_mine, bobs, payee = ledger.open("alice"), ledger.open("alice"), ledger.open("bob"), ledger.open("erin")
    requests = [
        request("ok-1", mine, payee),
        request("chain-a", mine, payee), request("chain-b", bobs, payee), request("chain-c", other_mine, payee),
        request("bad", bobs, payee),
        request("ok-2", other_mine, payee),
    ]
    linked = [False, True, True, False, False, False]
    answers = ledger.run(ledger.service.create_transfers(ALICE, requests, linked, TIMEOUT_SECONDS))
    reasons = [answer.reason if isinstance(answer, errors.LedgerError) else answer.status.name for answer in answers]
    assert reasons == ["POSTED", "LINKED_TRANSFER_FAILED", "ACCOUNT_NOT_FOUND", "LINKED_TRANSFER_FAILED", "ACCOUNT_NOT_FOUND", "POSTED"]
    assert answers[1].metadata == {"failed_transfer_id": "chain-b"}
    assert answers[4].metadata == {"account_id": bobs, "transfer_id": "bad"}
    assert set(ledger.posted) == {"ok-1", "ok-2"}
    assert not set(ledger.registered) & {"chain-a", "chain-b", "chain-c", "bad"}
    # One read for the three debit accounts, on their one shard.
    assert [sorted(read) for read in ledger.owner_reads()] == [sorted([mine, bobs, other_mine])]


def test_create_transfers_looks_owners_up_once_per_shard(ledger):
    debits = [ledger.open("alice", shard=shard.name) for shard in SHARDS for _ in range(2)]
    payee = ledger.open("erin")
    requests = [request(f"t-{number}", debit, payee) for number, debit in enumerate(debits)]
    ledger.run(ledger.service.create_transfers(GATEWAY, requests, [False] * len(requests), TIMEOUT_SECONDS))
    reads = ledger.owner_reads()
    assert len(reads) == len(SHARDS) and sorted(i for read in reads for i in read) == sorted(debits)


def test_an_operator_create_transfers_is_refused_whole(ledger):
    mine, payee = ledger.open("alice"), ledger.open("erin")
    assert refusal(ledger, ledger.service.create_transfers(OPS, [request("t", mine, payee)], [False], TIMEOUT_SECONDS))[0] == "ROLE_NOT_ALLOWED"
    assert ledger.registered == ledger.posted == []


def test_a_velocity_overrun_refuses_the_payers_own_transfers_and_records_nothing_of_them():
    """In a batch, one payer over its allowance is refused on its own chains; a gateway's other
    payers go on (found by review: one hot payer refused the whole batch)."""
    ledger = Ledger(RateLimits({role: GENEROUS for role in Role}, RateLimit(3, 0.01), frozenset({Role.CUSTOMER, Role.SERVICE})))
    mine, payee, someone = ledger.open("alice"), ledger.open("erin"), ledger.open("frank")
    ledger.run(ledger.service.transfer(ALICE, request("t-0", mine, payee), TIMEOUT_SECONDS))
    requests = [request(f"t-{number}", mine, payee) for number in range(1, 4)] + [request("f-1", someone, payee)]
    answers = ledger.run(ledger.service.create_transfers(GATEWAY, requests, [False] * 4, TIMEOUT_SECONDS))
    assert [answer.reason if isinstance(answer, errors.LedgerError) else "ok" for answer in answers] == ["ok", "ok", "RATE_LIMITED", "ok"]
    assert sorted(ledger.posted) == ["f-1", "t-0", "t-1", "t-2"]
    assert "t-3" not in ledger.registered
    # Someone else's attempts on an account take nothing of its allowance.
    fresh = ledger.open("alice")
    for number in range(5):
        with pytest.raises(errors.AccountNotFound):
            ledger.run(ledger.service.transfer(BOB, request(f"b-{number}", fresh, payee), TIMEOUT_SECONDS))
    requests = [request(f"n-{number}", fresh, payee) for number in range(3)]
    answers = ledger.run(ledger.service.create_transfers(ALICE, requests, [False] * 3, TIMEOUT_SECONDS))
    assert not any(isinstance(answer, errors.LedgerError) for answer in answers)
    # An admin is not held by the velocity limit.
    for number in range(5):
        ledger.run(ledger.service.transfer(ROOT, request(f"r-{number}", mine, payee), TIMEOUT_SECONDS))


def test_a_subject_over_its_limit_is_refused_before_anything():
    ledger = Ledger(RateLimits({role: RateLimit(2, 0.01) for role in Role}, GENEROUS, frozenset({Role.CUSTOMER})))
    mine, payee = ledger.open("alice"), ledger.open("erin")
    ledger.run(ledger.service.get_account(ALICE, mine, TIMEOUT_SECONDS))
    ledger.run(ledger.service.get_account(ALICE, mine, TIMEOUT_SECONDS))
    reason, _, metadata = refusal(ledger, ledger.service.transfer(ALICE, request("t", mine, payee), TIMEOUT_SECONDS))
    assert (reason, metadata["limit"]) == ("RATE_LIMITED", "SUBJECT")
    assert ledger.posted == [] and ledger.owner_reads() == []  # the read filled the cache; nothing else was asked


def test_reads_statements_and_closes_of_another_owners_account_answer_as_missing(ledger):
    bobs = ledger.open("bob")
    for call in (
        lambda account_id: ledger.service.get_account(ALICE, account_id, TIMEOUT_SECONDS),
        lambda account_id: ledger.service.list_account_transfers(ALICE, account_id, 10, "", TIMEOUT_SECONDS),
        lambda account_id: ledger.service.close_account(ALICE, account_id, TIMEOUT_SECONDS),
        lambda account_id: ledger.service.update_account_status(ALICE, account_id, AccountStatus.FROZEN, TIMEOUT_SECONDS),
    ):
        not_owned, missing = refusal(ledger, call(bobs)), refusal(ledger, call("acc_nobody"))
        assert not_owned == (missing[0], missing[1].replace("acc_nobody", bobs), {"account_id": bobs})
    mine = ledger.open("alice")
    reason, _, metadata = refusal(ledger, ledger.service.update_account_status(ALICE, mine, AccountStatus.FROZEN, TIMEOUT_SECONDS))
    assert (reason, metadata) == ("ROLE_NOT_ALLOWED", {"role": "customer", "action": "update_account_status"})


def test_open_account_is_refused_before_its_request_id_is_registered(ledger):
    for caller, owner_id, kind, tier, reason in (
        (ALICE, "bob", AccountKind.CUSTOMER, 0, "OWNER_MISMATCH"),
        (ALICE, "alice", AccountKind.SYSTEM, 0, "ROLE_NOT_ALLOWED"),
        (GATEWAY, "bank", AccountKind.SYSTEM, 0, "ROLE_NOT_ALLOWED"),
        (OPS, "ops", AccountKind.CUSTOMER, 0, "ROLE_NOT_ALLOWED"),
    ):
        open_request = OpenAccountRequest("req-1", owner_id, "USD", int(kind), tier)
        assert refusal(ledger, ledger.service.open_account(caller, open_request, TIMEOUT_SECONDS))[0] == reason
    assert ledger.registered == []


def test_the_owner_cache_stays_bounded_and_keeps_the_newest():
    owners = AccountOwners(router=None, ownerships_max=100)
    for number in range(1_000):
        owners.remember(f"acc_{number}", AccountOwnership(f"owner-{number}", AccountKind.CUSTOMER))
        assert len(owners) <= 100
    assert asyncio.run(owners.of("acc_999", TIMEOUT_SECONDS)) == AccountOwnership("owner-999", AccountKind.CUSTOMER)
