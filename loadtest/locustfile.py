"""corebank load scenarios for locust, selected by the SCENARIO environment variable.

    SCENARIO=flash-sale USERS=200 DURATION=60s make loadtest     headless, then the verdict (loadtest/run.py)
    WORKERS=2 make loadtest                                       the same, one master and 2 worker processes
    SCENARIO=everyday .venv/bin/locust -f loadtest/locustfile.py  locust's web UI, http://localhost:8089

Scenarios:
- `flash-sale`: buyers on every shard pay ONE merchant, opened with
  collect_on_every_shard; a spike LoadTestShape (base load, ramp to peak in
  seconds, hold, drop back, end), timed from Start.
- `everyday`: transfers among many customers, CROSS_SHARD_SHARE of them between
  shards, plus balance reads (READ_SHARE of the tasks).
- `batch`: clients calling CreateTransfers with BATCH_SIZE transfers per call.
- `remittance`: PARTICIPANTS wallets of different countries (registered by the set-up, each
  with a net debit cap of NET_DEBIT_CAP_MINOR in every currency), ACCOUNTS customers dealt
  to them; users pay each other, across wallets (the first wallet sends HEAVY_SENDER_WEIGHT
  times as often as each other: it runs into its cap) and SAME_PARTICIPANT_SHARE within one,
  while one operator user closes the settlement window every CLOSE_WINDOW_SECONDS and, every
  SETTLE_EVERY_CLOSES closes, settles the closed windows (DEFERRED_NET) and records every
  participant settled. NET_DEBIT_CAP_EXCEEDED is a business answer: counted apart under its
  own name, not as a failure.

The host (--host, or the web UI's Host field) names the cluster: empty for
$COREBANK_STATE_DIR's, a state folder or its cluster.json, or grpcs://HOST:PORT
(loadtest/swarm.py).

Set-up (opening and funding the accounts) runs on test_start in the master, or in
the only process: once per cluster, so a second Start reuses the accounts; never
in a worker. The master sends the accounts to every worker (a custom message)
before its users start, and to a worker that connects later.

Every transfer sent is logged with its outcome. When every user has stopped
(test_stop), each worker sends its last statistics and then its log to the
master, which waits for all of them (bounded) before it writes the run folder's
files (loadtest/swarm.py); a single process writes them at once. The log covers
every start since the accounts were set up, for loadtest.check.
"""

from __future__ import annotations

import grpc.experimental.gevent as grpc_gevent

# Before any channel exists: grpc's sync API must block greenlets, not the whole process.
grpc_gevent.init_gevent()

import dataclasses  # noqa: E402
import itertools  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import pathlib  # noqa: E402
import random  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402

import gevent  # noqa: E402
import gevent.lock  # noqa: E402
import grpc  # noqa: E402
from corebank.v1 import (  # noqa: E402
    accounts_pb2, accounts_pb2_grpc, clearing_pb2, clearing_pb2_grpc, payments_pb2, payments_pb2_grpc, transfers_pb2,
)
from locust import LoadTestShape, User, constant, events, task  # noqa: E402
from locust.exception import StopUser  # noqa: E402
from locust.runners import STATE_CLEANUP, STATE_RUNNING, STATE_SPAWNING, MasterRunner, WorkerRunner  # noqa: E402

# Importable when locust runs this file by path from the repository root.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from loadtest import accounts as setup_accounts  # noqa: E402
from loadtest import swarm  # noqa: E402
from loadtest.swarm import POSTED, REFUSED, UNKNOWN, env_float, env_int  # noqa: E402
from services.auth import auth_dir, tokens  # noqa: E402
from services.auth.client import Target  # noqa: E402
from services.ledger.access import Role  # noqa: E402

SCENARIO = os.environ.get("SCENARIO", "flash-sale")
if SCENARIO not in swarm.SCENARIOS:
    raise SystemExit(f"SCENARIO={SCENARIO!r}: pick one of {', '.join(swarm.SCENARIOS)}")

