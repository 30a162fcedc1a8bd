//! Summary statistics of one class distribution, and the strategy scores derived from them.
//!
//! Both input kinds reduce to the same four numbers in one pass over the classes:
//! a normaliser `N`, `T`, and the two largest unnormalised masses `a1 ≥ a2`, such that
//! `p_i = a_i / N`, `H(p) = ln N − T / N`, `p(1st) = a1 / N`, `p(2nd) = a2 / N`.
//! - probabilities: `N = Σ p`, `T = Σ p ln p`, `a = p` (rows are renormalised by their sum);
//! - logits: with `m = max x` and `y = x − m`: `N = Σ e^y`, `T = Σ e^y · y`, `a1 = 1`,
//!   `a2 = e^(x2 − m)` — the numerically stable softmax, never materialised.

use crate::options::Strategy;
use crate::vmath;

#[derive(Clone, Copy, Debug)]
pub struct Stats {
    pub norm: f32,
    pub t: f32,
    pub a1: f32,
    pub a2: f32,
    /// False for NaN/Inf, negative probabilities or a sum off by more than the tolerance.
    pub valid: bool,
}

impl Stats {
    /// Probability of the most likely class (the detection confidence of a box).
    #[inline(always)]
    pub fn top1(&self) -> f32 {
        self.a1 / self.norm
    }
}

/// Validity of a probability row from its running checks.
#[inline(always)]
pub fn probs_valid(sum: f32, t: f32, min_p: f32, tolerance: f32) -> bool {
    sum.is_finite() && t.is_finite() && min_p >= 0.0 && (sum - 1.0).abs() <= tolerance
}

/// Confidence in [0, 1] for `classes` classes, NaN when the distribution was invalid.
#[inline(always)]
pub fn strategy_score(s: &Stats, strategy: Strategy, classes: usize) -> f32 {
    if !s.valid {
        return f32::NAN;
    }
    let c = classes as f32;
    let score = match strategy {
        Strategy::Entropy => {
            if classes < 2 {
                1.0
            } else {
                let h = vmath::ln(s.norm) - s.t / s.norm;
                1.0 - h / (c.ln())
            }
        }
        Strategy::LeastConfidence => {
            if classes < 2 {
                1.0
            } else {
                (s.top1() - 1.0 / c) / (1.0 - 1.0 / c)
            }
        }
        Strategy::Margin => (s.a1 - s.a2) / s.norm,
        Strategy::Ratio => 1.0 - s.a2 / s.a1,
        // Filled in by the caller from its generator; validity is all that matters here.
        Strategy::Random => 0.0,
    };
    vmath::min(vmath::max(score, 0.0), 1.0)
}

/// Merge per-lane top-2 trackers into the row's top-2.
#[inline(always)]
pub fn merge_top2(first: &vmath::Lanes, second: &vmath::Lanes) -> (f32, f32) {
    let mut a1 = f32::NEG_INFINITY;
    let mut a2 = f32::NEG_INFINITY;
    for &v in first.iter().chain(second.iter()) {
        if v > a1 {
            a2 = a1;
            a1 = v;
        } else if v > a2 {
            a2 = v;
        }
    }
    (a1, a2)
}

/// Insert one value into a (first, second) pair.
#[inline(always)]
pub fn push_top2(first: &mut f32, second: &mut f32, v: f32) {
    let lo = vmath::min(*first, v);
    *first = vmath::max(*first, v);
    *second = vmath::max(*second, lo);
}
