//! One dynamic batch through the step: score each request's items, flag them, and hand the
//! flagged ones (asset, prediction, score, reason, embedding) to the outbox's writer thread.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use triton_al_kernels as kernels;
use triton_al_outbox::{NewItem, Outbox, OutboxConfig, OutboxError, OverflowPolicy, SyncMode, Ticket, MAX_EMBEDDING_DIMS};

use crate::prediction::prediction_json;
use crate::settings::{StepSettings, Task};

/// Reason codes, as the kernels write them (index into [`REASONS`]).
pub const REASONS: [&str; 4] = ["", "uncertain", "invalid_output", "random"];

/// One request's class scores, batch first, as contiguous f32.
pub struct Scores<'a> {
    pub values: &'a [f32],
    pub shape: &'a [usize],
}

/// One request's assets, read only for flagged items (so that most batches copy nothing).
pub trait Assets {
    fn len(&self) -> usize;
    /// The bytes to store for item `index` and their media type.
    fn asset(&self, index: usize) -> Result<(Vec<u8>, &'static str), String>;
}

/// One request's detection boxes: [B, N, 4] (x0, y0, x1, y1 per box), as contiguous f32.
pub struct Boxes<'a> {
    pub values: &'a [f32],
    pub shape: &'a [usize],
}

/// One request's embeddings: [B, D] (one vector of D values per item), as contiguous f32.
pub struct Embedding<'a> {
    pub values: &'a [f32],
    pub shape: &'a [usize],
}

/// What one inference request brings to the step.
pub struct StepRequest<'a> {
    pub scores: Scores<'a>,
    pub assets: Option<&'a dyn Assets>,
    /// The boxes of a detection request (`boxes_input`), checked against the scores' shape.
    pub boxes: Option<Boxes<'a>>,
    /// The model's embedding of each item (`embedding_input`), checked against the scores'
    /// batch; only flagged items' rows are copied (to the outbox).
    pub embedding: Option<Embedding<'a>>,
    /// The version of the model that produced the scores, when the request says.
    pub model_version: Option<String>,
}

/// Per item: the score (confidence in [0, 1], NaN for invalid output) and the reason code.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Evaluation {
    pub scores: Vec<f32>,
    pub reasons: Vec<u8>,
}

/// What a batch did, for metrics and logs.
#[derive(Clone, Debug, Default)]
pub struct BatchReport {
    pub scored: u64,
    /// Flagged items per reason code.
    pub flagged: [u64; 4],
    /// Flagged items that could not be handed to the outbox (unreadable asset, outbox refused).
    pub outbox_errors: u64,
    /// Flagged items handed to the outbox without their embedding, because it held NaN or Inf.
    pub invalid_embeddings: u64,
    /// The first problems met, for the log. An item is named by its request (the position in
    /// the requests given to `process`) and its position in that request.
    pub problems: Vec<String>,
}

/// The batch's results: one per request, in order, and the outbox append still in flight
/// (wait for it before answering when the outbox must be durable first).
pub struct Processed {
    pub results: Vec<Result<Evaluation, String>>,
    pub pending: Option<Ticket>,
    pub items: usize,
    pub report: BatchReport,
}

pub struct Step {
    pub settings: StepSettings,
    /// The model's class names (from `label_file`), to name labels in stored predictions.
    pub class_names: Option<Vec<String>>,
    /// Set when the outbox is open: at load, or later by `open_retrying`'s thread.
    outbox: Arc<OnceLock<Arc<Outbox>>>,
    /// `open_retrying`'s thread, stopped and joined when the step is dropped: a model's
    /// unload may be followed by the backend library's, which the thread must not outlive.
    reopening: Option<Reopening>,
    base_seed: u64,
    batches: AtomicU64,
    groups: Arc<[String]>,
}

struct Reopening {
    stop: Arc<(Mutex<bool>, Condvar)>,
    thread: JoinHandle<()>,
}

/// SplitMix64's finaliser: a different, reproducible seed per batch.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn outbox_config(settings: &StepSettings) -> Option<OutboxConfig> {
    let o = settings.outbox.as_ref()?;
    Some(OutboxConfig {
        max_items: o.max_items,
        max_bytes: o.max_bytes,
        overflow_policy: if o.overflow_policy == "drop_newest" { OverflowPolicy::DropNewest } else { OverflowPolicy::DropLeastUncertain },
        sync: if o.sync_full { SyncMode::Full } else { SyncMode::Normal },
        max_asset_bytes: o.max_asset_bytes,
        max_invalid_share: o.max_invalid_share,
        ..OutboxConfig::new(&o.path)
    })
}

