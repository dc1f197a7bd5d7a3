-- The writer publishes its answers (PostingAccepted/PostingRejected, dead letters) itself once a
-- batch has committed, instead of queueing them in ledger.outbox for the relay: no outbox row to
-- insert, NOTIFY, select and delete per command. What makes that safe is this watermark: every
-- record below answered_offset has had its answer acknowledged by Kafka. On assignment the writer
-- seeks here, not to next_offset, and answers the records in [answered_offset, next_offset) again
-- from ledger.results, changing nothing (a crash between commit and acknowledgement loses no
-- answer; a consumer may see one twice, flagged duplicate). NULL: everything below next_offset
-- was answered (rows from before this migration, whose answers went through the outbox).
ALTER TABLE ledger.consumed_offsets ADD COLUMN answered_offset bigint
    CHECK (answered_offset >= 0);

-- The Kafka record that decided each outcome. Answering a record again must say what its first
-- answer said: "duplicate": false for the record that decided, true for a later retry of the same
-- id. Also lets an auditor trace every stored outcome to its command record. NULL for outcomes
-- without a record of their own (expiries) and for rows from before this migration.
ALTER TABLE ledger.results ADD COLUMN source_partition int, ADD COLUMN source_offset bigint;
