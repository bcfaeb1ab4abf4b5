"""Hypothesis strategies built from protobuf descriptors: any request of any corebank.v1 method.

`methods()` walks the service descriptors (Accounts, Payments, Clearing), so an RPC added to
the protos is fuzzed without a line changed here. `messages(descriptor, pools)` builds a
message field by field from its descriptor: every scalar type with its boundaries, enums
with numbers the proto does not declare, repeated fields with a few items or a boundary
batch size, nested messages, maps and oneofs. Strings are chosen by what the field's name
says it holds (an account id, a transfer id, a currency, a page token, free text), mixing
values that exist in the cluster (`Pools`, so some requests hit real accounts and
transfers) with their near misses, internal and reserved ids, length boundaries, unicode
and control characters. Half the messages are plausible instead: each field takes what a
well-behaved client would send (a real account, a fresh id, USD, a small amount), but for
at most one field that takes a value of the full mix, so requests get past validation to
authorisation, the posting rules and success, one step off the path at a time.

`raw_requests(descriptor, pools)` adds what no message class can encode: random bytes,
valid encodings cut or bit-flipped, and hand-made wire records (unknown fields, bad wire
types, overlong varints, lengths past the end, deep nesting, strings that are not UTF-8),
for a call with identity serializers.

Pure: no grpc, no cluster. tests/hostile/test_proto_strategies.py checks the builder itself.
"""

from __future__ import annotations

import base64
import dataclasses
import json
from collections.abc import Iterable
from types import ModuleType

from google.protobuf import descriptor, message, message_factory
from google.protobuf.descriptor import FieldDescriptor
from hypothesis import strategies as st

from corebank.v1 import accounts_pb2, clearing_pb2, payments_pb2

SERVICE_MODULES: tuple[ModuleType, ...] = (accounts_pb2, payments_pb2, clearing_pb2)

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
UINT32_MAX = 2**32 - 1
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
UINT64_MAX = 2**64 - 1
# Nested messages deeper than this are left unset (recursive types such as Struct end here).
MESSAGE_DEPTH_MAX = 3
# Items of an ordinary repeated field: a few, so an example stays cheap.
REPEATED_ITEMS_MAX = 4
# Lengths around the server's limits (ids 64 characters, references 256) and well past them.
STRING_LENGTH_BOUNDARIES = (1, 2, 63, 64, 65, 255, 256, 257, 1024, 4096)
ID_CHARACTERS = "ABCXYZabcxyz0189._:-"
# Nesting of a forged page token's JSON or of a hand-made wire record: past any parser's recursion limit.
NESTING_DEPTHS = (2, 64, 101, 1000, 100_000)

_SIGNED_32 = (FieldDescriptor.TYPE_INT32, FieldDescriptor.TYPE_SINT32, FieldDescriptor.TYPE_SFIXED32)
_UNSIGNED_32 = (FieldDescriptor.TYPE_UINT32, FieldDescriptor.TYPE_FIXED32)
_SIGNED_64 = (FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_SINT64, FieldDescriptor.TYPE_SFIXED64)
_UNSIGNED_64 = (FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_FIXED64)
_INTEGER_RANGES = {
    **{t: (INT32_MIN, INT32_MAX) for t in _SIGNED_32},
    **{t: (0, UINT32_MAX) for t in _UNSIGNED_32},
    **{t: (INT64_MIN, INT64_MAX) for t in _SIGNED_64},
    **{t: (0, UINT64_MAX) for t in _UNSIGNED_64},
}
_INTEGER_BOUNDARIES = (
    0, 1, -1, 2, -2, 7, 100, 20_000, 100_000, 2**31 - 1, 2**31, -(2**31), -(2**31) - 1, 2**32 - 1, 2**32,
    2**53, 2**53 + 1, 2**62, 2**63 - 2, 2**63 - 1, -(2**63), -(2**63) + 1, 2**63, 2**64 - 1, 10**18,
)

