"""The coordinator process: recovery of transfers between shards, and the sweep of collecting merchants.

    python -m services.coordinator --etcd 127.0.0.1:7101 --metrics-listen 127.0.0.1:7120 --process-name coordinator-0

Its composition root: the only module of the package that knows the ledger service
(for the sweep), so the coordinator's own modules never import it.
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
from services.coordinator import wiring
from services.coordinator.driver import PARTICIPANT_CALL_TIMEOUT_SECONDS
from services.coordinator.recovery import Recovery
from services.ledger.limits import TierLimits
from services.ledger_service import LedgerService

log = logging.getLogger("corebank.coordinator")


async def serve(metrics_listen: str, etcd_endpoint: str, process_name: str, limits: TierLimits) -> None:
    metrics_host, metrics_port = metrics_listen.rsplit(":", 1)
    prometheus_client.start_http_server(int(metrics_port), addr=metrics_host)
    shards = await ShardConnections.open(etcd_endpoint)
    driver = wiring.transfer_driver(shards.router, limits, owner=f"{process_name}:{os.getpid()}")
    ledger = LedgerService(shards.router, limits, driver)
    recovery = Recovery(
        wiring.tcc_for_shard(shards.router), wiring.shard_names(shards.router), driver,
        sweep=lambda: collection.sweep_once(ledger, PARTICIPANT_CALL_TIMEOUT_SECONDS),
    )
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


if __name__ == "__main__":
    main()
