"""Operators' view of transfers between shards that are not final yet.

    python -m services.coordinator.operator list [--json] [--cluster .corebank/cluster.json]
    python -m services.coordinator.operator retry TRANSFER_ID

`list` marks FAULTED the transfers whose driver met a permanent failure after
the decision (a bug or a broken invariant, also counted in
corebank_tcc_faults_total and logged at ERROR): recovery leaves those alone.
`retry` clears the fault, takes the transfer's lease now (bumping its epoch, so whoever held it
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
from services.coordinator import wiring
from services.coordinator.driver import LEASE_SECONDS, PARTICIPANT_CALL_TIMEOUT_SECONDS, TccForShard, TransferDriver
from services.ledger.limits import TierLimits
from services.storage.tcc_store import TccRecord

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
        f"{'  FAULTED ' + record.fault if record.fault else ''}"
    )


def as_json(record: TccRecord, now: datetime.datetime) -> dict:
    return {
        "transfer_id": record.transfer_id, "state": record.state.name, "reason": record.reason,
        "faulted": bool(record.fault), "fault": record.fault,
        "age_seconds": round((now - record.created_at).total_seconds(), 3),
        "amount_minor": record.amount_minor, "currency": record.currency,
        "debit_account_id": record.debit_account_id, "credit_account_id": record.credit_account_id,
        "credit_shard": record.credit_shard, "lease_owner": record.lease_owner, "lease_epoch": record.lease_epoch,
        "lease_expires_at": record.lease_expires_at.isoformat(), "attempts": record.attempts,
    }


async def list_in_doubt(tcc: TccForShard, shard_names: list[str]) -> list[TccRecord]:
    records = []
    for shard_name in shard_names:
        records += await tcc(shard_name).list_in_doubt_with_faults(IN_DOUBT_LISTED_MAX, PARTICIPANT_CALL_TIMEOUT_SECONDS)
    return sorted(records, key=lambda record: record.created_at)


async def retry(tcc: TccForShard, shard_names: list[str], driver: TransferDriver, transfer_id: str) -> TccRecord | None:
    """Clear any fault, take the lease now and drive the transfer; None if no shard has it unfinished."""
    for shard_name in shard_names:
        claimed = await tcc(shard_name).claim_now_clearing_fault(transfer_id, driver.owner, LEASE_SECONDS, PARTICIPANT_CALL_TIMEOUT_SECONDS)
        if claimed is not None:
            return await asyncio.wait_for(driver.drive(claimed), RETRY_SECONDS_MAX)
    return None


async def run(arguments: argparse.Namespace) -> int:
    cluster = json.loads(pathlib.Path(arguments.cluster).read_text())
    shards = await ShardConnections.open(cluster["etcd_endpoint"])
    tcc = wiring.tcc_for_shard(shards.router)
    shard_names = wiring.shard_names(shards.router)()
    try:
        if arguments.command == "list":
            records = await list_in_doubt(tcc, shard_names)
            now = datetime.datetime.now(datetime.timezone.utc)
            if arguments.json:
                print(json.dumps([as_json(record, now) for record in records], indent=2))
                return 0
            for record in records:
                print(describe(record, now))
            faulted = sum(1 for record in records if record.fault)
            print(f"{len(records)} transfer(s) in doubt{f', {faulted} FAULTED' if faulted else ''}")
            return 0
        driver = wiring.transfer_driver(shards.router, TierLimits.load(), owner=f"operator:{os.getpid()}")
        final = await retry(tcc, shard_names, driver, arguments.transfer_id)
        if final is None:
            print(f"{arguments.transfer_id}: no unfinished transfer between shards with this id")
            return 1
        if final.fault:
            print(f"{arguments.transfer_id}: FAULTED again in {final.state.name}: {final.fault}")
            return 2
        print(f"{arguments.transfer_id}: {final.state.name}{' (' + final.reason + ')' if final.reason else ''}")
        return 0
    finally:
        await shards.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cluster", default=os.path.join(os.environ.get("COREBANK_STATE_DIR", ".corebank"), "cluster.json"))
    commands = parser.add_subparsers(dest="command", required=True)
    list_parser = commands.add_parser("list", help="in-doubt transfers, oldest first, with age, state, lease and fault")
    list_parser.add_argument("--json", action="store_true", help="a JSON array, one object per transfer")
    retry_parser = commands.add_parser("retry", help="take over one transfer now and drive it to a final state")
    retry_parser.add_argument("transfer_id")
    raise SystemExit(asyncio.run(run(parser.parse_args())))


if __name__ == "__main__":
    main()
