"""The coordinator process: recovery of transfers between shards, the sweep of collecting merchants,
the periodic invariant audit (services/coordinator/integrity.py) and the finishing of settlement
window closes left CLOSING (services/coordinator/window_recovery.py).

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
from services.coordinator import integrity, window_recovery
from services.clearing_service import ClearingService
from services.coordinator.recovery import Recovery, in_doubt_bound_seconds
from services.ledger import clearing
from services.ledger.limits import TierLimits
from services.ledger_service import LedgerService
from services.observability import build_info
from services.storage import audit
from sharding.shard_map import ShardMap
from services.observability import logs

log = logging.getLogger("corebank.coordinator")

# This process's role in corebank_build_info: the role deploy/cluster.py gives coordinators.
ROLE = "coordinator"


async def serve(
    metrics_listen: str, etcd_endpoint: str, process_name: str, limits: TierLimits, audit_passfile: pathlib.Path | None = None,
) -> None:
    metrics_host, metrics_port = metrics_listen.rsplit(":", 1)
    build_info.record(ROLE)
    # No `_created` series beside every counter: they double the series and no rule reads them.
    prometheus_client.disable_created_metrics()
    prometheus_client.start_http_server(int(metrics_port), addr=metrics_host)
    shards = await ShardConnections.open(etcd_endpoint)
    driver = wiring.transfer_driver(shards.router, limits, owner=f"{process_name}:{os.getpid()}")
    ledger = LedgerService(shards.router, limits, driver)
    figures = integrity.IntegrityCollector(in_doubt_bound_seconds(driver.pending_timeout_seconds))
    prometheus_client.REGISTRY.register(figures)

    async def sweep() -> None:
        figures.swept(await collection.sweep_once(ledger, PARTICIPANT_CALL_TIMEOUT_SECONDS))

    recovery = Recovery(wiring.tcc_for_shard(shards.router), wiring.shard_names(shards.router), driver, sweep=sweep)
    periodic_audit = integrity.PeriodicAudit(
        lambda: audited_shards(shards.router.shard_map, audit_passfile), figures,
        clearing_home=lambda: shards.router.shard_map.shard_name_for_key(clearing.CLEARING_HOME_KEY),
    )
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signal_number in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signal_number, stopping.set)
    log.info("recovering in-doubt transfers (metrics on %s)", metrics_listen)
    auditing = asyncio.create_task(periodic_audit.run(stopping), name="periodic-audit")
    closing = asyncio.create_task(
        window_recovery.run(ClearingService(shards.router, ledger).finish_interrupted_closes, stopping), name="window-recovery"
    )
    await recovery.run(stopping)
    auditing.cancel()  # a run in progress is not waited for: its thread is a daemon, its reads only read
    await asyncio.gather(auditing, closing, return_exceptions=True)
    await shards.close()


def audited_shards(shard_map: ShardMap, audit_passfile: pathlib.Path | None) -> list[tuple[str, str]]:
    """(name, DSN) of every shard for the periodic audit: the auditor role's (SELECT only) when its
    passfile is given, else the shard map's own (the service role's)."""
    return [
        (shard.name, audit.auditor_dsn(shard.dsn, str(audit_passfile)) if audit_passfile else shard.dsn)
        for shard in shard_map.shards
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--metrics-listen", required=True, help="Prometheus /metrics address, HOST:PORT")
    parser.add_argument("--etcd", required=True, help="etcd client endpoints, HOST:PORT[,HOST:PORT...] (every member of the etcd cluster)")
    parser.add_argument("--process-name", default="coordinator", help="name in logs and lease owners")
    parser.add_argument("--log-file", type=pathlib.Path, help="JSON log, rotated by size (default: standard error)")
    parser.add_argument("--limits", help="tier limits JSON (default: the built-in table)")
    parser.add_argument("--audit-passfile", type=pathlib.Path,
                        help="the auditor role's libpq passfile: the periodic audit reads as that role (default: the shard map's role)")
    arguments = parser.parse_args()
    logs.configure(arguments.process_name, arguments.log_file)
    limits = TierLimits.load(pathlib.Path(arguments.limits) if arguments.limits else None)
    asyncio.run(serve(arguments.metrics_listen, arguments.etcd, arguments.process_name, limits, arguments.audit_passfile))


if __name__ == "__main__":
    main()
