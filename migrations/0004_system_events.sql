-- hmis-flow 0004: system events (contract §6).
--
-- Every ERROR_REPORT is appended to error_reports (one row per eventId; a replayed or
-- duplicated report is not inserted twice). In the same statement, the sink counts the
-- newly inserted MEDIUM and LOW reports into component_health.medium_errors / low_errors
-- and keeps component_health.last_error_at / last_error_message: the counts are exact
-- across restarts because they move only with an insert that happened.

CREATE TABLE error_reports (
    event_id             text PRIMARY KEY,
    component            text        NOT NULL,
    -- CRITICAL, HIGH, MEDIUM or LOW (CRITICAL and HIGH also raised an alert)
    severity             text        NOT NULL,
    message              text        NOT NULL,
    event_time           timestamptz NOT NULL,
    source_topic         text,
    source_partition     integer,
    source_offset        bigint,
    recorded_at          timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX error_reports_component_idx ON error_reports (component, event_time);

-- A component may report an error before its first HEALTH_CHECK: its health is unknown.
ALTER TABLE component_health ALTER COLUMN status DROP NOT NULL;
