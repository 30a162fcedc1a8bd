//! The hand-over between callers and the writer thread: appends waiting, the writer's state,
//! and the statistics both sides read.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Condvar, Mutex, MutexGuard, PoisonError};

use crate::error::OutboxError;
use crate::item::PreparedAppend;
use crate::AppendResult;

/// How an append's outcome reaches its ticket.
pub(crate) type Reply = mpsc::SyncSender<Result<AppendResult, OutboxError>>;

/// One caller's append, waiting for the writer thread.
pub(crate) struct Pending {
    pub append: PreparedAppend,
    /// Wall-clock seconds when the caller handed it over (the rows' `created_at`).
    pub created_at: f64,
    pub reply: Reply,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum WriterState {
    Running,
    /// `close` was called: take nothing new, store what is waiting, then stop.
    Closing,
    /// The thread has ended (closed, or died).
    Stopped,
}

struct Waiting {
    appends: VecDeque<Pending>,
    items: usize,
    state: WriterState,
}

/// A transaction stays short so that other processes (the uploader) never wait long for the
/// write lock: it takes at most this many appends, or this many asset bytes (at least one
/// append, however big).
const MAX_GROUP_APPENDS: usize = 1024;
const MAX_GROUP_ASSET_BYTES: u64 = 64 * 1024 * 1024;

/// What the writer thread has done so far.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct WriterStats {
    /// Transactions committed (each holds one or more appends).
    pub transactions: u64,
    /// WAL flushes (fdatasync) made; 0 with `SyncMode::Normal`.
    pub flushes: u64,
    /// Appends stored (their tickets completed with `Ok`).
    pub appends: u64,
}

#[derive(Default)]
pub(crate) struct StatsCounters {
    pub transactions: AtomicU64,
    pub flushes: AtomicU64,
    pub appends: AtomicU64,
}

impl StatsCounters {
    pub fn add(counter: &AtomicU64, by: u64) {
        counter.fetch_add(by, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> WriterStats {
        WriterStats {
            transactions: self.transactions.load(Ordering::Relaxed),
            flushes: self.flushes.load(Ordering::Relaxed),
            appends: self.appends.load(Ordering::Relaxed),
        }
    }
}

pub(crate) struct Shared {
    pub path: PathBuf,
    pub max_pending_items: usize,
    pub stats: StatsCounters,
    waiting: Mutex<Waiting>,
    work_arrived: Condvar,
}

impl Shared {
    pub fn new(path: PathBuf, max_pending_items: usize) -> Self {
        Shared {
            path,
            max_pending_items,
            stats: StatsCounters::default(),
            waiting: Mutex::new(Waiting { appends: VecDeque::new(), items: 0, state: WriterState::Running }),
            work_arrived: Condvar::new(),
        }
    }

    // The lock only guards plain moves in and out of a queue: a panic elsewhere cannot leave
    // it half-updated, so a poisoned lock is still good to use.
    fn lock(&self) -> MutexGuard<'_, Waiting> {
        self.waiting.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queue an append for the writer thread, or say why not.
    pub fn push(&self, pending: Pending) -> Result<(), OutboxError> {
        let count = pending.append.items.len();
        let mut waiting = self.lock();
        match waiting.state {
            WriterState::Running => {}
            WriterState::Closing | WriterState::Stopped => {
                return Err(OutboxError::Other(format!(
                    "outbox {}: closed, or its writer thread has stopped; nothing of this append was stored",
                    self.path.display()
                )));
            }
        }
        if waiting.items.saturating_add(count) > self.max_pending_items {
            return Err(OutboxError::Busy(format!(
                "outbox {}: {} items already wait for the writer thread (max_pending_items {}); \
                 this append of {count} was refused, nothing of it was stored",
                self.path.display(),
                waiting.items,
                self.max_pending_items
            )));
        }
        waiting.items += count;
        waiting.appends.push_back(pending);
        drop(waiting);
        self.work_arrived.notify_one();
        Ok(())
    }

    /// The next group of appends to store in one transaction; waits for one to arrive.
    /// `None` once closing and nothing is left.
    pub fn next_group(&self) -> Option<Vec<Pending>> {
        let mut waiting = self.lock();
        while waiting.appends.is_empty() {
            if waiting.state != WriterState::Running {
                return None;
            }
            waiting = self.work_arrived.wait(waiting).unwrap_or_else(PoisonError::into_inner);
        }
        let mut group = Vec::new();
        let mut asset_bytes = 0u64;
        while let Some(next) = waiting.appends.front() {
            let full = group.len() >= MAX_GROUP_APPENDS
                || (!group.is_empty() && asset_bytes.saturating_add(next.append.asset_bytes) > MAX_GROUP_ASSET_BYTES);
            if full {
                break;
            }
            let Some(taken) = waiting.appends.pop_front() else { break };
            asset_bytes = asset_bytes.saturating_add(taken.append.asset_bytes);
            waiting.items = waiting.items.saturating_sub(taken.append.items.len());
            group.push(taken);
        }
        Some(group)
    }

    /// Refuse new appends; the writer stores what is waiting, then stops.
    pub fn close(&self) {
        let mut waiting = self.lock();
        if waiting.state == WriterState::Running {
            waiting.state = WriterState::Closing;
        }
        drop(waiting);
        self.work_arrived.notify_all();
    }

    /// The writer thread is ending: whatever still waits will never be stored.
    pub fn stop(&self, why: &str) {
        let orphans: Vec<Pending> = {
            let mut waiting = self.lock();
            waiting.state = WriterState::Stopped;
            waiting.items = 0;
            waiting.appends.drain(..).collect()
        };
        for pending in orphans {
            let message = format!("outbox {}: {why}; nothing of this append was stored", self.path.display());
            // A ticket dropped by its caller cannot receive: nothing to do then.
            let _ = pending.reply.send(Err(OutboxError::Other(message)));
        }
    }
}
