"""Client-chosen ids and server-derived account ids."""

import base64
import hashlib
import re

from services.ledger import errors

ID_LENGTH_MAX = 64
REFERENCE_LENGTH_MAX = 256
_ID_PATTERN = re.compile(r"[A-Za-z0-9._:\-]+")
ACCOUNT_ID_PREFIX = "acc_"


def validate_id(value: str, field: str) -> str:
    if not value:
        raise errors.MissingField(f"{field} is required", field=field)
    if len(value) > ID_LENGTH_MAX:
        raise errors.InvalidId(f"{field} is longer than {ID_LENGTH_MAX} characters", field=field)
    if not _ID_PATTERN.fullmatch(value):
        raise errors.InvalidId(f"{field} may hold only A-Z a-z 0-9 . _ : -", field=field)
    return value


def validate_reference(reference: str) -> str:
    if len(reference) > REFERENCE_LENGTH_MAX:
        raise errors.FieldTooLong(
            f"reference is longer than {REFERENCE_LENGTH_MAX} characters", field="reference", limit=REFERENCE_LENGTH_MAX
        )
    if any(ord(character) < 0x20 or ord(character) == 0x7F for character in reference):
        raise errors.InvalidField("reference may not hold control characters", field="reference")
    return reference


def account_id_for_request(request_id: str) -> str:
    """The account id is a digest of the OpenAccount request_id.

    So a retried OpenAccount lands on the same shard as the first attempt and
    meets its row there: idempotency needs no global directory.
    """
    digest = hashlib.blake2b(request_id.encode("utf-8"), digest_size=16, person=b"corebank.account").digest()
    return ACCOUNT_ID_PREFIX + base64.b32encode(digest).decode("ascii").rstrip("=").lower()
