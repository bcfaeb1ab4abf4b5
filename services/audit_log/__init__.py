"""The audit log: every money movement and privileged action, who, what, when and how it
ended, in append-only hash chains, one per writing process (chain.py: pure; writer.py: the
batching writer; store.py: PostgreSQL; `python -m services.audit_log verify` proves it).

Not the ledger's invariant audit (services/storage/audit.py): that one checks the money;
this one records who moved it."""
