//! A seeded generator of input histories for the reference comparison.
//!
//! A history is what the input topics hold: templates (several versions, a re-published
//! version, a tombstone), 5–30 workflow instances run by a simulated upstream engine that
//! mostly follows the templates (with random progress, failures, retries, failure tasks,
//! stray events), orders with random and sometimes invalid transitions and roles, and
//! sometimes upstream WORKFLOW_COMPLETED / FAILED / ESCALATED. Records are placed in their
//! topic's partition (by key) in eventTime order, as the contract's event mode assumes;
//! some records are duplicated (same eventId: same content, or — rarely — different content
//! at a later offset, which must change nothing).
//!
//! EventTimes are unique across the history except for deliberate ties between events of
//! one order (the offset decides), so every instant of the reference is well defined.
//! No template has slaMinutes and no task has dueAt, and a workflow lasts well under the
//! stale/re-escalation periods: timers stay out of the comparison.
//!
//! [`generate_timed`] makes the same kind of history with timers in it: some task definitions
//! have slaMinutes (and an escalateTo), some TASK_CREATED a dueAt, and some steps of a
//! workflow or an order are 1–3 h apart, so that SLA breaches (by the clock and by late
//! events), stale tasks, unanswered re-escalations (levels 2 and 3, also of workflows that
//! complete afterwards) and overdue orders happen. The model does not model timers: these
//! histories are for the checks that do not need it. With the same seed, `generate` makes
//! the same history whether or not `generate_timed` exists (timed draws only when timed).

use std::collections::{BTreeMap, BTreeSet};

use hmis_dataflows::events::{decode, Event, InputTopic, Pos};
use hmis_dataflows::output::Millis;
use rand::rngs::SmallRng;
use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

/// 2026-11-26T10:00:00Z in ms: definitions are stamped here, every event is later.
pub const T0: Millis = 1_795_687_200_000;
const SEC: Millis = 1000;
const MIN: Millis = 60 * SEC;

const ORDER_TYPES: [&str; 5] = ["LAB_TEST", "IMAGING", "MEDICATION", "SURGERY", "CONSULT"];
const ROLES: [&str; 5] = [
    "PHYSICIAN",
    "NURSE_PRACTITIONER",
    "SURGEON",
    "NURSE",
    "PHARMACIST",
];

/// One stored input record.
#[derive(Clone, Debug)]
pub struct Record {
    pub value: Option<Value>,
    /// eventTime; `None` for definitions.
    pub time: Option<Millis>,
    /// Decoded, with its partition and offset.
    pub event: Event,
}

/// A generated history: every record, and the partitions in offset order.
pub struct History {
    pub records: Vec<Record>,
    /// (topic, partition) → indices into `records`, in offset order.
    pub partitions: BTreeMap<(InputTopic, i32), Vec<usize>>,
}

impl History {
    pub fn events(&self) -> Vec<Event> {
        self.records.iter().map(|r| r.event.clone()).collect()
    }
}

#[derive(Clone, Debug)]
struct Def {
    id: String,
    required: bool,
    next: Option<String>,
    max_retries: u32,
    failure: Option<String>,
    blocking: Vec<&'static str>,
    automatic: bool,
    sla_minutes: Option<u32>,
    escalate_to: Option<&'static str>,
}

