//! The step's custom metrics in Triton's own /metrics, with the names the Python step uses:
//! `triton_al_items_scored_total`, `triton_al_items_flagged_total{reason}`,
//! `triton_al_outbox_errors_total`, `triton_al_invalid_embeddings_total`, and the score
//! distribution as cumulative
//! `triton_al_score_bucket{le}` counters (0.01 wide), `_count` and `_sum`.
//!
//! Requests only add to plain counters under a short lock; a thread hands the deltas to
//! Triton once a second, so the cumulative buckets (up to 101 increments per score) never
//! cost anything on the request path.

use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use triton_al_step::REASONS;

use crate::triton::{Metric, MetricFamily};

const BUCKETS: usize = 100; // le = 0.01 .. 1.00, then +Inf
const FLUSH: Duration = Duration::from_secs(1);

/// What happened since the last flush.
#[derive(Default)]
struct Pending {
    scored: u64,
    flagged: [u64; 4],
    outbox_errors: u64,
    invalid_embeddings: u64,
    /// Scores per bucket, not cumulative: index i holds (bound[i-1], bound[i]], the last one > 1.
    bins: Vec<u64>,
    finite: u64,
    sum: f64,
}

struct Families {
    scored: MetricFamily,
    flagged: MetricFamily,
    errors: MetricFamily,
    invalid_embeddings: MetricFamily,
    bucket: MetricFamily,
    count: MetricFamily,
    sum: MetricFamily,
}

fn families() -> Result<&'static Families, String> {
    static FAMILIES: std::sync::OnceLock<Result<Families, String>> = std::sync::OnceLock::new();
    FAMILIES
        .get_or_init(|| {
            Ok(Families {
                scored: MetricFamily::counter("triton_al_items_scored_total", "Items scored by the active_learning step")?,
                flagged: MetricFamily::counter("triton_al_items_flagged_total", "Items flagged, by reason")?,
                errors: MetricFamily::counter("triton_al_outbox_errors_total", "Flagged items the outbox could not take")?,
                invalid_embeddings: MetricFamily::counter(
                    "triton_al_invalid_embeddings_total",
                    "Flagged items stored without their embedding because it held NaN or Inf",
                )?,
                bucket: MetricFamily::counter("triton_al_score_bucket", "Scores (confidence in [0, 1]) at or below le, cumulative")?,
                count: MetricFamily::counter("triton_al_score_count", "Scores observed")?,
                sum: MetricFamily::counter("triton_al_score_sum", "Sum of the scores observed")?,
            })
        })
        .as_ref()
        .map_err(Clone::clone)
}

struct Exported {
    scored: Metric,
    flagged: Vec<Metric>,
    errors: Metric,
    invalid_embeddings: Metric,
    buckets: Vec<Metric>,
    count: Metric,
    sum: Metric,
}

impl Exported {
    fn new(model: &str) -> Result<Exported, String> {
        let f = families()?;
        let labels = [("model", model)];
        let buckets = (1..=BUCKETS)
            .map(|i| format!("{}", i as f64 / 100.0))
            .chain(std::iter::once("+Inf".to_string()))
            .map(|le| f.bucket.metric(&[("model", model), ("le", &le)]))
            .collect::<Result<_, _>>()?;
        Ok(Exported {
            scored: f.scored.metric(&labels)?,
            flagged: REASONS[1..].iter().map(|r| f.flagged.metric(&[("model", model), ("reason", r)])).collect::<Result<_, _>>()?,
            errors: f.errors.metric(&labels)?,
            invalid_embeddings: f.invalid_embeddings.metric(&labels)?,
            buckets,
            count: f.count.metric(&labels)?,
            sum: f.sum.metric(&labels)?,
        })
    }

    fn add(&self, p: &Pending) -> Result<(), String> {
        if p.scored > 0 {
            self.scored.increment(p.scored as f64)?;
        }
        for (metric, &n) in self.flagged.iter().zip(&p.flagged[1..]) {
            if n > 0 {
                metric.increment(n as f64)?;
            }
        }
        if p.outbox_errors > 0 {
            self.errors.increment(p.outbox_errors as f64)?;
        }
        if p.invalid_embeddings > 0 {
            self.invalid_embeddings.increment(p.invalid_embeddings as f64)?;
        }
        if p.finite > 0 {
            let mut cumulative = 0;
            for (metric, &n) in self.buckets.iter().zip(&p.bins) {
                cumulative += n;
                if cumulative > 0 {
                    metric.increment(cumulative as f64)?;
                }
            }
            self.count.increment(p.finite as f64)?;
            self.sum.increment(p.sum)?;
        }
        Ok(())
    }
}

struct Shared {
    pending: Mutex<(Pending, bool)>, // (what to hand over, stop)
    wake: Condvar,
}

/// One model's metrics; dropping it stops the flush thread after a last flush.
pub struct StepMetrics {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

fn bucket_of(score: f32) -> usize {
    // Bucket i holds (i/100, (i+1)/100]; a score of exactly 0 goes to the first one.
    ((score as f64 * 100.0).ceil() as usize).saturating_sub(1).min(BUCKETS)
}

impl StepMetrics {
    /// Metrics labelled `model`; Err when Triton refuses them (the step then runs without).
    pub fn start(model: &str) -> Result<StepMetrics, String> {
        let exported = Exported::new(model)?;
        let shared = Arc::new(Shared { pending: Mutex::new((Pending { bins: vec![0; BUCKETS + 1], ..Pending::default() }, false)), wake: Condvar::new() });
        let thread_shared = shared.clone();
        let thread = std::thread::Builder::new()
            .name("triton-al-metrics".into())
            .spawn(move || flush_loop(&thread_shared, &exported))
            .map_err(|e| format!("cannot start the metrics thread: {e}"))?;
        Ok(StepMetrics { shared, thread: Some(thread) })
    }

    pub fn observe(&self, scores: &[f32], reasons: &[u8]) {
        let Ok(mut guard) = self.shared.pending.lock() else { return };
        let p = &mut guard.0;
        p.scored += scores.len() as u64;
        for &r in reasons {
            p.flagged[(r as usize).min(3)] += 1;
        }
        for &s in scores {
            if s.is_finite() {
                p.bins[bucket_of(s)] += 1;
                p.finite += 1;
                p.sum += s as f64;
            }
        }
    }

    pub fn outbox_errors(&self, n: u64) {
        if let Ok(mut guard) = self.shared.pending.lock() {
            guard.0.outbox_errors += n;
        }
    }

    pub fn invalid_embeddings(&self, n: u64) {
        if let Ok(mut guard) = self.shared.pending.lock() {
            guard.0.invalid_embeddings += n;
        }
    }
}

fn flush_loop(shared: &Shared, exported: &Exported) {
    loop {
        let (taken, stop) = {
            let Ok(guard) = shared.pending.lock() else { return };
            let Ok((mut guard, _)) = shared.wake.wait_timeout_while(guard, FLUSH, |(_, stop)| !*stop) else { return };
            let empty = Pending { bins: vec![0; BUCKETS + 1], ..Pending::default() };
            (std::mem::replace(&mut guard.0, empty), guard.1)
        };
        if let Err(e) = exported.add(&taken) {
            crate::triton::log_error!("active_learning: could not update metrics: {e}");
        }
        if stop {
            return;
        }
    }
}

impl Drop for StepMetrics {
    fn drop(&mut self) {
        if let Ok(mut guard) = self.shared.pending.lock() {
            guard.1 = true;
        }
        self.shared.wake.notify_all();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
