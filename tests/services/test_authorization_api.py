"""Authorisation, BOLA protection and rate limits, over mTLS against the real cluster.

Every identity here is a token of its own (channel_as), each test's subjects unique, so
no two tests share a rate-limit bucket. Every refusal is checked to change nothing in the
ledger, from the shards' databases.
"""

from __future__ import annotations

import contextlib
import time
import uuid

import grpc
import psycopg
import pytest
from google.rpc import error_details_pb2, status_pb2

from corebank.v1 import accounts_pb2 as pb
from corebank.v1 import accounts_pb2_grpc, payments_pb2, payments_pb2_grpc, transfers_pb2
from services.ledger import ids
from services.ledger.access import Role
from services.auth import client
from services.ledger.rate_limits import RateLimits
from tests.fixtures.cluster import mint
from tests.fixtures.ledger import failure

pytestmark = pytest.mark.cluster

DEFAULTS = RateLimits.load()
STATUS_DETAILS_KEY = "grpc-status-details-bin"
QUIET_SECONDS_MAX = 10.0
SYSTEM_PREFIXES = (ids.RESERVED_TRANSFER_ID_PREFIX,)
INTERNAL_PREFIXES = (*ids.INTERNAL_ACCOUNT_ID_PREFIXES, ids.COLLECTING_ACCOUNT_ID_PREFIX)


# --- who is calling ---------------------------------------------------------------------------------------------

class As:
    """Stubs acting as one identity: its own channel (channel_as), or a shared one with its token
    on each call (token_metadata)."""

    def __init__(self, channel: grpc.Channel, role: str, subject: str, metadata: tuple = ()) -> None:
        self.accounts = accounts_pb2_grpc.AccountsStub(channel)
        self.payments = payments_pb2_grpc.PaymentsStub(channel)
        self.role = role
        self.subject = subject
        self.metadata = metadata

    def get(self, account_id: str):
        return self.accounts.GetAccount(pb.GetAccountRequest(account_id=account_id), metadata=self.metadata)

    def statement(self, account_id: str, page_size: int = 50):
        return self.accounts.ListAccountTransfers(
            pb.ListAccountTransfersRequest(account_id=account_id, page_size=page_size), metadata=self.metadata
        )

    def open(self, owner_id: str, kind=pb.CUSTOMER, tier: int = 0, currency: str = "USD", request_id: str | None = None):
        return self.accounts.OpenAccount(pb.OpenAccountRequest(
            request_id=request_id or unique("open"), owner_id=owner_id, currency=currency, kind=kind, tier=tier,
        ), metadata=self.metadata)

    def set_status(self, account_id: str, status=pb.FROZEN):
        return self.accounts.UpdateAccountStatus(
            pb.UpdateAccountStatusRequest(account_id=account_id, status=status), metadata=self.metadata
        )

    def close(self, account_id: str):
        return self.accounts.CloseAccount(pb.CloseAccountRequest(account_id=account_id), metadata=self.metadata)

    def transfer(self, debit: str, credit: str, amount_minor: int = 100, transfer_id: str | None = None):
        return self.payments.Transfer(transfer_request(debit, credit, amount_minor, transfer_id), metadata=self.metadata)

    def create(self, requests: list[payments_pb2.TransferRequest]) -> list[payments_pb2.TransferResult]:
        return list(self.payments.CreateTransfers(
            payments_pb2.CreateTransfersRequest(transfers=requests), metadata=self.metadata
        ).results)

    def get_transfer(self, transfer_id: str):
        return self.payments.GetTransfer(payments_pb2.GetTransferRequest(transfer_id=transfer_id), metadata=self.metadata)


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def transfer_request(debit: str, credit: str, amount_minor: int = 100, transfer_id: str | None = None, linked: bool = False):
    return payments_pb2.TransferRequest(
        transfer_id=transfer_id or unique("t"), debit_account_id=debit, credit_account_id=credit,
        amount_minor=amount_minor, currency="USD", linked=linked,
    )


def missing_account_id() -> str:
    """An account id no one opened, of the same shape and length as every other."""
    return ids.account_id_for_request(unique("never-opened"))


