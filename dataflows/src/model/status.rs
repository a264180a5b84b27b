//! Statuses as the rules decide them and the rows carry them: typed, one byte, written as
//! the contract's text only where they leave the process (the sinks, derived events).

use std::fmt;

use serde::{Deserialize, Serialize};

pub use crate::events::{OrderStatus, TaskStatus};

/// Status of a workflow instance (`workflow_instances.status`) as the rules decide it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum WfStatus {
    Active,
    Completed,
    Failed,
}

impl WfStatus {
    /// The contract's text: ACTIVE, COMPLETED or FAILED.
    pub fn as_str(&self) -> &'static str {
        match self {
            WfStatus::Active => "ACTIVE",
            WfStatus::Completed => "COMPLETED",
            WfStatus::Failed => "FAILED",
        }
    }
}

/// A status compares equal to its contract text (`row.status == "ACTIVE"`) and prints as it.
macro_rules! as_text {
    ($t:ty) => {
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
        impl PartialEq<str> for $t {
            fn eq(&self, other: &str) -> bool {
                self.as_str() == other
            }
        }
        impl PartialEq<&str> for $t {
            fn eq(&self, other: &&str) -> bool {
                self.as_str() == *other
            }
        }
    };
}

as_text!(WfStatus);
as_text!(TaskStatus);
as_text!(OrderStatus);

#[cfg(test)]
mod tests {
    use super::{OrderStatus, TaskStatus, WfStatus};

    #[test]
    fn statuses_are_their_contract_text() {
        assert_eq!(WfStatus::Active, "ACTIVE");
        assert_eq!(WfStatus::Failed.to_string(), "FAILED");
        assert!(WfStatus::Completed != "ACTIVE");
        assert_eq!(TaskStatus::InProgress, "IN_PROGRESS");
        assert_eq!(TaskStatus::Pending.to_string(), "PENDING");
        assert!(TaskStatus::Completed != "FAILED");
        assert_eq!(OrderStatus::InProgress, "IN_PROGRESS");
        assert_eq!(OrderStatus::Cancelled.to_string(), "CANCELLED");
    }
}
