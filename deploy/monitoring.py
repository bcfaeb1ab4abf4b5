"""The cluster's own monitoring: Debian's Prometheus, Alertmanager and one postgres_exporter per shard.

Prometheus scrapes every process the cluster runs. Its targets come from files
(file-based service discovery) that deploy/cluster.py writes from its processes on every
`up`, one file per scrape job, with the jobs and labels of deploy/prometheus/metrics.md;
Prometheus notices a rewritten file by itself. Its config is rendered from
deploy/prometheus/prometheus.template.yml into the state folder; rules come from
deploy/prometheus/rules/*.yml and console templates from deploy/prometheus/consoles, read
where they are in the repo, so `make up` (which reloads a running Prometheus) picks up
edits. Alertmanager reads deploy/prometheus/alertmanager.yml as it is.

Everything listens on 127.0.0.1 only and keeps its data under the state folder; the
Prometheus TSDB is bounded by both time and size.

Each exporter connects as the shard's auditor role (read-only). It is a Go program on
lib/pq, which does not know libpq's `passfile=` DSN field but honours $PGPASSFILE: the
exporter gets a DSN without a password and PGPASSFILE naming the auditor's passfile, so
no password is ever on a command line, in an environment variable or in cluster.json.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import shutil
import string
import urllib.error
import urllib.request

from deploy import processes
from services.storage.roles import DatabaseRole

HOST = "127.0.0.1"
PROMETHEUS_BINARY = "prometheus"
ALERTMANAGER_BINARY = "prometheus-alertmanager"
POSTGRES_EXPORTER_BINARY = "prometheus-postgres-exporter"
INSTALL_HINT = "install it with `apt-get install prometheus prometheus-alertmanager prometheus-postgres-exporter` (or run `make deps`)"

PROMETHEUS_DIR = processes.REPO_DIR / "deploy" / "prometheus"
CONFIG_TEMPLATE_PATH = PROMETHEUS_DIR / "prometheus.template.yml"
ALERTMANAGER_CONFIG_PATH = PROMETHEUS_DIR / "alertmanager.yml"
RULES_DIR = PROMETHEUS_DIR / "rules"
CONSOLES_DIR = PROMETHEUS_DIR / "consoles"
CONSOLE_LIBRARIES_DIR = PROMETHEUS_DIR / "console_libraries"

# Short enough that a test sees a scrape within seconds; a scrape must end before the next one.
SCRAPE_INTERVAL_SECONDS = 5
SCRAPE_TIMEOUT_SECONDS = 4
RULE_EVALUATION_INTERVAL_SECONDS = 5
# How often a firing alert is sent to Alertmanager again (Prometheus' default is 1m): also what
# one lost right after a start (Alertmanager not yet discovered) waits before it arrives.
ALERT_RESEND_DELAY_SECONDS = 10
# The TSDB drops its oldest blocks past either bound: a local cluster must not fill the disk.
RETENTION_TIME = "1w"  # Prometheus spells durations in their largest units: 7d reads back as 1w
RETENTION_SIZE = "1GiB"  # as Prometheus reads it back (it takes GB as 2**30 bytes too)

START_TIMEOUT_SECONDS = 30
HEALTH_TIMEOUT_SECONDS = 2
RELOAD_TIMEOUT_SECONDS = 10

# The scrape jobs of deploy/prometheus/metrics.md.
JOB_GRPC = "corebank_grpc"
JOB_COORDINATOR = "corebank_coordinator"
JOB_ETCD = "etcd"
JOB_POSTGRES = "postgres"
JOB_PROMETHEUS = "prometheus"
JOB_ALERTMANAGER = "alertmanager"
JOB_SUPERVISOR = "corebank_supervisor"
SCRAPE_JOBS = (JOB_GRPC, JOB_COORDINATOR, JOB_ETCD, JOB_POSTGRES, JOB_PROMETHEUS, JOB_ALERTMANAGER, JOB_SUPERVISOR)

# The exporter reaches its shard over loopback TCP: no TLS to set up there (lib/pq would require it).
EXPORTER_SSL_MODE = "disable"


def binary(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"{name} not found on PATH; {INSTALL_HINT}")
    return found


def answers(url: str, timeout_seconds: float = HEALTH_TIMEOUT_SECONDS) -> bool:
    """Whether a GET of `url` (ours, on loopback) answers 200."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_seconds) as response:  # nosec B310 # a literal http:// URL to a cluster endpoint
            return response.status == 200
    except (OSError, ValueError):
        return False


