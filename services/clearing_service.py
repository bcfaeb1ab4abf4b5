"""Clearing's use cases (corebank.v1.Clearing): authorise the caller, validate, apply idempotency,
bound each by its deadline. No gRPC here, like services/ledger_service.py; the model is
services/ledger/clearing.py's docstring, the storage services/storage/clearing_store.py and
services/storage/positions.py.

Each use case asks, in order: the caller's rate limit (the ledger's limiter), its role
(authorization.check_clearing), the request's validation; nothing is stored before all three.

Closing window n: (1) on the home, n -> CLOSING and n + 1 OPEN, in one transaction idempotent
by close_request_id; (2) every shard moves its current window from n to n + 1 under the
exclusive window lock; (3) on the home, n -> CLOSED. A close that finds a window left CLOSING
finishes it first; so do the coordinators (`finish_interrupted_closes`).

Recording a participant settled: (1) its settlement account and the settlement bank's exist;
(2) the settlement legs are posted as the ledger's own transfers (idempotent by id); (3) every
shard takes the settlement's windows out of the participant's share, once (a barrier row);
(4) the entry is marked settled, and the settlement and its windows SETTLED with the last one.
Each step is idempotent, so a retry after a crash between any two completes the record.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import logging
import re
import time
from collections.abc import Callable

from services.ledger import authorization, clearing, errors, ids, money, paging
from services.ledger.access import Caller
from services.ledger.authorization import ClearingAction
from services.ledger.clearing import ParticipantTotal, SettlementModel, WindowState
from services.storage.clearing_store import ClearingStore, Participant, ParticipantCurrency, Settlement, Window
from services.storage.shard_store import KeyTaken

log = logging.getLogger(__name__)

# RecordParticipantSettled's steps, after which a test can make the use case fail as a crash
# would (`ClearingService.reached`): nothing after the step runs.
AFTER_ACCOUNTS = "after_settlement_accounts"
AFTER_LEGS = "after_settlement_legs"
AFTER_RESETS = "after_position_resets"
# CloseSettlementWindow's: the home moved the window to CLOSING; every shard moved on.
AFTER_CLOSE_STARTED = "after_close_started"
AFTER_SHARDS_SWITCHED = "after_shards_switched"
STEPS = (AFTER_ACCOUNTS, AFTER_LEGS, AFTER_RESETS, AFTER_CLOSE_STARTED, AFTER_SHARDS_SWITCHED)

# A close meets a window another close left CLOSING, finishes it, and starts again: a close
# racing others gives up (SHARD_UNAVAILABLE, retry with the same request_id) after this many.
CLOSE_ATTEMPTS_MAX = 5
REASON_LENGTH_MAX = 256
_CONTROL_CHARACTER = re.compile(r"[\x00-\x1f\x7f]")
# Reconcile's explicit windows: as many as a settlement may hold.
RECONCILE_WINDOWS_MAX = clearing.SETTLEMENT_WINDOWS_MAX
# A page token names its listing: a token of another listing (another state filter) is refused.
WINDOWS_LISTING = "settlement_windows"
WINDOW_ID_BEFORE_FIRST_PAGE = paging.SEQ_BEFORE_FIRST_PAGE


class Unimplemented(Exception):
    """A use case whose implementation is not in this build (the servicer answers UNIMPLEMENTED)."""


@dataclasses.dataclass(frozen=True)
class Position:
    """corebank.v1.Position: the participant's position in a currency, over every shard."""

    participant_id: str
    currency: str
    position_minor: int
    reserved_minor: int
    window_position_minor: int
    window_id: int
    net_debit_cap_minor: int | None
    threshold_percent: int

    @property
    def threshold_reached(self) -> bool:
        return clearing.threshold_reached(self.position_minor, self.net_debit_cap_minor, self.threshold_percent)

    @property
    def headroom_minor(self) -> int:
        """cap - position; a participant owed more than int64 less its cap may owe as much as
        int64 holds (the contract's field), not more."""
        return 0 if self.net_debit_cap_minor is None else min(self.net_debit_cap_minor - self.position_minor, money.INT64_MAX)


@dataclasses.dataclass(frozen=True)
class WindowView:
    """A window, and (GetSettlementWindow only) what was posted in it so far."""

    window: Window
    totals: tuple[ParticipantTotal, ...] = ()
    transfer_count: int = 0


