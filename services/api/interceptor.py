"""The one place where domain errors become gRPC statuses, and where every call is measured."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import NoReturn

import grpc
from google.protobuf import any_pb2, duration_pb2, message
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from services.api import identity, metrics
from services.api.audit_trail import NO_AUDIT_TRAIL, AuditTrail
from services.auth.client import AUTHORIZATION_METADATA
from services.auth.tokens import TokenVerifier
from services.ledger import authorization, errors
from services.observability import log_context, trace_context

log = logging.getLogger(__name__)
# One line per corebank.v1 call, at INFO (WARNING for corebank's own faults): its fields are
# passed as `extra`, the log context (request, trace, transfer) is added by the formatter.
access_log = logging.getLogger("corebank.access")


# The one place where an error's category becomes a gRPC status code.
STATUS_CODE_BY_CATEGORY: dict[errors.Category, grpc.StatusCode] = {
    errors.Category.INVALID_ARGUMENT: grpc.StatusCode.INVALID_ARGUMENT,
    errors.Category.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    errors.Category.ALREADY_EXISTS: grpc.StatusCode.ALREADY_EXISTS,
    errors.Category.REFUSED: grpc.StatusCode.FAILED_PRECONDITION,
    errors.Category.OVERLOADED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.Category.VOIDED: grpc.StatusCode.ABORTED,
    errors.Category.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    errors.Category.DEADLINE: grpc.StatusCode.DEADLINE_EXCEEDED,
    errors.Category.INTERNAL: grpc.StatusCode.INTERNAL,
    errors.Category.UNAUTHENTICATED: grpc.StatusCode.UNAUTHENTICATED,
    errors.Category.PERMISSION_DENIED: grpc.StatusCode.PERMISSION_DENIED,
    errors.Category.RATE_LIMITED: grpc.StatusCode.RESOURCE_EXHAUSTED,
}


def status_code_of(error: errors.LedgerError) -> grpc.StatusCode:
    return STATUS_CODE_BY_CATEGORY[error.category]


def status_message(error: errors.LedgerError) -> status_pb2.Status:
    """The google.rpc.Status of a domain error: the call's status, or one result of CreateTransfers."""
    info = error_details_pb2.ErrorInfo(reason=error.reason, domain=errors.ERROR_DOMAIN, metadata=error.metadata)
    detail = any_pb2.Any()
    detail.Pack(info)
    details = [detail]
    if isinstance(error, errors.RateLimited):
        retry = any_pb2.Any()
        retry_delay = duration_pb2.Duration()
        retry_delay.FromMilliseconds(int(error.metadata["retry_after_ms"]))
        retry.Pack(error_details_pb2.RetryInfo(retry_delay=retry_delay))
        details.append(retry)
    return status_pb2.Status(code=status_code_of(error).value[0], message=error.message, details=details)


def status_for(error: errors.LedgerError) -> grpc.Status:
    return rpc_status.to_status(status_message(error))


# The codes of a call whose client left before its answer: whatever the handler did, the
# client saw one of these, and so do the metrics and the access log.
CLIENT_GONE_CODES = (grpc.StatusCode.CANCELLED, grpc.StatusCode.DEADLINE_EXCEEDED)


def answered_errors() -> list[tuple[str, str]]:
    """(code, reason) of every error a corebank.v1 call can end with: each ErrorReason with its
    code, and the codes of a client gone away (its deadline passed, or it cancelled), reason ''."""
    found = [
        (STATUS_CODE_BY_CATEGORY[errors.error_class_for_reason(reason).category].name, reason)
        for reason in sorted(errors.registered_reasons())
    ]
    return found + [(code.name, "") for code in CLIENT_GONE_CODES]


# Codes that mean corebank itself failed: their access line is a WARNING (the fault itself
# was logged whole where it happened). Everything else, a client's deadline included, is INFO.
SERVER_FAULT_CODES = frozenset({grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN})


# The client's clock for its deadline starts before ours (we start it when the call's headers
# arrive), so its deadline passes first and its cancellation reaches us up to a transit time
# before our own deadline. A client leaving this close to the deadline left because of it.
CLIENT_DEADLINE_SKEW_SECONDS = 0.05


