"""What the locust processes of one load test share. No gevent and no locust here, so that
loadtest.run, loadtest.check and the tests import it without monkey-patching themselves.

Which cluster: the host, i.e. locust's --host or the web UI's Host field, names it one way of three:
- empty: $COREBANK_STATE_DIR/cluster.json (default .corebank/cluster.json, what `make up` wrote);
- a path: a state folder, or the cluster.json inside one (relative to locust's working folder);
- grpcs://HOST:PORT (or HOST:PORT): that gRPC address, served by the cluster of
  $COREBANK_STATE_DIR/cluster.json, whose CA, client certificate, token key and shards are used.
Certificates and tokens come from the cluster's state folder, so every locust process, workers too,
runs where it can read that folder. The master sends workers account ids, never a token: locust's
master-worker channel is plain and unauthenticated.

A run's folder (loadtest.run makes reports/<scenario>-<time>/; the web UI, one per account set)
holds setup.json (cluster and accounts), transfers.csv (every transfer sent, with its outcome and
wall-clock times), merchant.csv (flash sale: the merchant's balance read during the run) and
totals.json (locust's figures for the last start), each written when every user has stopped.
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import datetime
import json
import os
import pathlib
import re
from collections.abc import Iterator

from deploy.cluster import CLUSTER_FILE
from loadtest.accounts import AccountSet
from loadtest.cluster import Cluster, load_cluster, state_dir_from_environment

SCENARIOS = ("flash-sale", "everyday", "batch", "remittance")
REPORTS_FOLDER = "reports"
SETUP_FILE = "setup.json"
TRANSFERS_FILE = "transfers.csv"
MERCHANT_FILE = "merchant.csv"
TOTALS_FILE = "totals.json"
VERDICT_FILE = "verdict.json"
HTML_REPORT_FILE = "report.html"
# locust's --csv prefix inside the folder: locust_stats.csv, locust_failures.csv, ...
CSV_PREFIX = "locust"

GRPC_SCHEME = "grpcs://"
_ADDRESS_PATTERN = re.compile(r"^(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+):\d{1,5}$")

# Outcome of a transfer in the log. A transfer answered with an unknown outcome, or not answered
# at all ("sent": its user was stopped during the call), may still post: the check asks for it.
SENT, POSTED, REFUSED, UNKNOWN = "sent", "posted", "refused", "unknown"
TRANSFER_LOG_COLUMNS = (
    "transfer_id", "debit_account_id", "credit_account_id", "amount_minor", "outcome", "code", "sent_at", "answered_at",
)  # fmt: skip
MERCHANT_COLUMNS = ("read_started_at", "read_ended_at", "balance_minor", "collecting_minor")


class HostError(ValueError):
    """A host that names no cluster."""


@dataclasses.dataclass(frozen=True)
class HostTarget:
    """The cluster a host names, and the gRPC address to call it at (None: its own grpc_endpoint)."""

    cluster_file: pathlib.Path
    address: str | None

    @property
    def key(self) -> str:
        """Two hosts with the same key are one cluster: a later start reuses its accounts."""
        return f"{self.cluster_file}|{self.address or ''}"

    def cluster(self) -> Cluster:
        return load_cluster(self.cluster_file.parent)


def default_cluster_file() -> pathlib.Path:
    return (state_dir_from_environment() / CLUSTER_FILE).resolve()


def resolve_host(host: str | None) -> HostTarget:
    """The cluster a locust host names (see the module's docstring)."""
    text = (host or "").strip()
    if not text:
        return HostTarget(default_cluster_file(), None)
    if text.startswith(GRPC_SCHEME):
        address = text[len(GRPC_SCHEME) :].rstrip("/")
        if not _ADDRESS_PATTERN.match(address):
            raise HostError(f"host {text!r}: write grpcs://HOST:PORT")
        return HostTarget(default_cluster_file(), address)
    if "://" in text:
        raise HostError(f"host {text!r}: corebank serves gRPC over TLS; give a state folder, its cluster.json, or grpcs://HOST:PORT")
    path = pathlib.Path(text).expanduser()
    if path.is_dir():
        path = path / CLUSTER_FILE
    if path.is_file():
        if path.name != CLUSTER_FILE:
            raise HostError(f"host {text!r}: give a state folder or the {CLUSTER_FILE} inside it")
        return HostTarget(path.resolve(), None)
    if _ADDRESS_PATTERN.match(text):
        return HostTarget(default_cluster_file(), text)
    raise HostError(f"host {text!r}: no such state folder or {CLUSTER_FILE}, and not HOST:PORT")


def new_run_folder(state_dir: pathlib.Path, scenario: str) -> pathlib.Path:
    """reports/<scenario>-<UTC time>/ under the cluster's state folder, made empty."""
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%S.%fZ")
    folder = state_dir / REPORTS_FOLDER / f"{scenario}-{stamp}"
    folder.mkdir(parents=True)
    return folder


@dataclasses.dataclass(frozen=True)
class Plan:
    """What the master (or the only process) set up once per cluster, and sends each worker."""

    host_key: str
    scenario: str
    cluster_file: str
    address: str | None
    accounts: AccountSet
    output_dir: str

    def host_target(self) -> HostTarget:
        return HostTarget(pathlib.Path(self.cluster_file), self.address)

    def to_message(self) -> dict:
        """Plain data for locust's messages (msgpack) and for setup.json."""
        return {**dataclasses.asdict(self), "accounts": json.loads(self.accounts.to_json())}

    @classmethod
    def from_message(cls, data: dict) -> Plan:
        return cls(**{**data, "accounts": AccountSet.from_json(json.dumps(data["accounts"]))})


def read_plan(folder: pathlib.Path) -> Plan:
    return Plan.from_message(json.loads((folder / SETUP_FILE).read_text()))


class TransferLog:
    """transfer_id -> [debit_account_id, credit_account_id, amount_minor, outcome, code, sent_at, answered_at].

    Times are wall-clock seconds (time.time()): the processes of a swarm on one machine share
    that clock, so the merchant's reads on the master compare with sends and answers on workers."""

    def __init__(self) -> None:
        self.rows: dict[str, list] = {}

    def sent(self, transfer_id: str, debit_account_id: str, credit_account_id: str, amount_minor: int, sent_at: float) -> None:
        self.rows[transfer_id] = [debit_account_id, credit_account_id, amount_minor, SENT, "", sent_at, None]

    def answered(self, transfer_id: str, outcome: str, code: str, answered_at: float) -> None:
        row = self.rows[transfer_id]
        row[3], row[4], row[6] = outcome, code, answered_at

    def drain(self) -> list[list]:
        """Every row as [transfer_id, ...], emptying the log (a worker hands its rows to the master)."""
        rows = [[transfer_id, *row] for transfer_id, row in self.rows.items()]
        self.rows = {}
        return rows

    def merge(self, rows: list[list]) -> None:
        for transfer_id, *row in rows:
            self.rows[transfer_id] = list(row)

    def counts(self) -> dict[str, int]:
        return dict(collections.Counter(row[3] for row in self.rows.values()))

    def write(self, path: pathlib.Path) -> None:
        temporary = path.with_suffix(".tmp")
        with temporary.open("w", newline="") as file:
            writer = csv.writer(file)
            writer.writerow(TRANSFER_LOG_COLUMNS)
            for transfer_id, row in self.rows.items():
                writer.writerow([transfer_id, *("" if value is None else value for value in row)])
        temporary.replace(path)


def chunks(rows: list, size: int) -> Iterator[list]:
    """`rows` in slices of at most `size`; one empty slice when there are none (it still says "done")."""
    if not rows:
        yield []
    for start in range(0, len(rows), size):
        yield rows[start : start + size]


def write_merchant_samples(path: pathlib.Path, samples: list[tuple[float, float, int, int]]) -> None:
    temporary = path.with_suffix(".tmp")
    with temporary.open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(MERCHANT_COLUMNS)
        writer.writerows(samples)
    temporary.replace(path)


@dataclasses.dataclass(frozen=True)
class Totals:
    """Locust's figures for one start, taken when every user (on every worker) has stopped."""

    requests: int
    failures: int
    # locust's estimate from its response-time histogram; None without requests
    p99_ms: float | None
    # exceptions raised by the locustfile's own code: a client-side bug, never the server's
    exceptions: int
    calls_by_name: dict[str, int]
    # transfers in the calls locust counted (a CreateTransfers call carries many): each has an
    # answered row in the transfer log, or the log and locust's figures disagree
    transfers_called: int
    workers: int
    # workers whose transfer log never reached the master: the log and the totals miss their part
    workers_missing: list[str]

    @property
    def failure_ratio(self) -> float:
        return self.failures / self.requests if self.requests else 0.0

    def write(self, path: pathlib.Path) -> None:
        path.write_text(json.dumps(dataclasses.asdict(self), indent=2) + "\n")

    @classmethod
    def read(cls, path: pathlib.Path) -> Totals:
        return cls(**json.loads(path.read_text()))


def env_int(name: str, default: int) -> int:
    return int(os.environ.get(name) or default)


def env_float(name: str, default: float) -> float:
    return float(os.environ.get(name) or default)
