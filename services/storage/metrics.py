"""Prometheus metrics of the storage adapter (a storage module never imports the API layer)."""

from prometheus_client import Counter

# One per batch of statements sent (Session.run), whichever layer sent it: `make bench` divides
# its increase by the transfers of a window to report round trips per transfer.
DB_ROUND_TRIPS = Counter(
    "corebank_db_round_trips", "Batches of statements sent to a shard, one round trip each", ["shard"]
)
