"""Hash sharding: account id -> slot -> shard, with the slot map kept in etcd."""
