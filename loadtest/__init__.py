"""Load tests and measurements of a running corebank cluster.

`python -m loadtest.bench` compares corebank with a pgbench baseline on the same
PostgreSQL instance; `loadtest/protobuf_impl_bench.py` measures the protobuf
runtimes behind the etcd client choice.
"""
