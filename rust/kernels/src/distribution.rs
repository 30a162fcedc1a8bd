//! Summary statistics of one class distribution, and the strategy scores derived from them.
//!
//! Both input kinds reduce to the same numbers in one pass over the classes: a normaliser
//! `N`, `T`, and the two largest unnormalised masses `a1 ≥ a2`, such that
//! `p_i = a_i / N`, `H(p) = ln N − T / N`, `p(1st) = a1 / N`, `p(2nd) = a2 / N`.
//! - probabilities: `N = Σ p`, `T = Σ p ln p`, `a = p` (rows are renormalised by their sum);
//! - logits: with `m = max x` and `y = x − m`: `N = Σ e^y`, `T = Σ e^y · y`, `a1 = 1`,
//!   `a2 = e^(x2 − m)` — the numerically stable softmax, never materialised.

use crate::options::Strategy;
use crate::vmath::{self, Lanes, MulAdd, LANES};

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

/// Validity of a probability row from its running checks (NaN fails every comparison).
#[inline(always)]
pub fn probs_valid(sum: f32, t: f32, min_p: f32, tolerance: f32) -> bool {
    (sum - 1.0).abs() <= tolerance && t * 0.0 == 0.0 && min_p >= 0.0
}

/// What a strategy needs from the pass over the classes. `Σ p ln p` costs a log per element
/// and the runner-up costs three more operations, so each is computed only when used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Needs {
    pub plogp: bool,
    /// The largest probability (always tracked for logits: the softmax shift needs it).
    pub top1: bool,
    pub top2: bool,
    /// The softmax normaliser (logits only; probabilities always sum).
    pub norm: bool,
}

impl Needs {
    pub fn of(strategy: Strategy, need_top1: bool) -> Needs {
        match strategy {
            Strategy::Entropy => Needs { plogp: true, top1: need_top1, top2: false, norm: true },
            Strategy::LeastConfidence => Needs { plogp: false, top1: true, top2: false, norm: true },
            Strategy::Margin => Needs { plogp: false, top1: true, top2: true, norm: true },
            Strategy::Ratio => Needs { plogp: false, top1: true, top2: true, norm: need_top1 },
            Strategy::Random => Needs { plogp: false, top1: need_top1, top2: false, norm: need_top1 },
        }
    }
}

/// Confidence in [0, 1] for `classes` classes, NaN when the distribution was invalid.
#[inline(always)]
pub fn strategy_score<M: MulAdd>(s: &Stats, strategy: Strategy, classes: usize, inv_ln_c: f32) -> f32 {
    if !s.valid {
        return f32::NAN;
    }
    let score = match strategy {
        Strategy::Entropy => {
            if classes < 2 {
                1.0
            } else {
                let h = vmath::ln::<M>(s.norm) - s.t / s.norm;
                1.0 - h * inv_ln_c
            }
        }
        Strategy::LeastConfidence => {
            if classes < 2 {
                1.0
            } else {
                let c = classes as f32;
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

/// 1 / ln C, hoisted out of the per-item loops.
pub fn inv_ln_classes(classes: usize) -> f32 {
    if classes < 2 {
        0.0
    } else {
        (1.0 / (classes as f64).ln()) as f32
    }
}

/// Merge per-lane (first, second) trackers into the row's top two, without branches.
#[inline(always)]
pub fn merge_top2(first: &Lanes, second: &Lanes) -> (f32, f32) {
    let a1 = vmath::hmax(first);
    let mut ties = 0u32;
    let mut rest = f32::NEG_INFINITY;
    for k in 0..LANES {
        let is_top = first[k] == a1;
        ties += is_top as u32;
        rest = vmath::max(rest, if is_top { second[k] } else { first[k] });
    }
    (a1, if ties > 1 { a1 } else { rest })
}

/// Insert one value into a (first, second) pair.
#[inline(always)]
pub fn push_top2(first: &mut f32, second: &mut f32, v: f32) {
    let lo = vmath::min(*first, v);
    *first = vmath::max(*first, v);
    *second = vmath::max(*second, lo);
}
