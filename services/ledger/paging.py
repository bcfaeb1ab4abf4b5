"""Page sizes and opaque page tokens for newest-first listings."""

import base64
import json

from services.ledger import errors

PAGE_SIZE_DEFAULT = 50
PAGE_SIZE_MAX = 500
# A first page starts before every seq a shard can hand out (bigserial).
SEQ_BEFORE_FIRST_PAGE = 2**63 - 1
# The tokens this service issues are about 150 characters (an id of at most 64 and a seq);
# anything much longer is refused before it is decoded.
PAGE_TOKEN_CHARS_MAX = 512


def validate_page_size(page_size: int) -> int:
    if page_size == 0:
        return PAGE_SIZE_DEFAULT
    if page_size < 0 or page_size > PAGE_SIZE_MAX:
        raise errors.InvalidPageSize(f"page_size must be between 1 and {PAGE_SIZE_MAX}", limit=PAGE_SIZE_MAX)
    return page_size


def encode_page_token(account_id: str, before_seq: int) -> str:
    payload = json.dumps({"account_id": account_id, "before_seq": before_seq}, separators=(",", ":"))
    return base64.urlsafe_b64encode(payload.encode()).decode().rstrip("=")


def decode_page_token(token: str, account_id: str) -> int:
    """The seq to list before; a token is only valid for the account it was issued for."""
    if not token:
        return SEQ_BEFORE_FIRST_PAGE
    if len(token) > PAGE_TOKEN_CHARS_MAX:
        raise errors.InvalidPageToken("page_token is not one this service issued")
    try:
        payload = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
        before_seq = payload["before_seq"]
        issued_for = payload["account_id"]
    except (ValueError, KeyError, TypeError, RecursionError) as error:
        raise errors.InvalidPageToken("page_token is not one this service issued") from error
    # type() and not isinstance(): JSON true is a Python bool, and bool is an int.
    if issued_for != account_id or type(before_seq) is not int or not 0 < before_seq <= SEQ_BEFORE_FIRST_PAGE:
        raise errors.InvalidPageToken("page_token was issued for another listing")
    return before_seq
