-- Tokenized deposits (services/deposits): the service's own schema. The event store, inbox and
-- outbox come from the platform (harbour.create_service_store); everything else here is a read
-- model the service keeps current in the same transaction as the events it derives from, so a
-- reader never sees a projection ahead of or behind the event store. Every projection can be
-- rebuilt from deposits.events alone (the events are the truth).
CREATE SCHEMA IF NOT EXISTS deposits;
SELECT harbour.create_service_store('deposits');

-- Which stream a ledger answer belongs to: one row per LedgerCommandRequested (ledger_key is the
-- command_id the ledger's PostingAccepted/PostingRejected carries: the posting id for postings,
-- the envelope event id for account and asset commands).
CREATE TABLE deposits.ledger_routes (
    ledger_key  text PRIMARY KEY,
    stream_id   text NOT NULL,
    purpose     text NOT NULL,
    command_id  text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);

-- The participants and wallets directory (TD-8 allow-list): the aggregate state as JSON, read to
-- build a decision's Context, and the status columns ops and the gateway query.
CREATE TABLE deposits.participants (
    participant_id  text PRIMARY KEY,
    name            text NOT NULL,
    status          text NOT NULL,
    currencies      text[] NOT NULL,
    failure_code    text,
    stream_version  int NOT NULL,
    state           jsonb NOT NULL,
    updated_at      timestamptz NOT NULL
);

CREATE TABLE deposits.wallets (
    participant_id  text NOT NULL,
    wallet_id       text NOT NULL,
    status          text NOT NULL,
    frozen          boolean NOT NULL,
    currencies      text[] NOT NULL,
    failure_code    text,
    stream_version  int NOT NULL,
    state           jsonb NOT NULL,
    updated_at      timestamptz NOT NULL,
    PRIMARY KEY (participant_id, wallet_id)
);

-- Transfer status for the gateway and ops (the transfer id is its UETR), the scheduler's wake-up
-- time and the settlement queues (TD-5): a queued transfer has queue_key and queued_since; a
-- queue's order is (queued_since, uetr), strict FIFO per payer bank and currency.
CREATE TABLE deposits.transfers (
    uetr               text PRIMARY KEY,
    end_to_end_id      text NOT NULL,
    instruction_id     text,
    payer_participant  text NOT NULL,
    payer_wallet       text NOT NULL,
    payee_participant  text NOT NULL,
    payee_wallet       text NOT NULL,
    currency           text NOT NULL,
    amount             text NOT NULL,
    route              text,
    settlement_mode    text,
    status             text NOT NULL,
    reason             text,
    attempts           int NOT NULL DEFAULT 0,
    queue_key          text,
    queued_since       timestamptz,
    retrying           boolean NOT NULL DEFAULT false,
    next_wakeup_at     timestamptz,
    settled_at         timestamptz,
    stream_version     int NOT NULL,
    created_at         timestamptz NOT NULL,
    updated_at         timestamptz NOT NULL
);
CREATE INDEX transfers_wakeup ON deposits.transfers (next_wakeup_at)
    WHERE next_wakeup_at IS NOT NULL;
CREATE INDEX transfers_queue ON deposits.transfers (queue_key, queued_since, uetr)
    WHERE queue_key IS NOT NULL;
CREATE INDEX transfers_payer ON deposits.transfers (payer_participant, created_at);
CREATE INDEX transfers_payee ON deposits.transfers (payee_participant, created_at);
CREATE INDEX transfers_status ON deposits.transfers (status) WHERE status NOT IN
    ('settled', 'rejected', 'failed', 'cancelled', 'expired');

-- Issues (mint) and redemptions (burn) against the conventional deposit (TD-2).
CREATE TABLE deposits.conversions (
    uetr            text PRIMARY KEY,
    end_to_end_id   text NOT NULL,
    kind            text NOT NULL CHECK (kind IN ('issue', 'redeem')),
    participant_id  text NOT NULL,
    wallet_id       text NOT NULL,
    currency        text NOT NULL,
    amount          text NOT NULL,
    status          text NOT NULL,
    reason          text,
    stream_version  int NOT NULL,
    created_at      timestamptz NOT NULL,
    updated_at      timestamptz NOT NULL
);

