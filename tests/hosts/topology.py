"""corebank on several hosts: every etcd member, shard member and service in a network namespace of its own.

    with HostsCluster(state_dir, shard_count=1) as hosts:
        description = hosts.description   # cluster.json's shape, as tests/chaos/bank.py reads it
        hosts.network.partition(...)      # tests/fixtures/netns.py

Hosts (tests/fixtures/netns.py gives each an address of 10.212.0.0/24 on a private bridge):
    etcd0, etcd1, etcd2       one etcd member each, one etcd cluster of three
    pg<s><a|b|c>              the three Patroni members of shard s (deploy/patroni.py)
    svc                       one gRPC worker (python -m services.server)
    coord                     one coordinator (python -m services.coordinator)
The test process stays in the root namespace and calls the service (and reads the shards) over
the bridge, like any client on another machine.

Inside a namespace every port is free, so every host uses the same well-known ports.

Patroni members come from deploy/patroni.py (PatroniMember, HaShard: config, start with an argv
prefix, kill of the whole member, roles and schema on the primary). The etcd members are started
here: each is one etcd process with the three-member initial cluster.
"""

from __future__ import annotations

import asyncio
import json
import pathlib
import shutil
import sys
import urllib.request

import psycopg

from deploy import etcd, patroni, postgres, processes
from deploy.grpc_worker import PROBE_CERTIFICATE, grpc_is_serving, metrics_answer
from sharding import etcd_shard_map
from sharding.shard_map import Shard, ShardMap
from services.auth import auth_dir, pki, tokens
from services.ledger.access import Role
from services.storage.roles import DatabaseRole
from tests.fixtures import netns

ETCD_MEMBERS = 3
ETCD_CLIENT_PORT = 2379
ETCD_PEER_PORT = 2380
PG_PORT = 5432
PATRONI_REST_PORT = 8008
GRPC_PORT = 7100
GRPC_METRICS_PORT = 7110
COORDINATOR_METRICS_PORT = 7120
MEMBER_SUFFIXES = ("a", "b", "c")
assert len(MEMBER_SUFFIXES) == patroni.MEMBERS_PER_SHARD
SERVICE_HOST = "svc"
COORDINATOR_HOST = "coord"
CLUSTER_TOKEN = f"{netns.NAME_PREFIX}-etcd"

ETCD_START_TIMEOUT_SECONDS = 60
ETCD_HEALTH_TIMEOUT_SECONDS = 2
SERVICE_START_TIMEOUT_SECONDS = 90
SHARD_MAP_TIMEOUT_SECONDS = 30
# The superuser's check of one member (pg_is_in_recovery through its unix socket).
MEMBER_PROBE_TIMEOUT_SECONDS = 1

ADMIN_CLIENT_CERTIFICATE = "admin"
ADMIN_SUBJECT = "hosts-admin"
GRPC_NAME = "grpc-0"
COORDINATOR_NAME = "coordinator-0"


def etcd_host(index: int) -> str:
    return f"etcd{index}"


def member_host(shard_index: int, suffix: str) -> str:
    return f"pg{shard_index}{suffix}"


def host_names(shard_count: int) -> list[str]:
    return [
        *(etcd_host(i) for i in range(ETCD_MEMBERS)),
        *(member_host(s, suffix) for s in range(shard_count) for suffix in MEMBER_SUFFIXES),
        SERVICE_HOST,
        COORDINATOR_HOST,
    ]


def write_any_host_passfiles(secrets_dir: pathlib.Path) -> None:
    """The roles' passfiles, for any host: deploy/postgres.py writes its lines for 127.0.0.1 (a
    single machine), and libpq matches a passfile line's host against the DSN's. ensure_password
    keeps a passfile that exists, so the roles' passwords are these."""
    import secrets

    secrets_dir.mkdir(mode=postgres.SECRETS_DIR_MODE, parents=True, exist_ok=True)
    for role in DatabaseRole:
        path = postgres.passfile_path(secrets_dir, role)
        if not path.exists():
            password = secrets.token_urlsafe(postgres.PASSWORD_BYTES)
            pki.write_private(path, f"*:*:{postgres.DATABASE_NAME}:{role}:{password}\n".encode())


