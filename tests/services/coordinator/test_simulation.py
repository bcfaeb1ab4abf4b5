"""The coordinator under the deterministic simulation (services/coordinator/simulation.py), and
the driver's handling of failures by kind, over the in-memory shards. No cluster needed."""

import asyncio
import datetime
import os
import subprocess
import sys

import pytest

from services.coordinator import driver as driver_module
from services.coordinator import metrics, simulation, wiring
from services.coordinator.memory_tcc import AccountRow, MemoryTcc
from services.coordinator.operator import as_json, describe
from services.coordinator.recovery import Recovery
from services.ledger import errors
from services.ledger.accounts import AccountKind, AccountStatus
from services.ledger.coordination import BarrierOperation, CoordinatorState
from services.ledger.limits import TierLimits
from services.ledger.transfers import Branch, TransferRequest, TransferStatus

# Seeds run on every `make test` (about 25 s on 2 cores); `make sim SEEDS=100000` runs more.
SIM_SEEDS = int(os.environ.get("COREBANK_SIM_SEEDS", "8000"))
SIM_WORKERS = min(2, os.cpu_count() or 1)
# A broken variant must be caught within this many seeds (each is caught well before).
BROKEN_VARIANT_SEEDS_MAX = 1000


def test_thousands_of_seeds_keep_every_invariant():
    failures, totals = simulation.run_seeds_in_parallel(0, SIM_SEEDS, SIM_WORKERS)
    report = "\n".join(
        f"seed {result.seed} (trace {result.trace_digest}; replay: make sim SEED={result.seed}): {violation}"
        for result in failures for violation in result.violations
    )
    assert not failures, f"{len(failures)} of {SIM_SEEDS} seeds failed:\n{report}"
    print(f"{SIM_SEEDS} seeds: {totals}")
    # Not vacuous: the interesting paths did happen, every kind of fault was injected.
    for outcome in ("POSTED", "VOIDED:PENDING_TIMEOUT", "VOIDED:PARTICIPANT_FAULT", "REJECTED:INSUFFICIENT_FUNDS",
                    "REJECTED:ACCOUNT_FROZEN", "faulted"):
        assert totals.get(outcome, 0) > 0, f"no {outcome} in {SIM_SEEDS} seeds"
    for fault in simulation.Fault:
        if fault is not simulation.Fault.NONE:
            assert totals[f"injected_{fault.value}"] > 0


def test_a_seed_replays_exactly_even_in_another_process():
    first, second = simulation.run_seed(96, tracing=True), simulation.run_seed(96, tracing=True)
    assert first.trace == second.trace and first.trace_digest == second.trace_digest
    assert len(first.trace) > 50
    replayed = subprocess.run(
        [sys.executable, "-c", "from services.coordinator import simulation; print(simulation.run_seed(96).trace_digest)"],
        capture_output=True, text=True, check=True, env={**os.environ, "PYTHONHASHSEED": "12345"},
    )
    assert replayed.stdout.strip() == first.trace_digest


@pytest.mark.parametrize("variant", simulation.BROKEN_VARIANTS, ids=lambda variant: variant.name)
def test_the_invariants_catch_a_broken_variant(variant):
    for seed in range(BROKEN_VARIANT_SEEDS_MAX):
        result = simulation.run_seed(seed, variant)
        if result.violations:
            print(f"{variant.name}: caught at seed {seed}: {result.violations[0]}")
            return
    pytest.fail(f"{variant.name} not caught in {BROKEN_VARIANT_SEEDS_MAX} seeds: the simulation is blind to it")


# --- The driver's failures by kind, one scenario at a time, on the virtual clock. ---

class Scripted(MemoryTcc):
    """A shard whose chosen operations fail with the given errors (each used once, then it works)."""

    def __init__(self, shard_name, now, failures: dict[str, list[Exception]]):
        super().__init__(shard_name, now)
        self.failures = failures

    def __getattribute__(self, name):
        failures = object.__getattribute__(self, "failures")
        if name in failures and failures[name]:
            error = failures[name].pop(0)

            async def failing(*arguments, **keywords):
                raise error

            return failing
        return object.__getattribute__(self, name)


def two_shards(clock, debit_failures=None, credit_failures=None):
    debit = Scripted("shard-0", clock.now, debit_failures or {})
    credit = Scripted("shard-1", clock.now, credit_failures or {})
    debit.accounts["payer"] = AccountRow("payer", "USD", AccountKind.CUSTOMER, 1, AccountStatus.ACTIVE, credits_posted_minor=10_000)
    debit.accounts["genesis"] = AccountRow("genesis", "USD", AccountKind.SYSTEM, 0, AccountStatus.ACTIVE, debits_posted_minor=10_000)
    credit.accounts["payee"] = AccountRow("payee", "USD", AccountKind.CUSTOMER, 1, AccountStatus.ACTIVE)
    shards = {"shard-0": debit, "shard-1": credit}
    shard_of = {"payer": "shard-0", "payee": "shard-1"}

    def tcc(name):
        if name not in shards:
            raise errors.InternalFault(f"no shard named {name}")
        return shards[name]

    driver = driver_module.TransferDriver(
        tcc, shard_of.__getitem__, simulation.clearing_account_id_for, TierLimits.load(), "grpc-0", clock,
        pending_timeout_seconds=PENDING_TIMEOUT_SECONDS,
    )
    return shards, driver


