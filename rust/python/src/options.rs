//! Parsing `task=` and `**task_options` into kernel options, with errors that name the
//! option, what was expected and what was found.

use numpy::{PyArrayMethods, PyUntypedArrayMethods};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyDict;
use triton_al_kernels::{Aggregate, Layout};

use crate::convert;

pub use triton_al_kernels::Task;

/// The task named by `task=`; "multi_label" and "multi-label" are common spellings of multilabel.
pub fn parse_task(name: &str) -> PyResult<Task> {
    Task::parse(&name.replace(['_', '-'], "")).ok_or_else(|| {
        let names: Vec<_> = Task::ALL.iter().map(|(n, _)| *n).collect();
        PyValueError::new_err(format!("task: expected one of {names:?}, got {name:?}"))
    })
}

/// What the Python face needs to know of a task beyond the kernels.
pub trait TaskShape {
    fn is_softmax(self) -> bool;
    fn class_axis(self, opts: &TaskOptions) -> usize;
    fn check_ndim(self, shape: &[usize]) -> PyResult<()>;
    fn allowed_options(self) -> &'static [&'static str];
}

impl TaskShape for Task {
    /// Softmax over a class axis (multi-label uses per-label sigmoids instead).
    fn is_softmax(self) -> bool {
        self != Task::MultiLabel
    }

    fn class_axis(self, opts: &TaskOptions) -> usize {
        match (self, opts.layout) {
            (Task::Segmentation, Layout::ChannelsFirst) => 1,
            (Task::Segmentation, Layout::ChannelsLast) => 3,
            (Task::Detection, _) => 2,
            _ => 1,
        }
    }

    fn check_ndim(self, shape: &[usize]) -> PyResult<()> {
        let (ndim, form) = match self {
            Task::Classification => (2, "[B, C]"),
            Task::MultiLabel => (2, "[B, L]"),
            Task::Detection => (3, "[B, N, C]"),
            Task::Segmentation => (4, "[B, C, H, W] (layout='nchw') or [B, H, W, C] (layout='nhwc')"),
        };
        if shape.len() != ndim {
            return Err(PyValueError::new_err(format!(
                "outputs: task {:?} expects {ndim} dimensions {form}, got shape {shape:?}",
                self.name()
            )));
        }
        Ok(())
    }

    fn allowed_options(self) -> &'static [&'static str] {
        match self {
            Task::Classification => &["sum_tolerance", "seed"],
            Task::MultiLabel => &["sum_tolerance", "seed", "aggregate"],
            Task::Detection => &[
                "sum_tolerance",
                "seed",
                "aggregate",
                "k",
                "valid_counts",
                "box_confidence",
                "confidence_floor",
                "empty_score",
            ],
            Task::Segmentation => &["sum_tolerance", "seed", "aggregate", "quantile", "layout"],
        }
    }
}

/// Parsed task options (defaults documented in `triton_al.score`).
pub struct TaskOptions<'py> {
    pub sum_tolerance: f32,
    pub seed: u64,
    pub aggregate: Aggregate,
    pub layout: Layout,
    pub confidence_floor: f32,
    pub empty_score: f32,
    valid_counts: Option<Bound<'py, PyAny>>,
    box_confidence: Option<Bound<'py, PyAny>>,
}

fn extract<'py, T: for<'a> FromPyObject<'a, 'py>>(v: &Bound<'py, PyAny>, name: &str, expected: &str) -> PyResult<T> {
    v.extract::<T>().map_err(|_| PyTypeError::new_err(format!("{name}: expected {expected}, got {}", v.repr().map(|r| r.to_string()).unwrap_or_default())))
}

