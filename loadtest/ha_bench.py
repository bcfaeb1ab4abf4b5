"""What high availability costs and buys (`make bench-ha`): one command, two clusters in turn.

    python -m loadtest.ha_bench [--seconds 10] [--clients 8] [--port-base 7600]

1. A single-topology cluster of one shard: transfers/s through the gRPC service.
2. An HA cluster of one shard (TOPOLOGY=ha, synchronous replication): transfers/s the same way,
   then the primary's whole member is SIGKILLed under load: the failover time (kill -> first
   acknowledged transfer) and the acknowledged transfers lost (read from the databases: must be 0).

The clusters run one after the other on the same port base (the HA plan spans 484 ports), each in
a temporary state folder removed at the end. Figures are printed, never asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import threading
import time

import grpc
import psycopg

from deploy.cluster import TOPOLOGY_HA, TOPOLOGY_SINGLE, Cluster
from services.auth import client
from services.ledger.transfers import TransferStatus
from tests.fixtures.cluster import CHANNEL_READY_TIMEOUT_SECONDS, make_state_dir
from tests.fixtures.ledger import LedgerClient, _load_shard_map

DEFAULT_SECONDS = 10
DEFAULT_CLIENTS = 8
DEFAULT_PORT_BASE = 7600
FUNDING_MINOR = 10_000_000
TRANSFER_TIMEOUT_SECONDS = 10
RETRY_DELAY_SECONDS = 0.05
RECOVERY_WAIT_SECONDS_MAX = 120
# Load before the kill, so that the failover happens under it.
LOAD_BEFORE_KILL_SECONDS = 3


class Load:
    """`clients` threads, each paying from its own funded account, recording acknowledged ids and
    the time of each acknowledgement."""

    def __init__(self, ledger: LedgerClient, shard: str, clients: int) -> None:
        self.ledger = ledger
        self.payers = [ledger.funded(FUNDING_MINOR, shard).account_id for _ in range(clients)]
        self.payee = ledger.open(shard=shard).account_id
        # (call started, acknowledged, transfer id): a call in flight at the kill may be answered after it.
        self.acknowledged: list[tuple[float, float, str]] = []
        self.failures = 0
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._pay, args=(payer,)) for payer in self.payers]

    def _pay(self, payer: str) -> None:
        while not self.stop.is_set():
            transfer_id = self.ledger.unique_id("bench")
            called_at = time.monotonic()
            try:
                answer = self.ledger.transfer(payer, self.payee, 1, transfer_id=transfer_id, timeout=TRANSFER_TIMEOUT_SECONDS)
            except grpc.RpcError:
                self.failures += 1
                time.sleep(RETRY_DELAY_SECONDS)
                continue
            if answer.status == TransferStatus.POSTED:
                self.acknowledged.append((called_at, time.monotonic(), transfer_id))

    def __enter__(self) -> Load:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join()


def run_cluster(topology: str, port_base: int, seconds: float, clients: int) -> dict:
    state_dir = make_state_dir(f"corebank-bench-{topology}-")
    cluster = Cluster(state_dir, shard_count=1, port_base=port_base, grpc_workers=1, coordinators=1,
                      supervised=False, topology=topology)  # fmt: skip
    figures: dict = {"topology": topology}
    try:
        description = cluster.up()
        shard_map = asyncio.run(_load_shard_map(description["etcd_endpoint"]))
        shard_name = description["shards"][0]["name"]
        with client.channel(description) as channel:
            grpc.channel_ready_future(channel).result(timeout=CHANNEL_READY_TIMEOUT_SECONDS)
            ledger = LedgerClient(channel, shard_map)
            with Load(ledger, shard_name, clients) as load:
                started = time.monotonic()
                time.sleep(seconds)
                figures["transfers_per_second"] = sum(1 for _, at, _ in load.acknowledged if at >= started) / (time.monotonic() - started)
                if topology == TOPOLOGY_HA:
                    figures.update(failover(cluster, load))
    finally:
        cluster.clean()
        shutil.rmtree(state_dir, ignore_errors=True)
    return figures


def failover(cluster: Cluster, load: Load) -> dict:
    (shard,) = cluster.ha_shards
    time.sleep(LOAD_BEFORE_KILL_SECONDS)
    primary = shard.wait_primary()
    killed_at = time.monotonic()
    cluster.kill(primary.name)
    deadline = killed_at + RECOVERY_WAIT_SECONDS_MAX
    after = []
    while time.monotonic() < deadline and not after:
        time.sleep(RETRY_DELAY_SECONDS)
        after = [at for called_at, at, _ in load.acknowledged if called_at > killed_at]
    load.stop.set()
    for thread in load.threads:
        thread.join()
    acknowledged = [transfer_id for _, _, transfer_id in load.acknowledged]
    shard.wait_primary()
    with psycopg.connect(shard.auditor_dsn) as connection:
        posted = {
            transfer_id
            for (transfer_id,) in connection.execute(
                "SELECT transfer_id FROM transfers WHERE transfer_id = ANY(%s) AND status = %s",
                [acknowledged, int(TransferStatus.POSTED)],
            )
        }
    return {
        # Kill -> the first acknowledgement of a call made after the kill.
        "failover_seconds": (min(after) - killed_at) if after else None,
        "acknowledged": len(acknowledged),
        "lost": len(set(acknowledged) - posted),
        "failed_calls": load.failures,
        "new_primary": (shard.primary() or primary).name,
        "killed": primary.name,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.ha_bench", description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=DEFAULT_SECONDS)
    parser.add_argument("--clients", type=int, default=DEFAULT_CLIENTS)
    parser.add_argument("--port-base", type=int, default=DEFAULT_PORT_BASE)
    args = parser.parse_args(argv)
    single = run_cluster(TOPOLOGY_SINGLE, args.port_base, args.seconds, args.clients)
    print(f"single: {single['transfers_per_second']:.0f} transfers/s ({args.clients} clients, {args.seconds:.0f}s)", flush=True)
    ha = run_cluster(TOPOLOGY_HA, args.port_base, args.seconds, args.clients)
    print(f"ha:     {ha['transfers_per_second']:.0f} transfers/s (synchronous replication, 1 sync standby of 2 replicas)")
    print(f"ratio ha/single: {ha['transfers_per_second'] / single['transfers_per_second']:.2f}")
    seconds = ha["failover_seconds"]
    print(f"failover: {ha['killed']} SIGKILLed (whole member) -> first acknowledged transfer "
          f"{'never' if seconds is None else f'{seconds:.1f}s'} later; new primary {ha['new_primary']}")  # fmt: skip
    print(f"lost acknowledged transfers: {ha['lost']} of {ha['acknowledged']} ({ha['failed_calls']} calls failed meanwhile)")
    return 0 if ha["lost"] == 0 and seconds is not None else 1


if __name__ == "__main__":
    raise SystemExit(main())
