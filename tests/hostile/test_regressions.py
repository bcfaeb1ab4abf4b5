"""One test per money-safety finding of the hostile-client review, asserting the REQUIRED
behaviour (README, protos/corebank/v1/errors.proto). Each reads the databases to judge.

Findings: 1 transfer id reuse across debit shards; 3 clearing overflow; 4 collected money
stranded, client-chosen sweep ids, internal accounts named by clients; 5 collecting
merchants' caps and close; 6 linked chains and duplicate ids in one call; 7 the
OpenAccount race. (Finding 2 is covered by unit tests elsewhere.)
"""

from __future__ import annotations

import concurrent.futures
import random
import threading
import time

import grpc
import pytest

from corebank.v1 import accounts_pb2, payments_pb2, transfers_pb2
from services.collection import collection_account_id
from services.coordinator.clearing import CLEARING_LANES
from services.ledger.ids import account_id_for_request
from sharding.slots import slot_of
from tests.fixtures.ledger import failure
from tests.hostile import support

pytestmark = [pytest.mark.cluster, pytest.mark.hostile]

CALL_TIMEOUT_SECONDS = support.CALL_TIMEOUT_SECONDS
# An idempotency conflict is known on the debit shard at once: answered within this, never
# after a pending timeout (the test cluster's is 8 s).
PROMPT_ANSWER_SECONDS_MAX = 3.0
SWEEP_WAIT_SECONDS_MAX = 6.0
INT64_MAX = 2**63 - 1


def names(shard_map) -> list[str]:
    return [shard.name for shard in shard_map.shards]


def refused(call, *args, **kwargs) -> tuple[grpc.StatusCode, str, dict[str, str]]:
    """(code, reason, metadata) of a call that must fail."""
    try:
        answer = call(*args, **kwargs)
    except grpc.RpcError as error:
        return failure(error)
    raise AssertionError(f"expected a refusal, got {answer}")


def get_transfer(ledger, transfer_id: str):
    return ledger.payments.GetTransfer(payments_pb2.GetTransferRequest(transfer_id=transfer_id), timeout=CALL_TIMEOUT_SECONDS)


def create(ledger, requests):
    return ledger.payments.CreateTransfers(payments_pb2.CreateTransfersRequest(transfers=requests), timeout=CALL_TIMEOUT_SECONDS)


def request(transfer_id, debit, credit, amount, currency="USD", linked=False):
    return payments_pb2.TransferRequest(
        transfer_id=transfer_id, debit_account_id=debit.account_id if hasattr(debit, "account_id") else debit,
        credit_account_id=credit.account_id if hasattr(credit, "account_id") else credit,
        amount_minor=amount, currency=currency, linked=linked,
    )


def result_reason(result) -> tuple[grpc.StatusCode | str, str]:
    if result.HasField("transfer"):
        return "OK", transfers_pb2.TransferStatus.Name(result.transfer.status)
    from google.rpc import error_details_pb2

    info = error_details_pb2.ErrorInfo()
    assert result.error.details and result.error.details[0].Unpack(info), f"no ErrorInfo in {result.error}"
    return next(c for c in grpc.StatusCode if c.value[0] == result.error.code), info.reason


def balances(cluster, *accounts) -> list[int]:
    stored = support.stored_accounts(cluster["shards"], "account_id = ANY(%s)", [[a.account_id for a in accounts]])
    return [stored[a.account_id].balance_minor for a in accounts]


def clearing_net(cluster, currency: str) -> int:
    rows = support.query(cluster["shards"], """
        SELECT coalesce(sum(credits_posted_minor::numeric - debits_posted_minor::numeric), 0)
        FROM accounts WHERE owner_id = %s AND currency = %s""", [support.CLEARING_OWNER_ID, currency])
    return sum(int(row[0]) for _, row in rows)


def not_final(cluster, transfer_ids) -> list:
    rows = support.query(cluster["shards"], "SELECT transfer_id, state FROM tcc_transfers WHERE transfer_id = ANY(%s) AND state NOT IN (4, 5, 6)", [list(transfer_ids)])
    rows += support.query(cluster["shards"], "SELECT transfer_id, branch FROM transfers WHERE transfer_id = ANY(%s) AND status = 1", [list(transfer_ids)])
    return rows