# Accounts of a run. Buyers / customers are spread over all shards by their ids.
ACCOUNTS = env_int("ACCOUNTS", 2000)
CROSS_SHARD_SHARE = env_float("CROSS_SHARD_SHARE", 0.3 if SCENARIO == "everyday" else 0.0)
READ_SHARE = env_float("READ_SHARE", 0.25)
BATCH_SIZE = env_int("BATCH_SIZE", 500)
# Connections shared by all users of the process: thousands of users need not
# mean thousands of TCP connections, and several reach every service worker.
CHANNEL_COUNT = env_int("CHANNELS", 8)
CHANNEL_READY_TIMEOUT_SECONDS = 10.0
CALL_TIMEOUT_SECONDS = env_float("CALL_TIMEOUT_SECONDS", 10.0)
# Pause between a user's calls; 0 is a closed loop (each user waits only for its answer).
WAIT_SECONDS = env_float("WAIT_SECONDS", 0.0)
# Where the run's files go (loadtest.run sets it); else a new reports/<scenario>-<time>/ per account set.
OUTPUT_DIR = os.environ.get("LOADTEST_OUTPUT_DIR", "")

assert 0.0 <= CROSS_SHARD_SHARE <= 1.0 and 0.0 <= READ_SHARE < 1.0, "shares are fractions"

# The remittance scenario's wallets (the models), in order; PARTICIPANTS takes the first ones.
# Transfers are in the corridor currency (USD); each also has its local currency, capped too.
REMITTANCE_WALLETS = (
    setup_accounts.ParticipantSpec("hk", "Hong Kong wallet (model: AlipayHK)", ("USD", "HKD")),
    setup_accounts.ParticipantSpec("ph", "Philippines wallet (model: GCash)", ("USD", "PHP")),
    setup_accounts.ParticipantSpec("id", "Indonesia wallet (model: Dana)", ("USD", "IDR")),
    setup_accounts.ParticipantSpec("my", "Malaysia wallet (model: Touch 'n Go)", ("USD", "MYR")),
    setup_accounts.ParticipantSpec("sg", "Singapore wallet", ("USD", "SGD")),
    setup_accounts.ParticipantSpec("th", "Thailand wallet", ("USD", "THB")),
)
PARTICIPANTS = env_int("PARTICIPANTS", 4)
# 200.00 USD: the first wallet, sending twice as much as it receives, reaches it within seconds
# of a window at a few hundred transfers a second, and a settlement brings it back down.
NET_DEBIT_CAP_MINOR = env_int("NET_DEBIT_CAP_MINOR", 20_000)
HEAVY_SENDER_WEIGHT = env_float("HEAVY_SENDER_WEIGHT", 2.0)
SAME_PARTICIPANT_SHARE = env_float("SAME_PARTICIPANT_SHARE", 0.2)
CLOSE_WINDOW_SECONDS = env_float("CLOSE_WINDOW_SECONDS", 3.0)
SETTLE_EVERY_CLOSES = env_int("SETTLE_EVERY_CLOSES", 3)
OPERATOR_SUBJECT = "loadtest-settlement-operator"
assert 2 <= PARTICIPANTS <= len(REMITTANCE_WALLETS), f"PARTICIPANTS is 2..{len(REMITTANCE_WALLETS)}"
assert 0.0 <= SAME_PARTICIPANT_SHARE <= 1.0 and HEAVY_SENDER_WEIGHT > 0 and SETTLE_EVERY_CLOSES >= 1
assert NET_DEBIT_CAP_MINOR >= 0 and CLOSE_WINDOW_SECONDS > 0
# Refusals that are the bank's business answer, not a failure: counted under their own name.
NET_DEBIT_CAP_EXCEEDED = "NET_DEBIT_CAP_EXCEEDED"
assert 1 <= BATCH_SIZE <= setup_accounts.CREATE_TRANSFERS_BATCH_SIZE_MAX, "BATCH_SIZE is 1..5000"

# A call that failed with these may still have been applied (or may be later): the checker asks.
OUTCOME_UNKNOWN_CODES = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED,
     grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL}
)  # fmt: skip
# Locust request names of the calls that carry one transfer each, and of the batch call. A call
# refused with a business answer is named `<name>: <REASON>` (refused_call_name).
TRANSFER_CALL_NAMES = ("Transfer", "Transfer (payment)", "Transfer (cross-shard)", "Transfer (cross-participant)",
                       "Transfer (same participant)")  # fmt: skip
BATCH_CALL_NAME = "CreateTransfers"


def refused_call_name(name: str, reason: str) -> str:
    return f"{name}: {reason}"


