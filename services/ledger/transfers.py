"""Transfers: stateless validation, and the decision to post or reject.

The rule book is split by side: `debit_side_refusal` and `credit_side_refusal`.
A same-shard transfer applies both with both accounts locked (`decide`); a
transfer between shards applies each on its own shard when it reserves that side.
"""

from __future__ import annotations

import dataclasses
import datetime
import enum

from services.ledger import clearing, errors, ids, money
from services.ledger.accounts import Account, AccountKind, AccountStatus
from services.ledger.limits import TierLimits


class TransferStatus(enum.IntEnum):
    """Numbers match corebank.v1.TransferStatus."""

    PENDING = 1
    POSTED = 2
    VOIDED = 3
    REJECTED = 4


class Branch(enum.IntEnum):
    """transfers.branch: which part of a transfer a stored row is."""

    SAME_SHARD = 0  # the whole transfer: both accounts on this shard
    DEBIT = 1  # between shards, on the debit shard: debits the payer, credits clearing
    CREDIT = 2  # between shards, on the credit shard: debits clearing, credits the payee
    COLLECTED = 3  # a payment to a collecting merchant: credits its sub-account on this shard


@dataclasses.dataclass(frozen=True)
class TransferRequest:
    transfer_id: str
    debit_account_id: str
    credit_account_id: str
    amount_minor: int
    currency: str
    reference: str = ""
    # Set by routing, never by clients: the account that takes the credit when it is not
    # credit_account_id itself (a collecting merchant's sub-account on the payer's shard).
    credited_account_id: str = ""
    # Set by the service, never by clients: the participant of the credited account, looked up
    # before a transfer between shards begins (its credit branch checks it); None: unknown.
    payee_participant_id: str | None = None
    # Set by the service: the payer's share of its net debit cap was rebalanced for this
    # attempt, so a debit that still does not fit is refused (NET_DEBIT_CAP_EXCEEDED), not
    # sent back for more headroom.
    final_for_cap: bool = False

    @property
    def credited(self) -> str:
        return self.credited_account_id or self.credit_account_id

    def registry_fields(self) -> dict:
        """What the transfer_id is registered with bank-wide: a reuse with other fields is a conflict."""
        return {
            "debit_account_id": self.debit_account_id, "credit_account_id": self.credit_account_id,
            "amount_minor": self.amount_minor, "currency": self.currency, "reference": self.reference,
        }

    @property
    def is_sweep(self) -> bool:
        """A collecting merchant's own money moving from one of its sub-accounts into it.

        Only the ledger makes these: clients cannot name sub-accounts or choose sweep ids.
        """
        return ids.collection_parent(self.debit_account_id) == self.credit_account_id

    def validated(self) -> TransferRequest:
        """A client's request: checks that need no account; a failure records nothing."""
        ids.validate_client_transfer_id(self.transfer_id)
        ids.validate_transfer_account_id(self.debit_account_id, "debit_account_id")
        ids.validate_transfer_account_id(self.credit_account_id, "credit_account_id")
        return self._validated_fields()

    def validated_sweep(self) -> TransferRequest:
        """A sweep the ledger made itself: its ids are in the ledger's own namespaces."""
        assert self.is_sweep and self.transfer_id.startswith(ids.RESERVED_TRANSFER_ID_PREFIX), f"not a sweep: {self}"
        return self._validated_fields()

    def validated_settlement(self) -> TransferRequest:
        """A settlement movement the ledger made itself (services/ledger/clearing.py settlement_legs)."""
        assert self.transfer_id.startswith(clearing.SETTLEMENT_TRANSFER_ID_PREFIX), f"not a settlement movement: {self}"
        assert clearing.is_settlement_account(self.debit_account_id) and clearing.is_settlement_account(self.credit_account_id)
        return self._validated_fields()

    def _validated_fields(self) -> TransferRequest:
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
    branch: Branch = Branch.SAME_SHARD

    @property
    def is_half_of_a_cross_shard_transfer(self) -> bool:
        """A branch row: the whole transfer is its coordinator's record on the debit shard."""
        return self.branch in (Branch.DEBIT, Branch.CREDIT)

    def conflicting_fields(self, request: TransferRequest) -> list[str]:
        """Fields where a retried Transfer differs from the one that created this transfer."""
        names = ("debit_account_id", "credit_account_id", "amount_minor", "currency", "reference")
        return [name for name in names if getattr(self, name) != getattr(request, name)]

    def refusal(self) -> errors.LedgerError | None:
        """The error a REJECTED or VOIDED transfer answers with, every time it is asked."""
        if self.status == TransferStatus.VOIDED:
            return errors.TransferVoided(
                f"transfer {self.transfer_id} was cancelled by the system: {self.reason}",
                transfer_id=self.transfer_id, cause=self.reason,
            )
        if self.status != TransferStatus.REJECTED:
            return None
        return errors.error_class_for_reason(self.reason)(
            f"transfer {self.transfer_id} was rejected: {self.reason}", transfer_id=self.transfer_id
        )


def linked_transfer_failed(failed_transfer_id: str) -> errors.LinkedTransferFailed:
    """What the other members of a linked chain answer when one of them is refused."""
    return errors.LinkedTransferFailed(
        f"transfer {failed_transfer_id} of the same chain was refused", failed_transfer_id=failed_transfer_id
    )


def decide(
    request: TransferRequest, debit: Account | None, credit: Account | None, limits: TierLimits
) -> errors.LedgerError | None:
    """None to post a same-shard transfer, or the refusal to record: the debit side's rules first."""
    return debit_side_refusal(request, debit, limits) or credit_side_refusal(request, credit, limits)


