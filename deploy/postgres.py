"""One PostgreSQL cluster per shard: initdb, start, stop, status, roles and database setup.

PostgreSQL refuses to run as root, so when we are root every PostgreSQL
command runs as the `postgres` user and the shard's folder belongs to it.

Who connects, and how (services/storage/roles.py names the roles, grants.sql their rights):
- over TCP, on loopback only: the owner (schema changes), the service (the gRPC workers
  and coordinators) and the auditor, each with its own SCRAM password. The passwords are
  made with `secrets` at the first `up` and kept in the state folder's secrets/ (0700),
  one libpq passfile per role (0600); the DSNs name the passfile (`passfile=`), never a
  password, so the DSNs in etcd, cluster.json and logs hold no secret.
- the superuser: never over TCP; only through the unix socket, which lives in the shard's
  folder (0700, the server's user's), so only that user and root reach it. deploy's own
  setup (roles, passwords, the database) and its health check connect that way.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import secrets
import shutil
import signal
import subprocess
import threading
from collections.abc import Callable, Sequence
from typing import Protocol

import psycopg
from psycopg import conninfo, sql

from deploy import processes
from services.storage.roles import DatabaseRole

POSTGRES_USER = "postgres"
DATABASE_NAME = "corebank"
HOST = "127.0.0.1"
MAX_CONNECTIONS = 200
SHARED_BUFFERS = "256MB"
START_TIMEOUT_SECONDS = 60
STOP_TIMEOUT_SECONDS = 60
CONNECT_TIMEOUT_SECONDS = 2
# The kernel limits a unix socket path to 108 bytes (sun_path), NUL included.
SOCKET_PATH_CHARS_MAX = 100
PG_MAJOR_VERSION = 15
DEFAULT_BIN_DIR = pathlib.Path(f"/usr/lib/postgresql/{PG_MAJOR_VERSION}/bin")

SETTINGS_MARKER = "# corebank settings, written by deploy/postgres.py"

# The shard's folder holds the unix socket: nobody but the server's user may enter it.
SHARD_DIR_MODE = 0o700
# Where the roles' passfiles live, under the state folder; readable by their owner only.
SECRETS_DIR_NAME = "secrets"
SECRETS_DIR_MODE = 0o700
SECRET_FILE_MODE = 0o600
# secrets.token_urlsafe(32): 256 random bits as 43 characters of [A-Za-z0-9_-], none of
# which a passfile line must escape.
PASSWORD_BYTES = 32
PASSWORD_ALGORITHM = b"scram-sha-256"
# What pg_hba.conf allows (see the module's docstring). Written on every start, so that a
# shard made before roles had passwords (everything trusted) is brought up to it.
ACCESS_RULES = f"""# corebank: written by deploy/postgres.py on every start; edits are lost.
# The unix socket's folder (the shard's folder) is 0700 and belongs to the server's user:
# only that user and root reach the socket, for deploy's own setup as the superuser.
local   all   all                       trust
# TCP, on loopback only (listen_addresses): never the superuser; every other role with
# its SCRAM password (deploy/postgres.py's passfiles).
host    all   {POSTGRES_USER:<8}   {HOST}/32   reject
host    all   {"all":<8}   {HOST}/32   scram-sha-256
"""

# The shards of one cluster start side by side (deploy/cluster.py), and share the passwords.
_passwords_lock = threading.Lock()


def bin_dir() -> pathlib.Path:
    """Where initdb and pg_ctl live: $COREBANK_PG_BIN_DIR, Debian's path, pg_config, or PATH."""
    override = os.environ.get("COREBANK_PG_BIN_DIR")
    if override:
        return pathlib.Path(override)
    if (DEFAULT_BIN_DIR / "pg_ctl").exists():
        return DEFAULT_BIN_DIR
    pg_config = shutil.which("pg_config")
    if pg_config:
        found = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, check=False)
        candidate = pathlib.Path(found.stdout.strip())
        if found.returncode == 0 and (candidate / "pg_ctl").exists():
            return candidate
    pg_ctl = shutil.which("pg_ctl")
    if pg_ctl:
        return pathlib.Path(pg_ctl).parent
    raise FileNotFoundError(
        f"PostgreSQL {PG_MAJOR_VERSION} binaries not found in {DEFAULT_BIN_DIR}, via pg_config or on PATH; "
        f"install them with `apt-get install postgresql-{PG_MAJOR_VERSION}` or set COREBANK_PG_BIN_DIR"
    )


