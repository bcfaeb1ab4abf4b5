"""The batch planner's rules for ids that already exist (issue 7, finding 6), without a database."""

from services.ledger import errors
from services.ledger.accounts import Account, AccountKind, AccountStatus
from services.ledger.limits import TierLimits
from services.ledger.transfers import Transfer, TransferRequest, TransferStatus
from services.storage.batch_posting import _Plan

LIMITS = TierLimits.load()


def account(account_id, **counters):
    return Account(account_id, account_id, "owner", "USD", AccountKind.CUSTOMER, 2, AccountStatus.ACTIVE, **counters)


def request(transfer_id, amount_minor=10):
    return TransferRequest(transfer_id, "acc_a", "acc_b", amount_minor, "USD")


def stored(transfer_id, status=TransferStatus.REJECTED):
    return Transfer(transfer_id, "acc_a", "acc_b", 10, "USD", "", status, "INSUFFICIENT_FUNDS" if status == TransferStatus.REJECTED else "")


def plan(*earlier: Transfer) -> _Plan:
    return _Plan({"acc_a": account("acc_a", credits_posted_minor=1_000), "acc_b": account("acc_b")}, {t.transfer_id: t for t in earlier})


def test_a_chain_mixing_an_existing_id_with_new_ones_is_refused_whole_and_records_nothing():
    batch = plan(stored("old"))
    outcomes = batch.add_chain([request("new-1"), request("old"), request("new-2")], LIMITS)
    assert [type(o.fresh_refusal) for o in outcomes] == [errors.LinkedTransferFailed, errors.TransferExists, errors.LinkedTransferFailed]
    assert all(o.transfer is None for o in outcomes)
    assert outcomes[0].fresh_refusal.metadata["failed_transfer_id"] == "old"
    assert batch.new_rows == [] and batch.balance_changes() == []


def test_a_chain_whose_members_all_exist_is_a_retry_answered_from_their_records():
    batch = plan(stored("a", TransferStatus.POSTED), stored("b", TransferStatus.POSTED))
    outcomes = batch.add_chain([request("a"), request("b")], LIMITS)
    assert [o.transfer.transfer_id for o in outcomes] == ["a", "b"] and all(o.fresh_refusal is None for o in outcomes)
    assert batch.new_rows == []


def test_a_refused_member_fails_its_chain_and_the_others_name_it():
    batch = plan()
    outcomes = batch.add_chain([request("x", 10), request("y", 5_000)], LIMITS)
    assert [type(o.fresh_refusal) for o in outcomes] == [errors.LinkedTransferFailed, errors.InsufficientFunds]
    assert [row[6] for row in batch.new_rows] == [TransferStatus.REJECTED, TransferStatus.REJECTED]
    assert batch.balance_changes() == []


def test_the_same_id_from_two_callers_in_one_batch_is_applied_once():
    batch = plan()
    first = batch.add_chain([request("same")], LIMITS)
    second = batch.add_chain([request("same")], LIMITS)
    assert first[0].fresh_refusal is None and second[0].transfer is first[0].transfer
    assert len(batch.new_rows) == 1 and batch.balance_changes() == [("acc_a", 10, 0), ("acc_b", 0, 10)]


def test_an_id_registered_here_with_other_fields_refuses_its_chain_whole_and_records_nothing():
    """Ids whose registry lives on this shard are registered in the batch itself."""
    first_use = request("taken", amount_minor=99).registry_fields()
    batch = _Plan({"acc_a": account("acc_a", credits_posted_minor=1_000), "acc_b": account("acc_b")}, {}, {"taken": first_use})
    outcomes = batch.add_chain([request("fresh"), request("taken")], LIMITS)
    assert [type(o.fresh_refusal) for o in outcomes] == [errors.LinkedTransferFailed, errors.IdempotencyConflict]
    assert outcomes[1].fresh_refusal.metadata["conflicting_fields"] == "amount_minor"
    assert batch.new_rows == [] and batch.balance_changes() == []
    # The same id with its first use's fields is no conflict: it posts.
    same = batch.add_chain([request("taken", amount_minor=99)], LIMITS)
    assert same[0].fresh_refusal is None and len(batch.new_rows) == 1
