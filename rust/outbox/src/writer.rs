//! The writer thread: the one connection that appends, committing every waiting append
//! together (group commit).
//!
//! One transaction (`BEGIN IMMEDIATE` ... `COMMIT`) per group, a SAVEPOINT per append so an
//! unexpected SQLite error fails only that append, then (SyncMode::Full) one WAL flush for the
//! whole group after the write lock is released. A panic fails its group's tickets, never
//! the thread; if the thread ends anyway, everything still waiting is failed and new appends
//! are refused (see `queue::Shared::stop`).

use std::any::Any;
use std::panic::{self, AssertUnwindSafe};
use std::sync::{mpsc, Arc};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use rusqlite::{Connection, ErrorCode};

use crate::append::{self, Caps};
use crate::config::{OutboxConfig, SyncMode};
use crate::error::OutboxError;
use crate::queue::{Pending, Shared, StatsCounters};
use crate::wal::WalFile;
use crate::{database, AppendResult};

type Outcome = Result<AppendResult, OutboxError>;

/// Start the writer thread with its connection open; an error opening the file is returned
/// here rather than at the first append.
pub(crate) fn spawn(config: &OutboxConfig, shared: &Arc<Shared>) -> Result<JoinHandle<()>, OutboxError> {
    let (opened_sender, opened) = mpsc::sync_channel::<Result<(), OutboxError>>(1);
    let config = config.clone();
    let thread_shared = Arc::clone(shared);
    let handle = thread::Builder::new()
        .name("outbox-writer".into())
        .spawn(move || {
            // Ends the queue however this thread ends, unwinding included.
            let _stop = StopOnExit(Arc::clone(&thread_shared));
            // The connection is opened here: it lives and dies on this thread (see `busy`).
            let conn = match database::open(&config.path, config.busy_timeout) {
                Ok(conn) => conn,
                Err(error) => {
                    let _ = opened_sender.send(Err(error));
                    return;
                }
            };
            let _ = opened_sender.send(Ok(()));
            Writer::new(conn, &config, thread_shared).run();
        })
        .map_err(|e| {
            OutboxError::Other(format!("outbox {}: cannot start the writer thread ({e})", shared.path.display()))
        })?;
    match opened.recv() {
        Ok(Ok(())) => Ok(handle),
        Ok(Err(error)) => {
            let _ = handle.join();
            Err(error)
        }
        Err(mpsc::RecvError) => {
            let _ = handle.join();
            Err(OutboxError::Other(format!(
                "outbox {}: the writer thread ended while opening the file",
                shared.path.display()
            )))
        }
    }
}

struct StopOnExit(Arc<Shared>);

impl Drop for StopOnExit {
    fn drop(&mut self) {
        let why = if thread::panicking() { "the writer thread died" } else { "the outbox was closed" };
        self.0.stop(why);
    }
}

/// Why a group's transaction did not commit.
enum Uncommitted {
    /// The error every append still without an outcome gets (unless a full disk is retried).
    Failed(OutboxError),
    /// An append failed and SQLite rolled back the whole transaction with it: the append's
    /// error is recorded, the others are tried again.
    Restart,
}

struct Writer {
    conn: Connection,
    shared: Arc<Shared>,
    caps: Caps,
    sync: SyncMode,
    busy_timeout: Duration,
    wal: WalFile,
    /// Whether the current group's transaction has committed (for a panic's message).
    committed: bool,
}

impl Writer {
    fn new(conn: Connection, config: &OutboxConfig, shared: Arc<Shared>) -> Self {
        Writer {
            conn,
            shared,
            caps: Caps {
                max_items: config.max_items,
                max_bytes: config.max_bytes,
                overflow_policy: config.overflow_policy,
                max_invalid_items: config.max_invalid_items(),
            },
            sync: config.sync,
            busy_timeout: config.busy_timeout,
            wal: WalFile::new(&config.path),
            committed: false,
        }
    }

    fn run(mut self) {
        while let Some(group) = self.shared.next_group() {
            self.run_group(group);
            #[cfg(test)]
            test_hooks::maybe_die();
        }
    }

