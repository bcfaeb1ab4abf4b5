"""Position shares on every shard (clearing_positions) and the rebalance of a net debit cap's
allotments across them. The rules are services/ledger/clearing.py's.

The hot path (batch_posting.py, tcc_store.py) changes a share in the transaction that posts
or reserves a cleared transfer, with the statements below: accounts locked first, then the
shares, sorted by (participant_id, currency). The rebalance (PositionStore.rebalance) locks one
participant's shares on every shard at once, in shard-name order, and nothing else there, so
it never waits on a transaction that waits on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging

from services.ledger import clearing, errors, money
from services.ledger.clearing import PositionShare
from services.storage.prepared import prepared
from services.storage.shard_store import COMMIT, Session, ShardStore, batch
from sharding.router import ShardRouter

log = logging.getLogger(__name__)

# Taken shared by every transaction that posts cleared transfers (the window close takes it
# exclusive), then the shard's current window read under it.
WINDOW_LOCK_SHARED = f"SELECT pg_advisory_xact_lock_shared({clearing.WINDOW_LOCK_KEY})"
SELECT_WINDOW = "SELECT window_id FROM clearing_shard_window"
# Sorted, so two transactions creating the same shares wait for each other in one order.
ENSURE_SHARES = prepared("ensure_shares", """
    INSERT INTO clearing_positions (participant_id, currency)
    SELECT * FROM unnest(%s::text[], %s::text[]) AS share(participant_id, currency) ORDER BY 1, 2
    ON CONFLICT DO NOTHING""")
SHARE_COLUMNS = "participant_id, currency, position_minor, reserved_minor, allotment_minor"
LOCK_SHARES = prepared("lock_shares", f"""
    SELECT {SHARE_COLUMNS} FROM clearing_positions
    WHERE (participant_id, currency) IN (SELECT * FROM unnest(%s::text[], %s::text[]))
    ORDER BY participant_id, currency FOR UPDATE""")  # nosec B608 # constants only, no request data
# The same two with named parameters, for batches whose other statements name theirs (tcc_store's settle).
ENSURE_SHARES_NAMED = """
    INSERT INTO clearing_positions (participant_id, currency)
    SELECT * FROM unnest(%(share_participants)s::text[], %(share_currencies)s::text[]) AS share(participant_id, currency) ORDER BY 1, 2
    ON CONFLICT DO NOTHING"""
LOCK_SHARES_NAMED = f"""
    SELECT {SHARE_COLUMNS} FROM clearing_positions
    WHERE (participant_id, currency) IN (SELECT * FROM unnest(%(share_participants)s::text[], %(share_currencies)s::text[]))
    ORDER BY participant_id, currency FOR UPDATE"""  # nosec B608 # constants only, no request data


def share_params(keys: list[ShareKey]) -> dict[str, list[str]]:
    """ENSURE_SHARES_NAMED's and LOCK_SHARES_NAMED's parameters."""
    return {"share_participants": [key[0] for key in keys], "share_currencies": [key[1] for key in keys]}


# Summed per share by the caller (PositionChanges).
APPLY_POSITION_CHANGES = prepared("apply_position_changes", """
    UPDATE clearing_positions p SET position_minor = p.position_minor + change.position,
                                    reserved_minor = p.reserved_minor + change.reserved, updated_at = now()
    FROM unnest(%s::text[], %s::text[], %s::bigint[], %s::bigint[]) AS change(participant_id, currency, position, reserved)
    WHERE p.participant_id = change.participant_id AND p.currency = change.currency""")
ADD_WINDOW_TOTALS = prepared("add_window_totals", """
    INSERT INTO clearing_window_totals AS t (window_id, participant_id, currency, debits_minor, credits_minor, transfers)
    SELECT %s::bigint, * FROM unnest(%s::text[], %s::text[], %s::bigint[], %s::bigint[], %s::bigint[])
         AS total(participant_id, currency, debits, credits, transfers) ORDER BY 2, 3
    ON CONFLICT (window_id, participant_id, currency) DO UPDATE SET
        debits_minor = t.debits_minor + excluded.debits_minor, credits_minor = t.credits_minor + excluded.credits_minor,
        transfers = t.transfers + excluded.transfers""")
SELECT_SHARE = f"SELECT {SHARE_COLUMNS} FROM clearing_positions WHERE participant_id = %s AND currency = %s"  # nosec B608 # constants only, no request data
LOCK_SHARE = SELECT_SHARE + " FOR UPDATE"
ENSURE_SHARE = "INSERT INTO clearing_positions (participant_id, currency) VALUES (%s, %s) ON CONFLICT DO NOTHING"
SET_ALLOTMENT = """
    UPDATE clearing_positions SET allotment_minor = %s, updated_at = now() WHERE participant_id = %s AND currency = %s"""
# The registry's row of a participant's currency, on the clearing home shard.
LOCK_PARTICIPANT_CURRENCY = """
    SELECT net_debit_cap_minor, threshold_percent FROM participant_currencies WHERE participant_id = %s AND currency = %s FOR UPDATE"""
SELECT_PARTICIPANT = "SELECT 1 FROM participants WHERE participant_id = %s"
ENSURE_HOSTING_PARTICIPANT = """
    INSERT INTO participants (participant_id, request_id, name) VALUES (%s, %s, %s) ON CONFLICT DO NOTHING"""
ENSURE_HOSTING_CURRENCY = """
    INSERT INTO participant_currencies (participant_id, currency, settlement_account_id) VALUES (%s, %s, %s) ON CONFLICT DO NOTHING"""
SET_CAP = """
    UPDATE participant_currencies SET net_debit_cap_minor = %s, updated_at = now() WHERE participant_id = %s AND currency = %s"""
SET_THRESHOLD = """
    UPDATE participant_currencies SET threshold_percent = %s, updated_at = now() WHERE participant_id = %s AND currency = %s"""
# The hosting participant is registered on first need (make up may not have done it yet): the
# idempotency key its registration is stored under.
HOSTING_REGISTRATION_REQUEST_ID = "corebank:hosting"


class _Keep:
    def __repr__(self) -> str:
        return "KEEP"


# rebalance(cap_minor=KEEP): leave the participant's cap as it is.
KEEP = _Keep()

ShareKey = tuple[str, str]  # (participant_id, currency)

# Shares known to exist, per shard: rows are never deleted, so once seen, no INSERT is sent
# again for them (the hot path's share statements are then a lock and an update).
_SHARES_KNOWN: set[tuple[str, str, str]] = set()


def share_from_row(row: tuple) -> PositionShare:
    return PositionShare(row[0], row[1], int(row[2]), int(row[3]), None if row[4] is None else int(row[4]))


async def lock_shares(session: Session, shard_name: str, keys: list[ShareKey], statements: list[str], params: list) -> tuple[list[list[tuple]], dict[ShareKey, PositionShare]]:
    """Send `statements` (with `params`), then create the shares of `keys` that may be missing and
    lock them all, sorted, in the same round trip: the rows of `statements`, and the locked shares."""
    keys = sorted(set(keys))
    for attempt in range(2):
        missing = [key for key in keys if (shard_name, *key) not in _SHARES_KNOWN] if attempt == 0 else keys
        sent, sent_params = list(statements), list(params)
        if missing:
            sent.append(ENSURE_SHARES)
            sent_params += _columns(missing)
        sent.append(LOCK_SHARES)
        sent_params += _columns(keys)
        *rows, locked = await session.run(batch(*sent), sent_params)
        shares = {(row[0], row[1]): share_from_row(row) for row in locked}
        if len(shares) == len(keys):
            _SHARES_KNOWN.update((shard_name, *key) for key in keys)
            return rows, shares
        # A share cached as existing is not there (a restored shard): create them all and lock again.
    raise AssertionError(f"{shard_name}: position shares {keys} missing after they were created")


class PositionChanges:
    """A transaction's changes to position shares and window totals, summed per share."""

    def __init__(self) -> None:
        self.shares: dict[ShareKey, list[int]] = {}  # -> [position, reserved]
        self.totals: dict[ShareKey, list[int]] = {}  # -> [debits, credits, transfers]

    def __bool__(self) -> bool:
        return bool(self.shares)

    def _share(self, participant_id: str, currency: str, position: int, reserved: int) -> None:
        change = self.shares.setdefault((participant_id, currency), [0, 0])
        change[0] += position
        change[1] += reserved

    def _total(self, participant_id: str, currency: str, debits: int, credits: int, transfers: int) -> None:
        total = self.totals.setdefault((participant_id, currency), [0, 0, 0])
        total[0] += debits
        total[1] += credits
        total[2] += transfers

    def posted(self, payer: str, payee: str, currency: str, amount_minor: int, reserved: bool = False) -> None:
        """A cleared transfer posts (from the payer's reservation when `reserved`)."""
        self._share(payer, currency, amount_minor, -amount_minor if reserved else 0)
        self._share(payee, currency, -amount_minor, 0)
        self._total(payer, currency, amount_minor, 0, 1)
        self._total(payee, currency, 0, amount_minor, 0)

    def reserved(self, payer: str, currency: str, amount_minor: int) -> None:
        self._share(payer, currency, 0, amount_minor)

    def released(self, payer: str, currency: str, amount_minor: int) -> None:
        self._share(payer, currency, 0, -amount_minor)

    def statements(self, window_id: int | None) -> tuple[list[str], list]:
        """The UPDATE of the shares and (when transfers posted) the upsert of the window's totals."""
        if not self.shares:
            return [], []
        statements = [APPLY_POSITION_CHANGES]
        params = _columns([(*key, position, reserved) for key, (position, reserved) in sorted(self.shares.items())])
        if self.totals:
            assert window_id is not None, "cleared transfers posted without a window"
            statements.append(ADD_WINDOW_TOTALS)
            params += [window_id, *_columns([(*key, *total) for key, total in sorted(self.totals.items())])]
        return statements, params


