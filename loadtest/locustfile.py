"""corebank load scenarios for locust, selected by the SCENARIO environment variable.

    SCENARIO=flash-sale USERS=200 DURATION=60s make loadtest        (see loadtest/run.py)
    SCENARIO=everyday .venv/bin/locust -f loadtest/locustfile.py --headless -u 50 -r 50 -t 30s

Scenarios:
- `flash-sale`: buyers on every shard pay ONE merchant, opened with
  collect_on_every_shard; a spike LoadTestShape (base load, ramp to peak in
  seconds, hold, drop back, end).
- `everyday`: transfers among many customers, CROSS_SHARD_SHARE of them between
  shards, plus balance reads (READ_SHARE of the tasks).
- `batch`: clients calling CreateTransfers with BATCH_SIZE transfers per call.

Set-up (opening and funding the accounts) runs in locust's `init` event, before
any user starts and before `-t` starts counting. Every transfer sent is logged
with its outcome, and the log is written at the end to
$LOADTEST_OUTPUT_PREFIX-transfers.csv (with the accounts in -setup.json), for
loadtest.check to verify against the databases. One locust process only: the
log and the accounts live in this process (no --processes, no workers).
"""

from __future__ import annotations

import grpc.experimental.gevent as grpc_gevent

# Before any channel exists: grpc's sync API must block greenlets, not the whole process.
grpc_gevent.init_gevent()

import csv  # noqa: E402
import itertools  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import pathlib  # noqa: E402
import random  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402

import gevent  # noqa: E402
import grpc  # noqa: E402
from corebank.v1 import accounts_pb2, accounts_pb2_grpc, payments_pb2, payments_pb2_grpc, transfers_pb2  # noqa: E402
from locust import LoadTestShape, User, constant, events, task  # noqa: E402
from locust.runners import LocalRunner  # noqa: E402

# Importable when locust runs this file by path from the repository root.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from loadtest import accounts as setup_accounts  # noqa: E402
from loadtest.cluster import load_cluster  # noqa: E402

SCENARIOS = ("flash-sale", "everyday", "batch")
SCENARIO = os.environ.get("SCENARIO", "flash-sale")
if SCENARIO not in SCENARIOS:
    raise SystemExit(f"SCENARIO={SCENARIO!r}: pick one of {', '.join(SCENARIOS)}")


def _env_int(name: str, default: int) -> int:
    return int(os.environ.get(name) or default)


def _env_float(name: str, default: float) -> float:
    return float(os.environ.get(name) or default)


# Accounts of a run. Buyers / customers are spread over all shards by their ids.
ACCOUNTS = _env_int("ACCOUNTS", 2000)
CROSS_SHARD_SHARE = _env_float("CROSS_SHARD_SHARE", 0.3 if SCENARIO == "everyday" else 0.0)
READ_SHARE = _env_float("READ_SHARE", 0.25)
BATCH_SIZE = _env_int("BATCH_SIZE", 500)
# Connections shared by all users of the process: thousands of users need not
# mean thousands of TCP connections, and several reach every service worker.
CHANNEL_COUNT = _env_int("CHANNELS", 8)
CALL_TIMEOUT_SECONDS = _env_float("CALL_TIMEOUT_SECONDS", 10.0)
# Pause between a user's calls; 0 is a closed loop (each user waits only for its answer).
WAIT_SECONDS = _env_float("WAIT_SECONDS", 0.0)
OUTPUT_PREFIX = os.environ.get("LOADTEST_OUTPUT_PREFIX", "")

assert 0.0 <= CROSS_SHARD_SHARE <= 1.0 and 0.0 <= READ_SHARE < 1.0, "shares are fractions"
assert 1 <= BATCH_SIZE <= setup_accounts.CREATE_TRANSFERS_BATCH_SIZE_MAX, "BATCH_SIZE is 1..5000"

# Outcome of every transfer this process sent, for loadtest.check.
SENT, POSTED, REFUSED, UNKNOWN = "sent", "posted", "refused", "unknown"
# A call that failed with these may still have been applied (or may be later): the checker asks.
OUTCOME_UNKNOWN_CODES = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED,
     grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL}
)  # fmt: skip


