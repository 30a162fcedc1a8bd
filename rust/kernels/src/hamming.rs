//! Hamming distances between hashes: the lookup of a perceptual hash among a group's
//! (near-duplicate suppression in the uploader, `python/triton_al/uploader/near_duplicates.py`).
//! `nearest_hamming` scans 64-bit hashes; `nearest_hamming_rows` scans rows of several 64-bit
//! words made of one or more hashes each (the nearest by the closest of a row's hashes).

use crate::KernelError;

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

/// The position and distance of the row of `rows` nearest to `h` (the first of equals), or
/// None when there is no row. `rows` holds rows of `width` words each, row-major; a row is
/// `parts` hashes of `width / parts` words, and its distance to `h` (laid out the same way) is
/// the smallest of the Hamming distances between its hashes and the corresponding ones of `h`.
/// With `parts` = 1 a row is one hash of `width * 64` bits.
pub fn nearest_hamming_rows(rows: &[u64], width: usize, parts: usize, h: &[u64]) -> Result<Option<(usize, u32)>, KernelError> {
    check_rows(rows, width, parts, h)?;
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("popcnt") {
            // SAFETY: the CPU has POPCNT (checked just above).
            return Ok(unsafe { rows_popcnt(rows, width, parts, h) });
        }
    }
    Ok(rows_dispatch(rows, width, parts, h))
}

/// The checks both row lookups make of their arguments; the number of rows.
fn check_rows(rows: &[u64], width: usize, parts: usize, h: &[u64]) -> Result<usize, KernelError> {
    if width == 0 || parts == 0 || width % parts != 0 {
        return Err(KernelError(format!("parts: expected a divisor of the row width ({width} words), got {parts}")));
    }
    if h.len() != width {
        return Err(KernelError(format!("h: expected {width} words (the row width), got {}", h.len())));
    }
    if rows.len() % width != 0 {
        return Err(KernelError(format!("rows: expected a multiple of {width} words, got {}", rows.len())));
    }
    Ok(rows.len() / width)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "popcnt")]
unsafe fn rows_popcnt(rows: &[u64], width: usize, parts: usize, h: &[u64]) -> Option<(usize, u32)> {
    rows_dispatch(rows, width, parts, h)
}

/// The nearest row of `rows` (as `nearest_hamming_rows`) among those within `max_distance`
/// bits of `h`, or None when none is. `lead` holds the first word of each of a row's `parts`
/// hashes, row by row (`parts` words per row), kept by the caller beside `rows`: a word's
/// distance is at most its hash's, so a row whose lead words are all farther than the limit
/// is passed over without reading it. The scan reads `parts` words per row instead of
/// `width`; the rows are read only for the few that pass. `lead` must agree with `rows`
/// (otherwise rows may be missed; nothing worse).
pub fn nearest_hamming_within(rows: &[u64], lead: &[u64], width: usize, parts: usize, h: &[u64], max_distance: u32) -> Result<Option<(usize, u32)>, KernelError> {
    let n = check_rows(rows, width, parts, h)?;
    if lead.len() != n * parts {
        return Err(KernelError(format!("lead: expected {} words ({parts} per row of rows), got {}", n * parts, lead.len())));
    }
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("popcnt") {
            // SAFETY: the CPU has POPCNT (checked just above).
            return Ok(unsafe { within_popcnt(rows, lead, width, parts, h, max_distance) });
        }
    }
    Ok(within_dispatch(rows, lead, width, parts, h, max_distance))
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "popcnt")]
unsafe fn within_popcnt(rows: &[u64], lead: &[u64], width: usize, parts: usize, h: &[u64], max_distance: u32) -> Option<(usize, u32)> {
    within_dispatch(rows, lead, width, parts, h, max_distance)
}

#[inline(always)]
fn within_dispatch(rows: &[u64], lead: &[u64], width: usize, parts: usize, h: &[u64], max_distance: u32) -> Option<(usize, u32)> {
    match (width, parts) {
        (8, 2) => within_fixed::<8, 2>(rows, lead, h, max_distance),
        (4, 1) => within_fixed::<4, 1>(rows, lead, h, max_distance),
        _ => within_in(rows, lead, width, parts, h, max_distance),
    }
}

