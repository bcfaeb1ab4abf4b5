"""The yardstick: pgbench's TPC-B-like script against a shard's own PostgreSQL.

Same server process, same fsync and WAL settings, same machine and the same
number of clients as the corebank scenarios, so the ratio between the two says
what the ledger's layers cost on top of the database they sit on.
"""

from __future__ import annotations

import os
import pathlib
import re
import resource
import shutil
import subprocess
import tempfile

import psycopg

from loadtest.cluster import ShardEndpoint
from loadtest.driver import CounterSampler, ScenarioResult, WindowMeter, latency_figures_ms

BASELINE_DATABASE = "pgbench_baseline"
# libpq ignores a passfile that others may read.
PASSFILE_MODE = 0o600
PGBENCH_THREADS = 2
# Scale 16 (1.6 M accounts rows) takes seconds to load; bound it in case the disk is slow.
PGBENCH_INIT_TIMEOUT_SECONDS = 900
# pgbench ends on its own after -T; this slack covers connection set-up and log writing.
PGBENCH_RUN_SLACK_SECONDS = 120

_TPS_PATTERN = re.compile(r"^tps = ([0-9.]+) \(without initial connection time\)", re.MULTILINE)
_PROCESSED_PATTERN = re.compile(r"^number of transactions actually processed: (\d+)", re.MULTILINE)
_FAILED_PATTERN = re.compile(r"^number of failed transactions: (\d+)", re.MULTILINE)
_LATENCY_AVERAGE_PATTERN = re.compile(r"^latency average = ([0-9.]+) ms", re.MULTILINE)


def pgbench_executable() -> str:
    return shutil.which("pgbench") or "/usr/lib/postgresql/15/bin/pgbench"


def _connection_arguments(shard: ShardEndpoint) -> list[str]:
    """pgbench as the shard's owner role over TCP 127.0.0.1, as the service connects (not the socket)."""
    fields = psycopg.conninfo.conninfo_to_dict(shard.owner_dsn)
    return ["-h", str(fields["host"]), "-p", str(fields["port"]), "-U", str(fields["user"])]


def _environment(shard: ShardEndpoint) -> dict[str, str]:
    """pgbench's environment: a passfile of the owner's password for pgbench's own database
    (the cluster's passfile names the ledger's database only), beside it and 0600 like it."""
    passfile = psycopg.conninfo.conninfo_to_dict(shard.owner_dsn).get("passfile")
    if not passfile:
        return dict(os.environ)
    cluster_passfile = pathlib.Path(passfile)
    baseline_passfile = cluster_passfile.with_name(f"{BASELINE_DATABASE}.pgpass")
    lines = []
    for line in cluster_passfile.read_text().splitlines():
        host, port, _, user, password = line.split(":", 4)
        lines.append(":".join((host, port, BASELINE_DATABASE, user, password)))
    descriptor = os.open(baseline_passfile, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, PASSFILE_MODE)
    with os.fdopen(descriptor, "w") as file:
        file.write("\n".join(lines) + "\n")
    return {**os.environ, "PGPASSFILE": str(baseline_passfile)}


def ensure_database(shard: ShardEndpoint) -> None:
    owner = psycopg.conninfo.conninfo_to_dict(shard.owner_dsn)["user"]
    with psycopg.connect(shard.superuser_conninfo("postgres"), autocommit=True) as connection:
        exists = connection.execute("SELECT 1 FROM pg_database WHERE datname = %s", (BASELINE_DATABASE,)).fetchone()
        if exists is None:
            connection.execute(f'CREATE DATABASE "{BASELINE_DATABASE}" OWNER "{owner}"')  # nosec B608  # names of ours
        else:
            connection.execute(f'ALTER DATABASE "{BASELINE_DATABASE}" OWNER TO "{owner}"')  # nosec B608  # names of ours
    with psycopg.connect(shard.superuser_conninfo(BASELINE_DATABASE), autocommit=True) as connection:
        connection.execute(f'ALTER SCHEMA public OWNER TO "{owner}"')  # nosec B608  # names of ours


def initialise(shard: ShardEndpoint, scale: int) -> None:
    """Drop and reload pgbench's tables, so every run starts from the same data."""
    subprocess.run(
        [pgbench_executable(), "-i", "-q", "-s", str(scale), *_connection_arguments(shard), BASELINE_DATABASE],
        check=True,
        capture_output=True,
        text=True,
        timeout=PGBENCH_INIT_TIMEOUT_SECONDS,
        env=_environment(shard),
    )


