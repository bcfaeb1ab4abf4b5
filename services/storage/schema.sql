-- The schema of every shard. Idempotent: `make up` applies it on every start.
-- Enum columns hold the proto enum numbers (corebank.v1.AccountKind, AccountStatus, TransferStatus).

CREATE TABLE IF NOT EXISTS accounts (
    account_id            text PRIMARY KEY,
    -- The OpenAccount idempotency key; account_id is derived from it, so the
    -- primary key already makes it unique.
    request_id            text NOT NULL,
    owner_id              text NOT NULL,
    currency              text NOT NULL,
    kind                  smallint NOT NULL,
    tier                  integer NOT NULL,
    status                smallint NOT NULL,
    debits_posted_minor   bigint NOT NULL DEFAULT 0 CHECK (debits_posted_minor >= 0),
    credits_posted_minor  bigint NOT NULL DEFAULT 0 CHECK (credits_posted_minor >= 0),
    debits_pending_minor  bigint NOT NULL DEFAULT 0 CHECK (debits_pending_minor >= 0),
    credits_pending_minor bigint NOT NULL DEFAULT 0 CHECK (credits_pending_minor >= 0),
    created_at            timestamptz NOT NULL DEFAULT now(),
    updated_at            timestamptz NOT NULL DEFAULT now(),
    -- A MERCHANT whose payments are collected in sub-accounts on every shard (flash sales).
    collect_on_every_shard boolean NOT NULL DEFAULT false,
    -- Set on those sub-accounts: the merchant they are swept into.
    parent_account_id     text,
    -- A safety net under the service's own checks: only SYSTEM accounts (kind 3)
    -- may go negative. numeric, because the difference may leave the bigint range.
    CONSTRAINT only_system_accounts_go_negative CHECK (
        kind = 3
        OR credits_posted_minor::numeric - debits_posted_minor::numeric - debits_pending_minor::numeric >= 0
    )
);

CREATE INDEX IF NOT EXISTS accounts_by_parent ON accounts (parent_account_id) WHERE parent_account_id IS NOT NULL;

CREATE TABLE IF NOT EXISTS transfers (
    transfer_id       text PRIMARY KEY,
    -- Arrival order on this shard, for newest-first listings and page tokens.
    seq               bigserial NOT NULL UNIQUE,
    debit_account_id  text NOT NULL,
    credit_account_id text NOT NULL,
    amount_minor      bigint NOT NULL CHECK (amount_minor > 0),
    currency          text NOT NULL,
    reference         text NOT NULL DEFAULT '',
    status            smallint NOT NULL,
    reason            text NOT NULL DEFAULT '',
    created_at        timestamptz NOT NULL DEFAULT now(),
    finalized_at      timestamptz,
    -- 0: both accounts on this shard. A transfer between shards leaves one row on
    -- each: 1 on the debit shard (debits debit_account_id, credits clearing_account_id),
    -- 2 on the credit shard (debits clearing_account_id, credits credit_account_id).
    -- 3: a payment to a merchant collecting on every shard: credits its sub-account on
    -- this shard (clearing_account_id); credit_account_id names the merchant.
    branch            smallint NOT NULL DEFAULT 0 CHECK (branch IN (0, 1, 2, 3)),
    clearing_account_id text,
    CHECK (debit_account_id <> credit_account_id),
    CHECK ((branch = 0) = (clearing_account_id IS NULL))
);

CREATE INDEX IF NOT EXISTS transfers_by_debit_account ON transfers (debit_account_id, seq DESC);
CREATE INDEX IF NOT EXISTS transfers_by_credit_account ON transfers (credit_account_id, seq DESC);
-- Sweeps that failed (VOIDED 3, REJECTED 4): their count is part of the next sweep's id.
CREATE INDEX IF NOT EXISTS transfers_failed_sweeps ON transfers (debit_account_id)
    WHERE status IN (3, 4) AND starts_with(debit_account_id, 'sub_');

