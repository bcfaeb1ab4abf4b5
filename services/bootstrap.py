"""What every corebank process needs first: the shard map from etcd, followed
as it changes, and a connection pool per shard."""

from __future__ import annotations

import asyncio
import logging

import psycopg
import psycopg_pool
import psycopg_pool.base
from prometheus_client import Counter, Gauge

from services.api import metrics
# Imported for the statements they prepare (services/storage/prepared.py): every one must be
# registered before the first connection opens.
from services.storage import batch_posting, id_registry, prepared, tcc_store  # noqa: F401
from services.storage import metrics as storage_metrics
from services.storage.shard_store import POOL_SIZE_MAX, POOL_SIZE_MIN, ShardStore
from sharding import etcd_shard_map
from sharding.router import ShardRouter
from sharding.shard_map import Shard, ShardMap

SHARD_MAP_WAIT_SECONDS_MAX = 60.0

# The shard map's DSNs name the service role (services/storage/roles.py), whose grants keep
# it from changing history (services/storage/grants.sql). A DSN naming a mightier role (a
# superuser, the database's owner) would run the same code without that net, so such a
# connection is refused: the shard then looks unreachable, and the log says why.
ROLE_IS_OVERPRIVILEGED = """
    SELECT r.rolsuper OR r.rolbypassrls OR r.rolcreaterole OR r.rolcreatedb OR pg_has_role(r.oid, d.datdba, 'MEMBER')
    FROM pg_roles AS r, pg_database AS d WHERE r.rolname = current_user AND d.datname = current_database()"""

log = logging.getLogger(__name__)

# psycopg_pool retries a failed connection after 1, 2, 4, 8, 16 s...: a shard whose new primary
# is elected ~20 s after a failover (Patroni's ttl, deploy/patroni.py) was found again only at the
# attempt 31 s after the kill (ha_bench measured 30.1 s end to end, against 19.9 s for a plain
# libpq client). A constant delay finds it within a second; an attempt against a dead or
# read-only member costs one refused connection. The pool reads the delays from this class
# (psycopg_pool.base.AttemptWithBackoff, since 3.2); a version without it keeps its own.
POOL_RECONNECT_DELAY_GROWTH = 1.0
if hasattr(psycopg_pool.base, "AttemptWithBackoff"):
    psycopg_pool.base.AttemptWithBackoff.DELAY_BACKOFF = POOL_RECONNECT_DELAY_GROWTH

# The control plane as this process sees it (deploy/prometheus/metrics.md; the map's version
# is services.api.metrics.SHARD_MAP_VERSION). In every process that follows etcd.
ETCD_WATCH_CONNECTED = Gauge("corebank_etcd_watch_connected", "1 while the shard-map watch on etcd is connected")
ETCD_WATCH_RECONNECTS = Counter("corebank_etcd_watch_reconnects", "Shard-map watches lost and made again")


class OverprivilegedRole(psycopg.ProgrammingError):
    """A pooled connection whose role may do more than the service role: never used."""


async def prepare_session(connection: psycopg.AsyncConnection) -> None:
    """Each new pooled connection checks its role, then prepares the hot statements once
    (services/storage/prepared.py)."""
    cursor = psycopg.AsyncClientCursor(connection)
    await cursor.execute(ROLE_IS_OVERPRIVILEGED)
    row = await cursor.fetchone()
    if row is None or row[0]:
        user = connection.info.user
        await connection.close()
        raise OverprivilegedRole(f"role {user} may do more than the service role; not serving through it")
    for statement in prepared.session_setup():
        await cursor.execute(statement)


async def open_shard_store(shard: Shard) -> ShardStore:
    # open(wait=False): a shard that is down must not stop the others from serving.
    pool = psycopg_pool.AsyncConnectionPool(
        shard.dsn, min_size=POOL_SIZE_MIN, max_size=POOL_SIZE_MAX, open=False, name=shard.name,
        kwargs={"autocommit": True},  # the store sends its own BEGIN ... COMMIT batches
        configure=prepare_session,
    )
    await pool.open(wait=False)
    storage_metrics.POOLS.track(shard.name, pool)
    return ShardStore(shard.name, pool)


async def close_shard_store(store: ShardStore) -> None:
    storage_metrics.POOLS.forget(store.pool)
    await store.pool.close()


def initialise_shard_metrics(shard_map: ShardMap) -> None:
    """Every shard's series at 0 (round trips, transactions, errors by kind, overload refusals by
    cause), so that a rate reads 0, not "no data", before the first use."""
    for shard in shard_map.shards:
        storage_metrics.for_shard(shard.name)
        for cause in metrics.SHARD_CAUSES:
            metrics.OVERLOAD_REFUSALS.labels(cause, shard.name)


class WatchConnection:
    """etcd_shard_map.watch's connection reports, as metrics: connected, and reconnections
    (a watch made again after one was lost; the first is not one)."""

    def __init__(self) -> None:
        self.connections = 0

    def __call__(self, connected: bool) -> None:
        ETCD_WATCH_CONNECTED.set(1 if connected else 0)
        if connected:
            if self.connections:
                ETCD_WATCH_RECONNECTS.inc()
            self.connections += 1


async def first_shard_map(etcd) -> ShardMap:
    async with asyncio.timeout(SHARD_MAP_WAIT_SECONDS_MAX):
        while True:
            try:
                shard_map = await etcd_shard_map.load(etcd)
                if shard_map is not None:
                    return shard_map
                log.info("no shard map in etcd yet; waiting")
            except Exception as error:  # noqa: BLE001 (the etcd client raises many kinds while etcd starts; bounded by the timeout)
                log.info("etcd not reachable yet (%s); waiting", error)
            await asyncio.sleep(0.5)


class ShardConnections:
    """The router (map + pools) of one process, kept current by an etcd watch."""

    def __init__(self, router: ShardRouter[ShardStore], etcd, watch_task: asyncio.Task) -> None:
        self.router = router
        self._etcd = etcd
        self._watch_task = watch_task

    @classmethod
    async def open(cls, etcd_endpoint: str) -> ShardConnections:
        """The first map from etcd, its pools, and a watch that follows it; `etcd_endpoint` names
        one etcd member or several, comma-separated (etcd_shard_map.etcd_client)."""
        etcd = etcd_shard_map.etcd_client(etcd_endpoint)
        router: ShardRouter[ShardStore] = ShardRouter(open_shard_store, close_shard_store)

        async def adopt(shard_map: ShardMap) -> None:
            await router.apply(shard_map)
            initialise_shard_metrics(router.shard_map)
            metrics.SHARD_MAP_VERSION.set(router.shard_map.version)

        await adopt(await first_shard_map(etcd))
        return cls(router, etcd, asyncio.create_task(etcd_shard_map.watch(etcd, adopt, WatchConnection())))

    async def close(self) -> None:
        self._watch_task.cancel()
        await self.router.close()
        await self._etcd.close()
