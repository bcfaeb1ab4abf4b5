"""Same-shard transfers applied in batches: one database transaction for many.

The rules run in Python in request order against the locked accounts' states as
the batch changes them, so each transfer is judged exactly as it would be alone,
one after another. The writes are set-based: one INSERT for all transfer rows,
one UPDATE that applies each account's summed change once. An account that many
transfers credit (a merchant in a flash sale) is updated once per batch, not
once per payment.
"""

from __future__ import annotations

import dataclasses

import psycopg.errors

from services.ledger import errors
from services.ledger.accounts import Account
from services.ledger.limits import TierLimits
from services.ledger.transfers import Transfer, TransferRequest, TransferStatus, decide
from services.storage.shard_store import ACCOUNT_COLUMNS, COMMIT, TRANSFER_COLUMNS, ShardStore, account_from_row
from services.storage.shard_store import batch, transfer_from_row

LOCK_ACCOUNTS = f"SELECT {ACCOUNT_COLUMNS} FROM accounts WHERE account_id = ANY(%s) ORDER BY account_id FOR UPDATE"
SELECT_TRANSFERS = f"SELECT {TRANSFER_COLUMNS} FROM transfers WHERE transfer_id = ANY(%s)"
# branch 3 rows credit a collecting merchant's sub-account (clearing_account_id).
INSERT_TRANSFERS = f"""
    INSERT INTO transfers (transfer_id, debit_account_id, credit_account_id, amount_minor, currency, reference,
                           status, reason, branch, clearing_account_id, finalized_at)
    SELECT *, now() FROM unnest(%s::text[], %s::text[], %s::text[], %s::bigint[], %s::text[], %s::text[],
                                %s::smallint[], %s::text[], %s::smallint[], %s::text[])
    RETURNING {TRANSFER_COLUMNS}"""
COLLECTED_BRANCH = 3
APPLY_BALANCE_CHANGES = """
    UPDATE accounts SET debits_posted_minor = debits_posted_minor + change.debits,
                        credits_posted_minor = credits_posted_minor + change.credits, updated_at = now()
    FROM unnest(%s::text[], %s::bigint[], %s::bigint[]) AS change(account_id, debits, credits)
    WHERE accounts.account_id = change.account_id"""


@dataclasses.dataclass
class Outcome:
    """One transfer's answer: the stored transfer, and the refusal if this batch just rejected it."""

    transfer: Transfer | None = None
    fresh_refusal: errors.LedgerError | None = None


async def post_chains(
    store: ShardStore, chains: list[list[TransferRequest]], limits: TierLimits, timeout_seconds: float
) -> list[list[Outcome]]:
    """Apply chains of validated same-shard transfers in one transaction; outcomes in input order.

    A chain of one is an ordinary transfer; a longer chain is all or nothing.
    """
    requests = [request for chain in chains for request in chain]
    account_ids = sorted({i for r in requests for i in (r.debit_account_id, r.credited)})
    try:
        async with store.session(timeout_seconds) as session:
            locked, earlier = await session.run(
                session.begin(LOCK_ACCOUNTS, SELECT_TRANSFERS), [account_ids, [r.transfer_id for r in requests]]
            )
            plan = _Plan({row[0]: account_from_row(row) for row in locked}, {row[0]: transfer_from_row(row) for row in earlier})
            outcomes = [plan.add_chain(chain, limits) for chain in chains]
            if plan.new_rows:
                statements, params = [INSERT_TRANSFERS], [list(column) for column in zip(*plan.new_rows)]
                changes = plan.balance_changes()
                if changes:
                    statements.append(APPLY_BALANCE_CHANGES)
                    params += [list(column) for column in zip(*changes)]
                (inserted,) = await session.run(batch(*statements, COMMIT), params)
                stored = {row[0]: transfer_from_row(row) for row in inserted}
                for outcome in (o for chain in outcomes for o in chain):
                    if outcome.transfer is None:
                        raise AssertionError("a planned transfer has no stored row")
                    if outcome.transfer.transfer_id in stored and outcome.transfer.seq == 0:
                        outcome.transfer = stored[outcome.transfer.transfer_id]
        return outcomes
    except psycopg.errors.UniqueViolation:
        if len(chains) == 1:
            # The id was stored by another process meanwhile; this time the SELECT finds it.
            return await post_chains(store, chains, limits, timeout_seconds)
        # Fall back to one chain per transaction, so its neighbours are not failed by it.
        return [(await post_chains(store, [chain], limits, timeout_seconds))[0] for chain in chains]


