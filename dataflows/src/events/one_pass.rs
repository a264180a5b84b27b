//! The one-pass decoder: one serde_json pass over the text into borrowed fields, no DOM.
//!
//! ```text
//!  text ──serde_json (one pass)──► Fields<'text>      every string checked as it is read
//!          keys matched per topic   (Cow<str>: borrowed  (NUL, MAX_STRING_BYTES); metadata's
//!                                    unless escaped)     compact size counted on the way
//!                                        │
//!                                        ▼
//!                 check_head, task_event / workflow_event / order_event / system_event
//!                 (the functions the reference path builds its events with)
//! ```
//!
//! It only ever says *yes*: [`decode`] returns `None` whenever the record is not one it can
//! prove the reference path ([`super::decode_reference`]) accepts, and the caller then runs
//! that path, whose rejection texts are the contract's. So the rules here are one-sided:
//! - any parse or type error → `None` (serde_json is the same parser on both paths, with the
//!   same recursion limit, so what parses here parses there);
//! - a field the reference path reads, given twice → `None` (its DOM keeps the last one);
//! - a string anywhere (object keys included) with a NUL or over `MAX_STRING_BYTES` →
//!   `None`; strings the DOM drops (earlier duplicates of unknown fields) are checked too,
//!   which only sends more records to the reference path;
//! - `metadata`'s compact-JSON size is counted with duplicate keys included (the DOM keeps
//!   one of each), an upper bound of what the reference path measures: over the limit → `None`;
//! - `details` is rare: it is read into a `Value`, exactly the DOM's subtree, and checked
//!   with the reference path's own functions;
//! - every check the event builders make (ids, times, statuses, attempt) is theirs: an `Err`
//!   from them → `None`.
//!
//! The parity test (`tests/decode_parity.rs`) and the fuzz target compare both paths on
//! generated workloads, the fuzz corpus, hostile shapes and seeded mutations.

use std::borrow::Cow;
use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Number, Value};

use super::{
    check_head, check_metadata_size, check_strings, limits, order_event, system_event, task_event,
    workflow_event, Event, Head, InputTopic, Pos, RawOrder, RawOrderMetadata, RawTask, RawWorkflow,
    SystemField, SystemFields,
};

/// One record of `topic`, if it is well formed and accepted; `None`: ask the reference path.
pub(super) fn decode(topic: InputTopic, key: Option<&[u8]>, text: &str, pos: Pos) -> Option<Event> {
    let mut de = serde_json::Deserializer::from_str(text);
    let fields = de.deserialize_any(Record { topic }).ok()?;
    de.end().ok()?;
    fields.build(topic, key, text, pos)
}

/// A field given once holds `Some(value)`; `Some(None)` is an explicit `null`.
type Slot<T> = Option<Option<T>>;

/// Stores `v` in `slot`, or fails if the field came before (the DOM would keep the last).
fn put<T, E: de::Error>(slot: &mut Option<T>, v: T) -> Result<(), E> {
    if slot.is_some() {
        return Err(E::custom("field given twice"));
    }
    *slot = Some(v);
    Ok(())
}

/// The system-topic fields `system_event` may read.
const SYSTEM_FIELDS: [&str; 11] = [
    "component",
    "status",
    "metricName",
    "value",
    "unit",
    "severity",
    "message",
    "actor",
    "action",
    "entityType",
    "entityId",
];

/// A system-topic field as read.
enum Sys<'a> {
    Text(Cow<'a, str>),
    Number(Number),
    Other,
}

/// What one pass read: every field any topic's builder takes, as [`Slot`]s. The topic
/// shapes hold the string fields (`RawTask<Option<…>>`: its fields are slots); their
/// non-string fields (`attempt`, `templateVersion`, `metadata`) have slots of their own here
/// and stay unused inside the shapes.
#[derive(Default)]
struct Fields<'a> {
    event_id: Slot<Cow<'a, str>>,
    event_type: Slot<Cow<'a, str>>,
    event_time: Slot<Cow<'a, str>>,
    /// Present at all (checked as the reference path does: an object or null, size bounded).
    metadata: Option<()>,
    details: Option<Value>,
    task: RawTask<Option<Cow<'a, str>>>,
    attempt: Slot<u32>,
    workflow: RawWorkflow<Option<Cow<'a, str>>>,
    template_version: Slot<i64>,
    order: RawOrder<Option<Cow<'a, str>>>,
    order_metadata: Slot<RawOrderMetadata<Cow<'a, str>>>,
    system: [Option<Sys<'a>>; SYSTEM_FIELDS.len()],
}

