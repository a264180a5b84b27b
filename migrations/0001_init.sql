-- hmis-flow 0001: the relational picture (contract §9) and the pipeline's own tables.
--
-- Conventions:
--   * ids are text: upstream ids are strings and need not be UUIDs;
--   * times are timestamptz, converted from the pipeline's milliseconds since the epoch;
--   * column names are the snake_case of the contract's JSON fields;
--   * every table the pipeline upserts carries updated_at (database time of the last write).
--
-- Objects are created unqualified, in the first schema of the search_path, so one database
-- can hold several independent installations (tests use one schema each).

-- ---------------------------------------------------------------------------------------
-- Workflows and tasks (contract §4)
-- ---------------------------------------------------------------------------------------

CREATE TABLE workflow_instances (
    workflow_instance_id text PRIMARY KEY,
    patient_id           text,
    template_id          text        NOT NULL,
    template_version     bigint      NOT NULL,
    template_name        text,
    -- ACTIVE, COMPLETED or FAILED
    status               text        NOT NULL,
    progress_percentage  integer     NOT NULL DEFAULT 0
        CHECK (progress_percentage BETWEEN 0 AND 100),
    is_escalated         boolean     NOT NULL DEFAULT false,
    escalation_level     integer     NOT NULL DEFAULT 0,
    escalation_reason    text,
    started_at           timestamptz,
    completed_at         timestamptz,
    updated_at           timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX workflow_instances_template_idx ON workflow_instances (template_id, status);
CREATE INDEX workflow_instances_patient_idx ON workflow_instances (patient_id);

CREATE TABLE task_instances (
    task_instance_id     text PRIMARY KEY,
    workflow_instance_id text        NOT NULL,
    patient_id           text,
    task_def_id          text        NOT NULL,
    task_name            text,
    -- PENDING, IN_PROGRESS, COMPLETED or FAILED
    status               text        NOT NULL,
    attempt              integer     NOT NULL DEFAULT 1,
    due_at               timestamptz,
    sla_breached         boolean     NOT NULL DEFAULT false,
    is_escalated         boolean     NOT NULL DEFAULT false,
    escalated_to         text,
    created_at           timestamptz,
    started_at           timestamptz,
    completed_at         timestamptz,
    error_message        text,
    updated_at           timestamptz NOT NULL DEFAULT now()
);

-- No foreign key to workflow_instances: a task may arrive before its workflow (contract §4).
CREATE INDEX task_instances_workflow_idx ON task_instances (workflow_instance_id, task_def_id);

-- Exactly the ready (workflow instance, task definition) pairs of ACTIVE workflows.
CREATE TABLE task_readiness (
    workflow_instance_id text        NOT NULL,
    task_def_id          text        NOT NULL,
    patient_id           text,
    template_id          text        NOT NULL,
    template_version     bigint      NOT NULL,
    task_name            text,
    automatic            boolean     NOT NULL DEFAULT false,
    -- the attempt an executor should create next: 1, or the retry's attempt number
    next_attempt         integer     NOT NULL DEFAULT 1,
    -- pipeline clock of the flush that made the pair ready (kept while it stays ready)
    ready_since          timestamptz NOT NULL,
    PRIMARY KEY (workflow_instance_id, task_def_id)
);

CREATE INDEX task_readiness_automatic_idx ON task_readiness (automatic, ready_since);

-- One row per (task, attempt) that breached its SLA; written once (contract §4, SLA).
CREATE TABLE sla_breaches (
    task_instance_id     text        NOT NULL,
    attempt              integer     NOT NULL,
    workflow_instance_id text        NOT NULL,
    patient_id           text,
    template_id          text,
    template_version     bigint,
    task_def_id          text        NOT NULL,
    due_at               timestamptz NOT NULL,
    breached_at          timestamptz NOT NULL,
    minutes_overdue      bigint      NOT NULL DEFAULT 0,
    escalated_to         text,
    -- eventId of the TASK_SLA_BREACHED derived event
    event_id             text,
    PRIMARY KEY (task_instance_id, attempt)
);

CREATE INDEX sla_breaches_template_idx ON sla_breaches (template_id, breached_at);

-- ---------------------------------------------------------------------------------------
-- Orders (contract §5)
-- ---------------------------------------------------------------------------------------

CREATE TABLE orders (
    order_id             text PRIMARY KEY,
    workflow_instance_id text,
    patient_id           text,
    -- LAB_TEST, IMAGING, MEDICATION, SURGERY or another type
    order_type           text        NOT NULL,
    -- PROPOSED, AUTHORIZED, ACTIVATED, IN_PROGRESS, RESULTED, DISPENSED, COMPLETED,
    -- VERIFIED, CLOSED or CANCELLED
    order_status         text        NOT NULL,
    actor                text,
    actor_role           text,
    cost                 numeric,
    department           text,
    critical             boolean     NOT NULL DEFAULT false,
    appointment_id       text,
    -- metadata.reason of the ORDER_CANCELLED event
    cancel_reason        text,
    is_overdue           boolean     NOT NULL DEFAULT false,
    created_at           timestamptz,
    authorized_at        timestamptz,
    activated_at         timestamptz,
    started_at           timestamptz,
    -- when it reached RESULTED, DISPENSED or COMPLETED
    resulted_at          timestamptz,
    verified_at          timestamptz,
    closed_at            timestamptz,
    cancelled_at         timestamptz,
    updated_at           timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX orders_workflow_idx ON orders (workflow_instance_id);
CREATE INDEX orders_type_idx ON orders (order_type, department);

-- Every order event applied or rejected, in (eventTime, offset) order per order.
CREATE TABLE order_transitions (
    event_id             text PRIMARY KEY,
    order_id             text        NOT NULL,
    workflow_instance_id text,
    event_type           text        NOT NULL,
    from_status          text,
    to_status            text,
    actor                text,
    actor_role           text,
    -- false for ORDER_TRANSITION_REJECTED (reject_reason says why)
    accepted             boolean     NOT NULL,
    reject_reason        text,
    event_time           timestamptz NOT NULL,
    source_partition     integer,
    source_offset        bigint,
    recorded_at          timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX order_transitions_order_idx ON order_transitions (order_id, event_time);

CREATE TABLE compensation_actions (
    -- UUID v5 of hmis-flow:compensation:<orderId>:<actionType>, as text
    action_id            text PRIMARY KEY,
    order_id             text        NOT NULL,
    workflow_instance_id text,
    patient_id           text,
    -- SEND_NOTIFICATION, REVERSE_CHARGE, CANCEL_ORDER, RELEASE_RESOURCE, CANCEL_APPOINTMENT
    action_type          text        NOT NULL,
    amount               numeric,
    appointment_id       text,
    -- PENDING or COMPLETED
    status               text        NOT NULL DEFAULT 'PENDING',
    reason               text,
    cause_event_id       text,
    requested_at         timestamptz NOT NULL,
    completed_at         timestamptz,
    updated_at           timestamptz NOT NULL DEFAULT now(),
    UNIQUE (order_id, action_type)
);

CREATE INDEX compensation_actions_pending_idx ON compensation_actions (status, requested_at);

-- ---------------------------------------------------------------------------------------
-- System events (contract §6)
-- ---------------------------------------------------------------------------------------

CREATE TABLE alerts (
    -- deterministic id, as in the system-alerts record
    alert_id             text PRIMARY KEY,
    -- CRITICAL, HIGH, MEDIUM or LOW
    severity             text        NOT NULL,
    source               text        NOT NULL,
    kind                 text        NOT NULL,
    message              text        NOT NULL,
    raised_at            timestamptz NOT NULL,
    -- the ids of what caused it, where they apply
    cause_event_id       text,
    component            text,
    workflow_instance_id text,
    task_instance_id     text,
    order_id             text,
    details              jsonb,
    recorded_at          timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX alerts_raised_idx ON alerts (raised_at);
CREATE INDEX alerts_severity_idx ON alerts (severity, raised_at);

CREATE TABLE component_health (
    component            text PRIMARY KEY,
    -- UP, DEGRADED or UNHEALTHY
    status               text        NOT NULL,
    last_check_at        timestamptz,
    -- when status last changed
    status_since         timestamptz,
    -- ERROR_REPORTs that raise no alert are counted here (contract §6)
    medium_errors        bigint      NOT NULL DEFAULT 0,
    low_errors           bigint      NOT NULL DEFAULT 0,
    last_error_at        timestamptz,
    last_error_message   text,
    updated_at           timestamptz NOT NULL DEFAULT now()
);

-- Append-only: see the trigger below.
CREATE TABLE audit_log (
    audit_id             bigserial PRIMARY KEY,
    -- the AUDIT_EVENT's eventId; a replayed event is not appended twice
    event_id             text        NOT NULL UNIQUE,
    component            text,
    actor                text,
    action               text,
    entity_type          text,
    entity_id            text,
    details              jsonb,
    event_time           timestamptz NOT NULL,
    source_topic         text,
    source_partition     integer,
    source_offset        bigint,
    recorded_at          timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX audit_log_entity_idx ON audit_log (entity_type, entity_id, event_time);

-- Raises on any change to an existing row. A trigger rather than REVOKE, because privileges
-- do not bind the table's owner, and the pipeline's own role owns it.
CREATE FUNCTION hmis_audit_log_immutable() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit_log is append-only: % is not allowed', TG_OP
        USING ERRCODE = 'insufficient_privilege',
              HINT = 'audit entries can only be inserted';
END;
$$;

CREATE TRIGGER audit_log_no_update_delete
    BEFORE UPDATE OR DELETE ON audit_log
    FOR EACH ROW EXECUTE FUNCTION hmis_audit_log_immutable();

CREATE TRIGGER audit_log_no_truncate
    BEFORE TRUNCATE ON audit_log
    FOR EACH STATEMENT EXECUTE FUNCTION hmis_audit_log_immutable();

-- ---------------------------------------------------------------------------------------
-- Dead letters (contract §7)
-- ---------------------------------------------------------------------------------------

CREATE TABLE dead_letters (
    id                   bigserial PRIMARY KEY,
    topic                text        NOT NULL,
    partition            integer     NOT NULL,
    "offset"             bigint      NOT NULL,
    key                  text,
    payload              text        NOT NULL,
    -- utf8 or base64
    payload_encoding     text        NOT NULL CHECK (payload_encoding IN ('utf8', 'base64')),
    reason               text        NOT NULL,
    detail               text        NOT NULL,
    rejected_at          timestamptz NOT NULL,
    -- a replay of the same input record is not stored twice
    UNIQUE (topic, partition, "offset")
);

CREATE INDEX dead_letters_reason_idx ON dead_letters (reason, rejected_at);

-- ---------------------------------------------------------------------------------------
-- Streaming analytics (contract §10)
-- ---------------------------------------------------------------------------------------

CREATE TABLE analytics_windows (
    metric               text        NOT NULL,
    dimension            text        NOT NULL,
    window_start         timestamptz NOT NULL,
    window_end           timestamptz NOT NULL,
    value                double precision NOT NULL,
    revision             integer     NOT NULL DEFAULT 1,
    updated_at           timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (metric, dimension, window_start, window_end)
);

-- ---------------------------------------------------------------------------------------
-- The pipeline's own bookkeeping
-- ---------------------------------------------------------------------------------------

-- Where consumption resumes, committed in the same transaction as the effects it caused.
CREATE TABLE hmis_input_offsets (
    group_id             text        NOT NULL,
    topic                text        NOT NULL,
    partition            integer     NOT NULL,
    next_offset          bigint      NOT NULL,
    updated_at           timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (group_id, topic, partition)
);

-- One row per pipeline group: the completed pipeline-clock frontier and the fencing epoch.
-- Each instance that takes over a group increments epoch; a writer whose epoch is no longer
-- the current one is fenced off.
CREATE TABLE hmis_pipeline_progress (
    group_id             text PRIMARY KEY,
    frontier_ms          bigint,
    epoch                bigint      NOT NULL DEFAULT 0,
    owner                text,
    updated_at           timestamptz NOT NULL DEFAULT now()
);

-- Records to publish to Kafka, written in the same transaction as the rows that caused
-- them and deleted once published. seq is the production order.
CREATE TABLE hmis_outbox (
    seq                  bigserial PRIMARY KEY,
    group_id             text        NOT NULL,
    -- logical topic: derived, alerts or dead_letter (mapped to a configured name on publish)
    topic                text        NOT NULL,
    key                  text,
    event_id             text        NOT NULL,
    event_type           text        NOT NULL,
    payload              text        NOT NULL,
    created_at           timestamptz NOT NULL DEFAULT now(),
    UNIQUE (group_id, topic, event_id)
);

CREATE INDEX hmis_outbox_group_seq_idx ON hmis_outbox (group_id, seq);
