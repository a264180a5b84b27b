-- hmis-flow 0008: the outbox is its own ledger.
--
-- Until now each derived event or alert cost PostgreSQL three row writes: its id into the
-- ledger (hmis_published_events, 0003), its record into hmis_outbox, and the outbox row's
-- delete once published. Those were 72 % of all row writes of a catch-up and the largest
-- statement of a flush (docs/engine.md, session 15). Now the outbox row stays once
-- published and is the ledger entry: one insert per record, ON CONFLICT (group_id, topic,
-- event_id) DO NOTHING keeps an id from being published twice, and what is published is
-- a position, hmis_pipeline_progress.published_seq (every row of the group at or below it
-- is in Kafka), advanced by the publisher in the transaction that used to delete. Rows
-- are pruned by age (the ledger's retention) once published.
--
-- A row without payload is a ledger entry only (never published): the ids of the old
-- ledger are carried over that way, so nothing published before this migration is
-- published again.

ALTER TABLE hmis_outbox ALTER COLUMN payload DROP NOT NULL;
CREATE UNIQUE INDEX hmis_outbox_ids ON hmis_outbox (group_id, topic, event_id);
-- Pruning by age: created_at grows with seq (one fenced writer per group), so a block
-- range index is all it needs, at almost no cost per insert.
CREATE INDEX hmis_outbox_created_at ON hmis_outbox USING brin (created_at);

INSERT INTO hmis_outbox (group_id, topic, key, event_id, event_type, payload, created_at)
SELECT group_id, topic, NULL, event_id, '', NULL, first_at
FROM hmis_published_events
ON CONFLICT (group_id, topic, event_id) DO NOTHING;
DROP TABLE hmis_published_events;

ALTER TABLE hmis_pipeline_progress ADD COLUMN published_seq bigint NOT NULL DEFAULT 0;

-- What is still to be published, per group: for operators, and for tests.
CREATE VIEW hmis_outbox_pending AS
SELECT o.*
FROM hmis_outbox o
LEFT JOIN hmis_pipeline_progress p USING (group_id)
WHERE o.payload IS NOT NULL AND o.seq > COALESCE(p.published_seq, 0);