-- Transfers are never deleted, and never changed once final (POSTED 2, VOIDED 3,
-- REJECTED 4). A PENDING transfer may only change status, finalized_at and window_id.
CREATE OR REPLACE FUNCTION transfers_are_immutable() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' OR TG_OP = 'TRUNCATE' THEN
        RAISE EXCEPTION 'transfers are never deleted' USING ERRCODE = 'restrict_violation';
    END IF;
    IF OLD.status IN (2, 3, 4) THEN
        RAISE EXCEPTION 'transfer % is final', OLD.transfer_id USING ERRCODE = 'restrict_violation';
    END IF;
    IF (NEW.transfer_id, NEW.seq, NEW.debit_account_id, NEW.credit_account_id, NEW.amount_minor,
        NEW.currency, NEW.reference, NEW.created_at, NEW.branch, NEW.clearing_account_id,
        to_jsonb(NEW) -> 'payer_participant_id', to_jsonb(NEW) -> 'payee_participant_id')
       IS DISTINCT FROM
       (OLD.transfer_id, OLD.seq, OLD.debit_account_id, OLD.credit_account_id, OLD.amount_minor,
        OLD.currency, OLD.reference, OLD.created_at, OLD.branch, OLD.clearing_account_id,
        to_jsonb(OLD) -> 'payer_participant_id', to_jsonb(OLD) -> 'payee_participant_id') THEN
        RAISE EXCEPTION 'transfer % may only change status', OLD.transfer_id USING ERRCODE = 'restrict_violation';
    END IF;
    RETURN NEW;
END;
$$;

DROP TRIGGER IF EXISTS transfers_are_immutable ON transfers;
CREATE TRIGGER transfers_are_immutable BEFORE UPDATE OR DELETE ON transfers
    FOR EACH ROW EXECUTE FUNCTION transfers_are_immutable();
DROP TRIGGER IF EXISTS transfers_are_never_truncated ON transfers;
CREATE TRIGGER transfers_are_never_truncated BEFORE TRUNCATE ON transfers
    FOR EACH STATEMENT EXECUTE FUNCTION transfers_are_immutable();

-- The bank-wide registry of idempotency keys: a transfer_id (namespace 1) or an
-- OpenAccount request_id (namespace 2) is registered on the shard its own hash picks,
-- before it is used, with the fields it was first used for. So an id names one thing
-- bank-wide, wherever its accounts live (services.ledger.ids.IdNamespace). Insert-only.
CREATE TABLE IF NOT EXISTS id_registry (
    namespace  smallint NOT NULL CHECK (namespace IN (1, 2)),
    id         text NOT NULL,
    fields     jsonb NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (namespace, id)
);

-- The TCC coordinator's record of a transfer between shards. It lives on the
-- debit account's shard and is written in the same local transaction as the
-- debit branch's try. Every change is a compare-and-set on (state, lease_epoch):
-- a coordinator whose lease was taken over can no longer change anything.
CREATE TABLE IF NOT EXISTS tcc_transfers (
    transfer_id        text PRIMARY KEY,
    debit_account_id   text NOT NULL,
    credit_account_id  text NOT NULL,
    amount_minor       bigint NOT NULL CHECK (amount_minor > 0),
    currency           text NOT NULL,
    reference          text NOT NULL DEFAULT '',
    credit_shard       text NOT NULL,
    -- services.coordinator.state_machine.CoordinatorState
    state              smallint NOT NULL,
    reason             text NOT NULL DEFAULT '',
    lease_owner        text NOT NULL,
    lease_epoch        bigint NOT NULL DEFAULT 1,
    lease_expires_at   timestamptz NOT NULL,
    -- Not confirmed by then: the coordinator cancels it, releasing the reservations.
    pending_expires_at timestamptz NOT NULL,
    attempts           integer NOT NULL DEFAULT 0,
    created_at         timestamptz NOT NULL DEFAULT now(),
    updated_at         timestamptz NOT NULL DEFAULT now(),
    finalized_at       timestamptz
);
CREATE INDEX IF NOT EXISTS tcc_transfers_in_doubt ON tcc_transfers (lease_expires_at) WHERE finalized_at IS NULL;
-- A permanent fault met while driving a transfer that could not be cancelled any more
-- (services/coordinator/driver.py): recovery skips a faulted record instead of looping on
-- it; `python -m services.coordinator.operator list` shows it, `retry` clears it.
ALTER TABLE tcc_transfers ADD COLUMN IF NOT EXISTS fault text NOT NULL DEFAULT '';
ALTER TABLE tcc_transfers ADD COLUMN IF NOT EXISTS faulted_at timestamptz;

