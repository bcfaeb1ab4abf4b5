"""The rule book of a transfer, one rule at a time, then as properties."""

import dataclasses

from hypothesis import given, strategies as st

from services.ledger import errors, money
from services.ledger.accounts import Account, AccountKind, AccountStatus, check_closable, check_status_change
from services.ledger.limits import TierLimits
from services.ledger.transfers import TransferRequest, decide

import pytest

LIMITS = TierLimits.load()
TIER_0_USD = LIMITS.limit(0, "USD")
TIER_2_USD = LIMITS.limit(2, "USD")


def account(account_id: str, kind=AccountKind.CUSTOMER, tier=2, status=AccountStatus.ACTIVE, currency="USD", **counters):
    return Account(account_id, "req-" + account_id, "owner", currency, kind, tier, status, **counters)


def request(amount_minor=100, currency="USD") -> TransferRequest:
    return TransferRequest("t-1", "acc_debit", "acc_credit", amount_minor, currency)


RICH = account("acc_debit", credits_posted_minor=10_000)
POOR = account("acc_credit")
BANK = account("acc_debit", kind=AccountKind.SYSTEM)


def test_a_funded_transfer_posts():
    assert decide(request(), RICH, POOR, LIMITS) is None


@pytest.mark.parametrize("missing", ["debit", "credit"])
def test_unknown_accounts_are_refused(missing):
    refusal = decide(request(), None if missing == "debit" else RICH, None if missing == "credit" else POOR, LIMITS)
    assert isinstance(refusal, errors.AccountNotFound)
    assert refusal.metadata["account_id"] == f"acc_{missing}"


def test_currency_must_match_both_accounts():
    assert isinstance(decide(request(currency="EUR"), RICH, POOR, LIMITS), errors.CurrencyMismatch)
    eur_credit = account("acc_credit", currency="EUR")
    assert isinstance(decide(request(), RICH, eur_credit, LIMITS), errors.CurrencyMismatch)


@pytest.mark.parametrize(
    "debit_status, credit_status, expected",
    [
        (AccountStatus.FROZEN, AccountStatus.ACTIVE, errors.AccountFrozen),
        (AccountStatus.ACTIVE, AccountStatus.FROZEN, errors.AccountFrozen),
        (AccountStatus.BLOCK_DEBIT, AccountStatus.ACTIVE, errors.AccountDebitBlocked),
        (AccountStatus.ACTIVE, AccountStatus.BLOCK_CREDIT, errors.AccountCreditBlocked),
        (AccountStatus.CLOSED, AccountStatus.ACTIVE, errors.AccountClosed),
        (AccountStatus.ACTIVE, AccountStatus.CLOSED, errors.AccountClosed),
        (AccountStatus.BLOCK_CREDIT, AccountStatus.BLOCK_DEBIT, None),  # each block is one-way
    ],
)
def test_statuses(debit_status, credit_status, expected):
    debit = dataclasses.replace(RICH, status=debit_status)
    credit = dataclasses.replace(POOR, status=credit_status)
    refusal = decide(request(), debit, credit, LIMITS)
    assert (type(refusal) if refusal else None) is expected


def test_customers_cannot_overdraw_but_system_accounts_can():
    assert isinstance(decide(request(10_001), RICH, POOR, LIMITS), errors.InsufficientFunds)
    assert decide(request(10_000), RICH, POOR, LIMITS) is None
    assert decide(request(10_000), BANK, POOR, LIMITS) is None


def test_pending_debits_are_not_available():
    reserved = dataclasses.replace(RICH, debits_pending_minor=9_950)
    assert isinstance(decide(request(100), reserved, POOR, LIMITS), errors.InsufficientFunds)
    assert decide(request(50), reserved, POOR, LIMITS) is None


def test_transfer_cap_of_either_non_system_side():
    over = TIER_0_USD.transfer_cap_minor + 1
    unverified_payer = dataclasses.replace(RICH, tier=0, credits_posted_minor=TIER_0_USD.balance_cap_minor)
    refusal = decide(request(over), unverified_payer, POOR, LIMITS)
    assert isinstance(refusal, errors.LimitExceeded) and refusal.metadata["limit"] == "TRANSFER_CAP"
    unverified_payee = dataclasses.replace(POOR, tier=0)
    assert isinstance(decide(request(over), BANK, unverified_payee, LIMITS), errors.LimitExceeded)


def test_balance_cap_counts_posted_and_pending_credits():
    cap = TIER_0_USD.balance_cap_minor
    payee = account("acc_credit", tier=0, credits_posted_minor=cap - 300, credits_pending_minor=200)
    assert decide(request(100), BANK, payee, LIMITS) is None
    refusal = decide(request(101), BANK, payee, LIMITS)
    assert isinstance(refusal, errors.LimitExceeded) and refusal.metadata["limit"] == "BALANCE_CAP"


def test_system_accounts_have_no_caps():
    other_bank = account("acc_credit", kind=AccountKind.SYSTEM, tier=0)
    assert decide(request(TIER_2_USD.transfer_cap_minor * 10), BANK, other_bank, LIMITS) is None


def test_counters_never_leave_int64():
    nearly_full = account("acc_credit", kind=AccountKind.SYSTEM, credits_posted_minor=money.INT64_MAX - 5)
    assert isinstance(decide(request(6), BANK, nearly_full, LIMITS), errors.BalanceOverflow)
    assert decide(request(5), BANK, nearly_full, LIMITS) is None


@given(
    balance_minor=st.integers(min_value=0, max_value=TIER_2_USD.balance_cap_minor),
    amount_minor=st.integers(min_value=1, max_value=money.INT64_MAX),
)
def test_a_posted_transfer_never_leaves_a_customer_negative_or_over_cap(balance_minor, amount_minor):
    payer = account("acc_debit", credits_posted_minor=balance_minor)
    payee = account("acc_credit", credits_posted_minor=balance_minor)
    if decide(request(amount_minor), payer, payee, LIMITS) is None:
        assert payer.balance_minor - amount_minor >= 0
        assert payee.balance_minor + amount_minor <= TIER_2_USD.balance_cap_minor
        assert amount_minor <= TIER_2_USD.transfer_cap_minor


def test_status_changes():
    assert check_status_change(RICH, AccountStatus.FROZEN) == AccountStatus.FROZEN
    with pytest.raises(errors.InvalidStatus):
        check_status_change(RICH, AccountStatus.CLOSED)
    with pytest.raises(errors.MissingField):
        check_status_change(RICH, 0)
    with pytest.raises(errors.AccountClosed):
        check_status_change(dataclasses.replace(RICH, status=AccountStatus.CLOSED), AccountStatus.ACTIVE)


def test_only_empty_settled_accounts_close():
    check_closable(POOR)
    with pytest.raises(errors.AccountBalanceNotZero):
        check_closable(RICH)
    with pytest.raises(errors.AccountHasPending):
        check_closable(dataclasses.replace(POOR, credits_pending_minor=1))
