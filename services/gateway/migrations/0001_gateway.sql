-- The gateway: who may call the HTTP API (participants, hashed API keys), what it accepted
-- (commands, for transfer status and audit) and the Idempotency-Key store.
--
-- API keys are never stored: only sha256 of the whole token. Tokens carry 256 random bits, so a
-- fast hash is enough (no password-style stretching is needed to resist guessing); comparison is
-- constant-time in Python (services/gateway/auth.py).
CREATE SCHEMA IF NOT EXISTS gateway;

CREATE TABLE gateway.participants (
    id           text PRIMARY KEY CHECK (id ~ '^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$'),
    name         text NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    role         text NOT NULL CHECK (role IN ('bank', 'fund_admin', 'ops')),
    -- fund_admin only: the participants whose accounts it reads and reconciles.
    administers  text[] NOT NULL DEFAULT '{}',
    created_at   timestamptz NOT NULL DEFAULT now(),
    disabled_at  timestamptz,
    CHECK (role = 'fund_admin' OR cardinality(administers) = 0)
);

CREATE TABLE gateway.api_keys (
    key_id         text PRIMARY KEY CHECK (key_id ~ '^[0-9a-f]{16}$'),
    participant_id text NOT NULL REFERENCES gateway.participants (id),
    secret_sha256  bytea NOT NULL CHECK (length(secret_sha256) = 32),
    label          text NOT NULL DEFAULT '',
    created_at     timestamptz NOT NULL DEFAULT now(),
    expires_at     timestamptz,
    revoked_at     timestamptz
);
CREATE INDEX api_keys_participant ON gateway.api_keys (participant_id);

-- Every command the gateway published, after the broker confirmed it (acks=all).
CREATE TABLE gateway.commands (
    command_id         uuid PRIMARY KEY,           -- the envelope event_id on deposits.commands
    participant_id     text NOT NULL,              -- who acted (the key's participant)
    key_id             text NOT NULL,
    command_type       text NOT NULL,              -- e.g. deposits.InstructTransfer
    uetr               text NOT NULL,
    payer_participant  text,
    payee_participant  text,
    payload            jsonb NOT NULL,
    topic              text NOT NULL,
    kafka_partition    int NOT NULL,
    kafka_offset       bigint NOT NULL,
    accepted_at        timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX commands_uetr ON gateway.commands (uetr, accepted_at);

-- Idempotency-Key store, per participant. A row is claimed ('pending') before the command is
-- published and completed with the response after; a claim left by a crash or a failed publish
-- is taken over (same command_id, so the retry republishes the same envelope id) once stale.
CREATE TABLE gateway.idempotency (
    participant_id  text NOT NULL,
    idem_key        text NOT NULL,
    request_hash    bytea NOT NULL,
    command_id      uuid NOT NULL,
    state           text NOT NULL CHECK (state IN ('pending', 'completed')),
    status_code     int,
    response        jsonb,
    claimed_at      timestamptz NOT NULL DEFAULT clock_timestamp(),
    created_at      timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (participant_id, idem_key),
    CHECK ((state = 'completed') = (response IS NOT NULL AND status_code IS NOT NULL))
);
CREATE INDEX idempotency_created ON gateway.idempotency (created_at);

-- Transfer status as the API reads it: the deposits service's read model (deposits.transfers,
-- created by the deposits migration, which runs before this one), plus what the gateway accepted
-- and deposits has not yet decided ('received'). The first instruction of a UETR owns it: a later
-- one reusing the UETR (refused by deposits as id_conflict) can neither read nor cancel the
-- original. Redefining this view (same columns) is how the source changes; nothing else reads it.
CREATE VIEW gateway.transfer_status AS
SELECT t.uetr,
       t.payer_participant,
       t.payee_participant,
       t.payer_wallet,
       t.payee_wallet,
       t.currency,
       t.amount,
       t.end_to_end_id,
       t.status,
       t.reason          AS code,
       NULL::text        AS detail,
       t.created_at      AS instructed_at,
       t.updated_at
FROM deposits.transfers t
UNION ALL
SELECT c.uetr,
       c.payer_participant,
       c.payee_participant,
       c.payload ->> 'payer_wallet',
       c.payload ->> 'payee_wallet',
       c.payload ->> 'currency',
       c.payload ->> 'amount',
       c.payload ->> 'end_to_end_id',
       'received',
       NULL,
       NULL,
       c.accepted_at,
       c.accepted_at
FROM (SELECT DISTINCT ON (uetr) * FROM gateway.commands
      WHERE command_type = 'deposits.InstructTransfer'
      ORDER BY uetr, accepted_at, command_id) c
WHERE NOT EXISTS (SELECT 1 FROM deposits.transfers t WHERE t.uetr = c.uetr);
