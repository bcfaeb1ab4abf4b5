"""The interceptor on a real in-process gRPC server: each call counted by the code its client
saw, an access line per call, the request id and trace context of the call.

The handlers are stand-ins that sleep, swallow their cancellation or fail on purpose: what is
tested is the interceptor around them (the real ledger is tested against the cluster in
tests/services/test_metrics_api.py).
"""

from __future__ import annotations

import asyncio
import logging

import grpc
import pytest
from prometheus_client import REGISTRY

from corebank.v1 import payments_pb2, payments_pb2_grpc, transfers_pb2
from services.api import metrics
from services.api.audit_trail import NO_AUDIT_TRAIL, AuditTrail
from services.api.interceptor import LedgerInterceptor, answered_errors
from services.audit_log.writer import AuditWriter
from services.auth import tokens
from services.auth.client import bearer_metadata
from services.ledger import errors
from services.ledger.access import Role
from services.observability import log_context

SERVICE = "corebank.v1.Payments"
METHOD = "GetTransfer"
# Long enough that the client always leaves first; short enough to keep the test fast.
HANDLER_SLEEP_SECONDS = 0.5
CLIENT_DEADLINE_SECONDS = 0.1
CLIENT_CANCEL_AFTER_SECONDS = 0.1
# Long enough for an answer sent when the wait for the audit log ends (ANSWER_MARGIN_SECONDS
# before the deadline) to reach the client first.
UNCONFIRMED_DEADLINE_SECONDS = 0.3
# Counting happens when the handler ends, after the client has left.
COUNTED_POLLS_MAX = 50
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_SPAN_ID = "00f067aa0ba902b7"


class StandInPayments(payments_pb2_grpc.PaymentsServicer):
    """GetTransfer behaves as the transfer id asks: sleep, sleep and swallow its cancellation
    (a handler that finishes after its client left), refuse, or answer at once."""

    def __init__(self) -> None:
        self.seen_context: dict[str, str | None] = {}

    async def GetTransfer(self, request, context):
        self.seen_context = {"request_id": log_context.REQUEST_ID.get(), "trace_id": log_context.TRACE_ID.get(),
                             "span_id": log_context.SPAN_ID.get(), "transfer_id": log_context.TRANSFER_ID.get()}
        if request.transfer_id == "slow":
            await asyncio.sleep(HANDLER_SLEEP_SECONDS)
        elif request.transfer_id == "stubborn":
            try:
                await asyncio.sleep(HANDLER_SLEEP_SECONDS)
            except asyncio.CancelledError:
                await asyncio.sleep(CLIENT_CANCEL_AFTER_SECONDS)  # goes on as if nothing happened
        elif request.transfer_id == "refused":
            raise errors.InsufficientFunds("no money")
        elif request.transfer_id == "late-refusal":
            # As the ledger does when the deadline passed before it started: a refusal for a client gone.
            try:
                await asyncio.sleep(HANDLER_SLEEP_SECONDS)
            except asyncio.CancelledError:
                await asyncio.sleep(CLIENT_CANCEL_AFTER_SECONDS)
            raise errors.DeadlineExceeded("the deadline passed before the request started")
        elif request.transfer_id == "hidden-cancel":
            # Swallows its cancellation and hides it from its task: only gRPC knows the call is over.
            try:
                await asyncio.sleep(HANDLER_SLEEP_SECONDS)
            except asyncio.CancelledError:
                asyncio.current_task().uncancel()
            raise errors.InsufficientFunds("no money")
        return transfers_pb2.Transfer(transfer_id=request.transfer_id)

    async def Transfer(self, request, context):
        """Posts at once, refuses ("refused"), or posts after its client left ("stubborn")."""
        if request.transfer_id == "refused":
            raise errors.InsufficientFunds("no money")
        if request.transfer_id == "stubborn":
            try:
                await asyncio.sleep(HANDLER_SLEEP_SECONDS)
            except asyncio.CancelledError:
                await asyncio.sleep(CLIENT_CANCEL_AFTER_SECONDS)
        return transfers_pb2.Transfer(transfer_id=request.transfer_id, status=transfers_pb2.POSTED)


