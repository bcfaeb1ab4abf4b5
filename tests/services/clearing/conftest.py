"""Clearing's tests against the real cluster: stubs per role, and the shards as their owner role
(to read what the service wrote, and to put window totals in place where a test needs them)."""

from __future__ import annotations

import itertools
import uuid
import psycopg
import pytest

from corebank.v1 import clearing_pb2 as pb
from corebank.v1 import clearing_pb2_grpc
from services.ledger import clearing

_ids = itertools.count()
_run = uuid.uuid4().hex[:8]


def unique(prefix: str) -> str:
    return f"{prefix}-{_run}-{next(_ids)}"


@pytest.fixture(scope="session")
def clearing_stub(grpc_channel) -> clearing_pb2_grpc.ClearingStub:
    return clearing_pb2_grpc.ClearingStub(grpc_channel)


@pytest.fixture(scope="session")
def clearing_as(channel_as):
    """clearing_as(role): a Clearing stub acting in that role."""
    return lambda role, subject="someone": clearing_pb2_grpc.ClearingStub(channel_as(role, subject))


@pytest.fixture(scope="session")
def owner_sql(cluster):
    """owner_sql(shard_name, statement, params): rows (or None), as the shard's owner role, committed."""
    dsns = {shard["name"]: shard["owner_dsn"] for shard in cluster["shards"]}

    def run(shard_name: str, statement: str, params=()) -> list[tuple] | None:
        with psycopg.connect(dsns[shard_name], autocommit=True) as connection:
            cursor = connection.execute(statement, params)
            return cursor.fetchall() if cursor.description else None

    return run


@pytest.fixture(scope="session")
def home_shard(shard_map) -> str:
    return shard_map.shard_name_for_key(clearing.CLEARING_HOME_KEY)


def register(stub, currencies=("USD",), participant_id=None, name="Bank", request_id=None) -> pb.Participant:
    return stub.RegisterParticipant(pb.RegisterParticipantRequest(
        request_id=request_id or unique("reg"), participant_id=participant_id or unique("p")[-32:],
        name=name, currencies=list(currencies),
    ))


def close_window(stub, reason: str = "", request_id: str | None = None, timeout: float | None = 10) -> pb.CloseSettlementWindowResponse:
    return stub.CloseSettlementWindow(pb.CloseSettlementWindowRequest(request_id=request_id or unique("close"), reason=reason), timeout=timeout)
