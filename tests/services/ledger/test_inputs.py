"""Stateless validation of ids, amounts, currencies, references and page tokens."""

import pytest
from hypothesis import given, strategies as st

from services.ledger import errors, ids, money, paging
from services.ledger.accounts import OpenAccountRequest
from services.ledger.limits import TierLimits
from services.ledger.transfers import TransferRequest

LIMITS = TierLimits.load()
VALID_ID = st.from_regex(r"[A-Za-z0-9._:\-]{1,64}", fullmatch=True)


def transfer(**overrides) -> TransferRequest:
    fields = dict(transfer_id="t-1", debit_account_id="acc_a", credit_account_id="acc_b", amount_minor=100, currency="USD")
    return TransferRequest(**{**fields, **overrides})


@given(VALID_ID)
def test_valid_ids_pass(value):
    assert ids.validate_id(value, "transfer_id") == value


@given(st.text(min_size=65, max_size=200))
def test_oversized_ids_fail(value):
    with pytest.raises(errors.InvalidId):
        ids.validate_id(value, "transfer_id")


@given(st.text(min_size=1, max_size=64).filter(lambda v: any(not (c.isascii() and (c.isalnum() or c in "._:-")) for c in v)))
def test_ids_with_other_characters_fail(value):
    with pytest.raises(errors.InvalidId):
        ids.validate_id(value, "owner_id")


def test_empty_id_is_a_missing_field_naming_the_field():
    with pytest.raises(errors.MissingField) as raised:
        ids.validate_id("", "request_id")
    assert raised.value.metadata == {"field": "request_id"}


@given(st.integers(max_value=0))
def test_zero_and_negative_amounts_fail(amount_minor):
    with pytest.raises(errors.InvalidAmount):
        transfer(amount_minor=amount_minor).validated()


@given(st.integers(min_value=money.INT64_MAX + 1))
def test_amounts_beyond_int64_fail(amount_minor):
    with pytest.raises(errors.InvalidAmount):
        transfer(amount_minor=amount_minor).validated()


@given(st.integers(min_value=1, max_value=money.INT64_MAX))
def test_positive_int64_amounts_pass(amount_minor):
    assert transfer(amount_minor=amount_minor).validated().amount_minor == amount_minor


@given(st.text(max_size=5).filter(lambda c: c not in money.CURRENCY_EXPONENTS and c != ""))
def test_unknown_currencies_fail(currency):
    with pytest.raises(errors.UnknownCurrency):
        transfer(currency=currency).validated()


def test_missing_currency_is_a_missing_field():
    with pytest.raises(errors.MissingField):
        transfer(currency="").validated()


def test_same_account_fails():
    with pytest.raises(errors.SameAccount):
        transfer(credit_account_id="acc_a").validated()


def test_references_are_bounded_and_printable():
    assert transfer(reference="x" * ids.REFERENCE_LENGTH_MAX).validated()
    with pytest.raises(errors.FieldTooLong):
        transfer(reference="x" * (ids.REFERENCE_LENGTH_MAX + 1)).validated()
    with pytest.raises(errors.InvalidField):
        transfer(reference="nul\x00byte").validated()


def test_a_reference_is_refused_for_exactly_the_c0_controls_and_del():
    for code_point in [*range(0x00, 0x100), 0x2028, 0xFEFF, 0x10FFFF]:
        character = chr(code_point)
        is_control = code_point < 0x20 or code_point == 0x7F
        for reference in (character, f"before{character}", f"{character}after", f"a{character}b"):
            if is_control:
                with pytest.raises(errors.InvalidField):
                    ids.validate_reference(reference)
            else:
                assert ids.validate_reference(reference) == reference


def test_currency_exponents_follow_iso_4217():
    assert (money.currency_exponent("USD"), money.currency_exponent("JPY"), money.currency_exponent("KWD")) == (2, 0, 3)


def test_account_id_is_a_valid_id_derived_from_the_request_id_only():
    first = ids.account_id_for_request("req-1")
    assert first == ids.account_id_for_request("req-1") != ids.account_id_for_request("req-2")
    assert ids.validate_id(first, "account_id")


def test_open_account_validation():
    good = OpenAccountRequest("req-1", "owner-1", "USD", kind=1, tier=0)
    # An account opened without a participant belongs to the hosting one.
    assert good.validated(LIMITS).participant_id == "corebank" and good.validated(LIMITS).request_id == good.request_id
    with pytest.raises(errors.MissingField):
        OpenAccountRequest("req-1", "owner-1", "USD", kind=0, tier=0).validated(LIMITS)
    with pytest.raises(errors.InvalidField):
        OpenAccountRequest("req-1", "owner-1", "USD", kind=9, tier=0).validated(LIMITS)
    with pytest.raises(errors.InvalidTier):
        OpenAccountRequest("req-1", "owner-1", "USD", kind=1, tier=42).validated(LIMITS)
    with pytest.raises(errors.InvalidTier):  # tier tables are per currency
        OpenAccountRequest("req-1", "owner-1", "SEK", kind=1, tier=0).validated(LIMITS)


@given(st.integers(min_value=1, max_value=paging.SEQ_BEFORE_FIRST_PAGE))
def test_page_tokens_round_trip_for_their_own_account(before_seq):
    token = paging.encode_page_token("acc_a", before_seq)
    assert paging.decode_page_token(token, "acc_a") == before_seq
    with pytest.raises(errors.InvalidPageToken):
        paging.decode_page_token(token, "acc_b")


@given(st.text(min_size=1, max_size=100))
def test_garbage_page_tokens_fail_cleanly(token):
    try:
        before_seq = paging.decode_page_token(token, "acc_a")
    except errors.InvalidPageToken:
        return
    assert 0 < before_seq <= paging.SEQ_BEFORE_FIRST_PAGE  # a token that happens to decode must still be in range


def _token_of(payload: str) -> str:
    import base64

    return base64.urlsafe_b64encode(payload.encode()).decode().rstrip("=")


@pytest.mark.parametrize(
    "payload",
    [
        "[" * 1000 + "0" + "]" * 1000,  # RecursionError in json, once answered INTERNAL (found by the fuzz)
        '{"account_id": "acc_a", "before_seq": true}',  # a bool is an int in Python, not in SQL (same)
        '{"account_id": "acc_a", "before_seq": false}',
        '{"account_id": "acc_a", "before_seq": 9223372036854775808}',
        '{"account_id": "acc_a", "before_seq": 1.5}',
        '{"account_id": "acc_a", "before_seq": "12"}',
        '{"account_id": "acc_a", "before_seq": 1, "pad": "' + "x" * paging.PAGE_TOKEN_CHARS_MAX + '"}',
    ],
)
def test_forged_page_tokens_are_invalid_page_tokens(payload):
    with pytest.raises(errors.InvalidPageToken):
        paging.decode_page_token(_token_of(payload), "acc_a")


def test_page_sizes_are_bounded():
    assert paging.validate_page_size(0) == paging.PAGE_SIZE_DEFAULT
    assert paging.validate_page_size(paging.PAGE_SIZE_MAX) == paging.PAGE_SIZE_MAX
    for bad in (-1, paging.PAGE_SIZE_MAX + 1):
        with pytest.raises(errors.InvalidPageSize):
            paging.validate_page_size(bad)
