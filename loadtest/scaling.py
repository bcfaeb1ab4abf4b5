"""Throughput and the cost of a transfer on 1, 2 and 3 shards, at a fixed load (issue 8).

    python -m loadtest.scaling [--shard-counts 1,2,3] [--seconds 10] [--warmup-seconds 3]
                               [--port-base 18100] [--work-dir DIR]

For each shard count N, starts a cluster of its own (`python -m deploy.cluster up` with
COREBANK_STATE_DIR=<work dir>/shards-N, SHARDS=N and a port base of its own), runs the
bench's uniform-pairs rows against it (single Transfer calls, 16 clients; CreateTransfers
of 1,000 pairs, 4 clients; the same 200 funded accounts spread over all N shards), and
removes it again (`clean`). The load is the same for every N, so what changes with N is
the share of pairs between shards ((N - 1) / N) and the hardware the shards share: on one
machine, more shards add processes, not cores.

Prints TPS and the cost split per shard count, and writes them as JSON to
$COREBANK_STATE_DIR/reports/scaling-<timestamp>.json. The main cluster (make up) is not
needed and not touched.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import subprocess
import sys

from loadtest import bench, costs
from loadtest.cluster import load_cluster, state_dir_from_environment
from loadtest.scenarios import CREATE_TRANSFERS_UNIFORM_SCENARIO, UniformPairTransfers

SCENARIOS = (UniformPairTransfers.name, CREATE_TRANSFERS_UNIFORM_SCENARIO)
SHARD_COUNTS_DEFAULT = "1,2,3"
# Three clusters of two rows each, plus start and set-up: about 2 minutes in all.
SECONDS_DEFAULT = 10
WARMUP_SECONDS_DEFAULT = 3
# Away from make up's 7100, the tests' 17100 and chaos's 17700.
PORT_BASE_DEFAULT = 18100
# Each cluster's port plan spans its base to base + 100 + shards (deploy.cluster): bases this
# far apart never overlap, so a cluster left over from a failed run cannot take another's ports.
PORT_BASE_STEP = 200
SCALING_FOLDER = "scaling"
# `up` waits for initdb, etcd and the workers (its own lock alone may wait 300 s); `clean` stops them.
CLUSTER_COMMAND_TIMEOUT_SECONDS = 600


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m loadtest.scaling", description=__doc__.split("\n\n")[0])
    parser.add_argument("--shard-counts", default=SHARD_COUNTS_DEFAULT, help="comma-separated, e.g. 1,2,3")
    parser.add_argument("--seconds", type=int, default=SECONDS_DEFAULT, help="measured seconds per row")
    parser.add_argument("--warmup-seconds", type=int, default=WARMUP_SECONDS_DEFAULT, help="unmeasured seconds first")
    parser.add_argument("--clients", type=int, default=bench.CLIENTS_DEFAULT, help="Transfer callers")
    parser.add_argument(
        "--batch-clients", type=int, default=bench.BATCH_CLIENTS_DEFAULT, help="CreateTransfers callers"
    )
    parser.add_argument(
        "--port-base", type=int, default=PORT_BASE_DEFAULT,
        help=f"port base of the first cluster; the next ones add {PORT_BASE_STEP} each",
    )  # fmt: skip
    parser.add_argument(
        "--work-dir", type=pathlib.Path, default=None,
        help=f"where the clusters' state folders go (default: $COREBANK_STATE_DIR/{SCALING_FOLDER})",
    )  # fmt: skip
    arguments = parser.parse_args(argv)
    try:
        arguments.shard_counts = [int(count) for count in arguments.shard_counts.split(",")]
    except ValueError:
        parser.error("--shard-counts is a comma-separated list of whole numbers")
    if not arguments.shard_counts or min(arguments.shard_counts) < 1:
        parser.error("--shard-counts must name at least one count, each at least 1")
    return arguments


def bench_arguments(arguments: argparse.Namespace) -> argparse.Namespace:
    """The bench's own options for the scaling rows, so that both measure the same way."""
    return bench.parse_arguments([
        "--scenarios", ",".join(SCENARIOS), "--seconds", str(arguments.seconds),
        "--warmup-seconds", str(arguments.warmup_seconds), "--clients", str(arguments.clients),
        "--batch-clients", str(arguments.batch_clients),
    ])  # fmt: skip


