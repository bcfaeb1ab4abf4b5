"""`make loadtest`: one locust scenario, headless, against the running cluster, then its verdict.

    SCENARIO=flash-sale USERS=200 DURATION=60s make loadtest
    WORKERS=2 make loadtest                                  one locust master and 2 worker processes
    .venv/bin/python -m loadtest.run --scenario everyday --users 50 --duration 30s

Makes a run folder, $COREBANK_STATE_DIR/reports/<scenario>-<time>/, with locust's report.html and
locust_*.csv, the run's setup.json, transfers.csv, merchant.csv and totals.json (loadtest/swarm.py),
and verdict.json: every check below, ok or not, with its figures. Prints where.

Exits 1 when a check fails:
- locust's figures, written once every user (on every worker) has stopped: at least one request,
  failure ratio <= MAX_FAILURE_RATIO, p99 <= MAX_P99_MS, no exception in the locustfile's own
  code, every worker's log in, one answered transfer in the log per transfer locust counted;
- the invariants, from the cluster's databases (loadtest.check).
Exits 2 when locust left nothing to judge (no transfer log).

Environment (or the matching --options): SCENARIO (flash-sale | everyday | batch | remittance), USERS (peak
users for flash-sale), RATE (users started per second; default USERS, i.e. all within a second),
DURATION (30s, 2m, 1m30s; excludes set-up), WORKERS (locust worker processes under one master;
0, the default, runs one process), HOST (the cluster, as locust's host: loadtest/swarm.py),
MAX_FAILURE_RATIO (default 0.01), MAX_P99_MS (default 500, the latency SLO's threshold; batch 5000). The scenarios' own
knobs (ACCOUNTS, CROSS_SHARD_SHARE, READ_SHARE, BATCH_SIZE, BASE_USERS, RAMP_SECONDS, and the
remittance's PARTICIPANTS, NET_DEBIT_CAP_MINOR, CLOSE_WINDOW_SECONDS, SETTLE_EVERY_CLOSES, ...) pass
through to the locustfile. Remittance: one of USERS is the settlement operator; refusals
NET_DEBIT_CAP_EXCEEDED are answers, not failures (locust counts them under their own name).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import re
import subprocess
import sys

from deploy.processes import free_port
from loadtest import swarm
from loadtest.check import Report, check_run, read_merchant_samples, read_transfers
from loadtest.swarm import SENT
from services.api.metrics import SLO_LATENCY_THRESHOLD_SECONDS

LOCUSTFILE = pathlib.Path(__file__).with_name("locustfile.py")
# Failed requests (RESOURCE_EXHAUSTED under overload, for example) up to 1% pass: a run past that
# is overloaded or broken, and says so. The p99 bound is the latency SLO's threshold (0.5 s), so a
# run that passes does not spend the latency budget faster than the SLO allows (the default flash
# sale, 100 users, measured 400 ms on the 2-core reference machine; everyday, 20 users, 260 ms;
# 300 users saturate it, 1.5 s). A batch call carries BATCH_SIZE (500) transfers: 5 s, half its
# timeout (CreateTransfers is outside the latency SLO).
MAX_FAILURE_RATIO_DEFAULT = 0.01
MAX_P99_MS_DEFAULT = SLO_LATENCY_THRESHOLD_SECONDS * 1000
MAX_P99_MS_DEFAULT_BY_SCENARIO = {
    "flash-sale": MAX_P99_MS_DEFAULT, "everyday": MAX_P99_MS_DEFAULT, "batch": 5000.0, "remittance": MAX_P99_MS_DEFAULT,
}  # fmt: skip
# Set-up (opening and funding thousands of accounts), locust's own start and stop and the
# workers' logs come on top of the duration; past this much more, the run is killed.
LOCUST_SLACK_SECONDS = 300
# Users finish the call they are in when the run stops, so fewer answers are lost.
STOP_TIMEOUT_SECONDS = 10
# How long the master waits for its workers to connect, and they for it to quit them.
WORKERS_CONNECT_SECONDS_MAX = 60
WORKERS_EXIT_SECONDS_MAX = 30
WORKERS_MAX = 64
# locust's exit codes: 0, or 1 when a request failed or the locustfile raised (judged by the checks).
LOCUST_EXIT_CODES_RAN = (0, 1)
_DURATION_PATTERN = re.compile(r"^(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s?)?$")


def duration_seconds(text: str) -> int:
    """Locust's -t format: 90, 90s, 2m, 1h30m, 1m30s."""
    match = _DURATION_PATTERN.match(text.strip())
    if not match or not any(match.groups()):
        raise argparse.ArgumentTypeError(f"duration {text!r}: use 90, 90s, 2m or 1m30s")
    hours, minutes, seconds = (int(group or 0) for group in match.groups())
    return hours * 3600 + minutes * 60 + seconds


