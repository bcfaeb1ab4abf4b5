"""The bench's pure parts, without a cluster: issue 8's goal table, the cost split per
transfer, the uniform pair generator, and the window arithmetic behind them."""

from __future__ import annotations

import dataclasses
import pickle
import random

import pytest
from prometheus_client import CollectorRegistry, Counter, generate_latest

from loadtest import bench, costs, scaling
from loadtest.driver import ScenarioResult, WindowMeter, share_inside
from loadtest.scenarios import HALF_PEAK_OF, SCENARIO_PREPARERS, ShardPairs, UniformPairs

PGBENCH_TPS = 1000.0
ROLES = {
    "grpc-0": costs.SERVICE_ROLE, "grpc-1": costs.SERVICE_ROLE, "coordinator-0": costs.COORDINATOR_ROLE,
    "shard-0": costs.DATABASE_ROLE, "shard-1": costs.DATABASE_ROLE, "etcd": "etcd",
}  # fmt: skip
PAIR_DRAWS = 30_000
# Three standard deviations of a share estimated from PAIR_DRAWS draws is about 0.008.
SHARE_TOLERANCE = 0.02


def result(scenario: str, tps: float, p99_ms: float | None = None, **fields) -> ScenarioResult:
    defaults = dict(
        scenario=scenario, clients=16, seconds=10.0, ok_count=tps * 10.0, transactions_per_second=tps,
        latency_ms_p50=None, latency_ms_p99=p99_ms, latency_ms_mean=None, error_count_by_code={},
        client_processes=1, client_cpu_percent=None, machine_cpu_percent=None,
    )  # fmt: skip
    return ScenarioResult(**{**defaults, **fields})


def goals_by_scenario(results: list[ScenarioResult]) -> dict[str, dict]:
    return {goal["scenario"]: goal for goal in bench.summary(results)["goals"]}


def test_every_new_row_can_be_picked() -> None:
    for name in ("corebank_uniform_pairs", "corebank_create_transfers_uniform", "corebank_latency_half_uniform_peak"):
        assert name in bench.ALL_SCENARIOS
    # Every open-loop row takes its calls and its rate from a closed-loop row of the same run.
    assert set(HALF_PEAK_OF.values()) <= set(SCENARIO_PREPARERS)


def test_goals_are_ratios_to_pgbench_of_the_same_run() -> None:
    results = [
        result(bench.PGBENCH_SCENARIO, PGBENCH_TPS),
        result("corebank_uniform_pairs", 500.0),  # exactly 0.5x: met
        result("corebank_same_shard", 590.0),  # 0.59x: short of 0.6x
        result("corebank_create_transfers", 12_000.0),  # 12x: met
        result("corebank_latency_half_uniform_peak", 250.0, p99_ms=50.0, notes={"open_loop_rate_per_second": 250.0}),
        result("corebank_latency_half_peak", 295.0, p99_ms=12.0, notes={"open_loop_rate_per_second": 295.0}),
    ]
    goals = goals_by_scenario(results)

    assert goals["corebank_uniform_pairs"]["value"] == pytest.approx(0.5)
    assert goals["corebank_uniform_pairs"]["met"] is True
    assert goals["corebank_same_shard"]["value"] == pytest.approx(0.59)
    assert goals["corebank_same_shard"]["met"] is False
    assert goals["corebank_create_transfers"]["met"] is True
    assert goals["corebank_create_transfers_uniform"]["value"] is None
    assert goals["corebank_create_transfers_uniform"]["met"] is None
    # The latency goal is strict: 50 ms is not below 50 ms.
    assert goals["corebank_latency_half_uniform_peak"]["value"] == 50.0
    assert goals["corebank_latency_half_uniform_peak"]["met"] is False
    assert goals["corebank_latency_half_uniform_peak"]["open_loop_rate_per_second"] == 250.0
    # The same-shard half peak is printed for reference, without a verdict.
    assert goals["corebank_latency_half_peak"]["goal"] == "(reference)"
    assert goals["corebank_latency_half_peak"]["met"] is None


def test_goal_targets_are_issue_8s() -> None:
    targets = {goal.scenario: goal.describe_target() for goal in bench.GOALS}
    assert targets == {
        "corebank_uniform_pairs": ">= 0.5x",
        "corebank_same_shard": ">= 0.6x",
        "corebank_create_transfers_uniform": ">= 5x",
        "corebank_create_transfers": ">= 10x",
        "corebank_latency_half_uniform_peak": "< 50 ms",
        "corebank_latency_half_peak": "(reference)",
    }