# Strings a careless or hostile client sends anywhere: injection shapes, look-alikes, encodings.
HOSTILE_STRINGS = (
    " ", "  ", "\t", "\n", "\x00", "a\x00b", "id\r\n", "\x1b[31mred", "\x7f", "\x1f", "\u0085",
    "' OR '1'='1", "'; DROP TABLE accounts; --", "\\", "\"", "%s", "%(x)s", "%", "{}", "{0!r}", "${jndi:ldap://x/a}",
    "../../etc/passwd", "NULL", "null", "None", "true", "0", "-1", "9" * 40, "1e309", "NaN",
    "\u202eevil", "acc\u200b", "\ufeffacc", "\u0430cc_", "ＡＣＣ", "😀" * 3, "é", "e\u0301", "ß", "İ",
    "acc_", "hot_", "sub_", "clr_", "sys:", "sys:sweep", "clr_USD_0_0", "sub_x_0", "corebank-clearing", "corebank-ledger",
    "*", "?", "acc_%", "acc__", "ACC_", "acc-", "Bearer x",
)
CURRENCIES = ("USD", "EUR", "GBP", "JPY", "KWD", "CHF")
ODD_CURRENCIES = ("", "usd", "US", "USDX", "XXX", "XTS", "US\x00", "€", "0", "USD ", "ＵＳＤ")


@dataclasses.dataclass(frozen=True)
class Method:
    """One RPC, as its service descriptor declares it."""

    service: str  # full name, "corebank.v1.Accounts"
    name: str
    input: descriptor.Descriptor
    output: descriptor.Descriptor
    client_streaming: bool = False
    server_streaming: bool = False

    @property
    def path(self) -> str:
        return f"/{self.service}/{self.name}"

    @property
    def request_class(self) -> type[message.Message]:
        return message_factory.GetMessageClass(self.input)

    @property
    def response_class(self) -> type[message.Message]:
        return message_factory.GetMessageClass(self.output)

    def __str__(self) -> str:
        return f"{self.service.rsplit('.', 1)[-1]}.{self.name}"


def methods(modules: Iterable[ModuleType] = SERVICE_MODULES) -> list[Method]:
    """Every method of every service the modules' files declare, in declaration order."""
    found = []
    for module in modules:
        for service in module.DESCRIPTOR.services_by_name.values():
            found += [
                Method(service.full_name, m.name, m.input_type, m.output_type, m.client_streaming, m.server_streaming)
                for m in service.methods
            ]
    return found


@dataclasses.dataclass(frozen=True)
class Pools:
    """Values that exist in the cluster under test, so that some requests hit real state.

    Fresh ids are `{fresh_prefix}-{n}` with small n: drawn twice, they replay an id
    (idempotency) within one run, never across runs."""

    account_ids: tuple[str, ...] = ()
    internal_account_ids: tuple[str, ...] = ()  # clearing and collection sub-accounts that exist
    transfer_ids: tuple[str, ...] = ()
    request_ids: tuple[str, ...] = ()  # OpenAccount request ids already used
    owner_ids: tuple[str, ...] = ()
    page_tokens: tuple[str, ...] = ()  # tokens the service issued
    fresh_prefix: str = "fz"
    fresh_ids_max: int = 50
    repeated_boundary_sizes: tuple[int, ...] = ()  # e.g. the batch limit and one past it
    # Clearing: participants registered for the test (never the hosting bank's own: a cap set on
    # it would reach every other test), settlement windows and settlements that exist.
    participant_ids: tuple[str, ...] = ()
    window_ids: tuple[int, ...] = ()
    settlement_ids: tuple[int, ...] = ()


# ---------------------------------------------------------------------------------------
# Strings.

def _from(values: Iterable[str]) -> st.SearchStrategy[str]:
    values = tuple(values)
    return st.sampled_from(values) if values else st.nothing()


def generic_strings() -> st.SearchStrategy[str]:
    """Any string field's mix: empty, id-shaped, length boundaries, unicode, control and hostile characters."""
    return st.one_of(
        st.just(""),
        st.from_regex(r"[A-Za-z0-9._:\-]{1,64}", fullmatch=True),
        st.builds(lambda n, c: c * n, st.sampled_from(STRING_LENGTH_BOUNDARIES), st.sampled_from(ID_CHARACTERS + "é😀 \x00")),
        st.text(st.characters(exclude_categories=("Cs",)), max_size=80),
        st.text(st.characters(codec="ascii"), max_size=80),
        _from(HOSTILE_STRINGS),
    )


def _near_misses(value: str) -> list[str]:
    """Strings one edit away from a real id: they must name nothing, or the same thing."""
    return [value.upper(), value + " ", " " + value, value + "x", value[:-1], value.split("_", 1)[-1], value + "\x00",
            value.replace("_", "-"), value + "%", value * 2]


