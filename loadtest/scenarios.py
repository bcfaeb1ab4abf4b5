"""corebank scenarios for the driver, and the account set-up they share.

A scenario is prepared once (accounts opened and funded over gRPC), then handed
to loadtest.driver.run_scenario, which may pickle it into client processes: so
it holds only plain data (ids), never a channel.

To add a row to the bench: write a dataclass with `name` and `call`, a
`prepare_...` coroutine that builds it from BenchAccounts, and register it in
SCENARIO_PREPARERS. All phases of one bench run share one set of funded
customers per size (loadtest.accounts opens and funds them once): the
`--customers` set, and issue 8's 200 accounts that uniform random pairs are
drawn from.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import itertools
import random
import sys
import uuid
from collections.abc import Awaitable, Callable

from corebank.v1 import payments_pb2

from loadtest.accounts import (
    CURRENCY,
    TRANSFER_AMOUNT_MINOR_MAX,
    AccountSet,
    Setup,
    describe_result_error,
    load_shard_map,
    open_account_set,
)
from loadtest.cluster import Cluster
from loadtest.driver import CALL_TIMEOUT_SECONDS, CallOutcome, Stubs

# Transfers per CreateTransfers call in the batch phase, unless --batch-size says otherwise.
BATCH_SIZE_DEFAULT = 1000
# Merchants the uniform phase spreads payments over: enough that no row is hot.
UNIFORM_MERCHANT_COUNT_DEFAULT = 64
CREATE_TRANSFERS_UNIFORM_SCENARIO = "corebank_create_transfers_uniform"
HALF_PEAK_SCENARIO = "corebank_latency_half_peak"
HALF_UNIFORM_PEAK_SCENARIO = "corebank_latency_half_uniform_peak"
# Issue 8's load tester: uniform random (debit, credit) pairs among 200 funded accounts on
# all shards. Funded with 1,000.00 each, paying at most 1.00 a transfer, an account's balance
# drifts by tens of dollars over a whole bench run: none runs dry.
PAIR_ACCOUNT_COUNT_DEFAULT = 200


def new_run_id() -> str:
    """A fresh prefix for this run's idempotency keys: ids never collide across runs."""
    return "bench-" + uuid.uuid4().hex[:12]


@dataclasses.dataclass(frozen=True)
class BenchAccounts:
    """Funded customer accounts of one run, grouped by the shard that holds them."""

    run_id: str
    system_account_id_by_shard: dict[str, str]
    customer_account_ids_by_shard: dict[str, tuple[str, ...]]


# One account set per bench run and size: opening and funding thousands of
# customers once, not once per phase, keeps `make bench` short.
_account_sets: dict[tuple[str, int], AccountSet] = {}


async def open_funded_customers(
    cluster: Cluster, run_id: str, customer_count: int, shard_names: set[str] | None = None
) -> BenchAccounts:
    """`customer_count` funded tier-2 customers, those on `shard_names` (all if None).

    Opened and funded once per bench process (loadtest.accounts: concurrent
    OpenAccount, funding through CreateTransfers from a SYSTEM account on each
    customer's own shard); later phases reuse them.
    """
    key = (cluster.grpc_endpoint, customer_count)
    if key not in _account_sets:
        _account_sets[key] = await asyncio.to_thread(
            open_account_set, cluster.target, cluster.etcd_endpoint, customer_count, run_id=run_id,
            log=lambda line: print(f"[bench] {line}", file=sys.stderr),
        )  # fmt: skip
    account_set = _account_sets[key]
    wanted = set(shard_names) if shard_names is not None else set(account_set.customer_account_ids_by_shard)
    return BenchAccounts(
        account_set.run_id,
        {name: account_set.system_account_id_by_shard[name] for name in wanted},
        {name: tuple(account_set.customer_account_ids_by_shard[name]) for name in wanted},
    )


async def transfer(stubs: Stubs, transfer_id: str, debit_account_id: str, credit_account_id: str, rng: random.Random) -> None:
    """One bench Transfer call of a small random amount."""
    await stubs.payments.Transfer(
        payments_pb2.TransferRequest(
            transfer_id=transfer_id, debit_account_id=debit_account_id, credit_account_id=credit_account_id,
            amount_minor=rng.randint(1, TRANSFER_AMOUNT_MINOR_MAX), currency=CURRENCY, reference="bench",
        ),
        timeout=CALL_TIMEOUT_SECONDS,
    )


