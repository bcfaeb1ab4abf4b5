"""The audit log in PostgreSQL: the table `audit_log` of every shard (services/storage/schema.sql).

The service writes with INSERT only (ON CONFLICT DO NOTHING needs no other right), through
the shard's pooled ShardStore, so that its deadlines and its one mapping of database errors
apply. The insert is not a prepared statement (services/storage/prepared.py): every pooled
connection would prepare it when it opens, and a shard whose schema lacks the table would then
refuse every connection, not only the audit log's. It is planned once per batch of up to a
thousand entries, a fraction of a millisecond.

`read_links` is the verifier's: a plain psycopg connection, one snapshot, streamed.
"""

from __future__ import annotations

from collections.abc import Iterator

import psycopg

from services.audit_log.chain import Entry, Link, LinkTaken
from services.ledger import errors
from services.storage.shard_store import COMMIT, ShardStore
from sharding.router import ShardRouter

TABLE = "audit_log"
LINK_COLUMNS = "chain_id, seq, at_us, subject, role, action, target, detail, outcome, prev_hash, hash"
# Hashes travel as hex text (the fast array literals of services/storage/array_literal.py
# are for str and int) and are stored as bytea.
INSERT_LINKS = f"""
    INSERT INTO {TABLE} ({LINK_COLUMNS})
    SELECT %s, e.seq, e.at_us, e.subject, e.role, e.action, e.target, e.detail, e.outcome,
           decode(e.prev_hash, 'hex'), decode(e.hash, 'hex')
    FROM unnest(%s::bigint[], %s::bigint[], %s::text[], %s::text[], %s::text[], %s::text[], %s::text[], %s::text[],
                %s::text[], %s::text[]) AS e (seq, at_us, subject, role, action, target, detail, outcome, prev_hash, hash)
    ON CONFLICT (chain_id, seq) DO NOTHING"""  # nosec B608 # constants only, no request data
# In the insert's transaction: what each seq holds now, ours or someone else's (ON CONFLICT DO
# NOTHING skips a taken seq silently).
SELECT_STORED_HASHES = f"""
    SELECT seq, encode(hash, 'hex') FROM {TABLE} WHERE chain_id = %s AND seq = ANY(%s::bigint[])"""  # nosec B608 # constants only
SELECT_LINKS = f"SELECT {LINK_COLUMNS} FROM {TABLE} ORDER BY chain_id, seq"  # nosec B608 # constants only, no request data
TABLE_EXISTS = f"SELECT to_regclass('{TABLE}') IS NOT NULL"
# Rows fetched per round trip while streaming a shard's log.
READ_ROWS_PER_FETCH = 10_000


def insert_parameters(links: list[Link]) -> list:
    """The parameters of INSERT_LINKS: one chain's links, column by column."""
    chain_ids = {link.entry.chain_id for link in links}
    assert len(chain_ids) == 1, f"a batch is one chain's links, not {chain_ids}"
    entries = [link.entry for link in links]
    return [
        entries[0].chain_id,
        [entry.seq for entry in entries], [entry.at_us for entry in entries],
        [entry.subject for entry in entries], [entry.role for entry in entries], [entry.action for entry in entries],
        [entry.target for entry in entries], [entry.detail for entry in entries], [entry.outcome for entry in entries],
        [link.prev_hash.hex() for link in links], [link.hash.hex() for link in links],
    ]


class ShardAuditStore:
    """The writer's store: the shards of the process's router (its pools, kept current from etcd)."""

    def __init__(self, router: ShardRouter[ShardStore]) -> None:
        self._router = router

    def shard_names(self) -> list[str]:
        return [shard.name for shard in self._router.shard_map.shards]

    def home_shard(self, chain_id: str) -> str:
        return self._router.shard_name_for(chain_id)

    async def insert(self, shard_name: str, links: list[Link], timeout_seconds: float) -> None:
        try:
            store = self._router.handle(shard_name)
        except KeyError:
            raise errors.ShardUnavailable(f"{shard_name} is not in the shard map any more", shard=shard_name) from None
        parameters = insert_parameters(links)
        async with store.session(timeout_seconds) as session:
            (stored,) = await session.run(
                session.begin(INSERT_LINKS, SELECT_STORED_HASHES, COMMIT), [*parameters, parameters[0], parameters[1]]
            )
        ours = {link.entry.seq: link.hash.hex() for link in links}
        taken = sorted(seq for seq, stored_hash in stored if ours.get(seq) != stored_hash)
        if taken:
            raise LinkTaken(f"chain {parameters[0]} on {shard_name}: seqs {taken[:5]} hold entries this writer did not write")


def link_from_row(row: tuple) -> Link:
    return Link(Entry(*row[:9]), bytes(row[9]), bytes(row[10]))


def read_links(connection: psycopg.Connection) -> Iterator[Link]:
    """Every stored link of the shard, by chain then seq, streamed (a server-side cursor), inside
    the caller's transaction. The caller checks TABLE_EXISTS first."""
    with connection.cursor(name="audit_log_links") as cursor:
        cursor.itersize = READ_ROWS_PER_FETCH
        cursor.execute(SELECT_LINKS)
        for row in cursor:
            yield link_from_row(row)
