"""The one place where domain errors become gRPC statuses, and where every call is measured."""

from __future__ import annotations

import logging
import time

import grpc
from google.protobuf import any_pb2, message
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from services.api import metrics
from services.ledger import errors

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
}


def status_code_of(error: errors.LedgerError) -> grpc.StatusCode:
    return STATUS_CODE_BY_CATEGORY[error.category]


def status_message(error: errors.LedgerError) -> status_pb2.Status:
    """The google.rpc.Status of a domain error: the call's status, or one result of CreateTransfers."""
    info = error_details_pb2.ErrorInfo(reason=error.reason, domain=errors.ERROR_DOMAIN, metadata=error.metadata)
    detail = any_pb2.Any()
    detail.Pack(info)
    return status_pb2.Status(code=status_code_of(error).value[0], message=error.message, details=[detail])


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


class LedgerInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, in_flight_calls_max: int = IN_FLIGHT_CALLS_MAX) -> None:
        # Wrapped handlers are built once per method, not once per call.
        self._wrapped: dict[str, grpc.RpcMethodHandler] = {}
        self._in_flight_calls = 0
        self._in_flight_calls_max = in_flight_calls_max

    async def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        if method in self._wrapped:
            return self._wrapped[method]
        handler = await continuation(handler_call_details)
        if handler is None or handler.unary_unary is None:
            return handler  # health Watch and reflection streams pass through untouched
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
            try:
                if not admitted:
                    metrics.OVERLOADED.labels("process").inc()
                    raise errors.Overloaded(f"{self._in_flight_calls} calls in progress; retry with backoff")
                if isinstance(request, _Undecodable):
                    raise errors.MalformedRequest(f"the request is not a valid {request.type_name}: {request.problem}")
                return await behaviour(request, context)
            except errors.LedgerError as error:
                code = status_code_of(error)
                status = status_for(error)
                await context.abort(status.code, status.details, status.trailing_metadata)
            except grpc.aio.AbortError:
                code = context.code() or grpc.StatusCode.UNKNOWN
                raise
            except Exception as error:  # noqa: BLE001 (a bug: logged whole here, answered with a reason, no internals)
                log.exception("%s failed", full_method)
                fault = errors.InternalFault(f"{full_method} failed inside corebank ({type(error).__name__}); see the service log")
                code = status_code_of(fault)
                status = status_for(fault)
                await context.abort(status.code, status.details, status.trailing_metadata)
            finally:
                if admitted:
                    self._in_flight_calls -= 1
                latency.observe(time.perf_counter() - started)
                requests = requests_by_code.get(code)
                if requests is None:
                    requests = requests_by_code[code] = metrics.GRPC_REQUESTS.labels(service, method, code.name)
                requests.inc()

        return measured
