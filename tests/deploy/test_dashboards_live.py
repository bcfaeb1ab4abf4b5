"""The SRE views proven against the test cluster's own Prometheus, after a short load.

Grafana is not installed here, so its dashboards are proven query by query: every panel's
expression (its variables given the values Grafana would give them) and every recording
and alert rule's expression is evaluated by the real Prometheus HTTP API, by the rules of
tests/deploy/promql.py. The console views are opened in headless Chromium, and the README's
saved graph links are evaluated too.
"""

from __future__ import annotations

import concurrent.futures
import html.parser
import json
import pathlib
import re
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable

import grpc
import pytest
import yaml

from tests.fixtures.clearing import ClearingClient, run_token
from tests.deploy import promql

pytestmark = pytest.mark.cluster

REPO = pathlib.Path(__file__).resolve().parents[2]
DASHBOARDS_DIR = REPO / "deploy" / "grafana" / "dashboards"
RULES_DIR = REPO / "deploy" / "prometheus" / "rules"
CONSOLES_DIR = REPO / "deploy" / "prometheus" / "consoles"
README = REPO / "README.md"

CAP_MINOR = 1_000_000
# The load: a few hundred transfers on and between shards, some refused.
SAME_SHARD_TRANSFERS = 120
CROSS_SHARD_TRANSFERS = 120
REFUSED_TRANSFERS = 40
LOAD_THREADS = 8
TRANSFER_AMOUNT_MINOR = 100
PAYER_FUNDS_MINOR = 1_000_000
SCRAPES_BEFORE_LOAD = 2
# Grafana's $__rate_interval for a dashboard whose step is below the scrape interval.
RATE_INTERVAL_SCRAPES = 4
# Scrapes, rule evaluations (the long SLO windows every minute) and the coordinators' periodic
# audit and sweeps come within this; a check still failing then has failed.
VIEWS_SETTLE_SECONDS_MAX = 150
POLL_INTERVAL_SECONDS = 3
# Chromium runs the consoles' JavaScript (their graphs query Prometheus) within this virtual time.
CHROMIUM = "chromium"
CHROMIUM_VIRTUAL_TIME_MS = 15_000
CHROMIUM_TIMEOUT_SECONDS = 60
SAVED_GRAPH_LINKS_MIN = 5
# A value as the consoles' humanize helpers print it: a number first, then a unit or words ("13.7s ago").
NUMBER = re.compile(r"-?\d[^\n]*")


@pytest.fixture(scope="module")
def prometheus(cluster) -> promql.Prometheus:
    return promql.Prometheus(cluster["prometheus_url"])


@pytest.fixture(scope="module")
def rate_interval(prometheus) -> str:
    """$__rate_interval as Grafana computes it: four of Prometheus' scrape intervals."""
    config = yaml.safe_load(prometheus.get("/api/v1/status/config")["data"]["yaml"])
    scrape_interval = config["global"]["scrape_interval"]
    seconds = int(re.fullmatch(r"(\d+)s", scrape_interval)[1])
    return f"{RATE_INTERVAL_SCRAPES * seconds}s"


@pytest.fixture(scope="module")
def loaded(ledger, shard_map, prometheus, grpc_channel) -> None:
    """Run the load, then wait until Prometheus has scraped its counters.

    Prometheus must have scraped the counters before the load too: a counter it first sees
    already past the load has no increase, and every rate and ratio reads 0 or NaN."""
    before = f"min(count_over_time(up{{job=~'corebank_grpc|corebank_coordinator'}}[1m])) >= {SCRAPES_BEFORE_LOAD}"
    assert settle(lambda: [] if prometheus.query(before) else ["corebank's processes are not scraped yet"]) == []
    # A capped participant, so that the clearing figures (position, cap, threshold) have series.
    clearing_client = ClearingClient(grpc_channel, ledger)
    participant_id = f"dash-{run_token()}"
    clearing_client.register(participant_id, ["USD"])
    clearing_client.set_cap(participant_id, "USD", CAP_MINOR)
    shards = [shard.name for shard in shard_map.shards]
    payers = [ledger.funded(PAYER_FUNDS_MINOR, shard) for shard in shards]
    payees = [ledger.open(shard=shard) for shard in shards]
    broke = [ledger.open(shard=shard) for shard in shards]
    plan = [
        *((payers[i % len(shards)], payees[i % len(shards)], TRANSFER_AMOUNT_MINOR) for i in range(SAME_SHARD_TRANSFERS)),
        *((payers[i % len(shards)], payees[(i + 1) % len(shards)], TRANSFER_AMOUNT_MINOR) for i in range(CROSS_SHARD_TRANSFERS)),
        *((broke[i % len(shards)], payees[(i + 1) % len(shards)], TRANSFER_AMOUNT_MINOR) for i in range(REFUSED_TRANSFERS)),
    ]

    def send(step) -> str:
        payer, payee, amount = step
        try:
            ledger.transfer(payer.account_id, payee.account_id, amount)
            return "posted"
        except grpc.RpcError as error:
            return error.code().name

    with concurrent.futures.ThreadPoolExecutor(LOAD_THREADS) as pool:
        answers = list(pool.map(send, plan))
    expected = {"posted": SAME_SHARD_TRANSFERS + CROSS_SHARD_TRANSFERS, "FAILED_PRECONDITION": REFUSED_TRANSFERS}
    assert {answer: answers.count(answer) for answer in set(answers)} == expected
    scraped = f"sum(corebank_transfers_total{{outcome='posted'}}) >= {expected['posted']} and on () sum(corebank_transfers_failed_total) >= {REFUSED_TRANSFERS}"
    assert settle(lambda: [] if prometheus.query(scraped) else ["the load's transfers are not scraped yet"]) == []