def wait_final(cluster, transfer_ids, seconds_max: float = support.QUIESCENCE_WAIT_SECONDS_MAX) -> list:
    deadline = time.monotonic() + seconds_max
    while (left := not_final(cluster, transfer_ids)) and time.monotonic() < deadline:
        time.sleep(support.QUIESCENCE_POLL_SECONDS)
    return left


def wait_swept(ledger, merchant_id: str, seconds_max: float = SWEEP_WAIT_SECONDS_MAX) -> accounts_pb2.Account:
    deadline = time.monotonic() + seconds_max
    while (account := ledger.get(merchant_id)).collecting_minor and time.monotonic() < deadline:
        time.sleep(0.25)
    return account


def summary(transfer) -> tuple:
    return (transfer.transfer_id, transfer.debit_account_id, transfer.credit_account_id, transfer.amount_minor,
            transfer.currency, transfers_pb2.TransferStatus.Name(transfer.status))


# ---------------------------------------------------------------------------------------
# Finding 1: a transfer id reused on another debit shard.

REUSE_CURRENCY = "EUR"


def test_1_an_id_reused_from_another_debit_shard_is_refused_and_changes_nothing(ledger, shard_map, cluster):
    s0, s1, s2 = names(shard_map)
    a, b = ledger.funded(10_000, s0, currency=REUSE_CURRENCY), ledger.open(shard=s1, currency=REUSE_CURRENCY)
    e, f = ledger.funded(10_000, s2, currency=REUSE_CURRENCY), ledger.open(shard=s1, currency=REUSE_CURRENCY)
    x = ledger.unique_id("reuse")
    first = ledger.transfer(a.account_id, b.account_id, 1_000, currency=REUSE_CURRENCY, transfer_id=x)
    assert first.status == transfers_pb2.POSTED
    code, reason, _ = refused(ledger.transfer, e.account_id, f.account_id, 2_000, currency=REUSE_CURRENCY, transfer_id=x, timeout=CALL_TIMEOUT_SECONDS)
    leftover = wait_final(cluster, [x])
    assert (code, reason) == (grpc.StatusCode.ALREADY_EXISTS, "IDEMPOTENCY_CONFLICT")
    assert leftover == [], f"{x} still in flight: {leftover}"
    assert balances(cluster, a, b, e, f) == [9_000, 1_000, 10_000, 0], "the reused id moved money"
    assert support.id_violations(cluster["shards"], [x]) == []
    assert [r.shard for r in support.records_by_id(cluster["shards"], [x])[x]] == [s0]
    assert clearing_net(cluster, REUSE_CURRENCY) == 0
    answers = {summary(get_transfer(ledger, x)) for _ in range(6)}
    assert answers == {summary(first)}, f"GetTransfer {x} answers {answers}"


def test_1_a_same_shard_id_reused_by_a_transfer_crediting_that_shard_conflicts_at_once(ledger, shard_map, cluster):
    s0, s1, s2 = names(shard_map)
    a, a2 = ledger.funded(10_000, s0, currency=REUSE_CURRENCY), ledger.open(shard=s0, currency=REUSE_CURRENCY)
    e, b0 = ledger.funded(10_000, s2, currency=REUSE_CURRENCY), ledger.open(shard=s0, currency=REUSE_CURRENCY)
    x = ledger.unique_id("reuse")
    first = ledger.transfer(a.account_id, a2.account_id, 700, currency=REUSE_CURRENCY, transfer_id=x)
    assert first.status == transfers_pb2.POSTED
    started = time.monotonic()
    answer = refused(ledger.transfer, e.account_id, b0.account_id, 300, currency=REUSE_CURRENCY, transfer_id=x, timeout=CALL_TIMEOUT_SECONDS)
    elapsed = time.monotonic() - started
    leftover = wait_final(cluster, [x])
    assert answer[:2] == (grpc.StatusCode.ALREADY_EXISTS, "IDEMPOTENCY_CONFLICT"), f"answered {answer[:2]} after {elapsed:.1f}s"
    assert elapsed < PROMPT_ANSWER_SECONDS_MAX, f"the conflict took {elapsed:.1f}s"
    assert leftover == []
    assert balances(cluster, a, a2, e, b0) == [9_300, 700, 10_000, 0]
    assert support.id_violations(cluster["shards"], [x]) == []
    assert clearing_net(cluster, REUSE_CURRENCY) == 0
    assert {summary(get_transfer(ledger, x)) for _ in range(6)} == {summary(first)}


REUSE_ROUNDS = 5


