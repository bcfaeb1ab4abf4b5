"""corebank's Grafana dashboards as code, built with grafana-foundation-sdk (pinned in pyproject.toml).

    .venv/bin/python deploy/grafana/generate.py          write deploy/grafana/dashboards/*.json
    .venv/bin/python deploy/grafana/generate.py --check  exit 1 if a committed dashboard differs

The generated JSON is committed (Grafana's file provisioning reads it; a reviewer diffs it), and a
test regenerates it and fails on any difference. Every query reads its series through `series()`,
so each selects `job=~"$job"` and `instance=~"$instance"`; every rate and increase goes through
`per_second()`/`increase()`, so each uses `$__rate_interval`; every panel is made by `panel()`,
which takes a title, a unit and a description. Metric names are the ones of
deploy/prometheus/metrics.md, Prometheus' `up`, etcd's and postgres_exporter's, and the recording
rules of deploy/prometheus/rules/.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys
from collections.abc import Callable

from grafana_foundation_sdk.builders import dashboard, prometheus, stat, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import dashboard as model

DASHBOARDS_DIR = pathlib.Path(__file__).resolve().parent / "dashboards"
TAG = "corebank"
DATASOURCE = model.DataSourceRef(type_val="prometheus", uid="${datasource}")
RATE_INTERVAL = "$__rate_interval"
# Panels are laid out two a row, Grafana's 24-column grid.
PANEL_WIDTH = 12
PANEL_HEIGHT = 8
STAT_HEIGHT = 5
QUANTILES = (0.5, 0.95, 0.99)
JOB_GRPC = "corebank_grpc"
JOB_COORDINATOR = "corebank_coordinator"
JOB_ETCD = "etcd"
JOB_POSTGRES = "postgres"
CALL_JOBS = (JOB_GRPC, JOB_COORDINATOR)
DATABASE = "corebank"
# The SLOs of deploy/prometheus/rules/corebank_recording.yml (a test checks that these agree):
# the window the budget is spent over, the codes that count as failed calls, the reasons that
# do too (corebank's OVERLOADED refusals and its own DEADLINE_EXCEEDED answers; a client's own
# deadline, reason "", does not), and the latency SLI's call and bucket.
SLO_WINDOW = "30d"
SLO_FAILED_CODES = "UNKNOWN|INTERNAL|UNAVAILABLE|DATA_LOSS|ABORTED"
SLO_FAILED_REASONS = "OVERLOADED|DEADLINE_EXCEEDED"
SLO_LATENCY_SERVICE = "corebank.v1.Payments"
SLO_LATENCY_METHOD = "Transfer"
SLO_LATENCY_THRESHOLD_SECONDS = "0.5"


def matcher(label: str, value: str, op: str = "=") -> str:
    return f'{label}{op}"{value}"'


def series(metric: str, *matchers: str) -> str:
    """`metric` of the chosen jobs and instances, with further label matchers (`'code!="OK"'`)."""
    return metric + "{" + ", ".join(('job=~"$job"', 'instance=~"$instance"', *matchers)) + "}"


def per_second(metric: str, *matchers: str) -> str:
    return f"rate({series(metric, *matchers)}[{RATE_INTERVAL}])"


def increase(metric: str, *matchers: str, window: str = RATE_INTERVAL) -> str:
    return f"increase({series(metric, *matchers)}[{window}])"


def failed_calls(window: str) -> str:
    """Calls the availability SLO counts as failed, within `window`."""
    return (
        f"sum({increase('corebank_grpc_requests_total', matcher('code', SLO_FAILED_CODES, '=~'), window=window)})"
        f" + sum({increase('corebank_grpc_errors_total', matcher('reason', SLO_FAILED_REASONS, '=~'), window=window)})"
    )


def slow_transfers_ratio(window: str) -> str:
    """Share of Transfer calls the latency SLO counts as too slow, within `window`."""
    call = (matcher("service", SLO_LATENCY_SERVICE), matcher("method", SLO_LATENCY_METHOD))
    fast = increase("corebank_grpc_request_duration_seconds_bucket", *call, matcher("le", SLO_LATENCY_THRESHOLD_SECONDS), window=window)
    return f"1 - sum({fast}) / (sum({increase('corebank_grpc_request_duration_seconds_count', *call, window=window)}) > 0)"


def budget_left(bad_ratio: str, target_rule: str) -> str:
    """1 while no budget is spent, 0 when the window's bad ratio reaches 1 - target, below 0 past it."""
    return f"1 - ({bad_ratio}) / (1 - scalar({target_rule}))"


