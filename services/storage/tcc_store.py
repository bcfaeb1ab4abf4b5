"""The TCC operations on one shard: the coordinator record (debit shard) and the
participant branches (both shards), each guarded by the insert-only barrier.

The protocol (services/coordinator/state_machine.py) has three local transactions:
begin (record + debit try, on the debit shard), settle_credit (the credit branch
tried and confirmed at once: its commit, recorded by the credit try's barrier row, is
the decision) and settle_debit (the record final + the debit branch's confirm or
cancel). block_credit stores a cancel in the credit try's place, so a late try never
applies. Each operation takes a list of items and applies them in one transaction of
one or two round trips (group commit per shard and phase, coordinator/wiring.py);
every item keeps its own barrier rows and outcome, and a refusal of one never fails
another. Where a write must only happen if another succeeded (a branch moves only if
the record's compare-and-set won and its barrier row was new), the writes are chained
in one statement of data-modifying CTEs, so no select-then-insert window exists.
"""

from __future__ import annotations

import dataclasses
import datetime

from services.ledger.accounts import Account, AccountKind, AccountStatus
from services.ledger.coordination import BarrierOperation, CancelCause, CoordinatorState, TryOutcome, blocked_outcome, refused_outcome
from services.ledger import clearing, errors, ids
from services.ledger.limits import TierLimits
from services.ledger.transfers import Branch, Transfer, TransferRequest, TransferStatus
from services.ledger.transfers import clearing_refusal, credit_side_refusal, debit_side_refusal
from services.storage import id_registry, positions
from services.storage.batch_posting import APPLY_BALANCE_CHANGES, LOCK_ACCOUNTS, SELECT_TRANSFERS as SELECT_LOCAL_TRANSFERS
from services.storage.prepared import prepared
from services.storage.shard_store import COMMIT, KEY_RACE_ATTEMPTS_MAX, SELECT_TRANSFER, KeyTaken
from services.storage.shard_store import Session, ShardStore, account_from_row, batch, transfer_from_row

DEBIT_BRANCH = int(Branch.DEBIT)
CREDIT_BRANCH = int(Branch.CREDIT)

TCC_COLUMNS = (
    "transfer_id, debit_account_id, credit_account_id, amount_minor, currency, reference, credit_shard, state,"
    " reason, lease_owner, lease_epoch, lease_expires_at, pending_expires_at, attempts, created_at, updated_at,"
    " finalized_at, payer_participant_id, payee_participant_id"
)
SELECT_NOW = "SELECT now()"
SELECT_RECORD = prepared("select_record", f"SELECT {TCC_COLUMNS} FROM tcc_transfers WHERE transfer_id = %s")  # nosec B608 # constants only, no request data
ENSURE_CLEARING_ACCOUNTS = f"""
    INSERT INTO accounts (account_id, request_id, owner_id, currency, kind, tier, status)
    SELECT id, id, '{ids.CLEARING_OWNER_ID}', currency, {int(AccountKind.SYSTEM)}, 0, {int(AccountStatus.ACTIVE)}
    FROM unnest(%s::text[], %s::text[]) AS clearing(id, currency)
    ON CONFLICT (account_id) DO NOTHING"""  # nosec B608 # constants only, no request data
SELECT_RECORDS = prepared("select_records", f"SELECT {TCC_COLUMNS} FROM tcc_transfers WHERE transfer_id = ANY(%s)")  # nosec B608 # constants only, no request data
INSERT_RECORDS = prepared("insert_records", f"""
    INSERT INTO tcc_transfers (transfer_id, debit_account_id, credit_account_id, amount_minor, currency, reference,
                               credit_shard, state, reason, lease_owner, lease_expires_at, pending_expires_at, finalized_at,
                               payer_participant_id, payee_participant_id)
    SELECT id, debit, credit, amount, currency, reference, credit_shard, state, reason, owner,
           now() + make_interval(secs => lease_seconds), now() + make_interval(secs => pending_seconds),
           CASE WHEN final THEN now() END, payer, payee
    FROM unnest(%s::text[], %s::text[], %s::text[], %s::bigint[], %s::text[], %s::text[], %s::text[], %s::smallint[],
                %s::text[], %s::text[], %s::float8[], %s::float8[], %s::bool[], %s::text[], %s::text[])
         AS record(id, debit, credit, amount, currency, reference, credit_shard, state, reason, owner,
                   lease_seconds, pending_seconds, final, payer, payee)
    RETURNING {TCC_COLUMNS}""")  # nosec B608 # constants only, no request data
INSERT_BARRIERS = prepared("insert_barriers", """
    INSERT INTO tcc_barriers (transfer_id, branch, operation, outcome)
    SELECT * FROM unnest(%s::text[], %s::smallint[], %s::text[], %s::text[])""")
