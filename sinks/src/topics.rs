//! Creating the contract's topics (contract §1, §10), idempotently.
//!
//! | topic                     | partitions | settings                          |
//! |---------------------------|-----------:|-----------------------------------|
//! | `workflow-definitions`    | 1          | `cleanup.policy=compact`          |
//! | `workflow-task-events`    | 10         | retention 7 days                  |
//! | `workflow-order-events`   | 10         | retention 7 days                  |
//! | `workflow-state-events`   | 5          | retention 7 days                  |
//! | `system-events`           | 5          | retention 7 days                  |
//! | `workflow-derived-events` | 10         | broker default                    |
//! | `system-alerts`           | 5          | broker default                    |
//! | `workflow-dead-letter`    | 5          | retention 30 days                 |
//! | `workflow-analytics`      | 5          | broker default                    |
//!
//! The definitions topic is compacted and gets no time retention: a running workflow keeps
//! using the template version it started with, however old, so versions must not expire.

use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::types::RDKafkaErrorCode;
use tracing::{info, warn};

use crate::kafka::{self, KafkaClientConfig, KafkaOptions};
use crate::outbox::TopicNames;
use crate::SinkError;

/// Seven days in milliseconds: retention of the input topics.
pub const INPUT_RETENTION_MS: i64 = 7 * 24 * 60 * 60 * 1000;
/// Thirty days in milliseconds: retention of the dead-letter topic.
pub const DEAD_LETTER_RETENTION_MS: i64 = 30 * 24 * 60 * 60 * 1000;

/// A topic to create.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TopicSpec {
    /// Topic name.
    pub name: String,
    /// Partition count.
    pub partitions: i32,
    /// Topic-level configuration, e.g. `("retention.ms", "604800000")`.
    pub config: Vec<(String, String)>,
}

impl TopicSpec {
    /// A topic with broker-default settings.
    pub fn new(name: impl Into<String>, partitions: i32) -> TopicSpec {
        TopicSpec {
            name: name.into(),
            partitions,
            config: Vec::new(),
        }
    }

    /// Adds a topic-level setting.
    pub fn with(mut self, key: &str, value: impl ToString) -> TopicSpec {
        self.config.push((key.to_string(), value.to_string()));
        self
    }
}

/// Names of the input topics (contract §1); the defaults are the contract's.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InputTopicNames {
    /// Workflow templates, compacted, key `templateId:version`.
    pub definitions: String,
    /// TASK_* events, key taskInstanceId.
    pub task_events: String,
    /// ORDER_* events, key orderId.
    pub order_events: String,
    /// WORKFLOW_* events sent by the upstream system, key workflowInstanceId.
    pub state_events: String,
    /// HEALTH_CHECK, PERFORMANCE_METRIC, ERROR_REPORT, AUDIT_EVENT, key component.
    pub system_events: String,
}

impl Default for InputTopicNames {
    fn default() -> Self {
        InputTopicNames {
            definitions: "workflow-definitions".into(),
            task_events: "workflow-task-events".into(),
            order_events: "workflow-order-events".into(),
            state_events: "workflow-state-events".into(),
            system_events: "system-events".into(),
        }
    }
}

/// Default name of the streaming-analytics topic (contract §10).
pub const DEFAULT_ANALYTICS_TOPIC: &str = "workflow-analytics";

/// The contract's topics with their production partition counts and settings, under the
/// given names (see the module table).
pub fn default_topics(
    inputs: &InputTopicNames,
    outputs: &TopicNames,
    analytics: &str,
) -> Vec<TopicSpec> {
    let input = |name: &str, partitions| {
        TopicSpec::new(name, partitions)
            .with("cleanup.policy", "delete")
            .with("retention.ms", INPUT_RETENTION_MS)
    };
    vec![
        TopicSpec::new(&inputs.definitions, 1).with("cleanup.policy", "compact"),
        input(&inputs.task_events, 10),
        input(&inputs.order_events, 10),
        input(&inputs.state_events, 5),
        input(&inputs.system_events, 5),
        TopicSpec::new(&outputs.derived, 10),
        TopicSpec::new(&outputs.alerts, 5),
        TopicSpec::new(&outputs.dead_letter, 5)
            .with("cleanup.policy", "delete")
            .with("retention.ms", DEAD_LETTER_RETENTION_MS),
        TopicSpec::new(analytics, 5),
    ]
}

