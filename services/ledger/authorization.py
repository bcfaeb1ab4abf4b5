"""Who may do what: the authorisation rules of corebank.v1, as pure functions of a Caller
(services/ledger/access.py) and, where the rule needs it, an account's owner and kind.

Each row is a use case; each cell what the role may name. "own" is an account whose
owner_id is the customer's token subject and whose kind is CUSTOMER or MERCHANT (a SYSTEM
account is the bank's, whatever owner_id it was opened with). "not SYSTEM" is every
CUSTOMER or MERCHANT account.

| use case                         | customer                  | service          | operator | admin |
|----------------------------------|---------------------------|------------------|----------|-------|
| OpenAccount CUSTOMER / MERCHANT  | own owner_id              | any owner        | no       | yes   |
| OpenAccount SYSTEM               | no                        | no               | no       | yes   |
| GetAccount, ListAccountTransfers | own                       | not SYSTEM       | any      | any   |
| UpdateAccountStatus              | no (others': not found)   | no               | any      | any   |
| CloseAccount                     | own                       | not SYSTEM       | any      | any   |
| Transfer / CreateTransfers debit | own                       | not SYSTEM       | no       | any   |
| ... credit                       | any                       | any              | no       | any   |
| GetTransfer                      | own debit or credit side  | any              | any      | any   |

Clearing (corebank.v1.Clearing: `check_clearing`, by role alone; a customer may do none of it):

| use case                                                   | customer | service | operator | admin |
|------------------------------------------------------------|----------|---------|----------|-------|
| RegisterParticipant, SetNetDebitCap, RecordParticipantSettled | no    | no      | no       | yes   |
| CloseSettlementWindow, CreateSettlement                    | no       | no      | yes      | yes   |
| GetParticipant, GetPosition, Get/ListSettlementWindow(s), GetSettlement, Reconcile | no | yes | yes | yes |

- "no" answers PERMISSION_DENIED / ROLE_NOT_ALLOWED (metadata role, action); a customer
  opening an account for another owner_id gets OWNER_MISMATCH (metadata field).
- A customer naming an account that is not its own gets ACCOUNT_NOT_FOUND (a transfer whose
  sides are neither its own: TRANSFER_NOT_FOUND), built by `account_not_found` /
  `transfer_not_found` exactly as for one that does not exist: same code, reason, message and
  metadata, so no answer tells a customer that someone else's account exists (OWASP API1,
  BOLA). Even where its role could never do the thing (UpdateAccountStatus), only its own
  accounts answer ROLE_NOT_ALLOWED.
- A service or customer naming a debit, a read or a close of an account that does not exist
  gets that same ACCOUNT_NOT_FOUND before anything is recorded (an admin's transfer from a
  missing account is still recorded REJECTED by the posting rules, as before).
- Credits are not checked here: paying someone needs only that the account exists, which
  the posting rules check (a missing one is a recorded ACCOUNT_NOT_FOUND refusal).
- Internal accounts (clr_, sub_) are refused to every role before this module is asked
  (ids.validate_client_account_id: INTERNAL_ACCOUNT).

Decided here where the issue leaves it open, as a demanding bank would:
- The tier a customer opens its own account at is not restricted here (the issue's rule is
  the owner): a bank whose end users call corebank directly and whose tiers are KYC levels
  must put its onboarding (a service) in front of OpenAccount.
- A service (a payments gateway acting for customers) never touches SYSTEM accounts: it may
  not read, debit or close them, nor change any status (that is the operator's job).
- An operator moves no money and opens no accounts, but may read, block, freeze and close
  any account, SYSTEM ones included (an incident may need the bank's own accounts frozen).

The use cases (services/ledger_service.py) ask, in this order: the caller's rate limit;
`check_role` (or `check_open_account`): what the role may never do, whatever the request
names, before the request is even validated; the request's validation (INTERNAL_ACCOUNT
among it); then, when `needs_ownership` says so, the owner and kind of the account named,
for `check_account`. Every refusal comes before anything is registered or recorded.
"""

from __future__ import annotations

import dataclasses
import enum

from services.ledger import errors
from services.ledger.access import Caller, Role
from services.ledger.accounts import AccountKind

CUSTOMER_KINDS = frozenset({AccountKind.CUSTOMER, AccountKind.MERCHANT})
ALL_KINDS = frozenset(AccountKind)
NO_KINDS: frozenset[AccountKind] = frozenset()