INSERT_BRANCHES = prepared("insert_branches", """
    INSERT INTO transfers (transfer_id, debit_account_id, credit_account_id, amount_minor, currency, reference,
                           status, reason, branch, clearing_account_id, finalized_at, payer_participant_id, payee_participant_id)
    SELECT id, debit, credit, amount, currency, reference, status, reason, branch, clearing, CASE WHEN final THEN now() END,
           payer, payee
    FROM unnest(%s::text[], %s::text[], %s::text[], %s::bigint[], %s::text[], %s::text[], %s::smallint[], %s::text[],
                %s::smallint[], %s::text[], %s::bool[], %s::text[], %s::text[])
         AS branch_row(id, debit, credit, amount, currency, reference, status, reason, branch, clearing, final, payer, payee)""")
# Reservations, summed per account by the caller: pending debits and pending credits.
RESERVE = prepared("reserve", """
    UPDATE accounts SET debits_pending_minor = debits_pending_minor + change.debits,
                        credits_pending_minor = credits_pending_minor + change.credits, updated_at = now()
    FROM unnest(%s::text[], %s::bigint[], %s::bigint[]) AS change(account_id, debits, credits)
    WHERE accounts.account_id = change.account_id""")
SELECT_CREDIT_TRY_OUTCOMES = prepared("select_credit_try_outcomes", f"""
    SELECT transfer_id, outcome FROM tcc_barriers
    WHERE transfer_id = ANY(%s) AND branch = {CREDIT_BRANCH} AND operation = '{BarrierOperation.TRY}'""")  # nosec B608 # constants only, no request data
# A cancel stored in the credit try's place (the try then never applies), unless the try came first.
BLOCK_CREDIT_TRIES = prepared("block_credit_tries", f"""
    INSERT INTO tcc_barriers (transfer_id, branch, operation, outcome)
    SELECT id, {CREDIT_BRANCH}, '{BarrierOperation.TRY}', outcome FROM unnest(%s::text[], %s::text[]) AS blocked(id, outcome)
    ON CONFLICT DO NOTHING""")  # nosec B608 # constants only, no request data
# The debit branches' accounts (customer and clearing), locked before the settle changes them.
LOCK_DEBIT_BRANCH_ACCOUNTS = prepared("lock_debit_branch_accounts", f"""
    SELECT 1 FROM accounts WHERE account_id IN (
        SELECT unnest(%(customers)s::text[])
        UNION SELECT clearing_account_id FROM transfers WHERE transfer_id = ANY(%(ids)s) AND branch = {DEBIT_BRANCH}
    ) ORDER BY account_id FOR UPDATE""")  # nosec B608 # constants only, no request data
RENEW_LEASE = prepared("renew_lease", """
    UPDATE tcc_transfers SET lease_expires_at = now() + make_interval(secs => %s), attempts = attempts + 1, updated_at = now()
    WHERE transfer_id = %s AND lease_epoch = %s AND finalized_at IS NULL RETURNING transfer_id""")
CLAIM_EXPIRED = f"""
    UPDATE tcc_transfers SET lease_owner = %s, lease_epoch = lease_epoch + 1, updated_at = now(),
                             lease_expires_at = now() + make_interval(secs => %s)
    WHERE transfer_id IN (SELECT transfer_id FROM tcc_transfers
                          WHERE finalized_at IS NULL AND lease_expires_at < now()
                          ORDER BY lease_expires_at LIMIT %s FOR UPDATE SKIP LOCKED)
    RETURNING {TCC_COLUMNS}"""  # nosec B608 # constants only, no request data
# An operator's retry takes the lease whoever holds it; the old owner's next
# compare-and-set fails on the epoch, so it can change nothing any more.
CLAIM_NOW = f"""
    UPDATE tcc_transfers SET lease_owner = %s, lease_epoch = lease_epoch + 1, updated_at = now(),
                             lease_expires_at = now() + make_interval(secs => %s)
    WHERE transfer_id = %s AND finalized_at IS NULL
    RETURNING {TCC_COLUMNS}"""  # nosec B608 # constants only, no request data
IN_DOUBT_SUMMARY = """
    SELECT count(*), coalesce(extract(epoch FROM now() - min(created_at)), 0)::float8
    FROM tcc_transfers WHERE finalized_at IS NULL"""
