"""The one place where domain errors become gRPC statuses, and where every call is measured."""

from __future__ import annotations

import asyncio
import logging
import time

import grpc
from google.protobuf import any_pb2, duration_pb2, message
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from services.api import identity, metrics
from services.api.audit_trail import NO_AUDIT_TRAIL, AuditTrail
from services.auth.client import AUTHORIZATION_METADATA
from services.auth.tokens import TokenVerifier
from services.ledger import authorization, errors

log = logging.getLogger(__name__)


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
        # Each metric child looked up once per method and status code (17 codes at most), not per call.
        latency = metrics.GRPC_LATENCY.labels(service, method)
        requests_by_code = {grpc.StatusCode.OK: metrics.GRPC_REQUESTS.labels(service, method, "OK")}

        async def measured(request, context):
            started = time.perf_counter()
            code = grpc.StatusCode.OK
            admitted = self._in_flight_calls < self._in_flight_calls_max
            if admitted:
                self._in_flight_calls += 1
            caller_token = None
            recorded = False
            try:
                if not admitted:
                    metrics.OVERLOADED.labels("process").inc()
                    raise errors.Overloaded(f"{self._in_flight_calls} calls in progress; retry with backoff")
                caller_token = identity.set_caller(self._verifier.verify(authorization_of(context)))
                if isinstance(request, _Undecodable):
                    raise errors.MalformedRequest(f"the request is not a valid {request.type_name}: {request.problem}")
                self._audit_trail.admit(full_method)
                response = await behaviour(request, context)
                # record() appends before its first await: once called, a cancellation cannot lose the entries.
                recorded = True
                await self._audit_trail.record(full_method, request, response, context)
                return response
            except asyncio.CancelledError:
                # The client went away (or its deadline passed); what it started may still move money.
                code = grpc.StatusCode.CANCELLED
                if not recorded and caller_token is not None:
                    self._audit_trail.record_cancelled(full_method, request)
                raise
            except errors.LedgerError as error:
                recorded = True
                await self._audit_trail.record(full_method, request, error, context)
                error = authorization.disclosed(identity.caller_or_none(), error)
                code = status_code_of(error)
                status = status_for(error)
                await context.abort(status.code, status.details, status.trailing_metadata)
            except grpc.aio.AbortError:
                code = context.code() or grpc.StatusCode.UNKNOWN
                raise
            except Exception as error:  # noqa: BLE001 (a bug: logged whole here, answered with a reason, no internals)
                log.exception("%s failed", full_method)
                fault = errors.InternalFault(f"{full_method} failed inside corebank ({type(error).__name__}); see the service log")
                await self._audit_trail.record(full_method, request, fault, context)
                code = status_code_of(fault)
                status = status_for(fault)
                await context.abort(status.code, status.details, status.trailing_metadata)
            finally:
                if caller_token is not None:
                    identity.reset_caller(caller_token)
                if admitted:
                    self._in_flight_calls -= 1
                latency.observe(time.perf_counter() - started)
                requests = requests_by_code.get(code)
                if requests is None:
                    requests = requests_by_code[code] = metrics.GRPC_REQUESTS.labels(service, method, code.name)
                requests.inc()

        async def guarded(request, context):
            """A failure of the error handling above (a bug in it) still gets a status with a reason
            and names nothing of it; grpc would send the exception's text as an UNKNOWN."""
            try:
                return await measured(request, context)
            except (grpc.aio.AbortError, asyncio.CancelledError):
                raise
            except Exception:  # noqa: BLE001 (logged whole, answered with a fixed INTERNAL)
                log.exception("%s: the interceptor's own error handling failed", full_method)
                status = status_for(errors.InternalFault(f"{full_method} failed inside corebank; see the service log"))
                await context.abort(status.code, status.details, status.trailing_metadata)

        return guarded
