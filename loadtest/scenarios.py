"""corebank scenarios for the driver, and the account set-up they share.

A scenario is prepared once (accounts opened and funded over gRPC), then handed
to loadtest.driver.run_scenario, which may pickle it into client processes: so
it holds only plain data (ids), never a channel.

To add a row to the bench (cross-shard, batch, flash sale): write a dataclass
with `name` and `call`, a `prepare_...` coroutine that builds it from
BenchAccounts, and register it in SCENARIO_PREPARERS.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import random
import uuid
from collections.abc import Awaitable, Callable

import grpc
from corebank.v1 import accounts_pb2, payments_pb2

from loadtest.cluster import Cluster
from loadtest.driver import (
    CALL_TIMEOUT_SECONDS,
    CHANNEL_READY_TIMEOUT_SECONDS,
    Stubs,
    describe_error,
)

CURRENCY = "USD"
# Tier 2: caps far above anything a bench moves (tier 0 would refuse after a few calls).
CUSTOMER_TIER = 2
# 1,000.00 USD per customer; transfers move at most 1.00, so no one runs dry.
FUNDING_AMOUNT_MINOR = 100_000
TRANSFER_AMOUNT_MINOR_MAX = 100
# In-flight set-up calls; enough to be quick, few enough not to queue for long.
SETUP_CONCURRENCY_MAX = 32
# Funding debits one SYSTEM row per shard, so more in flight only waits on its lock.
FUNDING_CONCURRENCY_MAX = 8
# SYSTEM accounts are opened until each wanted shard has one; with S shards that
# takes about S * ln(S) attempts, so this bound only trips on a broken map.
SYSTEM_ACCOUNT_ATTEMPTS_MAX = 256


def new_run_id() -> str:
    """A fresh prefix for this run's idempotency keys: ids never collide across runs."""
    return "bench-" + uuid.uuid4().hex[:12]


async def load_shard_map(cluster: Cluster):
    from sharding import etcd_shard_map

    client = etcd_shard_map.etcd_client(cluster.etcd_endpoint)
    try:
        shard_map = await etcd_shard_map.load(client)
    finally:
        await client.close()
    if shard_map is None:
        raise SystemExit(f"no shard map in etcd at {cluster.etcd_endpoint}: is the cluster up?")
    return shard_map


async def _bounded(limit: int, starters: list[Callable[[], Awaitable]]) -> list:
    """Run at most `limit` at a time. Starters, not awaitables: a grpc.aio call
    object starts its RPC when it is created, so creating it is what must wait."""
    semaphore = asyncio.Semaphore(limit)

    async def one(start: Callable[[], Awaitable]):
        async with semaphore:
            return await start()

    return await asyncio.gather(*(one(start) for start in starters))


@dataclasses.dataclass(frozen=True)
class BenchAccounts:
    """Funded customer accounts of one run, grouped by the shard that holds them."""

    run_id: str
    system_account_id_by_shard: dict[str, str]
    customer_account_ids_by_shard: dict[str, tuple[str, ...]]


async def open_funded_customers(
    cluster: Cluster, run_id: str, customer_count: int, shard_names: set[str] | None = None
) -> BenchAccounts:
    """Open `customer_count` tier-2 customers and keep those on `shard_names` (all if None).

    Each kept customer is funded from a SYSTEM account on its own shard, so
    funding never depends on cross-shard transfers.
    """
    shard_map = await load_shard_map(cluster)
    wanted = set(shard_names) if shard_names is not None else {shard.name for shard in shard_map.shards}
    async with grpc.aio.insecure_channel(cluster.grpc_endpoint) as channel:
        await asyncio.wait_for(channel.channel_ready(), CHANNEL_READY_TIMEOUT_SECONDS)
        stubs = Stubs.for_channel(channel)

        system_by_shard: dict[str, str] = {}
        for attempt in range(SYSTEM_ACCOUNT_ATTEMPTS_MAX):
            if wanted <= system_by_shard.keys():
                break
            account = await stubs.accounts.OpenAccount(
                accounts_pb2.OpenAccountRequest(
                    request_id=f"{run_id}:system:{attempt}",
                    owner_id=f"{run_id}:bank",
                    currency=CURRENCY,
                    kind=accounts_pb2.SYSTEM,
                    tier=0,
                ),
                timeout=CALL_TIMEOUT_SECONDS,
            )
            system_by_shard.setdefault(shard_map.shard_name_for_key(account.account_id), account.account_id)
        missing = wanted - system_by_shard.keys()
        assert not missing, f"no SYSTEM account landed on {sorted(missing)} in {SYSTEM_ACCOUNT_ATTEMPTS_MAX} tries"

        def open_customer(index: int) -> Awaitable:
            return stubs.accounts.OpenAccount(
                accounts_pb2.OpenAccountRequest(
                    request_id=f"{run_id}:customer:{index}",
                    owner_id=f"{run_id}:owner:{index}",
                    currency=CURRENCY,
                    kind=accounts_pb2.CUSTOMER,
                    tier=CUSTOMER_TIER,
                ),
                timeout=CALL_TIMEOUT_SECONDS,
            )

        opened = await _bounded(
            SETUP_CONCURRENCY_MAX,
            [functools.partial(open_customer, index) for index in range(customer_count)],
        )
        customers_by_shard: dict[str, list[str]] = {name: [] for name in wanted}
        for account in opened:
            shard_name = shard_map.shard_name_for_key(account.account_id)
            if shard_name in wanted:
                customers_by_shard[shard_name].append(account.account_id)

        async def fund(shard_name: str, account_id: str) -> None:
            try:
                await stubs.payments.Transfer(
                    payments_pb2.TransferRequest(
                        transfer_id=f"{run_id}:fund:{account_id}",
                        debit_account_id=system_by_shard[shard_name],
                        credit_account_id=account_id,
                        amount_minor=FUNDING_AMOUNT_MINOR,
                        currency=CURRENCY,
                        reference="bench funding",
                    ),
                    timeout=CALL_TIMEOUT_SECONDS,
                )
            except grpc.aio.AioRpcError as error:
                raise RuntimeError(f"funding {account_id} failed: {describe_error(error)}: {error.details()}") from None

        await _bounded(
            FUNDING_CONCURRENCY_MAX,
            [
                functools.partial(fund, shard_name, account_id)
                for shard_name, ids in customers_by_shard.items()
                for account_id in ids
            ],
        )
    return BenchAccounts(
        run_id,
        {name: system_by_shard[name] for name in wanted},
        {name: tuple(ids) for name, ids in customers_by_shard.items()},
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
        await stubs.payments.Transfer(
            payments_pb2.TransferRequest(
                transfer_id=f"{self.run_id}:{worker_label}:{sequence}",
                debit_account_id=debit_account_id,
                credit_account_id=credit_account_id,
                amount_minor=rng.randint(1, TRANSFER_AMOUNT_MINOR_MAX),
                currency=CURRENCY,
                reference="bench",
            ),
            timeout=CALL_TIMEOUT_SECONDS,
        )


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
class PrepareOptions:
    customer_count: int
    shard_name: str


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


# Scenario name -> coroutine that prepares it. The bench runs them in this order.
SCENARIO_PREPARERS: dict[str, Callable[[Cluster, PrepareOptions], Awaitable]] = {
    SameShardTransfers.name: prepare_same_shard_transfers,
    CrossShardTransfers.name: prepare_cross_shard_transfers,
}
