"""Clearing's domain types <-> corebank.v1 Clearing messages."""

from __future__ import annotations

from corebank.v1 import clearing_pb2
from services.api.convert import timestamp_fields
from services.clearing_service import Position, WindowView
from services.ledger import clearing
from services.storage.clearing_store import Participant, Settlement, Window


def participant_message(participant: Participant) -> clearing_pb2.Participant:
    return clearing_pb2.Participant(
        participant_id=participant.participant_id,
        name=participant.name,
        currencies=[
            clearing_pb2.ParticipantCurrency(
                currency=c.currency,
                settlement_account_id=c.settlement_account_id,
                net_debit_cap_set=c.net_debit_cap_minor is not None,
                net_debit_cap_minor=c.net_debit_cap_minor or 0,
                threshold_percent=c.threshold_percent,
            )
            for c in participant.currencies
        ],
        created_at=timestamp_fields(participant.created_at),
        hosting=participant.hosting,
    )


def position_message(position: Position) -> clearing_pb2.Position:
    return clearing_pb2.Position(
        participant_id=position.participant_id,
        currency=position.currency,
        position_minor=position.position_minor,
        reserved_minor=position.reserved_minor,
        window_position_minor=position.window_position_minor,
        window_id=position.window_id,
        net_debit_cap_set=position.net_debit_cap_minor is not None,
        net_debit_cap_minor=position.net_debit_cap_minor or 0,
        threshold_percent=position.threshold_percent,
        threshold_reached=position.threshold_reached,
        headroom_minor=position.headroom_minor,
    )


def window_message(window: Window, view: WindowView | None = None) -> clearing_pb2.SettlementWindow:
    message = clearing_pb2.SettlementWindow(
        window_id=window.window_id,
        state=int(window.state),
        opened_at=timestamp_fields(window.opened_at),
        closed_at=timestamp_fields(window.closed_at),
        reason=window.reason,
        settlement_id=window.settlement_id or 0,
    )
    if view is not None:
        message.transfer_count = view.transfer_count
        message.amounts.extend(
            clearing_pb2.ParticipantAmount(
                participant_id=total.participant_id, currency=total.currency,
                debits_minor=total.debits_minor, credits_minor=total.credits_minor, net_minor=total.net_minor,
            )
            for total in view.totals
        )
    return message


def settlement_message(settlement: Settlement) -> clearing_pb2.Settlement:
    return clearing_pb2.Settlement(
        settlement_id=settlement.settlement_id,
        model=int(settlement.model),
        state=int(settlement.state),
        window_ids=list(settlement.window_ids),
        entries=[
            clearing_pb2.SettlementEntry(
                participant_id=entry.participant_id,
                currency=entry.currency,
                debits_minor=entry.debits_minor,
                credits_minor=entry.credits_minor,
                net_minor=entry.total.net_minor,
                settled=entry.settled_at is not None,
                settled_at=timestamp_fields(entry.settled_at),
                transfer_ids=[leg.transfer_id for leg in clearing.settlement_legs(settlement.settlement_id, settlement.model, entry.total)],
            )
            for entry in settlement.entries
        ],
        created_at=timestamp_fields(settlement.created_at),
        settled_at=timestamp_fields(settlement.settled_at),
    )


def reconcile_message(report) -> clearing_pb2.ReconcileResponse:
    """services/storage/reconciliation.py's ReconcileReport, field by field (names as the proto's)."""
    return clearing_pb2.ReconcileResponse(
        consistent=report.consistent,
        findings=[
            clearing_pb2.ReconciliationFinding(
                check=finding.check, shard=finding.shard, window_id=finding.window_id, participant_id=finding.participant_id,
                currency=finding.currency, expected_minor=finding.expected_minor, found_minor=finding.found_minor, detail=finding.detail,
            )
            for finding in report.findings
        ],
        windows_checked=report.windows_checked,
        transfers_checked=report.transfers_checked,
        participants_checked=report.participants_checked,
        settlements_checked=report.settlements_checked,
    )
