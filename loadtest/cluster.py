"""The running cluster as `make up` describes it in $COREBANK_STATE_DIR/cluster.json."""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib

import psycopg

from deploy.cluster import CLUSTER_FILE, DEFAULT_STATE_DIR

# The shards' PostgreSQL superuser (trust auth on 127.0.0.1): pgbench's database and CHECKPOINT need it.
SUPERUSER = "postgres"


@dataclasses.dataclass(frozen=True)
class ShardEndpoint:
    name: str
    dsn: str

    def superuser_conninfo(self, dbname: str) -> str:
        """The shard's DSN as the superuser, on another database of the same server."""
        return psycopg.conninfo.make_conninfo(self.dsn, user=SUPERUSER, dbname=dbname)


@dataclasses.dataclass(frozen=True)
class Cluster:
    state_dir: pathlib.Path
    grpc_endpoint: str
    etcd_endpoint: str
    shards: tuple[ShardEndpoint, ...]
    # The whole file, for fields some scenarios want (process pids, metrics endpoints).
    raw: dict

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
    shards = tuple(ShardEndpoint(shard["name"], shard["dsn"]) for shard in data["shards"])
    return Cluster(state_dir, data["grpc_endpoint"], data["etcd_endpoint"], shards, data)
