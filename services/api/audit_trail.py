"""What the API writes to the audit log (services/audit_log): one entry per money movement or
privileged action, whatever its outcome, and one per refused attempt to read what is not the
caller's. The interceptor asks `admit` before a call and hands `record` its outcome (the
response message, or the LedgerError it answers with) before the answer is sent.

Logged, with the caller (subject, role), the time, the target and the outcome:
- Transfer, and each transfer of CreateTransfers: transfer id; debit and credit accounts,
  amount, currency; outcome POSTED, PENDING, VOIDED:<reason>, REJECTED:<reason>, or the
  error's <category>:<REASON> (refused:INSUFFICIENT_FUNDS, permission_denied:ROLE_NOT_ALLOWED,
  deadline:DEADLINE_EXCEEDED: an outcome unknown is logged too, since money may have moved).
- OpenAccount (every kind; SYSTEM accounts are the privileged ones), UpdateAccountStatus,
  CloseAccount: the account; the request's fields; OK or the error.
- GetAccount, GetTransfer, ListAccountTransfers: only when refused for lack of rights
  (PERMISSION_DENIED, an internal account named, or NOT_FOUND answered to a customer, which
  is what a customer naming another owner's account gets).
Not logged: calls refused before anything was done for load (OVERLOADED, RATE_LIMITED) or
without a valid token (UNAUTHENTICATED, which has no subject): a flood of those must not
fill the log, nor hold back the entries that matter; the metrics count them.
"""

from __future__ import annotations

import json
import logging

import grpc
from google.protobuf import message
from google.rpc import error_details_pb2

from corebank.v1 import accounts_pb2, payments_pb2, transfers_pb2
from services.api import identity
from services.audit_log import chain, metrics
from services.audit_log.chain import Event
from services.audit_log.writer import WRITE_WAIT_SECONDS_MAX, AuditWriter, now_us
from services.ledger import errors
from services.ledger.access import Caller, Role

log = logging.getLogger(__name__)

# A call answered by the service's own deadline margin (services/ledger_service.py) still
# needs a moment to send its answer: the wait for the log ends this much before the deadline.
ANSWER_MARGIN_SECONDS = 0.02

# Refusals that did nothing and say nothing of who may do what.
UNLOGGED_CATEGORIES = frozenset({errors.Category.OVERLOADED, errors.Category.RATE_LIMITED, errors.Category.UNAUTHENTICATED})
# A read refused for one of these is an attempt on what is not the caller's.
DENIED_READ_REASONS = frozenset({"INTERNAL_ACCOUNT"})

# A call without an authenticated caller (only while no interceptor sets one): logged as such.
UNAUTHENTICATED_SUBJECT, UNAUTHENTICATED_ROLE = "unauthenticated", "none"


def _method(service: str, method: str) -> str:
    descriptor = (accounts_pb2 if service == "Accounts" else payments_pb2).DESCRIPTOR.services_by_name[service]
    return f"/{descriptor.full_name}/{descriptor.methods_by_name[method].name}"


TRANSFER = _method("Payments", "Transfer")
CREATE_TRANSFERS = _method("Payments", "CreateTransfers")
GET_TRANSFER = _method("Payments", "GetTransfer")
OPEN_ACCOUNT = _method("Accounts", "OpenAccount")
GET_ACCOUNT = _method("Accounts", "GetAccount")
UPDATE_ACCOUNT_STATUS = _method("Accounts", "UpdateAccountStatus")
CLOSE_ACCOUNT = _method("Accounts", "CloseAccount")
LIST_ACCOUNT_TRANSFERS = _method("Accounts", "ListAccountTransfers")
# Calls that change something: refused with OVERLOADED, before anything is done, when the log is too far behind.
CHANGING_METHODS = frozenset({TRANSFER, CREATE_TRANSFERS, OPEN_ACCOUNT, UPDATE_ACCOUNT_STATUS, CLOSE_ACCOUNT})

Outcome = message.Message | errors.LedgerError


def _enum_name(enum_type, value: int) -> str:
    try:
        return enum_type.Name(value)
    except ValueError:  # proto3 enums are open: a client may send any number
        return str(value)


def error_outcome(error: errors.LedgerError) -> str:
    return f"{error.category.value}:{error.reason or type(error).__name__}"


_OUTCOME_BY_REASON: dict[str, str] = {}


def status_outcome(status) -> str:
    """The outcome of one refused transfer of CreateTransfers, from its google.rpc.Status."""
    info = error_details_pb2.ErrorInfo()
    reason = info.reason if status.details and status.details[0].Unpack(info) else ""
    outcome = _OUTCOME_BY_REASON.get(reason)
    if outcome is None:
        try:
            category = errors.error_class_for_reason(reason).category.value
        except KeyError:
            category = grpc.StatusCode.UNKNOWN.name.lower()
        outcome = _OUTCOME_BY_REASON[reason] = f"{category}:{reason or status.code}"
    return outcome


_TRANSFER_STATUS_NAMES = {value.number: value.name for value in transfers_pb2.TransferStatus.DESCRIPTOR.values}