def ids_at_the_length_limit() -> st.SearchStrategy[str]:
    """Well-formed ids one short of, at and one past the 64-character limit."""
    return st.builds(lambda n, c: c * n, st.sampled_from((63, 64, 65)), st.sampled_from(ID_CHARACTERS))


def _fresh(pools: Pools, prefix: str = "") -> st.SearchStrategy[str]:
    return st.integers(0, pools.fresh_ids_max).map(lambda n: f"{prefix}{pools.fresh_prefix}-{n}")


def account_ids(pools: Pools) -> st.SearchStrategy[str]:
    known = _from(pools.account_ids)
    return st.one_of(
        known, known, known, known,
        _from(pools.internal_account_ids),
        known.flatmap(lambda value: st.sampled_from(_near_misses(value))),
        st.from_regex(r"(acc|hot)_[a-z2-7]{26}", fullmatch=True),  # well formed, owned by nobody
        st.from_regex(r"clr_[A-Z]{3}_[0-9]{1,2}_[0-9]{1,2}", fullmatch=True),
        _from(pools.account_ids).map(lambda a: f"sub_{a.split('_', 1)[-1]}_0"),
        ids_at_the_length_limit(),
        generic_strings(),
    )


def transfer_ids(pools: Pools) -> st.SearchStrategy[str]:
    known = _from(pools.transfer_ids)
    return st.one_of(
        known, known, _fresh(pools), _fresh(pools),
        _fresh(pools, "sys:"), known.map(lambda t: "sys:" + t),
        known.flatmap(lambda value: st.sampled_from(_near_misses(value))),
        ids_at_the_length_limit(),
        generic_strings(),
    )


def request_ids(pools: Pools) -> st.SearchStrategy[str]:
    return st.one_of(_from(pools.request_ids), _fresh(pools, "open-"), _fresh(pools, "open-"), ids_at_the_length_limit(), generic_strings())


def owner_ids(pools: Pools) -> st.SearchStrategy[str]:
    known = _from(pools.owner_ids)
    return st.one_of(known, known, known, known.flatmap(lambda value: st.sampled_from(_near_misses(value))), generic_strings())


def participant_ids(pools: Pools) -> st.SearchStrategy[str]:
    """Participants that exist, their near misses, the 32-character limit's edges, and junk."""
    known = _from(pools.participant_ids)
    return st.one_of(
        known, known, known, known.flatmap(lambda value: st.sampled_from(_near_misses(value))),
        _fresh(pools, "p-"),
        st.builds(lambda n, c: c * n, st.sampled_from((31, 32, 33, 64)), st.sampled_from("Ab9._-")),
        st.sampled_from(["corebank-clearing", "CoreBank", "corebank ", "stl_p_x", "a:b", "a b", "é"]),
        generic_strings(),
    )


# Clearing's numeric ids (windows, settlements): ones that exist, their neighbours, and the edges.
CLEARING_ID_FIELDS = ("window_id", "settlement_id", "window_ids")


def clearing_ids_for(field: FieldDescriptor, pools: Pools) -> st.SearchStrategy[int]:
    known = pools.settlement_ids if field.name == "settlement_id" else pools.window_ids
    low, high = _INTEGER_RANGES[field.type]
    near = sorted({value + delta for value in known for delta in (-1, 0, 1) if low <= value + delta <= high})
    return st.one_of(_from(known) if known else st.nothing(), st.sampled_from(near) if near else st.nothing(),
                     st.sampled_from([v for v in (0, 1, 2, 2**31, 2**53, 2**63 - 1, 2**63, 2**64 - 1) if low <= v <= high]))


def currencies() -> st.SearchStrategy[str]:
    return st.one_of(st.sampled_from(CURRENCIES), st.sampled_from(CURRENCIES), st.sampled_from(ODD_CURRENCIES), generic_strings())


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _before_seqs() -> st.SearchStrategy:
    """A forged page token's position: every JSON type, and integers around every edge."""
    return st.one_of(
        st.sampled_from(_INTEGER_BOUNDARIES), st.integers(), st.none(), st.booleans(), st.floats(),
        st.sampled_from(["1", "", [], {}, [1], True, False]),
    )


