"""Finishing window closes left CLOSING (services/clearing_service.py: a close whose process died,
or that met an unreachable shard, after the home moved the window to CLOSING).

Every WINDOW_RECOVERY_INTERVAL_SECONDS the coordinator finishes each window CLOSING for longer
than CLOSING_GRACE_SECONDS (a close in progress takes milliseconds; the grace keeps this check
from doing its work twice). Finishing is idempotent, so several coordinators may run it at once.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from services.ledger import errors

WINDOW_RECOVERY_INTERVAL_SECONDS = 5.0
CLOSING_GRACE_SECONDS = 5.0
WINDOW_RECOVERY_TIMEOUT_SECONDS = 5.0

log = logging.getLogger("corebank.coordinator")

# finish(older_than_seconds, timeout_seconds) -> the windows finished
Finish = Callable[[float, float], Awaitable[list[int]]]


async def finish_once(finish: Finish) -> list[int]:
    try:
        finished = await finish(CLOSING_GRACE_SECONDS, WINDOW_RECOVERY_TIMEOUT_SECONDS)
    except errors.LedgerError as error:
        # The next round asks again; a permanent error is a bug to see.
        (log.info if error.transient else log.error)("finishing interrupted window closes failed: %s", error)
        return []
    for window_id in finished:
        log.info("finished the interrupted close of settlement window %d", window_id)
    return finished


async def run(finish: Finish, stopping: asyncio.Event) -> None:
    while not stopping.is_set():
        await finish_once(finish)
        try:
            await asyncio.wait_for(stopping.wait(), WINDOW_RECOVERY_INTERVAL_SECONDS)
        except TimeoutError:
            pass