@dataclasses.dataclass(frozen=True)
class SameShardTransfers:
    """Random customer -> customer transfers of small amounts, all on one shard."""

    run_id: str
    shard_name: str
    account_ids: tuple[str, ...]
    name: str = "corebank_same_shard"

    @property
    def notes(self) -> dict:
        return {"shard": self.shard_name, "accounts": len(self.account_ids)}

    async def call(self, stubs: Stubs, worker_label: str, sequence: int, rng: random.Random) -> None:
        debit_account_id, credit_account_id = rng.sample(self.account_ids, 2)
        await transfer(stubs, f"{self.run_id}:{worker_label}:{sequence}", debit_account_id, credit_account_id, rng)


@dataclasses.dataclass(frozen=True)
class UniformPairs:
    """Debit and credit drawn uniformly from one population, whatever their shards: with S
    shards of equal size, about (S - 1) / S of the pairs cross shards, as real traffic does."""

    account_ids_by_shard: tuple[tuple[str, ...], ...]
    account_ids: tuple[str, ...] = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        flattened = tuple(itertools.chain.from_iterable(self.account_ids_by_shard))
        if len(flattened) < 2:
            raise ValueError("uniform pairs need at least two accounts")
        object.__setattr__(self, "account_ids", flattened)

    def draw(self, rng: random.Random) -> tuple[str, str]:
        debit_account_id, credit_account_id = rng.sample(self.account_ids, 2)
        return debit_account_id, credit_account_id

    @property
    def cross_shard_share_expected(self) -> float:
        """The chance that a drawn pair's accounts live on two shards."""
        count = len(self.account_ids)
        same_shard_pairs = sum(len(ids) * (len(ids) - 1) for ids in self.account_ids_by_shard)
        return 1.0 - same_shard_pairs / (count * (count - 1))

    @property
    def notes(self) -> dict:
        return {"accounts_per_shard": [len(ids) for ids in self.account_ids_by_shard],
                "cross_shard_share_expected": round(self.cross_shard_share_expected, 3)}  # fmt: skip


@dataclasses.dataclass(frozen=True)
class UniformPairTransfers:
    """Single Transfer calls between uniform random pairs (issue 8's load tester)."""

    run_id: str
    pairs: UniformPairs
    name: str = "corebank_uniform_pairs"

    @property
    def notes(self) -> dict:
        return self.pairs.notes

    async def call(self, stubs: Stubs, worker_label: str, sequence: int, rng: random.Random) -> None:
        debit_account_id, credit_account_id = self.pairs.draw(rng)
        await transfer(stubs, f"{self.run_id}:{worker_label}:{sequence}", debit_account_id, credit_account_id, rng)


@dataclasses.dataclass(frozen=True)
class CrossShardTransfers:
    """Random customer -> customer transfers of small amounts, always between two shards (TCC)."""

    run_id: str
    account_ids_by_shard: tuple[tuple[str, ...], ...]
    name: str = "corebank_cross_shard"

    @property
    def notes(self) -> dict:
        return {"accounts_per_shard": [len(ids) for ids in self.account_ids_by_shard]}

    async def call(self, stubs: Stubs, worker_label: str, sequence: int, rng: random.Random) -> None:
        debit_shard, credit_shard = rng.sample(self.account_ids_by_shard, 2)
        await stubs.payments.Transfer(
            payments_pb2.TransferRequest(
                transfer_id=f"{self.run_id}:{worker_label}:{sequence}",
                debit_account_id=rng.choice(debit_shard),
                credit_account_id=rng.choice(credit_shard),
                amount_minor=rng.randint(1, TRANSFER_AMOUNT_MINOR_MAX),
                currency=CURRENCY,
                reference="bench",
            ),
            timeout=CALL_TIMEOUT_SECONDS,
        )


@dataclasses.dataclass(frozen=True)
class ShardPairs:
    """Both accounts on one shard, except `cross_shard_share` of the pairs, whose two accounts
    are on two shards."""

    account_ids_by_shard: tuple[tuple[str, ...], ...]
    cross_shard_share: float

    def draw(self, rng: random.Random) -> tuple[str, str]:
        if len(self.account_ids_by_shard) > 1 and rng.random() < self.cross_shard_share:
            debit_shard, credit_shard = rng.sample(self.account_ids_by_shard, 2)
            return rng.choice(debit_shard), rng.choice(credit_shard)
        debit_account_id, credit_account_id = rng.sample(rng.choice(self.account_ids_by_shard), 2)
        return debit_account_id, credit_account_id

    @property
    def notes(self) -> dict:
        return {"cross_shard_share": self.cross_shard_share,
                "accounts_per_shard": [len(ids) for ids in self.account_ids_by_shard]}  # fmt: skip


