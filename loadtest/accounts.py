"""Opening and funding a run's accounts, with the synchronous gRPC API.

Synchronous on purpose: locust's users run under gevent (where grpc.aio does
not mix), and the bench's asyncio preparers call it in a thread. Concurrency
comes from call futures, with a bounded number in flight.

Funding goes through `Payments.CreateTransfers` (thousands of transfers per
call); while a server answers UNIMPLEMENTED it falls back to concurrent
`Transfer` calls. Every customer is funded from a SYSTEM account on its own
shard, so funding never waits on transfers between shards.

Participants (the Clearing service): `open_participant_accounts` registers a run's
institutions as admin, sets their net debit caps, and opens and funds customers of each,
every one from a SYSTEM account *of its own participant* on its shard: funding is then
within one participant, never cleared, and the positions start at zero.
"""

from __future__ import annotations

import base64
import collections
import dataclasses
import json
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterable

import grpc
from corebank.v1 import (
    accounts_pb2, accounts_pb2_grpc, clearing_pb2, clearing_pb2_grpc, payments_pb2, payments_pb2_grpc, transfers_pb2,
)
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from services.auth.client import Target
from sharding.shard_map import ShardMap

CURRENCY = "USD"
# Tier 2: caps far above anything a load test moves (tier 0 would refuse after a few calls).
CUSTOMER_TIER = 2
# Tier 3 (verified businesses): no balance cap, so a flash sale never fills a merchant.
MERCHANT_TIER = 3
# 1,000.00 USD per customer; payments move at most 1.00, so no one runs dry in a run.
FUNDING_AMOUNT_MINOR = 100_000
TRANSFER_AMOUNT_MINOR_MAX = 100
# In-flight OpenAccount / Transfer calls during set-up: quick, without queueing for long.
SETUP_CONCURRENCY_MAX = 64
# Transfers per CreateTransfers call while funding; the API takes up to 5000.
FUNDING_BATCH_SIZE = 1000
CREATE_TRANSFERS_BATCH_SIZE_MAX = 5000
SETUP_CALL_TIMEOUT_SECONDS = 30.0
# Whole-call retries of an overloaded or unreachable service during set-up (same ids: idempotent).
SETUP_RETRY_ATTEMPTS_MAX = 8
SETUP_RETRY_DELAY_SECONDS_MIN = 0.1
SETUP_RETRY_DELAY_SECONDS_MAX = 2.0
# SYSTEM accounts are opened until each shard has one; with S shards that takes
# about S * ln(S) attempts, so this bound only trips on a broken map.
SYSTEM_ACCOUNT_ATTEMPTS_MAX = 256
ETCD_TIMEOUT_SECONDS = 5.0
SHARD_MAP_KEY = b"/corebank/shard_map"

# Outcome unknown or nothing recorded: the same request may be sent again.
RETRYABLE_CODES = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED,
     grpc.StatusCode.CANCELLED}
)  # fmt: skip


def new_run_id(prefix: str = "lt") -> str:
    """A fresh prefix for a run's idempotency keys: ids never collide across runs."""
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def load_shard_map(etcd_endpoint: str) -> ShardMap:
    """The slot map from etcd's JSON gateway: plain HTTP, so it works under gevent too."""
    body = json.dumps({"key": base64.b64encode(SHARD_MAP_KEY).decode()}).encode()
    request = urllib.request.Request(f"http://{etcd_endpoint}/v3/kv/range", data=body, method="POST")
    with urllib.request.urlopen(request, timeout=ETCD_TIMEOUT_SECONDS) as response:  # nosec B310 # a literal http:// URL to a cluster endpoint
        stored = json.load(response)
    if not stored.get("kvs"):
        raise SystemExit(f"no shard map in etcd at {etcd_endpoint}: is the cluster up?")
    return ShardMap.from_json(base64.b64decode(stored["kvs"][0]["value"]))


def error_reason(status_details) -> str | None:
    """The ErrorInfo reason from a google.rpc.Status's details, if any."""
    info = error_details_pb2.ErrorInfo()
    for detail in status_details:
        if detail.Unpack(info):
            return info.reason
    return None


def describe_rpc_error(error: grpc.RpcError) -> str:
    """`CODE/REASON` of a failed call (sync or aio), or `CODE` alone."""
    status = rpc_status.from_call(error)
    reason = error_reason(status.details) if status is not None else None
    return f"{error.code().name}/{reason}" if reason else error.code().name


