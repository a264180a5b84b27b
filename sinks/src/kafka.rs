//! The one place every Kafka client of hmis-flow is configured.
//!
//! ```text
//!  [kafka] in the config file ─┐
//!  HMIS_KAFKA__<PROP>          ├─► KafkaOptions ──┐  (secrets redacted in Debug)
//!  HMIS_KAFKA__<PROP>__FILE ───┘                  ▼
//!  brokers, a client's defaults ─────────► client_config() ◄── a client's required settings
//!                                                 │
//!                                                 ▼
//!                     KafkaClientConfig::create*  (errors with secret values redacted)
//!                                                 │
//!     source consumers · broker probe · lag monitor · outbox producer · outbox recovery
//!     consumer · topic admin · `tail` reader · `generate`/demo producer
//! ```
//!
//! Every client takes the operator's librdkafka options, so TLS and SASL
//! (`security.protocol`, `ssl.*`, `sasl.*`) configured once reach all of them. Precedence:
//! `bootstrap.servers` and the client's defaults, then the operator's options, then the
//! settings the client's correctness rests on (which cannot be overridden).
//!
//! Secrets (`sasl.password`, `ssl.key.password`, ... see [`is_secret`]) never appear in
//! `Debug` output of the options or of a client config, nor in the errors of
//! [`KafkaClientConfig::create`]: librdkafka's own configuration errors quote the value.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

use rdkafka::client::ClientContext;
use rdkafka::config::{FromClientConfig, FromClientConfigAndContext};
use rdkafka::error::KafkaError;
use rdkafka::ClientConfig;
use serde::{Deserialize, Serialize};

/// Shown instead of a secret value.
pub const REDACTED: &str = "[redacted]";

/// Prefix of the environment variables that set librdkafka options:
/// `HMIS_KAFKA__SASL_USERNAME=app` sets `sasl.username` (upper case, `.` written `_`).
pub const ENV_PREFIX: &str = "HMIS_KAFKA__";

/// Suffix of an environment variable naming a file that holds the value:
/// `HMIS_KAFKA__SASL_PASSWORD__FILE=/run/secrets/kafka` (trailing newline ignored).
pub const ENV_FILE_SUFFIX: &str = "__FILE";

/// Whether a librdkafka property holds a secret: passwords, passphrases, client secrets,
/// private keys inline (PEM) and the OAUTHBEARER config string (it may hold a secret).
/// Matched on the name so that properties added by later librdkafka versions in the same
/// naming style are covered too.
pub fn is_secret(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    [
        "password",
        "passphrase",
        "secret",
        "private",
        "key.pem",
        "oauthbearer.config",
    ]
    .iter()
    .any(|word| key.contains(word))
}

/// librdkafka options given by the operator (`[kafka]` in the config file, then
/// `HMIS_KAFKA__*` variables), passed to every client. Serialized as a plain table;
/// `Debug` shows secret values as [`REDACTED`].
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct KafkaOptions(BTreeMap<String, String>);

impl fmt::Debug for KafkaOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map()
            .entries(
                self.0
                    .iter()
                    .map(|(k, v)| (k, if is_secret(k) { REDACTED } else { v.as_str() })),
            )
            .finish()
    }
}

impl<K: Into<String>, V: Into<String>> FromIterator<(K, V)> for KafkaOptions {
    fn from_iter<I: IntoIterator<Item = (K, V)>>(iter: I) -> Self {
        KafkaOptions(
            iter.into_iter()
                .map(|(k, v)| (k.into(), v.into()))
                .collect(),
        )
    }
}

impl std::ops::Index<&str> for KafkaOptions {
    type Output = String;
    fn index(&self, key: &str) -> &String {
        &self.0[key]
    }
}