def running_as_root() -> bool:
    return os.geteuid() == 0


def as_postgres_user(argv: list[str]) -> list[str]:
    return ["runuser", "-u", POSTGRES_USER, "--", *argv] if running_as_root() else argv


def give_to_postgres_user(path: pathlib.Path) -> None:
    if running_as_root():
        shutil.chown(path, user=POSTGRES_USER, group=POSTGRES_USER)


def check_traversable(path: pathlib.Path) -> None:
    """The postgres user must be able to reach the shard folder through every parent."""
    if not running_as_root():
        return
    for parent in path.resolve().parents:
        if not os.stat(parent).st_mode & 0o001:
            raise PermissionError(
                f"{parent} is not traversable by the {POSTGRES_USER} user (needs o+x); "
                "choose a state dir elsewhere (COREBANK_STATE_DIR) or chmod o+x it"
            )


class NamedDsn(Protocol):
    """A shard of the shard map (sharding.shard_map.Shard), as far as deploy looks at it."""

    @property
    def name(self) -> str: ...
    @property
    def dsn(self) -> str: ...


def dsn(port: int, user: str = DatabaseRole.SERVICE, dbname: str = DATABASE_NAME, passfile: pathlib.Path | None = None) -> str:
    """A TCP DSN on loopback; with `passfile`, libpq reads the password from there."""
    fields: dict[str, object] = {"host": HOST, "port": port, "dbname": dbname, "user": str(user)}
    if passfile is not None:
        fields["passfile"] = str(passfile)
    return conninfo.make_conninfo("", **fields)


def superuser_dsn(shard_dir: pathlib.Path, port: int, dbname: str = "postgres") -> str:
    """The superuser, through the unix socket in the shard's folder (no password, no TCP)."""
    return conninfo.make_conninfo("", host=str(shard_dir), port=port, dbname=dbname, user=POSTGRES_USER)


def only_passfiles_added(stored: Sequence[NamedDsn], wanted: Sequence[NamedDsn]) -> bool:
    """Whether the `wanted` shards are the `stored` ones (same names, same order) whose DSNs
    gained a passfile and nothing else: DSNs stored before the roles had passwords."""
    if [shard.name for shard in stored] != [shard.name for shard in wanted]:
        return False
    for old, new in zip(stored, wanted):
        old_fields, new_fields = conninfo.conninfo_to_dict(old.dsn), conninfo.conninfo_to_dict(new.dsn)
        if "passfile" in old_fields or "passfile" not in new_fields:
            return False
        new_fields.pop("passfile")
        if old_fields != new_fields:
            return False
    return True


# Secrets: one passfile per role, made once.


def secrets_dir(state_dir: pathlib.Path) -> pathlib.Path:
    return state_dir / SECRETS_DIR_NAME


def passfile_path(secrets_folder: pathlib.Path, role: DatabaseRole) -> pathlib.Path:
    return secrets_folder / f"{role.name.lower()}.pgpass"


def _keep_private(path: pathlib.Path, mode: int) -> None:
    """Ours alone: refuse a path someone else owns, and take group and world rights away."""
    if os.stat(path, follow_symlinks=False).st_uid != os.geteuid():
        raise PermissionError(f"{path} belongs to another user; refusing to keep secrets there")
    os.chmod(path, mode, follow_symlinks=False)


