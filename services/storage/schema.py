"""Apply the shard schema and its grants (deploy time, not request time)."""

import importlib.resources
import time

import psycopg
import psycopg.errors
from psycopg import sql

from services.ledger.coordination import FINAL_STATES
from services.ledger.transfers import TransferStatus
from services.storage.roles import DatabaseRole

# `make up` applies the schema to shards that may be serving (a second `up`, a restarted
# shard). Its DDL waits for exclusive locks behind the service's transactions, and PostgreSQL
# may pick the apply as a deadlock's victim; the schema is idempotent, so it is applied again.
APPLY_ATTEMPTS_MAX = 5
APPLY_RETRY_DELAY_SECONDS = 0.2


def schema_sql() -> str:
    return importlib.resources.files("services.storage").joinpath("schema.sql").read_text()


def grants_sql() -> sql.Composed:
    """grants.sql with the role names (services/storage/roles.py) and state numbers filled in."""
    template = importlib.resources.files("services.storage").joinpath("grants.sql").read_text()
    return sql.SQL(template).format(
        service=sql.Identifier(DatabaseRole.SERVICE),
        auditor=sql.Identifier(DatabaseRole.AUDITOR),
        transfer_pending=sql.Literal(int(TransferStatus.PENDING)),
        coordinator_final_states=sql.SQL(", ").join(sql.Literal(int(state)) for state in sorted(FINAL_STATES)),
    )


def apply_schema(dsn: str) -> None:
    """Tables, triggers, then grants and policies, in one transaction. Run as the owner
    (deploy/postgres.py's owner DSN) or a superuser; the roles must exist."""
    with psycopg.connect(dsn, autocommit=True) as connection:
        # One shard may be migrated by two `make up` runs at once; serialise them.
        connection.execute("SELECT pg_advisory_lock(7100)")
        try:
            # One multi-statement query: PostgreSQL runs it as one transaction, so no
            # session ever sees the tables without their grants or policies.
            statements = sql.Composed([sql.SQL(schema_sql()), sql.SQL("\n"), grants_sql()])
            for attempt in range(1, APPLY_ATTEMPTS_MAX + 1):
                try:
                    connection.execute(statements)
                    return
                except psycopg.errors.DeadlockDetected:
                    if attempt == APPLY_ATTEMPTS_MAX:
                        raise
                    time.sleep(APPLY_RETRY_DELAY_SECONDS * attempt)
        finally:
            connection.execute("SELECT pg_advisory_unlock(7100)")
