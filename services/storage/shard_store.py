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
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import psycopg
import psycopg.errors
import psycopg_pool
from psycopg.pq import ExecStatus, TransactionStatus

from services.storage import metrics
from services.storage.metrics import ErrorKind
from services.ledger import errors, ids
from services.ledger.accounts import Account, AccountKind, AccountStatus, OpenAccountRequest
from services.ledger.transfers import Branch, Transfer, TransferStatus
from services.storage.array_literal import FastListDumper
from services.storage.prepared import prepared

log = logging.getLogger(__name__)

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
    " debits_pending_minor, credits_pending_minor, created_at, updated_at, collect_on_every_shard, parent_account_id,"
    " participant_id"
)
TRANSFER_COLUMNS = (
    "transfer_id, debit_account_id, credit_account_id, amount_minor, currency, reference, status, reason, seq,"
    " created_at, finalized_at, branch"
)

SELECT_TRANSFER = prepared("select_transfer", f"SELECT {TRANSFER_COLUMNS} FROM transfers WHERE transfer_id = %s")  # nosec B608 # constants only, no request data
SELECT_ACCOUNT = prepared("select_account", f"SELECT {ACCOUNT_COLUMNS} FROM accounts WHERE account_id = %s")  # nosec B608 # constants only, no request data
# Who owns each of some accounts, and their kind (authorisation: services/ledger/authorization.py).
SELECT_ACCOUNT_OWNERS = prepared(
    "select_account_owners", "SELECT account_id, owner_id, kind, participant_id FROM accounts WHERE account_id = ANY(%s)"
)
LOCK_ACCOUNT = prepared("lock_account", f"SELECT {ACCOUNT_COLUMNS} FROM accounts WHERE account_id = %s FOR UPDATE")  # nosec B608 # constants only, no request data
INSERT_ACCOUNT = f"""
    INSERT INTO accounts (account_id, request_id, owner_id, currency, kind, tier, status, collect_on_every_shard, parent_account_id,
                          participant_id)
    VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)
    ON CONFLICT (account_id) DO NOTHING
    RETURNING {ACCOUNT_COLUMNS}"""  # nosec B608 # constants only, no request data
# The clearing registry (on the clearing home shard): OpenAccount checks the participant it names.
SELECT_PARTICIPANT = "SELECT 1 FROM participants WHERE participant_id = %s"
SELECT_PARTICIPANT_CURRENCY = "SELECT 1 FROM participant_currencies WHERE participant_id = %s AND currency = %s"
SET_STATUS = f"UPDATE accounts SET status = %s, updated_at = now() WHERE account_id = %s RETURNING {ACCOUNT_COLUMNS}"  # nosec B608 # constants only, no request data
SET_COLLECTION_STATUS = "UPDATE accounts SET status = %s, updated_at = now() WHERE parent_account_id = %s"
# A merchant's sub-accounts are credited only by payments and debited only by sweeps, so
# their credits so far are every payment collected, whatever sweeps are in flight.
COLLECTED_SO_FAR = "SELECT coalesce(sum(credits_posted_minor), 0) FROM accounts WHERE parent_account_id = %s"
# What the merchant's own row has received from its sub-accounts' sweeps: posted in the
# same transaction as its balance, so one snapshot of both is consistent.
RECEIVED_FROM_SWEEPS = f"""
    SELECT coalesce(sum(amount_minor), 0) FROM transfers
    WHERE credit_account_id = %s AND status = {int(TransferStatus.POSTED)}
      AND branch IN ({int(Branch.SAME_SHARD)}, {int(Branch.CREDIT)})
      AND starts_with(debit_account_id, '{ids.COLLECTION_ACCOUNT_ID_PREFIX}')"""  # nosec B608 # constants only, no request data