/// Creates the topics that do not exist yet; existing ones are left as they are (their
/// partition count and settings are not checked or changed). Returns the names created.
///
/// `replication_factor` is 3 in production, 1 on a single development broker. A broker
/// that needs TLS or SASL: [`create_topics_with`].
pub async fn create_topics(
    brokers: &str,
    topics: &[TopicSpec],
    replication_factor: i32,
) -> Result<Vec<String>, SinkError> {
    create_topics_with(
        brokers,
        &KafkaOptions::default(),
        topics,
        replication_factor,
    )
    .await
}

/// The topic admin client's librdkafka configuration.
pub fn admin_config(brokers: &str, options: &KafkaOptions) -> KafkaClientConfig {
    kafka::client_config(brokers, options, &[], &[])
}

/// [`create_topics`] with the operator's librdkafka options (TLS, SASL).
pub async fn create_topics_with(
    brokers: &str,
    options: &KafkaOptions,
    topics: &[TopicSpec],
    replication_factor: i32,
) -> Result<Vec<String>, SinkError> {
    let admin: AdminClient<DefaultClientContext> = admin_config(brokers, options)
        .create()
        .map_err(SinkError::kafka("create admin client"))?;
    let new_topics: Vec<NewTopic<'_>> = topics
        .iter()
        .map(|spec| {
            let mut topic = NewTopic::new(
                &spec.name,
                spec.partitions,
                TopicReplication::Fixed(replication_factor),
            );
            for (key, value) in &spec.config {
                topic = topic.set(key, value);
            }
            topic
        })
        .collect();
    let options = AdminOptions::new()
        .operation_timeout(Some(Duration::from_secs(30)))
        .request_timeout(Some(Duration::from_secs(30)));

    // A topic whose creation failed transiently (a broker busy or restarting) is asked for
    // again, a few times with a capped backoff; any other failure is returned at once.
    let mut created = Vec::new();
    let mut pending: Vec<NewTopic<'_>> = new_topics;
    let mut backoff = Duration::from_millis(200);
    for attempt in 1..=CREATE_ATTEMPTS {
        let results = admin
            .create_topics(&pending, &options)
            .await
            .map_err(SinkError::kafka("create topics"))?;
        let mut retry = Vec::new();
        for result in results {
            match result {
                Ok(name) => {
                    info!(topic = %name, "topic created");
                    created.push(name);
                }
                Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((name, code)) => {
                    let err = SinkError::Kafka {
                        context: format!("create topic {name}"),
                        source: rdkafka::error::KafkaError::AdminOp(code),
                    };
                    if !err.is_transient() || attempt == CREATE_ATTEMPTS {
                        return Err(err);
                    }
                    warn!(topic = %name, error = %err, attempt, "topic creation failed; retrying");
                    retry.push(name);
                }
            }
        }
        if retry.is_empty() {
            break;
        }
        pending.retain(|t| retry.iter().any(|name| name == t.name));
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
    Ok(created)
}

/// How many times a transiently failing topic creation is tried.
const CREATE_ATTEMPTS: u32 = 6;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_follow_the_contract() {
        let topics = default_topics(
            &InputTopicNames::default(),
            &TopicNames::default(),
            DEFAULT_ANALYTICS_TOPIC,
        );
        let find = |name: &str| topics.iter().find(|t| t.name == name).unwrap();
        let setting = |t: &TopicSpec, key: &str| {
            t.config
                .iter()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v.clone())
        };
        assert_eq!(topics.len(), 9);
        let definitions = find("workflow-definitions");
        assert_eq!(definitions.partitions, 1);
        assert_eq!(setting(definitions, "cleanup.policy").unwrap(), "compact");
        assert_eq!(setting(definitions, "retention.ms"), None);
        assert_eq!(find("workflow-task-events").partitions, 10);
        assert_eq!(
            setting(find("system-events"), "retention.ms").unwrap(),
            "604800000"
        );
        assert_eq!(
            setting(find("workflow-dead-letter"), "retention.ms").unwrap(),
            "2592000000"
        );
        assert_eq!(find("workflow-derived-events").partitions, 10);
        assert_eq!(find("workflow-analytics").partitions, 5);
    }
}
