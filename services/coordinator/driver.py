"""Drives transfers between shards through the state machine, doing the I/O it asks for.

The gRPC workers start and drive new transfers inline (so a transfer usually
finishes in one request); coordinator processes (recovery.py) take over any
transfer whose lease has expired. Every participant operation is idempotent and
every record change is a compare-and-set on the lease epoch, so a driver that
wakes up after its lease was taken over changes nothing.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import logging
import os
import time

import psycopg

from services.coordinator import crash_points, metrics
from services.coordinator.clearing import clearing_account_id
from services.coordinator.state_machine import Action, CoordinatorState, Event, FINAL_STATES, Step
from services.coordinator.state_machine import final_state_after_cancel, transition
from services.ledger import errors
from services.ledger.limits import TierLimits
from services.ledger.transfers import Transfer, TransferRequest
from services.storage.shard_store import ShardStore
from services.storage.tcc_store import TccRecord, TccStore
from sharding.router import ShardRouter

# A driver owns a transfer for this long without renewing; a dead driver's
# transfers are taken over at most LEASE_SECONDS + recovery's scan interval later.
LEASE_SECONDS = 5.0
# A transfer not confirmed this long after it started is cancelled, releasing the
# reservations. Tests shorten it through the environment to see it happen.
PENDING_TIMEOUT_SECONDS = float(os.environ.get("COREBANK_PENDING_TIMEOUT_SECONDS", "30"))
PARTICIPANT_CALL_TIMEOUT_SECONDS = 2.0
RETRY_DELAY_SECONDS_MIN = 0.05
RETRY_DELAY_SECONDS_MAX = 2.0
# Waiting on a transfer another driver owns: poll its record this often at most.
POLL_INTERVAL_SECONDS_MAX = 0.5

# Failures after which the outcome is unknown: retry the same (idempotent) operation.
RETRYABLE = (errors.ShardUnavailable, errors.DeadlineExceeded, psycopg.Error, KeyError)

log = logging.getLogger(__name__)


class TransferDriver:
    def __init__(self, router: ShardRouter[ShardStore], limits: TierLimits, owner: str) -> None:
        self.router = router
        self.limits = limits
        self.owner = owner

    def tcc(self, shard_name: str) -> TccStore:
        return TccStore(self.router.handle(shard_name))

    async def begin(self, request: TransferRequest, debit_shard: str, credit_shard: str, timeout_seconds: float):
        clearing = clearing_account_id(self.router.shard_map, debit_shard, request.currency, request.transfer_id)
        begun = await self.tcc(debit_shard).begin(
            request, credit_shard, clearing, self.limits, self.owner, LEASE_SECONDS, PENDING_TIMEOUT_SECONDS, timeout_seconds
        )
        crash_points.reached(crash_points.AFTER_BEGIN)
        return begun

    async def drive(self, record: TccRecord) -> TccRecord:
        """Run the protocol until the transfer is final, or until another driver owns it."""
        started = time.monotonic()
        step = transition(record.state, record.reason, Event.RESUMED)
        failures = 0
        lease_renewed_at = time.monotonic()
        while step.action is not None:
            event, event_reason, record = await self._perform(step, record)
            if event in (Event.CREDIT_TRY_FAILED, Event.CREDIT_FINISH_FAILED) or (event is None):
                failures += 1
                await asyncio.sleep(min(RETRY_DELAY_SECONDS_MIN * 2**failures, RETRY_DELAY_SECONDS_MAX))
                if time.monotonic() - lease_renewed_at > LEASE_SECONDS / 2:
                    if not await self._renew(record):
                        event = Event.LEASE_LOST
                    lease_renewed_at = time.monotonic()
                if event is None:
                    continue  # the action itself failed before an answer: do it again
            else:
                failures = 0
            step = transition(step.state, step.reason, event, event_reason)
        metrics.DRIVES.labels(step.state.name).inc()
        metrics.DRIVE_DURATION.observe(time.monotonic() - started)
        return record  # not final when abandoned: the caller waits for the new owner

    async def _perform(self, step: Step, record: TccRecord) -> tuple[Event | None, str, TccRecord]:
        """Do one action; return the event it produced (None: failed with unknown outcome, retry)."""
        action = step.action
        try:
            if action is Action.TRY_CREDIT:
                if record.pending_expires_at <= datetime.datetime.now(datetime.timezone.utc):
                    return Event.PENDING_EXPIRED, "", record
                clearing = clearing_account_id(self.router.shard_map, record.credit_shard, record.currency, record.transfer_id)
                try:
                    outcome = await self.tcc(record.credit_shard).try_credit(
                        record, clearing, self.limits, PARTICIPANT_CALL_TIMEOUT_SECONDS
                    )
                except RETRYABLE as error:
                    log.info("try of %s on %s failed: %s", record.transfer_id, record.credit_shard, error)
                    return Event.CREDIT_TRY_FAILED, "", record
                crash_points.reached(crash_points.AFTER_CREDIT_TRY)
                if outcome == "applied":
                    return Event.CREDIT_TRY_APPLIED, "", record
                if outcome.startswith("refused:"):
                    return Event.CREDIT_TRY_REFUSED, outcome.removeprefix("refused:"), record
                return Event.CREDIT_TRY_BLOCKED, "", record
            if action in (Action.DECIDE_CONFIRM, Action.DECIDE_CANCEL):
                return await self._decide(record, action is Action.DECIDE_CONFIRM, step.reason)
            if action in (Action.CONFIRM_CREDIT, Action.CANCEL_CREDIT):
                confirm = action is Action.CONFIRM_CREDIT
                try:
                    result = await self.tcc(record.credit_shard).finish_credit(record, confirm, PARTICIPANT_CALL_TIMEOUT_SECONDS)
                except RETRYABLE as error:
                    log.info("%s of %s failed: %s", action.value, record.transfer_id, error)
                    return Event.CREDIT_FINISH_FAILED, "", record
                # A confirm that wrote its barrier must have found the reserved credit branch.
                assert not (confirm and result.barrier_new and not result.moved), f"credit branch of {record.transfer_id} was not pending"
                crash_points.reached(crash_points.AFTER_CREDIT_FINISH)
                return (Event.CREDIT_CONFIRMED if confirm else Event.CREDIT_CANCELLED), "", record
            if action is Action.FINISH:
                final_state = CoordinatorState.POSTED if record.state is CoordinatorState.CONFIRMING else final_state_after_cancel(record.reason)
                finished = await self.tcc(self._debit_shard(record)).finish_record(record, final_state, PARTICIPANT_CALL_TIMEOUT_SECONDS)
                if finished is None:
                    return Event.LEASE_LOST, "", record
                return Event.FINISHED, "", finished
        except RETRYABLE as error:
            log.info("%s of %s failed: %s", action.value, record.transfer_id, error)
            return None, "", record
        raise AssertionError(f"no handler for {action}")

    async def _decide(self, record: TccRecord, confirm: bool, reason: str) -> tuple[Event, str, TccRecord]:
        debit = self.tcc(self._debit_shard(record))
        result = await debit.decide(record, confirm, reason, PARTICIPANT_CALL_TIMEOUT_SECONDS)
        if not result.won:
            # Lost the compare-and-set: an earlier attempt of ours may have committed,
            # the pending timeout may have passed, or another driver owns it now.
            current = await debit.get_record(record.transfer_id, PARTICIPANT_CALL_TIMEOUT_SECONDS)
            assert current is not None
            if current.lease_epoch != record.lease_epoch or current.state in FINAL_STATES:
                return Event.LEASE_LOST, "", current
            if current.state is CoordinatorState.TRYING:
                return Event.PENDING_EXPIRED, "", current
            record = current
        else:
            state = CoordinatorState.CONFIRMING if confirm else CoordinatorState.CANCELLING
            record = dataclasses.replace(record, state=state, reason=reason)
        crash_points.reached(crash_points.AFTER_DECISION)
        if record.state is CoordinatorState.CONFIRMING:
            return Event.DECIDED_CONFIRM, "", record
        return Event.DECIDED_CANCEL, record.reason, record

    async def _renew(self, record: TccRecord) -> bool:
        try:
            return await self.tcc(self._debit_shard(record)).renew_lease(record, LEASE_SECONDS, PARTICIPANT_CALL_TIMEOUT_SECONDS)
        except RETRYABLE:
            return True  # could not reach the shard: the next compare-and-set will tell

    def _debit_shard(self, record: TccRecord) -> str:
        return self.router.shard_name_for(record.debit_account_id)

    async def wait_until_final(self, transfer_id: str, debit_shard: str) -> TccRecord:
        """For a transfer another driver owns: poll its record until final."""
        delay_seconds = RETRY_DELAY_SECONDS_MIN
        while True:
            try:
                record = await self.tcc(debit_shard).get_record(transfer_id, PARTICIPANT_CALL_TIMEOUT_SECONDS)
                if record is not None and record.state in FINAL_STATES:
                    return record
            except RETRYABLE:
                pass
            await asyncio.sleep(delay_seconds)
            delay_seconds = min(delay_seconds * 2, POLL_INTERVAL_SECONDS_MAX)


def outcome(record: TccRecord) -> Transfer:
    """The final transfer, or the error its final state answers with."""
    transfer = record.as_transfer()
    refusal = transfer.refusal()
    if refusal is not None:
        raise refusal
    return transfer
