"""One shard's ledger in PostgreSQL.

A same-shard transfer is one local transaction in two round trips, sent in
pipeline mode: (1) lock both accounts in account_id order and look for an
earlier transfer with the same id; (2) insert the transfer, update both
balances, commit. The rules in between are services.ledger.transfers.decide.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import psycopg
import psycopg.errors
import psycopg_pool

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
    " created_at, finalized_at"
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
        debits_posted_minor = debits_posted_minor + CASE WHEN account_id = %(debit)s THEN %(amount)s ELSE 0 END,
        credits_posted_minor = credits_posted_minor + CASE WHEN account_id = %(credit)s THEN %(amount)s ELSE 0 END,
        updated_at = now()
    WHERE account_id IN (%(debit)s, %(credit)s)"""
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
        (SELECT {TRANSFER_COLUMNS} FROM transfers WHERE debit_account_id = %(account)s AND seq < %(before)s
         ORDER BY seq DESC LIMIT %(limit)s)
        UNION ALL
        (SELECT {TRANSFER_COLUMNS} FROM transfers WHERE credit_account_id = %(account)s AND seq < %(before)s
         ORDER BY seq DESC LIMIT %(limit)s)
    ) AS both_sides ORDER BY seq DESC LIMIT %(limit)s"""


def account_from_row(row: tuple) -> Account:
    return Account(row[0], row[1], row[2], row[3], AccountKind(row[4]), row[5], AccountStatus(row[6]), *row[7:])


def transfer_from_row(row: tuple) -> Transfer:
    return Transfer(*row[:6], TransferStatus(row[6]), *row[7:])


class ShardStore:
    def __init__(self, shard_name: str, pool: psycopg_pool.AsyncConnectionPool) -> None:
        self.shard_name = shard_name
        self.pool = pool

    @contextlib.asynccontextmanager
    async def _transaction(self, timeout_seconds: float) -> AsyncIterator[psycopg.AsyncConnection]:
        """A pipelined transaction bounded by the caller's deadline, on both sides of the wire."""
        try:
            async with asyncio.timeout(timeout_seconds):
                async with self.pool.connection(timeout=min(timeout_seconds, POOL_WAIT_SECONDS_MAX)) as connection:
                    async with connection.pipeline():
                        async with connection.transaction():
                            await connection.execute(
                                "SELECT set_config('statement_timeout', %s, true)", [f"{int(timeout_seconds * 1000)}ms"]
                            )
                            yield connection
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
        try:
            async with self._transaction(timeout_seconds) as connection:
                locked = await connection.execute(LOCK_TWO_ACCOUNTS, [request.debit_account_id, request.credit_account_id])
                earlier = await connection.execute(SELECT_TRANSFER, [request.transfer_id])
                accounts = {row[0]: account_from_row(row) for row in await locked.fetchall()}
                earlier_row = await earlier.fetchone()
                if earlier_row is not None:
                    return transfer_from_row(earlier_row), None
                refusal = decide(
                    request, accounts.get(request.debit_account_id), accounts.get(request.credit_account_id), limits
                )
                inserted = await connection.execute(
                    INSERT_TRANSFER,
                    [
                        request.transfer_id, request.debit_account_id, request.credit_account_id,
                        request.amount_minor, request.currency, request.reference,
                        TransferStatus.POSTED if refusal is None else TransferStatus.REJECTED,
                        "" if refusal is None else refusal.reason,
                    ],
                )
                if refusal is None:
                    await connection.execute(
                        POST_BALANCES,
                        {"debit": request.debit_account_id, "credit": request.credit_account_id, "amount": request.amount_minor},
                    )
            # Read the RETURNING row only after COMMIT went out in the same round trip.
            return transfer_from_row(await inserted.fetchone()), refusal
        except psycopg.errors.UniqueViolation:
            # The same transfer_id committed meanwhile (with other accounts, or we would have
            # waited on their locks): answer from the stored row.
            stored = await self.get_transfer(request.transfer_id, timeout_seconds)
            assert stored is not None, "unique violation on a transfer_id that is not there"
            return stored, None

    async def get_transfer(self, transfer_id: str, timeout_seconds: float) -> Transfer | None:
        async with self._transaction(timeout_seconds) as connection:
            cursor = await connection.execute(SELECT_TRANSFER, [transfer_id])
            row = await cursor.fetchone()
        return transfer_from_row(row) if row else None

    async def open_account(self, request: OpenAccountRequest, timeout_seconds: float) -> tuple[Account, bool]:
        async with self._transaction(timeout_seconds) as connection:
            inserted = await connection.execute(
                INSERT_ACCOUNT,
                [request.account_id, request.request_id, request.owner_id, request.currency, request.kind,
                 request.tier, AccountStatus.ACTIVE],
            )
            row = await inserted.fetchone()
            if row is not None:
                return account_from_row(row), True
            existing = await connection.execute(SELECT_ACCOUNT, [request.account_id])
            row = await existing.fetchone()
        return account_from_row(row), False

    async def get_account(self, account_id: str, timeout_seconds: float) -> Account | None:
        async with self._transaction(timeout_seconds) as connection:
            cursor = await connection.execute(SELECT_ACCOUNT, [account_id])
            row = await cursor.fetchone()
        return account_from_row(row) if row else None

    async def update_account_status(self, account_id: str, status: int, timeout_seconds: float) -> Account:
        async with self._transaction(timeout_seconds) as connection:
            account = await self._lock_account(connection, account_id)
            new_status = check_status_change(account, status)
            if new_status == account.status:
                return account
            cursor = await connection.execute(SET_STATUS, [new_status, account_id])
            row = await cursor.fetchone()
        return account_from_row(row)

    async def close_account(self, account_id: str, timeout_seconds: float) -> Account:
        async with self._transaction(timeout_seconds) as connection:
            account = await self._lock_account(connection, account_id)
            if account.status == AccountStatus.CLOSED:
                return account
            check_closable(account)
            cursor = await connection.execute(SET_STATUS, [AccountStatus.CLOSED, account_id])
            row = await cursor.fetchone()
        return account_from_row(row)

    async def list_account_transfers(
        self, account_id: str, before_seq: int, limit: int, timeout_seconds: float
    ) -> list[Transfer]:
        async with self._transaction(timeout_seconds) as connection:
            account = await connection.execute(SELECT_ACCOUNT, [account_id])
            listed = await connection.execute(
                LIST_ACCOUNT_TRANSFERS, {"account": account_id, "before": before_seq, "limit": limit}
            )
            if await account.fetchone() is None:
                raise errors.AccountNotFound(f"account {account_id} not found", account_id=account_id)
            rows = await listed.fetchall()
        return [transfer_from_row(row) for row in rows]

    @staticmethod
    async def _lock_account(connection: psycopg.AsyncConnection, account_id: str) -> Account:
        cursor = await connection.execute(LOCK_ACCOUNT, [account_id])
        row = await cursor.fetchone()
        if row is None:
            raise errors.AccountNotFound(f"account {account_id} not found", account_id=account_id)
        return account_from_row(row)
