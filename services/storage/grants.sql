-- Who may do what on a shard: the roles of services/storage/roles.py, one per purpose.
-- A template (services/storage/schema.py fills in the role names and the state numbers),
-- applied by the owner right after schema.sql, in the same transaction, on every
-- `make up`. Every statement sets a privilege to exactly what it says, whatever it was
-- before (a cluster made when one role owned everything, a grant added by hand).
--
-- The owner owns the database, the schema's objects and alone runs DDL. The service role
-- (the gRPC workers and coordinators) reads and inserts, and updates only the columns the
-- protocol moves, and only rows that are not final: it cannot DELETE, TRUNCATE, ALTER,
-- DROP or CREATE anything, nor UPDATE a final transfer. Those are refused by privileges
-- here, whatever code runs as it; the triggers of schema.sql stay as a second line, which
-- also holds for the owner. The auditor reads only.

-- Only our roles connect; nobody but the owner makes schemas or temporary tables.
DO $$
BEGIN
    EXECUTE format('REVOKE ALL ON DATABASE %I FROM PUBLIC', current_database());
    EXECUTE format('GRANT CONNECT ON DATABASE %I TO {service}, {auditor}', current_database());
END;
$$;
REVOKE ALL ON SCHEMA public FROM PUBLIC;
GRANT USAGE ON SCHEMA public TO {service}, {auditor};

REVOKE ALL ON accounts, transfers, id_registry, tcc_transfers, tcc_barriers FROM PUBLIC, {service}, {auditor};
GRANT SELECT, INSERT ON accounts, transfers, id_registry, tcc_transfers, tcc_barriers TO {service};
GRANT SELECT ON accounts, transfers, id_registry, tcc_transfers, tcc_barriers TO {auditor};
-- Status changes, the four counters (services/storage/shard_store.py, batch_posting.py,
-- tcc_store.py). Never an account's identity, owner, currency, kind or tier.
GRANT UPDATE (status, debits_posted_minor, credits_posted_minor, debits_pending_minor, credits_pending_minor, updated_at)
    ON accounts TO {service};
-- A branch of a transfer between shards is PENDING until its confirm or cancel (tcc_store.py's
-- settle): status and finalized_at only, and only while PENDING (the policy below).
GRANT UPDATE (status, finalized_at, window_id) ON transfers TO {service};
-- A coordinator record's lease, attempts, fault and final state (tcc_store.py), only while
-- not final (the policy below). Never the transfer it describes.
GRANT UPDATE (state, reason, lease_owner, lease_epoch, lease_expires_at, attempts, fault, faulted_at, updated_at, finalized_at)
    ON tcc_transfers TO {service};
-- tcc_barriers and id_registry are insert-only: no UPDATE at all.

-- The sequences behind serial columns (transfers.seq, and audit_log's if it has one).
DO $$
DECLARE
    table_name text;
    sequence_name text;
BEGIN
    FOREACH table_name IN ARRAY ARRAY['transfers', 'audit_log'] LOOP
        CONTINUE WHEN to_regclass(table_name) IS NULL;
        FOR sequence_name IN
            SELECT pg_get_serial_sequence(table_name, attribute.attname)
            FROM pg_attribute AS attribute
            WHERE attribute.attrelid = to_regclass(table_name) AND attribute.attnum > 0 AND NOT attribute.attisdropped
              AND pg_get_serial_sequence(table_name, attribute.attname) IS NOT NULL
        LOOP
            EXECUTE format('REVOKE ALL ON SEQUENCE %s FROM PUBLIC, {service}, {auditor}', sequence_name);
            EXECUTE format('GRANT USAGE ON SEQUENCE %s TO {service}', sequence_name);
        END LOOP;
    END LOOP;
END;
$$;

-- The audit trail (its own section of schema.sql, when there): appended to and read by the
-- service, never changed by it; read by the auditor.
DO $$
BEGIN
    IF to_regclass('audit_log') IS NOT NULL THEN
        REVOKE ALL ON audit_log FROM PUBLIC, {service}, {auditor};
        GRANT SELECT, INSERT ON audit_log TO {service};
        GRANT SELECT ON audit_log TO {auditor};
    END IF;
END;
$$;

-- Clearing (schema.sql's clearing section): the service reads and inserts; it updates a position
-- share's counters and allotment, a window total's sums, the shard's current window, and on the
-- clearing home the registry's caps, windows' and settlements' states. Resets are insert-only.
-- Never DELETE (the triggers refuse it to anyone).
REVOKE ALL ON clearing_positions, clearing_window_totals, clearing_shard_window, clearing_position_resets,
    participants, participant_currencies, settlement_windows, settlements, settlement_entries FROM PUBLIC, {service}, {auditor};
GRANT SELECT, INSERT ON clearing_positions, clearing_window_totals, clearing_shard_window, clearing_position_resets,
    participants, participant_currencies, settlement_windows, settlements, settlement_entries TO {service};
GRANT SELECT ON clearing_positions, clearing_window_totals, clearing_shard_window, clearing_position_resets,
    participants, participant_currencies, settlement_windows, settlements, settlement_entries TO {auditor};
GRANT UPDATE (position_minor, reserved_minor, allotment_minor, updated_at) ON clearing_positions TO {service};
GRANT UPDATE (debits_minor, credits_minor, transfers) ON clearing_window_totals TO {service};
GRANT UPDATE (window_id, switched_at) ON clearing_shard_window TO {service};
GRANT UPDATE (net_debit_cap_minor, threshold_percent, updated_at) ON participant_currencies TO {service};
GRANT UPDATE (state, closed_at, reason, close_request_id, settlement_id) ON settlement_windows TO {service};
GRANT UPDATE (state, settled_at) ON settlements TO {service};
GRANT UPDATE (settled_at) ON settlement_entries TO {service};

-- Rows that are final stay as they are: row-level security lets the service role update
-- only rows that are not final; an UPDATE of a final row finds no row and changes nothing.
-- The owner (DDL, deploy) is not subject to these policies; the triggers hold for it.
-- Policies are dropped and created again in this same transaction: no moment without them.
ALTER TABLE transfers ENABLE ROW LEVEL SECURITY;
DROP POLICY IF EXISTS transfers_are_read ON transfers;
CREATE POLICY transfers_are_read ON transfers FOR SELECT TO {service}, {auditor} USING (true);
DROP POLICY IF EXISTS transfers_are_inserted ON transfers;
CREATE POLICY transfers_are_inserted ON transfers FOR INSERT TO {service} WITH CHECK (true);
DROP POLICY IF EXISTS pending_transfers_are_settled ON transfers;
CREATE POLICY pending_transfers_are_settled ON transfers FOR UPDATE TO {service}
    USING (status = {transfer_pending}) WITH CHECK (true);

ALTER TABLE tcc_transfers ENABLE ROW LEVEL SECURITY;
DROP POLICY IF EXISTS tcc_transfers_are_read ON tcc_transfers;
CREATE POLICY tcc_transfers_are_read ON tcc_transfers FOR SELECT TO {service}, {auditor} USING (true);
DROP POLICY IF EXISTS tcc_transfers_are_inserted ON tcc_transfers;
CREATE POLICY tcc_transfers_are_inserted ON tcc_transfers FOR INSERT TO {service} WITH CHECK (true);
DROP POLICY IF EXISTS undecided_tcc_transfers_are_driven ON tcc_transfers;
CREATE POLICY undecided_tcc_transfers_are_driven ON tcc_transfers FOR UPDATE TO {service}
    USING (state NOT IN ({coordinator_final_states})) WITH CHECK (true);
