"""What mTLS and token checks cost (issue 9: under 10%).

    python -m loadtest.security_cost [--clients 16] [--seconds 10] [--warmup-seconds 3] [--rounds 2]

Against the running cluster ($COREBANK_STATE_DIR/cluster.json), as many extra
service workers as the cluster has are started, each on a loopback port of its own,
with `--plaintext-benchmark-baseline` (services/server.py: no TLS and no client
certificate, tokens still checked). Then single Transfer calls between customers of
one shard (the call with the least work per message, so the one where per-call
costs weigh most) run with the load's token (loadtest/cluster.py) against the
cluster's workers over mTLS, and against the baseline workers, in alternating order
for --rounds rounds. Each run measures throughput and the serving workers' CPU per
transfer; TLS's cost is their ratio, both figures from the same machine in the same
minutes. A third set of plaintext workers runs without the audit log (`--without-audit-log`),
so the same runs also say what the log costs (for reference: the goal is TLS and tokens). The token check runs on both sides: its cost per call is timed apart (a
remembered token; and a first sight, signature included) and set against the
workers' CPU per transfer. The report goes to the state folder's reports/.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime
import itertools
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time

import grpc

from deploy import processes
from loadtest.bench import REPORTS_FOLDER, checkpoint, machine, prepare_options
from loadtest.cluster import Cluster, load_cluster
from loadtest.driver import ScenarioResult, run_scenario
from loadtest.scenarios import prepare_same_shard_transfers
from services.auth import auth_dir
from services.auth.client import Target
from services.auth.tokens import TokenVerifier

CLIENTS_DEFAULT = 16
SECONDS_DEFAULT = 10
WARMUP_SECONDS_DEFAULT = 3
ROUNDS_DEFAULT = 2
CUSTOMERS_DEFAULT = 2000
BASELINE_READY_TIMEOUT_SECONDS = 60
# Issue 9's bound on what TLS and token checks may cost.
COST_GOAL_PERCENT = 10.0
# The three kinds of serving worker: the cluster's own; plaintext; plaintext without the audit log.
SECURE, BASELINE, UNAUDITED = "secure", "baseline", "unaudited"
KINDS = (SECURE, BASELINE, UNAUDITED)
BASELINE_FLAGS = {BASELINE: ["--plaintext-benchmark-baseline"], UNAUDITED: ["--plaintext-benchmark-baseline", "--without-audit-log"]}
TOKEN_CHECK_SAMPLES = 100_000
FIRST_SIGHT_SAMPLES = 200
REPO_DIR = pathlib.Path(__file__).resolve().parent.parent


# Which baseline worker the next channel goes to (per client process).
_next_worker = itertools.count()


@dataclasses.dataclass(frozen=True)
class PlaintextTarget(Target):
    """The baseline workers: gRPC's local (plaintext loopback) credentials, with the same token.
    Each worker has a port of its own, so channels take them in turn (SO_REUSEPORT spreads the
    cluster's connections over its workers the same way)."""

    addresses: tuple[str, ...] = ()

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.local_channel_credentials(grpc.LocalConnectionType.LOCAL_TCP)

    def channel(self, *, aio: bool = False, options: list | tuple = ()):
        address = self.addresses[next(_next_worker) % len(self.addresses)]
        return dataclasses.replace(self, address=address, addresses=(address,)).channel_to_address(aio, options)

    def channel_to_address(self, aio: bool, options: list | tuple):
        return super().channel(aio=aio, options=options)


def start_baseline_workers(
    cluster: Cluster, kind: str, count: int, token: str, workers: dict[str, subprocess.Popen]
) -> PlaintextTarget:
    """`count` baseline workers of `kind`, each on a loopback port of its own (no SO_REUSEPORT there),
    put into `workers` as they start (so the caller stops them whatever happens); their target."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_DIR), str(REPO_DIR / "protos" / "python")])}
    logs = cluster.state_dir / "logs"
    targets = []
    for index in range(count):
        name, address = f"{kind}-{index}", f"127.0.0.1:{processes.free_port()}"
        with open(logs / f"{name}.log", "ab") as log_file:
            workers[name] = subprocess.Popen(
                [sys.executable, "-m", "services.server", "--listen", address, "--metrics-listen", f"127.0.0.1:{processes.free_port()}",
                 "--etcd", cluster.etcd_endpoint, "--process-name", name, "--auth-dir", str(auth_dir(cluster.raw["state_dir"])),
                 *BASELINE_FLAGS[kind]],
                env=env, cwd=REPO_DIR, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        targets.append(PlaintextTarget(address, "", "", "", token, (address,)))
    for target in targets:
        with target.channel() as channel:
            grpc.channel_ready_future(channel).result(timeout=BASELINE_READY_TIMEOUT_SECONDS)
    return dataclasses.replace(targets[0], addresses=tuple(target.address for target in targets))


def stop(workers: dict[str, subprocess.Popen]) -> None:
    for process in workers.values():
        process.terminate()
    for process in workers.values():
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()


def token_check_microseconds(cluster: Cluster, token: str) -> tuple[float, float]:
    """What TokenVerifier.verify costs per call in this process: a token seen before (every call
    of a client after its first), and one seen for the first time (its signature checked)."""
    verifier = TokenVerifier(auth_dir(cluster.raw["state_dir"]))
    header = f"Bearer {token}"
    verifier.verify(header)
    started = time.perf_counter()
    for _ in range(TOKEN_CHECK_SAMPLES):
        verifier.verify(header)
    remembered = (time.perf_counter() - started) / TOKEN_CHECK_SAMPLES * 1e6
    started = time.perf_counter()
    for _ in range(FIRST_SIGHT_SAMPLES):
        TokenVerifier(auth_dir(cluster.raw["state_dir"])).verify(header)
    first_sight = (time.perf_counter() - started) / FIRST_SIGHT_SAMPLES * 1e6
    return remembered, first_sight


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
    traffic = cluster.traffic_target()
    processes: dict[str, dict[str, subprocess.Popen]] = {BASELINE: {}, UNAUDITED: {}}
    runs: dict[str, list[ScenarioResult]] = {kind: [] for kind in KINDS}
    try:
        targets = {SECURE: traffic}
        for kind in (BASELINE, UNAUDITED):
            targets[kind] = start_baseline_workers(cluster, kind, len(secure_workers), traffic.token, processes[kind])
        pids = {SECURE: secure_workers, **{kind: {n: p.pid for n, p in started.items()} for kind, started in processes.items()}}
        for round_number in range(arguments.rounds):
            # Each kind first, middle and last in turn.
            order = KINDS[round_number % len(KINDS):] + KINDS[:round_number % len(KINDS)]
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
        for started in processes.values():
            stop(started)
    names = {kind: list(pids[kind]) for kind in KINDS}

    figures = {}
    for kind in KINDS:
        figures[kind] = {
            "transfers_per_second": statistics.median(r.transactions_per_second for r in runs[kind]),
            "worker_cpu_ms_per_transfer": statistics.median(
                c for c in (cpu_ms_per_transfer(r, names[kind]) for r in runs[kind]) if c is not None
            ),
            "errors": sum(r.error_count for r in runs[kind]),
        }
    remembered_us, first_sight_us = token_check_microseconds(cluster, traffic.token)
    baseline_cpu_ms = figures[BASELINE]["worker_cpu_ms_per_transfer"]
    token_cost = 100 * (remembered_us / 1000) / (baseline_cpu_ms - remembered_us / 1000)
    tls_throughput_cost = 100 * (1 - figures[SECURE]["transfers_per_second"] / figures[BASELINE]["transfers_per_second"])
    tls_cpu_cost = 100 * (figures[SECURE]["worker_cpu_ms_per_transfer"] / baseline_cpu_ms - 1)
    throughput_cost, cpu_cost = tls_throughput_cost + token_cost, tls_cpu_cost + token_cost
    audit_throughput_cost = 100 * (1 - figures[BASELINE]["transfers_per_second"] / figures[UNAUDITED]["transfers_per_second"])
    audit_cpu_cost = 100 * (baseline_cpu_ms / figures[UNAUDITED]["worker_cpu_ms_per_transfer"] - 1)
    print(f"{'':<10} {'transfers/s':>12} {'worker CPU ms/transfer':>23} {'errors':>7}")
    for kind in KINDS:
        f = figures[kind]
        print(f"{kind:<10} {f['transfers_per_second']:>12.0f} {f['worker_cpu_ms_per_transfer']:>23.3f} {f['errors']:>7}")
    print(
        f"token check: {remembered_us:.1f} us per call for a token seen before, {first_sight_us:.0f} us the first time "
        f"({token_cost:.2f}% of a worker's CPU per transfer)"
    )
    print(f"audit log cost (for reference): {audit_throughput_cost:+.1f}% throughput, {audit_cpu_cost:+.1f}% worker CPU per transfer")
    met = max(throughput_cost, cpu_cost) < COST_GOAL_PERCENT
    print(
        f"mTLS + token cost: {throughput_cost:+.1f}% throughput, {cpu_cost:+.1f}% worker CPU per transfer "
        f"(TLS: medians of {arguments.rounds} alternating rounds; goal < {COST_GOAL_PERCENT:g}%: {'met' if met else 'NOT met'})"
    )
    folder = cluster.state_dir / REPORTS_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    path = folder / f"security-cost-{now.strftime('%Y%m%dT%H%M%SZ')}.json"
    path.write_text(json.dumps({
        "started_at": now.isoformat(), "machine": machine(), "options": vars(arguments), "figures": figures,
        "throughput_cost_percent": throughput_cost, "cpu_cost_percent": cpu_cost, "goal_percent": COST_GOAL_PERCENT, "met": met,
        "token_check_us": {"remembered": remembered_us, "first_sight": first_sight_us}, "token_cost_percent": token_cost,
        "audit_log_cost_percent": {"throughput": audit_throughput_cost, "worker_cpu": audit_cpu_cost},
        "runs": {kind: [dataclasses.asdict(r) for r in results] for kind, results in runs.items()},
    }, indent=1) + "\n")  # fmt: skip
    print(f"report: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
