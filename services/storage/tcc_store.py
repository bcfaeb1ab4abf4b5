"""The TCC operations on one shard: the coordinator record (debit shard) and the
participant branches (both shards), each guarded by the insert-only barrier.

Each operation is one local transaction in one or two round trips. Where a write
must only happen if another succeeded (a branch moves only if its barrier row was
new; a decision confirms the debit only if its compare-and-set won), the writes
are chained in one statement of data-modifying CTEs, so no select-then-insert
window exists.
"""

from __future__ import annotations

import dataclasses
import datetime

from services.ledger.accounts import AccountKind, AccountStatus
from services.ledger.coordination import BarrierOperation, CoordinatorState, TryOutcome, refused_outcome
from services.ledger import errors, ids
from services.ledger.limits import TierLimits
from services.ledger.transfers import Branch, Transfer, TransferRequest, TransferStatus
from services.ledger.transfers import clearing_refusal, credit_side_refusal, debit_side_refusal
from services.storage import id_registry
from services.storage.shard_store import KEY_RACE_ATTEMPTS_MAX, COMMIT, LOCK_ACCOUNT, SELECT_TRANSFER, KeyTaken, Session, ShardStore, account_from_row, batch
from services.storage.shard_store import transfer_from_row

DEBIT_BRANCH = int(Branch.DEBIT)
CREDIT_BRANCH = int(Branch.CREDIT)

TCC_COLUMNS = (
    "transfer_id, debit_account_id, credit_account_id, amount_minor, currency, reference, credit_shard, state,"
    " reason, lease_owner, lease_epoch, lease_expires_at, pending_expires_at, attempts, created_at, updated_at,"
    " finalized_at"
)
SELECT_RECORD = f"SELECT {TCC_COLUMNS} FROM tcc_transfers WHERE transfer_id = %s"
LOCK_ACCOUNT_NAMED = "SELECT 1 FROM accounts WHERE account_id = %(account)s FOR UPDATE"
ENSURE_CLEARING_ACCOUNT = f"""
    INSERT INTO accounts (account_id, request_id, owner_id, currency, kind, tier, status)
    VALUES (%s, %s, '{ids.CLEARING_OWNER_ID}', %s, {int(AccountKind.SYSTEM)}, 0, {int(AccountStatus.ACTIVE)})
    ON CONFLICT (account_id) DO NOTHING"""
INSERT_RECORD = f"""
    INSERT INTO tcc_transfers (transfer_id, debit_account_id, credit_account_id, amount_minor, currency, reference,
                               credit_shard, state, reason, lease_owner, lease_expires_at, pending_expires_at, finalized_at)
    VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, now() + make_interval(secs => %s), now() + make_interval(secs => %s),
            CASE WHEN %s THEN now() END)
    RETURNING {TCC_COLUMNS}"""
INSERT_BARRIER = "INSERT INTO tcc_barriers (transfer_id, branch, operation, outcome) VALUES (%s, %s, %s, %s)"
INSERT_BRANCH = """
    INSERT INTO transfers (transfer_id, debit_account_id, credit_account_id, amount_minor, currency, reference,
                           status, reason, branch, clearing_account_id, finalized_at)
    VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, CASE WHEN %s THEN now() END)"""
# A reservation: pending debit on one account, pending credit on the other.
RESERVE = """
    UPDATE accounts SET
        debits_pending_minor = debits_pending_minor + CASE WHEN account_id = %s THEN %s ELSE 0 END,
        credits_pending_minor = credits_pending_minor + CASE WHEN account_id = %s THEN %s ELSE 0 END,
        updated_at = now()
    WHERE account_id IN (%s, %s)"""
