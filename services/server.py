"""The composition root of a corebank service process.

    python -m services.server --listen 127.0.0.1:7100 --metrics-listen 127.0.0.1:7110 --etcd 127.0.0.1:7101 \
        --auth-dir .corebank/auth --certificate grpc-0

Loads the shard map from etcd (and keeps watching it), opens a connection pool
per shard, and serves corebank.v1 Accounts, Payments and Clearing with gRPC
health checking and reflection. Several processes may share one --listen port
(SO_REUSEPORT); each has its own --metrics-listen.

The port speaks TLS only and asks every client for a certificate signed by the
cluster's CA (mTLS); every corebank.v1 call must also carry a bearer token signed by
one of the keys in --auth-dir (services/auth).

--plaintext-benchmark-baseline exists for one purpose: `python -m loadtest.security_cost`
measures what TLS costs against a process without it. It serves plaintext over gRPC's
local credentials (loopback TCP only; no client certificate), still requires a valid
token on every call (so it opens no door a token would not), cannot share a port with
another process (no SO_REUSEPORT), and refuses any listen address but loopback.
--without-audit-log (with --plaintext-benchmark-baseline only) also leaves the audit log
out, so that the same command measures what the log costs. `make up` never uses either.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import pathlib
import signal

import grpc
import prometheus_client
import uvloop
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from corebank.v1 import accounts_pb2, accounts_pb2_grpc, clearing_pb2, clearing_pb2_grpc
from corebank.v1 import payments_pb2, payments_pb2_grpc
from services.api import metrics
from services.api.audit_trail import AuditTrail
from services.api.interceptor import LedgerInterceptor, answered_errors
from services.audit_log.store import ShardAuditStore
from services.audit_log.writer import AuditWriter, limits_digest
from services.api.servicers import AccountsServicer, ClearingServicer, PaymentsServicer
from services.auth import pki
from services.auth.tokens import TokenVerifier
from services.bootstrap import ShardConnections
from services.clearing_service import ClearingService
from services.coordinator import wiring
from services.ledger.limits import TierLimits
from services.ledger.rate_limits import RateLimits
from services.ledger_service import LedgerService
from services.observability import logs
from services.observability import build_info

SHUTDOWN_GRACE_SECONDS = 5.0
# Calls handled at once per process; past it gRPC answers RESOURCE_EXHAUSTED at once
# instead of queueing without bound (memory and latency stay flat at any peak).
CONCURRENT_RPCS_MAX = 2_000
# CreateTransfers of 5000 transfers is about 1 MB; leave room.
MESSAGE_BYTES_MAX = 16 * 1024 * 1024
# Calls at once on the plaintext health port (--health-listen): the kubelet's probes and a few
# Watch streams; past it, RESOURCE_EXHAUSTED, so nothing there can grow without bound.
HEALTH_CONCURRENT_RPCS_MAX = 16

SERVICES = (
    accounts_pb2.DESCRIPTOR.services_by_name["Accounts"],
    payments_pb2.DESCRIPTOR.services_by_name["Payments"],
    clearing_pb2.DESCRIPTOR.services_by_name["Clearing"],
)
SERVICE_NAMES = tuple(service.full_name for service in SERVICES)
# This process's role in corebank_build_info: the role deploy/cluster.py gives gRPC workers.
ROLE = "grpc"

EVENT_LOOP_VARIABLE = "COREBANK_EVENT_LOOP"
EVENT_LOOPS = ("uvloop", "asyncio")  # the first is the default
# Allocations (less deallocations) between two collections of the youngest generation:
# Python's default, 700, runs one every call or two, each walking every young object a
# call still holds. Calls make short-lived objects, nearly all freed by reference counting,
# so collecting ~30 times less often costs a few MB of garbage cycles at most.
GC_YOUNG_THRESHOLD_OBJECTS = 20_000

log = logging.getLogger("corebank.server")


def settle_heap() -> None:
    """Once started: what start-up made lives as long as the process, so it moves to the
    permanent generation (gc.freeze) and no full collection walks it again; then collect
    the young generation less often (GC_YOUNG_THRESHOLD_OBJECTS)."""
    gc.collect()
    gc.freeze()
    _, older_threshold, oldest_threshold = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD_OBJECTS, older_threshold, oldest_threshold)


LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]")
# A JSON file of rate limits to use instead of the built-in ones (services/ledger/rate_limits.json).
RATE_LIMITS_VARIABLE = "COREBANK_RATE_LIMITS"


def configured_rate_limits() -> RateLimits:
    """The rate limits of this process: the file COREBANK_RATE_LIMITS names, or the defaults."""
    path = os.environ.get(RATE_LIMITS_VARIABLE)
    return RateLimits.load(pathlib.Path(path) if path else None)


def server_credentials(auth_dir: pathlib.Path, certificate_name: str) -> grpc.ServerCredentials:
    """TLS with this process's certificate, requiring a client certificate signed by the cluster's CA."""
    authority = pki.CertificateAuthority(auth_dir)
    paths = authority.paths(certificate_name)
    return grpc.ssl_server_credentials(
        [(paths.key.read_bytes(), paths.cert.read_bytes())],
        root_certificates=authority.cert_path.read_bytes(),
        require_client_auth=True,
    )


def initialise_metrics(limits: TierLimits) -> None:
    """Every label value known at start at 0 (deploy/prometheus/metrics.md): a ratio reads 0, not "no data".
    The currencies counted by name are those the tier limits configure; any other is `other`."""
    metrics.initialise(
        [(service.full_name, method.name) for service in SERVICES for method in service.methods],
        answered_errors(),
        sorted({currency for _, currency in limits.by_tier_and_currency}),
    )


async def start_health_server(listen: str, health_servicer: health.aio.HealthServicer) -> grpc.aio.Server:
    """grpc.health.v1 alone, in plaintext, on its own port (--health-listen).

    Kubernetes' grpc probes speak no TLS, and the main port asks every client for a certificate,
    so the kubelet could never probe it (deploy/k8s/). This port serves the same health servicer
    (SERVING, or NOT_SERVING from the start of a graceful shutdown) and nothing else: no
    corebank.v1 service, no reflection. It shares its port with nobody.
    """
    server = grpc.aio.server(maximum_concurrent_rpcs=HEALTH_CONCURRENT_RPCS_MAX, options=[("grpc.so_reuseport", 0)])
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    server.add_insecure_port(listen)
    await server.start()
    return server


async def serve(
    listen: str, metrics_listen: str, etcd_endpoint: str, limits: TierLimits, process_name: str,
    rate_limits: RateLimits, auth_dir: pathlib.Path, certificate_name: str | None, plaintext_baseline: bool = False,
    audit_logged: bool = True, health_listen: str | None = None,
) -> None:
    """Serve over mTLS with tokens; as the benchmark baseline, over plaintext loopback with tokens."""
    if plaintext_baseline:
        credentials = grpc.local_server_credentials(grpc.LocalConnectionType.LOCAL_TCP)
        log.warning("benchmark baseline: plaintext on loopback (no TLS, no client certificate); tokens still required")
    else:
        credentials = server_credentials(auth_dir, certificate_name)
    verifier = TokenVerifier(auth_dir)
    metrics_host, metrics_port = metrics_listen.rsplit(":", 1)
    # No `_created` series beside every counter: they double the series and no rule reads them.
    prometheus_client.disable_created_metrics()
    prometheus_client.start_http_server(int(metrics_port), addr=metrics_host)
    build_info.record(ROLE)
    initialise_metrics(limits)

    shards = await ShardConnections.open(etcd_endpoint)
    ledger = LedgerService(
        shards.router, limits, wiring.transfer_driver(shards.router, limits, owner=f"{process_name}:{os.getpid()}"), rate_limits
    )
    # This process's chain of the audit log; its first entry names the limits in force (they
    # change only by restarting with other files, and this makes every change visible).
    audit_log = AuditWriter(
        ShardAuditStore(shards.router), process_name,
        {"tier_limits_sha256": limits_digest(limits), "rate_limits_sha256": rate_limits.digest()},
    )
    if audit_logged:
        audit_log.start()
    else:
        log.warning("benchmark baseline: no audit log")
    server = grpc.aio.server(
        interceptors=[LedgerInterceptor(verifier, audit_trail=AuditTrail(audit_log if audit_logged else None))],
        maximum_concurrent_rpcs=CONCURRENT_RPCS_MAX,
        options=[
            # Workers share the port; the benchmark baseline shares it with nobody.
            ("grpc.so_reuseport", 0 if plaintext_baseline else 1),
            ("grpc.max_receive_message_length", MESSAGE_BYTES_MAX),
            ("grpc.max_send_message_length", MESSAGE_BYTES_MAX),
        ],
    )
    accounts_pb2_grpc.add_AccountsServicer_to_server(AccountsServicer(ledger), server)
    payments_pb2_grpc.add_PaymentsServicer_to_server(PaymentsServicer(ledger), server)
    clearing_pb2_grpc.add_ClearingServicer_to_server(ClearingServicer(ClearingService(shards.router, ledger)), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    server.add_secure_port(listen, credentials)
    await server.start()
    for name in ("", *SERVICE_NAMES):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    health_server = await start_health_server(health_listen, health_servicer) if health_listen else None
    settle_heap()
    log.info("serving on %s (metrics on %s)", listen, metrics_listen)

    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signal_number in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signal_number, stopping.set)
    await stopping.wait()

    log.info("stopping")
    await health_servicer.enter_graceful_shutdown()
    await server.stop(SHUTDOWN_GRACE_SECONDS)
    if health_server is not None:
        await health_server.stop(None)
    await ledger.drain()
    if audit_logged:
        await audit_log.close()
    await shards.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--listen", required=True, help="gRPC address, HOST:PORT")
    parser.add_argument("--metrics-listen", required=True, help="Prometheus /metrics address, HOST:PORT")
    parser.add_argument("--etcd", required=True, help="etcd client endpoints, HOST:PORT[,HOST:PORT...] (every member of the etcd cluster)")
    parser.add_argument("--process-name", default="grpc", help="name in logs")
    parser.add_argument("--log-file", type=pathlib.Path, help="JSON log, rotated by size (default: standard error)")
    parser.add_argument("--limits", type=pathlib.Path, help="tier limits JSON (default: the built-in table)")
    parser.add_argument("--auth-dir", type=pathlib.Path, required=True, help="the cluster's auth folder: CA, certificates, token keys")
    parser.add_argument("--certificate", help="this process's certificate name under AUTH_DIR/certs")
    parser.add_argument(
        "--health-listen",
        help="plaintext HOST:PORT serving grpc.health.v1 only, for Kubernetes' grpc probes (the kubelet speaks no TLS)",
    )
    parser.add_argument(
        "--plaintext-benchmark-baseline", action="store_true",
        help="no TLS (tokens still required), on loopback only: the baseline loadtest.security_cost measures TLS against",
    )
    parser.add_argument(
        "--without-audit-log", action="store_true",
        help="with --plaintext-benchmark-baseline only: no audit log, to measure what it costs",
    )
    arguments = parser.parse_args()
    if arguments.without_audit_log and not arguments.plaintext_benchmark_baseline:
        parser.error("--without-audit-log is for the benchmark baseline only")
    if arguments.plaintext_benchmark_baseline:
        if arguments.listen.rsplit(":", 1)[0] not in LOOPBACK_HOSTS or arguments.certificate:
            parser.error("--plaintext-benchmark-baseline listens on loopback only, without --certificate")
    elif not arguments.certificate:
        parser.error("--certificate is required: the service speaks mTLS only")
    logs.configure(arguments.process_name, arguments.log_file)
    run(serve(
        arguments.listen, arguments.metrics_listen, arguments.etcd, TierLimits.load(arguments.limits), arguments.process_name,
        configured_rate_limits(), arguments.auth_dir, arguments.certificate, arguments.plaintext_benchmark_baseline,
        not arguments.without_audit_log, arguments.health_listen,
    ))


def run(main_coroutine) -> None:
    """Run the process on uvloop, or on asyncio's own loop when COREBANK_EVENT_LOOP=asyncio.

    uvloop cut a worker's CPU per transfer by about 8% (13 interleaved pairs of runs, README:
    Dependencies); the switch is there to measure that again, or to rule uvloop out.
    """
    event_loop = os.environ.get(EVENT_LOOP_VARIABLE, EVENT_LOOPS[0])
    if event_loop not in EVENT_LOOPS:
        main_coroutine.close()
        raise SystemExit(f"{EVENT_LOOP_VARIABLE}={event_loop!r}: expected one of {', '.join(EVENT_LOOPS)}")
    if event_loop == "uvloop":
        uvloop.run(main_coroutine)
    else:
        asyncio.run(main_coroutine)


if __name__ == "__main__":
    main()