impl Def {
    fn new(id: &str) -> Def {
        Def {
            id: id.into(),
            required: true,
            next: None,
            max_retries: 0,
            failure: None,
            blocking: vec![],
            automatic: false,
            sla_minutes: None,
            escalate_to: None,
        }
    }
    fn next(mut self, n: &str) -> Def {
        self.next = Some(n.into());
        self
    }
    fn optional(mut self) -> Def {
        self.required = false;
        self
    }
    fn retries(mut self, n: u32) -> Def {
        self.max_retries = n;
        self
    }
    fn on_failure(mut self, f: &str) -> Def {
        self.failure = Some(f.into());
        self
    }
    fn blocking(mut self, b: &[&'static str]) -> Def {
        self.blocking = b.to_vec();
        self
    }
}

#[derive(Clone, Debug)]
struct Tpl {
    id: String,
    version: i64,
    defs: Vec<Def>,
}

impl Tpl {
    fn doc(&self) -> Value {
        let tasks: Vec<Value> = self
            .defs
            .iter()
            .map(|d| {
                let mut v = json!({"taskDefId": d.id, "name": format!("Task {}", d.id)});
                // Leave defaults implicit sometimes, explicit other times.
                if !d.required {
                    v["required"] = json!(false);
                }
                if let Some(n) = &d.next {
                    v["nextTaskId"] = json!(n);
                }
                if d.max_retries > 0 {
                    v["maxRetries"] = json!(d.max_retries);
                }
                if let Some(f) = &d.failure {
                    v["failureTaskId"] = json!(f);
                }
                if !d.blocking.is_empty() {
                    v["blockingOrderTypes"] = json!(d.blocking);
                }
                if d.automatic {
                    v["automatic"] = json!(true);
                }
                if let Some(m) = d.sla_minutes {
                    v["slaMinutes"] = json!(m);
                }
                if let Some(e) = d.escalate_to {
                    v["escalateTo"] = json!(e);
                }
                v
            })
            .collect();
        json!({"templateId": self.id, "version": self.version, "templateName": format!("{} v{}", self.id, self.version), "tasks": tasks})
    }
    fn def(&self, id: &str) -> &Def {
        self.defs.iter().find(|d| d.id == id).unwrap()
    }
    fn is_failure_target(&self, id: &str) -> bool {
        self.defs.iter().any(|d| d.failure.as_deref() == Some(id))
    }
    fn preds(&self, id: &str) -> Vec<&Def> {
        self.defs
            .iter()
            .filter(|d| d.next.as_deref() == Some(id))
            .collect()
    }
}

fn fixed_templates() -> Vec<Tpl> {
    let sepsis = |version: i64, cultures_retries: u32, antibiotics_blocking: &[&'static str]| Tpl {
        id: "sepsis".into(),
        version,
        defs: vec![
            Def::new("triage").next("cultures"),
            Def::new("cultures")
                .next("antibiotics")
                .retries(cultures_retries)
                .on_failure("review"),
            Def::new("antibiotics").blocking(antibiotics_blocking),
            Def::new("review").optional(),
        ],
    };
    vec![
        sepsis(1, 2, &["LAB_TEST"]),
        sepsis(2, 1, &["LAB_TEST", "MEDICATION"]),
        // Parallel branches: a side task that can fail after the main chain completed.
        Tpl {
            id: "parallel".into(),
            version: 1,
            defs: vec![
                Def::new("m1").next("m2"),
                Def::new("m2").blocking(&["MEDICATION"]),
                Def::new("side").optional(),
                Def::new("x").retries(1).on_failure("fx"),
                Def::new("fx").optional().retries(1),
            ],
        },
        // Fan-in: c waits for a and b.
        Tpl {
            id: "fanin".into(),
            version: 1,
            defs: vec![
                Def::new("a").next("c"),
                Def::new("b").optional().next("c").blocking(&["SURGERY"]),
                Def::new("c").next("d").blocking(&["LAB_TEST", "IMAGING"]),
                Def::new("d").retries(1).on_failure("e"),
                Def::new("e").optional(),
            ],
        },
        // Nothing required: 100% at start.
        Tpl {
            id: "allopt".into(),
            version: 1,
            defs: vec![Def::new("a").optional().next("b"), Def::new("b").optional()],
        },
    ]
}

/// A random valid template: main nodes whose nextTaskId points forward (no cycle, fan-in
/// allowed) and failure nodes that nothing points to with nextTaskId.
fn random_template(rng: &mut SmallRng, id: &str, version: i64) -> Tpl {
    let n = rng.random_range(2..=6usize);
    let k = rng.random_range(0..=2usize);
    let mut defs: Vec<Def> = Vec::new();
    for i in 0..n {
        let mut d = Def::new(&format!("n{i}"));
        if i + 1 < n && rng.random_bool(0.7) {
            d.next = Some(format!("n{}", rng.random_range(i + 1..n)));
        }
        if k > 0 && rng.random_bool(0.35) {
            d.failure = Some(format!("f{}", rng.random_range(0..k)));
        }
        d.required = rng.random_bool(0.8);
        d.max_retries = *[0, 0, 1, 2].choose(rng).unwrap();
        d.blocking = ORDER_TYPES
            .iter()
            .copied()
            .filter(|_| rng.random_bool(0.15))
            .collect();
        d.automatic = rng.random_bool(0.2);
        defs.push(d);
    }
    for j in 0..k {
        let mut d = Def::new(&format!("f{j}"));
        d.required = rng.random_bool(0.3);
        d.max_retries = *[0, 1].choose(rng).unwrap();
        if j == 0 && k == 2 && rng.random_bool(0.3) {
            d.failure = Some("f1".into());
        }
        d.blocking = ORDER_TYPES
            .iter()
            .copied()
            .filter(|_| rng.random_bool(0.1))
            .collect();
        defs.push(d);
    }
    Tpl {
        id: id.into(),
        version,
        defs,
    }
}

struct Gen {
    rng: SmallRng,
    used: BTreeSet<Millis>,
    /// (topic, key, value, time, generation sequence) before placement.
    raw: Vec<(
        InputTopic,
        Option<String>,
        Option<Value>,
        Option<Millis>,
        u64,
    )>,
    seq: u64,
    next_id: u64,
    /// Timers in the history ([`generate_timed`]).
    timed: bool,
}

impl Gen {
    /// The first unused instant at or after `t`.
    fn fresh(&mut self, mut t: Millis) -> Millis {
        while !self.used.insert(t) {
            t += 1;
        }
        t
    }
    fn advance(&mut self, t: Millis, lo: Millis, hi: Millis) -> Millis {
        let dt = self.rng.random_range(lo..hi) + self.rng.random_range(0..1000);
        self.fresh(t + dt)
    }
    /// As [`Gen::advance`]; in a timed history, now and then 1–3 h later instead.
    fn step(&mut self, t: Millis, lo: Millis, hi: Millis, p_gap: f64) -> Millis {
        if self.timed && self.chance(p_gap) {
            self.advance(t, 60 * MIN, 180 * MIN)
        } else {
            self.advance(t, lo, hi)
        }
    }
    fn id(&mut self, prefix: &str) -> String {
        self.next_id += 1;
        format!("{prefix}-{}", self.next_id)
    }
    fn push(
        &mut self,
        topic: InputTopic,
        key: Option<String>,
        value: Option<Value>,
        time: Option<Millis>,
    ) {
        self.seq += 1;
        self.raw.push((topic, key, value, time, self.seq));
    }
    fn chance(&mut self, p: f64) -> bool {
        self.rng.random_bool(p)
    }
    fn definition(&mut self, t: &Tpl) {
        self.push(
            InputTopic::Definitions,
            Some(format!("{}:{}", t.id, t.version)),
            Some(t.doc()),
            None,
        );
    }
    fn task(&mut self, ty: &str, tid: &str, wid: &str, def: &str, attempt: u32, at: Millis) {
        let id = self.id("te");
        let mut v = json!({"eventId": id, "eventType": ty, "eventTime": iso(at), "taskInstanceId": tid,
            "workflowInstanceId": wid, "patientId": format!("p-{wid}"), "taskDefId": def});
        // attempt 1 is the default: leave it out half of the time.
        if attempt != 1 || self.chance(0.5) {
            v["attempt"] = json!(attempt);
        }
        if ty == "TASK_FAILED" {
            v["errorMessage"] = json!("failed");
        }
        if self.timed && ty == "TASK_CREATED" && self.chance(0.2) {
            let due = at + self.rng.random_range(2..=45) * MIN;
            v["dueAt"] = json!(iso(due));
        }
        self.push(InputTopic::Tasks, Some(tid.into()), Some(v), Some(at));
    }
    fn workflow(&mut self, ty: &str, wid: &str, at: Millis, tpl: Option<(&str, i64)>) {
        let id = self.id("we");
        let mut v = json!({"eventId": id, "eventType": ty, "eventTime": iso(at), "workflowInstanceId": wid,
            "patientId": format!("p-{wid}")});
        if let Some((t, ver)) = tpl {
            v["templateId"] = json!(t);
            v["templateVersion"] = json!(ver);
        }
        if ty == "WORKFLOW_ESCALATED" {
            v["escalationReason"] = json!("upstream");
        }
        self.push(InputTopic::Workflows, Some(wid.into()), Some(v), Some(at));
    }
    fn order(
        &mut self,
        kind: &str,
        status: &str,
        oid: &str,
        wid: &str,
        ty: &str,
        at: Millis,
        role: Option<&str>,
    ) {
        let id = self.id("oe");
        let mut md = json!({"cost": 10});
        if let Some(r) = role {
            md["actorRole"] = json!(r);
        }
        if kind == "ORDER_COMPENSATION_COMPLETED" {
            md["actionId"] = json!(format!("act-{oid}"));
        }
        let mut v = json!({"eventId": id, "eventType": kind, "eventTime": iso(at), "orderId": oid,
            "workflowInstanceId": wid, "patientId": format!("p-{wid}"), "orderType": ty, "actor": "someone",
            "metadata": md});
        if kind != "ORDER_COMPENSATION_COMPLETED" {
            v["orderStatus"] = json!(status);
        }
        self.push(InputTopic::Orders, Some(oid.into()), Some(v), Some(at));
    }
}

pub fn iso(ms: Millis) -> String {
    hmis_dataflows::events::format_time(ms)
}

fn eligible_role(ty: &str) -> &'static str {
    match ty {
        "SURGERY" => "SURGEON",
        "LAB_TEST" | "IMAGING" => ["PHYSICIAN", "NURSE_PRACTITIONER"][(ty.len()) % 2],
        _ => "PHYSICIAN",
    }
}

