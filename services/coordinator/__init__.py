"""The TCC coordinator of transfers between shards.

state_machine.py is the protocol as a pure function; driver.py runs it against
the shards (one transfer at a time); recovery.py is the coordinator process
that takes over transfers whose driver died; operator.py lists and retries
in-doubt transfers.
"""
