//! The published JSON Schemas (`schemas/`) against what the pipeline emits.
//!
//! Every record of the derived-events, alerts and dead-letter topics must validate against
//! its schema (draft 2020-12, formats checked), and may carry no top-level property its
//! schema does not declare: the published schemas leave unknown properties open so that an
//! additive change keeps consumers valid (schemas/README.md), while the tests are strict so
//! that nothing is emitted undocumented.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::Value;

use hmis_flow::config::Config;

/// Which output a record was published on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Output {
    Derived,
    Alert,
    DeadLetter,
    AnalyticsWindow,
}

/// One compiled schema and the properties it declares.
pub struct Schema {
    pub file: PathBuf,
    pub doc: Value,
    validator: jsonschema::Validator,
}

impl Schema {
    fn load(file: PathBuf) -> Schema {
        let text = std::fs::read_to_string(&file)
            .unwrap_or_else(|e| panic!("read {}: {e}", file.display()));
        let doc: Value = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("{} is not JSON: {e}", file.display()));
        assert_eq!(
            doc["$schema"],
            "https://json-schema.org/draft/2020-12/schema",
            "{}",
            file.display()
        );
        let validator = jsonschema::draft202012::options()
            .should_validate_formats(true)
            .build(&doc)
            .unwrap_or_else(|e| panic!("{} is not a valid schema: {e}", file.display()));
        Schema {
            file,
            doc,
            validator,
        }
    }

    /// The problems of `doc` against this schema (empty: valid).
    fn problems(&self, doc: &Value) -> Vec<String> {
        let mut out: Vec<String> = self
            .validator
            .iter_errors(doc)
            .map(|e| format!("{} at `{}`", e, e.instance_path()))
            .collect();
        let declared = self.doc["properties"].as_object();
        if let (Some(obj), Some(declared)) = (doc.as_object(), declared) {
            for k in obj.keys().filter(|k| !declared.contains_key(*k)) {
                out.push(format!("property `{k}` is not declared by the schema"));
            }
        }
        out
    }
}

/// Every schema of `schemas/`.
pub struct Schemas {
    pub derived: BTreeMap<String, Schema>,
    pub alert: Schema,
    pub dead_letter: Schema,
    pub analytics_window: Schema,
}

impl Schemas {
    pub fn dir() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("schemas")
    }

    pub fn load() -> Schemas {
        let dir = Schemas::dir();
        let mut derived = BTreeMap::new();
        for entry in std::fs::read_dir(dir.join("derived")).expect("schemas/derived") {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            let ty = name
                .strip_suffix(".schema.json")
                .unwrap_or_else(|| panic!("schemas/derived/{name}: not *.schema.json"));
            let schema = Schema::load(path.clone());
            assert_eq!(schema.doc["properties"]["eventType"]["const"], ty, "{name}");
            derived.insert(ty.to_string(), schema);
        }
        Schemas {
            derived,
            alert: Schema::load(dir.join("alert.schema.json")),
            dead_letter: Schema::load(dir.join("dead-letter.schema.json")),
            analytics_window: Schema::load(dir.join("analytics-window.schema.json")),
        }
    }

    /// Validates one payload; `Ok(what it is)` (the derived type, `alert:<kind>`,
    /// `dead-letter:<reason>`), or every problem.
    pub fn check(&self, output: Output, payload: &str) -> Result<String, String> {
        let doc: Value =
            serde_json::from_str(payload).map_err(|e| format!("not JSON ({e}): {payload}"))?;
        let field = |k: &str| doc[k].as_str().unwrap_or("?").to_string();
        let (schema, what) = match output {
            Output::Derived => {
                let ty = field("eventType");
                let Some(s) = self.derived.get(&ty) else {
                    return Err(format!("no schema for eventType {ty}: {payload}"));
                };
                (s, ty)
            }
            Output::Alert => (&self.alert, format!("alert:{}", field("kind"))),
            Output::DeadLetter => (
                &self.dead_letter,
                format!("dead-letter:{}", field("reason")),
            ),
            Output::AnalyticsWindow => (
                &self.analytics_window,
                format!("analytics:{}", field("metric")),
            ),
        };
        let problems = schema.problems(&doc);
        if problems.is_empty() {
            Ok(what)
        } else {
            Err(format!(
                "{what} does not match {}: {}\n  {payload}",
                schema.file.display(),
                problems.join("; ")
            ))
        }
    }

    /// Validates every record; panics listing the failures (at most 20), else returns how
    /// many records each schema (and alert kind, dead-letter reason) validated.
    pub fn assert_valid<'a>(
        &self,
        records: impl IntoIterator<Item = (Output, &'a str)>,
    ) -> BTreeMap<String, usize> {
        let mut seen = BTreeMap::new();
        let mut failures = Vec::new();
        for (output, payload) in records {
            match self.check(output, payload) {
                Ok(what) => *seen.entry(what).or_insert(0) += 1,
                Err(e) => failures.push(e),
            }
        }
        assert!(
            failures.is_empty(),
            "{} records do not match their schema:\n{}",
            failures.len(),
            failures[..failures.len().min(20)].join("\n")
        );
        seen
    }
}

/// Validates every record of `cfg`'s derived-events, alerts and dead-letter topics against
/// `schemas/` (panics on the first topic with a failure); returns the counts per schema.
pub fn assert_topics_match_schemas(cfg: &Config) -> BTreeMap<String, usize> {
    let schemas = Schemas::load();
    let mut all = Vec::new();
    for (output, topic) in [
        (Output::Derived, &cfg.topics.derived),
        (Output::Alert, &cfg.topics.alerts),
        (Output::DeadLetter, &cfg.topics.dead_letter),
    ] {
        for (_, payload) in hmis_flow::demo::read_topic(cfg, topic)
            .unwrap_or_else(|e| panic!("read {topic}: {e:#}"))
        {
            all.push((output, payload));
        }
    }
    schemas.assert_valid(all.iter().map(|(o, p)| (*o, p.as_str())))
}