def requests_counted(code: str) -> float:
    return REGISTRY.get_sample_value(
        "corebank_grpc_requests_total", {"service": SERVICE, "method": METHOD, "code": code}
    ) or 0.0


def errors_counted(code: str, reason: str) -> float:
    return REGISTRY.get_sample_value(
        "corebank_grpc_errors_total", {"service": SERVICE, "method": METHOD, "code": code, "reason": reason}
    ) or 0.0


async def wait_until_counted(code: str, before: float) -> None:
    for _ in range(COUNTED_POLLS_MAX):
        if requests_counted(code) > before:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"no call was counted as {code}")


@pytest.fixture
def serve(tmp_path):
    """serve(body): runs body(stub, servicer, token) against a server with the real interceptor."""
    token = tokens.mint(tmp_path, Role.CUSTOMER, "alice")

    def run(body, audit_trail: AuditTrail = NO_AUDIT_TRAIL) -> None:
        async def main() -> None:
            servicer = StandInPayments()
            server = grpc.aio.server(interceptors=[LedgerInterceptor(tokens.TokenVerifier(tmp_path), audit_trail=audit_trail)])
            payments_pb2_grpc.add_PaymentsServicer_to_server(servicer, server)
            port = server.add_insecure_port("127.0.0.1:0")
            await server.start()
            try:
                async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                    await body(payments_pb2_grpc.PaymentsStub(channel), servicer, bearer_metadata(token))
            finally:
                await server.stop(None)

        asyncio.run(main())

    return run


def test_a_call_whose_deadline_passed_is_counted_deadline_exceeded_not_ok(serve):
    async def body(stub, servicer, auth):
        before_ok, before = requests_counted("OK"), requests_counted("DEADLINE_EXCEEDED")
        for transfer_id in ("slow", "stubborn"):
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await stub.GetTransfer(
                    payments_pb2.GetTransferRequest(transfer_id=transfer_id), metadata=auth, timeout=CLIENT_DEADLINE_SECONDS
                )
            assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            await wait_until_counted("DEADLINE_EXCEEDED", before)
            before += 1
        assert requests_counted("OK") == before_ok

    serve(body)


def test_a_call_its_client_cancelled_is_counted_cancelled_even_when_the_handler_finishes(serve):
    async def body(stub, servicer, auth):
        before_ok, before = requests_counted("OK"), requests_counted("CANCELLED")
        before_errors = errors_counted("CANCELLED", "")
        for transfer_id in ("slow", "stubborn"):
            call = stub.GetTransfer(payments_pb2.GetTransferRequest(transfer_id=transfer_id), metadata=auth)
            await asyncio.sleep(CLIENT_CANCEL_AFTER_SECONDS)
            call.cancel()
            await wait_until_counted("CANCELLED", before)
            before += 1
        assert requests_counted("OK") == before_ok
        assert errors_counted("CANCELLED", "") == before_errors + 2

    serve(body)


def test_an_error_is_counted_by_code_and_reason_and_an_answer_by_ok(serve):
    async def body(stub, servicer, auth):
        before_ok, before_refused = requests_counted("OK"), errors_counted("FAILED_PRECONDITION", "INSUFFICIENT_FUNDS")
        await stub.GetTransfer(payments_pb2.GetTransferRequest(transfer_id="fast"), metadata=auth)
        with pytest.raises(grpc.aio.AioRpcError):
            await stub.GetTransfer(payments_pb2.GetTransferRequest(transfer_id="refused"), metadata=auth)
        assert requests_counted("OK") == before_ok + 1
        assert errors_counted("FAILED_PRECONDITION", "INSUFFICIENT_FUNDS") == before_refused + 1

    serve(body)


