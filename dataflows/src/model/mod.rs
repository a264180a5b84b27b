//! Compact records: the types the hot path carries instead of owned `String`s.
//!
//! - [`Str`]: an immutable, shared string. Ids and texts are decoded once into a `Str` and
//!   from then on copied by reference count, not by allocation: a task's id appears in its
//!   events, its folded state, its SLA facts, its rows and the derived events it causes.
//! - [`WfStatus`], [`TaskStatus`], [`OrderStatus`]: statuses typed (one byte in a row),
//!   written as the contract's text where they leave the process.

mod shared_str;
mod status;

pub use shared_str::Str;
pub use status::{OrderStatus, TaskStatus, WfStatus};
