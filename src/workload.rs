//! A seeded, I/O-free generator of a realistic HMIS workload, as Kafka records.
//!
//! Benchmarks, end-to-end tests and demos need input that looks like what the upstream
//! workflow engine publishes: definitions first, then workflows that start, move task by
//! task along their template, place and result orders, fail and retry, get cancelled,
//! or are simply left half-way (so some tasks are ready, blocked or overdue when the
//! input ends). This module produces exactly that, and nothing else: no Kafka, no clock,
//! no files. The same [`WorkloadConfig`] always gives the same records.
//!
//! ```text
//!   WorkloadConfig ──> templates (4 versions of 3 templates, §3)
//!        │               │
//!        │      per workflow i (own RNG from seed and i):
//!        │        WORKFLOW_STARTED ─> ready tasks ─> CREATED/STARTED/COMPLETED|FAILED ...
//!        │        orders: CREATED ─> AUTHORIZED ─> ACTIVATED ─> RESULTED ... | CANCELLED
//!        │        (a LAB_TEST order holds back the task that lists it as blocking)
//!        │               │
//!        └──> noise: malformed copies (before their model), exact duplicates (after)
//!                        │
//!                        v
//!        Vec<WorkloadRecord> in eventTime order (definitions first)
//! ```
//!
//! Ordering: the output is sorted by eventTime, so every topic, every partition and every
//! key sees its records in eventTime order whatever the partitioner; this is what the
//! `clock = event` watermark expects (contract §8). Definitions carry no eventTime and come
//! first. A duplicate is the byte-identical copy of an event re-sent right after it (as a
//! producer retry would); sending it any later would put an old eventTime after newer
//! ones of its partition. A malformed record is inserted just before the event it was
//! made from, with that event's key.
//!
//! Besides the malformed records that the pipeline must dead-letter (see
//! [`RecordKind::is_malformed`]), the well-formed events include some the rules reject
//! on purpose: an ORDER_AUTHORIZED by an ineligible role (`UNAUTHORIZED_ACTOR`, followed
//! by a valid one) and a late ORDER_CANCELLED of a CLOSED order (`INVALID_TRANSITION`).

use std::collections::HashSet;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Map, Value};

/// Input topic of workflow templates (key `templateId:version`).
pub const DEFINITIONS_TOPIC: &str = "workflow-definitions";
/// Input topic of task events (key `taskInstanceId`).
pub const TASK_EVENTS_TOPIC: &str = "workflow-task-events";
/// Input topic of order events (key `orderId`).
pub const ORDER_EVENTS_TOPIC: &str = "workflow-order-events";
/// Input topic of upstream workflow events (key `workflowInstanceId`).
pub const STATE_EVENTS_TOPIC: &str = "workflow-state-events";
/// Input topic of system events (key `component`).
pub const SYSTEM_EVENTS_TOPIC: &str = "system-events";

/// One record to produce: topic, key and value bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkloadRecord {
    /// One of the five input topics above.
    pub topic: &'static str,
    /// The key contract §1 names for the topic (always set).
    pub key: Option<String>,
    /// The JSON value (or, for an invalid-JSON record, the broken bytes).
    pub payload: Vec<u8>,
}

/// What to generate.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkloadConfig {
    /// Seed of every random choice; the same config gives the same records.
    pub seed: u64,
    /// Number of workflow instances (each yields about 10–40 records).
    pub workflows: usize,
    /// eventTime of the first WORKFLOW_STARTED, in ms since the Unix epoch. Workflows
    /// then start about one minute apart.
    pub start_ms: u64,
    /// Probability, per event, of also sending a malformed record made from it
    /// (invalid JSON, a missing field, a wrong field type, an unknown eventType). When
    /// above 0, two invalid definitions are published as well.
    pub bad_record_ratio: f64,
    /// Probability, per event, of sending it twice.
    pub duplicate_ratio: f64,
}

impl Default for WorkloadConfig {
    /// 100 clean workflows from 2026-11-26T08:00:00Z, seed 42.
    fn default() -> Self {
        WorkloadConfig {
            seed: 42,
            workflows: 100,
            start_ms: 1_795_680_000_000,
            bad_record_ratio: 0.0,
            duplicate_ratio: 0.0,
        }
    }
}

/// Why a record is in the workload; lets tests predict the dead letters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RecordKind {
    /// A valid workflow template.
    Definition,
    /// A template with a nextTaskId cycle or a dangling nextTaskId (`INVALID_DEFINITION`).
    InvalidDefinition,
    /// A well-formed event.
    Event,
    /// The exact copy of the event just before it.
    Duplicate,
    /// Bytes that are not JSON (`INVALID_JSON`).
    InvalidJson,
    /// An event without one required field (`SCHEMA_VIOLATION`).
    MissingField,
    /// An event whose eventId is a number (`SCHEMA_VIOLATION`).
    WrongFieldType,
    /// An event whose eventType its topic does not have (`UNKNOWN_EVENT_TYPE`).
    UnknownEventType,
}

impl RecordKind {
    /// True for the records the pipeline must reject on arrival as malformed.
    pub fn is_malformed(self) -> bool {
        matches!(
            self,
            RecordKind::InvalidDefinition
                | RecordKind::InvalidJson
                | RecordKind::MissingField
                | RecordKind::WrongFieldType
                | RecordKind::UnknownEventType
        )
    }
}

/// Generates the workload: definitions, then events in eventTime order.
pub fn generate(cfg: &WorkloadConfig) -> Vec<WorkloadRecord> {
    generate_labeled(cfg).into_iter().map(|(_, r)| r).collect()
}

/// Like [`generate`], with the reason each record is there.
pub fn generate_labeled(cfg: &WorkloadConfig) -> Vec<(RecordKind, WorkloadRecord)> {
    let templates = templates();
    let mut out = Vec::new();
    for t in &templates {
        out.push((
            RecordKind::Definition,
            WorkloadRecord {
                topic: DEFINITIONS_TOPIC,
                key: Some(format!("{}:{}", t.id, t.version)),
                payload: to_bytes(&t.json),
            },
        ));
    }
    let bad_ratio = cfg.bad_record_ratio.clamp(0.0, 1.0);
    let dup_ratio = cfg.duplicate_ratio.clamp(0.0, 1.0);
    if bad_ratio > 0.0 {
        for (key, json) in invalid_definitions() {
            out.push((
                RecordKind::InvalidDefinition,
                WorkloadRecord {
                    topic: DEFINITIONS_TOPIC,
                    key: Some(key),
                    payload: to_bytes(&json),
                },
            ));
        }
    }

    // Arrivals come from their own stream so that workflow i is the same whatever the
    // number of workflows.
    let mut arrivals = SmallRng::seed_from_u64(mix(cfg.seed, u64::MAX));
    let mut events = Vec::new();
    let mut t0 = cfg.start_ms;
    for i in 0..cfg.workflows {
        let mut rng = SmallRng::seed_from_u64(mix(cfg.seed, i as u64));
        let template = pick_template(&mut rng, &templates);
        let mut wf = Workflow::new(&mut rng, template, t0);
        wf.simulate();
        events.append(&mut wf.finish());
        // System events (contract §6) from their own stream, about one per two workflows.
        let mut sys = SmallRng::seed_from_u64(mix(cfg.seed ^ SYSTEM_STREAM, i as u64));
        if sys.random_bool(0.5) {
            let at = t0 + sys.random_range(0..60 * SEC);
            events.push(system_event(&mut sys, i, at));
        }
        t0 += 20 * SEC + arrivals.random_range(0..80 * SEC);
    }
    // Stable: events of one key were generated in time order, and ties keep it.
    events.sort_by_key(|e| e.time);

    let mut noise = SmallRng::seed_from_u64(mix(cfg.seed, u64::MAX - 1));
    for ev in events {
        if bad_ratio > 0.0 && noise.random_bool(bad_ratio) {
            let (kind, bytes) = malformed(&mut noise, &ev);
            out.push((
                kind,
                WorkloadRecord {
                    topic: ev.topic,
                    key: Some(ev.key.clone()),
                    payload: bytes,
                },
            ));
        }
        let record = WorkloadRecord {
            topic: ev.topic,
            key: Some(ev.key),
            payload: ev.payload,
        };
        let duplicate = dup_ratio > 0.0 && noise.random_bool(dup_ratio);
        if duplicate {
            out.push((RecordKind::Event, record.clone()));
            out.push((RecordKind::Duplicate, record));
        } else {
            out.push((RecordKind::Event, record));
        }
    }
    out
}

