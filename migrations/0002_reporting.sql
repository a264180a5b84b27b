-- hmis-flow 0002: reporting views (contract §9) and the read-only reporting role.
--
-- The views read only the tables of 0001, so they are always as current as the last
-- committed flush. Percentiles are nearest-rank (percentile_disc), as in contract §10.

-- Per template: how many tasks with a deadline were completed on time.
-- sla_compliance_pct = completed with completed_at <= due_at / completed with a due_at
-- (one decimal; NULL while no task with a deadline has completed).
CREATE VIEW report_sla_compliance AS
SELECT
    w.template_id,
    max(w.template_name)                                                   AS template_name,
    count(*) FILTER (WHERE t.due_at IS NOT NULL)                           AS tasks_with_due_at,
    count(*) FILTER (WHERE t.due_at IS NOT NULL AND t.status = 'COMPLETED') AS completed_with_due_at,
    count(*) FILTER (WHERE t.status = 'COMPLETED' AND t.completed_at <= t.due_at)
                                                                           AS completed_on_time,
    count(*) FILTER (WHERE t.sla_breached)                                 AS sla_breached,
    count(*) FILTER (WHERE t.status IN ('PENDING', 'IN_PROGRESS') AND t.due_at < now())
                                                                           AS open_overdue,
    round(
        100.0 * count(*) FILTER (WHERE t.status = 'COMPLETED' AND t.completed_at <= t.due_at)
        / nullif(count(*) FILTER (WHERE t.due_at IS NOT NULL AND t.status = 'COMPLETED'), 0),
        1
    )                                                                      AS sla_compliance_pct
FROM task_instances t
JOIN workflow_instances w USING (workflow_instance_id)
GROUP BY w.template_id;

-- Per order type and department: volume and time from creation to result
-- (RESULTED, DISPENSED or COMPLETED), in seconds.
CREATE VIEW report_order_turnaround AS
SELECT
    o.order_type,
    o.department,
    count(*)                                                        AS orders,
    count(*) FILTER (WHERE o.resulted_at IS NOT NULL)               AS orders_resulted,
    count(*) FILTER (WHERE o.order_status = 'CANCELLED')            AS orders_cancelled,
    count(*) FILTER (WHERE o.is_overdue)                            AS orders_overdue,
    round(avg(extract(epoch FROM o.resulted_at - o.created_at)), 1) AS avg_turnaround_s,
    percentile_disc(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM o.resulted_at - o.created_at))
                                                                    AS p50_turnaround_s,
    percentile_disc(0.9) WITHIN GROUP (ORDER BY extract(epoch FROM o.resulted_at - o.created_at))
                                                                    AS p90_turnaround_s,
    max(extract(epoch FROM o.resulted_at - o.created_at))           AS max_turnaround_s
FROM orders o
GROUP BY o.order_type, o.department;

-- Workflows that are escalated and still running, with their escalated open tasks.
CREATE VIEW report_open_escalations AS
SELECT
    w.workflow_instance_id,
    w.patient_id,
    w.template_id,
    w.template_version,
    w.template_name,
    w.escalation_level,
    w.escalation_reason,
    w.progress_percentage,
    w.started_at,
    w.updated_at                                  AS last_change_at,
    coalesce(t.escalated_open_tasks, 0)           AS escalated_open_tasks,
    t.escalated_to
FROM workflow_instances w
LEFT JOIN LATERAL (
    SELECT count(*)                                            AS escalated_open_tasks,
           string_agg(DISTINCT ti.escalated_to, ', ')          AS escalated_to
    FROM task_instances ti
    WHERE ti.workflow_instance_id = w.workflow_instance_id
      AND ti.is_escalated
      AND ti.status IN ('PENDING', 'IN_PROGRESS')
) t ON true
WHERE w.is_escalated
  AND w.status = 'ACTIVE';

-- Per template and status: how many workflows are in each 10-point progress bucket
-- (bucket 100 holds exactly 100 %).
CREATE VIEW report_workflow_progress AS
SELECT
    w.template_id,
    w.status,
    (w.progress_percentage / 10) * 10                      AS progress_from,
    least((w.progress_percentage / 10) * 10 + 9, 100)      AS progress_to,
    count(*)                                               AS workflows
FROM workflow_instances w
GROUP BY w.template_id, w.status, (w.progress_percentage / 10) * 10;

-- Read-only role for reporting users. Roles are cluster-wide, so it is created only when
-- missing (another installation may have made it), and an owner without CREATEROLE gets a
-- notice instead of a failed migration: an administrator can create it later and re-run
-- the grants below.
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'hmis_reporting') THEN
        BEGIN
            CREATE ROLE hmis_reporting NOLOGIN;
            ALTER ROLE hmis_reporting SET default_transaction_read_only = on;
        EXCEPTION
            WHEN duplicate_object OR unique_violation THEN
                NULL; -- created concurrently by another installation
            WHEN insufficient_privilege THEN
                RAISE NOTICE 'role hmis_reporting is missing and % may not create it; '
                             'an administrator can run: CREATE ROLE hmis_reporting NOLOGIN',
                             current_user;
        END;
    END IF;

    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'hmis_reporting') THEN
        BEGIN
            EXECUTE format('GRANT USAGE ON SCHEMA %I TO hmis_reporting', current_schema());
        EXCEPTION WHEN insufficient_privilege THEN
            RAISE NOTICE 'cannot grant USAGE on schema % to hmis_reporting', current_schema();
        END;
        -- Tables and views alike, including the ones later migrations create.
        EXECUTE format('GRANT SELECT ON ALL TABLES IN SCHEMA %I TO hmis_reporting',
                       current_schema());
        EXECUTE format('ALTER DEFAULT PRIVILEGES IN SCHEMA %I GRANT SELECT ON TABLES TO hmis_reporting',
                       current_schema());
    END IF;
END
$$;
