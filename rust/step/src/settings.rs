//! The step's settings: Triton's flat string parameters, checked against one table of rules.
//!
//! The rules are the Python pydantic models (`triton_al.config`, `triton_al.step_settings`),
//! flattened into `parameters.json` by `python -m triton_al.step_settings`. Both steps read
//! their parameters here (the Python one through `triton_al._core`), so a bad setting gets
//! the same message whichever step reads it.

use std::collections::BTreeMap;
use std::sync::OnceLock;

use serde_json::Value as Json;

use triton_al_outbox::validate_group_name;

/// The table of rules, generated from the pydantic models (a test checks it is current).
pub const PARAMETERS_JSON: &str = include_str!("parameters.json");

/// Where `serve` tells the step which outbox to use when config.pbtxt does not.
pub const OUTBOX_ENV: &str = "TRITON_AL_OUTBOX";

const PREFIX: &str = "active_learning step";

/// A parameter's value after parsing, of the type its rule says.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    Null,
    Bool(bool),
    Int(u64),
    Number(f64),
    Text(String),
    Groups(Vec<String>),
}

/// Every parameter with its parsed (or default) value; the task options of the chosen task
/// only. This is what the typed [`StepSettings`] and the Python step are built from.
pub type Parsed = BTreeMap<String, Value>;

struct Table {
    parameters: serde_json::Map<String, Json>,
    task_options: serde_json::Map<String, Json>,
}

fn table() -> &'static Table {
    static TABLE: OnceLock<Table> = OnceLock::new();
    TABLE.get_or_init(|| {
        // The table is compiled in and checked by the tests: failing to parse it is a build defect.
        let json: Json = serde_json::from_str(PARAMETERS_JSON).expect("parameters.json is valid JSON");
        let section = |name: &str| json.get(name).and_then(Json::as_object).cloned().unwrap_or_default();
        Table { parameters: section("parameters"), task_options: section("task_options") }
    })
}

fn python_list(names: &[impl AsRef<str>]) -> String {
    let quoted: Vec<String> = names.iter().map(|n| format!("'{}'", n.as_ref())).collect();
    format!("[{}]", quoted.join(", "))
}

fn bound(rule: &Json, name: &str) -> Option<f64> {
    rule.get(name).and_then(Json::as_f64)
}

/// " in [0, 1]", " >= 0", " > 0", " <= 1" or "": the allowed range, for messages.
fn range_text(rule: &Json) -> String {
    let low = bound(rule, "minimum").map(|v| (v, "[", ">=")).or(bound(rule, "exclusiveMinimum").map(|v| (v, "(", ">")));
    let high = bound(rule, "maximum").map(|v| (v, "]", "<=")).or(bound(rule, "exclusiveMaximum").map(|v| (v, ")", "<")));
    match (low, high) {
        (Some((lo, open, _)), Some((hi, close, _))) if hi < 1e18 => format!(" in {open}{lo}, {hi}{close}"),
        (Some((lo, _, op)), _) => format!(" {op} {lo}"),
        (None, Some((hi, _, op))) => format!(" {op} {hi}"),
        (None, None) => String::new(),
    }
}

fn within(rule: &Json, v: f64) -> bool {
    bound(rule, "minimum").is_none_or(|m| v >= m)
        && bound(rule, "exclusiveMinimum").is_none_or(|m| v > m)
        && bound(rule, "maximum").is_none_or(|m| v <= m)
        && bound(rule, "exclusiveMaximum").is_none_or(|m| v < m)
}

fn parse_bool(text: &str) -> Option<bool> {
    // What pydantic accepts for a bool given as a string.
    match text.to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" | "t" | "y" => Some(true),
        "false" | "0" | "no" | "off" | "f" | "n" => Some(false),
        _ => None,
    }
}

