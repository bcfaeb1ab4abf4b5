"""Array parameters bound client-side, cheaply: the literal text of a list of str or int.

The storage layer sends each batch of statements as one query with its parameters merged
client-side (shard_store.py), and most parameters are lists: the ids, amounts and columns
of a whole batch, expanded with unnest(). psycopg's own list dumper is general (nested
lists, any element type, each element through its own dumper and a regular expression),
and it was about a sixth of a service worker's CPU. Lists of plain str or plain int (and
None) are what the hot statements bind, and their array literal is simple to make right:

- text: every element double-quoted, with `"` and `\\` escaped by a backslash (PostgreSQL's
  array input syntax), None as an unquoted NULL; the whole literal is then quoted by
  libpq's PQescapeLiteral, as psycopg quotes any string. A NUL is refused, as psycopg and
  PostgreSQL refuse it in any text. Untyped, like psycopg's literal for a list of str, so
  PostgreSQL takes the type the statement gives it (text[], jsonb[], ...).
- int: the decimal digits, cast to the smallest of int2[], int4[], int8[], numeric[] that
  holds every element, exactly the type psycopg would pick, so that a statement reads the
  same type whichever dumper made the literal.

Any other list (nested, bool, float, subclasses of str or int, mixed types) goes to
psycopg's ListDumper unchanged. FastListDumper is registered on the Session's cursor
only (shard_store.py), and only for client-side binding: it implements quote(), not dump().
"""

from __future__ import annotations

from typing import Any

from psycopg import DataError, pq
from psycopg._encodings import conn_encoding
from psycopg.abc import AdaptContext, DumperKey
from psycopg.adapt import PyFormat
from psycopg.types.array import ListDumper

_NoneType = type(None)
_TEXT_ELEMENT_TYPES = frozenset({str, _NoneType})
_INT_ELEMENT_TYPES = frozenset({int, _NoneType})
NUL_REFUSED = "PostgreSQL text fields cannot contain NUL (0x00) bytes"

# The type psycopg gives a list of int: the smallest that holds its widest element.
_INT2_LIMIT, _INT4_LIMIT, _INT8_LIMIT = 2**15, 2**31, 2**63


def _quoted_element(value: str) -> str:
    if "\x00" in value:
        raise DataError(NUL_REFUSED)
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def text_array(values: list[str | None]) -> str:
    """The array literal's text (before quoting as a SQL string) of a list of str and None."""
    if not values:
        return "{}"
    if None in values:
        if values.count(None) == len(values):
            return "{" + ",".join(["NULL"] * len(values)) + "}"
        return "{" + ",".join("NULL" if value is None else _quoted_element(value) for value in values) + "}"
    # One pass in C: join on NUL (which no element may hold), escape, then turn each NUL into
    # the boundary between two quoted elements.
    body = "\x00".join(values)
    if body.count("\x00") != len(values) - 1:
        raise DataError(NUL_REFUSED)
    if '"' in body or "\\" in body:
        body = body.replace("\\", "\\\\").replace('"', '\\"')
    return '{"' + body.replace("\x00", '","') + '"}'


def _int_type_sql(low: int, high: int) -> str:
    widest = high if low >= 0 else max(high, -low - 1)
    if widest < _INT2_LIMIT:
        return "int2[]"
    if widest < _INT4_LIMIT:
        return "int4[]"
    if widest < _INT8_LIMIT:
        return "int8[]"
    return "numeric[]"


def int_array_type(values: list[int | None]) -> str:
    """The SQL type psycopg casts a list of int to (ListDumper: the widest element decides)."""
    present = [value for value in values if value is not None] if None in values else values
    if not present:
        return ""  # empty, or only NULLs: untyped, as psycopg sends it
    return _int_type_sql(min(present), max(present))


def int_array_literal(values: list[int | None]) -> bytes:
    """The whole SQL literal of a list of int and None, with its cast: digits need no quoting."""
    if values and None not in values:
        # The common case, in C but for the type's choice: no NULL to spell, at least one element.
        digits = ",".join(map(int.__repr__, values))
        return f"'{{{digits}}}'::{_int_type_sql(min(values), max(values))}".encode("ascii")
    text = "{" + ",".join("NULL" if value is None else int.__repr__(value) for value in values) + "}"
    type_sql = int_array_type(values)
    return f"'{text}'::{type_sql}".encode("ascii") if type_sql else f"'{text}'".encode("ascii")


class FastListDumper(ListDumper):
    """psycopg's ListDumper, with a fast path for lists of plain str or plain int (and None)."""

    def __init__(self, cls: type, context: AdaptContext | None = None) -> None:
        super().__init__(cls, context)
        encoding = conn_encoding(self.connection)
        self._encoding = encoding if encoding != "ascii" else "utf-8"  # as psycopg's str dumpers

    def get_key(self, obj: list[Any], format: PyFormat) -> DumperKey:
        types = set(map(type, obj))
        if types <= _TEXT_ELEMENT_TYPES or types <= _INT_ELEMENT_TYPES:
            return self.cls  # this dumper quotes it: no upgrade
        return super().get_key(obj, format)

    def upgrade(self, obj: list[Any], format: PyFormat) -> ListDumper:
        # Not a list this dumper makes: psycopg's own dumper, exactly as psycopg would pick it.
        return ListDumper(self.cls, self._tx).upgrade(obj, format)

    def quote(self, obj: list[Any]) -> bytes:
        if not obj or str in set(map(type, obj)):
            if self.connection is None:
                raise DataError("array literals are quoted by the connection's libpq")
            text = text_array(obj).encode(self._encoding)
            return bytes(pq.Escaping(self.connection.pgconn).escape_literal(text))
        return int_array_literal(obj)

    def dump(self, obj: list[Any]) -> bytes:
        raise TypeError("FastListDumper only quotes literals for client-side binding")
