//! Hamming distances between 64-bit hashes: the lookup of a perceptual hash among a group's
//! (near-duplicate suppression in the uploader, `python/triton_al/uploader/near_duplicates.py`).

const CHUNK: usize = 1024;

/// The position and distance of the hash in `hashes` nearest to `h` in bits (the first of
/// equals), or None when `hashes` is empty. A linear scan: the minimum per chunk of 1024
/// (vectorised), positions looked for only in a chunk that improves on the best so far.
pub fn nearest_hamming(hashes: &[u64], h: u64) -> Option<(usize, u32)> {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("popcnt") {
            // SAFETY: the CPU has POPCNT (checked just above).
            return unsafe { nearest_popcnt(hashes, h) };
        }
    }
    nearest_in(hashes, h)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "popcnt")]
unsafe fn nearest_popcnt(hashes: &[u64], h: u64) -> Option<(usize, u32)> {
    nearest_in(hashes, h)
}

#[inline(always)]
fn nearest_in(hashes: &[u64], h: u64) -> Option<(usize, u32)> {
    let mut best: Option<(usize, u32)> = None;
    for (c, chunk) in hashes.chunks(CHUNK).enumerate() {
        let least = chunk.iter().map(|&x| (x ^ h).count_ones()).min().unwrap_or(u32::MAX);
        if best.map_or(true, |(_, d)| least < d) {
            let at = chunk.iter().position(|&x| (x ^ h).count_ones() == least).unwrap_or(0);
            best = Some((c * CHUNK + at, least));
            if least == 0 {
                break;
            }
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(hashes: &[u64], h: u64) -> Option<(usize, u32)> {
        let mut best: Option<(usize, u32)> = None;
        for (i, &x) in hashes.iter().enumerate() {
            let d = (x ^ h).count_ones();
            if best.map_or(true, |(_, b)| d < b) {
                best = Some((i, d));
            }
        }
        best
    }

    #[test]
    fn matches_a_naive_scan() {
        assert_eq!(nearest_hamming(&[], 5), None);
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for n in [1usize, 7, 1023, 1024, 1025, 5000] {
            let hashes: Vec<u64> = (0..n).map(|_| next()).collect();
            for _ in 0..20 {
                let h = next();
                assert_eq!(nearest_hamming(&hashes, h), naive(&hashes, h));
            }
            let h = hashes[n / 2] ^ 0b101; // two bits from an entry
            assert_eq!(nearest_hamming(&hashes, h), naive(&hashes, h));
            assert!(nearest_hamming(&hashes, h).unwrap().1 <= 2);
        }
        assert_eq!(nearest_hamming(&[0, u64::MAX, 3], u64::MAX), Some((1, 0)));
        assert_eq!(nearest_hamming(&[0b11, 0b01, 0b01], 0), Some((1, 1)));
    }
}