class HostsCluster:
    """The whole topology on the hosts of one netns.Network; a context manager that removes it all."""

    def __init__(self, state_dir: pathlib.Path, shard_count: int = 1) -> None:
        self.state_dir = pathlib.Path(state_dir).absolute()
        self.shard_count = shard_count
        self.network = netns.Network(host_names(shard_count))
        self.description: dict = {}

    # Layout.

    @property
    def secrets_dir(self) -> pathlib.Path:
        return postgres.secrets_dir(self.state_dir)

    @property
    def logs_dir(self) -> pathlib.Path:
        return self.state_dir / "logs"

    @property
    def auth_dir(self) -> pathlib.Path:
        return auth_dir(self.state_dir)

    def address(self, host: str) -> str:
        return self.network.address(host)

    @property
    def etcd_hosts(self) -> list[str]:
        return [etcd_host(i) for i in range(ETCD_MEMBERS)]

    @property
    def etcd_endpoints(self) -> tuple[str, ...]:
        return tuple(f"{self.address(host)}:{ETCD_CLIENT_PORT}" for host in self.etcd_hosts)

    def member_hosts(self, shard_index: int) -> list[str]:
        return [member_host(shard_index, suffix) for suffix in MEMBER_SUFFIXES]

    def shard_name(self, shard_index: int) -> str:
        return f"shard-{shard_index}"

    def shard(self, shard_index: int) -> patroni.HaShard:
        hosts = self.member_hosts(shard_index)
        # pg_hba's addresses: the shard's members (replication) and the hosts that are its clients
        # (the service, the coordinator, the test process on the bridge).
        clients = (self.address(SERVICE_HOST), self.address(COORDINATOR_HOST), str(netns.BRIDGE_ADDRESS))
        allowed = tuple(self.address(host) for host in hosts) + clients
        members = tuple(
            patroni.PatroniMember(
                name=host, scope=self.shard_name(shard_index),
                member_dir=self.state_dir / "members" / host, pg_port=PG_PORT, rest_port=PATRONI_REST_PORT,
                etcd_endpoints=self.etcd_endpoints, secrets_dir=self.secrets_dir,
                log_path=self.logs_dir / f"{host}.log", pid_path=self.state_dir / "run" / f"{host}.pid",
                host=self.address(host), peer_addresses=allowed,
            )  # fmt: skip
            for host in hosts
        )
        return patroni.HaShard(self.shard_name(shard_index), members, self.secrets_dir)

    @property
    def shards(self) -> list[patroni.HaShard]:
        return [self.shard(index) for index in range(self.shard_count)]

    def host_of(self, member: patroni.PatroniMember) -> str:
        return member.name

    # Lifecycle.

    def __enter__(self) -> HostsCluster:
        try:
            self.up()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def up(self) -> dict:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.state_dir.chmod(0o755)  # the postgres user reaches the members' folders through it
        self.network.create()
        write_any_host_passfiles(self.secrets_dir)
        for host in self.etcd_hosts:
            self.start_etcd(host)
        processes.wait_until(self.etcd_healthy, ETCD_START_TIMEOUT_SECONDS, "etcd: three members healthy")
        for shard in self.shards:
            for member in shard.members:
                self.start_member(member)
        for shard in self.shards:
            shard.ensure_database()
            shard.wait_replicated()
        self.publish_shard_map()
        self.issue_identities()
        self.start_services()
        self.description = self.describe()
        return self.description

    def close(self) -> None:
        """Every process in every namespace (etcd, Patroni, PostgreSQL, the services), then the network."""
        self.network.close()

    # etcd.

    def etcd_argv(self, host: str) -> list[str]:
        address = self.address(host)
        initial = ",".join(f"{h}=http://{self.address(h)}:{ETCD_PEER_PORT}" for h in self.etcd_hosts)
        return [
            shutil.which("etcd") or "etcd",
            "--name", host,
            "--data-dir", str(self.state_dir / "etcd" / host),
            "--listen-client-urls", f"http://{address}:{ETCD_CLIENT_PORT}",
            "--advertise-client-urls", f"http://{address}:{ETCD_CLIENT_PORT}",
            "--listen-peer-urls", f"http://{address}:{ETCD_PEER_PORT}",
            "--initial-advertise-peer-urls", f"http://{address}:{ETCD_PEER_PORT}",
            "--initial-cluster", initial,
            "--initial-cluster-state", "new",
            "--initial-cluster-token", CLUSTER_TOKEN,
            "--logger", "zap", "--log-outputs", "stderr",
        ]  # fmt: skip

    def start_etcd(self, host: str) -> None:
        self.network.popen(host, self.etcd_argv(host), self.logs_dir / f"{host}.log")

    def etcd_member_healthy(self, host: str) -> bool:
        return etcd.answers_healthy(f"{self.address(host)}:{ETCD_CLIENT_PORT}")

    def etcd_healthy(self) -> bool:
        return all(self.etcd_member_healthy(host) for host in self.etcd_hosts)

    def etcd_leader(self) -> str | None:
        """The etcd member that leads now (etcd's /v3/maintenance/status, asked of each member)."""
        ids = {}
        leader_id = None
        for host in self.etcd_hosts:
            request = urllib.request.Request(
                f"http://{self.address(host)}:{ETCD_CLIENT_PORT}/v3/maintenance/status", data=b"{}", method="POST"
            )
            try:
                with urllib.request.urlopen(request, timeout=ETCD_HEALTH_TIMEOUT_SECONDS) as response:  # nosec B310 # a literal http:// URL to a test host
                    status = json.loads(response.read())
            except (OSError, ValueError):
                continue
            ids[status["header"]["member_id"]] = host
            leader_id = status.get("leader", leader_id)
        return ids.get(leader_id)

    # Shards.

    def start_member(self, member: patroni.PatroniMember) -> None:
        member.start(argv_prefix=self.network.hosts[self.host_of(member)].exec_prefix())

    def publish_shard_map(self) -> None:
        proposed = ShardMap.evenly([Shard(shard.name, shard.dsn) for shard in self.shards])

        async def run() -> None:
            client = etcd_shard_map.etcd_client(self.etcd_endpoints)
            try:
                await asyncio.wait_for(etcd_shard_map.bootstrap(client, proposed), SHARD_MAP_TIMEOUT_SECONDS)
            finally:
                await client.close()

        asyncio.run(run())

    def writable_members(self, shard: patroni.HaShard) -> tuple[list[str], list[str]]:
        """(members that answer as writable, members that answer at all): pg_is_in_recovery() as
        the superuser through each member's unix socket, so that a partitioned member still answers."""
        writable, answered = [], []
        for member in shard.members:
            try:
                with psycopg.connect(member.superuser_dsn(), connect_timeout=MEMBER_PROBE_TIMEOUT_SECONDS, autocommit=True) as connection:
                    in_recovery = connection.execute("SELECT pg_is_in_recovery()").fetchone()[0]
            except psycopg.Error:
                continue
            answered.append(member.name)
            if not in_recovery:
                writable.append(member.name)
        return writable, answered

    # The services.

    def issue_identities(self) -> None:
        """deploy.cluster's identities (CA, certificates, token key), the server's certificate for the service host's address."""
        authority = pki.CertificateAuthority(self.auth_dir)
        authority.issue(GRPC_NAME, server=True, ip_addresses=(self.address(SERVICE_HOST),))
        authority.issue(COORDINATOR_NAME)
        for client in (ADMIN_CLIENT_CERTIFICATE, PROBE_CERTIFICATE):
            authority.issue(client)
        tokens.ensure_signing_key(self.auth_dir)

    @property
    def grpc_endpoint(self) -> str:
        return f"{self.address(SERVICE_HOST)}:{GRPC_PORT}"

    @property
    def grpc_metrics_endpoint(self) -> str:
        return f"{self.address(SERVICE_HOST)}:{GRPC_METRICS_PORT}"

    @property
    def coordinator_metrics_endpoint(self) -> str:
        return f"{self.address(COORDINATOR_HOST)}:{COORDINATOR_METRICS_PORT}"

    def start_services(self) -> None:
        """One gRPC worker and one coordinator, as deploy/grpc_worker.py and deploy/coordinator.py start them."""
        etcd_list = etcd_shard_map.ENDPOINT_SEPARATOR.join(self.etcd_endpoints)
        python = [sys.executable, "-m"]
        env = processes.python_environment()
        self.network.popen(SERVICE_HOST, [
            *python, "services.server", "--listen", self.grpc_endpoint, "--metrics-listen", self.grpc_metrics_endpoint,
            "--etcd", etcd_list, "--process-name", GRPC_NAME, "--auth-dir", str(self.auth_dir), "--certificate", GRPC_NAME,
            "--log-file", str(self.logs_dir / f"{GRPC_NAME}.log"),
        ], self.logs_dir / f"{GRPC_NAME}.stderr.log", env=env)  # fmt: skip
        self.network.popen(COORDINATOR_HOST, [
            *python, "services.coordinator", "--metrics-listen", self.coordinator_metrics_endpoint, "--etcd", etcd_list,
            "--process-name", COORDINATOR_NAME,
            "--audit-passfile", str(postgres.passfile_path(self.secrets_dir, DatabaseRole.AUDITOR)),
            "--log-file", str(self.logs_dir / f"{COORDINATOR_NAME}.log"),
        ], self.logs_dir / f"{COORDINATOR_NAME}.stderr.log", env=env)  # fmt: skip

        def serving() -> bool:
            return (
                metrics_answer(self.grpc_metrics_endpoint)
                and grpc_is_serving(self.grpc_endpoint, self.auth_dir)
                and metrics_answer(self.coordinator_metrics_endpoint)
            )

        def died() -> str | None:
            gone = [child for child in self.network.children[-2:] if child.poll() is not None]
            if not gone:
                return None
            return "a service exited:\n" + "\n".join(
                processes.log_tail(self.logs_dir / f"{name}.stderr.log") for name in (GRPC_NAME, COORDINATOR_NAME)
            )

        processes.wait_until(serving, SERVICE_START_TIMEOUT_SECONDS, "the gRPC worker and the coordinator", give_up=died)

    def describe(self) -> dict:
        """cluster.json's shape (deploy/cluster.py), as far as the bank test and the audit read it."""
        authority = pki.CertificateAuthority(self.auth_dir)
        client = authority.paths(ADMIN_CLIENT_CERTIFICATE)
        return {
            "grpc_endpoint": self.grpc_endpoint,
            "etcd_endpoint": etcd_shard_map.ENDPOINT_SEPARATOR.join(self.etcd_endpoints),
            "etcd_endpoints": list(self.etcd_endpoints),
            "metrics_endpoints": [self.grpc_metrics_endpoint, self.coordinator_metrics_endpoint],
            "shards": [
                {
                    "name": shard.name, "dsn": shard.dsn, "owner_dsn": shard.owner_dsn, "auditor_dsn": shard.auditor_dsn,
                    "members": [{"name": m.name, "endpoint": m.endpoint, "rest_url": m.rest_url} for m in shard.members],
                }
                for shard in self.shards
            ],  # fmt: skip
            "state_dir": str(self.state_dir),
            "auth": {
                "ca_cert": str(authority.cert_path),
                "client_cert": str(client.cert),
                "client_key": str(client.key),
                "admin_token": tokens.mint(self.auth_dir, Role.ADMIN, ADMIN_SUBJECT, tokens.TOKEN_TTL_SECONDS_MAX),
            },
        }