def transfer_outcome(transfer: transfers_pb2.Transfer) -> str:
    status = _TRANSFER_STATUS_NAMES.get(transfer.status) or str(transfer.status)
    return f"{status}:{transfer.reason}" if transfer.reason else status


_json_string = json.encoder.encode_basestring_ascii  # in C; what detail_text's encoder does to a str


def _transfer_detail(request) -> str:
    """chain.detail_text of a transfer's fields, spelled out: the same text (keys sorted) at a
    third of the cost, since CreateTransfers makes one per transfer (tests hold them equal)."""
    text = (
        f'{{"amount_minor":{request.amount_minor:d},"credit_account_id":{_json_string(chain.clean_text(request.credit_account_id))},'
        f'"currency":{_json_string(chain.clean_text(request.currency))},'
        f'"debit_account_id":{_json_string(chain.clean_text(request.debit_account_id))}'
    )
    return text + (',"linked":true}' if request.linked else "}")


def transfer_events(caller: tuple[str, str], at_us: int, request, outcome: Outcome) -> list[Event]:
    subject, role = caller
    text = error_outcome(outcome) if isinstance(outcome, errors.LedgerError) else transfer_outcome(outcome)
    return [chain.event(at_us, subject, role, "transfer", request.transfer_id, _transfer_detail(request), text)]


def create_transfers_events(caller: tuple[str, str], at_us: int, request, outcome: Outcome) -> list[Event]:
    subject, role = caller
    transfers = request.transfers
    if isinstance(outcome, errors.LedgerError):
        text = error_outcome(outcome)
        if len(transfers) > CREATE_TRANSFERS_LOGGED_ONE_BY_ONE_MAX:
            # Refused whole for its size (BATCH_TOO_LARGE): nothing moved; one entry says so.
            return [chain.event(at_us, subject, role, "create_transfers", "", chain.detail_text({"transfers": len(transfers)}), text)]
        return [chain.event(at_us, subject, role, "transfer", t.transfer_id, _transfer_detail(t), text) for t in transfers]
    events = []
    for transfer, result in zip(transfers, outcome.results):
        # The message's own field, not HasField: a set oneof member is a non-default message.
        text = status_outcome(result.error) if result.HasField("error") else transfer_outcome(result.transfer)
        events.append(chain.event(at_us, subject, role, "transfer", transfer.transfer_id, _transfer_detail(transfer), text))
    return events


# CreateTransfers accepts at most this many (services/ledger_service.py); a larger call is
# refused whole, and is logged as one entry.
CREATE_TRANSFERS_LOGGED_ONE_BY_ONE_MAX = 5_000


# The outcome of an account call that did what it was asked.
ACCOUNT_CHANGED = "OK"


def _account_outcome(outcome: Outcome) -> str:
    return error_outcome(outcome) if isinstance(outcome, errors.LedgerError) else ACCOUNT_CHANGED


def open_account_events(caller: tuple[str, str], at_us: int, request, outcome: Outcome) -> list[Event]:
    subject, role = caller
    target = outcome.account_id if isinstance(outcome, accounts_pb2.Account) else ""
    detail = chain.detail_text({
        "request_id": chain.clean_text(request.request_id), "owner_id": chain.clean_text(request.owner_id),
        "kind": _enum_name(accounts_pb2.AccountKind, request.kind), "currency": chain.clean_text(request.currency),
        "tier": request.tier, "collect_on_every_shard": request.collect_on_every_shard,
    })
    return [chain.event(at_us, subject, role, "open_account", target, detail, _account_outcome(outcome))]


def update_account_status_events(caller: tuple[str, str], at_us: int, request, outcome: Outcome) -> list[Event]:
    subject, role = caller
    detail = chain.detail_text({"status": _enum_name(accounts_pb2.AccountStatus, request.status)})
    return [chain.event(at_us, subject, role, "update_account_status", request.account_id, detail, _account_outcome(outcome))]


def close_account_events(caller: tuple[str, str], at_us: int, request, outcome: Outcome) -> list[Event]:
    subject, role = caller
    return [chain.event(at_us, subject, role, "close_account", request.account_id, "", _account_outcome(outcome))]


def _denied_read(action: str, target_field: str):
    def events(caller: tuple[str, str], at_us: int, request, outcome: Outcome) -> list[Event]:
        if not isinstance(outcome, errors.LedgerError):
            return []
        subject, role = caller
        if not (
            outcome.category == errors.Category.PERMISSION_DENIED or outcome.reason in DENIED_READ_REASONS
            or (outcome.category == errors.Category.NOT_FOUND and role == Role.CUSTOMER.value)
        ):
            return []
        return [chain.event(at_us, subject, role, action, getattr(request, target_field), "", error_outcome(outcome))]

    return events


