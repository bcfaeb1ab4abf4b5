"""The audit trail end to end, on the session's cluster: calls through the real gRPC server
leave their entries (stored before the answer), and `verify` proves the live log."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import grpc
import psycopg
import pytest

from corebank.v1 import accounts_pb2, accounts_pb2_grpc
from services.audit_log import chain

REPO_ROOT = pathlib.Path(__file__).resolve().parents[3]
CLI_TIMEOUT_SECONDS = 120

pytestmark = pytest.mark.cluster


def entries_for(cluster: dict, target: str) -> list[chain.Entry]:
    found = []
    for shard in cluster["shards"]:
        with psycopg.connect(shard.get("auditor_dsn") or shard["dsn"]) as connection:
            rows = connection.execute(
                "SELECT chain_id, seq, at_us, subject, role, action, target, detail, outcome FROM audit_log WHERE target = %s",
                [target],
            ).fetchall()
        found += [chain.Entry(*row) for row in rows]
    # In the order they happened: each worker process writes a chain of its own, on its own shard.
    return sorted(found, key=lambda entry: entry.at_us)


def test_money_movements_account_actions_and_denied_attempts_are_in_the_log(cluster, ledger, shard_map, channel_as):
    shard = shard_map.shards[0].name
    payer, payee = ledger.funded(1_000, shard), ledger.open(shard=shard)
    posted = ledger.transfer(payer.account_id, payee.account_id, 25)
    (entry,) = entries_for(cluster, posted.transfer_id)  # stored before the answer came back
    assert (entry.action, entry.role, entry.outcome) == ("transfer", "admin", "POSTED")
    assert json.loads(entry.detail) == {
        "debit_account_id": payer.account_id, "credit_account_id": payee.account_id, "amount_minor": 25, "currency": "USD"}

    refused = ledger.unique_id("t")
    with pytest.raises(grpc.RpcError):
        ledger.transfer(payer.account_id, payee.account_id, 10_000_000, transfer_id=refused)
    (entry,) = entries_for(cluster, refused)
    assert entry.outcome.endswith(":INSUFFICIENT_FUNDS") or entry.outcome.startswith("REJECTED")

    ledger.accounts.UpdateAccountStatus(accounts_pb2.UpdateAccountStatusRequest(account_id=payee.account_id, status=accounts_pb2.FROZEN))
    opened, frozen = [e for e in entries_for(cluster, payee.account_id) if e.action in ("open_account", "update_account_status")]
    assert opened.action == "open_account" and opened.outcome == "OK"
    assert (frozen.action, frozen.detail, frozen.outcome) == ("update_account_status", '{"status":"FROZEN"}', "OK")

    # A customer reading another owner's account gets NOT_FOUND; the attempt is logged with who made it.
    stranger = accounts_pb2_grpc.AccountsStub(channel_as("customer", "audit-log-stranger"))
    with pytest.raises(grpc.RpcError) as refusal:
        stranger.GetAccount(accounts_pb2.GetAccountRequest(account_id=payer.account_id))
    assert refusal.value.code() == grpc.StatusCode.NOT_FOUND
    denied = [e for e in entries_for(cluster, payer.account_id) if e.action == "get_account"]
    assert [(e.subject, e.role, e.outcome) for e in denied] == [("audit-log-stranger", "customer", "not_found:ACCOUNT_NOT_FOUND")]


def test_the_live_log_verifies(cluster, ledger, shard_map):
    ledger.transfer(ledger.funded(100, shard_map.shards[1].name).account_id, ledger.open().account_id, 1)
    completed = subprocess.run(
        [sys.executable, "-m", "services.audit_log", "verify", "--json", "--cluster", os.path.join(cluster["state_dir"], "cluster.json")],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=CLI_TIMEOUT_SECONDS, check=False,
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr
    report = json.loads(completed.stdout)
    assert report["holds"] and report["chains"]
    # Every service process writes a chain of its own, opened with the tier limits in force.
    assert all(item["entries"] >= 1 for item in report["chains"])


def test_an_operator_retry_is_logged_with_its_actor(cluster, ledger):
    transfer_id = ledger.unique_id("never-begun")
    completed = subprocess.run(
        [sys.executable, "-m", "services.coordinator.operator", "--cluster", os.path.join(cluster["state_dir"], "cluster.json"),
         "retry", transfer_id, "--actor", "alice"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=CLI_TIMEOUT_SECONDS, check=False,
    )
    assert completed.returncode == 1, completed.stdout + completed.stderr  # no such transfer in doubt
    entries = sorted(entries_for(cluster, transfer_id), key=lambda e: e.seq)
    assert [(e.subject, e.role, e.action, e.outcome) for e in entries] == [
        ("alice", "operator", "operator_retry", "STARTED"), ("alice", "operator", "operator_retry", "not_found:TRANSFER_NOT_FOUND")]
    assert len({e.chain_id for e in entries}) == 1 and entries[0].chain_id.startswith("operator:")