fn parse_groups(text: &str) -> Result<Vec<String>, String> {
    let groups: Vec<String> = text.split(',').map(str::trim).filter(|g| !g.is_empty()).map(String::from).collect();
    if groups.is_empty() {
        return Err("expected at least one upload group".into());
    }
    for g in &groups {
        validate_group_name(g)?;
    }
    let mut seen = groups.clone();
    seen.sort();
    seen.dedup();
    if seen.len() != groups.len() {
        return Err(format!("has duplicates: {}", python_list(&groups)));
    }
    Ok(groups)
}

/// The value of a rule's default (`null` and absent are both Null).
fn default_of(rule: &Json) -> Value {
    match rule.get("default") {
        Some(Json::Bool(b)) => Value::Bool(*b),
        Some(Json::Number(n)) if rule.get("type").and_then(Json::as_str) == Some("integer") => {
            n.as_u64().map(Value::Int).unwrap_or(Value::Null)
        }
        Some(Json::Number(n)) => n.as_f64().map(Value::Number).unwrap_or(Value::Null),
        Some(Json::String(s)) if rule.get("type").and_then(Json::as_str) == Some("groups") => {
            Value::Groups(s.split(',').map(String::from).collect())
        }
        Some(Json::String(s)) => Value::Text(s.clone()),
        _ => Value::Null,
    }
}

/// Parse one value (already trimmed) by its rule; Err is the message after "key: ".
fn parse_value(rule: &Json, text: &str) -> Result<Value, String> {
    let kind = rule.get("type").and_then(Json::as_str).unwrap_or("string");
    if text.is_empty() {
        return match kind {
            "path" => Ok(Value::Null), // an empty outbox path: score and flag, store nothing
            "groups" => Err("expected at least one upload group".into()),
            _ if rule.get("nullable").and_then(Json::as_bool) == Some(true) => Ok(Value::Null),
            _ if rule.get("required").and_then(Json::as_bool) == Some(true) => Err("required, got an empty value".into()),
            _ => Ok(default_of(rule)),
        };
    }
    match kind {
        "number" => match text.parse::<f64>() {
            Ok(v) if v.is_finite() && within(rule, v) => Ok(Value::Number(v)),
            _ => Err(format!("expected a finite number{}, got '{text}'", range_text(rule))),
        },
        "integer" => match text.parse::<i128>() {
            Ok(v) if v >= 0 && v <= u64::MAX as i128 && within(rule, v as f64) => Ok(Value::Int(v as u64)),
            _ => Err(format!("expected an integer{}, got '{text}'", range_text(rule))),
        },
        "boolean" => parse_bool(text).map(Value::Bool).ok_or_else(|| format!("expected true or false, got '{text}'")),
        "enum" => {
            let values: Vec<&str> = rule.get("values").and_then(Json::as_array).map(|v| v.iter().filter_map(Json::as_str).collect()).unwrap_or_default();
            if values.contains(&text) {
                Ok(Value::Text(text.to_string()))
            } else {
                let listed: Vec<String> = values.iter().map(|v| format!("'{v}'")).collect();
                Err(format!("expected one of {}, got '{text}'", listed.join(", ")))
            }
        }
        "groups" => parse_groups(text).map(Value::Groups),
        _ => Ok(Value::Text(text.to_string())),
    }
}