def is_transfer_call(name: str) -> bool:
    return name in TRANSFER_CALL_NAMES or name.split(": ")[0] in TRANSFER_CALL_NAMES

# Custom messages between the master and its workers.
PLAN_MESSAGE = "corebank_plan"  # master -> worker: the accounts to use (swarm.Plan)
STOP_MESSAGE = "corebank_stop_and_report"  # master -> worker: stop your users if they run, then report
LOG_MESSAGE = "corebank_transfer_log"  # worker -> master: rows of its transfer log, the last part marked
# A worker's log of a long run goes in parts of bounded size.
LOG_ROWS_PER_MESSAGE_MAX = 10_000
# How long the master waits for the workers' logs after test_stop, beyond the stop timeout
# (locust itself waits the stop timeout + 60 s for its workers to stop).
LOG_GATHER_SLACK_SECONDS = 60.0
LOG_GATHER_POLL_SECONDS = 0.1

log = logging.getLogger("corebank.loadtest")


class Run:
    """This process's part of the swarm: the plan and what is built from it, and the log."""

    plan: swarm.Plan | None = None
    setup_lock = gevent.lock.Semaphore()
    channels: list[grpc.Channel] = []
    # Remittance: a channel with an operator's token (closing windows, creating settlements).
    operator_channel: grpc.Channel | None = None
    channels_key = ""
    # Lists built once from the plan's accounts, since every task picks from them.
    customer_account_ids: list[str] = []
    customer_account_ids_by_shard: list[list[str]] = []
    shard_by_account_id: dict[str, str] = {}
    # Remittance: each participant's customers, in the plan's participant order.
    account_ids_by_participant: list[list[str]] = []
    transfer_log = swarm.TransferLog()
    # Set in the init event, i.e. after locust's --processes forks: transfer ids of two processes never meet.
    process_tag = ""
    user_numbers = itertools.count()
    # Master: the workers of this start, and those whose log has arrived.
    workers_expected: set[str] = set()
    workers_reported: set[str] = set()
    # Worker: whether its log went to the master since its users last started.
    reported = False
    # Flash sale, in the master or the only process: (read_started_at, read_ended_at, balance, collecting).
    merchant_samples: list[tuple[float, float, int, int]] = []
    merchant_watcher: gevent.Greenlet | None = None


def _at(target: Target, address: str | None) -> Target:
    return target if address is None else dataclasses.replace(target, address=address)


def _use_plan(plan: swarm.Plan) -> None:
    """Take the plan's accounts, and channels to its cluster made in this process (after any fork)."""
    accounts = plan.accounts
    Run.customer_account_ids = accounts.customer_account_ids
    Run.customer_account_ids_by_shard = [ids for ids in accounts.customer_account_ids_by_shard.values() if ids]
    Run.shard_by_account_id = {
        account_id: shard_name for shard_name, ids in accounts.customer_account_ids_by_shard.items() for account_id in ids
    }
    Run.account_ids_by_participant = [
        [account_id for account_id in Run.customer_account_ids if accounts.participant_by_account_id.get(account_id) == participant_id]
        for participant_id in accounts.participant_ids
    ]  # fmt: skip
    if Run.channels_key != plan.host_key:
        for channel in Run.channels + ([Run.operator_channel] if Run.operator_channel else []):
            channel.close()
        Run.operator_channel = None
        # Each process mints its own token from the cluster's key: none travels between locust processes.
        traffic = _at(plan.host_target().cluster().traffic_target(), plan.address)
        # A local subchannel pool per channel keeps them on separate connections, so
        # SO_REUSEPORT spreads them over the service's worker processes.
        Run.channels = [traffic.channel(options=[("grpc.use_local_subchannel_pool", 1)]) for _ in range(CHANNEL_COUNT)]
        for channel in Run.channels:
            grpc.channel_ready_future(channel).result(timeout=CHANNEL_READY_TIMEOUT_SECONDS)
        if SCENARIO == "remittance":
            cluster = plan.host_target().cluster()
            token = tokens.mint(auth_dir(cluster.raw["state_dir"]), Role.OPERATOR, OPERATOR_SUBJECT, tokens.TOKEN_TTL_SECONDS_MAX)
            Run.operator_channel = _at(cluster.target.acting_as(token), plan.address).channel()
        Run.channels_key = plan.host_key
    Run.plan = plan