@dataclasses.dataclass(frozen=True)
class Thresholds:
    max_failure_ratio: float
    max_p99_ms: float


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    environ = os.environ.get
    parser = argparse.ArgumentParser(prog="python -m loadtest.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenario", default=environ("SCENARIO") or "flash-sale", choices=swarm.SCENARIOS)
    parser.add_argument("--users", type=int, default=int(environ("USERS") or 100))
    parser.add_argument("--rate", type=float, default=float(environ("RATE") or 0) or None)
    parser.add_argument("--duration", type=duration_seconds, default=environ("DURATION") or "30s")
    parser.add_argument("--workers", type=int, default=int(environ("WORKERS") or 0))
    parser.add_argument("--host", default=environ("HOST") or "", help="the cluster, as locust's host (loadtest/swarm.py)")
    parser.add_argument("--max-failure-ratio", type=float, default=float(environ("MAX_FAILURE_RATIO") or MAX_FAILURE_RATIO_DEFAULT))
    parser.add_argument("--max-p99-ms", type=float, default=float(environ("MAX_P99_MS")) if environ("MAX_P99_MS") else None)
    arguments = parser.parse_args(argv)
    if isinstance(arguments.duration, str):
        arguments.duration = duration_seconds(arguments.duration)
    if arguments.users < 1 or arguments.duration < 1:
        parser.error("USERS and DURATION must be positive")
    if not 0 <= arguments.workers <= WORKERS_MAX:
        parser.error(f"WORKERS is 0..{WORKERS_MAX}")
    if arguments.max_p99_ms is None:
        arguments.max_p99_ms = MAX_P99_MS_DEFAULT_BY_SCENARIO[arguments.scenario]
    if not 0.0 <= arguments.max_failure_ratio <= 1.0 or arguments.max_p99_ms <= 0:
        parser.error("MAX_FAILURE_RATIO is 0..1 and MAX_P99_MS positive")
    arguments.rate = arguments.rate or float(arguments.users)
    return arguments