/// The configured outbox, opened (its folder created), or none when the step only scores.
fn open_outbox(settings: &StepSettings) -> Result<Option<Arc<Outbox>>, String> {
    let Some(config) = outbox_config(settings) else { return Ok(None) };
    if let Some(parent) = config.path.parent() {
        std::fs::create_dir_all(parent).map_err(|e| format!("outbox {}: cannot create its folder: {e}", config.path.display()))?;
    }
    Ok(Some(Arc::new(Outbox::open(config).map_err(|e| e.to_string())?)))
}

/// `open_retrying`'s thread: try every `retry_every` until the outbox opens or `stop` is set.
fn reopen(
    settings: &StepSettings,
    slot: &OnceLock<Arc<Outbox>>,
    stop: &(Mutex<bool>, Condvar),
    retry_every: Duration,
    report: &dyn Fn(Result<(), String>),
) {
    let (stopped, wake) = stop;
    loop {
        let guard = stopped.lock().unwrap_or_else(PoisonError::into_inner);
        let (guard, _) = wake.wait_timeout_while(guard, retry_every, |stop| !*stop).unwrap_or_else(PoisonError::into_inner);
        if *guard {
            return;
        }
        drop(guard);
        if let Ok(Some(outbox)) = open_outbox(settings) {
            if slot.set(outbox).is_ok() {
                report(Ok(()));
            }
            return;
        }
    }
}

impl Drop for Step {
    fn drop(&mut self) {
        if let Some(reopening) = self.reopening.take() {
            let (stopped, wake) = &*reopening.stop;
            *stopped.lock().unwrap_or_else(PoisonError::into_inner) = true;
            wake.notify_all();
            let _ = reopening.thread.join(); // at most one open attempt away
        }
    }
}

impl Step {
    /// Read `label_file` (relative to the model repository): one class name per line.
    pub fn read_class_names(settings: &StepSettings, repository: &std::path::Path) -> Result<Option<Vec<String>>, String> {
        let Some(file) = &settings.label_file else { return Ok(None) };
        let path = repository.join(file);
        let text = std::fs::read_to_string(&path)
            .map_err(|e| format!("active_learning step: label_file '{file}': cannot read {} ({e})", path.display()))?;
        let names: Vec<String> = text.lines().map(str::trim).filter(|l| !l.is_empty()).map(String::from).collect();
        if names.is_empty() {
            return Err(format!("active_learning step: label_file '{file}': no class names in {}", path.display()));
        }
        Ok(Some(names))
    }

    /// The step with its outbox opened (its folder created). An outbox that cannot be
    /// opened is an Err: the caller decides whether to serve without it.
    pub fn open(settings: StepSettings) -> Result<Step, String> {
        let outbox = open_outbox(&settings)?;
        Ok(Step::with_outbox(settings, outbox))
    }

    /// The step, serving at once even when its outbox cannot be opened now (a volume not
    /// mounted yet, a file being replaced): flagged items are then counted as outbox errors,
    /// and a thread tries to open it again every `retry_every` until it opens or the step is
    /// dropped. `report` hears of the first failure (`Err`) and of a later success (`Ok`).
    pub fn open_retrying(
        settings: StepSettings,
        retry_every: Duration,
        report: impl Fn(Result<(), String>) + Send + Sync + 'static,
    ) -> Step {
        let error = match open_outbox(&settings) {
            Ok(outbox) => return Step::with_outbox(settings, outbox),
            Err(error) => error,
        };
        report(Err(error));
        let mut step = Step::with_outbox(settings.clone(), None);
        let slot = Arc::clone(&step.outbox);
        let stop = Arc::new((Mutex::new(false), Condvar::new()));
        let (report, stopper) = (Arc::new(report), Arc::clone(&stop));
        let reporter = Arc::clone(&report);
        let retrying = std::thread::Builder::new()
            .name("outbox-reopen".into())
            .spawn(move || reopen(&settings, &slot, &stopper, retry_every, &*reporter));
        match retrying {
            Ok(thread) => step.reopening = Some(Reopening { stop, thread }),
            // The step still serves; only the reopening is lost.
            Err(e) => report(Err(format!("cannot start the thread that reopens the outbox, it will not be retried ({e})"))),
        }
        step
    }

