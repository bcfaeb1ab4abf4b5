"""Rate limits per subject and velocity limits per debit account: token buckets.

Two named limits guard every call (services/ledger_service.py applies them):

- SUBJECT: each caller (role and token subject) has a bucket, sized by its role. Every call
  takes one token; CreateTransfers takes one per transfer. It bounds what one token can make
  the ledger do, refused calls included (a customer enumerating account ids is slowed down
  like any other).
- DEBIT_ACCOUNT: a velocity limit, a fraud control. Each account debited by a caller of the
  listed roles (customer and service by default; an admin funding from SYSTEM accounts is
  exempt, an operator moves no money) has a bucket; every transfer from it takes a token,
  whether it then posts or is refused by the posting rules. Only authorised debits take
  tokens, so nobody can use up the allowance of an account that is not theirs.

A call over its limit is refused whole and changes nothing: RATE_LIMITED (RESOURCE_EXHAUSTED
with a google.rpc.RetryInfo of the time until it fits). A CreateTransfers that could never
fit (more transfers than the bucket holds) is BATCH_TOO_LARGE instead, since no wait helps.

The defaults (rate_limits.json) and why:
- customer: 20 calls a second, bursts of 40. A person's app makes a few calls per screen;
  tens a second is generous for a human and far too little for a scraping script.
- operator: 50 a second, bursts of 100: back-office tools and humans.
- service, admin: 50,000 a second, bursts of 100,000 in each process. A service or admin
  token drives a whole payments gateway, or the load test: `make bench` pushes about 10,000
  transfers a second through the whole cluster, so this is tens of times above it; the
  burst holds many CreateTransfers of the largest size (5,000).
- debit account: bursts of 30 transfers, then one every 5 seconds (12 a minute). A wallet's
  red-envelope burst at midnight (a few dozen envelopes to family groups within a minute)
  fits; a script draining an account is held to 720 transfers an hour, each under its tier's
  transfer cap, while fraud monitoring looks. Payroll and other bulk payouts go through an
  admin (exempt) or a raised limit.

Override them with a JSON file of the same shape, named by the environment variable
COREBANK_RATE_LIMITS (read by services/ledger_service.py when the process starts).

Limits are per process. Each gRPC worker process (several share the port, GRPC_WORKERS)
keeps its own buckets, so the cluster admits up to that many times a limit in all: a
client's calls over one channel (one HTTP/2 connection) all reach one process, and a
client that opens several channels may reach several. Buckets are kept in memory only, at
most BUCKETS_MAX per limit: a bucket that has filled up again is the same as a new one, so
idle ones are dropped first when the table is full.

Pure: the clock is injected (seconds, monotonic), so the buckets are tested without waiting.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import importlib.resources
import json
import math
import pathlib
from collections.abc import Callable, Mapping

from services.ledger import errors
from services.ledger.access import Caller, Role

RATE_LIMITS_FILE = "rate_limits.json"
# Buckets kept per limit in one process (a key, two floats and a dict slot: about 200 bytes
# each, so at most about 20 MB per limit). A bucket refills completely in burst / per_second
# seconds (2 s for a customer, 150 s for a debit account) and is then dropped first.
BUCKETS_MAX = 100_000
# When the table is full, an eviction frees at least this share of it, so that evictions
# cost O(1) per new bucket on average even when no bucket is idle.
EVICTION_SHARE = 0.1


class LimitName(enum.Enum):
    """RATE_LIMITED's `limit` metadata."""

    SUBJECT = "SUBJECT"
    DEBIT_ACCOUNT = "DEBIT_ACCOUNT"


@dataclasses.dataclass(frozen=True)
class RateLimit:
    burst: int  # tokens a full bucket holds: calls (or transfers) at once
    per_second: float  # tokens added back each second

    def __post_init__(self) -> None:
        if not (isinstance(self.burst, int) and self.burst >= 1):
            raise ValueError(f"burst must be a whole number >= 1, not {self.burst!r}")
        if not (isinstance(self.per_second, (int, float)) and math.isfinite(self.per_second) and self.per_second > 0):
            raise ValueError(f"per_second must be a number > 0, not {self.per_second!r}")

    @property
    def refill_seconds(self) -> float:
        """How long an empty bucket takes to fill up again."""
        return self.burst / self.per_second


@dataclasses.dataclass(frozen=True)
class RateLimits:
    subject: dict[Role, RateLimit]
    debit_account: RateLimit
    debit_account_roles: frozenset[Role]

    @classmethod
    def from_json(cls, text: str) -> RateLimits:
        table = json.loads(text)
        by_role = table["subject"]
        missing = [role.value for role in Role if role.value not in by_role]
        if missing:
            raise ValueError(f"rate limits: no subject limit for {', '.join(missing)}")
        debit_account = table["debit_account"]
        return cls(
            subject={role: RateLimit(by_role[role.value]["burst"], by_role[role.value]["per_second"]) for role in Role},
            debit_account=RateLimit(debit_account["burst"], debit_account["per_second"]),
            debit_account_roles=frozenset(Role(name) for name in debit_account["roles"]),
        )

    def digest(self) -> str:
        """SHA-256 of the limits in force (the audit log's chains name it: a change shows there)."""
        table = (
            sorted((role.value, limit.burst, limit.per_second) for role, limit in self.subject.items()),
            (self.debit_account.burst, self.debit_account.per_second), sorted(role.value for role in self.debit_account_roles),
        )
        return hashlib.sha256(repr(table).encode()).hexdigest()

    @classmethod
    def load(cls, path: pathlib.Path | None = None) -> RateLimits:
        """The limits of a JSON file, or the built-in defaults (rate_limits.json)."""
        if path is not None:
            return cls.from_json(pathlib.Path(path).read_text())
        return cls.from_json(importlib.resources.files("services.ledger").joinpath(RATE_LIMITS_FILE).read_text())


