//! System events (contract §6): component health, metric thresholds, error reports and the
//! audit log.
//!
//! One operator, keyed by component, applies each component's events in input order
//! (pipeline time, then input position), once the input frontier has passed their time.
//! The topic is keyed by component, so a component's events are one partition's, in offset
//! order: the same order in every run, however the records are batched or replayed after a
//! restart, and on any number of workers. Its state is one health entry per component:
//! memory is bounded by the number of components, not by the events.
//!
//! ```text
//!  system events ─exchange(component)─► SystemRules ─► component_health rows (−old, +new)
//!                                                     ├► audit_log / error_reports rows (append-only)
//!                                                     └► alerts: system-alerts record + alerts row
//! ```
//!
//! - **HEALTH_CHECK**: the latest check by eventTime is the component's current health; a
//!   check older than it changes nothing. A change to UNHEALTHY (from UP, DEGRADED, or no
//!   health known) raises a HIGH alert `COMPONENT_UNHEALTHY`.
//! - **PERFORMANCE_METRIC**: a value above its metric's threshold raises a MEDIUM alert
//!   `METRIC_THRESHOLD_EXCEEDED` (defaults: `kafka.consumer.lag` 1000,
//!   `event.processing.time.ms` 5000; a metric without a threshold raises none).
//! - **ERROR_REPORT**: CRITICAL and HIGH raise an alert `ERROR_REPORT` of that severity;
//!   MEDIUM and LOW raise none. Every report is appended to `error_reports`, where the sink
//!   counts MEDIUM and LOW per component into `component_health` and logs them.
//! - **AUDIT_EVENT**: appended to `audit_log`.
//!
//! Every alert's id is a UUID v5 of `hmis-flow:alert:<kind>:<eventId>`: the same event
//! always raises the same alert, so a duplicate (same eventId) or a replay changes nothing.

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};
use serde_json::json;

use differential_dataflow::{AsCollection, VecCollection};
use timely::container::CapacityContainerBuilder;
use timely::dataflow::channels::pact::Exchange;
use timely::dataflow::operators::generic::Operator;
use timely::dataflow::operators::Capability;

use crate::derived::v5;
use crate::events::{format_time, HealthStatus, Pos, Severity, SystemEvent, SystemKind};
use crate::output::{
    AlertRow, AuditRow, ComponentHealthRow, ErrorReportRow, Millis, OutRecord, OutTopic, Row,
};
use crate::Emit;

/// Parameters of the system-event rules.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SystemRules {
    /// metricName → threshold: a PERFORMANCE_METRIC whose value is above it raises a MEDIUM
    /// alert (contract defaults: `kafka.consumer.lag` 1000, `event.processing.time.ms` 5000).
    pub metric_thresholds: BTreeMap<String, serde_json::Number>,
    /// The system-events topic's name, for the rows' source columns (set by the runtime).
    #[serde(skip)]
    pub topic: String,
}

impl Default for SystemRules {
    fn default() -> Self {
        SystemRules {
            metric_thresholds: [
                ("kafka.consumer.lag".to_string(), 1000.into()),
                ("event.processing.time.ms".to_string(), 5000.into()),
            ]
            .into_iter()
            .collect(),
            topic: crate::events::InputTopic::System.default_name().to_string(),
        }
    }
}

/// A component's current health: the latest check by (eventTime, position).
#[derive(Clone, Debug)]
struct Health {
    status: HealthStatus,
    at: (Millis, Pos),
    since: Millis,
}

impl Health {
    fn row(&self, component: &str) -> Row {
        Row::ComponentHealth(ComponentHealthRow {
            component: component.to_string(),
            status: self.status.as_str().to_string(),
            last_check_at: self.at.0,
            status_since: self.since,
        })
    }
}

/// An alert raised by a system event, before the clock stamps it.
struct Alert<'a> {
    kind: &'static str,
    severity: Severity,
    message: String,
    event: &'a SystemEvent,
    details: serde_json::Value,
}

impl Alert<'_> {
    /// The `system-alerts` record and the `alerts` row, raised at pipeline clock `t`.
    fn emit(self, t: Millis, out: &mut Vec<(Emit, Millis, isize)>) {
        let e = self.event;
        let alert_id = v5(&format!("hmis-flow:alert:{}:{}", self.kind, e.event_id));
        let doc = json!({
            "alertId": alert_id,
            "severity": self.severity.as_str(),
            "source": e.component,
            "kind": self.kind,
            "message": self.message,
            "raisedAt": format_time(t),
            "causeEventId": e.event_id,
            "component": e.component,
            "details": self.details,
        });
        let record = OutRecord {
            topic: OutTopic::Alerts,
            event_id: alert_id.clone(),
            event_type: self.kind.to_string(),
            key: Some(e.component.clone()),
            payload: doc.to_string(),
        };
        let row = AlertRow {
            alert_id,
            severity: self.severity.as_str().to_string(),
            source: e.component.clone(),
            kind: self.kind.to_string(),
            message: self.message,
            raised_at: t,
            cause_event_id: Some(e.event_id.to_string()),
            component: Some(e.component.clone()),
            workflow_instance_id: None,
            task_instance_id: None,
            order_id: None,
            details: Some(self.details.to_string()),
        };
        // Published after the derived events of the same instant, in component order.
        out.push((
            Emit::record((e.component.as_str().into(), u8::MAX), record),
            t,
            1,
        ));
        out.push((Emit::row(Row::Alert(row)), t, 1));
    }
}

