//! How an outbox is opened: its file, caps, overflow policy and durability.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use crate::error::OutboxError;

/// What to do with a new item when the outbox is at `max_items` or `max_bytes`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OverflowPolicy {
    /// Keep what is queued; the newcomer is dropped.
    DropNewest,
    /// Evict the most confident queued item (highest score) if the newcomer is less
    /// confident; an invalid output (NaN score) counts as the least confident of all.
    #[default]
    DropLeastUncertain,
}

impl OverflowPolicy {
    /// The name the Python configuration uses.
    pub fn as_str(self) -> &'static str {
        match self {
            OverflowPolicy::DropNewest => "drop_newest",
            OverflowPolicy::DropLeastUncertain => "drop_least_uncertain",
        }
    }
}

impl fmt::Display for OverflowPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for OverflowPolicy {
    type Err = String;

    fn from_str(name: &str) -> Result<Self, String> {
        match name {
            "drop_newest" => Ok(OverflowPolicy::DropNewest),
            "drop_least_uncertain" => Ok(OverflowPolicy::DropLeastUncertain),
            other => Err(format!("overflow_policy: expected drop_newest or drop_least_uncertain, got {other:?}")),
        }
    }
}

/// When an append counts as stored. (Not named `Sync`: that would shadow the marker trait
/// in every module that imports it.)
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SyncMode {
    /// On disk: the WAL is flushed (fdatasync) after the commit, before the append returns.
    #[default]
    Full,
    /// Committed: in the operating system, which survives a killed process but not a
    /// power loss.
    Normal,
}

/// Everything `Outbox::open` needs. `OutboxConfig::new` gives the Python package's defaults.
#[derive(Debug, Clone, PartialEq)]
pub struct OutboxConfig {
    /// The SQLite file; its directory must exist.
    pub path: PathBuf,
    /// Rows (item, upload group) queued at most.
    pub max_items: u64,
    /// Asset bytes stored at most (each distinct asset once).
    pub max_bytes: u64,
    pub overflow_policy: OverflowPolicy,
    pub sync: SyncMode,
    /// How long the writer waits for another connection's write lock before giving up.
    pub busy_timeout: Duration,
    /// A bigger asset is refused (counted in `refused_oversize`, never stored).
    pub max_asset_bytes: u64,
    /// Items handed to the writer thread and not yet taken by it; an append that would
    /// exceed this is refused as `Busy` (memory stays bounded when the disk stalls).
    pub max_pending_items: usize,
    /// Share of `max_items` that rows with an invalid output (NaN score) may hold; more are
    /// dropped (counted in `dropped_invalid_share`).
    pub max_invalid_share: f64,
}

impl OutboxConfig {
    pub const DEFAULT_MAX_ITEMS: u64 = 100_000;
    pub const DEFAULT_MAX_BYTES: u64 = 2 * 1024 * 1024 * 1024;
    pub const DEFAULT_BUSY_TIMEOUT: Duration = Duration::from_secs(2);
    pub const DEFAULT_MAX_ASSET_BYTES: u64 = 32 * 1024 * 1024;
    pub const DEFAULT_MAX_PENDING_ITEMS: usize = 10_000;
    pub const DEFAULT_MAX_INVALID_SHARE: f64 = 0.1;

    pub fn new(path: impl Into<PathBuf>) -> Self {
        OutboxConfig {
            path: path.into(),
            max_items: Self::DEFAULT_MAX_ITEMS,
            max_bytes: Self::DEFAULT_MAX_BYTES,
            overflow_policy: OverflowPolicy::default(),
            sync: SyncMode::default(),
            busy_timeout: Self::DEFAULT_BUSY_TIMEOUT,
            max_asset_bytes: Self::DEFAULT_MAX_ASSET_BYTES,
            max_pending_items: Self::DEFAULT_MAX_PENDING_ITEMS,
            max_invalid_share: Self::DEFAULT_MAX_INVALID_SHARE,
        }
    }

    /// Invalid-output rows allowed: the share of `max_items`, at least one.
    pub(crate) fn max_invalid_items(&self) -> u64 {
        ((self.max_items as f64 * self.max_invalid_share).ceil() as u64).max(1)
    }

    pub(crate) fn validate(&self) -> Result<(), OutboxError> {
        let positive = [
            ("max_items", self.max_items),
            ("max_bytes", self.max_bytes),
            ("max_asset_bytes", self.max_asset_bytes),
            ("max_pending_items", self.max_pending_items as u64),
        ];
        if !(self.max_invalid_share > 0.0 && self.max_invalid_share <= 1.0) {
            return Err(OutboxError::Invalid(format!(
                "outbox {}: max_invalid_share must be in (0, 1], got {}",
                self.path.display(),
                self.max_invalid_share
            )));
        }
        for (name, value) in positive {
            if value == 0 {
                return Err(OutboxError::Invalid(format!(
                    "outbox {}: {name} must be positive, got 0",
                    self.path.display()
                )));
            }
        }
        Ok(())
    }
}
