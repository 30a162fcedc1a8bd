//! The four tasks: classification `[B, C]`, multi-label `[B, L]`, detection `[B, N, C]`,
//! segmentation `[B, C, H, W]` / `[B, H, W, C]`. Each checks its shapes, splits the batch
//! into chunks (threads only for big inputs) and runs a SIMD-dispatched body per chunk.

use crate::dispatch::multiversion;
use crate::distribution::{inv_ln_classes, Needs, Stats};
use crate::multilabel as label;
use crate::options::{Aggregate, Detection, Layout, Scoring, Strategy};
use crate::parallel::for_each_chunk;
use crate::planar::{self, TileOut, TILE};
use crate::vmath::MulAdd;
use crate::{error, random, row, KernelError, SMALL_C};

/// Items per parallel work unit: about 64K input elements, a whole number of tiles.
fn chunk_items(elements_per_item: usize) -> usize {
    let items = (1usize << 16) / elements_per_item.max(1);
    (items / TILE).max(1) * TILE
}

fn checked_len(dims: &[(&str, usize)]) -> Result<usize, KernelError> {
    dims.iter().try_fold(1usize, |acc, (_, d)| acc.checked_mul(*d)).map_or_else(
        || error(format!("outputs: shape {dims:?} is too large to address")),
        Ok,
    )
}

fn check_shape(x: &[f32], out: &[f32], items: usize, dims: &[(&str, usize)]) -> Result<(), KernelError> {
    let expected = checked_len(dims)?;
    if x.len() != expected {
        return error(format!(
            "outputs: {} values do not match shape {:?} ({} values)",
            x.len(),
            dims.iter().map(|(n, d)| format!("{n}={d}")).collect::<Vec<_>>(),
            expected
        ));
    }
    if out.len() != items {
        return error(format!("out: length {} does not match the {} items", out.len(), items));
    }
    Ok(())
}

// ---- per-chunk bodies (compiled once per SIMD level) -------------------------------------

/// Statistics of one contiguous row, with only the parts the strategy needs.
#[inline(always)]
fn row_stats<M: MulAdd>(row: &[f32], s: &Scoring, needs: Needs) -> Stats {
    let tol = s.sum_tolerance;
    match (s.from_logits, needs.plogp, needs.top2, needs.norm) {
        (false, true, false, _) if !needs.top1 => row::probs::<M, true, false, false>(row, tol),
        (false, false, false, _) if !needs.top1 => row::probs::<M, false, false, false>(row, tol),
        (false, true, false, _) => row::probs::<M, true, true, false>(row, tol),
        (false, false, false, _) => row::probs::<M, false, true, false>(row, tol),
        (false, false, true, _) => row::probs::<M, false, true, true>(row, tol),
        (false, true, true, _) => row::probs::<M, true, true, true>(row, tol),
        (true, true, false, true) => row::logits::<M, true, true, false>(row),
        (true, false, false, true) => row::logits::<M, false, true, false>(row),
        (true, false, true, true) => row::logits::<M, false, true, true>(row),
        (true, false, true, false) => row::logits::<M, false, false, true>(row),
        (true, false, false, false) => row::logits::<M, false, false, false>(row),
        (true, _, _, _) => row::logits::<M, true, true, true>(row),
    }
}

