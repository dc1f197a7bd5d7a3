-- The ledger: system of record. Journal tables (postings, entries, results) are append-only:
-- triggers refuse UPDATE, DELETE and TRUNCATE, and the harbour_ledger role (deploy/postgres-roles.sql)
-- has only INSERT and SELECT on them. Balances, pending state, chain heads and consumed offsets are
-- projections/progress the writer keeps current; `harbour verify` recomputes them from the journal.
CREATE SCHEMA IF NOT EXISTS ledger;
SELECT harbour.create_service_store('ledger');

CREATE TABLE ledger.assets (
    code        text PRIMARY KEY,
    scale       smallint NOT NULL CHECK (scale BETWEEN 0 AND 18),
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE ledger.accounts (
    id                              text PRIMARY KEY,
    participant                     text NOT NULL,
    asset                           text NOT NULL REFERENCES ledger.assets (code),
    debits_must_not_exceed_credits  boolean NOT NULL DEFAULT false,
    credits_must_not_exceed_debits  boolean NOT NULL DEFAULT false,
    limit_minor                     numeric(38, 0),
    status                          text NOT NULL DEFAULT 'open'
                                    CHECK (status IN ('open', 'frozen', 'closed')),
    created_at                      timestamptz NOT NULL DEFAULT now(),
    CHECK (NOT (debits_must_not_exceed_credits AND credits_must_not_exceed_debits))
);
CREATE INDEX accounts_participant ON ledger.accounts (participant);

-- Four numbers per account (TigerBeetle): available balance counts pending debits.
CREATE TABLE ledger.balances (
    account_id       text PRIMARY KEY REFERENCES ledger.accounts (id),
    debits_posted    numeric(38, 0) NOT NULL DEFAULT 0,
    credits_posted   numeric(38, 0) NOT NULL DEFAULT 0,
    debits_pending   numeric(38, 0) NOT NULL DEFAULT 0,
    credits_pending  numeric(38, 0) NOT NULL DEFAULT 0,
    CHECK (debits_posted >= 0 AND credits_posted >= 0 AND debits_pending >= 0 AND credits_pending >= 0)
);

-- One row per accepted command that moves value (post, pending, commit, void, expire).
CREATE TABLE ledger.postings (
    id                text PRIMARY KEY,
    kind              text NOT NULL,
    partition         int NOT NULL,
    sequence          bigint NOT NULL,
    refs              text[] NOT NULL DEFAULT '{}',  -- pendings a commit/void/expire resolved
    settlement_group  text,
    timeout_at        timestamptz,
    effective_at      timestamptz NOT NULL,
    recorded_at       timestamptz NOT NULL DEFAULT now(),
    metadata          jsonb NOT NULL DEFAULT '{}',
    hash              bytea NOT NULL,
    UNIQUE (partition, sequence)
);
CREATE INDEX postings_group ON ledger.postings (settlement_group) WHERE settlement_group IS NOT NULL;

CREATE TABLE ledger.entries (
    posting_id  text NOT NULL REFERENCES ledger.postings (id),
    idx         smallint NOT NULL,
    account_id  text NOT NULL REFERENCES ledger.accounts (id),
    asset       text NOT NULL,
    direction   char(1) NOT NULL CHECK (direction IN ('D', 'C')),
    -- 'posted' or 'pending' or a release of a pending hold ('release', negative effect on pending).
    phase       text NOT NULL CHECK (phase IN ('posted', 'pending', 'release')),
    amount      numeric(38, 0) NOT NULL CHECK (amount > 0),
    PRIMARY KEY (posting_id, idx)
);
CREATE INDEX entries_account ON ledger.entries (account_id, posting_id);

-- Every command's outcome, accepted or rejected, keyed by the command id (the idempotency key) with
-- the hash of its canonical request: a retry returns this row, never a new decision.
CREATE TABLE ledger.results (
    command_id    text PRIMARY KEY,
    request_hash  bytea NOT NULL,
    command_type  text NOT NULL,
    accepted      boolean NOT NULL,
    code          text,
    detail        text,
    posting_id    text,
    partition     int,
    sequence      bigint,
    hash          bytea,
    recorded_at   timestamptz NOT NULL DEFAULT now()
);

-- Pendings and what became of them (a projection of postings/entries, locked FOR UPDATE). The
-- held amounts are the pending posting's 'pending' entries.
CREATE TABLE ledger.pendings (
    posting_id        text PRIMARY KEY REFERENCES ledger.postings (id),
    partition         int NOT NULL,
    status            text NOT NULL CHECK (status IN ('pending', 'posted', 'voided', 'expired')),
    settlement_group  text,
    timeout_at        timestamptz,
    effective_at      timestamptz NOT NULL,
    resolved_by       text
);

CREATE TABLE ledger.settlement_groups (
    id      text PRIMARY KEY,
    status  text NOT NULL CHECK (status IN ('open', 'posted', 'voided'))
);
CREATE INDEX pendings_open_timeout ON ledger.pendings (partition, timeout_at) WHERE status = 'pending';
CREATE INDEX pendings_group ON ledger.pendings (settlement_group) WHERE settlement_group IS NOT NULL;

CREATE TABLE ledger.chain_heads (
    partition  int PRIMARY KEY,
    sequence   bigint NOT NULL,
    hash       bytea NOT NULL
);

-- Kafka progress stored with the effects: on assignment the writer seeks here (exactly-once in).
CREATE TABLE ledger.consumed_offsets (
    topic        text NOT NULL,
    partition    int NOT NULL,
    next_offset  bigint NOT NULL,
    PRIMARY KEY (topic, partition)
);

CREATE FUNCTION ledger.refuse_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'ledger.% is append-only: % refused (corrections are reversing postings)',
        TG_TABLE_NAME, TG_OP USING ERRCODE = 'insufficient_privilege';
END $$;

DO $$
DECLARE t text;
BEGIN
    FOREACH t IN ARRAY ARRAY['postings', 'entries', 'results'] LOOP
        EXECUTE format('CREATE TRIGGER %I_no_update BEFORE UPDATE OR DELETE ON ledger.%I
                        FOR EACH ROW EXECUTE FUNCTION ledger.refuse_change()', t, t);
        EXECUTE format('CREATE TRIGGER %I_no_truncate BEFORE TRUNCATE ON ledger.%I
                        FOR EACH STATEMENT EXECUTE FUNCTION ledger.refuse_change()', t, t);
    END LOOP;
END $$;