class TransferLog:
    """transfer_id -> [debit, credit, amount_minor, outcome, code]; written once at the end."""

    def __init__(self) -> None:
        self.rows: dict[str, list] = {}

    def sent(self, request: payments_pb2.TransferRequest) -> None:
        self.rows[request.transfer_id] = [
            request.debit_account_id, request.credit_account_id, request.amount_minor, SENT, ""
        ]

    def outcome(self, transfer_id: str, outcome: str, code: str = "") -> None:
        row = self.rows[transfer_id]
        row[3], row[4] = outcome, code

    def write(self, path: pathlib.Path) -> None:
        temporary = path.with_suffix(".tmp")
        with temporary.open("w", newline="") as file:
            writer = csv.writer(file)
            writer.writerow(["transfer_id", "debit_account_id", "credit_account_id", "amount_minor", "outcome", "code"])
            for transfer_id, row in self.rows.items():
                writer.writerow([transfer_id, *row])
        temporary.replace(path)


TRANSFER_LOG = TransferLog()


class Run:
    """What the init event prepared: accounts and channels, shared by every user."""

    accounts: setup_accounts.AccountSet | None = None
    # Lists built once from `accounts`, since every task picks from them.
    customer_account_ids: list[str] = []
    customer_account_ids_by_shard: list[list[str]] = []
    shard_by_account_id: dict[str, str] = {}
    channels: list[grpc.Channel] = []
    user_numbers = itertools.count()
    setup_done_monotonic: float = 0.0


def _open_accounts(environment) -> setup_accounts.AccountSet:
    cluster = load_cluster()
    flash_sale = SCENARIO == "flash-sale"
    return setup_accounts.open_account_set(
        cluster.target,
        cluster.etcd_endpoint,
        customer_count=ACCOUNTS,
        merchant_count=1 if flash_sale else 0,
        collect_on_every_shard=flash_sale,
        run_id=setup_accounts.new_run_id(SCENARIO),
        log=lambda line: print(f"[loadtest] {SCENARIO}: {line}", file=sys.stderr, flush=True),
    )


@events.init.add_listener
def _on_init(environment, **_kwargs) -> None:
    if not isinstance(environment.runner, LocalRunner):
        raise SystemExit("corebank's locustfile runs in one local process (no --processes, --master or --worker)")
    Run.accounts = _open_accounts(environment)
    Run.customer_account_ids = Run.accounts.customer_account_ids
    Run.customer_account_ids_by_shard = [ids for ids in Run.accounts.customer_account_ids_by_shard.values() if ids]
    Run.shard_by_account_id = {
        account_id: shard_name
        for shard_name, ids in Run.accounts.customer_account_ids_by_shard.items()
        for account_id in ids
    }
    traffic = load_cluster().traffic_target()
    # A local subchannel pool per channel keeps them on separate connections, so
    # SO_REUSEPORT spreads them over the service's worker processes.
    Run.channels = [
        traffic.channel(options=[("grpc.use_local_subchannel_pool", 1)]) for _ in range(CHANNEL_COUNT)
    ]
    for channel in Run.channels:
        grpc.channel_ready_future(channel).result(timeout=CALL_TIMEOUT_SECONDS)
    if OUTPUT_PREFIX:
        pathlib.Path(f"{OUTPUT_PREFIX}-setup.json").write_text(
            json.dumps({"scenario": SCENARIO, "accounts": json.loads(Run.accounts.to_json())}) + "\n"
        )
    Run.setup_done_monotonic = time.monotonic()


_log_written = threading.Lock()


@events.quitting.add_listener
def _on_quitting(environment, **_kwargs) -> None:
    if OUTPUT_PREFIX and _log_written.acquire(blocking=False):
        TRANSFER_LOG.write(pathlib.Path(f"{OUTPUT_PREFIX}-transfers.csv"))
        counts: dict[str, int] = {}
        for row in TRANSFER_LOG.rows.values():
            counts[row[3]] = counts.get(row[3], 0) + 1
        print(f"[loadtest] {SCENARIO}: transfers by outcome {counts}", file=sys.stderr, flush=True)


