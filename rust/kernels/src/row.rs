//! Distribution statistics for a row whose classes are contiguous (`[.., C]` with C large):
//! the lanes run along the row. Small C goes to [`crate::planar`] instead.

use crate::distribution::{merge_top2, probs_valid, push_top2, Stats};
use crate::vmath::{self, Lanes, MulAdd, LANES, TINY};

#[inline(always)]
fn top_two<const TOP2: bool>(first: &Lanes, second: &Lanes) -> (f32, f32) {
    if TOP2 {
        merge_top2(first, second)
    } else {
        (vmath::hmax(first), f32::NEG_INFINITY)
    }
}

/// Statistics of a probability row. `PLOGP`: compute `Σ p ln p`; `TOP2`: the runner-up.
#[inline(always)]
pub fn probs<M: MulAdd, const PLOGP: bool, const TOP1: bool, const TOP2: bool>(row: &[f32], tolerance: f32) -> Stats {
    let mut sum: Lanes = [0.0; LANES];
    let mut t: Lanes = [0.0; LANES];
    let mut low: Lanes = [0.0; LANES];
    let mut first: Lanes = [f32::NEG_INFINITY; LANES];
    let mut second: Lanes = [f32::NEG_INFINITY; LANES];
    let chunks = row.chunks_exact(LANES);
    let tail = chunks.remainder();
    for chunk in chunks {
        let v: &Lanes = chunk.try_into().unwrap();
        for k in 0..LANES {
            let p = v[k];
            sum[k] += p;
            if PLOGP {
                t[k] = M::mul_add(p, vmath::ln::<M>(vmath::max(p, TINY)), t[k]);
            }
            low[k] = vmath::min(low[k], p);
            if TOP2 {
                push_top2(&mut first[k], &mut second[k], p);
            } else if TOP1 {
                first[k] = vmath::max(first[k], p);
            }
        }
    }
    let (mut s, mut tt, mut lo) = (vmath::hsum(&sum), vmath::hsum(&t), vmath::hmin(&low));
    let (mut a1, mut a2) = top_two::<TOP2>(&first, &second);
    for &p in tail {
        s += p;
        if PLOGP {
            tt += vmath::p_ln_p::<M>(p);
        }
        lo = vmath::min(lo, p);
        push_top2(&mut a1, &mut a2, p);
    }
    let a2 = if TOP2 { vmath::max(a2, 0.0) } else { 0.0 };
    Stats { norm: s, t: tt, a1, a2, valid: probs_valid(s, tt, lo, tolerance) }
}

/// Statistics of a logit row (softmax fused). `NORM`: compute `Σ e^y` (ratio needs none).
#[inline(always)]
pub fn logits<M: MulAdd, const PLOGP: bool, const NORM: bool, const TOP2: bool>(row: &[f32]) -> Stats {
    // Pass 1: top-2 and a finiteness check (x * 0 is NaN exactly when x is NaN or ±Inf).
    let mut first: Lanes = [f32::NEG_INFINITY; LANES];
    let mut second: Lanes = [f32::NEG_INFINITY; LANES];
    let mut check: Lanes = [0.0; LANES];
    let chunks = row.chunks_exact(LANES);
    let tail = chunks.remainder();
    for chunk in chunks {
        let v: &Lanes = chunk.try_into().unwrap();
        for k in 0..LANES {
            if TOP2 {
                push_top2(&mut first[k], &mut second[k], v[k]);
            } else {
                first[k] = vmath::max(first[k], v[k]);
            }
            check[k] = M::mul_add(v[k], 0.0, check[k]);
        }
    }
    let (mut x1, mut x2) = top_two::<TOP2>(&first, &second);
    let mut finite = vmath::hsum(&check);
    for &x in tail {
        push_top2(&mut x1, &mut x2, x);
        finite += x * 0.0;
    }
    if finite != 0.0 || row.is_empty() {
        return Stats { norm: 1.0, t: 0.0, a1: 1.0, a2: 0.0, valid: false };
    }
    let a2 = if TOP2 { vmath::exp_nonpositive::<M>(vmath::max(x2 - x1, -88.0)) } else { 0.0 };
    if !NORM {
        return Stats { norm: 1.0, t: 0.0, a1: 1.0, a2, valid: true };
    }
    // Pass 2 (the row is in L1 by now): Σ e^y and Σ e^y·y with y = x − max, clamped at −88
    // where e^y is 0 for float32 sums (so e^y·y vanishes too).
    let mut z: Lanes = [0.0; LANES];
    let mut t: Lanes = [0.0; LANES];
    for chunk in row.chunks_exact(LANES) {
        let v: &Lanes = chunk.try_into().unwrap();
        for k in 0..LANES {
            let y = vmath::max(v[k] - x1, -88.0);
            let e = vmath::exp_nonpositive::<M>(y);
            z[k] += e;
            if PLOGP {
                t[k] = M::mul_add(e, y, t[k]);
            }
        }
    }
    let (mut zz, mut tt) = (vmath::hsum(&z), vmath::hsum(&t));
    for &x in tail {
        let y = vmath::max(x - x1, -88.0);
        let e = vmath::exp_nonpositive::<M>(y);
        zz += e;
        if PLOGP {
            tt += e * y;
        }
    }
    Stats { norm: zz, t: tt, a1: 1.0, a2, valid: true }
}
