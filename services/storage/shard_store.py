"""One shard's ledger in PostgreSQL: accounts, and the session every storage module uses.

Every operation is a few explicit `BEGIN ... COMMIT` batches, each sent as one
multi-statement query (client-side parameter binding, simple query protocol):
one round trip per batch and about half the client CPU of pipeline mode, which
matters because the service process, not the database, is the bottleneck.
Same-shard transfers are posted in batches (batch_posting.py), transfers
between shards by the TCC operations (tcc_store.py).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import psycopg
import psycopg.errors
import psycopg_pool
from psycopg.pq import ExecStatus, TransactionStatus

from services.ledger import errors, ids
from services.ledger.accounts import Account, AccountKind, AccountStatus, OpenAccountRequest
from services.ledger.accounts import check_closable, check_status_change
from services.ledger.transfers import Transfer, TransferStatus

# A request never waits longer than this for a pooled connection, whatever its
# deadline: a shard that cannot hand out a connection in this time is unavailable.
POOL_WAIT_SECONDS_MAX = 5.0
# Connections per shard per process: enough to keep a shard's cores busy at
# peak, few enough that several processes stay under max_connections (200).
POOL_SIZE_MIN = 2
POOL_SIZE_MAX = 16
# After a shard restart every pooled connection is dead: skip at most the whole pool.
DEAD_CONNECTIONS_SKIPPED_MAX = POOL_SIZE_MAX

ACCOUNT_COLUMNS = (
    "account_id, request_id, owner_id, currency, kind, tier, status, debits_posted_minor, credits_posted_minor,"
    " debits_pending_minor, credits_pending_minor, created_at, updated_at, collect_on_every_shard, parent_account_id"
)
TRANSFER_COLUMNS = (
    "transfer_id, debit_account_id, credit_account_id, amount_minor, currency, reference, status, reason, seq,"
    " created_at, finalized_at, branch"
)

SELECT_TRANSFER = f"SELECT {TRANSFER_COLUMNS} FROM transfers WHERE transfer_id = %s"
SELECT_ACCOUNT = f"SELECT {ACCOUNT_COLUMNS} FROM accounts WHERE account_id = %s"
LOCK_ACCOUNT = SELECT_ACCOUNT + " FOR UPDATE"
INSERT_ACCOUNT = f"""
    INSERT INTO accounts (account_id, request_id, owner_id, currency, kind, tier, status, collect_on_every_shard, parent_account_id)
    VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)
    ON CONFLICT (account_id) DO NOTHING
    RETURNING {ACCOUNT_COLUMNS}"""
SET_STATUS = f"UPDATE accounts SET status = %s, updated_at = now() WHERE account_id = %s RETURNING {ACCOUNT_COLUMNS}"
SET_COLLECTION_STATUS = "UPDATE accounts SET status = %s, updated_at = now() WHERE parent_account_id = %s"
# A merchant's sub-accounts are credited only by payments and debited only by sweeps, so
# their credits so far are every payment collected, whatever sweeps are in flight.
COLLECTED_SO_FAR = "SELECT coalesce(sum(credits_posted_minor), 0) FROM accounts WHERE parent_account_id = %s"
# What the merchant's own row has received from its sub-accounts' sweeps: posted in the
# same transaction as its balance, so one snapshot of both is consistent.
RECEIVED_FROM_SWEEPS = f"""
    SELECT coalesce(sum(amount_minor), 0) FROM transfers
    WHERE credit_account_id = %s AND status = 2 AND branch IN (0, 2)
      AND starts_with(debit_account_id, '{ids.COLLECTION_ACCOUNT_ID_PREFIX}')"""
# What each collection sub-account can sweep now, and the sweep's id part: the debits
# so far, which only sweeps move, so a retried sweep of the same money has the same id.
SWEEPABLE = """
    SELECT account_id, parent_account_id, currency, credits_posted_minor - debits_posted_minor - debits_pending_minor,
           debits_posted_minor + debits_pending_minor
    FROM accounts WHERE parent_account_id IS NOT NULL
      AND credits_posted_minor - debits_posted_minor - debits_pending_minor > 0
    LIMIT %s"""
# Newest first: each side's index gives its newest rows; merge the two.
LIST_ACCOUNT_TRANSFERS = f"""
    SELECT {TRANSFER_COLUMNS} FROM (
        (SELECT {TRANSFER_COLUMNS} FROM transfers WHERE debit_account_id = %s AND seq < %s
         ORDER BY seq DESC LIMIT %s)
        UNION ALL
        (SELECT {TRANSFER_COLUMNS} FROM transfers WHERE credit_account_id = %s AND seq < %s
         ORDER BY seq DESC LIMIT %s)
    ) AS both_sides ORDER BY seq DESC LIMIT %s"""


COMMIT = "COMMIT"


def batch(*statements: str) -> str:
    return ";\n".join(statements)


def account_from_row(row: tuple) -> Account:
    return Account(row[0], row[1], row[2], row[3], AccountKind(row[4]), row[5], AccountStatus(row[6]), *row[7:])


def transfer_from_row(row: tuple) -> Transfer:
    return Transfer(*row[:6], TransferStatus(row[6]), *row[7:])


class ShardStore:
    def __init__(self, shard_name: str, pool: psycopg_pool.AsyncConnectionPool) -> None:
        self.shard_name = shard_name
        self.pool = pool

    @contextlib.asynccontextmanager
    async def session(self, timeout_seconds: float) -> AsyncIterator[Session]:
        """A connection bounded by the caller's deadline on both sides of the wire.

        Nothing commits unless a batch says COMMIT: whatever is left open when
        the block ends (an early return, an error) is rolled back.
        """
        try:
            async with asyncio.timeout(timeout_seconds):
                session = Session(self.pool, timeout_seconds)
                await session.connect()
                try:
                    yield session
                finally:
                    await session.release()
        except psycopg_pool.PoolTimeout as error:
            raise errors.ShardUnavailable(f"{self.shard_name}: no connection ({error})", shard=self.shard_name) from error
        except (TimeoutError, psycopg.errors.QueryCanceled) as error:
            raise errors.DeadlineExceeded(f"{self.shard_name}: deadline passed; the outcome may be unknown") from error
        except psycopg.OperationalError as error:
            raise errors.ShardUnavailable(f"{self.shard_name}: {error}", shard=self.shard_name) from error

    async def open_account(self, request: OpenAccountRequest, timeout_seconds: float) -> tuple[Account, bool]:
        async with self.session(timeout_seconds) as session:
            inserted, existing = await session.run(
                session.begin(INSERT_ACCOUNT, SELECT_ACCOUNT, COMMIT),
                [request.account_id, request.request_id, request.owner_id, request.currency, request.kind,
                 request.tier, AccountStatus.ACTIVE, request.collect_on_every_shard, None, request.account_id],
            )
        # When the id was taken, the INSERT returns nothing and the SELECT the account opened earlier.
        return (account_from_row(inserted[0]), True) if inserted else (account_from_row(existing[0]), False)

    async def open_collection_account(self, merchant: Account, account_id: str, timeout_seconds: float) -> None:
        """The merchant's sub-account on this shard (idempotent): same owner, currency, tier and status."""
        async with self.session(timeout_seconds) as session:
            await session.run(
                session.begin(INSERT_ACCOUNT, COMMIT),
                [account_id, account_id, merchant.owner_id, merchant.currency, merchant.kind, merchant.tier,
                 merchant.status, False, merchant.account_id],
            )

    async def set_collection_status(self, merchant_id: str, status: int, timeout_seconds: float) -> None:
        async with self.session(timeout_seconds) as session:
            await session.run(session.begin(SET_COLLECTION_STATUS, COMMIT), [status, merchant_id])

    async def collected_so_far(self, merchant_id: str, timeout_seconds: float) -> int:
        async with self.session(timeout_seconds) as session:
            (row,) = await session.run(session.begin(COLLECTED_SO_FAR, COMMIT), [merchant_id])
        return int(row[0][0])

    async def get_account_and_swept_in(self, account_id: str, timeout_seconds: float) -> tuple[Account | None, int]:
        """An account, and (for a collecting merchant) what sweeps brought into it, in one snapshot."""
        async with self.session(timeout_seconds) as session:
            found, received = await session.run(
                session.begin("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ", SELECT_ACCOUNT, RECEIVED_FROM_SWEEPS, COMMIT),
                [account_id, account_id],
            )
        return (account_from_row(found[0]) if found else None), int(received[0][0])

    async def sweepable(self, limit: int, timeout_seconds: float) -> list[tuple[str, str, str, int, int]]:
        """(sub-account, merchant, currency, amount to sweep, debits so far) with money to sweep."""
        async with self.session(timeout_seconds) as session:
            (rows,) = await session.run(session.begin(SWEEPABLE, COMMIT), [limit])
        return rows

    async def get_account(self, account_id: str, timeout_seconds: float) -> Account | None:
        async with self.session(timeout_seconds) as session:
            (found,) = await session.run(session.begin(SELECT_ACCOUNT, COMMIT), [account_id])
        return account_from_row(found[0]) if found else None

    async def update_account_status(self, account_id: str, status: int, timeout_seconds: float) -> Account:
        async with self.session(timeout_seconds) as session:
            account = await self.lock_account(session, account_id)
            new_status = check_status_change(account, status)
            if new_status == account.status:
                return account
            (updated,) = await session.run(batch(SET_STATUS, COMMIT), [new_status, account_id])
        return account_from_row(updated[0])

    async def close_account(self, account_id: str, timeout_seconds: float) -> Account:
        async with self.session(timeout_seconds) as session:
            account = await self.lock_account(session, account_id)
            if account.status == AccountStatus.CLOSED:
                return account
            check_closable(account)
            (updated,) = await session.run(batch(SET_STATUS, COMMIT), [AccountStatus.CLOSED, account_id])
        return account_from_row(updated[0])

    async def list_account_transfers(
        self, account_id: str, before_seq: int, limit: int, timeout_seconds: float
    ) -> list[Transfer]:
        async with self.session(timeout_seconds) as session:
            account, listed = await session.run(
                session.begin(SELECT_ACCOUNT, LIST_ACCOUNT_TRANSFERS, COMMIT),
                [account_id, account_id, before_seq, limit, account_id, before_seq, limit, limit],
            )
        if not account:
            raise errors.AccountNotFound(f"account {account_id} not found", account_id=account_id)
        return [transfer_from_row(row) for row in listed]

    @staticmethod
    async def lock_account(session: Session, account_id: str, must_exist: bool = True) -> Account | None:
        """Lock one account row for this transaction (customer rows before clearing rows, always)."""
        (found,) = await session.run(session.begin(LOCK_ACCOUNT), [account_id])
        if found:
            return account_from_row(found[0])
        if must_exist:
            raise errors.AccountNotFound(f"account {account_id} not found", account_id=account_id)
        return None


