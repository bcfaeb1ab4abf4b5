"""Prove the audit log: every chain of every shard, link by link.

    python -m services.audit_log verify [--cluster PATH] [--json] [--anchors FILE]

Reads each shard's `audit_log` in one snapshot (REPEATABLE READ READ ONLY: writers never
wait for it), streaming it by chain and seq, and checks every chain (chain.py): seq runs
1, 2, 3, ...; each entry names the hash of the one before; each stored hash is the hash of
its content. It names the first broken link of each chain that does not hold. Then the
anchors: a chain opened after its writer left a failing shard names the last entry stored
in the chain it left, and `--anchors FILE` (an earlier `verify --json` output, or the heads
the writers log) names heads seen before; each must still be there, with the same hash,
which is what shows entries cut from a chain's end.

This is not the ledger's invariant audit (python -m services.storage.audit), whose
conventions it follows.

Exit status: 0 every chain holds, 1 a link is broken, 2 a shard (or the cluster
description) cannot be read.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import itertools
import json
import pathlib
import sys
import time
from collections.abc import Iterable, Iterator

import psycopg

from services.audit_log import chain, store
from services.audit_log.chain import Break, ChainReport, Link, Problem
from services.storage.audit import (
    CLUSTER_FILE_NAME, DEFAULT_STATE_DIR, EXIT_HOLDS, EXIT_SHARD_UNREADABLE, EXIT_VIOLATIONS, STATE_DIR_ENV, ShardUnreadable, cluster_unreadable, connect_for_reading,
    default_cluster_path, reader_dsn, shard_unreadable,
)

# The invariant audit's exit statuses: 0 holds, 1 broken, 2 a shard could not be read.
EXIT_BROKEN = EXIT_VIOLATIONS


# Bounds: an operator's tool, but it must not hang on a dead shard nor hold a snapshot open for ever.
STATEMENT_TIMEOUT_SECONDS = 600
SHARD_READERS_MAX = 16
# Anchors checked in one run (each is one indexed read); the rest are counted, not checked.
ANCHORS_CHECKED_MAX = 100_000
# Chains listed one per line in the text output; the rest are summed up.
CHAINS_LISTED_MAX = 1_000

SELECT_HASH_AT = f"SELECT hash FROM {store.TABLE} WHERE chain_id = %s AND seq = %s"  # nosec B608 # constants only, no request data


@dataclasses.dataclass(frozen=True)
class Anchor:
    """An entry seen before, that its chain must still hold: seq and hash."""

    chain_id: str
    seq: int
    hash: bytes
    source: str  # who names it, for the report


@dataclasses.dataclass
class ShardLog:
    shard_name: str
    chains: list[ChainReport]
    anchors: list[Anchor]  # named by this shard's chain openings

    @property
    def entries(self) -> int:
        return sum(report.entries for report in self.chains)


@dataclasses.dataclass
class Verification:
    shards: list[ShardLog]
    breaks: list[Break]
    anchors_checked: int
    anchors_unchecked: int
    duration_seconds: float

    @property
    def holds(self) -> bool:
        return not self.breaks

    def chains(self) -> list[tuple[str, ChainReport]]:
        return [(shard.shard_name, report) for shard in self.shards for report in shard.chains]

    def as_json(self) -> dict:
        return {
            "verdict": "holds" if self.holds else "broken", "holds": self.holds,
            "shards": [{"shard": shard.shard_name, "chains": len(shard.chains), "entries": shard.entries} for shard in self.shards],
            "chains": [{"shard": shard_name, **report.as_json()} for shard_name, report in self.chains()],
            "breaks": [b.as_json() for b in self.breaks],
            "anchors_checked": self.anchors_checked, "anchors_unchecked": self.anchors_unchecked,
            "duration_seconds": round(self.duration_seconds, 3),
        }


def _opening_anchors(chain_id: str, links: Iterable[Link], anchors: list[Anchor]) -> Iterator[Link]:
    """The links, passed on; a chain opening that names the last entry stored before it (a
    writer that left a failing shard) adds that entry to `anchors`."""
    for link in links:
        entry = link.entry
        if entry.action == chain.CHAIN_OPENED and entry.seq == 1 and '"stored_chain"' in entry.detail:
            try:
                detail = json.loads(entry.detail)
                if detail["stored_chain"]:
                    anchors.append(Anchor(detail["stored_chain"], int(detail["stored_seq"]), bytes.fromhex(detail["stored_hash"]),
                                          f"the opening of chain {chain_id}"))
            except (ValueError, KeyError, TypeError):
                pass  # a tampered opening breaks its own hash, reported by its chain's check
        yield link


def read_shard(shard_name: str, dsn: str) -> ShardLog:
    """Check every chain of one shard, in one snapshot."""
    reports: list[ChainReport] = []
    anchors: list[Anchor] = []
    try:
        with connect_for_reading(shard_name, dsn, STATEMENT_TIMEOUT_SECONDS) as connection:
            connection.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            if not connection.execute(store.TABLE_EXISTS).fetchone()[0]:
                # The schema always creates it: a shard without it was never migrated, or the table was dropped.
                raise ShardUnreadable(shard_name, f"no {store.TABLE} table (schema not applied, or the table was dropped)")
            for chain_id, links in itertools.groupby(store.read_links(connection), key=lambda link: link.entry.chain_id):
                reports.append(chain.check(chain_id, _opening_anchors(chain_id, links, anchors)))
            connection.execute("COMMIT")
    except psycopg.Error as error:  # any database error here means this shard cannot be read: exit 2
        raise ShardUnreadable(shard_name, error) from error
    return ShardLog(shard_name, reports, anchors)


def _hashes_at(shards: list[dict], wanted: dict[str, list[tuple[str, int]]]) -> dict[tuple[str, int], bytes]:
    """The stored hash of each (chain, seq) wanted, per shard name. Rows are never changed, so a
    later read than the chains' snapshot sees the same rows (and perhaps newer ones)."""
    found: dict[tuple[str, int], bytes] = {}
    for shard in shards:
        keys = wanted.get(shard["name"])
        if not keys:
            continue
        try:
            with connect_for_reading(shard["name"], reader_dsn(shard), STATEMENT_TIMEOUT_SECONDS) as connection:
                for chain_id, seq in keys:
                    row = connection.execute(SELECT_HASH_AT, [chain_id, seq]).fetchone()
                    if row is not None:
                        found[(chain_id, seq)] = bytes(row[0])
        except psycopg.Error as error:  # any database error here means this shard cannot be read: exit 2
            raise ShardUnreadable(shard["name"], error) from error
    return found


