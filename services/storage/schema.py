"""Apply the shard schema (deploy time, not request time)."""

import importlib.resources
import time

import psycopg
import psycopg.errors

# `make up` applies the schema to shards that may be serving (a second `up`, a restarted
# shard). Its DDL waits for exclusive locks behind the service's transactions, and PostgreSQL
# may pick the apply as a deadlock's victim; the schema is idempotent, so it is applied again.
APPLY_ATTEMPTS_MAX = 5
APPLY_RETRY_DELAY_SECONDS = 0.2


def schema_sql() -> str:
    return importlib.resources.files("services.storage").joinpath("schema.sql").read_text()


def apply_schema(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as connection:
        # One shard may be migrated by two `make up` runs at once; serialise them.
        connection.execute("SELECT pg_advisory_lock(7100)")
        try:
            for attempt in range(1, APPLY_ATTEMPTS_MAX + 1):
                try:
                    connection.execute(schema_sql())
                    return
                except psycopg.errors.DeadlockDetected:
                    if attempt == APPLY_ATTEMPTS_MAX:
                        raise
                    time.sleep(APPLY_RETRY_DELAY_SECONDS * attempt)
        finally:
            connection.execute("SELECT pg_advisory_unlock(7100)")
