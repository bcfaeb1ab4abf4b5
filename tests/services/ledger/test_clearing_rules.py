"""The pure rules of clearing (services/ledger/clearing.py): cap shares, their rebalancing and
its commit order, settlement entries and movements."""

from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st

from services.ledger import clearing, errors
from services.ledger.clearing import PositionShare, SettlementModel

SHARDS = ["shard-0", "shard-1", "shard-2"]
amounts = st.integers(min_value=-10_000, max_value=10_000)
shares_strategy = st.fixed_dictionaries({
    shard: st.builds(lambda position, reserved, allotment: PositionShare("p", "USD", position, reserved, allotment),
                     amounts, st.integers(min_value=0, max_value=5_000), st.one_of(st.none(), amounts))
    for shard in SHARDS
})


@settings(max_examples=300, deadline=None)
@given(shares_strategy, st.integers(min_value=0, max_value=50_000), st.sampled_from(SHARDS), st.integers(min_value=1, max_value=60_000))
def test_a_rebalance_keeps_the_whole_headroom_and_gives_the_need_when_it_fits(shares, cap_minor, need_shard, need_minor):
    allotments = clearing.rebalanced_allotments(shares, cap_minor, need_shard, need_minor)
    assert sum(allotments.values()) == cap_minor
    exposure = sum(share.exposure_minor for share in shares.values())
    after = {shard: PositionShare("p", "USD", share.position_minor, share.reserved_minor, allotments[shard]) for shard, share in shares.items()}
    # The need is served exactly when the whole position plus it stays within the cap.
    assert after[need_shard].fits(need_minor) == (exposure + need_minor <= cap_minor)


def test_no_cap_means_no_allotment_anywhere():
    shares = {shard: PositionShare("p", "USD", 100) for shard in SHARDS}
    assert clearing.rebalanced_allotments(shares, None, "shard-0", 10) == dict.fromkeys(SHARDS)
    assert PositionShare("p", "USD", 10**15).fits(10**15)


def test_headroom_on_other_shards_serves_a_debit_larger_than_an_even_share():
    shares = {shard: PositionShare("p", "USD") for shard in SHARDS}
    allotments = clearing.rebalanced_allotments(shares, 1000, "shard-1", 600)
    assert allotments["shard-1"] >= 600 and sum(allotments.values()) == 1000


def test_money_received_on_a_shard_counts_as_headroom_for_the_whole_participant():
    shares = {"shard-0": PositionShare("p", "USD", -500), "shard-1": PositionShare("p", "USD", 0)}
    allotments = clearing.rebalanced_allotments(shares, 1000, "shard-1", 1400)
    assert allotments["shard-1"] - 0 >= 1400


@settings(max_examples=300, deadline=None)
@given(st.fixed_dictionaries({shard: st.one_of(st.none(), amounts) for shard in SHARDS}),
       st.fixed_dictionaries({shard: amounts for shard in SHARDS}), st.sampled_from(SHARDS),
       st.one_of(st.none(), st.integers(min_value=0, max_value=30_000)), st.integers(min_value=0, max_value=30_000))
def test_every_prefix_of_the_commit_order_stays_within_the_committed_cap(old, new_shares, home, old_cap, new_cap):
    """Whatever prefix of the phases has committed when a process dies, the committed allotments
    never promise more than the cap committed with them (the home's phase writes the cap)."""
    if old_cap is not None:
        # Before: a consistent state under the old cap (every shard capped, summing to it).
        spread = clearing.rebalanced_allotments({shard: PositionShare("p", "USD") for shard in SHARDS}, old_cap)
        old = dict(spread)
    new = dict(new_shares)
    new[home] += new_cap - sum(new.values())  # a rebalance's result sums to the new cap
    committed = dict(old)
    cap = old_cap
    for phase in clearing.commit_phases(old, new, home):
        for shard in phase:
            committed[shard] = new[shard]
            if shard == home:
                cap = new_cap
        if cap is None:
            continue  # no cap committed yet: nothing is promised against one
        # Once a cap is committed, no shard is left without a share (unbounded) beside it.
        assert all(value is not None for value in committed.values())
        assert sum(committed.values()) <= cap


