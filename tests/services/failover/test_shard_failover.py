"""A shard's pool follows its primary through a failover, without Patroni and without a new pool.

The test makes the shard itself: a primary (deploy's own PostgresShard: roles, schema) and a
streaming replica made with pg_basebackup -R, synchronous (synchronous_standby_names), so that
a commit acknowledged by the primary is on the replica. The ShardStore's pool (services.bootstrap's
own) has one multi-host DSN over both, target_session_attrs=read-write, as Patroni's shard DSNs.

- The primary is killed (SIGKILL to its postmaster's process group) and the replica promoted:
  calls fail retryably (ShardUnavailable or DeadlineExceeded), never as a fault, and the next
  ones succeed on the new primary; every transfer acknowledged before is there.
- The primary is made read-only: a write fails retryably (not INTERNAL) and the connection is dropped.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import pathlib
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator

import psycopg
import pytest
from psycopg import conninfo

from deploy.postgres import (
    DATABASE_NAME, HOST, POSTGRES_USER, DatabaseRole, PostgresShard, as_postgres_user, bin_dir, give_to_postgres_user,
    passfile_path, secrets_dir,
)
from services import bootstrap
from services.ledger import errors
from services.ledger.accounts import AccountKind, OpenAccountRequest
from services.ledger.limits import TierLimits
from services.ledger.transfers import TransferRequest
from services.storage import audit, batch_posting
from services.storage.shard_store import ShardStore
from sharding.shard_map import Shard
from tests.fixtures.cluster import make_state_dir

PORT_BASE_ENV = "COREBANK_TEST_PORT_BASE"
DEFAULT_PORT_BASE = 22100
# Above the session cluster's ports and the etcd test's (tests/sharding/test_etcd_failover.py).
POSTGRES_PORT_OFFSET = 450
SHARD_NAME = "shard-failover"
CALL_TIMEOUT_SECONDS = 5.0
# Calls made until the pool reaches the new primary: each failing call discards a dead
# connection (or waits for the pool), so at most the pool's size and a few waits.
CALLS_UNTIL_FAILOVER_MAX = 40
PROMOTE_TIMEOUT_SECONDS = 60
REPLICATION_TIMEOUT_SECONDS = 60
POLL_INTERVAL_SECONDS = 0.2
TRANSFERS_BEFORE_FAILOVER = 20
AMOUNT_MINOR = 100
CURRENCY = "USD"
TIER = 0
_port_slots = itertools.count()


def pg_tool(tool: str, *args: str) -> None:
    completed = subprocess.run(
        as_postgres_user([str(bin_dir() / tool), *args]), capture_output=True, text=True, check=False,
        start_new_session=True, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert completed.returncode == 0, f"{tool} {args}: {completed.stdout}{completed.stderr}"


def superuser(shard_dir: pathlib.Path, port: int) -> psycopg.Connection:
    return psycopg.connect(
        conninfo.make_conninfo("", host=str(shard_dir), port=port, dbname=DATABASE_NAME, user=POSTGRES_USER), autocommit=True
    )


def wait_until(condition, timeout_seconds: float, what: str) -> None:
    deadline = time.monotonic() + timeout_seconds
    while not condition():
        assert time.monotonic() < deadline, f"{what}: not within {timeout_seconds}s"
        time.sleep(POLL_INTERVAL_SECONDS)


class PrimaryAndReplica:
    def __init__(self, state_dir: pathlib.Path, port_base: int) -> None:
        self.primary = PostgresShard("primary", state_dir / "shards" / "primary", port_base, secrets_dir(state_dir))
        self.replica_dir = state_dir / "shards" / "replica"
        self.replica_port = port_base + 1
        self.secrets = secrets_dir(state_dir)

    @property
    def replica_data_dir(self) -> pathlib.Path:
        return self.replica_dir / "data"

    def dsn(self, role: DatabaseRole = DatabaseRole.SERVICE) -> str:
        """Both members, the read-write one chosen at connect time (what Patroni's shard DSNs say).

        The auditor's sessions are read-only by its role's setting (deploy/postgres.py), so
        "read-write" would refuse every member: it asks for the primary (not in recovery) instead.
        """
        wanted = "primary" if role == DatabaseRole.AUDITOR else "read-write"
        return conninfo.make_conninfo(
            "", host=f"{HOST},{HOST}", port=f"{self.primary.port},{self.replica_port}", dbname=DATABASE_NAME,
            user=str(role), passfile=str(passfile_path(self.secrets, role)), target_session_attrs=wanted,
        )  # fmt: skip

    def start(self) -> None:
        self.primary.init()
        self.primary.start()
        # Replication through the primary's unix socket, as the superuser (deploy's rules allow it only to "all" databases).
        with open(self.primary.data_dir / "pg_hba.conf", "a") as rules:
            rules.write("local   replication   postgres   trust\n")
        with superuser(self.primary.shard_dir, self.primary.port) as connection:
            connection.execute("SELECT pg_reload_conf()")
        self.replica_dir.mkdir(parents=True)
        self.replica_dir.chmod(0o700)
        give_to_postgres_user(self.replica_dir)
        pg_tool(
            "pg_basebackup", "-D", str(self.replica_data_dir), "-R", "-X", "stream", "-c", "fast", "-h", str(self.primary.shard_dir),
            "-p", str(self.primary.port), "-U", POSTGRES_USER,
        )  # fmt: skip
        with open(self.replica_data_dir / "postgresql.conf", "a") as config:
            config.write(f"\nport = {self.replica_port}\nunix_socket_directories = '{self.replica_dir}'\n")
        pg_tool("pg_ctl", "-D", str(self.replica_data_dir), "-l", str(self.replica_dir / "postgres.log"), "-w", "start")
        with superuser(self.primary.shard_dir, self.primary.port) as connection:
            wait_until(
                lambda: connection.execute("SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming'").fetchone()[0] == 1,
                REPLICATION_TIMEOUT_SECONDS, "replica streaming",
            )  # fmt: skip
            # Synchronous: a commit the primary acknowledges is flushed on the replica too.
            connection.execute("ALTER SYSTEM SET synchronous_standby_names = '*'")
            connection.execute("SELECT pg_reload_conf()")
            wait_until(
                lambda: connection.execute("SELECT count(*) FROM pg_stat_replication WHERE sync_state = 'sync'").fetchone()[0] == 1,
                REPLICATION_TIMEOUT_SECONDS, "replica synchronous",
            )  # fmt: skip

    def kill_primary(self) -> None:
        """SIGKILL to the postmaster's process group: the postmaster and every backend at once."""
        pid = self.primary.pid()
        assert pid is not None, "the primary is not running"
        os.killpg(os.getpgid(pid), signal.SIGKILL)
        wait_until(lambda: not self.primary.is_running(), PROMOTE_TIMEOUT_SECONDS, "primary gone")

    def promote_replica(self) -> None:
        pg_tool("pg_ctl", "-D", str(self.replica_data_dir), "-w", "-t", str(PROMOTE_TIMEOUT_SECONDS), "promote")

    def stop(self) -> None:
        for data_dir in (self.primary.data_dir, self.replica_data_dir):
            if (data_dir / "postmaster.pid").exists():
                subprocess.run(
                    as_postgres_user([str(bin_dir() / "pg_ctl"), "-D", str(data_dir), "-m", "immediate", "-w", "stop"]),
                    capture_output=True, check=False, stdin=subprocess.DEVNULL,
                )  # fmt: skip


@pytest.fixture
def primary_and_replica() -> Iterator[PrimaryAndReplica]:
    # Each test its own two ports: a killed postmaster's port may linger a moment.
    port_base = int(os.environ.get(PORT_BASE_ENV) or DEFAULT_PORT_BASE) + POSTGRES_PORT_OFFSET + 2 * next(_port_slots)
    state_dir = make_state_dir("corebank-failover-")
    shard = PrimaryAndReplica(state_dir, port_base)
    try:
        shard.start()
        yield shard
    finally:
        shard.stop()
        shutil.rmtree(state_dir, ignore_errors=True)


async def open_store(shard: PrimaryAndReplica) -> ShardStore:
    store = await bootstrap.open_shard_store(Shard(SHARD_NAME, shard.dsn()))
    await store.pool.wait()
    return store


async def open_accounts(store: ShardStore, limits: TierLimits, run_id: str) -> tuple[str, str]:
    """A system account (may go below zero: the money's source) and a customer account."""
    opened = []
    for kind, name in ((AccountKind.SYSTEM, "source"), (AccountKind.CUSTOMER, "customer")):
        request = OpenAccountRequest(f"req_{run_id}_{name}", f"owner_{run_id}", CURRENCY, kind, TIER).validated(limits)
        account, _ = await store.open_account(request, CALL_TIMEOUT_SECONDS)
        opened.append(account.account_id)
    return opened[0], opened[1]


async def transfer(store: ShardStore, limits: TierLimits, transfer_id: str, debit_account_id: str, credit_account_id: str) -> None:
    request = TransferRequest(transfer_id, debit_account_id, credit_account_id, AMOUNT_MINOR, CURRENCY)
    [[outcome]] = await batch_posting.post_chains(store, [[request]], limits, CALL_TIMEOUT_SECONDS)
    assert outcome.fresh_refusal is None and outcome.transfer is not None, outcome


async def until_it_succeeds(call, what: str) -> tuple[int, list[type]]:
    """Send `call` again while it fails retryably; (calls that failed, their error types)."""
    failures: list[type] = []
    for _ in range(CALLS_UNTIL_FAILOVER_MAX):
        try:
            await call()
            return len(failures), failures
        except (errors.ShardUnavailable, errors.DeadlineExceeded) as error:
            failures.append(type(error))
            await asyncio.sleep(POLL_INTERVAL_SECONDS)
    raise AssertionError(f"{what}: still failing after {CALLS_UNTIL_FAILOVER_MAX} calls: {failures}")


def posted_on(shard_dir: pathlib.Path, port: int, account_id: str) -> tuple[int, int, bool]:
    with superuser(shard_dir, port) as connection:
        credits = connection.execute("SELECT credits_posted_minor FROM accounts WHERE account_id = %s", [account_id]).fetchone()[0]
        transfers = connection.execute("SELECT count(*) FROM transfers WHERE credit_account_id = %s", [account_id]).fetchone()[0]
        in_recovery = connection.execute("SELECT pg_is_in_recovery()").fetchone()[0]
    return credits, transfers, in_recovery


@pytest.mark.timeout(300)
def test_the_pool_follows_a_killed_primary_to_the_promoted_replica(primary_and_replica: PrimaryAndReplica) -> None:
    shard = primary_and_replica
    limits = TierLimits.load()

    async def run() -> tuple[int, list[type]]:
        store = await open_store(shard)
        try:
            source, customer = await open_accounts(store, limits, "kill")
            for number in range(TRANSFERS_BEFORE_FAILOVER):
                await transfer(store, limits, f"tr_kill_{number}", source, customer)
            shard.kill_primary()
            shard.promote_replica()
            failed = await until_it_succeeds(
                lambda: transfer(store, limits, "tr_kill_after", source, customer), "a transfer after the failover"
            )
            # The same pool, now on the new primary: reads and a second write go through at once.
            account = await store.get_account(customer, CALL_TIMEOUT_SECONDS)
            assert account is not None and account.credits_posted_minor == (TRANSFERS_BEFORE_FAILOVER + 1) * AMOUNT_MINOR
            await transfer(store, limits, "tr_kill_after_2", source, customer)
            return failed
        finally:
            await bootstrap.close_shard_store(store)

    started = time.monotonic()
    failures, kinds = asyncio.run(run())
    print(f"\nkilled primary: {failures} calls failed retryably before the promoted replica answered "
          f"({sorted({kind.__name__ for kind in kinds})}); whole run {time.monotonic() - started:.1f}s")
    credits, transfers, in_recovery = posted_on(shard.replica_dir, shard.replica_port, _customer_id(shard))
    assert not in_recovery
    # Every acknowledged transfer is on the new primary, and none twice.
    assert transfers == TRANSFERS_BEFORE_FAILOVER + 2
    assert credits == transfers * AMOUNT_MINOR
    # The books on the new primary, read by the audit through the same multi-host DSN.
    books = audit.audit_shard(SHARD_NAME, shard.dsn(DatabaseRole.AUDITOR))
    assert books.violations() == [] and books.balanced and books.transfers == transfers


def _customer_id(shard: PrimaryAndReplica) -> str:
    with superuser(shard.replica_dir, shard.replica_port) as connection:
        (account_id,) = connection.execute("SELECT account_id FROM accounts WHERE kind = %s", [int(AccountKind.CUSTOMER)]).fetchone()
    return account_id


@pytest.mark.timeout(300)
def test_a_write_on_a_read_only_primary_fails_retryably_and_drops_the_connection(primary_and_replica: PrimaryAndReplica) -> None:
    shard = primary_and_replica
    limits = TierLimits.load()

    async def run() -> None:
        store = await open_store(shard)
        try:
            source, customer = await open_accounts(store, limits, "ro")
            await transfer(store, limits, "tr_ro_before", source, customer)
            with superuser(shard.primary.shard_dir, shard.primary.port) as connection:
                connection.execute("ALTER SYSTEM SET default_transaction_read_only = on")
                connection.execute("SELECT pg_reload_conf()")
            backends_before = _service_backends(shard)
            assert backends_before, "the pool has no connection to the primary"
            with pytest.raises(errors.ShardUnavailable):
                await transfer(store, limits, "tr_ro_refused", source, customer)
            # The connection that met the read-only server is gone, and the pool's others with it.
            wait_until(lambda: not (_service_backends(shard) & backends_before), CALL_TIMEOUT_SECONDS * 4, "old connections closed")
            # Reads still answer from the read-write member only: there is none now, so the shard is unavailable.
            with pytest.raises((errors.ShardUnavailable, errors.DeadlineExceeded)):
                await store.get_account(customer, CALL_TIMEOUT_SECONDS)
        finally:
            await bootstrap.close_shard_store(store)

    asyncio.run(run())
    with superuser(shard.primary.shard_dir, shard.primary.port) as connection:
        connection.execute("ALTER SYSTEM RESET default_transaction_read_only")
        connection.execute("SELECT pg_reload_conf()")
        rows = connection.execute("SELECT transfer_id FROM transfers ORDER BY transfer_id").fetchall()
    assert [row[0] for row in rows] == ["tr_ro_before"], "a write refused by the read-only server was stored"


def _service_backends(shard: PrimaryAndReplica) -> set[int]:
    with superuser(shard.primary.shard_dir, shard.primary.port) as connection:
        rows = connection.execute("SELECT pid FROM pg_stat_activity WHERE usename = %s", [str(DatabaseRole.SERVICE)]).fetchall()
    return {row[0] for row in rows}



@pytest.mark.timeout(300)
def test_a_commit_whose_wait_for_its_synchronous_standby_is_cancelled_is_not_acknowledged(primary_and_replica: PrimaryAndReplica) -> None:
    """PostgreSQL answers such a COMMIT with success and a warning ("has already committed locally,
    but might not have been replicated"); a primary cut off from its replicas would then lose an
    acknowledged transfer at the failover. The store answers DeadlineExceeded (outcome unknown),
    and a retry with the same id, once a standby confirms, finds the transfer posted once."""
    shard = primary_and_replica
    limits = TierLimits.load()

    def wait_for_standby(names: str) -> None:
        with superuser(shard.primary.shard_dir, shard.primary.port) as connection:
            connection.execute(f"ALTER SYSTEM SET synchronous_standby_names = '{names}'")
            connection.execute("SELECT pg_reload_conf()")

    def wait_for_sync_rep_waiter() -> int:
        found: list[int] = []

        def waiting() -> bool:
            with superuser(shard.primary.shard_dir, shard.primary.port) as connection:
                found[:] = [row[0] for row in connection.execute(
                    "SELECT pid FROM pg_stat_activity WHERE usename = %s AND wait_event = 'SyncRep'", [str(DatabaseRole.SERVICE)]
                )]
            return bool(found)

        wait_until(waiting, CALL_TIMEOUT_SECONDS, "a commit waiting for its synchronous standby")
        return found[0]

    async def run() -> str:
        store = await open_store(shard)
        try:
            source, customer = await open_accounts(store, limits, "unrepl")
            # A standby that never connects: every commit waits for it until the statement timeout.
            wait_for_standby("ghost")
            request = TransferRequest("tr_unreplicated", source, customer, AMOUNT_MINOR, CURRENCY)
            posting = asyncio.create_task(batch_posting.post_chains(store, [[request]], limits, CALL_TIMEOUT_SECONDS))
            # The server cancels the wait (as its statement_timeout, or an operator, would) before
            # the client's deadline: the COMMIT then answers success, with the warning.
            waiting = await asyncio.to_thread(wait_for_sync_rep_waiter)
            with superuser(shard.primary.shard_dir, shard.primary.port) as connection:
                assert connection.execute("SELECT pg_cancel_backend(%s)", [waiting]).fetchone()[0]
            with pytest.raises(errors.DeadlineExceeded):
                await posting
            # It did commit on the primary: only the acknowledgement was withheld.
            assert posted_on(shard.primary.shard_dir, shard.primary.port, customer)[:2] == (AMOUNT_MINOR, 1)
            wait_for_standby("*")
            await until_it_succeeds(lambda: transfer(store, limits, "tr_unreplicated", source, customer), "retry")
            return customer
        finally:
            await bootstrap.close_shard_store(store)

    customer = asyncio.run(run())
    # Posted once, on the primary and on its standby.
    assert posted_on(shard.primary.shard_dir, shard.primary.port, customer) == (AMOUNT_MINOR, 1, False)
    wait_until(lambda: posted_on(shard.replica_dir, shard.replica_port, customer)[:2] == (AMOUNT_MINOR, 1), REPLICATION_TIMEOUT_SECONDS, "replicated")
