"""Operators' view of transfers between shards that are not final yet.

    python -m services.coordinator.operator list [--cluster .corebank/cluster.json]
    python -m services.coordinator.operator retry TRANSFER_ID

`retry` takes the transfer's lease now (bumping its epoch, so whoever held it
can change nothing any more) and drives it to a final state, following the
same protocol as any coordinator: nothing an operator does here can post a
transfer twice, or post one side without the other.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import pathlib

from services.bootstrap import ShardConnections
from services.coordinator.driver import LEASE_SECONDS, PARTICIPANT_CALL_TIMEOUT_SECONDS, TransferDriver
from services.ledger.limits import TierLimits
from services.storage.tcc_store import TccRecord, TccStore

IN_DOUBT_LISTED_MAX = 1000
RETRY_SECONDS_MAX = 60.0


def describe(record: TccRecord, now: datetime.datetime) -> str:
    age_seconds = (now - record.created_at).total_seconds()
    lease_seconds = (record.lease_expires_at - now).total_seconds()
    return (
        f"{record.transfer_id:<40} {record.state.name:<11} age {age_seconds:8.1f}s  {record.amount_minor} {record.currency}"
        f"  {record.debit_account_id} -> {record.credit_account_id} ({record.credit_shard})"
        f"  owner {record.lease_owner} epoch {record.lease_epoch}, lease {'expired' if lease_seconds < 0 else f'{lease_seconds:.1f}s left'}"
        f"  attempts {record.attempts}{'  reason ' + record.reason if record.reason else ''}"
    )


async def list_in_doubt(shards: ShardConnections) -> list[TccRecord]:
    records = []
    for store in shards.router.handles():
        records += await TccStore(store).list_in_doubt(IN_DOUBT_LISTED_MAX, PARTICIPANT_CALL_TIMEOUT_SECONDS)
    return sorted(records, key=lambda record: record.created_at)


async def retry(shards: ShardConnections, transfer_id: str) -> TccRecord | None:
    driver = TransferDriver(shards.router, TierLimits.load(), owner=f"operator:{os.getpid()}")
    for store in shards.router.handles():
        claimed = await TccStore(store).claim_now(transfer_id, driver.owner, LEASE_SECONDS, PARTICIPANT_CALL_TIMEOUT_SECONDS)
        if claimed is not None:
            return await asyncio.wait_for(driver.drive(claimed), RETRY_SECONDS_MAX)
    return None


async def run(arguments: argparse.Namespace) -> int:
    cluster = json.loads(pathlib.Path(arguments.cluster).read_text())
    shards = await ShardConnections.open(cluster["etcd_endpoint"])
    try:
        if arguments.command == "list":
            records = await list_in_doubt(shards)
            now = datetime.datetime.now(datetime.timezone.utc)
            for record in records:
                print(describe(record, now))
            print(f"{len(records)} transfer(s) in doubt")
            return 0
        final = await retry(shards, arguments.transfer_id)
        if final is None:
            print(f"{arguments.transfer_id}: no unfinished transfer between shards with this id")
            return 1
        print(f"{arguments.transfer_id}: {final.state.name}{' (' + final.reason + ')' if final.reason else ''}")
        return 0
    finally:
        await shards.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cluster", default=os.path.join(os.environ.get("COREBANK_STATE_DIR", ".corebank"), "cluster.json"))
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("list", help="in-doubt transfers, oldest first, with age, state and lease")
    retry_parser = commands.add_parser("retry", help="take over one transfer now and drive it to a final state")
    retry_parser.add_argument("transfer_id")
    raise SystemExit(asyncio.run(run(parser.parse_args())))


if __name__ == "__main__":
    main()
