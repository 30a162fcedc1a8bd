//! The public face: open an outbox, hand it appends, wait for their tickets, close it.

use std::fmt;
use std::path::Path;
use std::sync::{mpsc, Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::config::OutboxConfig;
use crate::error::OutboxError;
use crate::item::{self, NewItem};
use crate::queue::{Pending, Shared, WriterStats};
use crate::writer;

/// What one append did, counted in rows: one row per (item, distinct upload group), so
/// `accepted + duplicates + dropped + refused` is the number of rows asked for.
#[derive(Default, Debug, Clone, PartialEq, Eq)]
pub struct AppendResult {
    /// Rows queued.
    pub accepted: u64,
    /// (group, hash) pairs already queued, delivered or dead-lettered.
    pub duplicates: u64,
    /// Rows not queued because the outbox was full (overflow policy).
    pub dropped: u64,
    /// Rows not queued because the asset exceeds `max_asset_bytes`.
    pub refused: u64,
}

/// The one writer of an outbox file in this process. `Send + Sync`: share it through an
/// `Arc` between threads; every append goes through its one writer thread.
pub struct Outbox {
    shared: Arc<Shared>,
    max_asset_bytes: u64,
    writer: Mutex<Option<JoinHandle<()>>>,
}

/// The pending outcome of a submitted append.
#[must_use = "an append's outcome is only known by waiting for its ticket"]
pub struct Ticket {
    shared: Arc<Shared>,
    outcome: mpsc::Receiver<Result<AppendResult, OutboxError>>,
}

impl Outbox {
    /// Open (or create) the outbox file and start its writer thread. Fails, naming the
    /// path, when the directory is missing, the file is not an SQLite outbox, or its schema
    /// version is not `SCHEMA_VERSION`.
    pub fn open(config: OutboxConfig) -> Result<Outbox, OutboxError> {
        config.validate()?;
        let shared = Arc::new(Shared::new(config.path.clone(), config.max_pending_items));
        let handle = writer::spawn(&config, &shared)?;
        Ok(Outbox { shared, max_asset_bytes: config.max_asset_bytes, writer: Mutex::new(Some(handle)) })
    }

    pub fn path(&self) -> &Path {
        &self.shared.path
    }

    /// Hand items to the writer thread without waiting. `Invalid` when an item is bad (an
    /// empty asset, no upload group, a bad group name, a NaN threshold): nothing of the
    /// append is queued then. `Busy` when more than `max_pending_items` items would wait.
    /// Assets are hashed here, on the caller's thread.
    pub fn submit(&self, items: Vec<NewItem>) -> Result<Ticket, OutboxError> {
        let (reply, outcome) = mpsc::sync_channel(1);
        let ticket = Ticket { shared: Arc::clone(&self.shared), outcome };
        if items.is_empty() {
            // Nothing to store: no transaction either (as the Python package).
            let _ = reply.send(Ok(AppendResult::default()));
            return Ok(ticket);
        }
        if items.len() > self.shared.max_pending_items {
            return Err(OutboxError::Invalid(format!(
                "outbox {}: an append of {} items can never fit max_pending_items {}; split it",
                self.shared.path.display(),
                items.len(),
                self.shared.max_pending_items
            )));
        }
        let append = item::prepare(items, self.max_asset_bytes)
            .map_err(|problem| OutboxError::Invalid(format!("outbox {}: {problem}", self.shared.path.display())))?;
        self.shared.push(Pending { append, created_at: wall_clock_seconds(), reply })?;
        Ok(ticket)
    }

    /// `submit`, then wait up to `timeout` for the outcome.
    pub fn append(&self, items: Vec<NewItem>, timeout: Duration) -> Result<AppendResult, OutboxError> {
        self.submit(items)?.wait(timeout)
    }

    /// What the writer thread has done so far.
    pub fn stats(&self) -> WriterStats {
        self.shared.stats.snapshot()
    }

    /// Refuse new appends, let the writer thread store everything already submitted, and
    /// wait for it to end. Idempotent; `Drop` calls it.
    pub fn close(&self) {
        self.shared.close();
        // Joined under the lock, so that a concurrent `close` also returns only once the
        // writer has stored everything.
        let mut writer = self.writer.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(handle) = writer.take() {
            // A thread that died has already failed its tickets (see `queue::Shared::stop`).
            let _ = handle.join();
        }
    }
}

impl fmt::Debug for Outbox {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Outbox").field("path", &self.shared.path).field("stats", &self.stats()).finish_non_exhaustive()
    }
}

impl fmt::Debug for Ticket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ticket").field("path", &self.shared.path).finish_non_exhaustive()
    }
}

impl Drop for Outbox {
    fn drop(&mut self) {
        self.close();
    }
}

impl Ticket {
    /// The append's outcome. `Busy` if it is not known within `timeout`: the items may still
    /// be stored later.
    pub fn wait(self, timeout: Duration) -> Result<AppendResult, OutboxError> {
        match self.outcome.recv_timeout(timeout) {
            Ok(outcome) => outcome,
            Err(mpsc::RecvTimeoutError::Timeout) => Err(OutboxError::Busy(format!(
                "outbox {}: no outcome for the append within {timeout:?}; it may still be stored later",
                self.shared.path.display()
            ))),
            Err(mpsc::RecvTimeoutError::Disconnected) => Err(OutboxError::Other(format!(
                "outbox {}: the writer thread ended without an answer; the append may or may not be stored",
                self.shared.path.display()
            ))),
        }
    }
}

fn wall_clock_seconds() -> f64 {
    // A clock before 1970 is broken; 0 keeps the row valid rather than refusing it.
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0.0, |since| since.as_secs_f64())
}

// Callers share one `Outbox` between threads and may hand tickets to other threads.
const _: fn() = || {
    fn shareable<T: Send + Sync>() {}
    fn movable<T: Send>() {}
    shareable::<Outbox>();
    movable::<Ticket>();
};