def test_1_an_id_in_flight_reused_from_other_shards_posts_once(ledger, shard_map, cluster):
    s0, s1, s2 = names(shard_map)
    a, b = ledger.funded(100_000, s0, currency=REUSE_CURRENCY), ledger.open(shard=s1, currency=REUSE_CURRENCY)
    e, f = ledger.funded(100_000, s2, currency=REUSE_CURRENCY), ledger.open(shard=s1, currency=REUSE_CURRENCY)
    g = ledger.funded(100_000, s1, currency=REUSE_CURRENCY)
    journal = support.Journal()
    ids = []
    for _ in range(REUSE_ROUNDS):
        x = ledger.unique_id("inflight")
        ids.append(x)
        attempts = [request(x, a, b, 100, REUSE_CURRENCY), request(x, e, f, 200, REUSE_CURRENCY), request(x, g, f, 300, REUSE_CURRENCY)]
        barrier = threading.Barrier(len(attempts))

        def attempt(message):
            barrier.wait()
            return support.transfer(ledger, journal, message)

        with concurrent.futures.ThreadPoolExecutor(len(attempts)) as pool:
            answers = list(pool.map(attempt, attempts))
        posted = [answer for answer in answers if answer.acknowledged_posted]
        assert len(posted) == 1, f"round {x}: {[str(a) for a in answers]}"
        assert all(answer.code == grpc.StatusCode.ALREADY_EXISTS for answer in answers if answer is not posted[0]), [str(a) for a in answers]
    assert wait_final(cluster, ids) == []
    assert support.id_violations(cluster["shards"], ids) == []
    assert support.model_violations(cluster["shards"], journal, [x.account_id for x in (a, b, e, f, g)], [], all_ids_journaled=False) == []
    assert clearing_net(cluster, REUSE_CURRENCY) == 0


# ---------------------------------------------------------------------------------------
# Finding 3: a clearing lane driven to the int64 edge.

OVERFLOW_CURRENCY = "CNY"  # no other test uses it: this test saturates its clearing lanes on purpose
ORDINARY_TRANSFERS_PER_DIRECTION = 4


def ids_in_lane(ledger, prefix: str, lane: int, count: int) -> list[str]:
    found = []
    while len(found) < count:
        candidate = ledger.unique_id(prefix)
        if slot_of(candidate) % CLEARING_LANES == lane:
            found.append(candidate)
    return found


def test_3_after_a_huge_transfer_between_shards_ordinary_ones_still_end_final(ledger, shard_map, cluster):
    s0, s1, _ = names(shard_map)
    system_0 = ledger.open(kind=accounts_pb2.SYSTEM, tier=0, currency=OVERFLOW_CURRENCY, shard=s0)
    system_1 = ledger.open(kind=accounts_pb2.SYSTEM, tier=0, currency=OVERFLOW_CURRENCY, shard=s1)
    buyer_0 = ledger.funded(1_000_000, s0, currency=OVERFLOW_CURRENCY)
    buyer_1 = ledger.funded(1_000_000, s1, currency=OVERFLOW_CURRENCY)
    huge_id = ledger.unique_id("huge")
    lane = slot_of(huge_id) % CLEARING_LANES
    journal = support.Journal()
    huge = support.transfer(ledger, journal, request(huge_id, system_0, system_1, INT64_MAX - 7, OVERFLOW_CURRENCY))
    assert huge.acknowledged_posted or (huge.code, huge.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "BALANCE_OVERFLOW"), str(huge)
    ordinary = [request(i, buyer_0, buyer_1, 1_000, OVERFLOW_CURRENCY) for i in ids_in_lane(ledger, "lane", lane, ORDINARY_TRANSFERS_PER_DIRECTION)]
    ordinary += [request(i, buyer_1, buyer_0, 500, OVERFLOW_CURRENCY) for i in ids_in_lane(ledger, "lane", lane, ORDINARY_TRANSFERS_PER_DIRECTION)]
    ordinary += [request(ledger.unique_id("back"), system_1, system_0, 10, OVERFLOW_CURRENCY)]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda message: support.transfer(ledger, journal, message), ordinary))
    ids = [huge_id] + [message.transfer_id for message in ordinary]
    leftover = wait_final(cluster, ids)
    wrong = [str(a) for a in answers if not (a.acknowledged_posted or (a.code, a.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "BALANCE_OVERFLOW"))]
    assert wrong == [], "ordinary transfers must end POSTED or REJECTED BALANCE_OVERFLOW:\n  " + "\n  ".join(wrong)
    assert leftover == [], f"transfers left in flight: {leftover}"
    assert journal.breaches == []
    assert support.model_violations(cluster["shards"], journal, [x.account_id for x in (system_0, system_1, buyer_0, buyer_1)], [], all_ids_journaled=False) == []
    assert clearing_net(cluster, OVERFLOW_CURRENCY) == 0
    assert [v for v in support.audit_cluster(cluster["shards"]).violations()] == []