def describe_result_error(status) -> str:
    """`CODE/REASON` of one CreateTransfers result's google.rpc.Status."""
    code = code_of(status.code)
    reason = error_reason(status.details)
    return f"{code.name}/{reason}" if reason else code.name


class SetupError(RuntimeError):
    pass


@dataclasses.dataclass
class AccountSet:
    """A run's accounts: plain ids, so it goes to JSON and into client processes."""

    run_id: str
    system_account_id_by_shard: dict[str, str]
    customer_account_ids_by_shard: dict[str, list[str]]
    merchant_account_ids: list[str] = dataclasses.field(default_factory=list)
    merchant_shard_by_id: dict[str, str] = dataclasses.field(default_factory=dict)
    # Funding transfers, acknowledged POSTED: (transfer_id, debit, credit, amount_minor).
    funding_transfers: list[tuple[str, str, str, int]] = dataclasses.field(default_factory=list)
    funding_path: str = ""
    # Participants of the run (open_participant_accounts), in order, and the participant of each
    # of its accounts (customers and the SYSTEM accounts that funded them).
    participant_ids: list[str] = dataclasses.field(default_factory=list)
    participant_by_account_id: dict[str, str] = dataclasses.field(default_factory=dict)
    # The net debit cap set for every participant in every currency (None: none set).
    net_debit_cap_minor: int | None = None

    @property
    def customer_account_ids(self) -> list[str]:
        return [account_id for ids in self.customer_account_ids_by_shard.values() for account_id in ids]

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> AccountSet:
        data = json.loads(text)
        data["funding_transfers"] = [tuple(row) for row in data.get("funding_transfers", [])]
        return cls(**data)


def _bounded_futures(starters: Iterable[Callable[[], grpc.Future]], limit: int) -> list:
    """Results of futures started at most `limit` at a time, in order; raises the first failure."""
    in_flight: collections.deque = collections.deque()
    results = []
    for start in starters:
        if len(in_flight) >= limit:
            results.append(in_flight.popleft().result())
        in_flight.append(start())
    while in_flight:
        results.append(in_flight.popleft().result())
    return results


def _with_retries(call: Callable[[], object], what: str):
    """`call()` again after a retryable failure, with doubling delay; bounded attempts."""
    delay_seconds = SETUP_RETRY_DELAY_SECONDS_MIN
    for attempt in range(1, SETUP_RETRY_ATTEMPTS_MAX + 1):
        try:
            return call()
        except grpc.RpcError as error:
            if error.code() not in RETRYABLE_CODES or attempt == SETUP_RETRY_ATTEMPTS_MAX:
                raise SetupError(f"{what}: {describe_rpc_error(error)}: {error.details()}") from None
        time.sleep(delay_seconds)
        delay_seconds = min(delay_seconds * 2, SETUP_RETRY_DELAY_SECONDS_MAX)
    raise AssertionError("unreachable")


