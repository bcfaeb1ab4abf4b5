"""The authorisation rules (services/ledger/authorization.py), every cell of its table."""

import pytest

from services.ledger import errors
from services.ledger.access import LEDGER, Caller, Role
from services.ledger.accounts import AccountKind
from services.ledger.authorization import (
    AccountOwnership, Action, account_not_found, check_account, check_open_account, check_role, check_transfer_visible,
    needs_ownership, needs_transfer_parties, transfer_not_found,
)

ALICE = Caller("alice", Role.CUSTOMER)
GATEWAY = Caller("payments-gateway", Role.SERVICE)
OPS = Caller("ops-1", Role.OPERATOR)
ROOT = Caller("root", Role.ADMIN)
ACCOUNT_ID = "acc_x"

ALICES = AccountOwnership("alice", AccountKind.CUSTOMER)
ALICES_SHOP = AccountOwnership("alice", AccountKind.MERCHANT)
BOBS = AccountOwnership("bob", AccountKind.CUSTOMER)
# A SYSTEM account an admin opened with alice's name as owner: still the bank's.
SYSTEM_NAMED_ALICE = AccountOwnership("alice", AccountKind.SYSTEM)
BANKS = AccountOwnership("bank", AccountKind.SYSTEM)
MISSING = None

ALLOWED = "allowed"
NOT_FOUND = "ACCOUNT_NOT_FOUND"
DENIED = "ROLE_NOT_ALLOWED"


def outcome(caller, action, ownership, **metadata):
    """ALLOWED, or the reason of the refusal (check_role first, as the use cases ask)."""
    try:
        check_role(caller, action)
        if needs_ownership(caller, action):
            check_account(caller, action, ACCOUNT_ID, ownership, **metadata)
    except errors.LedgerError as error:
        return error.reason
    return ALLOWED


TABLE = {
    # (caller, action): {ownership: outcome}; the ownership None is an account that does not exist.
    (ALICE, Action.READ): {ALICES: ALLOWED, ALICES_SHOP: ALLOWED, BOBS: NOT_FOUND, SYSTEM_NAMED_ALICE: NOT_FOUND, BANKS: NOT_FOUND, MISSING: NOT_FOUND},
    (ALICE, Action.CLOSE): {ALICES: ALLOWED, ALICES_SHOP: ALLOWED, BOBS: NOT_FOUND, SYSTEM_NAMED_ALICE: NOT_FOUND, BANKS: NOT_FOUND, MISSING: NOT_FOUND},
    (ALICE, Action.DEBIT): {ALICES: ALLOWED, ALICES_SHOP: ALLOWED, BOBS: NOT_FOUND, SYSTEM_NAMED_ALICE: NOT_FOUND, BANKS: NOT_FOUND, MISSING: NOT_FOUND},
    (ALICE, Action.UPDATE_STATUS): {ALICES: DENIED, ALICES_SHOP: DENIED, BOBS: NOT_FOUND, SYSTEM_NAMED_ALICE: NOT_FOUND, BANKS: NOT_FOUND, MISSING: NOT_FOUND},
    (GATEWAY, Action.READ): {ALICES: ALLOWED, ALICES_SHOP: ALLOWED, BOBS: ALLOWED, SYSTEM_NAMED_ALICE: DENIED, BANKS: DENIED, MISSING: NOT_FOUND},
    (GATEWAY, Action.CLOSE): {ALICES: ALLOWED, ALICES_SHOP: ALLOWED, BOBS: ALLOWED, SYSTEM_NAMED_ALICE: DENIED, BANKS: DENIED, MISSING: NOT_FOUND},
    (GATEWAY, Action.DEBIT): {ALICES: ALLOWED, ALICES_SHOP: ALLOWED, BOBS: ALLOWED, SYSTEM_NAMED_ALICE: DENIED, BANKS: DENIED, MISSING: NOT_FOUND},
    (GATEWAY, Action.UPDATE_STATUS): {ALICES: DENIED, BOBS: DENIED, BANKS: DENIED, MISSING: DENIED},
    (OPS, Action.READ): {ALICES: ALLOWED, BOBS: ALLOWED, BANKS: ALLOWED},
    (OPS, Action.CLOSE): {ALICES: ALLOWED, BOBS: ALLOWED, BANKS: ALLOWED},
    (OPS, Action.UPDATE_STATUS): {ALICES: ALLOWED, BOBS: ALLOWED, BANKS: ALLOWED},
    (OPS, Action.DEBIT): {ALICES: DENIED, BOBS: DENIED, BANKS: DENIED, MISSING: DENIED},
    (ROOT, Action.READ): {ALICES: ALLOWED, BANKS: ALLOWED},
    (ROOT, Action.CLOSE): {ALICES: ALLOWED, BANKS: ALLOWED},
    (ROOT, Action.UPDATE_STATUS): {ALICES: ALLOWED, BANKS: ALLOWED},
    (ROOT, Action.DEBIT): {ALICES: ALLOWED, BANKS: ALLOWED},
}