/// Fixed shapes: per chunk of 1024 rows, the lead words' distances first (a loop without
/// branches, into a small buffer), then the rows whose lead is within the limit, in full.
#[inline(always)]
fn within_fixed<const W: usize, const P: usize>(rows: &[u64], lead: &[u64], h: &[u64], max_distance: u32) -> Option<(usize, u32)> {
    let pw = W / P;
    let heads: [u64; P] = std::array::from_fn(|p| h[p * pw]);
    let q: [u64; W] = h.try_into().expect("h has the row width (checked)");
    let mut buf = [0u8; CHUNK];
    let mut best: Option<(usize, u32)> = None;
    let mut limit = max_distance;
    for (c, chunk) in lead.chunks(CHUNK * P).enumerate() {
        for (slot, words) in buf.iter_mut().zip(chunk.chunks_exact(P)) {
            let words: &[u64; P] = words.try_into().expect("P lead words");
            let mut d = u32::MAX;
            for p in 0..P {
                d = d.min((words[p] ^ heads[p]).count_ones());
            }
            *slot = d as u8; // at most 64
        }
        let m = chunk.len() / P;
        for (k, &d_lead) in buf[..m].iter().enumerate() {
            if u32::from(d_lead) <= limit {
                let i = c * CHUNK + k;
                let row: &[u64; W] = rows[i * W..(i + 1) * W].try_into().expect("W words");
                let mut d = u32::MAX;
                for p in 0..P {
                    d = d.min((p * pw..(p + 1) * pw).map(|w| (row[w] ^ q[w]).count_ones()).sum());
                }
                if take_if_within(&mut best, &mut limit, i, d) {
                    return best;
                }
            }
        }
    }
    best
}

/// Row `i` at distance `d` becomes the best when it is within `limit`, which then tightens to
/// strictly nearer; true when `d` is 0 (nothing can be nearer: the scan may stop).
#[inline(always)]
fn take_if_within(best: &mut Option<(usize, u32)>, limit: &mut u32, i: usize, d: u32) -> bool {
    if d > *limit {
        return false;
    }
    *best = Some((i, d));
    if d == 0 {
        return true;
    }
    *limit = d - 1;
    false
}

#[inline(always)]
fn within_in(rows: &[u64], lead: &[u64], width: usize, parts: usize, h: &[u64], max_distance: u32) -> Option<(usize, u32)> {
    let pw = width / parts;
    let heads: Vec<u64> = (0..parts).map(|p| h[p * pw]).collect();
    let mut best: Option<(usize, u32)> = None;
    let mut limit = max_distance; // a row must be within this to count (strictly nearer than the best, once found)
    for (i, words) in lead.chunks_exact(parts).enumerate() {
        for (p, (&w, &q)) in words.iter().zip(&heads).enumerate() {
            if (w ^ q).count_ones() <= limit {
                let part = &rows[i * width + p * pw..i * width + (p + 1) * pw];
                let d: u32 = part.iter().zip(&h[p * pw..(p + 1) * pw]).map(|(a, b)| (a ^ b).count_ones()).sum();
                if take_if_within(&mut best, &mut limit, i, d) {
                    return best;
                }
            }
        }
    }
    best
}

/// Fixed shapes (the uploader's: two 256-bit hashes; one 256-bit hash) get loops the compiler
/// unrolls; any other shape goes through the general one.
#[inline(always)]
fn rows_dispatch(rows: &[u64], width: usize, parts: usize, h: &[u64]) -> Option<(usize, u32)> {
    match (width, parts) {
        (8, 2) => rows_fixed::<8, 2>(rows, h),
        (4, 1) => rows_fixed::<4, 1>(rows, h),
        (8, 1) => rows_fixed::<8, 1>(rows, h),
        _ => nearest_by(rows.len() / width, |i| row_distance(&rows[i * width..(i + 1) * width], h, width / parts)),
    }
}