# ---------------------------------------------------------------------------------------
# Finding 4: collected money never stranded; no client-chosen sweep ids; no internal accounts.

def collecting_merchant(ledger, currency="USD"):
    return ledger.open(kind=accounts_pb2.MERCHANT, tier=3, currency=currency, collect_on_every_shard=True)


def set_status(ledger, account_id, status):
    return ledger.accounts.UpdateAccountStatus(accounts_pb2.UpdateAccountStatusRequest(account_id=account_id, status=status), timeout=CALL_TIMEOUT_SECONDS)


def test_4_money_collected_before_a_freeze_reaches_the_merchant_after_it(ledger, shard_map, cluster):
    s0, s1, _ = names(shard_map)
    merchant = collecting_merchant(ledger)
    buyer_0, buyer_1 = ledger.funded(10_000, s0), ledger.funded(10_000, s1)
    assert ledger.transfer(buyer_0.account_id, merchant.account_id, 1_234).status == transfers_pb2.POSTED
    set_status(ledger, merchant.account_id, accounts_pb2.FROZEN)
    time.sleep(2.5)  # sweeps run (every second) while the merchant is frozen
    code, reason, _ = refused(ledger.transfer, buyer_1.account_id, merchant.account_id, 99)
    assert (code, reason) == (grpc.StatusCode.FAILED_PRECONDITION, "ACCOUNT_FROZEN")
    set_status(ledger, merchant.account_id, accounts_pb2.ACTIVE)
    swept = wait_swept(ledger, merchant.account_id)
    assert (swept.balance_minor, swept.collecting_minor) == (1_234, 0), "collected money stranded after the unfreeze"
    assert support.stranded_collections(cluster["shards"], [merchant.account_id]) == []
    assert balances(cluster, buyer_0, buyer_1) == [10_000 - 1_234, 10_000]


def test_4_a_client_cannot_choose_a_sweep_id(ledger, shard_map, cluster):
    s0 = names(shard_map)[0]
    payer, payee = ledger.funded(1_000, s0), ledger.open(shard=s0)
    merchant = collecting_merchant(ledger)
    sub = collection_account_id(shard_map, s0, merchant.account_id)
    reserved = [f"sys:{sub.removeprefix('sub_')}:0", "sys:" + ledger.unique_id("mine"), "sys:"]
    for transfer_id in reserved:
        code, reason, metadata = refused(ledger.transfer, payer.account_id, payee.account_id, 10, transfer_id=transfer_id)
        assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "RESERVED_ID"), f"{transfer_id}: {code.name}/{reason}"
        assert metadata.get("field") == "transfer_id"
    results = create(ledger, [request(reserved[1], payer, payee, 10)]).results
    assert result_reason(results[0]) == (grpc.StatusCode.INVALID_ARGUMENT, "RESERVED_ID")
    assert support.records_by_id(cluster["shards"], reserved) == {}, "a reserved id was recorded"
    assert balances(cluster, payer, payee) == [1_000, 0]


def test_4_a_client_squatting_the_next_sweep_id_strands_nothing(ledger, shard_map, cluster):
    """The sweep id is derived from the sub-account's state, so a client can predict it."""
    s0 = names(shard_map)[0]
    merchant = collecting_merchant(ledger)
    sub = collection_account_id(shard_map, s0, merchant.account_id)
    squatter, accomplice = ledger.funded(1_000, s0), ledger.open(shard=s0)
    for prefix in ("sw", "sys"):
        try:
            ledger.transfer(squatter.account_id, accomplice.account_id, 1, transfer_id=f"{prefix}:{sub.removeprefix('sub_')}:0")
        except grpc.RpcError as error:
            assert failure(error)[0] != grpc.StatusCode.INTERNAL
    buyer = ledger.funded(5_000, s0)
    assert ledger.transfer(buyer.account_id, merchant.account_id, 4_321).status == transfers_pb2.POSTED
    swept = wait_swept(ledger, merchant.account_id)
    assert (swept.balance_minor, swept.collecting_minor) == (4_321, 0), "a squatted sweep id stranded the collected money"
    assert support.stranded_collections(cluster["shards"], [merchant.account_id]) == []


