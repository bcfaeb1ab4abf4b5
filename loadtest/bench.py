"""corebank against pgbench on the same PostgreSQL, same machine, same concurrency.

    python -m loadtest.bench [--clients 16] [--seconds 15] [--warmup-seconds 5] [--batch-size 1000]
                             [--scenarios a,b,...]

Reads the cluster from $COREBANK_STATE_DIR/cluster.json (make up writes it),
runs the pgbench TPC-B-like baseline on the chosen shard's server, then each
corebank scenario through gRPC, prints the figures, issue 8's goals and the
cost of a transfer split across the cluster (loadtest.costs), and writes the
same to $COREBANK_STATE_DIR/reports/bench-<timestamp>.json.

Rows: pgbench; same-shard and cross-shard single Transfer calls; same-shard
transfers through CreateTransfers (counted per transfer, not per call);
flash-sale payments to one collect_on_every_shard merchant and the same load
spread uniformly over many merchants (their ratio is printed); issue 8's load
tester, uniform random pairs among 200 accounts on all shards, as single
Transfer calls and through CreateTransfers; and single Transfer latency in an
open loop at half the same-shard peak and at half the uniform-pairs peak.
Absolute numbers move with the machine's mood; the ratios within one run are
what to compare. `python -m loadtest.scaling` runs the uniform rows on 1, 2
and 3 shards.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime
import json
import os
import platform
import sys

import psycopg

from loadtest import costs
from loadtest.cluster import Cluster, ShardEndpoint, load_cluster
from loadtest.driver import OPEN_LOOP_IN_FLIGHT_MAX_DEFAULT, ScenarioResult, run_open_loop, run_scenario
from loadtest.pgbench_baseline import run_pgbench_baseline
from loadtest.scenarios import (
    BATCH_SCENARIOS,
    BATCH_SIZE_DEFAULT,
    CREATE_TRANSFERS_UNIFORM_SCENARIO,
    HALF_PEAK_OF,
    HALF_PEAK_SCENARIO,
    HALF_UNIFORM_PEAK_SCENARIO,
    PAIR_ACCOUNT_COUNT_DEFAULT,
    SCENARIO_PREPARERS,
    UNIFORM_MERCHANT_COUNT_DEFAULT,
    CreateTransfersBatches,
    PrepareOptions,
    SameShardTransfers,
    UniformPairTransfers,
)

PGBENCH_SCENARIO = "pgbench_tpcb"
FLASH_SALE_SCENARIO, UNIFORM_SCENARIO = "corebank_flash_sale", "corebank_uniform"
ALL_SCENARIOS = [PGBENCH_SCENARIO, *SCENARIO_PREPARERS, *HALF_PEAK_OF]
CLIENTS_DEFAULT = 16
# Ten phases of (warm-up + measured) seconds, plus set-up: about 5 minutes in all.
SECONDS_DEFAULT = 15
WARMUP_SECONDS_DEFAULT = 5
CUSTOMERS_DEFAULT = 2000
# Concurrent CreateTransfers callers: each call already carries a batch.
BATCH_CLIENTS_DEFAULT = 4
REPORTS_FOLDER = "reports"
# Issue 4's goal, kept: the flash sale's collecting merchant as fast as the load spread out.
GOAL_FLASH_OVER_UNIFORM = 0.9
RATIO_UNIT, LATENCY_UNIT = "x", "ms"


@dataclasses.dataclass(frozen=True)
class Goal:
    """One line of issue 8's goal table: a row's ratio to pgbench (at least `target`), or its
    p99 latency in ms (below `target`); no target: printed for reference."""

    path: str
    scenario: str
    unit: str
    target: float | None

    def value(self, results: list[ScenarioResult]) -> float | None:
        result = next((r for r in results if r.scenario == self.scenario), None)
        if result is None:
            return None
        return ratio_to_pgbench(result, results) if self.unit == RATIO_UNIT else result.latency_ms_p99

    def met(self, value: float | None) -> bool | None:
        """None when there is no target, or nothing was measured."""
        if self.target is None or value is None:
            return None
        return value >= self.target if self.unit == RATIO_UNIT else value < self.target

    def describe_target(self) -> str:
        if self.target is None:
            return "(reference)"
        return f">= {self.target:g}x" if self.unit == RATIO_UNIT else f"< {self.target:g} ms"


# Issue 8's table, in its order (ratios to pgbench TPC-B at the same concurrency, same run).
GOALS = (
    Goal("Transfer, uniform random pairs", UniformPairTransfers.name, RATIO_UNIT, 0.5),
    Goal("Transfer, same-shard pairs", SameShardTransfers.name, RATIO_UNIT, 0.6),
    Goal("CreateTransfers, 1,000 uniform random pairs", CREATE_TRANSFERS_UNIFORM_SCENARIO, RATIO_UNIT, 5.0),
    Goal("CreateTransfers, 1,000 same-shard pairs", CreateTransfersBatches.name, RATIO_UNIT, 10.0),
    Goal("p99 of Transfer at half the uniform peak", HALF_UNIFORM_PEAK_SCENARIO, LATENCY_UNIT, 50.0),
    Goal("p99 of Transfer at half the same-shard peak", HALF_PEAK_SCENARIO, LATENCY_UNIT, None),
)


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m loadtest.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=CLIENTS_DEFAULT, help="concurrent clients in every phase")
    parser.add_argument("--seconds", type=int, default=SECONDS_DEFAULT, help="measured seconds per phase")
    parser.add_argument("--warmup-seconds", type=int, default=WARMUP_SECONDS_DEFAULT, help="unmeasured seconds first")
    parser.add_argument(
        "--customers", type=int, default=CUSTOMERS_DEFAULT, help="customers to open (before filtering by shard)"
    )
    parser.add_argument("--shard", default=None, help="shard for pgbench and same-shard transfers (default: the first)")
    parser.add_argument(
        "--client-processes", type=int, default=1, help="spread corebank clients over this many processes"
    )
    parser.add_argument("--batch-size", type=int, default=BATCH_SIZE_DEFAULT, help="transfers per CreateTransfers call")
    parser.add_argument("--batch-clients", type=int, default=BATCH_CLIENTS_DEFAULT, help="concurrent CreateTransfers callers")
    parser.add_argument(
        "--batch-cross-shard-share", type=float, default=0.0,
        help="share of corebank_create_transfers' transfers between shards (the uniform row draws its pairs itself)",
    )  # fmt: skip
    parser.add_argument(
        "--uniform-merchants", type=int, default=UNIFORM_MERCHANT_COUNT_DEFAULT, help="merchants of the uniform phase"
    )
    parser.add_argument(
        "--pair-accounts", type=int, default=PAIR_ACCOUNT_COUNT_DEFAULT,
        help="funded accounts, on all shards, that the uniform random pairs are drawn from",
    )  # fmt: skip
    parser.add_argument(
        "--half-peak-rate", type=float, default=None,
        help=f"arrivals per second of {HALF_PEAK_SCENARIO} "
        f"(default: half the {SameShardTransfers.name} TPS of this run)",
    )  # fmt: skip
    parser.add_argument(
        "--half-uniform-peak-rate", type=float, default=None,
        help=f"arrivals per second of {HALF_UNIFORM_PEAK_SCENARIO} "
        f"(default: half the {UniformPairTransfers.name} TPS of this run)",
    )  # fmt: skip
    parser.add_argument(
        "--half-peak-in-flight-max", type=int, default=OPEN_LOOP_IN_FLIGHT_MAX_DEFAULT,
        help="open-loop calls in flight at most; arrivals past it are counted as skipped",
    )  # fmt: skip
    parser.add_argument(
        "--scenarios",
        default=",".join(ALL_SCENARIOS),
        help=f"comma-separated, from: {', '.join(ALL_SCENARIOS)}",
    )
    arguments = parser.parse_args(argv)
    if arguments.clients < 1 or arguments.seconds < 1 or arguments.warmup_seconds < 0:
        parser.error("--clients and --seconds must be positive, --warmup-seconds not negative")
    if not 1 <= arguments.batch_size <= 5000 or arguments.batch_clients < 1:
        parser.error("--batch-size is 1..5000 (CreateTransfers' limit), --batch-clients positive")
    if not 0.0 <= arguments.batch_cross_shard_share <= 1.0:
        parser.error("--batch-cross-shard-share is a fraction")
    if arguments.pair_accounts < 2:
        parser.error("--pair-accounts must be at least 2")
    unknown = set(arguments.scenarios.split(",")) - set(ALL_SCENARIOS)
    if unknown:
        parser.error(f"unknown scenarios: {', '.join(sorted(unknown))}")
    return arguments


def watched_pids(cluster: Cluster) -> dict[str, int]:
    """The cluster's own processes by name (grpc-0, etcd, shard-0, ...), from cluster.json."""
    return {process["name"]: process["pid"] for process in cluster.raw.get("processes", []) if process.get("pid")}