@pytest.fixture
def as_(channel_as):
    """as_(role, name): that identity, with a subject unique to this test."""
    run = uuid.uuid4().hex[:8]
    made: dict[tuple[str, str], As] = {}

    def identity(role: str, name: str) -> As:
        if (role, name) not in made:
            subject = f"{name}-{run}"
            made[role, name] = As(channel_as(role, subject), role, subject)
        return made[role, name]

    return identity


@pytest.fixture
def one_process(cluster):
    """one_process(role, name): that identity over one TLS connection shared by every identity of
    the test, its token on each call. Rate limits are per gRPC worker process, and one
    connection reaches one process, so what one identity's calls use up the others see."""
    run = uuid.uuid4().hex[:8]
    with client.channel(cluster, None) as channel:

        def identity(role: str, name: str) -> As:
            subject = f"{name}-{run}"
            token = mint(cluster, role, subject)
            return As(channel, role, subject, ((client.AUTHORIZATION_METADATA, f"Bearer {token}"),))

        yield identity


@pytest.fixture
def admin(grpc_channel) -> As:
    return As(grpc_channel, "admin", "cluster-admin")


@pytest.fixture
def bank(admin) -> str:
    return admin.open("bank", kind=pb.SYSTEM).account_id


def funded(admin: As, bank: str, owner_id: str, amount_minor: int = 100_000, tier: int = 2) -> str:
    account_id = admin.open(owner_id, tier=tier).account_id
    assert admin.transfer(bank, account_id, amount_minor).status == transfers_pb2.POSTED
    return account_id


# --- what a refusal looks like ------------------------------------------------------------------------------------

def refused(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as raised:
        call()
    return raised.value


def status_bytes(error: grpc.RpcError) -> bytes:
    return dict(error.trailing_metadata())[STATUS_DETAILS_KEY]


def answer(error: grpc.RpcError) -> tuple:
    """Everything a client can read of a refusal: code, message, and the google.rpc.Status bytes."""
    return error.code(), error.details(), status_bytes(error)


def as_if(error: grpc.RpcError, missing_id: str, named_id: str) -> tuple:
    """The answer for `missing_id`, as if it had named `named_id` (ids of the same length, so the
    status bytes' length prefixes are the same)."""
    assert len(missing_id) == len(named_id)
    code, details, raw = answer(error)
    return code, details.replace(missing_id, named_id), raw.replace(missing_id.encode(), named_id.encode())


def result_as_if(result: payments_pb2.TransferResult, missing_id: str, named_id: str) -> bytes:
    assert result.HasField("error") and len(missing_id) == len(named_id)
    return result.error.SerializeToString(deterministic=True).replace(missing_id.encode(), named_id.encode())


def reason_of(error: grpc.RpcError) -> tuple[grpc.StatusCode, str, dict]:
    return failure(error)


def retry_info(error: grpc.RpcError) -> tuple[error_details_pb2.ErrorInfo, float]:
    """The ErrorInfo and the RetryInfo's delay (seconds) of a RESOURCE_EXHAUSTED answer, from its trailer."""
    status = status_pb2.Status.FromString(status_bytes(error))
    info, retry = error_details_pb2.ErrorInfo(), error_details_pb2.RetryInfo()
    found_info = [detail.Unpack(info) for detail in status.details if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR)]
    found_retry = [detail.Unpack(retry) for detail in status.details if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR)]
    assert found_info == [True] and found_retry == [True], status
    assert status.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
    return info, retry.retry_delay.ToTimedelta().total_seconds()


# --- the ledger, from its databases -------------------------------------------------------------------------------

def _not_internal(column: str) -> str:
    return " AND ".join(f"NOT starts_with({column}, '{prefix}')" for prefix in INTERNAL_PREFIXES)


def _not_system(column: str) -> str:
    return " AND ".join(f"NOT starts_with({column}, '{prefix}')" for prefix in SYSTEM_PREFIXES)


# Rows and counters a client's request could change. The ledger's own sweeps (sys: ids, on
# sub-accounts and collecting merchants) and clearing accounts move on their own and are left out.
SNAPSHOT = [
    f"SELECT count(*) FROM transfers WHERE {_not_system('transfer_id')}",
    f"SELECT count(*) FROM id_registry WHERE {_not_system('id')}",
    f"SELECT count(*) FROM tcc_transfers WHERE {_not_system('transfer_id')}",
    f"""SELECT count(*), coalesce(sum(debits_posted_minor), 0), coalesce(sum(credits_posted_minor), 0),
               coalesce(sum(debits_pending_minor), 0), coalesce(sum(credits_pending_minor), 0),
               coalesce(sum(status), 0), max(updated_at)
        FROM accounts WHERE {_not_internal('account_id')}""",
]


