-- A batch of decisions in one statement (services/deposits/service.py, handle_batch): what
-- deposits.record_decision does for one message, for every message of a Kafka batch at once, with
-- the same guards on the same tables. One round trip and one commit per batch instead of two round
-- trips and a commit per message: on a two-core machine those, not the decisions, were the cost.
--
-- Returns 'ok', or writes nothing and
--   returns 'conflict:<stream>'  when a stream moved past the version the batch decided from;
--   raises SQLSTATE HDDUP        when a message was claimed in the inbox meanwhile (a redelivery
--                                handled by another consumer raced this one).
-- The caller re-reads and decides the batch again; the events primary key stays the last guard.
CREATE FUNCTION deposits.record_decisions(
    p_consumers text[], p_message_ids text[],
    p_streams text[], p_expected int[],
    p_e_streams text[], p_e_versions int[], p_e_ids uuid[], p_e_types text[],
    p_e_schema_versions int[], p_e_payloads text[], p_e_metadata text[],
    p_topics text[], p_keys bytea[], p_values bytea[], p_headers text[],
    p_r_keys text[], p_r_streams text[], p_r_purposes text[], p_r_commands text[],
    p_transfers text, p_conversions text, p_participants text, p_wallets text,
    p_refusals text
) RETURNS text
LANGUAGE plpgsql AS $fn$
DECLARE
    v_moved text;
    v_claimed int;
BEGIN
    SELECT s.stream INTO v_moved
    FROM unnest(p_streams, p_expected) AS s(stream, expected)
    WHERE (SELECT coalesce(max(e.stream_version), 0) FROM deposits.events e
           WHERE e.stream_id = s.stream) <> s.expected
    LIMIT 1;
    IF v_moved IS NOT NULL THEN
        RETURN 'conflict:' || v_moved;
    END IF;
    IF cardinality(p_consumers) > 0 THEN
        INSERT INTO deposits.inbox (consumer, message_id)
        SELECT * FROM unnest(p_consumers, p_message_ids)
        ON CONFLICT (consumer, message_id) DO NOTHING;
        GET DIAGNOSTICS v_claimed = ROW_COUNT;
        IF v_claimed <> cardinality(p_consumers) THEN
            RAISE EXCEPTION USING ERRCODE = 'HDDUP',
                MESSAGE = 'a message of the batch was claimed meanwhile';
        END IF;
    END IF;
    INSERT INTO deposits.events
        (stream_id, stream_version, event_id, type, schema_version, payload, metadata)
    SELECT e.stream, e.version, e.event_id, e.type, e.schema_version, e.payload::jsonb,
           e.metadata::jsonb
    FROM unnest(p_e_streams, p_e_versions, p_e_ids, p_e_types, p_e_schema_versions,
                p_e_payloads, p_e_metadata)
         WITH ORDINALITY AS e(stream, version, event_id, type, schema_version, payload,
                              metadata, ord)
    ORDER BY e.ord;
    INSERT INTO deposits.outbox (topic, key, value, headers)
    SELECT m.topic, m.key, m.value, m.headers::jsonb
    FROM unnest(p_topics, p_keys, p_values, p_headers)
         WITH ORDINALITY AS m(topic, key, value, headers, ord)
    ORDER BY m.ord;
    INSERT INTO deposits.ledger_routes (ledger_key, stream_id, purpose, command_id)
    SELECT * FROM unnest(p_r_keys, p_r_streams, p_r_purposes, p_r_commands)
    ON CONFLICT (ledger_key) DO NOTHING;
    -- Read models: one row per stream (the caller keeps the last state of each).
    INSERT INTO deposits.transfers
    SELECT * FROM jsonb_populate_recordset(NULL::deposits.transfers, p_transfers::jsonb)
    ON CONFLICT (uetr) DO UPDATE SET
        route = EXCLUDED.route, settlement_mode = EXCLUDED.settlement_mode,
        status = EXCLUDED.status, reason = EXCLUDED.reason, attempts = EXCLUDED.attempts,
        queue_key = EXCLUDED.queue_key, queued_since = EXCLUDED.queued_since,
        retrying = EXCLUDED.retrying, next_wakeup_at = EXCLUDED.next_wakeup_at,
        settled_at = EXCLUDED.settled_at, stream_version = EXCLUDED.stream_version,
        updated_at = EXCLUDED.updated_at;
    INSERT INTO deposits.conversions
    SELECT * FROM jsonb_populate_recordset(NULL::deposits.conversions, p_conversions::jsonb)
    ON CONFLICT (uetr) DO UPDATE SET status = EXCLUDED.status, reason = EXCLUDED.reason,
        stream_version = EXCLUDED.stream_version, updated_at = EXCLUDED.updated_at;
    INSERT INTO deposits.participants
    SELECT * FROM jsonb_populate_recordset(NULL::deposits.participants, p_participants::jsonb)
    ON CONFLICT (participant_id) DO UPDATE SET status = EXCLUDED.status,
        failure_code = EXCLUDED.failure_code, stream_version = EXCLUDED.stream_version,
        state = EXCLUDED.state, updated_at = EXCLUDED.updated_at;
    INSERT INTO deposits.wallets
    SELECT * FROM jsonb_populate_recordset(NULL::deposits.wallets, p_wallets::jsonb)
    ON CONFLICT (participant_id, wallet_id) DO UPDATE SET status = EXCLUDED.status,
        frozen = EXCLUDED.frozen, failure_code = EXCLUDED.failure_code,
        stream_version = EXCLUDED.stream_version, state = EXCLUDED.state,
        updated_at = EXCLUDED.updated_at;
    INSERT INTO deposits.refusals (message_id, stream_id, command_type, participant, code,
                                   detail)
    SELECT r.message_id, r.stream_id, r.command_type, r.participant, r.code, r.detail
    FROM jsonb_populate_recordset(NULL::deposits.refusals, p_refusals::jsonb) AS r
    ON CONFLICT (message_id) DO NOTHING;
    RETURN 'ok';
END;
$fn$;