def test_the_callers_request_id_and_trace_are_kept_and_the_request_id_returned(serve, caplog):
    async def body(stub, servicer, auth):
        metadata = (*auth, ("x-request-id", "req-42"), ("traceparent", f"00-{TRACE_ID}-{PARENT_SPAN_ID}-01"))
        call = stub.GetTransfer(payments_pb2.GetTransferRequest(transfer_id="t-1"), metadata=metadata)
        await call
        assert (log_context.REQUEST_ID_METADATA, "req-42") in tuple(await call.trailing_metadata())
        assert servicer.seen_context["request_id"] == "req-42"
        assert servicer.seen_context["trace_id"] == TRACE_ID
        assert servicer.seen_context["span_id"] not in (None, PARENT_SPAN_ID)
        assert servicer.seen_context["transfer_id"] == "t-1"

    with caplog.at_level(logging.INFO, logger="corebank.access"):
        serve(body)
    (line,) = [record for record in caplog.records if record.name == "corebank.access"]
    assert (line.levelno, line.method, line.code, line.reason) == (logging.INFO, f"/{SERVICE}/{METHOD}", "OK", "")
    assert (line.request_id, line.parent_span_id, line.caller_role, line.caller_subject) == ("req-42", PARENT_SPAN_ID, "customer", "alice")
    assert line.duration_ms >= 0
    assert "Bearer" not in line.getMessage() and not any("Bearer" in str(value) for value in vars(line).values())


def test_a_hostile_request_id_is_replaced_and_an_error_answer_carries_the_new_one(serve):
    async def body(stub, servicer, auth):
        # (gRPC itself refuses control characters in metadata: these are what gets through.)
        for hostile in ("forged\" level=\"ERROR", "x" * 65, "<script>", ""):
            call = stub.GetTransfer(
                payments_pb2.GetTransferRequest(transfer_id="refused"),
                metadata=(*auth, ("x-request-id", hostile), ("traceparent", "00-zz-00-01")),
            )
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await call
            returned = dict(raised.value.trailing_metadata())[log_context.REQUEST_ID_METADATA]
            assert returned != hostile and returned == servicer.seen_context["request_id"]
            assert servicer.seen_context["trace_id"] != "zz"

    serve(body)


def test_a_client_deadline_is_never_logged_as_an_error(serve, caplog):
    async def body(stub, servicer, auth):
        with pytest.raises(grpc.aio.AioRpcError):
            await stub.GetTransfer(payments_pb2.GetTransferRequest(transfer_id="slow"), metadata=auth, timeout=CLIENT_DEADLINE_SECONDS)
        await asyncio.sleep(HANDLER_SLEEP_SECONDS)

    with caplog.at_level(logging.DEBUG):
        serve(body)
    assert [record.code for record in caplog.records if record.name == "corebank.access"] == ["DEADLINE_EXCEEDED"]
    assert not [record for record in caplog.records if record.levelno >= logging.ERROR]


def test_a_refusal_for_a_client_whose_deadline_passed_is_not_sent_nor_logged_as_an_error(serve, caplog):
    """grpc refuses to answer a call whose deadline passed: the interceptor must not try, nor log
    the refusal as its own failure and abort a second time ("Abort already called!")."""
    async def body(stub, servicer, auth):
        before = errors_counted("DEADLINE_EXCEEDED", "")
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await stub.GetTransfer(
                payments_pb2.GetTransferRequest(transfer_id="late-refusal"), metadata=auth, timeout=CLIENT_DEADLINE_SECONDS
            )
        assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        await wait_until_counted("DEADLINE_EXCEEDED", requests_counted("DEADLINE_EXCEEDED") - 1)
        for _ in range(COUNTED_POLLS_MAX):
            if errors_counted("DEADLINE_EXCEEDED", "") > before:
                break
            await asyncio.sleep(0.05)
        assert errors_counted("DEADLINE_EXCEEDED", "") == before + 1

    with caplog.at_level(logging.DEBUG):
        serve(body)
    assert [record.code for record in caplog.records if record.name == "corebank.access"] == ["DEADLINE_EXCEEDED"]
    assert [record.getMessage() for record in caplog.records if record.levelno >= logging.WARNING] == []


