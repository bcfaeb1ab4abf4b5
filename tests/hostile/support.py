"""What a hostile client and an auditor need: calls that never raise but record what the
client was told, the ledger read straight from the shards' databases, a bounded wait
for quiescence, and the invariants, each returned as readable violations.

Nothing here trusts the service's own answers about money: balances, transfer
records and coordinator states come from psycopg connections to each shard.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Iterable

import grpc
import psycopg
from google.rpc import error_details_pb2

from corebank.v1 import accounts_pb2, payments_pb2, transfers_pb2
from services.storage.audit import audit_cluster
from tests.fixtures.ledger import failure

# Longer than the test cluster's pending timeout (tests/conftest.py, 8 s), so that a
# transfer the system cancels answers ABORTED instead of an ambiguous DEADLINE_EXCEEDED.
CALL_TIMEOUT_SECONDS = 12.0
# Quiescence: transfers between shards final (pending timeout 8 s + lease 5 s + scan 1 s
# covers a dead driver) and collecting merchants swept (a scan every 1 s).
QUIESCENCE_WAIT_SECONDS_MAX = 20.0
QUIESCENCE_POLL_SECONDS = 0.25

CLEARING_OWNER_ID = "corebank-clearing"
SUB_ACCOUNT_PREFIX = "sub_"
# tcc_transfers.state and transfers.status numbers, read without the service's code.
TCC_FINAL_STATES = {4: "POSTED", 5: "REJECTED", 6: "VOIDED"}
STATUS_NAMES = {1: "PENDING", 2: "POSTED", 3: "VOIDED", 4: "REJECTED"}
TCC_STATE_TO_STATUS = {1: "PENDING", 2: "PENDING", 3: "PENDING", 4: "POSTED", 5: "REJECTED", 6: "VOIDED"}
ACCOUNT_STATUS_FROZEN, ACCOUNT_STATUS_CLOSED = 4, 5

# Answers after which the client cannot know whether the transfer happened.
AMBIGUOUS_CODES = {grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED}
# Refusals that README says are recorded as REJECTED, so a retry answers the same.
RECORDED_REFUSALS = {
    "INSUFFICIENT_FUNDS", "ACCOUNT_FROZEN", "ACCOUNT_DEBIT_BLOCKED", "ACCOUNT_CREDIT_BLOCKED", "ACCOUNT_CLOSED",
    "CURRENCY_MISMATCH", "LIMIT_EXCEEDED", "BALANCE_OVERFLOW", "ACCOUNT_NOT_FOUND", "NET_DEBIT_CAP_EXCEEDED",
}
FORBIDDEN_CODES = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}


# ---------------------------------------------------------------------------------------
# What the client sent and what it was told.

@dataclasses.dataclass(frozen=True)
class Fields:
    transfer_id: str
    debit_account_id: str
    credit_account_id: str
    amount_minor: int
    currency: str

    @classmethod
    def of(cls, message) -> Fields:
        return cls(message.transfer_id, message.debit_account_id, message.credit_account_id, message.amount_minor, message.currency)


@dataclasses.dataclass
class Answer:
    """One transfer's answer as the client saw it (from Transfer or one CreateTransfers result)."""

    method: str
    request: Fields
    code: grpc.StatusCode  # OK for a returned transfer
    reason: str = ""  # ErrorInfo reason, or the returned transfer's status name
    returned: Fields | None = None  # the transfer the service returned
    returned_status: str = ""

    @property
    def acknowledged_posted(self) -> bool:
        return self.code == grpc.StatusCode.OK and self.returned_status == "POSTED"

    def __str__(self) -> str:
        r = self.request
        what = self.returned_status if self.code == grpc.StatusCode.OK else f"{self.code.name}/{self.reason}"
        return f"{self.method}({r.transfer_id}: {r.debit_account_id}->{r.credit_account_id} {r.amount_minor} {r.currency}) = {what}"


