"""The coordinators' integrity figures (services/coordinator/integrity.py) and the drives in flight, without a cluster."""

from __future__ import annotations

import asyncio
import pathlib

from psycopg import conninfo

from services.collection import SweepPass
from services.coordinator import driver as driver_module
from services.coordinator import integrity, metrics
from services.coordinator.__main__ import audited_shards
from services.coordinator.recovery import RECOVERY_SCAN_INTERVAL_SECONDS, in_doubt_bound_seconds
from services.ledger import errors
from services.ledger.money import CURRENCY_EXPONENTS
from services.ledger.transfers import Branch
from services.storage.audit import SHARD_INVARIANTS, Invariant, ShardBooks
from services.storage.roles import DatabaseRole
from sharding.shard_map import Shard, ShardMap
from tests.services.coordinator.test_simulation import REQUEST, run_virtual, two_shards


def books(shard_name: str, **changes) -> ShardBooks:
    """A shard whose books hold, unless `changes` say otherwise."""
    figures = dict(
        shard_name=shard_name, totals_by_currency={"USD": (500, 500, 20, 20)}, accounts_below_zero={},
        accounts_not_matching_transfers={}, transfers_naming_missing_accounts=[],
        clearing_balance_by_currency={"USD": 20}, in_flight_by_currency={"USD": 20}, snapshot_seconds=0.01,
    )
    return ShardBooks(**{**figures, **changes})


def families(collector) -> dict[str, list]:
    return {family.name: family.samples for family in collector.collect()}


def test_the_in_doubt_bound_is_the_pending_timeout_plus_a_dead_drivers_lease_the_scan_and_the_cancel():
    assert in_doubt_bound_seconds(30) == (
        30 + driver_module.LEASE_SECONDS + RECOVERY_SCAN_INTERVAL_SECONDS + 2 * driver_module.PARTICIPANT_CALL_TIMEOUT_SECONDS
    )
    assert in_doubt_bound_seconds(8) - in_doubt_bound_seconds(0) == 8


def test_before_the_first_run_every_count_reads_0_and_ok_is_absent():
    found = families(integrity.IntegrityCollector(in_doubt_bound_seconds(30)))
    assert "corebank_audit_ok" not in found  # nothing proved yet
    assert {s.labels["invariant"]: s.value for s in found["corebank_audit_violations"]} == {str(i): 0 for i in SHARD_INVARIANTS}
    assert found["corebank_audit_last_run_timestamp_seconds"][0].value == 0
    assert found["corebank_collection_last_sweep_timestamp_seconds"][0].value == 0
    assert {s.labels["currency"] for s in found["corebank_collection_backlog_minor"]} == set(CURRENCY_EXPONENTS)
    assert found["corebank_tcc_in_doubt_bound_seconds"][0].value == in_doubt_bound_seconds(30)