    fn run_group(&mut self, group: Vec<Pending>) {
        self.committed = false;
        let outcomes = match panic::catch_unwind(AssertUnwindSafe(|| self.commit_group(&group))) {
            Ok(outcomes) => outcomes,
            Err(payload) => {
                let stage = if self.committed {
                    "after its commit: it is stored, but perhaps not yet flushed to disk"
                } else {
                    self.roll_back();
                    "before its commit: nothing of it was stored"
                };
                let message = format!(
                    "outbox {}: the writer thread failed unexpectedly ({}) {stage}",
                    self.shared.path.display(),
                    panic_message(payload.as_ref())
                );
                vec![Err(OutboxError::Other(message)); group.len()]
            }
        };
        for (pending, outcome) in group.into_iter().zip(outcomes) {
            if outcome.is_ok() {
                StatsCounters::add(&self.shared.stats.appends, 1);
            }
            // A ticket dropped by its caller cannot receive: nothing to do then.
            let _ = pending.reply.send(outcome);
        }
    }

    /// Store a group: one outcome per append, in order.
    fn commit_group(&mut self, group: &[Pending]) -> Vec<Outcome> {
        let mut outcomes: Vec<Option<Outcome>> = group.iter().map(|_| None).collect();
        let mut checkpointed = false;
        // Each restart settles at least one append and a full disk is retried once, so this
        // ends; the bound is a safety net.
        for _ in 0..group.len() + 2 {
            match self.try_transaction(group, &mut outcomes) {
                Ok(()) => break,
                Err(Uncommitted::Restart) => continue,
                Err(Uncommitted::Failed(OutboxError::Full(_))) if !checkpointed => {
                    // In WAL mode even a small write needs room in the WAL: fold it into the
                    // database, truncate it and try once more.
                    checkpointed = true;
                    self.checkpoint();
                }
                Err(Uncommitted::Failed(error)) => {
                    for outcome in outcomes.iter_mut().filter(|outcome| outcome.is_none()) {
                        *outcome = Some(Err(error.clone()));
                    }
                    break;
                }
            }
        }
        outcomes
            .into_iter()
            .map(|outcome| {
                outcome.unwrap_or_else(|| {
                    Err(OutboxError::Other(format!(
                        "outbox {}: SQLite kept rolling back the group; nothing of this append was stored",
                        self.shared.path.display()
                    )))
                })
            })
            .collect()
    }

    /// One transaction over the appends without an outcome yet. On `Ok`, every one has one.
    fn try_transaction(&mut self, group: &[Pending], outcomes: &mut [Option<Outcome>]) -> Result<(), Uncommitted> {
        if outcomes.iter().all(Option::is_some) {
            return Ok(());
        }
        self.run_statement("BEGIN IMMEDIATE").map_err(|e| Uncommitted::Failed(self.failure(&e)))?;
        let mut stored: Vec<(usize, AppendResult)> = Vec::with_capacity(group.len());
        for (index, pending) in group.iter().enumerate() {
            if outcomes[index].is_some() {
                continue;
            }
            match self.store_in_savepoint(pending) {
                Ok(result) => stored.push((index, result)),
                Err(error) => {
                    if error.sqlite_error_code() == Some(ErrorCode::DiskFull) {
                        self.roll_back();
                        return Err(Uncommitted::Failed(self.failure(&error)));
                    }
                    outcomes[index] = Some(Err(OutboxError::Other(format!(
                        "outbox {}: could not append ({error}); nothing of this append was stored",
                        self.shared.path.display()
                    ))));
                    if self.conn.is_autocommit() {
                        return Err(Uncommitted::Restart);
                    }
                }
            }
        }
        let mut totals = AppendResult::default();
        for (_, result) in &stored {
            totals.accepted += result.accepted;
            totals.duplicates += result.duplicates;
            totals.dropped += result.dropped;
            totals.refused += result.refused;
        }
        if let Err(error) = append::bump_totals(&self.conn, &totals).and_then(|()| self.run_statement("COMMIT")) {
            self.roll_back();
            return Err(Uncommitted::Failed(self.failure(&error)));
        }
        self.committed = true;
        StatsCounters::add(&self.shared.stats.transactions, 1);
        let flushed = match self.sync {
            SyncMode::Normal => Ok(()),
            SyncMode::Full => self.wal.flush().inspect(|()| StatsCounters::add(&self.shared.stats.flushes, 1)),
        };
        for (index, result) in stored {
            outcomes[index] = Some(match &flushed {
                Ok(()) => Ok(result),
                Err(error) => Err(OutboxError::Other(format!(
                    "outbox {}: committed, but could not flush the WAL to disk ({error}); \
                     the append is stored but may not survive a power loss",
                    self.shared.path.display()
                ))),
            });
        }
        Ok(())
    }

