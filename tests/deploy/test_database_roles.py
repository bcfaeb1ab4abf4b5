"""The database roles, their passwords and their rights (deploy/postgres.py,
services/storage/grants.sql), on one PostgreSQL of this module's own.

deploy's own code starts it (port COREBANK_TEST_ROLES_PORT, default 17900) in a folder
of its own, so the module may also turn it into a shard of the kind made before roles
had passwords and watch `start` bring it up to date. The live cluster's roles, with the
service's real rows, are tested in tests/services/storage/test_schema_guards.py.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import stat
from collections.abc import Iterator

import psycopg
import pytest
from psycopg import conninfo

from deploy import processes
from deploy.postgres import DATABASE_NAME, HOST, PostgresShard, dsn, passfile_path
from services import bootstrap
from services.ledger.coordination import CoordinatorState
from services.ledger.transfers import TransferStatus
from services.storage.roles import DatabaseRole
from tests.fixtures.cluster import bare_shard

ROLES_PORT = int(os.environ.get("COREBANK_TEST_ROLES_PORT") or 17900)
# The audit trail's table (services/audit_log) too, when the schema has it: insert-only, like the registry.
TABLES = (
    "accounts", "transfers", "id_registry", "tcc_transfers", "tcc_barriers",
    # Clearing (schema.sql's clearing section).
    "clearing_positions", "clearing_window_totals", "clearing_shard_window", "clearing_position_resets",
    "participants", "participant_currencies", "settlement_windows", "settlements", "settlement_entries",
)
OPTIONAL_TABLES = ("audit_log",)
SERVICE_UPDATABLE_COLUMNS = {
    "accounts": {"status", "debits_posted_minor", "credits_posted_minor", "debits_pending_minor", "credits_pending_minor", "updated_at"},
    "transfers": {"status", "finalized_at", "window_id"},
    "tcc_transfers": {
        "state", "reason", "lease_owner", "lease_epoch", "lease_expires_at", "attempts", "fault", "faulted_at", "updated_at",
        "finalized_at",
    },
    "clearing_positions": {"position_minor", "reserved_minor", "allotment_minor", "updated_at"},
    "clearing_window_totals": {"debits_minor", "credits_minor", "transfers"},
    "clearing_shard_window": {"window_id", "switched_at"},
    "participant_currencies": {"net_debit_cap_minor", "threshold_percent", "updated_at"},
    "settlement_windows": {"state", "closed_at", "reason", "close_request_id", "settlement_id"},
    "settlements": {"state", "settled_at"},
    "settlement_entries": {"settled_at"},
}
TABLE_PRIVILEGES = """
    SELECT table_name, privilege_type FROM information_schema.role_table_grants
    WHERE grantee = %s AND table_schema = 'public'"""
COLUMN_PRIVILEGES = """
    SELECT table_name, column_name FROM information_schema.column_privileges
    WHERE grantee = %s AND table_schema = 'public' AND privilege_type = 'UPDATE'"""
OWNERS = """
    SELECT DISTINCT pg_get_userbyid(relowner) FROM pg_class
    WHERE relnamespace = 'public'::regnamespace AND relkind IN ('r', 'S', 'i')"""
OLD_ACCESS_RULES = "local all all trust\nhost all all 127.0.0.1/32 trust\n"


@pytest.fixture(scope="module")
def shard() -> Iterator[PostgresShard]:
    if not processes.port_is_free(ROLES_PORT):
        pytest.fail(f"port {ROLES_PORT} is taken; choose another with COREBANK_TEST_ROLES_PORT")
    with bare_shard("corebank-roles-", "shard-0", ROLES_PORT) as started:
        yield started


def superuser(shard: PostgresShard, dbname: str = DATABASE_NAME) -> psycopg.Connection:
    return psycopg.connect(shard.superuser_dsn(dbname), autocommit=True)


def password_of(shard: PostgresShard, role: DatabaseRole) -> str:
    return passfile_path(shard.secrets_dir, role).read_text().strip().rsplit(":", 1)[1]


def refused_over_tcp(dsn_text: str) -> str:
    with pytest.raises(psycopg.OperationalError) as refused:
        psycopg.connect(dsn_text, connect_timeout=5).close()
    return str(refused.value)


# Secrets.


def test_the_passwords_live_in_files_only_their_owner_reads(shard):
    assert_secrets_are_private(shard)


def assert_secrets_are_private(shard: PostgresShard) -> None:
    folder = shard.secrets_dir
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700 and folder.stat().st_uid == os.geteuid()
    passwords = set()
    for role in DatabaseRole:
        path = passfile_path(folder, role)
        assert stat.S_IMODE(path.stat().st_mode) == 0o600 and path.stat().st_uid == os.geteuid()
        host, port, database, user, password = path.read_text().strip().split(":")
        assert (host, port, database, user) == (HOST, "*", DATABASE_NAME, role)
        assert len(password) >= 40
        passwords.add(password)
        # The DSN names the passfile, never the password.
        fields = conninfo.conninfo_to_dict(shard.role_dsn(role))
        assert fields["passfile"] == str(path) and "password" not in fields and password not in shard.role_dsn(role)
    assert len(passwords) == len(DatabaseRole)
    assert stat.S_IMODE(shard.shard_dir.stat().st_mode) == 0o700  # the unix socket's folder
    assert not any(password in shard.log_path.read_text() for password in passwords)


def test_a_second_start_keeps_the_passwords(shard):
    before = {role: password_of(shard, role) for role in DatabaseRole}
    shard.start()
    assert {role: password_of(shard, role) for role in DatabaseRole} == before
    for role in DatabaseRole:
        with psycopg.connect(shard.role_dsn(role)) as connection:
            assert connection.execute("SELECT current_user").fetchone() == (role,)


# Authentication.


def test_tcp_needs_each_roles_own_password(shard):
    for role in DatabaseRole:
        assert "no password supplied" in refused_over_tcp(dsn(shard.port, user=role))
        assert "password authentication failed" in refused_over_tcp(dsn(shard.port, user=role) + " password=guessed")
    # One role's passfile does not let anyone in as another role.
    other = conninfo.make_conninfo(shard.dsn, user=DatabaseRole.OWNER)
    assert "no password supplied" in refused_over_tcp(other)
    stolen = conninfo.make_conninfo(dsn(shard.port, user=DatabaseRole.OWNER), password=password_of(shard, DatabaseRole.SERVICE))
    assert "password authentication failed" in refused_over_tcp(stolen)


def test_the_superuser_never_gets_in_over_tcp_only_through_the_socket(shard):
    assert "rejects connection" in refused_over_tcp(dsn(shard.port, user="postgres", dbname="postgres"))
    with superuser(shard, "postgres") as connection:
        assert connection.execute("SELECT rolsuper FROM pg_roles WHERE rolname = current_user").fetchone() == (True,)


# Rights.


def test_no_role_has_more_than_its_purpose_needs(shard):
    assert_roles_as_designed(shard)


def assert_roles_as_designed(shard: PostgresShard) -> None:
    with superuser(shard) as connection:
        attributes = connection.execute(
            "SELECT rolname, rolsuper, rolcreatedb, rolcreaterole, rolbypassrls, rolreplication, rolcanlogin FROM pg_roles"
            " WHERE rolname = ANY(%s)",
            [[str(role) for role in DatabaseRole]],
        ).fetchall()
        assert sorted(attributes) == sorted((str(role), False, False, False, False, False, True) for role in DatabaseRole)
        database_owner = connection.execute(
            "SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = current_database()"
        ).fetchone()[0]
        assert database_owner == DatabaseRole.OWNER
        assert {row[0] for row in connection.execute(OWNERS)} == {DatabaseRole.OWNER}
        tables = TABLES + tuple(
            table for table in OPTIONAL_TABLES if connection.execute("SELECT to_regclass(%s) IS NOT NULL", [table]).fetchone()[0]
        )
        # What the service role may do, exactly (services/storage/grants.sql).
        expected = {(table, privilege) for table in tables for privilege in ("SELECT", "INSERT")}
        assert set(connection.execute(TABLE_PRIVILEGES, [DatabaseRole.SERVICE]).fetchall()) == expected
        updatable: dict[str, set[str]] = {}
        for table, column in connection.execute(COLUMN_PRIVILEGES, [DatabaseRole.SERVICE]):
            updatable.setdefault(table, set()).add(column)
        assert updatable == SERVICE_UPDATABLE_COLUMNS
        assert set(connection.execute(TABLE_PRIVILEGES, [DatabaseRole.AUDITOR]).fetchall()) == {(t, "SELECT") for t in tables}
        assert connection.execute(COLUMN_PRIVILEGES, [DatabaseRole.AUDITOR]).fetchall() == []
        for role in (DatabaseRole.SERVICE, DatabaseRole.AUDITOR):
            assert connection.execute(
                "SELECT has_schema_privilege(%s, 'public', 'CREATE'), has_database_privilege(%s, current_database(), 'CREATE'),"
                " has_database_privilege(%s, current_database(), 'TEMPORARY')",
                [role, role, role],
            ).fetchone() == (False, False, False)


def test_the_service_moves_pending_rows_and_never_final_ones(shard):
    with psycopg.connect(shard.dsn, autocommit=True) as connection:
        connection.execute(
            "INSERT INTO accounts (account_id, request_id, owner_id, currency, kind, tier, status)"
            " VALUES ('acc_roles_a', 'r-a', 'o', 'USD', 1, 1, 1), ('acc_roles_b', 'r-b', 'o', 'USD', 1, 1, 1)"
        )
        connection.execute(
            "INSERT INTO transfers (transfer_id, debit_account_id, credit_account_id, amount_minor, currency, status,"
            " branch, clearing_account_id) VALUES ('roles-branch', 'acc_roles_a', 'acc_roles_b', 5, 'USD', %s, 1, 'clr_x')",
            [int(TransferStatus.PENDING)],
        )
        connection.execute(
            "INSERT INTO tcc_transfers (transfer_id, debit_account_id, credit_account_id, amount_minor, currency, credit_shard,"
            " state, lease_owner, lease_expires_at, pending_expires_at)"
            " VALUES ('roles-branch', 'acc_roles_a', 'acc_roles_b', 5, 'USD', 'shard-1', %s, 'test', now(), now())",
            [int(CoordinatorState.TRYING)],
        )
        settle = "UPDATE transfers SET status = %s, finalized_at = now() WHERE transfer_id = 'roles-branch'"
        decide = "UPDATE tcc_transfers SET state = %s, reason = '', finalized_at = now() WHERE transfer_id = 'roles-branch'"
        # The protocol's own moves: a pending branch settles, a record in doubt is decided.
        assert connection.execute(settle, [int(TransferStatus.POSTED)]).rowcount == 1
        assert connection.execute(decide, [int(CoordinatorState.POSTED)]).rowcount == 1
        # Final now: the same statements find nothing to change.
        assert connection.execute(settle, [int(TransferStatus.VOIDED)]).rowcount == 0
        assert connection.execute(decide, [int(CoordinatorState.VOIDED)]).rowcount == 0
        assert connection.execute("SELECT status FROM transfers WHERE transfer_id = 'roles-branch'").fetchone() == (
            TransferStatus.POSTED,
        )
        assert connection.execute("SELECT state FROM tcc_transfers WHERE transfer_id = 'roles-branch'").fetchone() == (
            CoordinatorState.POSTED,
        )
        for statement in (
            "DELETE FROM transfers", "TRUNCATE transfers", "ALTER TABLE accounts ADD COLUMN x int", "DROP TABLE tcc_barriers",
            "CREATE TABLE roles_probe (x int)", "UPDATE transfers SET amount_minor = 1",
        ):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                connection.execute(statement)


def test_the_service_refuses_to_serve_through_a_mightier_role(shard):
    async def configure(dsn_text: str) -> None:
        connection = await psycopg.AsyncConnection.connect(dsn_text, autocommit=True)
        try:
            await bootstrap.prepare_session(connection)
        finally:
            await connection.close()

    asyncio.run(configure(shard.dsn))
    with pytest.raises(bootstrap.OverprivilegedRole):
        asyncio.run(configure(shard.owner_dsn))


# A shard made before roles had passwords: one role owned everything, every client was trusted.


def test_start_brings_an_old_shard_up_to_the_roles(shard):
    with superuser(shard) as connection:
        connection.execute(f"REASSIGN OWNED BY {DatabaseRole.OWNER} TO {DatabaseRole.SERVICE}")
        for role in (DatabaseRole.OWNER, DatabaseRole.AUDITOR):
            connection.execute(f"DROP OWNED BY {role}")
        connection.execute(f"ALTER ROLE {DatabaseRole.SERVICE} PASSWORD NULL")
    with superuser(shard, "postgres") as connection:
        for role in (DatabaseRole.OWNER, DatabaseRole.AUDITOR):
            connection.execute(f"DROP ROLE {role}")
    (shard.data_dir / "pg_hba.conf").write_text(OLD_ACCESS_RULES)
    with superuser(shard, "postgres") as connection:
        connection.execute("SELECT pg_reload_conf()")
    shutil.rmtree(shard.secrets_dir)
    shard.shard_dir.chmod(0o755)
    old_dsn = dsn(shard.port)
    with psycopg.connect(old_dsn) as connection:  # trusted, as before
        rows_before = connection.execute("SELECT (SELECT count(*) FROM accounts), (SELECT count(*) FROM transfers)").fetchone()

    shard.start()

    assert "no password supplied" in refused_over_tcp(old_dsn)
    assert stat.S_IMODE(shard.shard_dir.stat().st_mode) == 0o700
    assert_roles_as_designed(shard)
    assert_secrets_are_private(shard)
    with psycopg.connect(shard.dsn) as connection:
        rows_after = connection.execute("SELECT (SELECT count(*) FROM accounts), (SELECT count(*) FROM transfers)").fetchone()
    assert rows_after == rows_before
