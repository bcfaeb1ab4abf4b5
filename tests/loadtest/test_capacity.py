"""The capacity model's arithmetic (loadtest/capacity.py), on made-up reports."""

import math

from loadtest import capacity


def row(scenario, tps, service, database, client_percent, coordinator=0.0):
    return {
        "scenario": scenario, "transactions_per_second": tps, "client_cpu_percent": client_percent,
        "cost_per_transfer": {"service_cpu_ms": service, "coordinator_cpu_ms": coordinator, "database_cpu_ms": database},
    }


def test_costs_include_the_load_generator_and_predict_a_cpu_bound_throughput():
    costs = capacity.costs_of(row("x", 500.0, 2.0, 1.5, 25.0))
    assert math.isclose(costs.client_ms, 0.5)  # 25% of a core over 500 transfers a second
    assert math.isclose(costs.total_ms, 4.0)
    assert math.isclose(capacity.predicted_tps(costs, cores=2), 500.0)


def test_a_row_without_costs_or_throughput_is_left_out():
    assert capacity.costs_of({"scenario": "x", "transactions_per_second": 0}) is None
    assert capacity.costs_of(row("x", 0.0, 1.0, 1.0, 1.0)) is None


def test_sizing_plans_cores_at_the_stated_utilisation():
    assert math.isclose(capacity.needed_cores(1000.0, 3.0), 3.0 / capacity.PLANNED_CORE_UTILISATION)
    assert capacity.per_core(0.0) == math.inf and math.isclose(capacity.per_core(2.0), 500.0)


def test_the_report_checks_each_scaling_run_and_sizes_each_path():
    bench = {"machine": {"cpus": 2}, "results": [row("corebank_uniform_pairs", 250.0, 3.0, 3.5, 12.5)]}
    scaling = {"machine": {"cpus": 2}, "runs": [{"shards": 1, "results": [row("corebank_uniform_pairs", 600.0, 1.0, 1.5, 30.0)]}]}
    lines = capacity.report_lines(bench, scaling, peak=1000.0)
    check = next(line for line in lines if line.strip().startswith("1 corebank_uniform_pairs"))
    assert check.split()[-3:] == ["600", "667", "0.90"]  # 2000 / (1 + 1.5 + 0.5) ms
    sized = next(line for line in lines if line.strip().startswith("Transfer, uniform pairs") and "idle" not in line and len(line.split()) == 6)
    assert sized.split()[-3:] == ["5", "6", "1"]  # 1000 x 3 ms / 60%, 1000 x 3.5 ms / 60%, one 16-core host
