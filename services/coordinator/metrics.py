"""Prometheus metrics of the coordinator, in the gRPC workers and coordinator processes alike."""

from prometheus_client import Counter, Gauge, Histogram

from services.coordinator.state_machine import Action, CoordinatorState

DRIVES = Counter("corebank_tcc_drives", "Runs of the TCC driver, by the state they ended in", ["state"])
DRIVE_DURATION = Histogram(
    "corebank_tcc_drive_duration_seconds", "From a driver's start on a transfer to its end",
    buckets=(0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0),
)
# Exposed as corebank_tcc_faults_total. Any increase is a bug or a broken invariant: alert on it.
# Before the decision the transfer was cancelled (VOIDED, PARTICIPANT_FAULT); after it the record
# is marked faulted and waits for an operator (`python -m services.coordinator.operator list`).
FAULTS = Counter("corebank_tcc_faults", "Permanent failures met while driving a transfer, by the step that failed", ["step"])
# The step of a lease renewal that failed permanently (not an Action of the state machine).
FAULT_STEP_RENEW_LEASE = "renew_lease"
# Every step and end state at 0 from the start, so rates and increases read 0, not "no data".
for _step in (*(action.value for action in Action), FAULT_STEP_RENEW_LEASE):
    FAULTS.labels(_step)
for _state in CoordinatorState:
    DRIVES.labels(_state.name)
DRIVES_STOPPED = Counter(
    "corebank_tcc_drives_stopped", "Drives that stopped after DRIVE_TRANSIENT_FAILURES_MAX transient failures (left to recovery)"
)
RECOVERED = Counter("corebank_tcc_recovered", "Transfers taken over after their driver's lease expired")
IN_DOUBT = Gauge("corebank_tcc_in_doubt", "Transfers between shards not yet final, at the last recovery scan", ["shard"])
OLDEST_IN_DOUBT_SECONDS = Gauge(
    "corebank_tcc_oldest_in_doubt_seconds", "Age of the oldest transfer not yet final, at the last recovery scan", ["shard"]
)
# Inc'd when a drive starts, dec'd when it ends whichever way (final, lost, stopped, cancelled).
TRANSFERS_IN_FLIGHT = Gauge("corebank_tcc_transfers_in_flight", "Transfers between shards this process is driving now")
