"""The descriptor-built strategies themselves (tests/hostile/proto_strategies.py): no cluster.

They must find every method the protos declare, build valid messages of every request type
(and of types with maps, oneofs, doubles and recursion), and reach the boundaries the fuzz
relies on."""

from __future__ import annotations

import base64
import dataclasses
import functools
import json

import grpc
import pytest
from google.protobuf import message, message_factory, struct_pb2
from google.rpc import status_pb2
from hypothesis import HealthCheck, Phase, given, settings

from corebank.v1 import accounts_pb2, accounts_pb2_grpc, clearing_pb2_grpc, payments_pb2, payments_pb2_grpc
from tests.hostile import proto_strategies as ps

POOLS = ps.Pools(
    account_ids=("acc_aaaaaaaaaaaaaaaaaaaaaaaaaa", "hot_bbbbbbbbbbbbbbbbbbbbbbbbbb"), internal_account_ids=("clr_USD_0_1",),
    transfer_ids=("t-1", "t-2"), request_ids=("open-1",), owner_ids=("alice",), page_tokens=("eyJhIjoxfQ",),
    fresh_prefix="unit", repeated_boundary_sizes=(5_000, 5_001),
)
REQUEST_TYPES = sorted({m.input.full_name: m.input for m in ps.methods()}.items())
# Types that the corebank requests lack but a new RPC could bring: maps, oneofs, doubles,
# recursion (Struct), and a repeated Any (google.rpc.Status).
OTHER_TYPES = [struct_pb2.Struct.DESCRIPTOR, struct_pb2.Value.DESCRIPTOR, status_pb2.Status.DESCRIPTOR]
EXAMPLES = 40


def test_methods_are_every_method_of_every_service() -> None:
    with grpc.insecure_channel("localhost:1") as channel:
        stubs = [accounts_pb2_grpc.AccountsStub(channel), payments_pb2_grpc.PaymentsStub(channel), clearing_pb2_grpc.ClearingStub(channel)]
        declared = {name for stub in stubs for name in vars(stub)}
    found = ps.methods()
    assert {m.name for m in found} == declared
    assert len(found) == len(declared)
    assert ps.Method("corebank.v1.Payments", "Transfer", None, None).path == "/corebank.v1.Payments/Transfer"
    assert all(m.request_class.DESCRIPTOR is m.input and m.response_class.DESCRIPTOR is m.output for m in found)


@pytest.mark.parametrize("descriptor", [d for _, d in REQUEST_TYPES] + OTHER_TYPES, ids=lambda d: d.full_name)
def test_messages_are_valid_messages_of_the_type(descriptor) -> None:
    @settings(max_examples=EXAMPLES, database=None, suppress_health_check=list(HealthCheck), deadline=None)
    @given(ps.messages(descriptor, POOLS))
    def check(built: message.Message) -> None:
        assert built.DESCRIPTOR is descriptor
        encoded = built.SerializeToString()
        decoded = type(built).FromString(encoded)
        assert decoded == built
        for oneof in descriptor.oneofs:
            assert sum(built.HasField(f.name) for f in oneof.fields) <= 1

    check()


@pytest.mark.parametrize("descriptor", [d for _, d in REQUEST_TYPES], ids=lambda d: d.full_name)
def test_raw_requests_mix_valid_and_undecodable_bytes(descriptor) -> None:
    message_class = message_factory.GetMessageClass(descriptor)

    def decodes(raw: bytes) -> bool:
        try:
            message_class.FromString(raw)
        except message.DecodeError:
            return False
        return True

    # Without the boundary batch sizes: 5,001 copies cut and flipped cost seconds and prove nothing more here.
    bodies = sample(ps.raw_requests(descriptor, dataclasses.replace(POOLS, repeated_boundary_sizes=())), 150)
    assert all(isinstance(raw, bytes) for raw in bodies)
    reaches(bodies, undecodable=lambda raw: not decodes(raw), decodable=lambda raw: len(raw) > 3 and decodes(raw))


def sample(strategy, examples: int) -> list:
    """Examples of a strategy, drawn once and deterministically (no shrinking: `find` would take minutes)."""
    drawn = []

    @settings(max_examples=examples, database=None, derandomize=True, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck), deadline=None)
    @given(strategy)
    def draw(example) -> None:
        drawn.append(example)

    draw()
    return drawn


def reaches(examples: list, **conditions) -> None:
    missed = [name for name, condition in conditions.items() if not any(condition(e) for e in examples)]
    assert not missed, f"no example of {len(examples)} reached {missed}"


@functools.cache
def transfer_requests() -> list:
    return sample(ps.messages(payments_pb2.TransferRequest.DESCRIPTOR, POOLS), 500)