def run_virtual(scenario):
    loop = simulation.VirtualTimeLoop()
    try:
        return loop.run_until_complete(scenario(simulation.VirtualClock(loop)))
    finally:
        loop.close()


def faults_counted(step: str) -> float:
    return metrics.FAULTS.labels(step)._value.get()


REQUEST = TransferRequest("t1", "payer", "payee", 2_500, "USD")
# Longer than any scenario here runs (tests/conftest.py shortens the default for the cluster's processes).
PENDING_TIMEOUT_SECONDS = 60.0


def test_a_permanent_failure_before_the_decision_cancels_the_transfer():
    before = faults_counted("settle_credit")

    async def scenario(clock):
        shards, driver = two_shards(clock, credit_failures={"settle_credit": [errors.InternalFault("constraint broken")]})
        begun = await driver.begin(REQUEST, "shard-0", "shard-1", 2.0)
        return shards, await driver.drive(begun.record)

    shards, final = run_virtual(scenario)
    assert (final.state, final.reason) == (CoordinatorState.VOIDED, "PARTICIPANT_FAULT")
    assert shards["shard-0"].accounts["payer"].debits_pending_minor == 0
    assert shards["shard-0"].transfers["t1"].status == TransferStatus.VOIDED
    # The cancel was stored on the credit shard first: a late settle can never apply.
    assert shards["shard-1"].barriers[("t1", Branch.CREDIT, BarrierOperation.TRY)] == "blocked_by_cancel:PARTICIPANT_FAULT"
    assert "t1" not in shards["shard-1"].transfers
    assert faults_counted("settle_credit") == before + 1


def test_a_permanent_failure_after_the_decision_is_recorded_skipped_by_recovery_and_retried_by_an_operator(caplog):
    before = faults_counted("confirm_debit")

    async def scenario(clock):
        shards, driver = two_shards(clock, debit_failures={"settle_debit": [errors.InternalFault("constraint broken")]})
        begun = await driver.begin(REQUEST, "shard-0", "shard-1", 2.0)
        stopped = await driver.drive(begun.record)
        await clock.sleep(driver_module.LEASE_SECONDS * 2)
        recovery = Recovery(driver.tcc, lambda: ["shard-0", "shard-1"], driver, clock=clock)
        claimed = await recovery.scan_once()
        listed = await shards["shard-0"].list_in_doubt_with_faults(10, 1.0)
        retried = await shards["shard-0"].claim_now_clearing_fault("t1", "operator", driver_module.LEASE_SECONDS, 1.0)
        final = await driver.drive(retried)
        return shards, stopped, claimed, listed, final

    shards, stopped, claimed, listed, final = run_virtual(scenario)
    assert stopped.state is CoordinatorState.TRYING and "confirm_debit" in stopped.fault
    assert shards["shard-1"].transfers["t1"].status == TransferStatus.POSTED  # decided: the credit is posted
    assert faults_counted("confirm_debit") == before + 1
    assert any(record.levelname == "ERROR" and "t1" in record.getMessage() and "FAULTED" in record.getMessage() for record in caplog.records)
    assert claimed == 0  # recovery does not loop on it silently
    assert [record.transfer_id for record in listed] == ["t1"] and "INTERNAL_FAULT" in listed[0].fault
    now = listed[0].created_at + datetime.timedelta(seconds=3)
    assert "FAULTED" in describe(listed[0], now) and as_json(listed[0], now)["faulted"] is True
    assert final.state is CoordinatorState.POSTED
    assert shards["shard-1"].accounts["payee"].credits_posted_minor == 2_500
    assert "t1" not in shards["shard-0"].faults