enum Fate {
    Completed,
    FailedForGood,
    Left,
}

/// Simulates one workflow instance of `tpl` starting at `start`; returns the last instant used.
fn simulate(g: &mut Gen, wid: &str, tpl: &Tpl, pinned: (String, i64), start: Millis) -> Millis {
    let started = !g.chance(0.03);
    if started {
        g.workflow("WORKFLOW_STARTED", wid, start, Some((&pinned.0, pinned.1)));
    }
    let mut t = start;
    let mut completed: BTreeSet<String> = BTreeSet::new();
    let mut touched: BTreeSet<String> = BTreeSet::new();
    let mut triggered: Vec<String> = Vec::new();
    let steps = g.rng.random_range(0..=tpl.defs.len() + 2);
    for _ in 0..steps {
        let candidates: Vec<String> = tpl
            .defs
            .iter()
            .filter(|d| !touched.contains(&d.id))
            .filter(|d| {
                if tpl.is_failure_target(&d.id) {
                    triggered.contains(&d.id)
                } else {
                    tpl.preds(&d.id).iter().all(|p| completed.contains(&p.id))
                }
            })
            .map(|d| d.id.clone())
            .collect();
        // Now and then upstream runs something that is not ready (or runs a task twice).
        let pick = if g.chance(0.06) || candidates.is_empty() {
            if candidates.is_empty() && !g.chance(0.2) {
                break;
            }
            tpl.defs.choose(&mut g.rng).unwrap().id.clone()
        } else {
            candidates.choose(&mut g.rng).unwrap().clone()
        };
        let d = tpl.def(&pick).clone();
        let n = touched.iter().filter(|x| **x == d.id).count();
        touched.insert(d.id.clone());
        let tid = format!(
            "{wid}.{}.{n}{}",
            d.id,
            if g.chance(0.05) { "b" } else { "" }
        );
        let mut attempt = 1;
        let fate = loop {
            if g.chance(0.92) {
                t = g.step(t, 2 * SEC, 90 * SEC, 0.05);
                g.task("TASK_CREATED", &tid, wid, &d.id, attempt, t);
            }
            if g.chance(0.85) {
                t = g.step(t, 2 * SEC, 90 * SEC, 0.12);
                g.task("TASK_STARTED", &tid, wid, &d.id, attempt, t);
            }
            let r = g.rng.random_range(0..100);
            if r < 7 {
                break Fate::Left;
            }
            t = g.step(t, 2 * SEC, 120 * SEC, 0.12);
            if r < 72 {
                g.task("TASK_COMPLETED", &tid, wid, &d.id, attempt, t);
                break Fate::Completed;
            }
            g.task("TASK_FAILED", &tid, wid, &d.id, attempt, t);
            if attempt <= d.max_retries {
                if g.chance(0.85) {
                    attempt += 1;
                    continue;
                }
                break Fate::Left;
            }
            break Fate::FailedForGood;
        };
        match fate {
            Fate::Completed => {
                completed.insert(d.id.clone());
            }
            Fate::FailedForGood => match &d.failure {
                Some(f) => triggered.push(f.clone()),
                None if g.chance(0.75) => break,
                None => {}
            },
            Fate::Left => {}
        }
    }
    if g.chance(0.05) {
        // A task of a definition the template does not have.
        t = g.advance(t, 2 * SEC, 60 * SEC);
        g.task("TASK_CREATED", &format!("{wid}.ghost"), wid, "ghost", 1, t);
    }
    let end = t;

    // Orders, spread over the workflow's life and a little beyond.
    let blocking: Vec<&'static str> = tpl
        .defs
        .iter()
        .flat_map(|d| d.blocking.iter().copied())
        .collect();
    for k in 0..g.rng.random_range(0..=3) {
        let oid = format!("{wid}.o{k}");
        let ty = if !blocking.is_empty() && g.chance(0.75) {
            *blocking.choose(&mut g.rng).unwrap()
        } else {
            *ORDER_TYPES.choose(&mut g.rng).unwrap()
        };
        let resulted = *["RESULTED", "DISPENSED", "COMPLETED"]
            .choose(&mut g.rng)
            .unwrap();
        let mut path: Vec<(&str, &str)> = vec![
            ("ORDER_CREATED", "PROPOSED"),
            ("ORDER_AUTHORIZED", "AUTHORIZED"),
            ("ORDER_ACTIVATED", "ACTIVATED"),
            ("ORDER_STARTED", "IN_PROGRESS"),
            ("ORDER_RESULTED", resulted),
            ("ORDER_VERIFIED", "VERIFIED"),
            ("ORDER_CLOSED", "CLOSED"),
        ];
        if g.chance(0.5) {
            path.remove(3);
        }
        let len = g.rng.random_range(1..=path.len());
        path.truncate(len);
        if g.chance(0.25) {
            let at = g.rng.random_range(0..=path.len());
            path.insert(at, ("ORDER_CANCELLED", "CANCELLED"));
            if g.chance(0.4) {
                path.push(("ORDER_COMPENSATION_COMPLETED", ""));
            }
        }
        if g.chance(0.15) {
            let all = [
                ("ORDER_CREATED", "PROPOSED"),
                ("ORDER_AUTHORIZED", "AUTHORIZED"),
                ("ORDER_ACTIVATED", "ACTIVATED"),
                ("ORDER_STARTED", "IN_PROGRESS"),
                ("ORDER_RESULTED", "COMPLETED"),
                ("ORDER_VERIFIED", "VERIFIED"),
                ("ORDER_CLOSED", "CLOSED"),
                ("ORDER_CANCELLED", "CANCELLED"),
                ("ORDER_COMPENSATION_COMPLETED", ""),
            ];
            let at = g.rng.random_range(0..=path.len());
            path.insert(at, *all.choose(&mut g.rng).unwrap());
        }
        let span = end.saturating_sub(start) + 5 * MIN;
        let off = g.rng.random_range(0..span);
        let mut ot = g.fresh(start + off);
        let mut first = true;
        let mut steps: Vec<(&str, &str, Option<&str>)> = Vec::new();
        for (kind, status) in path {
            if kind == "ORDER_AUTHORIZED" {
                if g.chance(0.75) {
                    steps.push((kind, status, Some(eligible_role(ty))));
                } else {
                    let role = if g.chance(0.2) {
                        None
                    } else {
                        Some(*ROLES.choose(&mut g.rng).unwrap())
                    };
                    steps.push((kind, status, role));
                    if g.chance(0.5) {
                        steps.push((kind, status, Some(eligible_role(ty))));
                    }
                }
            } else {
                steps.push((kind, status, None));
            }
        }
        for (kind, status, role) in steps {
            if !first {
                // Sometimes two events of one order share an eventTime: the offset decides.
                if !g.chance(0.1) {
                    ot = g.step(ot, 5 * SEC, 5 * MIN, 0.15);
                }
            }
            first = false;
            g.order(kind, status, &oid, wid, ty, ot, role);
        }
    }

    // Upstream terminal and escalation events.
    if g.chance(0.1) {
        let off = g.rng.random_range(1..=end - start + MIN);
        let at = g.fresh(start + off);
        g.workflow("WORKFLOW_ESCALATED", wid, at, None);
    }
    if g.chance(0.07) {
        let off = g.rng.random_range(1..=end - start + MIN);
        let at = g.fresh(start + off);
        g.workflow("WORKFLOW_FAILED", wid, at, None);
    }
    if g.chance(0.15) {
        let at = g.advance(end, SEC, 5 * MIN);
        g.workflow("WORKFLOW_COMPLETED", wid, at, None);
    }
    end
}