def write_atomically(path: pathlib.Path, text: str) -> None:
    """Readers (Prometheus watching its target files) never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    scratch = path.with_name(f".{path.name}.tmp")
    scratch.write_text(text)
    scratch.replace(path)


# Service discovery.


@dataclasses.dataclass(frozen=True)
class ScrapeTarget:
    job: str
    endpoint: str  # host:port serving /metrics
    labels: dict[str, str]


def write_targets(targets_dir: pathlib.Path, targets: list[ScrapeTarget]) -> None:
    """One file per scrape job (also for a job without targets, so that none keeps stale ones)."""
    unknown = {target.job for target in targets} - set(SCRAPE_JOBS)
    if unknown:
        raise ValueError(f"scrape jobs {sorted(unknown)} are not in deploy/prometheus/metrics.md")
    for job in SCRAPE_JOBS:
        groups = [{"targets": [t.endpoint], "labels": t.labels} for t in targets if t.job == job]
        write_atomically(targets_path(targets_dir, job), json.dumps(groups, indent=2) + "\n")


def targets_path(targets_dir: pathlib.Path, job: str) -> pathlib.Path:
    return targets_dir / f"{job}.json"


def render_config(targets_dir: pathlib.Path, alertmanager_endpoint: str) -> str:
    """prometheus.yml from the template; every value is a JSON string, which YAML reads as is."""
    values = {
        "scrape_interval": f"{SCRAPE_INTERVAL_SECONDS}s",
        "scrape_timeout": f"{SCRAPE_TIMEOUT_SECONDS}s",
        "evaluation_interval": f"{RULE_EVALUATION_INTERVAL_SECONDS}s",
        "rule_files": str(RULES_DIR / "*.yml"),
        "alertmanager": alertmanager_endpoint,
        **{f"targets_{job}": str(targets_path(targets_dir, job)) for job in SCRAPE_JOBS},
    }
    return string.Template(CONFIG_TEMPLATE_PATH.read_text()).substitute({k: json.dumps(v) for k, v in values.items()})


# The processes.


class WebServer(processes.PidFileProcess):
    """Prometheus or Alertmanager: one HTTP port, ready when /-/ready answers."""

    port: int

    @property
    def endpoint(self) -> str:
        return f"{HOST}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.endpoint}"

    def is_healthy(self) -> bool:
        return self.is_running() and answers(f"{self.url}/-/ready")


@dataclasses.dataclass(frozen=True)
class Prometheus(WebServer):
    home_dir: pathlib.Path  # <state>/prometheus: config, targets/, data/
    port: int
    alertmanager_endpoint: str
    log_path: pathlib.Path
    pid_path: pathlib.Path

    name = "prometheus"

    @property
    def config_path(self) -> pathlib.Path:
        return self.home_dir / "prometheus.yml"

    @property
    def targets_dir(self) -> pathlib.Path:
        return self.home_dir / "targets"

    @property
    def data_dir(self) -> pathlib.Path:
        return self.home_dir / "data"

    def _markers(self) -> list[str]:
        return [f"--storage.tsdb.path={self.data_dir}", f"--web.listen-address={self.endpoint}"]

    def write_config(self) -> None:
        write_atomically(self.config_path, render_config(self.targets_dir, self.alertmanager_endpoint))

    def start(self) -> None:
        """Start when not running, else reload: either way the config and rules on disk are in force."""
        self.write_config()
        if self.is_running():
            self.reload()
        else:
            argv = [
                binary(PROMETHEUS_BINARY),
                f"--config.file={self.config_path}",
                f"--storage.tsdb.path={self.data_dir}",
                f"--storage.tsdb.retention.time={RETENTION_TIME}",
                f"--storage.tsdb.retention.size={RETENTION_SIZE}",
                f"--web.listen-address={self.endpoint}",
                f"--web.console.templates={CONSOLES_DIR}",
                f"--web.console.libraries={CONSOLE_LIBRARIES_DIR}",
                f"--rules.alert.resend-delay={ALERT_RESEND_DELAY_SECONDS}s",
                "--web.enable-lifecycle",  # POST /-/reload on `make up`; loopback only
            ]
            processes.spawn_detached(argv, self.log_path, self.pid_path, cwd=self.home_dir)
        processes.wait_until(self.is_healthy, START_TIMEOUT_SECONDS, "prometheus ready", give_up=self._died)

    def reload(self) -> None:
        """Re-read the config, the rules and the console templates; a broken rule file keeps the old ones."""
        request = urllib.request.Request(f"{self.url}/-/reload", method="POST")
        try:
            with urllib.request.urlopen(request, timeout=RELOAD_TIMEOUT_SECONDS):  # nosec B310 # a literal http:// URL to a cluster endpoint
                return
        except urllib.error.HTTPError as error:
            raise RuntimeError(
                f"prometheus refused its new config or rules ({error.code}: {error.read().decode(errors='replace').strip()}); "
                f"check them with `promtool check config {self.config_path}`"
            ) from None


@dataclasses.dataclass(frozen=True)
class Alertmanager(WebServer):
    storage_dir: pathlib.Path
    port: int
    log_path: pathlib.Path
    pid_path: pathlib.Path

    name = "alertmanager"

    def _markers(self) -> list[str]:
        return [f"--storage.path={self.storage_dir}", f"--web.listen-address={self.endpoint}"]

    def start(self) -> None:
        if not self.is_running():
            self.storage_dir.mkdir(parents=True, exist_ok=True)
            argv = [
                binary(ALERTMANAGER_BINARY),
                f"--config.file={ALERTMANAGER_CONFIG_PATH}",
                f"--storage.path={self.storage_dir}",
                f"--web.listen-address={self.endpoint}",
                "--cluster.listen-address=",  # a single Alertmanager: no gossip port
            ]
            processes.spawn_detached(argv, self.log_path, self.pid_path, cwd=self.storage_dir)
        processes.wait_until(self.is_healthy, START_TIMEOUT_SECONDS, "alertmanager ready", give_up=self._died)


@dataclasses.dataclass(frozen=True)
class PostgresExporter(processes.PidFileProcess):
    shard_name: str
    shard_port: int
    database: str
    passfile: pathlib.Path  # the auditor's; see the module's docstring
    port: int
    log_path: pathlib.Path
    pid_path: pathlib.Path

    @property
    def name(self) -> str:
        return f"exporter-{self.shard_name}"

    @property
    def endpoint(self) -> str:
        return f"{HOST}:{self.port}"

    def _markers(self) -> list[str]:
        # Its port is this cluster's (the port plan); the exporter takes no path of ours to mark it by.
        return [f"--web.listen-address={self.endpoint}"]

    def is_healthy(self) -> bool:
        return self.is_running() and answers(f"http://{self.endpoint}/metrics")

    def data_source_name(self) -> str:
        return (
            f"host={HOST} port={self.shard_port} dbname={self.database} user={DatabaseRole.AUDITOR} "
            f"sslmode={EXPORTER_SSL_MODE}"
        )

    def start(self) -> None:
        if not self.is_running():
            argv = [binary(POSTGRES_EXPORTER_BINARY), f"--web.listen-address={self.endpoint}"]
            # Only what the exporter needs: none of our own environment reaches it.
            env = {"DATA_SOURCE_NAME": self.data_source_name(), "PGPASSFILE": str(self.passfile)}
            processes.spawn_detached(argv, self.log_path, self.pid_path, env=env)
        processes.wait_until(self.is_healthy, START_TIMEOUT_SECONDS, f"{self.name} health", give_up=self._died)
