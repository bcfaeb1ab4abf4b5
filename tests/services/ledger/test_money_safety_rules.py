"""Regression tests of the pure rules behind the money-safety fixes (issue 7): internal
accounts and ids, sweeps, clearing overflow, caps of collecting merchants, id conflicts."""

import dataclasses

import pytest

from services.ledger import errors, ids, money
from services.ledger.accounts import Account, AccountKind, AccountStatus, OpenAccountRequest, closed_status
from services.ledger.limits import TierLimits
from services.ledger.transfers import TransferRequest, clearing_refusal, credit_side_refusal, debit_side_refusal

LIMITS = TierLimits.load()
MERCHANT = "hot_merchantbody"
SUB_ACCOUNT = "sub_merchantbody_7"


def account(account_id, kind=AccountKind.MERCHANT, tier=3, status=AccountStatus.ACTIVE, **counters):
    return Account(account_id, account_id, "owner", "USD", kind, tier, status, **counters)


def sweep(amount_minor=100):
    return TransferRequest("sys:sw:merchantbody_7:0:0", SUB_ACCOUNT, MERCHANT, amount_minor, "USD", "sweep")


@pytest.mark.parametrize("field", ["debit_account_id", "credit_account_id"])
@pytest.mark.parametrize("internal", [SUB_ACCOUNT, "clr_usd_3_17"])
def test_a_client_cannot_name_an_internal_account(field, internal):
    fields = {"debit_account_id": "acc_a", "credit_account_id": "acc_b", field: internal}
    with pytest.raises(errors.InternalAccount) as raised:
        TransferRequest("t-1", amount_minor=1, currency="USD", **fields).validated()
    assert raised.value.metadata == {"field": field, "account_id": internal}


def test_a_client_cannot_choose_an_id_in_the_ledgers_namespace():
    with pytest.raises(errors.ReservedId):
        TransferRequest("sys:sw:merchantbody_7:0:0", "acc_a", "acc_b", 1, "USD").validated()
    # A sweep made by the ledger passes its own validation.
    assert sweep().validated_sweep().is_sweep


def test_only_a_sub_account_into_its_own_merchant_is_a_sweep():
    assert sweep().is_sweep
    assert not dataclasses.replace(sweep(), credit_account_id="hot_othermerchant").is_sweep
    assert not TransferRequest("t", "acc_a", MERCHANT, 1, "USD").is_sweep


@pytest.mark.parametrize("status", [AccountStatus.BLOCK_DEBIT, AccountStatus.BLOCK_CREDIT])
def test_a_sweep_passes_one_way_blocks_and_per_transfer_caps(status):
    """A sweep refused for these would leave accepted money in the sub-account."""
    huge = LIMITS.limit(3, "USD").transfer_cap_minor * 10
    sub = account(SUB_ACCOUNT, status=status, credits_posted_minor=huge)
    merchant = account(MERCHANT, status=status)
    assert debit_side_refusal(sweep(huge), sub, LIMITS) is None
    assert credit_side_refusal(sweep(huge), merchant, LIMITS) is None


@pytest.mark.parametrize("status, refusal", [(AccountStatus.FROZEN, errors.AccountFrozen), (AccountStatus.CLOSED, errors.AccountClosed)])
def test_a_sweep_still_stops_at_a_frozen_or_closed_account(status, refusal):
    sub = account(SUB_ACCOUNT, credits_posted_minor=500)
    assert isinstance(credit_side_refusal(sweep(), account(MERCHANT, status=status), LIMITS), refusal)
    assert isinstance(debit_side_refusal(sweep(), dataclasses.replace(sub, status=status), LIMITS), refusal)


def test_a_sweep_cannot_take_more_than_the_sub_account_holds():
    assert isinstance(debit_side_refusal(sweep(501), account(SUB_ACCOUNT, credits_posted_minor=500), LIMITS), errors.InsufficientFunds)


@pytest.mark.parametrize("credited", [True, False])
def test_a_clearing_account_near_the_int64_limit_refuses_the_try(credited):
    """Finding 3: checked at try time, so a decided transfer can always be confirmed."""
    near_limit = money.INT64_MAX - 10
    counters = {"credits_posted_minor": near_limit} if credited else {"debits_posted_minor": near_limit}
    clearing = account("clr_usd_0_1", kind=AccountKind.SYSTEM, tier=0, **counters)
    request = TransferRequest("t-1", "acc_a", "acc_b", 11, "USD")
    assert isinstance(clearing_refusal(request, clearing, credited=credited), errors.BalanceOverflow)
    assert clearing_refusal(dataclasses.replace(request, amount_minor=10), clearing, credited=credited) is None
    # The other side's counters do not matter for this branch.
    assert clearing_refusal(request, clearing, credited=not credited) is None


def test_pending_amounts_count_towards_the_clearing_limit():
    clearing = account("clr_usd_0_1", kind=AccountKind.SYSTEM, tier=0, credits_pending_minor=money.INT64_MAX - 5)
    assert isinstance(clearing_refusal(TransferRequest("t", "acc_a", "acc_b", 6, "USD"), clearing, credited=True), errors.BalanceOverflow)


@pytest.mark.parametrize("tier", [0, 1, 2])
def test_a_collecting_merchant_needs_a_tier_without_a_balance_cap(tier):
    """Finding 5: no shard could hold a cap over sub-accounts credited without coordination."""
    request = OpenAccountRequest("req-1", "owner", "USD", AccountKind.MERCHANT, tier, collect_on_every_shard=True)
    with pytest.raises(errors.InvalidField) as raised:
        request.validated(LIMITS)
    assert raised.value.metadata["field"] == "collect_on_every_shard"
    assert dataclasses.replace(request, tier=3).validated(LIMITS)


def test_closing_again_is_a_retry_and_closing_with_money_is_refused():
    assert closed_status(account(MERCHANT, status=AccountStatus.CLOSED)) == AccountStatus.CLOSED
    assert closed_status(account(MERCHANT)) == AccountStatus.CLOSED
    with pytest.raises(errors.AccountBalanceNotZero):
        closed_status(account(MERCHANT, credits_posted_minor=1))


def test_conflicting_fields_are_named_in_the_requests_order():
    first = TransferRequest("t", "acc_a", "acc_b", 1, "USD").registry_fields()
    swapped = TransferRequest("t", "acc_b", "acc_a", 2, "USD").registry_fields()
    assert ids.conflicting_fields(first, swapped) == ["debit_account_id", "credit_account_id", "amount_minor"]
    assert ids.conflicting_fields(first, dict(first)) == []
    opened = OpenAccountRequest("r", "o", "USD", AccountKind.MERCHANT, 3, collect_on_every_shard=True).registry_fields()
    other = OpenAccountRequest("r", "o", "USD", AccountKind.MERCHANT, 3).registry_fields()
    assert ids.conflicting_fields(opened, other) == ["collect_on_every_shard"]