def ledger_state(cluster: dict) -> list:
    state = []
    for shard in cluster["shards"]:
        with psycopg.connect(shard["dsn"], autocommit=True) as connection:
            state.append([connection.execute(query).fetchone() for query in SNAPSHOT])
    return state


def quiet_state(cluster: dict) -> list:
    """The state once nothing moves (a previous test's transfer between shards may still be finishing)."""
    deadline = time.monotonic() + QUIET_SECONDS_MAX
    state = ledger_state(cluster)
    while time.monotonic() < deadline:
        time.sleep(0.2)
        again = ledger_state(cluster)
        if again == state:
            return state
        state = again
    raise AssertionError("the ledger kept changing with no client calling it")


@pytest.fixture
def unchanged(cluster):
    """`with unchanged():` the block's calls leave the ledger as it was."""

    @contextlib.contextmanager
    def block():
        before = quiet_state(cluster)
        yield
        assert ledger_state(cluster) == before, "a refused request changed the ledger"

    return block


# --- BOLA: another owner's accounts answer exactly like missing ones -----------------------------------------------

def test_a_customer_reads_and_lists_only_its_own_accounts(as_, admin, bank, unchanged):
    alice, bob = as_("customer", "alice"), as_("customer", "bob")
    mine = alice.open(alice.subject).account_id
    bobs = funded(admin, bank, bob.subject)
    shop_named_alice = admin.open(alice.subject, kind=pb.SYSTEM).account_id  # the bank's, whatever its owner_id
    assert alice.get(mine).owner_id == alice.subject
    assert list(alice.statement(mine).transfers) == []
    assert bob.get(bobs).balance_minor == 100_000
    missing = missing_account_id()
    with unchanged():
        for named in (bobs, shop_named_alice, bank):
            for call in (alice.get, alice.statement):
                assert answer(refused(lambda: call(named))) == as_if(refused(lambda: call(missing)), missing, named)
        code, reason, metadata = reason_of(refused(lambda: alice.get(bobs)))
        assert (code, reason, metadata) == (grpc.StatusCode.NOT_FOUND, "ACCOUNT_NOT_FOUND", {"account_id": bobs})


def test_a_customer_debits_only_its_own_accounts_and_credits_any(as_, admin, ledger, shard_map, unchanged):
    alice, bob = as_("customer", "alice"), as_("customer", "bob")
    shard = shard_map.shards[0].name  # one shard, so that a linked chain of their accounts may exist
    bank = ledger.bank(shard).account_id
    mine = ledger.open(owner_id=alice.subject, tier=0, shard=shard).account_id
    bobs = ledger.open(owner_id=bob.subject, tier=2, shard=shard).account_id
    ledger.transfer(bank, mine, 10_000)
    ledger.transfer(bank, bobs, 100_000)
    missing = missing_account_id()
    transfer_id = unique("t")
    with unchanged():
        for named in (bobs, bank):
            # The same transfer_id each time: nothing was registered, so no conflict either.
            stolen = refused(lambda: alice.transfer(named, mine, 500, transfer_id=transfer_id))
            assert answer(stolen) == as_if(refused(lambda: alice.transfer(missing, mine, 500, transfer_id=transfer_id)), missing, named)
            assert reason_of(stolen) == (grpc.StatusCode.NOT_FOUND, "ACCOUNT_NOT_FOUND", {"account_id": named, "transfer_id": transfer_id})
            (stolen_result,) = alice.create([transfer_request(named, mine, 500, transfer_id)])
            (missing_result,) = alice.create([transfer_request(missing, mine, 500, transfer_id)])
            assert stolen_result.error.SerializeToString(deterministic=True) == result_as_if(missing_result, missing, named)
        # A linked chain with someone else's debit fails whole, and records nothing of it.
        chain = [
            transfer_request(mine, bobs, 100, linked=True), transfer_request(bobs, mine, 100, linked=True),
            transfer_request(mine, bobs, 100),
        ]
        results = alice.create(chain)
        reasons = [status_reason(result.error) for result in results]
        assert reasons == ["LINKED_TRANSFER_FAILED", "ACCOUNT_NOT_FOUND", "LINKED_TRANSFER_FAILED"]
        assert all(result.error.code == grpc.StatusCode.FAILED_PRECONDITION.value[0] for result in (results[0], results[2]))
        for request in chain:  # not recorded: an admin finds none of them
            assert reason_of(refused(lambda: admin.get_transfer(request.transfer_id)))[1] == "TRANSFER_NOT_FOUND"
    paid = alice.transfer(mine, bobs, 700)
    assert paid.status == transfers_pb2.POSTED
    assert alice.get(mine).balance_minor == 10_000 - 700
    assert bob.get(bobs).balance_minor == 100_000 + 700
    (ok, stolen) = alice.create([transfer_request(mine, bobs, 300), transfer_request(bobs, mine, 300)])
    assert ok.transfer.status == transfers_pb2.POSTED and status_reason(stolen.error) == "ACCOUNT_NOT_FOUND"


