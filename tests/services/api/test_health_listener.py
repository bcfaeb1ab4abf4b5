"""The plaintext health port (services/server.py start_health_server), as Kubernetes' grpc
probe uses it (deploy/k8s/): a plaintext grpc.health.v1 Check, no client certificate.

A real grpc.aio server on a free loopback port, driven through the same HealthServicer the
mTLS port serves, so a graceful shutdown is seen on both ports at once.
"""

import asyncio
import socket

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from services.server import start_health_server

CALL_TIMEOUT_SECONDS = 5


def free_loopback_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


async def check(endpoint: str) -> int:
    async with grpc.aio.insecure_channel(endpoint) as channel:
        response = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=CALL_TIMEOUT_SECONDS
        )
    return response.status


async def health_port_story(endpoint: str) -> tuple[int, int, grpc.StatusCode]:
    servicer = health.aio.HealthServicer()
    await servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    server = await start_health_server(endpoint, servicer)
    try:
        serving = await check(endpoint)
        # Nothing but health there: reflection (and so every corebank.v1 service) is absent.
        async with grpc.aio.insecure_channel(endpoint) as channel:
            stream = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=CALL_TIMEOUT_SECONDS
            )
            try:
                async for _ in stream:
                    pass
                absent = grpc.StatusCode.OK
            except grpc.aio.AioRpcError as error:
                absent = error.code()
        await servicer.enter_graceful_shutdown()
        draining = await check(endpoint)
    finally:
        await server.stop(None)
    return serving, draining, absent


def test_health_port_answers_in_plaintext_and_follows_graceful_shutdown():
    endpoint = f"127.0.0.1:{free_loopback_port()}"
    serving, draining, absent = asyncio.run(health_port_story(endpoint))
    assert serving == health_pb2.HealthCheckResponse.SERVING
    assert draining == health_pb2.HealthCheckResponse.NOT_SERVING
    assert absent == grpc.StatusCode.UNIMPLEMENTED