def checkpoint(cluster: Cluster) -> None:
    """Flush every shard's dirty pages first, so no phase pays for the previous phase's checkpoint."""
    for shard in cluster.shards:
        with psycopg.connect(shard.superuser_conninfo("postgres"), autocommit=True) as connection:
            connection.execute("CHECKPOINT")


def prepare_options(arguments: argparse.Namespace, shard: ShardEndpoint) -> PrepareOptions:
    return PrepareOptions(
        arguments.customers, shard.name, arguments.batch_size, arguments.batch_cross_shard_share,
        arguments.uniform_merchants, arguments.pair_accounts,
    )  # fmt: skip


def run_all(arguments: argparse.Namespace, cluster: Cluster) -> list[ScenarioResult]:
    shard = cluster.shard(arguments.shard) if arguments.shard else cluster.shards[0]
    wanted = arguments.scenarios.split(",")
    pids = watched_pids(cluster)
    results = []
    if PGBENCH_SCENARIO in wanted:
        print(f"[bench] {PGBENCH_SCENARIO}: pgbench -s {arguments.clients} on {shard.name}", file=sys.stderr)
        checkpoint(cluster)
        # Commits only: pgbench's own round trips are not corebank's to count.
        results.append(
            run_pgbench_baseline(
                shard, arguments.clients, arguments.seconds, arguments.warmup_seconds, pids,
                counters=costs.ClusterCounters(cluster, with_round_trips=False),
            )  # fmt: skip
        )
    for name, prepare in SCENARIO_PREPARERS.items():
        if name not in wanted:
            continue
        print(f"[bench] {name}: preparing accounts", file=sys.stderr)
        scenario = asyncio.run(prepare(cluster, prepare_options(arguments, shard)))
        checkpoint(cluster)
        clients = arguments.batch_clients if name in BATCH_SCENARIOS else arguments.clients
        print(f"[bench] {name}: {clients} clients in {arguments.client_processes} process(es)", file=sys.stderr)
        results.append(
            run_scenario(
                scenario,
                cluster.traffic_target(),
                clients=clients,
                seconds=arguments.seconds,
                warmup_seconds=arguments.warmup_seconds,
                client_processes=arguments.client_processes,
                watched_pid_by_name=pids,
                counters=costs.ClusterCounters(cluster),
            )
        )
    rate_overrides = {
        HALF_PEAK_SCENARIO: arguments.half_peak_rate, HALF_UNIFORM_PEAK_SCENARIO: arguments.half_uniform_peak_rate
    }
    for name in HALF_PEAK_OF:
        if name in wanted:
            result = run_half_peak(arguments, cluster, shard, results, name, rate_overrides[name])
            if result is not None:
                results.append(result)
    return results


