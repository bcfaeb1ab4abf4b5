"""The slot map: which shard owns each slot, and how to reach each shard.

Pure data and validation; etcd_shard_map.py stores it and watches it.
"""

from __future__ import annotations

import dataclasses
import json

from sharding.slots import SLOT_COUNT, slot_of


@dataclasses.dataclass(frozen=True)
class Shard:
    name: str
    dsn: str


@dataclasses.dataclass(frozen=True)
class SlotRange:
    first_slot: int
    last_slot: int  # inclusive
    shard_name: str


class InvalidShardMap(ValueError):
    pass


@dataclasses.dataclass(frozen=True)
class ShardMap:
    version: int
    shards: tuple[Shard, ...]
    slot_ranges: tuple[SlotRange, ...]
    slot_count: int = SLOT_COUNT

    def __post_init__(self) -> None:
        names = [s.name for s in self.shards]
        if len(set(names)) != len(names) or not names:
            raise InvalidShardMap(f"shard names must be unique and non-empty: {names}")
        if self.slot_count != SLOT_COUNT:
            raise InvalidShardMap(f"slot_count {self.slot_count} differs from this build's {SLOT_COUNT}")
        expected_first = 0
        for slot_range in sorted(self.slot_ranges, key=lambda r: r.first_slot):
            if slot_range.first_slot != expected_first or slot_range.last_slot < slot_range.first_slot:
                raise InvalidShardMap(f"slot ranges must cover 0..{SLOT_COUNT - 1} without gaps or overlaps")
            if slot_range.shard_name not in names:
                raise InvalidShardMap(f"slot range names unknown shard {slot_range.shard_name!r}")
            expected_first = slot_range.last_slot + 1
        if expected_first != SLOT_COUNT:
            raise InvalidShardMap(f"slot ranges must cover 0..{SLOT_COUNT - 1} without gaps or overlaps")
        # A dense lookup table: one list index per request, no search.
        owner_by_slot: list[str] = [""] * SLOT_COUNT
        for slot_range in self.slot_ranges:
            owner_by_slot[slot_range.first_slot : slot_range.last_slot + 1] = [slot_range.shard_name] * (
                slot_range.last_slot - slot_range.first_slot + 1
            )
        object.__setattr__(self, "_owner_by_slot", tuple(owner_by_slot))

    @classmethod
    def evenly(cls, shards: list[Shard], version: int = 1) -> ShardMap:
        """Contiguous, near-equal slot ranges, one per shard, in the given order."""
        ranges = []
        for index, shard in enumerate(shards):
            first = index * SLOT_COUNT // len(shards)
            last = (index + 1) * SLOT_COUNT // len(shards) - 1
            ranges.append(SlotRange(first, last, shard.name))
        return cls(version=version, shards=tuple(shards), slot_ranges=tuple(ranges))

    def shard_name_for_slot(self, slot: int) -> str:
        return self._owner_by_slot[slot]  # type: ignore[attr-defined]

    def shard_name_for_key(self, key: str) -> str:
        return self._owner_by_slot[slot_of(key)]  # type: ignore[attr-defined]

    def shard(self, name: str) -> Shard:
        for shard in self.shards:
            if shard.name == name:
                return shard
        raise KeyError(name)

    def to_json(self) -> str:
        return json.dumps(
            {
                "version": self.version,
                "slot_count": self.slot_count,
                "shards": [{"name": s.name, "dsn": s.dsn} for s in self.shards],
                "slot_ranges": [
                    {"first_slot": r.first_slot, "last_slot": r.last_slot, "shard": r.shard_name}
                    for r in self.slot_ranges
                ],
            },
            indent=1,
        )

    @classmethod
    def from_json(cls, text: str | bytes) -> ShardMap:
        try:
            data = json.loads(text)
            return cls(
                version=int(data["version"]),
                slot_count=int(data["slot_count"]),
                shards=tuple(Shard(s["name"], s["dsn"]) for s in data["shards"]),
                slot_ranges=tuple(SlotRange(int(r["first_slot"]), int(r["last_slot"]), r["shard"]) for r in data["slot_ranges"]),
            )
        except (KeyError, TypeError, ValueError) as error:
            if isinstance(error, InvalidShardMap):
                raise
            raise InvalidShardMap(f"unreadable shard map: {error}") from error
