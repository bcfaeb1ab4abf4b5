"""Every failure carries a google.rpc.Status with an ErrorInfo (README, Errors), even for
bytes that are not a valid message (bad UTF-8 in a string field, a corrupt wire format),
which grpc's own deserializer would answer with a bare UNKNOWN before any of our code ran.
"""

from __future__ import annotations

import grpc
import pytest
from grpc_status import rpc_status

METHODS = ["/corebank.v1.Payments/Transfer", "/corebank.v1.Accounts/GetAccount", "/corebank.v1.Payments/CreateTransfers"]
PAYLOADS = {"bad-utf8": b"\x0a\x02\xc3\x28", "corrupt-wire": b"\xff\xff\xff"}


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("payload", sorted(PAYLOADS))
def test_a_malformed_message_is_answered_with_a_reason(grpc_channel, method, payload):
    call = grpc_channel.unary_unary(method, request_serializer=lambda raw: raw, response_deserializer=lambda raw: raw)
    with pytest.raises(grpc.RpcError) as raised:
        call(PAYLOADS[payload], timeout=5)
    error = raised.value
    status = rpc_status.from_call(error)
    assert status is not None and status.details, (
        f"{method} answered {error.code().name} with no google.rpc.Status/ErrorInfo: {error.details()!r}"
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
