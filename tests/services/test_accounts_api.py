"""corebank.v1.Accounts against the real cluster."""

import grpc
import pytest

from corebank.v1 import accounts_pb2 as pb
from corebank.v1 import transfers_pb2
from tests.fixtures.ledger import failure


def test_open_account_returns_a_fresh_active_account(ledger):
    account = ledger.open(kind=pb.MERCHANT, tier=1, currency="JPY", owner_id="shop-1")
    assert account.account_id.startswith("acc_")
    assert (account.owner_id, account.currency, account.currency_exponent) == ("shop-1", "JPY", 0)
    assert (account.kind, account.tier, account.status) == (pb.MERCHANT, 1, pb.ACTIVE)
    assert account.balance_minor == account.available_minor == 0
    assert ledger.get(account.account_id) == account


def test_open_account_is_idempotent_by_request_id(ledger):
    request = pb.OpenAccountRequest(request_id=ledger.unique_id("req"), owner_id="o", currency="USD", kind=pb.CUSTOMER, tier=0)
    first = ledger.accounts.OpenAccount(request)
    again = ledger.accounts.OpenAccount(request)
    assert again == first


def test_open_account_with_a_reused_request_id_and_other_fields_names_the_conflict(ledger):
    request = pb.OpenAccountRequest(request_id=ledger.unique_id("req"), owner_id="o", currency="USD", kind=pb.CUSTOMER, tier=0)
    ledger.accounts.OpenAccount(request)
    request.owner_id, request.tier = "someone-else", 1
    with pytest.raises(grpc.RpcError) as raised:
        ledger.accounts.OpenAccount(request)
    code, reason, metadata = failure(raised.value)
    assert (code, reason) == (grpc.StatusCode.ALREADY_EXISTS, "IDEMPOTENCY_CONFLICT")
    assert metadata["conflicting_fields"] == "owner_id,tier"


def test_unknown_account_is_not_found(ledger):
    with pytest.raises(grpc.RpcError) as raised:
        ledger.get("acc_doesnotexist")
    assert failure(raised.value)[:2] == (grpc.StatusCode.NOT_FOUND, "ACCOUNT_NOT_FOUND")


def test_status_changes_block_the_right_direction(ledger, shard_map):
    shard = shard_map.shards[0].name
    payer = ledger.funded(10_000, shard)
    payee = ledger.open(shard=shard)

    blocked = ledger.accounts.UpdateAccountStatus(pb.UpdateAccountStatusRequest(account_id=payer.account_id, status=pb.BLOCK_DEBIT))
    assert blocked.status == pb.BLOCK_DEBIT
    with pytest.raises(grpc.RpcError) as raised:
        ledger.transfer(payer.account_id, payee.account_id, 100)
    assert failure(raised.value)[1] == "ACCOUNT_DEBIT_BLOCKED"
    # Credits still arrive at an account blocked for debits.
    assert ledger.transfer(ledger.bank(shard).account_id, payer.account_id, 1).status == transfers_pb2.POSTED
    ledger.accounts.UpdateAccountStatus(pb.UpdateAccountStatusRequest(account_id=payer.account_id, status=pb.FROZEN))
    with pytest.raises(grpc.RpcError) as raised:
        ledger.transfer(ledger.bank(shard).account_id, payer.account_id, 100)
    assert failure(raised.value)[1] == "ACCOUNT_FROZEN"

    ledger.accounts.UpdateAccountStatus(pb.UpdateAccountStatusRequest(account_id=payer.account_id, status=pb.ACTIVE))
    assert ledger.transfer(payer.account_id, payee.account_id, 100).status == transfers_pb2.POSTED
    assert ledger.get(payer.account_id).balance_minor == 10_000 + 1 - 100


def test_status_cannot_be_set_to_closed_or_unspecified(ledger):
    account = ledger.open()
    for status, reason in ((pb.CLOSED, "INVALID_STATUS"), (pb.ACCOUNT_STATUS_UNSPECIFIED, "MISSING_FIELD")):
        with pytest.raises(grpc.RpcError) as raised:
            ledger.accounts.UpdateAccountStatus(pb.UpdateAccountStatusRequest(account_id=account.account_id, status=status))
        assert failure(raised.value)[:2] == (grpc.StatusCode.INVALID_ARGUMENT, reason)
    assert ledger.get(account.account_id).status == pb.ACTIVE


