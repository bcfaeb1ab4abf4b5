"""The PromQL reading that the dashboard and rule checks rely on: pure, no Prometheus."""

import pytest

from tests.deploy import promql


class FakePrometheus:
    """Answers from a table: an expression (blanks ignored) -> its series; unknown ones are empty."""

    def __init__(self, answers: dict[str, int], errors: tuple[str, ...] = ()) -> None:
        self.answers = {key.replace(" ", ""): value for key, value in answers.items()}
        self.errors = {key.replace(" ", "") for key in errors}

    def query(self, expr: str) -> list[dict]:
        key = expr.replace(" ", "")
        if key in self.errors:
            raise promql.PromQLError("bad_data: parse error")
        return [{"metric": {}, "value": [0, "1"]}] * self.answers.get(key, 0)


@pytest.mark.parametrize(
    ("expr", "parts"),
    [
        ("a > 1 and on () b > bool 2", ["a > 1", "b > bool 2"]),
        ("a or b unless c", ["a", "b unless c"]),
        ("time() - max(x)", ["time ( )", "max ( x )"]),
        ("sum by (le) (rate(h_bucket[5m]))", ["rate ( h_bucket [ 5m ] )"]),
        ("histogram_quantile(0.99, sum(x))", ["sum ( x )"]),
        ("max(x) by (y) > 3", ["max ( x ) by ( y )"]),
        ("(a > 1)", ["a > 1"]),
        ("-x", ["x"]),
        ('x{code!="OK"}', []),
    ],
)
def test_operands_split_at_the_lowest_precedence_and_drop_literals(expr, parts):
    assert promql.operands(expr) == parts


@pytest.mark.parametrize(
    ("expr", "filters"),
    [
        ('x{code!="OK"} / y', False),  # a matcher, not a comparison
        ("x > bool 1", False),
        ("x > 1", True),
        ("x unless y", True),
        ("absent(x)", True),
    ],
)
def test_filters_are_set_operators_comparisons_without_bool_and_absence(expr, filters):
    assert promql.filters(expr) is filters


def test_selectors_name_metrics_not_functions_labels_or_keywords():
    found = promql.selectors(
        'sum by (code) (rate(x{a!="b c", job=~"$job"}[$__rate_interval])) / on (x) group_left (y) z offset 5m'
        " and count_values('v', w) + sum(q) by (r)"
    )
    assert [(s.metric, s.matchers, s.range) for s in found] == [
        ("x", 'a!="b c",job=~"$job"', "$__rate_interval"), ("z", "", ""), ("w", "", ""), ("q", "", ""),
    ]


def test_a_panel_or_recording_rule_must_return_series():
    prometheus = FakePrometheus({"up": 2}, errors=("rate(up)",))
    assert promql.must_return_series(prometheus, "up") == []
    assert promql.must_return_series(prometheus, "nope") == ["no series: nope"]
    assert promql.must_return_series(prometheus, "rate(up)")[0].startswith("error (bad_data")


def test_a_quiet_alert_passes_when_its_operands_read_real_series():
    prometheus = FakePrometheus({"errors": 1, "calls": 1, "errors / calls": 1})
    assert promql.must_read_real_series(prometheus, "errors / calls > 0.01 and calls > 10") == []


def test_a_quiet_alert_fails_on_a_misspelt_operand():
    prometheus = FakePrometheus({"calls": 1})
    assert promql.must_read_real_series(prometheus, "erors / calls > 0.01 and calls > 10") == ["no series: erors / calls"]


def test_what_absent_looks_for_must_be_there_even_when_the_alert_fires():
    prometheus = FakePrometheus({'absent(up{job="etdc"})': 1})
    assert promql.must_read_real_series(prometheus, 'absent(up{job="etdc"})') == ['no series: up { job = "etdc" }']


def test_an_expression_prometheus_refuses_fails():
    prometheus = FakePrometheus({}, errors=("x > ",))
    assert promql.must_read_real_series(prometheus, "x > ")[0].startswith("error (")


def test_a_part_reading_the_past_is_asked_about_now_when_prometheus_is_young():
    prometheus = FakePrometheus({"max(x)": 1})
    assert promql.must_read_real_series(prometheus, "max(x) > max(x offset 30m)") == []
    assert promql.must_read_real_series(prometheus, "max(x) > max(y offset 30m)") == ["no series: max ( y )"]