DESCRIBERS = {
    TRANSFER: transfer_events,
    CREATE_TRANSFERS: create_transfers_events,
    OPEN_ACCOUNT: open_account_events,
    UPDATE_ACCOUNT_STATUS: update_account_status_events,
    CLOSE_ACCOUNT: close_account_events,
    GET_ACCOUNT: _denied_read("get_account", "account_id"),
    GET_TRANSFER: _denied_read("get_transfer", "transfer_id"),
    LIST_ACCOUNT_TRANSFERS: _denied_read("list_account_transfers", "account_id"),
}


# Entries whose answer tells of a change: money posted or held, an account opened or changed.
CHANGED_OUTCOMES = frozenset({
    transfers_pb2.TransferStatus.Name(transfers_pb2.POSTED), transfers_pb2.TransferStatus.Name(transfers_pb2.PENDING), ACCOUNT_CHANGED,
})
# Errors after which money may have moved, though the answer cannot say (error_outcome's prefix).
UNKNOWN_OUTCOME_PREFIXES = tuple(
    f"{category.value}:" for category in (errors.Category.UNAVAILABLE, errors.Category.DEADLINE, errors.Category.INTERNAL)
)


def tells_of_a_change(events: list[Event]) -> bool:
    """Whether an answer about these entries tells of a change, or of an outcome that may be
    one: what an auditor must find in the log once the caller has it. Refusals, voided
    transfers and denied reads changed nothing."""
    return any(happened.outcome in CHANGED_OUTCOMES or happened.outcome.startswith(UNKNOWN_OUTCOME_PREFIXES) for happened in events)


def _caller() -> tuple[str, str]:
    try:
        caller: Caller = identity.current_caller()
    except LookupError:
        return UNAUTHENTICATED_SUBJECT, UNAUTHENTICATED_ROLE
    return caller.subject, caller.role.value


def events_for(full_method: str, caller: tuple[str, str], request, outcome: Outcome, at_us: int) -> list[Event]:
    """The audit log entries of one call: none for a method or outcome that is not logged."""
    describe = DESCRIBERS.get(full_method)
    if describe is None or not isinstance(request, message.Message):
        return []  # not logged, or a request that did not decode (nothing was done)
    if isinstance(outcome, errors.LedgerError) and outcome.category in UNLOGGED_CATEGORIES:
        return []
    return describe(caller, at_us, request, outcome)


class AuditTrail:
    """The interceptor's side of the audit log; with no writer, it logs nothing (unit tests of the API)."""

    def __init__(self, writer: AuditWriter | None) -> None:
        self.writer = writer

    def admit(self, full_method: str) -> None:
        """Refuse a call that changes something while the log is too far behind (fail closed)."""
        if self.writer is not None and full_method in CHANGING_METHODS and not self.writer.admits():
            metrics.REFUSED_CALLS.inc()
            raise errors.Overloaded(
                f"the audit log is {self.writer.backlog} entries behind; nothing was done, retry with backoff", queue="audit_log"
            )

    async def record(self, full_method: str, request, outcome: Outcome, context: grpc.aio.ServicerContext) -> bool:
        """Log the call's entries, and wait until they are stored or the call's deadline nears;
        then the call is answered with its real outcome either way (never raises). Whether that
        answer is unconfirmed: it tells of a change (tells_of_a_change) whose entries are not
        stored yet. The interceptor counts it once the answer is sent (count_unconfirmed_answer):
        a client gone meanwhile gets no answer at all."""
        if self.writer is None or full_method not in DESCRIBERS:
            return False
        try:
            events = events_for(full_method, _caller(), request, outcome, now_us())
        except Exception:  # noqa: BLE001 (a bug here must not turn a call's real outcome into an error)
            log.exception("%s: its audit log entries could not be made", full_method)
            return False
        if not events:
            return False
        stored = self.writer.append(events)
        time_remaining = context.time_remaining()
        wait_seconds = WRITE_WAIT_SECONDS_MAX if time_remaining is None else min(WRITE_WAIT_SECONDS_MAX, time_remaining - ANSWER_MARGIN_SECONDS)
        return not await self.writer.written(stored, wait_seconds) and tells_of_a_change(events)

    @staticmethod
    def count_unconfirmed_answer() -> None:
        """An answer that `record` called unconfirmed went to its caller."""
        metrics.UNCONFIRMED_ANSWERS.inc()

    def record_cancelled(self, full_method: str, request) -> None:
        """A call its client cancelled (or whose gRPC deadline passed) before it was answered: its
        work goes on (a queued transfer is still applied), so it is logged with an unknown outcome.
        Synchronous: nothing may be awaited inside a cancellation."""
        if self.writer is None or full_method not in DESCRIBERS:
            return
        try:
            events = events_for(full_method, _caller(), request, CANCELLED_BY_CALLER, now_us())
        except Exception:  # noqa: BLE001 (as in record)
            log.exception("%s: its audit log entries could not be made", full_method)
            return
        if events:
            self.writer.append(events)


# The outcome logged for a cancelled call: unknown to the call, final in the ledger.
CANCELLED_BY_CALLER = errors.DeadlineExceeded("the caller cancelled the call before its answer; the outcome is in the ledger")

NO_AUDIT_TRAIL = AuditTrail(None)