fn hash(s: &str) -> u64 {
    // FNV-1a: a stable stand-in for Kafka's key partitioner.
    s.bytes().fold(0xcbf29ce484222325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100000001b3)
    })
}

fn partitions(topic: InputTopic) -> u64 {
    match topic {
        InputTopic::Definitions => 1,
        InputTopic::Tasks | InputTopic::Orders => 10,
        InputTopic::Workflows | InputTopic::System => 5,
    }
}

/// Generates the history of `seed`.
pub fn generate(seed: u64) -> History {
    generate_with(seed, false)
}

/// Generates a history of `seed` with timers in it (see the module doc).
pub fn generate_timed(seed: u64) -> History {
    generate_with(seed, true)
}

fn generate_with(seed: u64, timed: bool) -> History {
    let mut g = Gen {
        rng: SmallRng::seed_from_u64(seed),
        used: BTreeSet::new(),
        raw: Vec::new(),
        seq: 0,
        next_id: 0,
        timed,
    };
    g.used.insert(T0);
    let mut templates = fixed_templates();
    let r0v1 = random_template(&mut g.rng, "rnd0", 1);
    let r0v2 = random_template(&mut g.rng, "rnd0", 2);
    let r1v1 = random_template(&mut g.rng, "rnd1", 1);
    templates.extend([r0v1, r0v2, r1v1]);
    if timed {
        for d in templates.iter_mut().flat_map(|t| t.defs.iter_mut()) {
            if g.rng.random_bool(0.5) {
                d.sla_minutes = Some(g.rng.random_range(5..=40));
                d.escalate_to = [None, Some("CHARGE_NURSE"), Some("ATTENDING")]
                    .choose(&mut g.rng)
                    .copied()
                    .flatten();
            }
        }
    }

    // Definitions: a draft of sepsis v1 replaced by the final one; sepsis v3 published then deleted.
    let mut draft = templates[0].clone();
    draft.defs[0].next = None;
    g.definition(&draft);
    for t in &templates {
        g.definition(t);
    }
    let doomed = Tpl {
        id: "sepsis".into(),
        version: 3,
        defs: vec![Def::new("only")],
    };
    g.definition(&doomed);
    g.push(InputTopic::Definitions, Some("sepsis:3".into()), None, None);

    let n = g.rng.random_range(5..=30);
    for i in 0..n {
        let wid = format!("w{i:02}");
        let tpl = templates.choose(&mut g.rng).unwrap().clone();
        let pinned = match g.rng.random_range(0..100) {
            0..=2 => ("sepsis".to_string(), 3),
            3..=4 => ("nosuch".to_string(), 1),
            _ => (tpl.id.clone(), tpl.version),
        };
        let off = g.rng.random_range(0..20 * MIN);
        let start = g.fresh(T0 + MIN + off);
        simulate(&mut g, &wid, &tpl, pinned, start);
    }

    // Duplicates: the same record again right after it, or (rarely) another record with the
    // same eventId at a later eventTime (and so a later offset).
    let originals = g.raw.clone();
    for (topic, key, value, time, seq) in originals {
        let (Some(v), Some(t)) = (value, time) else {
            continue;
        };
        if g.chance(0.05) {
            g.raw
                .push((topic, key.clone(), Some(v.clone()), Some(t), seq));
        }
        if topic != InputTopic::Workflows && g.chance(0.015) {
            let mut other = v.clone();
            let at = g.advance(t, SEC, 2 * MIN);
            other["eventTime"] = json!(iso(at));
            if topic == InputTopic::Tasks {
                let ty = if v["eventType"] == "TASK_COMPLETED" {
                    "TASK_FAILED"
                } else {
                    "TASK_COMPLETED"
                };
                other["eventType"] = json!(ty);
            } else {
                other["eventType"] = json!("ORDER_CANCELLED");
                other["orderStatus"] = json!("CANCELLED");
            }
            g.seq += 1;
            g.raw.push((topic, key, Some(other), Some(at), g.seq));
        }
    }

    // Placement: per partition, in (eventTime, generation) order; offsets from 0.
    let mut by_part: BTreeMap<(InputTopic, i32), Vec<usize>> = BTreeMap::new();
    for (i, (topic, key, ..)) in g.raw.iter().enumerate() {
        let p = (hash(key.as_deref().unwrap_or("")) % partitions(*topic)) as i32;
        by_part.entry((*topic, p)).or_default().push(i);
    }
    let mut records = Vec::with_capacity(g.raw.len());
    let mut partitions_out = BTreeMap::new();
    for ((topic, p), mut idx) in by_part {
        idx.sort_by_key(|&i| (g.raw[i].3.unwrap_or(0), g.raw[i].4, i));
        let mut list = Vec::new();
        for (offset, i) in idx.into_iter().enumerate() {
            let (_, key, value, time, _) = &g.raw[i];
            let pos = Pos {
                partition: p,
                offset: offset as i64,
            };
            let bytes = value.as_ref().map(|v| v.to_string().into_bytes());
            let event = decode(
                topic,
                key.as_deref().map(str::as_bytes),
                bytes.as_deref(),
                pos,
            )
            .unwrap_or_else(|r| panic!("generated record rejected: {r:?}: {value:?}"));
            list.push(records.len());
            records.push(Record {
                value: value.clone(),
                time: *time,
                event,
            });
        }
        partitions_out.insert((topic, p), list);
    }
    History {
        records,
        partitions: partitions_out,
    }
}