/// One full tile of class planes (see [`planar`]).
#[inline(always)]
fn planar_tile<M: MulAdd>(data: &[f32], stride: usize, classes: usize, s: &Scoring, needs: Needs, out: TileOut<'_>) {
    let (tol, st, inv) = (s.sum_tolerance, s.strategy, inv_ln_classes(classes));
    match (s.from_logits, needs.plogp, needs.top2, needs.norm) {
        (false, true, false, _) if !needs.top1 => planar::probs::<M, true, false, false>(data, stride, classes, tol, st, inv, out),
        (false, false, false, _) if !needs.top1 => planar::probs::<M, false, false, false>(data, stride, classes, tol, st, inv, out),
        (false, true, false, _) => planar::probs::<M, true, true, false>(data, stride, classes, tol, st, inv, out),
        (false, false, false, _) => planar::probs::<M, false, true, false>(data, stride, classes, tol, st, inv, out),
        (false, false, true, _) => planar::probs::<M, false, true, true>(data, stride, classes, tol, st, inv, out),
        (false, true, true, _) => planar::probs::<M, true, true, true>(data, stride, classes, tol, st, inv, out),
        (true, true, false, true) => planar::logits::<M, true, true, false>(data, stride, classes, st, inv, out),
        (true, false, false, true) => planar::logits::<M, false, true, false>(data, stride, classes, st, inv, out),
        (true, false, true, true) => planar::logits::<M, false, true, true>(data, stride, classes, st, inv, out),
        (true, false, true, false) => planar::logits::<M, false, false, true>(data, stride, classes, st, inv, out),
        (true, false, false, false) => planar::logits::<M, false, false, false>(data, stride, classes, st, inv, out),
        (true, _, _, _) => planar::logits::<M, true, true, true>(data, stride, classes, st, inv, out),
    }
}

/// Score `scores.len()` contiguous rows of `classes` values each.
#[inline(always)]
fn rows_body<M: MulAdd>(x: &[f32], classes: usize, s: &Scoring, need_top1: bool, scores: &mut [f32], mut top1: Option<&mut [f32]>) {
    let n = scores.len();
    let needs = Needs::of(s.strategy, need_top1);
    if classes >= SMALL_C {
        // Statistics row by row, then the scores of a block of rows in one vectorised pass.
        let inv_ln_c = inv_ln_classes(classes);
        let mut block = [Stats { norm: 1.0, t: 0.0, a1: 0.0, a2: 0.0, valid: false }; TILE];
        for start in (0..n).step_by(TILE) {
            let m = TILE.min(n - start);
            for (i, st) in block.iter_mut().enumerate().take(m) {
                let r = start + i;
                *st = row_stats::<M>(&x[r * classes..(r + 1) * classes], s, needs);
            }
            let out = TileOut {
                scores: &mut scores[start..start + m],
                top1: top1.as_deref_mut().map(|t| &mut t[start..start + m]),
            };
            planar::finish::<M>(s.strategy, classes, inv_ln_c, |i| block[i], out);
        }
        return;
    }
    // Small C: transpose a tile of rows into class planes, then score across items. Lanes
    // past the last row of a partial tile hold stale values whose results are dropped.
    let mut planes = [0.0f32; SMALL_C * TILE];
    for start in (0..n).step_by(TILE) {
        let m = TILE.min(n - start);
        let tile = &x[start * classes..(start + m) * classes];
        for (i, row) in tile.chunks_exact(classes).enumerate() {
            for (j, &v) in row.iter().enumerate() {
                planes[j * TILE + i] = v;
            }
        }
        let out = TileOut {
            scores: &mut scores[start..start + m],
            top1: top1.as_deref_mut().map(|t| &mut t[start..start + m]),
        };
        planar_tile::<M>(&planes, TILE, classes, s, needs, out);
    }
}

/// Score `scores.len()` items stored class-planar (`stride` apart), starting at `x[0]`.
#[inline(always)]
fn planes_body<M: MulAdd>(x: &[f32], stride: usize, classes: usize, s: &Scoring, scores: &mut [f32]) {
    let n = scores.len();
    let needs = Needs::of(s.strategy, false);
    let full = n / TILE * TILE;
    for start in (0..full).step_by(TILE) {
        let out = TileOut { scores: &mut scores[start..start + TILE], top1: None };
        planar_tile::<M>(&x[start..], stride, classes, s, needs, out);
    }
    if full < n {
        // The last partial tile: copy it into a padded buffer (padding lanes are discarded).
        let m = n - full;
        let mut padded = vec![0.0f32; classes * TILE];
        for j in 0..classes {
            padded[j * TILE..j * TILE + m].copy_from_slice(&x[j * stride + full..j * stride + full + m]);
        }
        let out = TileOut { scores: &mut scores[full..], top1: None };
        planar_tile::<M>(&padded, TILE, classes, s, needs, out);
    }
}