class TokenBuckets:
    """The token buckets of one limit, by key. A key's bucket starts full."""

    def __init__(self, limit: RateLimit, buckets_max: int = BUCKETS_MAX) -> None:
        assert buckets_max >= 1
        self.limit = limit
        self.buckets_max = buckets_max
        self._burst = float(limit.burst)
        self._per_second = float(limit.per_second)
        # key -> [tokens, seconds when counted]; in the order the keys were first seen.
        self._buckets: dict[str, list[float]] = {}

    def __len__(self) -> int:
        return len(self._buckets)

    def tokens(self, key: str, now: float) -> float:
        bucket = self._buckets.get(key)
        if bucket is None:
            return self._burst
        elapsed_seconds = now - bucket[1]
        if elapsed_seconds <= 0:
            return bucket[0]
        return min(self._burst, bucket[0] + elapsed_seconds * self._per_second)

    def try_take(self, key: str, cost: int, now: float) -> float:
        """Take `cost` tokens and answer 0.0, or take none and answer `wait_seconds` (one call
        instead of two: the path of every call)."""
        tokens = self.tokens(key, now)
        if tokens < cost:
            return self.wait_seconds(key, cost, now)
        bucket = self._buckets.get(key)
        if bucket is not None:
            bucket[0] = tokens - cost
            bucket[1] = now
            return 0.0
        if len(self._buckets) >= self.buckets_max:
            self._evict(now)
        self._buckets[key] = [tokens - cost, now]
        return 0.0

    def wait_seconds(self, key: str, cost: int, now: float) -> float:
        """0.0 if `cost` tokens are there now; else how long until they are (inf: never, cost > burst)."""
        if cost > self.limit.burst:
            return math.inf
        missing = cost - self.tokens(key, now)
        return 0.0 if missing <= 0 else missing / self.limit.per_second

    def take(self, key: str, cost: int, now: float) -> None:
        """Take `cost` tokens, which `wait_seconds` said are there."""
        wait_seconds = self.try_take(key, cost, now)
        assert wait_seconds == 0.0, f"took {cost} tokens of {key} with {self.tokens(key, now)} left"

    def _evict(self, now: float) -> None:
        """Drop every bucket that has filled up again (the same as no bucket); if that frees too
        little, the oldest keys too (their callers get a full bucket back: a little more leeway,
        only when more keys are active at once than BUCKETS_MAX)."""
        burst, per_second = self._burst, self._per_second
        busy = [(key, bucket) for key, bucket in self._buckets.items() if bucket[0] + (now - bucket[1]) * per_second < burst]
        keep_max = self.buckets_max - max(1, int(self.buckets_max * EVICTION_SHARE))
        # A new table, not deletions from the front of this one: a dict finds its first live
        # entry by scanning past every one deleted before it, so FIFO deletions cost O(n) each.
        self._buckets = dict(busy[len(busy) - keep_max:] if len(busy) > keep_max else busy)


class RateLimiter:
    """The limits of one process: subject buckets per role, and the debit accounts' buckets."""

    def __init__(self, limits: RateLimits, clock: Callable[[], float], buckets_max: int = BUCKETS_MAX) -> None:
        self.limits = limits
        self.clock = clock
        self._subjects = {role: TokenBuckets(limit, buckets_max) for role, limit in limits.subject.items()}
        self._admin_subjects = self._subjects[Role.ADMIN]  # the hot path's (an Enum's hash is Python code)
        self._debit_accounts = TokenBuckets(limits.debit_account, buckets_max)
        self._debit_roles = tuple(limits.debit_account_roles)  # `in` a tuple compares by identity first

    def admit_call(self, caller: Caller, cost: int = 1) -> None:
        """Take `cost` tokens of the caller's subject bucket, or refuse the call whole."""
        # One table per role: a subject in another role is another caller.
        role = caller.role
        buckets = self._admin_subjects if role is Role.ADMIN else self._subjects[role]
        wait_seconds = buckets.try_take(caller.subject, cost, self.clock())
        if wait_seconds:
            raise _refusal(LimitName.SUBJECT, buckets.limit, cost, wait_seconds, f"the rate limit of {role.value} {caller.subject}")

    def debits_limited(self, caller: Caller) -> bool:
        return caller.role in self._debit_roles

    def admit_debits(self, caller: Caller, debits: Mapping[str, int]) -> None:
        """Take a token per transfer from each debit account's bucket (account id -> transfers),
        all or none: the first account without enough refuses the call whole."""
        if not self.debits_limited(caller):
            return
        buckets = self._debit_accounts
        now = self.clock()
        for account_id, cost in debits.items():
            wait_seconds = buckets.wait_seconds(account_id, cost, now)
            if wait_seconds:
                raise _refusal(
                    LimitName.DEBIT_ACCOUNT, buckets.limit, cost, wait_seconds, f"the velocity limit of account {account_id}",
                    account_id=account_id,
                )
        for account_id, cost in debits.items():
            buckets.take(account_id, cost, now)


def _refusal(name: LimitName, limit: RateLimit, cost: int, wait_seconds: float, what: str, **metadata: object) -> errors.LedgerError:
    if math.isinf(wait_seconds):
        return errors.BatchTooLarge(
            f"{cost} transfers in one call exceed {what} ({limit.burst} at once); split the call",
            limit=limit.burst, rate_limit=name.value, **metadata,
        )
    return errors.RateLimited(
        f"{what} is used up ({limit.burst} at once, {limit.per_second:g} a second); retry in {wait_seconds:.3f} s",
        wait_seconds, limit=name.value, **metadata,
    )