fn flat<T>(slot: Option<Option<T>>) -> Option<T> {
    slot.flatten()
}

impl<'a> Fields<'a> {
    fn build(self, topic: InputTopic, key: Option<&[u8]>, text: &str, pos: Pos) -> Option<Event> {
        let event_type = flat(self.event_type)?;
        let et: &str = &event_type;
        if let Some(details) = &self.details {
            check_strings(details).ok()?;
            check_metadata_size(details, "details", et).ok()?;
        }
        let (event_id, event_time) =
            check_head(topic, et, flat(self.event_id), flat(self.event_time)).ok()?;
        let head = Head {
            et,
            event_id,
            event_time,
            pos,
            key,
            text,
        };
        let built = match topic {
            InputTopic::Tasks => {
                let t = self.task;
                task_event(
                    head,
                    RawTask {
                        task_instance_id: flat(t.task_instance_id),
                        workflow_instance_id: flat(t.workflow_instance_id),
                        patient_id: flat(t.patient_id),
                        task_def_id: flat(t.task_def_id),
                        task_name: flat(t.task_name),
                        status: flat(t.status),
                        attempt: flat(self.attempt),
                        error_message: flat(t.error_message),
                        due_at: flat(t.due_at),
                    },
                )
            }
            InputTopic::Workflows => {
                let w = self.workflow;
                workflow_event(
                    head,
                    RawWorkflow {
                        workflow_instance_id: flat(w.workflow_instance_id),
                        patient_id: flat(w.patient_id),
                        template_id: flat(w.template_id),
                        template_version: flat(self.template_version),
                        workflow_template_name: flat(w.workflow_template_name),
                        escalation_reason: flat(w.escalation_reason),
                    },
                )
            }
            InputTopic::Orders => {
                let o = self.order;
                order_event(
                    head,
                    RawOrder {
                        order_id: flat(o.order_id),
                        workflow_instance_id: flat(o.workflow_instance_id),
                        patient_id: flat(o.patient_id),
                        order_type: flat(o.order_type),
                        order_status: flat(o.order_status),
                        actor: flat(o.actor),
                        metadata: flat(self.order_metadata),
                    },
                )
            }
            InputTopic::System => system_event(
                head,
                &SystemRead {
                    fields: &self.system,
                    details: self.details.as_ref(),
                },
            ),
            InputTopic::Definitions => return None,
        };
        built.ok()
    }
}

struct SystemRead<'f, 'a> {
    fields: &'f [Option<Sys<'a>>; SYSTEM_FIELDS.len()],
    details: Option<&'f Value>,
}

impl SystemFields for SystemRead<'_, '_> {
    fn field(&self, name: &str) -> Option<SystemField<'_>> {
        let i = SYSTEM_FIELDS.iter().position(|f| *f == name)?;
        self.fields[i].as_ref().map(|v| match v {
            Sys::Text(s) => SystemField::Text(s),
            Sys::Number(n) => SystemField::Number(n),
            Sys::Other => SystemField::Other,
        })
    }
    fn details_json(&self) -> Option<String> {
        self.details.filter(|d| !d.is_null()).map(Value::to_string)
    }
}

// ------------------------------------------------------------------------------ strings ----

/// The reference path's `check_strings` for one string, as a yes or no.
fn check_text<E: de::Error>(s: &str) -> Result<(), E> {
    if s.len() > limits::MAX_STRING_BYTES || s.as_bytes().contains(&0) {
        return Err(E::custom("string over the limits"));
    }
    Ok(())
}

/// Bytes of `s` as serde_json writes it: quotes, and its escapes (`\"`, `\\`, the short
/// forms of \b \t \n \f \r, `\u00XX` for the other control characters).
fn string_size(s: &str) -> usize {
    2 + s
        .bytes()
        .map(|b| match b {
            b'"' | b'\\' | 0x08 | 0x09 | 0x0a | 0x0c | 0x0d => 2,
            0..=0x1f => 6,
            _ => 1,
        })
        .sum::<usize>()
}

