"""The pure parts of `make loadtest`: which cluster a locust host names, the transfer log, the
merchant's bounds from wall-clock times, and the thresholds' verdict (loadtest/swarm.py,
loadtest/check.py, loadtest/run.py), on made-up data."""

from __future__ import annotations

import json
import pathlib

import pytest

from loadtest import run, swarm
from loadtest.check import MerchantSample, Report, SentTransfer, check_merchant_during_run, read_transfers

MERCHANT = "m1"


def _state_dir(folder: pathlib.Path) -> pathlib.Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "cluster.json").write_text("{}")
    return folder


def test_an_empty_host_is_the_environments_cluster(tmp_path, monkeypatch):
    monkeypatch.setenv("COREBANK_STATE_DIR", str(_state_dir(tmp_path / "default")))
    assert swarm.resolve_host("") == swarm.HostTarget((tmp_path / "default" / "cluster.json").resolve(), None)
    assert swarm.resolve_host(None).address is None


def test_a_host_path_names_a_state_folder_or_its_cluster_json(tmp_path, monkeypatch):
    monkeypatch.setenv("COREBANK_STATE_DIR", str(tmp_path / "elsewhere"))
    other = _state_dir(tmp_path / "other")
    expected = swarm.HostTarget((other / "cluster.json").resolve(), None)
    assert swarm.resolve_host(str(other)) == expected
    assert swarm.resolve_host(f"  {other / 'cluster.json'} ") == expected
    assert swarm.resolve_host(str(other)).key == swarm.resolve_host(str(other / "cluster.json")).key


def test_a_host_address_is_called_with_the_environments_cluster(tmp_path, monkeypatch):
    monkeypatch.setenv("COREBANK_STATE_DIR", str(_state_dir(tmp_path / "default")))
    assert swarm.resolve_host("grpcs://127.0.0.1:23400").address == "127.0.0.1:23400"
    assert swarm.resolve_host("localhost:23400") == swarm.HostTarget((tmp_path / "default" / "cluster.json").resolve(), "localhost:23400")
    assert swarm.resolve_host("localhost:23400").key != swarm.resolve_host("").key


@pytest.mark.parametrize("host", ["http://127.0.0.1:8080", "grpc://127.0.0.1:1", "grpcs://no-port", "/no/such/folder", "a b"])
def test_a_host_that_names_no_cluster_is_refused(host, tmp_path, monkeypatch):
    monkeypatch.setenv("COREBANK_STATE_DIR", str(tmp_path))
    with pytest.raises(swarm.HostError):
        swarm.resolve_host(host)


def test_a_json_file_not_named_cluster_json_is_refused(tmp_path):
    (tmp_path / "other.json").write_text("{}")
    with pytest.raises(swarm.HostError):
        swarm.resolve_host(str(tmp_path / "other.json"))


def test_a_workers_log_drains_into_the_masters_and_reads_back(tmp_path):
    worker = swarm.TransferLog()
    worker.sent("t1", "a", MERCHANT, 5, 10.0)
    worker.answered("t1", swarm.POSTED, "POSTED", 10.5)
    worker.sent("t2", "b", MERCHANT, 7, 11.0)  # its user was stopped during the call
    master = swarm.TransferLog()
    for part in swarm.chunks(worker.drain(), 1):
        master.merge(part)
    assert worker.rows == {} and master.counts() == {swarm.POSTED: 1, swarm.SENT: 1}
    master.write(tmp_path / "transfers.csv")
    assert read_transfers(tmp_path / "transfers.csv") == [
        SentTransfer("t1", "a", MERCHANT, 5, swarm.POSTED, "POSTED", 10.0, 10.5),
        SentTransfer("t2", "b", MERCHANT, 7, swarm.SENT, "", 11.0, None),
    ]
    assert list(swarm.chunks([], 10)) == [[]]  # an empty log still tells the master it is complete


def _payment(transfer_id, amount_minor, sent_at, answered_at, outcome=swarm.POSTED):
    return SentTransfer(transfer_id, "buyer", MERCHANT, amount_minor, outcome, "", sent_at, answered_at)


PAYMENTS = [
    _payment("p1", 10, 1.0, 2.0),
    _payment("p2", 20, 3.0, 5.0),
    _payment("p3", 40, 4.0, None, swarm.SENT),  # no answer: may have posted at any moment after 4.0
]


