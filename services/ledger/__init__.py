"""The ledger domain: pure rules, no I/O. Storage and gRPC live elsewhere."""
