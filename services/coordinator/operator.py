"""Operators' view of transfers between shards that are not final yet.

    python -m services.coordinator.operator [--cluster .corebank/cluster.json] list [--json]
    python -m services.coordinator.operator [--cluster .corebank/cluster.json] retry TRANSFER_ID [--actor NAME] [--json]

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

Shards are asked at once, each within SHARD_ANSWER_SECONDS: a shard that does not answer in
time (down, frozen, cut off) is named, and `list` prints what the others know.

--json prints one JSON object (the conventions of python -m services.storage.audit --json):
`verdict` says in words how it ended, beside the fields of the command's answer.

Exit status: 0 done; 1 (retry) no unfinished transfer with this id; 2 (retry) FAULTED again;
3 (retry) the audit log cannot be written, nothing done; 4 a shard did not answer (list: the
transfers of the other shards are listed; retry: the transfer's state is unknown, list again).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime
import getpass
import json
import logging
import os
import pathlib
import sys

from services.audit_log import chain
from services.audit_log.store import ShardAuditStore
from services.audit_log.writer import AuditWriter, limits_digest, now_us
from services.bootstrap import ShardConnections
from services.coordinator import wiring
from services.coordinator.driver import LEASE_SECONDS, PARTICIPANT_CALL_TIMEOUT_SECONDS, TccForShard, TransferDriver
from services.ledger import errors
from services.ledger.access import Role
from services.ledger.limits import TierLimits
from services.storage.tcc_store import TccRecord
from sharding import etcd_shard_map

IN_DOUBT_LISTED_MAX = 1000
RETRY_SECONDS_MAX = 60.0
# The audit log's entry of a retry must be stored within this time, or the retry is not made.
AUDIT_WAIT_SECONDS_MAX = 10.0
# A shard's answer to the list, as a participant call's: a shard slower than this is named as unreachable.
SHARD_ANSWER_SECONDS = PARTICIPANT_CALL_TIMEOUT_SECONDS
EXIT_DONE, EXIT_NOT_FOUND, EXIT_FAULTED_AGAIN, EXIT_AUDIT_LOG_UNAVAILABLE, EXIT_SHARD_UNREACHABLE = 0, 1, 2, 3, 4


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


@dataclasses.dataclass(frozen=True)
class InDoubt:
    """The transfers in doubt that the shards told, oldest first, and the shards that did not answer."""

    records: list[TccRecord]
    unreachable: dict[str, str]  # shard name -> why

    def as_json(self, now: datetime.datetime) -> dict:
        return {
            "verdict": "complete" if not self.unreachable else "incomplete: a shard did not answer",
            "complete": not self.unreachable,
            "in_doubt": len(self.records),
            "faulted": sum(1 for record in self.records if record.fault),
            "transfers": [as_json(record, now) for record in self.records],
            "unreachable_shards": [{"shard": name, "error": why} for name, why in sorted(self.unreachable.items())],
        }


async def list_in_doubt(tcc: TccForShard, shard_names: list[str]) -> InDoubt:
    """Every shard at once, each within SHARD_ANSWER_SECONDS (one shard down or frozen costs no more)."""

    async def list_on(shard_name: str) -> list[TccRecord]:
        return await tcc(shard_name).list_in_doubt_with_faults(IN_DOUBT_LISTED_MAX, SHARD_ANSWER_SECONDS)

    answers = await asyncio.gather(*(list_on(shard_name) for shard_name in shard_names), return_exceptions=True)
    records, unreachable = [], {}
    for shard_name, answer in zip(shard_names, answers):
        if isinstance(answer, errors.LedgerError):  # an outage or a deadline: the storage layer's words, no SQL
            unreachable[shard_name] = str(answer)
        elif isinstance(answer, BaseException):
            raise answer  # a bug: loud
        else:
            records += answer
    return InDoubt(sorted(records, key=lambda record: record.created_at), unreachable)


async def retry(tcc: TccForShard, shard_names: list[str], driver: TransferDriver, transfer_id: str) -> TccRecord | None:
    """Clear any fault, take the lease now and drive the transfer; None if no shard has it unfinished."""
    for shard_name in shard_names:
        claimed = await tcc(shard_name).claim_now_clearing_fault(transfer_id, driver.owner, LEASE_SECONDS, PARTICIPANT_CALL_TIMEOUT_SECONDS)
        if claimed is not None:
            return await asyncio.wait_for(driver.drive(claimed), RETRY_SECONDS_MAX)
    return None


def print_list(in_doubt: InDoubt, as_json_document: bool) -> int:
    now = datetime.datetime.now(datetime.timezone.utc)
    if as_json_document:
        print(json.dumps(in_doubt.as_json(now), indent=1, sort_keys=True))
    else:
        for record in in_doubt.records:
            print(describe(record, now))
        faulted = sum(1 for record in in_doubt.records if record.fault)
        unreachable = ", ".join(sorted(in_doubt.unreachable))
        print(f"{len(in_doubt.records)} transfer(s) in doubt{f', {faulted} FAULTED' if faulted else ''}"
              f"{f' on the shards that answered; NOT ANSWERING: {unreachable}' if unreachable else ''}")
        for shard_name, why in sorted(in_doubt.unreachable.items()):
            print(f"SHARD UNREACHABLE: {why if why.startswith(shard_name) else f'{shard_name}: {why}'}", file=sys.stderr)
    return EXIT_SHARD_UNREACHABLE if in_doubt.unreachable else EXIT_DONE


async def run(arguments: argparse.Namespace) -> int:
    cluster = json.loads(pathlib.Path(arguments.cluster).read_text())
    shards = await ShardConnections.open(etcd_shard_map.endpoints_of(cluster))
    tcc = wiring.tcc_for_shard(shards.router)
    shard_names = wiring.shard_names(shards.router)()
    try:
        if arguments.command == "list":
            return print_list(await list_in_doubt(tcc, shard_names), arguments.json)
        limits = TierLimits.load()
        driver = wiring.transfer_driver(shards.router, limits, owner=f"operator:{os.getpid()}")
        audit_log = AuditWriter(ShardAuditStore(shards.router), "operator", {"tier_limits_sha256": limits_digest(limits)})
        audit_log.start()
        try:
            return await audited_retry(audit_log, arguments.actor, tcc, shard_names, driver, arguments.transfer_id, arguments.json)
        finally:
            if not await audit_log.close():
                print("WARNING: the audit log's entries of this retry may not all be stored; see the log", file=sys.stderr)
    finally:
        await shards.close()


def retry_answer(transfer_id: str, verdict: str, final: TccRecord | None = None, error: str = "") -> dict:
    """`retry --json`: how it ended (`verdict`), and the transfer's state when it ended in one."""
    return {
        "verdict": verdict, "transfer_id": transfer_id, "state": final.state.name if final else None,
        "reason": final.reason if final else "", "fault": final.fault if final else "", "error": error,
    }