const SEC: u64 = 1_000;
const MIN: u64 = 60 * SEC;

/// Salt of the system events' random stream.
const SYSTEM_STREAM: u64 = 0x5359_5354_454d;

/// One system event of a few hospital components: health checks (some UNHEALTHY), metrics
/// (some above the default thresholds), error reports of every severity, audit entries.
fn system_event(rng: &mut SmallRng, i: usize, time: u64) -> Ev {
    let components = ["emr-api", "lab-gateway", "pacs", "pharmacy"];
    let component = components[rng.random_range(0..components.len())];
    let mut body = json!({
        "eventId": uuid_like(rng),
        "eventTime": rfc3339_ms(time),
        "component": component,
    });
    let fields = match rng.random_range(0..100) {
        0..40 => {
            let status = match rng.random_range(0..100) {
                0..70 => "UP",
                70..85 => "DEGRADED",
                _ => "UNHEALTHY",
            };
            json!({"eventType": "HEALTH_CHECK", "status": status})
        }
        40..65 => {
            if rng.random_bool(0.5) {
                json!({"eventType": "PERFORMANCE_METRIC", "metricName": "kafka.consumer.lag",
                       "value": rng.random_range(0..1500), "unit": "messages"})
            } else {
                json!({"eventType": "PERFORMANCE_METRIC", "metricName": "event.processing.time.ms",
                       "value": rng.random_range(0..70_000) as f64 / 10.0, "unit": "ms"})
            }
        }
        65..80 => {
            let severity = ["CRITICAL", "HIGH", "MEDIUM", "LOW"][rng.random_range(0..4)];
            json!({"eventType": "ERROR_REPORT", "severity": severity,
                   "message": format!("{component}: {} failed", ["query", "upload", "sync"][rng.random_range(0..3)])})
        }
        _ => {
            let action = ["VIEW", "EXPORT", "UPDATE"][rng.random_range(0..3)];
            json!({"eventType": "AUDIT_EVENT", "actor": format!("user-{}", rng.random_range(0..50)),
                   "action": action, "entityType": "PATIENT", "entityId": format!("patient-{i}"),
                   "details": {"reason": "treatment"}})
        }
    };
    merge(&mut body, fields);
    Ev {
        time,
        topic: SYSTEM_EVENTS_TOPIC,
        key: component.to_string(),
        payload: to_bytes(&body),
    }
}

// ------------------------------------------------------------------ templates ----

struct TaskDef {
    id: String,
    name: String,
    required: bool,
    next: Option<String>,
    sla_minutes: Option<u64>,
    max_retries: u32,
    failure: Option<String>,
    blocking: Vec<String>,
}

struct Template {
    id: String,
    version: u64,
    name: String,
    tasks: Vec<TaskDef>,
    json: Value,
}

impl Template {
    /// Reads the simulation's view from the published JSON, with the contract's
    /// defaults, so the two cannot disagree.
    fn from_json(json: Value) -> Template {
        let s = |v: &Value, k: &str| v.get(k).and_then(Value::as_str).map(str::to_owned);
        let tasks = json["tasks"]
            .as_array()
            .expect("template has tasks")
            .iter()
            .map(|t| TaskDef {
                id: s(t, "taskDefId").expect("taskDefId"),
                name: s(t, "name").expect("name"),
                required: t.get("required").and_then(Value::as_bool).unwrap_or(true),
                next: s(t, "nextTaskId"),
                sla_minutes: t.get("slaMinutes").and_then(Value::as_u64),
                max_retries: t.get("maxRetries").and_then(Value::as_u64).unwrap_or(0) as u32,
                failure: s(t, "failureTaskId"),
                blocking: t
                    .get("blockingOrderTypes")
                    .and_then(Value::as_array)
                    .map(|a| {
                        a.iter()
                            .filter_map(|x| x.as_str().map(str::to_owned))
                            .collect()
                    })
                    .unwrap_or_default(),
            })
            .collect();
        Template {
            id: s(&json, "templateId").expect("templateId"),
            version: json["version"].as_u64().expect("version"),
            name: s(&json, "templateName").expect("templateName"),
            tasks,
            json,
        }
    }

    fn index(&self, task_def_id: &str) -> usize {
        self.tasks
            .iter()
            .position(|t| t.id == task_def_id)
            .expect("task of the template")
    }
}

