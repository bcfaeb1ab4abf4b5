"""The pure parts of services/api/metrics.py: outcomes, currency buckets, initialisation."""

import datetime

import grpc
from prometheus_client import REGISTRY

from services.api import metrics
from services.api.interceptor import answered_errors
from services.ledger import errors
from services.ledger.access import Role
from services.ledger.transfers import Transfer, TransferStatus
from services.observability import build_info

CONFIGURED = frozenset({"USD", "EUR"})


def transfer(status: TransferStatus, currency: str = "USD", amount_minor: int = 500) -> Transfer:
    return Transfer("t-1", "acc-a", "acc-b", amount_minor, currency, "", status, created_at=datetime.datetime.now(datetime.UTC))


def test_a_currency_outside_the_configured_set_is_other():
    assert metrics.currency_label("USD", CONFIGURED) == "USD"
    for hostile in ("CHF", "usd", "", "USD\n", "X" * 10_000, "other"):
        assert metrics.currency_label(hostile, CONFIGURED) == metrics.CURRENCY_OTHER


def test_outcomes_are_posted_rejected_voided_or_nothing_final():
    assert metrics.outcome_of(transfer(TransferStatus.POSTED)) == "posted"
    assert metrics.outcome_of(transfer(TransferStatus.PENDING)) is None
    assert metrics.outcome_of(errors.InsufficientFunds("no")) == "rejected"
    assert metrics.outcome_of(errors.LinkedTransferFailed("chain")) == "rejected"
    assert metrics.outcome_of(errors.TransferVoided("cancelled")) == "voided"
    for not_final in (errors.Overloaded("busy"), errors.DeadlineExceeded("late"), errors.InvalidAmount("0"), ValueError("bug")):
        assert metrics.outcome_of(not_final) is None


def sample(name: str, **labels) -> float | None:
    return REGISTRY.get_sample_value(name, labels)


def test_initialise_sets_every_known_label_value_to_zero():
    metrics.initialise([("corebank.v1.Payments", "Transfer")], answered_errors(), CONFIGURED)
    for code in grpc.StatusCode:
        assert sample("corebank_grpc_requests_total", service="corebank.v1.Payments", method="Transfer", code=code.name) is not None
    assert sample("corebank_grpc_request_duration_seconds_count", service="corebank.v1.Payments", method="Transfer") is not None
    labels = {"service": "corebank.v1.Payments", "method": "Transfer"}
    assert sample("corebank_grpc_errors_total", **labels, code="DEADLINE_EXCEEDED", reason="") is not None
    assert sample("corebank_grpc_errors_total", **labels, code="FAILED_PRECONDITION", reason="INSUFFICIENT_FUNDS") is not None
    for reason in errors.registered_reasons():
        assert sample("corebank_transfers_failed_total", reason=reason) is not None
    for cause in metrics.PROCESS_CAUSES:
        assert sample("corebank_overload_refusals_total", cause=cause, shard="") is not None
    for limit in ("subject", "velocity"):
        for role in Role:
            assert sample("corebank_rate_limited_total", limit=limit, role=role.value) is not None
    for outcome in metrics.OUTCOMES:
        for currency in (*CONFIGURED, "other"):
            assert sample("corebank_transfers_total", outcome=outcome, currency=currency) is not None
            assert sample("corebank_transfers_amount_minor_total", outcome=outcome, currency=currency) is not None


def test_answers_are_counted_by_outcome_and_bucketed_currency_never_the_callers_text():
    metrics.initialise([], [], CONFIGURED)
    before = sample("corebank_transfers_total", outcome="posted", currency="USD")
    before_amount = sample("corebank_transfers_amount_minor_total", outcome="posted", currency="USD")
    before_other = sample("corebank_transfers_total", outcome="rejected", currency="other")
    metrics.record_transfer_answer(transfer(TransferStatus.POSTED), "USD", 500)
    metrics.record_transfer_answer(errors.CurrencyMismatch("no"), "ZZZ-hostile", 700)
    metrics.record_transfer_answer(errors.LinkedTransferFailed("chain"), "EUR", -5)  # never validated: no amount
    metrics.record_transfer_answer(errors.Overloaded("busy"), "USD", 900)  # not final: not counted
    assert sample("corebank_transfers_total", outcome="posted", currency="USD") == before + 1
    assert sample("corebank_transfers_amount_minor_total", outcome="posted", currency="USD") == before_amount + 500
    assert sample("corebank_transfers_total", outcome="rejected", currency="other") == before_other + 1
    assert sample("corebank_transfers_total", outcome="rejected", currency="ZZZ-hostile") is None


def test_rate_limited_answers_are_counted_by_limit_and_role():
    before = sample("corebank_rate_limited_total", limit="velocity", role="service") or 0
    metrics.record_rate_limited(errors.RateLimited("slow down", 0.5, limit="DEBIT_ACCOUNT"), Role.SERVICE)
    metrics.record_rate_limited(errors.RateLimited("slow down", 0.5, limit="SOMETHING_NEW"), Role.SERVICE)
    assert sample("corebank_rate_limited_total", limit="velocity", role="service") == before + 1
    assert sample("corebank_rate_limited_total", limit="SOMETHING_NEW", role="service") is None


def test_build_info_names_the_version_python_and_role():
    build_info.record("grpc")
    found = [s for family in REGISTRY.collect() if family.name == "corebank_build_info" for s in family.samples]
    assert any(s.labels["role"] == "grpc" and s.labels["version"] == build_info.version() and s.value == 1 for s in found)
    assert build_info.version() not in ("", build_info.UNKNOWN_VERSION)
