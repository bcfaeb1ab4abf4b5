"""High availability (TOPOLOGY=ha): each shard is a Patroni-managed primary and its replicas.

A shard of the HA topology is `MEMBERS_PER_SHARD` PostgreSQL instances, each run by its own
Patroni (https://patroni.readthedocs.io), all of them agreeing through the cluster's etcd
members on which one is the primary (Patroni's leader key, under `PATRONI_NAMESPACE`).

What a member's patroni.yml says, and why (PatroniMember.config(), a pure function):
- ttl 20 s: the leader key's lease, Patroni's minimum. A primary whose Patroni dies (SIGKILL of
  the whole member) keeps the key until its lease runs out, so ttl bounds the failover from
  below. loop_wait 1 s (the minimum) and retry_timeout 5 s (loop_wait + 2 * retry_timeout must
  stay under ttl, and a DCS or PostgreSQL call may take that long before Patroni gives up on it).
  Failover bound after a primary's death: ttl - (time since its last renewal, < loop_wait) for the
  lease to expire, + loop_wait for a replica to notice, + the promotion (about 1 s), + the
  client's reconnection: about ttl + loop_wait + 2 s = 23 s at most, 19..23 s in practice.
- synchronous_mode and synchronous_mode_strict on, synchronous_node_count 1: every commit
  waits until one replica (the synchronous standby, named by Patroni) has it on disk, and Patroni
  promotes only that standby; so a transfer the service acknowledged survives the loss of the
  primary. Strict: with no replica left, writes wait rather than being acknowledged by the
  primary alone. One synchronous standby, not two: a commit waits for one replica's round trip
  (the cheaper of the two), and the shard keeps accepting writes with one of its three members
  down (with two, strict mode would stop writes the moment any replica fails).
- pg_rewind off; a former primary whose timeline diverged is removed and cloned again
  (pg_basebackup) when it comes back: simpler than pg_rewind's superuser-over-TCP, and with
  synchronous replication it never held an acknowledged commit the new primary lacks. Patroni
  asks the new primary about timelines as the `rewinder` role (REWIND_USER), since the superuser
  may not connect over TCP.
- pg_hba: the same rules as a single shard's (deploy/postgres.py: superuser only on the unix
  socket, every other role with its SCRAM password), for every member's address, plus the
  replication role between members.

Processes: Patroni runs as the postgres user (setpriv, which execs: the pid we get is Patroni's)
in a session of its own. Patroni starts the postmaster in yet another session (its pg_ctl_start
calls setsid), so killing a member kills two process groups, Patroni's first (so that it cannot
restart PostgreSQL), then the postmaster's: no orphaned postmaster survives. `start()` takes an
argv prefix (["ip", "netns", "exec", "h3"]) to run a member inside a network namespace.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import secrets
import shutil
import signal
import time
import urllib.error
import urllib.request
from collections.abc import Sequence

from psycopg import conninfo

from deploy import postgres, processes
from services.storage.roles import DatabaseRole

MEMBERS_PER_SHARD = 3
# Patroni's keys in etcd, apart from the shard map's.
PATRONI_NAMESPACE = "/corebank-patroni/"
TTL_SECONDS = 20  # Patroni's minimum; see the module's docstring
LOOP_WAIT_SECONDS = 1  # Patroni's minimum
RETRY_TIMEOUT_SECONDS = 5
assert LOOP_WAIT_SECONDS + 2 * RETRY_TIMEOUT_SECONDS <= TTL_SECONDS, "Patroni would shrink the timeouts"
SYNCHRONOUS_NODE_COUNT = 1  # see the module's docstring
# A replica further behind than this is never promoted (Patroni's maximum_lag_on_failover).
MAXIMUM_LAG_ON_FAILOVER_BYTES = 1024 * 1024
# Six instances or more on one machine: half a single shard's shared_buffers each.
SHARED_BUFFERS = "128MB"
MAX_WAL_SENDERS = 10
MAX_REPLICATION_SLOTS = 10
WAL_KEEP_SIZE = "256MB"
REPLICATION_USER = "replicator"
REPLICATION_SECRET_FILE = "replication.secret"
# The role a former primary uses to ask the new one about timelines (Patroni creates it with
# pg_rewind's grants): the superuser may not connect over TCP (pg_hba), so without it a former
# primary whose timeline diverged (commits it kept locally while cut off) could never be re-cloned.
REWIND_USER = "rewinder"
REWIND_SECRET_FILE = "rewind.secret"
PATRONI_BINARY = "patroni"
SETPRIV_BINARY = "setpriv"
REST_TIMEOUT_SECONDS = 2
START_TIMEOUT_SECONDS = 120  # initdb or a base backup, and the first election
STOP_TIMEOUT_SECONDS = 60
KILL_WAIT_SECONDS_MAX = 10.0
MEMBER_DIR_MODE = 0o700
CONFIG_FILE_MODE = 0o600

# Patroni's names for the roles of /cluster and /patroni, and ours.
ROLE_PRIMARY = "primary"
ROLE_REPLICA = "replica"
ROLE_SYNC_STANDBY = "sync_standby"
_PRIMARY_NAMES = frozenset({"master", "primary", "leader", "standby_leader"})


def patroni_binary() -> str:
    found = shutil.which(PATRONI_BINARY)
    if found is None:
        raise FileNotFoundError("patroni not found on PATH; install it with `apt-get install patroni`")
    return found


def _patroni_role_password(secrets_dir: pathlib.Path, secret_file: str) -> str:
    """A role of Patroni's own: its password, made with `secrets` at the first HA `up` (0600 file)."""
    from services.auth.pki import write_private

    secrets_dir.mkdir(mode=postgres.SECRETS_DIR_MODE, parents=True, exist_ok=True)
    path = secrets_dir / secret_file
    if not path.exists():
        write_private(path, secrets.token_urlsafe(postgres.PASSWORD_BYTES).encode())
    return path.read_text().strip()