def client_gone_code(context: grpc.aio.ServicerContext) -> grpc.StatusCode:
    """DEADLINE_EXCEEDED when the call's deadline has passed (give or take the skew), else
    CANCELLED: the client cancelled, or went away."""
    remaining = context.time_remaining()
    if remaining is not None and remaining <= CLIENT_DEADLINE_SKEW_SECONDS:
        return grpc.StatusCode.DEADLINE_EXCEEDED
    return grpc.StatusCode.CANCELLED


def client_gone(context: grpc.aio.ServicerContext, task: asyncio.Task) -> bool:
    """Whether the client left before the answer: gRPC cancelled the call's task (a cancelled
    client, a passed deadline), even if the handler swallowed the cancellation and returned,
    or the deadline passed while the handler was still at work."""
    remaining = context.time_remaining()
    return task.cancelling() > 0 or (remaining is not None and remaining <= 0)


class ErrorAnswer:
    """A call's error status, sent at most once and never to a client that already left.

    grpc refuses a second abort (UsageError), and a call that has ended (its deadline passed,
    its client cancelled) refuses any status (ExecuteBatchError): either failure, logged whole
    as a bug and answered again, turned a client's own short deadline into ERROR tracebacks.
    A call that cannot be answered ends as grpc ends a call whose client left: CancelledError."""

    def __init__(self, full_method: str, context: grpc.aio.ServicerContext, task: asyncio.Task) -> None:
        self._full_method = full_method
        self._context = context
        self._task = task
        self.attempted = False
        # The call ended without any status of ours: its client saw it go (client_gone_code).
        self.unsent = False

    async def abort(self, status: grpc.Status, metadata: tuple = ()) -> NoReturn:
        if self.attempted:
            raise asyncio.CancelledError  # the call has its answer, or none can be sent
        if client_gone(self._context, self._task):
            self.unsent = True
            raise asyncio.CancelledError
        self.attempted = True
        try:
            await self._context.abort(status.code, status.details, status.trailing_metadata + metadata)
        except grpc.aio.InternalError as error:
            # The call ended inside gRPC before the answer (unseen by this task): nobody is left to tell.
            self.unsent = True
            log.info("%s: the call ended before its %s answer could be sent (%s)", self._full_method, status.code.name, type(error).__name__)
            raise asyncio.CancelledError from error


def metadata_value(context: grpc.aio.ServicerContext, key: str) -> str | None:
    """The call's first value of a metadata key, or None."""
    for found_key, value in context.invocation_metadata() or ():
        if found_key == key:
            return value if isinstance(value, str) else None
    return None


# Calls in progress in one process past which new ones are refused at once with
# OVERLOADED. By Little's law, in flight = throughput x latency: a worker posts a few
# hundred transfers a second, so this keeps a caller's wait under about a second at
# any peak instead of letting it grow with the crowd.
IN_FLIGHT_CALLS_MAX = 256


class _Undecodable:
    """Stands in for a request whose bytes did not decode, so the handler can answer it with a reason
    (grpc would answer a failing deserializer with a bare UNKNOWN)."""

    def __init__(self, type_name: str, problem: str) -> None:
        self.type_name = type_name
        self.problem = problem


def _tolerant(deserializer):
    type_name = getattr(getattr(deserializer, "__self__", None), "DESCRIPTOR", None)
    type_name = type_name.full_name if type_name is not None else "message"

    def deserialize(raw: bytes):
        try:
            return deserializer(raw)
        except message.DecodeError as error:
            return _Undecodable(type_name, str(error)[:200])

    return deserialize


# The corebank.v1 services: every call to them is authenticated, measured and translated here.
CALLS_NEEDING_A_TOKEN_PREFIX = "/corebank.v1."


def authorization_of(context: grpc.aio.ServicerContext) -> str | None:
    """The call's one `authorization` value, or None. Two are refused: which identity acts must
    not depend on their order (a gateway appending its token after a client's)."""
    values = [value for key, value in context.invocation_metadata() or () if key == AUTHORIZATION_METADATA]
    if len(values) > 1:
        raise errors.TokenInvalid("the call carries more than one authorization metadata; send one")
    return values[0] if values else None


