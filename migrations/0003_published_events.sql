-- hmis-flow 0003: the ledger of published event ids.
--
-- Each derived event and alert id the pipeline has put in hmis_outbox, per group. The sink
-- inserts a record into the outbox only when its id enters this ledger in the same
-- transaction, so an event the rules derive again (after a restart, or a wall-clock decision
-- that the replay cannot reproduce) is never published twice. Rows older than the input
-- retention (the pipeline's tombstone retention, 7 days by default) are pruned by the sink:
-- no replay can derive them again.
CREATE TABLE hmis_published_events (
    group_id   text        NOT NULL,
    topic      text        NOT NULL,
    event_id   text        NOT NULL,
    first_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (group_id, topic, event_id)
);

CREATE INDEX hmis_published_events_first_at_idx ON hmis_published_events (first_at);
