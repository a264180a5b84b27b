#!/usr/bin/env python3
"""hmis-flow's task and workflow rules in Pathway: the peer of bench/run.sh (issue 14).

Written the way a Pathway user would write them: relational operators (groupby/reduce,
joins, set difference) over the per-topic JSON-lines files that `hmis-flow generate --files`
writes, in static mode, with one small UDF where a rule is a case analysis per workflow.

    DIR/workflow-definitions.jsonl ─► template task rows (flattened, invalid templates dropped)
    DIR/workflow-task-events.jsonl ─► task state: max (attempt, rank, eventTime)      ─► tasks.jsonl
    DIR/workflow-state-events.jsonl ─► started (template), upstream terminal status
    DIR/workflow-order-events.jsonl ─► open orders per (workflow, orderType)
          │
          ▼ workflow × template tasks, with the tasks' states per (workflow, taskDefId)
      progress, status (contract §4: progress, completion, failure)       ─► workflows.jsonl
      readiness (predecessors, failure tasks, blocking orders, own state)  ─► readiness.jsonl
      SLA breaches per (task, attempt): late by its events, or still open
      when the clock (the highest eventTime) passed dueAt                  ─► sla_breaches.jsonl

The outputs are Pathway update streams (`diff`, `time`); bench/src/bin/peers.rs keeps what
remains with a positive count and compares it with hmis-flow's PostgreSQL rows. What this
peer does not compute (no Kafka, no PostgreSQL, no derived-event stream, no orders
lifecycle, alerts or analytics) is listed in docs/benchmarks.md.

Usage: hmis_pathway.py --input DIR --output DIR  (threads: PATHWAY_THREADS)
"""

from __future__ import annotations

import argparse
import json
import os
import time

T_START = time.monotonic()

import pathway as pw  # noqa: E402  (import time is measured)

T_IMPORTED = time.monotonic()

# A time larger than every event time (ms since the epoch), for "none" in min/max reducers.
NEVER = 1 << 62
CLOSED_ORDER = ("RESULTED", "DISPENSED", "COMPLETED", "VERIFIED", "CLOSED", "CANCELLED")
TIME_FORMAT = "%Y-%m-%dT%H:%M:%S.%fZ"


def millis(col: pw.ColumnExpression) -> pw.ColumnExpression:
    """RFC 3339 (as the generator writes it, UTC with milliseconds) -> ms since the epoch."""
    return pw.cast(int, col.dt.strptime(TIME_FORMAT).dt.timestamp(unit="ms"))


def one_of(col: pw.ColumnExpression, values: tuple[str, ...]) -> pw.ColumnExpression:
    """`col` is one of `values` (an engine expression: no Python call per row)."""
    expr = col == values[0]
    for v in values[1:]:
        expr = expr | (col == v)
    return expr


class DefinitionSchema(pw.Schema):
    templateId: str
    version: int
    tasks: pw.Json


class TaskEventSchema(pw.Schema):
    eventId: str
    eventType: str
    eventTime: str
    taskInstanceId: str
    workflowInstanceId: str
    taskDefId: str
    attempt: int = pw.column_definition(default_value=1)
    dueAt: str | None = pw.column_definition(default_value=None)


class WorkflowEventSchema(pw.Schema):
    eventId: str
    eventType: str
    eventTime: str
    workflowInstanceId: str
    templateId: str | None = pw.column_definition(default_value=None)
    templateVersion: int | None = pw.column_definition(default_value=None)


class OrderEventSchema(pw.Schema):
    eventId: str
    eventType: str
    eventTime: str
    orderId: str
    workflowInstanceId: str | None = pw.column_definition(default_value=None)
    orderType: str | None = pw.column_definition(default_value=None)
    orderStatus: str | None = pw.column_definition(default_value=None)


class SystemEventSchema(pw.Schema):
    eventTime: str


