//! Uncertainty-scoring kernels for active learning.
//!
//! Every function turns model outputs into one **confidence in [0, 1] per item** (1 = certain,
//! 0 = maximally uncertain); an item is flagged when its score is below a threshold.
//! Invalid model output (NaN, ±Inf, negative probabilities, probability rows whose sum is off
//! by more than a tolerance) scores NaN for that item only. Inputs are contiguous `f32`
//! slices in row-major order; shape errors are returned, never panicked.
//!
//! Pure Rust: no Python here. The `triton-al-python` crate is the thin binding.

mod dispatch;
mod distribution;
mod flagging;
mod hamming;
mod multilabel;
mod options;
mod parallel;
mod planar;
mod random;
mod row;
mod tasks;
pub mod vmath;

pub use dispatch::{level, Level};
pub use flagging::{flag, Reason};
pub use hamming::{nearest_hamming, nearest_hamming_rows, nearest_hamming_within};
pub use options::{Aggregate, Detection, Layout, Scoring, Strategy, Task};
pub use parallel::{configured_threads, PARALLEL_MIN_ELEMENTS};
pub use tasks::{classification, detection, multilabel, segmentation};

/// Below this many classes, row-major rows are transposed tile by tile and scored with the
/// lanes across items (a row of 10 classes would leave most of a 16-lane register idle).
pub const SMALL_C: usize = 64;

/// A call the kernels cannot serve; the message names the argument and what was expected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelError(pub String);

impl std::fmt::Display for KernelError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for KernelError {}

pub(crate) fn error<T>(message: impl Into<String>) -> Result<T, KernelError> {
    Err(KernelError(message.into()))
}
