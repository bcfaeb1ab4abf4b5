"""corebank against pgbench on the same PostgreSQL, same machine, same concurrency.

    python -m loadtest.bench [--clients 16] [--seconds 15] [--warmup-seconds 5] [--batch-size 1000]

Reads the cluster from $COREBANK_STATE_DIR/cluster.json (make up writes it),
runs the pgbench TPC-B-like baseline on the chosen shard's server, then each
corebank scenario through gRPC, prints one table and writes the same figures
to $COREBANK_STATE_DIR/reports/bench-<timestamp>.json.

Rows: pgbench; same-shard and cross-shard single Transfer calls; transfers
through CreateTransfers (counted per transfer, not per call); flash-sale
payments to one collect_on_every_shard merchant and the same load spread
uniformly over many merchants (their ratio is printed); and single same-shard
Transfer latency in an open loop at half the same-shard peak rate. Absolute numbers move
with the machine's mood; the ratios within one run are what to compare.
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

from loadtest.cluster import Cluster, ShardEndpoint, load_cluster
from loadtest.driver import OPEN_LOOP_IN_FLIGHT_MAX_DEFAULT, ScenarioResult, run_open_loop, run_scenario
from loadtest.pgbench_baseline import run_pgbench_baseline
from loadtest.scenarios import (
    BATCH_SIZE_DEFAULT,
    SCENARIO_PREPARERS,
    UNIFORM_MERCHANT_COUNT_DEFAULT,
    PrepareOptions,
    SameShardTransfers,
)

PGBENCH_SCENARIO = "pgbench_tpcb"
HALF_PEAK_SCENARIO = "corebank_latency_half_peak"
FLASH_SALE_SCENARIO, UNIFORM_SCENARIO = "corebank_flash_sale", "corebank_uniform"
ALL_SCENARIOS = [PGBENCH_SCENARIO, *SCENARIO_PREPARERS, HALF_PEAK_SCENARIO]
CLIENTS_DEFAULT = 16
# Seven phases of (warm-up + measured) seconds, plus set-up: about 4 minutes in all.
SECONDS_DEFAULT = 15
WARMUP_SECONDS_DEFAULT = 5
CUSTOMERS_DEFAULT = 2000
# Concurrent CreateTransfers callers: each call already carries a batch.
BATCH_CLIENTS_DEFAULT = 4
REPORTS_FOLDER = "reports"
# Goals of issue 4, printed beside the figures.
GOAL_FLASH_OVER_UNIFORM = 0.9
GOAL_HALF_PEAK_LATENCY_MS_P99 = 50.0


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
        "--batch-cross-shard-share", type=float, default=0.0, help="share of CreateTransfers' transfers between shards"
    )
    parser.add_argument(
        "--uniform-merchants", type=int, default=UNIFORM_MERCHANT_COUNT_DEFAULT, help="merchants of the uniform phase"
    )
    parser.add_argument(
        "--half-peak-rate", type=float, default=None,
        help="arrivals per second of the latency phase (default: half the same-shard TPS of this run)",
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
    unknown = set(arguments.scenarios.split(",")) - set(ALL_SCENARIOS)
    if unknown:
        parser.error(f"unknown scenarios: {', '.join(sorted(unknown))}")
    return arguments


def watched_pids(cluster: Cluster) -> dict[str, int]:
    """The cluster's own processes by name (grpc-0, etcd, shard-0, ...), from cluster.json."""
    return {process["name"]: process["pid"] for process in cluster.raw.get("processes", []) if process.get("pid")}


def checkpoint(shard: ShardEndpoint) -> None:
    """Flush dirty pages first, so no phase pays for the previous phase's checkpoint."""
    with psycopg.connect(shard.superuser_conninfo("postgres"), autocommit=True) as connection:
        connection.execute("CHECKPOINT")