async def audited_retry(
    audit_log: AuditWriter, actor: str, tcc: TccForShard, shard_names: list[str], driver: TransferDriver, transfer_id: str,
    as_json_document: bool = False,
) -> int:
    """`retry`, between its two audit log entries: before it acts (stored first, or nothing is
    done) and how it ended."""

    def entry(outcome: str, detail: dict) -> chain.Event:
        return chain.event(now_us(), actor, Role.OPERATOR.value, "operator_retry", transfer_id, chain.detail_text(detail), outcome)

    def answer(code: int, text: str, verdict: str, final: TccRecord | None = None, error: str = "") -> int:
        if as_json_document:
            print(json.dumps(retry_answer(transfer_id, verdict, final, error), indent=1, sort_keys=True))
        else:
            print(text, file=sys.stderr if code in (EXIT_AUDIT_LOG_UNAVAILABLE, EXIT_SHARD_UNREACHABLE) else sys.stdout)
        return code

    started = audit_log.append([entry("STARTED", {"driver": driver.owner})])
    if not await audit_log.written(started, AUDIT_WAIT_SECONDS_MAX):
        return answer(EXIT_AUDIT_LOG_UNAVAILABLE, f"{transfer_id}: the audit log cannot be written now; nothing was done",
                      "audit log unavailable: nothing done")
    try:
        final = await retry(tcc, shard_names, driver, transfer_id)
    except (errors.LedgerError, TimeoutError) as error:
        # A shard that did not answer (or the drive's bound): where the transfer stands is unknown.
        audit_log.append([entry(f"error:{type(error).__name__}", {})])
        return answer(EXIT_SHARD_UNREACHABLE, f"{transfer_id}: not finished, state unknown ({error or type(error).__name__});"
                      " list it again", "state unknown: a shard did not answer in time", error=str(error) or type(error).__name__)
    except BaseException as error:  # noqa: BLE001 (logged as the outcome, then re-raised)
        audit_log.append([entry(f"error:{type(error).__name__}", {})])
        raise
    if final is None:
        audit_log.append([entry("not_found:TRANSFER_NOT_FOUND", {})])
        return answer(EXIT_NOT_FOUND, f"{transfer_id}: no unfinished transfer between shards with this id", "not found")
    detail = {"state": final.state.name, "reason": final.reason, "lease_epoch": final.lease_epoch}
    if final.fault:
        audit_log.append([entry(f"FAULTED:{final.state.name}", {**detail, "fault": chain.clean_text(final.fault)})])
        return answer(EXIT_FAULTED_AGAIN, f"{transfer_id}: FAULTED again in {final.state.name}: {final.fault}", "faulted again", final)
    audit_log.append([entry(final.state.name, detail)])
    return answer(EXIT_DONE, f"{transfer_id}: {final.state.name}{' (' + final.reason + ')' if final.reason else ''}", "final", final)


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
    list_parser.add_argument("--json", action="store_true",
                             help="one JSON object: verdict, complete, transfers (one object each), unreachable_shards")
    retry_parser = commands.add_parser("retry", help="take over one transfer now and drive it to a final state")
    retry_parser.add_argument("transfer_id")
    retry_parser.add_argument("--actor", default=_os_user(), help="who retries, as the audit log names them (default: the OS user)")
    retry_parser.add_argument("--json", action="store_true", help="one JSON object: verdict, transfer_id, state, reason, fault, error")
    # Warnings of the libraries (a pool that cannot reach its shard) go to standard error, named.
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    raise SystemExit(asyncio.run(run(parser.parse_args())))


if __name__ == "__main__":
    main()
