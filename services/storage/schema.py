"""Apply the shard schema (deploy time, not request time)."""

import importlib.resources

import psycopg


def schema_sql() -> str:
    return importlib.resources.files("services.storage").joinpath("schema.sql").read_text()


def apply_schema(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as connection:
        # One shard may be migrated by two `make up` runs at once; serialise them.
        connection.execute("SELECT pg_advisory_lock(7100)")
        connection.execute(schema_sql())
        connection.execute("SELECT pg_advisory_unlock(7100)")
