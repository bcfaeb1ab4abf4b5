"""A process's log: one JSON object per line, in a file the process rotates itself.

    logs.configure("grpc-0", pathlib.Path(".corebank/logs/grpc-0.log"))

Every line has `time` (RFC 3339, UTC, milliseconds), `level`, `logger`, `process` (the
process's name in the cluster), `pid` and `message`; the context of the call it was logged
in (services/observability/log_context.py: request_id, transfer_id, trace_id, span_id, when
set); the fields the caller passed as `extra` (method, code, reason, duration_ms, ...); and
`exception`, the traceback as text, when there is one. JSON escapes every newline, so no
caller's text (an id, a database message) can forge or split a line.

The file rotates at LOG_BYTES_MAX into at most LOG_BACKUPS_MAX older files (NAME.log.1 is
the newest of them), so a process's logs never take more than (1 + LOG_BACKUPS_MAX) *
LOG_BYTES_MAX of disk. What Python cannot log (a crash before configure(), a fault of the
interpreter, messages the gRPC C core writes itself) stays on standard error, which
deploy/ sends to NAME.stderr.log.
"""

from __future__ import annotations

import faulthandler
import json
import logging
import logging.handlers
import pathlib
import sys
import threading
import time

from services.observability import log_context

# 50 MB x (1 + 5): at ~500 bytes a line, about the last 600 000 lines of each process.
LOG_BYTES_MAX = 50 * 1024 * 1024
LOG_BACKUPS_MAX = 5
# A message or traceback longer than this is cut (with a mark): one line stays readable
# and one careless caller cannot fill a file by itself.
FIELD_CHARS_MAX = 64 * 1024
TRUNCATED_MARK = "...[truncated]"

# Attributes every LogRecord has: whatever else a record carries came from `extra`.
_RECORD_ATTRIBUTES = frozenset(vars(logging.LogRecord("", logging.INFO, "", 0, "", None, None))) | {"message", "asctime", "taskName"}
# The fields of every line; an `extra` field of the same name is kept under "extra_<name>".
_LINE_FIELDS = ("time", "level", "logger", "process", "pid", "message", "exception", "stack")


def rfc3339_utc(seconds: float) -> str:
    """2026-11-23T11:25:38.616Z: a Unix time in UTC, to the millisecond."""
    whole = int(seconds)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)) + f".{int((seconds - whole) * 1000):03d}Z"


def _bounded(text: str) -> str:
    return text if len(text) <= FIELD_CHARS_MAX else text[:FIELD_CHARS_MAX] + TRUNCATED_MARK


class JsonFormatter(logging.Formatter):
    """One JSON object per record (see the module's docstring)."""

    def __init__(self, process_name: str) -> None:
        super().__init__()
        self.process_name = process_name

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, object] = {
            "time": rfc3339_utc(record.created),
            "level": record.levelname,
            "logger": record.name,
            "process": self.process_name,
            "pid": record.process,
            "message": _bounded(record.getMessage()),
        }
        # Formatted in the thread and task that logged (logging's handlers are synchronous),
        # so the context is the logging call's own.
        line.update(log_context.fields())
        for name, value in vars(record).items():
            if name not in _RECORD_ATTRIBUTES:
                line[f"extra_{name}" if name in _LINE_FIELDS else name] = value
        if record.exc_info:
            line["exception"] = _bounded(self.formatException(record.exc_info))
        elif record.exc_text:
            line["exception"] = _bounded(record.exc_text)
        if record.stack_info:
            line["stack"] = _bounded(self.formatStack(record.stack_info))
        return _json_line(line)


def _json_line(line: dict[str, object]) -> str:
    """The line as JSON; a value JSON cannot hold (an enum, a Decimal, a dict with other keys than
    strings, NaN) is written as its text, so that no caller's `extra` loses the line. ASCII only:
    a string that is not valid Unicode (a lone surrogate) cannot break the file's encoding."""
    try:
        return json.dumps(line, default=str, allow_nan=False)
    except (TypeError, ValueError):
        return json.dumps({name: _json_value(value) for name, value in line.items()}, default=str, allow_nan=False)


def _json_value(value: object) -> object:
    try:
        json.dumps(value, default=str, allow_nan=False)
    except (TypeError, ValueError):
        return str(value)
    return value


def log_handler(process_name: str, log_path: pathlib.Path | None, bytes_max: int = LOG_BYTES_MAX,
                backups_max: int = LOG_BACKUPS_MAX) -> logging.Handler:
    """JSON lines into `log_path`, rotated by size; to standard error when there is no path."""
    if log_path is None:
        handler: logging.Handler = logging.StreamHandler(sys.stderr)
    else:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.handlers.RotatingFileHandler(log_path, maxBytes=bytes_max, backupCount=backups_max, encoding="utf-8")
    handler.setFormatter(JsonFormatter(process_name))
    return handler


def configure(
    process_name: str, log_path: pathlib.Path | None = None, level: int = logging.INFO,
    bytes_max: int = LOG_BYTES_MAX, backups_max: int = LOG_BACKUPS_MAX,
) -> logging.Handler:
    """Send everything this process logs to one JSON log (see the module's docstring): its
    loggers, warnings, exceptions no code caught (the main thread's and other threads'), and
    asyncio's (its default exception handler logs to the "asyncio" logger). Returns the handler."""
    handler = log_handler(process_name, log_path, bytes_max, backups_max)
    root = logging.getLogger()
    for previous in list(root.handlers):
        root.removeHandler(previous)
        previous.close()
    root.addHandler(handler)
    root.setLevel(level)
    logging.captureWarnings(True)
    _log_uncaught_exceptions()
    # A fault of the interpreter itself (a segfault in an extension) cannot be logged: its
    # traceback goes to standard error (NAME.stderr.log under deploy/).
    if sys.stderr is not None and not faulthandler.is_enabled():
        faulthandler.enable()
    return handler


_uncaught = logging.getLogger("corebank.uncaught")


def _log_uncaught_exceptions() -> None:
    """Exceptions that end the process or a thread go to the log (CRITICAL, ERROR); the
    process's end also to standard error, as before, so that deploy's start-up check (the
    tail of NAME.stderr.log) shows why it died."""
    if getattr(sys.excepthook, "corebank_logs", False):
        return
    previous_hook = sys.excepthook

    def process_hook(kind, error, traceback) -> None:
        if not issubclass(kind, KeyboardInterrupt):
            _uncaught.critical("uncaught exception: the process ends", exc_info=(kind, error, traceback))
        previous_hook(kind, error, traceback)

    def thread_hook(arguments: threading.ExceptHookArgs) -> None:
        if arguments.exc_type is SystemExit:
            return
        name = arguments.thread.name if arguments.thread is not None else "?"
        _uncaught.error("uncaught exception in thread %s", name,
                        exc_info=(arguments.exc_type, arguments.exc_value, arguments.exc_traceback))

    process_hook.corebank_logs = True  # type: ignore[attr-defined]
    sys.excepthook = process_hook
    threading.excepthook = thread_hook
