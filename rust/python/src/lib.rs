//! `triton_al._core`: the thin PyO3 face of `triton-al-kernels`.
//!
//! Everything Python-specific lives here and nothing else does: numpy arrays in (no copy for
//! C-contiguous float32), argument parsing with errors that name the argument, the GIL
//! released around big computations, numpy arrays out, and no panic ever crossing into
//! Python (it becomes a RuntimeError instead of an uncatchable PanicException).

mod convert;
mod options;
mod outbox;
mod step;

use numpy::{PyArray1, PyReadonlyArray1, PyReadonlyArray2, PyUntypedArrayMethods};
use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyDict;
use triton_al_kernels as kernels;

use crate::convert::Floats;
use crate::options::{parse_task, Task, TaskOptions, TaskShape};

/// Inputs smaller than this are scored without releasing the GIL: releasing and re-taking
/// it costs more than the work (the 1x10 call is about a microsecond).
const DETACH_MIN_ELEMENTS: usize = 1 << 14;

fn kernel_error(e: kernels::KernelError) -> PyErr {
    PyValueError::new_err(e.0)
}

/// Run `f`, releasing the GIL for big inputs, and turn a panic into a RuntimeError.
fn run<T: Send>(py: Python<'_>, elements: usize, f: impl FnOnce() -> T + Send) -> PyResult<T> {
    let guarded = || std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    let result = if elements >= DETACH_MIN_ELEMENTS { py.detach(guarded) } else { guarded() };
    result.map_err(|panic| {
        let what = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".into());
        PyRuntimeError::new_err(format!("triton_al internal error (please report): {what}"))
    })
}

/// Score model outputs: one confidence in [0, 1] per item, float32 of shape [B].
///
/// Args:
///     outputs: float16/32/64 array (any memory order; C-contiguous float32 is not copied).
///         classification ``[B, C]``; multilabel ``[B, L]``; detection ``[B, N, C]``;
///         segmentation ``[B, C, H, W]`` (``layout="nchw"``) or ``[B, H, W, C]`` (``"nhwc"``).
///     strategy: ``entropy`` (default), ``least_confidence``, ``margin``, ``ratio`` or ``random``.
///     task: ``classification`` (default), ``multilabel``, ``detection`` or ``segmentation``.
///     from_logits: the outputs are logits (softmax, or sigmoid for multilabel, is fused in).
///     **task_options:
///         sum_tolerance (all, default 0.01): a probability row whose sum is further from 1 is
///             invalid; rows within it are renormalised.
///         seed (all): seed of the ``random`` strategy.
///         aggregate: multilabel ``min`` (default) | ``mean``; detection ``min`` (default) |
///             ``mean`` | ``least_confident_mean`` (with ``k``, default 3); segmentation
///             ``mean`` (default) | ``min`` | ``quantile`` (with ``quantile``, default 0.1).
///         valid_counts (detection): ``[B]`` leading boxes per image that are real (padding after).
///         box_confidence (detection): ``[B, N]`` detection confidence per box (default: the
///             box's top class probability).
///         confidence_floor (detection, default 0): boxes below it are ignored.
///         empty_score (detection, default 1.0): score of an image with no boxes left — certain,
///             so not flagged; set 0 to send images where the model found nothing.
///         layout (segmentation): ``nchw`` (default) or ``nhwc``.
///
/// Returns NaN for an item whose output is invalid; raises ValueError/TypeError naming the
/// argument for a wrong shape, dtype or option.
#[pyfunction]
#[pyo3(signature = (outputs, *, strategy = "entropy", task = "classification", from_logits = false, **task_options))]
fn score<'py>(
    py: Python<'py>,
    outputs: &Bound<'py, PyAny>,
    strategy: &str,
    task: &str,
    from_logits: bool,
    task_options: Option<&Bound<'py, PyDict>>,
) -> PyResult<Bound<'py, PyArray1<f32>>> {
    let task = parse_task(task)?;
    let strategy = kernels::Strategy::parse(strategy).ok_or_else(|| {
        let names: Vec<_> = kernels::Strategy::ALL.iter().map(|(n, _)| *n).collect();
        PyValueError::new_err(format!("strategy: expected one of {names:?}, got {strategy:?}"))
    })?;
    let opts = TaskOptions::parse(py, task, task_options)?;
    let scoring = kernels::Scoring { strategy, from_logits, sum_tolerance: opts.sum_tolerance, seed: opts.seed };

    let array = convert::as_float_array(py, outputs)?;
    let shape = array.shape().to_vec();
    task.check_ndim(&shape)?;
    // Softmax tasks shift float64 logits by their row maximum before narrowing to float32,
    // so nearby large logits (1e4 + 1e-3) keep their differences.
    let shift_axis = (from_logits && task.is_softmax()).then(|| task.class_axis(&opts));
    let x: Floats<'_> = convert::to_f32(&array, shift_axis)?;
    let batch = shape[0];
    let mut out = vec![0.0f32; batch];
    let data = x.as_slice();
    let result = match task {
        Task::Classification => run(py, data.len(), || kernels::classification(data, batch, shape[1], &scoring, &mut out))?,
        Task::MultiLabel => {
            run(py, data.len(), || kernels::multilabel(data, batch, shape[1], &scoring, opts.aggregate, &mut out))?
        }
        Task::Detection => {
            let (boxes, classes) = (shape[1], shape[2]);
            let confidence = opts.box_confidence(py, batch, boxes)?;
            let counts = opts.valid_counts(batch)?;
            let det = kernels::Detection {
                aggregate: opts.aggregate,
                valid_counts: counts.as_deref(),
                box_confidence: confidence.as_ref().map(|c| c.as_slice()),
                confidence_floor: opts.confidence_floor,
                empty_score: opts.empty_score,
            };
            run(py, data.len(), || kernels::detection(data, batch, boxes, classes, &scoring, &det, &mut out))?
        }
        Task::Segmentation => {
            let (c, h, w) = match opts.layout {
                kernels::Layout::ChannelsFirst => (shape[1], shape[2], shape[3]),
                kernels::Layout::ChannelsLast => (shape[3], shape[1], shape[2]),
            };
            run(py, data.len(), || {
                kernels::segmentation(data, batch, c, h, w, opts.layout, &scoring, opts.aggregate, &mut out)
            })?
        }
    };
    result.map_err(kernel_error)?;
    Ok(PyArray1::from_vec(py, out))
}