    /// One append inside its own savepoint: on error, undone alone (unless SQLite rolled
    /// back the whole transaction, which the caller checks).
    fn store_in_savepoint(&self, pending: &Pending) -> rusqlite::Result<AppendResult> {
        self.run_statement("SAVEPOINT append")?;
        let stored = append::store_append(&self.conn, self.caps, &pending.append, pending.created_at)
            .and_then(|result| self.run_statement("RELEASE append").map(|()| result));
        if stored.is_err() && !self.conn.is_autocommit() {
            let undone = self.run_statement("ROLLBACK TO append").and_then(|()| self.run_statement("RELEASE append"));
            if undone.is_err() {
                // Cannot tell what is left of the append: give up the whole transaction.
                self.roll_back();
            }
        }
        stored
    }

    fn run_statement(&self, sql: &str) -> rusqlite::Result<()> {
        self.conn.prepare_cached(sql)?.execute([]).map(|_| ())
    }

    /// Roll back the open transaction, if SQLite has not already.
    fn roll_back(&self) {
        if !self.conn.is_autocommit() {
            // Fails only if there is no transaction left, which is the goal anyway.
            let _ = self.conn.execute_batch("ROLLBACK");
        }
    }

    fn checkpoint(&self) {
        // Best effort: if it fails, the retry fails with the same error as before.
        let _ = self.conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE)");
    }

    /// The error for a group that could not commit.
    fn failure(&self, error: &rusqlite::Error) -> OutboxError {
        let path = self.shared.path.display();
        match error.sqlite_error_code() {
            Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked) => OutboxError::Busy(format!(
                "outbox {path}: another connection held the write lock for more than {:?} ({error}); \
                 nothing of this append was stored",
                self.busy_timeout
            )),
            Some(ErrorCode::DiskFull) => OutboxError::Full(format!(
                "outbox {path}: the disk is full ({error}), even after a WAL checkpoint; \
                 nothing of this append was stored"
            )),
            _ => OutboxError::Other(format!(
                "outbox {path}: could not append ({error}); nothing of this append was stored"
            )),
        }
    }
}

fn panic_message(payload: &(dyn Any + Send)) -> &str {
    if let Some(text) = payload.downcast_ref::<&str>() {
        text
    } else if let Some(text) = payload.downcast_ref::<String>() {
        text
    } else {
        "a panic"
    }
}

/// Faults injected by the unit tests, compiled only into them.
#[cfg(test)]
pub(crate) mod test_hooks {
    use std::cell::Cell;

    /// An item with this model name makes its append panic inside the transaction.
    pub const PANIC_MODEL_NAME: &str = "panic-for-test";
    /// An item with this model name makes the writer thread die after its group.
    pub const DIE_MODEL_NAME: &str = "die-for-test";

    thread_local! {
        static DIE_AFTER_GROUP: Cell<bool> = const { Cell::new(false) };
    }

    pub fn maybe_panic(model_name: &str) {
        if model_name == PANIC_MODEL_NAME {
            panic!("injected by a test");
        }
        if model_name == DIE_MODEL_NAME {
            DIE_AFTER_GROUP.with(|die| die.set(true));
        }
    }

    pub fn maybe_die() {
        if DIE_AFTER_GROUP.with(Cell::get) {
            panic!("writer thread killed by a test");
        }
    }
}

#[cfg(test)]
mod tests;