@dataclasses.dataclass(frozen=True)
class CreateTransfersBatches:
    """CreateTransfers calls of `batch_size` customer -> customer transfers between `pairs`."""

    run_id: str
    pairs: ShardPairs | UniformPairs
    batch_size: int
    name: str = "corebank_create_transfers"

    @property
    def notes(self) -> dict:
        return {"batch_size": self.batch_size, **self.pairs.notes}

    async def call(self, stubs: Stubs, worker_label: str, sequence: int, rng: random.Random) -> CallOutcome:
        requests = []
        for index in range(self.batch_size):
            debit_account_id, credit_account_id = self.pairs.draw(rng)
            requests.append(
                payments_pb2.TransferRequest(
                    transfer_id=f"{self.run_id}:{worker_label}:{sequence}:{index}", debit_account_id=debit_account_id,
                    credit_account_id=credit_account_id, amount_minor=rng.randint(1, TRANSFER_AMOUNT_MINOR_MAX),
                    currency=CURRENCY, reference="bench batch",
                )
            )  # fmt: skip
        response = await stubs.payments.CreateTransfers(
            payments_pb2.CreateTransfersRequest(transfers=requests), timeout=CALL_TIMEOUT_SECONDS
        )
        errors: collections.Counter = collections.Counter()
        for result in response.results:
            if result.HasField("error"):
                errors[describe_result_error(result.error)] += 1
        return CallOutcome(len(response.results) - sum(errors.values()), dict(errors))


@dataclasses.dataclass(frozen=True)
class MerchantPayments:
    """Buyers on every shard paying merchants: one collect_on_every_shard merchant
    (the flash sale), or many ordinary ones chosen uniformly (the same load spread out)."""

    run_id: str
    buyer_account_ids: tuple[str, ...]
    merchant_account_ids: tuple[str, ...]
    name: str

    @property
    def notes(self) -> dict:
        return {"buyers": len(self.buyer_account_ids), "merchants": len(self.merchant_account_ids)}

    async def call(self, stubs: Stubs, worker_label: str, sequence: int, rng: random.Random) -> None:
        await stubs.payments.Transfer(
            payments_pb2.TransferRequest(
                transfer_id=f"{self.run_id}:{worker_label}:{sequence}",
                debit_account_id=rng.choice(self.buyer_account_ids),
                credit_account_id=rng.choice(self.merchant_account_ids),
                amount_minor=rng.randint(1, TRANSFER_AMOUNT_MINOR_MAX),
                currency=CURRENCY,
                reference="bench payment",
            ),
            timeout=CALL_TIMEOUT_SECONDS,
        )


@dataclasses.dataclass(frozen=True)
class PrepareOptions:
    customer_count: int
    shard_name: str
    batch_size: int = BATCH_SIZE_DEFAULT
    # Share of CreateTransfers' transfers that cross shards (0: all same-shard).
    batch_cross_shard_share: float = 0.0
    uniform_merchant_count: int = UNIFORM_MERCHANT_COUNT_DEFAULT
    pair_account_count: int = PAIR_ACCOUNT_COUNT_DEFAULT


async def prepare_same_shard_transfers(cluster: Cluster, options: PrepareOptions) -> SameShardTransfers:
    run_id = new_run_id()
    accounts = await open_funded_customers(cluster, run_id, options.customer_count, {options.shard_name})
    account_ids = accounts.customer_account_ids_by_shard[options.shard_name]
    if len(account_ids) < 2:
        raise SystemExit(
            f"only {len(account_ids)} of {options.customer_count} customers landed on {options.shard_name}"
        )
    return SameShardTransfers(run_id, options.shard_name, account_ids)


async def prepare_cross_shard_transfers(cluster: Cluster, options: PrepareOptions) -> CrossShardTransfers:
    run_id = new_run_id()
    accounts = await open_funded_customers(cluster, run_id, options.customer_count)
    populated = tuple(ids for ids in accounts.customer_account_ids_by_shard.values() if ids)
    if len(populated) < 2:
        raise SystemExit("cross-shard transfers need customers on at least two shards")
    return CrossShardTransfers(run_id, populated)