# A sub-account whose last sweep failed is tried again this long after, not at every scan:
# a merchant that refuses credits would otherwise leave a failed sweep behind every second.
SWEEP_RETRY_AFTER_FAILURE_SECONDS = 10
# What each collection sub-account can sweep now, and the parts of the sweep's id: the
# debits so far (only sweeps move them) and the sweeps that failed so far (refused or
# voided: a failed sweep's id is final, so the next try of the same money needs a new one).
# Two coordinators reading the same state make the same id, so they cannot both move it.
# A frozen or closed sub-account is skipped: its sweep would only be refused.
SWEEPABLE = f"""
    SELECT account_id, parent_account_id, currency, credits_posted_minor - debits_posted_minor - debits_pending_minor,
           debits_posted_minor + debits_pending_minor, failed.sweeps
    FROM accounts CROSS JOIN LATERAL (
        SELECT count(*) AS sweeps, max(t.finalized_at) AS last_at FROM transfers t
        WHERE t.debit_account_id = accounts.account_id
          AND t.status IN ({int(TransferStatus.VOIDED)}, {int(TransferStatus.REJECTED)})
          AND starts_with(t.debit_account_id, '{ids.COLLECTION_ACCOUNT_ID_PREFIX}')
    ) AS failed
    WHERE parent_account_id IS NOT NULL
      AND status NOT IN ({int(AccountStatus.FROZEN)}, {int(AccountStatus.CLOSED)})
      AND credits_posted_minor - debits_posted_minor - debits_pending_minor > 0
      AND (failed.last_at IS NULL OR failed.last_at <= now() - make_interval(secs => {SWEEP_RETRY_AFTER_FAILURE_SECONDS}))
    LIMIT %s"""  # nosec B608 # constants only, no request data
# A collecting merchant's sub-accounts on one shard, locked, with whether each holds anything.
LOCK_COLLECTION_ACCOUNTS = """
    SELECT account_id, credits_posted_minor <> debits_posted_minor OR debits_pending_minor <> 0 OR credits_pending_minor <> 0
    FROM accounts WHERE parent_account_id = %s ORDER BY account_id FOR UPDATE"""
# Newest first: each side's index gives its newest rows; merge the two.
LIST_ACCOUNT_TRANSFERS = f"""
    SELECT {TRANSFER_COLUMNS} FROM (
        (SELECT {TRANSFER_COLUMNS} FROM transfers WHERE debit_account_id = %s AND seq < %s
         ORDER BY seq DESC LIMIT %s)
        UNION ALL
        (SELECT {TRANSFER_COLUMNS} FROM transfers WHERE credit_account_id = %s AND seq < %s
         ORDER BY seq DESC LIMIT %s)
    ) AS both_sides ORDER BY seq DESC LIMIT %s"""  # nosec B608 # constants only, no request data


COMMIT = "COMMIT"


def batch(*statements: str) -> str:
    return ";\n".join(statements)


def account_from_row(row: tuple) -> Account:
    return Account(row[0], row[1], row[2], row[3], AccountKind(row[4]), row[5], AccountStatus(row[6]), *row[7:])


def transfer_from_row(row: tuple) -> Transfer:
    return Transfer(*row[:6], TransferStatus(row[6]), *row[7:11], Branch(row[11]))


# SQLSTATE classes and codes after which the same operation may succeed when sent again:
# the connection or the server went away, or the server chose this transaction as a victim.
# Every operation is idempotent or rolled back whole, so the outcome is unknown, never half.
TRANSIENT_SQLSTATE_CLASSES = frozenset({"08"})  # connection exception
TRANSIENT_SQLSTATES = frozenset({
    "40001",  # serialization_failure
    "40P01",  # deadlock_detected
    "55P03",  # lock_not_available
    "57P01",  # admin_shutdown
    "57P02",  # crash_shutdown
    "57P03",  # cannot_connect_now
    "53300",  # too_many_connections
    "53400",  # configuration_limit_exceeded
})
QUERY_CANCELED_SQLSTATE = "57014"  # statement_timeout: our own deadline passed
# A write met a server that takes none: a primary demoted to a standby (in recovery) or made
# read-only (default_transaction_read_only) by a failover. The transaction is rolled back
# whole; the same operation succeeds on the new primary, which a new connection finds (the
# shard's DSN lists every member with target_session_attrs=read-write). The connections the
# pool opened to the old primary are all of the same kind: the pool is drained (Session.run).
READ_ONLY_SQLSTATE = "25006"  # read_only_sql_transaction


# Another process may store one of an operation's keys between its read and its write
# (two copies of one request racing). The operation then plans again and sees that row;
# a race that repeats this often is answered as an outage (retry with the same ids).
KEY_RACE_ATTEMPTS_MAX = 3


class KeyTaken(errors.InternalFault):
    """A unique key another transaction stored first (SQLSTATE 23505). Where a racing copy of
    the same request can cause it (batches, a transfer's begin), the operation plans again
    and sees the stored row; anywhere else it is what its base class says: a fault."""


