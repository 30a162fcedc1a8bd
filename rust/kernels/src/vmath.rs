//! Branch-free scalar math that LLVM vectorises.
//!
//! `f32::ln` and `f32::exp` call libm one element at a time, which is slower than numpy.
//! These are Cephes-style single-precision approximations (range reduction + polynomial), written
//! with bit manipulation and selects only, so a loop over a fixed-size lane array compiles
//! to AVX-512 / AVX2 / SSE code depending on the features of the calling function.

/// Number of f32 lanes the kernels process together (one AVX-512 register).
pub const LANES: usize = 16;
pub type Lanes = [f32; LANES];

/// Fused multiply-add where the CPU has it (the AVX2/AVX-512 variants), separate multiply and
/// add in the portable variant: `f32::mul_add` without hardware FMA is a slow libm call.
pub trait MulAdd: Copy + Send + Sync + 'static {
    fn mul_add(a: f32, b: f32, c: f32) -> f32;
}

#[derive(Clone, Copy, Debug)]
pub struct Fused;

#[derive(Clone, Copy, Debug)]
pub struct Separate;

impl MulAdd for Fused {
    #[inline(always)]
    fn mul_add(a: f32, b: f32, c: f32) -> f32 {
        a.mul_add(b, c)
    }
}

impl MulAdd for Separate {
    #[inline(always)]
    fn mul_add(a: f32, b: f32, c: f32) -> f32 {
        a * b + c
    }
}

const SQRT_HALF_BITS: u32 = 0x3f35_04f3;
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
const LOG2_E: f32 = std::f32::consts::LOG2_E;
/// 1.5 * 2^23: adding and subtracting it rounds to the nearest integer in any SIMD width.
const ROUND_MAGIC: f32 = 12_582_912.0;

/// Smallest probability whose `p ln p` we compute; below it the term is 0 to within 1e-28.
pub const TINY: f32 = 1.0e-30;

#[inline(always)]
pub fn max(a: f32, b: f32) -> f32 {
    if a > b {
        a
    } else {
        b
    }
}

#[inline(always)]
pub fn min(a: f32, b: f32) -> f32 {
    if a < b {
        a
    } else {
        b
    }
}

/// Natural log for positive normal inputs (callers clamp to [`TINY`]; ∞ is screened out).
/// Absolute error below 1e-7 for x ≤ 1, which is what `Σ p ln p` needs.
#[inline(always)]
pub fn ln<M: MulAdd>(x: f32) -> f32 {
    // x = 2^k · m with m in [sqrt(1/2), sqrt(2)), by integer arithmetic only (no selects).
    let shifted = x.to_bits().wrapping_sub(SQRT_HALF_BITS);
    let k = ((shifted as i32) >> 23) as f32;
    let m = f32::from_bits((shifted & 0x007f_ffff).wrapping_add(SQRT_HALF_BITS));
    // ln(1 + f) = f − f²/2 + f³·Q(f): Q fitted on the reduced range (Chebyshev least squares).
    let f = m - 1.0;
    let z = f * f;
    let mut q = 9.271_979_8e-2_f32;
    q = M::mul_add(q, f, -1.411_843_3e-1);
    q = M::mul_add(q, f, 1.467_646_9e-1);
    q = M::mul_add(q, f, -1.659_285_7e-1);
    q = M::mul_add(q, f, 1.998_512_2e-1);
    q = M::mul_add(q, f, -2.500_092_2e-1);
    q = M::mul_add(q, f, 3.333_341e-1);
    let y = M::mul_add(z * f, q, M::mul_add(-0.5, z, f));
    M::mul_add(k, LN2_HI, M::mul_add(k, LN2_LO, y))
}

/// e^y for y in [-88, 0] (callers clamp): the softmax numerators. Relative error ~1e-7.
#[inline(always)]
pub fn exp_nonpositive<M: MulAdd>(y: f32) -> f32 {
    let shifted = M::mul_add(y, LOG2_E, ROUND_MAGIC);
    let n = shifted - ROUND_MAGIC;
    let n_int = (shifted.to_bits() as i32).wrapping_sub(ROUND_MAGIC.to_bits() as i32);
    let r = M::mul_add(n, -LN2_LO, M::mul_add(n, -LN2_HI, y));
    let mut p = 1.987_569_1e-4_f32;
    p = M::mul_add(p, r, 1.398_199_9e-3);
    p = M::mul_add(p, r, 8.333_452e-3);
    p = M::mul_add(p, r, 4.166_579_6e-2);
    p = M::mul_add(p, r, 1.666_666_5e-1);
    p = M::mul_add(p, r, 5.000_000_1e-1);
    let e_r = M::mul_add(p, r * r, r + 1.0);
    // 2^n by building the exponent field; n ≥ −127 gives 0 (e^−88 is 0 for our sums).
    e_r * f32::from_bits(((n_int + 127).max(0) as u32) << 23)
}

/// `p ln p` with the limit 0 at p = 0: clamping to TINY makes 0 · ln(TINY) exactly 0 and
/// anything below TINY contributes less than 1e-28.
#[inline(always)]
pub fn p_ln_p<M: MulAdd>(p: f32) -> f32 {
    p * ln::<M>(max(p, TINY))
}

#[inline(always)]
pub fn hsum(v: &Lanes) -> f32 {
    // Pairwise: deterministic order and a little more accurate than a running sum.
    let mut w = *v;
    let mut width = LANES / 2;
    while width > 0 {
        for i in 0..width {
            w[i] += w[i + width];
        }
        width /= 2;
    }
    w[0]
}

#[inline(always)]
pub fn hmax(v: &Lanes) -> f32 {
    v.iter().copied().fold(f32::NEG_INFINITY, max)
}

#[inline(always)]
pub fn hmin(v: &Lanes) -> f32 {
    v.iter().copied().fold(f32::INFINITY, min)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ln_matches_std_to_a_few_ulp() {
        let mut x = TINY;
        while x < 1.0e30 {
            let want = (x as f64).ln();
            let got = ln::<Separate>(x) as f64;
            let fused = ln::<Fused>(x) as f64;
            assert!((fused - got).abs() <= 1e-6 * want.abs().max(1.0));
            // Absolute accuracy near 1 (what Σ p ln p needs), relative elsewhere.
            assert!((got - want).abs() <= 2e-7 * want.abs().max(1.0), "ln({x}) = {got}, want {want}");
            x *= 1.0173;
        }
    }

    #[test]
    fn exp_matches_std_on_the_useful_range() {
        let mut x = -87.0f32;
        while x <= 0.0 {
            let want = (x as f64).exp();
            for got in [exp_nonpositive::<Separate>(x) as f64, exp_nonpositive::<Fused>(x) as f64] {
                assert!((got - want).abs() <= 3e-7 * want, "exp({x}) = {got}, want {want}");
            }
            x += 0.0137;
        }
        assert_eq!(exp_nonpositive::<Fused>(0.0), 1.0);
        assert!(exp_nonpositive::<Separate>(-88.0) < 1.0e-38);
    }

    #[test]
    fn p_ln_p_limits() {
        assert_eq!(p_ln_p::<Fused>(0.0), 0.0);
        assert_eq!(p_ln_p::<Fused>(1.0), 0.0);
        assert!((p_ln_p::<Separate>(0.5) - 0.5 * 0.5f32.ln()).abs() < 1e-7);
    }
}
