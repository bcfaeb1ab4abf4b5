"""The TCC coordinator of transfers between shards.

state_machine.py is the protocol as a pure function; driver.py runs it against
the shards (one transfer at a time); recovery.py takes over transfers whose
driver died; operator.py lists and retries in-doubt (and faulted) transfers.
Driver and recovery see the world through ports.py (a TCC store per shard, a
clock): wiring.py plugs in PostgreSQL (services/storage/tcc_store.py), and
simulation.py plugs in in-memory shards (memory_tcc.py) on a virtual clock to
run the real code under seeded crashes, failures and zombies. __main__.py is the
coordinator process.
"""