async def prepare_create_transfers(cluster: Cluster, options: PrepareOptions) -> CreateTransfersBatches:
    run_id = new_run_id()
    accounts = await open_funded_customers(cluster, run_id, options.customer_count)
    populated = tuple(ids for ids in accounts.customer_account_ids_by_shard.values() if len(ids) >= 2)
    return CreateTransfersBatches(run_id, ShardPairs(populated, options.batch_cross_shard_share), options.batch_size)


async def _uniform_pairs(cluster: Cluster, run_id: str, options: PrepareOptions) -> UniformPairs:
    accounts = await open_funded_customers(cluster, run_id, options.pair_account_count)
    return UniformPairs(tuple(ids for ids in accounts.customer_account_ids_by_shard.values() if ids))


async def prepare_uniform_pair_transfers(cluster: Cluster, options: PrepareOptions) -> UniformPairTransfers:
    run_id = new_run_id()
    return UniformPairTransfers(run_id, await _uniform_pairs(cluster, run_id, options))


async def prepare_create_transfers_uniform(cluster: Cluster, options: PrepareOptions) -> CreateTransfersBatches:
    run_id = new_run_id()
    pairs = await _uniform_pairs(cluster, run_id, options)
    return CreateTransfersBatches(run_id, pairs, options.batch_size, name=CREATE_TRANSFERS_UNIFORM_SCENARIO)


def _open_merchants(cluster: Cluster, run_id: str, count: int, collect_on_every_shard: bool) -> tuple[str, ...]:
    # The synchronous API (loadtest.accounts): this runs in a thread, outside the event loop.
    with cluster.target.channel() as channel:
        setup = Setup(channel, load_shard_map(cluster.etcd_endpoint), run_id)
        return tuple(setup.open_merchants(count, collect_on_every_shard))


async def _prepare_merchant_payments(
    cluster: Cluster, options: PrepareOptions, name: str, merchant_count: int, collect_on_every_shard: bool
) -> MerchantPayments:
    run_id = new_run_id()
    accounts = await open_funded_customers(cluster, run_id, options.customer_count)
    buyers = tuple(account_id for ids in accounts.customer_account_ids_by_shard.values() for account_id in ids)
    merchants = await asyncio.to_thread(_open_merchants, cluster, run_id, merchant_count, collect_on_every_shard)
    return MerchantPayments(run_id, buyers, merchants, name)


async def prepare_flash_sale(cluster: Cluster, options: PrepareOptions) -> MerchantPayments:
    return await _prepare_merchant_payments(cluster, options, "corebank_flash_sale", 1, collect_on_every_shard=True)


async def prepare_uniform(cluster: Cluster, options: PrepareOptions) -> MerchantPayments:
    return await _prepare_merchant_payments(
        cluster, options, "corebank_uniform", options.uniform_merchant_count, collect_on_every_shard=False
    )


# Scenario name -> coroutine that prepares it. The bench runs them in this order, closed loop.
SCENARIO_PREPARERS: dict[str, Callable[[Cluster, PrepareOptions], Awaitable]] = {
    SameShardTransfers.name: prepare_same_shard_transfers,
    CrossShardTransfers.name: prepare_cross_shard_transfers,
    CreateTransfersBatches.name: prepare_create_transfers,
    "corebank_flash_sale": prepare_flash_sale,
    "corebank_uniform": prepare_uniform,
    UniformPairTransfers.name: prepare_uniform_pair_transfers,
    CREATE_TRANSFERS_UNIFORM_SCENARIO: prepare_create_transfers_uniform,
}
# Rows whose callers each send one batch of transfers: fewer of them (the bench's --batch-clients).
BATCH_SCENARIOS = frozenset({CreateTransfersBatches.name, CREATE_TRANSFERS_UNIFORM_SCENARIO})
# Open-loop latency rows -> the closed-loop row that prepares their calls and whose peak rate,
# halved, is their arrival rate. The bench runs them after every closed-loop row.
HALF_PEAK_OF = {
    HALF_PEAK_SCENARIO: SameShardTransfers.name,
    HALF_UNIFORM_PEAK_SCENARIO: UniformPairTransfers.name,
}
