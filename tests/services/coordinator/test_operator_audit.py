"""The operator's retry is written to the audit log before it acts and with how it ended."""

from __future__ import annotations

import asyncio
import types

from services.audit_log.writer import AuditWriter
from services.coordinator import operator
from services.ledger.coordination import CoordinatorState
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
