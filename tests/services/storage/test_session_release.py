"""A request cancelled while its session cleans up still gives its connection back.

gRPC cancels a handler at the client's deadline, which may land while Session.release()
awaits its ROLLBACK; if putconn() were skipped then, the pool would count the connection
as lent for good, and after POOL_SIZE_MAX such requests the process would answer
SHARD_UNAVAILABLE for that shard until restarted (found by review, after a burst of
status changes that hit their deadlines).
"""

from __future__ import annotations

import asyncio

import psycopg
import psycopg_pool

from services.storage.shard_store import ShardStore

POOL_SIZE = 4
LOCK_KEY = 914_242
# When the caller's cancel lands after the session's own timeout (1 s), in ms.
CANCEL_OFFSETS_MS = [offset for offset in range(0, 30) for _ in range(2)]


def test_cancelling_a_timed_out_request_returns_its_connection(cluster):
    dsn = cluster["shards"][0]["dsn"]

    async def run() -> dict:
        pool = psycopg_pool.AsyncConnectionPool(dsn, min_size=POOL_SIZE, max_size=POOL_SIZE, open=False)
        await pool.open()
        await pool.wait()
        store = ShardStore("shard-0", pool)
        blocker = await psycopg.AsyncConnection.connect(dsn)
        try:
            await blocker.execute("BEGIN")
            await blocker.execute("SELECT pg_advisory_xact_lock(%s)", (LOCK_KEY,))

            async def request() -> None:
                async with store.session(1.0) as session:
                    await session.run(session.begin(f"SELECT pg_advisory_xact_lock({LOCK_KEY})"))

            for offset_ms in CANCEL_OFFSETS_MS:
                task = asyncio.create_task(request())
                await asyncio.sleep(0.995 + offset_ms / 1000)  # the client's deadline: gRPC cancels the handler
                task.cancel()
                try:
                    await task
                except BaseException:  # noqa: BLE001 (DeadlineExceeded or CancelledError: either is fine)
                    pass
            await asyncio.sleep(0.5)
            return pool.get_stats()
        finally:
            await blocker.rollback()
            await blocker.close()
            await pool.close()

    stats = asyncio.run(run())
    assert stats["pool_available"] == POOL_SIZE, f"connections leaked from the pool: {stats}"