class Session:
    def __init__(self, pool: psycopg_pool.AsyncConnectionPool, timeout_seconds: float) -> None:
        self.pool = pool
        self.timeout_seconds = timeout_seconds
        self.statement_timeout_ms = max(1, int(timeout_seconds * 1000))
        self.connection: psycopg.AsyncConnection | None = None
        self.cursor: psycopg.AsyncClientCursor | None = None
        self.batches_sent = 0

    async def connect(self) -> None:
        self.connection = await self.pool.getconn(timeout=min(self.timeout_seconds, POOL_WAIT_SECONDS_MAX))
        self.cursor = psycopg.AsyncClientCursor(self.connection)

    async def release(self) -> None:
        if self.connection is None:
            return
        if self.connection.info.transaction_status in (TransactionStatus.INTRANS, TransactionStatus.INERROR):
            await self.connection.execute("ROLLBACK")
        await self.pool.putconn(self.connection)  # the pool discards a broken or busy connection
        self.connection = None

    def begin(self, *statements: str) -> str:
        """Open a transaction whose statements the server cancels when the deadline passes."""
        return batch("BEGIN", f"SET LOCAL statement_timeout = {self.statement_timeout_ms}", *statements)

    async def run(self, statements: str, params: list | dict | None = None) -> list[list[tuple]]:
        """Send a batch in one round trip; the rows of each statement that returns rows, in order."""
        for attempt in range(DEAD_CONNECTIONS_SKIPPED_MAX + 1):
            try:
                await self.cursor.execute(statements, params)
                break
            except psycopg.OperationalError:
                # Pooled connections the server had closed (a restart, a cut link) fail on first use,
                # all of them at once. Every operation's first batch only reads and locks, or writes
                # idempotently (ON CONFLICT, barriers, compare-and-set), so it is safe to send it again
                # on the next connection; the pool drops each broken one and opens fresh ones.
                if self.batches_sent or not self.connection.broken or attempt == DEAD_CONNECTIONS_SKIPPED_MAX:
                    raise
                await self.release()
                await self.connect()
        self.batches_sent += 1
        row_sets = []
        while True:
            # The result status, not cursor.description (which builds column objects every time).
            if self.cursor.pgresult is not None and self.cursor.pgresult.status == ExecStatus.TUPLES_OK:
                row_sets.append(await self.cursor.fetchall())
            if not self.cursor.nextset():
                return row_sets