def _no_crash(step: str) -> None:
    return None


def _deadline(timeout_seconds: float) -> float:
    return asyncio.get_running_loop().time() + timeout_seconds


def _left(deadline: float) -> float:
    left_seconds = deadline - asyncio.get_running_loop().time()
    if left_seconds <= 0:
        raise errors.DeadlineExceeded("the deadline passed; whatever was done is kept, a retry completes the rest")
    return left_seconds


def validate_name(name: str) -> str:
    if not name:
        raise errors.MissingField("name is required", field="name")
    if len(name) > clearing.PARTICIPANT_NAME_LENGTH_MAX:
        raise errors.FieldTooLong(
            f"name is longer than {clearing.PARTICIPANT_NAME_LENGTH_MAX} characters", field="name", limit=clearing.PARTICIPANT_NAME_LENGTH_MAX
        )
    if _CONTROL_CHARACTER.search(name):
        raise errors.InvalidField("name may not hold control characters", field="name")
    return name


def validate_currencies(currencies: list[str]) -> list[str]:
    if not currencies:
        raise errors.MissingField("currencies: at least one is required", field="currencies")
    if len(currencies) > clearing.PARTICIPANT_CURRENCIES_MAX:
        raise errors.InvalidField(f"currencies: at most {clearing.PARTICIPANT_CURRENCIES_MAX}", field="currencies")
    for currency in currencies:
        money.validate_currency(currency)
    if len(set(currencies)) != len(currencies):
        raise errors.InvalidField("currencies: each at most once", field="currencies")
    return sorted(currencies)


def validate_reason(reason: str) -> str:
    if len(reason) > REASON_LENGTH_MAX:
        raise errors.FieldTooLong(f"reason is longer than {REASON_LENGTH_MAX} characters", field="reason", limit=REASON_LENGTH_MAX)
    if _CONTROL_CHARACTER.search(reason):
        raise errors.InvalidField("reason may not hold control characters", field="reason")
    return reason


def validate_window_ids(window_ids: list[int], limit: int, required: bool = True) -> list[int]:
    if not window_ids and required:
        raise errors.MissingField("window_ids: at least one is required", field="window_ids")
    if len(window_ids) > limit:
        raise errors.InvalidField(f"window_ids: at most {limit}", field="window_ids")
    if len(set(window_ids)) != len(window_ids):
        raise errors.InvalidField("window_ids: each at most once", field="window_ids")
    if any(window_id <= 0 or window_id > money.INT64_MAX for window_id in window_ids):
        raise errors.InvalidField("window_ids: window ids start at 1", field="window_ids")
    return sorted(window_ids)


def validate_window_state(state: int) -> int:
    if state != 0 and state not in WindowState._value2member_map_:
        raise errors.InvalidField("state is not a SettlementWindowState", field="state")
    return state


def encode_windows_page_token(state: int, before_window_id: int) -> str:
    payload = json.dumps({"listing": WINDOWS_LISTING, "state": state, "before_window_id": before_window_id}, separators=(",", ":"))
    return base64.urlsafe_b64encode(payload.encode()).decode().rstrip("=")


def decode_windows_page_token(token: str, state: int) -> int:
    """The window id to list below; a token is valid only for the listing (state filter) it was issued for."""
    if not token:
        return WINDOW_ID_BEFORE_FIRST_PAGE
    if len(token) > paging.PAGE_TOKEN_CHARS_MAX:
        raise errors.InvalidPageToken("page_token is not one this service issued")
    try:
        payload = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
        listing, issued_state, before = payload["listing"], payload["state"], payload["before_window_id"]
    except (ValueError, KeyError, TypeError, RecursionError) as error:
        raise errors.InvalidPageToken("page_token is not one this service issued") from error
    if listing != WINDOWS_LISTING or issued_state != state or type(before) is not int or not 0 < before <= WINDOW_ID_BEFORE_FIRST_PAGE:
        raise errors.InvalidPageToken("page_token was issued for another listing")
    return before


def within_int64(value: int, what: str, **metadata: object) -> int:
    """The contract's amounts are int64 (clearing.proto), and so are the registry's columns; each
    shard keeps its own counters within int64, but a sum over shards (a position, a window's
    totals) or over windows (a settlement's) may pass it. Such a sum is refused BALANCE_OVERFLOW,
    a typed answer, instead of failing as an internal fault while the answer is built or stored."""
    if not -money.INT64_MAX - 1 <= value <= money.INT64_MAX:
        raise errors.BalanceOverflow(f"{what} is {value}: it leaves the int64 range of the Clearing contract", **metadata)
    return value


