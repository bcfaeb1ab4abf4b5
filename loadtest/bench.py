"""corebank against pgbench on the same PostgreSQL, same machine, same concurrency.

    python -m loadtest.bench [--clients 16] [--seconds 20] [--warmup-seconds 5]

Reads the cluster from $COREBANK_STATE_DIR/cluster.json (make up writes it),
runs the pgbench TPC-B-like baseline on the chosen shard's server, then each
corebank scenario through gRPC, prints one table and writes the same figures
to $COREBANK_STATE_DIR/reports/bench-<timestamp>.json. Absolute numbers move
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
from loadtest.driver import ScenarioResult, run_scenario
from loadtest.pgbench_baseline import run_pgbench_baseline
from loadtest.scenarios import SCENARIO_PREPARERS, PrepareOptions

PGBENCH_SCENARIO = "pgbench_tpcb"
CLIENTS_DEFAULT = 16
SECONDS_DEFAULT = 20
WARMUP_SECONDS_DEFAULT = 5
CUSTOMERS_DEFAULT = 2000
REPORTS_FOLDER = "reports"


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
    parser.add_argument(
        "--scenarios",
        default=",".join([PGBENCH_SCENARIO, *SCENARIO_PREPARERS]),
        help=f"comma-separated, from: {', '.join([PGBENCH_SCENARIO, *SCENARIO_PREPARERS])}",
    )
    arguments = parser.parse_args(argv)
    if arguments.clients < 1 or arguments.seconds < 1 or arguments.warmup_seconds < 0:
        parser.error("--clients and --seconds must be positive, --warmup-seconds not negative")
    unknown = set(arguments.scenarios.split(",")) - {PGBENCH_SCENARIO, *SCENARIO_PREPARERS}
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
        scenario = asyncio.run(prepare(cluster, PrepareOptions(arguments.customers, shard.name)))
        checkpoint(shard)
        print(
            f"[bench] {name}: {arguments.clients} clients in {arguments.client_processes} process(es)", file=sys.stderr
        )
        results.append(
            run_scenario(
                scenario,
                cluster.grpc_endpoint,
                clients=arguments.clients,
                seconds=arguments.seconds,
                warmup_seconds=arguments.warmup_seconds,
                client_processes=arguments.client_processes,
                watched_pid_by_name=pids,
            )
        )
    return results


def _figure(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def ratio_to_pgbench(result: ScenarioResult, results: list[ScenarioResult]) -> float | None:
    baseline = next((r for r in results if r.scenario == PGBENCH_SCENARIO), None)
    if baseline is None or not baseline.transactions_per_second:
        return None
    return result.transactions_per_second / baseline.transactions_per_second


def format_table(results: list[ScenarioResult]) -> str:
    header = (
        f"{'scenario':<22} {'clients':>7} {'TPS':>9} {'vs pgbench':>10} {'p50 ms':>8} {'p99 ms':>8} "
        f"{'errors':>7} {'client CPU%':>11} {'machine CPU%':>12}"
    )
    lines = [header, "-" * len(header)]
    for result in results:
        ratio = ratio_to_pgbench(result, results)
        lines.append(
            f"{result.scenario:<22} {result.clients:>7} {result.transactions_per_second:>9.1f} "
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
    return "\n".join(lines)


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
