"""The service process: health, reflection, metrics, and the shard map watch."""

import asyncio
import re
import time
import urllib.request

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from sharding import etcd_shard_map
from sharding.shard_map import ShardMap

WATCH_POLLS_MAX = 50


def scrape(endpoint: str) -> str:
    with urllib.request.urlopen(f"http://{endpoint}/metrics", timeout=5) as response:
        return response.read().decode()


def test_health_reports_serving_for_each_service(grpc_channel):
    stub = health_pb2_grpc.HealthStub(grpc_channel)
    for service in ("", "corebank.v1.Accounts", "corebank.v1.Payments", "corebank.v1.Clearing"):
        assert stub.Check(health_pb2.HealthCheckRequest(service=service)).status == health_pb2.HealthCheckResponse.SERVING


def test_reflection_lists_the_contract(grpc_channel):
    stub = reflection_pb2_grpc.ServerReflectionStub(grpc_channel)
    responses = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    listed = {service.name for response in responses for service in response.list_services_response.service}
    assert {"corebank.v1.Accounts", "corebank.v1.Payments", "corebank.v1.Clearing", "grpc.health.v1.Health"} <= listed


def test_metrics_count_requests_by_method_and_code_with_latency(ledger, cluster):
    ledger.open()
    try:
        ledger.get("acc_nobody")
    except grpc.RpcError:
        pass
    text = "".join(scrape(endpoint) for endpoint in cluster["metrics_endpoints"])
    assert re.search(r'corebank_grpc_requests_total\{code="OK",method="OpenAccount",service="corebank.v1.Accounts"\} [1-9]', text)
    assert re.search(r'corebank_grpc_requests_total\{code="NOT_FOUND",method="GetAccount",service="corebank.v1.Accounts"\} [1-9]', text)
    assert 'corebank_grpc_request_duration_seconds_bucket{le="0.005",method="OpenAccount"' in text


def test_every_process_follows_a_new_shard_map_version(cluster, shard_map):
    async def publish_next_version() -> ShardMap:
        client = etcd_shard_map.etcd_client(cluster["etcd_endpoint"])
        try:
            current = await etcd_shard_map.load(client)
            # Same placement, higher version: exercises the watch without moving any account.
            newer = ShardMap(version=current.version + 1, shards=current.shards, slot_ranges=current.slot_ranges)
            await etcd_shard_map.publish(client, newer)
            return newer
        finally:
            await client.close()

    newer = asyncio.run(publish_next_version())
    for endpoint in cluster["metrics_endpoints"]:
        for _ in range(WATCH_POLLS_MAX):
            if f"corebank_shard_map_version {float(newer.version)}" in scrape(endpoint):
                break
            time.sleep(0.1)
        else:
            raise AssertionError(f"{endpoint} did not adopt shard map version {newer.version}")