/// A `HMIS_KAFKA__*` variable that cannot be used. Says which variable, never its value.
#[derive(Debug, thiserror::Error)]
pub enum KafkaOptionsError {
    /// The variable names no property (`HMIS_KAFKA__=` or `HMIS_KAFKA____FILE=`).
    #[error("environment variable {0} names no librdkafka property")]
    NoProperty(String),
    /// The file a `__FILE` variable names cannot be read.
    #[error("environment variable {var}: cannot read {path}: {source}")]
    File {
        /// The variable.
        var: String,
        /// The path it holds.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The variable's value is not UTF-8.
    #[error("environment variable {0} is not valid UTF-8")]
    NotUnicode(String),
}

impl KafkaOptions {
    /// Sets (or replaces) an option.
    pub fn insert(&mut self, key: impl Into<String>, value: impl Into<String>) {
        self.0.insert(key.into(), value.into());
    }

    /// An option's value.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }

    /// Removes an option.
    pub fn remove(&mut self, key: &str) -> Option<String> {
        self.0.remove(key)
    }

    /// The options in name order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// No options at all.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Applies the `HMIS_KAFKA__<PROP>` and `HMIS_KAFKA__<PROP>__FILE` variables of `vars`
    /// (normally `std::env::vars_os()`) over these options. `<PROP>` is the librdkafka
    /// property in upper case with `.` written `_` (`SASL_PASSWORD` → `sasl.password`);
    /// a `__FILE` variable's value is a path whose content (one trailing newline removed)
    /// is the property's value. A property set both ways takes the file.
    pub fn apply_env(
        &mut self,
        vars: impl IntoIterator<Item = (std::ffi::OsString, std::ffi::OsString)>,
    ) -> Result<(), KafkaOptionsError> {
        let mut direct = Vec::new();
        let mut files = Vec::new();
        for (name, value) in vars {
            let Some(name) = name.to_str() else { continue };
            let Some(prop) = name.strip_prefix(ENV_PREFIX) else {
                continue;
            };
            let (prop, from_file) = match prop.strip_suffix(ENV_FILE_SUFFIX) {
                Some(p) => (p, true),
                None => (prop, false),
            };
            if prop.is_empty() {
                return Err(KafkaOptionsError::NoProperty(name.to_string()));
            }
            let key = prop.to_ascii_lowercase().replace('_', ".");
            let value = value
                .into_string()
                .map_err(|_| KafkaOptionsError::NotUnicode(name.to_string()))?;
            if from_file {
                files.push((name.to_string(), key, value));
            } else {
                direct.push((key, value));
            }
        }
        for (key, value) in direct {
            self.insert(key, value);
        }
        for (var, key, path) in files {
            let value =
                read_secret_file(Path::new(&path)).map_err(|source| KafkaOptionsError::File {
                    var,
                    path: path.clone(),
                    source,
                })?;
            self.insert(key, value);
        }
        Ok(())
    }
}

/// A secret file's content without one trailing newline (`\n` or `\r\n`).
fn read_secret_file(path: &Path) -> std::io::Result<String> {
    let mut text = std::fs::read_to_string(path)?;
    if text.ends_with('\n') {
        text.pop();
        if text.ends_with('\r') {
            text.pop();
        }
    }
    Ok(text)
}

/// The configuration of one Kafka client, made by [`client_config`]. `Debug` leaves the
/// secrets out (rdkafka's own sanitizing plus [`is_secret`]); creating the client returns
/// errors with secret values redacted.
#[derive(Clone)]
pub struct KafkaClientConfig(ClientConfig);

impl fmt::Debug for KafkaClientConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let shown: BTreeMap<&str, &str> = self
            .0
            .config_map()
            .into_iter()
            .map(|(k, v)| (k, if is_secret(k) { REDACTED } else { v }))
            .collect();
        f.debug_tuple("KafkaClientConfig").field(&shown).finish()
    }
}