def test_transient_failures_are_retried_a_bounded_number_of_times_then_left_to_recovery():
    unavailable = [errors.ShardUnavailable("down") for _ in range(driver_module.DRIVE_TRANSIENT_FAILURES_MAX)]
    stopped_before = metrics.DRIVES_STOPPED._value.get()

    async def scenario(clock):
        shards, driver = two_shards(clock, credit_failures={"settle_credit": unavailable})
        begun = await driver.begin(REQUEST, "shard-0", "shard-1", 2.0)
        started = clock.monotonic()
        stopped = await driver.drive(begun.record)
        elapsed_seconds = clock.monotonic() - started
        await clock.sleep(driver_module.LEASE_SECONDS + 1)  # the lease it last renewed expires
        recovery = Recovery(driver.tcc, lambda: ["shard-0", "shard-1"], driver, clock=clock)
        assert await recovery.scan_once() == 1
        await asyncio.wait(recovery.drives)
        return stopped, elapsed_seconds, shards["shard-0"].records["t1"]

    stopped, elapsed_seconds, final = run_virtual(scenario)
    assert stopped.state is CoordinatorState.TRYING
    assert metrics.DRIVES_STOPPED._value.get() == stopped_before + 1
    # Capped exponential backoff: bounded, and renewing the lease meanwhile.
    assert elapsed_seconds <= driver_module.DRIVE_TRANSIENT_FAILURES_MAX * driver_module.RETRY_DELAY_SECONDS_MAX
    assert final.state is CoordinatorState.POSTED


@pytest.mark.parametrize("debit_shard_loses_it", [False, True], ids=["credit settle", "debit settle"])
def test_an_outcome_whose_answer_was_lost_is_found_and_kept(debit_shard_loses_it):
    name, operation = ("shard-0", "settle_debit") if debit_shard_loses_it else ("shard-1", "settle_credit")

    async def scenario(clock):
        shards, driver = two_shards(clock)
        real = getattr(shards[name], operation)

        async def commit_then_lose_the_answer(*arguments):
            await real(*arguments)
            raise errors.ShardUnavailable("connection lost after commit")

        setattr(shards[name], operation, commit_then_lose_the_answer)
        begun = await driver.begin(REQUEST, "shard-0", "shard-1", 2.0)
        drive = asyncio.create_task(driver.drive(begun.record))
        await clock.sleep(0.01)
        setattr(shards[name], operation, real)
        return shards, await drive

    shards, final = run_virtual(scenario)
    assert final.state is CoordinatorState.POSTED
    assert (shards["shard-0"].accounts["payer"].debits_posted_minor, shards["shard-1"].accounts["payee"].credits_posted_minor) == (2_500, 2_500)


def test_a_credit_shard_past_the_pending_timeout_blocks_the_try_itself():
    async def scenario(clock):
        shards, driver = two_shards(clock)
        begun = await driver.begin(REQUEST, "shard-0", "shard-1", 2.0)
        await clock.sleep(PENDING_TIMEOUT_SECONDS + 1)
        # Called directly, as a driver whose own clock lags would: the shard's clock decides.
        stored = await shards["shard-1"].settle_credit(begun.record, "clr-1-usd-0", TierLimits.load(), 1.0)
        return shards, stored, await driver.drive(begun.record)

    shards, stored, final = run_virtual(scenario)
    assert stored == "blocked_by_cancel:PENDING_TIMEOUT"
    assert (final.state, final.reason) == (CoordinatorState.VOIDED, "PENDING_TIMEOUT")
    assert "t1" not in shards["shard-1"].transfers and shards["shard-0"].accounts["payer"].debits_pending_minor == 0


def test_an_unknown_shard_is_a_permanent_fault_not_a_key_error():
    class Router:
        def handle(self, name):
            raise KeyError(name)

    with pytest.raises(errors.InternalFault):
        wiring.tcc_for_shard(Router())("shard-9")


def test_drive_many_reports_each_transfer_when_it_ends_not_when_the_slowest_does():
    """A CreateTransfers call's transfer to a healthy shard answers at once, even while another
    of the call's transfers waits for a shard that is down."""
    down = [errors.ShardUnavailable("down") for _ in range(8)]

    async def scenario(clock):
        shards, driver = two_shards(clock)
        far = Scripted("shard-2", clock.now, {"settle_credits": [down[0]], "settle_credit": down[1:]})
        far.accounts["far"] = AccountRow("far", "USD", AccountKind.CUSTOMER, 1, AccountStatus.ACTIVE)
        shards["shard-2"] = far
        driver.shard_name_for = {"payer": "shard-0", "payee": "shard-1", "far": "shard-2"}.__getitem__
        to_far = TransferRequest("t2", "payer", "far", 100, "USD")
        begun = await driver.begin_many([(REQUEST, "shard-0", "shard-1", False), (to_far, "shard-0", "shard-2", False)], 2.0)
        started = clock.monotonic()
        heard: dict[str, float] = {}
        latest = await driver.drive_many(
            [b.record for b in begun], on_final=lambda record: heard.setdefault(record.transfer_id, clock.monotonic() - started)
        )
        return heard, latest

    heard, latest = run_virtual(scenario)
    assert {record.state for record in latest.values()} == {CoordinatorState.POSTED}
    # The healthy one was reported before the other's retries (capped exponential backoff) were over.
    assert heard["t1"] < driver_module.RETRY_DELAY_SECONDS_MIN < heard["t2"]