class Setup:
    """Opens and funds accounts over one channel."""

    def __init__(self, channel: grpc.Channel, shard_map: ShardMap, run_id: str) -> None:
        self.accounts = accounts_pb2_grpc.AccountsStub(channel)
        self.payments = payments_pb2_grpc.PaymentsStub(channel)
        self.clearing = clearing_pb2_grpc.ClearingStub(channel)
        self.shard_map = shard_map
        # Customers opened for a participant: account_id -> participant_id.
        self.participant_of: dict[str, str] = {}
        self.run_id = run_id

    def shard_of(self, account_id: str) -> str:
        return self.shard_map.shard_name_for_key(account_id)

    def _open_requests(self, requests: list[accounts_pb2.OpenAccountRequest]) -> list[accounts_pb2.Account]:
        def starter(request):
            # Retried inside the future's consumer below would lose order; a failed
            # open is rare in set-up, so it is retried synchronously when it happens.
            future = self.accounts.OpenAccount.future(request, timeout=SETUP_CALL_TIMEOUT_SECONDS)
            return _RetryingFuture(future, lambda: self.accounts.OpenAccount(request, timeout=SETUP_CALL_TIMEOUT_SECONDS),
                                   f"OpenAccount {request.request_id}")

        return _bounded_futures((lambda r=r: starter(r) for r in requests), SETUP_CONCURRENCY_MAX)

    def open_system_accounts(self, participant_id: str = "") -> dict[str, str]:
        """A SYSTEM account on every shard (of `participant_id`; empty: the hosting bank's)."""
        wanted = {shard.name for shard in self.shard_map.shards}
        key = f"{self.run_id}:system:{participant_id}" if participant_id else f"{self.run_id}:system"
        by_shard: dict[str, str] = {}
        for attempt in range(SYSTEM_ACCOUNT_ATTEMPTS_MAX):
            if wanted <= by_shard.keys():
                break
            account = _with_retries(
                lambda attempt=attempt: self.accounts.OpenAccount(
                    accounts_pb2.OpenAccountRequest(
                        request_id=f"{key}:{attempt}", owner_id=f"{self.run_id}:bank",
                        currency=CURRENCY, kind=accounts_pb2.SYSTEM, tier=0, participant_id=participant_id,
                    ),
                    timeout=SETUP_CALL_TIMEOUT_SECONDS,
                ),
                "opening a SYSTEM account",
            )  # fmt: skip
            by_shard.setdefault(self.shard_of(account.account_id), account.account_id)
        missing = wanted - by_shard.keys()
        if missing:
            raise SetupError(f"no SYSTEM account landed on {sorted(missing)} in {SYSTEM_ACCOUNT_ATTEMPTS_MAX} tries")
        return by_shard

    def open_customers(self, count: int, participant_ids: list[str] | None = None) -> dict[str, list[str]]:
        """`count` customers; with `participant_ids`, the i-th belongs to participant_ids[i % len]."""
        requests = [
            accounts_pb2.OpenAccountRequest(
                request_id=f"{self.run_id}:customer:{index}", owner_id=f"{self.run_id}:owner:{index}",
                currency=CURRENCY, kind=accounts_pb2.CUSTOMER, tier=CUSTOMER_TIER,
                participant_id=participant_ids[index % len(participant_ids)] if participant_ids else "",
            )
            for index in range(count)
        ]  # fmt: skip
        by_shard: dict[str, list[str]] = {shard.name: [] for shard in self.shard_map.shards}
        for request, account in zip(requests, self._open_requests(requests)):
            by_shard[self.shard_of(account.account_id)].append(account.account_id)
            if request.participant_id:
                self.participant_of[account.account_id] = request.participant_id
        return by_shard

    def open_merchants(self, count: int, collect_on_every_shard: bool) -> list[str]:
        requests = [
            accounts_pb2.OpenAccountRequest(
                request_id=f"{self.run_id}:merchant:{index}", owner_id=f"{self.run_id}:merchant-owner:{index}",
                currency=CURRENCY, kind=accounts_pb2.MERCHANT, tier=MERCHANT_TIER,
                collect_on_every_shard=collect_on_every_shard,
            )
            for index in range(count)
        ]  # fmt: skip
        return [account.account_id for account in self._open_requests(requests)]

    def register_participant(self, participant_id: str, name: str, currencies: list[str]) -> None:
        _with_retries(
            lambda: self.clearing.RegisterParticipant(
                clearing_pb2.RegisterParticipantRequest(
                    request_id=f"{self.run_id}:participant:{participant_id}", participant_id=participant_id, name=name,
                    currencies=currencies,
                ),
                timeout=SETUP_CALL_TIMEOUT_SECONDS,
            ),
            f"RegisterParticipant {participant_id}",
        )  # fmt: skip

    def set_net_debit_cap(self, participant_id: str, currency: str, cap_minor: int) -> None:
        _with_retries(
            lambda: self.clearing.SetNetDebitCap(
                clearing_pb2.SetNetDebitCapRequest(participant_id=participant_id, currency=currency, cap_minor=cap_minor),
                timeout=SETUP_CALL_TIMEOUT_SECONDS,
            ),
            f"SetNetDebitCap {participant_id} {currency}",
        )

    def create_transfers(self, requests: list[payments_pb2.TransferRequest]) -> list[payments_pb2.TransferResult]:
        """One CreateTransfers call, retried whole while the service is overloaded or unreachable."""
        assert len(requests) <= CREATE_TRANSFERS_BATCH_SIZE_MAX
        response = _with_retries(
            lambda: self.payments.CreateTransfers(
                payments_pb2.CreateTransfersRequest(transfers=requests), timeout=SETUP_CALL_TIMEOUT_SECONDS
            ),
            f"CreateTransfers of {len(requests)}",
        )
        assert len(response.results) == len(requests), "CreateTransfers must answer every transfer, in order"
        return list(response.results)

    def post_all(self, requests: list[payments_pb2.TransferRequest]) -> str:
        """Post every transfer (set-up must not half-succeed); returns the path it took."""
        try:
            self._post_all_batched(requests)
            return "CreateTransfers"
        except SetupError as error:
            if "UNIMPLEMENTED" not in str(error):
                raise
        self._post_all_single(requests)
        return "Transfer (CreateTransfers is UNIMPLEMENTED)"

    def _post_all_batched(self, requests: list[payments_pb2.TransferRequest]) -> None:
        for start in range(0, len(requests), FUNDING_BATCH_SIZE):
            pending = requests[start : start + FUNDING_BATCH_SIZE]
            for _ in range(SETUP_RETRY_ATTEMPTS_MAX):
                results = self.create_transfers(pending)
                retry = []
                for request, result in zip(pending, results):
                    if result.HasField("error"):
                        if code_of(result.error.code) not in RETRYABLE_CODES:
                            raise SetupError(f"funding {request.transfer_id}: {describe_result_error(result.error)}")
                        retry.append(request)
                    elif result.transfer.status != transfers_pb2.POSTED:
                        retry.append(request)  # not final yet: asking again with the same id waits for it
                pending = retry
                if not pending:
                    break
                time.sleep(SETUP_RETRY_DELAY_SECONDS_MIN)
            if pending:
                raise SetupError(f"{len(pending)} funding transfers not posted after {SETUP_RETRY_ATTEMPTS_MAX} tries")

    def _post_all_single(self, requests: list[payments_pb2.TransferRequest]) -> None:
        def starter(request):
            future = self.payments.Transfer.future(request, timeout=SETUP_CALL_TIMEOUT_SECONDS)
            return _RetryingFuture(future, lambda: self.payments.Transfer(request, timeout=SETUP_CALL_TIMEOUT_SECONDS),
                                   f"Transfer {request.transfer_id}")

        for transfer in _bounded_futures((lambda r=r: starter(r) for r in requests), SETUP_CONCURRENCY_MAX):
            if transfer.status != transfers_pb2.POSTED:
                raise SetupError(f"funding {transfer.transfer_id} ended {transfers_pb2.TransferStatus.Name(transfer.status)}")

    def fund(self, system_by_shard: dict[str, str], customers_by_shard: dict[str, list[str]], amount_minor: int):
        requests = [
            payments_pb2.TransferRequest(
                transfer_id=f"{self.run_id}:fund:{account_id}", debit_account_id=system_by_shard[shard_name],
                credit_account_id=account_id, amount_minor=amount_minor, currency=CURRENCY, reference="load test funding",
            )
            for shard_name, ids in customers_by_shard.items()
            for account_id in ids
        ]  # fmt: skip
        path = self.post_all(requests)
        rows = [(r.transfer_id, r.debit_account_id, r.credit_account_id, r.amount_minor) for r in requests]
        return rows, path