@pytest.mark.parametrize(
    ("balance_minor", "collecting_minor", "read_started_at", "read_ended_at", "ok"),
    [
        (10, 0, 2.5, 2.6, True),  # p1 answered before the read; nothing else sent yet
        (5, 5, 2.5, 2.6, True),  # part of it still collecting on a sub-account
        (0, 0, 2.5, 2.6, False),  # p1 was answered POSTED before the read: missing money
        (30, 0, 2.5, 2.6, False),  # p2 was sent only after the read ended: money from nowhere
        (10, 0, 4.5, 4.6, True),  # p2 and p3 in flight: at least p1
        (70, 0, 4.5, 4.6, True),  # ... at most all three
        (71, 0, 4.5, 4.6, False),
        (10, 0, 5.5, 5.6, False),  # p2 was answered POSTED before this read
    ],
)
def test_the_merchant_lies_between_payments_answered_before_a_read_and_sent_before_its_end(
    balance_minor, collecting_minor, read_started_at, read_ended_at, ok
):
    report = Report(lambda line: None)
    sample = MerchantSample(read_started_at, read_ended_at, balance_minor, collecting_minor)
    check_merchant_during_run(MERCHANT, PAYMENTS, [sample], report)
    assert (report.violations == []) is ok


def test_no_merchant_reads_is_a_violation():
    report = Report(lambda line: None)
    check_merchant_during_run(MERCHANT, PAYMENTS, [], report)
    assert len(report.violations) == 1


def _totals(**changes):
    fields = dict(requests=1000, failures=5, p99_ms=400, exceptions=0, calls_by_name={"Transfer": 1000},
                  transfers_called=1000, workers=2, workers_missing=[])  # fmt: skip
    return swarm.Totals(**{**fields, **changes})


def _judged(totals, answered=1000, exit_code=1, thresholds=run.Thresholds(0.01, 1000)):
    report = Report(lambda line: None)
    run.judge_locust(report, exit_code, totals, answered, thresholds)
    return [check["label"] for check in report.checks if not check["ok"]]


def test_a_run_within_the_thresholds_passes():
    assert _judged(_totals()) == []
    assert _judged(_totals(failures=10, p99_ms=1000)) == []  # the bounds themselves pass


@pytest.mark.parametrize(
    ("totals", "answered", "exit_code", "failing"),
    [
        (_totals(failures=11), 1000, 1, "failure ratio"),
        (_totals(p99_ms=1001), 1000, 1, "p99"),
        (_totals(requests=0, failures=0, p99_ms=None, transfers_called=0), 0, 0, "locust recorded requests"),
        (_totals(exceptions=1), 1000, 1, "no exception"),
        (_totals(workers_missing=["w1"]), 1000, 1, "every worker"),
        (_totals(), 999, 1, "the transfer log holds"),
        (_totals(), 1000, 2, "locust ran"),
    ],
)
def test_each_threshold_and_consistency_check_fails_the_run(totals, answered, exit_code, failing):
    failed = _judged(totals, answered, exit_code)
    assert len(failed) == 1 and failed[0].startswith(failing), failed


def test_thresholds_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("MAX_FAILURE_RATIO", "0.05")
    monkeypatch.setenv("MAX_P99_MS", "250")
    monkeypatch.setenv("WORKERS", "3")
    monkeypatch.delenv("SCENARIO", raising=False)
    arguments = run.parse_arguments([])
    assert (arguments.max_failure_ratio, arguments.max_p99_ms, arguments.workers) == (0.05, 250.0, 3)
    monkeypatch.delenv("MAX_FAILURE_RATIO")
    monkeypatch.delenv("MAX_P99_MS")
    arguments = run.parse_arguments([])
    assert (arguments.max_failure_ratio, arguments.max_p99_ms) == (run.MAX_FAILURE_RATIO_DEFAULT, run.MAX_P99_MS_DEFAULT)
    # A batch call carries many transfers: its own default bound.
    assert run.parse_arguments(["--scenario", "batch"]).max_p99_ms == run.MAX_P99_MS_DEFAULT_BY_SCENARIO["batch"]


@pytest.mark.parametrize("argv", [["--max-failure-ratio", "1.5"], ["--max-p99-ms", "0"], ["--workers", "-1"]])
def test_thresholds_out_of_range_are_refused(argv):
    with pytest.raises(SystemExit):
        run.parse_arguments(argv)


def test_the_totals_file_reads_back(tmp_path):
    _totals().write(tmp_path / "totals.json")
    assert swarm.Totals.read(tmp_path / "totals.json") == _totals()
    assert json.loads((tmp_path / "totals.json").read_text())["workers_missing"] == []


@pytest.mark.parametrize(("text", "seconds"), [("90", 90), ("90s", 90), ("2m", 120), ("1m30s", 90), ("1h", 3600)])
def test_durations_read_like_locust(text: str, seconds: int) -> None:
    assert run.duration_seconds(text) == seconds