class GrpcFailure(Exception):
    """A failed call as locust shows it: the gRPC code and the ErrorInfo reason."""


class GrpcUser(User):
    """Calls through the shared channels; each call is reported to locust with its gRPC code."""

    abstract = True
    wait_time = constant(WAIT_SECONDS)

    def on_start(self) -> None:
        self.number = next(Run.user_numbers)
        channel = Run.channels[self.number % len(Run.channels)]
        self.accounts = accounts_pb2_grpc.AccountsStub(channel)
        self.payments = payments_pb2_grpc.PaymentsStub(channel)
        self.rng = random.Random()
        self.sequence = itertools.count()
        self.run_id = Run.accounts.run_id

    def new_transfer_id(self) -> str:
        return f"{self.run_id}:u{self.number}:{next(self.sequence)}"

    def call(self, method: str, stub_method, request, response_length=None):
        """Make one call and report it; returns the response, or None after reporting a failure."""
        started = time.perf_counter()
        try:
            response = stub_method(request, timeout=CALL_TIMEOUT_SECONDS)
        except grpc.RpcError as error:
            described = setup_accounts.describe_rpc_error(error)
            self.environment.events.request.fire(
                request_type="grpc", name=method, response_time=(time.perf_counter() - started) * 1000,
                response_length=0, exception=GrpcFailure(described), context={"code": error.code().name},
            )  # fmt: skip
            self.last_error = error
            return None
        self.environment.events.request.fire(
            request_type="grpc", name=method, response_time=(time.perf_counter() - started) * 1000,
            response_length=response.ByteSize() if response_length is None else response_length(response),
            exception=None, context={"code": "OK"},
        )  # fmt: skip
        return response

    def transfer(self, debit_account_id: str, credit_account_id: str, amount_minor: int, name: str = "Transfer") -> bool:
        """One Transfer, logged; True when it was acknowledged POSTED."""
        request = payments_pb2.TransferRequest(
            transfer_id=self.new_transfer_id(), debit_account_id=debit_account_id,
            credit_account_id=credit_account_id, amount_minor=amount_minor,
            currency=setup_accounts.CURRENCY, reference=f"locust {SCENARIO}",
        )  # fmt: skip
        TRANSFER_LOG.sent(request)
        transfer = self.call(name, self.payments.Transfer, request)
        if transfer is not None:
            posted = transfer.status == transfers_pb2.POSTED
            TRANSFER_LOG.outcome(request.transfer_id, POSTED if posted else UNKNOWN, transfers_pb2.TransferStatus.Name(transfer.status))
            return posted
        code = self.last_error.code()
        outcome = UNKNOWN if code in OUTCOME_UNKNOWN_CODES else REFUSED
        TRANSFER_LOG.outcome(request.transfer_id, outcome, setup_accounts.describe_rpc_error(self.last_error))
        return False


def _pick_pair(rng: random.Random) -> tuple[str, str]:
    """Two customers: on two shards with probability CROSS_SHARD_SHARE, else on one."""
    by_shard = Run.customer_account_ids_by_shard
    if len(by_shard) > 1 and rng.random() < CROSS_SHARD_SHARE:
        debit_shard, credit_shard = rng.sample(by_shard, 2)
        return rng.choice(debit_shard), rng.choice(credit_shard)
    shard = rng.choice([ids for ids in by_shard if len(ids) >= 2])
    debit_account_id, credit_account_id = rng.sample(shard, 2)
    return debit_account_id, credit_account_id


