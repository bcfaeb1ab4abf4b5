"""Deploy tooling: start, check and stop a local corebank cluster.

A cluster is PostgreSQL shards, one etcd and the gRPC server workers, all on
127.0.0.1, with every file under one state folder. `python -m deploy.cluster`
(and `make up`) is the entry point; cluster.py is the lifecycle.
"""
