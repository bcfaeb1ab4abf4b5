"""Pure tests of slot hashing and the shard map."""

import collections

import pytest
from hypothesis import given, strategies as st

from sharding.shard_map import InvalidShardMap, Shard, ShardMap, SlotRange
from sharding.slots import SLOT_COUNT, slot_of

THREE_SHARDS = [Shard(f"shard-{i}", f"dsn-{i}") for i in range(3)]


def test_slot_of_is_stable_across_processes_and_releases():
    # Known vectors: if these change, every account would move to another shard.
    assert slot_of("acc_example") == 469
    assert slot_of("") == 692


@given(st.text(max_size=80))
def test_slot_of_stays_in_range(key):
    assert 0 <= slot_of(key) < SLOT_COUNT


def test_slots_spread_evenly_over_shards():
    shard_map = ShardMap.evenly(THREE_SHARDS)
    counts = collections.Counter(shard_map.shard_name_for_key(f"acc_{i}") for i in range(30000))
    assert set(counts) == {"shard-0", "shard-1", "shard-2"}
    assert all(9000 < count < 11000 for count in counts.values()), counts


@pytest.mark.parametrize("shard_count", [1, 2, 3, 7, 64])
def test_evenly_covers_every_slot_exactly_once(shard_count):
    shards = [Shard(f"shard-{i}", "") for i in range(shard_count)]
    shard_map = ShardMap.evenly(shards)
    owners = [shard_map.shard_name_for_slot(slot) for slot in range(SLOT_COUNT)]
    sizes = collections.Counter(owners)
    assert len(sizes) == shard_count
    assert max(sizes.values()) - min(sizes.values()) <= 1


def test_json_round_trip_keeps_every_owner():
    shard_map = ShardMap.evenly(THREE_SHARDS, version=7)
    restored = ShardMap.from_json(shard_map.to_json())
    assert restored == shard_map
    assert [restored.shard_name_for_slot(s) for s in range(SLOT_COUNT)] == [
        shard_map.shard_name_for_slot(s) for s in range(SLOT_COUNT)
    ]


@pytest.mark.parametrize(
    "ranges",
    [
        [SlotRange(0, 500, "shard-0")],  # gap at the end
        [SlotRange(0, 600, "shard-0"), SlotRange(500, SLOT_COUNT - 1, "shard-1")],  # overlap
        [SlotRange(1, SLOT_COUNT - 1, "shard-0")],  # gap at the start
        [SlotRange(0, SLOT_COUNT - 1, "shard-9")],  # unknown shard
    ],
)
def test_maps_that_lose_or_double_slots_are_refused(ranges):
    with pytest.raises(InvalidShardMap):
        ShardMap(version=1, shards=tuple(THREE_SHARDS[:2]), slot_ranges=tuple(ranges))


def test_unreadable_json_is_refused():
    with pytest.raises(InvalidShardMap):
        ShardMap.from_json('{"version": 1}')
