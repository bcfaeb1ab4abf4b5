"""The locust scenarios drive the real API, leave a ledger that passes every check, and say so.

Against the session's test cluster, each for a few seconds: `make loadtest`'s entry point
(loadtest.run) in one process and with a master and two workers, and locust's web UI driven
through its HTTP API (/swarm, /stats/requests, /stop) the way a browser does.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator

import pytest

from deploy.processes import free_port
from loadtest import run, swarm
from loadtest.check import check_folder, read_transfers

USERS = 20
ACCOUNTS = 300
# The flash sale's shape in the web UI test: base load for 40% of 10 s, the peak for 30%, then base.
WEB_DURATION_SECONDS = 10
WEB_BEFORE_SHARE = 0.4
WEB_HOLD_SHARE = 0.3
WEB_BASE_USERS = 2
WEB_READY_SECONDS_MAX = 60
WEB_RUN_SECONDS_MAX = 90
WEB_POLL_SECONDS = 0.25
WEB_CALL_TIMEOUT_SECONDS = 30
# Codes a call gets from its own client (a deadline it set, a channel it broke), not from corebank.
CLIENT_SIDE_CODES = ("DEADLINE_EXCEEDED", "CANCELLED", "UNAVAILABLE", "UNKNOWN", "INTERNAL")


def _flash_sale_environment(monkeypatch, tmp_path: pathlib.Path) -> None:
    # The cluster comes from the host (--host) alone: $COREBANK_STATE_DIR names an empty folder.
    monkeypatch.setenv("COREBANK_STATE_DIR", str(tmp_path / "no-cluster-here"))
    monkeypatch.setenv("ACCOUNTS", str(ACCOUNTS))
    monkeypatch.setenv("RAMP_SECONDS", "1")
    for name in ("SCENARIO", "WORKERS", "MAX_FAILURE_RATIO", "MAX_P99_MS", "HOST"):
        monkeypatch.delenv(name, raising=False)


def _only_run_folder(cluster: dict) -> pathlib.Path:
    folders = sorted((pathlib.Path(cluster["state_dir"]) / swarm.REPORTS_FOLDER).glob("flash-sale-*"))
    return folders[-1]


def _assert_every_payment_answered_by_corebank(folder: pathlib.Path) -> list:
    sent = read_transfers(folder / swarm.TRANSFERS_FILE)
    assert any(t.outcome == swarm.POSTED for t in sent), "no payment was acknowledged"
    # Every call got its answer from corebank: none timed out or broke in the client (as calls once
    # did under gevent when the token rode on a Python call-credentials plugin).
    unanswered = [t.transfer_id for t in sent if t.outcome in (swarm.UNKNOWN, swarm.SENT)]
    assert unanswered == [], f"{len(unanswered)} of {len(sent)} payments got no answer, e.g. {unanswered[:3]}"
    client_side = [t for t in sent if t.code.split("/")[0] in CLIENT_SIDE_CODES]
    assert client_side == [], client_side[:3]
    return sent


@pytest.mark.timeout(240)
def test_make_loadtest_fails_past_a_threshold_and_writes_the_verdict_beside_the_report(cluster, tmp_path, monkeypatch, capsys):
    _flash_sale_environment(monkeypatch, tmp_path)
    # No transfer is answered within 1 ms: the p99 threshold must fail the run, and nothing else.
    exit_code = run.main(["--users", str(USERS), "--duration", "6s", "--host", cluster["state_dir"], "--max-p99-ms", "1"])

    assert exit_code == 1
    folder = _only_run_folder(cluster)
    assert f"verdict {folder / swarm.VERDICT_FILE}" in capsys.readouterr().out
    assert (folder / swarm.HTML_REPORT_FILE).exists()
    verdict = json.loads((folder / swarm.VERDICT_FILE).read_text())
    failed = [check["label"] for check in verdict["checks"] if not check["ok"]]
    assert not verdict["passed"] and failed == ["p99 <= MAX_P99_MS (1 ms)"], failed
    assert verdict["locust"]["requests"] > 0 and verdict["locust"]["p99_ms"] > 1
    labels = [check["label"] for check in verdict["checks"]]
    assert any(label.startswith("audit:") for label in labels) and any(label.startswith("merchant during the run") for label in labels)
    setup = swarm.read_plan(folder)
    assert len(setup.accounts.merchant_account_ids) == 1 and len(setup.accounts.customer_account_ids) == ACCOUNTS
    _assert_every_payment_answered_by_corebank(folder)


@pytest.mark.timeout(300)
def test_workers_2_runs_one_swarm_whose_totals_and_ledger_pass(cluster, tmp_path, monkeypatch):
    _flash_sale_environment(monkeypatch, tmp_path)
    monkeypatch.setenv("WORKERS", "2")
    # The thresholds are not under test here (no timed assertions): only that the swarm is whole.
    exit_code = run.main(["--users", str(USERS), "--duration", "6s", "--host", cluster["state_dir"], "--max-p99-ms", "60000"])

    folder = _only_run_folder(cluster)
    verdict = json.loads((folder / swarm.VERDICT_FILE).read_text())
    assert exit_code == 0, [check for check in verdict["checks"] if not check["ok"]]
    assert verdict["locust"]["workers"] == 2 and verdict["locust"]["workers_missing"] == []
    sent = _assert_every_payment_answered_by_corebank(folder)
    # Both workers' transfers are in the one log (an id is run:process:user:sequence), as many as
    # locust's totals counted calls: the verdict's own check, repeated here on the files.
    assert len({t.transfer_id.split(":")[1] for t in sent}) == 2
    assert len(sent) == swarm.Totals.read(folder / swarm.TOTALS_FILE).transfers_called


def _web(port: int, path: str, form: dict | None = None) -> dict:
    data = urllib.parse.urlencode(form).encode() if form is not None else None
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", data=data, timeout=WEB_CALL_TIMEOUT_SECONDS) as response:
        return json.load(response)


def _stats(port: int) -> tuple[str, int, int]:
    """(state, users, requests) as the web UI shows them."""
    stats = _web(port, "/stats/requests")
    requests = sum(row["num_requests"] for row in stats["stats"] if row["name"] != "Aggregated")
    return stats["state"], stats["user_count"], requests


def _watch(port: int, until, seconds_max: float = WEB_RUN_SECONDS_MAX) -> list[tuple[str, int, int]]:
    """Poll the stats until `until(state, users, requests)`; every reading in order."""
    readings = []
    deadline = time.monotonic() + seconds_max
    while time.monotonic() < deadline:
        readings.append(_stats(port))
        if until(*readings[-1]):
            return readings
        time.sleep(WEB_POLL_SECONDS)
    raise AssertionError(f"the web UI never got there; last readings {readings[-5:]}")


@contextlib.contextmanager
def _web_ui(tmp_path: pathlib.Path) -> Iterator[tuple[int, pathlib.Path]]:
    port = free_port()
    output = tmp_path / "locust.log"
    environment = {
        **os.environ, "SCENARIO": "flash-sale", "USERS": str(USERS), "BASE_USERS": str(WEB_BASE_USERS),
        "DURATION_SECONDS": str(WEB_DURATION_SECONDS), "BEFORE_SHARE": str(WEB_BEFORE_SHARE),
        "HOLD_SHARE": str(WEB_HOLD_SHARE), "RAMP_SECONDS": "1",
    }  # fmt: skip
    environment.pop("LOADTEST_OUTPUT_DIR", None)
    command = [sys.executable, "-m", "locust", "-f", str(run.LOCUSTFILE), "--web-host", "127.0.0.1", "--web-port", str(port),
               "--stop-timeout", "10"]  # fmt: skip
    with output.open("w") as log:
        process = subprocess.Popen(command, env=environment, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + WEB_READY_SECONDS_MAX
        while True:
            try:
                _stats(port)
                break
            except OSError:
                assert process.poll() is None and time.monotonic() < deadline, output.read_text()
                time.sleep(WEB_POLL_SECONDS)
        yield port, output
    finally:
        process.terminate()
        process.wait(timeout=WEB_CALL_TIMEOUT_SECONDS)


@pytest.mark.timeout(360)
def test_the_web_ui_honours_the_host_times_the_spike_from_start_and_starts_again(cluster, tmp_path, monkeypatch):
    _flash_sale_environment(monkeypatch, tmp_path)
    with _web_ui(tmp_path) as (port, output):
        # A host naming no cluster: the set-up says so and the start ends; the process lives on.
        assert _web(port, "/swarm", {"user_count": 1, "spawn_rate": 1, "host": str(tmp_path / "nowhere")})["success"]
        _watch(port, lambda state, users, requests: state == "stopped")
        assert "set-up failed" in output.read_text()
        # By now the shape's duration has passed since the process started: a shape timed from the
        # process (not from Start) would end at once, without a spike.
        time.sleep(WEB_DURATION_SECONDS)

        assert _web(port, "/swarm", {"user_count": 1, "spawn_rate": 1, "host": cluster["state_dir"]})["success"]
        first = _watch(port, lambda state, users, requests: state == "stopped" and requests > 0)
        running = [users for state, users, _ in first if state == "running"]
        assert WEB_BASE_USERS in running and USERS in running, running
        assert running.index(WEB_BASE_USERS) < running.index(USERS), "the spike came before the base load"

        # A second Start after the shape's end, and Stop during it: the same accounts, set up once.
        assert _web(port, "/swarm", {"user_count": 1, "spawn_rate": 1, "host": cluster["state_dir"]})["success"]
        _watch(port, lambda state, users, requests: state == "running" and requests > 0)
        _web(port, "/stop", {})
        _watch(port, lambda state, users, requests: state == "stopped")
        log_text = output.read_text()

    assert log_text.count("opened 300 customers") == 1, log_text
    folders = sorted((pathlib.Path(cluster["state_dir"]) / swarm.REPORTS_FOLDER).glob("flash-sale-*"))
    folder = next(f for f in folders if f"run folder {f}" in log_text)
    sent = read_transfers(folder / swarm.TRANSFERS_FILE)
    # The log covers both starts (user numbers go on across them), and passes every check.
    assert len({t.transfer_id.split(":")[2] for t in sent}) > USERS
    report = check_folder(folder)
    assert report.violations == [], report.violations