TRY_CREDIT_APPLY = f"""
    WITH barrier AS (
        INSERT INTO tcc_barriers (transfer_id, branch, operation, outcome) VALUES (%(id)s, {CREDIT_BRANCH}, '{BarrierOperation.TRY}', '{TryOutcome.APPLIED}')
        ON CONFLICT DO NOTHING RETURNING transfer_id
    ), branch AS (
        INSERT INTO transfers (transfer_id, debit_account_id, credit_account_id, amount_minor, currency, reference,
                               status, branch, clearing_account_id)
        SELECT transfer_id, %(debit)s, %(credit)s, %(amount)s, %(currency)s, %(reference)s,
               {int(TransferStatus.PENDING)}, {CREDIT_BRANCH}, %(clearing)s FROM barrier
        RETURNING transfer_id
    ), reserved AS (
        UPDATE accounts SET
            debits_pending_minor = debits_pending_minor + CASE WHEN account_id = %(clearing)s THEN %(amount)s ELSE 0 END,
            credits_pending_minor = credits_pending_minor + CASE WHEN account_id = %(credit)s THEN %(amount)s ELSE 0 END,
            updated_at = now()
        WHERE account_id IN (%(clearing)s, %(credit)s) AND EXISTS (SELECT 1 FROM branch)
        RETURNING account_id
    )
    SELECT count(*) FROM barrier"""
TRY_CREDIT_REFUSE = f"""
    INSERT INTO tcc_barriers (transfer_id, branch, operation, outcome) VALUES (%(id)s, {CREDIT_BRANCH}, '{BarrierOperation.TRY}', %(outcome)s)
    ON CONFLICT DO NOTHING RETURNING transfer_id"""
SELECT_CREDIT_TRY_OUTCOME = (
    f"SELECT outcome FROM tcc_barriers WHERE transfer_id = %(id)s AND branch = {CREDIT_BRANCH} AND operation = '{BarrierOperation.TRY}'"
)
# A cancel that arrives before its try writes the try's barrier row itself, so the try never applies.
BLOCK_LATE_CREDIT_TRY = f"""
    INSERT INTO tcc_barriers (transfer_id, branch, operation, outcome) VALUES (%(id)s, {CREDIT_BRANCH}, '{BarrierOperation.TRY}', '{TryOutcome.BLOCKED_BY_CANCEL}')
    ON CONFLICT DO NOTHING"""
FINISH_RECORD = f"""
    UPDATE tcc_transfers SET state = %s, finalized_at = now(), updated_at = now()
    WHERE transfer_id = %s AND state = %s AND lease_epoch = %s
    RETURNING {TCC_COLUMNS}"""
RENEW_LEASE = """
    UPDATE tcc_transfers SET lease_expires_at = now() + make_interval(secs => %s), attempts = attempts + 1, updated_at = now()
    WHERE transfer_id = %s AND lease_epoch = %s AND finalized_at IS NULL RETURNING transfer_id"""
CLAIM_EXPIRED = f"""
    UPDATE tcc_transfers SET lease_owner = %s, lease_epoch = lease_epoch + 1, updated_at = now(),
                             lease_expires_at = now() + make_interval(secs => %s)
    WHERE transfer_id IN (SELECT transfer_id FROM tcc_transfers
                          WHERE finalized_at IS NULL AND lease_expires_at < now()
                          ORDER BY lease_expires_at LIMIT %s FOR UPDATE SKIP LOCKED)
    RETURNING {TCC_COLUMNS}"""
# An operator's retry takes the lease whoever holds it; the old owner's next
# compare-and-set fails on the epoch, so it can change nothing any more.
CLAIM_NOW = f"""
    UPDATE tcc_transfers SET lease_owner = %s, lease_epoch = lease_epoch + 1, updated_at = now(),
                             lease_expires_at = now() + make_interval(secs => %s)
    WHERE transfer_id = %s AND finalized_at IS NULL
    RETURNING {TCC_COLUMNS}"""
IN_DOUBT_SUMMARY = """
    SELECT count(*), coalesce(extract(epoch FROM now() - min(created_at)), 0)::float8
    FROM tcc_transfers WHERE finalized_at IS NULL"""