@dataclasses.dataclass(frozen=True, slots=True)
class AccountOwnership:
    """What authorisation needs of an account: neither ever changes once it is opened."""

    owner_id: str
    kind: AccountKind


class Action(enum.Enum):
    """What a caller does to one account it names; the value is the ROLE_NOT_ALLOWED metadata."""

    READ = "read_account"  # GetAccount, ListAccountTransfers
    UPDATE_STATUS = "update_account_status"
    CLOSE = "close_account"
    DEBIT = "transfer"  # the debit side of Transfer or CreateTransfers


# The action's name in ROLE_NOT_ALLOWED when the role may do it, but not to a SYSTEM account.
_SYSTEM_ACTION_NAMES = {
    Action.READ: "read_system_account",
    Action.UPDATE_STATUS: "update_system_account_status",
    Action.CLOSE: "close_system_account",
    Action.DEBIT: "transfer_from_system_account",
}
OPEN_ACCOUNT = "open_account"
OPEN_SYSTEM_ACCOUNT = "open_system_account"

# The kinds of account each role may act on, per action: the table of the docstring.
_KINDS: dict[Role, dict[Action, frozenset[AccountKind]]] = {
    Role.CUSTOMER: {
        Action.READ: CUSTOMER_KINDS, Action.UPDATE_STATUS: NO_KINDS, Action.CLOSE: CUSTOMER_KINDS, Action.DEBIT: CUSTOMER_KINDS,
    },
    Role.SERVICE: {
        Action.READ: CUSTOMER_KINDS, Action.UPDATE_STATUS: NO_KINDS, Action.CLOSE: CUSTOMER_KINDS, Action.DEBIT: CUSTOMER_KINDS,
    },
    Role.OPERATOR: {Action.READ: ALL_KINDS, Action.UPDATE_STATUS: ALL_KINDS, Action.CLOSE: ALL_KINDS, Action.DEBIT: NO_KINDS},
    Role.ADMIN: {Action.READ: ALL_KINDS, Action.UPDATE_STATUS: ALL_KINDS, Action.CLOSE: ALL_KINDS, Action.DEBIT: ALL_KINDS},
}
# Roles that see only their own accounts: any other answers as one that does not exist.
_SEES_OWN_ONLY = frozenset({Role.CUSTOMER})
# An admin may do everything: asked first, by identity, so that the callers of the hot path
# (the bench, a funding job) pay no table lookup (an Enum's hash is Python code).
_ADMIN = Role.ADMIN


class ClearingAction(enum.Enum):
    """What a caller does in corebank.v1.Clearing; the value is the ROLE_NOT_ALLOWED metadata."""

    REGISTER_PARTICIPANT = "register_participant"
    SET_NET_DEBIT_CAP = "set_net_debit_cap"
    RECORD_SETTLED = "record_participant_settled"
    CLOSE_WINDOW = "close_settlement_window"
    CREATE_SETTLEMENT = "create_settlement"
    READ = "read_clearing"  # participants, positions, windows, settlements, reconciliation


# The roles that may do each clearing action: the second table of the docstring.
_CLEARING_ROLES: dict[ClearingAction, frozenset[Role]] = {
    ClearingAction.REGISTER_PARTICIPANT: frozenset({Role.ADMIN}),
    ClearingAction.SET_NET_DEBIT_CAP: frozenset({Role.ADMIN}),
    ClearingAction.RECORD_SETTLED: frozenset({Role.ADMIN}),
    ClearingAction.CLOSE_WINDOW: frozenset({Role.ADMIN, Role.OPERATOR}),
    ClearingAction.CREATE_SETTLEMENT: frozenset({Role.ADMIN, Role.OPERATOR}),
    ClearingAction.READ: frozenset({Role.ADMIN, Role.OPERATOR, Role.SERVICE}),
}


def check_clearing(caller: Caller, action: ClearingAction) -> None:
    """Clearing's rule: by role alone (nothing in clearing is a customer's own), before validation."""
    if caller.role not in _CLEARING_ROLES[action]:
        raise role_not_allowed(caller, action.value)


def account_not_found(account_id: str, **metadata: object) -> errors.AccountNotFound:
    """The one answer for an account that does not exist, or that the caller may not see."""
    return errors.AccountNotFound(f"account {account_id} not found", account_id=account_id, **metadata)


def transfer_not_found(transfer_id: str) -> errors.TransferNotFound:
    """The one answer for a transfer that does not exist, or that the caller may not see."""
    return errors.TransferNotFound(f"transfer {transfer_id} not found", transfer_id=transfer_id)