def debit_side_refusal(request: TransferRequest, debit: Account | None, limits: TierLimits) -> errors.LedgerError | None:
    """The rules of the paying account, in a fixed order. A transfer between shards checks
    them on the debit shard, when it reserves the debit."""
    if debit is None:
        return errors.AccountNotFound(f"account {request.debit_account_id} not found", account_id=request.debit_account_id)
    if request.is_sweep:
        # Money the merchant already accepted, moving between its own accounts: no one-way
        # block and no per-transfer cap stops it (a sweep refused for those would strand it);
        # a frozen or closed account still does, and funds and int64 range always apply.
        return (
            _currency_refusal(request, debit)
            or _status_refusal(debit, None, errors.AccountDebitBlocked)
            or _funds_refusal(request, debit)
            or _overflow_refusal(request.amount_minor, debit.debits_posted_minor, debit.debits_pending_minor)
        )
    return (
        _currency_refusal(request, debit)
        or _status_refusal(debit, AccountStatus.BLOCK_DEBIT, errors.AccountDebitBlocked)
        or _transfer_cap_refusal(request, debit, limits)
        or _funds_refusal(request, debit)
        or _overflow_refusal(request.amount_minor, debit.debits_posted_minor, debit.debits_pending_minor)
    )


def credit_side_refusal(request: TransferRequest, credit: Account | None, limits: TierLimits) -> errors.LedgerError | None:
    """The rules of the receiving account, in a fixed order (on the credit shard, between shards)."""
    if credit is None:
        return errors.AccountNotFound(f"account {request.credit_account_id} not found", account_id=request.credit_account_id)
    if request.is_sweep:
        # The merchant's balance cap was applied when the payments were accepted (collecting
        # merchants have uncapped tiers); a sweep only moves that money in.
        return (
            _currency_refusal(request, credit)
            or _status_refusal(credit, None, errors.AccountCreditBlocked)
            or _overflow_refusal(request.amount_minor, credit.credits_posted_minor, credit.credits_pending_minor)
        )
    return (
        _currency_refusal(request, credit)
        or _status_refusal(credit, AccountStatus.BLOCK_CREDIT, errors.AccountCreditBlocked)
        or _transfer_cap_refusal(request, credit, limits)
        or _overflow_refusal(request.amount_minor, credit.credits_posted_minor, credit.credits_pending_minor)
        or _balance_cap_refusal(request, credit, limits)
    )


def clearing_refusal(request: TransferRequest, clearing: Account, credited: bool) -> errors.LedgerError | None:
    """A shard's clearing account takes one side of every branch between shards: it must
    stay in the int64 range once this branch posts (a SYSTEM account: no other rule)."""
    if credited:
        return _overflow_refusal(request.amount_minor, clearing.credits_posted_minor, clearing.credits_pending_minor)
    return _overflow_refusal(request.amount_minor, clearing.debits_posted_minor, clearing.debits_pending_minor)


def _currency_refusal(request: TransferRequest, account: Account) -> errors.Refusal | None:
    if account.currency == request.currency:
        return None
    return errors.CurrencyMismatch(
        f"account {account.account_id} holds {account.currency}, not {request.currency}", account_id=account.account_id
    )


def _transfer_cap_refusal(request: TransferRequest, account: Account, limits: TierLimits) -> errors.Refusal | None:
    if account.kind == AccountKind.SYSTEM:
        return None
    transfer_cap_minor = limits.limit(account.tier, account.currency).transfer_cap_minor
    if request.amount_minor <= transfer_cap_minor:
        return None
    return errors.LimitExceeded(
        f"amount exceeds the per-transfer cap of tier {account.tier} for account {account.account_id}",
        account_id=account.account_id, limit="TRANSFER_CAP", limit_minor=transfer_cap_minor,
    )


def _funds_refusal(request: TransferRequest, debit: Account) -> errors.Refusal | None:
    if debit.kind == AccountKind.SYSTEM or debit.available_minor >= request.amount_minor:
        return None
    return errors.InsufficientFunds(f"account {debit.account_id} has {debit.available_minor} available", account_id=debit.account_id)


def _overflow_refusal(amount_minor: int, posted_minor: int, pending_minor: int) -> errors.Refusal | None:
    # Pending amounts become posted later: both together must stay in the int64 range.
    if posted_minor + pending_minor + amount_minor <= money.INT64_MAX:
        return None
    return errors.BalanceOverflow("a counter would leave the int64 range")


def _balance_cap_refusal(request: TransferRequest, credit: Account, limits: TierLimits) -> errors.Refusal | None:
    if credit.kind == AccountKind.SYSTEM:
        return None
    balance_cap_minor = limits.limit(credit.tier, credit.currency).balance_cap_minor
    if balance_cap_minor is None or credit.balance_minor + credit.credits_pending_minor + request.amount_minor <= balance_cap_minor:
        return None
    return errors.LimitExceeded(
        f"credit would take account {credit.account_id} over the balance cap of tier {credit.tier}",
        account_id=credit.account_id, limit="BALANCE_CAP", limit_minor=balance_cap_minor,
    )


def _status_refusal(
    account: Account, one_way_block: AccountStatus | None, one_way_error: type[errors.Refusal]
) -> errors.Refusal | None:
    if account.status == AccountStatus.CLOSED:
        return errors.AccountClosed(f"account {account.account_id} is closed", account_id=account.account_id)
    if account.status == AccountStatus.FROZEN:
        return errors.AccountFrozen(f"account {account.account_id} is frozen", account_id=account.account_id)
    if account.status == one_way_block:
        return one_way_error(f"account {account.account_id} is {one_way_block.name}", account_id=account.account_id)
    return None