def settle(check: Callable[[], list[str]]) -> list[str]:
    """Run `check` until it finds no failure or VIEWS_SETTLE_SECONDS_MAX pass; its last failures."""
    deadline = time.monotonic() + VIEWS_SETTLE_SECONDS_MAX
    while (failures := check()) and time.monotonic() < deadline:
        time.sleep(POLL_INTERVAL_SECONDS)
    return failures


# Grafana's dashboards.


def grafana_regex(values: list[str]) -> str:
    """A multi-value variable as Grafana writes it into a Prometheus regex matcher."""
    return "(" + "|".join(re.escape(value).replace("\\", "\\\\") for value in values) + ")"


def substitute(text: str, values: dict[str, str]) -> str:
    for name, value in sorted(values.items(), key=lambda item: -len(item[0])):
        text = text.replace("${" + name + "}", value).replace("$" + name, value)
    return text


def dashboard_queries(prometheus: promql.Prometheus, rate_interval: str) -> tuple[list[str], list[tuple[str, str]]]:
    """(failures of the template variables, [(where, expression)] of every panel with the
    variables as Grafana would fill them in: every value of each, the default "All")."""
    failures, queries = [], []
    for path in sorted(DASHBOARDS_DIR.glob("*.json")):
        board = json.loads(path.read_text())
        values = {"__rate_interval": rate_interval}
        for variable in board["templating"]["list"]:
            if variable["type"] == "datasource":
                continue
            query = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", substitute(variable["query"], values))
            found = prometheus.label_values(query[1], query[2])
            if not found:
                failures.append(f"{path.stem}: variable ${variable['name']} has no values ({query[0]})")
            values[variable["name"]] = grafana_regex(found)
        for panel in board["panels"]:
            for target in panel.get("targets", []):
                queries.append((f"{path.stem} / {panel['title']} / {target['refId']}", substitute(target["expr"], values)))
    return failures, queries


def test_every_dashboard_panel_returns_series(loaded, prometheus, rate_interval):
    variable_failures, queries = dashboard_queries(prometheus, rate_interval)
    assert variable_failures == []
    assert len(queries) > 50  # five dashboards' worth
    leftover = [f"{where}: {expr}" for where, expr in queries if "$" in expr]
    assert leftover == [], "variables left unsubstituted"

    def check() -> list[str]:
        return [f"{where}: {failure}" for where, expr in queries for failure in promql.must_return_series(prometheus, expr)]

    failures = settle(check)
    assert failures == [], "panels that error or return no series:\n" + "\n".join(failures)


# Prometheus' rules.


def rules() -> list[dict]:
    return [rule for path in sorted(RULES_DIR.glob("*.yml")) for group in yaml.safe_load(path.read_text())["groups"] for rule in group["rules"]]


def test_every_rule_loads_and_reads_real_series(loaded, prometheus):
    """Recording rules must return series (dashboards and alerts read them); alerts by the
    rule of tests/deploy/promql.py. Prometheus must also have loaded and evaluated each."""
    written = rules()
    assert written, "no rules in deploy/prometheus/rules"

    def check() -> list[str]:
        failures = []
        for rule in written:
            if "record" in rule:
                failures += [f"record {rule['record']}: {f}" for f in promql.must_return_series(prometheus, rule["expr"])]
                failures += [f"record {rule['record']}: not recorded by Prometheus" for _ in promql.must_return_series(prometheus, rule["record"])]
            else:
                failures += [f"alert {rule['alert']}: {f}" for f in promql.must_read_real_series(prometheus, rule["expr"])]
        loaded_rules = {
            (rule.get("name"), rule["health"], rule.get("lastError", ""))
            for group in prometheus.get("/api/v1/rules")["data"]["groups"]
            for rule in group["rules"]
        }
        failures += [f"{name}: {health} {error}" for name, health, error in loaded_rules if health != "ok"]
        names_loaded = {name for name, _, _ in loaded_rules}
        failures += [f"{name}: not loaded by Prometheus" for name in (r.get("record") or r.get("alert") for r in written) if name not in names_loaded]
        return failures

    failures = settle(check)
    assert failures == [], "rules that error, read no series or did not load:\n" + "\n".join(failures)


# The console views, in a real browser.