# A prepared statement (services/storage/prepared.py) the connection no longer has, or whose
# plan a schema change made invalid: that connection is closed (Session.run), and the same
# operation succeeds on a fresh one, which prepares the statements again.
STALE_PREPARED_SQLSTATE = "26000"  # invalid_sql_statement_name
STALE_PLAN_SQLSTATE, STALE_PLAN_MESSAGE = "0A000", "cached plan must not change result type"


def is_stale_prepared_statement(error: psycopg.Error) -> bool:
    return error.sqlstate == STALE_PREPARED_SQLSTATE or (
        error.sqlstate == STALE_PLAN_SQLSTATE and STALE_PLAN_MESSAGE in (error.diag.message_primary or "")
    )


def server_is_read_only(error: psycopg.Error) -> bool:
    return error.sqlstate == READ_ONLY_SQLSTATE


def database_error_is_transient(error: psycopg.Error) -> bool:
    """Whether the same operation may succeed when sent again (see TRANSIENT_SQLSTATES)."""
    sqlstate = error.sqlstate or ""
    return (
        (isinstance(error, psycopg.OperationalError) and not sqlstate) or sqlstate[:2] in TRANSIENT_SQLSTATE_CLASSES
        or sqlstate in TRANSIENT_SQLSTATES or is_stale_prepared_statement(error) or server_is_read_only(error)
    )


def database_error(shard_name: str, error: psycopg.Error) -> errors.LedgerError:
    """The one mapping of database errors: transient (retry), deadline, or a permanent fault.

    A permanent fault is a bug or a broken invariant: it is logged here with the
    database's words, and the client's message names no SQL.
    """
    sqlstate = error.sqlstate or ""
    if isinstance(error, psycopg.errors.UniqueViolation):
        log.info("%s: unique key taken by a racing transaction: %s", shard_name, error.diag.message_detail)
        return KeyTaken(f"{shard_name}: a key of this operation was stored by another one meanwhile", shard=shard_name)
    if sqlstate == QUERY_CANCELED_SQLSTATE:
        return errors.DeadlineExceeded(f"{shard_name}: deadline passed; the outcome may be unknown")
    if database_error_is_transient(error):
        return errors.ShardUnavailable(f"{shard_name} unavailable ({type(error).__name__})", shard=shard_name)
    log.error("%s: permanent database error %s: %s", shard_name, sqlstate or type(error).__name__, error)
    return errors.InternalFault(f"{shard_name} refused the operation ({sqlstate or 'no SQLSTATE'}); nothing was applied", shard=shard_name)


# Transient SQLSTATEs that say another transaction was in the way, not that the shard was.
CONFLICT_SQLSTATES = frozenset({"40001", "40P01", "55P03"})


