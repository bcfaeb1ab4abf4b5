"""One shard's ledger in PostgreSQL.

Every operation is a few explicit `BEGIN ... COMMIT` batches, each sent as one
multi-statement query (client-side parameter binding, simple query protocol):
one round trip per batch and about half the client CPU of pipeline mode, which
matters because the service process, not the database, is the bottleneck.
A same-shard transfer takes two round trips: (1) lock both accounts in
account_id order and look for an earlier transfer with the same id; (2) insert
the transfer, update both balances, commit. The rules in between are
services.ledger.transfers.decide.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import psycopg
import psycopg.errors
import psycopg_pool
from psycopg.pq import ExecStatus, TransactionStatus

from services.ledger import errors
from services.ledger.accounts import Account, AccountKind, AccountStatus, OpenAccountRequest
from services.ledger.accounts import check_closable, check_status_change
from services.ledger.limits import TierLimits
from services.ledger.transfers import Transfer, TransferRequest, TransferStatus, decide

# A request never waits longer than this for a pooled connection, whatever its
# deadline: a shard that cannot hand out a connection in this time is unavailable.
POOL_WAIT_SECONDS_MAX = 5.0

ACCOUNT_COLUMNS = (
    "account_id, request_id, owner_id, currency, kind, tier, status, debits_posted_minor, credits_posted_minor,"
    " debits_pending_minor, credits_pending_minor, created_at, updated_at"
)
TRANSFER_COLUMNS = (
    "transfer_id, debit_account_id, credit_account_id, amount_minor, currency, reference, status, reason, seq,"
    " created_at, finalized_at, branch"
)

LOCK_TWO_ACCOUNTS = f"""
    SELECT {ACCOUNT_COLUMNS} FROM accounts WHERE account_id IN (%s, %s)
    ORDER BY account_id FOR UPDATE"""  # one fixed lock order: no deadlocks between transfers
SELECT_TRANSFER = f"SELECT {TRANSFER_COLUMNS} FROM transfers WHERE transfer_id = %s"
INSERT_TRANSFER = f"""
    INSERT INTO transfers (transfer_id, debit_account_id, credit_account_id, amount_minor, currency, reference,
                           status, reason, finalized_at)
    VALUES (%s, %s, %s, %s, %s, %s, %s, %s, now())
    RETURNING {TRANSFER_COLUMNS}"""
POST_BALANCES = """
    UPDATE accounts SET
        debits_posted_minor = debits_posted_minor + CASE WHEN account_id = %s THEN %s ELSE 0 END,
        credits_posted_minor = credits_posted_minor + CASE WHEN account_id = %s THEN %s ELSE 0 END,
        updated_at = now()
    WHERE account_id IN (%s, %s)"""
SELECT_ACCOUNT = f"SELECT {ACCOUNT_COLUMNS} FROM accounts WHERE account_id = %s"
LOCK_ACCOUNT = SELECT_ACCOUNT + " FOR UPDATE"
INSERT_ACCOUNT = f"""
    INSERT INTO accounts (account_id, request_id, owner_id, currency, kind, tier, status)
    VALUES (%s, %s, %s, %s, %s, %s, %s)
    ON CONFLICT (account_id) DO NOTHING
    RETURNING {ACCOUNT_COLUMNS}"""
SET_STATUS = f"UPDATE accounts SET status = %s, updated_at = now() WHERE account_id = %s RETURNING {ACCOUNT_COLUMNS}"
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
                async with self.pool.connection(timeout=min(timeout_seconds, POOL_WAIT_SECONDS_MAX)) as connection:
                    session = Session(psycopg.AsyncClientCursor(connection), timeout_seconds)
                    try:
                        yield session
                    finally:
                        if connection.info.transaction_status in (TransactionStatus.INTRANS, TransactionStatus.INERROR):
                            await connection.execute("ROLLBACK")
        except psycopg_pool.PoolTimeout as error:
            raise errors.ShardUnavailable(f"{self.shard_name}: no connection ({error})", shard=self.shard_name) from error
        except (TimeoutError, psycopg.errors.QueryCanceled) as error:
            raise errors.DeadlineExceeded(f"{self.shard_name}: deadline passed; the outcome may be unknown") from error
        except psycopg.OperationalError as error:
            raise errors.ShardUnavailable(f"{self.shard_name}: {error}", shard=self.shard_name) from error

    async def post_transfer(
        self, request: TransferRequest, limits: TierLimits, timeout_seconds: float
    ) -> tuple[Transfer, errors.LedgerError | None]:
        """The transfer as stored, and the refusal when this call just rejected it.

        The fresh refusal carries the details of the decision (which limit, which
        account); a stored rejection only keeps its reason.
        """
        debit_id, credit_id = request.debit_account_id, request.credit_account_id
        try:
            async with self.session(timeout_seconds) as session:
                locked, earlier = await session.run(
                    session.begin(LOCK_TWO_ACCOUNTS, SELECT_TRANSFER), [debit_id, credit_id, request.transfer_id]
                )
                if earlier:
                    return transfer_from_row(earlier[0]), None
                accounts = {row[0]: account_from_row(row) for row in locked}
                refusal = decide(request, accounts.get(debit_id), accounts.get(credit_id), limits)
                transfer_row = [
                    request.transfer_id, debit_id, credit_id, request.amount_minor, request.currency, request.reference,
                    TransferStatus.POSTED if refusal is None else TransferStatus.REJECTED,
                    "" if refusal is None else refusal.reason,
                ]
                if refusal is None:
                    amount = request.amount_minor
                    (inserted,) = await session.run(
                        batch(INSERT_TRANSFER, POST_BALANCES, COMMIT),
                        [*transfer_row, debit_id, amount, credit_id, amount, debit_id, credit_id],
                    )
                else:
                    (inserted,) = await session.run(batch(INSERT_TRANSFER, COMMIT), transfer_row)
            return transfer_from_row(inserted[0]), refusal
        except psycopg.errors.UniqueViolation:
            # The same transfer_id committed meanwhile (with other accounts, or we would have
            # waited on their locks): answer from the stored row.
            stored = await self.get_transfer(request.transfer_id, timeout_seconds)
            assert stored is not None, "unique violation on a transfer_id that is not there"
            return stored, None

    async def get_transfer(self, transfer_id: str, timeout_seconds: float) -> Transfer | None:
        async with self.session(timeout_seconds) as session:
            (found,) = await session.run(session.begin(SELECT_TRANSFER, COMMIT), [transfer_id])
        return transfer_from_row(found[0]) if found else None

    async def open_account(self, request: OpenAccountRequest, timeout_seconds: float) -> tuple[Account, bool]:
        async with self.session(timeout_seconds) as session:
            inserted, existing = await session.run(
                session.begin(INSERT_ACCOUNT, SELECT_ACCOUNT, COMMIT),
                [request.account_id, request.request_id, request.owner_id, request.currency, request.kind,
                 request.tier, AccountStatus.ACTIVE, request.account_id],
            )
        # When the id was taken, the INSERT returns nothing and the SELECT the account opened earlier.
        return (account_from_row(inserted[0]), True) if inserted else (account_from_row(existing[0]), False)

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
    def __init__(self, cursor: psycopg.AsyncClientCursor, timeout_seconds: float) -> None:
        self.cursor = cursor
        self.statement_timeout_ms = max(1, int(timeout_seconds * 1000))

    def begin(self, *statements: str) -> str:
        """Open a transaction whose statements the server cancels when the deadline passes."""
        return batch("BEGIN", f"SET LOCAL statement_timeout = {self.statement_timeout_ms}", *statements)

    async def run(self, statements: str, params: list | dict | None = None) -> list[list[tuple]]:
        """Send a batch in one round trip; the rows of each statement that returns rows, in order."""
        await self.cursor.execute(statements, params)
        row_sets = []
        while True:
            # The result status, not cursor.description (which builds column objects every time).
            if self.cursor.pgresult is not None and self.cursor.pgresult.status == ExecStatus.TUPLES_OK:
                row_sets.append(await self.cursor.fetchall())
            if not self.cursor.nextset():
                return row_sets
