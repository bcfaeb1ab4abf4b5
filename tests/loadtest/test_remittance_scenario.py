"""The locust scenario `remittance` drives the Clearing service for real and its verdict passes.

Against the session's test cluster, for a few seconds, through `make loadtest`'s entry point
(loadtest.run): wallets of several participants paying each other while the operator user
closes a window every second and settles every second close. A cap small enough to bite makes
NET_DEBIT_CAP_EXCEEDED answers, which count apart and not as failures; the verdict's checks
(the Reconcile RPC, the windows and positions read from the databases) must all pass.
"""

from __future__ import annotations

import json
import pathlib

import pytest

from loadtest import run, swarm

USERS = 12
ACCOUNTS = 200
DURATION_SECONDS = 10
CLOSE_WINDOW_SECONDS = 1
SETTLE_EVERY_CLOSES = 2
# 1.00 USD, shared by 3 shards: a wallet's second or third payment out passes it unless it was paid
# in between, so refusals (and rebalances) come within the run however slow the machine is.
NET_DEBIT_CAP_MINOR = 100
CAP_REFUSED_NAME = "Transfer (cross-participant): NET_DEBIT_CAP_EXCEEDED"
CLEARING_CHECKS = (
    "Reconcile RPC: consistent",
    "every POSTED cleared transfer row has a window",
    "each acknowledged transfer between participants in exactly one window",
    "every window's totals equal its transfers",
    "every window's nets sum to zero",
    "every position share equals its windows' nets less the settled resets",
    "no participant of the run owes more than its net debit cap",
)


@pytest.mark.timeout(300)
def test_remittance_closes_and_settles_windows_under_load_and_its_verdict_passes(cluster, tmp_path, monkeypatch):
    monkeypatch.setenv("COREBANK_STATE_DIR", str(tmp_path / "no-cluster-here"))
    for name, value in {"ACCOUNTS": ACCOUNTS, "CLOSE_WINDOW_SECONDS": CLOSE_WINDOW_SECONDS,
                        "SETTLE_EVERY_CLOSES": SETTLE_EVERY_CLOSES, "NET_DEBIT_CAP_MINOR": NET_DEBIT_CAP_MINOR}.items():  # fmt: skip
        monkeypatch.setenv(name, str(value))
    for name in ("SCENARIO", "WORKERS", "MAX_FAILURE_RATIO", "MAX_P99_MS", "HOST", "PARTICIPANTS"):
        monkeypatch.delenv(name, raising=False)

    # The thresholds are not under test (no timed assertions): a generous p99 bound.
    exit_code = run.main(["--scenario", "remittance", "--users", str(USERS), "--duration", f"{DURATION_SECONDS}s",
                          "--host", cluster["state_dir"], "--max-p99-ms", "60000"])  # fmt: skip

    folder = sorted((pathlib.Path(cluster["state_dir"]) / swarm.REPORTS_FOLDER).glob("remittance-*"))[-1]
    verdict = json.loads((folder / swarm.VERDICT_FILE).read_text())
    failed = [check for check in verdict["checks"] if not check["ok"]]
    assert exit_code == 0 and verdict["passed"], failed
    labels = [check["label"] for check in verdict["checks"]]
    for wanted in CLEARING_CHECKS:
        assert any(label.startswith(wanted) for label in labels), (wanted, labels)

    calls = verdict["locust"]["calls_by_name"]
    # No timing assumed beyond the operator getting to settle once (SETTLE_EVERY_CLOSES closes).
    assert calls.get("CloseSettlementWindow", 0) >= SETTLE_EVERY_CLOSES, calls
    assert calls.get("CreateSettlement", 0) >= 1 and calls.get("RecordParticipantSettled", 0) >= 1, calls
    assert calls.get("Transfer (cross-participant)", 0) > 0 and calls.get("Transfer (same participant)", 0) > 0, calls
    # The cap bit, and its refusals were answers, not failures: none is in locust's failures.
    assert calls.get(CAP_REFUSED_NAME, 0) > 0, calls
    sent = [row for row in (folder / swarm.TRANSFERS_FILE).read_text().splitlines()[1:] if "NET_DEBIT_CAP_EXCEEDED" in row]
    assert len(sent) == calls[CAP_REFUSED_NAME]
    assert verdict["locust"]["failures"] <= verdict["locust"]["requests"] * run.MAX_FAILURE_RATIO_DEFAULT

    plan = swarm.read_plan(folder)
    assert len(plan.accounts.participant_ids) == 4 and plan.accounts.net_debit_cap_minor == NET_DEBIT_CAP_MINOR
    assert set(plan.accounts.participant_by_account_id.values()) == set(plan.accounts.participant_ids)