def nested_json_tokens() -> st.SearchStrategy[str]:
    """base64url of JSON nested past the parser's recursion limit (and some not)."""
    return st.builds(
        lambda depth, brackets: _b64((brackets[0] * depth + "0" + brackets[1] * depth).encode()),
        st.sampled_from(NESTING_DEPTHS), st.sampled_from([("[", "]"), ('{"a":', "}")]),
    )


def page_tokens_for(account_id: str) -> st.SearchStrategy[str]:
    """Tokens forged for the very listing they are sent with: the service's own shape
    (base64url of {"account_id", "before_seq"}) with odd positions, other shapes, and nesting."""
    return st.one_of(
        _before_seqs().map(lambda before_seq: _b64(json.dumps({"account_id": account_id, "before_seq": before_seq}).encode())),
        _before_seqs().map(lambda before_seq: _b64(json.dumps([account_id, before_seq]).encode())),
        _before_seqs().map(lambda before_seq: _b64(json.dumps({"account_id": [account_id], "before_seq": before_seq}).encode())),
        nested_json_tokens(),
    )


def page_tokens(pools: Pools) -> st.SearchStrategy[str]:
    """Issued tokens, tokens forged in the service's own shape (JSON in base64url), and garbage."""
    forged = st.fixed_dictionaries(
        {"account_id": st.one_of(_from(pools.account_ids), generic_strings()), "before_seq": _before_seqs()}
    ).map(lambda payload: _b64(json.dumps(payload).encode()))
    issued = _from(pools.page_tokens)
    return st.one_of(
        issued, issued.flatmap(lambda token: st.sampled_from(_near_misses(token))),
        forged, forged, nested_json_tokens(),
        st.binary(max_size=64).map(_b64), st.sampled_from(["=", "==", "!!!!", "a", "e30", "bnVsbA", "W10"]),
        generic_strings(),
    )


# Fields whose most telling values depend on another field of the same message: (that
# field, its value -> strategy). A page token is only read for the account it names, so a
# forged one must name the request's own account_id to get past that check.
RELATED_FIELDS = {"page_token": ("account_id", page_tokens_for)}


def free_text() -> st.SearchStrategy[str]:
    return st.one_of(
        generic_strings(),
        st.builds(lambda n, c: c * n, st.sampled_from((255, 256, 257)), st.sampled_from("aé😀")),
        st.text(st.characters(exclude_categories=("Cs",)), min_size=250, max_size=260),
    )


def strings_for(field: FieldDescriptor, pools: Pools) -> st.SearchStrategy[str]:
    """A string field's values, by what its name says it holds; generic strings for any other."""
    name = field.name
    if name in ("currency", "currencies"):
        return currencies()
    if name == "participant_id":
        return participant_ids(pools)
    if name.endswith("account_id"):
        return account_ids(pools)
    if name == "transfer_id":
        return transfer_ids(pools)
    if name == "request_id":
        return request_ids(pools)
    if name == "owner_id":
        return owner_ids(pools)
    if name == "page_token":
        return page_tokens(pools)
    if name in ("reference", "reason", "message", "description"):
        return free_text()
    if name.endswith("_id"):
        return st.one_of(_fresh(pools), _from(pools.account_ids + pools.transfer_ids), generic_strings())
    return generic_strings()


# ---------------------------------------------------------------------------------------
# Other scalars.

def integers_for(field: FieldDescriptor, pools: Pools = Pools()) -> st.SearchStrategy[int]:
    low, high = _INTEGER_RANGES[field.type]
    boundaries = sorted({value for value in _INTEGER_BOUNDARIES + (low, high, low + 1, high - 1) if low <= value <= high})
    by_name: list[st.SearchStrategy[int]] = []
    if field.name.endswith("_minor"):
        by_name.append(st.integers(max(low, 1), min(high, 100_000)))  # amounts that can post
    if field.name == "page_size":
        by_name += [st.sampled_from([v for v in (0, 1, 2, 49, 50, 499, 500, 501, -1) if low <= v <= high])] * 2
    if field.name == "tier":
        by_name.append(st.integers(max(low, -1), min(high, 5)))
    if field.name == "threshold_percent":
        by_name.append(st.sampled_from([v for v in (0, 1, 89, 90, 99, 100, 101, -1, 255) if low <= v <= high]))
    if field.name in CLEARING_ID_FIELDS:
        by_name += [clearing_ids_for(field, pools)] * 2
    return st.one_of(*by_name, st.sampled_from(boundaries), st.sampled_from(boundaries), st.integers(low, high),
                     st.integers(max(low, -10), min(high, 1_000)))