fn templates() -> Vec<Template> {
    vec![
        // The contract's example (§3).
        json!({"templateId": "sepsis-bundle", "version": 3, "templateName": "Sepsis Bundle",
        "tasks": [
         {"taskDefId": "triage", "name": "Triage", "required": true, "slaMinutes": 15,
          "nextTaskId": "blood-cultures", "escalateTo": "CHARGE_NURSE"},
         {"taskDefId": "blood-cultures", "name": "Draw blood cultures", "slaMinutes": 30,
          "nextTaskId": "antibiotics", "maxRetries": 2, "failureTaskId": "manual-review"},
         {"taskDefId": "antibiotics", "name": "Give antibiotics", "slaMinutes": 60,
          "blockingOrderTypes": ["LAB_TEST"]},
         {"taskDefId": "manual-review", "name": "Manual review", "required": false}
        ]}),
        // Its predecessor, still pinned by some workflows: no failure path, so a final
        // blood-culture failure fails the workflow.
        json!({"templateId": "sepsis-bundle", "version": 2, "templateName": "Sepsis Bundle",
        "tasks": [
         {"taskDefId": "triage", "name": "Triage", "required": true, "slaMinutes": 20,
          "nextTaskId": "blood-cultures", "escalateTo": "CHARGE_NURSE"},
         {"taskDefId": "blood-cultures", "name": "Draw blood cultures", "slaMinutes": 45,
          "nextTaskId": "antibiotics", "maxRetries": 1},
         {"taskDefId": "antibiotics", "name": "Give antibiotics", "slaMinutes": 90,
          "blockingOrderTypes": ["LAB_TEST"]}
        ]}),
        // Fan-in: the review waits for both the ECG and the troponin draw, and for the
        // troponin LAB_TEST order to be resulted.
        json!({"templateId": "chest-pain", "version": 1, "templateName": "Chest Pain Pathway",
        "tasks": [
         {"taskDefId": "ecg", "name": "12-lead ECG", "slaMinutes": 10,
          "nextTaskId": "cardiology-review", "escalateTo": "CHARGE_NURSE"},
         {"taskDefId": "troponin-draw", "name": "Draw high-sensitivity troponin",
          "slaMinutes": 20, "nextTaskId": "cardiology-review", "maxRetries": 1},
         {"taskDefId": "cardiology-review", "name": "Cardiology review", "slaMinutes": 60,
          "nextTaskId": "disposition", "blockingOrderTypes": ["LAB_TEST"],
          "escalateTo": "CARDIOLOGIST_ON_CALL"},
         {"taskDefId": "disposition", "name": "Admit or discharge decision", "slaMinutes": 120}
        ]}),
        // An optional automatic task beside the main chain, and a failure path.
        json!({"templateId": "inpatient-admission", "version": 1,
        "templateName": "Inpatient Admission",
        "tasks": [
         {"taskDefId": "registration", "name": "Register admission", "slaMinutes": 30,
          "nextTaskId": "bed-assignment", "automatic": true},
         {"taskDefId": "insurance-check", "name": "Verify insurance", "required": false,
          "automatic": true, "maxRetries": 2},
         {"taskDefId": "bed-assignment", "name": "Assign bed", "slaMinutes": 120,
          "nextTaskId": "admission-orders", "escalateTo": "BED_MANAGER"},
         {"taskDefId": "admission-orders", "name": "Write admission orders", "slaMinutes": 60,
          "nextTaskId": "nursing-assessment", "maxRetries": 1,
          "failureTaskId": "attending-review"},
         {"taskDefId": "nursing-assessment", "name": "Nursing admission assessment",
          "slaMinutes": 240},
         {"taskDefId": "attending-review", "name": "Attending physician review",
          "required": false, "slaMinutes": 30, "escalateTo": "ATTENDING"}
        ]}),
    ]
    .into_iter()
    .map(Template::from_json)
    .collect()
}

fn invalid_definitions() -> Vec<(String, Value)> {
    vec![
        (
            "broken-loop:1".to_owned(),
            json!({"templateId": "broken-loop", "version": 1, "templateName": "Broken loop",
            "tasks": [
             {"taskDefId": "a", "name": "A", "nextTaskId": "b"},
             {"taskDefId": "b", "name": "B", "nextTaskId": "a"}
            ]}),
        ),
        (
            "broken-link:1".to_owned(),
            json!({"templateId": "broken-link", "version": 1, "templateName": "Broken link",
            "tasks": [
             {"taskDefId": "a", "name": "A", "nextTaskId": "no-such-task"}
            ]}),
        ),
    ]
}

fn pick_template<'t>(rng: &mut SmallRng, templates: &'t [Template]) -> &'t Template {
    // sepsis v3, sepsis v2, chest pain, admission
    const WEIGHTS: [u32; 4] = [35, 10, 30, 25];
    let mut x = rng.random_range(0..WEIGHTS.iter().sum::<u32>());
    for (t, w) in templates.iter().zip(WEIGHTS) {
        if x < w {
            return t;
        }
        x -= w;
    }
    unreachable!("weights cover the range")
}

// ------------------------------------------------------------------ simulation ----

/// One event, serialized at once: a workload of millions of records keeps bytes, not
/// JSON trees.
struct Ev {
    time: u64,
    topic: &'static str,
    key: String,
    payload: Vec<u8>,
}

/// How a task's last attempt ended.
enum Outcome {
    Completed(u64),
    Failed(u64),
}

/// An order that holds back a task while open: (created, closed at, if ever).
type Blocker = (u64, Option<u64>);

struct Workflow<'a> {
    rng: &'a mut SmallRng,
    template: &'a Template,
    id: String,
    patient: String,
    department: &'static str,
    t0: u64,
    events: Vec<Ev>,
    /// Per task definition, the orders of a type it lists in blockingOrderTypes.
    blockers: Vec<Vec<Blocker>>,
}

const DEPARTMENTS: [&str; 4] = ["EMERGENCY", "CARDIOLOGY", "INTERNAL_MEDICINE", "ICU"];
const ERRORS: [&str; 5] = [
    "specimen hemolyzed",
    "patient unavailable",
    "device connection lost",
    "insufficient sample volume",
    "assignee timed out",
];
const CANCEL_REASONS: [&str; 4] = [
    "duplicate order",
    "patient transferred",
    "ordered in error",
    "patient declined",
];

impl<'a> Workflow<'a> {
    fn new(rng: &'a mut SmallRng, template: &'a Template, t0: u64) -> Self {
        let id = uuid_like(rng);
        let patient = uuid_like(rng);
        let department = match template.id.as_str() {
            "chest-pain" => "CARDIOLOGY",
            "inpatient-admission" => "INTERNAL_MEDICINE",
            _ => DEPARTMENTS[rng.random_range(0..DEPARTMENTS.len())],
        };
        let blockers = template.tasks.iter().map(|_| Vec::new()).collect();
        Workflow {
            rng,
            template,
            id,
            patient,
            department,
            t0,
            events: Vec::new(),
            blockers,
        }
    }

    /// A random duration in [lo, hi) minutes, with seconds and milliseconds.
    fn minutes(&mut self, lo: u64, hi: u64) -> u64 {
        self.rng.random_range(lo * MIN..hi * MIN)
    }

    fn chance(&mut self, p: f64) -> bool {
        self.rng.random_bool(p)
    }

    fn staff(&mut self) -> String {
        format!("staff-{:04}", self.rng.random_range(1..400))
    }

    fn emit(&mut self, time: u64, topic: &'static str, key: &str, event_type: &str, fields: Value) {
        let mut body = Map::new();
        body.insert("eventId".into(), uuid_like(self.rng).into());
        body.insert("eventType".into(), event_type.into());
        body.insert("eventTime".into(), rfc3339_ms(time).into());
        if let Value::Object(f) = fields {
            body.extend(f);
        }
        body.entry("metadata").or_insert_with(|| json!({}));
        self.events.push(Ev {
            time,
            topic,
            key: key.to_owned(),
            payload: to_bytes(&Value::Object(body)),
        });
    }

    fn workflow_event(&mut self, time: u64, event_type: &str, status: &str, extra: Value) {
        let mut fields = json!({
            "workflowInstanceId": self.id, "patientId": self.patient,
            "templateId": self.template.id, "templateVersion": self.template.version,
            "workflowTemplateName": self.template.name, "status": status,
        });
        merge(&mut fields, extra);
        let key = self.id.clone();
        self.emit(time, STATE_EVENTS_TOPIC, &key, event_type, fields);
    }