def test_a_run_counts_violations_by_invariant_and_keeps_clearing_and_in_flight_per_shard_and_currency():
    unbalanced = books("shard-1", totals_by_currency={"USD": (500, 499, 0, 0), "EUR": (7, 7, 0, 0)},
                       accounts_below_zero={"acc_a": -5, "acc_b": -1},
                       clearing_balance_by_currency={"EUR": 3, "XTS": 9}, in_flight_by_currency={"EUR": 3})
    run = integrity.audit_run([books("shard-0"), unbalanced], finished_at=1_700_000_000.0, duration_seconds=0.5)
    assert not run.ok
    assert run.violations == {
        **{str(i): 0 for i in SHARD_INVARIANTS}, str(Invariant.SHARD_UNBALANCED): 1, str(Invariant.BELOW_ZERO): 2,
        str(Invariant.CLEARING_NOT_IN_FLIGHT): 1,  # XTS: clearing 9, nothing in flight
    }
    assert run.clearing_minor == {("shard-0", "USD"): 20, ("shard-1", "EUR"): 3, ("shard-1", "other"): 9}
    assert run.in_flight_minor == {("shard-0", "USD"): 20, ("shard-1", "EUR"): 3, ("shard-1", "other"): 0}
    collector = integrity.IntegrityCollector(in_doubt_bound_seconds(30))
    collector.audited(run)
    found = families(collector)
    assert found["corebank_audit_ok"][0].value == 0
    assert found["corebank_audit_last_run_timestamp_seconds"][0].value == 1_700_000_000.0
    assert found["corebank_audit_duration_seconds"][0].value == 0.5
    violations = {s.labels["invariant"]: s.value for s in found["corebank_audit_violations"]}
    assert violations[str(Invariant.BELOW_ZERO)] == 2 and violations[str(Invariant.COUNTERS_DIFFER)] == 0
    clearing = {(s.labels["shard"], s.labels["currency"]): s.value for s in found["corebank_audit_clearing_minor"]}
    assert clearing == {("shard-0", "USD"): 20, ("shard-1", "EUR"): 3, ("shard-1", "other"): 9}
    collector.audited(integrity.audit_run([books("shard-0"), books("shard-1")], 1_700_000_060.0, 0.4))
    assert families(collector)["corebank_audit_ok"][0].value == 1


def test_the_periodic_audit_checks_only_what_one_shards_snapshot_proves():
    # The invariants between shards need every transfer id in memory and re-reads: the on-demand audit's.
    assert set(SHARD_INVARIANTS) == {
        Invariant.SHARD_UNBALANCED, Invariant.COUNTERS_DIFFER, Invariant.BELOW_ZERO, Invariant.MISSING_ACCOUNT,
        Invariant.CLEARING_NOT_IN_FLIGHT,
    }
    missing = books("shard-0", transfers_naming_missing_accounts=[("t1", Branch.DEBIT, "acc_gone")],
                    accounts_not_matching_transfers={"acc_a": ([1, 0, 0, 0], [0, 0, 0, 0])})
    assert sorted(v.invariant for v in missing.violations()) == sorted([Invariant.MISSING_ACCOUNT, Invariant.COUNTERS_DIFFER])


def test_an_unreadable_shard_leaves_the_last_result_standing(monkeypatch):
    collector = integrity.IntegrityCollector(1.0)
    shards = [("shard-0", "dsn-0"), ("shard-1", "dsn-1")]

    def read(name, dsn, statement_timeout_seconds):
        if name == "shard-1":
            raise integrity.audit.ShardUnreadable(name, "connection refused")
        return books(name)

    monkeypatch.setattr(integrity.audit, "audit_books", read)
    assert asyncio.run(integrity.PeriodicAudit(lambda: shards, collector).run_once()) is None
    assert collector.audit is None
    monkeypatch.setattr(integrity.audit, "audit_books", lambda name, dsn, timeout: books(name))
    run = asyncio.run(integrity.PeriodicAudit(lambda: shards, collector).run_once())
    assert run is not None and run.ok and collector.audit is run


def test_a_sweep_that_read_every_shard_sets_the_backlog_and_its_time():
    collector = integrity.IntegrityCollector(1.0)
    collector.swept(SweepPass(posted=2, backlog_minor_by_currency={"USD": 700, "XTS": 5}, backlog_sub_accounts=3))
    found = families(collector)
    backlog = {s.labels["currency"]: s.value for s in found["corebank_collection_backlog_minor"]}
    assert backlog["USD"] == 700 and backlog["other"] == 5 and backlog["EUR"] == 0
    assert found["corebank_collection_backlog_sub_accounts"][0].value == 3
    swept_at = found["corebank_collection_last_sweep_timestamp_seconds"][0].value
    assert swept_at > 0
    collector.swept(SweepPass(posted=0, shards_unread=1, backlog_minor_by_currency={"USD": 1}, backlog_sub_accounts=1))
    found = families(collector)
    assert found["corebank_collection_last_sweep_timestamp_seconds"][0].value == swept_at  # a partial pass says nothing
    assert found["corebank_collection_backlog_sub_accounts"][0].value == 3


