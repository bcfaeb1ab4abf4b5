"""The database roles of a shard, one per purpose, named here once.

deploy/postgres.py creates them and their passwords; services/storage/grants.sql
says what each may do. The service processes never name a role: they connect with
the shard map's DSN, which is the SERVICE role's. Kept free of imports, so that
deploy (status, down) can import it whatever state the rest of services/ is in.
"""

from __future__ import annotations

import enum


class DatabaseRole(enum.StrEnum):
    # Owns the database, its schema and every table; the only role that runs DDL
    # (services/storage/schema.py applies the schema as it, at deploy time).
    OWNER = "corebank_owner"
    # The gRPC workers and coordinators: reads, inserts and the few updates they need.
    # It keeps the name the single role had before roles were split, so that the DSNs
    # of older clusters (cluster.json, the shard map) name the same role.
    SERVICE = "corebank"
    # The invariant audit (services/storage/audit.py): reads only.
    AUDITOR = "corebank_auditor"
