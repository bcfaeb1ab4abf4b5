"""The gRPC workers' metrics on the real cluster (deploy/prometheus/metrics.md, "Calls" and "Money"):
every label value there from the start, each call counted by the code its client saw,
transfers by outcome and currency."""

from __future__ import annotations

import contextlib
import time
import urllib.request
from collections.abc import Iterator

import grpc
import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from corebank.v1 import accounts_pb2, payments_pb2
from services.api.interceptor import IN_FLIGHT_CALLS_MAX
from services.ledger import errors
from services.ledger.access import Role
from services.ledger.limits import TierLimits
from tests.fixtures import faults
from tests.fixtures.ledger import failure

PAYMENTS = "corebank.v1.Payments"
CLIENT_DEADLINE_SECONDS = 0.5
CLIENT_CANCEL_AFTER_SECONDS = 0.3
# A CreateTransfers this big takes over a second to serve: its deadline passes while it is
# served, and it is long enough for the call to reach the handler (a call whose deadline passes
# inside gRPC, before its handler starts, is answered by gRPC alone and counted nowhere).
BIG_CALL_TRANSFERS = 5_000
BIG_CALL_DEADLINE_SECONDS = 0.2
# A worker counts a call when its handler ends, which may be after the client left.
COUNTED_POLLS_MAX = 100
POLL_INTERVAL_SECONDS = 0.05
SCRAPE_TIMEOUT_SECONDS = 5
FREEZE_SECONDS_MAX = 30


def grpc_workers_metrics(cluster: dict) -> list[str]:
    return [process["metrics"] for process in cluster["processes"] if process["role"] == "grpc"]


def scrape(endpoint: str) -> dict[tuple[str, frozenset], float]:
    with urllib.request.urlopen(f"http://{endpoint}/metrics", timeout=SCRAPE_TIMEOUT_SECONDS) as response:
        text = response.read().decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text) for sample in family.samples
    }


def total(cluster: dict, name: str, **labels: str) -> float:
    """The sum over every gRPC worker (the port is shared: any of them may serve a call)."""
    wanted = frozenset(labels.items())
    return sum(
        value for endpoint in grpc_workers_metrics(cluster)
        for (found, found_labels), value in scrape(endpoint).items() if found == name and wanted <= found_labels
    )


def calls(cluster: dict, method: str, code: str) -> float:
    return total(cluster, "corebank_grpc_requests_total", service=PAYMENTS, method=method, code=code)


def assert_counted_as_seen(cluster: dict, method: str, seen: grpc.StatusCode, before: dict[str, float]) -> None:
    """The workers counted the call once, by the code its client saw, and not as OK."""
    for _ in range(COUNTED_POLLS_MAX):
        if calls(cluster, method, seen.name) > before[seen.name]:
            break
        time.sleep(POLL_INTERVAL_SECONDS)
    assert calls(cluster, method, seen.name) == before[seen.name] + 1, f"{method} not counted as {seen.name}"
    assert calls(cluster, method, "OK") == before["OK"]


def counts_before(cluster: dict, method: str, seen: grpc.StatusCode) -> dict[str, float]:
    return {code: calls(cluster, method, code) for code in ("OK", seen.name)}


def test_every_known_label_value_is_exposed_from_the_start(cluster, shard_map):
    currencies = {currency for _, currency in TierLimits.load().by_tier_and_currency}
    for endpoint in grpc_workers_metrics(cluster):
        samples = scrape(endpoint)

        def value(name: str, **labels: str) -> float | None:
            return samples.get((name, frozenset(labels.items())))

        for method in payments_pb2.DESCRIPTOR.services_by_name["Payments"].methods:
            for code in grpc.StatusCode:
                assert value("corebank_grpc_requests_total", service=PAYMENTS, method=method.name, code=code.name) is not None
            # A code corebank never answers: there, and 0.
            assert value("corebank_grpc_requests_total", service=PAYMENTS, method=method.name, code="DATA_LOSS") == 0
            assert value("corebank_grpc_request_duration_seconds_count", service=PAYMENTS, method=method.name) is not None
            for code in ("DEADLINE_EXCEEDED", "CANCELLED"):
                assert value("corebank_grpc_errors_total", service=PAYMENTS, method=method.name, code=code, reason="") is not None
        accounts = accounts_pb2.DESCRIPTOR.services_by_name["Accounts"]
        for method in accounts.methods:
            assert value("corebank_grpc_requests_total", service=accounts.full_name, method=method.name, code="OK") is not None
        for reason in errors.registered_reasons():
            assert value("corebank_transfers_failed_total", reason=reason) is not None
        assert value("corebank_overload_refusals_total", cause="in_flight_limit", shard="") is not None
        for shard in shard_map.shards:
            for cause in ("queue_full", "queue_wait"):
                assert value("corebank_overload_refusals_total", cause=cause, shard=shard.name) is not None
        for role in Role:
            for limit in ("subject", "velocity"):
                assert value("corebank_rate_limited_total", limit=limit, role=role.value) is not None
        for outcome in ("posted", "rejected", "voided"):
            for currency in (*currencies, "other"):
                assert value("corebank_transfers_total", outcome=outcome, currency=currency) is not None
                assert value("corebank_transfers_amount_minor_total", outcome=outcome, currency=currency) is not None
        assert value("corebank_grpc_requests_in_flight_limit") == IN_FLIGHT_CALLS_MAX
        assert value("corebank_grpc_requests_in_flight") is not None
        assert [labels for (name, labels), found in samples.items() if name == "corebank_build_info" and found == 1
                and dict(labels)["role"] == "grpc" and dict(labels)["version"] and dict(labels)["python"]]