    fn simulate(&mut self) {
        let t0 = self.t0;
        let priority = if self.chance(0.3) {
            "URGENT"
        } else {
            "ROUTINE"
        };
        self.workflow_event(
            t0,
            "WORKFLOW_STARTED",
            "ACTIVE",
            json!({"metadata": {"department": self.department, "priority": priority}}),
        );
        self.place_initial_orders();

        let tpl = self.template;
        let n = tpl.tasks.len();
        let preds: Vec<Vec<usize>> = (0..n)
            .map(|d| {
                (0..n)
                    .filter(|&p| tpl.tasks[p].next.as_deref() == Some(&tpl.tasks[d].id))
                    .collect()
            })
            .collect();
        let failure_targets: HashSet<&str> = tpl
            .tasks
            .iter()
            .filter_map(|t| t.failure.as_deref())
            .collect();

        let mut ready: Vec<(u64, usize)> = Vec::new();
        for (d, def) in tpl.tasks.iter().enumerate() {
            if preds[d].is_empty() && !failure_targets.contains(def.id.as_str()) {
                let at = t0 + self.minutes(0, 3);
                ready.push((at, d));
            }
        }
        let mut completed: Vec<Option<u64>> = vec![None; n];
        let mut failed_workflow = false;
        let mut used_failure_path = false;
        let mut last = t0;
        while let Some(i) = (0..ready.len()).min_by_key(|&i| ready[i].0) {
            let (ready_at, d) = ready.swap_remove(i);
            let Some(start) = self.unblocked_at(d, ready_at) else {
                continue; // a blocking order never closes: the task is never created
            };
            let start = self.before_task(d, start);
            let Some(start) = self.unblocked_at(d, start) else {
                continue;
            };
            match self.run_task(d, start) {
                Outcome::Completed(end) => {
                    last = last.max(end);
                    completed[d] = Some(end);
                    self.after_task(d, end);
                    if let Some(next) = tpl.tasks[d].next.as_deref() {
                        let next = tpl.index(next);
                        let done: Option<Vec<u64>> =
                            preds[next].iter().map(|&p| completed[p]).collect();
                        if let Some(done) = done {
                            ready.push((done.into_iter().max().unwrap_or(end), next));
                        }
                    }
                }
                Outcome::Failed(end) => {
                    last = last.max(end);
                    if let Some(f) = tpl.tasks[d].failure.as_deref() {
                        used_failure_path = true;
                        ready.push((end, tpl.index(f)));
                    } else {
                        // hmis-flow fails the workflow; upstream sends nothing more.
                        failed_workflow = true;
                        break;
                    }
                }
            }
        }

        if self.chance(0.05) {
            let at = t0 + self.minutes(5, 60).min(last.saturating_sub(t0).max(MIN));
            let reason = ["PATIENT_DETERIORATION", "FAMILY_REQUEST", "BED_SHORTAGE"]
                [self.rng.random_range(0..3)];
            self.workflow_event(
                at,
                "WORKFLOW_ESCALATED",
                "ACTIVE",
                json!({"escalationReason": reason}),
            );
        }
        let all_required = tpl
            .tasks
            .iter()
            .zip(&completed)
            .all(|(t, c)| !t.required || c.is_some());
        if all_required && !failed_workflow && self.chance(0.3) {
            let at = last + self.minutes(1, 5);
            self.workflow_event(at, "WORKFLOW_COMPLETED", "COMPLETED", json!({}));
        } else if used_failure_path && !all_required && self.chance(0.5) {
            let at = last + self.minutes(1, 10);
            self.workflow_event(
                at,
                "WORKFLOW_FAILED",
                "FAILED",
                json!({"metadata": {"reason": "closed after review"}}),
            );
        }
    }

    /// When task `d`, ready at `ready_at`, can start: after every blocking order created
    /// before that moment is closed; `None` if one never closes.
    fn unblocked_at(&self, d: usize, ready_at: u64) -> Option<u64> {
        let mut start = ready_at;
        loop {
            let mut moved = false;
            for &(created, closed) in &self.blockers[d] {
                if created <= start {
                    let closed = closed?;
                    if closed > start {
                        start = closed;
                        moved = true;
                    }
                }
            }
            if !moved {
                return Some(start);
            }
        }
    }

    /// Runs every attempt of one task instance from `start`.
    fn run_task(&mut self, d: usize, start: u64) -> Outcome {
        let tpl = self.template;
        let def = &tpl.tasks[d];
        let task_id = uuid_like(self.rng);
        let budget = def.sla_minutes.unwrap_or(30) * MIN;
        let retrying = def.max_retries > 0 || def.failure.is_some();
        let mut attempt: u32 = 1;
        let mut t = start;
        loop {
            let created = t + self.minutes(0, 2) + SEC;
            let mut fields = json!({"status": "PENDING"});
            if self.chance(0.2) {
                // An explicit due time, sometimes tighter than the template's SLA.
                let due = created
                    + if self.chance(0.5) {
                        budget
                    } else {
                        budget * 2 / 3
                    };
                merge(&mut fields, json!({"dueAt": rfc3339_ms(due)}));
            }
            self.task_event(created, "TASK_CREATED", &task_id, d, attempt, fields);

            // Time from creation to the end: within the SLA mostly, over it sometimes.
            let late = self.chance(0.12);
            let total = if late {
                budget + self.rng.random_range(MIN..budget / 2 + 2 * MIN)
            } else {
                self.rng.random_range(budget * 3 / 10..budget * 9 / 10)
            };
            let started = created + (total * self.rng.random_range(2..5) / 10).max(MIN);
            let end = (created + total).max(started + MIN);
            let assignee = self.staff();
            self.task_event(
                started,
                "TASK_STARTED",
                &task_id,
                d,
                attempt,
                json!({"status": "IN_PROGRESS", "metadata": {"assignee": assignee}}),
            );
            let p_fail = if retrying { 0.3 } else { 0.03 };
            if self.chance(p_fail) {
                let error = ERRORS[self.rng.random_range(0..ERRORS.len())];
                self.task_event(
                    end,
                    "TASK_FAILED",
                    &task_id,
                    d,
                    attempt,
                    json!({"status": "FAILED", "errorMessage": error}),
                );
                if attempt <= def.max_retries {
                    attempt += 1; // a retry: TASK_CREATED with attempt + 1
                    t = end;
                    continue;
                }
                return Outcome::Failed(end);
            }
            self.task_event(
                end,
                "TASK_COMPLETED",
                &task_id,
                d,
                attempt,
                json!({"status": "COMPLETED"}),
            );
            return Outcome::Completed(end);
        }
    }

    fn task_event(
        &mut self,
        time: u64,
        event_type: &str,
        task_id: &str,
        d: usize,
        attempt: u32,
        extra: Value,
    ) {
        let tpl = self.template;
        let def = &tpl.tasks[d];
        let mut fields = json!({
            "taskInstanceId": task_id, "workflowInstanceId": self.id, "patientId": self.patient,
            "taskDefId": def.id, "taskName": def.name, "attempt": attempt,
        });
        merge(&mut fields, extra);
        self.emit(time, TASK_EVENTS_TOPIC, task_id, event_type, fields);
    }

    // -- template-specific orders ------------------------------------------------

