# corebank: local cluster, tests and benchmark.
#
#   make up        start (or repair) the local cluster (TOPOLOGY=ha: each shard a Patroni primary and two synchronous-capable replicas, three etcd members), its Prometheus, Alertmanager and supervisor; endpoints and URLs in the state folder's cluster.json
#   make status    one line per process (healthy, unhealthy, stopped, dead, or down on purpose; uptime, restarts) and the Prometheus and Alertmanager URLs; exits non-zero unless all is healthy
#   make down      stop everything (the supervisor first), keep the data
#   make clean     down, then delete the state folder
#   make test      security, check the generated code, then run the tests (they start their own cluster)
#   make rules     promtool's check of the Prometheus rules, then their unit tests (also run by make test)
#   make reconcile  prove clearing from the databases: window totals, positions, settlements, settlement accounts (WINDOWS="3 4" checks those windows in detail; JSON=1 for --json); exit 0 consistent, 1 findings, 2 a shard unreadable
#   make security  bandit over the code (fails on medium severity or worse) and pip-audit over the installed packages
#   make bench     up, then pgbench's baseline against corebank's figures, issue 8's goals and the cost of a transfer, then clearing's costs (the position check per transfer; the window close at 100k and 1M transfers), then bench-scaling, then the capacity model (python -m loadtest.capacity; JSON under the state folder's reports/)
#   make bench-ha  transfers/s of a single-instance and of an HA cluster (synchronous replication) in turn, then the HA failover: kill -> first acknowledged transfer, and acknowledged transfers lost (HA_BENCH_SECONDS=10)
#   make bench-scaling  the uniform-pairs rows and their costs on clusters of 1, 2 and 3 shards of its own, started and removed in turn (SCALING_SECONDS=10)
#   make loadtest  a locust scenario against the running cluster, then its verdict: thresholds and invariants (SCENARIO=flash-sale|everyday|batch|remittance USERS=200 DURATION=60s WORKERS=2 make loadtest)
#   make chaos     the bank test under faults, long form, on a cluster of its own (MINUTES=5 SEED=42 make chaos)
#   make hosts     the bank test on several hosts (network namespaces, Patroni shards, 3 etcd members) under a primary's kill and partitions, figures per scenario; needs root (HOSTS_MINUTES=1 per scenario, SHARDS=1, SEED)
#   make sim       the coordinator's deterministic simulation, no cluster needed (SEEDS=100000 make sim; SEED=42 make sim replays one with its trace)
#   make hostile   the hostile-client suite, long form, on a cluster of its own (HOSTILE_EXAMPLES=500 SEED=7 make hostile)
#   make protos    regenerate protos/python after editing protos/
#
# SHARDS, COREBANK_STATE_DIR, COREBANK_PORT_BASE, TOPOLOGY (single | ha), GRPC_WORKERS and COORDINATORS pass through the
# environment to `python -m deploy.cluster` (see deploy/cluster.py).
# make chaos takes MINUTES (default 5), SEED (default random, printed: replay a failure with it),
# CROSS_SHARD_SHARE (default 0.5), CLIENTS, FAULTS (comma-separated kinds) and
# COREBANK_CHAOS_PORT_BASE (default 17700); see tests/chaos/bank.py.

SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON_BOOT := $(shell command -v python3.11 || command -v python3)
VENV := .venv
PYTHON := $(VENV)/bin/python
# Touched after a successful install, so the venv is rebuilt only when pyproject.toml changes.
VENV_STAMP := $(VENV)/.installed
PG_BIN_DIR := /usr/lib/postgresql/15/bin
# What `make up` runs beside the cluster (deploy/monitoring.py), as Debian packages them; promtool tests the rules.
MONITORING_PACKAGES := prometheus prometheus-alertmanager prometheus-postgres-exporter
MONITORING_TOOLS := prometheus promtool prometheus-alertmanager prometheus-postgres-exporter

.PHONY: help venv deps browser-deps up down status clean test rules security protos bench bench-ha bench-scaling chaos loadtest sim hostile reconcile hosts

help:
	@sed -n 's/^#   //p' $(MAKEFILE_LIST)

venv: $(VENV_STAMP)

$(VENV_STAMP): pyproject.toml
	@test -n "$(PYTHON_BOOT)" || { echo "python3 not found: install python3.11 (apt-get install python3 python3-venv)" >&2; exit 1; }
	test -x $(PYTHON) || $(PYTHON_BOOT) -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --upgrade pip  # the venv's bundled pip has known vulnerabilities (make security)
	$(PYTHON) -m pip install --quiet -e '.[dev]'
	touch $@