#[inline(always)]
fn map_labels(x: &[f32], out: &mut [f32], f: impl Fn(f32) -> f32) {
    for (o, &v) in out.iter_mut().zip(x) {
        *o = f(v);
    }
}

/// Per-label scores, element by element (the strategy matched once, outside the loop).
#[inline(always)]
fn labels_body<M: MulAdd>(x: &[f32], s: &Scoring, out: &mut [f32]) {
    macro_rules! each {
        ($f:path) => {
            match s.strategy {
                Strategy::Entropy => map_labels(x, out, |v| $f(v, Strategy::Entropy)),
                Strategy::LeastConfidence => map_labels(x, out, |v| $f(v, Strategy::LeastConfidence)),
                Strategy::Margin => map_labels(x, out, |v| $f(v, Strategy::Margin)),
                Strategy::Ratio => map_labels(x, out, |v| $f(v, Strategy::Ratio)),
                Strategy::Random => map_labels(x, out, |v| $f(v, Strategy::Random)),
            }
        };
    }
    if s.from_logits {
        each!(label::from_logit::<M>)
    } else {
        each!(label::from_probability::<M>)
    }
}

multiversion!(fn rows(x: &[f32], classes: usize, s: &Scoring, need_top1: bool, scores: &mut [f32], top1: Option<&mut [f32]>) => rows_body);
multiversion!(fn planes(x: &[f32], stride: usize, classes: usize, s: &Scoring, scores: &mut [f32]) => planes_body);
multiversion!(fn label_scores(x: &[f32], s: &Scoring, out: &mut [f32]) => labels_body);

// ---- aggregation --------------------------------------------------------------------------

/// Aggregate item-part scores (labels, boxes, pixels); any NaN part makes the item NaN.
fn aggregate(parts: &mut [f32], how: Aggregate) -> f32 {
    if matches!(how, Aggregate::Min | Aggregate::Mean) {
        return aggregate_in_order(parts, how);
    }
    if parts.iter().any(|v| v.is_nan()) {
        return f32::NAN;
    }
    let n = parts.len();
    match how {
        Aggregate::Min | Aggregate::Mean => unreachable!("handled above"),
        Aggregate::LeastConfidentMean(k) => {
            let k = k.min(n);
            if k < n {
                parts.select_nth_unstable_by(k - 1, f32::total_cmp);
            }
            (parts[..k].iter().map(|&v| v as f64).sum::<f64>() / k as f64) as f32
        }
        Aggregate::Quantile(q) => {
            // numpy's default ("linear"): interpolate between the order statistics around q(n−1).
            let pos = q as f64 * (n - 1) as f64;
            let lo = pos.floor() as usize;
            let frac = pos - lo as f64;
            let (_, &mut a, upper) = parts.select_nth_unstable_by(lo, f32::total_cmp);
            if frac == 0.0 || upper.is_empty() {
                return a;
            }
            let b = upper.iter().copied().fold(f32::INFINITY, f32::min);
            (a as f64 + frac * (b as f64 - a as f64)) as f32
        }
    }
}

/// Min and mean need no reordering (NaN propagates through both).
fn aggregate_in_order(parts: &[f32], how: Aggregate) -> f32 {
    match how {
        Aggregate::Min => parts.iter().copied().fold(f32::INFINITY, |a, v| if v.is_nan() || a.is_nan() { f32::NAN } else { a.min(v) }),
        _ => (parts.iter().map(|&v| v as f64).sum::<f64>() / parts.len() as f64) as f32,
    }
}