def quantile(q: float, histogram: str, by: str = "", *matchers: str) -> str:
    """The q-quantile of a histogram's observations over the rate interval, per `by` labels."""
    labels = ", ".join(["le", *filter(None, [by])])
    return f"histogram_quantile({q}, sum by ({labels}) ({per_second(histogram + '_bucket', *matchers)}))"


@dataclasses.dataclass(frozen=True)
class Query:
    expr: str
    legend: str = ""


@dataclasses.dataclass(frozen=True)
class Panel:
    """What a panel shows; `kind` is "timeseries" (over time) or "stat" (the value now)."""

    title: str
    unit: str
    description: str
    queries: tuple[Query, ...]
    kind: str = "timeseries"


def panel(title: str, unit: str, description: str, *queries: Query | str, kind: str = "timeseries") -> Panel:
    return Panel(title, unit, description, tuple(q if isinstance(q, Query) else Query(q) for q in queries), kind)


def stat_panel(title: str, unit: str, description: str, *queries: Query | str) -> Panel:
    return panel(title, unit, description, *queries, kind="stat")


def quantile_queries(histogram: str, by: str = "", *matchers: str) -> tuple[Query, ...]:
    label = "{{" + by + "}} " if by else ""
    return tuple(Query(quantile(q, histogram, by, *matchers), f"{label}p{round(q * 100)}") for q in QUANTILES)


@dataclasses.dataclass(frozen=True)
class Dashboard:
    uid: str
    title: str
    description: str
    jobs: tuple[str, ...]
    rows: tuple[tuple[str, tuple[Panel, ...]], ...]


def overview() -> Dashboard:
    calls = "corebank_grpc_requests_total"
    return Dashboard(
        "corebank-overview", "corebank / Overview", "Transfers, errors, latency and the SLO budget of the whole bank.",
        CALL_JOBS,
        (
            ("Traffic", (
                panel("Transfers by outcome", "ops", "Transfers answered per second: posted, rejected (refused) or voided.",
                      Query(f"sum by (outcome) ({per_second('corebank_transfers_total')})", "{{outcome}}")),
                panel("Calls by code", "reqps", "corebank.v1 calls per second by their final gRPC code (CANCELLED and DEADLINE_EXCEEDED included).",
                      Query(f"sum by (code) ({per_second(calls)})", "{{code}}")),
                panel("Amounts posted", "suffix: minor/s", "Money moved per second by posted transfers, in minor units of each currency.",
                      Query(f"sum by (currency) ({per_second('corebank_transfers_amount_minor_total', matcher('outcome', 'posted'))})", "{{currency}}")),
                panel("Transfers not posted by reason", "ops", "Transfer calls that did not post, per second, by their ErrorInfo reason.",
                      Query(f"sum by (reason) ({per_second('corebank_transfers_failed_total')})", "{{reason}}")),
            )),
            ("Errors and latency", (
                panel("Error ratio", "percentunit",
                      "Share of calls answered with any code but OK (the callers' own mistakes and refusals included), and the share the availability SLO counts as failed (corebank's own failures, its own DEADLINE_EXCEEDED answers and OVERLOADED refusals). No value while there are no calls.",
                      Query(f"sum({per_second(calls, matcher('code', 'OK', '!='))}) / sum({per_second(calls)})", "not OK"),
                      Query(f"({failed_calls(RATE_INTERVAL)}) / (sum({increase(calls)}) > 0)", "SLO failures")),
                panel("Latency p50 / p95 / p99 by RPC", "s", "Quantiles of the time from a call's arrival to its answer, per method, over the rate interval.",
                      *quantile_queries("corebank_grpc_request_duration_seconds", "method")),
                panel("Errors by reason", "reqps", "Calls answered with an error per second, by ErrorInfo reason.",
                      Query(f"sum by (reason) ({per_second('corebank_grpc_errors_total')})", "{{reason}}")),
                stat_panel("SLO error budget left", "percentunit",
                           f"Share of each SLO's error budget not yet spent over its {SLO_WINDOW} window (availability 99.9% of calls, latency 99% of transfers within 0.5 s): 100% untouched, 0% spent, negative overspent. Reads the whole window, not the rate interval.",
                           Query(budget_left(f"({failed_calls(SLO_WINDOW)}) / (sum({increase(calls, window=SLO_WINDOW)}) > 0)", "corebank:slo_availability:target"), "availability"),
                           Query(budget_left(slow_transfers_ratio(SLO_WINDOW), "corebank:slo_latency:target"), "latency")),
            )),
            ("Load", (
                panel("Calls in flight", "short", "Calls being served now per process, against the admission limit (IN_FLIGHT_CALLS_MAX).",
                      Query(f"sum by (process) ({series('corebank_grpc_requests_in_flight')})", "{{process}}"),
                      Query(f"max({series('corebank_grpc_requests_in_flight_limit')})", "limit")),
                panel("Overload refusals by cause", "reqps", "OVERLOADED answers per second: the admission limit, a full group-commit queue or a queued transfer waiting too long.",
                      Query(f"sum by (cause) ({per_second('corebank_overload_refusals_total')})", "{{cause}}")),
                panel("Rate-limited calls", "reqps", "RATE_LIMITED answers per second by limit (per-subject rate or velocity) and caller role.",
                      Query(f"sum by (limit, role) ({per_second('corebank_rate_limited_total')})", "{{limit}} {{role}}")),
                stat_panel("Versions running", "short", "Processes by corebank version and role (corebank_build_info).",
                           Query(f"count by (version, role) ({series('corebank_build_info')})", "{{role}} {{version}}")),
            )),
        ),
    )


