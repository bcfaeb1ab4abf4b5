"""`make loadtest`: one locust scenario, headless, against the running cluster, then the checks.

    SCENARIO=flash-sale USERS=200 DURATION=60s make loadtest
    .venv/bin/python -m loadtest.run --scenario everyday --users 50 --duration 30s

Writes locust's HTML report and CSV files as
$COREBANK_STATE_DIR/reports/<scenario>-<timestamp>{.html,_stats.csv,...}, beside
the run's accounts (-setup.json), every transfer it sent (-transfers.csv) and,
for the flash sale, the merchant's balance read every second (-merchant.csv),
then runs loadtest.check on them. Exits 1 on any violated invariant, or when
locust recorded no request at all; failed requests alone (RESOURCE_EXHAUSTED
under overload, for example) are reported, not fatal.

Environment (or the matching --options): SCENARIO (flash-sale | everyday |
batch), USERS (peak users for flash-sale), RATE (users started per second;
default USERS, i.e. all within a second), DURATION (30s, 2m, 1m30s; excludes
set-up). The scenarios' own knobs (ACCOUNTS, CROSS_SHARD_SHARE, READ_SHARE,
BATCH_SIZE, BASE_USERS, RAMP_SECONDS, ...) pass through to the locustfile.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import pathlib
import re
import subprocess
import sys

from loadtest.accounts import AccountSet
from loadtest.check import check_run, read_merchant_samples, read_transfers
from loadtest.cluster import load_cluster

LOCUSTFILE = pathlib.Path(__file__).with_name("locustfile.py")
SCENARIOS = ("flash-sale", "everyday", "batch")
REPORTS_FOLDER = "reports"
# Set-up (opening and funding thousands of accounts) and locust's own start and
# stop come on top of the duration; past this much more, the run is killed.
LOCUST_SLACK_SECONDS = 300
# Users finish the call they are in when the run stops, so fewer answers are lost.
STOP_TIMEOUT_SECONDS = 10
_DURATION_PATTERN = re.compile(r"^(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s?)?$")


def duration_seconds(text: str) -> int:
    """Locust's -t format: 90, 90s, 2m, 1h30m, 1m30s."""
    match = _DURATION_PATTERN.match(text.strip())
    if not match or not any(match.groups()):
        raise argparse.ArgumentTypeError(f"duration {text!r}: use 90, 90s, 2m or 1m30s")
    hours, minutes, seconds = (int(group or 0) for group in match.groups())
    return hours * 3600 + minutes * 60 + seconds


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m loadtest.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenario", default=os.environ.get("SCENARIO") or "flash-sale", choices=SCENARIOS)
    parser.add_argument("--users", type=int, default=int(os.environ.get("USERS") or 100))
    parser.add_argument("--rate", type=float, default=float(os.environ["RATE"]) if os.environ.get("RATE") else None)
    parser.add_argument("--duration", type=duration_seconds, default=os.environ.get("DURATION") or "30s")
    arguments = parser.parse_args(argv)
    if isinstance(arguments.duration, str):
        arguments.duration = duration_seconds(arguments.duration)
    if arguments.users < 1 or arguments.duration < 1:
        parser.error("USERS and DURATION must be positive")
    arguments.rate = arguments.rate or float(arguments.users)
    return arguments


def requests_recorded(stats_csv: pathlib.Path) -> tuple[int, int]:
    """(requests, failures) of locust's Aggregated row."""
    with stats_csv.open(newline="") as file:
        for row in csv.DictReader(file):
            if row["Name"] == "Aggregated":
                return int(row["Request Count"]), int(row["Failure Count"])
    return 0, 0


def run_locust(scenario: str, users: int, rate: float, duration: int, prefix: pathlib.Path, log=print) -> int:
    """Run the locustfile headless; returns locust's exit code."""
    environment = {
        **os.environ,
        "SCENARIO": scenario,
        "LOADTEST_OUTPUT_PREFIX": str(prefix),
        "USERS": str(users),
        "DURATION_SECONDS": str(duration),
    }
    command = [
        sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless",
        "--html", f"{prefix}.html", "--csv", str(prefix),
        "--stop-timeout", str(STOP_TIMEOUT_SECONDS), "--only-summary", "--loglevel", "WARNING",
    ]  # fmt: skip
    if scenario != "flash-sale":
        command += ["-u", str(users), "-r", str(rate), "-t", f"{duration}s"]
    # else the flash sale's LoadTestShape sets the users (peak USERS) and ends the run itself.
    log(f"[loadtest] {' '.join(command[2:])}")
    completed = subprocess.run(command, env=environment, timeout=duration + LOCUST_SLACK_SECONDS, check=False)
    return completed.returncode


def main(argv: list[str] | None = None) -> int:
    arguments = parse_arguments(argv)
    cluster = load_cluster()
    folder = cluster.state_dir / REPORTS_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    prefix = folder / f"{arguments.scenario}-{stamp}"

    exit_code = run_locust(arguments.scenario, arguments.users, arguments.rate, arguments.duration, prefix)
    # Exit 1 means "some requests failed", which a load test at overload expects; anything else is a crash.
    if exit_code not in (0, 1) or not pathlib.Path(f"{prefix}-transfers.csv").exists():
        print(f"[loadtest] locust failed (exit {exit_code}); no transfer log at {prefix}-transfers.csv", file=sys.stderr)
        return 2
    requests, failures = requests_recorded(pathlib.Path(f"{prefix}_stats.csv"))
    print(f"[loadtest] locust: {requests} requests, {failures} failed; report {prefix}.html, CSV {prefix}_*.csv")

    setup = json.loads(pathlib.Path(f"{prefix}-setup.json").read_text())
    accounts = AccountSet.from_json(json.dumps(setup["accounts"]))
    sent = read_transfers(pathlib.Path(f"{prefix}-transfers.csv"))
    samples = read_merchant_samples(pathlib.Path(f"{prefix}-merchant.csv"))
    violations = check_run(cluster.raw, accounts, sent, arguments.scenario, merchant_samples=samples)
    if requests == 0:
        violations.append("locust recorded no request")
    print("[loadtest] invariants hold" if not violations else f"[loadtest] {len(violations)} VIOLATION(S)")
    return 1 if violations else 0


if __name__ == "__main__":
    sys.exit(main())
