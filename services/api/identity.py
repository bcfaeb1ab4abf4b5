"""The caller of the call being served, set by the interceptor once its token is verified."""

from __future__ import annotations

import contextvars

from services.ledger.access import Caller

_CALLER: contextvars.ContextVar[Caller] = contextvars.ContextVar("corebank_caller")


def current_caller() -> Caller:
    """The authenticated caller of this call (LookupError outside a call: a bug)."""
    return _CALLER.get()


def caller_or_none() -> Caller | None:
    """The caller, or None before its token was verified."""
    return _CALLER.get(None)


def set_caller(caller: Caller) -> contextvars.Token:
    return _CALLER.set(caller)


def reset_caller(token: contextvars.Token) -> None:
    _CALLER.reset(token)
