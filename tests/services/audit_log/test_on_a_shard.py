"""The audit log on a real PostgreSQL shard: written by the writer through the service role,
proved by `python -m services.audit_log verify`, and tampering past the triggers named.

The shard is one of its own (deploy/postgres.py: roles, grants and schema as `make up` makes
them), on a port above COREBANK_TEST_PORT_BASE that the test cluster does not use, started
for this module and removed after it: tampering here cannot break the session's cluster.
"""

from __future__ import annotations

import asyncio
import json
import os
import pathlib
import subprocess
import sys
import uuid
from collections.abc import Iterator

import psycopg
import pytest

from deploy.postgres import PostgresShard
from services import bootstrap
from services.audit_log import chain
from services.audit_log.store import ShardAuditStore
from services.audit_log.writer import AuditWriter
from services.storage.shard_store import ShardStore
from sharding.router import ShardRouter
from sharding.shard_map import Shard, ShardMap
from tests.fixtures.cluster import DEFAULT_TEST_PORT_BASE, PORT_BASE_ENV, bare_shard

REPO_ROOT = pathlib.Path(__file__).resolve().parents[3]
# The test cluster takes the base, +1, +10.., +20.. and +100.. (one per shard).
SHARD_PORT_OFFSET = 190
UNREACHABLE_DSN = "host=127.0.0.1 port=1 dbname=corebank user=corebank connect_timeout=1"
CLI_TIMEOUT_SECONDS = 120
ENTRIES_PER_CHAIN = 1_500  # more than one batch


@pytest.fixture(scope="module")
def shard() -> Iterator[PostgresShard]:
    port = int(os.environ.get(PORT_BASE_ENV) or DEFAULT_TEST_PORT_BASE) + SHARD_PORT_OFFSET
    with bare_shard("corebank-audit-log-", "audit-shard", port) as started:
        yield started


@pytest.fixture(scope="module")
def cluster_file(shard: PostgresShard, tmp_path_factory) -> pathlib.Path:
    path = tmp_path_factory.mktemp("audit-log") / "cluster.json"
    path.write_text(json.dumps({"shards": [{"name": shard.name, "dsn": shard.dsn, "auditor_dsn": shard.auditor_dsn}]}))
    return path


def verify(cluster_file: pathlib.Path, *arguments: str) -> tuple[int, dict]:
    completed = subprocess.run(
        [sys.executable, "-m", "services.audit_log", "verify", "--cluster", str(cluster_file), "--json", *arguments],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=CLI_TIMEOUT_SECONDS, check=False,
    )
    return completed.returncode, json.loads(completed.stdout or "{}")


class HomeShardStore(ShardAuditStore):
    """The writer's store, with its first chain placed on a shard of the test's choice."""

    def __init__(self, router, home: str) -> None:
        super().__init__(router)
        self.home = home

    def home_shard(self, chain_id: str) -> str:
        return self.home


async def write_chains(shards: list[Shard], chains: int, home: str | None = None, failover_after_seconds: float = 3.0) -> list[str]:
    """Write `chains` chains through the service's own pools (the service role), one writer
    each, as service processes would; the ids of the chains holding their entries."""
    router: ShardRouter[ShardStore] = ShardRouter(bootstrap.open_shard_store, bootstrap.close_shard_store)
    await router.apply(ShardMap.evenly(shards))
    chain_ids = []
    try:
        for number in range(chains):
            store = HomeShardStore(router, home) if home else ShardAuditStore(router)
            writer = AuditWriter(store, f"test-{number}", {"tier_limits_sha256": "00"}, failover_after_seconds=failover_after_seconds)
            writer.start()
            for start in range(0, ENTRIES_PER_CHAIN, 500):
                stored = writer.append([
                    chain.event(writer.clock_us(), f"customer-{n % 7}", "customer", "transfer", f"t-{number}-{n}",
                                chain.detail_text({"amount_minor": n, "currency": "USD"}), "POSTED")
                    for n in range(start, start + 500)
                ])
                assert await writer.written(stored, 30)
            assert await writer.close(30)
            chain_ids.append(writer.chain_id)
    finally:
        await router.close()
    return chain_ids


def tamper(shard: PostgresShard, statement: str, params: list) -> None:
    """As the superuser, past the triggers (session_replication_role = replica)."""
    with psycopg.connect(shard.superuser_dsn("corebank")) as connection:
        connection.execute("SET session_replication_role = replica")
        connection.execute(statement, params)