LIST_IN_DOUBT = f"""
    SELECT {TCC_COLUMNS} FROM tcc_transfers WHERE finalized_at IS NULL ORDER BY created_at LIMIT %s"""  # nosec B608 # constants only, no request data

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
    RETURNING {TCC_COLUMNS}"""  # nosec B608 # constants only, no request data
CLAIM_NOW_CLEARING_FAULT = f"""
    UPDATE tcc_transfers SET lease_owner = %s, lease_epoch = lease_epoch + 1, updated_at = now(),
                             lease_expires_at = now() + make_interval(secs => %s), fault = '', faulted_at = NULL
    WHERE transfer_id = %s AND finalized_at IS NULL
    RETURNING {TCC_COLUMNS}"""  # nosec B608 # constants only, no request data
LIST_IN_DOUBT_WITH_FAULTS = f"""
    SELECT {TCC_COLUMNS_WITH_FAULT} FROM tcc_transfers WHERE finalized_at IS NULL ORDER BY created_at LIMIT %s"""  # nosec B608 # constants only, no request data


def _settle_debits_sql() -> str:
    """Per record: CAS (TRYING, lease epoch) -> its final state, and confirm (post) or cancel
    (release) its debit branch's reservation, once: only if the CAS won and the branch's
    barrier row is new. One row per record: (id, barrier new, moved, the final record's
    columns, or NULLs where the CAS lost). Each account's counters change once, by the sum
    of its branches.
    """
    confirm = BarrierOperation.CONFIRM.value
    record_columns = [column.strip() for column in TCC_COLUMNS.split(",")]
    return f"""
    WITH op AS (
        SELECT * FROM unnest(%(ids)s::text[], %(operations)s::text[], %(epochs)s::bigint[], %(reasons)s::text[],
                             %(final_states)s::smallint[]) AS op(id, operation, epoch, reason, final_state)
    ), guard AS (
        UPDATE tcc_transfers t SET state = op.final_state, reason = op.reason, finalized_at = now(), updated_at = now()
        FROM op WHERE t.transfer_id = op.id AND t.state = {int(CoordinatorState.TRYING)} AND t.lease_epoch = op.epoch
        RETURNING op.id, op.operation, {", ".join(f"t.{column}" for column in record_columns)}
    ), barrier AS (
        INSERT INTO tcc_barriers (transfer_id, branch, operation, outcome)
        SELECT id, {DEBIT_BRANCH}, operation, '{TryOutcome.DONE}' FROM guard
        ON CONFLICT DO NOTHING RETURNING transfer_id AS id, operation
    ), moved AS (
        UPDATE transfers t SET status = CASE WHEN barrier.operation = '{confirm}'
                THEN {int(TransferStatus.POSTED)} ELSE {int(TransferStatus.VOIDED)} END, finalized_at = now(),
            -- A cleared transfer (its debit branch names its payer) joins the window open now.
            window_id = CASE WHEN barrier.operation = '{confirm}' AND t.payer_participant_id IS NOT NULL THEN %(window_id)s::bigint END
        FROM barrier WHERE t.transfer_id = barrier.id AND t.status = {int(TransferStatus.PENDING)} AND t.branch = {DEBIT_BRANCH}
        RETURNING t.transfer_id AS id, t.debit_account_id AS debited, t.clearing_account_id AS credited, t.amount_minor AS amount,
                  barrier.operation = '{confirm}' AS posts
    ), change AS (
        SELECT account_id, sum(pending_debits)::bigint AS pending_debits, sum(pending_credits)::bigint AS pending_credits,
               sum(posted_debits)::bigint AS posted_debits, sum(posted_credits)::bigint AS posted_credits
        FROM (
            SELECT debited AS account_id, amount AS pending_debits, 0 AS pending_credits,
                   CASE WHEN posts THEN amount ELSE 0 END AS posted_debits, 0 AS posted_credits FROM moved
            UNION ALL
            SELECT credited, 0, amount, 0, CASE WHEN posts THEN amount ELSE 0 END FROM moved
        ) AS side GROUP BY account_id
    ), counters AS (
        UPDATE accounts a SET
            debits_pending_minor = a.debits_pending_minor - change.pending_debits,
            credits_pending_minor = a.credits_pending_minor - change.pending_credits,
            debits_posted_minor = a.debits_posted_minor + change.posted_debits,
            credits_posted_minor = a.credits_posted_minor + change.posted_credits,
            updated_at = now()
        FROM change WHERE a.account_id = change.account_id
        RETURNING a.account_id
    )
    SELECT op.id, barrier.id IS NOT NULL, moved.id IS NOT NULL, {", ".join(f"guard.{column}" for column in record_columns)}
    FROM op LEFT JOIN guard ON guard.id = op.id LEFT JOIN barrier ON barrier.id = op.id LEFT JOIN moved ON moved.id = op.id"""  # nosec B608 # constants only, no request data


SETTLE_DEBITS = prepared("settle_debits", _settle_debits_sql())


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
    # The participants of its accounts when it began (None: a record from before clearing, or
    # a payee unknown then). Its credit branch refuses an account of another participant.
    payer_participant_id: str | None = None
    payee_participant_id: str | None = None

    @property
    def cleared(self) -> tuple[str, str] | None:
        """(payer, payee) when the transfer is cleared: its debit try reserved on the payer's share."""
        return clearing.cleared_between(self.debit_account_id, self.payer_participant_id, self.credit_account_id, self.payee_participant_id)

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