fn check_aggregate(how: Aggregate, allowed: &[&str], task: &str) -> Result<(), KernelError> {
    let name = match how {
        Aggregate::Min => "min",
        Aggregate::Mean => "mean",
        Aggregate::LeastConfidentMean(k) => {
            if k == 0 {
                return error("k: expected a positive number of least confident boxes, got 0");
            }
            "least_confident_mean"
        }
        Aggregate::Quantile(q) => {
            if !(0.0..=1.0).contains(&q) {
                return error(format!("quantile: expected a value in [0, 1], got {q}"));
            }
            "quantile"
        }
    };
    if allowed.contains(&name) {
        Ok(())
    } else {
        error(format!("aggregate: {task} takes one of {allowed:?}, got {name:?}"))
    }
}

fn check_scoring(s: &Scoring) -> Result<(), KernelError> {
    if !(s.sum_tolerance >= 0.0) {
        return error(format!("sum_tolerance: expected a non-negative number, got {}", s.sum_tolerance));
    }
    Ok(())
}

fn finish_random(out: &mut [f32], s: &Scoring) {
    if s.strategy == Strategy::Random {
        random::fill(out, s.seed);
    }
}

// ---- public task entry points -------------------------------------------------------------

/// Classification `[batch, classes]`: one class distribution per item.
pub fn classification(x: &[f32], batch: usize, classes: usize, s: &Scoring, out: &mut [f32]) -> Result<(), KernelError> {
    check_scoring(s)?;
    if classes == 0 {
        return error("outputs: the class axis is empty (C = 0); expected at least one class");
    }
    check_shape(x, out, batch, &[("B", batch), ("C", classes)])?;
    for_each_chunk(out, 1, chunk_items(classes), x.len(), |first, chunk| {
        let rows_x = &x[first * classes..(first + chunk.len()) * classes];
        rows(rows_x, classes, s, false, chunk, None);
    });
    finish_random(out, s);
    Ok(())
}

/// Multi-label `[batch, labels]`: independent sigmoid outputs, aggregated per item.
pub fn multilabel(x: &[f32], batch: usize, labels: usize, s: &Scoring, how: Aggregate, out: &mut [f32]) -> Result<(), KernelError> {
    check_scoring(s)?;
    check_aggregate(how, &["min", "mean"], "multilabel")?;
    if labels == 0 {
        return error("outputs: the label axis is empty (L = 0); expected at least one label");
    }
    check_shape(x, out, batch, &[("B", batch), ("L", labels)])?;
    for_each_chunk(out, 1, chunk_items(labels), x.len(), |first, chunk| {
        let xs = &x[first * labels..(first + chunk.len()) * labels];
        let mut per_label = vec![0.0f32; xs.len()];
        label_scores(xs, s, &mut per_label);
        for (o, parts) in chunk.iter_mut().zip(per_label.chunks_exact_mut(labels)) {
            *o = aggregate(parts, how);
        }
    });
    finish_random(out, s);
    Ok(())
}