def test_strings_reach_the_boundaries() -> None:
    transfers = transfer_requests()
    reaches(
        transfers,
        empty_id=lambda t: t.transfer_id == "",
        id_one_past_the_limit=lambda t: len(t.transfer_id) == 65,
        reference_one_past_the_limit=lambda t: len(t.reference) == 257,
        reserved_id=lambda t: t.transfer_id.startswith("sys:"),
        known_transfer=lambda t: t.transfer_id in POOLS.transfer_ids,
        fresh_transfer=lambda t: t.transfer_id.startswith("unit-"),
        known_accounts=lambda t: t.debit_account_id in POOLS.account_ids and t.credit_account_id in POOLS.account_ids,
        internal_account=lambda t: t.credit_account_id in POOLS.internal_account_ids,
        sub_account=lambda t: t.debit_account_id.startswith("sub_"),
        control_character=lambda t: any(ord(c) < 32 for c in t.reference),
        non_ascii_id=lambda t: any(ord(c) > 127 for c in t.debit_account_id),
        known_currency=lambda t: t.currency == "USD",
        unknown_currency=lambda t: t.currency not in ps.CURRENCIES,
        plausible=lambda t: (t.transfer_id.startswith("unit-") and t.debit_account_id in POOLS.account_ids
                             and t.credit_account_id in POOLS.account_ids and 1 <= t.amount_minor <= 10_000 and t.currency == "USD"),
    )
    reaches(sample(ps.messages(accounts_pb2.OpenAccountRequest.DESCRIPTOR, POOLS), 300), own_owner=lambda o: o.owner_id == "alice")
    reaches(
        sample(ps.page_tokens(POOLS), 300),
        issued=lambda token: token in POOLS.page_tokens,
        nested_past_recursion_limit=lambda token: len(token) > 100_000,
    )


def test_numbers_reach_the_boundaries() -> None:
    # The amount field's own strategy: whole messages mix it with many other fields' draws, and
    # which boundaries 500 of them reach moved with the test session (flaky in the full suite).
    amount_field = payments_pb2.TransferRequest.DESCRIPTOR.fields_by_name["amount_minor"]
    reaches(
        sample(ps.integers_for(amount_field), 500),
        **{f"amount_{v}": (lambda a, v=v: a == v) for v in (0, 1, -1, ps.INT64_MAX, ps.INT64_MIN)},
        amount_that_can_post=lambda a: 1 < a <= 100_000,
    )
    reaches(transfer_requests(), amount_that_can_post=lambda t: 1 < t.amount_minor <= 100_000)
    # The same for page sizes: the field's own strategy reaches every boundary, whole messages the common ones.
    page_size_field = accounts_pb2.ListAccountTransfersRequest.DESCRIPTOR.fields_by_name["page_size"]
    reaches(
        sample(ps.integers_for(page_size_field), 500),
        **{f"page_size_{v}": (lambda p, v=v: p == v) for v in (0, 500, 501, -1, ps.INT32_MAX, ps.INT32_MIN)},
    )
    reaches(
        sample(ps.messages(accounts_pb2.ListAccountTransfersRequest.DESCRIPTOR, POOLS), 500),
        **{f"page_size_{v}": (lambda m, v=v: m.page_size == v) for v in (0, 500, 501, -1)},
    )
    reaches(
        sample(ps.messages(accounts_pb2.OpenAccountRequest.DESCRIPTOR, POOLS), 300),
        system=lambda o: o.kind == accounts_pb2.SYSTEM,
        undeclared_kind=lambda o: o.kind not in accounts_pb2.AccountKind.values(),
        collecting=lambda o: o.collect_on_every_shard,
    )


def test_repeated_fields_reach_a_few_items_and_the_boundary_sizes() -> None:
    reaches(
        sample(ps.messages(payments_pb2.CreateTransfersRequest.DESCRIPTOR, POOLS), 300),
        empty=lambda b: len(b.transfers) == 0,
        a_few=lambda b: 2 <= len(b.transfers) <= ps.REPEATED_ITEMS_MAX,
        one_past_the_batch_limit=lambda b: len(b.transfers) == 5_001,
        linked=lambda b: any(t.linked for t in b.transfers),
    )


def test_maps_oneofs_and_nesting_are_built() -> None:
    reaches(sample(ps.messages(struct_pb2.Struct.DESCRIPTOR), 100), nested=lambda s: any(v.HasField("struct_value") for v in s.fields.values()))
    reaches(
        sample(ps.messages(struct_pb2.Value.DESCRIPTOR), 100),
        number=lambda v: v.WhichOneof("kind") == "number_value", unset=lambda v: v.WhichOneof("kind") is None,
    )
    reaches(sample(ps.messages(status_pb2.Status.DESCRIPTOR), 100), details=lambda s: len(s.details) > 0)


def test_page_tokens_are_forged_for_the_listing_they_are_sent_with() -> None:
    def forged_for_itself(listing) -> bool:
        try:
            payload = json.loads(base64.urlsafe_b64decode(listing.page_token + "=" * (-len(listing.page_token) % 4)))
        except (ValueError, RecursionError):
            return False
        return isinstance(payload, dict) and payload.get("account_id") == listing.account_id != ""

    reaches(
        sample(ps.messages(accounts_pb2.ListAccountTransfersRequest.DESCRIPTOR, POOLS), 500),
        own_account=forged_for_itself,
        own_account_before_true=lambda m: forged_for_itself(m) and json.loads(
            base64.urlsafe_b64decode(m.page_token + "=" * (-len(m.page_token) % 4)))["before_seq"] is True,
        nested_past_recursion_limit=lambda m: len(m.page_token) > 100_000,
    )
