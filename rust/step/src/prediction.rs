//! What annotators see of a flagged item's prediction: a small JSON summary per task.
//!
//! Numbers are rounded to 6 decimals; NaN and infinities (invalid model output) become null.
//! Detection boxes carry their place (`"box":[x0,y0,x1,y1]`, pixels of the input image)
//! when the step is given the model's boxes (`boxes_input`).

use crate::settings::Task;
use triton_al_kernels::Layout;

/// The value rounded to 6 decimals as JSON, or `null` when it is not finite.
fn number(v: f32) -> String {
    if !v.is_finite() {
        return "null".into();
    }
    // Formatting to 6 decimals rounds exactly (as Python's round(x, 6)); parsing back and
    // printing gives the shortest form of that double.
    let rounded: f64 = format!("{:.6}", v as f64).parse().unwrap_or(0.0);
    let text = format!("{rounded:?}");
    text
}

fn numbers(values: impl Iterator<Item = f32>) -> String {
    let parts: Vec<String> = values.map(number).collect();
    format!("[{}]", parts.join(","))
}

/// Index of the largest finite value, treating NaN and -inf as absent; None when none is finite.
fn argmax(values: impl Iterator<Item = f32>) -> Option<usize> {
    let mut best: Option<(usize, f32)> = None;
    for (i, v) in values.enumerate() {
        let v = if v.is_nan() { f32::NEG_INFINITY } else { v };
        if best.is_none_or(|(_, b)| v > b) {
            best = Some((i, v));
        }
    }
    best.map(|(i, _)| i)
}

/// A class name as JSON: the model's name for class `index`, when it has names.
fn name_of(index: Option<usize>, names: Option<&[String]>) -> String {
    match (index, names) {
        (Some(i), Some(names)) if i < names.len() => serde_json::Value::from(names[i].as_str()).to_string(),
        _ => "null".into(),
    }
}