@pw.udf(deterministic=True)
def template_rows(tasks: pw.Json) -> list[tuple]:
    """A template's task definitions as rows; [] when the template is invalid (contract §3:
    unknown nextTaskId/failureTaskId, or a cycle of nextTaskId links)."""
    items = tasks.value if isinstance(tasks.value, list) else []
    rows = []
    for t in items:
        if not isinstance(t, dict):
            return []
        required = t.get("required")
        rows.append(
            (
                t.get("taskDefId"),
                True if required is None else bool(required),
                t.get("nextTaskId"),
                t.get("slaMinutes"),
                t.get("maxRetries") or 0,
                t.get("failureTaskId"),
                tuple(t.get("blockingOrderTypes") or ()),
            )
        )
    ids = {r[0] for r in rows}
    if None in ids or len(ids) != len(rows):
        return []
    nxt = {r[0]: r[2] for r in rows}
    if any(r[2] is not None and r[2] not in ids for r in rows):
        return []
    if any(r[5] is not None and r[5] not in ids for r in rows):
        return []
    for start in ids:  # a nextTaskId chain longer than the template is a cycle
        d, steps = start, 0
        while d is not None and steps <= len(ids):
            d, steps = nxt[d], steps + 1
        if d is not None:
            return []
    return rows


@pw.udf(deterministic=True)
def workflow_status(
    upstream: str | None,
    upstream_at: int,
    first_upstream_at: int,
    started: int,
    required: int,
    done: int,
    last_done: int,
    failed_at: int,
) -> tuple[str, int, int]:
    """(status, progressPercentage, closedAt) of one workflow (contract §4 progress,
    completion, failure; an upstream WORKFLOW_COMPLETED/FAILED sets the status)."""
    progress = 100 if required == 0 else (100 * done) // required
    completion = max(last_done, started) if progress == 100 else NEVER
    derived: tuple[str, int] | None = None
    if failed_at < NEVER and not completion < failed_at:
        derived = ("FAILED", failed_at)
    elif completion < NEVER:
        derived = ("COMPLETED", completion)
    if upstream is not None:
        first = derived if derived is not None and derived[1] < first_upstream_at else None
        if first is not None and first[0] == upstream:
            return (upstream, progress, first[1])
        return (upstream, progress, upstream_at)
    if derived is not None:
        return (derived[0], progress, derived[1])
    return ("ACTIVE", progress, NEVER)