def status_reason(status: status_pb2.Status) -> str:
    info = error_details_pb2.ErrorInfo()
    assert status.details[0].Unpack(info)
    return info.reason


def test_get_transfer_of_anothers_transfer_answers_as_missing(as_, admin, bank, unchanged):
    alice, bob, carol = as_("customer", "alice"), as_("customer", "bob"), as_("customer", "carol")
    mine = funded(admin, bank, alice.subject)
    bobs = funded(admin, bank, bob.subject)
    carols = admin.open(carol.subject).account_id
    bob_to_carol = bob.transfer(bobs, carols, 250, transfer_id=unique("t")).transfer_id
    alice_to_bob = alice.transfer(mine, bobs, 100, transfer_id=unique("t")).transfer_id
    never = unique("t")
    assert len(never) == len(bob_to_carol)
    with unchanged():
        assert answer(refused(lambda: alice.get_transfer(bob_to_carol))) == as_if(
            refused(lambda: alice.get_transfer(never)), never, bob_to_carol
        )
        assert reason_of(refused(lambda: alice.get_transfer(bob_to_carol)))[:2] == (grpc.StatusCode.NOT_FOUND, "TRANSFER_NOT_FOUND")
        assert bob.get_transfer(bob_to_carol).amount_minor == 250
        assert carol.get_transfer(bob_to_carol).amount_minor == 250  # the credit side sees it too
        assert alice.get_transfer(alice_to_bob) == bob.get_transfer(alice_to_bob)
        for role in ("service", "operator"):
            assert as_(role, "back-office").get_transfer(bob_to_carol).transfer_id == bob_to_carol


# --- roles ----------------------------------------------------------------------------------------------------------