def coordinator() -> Dashboard:
    return Dashboard(
        "corebank-coordinator", "corebank / Coordinator (TCC)",
        "Cross-shard transfers: try, confirm and cancel drives, what is in doubt and for how long, recoveries and faults.",
        CALL_JOBS,
        (
            ("Drives", (
                panel("Drives by final state", "ops", "TCC driver runs per second by the state they ended in (tries, confirms, cancels).",
                      Query(f"sum by (state) ({per_second('corebank_tcc_drives_total')})", "{{state}}")),
                panel("Cross-shard transfers in flight", "short", "Cross-shard transfers each process is driving now.",
                      Query(f"sum by (process) ({series('corebank_tcc_transfers_in_flight')})", "{{process}}")),
                panel("Drive duration p50 / p95 / p99", "s", "Quantiles of one driver run, over the rate interval.",
                      *quantile_queries("corebank_tcc_drive_duration_seconds")),
                panel("Recoveries and stopped drives", "ops",
                      "Transfers taken over by recovery per second, and drives left to recovery (a crash, a lost lease, a shard down).",
                      Query(f"sum({per_second('corebank_tcc_recovered_total')})", "recovered"),
                      Query(f"sum({per_second('corebank_tcc_drives_stopped_total')})", "stopped")),
            )),
            ("In doubt", (
                panel("In doubt by shard", "short", "Cross-shard transfers not yet final, per shard, at the coordinators' last recovery scan.",
                      Query(f"max by (shard) ({series('corebank_tcc_in_doubt')})", "{{shard}}")),
                panel("Oldest in doubt by shard", "s",
                      "Age of the oldest transfer not yet final per shard, against the bound it may stay in doubt by design (pending timeout + lease + scan interval).",
                      Query(f"max by (shard) ({series('corebank_tcc_oldest_in_doubt_seconds')})", "{{shard}}"),
                      Query(f"max({series('corebank_tcc_in_doubt_bound_seconds')})", "bound")),
                panel("Faults by step", "short", "Permanent TCC failures within the rate interval, by step: any increase is a bug or a broken invariant.",
                      Query(f"sum by (step) ({increase('corebank_tcc_faults_total')})", "{{step}}")),
                stat_panel("Faults since start", "short", "Permanent TCC failures counted since the processes started; 0 is the only healthy value.",
                           Query(f"sum({series('corebank_tcc_faults_total')})", "faults")),
            )),
        ),
    )


