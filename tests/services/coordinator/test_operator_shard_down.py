"""`operator list` with a shard frozen: it answers with what the other shards know, names the
frozen one, and says so in its exit status, as text and as --json."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import grpc
import psycopg
import pytest

from corebank.v1 import transfers_pb2
from services.coordinator.operator import EXIT_SHARD_UNREACHABLE
from services.storage.audit import audit_cluster
from tests.chaos.test_shard_outage import wait_until_final
from tests.fixtures import faults

STRANDED_CALL_TIMEOUT_SECONDS = 2.0
# A guard against a hang, not a measure of speed: the operator asks each shard within its own bound.
OPERATOR_TIMEOUT_SECONDS = 120
FREEZE_SECONDS_MAX = 90


def operator(cluster: dict, *arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "services.coordinator.operator", "--cluster", os.path.join(cluster["state_dir"], "cluster.json"), *arguments],
        capture_output=True, text=True, timeout=OPERATOR_TIMEOUT_SECONDS,
    )


def test_list_answers_with_the_shards_that_answer_and_names_the_frozen_one(cluster, cluster_control, ledger, shard_map):
    debit_shard, frozen = shard_map.shards[0].name, shard_map.shards[-1].name
    payer, stranded = ledger.funded(5_000, debit_shard), ledger.open(shard=frozen)
    # Its record lives on the debit shard (up); its credit waits for the payee's row, held by another
    # session, then for the frozen shard: in doubt. (Frozen before the call, the payee's participant
    # could not be learned and the transfer would be refused before anything is recorded.)
    transfer_id = ledger.unique_id_on("stranded", debit_shard)
    frozen_dsn = next(shard.dsn for shard in shard_map.shards if shard.name == frozen)
    with psycopg.connect(frozen_dsn) as blocker:
        blocker.execute("SELECT 1 FROM accounts WHERE account_id = %s FOR UPDATE", [stranded.account_id])
        with pytest.raises(grpc.RpcError) as raised:
            ledger.transfer(payer.account_id, stranded.account_id, 400, transfer_id=transfer_id, timeout=STRANDED_CALL_TIMEOUT_SECONDS)
        assert raised.value.code() in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE)
        with faults.shard_frozen(cluster_control, frozen, seconds_max=FREEZE_SECONDS_MAX):
            as_text = operator(cluster, "list")
            as_json = operator(cluster, "list", "--json")
        blocker.rollback()
    for answer in (as_text, as_json):
        assert answer.returncode == EXIT_SHARD_UNREACHABLE, answer.stderr
        assert "Traceback" not in answer.stderr
    listed = next(line for line in as_text.stdout.splitlines() if line.startswith(transfer_id))
    assert f"{payer.account_id} -> {stranded.account_id} ({frozen})" in listed
    assert as_text.stdout.splitlines()[-1].endswith(f"on the shards that answered; NOT ANSWERING: {frozen}")
    assert f"SHARD UNREACHABLE: {frozen}" in as_text.stderr
    document = json.loads(as_json.stdout)
    assert (document["complete"], document["verdict"]) == (False, "incomplete: a shard did not answer")
    assert [shard["shard"] for shard in document["unreachable_shards"]] == [frozen]
    assert transfer_id in [transfer["transfer_id"] for transfer in document["transfers"]]

    # Back: it ends all or nothing, and the list is complete again.
    final = wait_until_final(ledger, transfer_id)
    assert final.status in (transfers_pb2.POSTED, transfers_pb2.VOIDED)
    again = operator(cluster, "list", "--json")
    assert again.returncode == 0, again.stderr
    document = json.loads(again.stdout)
    assert document["complete"] is True and document["unreachable_shards"] == []
    assert transfer_id not in [transfer["transfer_id"] for transfer in document["transfers"]]
    assert audit_cluster(cluster["shards"]).violations() == []
