"""The local cluster's lifecycle: up, down, status, clean.

    python -m deploy.cluster up|down|status|clean [--state-dir DIR] [--shards N]
                                                   [--port-base PORT] [--grpc-workers N] [--coordinators N]

Everything lives under one state folder (default .corebank):

    cluster-settings.json   shard count, port base, gRPC workers: fixed at first `up`
    cluster.json            endpoints and pids, rewritten by every `up`
    shards/shard-N/         PostgreSQL data dir, log and unix socket of shard N
    etcd/                   etcd's data dir
    secrets/                0700: a libpq passfile per database role (0600), made at the first `up`
    auth/                   0700: the cluster's CA, a certificate per process, token signing keys
    prometheus/             Prometheus: prometheus.yml (rendered), targets/ (service discovery), data/ (TSDB)
    alertmanager/           Alertmanager's silences and notification log
    logs/, run/             logs and pid files of every process but PostgreSQL's; run/supervisor.json
                            holds the supervisor's restarts, run/NAME.held marks a process stopped on purpose
                            (and says why: `make down`, Cluster.stop or Cluster.kill)

Port plan from the port base B (every port on 127.0.0.1):
    B           gRPC (shared by the workers)
    B+1, B+2    etcd client (also its /metrics), etcd peer
    B+3         Prometheus (web UI, API, /metrics)
    B+4         Alertmanager (web UI, API, /metrics); no gossip port
    B+5         the supervisor's /metrics (every process's state)
    B+10+i      metrics of gRPC worker i        (i < GRPC_WORKERS_MAX = 10)
    B+20+i      metrics of coordinator i        (i < COORDINATORS_MAX = 10)
    B+30+i      postgres_exporter of shard i    (i < SHARD_COUNT_MAX = 64)
    B+100+i     PostgreSQL shard i          (TOPOLOGY=ha: its member m0)
so a cluster spans B..B+163 at most (the tests' clusters sit 200 apart).
TOPOLOGY=ha (deploy/patroni.py) adds, for shard i < SHARD_COUNT_MAX and etcd member k < 3:
    B+1, B+2    etcd-0's client and peer ports (as above)
    B+6, B+7    etcd-1's client and peer ports
    B+8, B+9    etcd-2's client and peer ports
    B+164+i     PostgreSQL of shard i's member m1
    B+228+i     PostgreSQL of shard i's member m2
    B+292+i     Patroni REST API of shard i's member m0
    B+356+i     Patroni REST API of shard i's member m1
    B+420+i     Patroni REST API of shard i's member m2
so an HA cluster spans B..B+483 at most (within the 500 ports a helper or test cluster owns).

Topology (TOPOLOGY=single|ha, fixed at the first `up` like the shard count): "single" (the
default, for development) runs one PostgreSQL per shard and one etcd; "ha" runs each shard as a
Patroni-managed primary with two synchronous-capable streaming replicas, and three etcd members.
Services and coordinators reach each shard's primary through one libpq multi-host DSN over its
members (target_session_attrs=read-write) and the etcd members as one comma-separated list.

Coordinators (`python -m services.coordinator`, the recovery of cross-shard
transfers) start after the gRPC workers, and only once services/coordinator
exists. Then the monitoring (deploy/monitoring.py): an exporter per shard,
Alertmanager and Prometheus, whose scrape targets are written from these
processes.

`up` is idempotent: it starts only what is not running, so after a crash
(kill -9) it restarts exactly the dead processes. `down` keeps all data.

Every cluster runs deploy/supervisor.py, which serves every process's state to
Prometheus. In a supervised cluster (`make up`; not `up --no-restarts`, nor the
Python API's default) it also restarts a dead process by itself, within a
restart limit. Programs that inject faults on purpose (the tests, `make chaos`)
run their clusters unsupervised and heal what they break; `stop(name)` and
`kill(name)` hold the process down, so the supervisor of a supervised cluster
does not undo them either.

`status` tells apart, per process: healthy; unhealthy (running, not answering
its health check); stopped (SIGSTOP: alive but frozen, never restarted, SIGCONT
resumes it); dead (no process, and nobody meant it); down (no process, taken
down on purpose: `make down`, `stop(name)`, `kill(name)`). It shows uptimes and
the supervisor's restarts. Every process is probed at once, each probe bounded
by its own timeout, so a hung process costs its timeout, not the sum of them.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import dataclasses
import fcntl
import importlib.util
import json
import logging
import os
import pathlib
import shutil
import signal
import sys
import time
from collections.abc import Iterator
from typing import Protocol

from deploy import monitoring, patroni, processes, supervisor
from deploy.coordinator import Coordinator
from deploy.etcd import Etcd, EtcdMember
from deploy.grpc_worker import PROBE_CERTIFICATE, GrpcWorker
from services.auth import auth_dir
from services.ledger.clearing import CLEARING_HOME_KEY, HOSTING_PARTICIPANT_ID
from deploy import postgres
from deploy.patroni import HaShard, PatroniMember
from deploy.postgres import PostgresShard
from deploy.supervisor import RestartPolicy, Supervisor
from services.storage.roles import DatabaseRole

DEFAULT_STATE_DIR = ".corebank"
DEFAULT_SHARD_COUNT = 3
DEFAULT_PORT_BASE = 7100
# One service process per core: a single Python process saturates its core long
# before PostgreSQL does (make bench: 0.22x pgbench with 1 worker, 0.33x with 2).
DEFAULT_GRPC_WORKERS = 2
# Two, so that a dead coordinator's transfers have someone to take them over.
DEFAULT_COORDINATORS = 2

GRPC_PORT_OFFSET = 0
ETCD_CLIENT_PORT_OFFSET = 1
ETCD_PEER_PORT_OFFSET = 2
PROMETHEUS_PORT_OFFSET = 3
ALERTMANAGER_PORT_OFFSET = 4
SUPERVISOR_METRICS_PORT_OFFSET = 5
METRICS_PORT_OFFSET = 10
COORDINATOR_METRICS_PORT_OFFSET = 20
POSTGRES_EXPORTER_PORT_OFFSET = 30
POSTGRES_PORT_OFFSET = 100
# TOPOLOGY=ha (see the port plan in the module's docstring).
HA_ETCD_PORT_OFFSETS = ((ETCD_CLIENT_PORT_OFFSET, ETCD_PEER_PORT_OFFSET), (6, 7), (8, 9))
HA_POSTGRES_PORT_OFFSET = POSTGRES_PORT_OFFSET  # member m's: + m * SHARD_COUNT_MAX + i
HA_PATRONI_REST_PORT_OFFSET = 292  # member m's: + m * SHARD_COUNT_MAX + i
TOPOLOGY_SINGLE = "single"
TOPOLOGY_HA = "ha"
TOPOLOGIES = (TOPOLOGY_SINGLE, TOPOLOGY_HA)
# Each range of the port plan must stay below the next one.
GRPC_WORKERS_MAX = COORDINATOR_METRICS_PORT_OFFSET - METRICS_PORT_OFFSET
COORDINATORS_MAX = POSTGRES_EXPORTER_PORT_OFFSET - COORDINATOR_METRICS_PORT_OFFSET
COORDINATOR_MODULE = "services.coordinator"
SHARD_COUNT_MAX = 64
assert POSTGRES_EXPORTER_PORT_OFFSET + SHARD_COUNT_MAX <= POSTGRES_PORT_OFFSET, "exporters' ports reach the shards'"
assert SUPERVISOR_METRICS_PORT_OFFSET < METRICS_PORT_OFFSET, "the supervisor's port reaches the workers'"
assert all(SUPERVISOR_METRICS_PORT_OFFSET < port < METRICS_PORT_OFFSET for pair in HA_ETCD_PORT_OFFSETS[1:] for port in pair)
assert HA_POSTGRES_PORT_OFFSET + patroni.MEMBERS_PER_SHARD * SHARD_COUNT_MAX <= HA_PATRONI_REST_PORT_OFFSET, "members' ports overlap"
HA_PORT_SPAN = HA_PATRONI_REST_PORT_OFFSET + patroni.MEMBERS_PER_SHARD * SHARD_COUNT_MAX
PORT_MAX = 65535

# An `up` may wait on initdb, etcd and worker start; a second `up` waits for it.
LOCK_TIMEOUT_SECONDS = 300
SHARD_MAP_BOOTSTRAP_TIMEOUT_SECONDS = 30

# Signals that pause and resume a process rather than end it (Cluster.kill holds no process for them).
PAUSE_SIGNALS = frozenset({signal.SIGSTOP, signal.SIGCONT})

# cluster.json's client certificate and admin token (the subject tools act as).
ADMIN_CLIENT_CERTIFICATE = "admin"
ADMIN_SUBJECT = "cluster-admin"

SETTINGS_FILE = "cluster-settings.json"
CLUSTER_FILE = "cluster.json"
LOCK_FILE = ".lock"

ROLE_GRPC = "grpc"
ROLE_ETCD = "etcd"
ROLE_POSTGRES = "postgres"
ROLE_PATRONI = "patroni"  # TOPOLOGY=ha: a PostgreSQL member and its Patroni
ROLE_COORDINATOR = "coordinator"
ROLE_POSTGRES_EXPORTER = "postgres-exporter"
ROLE_PROMETHEUS = "prometheus"
ROLE_ALERTMANAGER = "alertmanager"
ROLE_SUPERVISOR = supervisor.ROLE

# A process's state in `status`.
HEALTHY = "healthy"
UNHEALTHY = "unhealthy"  # running, but not (yet) answering its health check
STOPPED = "stopped"  # alive but frozen (SIGSTOP): it answers nothing until SIGCONT
DEAD = "dead"  # no process, and nobody meant it (crashed, killed from outside the cluster's API)
DOWN = "down"  # no process, taken down on purpose (`make down`, stop(name), kill(name)) until `up`
PROCESS_STATES = (HEALTHY, UNHEALTHY, STOPPED, DEAD, DOWN)
# `status` probes this many processes at once (a thread each): every probe has its own timeout.
STATUS_PROBES_MAX = 32

log = logging.getLogger(__name__)


class ClusterError(RuntimeError):
    pass


class Component(Protocol):
    """What cluster.py needs from a PostgreSQL shard, etcd or a gRPC worker."""

    @property
    def name(self) -> str: ...
    @property
    def endpoint(self) -> str: ...
    def pid(self) -> int | None: ...
    def is_running(self) -> bool: ...
    def is_healthy(self) -> bool: ...
    def start(self) -> None: ...
    def stop(self) -> None: ...
    def kill(self, signal_number: int = signal.SIGKILL) -> None: ...


@dataclasses.dataclass(frozen=True)
class Settings:
    shard_count: int
    port_base: int
    grpc_workers: int
    coordinators: int = DEFAULT_COORDINATORS
    # Whether the supervisor (deploy/supervisor.py) restarts dead processes; it watches them either
    # way. Kept, like the counts, for later `up`s.
    supervised: bool = False
    topology: str = TOPOLOGY_SINGLE

    def __post_init__(self) -> None:
        if self.topology not in TOPOLOGIES:
            raise ValueError(f"topology must be one of {', '.join(TOPOLOGIES)}, not {self.topology!r}")
        if self.topology == TOPOLOGY_HA and not 1024 <= self.port_base <= PORT_MAX - HA_PORT_SPAN:
            raise ValueError(f"port base {self.port_base} leaves the HA port plan outside 1024..{PORT_MAX}")
        if not 1 <= self.shard_count <= SHARD_COUNT_MAX:
            raise ValueError(f"shard count must be 1..{SHARD_COUNT_MAX}, not {self.shard_count}")
        if not 1 <= self.grpc_workers <= GRPC_WORKERS_MAX:
            raise ValueError(f"gRPC workers must be 1..{GRPC_WORKERS_MAX}, not {self.grpc_workers}")
        if not 0 <= self.coordinators <= COORDINATORS_MAX:
            raise ValueError(f"coordinators must be 0..{COORDINATORS_MAX}, not {self.coordinators}")
        if not 1024 <= self.port_base <= PORT_MAX - POSTGRES_PORT_OFFSET - self.shard_count:
            raise ValueError(f"port base {self.port_base} leaves the port plan outside 1024..{PORT_MAX}")

    @classmethod
    def load(cls, path: pathlib.Path) -> Settings | None:
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        return cls(
            shard_count=int(data["shard_count"]),
            port_base=int(data["port_base"]),
            grpc_workers=int(data["grpc_workers"]),
            # Absent from state folders made before the coordinators existed.
            coordinators=int(data.get("coordinators", DEFAULT_COORDINATORS)),
            supervised=bool(data.get("supervised", False)),
            topology=str(data.get("topology", TOPOLOGY_SINGLE)),
        )

    def save(self, path: pathlib.Path) -> None:
        write_json_atomically(path, dataclasses.asdict(self))


@dataclasses.dataclass(frozen=True)
class ProcessStatus:
    name: str
    role: str
    pid: int | None
    state: str  # one of PROCESS_STATES
    endpoint: str
    uptime_seconds: float | None = None
    restarts: int = 0  # by the supervisor
    note: str = ""  # why a process is down or dead, or stopped
    gave_up: bool = False  # the supervisor's restart limit is spent


def write_json_atomically(path: pathlib.Path, data: object) -> None:
    """Readable by its owner only (cluster.json holds the admin token); a reader (a test, the
    bench) never sees a half-written file."""
    from services.auth.pki import write_private

    write_private(path, (json.dumps(data, indent=2) + "\n").encode())


def choose_settings(
    stored: Settings | None,
    shard_count: int | None,
    port_base: int | None,
    grpc_workers: int | None,
    coordinators: int | None = None,
    supervised: bool | None = None,
    topology: str | None = None,
) -> Settings:
    """Stored settings win for shards and ports: they are baked into the data
    (PostgreSQL configs, the shard map in etcd). gRPC workers and coordinators
    are stateless, so an explicit count replaces the stored one; so does an
    explicit `supervised`.
    """
    if stored is None:
        return Settings(
            shard_count=shard_count or DEFAULT_SHARD_COUNT,
            port_base=port_base or DEFAULT_PORT_BASE,
            grpc_workers=grpc_workers or DEFAULT_GRPC_WORKERS,
            coordinators=DEFAULT_COORDINATORS if coordinators is None else coordinators,
            supervised=bool(supervised),
            topology=topology or TOPOLOGY_SINGLE,
        )
    if topology is not None and topology != stored.topology:
        log.warning(
            "warning: the cluster's topology is %s; ignoring TOPOLOGY=%s (run `make clean` to start over with it)",
            stored.topology, topology,
        )  # fmt: skip
    if shard_count is not None and shard_count != stored.shard_count:
        log.warning(
            "warning: the cluster has %d shards; ignoring SHARDS=%d (run `make clean` to start over with %d)",
            stored.shard_count, shard_count, shard_count,
        )  # fmt: skip
    if port_base is not None and port_base != stored.port_base:
        log.warning(
            "warning: the cluster uses port base %d; ignoring COREBANK_PORT_BASE=%d (run `make clean` to change it)",
            stored.port_base, port_base,
        )  # fmt: skip
    return dataclasses.replace(
        stored,
        grpc_workers=grpc_workers or stored.grpc_workers,
        coordinators=stored.coordinators if coordinators is None else coordinators,
        supervised=stored.supervised if supervised is None else supervised,
    )


class Cluster:
    """A local corebank cluster under one state folder.

    Arguments left as None take the stored settings of an existing cluster,
    else the defaults (3 shards, port base 7100, 2 gRPC workers, 2 coordinators,
    no restarts by the supervisor). `restart_policy` is the supervisor's.
    """

    def __init__(
        self,
        state_dir: str | os.PathLike[str] = DEFAULT_STATE_DIR,
        shard_count: int | None = None,
        port_base: int | None = None,
        grpc_workers: int | None = None,
        coordinators: int | None = None,
        supervised: bool | None = None,
        restart_policy: RestartPolicy = RestartPolicy(),
        topology: str | None = None,
    ) -> None:
        self.state_dir = pathlib.Path(state_dir).absolute()
        stored = Settings.load(self.settings_path)
        self.settings = choose_settings(stored, shard_count, port_base, grpc_workers, coordinators, supervised, topology)
        self.restart_policy = restart_policy
        self._lock_depth = 0
        self._lock_file: int | None = None

    # Layout.

    @property
    def settings_path(self) -> pathlib.Path:
        return self.state_dir / SETTINGS_FILE

    @property
    def cluster_json_path(self) -> pathlib.Path:
        return self.state_dir / CLUSTER_FILE

    @property
    def logs_dir(self) -> pathlib.Path:
        return self.state_dir / "logs"

    @property
    def run_dir(self) -> pathlib.Path:
        return self.state_dir / "run"

    @property
    def auth_dir(self) -> pathlib.Path:
        return auth_dir(self.state_dir)

    def exists(self) -> bool:
        return self.settings_path.exists()

    @property
    def grpc_endpoint(self) -> str:
        return f"127.0.0.1:{self.settings.port_base + GRPC_PORT_OFFSET}"

    @property
    def is_ha(self) -> bool:
        return self.settings.topology == TOPOLOGY_HA

    @property
    def shards(self) -> list[PostgresShard] | list[HaShard]:
        """The shards: one PostgreSQL each, or (TOPOLOGY=ha) Patroni members each."""
        if self.is_ha:
            return self.ha_shards
        return [
            PostgresShard(
                name=f"shard-{index}",
                shard_dir=self.state_dir / "shards" / f"shard-{index}",
                port=self.settings.port_base + POSTGRES_PORT_OFFSET + index,
                secrets_dir=postgres.secrets_dir(self.state_dir),
            )
            for index in range(self.settings.shard_count)
        ]

    def patroni_member(self, shard_index: int, member_index: int) -> PatroniMember:
        name = f"shard-{shard_index}-m{member_index}"
        offset = member_index * SHARD_COUNT_MAX + shard_index
        return PatroniMember(
            name=name,
            scope=f"shard-{shard_index}",
            member_dir=self.state_dir / "shards" / name,
            pg_port=self.settings.port_base + HA_POSTGRES_PORT_OFFSET + offset,
            rest_port=self.settings.port_base + HA_PATRONI_REST_PORT_OFFSET + offset,
            etcd_endpoints=tuple(self.etcd_endpoints),
            secrets_dir=postgres.secrets_dir(self.state_dir),
            log_path=self.logs_dir / f"{name}.log",
            pid_path=self.run_dir / f"{name}.pid",
        )

    @property
    def ha_shards(self) -> list[HaShard]:
        return [
            HaShard(
                name=f"shard-{index}",
                members=tuple(self.patroni_member(index, member) for member in range(patroni.MEMBERS_PER_SHARD)),
                secrets_dir=postgres.secrets_dir(self.state_dir),
            )
            for index in range(self.settings.shard_count)
        ]

    @property
    def patroni_members(self) -> list[PatroniMember]:
        return [member for shard in self.ha_shards for member in shard.members] if self.is_ha else []

    @property
    def etcd_members(self) -> list[Etcd] | list[EtcdMember]:
        """The single topology's one etcd, or the HA topology's three members."""
        if not self.is_ha:
            return [self.etcd]
        base = self.settings.port_base
        names = [f"etcd-{index}" for index in range(len(HA_ETCD_PORT_OFFSETS))]
        initial = tuple((name, f"http://{postgres.HOST}:{base + peer}") for name, (_, peer) in zip(names, HA_ETCD_PORT_OFFSETS))
        return [
            EtcdMember(
                name=name,
                data_dir=self.state_dir / "etcd" / name,
                log_path=self.logs_dir / f"{name}.log",
                pid_path=self.run_dir / f"{name}.pid",
                client_port=base + client,
                peer_port=base + peer,
                initial_cluster=initial,
            )
            for name, (client, peer) in zip(names, HA_ETCD_PORT_OFFSETS)
        ]

    @property
    def etcd_endpoints(self) -> list[str]:
        return [member.endpoint for member in self.etcd_members]

    @property
    def etcd_endpoints_argument(self) -> str:
        """What the services' --etcd takes: every member, comma-separated."""
        return ",".join(self.etcd_endpoints)

    @property
    def etcd(self) -> Etcd:
        return Etcd(
            data_dir=self.state_dir / "etcd",
            log_path=self.logs_dir / "etcd.log",
            pid_path=self.run_dir / "etcd.pid",
            client_port=self.settings.port_base + ETCD_CLIENT_PORT_OFFSET,
            peer_port=self.settings.port_base + ETCD_PEER_PORT_OFFSET,
        )

    def grpc_worker(self, index: int) -> GrpcWorker:
        return GrpcWorker(
            index=index,
            grpc_port=self.settings.port_base + GRPC_PORT_OFFSET,
            metrics_port=self.settings.port_base + METRICS_PORT_OFFSET + index,
            etcd_endpoint=self.etcd_endpoints_argument,
            log_path=self.logs_dir / f"grpc-{index}.log",
            pid_path=self.run_dir / f"grpc-{index}.pid",
            auth_dir=self.auth_dir,
        )

    @property
    def grpc_workers(self) -> list[GrpcWorker]:
        return [self.grpc_worker(index) for index in range(self.settings.grpc_workers)]

    def coordinator(self, index: int) -> Coordinator:
        return Coordinator(
            index=index,
            metrics_port=self.settings.port_base + COORDINATOR_METRICS_PORT_OFFSET + index,
            etcd_endpoint=self.etcd_endpoints_argument,
            log_path=self.logs_dir / f"coordinator-{index}.log",
            pid_path=self.run_dir / f"coordinator-{index}.pid",
            audit_passfile=postgres.passfile_path(postgres.secrets_dir(self.state_dir), DatabaseRole.AUDITOR),
        )

    @property
    def coordinators(self) -> list[Coordinator]:
        """None until services/coordinator exists (issue 3): a cluster without them still comes up."""
        if importlib.util.find_spec(COORDINATOR_MODULE) is None:
            return []
        return [self.coordinator(index) for index in range(self.settings.coordinators)]

    def postgres_exporter(self, shard: PostgresShard | HaShard, index: int) -> monitoring.PostgresExporter:
        return monitoring.PostgresExporter(
            shard_name=shard.name,
            shard_port=shard.port,
            database=postgres.DATABASE_NAME,
            passfile=postgres.passfile_path(postgres.secrets_dir(self.state_dir), DatabaseRole.AUDITOR),
            port=self.settings.port_base + POSTGRES_EXPORTER_PORT_OFFSET + index,
            log_path=self.logs_dir / f"exporter-{shard.name}.log",
            pid_path=self.run_dir / f"exporter-{shard.name}.pid",
        )

    @property
    def postgres_exporters(self) -> list[monitoring.PostgresExporter]:
        return [self.postgres_exporter(shard, index) for index, shard in enumerate(self.shards)]

    @property
    def alertmanager(self) -> monitoring.Alertmanager:
        return monitoring.Alertmanager(
            storage_dir=self.state_dir / "alertmanager",
            port=self.settings.port_base + ALERTMANAGER_PORT_OFFSET,
            log_path=self.logs_dir / "alertmanager.log",
            pid_path=self.run_dir / "alertmanager.pid",
        )

    @property
    def prometheus(self) -> monitoring.Prometheus:
        return monitoring.Prometheus(
            home_dir=self.state_dir / "prometheus",
            port=self.settings.port_base + PROMETHEUS_PORT_OFFSET,
            alertmanager_endpoint=self.alertmanager.endpoint,
            log_path=self.logs_dir / "prometheus.log",
            pid_path=self.run_dir / "prometheus.pid",
        )

    @property
    def supervisor(self) -> Supervisor:
        return Supervisor(
            state_dir=self.state_dir,
            policy=self.restart_policy,
            port=self.settings.port_base + SUPERVISOR_METRICS_PORT_OFFSET,
            log_path=self.logs_dir / "supervisor.log",
            pid_path=self.run_dir / "supervisor.pid",
        )

    def scrape_targets(self) -> list[monitoring.ScrapeTarget]:
        """What Prometheus scrapes: the jobs and labels of deploy/prometheus/metrics.md."""
        target = monitoring.ScrapeTarget
        return [
            *(target(monitoring.JOB_GRPC, w.metrics_endpoint, {"process": w.name}) for w in self.grpc_workers),
            *(target(monitoring.JOB_COORDINATOR, c.metrics_endpoint, {"process": c.name}) for c in self.coordinators),
            *(target(monitoring.JOB_ETCD, e.endpoint, {"process": e.name}) for e in self.etcd_members),
            *(
                target(monitoring.JOB_POSTGRES, e.endpoint, {"process": e.shard_name, "shard": e.shard_name})
                for e in self.postgres_exporters
            ),
            target(monitoring.JOB_PROMETHEUS, self.prometheus.endpoint, {"process": self.prometheus.name}),
            target(monitoring.JOB_ALERTMANAGER, self.alertmanager.endpoint, {"process": self.alertmanager.name}),
            target(monitoring.JOB_SUPERVISOR, self.supervisor.endpoint, {"process": self.supervisor.name}),
        ]

    def _surplus_coordinators(self) -> list[Coordinator]:
        surplus = []
        for pid_path in self.run_dir.glob("coordinator-*.pid"):
            index = pid_path.stem.removeprefix("coordinator-")
            if index.isdigit() and int(index) >= len(self.coordinators):
                surplus.append(self.coordinator(int(index)))
        return surplus

    def _surplus_grpc_workers(self) -> list[GrpcWorker]:
        """Workers left over from an earlier, larger GRPC_WORKERS."""
        surplus = []
        for pid_path in self.run_dir.glob("grpc-*.pid"):
            index = pid_path.stem.removeprefix("grpc-")
            if index.isdigit() and int(index) >= self.settings.grpc_workers:
                surplus.append(self.grpc_worker(int(index)))
        return surplus

    def components(self) -> list[tuple[str, Component]]:
        """(role, component) in start order: shards, etcd, gRPC workers, coordinators, the
        supervisor, the monitoring."""
        found: list[tuple[str, Component]]
        if self.is_ha:
            # etcd first: Patroni finds its shard's primary there.
            found = [(ROLE_ETCD, member) for member in self.etcd_members]
            found += [(ROLE_PATRONI, member) for member in self.patroni_members]
        else:
            found = [(ROLE_POSTGRES, shard) for shard in self.shards]
            found.append((ROLE_ETCD, self.etcd))
        found += [(ROLE_GRPC, worker) for worker in self.grpc_workers]
        found += [(ROLE_COORDINATOR, coordinator) for coordinator in self.coordinators]
        found.append((ROLE_SUPERVISOR, self.supervisor))
        found += [(ROLE_POSTGRES_EXPORTER, exporter) for exporter in self.postgres_exporters]
        found.append((ROLE_ALERTMANAGER, self.alertmanager))
        found.append((ROLE_PROMETHEUS, self.prometheus))
        return found

    def component(self, name: str) -> Component:
        for _, component in self.components():
            if component.name == name:
                return component
        raise KeyError(f"no process named {name!r}; known: {[c.name for _, c in self.components()]}")

    # Lifecycle.

    def up(self) -> dict:
        """Start whatever is not running, wait until all is healthy; return cluster.json's content.

        Also: no process stays held, the supervisor may restart each process again, and
        Prometheus reads its config and rules anew.
        """
        with self.locked():
            self.settings.save(self.settings_path)
            started_seconds = time.monotonic()
            supervisor.release_all(self.run_dir)
            ledger = supervisor.RestartLedger(self.run_dir)
            ledger.reset_limits()
            ledger.save()
            if self.is_ha:
                self._start_etcd()
                self._up_ha_shards()
            else:
                # initdb and the first start take seconds each; run the shards side by side.
                with concurrent.futures.ThreadPoolExecutor(max_workers=self.settings.shard_count) as executor:
                    list(executor.map(self._up_shard, self.shards))
                self._start_etcd()
            self._bootstrap_shard_map()
            self._ensure_identities()
            for worker in self._surplus_grpc_workers():
                log.info("stopping %s (GRPC_WORKERS is now %d)", worker.name, self.settings.grpc_workers)
                worker.stop()
                worker.pid_path.unlink(missing_ok=True)
            if importlib.util.find_spec("services.server") is None:
                raise ClusterError("services/server.py does not exist yet: PostgreSQL and etcd are up, no gRPC server")
            for worker in self.grpc_workers:
                self._spawn_grpc_worker(worker)
            for worker in self.grpc_workers:
                worker.wait_healthy()
            for coordinator in self._surplus_coordinators():
                coordinator.stop()
                coordinator.pid_path.unlink(missing_ok=True)
            for coordinator in self.coordinators:
                self._spawn_coordinator(coordinator)
            for coordinator in self.coordinators:
                coordinator.wait_healthy()
            # The services are usable from here on, whatever becomes of the monitoring.
            write_json_atomically(self.cluster_json_path, self.describe())
            # It reads whether to restart from the settings saved above, at every round.
            self._start_component(self.supervisor)
            for exporter in self.postgres_exporters:
                self._start_component(exporter)
            monitoring.write_targets(self.prometheus.targets_dir, self.scrape_targets())
            self._start_component(self.alertmanager)
            self._start_component(self.prometheus)
            description = self.describe()
            write_json_atomically(self.cluster_json_path, description)
            log.info("cluster up in %.1fs", time.monotonic() - started_seconds)
            return description

    def _ensure_identities(self) -> None:
        """The CA, a certificate per process and per client of ours, and a token signing key."""
        from services.auth import pki, tokens

        authority = pki.CertificateAuthority(self.auth_dir)
        for worker in self.grpc_workers:
            authority.issue(worker.name, server=True)
        for coordinator in self.coordinators:
            authority.issue(coordinator.name)
        for client in (ADMIN_CLIENT_CERTIFICATE, PROBE_CERTIFICATE):
            authority.issue(client)
        tokens.ensure_signing_key(self.auth_dir)

    def _auth_description(self) -> dict:
        """cluster.json's "auth": what any tool needs to call the cluster as admin."""
        from services.auth import pki, tokens
        from services.ledger.access import Role

        authority = pki.CertificateAuthority(self.auth_dir)
        client = authority.paths(ADMIN_CLIENT_CERTIFICATE)
        return {
            "ca_cert": str(authority.cert_path),
            "client_cert": str(client.cert),
            "client_key": str(client.key),
            "admin_token": tokens.mint(self.auth_dir, Role.ADMIN, ADMIN_SUBJECT, tokens.TOKEN_TTL_SECONDS_MAX),
        }

    def _up_ha_shards(self) -> None:
        """Every Patroni member at once (the members of a shard elect their primary together), then
        per shard: the roles and schema on its primary, and replicas streaming, one synchronous."""
        for member in self.patroni_members:
            self._spawn_patroni_member(member)
        with concurrent.futures.ThreadPoolExecutor(max_workers=self.settings.shard_count) as executor:
            list(executor.map(self._up_ha_shard, self.ha_shards))

    def _up_ha_shard(self, shard: HaShard) -> None:
        shard.ensure_database()
        for member in shard.members:
            member.wait_healthy()
        shard.wait_replicated()

    def _spawn_patroni_member(self, member: PatroniMember) -> None:
        if member.is_running():
            return
        self._check_ports_free(member.name, [member.pg_port, member.rest_port])
        member.start()

    def _up_shard(self, shard: PostgresShard) -> None:
        shard.init()
        if not shard.is_running():
            self._check_ports_free(shard.name, [shard.port])
        shard.start()

    def _check_ports_free(self, name: str, ports: list[int]) -> None:
        """Fail clearly when a port of the plan belongs to someone else.

        Worse than a failed start: a stranger's gRPC server that also set
        SO_REUSEPORT would share our gRPC port and take part of our traffic.
        """
        taken = [port for port in ports if not processes.port_is_free(port)]
        if taken:
            raise ClusterError(
                f"cannot start {name}: port {', '.join(map(str, taken))} is in use by a process that is not "
                f"this cluster's (another cluster on port base {self.settings.port_base}?); "
                "stop it or choose another COREBANK_PORT_BASE"
            )

    def _start_etcd(self) -> None:
        if self.is_ha:
            # All members before waiting on any: a member is healthy only once a quorum runs.
            for member in self.etcd_members:
                if not member.is_running():
                    self._check_ports_free(member.name, [member.client_port, member.peer_port])
                    member.spawn()
            for member in self.etcd_members:
                member.wait_healthy()
            return
        etcd = self.etcd
        if not etcd.is_running():
            self._check_ports_free(etcd.name, [etcd.client_port, etcd.peer_port])
        etcd.start()

    def healthy_etcd_endpoint(self) -> str:
        """The first etcd member that answers its health check (deploy's own calls to etcd)."""
        for member in self.etcd_members:
            if member.is_healthy():
                return member.endpoint
        return self.etcd_endpoints[0]

    def _spawn_grpc_worker(self, worker: GrpcWorker) -> None:
        if worker.is_running():
            return
        ports = [worker.metrics_port]
        if not any(other.is_running() for other in self.grpc_workers):
            ports.append(worker.grpc_port)  # shared by our own workers, nobody else's
        self._check_ports_free(worker.name, ports)
        worker.spawn()

    def _start_component(self, component: monitoring.Prometheus | monitoring.Alertmanager | monitoring.PostgresExporter | Supervisor) -> None:
        """Start (a running Prometheus: reload) one of the processes that serve one port."""
        if not component.is_running():
            self._check_ports_free(component.name, [component.port])
        component.start()

    def _spawn_coordinator(self, coordinator: Coordinator) -> None:
        if coordinator.is_running():
            return
        self._check_ports_free(coordinator.name, [coordinator.metrics_port])
        coordinator.spawn()

    def _bootstrap_shard_map(self) -> None:
        from sharding.etcd_shard_map import bootstrap, etcd_client, publish
        from sharding.shard_map import Shard, ShardMap

        proposed = ShardMap.evenly([Shard(shard.name, shard.dsn) for shard in self.shards])

        async def run() -> ShardMap:
            client = etcd_client(self.healthy_etcd_endpoint())
            try:
                current = await asyncio.wait_for(bootstrap(client, proposed), SHARD_MAP_BOOTSTRAP_TIMEOUT_SECONDS)
                if postgres.only_passfiles_added(current.shards, proposed.shards):
                    # A map stored before the database roles had passwords: same shards, now with their passfiles.
                    current = dataclasses.replace(current, version=current.version + 1, shards=proposed.shards)
                    await asyncio.wait_for(publish(client, current), SHARD_MAP_BOOTSTRAP_TIMEOUT_SECONDS)
                return current
            finally:
                await client.close()

        current = asyncio.run(run())
        if current.shards != proposed.shards:
            log.warning("warning: the shard map in etcd (version %d) differs from this cluster's shards", current.version)

    def down(self) -> None:
        """Stop the supervisor first (so that it restarts nothing), then the services, the
        monitoring, etcd and PostgreSQL; all data stays."""
        if not self.state_dir.exists():
            return
        with self.locked():
            # Held before any is signalled: `status` says "down", not "dead", and a supervisor
            # would restart none of them (it is stopped first anyway).
            for _, component in self.components():
                supervisor.hold(self.run_dir, component.name, supervisor.HELD_BY_DOWN)
            self.supervisor.stop()
            for coordinator in self.coordinators + self._surplus_coordinators():
                coordinator.stop()
            for worker in self.grpc_workers + self._surplus_grpc_workers():
                worker.stop()
            self.prometheus.stop()
            self.alertmanager.stop()
            for exporter in self.postgres_exporters:
                exporter.stop()
            if self.is_ha:
                # Replicas before primaries, so that no member takes over from one being stopped.
                members = self.patroni_members
                primaries = {member.name for member in members if member.role() == patroni.ROLE_PRIMARY}
                for member in sorted(members, key=lambda member: member.name in primaries):
                    member.stop()
                for member in self.etcd_members:
                    member.stop()
                return
            self.etcd.stop()
            for shard in self.shards:
                shard.stop()

    def clean(self) -> None:
        """down, then remove the state folder."""
        if not self.state_dir.exists():
            return
        if not self.exists() and any(self.state_dir.iterdir()):
            # Guard against COREBANK_STATE_DIR pointing somewhere that is not ours.
            raise ClusterError(f"{self.state_dir} holds no {SETTINGS_FILE}; not removing it")
        self.down()
        shutil.rmtree(self.state_dir)

    def status(self) -> list[ProcessStatus]:
        """Every process's state, in start order; the probes run side by side (see the module's docstring)."""
        ledger = supervisor.RestartLedger(self.run_dir)
        components = self.components()
        with concurrent.futures.ThreadPoolExecutor(max_workers=min(len(components), STATUS_PROBES_MAX)) as executor:
            return list(executor.map(lambda found: self._status_of(*found, ledger.by_name.get(found[1].name)), components))

    def _status_of(self, role: str, component: Component, restarts: supervisor.ProcessRestarts | None) -> ProcessStatus:
        restarts = restarts or supervisor.ProcessRestarts()
        pid = component.pid()
        note = ""
        if pid is None:
            held_reason = supervisor.held_reason(self.run_dir, component.name)
            if held_reason is not None:
                state, note = DOWN, f"held down: {held_reason}; `make up` starts it"
            else:
                state = DEAD
                if restarts.gave_up:
                    note = f"the supervisor gave up after {len(restarts.recent_seconds)} restarts; `make up` starts it"
                elif not self.settings.supervised:
                    note = "nothing restarts it (up --no-restarts); `make up` starts it"
        elif processes.is_stopped(pid):
            state = STOPPED  # a health check would only time out
            note = "frozen (SIGSTOP); `kill -CONT` resumes it"
        else:
            # Each is_healthy() is bounded: a new connection with its connect timeout, an HTTP GET or
            # a gRPC health check with theirs.
            state = HEALTHY if component.is_healthy() else UNHEALTHY
            if role == ROLE_SUPERVISOR and not self.settings.supervised:
                note = "watches only: restarts nothing (up --no-restarts)"
        uptime = None if pid is None else processes.uptime_seconds(pid)
        return ProcessStatus(component.name, role, pid, state, component.endpoint, uptime, restarts.restarts, note, restarts.gave_up)

    def is_healthy(self) -> bool:
        return all(process.state == HEALTHY for process in self.status())

    def describe(self) -> dict:
        """cluster.json's content, with the pids as they are now."""
        shards = self.shards
        workers = self.grpc_workers
        coordinators = self.coordinators
        return {
            "topology": self.settings.topology,
            "grpc_endpoint": self.grpc_endpoint,
            # The first member; "etcd_endpoints" lists them all (one in the single topology).
            "etcd_endpoint": self.etcd_endpoints[0],
            "etcd_endpoints": self.etcd_endpoints,
            # Every corebank process that serves metrics: gRPC workers, then coordinators.
            "metrics_endpoints": [process.metrics_endpoint for process in [*workers, *coordinators]],
            "prometheus_url": self.prometheus.url,
            "alertmanager_url": self.alertmanager.url,
            "shards": [
                {
                    "name": s.name, "dsn": s.dsn, "pid": s.pid(), "port": s.port, "data_dir": str(s.data_dir),
                    # Each role's own DSN (services/storage/roles.py); "dsn" is the service role's.
                    # Passwords stay in the passfiles the DSNs name; the superuser only on the socket.
                    "owner_dsn": s.owner_dsn, "auditor_dsn": s.auditor_dsn, "superuser_dsn": s.superuser_dsn(),
                    "members": self._members_description(s),
                }
                for s in shards
            ],
            "processes": [
                *({"name": w.name, "role": ROLE_GRPC, "pid": w.pid(), "metrics": w.metrics_endpoint} for w in workers),
                *({"name": e.name, "role": ROLE_ETCD, "pid": e.pid()} for e in self.etcd_members),
                *(
                    ({"name": m.name, "role": ROLE_PATRONI, "pid": m.pid(), "shard": m.scope} for m in self.patroni_members)
                    if self.is_ha
                    else ({"name": s.name, "role": ROLE_POSTGRES, "pid": s.pid()} for s in shards)
                ),
                *(
                    {"name": c.name, "role": ROLE_COORDINATOR, "pid": c.pid(), "metrics": c.metrics_endpoint}
                    for c in coordinators
                ),
                # Not corebank's metrics: "endpoint", never "metrics" (tools scrape every "metrics").
                *(
                    {"name": e.name, "role": ROLE_POSTGRES_EXPORTER, "pid": e.pid(), "endpoint": e.endpoint, "shard": e.shard_name}
                    for e in self.postgres_exporters
                ),
                {"name": self.alertmanager.name, "role": ROLE_ALERTMANAGER, "pid": self.alertmanager.pid(), "endpoint": self.alertmanager.endpoint},
                {"name": self.prometheus.name, "role": ROLE_PROMETHEUS, "pid": self.prometheus.pid(), "endpoint": self.prometheus.endpoint},
                {"name": self.supervisor.name, "role": ROLE_SUPERVISOR, "pid": self.supervisor.pid(), "endpoint": self.supervisor.endpoint},
            ],
            "state_dir": str(self.state_dir),
            "auth": self._auth_description(),
            # Clearing (services/ledger/clearing.py): the participant accounts belong to when opened
            # without one, and the shard that holds the registry (participants, windows, settlements).
            "hosting_participant_id": HOSTING_PARTICIPANT_ID,
            "clearing_home_shard": self.clearing_home_shard(),
        }

    def _members_description(self, shard: PostgresShard | HaShard) -> list[dict]:
        """cluster.json's "members" of a shard: the shard itself in the single topology; in the HA
        one each member's own DSN (the service role's, to that member alone), Patroni's pid, its
        role now ("primary" or "replica", None when its Patroni does not answer) and REST API."""
        if isinstance(shard, PostgresShard):
            return [{"name": shard.name, "dsn": shard.dsn, "pid": shard.pid(), "role": patroni.ROLE_PRIMARY, "port": shard.port}]
        return [
            {
                "name": member.name,
                "dsn": postgres.dsn(member.pg_port, passfile=postgres.passfile_path(shard.secrets_dir, DatabaseRole.SERVICE)),
                "pid": member.pid(),
                "postmaster_pid": member.postmaster_pid(),
                "role": member.role(),
                "host": member.host,
                "port": member.pg_port,
                "rest_url": member.rest_url,
                "data_dir": str(member.data_dir),
                "superuser_dsn": member.superuser_dsn(),
            }
            for member in shard.members
        ]

    def clearing_home_shard(self) -> str:
        """The shard the clearing registry lives on, by the map `up` proposes for these shards (a
        map in etcd that differs is warned about at `up`)."""
        from sharding.shard_map import Shard, ShardMap

        return ShardMap.evenly([Shard(shard.name, shard.dsn) for shard in self.shards]).shard_name_for_key(CLEARING_HOME_KEY)

    # One process at a time (fault injection in tests).

    def pid(self, name: str) -> int | None:
        return self.component(name).pid()

    def start(self, name: str) -> None:
        """Start one process by name ("grpc-0", "etcd", "shard-1", "prometheus") and wait until
        healthy; it is held down no more."""
        with self.locked():
            component = self.component(name)
            supervisor.release(self.run_dir, name)
            if isinstance(component, (monitoring.Prometheus, monitoring.Alertmanager, monitoring.PostgresExporter, Supervisor)):
                self._start_component(component)
            elif isinstance(component, PostgresShard):
                self._up_shard(component)
            elif isinstance(component, Etcd):
                self._start_etcd()
            elif isinstance(component, EtcdMember):
                component.start()
            elif isinstance(component, PatroniMember):
                self._spawn_patroni_member(component)
                component.wait_healthy()
            elif isinstance(component, Coordinator):
                self._spawn_coordinator(component)
                component.wait_healthy()
            else:
                assert isinstance(component, GrpcWorker)
                self._spawn_grpc_worker(component)
                component.wait_healthy()
            write_json_atomically(self.cluster_json_path, self.describe())

    def stop(self, name: str) -> None:
        """Stop one process gracefully (SIGTERM; `pg_ctl stop -m fast` for a shard); it is
        held down (the supervisor leaves it) until `start(name)` or `up`."""
        with self.locked():
            component = self.component(name)
            supervisor.hold(self.run_dir, name, supervisor.HELD_BY_STOP)
            component.stop()

    def kill(self, name: str, signal_number: int = signal.SIGKILL) -> None:
        """Signal one process (default SIGKILL: a crash); for a shard, its postmaster; for an HA
        member, its Patroni's and its postmaster's whole process groups. A
        signal that may end it holds it down like `stop`: fault injection heals its own
        faults (`start(name)`). SIGSTOP and SIGCONT pause and resume; nothing to hold."""
        component = self.component(name)
        if signal_number not in PAUSE_SIGNALS:
            supervisor.hold(self.run_dir, name, supervisor.HELD_BY_KILL)  # before the signal: see supervisor._restart_dead
        component.kill(signal_number)

    @contextlib.contextmanager
    def locked(self, timeout_seconds: float = LOCK_TIMEOUT_SECONDS) -> Iterator[None]:
        """One lifecycle command at a time per state folder (two `make up` at once; the
        supervisor, which waits for nobody: timeout 0). TimeoutError when not acquired."""
        if self._lock_depth == 0:
            self.state_dir.mkdir(parents=True, exist_ok=True)
            # PostgreSQL (run as the postgres user) must reach into the state folder.
            self.state_dir.chmod(0o755)
            for folder in (self.logs_dir, self.run_dir):
                folder.mkdir(exist_ok=True)
            lock_file = os.open(self.state_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)

            def acquired() -> bool:
                try:
                    fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    return True
                except BlockingIOError:
                    return False

            try:
                processes.wait_until(acquired, timeout_seconds, f"lock {self.state_dir / LOCK_FILE}")
            except BaseException:
                os.close(lock_file)
                raise
            self._lock_file = lock_file
        self._lock_depth += 1
        try:
            yield
        finally:
            self._lock_depth -= 1
            if self._lock_depth == 0 and self._lock_file is not None:
                os.close(self._lock_file)  # closing releases the flock
                self._lock_file = None