impl<'py> TaskOptions<'py> {
    pub fn parse(_py: Python<'py>, task: Task, options: Option<&Bound<'py, PyDict>>) -> PyResult<Self> {
        let mut o = TaskOptions {
            sum_tolerance: 1e-2,
            seed: 0,
            aggregate: match task {
                Task::Segmentation => Aggregate::Mean,
                _ => Aggregate::Min,
            },
            layout: Layout::ChannelsFirst,
            confidence_floor: 0.0,
            empty_score: 1.0,
            valid_counts: None,
            box_confidence: None,
        };
        let Some(options) = options else { return Ok(o) };
        let allowed = task.allowed_options();
        let mut aggregate_name: Option<String> = None;
        let mut k: usize = 3;
        let mut quantile: f32 = 0.1;
        for (key, value) in options.iter() {
            let key: String = key.extract()?;
            if !allowed.contains(&key.as_str()) {
                return Err(PyValueError::new_err(format!(
                    "{key}: not an option of task {:?}; expected one of {allowed:?}",
                    task.name()
                )));
            }
            if value.is_none() {
                continue; // None means "the default", so configs can pass every key.
            }
            match key.as_str() {
                "sum_tolerance" => o.sum_tolerance = extract(&value, &key, "a number")?,
                "seed" => o.seed = extract(&value, &key, "a non-negative integer")?,
                "aggregate" => aggregate_name = Some(extract(&value, &key, "a string")?),
                "k" => k = extract(&value, &key, "a positive integer")?,
                "quantile" => quantile = extract(&value, &key, "a number in [0, 1]")?,
                "confidence_floor" => o.confidence_floor = extract(&value, &key, "a number")?,
                "empty_score" => o.empty_score = extract(&value, &key, "a number in [0, 1]")?,
                "layout" => {
                    let name: String = extract(&value, &key, "'nchw' or 'nhwc'")?;
                    o.layout = match name.to_ascii_lowercase().as_str() {
                        "nchw" | "channels_first" => Layout::ChannelsFirst,
                        "nhwc" | "channels_last" => Layout::ChannelsLast,
                        _ => return Err(PyValueError::new_err(format!("layout: expected 'nchw' or 'nhwc', got {name:?}"))),
                    }
                }
                "valid_counts" => o.valid_counts = Some(value.clone()),
                "box_confidence" => o.box_confidence = Some(value.clone()),
                _ => unreachable!("checked against allowed options"),
            }
        }
        if !(o.sum_tolerance >= 0.0) {
            return Err(PyValueError::new_err(format!("sum_tolerance: expected a non-negative number, got {}", o.sum_tolerance)));
        }
        if let Some(name) = aggregate_name {
            o.aggregate = match name.as_str() {
                "min" => Aggregate::Min,
                "mean" => Aggregate::Mean,
                "least_confident_mean" => Aggregate::LeastConfidentMean(k),
                "quantile" => Aggregate::Quantile(quantile),
                _ => {
                    return Err(PyValueError::new_err(format!(
                        "aggregate: expected one of ['min', 'mean', 'least_confident_mean', 'quantile'], got {name:?}"
                    )))
                }
            };
        }
        Ok(o)
    }

    /// Valid boxes per image, checked to be B non-negative integers.
    pub fn valid_counts(&self, batch: usize) -> PyResult<Option<Vec<usize>>> {
        let Some(v) = &self.valid_counts else { return Ok(None) };
        let counts: Vec<i64> = extract(v, "valid_counts", "a sequence of integers, one per image")?;
        if counts.len() != batch {
            return Err(PyValueError::new_err(format!("valid_counts: expected {batch} counts (one per image), got {}", counts.len())));
        }
        counts
            .into_iter()
            .enumerate()
            .map(|(b, c)| {
                usize::try_from(c).map_err(|_| PyValueError::new_err(format!("valid_counts: image {b} has a negative count {c}")))
            })
            .collect::<PyResult<Vec<_>>>()
            .map(Some)
    }

    /// Per-box detection confidence as float32 `[B, N]`.
    pub fn box_confidence(&self, py: Python<'py>, batch: usize, boxes: usize) -> PyResult<Option<Vec<f32>>> {
        let Some(v) = &self.box_confidence else { return Ok(None) };
        let array = convert::as_float_array(py, v)
            .map_err(|e| PyTypeError::new_err(format!("box_confidence: {}", e.value(py))))?;
        if array.shape() != [batch, boxes] {
            return Err(PyValueError::new_err(format!(
                "box_confidence: expected shape [B, N] = [{batch}, {boxes}], got {:?}",
                array.shape()
            )));
        }
        Ok(Some(convert::to_f32(&array, None)?.as_slice().to_vec()))
    }
}

// Silence "unused" for the array traits used through method syntax in this module.
#[allow(unused_imports)]
use {PyArrayMethods as _, PyUntypedArrayMethods as _};