#[inline(always)]
fn row_distance(row: &[u64], h: &[u64], part_width: usize) -> u32 {
    row.chunks_exact(part_width)
        .zip(h.chunks_exact(part_width))
        .map(|(r, q)| r.iter().zip(q).map(|(a, b)| (a ^ b).count_ones()).sum::<u32>())
        .min()
        .unwrap_or(0)
}

#[inline(always)]
fn rows_fixed<const W: usize, const P: usize>(rows: &[u64], h: &[u64]) -> Option<(usize, u32)> {
    let q: [u64; W] = h.try_into().expect("h has the row width (checked)");
    let distance = |row: &[u64]| -> u32 {
        let row: &[u64; W] = row.try_into().expect("rows of W words");
        let part = W / P;
        let mut best = u32::MAX;
        for p in 0..P {
            let mut d = 0;
            for w in 0..part {
                d += (row[p * part + w] ^ q[p * part + w]).count_ones();
            }
            best = best.min(d);
        }
        best
    };
    let mut best: Option<(usize, u32)> = None;
    for (c, chunk) in rows.chunks(CHUNK * W).enumerate() {
        let least = chunk.chunks_exact(W).map(distance).min().unwrap_or(u32::MAX);
        if best.map_or(true, |(_, d)| least < d) {
            let at = chunk.chunks_exact(W).position(|r| distance(r) == least).unwrap_or(0);
            best = Some((c * CHUNK + at, least));
            if least == 0 {
                break;
            }
        }
    }
    best
}

