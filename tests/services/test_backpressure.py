"""Past its bounds a service process refuses new calls at once with RESOURCE_EXHAUSTED /
OVERLOADED, instead of letting memory and waits grow with the crowd."""

import time

import grpc
import psycopg

from corebank.v1 import payments_pb2, payments_pb2_grpc
from services.api.interceptor import IN_FLIGHT_CALLS_MAX
from services.auth import client
from tests.fixtures.ledger import failure
from tests.services.coordinator.test_crash_recovery import service_process

EXCESS_CALLS = 40
STALLED_DEADLINE_SECONDS = 6.0
REFUSAL_SECONDS_MAX = 2.0  # "at once", with slack for a loaded 2-core machine


def test_calls_beyond_the_bounds_are_refused_at_once_and_the_rest_complete(cluster, ledger, shard_map):
    shard = shard_map.shards[0]
    payer, payee = ledger.funded(100_000, shard.name), ledger.open(shard=shard.name)
    with service_process("services.server", cluster, "backpressure") as (_, endpoint), client.channel(cluster, address=endpoint) as channel:
        stub = payments_pb2_grpc.PaymentsStub(channel)
        with psycopg.connect(shard.dsn) as blocker:
            # Every transfer from the payer now waits on its row: the process fills up.
            blocker.execute("SELECT 1 FROM accounts WHERE account_id = %s FOR UPDATE", [payer.account_id])
            started = time.monotonic()
            calls = [
                stub.Transfer.future(
                    payments_pb2.TransferRequest(
                        transfer_id=ledger.unique_id("crowd"), debit_account_id=payer.account_id,
                        credit_account_id=payee.account_id, amount_minor=1, currency="USD",
                    ),
                    timeout=STALLED_DEADLINE_SECONDS,
                )
                for _ in range(IN_FLIGHT_CALLS_MAX + EXCESS_CALLS)
            ]
            time.sleep(REFUSAL_SECONDS_MAX)
            # Within the window, while the row is still held: the excess has been answered.
            answered = [call for call in calls if call.done()]
            refused = [call for call in answered if call.code() == grpc.StatusCode.RESOURCE_EXHAUSTED]
            assert time.monotonic() - started < STALLED_DEADLINE_SECONDS
            blocker.rollback()
        outcomes = []
        for call in calls:
            try:
                outcomes.append(call.result().status)
            except grpc.RpcError as error:
                outcomes.append(error.code())
    assert len(refused) >= EXCESS_CALLS
    assert all(failure(call.exception())[1] == "OVERLOADED" for call in refused)
    posted = sum(1 for outcome in outcomes if outcome == 2)
    assert posted > 0  # the admitted ones went through once the row was free
    # Nothing refused was applied: the payee has exactly the posted ones.
    assert ledger.get(payee.account_id).balance_minor == posted