class _Plan:
    """The batch's effect, built in request order before anything is written."""

    def __init__(self, accounts: dict[str, Account], earlier: dict[str, Transfer]) -> None:
        self.accounts = accounts
        self.known = dict(earlier)  # transfer_id -> stored or planned transfer
        self.new_rows: list[tuple] = []
        self._changes: dict[str, list[int]] = {}  # account_id -> [debits, credits]

    def add_chain(self, chain: list[TransferRequest], limits: TierLimits) -> list[Outcome]:
        tentative = dict(self.accounts)
        decisions: list[Transfer | errors.LedgerError | None] = []  # known transfer, refusal, or None: post
        first_refused: int | None = None
        for index, request in enumerate(chain):
            if request.transfer_id in self.known:
                # A retry (or a repeat within this batch): the service compares fields and answers.
                decisions.append(self.known[request.transfer_id])
                continue
            refusal = decide(request, tentative.get(request.debit_account_id), tentative.get(request.credited), limits)
            if refusal is None:
                _apply(tentative, request)
            elif first_refused is None:
                first_refused = index
            decisions.append(refusal)
        chain_failed = len(chain) > 1 and first_refused is not None
        if not chain_failed:
            self.accounts = tentative
        outcomes = []
        for index, (request, decision) in enumerate(zip(chain, decisions)):
            if isinstance(decision, Transfer):
                outcomes.append(Outcome(decision))
                continue
            refusal = decision
            if chain_failed and index != first_refused:
                # All or nothing: the refused one keeps its reason, the others name it.
                refusal = errors.LinkedTransferFailed(
                    f"transfer {chain[first_refused].transfer_id} of the same chain was refused",
                    failed_transfer_id=chain[first_refused].transfer_id,
                )
            outcomes.append(self._record(request, refusal))
            if refusal is None:
                for account_id, column in ((request.debit_account_id, 0), (request.credited, 1)):
                    self._changes.setdefault(account_id, [0, 0])[column] += request.amount_minor
        return outcomes

    def _record(self, request: TransferRequest, refusal: errors.LedgerError | None) -> Outcome:
        status = TransferStatus.POSTED if refusal is None else TransferStatus.REJECTED
        reason = "" if refusal is None else refusal.reason
        self.new_rows.append((
            request.transfer_id, request.debit_account_id, request.credit_account_id, request.amount_minor,
            request.currency, request.reference, int(status), reason,
            COLLECTED_BRANCH if request.credited_account_id else 0, request.credited_account_id or None,
        ))
        planned = Transfer(
            request.transfer_id, request.debit_account_id, request.credit_account_id, request.amount_minor,
            request.currency, request.reference, status, reason,
        )
        self.known[request.transfer_id] = planned
        return Outcome(planned, refusal)

    def balance_changes(self) -> list[tuple[str, int, int]]:
        return [(account_id, debits, credits) for account_id, (debits, credits) in sorted(self._changes.items())]


def _apply(accounts: dict[str, Account], request: TransferRequest) -> None:
    debit, credit = accounts[request.debit_account_id], accounts[request.credited]
    accounts[debit.account_id] = dataclasses.replace(debit, debits_posted_minor=debit.debits_posted_minor + request.amount_minor)
    accounts[credit.account_id] = dataclasses.replace(credit, credits_posted_minor=credit.credits_posted_minor + request.amount_minor)
