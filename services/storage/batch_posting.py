"""Same-shard transfers applied in batches: one database transaction for many.

The rules run in Python in request order against the locked accounts' states as
the batch changes them, so each transfer is judged exactly as it would be alone,
one after another. The writes are set-based: one INSERT for all transfer rows,
one UPDATE that applies each account's summed change once. An account that many
transfers credit (a merchant in a flash sale) is updated once per batch, not
once per payment.

A batch that holds cleared transfers (between two participants, services/ledger/clearing.py)
takes one more round trip once its accounts are locked: the shared window lock, the shard's
current window, and the payers' and payees' position shares, locked. A cleared transfer must
then also fit its payer's share of the net debit cap; a chain that does not fit is sent back
(Outcome.needs_headroom) for the service to rebalance the cap's shares, unless its requests
are final for the cap (the rebalance was done): then it is refused, NET_DEBIT_CAP_EXCEEDED.
Batches within one participant take no extra round trip.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from services.ledger import clearing, errors, ids
from services.ledger.accounts import Account
from services.ledger.clearing import PositionShare
from services.ledger.limits import TierLimits
from services.ledger.transfers import Branch, Transfer, TransferRequest, TransferStatus, decide, linked_transfer_failed
from services.storage import id_registry, positions
from services.storage.prepared import prepared
from services.storage.shard_store import ACCOUNT_COLUMNS, COMMIT, KEY_RACE_ATTEMPTS_MAX, TRANSFER_COLUMNS, KeyTaken, ShardStore
from services.storage.shard_store import account_from_row
from services.storage.shard_store import batch, transfer_from_row

# Every transaction that locks several accounts locks them here, all at once and in
# account_id order, so two transactions never wait on each other's rows in opposite orders.
LOCK_ACCOUNTS = prepared("lock_accounts", f"SELECT {ACCOUNT_COLUMNS} FROM accounts WHERE account_id = ANY(%s) ORDER BY account_id FOR UPDATE")  # nosec B608 # constants only, no request data
SELECT_TRANSFERS = prepared("select_transfers", f"SELECT {TRANSFER_COLUMNS} FROM transfers WHERE transfer_id = ANY(%s)")  # nosec B608 # constants only, no request data
# branch 3 rows credit a collecting merchant's sub-account (clearing_account_id).
INSERT_TRANSFERS = prepared("insert_transfers", f"""
    INSERT INTO transfers (transfer_id, debit_account_id, credit_account_id, amount_minor, currency, reference,
                           status, reason, branch, clearing_account_id, finalized_at)
    SELECT *, now() FROM unnest(%s::text[], %s::text[], %s::text[], %s::bigint[], %s::text[], %s::text[],
                                %s::smallint[], %s::text[], %s::smallint[], %s::text[])
    RETURNING {TRANSFER_COLUMNS}""")  # nosec B608 # constants only, no request data
# A batch with cleared transfers: their rows carry the participants and (posted) the window.
INSERT_CLEARED_TRANSFERS = prepared("insert_cleared_transfers", f"""
    INSERT INTO transfers (transfer_id, debit_account_id, credit_account_id, amount_minor, currency, reference,
                           status, reason, branch, clearing_account_id, payer_participant_id, payee_participant_id, window_id,
                           finalized_at)
    SELECT *, now() FROM unnest(%s::text[], %s::text[], %s::text[], %s::bigint[], %s::text[], %s::text[],
                                %s::smallint[], %s::text[], %s::smallint[], %s::text[], %s::text[], %s::text[], %s::bigint[])
    RETURNING {TRANSFER_COLUMNS}""")  # nosec B608 # constants only, no request data
APPLY_BALANCE_CHANGES = prepared("apply_balance_changes", """
    UPDATE accounts SET debits_posted_minor = debits_posted_minor + change.debits,
                        credits_posted_minor = credits_posted_minor + change.credits, updated_at = now()
    FROM unnest(%s::text[], %s::bigint[], %s::bigint[]) AS change(account_id, debits, credits)
    WHERE accounts.account_id = change.account_id""")


@dataclasses.dataclass
class Outcome:
    """One transfer's answer: the stored transfer (None if nothing was recorded), and the
    refusal if this batch just rejected it."""

    transfer: Transfer | None = None
    fresh_refusal: errors.LedgerError | None = None
    # Nothing recorded: its chain's payer share lacks headroom; (participant_id, currency, the
    # chain's cleared debits of that share): rebalance, then send the chain again, final for the cap.
    needs_headroom: tuple[str, str, int] | None = None




async def post_chains(
    store: ShardStore, chains: list[list[TransferRequest]], limits: TierLimits, timeout_seconds: float,
    registers_here: Callable[[str], bool] = lambda transfer_id: False,
) -> list[list[Outcome]]:
    """Apply chains of validated same-shard transfers in one transaction; outcomes in input order.

    A chain of one is an ordinary transfer; a longer chain is all or nothing. The transfer ids
    that `registers_here` names are registered bank-wide (id_registry.py) in the same
    transaction, since this shard is their registry's home: no separate round trip for them.
    """
    for _ in range(KEY_RACE_ATTEMPTS_MAX):
        try:
            return await _post_once(store, chains, limits, timeout_seconds, registers_here)
        except KeyTaken:
            continue
    if len(chains) > 1:
        # One chain per transaction, so that whichever chain keeps racing fails alone.
        return [(await post_chains(store, [chain], limits, timeout_seconds, registers_here))[0] for chain in chains]
    raise errors.ShardUnavailable(
        f"{store.shard_name}: transfer ids kept racing with another copy of this request; retry with the same ids",
        shard=store.shard_name,
    )


async def _post_once(
    store: ShardStore, chains: list[list[TransferRequest]], limits: TierLimits, timeout_seconds: float,
    registers_here: Callable[[str], bool],
) -> list[list[Outcome]]:
    requests = [request for chain in chains for request in chain]
    account_ids = sorted({i for r in requests for i in (r.debit_account_id, r.credited)})
    registrations = [id_registry.transfer_registration(r) for r in requests if registers_here(r.transfer_id)]
    statements, params = [LOCK_ACCOUNTS, SELECT_TRANSFERS], [account_ids, [r.transfer_id for r in requests]]
    if registrations:
        # After the account locks: a transaction that holds a registry key waits for no lock.
        statements += [id_registry.REGISTER, id_registry.SELECT_REGISTERED]
        params += id_registry.register_params(registrations)
    async with store.session(timeout_seconds) as session:
        locked, earlier, *registered = await session.run(session.begin(*statements), params)
        first_uses = id_registry.first_uses(registered[0]) if registrations else {}
        accounts = {row[0]: account_from_row(row) for row in locked}
        earlier_transfers = {row[0]: transfer_from_row(row) for row in earlier}
        share_keys = sorted({
            (participant_id, request.currency) for request in requests if request.transfer_id not in earlier_transfers
            for participant_id in (_cleared(request, accounts) or ())
        })
        window_id, shares = None, None
        if share_keys:
            (_, window), shares = await positions.lock_shares(
                session, store.shard_name, share_keys, [positions.WINDOW_LOCK_SHARED, positions.SELECT_WINDOW], []
            )
            window_id = int(window[0][0])
        plan = _Plan(
            accounts, earlier_transfers, {namespace_and_id[1]: fields for namespace_and_id, fields in first_uses.items()},
            shares, window_id,
        )
        outcomes = [plan.add_chain(chain, limits) for chain in chains]
        if plan.new_rows:
            if shares is None:
                statements, params = [INSERT_TRANSFERS], [list(column) for column in zip(*(row[:10] for row in plan.new_rows))]
            else:
                statements, params = [INSERT_CLEARED_TRANSFERS], [list(column) for column in zip(*plan.new_rows)]
            changes = plan.balance_changes()
            if changes:
                statements.append(APPLY_BALANCE_CHANGES)
                params += [list(column) for column in zip(*changes)]
            clearing_statements, clearing_params = plan.position_changes.statements(window_id)
            (inserted,) = await session.run(batch(*statements, *clearing_statements, COMMIT), params + clearing_params)
            stored = {row[0]: transfer_from_row(row) for row in inserted}
            for outcome in (o for chain in outcomes for o in chain):
                if outcome.transfer is not None and outcome.transfer.transfer_id in stored and outcome.transfer.seq == 0:
                    outcome.transfer = stored[outcome.transfer.transfer_id]
    return outcomes


class _Plan:
    """The batch's effect, built in request order before anything is written."""

    def __init__(
        self, accounts: dict[str, Account], earlier: dict[str, Transfer], first_uses: dict[str, dict] | None = None,
        shares: dict[positions.ShareKey, PositionShare] | None = None, window_id: int | None = None,
    ) -> None:
        self.accounts = accounts
        self.participants = {account_id: account.participant_id for account_id, account in accounts.items()}  # never change
        self.known = dict(earlier)  # transfer_id -> stored or planned transfer
        self.first_uses = first_uses or {}  # transfer_id -> fields of its first use, for ids registered here
        self.shares = shares or {}  # the locked position shares, as the batch changes them
        self.window_id = window_id
        self.position_changes = positions.PositionChanges()
        self.new_rows: list[tuple] = []
        self._changes: dict[str, list[int]] = {}  # account_id -> [debits, credits]

    def add_chain(self, chain: list[TransferRequest], limits: TierLimits) -> list[Outcome]:
        conflicts = [self._conflict(request) for request in chain]
        if any(conflicts):
            return _refused_for_conflicts(chain, conflicts)
        known = [self.known.get(request.transfer_id) for request in chain]
        if all(transfer is not None for transfer in known):
            # A retry (or a repeat within this batch): the service compares fields and answers.
            return [Outcome(transfer) for transfer in known]
        if any(transfer is not None for transfer in known):
            return _refused_for_existing_ids(chain, known)
        tentative, tentative_shares = dict(self.accounts), dict(self.shares)
        refusals: list[errors.LedgerError | None] = []
        for request in chain:
            refusal = decide(request, tentative.get(request.debit_account_id), tentative.get(request.credited), limits)
            cleared = _cleared(request, self.accounts)
            if refusal is None and cleared is not None:
                payer, payee = ((participant_id, request.currency) for participant_id in cleared)
                payer_share = tentative_shares[payer]
                refusal = positions.exposure_refusal(payer_share, tentative_shares[payee], request.amount_minor)
                if refusal is None and not payer_share.fits(request.amount_minor):
                    if not request.final_for_cap:
                        # Nothing of the chain is recorded; it asks for what all its debits of this share need.
                        need = sum(r.amount_minor for r in chain if r.currency == request.currency and _payer(r, self.accounts) == cleared[0])
                        return [Outcome(needs_headroom=(*payer, need)) for _ in chain]
                    refusal = clearing.cap_exceeded(*payer, None)
            if refusal is None:
                _apply(tentative, request)
                if cleared is not None:
                    positions.apply_to(tentative_shares, (cleared[0], request.currency), position=request.amount_minor)
                    positions.apply_to(tentative_shares, (cleared[1], request.currency), position=-request.amount_minor)
            refusals.append(refusal)
        first_refused = next((index for index, refusal in enumerate(refusals) if refusal is not None), None)
        if first_refused is None:
            self.accounts, self.shares = tentative, tentative_shares
        outcomes = []
        for index, (request, refusal) in enumerate(zip(chain, refusals)):
            if first_refused is not None and index != first_refused:
                # All or nothing: the refused one keeps its reason, the others name it.
                refusal = linked_transfer_failed(chain[first_refused].transfer_id)
            cleared = _cleared(request, self.accounts)
            outcomes.append(self._record(request, refusal, cleared))
            if refusal is None:
                for account_id, column in ((request.debit_account_id, 0), (request.credited, 1)):
                    self._changes.setdefault(account_id, [0, 0])[column] += request.amount_minor
                if cleared is not None:
                    self.position_changes.posted(*cleared, request.currency, request.amount_minor)
        return outcomes

    def _conflict(self, request: TransferRequest) -> errors.IdempotencyConflict | None:
        first_use = self.first_uses.get(request.transfer_id)
        if first_use is None:
            return None
        return ids.conflict_with_first_use("transfer_id", request.transfer_id, first_use, request.registry_fields())

    def _record(self, request: TransferRequest, refusal: errors.LedgerError | None, cleared: tuple[str, str] | None) -> Outcome:
        status = TransferStatus.POSTED if refusal is None else TransferStatus.REJECTED
        reason = "" if refusal is None else refusal.reason
        payer, payee = cleared or (None, None)
        self.new_rows.append((
            request.transfer_id, request.debit_account_id, request.credit_account_id, request.amount_minor,
            request.currency, request.reference, int(status), reason,
            int(Branch.COLLECTED if request.credited_account_id else Branch.SAME_SHARD), request.credited_account_id or None,
            # Cleared ones only (INSERT_CLEARED_TRANSFERS): the participants, and the window it joined if posted.
            payer, payee, self.window_id if cleared is not None and refusal is None else None,
        ))
        planned = Transfer(
            request.transfer_id, request.debit_account_id, request.credit_account_id, request.amount_minor,
            request.currency, request.reference, status, reason,
        )
        self.known[request.transfer_id] = planned
        return Outcome(planned, refusal)

    def balance_changes(self) -> list[tuple[str, int, int]]:
        return [(account_id, debits, credits) for account_id, (debits, credits) in sorted(self._changes.items())]