def role_not_allowed(caller: Caller, action: str) -> errors.RoleNotAllowed:
    return errors.RoleNotAllowed(f"role {caller.role.value} may not {action}", role=caller.role.value, action=action)


def owns(caller: Caller, ownership: AccountOwnership) -> bool:
    """A customer's own account: its subject is the owner, and it is not one of the bank's."""
    return ownership.owner_id == caller.subject and ownership.kind in CUSTOMER_KINDS


def check_open_account(caller: Caller, owner_id: str, kind: int) -> None:
    """OpenAccount's rule, from the request alone; it runs before validation, so any kind number
    may come here (an unknown kind is not SYSTEM: validation refuses it next)."""
    if caller.role == Role.ADMIN:
        return
    if caller.role == Role.OPERATOR:
        raise role_not_allowed(caller, OPEN_ACCOUNT)
    if kind == AccountKind.SYSTEM:
        raise role_not_allowed(caller, OPEN_SYSTEM_ACCOUNT)
    if caller.role == Role.CUSTOMER:
        if owner_id != caller.subject:
            raise errors.OwnerMismatch("a customer opens accounts for its own owner_id only", field="owner_id")


def check_role(caller: Caller, action: Action) -> None:
    """Refuse at once what the role may never do to any account. A customer is not refused here:
    it must first be told "not found" for every account that is not its own."""
    if caller.role is _ADMIN:
        return
    if caller.role not in _SEES_OWN_ONLY and not _KINDS[caller.role][action]:
        raise role_not_allowed(caller, action.value)


def needs_ownership(caller: Caller, action: Action) -> bool:
    """Whether `check_account` needs the account's owner and kind: not for a role that may act
    on every account (an admin, an operator's reads), so those callers cost no lookup."""
    if caller.role is _ADMIN:
        return False
    return caller.role in _SEES_OWN_ONLY or _KINDS[caller.role][action] not in (ALL_KINDS, NO_KINDS)


def check_account(
    caller: Caller, action: Action, account_id: str, ownership: AccountOwnership | None, **not_found_metadata: object
) -> None:
    """The rule for one account the caller names; `ownership` is None when it does not exist.

    Raises ACCOUNT_NOT_FOUND (with `not_found_metadata`, as the use case's own not-found
    answer carries it) or ROLE_NOT_ALLOWED.
    """
    kinds = _KINDS[caller.role][action]
    if caller.role in _SEES_OWN_ONLY and (ownership is None or not owns(caller, ownership)):
        raise account_not_found(account_id, **not_found_metadata)
    if not kinds:
        raise role_not_allowed(caller, action.value)
    if ownership is None:
        raise account_not_found(account_id, **not_found_metadata)
    if ownership.kind not in kinds:
        raise role_not_allowed(caller, _SYSTEM_ACTION_NAMES[action])


def needs_transfer_parties(caller: Caller) -> bool:
    """Whether GetTransfer must know who owns the transfer's accounts (only for a customer)."""
    return caller.role is not _ADMIN and caller.role in _SEES_OWN_ONLY


def check_transfer_visible(caller: Caller, transfer_id: str, sides: list[AccountOwnership | None]) -> None:
    """GetTransfer's rule: a customer sees a transfer only from or to one of its own accounts
    (`sides`: the debit and credit accounts' owners, None for one that does not exist)."""
    if caller.role not in _SEES_OWN_ONLY:
        return
    if not any(side is not None and owns(caller, side) for side in sides):
        raise transfer_not_found(transfer_id)


# The idempotency keys a conflict may echo back (the caller's own key, nothing of the first use).
_ECHOED_KEYS = ("transfer_id", "request_id")


def disclosed(caller: Caller | None, error: errors.LedgerError) -> errors.LedgerError:
    """What `caller` may learn from `error`.

    transfer_id and request_id are unique bank-wide, so the first use of a key may be another
    owner's: a conflict that listed the fields differing from it would let a customer test
    guesses of someone else's payee, amount or reference one call at a time. A customer's
    conflict therefore names no fields. (That the key is taken cannot be hidden: a free key
    would have succeeded.)
    """
    if caller is None or caller.role is not Role.CUSTOMER or not isinstance(error, errors.IdempotencyConflict):
        return error
    echoed = {key: value for key, value in error.metadata.items() if key in _ECHOED_KEYS}
    return errors.IdempotencyConflict("this id is already used by another request; retry with the same fields or choose a new id", **echoed)