class Journal:
    """Every answer and every contract breach a sequence met, safe to fill from threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.answers: list[Answer] = []
        self.breaches: list[str] = []
        self.closed_accounts: set[str] = set()

    def add(self, answer: Answer) -> None:
        with self._lock:
            self.answers.append(answer)

    def breach(self, text: str) -> None:
        with self._lock:
            self.breaches.append(text)

    def by_id(self) -> dict[str, list[Answer]]:
        found: dict[str, list[Answer]] = {}
        for answer in self.answers:
            found.setdefault(answer.request.transfer_id, []).append(answer)
        return found


def error_info(error: grpc.RpcError, journal: Journal | None, what: str) -> tuple[grpc.StatusCode, str, dict[str, str]]:
    """(code, reason, metadata); a missing ErrorInfo or an INTERNAL/UNKNOWN status is a breach."""
    try:
        code, reason, metadata = failure(error)
    except AssertionError as missing:
        code, reason, metadata = error.code(), "<no ErrorInfo>", {}
        if journal is not None:
            journal.breach(f"{what}: {error.code().name} without google.rpc.Status/ErrorInfo ({missing}): {error.details()}")
    if journal is not None and code in FORBIDDEN_CODES:
        journal.breach(f"{what}: {code.name}/{reason}: {error.details()}")
    return code, reason, metadata


def result_error(status, journal: Journal, what: str) -> tuple[grpc.StatusCode, str]:
    """(code, reason) of one CreateTransfers result's google.rpc.Status."""
    code = next((c for c in grpc.StatusCode if c.value[0] == status.code), grpc.StatusCode.UNKNOWN)
    info = error_details_pb2.ErrorInfo()
    if not status.details or not status.details[0].Unpack(info) or info.domain != "corebank.v1":
        journal.breach(f"{what}: result {code.name} without an ErrorInfo of corebank.v1: {status.message}")
        return code, "<no ErrorInfo>"
    if code in FORBIDDEN_CODES or code == grpc.StatusCode.OK:
        journal.breach(f"{what}: result {code.name}/{info.reason}: {status.message}")
    return code, info.reason


def transfer(ledger, journal: Journal, request: payments_pb2.TransferRequest) -> Answer:
    fields = Fields.of(request)
    try:
        returned = ledger.payments.Transfer(request, timeout=CALL_TIMEOUT_SECONDS)
    except grpc.RpcError as error:
        code, reason, _ = error_info(error, journal, f"Transfer {fields}")
        answer = Answer("Transfer", fields, code, reason)
    else:
        answer = Answer("Transfer", fields, grpc.StatusCode.OK, transfers_pb2.TransferStatus.Name(returned.status),
                        Fields.of(returned), transfers_pb2.TransferStatus.Name(returned.status))
    journal.add(answer)
    return answer


def create_transfers(ledger, journal: Journal, requests: list[payments_pb2.TransferRequest]) -> list[Answer]:
    """One answer per request; a failure of the whole call answers every request with it."""
    what = f"CreateTransfers {[Fields.of(r).transfer_id for r in requests]}"
    try:
        response = ledger.payments.CreateTransfers(payments_pb2.CreateTransfersRequest(transfers=requests), timeout=CALL_TIMEOUT_SECONDS)
    except grpc.RpcError as error:
        code, reason, _ = error_info(error, journal, what)
        answers = [Answer("CreateTransfers*", Fields.of(r), code, reason) for r in requests]
    else:
        if len(response.results) != len(requests):
            journal.breach(f"{what}: {len(response.results)} results for {len(requests)} transfers")
        answers = []
        for request, result in zip(requests, response.results):
            if result.HasField("transfer"):
                status = transfers_pb2.TransferStatus.Name(result.transfer.status)
                answers.append(Answer("CreateTransfers", Fields.of(request), grpc.StatusCode.OK, status, Fields.of(result.transfer), status))
            else:
                code, reason = result_error(result.error, journal, f"{what}[{request.transfer_id}]")
                answers.append(Answer("CreateTransfers", Fields.of(request), code, reason))
        _check_chains_atomic(journal, requests, answers, what)
    for answer in answers:
        journal.add(answer)
    return answers


def _check_chains_atomic(journal: Journal, requests, answers: list[Answer], what: str) -> None:
    """A linked chain succeeds or fails whole: never one member POSTED and another refused."""
    chain: list[Answer] = []
    for request, answer in zip(requests, answers):
        chain.append(answer)
        if request.linked:
            continue
        if len(chain) > 1:
            posted = [a for a in chain if a.acknowledged_posted]
            if posted and len(posted) != len(chain):
                journal.breach(f"{what}: linked chain answered in part: {[str(a) for a in chain]}")
        chain = []


