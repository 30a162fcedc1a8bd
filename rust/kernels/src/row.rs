//! Distribution statistics for a row whose classes are contiguous (`[.., C]` with C large):
//! the lanes run along the row. Small C goes to [`crate::planar`] instead.

use crate::distribution::{merge_top2, probs_valid, push_top2, Stats};
use crate::vmath::{self, Lanes, LANES};

/// Statistics of a probability row. `PLOGP` selects whether `Σ p ln p` is computed.
#[inline(always)]
pub fn probs<const PLOGP: bool>(row: &[f32], tolerance: f32) -> Stats {
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
                t[k] += vmath::p_ln_p(p);
            }
            low[k] = vmath::min(low[k], p);
            push_top2(&mut first[k], &mut second[k], p);
        }
    }
    let (mut s, mut tt, mut lo) = (vmath::hsum(&sum), vmath::hsum(&t), vmath::hmin(&low));
    let (mut a1, mut a2) = merge_top2(&first, &second);
    for &p in tail {
        s += p;
        if PLOGP {
            tt += vmath::p_ln_p(p);
        }
        lo = vmath::min(lo, p);
        push_top2(&mut a1, &mut a2, p);
    }
    let a2 = vmath::max(a2, 0.0);
    Stats { norm: s, t: tt, a1, a2, valid: probs_valid(s, tt, lo, tolerance) }
}

/// Statistics of a logit row (softmax fused). `PLOGP` selects whether `Σ e^y y` is computed,
/// `NORM` whether `Σ e^y` is (the ratio strategy needs neither).
#[inline(always)]
pub fn logits<const PLOGP: bool, const NORM: bool>(row: &[f32]) -> Stats {
    // Pass 1: top-2 and a finiteness check (x * 0 is NaN exactly when x is NaN or ±Inf).
    let mut first: Lanes = [f32::NEG_INFINITY; LANES];
    let mut second: Lanes = [f32::NEG_INFINITY; LANES];
    let mut check: Lanes = [0.0; LANES];
    let chunks = row.chunks_exact(LANES);
    let tail = chunks.remainder();
    for chunk in chunks {
        let v: &Lanes = chunk.try_into().unwrap();
        for k in 0..LANES {
            push_top2(&mut first[k], &mut second[k], v[k]);
            check[k] += v[k] * 0.0;
        }
    }
    let (mut x1, mut x2) = merge_top2(&first, &second);
    let mut finite = vmath::hsum(&check);
    for &x in tail {
        push_top2(&mut x1, &mut x2, x);
        finite += x * 0.0;
    }
    if finite != 0.0 || row.is_empty() {
        return Stats { norm: 1.0, t: 0.0, a1: 1.0, a2: 0.0, valid: false };
    }
    let a2 = if x2 == f32::NEG_INFINITY { 0.0 } else { vmath::exp(x2 - x1) };
    if !NORM {
        return Stats { norm: 1.0, t: 0.0, a1: 1.0, a2, valid: true };
    }
    // Pass 2 (the row is in L1 by now): Σ e^y and Σ e^y·y with y = x − max.
    let mut z: Lanes = [0.0; LANES];
    let mut t: Lanes = [0.0; LANES];
    for chunk in row.chunks_exact(LANES) {
        let v: &Lanes = chunk.try_into().unwrap();
        for k in 0..LANES {
            // exp clamps far-negative y to ~1e-38, so clamp y too or e·y would not vanish.
            let y = vmath::max(v[k] - x1, -88.0);
            let e = vmath::exp(y);
            z[k] += e;
            if PLOGP {
                t[k] += e * y;
            }
        }
    }
    let (mut zz, mut tt) = (vmath::hsum(&z), vmath::hsum(&t));
    for &x in tail {
        let y = vmath::max(x - x1, -88.0);
        let e = vmath::exp(y);
        zz += e;
        if PLOGP {
            tt += e * y;
        }
    }
    Stats { norm: zz, t: tt, a1: 1.0, a2, valid: true }
}