def _set_up(host: str | None) -> swarm.Plan:
    """The plan for the cluster `host` names: its accounts opened and funded at the first start against it."""
    host_target = swarm.resolve_host(host)
    with Run.setup_lock:
        if Run.plan is not None and Run.plan.host_key == host_target.key:
            return Run.plan
        Run.plan = None
        cluster = host_target.cluster()
        flash_sale = SCENARIO == "flash-sale"
        log_line = lambda line: print(f"[loadtest] {SCENARIO}: {line}", file=sys.stderr, flush=True)  # noqa: E731
        if SCENARIO == "remittance":
            # As admin (cluster.json's token): registering participants and setting caps are admin's.
            accounts = setup_accounts.open_participant_accounts(
                _at(cluster.target, host_target.address), cluster.etcd_endpoint, list(REMITTANCE_WALLETS[:PARTICIPANTS]),
                ACCOUNTS, NET_DEBIT_CAP_MINOR, run_id=setup_accounts.new_run_id("rem"), log=log_line,
            )  # fmt: skip
        else:
            accounts = setup_accounts.open_account_set(
                _at(cluster.target, host_target.address), cluster.etcd_endpoint, customer_count=ACCOUNTS,
                merchant_count=1 if flash_sale else 0, collect_on_every_shard=flash_sale,
                run_id=setup_accounts.new_run_id(SCENARIO), log=log_line,
            )  # fmt: skip
        folder = pathlib.Path(OUTPUT_DIR) if OUTPUT_DIR else swarm.new_run_folder(cluster.state_dir, SCENARIO)
        folder.mkdir(parents=True, exist_ok=True)
        plan = swarm.Plan(host_target.key, SCENARIO, str(host_target.cluster_file), host_target.address, accounts, str(folder))
        (folder / swarm.SETUP_FILE).write_text(json.dumps(plan.to_message()) + "\n")
        Run.transfer_log = swarm.TransferLog()
        Run.merchant_samples = []
        _use_plan(plan)
        print(f"[loadtest] {SCENARIO}: run folder {folder}", file=sys.stderr, flush=True)
        return plan


@events.init.add_listener
def _on_init(environment, runner, **_kwargs) -> None:
    Run.process_tag = uuid.uuid4().hex[:6]
    if isinstance(runner, WorkerRunner):
        runner.register_message(PLAN_MESSAGE, _on_plan)
        # Concurrent: stopping the users waits up to the stop timeout; the message loop must go on.
        runner.register_message(STOP_MESSAGE, _on_stop_request, concurrent=True)
    elif isinstance(runner, MasterRunner):
        runner.register_message(LOG_MESSAGE, _on_log_part)
        environment.events.worker_connect.add_listener(lambda client_id, **_kw: _greet_worker(runner, client_id))


def _greet_worker(runner: MasterRunner, client_id: str) -> None:
    """A worker connected: it gets the accounts before any spawn message, and, joining a run, is waited for."""
    if Run.plan is not None:
        runner.send_message(PLAN_MESSAGE, Run.plan.to_message(), client_id)
        if runner.state in (STATE_SPAWNING, STATE_RUNNING):
            Run.workers_expected.add(client_id)


def _on_plan(environment, msg, **_kwargs) -> None:
    _use_plan(swarm.Plan.from_message(msg.data))


@events.test_start.add_listener
def _on_test_start(environment, **_kwargs) -> None:
    runner = environment.runner
    if isinstance(runner, WorkerRunner):
        Run.reported = False
        return
    try:
        plan = _set_up(environment.host)
    except (SystemExit, Exception) as error:  # a wrong host, a cluster down: say so and end this start
        log.error("[loadtest] set-up failed, stopping: %s", error)
        gevent.spawn(runner.stop)
        return
    if isinstance(runner, MasterRunner):
        Run.workers_expected = {node.id for node in runner.clients.ready + runner.clients.spawning + runner.clients.running}
        Run.workers_reported = set()
        runner.send_message(PLAN_MESSAGE, plan.to_message())
    if SCENARIO == "flash-sale" and Run.merchant_watcher is None:
        Run.merchant_watcher = gevent.spawn(_watch_merchant, plan.accounts.merchant_account_ids[0])
    if environment.shape_class is not None:
        # The shape's clock starts here: at Start, once the accounts are ready (set-up is not load).
        environment.shape_class.reset_time()


