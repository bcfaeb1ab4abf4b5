"""Clearing between the institutions corebank hosts: participants, positions, net debit caps,
settlement windows and settlements. Pure rules; storage is services/storage/clearing_store.py.

The model, in one place:

- A participant is an institution. Every account belongs to one (accounts.participant_id);
  accounts opened without one belong to the hosting bank's own, HOSTING_PARTICIPANT_ID.
- A transfer between accounts of two participants is *cleared*: the payer's position (what
  it owes, net, per currency) goes up by the amount and the payee's goes down, in the same
  local transaction that posts the transfer. A transfer that touches a settlement account is
  settlement itself and is never cleared; nor is a transfer within one participant.
- Positions live on every shard, as one share per (participant, currency): a transfer's
  clearing is written on its debit shard (a transfer between shards: when its debit is
  confirmed; its reservation when its debit is tried). So the position check is a local row,
  never a round trip to another shard, and many payers of one big wallet on many shards do
  not queue on one lock.
- The net debit cap is split into shares (allotment_minor per shard, their sum is the cap).
  A debit is allowed on a shard when that shard's position + reserved + amount stays within
  its allotment. When it does not, the service moves allotment from the other shards
  (`rebalanced_allotments`, all shares of that participant and currency locked at once) and
  asks again, this time for good: a refusal then means the whole position would pass the cap.
- A transfer joins the window that is open on its debit shard when it posts; closing a window
  moves every shard on to the next one under an exclusive lock that transfers take shared,
  so a closed window never changes again.
- A settlement of closed windows has one entry per participant and currency: what it paid,
  what it received, and the net (paid - received), which sum to zero. Recording a participant
  settled moves its settlement account against the settlement bank's account of the currency
  (`settlement_legs`) and takes those windows' nets out of its position on every shard.
"""

from __future__ import annotations

import dataclasses
import enum
import re

from services.ledger import errors, money

# The hosting bank's own participant: accounts opened without a participant_id belong to it.
HOSTING_PARTICIPANT_ID = "corebank"
HOSTING_PARTICIPANT_NAME = "corebank (hosting bank)"
PARTICIPANT_ID_LENGTH_MAX = 32
PARTICIPANT_ID_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,%d}" % PARTICIPANT_ID_LENGTH_MAX)
PARTICIPANT_NAME_LENGTH_MAX = 256
PARTICIPANT_CURRENCIES_MAX = 50
DEFAULT_THRESHOLD_PERCENT = 90
# The registry (participants, caps, windows, settlements) lives on the shard this key hashes to.
CLEARING_HOME_KEY = "clearing"
# The advisory lock (pg_advisory_xact_lock) behind each shard's current window: taken shared by
# transactions that post cleared transfers, exclusive by a window close. Any fixed bigint.
WINDOW_LOCK_KEY = 7_340_011_001
# The advisory lock that serialises the start of window closes on the home: a close waiting for
# another must read the windows as that one left them (a row lock alone would re-read only the
# row it waited for, and miss the window the other opened).
CLOSE_LOCK_KEY = 7_340_011_002
# The payee a transfer between shards begins with when its credit account did not exist at the
# begin: no participant has this id, so if the account is opened before the credit try, the try
# refuses it (ACCOUNT_NOT_FOUND) instead of posting a transfer between participants uncleared.
UNKNOWN_PAYEE = ""
# CreateSettlement: at most this many windows in one settlement.
SETTLEMENT_WINDOWS_MAX = 100

# Settlement accounts: stl_p_<participant>_<currency> per participant and currency, and the
# settlement bank's stl_h_<currency> (the hosting participant's) that every movement is against.
SETTLEMENT_ACCOUNT_ID_PREFIX = "stl_"
PARTICIPANT_SETTLEMENT_ACCOUNT_PREFIX = "stl_p_"
SETTLEMENT_BANK_ACCOUNT_PREFIX = "stl_h_"
# Settlement movements are the ledger's own transfers: sys:stl:<settlement>:<participant>:<currency>:<leg>
SETTLEMENT_TRANSFER_ID_PREFIX = "sys:stl:"


class WindowState(enum.IntEnum):
    """Numbers match corebank.v1.SettlementWindowState."""

    OPEN = 1
    CLOSED = 2
    PENDING_SETTLEMENT = 3
    SETTLED = 4
    CLOSING = 5


class SettlementModel(enum.IntEnum):
    """Numbers match corebank.v1.SettlementModel."""

    DEFERRED_NET = 1
    GROSS = 2


