//! One loaded `active_learning` model: its settings read once from config.pbtxt, the step
//! (with its outbox writer thread, shared by every instance), and its metrics.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::Value as Json;
use triton_al_step::{Step, StepSettings, OUTBOX_ENV};

use crate::metrics::StepMetrics;

pub const STEP_OUTPUTS: [&str; 2] = ["SCORE", "FLAGGED"];

/// How often a step whose outbox could not be opened tries again (the Python step's too).
const OUTBOX_RETRY_INTERVAL: Duration = Duration::from_secs(1);

/// The version of the scored model that the server has ready (the newest, as Triton's
/// default policy serves), asked of the server itself and cached for a second. Used when
/// the model does not say which version computed an item (a `MODEL_VERSION` output does).
pub struct ServedVersion {
    server: ServerHandle,
    model: String,
    cached: Mutex<(String, Option<Instant>)>,
}

/// The server outlives every model, and its model index may be read from any thread.
struct ServerHandle(*mut crate::triton::sys::TRITONSERVER_Server);
// SAFETY: see above; the pointer is only passed to TRITONSERVER_ServerModelIndex.
unsafe impl Send for ServerHandle {}
// SAFETY: as above.
unsafe impl Sync for ServerHandle {}

impl ServedVersion {
    fn new(server: *mut crate::triton::sys::TRITONSERVER_Server, model: String) -> Self {
        ServedVersion { server: ServerHandle(server), model, cached: Mutex::new(("unknown".into(), None)) }
    }

    pub fn get(&self) -> String {
        let Ok(mut cached) = self.cached.lock() else { return "unknown".into() };
        if cached.1.is_none_or(|at| at.elapsed() >= Duration::from_secs(1)) {
            let newest = crate::triton::ready_model_index(self.server.0)
                .ok()
                .and_then(|json| serde_json::from_str::<Json>(&json).ok())
                .and_then(|index| {
                    index
                        .as_array()?
                        .iter()
                        .filter(|m| m.get("name").and_then(Json::as_str) == Some(self.model.as_str()))
                        .filter_map(|m| m.get("version").and_then(Json::as_str)?.parse::<u64>().ok())
                        .max()
                });
            *cached = (newest.map_or("unknown".into(), |v| v.to_string()), Some(Instant::now()));
        }
        cached.0.clone()
    }
}

pub struct ModelState {
    pub name: String,
    pub step: Step,
    pub metrics: Option<StepMetrics>,
    /// Outputs that copy the input of the same name (every model output, so that Triton never
    /// prunes the step from an ensemble).
    pub passthrough: Vec<String>,
    pub version_input: bool,
    pub served_version: Option<ServedVersion>,
    /// How long a response may wait for its flagged items to be stored.
    pub outbox_timeout: Duration,
}

fn tensors<'a>(config: &'a Json, key: &str) -> impl Iterator<Item = &'a Json> {
    config.get(key).and_then(Json::as_array).into_iter().flatten()
}

fn name_of(tensor: &Json) -> &str {
    tensor.get("name").and_then(Json::as_str).unwrap_or("")
}

/// The pass-through outputs of a step config: each must copy an input of the same name,
/// type and dims (the Python step applies the same rule, with the same messages).
fn passthrough_outputs(config: &Json) -> Result<Vec<String>, String> {
    let mut names = Vec::new();
    for output in tensors(config, "output") {
        let name = name_of(output);
        if STEP_OUTPUTS.contains(&name) {
            continue;
        }
        let Some(input) = tensors(config, "input").find(|i| name_of(i) == name) else {
            return Err(format!(
                "active_learning step: output '{name}' is neither SCORE, FLAGGED nor a pass-through (a pass-through output needs an input of the same name)"
            ));
        };
        if input.get("data_type") != output.get("data_type") || input.get("dims") != output.get("dims") {
            return Err(format!("active_learning step: pass-through output '{name}' must have the type and dims of input '{name}'"));
        }
        names.push(name.to_string());
    }
    Ok(names)
}

impl ModelState {
    /// Read and check the model's configuration; any bad setting is an Err naming it (and the
    /// load fails with that message).
    pub fn new(name: &str, config_json: &str, server: *mut crate::triton::sys::TRITONSERVER_Server, model_dir: &str) -> Result<ModelState, String> {
        let config: Json = serde_json::from_str(config_json).map_err(|e| format!("active_learning step: unreadable model config ({e})"))?;
        let mut params: BTreeMap<String, String> = config
            .get("parameters")
            .and_then(Json::as_object)
            .into_iter()
            .flatten()
            .map(|(k, v)| (k.clone(), v.get("string_value").and_then(Json::as_str).unwrap_or("").to_string()))
            .collect();
        let explicit_version = params.contains_key("model_version");
        params.entry("model_name".into()).or_insert_with(|| name.to_string());
        let settings = StepSettings::from_parameters(&params, std::env::var(OUTBOX_ENV).ok().as_deref())?;
        let inputs: Vec<&str> = tensors(&config, "input").map(name_of).collect();
        if !inputs.contains(&settings.scores_input.as_str()) {
            return Err(format!(
                "active_learning step: scores_input '{}' is not an input of this model (its inputs: {inputs:?})",
                settings.scores_input
            ));
        }
        if let Some(boxes) = settings.boxes_input.as_deref().filter(|b| !inputs.contains(b)) {
            return Err(format!("active_learning step: boxes_input '{boxes}' is not an input of this model (its inputs: {inputs:?})"));
        }
        if let Some(embedding) = settings.embedding_input.as_deref().filter(|e| !inputs.contains(e)) {
            return Err(format!("active_learning step: embedding_input '{embedding}' is not an input of this model (its inputs: {inputs:?})"));
        }
        let passthrough = passthrough_outputs(&config)?;
        let served_version = (!explicit_version).then(|| ServedVersion::new(server, settings.model_name.clone()));
        // The model's folder is in the repository; label_file is relative to the repository.
        let repository = std::path::Path::new(model_dir).parent().unwrap_or(std::path::Path::new("/"));
        let class_names = Step::read_class_names(&settings, repository)?;
        // Inference must go on without the outbox: while it cannot be opened, every flagged
        // item is counted as an outbox error, and the step tries again every second.
        let model = name.to_string();
        let mut step = Step::open_retrying(settings.clone(), OUTBOX_RETRY_INTERVAL, move |outcome| match outcome {
            Err(e) => crate::triton::log_error!(
                "active_learning {model}: the outbox cannot be used, flagged items will not be stored until it can: {e}"
            ),
            Ok(()) => crate::triton::log_info!("active_learning {model}: the outbox is open, flagged items are stored again"),
        });
        step.class_names = class_names;
        let metrics = StepMetrics::start(name)
            .map_err(|e| crate::triton::log_error!("active_learning {name}: metrics disabled: {e}"))
            .ok();
        Ok(ModelState {
            name: name.to_string(),
            step,
            metrics,
            passthrough,
            version_input: inputs.contains(&"MODEL_VERSION"),
            served_version,
            outbox_timeout: Duration::from_secs(2),
        })
    }

    /// Whether flagged items are being counted as errors because the outbox is unusable.
    pub fn outbox_missing(&self) -> bool {
        self.step.settings.outbox.is_some() && self.step.outbox().is_none()
    }
}