def account_call(journal: Journal, what: str, call, request) -> tuple[grpc.StatusCode, str]:
    try:
        call(request, timeout=CALL_TIMEOUT_SECONDS)
    except grpc.RpcError as error:
        code, reason, _ = error_info(error, journal, what)
        return code, reason
    return grpc.StatusCode.OK, ""


def update_status(ledger, journal: Journal, account_id: str, status: int) -> tuple[grpc.StatusCode, str]:
    return account_call(
        journal, f"UpdateAccountStatus({account_id}, {status})", ledger.accounts.UpdateAccountStatus,
        accounts_pb2.UpdateAccountStatusRequest(account_id=account_id, status=status),
    )


def close_account(ledger, journal: Journal, account_id: str) -> tuple[grpc.StatusCode, str]:
    answer = account_call(
        journal, f"CloseAccount({account_id})", ledger.accounts.CloseAccount, accounts_pb2.CloseAccountRequest(account_id=account_id)
    )
    if answer[0] == grpc.StatusCode.OK:
        journal.closed_accounts.add(account_id)
    return answer


def get_transfer(ledger, transfer_id: str) -> tuple:
    """A comparable summary of GetTransfer's answer."""
    try:
        found = ledger.payments.GetTransfer(payments_pb2.GetTransferRequest(transfer_id=transfer_id), timeout=CALL_TIMEOUT_SECONDS)
    except grpc.RpcError as error:
        try:
            code, reason, _ = failure(error)
        except AssertionError:
            code, reason = error.code(), "<no ErrorInfo>"
        return (code.name, reason)
    return ("OK", transfers_pb2.TransferStatus.Name(found.status), Fields.of(found), found.reason)


# ---------------------------------------------------------------------------------------
# The ledger as the databases hold it.

@dataclasses.dataclass(frozen=True)
class Record:
    """One logical transfer stored on a shard: a coordinator record, or a branch 0 or 3 row."""

    shard: str
    kind: str  # "tcc" or "branch0" / "branch3"
    fields: Fields
    status: str
    reason: str


def query(shards: list[dict], sql: str, params: Iterable | None = None) -> list[tuple[str, tuple]]:
    rows = []
    for shard in shards:
        with psycopg.connect(shard["dsn"]) as connection:
            rows += [(shard["name"], row) for row in connection.execute(sql, params)]
    return rows


def records_by_id(shards: list[dict], transfer_ids: Iterable[str]) -> dict[str, list[Record]]:
    ids = sorted(set(transfer_ids))
    found: dict[str, list[Record]] = {}
    for shard, row in query(shards, """
            SELECT transfer_id, debit_account_id, credit_account_id, amount_minor, currency, state, reason
            FROM tcc_transfers WHERE transfer_id = ANY(%s)""", [ids]):
        found.setdefault(row[0], []).append(Record(shard, "tcc", Fields(*row[:5]), TCC_STATE_TO_STATUS[row[5]], row[6]))
    for shard, row in query(shards, """
            SELECT transfer_id, debit_account_id, credit_account_id, amount_minor, currency, status, reason, branch
            FROM transfers WHERE transfer_id = ANY(%s) AND branch IN (0, 3)""", [ids]):
        found.setdefault(row[0], []).append(Record(shard, f"branch{row[7]}", Fields(*row[:5]), STATUS_NAMES[row[5]], row[6]))
    return found


def posted_records_touching(shards: list[dict], account_ids: Iterable[str]) -> list[Record]:
    """Every POSTED logical transfer (not its branch rows) that debits or credits one of the accounts."""
    ids = sorted(set(account_ids))
    posted = [
        Record(shard, "tcc", Fields(*row[:5]), "POSTED", "")
        for shard, row in query(shards, """
            SELECT transfer_id, debit_account_id, credit_account_id, amount_minor, currency FROM tcc_transfers
            WHERE state = 4 AND (debit_account_id = ANY(%s) OR credit_account_id = ANY(%s))""", [ids, ids])
    ]
    posted += [
        Record(shard, f"branch{row[5]}", Fields(*row[:5]), "POSTED", "")
        for shard, row in query(shards, """
            SELECT transfer_id, debit_account_id, credit_account_id, amount_minor, currency, branch FROM transfers
            WHERE status = 2 AND branch IN (0, 3) AND (debit_account_id = ANY(%s) OR credit_account_id = ANY(%s))""", [ids, ids])
    ]
    return posted