def totals_within_int64(totals: list[ParticipantTotal], what: str) -> list[ParticipantTotal]:
    """Every participant's summed debits, credits and net in int64 (within_int64)."""
    for total in totals:
        for name, value in (("debits", total.debits_minor), ("credits", total.credits_minor), ("net", total.net_minor)):
            within_int64(value, f"{what}: the {name} of {total.participant_id} in {total.currency}",
                         participant_id=total.participant_id, currency=total.currency)
    return totals


def check_settleable(window_ids: list[int], windows: dict[int, Window]) -> None:
    """CreateSettlement's rule on its windows (in the request's order): each exists and is CLOSED."""
    for window_id in window_ids:
        window = windows.get(window_id)
        if window is None:
            raise errors.SettlementWindowNotFound(f"settlement window {window_id} not found", window_id=str(window_id))
        if window.state in (WindowState.OPEN, WindowState.CLOSING):
            raise errors.SettlementWindowNotClosed(
                f"settlement window {window_id} is {window.state.name}: only CLOSED windows are settled", window_id=str(window_id)
            )
        if window.state is not WindowState.CLOSED:
            raise errors.SettlementWindowAlreadySettled(
                f"settlement window {window_id} is in settlement {window.settlement_id}",
                window_id=str(window_id), settlement_id=str(window.settlement_id or 0),
            )