/// Reasons per item as uint8 codes: 0 none, 1 uncertain (score < threshold), 2 invalid output
/// (score NaN), 3 drawn by the random share. Flagged = code != 0.
#[pyfunction]
#[pyo3(signature = (scores, threshold, *, random_fraction = 0.0, seed = 0))]
fn flag<'py>(
    py: Python<'py>,
    scores: PyReadonlyArray1<'py, f32>,
    threshold: f32,
    random_fraction: f32,
    seed: u64,
) -> PyResult<Bound<'py, PyArray1<u8>>> {
    if !(0.0..=1.0).contains(&threshold) {
        return Err(PyValueError::new_err(format!("threshold: expected a value in [0, 1], got {threshold}")));
    }
    if !(0.0..=1.0).contains(&random_fraction) {
        return Err(PyValueError::new_err(format!("random_fraction: expected a value in [0, 1], got {random_fraction}")));
    }
    let owned;
    let s: &[f32] = match scores.as_slice() {
        Ok(s) => s,
        Err(_) => {
            owned = scores.as_array().to_vec();
            &owned
        }
    };
    let mut reasons = vec![0u8; s.len()];
    run(py, s.len(), || kernels::flag(s, threshold, random_fraction, seed, &mut reasons))?;
    Ok(PyArray1::from_vec(py, reasons))
}

/// The SIMD level in use ("avx512", "avx2" or "portable").
/// The position and Hamming distance (bits) of the entry of ``hashes`` (1-D uint64,
/// C-contiguous) nearest to ``h``, the first of equals; ``None`` when ``hashes`` is empty.
/// The near-duplicate lookup of the uploader (a linear scan; the GIL is released for big ones).
#[pyfunction]
fn nearest_hamming(py: Python<'_>, hashes: PyReadonlyArray1<'_, u64>, h: u64) -> PyResult<Option<(usize, u32)>> {
    let slice = hashes
        .as_slice()
        .map_err(|_| PyValueError::new_err("hashes: expected a C-contiguous 1-D uint64 array"))?;
    run(py, slice.len(), || kernels::nearest_hamming(slice, h))
}