def build(input_dir: str, output_dir: str) -> None:
    def read(topic: str, schema: type[pw.Schema]) -> pw.Table:
        return pw.io.jsonlines.read(
            os.path.join(input_dir, f"{topic}.jsonl"), schema=schema, mode="static"
        )

    definitions = read("workflow-definitions", DefinitionSchema)
    task_events = read("workflow-task-events", TaskEventSchema)
    workflow_events = read("workflow-state-events", WorkflowEventSchema)
    order_events = read("workflow-order-events", OrderEventSchema)
    system_events = read("system-events", SystemEventSchema)

    # Template task definitions, one row each.
    defs = (
        definitions.select(pw.this.templateId, pw.this.version, row=template_rows(pw.this.tasks))
        .flatten(pw.this.row)
        .select(
            template_id=pw.this.templateId,
            version=pw.this.version,
            def_id=pw.declare_type(str, pw.this.row[0]),
            required=pw.declare_type(bool, pw.this.row[1]),
            next_id=pw.declare_type(str | None, pw.this.row[2]),
            sla_minutes=pw.declare_type(int | None, pw.this.row[3]),
            max_retries=pw.declare_type(int, pw.this.row[4]),
            failure_id=pw.declare_type(str | None, pw.this.row[5]),
            blocking=pw.declare_type(tuple[str, ...], pw.this.row[6]),
        )
    )

    # The clock at the end of the input: the highest eventTime of any topic (contract §8).
    times = pw.Table.concat_reindex(
        task_events.select(t=millis(pw.this.eventTime)),
        workflow_events.select(t=millis(pw.this.eventTime)),
        order_events.select(t=millis(pw.this.eventTime)),
        system_events.select(t=millis(pw.this.eventTime)),
    )
    clock = times.reduce(end=pw.reducers.max(pw.this.t))

    # Task state: the event with the highest (attempt, lifecycle rank, eventTime), encoded in
    # one integer so that a plain max reducer picks it (exact duplicates change nothing).
    rank = (
        pw.if_else(pw.this.eventType == "TASK_STARTED", 1, 0)
        + pw.if_else(pw.this.eventType == "TASK_COMPLETED", 2, 0)
        + pw.if_else(pw.this.eventType == "TASK_FAILED", 2, 0)
    )
    te = task_events.filter(
        one_of(pw.this.eventType, ("TASK_CREATED", "TASK_STARTED", "TASK_COMPLETED", "TASK_FAILED"))
    ).select(
        pw.this.taskInstanceId,
        pw.this.workflowInstanceId,
        pw.this.taskDefId,
        pw.this.eventType,
        pw.this.attempt,
        pw.this.dueAt,
        t=millis(pw.this.eventTime),
    )
    te = te.select(
        *pw.this,
        key=(((pw.this.attempt * 3 + rank) * (1 << 42) + pw.this.t) * 2)
        + pw.if_else(pw.this.eventType == "TASK_COMPLETED", 1, 0),
    )
    task_state = te.groupby(pw.this.taskInstanceId).reduce(
        task_instance_id=pw.this.taskInstanceId,
        wid=pw.reducers.any(pw.this.workflowInstanceId),
        def_id=pw.reducers.any(pw.this.taskDefId),
        key=pw.reducers.max(pw.this.key),
    )
    task_state = task_state.select(
        pw.this.task_instance_id,
        pw.this.wid,
        pw.this.def_id,
        attempt=(pw.this.key // (1 << 43)) // 3,
        rank=(pw.this.key // (1 << 43)) % 3,
        finished=(pw.this.key // 2) % (1 << 42),
        completed=pw.this.key % 2 == 1,
    ).select(
        *pw.this,
        status=pw.if_else(
            pw.this.rank == 0,
            "PENDING",
            pw.if_else(
                pw.this.rank == 1,
                "IN_PROGRESS",
                pw.if_else(pw.this.completed, "COMPLETED", "FAILED"),
            ),
        ),
    )

    # Workflows: the template of their WORKFLOW_STARTED; the upstream terminal status.
    started = workflow_events.filter(pw.this.eventType == "WORKFLOW_STARTED").select(
        pw.this.workflowInstanceId,
        pw.this.templateId,
        pw.this.templateVersion,
        t=millis(pw.this.eventTime),
    )
    workflows = started.groupby(pw.this.workflowInstanceId).reduce(
        wid=pw.this.workflowInstanceId,
        template_id=pw.reducers.any(pw.this.templateId),
        version=pw.reducers.any(pw.this.templateVersion),
        started=pw.reducers.min(pw.this.t),
    )
    terminal = (
        workflow_events.filter(
            (pw.this.eventType == "WORKFLOW_COMPLETED") | (pw.this.eventType == "WORKFLOW_FAILED")
        )
        .select(
            pw.this.workflowInstanceId,
            t=millis(pw.this.eventTime),
            completed=pw.if_else(pw.this.eventType == "WORKFLOW_COMPLETED", 1, 0),
        )
        .groupby(pw.this.workflowInstanceId)
        .reduce(
            wid=pw.this.workflowInstanceId,
            latest=pw.reducers.max(pw.this.t * 2 + pw.this.completed),
            first=pw.reducers.min(pw.this.t),
        )
        .select(
            pw.this.wid,
            pw.this.first,
            status=pw.if_else(pw.this.latest % 2 == 1, "COMPLETED", "FAILED"),
            at=pw.this.latest // 2,
        )
    )

    # Each task with its definition (through its workflow's template version).
    tasks_defs = (
        task_state.join(workflows, pw.left.wid == pw.right.wid)
        .select(*pw.left, template_id=pw.right.template_id, version=pw.right.version)
        .join(
            defs,
            pw.left.template_id == pw.right.template_id,
            pw.left.version == pw.right.version,
            pw.left.def_id == pw.right.def_id,
        )
        .select(*pw.left, max_retries=pw.right.max_retries, sla_minutes=pw.right.sla_minutes)
    )
    per_def = tasks_defs.groupby(pw.this.wid, pw.this.def_id).reduce(
        wid=pw.this.wid,
        def_id=pw.this.def_id,
        completed_at=pw.reducers.min(
            pw.if_else(pw.this.status == "COMPLETED", pw.this.finished, NEVER)
        ),
        in_progress=pw.reducers.max(pw.if_else(pw.this.status == "IN_PROGRESS", 1, 0)),
        failed_at=pw.reducers.min(
            pw.if_else(
                (pw.this.status == "FAILED") & (pw.this.attempt > pw.this.max_retries),
                pw.this.finished,
                NEVER,
            )
        ),
    )

    # Every (workflow, template task) with what its instances reached.
    wdefs = workflows.join(
        defs,
        pw.left.template_id == pw.right.template_id,
        pw.left.version == pw.right.version,
    ).select(
        pw.left.wid,
        pw.right.def_id,
        pw.right.required,
        pw.right.next_id,
        pw.right.failure_id,
        pw.right.blocking,
    )
    wdefs = (
        wdefs.join_left(per_def, pw.left.wid == pw.right.wid, pw.left.def_id == pw.right.def_id)
        .select(
            *pw.left,
            completed_at=pw.coalesce(pw.right.completed_at, NEVER),
            in_progress=pw.coalesce(pw.right.in_progress, 0),
            failed_at=pw.coalesce(pw.right.failed_at, NEVER),
        )
        .with_id_from(pw.this.wid, pw.this.def_id)
    )

    # Progress and status per workflow.
    counts = wdefs.groupby(pw.this.wid).reduce(
        wid=pw.this.wid,
        required=pw.reducers.sum(pw.if_else(pw.this.required, 1, 0)),
        done=pw.reducers.sum(
            pw.if_else(pw.this.required & (pw.this.completed_at < NEVER), 1, 0)
        ),
        last_done=pw.reducers.max(
            pw.if_else(pw.this.required & (pw.this.completed_at < NEVER), pw.this.completed_at, 0)
        ),
        failed_at=pw.reducers.min(
            pw.if_else(pw.this.failure_id.is_none(), pw.this.failed_at, NEVER)
        ),
    )
    wf = (
        workflows.join_left(counts, pw.left.wid == pw.right.wid)
        .select(
            *pw.left,
            known=pw.right.wid.is_not_none(),
            required=pw.coalesce(pw.right.required, 0),
            done=pw.coalesce(pw.right.done, 0),
            last_done=pw.coalesce(pw.right.last_done, 0),
            failed_at=pw.coalesce(pw.right.failed_at, NEVER),
        )
        .join_left(terminal, pw.left.wid == pw.right.wid)
        .select(
            *pw.left,
            upstream=pw.right.status,
            upstream_at=pw.coalesce(pw.right.at, NEVER),
            first_upstream_at=pw.coalesce(pw.right.first, NEVER),
        )
    )
    wf = wf.select(
        *pw.this,
        r=pw.if_else(
            pw.this.known,
            workflow_status(
                pw.this.upstream,
                pw.this.upstream_at,
                pw.this.first_upstream_at,
                pw.this.started,
                pw.this.required,
                pw.this.done,
                pw.this.last_done,
                pw.this.failed_at,
            ),
            # A template this run does not know: nothing is derived (hmis-flow waits for it).
            ("ACTIVE", 0, NEVER),
        ),
    ).select(
        pw.this.wid,
        status=pw.unwrap(pw.this.r[0]),
        progress=pw.unwrap(pw.this.r[1]),
        closed_at=pw.unwrap(pw.this.r[2]),
    )

    # Readiness (contract §4) of the template tasks of ACTIVE workflows.
    active = wf.filter(pw.this.status == "ACTIVE")
    candidates = (
        wdefs.join(active, pw.left.wid == pw.right.wid, id=pw.left.id)
        .select(*pw.left)
        .filter(
            (pw.this.in_progress == 0)
            & (pw.this.completed_at == NEVER)
            & (pw.this.failed_at == NEVER)
        )
    )
    # 1. predecessors: a task whose nextTaskId is D and that has no COMPLETED instance.
    unmet = (
        wdefs.filter(pw.this.next_id.is_not_none() & (pw.this.completed_at == NEVER))
        .select(pw.this.wid, d=pw.unwrap(pw.this.next_id))
        .groupby(pw.this.wid, pw.this.d)
        .reduce(pw.this.wid, pw.this.d)
        .with_id_from(pw.this.wid, pw.this.d)
    )
    # Failure tasks: ready only once a task naming them failed with no retries left.
    targets = wdefs.filter(pw.this.failure_id.is_not_none()).select(
        pw.this.wid, d=pw.unwrap(pw.this.failure_id), fired=pw.this.failed_at < NEVER
    )
    targets = (
        targets.groupby(pw.this.wid, pw.this.d)
        .reduce(pw.this.wid, pw.this.d, fired=pw.reducers.max(pw.if_else(pw.this.fired, 1, 0)))
        .with_id_from(pw.this.wid, pw.this.d)
    )
    unfired = targets.filter(pw.this.fired == 0)
    # 2. blocking orders: an open order of W whose type D lists.
    orders = order_events.select(
        pw.this.orderId,
        pw.this.workflowInstanceId,
        pw.this.orderType,
        closed=pw.if_else(one_of(pw.this.orderStatus, CLOSED_ORDER), 1, 0),
    )
    open_types = (
        orders.groupby(pw.this.orderId)
        .reduce(
            wid=pw.reducers.max(pw.this.workflowInstanceId),
            order_type=pw.reducers.max(pw.this.orderType),
            closed=pw.reducers.max(pw.this.closed),
        )
        .filter((pw.this.closed == 0) & pw.this.wid.is_not_none() & pw.this.order_type.is_not_none())
        .groupby(pw.this.wid, pw.this.order_type)
        .reduce(wid=pw.unwrap(pw.this.wid), order_type=pw.unwrap(pw.this.order_type))
    )
    blocked = (
        candidates.select(pw.this.wid, pw.this.def_id, b=pw.this.blocking)
        .flatten(pw.this.b)
        .join(open_types, pw.left.wid == pw.right.wid, pw.left.b == pw.right.order_type)
        .select(pw.left.wid, pw.left.def_id)
        .groupby(pw.this.wid, pw.this.def_id)
        .reduce(pw.this.wid, pw.this.def_id)
        .with_id_from(pw.this.wid, pw.this.def_id)
    )
    # Predecessors do not apply to a failure task; its firing does.
    targets_ids = targets.select()
    unmet_plain = unmet.difference(targets_ids)
    ready = (
        candidates.difference(unmet_plain)
        .difference(unfired)
        .difference(blocked)
        .select(workflow_instance_id=pw.this.wid, task_def_id=pw.this.def_id)
    )

    # SLA breaches per (task, attempt).
    attempts = (
        te.select(
            pw.this.taskInstanceId,
            pw.this.attempt,
            created=pw.if_else(pw.this.eventType == "TASK_CREATED", pw.this.t, NEVER),
            due_explicit=pw.if_else(
                (pw.this.eventType == "TASK_CREATED") & pw.this.dueAt.is_not_none(),
                millis(pw.coalesce(pw.this.dueAt, "1970-01-01T00:00:00.000Z")),
                -1,
            ),
            latest_move=pw.if_else(pw.this.eventType == "TASK_CREATED", -1, pw.this.t),
            ended=pw.if_else(
                (pw.this.eventType == "TASK_COMPLETED") | (pw.this.eventType == "TASK_FAILED"), 1, 0
            ),
        )
        .groupby(pw.this.taskInstanceId, pw.this.attempt)
        .reduce(
            task_instance_id=pw.this.taskInstanceId,
            attempt=pw.this.attempt,
            created=pw.reducers.min(pw.this.created),
            due_explicit=pw.reducers.max(pw.this.due_explicit),
            latest_move=pw.reducers.max(pw.this.latest_move),
            ended=pw.reducers.max(pw.this.ended),
        )
    )
    attempts = (
        attempts.join(tasks_defs, pw.left.task_instance_id == pw.right.task_instance_id)
        .select(
            *pw.left,
            pw.right.wid,
            current=pw.right.attempt,
            current_status=pw.right.status,
            sla_minutes=pw.right.sla_minutes,
        )
        .join(wf, pw.left.wid == pw.right.wid)
        .select(*pw.left, wf_status=pw.right.status, closed_at=pw.right.closed_at)
    )
    attempts = attempts.select(
        *pw.this,
        due=pw.if_else(
            pw.this.due_explicit >= 0,
            pw.this.due_explicit,
            pw.if_else(
                pw.this.sla_minutes.is_not_none() & (pw.this.created < NEVER),
                pw.this.created + pw.coalesce(pw.this.sla_minutes, 0) * 60_000,
                -1,
            ),
        ),
        clock=clock.ix_ref().end,
    ).filter(pw.this.due >= 0)
    breaches = attempts.filter(
        # late by its own events
        (pw.this.latest_move > pw.this.due)
        # open when its workflow closed after dueAt
        | ((pw.this.wf_status != "ACTIVE") & (pw.this.ended == 0) & (pw.this.closed_at < NEVER) & (pw.this.closed_at > pw.this.due))
        # open (the task's current attempt, PENDING or IN_PROGRESS) when the clock passed dueAt
        | (
            (pw.this.wf_status == "ACTIVE")
            & (pw.this.ended == 0)
            & (pw.this.attempt == pw.this.current)
            & ((pw.this.current_status == "PENDING") | (pw.this.current_status == "IN_PROGRESS"))
            & (pw.this.clock > pw.this.due)
        )
    ).select(pw.this.task_instance_id, pw.this.attempt, due_at_ms=pw.this.due)

    out = lambda name: os.path.join(output_dir, f"{name}.jsonl")  # noqa: E731
    pw.io.jsonlines.write(
        task_state.select(pw.this.task_instance_id, pw.this.status, pw.this.attempt), out("tasks")
    )
    pw.io.jsonlines.write(
        wf.select(
            workflow_instance_id=pw.this.wid,
            status=pw.this.status,
            progress_percentage=pw.this.progress,
        ),
        out("workflows"),
    )
    pw.io.jsonlines.write(ready, out("readiness"))
    pw.io.jsonlines.write(breaches, out("sla_breaches"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--input", required=True, help="folder of hmis-flow generate --files")
    p.add_argument("--output", required=True, help="folder for the *.jsonl results")
    args = p.parse_args()
    os.makedirs(args.output, exist_ok=True)
    build(args.input, args.output)
    t_built = time.monotonic()
    pw.run(monitoring_level=pw.MonitoringLevel.NONE)
    t_ran = time.monotonic()

    def lines(name: str) -> int:
        with open(os.path.join(args.output, f"{name}.jsonl")) as f:
            return sum(1 for _ in f)

    summary = {
        "pathway_version": pw.__version__,
        "threads": int(os.environ.get("PATHWAY_THREADS", "1")),
        "import_s": round(T_IMPORTED - T_START, 3),
        "build_graph_s": round(t_built - T_IMPORTED, 3),
        "run_s": round(t_ran - t_built, 3),
        "output_lines": {n: lines(n) for n in ("tasks", "workflows", "readiness", "sla_breaches")},
    }
    with open(os.path.join(args.output, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
