"""The hash chain, without a database: encoding, hashing, and `verify` naming the first broken link."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.audit_log import chain
from services.audit_log.chain import Entry, Link, Problem

CHAIN_ID = "grpc-0:4242:0123456789ab"
# Every text a field may hold once cleaned: any Unicode but lone surrogates and NUL.
FIELD_TEXT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=40)


def events(count: int) -> list[chain.Event]:
    return [
        chain.event(1_700_000_000_000_000 + n, f"subject-{n % 3}", "service", "transfer", f"t-{n}",
                    chain.detail_text({"amount_minor": n, "currency": "USD"}), "POSTED")
        for n in range(count)
    ]


def links(count: int, chain_id: str = CHAIN_ID) -> list[Link]:
    return chain.chained(chain_id, 1, chain.GENESIS_HASH, events(count))


def test_a_chain_as_written_holds():
    stored = links(10)
    assert chain.verify(stored) is None
    report = chain.check(CHAIN_ID, stored)
    assert (report.entries, report.last_seq, report.head_hash, report.broken) == (10, 10, stored[-1].hash, None)
    assert [link.entry.seq for link in stored] == list(range(1, 11))


def test_each_hash_is_sha256_of_the_previous_hash_and_the_encoding():
    first, second = links(2)
    assert first.prev_hash == chain.GENESIS_HASH == bytes(32)
    assert first.hash == hashlib.sha256(bytes(32) + chain.encoding(first.entry)).digest()
    assert second.prev_hash == first.hash
    assert second.hash == chain.entry_hash(first.hash, second.entry)


def test_the_encoding_is_length_prefixed_in_a_fixed_order():
    entry = Entry("c", 1, 2, "s", "r", "a", "t", "{}", "OK")
    tag = chain.ENCODING_VERSION.encode()
    fields = (b"c", b"1", b"2", b"s", b"r", b"a", b"t", b"{}", b"OK")
    expected = len(tag).to_bytes(4, "big") + tag + b"".join(len(value).to_bytes(4, "big") for value in fields) + b"".join(fields)
    assert chain.encoding(entry) == expected
    # Non-ASCII text is counted in bytes, not characters.
    assert len(chain.encoding(entry._replace(subject="é"))) == len(expected) + 1


def test_moving_text_between_fields_changes_the_hash():
    """No two field tuples share an encoding: a separator inside a field cannot fake a boundary."""
    one = Entry("c", 1, 2, "ab", "c", "a", "t", "", "OK")
    other = Entry("c", 1, 2, "a", "bc", "a", "t", "", "OK")
    assert chain.encoding(one) != chain.encoding(other)
    assert chain.entry_hash(chain.GENESIS_HASH, one) != chain.entry_hash(chain.GENESIS_HASH, other)


def test_clean_text_makes_anything_storable():
    assert chain.clean_text("plain") == "plain"
    assert chain.clean_text("a\x00b") == "a\\x00b"
    assert chain.clean_text("lone \ud800 surrogate") == "lone \\ud800 surrogate"
    clipped = chain.clean_text("x" * 1000)
    assert len(clipped) == chain.TEXT_CHARS_MAX and clipped.endswith(chain.CLIPPED_MARK)
    made = chain.event(1, "s\x00", "r", "a", "t\ud800", "{}", "o")
    chain.encoding(chain.in_chain("c", 1, made))  # encodes: valid UTF-8, no NUL


def test_detail_text_is_canonical_ascii_json():
    assert chain.detail_text({"b": 1, "a": "é\x00"}) == '{"a":"\\u00e9\\u0000","b":1}'


def test_an_empty_chain_holds():
    assert chain.verify([]) is None


@pytest.mark.parametrize("field", Entry._fields)
def test_a_changed_field_breaks_that_link(field):
    stored = links(6)
    entry = stored[3].entry
    changed = entry._replace(**{field: getattr(entry, field) + (1 if isinstance(getattr(entry, field), int) else "x")})
    stored[3] = stored[3]._replace(entry=changed)
    found = chain.verify(stored)
    assert found is not None and found.seq == 4, found
    expected = {"seq": Problem.OUT_OF_ORDER, "chain_id": Problem.OTHER_CHAIN}.get(field, Problem.HASH)
    if field == "seq":
        # seq 4 stored as 5: seq 4 is missing where it should be.
        expected = Problem.MISSING
    assert found.problem == expected


def test_a_changed_prev_hash_or_hash_breaks_that_link():
    stored = links(5)
    stored[2] = stored[2]._replace(prev_hash=bytes(32))
    assert (chain.verify(stored).seq, chain.verify(stored).problem) == (3, Problem.PREV_HASH)
    stored = links(5)
    stored[2] = stored[2]._replace(hash=hashlib.sha256(b"forged").digest())
    assert (chain.verify(stored).seq, chain.verify(stored).problem) == (3, Problem.HASH)


def test_a_rewritten_entry_with_its_hash_recomputed_breaks_the_next_link():
    stored = links(5)
    forged = stored[1].entry._replace(outcome="refused:INSUFFICIENT_FUNDS")
    stored[1] = chain.link(stored[1].prev_hash, forged)
    found = chain.verify(stored)
    assert (found.seq, found.problem) == (3, Problem.PREV_HASH)


def test_a_deleted_entry_is_named():
    stored = links(6)
    del stored[2]
    found = chain.verify(stored)
    assert (found.seq, found.problem) == (3, Problem.MISSING)
    assert "no entry with seq 3; the next stored is 4" in found.detail


def test_a_chain_cut_at_its_start_is_named():
    stored = links(6)[2:]
    found = chain.verify(stored)
    assert (found.chain_id, found.seq, found.problem) == (CHAIN_ID, 1, Problem.MISSING)
    assert "1..2" in found.detail


def test_a_cut_at_the_end_is_not_visible_to_the_chain_alone_but_breaks_an_anchor():
    stored = links(6)
    report = chain.check(CHAIN_ID, stored[:4])
    assert report.broken is None and report.last_seq == 4
    found = chain.anchor_break(report, 6, stored[5].hash, None, "an earlier verify")
    assert (found.seq, found.problem) == (5, Problem.ANCHOR)
    assert chain.anchor_break(report, 3, stored[2].hash, stored[2].hash, "an earlier verify") is None
    assert chain.anchor_break(report, 3, stored[2].hash, stored[1].hash, "x").problem == Problem.ANCHOR


def test_a_closed_chain_says_so():
    closing = chain.event(5, "corebank-ledger", "admin", chain.CHAIN_CLOSED, CHAIN_ID, "", "OK")
    stored = chain.chained(CHAIN_ID, 1, chain.GENESIS_HASH, [*events(3), closing])
    assert chain.check(CHAIN_ID, stored).closed
    assert not chain.check(CHAIN_ID, stored[:3]).closed


# Properties: whatever the chain, any single tampering is found, at the first link it breaks.


@st.composite
def stored_chains(draw, min_size: int = 1):
    count = draw(st.integers(min_value=min_size, max_value=30))
    made = [
        chain.event(draw(st.integers(0, 2**62)), draw(FIELD_TEXT), draw(st.sampled_from(["customer", "operator", "admin", "service"])),
                    draw(FIELD_TEXT), draw(FIELD_TEXT), draw(FIELD_TEXT), draw(FIELD_TEXT))
        for _ in range(count)
    ]
    return chain.chained(draw(FIELD_TEXT.filter(bool)), 1, chain.GENESIS_HASH, made)


@settings(max_examples=200, deadline=None)
@given(stored_chains(), st.data())
def test_any_single_field_tamper_is_named_at_its_link(stored, data):
    index = data.draw(st.integers(0, len(stored) - 1))
    field = data.draw(st.sampled_from([*Entry._fields, "prev_hash", "hash"]))
    link = stored[index]
    if field in ("prev_hash", "hash"):
        value = getattr(link, field)
        tampered = link._replace(**{field: data.draw(st.binary(min_size=32, max_size=32).filter(lambda b: b != value))})
    else:
        value = getattr(link.entry, field)
        if isinstance(value, int):
            new = data.draw(st.integers(0, 2**62).filter(lambda v: v != value))
        else:
            new = data.draw(FIELD_TEXT.filter(lambda v: v != value))
        tampered = link._replace(entry=link.entry._replace(**{field: new}))
    stored = [*stored[:index], tampered, *stored[index + 1:]]
    found = chain.verify(stored)
    assert found is not None
    if field == "seq" and index == 0 and tampered.entry.seq > 1 and tampered.entry.chain_id == stored[0].entry.chain_id:
        assert found.seq == 1  # seq 1 is missing
    assert found.seq == index + 1, (field, found)


@settings(max_examples=200, deadline=None)
@given(stored_chains(min_size=2), st.data())
def test_any_deleted_entry_but_the_last_is_named(stored, data):
    index = data.draw(st.integers(0, len(stored) - 2))
    found = chain.verify([*stored[:index], *stored[index + 1:]])
    assert (found.seq, found.problem) == (index + 1, Problem.MISSING)


@settings(max_examples=200, deadline=None)
@given(stored_chains(min_size=2), st.data())
def test_any_swapped_pair_is_named_at_the_first_of_the_two(stored, data):
    first = data.draw(st.integers(0, len(stored) - 2))
    second = data.draw(st.integers(first + 1, len(stored) - 1))
    swapped = list(stored)
    # The rows trade places: each takes the other's seq, the rest of its content kept (its hashes too).
    swapped[first] = stored[second]._replace(entry=stored[second].entry._replace(seq=first + 1))
    swapped[second] = stored[first]._replace(entry=stored[first].entry._replace(seq=second + 1))
    found = chain.verify(swapped)
    assert found is not None and found.seq == first + 1


@settings(max_examples=200, deadline=None)
@given(stored_chains(min_size=2), st.data())
def test_any_truncated_start_is_named_at_seq_one(stored, data):
    cut = data.draw(st.integers(1, len(stored) - 1))
    found = chain.verify(stored[cut:])
    assert (found.seq, found.problem) == (1, Problem.MISSING)


@settings(max_examples=100, deadline=None)
@given(stored_chains(min_size=3), st.data())
def test_only_the_first_of_several_tamperings_is_named(stored, data):
    first = data.draw(st.integers(0, len(stored) - 2))
    later = data.draw(st.integers(first + 1, len(stored) - 1))
    tampered = list(stored)
    for index in (later, first):
        tampered[index] = tampered[index]._replace(entry=tampered[index].entry._replace(outcome=tampered[index].entry.outcome + "!"))
    assert chain.verify(tampered).seq == first + 1
