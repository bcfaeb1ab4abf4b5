"""Operators' view of transfers between shards that are not final yet.

    python -m services.coordinator.operator list [--json] [--cluster .corebank/cluster.json]
    python -m services.coordinator.operator retry TRANSFER_ID [--actor NAME]

`list` marks FAULTED the transfers whose driver met a permanent failure after
the decision (a bug or a broken invariant, also counted in
corebank_tcc_faults_total and logged at ERROR): recovery leaves those alone.
`retry` clears the fault, takes the transfer's lease now (bumping its epoch, so whoever held it
can change nothing any more) and drives it to a final state, following the
same protocol as any coordinator: nothing an operator does here can post a
transfer twice, or post one side without the other.

Every `retry` is written to the audit log (services/audit_log), as operator NAME (--actor,
default the OS user): once before it acts, and refused (exit 3, nothing done) when that
entry cannot be stored; then with how it ended.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import getpass
import json
import os
import pathlib
import sys

from services.audit_log import chain
from services.audit_log.store import ShardAuditStore
from services.audit_log.writer import AuditWriter, limits_digest, now_us
from services.bootstrap import ShardConnections
from services.coordinator import wiring
from services.coordinator.driver import LEASE_SECONDS, PARTICIPANT_CALL_TIMEOUT_SECONDS, TccForShard, TransferDriver
from services.ledger.access import Role
from services.ledger.limits import TierLimits
from services.storage.tcc_store import TccRecord

IN_DOUBT_LISTED_MAX = 1000
RETRY_SECONDS_MAX = 60.0
# The audit log's entry of a retry must be stored within this time, or the retry is not made.
AUDIT_WAIT_SECONDS_MAX = 10.0
EXIT_AUDIT_LOG_UNAVAILABLE = 3


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
        limits = TierLimits.load()
        driver = wiring.transfer_driver(shards.router, limits, owner=f"operator:{os.getpid()}")
        audit_log = AuditWriter(ShardAuditStore(shards.router), "operator", {"tier_limits_sha256": limits_digest(limits)})
        audit_log.start()
        try:
            return await audited_retry(audit_log, arguments.actor, tcc, shard_names, driver, arguments.transfer_id)
        finally:
            if not await audit_log.close():
                print("WARNING: the audit log's entries of this retry may not all be stored; see the log", file=sys.stderr)
    finally:
        await shards.close()


async def audited_retry(
    audit_log: AuditWriter, actor: str, tcc: TccForShard, shard_names: list[str], driver: TransferDriver, transfer_id: str,
) -> int:
    """`retry`, between its two audit log entries: before it acts (stored first, or nothing is
    done) and how it ended."""

    def entry(outcome: str, detail: dict) -> chain.Event:
        return chain.event(now_us(), actor, Role.OPERATOR.value, "operator_retry", transfer_id, chain.detail_text(detail), outcome)

    started = audit_log.append([entry("STARTED", {"driver": driver.owner})])
    if not await audit_log.written(started, AUDIT_WAIT_SECONDS_MAX):
        print(f"{transfer_id}: the audit log cannot be written now; nothing was done", file=sys.stderr)
        return EXIT_AUDIT_LOG_UNAVAILABLE
    try:
        final = await retry(tcc, shard_names, driver, transfer_id)
    except BaseException as error:  # noqa: BLE001 (logged as the outcome, then re-raised)
        audit_log.append([entry(f"error:{type(error).__name__}", {})])
        raise
    if final is None:
        audit_log.append([entry("not_found:TRANSFER_NOT_FOUND", {})])
        print(f"{transfer_id}: no unfinished transfer between shards with this id")
        return 1
    detail = {"state": final.state.name, "reason": final.reason, "lease_epoch": final.lease_epoch}
    if final.fault:
        audit_log.append([entry(f"FAULTED:{final.state.name}", {**detail, "fault": chain.clean_text(final.fault)})])
        print(f"{transfer_id}: FAULTED again in {final.state.name}: {final.fault}")
        return 2
    audit_log.append([entry(final.state.name, detail)])
    print(f"{transfer_id}: {final.state.name}{' (' + final.reason + ')' if final.reason else ''}")
    return 0


def _os_user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no name for this uid (a container)
        return f"uid:{os.getuid()}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cluster", default=os.path.join(os.environ.get("COREBANK_STATE_DIR", ".corebank"), "cluster.json"))
    commands = parser.add_subparsers(dest="command", required=True)
    list_parser = commands.add_parser("list", help="in-doubt transfers, oldest first, with age, state, lease and fault")
    list_parser.add_argument("--json", action="store_true", help="a JSON array, one object per transfer")
    retry_parser = commands.add_parser("retry", help="take over one transfer now and drive it to a final state")
    retry_parser.add_argument("transfer_id")
    retry_parser.add_argument("--actor", default=_os_user(), help="who retries, as the audit log names them (default: the OS user)")
    raise SystemExit(asyncio.run(run(parser.parse_args())))


if __name__ == "__main__":
    main()