def run_all(arguments: argparse.Namespace, cluster: Cluster) -> list[ScenarioResult]:
    shard = cluster.shard(arguments.shard) if arguments.shard else cluster.shards[0]
    wanted = arguments.scenarios.split(",")
    pids = watched_pids(cluster)
    results = []
    if PGBENCH_SCENARIO in wanted:
        print(f"[bench] {PGBENCH_SCENARIO}: pgbench -s {arguments.clients} on {shard.name}", file=sys.stderr)
        checkpoint(shard)
        results.append(
            run_pgbench_baseline(shard, arguments.clients, arguments.seconds, arguments.warmup_seconds, pids)
        )
    for name, prepare in SCENARIO_PREPARERS.items():
        if name not in wanted:
            continue
        print(f"[bench] {name}: preparing accounts", file=sys.stderr)
        options = PrepareOptions(
            arguments.customers, shard.name, arguments.batch_size, arguments.batch_cross_shard_share,
            arguments.uniform_merchants,
        )  # fmt: skip
        scenario = asyncio.run(prepare(cluster, options))
        checkpoint(shard)
        clients = arguments.batch_clients if name == "corebank_create_transfers" else arguments.clients
        print(f"[bench] {name}: {clients} clients in {arguments.client_processes} process(es)", file=sys.stderr)
        results.append(
            run_scenario(
                scenario,
                cluster.grpc_endpoint,
                clients=clients,
                seconds=arguments.seconds,
                warmup_seconds=arguments.warmup_seconds,
                client_processes=arguments.client_processes,
                watched_pid_by_name=pids,
            )
        )
    if HALF_PEAK_SCENARIO in wanted:
        result = run_half_peak(arguments, cluster, shard, results, pids)
        if result is not None:
            results.append(result)
    return results


def run_half_peak(
    arguments: argparse.Namespace, cluster: Cluster, shard: ShardEndpoint, results: list[ScenarioResult], pids
) -> ScenarioResult | None:
    """Same-shard single transfers, open loop, at half the same-shard peak measured in this run."""
    rate = arguments.half_peak_rate
    if rate is None:
        peak = next((r for r in results if r.scenario == SameShardTransfers.name), None)
        if peak is None or not peak.transactions_per_second:
            print(f"[bench] {HALF_PEAK_SCENARIO}: skipped (needs {SameShardTransfers.name} or --half-peak-rate)",
                  file=sys.stderr)  # fmt: skip
            return None
        rate = peak.transactions_per_second / 2
    scenario = asyncio.run(SCENARIO_PREPARERS[SameShardTransfers.name](cluster, PrepareOptions(arguments.customers, shard.name)))
    scenario = dataclasses.replace(scenario, name=HALF_PEAK_SCENARIO)
    checkpoint(shard)
    print(f"[bench] {HALF_PEAK_SCENARIO}: open loop at {rate:.0f}/s", file=sys.stderr)
    return run_open_loop(
        scenario, cluster.grpc_endpoint, rate, arguments.seconds, arguments.warmup_seconds,
        in_flight_max=arguments.half_peak_in_flight_max, watched_pid_by_name=pids,
    )  # fmt: skip


