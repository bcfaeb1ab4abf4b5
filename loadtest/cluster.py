"""The running cluster as `make up` describes it in $COREBANK_STATE_DIR/cluster.json."""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib

import psycopg

from deploy.cluster import CLUSTER_FILE, DEFAULT_STATE_DIR
from services.auth import auth_dir, tokens
from services.auth.client import Target
from services.ledger.access import Role

# Who the load's transfers come from. Not a service (payments gateway) token: synthetic load debits
# each of a few hundred accounts many times a second, which the per-account velocity limit (a fraud
# control, services/ledger/rate_limits.json) refuses for customer and service callers, as it should.
# Admin is exempt from it; the TLS handshake and the token check are the same for every role.
TRAFFIC_ROLE = Role.ADMIN
TRAFFIC_SUBJECT = "loadtest-gateway"
TRAFFIC_TOKEN_TTL_SECONDS = tokens.TOKEN_TTL_SECONDS_MAX

@dataclasses.dataclass(frozen=True)
class ShardEndpoint:
    name: str
    dsn: str  # the service role's, over TCP (what the service workers use)
    # The superuser's, through the shard's unix socket (it may not log in over TCP): CHECKPOINT,
    # pg_stat_database, creating pgbench's database.
    superuser_dsn: str
    # The owner role's, over TCP with its passfile: pgbench runs as it, on the same path as the service.
    owner_dsn: str

    def superuser_conninfo(self, dbname: str) -> str:
        """The shard's superuser DSN, on another database of the same server."""
        return psycopg.conninfo.make_conninfo(self.superuser_dsn, dbname=dbname)


@dataclasses.dataclass(frozen=True)
class Cluster:
    state_dir: pathlib.Path
    grpc_endpoint: str
    etcd_endpoint: str
    shards: tuple[ShardEndpoint, ...]
    # The whole file, for fields some scenarios want (process pids, metrics endpoints).
    raw: dict

    @property
    def target(self) -> Target:
        """As admin (cluster.json's token): opening SYSTEM accounts and funding from them is admin's."""
        return Target.of_cluster(self.raw)

    def traffic_target(self) -> Target:
        """As the load's caller (TRAFFIC_ROLE, see there), with a token of the cluster's current key."""
        return self.target.acting_as(
            tokens.mint(auth_dir(self.raw["state_dir"]), TRAFFIC_ROLE, TRAFFIC_SUBJECT, TRAFFIC_TOKEN_TTL_SECONDS)
        )

    def shard(self, name: str) -> ShardEndpoint:
        for shard in self.shards:
            if shard.name == name:
                return shard
        raise KeyError(f"no shard {name!r} in {self.state_dir / CLUSTER_FILE}")


def state_dir_from_environment() -> pathlib.Path:
    """$COREBANK_STATE_DIR, defaulting like `python -m deploy.cluster`."""
    return pathlib.Path(os.environ.get("COREBANK_STATE_DIR") or DEFAULT_STATE_DIR)


def load_cluster(state_dir: pathlib.Path | None = None) -> Cluster:
    """Read cluster.json from `state_dir`, by default the environment's (state_dir_from_environment)."""
    state_dir = state_dir or state_dir_from_environment()
    path = state_dir / CLUSTER_FILE
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise SystemExit(f"{path} not found: start a cluster first (make up)") from None
    shards = tuple(
        ShardEndpoint(shard["name"], shard["dsn"], shard["superuser_dsn"], shard["owner_dsn"]) for shard in data["shards"]
    )
    return Cluster(state_dir, data["grpc_endpoint"], data["etcd_endpoint"], shards, data)