/// Parse Triton's flat string parameters. `outbox_env` is `$TRITON_AL_OUTBOX` (used when
/// there is no `outbox_path` parameter). Every bad key is named in one error message.
pub fn parse_parameters(params: &BTreeMap<String, String>, outbox_env: Option<&str>) -> Result<Parsed, String> {
    let t = table();
    let task_rule = &t.parameters["task"];
    let task = match params.get("task").map(|v| v.trim()) {
        None | Some("") => default_of(task_rule),
        Some(text) => parse_value(task_rule, text).unwrap_or(Value::Null),
    };
    let task_name = match &task {
        Value::Text(name) => Some(name.as_str()),
        _ => None, // a bad task is reported below; its options cannot be checked
    };
    let options = task_name.and_then(|n| t.task_options.get(n)).and_then(Json::as_object);
    let is_any_task_option = |key: &str| t.task_options.values().any(|o| o.get(key).is_some());

    let mut unknown = Vec::new();
    let mut problems = Vec::new();
    let mut parsed = Parsed::new();
    for (key, raw) in params {
        let rule = match (t.parameters.get(key), options.and_then(|o| o.get(key))) {
            (Some(rule), _) | (None, Some(rule)) => rule,
            (None, None) if is_any_task_option(key) => {
                if let (Some(name), Some(o)) = (task_name, options) {
                    let own: Vec<&String> = o.keys().collect();
                    let listed = if own.is_empty() { "none".to_string() } else { python_list(&own) };
                    problems.push(format!("{key}: not an option of task '{name}' (its options: {listed})"));
                }
                continue;
            }
            (None, None) => {
                unknown.push(key.clone());
                continue;
            }
        };
        match parse_value(rule, raw.trim()) {
            Ok(value) => {
                parsed.insert(key.clone(), value);
            }
            Err(message) => problems.push(format!("{key}: {message}")),
        }
    }
    if !unknown.is_empty() {
        return Err(format!("{PREFIX}: unknown parameter(s) {} in config.pbtxt", python_list(&unknown)));
    }
    let mut defaults: Vec<(&String, &Json)> = t.parameters.iter().collect();
    if let Some(o) = options {
        defaults.extend(o.iter());
    }
    for (key, rule) in defaults {
        if parsed.contains_key(key) || params.contains_key(key) {
            continue;
        }
        if rule.get("required").and_then(Json::as_bool) == Some(true) {
            problems.push(format!("{key}: required"));
        } else if key != "outbox_path" {
            parsed.insert(key.clone(), default_of(rule));
        }
    }
    if let (Some(Value::Text(_)), Some(name)) = (parsed.get("boxes_input"), task_name) {
        if name != "detection" {
            problems.push(format!("boxes_input: only task 'detection' has boxes (the task is '{name}')"));
        }
    }
    if !problems.is_empty() {
        return Err(format!("{PREFIX}: bad parameter value(s): {}", problems.join("; ")));
    }
    if !params.contains_key("outbox_path") {
        match outbox_env {
            Some(path) if !path.is_empty() => {
                parsed.insert("outbox_path".into(), Value::Text(path.to_string()));
            }
            _ => {
                return Err(format!(
                    "{PREFIX}: no outbox configured: set the parameter 'outbox_path' in config.pbtxt or the \
                     environment variable {OUTBOX_ENV} (an empty outbox_path scores without storing flagged items)"
                ))
            }
        }
    }
    Ok(parsed)
}

pub use triton_al_kernels::Task;

/// Where flagged items go, and how the outbox is bounded.
#[derive(Clone, Debug, PartialEq)]
pub struct OutboxSettings {
    pub path: String,
    pub max_items: u64,
    pub max_bytes: u64,
    pub overflow_policy: String,
    /// `full`: durable before the response is sent; `normal`: committed (in the OS) only.
    pub sync_full: bool,
    pub max_asset_bytes: u64,
    pub max_invalid_share: f64,
}

/// The step's settings, typed.
#[derive(Clone, Debug)]
pub struct StepSettings {
    pub strategy_name: String,
    pub strategy: triton_al_kernels::Strategy,
    pub threshold: f64,
    pub upload_groups: Vec<String>,
    pub task: Task,
    pub from_logits: bool,
    pub sum_tolerance: f64,
    pub random_fraction: f64,
    pub seed: Option<u64>,
    pub aggregate: triton_al_kernels::Aggregate,
    pub confidence_floor: f32,
    pub empty_score: f32,
    pub layout: triton_al_kernels::Layout,
    pub outbox: Option<OutboxSettings>,
    pub scores_input: String,
    pub asset_input: Option<String>,
    /// Detection: the input holding each box's place, [B, N, 4] FP32 (x0, y0, x1, y1 in
    /// pixels of the input image), stored with each box of a flagged item.
    pub boxes_input: Option<String>,
    /// The input holding the model's embedding of each item, [B, D] FP32 (1 <= D <= 4096),
    /// stored with each flagged item.
    pub embedding_input: Option<String>,
    pub model_name: String,
    pub model_version: String,
    /// Class names, one per line, relative to the model repository.
    pub label_file: Option<String>,
}