-- The participant's barrier: one insert-only row per (transfer, branch, operation),
-- written inside the operation's own local transaction. A repeated operation finds
-- its row and changes nothing; a cancel that finds no try row inserts one, so a
-- late try can never apply ("empty cancel", "no hanging").
CREATE TABLE IF NOT EXISTS tcc_barriers (
    transfer_id text NOT NULL,
    branch      smallint NOT NULL CHECK (branch IN (1, 2)),
    operation   text NOT NULL CHECK (operation IN ('try', 'confirm', 'cancel')),
    -- For a 'try' row: whether the try applied ('applied'), was refused ('refused'),
    -- or was written by a cancel that came first ('blocked_by_cancel').
    outcome     text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (transfer_id, branch, operation)
);

-- Rows that are history are never deleted: an account that disappears takes its
-- counters out of its shard's sums, so the audit could no longer see that money
-- went missing; a coordinator record or a barrier row that disappears lets a late
-- or repeated TCC operation apply twice. The audit (services/storage/audit.py)
-- relies on all of them staying.
CREATE OR REPLACE FUNCTION rows_are_never_deleted() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION '% rows are never deleted', TG_TABLE_NAME USING ERRCODE = 'restrict_violation';
END;
$$;

DROP TRIGGER IF EXISTS accounts_are_never_deleted ON accounts;
CREATE TRIGGER accounts_are_never_deleted BEFORE DELETE ON accounts
    FOR EACH ROW EXECUTE FUNCTION rows_are_never_deleted();
DROP TRIGGER IF EXISTS accounts_are_never_truncated ON accounts;
CREATE TRIGGER accounts_are_never_truncated BEFORE TRUNCATE ON accounts
    FOR EACH STATEMENT EXECUTE FUNCTION rows_are_never_deleted();
DROP TRIGGER IF EXISTS tcc_transfers_are_never_deleted ON tcc_transfers;
CREATE TRIGGER tcc_transfers_are_never_deleted BEFORE DELETE ON tcc_transfers
    FOR EACH ROW EXECUTE FUNCTION rows_are_never_deleted();
DROP TRIGGER IF EXISTS tcc_transfers_are_never_truncated ON tcc_transfers;
CREATE TRIGGER tcc_transfers_are_never_truncated BEFORE TRUNCATE ON tcc_transfers
    FOR EACH STATEMENT EXECUTE FUNCTION rows_are_never_deleted();
DROP TRIGGER IF EXISTS tcc_barriers_are_never_deleted ON tcc_barriers;
CREATE TRIGGER tcc_barriers_are_never_deleted BEFORE DELETE ON tcc_barriers
    FOR EACH ROW EXECUTE FUNCTION rows_are_never_deleted();
DROP TRIGGER IF EXISTS tcc_barriers_are_never_truncated ON tcc_barriers;
CREATE TRIGGER tcc_barriers_are_never_truncated BEFORE TRUNCATE ON tcc_barriers
    FOR EACH STATEMENT EXECUTE FUNCTION rows_are_never_deleted();

-- The id registry (when this schema has it): an id, once registered, names its first
-- use for ever. Guarded, so that this file applies to a schema without the table too.
DO $$
BEGIN
    IF to_regclass('id_registry') IS NOT NULL THEN
        DROP TRIGGER IF EXISTS id_registry_is_never_deleted ON id_registry;
        CREATE TRIGGER id_registry_is_never_deleted BEFORE DELETE ON id_registry
            FOR EACH ROW EXECUTE FUNCTION rows_are_never_deleted();
        DROP TRIGGER IF EXISTS id_registry_is_never_truncated ON id_registry;
        CREATE TRIGGER id_registry_is_never_truncated BEFORE TRUNCATE ON id_registry
            FOR EACH STATEMENT EXECUTE FUNCTION rows_are_never_deleted();
    END IF;
END;
$$;

-- ---------------------------------------------------------------------------------------------
-- The audit log (services/audit_log): every money movement and privileged action, who, what,
-- when and how it ended, in hash chains (services/audit_log/chain.py). Each writing process
-- appends to a chain of its own, kept on one shard; `python -m services.audit_log verify`
-- proves every chain of every shard. Append-only: the service role needs INSERT and SELECT on
-- it and nothing else (its inserts are ON CONFLICT DO NOTHING, which needs no UPDATE right),
-- and these triggers refuse UPDATE, DELETE and TRUNCATE to anyone, the owner included, as long
-- as the triggers stand; a change made past them (the owner disabling them, a superuser's
-- session_replication_role) breaks a hash that `verify` names.
-- at_us: microseconds since the Unix epoch on the writer's clock (to_timestamp(at_us / 1e6));
-- detail: canonical JSON text, hashed as stored (text, not jsonb, which would reorder it).
-- written_at is the database's clock when the row arrived: outside the hash, for lag only.
CREATE TABLE IF NOT EXISTS audit_log (
    chain_id   text NOT NULL,
    seq        bigint NOT NULL CHECK (seq >= 1),
    at_us      bigint NOT NULL,
    subject    text NOT NULL,
    role       text NOT NULL,
    action     text NOT NULL,
    target     text NOT NULL,
    detail     text NOT NULL,
    outcome    text NOT NULL,
    prev_hash  bytea NOT NULL CHECK (length(prev_hash) = 32),
    hash       bytea NOT NULL CHECK (length(hash) = 32),
    written_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (chain_id, seq)
);