def replication_password(secrets_dir: pathlib.Path) -> str:
    return _patroni_role_password(secrets_dir, REPLICATION_SECRET_FILE)


def rewind_password(secrets_dir: pathlib.Path) -> str:
    return _patroni_role_password(secrets_dir, REWIND_SECRET_FILE)


def access_rules(addresses: Sequence[str]) -> list[str]:
    """pg_hba.conf's lines: deploy/postgres.py's rules for each member's address, and replication."""
    rules = ["local all all trust"]
    for address in dict.fromkeys(addresses):
        rules += [
            f"host all {postgres.POSTGRES_USER} {address}/32 reject",
            f"host replication {REPLICATION_USER} {address}/32 scram-sha-256",
            f"host all all {address}/32 scram-sha-256",
        ]
    return rules


def _get_json(url: str) -> tuple[int, dict]:
    """(HTTP status, JSON body) of a GET; Patroni answers 503 with a body on its health checks."""
    try:
        with urllib.request.urlopen(url, timeout=REST_TIMEOUT_SECONDS) as response:  # nosec B310 # a literal http:// URL to a cluster endpoint
            return response.status, json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as error:
        try:
            return error.code, json.loads(error.read() or b"{}")
        except ValueError:
            return error.code, {}
    except (OSError, ValueError):
        return 0, {}