/// The position and distance (bits) of the row of ``rows`` nearest to ``h``, the first of
/// equals; ``None`` when ``rows`` has no row. ``rows``: 2-D uint64, C-contiguous, one hash (or
/// ``parts`` hashes side by side) per row; ``h``: 1-D uint64 of the row's width. With ``parts``
/// > 1 a row's distance is the smallest over its hashes (each compared with the same slice of
/// ``h``). The near-duplicate lookup of the uploader; the GIL is released for big ones.
#[pyfunction]
#[pyo3(signature = (rows, h, parts = 1))]
fn nearest_hamming_rows(py: Python<'_>, rows: PyReadonlyArray2<'_, u64>, h: PyReadonlyArray1<'_, u64>, parts: usize) -> PyResult<Option<(usize, u32)>> {
    let width = rows.shape()[1];
    let slice = rows
        .as_slice()
        .map_err(|_| PyValueError::new_err("rows: expected a C-contiguous 2-D uint64 array"))?;
    let query = h.as_slice().map_err(|_| PyValueError::new_err("h: expected a C-contiguous 1-D uint64 array"))?;
    run(py, slice.len(), || kernels::nearest_hamming_rows(slice, width, parts, query))?.map_err(kernel_error)
}

/// The nearest row of ``rows`` (as ``nearest_hamming_rows``) among those within
/// ``max_distance`` bits of ``h``, or ``None``. ``lead``: 2-D uint64 ``[len(rows), parts]``, the
/// first word of each of a row's hashes, kept beside ``rows`` so that the scan reads ``parts``
/// words per row and only the few rows that may be within the distance in full.
#[pyfunction]
#[pyo3(signature = (rows, lead, h, parts, max_distance))]
fn nearest_hamming_within(
    py: Python<'_>,
    rows: PyReadonlyArray2<'_, u64>,
    lead: PyReadonlyArray2<'_, u64>,
    h: PyReadonlyArray1<'_, u64>,
    parts: usize,
    max_distance: u32,
) -> PyResult<Option<(usize, u32)>> {
    let width = rows.shape()[1];
    let slice = rows
        .as_slice()
        .map_err(|_| PyValueError::new_err("rows: expected a C-contiguous 2-D uint64 array"))?;
    let heads = lead
        .as_slice()
        .map_err(|_| PyValueError::new_err("lead: expected a C-contiguous 2-D uint64 array"))?;
    let query = h.as_slice().map_err(|_| PyValueError::new_err("h: expected a C-contiguous 1-D uint64 array"))?;
    run(py, heads.len(), || kernels::nearest_hamming_within(slice, heads, width, parts, query, max_distance))?.map_err(kernel_error)
}

#[pyfunction]
fn simd_level() -> &'static str {
    kernels::level().name()
}

/// Threads used for big inputs (`TRITON_AL_NUM_THREADS`, default: CPUs available).
#[pyfunction]
fn num_threads() -> usize {
    kernels::configured_threads()
}

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(score, m)?)?;
    m.add_function(wrap_pyfunction!(flag, m)?)?;
    m.add_function(wrap_pyfunction!(simd_level, m)?)?;
    m.add_function(wrap_pyfunction!(nearest_hamming, m)?)?;
    m.add_function(wrap_pyfunction!(nearest_hamming_rows, m)?)?;
    m.add_function(wrap_pyfunction!(nearest_hamming_within, m)?)?;
    m.add_function(wrap_pyfunction!(num_threads, m)?)?;
    m.add_function(wrap_pyfunction!(step::parse_step_parameters, m)?)?;
    m.add_function(wrap_pyfunction!(step::prediction_json, m)?)?;
    m.add_class::<outbox::OutboxWriter>()?;
    m.add("OUTBOX_SCHEMA", triton_al_outbox::SCHEMA)?;
    m.add("OUTBOX_SCHEMA_VERSION", triton_al_outbox::SCHEMA_VERSION)?;
    m.add("OUTBOX_PAGE_SIZE", triton_al_outbox::NEW_FILE_PAGE_SIZE)?;
    m.add("OUTBOX_MAX_EMBEDDING_DIMS", triton_al_outbox::MAX_EMBEDDING_DIMS)?;
    // {version: [(table, column definition), ...]}: what opening an older file adds.
    let migrations = PyDict::new(m.py());
    for (from, columns) in triton_al_outbox::MIGRATIONS {
        migrations.set_item(from, columns.to_vec())?;
    }
    m.add("OUTBOX_MIGRATIONS", migrations)?;
    // [(trigger, create, once), ...]: what opening a current file adds when it lacks it.
    m.add("OUTBOX_UPGRADES", triton_al_outbox::UPGRADES.to_vec())?;
    m.add("PARALLEL_MIN_ELEMENTS", kernels::PARALLEL_MIN_ELEMENTS)?;
    Ok(())
}

// Keep the untyped-array trait in scope for `.shape()` on readonly arrays.
#[allow(unused_imports)]
use PyUntypedArrayMethods as _;