# Where the columns after the record's own sit in a row of TCC_COLUMNS (and TCC_COLUMNS_WITH_FAULT).
_PARTICIPANTS_AT = len(TCC_COLUMNS.split(",")) - 2


def record_from_row(row: tuple) -> TccRecord:
    payer, payee = row[_PARTICIPANTS_AT], row[_PARTICIPANTS_AT + 1]
    fault = row[_PARTICIPANTS_AT + 2] if len(row) > _PARTICIPANTS_AT + 2 else ""
    return TccRecord(*row[:7], CoordinatorState(row[7]), *row[8:_PARTICIPANTS_AT], fault, payer, payee)


@dataclasses.dataclass(frozen=True)
class Begun:
    """What starting a transfer between shards found or did on the debit shard."""

    record: TccRecord | None  # None when the transfer_id belongs to a same-shard transfer
    created: bool
    fresh_refusal: errors.LedgerError | None = None
    same_shard_transfer: Transfer | None = None
    # Nothing recorded: the payer's share lacks headroom; (participant_id, currency, amount):
    # rebalance, then begin again with the request final for the cap.
    needs_headroom: tuple[str, str, int] | None = None


@dataclasses.dataclass(frozen=True)
class BranchResult:
    won: bool  # the coordinator's compare-and-set (always True for unguarded operations)
    barrier_new: bool  # False: this operation had already been done
    moved: bool  # the branch's reservation was posted or released by this call


@dataclasses.dataclass(frozen=True)
class BeginItem:
    """Start a transfer between shards: its record and its debit try (on the debit shard)."""

    request: TransferRequest
    credit_shard: str
    clearing_account_id: str
    owner: str
    lease_seconds: float
    pending_timeout_seconds: float
    # This shard is the transfer id's registry home: register it in the same transaction.
    register_id_here: bool = False

    @property
    def transfer_id(self) -> str:
        return self.request.transfer_id

    @property
    def payee_participant_id(self) -> str | None:
        """The credited account's participant as the service looked it up (TransferRequest's)."""
        return self.request.payee_participant_id


@dataclasses.dataclass(frozen=True)
class _RecordItem:
    """An operation on a transfer that has its record already."""

    record: TccRecord

    @property
    def transfer_id(self) -> str:
        return self.record.transfer_id


@dataclasses.dataclass(frozen=True)
class SettleCreditItem(_RecordItem):
    """Try and confirm a credit branch in one local transaction (on the credit shard)."""

    clearing_account_id: str


@dataclasses.dataclass(frozen=True)
class BlockCreditItem(_RecordItem):
    """Store a cancel, with its cause, in a credit try's place (on the credit shard)."""

    cause: CancelCause


@dataclasses.dataclass(frozen=True)
class SettleDebitItem(_RecordItem):
    """Finish a record with its debit branch: confirm to POSTED, or cancel to REJECTED or VOIDED."""

    final_state: CoordinatorState
    reason: str = ""

    @property
    def confirm(self) -> bool:
        return self.final_state is CoordinatorState.POSTED


@dataclasses.dataclass(frozen=True)
class Settled:
    """What settling a record did: the final record (None if its compare-and-set lost) and its debit branch."""

    record: TccRecord | None
    branch: BranchResult


def _rounds(items: list) -> list[list[int]]:
    """Indexes of the items in rounds whose transfer ids are distinct: one transaction never
    holds one transfer twice (a set-based statement would apply it once and answer twice)."""
    rounds: list[list[int]] = []
    placed: list[set[str]] = []
    for index, item in enumerate(items):
        for members, round_ in zip(placed, rounds):
            if item.transfer_id not in members:
                members.add(item.transfer_id)
                round_.append(index)
                break
        else:
            placed.append({item.transfer_id})
            rounds.append([index])
    return rounds


def _columns(rows: list[tuple]) -> list[list]:
    return [list(column) for column in zip(*rows)]


# The counters a planned change moves (_plan).
RESERVED_COUNTERS, POSTED_COUNTERS = "pending", "posted"


