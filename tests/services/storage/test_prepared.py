"""Prepared statements (services/storage/prepared.py) against a real shard: every pooled
connection prepares them, and a connection that lost them (DEALLOCATE, or a schema change that
invalidates a plan's result type) answers one transient error, is replaced, and the next call works."""

import asyncio

import pytest

from services import bootstrap
from services.ledger import errors
from services.storage import prepared
from sharding.shard_map import Shard

TIMEOUT_SECONDS = 5.0


def test_every_statement_has_a_placeholder_free_definition_and_a_unique_name():
    statements = prepared.statements()
    assert len(statements) >= 20
    for name, statement in statements.items():
        assert statement.startswith(f"EXECUTE {name}")
        assert statement.definition.startswith(f"PREPARE {name} AS ")
        assert "%s" not in statement.definition and "%(" not in statement.definition


def test_a_connection_that_lost_its_statements_is_replaced_after_one_transient_error(cluster):
    shard = cluster["shards"][0]

    async def run() -> tuple[object, object, object]:
        store = await bootstrap.open_shard_store(Shard(shard["name"], shard["dsn"]))
        try:
            await store.pool.wait()
            first = await store.get_account("acc_missing_before", TIMEOUT_SECONDS)
            # Every pooled connection forgets its statements, as after a server-side DEALLOCATE.
            for _ in range(store.pool.get_stats()["pool_size"]):
                async with store.pool.connection() as connection:
                    await connection.execute("DEALLOCATE ALL")
            with pytest.raises(errors.ShardUnavailable) as raised:
                await store.get_account("acc_missing_during", TIMEOUT_SECONDS)
            # The pool replaced the connection that failed, or hands out another stale one: each
            # failure takes one stale connection out, and then the statements are prepared again.
            for _ in range(store.pool.get_stats()["pool_size"] + 1):
                try:
                    return first, raised.value, await store.get_account("acc_missing_after", TIMEOUT_SECONDS)
                except errors.ShardUnavailable:
                    continue
            raise AssertionError("no connection prepared its statements again")
        finally:
            await bootstrap.close_shard_store(store)

    first, error, after = asyncio.run(run())
    assert first is None and after is None  # the accounts do not exist: both calls answered
    assert error.transient