    /// The step with a given outbox (or none: score and flag only).
    pub fn with_outbox(settings: StepSettings, outbox: Option<Arc<Outbox>>) -> Step {
        let base_seed = settings.seed.unwrap_or_else(|| {
            let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0);
            mix(nanos ^ ((std::process::id() as u64) << 32))
        });
        let groups = settings.upload_groups.clone().into();
        let slot = OnceLock::new();
        if let Some(outbox) = outbox {
            let _ = slot.set(outbox);
        }
        Step { settings, class_names: None, outbox: Arc::new(slot), reopening: None, base_seed, batches: AtomicU64::new(0), groups }
    }

    pub fn outbox(&self) -> Option<&Arc<Outbox>> {
        self.outbox.get()
    }

    fn next_seed(&self) -> u64 {
        mix(self.base_seed ^ mix(self.batches.fetch_add(1, Ordering::Relaxed)))
    }

    /// Check a request's shape against the task: Ok((batch, per-item dims)).
    fn check_shape<'s>(&self, shape: &'s [usize]) -> Result<(usize, &'s [usize]), String> {
        let task = self.settings.task;
        let input = &self.settings.scores_input;
        let form = match task {
            Task::Classification => "[B, C]",
            Task::MultiLabel => "[B, L]",
            Task::Detection => "[B, N, C]",
            Task::Segmentation => "[B, C, H, W] or [B, H, W, C]",
        };
        if shape.len() != 1 + task.item_rank() {
            return Err(format!("{input}: task '{}' expects {} dimensions {form}, got shape {shape:?}", task.name(), 1 + task.item_rank()));
        }
        Ok((shape[0], &shape[1..]))
    }

    /// Score and flag one request's items.
    pub fn evaluate(&self, scores: &Scores<'_>, seed: u64) -> Result<Evaluation, String> {
        let s = &self.settings;
        let (batch, dims) = self.check_shape(scores.shape)?;
        let expected: usize = scores.shape.iter().product();
        if scores.values.len() != expected {
            return Err(format!("{}: shape {:?} needs {expected} values, got {}", s.scores_input, scores.shape, scores.values.len()));
        }
        let scoring = kernels::Scoring { strategy: s.strategy, from_logits: s.from_logits, sum_tolerance: s.sum_tolerance as f32, seed };
        let mut out = vec![0f32; batch];
        let x = scores.values;
        let result = match (s.task, dims) {
            (Task::Classification, [c]) => kernels::classification(x, batch, *c, &scoring, &mut out),
            (Task::MultiLabel, [l]) => kernels::multilabel(x, batch, *l, &scoring, s.aggregate, &mut out),
            (Task::Detection, [n, c]) => {
                let det = kernels::Detection {
                    aggregate: s.aggregate,
                    valid_counts: None,
                    box_confidence: None,
                    confidence_floor: s.confidence_floor,
                    empty_score: s.empty_score,
                };
                kernels::detection(x, batch, *n, *c, &scoring, &det, &mut out)
            }
            (Task::Segmentation, [a, b, c]) => {
                let (classes, h, w) = match s.layout {
                    kernels::Layout::ChannelsFirst => (*a, *b, *c),
                    kernels::Layout::ChannelsLast => (*c, *a, *b),
                };
                kernels::segmentation(x, batch, classes, h, w, s.layout, &scoring, s.aggregate, &mut out)
            }
            _ => unreachable!("check_shape fixed the rank"),
        };
        result.map_err(|e| format!("{}: {e}", s.scores_input))?;
        let mut reasons = vec![0u8; batch];
        kernels::flag(&out, s.threshold as f32, s.random_fraction as f32, seed, &mut reasons);
        Ok(Evaluation { scores: out, reasons })
    }

    /// Check a request's boxes against its scores: one [x0, y0, x1, y1] per box.
    pub fn check_boxes(&self, scores: &Scores<'_>, boxes: &Boxes<'_>) -> Result<(), String> {
        let name = self.settings.boxes_input.as_deref().unwrap_or("boxes");
        let expected = [scores.shape.first().copied().unwrap_or(0), scores.shape.get(1).copied().unwrap_or(0), 4];
        if boxes.shape != expected {
            return Err(format!(
                "{name}: expected shape {expected:?} (x0, y0, x1, y1 for each box of {}), got {:?}",
                self.settings.scores_input, boxes.shape
            ));
        }
        if boxes.values.len() != expected.iter().product::<usize>() {
            return Err(format!("{name}: shape {:?} needs {} values, got {}", boxes.shape, expected.iter().product::<usize>(), boxes.values.len()));
        }
        Ok(())
    }

    /// Check a request's embedding against its scores: one vector of 1 to 4096 values per item.
    pub fn check_embedding(&self, scores: &Scores<'_>, embedding: &Embedding<'_>) -> Result<(), String> {
        let name = self.settings.embedding_input.as_deref().unwrap_or("embedding");
        let batch = scores.shape.first().copied().unwrap_or(0);
        match embedding.shape {
            &[b, d] if b == batch && (1..=MAX_EMBEDDING_DIMS).contains(&d) => {}
            shape => {
                return Err(format!(
                    "{name}: expected shape [{batch}, D] (one embedding of D values, 1 <= D <= {MAX_EMBEDDING_DIMS}, per item of {}), got {shape:?}",
                    self.settings.scores_input
                ))
            }
        }
        let expected: usize = embedding.shape.iter().product();
        if embedding.values.len() != expected {
            return Err(format!("{name}: shape {:?} needs {expected} values, got {}", embedding.shape, embedding.values.len()));
        }
        Ok(())
    }

    /// Item `j`'s embedding to store (a copy of its row): None without one, or when it holds
    /// NaN or Inf (counted and reported: the item is stored without it, where the outbox would
    /// refuse the whole append).
    fn embedding_of(&self, request: &StepRequest<'_>, r: usize, j: usize, report: &mut BatchReport) -> Option<Vec<f32>> {
        let embedding = request.embedding.as_ref()?;
        let d = embedding.shape.get(1).copied().unwrap_or(0);
        let row = embedding.values.get(j * d..(j + 1) * d)?;
        if row.iter().all(|v| v.is_finite()) {
            return Some(row.to_vec());
        }
        report.invalid_embeddings += 1;
        if report.problems.len() < 4 {
            let name = self.settings.embedding_input.as_deref().unwrap_or("embedding");
            report.problems.push(format!("request {r}, flagged item {j}: {name} holds NaN or Inf; stored without its embedding"));
        }
        None
    }

    /// The outbox items for one request's flagged items (the asset copied only for them).
    fn flagged_items(
        &self,
        request: &StepRequest<'_>,
        r: usize,
        evaluation: &Evaluation,
        report: &mut BatchReport,
        items: &mut Vec<NewItem>,
    ) {
        let s = &self.settings;
        let Some(assets) = request.assets else { return };
        let dims = &request.scores.shape[1..];
        let per_item: usize = dims.iter().product();
        for (j, &reason) in evaluation.reasons.iter().enumerate() {
            if reason == 0 {
                continue;
            }
            let (asset, media_type) = match assets.asset(j) {
                Ok(found) => found,
                Err(e) => {
                    report.outbox_errors += 1;
                    if report.problems.len() < 4 {
                        report.problems.push(format!("request {r}, flagged item {j}: unusable asset, not stored: {e}"));
                    }
                    continue;
                }
            };
            let values = &request.scores.values[j * per_item..(j + 1) * per_item];
            let per_item_boxes = dims.first().copied().unwrap_or(0) * 4;
            let boxes = request.boxes.as_ref().and_then(|b| b.values.get(j * per_item_boxes..(j + 1) * per_item_boxes));
            items.push(NewItem {
                asset,
                media_type: media_type.to_string(),
                model_name: s.model_name.clone(),
                model_version: request.model_version.clone().unwrap_or_else(|| s.model_version.clone()),
                prediction_json: prediction_json(s.task, s.layout, values, dims, self.class_names.as_deref(), boxes),
                score: evaluation.scores[j] as f64,
                strategy: s.strategy_name.clone(),
                threshold: s.threshold,
                reason: REASONS[reason as usize].to_string(),
                upload_groups: self.groups.clone(),
                embedding: self.embedding_of(request, r, j, report),
            });
        }
    }

    /// Score every request of a dynamic batch (a bad request fails alone), and submit the
    /// flagged items to the outbox in one append.
    pub fn process(&self, requests: &[StepRequest<'_>]) -> Processed {
        let mut report = BatchReport::default();
        let mut items = Vec::new();
        let mut results = Vec::with_capacity(requests.len());
        for (r, request) in requests.iter().enumerate() {
            let evaluation = self.evaluate(&request.scores, self.next_seed()).and_then(|e| match request.assets {
                Some(a) if a.len() != e.scores.len() => Err(format!(
                    "{}: {} assets for {} items of {}",
                    self.settings.asset_input.as_deref().unwrap_or("asset"),
                    a.len(),
                    e.scores.len(),
                    self.settings.scores_input
                )),
                _ => Ok(e),
            });
            let evaluation = match (evaluation, &request.boxes) {
                (Ok(e), Some(boxes)) => self.check_boxes(&request.scores, boxes).map(|()| e),
                (other, _) => other,
            };
            let evaluation = match (evaluation, &request.embedding, &self.settings.embedding_input) {
                (Ok(e), Some(embedding), _) => self.check_embedding(&request.scores, embedding).map(|()| e),
                (Ok(_), None, Some(name)) => Err(format!("missing input '{name}'")),
                (other, _, _) => other,
            };
            if let Ok(e) = &evaluation {
                report.scored += e.scores.len() as u64;
                for &r in &e.reasons {
                    report.flagged[r as usize] += 1;
                }
                if self.outbox().is_some() {
                    self.flagged_items(request, r, e, &mut report, &mut items);
                }
            }
            results.push(evaluation);
        }
        let count = items.len();
        let pending = match (self.outbox(), items.is_empty()) {
            (Some(outbox), false) => match outbox.submit(items) {
                Ok(ticket) => Some(ticket),
                Err(e) => {
                    report.outbox_errors += count as u64;
                    report.problems.push(format!("{count} flagged items not stored: {e}"));
                    None
                }
            },
            _ => None,
        };
        Processed { results, pending, items: count, report }
    }
}