def _plan(accounts: dict[str, Account], changes: dict[str, list[int]], account_id: str, debits: int, credits: int, counters: str) -> None:
    """A change planned in this transaction to an account's `counters` ("pending": a reservation,
    RESERVE; "posted": a posting, APPLY_BALANCE_CHANGES): the tentative account state for the
    next item's rules, and the summed change the statement writes."""
    account = accounts[account_id]
    debits_field, credits_field = f"debits_{counters}_minor", f"credits_{counters}_minor"
    accounts[account_id] = dataclasses.replace(
        account, **{debits_field: getattr(account, debits_field) + debits, credits_field: getattr(account, credits_field) + credits}
    )
    change = changes.setdefault(account_id, [0, 0])
    change[0] += debits
    change[1] += credits


def _changes_statement(statement: str, changes: dict[str, list[int]]) -> tuple[list[str], list]:
    """RESERVE or APPLY_BALANCE_CHANGES with the summed changes, or nothing when there are none."""
    if not changes:
        return [], []
    return [statement], _columns([(account_id, debits, credits) for account_id, (debits, credits) in sorted(changes.items())])


class TccStore:
    """The TCC operations of one shard (wraps its ShardStore's connections).

    Each branch operation takes a list of items and applies them in one local transaction
    (group commit for branch operations); each item keeps its own barrier rows and its own
    outcome, and a refusal of one never fails another. The single-item methods are the
    same operations on one item.
    """

    def __init__(self, store: ShardStore) -> None:
        self.store = store
        self.shard_name = store.shard_name
        self._clearing_accounts_known: set[str] = set()

    async def _ensure_clearing(self, session: Session, clearing_accounts: set[tuple[str, str]]) -> None:
        """Open (clearing account id, currency) pairs on first use; cached per process so the hot path pays once."""
        unknown = sorted(pair for pair in clearing_accounts if pair[0] not in self._clearing_accounts_known)
        if unknown:
            await session.run(ENSURE_CLEARING_ACCOUNTS, _columns(unknown))
            self._clearing_accounts_known.update(account_id for account_id, _ in unknown)

    async def _in_rounds(self, items: list, once, timeout_seconds: float) -> list:
        """Run `once` on rounds of distinct transfer ids; a unique key a racing copy stored
        first (KeyTaken) plans the round again, and then sees that row."""
        results: list = [None] * len(items)
        for indexes in _rounds(items):
            # In transfer id order: two batches that insert the same barrier keys (a zombie's block
            # racing recovery's settle) wait for each other in one order, never in a deadlock.
            indexes.sort(key=lambda index: items[index].transfer_id)
            for _ in range(KEY_RACE_ATTEMPTS_MAX):
                try:
                    outcomes = await once([items[index] for index in indexes], timeout_seconds)
                    break
                except KeyTaken:
                    continue
            else:
                raise errors.ShardUnavailable(
                    f"{self.shard_name}: transfers kept racing with other copies of them; retry", shard=self.shard_name
                )
            for index, outcome in zip(indexes, outcomes):
                results[index] = outcome
        return results

    async def begin_many(self, items: list[BeginItem], limits: TierLimits, timeout_seconds: float) -> list[Begun | errors.LedgerError]:
        """Create each coordinator record and try its debit branch, all in one local transaction.

        Per item: what it found or did, or the conflict of its id with the id's first use.
        Two copies of one request racing here both find no record; the slower one's insert
        meets the faster one's key and rolls back, and its next attempt finds the record.
        """
        return await self._in_rounds(items, lambda part, timeout: self._begin_once(part, limits, timeout), timeout_seconds)

    async def _begin_once(self, items: list[BeginItem], limits: TierLimits, timeout_seconds: float) -> list[Begun | errors.LedgerError]:
        transfer_ids = [item.transfer_id for item in items]
        account_ids = sorted({account_id for item in items for account_id in (item.request.debit_account_id, item.clearing_account_id)})
        registrations = [id_registry.transfer_registration(item.request) for item in items if item.register_id_here]
        statements, params = [LOCK_ACCOUNTS, SELECT_RECORDS, SELECT_LOCAL_TRANSFERS], [account_ids, transfer_ids, transfer_ids]
        if registrations:
            # After the locks: a transaction that holds a registry key waits for no lock.
            statements += [id_registry.REGISTER, id_registry.SELECT_REGISTERED]
            params += id_registry.register_params(registrations)
        async with self.store.session(timeout_seconds) as session:
            await self._ensure_clearing(session, {(item.clearing_account_id, item.request.currency) for item in items})
            locked, found, local, *registered = await session.run(session.begin(*statements), params)
            accounts = {row[0]: account_from_row(row) for row in locked}
            records = {row[0]: record_from_row(row) for row in found}
            local_transfers = {row[0]: transfer_from_row(row) for row in local}
            first_uses = id_registry.first_uses(registered[0]) if registrations else {}
            cleared = {
                item.transfer_id: pair for item in items if item.transfer_id not in records and item.transfer_id not in local_transfers
                and (pair := _cleared_at_begin(item, accounts)) is not None
            }
            shares: dict[positions.ShareKey, clearing.PositionShare] = {}
            if cleared:
                # The payers' shares, after the accounts: the cap is checked and the debit reserved there.
                _, shares = await positions.lock_shares(
                    session, self.shard_name, [(cleared[item.transfer_id][0], item.request.currency) for item in items if item.transfer_id in cleared],
                    [], [],
                )
            position_changes = positions.PositionChanges()
            results: list[Begun | errors.LedgerError | None] = [None] * len(items)
            refusals: dict[str, errors.LedgerError | None] = {}
            record_rows, barrier_rows, branch_rows, changes = [], [], [], {}
            for index, item in enumerate(items):
                request = item.request
                if item.register_id_here:
                    first_use = first_uses[(int(ids.IdNamespace.TRANSFER), request.transfer_id)]
                    conflict = ids.conflict_with_first_use("transfer_id", request.transfer_id, first_use, request.registry_fields())
                    if conflict is not None:
                        results[index] = conflict
                        continue
                if request.transfer_id in records:
                    results[index] = Begun(records[request.transfer_id], created=False)
                    continue
                if request.transfer_id in local_transfers:
                    results[index] = Begun(None, created=False, same_shard_transfer=local_transfers[request.transfer_id])
                    continue
                # Everything that could refuse this branch is checked now, the clearing account
                # (credited here) included, so that its confirm can never fail for a business reason.
                refusal = debit_side_refusal(request, accounts.get(request.debit_account_id), limits) or (
                    clearing_refusal(request, accounts[item.clearing_account_id], credited=True)
                )
                pair = cleared.get(request.transfer_id)
                if refusal is None and pair is not None:
                    share_key = (pair[0], request.currency)
                    refusal = positions.exposure_refusal(shares[share_key], None, request.amount_minor)
                    if refusal is None and not shares[share_key].fits(request.amount_minor):
                        if not request.final_for_cap:
                            results[index] = Begun(None, created=False, needs_headroom=(*share_key, request.amount_minor))
                            continue
                        refusal = clearing.cap_exceeded(*share_key, None)
                    if refusal is None:
                        positions.apply_to(shares, share_key, reserved=request.amount_minor)
                        position_changes.reserved(pair[0], request.currency, request.amount_minor)
                refusals[request.transfer_id] = refusal
                debit_account = accounts.get(request.debit_account_id)
                payer = debit_account.participant_id if debit_account is not None else None
                payee = item.payee_participant_id
                refused = refusal is not None
                reason = refusal.reason if refused else ""
                amount = request.amount_minor
                record_rows.append((
                    request.transfer_id, request.debit_account_id, request.credit_account_id, amount, request.currency,
                    request.reference, item.credit_shard, int(CoordinatorState.REJECTED if refused else CoordinatorState.TRYING),
                    reason, item.owner, item.lease_seconds, item.pending_timeout_seconds, refused,
                    payer, payee,
                ))
                barrier_rows.append(
                    (request.transfer_id, DEBIT_BRANCH, BarrierOperation.TRY.value, refused_outcome(reason) if refused else TryOutcome.APPLIED.value)
                )
                branch_rows.append((
                    request.transfer_id, request.debit_account_id, request.credit_account_id, amount, request.currency,
                    request.reference, int(TransferStatus.REJECTED if refused else TransferStatus.PENDING), reason, DEBIT_BRANCH,
                    item.clearing_account_id, refused, *(pair or (None, None)),
                ))
                if not refused:
                    _plan(accounts, changes, request.debit_account_id, amount, 0, RESERVED_COUNTERS)
                    _plan(accounts, changes, item.clearing_account_id, 0, amount, RESERVED_COUNTERS)
            if not record_rows:
                if registrations:
                    await session.run(COMMIT)
                return results
            reserve, reserve_params = _changes_statement(RESERVE, changes)
            reserve_shares, reserve_shares_params = position_changes.statements(None)
            (inserted,) = await session.run(
                batch(INSERT_RECORDS, INSERT_BARRIERS, INSERT_BRANCHES, *reserve, *reserve_shares, COMMIT),
                _columns(record_rows) + _columns(barrier_rows) + _columns(branch_rows) + reserve_params + reserve_shares_params,
            )
        created = {row[0]: record_from_row(row) for row in inserted}
        for index, item in enumerate(items):
            if results[index] is None:
                results[index] = Begun(created[item.transfer_id], created=True, fresh_refusal=refusals[item.transfer_id])
        return results

    async def settle_credits(self, items: list[SettleCreditItem], limits: TierLimits, timeout_seconds: float) -> list[str]:
        """Try and confirm credit branches in one local transaction: each one's stored try outcome
        (TryOutcome, a refusal with its reason, a block with its cause). The commit is the decision:
        an applied branch is posted at once. A try barrier row already there decides instead, and
        one whose pending timeout passed on this shard's clock is blocked (cause PENDING_TIMEOUT)."""
        return await self._in_rounds(items, lambda part, timeout: self._settle_credits_once(part, limits, timeout), timeout_seconds)

    async def _settle_credits_once(self, items: list[SettleCreditItem], limits: TierLimits, timeout_seconds: float) -> list[str]:
        account_ids = sorted({account_id for item in items for account_id in (item.record.credit_account_id, item.clearing_account_id)})
        async with self.store.session(timeout_seconds) as session:
            await self._ensure_clearing(session, {(item.clearing_account_id, item.record.currency) for item in items})
            locked, stored, ((now,),) = await session.run(
                session.begin(LOCK_ACCOUNTS, SELECT_CREDIT_TRY_OUTCOMES, SELECT_NOW), [account_ids, [item.transfer_id for item in items]]
            )
            accounts = {row[0]: account_from_row(row) for row in locked}
            outcomes = dict(stored)
            barrier_rows, branch_rows, changes = [], [], {}
            for item in items:
                if item.transfer_id in outcomes:
                    continue
                record, request = item.record, item.record.request
                if record.pending_expires_at <= now:
                    outcome = blocked_outcome(CancelCause.PENDING_TIMEOUT)
                else:
                    # The clearing account (debited here) is checked too: its int64 range holds.
                    refusal = _other_payee(record, accounts.get(record.credit_account_id)) or credit_side_refusal(
                        request, accounts.get(record.credit_account_id), limits
                    ) or clearing_refusal(request, accounts[item.clearing_account_id], credited=False)
                    outcome = refused_outcome(refusal.reason) if refusal else TryOutcome.APPLIED.value
                outcomes[item.transfer_id] = outcome
                barrier_rows.append((item.transfer_id, CREDIT_BRANCH, BarrierOperation.TRY.value, outcome))
                if outcome == TryOutcome.APPLIED:
                    branch_rows.append((
                        record.transfer_id, record.debit_account_id, record.credit_account_id, record.amount_minor, record.currency,
                        record.reference, int(TransferStatus.POSTED), "", CREDIT_BRANCH, item.clearing_account_id, True, None, None,
                    ))
                    _plan(accounts, changes, record.credit_account_id, 0, record.amount_minor, POSTED_COUNTERS)
                    _plan(accounts, changes, item.clearing_account_id, record.amount_minor, 0, POSTED_COUNTERS)
            if barrier_rows:
                # Plain inserts: a barrier row a racing copy (or a cancel) stored first is a
                # KeyTaken, and the round is planned again with that row's outcome.
                branches = [INSERT_BRANCHES] if branch_rows else []
                post, post_params = _changes_statement(APPLY_BALANCE_CHANGES, changes)
                await session.run(
                    batch(INSERT_BARRIERS, *branches, *post, COMMIT),
                    _columns(barrier_rows) + (_columns(branch_rows) if branch_rows else []) + post_params,
                )
        return [outcomes[item.transfer_id] for item in items]

    async def block_credits(self, items: list[BlockCreditItem], timeout_seconds: float) -> list[str]:
        """Store a cancel in each credit try's place unless the try (or another cancel) came
        first; each one's stored try outcome, whichever that was."""
        return await self._in_rounds(items, self._block_credits_once, timeout_seconds)

    async def _block_credits_once(self, items: list[BlockCreditItem], timeout_seconds: float) -> list[str]:
        transfer_ids = [item.transfer_id for item in items]
        async with self.store.session(timeout_seconds) as session:
            # READ COMMITTED: the SELECT, a later statement, sees a racing try that the INSERT waited for.
            (stored,) = await session.run(
                session.begin(BLOCK_CREDIT_TRIES, SELECT_CREDIT_TRY_OUTCOMES, COMMIT),
                [transfer_ids, [blocked_outcome(item.cause) for item in items], transfer_ids],
            )
        outcomes = dict(stored)
        return [outcomes[transfer_id] for transfer_id in transfer_ids]

    async def settle_debits(self, items: list[SettleDebitItem], timeout_seconds: float) -> list[Settled]:
        """Per record: CAS (TRYING, lease epoch) to its final state with its debit branch's confirm or cancel."""
        return await self._in_rounds(items, self._settle_debits_once, timeout_seconds)

    async def _settle_debits_once(self, items: list[SettleDebitItem], timeout_seconds: float) -> list[Settled]:
        params = {
            "ids": [item.transfer_id for item in items], "customers": sorted({item.record.debit_account_id for item in items}),
            "operations": [(BarrierOperation.CONFIRM if item.confirm else BarrierOperation.CANCEL).value for item in items],
            "epochs": [item.record.lease_epoch for item in items], "reasons": [item.reason for item in items],
            "final_states": [int(item.final_state) for item in items], "window_id": None,
        }
        cleared = {item.transfer_id: item.record.cleared for item in items if item.record.cleared is not None}
        async with self.store.session(timeout_seconds) as session:
            if not cleared:
                _, rows = await session.run(session.begin(LOCK_DEBIT_BRANCH_ACCOUNTS, SETTLE_DEBITS, COMMIT), params)
            else:
                # Accounts first, then the window (shared lock) and the payers' and payees' shares on this
                # shard, sorted; a confirm moves the payer's reservation into its position and the payee's
                # position down, and the transfer joins the window open now.
                keys = sorted({(participant_id, item.record.currency) for item in items for participant_id in cleared.get(item.transfer_id, ())})
                _, _, window, _ = await session.run(
                    session.begin(LOCK_DEBIT_BRANCH_ACCOUNTS, positions.WINDOW_LOCK_SHARED, positions.SELECT_WINDOW,
                                  positions.ENSURE_SHARES_NAMED, positions.LOCK_SHARES_NAMED),
                    {**params, **positions.share_params(keys)},
                )
                params["window_id"] = int(window[0][0])
                (rows,) = await session.run(SETTLE_DEBITS, params)
                position_changes = positions.PositionChanges()
                by_transfer = {item.transfer_id: item for item in items}
                for row in rows:
                    item = by_transfer[row[0]]
                    if row[2] and row[0] in cleared:  # moved by this call
                        payer, payee = cleared[row[0]]
                        if item.confirm:
                            position_changes.posted(payer, payee, item.record.currency, item.record.amount_minor, reserved=True)
                        else:
                            position_changes.released(payer, item.record.currency, item.record.amount_minor)
                statements, statement_params = position_changes.statements(params["window_id"])
                await session.run(batch(*statements, COMMIT), statement_params)
        by_id = {
            row[0]: Settled(record_from_row(row[3:]) if row[3] is not None else None, BranchResult(row[3] is not None, row[1], row[2]))
            for row in rows
        }
        return [by_id[item.transfer_id] for item in items]

    async def begin(
        self, request: TransferRequest, credit_shard: str, clearing_account_id: str, limits: TierLimits,
        owner: str, lease_seconds: float, pending_timeout_seconds: float, timeout_seconds: float,
        register_id_here: bool = False,
    ) -> Begun:
        item = BeginItem(request, credit_shard, clearing_account_id, owner, lease_seconds, pending_timeout_seconds, register_id_here)
        return _raised_or_returned((await self.begin_many([item], limits, timeout_seconds))[0])

    async def settle_credit(self, record: TccRecord, clearing_account_id: str, limits: TierLimits, timeout_seconds: float) -> str:
        return _raised_or_returned((await self.settle_credits([SettleCreditItem(record, clearing_account_id)], limits, timeout_seconds))[0])

    async def block_credit(self, record: TccRecord, cause: CancelCause, timeout_seconds: float) -> str:
        return _raised_or_returned((await self.block_credits([BlockCreditItem(record, cause)], timeout_seconds))[0])

    async def settle_debit(self, record: TccRecord, final_state: CoordinatorState, reason: str, timeout_seconds: float) -> Settled:
        return _raised_or_returned((await self.settle_debits([SettleDebitItem(record, final_state, reason)], timeout_seconds))[0])

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


def _cleared_at_begin(item: BeginItem, accounts: dict[str, Account]) -> tuple[str, str] | None:
    """(payer, payee) when a transfer between shards is cleared: its payer's account (locked here)
    and the payee the service looked up for the credited account."""
    debit = accounts.get(item.request.debit_account_id)
    if debit is None:
        return None
    return clearing.cleared_between(debit.account_id, debit.participant_id, item.request.credited, item.payee_participant_id)


def _other_payee(record: TccRecord, credit: Account | None) -> errors.LedgerError | None:
    """The credit account found now belongs to another participant than the one the transfer began
    for (and cleared to): it is not the account the try named."""
    if credit is None or record.payee_participant_id is None or credit.participant_id == record.payee_participant_id:
        return None
    return errors.AccountNotFound(
        f"account {record.credit_account_id} of participant {record.payee_participant_id} not found", account_id=record.credit_account_id
    )


def _raised_or_returned(result):
    """A list operation's outcome for one item: an error is raised (a subclass, BatchingTccStore,
    answers errors per item)."""
    if isinstance(result, errors.LedgerError):
        raise result
    return result
