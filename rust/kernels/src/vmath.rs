//! Branch-free scalar math that LLVM vectorises.
//!
//! `f32::ln` and `f32::exp` call libm one element at a time, which is slower than numpy.
//! These are the classic Cephes single-precision approximations (about 1 ulp), written
//! with bit manipulation and selects only, so a loop over a fixed-size lane array compiles
//! to AVX-512 / AVX2 / SSE code depending on the features of the calling function.

/// Number of f32 lanes the kernels process together (one AVX-512 register).
pub const LANES: usize = 16;
pub type Lanes = [f32; LANES];

const SQRT_2: f32 = std::f32::consts::SQRT_2;
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

/// Natural log for positive normal inputs (callers clamp to [`TINY`], ∞ is screened out).
#[inline(always)]
pub fn ln(x: f32) -> f32 {
    let bits = x.to_bits();
    let exponent = ((bits >> 23) & 0xff) as i32 - 127;
    let mantissa = f32::from_bits((bits & 0x007f_ffff) | 0x3f80_0000); // in [1, 2)
    let big = mantissa > SQRT_2;
    let m = if big { mantissa * 0.5 } else { mantissa }; // in [sqrt(1/2), sqrt(2))
    let e = (if big { exponent + 1 } else { exponent }) as f32;
    let f = m - 1.0;
    let z = f * f;
    let mut p = 7.037_683_6e-2_f32;
    p = p * f - 1.151_461_1e-1;
    p = p * f + 1.167_699_9e-1;
    p = p * f - 1.242_014_1e-1;
    p = p * f + 1.424_932_3e-1;
    p = p * f - 1.666_805_8e-1;
    p = p * f + 2.000_071_5e-1;
    p = p * f - 2.499_999_4e-1;
    p = p * f + 3.333_333_1e-1;
    let mut y = p * f * z;
    y += LN2_LO * e;
    y -= 0.5 * z;
    f + y + LN2_HI * e
}

/// e^x; inputs below -87.3 give ~1e-38 instead of a subnormal, which is 0 for our sums.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    let x = min(max(x, -87.336_54), 88.376_26);
    let shifted = x * LOG2_E + ROUND_MAGIC;
    let n = shifted - ROUND_MAGIC;
    let n_int = (shifted.to_bits() as i32).wrapping_sub(ROUND_MAGIC.to_bits() as i32);
    let r = x - n * LN2_HI - n * LN2_LO;
    let z = r * r;
    let mut p = 1.987_569_1e-4_f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 5.000_000_1e-1;
    let y = p * z + r + 1.0;
    y * f32::from_bits(((n_int + 127) as u32) << 23)
}

/// `p ln p` with the limit 0 at p = 0 (and for anything below [`TINY`]).
#[inline(always)]
pub fn p_ln_p(p: f32) -> f32 {
    let t = p * ln(max(p, TINY));
    if p > TINY {
        t
    } else {
        0.0
    }
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
            let got = ln(x) as f64;
            assert!((got - want).abs() <= 2.5e-7 * want.abs().max(1.0), "ln({x}) = {got}, want {want}");
            x *= 1.0173;
        }
    }

    #[test]
    fn exp_matches_std_on_the_useful_range() {
        let mut x = -87.0f32;
        while x < 88.0 {
            let want = (x as f64).exp();
            let got = exp(x) as f64;
            assert!((got - want).abs() <= 3e-7 * want, "exp({x}) = {got}, want {want}");
            x += 0.0137;
        }
        assert_eq!(exp(0.0), 1.0);
        assert!(exp(-1.0e4) < 2.0e-38);
        assert!(exp(f32::NEG_INFINITY) < 2.0e-38);
    }

    #[test]
    fn p_ln_p_limits() {
        assert_eq!(p_ln_p(0.0), 0.0);
        assert_eq!(p_ln_p(1.0), 0.0);
        assert!((p_ln_p(0.5) - 0.5 * 0.5f32.ln()).abs() < 1e-7);
    }
}
