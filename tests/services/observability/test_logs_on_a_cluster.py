"""The workers' logs on a real cluster: JSON lines that follow a transfer by its id, and no ERROR
when a client gives up on its own (its deadline, or a cancel) while a shard is frozen."""

from __future__ import annotations

import json
import pathlib
import time

import grpc
import pytest

from corebank.v1 import payments_pb2, transfers_pb2
from services.group_commit import BATCH_TRANSFERS_MAX
from tests.fixtures import faults

SHORT_DEADLINE_SECONDS = 1.5
# A call its client cancels before this deadline, once its batches have started.
GIVEN_UP_DEADLINE_SECONDS = 3.0
CANCEL_AFTER_SECONDS = 0.5
# The shard stays frozen this long after the calls, past GIVEN_UP_DEADLINE_SECONDS, so that their
# batches (bounded by their transfers' deadlines) fail on it, with nobody waiting for them.
FROZEN_AFTER_CALLS_SECONDS = 4.0
FREEZE_SECONDS_MAX = 60
CALL_TIMEOUT_SECONDS = 10.0
THAWED_WITHIN_SECONDS = 30.0
RETRY_DELAY_SECONDS = 0.2
RETRIED_CODES = (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
LOG_FLUSH_WAIT_SECONDS = 1.0
ACCESS_LOGGER = "corebank.access"
# Deadlines so short that most pass before (or while) the worker starts the call: the ledger
# then refuses a call whose client has gone, which gRPC no longer lets anyone answer.
TINY_DEADLINES_SECONDS = (0.0005, 0.001, 0.002, 0.005)
TINY_DEADLINE_CALLS = 200


def worker_logs(cluster: dict) -> list[pathlib.Path]:
    """Every gRPC worker's JSON log and standard error file."""
    return sorted((pathlib.Path(cluster["state_dir"]) / "logs").glob("grpc-*.log"))


def sizes(paths: list[pathlib.Path]) -> dict[pathlib.Path, int]:
    return {path: path.stat().st_size for path in paths}


def written_since(before: dict[pathlib.Path, int], paths: list[pathlib.Path]) -> dict[pathlib.Path, str]:
    """What each file got after `before` (a file rotated meanwhile is read whole)."""
    found = {}
    for path in paths:
        with open(path, "rb") as log_file:
            start = before.get(path, 0)
            log_file.seek(start if start <= path.stat().st_size else 0)
            found[path] = log_file.read().decode(errors="replace")
    return found


def json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def transfer_request(ledger, debit, credit, prefix: str) -> payments_pb2.TransferRequest:
    return payments_pb2.TransferRequest(
        transfer_id=ledger.unique_id(prefix), debit_account_id=debit.account_id, credit_account_id=credit.account_id,
        amount_minor=1, currency="USD",
    )


def posted_once_back(ledger, payer, payee):
    """A transfer retried with the same id until the thawed shard takes it (at most THAWED_WITHIN_SECONDS)."""
    transfer_id = ledger.unique_id("back")
    deadline = time.monotonic() + THAWED_WITHIN_SECONDS
    while True:
        try:
            return ledger.transfer(payer.account_id, payee.account_id, 1, transfer_id=transfer_id, timeout=CALL_TIMEOUT_SECONDS)
        except grpc.RpcError as error:
            if error.code() not in RETRIED_CODES or time.monotonic() > deadline:
                raise
        time.sleep(RETRY_DELAY_SECONDS)


def test_a_transfer_is_followed_through_the_json_log_by_its_id(cluster, ledger, shard_map):
    paths = worker_logs(cluster)
    before = sizes(paths)
    shard_name = shard_map.shards[0].name
    payer, payee = ledger.funded(1_000, shard_name), ledger.open(shard=shard_name)
    transfer_id = ledger.unique_id("followed")
    assert ledger.transfer(payer.account_id, payee.account_id, 10, transfer_id=transfer_id).status == transfers_pb2.POSTED
    time.sleep(LOG_FLUSH_WAIT_SECONDS)
    lines = [line for path, text in written_since(before, worker_logs(cluster)).items()
             if not path.name.endswith(".stderr.log") for line in json_lines(text)]
    assert lines, "the workers logged nothing"
    assert all({"time", "level", "logger", "process", "message"} <= set(line) for line in lines)
    access = [line for line in lines if line.get("transfer_id") == transfer_id and line["logger"] == ACCESS_LOGGER]
    assert len(access) == 1, f"no single access line of {transfer_id}"
    assert access[0]["method"] == "/corebank.v1.Payments/Transfer" and access[0]["code"] == "OK"
    assert access[0]["request_id"] and access[0]["process"].startswith("grpc-")


def test_no_error_is_logged_when_clients_give_up_on_a_frozen_shard(cluster, cluster_control, ledger, shard_map):
    """Calls whose client gives up (a cancel, or a short deadline) while their shard is frozen: what
    their work meets later (its batches fail on the frozen shard) is nobody's error. A CreateTransfers
    of more than BATCH_TRANSFERS_MAX transfers waits on several batches at once: when its client
    cancelled, their failure was logged as ERROR `_GatheringFuture exception was never retrieved`."""
    frozen = shard_map.shards[-1].name
    payer, payee = ledger.funded(100_000, frozen), ledger.open(shard=frozen)
    paths = worker_logs(cluster)
    before = sizes(paths)

    def many(prefix: str) -> payments_pb2.CreateTransfersRequest:
        return payments_pb2.CreateTransfersRequest(
            transfers=[transfer_request(ledger, payer, payee, prefix) for _ in range(BATCH_TRANSFERS_MAX + 1)]
        )

    with faults.shard_frozen(cluster_control, frozen, seconds_max=FREEZE_SECONDS_MAX):
        given_up = ledger.payments.CreateTransfers.future(many("given-up"), timeout=GIVEN_UP_DEADLINE_SECONDS)
        time.sleep(CANCEL_AFTER_SECONDS)
        assert given_up.cancel(), "the call ended before its client gave up: nothing was tested"
        with pytest.raises(grpc.RpcError) as late:
            ledger.transfer(payer.account_id, payee.account_id, 1, timeout=SHORT_DEADLINE_SECONDS)
        assert late.value.code() in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED)
        answer = ledger.payments.CreateTransfers(many("late"), timeout=SHORT_DEADLINE_SECONDS)
        assert all(result.HasField("error") for result in answer.results)  # nothing posted on a frozen shard
        time.sleep(FROZEN_AFTER_CALLS_SECONDS)
    # Thawed: a call on the shard (retried, as its refusals say, while the shard catches up) takes
    # the workers past the batches that failed.
    assert posted_once_back(ledger, payer, payee).status == transfers_pb2.POSTED
    time.sleep(LOG_FLUSH_WAIT_SECONDS)
    written = written_since(before, worker_logs(cluster))
    assert not [path for path, text in written.items() if "never retrieved" in text]
    lines = [line for path, text in written.items() if not path.name.endswith(".stderr.log") for line in json_lines(text)]
    assert [line for line in lines if line["level"] in ("ERROR", "CRITICAL")] == []
    # The calls were seen and answered: what is asserted above was logged by workers that worked.
    assert "CANCELLED" in {line["code"] for line in lines if line["logger"] == ACCESS_LOGGER}