/// Detection `[batch, boxes, classes]`: per-box scores aggregated per image.
pub fn detection(
    x: &[f32],
    batch: usize,
    boxes: usize,
    classes: usize,
    s: &Scoring,
    det: &Detection<'_>,
    out: &mut [f32],
) -> Result<(), KernelError> {
    check_scoring(s)?;
    check_aggregate(det.aggregate, &["min", "mean", "least_confident_mean"], "detection")?;
    if classes == 0 {
        return error("outputs: the class axis is empty (C = 0); expected at least one class");
    }
    check_shape(x, out, batch, &[("B", batch), ("N", boxes), ("C", classes)])?;
    if let Some(counts) = det.valid_counts {
        if counts.len() != batch {
            return error(format!("valid_counts: expected {batch} counts (one per image), got {}", counts.len()));
        }
        if let Some((b, &c)) = counts.iter().enumerate().find(|(_, &c)| c > boxes) {
            return error(format!("valid_counts: image {b} claims {c} boxes but outputs hold only N = {boxes}"));
        }
    }
    if let Some(conf) = det.box_confidence {
        if conf.len() != batch * boxes {
            return error(format!("box_confidence: expected shape [B, N] = [{batch}, {boxes}], got {} values", conf.len()));
        }
    }
    if det.confidence_floor.is_nan() {
        return error("confidence_floor: expected a number, got NaN");
    }
    if !(0.0..=1.0).contains(&det.empty_score) {
        return error(format!("empty_score: expected a value in [0, 1], got {}", det.empty_score));
    }
    let need_top1 = det.box_confidence.is_none() && det.confidence_floor > 0.0;
    let per_image = boxes * classes;
    let images_per_chunk = ((1usize << 16) / per_image.max(1)).max(1);
    for_each_chunk(out, 1, images_per_chunk, x.len(), |first, chunk| {
        let mut scores = vec![0.0f32; boxes];
        let mut top1 = vec![0.0f32; if need_top1 { boxes } else { 0 }];
        for (k, o) in chunk.iter_mut().enumerate() {
            let b = first + k;
            let valid = det.valid_counts.map_or(boxes, |c| c[b]);
            let image = &x[b * per_image..b * per_image + valid * classes];
            rows(image, classes, s, need_top1, &mut scores[..valid], need_top1.then(|| &mut top1[..valid]));
            let mut kept = 0;
            let mut invalid = false;
            for i in 0..valid {
                let conf = match det.box_confidence {
                    Some(c) => c[b * boxes + i],
                    None if need_top1 => top1[i],
                    None => 1.0,
                };
                invalid |= scores[i].is_nan() || conf.is_nan();
                if conf >= det.confidence_floor {
                    scores[kept] = scores[i];
                    kept += 1;
                }
            }
            *o = if invalid {
                f32::NAN
            } else if kept == 0 {
                det.empty_score
            } else {
                aggregate(&mut scores[..kept], det.aggregate)
            };
        }
    });
    finish_random(out, s);
    Ok(())
}

