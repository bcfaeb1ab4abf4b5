"""FastListDumper binds lists exactly as psycopg's own dumper would, and safely.

Array parameters carry client data into SQL text (client-side binding): ids, references,
the JSON of an id's first use. Every value must reach PostgreSQL as it was, whatever it
holds (quotes, backslashes, braces, commas, the word NULL, white space, non-ASCII), a NUL
must be refused before anything is sent, and an int list must have the type psycopg gives
it, since a statement without a cast reads that type.
"""

from __future__ import annotations

import json

import hypothesis.strategies as st
import psycopg
import pytest
from hypothesis import HealthCheck, given, settings

from services.storage.array_literal import FastListDumper, int_array_type, text_array

NASTY_STRINGS = [
    "", " ", "  padded  ", "NULL", "null", "Null", "'", "''", "it's", '"', '""', 'say "hi"', "\\", "\\\\", "\\'", "\\\"",
    "a,b", ",", "{", "}", "{}", "{a,b}", '{"a"}', "}{", "(", ")", ";", "--", "/*", "*/", "$$", "$1", "%s", "%(x)s", "%%",
    "'); DROP TABLE transfers; --", "E'\\x41'", "\t", "\n", "\r\n", "\x01", "\x7f", "\u00a0", "\u2028", "é", "€", "😀",
    "a\\nb", '{"debit_account_id": "x\\"y", "amount_minor": 5}', "x" * 300,
]

WELL_KNOWN_INTS = [0, 1, -1, 2**15 - 1, 2**15, -(2**15), -(2**15) - 1, 2**31 - 1, 2**31, -(2**31), -(2**31) - 1,
                   2**63 - 1, -(2**63), 2**63, -(2**63) - 1, 10**30]


def test_text_array_quotes_every_element():
    assert text_array([]) == "{}"
    assert text_array(["a"]) == '{"a"}'
    assert text_array(["a", "b c"]) == '{"a","b c"}'
    assert text_array(['q"u', "b\\s"]) == '{"q\\"u","b\\\\s"}'
    assert text_array(["NULL", None]) == '{"NULL",NULL}'
    assert text_array([None, None]) == "{NULL,NULL}"


@pytest.mark.parametrize("values", [["a\x00b"], ["ok", "\x00"], ["\x00", None], ["a", "b\x00", "c"]])
def test_a_nul_is_refused(values):
    with pytest.raises(psycopg.DataError):
        text_array(values)


def test_int_array_type_is_psycopgs_choice():
    assert int_array_type([]) == ""
    assert int_array_type([None]) == ""
    assert int_array_type([1, 2]) == "int2[]"
    assert int_array_type([-(2**15), 2**15 - 1]) == "int2[]"
    assert int_array_type([2**15]) == "int4[]"
    assert int_array_type([-(2**15) - 1]) == "int4[]"
    assert int_array_type([2**31]) == "int8[]"
    assert int_array_type([None, -(2**63)]) == "int8[]"
    assert int_array_type([2**63]) == "numeric[]"


@pytest.fixture(scope="module")
def cursors(cluster):
    """A cursor with psycopg's own list dumper, and one with FastListDumper, on one connection."""
    with psycopg.connect(cluster["shards"][0]["dsn"], autocommit=True) as connection:
        plain = psycopg.ClientCursor(connection)
        fast = psycopg.ClientCursor(connection)
        fast.adapters.register_dumper(list, FastListDumper)
        yield plain, fast


def _round_trip(cursor, sql: str, value) -> tuple:
    cursor.execute(sql, [value])
    return cursor.fetchone()


@pytest.mark.cluster
@pytest.mark.parametrize("values", [[text] for text in NASTY_STRINGS] + [NASTY_STRINGS, NASTY_STRINGS + [None], [None], []])
def test_nasty_strings_arrive_as_they_were(cursors, values):
    plain, fast = cursors
    assert _round_trip(fast, "SELECT %s::text[]", values) == (values,)
    assert _round_trip(fast, "SELECT %s::text[]", values) == _round_trip(plain, "SELECT %s::text[]", values)


@pytest.mark.cluster
def test_json_documents_arrive_as_they_were(cursors):
    _, fast = cursors
    documents = [json.dumps({"reference": text, "amount_minor": 5}, sort_keys=True) for text in NASTY_STRINGS if text.isprintable()]
    (stored,) = _round_trip(fast, "SELECT array_agg(document::text) FROM unnest(%s::jsonb[]) AS document", documents)
    assert [json.loads(text) for text in stored] == [json.loads(text) for text in documents]


@pytest.mark.cluster
@pytest.mark.parametrize("values", [[value] for value in WELL_KNOWN_INTS] + [WELL_KNOWN_INTS, [1, None, 3], [None, None]])
def test_ints_arrive_with_the_type_psycopg_gives_them(cursors, values):
    plain, fast = cursors
    sql = "SELECT %s, pg_typeof(%s)::text"
    fast.execute(sql, [values, values])
    plain.execute(sql, [values, values])
    assert fast.fetchone() == plain.fetchone()


@pytest.mark.cluster
def test_a_nul_is_refused_before_anything_is_sent(cursors):
    _, fast = cursors
    with pytest.raises(psycopg.DataError):
        fast.execute("SELECT %s::text[]", [["fine", "not\x00fine"]])


@pytest.mark.cluster
@pytest.mark.parametrize("values", [[True, False], [1.5, 2.5], [["a"], ["b"]], [1, "a"], [[1, 2], [3, 4]]])
def test_other_lists_are_bound_by_psycopg(cursors, values):
    plain, fast = cursors
    try:
        expected = plain.mogrify("SELECT %s", [values])
    except psycopg.DataError:
        with pytest.raises(psycopg.DataError):
            fast.mogrify("SELECT %s", [values])
        return
    assert fast.mogrify("SELECT %s", [values]) == expected


@pytest.mark.cluster
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(values=st.lists(st.one_of(st.none(), st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"))), max_size=8))
def test_any_text_arrives_as_it_was(cursors, values):
    _, fast = cursors
    assert _round_trip(fast, "SELECT %s::text[]", values) == (values,)


@pytest.mark.cluster
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(values=st.lists(st.one_of(st.none(), st.integers(min_value=-(2**63), max_value=2**63 - 1)), max_size=8))
def test_any_int_list_matches_psycopg(cursors, values):
    plain, fast = cursors
    fast.execute("SELECT %s, pg_typeof(%s)::text", [values, values])
    plain.execute("SELECT %s, pg_typeof(%s)::text", [values, values])
    assert fast.fetchone() == plain.fetchone()
