"""`make bench`'s clearing part (loadtest/clearing_bench.py): its figures on a small size against
the session's test cluster (present and sane, never timed), and its pure parts on made-up data."""

from __future__ import annotations

import json
import pathlib
import random

import pytest

from loadtest import clearing_bench
from loadtest.clearing_bench import Call, latency_split

WINDOW_SIZE = 2000
CLOSE_RUNS = 2


@pytest.mark.timeout(600)
def test_the_clearing_bench_measures_the_check_and_the_close_on_a_small_window(cluster, monkeypatch, capsys):
    monkeypatch.setenv("COREBANK_STATE_DIR", cluster["state_dir"])
    exit_code = clearing_bench.main([
        "--seconds", "2", "--warmup-seconds", "1", "--clients", "4", "--batch-clients", "2", "--batch-size", "100",
        "--customers", "80", "--window-sizes", str(WINDOW_SIZE), "--close-runs", str(CLOSE_RUNS), "--stream-clients", "2",
        "--storm-closes", "3",
    ])  # fmt: skip
    assert exit_code == 0
    out = capsys.readouterr().out
    assert "(a) position check" in out and "(b) window close" in out and "as the owner role" in out
    path = pathlib.Path(out.rsplit("report: ", 1)[1].strip())
    report = json.loads(path.read_text())
    assert path.parent == pathlib.Path(cluster["state_dir"]) / "reports"

    rows = {row["scenario"]: row for row in report["position_check"]["rows"]}
    assert set(rows) == {name for pair in clearing_bench.PAIRS for name in (pair.within, pair.between)}
    for row in rows.values():
        assert row["tps"] > 0 and row["wall_us_per_transfer"] == pytest.approx(1e6 / row["tps"]), row
        assert row["cpu_us_per_transfer"] is None or row["cpu_us_per_transfer"] > 0, row
    assert [pair["path"] for pair in report["position_check"]["pairs"]] == [pair.label for pair in clearing_bench.PAIRS]
    for pair in report["position_check"]["pairs"]:
        assert pair["wall_ratio"] > 0 and pair["wall_us_added"] == pytest.approx(pair["wall_us_between"] - pair["wall_us_within"])

    block = report["window_close"]["sizes"][str(WINDOW_SIZE)]
    assert len(block["runs"]) == CLOSE_RUNS
    for run in block["runs"]:
        # The loaded transfers (and the stream's, in the second before the close) were in the window.
        assert run["window_transfers"] >= WINDOW_SIZE and run["load"]["transfers"] == WINDOW_SIZE
        assert sum(run["load"]["by_shard"].values()) == WINDOW_SIZE
        assert run["close_ms"] > 0 and run["create_settlement_ms"] > 0 and run["record_participants_settled_ms"] > 0
        assert run["settlement_entries"] >= 2 and run["settlement_nets_sum_to_zero"]
        assert run["reconcile"]["error"] is None and run["reconcile"]["consistent"], run["reconcile"]
        assert run["reconcile"]["transfers_checked"] >= WINDOW_SIZE
        assert run["stream_during_close"]["failed"] == 0
        assert run["stream_during_close"]["during"]["transfers"] + run["stream_during_close"]["outside"]["transfers"] > 0
    figures = block["figures"]
    assert figures["close_ms_min"] <= figures["close_ms_median"] <= figures["close_ms_max"]
    assert figures["window_transfers_min"] >= WINDOW_SIZE
    storm = report["window_close"]["storm"]
    assert storm["closes"] == 3 and storm["stream"]["failed"] == 0


def test_calls_overlapping_a_close_are_told_apart_from_the_others() -> None:
    calls = [Call(0.0, 0.010, True), Call(0.95, 1.02, True), Call(1.04, 1.30, True), Call(2.0, 2.5, False), Call(3.0, 3.004, True)]
    split = latency_split(calls, [(1.0, 1.05)])
    assert split["during"]["transfers"] == 2 and split["during"]["p99_ms"] == pytest.approx(260.0)
    assert split["outside"]["transfers"] == 2 and split["outside"]["p99_ms"] == pytest.approx(10.0)
    assert split["failed"] == 1
    assert latency_split([], [(0.0, 1.0)])["during"]["p99_ms"] is None


def test_pair_figures_compare_between_with_within_and_skip_rows_not_run() -> None:
    rows = [
        {"scenario": "clearing_same_shard_within", "wall_us_per_transfer": 400.0, "cpu_us_per_transfer": 200.0},
        {"scenario": "clearing_same_shard_between", "wall_us_per_transfer": 500.0, "cpu_us_per_transfer": None},
    ]
    (pair,) = clearing_bench.check_costs(rows)
    assert pair["path"] == clearing_bench.SAME_SHARD
    assert pair["wall_ratio"] == pytest.approx(1.25) and pair["wall_us_added"] == pytest.approx(100.0)
    assert pair["cpu_ratio"] is None and pair["cpu_us_added"] is None


def test_pgbench_comes_from_the_newest_bench_report_that_has_it(tmp_path) -> None:
    reports = tmp_path / "reports"
    reports.mkdir()
    (reports / "bench-20260101T000000Z.json").write_text(json.dumps({"results": [{"scenario": "pgbench_tpcb", "transactions_per_second": 900.0}]}))
    (reports / "bench-20260102T000000Z.json").write_text(json.dumps({"results": [{"scenario": "corebank_same_shard", "transactions_per_second": 5.0}]}))
    tps, path = clearing_bench.latest_pgbench_tps(tmp_path)
    assert tps == 900.0 and path.endswith("bench-20260101T000000Z.json")
    assert clearing_bench.latest_pgbench_tps(tmp_path / "none") == (None, None)


def test_loaded_pairs_stay_on_one_shard_between_two_participants() -> None:
    account_set = clearing_bench.AccountSet(
        run_id="r", system_account_id_by_shard={}, customer_account_ids_by_shard={"shard-0": ["a1", "a2", "b1"], "shard-1": ["c1"]},
        participant_ids=["r.a", "r.b", "r.c"], participant_by_account_id={"a1": "r.a", "a2": "r.a", "b1": "r.b", "c1": "r.c"},
    )  # fmt: skip
    pairs = clearing_bench.load_pairs(account_set, "shard-0", random.Random(1))
    assert pairs and all(payer != payee for _debit, _credit, payer, payee in pairs)
    assert {debit for debit, *_ in pairs} == {"a1", "a2", "b1"}
    # The first participant pays over LOAD_HEAVY_PAYER_FACTOR times as many pairs: its net is not zero.
    assert sum(1 for pair in pairs if pair[2] == "r.a") == 2 * clearing_bench.LOAD_PAIRS_PER_ACCOUNT * clearing_bench.LOAD_HEAVY_PAYER_FACTOR
    assert clearing_bench.load_pairs(account_set, "shard-1", random.Random(1)) == []
