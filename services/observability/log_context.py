"""What a log line says about the call it belongs to.

The gRPC interceptor sets these for each call (from the call's metadata, or new ones);
the JSON log formatter adds them to every line logged while the call runs. Context
variables follow the call's asyncio task and the tasks it creates, and nothing else.
"""

from __future__ import annotations

import contextvars

# gRPC metadata keys: a caller's request id (kept when well-formed, else a new one) and
# W3C trace context (https://www.w3.org/TR/trace-context/), passed on to the calls we make.
REQUEST_ID_METADATA = "x-request-id"
TRACEPARENT_METADATA = "traceparent"

REQUEST_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)
TRANSFER_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("transfer_id", default=None)
TRACE_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("trace_id", default=None)
SPAN_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("span_id", default=None)

_FIELDS = (("request_id", REQUEST_ID), ("transfer_id", TRANSFER_ID), ("trace_id", TRACE_ID), ("span_id", SPAN_ID))


def fields() -> dict[str, str]:
    """The context of the current call, for a log line: only what is set."""
    found = {}
    for name, variable in _FIELDS:
        value = variable.get()
        if value is not None:
            found[name] = value
    return found


def outside_any_call() -> contextvars.Context:
    """A context without any call's fields, for a task that one call starts but that serves many
    (a group-commit worker): `asyncio.create_task(work(), context=outside_any_call())`. A task
    otherwise inherits its creator's context, and every line it logged would name that first call."""
    context = contextvars.copy_context()
    for _, variable in _FIELDS:
        context.run(variable.set, None)
    return context
