//! Distribution statistics for a tile of items stored class-planar: class `j` of item `i`
//! sits at `data[j * stride + i]`. The lanes run across items, so a handful of classes
//! (C = 10, 21) still fills every lane. This is the native layout of `[B, C, H, W]`
//! segmentation; small-C row-major inputs are transposed tile by tile into it.
//!
//! A tile is always [`TILE`] items wide (callers pad the last one), so every loop has a
//! constant trip count and the accumulators live in registers.

use crate::distribution::{probs_valid, push_top2, strategy_score, Stats};
use crate::options::Strategy;
use crate::vmath::{self, MulAdd, TINY};

/// Items per tile: 4 AVX-512 registers per accumulator.
pub const TILE: usize = 64;

/// Per-item output of a tile (the first `scores.len()` items are real, the rest padding).
pub struct TileOut<'a> {
    pub scores: &'a mut [f32],
    pub top1: Option<&'a mut [f32]>,
}

/// Scores (and top-1 probabilities) from per-item statistics, with the strategy matched once
/// outside the loop.
#[inline(always)]
pub fn finish<M: MulAdd>(
    strategy: Strategy,
    classes: usize,
    inv_ln_c: f32,
    stats: impl Fn(usize) -> Stats,
    out: TileOut<'_>,
) {
    let n = out.scores.len();
    macro_rules! each {
        ($s:expr) => {
            for i in 0..n {
                out.scores[i] = strategy_score::<M>(&stats(i), $s, classes, inv_ln_c);
            }
        };
    }
    match strategy {
        Strategy::Entropy => each!(Strategy::Entropy),
        Strategy::LeastConfidence => each!(Strategy::LeastConfidence),
        Strategy::Margin => each!(Strategy::Margin),
        Strategy::Ratio => each!(Strategy::Ratio),
        Strategy::Random => each!(Strategy::Random),
    }
    if let Some(top1) = out.top1 {
        for (i, t) in top1.iter_mut().enumerate().take(n) {
            let s = stats(i);
            *t = if s.valid { s.top1() } else { f32::NAN };
        }
    }
}

#[inline(always)]
fn plane(data: &[f32], stride: usize, j: usize) -> &[f32; TILE] {
    data[j * stride..j * stride + TILE].try_into().unwrap()
}

/// Probability planes: `classes` planes of [`TILE`] items, `stride` apart.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub fn probs<M: MulAdd, const PLOGP: bool, const TOP1: bool, const TOP2: bool>(
    data: &[f32],
    stride: usize,
    classes: usize,
    tolerance: f32,
    strategy: Strategy,
    inv_ln_c: f32,
    out: TileOut<'_>,
) {
    let mut sum = [0.0f32; TILE];
    let mut t = [0.0f32; TILE];
    let mut low = [0.0f32; TILE];
    let mut first = [f32::NEG_INFINITY; TILE];
    let mut second = [f32::NEG_INFINITY; TILE];
    for j in 0..classes {
        let v = plane(data, stride, j);
        for i in 0..TILE {
            let p = v[i];
            sum[i] += p;
            if PLOGP {
                t[i] = M::mul_add(p, vmath::ln::<M>(vmath::max(p, TINY)), t[i]);
            }
            low[i] = vmath::min(low[i], p);
            if TOP2 {
                push_top2(&mut first[i], &mut second[i], p);
            } else if TOP1 {
                first[i] = vmath::max(first[i], p);
            }
        }
    }
    let stats = |i: usize| Stats {
        norm: sum[i],
        t: t[i],
        a1: first[i],
        a2: if TOP2 { vmath::max(second[i], 0.0) } else { 0.0 },
        valid: probs_valid(sum[i], t[i], low[i], tolerance),
    };
    finish::<M>(strategy, classes, inv_ln_c, stats, out);
}

/// Logit planes (softmax fused), same addressing as [`probs`].
#[inline(always)]
pub fn logits<M: MulAdd, const PLOGP: bool, const NORM: bool, const TOP2: bool>(
    data: &[f32],
    stride: usize,
    classes: usize,
    strategy: Strategy,
    inv_ln_c: f32,
    out: TileOut<'_>,
) {
    let mut first = [f32::NEG_INFINITY; TILE];
    let mut second = [f32::NEG_INFINITY; TILE];
    let mut check = [0.0f32; TILE];
    for j in 0..classes {
        let v = plane(data, stride, j);
        for i in 0..TILE {
            if TOP2 {
                push_top2(&mut first[i], &mut second[i], v[i]);
            } else {
                first[i] = vmath::max(first[i], v[i]);
            }
            check[i] = M::mul_add(v[i], 0.0, check[i]);
        }
    }
    let mut z = [0.0f32; TILE];
    let mut t = [0.0f32; TILE];
    if NORM {
        for j in 0..classes {
            let v = plane(data, stride, j);
            for i in 0..TILE {
                let y = vmath::max(v[i] - first[i], -88.0);
                let e = vmath::exp_nonpositive::<M>(y);
                z[i] += e;
                if PLOGP {
                    t[i] = M::mul_add(e, y, t[i]);
                }
            }
        }
    }
    let stats = |i: usize| Stats {
        norm: if NORM { z[i] } else { 1.0 },
        t: t[i],
        a1: 1.0,
        a2: if TOP2 { vmath::exp_nonpositive::<M>(vmath::max(second[i] - first[i], -88.0)) } else { 0.0 },
        valid: check[i] == 0.0,
    };
    finish::<M>(strategy, classes, inv_ln_c, stats, out);
}