def test_each_role_may_do_only_what_its_role_allows(as_, admin, bank, unchanged):
    alice, bob = as_("customer", "alice"), as_("customer", "bob")
    gateway, ops = as_("service", "gateway"), as_("operator", "ops")
    mine = funded(admin, bank, alice.subject)
    bobs = funded(admin, bank, bob.subject)
    empty = admin.open(alice.subject).account_id
    denied = grpc.StatusCode.PERMISSION_DENIED
    refusals = {
        "customer opens for another owner": (lambda: alice.open(bob.subject), (denied, "OWNER_MISMATCH", {"field": "owner_id"})),
        "customer opens SYSTEM": (
            lambda: alice.open(alice.subject, kind=pb.SYSTEM), (denied, "ROLE_NOT_ALLOWED", {"role": "customer", "action": "open_system_account"}),
        ),
        "customer changes its own status": (
            lambda: alice.set_status(mine), (denied, "ROLE_NOT_ALLOWED", {"role": "customer", "action": "update_account_status"}),
        ),
        "customer changes another's status": (
            lambda: alice.set_status(bobs), (grpc.StatusCode.NOT_FOUND, "ACCOUNT_NOT_FOUND", {"account_id": bobs}),
        ),
        "customer closes another's account": (
            lambda: alice.close(bobs), (grpc.StatusCode.NOT_FOUND, "ACCOUNT_NOT_FOUND", {"account_id": bobs}),
        ),
        "customer closes the bank's account": (
            lambda: alice.close(bank), (grpc.StatusCode.NOT_FOUND, "ACCOUNT_NOT_FOUND", {"account_id": bank}),
        ),
        "service opens SYSTEM": (
            lambda: gateway.open("bank", kind=pb.SYSTEM), (denied, "ROLE_NOT_ALLOWED", {"role": "service", "action": "open_system_account"}),
        ),
        "service debits SYSTEM": (
            lambda: gateway.transfer(bank, mine, 1), (denied, "ROLE_NOT_ALLOWED", {"role": "service", "action": "transfer_from_system_account"}),
        ),
        "service reads SYSTEM": (
            lambda: gateway.get(bank), (denied, "ROLE_NOT_ALLOWED", {"role": "service", "action": "read_system_account"}),
        ),
        "service lists SYSTEM": (
            lambda: gateway.statement(bank), (denied, "ROLE_NOT_ALLOWED", {"role": "service", "action": "read_system_account"}),
        ),
        "service closes SYSTEM": (
            lambda: gateway.close(bank), (denied, "ROLE_NOT_ALLOWED", {"role": "service", "action": "close_system_account"}),
        ),
        "service changes a status": (
            lambda: gateway.set_status(mine), (denied, "ROLE_NOT_ALLOWED", {"role": "service", "action": "update_account_status"}),
        ),
        "service debits a missing account": (
            lambda: gateway.transfer(missing_account_id(), mine, 1, transfer_id="t-missing-debit"),
            (grpc.StatusCode.NOT_FOUND, "ACCOUNT_NOT_FOUND", None),
        ),
        "operator transfers": (
            lambda: ops.transfer(mine, bobs, 1), (denied, "ROLE_NOT_ALLOWED", {"role": "operator", "action": "transfer"}),
        ),
        "operator creates transfers": (
            lambda: ops.create([transfer_request(mine, bobs, 1)]), (denied, "ROLE_NOT_ALLOWED", {"role": "operator", "action": "transfer"}),
        ),
        "operator opens an account": (
            lambda: ops.open(alice.subject), (denied, "ROLE_NOT_ALLOWED", {"role": "operator", "action": "open_account"}),
        ),
    }
    with unchanged():
        for name, (call, expected) in refusals.items():
            code, reason, metadata = reason_of(refused(call))
            assert (code, reason) == expected[:2], name
            if expected[2] is not None:
                assert metadata == expected[2], name
    # What each role may do.
    assert alice.open(alice.subject, kind=pb.MERCHANT).owner_id == alice.subject
    assert alice.close(empty).status == pb.CLOSED
    assert gateway.open(bob.subject, tier=3).tier == 3
    assert gateway.get(mine).account_id == mine and len(gateway.statement(bobs).transfers) == 1
    assert gateway.transfer(mine, bank, 10).status == transfers_pb2.POSTED  # paying the bank: a credit, allowed
    assert gateway.transfer(mine, bobs, 10).status == transfers_pb2.POSTED
    assert gateway.close(gateway.open(bob.subject).account_id).status == pb.CLOSED
    assert ops.get(bank).kind == pb.SYSTEM and ops.get(mine).account_id == mine
    assert len(ops.statement(mine).transfers) == 3
    assert ops.set_status(bobs, pb.BLOCK_DEBIT).status == pb.BLOCK_DEBIT
    assert ops.set_status(bobs, pb.ACTIVE).status == pb.ACTIVE
    assert ops.close(admin.open(bob.subject).account_id).status == pb.CLOSED
    assert admin.transfer(bank, mine, 1).status == transfers_pb2.POSTED
    assert admin.set_status(bank, pb.ACTIVE).kind == pb.SYSTEM


# Methods a role may never call, whatever it names: refused for the role before the request is read.
ROLE_REFUSED = {("operator", "transfer from"), ("operator", "transfer to"), ("operator", "create"), ("service", "set status")}