def error_kind(error: BaseException) -> ErrorKind:
    """What a failed transaction meets, for corebank_shard_errors_total: the same reading as
    database_error's, in four kinds."""
    if isinstance(error, psycopg_pool.PoolTimeout):
        return ErrorKind.UNAVAILABLE
    if isinstance(error, TimeoutError):
        return ErrorKind.TIMEOUT
    if not isinstance(error, psycopg.Error):
        return ErrorKind.OTHER
    sqlstate = error.sqlstate or ""
    if isinstance(error, psycopg.errors.UniqueViolation) or sqlstate in CONFLICT_SQLSTATES:
        return ErrorKind.CONFLICT
    if sqlstate == QUERY_CANCELED_SQLSTATE:
        return ErrorKind.TIMEOUT
    if database_error_is_transient(error):
        return ErrorKind.UNAVAILABLE
    return ErrorKind.OTHER


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
        instruments = metrics.for_shard(self.shard_name)
        try:
            async with asyncio.timeout(timeout_seconds):
                session = Session(self.pool, timeout_seconds)
                await session.connect()
                started = time.perf_counter()
                try:
                    yield session
                finally:
                    # The pool's wait is the pool's figures; this is the shard's own time.
                    instruments.transaction_seconds.observe(time.perf_counter() - started)
                    await session.release()
        except psycopg_pool.PoolTimeout as error:
            instruments.errors[error_kind(error)].inc()
            # The pool logs why it could not connect; the client hears only that it could not.
            raise errors.ShardUnavailable(f"{self.shard_name}: no connection to the shard", shard=self.shard_name) from error
        except TimeoutError as error:
            instruments.errors[error_kind(error)].inc()
            raise errors.DeadlineExceeded(f"{self.shard_name}: deadline passed; the outcome may be unknown") from error
        except psycopg.Error as error:  # the one place database errors are mapped, by SQLSTATE
            instruments.errors[error_kind(error)].inc()
            raise database_error(self.shard_name, error) from error

    async def open_account(self, request: OpenAccountRequest, timeout_seconds: float) -> tuple[Account, bool]:
        async with self.session(timeout_seconds) as session:
            inserted, existing = await session.run(
                session.begin(INSERT_ACCOUNT, SELECT_ACCOUNT, COMMIT),
                [request.account_id, request.request_id, request.owner_id, request.currency, request.kind,
                 request.tier, AccountStatus.ACTIVE, request.collect_on_every_shard, None, request.participant_id, request.account_id],
            )
        # When the id was taken, the INSERT returns nothing and the SELECT the account opened earlier.
        return (account_from_row(inserted[0]), True) if inserted else (account_from_row(existing[0]), False)

    async def open_collection_account(self, merchant: Account, account_id: str, timeout_seconds: float) -> None:
        """The merchant's sub-account on this shard (idempotent): same owner, currency, tier, status
        and participant (a payment it collects is cleared like one to the merchant)."""
        async with self.session(timeout_seconds) as session:
            await session.run(
                session.begin(INSERT_ACCOUNT, COMMIT),
                [account_id, account_id, merchant.owner_id, merchant.currency, merchant.kind, merchant.tier,
                 merchant.status, False, merchant.account_id, merchant.participant_id],
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

    async def close_collection_accounts(self, merchant_id: str, timeout_seconds: float) -> bool:
        """Close the merchant's sub-accounts on this shard if none holds anything; False (and no
        change) if one does. Locked first, so a payment either committed before or is refused."""
        async with self.session(timeout_seconds) as session:
            (subs,) = await session.run(session.begin(LOCK_COLLECTION_ACCOUNTS), [merchant_id])
            if any(holds for _, holds in subs):
                return False
            await session.run(batch(SET_COLLECTION_STATUS, COMMIT), [AccountStatus.CLOSED, merchant_id])
        return True

    async def change_status(
        self, account_id: str, rule: Callable[[Account], AccountStatus], before_commit: Callable[[Account, AccountStatus], Awaitable[None]],
        timeout_seconds: float,
    ) -> Account:
        """Set an account's status under its row lock, held while `before_commit` runs.

        `rule` checks the change (raising its refusal) and names the new status;
        `before_commit` applies it elsewhere first (a collecting merchant's sub-accounts
        on every shard). Holding the row lock serialises every status change of one
        account, so two changes never interleave on its sub-accounts.
        """
        async with self.session(timeout_seconds) as session:
            account = await self.lock_account(session, account_id)
            new_status = rule(account)
            await before_commit(account, new_status)
            if new_status == account.status:
                return account
            (updated,) = await session.run(batch(SET_STATUS, COMMIT), [new_status, account_id])
        return account_from_row(updated[0])

    async def sweepable(self, limit: int, timeout_seconds: float) -> list[tuple[str, str, str, int, int, int]]:
        """(sub-account, merchant, currency, amount to sweep, debits so far, failed sweeps so far)."""
        async with self.session(timeout_seconds) as session:
            (rows,) = await session.run(session.begin(SWEEPABLE, COMMIT), [limit])
        return rows

    async def get_account(self, account_id: str, timeout_seconds: float) -> Account | None:
        async with self.session(timeout_seconds) as session:
            (found,) = await session.run(session.begin(SELECT_ACCOUNT, COMMIT), [account_id])
        return account_from_row(found[0]) if found else None

    async def get_owners(self, account_ids: list[str], timeout_seconds: float) -> list[tuple[str, str, AccountKind, str]]:
        """(account_id, owner_id, kind, participant_id) of each of `account_ids` that exists on this
        shard, in one round trip."""
        async with self.session(timeout_seconds) as session:
            (rows,) = await session.run(session.begin(SELECT_ACCOUNT_OWNERS, COMMIT), [account_ids])
        return [(account_id, owner_id, AccountKind(kind), participant_id) for account_id, owner_id, kind, participant_id in rows]

    async def participant_currency(self, participant_id: str, currency: str, timeout_seconds: float) -> tuple[bool, bool]:
        """(the participant is registered, it has the currency): read on the clearing home shard."""
        async with self.session(timeout_seconds) as session:
            participant, enabled = await session.run(
                session.begin(SELECT_PARTICIPANT, SELECT_PARTICIPANT_CURRENCY, COMMIT), [participant_id, participant_id, currency]
            )
        return bool(participant), bool(enabled)

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


# PostgreSQL's warning when a COMMIT waiting for its synchronous standby is cancelled (here: by
# statement_timeout, our deadline): the transaction "has already committed locally, but might not
# have been replicated to the standby", and the COMMIT answers success. On a primary cut off from
# its replicas (TOPOLOGY=ha) such a commit is lost when another member takes over, so it must not
# be acknowledged: the batch fails as a passed deadline whose outcome is unknown (retry with the
# same ids: the retry finds the transfer, or makes it on the new primary).
SYNC_REPLICATION_CANCELLED_PREFIX = "canceling wait for synchronous replication"


class UnreplicatedCommit(psycopg.errors.QueryCanceled):
    """A commit acknowledged by the primary alone, its wait for a synchronous standby cancelled."""


def _watch_replication_warnings(connection: psycopg.AsyncConnection) -> None:
    def on_notice(diagnostic: psycopg.errors.Diagnostic) -> None:
        if (diagnostic.message_primary or "").startswith(SYNC_REPLICATION_CANCELLED_PREFIX):
            connection._corebank_unreplicated = True  # type: ignore[attr-defined]

    connection.add_notice_handler(on_notice)


def session_cursor(connection: psycopg.AsyncConnection) -> psycopg.AsyncClientCursor:
    """The one client-side cursor of a pooled connection, made when the connection is first lent.

    Made once, not per session: a cursor copies the connection's adapters when it is made, and
    lists (most parameters: the columns of a batch) are bound by FastListDumper
    (array_literal.py) on this cursor only. The connection's automatic prepared statements are
    off: a client-side cursor never uses them (every query text is unique, parameters merged in),
    so psycopg would only count and evict every text it sends. A cursor keeps the rows of its
    last batch until the next one: at most one batch's rows per pooled connection.
    """
    cursor = getattr(connection, "_corebank_session_cursor", None)
    if cursor is None or cursor.closed:
        connection.prepare_threshold = None
        cursor = psycopg.AsyncClientCursor(connection)
        cursor.adapters.register_dumper(list, FastListDumper)
        connection._corebank_session_cursor = cursor  # type: ignore[attr-defined]
        _watch_replication_warnings(connection)
    return cursor


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
        self.cursor = session_cursor(self.connection)

    async def release(self) -> None:
        """Give the connection back to the pool, whatever interrupts the clean-up.

        A cancellation (the caller's deadline, gRPC cancelling the call) may arrive while the
        ROLLBACK is in flight; the connection must still go back, or the pool counts it as
        lent for good and the process ends up with no connection to this shard. The pool
        itself rolls back or discards a connection returned mid-transaction or broken.
        """
        if self.connection is None:
            return
        connection, self.connection = self.connection, None
        try:
            if connection.info.transaction_status in (TransactionStatus.INTRANS, TransactionStatus.INERROR):
                await connection.execute("ROLLBACK")
        finally:
            await asyncio.shield(self.pool.putconn(connection))

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
            except psycopg.Error as error:  # every database error passes on; this only looks for a stale statement or server
                if is_stale_prepared_statement(error):
                    # Closed, so that the pool replaces it with a connection that prepares afresh.
                    await self.connection.close()
                elif server_is_read_only(error):
                    # Not sent again here: the new primary may not be there yet. This call fails as
                    # an outage (retry with the same ids); the next one gets a connection the pool
                    # makes afresh, to whichever member is read-write by then.
                    log.warning("%s: the server took no write (%s); dropping the pool's connections", self.pool.name, error.sqlstate)
                    await self.connection.close()
                    await self.pool.drain()
                raise
        self.batches_sent += 1
        metrics.for_shard(self.pool.name).round_trips.inc()  # pools are named after their shards
        if getattr(self.connection, "_corebank_unreplicated", False):
            # Closed: the pool makes a new connection, to whichever member is the primary then.
            log.warning("%s: a commit's wait for its synchronous standby was cancelled; its outcome is unknown", self.pool.name)
            await self.connection.close()
            raise UnreplicatedCommit("the commit was not confirmed by a synchronous standby; its outcome is unknown")
        row_sets = []
        while True:
            # The result status, not cursor.description (which builds column objects every time).
            if self.cursor.pgresult is not None and self.cursor.pgresult.status == ExecStatus.TUPLES_OK:
                row_sets.append(await self.cursor.fetchall())
            if not self.cursor.nextset():
                return row_sets