def internal_accounts(ledger, shard_map, cluster, shard: str):
    """A collecting merchant's sub-account that has just collected a payment, and a clearing account, on `shard`."""
    merchant = collecting_merchant(ledger)
    buyer = ledger.funded(5_000, shard)
    other = next(n for n in names(shard_map) if n != shard)
    # A USD transfer from this shard to another opens (or uses) a clearing account here.
    ledger.transfer(ledger.funded(10, shard).account_id, ledger.open(shard=other).account_id, 10)
    assert ledger.transfer(buyer.account_id, merchant.account_id, 2_000).status == transfers_pb2.POSTED
    subs = support.sub_accounts(cluster["shards"], [merchant.account_id])
    sub = next(s.account_id for s in subs.values() if s.shard == shard)
    clearing = support.query([s for s in cluster["shards"] if s["name"] == shard],
                             "SELECT account_id FROM accounts WHERE owner_id = %s AND currency = 'USD' LIMIT 1", [support.CLEARING_OWNER_ID])
    return merchant, sub, clearing[0][1][0]


def test_4_a_client_cannot_debit_or_credit_an_internal_account(ledger, shard_map, cluster):
    s0, s1, _ = names(shard_map)
    merchant, sub, clearing = internal_accounts(ledger, shard_map, cluster, s0)
    thief, far_thief = ledger.funded(100, s0), ledger.funded(100, s1)
    before = support.stored_accounts(cluster["shards"], "account_id = ANY(%s)", [[clearing]])[clearing].balance_minor
    attempts = [
        (clearing, thief.account_id), (thief.account_id, clearing), (clearing, far_thief.account_id),
        (sub, thief.account_id), (thief.account_id, sub), (sub, far_thief.account_id),
    ]
    ids, wrong = [], []
    for debit, credit in attempts:
        transfer_id = ledger.unique_id("internal")
        ids.append(transfer_id)
        try:
            posted = ledger.transfer(debit, credit, 50, transfer_id=transfer_id, timeout=CALL_TIMEOUT_SECONDS)
        except grpc.RpcError as error:
            code, reason, metadata = failure(error)
        else:
            code, reason, metadata = grpc.StatusCode.OK, transfers_pb2.TransferStatus.Name(posted.status), {}
        if (code, reason, metadata.get("account_id")) not in ((grpc.StatusCode.INVALID_ARGUMENT, "INTERNAL_ACCOUNT", a) for a in (debit, credit)):
            wrong.append(f"{debit}->{credit}: {code.name}/{reason} {metadata}")
    results = create(ledger, [request(ledger.unique_id("internal"), clearing, thief, 50)]).results
    if result_reason(results[0]) != (grpc.StatusCode.INVALID_ARGUMENT, "INTERNAL_ACCOUNT"):
        wrong.append(f"CreateTransfers {clearing}->{thief.account_id}: {result_reason(results[0])}")
    wait_final(cluster, ids)
    recorded = support.records_by_id(cluster["shards"], ids)
    after = support.stored_accounts(cluster["shards"], "account_id = ANY(%s)", [[clearing]])[clearing].balance_minor
    assert wrong == [], "internal accounts named by a client:\n  " + "\n  ".join(wrong)
    assert recorded == {}, f"transfers naming internal accounts were recorded: {recorded}"
    assert (after, balances(cluster, thief, far_thief)) == (before, [100, 100])


def test_4_a_client_cannot_read_an_internal_account(ledger, shard_map, cluster):
    _, sub, clearing = internal_accounts(ledger, shard_map, cluster, names(shard_map)[0])
    for account_id in (sub, clearing):
        code, reason, _ = refused(ledger.get, account_id)
        assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INTERNAL_ACCOUNT"), f"GetAccount {account_id}: {code.name}/{reason}"


# ---------------------------------------------------------------------------------------
# Finding 5: collecting merchants need an uncapped tier; closing one under payments.