def shards() -> Dashboard:
    return Dashboard(
        "corebank-shards", "corebank / Shards",
        "Each shard as the corebank processes see it (throughput, latency, pool, group-commit queue) and as its postgres_exporter does.",
        (*CALL_JOBS, JOB_POSTGRES),
        (
            ("Throughput and latency", (
                panel("Transactions by shard", "ops", "Database transactions (group-commit batches and TCC steps) per second, by shard.",
                      Query(f"sum by (shard) ({per_second('corebank_shard_transaction_duration_seconds_count')})", "{{shard}}")),
                panel("Transaction latency by shard", "s", "p50, p95 and p99 of one database transaction, by shard, over the rate interval.",
                      *quantile_queries("corebank_shard_transaction_duration_seconds", "shard")),
                panel("Round trips by shard", "ops", "Batches of statements sent per second, by shard.",
                      Query(f"sum by (shard) ({per_second('corebank_db_round_trips_total')})", "{{shard}}")),
                panel("Database errors by shard and kind", "ops", "Failed database work per second: unavailable, timeout, conflict (deadlock, serialization) or other.",
                      Query(f"sum by (shard, kind) ({per_second('corebank_shard_errors_total')})", "{{shard}} {{kind}}")),
            )),
            ("Connection pool", (
                panel("Pool connections by shard", "short", "Pool connections in use and idle per shard (summed over processes), against the pools' max size.",
                      Query(f"sum by (shard, state) ({series('corebank_db_pool_connections')})", "{{shard}} {{state}}"),
                      Query(f"sum by (shard) ({series('corebank_db_pool_connections_max')})", "{{shard}} max")),
                panel("Pool waiters and timeouts", "short", "Callers waiting for a connection now, and callers that gave up waiting within the rate interval.",
                      Query(f"sum by (shard) ({series('corebank_db_pool_requests_waiting')})", "{{shard}} waiting"),
                      Query(f"sum by (shard) ({increase('corebank_db_pool_timeouts_total')})", "{{shard}} timeouts")),
            )),
            ("Group-commit queue", (
                panel("Queue depth by shard", "short", "Transfers waiting for a batch (the deepest process per shard), against QUEUE_TRANSFERS_MAX.",
                      Query(f"max by (shard) ({series('corebank_group_commit_queue_transfers')})", "{{shard}}"),
                      Query(f"max({series('corebank_group_commit_queue_transfers_limit')})", "limit")),
                panel("Oldest queued wait by shard", "s", "How long the oldest queued transfer has waited (0 when empty), against QUEUE_WAIT_SECONDS_MAX.",
                      Query(f"max by (shard) ({series('corebank_group_commit_oldest_wait_seconds')})", "{{shard}}"),
                      Query(f"max({series('corebank_group_commit_queue_wait_limit_seconds')})", "limit")),
                panel("Batch size", "short", "Transfers per group-commit transaction: p50, p95 and p99 over the rate interval.",
                      *quantile_queries("corebank_group_commit_batch_transfers")),
            )),
            ("PostgreSQL (postgres_exporter)", (
                panel("Shard up", "bool_yes_no", "1 while postgres_exporter reaches its shard (pg_up).",
                      Query(f"max by (shard) ({series('pg_up')})", "{{shard}}")),
                panel("Commits and rollbacks by shard", "ops", "Transactions committed and rolled back per second in the corebank database.",
                      Query(f"sum by (shard) ({per_second('pg_stat_database_xact_commit', matcher('datname', DATABASE))})", "{{shard}} commit"),
                      Query(f"sum by (shard) ({per_second('pg_stat_database_xact_rollback', matcher('datname', DATABASE))})", "{{shard}} rollback")),
                panel("Backends by shard and state", "short", "Server connections to the corebank database, by state (active, idle, idle in transaction).",
                      Query(f"sum by (shard, state) ({series('pg_stat_activity_count', matcher('datname', DATABASE))})", "{{shard}} {{state}}")),
                panel("Deadlocks by shard", "short", "Deadlocks PostgreSQL detected in the corebank database within the rate interval.",
                      Query(f"sum by (shard) ({increase('pg_stat_database_deadlocks', matcher('datname', DATABASE))})", "{{shard}}")),
                panel("Database size by shard", "bytes", "Size of the corebank database on disk.",
                      Query(f"max by (shard) ({series('pg_database_size_bytes', matcher('datname', DATABASE))})", "{{shard}}")),
            )),
        ),
    )


