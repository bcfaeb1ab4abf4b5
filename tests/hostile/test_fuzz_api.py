"""Fuzz every corebank.v1 method under every identity, with requests built from the proto descriptors.

The methods come from the service descriptors (tests/hostile/proto_strategies.py), so a new
RPC is fuzzed without a change here. Each (identity, method) pair gets random and boundary
messages: ids of real accounts and transfers and their near misses, internal (clr_, sub_)
and reserved (sys:) ids, length boundaries, unicode and control characters, int64 and int32
edges, undeclared enum numbers, batches of a few transfers and of the batch limit and one
past it, forged page tokens. Each method also gets raw bodies (random bytes, valid
encodings cut or bit-flipped, hand-made wire records) through a call with identity
serializers. The identities: a customer that owns accounts, another customer, an operator,
an admin, a service, a channel with no token and one with garbage tokens (malformed, alg
none, HMAC with the public key, forged signatures under the real key id, duplicates).

Every call must end with an allowed status (never INTERNAL, UNKNOWN or a dropped
connection), and every non-OK status must carry a google.rpc.Status whose first detail is
an ErrorInfo of domain corebank.v1 with a reason of corebank.v1.ErrorReason. An OK answer
must decode and obey the authorisation table (services/ledger/authorization.py) where the
answer shows it. And a refused call changes nothing in the ledger: calls run one at a time,
and the databases are read before and after each (see `Fingerprint` for what is compared
and what the background sweeps of collecting merchants force us to leave out).

    HOSTILE_EXAMPLES=500 SEED=7 make hostile      # long form (HOSTILE_FUZZ_EXAMPLES per identity and method)
"""

from __future__ import annotations

import base64
import collections
import dataclasses
import hashlib
import hmac
import json
import os
import re
import time
import uuid

import grpc
import jwt
import psycopg
import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519
from google.protobuf import message, text_format
from google.rpc import error_details_pb2, status_pb2
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st

from corebank.v1 import accounts_pb2, clearing_pb2, clearing_pb2_grpc, errors_pb2, payments_pb2
from services.auth import auth_dir, client, tokens
from services.collection import collection_account_id
from services.coordinator.clearing import clearing_account_id
from services.server import MESSAGE_BYTES_MAX
from tests.hostile import proto_strategies as ps