/// The first index of the smallest `distance(i)` for i in 0..n: the minimum per chunk of
/// 1024 first, positions looked for only in a chunk that improves on the best so far.
#[inline(always)]
fn nearest_by(n: usize, distance: impl Fn(usize) -> u32) -> Option<(usize, u32)> {
    let mut best: Option<(usize, u32)> = None;
    let mut start = 0;
    while start < n {
        let end = (start + CHUNK).min(n);
        let least = (start..end).map(&distance).min().unwrap_or(u32::MAX);
        if best.map_or(true, |(_, d)| least < d) {
            let at = (start..end).find(|&i| distance(i) == least).unwrap_or(start);
            best = Some((at, least));
            if least == 0 {
                break;
            }
        }
        start = end;
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

    fn naive_rows(rows: &[u64], width: usize, parts: usize, h: &[u64]) -> Option<(usize, u32)> {
        let pw = width / parts;
        let mut best: Option<(usize, u32)> = None;
        for (i, row) in rows.chunks(width).enumerate() {
            let mut d = u32::MAX;
            for p in 0..parts {
                let bits: u32 = (p * pw..(p + 1) * pw).map(|w| (row[w] ^ h[w]).count_ones()).sum();
                d = d.min(bits);
            }
            if best.map_or(true, |(_, b)| d < b) {
                best = Some((i, d));
            }
        }
        best
    }

    #[test]
    fn rows_match_a_naive_scan_for_fixed_and_general_shapes() {
        let mut state = 0x2545_F491_4F6C_DD1Du64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for (width, parts) in [(8usize, 2usize), (4, 1), (8, 1), (1, 1), (6, 3), (6, 2), (2, 2)] {
            assert_eq!(nearest_hamming_rows(&[], width, parts, &vec![0; width]), Ok(None));
            for n in [1usize, 3, 1023, 1024, 1025, 3000] {
                let rows: Vec<u64> = (0..n * width).map(|_| next()).collect();
                for _ in 0..5 {
                    let h: Vec<u64> = (0..width).map(|_| next()).collect();
                    assert_eq!(nearest_hamming_rows(&rows, width, parts, &h).unwrap(), naive_rows(&rows, width, parts, &h));
                }
                // One part of a row 3 bits from the query, the others far: found, at 3 bits.
                let at = n / 2;
                let mut h: Vec<u64> = (0..width).map(|_| next()).collect();
                let pw = width / parts;
                let p = parts - 1;
                h[p * pw..(p + 1) * pw].copy_from_slice(&rows[at * width + p * pw..at * width + (p + 1) * pw]);
                h[p * pw] ^= 0b1011;
                let found = nearest_hamming_rows(&rows, width, parts, &h).unwrap();
                assert_eq!(found, naive_rows(&rows, width, parts, &h));
                assert!(found.unwrap().1 <= 3);
            }
        }
        // One word per row, one part: the same as the 64-bit scan.
        let rows: Vec<u64> = (0..777).map(|_| next()).collect();
        let h = next();
        assert_eq!(nearest_hamming_rows(&rows, 1, 1, &[h]).unwrap(), nearest_hamming(&rows, h));
        // The first of equals; a row's distance is its closest part's.
        assert_eq!(nearest_hamming_rows(&[0, 0, 0, 0, 1, 1, 1, 1], 4, 1, &[0, 0, 0, 1]).unwrap(), Some((0, 1)));
        assert_eq!(nearest_hamming_rows(&[u64::MAX, 7, 0, 0, 5, 5], 2, 2, &[0, 0]).unwrap(), Some((1, 0)));
        assert_eq!(nearest_hamming_rows(&[u64::MAX, 7, 3, 3], 2, 2, &[0, 0]).unwrap(), Some((1, 2)));
    }

    #[test]
    fn rows_refuse_inconsistent_shapes() {
        assert!(nearest_hamming_rows(&[0; 8], 8, 3, &[0; 8]).unwrap_err().0.contains("parts"));
        assert!(nearest_hamming_rows(&[0; 8], 8, 0, &[0; 8]).unwrap_err().0.contains("parts"));
        assert!(nearest_hamming_rows(&[0; 8], 0, 1, &[]).unwrap_err().0.contains("parts"));
        assert!(nearest_hamming_rows(&[0; 8], 8, 2, &[0; 4]).unwrap_err().0.contains("h: expected 8 words"));
        assert!(nearest_hamming_rows(&[0; 9], 8, 2, &[0; 8]).unwrap_err().0.contains("rows: expected a multiple of 8"));
    }

    fn lead_of(rows: &[u64], width: usize, parts: usize) -> Vec<u64> {
        let pw = width / parts;
        rows.chunks(width).flat_map(|r| (0..parts).map(move |p| r[p * pw])).collect()
    }

    #[test]
    fn within_finds_the_nearest_row_inside_the_limit_as_a_full_scan_does() {
        let mut state = 0x8F1B_BCDC_BFA5_3E0Bu64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for (width, parts) in [(8usize, 2usize), (4, 1), (6, 3), (1, 1)] {
            for n in [0usize, 1, 5, 1000, 3000] {
                let mut rows: Vec<u64> = (0..n * width).map(|_| next()).collect();
                let pw = width / parts;
                let mut h: Vec<u64> = (0..width).map(|_| next()).collect();
                if n > 0 {
                    // Rows near h in one part, at several distances, some of them equal.
                    for (k, flips) in [(n / 3, 9u32), (n / 2, 4), (n - 1, 4), (n / 4, 30)] {
                        let p = k % parts;
                        rows[k * width + p * pw..k * width + (p + 1) * pw].copy_from_slice(&h[p * pw..(p + 1) * pw]);
                        for b in 0..flips {
                            let w = (b as usize) % pw;
                            rows[k * width + p * pw + w] ^= 1u64 << (b * 7 % 64);
                        }
                    }
                }
                let lead = lead_of(&rows, width, parts);
                for limit in [0u32, 3, 4, 8, 20, 64 * width as u32] {
                    let full = nearest_hamming_rows(&rows, width, parts, &h).unwrap().filter(|&(_, d)| d <= limit);
                    assert_eq!(nearest_hamming_within(&rows, &lead, width, parts, &h, limit).unwrap(), full, "{width}/{parts} n={n} limit={limit}");
                }
                h[0] = next();
            }
        }
        assert_eq!(nearest_hamming_within(&[5, 5], &[5, 5], 1, 1, &[5], 0).unwrap(), Some((0, 0)));
        assert!(nearest_hamming_within(&[0; 8], &[0; 3], 8, 2, &[0; 8], 4).unwrap_err().0.contains("lead: expected 2 words"));
        assert!(nearest_hamming_within(&[0; 8], &[0; 2], 8, 3, &[0; 8], 4).unwrap_err().0.contains("parts"));
    }
}
