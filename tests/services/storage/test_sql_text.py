"""Every SQL statement the storage adapter sends is whole: no name left unformatted.

The statements are built from the domain's enums with f-strings; a plain string where an
f-string was meant would reach PostgreSQL as a syntax error at run time, on the hot path.
"""

import re

import pytest

from services.storage import audit, batch_posting, id_registry, prepared, shard_store, tcc_store

LEFTOVER_PLACEHOLDER = re.compile(r"\{[A-Za-z_][A-Za-z_0-9.()]*\}")


def statements():
    for module in (shard_store, batch_posting, tcc_store, id_registry, audit):
        for name, value in vars(module).items():
            if name.isupper() and isinstance(value, str) and re.search(r"\b(SELECT|INSERT|UPDATE|WITH)\b", value):
                yield f"{module.__name__}.{name}", value
    for name, statement in prepared.statements().items():
        yield f"prepared {name}", statement.definition


@pytest.mark.parametrize("name, sql", list(statements()))
def test_no_placeholder_is_left_in_a_statement(name, sql):
    assert not LEFTOVER_PLACEHOLDER.search(sql), f"{name} still holds {LEFTOVER_PLACEHOLDER.search(sql).group()}"


def test_the_statements_were_found():
    assert len(list(statements())) > 20