def apply_to(shares: dict[ShareKey, PositionShare], key: ShareKey, position: int = 0, reserved: int = 0) -> None:
    """The tentative state of a locked share once a planned change applies (for the next item's check)."""
    share = shares[key]
    shares[key] = dataclasses.replace(share, position_minor=share.position_minor + position, reserved_minor=share.reserved_minor + reserved)


def exposure_refusal(payer: PositionShare, payee: PositionShare | None, amount_minor: int) -> errors.Refusal | None:
    """The int64 range of the shares' counters once a cleared debit of `amount_minor` applies."""
    if payer.position_minor + payer.reserved_minor + amount_minor > money.INT64_MAX or (
        payee is not None and payee.position_minor - amount_minor < -money.INT64_MAX - 1
    ):
        return errors.BalanceOverflow("a participant's position would leave the int64 range")
    return None


def _columns(rows: list[tuple]) -> list[list]:
    return [list(column) for column in zip(*rows)]


class PositionStore:
    """One participant's position shares in one currency, on every shard."""

    def __init__(self, router: ShardRouter[ShardStore]) -> None:
        self.router = router

    @property
    def home_shard(self) -> str:
        return self.router.shard_name_for(clearing.CLEARING_HOME_KEY)

    async def shares(self, participant_id: str, currency: str, timeout_seconds: float) -> dict[str, PositionShare]:
        """Every shard's share (zeros and no allotment where it has none yet), read at once."""

        async def read(store: ShardStore) -> PositionShare:
            async with store.session(timeout_seconds) as session:
                (found,) = await session.run(session.begin(SELECT_SHARE, COMMIT), [participant_id, currency])
            return share_from_row(found[0]) if found else PositionShare(participant_id, currency)

        stores = sorted(self.router.handles(), key=lambda store: store.shard_name)
        shares = await asyncio.gather(*(read(store) for store in stores))
        return {store.shard_name: share for store, share in zip(stores, shares)}

    async def rebalance(
        self, participant_id: str, currency: str, timeout_seconds: float, need_shard: str = "", need_minor: int = 0,
        cap_minor: int | None | _Keep = KEEP, threshold_percent: int | None = None,
    ) -> dict[str, PositionShare]:
        """Lock the participant's cap (on the clearing home) and its share on every shard, set the
        cap (and threshold) when given, give each shard its new allotment (clearing.rebalanced_allotments,
        `need_shard` its `need_minor` on top when it fits) and commit in clearing.commit_phases order.
        Every shard's share as it now is. A shard that fails: SHARD_UNAVAILABLE (what committed
        before it never sums past the cap; the next rebalance recomputes it all)."""
        home = self.home_shard
        stores = sorted(self.router.handles(), key=lambda store: store.shard_name)
        try:
            async with contextlib.AsyncExitStack() as stack:
                sessions: dict[str, Session] = {}
                shares: dict[str, PositionShare] = {}
                cap: int | None = None
                for store in stores:
                    session = await stack.enter_async_context(store.session(timeout_seconds))
                    sessions[store.shard_name] = session
                    if store.shard_name == home:
                        cap = await self._lock_cap(session, participant_id, currency, cap_minor, threshold_percent)
                    *_, locked = await session.run(
                        session.begin(ENSURE_SHARE, LOCK_SHARE), [participant_id, currency, participant_id, currency]
                    )
                    shares[store.shard_name] = share_from_row(locked[0])
                if home not in sessions:
                    raise errors.ShardUnavailable(f"the clearing home shard {home} is not in the shard map", shard=home)
                old = {shard: share.allotment_minor for shard, share in shares.items()}
                new = clearing.rebalanced_allotments(shares, cap, need_shard, need_minor)
                for shard, allotment in new.items():
                    if allotment != old[shard]:
                        await sessions[shard].run(SET_ALLOTMENT, [allotment, participant_id, currency])
                for phase in clearing.commit_phases(old, new, home):
                    for shard in phase:
                        await sessions[shard].run(COMMIT)
        except errors.LedgerError as error:
            if error.transient or isinstance(error, errors.DeadlineExceeded):
                raise errors.ShardUnavailable(
                    f"rebalancing the net debit cap of {participant_id} in {currency} failed ({error}); retry", shard=getattr(error, "shard", "")
                ) from error
            raise
        return {shard: dataclasses.replace(share, allotment_minor=new[shard]) for shard, share in shares.items()}

    @staticmethod
    async def _lock_cap(
        session: Session, participant_id: str, currency: str, cap_minor: int | None | _Keep, threshold_percent: int | None
    ) -> int | None:
        """On the clearing home: lock the participant's currency row (the hosting participant's is
        made on first need), write the new cap and threshold; the cap that holds now."""
        statements, params = [], []
        if participant_id == clearing.HOSTING_PARTICIPANT_ID:
            statements += [ENSURE_HOSTING_PARTICIPANT, ENSURE_HOSTING_CURRENCY]
            params += [participant_id, HOSTING_REGISTRATION_REQUEST_ID, clearing.HOSTING_PARTICIPANT_NAME,
                       participant_id, currency, clearing.settlement_account_id(participant_id, currency)]
        found, participant = await session.run(
            session.begin(*statements, LOCK_PARTICIPANT_CURRENCY, SELECT_PARTICIPANT), [*params, participant_id, currency, participant_id]
        )
        if not found:
            if not participant:
                raise errors.ParticipantNotFound(f"participant {participant_id} is not registered", participant_id=participant_id)
            raise errors.ParticipantCurrencyNotEnabled(
                f"participant {participant_id} does not have {currency}", participant_id=participant_id, currency=currency
            )
        cap = found[0][0]
        if not isinstance(cap_minor, _Keep):
            await session.run(SET_CAP, [cap_minor, participant_id, currency])
            cap = cap_minor
        if threshold_percent is not None:
            await session.run(SET_THRESHOLD, [threshold_percent, participant_id, currency])
        return None if cap is None else int(cap)
