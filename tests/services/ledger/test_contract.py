"""The domain's names and numbers are the proto contract's: hold them together."""

from corebank.v1 import accounts_pb2, errors_pb2, transfers_pb2
from services.ledger import errors
from services.ledger.accounts import AccountKind, AccountStatus
from services.ledger.transfers import TransferStatus


def members(proto_enum) -> dict[str, int]:
    return {name: number for name, number in proto_enum.items() if number != 0}


def deprecated(proto_enum) -> set[str]:
    return {value.name for value in proto_enum.DESCRIPTOR.values if value.GetOptions().deprecated}


def test_every_error_reason_is_declared_in_the_proto_and_every_live_one_is_used():
    reasons = set(members(errors_pb2.ErrorReason))
    assert deprecated(errors_pb2.ErrorReason) == {"CROSS_SHARD_NOT_SUPPORTED"}
    assert errors.registered_reasons() == reasons - deprecated(errors_pb2.ErrorReason)


def test_domain_enums_match_proto_enums():
    assert {m.name: m.value for m in AccountKind} == members(accounts_pb2.AccountKind)
    assert {m.name: m.value for m in AccountStatus} == members(accounts_pb2.AccountStatus)
    assert {m.name: m.value for m in TransferStatus} == members(transfers_pb2.TransferStatus)


def test_each_reason_maps_back_to_its_class():
    assert errors.error_class_for_reason("INSUFFICIENT_FUNDS") is errors.InsufficientFunds



def test_every_category_maps_to_a_grpc_code_in_the_api_layer_only():
    from services.api.interceptor import STATUS_CODE_BY_CATEGORY

    assert set(STATUS_CODE_BY_CATEGORY) == set(errors.Category)
    assert STATUS_CODE_BY_CATEGORY[errors.InsufficientFunds.category].name == "FAILED_PRECONDITION"
    assert STATUS_CODE_BY_CATEGORY[errors.AccountNotFound.category].name == "NOT_FOUND"
    assert STATUS_CODE_BY_CATEGORY[errors.IdempotencyConflict.category].name == "ALREADY_EXISTS"
    assert STATUS_CODE_BY_CATEGORY[errors.InternalFault.category].name == "INTERNAL"
    assert [cls.__name__ for cls in (errors.ShardUnavailable, errors.DeadlineExceeded) if cls.transient] == [
        "ShardUnavailable", "DeadlineExceeded"
    ]