def run_half_peak(
    arguments: argparse.Namespace,
    cluster: Cluster,
    shard: ShardEndpoint,
    results: list[ScenarioResult],
    name: str,
    rate: float | None,
) -> ScenarioResult | None:
    """Single transfers, open loop, at `rate` or else half the peak of HALF_PEAK_OF[name] in this run."""
    peak_name = HALF_PEAK_OF[name]
    if rate is None:
        peak = next((r for r in results if r.scenario == peak_name), None)
        if peak is None or not peak.transactions_per_second:
            print(f"[bench] {name}: skipped (needs {peak_name} in the same run, or its rate option)", file=sys.stderr)
            return None
        rate = peak.transactions_per_second / 2
    scenario = asyncio.run(SCENARIO_PREPARERS[peak_name](cluster, prepare_options(arguments, shard)))
    scenario = dataclasses.replace(scenario, name=name)
    checkpoint(cluster)
    print(f"[bench] {name}: open loop at {rate:.0f}/s", file=sys.stderr)
    return run_open_loop(
        scenario, cluster.traffic_target(), rate, arguments.seconds, arguments.warmup_seconds,
        in_flight_max=arguments.half_peak_in_flight_max, watched_pid_by_name=watched_pids(cluster),
        counters=costs.ClusterCounters(cluster),
    )  # fmt: skip


