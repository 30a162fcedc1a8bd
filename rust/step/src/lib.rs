//! The `active_learning` step without Triton: its settings, one dynamic batch scored,
//! flagged and handed to the outbox. Pure Rust over `triton-al-kernels` and
//! `triton-al-outbox`; the native Triton backend (`rust/backend`) and the Python extension
//! (`rust/python`) are thin faces over it.

mod assets;
mod prediction;
mod settings;
mod step;

pub use assets::{npy_bytes, sniff_media_type, NPY_MEDIA_TYPE};
pub use triton_al_outbox::validate_group_name;
pub use prediction::prediction_json;
pub use settings::{parse_parameters, OutboxSettings, Parsed, StepSettings, Task, Value, OUTBOX_ENV, PARAMETERS_JSON};
pub use step::{wait, Assets, BatchReport, Boxes, Embedding, Evaluation, Processed, Scores, Step, StepRequest, REASONS};