@dataclasses.dataclass(frozen=True)
class StoredAccount:
    shard: str
    account_id: str
    kind: int
    status: int
    currency: str
    balance_minor: int
    debits_pending_minor: int
    credits_pending_minor: int
    parent_account_id: str | None


def stored_accounts(shards: list[dict], where: str = "true", params: Iterable | None = None) -> dict[str, StoredAccount]:
    rows = query(shards, f"""
        SELECT account_id, kind, status, currency, credits_posted_minor::numeric - debits_posted_minor::numeric,
               debits_pending_minor, credits_pending_minor, parent_account_id
        FROM accounts WHERE {where}""", params)
    return {row[0]: StoredAccount(shard, row[0], row[1], row[2], row[3], int(row[4]), row[5], row[6], row[7]) for shard, row in rows}


def sub_accounts(shards: list[dict], merchant_ids: Iterable[str]) -> dict[str, StoredAccount]:
    return stored_accounts(shards, "parent_account_id = ANY(%s)", [sorted(set(merchant_ids))])


def balance_of(shards: list[dict], account_id: str) -> int:
    return stored_accounts(shards, "account_id = %s", [account_id])[account_id].balance_minor


def unfinished_coordinator_records(shards: list[dict]) -> list[tuple[str, str]]:
    return [(shard, row[0]) for shard, row in query(shards, "SELECT transfer_id FROM tcc_transfers WHERE finalized_at IS NULL OR state NOT IN (4, 5, 6)")]


def stranded_collections(shards: list[dict], merchant_ids: Iterable[str]) -> list[str]:
    """Sub-accounts still holding money whose merchant is neither frozen nor closed."""
    merchants = stored_accounts(shards, "account_id = ANY(%s)", [sorted(set(merchant_ids))])
    return [
        f"{sub.account_id} of {sub.parent_account_id} ({merchants[sub.parent_account_id].status}) holds {sub.balance_minor}"
        for sub in sub_accounts(shards, merchant_ids).values()
        if sub.balance_minor != 0 and merchants.get(sub.parent_account_id)
        and merchants[sub.parent_account_id].status not in (ACCOUNT_STATUS_FROZEN, ACCOUNT_STATUS_CLOSED)
    ]


def wait_for_quiescence(shards: list[dict], merchant_ids: Iterable[str], seconds_max: float = QUIESCENCE_WAIT_SECONDS_MAX) -> float:
    """Wait (bounded) until no transfer is in flight anywhere and the merchants' sweeps are done;
    the seconds waited. The invariants then judge whatever is left."""
    merchant_ids = list(merchant_ids)
    started = time.monotonic()
    while time.monotonic() - started < seconds_max:
        pending_rows = query(shards, "SELECT count(*) FROM transfers WHERE status = 1")
        if (not unfinished_coordinator_records(shards) and not any(row[0] for _, row in pending_rows)
                and not stranded_collections(shards, merchant_ids)):
            break
        time.sleep(QUIESCENCE_POLL_SECONDS)
    return time.monotonic() - started


# ---------------------------------------------------------------------------------------
# The invariants.