-- Commands a business rule refused on an existing aggregate (nothing was recorded on the stream,
-- DESIGN "Domain services"): kept for the audit trail (X-7) and for the gateway to answer with
-- the machine-readable code. One row per consumed message (the inbox makes it exactly once).
CREATE TABLE deposits.refusals (
    message_id     text PRIMARY KEY,
    stream_id      text,
    command_type   text NOT NULL,
    participant    text NOT NULL,
    code           text NOT NULL,
    detail         text NOT NULL,
    recorded_at    timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX refusals_stream ON deposits.refusals (stream_id, recorded_at);

-- One decision, one round trip: what Inbox.claim + EventStore.append + Outbox.add_many do
-- (shared/store), on the same tables and with the same guards, plus the ledger routes, the read
-- model row and a refusal, in the one transaction of this statement. The service decides on a
-- snapshot read and this function re-checks the stream version under the events primary key
-- (optimistic concurrency): 'conflict' when the stream moved on (nothing written; the service
-- reloads and decides again), 'duplicate' when the consumer already processed the message
-- (nothing written), 'ok' otherwise. A concurrent append of the same version still fails on
-- events_pkey and aborts everything.
CREATE FUNCTION deposits.record_decision(
    p_stream text, p_expected int, p_consumer text, p_message_id text,
    p_event_ids uuid[], p_types text[], p_schema_versions int[], p_payloads text[],
    p_metadata text[],
    p_topics text[], p_keys bytea[], p_values bytea[], p_headers text[],
    p_route_keys text[], p_route_purposes text[], p_route_commands text[],
    p_view text, p_row text, p_refusal text
) RETURNS text
LANGUAGE plpgsql AS $fn$
DECLARE
    v_current int;
    v_row jsonb := p_row::jsonb;
BEGIN
    IF cardinality(p_event_ids) > 0 THEN
        SELECT coalesce(max(stream_version), 0) INTO v_current
        FROM deposits.events WHERE stream_id = p_stream;
        IF v_current <> p_expected THEN
            RETURN 'conflict';
        END IF;
    END IF;
    IF p_consumer IS NOT NULL THEN
        INSERT INTO deposits.inbox (consumer, message_id) VALUES (p_consumer, p_message_id)
        ON CONFLICT (consumer, message_id) DO NOTHING;
        IF NOT FOUND THEN
            RETURN 'duplicate';
        END IF;
    END IF;
    IF cardinality(p_event_ids) > 0 THEN
        INSERT INTO deposits.events
            (stream_id, stream_version, event_id, type, schema_version, payload, metadata)
        SELECT p_stream, p_expected + e.ord, e.event_id, e.type, e.schema_version,
               e.payload::jsonb, e.metadata::jsonb
        FROM unnest(p_event_ids, p_types, p_schema_versions, p_payloads, p_metadata)
             WITH ORDINALITY AS e(event_id, type, schema_version, payload, metadata, ord)
        ORDER BY e.ord;
    END IF;
    IF cardinality(p_topics) > 0 THEN
        INSERT INTO deposits.outbox (topic, key, value, headers)
        SELECT m.topic, m.key, m.value, m.headers::jsonb
        FROM unnest(p_topics, p_keys, p_values, p_headers)
             WITH ORDINALITY AS m(topic, key, value, headers, ord)
        ORDER BY m.ord;
    END IF;
    IF cardinality(p_route_keys) > 0 THEN
        INSERT INTO deposits.ledger_routes (ledger_key, stream_id, purpose, command_id)
        SELECT r.k, p_stream, r.p, r.c FROM unnest(p_route_keys, p_route_purposes,
                                                    p_route_commands) AS r(k, p, c)
        ON CONFLICT (ledger_key) DO NOTHING;
    END IF;
    IF p_view = 'transfers' THEN
        INSERT INTO deposits.transfers
        SELECT * FROM jsonb_populate_record(NULL::deposits.transfers, v_row)
        ON CONFLICT (uetr) DO UPDATE SET
            route = EXCLUDED.route, settlement_mode = EXCLUDED.settlement_mode,
            status = EXCLUDED.status, reason = EXCLUDED.reason, attempts = EXCLUDED.attempts,
            queue_key = EXCLUDED.queue_key, queued_since = EXCLUDED.queued_since,
            retrying = EXCLUDED.retrying, next_wakeup_at = EXCLUDED.next_wakeup_at,
            settled_at = EXCLUDED.settled_at, stream_version = EXCLUDED.stream_version,
            updated_at = EXCLUDED.updated_at;
    ELSIF p_view = 'conversions' THEN
        INSERT INTO deposits.conversions
        SELECT * FROM jsonb_populate_record(NULL::deposits.conversions, v_row)
        ON CONFLICT (uetr) DO UPDATE SET status = EXCLUDED.status, reason = EXCLUDED.reason,
            stream_version = EXCLUDED.stream_version, updated_at = EXCLUDED.updated_at;
    ELSIF p_view = 'participants' THEN
        INSERT INTO deposits.participants
        SELECT * FROM jsonb_populate_record(NULL::deposits.participants, v_row)
        ON CONFLICT (participant_id) DO UPDATE SET status = EXCLUDED.status,
            failure_code = EXCLUDED.failure_code, stream_version = EXCLUDED.stream_version,
            state = EXCLUDED.state, updated_at = EXCLUDED.updated_at;
    ELSIF p_view = 'wallets' THEN
        INSERT INTO deposits.wallets
        SELECT * FROM jsonb_populate_record(NULL::deposits.wallets, v_row)
        ON CONFLICT (participant_id, wallet_id) DO UPDATE SET status = EXCLUDED.status,
            frozen = EXCLUDED.frozen, failure_code = EXCLUDED.failure_code,
            stream_version = EXCLUDED.stream_version, state = EXCLUDED.state,
            updated_at = EXCLUDED.updated_at;
    END IF;
    IF p_refusal IS NOT NULL THEN
        INSERT INTO deposits.refusals (message_id, stream_id, command_type, participant, code,
                                       detail)
        SELECT r.message_id, r.stream_id, r.command_type, r.participant, r.code, r.detail
        FROM jsonb_populate_record(NULL::deposits.refusals, p_refusal::jsonb) AS r
        ON CONFLICT (message_id) DO NOTHING;
    END IF;
    RETURN 'ok';
END;
$fn$;