def transfer_request(ledger, payer, payee, amount_minor: int, currency: str = "USD") -> payments_pb2.TransferRequest:
    return payments_pb2.TransferRequest(
        transfer_id=ledger.unique_id("m"), debit_account_id=payer.account_id, credit_account_id=payee.account_id,
        amount_minor=amount_minor, currency=currency,
    )


@contextlib.contextmanager
def payer_locked(ledger, shard_map) -> Iterator[tuple]:
    """(payer, payee) on one shard while another session holds the payer's row lock, as a long
    transaction would: a transfer from it waits."""
    shard = shard_map.shards[0]
    payer, payee = ledger.funded(1_000, shard.name), ledger.open(shard=shard.name)
    with psycopg.connect(shard.dsn) as blocker:
        blocker.execute("SELECT 1 FROM accounts WHERE account_id = %s FOR UPDATE", [payer.account_id])
        yield payer, payee
        blocker.rollback()


def test_a_transfer_whose_client_deadline_passes_behind_a_lock_is_counted_deadline_exceeded(cluster, ledger, shard_map):
    with payer_locked(ledger, shard_map) as (payer, payee):
        before = counts_before(cluster, "Transfer", grpc.StatusCode.DEADLINE_EXCEEDED)
        with pytest.raises(grpc.RpcError) as raised:
            ledger.payments.Transfer(transfer_request(ledger, payer, payee, 10), timeout=CLIENT_DEADLINE_SECONDS)
        assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert_counted_as_seen(cluster, "Transfer", grpc.StatusCode.DEADLINE_EXCEEDED, before)


def test_a_transfer_its_client_cancels_is_counted_cancelled(cluster, ledger, shard_map):
    with payer_locked(ledger, shard_map) as (payer, payee):
        before = counts_before(cluster, "Transfer", grpc.StatusCode.CANCELLED)
        call = ledger.payments.Transfer.future(transfer_request(ledger, payer, payee, 10))
        time.sleep(CLIENT_CANCEL_AFTER_SECONDS)
        assert call.cancel()
        assert_counted_as_seen(cluster, "Transfer", grpc.StatusCode.CANCELLED, before)


def test_a_transfer_to_a_frozen_shard_is_counted_by_the_code_its_client_saw(cluster, cluster_control, ledger, shard_map):
    frozen = shard_map.shards[2]
    payer, payee = ledger.funded(1_000, frozen.name), ledger.open(shard=frozen.name)
    before = counts_before(cluster, "Transfer", grpc.StatusCode.DEADLINE_EXCEEDED)
    with faults.shard_frozen(cluster_control, frozen.name, FREEZE_SECONDS_MAX):
        with pytest.raises(grpc.RpcError) as raised:
            ledger.payments.Transfer(transfer_request(ledger, payer, payee, 10), timeout=CLIENT_DEADLINE_SECONDS)
        assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert_counted_as_seen(cluster, "Transfer", grpc.StatusCode.DEADLINE_EXCEEDED, before)


def test_a_big_create_transfers_past_its_deadline_is_counted_deadline_exceeded(cluster, ledger, shard_map):
    shard = shard_map.shards[1]
    payer, payee = ledger.funded(BIG_CALL_TRANSFERS, shard.name), ledger.open(shard=shard.name)
    request = payments_pb2.CreateTransfersRequest(
        transfers=[transfer_request(ledger, payer, payee, 1) for _ in range(BIG_CALL_TRANSFERS)]
    )
    before = counts_before(cluster, "CreateTransfers", grpc.StatusCode.DEADLINE_EXCEEDED)
    with pytest.raises(grpc.RpcError) as raised:
        ledger.payments.CreateTransfers(request, timeout=BIG_CALL_DEADLINE_SECONDS)
    assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert_counted_as_seen(cluster, "CreateTransfers", grpc.StatusCode.DEADLINE_EXCEEDED, before)


def money(cluster: dict, outcome: str, currency: str) -> tuple[float, float]:
    return (
        total(cluster, "corebank_transfers_total", outcome=outcome, currency=currency),
        total(cluster, "corebank_transfers_amount_minor_total", outcome=outcome, currency=currency),
    )


def test_transfers_are_counted_by_outcome_and_a_configured_currency_or_other(cluster, ledger, shard_map):
    shard = shard_map.shards[0].name
    payer, payee = ledger.funded(1_000, shard), ledger.open(shard=shard)
    posted, rejected, other = money(cluster, "posted", "USD"), money(cluster, "rejected", "USD"), money(cluster, "rejected", "other")
    ledger.payments.Transfer(transfer_request(ledger, payer, payee, 300))
    with pytest.raises(grpc.RpcError) as raised:
        ledger.payments.Transfer(transfer_request(ledger, payer, payee, 5_000))
    assert failure(raised.value)[1] == "INSUFFICIENT_FUNDS"
    # A currency the service knows but the bank does not hold, then one nobody knows.
    results = ledger.payments.CreateTransfers(payments_pb2.CreateTransfersRequest(transfers=[
        transfer_request(ledger, payer, payee, 200), transfer_request(ledger, payer, payee, 70, currency="CHF"),
        transfer_request(ledger, payer, payee, 80, currency="QQQ"),
    ])).results
    assert [result.HasField("error") for result in results] == [False, True, True]
    assert money(cluster, "posted", "USD") == (posted[0] + 2, posted[1] + 500)
    assert money(cluster, "rejected", "USD") == (rejected[0] + 1, rejected[1] + 5_000)
    assert money(cluster, "rejected", "other") == (other[0] + 1, other[1] + 70)  # CURRENCY_MISMATCH
    for endpoint in grpc_workers_metrics(cluster):  # no series made for a currency outside the configured set
        assert not [labels for _, labels in scrape(endpoint) if ("currency", "CHF") in labels or ("currency", "QQQ") in labels]