@pytest.mark.parametrize("tier", [0, 1, 2])
def test_5_a_collecting_merchant_at_a_capped_tier_is_refused(ledger, cluster, tier):
    request_id = ledger.unique_id("capped")
    code, reason, metadata = refused(ledger.accounts.OpenAccount, accounts_pb2.OpenAccountRequest(
        request_id=request_id, owner_id="owner", currency="USD", kind=accounts_pb2.MERCHANT, tier=tier, collect_on_every_shard=True,
    ))
    assert (code, reason, metadata.get("field")) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_FIELD", "collect_on_every_shard")
    merchant_id = account_id_for_request(request_id, True)
    assert support.stored_accounts(cluster["shards"], "account_id = %s OR parent_account_id = %s", [merchant_id, merchant_id]) == {}


CLOSE_RACE_ROUNDS = 10
PAYMENTS_PER_PAYER = 4
PRICE_MINOR = 100


def test_5_closing_a_collecting_merchant_under_payments_strands_nothing(ledger, shard_map, cluster):
    shards = names(shard_map)
    payers = [ledger.funded(PRICE_MINOR * PAYMENTS_PER_PAYER * CLOSE_RACE_ROUNDS, shard) for shard in shards]
    problems = []
    outcomes = []
    for round_number in range(CLOSE_RACE_ROUNDS):
        merchant = collecting_merchant(ledger)
        journal = support.Journal()
        start = threading.Barrier(len(payers) + 1)

        def pay(payer):
            start.wait()
            for _ in range(PAYMENTS_PER_PAYER):
                support.transfer(ledger, journal, request(ledger.unique_id("pay"), payer, merchant, PRICE_MINOR))

        def close():
            start.wait()
            time.sleep(random.Random(round_number).uniform(0, 0.03))
            return support.close_account(ledger, journal, merchant.account_id)

        with concurrent.futures.ThreadPoolExecutor(len(payers) + 1) as pool:
            paying = [pool.submit(pay, payer) for payer in payers]
            closed = pool.submit(close).result()
            for done in paying:
                done.result()
        outcomes.append(closed)
        acknowledged = sum(a.request.amount_minor for a in journal.answers if a.acknowledged_posted)
        problems += [f"round {round_number}: {b}" for b in journal.breaches]
        if closed[0] == grpc.StatusCode.OK:
            time.sleep(2.0)  # sweeps would run now
            stored = support.stored_accounts(cluster["shards"], "account_id = %s", [merchant.account_id])[merchant.account_id]
            subs = support.sub_accounts(cluster["shards"], [merchant.account_id])
            closed_at = support.query(cluster["shards"], "SELECT updated_at FROM accounts WHERE account_id = %s", [merchant.account_id])[0][1][0]
            late = support.query(cluster["shards"], """
                SELECT transfer_id FROM transfers WHERE credit_account_id = %s AND status = 2 AND created_at > %s""", [merchant.account_id, closed_at])
            if stored.balance_minor or any(s.balance_minor for s in subs.values()):
                problems.append(f"round {round_number}: closed with {stored.balance_minor} in the merchant and "
                                f"{sum(s.balance_minor for s in subs.values())} stranded in its sub-accounts (acknowledged {acknowledged})")
            if late:
                problems.append(f"round {round_number}: {len(late)} payments POSTED after the close")
        else:
            if closed[:2] != (grpc.StatusCode.FAILED_PRECONDITION, "ACCOUNT_BALANCE_NOT_ZERO"):
                problems.append(f"round {round_number}: CloseAccount answered {closed[0].name}/{closed[1]}")
            swept = wait_swept(ledger, merchant.account_id)
            if (swept.balance_minor, swept.collecting_minor) != (acknowledged, 0):
                problems.append(f"round {round_number}: merchant holds {swept.balance_minor} + collecting {swept.collecting_minor}, acknowledged {acknowledged}")
    assert problems == [], "\n".join(problems) + f"\nclose outcomes: {[(c[0].name, c[1]) for c in outcomes]}"


# ---------------------------------------------------------------------------------------
# Finding 6: linked chains are atomic; one id twice in one call is refused whole.

