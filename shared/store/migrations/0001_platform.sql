-- Platform: the per-service store every domain service and the ledger stand on.
--
-- A service migration calls `SELECT harbour.create_service_store('<schema>');` and gets, in its own
-- schema, an append-only event store, an inbox (exactly-once effects in) and an outbox
-- (exactly-once effects out, published by shared/store/outbox.py:OutboxRelay). One definition,
-- no DDL copied per service. The function is idempotent, so calling it again is harmless.
CREATE SCHEMA IF NOT EXISTS harbour;

-- Append-only guard for event tables. Statement-level, so it also refuses an UPDATE/DELETE that
-- matches no row (an attempt is a bug either way) and TRUNCATE, which row triggers cannot see.
-- SQLSTATE 42501 (insufficient_privilege) is the same code the least-privilege roles give, so
-- callers see one kind of refusal whichever layer stops them.
CREATE OR REPLACE FUNCTION harbour.refuse_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION '%.% is append-only: % is refused', TG_TABLE_SCHEMA, TG_TABLE_NAME, TG_OP
        USING ERRCODE = 'insufficient_privilege',
              HINT = 'correct history by appending a compensating event';
END;
$$;

-- Wakes the outbox relay of this schema. Statement-level: a 1,000-row insert is one notification
-- (Postgres also folds identical notifications within one transaction). Delivered on commit only.
CREATE OR REPLACE FUNCTION harbour.notify_outbox() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify(TG_TABLE_SCHEMA || '_outbox', '');
    RETURN NULL;
END;
$$;

CREATE OR REPLACE FUNCTION harbour.create_service_store(p_schema text) RETURNS void
LANGUAGE plpgsql
SET client_min_messages = warning  -- no "already exists, skipping" notices on a second call
AS $fn$
BEGIN
    -- The schema name ends up in a NOTIFY channel and in SQL built by shared/store: keep it a
    -- plain lower-case identifier (the Python side checks the same pattern).
    IF p_schema IS NULL OR p_schema !~ '^[a-z_][a-z0-9_]{0,46}$' THEN
        RAISE EXCEPTION 'invalid service schema name: %', p_schema
            USING ERRCODE = 'invalid_schema_name';
    END IF;

    EXECUTE format('CREATE SCHEMA IF NOT EXISTS %I', p_schema);

    -- Event store. PK (stream_id, stream_version) is the optimistic-concurrency guard: a second
    -- writer at the same version fails on uniqueness. global_position is a total order for
    -- projections that read across streams.
    EXECUTE format($sql$
        CREATE TABLE IF NOT EXISTS %I.events (
            global_position  bigserial   NOT NULL,
            stream_id        text        NOT NULL,
            stream_version   int         NOT NULL CHECK (stream_version > 0),
            event_id         uuid        NOT NULL,
            type             text        NOT NULL,
            schema_version   int         NOT NULL DEFAULT 1 CHECK (schema_version > 0),
            payload          jsonb       NOT NULL,
            metadata         jsonb       NOT NULL DEFAULT '{}',
            recorded_at      timestamptz NOT NULL DEFAULT now(),
            CONSTRAINT events_pkey PRIMARY KEY (stream_id, stream_version),
            CONSTRAINT events_event_id_key UNIQUE (event_id),
            CONSTRAINT events_global_position_key UNIQUE (global_position)
        )$sql$, p_schema);
    EXECUTE format($sql$
        CREATE OR REPLACE TRIGGER events_append_only
        BEFORE UPDATE OR DELETE OR TRUNCATE ON %I.events
        FOR EACH STATEMENT EXECUTE FUNCTION harbour.refuse_change()$sql$, p_schema);

    -- Inbox: one row per (consumer, message) processed, written in the effect's transaction.
    EXECUTE format($sql$
        CREATE TABLE IF NOT EXISTS %I.inbox (
            consumer      text        NOT NULL,
            message_id    text        NOT NULL,
            processed_at  timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (consumer, message_id)
        )$sql$, p_schema);

    -- Outbox: records to publish, written in the state change's transaction. The relay selects
    -- by the unsent flag (never an id cursor: ids become visible in commit order, not id order).
    EXECUTE format($sql$
        CREATE TABLE IF NOT EXISTS %I.outbox (
            id          bigserial   PRIMARY KEY,
            topic       text        NOT NULL,
            key         bytea,
            value       bytea       NOT NULL,
            headers     jsonb       NOT NULL DEFAULT '{}',
            created_at  timestamptz NOT NULL DEFAULT clock_timestamp(),
            sent_at     timestamptz
        )$sql$, p_schema);
    EXECUTE format(
        'CREATE INDEX IF NOT EXISTS outbox_unsent ON %I.outbox (id) WHERE sent_at IS NULL',
        p_schema);
    EXECUTE format($sql$
        CREATE OR REPLACE TRIGGER outbox_notify
        AFTER INSERT ON %I.outbox
        FOR EACH STATEMENT EXECUTE FUNCTION harbour.notify_outbox()$sql$, p_schema);
END;
$fn$;

COMMENT ON FUNCTION harbour.create_service_store(text) IS
    'Create (idempotently) a service''s events, inbox and outbox tables in schema p_schema.';
