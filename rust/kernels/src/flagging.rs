//! Thresholding: which items go to annotation, and why.

use crate::random::uniform;

/// Why an item was flagged (as a small integer for numpy).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Reason {
    None = 0,
    /// score < threshold.
    Uncertain = 1,
    /// The model output was invalid (score NaN).
    InvalidOutput = 2,
    /// Not uncertain, but drawn by the random share (`random_fraction`).
    Random = 3,
}

/// Flag items: NaN → invalid output; score < threshold → uncertain; otherwise, with
/// probability `random_fraction` (seeded, per item index), random. Writes one reason per item.
pub fn flag(scores: &[f32], threshold: f32, random_fraction: f32, seed: u64, reasons: &mut [u8]) {
    for (i, (&s, r)) in scores.iter().zip(reasons.iter_mut()).enumerate() {
        *r = if s.is_nan() {
            Reason::InvalidOutput
        } else if s < threshold {
            Reason::Uncertain
        } else if random_fraction > 0.0 && uniform(seed ^ 0x5eed_f1a6, i as u64) < random_fraction {
            Reason::Random
        } else {
            Reason::None
        } as u8;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons() {
        let scores = [0.1, 0.9, f32::NAN, 0.5];
        let mut r = [9u8; 4];
        flag(&scores, 0.5, 0.0, 0, &mut r);
        assert_eq!(r, [1, 0, 2, 0]);
        flag(&scores, 0.5, 1.0, 0, &mut r);
        assert_eq!(r, [1, 3, 2, 3]);
    }
}