def test_summary_lines_give_each_goal_a_verdict() -> None:
    results = [
        result(bench.PGBENCH_SCENARIO, PGBENCH_TPS),
        result("corebank_uniform_pairs", 100.0),
        result("corebank_create_transfers_uniform", 6000.0),
        result("corebank_latency_half_uniform_peak", 50.0, p99_ms=20.0, notes={"open_loop_rate_per_second": 50.0}),
        result(bench.FLASH_SALE_SCENARIO, 300.0),
        result(bench.UNIFORM_SCENARIO, 200.0),
    ]
    text = "\n".join(bench.summary_lines(results))

    assert "Transfer, uniform random pairs" in text and "0.10x" in text and "SHORT" in text
    assert "CreateTransfers, 1,000 uniform random pairs" in text and "6.00x" in text
    assert "p99 of Transfer at half the uniform peak (50/s)" in text and "20.0 ms" in text
    assert "not measured" in text  # the same-shard rows were not run
    assert "flash sale / uniform merchants (issue 4)" in text and "1.50" in text


def test_without_pgbench_no_ratio_is_claimed() -> None:
    goals = goals_by_scenario([result("corebank_uniform_pairs", 900.0)])
    assert goals["corebank_uniform_pairs"]["value"] is None
    assert goals["corebank_uniform_pairs"]["met"] is None


def test_cost_split_divides_each_component_by_the_transfers() -> None:
    measured = result(
        "corebank_uniform_pairs", 150.0, ok_count=1500.0,
        process_cpu_seconds={"grpc-0": 1.0, "grpc-1": 0.5, "coordinator-0": 0.15, "shard-0": 2.0, "shard-1": 1.0,
                             "etcd": 0.3},
        counter_deltas={costs.COMMITS: 3000.0, costs.DB_ROUND_TRIPS: 4500.0},
    )  # fmt: skip

    split = costs.cost_split(measured, ROLES)

    assert split.service_cpu_ms == pytest.approx(1.0)  # 1.5 CPU seconds over 1,500 transfers
    assert split.coordinator_cpu_ms == pytest.approx(0.1)
    assert split.database_cpu_ms == pytest.approx(2.0)
    assert split.commits == pytest.approx(2.0)
    assert split.db_round_trips == pytest.approx(3.0)


def test_cost_split_leaves_out_what_was_not_measured() -> None:
    # pgbench's row reads commits but not corebank's round trips; no coordinators in this cluster.
    measured = result(
        bench.PGBENCH_SCENARIO, PGBENCH_TPS, process_cpu_seconds={"shard-0": 5.0}, counter_deltas={costs.COMMITS: 10_000.0}
    )
    split = costs.cost_split(measured, ROLES)
    assert split.database_cpu_ms == pytest.approx(0.5)
    assert split.commits == pytest.approx(1.0)
    assert split.service_cpu_ms is None and split.coordinator_cpu_ms is None and split.db_round_trips is None
    assert costs.cost_split(result("corebank_uniform_pairs", 0.0), ROLES) is None


def test_cost_table_prints_dashes_for_missing_figures() -> None:
    split = costs.CostSplit(1.234, None, 0.5, 2.0, None)
    lines = costs.format_cost_rows([("corebank_uniform_pairs", split), ("corebank_cross_shard", None)])
    assert lines[2].split() == ["corebank_uniform_pairs", "1.23", "-", "0.50", "2.00", "-"]
    assert "nothing measured" in lines[3]


def test_round_trips_are_summed_over_shards_from_a_metrics_page() -> None:
    registry = CollectorRegistry()
    counter = Counter("corebank_db_round_trips", "round trips", ["shard"], registry=registry)
    counter.labels("shard-0").inc(7)
    counter.labels("shard-1").inc(5)
    Counter("corebank_other", "not counted", registry=registry).inc(100)

    assert costs.round_trips_in(generate_latest(registry).decode()) == 12.0