if SCENARIO == "flash-sale":
    # The spike, in seconds after set-up (locust's own clock includes set-up).
    PEAK_USERS = _env_int("PEAK_USERS", _env_int("USERS", 100))
    BASE_USERS = _env_int("BASE_USERS", max(1, PEAK_USERS // 20))
    DURATION_SECONDS = _env_float("DURATION_SECONDS", 60.0)
    RAMP_SECONDS = _env_float("RAMP_SECONDS", 3.0)
    # Share of the duration before the spike, and at peak; the rest is the drop back to base.
    BEFORE_SHARE = _env_float("BEFORE_SHARE", 0.2)
    HOLD_SHARE = _env_float("HOLD_SHARE", 0.6)
    assert BEFORE_SHARE + HOLD_SHARE <= 1.0 and RAMP_SECONDS >= 0 and PEAK_USERS >= BASE_USERS >= 1

    # How often the merchant's balance is read during the run, to check it against the payments.
    MERCHANT_SAMPLE_INTERVAL_SECONDS = _env_float("MERCHANT_SAMPLE_INTERVAL_SECONDS", 1.0)

    class MerchantTotals:
        """Running sums of payments to the merchant: sent (an upper bound on what may have
        posted) and acknowledged POSTED (a lower bound on what has)."""

        sent_minor = 0
        acknowledged_minor = 0
        # (seconds since set-up, acknowledged before the read, balance, collecting, sent after the read)
        samples: list[tuple[float, int, int, int, int]] = []
        watcher = None

    class FlashSaleBuyer(GrpcUser):
        """Buyers on every shard paying the one merchant."""

        @task
        def pay(self) -> None:
            buyer_account_id = self.rng.choice(Run.customer_account_ids)
            amount_minor = self.rng.randint(1, setup_accounts.TRANSFER_AMOUNT_MINOR_MAX)
            # Counted as sent before the call: from then on it may post at any moment.
            MerchantTotals.sent_minor += amount_minor
            merchant_account_id = Run.accounts.merchant_account_ids[0]
            if self.transfer(buyer_account_id, merchant_account_id, amount_minor, name="Transfer (payment)"):
                MerchantTotals.acknowledged_minor += amount_minor

    def _watch_merchant() -> None:
        """Every MERCHANT_SAMPLE_INTERVAL_SECONDS, read the merchant. Its balance + collecting
        must lie between the payments acknowledged before the read and those sent by its
        end: at no moment is money missing from, or added to, the merchant, sweeps or not."""
        stub = accounts_pb2_grpc.AccountsStub(Run.channels[0])
        request = accounts_pb2.GetAccountRequest(account_id=Run.accounts.merchant_account_ids[0])
        while True:
            acknowledged_minor = MerchantTotals.acknowledged_minor
            try:
                account = stub.GetAccount(request, timeout=CALL_TIMEOUT_SECONDS)
            except grpc.RpcError:
                gevent.sleep(MERCHANT_SAMPLE_INTERVAL_SECONDS)
                continue
            MerchantTotals.samples.append(
                (time.monotonic() - Run.setup_done_monotonic, acknowledged_minor, account.balance_minor,
                 account.collecting_minor, MerchantTotals.sent_minor)
            )  # fmt: skip
            gevent.sleep(MERCHANT_SAMPLE_INTERVAL_SECONDS)

    @events.test_start.add_listener
    def _start_merchant_watch(environment, **_kwargs) -> None:
        if MerchantTotals.watcher is None:
            MerchantTotals.watcher = gevent.spawn(_watch_merchant)

    @events.quitting.add_listener
    def _write_merchant_samples(environment, **_kwargs) -> None:
        if MerchantTotals.watcher is not None:
            MerchantTotals.watcher.kill()
        if OUTPUT_PREFIX:
            with open(f"{OUTPUT_PREFIX}-merchant.csv", "w", newline="") as file:
                writer = csv.writer(file)
                writer.writerow(["seconds", "acknowledged_minor", "balance_minor", "collecting_minor", "sent_minor"])
                writer.writerows(MerchantTotals.samples)

    class SpikeShape(LoadTestShape):
        """Base load, a ramp to PEAK_USERS in RAMP_SECONDS, hold, drop back to base, end."""

        def tick(self):
            if not Run.setup_done_monotonic:
                return BASE_USERS, BASE_USERS
            elapsed = time.monotonic() - Run.setup_done_monotonic
            spike_at = DURATION_SECONDS * BEFORE_SHARE
            drop_at = spike_at + DURATION_SECONDS * HOLD_SHARE
            # Spawn the whole step within the ramp: that is what makes it a spike.
            spawn_rate = max(1.0, (PEAK_USERS - BASE_USERS) / max(RAMP_SECONDS, 0.1))
            if elapsed >= DURATION_SECONDS:
                return None
            if spike_at <= elapsed < drop_at:
                return PEAK_USERS, spawn_rate
            return BASE_USERS, spawn_rate


if SCENARIO == "everyday":

    class EverydayCustomer(GrpcUser):
        """Payments among customers, some between shards, and balance reads."""

        @task
        def step(self) -> None:
            if self.rng.random() < READ_SHARE:
                account_id = self.rng.choice(Run.customer_account_ids)
                self.call("GetAccount", self.accounts.GetAccount, accounts_pb2.GetAccountRequest(account_id=account_id))
                return
            debit_account_id, credit_account_id = _pick_pair(self.rng)
            cross = Run.shard_by_account_id[debit_account_id] != Run.shard_by_account_id[credit_account_id]
            amount_minor = self.rng.randint(1, setup_accounts.TRANSFER_AMOUNT_MINOR_MAX)
            self.transfer(debit_account_id, credit_account_id, amount_minor, name="Transfer (cross-shard)" if cross else "Transfer")


if SCENARIO == "batch":

    class BatchClient(GrpcUser):
        """CreateTransfers with BATCH_SIZE transfers among customers (CROSS_SHARD_SHARE between shards).

        One locust request per call (its response_length is the number of
        transfers); each refused transfer inside an answered call is also
        reported, as a `CreateTransfers item` failure with its code."""

        @task
        def batch(self) -> None:
            requests = []
            for _ in range(BATCH_SIZE):
                debit_account_id, credit_account_id = _pick_pair(self.rng)
                requests.append(
                    payments_pb2.TransferRequest(
                        transfer_id=self.new_transfer_id(), debit_account_id=debit_account_id,
                        credit_account_id=credit_account_id,
                        amount_minor=self.rng.randint(1, setup_accounts.TRANSFER_AMOUNT_MINOR_MAX),
                        currency=setup_accounts.CURRENCY, reference="locust batch",
                    )
                )  # fmt: skip
            for request in requests:
                TRANSFER_LOG.sent(request)
            response = self.call(
                "CreateTransfers", self.payments.CreateTransfers,
                payments_pb2.CreateTransfersRequest(transfers=requests),
                response_length=lambda response: len(response.results),
            )  # fmt: skip
            if response is None:
                code = self.last_error.code()
                # RESOURCE_EXHAUSTED: nothing was recorded; the others may have been applied.
                outcome = REFUSED if code in (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNIMPLEMENTED,
                                              grpc.StatusCode.INVALID_ARGUMENT) else UNKNOWN  # fmt: skip
                for request in requests:
                    TRANSFER_LOG.outcome(request.transfer_id, outcome, setup_accounts.describe_rpc_error(self.last_error))
                return
            for request, result in zip(requests, response.results):
                if result.HasField("error"):
                    described = setup_accounts.describe_result_error(result.error)
                    code = setup_accounts.code_of(result.error.code)
                    TRANSFER_LOG.outcome(request.transfer_id, UNKNOWN if code in OUTCOME_UNKNOWN_CODES else REFUSED, described)
                    self.environment.events.request.fire(
                        request_type="grpc", name="CreateTransfers item", response_time=0, response_length=0,
                        exception=GrpcFailure(described), context={"code": code.name},
                    )  # fmt: skip
                elif result.transfer.status == transfers_pb2.POSTED:
                    TRANSFER_LOG.outcome(request.transfer_id, POSTED, "POSTED")
                else:
                    TRANSFER_LOG.outcome(request.transfer_id, UNKNOWN, transfers_pb2.TransferStatus.Name(result.transfer.status))