LIST_IN_DOUBT = f"""
    SELECT {TCC_COLUMNS} FROM tcc_transfers WHERE finalized_at IS NULL ORDER BY created_at LIMIT %s"""

# Faults (services/coordinator/driver.py): a decided transfer that cannot be applied is marked,
# so that recovery stops claiming it and an operator sees it; `operator retry` clears the mark.
TCC_COLUMNS_WITH_FAULT = f"{TCC_COLUMNS}, fault"
MARK_FAULTED = """
    UPDATE tcc_transfers SET fault = %s, faulted_at = now(), updated_at = now()
    WHERE transfer_id = %s AND lease_epoch = %s AND finalized_at IS NULL RETURNING transfer_id"""
CLAIM_EXPIRED_UNFAULTED = f"""
    UPDATE tcc_transfers SET lease_owner = %s, lease_epoch = lease_epoch + 1, updated_at = now(),
                             lease_expires_at = now() + make_interval(secs => %s)
    WHERE transfer_id IN (SELECT transfer_id FROM tcc_transfers
                          WHERE finalized_at IS NULL AND lease_expires_at < now() AND faulted_at IS NULL
                          ORDER BY lease_expires_at LIMIT %s FOR UPDATE SKIP LOCKED)
    RETURNING {TCC_COLUMNS}"""
CLAIM_NOW_CLEARING_FAULT = f"""
    UPDATE tcc_transfers SET lease_owner = %s, lease_epoch = lease_epoch + 1, updated_at = now(),
                             lease_expires_at = now() + make_interval(secs => %s), fault = '', faulted_at = NULL
    WHERE transfer_id = %s AND finalized_at IS NULL
    RETURNING {TCC_COLUMNS}"""
LIST_IN_DOUBT_WITH_FAULTS = f"""
    SELECT {TCC_COLUMNS_WITH_FAULT} FROM tcc_transfers WHERE finalized_at IS NULL ORDER BY created_at LIMIT %s"""


def finish_branch_sql(branch: int, operation: BarrierOperation, guarded: bool) -> str:
    """Confirm (post) or cancel (release) one branch's reservation, once: only if its barrier row is new.

    `guarded`: the barrier row is only written if the coordinator's compare-and-set
    (the first CTE, `guard`) wins: decision and debit branch commit together.
    """
    moved_status = TransferStatus.POSTED if operation is BarrierOperation.CONFIRM else TransferStatus.VOIDED
    posts = "true" if operation is BarrierOperation.CONFIRM else "false"
    debited = "debit_account_id" if branch == DEBIT_BRANCH else "clearing_account_id"
    credited = "clearing_account_id" if branch == DEBIT_BRANCH else "credit_account_id"
    guard = (
        f"""guard AS (
            UPDATE tcc_transfers SET state = %(decided_state)s, reason = %(reason)s, updated_at = now()
            WHERE transfer_id = %(id)s AND state = {int(CoordinatorState.TRYING)} AND lease_epoch = %(epoch)s
              AND (%(decided_state)s = {int(CoordinatorState.CANCELLING)} OR pending_expires_at > now())
            RETURNING transfer_id
        ), """
        if guarded
        else ""
    )
    barrier_source = (
        f"SELECT transfer_id, {branch}, '{operation}', '{TryOutcome.DONE}' FROM guard"
        if guarded
        else f"VALUES (%(id)s, {branch}, '{operation}', '{TryOutcome.DONE}')"
    )
    guard_count = "(SELECT count(*) FROM guard)" if guarded else "1"
    return f"""
    WITH {guard}barrier AS (
        INSERT INTO tcc_barriers (transfer_id, branch, operation, outcome) {barrier_source}
        ON CONFLICT DO NOTHING RETURNING transfer_id
    ), moved AS (
        UPDATE transfers SET status = {int(moved_status)}, finalized_at = now()
        WHERE transfer_id = (SELECT transfer_id FROM barrier) AND status = 1 AND branch = {branch}
        RETURNING {debited} AS debited, {credited} AS credited, amount_minor
    ), counters AS (
        UPDATE accounts a SET
            debits_pending_minor = a.debits_pending_minor - CASE WHEN a.account_id = m.debited THEN m.amount_minor ELSE 0 END,
            credits_pending_minor = a.credits_pending_minor - CASE WHEN a.account_id = m.credited THEN m.amount_minor ELSE 0 END,
            debits_posted_minor = a.debits_posted_minor
                + CASE WHEN {posts} AND a.account_id = m.debited THEN m.amount_minor ELSE 0 END,
            credits_posted_minor = a.credits_posted_minor
                + CASE WHEN {posts} AND a.account_id = m.credited THEN m.amount_minor ELSE 0 END,
            updated_at = now()
        FROM moved m WHERE a.account_id IN (m.debited, m.credited)
        RETURNING a.account_id
    )
    SELECT {guard_count}, (SELECT count(*) FROM barrier), (SELECT count(*) FROM moved)"""