@pytest.mark.parametrize(
    "caller, action, ownership, expected",
    [(caller, action, ownership, expected) for (caller, action), cells in TABLE.items() for ownership, expected in cells.items()],
    ids=lambda value: getattr(value, "name", None) or str(value),
)
def test_every_cell_of_the_table(caller, action, ownership, expected):
    assert outcome(caller, action, ownership) == expected


def test_every_role_and_action_is_in_the_table():
    assert {(caller.role, action) for caller, action in TABLE} == {(role, action) for role in Role for action in Action}


@pytest.mark.parametrize("caller", [OPS, ROOT])
@pytest.mark.parametrize("action", [Action.READ, Action.CLOSE, Action.UPDATE_STATUS])
def test_roles_that_may_act_on_every_account_cost_no_lookup(caller, action):
    assert not needs_ownership(caller, action)


def test_an_admin_debit_costs_no_lookup_and_the_ledger_acts_as_an_admin():
    assert not needs_ownership(ROOT, Action.DEBIT)
    assert LEDGER.role == Role.ADMIN and not needs_ownership(LEDGER, Action.DEBIT)


def test_a_customer_is_never_refused_before_its_account_is_looked_up():
    # Even where the role may never act (a status change), its own account answers
    # ROLE_NOT_ALLOWED and any other NOT_FOUND: so check_role must not answer first.
    for action in Action:
        check_role(ALICE, action)
        assert needs_ownership(ALICE, action)


def test_not_owned_answers_exactly_as_missing_with_the_use_cases_metadata():
    def refusal(ownership):
        with pytest.raises(errors.AccountNotFound) as raised:
            check_account(ALICE, Action.DEBIT, ACCOUNT_ID, ownership, transfer_id="t-1")
        return raised.value

    not_owned, missing = refusal(BOBS), refusal(None)
    assert (not_owned.message, not_owned.metadata) == (missing.message, missing.metadata)
    assert (missing.message, missing.metadata) == ("account acc_x not found", {"account_id": ACCOUNT_ID, "transfer_id": "t-1"})
    made = account_not_found(ACCOUNT_ID)
    assert (made.message, made.metadata) == ("account acc_x not found", {"account_id": ACCOUNT_ID})


def test_role_not_allowed_names_the_role_and_the_action():
    with pytest.raises(errors.RoleNotAllowed) as raised:
        check_account(GATEWAY, Action.DEBIT, ACCOUNT_ID, BANKS)
    assert raised.value.metadata == {"role": "service", "action": "transfer_from_system_account"}
    assert raised.value.category == errors.Category.PERMISSION_DENIED
    with pytest.raises(errors.RoleNotAllowed) as raised:
        check_role(OPS, Action.DEBIT)
    assert raised.value.metadata == {"role": "operator", "action": "transfer"}
    with pytest.raises(errors.RoleNotAllowed) as raised:
        check_account(ALICE, Action.UPDATE_STATUS, ACCOUNT_ID, ALICES)
    assert raised.value.metadata == {"role": "customer", "action": "update_account_status"}


