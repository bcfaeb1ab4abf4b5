"""The JSON log: one object per line with the call's context, `extra` fields and tracebacks;
files rotated within their bounds; and everything a process cannot catch itself reaching it."""

from __future__ import annotations

import datetime
import enum
import json
import logging
import pathlib
import subprocess
import sys
import textwrap

import pytest

from services.observability import log_context, logs

REPO_DIR = pathlib.Path(__file__).resolve().parents[3]


def line_of(record: logging.LogRecord, process_name: str = "grpc-0") -> dict:
    text = logs.JsonFormatter(process_name).format(record)
    assert "\n" not in text
    return json.loads(text)


def record(message: str = "hello %s", args: tuple = ("world",), level: int = logging.INFO, extra: dict | None = None,
           exc_info=None) -> logging.LogRecord:
    """A record as `logging.getLogger("corebank.test").log(...)` makes it, extra fields included."""
    return logging.getLogger("corebank.test").makeRecord("corebank.test", level, __file__, 1, message, args, exc_info, extra=extra)


def test_a_line_has_time_level_logger_process_pid_and_message():
    line = line_of(record())
    assert line["message"] == "hello world"
    assert (line["level"], line["logger"], line["process"]) == ("INFO", "corebank.test", "grpc-0")
    assert isinstance(line["pid"], int)
    # RFC 3339 in UTC with milliseconds: 2026-11-23T11:25:38.616Z
    assert len(line["time"]) == len("2026-11-23T11:25:38.616Z") and line["time"].endswith("Z")
    parsed = datetime.datetime.fromisoformat(line["time"].replace("Z", "+00:00"))
    assert abs(parsed.timestamp() - datetime.datetime.now(datetime.timezone.utc).timestamp()) < 60


def test_rfc3339_keeps_the_milliseconds_of_the_record():
    assert logs.rfc3339_utc(0.0) == "1970-01-01T00:00:00.000Z"
    assert logs.rfc3339_utc(1_795_000_000.9999) == "2026-11-18T11:06:40.999Z"  # cut, not rounded up to the next second


def test_the_calls_context_is_on_every_line_logged_within_it():
    tokens = [
        log_context.REQUEST_ID.set("req-1"), log_context.TRANSFER_ID.set("t-42"),
        log_context.TRACE_ID.set("4bf92f3577b34da6a3ce929d0e0e4736"), log_context.SPAN_ID.set("00f067aa0ba902b7"),
    ]
    try:
        inside = line_of(record())
    finally:
        for token in reversed(tokens):
            token.var.reset(token)
    outside = line_of(record())
    assert (inside["request_id"], inside["transfer_id"]) == ("req-1", "t-42")
    assert (inside["trace_id"], inside["span_id"]) == ("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7")
    assert not {"request_id", "transfer_id", "trace_id", "span_id"} & set(outside)


def test_a_task_outside_any_call_logs_no_call_even_when_a_call_started_it():
    token = log_context.TRANSFER_ID.set("t-first-caller")
    try:
        context = log_context.outside_any_call()
    finally:
        log_context.TRANSFER_ID.reset(token)
    assert context.run(log_context.fields) == {}


class Colour(enum.Enum):
    RED = "red"


def test_extra_fields_are_kept_as_json_values_and_never_replace_the_lines_own():
    line = line_of(record(extra={
        "method": "/corebank.v1.Payments/Transfer", "code": "DEADLINE_EXCEEDED", "reason": "", "duration_ms": 12.5,
        "colour": Colour.RED, "by_pair": {(1, 2): "one"}, "ratio": float("nan"), "time": "forged", "level": "forged",
    }))
    assert (line["method"], line["code"], line["reason"], line["duration_ms"]) == (
        "/corebank.v1.Payments/Transfer", "DEADLINE_EXCEEDED", "", 12.5)
    assert line["level"] == "INFO" and line["time"] != "forged"
    assert (line["extra_time"], line["extra_level"]) == ("forged", "forged")
    assert line["colour"] == "Colour.RED"  # JSON has no type for it: its text
    assert line["by_pair"] == "{(1, 2): 'one'}"
    assert line["ratio"] == "nan"  # not NaN, which is no JSON