@pytest.mark.parametrize("role", ["customer", "service", "operator", "admin"])
def test_internal_accounts_are_refused_by_name_to_every_role(role, as_, admin, ledger, shard_map, cluster, unchanged):
    caller = admin if role == "admin" else as_(role, "caller")
    first, second = (shard.name for shard in shard_map.shards[:2])
    # A transfer between shards (clearing accounts) and a merchant collecting on every shard (sub-accounts).
    ledger.transfer(ledger.bank(first).account_id, ledger.open(shard=second).account_id, 1)
    ledger.open(kind=pb.MERCHANT, tier=3, owner_id="shop", collect_on_every_shard=True)
    merchant = ledger.open(kind=pb.MERCHANT, tier=3, owner_id="shop").account_id
    bank = ledger.bank(first).account_id
    internal = []
    with psycopg.connect(next(s["dsn"] for s in cluster["shards"] if s["name"] == first), autocommit=True) as connection:
        for prefix in (ids.CLEARING_ACCOUNT_ID_PREFIX, ids.COLLECTION_ACCOUNT_ID_PREFIX):
            (account_id,) = connection.execute(
                "SELECT account_id FROM accounts WHERE starts_with(account_id, %s) ORDER BY created_at DESC LIMIT 1", [prefix]
            ).fetchone()
            internal.append(account_id)
    with unchanged():
        for account_id in internal:
            calls = {
                "get": lambda: caller.get(account_id), "statement": lambda: caller.statement(account_id),
                "set status": lambda: caller.set_status(account_id), "close": lambda: caller.close(account_id),
                "transfer from": lambda: caller.transfer(account_id, merchant, 1), "transfer to": lambda: caller.transfer(bank, account_id, 1),
                "create": lambda: caller.create([transfer_request(account_id, merchant, 1)]),
            }
            for name, call in calls.items():
                try:
                    results = call()
                except grpc.RpcError as error:
                    code, reason, metadata = reason_of(error)
                    if (role, name) in ROLE_REFUSED:
                        assert (code, reason) == (grpc.StatusCode.PERMISSION_DENIED, "ROLE_NOT_ALLOWED"), name
                    else:
                        assert (code, reason, metadata["account_id"]) == (grpc.StatusCode.INVALID_ARGUMENT, "INTERNAL_ACCOUNT", account_id), name
                else:  # CreateTransfers answers per transfer
                    assert [status_reason(result.error) for result in results] == ["INTERNAL_ACCOUNT"], name


# --- rate limits ----------------------------------------------------------------------------------------------------

def test_a_customer_over_its_rate_limit_gets_resource_exhausted_with_retry_info(one_process, admin, unchanged):
    alice = one_process("customer", "alice")
    mine = admin.open(alice.subject).account_id
    limit = DEFAULTS.subject[Role.CUSTOMER]
    with unchanged():
        calls = 0
        while True:
            try:
                alice.get(mine)
            except grpc.RpcError as error:
                limited = error
                break
            calls += 1
            assert calls <= limit.burst * 3, "never limited"
    assert limited.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    info, delay_seconds = retry_info(limited)
    assert (info.reason, info.domain, info.metadata["limit"]) == ("RATE_LIMITED", "corebank.v1", "SUBJECT")
    assert 0 < delay_seconds <= 1 / limit.per_second + 0.01
    assert int(info.metadata["retry_after_ms"]) == round(delay_seconds * 1000)
    assert calls >= limit.burst
    time.sleep(delay_seconds)
    assert alice.get(mine).account_id == mine
    # One call more than a customer's bucket holds can never fit: split it, no waiting helps.
    too_many = [transfer_request(mine, mine + "x", 1) for _ in range(limit.burst + 1)]
    assert reason_of(refused(lambda: alice.create(too_many)))[:2] == (grpc.StatusCode.INVALID_ARGUMENT, "BATCH_TOO_LARGE")