def _passfile_line(role: DatabaseRole, password: str) -> str:
    # hostname:port:database:username:password; any port, so that one file serves every
    # shard (and a test's proxy in front of one).
    return f"{HOST}:*:{DATABASE_NAME}:{role}:{password}\n"


def _password_in(path: pathlib.Path, role: DatabaseRole) -> str:
    fields = path.read_text().strip().split(":", 4)
    if len(fields) != 5 or fields[3] != role or not fields[4]:
        raise ValueError(f"{path} is not a passfile for {role}; remove it and run `make up` again")
    return fields[4]


def ensure_password(secrets_folder: pathlib.Path, role: DatabaseRole) -> str:
    """The role's password, from its passfile; made with `secrets` the first time."""
    with _passwords_lock:
        secrets_folder.mkdir(mode=SECRETS_DIR_MODE, parents=True, exist_ok=True)
        _keep_private(secrets_folder, SECRETS_DIR_MODE)
        path = passfile_path(secrets_folder, role)
        if not path.exists():
            from services.auth.pki import write_private  # imported here: see ensure_database

            write_private(path, _passfile_line(role, secrets.token_urlsafe(PASSWORD_BYTES)).encode())
        _keep_private(path, SECRET_FILE_MODE)
        return _password_in(path, role)


def ensure_database(secrets_folder: pathlib.Path, superuser_dsn_for: Callable[[str], str], owner_dsn: str) -> None:
    """Roles with their passwords and rights, the database, the schema; idempotent. `superuser_dsn_for(dbname)`
    reaches the server as the superuser (a single shard, or an HA shard's primary: deploy/patroni.py)."""
    # Imported here: deploy must stay importable (status, down) even when
    # services/ is broken mid-edit.
    from services.storage.schema import apply_schema

    passwords = {role: ensure_password(secrets_folder, role) for role in DatabaseRole}
    with psycopg.connect(superuser_dsn_for("postgres"), autocommit=True, connect_timeout=CONNECT_TIMEOUT_SECONDS) as connection:
        for role, password in passwords.items():
            if connection.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", [role]).fetchone() is None:
                connection.execute(sql.SQL("CREATE ROLE {}").format(sql.Identifier(role)))
            # Hashed here (SCRAM), so the password itself never reaches the server nor its log.
            verifier = connection.pgconn.encrypt_password(password.encode(), role.encode(), PASSWORD_ALGORITHM).decode()
            connection.execute(
                sql.SQL(
                    "ALTER ROLE {} WITH LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS PASSWORD {}"
                ).format(sql.Identifier(role), sql.Literal(verifier))
            )
        # A second line under the auditor's SELECT-only grants.
        connection.execute(
            sql.SQL("ALTER ROLE {} SET default_transaction_read_only = on").format(sql.Identifier(DatabaseRole.AUDITOR))
        )
        if connection.execute("SELECT 1 FROM pg_database WHERE datname = %s", [DATABASE_NAME]).fetchone() is None:
            connection.execute(
                sql.SQL("CREATE DATABASE {} OWNER {}").format(sql.Identifier(DATABASE_NAME), sql.Identifier(DatabaseRole.OWNER))
            )
    with psycopg.connect(superuser_dsn_for(DATABASE_NAME), autocommit=True, connect_timeout=CONNECT_TIMEOUT_SECONDS) as connection:
        # Whatever the service or auditor owns goes to the owner: in a cluster made when one
        # role owned everything, the database and every table (a no-op ever after).
        connection.execute(
            sql.SQL("REASSIGN OWNED BY {}, {} TO {}").format(
                sql.Identifier(DatabaseRole.SERVICE), sql.Identifier(DatabaseRole.AUDITOR), sql.Identifier(DatabaseRole.OWNER)
            )
        )
    apply_schema(owner_dsn)