def test_close_only_at_zero_balance_and_then_nothing_moves(ledger, shard_map):
    shard = shard_map.shards[1].name
    account = ledger.funded(500, shard)
    with pytest.raises(grpc.RpcError) as raised:
        ledger.accounts.CloseAccount(pb.CloseAccountRequest(account_id=account.account_id))
    assert failure(raised.value)[:2] == (grpc.StatusCode.FAILED_PRECONDITION, "ACCOUNT_BALANCE_NOT_ZERO")

    ledger.transfer(account.account_id, ledger.bank(shard).account_id, 500)
    closed = ledger.accounts.CloseAccount(pb.CloseAccountRequest(account_id=account.account_id))
    assert closed.status == pb.CLOSED
    assert ledger.accounts.CloseAccount(pb.CloseAccountRequest(account_id=account.account_id)) == closed
    with pytest.raises(grpc.RpcError) as raised:
        ledger.transfer(ledger.bank(shard).account_id, account.account_id, 1)
    assert failure(raised.value)[1] == "ACCOUNT_CLOSED"
    with pytest.raises(grpc.RpcError) as raised:
        ledger.accounts.UpdateAccountStatus(pb.UpdateAccountStatusRequest(account_id=account.account_id, status=pb.ACTIVE))
    assert failure(raised.value)[1] == "ACCOUNT_CLOSED"


def test_list_account_transfers_newest_first_in_bounded_pages(ledger, shard_map):
    shard = shard_map.shards[2].name
    account = ledger.funded(10_000, shard)
    other = ledger.open(shard=shard)
    sent = [ledger.transfer(account.account_id, other.account_id, amount).transfer_id for amount in range(1, 8)]
    received = ledger.transfer(other.account_id, account.account_id, 3).transfer_id
    expected = [received, *reversed(sent)]  # newest first; the funding transfer comes last

    listed, token = [], ""
    while True:
        page = ledger.accounts.ListAccountTransfers(
            pb.ListAccountTransfersRequest(account_id=account.account_id, page_size=3, page_token=token)
        )
        assert len(page.transfers) <= 3
        listed += [t.transfer_id for t in page.transfers]
        token = page.next_page_token
        if not token:
            break
    assert listed[: len(expected)] == expected
    assert len(listed) == len(expected) + 1  # and the funding transfer


@pytest.mark.parametrize(
    "fields, reason",
    [
        ({"page_size": 501}, "INVALID_PAGE_SIZE"),
        ({"page_size": -1}, "INVALID_PAGE_SIZE"),
        ({"page_token": "not-a-token"}, "INVALID_PAGE_TOKEN"),
        ({"account_id": ""}, "MISSING_FIELD"),
    ],
)
def test_list_account_transfers_rejects_bad_paging(ledger, fields, reason):
    account = ledger.open()
    request = pb.ListAccountTransfersRequest(**{"account_id": account.account_id, **fields})
    with pytest.raises(grpc.RpcError) as raised:
        ledger.accounts.ListAccountTransfers(request)
    assert failure(raised.value)[:2] == (grpc.StatusCode.INVALID_ARGUMENT, reason)


def test_a_page_token_is_not_valid_for_another_account(ledger, shard_map):
    shard = shard_map.shards[0].name
    account = ledger.funded(100, shard)
    ledger.transfer(ledger.bank(shard).account_id, account.account_id, 100)
    page = ledger.accounts.ListAccountTransfers(pb.ListAccountTransfersRequest(account_id=account.account_id, page_size=1))
    assert page.next_page_token
    with pytest.raises(grpc.RpcError) as raised:
        ledger.accounts.ListAccountTransfers(
            pb.ListAccountTransfersRequest(account_id=ledger.open().account_id, page_token=page.next_page_token)
        )
    assert failure(raised.value)[1] == "INVALID_PAGE_TOKEN"
