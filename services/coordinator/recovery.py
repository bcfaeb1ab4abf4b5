"""The coordinator process: takes over transfers between shards whose driver died.

    python -m services.coordinator --etcd 127.0.0.1:7101 --metrics-listen 127.0.0.1:7120 --process-name coordinator-0

Every RECOVERY_SCAN_INTERVAL_SECONDS it claims, on every shard, the unfinished
transfers whose lease has expired (a compare-and-set that bumps the lease
epoch, so several coordinators never drive one transfer at once) and drives
them to a final state from their durable record alone. A transfer whose
driver died is picked up within LEASE_SECONDS + RECOVERY_SCAN_INTERVAL_SECONDS.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import pathlib
import signal

import prometheus_client

from services import collection
from services.bootstrap import ShardConnections
from services.coordinator import metrics
from services.coordinator.driver import LEASE_SECONDS, PARTICIPANT_CALL_TIMEOUT_SECONDS, RETRYABLE, TransferDriver
from services.ledger.limits import TierLimits
from services.ledger_service import LedgerService
from services.storage.tcc_store import TccStore

# Each scan also sweeps collecting merchants' sub-accounts (services/collection.py).
RECOVERY_SCAN_INTERVAL_SECONDS = 1.0
RECOVERY_CLAIM_BATCH_SIZE = 50
# Transfers one coordinator drives at once; more wait for the next scan.
RECOVERY_DRIVES_MAX = 64

log = logging.getLogger("corebank.coordinator")


class Recovery:
    def __init__(self, shards: ShardConnections, driver: TransferDriver, ledger: LedgerService) -> None:
        self.shards = shards
        self.driver = driver
        self.ledger = ledger  # for sweeping collecting merchants' sub-accounts
        self._drives: set[asyncio.Task] = set()

    async def scan_once(self) -> int:
        """Claim and start driving expired transfers on every shard; the number claimed."""
        claimed_total = 0
        for store in self.shards.router.handles():
            tcc = TccStore(store)
            try:
                count, oldest_seconds = await tcc.in_doubt_summary(PARTICIPANT_CALL_TIMEOUT_SECONDS)
                metrics.IN_DOUBT.labels(store.shard_name).set(count)
                metrics.OLDEST_IN_DOUBT_SECONDS.labels(store.shard_name).set(oldest_seconds)
                room = RECOVERY_DRIVES_MAX - len(self._drives)
                if count == 0 or room <= 0:
                    continue
                claimed = await tcc.claim_expired(
                    self.driver.owner, LEASE_SECONDS, min(room, RECOVERY_CLAIM_BATCH_SIZE), PARTICIPANT_CALL_TIMEOUT_SECONDS
                )
            except RETRYABLE as error:
                log.info("scan of %s failed: %s", store.shard_name, error)
                continue
            for record in claimed:
                log.info("taking over %s (%s, epoch %d)", record.transfer_id, record.state.name, record.lease_epoch)
                metrics.RECOVERED.inc()
                drive = asyncio.create_task(self.driver.drive(record))
                self._drives.add(drive)
                drive.add_done_callback(self._drives.discard)
            claimed_total += len(claimed)
        return claimed_total

    async def run(self, stopping: asyncio.Event) -> None:
        while not stopping.is_set():
            await self.scan_once()
            await collection.sweep_once(self.ledger, PARTICIPANT_CALL_TIMEOUT_SECONDS)
            try:
                await asyncio.wait_for(stopping.wait(), RECOVERY_SCAN_INTERVAL_SECONDS)
            except TimeoutError:
                pass
        if self._drives:
            await asyncio.wait(self._drives, timeout=LEASE_SECONDS)


async def serve(metrics_listen: str, etcd_endpoint: str, process_name: str, limits: TierLimits) -> None:
    metrics_host, metrics_port = metrics_listen.rsplit(":", 1)
    prometheus_client.start_http_server(int(metrics_port), addr=metrics_host)
    shards = await ShardConnections.open(etcd_endpoint)
    driver = TransferDriver(shards.router, limits, owner=f"{process_name}:{os.getpid()}")
    recovery = Recovery(shards, driver, LedgerService(shards.router, limits, driver))
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signal_number in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signal_number, stopping.set)
    log.info("recovering in-doubt transfers (metrics on %s)", metrics_listen)
    await recovery.run(stopping)
    await shards.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--metrics-listen", required=True, help="Prometheus /metrics address, HOST:PORT")
    parser.add_argument("--etcd", required=True, help="etcd client endpoint, HOST:PORT")
    parser.add_argument("--process-name", default="coordinator", help="name in logs and lease owners")
    parser.add_argument("--limits", help="tier limits JSON (default: the built-in table)")
    arguments = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {arguments.process_name} %(levelname)s %(name)s: %(message)s")
    limits = TierLimits.load(pathlib.Path(arguments.limits) if arguments.limits else None)
    asyncio.run(serve(arguments.metrics_listen, arguments.etcd, arguments.process_name, limits))
