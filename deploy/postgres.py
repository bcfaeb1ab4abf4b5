"""One PostgreSQL cluster per shard: initdb, start, stop, status, database setup.

PostgreSQL refuses to run as root, so when we are root every PostgreSQL
command runs as the `postgres` user and the shard's folder belongs to it.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import shutil
import signal
import subprocess

import psycopg

from deploy import processes

POSTGRES_USER = "postgres"
DATABASE_NAME = "corebank"
ROLE_NAME = "corebank"
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


def dsn(port: int, user: str = ROLE_NAME, dbname: str = DATABASE_NAME) -> str:
    return f"host={HOST} port={port} dbname={dbname} user={user}"


@dataclasses.dataclass(frozen=True)
class PostgresShard:
    name: str
    shard_dir: pathlib.Path  # absolute; holds data/, the log and the unix socket
    port: int

    @property
    def data_dir(self) -> pathlib.Path:
        return self.shard_dir / "data"

    @property
    def log_path(self) -> pathlib.Path:
        return self.shard_dir / "postgres.log"

    @property
    def dsn(self) -> str:
        return dsn(self.port)

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
        self.shard_dir.chmod(0o755)
        check_traversable(self.shard_dir)
        give_to_postgres_user(self.shard_dir)
        # A half-made data dir from an interrupted initdb would make initdb refuse.
        shutil.rmtree(self.data_dir, ignore_errors=True)
        self._run(
            "initdb",
            "-D", str(self.data_dir),
            "-U", POSTGRES_USER,
            "--auth=trust",
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
        (self.data_dir / "pg_hba.conf").write_text(
            "# corebank: local development and tests only; every client is trusted.\n"
            "local all all trust\n"
            f"host all all {HOST}/32 trust\n"
        )
        give_to_postgres_user(self.data_dir / "pg_hba.conf")

    # Lifecycle.

    def pid(self) -> int | None:
        """The postmaster's pid when it runs on our data dir, else None."""
        pid = processes.read_pid(self.data_dir / "postmaster.pid")
        return pid if processes.is_ours(pid, [str(self.data_dir)]) else None

    def is_running(self) -> bool:
        return self.pid() is not None

    def is_healthy(self) -> bool:
        try:
            with psycopg.connect(dsn(self.port, user=POSTGRES_USER, dbname="postgres"), connect_timeout=CONNECT_TIMEOUT_SECONDS) as connection:
                connection.execute("SELECT 1")
            return True
        except psycopg.Error:
            return False

    def start(self) -> None:
        """Start when not running, then make sure role, database and schema exist."""
        if not self.is_running():
            self._start_postmaster()
        self.ensure_database()

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
        # Imported here: deploy must stay importable (status, down) even when
        # services/ is broken mid-edit.
        from services.storage.schema import apply_schema

        with psycopg.connect(
            dsn(self.port, user=POSTGRES_USER, dbname="postgres"), autocommit=True, connect_timeout=CONNECT_TIMEOUT_SECONDS
        ) as connection:
            if connection.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", [ROLE_NAME]).fetchone() is None:
                connection.execute(f"CREATE ROLE {ROLE_NAME} LOGIN")
            if connection.execute("SELECT 1 FROM pg_database WHERE datname = %s", [DATABASE_NAME]).fetchone() is None:
                connection.execute(f"CREATE DATABASE {DATABASE_NAME} OWNER {ROLE_NAME}")
        apply_schema(self.dsn)

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