def in_flight() -> float:
    return metrics.TRANSFERS_IN_FLIGHT._value.get()


def test_drives_in_flight_are_counted_until_they_end_even_when_cancelled():
    unavailable = [errors.ShardUnavailable("down") for _ in range(5)]

    async def scenario(clock):
        before = in_flight()
        shards, driver = two_shards(clock, credit_failures={"settle_credit": list(unavailable), "settle_credits": list(unavailable)})
        begun = await driver.begin(REQUEST, "shard-0", "shard-1", 2.0)
        seen = {}
        for name, drive in (("drive", lambda: driver.drive(begun.record)), ("drive_many", lambda: driver.drive_many([begun.record]))):
            task = asyncio.create_task(drive())
            await clock.sleep(0.06)  # backing off after a failed credit settle
            seen[name] = in_flight() - before
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            seen[f"{name} cancelled"] = in_flight() - before
        final = await driver.drive_many([begun.record])
        seen["finished"] = in_flight() - before
        return seen, final

    seen, final = run_virtual(scenario)
    assert seen == {"drive": 1, "drive cancelled": 0, "drive_many": 1, "drive_many cancelled": 0, "finished": 0}
    assert final["t1"].state.name == "POSTED"


def test_the_periodic_audit_reads_as_the_auditor_when_its_passfile_is_given():
    service_dsn = "host=127.0.0.1 port=5432 dbname=corebank user=corebank passfile=/state/secrets/service.pgpass"
    shard_map = ShardMap.evenly([Shard("shard-0", service_dsn)])
    ((name, dsn),) = audited_shards(shard_map, pathlib.Path("/state/secrets/auditor.pgpass"))
    fields = conninfo.conninfo_to_dict(dsn)
    assert name == "shard-0"
    assert (fields["user"], fields["passfile"]) == (DatabaseRole.AUDITOR.value, "/state/secrets/auditor.pgpass")
    assert (fields["host"], fields["port"], fields["dbname"]) == ("127.0.0.1", "5432", "corebank")
    assert audited_shards(shard_map, None) == [("shard-0", service_dsn)]


def test_clearing_figures_are_exposed_per_participant_and_absent_before_the_first_read():
    from services.coordinator.clearing_watch import ClearingFigures

    collector = integrity.IntegrityCollector(1.0)
    found = families(collector)
    assert found["corebank_clearing_last_read_timestamp_seconds"][0].value == 0
    assert found["corebank_clearing_position_minor"] == [] and found["corebank_clearing_net_debit_cap_minor"] == []
    assert found["corebank_clearing_closing_windows"][0].value == 0
    collector.read_clearing(ClearingFigures(
        positions_minor={("alpha", "USD"): 950, ("beta", "USD"): -950}, caps={("alpha", "USD"): (1000, 90)},
        open_window_id=7, open_window_age_seconds=12.5, closing_windows=1, oldest_closing_age_seconds=3.0,
        pending_settlements=2, oldest_pending_settlement_age_seconds=40.0, shards_on_another_window=0,
    ))
    found = families(collector)
    assert {(s.labels["participant"], s.labels["currency"]): s.value for s in found["corebank_clearing_position_minor"]} == {
        ("alpha", "USD"): 950, ("beta", "USD"): -950,
    }
    assert [(s.labels["participant"], s.value) for s in found["corebank_clearing_net_debit_cap_minor"]] == [("alpha", 1000)]
    assert [s.value for s in found["corebank_clearing_threshold_ratio"]] == [0.9]
    assert found["corebank_clearing_open_window_id"][0].value == 7
    assert found["corebank_clearing_pending_settlements"][0].value == 2
    assert found["corebank_clearing_last_read_timestamp_seconds"][0].value > 0
