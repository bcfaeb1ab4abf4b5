"""Load tests and measurements of a running corebank cluster.

- `python -m loadtest.bench` (`make bench`): pgbench's baseline against
  corebank's figures on the same PostgreSQL, one JSON report per run; its
  phases are scenarios (`scenarios.py`) run by one driver (`driver.py`:
  closed loop, or open loop at a fixed arrival rate). `costs.py` splits what a
  transfer costs across the cluster (CPU per component, commits, round trips);
  `python -m loadtest.scaling` (`make bench-scaling`) measures the same on
  clusters of 1, 2 and 3 shards.
- `locustfile.py`: locust scenarios (flash-sale, everyday, batch) driving the
  gRPC API, in one process, in locust's web UI or as a master and workers;
  `python -m loadtest.run` (`make loadtest`) runs one headless and judges it:
  locust's figures against thresholds, then `check.py` verifies the ledger and
  every transfer the run sent. `swarm.py` holds what their processes share
  (which cluster a host names, the run folder's files), free of gevent.
- `accounts.py`: opening and funding a run's accounts (CreateTransfers), shared
  by both.
- `protobuf_impl_bench.py` measures the protobuf runtimes behind the etcd
  client choice.
"""