# The command line.


def format_uptime(seconds: float | None) -> str:
    """3d4h, 2h5m, 4m10s or 12s: the two largest units."""
    if seconds is None:
        return "-"
    whole = int(seconds)
    days, hours, minutes = whole // 86400, whole // 3600 % 24, whole // 60 % 60
    if days:
        return f"{days}d{hours}h"
    if hours:
        return f"{hours}h{minutes}m"
    if minutes:
        return f"{minutes}m{whole % 60}s"
    return f"{whole}s"


def print_status(statuses: list[ProcessStatus]) -> None:
    rows = [("NAME", "ROLE", "PID", "STATE", "UPTIME", "RESTARTS", "ENDPOINT", "NOTE")]
    rows += [
        (s.name, s.role, str(s.pid or "-"), s.state, format_uptime(s.uptime_seconds), str(s.restarts), s.endpoint, s.note)
        for s in statuses
    ]
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())


def print_replication(cluster: Cluster) -> None:
    """TOPOLOGY=ha: per shard, its primary, its replicas (sync or not, streaming or not) and how
    far behind each is, from Patroni's /cluster."""
    rows = [("SHARD", "MEMBER", "ROLE", "STATE", "TIMELINE", "LAG")]
    for shard in cluster.ha_shards:
        members = shard.topology()
        if not members:
            rows.append((shard.name, "-", "-", "no Patroni answers", "-", "-"))
        for member in members:
            lag = member.get("lag", "")
            rows.append((
                shard.name, str(member.get("name", "?")), str(member.get("role", "?")), str(member.get("state", "?")),
                str(member.get("timeline", "-")), "-" if lag in ("", None) else f"{lag} bytes" if isinstance(lag, int) else str(lag),
            ))  # fmt: skip
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    print()
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())


