//! numpy arrays in: any float dtype, any memory order; float32 out for the kernels, borrowed
//! without a copy when the input is already C-contiguous float32. An item's embedding in:
//! any 1-D sequence of numbers, copied as float32.

use half::f16;
use numpy::ndarray::Axis;
use numpy::{PyArrayDyn, PyArrayMethods, PyReadonlyArrayDyn, PyUntypedArray, PyUntypedArrayMethods};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyDict;

pub enum FloatArray<'py> {
    F32(PyReadonlyArrayDyn<'py, f32>),
    F64(PyReadonlyArrayDyn<'py, f64>),
    F16(PyReadonlyArrayDyn<'py, f16>),
}

impl FloatArray<'_> {
    pub fn shape(&self) -> &[usize] {
        match self {
            FloatArray::F32(a) => a.shape(),
            FloatArray::F64(a) => a.shape(),
            FloatArray::F16(a) => a.shape(),
        }
    }
}

/// The kernels' input: the caller's buffer, or a converted copy.
pub enum Floats<'a> {
    Borrowed(&'a [f32]),
    Owned(Vec<f32>),
}

impl Floats<'_> {
    pub fn as_slice(&self) -> &[f32] {
        match self {
            Floats::Borrowed(s) => s,
            Floats::Owned(v) => v,
        }
    }
}

/// Accept a numpy array of float16/32/64 (or anything numpy.asarray turns into one).
pub fn as_float_array<'py>(py: Python<'py>, obj: &Bound<'py, PyAny>) -> PyResult<FloatArray<'py>> {
    let array = if obj.cast::<PyUntypedArray>().is_ok() {
        obj.clone()
    } else {
        py.import("numpy")?.call_method1("asarray", (obj,)).map_err(|e| {
            PyTypeError::new_err(format!("outputs: expected a numpy array of float16, float32 or float64; could not convert {}: {e}", obj.get_type()))
        })?
    };
    if let Ok(a) = array.cast::<PyArrayDyn<f32>>() {
        return Ok(FloatArray::F32(a.readonly()));
    }
    if let Ok(a) = array.cast::<PyArrayDyn<f64>>() {
        return Ok(FloatArray::F64(a.readonly()));
    }
    if let Ok(a) = array.cast::<PyArrayDyn<f16>>() {
        return Ok(FloatArray::F16(a.readonly()));
    }
    let dtype = array.cast::<PyUntypedArray>().map(|a| a.dtype().to_string()).unwrap_or_else(|_| "unknown".into());
    Err(PyTypeError::new_err(format!("outputs: expected dtype float16, float32 or float64, got {dtype}")))
}

/// An item's embedding: any 1-D sequence of numbers (a numpy array of any float dtype, a
/// list...) as float32 values; Err (ValueError) names `embedding` and what was wrong. Its
/// length and finiteness are the outbox's to check (`NewItem::embedding`).
pub fn embedding_values(py: Python<'_>, obj: &Bound<'_, PyAny>) -> PyResult<Vec<f32>> {
    let kwargs = PyDict::new(py);
    kwargs.set_item("dtype", "float32")?;
    let array = py.import("numpy")?.getattr("asarray")?.call((obj,), Some(&kwargs)).map_err(|e| {
        PyValueError::new_err(format!("embedding: expected a 1-D sequence of numbers; could not convert {}: {e}", obj.get_type()))
    })?;
    let array = array.cast::<PyArrayDyn<f32>>().map_err(|e| PyValueError::new_err(format!("embedding: {e}")))?.readonly();
    if array.ndim() != 1 {
        return Err(PyValueError::new_err(format!("embedding: expected a 1-D sequence of numbers, got shape {:?}", array.shape())));
    }
    Ok(array.as_array().iter().copied().collect())
}

/// Float32 values in C order. With `shift_axis`, float64 logits are shifted by their maximum
/// along that (class) axis before narrowing: softmax is shift-invariant, precision is not.
pub fn to_f32<'a>(array: &'a FloatArray<'_>, shift_axis: Option<usize>) -> PyResult<Floats<'a>> {
    Ok(match array {
        FloatArray::F32(a) => {
            if a.is_c_contiguous() {
                Floats::Borrowed(a.as_slice().expect("C-contiguous array has a slice"))
            } else {
                Floats::Owned(a.as_array().iter().copied().collect())
            }
        }
        FloatArray::F16(a) => Floats::Owned(a.as_array().iter().map(|v| v.to_f32()).collect()),
        FloatArray::F64(a) => match shift_axis {
            None => Floats::Owned(a.as_array().iter().map(|&v| v as f32).collect()),
            Some(axis) => {
                let mut owned = a.as_array().to_owned();
                if owned.len() > 0 {
                    for mut lane in owned.lanes_mut(Axis(axis)) {
                        let m = lane.fold(f64::NEG_INFINITY, |m, &v| if v > m { v } else { m });
                        if m.is_finite() {
                            lane.mapv_inplace(|v| v - m);
                        }
                    }
                }
                Floats::Owned(owned.iter().map(|&v| v as f32).collect())
            }
        },
    })
}
