"""The locust scenarios drive the real API and leave a ledger that passes every check.

Runs the flash-sale scenario (spike shape, one collect_on_every_shard merchant)
for a few seconds through the same entry points as `make loadtest`, against the
session's test cluster.
"""

from __future__ import annotations

import json
import pathlib

import pytest

from loadtest.accounts import AccountSet
from loadtest.check import check_run, read_merchant_samples, read_transfers
from loadtest.run import duration_seconds, requests_recorded, run_locust

DURATION_SECONDS = 6
USERS = 20
ACCOUNTS = 300


@pytest.mark.timeout(120)
def test_flash_sale_scenario_passes_the_checks(cluster, tmp_path: pathlib.Path, monkeypatch) -> None:
    monkeypatch.setenv("COREBANK_STATE_DIR", str(cluster["state_dir"]))
    monkeypatch.setenv("ACCOUNTS", str(ACCOUNTS))
    monkeypatch.setenv("RAMP_SECONDS", "1")
    prefix = tmp_path / "flash-sale"

    exit_code = run_locust("flash-sale", USERS, USERS, DURATION_SECONDS, prefix)

    assert exit_code in (0, 1), f"locust crashed (exit {exit_code})"
    requests, _failures = requests_recorded(pathlib.Path(f"{prefix}_stats.csv"))
    assert requests > 0
    assert pathlib.Path(f"{prefix}.html").exists()
    setup = json.loads(pathlib.Path(f"{prefix}-setup.json").read_text())
    accounts = AccountSet.from_json(json.dumps(setup["accounts"]))
    assert len(accounts.merchant_account_ids) == 1
    assert len([a for ids in accounts.customer_account_ids_by_shard.values() if ids for a in ids]) == ACCOUNTS
    sent = read_transfers(pathlib.Path(f"{prefix}-transfers.csv"))
    assert any(t.outcome == "posted" for t in sent), "no payment was acknowledged"
    # Every call got its answer: none timed out in the client (as calls once did under gevent when
    # the token rode on a Python call-credentials plugin: they never left the load generator).
    unanswered = [t.transfer_id for t in sent if t.outcome in ("unknown", "sent")]
    assert unanswered == [], f"{len(unanswered)} of {len(sent)} payments got no answer, e.g. {unanswered[:3]}"

    samples = read_merchant_samples(pathlib.Path(f"{prefix}-merchant.csv"))
    assert samples, "the merchant's balance was never read during the run"

    assert check_run(cluster, accounts, sent, "flash-sale", merchant_samples=samples) == []


@pytest.mark.parametrize(("text", "seconds"), [("90", 90), ("90s", 90), ("2m", 120), ("1m30s", 90), ("1h", 3600)])
def test_durations_read_like_locust(text: str, seconds: int) -> None:
    assert duration_seconds(text) == seconds