class LedgerInterceptor(grpc.aio.ServerInterceptor):
    """Every corebank.v1 call: admitted (or OVERLOADED), authenticated by its bearer token (or
    UNAUTHENTICATED, before its request is even looked at), measured, and its domain errors
    turned into statuses. The caller is handed on through services.api.identity."""

    def __init__(
        self, verifier: TokenVerifier, in_flight_calls_max: int = IN_FLIGHT_CALLS_MAX, *, audit_trail: AuditTrail = NO_AUDIT_TRAIL,
    ) -> None:
        self._verifier = verifier
        # Money movements and privileged actions go to the audit log before their answer (services/api/audit_trail.py).
        self._audit_trail = audit_trail
        # Wrapped handlers are built once per method, not once per call.
        self._wrapped: dict[str, grpc.RpcMethodHandler] = {}
        self._in_flight_calls = 0
        self._in_flight_calls_max = in_flight_calls_max
        metrics.GRPC_IN_FLIGHT.set_function(lambda: self._in_flight_calls)
        metrics.GRPC_IN_FLIGHT_LIMIT.set(in_flight_calls_max)

    async def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        if method in self._wrapped:
            return self._wrapped[method]
        handler = await continuation(handler_call_details)
        if handler is None or not method.startswith(CALLS_NEEDING_A_TOKEN_PREFIX):
            # Health checks (mTLS only, so probes need no token) and reflection streams pass through untouched.
            return handler
        if handler.unary_unary is None:
            # A streaming corebank.v1 method would pass unauthenticated: none exists, and one added
            # without its own wrapping here answers UNIMPLEMENTED instead of failing open.
            log.error("%s is not unary: refused until the interceptor authenticates its kind of call", method)
            return None
        wrapped = grpc.unary_unary_rpc_method_handler(
            self._wrap(method, handler.unary_unary),
            request_deserializer=_tolerant(handler.request_deserializer),
            response_serializer=handler.response_serializer,
        )
        self._wrapped[method] = wrapped
        return wrapped

    def _wrap(self, full_method: str, behaviour):
        service, method = metrics.split_method(full_method)
        # Each metric child looked up once per method and status code (17 codes at most), or code
        # and reason (one per ErrorReason), not per call.
        latency = metrics.GRPC_LATENCY.labels(service, method)
        requests_by_code = {grpc.StatusCode.OK: metrics.GRPC_REQUESTS.labels(service, method, "OK")}
        errors_by_code_and_reason: dict[tuple[grpc.StatusCode, str], object] = {}

        async def measured(request, context, answer: ErrorAnswer, task: asyncio.Task):
            started = time.perf_counter()
            request_id = trace_context.request_id(metadata_value(context, log_context.REQUEST_ID_METADATA))
            trace = trace_context.trace_context(metadata_value(context, log_context.TRACEPARENT_METADATA))
            context_tokens = (
                log_context.REQUEST_ID.set(request_id),
                log_context.TRACE_ID.set(trace.trace_id),
                log_context.SPAN_ID.set(trace.span_id),
                log_context.TRANSFER_ID.set(trace_context.safe_id(getattr(request, "transfer_id", None))),
            )
            # The caller's handle on this call in our logs: sent back with every answer.
            answer_metadata = ((log_context.REQUEST_ID_METADATA, request_id),)
            context.set_trailing_metadata(answer_metadata)
            code = grpc.StatusCode.OK
            reason = ""
            caller = None
            admitted = self._in_flight_calls < self._in_flight_calls_max
            if admitted:
                self._in_flight_calls += 1
            caller_token = None
            recorded = False
            # The answer tells of a change whose audit log entries are not stored yet.
            unconfirmed = False
            try:
                if not admitted:
                    metrics.record_overload(metrics.OVERLOAD_IN_FLIGHT_LIMIT)
                    raise errors.Overloaded(f"{self._in_flight_calls} calls in progress; retry with backoff")
                caller = self._verifier.verify(authorization_of(context))
                caller_token = identity.set_caller(caller)
                if isinstance(request, _Undecodable):
                    raise errors.MalformedRequest(f"the request is not a valid {request.type_name}: {request.problem}")
                self._audit_trail.admit(full_method)
                response = await behaviour(request, context)
                # record() appends before its first await: once called, a cancellation cannot lose the entries.
                recorded = True
                unconfirmed = await self._audit_trail.record(full_method, request, response, context)
                return response
            except asyncio.CancelledError:
                # The client went away (or its deadline passed); what it started may still move money.
                code = grpc.StatusCode.CANCELLED
                if not recorded and caller_token is not None:
                    self._audit_trail.record_cancelled(full_method, request)
                raise
            except errors.LedgerError as error:
                recorded = True
                unconfirmed = await self._audit_trail.record(full_method, request, error, context)
                error = authorization.disclosed(identity.caller_or_none(), error)
                code, reason = status_code_of(error), error.reason
                if isinstance(error, errors.RateLimited) and caller is not None:
                    metrics.record_rate_limited(error, caller.role)
                await answer.abort(status_for(error), answer_metadata)
            except grpc.aio.AbortError:
                code = context.code() or grpc.StatusCode.UNKNOWN
                raise
            except Exception as error:  # noqa: BLE001 (a bug: logged whole here, answered with a reason, no internals)
                log.exception("%s failed", full_method)
                fault = errors.InternalFault(f"{full_method} failed inside corebank ({type(error).__name__}); see the service log")
                unconfirmed = await self._audit_trail.record(full_method, request, fault, context)
                code, reason = status_code_of(fault), fault.reason
                await answer.abort(status_for(fault), answer_metadata)
            finally:
                if caller_token is not None:
                    identity.reset_caller(caller_token)
                if admitted:
                    self._in_flight_calls -= 1
                if answer.unsent or client_gone(context, task):
                    # What the client saw, whatever the handler answered after it left.
                    code, reason = client_gone_code(context), ""
                elif unconfirmed:
                    self._audit_trail.count_unconfirmed_answer()
                duration_seconds = time.perf_counter() - started
                latency.observe(duration_seconds)
                requests = requests_by_code.get(code)
                if requests is None:
                    requests = requests_by_code[code] = metrics.GRPC_REQUESTS.labels(service, method, code.name)
                requests.inc()
                if code is not grpc.StatusCode.OK:
                    failures = errors_by_code_and_reason.get((code, reason))
                    if failures is None:
                        failures = errors_by_code_and_reason[code, reason] = metrics.GRPC_ERRORS.labels(
                            service, method, code.name, reason
                        )
                    failures.inc()
                _log_access(full_method, code, reason, duration_seconds, caller, request_id, trace)
                for variable, token in zip(_CALL_CONTEXT_VARIABLES, context_tokens):
                    variable.reset(token)

        async def guarded(request, context):
            """A failure of the error handling above (a bug in it) still gets a status with a reason
            and names nothing of it; grpc would send the exception's text as an UNKNOWN. Unless
            the call was answered already, or has ended: then there is no one to answer."""
            task = asyncio.current_task()
            answer = ErrorAnswer(full_method, context, task)
            try:
                return await measured(request, context, answer, task)
            except (grpc.aio.AbortError, asyncio.CancelledError):
                raise
            except Exception:  # noqa: BLE001 (logged whole, answered with a fixed INTERNAL)
                log.exception("%s: the interceptor's own error handling failed", full_method)
                await answer.abort(status_for(errors.InternalFault(f"{full_method} failed inside corebank; see the service log")))

        return guarded


_CALL_CONTEXT_VARIABLES = (log_context.REQUEST_ID, log_context.TRACE_ID, log_context.SPAN_ID, log_context.TRANSFER_ID)


def _log_access(
    full_method: str, code: grpc.StatusCode, reason: str, duration_seconds: float, caller,
    request_id: str, trace: trace_context.TraceContext,
) -> None:
    """The call's access line: who (role and subject, never the token), what, how it ended, how long."""
    level = logging.WARNING if code in SERVER_FAULT_CODES else logging.INFO
    if not access_log.isEnabledFor(level):
        return
    duration_ms = round(duration_seconds * 1000, 3)
    access_log.log(
        level, "%s %s%s %.1f ms", full_method, code.name, f" {reason}" if reason else "", duration_ms,
        extra={
            "method": full_method, "code": code.name, "reason": reason, "duration_ms": duration_ms,
            "caller_role": caller.role.value if caller is not None else "", "caller_subject": caller.subject if caller is not None else "",
            "request_id": request_id, "parent_span_id": trace.parent_span_id or "",
        },
    )
