-- Least-privilege roles. Apply once per cluster as a superuser (`harbour roles apply`), after
-- migrations. Passwords are set outside this file: ALTER ROLE ... PASSWORD from a secret store.
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'harbour_ledger') THEN
        CREATE ROLE harbour_ledger LOGIN;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'harbour_reader') THEN
        CREATE ROLE harbour_reader LOGIN;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'harbour_gateway') THEN
        CREATE ROLE harbour_gateway LOGIN;
    END IF;
END $$;

GRANT USAGE ON SCHEMA ledger TO harbour_ledger, harbour_reader;
-- The journal: insert and read, never change. Triggers refuse edits even to the owner.
GRANT SELECT, INSERT ON ledger.postings, ledger.entries, ledger.results TO harbour_ledger;
REVOKE UPDATE, DELETE, TRUNCATE ON ledger.postings, ledger.entries, ledger.results FROM harbour_ledger;
-- Reference data, projections and progress the writer keeps current.
GRANT SELECT, INSERT ON ledger.assets TO harbour_ledger;
GRANT SELECT, INSERT, UPDATE ON ledger.accounts, ledger.balances, ledger.pendings, ledger.settlement_groups,
    ledger.chain_heads, ledger.consumed_offsets TO harbour_ledger;
GRANT SELECT, INSERT, UPDATE ON ledger.outbox, ledger.inbox TO harbour_ledger;
GRANT USAGE ON ALL SEQUENCES IN SCHEMA ledger TO harbour_ledger;
-- Fund administrators' and the gateway's read side.
GRANT SELECT ON ALL TABLES IN SCHEMA ledger TO harbour_reader;

-- The gateway: its own schema (keys, idempotency), read-only on the ledger and transfer status.
GRANT USAGE ON SCHEMA gateway, ledger, deposits TO harbour_gateway;
GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA gateway TO harbour_gateway;
GRANT USAGE ON ALL SEQUENCES IN SCHEMA gateway TO harbour_gateway;
GRANT SELECT ON ALL TABLES IN SCHEMA ledger TO harbour_gateway;
GRANT SELECT ON deposits.transfers TO harbour_gateway;