def _cleared(request: TransferRequest, accounts: dict[str, Account]) -> tuple[str, str] | None:
    """(payer, payee) participants when the transfer is cleared between its locked accounts."""
    debit, credited = accounts.get(request.debit_account_id), accounts.get(request.credited)
    if debit is None or credited is None:
        return None
    return clearing.cleared_between(debit.account_id, debit.participant_id, credited.account_id, credited.participant_id)


def _payer(request: TransferRequest, accounts: dict[str, Account]) -> str | None:
    cleared = _cleared(request, accounts)
    return None if cleared is None else cleared[0]


def _refused_for_conflicts(chain: list[TransferRequest], conflicts: list[errors.LedgerError | None]) -> list[Outcome]:
    """A member whose id names another transfer: the chain is refused whole, nothing recorded."""
    failed_id = next(request.transfer_id for request, conflict in zip(chain, conflicts) if conflict is not None)
    return [Outcome(None, conflict or linked_transfer_failed(failed_id)) for conflict in conflicts]


def _refused_for_existing_ids(chain: list[TransferRequest], known: list[Transfer | None]) -> list[Outcome]:
    """A linked chain that mixes existing transfers with new ones is refused whole, and
    nothing of it is recorded: its existing members cannot become part of it, and a
    retry of the same call gets the same answer as long as they exist."""
    existing_id = next(transfer.transfer_id for transfer in known if transfer is not None)
    outcomes = []
    for request, transfer in zip(chain, known):
        if transfer is not None:
            refusal: errors.LedgerError = errors.TransferExists(
                f"transfer {request.transfer_id} already exists; a linked chain cannot include it", transfer_id=request.transfer_id
            )
        else:
            refusal = linked_transfer_failed(existing_id)
        outcomes.append(Outcome(None, refusal))
    return outcomes


def _apply(accounts: dict[str, Account], request: TransferRequest) -> None:
    debit, credit = accounts[request.debit_account_id], accounts[request.credited]
    accounts[debit.account_id] = dataclasses.replace(debit, debits_posted_minor=debit.debits_posted_minor + request.amount_minor)
    accounts[credit.account_id] = dataclasses.replace(credit, credits_posted_minor=credit.credits_posted_minor + request.amount_minor)
