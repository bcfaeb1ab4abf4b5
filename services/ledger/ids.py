"""Client-chosen ids and server-derived account ids."""

import base64
import enum
import hashlib
import re

from services.ledger import clearing, errors

ID_LENGTH_MAX = 64
REFERENCE_LENGTH_MAX = 256
_ID_PATTERN = re.compile(r"[A-Za-z0-9._:\-]+")
# C0 controls and DEL: one regex search, not a Python loop over up to 256 characters per call.
_CONTROL_CHARACTER = re.compile(r"[\x00-\x1f\x7f]")
ACCOUNT_ID_PREFIX = "acc_"
# A merchant that collects on every shard (flash sales): its payments are routed by id alone.
COLLECTING_ACCOUNT_ID_PREFIX = "hot_"
# Its collection sub-accounts, one per shard: "sub_<merchant id body>_<n>".
COLLECTION_ACCOUNT_ID_PREFIX = "sub_"
# Each shard's clearing (suspense) accounts for transfers between shards: "clr_<currency>_<lane>_<n>".
CLEARING_ACCOUNT_ID_PREFIX = "clr_"
# The owner_id of every clearing account.
CLEARING_OWNER_ID = "corebank-clearing"
# Accounts that belong to the ledger itself: no client debits, credits or reads them.
INTERNAL_ACCOUNT_ID_PREFIXES = (COLLECTION_ACCOUNT_ID_PREFIX, CLEARING_ACCOUNT_ID_PREFIX)
# Transfer ids the ledger makes for itself (sweeps). Clients cannot choose them, so no
# client id can ever collide with the ledger's own transfers.
RESERVED_TRANSFER_ID_PREFIX = "sys:"


class IdNamespace(enum.IntEnum):
    """id_registry.namespace: each kind of idempotency key is unique bank-wide within its namespace."""

    TRANSFER = 1
    ACCOUNT_REQUEST = 2


def conflicting_fields(registered: dict, requested: dict) -> list[str]:
    """The fields where a reused idempotency key differs from its first use, in the request's order."""
    names = list(requested) + [name for name in registered if name not in requested]
    return [name for name in names if registered.get(name) != requested.get(name)]


def conflict_with_first_use(field: str, key: str, first_use: dict, requested: dict) -> errors.IdempotencyConflict | None:
    """The refusal of an idempotency key reused with other fields than its first use, or None."""
    conflicts = conflicting_fields(first_use, requested)
    if not conflicts:
        return None
    return errors.IdempotencyConflict(
        f"{field} {key} was first used with other {', '.join(conflicts)}", conflicting_fields=",".join(conflicts), **{field: key}
    )


def validate_id(value: str, field: str) -> str:
    if not value:
        raise errors.MissingField(f"{field} is required", field=field)
    if len(value) > ID_LENGTH_MAX:
        raise errors.InvalidId(f"{field} is longer than {ID_LENGTH_MAX} characters", field=field)
    if not _ID_PATTERN.fullmatch(value):
        raise errors.InvalidId(f"{field} may hold only A-Z a-z 0-9 . _ : -", field=field)
    return value


def is_internal_account(account_id: str) -> bool:
    return account_id.startswith(INTERNAL_ACCOUNT_ID_PREFIXES)


def validate_client_account_id(value: str, field: str) -> str:
    """An account id a client may name: well formed, and not one of the ledger's own accounts."""
    validate_id(value, field)
    if is_internal_account(value):
        raise errors.InternalAccount(f"{field} names an internal account of the ledger", field=field, account_id=value)
    return value


def validate_transfer_account_id(value: str, field: str) -> str:
    """An account id a client may name as a side of a transfer: not internal, not a settlement account."""
    validate_client_account_id(value, field)
    # Settlement accounts are moved only by the ledger's own settlement transfers; clients may
    # read them (GetAccount), never name them in a transfer.
    if clearing.is_settlement_account(value):
        raise errors.InternalAccount(f"{field} names a settlement account: only settlements move it", field=field, account_id=value)
    return value


def validate_client_transfer_id(value: str) -> str:
    validate_id(value, "transfer_id")
    if value.startswith(RESERVED_TRANSFER_ID_PREFIX):
        raise errors.ReservedId(
            f"transfer ids starting {RESERVED_TRANSFER_ID_PREFIX!r} are the ledger's own", field="transfer_id"
        )
    return value


def validate_reference(reference: str) -> str:
    if len(reference) > REFERENCE_LENGTH_MAX:
        raise errors.FieldTooLong(
            f"reference is longer than {REFERENCE_LENGTH_MAX} characters", field="reference", limit=REFERENCE_LENGTH_MAX
        )
    if _CONTROL_CHARACTER.search(reference):
        raise errors.InvalidField("reference may not hold control characters", field="reference")
    return reference


def account_id_for_request(request_id: str, collect_on_every_shard: bool = False) -> str:
    """The account id is a digest of the OpenAccount request_id.

    So a retried OpenAccount lands on the same shard as the first attempt and
    meets its row there: idempotency needs no global directory. The prefix tells
    a merchant collecting on every shard, so routing a payment needs no lookup.
    """
    digest = hashlib.blake2b(request_id.encode("utf-8"), digest_size=16, person=b"corebank.account").digest()
    prefix = COLLECTING_ACCOUNT_ID_PREFIX if collect_on_every_shard else ACCOUNT_ID_PREFIX
    return prefix + base64.b32encode(digest).decode("ascii").rstrip("=").lower()


def is_collecting_account(account_id: str) -> bool:
    return account_id.startswith(COLLECTING_ACCOUNT_ID_PREFIX)


def collection_parent(account_id: str) -> str | None:
    """The merchant a collection sub-account belongs to, or None for any other account."""
    if not account_id.startswith(COLLECTION_ACCOUNT_ID_PREFIX):
        return None
    body = account_id[len(COLLECTION_ACCOUNT_ID_PREFIX):].rsplit("_", 1)[0]
    return COLLECTING_ACCOUNT_ID_PREFIX + body