def test_6_a_chain_naming_an_existing_rejected_transfer_is_refused_whole(ledger, shard_map, cluster):
    s0 = names(shard_map)[0]
    payer, payee = ledger.funded(1_000, s0), ledger.open(shard=s0)
    existing = ledger.unique_id("rejected")
    code, reason, _ = refused(ledger.transfer, payer.account_id, payee.account_id, 5_000, transfer_id=existing)
    assert reason == "INSUFFICIENT_FUNDS"
    new_ids = [ledger.unique_id("new"), ledger.unique_id("new")]
    chain = [request(existing, payer, payee, 5_000, linked=True), request(new_ids[0], payer, payee, 100, linked=True),
             request(new_ids[1], payee, payer, 50)]
    results = create(ledger, chain).results
    answers = [result_reason(r) for r in results]
    assert answers == [
        (grpc.StatusCode.ALREADY_EXISTS, "TRANSFER_EXISTS"),
        (grpc.StatusCode.FAILED_PRECONDITION, "LINKED_TRANSFER_FAILED"),
        (grpc.StatusCode.FAILED_PRECONDITION, "LINKED_TRANSFER_FAILED"),
    ], answers
    records = support.records_by_id(cluster["shards"], new_ids + [existing])
    assert not any(r.status == "POSTED" for rs in records.values() for r in rs), f"part of the chain was posted: {records}"
    assert balances(cluster, payer, payee) == [1_000, 0]
    assert (get_transfer(ledger, existing).status, get_transfer(ledger, existing).reason) == (transfers_pb2.REJECTED, "INSUFFICIENT_FUNDS")


def test_6_a_chain_naming_an_existing_posted_transfer_is_refused_whole(ledger, shard_map, cluster):
    s0 = names(shard_map)[0]
    payer, payee = ledger.funded(1_000, s0), ledger.open(shard=s0)
    existing = ledger.unique_id("posted")
    assert ledger.transfer(payer.account_id, payee.account_id, 100, transfer_id=existing).status == transfers_pb2.POSTED
    for amount, expected in ((100, "TRANSFER_EXISTS"), (200, "IDEMPOTENCY_CONFLICT")):
        fresh = ledger.unique_id("new")
        results = create(ledger, [request(existing, payer, payee, amount, linked=True), request(fresh, payer, payee, 300)]).results
        answers = [result_reason(r) for r in results]
        assert answers == [(grpc.StatusCode.ALREADY_EXISTS, expected), (grpc.StatusCode.FAILED_PRECONDITION, "LINKED_TRANSFER_FAILED")], answers
        assert not any(r.status == "POSTED" for r in support.records_by_id(cluster["shards"], [fresh]).get(fresh, []))
    assert balances(cluster, payer, payee) == [900, 100]


def test_6_a_chain_whose_members_all_exist_is_a_retry(ledger, shard_map, cluster):
    s0 = names(shard_map)[0]
    payer, payee = ledger.funded(1_000, s0), ledger.open(shard=s0)
    chain = [request(ledger.unique_id("c"), payer, payee, 100, linked=True), request(ledger.unique_id("c"), payee, payer, 40)]
    first = [summary(r.transfer) for r in create(ledger, chain).results]
    assert [s[-1] for s in first] == ["POSTED", "POSTED"]
    again = create(ledger, chain).results
    assert [result_reason(r) for r in again] == [("OK", "POSTED"), ("OK", "POSTED")]
    assert [summary(r.transfer) for r in again] == first
    assert balances(cluster, payer, payee) == [940, 60]


def test_6_the_same_id_twice_in_one_call_is_refused_whole(ledger, shard_map, cluster):
    s0, s1, _ = names(shard_map)
    payer, payee, far = ledger.funded(1_000, s0), ledger.open(shard=s0), ledger.open(shard=s1)
    calls = []
    for shape in ("same fields", "other fields", "in a chain", "between shards", "with a neighbour"):
        twice, other = ledger.unique_id("twice"), ledger.unique_id("other")
        calls.append(({
            "same fields": [request(twice, payer, payee, 10), request(twice, payer, payee, 10)],
            "other fields": [request(twice, payer, payee, 10), request(twice, payer, payee, 20)],
            "in a chain": [request(twice, payer, payee, 10, linked=True), request(twice, payer, payee, 10)],
            "between shards": [request(twice, payer, far, 10), request(twice, payer, far, 30)],
            "with a neighbour": [request(other, payer, payee, 5), request(twice, payer, payee, 10), request(twice, payer, payee, 10)],
        }[shape], shape, [twice, other]))
    for requests, shape, ids in calls:
        code, reason, metadata = refused(create, ledger, requests)
        assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "DUPLICATE_TRANSFER_ID"), f"{shape}: {code.name}/{reason}"
        assert metadata.get("transfer_id") == ids[0]
        assert wait_final(cluster, ids) == []
        assert support.records_by_id(cluster["shards"], ids) == {}, f"{shape}: recorded"
    assert balances(cluster, payer, payee, far) == [1_000, 0, 0]