def ledger_violations(shards: list[dict], merchant_ids: Iterable[str] = ()) -> list[str]:
    """The cluster-wide invariants, from the databases (call after wait_for_quiescence)."""
    found = []
    for shard, row in query(shards, """
            SELECT sum(debits_posted_minor::numeric), sum(credits_posted_minor::numeric),
                   sum(debits_pending_minor::numeric), sum(credits_pending_minor::numeric) FROM accounts"""):
        if (row[0], row[2]) != (row[1], row[3]):
            found.append(f"{shard}: debits {row[0]}/{row[2]} (posted/pending) != credits {row[1]}/{row[3]}")
    totals: dict[str, int] = {}
    clearing: dict[str, int] = {}
    for _, (currency, owner, balance) in query(shards, """
            SELECT currency, owner_id = %s, sum(credits_posted_minor::numeric - debits_posted_minor::numeric)
            FROM accounts GROUP BY 1, 2""", [CLEARING_OWNER_ID]):
        totals[currency] = totals.get(currency, 0) + int(balance)
        if owner:
            clearing[currency] = clearing.get(currency, 0) + int(balance)
    found += [f"{currency} sums to {total} over all shards, not 0" for currency, total in totals.items() if total]
    for shard, row in query(shards, """
            SELECT account_id, kind, credits_posted_minor::numeric - debits_posted_minor::numeric, debits_pending_minor
            FROM accounts WHERE kind IN (1, 2)
              AND credits_posted_minor::numeric - debits_posted_minor::numeric - debits_pending_minor::numeric < 0"""):
        found.append(f"{shard}: {row[0]} (kind {row[1]}) below zero: balance {row[2]}, pending debits {row[3]}")
    unfinished = unfinished_coordinator_records(shards)
    found += [f"{shard}: coordinator record {transfer_id} not final" for shard, transfer_id in unfinished]
    pending = query(shards, "SELECT transfer_id, branch FROM transfers WHERE status = 1")
    found += [f"{shard}: transfer row {row[0]} (branch {row[1]}) still PENDING" for shard, row in pending]
    if not unfinished and not pending:
        found += [f"clearing accounts of {currency} net to {total} over all shards, not 0" for currency, total in clearing.items() if total]
    found += [f"collected money not swept: {text}" for text in stranded_collections(shards, merchant_ids)]
    found += [f"closed account {row[0]} holds {row[1]} (pending {row[2]}/{row[3]})" for _, row in query(shards, """
        SELECT account_id, credits_posted_minor::numeric - debits_posted_minor::numeric, debits_pending_minor, credits_pending_minor
        FROM accounts WHERE status = 5 AND (credits_posted_minor <> debits_posted_minor OR debits_pending_minor <> 0 OR credits_pending_minor <> 0)""")]
    found += [f"closed merchant {sub.parent_account_id}'s sub-account {sub.account_id} holds {sub.balance_minor}"
              for sub in stored_accounts(shards, """parent_account_id IS NOT NULL AND credits_posted_minor <> debits_posted_minor""").values()
              if sub.status == ACCOUNT_STATUS_CLOSED]
    found += [f"audit: {text}" for text in audit_cluster(shards).violations()]
    return found


def id_violations(shards: list[dict], transfer_ids: Iterable[str]) -> list[str]:
    """Every transfer id names at most one transfer, and its branch rows agree with its record."""
    ids = sorted(set(transfer_ids))
    found = []
    for transfer_id, records in records_by_id(shards, ids).items():
        places = {(r.shard, r.kind) for r in records}
        if len({r.shard for r in records}) > 1 or len(places) > 1:
            found.append(f"transfer id {transfer_id} names {len(places)} transfers: {records}")
    records = {r.fields.transfer_id: r for rs in records_by_id(shards, ids).values() for r in rs if r.kind == "tcc"}
    for shard, row in query(shards, """
            SELECT transfer_id, branch, debit_account_id, credit_account_id, amount_minor, status
            FROM transfers WHERE transfer_id = ANY(%s) AND branch IN (1, 2)""", [ids]):
        record = records.get(row[0])
        if record is None:
            found.append(f"{shard}: branch {row[1]} row of {row[0]} has no coordinator record")
        elif (row[2], row[3], row[4]) != (record.fields.debit_account_id, record.fields.credit_account_id, record.fields.amount_minor):
            found.append(f"{shard}: branch {row[1]} row of {row[0]} ({row[2]}->{row[3]} {row[4]}) differs from its record {record}")
        elif record.status == "POSTED" and row[5] != 2 or record.status in ("REJECTED", "VOIDED") and row[5] in (1, 2):
            found.append(f"{shard}: branch {row[1]} row of {row[0]} is {STATUS_NAMES[row[5]]} but its record {record.status}")
    return found