def print_monitoring_urls(prometheus_url: str, alertmanager_url: str, states: dict[str, str] | None = None) -> None:
    """With `states` (name -> state), a URL whose process is not healthy says so: it does not answer."""
    states = states or {}
    for name, url in ((ROLE_PROMETHEUS, prometheus_url), (ROLE_ALERTMANAGER, alertmanager_url)):
        state = states.get(name, HEALTHY)
        print(f"{name:<12} {url}" + ("" if state == HEALTHY else f" ({state}: not answering)"))


def env_int(name: str) -> int | None:
    value = os.environ.get(name, "").strip()
    if not value:
        return None
    try:
        return int(value)
    except ValueError:
        raise SystemExit(f"{name}={value!r} is not a whole number") from None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m deploy.cluster", description="Run a local corebank cluster.")
    parser.add_argument("command", choices=["up", "down", "status", "clean"])
    parser.add_argument("--state-dir", default=os.environ.get("COREBANK_STATE_DIR") or DEFAULT_STATE_DIR,
                        help="env COREBANK_STATE_DIR; default %(default)s")  # fmt: skip
    parser.add_argument("--shards", type=int, default=env_int("SHARDS"),
                        help=f"env SHARDS; default {DEFAULT_SHARD_COUNT}; only used on first start")  # fmt: skip
    parser.add_argument("--port-base", type=int, default=env_int("COREBANK_PORT_BASE"),
                        help=f"env COREBANK_PORT_BASE; default {DEFAULT_PORT_BASE}; only used on first start")  # fmt: skip
    parser.add_argument("--grpc-workers", type=int, default=env_int("GRPC_WORKERS"),
                        help=f"env GRPC_WORKERS; default {DEFAULT_GRPC_WORKERS}")  # fmt: skip
    parser.add_argument("--coordinators", type=int, default=env_int("COORDINATORS"),
                        help=f"env COORDINATORS; default {DEFAULT_COORDINATORS}")  # fmt: skip
    parser.add_argument("--topology", choices=TOPOLOGIES, default=os.environ.get("TOPOLOGY") or None,
                        help=f"env TOPOLOGY; default {TOPOLOGY_SINGLE}; only used on first start")  # fmt: skip
    parser.add_argument("--no-restarts", action="store_true",
                        help="up: the supervisor only watches, it restarts nothing (kept for later `up`s until one without this flag)")  # fmt: skip
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    args = parse_args(argv)
    try:
        cluster = Cluster(
            args.state_dir, shard_count=args.shards, port_base=args.port_base, grpc_workers=args.grpc_workers,
            coordinators=args.coordinators, topology=args.topology,
            # `make up` has the supervisor restart; the other commands leave the setting as it is.
            supervised=(not args.no_restarts) if args.command == "up" else None,
        )  # fmt: skip
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    try:
        if args.command == "up":
            description = cluster.up()
            print(f"gRPC      {description['grpc_endpoint']}")
            print(f"etcd      {','.join(description['etcd_endpoints'])}")
            print(f"metrics   {' '.join(description['metrics_endpoints'])}")
            for shard in description["shards"]:
                print(f"{shard['name']:<9} {shard['dsn']}")
            print_monitoring_urls(description["prometheus_url"], description["alertmanager_url"])
            print(f"written   {cluster.cluster_json_path}")
            return 0
        if args.command == "status":
            if not cluster.exists():
                print(f"no cluster in {cluster.state_dir}: everything is down (run `make up`)")
                return 1
            statuses = cluster.status()
            print_status(statuses)
            if cluster.is_ha:
                print_replication(cluster)
            print_monitoring_urls(cluster.prometheus.url, cluster.alertmanager.url, {s.name: s.state for s in statuses})
            if all(s.state == DOWN for s in statuses):
                print(f"the cluster in {cluster.state_dir} is down, on purpose (`make down`); `make up` starts it")
                return 1
            unhealthy = [f"{s.name} ({s.state})" for s in statuses if s.state != HEALTHY]
            if unhealthy:
                print(
                    f"not healthy: {', '.join(unhealthy)}; `make up` starts dead and down processes, "
                    "`kill -CONT PID` resumes stopped ones, the logs under "
                    f"{cluster.logs_dir} tell about unhealthy ones"
                )
                return 1
            return 0
        if args.command == "down":
            cluster.down()
            print(f"cluster in {cluster.state_dir} is down; data kept")
            return 0
        cluster.clean()
        print(f"removed {cluster.state_dir}")
        return 0
    except (ClusterError, RuntimeError, TimeoutError, FileNotFoundError, PermissionError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