def enums_for(field: FieldDescriptor) -> st.SearchStrategy[int]:
    """Declared numbers, and numbers the enum does not declare (proto3 enums are open)."""
    declared = sorted(field.enum_type.values_by_number)
    undeclared = [n for n in (-1, max(declared) + 1, 99, INT32_MAX, INT32_MIN) if n not in declared]
    return st.one_of(st.sampled_from(declared), st.sampled_from(declared), st.sampled_from(undeclared))


def floats_for(field: FieldDescriptor) -> st.SearchStrategy[float]:
    width = 32 if field.type == FieldDescriptor.TYPE_FLOAT else 64
    return st.one_of(st.floats(width=width), st.sampled_from([0.0, -0.0, 1.0, -1.0, float("inf"), float("-inf"), float("nan")]))


def bytes_for(field: FieldDescriptor) -> st.SearchStrategy[bytes]:
    return st.one_of(st.binary(max_size=64), st.sampled_from(STRING_LENGTH_BOUNDARIES).map(lambda n: b"\xff" * n))


def plausible_scalars_for(field: FieldDescriptor, pools: Pools) -> st.SearchStrategy:
    """What a well-behaved client would send in the field: real ids, fresh ids, a known
    currency, an amount that can post, a declared enum value. Requests built from these
    get past validation, so the fuzz reaches authorisation, the posting rules and success."""
    name = field.name
    if field.type == FieldDescriptor.TYPE_STRING:
        if name in ("currency", "currencies"):
            return st.sampled_from(("USD", "USD", "USD", "JPY"))
        if name == "participant_id":
            return st.one_of(_from(pools.participant_ids), _fresh(pools, "p-"))
        if name.endswith("account_id"):
            return _from(pools.account_ids)
        if name == "transfer_id":
            return st.one_of(_fresh(pools), _fresh(pools), _from(pools.transfer_ids))
        if name == "request_id":
            return st.one_of(_fresh(pools, "open-"), _from(pools.request_ids))
        if name == "owner_id":
            return _from(pools.owner_ids)
        if name == "page_token":
            return st.one_of(st.just(""), _from(pools.page_tokens))
        return st.from_regex(r"[A-Za-z0-9._:\-]{1,20}", fullmatch=True)
    if field.type in _INTEGER_RANGES:
        low, high = _INTEGER_RANGES[field.type]
        if name.endswith("_minor"):
            return st.integers(max(low, 1), min(high, 10_000))
        if name == "threshold_percent":
            return st.integers(0, 100)
        if name in CLEARING_ID_FIELDS and (pools.window_ids or pools.settlement_ids):
            return clearing_ids_for(field, pools)
        if name == "tier":
            return st.sampled_from((0, 0, 1, 2, 3))  # a customer opens tier 0 only
        return st.integers(max(low, 0), min(high, 500))
    if field.type == FieldDescriptor.TYPE_ENUM:
        return st.sampled_from(sorted(n for n in field.enum_type.values_by_number if n != 0) or [0])
    if field.type == FieldDescriptor.TYPE_BOOL:
        return st.just(False)  # flags (linked, collect_on_every_shard) change the path; the full mix sets them
    return scalars_for(field, pools)


def scalars_for(field: FieldDescriptor, pools: Pools) -> st.SearchStrategy:
    if field.type == FieldDescriptor.TYPE_STRING:
        return strings_for(field, pools)
    if field.type in _INTEGER_RANGES:
        return integers_for(field, pools)
    if field.type == FieldDescriptor.TYPE_ENUM:
        return enums_for(field)
    if field.type == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if field.type in (FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_DOUBLE):
        return floats_for(field)
    if field.type == FieldDescriptor.TYPE_BYTES:
        return bytes_for(field)
    raise NotImplementedError(f"{field.full_name}: field type {field.type} (groups are not proto3)")


# ---------------------------------------------------------------------------------------
# Messages.

def _is_map(field: FieldDescriptor) -> bool:
    return field.type == FieldDescriptor.TYPE_MESSAGE and field.message_type.GetOptions().map_entry