def code_of(number: int) -> grpc.StatusCode:
    for code in grpc.StatusCode:
        if code.value[0] == number:
            return code
    return grpc.StatusCode.UNKNOWN


class _RetryingFuture:
    """A call future whose result() retries the call synchronously after a retryable failure."""

    def __init__(self, future: grpc.Future, again: Callable[[], object], what: str) -> None:
        self._future, self._again, self._what = future, again, what

    def result(self):
        try:
            return self._future.result()
        except grpc.RpcError as error:
            if error.code() not in RETRYABLE_CODES:
                raise SetupError(f"{self._what}: {describe_rpc_error(error)}: {error.details()}") from None
        return _with_retries(self._again, self._what)


def open_account_set(
    target: Target,
    etcd_endpoint: str,
    customer_count: int,
    merchant_count: int = 0,
    collect_on_every_shard: bool = False,
    run_id: str | None = None,
    funding_amount_minor: int = FUNDING_AMOUNT_MINOR,
    log: Callable[[str], None] = lambda line: None,
) -> AccountSet:
    """Open `customer_count` funded customers on all shards and `merchant_count` merchants."""
    run_id = run_id or new_run_id()
    shard_map = load_shard_map(etcd_endpoint)
    started = time.monotonic()
    with target.channel() as channel:
        grpc.channel_ready_future(channel).result(timeout=SETUP_CALL_TIMEOUT_SECONDS)
        setup = Setup(channel, shard_map, run_id)
        system_by_shard = setup.open_system_accounts()
        customers_by_shard = setup.open_customers(customer_count)
        merchants = setup.open_merchants(merchant_count, collect_on_every_shard) if merchant_count else []
        opened = time.monotonic()
        log(f"opened {customer_count} customers and {merchant_count} merchants in {opened - started:.1f} s")
        funding, path = setup.fund(system_by_shard, customers_by_shard, funding_amount_minor)
        log(f"funded {len(funding)} customers through {path} in {time.monotonic() - opened:.1f} s")
    return AccountSet(
        run_id=run_id,
        system_account_id_by_shard=system_by_shard,
        customer_account_ids_by_shard=customers_by_shard,
        merchant_account_ids=merchants,
        merchant_shard_by_id={account_id: shard_map.shard_name_for_key(account_id) for account_id in merchants},
        funding_transfers=funding,
        funding_path=path,
    )


