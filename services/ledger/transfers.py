"""Transfers: stateless validation, and the decision to post or reject.

`decide` is the whole rule book of a same-shard transfer. Storage calls it with
both accounts locked, then applies the posting or records the rejection.
"""

from __future__ import annotations

import dataclasses
import datetime
import enum

from services.ledger import errors, ids, money
from services.ledger.accounts import Account, AccountKind, AccountStatus
from services.ledger.limits import TierLimits


class TransferStatus(enum.IntEnum):
    """Numbers match corebank.v1.TransferStatus."""

    PENDING = 1
    POSTED = 2
    VOIDED = 3
    REJECTED = 4


@dataclasses.dataclass(frozen=True)
class TransferRequest:
    transfer_id: str
    debit_account_id: str
    credit_account_id: str
    amount_minor: int
    currency: str
    reference: str = ""

    def validated(self) -> TransferRequest:
        """Checks that need no account; a failure records nothing."""
        ids.validate_id(self.transfer_id, "transfer_id")
        ids.validate_id(self.debit_account_id, "debit_account_id")
        ids.validate_id(self.credit_account_id, "credit_account_id")
        money.validate_amount(self.amount_minor)
        money.validate_currency(self.currency)
        ids.validate_reference(self.reference)
        if self.debit_account_id == self.credit_account_id:
            raise errors.SameAccount("debit and credit account are the same", account_id=self.debit_account_id)
        return self


@dataclasses.dataclass(frozen=True)
class Transfer:
    transfer_id: str
    debit_account_id: str
    credit_account_id: str
    amount_minor: int
    currency: str
    reference: str
    status: TransferStatus
    reason: str = ""
    seq: int = 0
    created_at: datetime.datetime | None = None
    finalized_at: datetime.datetime | None = None

    def conflicting_fields(self, request: TransferRequest) -> list[str]:
        """Fields where a retried Transfer differs from the one that created this transfer."""
        names = ("debit_account_id", "credit_account_id", "amount_minor", "currency", "reference")
        return [name for name in names if getattr(self, name) != getattr(request, name)]

    def refusal(self) -> errors.LedgerError | None:
        """The error a REJECTED transfer answers with, every time it is asked."""
        if self.status != TransferStatus.REJECTED:
            return None
        return errors.error_class_for_reason(self.reason)(
            f"transfer {self.transfer_id} was rejected: {self.reason}", transfer_id=self.transfer_id
        )


def decide(
    request: TransferRequest, debit: Account | None, credit: Account | None, limits: TierLimits
) -> errors.LedgerError | None:
    """None to post the transfer, or the refusal to record. Checks run in a fixed order."""
    for account_id, account in ((request.debit_account_id, debit), (request.credit_account_id, credit)):
        if account is None:
            return errors.AccountNotFound(f"account {account_id} not found", account_id=account_id)
    assert debit is not None and credit is not None
    for account in (debit, credit):
        if account.currency != request.currency:
            return errors.CurrencyMismatch(
                f"account {account.account_id} holds {account.currency}, not {request.currency}",
                account_id=account.account_id,
            )
    debit_refusal = _status_refusal(debit, AccountStatus.BLOCK_DEBIT, errors.AccountDebitBlocked)
    credit_refusal = _status_refusal(credit, AccountStatus.BLOCK_CREDIT, errors.AccountCreditBlocked)
    if debit_refusal or credit_refusal:
        return debit_refusal or credit_refusal
    for account in (debit, credit):
        if account.kind != AccountKind.SYSTEM:
            transfer_cap_minor = limits.limit(account.tier, account.currency).transfer_cap_minor
            if request.amount_minor > transfer_cap_minor:
                return errors.LimitExceeded(
                    f"amount exceeds the per-transfer cap of tier {account.tier} for account {account.account_id}",
                    account_id=account.account_id, limit="TRANSFER_CAP", limit_minor=transfer_cap_minor,
                )
    if debit.kind != AccountKind.SYSTEM and debit.available_minor < request.amount_minor:
        return errors.InsufficientFunds(
            f"account {debit.account_id} has {debit.available_minor} available", account_id=debit.account_id
        )
    if (
        debit.debits_posted_minor + request.amount_minor > money.INT64_MAX
        or credit.credits_posted_minor + request.amount_minor > money.INT64_MAX
    ):
        return errors.BalanceOverflow("a posted counter would leave the int64 range")
    if credit.kind != AccountKind.SYSTEM:
        balance_cap_minor = limits.limit(credit.tier, credit.currency).balance_cap_minor
        if balance_cap_minor is not None and (
            credit.balance_minor + credit.credits_pending_minor + request.amount_minor > balance_cap_minor
        ):
            return errors.LimitExceeded(
                f"credit would take account {credit.account_id} over the balance cap of tier {credit.tier}",
                account_id=credit.account_id, limit="BALANCE_CAP", limit_minor=balance_cap_minor,
            )
    return None


def _status_refusal(
    account: Account, one_way_block: AccountStatus, one_way_error: type[errors.Refusal]
) -> errors.Refusal | None:
    if account.status == AccountStatus.CLOSED:
        return errors.AccountClosed(f"account {account.account_id} is closed", account_id=account.account_id)
    if account.status == AccountStatus.FROZEN:
        return errors.AccountFrozen(f"account {account.account_id} is frozen", account_id=account.account_id)
    if account.status == one_way_block:
        return one_way_error(f"account {account.account_id} is {one_way_block.name}", account_id=account.account_id)
    return None