class SettlementState(enum.IntEnum):
    """Numbers match corebank.v1.SettlementState."""

    PENDING = 1
    SETTLED = 2


def validate_participant_id(value: str, field: str = "participant_id") -> str:
    if not value:
        raise errors.MissingField(f"{field} is required", field=field)
    if len(value) > PARTICIPANT_ID_LENGTH_MAX:
        raise errors.FieldTooLong(
            f"{field} is longer than {PARTICIPANT_ID_LENGTH_MAX} characters", field=field, limit=PARTICIPANT_ID_LENGTH_MAX
        )
    if not PARTICIPANT_ID_PATTERN.fullmatch(value):
        raise errors.InvalidId(f"{field} must be 1..{PARTICIPANT_ID_LENGTH_MAX} characters of [A-Za-z0-9._-]", field=field)
    return value


def settlement_account_id(participant_id: str, currency: str) -> str:
    return f"{PARTICIPANT_SETTLEMENT_ACCOUNT_PREFIX}{participant_id}_{currency.lower()}"


def settlement_bank_account_id(currency: str) -> str:
    return f"{SETTLEMENT_BANK_ACCOUNT_PREFIX}{currency.lower()}"


def is_settlement_account(account_id: str) -> bool:
    return account_id.startswith(SETTLEMENT_ACCOUNT_ID_PREFIX)


def cleared_between(debit_account_id: str, payer: str | None, credited_account_id: str, payee: str | None) -> tuple[str, str] | None:
    """(payer, payee) participants when a transfer between these accounts is cleared; None when
    it is not: within one participant, or settlement itself (a settlement account on a side).
    `payee` None: the credit account was not found (the transfer will be refused anyway)."""
    if payer is None or payee is None or payer == payee:
        return None
    if is_settlement_account(debit_account_id) or is_settlement_account(credited_account_id):
        return None
    return payer, payee


@dataclasses.dataclass(frozen=True)
class PositionShare:
    """One shard's share of a participant's position in one currency (clearing_positions)."""

    participant_id: str
    currency: str
    position_minor: int = 0  # posted: paid - received on this shard, less settled windows
    reserved_minor: int = 0  # debits between shards tried here and not yet confirmed or cancelled
    allotment_minor: int | None = None  # this shard's share of the cap; None: no cap

    @property
    def exposure_minor(self) -> int:
        """What the cap is checked against on this shard."""
        return self.position_minor + self.reserved_minor

    def headroom_minor(self) -> int | None:
        return None if self.allotment_minor is None else self.allotment_minor - self.exposure_minor

    def fits(self, amount_minor: int) -> bool:
        headroom = self.headroom_minor()
        return headroom is None or amount_minor <= headroom


def cap_exceeded(participant_id: str, currency: str, cap_minor: int | None) -> errors.NetDebitCapExceeded:
    """The refusal a debit gets when its participant's position would pass the cap."""
    return errors.NetDebitCapExceeded(
        f"participant {participant_id} would owe more than its net debit cap in {currency}",
        participant_id=participant_id, currency=currency,
        **({} if cap_minor is None else {"net_debit_cap_minor": cap_minor}),
    )


def rebalanced_allotments(shares: dict[str, PositionShare], cap_minor: int | None, need_shard: str = "", need_minor: int = 0) -> dict[str, int | None]:
    """New allotments for every shard of one participant and currency, from all of its shares
    (locked) and its cap, summing to the cap. Each shard first gets what it is exposed to (its
    position and reservations: below zero where it received more than it paid), `need_shard`
    its need on top; the headroom left is split evenly, the remainder to the shards in name
    order. So the headroom of all shards together, cap - exposure, is kept whole. When the need
    does not fit it is not promised; when the position is past the cap already, the excess is
    taken from the largest share (that shard refuses debits until the position falls)."""
    if cap_minor is None:
        return {shard: None for shard in shares}
    names = sorted(shares)
    base = {shard: shares[shard].exposure_minor for shard in names}
    spare = cap_minor - sum(base.values())
    if need_shard in base and need_minor <= spare:
        base[need_shard] += need_minor
        spare -= need_minor
    if spare < 0:
        largest = max(names, key=lambda name: (base[name], name))
        base[largest] += spare
        return base
    each, remainder = divmod(spare, len(names))
    # A shard's allotment is a bigint: where the split would pass int64 (a participant owed nearly
    # int64 on other shards makes the spare that large), it is cut to int64. That only lowers the
    # sum below the cap, never past it, and the shard's exposure is kept within int64 anyway.
    return {shard: min(base[shard] + each + (1 if index < remainder else 0), money.INT64_MAX) for index, shard in enumerate(names)}


