"""Just enough PromQL to take an expression apart, and to ask a real Prometheus about it.

Dashboards and rules are proven against the test cluster's Prometheus: every expression is
evaluated by its HTTP API. A panel or a recording rule must return series. An alert is
usually quiet (its expression returns nothing while all is well), so it is held to this
rule instead: it must evaluate without error, and when it returns nothing, each operand of
its filtering operators (`and`, `or`, `unless`, a comparison without `bool`, `absent`) must
in turn pass, down to the parts that filter nothing, which must return series; and what an
absent() looks for must return series (a healthy cluster has it). A part that reads the past
(`offset 30m`) is asked about now when the past is empty: the test cluster is young. A
misspelt metric or label anywhere then fails, while a condition that is merely false passes.
"""

from __future__ import annotations

import dataclasses
import json
import re
import urllib.parse
import urllib.request

HTTP_TIMEOUT_SECONDS = 10
# Lowest precedence first (Prometheus' order); `^` binds tightest.
BINARY_PRECEDENCE = (("or",), ("and", "unless"), ("==", "!=", ">=", "<=", ">", "<"), ("+", "-"), ("*", "/", "%", "atan2"), ("^",))
SET_OPERATORS = frozenset({"and", "or", "unless"})
COMPARISONS = frozenset({"==", "!=", ">=", "<=", ">", "<"})
# Functions whose result is empty while all is well: their argument is what must have series.
ABSENCE_FUNCTIONS = frozenset({"absent", "absent_over_time"})
MODIFIERS_WITH_LABELS = frozenset({"on", "ignoring", "group_left", "group_right"})
OPENING = {"(": ")", "{": "}", "[": "]"}
_TOKEN = re.compile(
    r"""\s+|\#[^\n]*
    |(?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`)
    |(?P<number>0x[0-9a-fA-F]+|(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?(?:ms|[smhdwy])?(?:\d+(?:ms|[smhdwy]))*)
    |(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)
    |(?P<variable>\$\{?\w+\}?)  # a Grafana variable, as in [$__rate_interval]
    |(?P<op>==|!=|>=|<=|=~|!~|[-+*/%^<>=,(){}\[\]@:])""",
    re.VERBOSE,
)


class PromQLSyntaxError(ValueError):
    pass


def tokens(expr: str) -> list[str]:
    found, position = [], 0
    while position < len(expr):
        match = _TOKEN.match(expr, position)
        if match is None:
            raise PromQLSyntaxError(f"cannot read {expr[position:position + 20]!r} in {expr!r}")
        if match.lastgroup:
            found.append(match.group())
        position = match.end()
    return found


def _closing(parts: list[str], start: int) -> int:
    """Index of the bracket closing the one at `start`."""
    depth = 0
    for index in range(start, len(parts)):
        if parts[index] in OPENING:
            depth += 1
        elif parts[index] in OPENING.values():
            depth -= 1
            if depth == 0:
                return index
    raise PromQLSyntaxError(f"unbalanced {parts[start]!r} in {' '.join(parts)}")


def _is_operand_end(token: str | None) -> bool:
    """Whether a binary operator may follow `token` (else a + or - is a sign)."""
    if token is None:
        return False
    if token in (")", "]", "}") or token[0] in "\"'`" or token[0].isdigit() or token[0] == ".":
        return True
    return bool(re.fullmatch(r"[a-zA-Z_:][a-zA-Z0-9_:]*", token)) and token not in SET_OPERATORS | {"bool", "by", "without", "offset"}


def _top_level_operators(parts: list[str]) -> list[tuple[int, int]]:
    """(index of the operator, index where its right operand starts) at bracket depth 0."""
    found, index, previous = [], 0, None
    while index < len(parts):
        token = parts[index]
        if token in OPENING:
            end = _closing(parts, index)
            previous, index = parts[end], end + 1
            continue
        is_binary = any(token in level for level in BINARY_PRECEDENCE) and (token not in ("+", "-") or _is_operand_end(previous))
        if is_binary and _is_operand_end(previous):
            operand = index + 1
            while operand < len(parts) and parts[operand] in MODIFIERS_WITH_LABELS | {"bool"}:
                operand += 1
                if operand < len(parts) and parts[operand] == "(":
                    operand = _closing(parts, operand) + 1
            found.append((index, operand))
            previous, index = None, operand
            continue
        previous, index = token, index + 1
    return found