def test_written_chains_verify_and_tampering_is_named(shard, cluster_file, tmp_path):
    first, second, third = asyncio.run(write_chains([Shard(shard.name, shard.dsn)], 3))

    code, report = verify(cluster_file)
    assert code == 0, report
    chains = {item["chain_id"]: item for item in report["chains"]}
    for chain_id in (first, second, third):
        assert chains[chain_id]["last_seq"] == ENTRIES_PER_CHAIN + 2  # opening and closing entries
        assert chains[chain_id]["closed"] and chains[chain_id]["broken"] is None
    anchors = tmp_path / "heads.json"
    anchors.write_text(json.dumps(report))

    # One change per chain, each past the triggers: a field rewritten, an entry deleted, the end cut.
    tamper(shard, "UPDATE audit_log SET outcome = 'refused:INSUFFICIENT_FUNDS' WHERE chain_id = %s AND seq = 700", [first])
    tamper(shard, "DELETE FROM audit_log WHERE chain_id = %s AND seq = 41", [second])
    tamper(shard, "DELETE FROM audit_log WHERE chain_id = %s AND seq > 1000", [third])

    code, report = verify(cluster_file)
    assert code == 1, report
    breaks = {item["chain_id"]: item for item in report["breaks"]}
    assert (breaks[first]["seq"], breaks[first]["problem"]) == (700, "hash_differs")
    assert (breaks[second]["seq"], breaks[second]["problem"]) == (41, "missing")
    # A cut end leaves a chain that holds, but not closed; the anchors of an earlier run show the cut.
    assert third not in breaks
    assert not {item["chain_id"]: item for item in report["chains"]}[third]["closed"]
    code, report = verify(cluster_file, "--anchors", str(anchors))
    assert code == 1
    breaks = {item["chain_id"]: item for item in report["breaks"]}
    assert (breaks[third]["seq"], breaks[third]["problem"]) == (1001, "anchor_differs")

    # The text output names the first broken link too.
    completed = subprocess.run(
        [sys.executable, "-m", "services.audit_log", "verify", "--cluster", str(cluster_file)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=CLI_TIMEOUT_SECONDS, check=False,
    )
    assert completed.returncode == 1
    assert f"chain {first}: first broken link at seq 700: hash_differs" in completed.stdout


def test_the_service_role_cannot_rewrite_the_log_and_the_owner_is_stopped_by_the_triggers(shard):
    asyncio.run(write_chains([Shard(shard.name, shard.dsn)], 1))
    for statement in ("UPDATE audit_log SET outcome = 'x'", "DELETE FROM audit_log", "TRUNCATE audit_log"):
        with psycopg.connect(shard.dsn) as connection, pytest.raises(psycopg.errors.InsufficientPrivilege):
            connection.execute(statement)
        with psycopg.connect(shard.owner_dsn) as connection, pytest.raises(psycopg.errors.RestrictViolation, match="append-only"):
            connection.execute(statement)


def test_a_writer_whose_shard_is_down_continues_on_another_and_anchors_the_chain_it_left(shard, cluster_file):
    shards = [Shard("dead-shard", UNREACHABLE_DSN), Shard(shard.name, shard.dsn)]
    (chain_id,) = asyncio.run(write_chains(shards, 1, home="dead-shard", failover_after_seconds=0.5))
    code, report = verify(cluster_file)
    chains = {item["chain_id"]: item for item in report["chains"]}
    assert chains[chain_id]["closed"] and chains[chain_id]["last_seq"] == ENTRIES_PER_CHAIN + 2
    assert code in (0, 1)  # the first test's tampering may still be there; this chain holds either way
    assert chain_id not in {item["chain_id"] for item in report["breaks"]}
    with psycopg.connect(shard.auditor_dsn) as connection:
        (detail,) = connection.execute("SELECT detail FROM audit_log WHERE chain_id = %s AND seq = 1", [chain_id]).fetchone()
    opening = json.loads(detail)
    # The pool's wait for a connection ends first (DEADLINE_EXCEEDED) or the connect fails (SHARD_UNAVAILABLE).
    assert opening["cause"] in ("failover: SHARD_UNAVAILABLE", "failover: DEADLINE_EXCEEDED"), opening
    assert opening["left_shard"] == "dead-shard" and opening["stored_chain"] == ""  # nothing was stored before


def test_a_shard_that_cannot_be_read_exits_2(tmp_path):
    path = tmp_path / "cluster.json"
    path.write_text(json.dumps({"shards": [{"name": "dead-shard", "dsn": UNREACHABLE_DSN}]}))
    code, report = verify(path)
    assert code == 2 and report["verdict"] == "shard unreadable" and report["shard"] == "dead-shard"


def test_a_seq_taken_by_someone_else_is_noticed_not_silently_skipped(shard):
    """INSERT ... ON CONFLICT DO NOTHING would skip a seq a stranger with the service role's INSERT
    right wrote first; the store compares what each seq holds with what it wrote (found by review)."""
    chain_id = f"stranger-test-{uuid.uuid4().hex[:8]}"
    links = chain.chained(chain_id, 1, chain.GENESIS_HASH, [
        chain.event(1, "customer-1", "customer", "transfer", f"t-{n}", "{}", "POSTED") for n in range(3)
    ])
    forged = chain.chained(chain_id, 2, links[0].hash, [chain.event(1, "mallory", "admin", "transfer", "t-x", "{}", "POSTED")])[0]
    with psycopg.connect(shard.dsn) as connection:  # the service role: INSERT is all it takes
        connection.execute(
            "INSERT INTO audit_log (chain_id, seq, at_us, subject, role, action, target, detail, outcome, prev_hash, hash)"
            " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
            [chain_id, forged.entry.seq, forged.entry.at_us, forged.entry.subject, forged.entry.role, forged.entry.action,
             forged.entry.target, forged.entry.detail, forged.entry.outcome, forged.prev_hash, forged.hash],
        )

    async def insert() -> None:
        router: ShardRouter[ShardStore] = ShardRouter(bootstrap.open_shard_store, bootstrap.close_shard_store)
        await router.apply(ShardMap.evenly([Shard(shard.name, shard.dsn)]))
        try:
            await ShardAuditStore(router).insert(shard.name, links, 10)
        finally:
            await router.close()

    with pytest.raises(chain.LinkTaken, match=r"seqs \[2\]"):
        asyncio.run(insert())