/// Bytes of a number as serde_json writes it (its `Display`).
fn number_size(n: &Number) -> usize {
    struct Count(usize);
    impl fmt::Write for Count {
        fn write_str(&mut self, s: &str) -> fmt::Result {
            self.0 += s.len();
            Ok(())
        }
    }
    let mut c = Count(0);
    let _ = fmt::write(&mut c, format_args!("{n}"));
    c.0
}

/// A string, borrowed from the text unless it had escapes; checked.
struct Str;

impl<'de> Visitor<'de> for Str {
    type Value = Cow<'de, str>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a string")
    }
    fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
        check_text(v)?;
        Ok(Cow::Borrowed(v))
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        check_text(v)?;
        Ok(Cow::Owned(v.to_owned()))
    }
}

impl<'de> DeserializeSeed<'de> for Str {
    type Value = Cow<'de, str>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(self)
    }
}

/// A value of one expected shape, or `null` (`None`), as `Option<T>` reads it from the DOM.
struct OrNull<V>(V);

impl<'de, V: Visitor<'de>> Visitor<'de> for OrNull<V> {
    type Value = Option<V::Value>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        self.0.expecting(f)
    }
    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
        self.0.visit_borrowed_str(v).map(Some)
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        self.0.visit_str(v).map(Some)
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
        self.0.visit_u64(v).map(Some)
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
        self.0.visit_i64(v).map(Some)
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Self::Value, E> {
        self.0.visit_f64(v).map(Some)
    }
    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Self::Value, E> {
        self.0.visit_bool(v).map(Some)
    }
}

impl<'de, V: Visitor<'de>> DeserializeSeed<'de> for OrNull<V> {
    type Value = Option<V::Value>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(self)
    }
}

/// A non-negative integer up to `max` (u32 and i64 fields; a float or a negative number is
/// not one, as for serde's primitive visitors).
struct Int(u64);

impl<'de> Visitor<'de> for Int {
    type Value = u64;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an integer")
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<u64, E> {
        if v > self.0 {
            return Err(E::custom("out of range"));
        }
        Ok(v)
    }
}

/// A negative i64 too (templateVersion).
struct SignedInt;