CREATE OR REPLACE FUNCTION audit_log_is_append_only() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit_log is append-only (% refused)', TG_OP USING ERRCODE = 'restrict_violation';
END;
$$;

DROP TRIGGER IF EXISTS audit_log_is_append_only ON audit_log;
CREATE TRIGGER audit_log_is_append_only BEFORE UPDATE OR DELETE ON audit_log
    FOR EACH ROW EXECUTE FUNCTION audit_log_is_append_only();
DROP TRIGGER IF EXISTS audit_log_is_never_truncated ON audit_log;
CREATE TRIGGER audit_log_is_never_truncated BEFORE TRUNCATE ON audit_log
    FOR EACH STATEMENT EXECUTE FUNCTION audit_log_is_append_only();
-- End of the audit log's section.
-- ---------------------------------------------------------------------------------------------
-- ---------------------------------------------------------------------------------------------
-- Clearing between participants (services/ledger/clearing.py has the model; storage is
-- services/storage/clearing_store.py). Every account belongs to a participant; a transfer
-- between two participants is cleared on its debit shard, in the transaction that posts it.
ALTER TABLE accounts ADD COLUMN IF NOT EXISTS participant_id text NOT NULL DEFAULT 'corebank';
-- On rows of cleared transfers (branch 0, 3, and 1 from its try on): the participants, and the
-- window the transfer joined when it posted (branch 1: set by its confirm, while PENDING).
ALTER TABLE transfers ADD COLUMN IF NOT EXISTS payer_participant_id text;
ALTER TABLE transfers ADD COLUMN IF NOT EXISTS payee_participant_id text;
ALTER TABLE transfers ADD COLUMN IF NOT EXISTS window_id bigint;
CREATE INDEX IF NOT EXISTS transfers_by_window ON transfers (window_id) WHERE window_id IS NOT NULL;
-- The coordinator record carries them too: the credit branch checks that its account still
-- belongs to the payee named at the try (NULL: a record from before clearing, not cleared).
ALTER TABLE tcc_transfers ADD COLUMN IF NOT EXISTS payer_participant_id text;
ALTER TABLE tcc_transfers ADD COLUMN IF NOT EXISTS payee_participant_id text;

-- This shard's share of each participant's position per currency (PositionShare).
CREATE TABLE IF NOT EXISTS clearing_positions (
    participant_id  text NOT NULL,
    currency        text NOT NULL,
    -- Posted: paid - received on this shard, less the windows settled for it.
    position_minor  bigint NOT NULL DEFAULT 0,
    -- Debits between shards tried here, not yet confirmed or cancelled.
    reserved_minor  bigint NOT NULL DEFAULT 0 CHECK (reserved_minor >= 0),
    -- This shard's share of the net debit cap (the shares sum to the cap); NULL: no cap.
    allotment_minor bigint,
    updated_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (participant_id, currency)
);
-- What each participant paid and received per window on this shard: kept by the transactions
-- that post cleared transfers, so closing and settling a window never scans its transfers.
CREATE TABLE IF NOT EXISTS clearing_window_totals (
    window_id      bigint NOT NULL,
    participant_id text NOT NULL,
    currency       text NOT NULL,
    debits_minor   bigint NOT NULL DEFAULT 0 CHECK (debits_minor >= 0),
    credits_minor  bigint NOT NULL DEFAULT 0 CHECK (credits_minor >= 0),
    -- Cleared transfers this participant paid in the window here.
    transfers      bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (window_id, participant_id, currency)
);
-- The window this shard's transfers join (one row). Transactions that post cleared transfers
-- read it under a shared advisory lock; a window close changes it under the exclusive one.
CREATE TABLE IF NOT EXISTS clearing_shard_window (
    singleton   boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    window_id   bigint NOT NULL,
    switched_at timestamptz NOT NULL DEFAULT now()
);
INSERT INTO clearing_shard_window (window_id) VALUES (1) ON CONFLICT DO NOTHING;
-- A settlement's windows taken out of a participant's position on this shard: the barrier
-- that makes RecordParticipantSettled's reset happen once per shard.
CREATE TABLE IF NOT EXISTS clearing_position_resets (
    settlement_id  bigint NOT NULL,
    participant_id text NOT NULL,
    currency       text NOT NULL,
    amount_minor   bigint NOT NULL,
    created_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (settlement_id, participant_id, currency)
);