class ConsolePage(html.parser.HTMLParser):
    """What a rendered console page shows: its drilldown values, its graphs' contents, its tables' cells."""

    def __init__(self) -> None:
        super().__init__()
        self.drilldowns: list[str] = []
        self.graphs: dict[str, list[str]] = {}  # id -> the classes and tags drawn inside it
        self.table_cells: list[str] = []
        self._open: list[tuple[str, str]] = []  # (tag, what it is) of the elements we are inside
        self._text: list[str] = []

    def handle_starttag(self, tag, attrs):
        attributes = dict(attrs)
        classes = (attributes.get("class") or "").split()
        kind = ""
        if tag == "a" and "prom_query_drilldown" in classes:
            kind, self._text = "drilldown", []
        elif tag == "div" and "corebank_graph" in classes:
            kind = "graph:" + attributes["id"]
            self.graphs[attributes["id"]] = []
        elif tag == "td" and any(k == "table" for _, k in self._open):
            kind, self._text = "cell", []
        elif tag == "table" and "corebank_table" in classes:
            kind = "table"
        for _, open_kind in self._open:
            if open_kind.startswith("graph:"):
                self.graphs[open_kind[len("graph:"):]] += [tag, *classes]
        if tag not in ("br", "img", "input", "link", "meta", "path", "line", "rect", "circle"):
            self._open.append((tag, kind))

    def handle_endtag(self, tag):
        while self._open:
            open_tag, kind = self._open.pop()
            if kind == "drilldown":
                self.drilldowns.append("".join(self._text).strip())
            elif kind == "cell":
                self.table_cells.append("".join(self._text).strip())
            if open_tag == tag:
                return

    def handle_data(self, data):
        self._text.append(data)


def render_in_chromium(url: str) -> str:
    """The page's DOM after its scripts ran, from headless Chromium."""
    binary = shutil.which(CHROMIUM)
    assert binary, f"{CHROMIUM} not found: apt-get install chromium"
    answer = subprocess.run(
        [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
         f"--virtual-time-budget={CHROMIUM_VIRTUAL_TIME_MS}", "--dump-dom", url],
        capture_output=True, text=True, timeout=CHROMIUM_TIMEOUT_SECONDS,
    )
    assert answer.returncode == 0, answer.stderr[-2000:]
    return answer.stdout


def console_failures(prometheus_url: str, page: str) -> list[str]:
    url = f"{prometheus_url}/consoles/{page}"
    try:
        with urllib.request.urlopen(url, timeout=promql.HTTP_TIMEOUT_SECONDS) as response:
            served = response.read().decode()
    except urllib.error.HTTPError as error:  # a template error is a 500 naming it
        return [f"{page}: HTTP {error.code}: {error.read().decode(errors='replace')[:500]}"]
    failures = [f"{page}: template error" for _ in re.finditer(r"error executing template|<no value>", served)]
    dom = ConsolePage()
    dom.feed(render_in_chromium(url))
    if page != "index.html" and not dom.graphs:
        failures.append(f"{page}: no graph")
    for graph, drawn in dom.graphs.items():
        if "svg" not in drawn or "prom_graph_error" in drawn or "prom_graph_loading" in drawn:
            failures.append(f"{page}: graph {graph} not drawn ({' '.join(c for c in drawn if c.startswith('prom_graph')) or 'no svg'})")
    if not dom.drilldowns:
        failures.append(f"{page}: no values")
    failures += [f"{page}: value {value!r} is not a number" for value in dom.drilldowns if not NUMBER.fullmatch(value) or "NaN" in value]
    return failures


def console_pages() -> list[str]:
    return sorted(path.name for path in CONSOLES_DIR.glob("*.html"))


def test_the_consoles_are_the_five_views_and_an_index_linking_them():
    assert console_pages() == ["control-plane.html", "coordinator.html", "index.html", "integrity.html", "overview.html", "shards.html"]
    index = (CONSOLES_DIR / "index.html").read_text()
    assert all(f'href="{page}"' in index for page in console_pages() if page != "index.html")


@pytest.mark.parametrize("page", ["index.html", "overview.html", "coordinator.html", "shards.html", "control-plane.html", "integrity.html"])
def test_a_console_view_renders_numbers_and_graphs_in_a_browser(loaded, cluster, page):
    failures = settle(lambda: console_failures(cluster["prometheus_url"], page))
    assert failures == [], "\n".join(failures)


# The README's saved graph links, for people with neither Grafana nor the consoles.


def test_the_readmes_saved_graph_links_return_series(loaded, prometheus):
    links = re.findall(r"/graph\?(g0\.expr=[^\s)`|]+)", README.read_text())
    assert len(links) >= SAVED_GRAPH_LINKS_MIN, "the README lists no saved graph links (/graph?g0.expr=...)"
    expressions = [urllib.parse.parse_qs(link)["g0.expr"][0] for link in links]

    def check() -> list[str]:
        return [failure for expr in expressions for failure in promql.must_return_series(prometheus, expr)]

    failures = settle(check)
    assert failures == [], "\n".join(failures)