fn text(p: &Parsed, key: &str) -> String {
    match p.get(key) {
        Some(Value::Text(s)) => s.clone(),
        _ => String::new(),
    }
}

fn number(p: &Parsed, key: &str, default: f64) -> f64 {
    match p.get(key) {
        Some(Value::Number(v)) => *v,
        Some(Value::Int(v)) => *v as f64,
        _ => default,
    }
}

fn int(p: &Parsed, key: &str, default: u64) -> u64 {
    match p.get(key) {
        Some(Value::Int(v)) => *v,
        _ => default,
    }
}

impl StepSettings {
    /// Parse and type Triton's parameters (see [`parse_parameters`]).
    pub fn from_parameters(params: &BTreeMap<String, String>, outbox_env: Option<&str>) -> Result<StepSettings, String> {
        Ok(StepSettings::from_parsed(&parse_parameters(params, outbox_env)?))
    }

    /// Type an already-validated parameter map.
    pub fn from_parsed(p: &Parsed) -> StepSettings {
        use triton_al_kernels::{Aggregate, Layout, Strategy};
        let task = Task::parse(&text(p, "task")).unwrap_or(Task::Classification);
        let aggregate = match text(p, "aggregate").as_str() {
            "mean" => Aggregate::Mean,
            "least_confident_mean" => Aggregate::LeastConfidentMean(int(p, "k", 3) as usize),
            "quantile" => Aggregate::Quantile(number(p, "quantile", 0.1) as f32),
            "min" => Aggregate::Min,
            _ if task == Task::Segmentation => Aggregate::Mean,
            _ => Aggregate::Min,
        };
        let outbox = match p.get("outbox_path") {
            Some(Value::Text(path)) => Some(OutboxSettings {
                path: path.clone(),
                max_items: int(p, "outbox_max_items", 100_000),
                max_bytes: int(p, "outbox_max_bytes", 2 << 30),
                overflow_policy: text(p, "outbox_overflow_policy"),
                sync_full: text(p, "outbox_sync") != "normal",
                max_asset_bytes: int(p, "outbox_max_asset_bytes", 32 << 20),
                max_invalid_share: number(p, "outbox_max_invalid_share", 0.1),
            }),
            _ => None,
        };
        let strategy_name = text(p, "strategy");
        StepSettings {
            strategy: Strategy::parse(&strategy_name).unwrap_or(Strategy::Entropy),
            strategy_name,
            threshold: number(p, "threshold", 0.5),
            upload_groups: match p.get("upload_groups") {
                Some(Value::Groups(g)) => g.clone(),
                _ => vec!["active-learning".into()],
            },
            task,
            from_logits: matches!(p.get("from_logits"), Some(Value::Bool(true))),
            sum_tolerance: number(p, "sum_tolerance", 0.01),
            random_fraction: number(p, "random_fraction", 0.0),
            seed: match p.get("seed") {
                Some(Value::Int(s)) => Some(*s),
                _ => None,
            },
            aggregate,
            confidence_floor: number(p, "confidence_floor", 0.0) as f32,
            empty_score: number(p, "empty_score", 1.0) as f32,
            layout: if text(p, "layout") == "nhwc" { Layout::ChannelsLast } else { Layout::ChannelsFirst },
            outbox,
            scores_input: text(p, "scores_input"),
            asset_input: match p.get("asset_input") {
                Some(Value::Text(s)) => Some(s.clone()),
                _ => None,
            },
            boxes_input: match p.get("boxes_input") {
                Some(Value::Text(s)) => Some(s.clone()),
                _ => None,
            },
            embedding_input: match p.get("embedding_input") {
                Some(Value::Text(s)) => Some(s.clone()),
                _ => None,
            },
            model_name: text(p, "model_name"),
            model_version: text(p, "model_version"),
            label_file: match p.get("label_file") {
                Some(Value::Text(s)) => Some(s.clone()),
                _ => None,
            },
        }
    }
}