def verify_cluster(shards: list[dict], anchors: Iterable[Anchor] = ()) -> Verification:
    """Check every chain of every shard (dicts with "name" and "dsn" or "auditor_dsn", as in cluster.json), then the
    anchors: the chain openings' and the given ones. Raises ShardUnreadable."""
    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, min(SHARD_READERS_MAX, len(shards)))) as pool:
        logs = list(pool.map(lambda shard: read_shard(shard["name"], reader_dsn(shard)), shards))
    breaks = [report.broken for shard_log in logs for report in shard_log.chains if report.broken is not None]

    where: dict[str, tuple[str, ChainReport]] = {}
    for shard_log in logs:
        for report in shard_log.chains:
            if report.chain_id in where:
                breaks.append(Break(report.chain_id, 1, Problem.SEVERAL_SHARDS,
                                    f"entries on {where[report.chain_id][0]} and on {shard_log.shard_name}"))
                continue
            where[report.chain_id] = (shard_log.shard_name, report)

    every_anchor = [anchor for shard_log in logs for anchor in shard_log.anchors] + list(anchors)
    checked, unchecked = every_anchor[:ANCHORS_CHECKED_MAX], every_anchor[ANCHORS_CHECKED_MAX:]
    wanted: dict[str, list[tuple[str, int]]] = {}
    for anchor in checked:
        if anchor.chain_id in where and 1 <= anchor.seq <= where[anchor.chain_id][1].last_seq:
            wanted.setdefault(where[anchor.chain_id][0], []).append((anchor.chain_id, anchor.seq))
    stored = _hashes_at(shards, wanted)
    for anchor in checked:
        if anchor.chain_id not in where:
            breaks.append(Break(anchor.chain_id, 1, Problem.ANCHOR, f"{anchor.source} names seq {anchor.seq} of this chain,"
                                " and no shard holds any entry of it"))
            continue
        found = chain.anchor_break(where[anchor.chain_id][1], anchor.seq, anchor.hash, stored.get((anchor.chain_id, anchor.seq)), anchor.source)
        if found is not None:
            breaks.append(found)
    breaks.sort(key=lambda b: (b.chain_id, b.seq))
    return Verification(logs, breaks, len(checked), len(unchecked), time.monotonic() - started)


