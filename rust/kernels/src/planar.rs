//! Distribution statistics for a tile of items stored class-planar: class `j` of item `i`
//! sits at `data[j * stride + i]`. The lanes run across items, so a handful of classes
//! (C = 10, 21) still fills every lane. This is the native layout of `[B, C, H, W]`
//! segmentation; small-C row-major inputs are transposed tile by tile into it.

use crate::distribution::{probs_valid, push_top2, strategy_score, Stats};
use crate::options::Strategy;
use crate::vmath;

/// Items per tile: the accumulators (5 × TILE floats) and a transposed tile of up to
/// [`crate::SMALL_C`] classes stay in L1.
pub const TILE: usize = 128;

/// Per-item output of a tile: the strategy score and the top class probability.
pub struct TileOut<'a> {
    pub scores: &'a mut [f32],
    pub top1: Option<&'a mut [f32]>,
}

#[inline(always)]
fn finish(i: usize, s: Stats, strategy: Strategy, classes: usize, out: &mut TileOut<'_>) {
    out.scores[i] = strategy_score(&s, strategy, classes);
    if let Some(top1) = out.top1.as_deref_mut() {
        top1[i] = if s.valid { s.top1() } else { f32::NAN };
    }
}

/// Probability planes: `n ≤ TILE` items, `classes` planes `stride` apart.
#[inline(always)]
pub fn probs<const PLOGP: bool>(
    data: &[f32],
    stride: usize,
    classes: usize,
    n: usize,
    tolerance: f32,
    strategy: Strategy,
    mut out: TileOut<'_>,
) {
    debug_assert!(n <= TILE);
    let mut sum = [0.0f32; TILE];
    let mut t = [0.0f32; TILE];
    let mut low = [0.0f32; TILE];
    let mut first = [f32::NEG_INFINITY; TILE];
    let mut second = [f32::NEG_INFINITY; TILE];
    for j in 0..classes {
        let plane = &data[j * stride..j * stride + n];
        for i in 0..n {
            let p = plane[i];
            sum[i] += p;
            if PLOGP {
                t[i] += vmath::p_ln_p(p);
            }
            low[i] = vmath::min(low[i], p);
            push_top2(&mut first[i], &mut second[i], p);
        }
    }
    for i in 0..n {
        let s = Stats {
            norm: sum[i],
            t: t[i],
            a1: first[i],
            a2: vmath::max(second[i], 0.0),
            valid: probs_valid(sum[i], t[i], low[i], tolerance),
        };
        finish(i, s, strategy, classes, &mut out);
    }
}

/// Logit planes (softmax fused), same addressing as [`probs`].
#[inline(always)]
pub fn logits<const PLOGP: bool, const NORM: bool>(
    data: &[f32],
    stride: usize,
    classes: usize,
    n: usize,
    strategy: Strategy,
    mut out: TileOut<'_>,
) {
    debug_assert!(n <= TILE);
    let mut first = [f32::NEG_INFINITY; TILE];
    let mut second = [f32::NEG_INFINITY; TILE];
    let mut check = [0.0f32; TILE];
    for j in 0..classes {
        let plane = &data[j * stride..j * stride + n];
        for i in 0..n {
            push_top2(&mut first[i], &mut second[i], plane[i]);
            check[i] += plane[i] * 0.0;
        }
    }
    let mut z = [0.0f32; TILE];
    let mut t = [0.0f32; TILE];
    if NORM {
        for j in 0..classes {
            let plane = &data[j * stride..j * stride + n];
            for i in 0..n {
                let y = vmath::max(plane[i] - first[i], -88.0);
                let e = vmath::exp(y);
                z[i] += e;
                if PLOGP {
                    t[i] += e * y;
                }
            }
        }
    }
    for i in 0..n {
        let x2 = second[i];
        let a2 = if x2 == f32::NEG_INFINITY { 0.0 } else { vmath::exp(x2 - first[i]) };
        let s = Stats {
            norm: if NORM { z[i] } else { 1.0 },
            t: t[i],
            a1: 1.0,
            a2,
            valid: check[i] == 0.0 && classes > 0,
        };
        finish(i, s, strategy, classes, &mut out);
    }
}
