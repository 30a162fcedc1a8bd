//! Counter-based uniform numbers: item `i` of a call seeded `s` always gets the same value,
//! whatever the thread split, so random sampling is reproducible.

/// SplitMix64's finaliser: a good 64-bit mix of (seed, index).
#[inline(always)]
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Uniform in [0, 1) with 24 random bits (exactly representable in f32).
#[inline(always)]
pub fn uniform(seed: u64, index: u64) -> f32 {
    let z = mix(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ mix(index.wrapping_add(0x632b_e59b_d9b4_e019)));
    (z >> 40) as f32 * (1.0 / (1u64 << 24) as f32)
}

/// Replace every non-NaN score with a uniform draw (NaN marks invalid output and stays).
pub fn fill(scores: &mut [f32], seed: u64) {
    for (i, s) in scores.iter_mut().enumerate() {
        if !s.is_nan() {
            *s = uniform(seed, i as u64);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uniform_is_in_range_and_roughly_flat() {
        let n = 100_000;
        let mut below_half = 0;
        for i in 0..n {
            let u = uniform(7, i);
            assert!((0.0..1.0).contains(&u));
            if u < 0.5 {
                below_half += 1;
            }
        }
        assert!((below_half as f64 / n as f64 - 0.5).abs() < 0.01);
        assert_ne!(uniform(1, 0), uniform(2, 0));
        assert_eq!(uniform(3, 9), uniform(3, 9));
    }
}