deps:
	@if ! command -v etcd >/dev/null; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "etcd not found: installing etcd-server"; \
	    apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y etcd-server; \
	  else \
	    echo "etcd not found: install it with 'sudo apt-get install etcd-server' (or put an etcd 3.4+ binary on PATH)" >&2; \
	    exit 1; \
	  fi; \
	fi
	@missing=""; for tool in $(MONITORING_TOOLS); do command -v $$tool >/dev/null || missing="$$missing $$tool"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "not found:$$missing; installing $(MONITORING_PACKAGES)"; \
	    apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y $(MONITORING_PACKAGES); \
	  else \
	    echo "not found:$$missing (make up runs the cluster's own Prometheus and Alertmanager): install them with 'sudo apt-get install $(MONITORING_PACKAGES)'" >&2; \
	    exit 1; \
	  fi; \
	fi
	@if [ "$(TOPOLOGY)" = ha ] && ! command -v patroni >/dev/null; then \
	  echo "TOPOLOGY=ha runs each shard under Patroni: install it with 'sudo apt-get install patroni'" >&2; \
	  exit 1; \
	fi
	@if [ ! -x $(PG_BIN_DIR)/pg_ctl ] && ! { command -v pg_config >/dev/null && [ -x "$$(pg_config --bindir)/pg_ctl" ]; }; then \
	  echo "PostgreSQL 15 not found in $(PG_BIN_DIR) nor via pg_config: install it with 'sudo apt-get install postgresql-15'" >&2; \
	  exit 1; \
	fi

# The console views' test opens the local Prometheus in headless Chromium.
browser-deps:
	@if ! command -v chromium >/dev/null; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "chromium not found: installing it"; \
	    apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y chromium; \
	  else \
	    echo "chromium not found (make test renders Prometheus' consoles in it): install it with 'sudo apt-get install chromium'" >&2; \
	    exit 1; \
	  fi; \
	fi

up: deps venv
	$(PYTHON) -m deploy.cluster up

down: venv
	$(PYTHON) -m deploy.cluster down

# During an incident: the venv as it is (built only when there is none), never a pip install
# because pyproject.toml changed.
status:
	@test -x $(PYTHON) || $(MAKE) --no-print-directory venv
	@$(PYTHON) -m deploy.cluster status

clean: venv
	$(PYTHON) -m deploy.cluster clean

test: deps browser-deps venv security
	$(PYTHON) protos/generate.py --check
	$(MAKE) --no-print-directory rules
	$(PYTHON) -m pytest

# bandit: findings of medium severity or worse, at any confidence, fail. An accepted one is
# documented at its line, `# nosec B608 # reason` (bandit reads the words after `nosec` up to
# the next `#` as test ids), never skipped for a whole file or test ([tool.bandit] in
# pyproject.toml). bandit warns "nosec encountered (B608), but no failed test" once for every
# piece of a multi-line SQL f-string carrying such a comment (hundreds of lines, no
# information): those lines alone are filtered out.
# pip-audit: .ci/audit_dependencies.py (a known vulnerability fails; when the vulnerability
# service is out of reach it says NOT AUDITED and passes, unless PIP_AUDIT_REQUIRED=1).
BANDIT_TARGETS := services sharding deploy loadtest

security: venv
	@set -o pipefail; $(PYTHON) -m bandit -c pyproject.toml -r $(BANDIT_TARGETS) --severity-level medium --confidence-level low -q 2>&1 \
	  | { grep -v 'nosec encountered (B608), but no failed test' || true; }
	@echo "bandit: no finding of medium severity or worse in $(BANDIT_TARGETS)"
	$(PYTHON) .ci/audit_dependencies.py

