"""The capacity model (issue 8), computed from measured costs, not assumed.

    python -m loadtest.capacity [--bench FILE] [--scaling FILE] [--peak 256000]

Reads the newest bench and scaling reports under $COREBANK_STATE_DIR/reports/ (or the
files given), and prints:
1. the check: the throughput the costs predict for each scaling run on this machine
   (its cores divided by the CPU one transfer costs, load generator included, since
   everything shares the cores here), beside the throughput measured;
2. what one gRPC worker core, one shard core and one coordinator sustain, per path;
3. what a peak of `--peak` payments/s would need of each, with the assumptions printed.

The model is CPU-bound on purpose: on this machine every run saturates the cores
(machine CPU 90-100%), and the commit/fsync cost is shared by group commit.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import pathlib
import sys

from loadtest.cluster import state_dir_from_environment

ALIPAY_2017_PEAK_PAYMENTS_PER_SECOND = 256_000
# A core is planned at this share of its time, leaving room for spikes, GC and failover.
PLANNED_CORE_UTILISATION = 0.6
# A production shard host: cores for PostgreSQL on one primary (its replicas need as many again).
SHARD_HOST_CORES = 16
# Below this, a coordinator's CPU per transfer is its idle scanning, not work per transfer:
# in steady state the gRPC workers drive every transfer, and coordinators only take over.
COORDINATOR_IDLE_MS = 0.1
# Paths of a payment at peak, each a row of the bench.
PATHS = {
    "Transfer, uniform pairs": "corebank_uniform_pairs",
    "Transfer, between shards": "corebank_cross_shard",
    "CreateTransfers, uniform pairs": "corebank_create_transfers_uniform",
}


@dataclasses.dataclass(frozen=True)
class Costs:
    """CPU ms of one transfer, by component, as the bench measured them."""

    service_ms: float
    coordinator_ms: float
    database_ms: float
    client_ms: float

    @property
    def total_ms(self) -> float:
        return self.service_ms + self.coordinator_ms + self.database_ms + self.client_ms


def costs_of(row: dict) -> Costs | None:
    split = row.get("cost_per_transfer")
    tps = row.get("transactions_per_second") or 0.0
    if not split or not tps or split.get("service_cpu_ms") is None or split.get("database_cpu_ms") is None:
        return None
    client_ms = (row.get("client_cpu_percent") or 0.0) * 10.0 / tps  # % of a core over a second, per transfer
    return Costs(split["service_cpu_ms"], split.get("coordinator_cpu_ms") or 0.0, split["database_cpu_ms"], client_ms)


def predicted_tps(costs: Costs, cores: int) -> float:
    """Throughput when every core is busy and a transfer costs what was measured."""
    return cores * 1000.0 / costs.total_ms


def per_core(ms: float) -> float:
    return math.inf if ms <= 0 else 1000.0 / ms


def needed_cores(peak: float, ms: float) -> float:
    return peak * ms / 1000.0 / PLANNED_CORE_UTILISATION


def newest(folder: pathlib.Path, prefix: str) -> pathlib.Path | None:
    reports = sorted(folder.glob(f"{prefix}-*.json"))
    return reports[-1] if reports else None


def report_lines(bench: dict | None, scaling: dict | None, peak: float) -> list[str]:
    cores = ((bench or scaling or {}).get("machine") or {}).get("cpus") or os.cpu_count()
    lines = []
    if scaling:
        lines.append(f"1. The model against the scaling runs ({cores} cores, everything on them):")
        lines.append(f"   {'shards':>6} {'scenario':<36} {'measured TPS':>12} {'predicted':>10} {'ratio':>6}")
        for run in scaling.get("runs", []):
            for row in run.get("results", []):
                costs = costs_of(row)
                if costs is None:
                    continue
                predicted = predicted_tps(costs, cores)
                measured = row["transactions_per_second"]
                lines.append(f"   {run['shards']:>6} {row['scenario']:<36} {measured:>12.0f} {predicted:>10.0f} {measured / predicted:>6.2f}")
    rows = {row["scenario"]: row for row in (bench or {}).get("results", [])}
    lines.append("2. What one core of each sustains, transfers/s (from the bench's cost per transfer):")
    lines.append(f"   {'path':<34} {'gRPC worker':>11} {'shard (all shards)':>18} {'coordinator':>11}")
    sized = []
    for label, scenario in PATHS.items():
        costs = costs_of(rows[scenario]) if scenario in rows else None
        if costs is None:
            continue
        sized.append((label, costs))
        coordinator = "idle" if costs.coordinator_ms < COORDINATOR_IDLE_MS else f"{per_core(costs.coordinator_ms):.0f}"
        lines.append(f"   {label:<34} {per_core(costs.service_ms):>11.0f} {per_core(costs.database_ms):>18.0f} {coordinator:>11}")
    lines.append(
        f"3. A peak of {peak:,.0f} payments/s, every one on the path named, cores planned at"
        f" {PLANNED_CORE_UTILISATION:.0%}, shard hosts of {SHARD_HOST_CORES} cores (primaries; replicas as many again):"
    )
    lines.append(f"   {'path':<34} {'worker cores':>12} {'database cores':>14} {'shards':>7}")
    for label, costs in sized:
        database_cores = needed_cores(peak, costs.database_ms)
        lines.append(
            f"   {label:<34} {needed_cores(peak, costs.service_ms):>12.0f} {database_cores:>14.0f}"
            f" {math.ceil(database_cores / SHARD_HOST_CORES):>7}"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.capacity", description=__doc__.split("\n\n")[0])
    parser.add_argument("--bench", type=pathlib.Path, default=None, help="a bench report (default: the newest)")
    parser.add_argument("--scaling", type=pathlib.Path, default=None, help="a scaling report (default: the newest)")
    parser.add_argument("--peak", type=float, default=ALIPAY_2017_PEAK_PAYMENTS_PER_SECOND, help="payments per second to size for")
    arguments = parser.parse_args(argv)
    folder = state_dir_from_environment() / "reports"
    bench_path = arguments.bench or newest(folder, "bench")
    scaling_path = arguments.scaling or newest(folder, "scaling")
    if bench_path is None and scaling_path is None:
        print(f"no bench or scaling report under {folder}: run make bench first", file=sys.stderr)
        return 1
    bench = json.loads(bench_path.read_text()) if bench_path else None
    scaling = json.loads(scaling_path.read_text()) if scaling_path else None
    print(f"bench: {bench_path}\nscaling: {scaling_path}")
    print("\n".join(report_lines(bench, scaling, arguments.peak)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