/// The JSON summary of one item's outputs (`item` holds its values, `dims` its shape
/// without the batch axis). With the model's class names, labels are named too. `boxes`
/// (detection only): the item's boxes, 4 values (x0, y0, x1, y1) per box of `item`, in order.
pub fn prediction_json(task: Task, layout: Layout, item: &[f32], dims: &[usize], names: Option<&[String]>, boxes: Option<&[f32]>) -> String {
    match task {
        Task::Classification => {
            let index = if item.iter().any(|v| v.is_finite()) {
                argmax(item.iter().map(|&v| if v.is_finite() { v } else { f32::NEG_INFINITY }))
            } else {
                None
            };
            let label = index.map_or("null".into(), |i| i.to_string());
            let named = if names.is_some() { format!(",\"label_name\":{}", name_of(index, names)) } else { String::new() };
            format!("{{\"probs\":{},\"label\":{label}{named}}}", numbers(item.iter().copied()))
        }
        Task::MultiLabel => format!("{{\"probs\":{}}}", numbers(item.iter().copied())),
        Task::Detection => {
            let classes = dims.get(1).copied().unwrap_or(1).max(1);
            let described: Vec<String> = item
                .chunks(classes)
                .enumerate()
                .map(|(i, b)| {
                    let finite = || b.iter().map(|&v| if v.is_finite() { v } else { f32::NEG_INFINITY });
                    let label = argmax(finite()).unwrap_or(0);
                    let top = finite().fold(f32::NEG_INFINITY, f32::max);
                    let named = if names.is_some() { format!(",\"label_name\":{}", name_of(Some(label), names)) } else { String::new() };
                    let place = match boxes.and_then(|all| all.get(i * 4..i * 4 + 4)) {
                        Some(xyxy) => format!(",\"box\":{}", numbers(xyxy.iter().copied())),
                        None => String::new(),
                    };
                    format!("{{\"label\":{label},\"confidence\":{}{named}{place}}}", number(top))
                })
                .collect();
            format!("{{\"boxes\":[{}]}}", described.join(","))
        }
        Task::Segmentation => {
            let (classes, pixels, class_stride, pixel_stride) = match (layout, dims) {
                (Layout::ChannelsFirst, [c, h, w]) => (*c, h * w, h * w, 1),
                (Layout::ChannelsLast, [h, w, c]) => (*c, h * w, 1, *c),
                _ => (0, 0, 0, 0),
            };
            let mut counts = vec![0u64; classes];
            for p in 0..pixels {
                let values = (0..classes).map(|c| item[p * pixel_stride + c * class_stride]);
                if let Some(label) = argmax(values) {
                    counts[label] += 1;
                }
            }
            let parts: Vec<String> = counts.iter().map(u64::to_string).collect();
            format!("{{\"class_pixels\":[{}]}}", parts.join(","))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classification_rounds_and_nulls_invalid_values() {
        let json = prediction_json(Task::Classification, Layout::ChannelsFirst, &[0.1234567, f32::NAN, 0.5], &[3], None, None);
        assert_eq!(json, r#"{"probs":[0.123457,null,0.5],"label":2}"#);
        let none = prediction_json(Task::Classification, Layout::ChannelsFirst, &[f32::NAN, f32::INFINITY], &[2], None, None);
        assert_eq!(none, r#"{"probs":[null,null],"label":null}"#);
    }

    #[test]
    fn class_names_name_the_labels() {
        let names = ["cat".to_string(), "dog \"rex\"".to_string()];
        let json = prediction_json(Task::Classification, Layout::ChannelsFirst, &[0.2, 0.8], &[2], Some(&names), None);
        assert_eq!(json, r#"{"probs":[0.2,0.8],"label":1,"label_name":"dog \"rex\""}"#);
        let boxes = prediction_json(Task::Detection, Layout::ChannelsFirst, &[0.9, 0.1], &[1, 2], Some(&names), None);
        assert_eq!(boxes, r#"{"boxes":[{"label":0,"confidence":0.9,"label_name":"cat"}]}"#);
    }

    #[test]
    fn detection_reports_every_box() {
        let json = prediction_json(Task::Detection, Layout::ChannelsFirst, &[0.1, 0.9, 0.7, 0.3], &[2, 2], None, None);
        assert_eq!(json, r#"{"boxes":[{"label":1,"confidence":0.9},{"label":0,"confidence":0.7}]}"#);
    }

    #[test]
    fn detection_boxes_carry_their_place_in_pixels() {
        let names = ["cat".to_string(), "dog".to_string()];
        let places = [1.0, 2.5, 30.0, 40.0, 0.0, f32::NAN, 5.0, 6.0];
        let json = prediction_json(Task::Detection, Layout::ChannelsFirst, &[0.1, 0.9, 0.7, 0.3], &[2, 2], Some(&names), Some(&places));
        assert_eq!(
            json,
            r#"{"boxes":[{"label":1,"confidence":0.9,"label_name":"dog","box":[1.0,2.5,30.0,40.0]},{"label":0,"confidence":0.7,"label_name":"cat","box":[0.0,null,5.0,6.0]}]}"#
        );
    }

    #[test]
    fn segmentation_counts_pixels_per_class_in_either_layout() {
        // 2 classes, 1x3 pixels: class 1 wins pixels 0 and 2.
        let nchw = [0.2, 0.6, 0.1, 0.8, 0.4, 0.9];
        assert_eq!(prediction_json(Task::Segmentation, Layout::ChannelsFirst, &nchw, &[2, 1, 3], None, None), r#"{"class_pixels":[1,2]}"#);
        let nhwc = [0.2, 0.8, 0.6, 0.4, 0.1, 0.9];
        assert_eq!(prediction_json(Task::Segmentation, Layout::ChannelsLast, &nhwc, &[1, 3, 2], None, None), r#"{"class_pixels":[1,2]}"#);
    }
}