def _figure(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def ratio_to_pgbench(result: ScenarioResult, results: list[ScenarioResult]) -> float | None:
    baseline = next((r for r in results if r.scenario == PGBENCH_SCENARIO), None)
    if baseline is None or not baseline.transactions_per_second:
        return None
    return result.transactions_per_second / baseline.transactions_per_second


def format_table(results: list[ScenarioResult], roles: dict[str, str]) -> str:
    header = (
        f"{'scenario':<34} {'clients':>7} {'TPS':>9} {'vs pgbench':>10} {'p50 ms':>8} {'p99 ms':>8} "
        f"{'errors':>7} {'client CPU%':>11} {'machine CPU%':>12}"
    )
    lines = [header, "-" * len(header)]
    for result in results:
        ratio = ratio_to_pgbench(result, results)
        lines.append(
            f"{result.scenario:<34} {result.clients:>7} {result.transactions_per_second:>9.1f} "
            f"{_figure(ratio, 3):>10} {_figure(result.latency_ms_p50, 2):>8} {_figure(result.latency_ms_p99, 2):>8} "
            f"{result.error_count:>7} {_figure(result.client_cpu_percent):>11} {_figure(result.machine_cpu_percent):>12}"
        )
    for result in results:
        if result.error_count_by_code:
            codes = ", ".join(f"{code}={count}" for code, count in result.error_count_by_code.items())
            lines.append(f"errors in {result.scenario}: {codes}")
        if result.process_cpu_percent:
            cpu = ", ".join(f"{name}={percent:.0f}%" for name, percent in result.process_cpu_percent.items())
            lines.append(f"cluster CPU in {result.scenario} (% of one core): {cpu}")
    lines.append(
        "client CPU% is the load generator's CPU (pgbench, or the gRPC client processes) in % of one core; "
        f"machine CPU% is all {os.cpu_count()} cores."
    )
    lines += ["", *summary_lines(results)]
    lines += ["", *costs.format_cost_rows((r.scenario, costs.cost_split(r, roles)) for r in results)]
    lines.append(
        "per transfer (pgbench: per transaction): CPU ms of the gRPC workers, the coordinators and PostgreSQL "
        "(postmasters with their backends), commits on all shards, batches of statements corebank sent."
    )
    return "\n".join(lines)


def summary(results: list[ScenarioResult]) -> dict:
    """Issue 8's goals, and issue 4's flash-sale ratio, each against its target, from this run's rows."""
    by_name = {result.scenario: result for result in results}
    goals = []
    for goal in GOALS:
        value = goal.value(results)
        row = by_name.get(goal.scenario)
        goals.append({
            "path": goal.path, "scenario": goal.scenario, "value": value, "unit": goal.unit,
            "goal": goal.describe_target(), "met": goal.met(value),
            "open_loop_rate_per_second": row.notes.get("open_loop_rate_per_second") if row else None,
        })  # fmt: skip
    figures: dict = {"goals": goals}
    flash, uniform = by_name.get(FLASH_SALE_SCENARIO), by_name.get(UNIFORM_SCENARIO)
    if flash and uniform and uniform.transactions_per_second:
        ratio = flash.transactions_per_second / uniform.transactions_per_second
        figures["flash_sale_over_uniform"] = ratio
        figures["flash_sale_over_uniform_goal"] = GOAL_FLASH_OVER_UNIFORM
        figures["flash_sale_over_uniform_met"] = ratio >= GOAL_FLASH_OVER_UNIFORM
    return figures


def _verdict(met: bool | None) -> str:
    return "" if met is None else ("met" if met else "SHORT")


def _goal_verdict(goal: dict) -> str:
    if goal["value"] is None:
        return "not measured"
    return _verdict(goal["met"])


def summary_lines(results: list[ScenarioResult]) -> list[str]:
    figures = summary(results)
    header = f"{'issue 8 goal (vs pgbench TPC-B, this run)':<54} {'now':>10} {'goal':>11}"
    lines = [header, "-" * len(header)]
    for goal in figures["goals"]:
        if goal["unit"] == RATIO_UNIT:
            now = "-" if goal["value"] is None else f"{goal['value']:.2f}x"
            path = goal["path"]
        else:
            now = "-" if goal["value"] is None else f"{goal['value']:.1f} ms"
            rate = goal["open_loop_rate_per_second"]
            path = goal["path"] + (f" ({rate:.0f}/s)" if rate else "")
        lines.append(f"{path:<54} {now:>10} {goal['goal']:>11} {_goal_verdict(goal)}".rstrip())
    if "flash_sale_over_uniform" in figures:
        lines.append(
            f"{'flash sale / uniform merchants (issue 4)':<54} {figures['flash_sale_over_uniform']:>10.2f} "
            f"{'>= ' + format(GOAL_FLASH_OVER_UNIFORM, 'g'):>11} {_verdict(figures['flash_sale_over_uniform_met'])}"
        )
    return lines


def write_report(
    cluster: Cluster, arguments: argparse.Namespace, results: list[ScenarioResult], roles: dict[str, str]
) -> str:
    folder = cluster.state_dir / REPORTS_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    report = {
        "started_at": now.isoformat(),
        "machine": machine(),
        "options": vars(arguments),
        "grpc_endpoint": cluster.grpc_endpoint,
        "results": report_rows(results, roles),
        "summary": summary(results),
    }
    path = folder / f"bench-{now.strftime('%Y%m%dT%H%M%SZ')}.json"
    path.write_text(json.dumps(report, indent=1) + "\n")
    return str(path)


def machine() -> dict:
    return {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()}


def report_rows(results: list[ScenarioResult], roles: dict[str, str]) -> list[dict]:
    """The rows as JSON: every figure, the ratio to pgbench and the cost split per transfer."""
    rows = []
    for result in results:
        row = dataclasses.asdict(result)
        row["error_count"] = result.error_count
        row["ratio_to_pgbench"] = ratio_to_pgbench(result, results)
        split = costs.cost_split(result, roles)
        row["cost_per_transfer"] = None if split is None else dataclasses.asdict(split)
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    arguments = parse_arguments(argv)
    cluster = load_cluster()
    results = run_all(arguments, cluster)
    roles = costs.role_by_process(cluster)
    print(format_table(results, roles))
    print(f"report: {write_report(cluster, arguments, results, roles)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