def _locust_command(*options: str) -> list[str]:
    return [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--loglevel", "WARNING", *options]


def run_locust(
    scenario: str, users: int, rate: float, duration: int, folder: pathlib.Path, workers: int = 0, host: str = "", log=print
) -> int:
    """Run the locustfile headless, in one process or as a master and `workers` workers, writing
    its files into `folder`; returns the master's (or the only process's) exit code."""
    environment = {
        **os.environ,
        "SCENARIO": scenario,
        "LOADTEST_OUTPUT_DIR": str(folder),
        "USERS": str(users),
        "DURATION_SECONDS": str(duration),
    }
    command = _locust_command(
        "--headless", "--host", str(swarm.resolve_host(host).cluster_file) if not host else host,
        "--html", str(folder / swarm.HTML_REPORT_FILE), "--csv", str(folder / swarm.CSV_PREFIX),
        "--stop-timeout", str(STOP_TIMEOUT_SECONDS), "--only-summary",
    )  # fmt: skip
    if scenario != "flash-sale":
        command += ["-u", str(users), "-r", str(rate), "-t", f"{duration}s"]
    # else the flash sale's LoadTestShape sets the users (peak USERS) and ends the run itself.
    worker_commands = []
    if workers:
        port = free_port()
        command += ["--master", "--master-bind-host", "127.0.0.1", "--master-bind-port", str(port),
                    "--expect-workers", str(workers), "--expect-workers-max-wait", str(WORKERS_CONNECT_SECONDS_MAX)]  # fmt: skip
        worker_commands = [_locust_command("--worker", "--master-host", "127.0.0.1", "--master-port", str(port))] * workers
    log(f"[loadtest] {' '.join(command[2:])}" + (f", and {workers} workers" if workers else ""))
    master = subprocess.Popen(command, env=environment)
    started_workers = [subprocess.Popen(worker_command, env=environment) for worker_command in worker_commands]
    try:
        return master.wait(timeout=duration + LOCUST_SLACK_SECONDS + (WORKERS_CONNECT_SECONDS_MAX if workers else 0))
    except subprocess.TimeoutExpired:
        log("[loadtest] locust ran past its time: killed")
        master.kill()
        return master.wait()
    finally:
        for process in (master, *started_workers):
            try:
                process.wait(timeout=WORKERS_EXIT_SECONDS_MAX)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def judge_locust(report: Report, exit_code: int, totals: swarm.Totals, transfers_answered: int, thresholds: Thresholds) -> None:
    """Locust's figures against the thresholds, and against the transfer log."""
    report.check(exit_code in LOCUST_EXIT_CODES_RAN, "locust ran to its end", f"exit code {exit_code}")
    report.check(totals.requests > 0, "locust recorded requests", f"{totals.requests} requests")
    report.check(
        totals.failure_ratio <= thresholds.max_failure_ratio,
        f"failure ratio <= MAX_FAILURE_RATIO ({thresholds.max_failure_ratio:g})",
        f"{totals.failures} of {totals.requests} failed: {totals.failure_ratio:.4f}",
    )
    report.check(
        totals.p99_ms is None or totals.p99_ms <= thresholds.max_p99_ms,  # None: no requests, failed above
        f"p99 <= MAX_P99_MS ({thresholds.max_p99_ms:g} ms)",
        f"p99 {totals.p99_ms} ms",
    )
    report.check(totals.exceptions == 0, "no exception in the locustfile's own code", f"{totals.exceptions} raised")
    report.check(not totals.workers_missing, "every worker's transfer log reached the master",
                 f"{totals.workers} workers" + (f", missing {totals.workers_missing}" if totals.workers_missing else ""))  # fmt: skip
    report.check(
        transfers_answered == totals.transfers_called,
        "the transfer log holds an answer for every transfer locust counted",
        f"log {transfers_answered}, locust {totals.transfers_called}",
    )


def write_verdict(folder: pathlib.Path, scenario: str, thresholds: Thresholds, totals: swarm.Totals | None, report: Report) -> pathlib.Path:
    path = folder / swarm.VERDICT_FILE
    verdict = {
        "passed": not report.violations,
        "scenario": scenario,
        "html_report": str(folder / swarm.HTML_REPORT_FILE),
        "thresholds": dataclasses.asdict(thresholds),
        "locust": dataclasses.asdict(totals) if totals is not None else None,
        "checks": report.checks,
        "violations": report.violations,
    }
    path.write_text(json.dumps(verdict, indent=2) + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    arguments = parse_arguments(argv)
    thresholds = Thresholds(arguments.max_failure_ratio, arguments.max_p99_ms)
    host_target = swarm.resolve_host(arguments.host)
    folder = swarm.new_run_folder(host_target.cluster().state_dir, arguments.scenario)
    print(f"[loadtest] run folder {folder}")

    exit_code = run_locust(
        arguments.scenario, arguments.users, arguments.rate, arguments.duration, folder, arguments.workers, arguments.host
    )
    if not (folder / swarm.TRANSFERS_FILE).exists() or not (folder / swarm.TOTALS_FILE).exists():
        print(f"[loadtest] locust failed (exit {exit_code}): no transfer log in {folder}", file=sys.stderr)
        return 2
    totals = swarm.Totals.read(folder / swarm.TOTALS_FILE)
    sent = read_transfers(folder / swarm.TRANSFERS_FILE)
    print(f"[loadtest] locust: {totals.requests} requests, {totals.failures} failed, p99 {totals.p99_ms} ms")

    report = Report(print)
    judge_locust(report, exit_code, totals, sum(1 for t in sent if t.outcome != SENT), thresholds)
    plan = swarm.read_plan(folder)
    samples = read_merchant_samples(folder / swarm.MERCHANT_FILE)
    invariants = check_run(host_target.cluster().raw, plan.accounts, sent, arguments.scenario, merchant_samples=samples)
    report.checks += invariants.checks
    report.violations += invariants.violations
    path = write_verdict(folder, arguments.scenario, thresholds, totals, report)
    print("[loadtest] PASSED" if not report.violations else f"[loadtest] FAILED: {len(report.violations)} check(s)")
    print(f"[loadtest] verdict {path}, report {folder / swarm.HTML_REPORT_FILE}")
    return 1 if report.violations else 0


if __name__ == "__main__":
    sys.exit(main())