def test_the_velocity_limit_of_a_debit_account_holds_for_a_service_and_not_for_an_admin(one_process, bank, unchanged):
    # Every identity on one connection: the buckets are per process (see one_process).
    gateway, customer, mallory = one_process("service", "gateway"), one_process("customer", "dora"), one_process("customer", "mallory")
    admin = one_process("admin", "funding")  # exempt from velocity limits: shown on the same process
    drained = funded(admin, bank, customer.subject, amount_minor=1_000_000)
    other = funded(admin, bank, customer.subject, amount_minor=1_000_000)
    payee = admin.open("payee").account_id
    velocity = DEFAULTS.debit_account
    posted = 0
    while True:
        transfer_id = unique("drain")
        try:
            gateway.transfer(drained, payee, 1, transfer_id=transfer_id)
        except grpc.RpcError as error:
            limited = error
            break
        posted += 1
        assert posted <= velocity.burst + 5, "never limited"
    assert velocity.burst <= posted <= velocity.burst + 2
    info, delay_seconds = retry_info(limited)
    assert dict(info.metadata) == {"limit": "DEBIT_ACCOUNT", "account_id": drained, "retry_after_ms": info.metadata["retry_after_ms"]}
    assert 0 < delay_seconds <= 1 / velocity.per_second + 0.01
    assert reason_of(refused(lambda: admin.get_transfer(transfer_id)))[1] == "TRANSFER_NOT_FOUND"  # nothing recorded
    with unchanged():
        assert reason_of(refused(lambda: customer.transfer(drained, payee, 1)))[1] == "RATE_LIMITED"
    # In a gateway's batch, the payer over its allowance is refused on its own transfers (with
    # their own RetryInfo), and nothing of them is recorded; the other payers' transfers go on.
    limited_id = unique("limited")
    results = gateway.create([transfer_request(other, payee, 1), transfer_request(drained, payee, 1, transfer_id=limited_id)])
    assert results[0].transfer.status == transfers_pb2.POSTED
    assert status_reason(results[1].error) == "RATE_LIMITED"
    assert any(detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR) for detail in results[1].error.details)
    assert reason_of(refused(lambda: admin.get_transfer(limited_id)))[1] == "TRANSFER_NOT_FOUND"
    # Per account: another account of the same owner is not held; an admin is never held.
    assert customer.transfer(other, payee, 1).status == transfers_pb2.POSTED
    for _ in range(5):
        assert admin.transfer(drained, payee, 1).status == transfers_pb2.POSTED
    # Someone else's refused attempts on an account take nothing of its allowance.
    fresh = funded(admin, bank, customer.subject)
    with unchanged():
        for _ in range(velocity.burst + 1):
            assert reason_of(refused(lambda: mallory.transfer(fresh, payee, 1)))[1] == "ACCOUNT_NOT_FOUND"
    results = customer.create([transfer_request(fresh, payee, 1) for _ in range(velocity.burst)])
    assert all(result.transfer.status == transfers_pb2.POSTED for result in results)


def test_a_customer_reusing_another_owners_ids_learns_none_of_their_fields(as_, admin, bank, unchanged):
    """transfer_id and request_id are bank-wide: the refusal of a taken id must not list the fields
    that differ from its first use, or a customer could test guesses of another owner's payee,
    amount and reference one call at a time (found by review)."""
    alice, bob = as_("customer", "alice"), as_("customer", "bob")
    bobs, bob_payee = funded(admin, bank, bob.subject), bob.open(bob.subject).account_id
    alices = funded(admin, bank, alice.subject)
    secret = bob.transfer(bobs, bob_payee, 123)
    taken_request_id = unique("bob-request")
    bob.open(bob.subject, request_id=taken_request_id)
    guesses = [(bob_payee, 123), (bob_payee, 999), (bank, 123)]
    with unchanged():
        answers = set()
        for credit, amount in guesses:
            error = refused(lambda: alice.transfer(alices, credit, amount, transfer_id=secret.transfer_id))
            code, reason, metadata = reason_of(error)
            assert (code, reason, metadata) == (grpc.StatusCode.ALREADY_EXISTS, "IDEMPOTENCY_CONFLICT", {"transfer_id": secret.transfer_id})
            answers.add(answer(error))
        assert len(answers) == 1, "the answer differs with the guess"
        (result,) = alice.create([transfer_request(alices, bob_payee, 123, transfer_id=secret.transfer_id)])
        assert result.HasField("error") and "conflicting_fields" not in result.error.SerializeToString().decode("latin-1")
        error = refused(lambda: alice.open(alice.subject, request_id=taken_request_id))
        code, reason, metadata = reason_of(error)
        assert (code, reason) == (grpc.StatusCode.ALREADY_EXISTS, "IDEMPOTENCY_CONFLICT") and "conflicting_fields" not in metadata
