"""Which call a log line belongs to: a caller's request id and W3C trace context, checked.

Pure functions: the gRPC interceptor reads the call's metadata with them and sets
log_context's variables. A value a caller sends is kept only when it is well-formed
(bounded length, a safe character set), so no caller can put a newline, a quote or a
megabyte into a log line; anything else is replaced by a new id.
"""

from __future__ import annotations

import dataclasses
import re
import secrets

# A caller's request id: what most gateways send (UUIDs, ULIDs, hex) fits.
REQUEST_ID_LENGTH_MAX = 64
_SAFE_ID = re.compile(r"[A-Za-z0-9._:\-]+")

# https://www.w3.org/TR/trace-context/#traceparent-header: version-trace_id-parent_id-flags,
# lowercase hex. Version ff is invalid; a later version may add fields after these four.
TRACEPARENT_LENGTH_MAX = 512
_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?")
TRACE_ID_HEX_DIGITS = 32
SPAN_ID_HEX_DIGITS = 16
SAMPLED_FLAG = 0x01


def safe_id(value: str | None, length_max: int = REQUEST_ID_LENGTH_MAX) -> str | None:
    """The value when it is a short id of safe characters, else None."""
    if value and len(value) <= length_max and _SAFE_ID.fullmatch(value):
        return value
    return None


def request_id(value: str | None) -> str:
    """The caller's request id when well-formed, else a new one."""
    return safe_id(value) or secrets.token_hex(16)


@dataclasses.dataclass(frozen=True)
class TraceContext:
    """This call's place in a trace: the trace, this call's own span, and the caller's span if any."""

    trace_id: str
    span_id: str
    parent_span_id: str | None = None
    sampled: bool = False

    def traceparent(self) -> str:
        """The header a call made on behalf of this one sends (its parent is this call's span)."""
        return f"00-{self.trace_id}-{self.span_id}-{SAMPLED_FLAG if self.sampled else 0:02x}"


def new_span_id() -> str:
    return secrets.token_hex(SPAN_ID_HEX_DIGITS // 2)


def trace_context(traceparent: str | None) -> TraceContext:
    """A new span in the caller's trace when its traceparent is valid, else in a new trace."""
    parent = parse_traceparent(traceparent)
    if parent is None:
        return TraceContext(secrets.token_hex(TRACE_ID_HEX_DIGITS // 2), new_span_id())
    trace_id, parent_span_id, sampled = parent
    return TraceContext(trace_id, new_span_id(), parent_span_id, sampled)


def parse_traceparent(value: str | None) -> tuple[str, str, bool] | None:
    """(trace id, parent span id, sampled) of a valid traceparent, else None."""
    if not value or len(value) > TRACEPARENT_LENGTH_MAX:
        return None
    found = _TRACEPARENT.fullmatch(value)
    if found is None:
        return None
    version, trace_id, parent_span_id, flags, rest = found.groups()
    if version == "ff" or (version == "00" and rest is not None):
        return None
    if trace_id == "0" * TRACE_ID_HEX_DIGITS or parent_span_id == "0" * SPAN_ID_HEX_DIGITS:
        return None
    return trace_id, parent_span_id, bool(int(flags, 16) & SAMPLED_FLAG)