def _run(
    shard: ShardEndpoint, clients: int, seconds: int, log_prefix: pathlib.Path | None
) -> subprocess.CompletedProcess:
    arguments = [
        pgbench_executable(),
        "-c", str(clients),
        "-j", str(min(PGBENCH_THREADS, clients)),
        "-T", str(seconds),
        "-M", "prepared",
        "-n",  # no vacuum before the run: -i has just vacuumed
        *_connection_arguments(shard),
    ]  # fmt: skip
    if log_prefix is not None:
        # Per-transaction log: the only way to get pgbench's p50 and p99.
        arguments += ["-l", f"--log-prefix={log_prefix}"]
    return subprocess.run(
        [*arguments, BASELINE_DATABASE],
        check=False,  # exit 2 (some clients aborted) still carries figures; the caller decides
        capture_output=True,
        text=True,
        timeout=seconds + PGBENCH_RUN_SLACK_SECONDS,
        env=_environment(shard),
    )


def _latencies_seconds(log_directory: pathlib.Path) -> list[float]:
    """Transaction times from pgbench -l files: `client txno time_us script epoch epoch_us`."""
    latencies = []
    for log_path in log_directory.glob("pgbench_log*"):
        for line in log_path.read_text().splitlines():
            fields = line.split()
            if len(fields) >= 3 and fields[2].isdigit():
                latencies.append(int(fields[2]) / 1_000_000)
    return latencies


def run_pgbench_baseline(
    shard: ShardEndpoint,
    clients: int,
    seconds: int,
    warmup_seconds: int,
    watched_pid_by_name: dict[str, int] | None = None,
    counters: CounterSampler | None = None,
) -> ScenarioResult:
    ensure_database(shard)
    # Scale = clients: one branches row per client, so the hot branch row does not dominate.
    initialise(shard, scale=clients)
    if warmup_seconds > 0:
        _run(shard, clients, warmup_seconds, log_prefix=None)

    meter = WindowMeter(watched_pid_by_name, counters)
    with tempfile.TemporaryDirectory(prefix="pgbench-log-") as log_directory:
        children_before = resource.getrusage(resource.RUSAGE_CHILDREN)
        meter.start()
        completed = _run(shard, clients, seconds, log_prefix=pathlib.Path(log_directory) / "pgbench_log")
        figures = meter.stop()
        children_after = resource.getrusage(resource.RUSAGE_CHILDREN)
        latencies = _latencies_seconds(pathlib.Path(log_directory))

    output = completed.stdout
    tps_match = _TPS_PATTERN.search(output)
    if completed.returncode not in (0, 2) or tps_match is None:
        raise RuntimeError(f"pgbench failed (exit {completed.returncode}):\n{completed.stdout}\n{completed.stderr}")
    errors: dict[str, int] = {}
    failed_match = _FAILED_PATTERN.search(output)
    if failed_match and int(failed_match.group(1)) > 0:
        errors["FAILED_TRANSACTIONS"] = int(failed_match.group(1))
    if completed.returncode == 2:
        # Exit 2: some clients aborted on an error; the run still reports what it did.
        errors["CLIENT_ABORTED"] = completed.stderr.count("aborted")

    processed_match = _PROCESSED_PATTERN.search(output)
    latency_average_match = _LATENCY_AVERAGE_PATTERN.search(output)
    p50, p99, mean = latency_figures_ms(latencies)
    pgbench_cpu_seconds = (children_after.ru_utime - children_before.ru_utime) + (
        children_after.ru_stime - children_before.ru_stime
    )
    return ScenarioResult(
        scenario="pgbench_tpcb",
        clients=clients,
        seconds=seconds,
        ok_count=int(processed_match.group(1)) if processed_match else len(latencies),
        transactions_per_second=float(tps_match.group(1)),
        latency_ms_p50=p50,
        latency_ms_p99=p99,
        latency_ms_mean=float(latency_average_match.group(1)) if latency_average_match else mean,
        error_count_by_code=errors,
        client_processes=1,
        client_cpu_percent=100.0 * pgbench_cpu_seconds / seconds,
        machine_cpu_percent=figures.machine_cpu_percent,
        process_cpu_percent=figures.process_cpu_percent,
        process_cpu_seconds=figures.process_cpu_seconds,
        counter_deltas=figures.counter_deltas,
        notes={"scale": clients, "threads": min(PGBENCH_THREADS, clients), "database": BASELINE_DATABASE},
    )
