"""The audit log's hash chain, pure: what an entry is, its hash, and the proof that a chain holds.

An event is one thing that happened: who (subject, role), what (action, target, detail),
when (at_us, microseconds since the Unix epoch, on the writing process's clock) and how it
ended (outcome). Each writing process appends its events to a chain of its own, so that no
two writers ever contend for a chain's head: the n-th entry of a chain is the event with
(chain_id, seq = n), and its hash is

    hash(n) = SHA-256(hash(n - 1) || encoding(entry n)),    hash(0) = GENESIS_HASH (32 zero bytes)

`encoding` is unambiguous whatever the fields hold: the format tag ENCODING_VERSION
(preceded by its length in bytes as a 4-byte big-endian unsigned integer), then the length
in bytes of each field, in the order of ENCODED_FIELDS, each as a 4-byte big-endian
unsigned integer, then the fields' UTF-8 bytes one after the other (integers in decimal
ASCII). The lengths come first, all together, so that the common case (ASCII text) encodes
in one pass. So any change to any field of any entry, a deleted entry, two entries
swapped or entries deleted from a chain's start changes a hash that a later entry names,
and `verify` names the first link that does not hold. What a chain alone cannot show is
entries cut from its end: see `ChainReport.closed` and the anchors of `python -m
services.audit_log verify --anchors`.

No I/O here: the writer (writer.py) and the command (__main__.py) do that.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
import struct
from collections.abc import Iterable
from typing import NamedTuple

ENCODING_VERSION = "corebank.audit_log.v1"
GENESIS_HASH = bytes(32)
HASH_BYTES = 32

# What a stored text field may hold at most, so that an entry stays small whatever a request
# carried (an over-long id that the ledger refused is logged clipped).
TEXT_CHARS_MAX = 256
DETAIL_CHARS_MAX = 2048
CLIPPED_MARK = "..."

# The actions the writer itself logs: a chain's first entry, and its last on a clean stop.
CHAIN_OPENED = "chain_opened"
CHAIN_CLOSED = "chain_closed"


class Event(NamedTuple):
    """One thing that happened, not yet placed in a chain (make them with `event`)."""

    at_us: int
    subject: str
    role: str
    action: str
    target: str
    detail: str  # canonical JSON text of a small object (`detail_text`), or ""
    outcome: str


class Entry(NamedTuple):
    """An event placed at `seq` (from 1) of the chain `chain_id`: what the hash covers."""

    chain_id: str
    seq: int
    at_us: int
    subject: str
    role: str
    action: str
    target: str
    detail: str
    outcome: str


ENCODED_FIELDS = Entry._fields


class Link(NamedTuple):
    """An entry as stored: with the hash of the entry before it and its own."""

    entry: Entry
    prev_hash: bytes
    hash: bytes


def clean_text(value: str, chars_max: int = TEXT_CHARS_MAX) -> str:
    """`value` as a field may store it: at most `chars_max` characters, no NUL (PostgreSQL text
    cannot hold one) and valid UTF-8 (a lone surrogate, which a JSON token may carry, is
    escaped). Only what a client sent can need it; ids the ledger accepted pass unchanged."""
    if len(value) > chars_max:
        value = value[: chars_max - len(CLIPPED_MARK)] + CLIPPED_MARK
    escaped = False
    if not value.isascii():
        value, escaped = value.encode("utf-8", "backslashreplace").decode("utf-8"), True
    if "\x00" in value:
        value, escaped = value.replace("\x00", "\\x00"), True
    if escaped and len(value) > chars_max:  # escapes are longer than what they stand for
        value = value[: chars_max - len(CLIPPED_MARK)] + CLIPPED_MARK
    return value


# ensure_ascii: the text holds only ASCII (a NUL or a lone surrogate is escaped as \uXXXX).
_detail_json = json.JSONEncoder(ensure_ascii=True, separators=(",", ":"), sort_keys=True).encode


def detail_text(detail: dict) -> str:
    """A small object as canonical JSON text: sorted keys, no whitespace, ASCII only."""
    return _detail_json(detail)


def event(at_us: int, subject: str, role: str, action: str, target: str, detail: str, outcome: str) -> Event:
    """An event whose fields can be stored and encoded whatever they came from."""
    return Event(
        at_us, clean_text(subject), clean_text(role), clean_text(action), clean_text(target),
        clean_text(detail, DETAIL_CHARS_MAX), clean_text(outcome),
    )


def in_chain(chain_id: str, seq: int, happened: Event) -> Entry:
    return Entry(chain_id, seq, *happened)


_VERSION_FIELD = len(ENCODING_VERSION.encode()).to_bytes(4, "big") + ENCODING_VERSION.encode()
_LENGTHS = struct.Struct(f">{len(ENCODED_FIELDS)}I")


def encoding(entry: Entry) -> bytes:
    """The bytes the hash covers (see the module's docstring)."""
    values = (entry.chain_id, str(entry.seq), str(entry.at_us), entry.subject, entry.role, entry.action,
              entry.target, entry.detail, entry.outcome)
    text = "".join(values)
    if text.isascii():  # then each field's length in characters is its length in bytes
        return _VERSION_FIELD + _LENGTHS.pack(*map(len, values)) + text.encode("ascii")
    data = [value.encode() for value in values]
    return _VERSION_FIELD + _LENGTHS.pack(*map(len, data)) + b"".join(data)


def entry_hash(prev_hash: bytes, entry: Entry) -> bytes:
    return hashlib.sha256(prev_hash + encoding(entry)).digest()


def link(prev_hash: bytes, entry: Entry) -> Link:
    return Link(entry, prev_hash, entry_hash(prev_hash, entry))


def chained(chain_id: str, first_seq: int, prev_hash: bytes, events: Iterable[Event]) -> list[Link]:
    """Events appended to a chain whose last entry is (first_seq - 1, prev_hash)."""
    links = []
    seq = first_seq
    for happened in events:
        entry = Entry(chain_id, seq, *happened)
        digest = hashlib.sha256(prev_hash + encoding(entry)).digest()
        links.append(Link(entry, prev_hash, digest))
        prev_hash = digest
        seq += 1
    return links


class Problem(enum.StrEnum):
    """Why a link does not hold; the JSON output names breaks by these."""

    MISSING = "missing"  # no entry with this seq, and a later one exists (or the chain does not start at 1)
    OUT_OF_ORDER = "out_of_order"  # an entry whose seq repeats or goes back
    OTHER_CHAIN = "other_chain"  # an entry of another chain among this chain's entries
    PREV_HASH = "prev_hash_differs"  # does not name the hash of the entry before it
    HASH = "hash_differs"  # its stored hash is not the hash of its content
    # Across chains (python -m services.audit_log verify):
    ANCHOR = "anchor_differs"  # an anchor names an entry (seq, hash) this chain does not hold
    SEVERAL_SHARDS = "chain_on_several_shards"  # one chain's entries stored on more than one shard


@dataclasses.dataclass(frozen=True)
class Break:
    """The first link of a chain that does not hold."""

    chain_id: str
    seq: int
    problem: Problem
    detail: str

    def __str__(self) -> str:
        return f"chain {self.chain_id}: first broken link at seq {self.seq}: {self.problem}: {self.detail}"

    def as_json(self) -> dict:
        return {"chain_id": self.chain_id, "seq": self.seq, "problem": str(self.problem), "detail": self.detail}


@dataclasses.dataclass
class ChainReport:
    """What one pass over a chain's stored entries proves."""

    chain_id: str
    entries: int = 0
    last_seq: int = 0
    head_hash: bytes = GENESIS_HASH  # the hash of the last entry that holds
    first_at_us: int | None = None
    last_at_us: int | None = None
    # The chain's writer logged its last entry on a clean stop. A chain that is not closed
    # was cut short by a crash, is still being written, or lost entries from its end.
    closed: bool = False
    broken: Break | None = None

    def as_json(self) -> dict:
        return {
            "chain_id": self.chain_id, "entries": self.entries, "last_seq": self.last_seq, "head_hash": self.head_hash.hex(),
            "first_at_us": self.first_at_us, "last_at_us": self.last_at_us, "closed": self.closed,
            "broken": self.broken.as_json() if self.broken else None,
        }


def check(chain_id: str, links: Iterable[Link]) -> ChainReport:
    """Walk one chain's stored entries in the order of seq (as stored; not re-sorted, so that
    a chain of any length streams through) and stop at the first link that does not hold:
    seq must run 1, 2, 3, ...; each entry must name the hash of the one before it (GENESIS_HASH
    for the first); each stored hash must be the hash of its entry's content."""
    report = ChainReport(chain_id)
    expected_seq, prev_hash = 1, GENESIS_HASH

    def broken(seq: int, problem: Problem, detail: str) -> ChainReport:
        report.broken = Break(chain_id, seq, problem, detail)
        return report

    for entry, stored_prev_hash, stored_hash in links:
        if entry.chain_id != chain_id:
            return broken(expected_seq, Problem.OTHER_CHAIN, f"an entry of chain {entry.chain_id!r} (seq {entry.seq}) stands here")
        if entry.seq != expected_seq:
            if entry.seq > expected_seq:
                missing = f"{expected_seq}" if entry.seq == expected_seq + 1 else f"{expected_seq}..{entry.seq - 1}"
                return broken(expected_seq, Problem.MISSING, f"no entry with seq {missing}; the next stored is {entry.seq}")
            return broken(expected_seq, Problem.OUT_OF_ORDER, f"seq {entry.seq} stored after seq {expected_seq - 1}")
        if stored_prev_hash != prev_hash:
            before = "the genesis hash" if expected_seq == 1 else f"the hash of seq {expected_seq - 1}"
            return broken(expected_seq, Problem.PREV_HASH, f"names {bytes(stored_prev_hash).hex()[:16]}..., not {before} ({prev_hash.hex()[:16]}...)")
        digest = hashlib.sha256(prev_hash + encoding(entry)).digest()
        if stored_hash != digest:
            return broken(expected_seq, Problem.HASH, f"stored hash {bytes(stored_hash).hex()[:16]}... is not the hash of its content ({digest.hex()[:16]}...)")
        report.entries += 1
        report.last_seq = expected_seq
        report.head_hash = digest
        if report.first_at_us is None:
            report.first_at_us = entry.at_us
        report.last_at_us = entry.at_us
        report.closed = entry.action == CHAIN_CLOSED
        expected_seq += 1
        prev_hash = digest
    return report


class LinkTaken(Exception):
    """A seq of this process's chain already holds another entry than the one it wrote: someone
    with the service role's INSERT right wrote there first. The writer leaves the chain at once;
    the new chain's opening names the seqs, and verify shows the stranger's links."""


def anchor_break(report: ChainReport, seq: int, anchored_hash: bytes, stored_hash: bytes | None, source: str) -> Break | None:
    """Whether a chain still holds an entry that was seen earlier (an anchor: `seq` with
    `anchored_hash`, named by `source`); `stored_hash` is the chain's hash at `seq`, None
    when it has no such entry. Only a link the chain proves (seq <= last_seq) counts."""
    if seq > report.last_seq:
        if report.broken is not None and report.broken.seq <= seq:
            return None  # the chain's own break, reported already, comes first
        return Break(report.chain_id, report.last_seq + 1, Problem.ANCHOR,
                     f"{source} names seq {seq}, but the chain ends at seq {report.last_seq}: entries were cut from its end")
    if stored_hash != anchored_hash:
        return Break(report.chain_id, seq, Problem.ANCHOR,
                     f"{source} names hash {anchored_hash.hex()[:16]}... at seq {seq}, the chain holds {(stored_hash or b'').hex()[:16]}...")
    return None


def verify(links: Iterable[Link]) -> Break | None:
    """The first broken link of one chain's entries (in seq order), or None when it holds."""
    links = iter(links)
    first = next(links, None)
    if first is None:
        return None
    return check(first.entry.chain_id, _prepend(first, links)).broken


def _prepend(first: Link, rest: Iterable[Link]) -> Iterable[Link]:
    yield first
    yield from rest
