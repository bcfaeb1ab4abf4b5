"""Accounts: kinds, statuses, balances and the rules on their lifecycle."""

from __future__ import annotations

import dataclasses
import datetime
import enum

from services.ledger import clearing, errors, ids, money
from services.ledger.limits import TierLimits


class AccountKind(enum.IntEnum):
    """Numbers match corebank.v1.AccountKind (a unit test holds them together)."""

    CUSTOMER = 1
    MERCHANT = 2
    SYSTEM = 3


class AccountStatus(enum.IntEnum):
    """Numbers match corebank.v1.AccountStatus."""

    ACTIVE = 1
    BLOCK_DEBIT = 2
    BLOCK_CREDIT = 3
    FROZEN = 4
    CLOSED = 5


# UpdateAccountStatus may set these; CLOSED only comes from CloseAccount.
SETTABLE_STATUSES = frozenset({AccountStatus.ACTIVE, AccountStatus.BLOCK_DEBIT, AccountStatus.BLOCK_CREDIT, AccountStatus.FROZEN})


@dataclasses.dataclass(frozen=True)
class OpenAccountRequest:
    request_id: str
    owner_id: str
    currency: str
    kind: int
    tier: int
    collect_on_every_shard: bool = False
    # The institution the account belongs to; "" (the default) is the hosting participant's.
    participant_id: str = ""

    def validated(self, limits: TierLimits) -> OpenAccountRequest:
        """The request checked, with its participant named (the hosting one when left empty)."""
        ids.validate_id(self.request_id, "request_id")
        ids.validate_id(self.owner_id, "owner_id")
        money.validate_currency(self.currency)
        if self.kind == 0:
            raise errors.MissingField("kind is required", field="kind")
        if self.kind not in AccountKind._value2member_map_:
            raise errors.InvalidField(f"unknown kind {self.kind}", field="kind")
        limits.validate_tier(self.tier, self.currency)
        if self.collect_on_every_shard and self.kind != AccountKind.MERCHANT:
            raise errors.InvalidField("only MERCHANT accounts collect on every shard", field="collect_on_every_shard")
        if self.collect_on_every_shard and limits.limit(self.tier, self.currency).balance_cap_minor is not None:
            # A balance cap must hold for the merchant's whole balance, collecting included; its
            # sub-accounts on every shard are credited without coordination, so no shard could
            # enforce it. Collecting is for verified businesses, whose tiers have no balance cap.
            raise errors.InvalidField(
                f"collect_on_every_shard needs a tier without a balance cap; tier {self.tier} has one for {self.currency}",
                field="collect_on_every_shard",
            )
        if not self.participant_id:
            return dataclasses.replace(self, participant_id=clearing.HOSTING_PARTICIPANT_ID)
        clearing.validate_participant_id(self.participant_id)
        return self

    def registry_fields(self) -> dict:
        """What the request_id is registered with bank-wide: a reuse with other fields is a conflict."""
        fields = {
            "owner_id": self.owner_id, "currency": self.currency, "kind": self.kind, "tier": self.tier,
            "collect_on_every_shard": self.collect_on_every_shard,
        }
        if self.participant_id and self.participant_id != clearing.HOSTING_PARTICIPANT_ID:
            # Only when not the hosting one: ids registered before participants existed (all of
            # them the hosting participant's) stay compatible with their retries.
            fields["participant_id"] = self.participant_id
        return fields

    @property
    def account_id(self) -> str:
        return ids.account_id_for_request(self.request_id, self.collect_on_every_shard)


@dataclasses.dataclass(frozen=True)
class Account:
    account_id: str
    request_id: str
    owner_id: str
    currency: str
    kind: AccountKind
    tier: int
    status: AccountStatus
    debits_posted_minor: int = 0
    credits_posted_minor: int = 0
    debits_pending_minor: int = 0
    credits_pending_minor: int = 0
    created_at: datetime.datetime | None = None
    updated_at: datetime.datetime | None = None
    collect_on_every_shard: bool = False
    parent_account_id: str | None = None
    participant_id: str = clearing.HOSTING_PARTICIPANT_ID

    @property
    def balance_minor(self) -> int:
        return self.credits_posted_minor - self.debits_posted_minor

    @property
    def available_minor(self) -> int:
        return self.balance_minor - self.debits_pending_minor

    def conflicting_fields(self, request: OpenAccountRequest) -> list[str]:
        """Fields where a retried OpenAccount differs from the one that opened this account."""
        names = ("owner_id", "currency", "kind", "tier", "participant_id")
        mine = (self.owner_id, self.currency, int(self.kind), self.tier, self.participant_id)
        theirs = (request.owner_id, request.currency, request.kind, request.tier, request.participant_id or clearing.HOSTING_PARTICIPANT_ID)
        return [name for name, a, b in zip(names, mine, theirs) if a != b]


def check_status_change(account: Account, status: int) -> AccountStatus:
    """The status to store, or an error; setting the current status again is allowed."""
    if status == 0:
        raise errors.MissingField("status is required", field="status")
    if status not in SETTABLE_STATUSES:
        raise errors.InvalidStatus(f"status {status} cannot be set; use CloseAccount to close", status=status)
    if account.status == AccountStatus.CLOSED:
        raise errors.AccountClosed(f"account {account.account_id} is closed", account_id=account.account_id)
    return AccountStatus(status)


def closed_status(account: Account) -> AccountStatus:
    """CloseAccount's rule: CLOSED again is a retry; otherwise only at zero with nothing pending."""
    if account.status != AccountStatus.CLOSED:
        check_closable(account)
    return AccountStatus.CLOSED


def check_closable(account: Account) -> None:
    if account.debits_pending_minor or account.credits_pending_minor:
        raise errors.AccountHasPending(f"account {account.account_id} has pending transfers", account_id=account.account_id)
    if account.balance_minor != 0:
        raise errors.AccountBalanceNotZero(
            f"account {account.account_id} has balance {account.balance_minor}", account_id=account.account_id
        )