@dataclasses.dataclass(frozen=True)
class ParticipantSpec:
    """An institution a run registers: its id suffix (after the run id), name and currencies."""

    suffix: str
    name: str
    currencies: tuple[str, ...]


def participant_id_of(run_id: str, suffix: str) -> str:
    """`<run id>.<suffix>`: fresh per run, 1..32 characters of [A-Za-z0-9._-]."""
    return f"{run_id}.{suffix}"


def open_participant_accounts(
    target: Target,
    etcd_endpoint: str,
    participants: list[ParticipantSpec],
    customer_count: int,
    net_debit_cap_minor: int | None,
    run_id: str | None = None,
    funding_amount_minor: int = FUNDING_AMOUNT_MINOR,
    log: Callable[[str], None] = lambda line: None,
) -> AccountSet:
    """Register `participants` (as admin: `target` must carry an admin token), set each one's
    net debit cap in every one of its currencies (None: no cap), and open `customer_count`
    funded customers dealt round-robin to them, on all shards."""
    run_id = run_id or new_run_id()
    shard_map = load_shard_map(etcd_endpoint)
    participant_ids = [participant_id_of(run_id, spec.suffix) for spec in participants]
    started = time.monotonic()
    with target.channel() as channel:
        grpc.channel_ready_future(channel).result(timeout=SETUP_CALL_TIMEOUT_SECONDS)
        setup = Setup(channel, shard_map, run_id)
        for participant_id, spec in zip(participant_ids, participants):
            setup.register_participant(participant_id, spec.name, list(spec.currencies))
            if net_debit_cap_minor is not None:
                for currency in spec.currencies:
                    setup.set_net_debit_cap(participant_id, currency, net_debit_cap_minor)
        system_by_participant = {participant_id: setup.open_system_accounts(participant_id) for participant_id in participant_ids}
        for participant_id, by_shard in system_by_participant.items():
            setup.participant_of.update(dict.fromkeys(by_shard.values(), participant_id))
        customers_by_shard = setup.open_customers(customer_count, participant_ids)
        opened = time.monotonic()
        log(f"registered {len(participant_ids)} participants, opened {customer_count} customers in {opened - started:.1f} s")
        funding, path = [], ""
        for participant_id in participant_ids:
            own = {shard_name: [a for a in ids if setup.participant_of.get(a) == participant_id]
                   for shard_name, ids in customers_by_shard.items()}  # fmt: skip
            rows, path = setup.fund(system_by_participant[participant_id], own, funding_amount_minor)
            funding += rows
        log(f"funded {len(funding)} customers through {path} in {time.monotonic() - opened:.1f} s")
    return AccountSet(
        run_id=run_id,
        system_account_id_by_shard=system_by_participant[participant_ids[0]] if participant_ids else {},
        customer_account_ids_by_shard=customers_by_shard,
        funding_transfers=funding,
        funding_path=path,
        participant_ids=participant_ids,
        participant_by_account_id=dict(setup.participant_of),
        net_debit_cap_minor=net_debit_cap_minor,
    )