@events.test_stop.add_listener
def _on_test_stop(environment, **_kwargs) -> None:
    """Every user of this process has stopped (locust fires test_stop after stopping them)."""
    runner = environment.runner
    if isinstance(runner, WorkerRunner):
        _report_to_master(runner)
        return
    if Run.merchant_watcher is not None:
        Run.merchant_watcher.kill()
        Run.merchant_watcher = None
    if Run.plan is None:
        return
    missing = _gather_worker_logs(environment) if isinstance(runner, MasterRunner) else []
    _write_run_files(environment, missing)


def _report_to_master(runner: WorkerRunner) -> None:
    if Run.reported:
        return
    Run.reported = True
    # Statistics first, on the same ordered channel: once the master has a worker's whole log, it
    # has all of that worker's figures too (otherwise they would come with the next 3-second report).
    runner._send_stats()
    rows = Run.transfer_log.drain()
    parts = list(swarm.chunks(rows, LOG_ROWS_PER_MESSAGE_MAX))
    for index, part in enumerate(parts):
        runner.send_message(LOG_MESSAGE, {"rows": part, "last": index == len(parts) - 1})


def _on_stop_request(environment, msg, **_kwargs) -> None:
    """The master's test_stop came while this worker may still run users: when locust quits a
    headless run (-t, or the shape's end), the master stops without telling its workers first."""
    runner = environment.runner
    if Run.reported or runner.state == STATE_CLEANUP:
        return  # reported already, or a stop is under way, and its test_stop reports
    if runner.state in (STATE_SPAWNING, STATE_RUNNING):
        runner.stop()  # its test_stop reports
    else:
        _report_to_master(runner)


def _on_log_part(environment, msg, **_kwargs) -> None:
    Run.transfer_log.merge(msg.data["rows"])
    if msg.data["last"]:
        Run.workers_reported.add(msg.node_id)


def _gather_worker_logs(environment) -> list[str]:
    """Wait for the log of every worker of this start; returns the workers whose log never came."""
    runner = environment.runner
    for client_id in Run.workers_expected - Run.workers_reported:
        runner.send_message(STOP_MESSAGE, None, client_id)
    deadline = time.monotonic() + (environment.stop_timeout or 0.0) + LOG_GATHER_SLACK_SECONDS
    while not Run.workers_expected <= Run.workers_reported and time.monotonic() < deadline:
        gevent.sleep(LOG_GATHER_POLL_SECONDS)
    missing = sorted(Run.workers_expected - Run.workers_reported)
    if missing:
        log.error("[loadtest] no transfer log from workers %s: the totals miss their part", missing)
    return missing


def _write_run_files(environment, workers_missing: list[str]) -> None:
    folder = pathlib.Path(Run.plan.output_dir)
    Run.transfer_log.write(folder / swarm.TRANSFERS_FILE)
    if SCENARIO == "flash-sale":
        swarm.write_merchant_samples(folder / swarm.MERCHANT_FILE, Run.merchant_samples)
    stats = environment.stats
    calls_by_name: dict[str, int] = {}
    for entry in stats.entries.values():
        calls_by_name[entry.name] = calls_by_name.get(entry.name, 0) + entry.num_requests
    transfers_called = sum(count for name, count in calls_by_name.items() if is_transfer_call(name))
    transfers_called += calls_by_name.get(BATCH_CALL_NAME, 0) * BATCH_SIZE
    swarm.Totals(
        requests=stats.total.num_requests,
        failures=stats.total.num_failures,
        p99_ms=stats.total.get_response_time_percentile(0.99) if stats.total.num_requests else None,
        exceptions=sum(row["count"] for row in environment.runner.exceptions.values()),
        calls_by_name=calls_by_name,
        transfers_called=transfers_called,
        workers=len(Run.workers_expected),
        workers_missing=workers_missing,
    ).write(folder / swarm.TOTALS_FILE)
    print(f"[loadtest] {SCENARIO}: transfers by outcome {Run.transfer_log.counts()}; "
          f"check them: python -m loadtest.check {folder}", file=sys.stderr, flush=True)  # fmt: skip


class GrpcFailure(Exception):
    """A failed call as locust shows it: the gRPC code and the ErrorInfo reason."""


