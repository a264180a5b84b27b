-- hmis-flow 0008: the published-id ledger's key leads with the event id.
--
-- Every entry of a group has the same group_id and almost always the same topic. With
-- them leading the primary key, each comparison on the way down the index first collated
-- two equal texts (strcoll, twice) before reaching the id that decides. Leading with
-- event_id, nearly every comparison ends at the first column. The key is the same triple,
-- so the same ids are unique. Measured on this project's benchmark machine (PostgreSQL 15,
-- default settings): inserting 200,000 new ids into a ledger of 1,000,000 took
-- 1.9-2.0 s instead of 2.5 s (docs/engine.md, session 17).
--
-- first_at only serves the sink's pruning (`WHERE group_id = $1 AND first_at < …`, every
-- 10 minutes). Ids enter in first_at order, so a BRIN index serves that range at a small
-- fraction of a btree's upkeep per insert (1.8-1.9 s with it in the same measurement).

ALTER TABLE hmis_published_events DROP CONSTRAINT hmis_published_events_pkey;
ALTER TABLE hmis_published_events ADD PRIMARY KEY (event_id, topic, group_id);
DROP INDEX IF EXISTS hmis_published_events_first_at_idx;
CREATE INDEX hmis_published_events_first_at_brin ON hmis_published_events USING brin (first_at);