def anchors_from(document: dict, source: str) -> list[Anchor]:
    """The chain heads of an earlier `verify --json` output."""
    return [
        Anchor(item["chain_id"], int(item["last_seq"]), bytes.fromhex(item["head_hash"]), f"{source} (seq {item['last_seq']})")
        for item in document.get("chains", []) if int(item["last_seq"]) > 0
    ]


# The command.


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m services.audit_log",
        description="The audit log of a corebank cluster (who did what, when, how it ended), hash-chained per process.",
        epilog=f"Exit status: {EXIT_HOLDS} every chain holds, {EXIT_BROKEN} a link is broken,"
        f" {EXIT_SHARD_UNREADABLE} a shard could not be read.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    verify = commands.add_parser("verify", help="prove every chain of every shard; name the first broken link of each")
    verify.add_argument("--cluster", type=pathlib.Path, default=None,
                        help=f"the cluster.json (default: ${STATE_DIR_ENV}/{CLUSTER_FILE_NAME}, {STATE_DIR_ENV} defaulting to {DEFAULT_STATE_DIR})")
    verify.add_argument("--json", action="store_true", help="print one JSON document: shards, chains, breaks, verdict")
    verify.add_argument("--anchors", type=pathlib.Path, action="append", default=[],
                        help="an earlier `verify --json` output whose chain heads must still be there (repeatable)")
    arguments = parser.parse_args(argv)
    arguments.cluster = arguments.cluster or default_cluster_path()
    return arguments


def _time(at_us: int | None) -> str:
    if at_us is None:
        return "-"
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(at_us / 1_000_000)) + "Z"


def print_text(verification: Verification) -> None:
    chains = verification.chains()
    for shard_name, report in chains[:CHAINS_LISTED_MAX]:
        state = "BROKEN" if report.broken else ("closed" if report.closed else "open")
        print(f"{shard_name}: chain {report.chain_id}: {report.entries} entries, last seq {report.last_seq},"
              f" {state}, {_time(report.first_at_us)} .. {_time(report.last_at_us)}, head {report.head_hash.hex()}")
    if len(chains) > CHAINS_LISTED_MAX:
        print(f"... and {len(chains) - CHAINS_LISTED_MAX} more chains (--json lists them all)")
    for shard in verification.shards:
        print(f"{shard.shard_name}: {len(shard.chains)} chains, {shard.entries} entries")
    open_chains = sum(1 for _, report in chains if not report.closed and not report.broken)
    print(f"{len(chains)} chains, {sum(s.entries for s in verification.shards)} entries; {open_chains} open (being written,"
          f" or their writer stopped without closing them); anchors checked: {verification.anchors_checked}"
          f"{f', not checked: {verification.anchors_unchecked}' if verification.anchors_unchecked else ''};"
          f" took {verification.duration_seconds:.2f}s")
    if verification.holds:
        print("audit log holds")
    else:
        print("AUDIT LOG BROKEN:\n  " + "\n  ".join(str(b) for b in verification.breaks))


def main(argv: list[str] | None = None) -> int:
    arguments = parse_arguments(argv)
    try:
        shards = json.loads(arguments.cluster.read_text())["shards"]
        anchors = [anchor for path in arguments.anchors for anchor in anchors_from(json.loads(path.read_text()), str(path))]
    except (OSError, ValueError, KeyError, TypeError) as error:
        # Without the description (or the anchors asked for) nothing can be proved: the same answer as an unreadable shard.
        message = f"cannot read the cluster description {arguments.cluster} or an anchors file: {error}"
        return cluster_unreadable(message, arguments.json)
    try:
        verification = verify_cluster(shards, anchors)
    except ShardUnreadable as error:
        return shard_unreadable(error, arguments.json)
    if arguments.json:
        print(json.dumps(verification.as_json(), indent=1, sort_keys=True))
    else:
        print_text(verification)
    return EXIT_HOLDS if verification.holds else EXIT_BROKEN


if __name__ == "__main__":
    sys.exit(main())