DUPLICATE_CALLER_PAIRS = 3
INNOCENT_CLIENTS = 16
INNOCENT_TRANSFERS = 8


def test_6_duplicate_id_calls_cause_no_collateral_failures(ledger, shard_map, cluster):
    """Duplicate-id calls, fired in pairs that name the same ids with other accounts, beside innocent clients."""
    s0 = names(shard_map)[0]
    innocents = [(ledger.funded(10_000, s0), ledger.open(shard=s0)) for _ in range(INNOCENT_CLIENTS)]
    attackers = [(ledger.funded(10_000, s0), ledger.open(shard=s0)) for _ in range(2 * DUPLICATE_CALLER_PAIRS)]
    journal = support.Journal()
    stop = threading.Event()
    rounds = [0] * DUPLICATE_CALLER_PAIRS
    barriers = [threading.Barrier(2) for _ in range(DUPLICATE_CALLER_PAIRS)]

    def attack(index: int):
        pair, side = divmod(index, 2)
        attacker, target = attackers[index]
        while True:
            try:
                barriers[pair].wait(timeout=5)
            except threading.BrokenBarrierError:
                return
            if stop.is_set():
                barriers[pair].abort()
                return
            twice = f"dup-{ledger._run}-{pair}-{rounds[pair]}"
            if side == 0:
                rounds[pair] += 1
            support.create_transfers(ledger, support.Journal(), [request(twice, attacker, target, 1), request(twice, attacker, target, 2)])

    def innocent(pair):
        payer, payee = pair
        return [support.transfer(ledger, journal, request(ledger.unique_id("ok"), payer, payee, 10)) for _ in range(INNOCENT_TRANSFERS)]

    with concurrent.futures.ThreadPoolExecutor(len(attackers) + INNOCENT_CLIENTS) as pool:
        attacking = [pool.submit(attack, index) for index in range(len(attackers))]
        answers = [a for done in [pool.submit(innocent, pair) for pair in innocents] for a in done.result()]
        stop.set()
        for done in attacking:
            done.result()
    failed = [str(a) for a in answers if not a.acknowledged_posted]
    assert failed == [], f"{len(failed)} innocent transfers failed beside duplicate-id calls:\n  " + "\n  ".join(failed[:10])
    assert journal.breaches == []


# ---------------------------------------------------------------------------------------
# Finding 7: the OpenAccount race on one request_id with opposite collect_on_every_shard.

OPEN_RACE_ROUNDS = 5
OPENERS = 12


def test_7_concurrent_opens_of_one_request_id_make_exactly_one_account(ledger, cluster):
    problems = []
    for round_number in range(OPEN_RACE_ROUNDS):
        request_id = ledger.unique_id("race")
        barrier = threading.Barrier(OPENERS)

        def open_account(collect: bool):
            barrier.wait()
            try:
                return ("OK", ledger.accounts.OpenAccount(accounts_pb2.OpenAccountRequest(
                    request_id=request_id, owner_id="owner", currency="USD", kind=accounts_pb2.MERCHANT, tier=3,
                    collect_on_every_shard=collect,
                ), timeout=CALL_TIMEOUT_SECONDS).account_id)
            except grpc.RpcError as error:
                code, reason, _ = failure(error)
                return (code.name, reason)

        with concurrent.futures.ThreadPoolExecutor(OPENERS) as pool:
            answers = list(pool.map(open_account, [i % 2 == 0 for i in range(OPENERS)]))
        both = [account_id_for_request(request_id, False), account_id_for_request(request_id, True)]
        stored = support.stored_accounts(cluster["shards"], "account_id = ANY(%s)", [both])
        opened = {a[1] for a in answers if a[0] == "OK"}
        if len(stored) != 1:
            problems.append(f"round {round_number}: {len(stored)} accounts exist for one request_id: {sorted(stored)}; answers {answers}")
        elif opened != set(stored):
            problems.append(f"round {round_number}: answered {opened}, stored {sorted(stored)}")
        losers = [a for a in answers if a[0] != "OK"]
        if any(a != ("ALREADY_EXISTS", "IDEMPOTENCY_CONFLICT") for a in losers):
            problems.append(f"round {round_number}: losers answered {losers}")
        subs = support.sub_accounts(cluster["shards"], [both[1]])
        if (both[1] in stored) != bool(subs):
            problems.append(f"round {round_number}: sub-accounts {sorted(subs)} for stored {sorted(stored)}")
    assert problems == [], "\n".join(problems)