class ClearingService:
    """`ledger` is the LedgerService: its rate limiter, and the settlement legs it posts."""

    def __init__(self, router, ledger, store: ClearingStore | None = None, positions=None) -> None:
        self.router = router
        self.ledger = ledger
        self.store = store or ClearingStore(router)
        self._positions = positions
        # Tests set it to fail at a named step (STEPS) as a crash would.
        self.reached: Callable[[str], None] = _no_crash

    @property
    def positions(self):
        """services/storage/positions.py's PositionStore (shares and rebalancing of caps)."""
        if self._positions is None:
            from services.storage.positions import PositionStore

            self._positions = PositionStore(self.router)
        return self._positions

    def _admit(self, caller: Caller, action: ClearingAction) -> None:
        self.ledger.rate_limiter.admit_call(caller)
        authorization.check_clearing(caller, action)

    # Participants.

    async def register_participant(
        self, caller: Caller, request_id: str, participant_id: str, name: str, currencies: list[str], timeout_seconds: float
    ) -> Participant:
        self._admit(caller, ClearingAction.REGISTER_PARTICIPANT)
        ids.validate_id(request_id, "request_id")
        clearing.validate_participant_id(participant_id)
        validate_name(name)
        currencies = validate_currencies(list(currencies))
        deadline = _deadline(timeout_seconds)
        registered, holder_request_id = await self.store.register_participant(request_id, participant_id, name, currencies, timeout_seconds)
        requested = {"participant_id": participant_id, "name": name, "currencies": ",".join(currencies)}
        if registered is None:
            if holder_request_id is None:
                raise errors.InternalFault("the participant was neither registered nor found; retry")
            raise errors.ParticipantExists(
                f"participant {participant_id} is registered by another request_id", participant_id=participant_id
            )
        first_use = {
            "participant_id": registered.participant_id, "name": registered.name,
            "currencies": ",".join(c.currency for c in registered.currencies),
        }
        conflict = ids.conflict_with_first_use("request_id", request_id, first_use, requested)
        if conflict is not None:
            raise conflict
        # Every time, not only when registered now: a retry completes what a failed attempt left out.
        await self.store.ensure_settlement_accounts(
            [(c.settlement_account_id, c.currency, participant_id) for c in registered.currencies]
            + [(clearing.settlement_bank_account_id(c.currency), c.currency, clearing.HOSTING_PARTICIPANT_ID) for c in registered.currencies],
            _left(deadline),
        )
        return registered

    async def get_participant(self, caller: Caller, participant_id: str, timeout_seconds: float) -> Participant:
        self._admit(caller, ClearingAction.READ)
        clearing.validate_participant_id(participant_id)
        participant = await self.store.get_participant(participant_id, timeout_seconds)
        if participant is None:
            raise _participant_not_found(participant_id)
        return participant

    async def _participant_currency(self, participant_id: str, currency: str, deadline: float, ensure: bool) -> ParticipantCurrency:
        """The participant's row for the currency, or its refusal. The hosting participant has
        every currency: its row is made when `ensure` (a cap is set), made up otherwise."""
        found = await self.store.participant_currency(participant_id, currency, _left(deadline), ensure_hosting=ensure)
        if found is not None:
            return found
        if participant_id == clearing.HOSTING_PARTICIPANT_ID:
            return ParticipantCurrency(
                participant_id, currency, clearing.settlement_account_id(participant_id, currency), None, clearing.DEFAULT_THRESHOLD_PERCENT
            )
        if await self.store.get_participant(participant_id, _left(deadline)) is None:
            raise _participant_not_found(participant_id)
        raise errors.ParticipantCurrencyNotEnabled(
            f"participant {participant_id} does not have currency {currency}", participant_id=participant_id, currency=currency
        )

    async def set_net_debit_cap(
        self, caller: Caller, participant_id: str, currency: str, cap_minor: int, threshold_percent: int, timeout_seconds: float
    ) -> Position:
        self._admit(caller, ClearingAction.SET_NET_DEBIT_CAP)
        clearing.validate_participant_id(participant_id)
        money.validate_currency(currency)
        if cap_minor < 0:
            raise errors.InvalidField("cap_minor must be 0 or more", field="cap_minor")
        threshold_percent = clearing.validate_threshold_percent(threshold_percent)
        deadline = _deadline(timeout_seconds)
        await self._participant_currency(participant_id, currency, deadline, ensure=True)
        await self.positions.rebalance(participant_id, currency, _left(deadline), cap_minor=cap_minor, threshold_percent=threshold_percent)
        return await self._position(participant_id, currency, deadline)

    async def get_position(self, caller: Caller, participant_id: str, currency: str, timeout_seconds: float) -> Position:
        self._admit(caller, ClearingAction.READ)
        clearing.validate_participant_id(participant_id)
        money.validate_currency(currency)
        return await self._position(participant_id, currency, _deadline(timeout_seconds))

    async def _position(self, participant_id: str, currency: str, deadline: float) -> Position:
        row = await self._participant_currency(participant_id, currency, deadline, ensure=False)
        open_window = await self.store.get_window(0, _left(deadline))
        shares, in_window = await asyncio.gather(
            self.positions.shares(participant_id, currency, _left(deadline)),
            self.store.participant_window_totals([open_window.window_id], participant_id, currency, _left(deadline)),
        )
        shares = list(shares.values()) if isinstance(shares, dict) else list(shares)
        window_totals = clearing.summed_totals(in_window)
        metadata = {"participant_id": participant_id, "currency": currency}
        return Position(
            participant_id, currency,
            position_minor=within_int64(sum(share.exposure_minor for share in shares), "the position", **metadata),
            reserved_minor=within_int64(sum(share.reserved_minor for share in shares), "the reserved amount", **metadata),
            window_position_minor=within_int64(sum(total.net_minor for total in window_totals), "the open window's position", **metadata),
            window_id=open_window.window_id,
            net_debit_cap_minor=row.net_debit_cap_minor,
            threshold_percent=row.threshold_percent,
        )

    # Windows.

    async def get_settlement_window(self, caller: Caller, window_id: int, timeout_seconds: float) -> WindowView:
        self._admit(caller, ClearingAction.READ)
        deadline = _deadline(timeout_seconds)
        window = await self.store.get_window(window_id, timeout_seconds)
        if window is None:
            raise _window_not_found(window_id)
        totals = clearing.summed_totals(await self.store.window_totals([window.window_id], _left(deadline)))
        totals_within_int64(totals, f"window {window.window_id}")
        return WindowView(window, tuple(totals), sum(total.transfer_count for total in totals))

    async def list_settlement_windows(
        self, caller: Caller, state: int, page_size: int, page_token: str, timeout_seconds: float
    ) -> tuple[list[Window], str]:
        self._admit(caller, ClearingAction.READ)
        validate_window_state(state)
        page_size = paging.validate_page_size(page_size)
        before = decode_windows_page_token(page_token, state)
        windows = await self.store.list_windows(state, before, page_size + 1, timeout_seconds)
        if len(windows) <= page_size:
            return windows, ""
        windows = windows[:page_size]
        return windows, encode_windows_page_token(state, windows[-1].window_id)

    async def close_settlement_window(self, caller: Caller, request_id: str, reason: str, timeout_seconds: float) -> tuple[Window, Window]:
        self._admit(caller, ClearingAction.CLOSE_WINDOW)
        ids.validate_id(request_id, "request_id")
        validate_reason(reason)
        deadline = _deadline(timeout_seconds)
        started = time.perf_counter()
        for _ in range(CLOSE_ATTEMPTS_MAX):
            closed, interrupted = await self.store.start_close(request_id, reason, _left(deadline))
            if interrupted is not None:
                log.info("window %d was left CLOSING; finishing its close first", interrupted)
                await self._finish_close(interrupted, deadline)
                continue
            self.reached(AFTER_CLOSE_STARTED)
            await self._finish_close(closed, deadline)
            break
        else:
            raise errors.ShardUnavailable("other window closes kept interrupting this one; retry with the same request_id")
        windows = await self.store.get_windows([closed, closed + 1], _left(deadline))
        log.info("settlement window %d closed in %.1f ms", closed, (time.perf_counter() - started) * 1000)
        return windows[closed], windows[closed + 1]

    async def _finish_close(self, window_id: int, deadline: float) -> None:
        """Every shard moves on from `window_id`, then the home marks it CLOSED (idempotent)."""
        names = self.store.shard_names()
        switched = await asyncio.gather(
            *(self.store.switch_shard_window(name, window_id, _left(deadline)) for name in names), return_exceptions=True
        )
        for result in switched:
            if isinstance(result, BaseException):
                raise result
        behind = [name for name, current in zip(names, switched) if current <= window_id]
        if behind:
            raise errors.InternalFault(f"shards {', '.join(behind)} are on a window before {window_id + 1}; window {window_id} stays CLOSING")
        self.reached(AFTER_SHARDS_SWITCHED)
        await self.store.finish_close(window_id, _left(deadline))

    async def finish_interrupted_closes(self, older_than_seconds: float, timeout_seconds: float) -> list[int]:
        """The coordinators' check: finish the closes left CLOSING for longer than `older_than_seconds`."""
        deadline = _deadline(timeout_seconds)
        finished = []
        for window_id in await self.store.closing_windows(older_than_seconds, timeout_seconds):
            await self._finish_close(window_id, deadline)
            finished.append(window_id)
        return finished

    # Settlements.

    async def create_settlement(
        self, caller: Caller, request_id: str, window_ids: list[int], model: int, timeout_seconds: float
    ) -> Settlement:
        self._admit(caller, ClearingAction.CREATE_SETTLEMENT)
        ids.validate_id(request_id, "request_id")
        window_ids = validate_window_ids(list(window_ids), clearing.SETTLEMENT_WINDOWS_MAX)
        if model not in SettlementModel._value2member_map_:
            raise errors.InvalidField("model must be DEFERRED_NET or GROSS", field="model")
        model = SettlementModel(model)
        deadline = _deadline(timeout_seconds)
        existing = await self.store.settlement_by_request(request_id, timeout_seconds)
        if existing is not None:
            return _same_settlement(request_id, existing, window_ids, model)
        check_settleable(window_ids, await self.store.get_windows(window_ids, _left(deadline)))
        # The windows are CLOSED: their totals never change again, on any shard.
        totals = totals_within_int64(clearing.summed_totals(await self.store.window_totals(window_ids, _left(deadline))), f"windows {window_ids}")
        unbalanced = clearing.nets_balance(totals)
        if unbalanced:
            log.error("windows %s: nets do not sum to zero: %s", window_ids, unbalanced)
            raise errors.InternalFault(f"the nets of windows {window_ids} do not sum to zero; nothing was stored (see the service log)")
        try:
            settlement_id = await self.store.create_settlement(
                request_id, window_ids, model, totals, lambda windows: check_settleable(window_ids, windows), _left(deadline)
            )
        except (KeyTaken, errors.SettlementWindowAlreadySettled):
            # A racing copy of this request may have stored it first: then it is the answer.
            existing = await self.store.settlement_by_request(request_id, _left(deadline))
            if existing is None:
                raise
            return _same_settlement(request_id, existing, window_ids, model)
        return await self._settlement(settlement_id, deadline)

    async def _settlement(self, settlement_id: int, deadline: float) -> Settlement:
        settlement = await self.store.get_settlement(settlement_id, _left(deadline))
        if settlement is None:
            raise errors.SettlementNotFound(f"settlement {settlement_id} not found", settlement_id=str(settlement_id))
        return settlement

    async def get_settlement(self, caller: Caller, settlement_id: int, timeout_seconds: float) -> Settlement:
        self._admit(caller, ClearingAction.READ)
        _validate_settlement_id(settlement_id)
        return await self._settlement(settlement_id, _deadline(timeout_seconds))

    async def record_participant_settled(
        self, caller: Caller, settlement_id: int, participant_id: str, currency: str, timeout_seconds: float
    ) -> Settlement:
        self._admit(caller, ClearingAction.RECORD_SETTLED)
        _validate_settlement_id(settlement_id)
        clearing.validate_participant_id(participant_id)
        money.validate_currency(currency)
        deadline = _deadline(timeout_seconds)
        settlement = await self._settlement(settlement_id, deadline)
        entry = settlement.entry(participant_id, currency)
        if entry is None:
            raise errors.SettlementEntryNotFound(
                f"settlement {settlement_id} has no entry for {participant_id} in {currency}", participant_id=participant_id, currency=currency
            )
        if entry.settled_at is not None:
            return settlement
        # (1) Both settlement accounts exist.
        await self.store.ensure_settlement_accounts(
            [
                (clearing.settlement_account_id(participant_id, currency), currency, participant_id),
                (clearing.settlement_bank_account_id(currency), currency, clearing.HOSTING_PARTICIPANT_ID),
            ],
            _left(deadline),
        )
        self.reached(AFTER_ACCOUNTS)
        # (2) The legs, as the ledger's own transfers (idempotent by their ids).
        for leg in clearing.settlement_legs(settlement_id, settlement.model, entry.total):
            await self.ledger.post_settlement_leg(leg, _left(deadline))
        self.reached(AFTER_LEGS)
        # (3) Every shard takes the windows out of the participant's share, once.
        window_ids = list(settlement.window_ids)
        results = await asyncio.gather(
            *(
                self.store.reset_position(name, settlement_id, window_ids, participant_id, currency, _left(deadline))
                for name in self.store.shard_names()
            ),
            return_exceptions=True,
        )
        for result in results:
            if isinstance(result, BaseException):
                raise result
        self.reached(AFTER_RESETS)
        # (4) The entry settled; with the last one, the settlement and its windows.
        await self.store.settle_entry(settlement_id, participant_id, currency, _left(deadline))
        return await self._settlement(settlement_id, deadline)

    # Reconciliation.

    async def reconcile(self, caller: Caller, window_ids: list[int], timeout_seconds: float):
        """services/storage/reconciliation.py's report over `window_ids` (empty: every window)."""
        self._admit(caller, ClearingAction.READ)
        window_ids = validate_window_ids(list(window_ids), RECONCILE_WINDOWS_MAX, required=False)
        try:
            from services.storage import reconciliation
        except ImportError as error:
            raise Unimplemented("Reconcile is not in this build (services/storage/reconciliation.py is missing)") from error
        return await reconciliation.reconcile(self.router, window_ids, timeout_seconds)


def _participant_not_found(participant_id: str) -> errors.ParticipantNotFound:
    return errors.ParticipantNotFound(f"participant {participant_id} not found", participant_id=participant_id)


def _window_not_found(window_id: int) -> errors.SettlementWindowNotFound:
    return errors.SettlementWindowNotFound(f"settlement window {window_id} not found", window_id=str(window_id))


def _validate_settlement_id(settlement_id: int) -> None:
    if not settlement_id:
        raise errors.MissingField("settlement_id is required", field="settlement_id")


def _same_settlement(request_id: str, existing: Settlement, window_ids: list[int], model: SettlementModel) -> Settlement:
    """A retry of CreateSettlement answers the settlement its request_id made; other fields are a conflict."""
    conflict = ids.conflict_with_first_use(
        "request_id", request_id,
        {"window_ids": sorted(existing.window_ids), "model": existing.model.name},
        {"window_ids": window_ids, "model": model.name},
    )
    if conflict is not None:
        raise conflict
    return existing