@dataclasses.dataclass(frozen=True)
class PatroniMember:
    """One PostgreSQL instance of a shard and its Patroni."""

    name: str  # "shard-0-m1"
    scope: str  # the shard's name: Patroni's cluster
    member_dir: pathlib.Path  # absolute; 0700, the postgres user's: patroni.yml, data/, the unix socket
    pg_port: int
    rest_port: int
    etcd_endpoints: tuple[str, ...]  # "host:port" of every etcd member
    secrets_dir: pathlib.Path
    log_path: pathlib.Path
    pid_path: pathlib.Path
    host: str = postgres.HOST
    # Every member's address of the shard (pg_hba); by default this member's own.
    peer_addresses: tuple[str, ...] = ()

    @property
    def data_dir(self) -> pathlib.Path:
        return self.member_dir / "data"

    @property
    def config_path(self) -> pathlib.Path:
        return self.member_dir / "patroni.yml"

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.pg_port}"

    @property
    def rest_url(self) -> str:
        return f"http://{self.host}:{self.rest_port}"

    def config(self, replication_password: str, rewind_password: str) -> dict:
        """patroni.yml's content (see the module's docstring for the choices)."""
        return {
            "scope": self.scope,
            "namespace": PATRONI_NAMESPACE,
            "name": self.name,
            "log": {"level": "INFO"},
            "restapi": {"listen": f"{self.host}:{self.rest_port}", "connect_address": f"{self.host}:{self.rest_port}"},
            "etcd3": {"hosts": list(self.etcd_endpoints), "protocol": "http"},
            "bootstrap": {
                "dcs": {
                    "ttl": TTL_SECONDS,
                    "loop_wait": LOOP_WAIT_SECONDS,
                    "retry_timeout": RETRY_TIMEOUT_SECONDS,
                    "maximum_lag_on_failover": MAXIMUM_LAG_ON_FAILOVER_BYTES,
                    "synchronous_mode": True,
                    "synchronous_mode_strict": True,
                    "synchronous_node_count": SYNCHRONOUS_NODE_COUNT,
                    "postgresql": {
                        "use_pg_rewind": False,
                        "use_slots": True,
                        "parameters": {
                            "max_connections": postgres.MAX_CONNECTIONS,
                            "wal_level": "replica",
                            "hot_standby": "on",
                            "max_wal_senders": MAX_WAL_SENDERS,
                            "max_replication_slots": MAX_REPLICATION_SLOTS,
                            "wal_keep_size": WAL_KEEP_SIZE,
                        },
                    },
                },
                # As deploy/postgres.py's initdb; pg_hba below replaces the rules at once.
                "initdb": [{"encoding": "UTF8"}, {"locale": "C.UTF-8"}, {"auth-local": "trust"}, {"auth-host": "reject"}],
            },
            "postgresql": {
                "listen": f"{self.host}:{self.pg_port}",
                "connect_address": f"{self.host}:{self.pg_port}",
                "data_dir": str(self.data_dir),
                "bin_dir": str(postgres.bin_dir()),
                "pgpass": str(self.member_dir / "pgpass"),
                # Patroni's own superuser connections go through the socket, as deploy's do.
                "use_unix_socket": True,
                "authentication": {
                    "superuser": {"username": postgres.POSTGRES_USER},
                    "replication": {"username": REPLICATION_USER, "password": replication_password},
                    "rewind": {"username": REWIND_USER, "password": rewind_password},
                },
                "parameters": {
                    "unix_socket_directories": str(self.member_dir),
                    "shared_buffers": SHARED_BUFFERS,
                },
                "pg_hba": access_rules(self.peer_addresses or (self.host,)),
                "remove_data_directory_on_rewind_failure": True,
                "remove_data_directory_on_diverged_timelines": True,
                "create_replica_methods": ["basebackup"],
                "basebackup": [{"checkpoint": "fast"}],
            },
            "tags": {"nofailover": False, "noloadbalance": False, "clonefrom": False, "nosync": False},
        }

    def superuser_dsn(self, dbname: str = "postgres") -> str:
        return postgres.superuser_dsn(self.member_dir, self.pg_port, dbname)

    def write_config(self) -> None:
        self.member_dir.mkdir(parents=True, exist_ok=True)
        self.member_dir.chmod(MEMBER_DIR_MODE)
        postgres.check_traversable(self.member_dir)
        postgres.give_to_postgres_user(self.member_dir)
        scratch = self.config_path.with_name(self.config_path.name + ".tmp")
        # JSON is YAML: Patroni reads it, and deploy needs no YAML library at run time.
        scratch.write_text(json.dumps(self.config(replication_password(self.secrets_dir), rewind_password(self.secrets_dir)), indent=2))
        scratch.chmod(CONFIG_FILE_MODE)
        postgres.give_to_postgres_user(scratch)
        scratch.replace(self.config_path)

    # Processes.

    def pid(self) -> int | None:
        """Patroni's pid when it runs on our config, else None."""
        pid = processes.read_pid(self.pid_path)
        return pid if processes.is_ours(pid, [str(self.config_path)]) else None

    def postmaster_pid(self) -> int | None:
        pid = processes.read_pid(self.data_dir / "postmaster.pid")
        return pid if processes.is_ours(pid, [str(self.data_dir)]) else None

    def is_running(self) -> bool:
        return self.pid() is not None

    def start(self, argv_prefix: Sequence[str] = ()) -> None:
        """Spawn Patroni when not running (does not wait: members of a new shard elect together;
        see wait_healthy). `argv_prefix` runs it elsewhere, e.g. ["ip", "netns", "exec", "h3"]."""
        if self.is_running():
            return
        self.write_config()
        as_user = (
            [SETPRIV_BINARY, f"--reuid={postgres.POSTGRES_USER}", f"--regid={postgres.POSTGRES_USER}", "--init-groups", "--"]
            if postgres.running_as_root()
            else []
        )
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(self.member_dir), "LANG": "C.UTF-8"}
        processes.spawn_detached(
            [*argv_prefix, *as_user, patroni_binary(), str(self.config_path)], self.log_path, self.pid_path, env=env, cwd=self.member_dir
        )

    def _died(self) -> str | None:
        if self.is_running():
            return None
        return f"{self.name} (Patroni) exited; the end of {self.log_path}:\n{processes.log_tail(self.log_path)}"

    def wait_healthy(self, timeout_seconds: float = START_TIMEOUT_SECONDS) -> None:
        processes.wait_until(self.is_healthy, timeout_seconds, f"{self.name} health", give_up=self._died)

    def status(self) -> dict:
        """Patroni's /patroni: role, state, timeline, xlog; {} when it does not answer."""
        return _get_json(f"{self.rest_url}/patroni")[1]

    def is_healthy(self) -> bool:
        """PostgreSQL runs under Patroni (primary or replica): /health answers 200."""
        return self.is_running() and _get_json(f"{self.rest_url}/health")[0] == 200

    def role(self) -> str | None:
        """ROLE_PRIMARY, ROLE_REPLICA, or None when Patroni does not answer."""
        found = self.status().get("role")
        if found is None:
            return None
        return ROLE_PRIMARY if found in _PRIMARY_NAMES else ROLE_REPLICA

    def _process_groups(self) -> list[int]:
        """Patroni's process group, then the postmaster's (its own session: see the module's docstring)."""
        groups = []
        for pid in (self.pid(), self.postmaster_pid()):
            if pid is None:
                continue
            try:
                group = os.getpgid(pid)
            except ProcessLookupError:
                continue
            if group > 1 and group not in groups:
                groups.append(group)
        return groups

    def _signal_groups(self, groups: list[int], signal_number: int) -> None:
        for group in groups:
            try:
                os.killpg(group, signal_number)
            except ProcessLookupError:
                pass

    def kill(self, signal_number: int = signal.SIGKILL) -> None:
        """Signal the whole member: Patroni's process group and the postmaster's (all backends)."""
        groups = self._process_groups()
        self._signal_groups(groups, signal_number)
        if signal_number != signal.SIGKILL:
            return
        deadline = time.monotonic() + KILL_WAIT_SECONDS_MAX
        while time.monotonic() < deadline and (self.is_running() or self.postmaster_pid() is not None):
            processes.reap(processes.read_pid(self.pid_path) or -1)
            time.sleep(processes.POLL_INTERVAL_SECONDS)

    def stop(self) -> None:
        """SIGTERM to Patroni: it stops PostgreSQL (fast) and, a primary, gives the leader key up at
        once, so that a replica takes over without waiting for the ttl. What outlives the timeout
        is killed, group by group."""
        pid = self.pid()
        if pid is not None:
            os.kill(pid, signal.SIGTERM)
            try:
                processes.wait_until(
                    lambda: (processes.reap(pid), not self.is_running())[1], STOP_TIMEOUT_SECONDS, f"stop {self.name}"
                )
            except TimeoutError:
                pass
        if self.is_running() or self.postmaster_pid() is not None:
            self.kill(signal.SIGKILL)