def _figure(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def ratio_to_pgbench(result: ScenarioResult, results: list[ScenarioResult]) -> float | None:
    baseline = next((r for r in results if r.scenario == PGBENCH_SCENARIO), None)
    if baseline is None or not baseline.transactions_per_second:
        return None
    return result.transactions_per_second / baseline.transactions_per_second


def format_table(results: list[ScenarioResult]) -> str:
    header = (
        f"{'scenario':<27} {'clients':>7} {'TPS':>9} {'vs pgbench':>10} {'p50 ms':>8} {'p99 ms':>8} "
        f"{'errors':>7} {'client CPU%':>11} {'machine CPU%':>12}"
    )
    lines = [header, "-" * len(header)]
    for result in results:
        ratio = ratio_to_pgbench(result, results)
        lines.append(
            f"{result.scenario:<27} {result.clients:>7} {result.transactions_per_second:>9.1f} "
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
    lines += summary_lines(results)
    lines.append(
        "client CPU% is the load generator's CPU (pgbench, or the gRPC client processes) in % of one core; "
        f"machine CPU% is all {os.cpu_count()} cores."
    )
    return "\n".join(lines)


def summary(results: list[ScenarioResult]) -> dict:
    """The issue's goals: each figure against its target, computed from this run's rows."""
    by_name = {result.scenario: result for result in results}
    figures: dict = {}
    flash, uniform = by_name.get(FLASH_SALE_SCENARIO), by_name.get(UNIFORM_SCENARIO)
    if flash and uniform and uniform.transactions_per_second:
        figures["flash_sale_over_uniform"] = flash.transactions_per_second / uniform.transactions_per_second
    half_peak = by_name.get(HALF_PEAK_SCENARIO)
    if half_peak:
        figures["half_peak_rate_per_second"] = half_peak.notes.get("open_loop_rate_per_second")
        figures["half_peak_latency_ms_p50"] = half_peak.latency_ms_p50
        figures["half_peak_latency_ms_p99"] = half_peak.latency_ms_p99
    for name, goal in (("corebank_same_shard", 1.0), ("corebank_cross_shard", 0.5), ("corebank_create_transfers", 10.0)):
        if name in by_name:
            figures[f"{name}_ratio_to_pgbench"] = ratio_to_pgbench(by_name[name], results)
            figures[f"{name}_ratio_goal"] = goal
    return figures


def summary_lines(results: list[ScenarioResult]) -> list[str]:
    figures = summary(results)
    lines = []
    for name, goal in (("corebank_same_shard", 1.0), ("corebank_cross_shard", 0.5), ("corebank_create_transfers", 10.0)):
        ratio = figures.get(f"{name}_ratio_to_pgbench")
        if ratio is not None:
            lines.append(f"{name}: {ratio:.2f}x pgbench (goal >= {goal}x): {'met' if ratio >= goal else 'SHORT'}")
    if "flash_sale_over_uniform" in figures:
        ratio = figures["flash_sale_over_uniform"]
        lines.append(
            f"flash sale / uniform: {ratio:.2f} (goal >= {GOAL_FLASH_OVER_UNIFORM}): "
            f"{'met' if ratio >= GOAL_FLASH_OVER_UNIFORM else 'SHORT'}"
        )
    if "half_peak_latency_ms_p99" in figures:
        p99 = figures["half_peak_latency_ms_p99"]
        lines.append(
            f"latency at half peak ({figures['half_peak_rate_per_second']:.0f}/s open loop): p50 "
            f"{_figure(figures['half_peak_latency_ms_p50'], 1)} ms, p99 {_figure(p99, 1)} ms "
            f"(goal p99 < {GOAL_HALF_PEAK_LATENCY_MS_P99:.0f} ms): "
            f"{'met' if p99 is not None and p99 < GOAL_HALF_PEAK_LATENCY_MS_P99 else 'SHORT'}"
        )
    return lines


def write_report(cluster: Cluster, arguments: argparse.Namespace, results: list[ScenarioResult]) -> str:
    folder = cluster.state_dir / REPORTS_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    rows = []
    for result in results:
        row = dataclasses.asdict(result)
        row["error_count"] = result.error_count
        row["ratio_to_pgbench"] = ratio_to_pgbench(result, results)
        rows.append(row)
    report = {
        "started_at": now.isoformat(),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "options": vars(arguments),
        "grpc_endpoint": cluster.grpc_endpoint,
        "results": rows,
        "summary": summary(results),
    }
    path = folder / f"bench-{now.strftime('%Y%m%dT%H%M%SZ')}.json"
    path.write_text(json.dumps(report, indent=1) + "\n")
    return str(path)


def main(argv: list[str] | None = None) -> int:
    arguments = parse_arguments(argv)
    cluster = load_cluster()
    results = run_all(arguments, cluster)
    print(format_table(results))
    print(f"report: {write_report(cluster, arguments, results)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