def test_an_exception_is_one_field_of_the_same_line():
    try:
        raise ValueError("boom\nsecond line")
    except ValueError:
        line = line_of(record("failed", (), logging.ERROR, exc_info=sys.exc_info()))
    assert line["level"] == "ERROR" and line["message"] == "failed"
    assert line["exception"].startswith("Traceback (most recent call last):")
    assert line["exception"].rstrip().endswith("ValueError: boom\nsecond line")


def test_no_callers_text_can_forge_or_split_a_line():
    forged = 'x"}\n{"level": "ERROR", "message": "forged'
    text = logs.JsonFormatter("grpc-0").format(record("transfer %s", (forged,), extra={"transfer_id_seen": forged}))
    assert len(text.splitlines()) == 1
    line = json.loads(text)
    assert line["level"] == "INFO" and line["message"] == f"transfer {forged}"


def test_a_huge_message_is_cut_with_a_mark():
    line = line_of(record("%s", ("x" * (logs.FIELD_CHARS_MAX * 2),)))
    assert line["message"].endswith(logs.TRUNCATED_MARK)
    assert len(line["message"]) == logs.FIELD_CHARS_MAX + len(logs.TRUNCATED_MARK)


def test_the_file_rotates_within_its_bounds(tmp_path: pathlib.Path):
    bytes_max, backups_max = 2_000, 2
    handler = logs.log_handler("grpc-0", tmp_path / "grpc-0.log", bytes_max, backups_max)
    logger = logging.getLogger("corebank.test.rotation")
    logger.propagate = False
    logger.addHandler(handler)
    try:
        for number in range(200):
            logger.warning("line %d %s", number, "y" * 50)
    finally:
        logger.removeHandler(handler)
        handler.close()
    files = sorted(path.name for path in tmp_path.iterdir())
    assert files == ["grpc-0.log", "grpc-0.log.1", "grpc-0.log.2"]  # never more than the backups asked for
    assert all((tmp_path / name).stat().st_size <= bytes_max for name in files)
    newest = [json.loads(text) for text in (tmp_path / "grpc-0.log").read_text().splitlines()]
    assert newest[-1]["message"].startswith("line 199 ")  # the newest lines are kept, the oldest dropped


def test_the_default_bounds_are_named_and_finite():
    assert 0 < logs.LOG_BYTES_MAX <= 100 * 1024 * 1024 and 0 < logs.LOG_BACKUPS_MAX <= 10


PROCESS = textwrap.dedent('''
    import asyncio, gc, pathlib, sys, threading, warnings
    from services.observability import logs
    logs.configure("probe-0", pathlib.Path(sys.argv[1]))

    async def lose_an_exception():
        future = asyncio.get_running_loop().create_future()
        future.set_exception(RuntimeError("lost in asyncio"))
        del future
        gc.collect()

    asyncio.run(lose_an_exception())
    warnings.warn("a warning", UserWarning)
    thread = threading.Thread(target=lambda: 1 / 0, name="probe-thread")
    thread.start()
    thread.join()
    raise SystemError("the process dies")
''')


@pytest.mark.parametrize("event_loop", ["asyncio", "uvloop"])
def test_what_a_process_does_not_catch_reaches_its_json_log(tmp_path: pathlib.Path, event_loop: str):
    log_path = tmp_path / "probe-0.log"
    script = PROCESS if event_loop == "asyncio" else PROCESS.replace("asyncio.run(", "__import__('uvloop').run(")
    ended = subprocess.run([sys.executable, "-c", script, str(log_path)], cwd=REPO_DIR, capture_output=True, text=True, timeout=60)
    assert ended.returncode == 1
    lines = [json.loads(text) for text in log_path.read_text().splitlines()]
    by_logger = {line["logger"]: line for line in lines}
    assert by_logger["asyncio"]["level"] == "ERROR" and "lost in asyncio" in by_logger["asyncio"]["exception"]
    assert "a warning" in by_logger["py.warnings"]["message"]
    thread_line = next(line for line in lines if "probe-thread" in line["message"])
    assert "ZeroDivisionError" in thread_line["exception"]
    assert lines[-1]["level"] == "CRITICAL" and "SystemError: the process dies" in lines[-1]["exception"]
    assert all(line["process"] == "probe-0" for line in lines)
    # The process's end also on standard error, where deploy/ looks when a process dies at start.
    assert "SystemError: the process dies" in ended.stderr