@dataclasses.dataclass(frozen=True)
class HaShard(postgres.RoleDsns):
    """A shard of the HA topology: what deploy/cluster.py reads of a shard, over all its members."""

    name: str
    members: tuple[PatroniMember, ...]
    secrets_dir: pathlib.Path

    def role_dsn(self, role: DatabaseRole) -> str:
        """One libpq multi-host DSN over every member: libpq tries them in turn and keeps the
        primary. target_session_attrs=read-write, except for the auditor: its role has
        default_transaction_read_only on (deploy/postgres.py), so every server looks read-only
        to it; "primary" (in_hot_standby off) picks the same server."""
        attrs = "primary" if role == DatabaseRole.AUDITOR else "read-write"
        return conninfo.make_conninfo(
            "",
            host=",".join(member.host for member in self.members),
            port=",".join(str(member.pg_port) for member in self.members),
            dbname=postgres.DATABASE_NAME,
            user=str(role),
            passfile=str(postgres.passfile_path(self.secrets_dir, role)),
            target_session_attrs=attrs,
            connect_timeout=postgres.CONNECT_TIMEOUT_SECONDS,
        )

    def superuser_dsn(self, dbname: str = "postgres") -> str:
        """The superuser on the primary, through the members' unix sockets."""
        return conninfo.make_conninfo(
            "",
            host=",".join(str(member.member_dir) for member in self.members),
            port=",".join(str(member.pg_port) for member in self.members),
            dbname=dbname,
            user=postgres.POSTGRES_USER,
            target_session_attrs="read-write",
        )

    @property
    def port(self) -> int:
        """The first member's port (each member's is in "members")."""
        return self.members[0].pg_port

    @property
    def data_dir(self) -> pathlib.Path:
        return self.members[0].data_dir

    def primary(self) -> PatroniMember | None:
        """The member whose Patroni says it is the primary (None during a failover)."""
        for member in self.members:
            if member.role() == ROLE_PRIMARY:
                return member
        return None

    def pid(self) -> int | None:
        """The primary's Patroni pid."""
        primary = self.primary()
        return None if primary is None else primary.pid()

    def topology(self) -> list[dict]:
        """Patroni's /cluster, from the first member that answers: each member's name, role
        ("leader", "sync_standby", "replica"), state and lag (bytes behind the primary)."""
        for member in self.members:
            status, body = _get_json(f"{member.rest_url}/cluster")
            if status == 200 and "members" in body:
                return list(body["members"])
        return []

    def wait_primary(self, timeout_seconds: float = START_TIMEOUT_SECONDS) -> PatroniMember:
        found: list[PatroniMember] = []

        def elected() -> bool:
            primary = self.primary()
            found[:] = [primary] if primary is not None and primary.is_healthy() else []
            return bool(found)

        processes.wait_until(elected, timeout_seconds, f"{self.name}: a primary")
        return found[0]

    def wait_replicated(self, timeout_seconds: float = START_TIMEOUT_SECONDS) -> None:
        """Until every member runs and one replica is the synchronous standby (writes may wait
        on it: strict mode)."""

        def replicated() -> bool:
            found = self.topology()
            running = [m for m in found if m.get("state") in ("running", "streaming")]
            return len(running) == len(self.members) and any(m.get("role") == ROLE_SYNC_STANDBY for m in found)

        processes.wait_until(replicated, timeout_seconds, f"{self.name}: replicas streaming, one synchronous")

    def ensure_database(self) -> None:
        """deploy/postgres.py's roles, passwords, database and schema, on the primary (they reach
        the replicas through replication)."""
        primary = self.wait_primary()
        postgres.ensure_database(self.secrets_dir, primary.superuser_dsn, self.owner_dsn)

