"""Domain types <-> corebank.v1 messages."""

import datetime

from google.protobuf import timestamp_pb2

from corebank.v1 import accounts_pb2, transfers_pb2
from services.ledger import money
from services.ledger.accounts import Account
from services.ledger.transfers import Transfer


def timestamp(moment: datetime.datetime | None) -> timestamp_pb2.Timestamp | None:
    if moment is None:
        return None
    message = timestamp_pb2.Timestamp()
    message.FromDatetime(moment)
    return message


def account_message(account: Account, collecting_minor: int = 0) -> accounts_pb2.Account:
    return accounts_pb2.Account(
        account_id=account.account_id,
        owner_id=account.owner_id,
        currency=account.currency,
        currency_exponent=money.currency_exponent(account.currency),
        kind=account.kind,
        tier=account.tier,
        status=account.status,
        balance_minor=account.balance_minor,
        available_minor=account.available_minor,
        debits_posted_minor=account.debits_posted_minor,
        credits_posted_minor=account.credits_posted_minor,
        debits_pending_minor=account.debits_pending_minor,
        credits_pending_minor=account.credits_pending_minor,
        created_at=timestamp(account.created_at),
        updated_at=timestamp(account.updated_at),
        collect_on_every_shard=account.collect_on_every_shard,
        collecting_minor=collecting_minor,
    )


def transfer_message(transfer: Transfer) -> transfers_pb2.Transfer:
    return transfers_pb2.Transfer(
        transfer_id=transfer.transfer_id,
        debit_account_id=transfer.debit_account_id,
        credit_account_id=transfer.credit_account_id,
        amount_minor=transfer.amount_minor,
        currency=transfer.currency,
        reference=transfer.reference,
        status=transfer.status,
        reason=transfer.reason,
        created_at=timestamp(transfer.created_at),
        finalized_at=timestamp(transfer.finalized_at),
    )
