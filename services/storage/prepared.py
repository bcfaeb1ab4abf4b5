"""The hot statements, prepared once per connection: parsed and planned once, run many times.

PostgreSQL plans a statement every time it arrives as text, and the batches of this
layer are sent as text (one multi-statement round trip, services/storage/shard_store.py).
Planning the TCC statements' chains of CTEs costs about 2 ms of database CPU, several
times what running them costs. So every pooled connection PREPAREs the hot statements
when it opens (`session_setup()`, run by the pool's configure callback) and the batches
send `EXECUTE name(...)` instead: the same multi-statement round trip, no planning.

`prepared(name, sql)` returns the EXECUTE text, a str that binds the same parameters as
`sql` (positional %s, or named %(x)s), so call sites do not change. Plans are generic
(plan_cache_mode): the statements look rows up by key, so one plan fits every call.
"""

from __future__ import annotations

import re

_PLACEHOLDER = re.compile(r"%\((\w+)\)s|%s")


class Prepared(str):
    """The EXECUTE text of a prepared statement; `definition` is its PREPARE."""

    definition: str


_STATEMENTS: dict[str, Prepared] = {}


def prepared(name: str, sql: str) -> Prepared:
    """Register `sql` to be prepared on every connection as `name`; its EXECUTE text."""
    assert name not in _STATEMENTS, f"two statements prepared as {name}"
    names: list[str] = []
    positional = 0

    def numbered(match: re.Match) -> str:
        nonlocal positional
        if match.group(1) is None:
            positional += 1
            return f"${positional}"
        if match.group(1) not in names:
            names.append(match.group(1))
        return f"${names.index(match.group(1)) + 1}"

    body = _PLACEHOLDER.sub(numbered, sql)
    assert not (positional and names), f"{name} mixes positional and named parameters"
    arguments = ", ".join([f"%({key})s" for key in names] or ["%s"] * positional)
    statement = Prepared(f"EXECUTE {name}({arguments})" if arguments else f"EXECUTE {name}")
    statement.definition = f"PREPARE {name} AS {body}"
    _STATEMENTS[name] = statement
    return statement


def statements() -> dict[str, Prepared]:
    return dict(_STATEMENTS)


def session_setup() -> list[str]:
    """What a new connection runs once, statement by statement: generic plans, then every
    registered PREPARE. Not as one batch: a multi-statement batch is one transaction, and
    preparing takes the locks its statement would (a share lock on accounts for one, a write
    lock on it for a later one), held to the end. Right after a shard restart, while `make up`
    applies the schema (DROP TRIGGER waits for an exclusive lock), that upgrade deadlocked."""
    return ["SET plan_cache_mode = force_generic_plan", *(statement.definition for statement in _STATEMENTS.values())]