impl KafkaClientConfig {
    /// A setting's value, as it will be given to librdkafka.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key)
    }

    /// Overrides a setting (for a client that differs from the one the config was made for).
    pub fn set(&mut self, key: &str, value: &str) -> &mut Self {
        self.0.set(key, value);
        self
    }

    /// Removes a setting.
    pub fn remove(&mut self, key: &str) -> &mut Self {
        self.0.remove(key);
        self
    }

    /// Creates the client.
    pub fn create<T: FromClientConfig>(&self) -> Result<T, KafkaError> {
        self.0.create().map_err(|e| self.redact(e))
    }

    /// Creates the client with a context.
    pub fn create_with_context<C, T>(&self, context: C) -> Result<T, KafkaError>
    where
        C: ClientContext,
        T: FromClientConfigAndContext<C>,
    {
        self.0
            .create_with_context(context)
            .map_err(|e| self.redact(e))
    }

    /// The values of this config's secret settings.
    fn secrets(&self) -> Vec<&str> {
        self.0
            .config_map()
            .into_keys()
            .filter(|k| is_secret(k))
            .filter_map(|k| self.0.get(k))
            .filter(|v| !v.is_empty())
            .collect()
    }

    fn redact(&self, error: KafkaError) -> KafkaError {
        redact_error(error, &self.secrets())
    }
}

/// The configuration of a Kafka client: `bootstrap.servers`, then the client's `defaults`,
/// then the operator's `options` (TLS, SASL, tuning), then the client's `required`
/// settings. Every client of hmis-flow is configured through this function.
pub fn client_config(
    brokers: &str,
    options: &KafkaOptions,
    defaults: &[(&str, &str)],
    required: &[(&str, &str)],
) -> KafkaClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", brokers);
    for (k, v) in defaults {
        c.set(*k, *v);
    }
    for (k, v) in options.iter() {
        c.set(k, v);
    }
    for (k, v) in required {
        c.set(*k, *v);
    }
    KafkaClientConfig(c)
}

