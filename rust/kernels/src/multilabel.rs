//! Per-label scores for multi-label heads: each label is an independent yes/no with
//! probability q (a sigmoid output, or its logit). The strategies on two classes {q, 1 − q}:
//! entropy 1 − h(q)/ln 2; least confidence and margin |2q − 1|; ratio 1 − min/max.

use crate::options::Strategy;
use crate::vmath::{self, MulAdd};

const INV_LN2: f32 = std::f32::consts::LOG2_E;

#[inline(always)]
fn clamp01(score: f32, valid: bool) -> f32 {
    if valid {
        vmath::min(vmath::max(score, 0.0), 1.0)
    } else {
        f32::NAN
    }
}

/// Score of one label from its probability; NaN unless 0 ≤ q ≤ 1.
#[inline(always)]
pub fn from_probability<M: MulAdd>(q: f32, strategy: Strategy) -> f32 {
    let valid = q >= 0.0 && q <= 1.0; // false for NaN
    let r = 1.0 - q;
    let score = match strategy {
        Strategy::Entropy => M::mul_add(vmath::p_ln_p::<M>(q) + vmath::p_ln_p::<M>(r), INV_LN2, 1.0),
        Strategy::LeastConfidence | Strategy::Margin => (q - r).abs(),
        Strategy::Ratio => 1.0 - vmath::min(q, r) / vmath::max(q, r),
        Strategy::Random => 0.0,
    };
    clamp01(score, valid)
}

/// Score of one label from its logit x (q = σ(x)), stable for any finite x; NaN for ±Inf/NaN.
#[inline(always)]
pub fn from_logit<M: MulAdd>(x: f32, strategy: Strategy) -> f32 {
    let valid = x * 0.0 == 0.0;
    // With a = |x| and e = e^−a: the smaller of q, 1 − q is e/(1+e) and
    // h = ln(1+e) + a·e/(1+e).
    let a = vmath::min(x.abs(), 88.0);
    let e = vmath::exp_nonpositive::<M>(-a);
    let score = match strategy {
        Strategy::Entropy => 1.0 - (vmath::ln::<M>(1.0 + e) + a * e / (1.0 + e)) * INV_LN2,
        Strategy::LeastConfidence | Strategy::Margin => (1.0 - e) / (1.0 + e),
        Strategy::Ratio => 1.0 - e,
        Strategy::Random => 0.0,
    };
    clamp01(score, valid)
}
