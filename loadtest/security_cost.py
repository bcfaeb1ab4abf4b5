"""What mTLS and token checks cost (issue 9: under 10%).

    python -m loadtest.security_cost [--clients 16] [--seconds 10] [--warmup-seconds 3] [--rounds 2]

Against the running cluster ($COREBANK_STATE_DIR/cluster.json), as many extra
service workers as the cluster has are started on a port of their own with
`--insecure-benchmark-baseline` (plaintext, no token: services/server.py), beside
the cluster's own workers. Then single Transfer calls between customers of one
shard (the call with the least work per message, so the one where per-call costs
weigh most) run against the cluster's workers over mTLS with a service token, and
against the baseline workers, in alternating order for --rounds rounds. Each run
measures throughput and the serving workers' CPU per transfer; the cost is their
ratio, secure over baseline, both figures from the same machine in the same minute.
Authorisation (ownership lookups, rate limits) runs in both: what differs is TLS
and the token check. The report goes to the state folder's reports/.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime
import json
import os
import pathlib
import socket
import statistics
import subprocess
import sys
import time

import grpc

from loadtest.bench import checkpoint, machine, prepare_options, REPORTS_FOLDER
from loadtest.cluster import Cluster, load_cluster
from loadtest.driver import ScenarioResult, run_scenario
from loadtest.scenarios import prepare_same_shard_transfers
from services.auth.client import Target

CLIENTS_DEFAULT = 16
SECONDS_DEFAULT = 10
WARMUP_SECONDS_DEFAULT = 3
ROUNDS_DEFAULT = 2
CUSTOMERS_DEFAULT = 2000
BASELINE_READY_TIMEOUT_SECONDS = 60
# Issue 9's bound on what TLS and token checks may cost.
COST_GOAL_PERCENT = 10.0
SECURE, BASELINE = "secure", "baseline"
REPO_DIR = pathlib.Path(__file__).resolve().parent.parent


@dataclasses.dataclass(frozen=True)
class PlaintextTarget(Target):
    """The baseline workers: plaintext and no token (they ask for neither)."""

    def channel(self, *, aio: bool = False, options: list | tuple = ()):
        if aio:
            return grpc.aio.insecure_channel(self.address, options=list(options))
        return grpc.insecure_channel(self.address, options=list(options))


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_baseline_workers(cluster: Cluster, count: int) -> tuple[PlaintextTarget, dict[str, subprocess.Popen]]:
    port = _free_port()
    address = f"127.0.0.1:{port}"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_DIR), str(REPO_DIR / "protos" / "python")])}
    logs = cluster.state_dir / "logs"
    workers = {}
    for index in range(count):
        name = f"baseline-{index}"
        with open(logs / f"{name}.log", "ab") as log_file:
            workers[name] = subprocess.Popen(
                [sys.executable, "-m", "services.server", "--listen", address, "--metrics-listen", f"127.0.0.1:{_free_port()}",
                 "--etcd", cluster.etcd_endpoint, "--process-name", name, "--insecure-benchmark-baseline"],
                env=env, cwd=REPO_DIR, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
    target = PlaintextTarget(address, "", "", "", None)
    with target.channel() as channel:
        grpc.channel_ready_future(channel).result(timeout=BASELINE_READY_TIMEOUT_SECONDS)
    time.sleep(1)  # the other workers finish starting too (the port is shared)
    return target, workers


def stop(workers: dict[str, subprocess.Popen]) -> None:
    for process in workers.values():
        process.terminate()
    for process in workers.values():
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()


def cpu_ms_per_transfer(result: ScenarioResult, names: list[str]) -> float | None:
    if not result.ok_count:
        return None
    return 1000 * sum(result.process_cpu_seconds.get(name, 0.0) for name in names) / result.ok_count


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=CLIENTS_DEFAULT)
    parser.add_argument("--seconds", type=int, default=SECONDS_DEFAULT)
    parser.add_argument("--warmup-seconds", type=int, default=WARMUP_SECONDS_DEFAULT)
    parser.add_argument("--rounds", type=int, default=ROUNDS_DEFAULT)
    parser.add_argument("--customers", type=int, default=CUSTOMERS_DEFAULT)
    arguments = parser.parse_args(argv)

    cluster = load_cluster()
    secure_workers = {p["name"]: p["pid"] for p in cluster.raw["processes"] if p["role"] == "grpc" and p.get("pid")}
    shard = cluster.shards[0]
    options = argparse.Namespace(
        customers=arguments.customers, batch_size=1, batch_cross_shard_share=0.0, uniform_merchants=1, pair_accounts=2
    )
    scenario = asyncio.run(prepare_same_shard_transfers(cluster, prepare_options(options, shard)))
    baseline_target, baseline_processes = start_baseline_workers(cluster, len(secure_workers))
    runs: dict[str, list[ScenarioResult]] = {SECURE: [], BASELINE: []}
    names = {SECURE: list(secure_workers), BASELINE: list(baseline_processes)}
    try:
        targets = {SECURE: cluster.traffic_target(), BASELINE: baseline_target}
        pids = {SECURE: secure_workers, BASELINE: {name: p.pid for name, p in baseline_processes.items()}}
        for round_number in range(arguments.rounds):
            order = (SECURE, BASELINE) if round_number % 2 == 0 else (BASELINE, SECURE)
            for kind in order:
                checkpoint(cluster)
                print(f"[security-cost] round {round_number + 1}: {kind}", file=sys.stderr)
                runs[kind].append(run_scenario(
                    # A run id of its own per run: transfer ids never repeat across runs.
                    dataclasses.replace(scenario, name=f"same_shard_{kind}", run_id=f"{scenario.run_id}-{kind}-{round_number}"),
                    targets[kind], clients=arguments.clients,
                    seconds=arguments.seconds, warmup_seconds=arguments.warmup_seconds, watched_pid_by_name=pids[kind],
                ))  # fmt: skip
    finally:
        stop(baseline_processes)

    figures = {}
    for kind in (SECURE, BASELINE):
        figures[kind] = {
            "transfers_per_second": statistics.median(r.transactions_per_second for r in runs[kind]),
            "worker_cpu_ms_per_transfer": statistics.median(
                c for c in (cpu_ms_per_transfer(r, names[kind]) for r in runs[kind]) if c is not None
            ),
            "errors": sum(r.error_count for r in runs[kind]),
        }
    throughput_cost = 100 * (1 - figures[SECURE]["transfers_per_second"] / figures[BASELINE]["transfers_per_second"])
    cpu_cost = 100 * (figures[SECURE]["worker_cpu_ms_per_transfer"] / figures[BASELINE]["worker_cpu_ms_per_transfer"] - 1)
    print(f"{'':<10} {'transfers/s':>12} {'worker CPU ms/transfer':>23} {'errors':>7}")
    for kind in (SECURE, BASELINE):
        f = figures[kind]
        print(f"{kind:<10} {f['transfers_per_second']:>12.0f} {f['worker_cpu_ms_per_transfer']:>23.3f} {f['errors']:>7}")
    met = max(throughput_cost, cpu_cost) < COST_GOAL_PERCENT
    print(
        f"mTLS + token cost: {throughput_cost:+.1f}% throughput, {cpu_cost:+.1f}% worker CPU per transfer "
        f"(medians of {arguments.rounds} alternating rounds; goal < {COST_GOAL_PERCENT:g}%: {'met' if met else 'NOT met'})"
    )
    folder = cluster.state_dir / REPORTS_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    path = folder / f"security-cost-{now.strftime('%Y%m%dT%H%M%SZ')}.json"
    path.write_text(json.dumps({
        "started_at": now.isoformat(), "machine": machine(), "options": vars(arguments), "figures": figures,
        "throughput_cost_percent": throughput_cost, "cpu_cost_percent": cpu_cost, "goal_percent": COST_GOAL_PERCENT, "met": met,
        "runs": {kind: [dataclasses.asdict(r) for r in results] for kind, results in runs.items()},
    }, indent=1) + "\n")  # fmt: skip
    print(f"report: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