class GrpcUser(User):
    """Calls through the process's channels; each call is reported to locust with its gRPC code."""

    abstract = True
    wait_time = constant(WAIT_SECONDS)
    # What the web UI's Host field shows first: the cluster of $COREBANK_STATE_DIR.
    host = str(swarm.default_cluster_file())

    def on_start(self) -> None:
        if Run.plan is None:
            log.error("[loadtest] no accounts: the set-up failed, or the master's plan has not come")
            raise StopUser()
        self.number = next(Run.user_numbers)
        channel = Run.channels[self.number % len(Run.channels)]
        self.accounts = accounts_pb2_grpc.AccountsStub(channel)
        self.payments = payments_pb2_grpc.PaymentsStub(channel)
        self.rng = random.Random()
        self.sequence = itertools.count()
        self.transfer_id_prefix = f"{Run.plan.accounts.run_id}:{Run.process_tag}:u{self.number}"

    def new_transfer_id(self) -> str:
        return f"{self.transfer_id_prefix}:{next(self.sequence)}"

    def call(self, method: str, stub_method, request, response_length=None, business_refusals: frozenset = frozenset()):
        """Make one call and report it; returns the response, or None after reporting a failure.

        A refusal whose ErrorInfo reason is in `business_refusals` is the bank's answer, not a
        failure: reported as a success named refused_call_name(method, reason) (it still returns None)."""
        started = time.perf_counter()
        try:
            response = stub_method(request, timeout=CALL_TIMEOUT_SECONDS)
        except grpc.RpcError as error:
            described = setup_accounts.describe_rpc_error(error)
            reason = described.partition("/")[2]
            expected = reason in business_refusals
            self.environment.events.request.fire(
                request_type="grpc", name=refused_call_name(method, reason) if expected else method,
                response_time=(time.perf_counter() - started) * 1000, response_length=0,
                exception=None if expected else GrpcFailure(described), context={"code": error.code().name},
            )  # fmt: skip
            self.last_error = error
            return None
        self.environment.events.request.fire(
            request_type="grpc", name=method, response_time=(time.perf_counter() - started) * 1000,
            response_length=response.ByteSize() if response_length is None else response_length(response),
            exception=None, context={"code": "OK"},
        )  # fmt: skip
        return response

    def transfer(
        self, debit_account_id: str, credit_account_id: str, amount_minor: int, name: str = "Transfer",
        business_refusals: frozenset = frozenset(),
    ) -> bool:
        """One Transfer, logged; True when it was acknowledged POSTED."""
        request = payments_pb2.TransferRequest(
            transfer_id=self.new_transfer_id(), debit_account_id=debit_account_id,
            credit_account_id=credit_account_id, amount_minor=amount_minor,
            currency=setup_accounts.CURRENCY, reference=f"locust {SCENARIO}",
        )  # fmt: skip
        # Logged as sent before the call: from then on it may post at any moment.
        Run.transfer_log.sent(request.transfer_id, debit_account_id, credit_account_id, amount_minor, time.time())
        transfer = self.call(name, self.payments.Transfer, request, business_refusals=business_refusals)
        answered_at = time.time()
        if transfer is not None:
            posted = transfer.status == transfers_pb2.POSTED
            status = transfers_pb2.TransferStatus.Name(transfer.status)
            Run.transfer_log.answered(request.transfer_id, POSTED if posted else UNKNOWN, status, answered_at)
            return posted
        outcome = UNKNOWN if self.last_error.code() in OUTCOME_UNKNOWN_CODES else REFUSED
        Run.transfer_log.answered(request.transfer_id, outcome, setup_accounts.describe_rpc_error(self.last_error), answered_at)
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


# How often the merchant's balance is read during a flash sale, to check it against the payments.
MERCHANT_SAMPLE_INTERVAL_SECONDS = env_float("MERCHANT_SAMPLE_INTERVAL_SECONDS", 1.0)


def _watch_merchant(merchant_account_id: str) -> None:
    """Every MERCHANT_SAMPLE_INTERVAL_SECONDS, read the merchant, noting when the read began and
    ended. loadtest.check bounds its balance + collecting by the payments answered POSTED before
    the read began and those sent before it ended, from every process's log: at no moment is
    money missing from, or added to, the merchant, sweeps or not."""
    stub = accounts_pb2_grpc.AccountsStub(Run.channels[0])
    request = accounts_pb2.GetAccountRequest(account_id=merchant_account_id)
    while True:
        read_started_at = time.time()
        try:
            account = stub.GetAccount(request, timeout=CALL_TIMEOUT_SECONDS)
        except grpc.RpcError:
            gevent.sleep(MERCHANT_SAMPLE_INTERVAL_SECONDS)
            continue
        Run.merchant_samples.append((read_started_at, time.time(), account.balance_minor, account.collecting_minor))
        gevent.sleep(MERCHANT_SAMPLE_INTERVAL_SECONDS)