def control_plane() -> Dashboard:
    return Dashboard(
        "corebank-control-plane", "corebank / Control plane",
        "etcd, the shard map each process has in force and its watch on etcd.",
        (JOB_ETCD, *CALL_JOBS),
        (
            ("etcd", (
                panel("etcd up", "bool_yes_no", "1 while Prometheus scrapes etcd.",
                      Query(f"max by (process) ({series('up', matcher('job', JOB_ETCD))})", "{{process}}")),
                panel("etcd has a leader", "bool_yes_no", "1 while this etcd member knows a leader; 0 means etcd cannot commit.",
                      Query(f"max by (process) ({series('etcd_server_has_leader')})", "{{process}}")),
                panel("etcd leader changes", "short", "Leader changes seen within the rate interval; frequent changes stall writes.",
                      Query(f"sum by (process) ({increase('etcd_server_leader_changes_seen_total')})", "{{process}}")),
                panel("etcd WAL fsync p99", "s", "p99 of etcd's write-ahead-log fsync over the rate interval: slow disks slow every shard-map write.",
                      Query(quantile(0.99, "etcd_disk_wal_fsync_duration_seconds"), "p99")),
            )),
            ("Shard map", (
                panel("Shard map version by process", "none", "The shard map version in force in each process: all should agree.",
                      Query(f"max by (process) ({series('corebank_shard_map_version')})", "{{process}}")),
                stat_panel("Distinct shard map versions", "none", "How many shard map versions are in force at once: 1 is healthy, more means a process missed an update.",
                           Query(f"count(count by (version) (count_values('version', {series('corebank_shard_map_version')})))", "versions")),
                panel("Shard map watch connected", "bool_yes_no", "1 while a process's watch on the shard map in etcd is connected.",
                      Query(f"min by (process) ({series('corebank_etcd_watch_connected')})", "{{process}}")),
                panel("Watch reconnects", "short", "Watch connections lost and made again within the rate interval, by process.",
                      Query(f"sum by (process) ({increase('corebank_etcd_watch_reconnects_total')})", "{{process}}")),
            )),
            ("Processes", (
                panel("Processes up", "bool_yes_no", "1 while Prometheus scrapes the process (up).",
                      Query(f"max by (process) ({series('up')})", "{{process}}")),
                panel("CPU by process", "percentunit", "CPU time used per second by each corebank process (1 = one core).",
                      Query(f"sum by (process) ({per_second('process_cpu_seconds_total')})", "{{process}}")),
            )),
        ),
    )


def integrity() -> Dashboard:
    return Dashboard(
        "corebank-integrity", "corebank / Integrity",
        "The coordinators' periodic invariant audit, clearing against in flight, the collecting merchants' sweep and the audit log writer.",
        CALL_JOBS,
        (
            ("Invariant audit", (
                stat_panel("Audit result", "bool_yes_no", "1 when the last periodic invariant audit of every coordinator found nothing wrong, 0 otherwise.",
                           Query(f"min({series('corebank_audit_ok')})", "ok")),
                stat_panel("Audit age", "s", "Time since the last periodic invariant audit finished (the most recent coordinator's).",
                           Query(f"time() - max({series('corebank_audit_last_run_timestamp_seconds')})", "age")),
                panel("Violations by invariant", "short", "Findings of the last audit per invariant: anything but 0 is a broken ledger.",
                      Query(f"max by (invariant) ({series('corebank_audit_violations')})", "{{invariant}}")),
                panel("Audit duration", "s", "How long the last audit run took, per coordinator.",
                      Query(f"max by (process) ({series('corebank_audit_duration_seconds')})", "{{process}}")),
            )),
            ("Clearing", (
                panel("Clearing balance by shard", "suffix: minor", "Each shard's clearing balance at the last audit, per currency, in minor units.",
                      Query(f"max by (shard, currency) ({series('corebank_audit_clearing_minor')})", "{{shard}} {{currency}}")),
                panel("In flight between shards by shard", "suffix: minor",
                      "What each shard has in flight between shards at the last audit, per currency: the clearing balance must match it.",
                      Query(f"max by (shard, currency) ({series('corebank_audit_in_flight_minor')})", "{{shard}} {{currency}}")),
            )),
            ("Collecting merchants", (
                panel("Collecting backlog", "suffix: minor", "Collected but not yet swept to the merchants' main accounts, per currency.",
                      Query(f"max by (currency) ({series('corebank_collection_backlog_minor')})", "{{currency}}")),
                panel("Sub-accounts awaiting a sweep", "short", "Collecting sub-accounts holding an unswept balance.",
                      Query(f"max({series('corebank_collection_backlog_sub_accounts')})", "sub-accounts")),
                stat_panel("Sweep lag", "s", "Time since the collecting merchants were last swept.",
                           Query(f"time() - max({series('corebank_collection_last_sweep_timestamp_seconds')})", "lag")),
            )),
            ("Audit log writer", (
                panel("Audit log entries written", "ops", "Audit log entries stored per second, by process.",
                      Query(f"sum by (process) ({per_second('corebank_audit_log_entries_written_total')})", "{{process}}")),
                panel("Audit log queue", "short", "Entries appended but not yet stored, by process: a growing queue means the audit log shard is slow.",
                      Query(f"sum by (process) ({series('corebank_audit_log_queued_entries')})", "{{process}}")),
                panel("Audit log trouble", "short",
                      "Within the rate interval: calls answered before their entries were stored, calls refused because the log was too far behind, chains opened again after failures.",
                      Query(f"sum({increase('corebank_audit_log_unconfirmed_answers_total')})", "unconfirmed answers"),
                      Query(f"sum({increase('corebank_audit_log_refused_calls_total')})", "refused calls"),
                      Query(f"sum by (cause) ({increase('corebank_audit_log_chains_opened_total')})", "chains opened ({{cause}})")),
            )),
        ),
    )