def _values_for(field: FieldDescriptor, pools: Pools, depth: int, plausible: bool) -> st.SearchStrategy | None:
    """One item's values (a map entry: a (key, value) pair); None for a message too deep to build."""
    if _is_map(field):
        entry = field.message_type
        values = _values_for(entry.fields_by_name["value"], pools, depth + 1, plausible)
        if values is None:
            return None
        return st.tuples(scalars_for(entry.fields_by_name["key"], pools), values)
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        if depth >= MESSAGE_DEPTH_MAX:
            return None
        return _messages(field.message_type, pools, depth + 1, plausible)
    return plausible_scalars_for(field, pools) if plausible else scalars_for(field, pools)


def _field_strategy(field: FieldDescriptor, pools: Pools, depth: int, plausible: bool) -> st.SearchStrategy | None:
    """What to set a field to: None leaves it unset (a proto3 scalar's default)."""
    values = _values_for(field, pools, depth, plausible)
    if values is None:
        return None
    if field.is_repeated:
        if plausible:
            return st.lists(values, min_size=1, max_size=REPEATED_ITEMS_MAX)
        lists = st.lists(values, max_size=REPEATED_ITEMS_MAX)
        if pools.repeated_boundary_sizes and not _is_map(field):
            # One drawn item copied to a boundary size: cheap to draw, and a batch limit's edge.
            lists = st.one_of(lists, lists, lists, st.tuples(st.sampled_from(pools.repeated_boundary_sizes), values).map(
                lambda drawn: [drawn[1]] * drawn[0]))
        return st.one_of(st.none(), lists)
    if plausible:
        return values
    return st.one_of(st.none(), values, values, values)


def _set(target: message.Message, field: FieldDescriptor, value) -> None:
    if _is_map(field):
        container = getattr(target, field.name)
        for key, item in value:
            if isinstance(item, message.Message):
                container[key].CopyFrom(item)
            else:
                container[key] = item
    elif field.is_repeated:
        getattr(target, field.name).extend(value)
    elif field.type == FieldDescriptor.TYPE_MESSAGE:
        getattr(target, field.name).CopyFrom(value)
    else:
        setattr(target, field.name, value)


def _real_oneofs(message_descriptor: descriptor.Descriptor) -> list[descriptor.OneofDescriptor]:
    """Oneofs a sender chooses in (a proto3 `optional` field's synthetic oneof is just presence)."""
    return [o for o in message_descriptor.oneofs if not getattr(o, "is_synthetic", False) and len(o.fields) > 0]


def messages(message_descriptor: descriptor.Descriptor, pools: Pools = Pools()) -> st.SearchStrategy[message.Message]:
    """Messages of the descriptor's type, built field by field, at most one member of each oneof
    set: half of them from the full mix in every field, half plausible (see plausible_scalars_for)."""
    return st.one_of(_messages(message_descriptor, pools, 0, False), _messages(message_descriptor, pools, 0, True))


def _messages(message_descriptor: descriptor.Descriptor, pools: Pools, depth: int, plausible: bool) -> st.SearchStrategy[message.Message]:
    """A plausible message is well-behaved in every field, or in all but one, which takes a
    value of the full mix: one step off the path at a time, so the step is what gets judged."""
    message_class = message_factory.GetMessageClass(message_descriptor)
    strategies, full_mix = {}, {}
    for field in message_descriptor.fields:
        strategy = _field_strategy(field, pools, depth, plausible)
        if strategy is not None:
            strategies[field.name] = strategy
            full_mix[field.name] = _field_strategy(field, pools, depth, False) if plausible else strategy
    oneofs = _real_oneofs(message_descriptor)
    chosen = st.tuples(*[st.sampled_from([None] + [f.name for f in o.fields]) for o in oneofs])
    if plausible and full_mix:
        spoiled = st.one_of(st.none(), st.sampled_from(sorted(full_mix)).flatmap(
            lambda name: full_mix[name].map(lambda value: (name, value))))
    else:
        spoiled = st.none()

    def build(drawn: tuple[dict, tuple, tuple | None]) -> message.Message:
        values, choices, spoil = drawn
        if spoil is not None:
            values = {**values, spoil[0]: spoil[1]}
        skipped = {f.name for o, pick in zip(oneofs, choices) for f in o.fields if f.name != pick}
        built = message_class()
        for field in message_descriptor.fields:
            value = values.get(field.name)
            if value is not None and field.name not in skipped:
                _set(built, field, value)
        return built

    drawn_fields = st.fixed_dictionaries(strategies)
    for name, (source, related) in RELATED_FIELDS.items():
        if name in strategies and source in strategies:
            drawn_fields = drawn_fields.flatmap(lambda values, name=name, source=source, related=related: st.one_of(
                st.just(values),
                related(values[source]).map(lambda value: {**values, name: value}) if values.get(source) is not None else st.just(values),
            ))
    return st.tuples(drawn_fields, chosen, spoiled).map(build)