/// What one event changes, given its component's health; appends the emits at `t`.
fn apply(
    e: &SystemEvent,
    health: &mut Option<Health>,
    rules: &SystemRules,
    t: Millis,
    out: &mut Vec<(Emit, Millis, isize)>,
) {
    match &e.kind {
        SystemKind::HealthCheck { status } => {
            let at = (e.event_time, e.pos);
            if health.as_ref().is_some_and(|h| h.at >= at) {
                return; // older than the current health (or the same record again)
            }
            let previous = health.as_ref().map(|h| h.status);
            let since = match health.as_ref() {
                Some(h) if h.status == *status => h.since,
                _ => e.event_time,
            };
            if let Some(h) = health.as_ref() {
                out.push((Emit::row(h.row(&e.component)), t, -1));
            }
            let h = health.insert(Health {
                status: *status,
                at,
                since,
            });
            out.push((Emit::row(h.row(&e.component)), t, 1));
            if *status == HealthStatus::Unhealthy && previous != Some(HealthStatus::Unhealthy) {
                Alert {
                    kind: "COMPONENT_UNHEALTHY",
                    severity: Severity::High,
                    message: format!(
                        "component {} is UNHEALTHY (was {})",
                        e.component,
                        previous.map(|p| p.as_str()).unwrap_or("unknown")
                    ),
                    event: e,
                    details: json!({"previousStatus": previous.map(|p| p.as_str())}),
                }
                .emit(t, out);
            }
        }
        SystemKind::Metric {
            metric_name,
            value,
            unit,
        } => {
            let Some(threshold) = rules.metric_thresholds.get(metric_name) else {
                return;
            };
            let (Ok(v), Some(limit)) = (value.parse::<f64>(), threshold.as_f64()) else {
                return;
            };
            if v > limit {
                Alert {
                    kind: "METRIC_THRESHOLD_EXCEEDED",
                    severity: Severity::Medium,
                    message: format!(
                        "{metric_name} = {value} {unit} on {} is above its threshold {threshold}",
                        e.component
                    ),
                    event: e,
                    details: json!({"metricName": metric_name, "value": v, "unit": unit, "threshold": limit}),
                }
                .emit(t, out);
            }
        }
        SystemKind::ErrorReport { severity, message } => {
            out.push((
                Emit::row(Row::ErrorReport(ErrorReportRow {
                    event_id: e.event_id.to_string(),
                    component: e.component.clone(),
                    severity: severity.as_str().to_string(),
                    message: message.clone(),
                    event_time: e.event_time,
                    source_topic: rules.topic.clone(),
                    source_partition: e.pos.partition,
                    source_offset: e.pos.offset,
                })),
                t,
                1,
            ));
            if severity.raises_alert() {
                Alert {
                    kind: "ERROR_REPORT",
                    severity: *severity,
                    message: message.clone(),
                    event: e,
                    details: json!({"reportedSeverity": severity.as_str()}),
                }
                .emit(t, out);
            }
        }
        SystemKind::Audit {
            actor,
            action,
            entity_type,
            entity_id,
            details,
        } => out.push((
            Emit::row(Row::Audit(AuditRow {
                event_id: e.event_id.to_string(),
                component: e.component.clone(),
                actor: actor.clone(),
                action: action.clone(),
                entity_type: entity_type.clone(),
                entity_id: entity_id.clone(),
                details: details.clone(),
                event_time: e.event_time,
                source_topic: rules.topic.clone(),
                source_partition: e.pos.partition,
                source_offset: e.pos.offset,
            })),
            t,
            1,
        )),
    }
}

fn hash_str(s: &str) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    s.hash(&mut h);
    h.finish()
}

/// The system-event rules (see the module doc) over `events`; returns what to emit.
pub fn system_rules<'s>(
    events: VecCollection<'s, u64, SystemEvent>,
    rules: &SystemRules,
) -> VecCollection<'s, u64, Emit> {
    let rules = rules.clone();
    events
        .inner
        .unary_frontier::<CapacityContainerBuilder<Vec<(Emit, u64, isize)>>, _, _, _>(
            Exchange::new(|u: &(SystemEvent, u64, isize)| hash_str(&u.0.component)),
            "SystemRules",
            move |_cap, _info| {
                let mut health: HashMap<String, Health> = HashMap::new();
                let mut stash: BTreeMap<u64, (Capability<u64>, Vec<SystemEvent>)> = BTreeMap::new();
                move |(input, frontier), output| {
                    input.for_each(|cap, batch| {
                        for (e, t, r) in batch.drain(..) {
                            // System events are never retracted upstream.
                            if r > 0 {
                                stash
                                    .entry(t)
                                    .or_insert_with(|| (cap.delayed(&t, 0), Vec::new()))
                                    .1
                                    .push(e);
                            }
                        }
                    });
                    while let Some((&t, _)) = stash.first_key_value() {
                        if frontier.less_equal(&t) {
                            break;
                        }
                        let (_, (cap, mut events)) = stash.pop_first().expect("first");
                        events.sort_by_key(|e| e.pos);
                        let mut out = Vec::new();
                        for e in &events {
                            let mut h = health.remove(&e.component);
                            apply(e, &mut h, &rules, t, &mut out);
                            if let Some(h) = h {
                                health.insert(e.component.clone(), h);
                            }
                        }
                        output.session(&cap).give_iterator(out.into_iter());
                    }
                }
            },
        )
        .as_collection()
}