def test_a_shrinking_share_commits_before_the_home_and_a_growing_one_after():
    phases = clearing.commit_phases({"a": 500, "b": 500, "c": 0}, {"a": 200, "b": 300, "c": 500}, home="b")
    assert phases == [["a"], ["b"], ["c"]]
    assert clearing.commit_phases({"a": None, "b": None}, {"a": 10, "b": 20}, home="a") == [["b"], ["a"]]


def test_cleared_only_between_two_participants_and_never_a_settlement_account():
    assert clearing.cleared_between("acc_1", "alpha", "acc_2", "beta") == ("alpha", "beta")
    assert clearing.cleared_between("acc_1", "alpha", "acc_2", "alpha") is None
    assert clearing.cleared_between("acc_1", "alpha", "acc_2", None) is None
    assert clearing.cleared_between(clearing.settlement_account_id("alpha", "USD"), "alpha", "acc_2", "beta") is None
    assert clearing.cleared_between("acc_1", "alpha", clearing.settlement_bank_account_id("USD"), clearing.HOSTING_PARTICIPANT_ID) is None


def test_summed_totals_add_up_per_participant_and_leave_out_zeros():
    rows = [("alpha", "USD", 100, 30, 2), ("beta", "USD", 30, 100, 1), ("alpha", "USD", 5, 0, 1), ("gamma", "EUR", 0, 0, 0)]
    totals = clearing.summed_totals(rows)
    assert [(t.participant_id, t.debits_minor, t.credits_minor, t.transfer_count, t.net_minor) for t in totals] == [
        ("alpha", 105, 30, 3, 75), ("beta", 30, 100, 1, -70)
    ]
    assert clearing.nets_balance(totals) == {"USD": 5}
    assert clearing.nets_balance(clearing.summed_totals([("a", "USD", 10, 0, 1), ("b", "USD", 0, 10, 0)])) == {}


@pytest.mark.parametrize("model", list(SettlementModel))
def test_settlement_legs_move_the_settlement_account_by_the_entry(model):
    bank = clearing.settlement_bank_account_id("USD")
    for debits, credits in [(100, 30), (30, 100), (50, 50), (0, 70)]:
        total = clearing.ParticipantTotal("alpha", "USD", debits, credits, 1)
        legs = clearing.settlement_legs(7, model, total)
        own = clearing.settlement_account_id("alpha", "USD")
        moved = sum(leg.amount_minor if leg.credit_account_id == own else -leg.amount_minor for leg in legs)
        assert moved == -total.net_minor  # a participant that owes pays in; one that is owed is paid
        assert all(leg.amount_minor > 0 and {leg.debit_account_id, leg.credit_account_id} == {own, bank} for leg in legs)
        assert len({leg.transfer_id for leg in legs}) == len(legs)
        assert all(leg.transfer_id.startswith(clearing.SETTLEMENT_TRANSFER_ID_PREFIX) for leg in legs)
    gross = clearing.settlement_legs(7, SettlementModel.GROSS, clearing.ParticipantTotal("alpha", "USD", 100, 30, 1))
    net = clearing.settlement_legs(7, SettlementModel.DEFERRED_NET, clearing.ParticipantTotal("alpha", "USD", 100, 30, 1))
    assert [leg.amount_minor for leg in gross] == [100, 30] and [leg.amount_minor for leg in net] == [70]


def test_threshold_and_validation():
    assert clearing.threshold_reached(900, 1000, 90) and not clearing.threshold_reached(899, 1000, 90)
    assert not clearing.threshold_reached(10**12, None, 90)
    assert clearing.validate_threshold_percent(0) == clearing.DEFAULT_THRESHOLD_PERCENT
    for bad in (-1, 101):
        with pytest.raises(errors.InvalidField):
            clearing.validate_threshold_percent(bad)
    assert clearing.validate_participant_id("gcash-ph.1") == "gcash-ph.1"
    for bad, error in [("", errors.MissingField), ("x" * 33, errors.FieldTooLong), ("a b", errors.InvalidId), ("a:b", errors.InvalidId)]:
        with pytest.raises(error):
            clearing.validate_participant_id(bad)
    refusal = clearing.cap_exceeded("alpha", "USD", 1000)
    assert refusal.reason == "NET_DEBIT_CAP_EXCEEDED" and refusal.metadata == {"participant_id": "alpha", "currency": "USD", "net_debit_cap_minor": "1000"}