/// Semantic segmentation: per-pixel scores aggregated per image by mean or a quantile.
#[allow(clippy::too_many_arguments)]
pub fn segmentation(
    x: &[f32],
    batch: usize,
    classes: usize,
    height: usize,
    width: usize,
    layout: Layout,
    s: &Scoring,
    how: Aggregate,
    out: &mut [f32],
) -> Result<(), KernelError> {
    check_scoring(s)?;
    check_aggregate(how, &["min", "mean", "quantile"], "segmentation")?;
    if classes == 0 {
        return error("outputs: the class axis is empty (C = 0); expected at least one class");
    }
    if height == 0 || width == 0 {
        return error(format!("outputs: an image of {height}x{width} pixels has nothing to score"));
    }
    let dims: &[(&str, usize)] = match layout {
        Layout::ChannelsFirst => &[("B", batch), ("C", classes), ("H", height), ("W", width)],
        Layout::ChannelsLast => &[("B", batch), ("H", height), ("W", width), ("C", classes)],
    };
    check_shape(x, out, batch, dims)?;
    let hw = height * width;
    let mut pixels = vec![0.0f32; batch * hw];
    for_each_chunk(&mut pixels, 1, chunk_items(classes), x.len(), |first, chunk| {
        // A chunk may straddle images: score it image by image.
        let mut done = 0;
        while done < chunk.len() {
            let p = first + done;
            let (b, i) = (p / hw, p % hw);
            let m = (hw - i).min(chunk.len() - done);
            let target = &mut chunk[done..done + m];
            match layout {
                Layout::ChannelsFirst => planes(&x[b * classes * hw + i..], hw, classes, s, target),
                Layout::ChannelsLast => rows(&x[p * classes..(p + m) * classes], classes, s, false, target, None),
            }
            done += m;
        }
    });
    for_each_chunk(out, 1, 1, pixels.len(), |first, chunk| {
        for (k, o) in chunk.iter_mut().enumerate() {
            let b = first + k;
            let image = &pixels[b * hw..(b + 1) * hw];
            *o = match how {
                Aggregate::Min | Aggregate::Mean => aggregate_in_order(image, how),
                _ => aggregate(&mut image.to_vec(), how), // selection reorders: work on a copy
            };
        }
    });
    finish_random(out, s);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scoring(strategy: Strategy, from_logits: bool) -> Scoring {
        Scoring { strategy, from_logits, ..Scoring::default() }
    }

    fn entropy_score(p: &[f64]) -> f64 {
        let h: f64 = p.iter().filter(|&&v| v > 0.0).map(|&v| -v * v.ln()).sum();
        1.0 - h / (p.len() as f64).ln()
    }

    #[test]
    fn classification_entropy_matches_definition_for_small_and_large_c() {
        for classes in [2usize, 10, 31, 32, 100, 1000] {
            let rows = 300;
            let mut x = Vec::new();
            for r in 0..rows {
                let raw: Vec<f64> = (0..classes).map(|j| ((r * 7 + j * 13) % 17) as f64 + 0.5).collect();
                let total: f64 = raw.iter().sum();
                x.extend(raw.iter().map(|v| (v / total) as f32));
            }
            let mut out = vec![0.0; rows];
            classification(&x, rows, classes, &scoring(Strategy::Entropy, false), &mut out).unwrap();
            for r in 0..rows {
                let p: Vec<f64> = x[r * classes..(r + 1) * classes].iter().map(|&v| v as f64).collect();
                let want = entropy_score(&p);
                assert!((out[r] as f64 - want).abs() < 2e-6, "C={classes} row {r}: {} vs {want}", out[r]);
            }
        }
    }

    #[test]
    fn logits_and_probabilities_agree() {
        let logits = [2.0f32, -1.0, 0.5, 3.0, 0.0];
        let z: f32 = logits.iter().map(|v| v.exp()).sum();
        let probs: Vec<f32> = logits.iter().map(|v| v.exp() / z).collect();
        for strategy in [Strategy::Entropy, Strategy::LeastConfidence, Strategy::Margin, Strategy::Ratio] {
            let (mut a, mut b) = ([0.0f32], [0.0f32]);
            classification(&logits, 1, 5, &scoring(strategy, true), &mut a).unwrap();
            classification(&probs, 1, 5, &scoring(strategy, false), &mut b).unwrap();
            assert!((a[0] - b[0]).abs() < 1e-6, "{strategy:?}: {} vs {}", a[0], b[0]);
        }
    }

    #[test]
    fn invalid_rows_score_nan_alone() {
        let x = [0.5f32, 0.5, f32::NAN, 1.0, -0.5, 1.5, 0.2, 0.2, 0.9, 0.1];
        let mut out = [0.0f32; 5];
        classification(&x, 5, 2, &scoring(Strategy::Margin, false), &mut out).unwrap();
        assert_eq!(out[0], 0.0);
        assert!(out[1].is_nan() && out[2].is_nan() && out[3].is_nan());
        assert!((out[4] - 0.8).abs() < 1e-6);
    }

    #[test]
    fn shape_errors_are_returned_not_panicked() {
        let mut out = [0.0f32; 2];
        let e = classification(&[0.5; 5], 2, 3, &Scoring::default(), &mut out).unwrap_err();
        assert!(e.0.contains("do not match"), "{e}");
        assert!(classification(&[], 2, 0, &Scoring::default(), &mut out).unwrap_err().0.contains("empty"));
        let e = multilabel(&[0.5; 4], 2, 2, &Scoring::default(), Aggregate::Quantile(0.5), &mut out).unwrap_err();
        assert!(e.0.contains("aggregate"), "{e}");
        let det = Detection { aggregate: Aggregate::Min, valid_counts: Some(&[3, 9]), box_confidence: None, confidence_floor: 0.0, empty_score: 1.0 };
        let e = detection(&[0.5; 24], 2, 3, 4, &Scoring::default(), &det, &mut out).unwrap_err();
        assert!(e.0.contains("valid_counts"), "{e}");
    }

    #[test]
    fn aggregation() {
        let mut v = [0.9f32, 0.1, 0.5, 0.3];
        assert_eq!(aggregate(&mut v.clone(), Aggregate::Min), 0.1);
        assert!((aggregate(&mut v.clone(), Aggregate::Mean) - 0.45).abs() < 1e-7);
        assert!((aggregate(&mut v.clone(), Aggregate::LeastConfidentMean(2)) - 0.2).abs() < 1e-7);
        assert!((aggregate(&mut v.clone(), Aggregate::LeastConfidentMean(9)) - 0.45).abs() < 1e-7);
        // numpy.quantile([0.1, 0.3, 0.5, 0.9], 0.5) == 0.4
        assert!((aggregate(&mut v, Aggregate::Quantile(0.5)) - 0.4).abs() < 1e-7);
        assert!(aggregate(&mut [0.2, f32::NAN], Aggregate::Min).is_nan());
    }

    #[test]
    fn detection_respects_padding_floor_and_empty_images() {
        // 2 images x 2 boxes x 2 classes; image 0 has one real box, its padding is NaN.
        let x = [0.9f32, 0.1, f32::NAN, f32::NAN, 0.6, 0.4, 0.95, 0.05];
        let mut out = [0.0f32; 2];
        let det = Detection { aggregate: Aggregate::Min, valid_counts: Some(&[1, 2]), box_confidence: None, confidence_floor: 0.0, empty_score: 1.0 };
        detection(&x, 2, 2, 2, &scoring(Strategy::Margin, false), &det, &mut out).unwrap();
        assert!((out[0] - 0.8).abs() < 1e-6 && (out[1] - 0.2).abs() < 1e-6, "{out:?}");
        let floor = Detection { confidence_floor: 0.7, ..det };
        detection(&x, 2, 2, 2, &scoring(Strategy::Margin, false), &floor, &mut out).unwrap();
        assert!((out[1] - 0.9).abs() < 1e-6, "{out:?}");
        let empty = Detection { valid_counts: Some(&[0, 0]), empty_score: 0.25, ..det };
        detection(&x, 2, 2, 2, &scoring(Strategy::Margin, false), &empty, &mut out).unwrap();
        assert_eq!(out, [0.25, 0.25]);
    }

    #[test]
    fn segmentation_layouts_agree() {
        let (b, c, h, w) = (2usize, 3usize, 5usize, 7usize);
        let nchw: Vec<f32> = (0..b * c * h * w).map(|i| ((i * 37) % 11) as f32 * 0.3 - 1.0).collect();
        let mut nhwc = vec![0.0f32; nchw.len()];
        for bi in 0..b {
            for ci in 0..c {
                for p in 0..h * w {
                    nhwc[(bi * h * w + p) * c + ci] = nchw[(bi * c + ci) * h * w + p];
                }
            }
        }
        for how in [Aggregate::Mean, Aggregate::Min, Aggregate::Quantile(0.1)] {
            let (mut a, mut z) = ([0.0f32; 2], [0.0f32; 2]);
            let s = scoring(Strategy::Entropy, true);
            segmentation(&nchw, b, c, h, w, Layout::ChannelsFirst, &s, how, &mut a).unwrap();
            segmentation(&nhwc, b, c, h, w, Layout::ChannelsLast, &s, how, &mut z).unwrap();
            assert!((a[0] - z[0]).abs() < 1e-6 && (a[1] - z[1]).abs() < 1e-6, "{how:?}: {a:?} vs {z:?}");
        }
    }
}
