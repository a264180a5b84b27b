-- hmis-flow 0007: the outbox keeps only the index its reads and deletes use.
--
-- The outbox is a queue of one group's records in seq order: the publisher reads
-- `WHERE group_id = $1 AND seq > $2 ORDER BY seq` and deletes by (group_id, seq). Its
-- UNIQUE (group_id, topic, event_id) was redundant: a derived event or alert enters the
-- outbox only in the statement that first puts its id in hmis_published_events (whose
-- primary key is exactly that triple), and a dead letter only when its dead_letters row was
-- new (UNIQUE (topic, partition, offset)). Each outbox row paid for three btree inserts
-- (seq, (group_id, seq), the triple); a catch-up spent ~55 % of PostgreSQL's time in the
-- outbox insert (docs/engine.md, session 12). Now one: the primary key (group_id, seq).

ALTER TABLE hmis_outbox DROP CONSTRAINT IF EXISTS hmis_outbox_group_id_topic_event_id_key;
ALTER TABLE hmis_outbox DROP CONSTRAINT IF EXISTS hmis_outbox_pkey;
ALTER TABLE hmis_outbox ADD PRIMARY KEY (group_id, seq);
DROP INDEX IF EXISTS hmis_outbox_group_seq_idx;
