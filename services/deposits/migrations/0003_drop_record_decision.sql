-- Every decision now goes through deposits.record_decisions (migration 0002), a single message
-- or an internal command being a batch of one; the per-message function of 0001 has no caller.
DROP FUNCTION deposits.record_decision(
    text, int, text, text, uuid[], text[], int[], text[], text[], text[], bytea[], bytea[],
    text[], text[], text[], text[], text, text, text);
