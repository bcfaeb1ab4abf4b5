"""Messages built from domain types: timestamps exactly as protobuf's own FromDatetime sets them."""

import datetime

import pytest
from google.protobuf import timestamp_pb2

from services.api.convert import account_message, timestamp, timestamp_fields, transfer_message
from services.ledger.accounts import Account, AccountKind, AccountStatus
from services.ledger.transfers import Transfer, TransferStatus

UTC = datetime.timezone.utc
MOMENTS = [
    datetime.datetime(2026, 11, 23, 5, 1, 2, 345678, tzinfo=UTC),
    datetime.datetime(2026, 11, 23, 5, 1, 2, 345678, tzinfo=datetime.timezone(datetime.timedelta(hours=5, minutes=30))),
    datetime.datetime(2026, 3, 29, 1, 59, 59, 999999, tzinfo=datetime.timezone(datetime.timedelta(hours=-8))),
    datetime.datetime(1970, 1, 1, tzinfo=UTC),
    datetime.datetime(1969, 12, 31, 23, 59, 59, 1, tzinfo=UTC),
    datetime.datetime(1960, 5, 5, 1, 2, 3, 999999, tzinfo=datetime.timezone(datetime.timedelta(hours=2))),
    datetime.datetime(1, 1, 1, tzinfo=UTC),
    datetime.datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
    datetime.datetime(2026, 11, 23, 5, 1, 2, 7),  # naive: UTC, as FromDatetime takes it
    datetime.datetime(1955, 1, 1, 0, 0, 0, 1),
]


def _from_datetime(moment: datetime.datetime) -> timestamp_pb2.Timestamp:
    message = timestamp_pb2.Timestamp()
    message.FromDatetime(moment)
    return message


@pytest.mark.parametrize("moment", MOMENTS, ids=str)
def test_timestamps_match_from_datetime(moment):
    assert timestamp(moment) == _from_datetime(moment)
    assert timestamp_pb2.Timestamp(**timestamp_fields(moment)) == _from_datetime(moment)


def test_no_moment_is_no_timestamp():
    assert timestamp(None) is None
    assert timestamp_fields(None) is None


def test_messages_carry_the_timestamps():
    created, finalized = MOMENTS[0], MOMENTS[1]
    transfer = Transfer("t-1", "acc_a", "acc_b", 500, "USD", "ref", TransferStatus.POSTED, "", 7, created, finalized)
    message = transfer_message(transfer)
    assert message.created_at == _from_datetime(created) and message.finalized_at == _from_datetime(finalized)
    assert not transfer_message(Transfer("t-2", "acc_a", "acc_b", 5, "USD", "", TransferStatus.PENDING)).HasField("finalized_at")
    account = Account("acc_a", "req", "owner", "USD", AccountKind.CUSTOMER, 1, AccountStatus.ACTIVE, 10, 30, 0, 0, created, finalized, False, None)
    message = account_message(account, 12)
    assert message.created_at == _from_datetime(created) and message.updated_at == _from_datetime(finalized)
    assert message.balance_minor == 20 and message.collecting_minor == 12
