"""The operator's retry is written to the audit log before it acts and with how it ended; its answers
(text and --json) when a shard does not answer."""

from __future__ import annotations

import asyncio
import datetime
import json
import types

from services.audit_log.writer import AuditWriter
from services.coordinator import operator
from services.ledger import errors
from services.ledger.coordination import CoordinatorState
from services.storage.tcc_store import TccRecord
from tests.services.audit_log.test_writer import MemoryStore, targets


def run_retry(monkeypatch, store: MemoryStore, final) -> tuple[int, list[str]]:
    called = []

    async def fake_retry(tcc, shard_names, driver, transfer_id):
        called.append(transfer_id)
        return final

    monkeypatch.setattr(operator, "retry", fake_retry)

    async def scenario() -> int:
        log = AuditWriter(store, "operator", stalled_seconds_max=60)
        log.start()
        code = await operator.audited_retry(log, "alice", None, [], types.SimpleNamespace(owner="operator:1"), "t-9")
        await log.close(0.5)
        return code

    monkeypatch.setattr(operator, "AUDIT_WAIT_SECONDS_MAX", 0.3)
    return asyncio.run(scenario()), called


def test_a_retry_is_logged_before_and_after(monkeypatch):
    store = MemoryStore()
    final = types.SimpleNamespace(state=CoordinatorState.POSTED, reason="", lease_epoch=3, fault="")
    code, called = run_retry(monkeypatch, store, final)
    assert code == 0 and called == ["t-9"]
    entries = [link.entry for link in store.all_links() if link.entry.action == "operator_retry"]
    assert [(e.subject, e.role, e.target, e.outcome) for e in sorted(entries, key=lambda e: e.seq)] == [
        ("alice", "operator", "t-9", "STARTED"), ("alice", "operator", "t-9", "POSTED")]


def test_no_retry_is_made_when_its_entry_cannot_be_stored(monkeypatch):
    store = MemoryStore(("shard-0",))
    store.failing.add("shard-0")
    code, called = run_retry(monkeypatch, store, None)
    assert code == operator.EXIT_AUDIT_LOG_UNAVAILABLE and called == []
    assert targets(store.all_links(), "operator_retry") == []


def test_a_retry_that_meets_a_shard_down_is_logged_and_answers_with_its_own_status(monkeypatch, capsys):
    async def shard_down(tcc, shard_names, driver, transfer_id):
        raise errors.ShardUnavailable("shard-2: unavailable")

    monkeypatch.setattr(operator, "retry", shard_down)
    store = MemoryStore()

    async def scenario() -> int:
        log = AuditWriter(store, "operator", stalled_seconds_max=60)
        log.start()
        code = await operator.audited_retry(log, "alice", None, [], types.SimpleNamespace(owner="operator:1"), "t-9", True)
        await log.close(0.5)
        return code

    assert asyncio.run(scenario()) == operator.EXIT_SHARD_UNREACHABLE
    answer = json.loads(capsys.readouterr().out)
    assert answer["verdict"].startswith("state unknown") and answer["transfer_id"] == "t-9" and answer["state"] is None
    assert "shard-2" in answer["error"]
    entries = sorted((link.entry for link in store.all_links() if link.entry.action == "operator_retry"), key=lambda e: e.seq)
    assert [e.outcome for e in entries] == ["STARTED", "error:ShardUnavailable"]


def record(transfer_id: str, created_at: datetime.datetime, fault: str = "") -> TccRecord:
    return TccRecord(
        transfer_id=transfer_id, debit_account_id="acc_a", credit_account_id="acc_b", amount_minor=5, currency="USD",
        reference="", credit_shard="shard-2", state=CoordinatorState.TRYING, reason="", lease_owner="grpc-0:1", lease_epoch=1,
        lease_expires_at=created_at, pending_expires_at=created_at, attempts=1, created_at=created_at, updated_at=created_at,
        finalized_at=None, fault=fault,
    )


def test_list_answers_with_what_the_shards_that_answered_know_and_names_the_others(capsys):
    now = datetime.datetime.now(datetime.timezone.utc)
    in_doubt = operator.InDoubt([record("t-1", now), record("t-2", now, fault="broken")], {"shard-2": "shard-2: deadline passed"})
    assert operator.print_list(in_doubt, as_json_document=True) == operator.EXIT_SHARD_UNREACHABLE
    document = json.loads(capsys.readouterr().out)
    assert (document["complete"], document["in_doubt"], document["faulted"]) == (False, 2, 1)
    assert document["verdict"].startswith("incomplete")
    assert [t["transfer_id"] for t in document["transfers"]] == ["t-1", "t-2"]
    assert document["unreachable_shards"] == [{"shard": "shard-2", "error": "shard-2: deadline passed"}]
    assert operator.print_list(in_doubt, as_json_document=False) == operator.EXIT_SHARD_UNREACHABLE
    printed = capsys.readouterr()
    assert "2 transfer(s) in doubt, 1 FAULTED on the shards that answered; NOT ANSWERING: shard-2" in printed.out
    assert printed.err.strip() == "SHARD UNREACHABLE: shard-2: deadline passed"
    assert operator.print_list(operator.InDoubt([], {}), as_json_document=True) == operator.EXIT_DONE
    assert json.loads(capsys.readouterr().out)["complete"] is True