# Long form: HOSTILE_FUZZ_EXAMPLES examples per (identity, method), or a quarter of HOSTILE_EXAMPLES.
EXAMPLES = int(os.environ.get("HOSTILE_FUZZ_EXAMPLES") or max(6, int(os.environ.get("HOSTILE_EXAMPLES") or 0) // 4))
RAW_EXAMPLES = 2 * EXAMPLES  # raw bodies per method, under identities drawn at random
SEED = int(os.environ.get("SEED") or 20240601)
SHRINK = os.environ.get("HOSTILE_SHRINK", "") not in ("", "0")
# HOSTILE_FUZZ_TRACE=1 prints one line per call: identity, method, request, answer.
TRACE = os.environ.get("HOSTILE_FUZZ_TRACE", "") not in ("", "0")

pytestmark = [pytest.mark.cluster, pytest.mark.hostile]

# Longer than the test cluster's pending timeout (8 s): a transfer the system cancels answers ABORTED.
CALL_TIMEOUT_SECONDS = 12.0
# Before each call, the transfers of earlier calls must be final (a TCC whose driver finished
# answering may still be confirming its credit branch). Bounded like support's quiescence.
QUIET_WAIT_SECONDS_MAX = 20.0
QUIET_POLL_SECONDS = 0.05
FUNDING_MINOR = 1_000_000
# CreateTransfers' limit (services/ledger_service.py) and one past it.
BATCH_BOUNDARY_SIZES = (5_000, 5_001)

IDENTITIES = ("customer", "other-customer", "operator", "admin", "service", "no-token", "garbage-token")
UNAUTHENTICATED_IDENTITIES = ("no-token", "garbage-token")
ALLOWED_CODES = {
    grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.ABORTED,
    grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED,
}
CODE_BY_NUMBER = {code.value[0]: code for code in grpc.StatusCode}
REASONS = set(errors_pb2.ErrorReason.keys()) - {"ERROR_REASON_UNSPECIFIED"}
ERROR_DOMAIN = "corebank.v1"
STATUS_DETAILS_KEY = "grpc-status-details-bin"
# Refusals that the contract records as a REJECTED (or VOIDED) transfer under the request's id,
# so that a retry answers the same (tests/hostile/support.py RECORDED_REFUSALS, plus VOIDED).
RECORDED_REFUSALS = {
    "INSUFFICIENT_FUNDS", "ACCOUNT_FROZEN", "ACCOUNT_DEBIT_BLOCKED", "ACCOUNT_CREDIT_BLOCKED", "ACCOUNT_CLOSED",
    "CURRENCY_MISMATCH", "LIMIT_EXCEEDED", "BALANCE_OVERFLOW", "ACCOUNT_NOT_FOUND", "TRANSFER_VOIDED",
    "LINKED_TRANSFER_FAILED", "LINKED_CHAIN_SPANS_SHARDS", "NET_DEBIT_CAP_EXCEEDED",
}
MONEY_METHODS = {"Transfer", "CreateTransfers"}
# Who may call the Clearing methods (protos/corebank/v1/clearing.proto): any other method reads.
CLEARING_SERVICE = "corebank.v1.Clearing"
CLEARING_READERS = {"admin", "operator", "service"}
CLEARING_ROLES = {
    "RegisterParticipant": {"admin"}, "SetNetDebitCap": {"admin"}, "RecordParticipantSettled": {"admin"},
    "CloseSettlementWindow": {"admin", "operator"}, "CreateSettlement": {"admin", "operator"},
}
KIND_CUSTOMER, KIND_MERCHANT, KIND_SYSTEM = 1, 2, 3
OWNED_KINDS = (KIND_CUSTOMER, KIND_MERCHANT)
# grpc's own limit on a call's metadata (grpc.max_metadata_size, 8 KiB by default): past it the
# server's grpc refuses the call (always past 16 KiB, at random between) before corebank runs.
METADATA_BYTES_SOFT_MAX = 8 * 1024
# Metadata values must be printable ASCII, or the client refuses to send them.
PRINTABLE = st.characters(min_codepoint=0x20, max_codepoint=0x7E)


# ---------------------------------------------------------------------------------------
# The ledger as the databases hold it, minus what moves by itself.

# Per shard. Left out, because the coordinators' sweeps of collecting merchants move money
# between a merchant's sub-accounts (sub_), the merchant (hot_) and, across shards, the
# clearing accounts (clr_) at any moment, under transfer ids of the ledger's own (sys:):
# the counters of sub_ and hot_ accounts (their statuses stay in), the clearing accounts
# whole (a sweep opens a shard's clearing accounts when it first needs them), and the rows
# and registered ids whose transfer id starts sys:. A refused call that moved money would
# still show on its other side (a customer, merchant or SYSTEM account), compared in full.
FINGERPRINT_SQL = """
    SELECT
      (SELECT count(*) FROM transfers WHERE NOT starts_with(transfer_id, 'sys:') AND transfer_id <> ALL(%(ids)s)),
      (SELECT count(*) FROM transfers WHERE transfer_id = ANY(%(ids)s)),
      (SELECT count(*) FROM transfers WHERE transfer_id = ANY(%(ids)s) AND status IN (1, 2)),
      (SELECT count(*) FROM tcc_transfers WHERE NOT starts_with(transfer_id, 'sys:') AND transfer_id <> ALL(%(ids)s)),
      (SELECT count(*) FROM tcc_transfers WHERE transfer_id = ANY(%(ids)s)),
      (SELECT count(*) FROM tcc_transfers WHERE transfer_id = ANY(%(ids)s) AND state NOT IN (5, 6)),
      (SELECT count(*) FROM tcc_barriers WHERE NOT starts_with(transfer_id, 'sys:') AND transfer_id <> ALL(%(ids)s)),
      (SELECT count(*) FROM id_registry WHERE NOT starts_with(id, 'sys:') AND NOT (namespace = 1 AND id = ANY(%(ids)s))),
      (SELECT count(*) FROM id_registry WHERE namespace = 1 AND id = ANY(%(ids)s)),
      (SELECT count(*) FROM accounts WHERE NOT starts_with(account_id, 'clr_')),
      (SELECT md5(coalesce(string_agg(
           account_id || ' ' || owner_id || ' ' || kind || ' ' || tier || ' ' || status || ' ' || currency || ' ' ||
           CASE WHEN parent_account_id IS NOT NULL OR starts_with(account_id, 'hot_') THEN ''
                ELSE debits_posted_minor || ' ' || credits_posted_minor || ' ' || debits_pending_minor || ' ' || credits_pending_minor
           END, ',' ORDER BY account_id), '')) FROM accounts WHERE NOT starts_with(account_id, 'clr_')),
      (SELECT md5(concat_ws('|',
           (SELECT string_agg(concat_ws(',', participant_id, currency, position_minor, reserved_minor), ';' ORDER BY 1)
              FROM clearing_positions WHERE position_minor <> 0 OR reserved_minor <> 0),
           (SELECT string_agg(concat_ws(',', window_id, participant_id, currency, debits_minor, credits_minor, transfers), ';' ORDER BY 1)
              FROM clearing_window_totals),
           (SELECT string_agg(window_id::text, ';') FROM clearing_shard_window),
           (SELECT string_agg(concat_ws(',', settlement_id, participant_id, currency, amount_minor), ';' ORDER BY 1) FROM clearing_position_resets),
           (SELECT string_agg(concat_ws(',', participant_id, request_id, name), ';' ORDER BY 1) FROM participants),
           (SELECT string_agg(concat_ws(',', participant_id, currency, settlement_account_id, net_debit_cap_minor, threshold_percent), ';' ORDER BY 1)
              FROM participant_currencies),
           (SELECT string_agg(concat_ws(',', window_id, state, closed_at, reason, close_request_id, settlement_id), ';' ORDER BY 1) FROM settlement_windows),
           (SELECT string_agg(concat_ws(',', settlement_id, request_id, model, state, window_ids, settled_at), ';' ORDER BY 1) FROM settlements),
           (SELECT string_agg(concat_ws(',', settlement_id, participant_id, currency, debits_minor, credits_minor, settled_at), ';' ORDER BY 1)
              FROM settlement_entries)))),
      (SELECT count(*) FROM tcc_transfers WHERE finalized_at IS NULL AND NOT starts_with(transfer_id, 'sys:'))
      + (SELECT count(*) FROM transfers WHERE status = 1 AND NOT starts_with(transfer_id, 'sys:'))
"""
FINGERPRINT_FIELDS = (
    "transfer rows (other ids)", "transfer rows (request ids)", "PENDING/POSTED rows (request ids)",
    "coordinator records (other ids)", "coordinator records (request ids)", "coordinator records not REJECTED/VOIDED (request ids)",
    "barriers (other ids)", "registered ids (other ids)", "registered transfer ids (request ids)",
    "accounts (but clearing)", "accounts' owners, kinds, tiers, statuses and counters (digest)",
    "clearing: positions, window totals, resets, participants, windows, settlements (digest)", "in flight",
)
# The fields a refusal recorded under the request's own ids may change (a REJECTED row, its record and registered id).
RECORDED_FIELDS = {"transfer rows (request ids)", "coordinator records (request ids)", "registered transfer ids (request ids)"}


@dataclasses.dataclass(frozen=True)
class Fingerprint:
    by_shard: dict[str, dict[str, object]]

    def in_flight(self) -> int:
        return sum(int(values["in flight"]) for values in self.by_shard.values())

    def differences(self, after: Fingerprint, allowed: set[str] = frozenset()) -> list[str]:
        return [
            f"{shard}: {field} {self.by_shard[shard][field]} -> {after.by_shard[shard][field]}"
            for shard in self.by_shard for field in FINGERPRINT_FIELDS
            if field != "in flight" and field not in allowed and self.by_shard[shard][field] != after.by_shard[shard][field]
        ]


class Databases:
    """One autocommit connection per shard, for the whole module."""

    def __init__(self, shards: list[dict]) -> None:
        self.connections = {shard["name"]: psycopg.connect(shard["dsn"], autocommit=True) for shard in shards}

    def close(self) -> None:
        for connection in self.connections.values():
            connection.close()

    def fingerprint(self, transfer_ids: list[str]) -> Fingerprint:
        return Fingerprint({
            name: dict(zip(FINGERPRINT_FIELDS, connection.execute(FINGERPRINT_SQL, {"ids": transfer_ids}).fetchone()))
            for name, connection in self.connections.items()
        })

    def quiet_fingerprint(self, transfer_ids: list[str]) -> Fingerprint:
        """A fingerprint once no transfer of an earlier call is in flight (bounded)."""
        started = time.monotonic()
        while True:
            found = self.fingerprint(transfer_ids)
            if not found.in_flight() or time.monotonic() - started > QUIET_WAIT_SECONDS_MAX:
                return found
            time.sleep(QUIET_POLL_SECONDS)

    def stored_transfer_ids(self, transfer_ids: list[str]) -> set[str]:
        found = set()
        for connection in self.connections.values():
            found |= {row[0] for row in connection.execute(
                "SELECT transfer_id FROM transfers WHERE transfer_id = ANY(%(ids)s)"
                " UNION SELECT transfer_id FROM tcc_transfers WHERE transfer_id = ANY(%(ids)s)", {"ids": storable(transfer_ids)})}
        return found

    def live_rows(self, transfer_ids: list[str]) -> dict[str, list[tuple]]:
        """PENDING or POSTED rows and unfinished or POSTED coordinator records under the ids."""
        found: dict[str, list[tuple]] = {}
        for name, connection in self.connections.items():
            for row in connection.execute(
                "SELECT transfer_id, 'row', status, branch FROM transfers WHERE transfer_id = ANY(%(ids)s) AND status IN (1, 2)"
                " UNION ALL SELECT transfer_id, 'record', state, 0 FROM tcc_transfers WHERE transfer_id = ANY(%(ids)s) AND state NOT IN (5, 6)",
                {"ids": storable(transfer_ids)},
            ):
                found.setdefault(row[0], []).append((name, *row[1:]))
        return found

    def ownership(self, account_ids: list[str]) -> dict[str, tuple[str, int]]:
        """account id -> (owner_id, kind), for the accounts that exist."""
        found = {}
        for connection in self.connections.values():
            found |= {row[0]: (row[1], row[2]) for row in connection.execute(
                "SELECT account_id, owner_id, kind FROM accounts WHERE account_id = ANY(%s)", [storable(account_ids)])}
        return found


# ---------------------------------------------------------------------------------------
# Identities.

def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _unsigned_jwt(header: dict, claims: dict, signature: bytes = b"") -> str:
    return ".".join([_b64(json.dumps(header).encode()), _b64(json.dumps(claims).encode()), _b64(signature)])


def garbage_authorizations(cluster: dict) -> st.SearchStrategy[list[tuple[str, str]]]:
    """`authorization` metadata that must answer UNAUTHENTICATED: malformed, unsigned, alg none,
    HMAC keyed with the real public key, signed by a key of our own under the real key id,
    other issuers and audiences, oversized, other schemes, and two headers at once."""
    real_kid = jwt.get_unverified_header(cluster["auth"]["admin_token"])["kid"]
    public_pem = (tokens.keys_dir(auth_dir(cluster["state_dir"])) / f"{real_kid}.pub").read_bytes()
    now = int(time.time())
    admin_claims = {"iss": tokens.ISSUER, "aud": tokens.AUDIENCE, "sub": "fz-admin", "role": "admin", "iat": now, "nbf": now, "exp": now + 3600}
    our_key = ed25519.Ed25519PrivateKey.generate()
    alg_confusion_header = {"alg": "HS256", "typ": "JWT", "kid": real_kid}
    signing_input = f"{_b64(json.dumps(alg_confusion_header).encode())}.{_b64(json.dumps(admin_claims).encode())}"
    alg_confusion = f"{signing_input}.{_b64(hmac.new(public_pem, signing_input.encode(), hashlib.sha256).digest())}"
    forged = [
        jwt.encode(admin_claims, our_key, algorithm="EdDSA", headers={"kid": real_kid}),
        jwt.encode({**admin_claims, "iss": "someone-else"}, our_key, algorithm="EdDSA", headers={"kid": real_kid}),
        jwt.encode({**admin_claims, "role": "root"}, our_key, algorithm="EdDSA", headers={"kid": real_kid}),
        alg_confusion,
        _unsigned_jwt({"alg": "none", "typ": "JWT", "kid": real_kid}, admin_claims),
        _unsigned_jwt({"alg": "none"}, admin_claims),
        _unsigned_jwt({"alg": "EdDSA", "kid": real_kid}, admin_claims, b"\x00" * 64),
    ]
    header_values = st.one_of(st.none(), st.booleans(), st.integers(), st.text(PRINTABLE, max_size=20),
                              st.sampled_from([real_kid, "../../token-keys/" + real_kid, "", "current", real_kid + ".key"]),
                              st.lists(st.text(PRINTABLE, max_size=5), max_size=2))
    claim_values = st.one_of(st.none(), st.integers(), st.floats(allow_nan=False), st.text(PRINTABLE, max_size=20),
                             st.sampled_from(["admin", "operator", "service", "customer", "root", "", tokens.ISSUER, tokens.AUDIENCE]))
    random_jwts = st.builds(
        _unsigned_jwt,
        st.fixed_dictionaries({"alg": st.sampled_from(["EdDSA", "none", "HS256", "RS256", "", "ES256"]), "kid": header_values}),
        st.fixed_dictionaries({}, optional={name: claim_values for name in ("iss", "aud", "sub", "role", "exp", "nbf", "iat")}),
        st.binary(max_size=64),
    )
    tokens_drawn = st.one_of(
        st.sampled_from(forged), st.sampled_from(forged), random_jwts,
        st.text(PRINTABLE, max_size=40),
        st.sampled_from(["", ".", "..", "a.b.c", "e30.e30.", "e30.e30.e30", "x" * (tokens.TOKEN_CHARS_MAX + 1), "A" * 100_000]),
    )
    values = st.one_of(
        tokens_drawn.map(lambda token: f"Bearer {token}"),
        tokens_drawn.map(lambda token: f"bearer {token}"),
        st.sampled_from(["Bearer", "Bearer ", "Basic YWRtaW46YWRtaW4=", "Token abc", " Bearer x", "Bearer  x"]),
        tokens_drawn,
    )
    return st.lists(values, min_size=1, max_size=2).map(lambda drawn: [("authorization", value) for value in drawn])


# ---------------------------------------------------------------------------------------
# Calls and their judgement.

@dataclasses.dataclass
class Outcome:
    code: grpc.StatusCode
    reason: str = ""
    field: str = ""  # the ErrorInfo's `field`, when it names one
    details: str = ""
    response: bytes = b""
    problems: list[str] = dataclasses.field(default_factory=list)
    oversized: bool = False  # refused by grpc for its size, before corebank saw it
    told: str = ""  # the refusal's message and ErrorInfo metadata values: what a client reads


def error_info_problems(status: status_pb2.Status, code: grpc.StatusCode) -> tuple[error_details_pb2.ErrorInfo, list[str]]:
    """(ErrorInfo, problems) of a google.rpc.Status that must carry an ErrorInfo of corebank.v1 first."""
    problems = []
    if status.code != code.value[0]:
        problems.append(f"google.rpc.Status code {status.code} differs from the call's {code.name}")
    info = error_details_pb2.ErrorInfo()
    if not status.details or not status.details[0].Unpack(info):
        return info, problems + [f"{code.name} without an ErrorInfo: {status.message!r}"]
    if info.domain != ERROR_DOMAIN:
        problems.append(f"ErrorInfo domain {info.domain!r}, not {ERROR_DOMAIN}")
    if info.reason not in REASONS:
        problems.append(f"ErrorInfo reason {info.reason!r} is not a corebank.v1.ErrorReason")
    if info.reason == "RATE_LIMITED" and not any(d.Is(error_details_pb2.RetryInfo.DESCRIPTOR) for d in status.details):
        problems.append("RATE_LIMITED without a google.rpc.RetryInfo")
    return info, problems


# What a refusal must never tell a client (issue 9: no SQL, stack traces or secrets), unless
# the client sent that very text itself (ids and currencies are echoed, cut short).
LEAK_PATTERNS = re.compile(
    r"Traceback|File \"|\.py\b|psycopg|SQLSTATE|\b(SELECT|INSERT|UPDATE|DELETE)\b .*\b(FROM|INTO|SET|WHERE)\b"
    r"|\b(relation|column|constraint|violates)\b|/work/|/tmp/|BEGIN [A-Z ]*PRIVATE KEY|eyJ[\w-]{8,}\.eyJ[\w-]{8,}",
    re.IGNORECASE,
)
# A token sent in the metadata is a secret of its sender: no part of it this long may come back.
ECHOED_TOKEN_CHARS_MIN = 16


def leak_problems(told: str, body: bytes, metadata: list[tuple[str, str]] | None) -> list[str]:
    sent = body.decode("utf-8", "replace")
    problems = [f"the refusal tells {match.group(0)!r}: {told[:300]!r}" for match in LEAK_PATTERNS.finditer(told)
                if match.group(0) not in sent]
    for _, value in metadata or ():
        token = value.split(" ", 1)[-1]
        if len(token) >= ECHOED_TOKEN_CHARS_MIN and token[:ECHOED_TOKEN_CHARS_MIN] in told:
            problems.append(f"the refusal echoes the authorization metadata: {told[:300]!r}")
    return problems


def call(channel: grpc.Channel, method: ps.Method, body: bytes, metadata: list[tuple[str, str]] | None) -> Outcome:
    """One call with identity serializers (bytes in, bytes out), and its status judged."""
    if method.client_streaming or method.server_streaming:
        pytest.fail(f"{method} streams: extend test_fuzz_api.call to stream the drawn messages")
    try:
        response = channel.unary_unary(method.path)(body, timeout=CALL_TIMEOUT_SECONDS, metadata=metadata)
    except grpc.RpcError as error:
        code = error.code()
        outcome = Outcome(code, details=error.details() or "")
        metadata_bytes = sum(len(key) + len(value) for key, value in metadata or ())
        if (len(body) > MESSAGE_BYTES_MAX or metadata_bytes > METADATA_BYTES_SOFT_MAX) and code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            # The one documented exception to "an ErrorInfo on every refusal": grpc itself refuses
            # a message over the server's cap (services/server.py) or metadata over its own limit
            # before any corebank code runs, so before authentication too, with a bare status.
            outcome.oversized = True
            return outcome
        if code not in ALLOWED_CODES:
            outcome.problems.append(f"status {code.name} is not an allowed answer: {error.details()!r}")
        raw = dict(error.trailing_metadata() or ()).get(STATUS_DETAILS_KEY)
        if raw is None:
            outcome.problems.append(f"{code.name} without {STATUS_DETAILS_KEY} (no google.rpc.Status): {error.details()!r}")
            return outcome
        try:
            status = status_pb2.Status.FromString(raw)
        except message.DecodeError:
            outcome.problems.append(f"{STATUS_DETAILS_KEY} is not a google.rpc.Status")
            return outcome
        info, problems = error_info_problems(status, code)
        outcome.reason, outcome.field = info.reason, info.metadata.get("field", "")
        outcome.told = " ".join([status.message, *info.metadata.values()])
        outcome.problems += problems + leak_problems(outcome.told, body, metadata)
        return outcome
    outcome = Outcome(grpc.StatusCode.OK, response=response)
    try:
        method.response_class.FromString(response)
    except message.DecodeError as error:
        outcome.problems.append(f"OK with a response that is not a {method.output.full_name}: {error}")
    return outcome


def request_transfer_ids(request: message.Message | None) -> list[str]:
    """The transfer ids a request names (those PostgreSQL could store: no NUL)."""
    if isinstance(request, payments_pb2.TransferRequest):
        named = {request.transfer_id}
    elif isinstance(request, payments_pb2.CreateTransfersRequest):
        named = {t.transfer_id for t in request.transfers}
    else:
        named = set()
    return storable(named)


def storable(values) -> list[str]:
    """The values a text column could hold: PostgreSQL text has no NUL, so no row is named by one."""
    return sorted(value for value in set(values) if "\x00" not in value)


@dataclasses.dataclass(frozen=True)
class Identity:
    name: str
    role: str  # "" when the call carries no valid token
    subject: str
    channel: grpc.Channel


class Fuzz:
    """The module's world: accounts and transfers to aim at, identities, the databases, and a tally."""

    def __init__(self, cluster: dict, ledger, shard_map, channel_as, admin_channel) -> None:
        run = uuid.uuid4().hex[:8]
        self.databases = Databases(cluster["shards"])
        self.tally: collections.Counter = collections.Counter()
        self.subjects = {"customer": f"fz-alice-{run}", "other-customer": f"fz-bob-{run}"}
        alice, bob = self.subjects["customer"], self.subjects["other-customer"]
        accounts, payments = ledger.accounts, ledger.payments
        request_ids = []

        # Clearing: bob's accounts belong to a participant of their own, so alice's payments to him are
        # cleared; a window with them is closed and settled (not recorded), for the Clearing methods to aim at.
        clearing = clearing_pb2_grpc.ClearingStub(admin_channel)
        participants = (f"fzp-{run}-bob", f"fzp-{run}-other")
        for participant_id in participants:
            clearing.RegisterParticipant(clearing_pb2.RegisterParticipantRequest(
                request_id=f"fz-reg-{participant_id}", participant_id=participant_id, name=participant_id, currencies=["USD", "JPY"]))

        def open_account(owner_id: str, kind=accounts_pb2.CUSTOMER, tier=2, currency="USD", collect=False, participant_id="") -> str:
            request_ids.append(f"fz-open-{run}-{len(request_ids)}")
            return accounts.OpenAccount(accounts_pb2.OpenAccountRequest(
                request_id=request_ids[-1], owner_id=owner_id, currency=currency, kind=kind, tier=tier, collect_on_every_shard=collect,
                participant_id=participant_id,
            )).account_id

        transfer_ids = []

        def move(debit: str, credit: str, amount_minor: int, currency="USD") -> None:
            transfer_ids.append(f"fz-t-{run}-{len(transfer_ids)}")
            payments.Transfer(payments_pb2.TransferRequest(
                transfer_id=transfer_ids[-1], debit_account_id=debit, credit_account_id=credit, amount_minor=amount_minor, currency=currency,
            ))

        bank = open_account(f"fz-bank-{run}", kind=accounts_pb2.SYSTEM, tier=0)
        bank_jpy = open_account(f"fz-bank-{run}", kind=accounts_pb2.SYSTEM, tier=0, currency="JPY")
        alice_main, alice_small = open_account(alice), open_account(alice, tier=0)
        alice_merchant = open_account(alice, kind=accounts_pb2.MERCHANT, tier=1)
        alice_collecting = open_account(alice, kind=accounts_pb2.MERCHANT, tier=3, collect=True)
        alice_jpy, alice_empty = open_account(alice, currency="JPY"), open_account(alice)
        bob_main, bob_frozen = open_account(bob, participant_id=participants[0]), open_account(bob, participant_id=participants[0])
        for account in (alice_main, bob_main, bob_frozen):
            move(bank, account, FUNDING_MINOR)
        move(bank, alice_small, 10_000)
        move(bank_jpy, alice_jpy, FUNDING_MINOR, "JPY")
        move(alice_main, bob_main, 1_234)
        move(bob_main, alice_main, 567)
        move(alice_main, alice_collecting, 890)
        accounts.UpdateAccountStatus(accounts_pb2.UpdateAccountStatusRequest(account_id=bob_frozen, status=accounts_pb2.FROZEN))
        listing = accounts.ListAccountTransfers(accounts_pb2.ListAccountTransfersRequest(account_id=alice_main, page_size=1))
        closed = clearing.CloseSettlementWindow(clearing_pb2.CloseSettlementWindowRequest(request_id=f"fz-close-{run}"))
        settlement = clearing.CreateSettlement(clearing_pb2.CreateSettlementRequest(
            request_id=f"fz-settle-{run}", window_ids=[closed.closed_window.window_id], model=clearing_pb2.DEFERRED_NET))
        shards = [shard.name for shard in shard_map.shards]
        self.pools = ps.Pools(
            account_ids=(alice_main, alice_small, alice_merchant, alice_collecting, alice_jpy, alice_empty, bob_main, bob_frozen, bank, bank_jpy),
            internal_account_ids=tuple(
                [collection_account_id(shard_map, shard, alice_collecting) for shard in shards]
                + [clearing_account_id(shard_map, shard, "USD", transfer_ids[0]) for shard in shards]
            ),
            transfer_ids=tuple(transfer_ids), request_ids=tuple(request_ids),
            owner_ids=(alice, bob, f"fz-bank-{run}", "corebank-clearing"),
            page_tokens=(listing.next_page_token,) if listing.next_page_token else (),
            fresh_prefix=f"fz-{run}", repeated_boundary_sizes=BATCH_BOUNDARY_SIZES,
            participant_ids=participants,
            window_ids=(closed.closed_window.window_id, closed.open_window.window_id), settlement_ids=(settlement.settlement_id,),
        )
        self.unauthenticated_channel = client.channel(cluster, token=None)
        roles = {"customer": "customer", "other-customer": "customer", "operator": "operator", "admin": "admin", "service": "service"}
        self.subjects |= {"operator": f"fz-operator-{run}", "admin": f"fz-admin-{run}", "service": f"fz-gateway-{run}"}
        self.identities = {
            name: Identity(name, role, self.subjects[name], channel_as(role, self.subjects[name])) for name, role in roles.items()
        } | {name: Identity(name, "", "", self.unauthenticated_channel) for name in UNAUTHENTICATED_IDENTITIES}
        self.garbage = garbage_authorizations(cluster)

    def close(self) -> None:
        self.unauthenticated_channel.close()
        self.databases.close()

    def metadata_for(self, identity: Identity, data) -> list[tuple[str, str]] | None:
        if identity.name == "garbage-token":
            return data.draw(self.garbage, label="authorization")
        return None

    def run(self, identity: Identity, method: ps.Method, body: bytes, request: message.Message | None,
            metadata: list[tuple[str, str]] | None) -> Outcome:
        """Call, then judge: the status, the answer against the authorisation table, the ledger after a refusal."""
        ids = request_transfer_ids(request)
        before = self.databases.quiet_fingerprint(ids)
        existed = self.databases.stored_transfer_ids(ids) if ids else set()
        outcome = call(identity.channel, method, body, metadata)
        self.tally[(identity.name, method.name, outcome.code.name, f"{outcome.reason}:{outcome.field}" if outcome.field else outcome.reason)] += 1
        if TRACE:
            shown = text_format.MessageToString(request, as_one_line=True)[:300] if request is not None else f"({len(body)} bytes)"
            print(f"fuzz: {identity.name} {method.name} {shown} -> {outcome.code.name}/{outcome.reason} {outcome.details[:120]!r}")
        if before.in_flight():
            outcome.problems.append(
                f"{before.in_flight()} transfers still in flight {QUIET_WAIT_SECONDS_MAX:.0f} s after the previous call"
                " (past the pending timeout and recovery): the ledger could not be compared around this call")
        if identity.name in UNAUTHENTICATED_IDENTITIES and outcome.code != grpc.StatusCode.UNAUTHENTICATED and not outcome.oversized:
            outcome.problems.append(f"a call without a valid token answered {outcome.code.name}/{outcome.reason}, not UNAUTHENTICATED")
        if outcome.code != grpc.StatusCode.OK:
            recorded = method.name in MONEY_METHODS and outcome.reason in RECORDED_REFUSALS
            allowed = RECORDED_FIELDS if recorded else set()
            changed = before.differences(self.databases.fingerprint(ids), allowed)
            if changed:
                outcome.problems.append(f"refused ({outcome.code.name}/{outcome.reason}), yet the ledger changed: {changed}")
        elif request is not None:
            outcome.problems += self.answer_problems(identity, method, request, outcome.response, existed)
        return outcome

    def answer_problems(self, identity: Identity, method: ps.Method, request: message.Message, response_bytes: bytes,
                        existed: set[str]) -> list[str]:
        """What an OK answer shows against the authorisation table (services/ledger/authorization.py)."""
        response = method.response_class.FromString(response_bytes)
        role, subject = identity.role, identity.subject
        problems = []
        if method.service == CLEARING_SERVICE and role not in CLEARING_ROLES.get(method.name, CLEARING_READERS):
            problems.append(f"{role} called Clearing.{method.name}")
        named = []
        if isinstance(response, accounts_pb2.Account):
            named = [response.account_id]
        elif isinstance(response, payments_pb2.CreateTransfersResponse):
            if len(response.results) != len(request.transfers):
                problems.append(f"{len(response.results)} results for {len(request.transfers)} transfers")
            named = [r.transfer.debit_account_id for r in response.results if r.HasField("transfer")]
        elif hasattr(response, "debit_account_id"):
            named = [response.debit_account_id, response.credit_account_id]
        owners = self.databases.ownership(named) if named else {}

        def owned(account_id: str) -> bool:
            return owners.get(account_id, ("", 0))[0] == subject and owners.get(account_id, ("", 0))[1] in OWNED_KINDS

        if method.name == "OpenAccount":
            if role not in ("admin", "service", "customer"):
                problems.append(f"{role} opened an account")
            if response.kind == accounts_pb2.SYSTEM and role != "admin":
                problems.append(f"{role} opened a SYSTEM account")
            if role == "customer" and response.owner_id != subject:
                problems.append(f"a customer opened an account of owner {response.owner_id!r}")
        elif method.name == "UpdateAccountStatus" and role not in ("operator", "admin"):
            problems.append(f"{role} changed an account's status")
        elif method.name in ("GetAccount", "CloseAccount") and role == "customer" and not owned(response.account_id):
            problems.append(f"a customer read or closed {response.account_id}, owned by {owners.get(response.account_id)}")
        elif method.name in ("GetAccount", "CloseAccount") and role == "service" and response.kind == accounts_pb2.SYSTEM:
            problems.append(f"a service read or closed the SYSTEM account {response.account_id}")
        elif method.name == "ListAccountTransfers" and role in ("customer", "service"):
            owner, kind = self.databases.ownership([request.account_id]).get(request.account_id, ("", 0))
            if role == "customer" and not (owner == subject and kind in OWNED_KINDS):
                problems.append(f"a customer listed the transfers of {request.account_id}, owned by {owner!r} (kind {kind})")
            if role == "service" and kind == KIND_SYSTEM:
                problems.append(f"a service listed the transfers of the SYSTEM account {request.account_id}")
        elif method.name == "GetTransfer" and role == "customer" and not (owned(response.debit_account_id) or owned(response.credit_account_id)):
            problems.append(f"a customer read transfer {response.transfer_id} of {owners}")
        elif method.name in MONEY_METHODS:
            debits = [response.debit_account_id] if method.name == "Transfer" else named
            for debit in debits:
                if role == "operator":
                    problems.append(f"an operator moved money from {debit}")
                elif role == "customer" and not owned(debit):
                    problems.append(f"a customer debited {debit}, owned by {owners.get(debit)}")
                elif role == "service" and owners.get(debit, ("", 0))[1] == KIND_SYSTEM:
                    problems.append(f"a service debited the SYSTEM account {debit}")
        if isinstance(response, payments_pb2.CreateTransfersResponse):
            problems += self.result_problems(request, response, existed)
        return problems

    def result_problems(self, request: payments_pb2.CreateTransfersRequest, response: payments_pb2.CreateTransfersResponse,
                        existed: set[str]) -> list[str]:
        """Each refused result carries an ErrorInfo, and a refused new id named once holds nothing live."""
        problems = []
        counts = collections.Counter(t.transfer_id for t in request.transfers)
        refused = []
        for item, result in zip(request.transfers, response.results):
            if result.HasField("transfer") == result.HasField("error"):
                problems.append(f"result for {item.transfer_id!r} holds {'both' if result.HasField('transfer') else 'neither'} a transfer and an error")
                continue
            if result.HasField("error"):
                code = CODE_BY_NUMBER.get(result.error.code, grpc.StatusCode.UNKNOWN)
                info, found = error_info_problems(result.error, code)
                found += leak_problems(" ".join([result.error.message, *info.metadata.values()]), request.SerializeToString(), None)
                reason = info.reason
                problems += [f"result for {item.transfer_id!r}: {p}" for p in found]
                if code in (grpc.StatusCode.OK, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN) or code not in ALLOWED_CODES:
                    problems.append(f"result for {item.transfer_id!r}: {code.name}/{reason}")
                if counts[item.transfer_id] == 1 and item.transfer_id not in existed:
                    refused.append(item.transfer_id)
        live = self.databases.live_rows(refused) if refused else {}
        problems += [f"result for {transfer_id!r} refused, yet stored live: {rows}" for transfer_id, rows in live.items()]
        return problems


@pytest.fixture(scope="module")
def fuzz(cluster, ledger, shard_map, channel_as, grpc_channel):
    world = Fuzz(cluster, ledger, shard_map, channel_as, grpc_channel)
    yield world
    world.close()
    print(f"\nfuzz: {sum(world.tally.values())} calls; answers by identity, method, code and reason:")
    for (identity, method, code, reason), count in sorted(world.tally.items()):
        print(f"  {identity:15} {method:21} {code:20} {reason:40} {count}")


def _settings(examples: int):
    return settings(
        max_examples=examples, deadline=None, database=None, derandomize=False,
        phases=[Phase.explicit, Phase.generate] + ([Phase.shrink] if SHRINK else []),
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example,
                               HealthCheck.function_scoped_fixture],
    )


# Characters of a request shown when a call fails (the body is shown whole only when short).
SHOWN_CHARS_MAX = 1_500


def reproduction(identity: Identity, method: ps.Method, body: bytes, request, metadata, outcome: Outcome) -> str:
    """What to send to see it again: method, identity, metadata, the request and its exact bytes."""
    shown = text_format.MessageToString(request, as_one_line=True) if request is not None else "(does not decode)"
    encoded = base64.b64encode(body).decode()
    return (
        f"{method.path} as {identity.name} (role {identity.role or '-'}, subject {identity.subject or '-'})"
        f"{f', metadata {metadata}'[:SHOWN_CHARS_MAX] if metadata else ''}\n"
        f"  request: {shown[:SHOWN_CHARS_MAX]}{' ...' if len(shown) > SHOWN_CHARS_MAX else ''}\n"
        f"  body ({len(body)} bytes, base64): {encoded if len(encoded) <= SHOWN_CHARS_MAX else encoded[:SHOWN_CHARS_MAX] + ' ...'}\n"
        f"  answer: {outcome.code.name}/{outcome.reason} {outcome.details[:300]!r}\n  problems: {outcome.problems}"
    )


def judge(identity: Identity, method: ps.Method, body: bytes, request, metadata, outcome: Outcome) -> None:
    if outcome.problems:
        pytest.fail(reproduction(identity, method, body, request, metadata, outcome), pytrace=False)


METHODS = ps.methods()


@pytest.mark.parametrize("method", METHODS, ids=str)
@pytest.mark.parametrize("identity_name", IDENTITIES)
def test_every_method_answers_every_identity_with_a_status(fuzz: Fuzz, identity_name: str, method: ps.Method) -> None:
    identity = fuzz.identities[identity_name]
    requests = ps.messages(method.input, fuzz.pools)

    @seed(SEED)
    @_settings(EXAMPLES)
    @given(data=st.data())
    def check(data) -> None:
        request = data.draw(requests, label="request")
        metadata = fuzz.metadata_for(identity, data)
        body = request.SerializeToString()
        judge(identity, method, body, request, metadata, fuzz.run(identity, method, body, request, metadata))

    check()


@pytest.mark.parametrize("method", METHODS, ids=str)
def test_raw_bodies_answer_with_a_status(fuzz: Fuzz, method: ps.Method) -> None:
    # The boundary batch sizes are the structured test's: cut and bit-flipped, 5,000 copies cost seconds each.
    bodies = ps.raw_requests(method.input, dataclasses.replace(fuzz.pools, repeated_boundary_sizes=()))

    @seed(SEED)
    @_settings(RAW_EXAMPLES)
    @given(data=st.data())
    def check(data) -> None:
        identity = fuzz.identities[data.draw(st.sampled_from(IDENTITIES), label="identity")]
        body = data.draw(bodies, label="body")
        metadata = fuzz.metadata_for(identity, data)
        try:
            request = method.request_class.FromString(body)
        except message.DecodeError:
            request = None
        outcome = fuzz.run(identity, method, body, request, metadata)
        if request is None and outcome.code == grpc.StatusCode.OK:
            outcome.problems.append("a body that does not decode was answered OK")
        judge(identity, method, body, request, metadata, outcome)

    check()


def _method(name: str) -> ps.Method:
    return next(m for m in METHODS if m.name == name)


# Page tokens that the fuzz found answered INTERNAL (client input reaching a Python or SQL
# error), kept as fixed cases so that they stay fixed: services/ledger/paging.py decodes the
# token's JSON without a bound on nesting (RecursionError), and takes JSON `true` for an int
# (bool is an int in Python), which PostgreSQL then refuses to compare with a bigint seq.
FORGED_PAGE_TOKENS = {
    "json nested 1000 deep": lambda account_id: _b64(("[" * 1_000 + "0" + "]" * 1_000).encode()),
    "before_seq true": lambda account_id: _b64(json.dumps({"account_id": account_id, "before_seq": True}).encode()),
    "before_seq false": lambda account_id: _b64(json.dumps({"account_id": account_id, "before_seq": False}).encode()),
    "before_seq past int64": lambda account_id: _b64(json.dumps({"account_id": account_id, "before_seq": 2**63}).encode()),
}


@pytest.mark.parametrize("case", sorted(FORGED_PAGE_TOKENS))
def test_forged_page_tokens_are_refused_as_invalid(fuzz: Fuzz, case: str) -> None:
    account_id = fuzz.pools.account_ids[0]  # the customer's main account: it has transfers to list
    request = accounts_pb2.ListAccountTransfersRequest(account_id=account_id, page_token=FORGED_PAGE_TOKENS[case](account_id))
    identity, method, body = fuzz.identities["admin"], _method("ListAccountTransfers"), request.SerializeToString()
    outcome = fuzz.run(identity, method, body, request, None)
    if (outcome.code, outcome.reason) != (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_PAGE_TOKEN"):
        outcome.problems.append("a forged page token must answer INVALID_ARGUMENT/INVALID_PAGE_TOKEN")
    judge(identity, method, body, request, None, outcome)


def test_a_body_over_the_message_cap_is_refused_and_changes_nothing(fuzz: Fuzz) -> None:
    """The documented exception: grpc refuses it with a bare RESOURCE_EXHAUSTED before corebank runs."""
    item = payments_pb2.TransferRequest(
        transfer_id=f"{fuzz.pools.fresh_prefix}-oversized", debit_account_id=fuzz.pools.account_ids[0],
        credit_account_id=fuzz.pools.account_ids[6], amount_minor=1, currency="USD", reference="x" * 256,
    )
    copies = MESSAGE_BYTES_MAX // item.ByteSize() + 1
    request = payments_pb2.CreateTransfersRequest(transfers=[item] * copies)
    identity, method, body = fuzz.identities["admin"], _method("CreateTransfers"), request.SerializeToString()
    assert len(body) > MESSAGE_BYTES_MAX
    outcome = fuzz.run(identity, method, body, request, None)
    if not outcome.oversized:
        outcome.problems.append(f"a body of {len(body)} bytes (cap {MESSAGE_BYTES_MAX}) answered {outcome.code.name}/{outcome.reason}")
    judge(identity, method, b"", request, None, outcome)