# ---------------------------------------------------------------------------------------
# Bytes that no message class would encode.

def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _key(field_number: int, wire_type: int) -> bytes:
    return _varint((field_number << 3) | wire_type)


def wire_records(message_descriptor: descriptor.Descriptor) -> st.SearchStrategy[bytes]:
    """Hand-made wire records: the message's own field numbers with the wrong wire types,
    unknown and out-of-range field numbers, invalid wire types 6 and 7, overlong varints,
    lengths past the end of the message, unclosed groups, invalid UTF-8 in string fields, and
    length-delimited fields nested past any recursion limit."""
    numbers = [f.number for f in message_descriptor.fields] or [1]
    field_numbers = st.one_of(st.sampled_from(numbers), st.sampled_from([0, 15, 16, 2047, 2**29 - 1, 2**29]), st.integers(1, 2**29 - 1))
    string_numbers = [f.number for f in message_descriptor.fields if f.type == FieldDescriptor.TYPE_STRING] or numbers
    record = st.one_of(
        st.builds(lambda n, w, payload: _key(n, w) + payload, field_numbers, st.integers(0, 7), st.binary(max_size=16)),
        st.builds(lambda n: _key(n, 0) + b"\xff" * 10 + b"\x01", field_numbers),  # an 11-byte varint
        st.builds(lambda n: _key(n, 0) + b"\xff" * 3, field_numbers),  # a varint cut short
        st.builds(lambda n, length: _key(n, 2) + _varint(length) + b"ab", field_numbers, st.sampled_from([3, 100, 2**31, 2**32 + 1, 2**63])),
        st.builds(lambda n: _key(n, 3), field_numbers),  # a group that never ends
        st.builds(lambda n: _key(n, 4), field_numbers),  # a group end that never began
        st.builds(lambda n, raw: _key(n, 2) + _varint(len(raw)) + raw, st.sampled_from(string_numbers),
                  st.sampled_from([b"\xff", b"\xc0\x80", b"\xed\xa0\x80", b"a\x00b", b"\xf4\x90\x80\x80"])),
        st.builds(_nested_record, st.sampled_from(numbers), st.sampled_from(NESTING_DEPTHS[:4])),
    )
    return st.lists(record, min_size=1, max_size=4).map(b"".join)


def _nested_record(field_number: int, depth: int) -> bytes:
    payload = b""
    for _ in range(depth):
        payload = _key(field_number, 2) + _varint(len(payload)) + payload
    return payload


def _mutations(valid: bytes) -> st.SearchStrategy[bytes]:
    if not valid:
        return st.just(b"\x00")
    return st.one_of(
        st.integers(0, len(valid) - 1).map(lambda cut: valid[:cut]),
        st.tuples(st.integers(0, len(valid) - 1), st.integers(0, 7)).map(
            lambda flip: valid[:flip[0]] + bytes([valid[flip[0]] ^ (1 << flip[1])]) + valid[flip[0] + 1:]),
        st.binary(min_size=1, max_size=8).map(lambda tail: valid + tail),
        st.just(valid * 2),
    )


def raw_requests(message_descriptor: descriptor.Descriptor, pools: Pools = Pools()) -> st.SearchStrategy[bytes]:
    """Request bodies for a call with identity serializers: valid encodings, their mutations, wire records, noise."""
    valid = messages(message_descriptor, pools).map(lambda m: m.SerializeToString())
    return st.one_of(
        st.just(b""),
        st.binary(max_size=256),
        valid,
        valid.flatmap(_mutations),
        valid.flatmap(_mutations),
        wire_records(message_descriptor),
        st.tuples(valid, wire_records(message_descriptor)).map(b"".join),
    )
