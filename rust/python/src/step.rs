//! The step's shared pieces for the Python step: its parameters (the same rules and messages
//! as the native backend) and the prediction summary stored with a flagged item.

use std::collections::BTreeMap;

use numpy::{PyReadonlyArrayDyn, PyUntypedArrayMethods};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyDict;
use triton_al_kernels::Layout;
use triton_al_step::{parse_parameters, prediction_json as summary, Task, Value};

/// Parse the step's config.pbtxt parameters (flat strings); returns {parameter: value} with
/// every default filled in, or raises ValueError naming each bad parameter.
#[pyfunction]
#[pyo3(signature = (params, outbox_env = None))]
pub fn parse_step_parameters<'py>(py: Python<'py>, params: BTreeMap<String, String>, outbox_env: Option<&str>) -> PyResult<Bound<'py, PyDict>> {
    let parsed = parse_parameters(&params, outbox_env).map_err(PyValueError::new_err)?;
    let out = PyDict::new(py);
    for (key, value) in parsed {
        match value {
            Value::Null => out.set_item(key, py.None())?,
            Value::Bool(b) => out.set_item(key, b)?,
            Value::Int(i) => out.set_item(key, i)?,
            Value::Number(n) => out.set_item(key, n)?,
            Value::Text(s) => out.set_item(key, s)?,
            Value::Groups(g) => out.set_item(key, g)?,
        }
    }
    Ok(out)
}

/// The JSON summary of one item's outputs (what annotators see of the prediction).
/// `boxes` (detection): the item's boxes, [N, 4] (x0, y0, x1, y1) for the N boxes of `item`.
#[pyfunction]
#[pyo3(signature = (task, item, *, layout = "nchw", class_names = None, boxes = None))]
pub fn prediction_json(
    task: &str,
    item: PyReadonlyArrayDyn<'_, f32>,
    layout: &str,
    class_names: Option<Vec<String>>,
    boxes: Option<PyReadonlyArrayDyn<'_, f32>>,
) -> PyResult<String> {
    let task = match task {
        "classification" => Task::Classification,
        "multilabel" => Task::MultiLabel,
        "detection" => Task::Detection,
        "segmentation" => Task::Segmentation,
        other => return Err(PyValueError::new_err(format!("task: expected classification, multilabel, detection or segmentation, got {other:?}"))),
    };
    let layout = if layout == "nhwc" { Layout::ChannelsLast } else { Layout::ChannelsFirst };
    let dims = item.shape().to_vec();
    let values = item.as_array().iter().copied().collect::<Vec<f32>>();
    let places = match &boxes {
        Some(b) if task == Task::Detection && b.shape() == [dims.first().copied().unwrap_or(0), 4] => {
            Some(b.as_array().iter().copied().collect::<Vec<f32>>())
        }
        Some(b) => return Err(PyValueError::new_err(format!("boxes: expected shape [{}, 4] for a detection item, got {:?}", dims.first().copied().unwrap_or(0), b.shape()))),
        None => None,
    };
    Ok(summary(task, layout, &values, &dims, class_names.as_deref(), places.as_deref()))
}
