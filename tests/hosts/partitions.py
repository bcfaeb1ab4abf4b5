"""The bank test on several hosts, under a shard primary's death and network partitions.

    python -m tests.hosts.partitions --minutes 2 [--shards 2] [--seed 42] [--scenarios kill-primary,...]

On the topology of tests/hosts/topology.py (network namespaces: three etcd members, three
Patroni members per shard, the service and the coordinator each on a host of its own), each
scenario runs tests/chaos/bank.py's workload (random transfers and reads, a history of
ok / fail / unknown) while this module's nemesis injects one kind of fault, in cycles:

- kill-primary: the whole member that holds a shard's primary (Patroni and every PostgreSQL
  process: deploy/patroni.py's kill) dies; healed by starting it again (it rejoins as a replica).
- partition-primary: iptables in the primary's namespace drops everything to and from its
  replicas and the etcd members (the service still reaches it); healed by deleting the rules.
- partition-etcd: the etcd leader is cut off from every other host (the test process, on the
  bridge, still reaches it); healed likewise.

Meanwhile a sampler asks every member of every shard pg_is_in_recovery() (as the superuser,
through its unix socket, which no partition cuts) and records how many answer writable: never
more than one per shard. After healing and waiting until every member streams again,
tests/chaos/bank.py's checker judges from the shards: every acknowledged transfer posted exactly
once per side, no failed one posted, totals unchanged, nothing pending, the audit clean. The
figures per scenario: operations, ok / fail / unknown, time from the fault to the first
acknowledged transfer on the faulted shard, acknowledged transfers lost (0), transfers applied
twice (0), the most writable members seen at once.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import dataclasses
import logging
import random
import shutil
import sys
import threading
import time

import grpc

from deploy import patroni, processes
from services.auth.client import Target
from tests.chaos import bank
from tests.fixtures import netns
from tests.fixtures.cluster import make_state_dir
from tests.fixtures.ledger import LedgerClient, _load_shard_map
from tests.hosts.topology import HostsCluster

KILL_PRIMARY = "kill-primary"
PARTITION_PRIMARY = "partition-primary"
PARTITION_ETCD = "partition-etcd"
SCENARIOS = (KILL_PRIMARY, PARTITION_PRIMARY, PARTITION_ETCD)

# A fault is held past Patroni's failover bound (deploy/patroni.py: ttl + loop_wait + promotion,
# about 23 s), so that the shard's members elect another primary while it lasts.
FAILOVER_BOUND_SECONDS = patroni.TTL_SECONDS + patroni.LOOP_WAIT_SECONDS + 2
PRIMARY_FAULT_HOLD_SECONDS = FAILOVER_BOUND_SECONDS + 5
ETCD_FAULT_HOLD_SECONDS = 15
# Transfers before the first fault, and after each heal before the next one (or the end).
WARMUP_SECONDS = 5
AFTER_HEAL_SECONDS = 10
# After the last heal: every member running and streaming again, etcd healthy.
HEAL_TIMEOUT_SECONDS = 120
SAMPLE_INTERVAL_SECONDS = 0.5
SERVING_RETRY_DELAY_SECONDS = 1.0
CLIENTS_DEFAULT = 4
ACCOUNTS_PER_SHARD = 4
SHARDS_DEFAULT = 1

log = logging.getLogger("hosts")


@dataclasses.dataclass
class FaultCycle:
    kind: str
    target: str  # the host
    shard: str | None  # the shard it hits; None for etcd
    started_seconds: float
    healed_seconds: float = 0.0
    new_primary: str = ""  # the member writable after a primary's fault, when one took over
    new_primary_after_seconds: float | None = None


class WritableSampler(threading.Thread):
    """Every SAMPLE_INTERVAL_SECONDS: which members of each shard answer writable (see the module's docstring)."""

    def __init__(self, hosts: HostsCluster, clock) -> None:
        super().__init__(name="sampler", daemon=True)
        self.hosts, self.clock = hosts, clock
        self.stopping = threading.Event()
        self.samples = 0
        self.writable_max = 0
        self.too_many: list[str] = []  # "t=...s shard-0: pg0a, pg0b"
        self.timeline: dict[str, list[tuple[float, tuple[str, ...]]]] = collections.defaultdict(list)

    def run(self) -> None:
        shards = self.hosts.shards
        while not self.stopping.wait(SAMPLE_INTERVAL_SECONDS):
            for shard in shards:
                writable, _answered = self.hosts.writable_members(shard)
                now = self.clock()
                self.samples += 1
                self.writable_max = max(self.writable_max, len(writable))
                self.timeline[shard.name].append((now, tuple(writable)))
                if len(writable) > 1:
                    self.too_many.append(f"t={now:.1f}s {shard.name}: {', '.join(writable)} writable at once")

    def first_other_writable(self, shard: str, old: str, since_seconds: float) -> tuple[str, float] | None:
        for at, writable in self.timeline[shard]:
            if at >= since_seconds and writable and writable[0] != old:
                return writable[0], at
        return None


class HostsNemesis(threading.Thread):
    """One kind of fault, in cycles of warm-up, fault held, heal, until told to stop."""

    def __init__(self, hosts: HostsCluster, kind: str, sampler: WritableSampler, clock, seed: int, stop_after_seconds: float) -> None:
        super().__init__(name="nemesis", daemon=True)
        self.hosts, self.kind, self.sampler, self.clock = hosts, kind, sampler, clock
        self.rng = random.Random(f"hosts-{kind}-{seed}")
        self.stop_after_seconds = stop_after_seconds
        self.cycles: list[FaultCycle] = []
        self.errors: list[str] = []

    def hold_seconds(self) -> float:
        return ETCD_FAULT_HOLD_SECONDS if self.kind == PARTITION_ETCD else PRIMARY_FAULT_HOLD_SECONDS

    def run(self) -> None:
        time.sleep(WARMUP_SECONDS)
        # One cycle at least; more while a whole one (fault and the quiet after it) still fits.
        while not self.cycles or self.clock() + self.hold_seconds() + AFTER_HEAL_SECONDS <= self.stop_after_seconds:
            try:
                self.cycle()
            except Exception as error:  # noted, and everything healed: the checker reports it
                self.errors.append(f"{self.kind}: {type(error).__name__}: {error}")
                log.exception("nemesis: %s failed", self.kind)
                self.hosts.network.heal_all()
                return
            time.sleep(AFTER_HEAL_SECONDS)

    def primary_of(self, shard: patroni.HaShard) -> patroni.PatroniMember:
        return shard.wait_primary(HEAL_TIMEOUT_SECONDS)

    def cycle(self) -> None:
        network = self.hosts.network
        if self.kind == PARTITION_ETCD:
            target = self.hosts.etcd_leader() or self.rng.choice(self.hosts.etcd_hosts)
            others = [host for host in network.hosts if host != target]
            with network.partitioned(target, others):
                cycle = FaultCycle(self.kind, target, None, self.clock())
                time.sleep(self.hold_seconds())
            cycle.healed_seconds = self.clock()
            self.cycles.append(cycle)
            log.info("nemesis: etcd member %s cut off for %.1fs", target, cycle.healed_seconds - cycle.started_seconds)
            return
        shard = self.rng.choice(self.hosts.shards)
        primary = self.primary_of(shard)
        # A cycle starts once its fault is in force (a kill has returned, the rules are in place).
        if self.kind == KILL_PRIMARY:
            primary.kill()
            cycle = FaultCycle(self.kind, primary.name, shard.name, self.clock())
            time.sleep(self.hold_seconds())
            self.hosts.start_member(primary)
        else:
            peers = [m.name for m in shard.members if m.name != primary.name] + self.hosts.etcd_hosts
            with network.partitioned(primary.name, peers):
                cycle = FaultCycle(self.kind, primary.name, shard.name, self.clock())
                time.sleep(self.hold_seconds())
        cycle.healed_seconds = self.clock()
        found = self.sampler.first_other_writable(shard.name, primary.name, cycle.started_seconds)
        if found:
            cycle.new_primary, at = found
            cycle.new_primary_after_seconds = at - cycle.started_seconds
        self.cycles.append(cycle)
        log.info("nemesis: %s on %s (%s) held %.1fs; new primary %s", self.kind, primary.name, shard.name,
                 cycle.healed_seconds - cycle.started_seconds, cycle.new_primary or "none")  # fmt: skip


@dataclasses.dataclass
class ScenarioReport:
    kind: str
    workload_seconds: float
    counts: dict[str, collections.Counter]
    cycles: list[FaultCycle]
    first_success_after_fault_seconds: list[float | None]
    lost: int  # acknowledged transfers missing a posted side on the shards
    applied_twice: int  # transfers with more than one posted row on one shard
    writable_max: int
    samples: int
    violations: list[str]

    def line(self) -> str:
        transfers = self.counts["transfer"]
        firsts = ", ".join("never" if s is None else f"{s:.1f}s" for s in self.first_success_after_fault_seconds) or "-"
        failovers = ", ".join(
            f"{c.target}->{c.new_primary or '?'} {c.new_primary_after_seconds:.1f}s" if c.new_primary_after_seconds is not None
            else c.target for c in self.cycles
        )  # fmt: skip
        return (
            f"{self.kind:<18} {self.workload_seconds:5.0f}s  ops {sum(transfers.values()) + sum(self.counts['read'].values()):5d}  "
            f"transfers ok {transfers['ok']:4d} fail {transfers['fail']:4d} unknown {transfers['unknown']:4d}  "
            f"faults {len(self.cycles)} [{failovers}]  first success after fault {firsts}  "
            f"lost {self.lost}  applied twice {self.applied_twice}  writable max {self.writable_max} ({self.samples} samples)  "
            f"violations {len(self.violations)}"
        )


def double_and_lost(description: dict, accounts: bank.Accounts, history: bank.History) -> tuple[int, int]:
    """(acknowledged transfers lost, transfers applied twice), counted from the shards' rows."""
    transfers = history.transfers()
    rows = bank.posted_rows(description["shards"], [op.transfer_id for op in transfers])
    shard_of = {a: shard for shard, ids in accounts.customers_by_shard.items() for a in ids}
    lost = twice = 0
    for op in transfers:
        found = rows.get(op.transfer_id, collections.Counter())
        if any(count > 1 for count in found.values()):
            twice += 1
        if op.outcome == bank.OK and set(+found) != {shard_of[op.debit_account_id], shard_of[op.credit_account_id]}:
            lost += 1
    return lost, twice


def first_successes(history: bank.History, accounts: bank.Accounts, cycles: list[FaultCycle]) -> list[float | None]:
    """For each fault: seconds from its start to the first acknowledged transfer invoked after it
    that touches the faulted shard (any shard for etcd)."""
    shard_of = {a: shard for shard, ids in accounts.customers_by_shard.items() for a in ids}
    acknowledged = sorted((op for op in history.transfers() if op.outcome == bank.OK), key=lambda op: op.completed_seconds)
    found: list[float | None] = []
    for cycle in cycles:
        first = next(
            (
                op.completed_seconds - cycle.started_seconds
                for op in acknowledged
                if op.invoked_seconds >= cycle.started_seconds
                and (cycle.shard is None or cycle.shard in (shard_of[op.debit_account_id], shard_of[op.credit_account_id]))
            ),
            None,
        )
        found.append(first)
    return found


def heal(hosts: HostsCluster) -> None:
    """Rules gone, every member running, every shard streaming with a synchronous standby, etcd healthy."""
    hosts.network.heal_all()
    for shard in hosts.shards:
        for member in shard.members:
            if not member.is_running():
                hosts.start_member(member)
    processes.wait_until(hosts.etcd_healthy, HEAL_TIMEOUT_SECONDS, "etcd healthy again")
    for shard in hosts.shards:
        shard.wait_replicated(HEAL_TIMEOUT_SECONDS)


def wait_serving(ledger: LedgerClient, shard_names: list[str]) -> None:
    """Until the service funds an account on every shard: after a failover the service may still
    be finding the new primary when the shards themselves are healed (its figure is the time to
    the first success, not this wait). Bounded by HEAL_TIMEOUT_SECONDS."""
    remaining = list(shard_names)

    def funded_everywhere() -> bool:
        for shard in list(remaining):
            try:
                ledger.funded(bank.OPENING_BALANCE_MINOR, shard)
            except grpc.RpcError as error:
                log.info("service not serving %s yet: %s", shard, error.code().name)
                time.sleep(SERVING_RETRY_DELAY_SECONDS)
                return False
            remaining.remove(shard)
        return True

    processes.wait_until(funded_everywhere, HEAL_TIMEOUT_SECONDS, "the service funding an account on every shard")


def run_scenario(hosts: HostsCluster, kind: str, duration_seconds: float, seed: int, clients: int = CLIENTS_DEFAULT) -> ScenarioReport:
    """Fresh accounts, the workload under `kind`'s nemesis with the sampler, healing, the checker."""
    description = hosts.description
    config = bank.Config(
        seed=seed, duration_seconds=duration_seconds, clients=clients, accounts_per_shard=ACCOUNTS_PER_SHARD,
        faults=(), participants=0,
    )  # fmt: skip
    endpoint = Target.of_cluster(description)
    shard_names = [shard["name"] for shard in description["shards"]]
    with bank.open_channel(endpoint) as channel:
        grpc.channel_ready_future(channel).result(timeout=bank.CHANNEL_READY_TIMEOUT_SECONDS)
        ledger = LedgerClient(channel, asyncio.run(_load_shard_map(description["etcd_endpoint"])))
        wait_serving(ledger, shard_names)
        accounts = bank.open_accounts(ledger, shard_names, config.accounts_per_shard)
    start = bank.balances(description["shards"], accounts.customers + accounts.banks)

    began = time.monotonic()
    clock = lambda: time.monotonic() - began  # noqa: E731
    history = bank.History()
    workload = bank.Workload(endpoint, accounts, config, history, clock)
    sampler = WritableSampler(hosts, clock)
    nemesis = HostsNemesis(hosts, kind, sampler, clock, seed, duration_seconds)
    sampler.start()
    nemesis.start()
    try:
        # The workload lasts its duration, and at least until the nemesis has healed its faults.
        workload.run(duration_seconds, also_until=_ended_event(nemesis))
    finally:
        nemesis.join(HEAL_TIMEOUT_SECONDS)
    workload_seconds = clock()
    heal(hosts)
    sampler.stopping.set()
    sampler.join()
    healed_seconds = clock()
    violations, _unresolved, _all_final = bank.check(description, accounts, start, history, healed_seconds, clock)
    violations += nemesis.errors + sampler.too_many
    lost, twice = double_and_lost(description, accounts, history)
    return ScenarioReport(
        kind, workload_seconds, {"transfer": collections.Counter(o.outcome for o in history.transfers()),
                                 "read": collections.Counter(o.outcome for o in history.ops if o.kind == "read")},
        nemesis.cycles, first_successes(history, accounts, nemesis.cycles), lost, twice, sampler.writable_max,
        sampler.samples, violations,
    )  # fmt: skip


def _ended_event(thread: threading.Thread) -> threading.Event:
    """An event set once `thread` ends (bank.Workload.run waits on an event)."""
    ended = threading.Event()
    threading.Thread(target=lambda: (thread.join(), ended.set()), name="ended", daemon=True).start()
    return ended


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tests.hosts.partitions", description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=1.0, help="per scenario")
    parser.add_argument("--shards", type=int, default=SHARDS_DEFAULT)
    parser.add_argument("--seed", type=int, default=None, help="default: a random one, printed")
    parser.add_argument("--clients", type=int, default=CLIENTS_DEFAULT)
    parser.add_argument("--scenarios", default=",".join(SCENARIOS), help="comma-separated")
    parser.add_argument("--keep", action="store_true", help="keep the state folder (logs, data)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    args = parse_args(argv)
    reason = netns.available()
    if reason is not None:
        print(f"several hosts: not run: {reason}", flush=True)
        return 2
    scenarios = [kind for kind in args.scenarios.split(",") if kind]
    unknown = set(scenarios) - set(SCENARIOS)
    if unknown:
        print(f"unknown scenarios {sorted(unknown)}; known: {', '.join(SCENARIOS)}", file=sys.stderr)
        return 2
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1, 10**9)
    print(f"several hosts: seed {seed}, {args.minutes} min per scenario, {args.shards} shard(s)", flush=True)
    state_dir = make_state_dir(f"{netns.NAME_PREFIX}-hosts-")
    reports: list[ScenarioReport] = []
    try:
        with HostsCluster(state_dir, args.shards) as hosts:
            for kind in scenarios:
                reports.append(run_scenario(hosts, kind, args.minutes * 60, seed, args.clients))
                print(reports[-1].line(), flush=True)
    finally:
        failed = len(reports) < len(scenarios) or any(r.violations for r in reports)
        for report in reports:
            for violation in report.violations[:20]:
                print(f"  {report.kind}: {violation}", flush=True)
        if args.keep or failed:
            print(f"state folder kept (logs, data): {state_dir}", flush=True)
        else:
            shutil.rmtree(state_dir, ignore_errors=True)
    print("several hosts: " + ("FAIL" if failed else "PASS") + f" (seed {seed})", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