class RoleDsns:
    """A shard's DSN per database role, from its own `role_dsn` (a single instance's, or one
    multi-host DSN over an HA shard's members)."""

    def role_dsn(self, role: DatabaseRole) -> str:
        raise NotImplementedError

    @property
    def dsn(self) -> str:
        """The service role's DSN: what the services use (the shard map, cluster.json's "dsn")."""
        return self.role_dsn(DatabaseRole.SERVICE)

    @property
    def owner_dsn(self) -> str:
        return self.role_dsn(DatabaseRole.OWNER)

    @property
    def auditor_dsn(self) -> str:
        return self.role_dsn(DatabaseRole.AUDITOR)


@dataclasses.dataclass(frozen=True)
class PostgresShard(RoleDsns):
    name: str
    shard_dir: pathlib.Path  # absolute; holds data/, the log and the unix socket
    port: int
    secrets_dir: pathlib.Path  # absolute; the roles' passfiles (secrets_dir(state folder))

    @property
    def data_dir(self) -> pathlib.Path:
        return self.shard_dir / "data"

    @property
    def log_path(self) -> pathlib.Path:
        return self.shard_dir / "postgres.log"

    def role_dsn(self, role: DatabaseRole) -> str:
        return dsn(self.port, user=role, passfile=passfile_path(self.secrets_dir, role))

    def superuser_dsn(self, dbname: str = "postgres") -> str:
        return superuser_dsn(self.shard_dir, self.port, dbname)

    @property
    def endpoint(self) -> str:
        return f"{HOST}:{self.port}"

    def _run(self, tool: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        argv = as_postgres_user([str(bin_dir() / tool), *args])
        # A new session, so that Ctrl-C on `make up` does not reach the postmaster pg_ctl forks.
        completed = subprocess.run(
            argv, capture_output=True, text=True, check=False, start_new_session=True, stdin=subprocess.DEVNULL
        )
        if check and completed.returncode != 0:
            raise RuntimeError(
                f"{self.name}: `{' '.join(argv)}` failed ({completed.returncode}):\n{completed.stdout}{completed.stderr}"
            )
        return completed

    # Setup.

    def is_initialized(self) -> bool:
        return (self.data_dir / "PG_VERSION").exists()

    def init(self) -> None:
        """initdb, then our settings and pg_hba; a no-op when already done."""
        if self.is_initialized():
            return
        socket_path = self.shard_dir / f".s.PGSQL.{self.port}"
        if len(str(socket_path)) > SOCKET_PATH_CHARS_MAX:
            raise ValueError(
                f"{self.name}: socket path {socket_path} is longer than {SOCKET_PATH_CHARS_MAX} chars; "
                "use a shorter state dir (COREBANK_STATE_DIR)"
            )
        self.shard_dir.mkdir(parents=True, exist_ok=True)
        self.shard_dir.chmod(SHARD_DIR_MODE)
        check_traversable(self.shard_dir)
        give_to_postgres_user(self.shard_dir)
        # A half-made data dir from an interrupted initdb would make initdb refuse.
        shutil.rmtree(self.data_dir, ignore_errors=True)
        self._run(
            "initdb",
            "-D", str(self.data_dir),
            "-U", POSTGRES_USER,
            # Replaced at once by ACCESS_RULES; until then, nobody gets in over TCP.
            "--auth-local=trust",
            "--auth-host=reject",
            "--encoding=UTF8",
            "--locale=C.UTF-8",
        )  # fmt: skip
        config_path = self.data_dir / "postgresql.conf"
        settings = "\n".join(
            [
                "",
                SETTINGS_MARKER,
                f"port = {self.port}",
                f"listen_addresses = '{HOST}'",
                f"unix_socket_directories = '{self.shard_dir}'",
                f"max_connections = {MAX_CONNECTIONS}",
                f"shared_buffers = {SHARED_BUFFERS}",
                # fsync and synchronous_commit stay at their defaults (on): the
                # benchmark compares against pgbench on these same settings.
                "",
            ]
        )
        with open(config_path, "a") as config_file:
            config_file.write(settings)
        self._write_access_rules()

    def _write_access_rules(self) -> bool:
        """pg_hba.conf and the shard folder's mode as they must be; whether pg_hba.conf changed."""
        self.shard_dir.chmod(SHARD_DIR_MODE)
        path = self.data_dir / "pg_hba.conf"
        if path.exists() and path.read_text() == ACCESS_RULES:
            return False
        scratch = path.with_name(path.name + ".tmp")
        scratch.write_text(ACCESS_RULES)
        scratch.chmod(SECRET_FILE_MODE)
        give_to_postgres_user(scratch)
        scratch.replace(path)
        return True

    # Lifecycle.

    def pid(self) -> int | None:
        """The postmaster's pid when it runs on our data dir, else None."""
        pid = processes.read_pid(self.data_dir / "postmaster.pid")
        return pid if processes.is_ours(pid, [str(self.data_dir)]) else None

    def is_running(self) -> bool:
        return self.pid() is not None

    def is_healthy(self) -> bool:
        try:
            with psycopg.connect(self.superuser_dsn(), connect_timeout=CONNECT_TIMEOUT_SECONDS) as connection:
                connection.execute("SELECT 1")
            return True
        except psycopg.Error:
            return False

    def start(self) -> None:
        """Start when not running, then make sure roles, passwords, database and schema exist.

        A shard that is running already reads changed access rules only after the roles have
        their passwords: a shard made before roles had passwords keeps serving meanwhile.
        """
        rules_changed = self._write_access_rules()
        if not self.is_running():
            self._start_postmaster()
            rules_changed = False
        self.ensure_database()
        if rules_changed:
            with psycopg.connect(self.superuser_dsn(), autocommit=True, connect_timeout=CONNECT_TIMEOUT_SECONDS) as connection:
                connection.execute("SELECT pg_reload_conf()")

    def _start_postmaster(self) -> None:
        # After a kill -9 of the postmaster its children need a moment to notice and
        # release the shared memory; until then a new postmaster refuses to start.
        # Retry for the same bounded time that a start may take.
        last_error: list[str] = []

        def started() -> bool:
            completed = self._run(
                "pg_ctl", "-D", str(self.data_dir), "-l", str(self.log_path),
                "-w", "-t", str(START_TIMEOUT_SECONDS), "start", check=False,
            )  # fmt: skip
            if completed.returncode == 0:
                return True
            last_error[:] = [completed.stdout + completed.stderr + processes.log_tail(self.log_path)]
            return False

        try:
            processes.wait_until(started, START_TIMEOUT_SECONDS, f"start {self.name}")
        except TimeoutError as error:
            raise RuntimeError(f"{error}\n{''.join(last_error)}") from None

    def ensure_database(self) -> None:
        """Roles with their passwords and rights, the database, the schema; idempotent."""
        ensure_database(self.secrets_dir, self.superuser_dsn, self.owner_dsn)

    def stop(self) -> None:
        if not self.is_running():
            return
        self._run("pg_ctl", "-D", str(self.data_dir), "-m", "fast", "-w", "-t", str(STOP_TIMEOUT_SECONDS), "stop")

    def stop_immediate(self) -> None:
        """`pg_ctl stop -m immediate`: every backend quits without a checkpoint, as in a
        power cut; the next start replays the WAL (fault injection: a crashed shard)."""
        if not self.is_running():
            return
        self._run("pg_ctl", "-D", str(self.data_dir), "-m", "immediate", "-w", "-t", str(STOP_TIMEOUT_SECONDS), "stop")

    def process_pids(self) -> list[int]:
        """The postmaster and all its descendants (backends, checkpointer, walwriter, ...), postmaster first."""
        postmaster = self.pid()
        return [] if postmaster is None else [postmaster, *processes.descendants(postmaster)]

    def kill(self, signal_number: int = signal.SIGKILL) -> None:
        """Signal the postmaster only (fault injection: a crashed shard)."""
        pid = self.pid()
        if pid is not None:
            processes.kill(pid, [str(self.data_dir)], signal_number)