# The alert and recording rules (deploy/prometheus/rules/): promtool's check, then their unit tests
# (deploy/prometheus/tests/: every alert fires in one case and stays silent in another).
rules: deps
	promtool check rules deploy/prometheus/rules/*.yml
	promtool test rules deploy/prometheus/tests/*.yml

protos: venv
	$(PYTHON) protos/generate.py

# Clearing's reconciliation against the running cluster (services/storage/reconciliation.py), as
# the auditor role: snapshots only, never a lock a transfer waits for. Like `make status`, it
# uses the venv as it is.
reconcile:
	@test -x $(PYTHON) || $(MAKE) --no-print-directory venv
	$(PYTHON) -m services.storage.reconciliation $(foreach window,$(WINDOWS),--window $(window)) $(if $(JSON),--json)

# About 5 minutes for the bench's ten rows, 1.5 for what mTLS and tokens cost (loadtest.security_cost),
# about 8 for clearing (loadtest.clearing_bench: six rows of the position check, then 3 loads and
# closes of 100,000 and of 1,000,000 cleared transfers, which add ~3.3M rows to the cluster's
# databases; CLEARING_BENCH_OPTIONS="--window-sizes 100000 --close-runs 1" for less),
# then about 2 for the scaling runs' three clusters,
# then the capacity model computed from both reports.
bench: up
	$(PYTHON) -m loadtest.bench
	$(PYTHON) -m loadtest.security_cost
	$(PYTHON) -m loadtest.clearing_bench $(CLEARING_BENCH_OPTIONS)
	$(MAKE) --no-print-directory bench-scaling
	$(PYTHON) -m loadtest.capacity

# Measured seconds per row of the scaling runs; their clusters take ports from 18100 (--port-base).
SCALING_SECONDS ?= 10

bench-scaling: deps venv
	$(PYTHON) -m loadtest.scaling --seconds $(SCALING_SECONDS)

# Its two clusters take ports from 7600 in turn (--port-base); see loadtest/ha_bench.py.
HA_BENCH_SECONDS ?= 10

bench-ha: deps venv
	$(PYTHON) -m loadtest.ha_bench --seconds $(HA_BENCH_SECONDS)

# SCENARIO (flash-sale | everyday | batch | remittance), USERS, RATE, DURATION, WORKERS (locust workers under
# one master; 0: one process), MAX_FAILURE_RATIO (0.01), MAX_P99_MS (500 ms, the latency SLO;
# batch 5000) and the scenarios' own settings (CROSS_SHARD_SHARE, BATCH_SIZE, ACCOUNTS, the
# remittance's PARTICIPANTS, NET_DEBIT_CAP_MINOR, CLOSE_WINDOW_SECONDS, SETTLE_EVERY_CLOSES, ...) pass
# through the environment; see loadtest/run.py. Fails when a threshold or an invariant does; the
# verdict is reports/<run>/verdict.json beside locust's report.html. Runs against the cluster that
# `make up` started (it starts nothing itself).
loadtest: venv
	$(PYTHON) -m loadtest.run

MINUTES ?= 5
CROSS_SHARD_SHARE ?= 0.5

chaos: deps venv
	$(PYTHON) -m tests.chaos.bank --minutes $(MINUTES) --cross-shard-share $(CROSS_SHARD_SHARE) \
	  $(if $(SEED),--seed $(SEED)) $(if $(CLIENTS),--clients $(CLIENTS)) $(if $(FAULTS),--faults $(FAULTS))

# tests/hosts/partitions.py: each scenario (kill-primary, partition-primary, partition-etcd) for
# HOSTS_MINUTES (default 1), SHARDS (default 1), SEED; prints ops, ok/fail/unknown, the time to the
# first success after each fault, lost and applied-twice transfers (0), writable members at once.
hosts: deps venv
	$(PYTHON) -m tests.hosts.partitions --minutes $(or $(HOSTS_MINUTES),1) --shards $(or $(SHARDS),1) $(if $(SEED),--seed $(SEED))

# The real TransferDriver and Recovery over in-memory shards on a virtual clock, with crashes,
# transient and permanent failures, delays and zombies drawn from each seed
# (services/coordinator/simulation.py). SEEDS (default 10000) from FIRST_SEED; SEED=N replays one.
SEEDS ?= 10000
FIRST_SEED ?= 0

sim: venv
	$(PYTHON) -m services.coordinator.simulation $(if $(SEED),--seed $(SEED) --trace,--seeds $(SEEDS) --first-seed $(FIRST_SEED))

# tests/hostile: random API sequences by a hostile client judged from the databases, one
# regression test per money-safety finding, and the API fuzz (every method under every
# identity, requests built from the proto descriptors: test_fuzz_api.py). HOSTILE_EXAMPLES
# (default 200), SEED (default 7, printed: replay a failure with it), HOSTILE_STEPS (steps per
# sequence, default 20), HOSTILE_FUZZ_EXAMPLES (per identity and method, default
# HOSTILE_EXAMPLES/4); failures are shrunk (HOSTILE_SHRINK=1). The test cluster's ports come
# from COREBANK_TEST_PORT_BASE.
HOSTILE_EXAMPLES ?= 200

hostile: deps venv
	HOSTILE_EXAMPLES=$(HOSTILE_EXAMPLES) SEED=$(or $(SEED),7) HOSTILE_SHRINK=$(or $(HOSTILE_SHRINK),1) \
	  $(PYTHON) -m pytest tests/hostile -s