-- The clearing registry: on every shard by this schema, used on the clearing home shard only
-- (the shard the key 'clearing' hashes to, services/storage/clearing_store.py).
CREATE TABLE IF NOT EXISTS participants (
    participant_id text PRIMARY KEY,
    request_id     text NOT NULL UNIQUE,
    name           text NOT NULL,
    created_at     timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS participant_currencies (
    participant_id        text NOT NULL REFERENCES participants,
    currency              text NOT NULL,
    settlement_account_id text NOT NULL,
    -- NULL: no cap.
    net_debit_cap_minor   bigint CHECK (net_debit_cap_minor >= 0),
    threshold_percent     integer NOT NULL DEFAULT 90 CHECK (threshold_percent BETWEEN 1 AND 100),
    updated_at            timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (participant_id, currency)
);
-- The hosting bank's own participant (clearing.HOSTING_PARTICIPANT_ID; positions.HOSTING_REGISTRATION_REQUEST_ID):
-- accounts opened without a participant_id belong to it. It has every currency: its
-- participant_currencies row for one is made when first needed (a cap set on it).
INSERT INTO participants (participant_id, request_id, name)
VALUES ('corebank', 'corebank:hosting', 'corebank (hosting bank)') ON CONFLICT DO NOTHING;
-- services.ledger.clearing.WindowState
CREATE TABLE IF NOT EXISTS settlement_windows (
    window_id        bigint PRIMARY KEY,
    state            smallint NOT NULL,
    opened_at        timestamptz NOT NULL DEFAULT now(),
    closed_at        timestamptz,
    reason           text NOT NULL DEFAULT '',
    close_request_id text UNIQUE,
    settlement_id    bigint
);
CREATE UNIQUE INDEX IF NOT EXISTS settlement_windows_one_open ON settlement_windows ((true)) WHERE state = 1;
INSERT INTO settlement_windows (window_id, state) VALUES (1, 1) ON CONFLICT DO NOTHING;
-- services.ledger.clearing.SettlementModel, SettlementState
CREATE TABLE IF NOT EXISTS settlements (
    settlement_id bigint PRIMARY KEY,
    request_id    text NOT NULL UNIQUE,
    model         smallint NOT NULL,
    state         smallint NOT NULL,
    window_ids    bigint[] NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    settled_at    timestamptz
);
CREATE TABLE IF NOT EXISTS settlement_entries (
    settlement_id  bigint NOT NULL REFERENCES settlements,
    participant_id text NOT NULL,
    currency       text NOT NULL,
    debits_minor   bigint NOT NULL,
    credits_minor  bigint NOT NULL,
    transfers      bigint NOT NULL,
    settled_at     timestamptz,
    PRIMARY KEY (settlement_id, participant_id, currency)
);
-- History is never deleted (the reconciliation relies on it).
DO $$
DECLARE
    table_name text;
BEGIN
    FOREACH table_name IN ARRAY ARRAY['clearing_window_totals', 'clearing_position_resets', 'participants',
                                      'participant_currencies', 'settlement_windows', 'settlements', 'settlement_entries'] LOOP
        EXECUTE format('DROP TRIGGER IF EXISTS %1$s_are_never_deleted ON %1$s', table_name);
        EXECUTE format('CREATE TRIGGER %1$s_are_never_deleted BEFORE DELETE ON %1$s FOR EACH ROW EXECUTE FUNCTION rows_are_never_deleted()', table_name);
        EXECUTE format('DROP TRIGGER IF EXISTS %1$s_are_never_truncated ON %1$s', table_name);
        EXECUTE format('CREATE TRIGGER %1$s_are_never_truncated BEFORE TRUNCATE ON %1$s FOR EACH STATEMENT EXECUTE FUNCTION rows_are_never_deleted()', table_name);
    END LOOP;
END;
$$;
-- End of the clearing section.
