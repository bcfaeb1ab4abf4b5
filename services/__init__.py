"""corebank services: the ledger domain, its PostgreSQL storage and the gRPC API."""