def model_violations(
    shards: list[dict], journal: Journal, account_ids: Iterable[str], merchant_ids: Iterable[str], all_ids_journaled: bool = True
) -> list[str]:
    """What the client was told against what the databases hold.

    `all_ids_journaled`: every transfer the accounts took part in went through the journal
    (besides sweeps), so a posting under any other id is unexplained."""
    found = list(journal.breaches)
    by_id = journal.by_id()
    records = records_by_id(shards, by_id)
    merchant_ids = set(merchant_ids)
    for transfer_id, answers in by_id.items():
        stored = records.get(transfer_id, [])
        for answer in answers:
            request = answer.request
            if answer.acknowledged_posted:
                if answer.returned != request:
                    found.append(f"{answer}: acknowledged a transfer with other fields: {answer.returned}")
                posted = [r for r in stored if r.status == "POSTED"]
                if len(posted) != 1 or posted[0].fields != request:
                    found.append(f"{answer}: acknowledged POSTED, but the databases hold {stored}")
            elif answer.code == grpc.StatusCode.FAILED_PRECONDITION and answer.reason in RECORDED_REFUSALS or answer.code == grpc.StatusCode.NOT_FOUND:
                if not any(r.fields == request and r.status == "REJECTED" and r.reason == answer.reason for r in stored):
                    found.append(f"{answer}: refused, but no REJECTED {answer.reason} record of it: {stored}")
            elif answer.code == grpc.StatusCode.ABORTED:
                if not any(r.fields == request and r.status == "VOIDED" for r in stored):
                    found.append(f"{answer}: VOIDED, but no VOIDED record of it: {stored}")
            elif answer.code == grpc.StatusCode.ALREADY_EXISTS:
                if not stored:
                    found.append(f"{answer}: ALREADY_EXISTS, but nothing is stored under the id")
                if answer.reason == "IDEMPOTENCY_CONFLICT" and any(r.fields == request for r in stored) and not any(
                    a.request == request and a.code != grpc.StatusCode.ALREADY_EXISTS and a.code not in (grpc.StatusCode.INVALID_ARGUMENT,)
                    for a in answers
                ):
                    found.append(f"{answer}: answered IDEMPOTENCY_CONFLICT, yet stored with exactly these fields: {stored}")
            elif answer.code == grpc.StatusCode.INVALID_ARGUMENT:
                recorded_elsewhere = any(a.request == request and a.code not in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED) for a in answers)
                if not recorded_elsewhere and any(r.fields == request for r in stored):
                    found.append(f"{answer}: malformed, yet recorded: {stored}")
    # Nothing was posted that the client was not told about (or could not know about).
    told = {a.request for a in journal.answers if a.acknowledged_posted or a.code in AMBIGUOUS_CODES}
    for record in posted_records_touching(shards, account_ids):
        f = record.fields
        if f.transfer_id in by_id:
            if f not in told:
                found.append(f"{record}: POSTED, but the client was never told so: {[str(a) for a in by_id[f.transfer_id]]}")
        elif all_ids_journaled and not (f.credit_account_id in merchant_ids and f.debit_account_id.startswith(SUB_ACCOUNT_PREFIX)):
            found.append(f"{record}: POSTED under an id the client never used, and not a sweep")
    return found


def get_transfer_violations(ledger, shards: list[dict], transfer_ids: Iterable[str]) -> list[str]:
    """GetTransfer answers the same twice, and what the databases hold."""
    found = []
    ids = sorted(set(transfer_ids))
    records = records_by_id(shards, ids)
    for transfer_id in ids:
        first, second = get_transfer(ledger, transfer_id), get_transfer(ledger, transfer_id)
        if first != second:
            found.append(f"GetTransfer {transfer_id} answered {first}, then {second}")
        stored = records.get(transfer_id, [])
        if not stored:
            if first != ("NOT_FOUND", "TRANSFER_NOT_FOUND"):
                found.append(f"GetTransfer {transfer_id} answered {first}, but nothing is stored under it")
        elif len(stored) == 1:
            record = stored[0]
            if first[:3] != ("OK", record.status, record.fields):
                found.append(f"GetTransfer {transfer_id} answered {first}, but the databases hold {record}")
    return found
