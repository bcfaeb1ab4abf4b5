"""Clearing's storage (services/ledger/clearing.py has the model): the registry on the clearing
home shard (participants, caps, windows, settlements) and, on every shard, the window totals,
the shard's current window and the position resets. Positions themselves (shares, caps'
allotments, rebalancing) are services/storage/positions.py's.

Every operation is a few `BEGIN ... COMMIT` batches through ShardStore.session, like the rest
of the storage layer; each first batch only reads and locks, or writes idempotently (ON
CONFLICT, compare-and-set on a state), so it is safe to send again on a fresh connection.
Every step of a window close and of a settlement is idempotent on its own: a step interrupted
by a crash or an unreachable shard is completed by running it again.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime

from services.ledger import clearing
from services.ledger.accounts import AccountKind, AccountStatus
from services.ledger.clearing import ParticipantTotal, SettlementModel, SettlementState, WindowState
from services.storage.shard_store import COMMIT, ShardStore, batch
from sharding.router import ShardRouter

# A window close waits at most this long for a shard's exclusive window lock (the transactions
# posting cleared transfers hold it shared for a few milliseconds). While it waits, new
# transfers of that shard queue behind it: bounded here, so a close never stalls them for long.
WINDOW_LOCK_TIMEOUT_MS = 1_000
# Settlement ids: max + 1 on the home, under this transaction-scoped advisory lock (any fixed
# bigint other than clearing.WINDOW_LOCK_KEY and CLOSE_LOCK_KEY), so two settlements created at once never race.
SETTLEMENT_ID_LOCK_KEY = 7_340_011_003

PARTICIPANT_COLUMNS = "participant_id, request_id, name, created_at"
CURRENCY_COLUMNS = "participant_id, currency, settlement_account_id, net_debit_cap_minor, threshold_percent"
WINDOW_COLUMNS = "window_id, state, opened_at, closed_at, reason, close_request_id, settlement_id"
SETTLEMENT_COLUMNS = "settlement_id, request_id, model, state, window_ids, created_at, settled_at"
ENTRY_COLUMNS = "settlement_id, participant_id, currency, debits_minor, credits_minor, transfers, settled_at"

# Registration: both rows or neither; a taken participant_id or request_id inserts nothing,
# and the two SELECTs tell which (the caller decides: a retry, a conflict, or another's id).
INSERT_PARTICIPANT = """
    WITH inserted AS (
        INSERT INTO participants (participant_id, request_id, name) VALUES (%s, %s, %s)
        ON CONFLICT DO NOTHING RETURNING participant_id
    )
    INSERT INTO participant_currencies (participant_id, currency, settlement_account_id)
    SELECT inserted.participant_id, c.currency, c.account FROM inserted, unnest(%s::text[], %s::text[]) AS c(currency, account)"""
SELECT_PARTICIPANT_BY_REQUEST = f"SELECT {PARTICIPANT_COLUMNS} FROM participants WHERE request_id = %s"  # nosec B608 # constants only
SELECT_PARTICIPANT = f"SELECT {PARTICIPANT_COLUMNS} FROM participants WHERE participant_id = %s"  # nosec B608 # constants only
SELECT_CURRENCIES = f"SELECT {CURRENCY_COLUMNS} FROM participant_currencies WHERE participant_id = %s ORDER BY currency"  # nosec B608 # constants only
SELECT_CURRENCY = f"SELECT {CURRENCY_COLUMNS} FROM participant_currencies WHERE participant_id = %s AND currency = %s"  # nosec B608 # constants only
# The hosting participant has every currency: its row for one is made when first needed.
ENSURE_HOSTING_CURRENCY = """
    INSERT INTO participant_currencies (participant_id, currency, settlement_account_id) VALUES (%s, %s, %s)
    ON CONFLICT DO NOTHING"""
# Settlement accounts (SYSTEM kind), like tcc_store.ENSURE_CLEARING_ACCOUNTS: their id is their request_id.
ENSURE_SETTLEMENT_ACCOUNTS = f"""
    INSERT INTO accounts (account_id, request_id, owner_id, currency, kind, tier, status, participant_id)
    SELECT id, id, participant, currency, {int(AccountKind.SYSTEM)}, 0, {int(AccountStatus.ACTIVE)}, participant
    FROM unnest(%s::text[], %s::text[], %s::text[]) AS settlement(id, currency, participant)
    ON CONFLICT (account_id) DO NOTHING"""  # nosec B608 # constants only, no request data

SELECT_WINDOW = f"SELECT {WINDOW_COLUMNS} FROM settlement_windows WHERE window_id = %s"  # nosec B608 # constants only
SELECT_OPEN_WINDOW = f"SELECT {WINDOW_COLUMNS} FROM settlement_windows WHERE state = {int(WindowState.OPEN)}"  # nosec B608 # constants only
SELECT_WINDOWS = f"SELECT {WINDOW_COLUMNS} FROM settlement_windows WHERE window_id = ANY(%s::bigint[]) ORDER BY window_id"  # nosec B608 # constants only
LIST_WINDOWS = f"""
    SELECT {WINDOW_COLUMNS} FROM settlement_windows
    WHERE window_id < %s AND (%s = 0 OR state = %s) ORDER BY window_id DESC LIMIT %s"""  # nosec B608 # constants only
SELECT_WINDOW_CLOSED_BY = f"SELECT {WINDOW_COLUMNS} FROM settlement_windows WHERE close_request_id = %s"  # nosec B608 # constants only
# The open window and any left CLOSING, locked: one close at a time moves them.
LOCK_CLOSES = f"SELECT pg_advisory_xact_lock({clearing.CLOSE_LOCK_KEY})"
LOCK_OPEN_AND_CLOSING_WINDOWS = f"""
    SELECT {WINDOW_COLUMNS} FROM settlement_windows
    WHERE state IN ({int(WindowState.OPEN)}, {int(WindowState.CLOSING)}) ORDER BY window_id FOR UPDATE"""  # nosec B608 # constants only
START_CLOSE = f"""
    UPDATE settlement_windows SET state = {int(WindowState.CLOSING)}, closed_at = now(), reason = %s, close_request_id = %s
    WHERE window_id = %s AND state = {int(WindowState.OPEN)}"""  # nosec B608 # constants only
OPEN_WINDOW = f"INSERT INTO settlement_windows (window_id, state) VALUES (%s, {int(WindowState.OPEN)})"  # nosec B608 # constants only
FINISH_CLOSE = f"""
    UPDATE settlement_windows SET state = {int(WindowState.CLOSED)}
    WHERE window_id = %s AND state = {int(WindowState.CLOSING)}"""  # nosec B608 # constants only
SELECT_CLOSING_WINDOWS = f"""
    SELECT window_id FROM settlement_windows
    WHERE state = {int(WindowState.CLOSING)} AND closed_at <= now() - make_interval(secs => %s) ORDER BY window_id"""  # nosec B608 # constants only
# Every shard: transfers posting cleared transfers hold the lock shared; this waits for them.
SWITCH_SHARD_WINDOW = batch(
    f"SET LOCAL lock_timeout = {WINDOW_LOCK_TIMEOUT_MS}",
    f"SELECT pg_advisory_xact_lock({clearing.WINDOW_LOCK_KEY})",
    "UPDATE clearing_shard_window SET window_id = %s, switched_at = now() WHERE window_id = %s",
    "SELECT window_id FROM clearing_shard_window",
)

# What each participant paid and received over some windows on one shard.
WINDOW_TOTALS = """
    SELECT participant_id, currency, sum(debits_minor), sum(credits_minor), sum(transfers)
    FROM clearing_window_totals WHERE window_id = ANY(%s::bigint[]) GROUP BY participant_id, currency"""
PARTICIPANT_WINDOW_TOTALS = """
    SELECT participant_id, currency, sum(debits_minor), sum(credits_minor), sum(transfers)
    FROM clearing_window_totals WHERE window_id = ANY(%s::bigint[]) AND participant_id = %s AND currency = %s
    GROUP BY participant_id, currency"""

SELECT_SETTLEMENT = f"SELECT {SETTLEMENT_COLUMNS} FROM settlements WHERE settlement_id = %s"  # nosec B608 # constants only
SELECT_SETTLEMENT_BY_REQUEST = f"SELECT {SETTLEMENT_COLUMNS} FROM settlements WHERE request_id = %s"  # nosec B608 # constants only
SELECT_ENTRIES = f"SELECT {ENTRY_COLUMNS} FROM settlement_entries WHERE settlement_id = %s ORDER BY participant_id, currency"  # nosec B608 # constants only
LOCK_WINDOWS = f"SELECT {WINDOW_COLUMNS} FROM settlement_windows WHERE window_id = ANY(%s::bigint[]) ORDER BY window_id FOR UPDATE"  # nosec B608 # constants only
NEXT_SETTLEMENT_ID = batch(
    f"SELECT pg_advisory_xact_lock({SETTLEMENT_ID_LOCK_KEY})",
    "SELECT coalesce(max(settlement_id), 0) + 1 FROM settlements",
)
INSERT_SETTLEMENT = "INSERT INTO settlements (settlement_id, request_id, model, state, window_ids, settled_at) VALUES (%s, %s, %s, %s, %s::bigint[], CASE WHEN %s THEN now() END)"
INSERT_ENTRIES = """
    INSERT INTO settlement_entries (settlement_id, participant_id, currency, debits_minor, credits_minor, transfers)
    SELECT %s, participant, currency, debits, credits, transfers
    FROM unnest(%s::text[], %s::text[], %s::bigint[], %s::bigint[], %s::bigint[]) AS e(participant, currency, debits, credits, transfers)"""
SETTLE_WINDOWS = "UPDATE settlement_windows SET state = %s, settlement_id = %s WHERE window_id = ANY(%s::bigint[])"
# Step 3 of RecordParticipantSettled, on one shard: the barrier row, and if it is new, the
# participant's net over the settlement's windows on this shard taken out of its share.
RESET_POSITION = """
    WITH net AS (
        SELECT coalesce(sum(debits_minor - credits_minor), 0) AS amount FROM clearing_window_totals
        WHERE window_id = ANY(%s::bigint[]) AND participant_id = %s AND currency = %s
    ), reset AS (
        INSERT INTO clearing_position_resets (settlement_id, participant_id, currency, amount_minor)
        SELECT %s, %s, %s, amount FROM net
        ON CONFLICT DO NOTHING RETURNING amount_minor
    )
    INSERT INTO clearing_positions (participant_id, currency, position_minor)
    SELECT %s, %s, -amount_minor FROM reset WHERE amount_minor <> 0
    ON CONFLICT (participant_id, currency) DO UPDATE
    SET position_minor = clearing_positions.position_minor + EXCLUDED.position_minor, updated_at = now()"""
# Step 4, on the home: under the settlement's row lock, so that of two participants recorded at
# once the second sees the first's entry settled, and exactly one of them settles the whole.
LOCK_SETTLEMENT = f"SELECT {SETTLEMENT_COLUMNS} FROM settlements WHERE settlement_id = %s FOR UPDATE"  # nosec B608 # constants only
SETTLE_ENTRY = """
    UPDATE settlement_entries SET settled_at = now()
    WHERE settlement_id = %s AND participant_id = %s AND currency = %s AND settled_at IS NULL"""
SETTLE_IF_COMPLETE = f"""
    WITH complete AS (
        UPDATE settlements SET state = {int(SettlementState.SETTLED)}, settled_at = now()
        WHERE settlement_id = %s AND state = {int(SettlementState.PENDING)}
          AND NOT EXISTS (SELECT 1 FROM settlement_entries WHERE settlement_id = %s AND settled_at IS NULL)
        RETURNING settlement_id
    )
    UPDATE settlement_windows SET state = {int(WindowState.SETTLED)}
    WHERE settlement_id IN (SELECT settlement_id FROM complete) AND state = {int(WindowState.PENDING_SETTLEMENT)}"""  # nosec B608 # constants only


@dataclasses.dataclass(frozen=True)
class ParticipantCurrency:
    participant_id: str
    currency: str
    settlement_account_id: str
    net_debit_cap_minor: int | None
    threshold_percent: int


@dataclasses.dataclass(frozen=True)
class Participant:
    participant_id: str
    request_id: str
    name: str
    created_at: datetime.datetime
    currencies: tuple[ParticipantCurrency, ...]

    @property
    def hosting(self) -> bool:
        return self.participant_id == clearing.HOSTING_PARTICIPANT_ID


@dataclasses.dataclass(frozen=True)
class Window:
    window_id: int
    state: WindowState
    opened_at: datetime.datetime
    closed_at: datetime.datetime | None
    reason: str
    close_request_id: str | None
    settlement_id: int | None


@dataclasses.dataclass(frozen=True)
class SettlementEntry:
    participant_id: str
    currency: str
    debits_minor: int
    credits_minor: int
    transfers: int
    settled_at: datetime.datetime | None

    @property
    def total(self) -> ParticipantTotal:
        return ParticipantTotal(self.participant_id, self.currency, self.debits_minor, self.credits_minor, self.transfers)


@dataclasses.dataclass(frozen=True)
class Settlement:
    settlement_id: int
    request_id: str
    model: SettlementModel
    state: SettlementState
    window_ids: tuple[int, ...]
    created_at: datetime.datetime
    settled_at: datetime.datetime | None
    entries: tuple[SettlementEntry, ...]

    def entry(self, participant_id: str, currency: str) -> SettlementEntry | None:
        return next((e for e in self.entries if (e.participant_id, e.currency) == (participant_id, currency)), None)


def _currency(row: tuple) -> ParticipantCurrency:
    return ParticipantCurrency(row[0], row[1], row[2], None if row[3] is None else int(row[3]), int(row[4]))


def _participant(row: tuple, currencies: list[tuple]) -> Participant:
    return Participant(row[0], row[1], row[2], row[3], tuple(_currency(c) for c in currencies))


def _window(row: tuple) -> Window:
    return Window(int(row[0]), WindowState(row[1]), row[2], row[3], row[4], row[5], None if row[6] is None else int(row[6]))


def _settlement(row: tuple, entries: list[tuple]) -> Settlement:
    return Settlement(
        int(row[0]), row[1], SettlementModel(row[2]), SettlementState(row[3]), tuple(int(w) for w in row[4]), row[5], row[6],
        tuple(SettlementEntry(e[1], e[2], int(e[3]), int(e[4]), int(e[5]), e[6]) for e in entries),
    )


def _total_rows(rows: list[tuple]) -> list[tuple[str, str, int, int, int]]:
    return [(p, c, int(d), int(cr), int(t)) for p, c, d, cr, t in rows]


class ClearingStore:
    """The registry on the clearing home shard, and clearing's rows on every shard."""

    def __init__(self, router: ShardRouter[ShardStore]) -> None:
        self.router = router

    @property
    def home_shard(self) -> str:
        return self.router.shard_name_for(clearing.CLEARING_HOME_KEY)

    def _home(self) -> ShardStore:
        return self.router.handle(self.home_shard)

    def shard_names(self) -> list[str]:
        return [shard.name for shard in self.router.shard_map.shards]

    # Participants.

    async def register_participant(
        self, request_id: str, participant_id: str, name: str, currencies: list[str], timeout_seconds: float
    ) -> tuple[Participant | None, str | None]:
        """Insert the participant and its currencies unless its id or the request_id is taken:
        (the participant this request_id registered, the request_id that registered participant_id)."""
        accounts = [clearing.settlement_account_id(participant_id, currency) for currency in currencies]
        async with self._home().session(timeout_seconds) as session:
            by_request, by_id = await session.run(
                session.begin(INSERT_PARTICIPANT, SELECT_PARTICIPANT_BY_REQUEST, SELECT_PARTICIPANT, COMMIT),
                [participant_id, request_id, name, currencies, accounts, request_id, participant_id],
            )
        registered = await self.get_participant(by_request[0][0], timeout_seconds) if by_request else None
        return registered, (by_id[0][1] if by_id else None)

    async def get_participant(self, participant_id: str, timeout_seconds: float) -> Participant | None:
        async with self._home().session(timeout_seconds) as session:
            found, currencies = await session.run(
                session.begin(SELECT_PARTICIPANT, SELECT_CURRENCIES, COMMIT), [participant_id, participant_id]
            )
        return _participant(found[0], currencies) if found else None

    async def participant_currency(
        self, participant_id: str, currency: str, timeout_seconds: float, ensure_hosting: bool = False
    ) -> ParticipantCurrency | None:
        """The participant's row for the currency (`ensure_hosting`: the hosting participant's is
        made if missing: it has every currency). None: no such participant, or not that currency."""
        statements = [SELECT_CURRENCY, COMMIT]
        params = [participant_id, currency]
        if ensure_hosting and participant_id == clearing.HOSTING_PARTICIPANT_ID:
            statements.insert(0, ENSURE_HOSTING_CURRENCY)
            params = [participant_id, currency, clearing.settlement_account_id(participant_id, currency), *params]
        async with self._home().session(timeout_seconds) as session:
            rows = (await session.run(session.begin(*statements), params))[-1]
        return _currency(rows[0]) if rows else None

    async def ensure_settlement_accounts(self, accounts: list[tuple[str, str, str]], timeout_seconds: float) -> None:
        """(account_id, currency, participant_id) SYSTEM accounts, each on the shard its id hashes to."""
        by_shard: dict[str, list[tuple[str, str, str]]] = {}
        for account in accounts:
            by_shard.setdefault(self.router.shard_name_for(account[0]), []).append(account)

        async def ensure(shard_name: str, rows: list[tuple[str, str, str]]) -> None:
            async with self.router.handle(shard_name).session(timeout_seconds) as session:
                await session.run(session.begin(ENSURE_SETTLEMENT_ACCOUNTS, COMMIT), [list(column) for column in zip(*rows)])

        await _all(ensure(shard_name, rows) for shard_name, rows in by_shard.items())

    # Windows.

    async def get_window(self, window_id: int, timeout_seconds: float) -> Window | None:
        """The window; window_id 0: the open one."""
        async with self._home().session(timeout_seconds) as session:
            if window_id:
                (rows,) = await session.run(session.begin(SELECT_WINDOW, COMMIT), [window_id])
            else:
                (rows,) = await session.run(session.begin(SELECT_OPEN_WINDOW, COMMIT))
        return _window(rows[0]) if rows else None

    async def get_windows(self, window_ids: list[int], timeout_seconds: float) -> dict[int, Window]:
        async with self._home().session(timeout_seconds) as session:
            (rows,) = await session.run(session.begin(SELECT_WINDOWS, COMMIT), [window_ids])
        return {window.window_id: window for window in map(_window, rows)}

    async def list_windows(self, state: int, before_window_id: int, limit: int, timeout_seconds: float) -> list[Window]:
        """Newest first, below `before_window_id`; state 0: any."""
        async with self._home().session(timeout_seconds) as session:
            (rows,) = await session.run(session.begin(LIST_WINDOWS, COMMIT), [before_window_id, state, state, limit])
        return [_window(row) for row in rows]

    async def start_close(self, request_id: str, reason: str, timeout_seconds: float) -> tuple[int | None, int | None]:
        """On the home: (the window `request_id` closed, None) if it closed one already; else
        (None, a CLOSING window to finish first) if a close was interrupted; else it moves the
        open window n to CLOSING and opens n + 1, and answers (n, None)."""
        async with self._home().session(timeout_seconds) as session:
            _, closed_by, locked = await session.run(
                session.begin(LOCK_CLOSES, SELECT_WINDOW_CLOSED_BY, LOCK_OPEN_AND_CLOSING_WINDOWS), [request_id]
            )
            if closed_by:
                return int(closed_by[0][0]), None
            windows = [_window(row) for row in locked]
            closing = [window for window in windows if window.state is WindowState.CLOSING]
            if closing:
                return None, closing[0].window_id
            (open_window,) = windows
            await session.run(batch(START_CLOSE, OPEN_WINDOW, COMMIT), [reason, request_id, open_window.window_id, open_window.window_id + 1])
        return open_window.window_id, None

    async def switch_shard_window(self, shard_name: str, window_id: int, timeout_seconds: float) -> int:
        """One shard moves from window `window_id` on to the next (idempotent); its current window after."""
        async with self.router.handle(shard_name).session(timeout_seconds) as session:
            rows = await session.run(session.begin(SWITCH_SHARD_WINDOW, COMMIT), [window_id + 1, window_id])
        return int(rows[-1][0][0])

    async def finish_close(self, window_id: int, timeout_seconds: float) -> None:
        """On the home, once every shard moved on: CLOSING -> CLOSED (idempotent)."""
        async with self._home().session(timeout_seconds) as session:
            await session.run(session.begin(FINISH_CLOSE, COMMIT), [window_id])

    async def closing_windows(self, older_than_seconds: float, timeout_seconds: float) -> list[int]:
        async with self._home().session(timeout_seconds) as session:
            (rows,) = await session.run(session.begin(SELECT_CLOSING_WINDOWS, COMMIT), [older_than_seconds])
        return [int(row[0]) for row in rows]

    # Window totals (every shard).

    async def window_totals(self, window_ids: list[int], timeout_seconds: float) -> list[tuple[str, str, int, int, int]]:
        """(participant, currency, debits, credits, transfers) of the windows, one row per shard and
        participant and currency (clearing.summed_totals adds them up)."""

        async def on(shard_name: str) -> list[tuple]:
            async with self.router.handle(shard_name).session(timeout_seconds) as session:
                (rows,) = await session.run(session.begin(WINDOW_TOTALS, COMMIT), [window_ids])
            return _total_rows(rows)

        return [row for rows in await _all(on(shard_name) for shard_name in self.shard_names()) for row in rows]

    async def participant_window_totals(
        self, window_ids: list[int], participant_id: str, currency: str, timeout_seconds: float
    ) -> list[tuple[str, str, int, int, int]]:
        async def on(shard_name: str) -> list[tuple]:
            async with self.router.handle(shard_name).session(timeout_seconds) as session:
                (rows,) = await session.run(session.begin(PARTICIPANT_WINDOW_TOTALS, COMMIT), [window_ids, participant_id, currency])
            return _total_rows(rows)

        return [row for rows in await _all(on(shard_name) for shard_name in self.shard_names()) for row in rows]

    # Settlements.

    async def get_settlement(self, settlement_id: int, timeout_seconds: float) -> Settlement | None:
        async with self._home().session(timeout_seconds) as session:
            found, entries = await session.run(session.begin(SELECT_SETTLEMENT, SELECT_ENTRIES, COMMIT), [settlement_id, settlement_id])
        return _settlement(found[0], entries) if found else None

    async def settlement_by_request(self, request_id: str, timeout_seconds: float) -> Settlement | None:
        async with self._home().session(timeout_seconds) as session:
            (found,) = await session.run(session.begin(SELECT_SETTLEMENT_BY_REQUEST, COMMIT), [request_id])
        return await self.get_settlement(int(found[0][0]), timeout_seconds) if found else None

    async def create_settlement(
        self, request_id: str, window_ids: list[int], model: SettlementModel, totals: list[ParticipantTotal],
        check_windows, timeout_seconds: float,
    ) -> int:
        """In one home transaction: lock the windows, `check_windows(windows by id)` (raises its
        refusal), store the settlement and its entries, windows -> PENDING_SETTLEMENT (SETTLED at
        once when there are no entries). The new settlement's id; a KeyTaken when a racing
        copy of this request_id stored it first."""
        async with self._home().session(timeout_seconds) as session:
            (locked,) = await session.run(session.begin(LOCK_WINDOWS), [window_ids])
            check_windows({window.window_id: window for window in map(_window, locked)})
            _, (next_id,) = await session.run(NEXT_SETTLEMENT_ID)
            settlement_id = int(next_id[0])
            settled = not totals
            statements = [INSERT_SETTLEMENT, SETTLE_WINDOWS]
            params: list = [
                settlement_id, request_id, int(model), int(SettlementState.SETTLED if settled else SettlementState.PENDING), window_ids, settled,
                int(WindowState.SETTLED if settled else WindowState.PENDING_SETTLEMENT), settlement_id, window_ids,
            ]
            if totals:
                statements.append(INSERT_ENTRIES)
                params += [
                    settlement_id, [t.participant_id for t in totals], [t.currency for t in totals],
                    [t.debits_minor for t in totals], [t.credits_minor for t in totals], [t.transfer_count for t in totals],
                ]
            await session.run(batch(*statements, COMMIT), params)
        return settlement_id

    async def reset_position(
        self, shard_name: str, settlement_id: int, window_ids: list[int], participant_id: str, currency: str, timeout_seconds: float
    ) -> None:
        async with self.router.handle(shard_name).session(timeout_seconds) as session:
            await session.run(
                session.begin(RESET_POSITION, COMMIT),
                [window_ids, participant_id, currency, settlement_id, participant_id, currency, participant_id, currency],
            )

    async def settle_entry(self, settlement_id: int, participant_id: str, currency: str, timeout_seconds: float) -> None:
        """The entry settled; the settlement and its windows SETTLED when it was the last (idempotent)."""
        async with self._home().session(timeout_seconds) as session:
            await session.run(
                session.begin(LOCK_SETTLEMENT, SETTLE_ENTRY, SETTLE_IF_COMPLETE, COMMIT),
                [settlement_id, settlement_id, participant_id, currency, settlement_id, settlement_id],
            )


async def _all(coroutines) -> list:
    """Run on every shard at once; the first failure is raised once all have ended (none is left running)."""
    results = await asyncio.gather(*coroutines, return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return results