    fn place_initial_orders(&mut self) {
        let t0 = self.t0;
        match self.template.id.as_str() {
            "sepsis-bundle" => {
                let at = t0 + self.minutes(2, 8);
                self.order(at, "LAB_TEST");
            }
            "chest-pain" => {
                let at = t0 + self.minutes(1, 4);
                self.order(at, "LAB_TEST");
                let at = t0 + self.minutes(3, 10);
                self.order(at, "IMAGING");
            }
            _ => {}
        }
    }

    /// Called when task `d` could start at `start`; returns when it really starts.
    fn before_task(&mut self, d: usize, start: u64) -> u64 {
        let tpl = self.template;
        match (tpl.id.as_str(), tpl.tasks[d].id.as_str()) {
            ("chest-pain", "cardiology-review") if self.chance(0.2) => {
                // A repeat troponin ordered after the review became ready: it blocks it
                // again (TASK_BLOCKED), until resulted.
                let at = start + self.minutes(1, 3);
                self.order(at, "LAB_TEST");
                start + 5 * MIN
            }
            ("sepsis-bundle", "antibiotics") => {
                let at = start + self.minutes(1, 3);
                self.order(at, "MEDICATION");
                start
            }
            _ => start,
        }
    }

    fn after_task(&mut self, d: usize, end: u64) {
        if (
            self.template.id.as_str(),
            self.template.tasks[d].id.as_str(),
        ) == ("inpatient-admission", "admission-orders")
        {
            let at = end + self.minutes(1, 5);
            self.order(at, "MEDICATION");
            let at = end + self.minutes(1, 10);
            self.order(at, "DIET");
            if self.chance(0.08) {
                let at = end + self.minutes(10, 60);
                self.order(at, "SURGERY");
            }
        }
    }

    /// One order's whole life from `created`. It holds back, until closed, every task
    /// definition that lists its type in blockingOrderTypes.
    fn order(&mut self, created: u64, order_type: &'static str) {
        let order_id = uuid_like(self.rng);
        let cost = match order_type {
            "LAB_TEST" => 45.0,
            "IMAGING" => 320.0,
            "MEDICATION" => 18.5,
            "SURGERY" => 4200.0,
            _ => 0.0,
        };
        let mut meta = json!({"department": self.department, "cost": cost});
        if order_type == "IMAGING" || order_type == "SURGERY" {
            meta["appointmentId"] = uuid_like(self.rng).into();
        }
        let orderer = self.staff();
        self.order_event(
            created,
            "ORDER_CREATED",
            &order_id,
            order_type,
            "PROPOSED",
            &orderer,
            "PHYSICIAN",
            meta,
        );
        let closed = self.order_life(created, &order_id, order_type);
        let tpl = self.template;
        for (d, def) in tpl.tasks.iter().enumerate() {
            if def.blocking.iter().any(|b| b == order_type) {
                self.blockers[d].push((created, closed));
            }
        }
    }

    /// Everything after ORDER_CREATED; returns when the order stopped being open.
    fn order_life(
        &mut self,
        created: u64,
        order_id: &str,
        order_type: &'static str,
    ) -> Option<u64> {
        let dept = self.department;
        let base = json!({"department": dept});
        // Where a cancellation, if any, comes: 1 after creation, 2 after authorization,
        // 3 after activation.
        let p_cancel = if order_type == "IMAGING" { 0.15 } else { 0.06 };
        let cancel_after = if self.chance(p_cancel) {
            self.rng.random_range(1..4)
        } else {
            0
        };
        let cancel = |w: &mut Self, t: u64| -> Option<u64> {
            let at = t + w.minutes(1, 20);
            let reason = CANCEL_REASONS[w.rng.random_range(0..CANCEL_REASONS.len())];
            let actor = w.staff();
            w.order_event(
                at,
                "ORDER_CANCELLED",
                order_id,
                order_type,
                "CANCELLED",
                &actor,
                "PHYSICIAN",
                json!({"department": dept, "reason": reason}),
            );
            Some(at)
        };
        if cancel_after == 1 {
            return cancel(self, created);
        }

        let eligible: &[&str] = match order_type {
            "LAB_TEST" | "IMAGING" => &["PHYSICIAN", "NURSE_PRACTITIONER"],
            "SURGERY" => &["SURGEON"],
            _ => &["PHYSICIAN"],
        };
        let mut t = created + self.minutes(1, 6);
        if self.chance(0.04) {
            // An ineligible role first (UNAUTHORIZED_ACTOR), then the right one.
            let wrong = match order_type {
                "SURGERY" => "PHYSICIAN",
                "MEDICATION" => "NURSE_PRACTITIONER",
                _ => "NURSE",
            };
            let actor = self.staff();
            self.order_event(
                t,
                "ORDER_AUTHORIZED",
                order_id,
                order_type,
                "AUTHORIZED",
                &actor,
                wrong,
                base.clone(),
            );
            t += self.minutes(2, 8);
        }
        let role = eligible[self.rng.random_range(0..eligible.len())];
        let actor = self.staff();
        self.order_event(
            t,
            "ORDER_AUTHORIZED",
            order_id,
            order_type,
            "AUTHORIZED",
            &actor,
            role,
            base.clone(),
        );
        if cancel_after == 2 {
            return cancel(self, t);
        }

        // LAB_TEST and IMAGING are activated by the upstream system on request;
        // MEDICATION and SURGERY wait for someone.
        t += match order_type {
            "LAB_TEST" | "IMAGING" => self.minutes(1, 3),
            _ => self.minutes(3, 25),
        };
        let actor = self.staff();
        let cost = match order_type {
            "LAB_TEST" => 45.0,
            "IMAGING" => 320.0,
            "MEDICATION" => 18.5,
            "SURGERY" => 4200.0,
            _ => 0.0,
        };
        let meta = json!({"department": dept, "cost": cost});
        self.order_event(
            t,
            "ORDER_ACTIVATED",
            order_id,
            order_type,
            "ACTIVATED",
            &actor,
            role,
            meta,
        );
        if cancel_after == 3 {
            return cancel(self, t);
        }
        if self.chance(0.05) {
            return None; // stalls: never resulted (ORDER_OVERDUE; blocks its task forever)
        }
        if self.chance(0.4) {
            let at = t + self.minutes(1, 5);
            let actor = self.staff();
            self.order_event(
                at,
                "ORDER_STARTED",
                order_id,
                order_type,
                "IN_PROGRESS",
                &actor,
                role,
                base.clone(),
            );
            t = at;
        }
        // Fulfilment within the type's limit mostly (LAB_TEST 60, IMAGING 120,
        // MEDICATION 30 minutes from activation), past it sometimes.
        let (limit, status) = match order_type {
            "LAB_TEST" => (60, "RESULTED"),
            "IMAGING" => (120, "RESULTED"),
            "MEDICATION" => (30, "DISPENSED"),
            _ => (90, "COMPLETED"),
        };
        let overdue = self.chance(0.1);
        t += if overdue {
            self.minutes(limit + 1, limit * 2)
        } else {
            self.minutes(limit / 6, limit * 3 / 4)
        };
        let critical = matches!(order_type, "LAB_TEST" | "IMAGING") && self.chance(0.08);
        let actor = self.staff();
        let result_meta = json!({"department": dept, "critical": critical});
        self.order_event(
            t,
            "ORDER_RESULTED",
            order_id,
            order_type,
            status,
            &actor,
            role,
            result_meta,
        );
        let closed = t;

        if self.chance(0.4) {
            t += self.minutes(5, 30);
            let actor = self.staff();
            self.order_event(
                t,
                "ORDER_VERIFIED",
                order_id,
                order_type,
                "VERIFIED",
                &actor,
                role,
                base.clone(),
            );
            if self.chance(0.5) {
                t += self.minutes(5, 60);
                let actor = self.staff();
                self.order_event(
                    t,
                    "ORDER_CLOSED",
                    order_id,
                    order_type,
                    "CLOSED",
                    &actor,
                    role,
                    base.clone(),
                );
                if self.chance(0.05) {
                    // Too late: a CLOSED order cannot be cancelled (INVALID_TRANSITION).
                    t += self.minutes(5, 60);
                    let actor = self.staff();
                    let meta = json!({"department": dept, "reason": "ordered in error"});
                    self.order_event(
                        t,
                        "ORDER_CANCELLED",
                        order_id,
                        order_type,
                        "CANCELLED",
                        &actor,
                        role,
                        meta,
                    );
                }
            }
        }
        Some(closed)
    }

