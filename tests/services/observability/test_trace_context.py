"""Request ids and W3C traceparent: what a caller sends is kept only when well-formed."""

import re

import pytest

from services.observability import trace_context

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_SPAN_ID = "00f067aa0ba902b7"
HEX = re.compile(r"[0-9a-f]+")


@pytest.mark.parametrize("value", ["req-1", "01HZX3K8Q9", "a.b:c_d-e", "x" * trace_context.REQUEST_ID_LENGTH_MAX])
def test_a_well_formed_request_id_is_kept(value):
    assert trace_context.request_id(value) == value


@pytest.mark.parametrize("value", [None, "", "x" * (trace_context.REQUEST_ID_LENGTH_MAX + 1), "a b", 'a"b', "a\nb", "é", "<script>"])
def test_any_other_request_id_is_replaced_by_a_new_one(value):
    replaced = trace_context.request_id(value)
    assert replaced != value and trace_context.safe_id(replaced) == replaced
    assert trace_context.request_id(value) != replaced  # new each time


def test_a_valid_traceparent_continues_its_trace_in_a_new_span():
    context = trace_context.trace_context(f"00-{TRACE_ID}-{PARENT_SPAN_ID}-01")
    assert (context.trace_id, context.parent_span_id, context.sampled) == (TRACE_ID, PARENT_SPAN_ID, True)
    assert len(context.span_id) == trace_context.SPAN_ID_HEX_DIGITS and context.span_id != PARENT_SPAN_ID
    assert context.traceparent() == f"00-{TRACE_ID}-{context.span_id}-01"
    assert trace_context.parse_traceparent(f"00-{TRACE_ID}-{PARENT_SPAN_ID}-00") == (TRACE_ID, PARENT_SPAN_ID, False)


def test_a_later_version_may_add_fields():
    assert trace_context.parse_traceparent(f"01-{TRACE_ID}-{PARENT_SPAN_ID}-01-more") == (TRACE_ID, PARENT_SPAN_ID, True)


@pytest.mark.parametrize("value", [
    None, "", "garbage",
    f"ff-{TRACE_ID}-{PARENT_SPAN_ID}-01",  # version ff is invalid
    f"00-{TRACE_ID}-{PARENT_SPAN_ID}-01-extra",  # version 00 has exactly four fields
    f"00-{'0' * 32}-{PARENT_SPAN_ID}-01", f"00-{TRACE_ID}-{'0' * 16}-01",  # all-zero ids
    f"00-{TRACE_ID.upper()}-{PARENT_SPAN_ID}-01",  # uppercase hex
    f"00-{TRACE_ID[:-1]}-{PARENT_SPAN_ID}-01", f"00-{TRACE_ID}-{PARENT_SPAN_ID}-1",
    f"00-{TRACE_ID}-{PARENT_SPAN_ID}-01\n", f"01-{TRACE_ID}-{PARENT_SPAN_ID}-01-" + "x" * trace_context.TRACEPARENT_LENGTH_MAX,
])
def test_an_invalid_traceparent_starts_a_new_trace(value):
    assert trace_context.parse_traceparent(value) is None
    context = trace_context.trace_context(value)
    assert context.parent_span_id is None and not context.sampled
    assert len(context.trace_id) == trace_context.TRACE_ID_HEX_DIGITS and HEX.fullmatch(context.trace_id)
    assert len(context.span_id) == trace_context.SPAN_ID_HEX_DIGITS and HEX.fullmatch(context.span_id)
    assert context.trace_id != TRACE_ID