def test_no_error_is_logged_for_calls_whose_tiny_deadline_passed(cluster, ledger, shard_map):
    """A client's own short deadline is no fault of corebank's: before, about one call in five
    logged two ERROR tracebacks (`the interceptor's own error handling failed`, then gRPC's
    `Unexpected [UsageError] ... Abort already called!`)."""
    shard_name = shard_map.shards[0].name
    payer, payee = ledger.funded(1_000_000, shard_name), ledger.open(shard=shard_name)
    paths = worker_logs(cluster)
    before = sizes(paths)
    codes = set()
    for index in range(TINY_DEADLINE_CALLS):
        try:
            ledger.payments.Transfer(
                transfer_request(ledger, payer, payee, "tiny"), timeout=TINY_DEADLINES_SECONDS[index % len(TINY_DEADLINES_SECONDS)]
            )
            codes.add(grpc.StatusCode.OK)
        except grpc.RpcError as error:
            codes.add(error.code())
    assert grpc.StatusCode.DEADLINE_EXCEEDED in codes
    time.sleep(LOG_FLUSH_WAIT_SECONDS)
    written = written_since(before, worker_logs(cluster))
    lines = [line for path, text in written.items() if not path.name.endswith(".stderr.log") for line in json_lines(text)]
    assert [line["message"] for line in lines if line["level"] in ("ERROR", "CRITICAL")] == []
    assert not [path for path, text in written.items() if "Traceback" in text or "never retrieved" in text]
    # Calls did reach a worker and end by their deadline there (else nothing was tested).
    reached = [line for line in lines if line["logger"] == ACCESS_LOGGER and line.get("transfer_id", "").startswith("tiny")]
    assert "DEADLINE_EXCEEDED" in {line["code"] for line in reached}