    fn order_event(
        &mut self,
        time: u64,
        event_type: &str,
        order_id: &str,
        order_type: &str,
        status: &str,
        actor: &str,
        actor_role: &str,
        metadata: Value,
    ) {
        let mut metadata = metadata;
        metadata["actorRole"] = actor_role.into();
        let fields = json!({
            "orderId": order_id, "workflowInstanceId": self.id, "patientId": self.patient,
            "orderType": order_type, "orderStatus": status, "actor": actor, "metadata": metadata,
        });
        self.emit(time, ORDER_EVENTS_TOPIC, order_id, event_type, fields);
    }

    /// The events of this workflow up to its cutoff: a quarter of the workflows are
    /// left somewhere in the middle, as if the input ended there.
    fn finish(mut self) -> Vec<Ev> {
        let last = self.events.iter().map(|e| e.time).max().unwrap_or(self.t0);
        if self.chance(0.25) && last > self.t0 {
            let cutoff = self.rng.random_range(self.t0..last);
            self.events.retain(|e| e.time <= cutoff);
        }
        self.events
    }
}

// ---------------------------------------------------------------------- noise ----

/// A malformed record made from `ev`, with its key.
fn malformed(rng: &mut SmallRng, ev: &Ev) -> (RecordKind, Vec<u8>) {
    let mut body: Map<String, Value> =
        serde_json::from_slice(&ev.payload).expect("an event is a JSON object");
    body.insert("eventId".into(), uuid_like(rng).into());
    match rng.random_range(0..4) {
        0 => {
            // A strict prefix of an object never closes it: never valid JSON.
            let bytes = to_bytes(&Value::Object(body));
            let cut = rng.random_range(1..bytes.len());
            (RecordKind::InvalidJson, bytes[..cut].to_vec())
        }
        1 => {
            let id_field = match ev.topic {
                TASK_EVENTS_TOPIC => "taskInstanceId",
                ORDER_EVENTS_TOPIC => "orderId",
                SYSTEM_EVENTS_TOPIC => "component",
                _ => "workflowInstanceId",
            };
            let fields = ["eventId", "eventType", "eventTime", id_field];
            body.remove(fields[rng.random_range(0..fields.len())]);
            (RecordKind::MissingField, to_bytes(&Value::Object(body)))
        }
        2 => {
            body.insert("eventId".into(), rng.random_range(1..1_000_000u64).into());
            (RecordKind::WrongFieldType, to_bytes(&Value::Object(body)))
        }
        _ => {
            let types: &[&str] = match ev.topic {
                TASK_EVENTS_TOPIC => &["TASK_PAUSED", "TASK_REASSIGNED"],
                ORDER_EVENTS_TOPIC => &["ORDER_ON_HOLD", "ORDER_REFUNDED"],
                SYSTEM_EVENTS_TOPIC => &["REBOOT", "HEARTBEAT"],
                _ => &["WORKFLOW_PAUSED", "WORKFLOW_ARCHIVED"],
            };
            body.insert(
                "eventType".into(),
                types[rng.random_range(0..types.len())].into(),
            );
            (RecordKind::UnknownEventType, to_bytes(&Value::Object(body)))
        }
    }
}

// -------------------------------------------------------------------- helpers ----

fn to_bytes(v: &Value) -> Vec<u8> {
    serde_json::to_vec(v).expect("a JSON value serializes")
}

/// Adds the fields of `extra` to `fields`; a `metadata` object is merged key by key.
fn merge(fields: &mut Value, extra: Value) {
    let (Value::Object(f), Value::Object(e)) = (fields, extra) else {
        return;
    };
    for (k, v) in e {
        match (f.get_mut(&k), v) {
            (Some(Value::Object(old)), Value::Object(new)) => old.extend(new),
            (_, v) => {
                f.insert(k, v);
            }
        }
    }
}