if SCENARIO == "flash-sale":
    # The spike, in seconds after Start (set-up excluded).
    PEAK_USERS = env_int("PEAK_USERS", env_int("USERS", 100))
    BASE_USERS = env_int("BASE_USERS", max(1, PEAK_USERS // 20))
    DURATION_SECONDS = env_float("DURATION_SECONDS", 60.0)
    RAMP_SECONDS = env_float("RAMP_SECONDS", 3.0)
    # Share of the duration before the spike, and at peak; the rest is the drop back to base.
    BEFORE_SHARE = env_float("BEFORE_SHARE", 0.2)
    HOLD_SHARE = env_float("HOLD_SHARE", 0.6)
    assert BEFORE_SHARE + HOLD_SHARE <= 1.0 and RAMP_SECONDS >= 0 and PEAK_USERS >= BASE_USERS >= 1
    # The run ends once the drop back to base is over, or this long past the duration: stopping
    # users while locust is still stopping some for the drop makes it stop a user twice (it raises).
    DROP_WAIT_SECONDS_MAX = 30.0

    class FlashSaleBuyer(GrpcUser):
        """Buyers on every shard paying the one merchant."""

        @task
        def pay(self) -> None:
            buyer_account_id = self.rng.choice(Run.customer_account_ids)
            amount_minor = self.rng.randint(1, setup_accounts.TRANSFER_AMOUNT_MINOR_MAX)
            self.transfer(buyer_account_id, Run.plan.accounts.merchant_account_ids[0], amount_minor, name="Transfer (payment)")

    class SpikeShape(LoadTestShape):
        """Base load, a ramp to PEAK_USERS in RAMP_SECONDS, hold, drop back to base, end (once at base).

        Its clock is reset when the accounts are ready (_on_test_start): the spike comes at the
        same time after every Start, the first one (with set-up) included."""

        def tick(self):
            if Run.plan is None:
                return BASE_USERS, BASE_USERS  # the first start: its test_start sets the accounts up
            elapsed = self.get_run_time()
            spike_at = DURATION_SECONDS * BEFORE_SHARE
            drop_at = spike_at + DURATION_SECONDS * HOLD_SHARE
            # Spawn the whole step within the ramp: that is what makes it a spike.
            spawn_rate = max(1.0, (PEAK_USERS - BASE_USERS) / max(RAMP_SECONDS, 0.1))
            if elapsed >= DURATION_SECONDS and (
                self.get_current_user_count() <= BASE_USERS or elapsed >= DURATION_SECONDS + DROP_WAIT_SECONDS_MAX
            ):
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
            sent_at = time.time()
            for request in requests:
                Run.transfer_log.sent(request.transfer_id, request.debit_account_id, request.credit_account_id,
                                      request.amount_minor, sent_at)  # fmt: skip
            response = self.call(
                BATCH_CALL_NAME, self.payments.CreateTransfers,
                payments_pb2.CreateTransfersRequest(transfers=requests),
                response_length=lambda response: len(response.results),
            )  # fmt: skip
            answered_at = time.time()
            if response is None:
                code = self.last_error.code()
                # RESOURCE_EXHAUSTED: nothing was recorded; the others may have been applied.
                outcome = REFUSED if code in (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNIMPLEMENTED,
                                              grpc.StatusCode.INVALID_ARGUMENT) else UNKNOWN  # fmt: skip
                described = setup_accounts.describe_rpc_error(self.last_error)
                for request in requests:
                    Run.transfer_log.answered(request.transfer_id, outcome, described, answered_at)
                return
            for request, result in zip(requests, response.results):
                if result.HasField("error"):
                    described = setup_accounts.describe_result_error(result.error)
                    code = setup_accounts.code_of(result.error.code)
                    outcome = UNKNOWN if code in OUTCOME_UNKNOWN_CODES else REFUSED
                    Run.transfer_log.answered(request.transfer_id, outcome, described, answered_at)
                    self.environment.events.request.fire(
                        request_type="grpc", name="CreateTransfers item", response_time=0, response_length=0,
                        exception=GrpcFailure(described), context={"code": code.name},
                    )  # fmt: skip
                elif result.transfer.status == transfers_pb2.POSTED:
                    Run.transfer_log.answered(request.transfer_id, POSTED, "POSTED", answered_at)
                else:
                    status = transfers_pb2.TransferStatus.Name(result.transfer.status)
                    Run.transfer_log.answered(request.transfer_id, UNKNOWN, status, answered_at)


if SCENARIO == "remittance":

    class RemittanceSender(GrpcUser):
        """A wallet customer paying another wallet's customer, or (SAME_PARTICIPANT_SHARE) one of its own."""

        @task
        def send(self) -> None:
            by_participant = Run.account_ids_by_participant
            weights = [HEAVY_SENDER_WEIGHT] + [1.0] * (len(by_participant) - 1)
            payer = self.rng.choices(range(len(by_participant)), weights)[0]
            debit_account_id = self.rng.choice(by_participant[payer])
            if self.rng.random() < SAME_PARTICIPANT_SHARE:
                credit_account_id = self.rng.choice([a for a in by_participant[payer] if a != debit_account_id])
                name = "Transfer (same participant)"
            else:
                payee = self.rng.choice([index for index in range(len(by_participant)) if index != payer])
                credit_account_id = self.rng.choice(by_participant[payee])
                name = "Transfer (cross-participant)"
            amount_minor = self.rng.randint(1, setup_accounts.TRANSFER_AMOUNT_MINOR_MAX)
            self.transfer(debit_account_id, credit_account_id, amount_minor, name=name,
                          business_refusals=frozenset({NET_DEBIT_CAP_EXCEEDED}))  # fmt: skip

    class SettlementOperator(GrpcUser):
        """One in the whole swarm: closes the window every CLOSE_WINDOW_SECONDS (as an operator);
        every SETTLE_EVERY_CLOSES closes settles the windows it closed (DEFERRED_NET, as an
        operator) and records every entry settled (as admin, whose act that is)."""

        fixed_count = 1
        wait_time = constant(CLOSE_WINDOW_SECONDS)

        def on_start(self) -> None:
            super().on_start()
            self.operator = clearing_pb2_grpc.ClearingStub(Run.operator_channel)
            self.admin = clearing_pb2_grpc.ClearingStub(Run.channels[self.number % len(Run.channels)])
            self.closed_window_ids: list[int] = []
            # (request_id, window_ids) of a CreateSettlement whose outcome is unknown: asked again as is.
            self.pending_settlement: tuple[str, list[int]] | None = None

        @task
        def close_and_settle(self) -> None:
            closed = self.call(
                "CloseSettlementWindow", self.operator.CloseSettlementWindow,
                clearing_pb2.CloseSettlementWindowRequest(request_id=f"{self.new_transfer_id()}:close", reason=f"locust {SCENARIO}"),
            )  # fmt: skip
            if closed is not None:
                self.closed_window_ids.append(closed.closed_window.window_id)
            if self.pending_settlement is None:
                if len(self.closed_window_ids) < SETTLE_EVERY_CLOSES:
                    return
                self.pending_settlement = (f"{self.new_transfer_id()}:settle", self.closed_window_ids)
                self.closed_window_ids = []
            request_id, window_ids = self.pending_settlement
            settlement = self.call(
                "CreateSettlement", self.operator.CreateSettlement,
                clearing_pb2.CreateSettlementRequest(request_id=request_id, window_ids=window_ids, model=clearing_pb2.DEFERRED_NET),
            )  # fmt: skip
            if settlement is None:
                if self.last_error.code() not in OUTCOME_UNKNOWN_CODES:
                    # Refused, so nothing was recorded: the windows go into the next try, under a new id.
                    self.closed_window_ids = window_ids + self.closed_window_ids
                    self.pending_settlement = None
                return
            self.pending_settlement = None
            for entry in settlement.entries:
                self.call(
                    "RecordParticipantSettled", self.admin.RecordParticipantSettled,
                    clearing_pb2.RecordParticipantSettledRequest(settlement_id=settlement.settlement_id,
                                                                 participant_id=entry.participant_id, currency=entry.currency),
                )  # fmt: skip