def open_outcome(caller, owner_id, kind):
    try:
        check_open_account(caller, owner_id, int(kind))
    except errors.LedgerError as error:
        return error.reason, error.metadata
    return ALLOWED


def test_opening_accounts():
    assert open_outcome(ALICE, "alice", AccountKind.CUSTOMER) == ALLOWED
    assert open_outcome(ALICE, "alice", AccountKind.MERCHANT) == ALLOWED
    assert open_outcome(ALICE, "bob", AccountKind.CUSTOMER) == ("OWNER_MISMATCH", {"field": "owner_id"})
    assert open_outcome(ALICE, "alice", AccountKind.SYSTEM) == (DENIED, {"role": "customer", "action": "open_system_account"})
    assert open_outcome(ALICE, "bob", AccountKind.SYSTEM)[0] == DENIED
    assert open_outcome(GATEWAY, "anyone", AccountKind.CUSTOMER) == ALLOWED
    assert open_outcome(GATEWAY, "anyone", AccountKind.MERCHANT) == ALLOWED
    assert open_outcome(GATEWAY, "bank", AccountKind.SYSTEM) == (DENIED, {"role": "service", "action": "open_system_account"})
    assert open_outcome(OPS, "ops-1", AccountKind.CUSTOMER) == (DENIED, {"role": "operator", "action": "open_account"})
    assert open_outcome(ROOT, "bank", AccountKind.SYSTEM) == ALLOWED
    assert open_outcome(ROOT, "anyone", AccountKind.CUSTOMER) == ALLOWED


def test_a_customer_sees_a_transfer_only_from_or_to_its_own_accounts():
    assert needs_transfer_parties(ALICE)
    check_transfer_visible(ALICE, "t-1", [ALICES, BOBS])
    check_transfer_visible(ALICE, "t-1", [BOBS, ALICES_SHOP])
    check_transfer_visible(ALICE, "t-1", [None, ALICES])
    for sides in ([BOBS, BANKS], [SYSTEM_NAMED_ALICE, BOBS], [None, None], []):
        with pytest.raises(errors.TransferNotFound) as raised:
            check_transfer_visible(ALICE, "t-1", sides)
        missing = transfer_not_found("t-1")
        assert (raised.value.message, raised.value.metadata) == (missing.message, missing.metadata)
    for caller in (GATEWAY, OPS, ROOT):
        assert not needs_transfer_parties(caller)
        check_transfer_visible(caller, "t-1", [BOBS, BANKS])


def test_a_customers_idempotency_conflict_names_no_fields_of_the_first_use():
    """The first use of a bank-wide id may be another owner's: listing the differing fields would
    let a customer test guesses of that transfer's payee and amount (helper review, issue 9)."""
    from services.ledger import errors
    from services.ledger.access import Caller, Role
    from services.ledger.authorization import disclosed

    conflict = errors.IdempotencyConflict(
        "transfer_id t-1 was first used with other credit_account_id, amount_minor",
        conflicting_fields="credit_account_id,amount_minor", transfer_id="t-1",
    )
    shown = disclosed(Caller("alice", Role.CUSTOMER), conflict)
    assert shown.reason == "IDEMPOTENCY_CONFLICT" and shown.metadata == {"transfer_id": "t-1"}
    assert "amount" not in shown.message and "credit" not in shown.message
    for role in (Role.SERVICE, Role.ADMIN, Role.OPERATOR):
        assert disclosed(Caller("gw", role), conflict) is conflict
    refusal = errors.InsufficientFunds("no")
    assert disclosed(Caller("alice", Role.CUSTOMER), refusal) is refusal
    assert disclosed(None, conflict) is conflict