DASHBOARDS: dict[str, Callable[[], Dashboard]] = {
    "overview": overview,
    "coordinator": coordinator,
    "shards": shards,
    "control-plane": control_plane,
    "integrity": integrity,
}


def variables(jobs: tuple[str, ...]) -> list[dashboard.QueryVariable | dashboard.DatasourceVariable]:
    """datasource, then job (among the dashboard's jobs), then instance (of the chosen jobs); all selected by default."""
    everything = model.VariableOption(selected=True, text="All", value="$__all")
    return [
        dashboard.DatasourceVariable("datasource").label("Data source").type("prometheus"),
        dashboard.QueryVariable("job").label("Job").datasource(DATASOURCE)
        .query(f'label_values(up{{job=~"{"|".join(jobs)}"}}, job)')
        .multi(True).include_all(True).current(everything)
        .refresh(model.VariableRefresh.ON_TIME_RANGE_CHANGED).sort(model.VariableSort.ALPHABETICAL_ASC),
        dashboard.QueryVariable("instance").label("Instance").datasource(DATASOURCE)
        .query('label_values(up{job=~"$job"}, instance)')
        .multi(True).include_all(True).current(everything)
        .refresh(model.VariableRefresh.ON_TIME_RANGE_CHANGED).sort(model.VariableSort.ALPHABETICAL_ASC),
    ]


def build_panel(spec: Panel, panel_id: int):
    builder = (timeseries.Panel() if spec.kind == "timeseries" else stat.Panel())
    builder = builder.id(panel_id).title(spec.title).description(spec.description).unit(spec.unit).datasource(DATASOURCE)
    builder = builder.height(PANEL_HEIGHT if spec.kind == "timeseries" else STAT_HEIGHT).span(PANEL_WIDTH)
    for index, query in enumerate(spec.queries):
        target = prometheus.Dataquery().ref_id(chr(ord("A") + index)).expr(query.expr).datasource(DATASOURCE)
        target = target.legend_format(query.legend) if query.legend else target
        builder = builder.with_target(target.instant() if spec.kind == "stat" else target.range())
    return builder


def build(spec: Dashboard) -> dict:
    builder = (
        dashboard.Dashboard(spec.title).uid(spec.uid).description(spec.description).tags([TAG])
        .time("now-1h", "now").refresh("30s").timezone("browser").editable()
        .link(dashboard.DashboardLink("corebank").type(model.DashboardLinkType.DASHBOARDS).tags([TAG])
              .as_dropdown(True).include_vars(True).keep_time(True))
    )
    for variable in variables(spec.jobs):
        builder = builder.with_variable(variable)
    panel_id = 0
    for row_title, panels in spec.rows:
        panel_id += 1
        builder = builder.with_row(dashboard.Row(row_title).id(panel_id))
        for panel_spec in panels:
            panel_id += 1
            builder = builder.with_panel(build_panel(panel_spec, panel_id))
    return json.loads(json.dumps(builder.build(), cls=JSONEncoder))


def render(spec: Dashboard) -> str:
    return json.dumps(build(spec), indent=2, sort_keys=True) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare with the committed JSON instead of writing it")
    args = parser.parse_args(argv)
    stale = []
    DASHBOARDS_DIR.mkdir(exist_ok=True)
    for name, make in DASHBOARDS.items():
        path = DASHBOARDS_DIR / f"{name}.json"
        text = render(make())
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(path.name)
        else:
            path.write_text(text)
    if stale:
        print(f"stale dashboards (run {pathlib.Path(__file__).name} and commit): {' '.join(stale)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
