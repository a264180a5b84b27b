-- hmis-flow 0006: least privilege (issue 13).
--
-- Migrations run as an administrator (the schema's owner); the pipeline runs as
-- `hmis_pipeline`, a role that owns nothing and may only read and write the rows it
-- writes. Reporting users log in as `hmis_reporting` (0002), which reads and never writes.
--
--   role             login   privileges in this schema
--   ---------------- ------- ------------------------------------------------------------
--   hmis_pipeline    NOLOGIN SELECT/INSERT/UPDATE/DELETE per table as the sink needs;
--                            audit_log INSERT only (+ SELECT of event_id); no CREATE,
--                            owns no object
--   hmis_reporting   LOGIN   SELECT on every table and view, read-only transactions
--
-- Because the pipeline role owns no table, PostgreSQL itself refuses it UPDATE, DELETE and
-- TRUNCATE on audit_log (no privilege), and ALTER TABLE, DISABLE TRIGGER and DROP TRIGGER
-- (owner only); the trigger of 0001 still refuses changes to everyone else.
--
-- Roles are cluster-wide and this runs once per schema: a role is created only when missing
-- (and its attributes are then left alone: an administrator may have given hmis_pipeline a
-- password), the grants are per schema (current_schema()). An administrator without
-- CREATEROLE gets a notice instead of a failed migration and can create the roles later and
-- run the GRANTs of this file again. Privileges on tables that later migrations create are
-- granted by those migrations (no default privileges: each table says what the pipeline may
-- do with it; sinks/tests/roles.rs fails on a table nobody decided about).
DO $$
DECLARE
    schema_name text := current_schema();
    seq text;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'hmis_pipeline') THEN
        BEGIN
            -- NOLOGIN: an administrator gives it a password and LOGIN, or makes a login
            -- role a member of it (docs/security.md, "Roles and least privilege").
            CREATE ROLE hmis_pipeline NOLOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE
                NOREPLICATION NOBYPASSRLS;
        EXCEPTION
            WHEN duplicate_object OR unique_violation THEN
                NULL; -- created concurrently by another schema's migration
            WHEN insufficient_privilege THEN
                RAISE NOTICE 'role hmis_pipeline is missing and % may not create it; '
                             'an administrator can run: CREATE ROLE hmis_pipeline NOLOGIN',
                             current_user;
        END;
    END IF;

    -- Reporting users log in as hmis_reporting (0002 made it NOLOGIN). Without a password
    -- it can only log in where pg_hba.conf trusts the connection.
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'hmis_reporting' AND NOT rolcanlogin) THEN
        BEGIN
            ALTER ROLE hmis_reporting LOGIN;
        EXCEPTION WHEN insufficient_privilege THEN
            RAISE NOTICE '% may not alter role hmis_reporting; an administrator can run: '
                         'ALTER ROLE hmis_reporting LOGIN PASSWORD ''…''', current_user;
        END;
    END IF;

    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'hmis_pipeline') THEN
        RETURN;
    END IF;

    EXECUTE format('GRANT USAGE ON SCHEMA %I TO hmis_pipeline', schema_name);

    -- Upserted and deleted by the sink (rows of retired or retracted state).
    EXECUTE format('GRANT SELECT, INSERT, UPDATE, DELETE ON %1$I.workflow_instances, '
                   '%1$I.task_instances, %1$I.task_readiness, %1$I.orders, '
                   '%1$I.order_transitions, %1$I.compensation_actions, %1$I.sla_breaches, '
                   '%1$I.alerts TO hmis_pipeline', schema_name);
    -- Upserted, never deleted.
    EXECUTE format('GRANT SELECT, INSERT, UPDATE ON %1$I.component_health, '
                   '%1$I.analytics_windows, %1$I.hmis_input_offsets, '
                   '%1$I.hmis_pipeline_progress TO hmis_pipeline', schema_name);
    -- Appended (error_reports: INSERT … RETURNING reads what it inserted; dead_letters: the
    -- restore reads which positions were dead-lettered).
    EXECUTE format('GRANT SELECT, INSERT ON %1$I.error_reports, %1$I.dead_letters '
                   'TO hmis_pipeline', schema_name);
    -- The immutable audit log: INSERT only, no UPDATE, DELETE or TRUNCATE. Reading is
    -- limited to the event_id column: `ON CONFLICT (event_id) DO NOTHING` (a replayed event
    -- is not appended twice) needs SELECT on its conflict column; no entry's content is
    -- readable.
    EXECUTE format('GRANT INSERT, SELECT (event_id) ON %I.audit_log TO hmis_pipeline',
                   schema_name);
    -- The outbox and the published-id ledger: inserted, read, deleted once published/pruned.
    EXECUTE format('GRANT SELECT, INSERT, DELETE ON %1$I.hmis_outbox, '
                   '%1$I.hmis_published_events TO hmis_pipeline', schema_name);
    -- `hmis-flow run` checks that the schema is migrated (it applies nothing when it is).
    EXECUTE format('GRANT SELECT ON %I.hmis_schema_migrations TO hmis_pipeline', schema_name);

    -- The bigserial columns of the tables it appends to.
    FOR seq IN
        SELECT pg_get_serial_sequence(format('%I.%I', schema_name, t), c)
        FROM (VALUES ('audit_log', 'audit_id'), ('dead_letters', 'id'),
                     ('hmis_outbox', 'seq')) AS s(t, c)
    LOOP
        EXECUTE format('GRANT USAGE ON SEQUENCE %s TO hmis_pipeline', seq);
    END LOOP;
END
$$;
