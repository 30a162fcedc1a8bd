//! `OutboxWriter`: the Python step's face of the one outbox writer (`triton-al-outbox`), the
//! same code the native Triton backend appends with. Its errors become the exceptions of
//! `triton_al.outbox` (this is the one place that maps them).

use std::sync::Arc;
use std::time::Duration;

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use triton_al_outbox::{NewItem, Outbox, OutboxConfig, OutboxError, OverflowPolicy, SyncMode};

use crate::convert::embedding_values;

fn to_python(py: Python<'_>, error: OutboxError) -> PyErr {
    let class = match &error {
        OutboxError::Invalid(message) => return PyValueError::new_err(message.clone()),
        OutboxError::Busy(_) => "OutboxBusy",
        OutboxError::Full(_) => "OutboxFull",
        OutboxError::Other(_) => "OutboxError",
    };
    match py.import("triton_al.outbox").and_then(|m| m.getattr(class)).and_then(|c| c.call1((error.message(),))) {
        Ok(exception) => PyErr::from_value(exception),
        Err(import_failed) => import_failed,
    }
}

/// One flagged item as the Python step hands it over: (asset, media_type, model_name,
/// model_version, prediction_json, score, strategy, threshold, reason, upload_groups,
/// embedding or None: any 1-D sequence of numbers).
type ItemTuple<'py> = (Vec<u8>, String, String, String, String, f64, String, f64, String, Vec<String>, Option<Bound<'py, PyAny>>);

#[pyclass(frozen, module = "triton_al._core")]
pub struct OutboxWriter {
    outbox: Outbox,
}

#[pymethods]
impl OutboxWriter {
    #[new]
    #[pyo3(signature = (path, *, max_items, max_bytes, overflow_policy, durable, busy_timeout_s, max_asset_bytes, max_invalid_share = 0.1))]
    fn new(
        py: Python<'_>,
        path: std::path::PathBuf,
        max_items: u64,
        max_bytes: u64,
        overflow_policy: &str,
        durable: bool,
        busy_timeout_s: f64,
        max_asset_bytes: u64,
        max_invalid_share: f64,
    ) -> PyResult<Self> {
        let overflow_policy: OverflowPolicy = overflow_policy.parse().map_err(PyValueError::new_err)?;
        let config = OutboxConfig {
            max_items,
            max_bytes,
            overflow_policy,
            sync: if durable { SyncMode::Full } else { SyncMode::Normal },
            busy_timeout: Duration::try_from_secs_f64(busy_timeout_s).map_err(|e| PyValueError::new_err(format!("busy_timeout_s: {e}")))?,
            max_asset_bytes,
            max_invalid_share,
            ..OutboxConfig::new(path)
        };
        let outbox = py.detach(|| Outbox::open(config)).map_err(|e| to_python(py, e))?;
        Ok(OutboxWriter { outbox })
    }

    /// Append flagged items (one row per item and upload group); returns (accepted,
    /// duplicates, dropped, refused). Waits, without the GIL, until they are stored (and
    /// flushed, when durable) or `timeout_s` passes.
    fn append<'py>(&self, py: Python<'py>, items: Vec<ItemTuple<'py>>, timeout_s: f64) -> PyResult<(u64, u64, u64, u64)> {
        let items = items
            .into_iter()
            .enumerate()
            .map(|(index, (asset, media_type, model_name, model_version, prediction_json, score, strategy, threshold, reason, groups, embedding))| {
                let embedding = match embedding.filter(|e| !e.is_none()) {
                    None => None,
                    Some(values) => Some(embedding_values(py, &values).map_err(|e| {
                        PyValueError::new_err(format!("outbox {}: item {index}: {}", self.outbox.path().display(), e.value(py)))
                    })?),
                };
                Ok(NewItem {
                    asset,
                    media_type,
                    model_name,
                    model_version,
                    prediction_json,
                    score,
                    strategy,
                    threshold,
                    reason,
                    upload_groups: Arc::from(groups),
                    embedding,
                })
            })
            .collect::<PyResult<Vec<NewItem>>>()?;
        let timeout = Duration::try_from_secs_f64(timeout_s).map_err(|e| PyValueError::new_err(format!("timeout_s: {e}")))?;
        let result = py.detach(|| self.outbox.append(items, timeout)).map_err(|e| to_python(py, e))?;
        Ok((result.accepted, result.duplicates, result.dropped, result.refused))
    }

    /// (transactions, flushes, appends) since the writer started.
    fn stats(&self) -> (u64, u64, u64) {
        let s = self.outbox.stats();
        (s.transactions, s.flushes, s.appends)
    }

    /// Store what was handed over, then stop the writer thread (idempotent).
    fn close(&self, py: Python<'_>) {
        py.detach(|| self.outbox.close());
    }
}

