"""The bank test on several hosts under a primary's death and partitions, short form
(tests/hosts/partitions.py; `make hosts` runs the long form and prints the figures).

One topology for the module (network namespaces: 3 etcd members, one shard of 3 Patroni
members, the service and the coordinator, each on a host of its own); each scenario runs
one fault cycle (about a minute) and then the bank checker. Needs root, `ip` and iptables:
skipped, with the reason, where they are not available.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator

import pytest

from tests.fixtures import netns
from tests.fixtures.cluster import make_state_dir
from tests.hosts import partitions
from tests.hosts.topology import HostsCluster

# Replay a failure with COREBANK_HOSTS_SEED=<the seed printed>.
SEED = int(os.environ.get("COREBANK_HOSTS_SEED") or 20261212)
SHARDS = 1
# One fault cycle per scenario: the nemesis starts one whatever the duration and starts no second
# one that would not fit, so the shortest duration gives exactly one.
DURATION_SECONDS = 1
MISSING_TOOLS = [tool for tool in ("patroni", "etcd") if shutil.which(tool) is None]
SKIP_REASON = netns.available() or (f"not installed: {', '.join(MISSING_TOOLS)}" if MISSING_TOOLS else None)

pytestmark = pytest.mark.skipif(SKIP_REASON is not None, reason=f"several hosts: {SKIP_REASON}")


@pytest.fixture(scope="module")
def hosts() -> Iterator[HostsCluster]:
    state_dir = make_state_dir(f"{netns.NAME_PREFIX}-hosts-")
    try:
        with HostsCluster(state_dir, SHARDS) as started:
            yield started
    finally:
        shutil.rmtree(state_dir, ignore_errors=True)
    assert not [n for n in netns.listed_namespaces() if n.startswith(f"{netns.NAME_PREFIX}-")], "namespaces left behind"


def run(hosts: HostsCluster, kind: str) -> partitions.ScenarioReport:
    report = partitions.run_scenario(hosts, kind, DURATION_SECONDS, SEED)
    print(report.line())
    assert report.violations == [], "\n".join(report.violations[:30])
    assert report.lost == 0 and report.applied_twice == 0
    assert report.samples > 0 and report.writable_max == 1, "never more than one writable member per shard, and one at least"
    assert len(report.cycles) == 1
    assert report.counts["transfer"][partitions.bank.OK] > 0
    # The faulted shard served acknowledged transfers again after the fault (how soon is a figure, not asserted).
    assert report.first_success_after_fault_seconds[0] is not None
    return report


def test_a_killed_primary_fails_over_without_losing_or_doubling_a_transfer(hosts):
    assert_failed_over(run(hosts, partitions.KILL_PRIMARY))
    assert netns_rules_gone(hosts)


def test_an_etcd_member_cut_off_changes_nothing_for_the_bank(hosts):
    report = run(hosts, partitions.PARTITION_ETCD)
    assert report.cycles[0].target in hosts.etcd_hosts
    assert netns_rules_gone(hosts)


# Last: when it fails, the topology is left unhealed.
def test_a_primary_cut_off_fails_over_without_losing_or_doubling_a_transfer(hosts):
    assert_failed_over(run(hosts, partitions.PARTITION_PRIMARY))
    assert netns_rules_gone(hosts)


def assert_failed_over(report: partitions.ScenarioReport) -> None:
    cycle = report.cycles[0]
    assert cycle.new_primary and cycle.new_primary != cycle.target, f"no other member became the primary of {cycle.shard}"


def netns_rules_gone(hosts: HostsCluster) -> bool:
    return all(hosts.network.drop_rules(host) == [] for host in hosts.network.hosts)
