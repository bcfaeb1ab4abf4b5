"""PostgreSQL adapter: one database per shard, same schema on every shard."""