/// librdkafka's configuration errors carry the rejected value, and its messages may quote
/// a value: the value of a secret property, and any of `secrets` in a message, become
/// [`REDACTED`].
pub fn redact_error(error: KafkaError, secrets: &[&str]) -> KafkaError {
    let scrub = |mut text: String| {
        for secret in secrets.iter().filter(|s| !s.is_empty()) {
            text = text.replace(secret, REDACTED);
        }
        text
    };
    match error {
        KafkaError::ClientConfig(code, desc, key, value) => {
            let (desc, value) = if is_secret(&key) && !value.is_empty() {
                (desc.replace(&value, REDACTED), REDACTED.to_string())
            } else {
                (desc, value)
            };
            KafkaError::ClientConfig(code, scrub(desc), key, scrub(value))
        }
        KafkaError::ClientCreation(message) => KafkaError::ClientCreation(scrub(message)),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsString;

    fn vars(pairs: &[(&str, &str)]) -> Vec<(OsString, OsString)> {
        pairs
            .iter()
            .map(|(k, v)| (OsString::from(k), OsString::from(v)))
            .collect()
    }

    #[test]
    fn secrets_are_recognised_by_name() {
        for key in [
            "sasl.password",
            "ssl.key.password",
            "ssl.keystore.password",
            "ssl.truststore.password",
            "ssl.key.pem",
            "sasl.oauthbearer.client.secret",
            "sasl.oauthbearer.config",
            "sasl.oauthbearer.assertion.private.key.passphrase",
            "SASL.PASSWORD",
        ] {
            assert!(is_secret(key), "{key}");
        }
        for key in [
            "sasl.username",
            "sasl.mechanism",
            "security.protocol",
            "ssl.ca.location",
            "ssl.key.location",
            "ssl.certificate.pem",
            "bootstrap.servers",
        ] {
            assert!(!is_secret(key), "{key}");
        }
    }

    #[test]
    fn precedence_is_defaults_then_options_then_required() {
        let options: KafkaOptions = [("linger.ms", "50"), ("acks", "1")].into_iter().collect();
        let c = client_config(
            "b:9092",
            &options,
            &[("linger.ms", "5"), ("compression.type", "lz4")],
            &[("acks", "all")],
        );
        assert_eq!(c.get("bootstrap.servers"), Some("b:9092"));
        assert_eq!(c.get("linger.ms"), Some("50"), "options override defaults");
        assert_eq!(c.get("compression.type"), Some("lz4"));
        assert_eq!(c.get("acks"), Some("all"), "required settings win");
    }

    #[test]
    fn env_sets_options_and_files_hold_secrets() {
        let dir = std::env::temp_dir().join(format!("hmis-kafka-env-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("password");
        std::fs::write(&file, "s3cr3t-from-file\n").unwrap();
        let mut options: KafkaOptions = [("sasl.username", "from-file")].into_iter().collect();
        options
            .apply_env(vars(&[
                ("HMIS_KAFKA__SASL_USERNAME", "app"),
                ("HMIS_KAFKA__SECURITY_PROTOCOL", "SASL_SSL"),
                ("HMIS_KAFKA__SASL_PASSWORD", "ignored-the-file-wins"),
                ("HMIS_KAFKA__SASL_PASSWORD__FILE", file.to_str().unwrap()),
                ("HMIS_BROKERS", "not-an-option"),
                ("HMIS_KAFKA_OTHER", "not-an-option"),
            ]))
            .unwrap();
        assert_eq!(options.get("sasl.username"), Some("app"), "env over file");
        assert_eq!(options.get("security.protocol"), Some("SASL_SSL"));
        assert_eq!(options.get("sasl.password"), Some("s3cr3t-from-file"));
        assert_eq!(options.iter().count(), 3);

        let missing = dir.join("missing");
        let err = KafkaOptions::default()
            .apply_env(vars(&[(
                "HMIS_KAFKA__SASL_PASSWORD__FILE",
                missing.to_str().unwrap(),
            )]))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("HMIS_KAFKA__SASL_PASSWORD__FILE") && err.contains("missing"),
            "{err}"
        );
        assert!(KafkaOptions::default()
            .apply_env(vars(&[("HMIS_KAFKA__", "x")]))
            .is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn secrets_never_show_in_debug_or_errors() {
        let secret = "hunter2-very-secret";
        let options: KafkaOptions = [
            ("sasl.password", secret),
            ("ssl.key.password", secret),
            ("sasl.username", "app"),
        ]
        .into_iter()
        .collect();
        let shown = format!("{options:?}");
        assert!(!shown.contains(secret), "{shown}");
        assert!(shown.contains("app") && shown.contains(REDACTED), "{shown}");

        let config = client_config("b:9092", &options, &[], &[]);
        let shown = format!("{config:?}");
        assert!(!shown.contains(secret), "{shown}");
        assert!(shown.contains("sasl.username"), "{shown}");

        // librdkafka rejects the value of a secret property: the error must not echo it.
        let bad: KafkaOptions = [("security.protocol", "ssl"), ("ssl.key.pem", secret)]
            .into_iter()
            .collect();
        let config = client_config("b:9092", &bad, &[], &[]);
        let err = config
            .create::<rdkafka::consumer::BaseConsumer>()
            .err()
            .expect("a key that is no PEM is refused");
        for shown in [err.to_string(), format!("{err:?}")] {
            assert!(!shown.contains(secret), "{shown}");
        }
        let raw = KafkaError::ClientConfig(
            rdkafka::types::RDKafkaConfRes::RD_KAFKA_CONF_INVALID,
            format!("Invalid value \"{secret}\" for configuration property \"sasl.password\""),
            "sasl.password".into(),
            secret.into(),
        );
        let shown = redact_error(raw, &[]).to_string();
        assert!(!shown.contains(secret), "{shown}");
        assert!(shown.contains("sasl.password"), "{shown}");
        let raw = KafkaError::ClientCreation(format!("could not use {secret}"));
        let shown = redact_error(raw, &[secret]).to_string();
        assert!(!shown.contains(secret), "{shown}");
    }
}