def test_a_refusal_grpc_can_no_longer_send_is_logged_at_info_once(serve, caplog):
    """The call ended inside gRPC, unseen by the handler's task (it hid its cancellation): the
    abort fails, and that is INFO, counted by the code the client saw, and never a second abort."""
    async def body(stub, servicer, auth):
        before = requests_counted("CANCELLED")
        call = stub.GetTransfer(payments_pb2.GetTransferRequest(transfer_id="hidden-cancel"), metadata=auth)
        await asyncio.sleep(CLIENT_CANCEL_AFTER_SECONDS)
        call.cancel()
        await wait_until_counted("CANCELLED", before)

    with caplog.at_level(logging.DEBUG):
        serve(body)
    assert [record.getMessage() for record in caplog.records if record.levelno >= logging.WARNING] == []
    (unsent,) = [record for record in caplog.records if record.name == "services.api.interceptor"]
    assert unsent.levelno == logging.INFO and "ended before its FAILED_PRECONDITION answer" in unsent.getMessage()


def unconfirmed_answers() -> float:
    return REGISTRY.get_sample_value("corebank_audit_log_unconfirmed_answers_total") or 0.0


def test_only_an_answer_telling_of_a_change_before_its_audit_entries_are_stored_is_unconfirmed(serve):
    """A refusal changed nothing, and a client gone got no answer: neither is an unconfirmed
    answer, however short its deadline (before, both were counted: any client could raise
    CorebankAuditLogUnconfirmedAnswers at will)."""
    # A log that stores nothing (its writer never started), as when its shards do not answer.
    stuck_log = AuditTrail(AuditWriter(store=None, process_name="grpc-test"))

    async def body(stub, servicer, auth):
        def transfer(transfer_id: str, timeout: float):
            return stub.Transfer(payments_pb2.TransferRequest(transfer_id=transfer_id), metadata=auth, timeout=timeout)

        before = unconfirmed_answers()
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await transfer("refused", UNCONFIRMED_DEADLINE_SECONDS)
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        with pytest.raises(grpc.aio.AioRpcError) as gone:
            await transfer("stubborn", CLIENT_DEADLINE_SECONDS)
        assert gone.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        await asyncio.sleep(HANDLER_SLEEP_SECONDS)  # the stubborn handler ends, its answer unsent
        assert unconfirmed_answers() == before
        assert (await transfer("posted", UNCONFIRMED_DEADLINE_SECONDS)).status == transfers_pb2.POSTED
        assert unconfirmed_answers() == before + 1

    serve(body, stuck_log)


def test_the_in_flight_gauges_read_the_calls_being_served_and_the_limit(serve):
    async def body(stub, servicer, auth):
        call = stub.GetTransfer(payments_pb2.GetTransferRequest(transfer_id="slow"), metadata=auth)
        await asyncio.sleep(CLIENT_CANCEL_AFTER_SECONDS)
        assert REGISTRY.get_sample_value("corebank_grpc_requests_in_flight") == 1
        await call
        assert REGISTRY.get_sample_value("corebank_grpc_requests_in_flight") == 0
        assert REGISTRY.get_sample_value("corebank_grpc_requests_in_flight_limit") > 0

    serve(body)


def test_answered_errors_give_each_reason_its_one_code():
    pairs = answered_errors()
    reasons = [reason for _, reason in pairs if reason]
    assert sorted(reasons) == sorted(errors.registered_reasons())
    assert ("FAILED_PRECONDITION", "INSUFFICIENT_FUNDS") in pairs and ("RESOURCE_EXHAUSTED", "OVERLOADED") in pairs
    assert ("CANCELLED", "") in pairs and ("DEADLINE_EXCEEDED", "") in pairs
    assert metrics.split_method("/corebank.v1.Payments/Transfer") == ("corebank.v1.Payments", "Transfer")