impl<'de> Visitor<'de> for SignedInt {
    type Value = i64;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an i64")
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<i64, E> {
        i64::try_from(v).map_err(|_| E::custom("out of range"))
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<i64, E> {
        Ok(v)
    }
}

/// A JSON number as the DOM holds it (`Value`'s visitor: u64, negative i64, finite f64).
struct Num;

impl<'de> Visitor<'de> for Num {
    type Value = Number;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a number")
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Number, E> {
        Ok(v.into())
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Number, E> {
        Ok(v.into())
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Number, E> {
        Number::from_f64(v).ok_or_else(|| E::custom("not finite"))
    }
}

struct Bool;

impl<'de> Visitor<'de> for Bool {
    type Value = bool;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a boolean")
    }
    fn visit_bool<E: de::Error>(self, v: bool) -> Result<bool, E> {
        Ok(v)
    }
}

// ------------------------------------------------------------------------- any value ----

/// What [`Walk`] found at the top of a value.
#[derive(PartialEq, Eq)]
enum Shape {
    Object,
    Null,
    Other,
}

/// Any value, walked: every string and key checked, and the bytes of its compact JSON added
/// to `size` (duplicate keys counted: at least what the DOM's serialization holds).
struct Walk<'s> {
    size: &'s mut usize,
}

impl<'de> DeserializeSeed<'de> for Walk<'_> {
    type Value = Shape;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Shape, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Walk<'_> {
    type Value = Shape;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_unit<E: de::Error>(self) -> Result<Shape, E> {
        *self.size += 4;
        Ok(Shape::Null)
    }
    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Shape, E> {
        *self.size += if v { 4 } else { 5 };
        Ok(Shape::Other)
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Shape, E> {
        *self.size += number_size(&v.into());
        Ok(Shape::Other)
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Shape, E> {
        *self.size += number_size(&v.into());
        Ok(Shape::Other)
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Shape, E> {
        *self.size += number_size(&Num.visit_f64(v)?);
        Ok(Shape::Other)
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Shape, E> {
        check_text(v)?;
        *self.size += string_size(v);
        Ok(Shape::Other)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Shape, A::Error> {
        let mut n = 0;
        while seq
            .next_element_seed(Walk {
                size: &mut *self.size,
            })?
            .is_some()
        {
            n += 1;
        }
        *self.size += 2 + n.max(1) - 1;
        Ok(Shape::Other)
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Shape, A::Error> {
        let mut n = 0;
        while let Some(k) = map.next_key_seed(Str)? {
            *self.size += string_size(&k) + 1;
            map.next_value_seed(Walk {
                size: &mut *self.size,
            })?;
            n += 1;
        }
        *self.size += 2 + n.max(1) - 1;
        Ok(Shape::Object)
    }
}

/// Any value whose size does not matter: strings and keys checked. (Not `IgnoredAny`:
/// serde_json skips an ignored string without checking its escapes, so a lone surrogate
/// would pass here and fail the DOM.)
struct Check;

impl<'de> DeserializeSeed<'de> for Check {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Check {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        Ok(())
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<(), E> {
        Ok(())
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<(), E> {
        Ok(())
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<(), E> {
        Ok(())
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<(), E> {
        Ok(())
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<(), E> {
        check_text(v)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while seq.next_element_seed(Check)?.is_some() {}
        Ok(())
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while map.next_key_seed(Str)?.is_some() {
            map.next_value_seed(Check)?;
        }
        Ok(())
    }
}

// -------------------------------------------------------------------------- metadata ----

/// An order's `metadata` object (the fields `RawOrderMetadata` names, the rest walked), with
/// its compact size. `null` is `None`; anything else is not one.
struct OrderMetadata<'s> {
    size: &'s mut usize,
}

impl<'de> DeserializeSeed<'de> for OrderMetadata<'_> {
    type Value = Option<RawOrderMetadata<Cow<'de, str>>>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for OrderMetadata<'_> {
    type Value = Option<RawOrderMetadata<Cow<'de, str>>>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an object or null")
    }
    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        *self.size += 4;
        Ok(None)
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut m: RawOrderMetadata<Option<Cow<'de, str>>> = RawOrderMetadata::default();
        let (mut cost, mut critical): (Slot<Number>, Slot<bool>) = (None, None);
        let mut n = 0;
        let size = self.size;
        while let Some(k) = map.next_key_seed(Str)? {
            *size += string_size(&k) + 1;
            n += 1;
            let text = match &*k {
                "actorRole" => &mut m.actor_role,
                "department" => &mut m.department,
                "reason" => &mut m.reason,
                "appointmentId" => &mut m.appointment_id,
                "actionId" => &mut m.action_id,
                "cost" => {
                    let v = map.next_value_seed(OrNull(Num))?;
                    *size += v.as_ref().map_or(4, number_size);
                    put(&mut cost, v)?;
                    continue;
                }
                "critical" => {
                    let v = map.next_value_seed(OrNull(Bool))?;
                    *size += match v {
                        None | Some(true) => 4,
                        Some(false) => 5,
                    };
                    put(&mut critical, v)?;
                    continue;
                }
                _ => {
                    map.next_value_seed(Walk { size: &mut *size })?;
                    continue;
                }
            };
            let v = map.next_value_seed(OrNull(Str))?;
            *size += v.as_deref().map_or(4, string_size);
            put(text, v)?;
        }
        *size += 2 + n.max(1) - 1;
        Ok(Some(RawOrderMetadata {
            actor_role: flat(m.actor_role),
            cost: flat(cost),
            department: flat(m.department),
            critical: flat(critical),
            reason: flat(m.reason),
            appointment_id: flat(m.appointment_id),
            action_id: flat(m.action_id),
        }))
    }
}

/// A system-topic field: its text or number, or just its shape (walked).
struct SystemValue;

impl<'de> DeserializeSeed<'de> for SystemValue {
    type Value = Sys<'de>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for SystemValue {
    type Value = Sys<'de>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
        Str.visit_borrowed_str(v).map(Sys::Text)
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        Str.visit_str(v).map(Sys::Text)
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
        Num.visit_u64(v).map(Sys::Number)
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
        Num.visit_i64(v).map(Sys::Number)
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Self::Value, E> {
        Num.visit_f64(v).map(Sys::Number)
    }
    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(Sys::Other)
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
        Ok(Sys::Other)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
        Check.visit_seq(seq).map(|()| Sys::Other)
    }
    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
        Check.visit_map(map).map(|()| Sys::Other)
    }
}

// ---------------------------------------------------------------------------- record ----

/// The record's top-level object, its keys matched against its topic's fields.
struct Record {
    topic: InputTopic,
}

impl<'de> Visitor<'de> for Record {
    type Value = Fields<'de>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an event object")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Fields<'de>, A::Error> {
        use InputTopic::{Orders, System, Tasks, Workflows};
        let mut f = Fields::default();
        while let Some(k) = map.next_key_seed(Str)? {
            let text = match (self.topic, &*k) {
                (_, "eventId") => &mut f.event_id,
                (_, "eventType") => &mut f.event_type,
                (_, "eventTime") => &mut f.event_time,
                (Orders, "metadata") => {
                    let mut size = 0;
                    let md = map.next_value_seed(OrderMetadata { size: &mut size })?;
                    if size > limits::MAX_METADATA_BYTES {
                        return Err(de::Error::custom("metadata over the limit"));
                    }
                    put(&mut f.metadata, ())?;
                    put(&mut f.order_metadata, md)?;
                    continue;
                }
                (_, "metadata") => {
                    let mut size = 0;
                    let shape = map.next_value_seed(Walk { size: &mut size })?;
                    if shape == Shape::Other || size > limits::MAX_METADATA_BYTES {
                        return Err(de::Error::custom("metadata not an object or too big"));
                    }
                    put(&mut f.metadata, ())?;
                    continue;
                }
                (_, "details") => {
                    let v: Value = map.next_value()?;
                    put(&mut f.details, v)?;
                    continue;
                }
                (Tasks, "taskInstanceId") => &mut f.task.task_instance_id,
                (Tasks, "workflowInstanceId") => &mut f.task.workflow_instance_id,
                (Tasks, "patientId") => &mut f.task.patient_id,
                (Tasks, "taskDefId") => &mut f.task.task_def_id,
                (Tasks, "taskName") => &mut f.task.task_name,
                (Tasks, "status") => &mut f.task.status,
                (Tasks, "errorMessage") => &mut f.task.error_message,
                (Tasks, "dueAt") => &mut f.task.due_at,
                (Tasks, "attempt") => {
                    let v = map.next_value_seed(OrNull(Int(u64::from(u32::MAX))))?;
                    put(&mut f.attempt, v.map(|v| v as u32))?;
                    continue;
                }
                (Workflows, "workflowInstanceId") => &mut f.workflow.workflow_instance_id,
                (Workflows, "patientId") => &mut f.workflow.patient_id,
                (Workflows, "templateId") => &mut f.workflow.template_id,
                (Workflows, "workflowTemplateName") => &mut f.workflow.workflow_template_name,
                (Workflows, "escalationReason") => &mut f.workflow.escalation_reason,
                (Workflows, "templateVersion") => {
                    let v = map.next_value_seed(OrNull(SignedInt))?;
                    put(&mut f.template_version, v)?;
                    continue;
                }
                (Orders, "orderId") => &mut f.order.order_id,
                (Orders, "workflowInstanceId") => &mut f.order.workflow_instance_id,
                (Orders, "patientId") => &mut f.order.patient_id,
                (Orders, "orderType") => &mut f.order.order_type,
                (Orders, "orderStatus") => &mut f.order.order_status,
                (Orders, "actor") => &mut f.order.actor,
                (System, name) => {
                    match SYSTEM_FIELDS.iter().position(|s| *s == name) {
                        Some(i) => {
                            let v = map.next_value_seed(SystemValue)?;
                            put(&mut f.system[i], v)?;
                        }
                        None => map.next_value_seed(Check)?,
                    }
                    continue;
                }
                _ => {
                    map.next_value_seed(Check)?;
                    continue;
                }
            };
            let v = map.next_value_seed(OrNull(Str))?;
            put(text, v)?;
        }
        Ok(f)
    }
}