def test_window_meter_reports_counter_increases_present_at_both_edges() -> None:
    readings = iter([{costs.COMMITS: 100.0, costs.DB_ROUND_TRIPS: 40.0}, {costs.COMMITS: 160.0}])
    meter = WindowMeter({}, counters=lambda: next(readings))
    meter.start()
    figures = meter.stop()
    # The round trips could not be read at the end: left out, not counted as zero.
    assert figures.counter_deltas == {costs.COMMITS: 60.0}


@pytest.mark.parametrize(
    ("started", "finished", "share"),
    [
        (2.0, 4.0, 1.0),  # wholly inside
        (0.0, 2.0, 0.5),  # across the start: half of it inside
        (9.0, 13.0, 0.25),  # across the end
        (0.0, 20.0, 0.45),  # longer than the window itself: its 9 s of 20
        (0.0, 1.0, 0.0),  # all before
    ],
)
def test_calls_across_an_edge_count_for_their_share_inside(started: float, finished: float, share: float) -> None:
    assert share_inside(started, finished, window_start=1.0, window_end=10.0) == pytest.approx(share)


def shards_of(pairs: UniformPairs) -> dict[str, int]:
    return {account_id: index for index, ids in enumerate(pairs.account_ids_by_shard) for account_id in ids}


def test_uniform_pairs_cross_shards_two_thirds_of_the_time_on_three_shards() -> None:
    # 200 accounts as the hash spreads them over 3 shards.
    pairs = UniformPairs(tuple(tuple(f"s{shard}-a{index}" for index in range(size)) for shard, size in
                               enumerate((67, 67, 66))))  # fmt: skip
    shard_of = shards_of(pairs)
    rng = random.Random(8)

    draws = [pairs.draw(rng) for _ in range(PAIR_DRAWS)]

    assert all(debit != credit for debit, credit in draws)
    share = sum(shard_of[debit] != shard_of[credit] for debit, credit in draws) / PAIR_DRAWS
    assert pairs.cross_shard_share_expected == pytest.approx(2 / 3, abs=0.005)
    assert share == pytest.approx(pairs.cross_shard_share_expected, abs=SHARE_TOLERANCE)


@pytest.mark.parametrize(("sizes", "expected"), [((200,), 0.0), ((100, 100), 100 / 199), ((10, 0, 10), 10 / 19)])
def test_expected_cross_shard_share(sizes: tuple[int, ...], expected: float) -> None:
    pairs = UniformPairs(tuple(tuple(f"s{shard}-a{index}" for index in range(size)) for shard, size in enumerate(sizes)))
    assert pairs.cross_shard_share_expected == pytest.approx(expected)


def test_uniform_pairs_survive_pickling_into_client_processes() -> None:
    pairs = UniformPairs((("a", "b"), ("c",)))
    assert pickle.loads(pickle.dumps(pairs)) == pairs
    assert pickle.loads(pickle.dumps(pairs)).account_ids == ("a", "b", "c")


def test_shard_pairs_keep_the_same_shard_batch_row_on_one_shard() -> None:
    pairs = ShardPairs((("a", "b", "c"), ("d", "e")), cross_shard_share=0.0)
    shard_of = {"a": 0, "b": 0, "c": 0, "d": 1, "e": 1}
    rng = random.Random(4)
    assert all(shard_of[debit] == shard_of[credit] for debit, credit in (pairs.draw(rng) for _ in range(1000)))


def test_scaling_measures_the_uniform_rows_the_bench_way() -> None:
    arguments = scaling.parse_arguments(["--seconds", "5", "--shard-counts", "1,3"])
    assert arguments.shard_counts == [1, 3]
    options = scaling.bench_arguments(arguments)
    assert options.scenarios.split(",") == ["corebank_uniform_pairs", "corebank_create_transfers_uniform"]
    assert options.seconds == 5 and options.clients == bench.CLIENTS_DEFAULT


def test_scaling_table_shows_each_count_and_failures() -> None:
    split = costs.CostSplit(1.0, 0.1, 2.0, 2.0, 3.0)
    row = {"scenario": "corebank_uniform_pairs", "transactions_per_second": 123.4,
           "notes": {"cross_shard_share_expected": 0.5}, "cost_per_transfer": dataclasses.asdict(split)}  # fmt: skip
    text = scaling.format_table([{"shards": 2, "results": [row]}, {"shards": 3, "error": "port taken"}])
    assert "123.4" in text and "0.50" in text and "3.00" in text
    assert "3 failed: port taken" in " ".join(text.split())