def _is_filter_at(parts: list[str], index: int) -> bool:
    token = parts[index]
    return token in SET_OPERATORS or (token in COMPARISONS and (index + 1 >= len(parts) or parts[index + 1] != "bool"))


def filters(expr: str) -> bool:
    """Whether the expression can be empty by design: it holds a set operator, a comparison
    without `bool` (outside label matchers) or an absence function."""
    parts = tokens(expr)
    depth_braces = 0
    for index, token in enumerate(parts):
        depth_braces += (token == "{") - (token == "}")
        if depth_braces == 0 and (_is_filter_at(parts, index) or token in ABSENCE_FUNCTIONS):
            return True
    return False


def is_literal(expr: str) -> bool:
    parts = tokens(expr)
    return all(p in ("-", "+") or p[0] in "\"'`" or p[0].isdigit() or p[0] == "." for p in parts) or parts in (["Inf"], ["NaN"])


def operands(expr: str) -> list[str]:
    """The expression's immediate parts, literals left out: the operands of its
    lowest-precedence operator, the inside of its brackets, or the arguments of its call.
    A selector has none."""
    parts = tokens(expr)
    if not parts:
        return []
    if parts[0] == "(" and _closing(parts, 0) == len(parts) - 1:
        pieces = [parts[1:-1]]
    elif operators := _top_level_operators(parts):
        lowest = min(_level(parts[i]) for i, _ in operators)
        pieces, start = [], 0
        for index, operand in operators:
            if _level(parts[index]) == lowest:
                pieces.append(parts[start:index])
                start = operand
        pieces.append(parts[start:])
    elif parts[0] in ("-", "+"):
        pieces = [parts[1:]]
    elif len(parts) > 1 and re.fullmatch(r"[a-zA-Z_:][a-zA-Z0-9_:]*", parts[0]):
        pieces = _call_arguments(parts)
    else:
        pieces = []
    return [joined for piece in pieces if not is_literal(joined := " ".join(piece))]


def _level(operator: str) -> int:
    return next(level for level, members in enumerate(BINARY_PRECEDENCE) if operator in members)


def _call_arguments(parts: list[str]) -> list[list[str]]:
    """The arguments of `f(...)` or `agg by (labels) (...)` / `agg (...) by (labels)`; none for a selector."""
    index = 1
    if parts[index] in ("by", "without"):
        index = _closing(parts, index + 1) + 1
    if index >= len(parts) or parts[index] != "(":
        return []
    end = _closing(parts, index)
    arguments, depth, start = [], 0, index + 1
    for position in range(index + 1, end):
        token = parts[position]
        depth += (token in OPENING) - (token in OPENING.values())
        if token == "," and depth == 0:
            arguments.append(parts[start:position])
            start = position + 1
    arguments.append(parts[start:end])
    return arguments


KEYWORDS = frozenset({"and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset", "Inf", "NaN", "inf", "nan"})
LABEL_LIST_KEYWORDS = frozenset({"by", "without", "on", "ignoring", "group_left", "group_right"})


@dataclasses.dataclass(frozen=True)
class Selector:
    metric: str
    matchers: str  # the text between its braces without blanks, "" without
    range: str  # the text between the brackets after it, "" without