/// Wait for an append; Err is counted by the caller as outbox errors (the items may be lost).
pub fn wait(pending: Ticket, timeout: Duration) -> Result<triton_al_outbox::AppendResult, OutboxError> {
    pending.wait(timeout)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn detection_step() -> Step {
        let params: BTreeMap<String, String> = [("model_name", "m"), ("outbox_path", ""), ("task", "detection"), ("boxes_input", "BOXES"), ("scores_input", "DET")]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Step::with_outbox(StepSettings::from_parameters(&params, None).unwrap(), None)
    }

    #[test]
    fn boxes_of_the_wrong_shape_fail_only_their_request() {
        let step = detection_step();
        let scores = [0.5f32, 0.5, 0.9, 0.1];
        let shape = [1usize, 2, 2];
        let cases: [(&[f32], &[usize]); 3] = [(&[0.0; 8], &[1, 2, 4]), (&[0.0; 6], &[1, 2, 3]), (&[0.0; 6], &[1, 6])];
        let requests: Vec<StepRequest<'_>> = cases
            .iter()
            .map(|&(values, box_shape)| StepRequest {
                scores: Scores { values: &scores, shape: &shape },
                assets: None,
                boxes: Some(Boxes { values, shape: box_shape }),
                embedding: None,
                model_version: None,
            })
            .collect();
        let processed = step.process(&requests);
        assert!(processed.results[0].is_ok());
        assert_eq!(
            processed.results[1].as_ref().unwrap_err(),
            "BOXES: expected shape [1, 2, 4] (x0, y0, x1, y1 for each box of DET), got [1, 2, 3]"
        );
        assert_eq!(processed.results[2].as_ref().unwrap_err(), "BOXES: expected shape [1, 2, 4] (x0, y0, x1, y1 for each box of DET), got [1, 6]");
        assert_eq!(processed.report.scored, 1);
    }

    fn embedding_step() -> Step {
        let params: BTreeMap<String, String> = [("model_name", "m"), ("outbox_path", ""), ("embedding_input", "EMB"), ("threshold", "0.5")]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Step::with_outbox(StepSettings::from_parameters(&params, None).unwrap(), None)
    }

    /// One PNG-looking asset per item.
    struct ItemAssets(usize);

    impl Assets for ItemAssets {
        fn len(&self) -> usize {
            self.0
        }

        fn asset(&self, index: usize) -> Result<(Vec<u8>, &'static str), String> {
            let mut data = b"\x89PNG\r\n\x1a\n".to_vec();
            data.extend_from_slice(format!("item {index}").as_bytes());
            Ok((data, "image/png"))
        }
    }

    #[test]
    fn embeddings_of_the_wrong_shape_or_missing_fail_only_their_request_naming_the_input() {
        let step = embedding_step();
        let scores = [0.5f32, 0.5, 0.9, 0.1];
        let shape = [2usize, 2];
        let long = vec![0f32; 2 * 4097];
        let cases: [(&[f32], &[usize]); 6] =
            [(&[0.0; 6], &[2, 3]), (&[0.0; 6], &[2, 3, 1]), (&[0.0; 6], &[3, 2]), (&[], &[2, 0]), (&long, &[2, 4097]), (&[0.0; 5], &[2, 3])];
        let mut requests: Vec<StepRequest<'_>> = cases
            .iter()
            .map(|&(values, embedding_shape)| StepRequest {
                scores: Scores { values: &scores, shape: &shape },
                assets: None,
                boxes: None,
                embedding: Some(Embedding { values, shape: embedding_shape }),
                model_version: None,
            })
            .collect();
        requests.push(StepRequest { scores: Scores { values: &scores, shape: &shape }, assets: None, boxes: None, embedding: None, model_version: None });
        let processed = step.process(&requests);
        assert!(processed.results[0].is_ok());
        let errors: Vec<&str> = processed.results[1..].iter().map(|r| r.as_ref().unwrap_err().as_str()).collect();
        let expected = |got: &str| format!("EMB: expected shape [2, D] (one embedding of D values, 1 <= D <= 4096, per item of PROBS), got {got}");
        assert_eq!(
            errors,
            [
                expected("[2, 3, 1]").as_str(),
                expected("[3, 2]").as_str(),
                expected("[2, 0]").as_str(),
                expected("[2, 4097]").as_str(),
                "EMB: shape [2, 3] needs 6 values, got 5",
                "missing input 'EMB'",
            ]
        );
        assert_eq!(processed.report.scored, 2);
    }

    #[test]
    fn only_flagged_items_get_a_copy_of_their_embedding_and_nan_or_inf_leaves_it_out() {
        let step = embedding_step();
        // Items 0, 2 and 3 are uncertain (flagged); 1 is certain.
        let scores = [0.5f32, 0.5, 0.99, 0.01, 0.5, 0.5, 0.6, 0.4];
        let shape = [4usize, 2];
        let embedding = [1.0f32, 2.0, 3.0, 4.0, 5.0, f32::NAN, 7.0, 8.0];
        let assets = ItemAssets(4);
        let request = StepRequest {
            scores: Scores { values: &scores, shape: &shape },
            assets: Some(&assets),
            boxes: None,
            embedding: Some(Embedding { values: &embedding, shape: &[4, 2] }),
            model_version: None,
        };
        let evaluation = step.evaluate(&request.scores, 1).unwrap();
        assert_eq!(evaluation.reasons.iter().map(|&r| r != 0).collect::<Vec<_>>(), [true, false, true, true]);
        let mut report = BatchReport::default();
        let mut items = Vec::new();
        step.flagged_items(&request, 3, &evaluation, &mut report, &mut items);
        let stored: Vec<Option<Vec<f32>>> = items.into_iter().map(|item| item.embedding).collect();
        assert_eq!(stored, [Some(vec![1.0, 2.0]), None, Some(vec![7.0, 8.0])]);
        assert_eq!(report.invalid_embeddings, 1);
        assert_eq!(report.problems, ["request 3, flagged item 2: EMB holds NaN or Inf; stored without its embedding"]);
        assert_eq!(report.outbox_errors, 0);
    }

    #[test]
    fn boxes_need_the_detection_task() {
        let params: BTreeMap<String, String> =
            [("model_name", "m"), ("outbox_path", ""), ("boxes_input", "BOXES")].into_iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let error = StepSettings::from_parameters(&params, None).unwrap_err();
        assert_eq!(error, "active_learning step: bad parameter value(s): boxes_input: only task 'detection' has boxes (the task is 'classification')");
    }
}
