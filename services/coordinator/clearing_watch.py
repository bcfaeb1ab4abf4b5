"""What the coordinators tell SREs about clearing (deploy/prometheus/metrics.md, "Clearing"):
each participant's position against its net debit cap and alarm threshold, the open window's
age, windows left CLOSING, and settlements not yet fully recorded.

Read with the periodic audit (services/coordinator/integrity.py), on its thread, as the auditor
role: one REPEATABLE READ READ ONLY snapshot per shard, a few aggregate rows each (the shares are
one row per participant and currency; the registry is small), so it costs nothing next to the
audit. Label values come from the registry (participant ids an admin registered, currencies it
enabled), never from a caller's request.
"""

from __future__ import annotations

import dataclasses

import psycopg

from services.storage import audit

SHARE_SUMS = """
    SELECT participant_id, currency, position_minor + reserved_minor FROM clearing_positions
    WHERE position_minor <> 0 OR reserved_minor <> 0 OR allotment_minor IS NOT NULL"""
CAPS = """
    SELECT participant_id, currency, net_debit_cap_minor, threshold_percent FROM participant_currencies
    WHERE net_debit_cap_minor IS NOT NULL"""
# (state 1: OPEN, 5: CLOSING; services.ledger.clearing.WindowState)
WINDOWS = """
    SELECT coalesce(max(window_id) FILTER (WHERE state = 1), 0),
           coalesce(extract(epoch FROM now() - min(opened_at) FILTER (WHERE state = 1)), 0)::float8,
           count(*) FILTER (WHERE state = 5),
           coalesce(extract(epoch FROM now() - min(closed_at) FILTER (WHERE state = 5)), 0)::float8
    FROM settlement_windows WHERE state IN (1, 5)"""
# (state 1: PENDING; services.ledger.clearing.SettlementState)
PENDING_SETTLEMENTS = """
    SELECT count(*), coalesce(extract(epoch FROM now() - min(created_at)), 0)::float8 FROM settlements WHERE state = 1"""
SHARD_WINDOW = "SELECT window_id FROM clearing_shard_window"


@dataclasses.dataclass(frozen=True)
class ClearingFigures:
    positions_minor: dict[tuple[str, str], int]  # (participant, currency) -> position + reserved, all shards
    caps: dict[tuple[str, str], tuple[int, int]]  # (participant, currency) -> (cap, threshold percent)
    open_window_id: int
    open_window_age_seconds: float
    closing_windows: int
    oldest_closing_age_seconds: float
    pending_settlements: int
    oldest_pending_settlement_age_seconds: float
    shards_on_another_window: int  # shards whose current window is not the open one


def read_clearing(shards: list[tuple[str, str]], home_shard: str, statement_timeout_seconds: float) -> ClearingFigures:
    """Every shard's shares and current window, and the home's registry. Raises audit.ShardUnreadable."""
    positions: dict[tuple[str, str], int] = {}
    shard_windows: dict[str, int] = {}
    caps: dict[tuple[str, str], tuple[int, int]] = {}
    windows = (0, 0.0, 0, 0.0)
    pending = (0, 0.0)
    for name, dsn in shards:
        try:
            with audit.connect_for_reading(name, dsn, int(statement_timeout_seconds)) as connection:
                connection.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
                for participant_id, currency, exposure_minor in connection.execute(SHARE_SUMS):
                    key = (participant_id, currency)
                    positions[key] = positions.get(key, 0) + int(exposure_minor)
                row = connection.execute(SHARD_WINDOW).fetchone()
                shard_windows[name] = int(row[0]) if row else 0
                if name == home_shard:
                    caps = {(p, c): (int(cap), int(threshold)) for p, c, cap, threshold in connection.execute(CAPS)}
                    open_id, open_age, closing, closing_age = connection.execute(WINDOWS).fetchone()
                    windows = (int(open_id), float(open_age), int(closing), float(closing_age))
                    count, age = connection.execute(PENDING_SETTLEMENTS).fetchone()
                    pending = (int(count), float(age))
                connection.execute("COMMIT")
        except psycopg.Error as error:  # any database error here means this shard cannot be read, as in the audit
            raise audit.ShardUnreadable(name, error) from error
    open_window_id = windows[0]
    # While a close runs (CLOSING), shards are on either window by design: only count strays otherwise.
    strays = 0 if windows[2] else sum(1 for window_id in shard_windows.values() if window_id != open_window_id)
    for key in caps:
        positions.setdefault(key, 0)
    return ClearingFigures(positions, caps, open_window_id, windows[1], windows[2], windows[3], pending[0], pending[1], strays)