def selectors(expr: str) -> list[Selector]:
    """The series selectors of an expression, with their label matchers and range."""
    parts, found, index = tokens(expr), [], 0
    while index < len(parts):
        token = parts[index]
        following = parts[index + 1] if index + 1 < len(parts) else None
        if token in LABEL_LIST_KEYWORDS and following == "(":
            index = _closing(parts, index + 1) + 1
            continue
        if token == "{":  # a selector without a metric name
            end = _closing(parts, index)
            found.append(Selector("", "".join(parts[index + 1:end]), ""))
            index = end + 1
            continue
        is_name = re.fullmatch(r"[a-zA-Z_:][a-zA-Z0-9_:]*", token) is not None
        if not is_name or token in KEYWORDS or following in ("(", "by", "without"):  # a call or an aggregation
            index += 1
            continue
        end, matchers, window = index, "", ""
        if following == "{":
            end = _closing(parts, index + 1)
            matchers = "".join(parts[index + 2:end])
        if end + 1 < len(parts) and parts[end + 1] == "[":
            close = _closing(parts, end + 1)
            window = "".join(parts[end + 2:close])
            end = close
        found.append(Selector(token, matchers, window))
        index = end + 1
    return found


@dataclasses.dataclass(frozen=True)
class Prometheus:
    url: str

    def get(self, path: str, **params: str | list[str]) -> dict:
        query = urllib.parse.urlencode(params, doseq=True)
        request = urllib.request.Request(f"{self.url}{path}?{query}")
        try:
            with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT_SECONDS) as response:
                return json.load(response)
        except urllib.error.HTTPError as error:  # 400/422: the answer says why
            return json.load(error)

    def query(self, expr: str) -> list[dict]:
        """The instant vector (or scalar as one series) of `expr` now; raises on an error."""
        answer = self.get("/api/v1/query", query=expr)
        if answer.get("status") != "success":
            raise PromQLError(f"{answer.get('errorType')}: {answer.get('error')}")
        data = answer["data"]
        return data["result"] if data["resultType"] in ("vector", "matrix") else [{"metric": {}, "value": data["result"]}]

    def label_values(self, selector: str, label: str) -> list[str]:
        answer = self.get("/api/v1/series", **{"match[]": selector})
        if answer.get("status") != "success":
            raise PromQLError(f"{answer.get('errorType')}: {answer.get('error')}")
        return sorted({series[label] for series in answer["data"] if label in series})


class PromQLError(RuntimeError):
    pass


def must_return_series(prometheus: Prometheus, expr: str) -> list[str]:
    """Failures of an expression that must return series (a panel, a recording rule)."""
    try:
        return [] if prometheus.query(expr) else [f"no series: {expr}"]
    except PromQLError as error:
        return [f"error ({error}): {expr}"]


def absence_arguments(expr: str) -> list[str]:
    """The arguments of every absent()/absent_over_time() in the expression."""
    parts = tokens(expr)
    return [
        " ".join(argument)
        for index, token in enumerate(parts[:-1])
        if token in ABSENCE_FUNCTIONS and parts[index + 1] == "("
        for argument in _call_arguments(parts[index:])
    ]


def without_offsets(expr: str) -> str:
    """The expression with its `offset <duration>` modifiers taken out."""
    parts = tokens(expr)
    return " ".join(token for index, token in enumerate(parts) if token != "offset" and (index == 0 or parts[index - 1] != "offset"))


def must_read_real_series(prometheus: Prometheus, expr: str) -> list[str]:
    """Failures of an alert's expression, by the rule of this module's docstring. What an
    absent() looks for must be there whatever the whole returns: absent(misspelt) is never empty."""
    failures = [failure for argument in absence_arguments(expr) for failure in must_read_real_series(prometheus, argument)]
    try:
        if prometheus.query(expr):
            return failures
    except PromQLError as error:
        return [*failures, f"error ({error}): {expr}"]
    if not filters(expr):
        if without_offsets(expr) != expr:  # a young Prometheus holds nothing that old: ask for now
            return [*failures, *must_read_real_series(prometheus, without_offsets(expr))]
        return [*failures, f"no series: {expr}"]
    return [*failures, *(failure for part in operands(expr) for failure in must_read_real_series(prometheus, part))]
