"""Token buckets and the rate limiter (services/ledger/rate_limits.py), on an injected clock."""

import json
import math

import pytest

from services.ledger import errors
from services.ledger.access import Caller, Role
from services.ledger.rate_limits import EVICTION_SHARE, RateLimit, RateLimiter, RateLimits, TokenBuckets

ALICE = Caller("alice", Role.CUSTOMER)
BOB = Caller("bob", Role.CUSTOMER)
GATEWAY = Caller("gateway", Role.SERVICE)
ROOT = Caller("root", Role.ADMIN)


class Clock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


def limits(subject=RateLimit(4, 2.0), debit_account=RateLimit(3, 0.5), debit_roles=(Role.CUSTOMER, Role.SERVICE)) -> RateLimits:
    return RateLimits({role: subject for role in Role}, debit_account, frozenset(debit_roles))


def test_a_bucket_starts_full_empties_and_refills_at_its_rate():
    buckets = TokenBuckets(RateLimit(burst=3, per_second=2.0))
    now = 0.0
    for _ in range(3):
        assert buckets.wait_seconds("k", 1, now) == 0.0
        buckets.take("k", 1, now)
    assert buckets.wait_seconds("k", 1, now) == pytest.approx(0.5)
    assert buckets.wait_seconds("k", 2, now) == pytest.approx(1.0)
    assert buckets.wait_seconds("k", 1, now + 0.5) == 0.0
    # Refills up to the burst, never past it.
    assert buckets.tokens("k", now + 100) == 3.0
    assert buckets.wait_seconds("k", 4, now + 100) == math.inf
    assert buckets.wait_seconds("other", 3, now) == 0.0


def test_a_clock_that_goes_back_adds_nothing():
    buckets = TokenBuckets(RateLimit(burst=2, per_second=1.0))
    buckets.take("k", 2, 10.0)
    assert buckets.tokens("k", 5.0) == 0.0


def test_idle_buckets_are_evicted_first_and_the_table_stays_bounded():
    buckets = TokenBuckets(RateLimit(burst=2, per_second=1.0), buckets_max=10)
    for number in range(10):
        buckets.take(f"idle-{number}", 1, 0.0)
    buckets.take("busy", 2, 5.0)  # the others have refilled by now: all dropped
    assert len(buckets) == 1 and buckets.tokens("busy", 5.0) == 0.0
    for number in range(9):
        buckets.take(f"fresh-{number}", 2, 5.0)
    buckets.take("one-more", 1, 5.0)  # nothing idle: the oldest keys make room
    assert len(buckets) <= 10 - int(10 * EVICTION_SHARE) + 1
    assert buckets.tokens("busy", 5.0) == 2.0  # dropped: a full bucket again
    for number in range(10_000):
        buckets.take(f"k-{number}", 1, 6.0)
        assert len(buckets) <= 10


def test_a_subject_over_its_limit_is_refused_with_the_time_until_it_fits():
    clock = Clock()
    limiter = RateLimiter(limits(), clock)
    for _ in range(4):
        limiter.admit_call(ALICE)
    with pytest.raises(errors.RateLimited) as raised:
        limiter.admit_call(ALICE)
    assert raised.value.retry_after_seconds == pytest.approx(0.5)
    assert raised.value.metadata == {"limit": "SUBJECT", "retry_after_ms": "500"}
    assert raised.value.category == errors.Category.RATE_LIMITED
    limiter.admit_call(BOB)  # each subject has its own bucket
    limiter.admit_call(Caller("alice", Role.SERVICE))  # and a subject in another role is another caller
    clock.now += 0.5
    limiter.admit_call(ALICE)


def test_a_batch_takes_a_token_per_transfer_and_one_that_never_fits_is_too_large():
    clock = Clock()
    limiter = RateLimiter(limits(), clock)
    limiter.admit_call(ALICE, 3)
    with pytest.raises(errors.RateLimited):
        limiter.admit_call(ALICE, 2)
    limiter.admit_call(ALICE, 1)  # a refused call took nothing
    with pytest.raises(errors.BatchTooLarge) as raised:
        limiter.admit_call(BOB, 5)
    assert raised.value.metadata == {"limit": "4", "rate_limit": "SUBJECT"}


def test_debits_are_limited_per_account_all_or_nothing():
    clock = Clock()
    limiter = RateLimiter(limits(), clock)
    limiter.admit_debits(ALICE, {"acc_a": 2, "acc_b": 1})
    with pytest.raises(errors.RateLimited) as raised:
        limiter.admit_debits(GATEWAY, {"acc_b": 2, "acc_a": 2})  # acc_b fits, acc_a does not: neither is taken
    assert raised.value.metadata == {"limit": "DEBIT_ACCOUNT", "retry_after_ms": "2000", "account_id": "acc_a"}
    limiter.admit_debits(GATEWAY, {"acc_b": 2})
    with pytest.raises(errors.BatchTooLarge):
        limiter.admit_debits(ALICE, {"acc_c": 4})
    clock.now += 2.0
    limiter.admit_debits(ALICE, {"acc_a": 1})


def test_an_admin_debits_without_a_velocity_limit():
    limiter = RateLimiter(limits(), Clock())
    assert not limiter.debits_limited(ROOT)
    for _ in range(100):
        limiter.admit_debits(ROOT, {"acc_bank": 5_000})


def test_the_default_limits_fit_the_bench_and_a_full_batch_and_hold_back_a_script():
    defaults = RateLimits.load()
    assert defaults.subject[Role.CUSTOMER].per_second < 100  # tens a second
    for role in (Role.SERVICE, Role.ADMIN):
        assert defaults.subject[role].per_second >= 10 * 10_000 / 2  # ten times the bench, per process of two
        assert defaults.subject[role].burst >= 5_000  # CreateTransfers' largest batch
    assert defaults.debit_account_roles == {Role.CUSTOMER, Role.SERVICE}
    velocity = defaults.debit_account
    assert velocity.burst >= 20  # a red-envelope burst
    assert velocity.per_second * 3600 <= 1_000  # a draining script: under a thousand an hour


def test_a_file_overrides_the_defaults_and_bad_values_are_refused(tmp_path):
    table = {
        "subject": {role.value: {"burst": 10, "per_second": 1} for role in Role},
        "debit_account": {"burst": 5, "per_second": 0.1, "roles": ["customer"]},
    }
    path = tmp_path / "limits.json"
    path.write_text(json.dumps(table))
    loaded = RateLimits.load(path)
    assert loaded.subject[Role.ADMIN] == RateLimit(10, 1) and loaded.debit_account_roles == {Role.CUSTOMER}
    for broken in ({"burst": 0, "per_second": 1}, {"burst": 1.5, "per_second": 1}, {"burst": 1, "per_second": 0}):
        table["debit_account"] = {**broken, "roles": []}
        with pytest.raises(ValueError):
            RateLimits.from_json(json.dumps(table))
    del table["subject"]["operator"]
    table["debit_account"] = {"burst": 5, "per_second": 0.1, "roles": []}
    with pytest.raises(ValueError, match="operator"):
        RateLimits.from_json(json.dumps(table))