@dataclasses.dataclass(frozen=True)
class TccRecord:
    transfer_id: str
    debit_account_id: str
    credit_account_id: str
    amount_minor: int
    currency: str
    reference: str
    credit_shard: str
    state: CoordinatorState
    reason: str
    lease_owner: str
    lease_epoch: int
    lease_expires_at: datetime.datetime
    pending_expires_at: datetime.datetime
    attempts: int
    created_at: datetime.datetime
    updated_at: datetime.datetime
    finalized_at: datetime.datetime | None
    # A permanent fault met while driving it (tcc_transfers.fault); only the queries that
    # select it (TCC_COLUMNS_WITH_FAULT) fill it in, the others leave it empty.
    fault: str = ""

    @property
    def request(self) -> TransferRequest:
        return TransferRequest(
            self.transfer_id, self.debit_account_id, self.credit_account_id, self.amount_minor, self.currency, self.reference
        )

    def as_transfer(self) -> Transfer:
        """The transfer as clients see it: one record, PENDING until final."""
        status = {
            CoordinatorState.POSTED: TransferStatus.POSTED,
            CoordinatorState.REJECTED: TransferStatus.REJECTED,
            CoordinatorState.VOIDED: TransferStatus.VOIDED,
        }.get(self.state, TransferStatus.PENDING)
        return Transfer(
            self.transfer_id, self.debit_account_id, self.credit_account_id, self.amount_minor, self.currency,
            self.reference, status, self.reason, 0, self.created_at, self.finalized_at,
        )


def record_from_row(row: tuple) -> TccRecord:
    return TccRecord(*row[:7], CoordinatorState(row[7]), *row[8:])


@dataclasses.dataclass(frozen=True)
class Begun:
    """What starting a transfer between shards found or did on the debit shard."""

    record: TccRecord | None  # None when the transfer_id belongs to a same-shard transfer
    created: bool
    fresh_refusal: errors.LedgerError | None = None
    same_shard_transfer: Transfer | None = None


@dataclasses.dataclass(frozen=True)
class BranchResult:
    won: bool  # the coordinator's compare-and-set (always True for unguarded operations)
    barrier_new: bool  # False: this operation had already been done
    moved: bool  # the branch's reservation was posted or released by this call