def commit_phases(old: dict[str, int | None], new: dict[str, int | None], home: str) -> list[list[str]]:
    """The order in which a rebalance commits its shards: every share that shrinks (or gets a cap
    for the first time) first, then the home shard (which holds the cap itself), then the shares
    that grow. Whatever prefix of this order has committed when a process dies, the committed
    allotments never sum to more than the committed cap; the next rebalance recomputes them."""

    def shrinks(shard: str) -> bool:
        before, after = old.get(shard), new.get(shard)
        if after is None:
            return False  # no cap: only when the cap is never set, nothing changes
        return before is None or after <= before

    others = sorted(shard for shard in new if shard != home)
    phases = [[shard for shard in others if shrinks(shard)], [home] if home in new else [], [shard for shard in others if not shrinks(shard)]]
    return [phase for phase in phases if phase]


@dataclasses.dataclass(frozen=True)
class ParticipantTotal:
    """What one participant paid and received in one currency, over some windows."""

    participant_id: str
    currency: str
    debits_minor: int = 0
    credits_minor: int = 0
    transfer_count: int = 0

    @property
    def net_minor(self) -> int:
        return self.debits_minor - self.credits_minor


def summed_totals(rows) -> list[ParticipantTotal]:
    """(participant_id, currency, debits, credits, transfers) rows from every shard, summed per
    participant and currency, sorted; rows that are all zero are left out."""
    sums: dict[tuple[str, str], list[int]] = {}
    for participant_id, currency, debits, credits, transfers in rows:
        total = sums.setdefault((participant_id, currency), [0, 0, 0])
        total[0] += int(debits)
        total[1] += int(credits)
        total[2] += int(transfers)
    return [
        ParticipantTotal(participant_id, currency, debits, credits, transfers)
        for (participant_id, currency), (debits, credits, transfers) in sorted(sums.items())
        if debits or credits
    ]


def nets_balance(totals: list[ParticipantTotal]) -> dict[str, int]:
    """Per currency, the sum of the nets: zero for every currency when the totals are whole."""
    sums: dict[str, int] = {}
    for total in totals:
        sums[total.currency] = sums.get(total.currency, 0) + total.net_minor
    return {currency: net for currency, net in sums.items() if net}


@dataclasses.dataclass(frozen=True)
class SettlementLeg:
    """One movement of a participant's settlement account against the settlement bank's."""

    transfer_id: str
    debit_account_id: str
    credit_account_id: str
    amount_minor: int
    currency: str


def settlement_legs(settlement_id: int, model: SettlementModel, total: ParticipantTotal) -> list[SettlementLeg]:
    """The settlement account movements that record `total` settled. DEFERRED_NET moves the net
    (a participant that owes pays into the settlement bank's account, one that is owed is paid
    from it); GROSS moves what it paid and what it received separately. Zero legs are left out."""
    own = settlement_account_id(total.participant_id, total.currency)
    bank = settlement_bank_account_id(total.currency)
    prefix = f"{SETTLEMENT_TRANSFER_ID_PREFIX}{settlement_id}:{total.participant_id}:{total.currency}"
    if model is SettlementModel.DEFERRED_NET:
        legs = [(f"{prefix}:net", own, bank, total.net_minor)] if total.net_minor > 0 else [(f"{prefix}:net", bank, own, -total.net_minor)]
    else:
        legs = [(f"{prefix}:paid", own, bank, total.debits_minor), (f"{prefix}:received", bank, own, total.credits_minor)]
    return [SettlementLeg(transfer_id, debit, credit, amount, total.currency) for transfer_id, debit, credit, amount in legs if amount > 0]


def threshold_reached(position_minor: int, cap_minor: int | None, threshold_percent: int) -> bool:
    """The alarm: the position has reached threshold_percent of the cap (never without a cap)."""
    if cap_minor is None:
        return False
    return position_minor * 100 >= cap_minor * threshold_percent


def validate_threshold_percent(value: int) -> int:
    """0 is the default; otherwise 1..100."""
    if value == 0:
        return DEFAULT_THRESHOLD_PERCENT
    if not 1 <= value <= 100:
        raise errors.InvalidField("threshold_percent must be 1..100 (0: the default, 90)", field="threshold_percent")
    return value
