//! The knobs of a scoring call, as plain Rust values (parsed and validated by the caller).

/// How a class distribution becomes a confidence in [0, 1] (1 = certain).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Strategy {
    /// 1 − H(p) / ln C.
    Entropy,
    /// (max p − 1/C) / (1 − 1/C).
    LeastConfidence,
    /// p(1st) − p(2nd).
    Margin,
    /// 1 − p(2nd) / p(1st).
    Ratio,
    /// Uniform in [0, 1), seeded: an unbiased baseline. Invalid rows still score NaN.
    Random,
}

impl Strategy {
    pub const ALL: [(&'static str, Strategy); 5] = [
        ("entropy", Strategy::Entropy),
        ("least_confidence", Strategy::LeastConfidence),
        ("margin", Strategy::Margin),
        ("ratio", Strategy::Ratio),
        ("random", Strategy::Random),
    ];

    pub fn parse(name: &str) -> Option<Strategy> {
        Self::ALL.iter().find(|(n, _)| *n == name).map(|(_, s)| *s)
    }
}

/// Options shared by every task.
#[derive(Clone, Copy, Debug)]
pub struct Scoring {
    pub strategy: Strategy,
    /// Inputs are logits: softmax (or sigmoid for multi-label) is fused into the kernel.
    pub from_logits: bool,
    /// A probability row whose sum is further than this from 1 is invalid output.
    pub sum_tolerance: f32,
    /// Seed for [`Strategy::Random`].
    pub seed: u64,
}

impl Default for Scoring {
    fn default() -> Self {
        Scoring { strategy: Strategy::Entropy, from_logits: false, sum_tolerance: 1e-2, seed: 0 }
    }
}

/// How per-label, per-box or per-pixel scores become one score per item.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Aggregate {
    Min,
    Mean,
    /// Mean of the k least confident (all of them when there are fewer than k).
    LeastConfidentMean(usize),
    /// The q-quantile, linear interpolation as numpy's default (q in [0, 1]).
    Quantile(f32),
}

/// Detection-specific options.
#[derive(Clone, Debug)]
pub struct Detection<'a> {
    pub aggregate: Aggregate,
    /// Per image, how many leading boxes are real; the rest is padding and is never read.
    pub valid_counts: Option<&'a [usize]>,
    /// Per box detection confidence `[B * N]`; without it, the box's top class probability.
    pub box_confidence: Option<&'a [f32]>,
    /// Boxes whose detection confidence is below this are ignored.
    pub confidence_floor: f32,
    /// Score of an image with no (remaining) boxes.
    pub empty_score: f32,
}

/// Memory layout of a segmentation output.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// `[B, C, H, W]`: one plane per class.
    ChannelsFirst,
    /// `[B, H, W, C]`: classes contiguous per pixel.
    ChannelsLast,
}

/// The task a model output serves: which kernel scores it, and the item's rank.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Task {
    /// `[B, C]`: one class distribution per item.
    Classification,
    /// `[B, L]`: independent per-label probabilities.
    MultiLabel,
    /// `[B, N, C]`: a class distribution per box.
    Detection,
    /// `[B, C, H, W]` or `[B, H, W, C]`: a class distribution per pixel.
    Segmentation,
}

impl Task {
    pub const ALL: [(&'static str, Task); 4] = [
        ("classification", Task::Classification),
        ("multilabel", Task::MultiLabel),
        ("detection", Task::Detection),
        ("segmentation", Task::Segmentation),
    ];

    pub fn parse(name: &str) -> Option<Task> {
        Self::ALL.iter().find(|(n, _)| *n == name).map(|(_, t)| *t)
    }

    pub fn name(self) -> &'static str {
        Self::ALL.iter().find(|(_, t)| *t == self).map_or("classification", |(n, _)| *n)
    }

    /// Dimensions per item: [C], [L], [N, C], [C, H, W] or [H, W, C].
    pub fn item_rank(self) -> usize {
        match self {
            Task::Classification | Task::MultiLabel => 1,
            Task::Detection => 2,
            Task::Segmentation => 3,
        }
    }
}