class TccStore:
    """The TCC operations of one shard (wraps its ShardStore's connections)."""

    def __init__(self, store: ShardStore) -> None:
        self.store = store
        self.shard_name = store.shard_name
        self._clearing_accounts_known: set[str] = set()

    async def _ensure_clearing(self, session: Session, clearing_account_id: str, currency: str) -> None:
        # Opened on first use; cached per process so the hot path pays for it once.
        if clearing_account_id not in self._clearing_accounts_known:
            await session.run(ENSURE_CLEARING_ACCOUNT, [clearing_account_id, clearing_account_id, currency])
            self._clearing_accounts_known.add(clearing_account_id)

    async def begin(
        self, request: TransferRequest, credit_shard: str, clearing_account_id: str, limits: TierLimits,
        owner: str, lease_seconds: float, pending_timeout_seconds: float, timeout_seconds: float,
        register_id_here: bool = False,
    ) -> Begun:
        """Create the coordinator record and try the debit branch, in one local transaction.

        Two copies of one request racing here both find no record; the slower one's insert
        meets the faster one's key and rolls back, and its next attempt finds the record.
        """
        for _ in range(KEY_RACE_ATTEMPTS_MAX):
            try:
                return await self._begin_once(
                    request, credit_shard, clearing_account_id, limits, owner, lease_seconds, pending_timeout_seconds, timeout_seconds,
                    register_id_here,
                )
            except KeyTaken:
                continue
        raise errors.ShardUnavailable(
            f"{self.shard_name}: transfer {request.transfer_id} kept racing with another copy of it; retry", shard=self.shard_name
        )

    async def _begin_once(
        self, request: TransferRequest, credit_shard: str, clearing_account_id: str, limits: TierLimits,
        owner: str, lease_seconds: float, pending_timeout_seconds: float, timeout_seconds: float,
        register_id_here: bool,
    ) -> Begun:
        statements = [LOCK_ACCOUNT, LOCK_ACCOUNT, SELECT_RECORD, SELECT_TRANSFER]
        params = [request.debit_account_id, clearing_account_id, request.transfer_id, request.transfer_id]
        if register_id_here:
            # This shard is the id's registry home: registered in the same transaction (and after
            # the locks: a transaction that holds a registry key waits for no lock).
            registration = id_registry.transfer_registration(request)
            statements += [id_registry.REGISTER, id_registry.SELECT_REGISTERED]
            params += id_registry.register_params([registration])
        async with self.store.session(timeout_seconds) as session:
            await self._ensure_clearing(session, clearing_account_id, request.currency)
            # The customer row before the clearing row, as every transaction locks them.
            locked, clearing, record, local, *registered = await session.run(session.begin(*statements), params)
            if register_id_here:
                first_use = id_registry.first_uses(registered[0])[(int(registration.namespace), registration.id)]
                conflict = ids.conflict_with_first_use("transfer_id", request.transfer_id, first_use, registration.fields)
                if conflict is not None:
                    raise conflict
            if record:
                return Begun(record_from_row(record[0]), created=False)
            if local:
                return Begun(None, created=False, same_shard_transfer=transfer_from_row(local[0]))
            # Everything that could refuse this branch is checked now, the clearing account
            # (credited here) included, so that its confirm can never fail for a business reason.
            refusal = debit_side_refusal(request, account_from_row(locked[0]) if locked else None, limits) or (
                clearing_refusal(request, account_from_row(clearing[0]), credited=True)
            )
            refused = refusal is not None
            state = CoordinatorState.REJECTED if refused else CoordinatorState.TRYING
            reason = refusal.reason if refused else ""
            amount = request.amount_minor
            statements = [INSERT_RECORD, INSERT_BARRIER, INSERT_BRANCH]
            params = [
                request.transfer_id, request.debit_account_id, request.credit_account_id, amount, request.currency,
                request.reference, credit_shard, state, reason, owner, lease_seconds, pending_timeout_seconds, refused,
                request.transfer_id, DEBIT_BRANCH, BarrierOperation.TRY, refused_outcome(reason) if refused else TryOutcome.APPLIED,
                request.transfer_id, request.debit_account_id, request.credit_account_id, amount, request.currency,
                request.reference, TransferStatus.REJECTED if refused else TransferStatus.PENDING, reason, DEBIT_BRANCH,
                clearing_account_id, refused,
            ]
            if not refused:
                statements.append(RESERVE)
                params += [request.debit_account_id, amount, clearing_account_id, amount, request.debit_account_id, clearing_account_id]
            (inserted,) = await session.run(batch(*statements, COMMIT), params)
        return Begun(record_from_row(inserted[0]), created=True, fresh_refusal=refusal)

    async def try_credit(
        self, record: TccRecord, clearing_account_id: str, limits: TierLimits, timeout_seconds: float
    ) -> str:
        """The credit branch's try: its stored barrier outcome (TryOutcome, a refusal with its reason)."""
        request = record.request
        async with self.store.session(timeout_seconds) as session:
            await self._ensure_clearing(session, clearing_account_id, record.currency)
            credit = await ShardStore.lock_account(session, record.credit_account_id, must_exist=False)
            clearing = await ShardStore.lock_account(session, clearing_account_id)
            # The clearing account (debited here) is checked too: confirm can then never fail.
            refusal = credit_side_refusal(request, credit, limits) or clearing_refusal(request, clearing, credited=False)
            params = {
                "id": record.transfer_id, "debit": record.debit_account_id, "credit": record.credit_account_id,
                "amount": record.amount_minor, "currency": record.currency, "reference": record.reference,
                "clearing": clearing_account_id, "outcome": refused_outcome(refusal.reason) if refusal else TryOutcome.APPLIED,
            }
            # Either way the barrier row decides: if it was already there, its outcome stands.
            (_, outcome) = await session.run(
                batch(TRY_CREDIT_APPLY if refusal is None else TRY_CREDIT_REFUSE, SELECT_CREDIT_TRY_OUTCOME, COMMIT), params
            )
        return outcome[0][0]

    async def decide(self, record: TccRecord, confirm: bool, reason: str, timeout_seconds: float) -> BranchResult:
        """Record the decision and confirm or cancel the debit branch: one local transaction, one round trip."""
        async with self.store.session(timeout_seconds) as session:
            _, counts = await session.run(
                session.begin(
                    LOCK_ACCOUNT_NAMED,  # the customer row before the clearing row, as every transaction does
                    finish_branch_sql(DEBIT_BRANCH, BarrierOperation.CONFIRM if confirm else BarrierOperation.CANCEL, guarded=True),
                    COMMIT,
                ),
                {
                    "id": record.transfer_id, "epoch": record.lease_epoch, "reason": reason, "account": record.debit_account_id,
                    "decided_state": int(CoordinatorState.CONFIRMING if confirm else CoordinatorState.CANCELLING),
                },
            )
        return BranchResult(*(count > 0 for count in counts[0]))

    async def finish_credit(self, record: TccRecord, confirm: bool, timeout_seconds: float) -> BranchResult:
        """Confirm or cancel the credit branch in one round trip; a cancel before the try blocks the try for good."""
        statements = [LOCK_ACCOUNT_NAMED]
        if not confirm:
            statements.append(BLOCK_LATE_CREDIT_TRY)
        statements.append(finish_branch_sql(CREDIT_BRANCH, BarrierOperation.CONFIRM if confirm else BarrierOperation.CANCEL, guarded=False))
        async with self.store.session(timeout_seconds) as session:
            _, counts = await session.run(
                session.begin(*statements, COMMIT), {"id": record.transfer_id, "account": record.credit_account_id}
            )
        return BranchResult(*(count > 0 for count in counts[0]))

    async def finish_record(self, record: TccRecord, final_state: CoordinatorState, timeout_seconds: float) -> TccRecord | None:
        """CAS the record to its final state; None if this driver no longer owns it."""
        async with self.store.session(timeout_seconds) as session:
            (finished,) = await session.run(
                session.begin(FINISH_RECORD, COMMIT),
                [final_state, record.transfer_id, record.state, record.lease_epoch],
            )
        return record_from_row(finished[0]) if finished else None

    async def renew_lease(self, record: TccRecord, lease_seconds: float, timeout_seconds: float) -> bool:
        async with self.store.session(timeout_seconds) as session:
            (renewed,) = await session.run(
                session.begin(RENEW_LEASE, COMMIT), [lease_seconds, record.transfer_id, record.lease_epoch]
            )
        return bool(renewed)

    async def find(self, transfer_id: str, timeout_seconds: float) -> tuple[TccRecord | None, Transfer | None]:
        """This shard's coordinator record and local transfer row for the id, in one round trip."""
        async with self.store.session(timeout_seconds) as session:
            record, local = await session.run(session.begin(SELECT_RECORD, SELECT_TRANSFER, COMMIT), [transfer_id, transfer_id])
        return (record_from_row(record[0]) if record else None), (transfer_from_row(local[0]) if local else None)

    async def get_record(self, transfer_id: str, timeout_seconds: float) -> TccRecord | None:
        async with self.store.session(timeout_seconds) as session:
            (found,) = await session.run(session.begin(SELECT_RECORD, COMMIT), [transfer_id])
        return record_from_row(found[0]) if found else None

    async def claim_expired(self, owner: str, lease_seconds: float, batch_size: int, timeout_seconds: float) -> list[TccRecord]:
        async with self.store.session(timeout_seconds) as session:
            (claimed,) = await session.run(session.begin(CLAIM_EXPIRED, COMMIT), [owner, lease_seconds, batch_size])
        return [record_from_row(row) for row in claimed]

    async def claim_now(self, transfer_id: str, owner: str, lease_seconds: float, timeout_seconds: float) -> TccRecord | None:
        async with self.store.session(timeout_seconds) as session:
            (claimed,) = await session.run(session.begin(CLAIM_NOW, COMMIT), [owner, lease_seconds, transfer_id])
        return record_from_row(claimed[0]) if claimed else None

    async def in_doubt_summary(self, timeout_seconds: float) -> tuple[int, float]:
        """How many transfers are not final here, and the age in seconds of the oldest."""
        async with self.store.session(timeout_seconds) as session:
            (row,) = await session.run(session.begin(IN_DOUBT_SUMMARY, COMMIT))
        return row[0][0], row[0][1]

    async def list_in_doubt(self, limit: int, timeout_seconds: float) -> list[TccRecord]:
        async with self.store.session(timeout_seconds) as session:
            (rows,) = await session.run(session.begin(LIST_IN_DOUBT, COMMIT), [limit])
        return [record_from_row(row) for row in rows]

    async def mark_faulted(self, record: TccRecord, fault: str, timeout_seconds: float) -> bool:
        """Record a permanent fault; False if this driver no longer owns the record."""
        async with self.store.session(timeout_seconds) as session:
            (marked,) = await session.run(session.begin(MARK_FAULTED, COMMIT), [fault, record.transfer_id, record.lease_epoch])
        return bool(marked)

    async def claim_expired_unfaulted(
        self, owner: str, lease_seconds: float, batch_size: int, timeout_seconds: float
    ) -> list[TccRecord]:
        """Like claim_expired, but never a faulted record: recovery must not loop on one silently."""
        async with self.store.session(timeout_seconds) as session:
            (claimed,) = await session.run(session.begin(CLAIM_EXPIRED_UNFAULTED, COMMIT), [owner, lease_seconds, batch_size])
        return [record_from_row(row) for row in claimed]

    async def claim_now_clearing_fault(
        self, transfer_id: str, owner: str, lease_seconds: float, timeout_seconds: float
    ) -> TccRecord | None:
        async with self.store.session(timeout_seconds) as session:
            (claimed,) = await session.run(session.begin(CLAIM_NOW_CLEARING_FAULT, COMMIT), [owner, lease_seconds, transfer_id])
        return record_from_row(claimed[0]) if claimed else None

    async def list_in_doubt_with_faults(self, limit: int, timeout_seconds: float) -> list[TccRecord]:
        async with self.store.session(timeout_seconds) as session:
            (rows,) = await session.run(session.begin(LIST_IN_DOUBT_WITH_FAULTS, COMMIT), [limit])
        return [record_from_row(row) for row in rows]