def cluster_command(command: str, state_dir: pathlib.Path, shard_count: int, port_base: int) -> None:
    """`python -m deploy.cluster <command>` for the cluster in `state_dir`; raises if it fails.

    Its output goes to stderr with the progress lines: stdout carries the table alone.
    """
    environment = {
        **os.environ, "COREBANK_STATE_DIR": str(state_dir), "SHARDS": str(shard_count),
        "COREBANK_PORT_BASE": str(port_base),
    }  # fmt: skip
    subprocess.run(
        [sys.executable, "-m", "deploy.cluster", command],
        env=environment, check=True, timeout=CLUSTER_COMMAND_TIMEOUT_SECONDS, stdout=sys.stderr,
    )  # fmt: skip


def measure(shard_count: int, state_dir: pathlib.Path, port_base: int, arguments: argparse.Namespace) -> dict:
    """Start a fresh cluster of `shard_count` shards, run the rows, remove the cluster."""
    print(f"[scaling] {shard_count} shard(s): cluster in {state_dir}, port base {port_base}", file=sys.stderr)
    # Whatever a failed earlier run left in this folder goes first: every count starts empty.
    cluster_command("clean", state_dir, shard_count, port_base)
    try:
        cluster_command("up", state_dir, shard_count, port_base)
        cluster = load_cluster(state_dir)
        results = bench.run_all(bench_arguments(arguments), cluster)
        return {
            "shards": shard_count,
            "port_base": port_base,
            "results": bench.report_rows(results, costs.role_by_process(cluster)),
        }
    finally:
        cluster_command("clean", state_dir, shard_count, port_base)


def format_table(runs: list[dict]) -> str:
    header = f"{'shards':>6} {'scenario':<34} {'TPS':>9} {'cross-shard':>11} {costs.COST_COLUMNS_HEADER}"
    lines = [header, "-" * len(header)]
    for run in runs:
        if "error" in run:
            lines.append(f"{run['shards']:>6} failed: {run['error']}")
            continue
        for row in run["results"]:
            split = row["cost_per_transfer"]
            cross_shard = row["notes"].get("cross_shard_share_expected")
            lines.append(
                f"{run['shards']:>6} {row['scenario']:<34} {row['transactions_per_second']:>9.1f} "
                f"{'-' if cross_shard is None else f'{cross_shard:.2f}':>11} "
                f"{costs.cost_cells(None if split is None else costs.CostSplit(**split))}"
            )
    lines.append(
        "cross-shard: the expected share of pairs between shards; costs per transfer as in make bench "
        "(CPU ms of the gRPC workers, the coordinators and PostgreSQL; commits; round trips)."
    )
    return "\n".join(lines)


def write_report(arguments: argparse.Namespace, runs: list[dict]) -> pathlib.Path:
    folder = state_dir_from_environment() / bench.REPORTS_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    options = {**vars(arguments), "work_dir": str(arguments.work_dir)}
    report = {"started_at": now.isoformat(), "machine": bench.machine(), "options": options, "runs": runs}
    path = folder / f"scaling-{now.strftime('%Y%m%dT%H%M%SZ')}.json"
    path.write_text(json.dumps(report, indent=1) + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    arguments = parse_arguments(argv)
    arguments.work_dir = (arguments.work_dir or state_dir_from_environment() / SCALING_FOLDER).absolute()
    arguments.work_dir.mkdir(parents=True, exist_ok=True)
    # PostgreSQL runs as its own user when we are root: it must be able to walk into the folder.
    arguments.work_dir.chmod(0o755)
    runs = []
    for index, shard_count in enumerate(arguments.shard_counts):
        state_dir = arguments.work_dir / f"shards-{shard_count}"
        port_base = arguments.port_base + index * PORT_BASE_STEP
        try:
            runs.append(measure(shard_count, state_dir, port_base, arguments))
        except (subprocess.SubprocessError, RuntimeError, OSError, SystemExit) as error:
            # One count failing (a port taken, a cluster that would not start) leaves the others' figures.
            print(f"[scaling] {shard_count} shard(s) failed: {error!r}", file=sys.stderr)
            runs.append({"shards": shard_count, "port_base": port_base, "error": repr(error)})
    print(format_table(runs))
    print(f"report: {write_report(arguments, runs)}")
    return 1 if any("error" in run for run in runs) else 0


if __name__ == "__main__":
    sys.exit(main())
