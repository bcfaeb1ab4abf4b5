"""A stable hash of an id onto a fixed number of slots.

The slot of an id never changes: moving data between shards means moving whole
slots (a later issue), never rehashing ids. Python's built-in hash() is salted
per process, so a keyed-free BLAKE2b digest is used instead.
"""

import hashlib

# Fixed for the life of a cluster: changing it would move almost every account.
SLOT_COUNT = 1024


def slot_of(key: str) -> int:
    digest = hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % SLOT_COUNT