/// splitmix64 of the seed and a stream number: independent streams from one seed.
fn mix(seed: u64, stream: u64) -> u64 {
    let mut z = seed ^ stream.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A random UUID (version 4 layout) drawn from `rng`.
fn uuid_like(rng: &mut SmallRng) -> String {
    let hi: u64 = (rng.random::<u64>() & !0xF000) | 0x4000;
    let lo: u64 = (rng.random::<u64>() & 0x3FFF_FFFF_FFFF_FFFF) | 0x8000_0000_0000_0000;
    format!(
        "{:08x}-{:04x}-{:04x}-{:04x}-{:012x}",
        hi >> 32,
        (hi >> 16) & 0xFFFF,
        hi & 0xFFFF,
        lo >> 48,
        lo & 0xFFFF_FFFF_FFFF
    )
}

/// `ms` since the epoch as RFC 3339 UTC with milliseconds: `2026-11-26T10:15:00.123Z`.
fn rfc3339_ms(ms: u64) -> String {
    let secs = ms / 1000;
    let (y, m, d) = civil_from_days((secs / 86_400) as i64);
    let s = secs % 86_400;
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        s / 3600,
        s % 3600 / 60,
        s % 60,
        ms % 1000
    )
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian (H. Hinnant).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = (if z >= 0 { z } else { z - 146_096 }) / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = (if mp < 10 { mp + 3 } else { mp - 9 }) as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, HashMap};

    use super::*;

    fn cfg(seed: u64, workflows: usize, bad: f64, dup: f64) -> WorkloadConfig {
        WorkloadConfig {
            seed,
            workflows,
            bad_record_ratio: bad,
            duplicate_ratio: dup,
            ..WorkloadConfig::default()
        }
    }

    fn parse(r: &WorkloadRecord) -> Option<Value> {
        serde_json::from_slice(&r.payload).ok()
    }

    /// The well-formed events, parsed.
    fn events(recs: &[(RecordKind, WorkloadRecord)]) -> Vec<(&WorkloadRecord, Value)> {
        recs.iter()
            .filter(|(k, _)| *k == RecordKind::Event)
            .map(|(_, r)| (r, parse(r).expect("an event is JSON")))
            .collect()
    }

    fn str_of<'v>(v: &'v Value, k: &str) -> &'v str {
        v[k].as_str()
            .unwrap_or_else(|| panic!("{k} missing in {v}"))
    }

    #[test]
    fn same_seed_same_records_other_seed_other_records() {
        let a = generate(&cfg(7, 200, 0.05, 0.05));
        let b = generate(&cfg(7, 200, 0.05, 0.05));
        assert_eq!(a, b);
        let c = generate(&cfg(8, 200, 0.05, 0.05));
        assert_ne!(a, c);
    }

    #[test]
    fn every_payload_is_json_except_the_intended_ones() {
        let clean = generate(&cfg(1, 300, 0.0, 0.0));
        assert!(clean
            .iter()
            .all(|r| parse(r).is_some_and(|v| v.is_object())));

        let recs = generate_labeled(&cfg(1, 300, 0.05, 0.0));
        let mut bad = 0;
        for (kind, r) in &recs {
            match kind {
                RecordKind::InvalidJson => assert!(
                    parse(r).is_none(),
                    "{:?}",
                    String::from_utf8_lossy(&r.payload)
                ),
                _ => assert!(parse(r).is_some_and(|v| v.is_object()), "{kind:?}"),
            }
            bad += usize::from(kind.is_malformed());
            assert!(
                r.key.as_deref().is_some_and(|k| !k.is_empty()),
                "every record has a key"
            );
        }
        let events = recs.iter().filter(|(k, _)| *k == RecordKind::Event).count();
        let ratio = (bad - 2) as f64 / events as f64;
        assert!((0.03..0.07).contains(&ratio), "malformed ratio {ratio}");
        for kind in [
            RecordKind::InvalidJson,
            RecordKind::MissingField,
            RecordKind::WrongFieldType,
            RecordKind::UnknownEventType,
        ] {
            assert!(recs.iter().any(|(k, _)| *k == kind), "no {kind:?}");
        }
    }

    #[test]
    fn per_key_and_overall_event_time_order() {
        let recs = generate_labeled(&cfg(3, 400, 0.05, 0.05));
        // Definitions first.
        let first_event = recs
            .iter()
            .position(|(_, r)| r.topic != DEFINITIONS_TOPIC)
            .unwrap();
        assert!(recs[first_event..]
            .iter()
            .all(|(_, r)| r.topic != DEFINITIONS_TOPIC));
        let mut last_per_key: HashMap<(&str, String), String> = HashMap::new();
        let mut last = String::new();
        for (_, r) in &recs[first_event..] {
            let Some(time) = parse(r).and_then(|v| v["eventTime"].as_str().map(str::to_owned))
            else {
                continue;
            };
            // Fixed-width RFC 3339 in UTC sorts as text.
            assert!(time >= last, "{time} after {last}");
            let key = (r.topic, r.key.clone().unwrap());
            if let Some(prev) = last_per_key.get(&key) {
                assert!(&time >= prev, "{key:?}: {time} after {prev}");
            }
            last_per_key.insert(key, time.clone());
            last = time;
        }
    }

    #[test]
    fn events_follow_the_contract() {
        let recs = generate_labeled(&cfg(5, 300, 0.0, 0.0));
        let mut ids = HashSet::new();
        for (r, v) in events(&recs) {
            assert!(
                ids.insert(str_of(&v, "eventId").to_owned()),
                "eventIds are unique"
            );
            assert_eq!(str_of(&v, "eventId").len(), 36);
            let time = str_of(&v, "eventTime");
            assert!(
                time.len() == 24 && time.ends_with('Z') && &time[19..20] == ".",
                "{time}"
            );
            let ty = str_of(&v, "eventType");
            let key = r.key.as_deref().unwrap();
            if r.topic == SYSTEM_EVENTS_TOPIC {
                assert_eq!(str_of(&v, "component"), key, "key is the component");
                let named: &[&str] = match ty {
                    "HEALTH_CHECK" => &["status"],
                    "PERFORMANCE_METRIC" => &["metricName", "unit"],
                    "ERROR_REPORT" => &["severity", "message"],
                    "AUDIT_EVENT" => &["actor", "action", "entityType", "entityId"],
                    other => panic!("system event {other}"),
                };
                for field in named {
                    str_of(&v, field);
                }
                continue;
            }
            assert!(v["metadata"].is_object());
            let (id_field, status) = match r.topic {
                TASK_EVENTS_TOPIC => {
                    assert!(v["attempt"].as_u64().is_some_and(|a| a >= 1));
                    let status = match ty {
                        "TASK_CREATED" => "PENDING",
                        "TASK_STARTED" => "IN_PROGRESS",
                        "TASK_COMPLETED" => "COMPLETED",
                        "TASK_FAILED" => "FAILED",
                        other => panic!("task event {other}"),
                    };
                    if ty == "TASK_FAILED" {
                        str_of(&v, "errorMessage");
                    }
                    ("taskInstanceId", Some(status))
                }
                ORDER_EVENTS_TOPIC => {
                    assert!(ty.starts_with("ORDER_"), "{ty}");
                    str_of(&v, "orderType");
                    str_of(&v, "actor");
                    str_of(&v["metadata"], "actorRole");
                    ("orderId", None)
                }
                STATE_EVENTS_TOPIC => {
                    let status = match ty {
                        "WORKFLOW_STARTED" | "WORKFLOW_ESCALATED" => "ACTIVE",
                        "WORKFLOW_COMPLETED" => "COMPLETED",
                        "WORKFLOW_FAILED" => "FAILED",
                        other => panic!("workflow event {other}"),
                    };
                    assert!(v["templateVersion"].is_u64());
                    str_of(&v, "templateId");
                    str_of(&v, "workflowTemplateName");
                    ("workflowInstanceId", Some(status))
                }
                other => panic!("topic {other}"),
            };
            assert_eq!(str_of(&v, id_field), key, "key is the {id_field}");
            if let Some(status) = status {
                assert_eq!(str_of(&v, "status"), status);
            }
            str_of(&v, "workflowInstanceId");
            str_of(&v, "patientId");
        }
    }

    #[test]
    fn duplicates_are_exact_copies_right_after_their_event() {
        let recs = generate_labeled(&cfg(9, 200, 0.0, 0.1));
        let mut dups = 0;
        for (i, (kind, r)) in recs.iter().enumerate() {
            if *kind == RecordKind::Duplicate {
                assert_eq!(recs[i - 1].0, RecordKind::Event);
                assert_eq!(&recs[i - 1].1, r);
                dups += 1;
            }
        }
        let events = recs.iter().filter(|(k, _)| *k == RecordKind::Event).count();
        let ratio = dups as f64 / events as f64;
        assert!((0.07..0.13).contains(&ratio), "duplicate ratio {ratio}");
    }

    #[test]
    fn definitions_are_valid_templates_with_fan_in_and_an_optional_task() {
        let recs = generate_labeled(&cfg(1, 0, 0.1, 0.0));
        assert!(recs.iter().all(|(_, r)| r.topic == DEFINITIONS_TOPIC));
        let mut fan_in = false;
        let mut optional = false;
        for (kind, r) in &recs {
            let v = parse(r).unwrap();
            assert_eq!(
                r.key.as_deref().unwrap(),
                format!("{}:{}", str_of(&v, "templateId"), v["version"])
            );
            let tasks = v["tasks"].as_array().unwrap();
            let ids: HashSet<&str> = tasks.iter().map(|t| str_of(t, "taskDefId")).collect();
            let next: HashMap<&str, &str> = tasks
                .iter()
                .filter_map(|t| Some((str_of(t, "taskDefId"), t["nextTaskId"].as_str()?)))
                .collect();
            let links_ok = tasks.iter().all(|t| {
                ["nextTaskId", "failureTaskId"]
                    .iter()
                    .all(|f| t[*f].as_str().is_none_or(|x| ids.contains(x)))
            });
            // Following nextTaskId from any task ends within |tasks| steps.
            let acyclic = ids.iter().all(|&start| {
                let mut at = start;
                !(0..=ids.len()).all(|_| match next.get(at) {
                    Some(n) => {
                        at = n;
                        true
                    }
                    None => false,
                })
            });
            assert_eq!(links_ok && acyclic, *kind == RecordKind::Definition, "{v}");
            let mut in_degree: BTreeMap<&str, usize> = BTreeMap::new();
            for n in next.values() {
                *in_degree.entry(n).or_default() += 1;
            }
            fan_in |= in_degree.values().any(|&d| d >= 2);
            optional |= tasks.iter().any(|t| t["required"] == json!(false));
        }
        assert!(fan_in && optional);
        assert_eq!(
            recs.iter()
                .filter(|(k, _)| *k == RecordKind::Definition)
                .count(),
            4
        );
    }

    #[test]
    fn workload_covers_the_interesting_cases() {
        let recs = generate_labeled(&cfg(11, 400, 0.0, 0.0));
        let evs = events(&recs);
        let count = |f: &dyn Fn(&Value) -> bool| evs.iter().filter(|(_, v)| f(v)).count();
        let ty = |t: &'static str| move |v: &Value| v["eventType"] == t;
        assert!(count(&ty("TASK_FAILED")) > 0);
        assert!(
            count(&|v| v["eventType"] == "TASK_CREATED" && v["attempt"].as_u64() > Some(1)) > 0,
            "retries"
        );
        assert!(count(&|v| v["eventType"] == "TASK_CREATED" && v.get("dueAt").is_some()) > 0);
        assert!(
            count(&|v| v["taskDefId"] == "manual-review") > 0,
            "failure path"
        );
        assert!(count(&ty("ORDER_CANCELLED")) > 0);
        assert!(count(&|v| v["orderType"] == "LAB_TEST" && v["eventType"] == "ORDER_RESULTED") > 0);
        assert!(
            count(
                &|v| v["eventType"] == "ORDER_AUTHORIZED" && v["metadata"]["actorRole"] == "NURSE"
            ) > 0
        );
        assert!(count(&|v| v["metadata"]["critical"] == true) > 0);
        assert!(
            count(&|v| v["eventType"] == "ORDER_RESULTED" && v["orderStatus"] == "DISPENSED") > 0
        );
        assert!(count(&ty("WORKFLOW_COMPLETED")) > 0);
        assert!(count(&|v| v["templateId"] == "sepsis-bundle" && v["templateVersion"] == 2) > 0);

        // Some workflows are left mid-way: started, without every required task done.
        let started: HashSet<&str> = evs
            .iter()
            .filter(|(_, v)| v["eventType"] == "WORKFLOW_STARTED")
            .map(|(_, v)| str_of(v, "workflowInstanceId"))
            .collect();
        let completions_of = |wf: &str| {
            evs.iter()
                .filter(|(_, v)| {
                    v["workflowInstanceId"] == wf && v["eventType"] == "TASK_COMPLETED"
                })
                .count()
        };
        let unfinished = started.iter().filter(|wf| completions_of(wf) < 3).count();
        assert!(
            unfinished * 10 > started.len(),
            "{unfinished} of {} unfinished",
            started.len()
        );
    }

    #[test]
    fn blocking_orders_close_before_the_task_they_block_is_created() {
        let recs = generate_labeled(&cfg(13, 400, 0.0, 0.0));
        let evs = events(&recs);
        // Closing time of each LAB_TEST order per workflow (None while open).
        let mut labs: HashMap<&str, HashMap<&str, (String, Option<String>)>> = HashMap::new();
        for (_, v) in &evs {
            if v["orderType"] != "LAB_TEST" {
                continue;
            }
            let wf = str_of(v, "workflowInstanceId");
            let entry = labs
                .entry(wf)
                .or_default()
                .entry(str_of(v, "orderId"))
                .or_insert((str_of(v, "eventTime").to_owned(), None));
            if matches!(
                v["eventType"].as_str(),
                Some("ORDER_RESULTED" | "ORDER_CANCELLED")
            ) && entry.1.is_none()
            {
                entry.1 = Some(str_of(v, "eventTime").to_owned());
            }
        }
        let mut checked = 0;
        for (_, v) in &evs {
            let blocked_task = matches!(
                v["taskDefId"].as_str(),
                Some("antibiotics" | "cardiology-review")
            );
            if !(blocked_task && v["eventType"] == "TASK_CREATED" && v["attempt"] == 1) {
                continue;
            }
            let created = str_of(v, "eventTime");
            for (order_created, closed) in labs
                .get(str_of(v, "workflowInstanceId"))
                .into_iter()
                .flat_map(|m| m.values())
            {
                if order_created.as_str() <= created {
                    let closed = closed.as_deref().expect("a blocking order is closed");
                    assert!(
                        closed <= created,
                        "task created {created} while order open until {closed}"
                    );
                }
            }
            checked += 1;
        }
        assert!(checked > 50, "{checked}");
    }

    #[test]
    fn retries_stay_within_max_retries() {
        let recs = generate_labeled(&cfg(17, 300, 0.0, 0.0));
        let max_retries: HashMap<&str, u64> = [
            ("triage", 0),
            ("blood-cultures", 2),
            ("troponin-draw", 1),
            ("admission-orders", 1),
            ("insurance-check", 2),
        ]
        .into_iter()
        .collect();
        for (_, v) in events(&recs) {
            if let (Some(def), Some(attempt)) = (v["taskDefId"].as_str(), v["attempt"].as_u64()) {
                // sepsis v2 allows blood-cultures one retry; v3 two: the bound covers both.
                let bound = max_retries.get(def).copied().unwrap_or(0) + 1;
                assert!(attempt <= bound, "{def} attempt {attempt}");
            }
        }
    }

    #[test]
    fn formats_rfc3339_with_millis() {
        assert_eq!(rfc3339_ms(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339_ms(1_795_680_000_000), "2026-11-26T08:00:00.000Z");
        assert_eq!(rfc3339_ms(951_782_400_123), "2000-02-29T00:00:00.123Z");
        assert_eq!(rfc3339_ms(4_102_444_799_999), "2099-12-31T23:59:59.999Z");
    }
}
