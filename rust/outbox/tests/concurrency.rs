//! Many callers, other connections holding the write lock, group commit, flushing, closing.

mod common;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use common::{config, count, counter, item, outbox_path, reader, WAIT};
use tempfile::tempdir;
use triton_al_outbox::{content_hash, AppendResult, Outbox, OutboxConfig, OutboxError, SyncMode};

fn accepted(n: u64) -> AppendResult {
    AppendResult { accepted: n, ..AppendResult::default() }
}

/// Hold SQLite's write lock from another connection (as another process would) for `hold`.
/// Returns once the lock is held; the handle gives the moment it was released.
fn hold_write_lock(path: &Path, hold: Duration) -> JoinHandle<Instant> {
    let (held, is_held) = mpsc::channel();
    let path = path.to_path_buf();
    let holder = thread::spawn(move || {
        let conn = reader(&path);
        conn.execute_batch("BEGIN IMMEDIATE").expect("take the write lock");
        held.send(()).expect("signal");
        thread::sleep(hold);
        conn.execute_batch("COMMIT").expect("release the write lock");
        Instant::now()
    });
    is_held.recv().expect("the lock is held");
    holder
}

fn all_hashes(path: &Path) -> HashSet<String> {
    let conn = reader(path);
    let mut statement = conn.prepare("SELECT content_hash FROM items").expect("prepare");
    statement.query_map([], |row| row.get(0)).expect("query").collect::<Result<_, _>>().expect("rows")
}

#[test]
fn many_threads_append_every_row_once_in_fewer_transactions() {
    const THREADS: usize = 8;
    const APPENDS: usize = 500;
    let dir = tempdir().expect("temp dir");
    let path = outbox_path(&dir);
    let outbox = Arc::new(Outbox::open(OutboxConfig { sync: SyncMode::Full, ..config(&dir) }).expect("open"));
    let workers: Vec<_> = (0..THREADS)
        .map(|thread_index| {
            let outbox = Arc::clone(&outbox);
            thread::spawn(move || {
                for i in 0..APPENDS {
                    let asset = format!("thread {thread_index} item {i}");
                    let result = outbox.append(vec![item(asset.as_bytes(), 0.5, &["a"])], WAIT).expect("append");
                    assert_eq!(result, accepted(1));
                }
            })
        })
        .collect();
    for worker in workers {
        worker.join().expect("worker");
    }
    let expected: HashSet<String> = (0..THREADS)
        .flat_map(|t| (0..APPENDS).map(move |i| content_hash(format!("thread {t} item {i}").as_bytes())))
        .collect();
    assert_eq!(count(&path, "items") as usize, THREADS * APPENDS, "no row twice");
    assert_eq!(all_hashes(&path), expected, "every row present");
    assert_eq!(counter(&path, "appended") as usize, THREADS * APPENDS);
    let stats = outbox.stats();
    assert_eq!(stats.appends as usize, THREADS * APPENDS);
    assert!(stats.transactions < stats.appends, "no group commit: {stats:?}");
    assert_eq!(stats.flushes, stats.transactions, "one flush per transaction: {stats:?}");
    println!("{stats:?}");
}

#[test]
fn sync_full_flushes_the_wal_and_normal_does_not() {
    for sync in [SyncMode::Full, SyncMode::Normal] {
        let dir = tempdir().expect("temp dir");
        let outbox = Outbox::open(OutboxConfig { sync, ..config(&dir) }).expect("open");
        for asset in [b"one", b"two", b"six"] {
            outbox.append(vec![item(asset, 0.5, &["a"])], WAIT).expect("append");
        }
        let stats = outbox.stats();
        assert_eq!(stats.transactions, 3, "{sync:?}");
        let expected_flushes = if sync == SyncMode::Full { 3 } else { 0 };
        assert_eq!(stats.flushes, expected_flushes, "{sync:?}: {stats:?}");
    }
}

#[test]
fn a_write_lock_held_briefly_delays_an_append_without_failing_it() {
    let dir = tempdir().expect("temp dir");
    let path = outbox_path(&dir);
    let outbox = Outbox::open(config(&dir)).expect("open");
    let started = Instant::now();
    let holder = hold_write_lock(&path, Duration::from_millis(50));
    let result = outbox.append(vec![item(b"cat", 0.5, &["a"])], WAIT);
    let waited = started.elapsed();
    holder.join().expect("holder");
    assert_eq!(result, Ok(accepted(1)));
    assert!(waited >= Duration::from_millis(45), "the append did not wait for the lock: {waited:?}");
    assert_eq!(count(&path, "items"), 1);
}

#[test]
fn the_writer_takes_the_lock_soon_after_it_is_released() {
    // SQLite's default busy handler (sleeps of 1, 2, 5, 10 ... 25, 50 ms) tries at 128 ms,
    // then at 178 ms: 28 ms after this release. Ours polls at least every 0.5 ms.
    let dir = tempdir().expect("temp dir");
    let path = outbox_path(&dir);
    let outbox = Outbox::open(config(&dir)).expect("open");
    let holder = hold_write_lock(&path, Duration::from_millis(150));
    outbox.append(vec![item(b"cat", 0.5, &["a"])], WAIT).expect("append");
    let finished = Instant::now();
    let released = holder.join().expect("holder");
    let late = finished.saturating_duration_since(released);
    assert!(late < Duration::from_millis(20), "stored {late:?} after the lock was released");
}

#[test]
fn a_write_lock_held_past_busy_timeout_gives_busy_and_stores_nothing() {
    let dir = tempdir().expect("temp dir");
    let path = outbox_path(&dir);
    let busy_timeout = Duration::from_millis(100);
    let outbox = Outbox::open(OutboxConfig { busy_timeout, ..config(&dir) }).expect("open");
    let started = Instant::now();
    let holder = hold_write_lock(&path, Duration::from_millis(600));
    let result = outbox.append(vec![item(b"cat", 0.5, &["a"]), item(b"dog", 0.5, &["b"])], WAIT);
    let waited = started.elapsed();
    holder.join().expect("holder");
    match result {
        Err(OutboxError::Busy(message)) => {
            assert!(message.contains(&path.display().to_string()), "{message}");
            assert!(message.contains("nothing of this append was stored"), "{message}");
        }
        other => panic!("expected Busy, got {other:?}"),
    }
    assert!(waited >= busy_timeout && waited < Duration::from_millis(500), "gave up after {waited:?}");
    assert_eq!((count(&path, "items"), count(&path, "assets"), counter(&path, "appended")), (0, 0, 0));
    // The outbox works again once the lock is free.
    assert_eq!(outbox.append(vec![item(b"cat", 0.5, &["a"])], WAIT), Ok(accepted(1)));
}

#[test]
fn too_many_pending_items_are_refused_as_busy() {
    const MAX_PENDING: usize = 3;
    let dir = tempdir().expect("temp dir");
    let path = outbox_path(&dir);
    let outbox = Outbox::open(OutboxConfig { max_pending_items: MAX_PENDING, ..config(&dir) }).expect("open");
    let too_big = outbox.submit((0..=MAX_PENDING).map(|i| item(format!("{i}").as_bytes(), 0.5, &["a"])).collect());
    assert!(matches!(&too_big, Err(OutboxError::Invalid(m)) if m.contains("max_pending_items")), "{:?}", too_big.err());

    let holder = hold_write_lock(&path, Duration::from_millis(300));
    let mut tickets = Vec::new();
    let mut refusals = Vec::new();
    // The writer takes at most one group and then waits for the lock, so at most
    // 2 * MAX_PENDING items get in.
    for i in 0..4 * MAX_PENDING {
        match outbox.submit(vec![item(format!("item {i}").as_bytes(), 0.5, &["a"])]) {
            Ok(ticket) => tickets.push(ticket),
            Err(error) => refusals.push(error),
        }
    }
    holder.join().expect("holder");
    assert!(tickets.len() <= 2 * MAX_PENDING, "{} appends got in", tickets.len());
    assert!(!refusals.is_empty());
    for refusal in &refusals {
        assert!(matches!(refusal, OutboxError::Busy(m) if m.contains("max_pending_items 3")), "{refusal:?}");
    }
    let stored = tickets.len();
    for ticket in tickets {
        assert_eq!(ticket.wait(WAIT), Ok(accepted(1)));
    }
    assert_eq!(count(&path, "items") as usize, stored);
}

#[test]
fn a_ticket_timing_out_is_busy_and_the_append_may_still_be_stored() {
    let dir = tempdir().expect("temp dir");
    let path = outbox_path(&dir);
    let outbox = Outbox::open(config(&dir)).expect("open");
    let holder = hold_write_lock(&path, Duration::from_millis(300));
    let ticket = outbox.submit(vec![item(b"cat", 0.5, &["a"])]).expect("submit");
    match ticket.wait(Duration::from_millis(20)) {
        Err(OutboxError::Busy(message)) => assert!(message.contains("may still be stored later"), "{message}"),
        other => panic!("expected Busy, got {other:?}"),
    }
    holder.join().expect("holder");
    outbox.close();
    assert_eq!(count(&path, "items"), 1, "stored after the ticket gave up");
}

#[test]
fn close_stores_everything_submitted_then_refuses_appends() {
    let dir = tempdir().expect("temp dir");
    let path = outbox_path(&dir);
    let outbox = Outbox::open(config(&dir)).expect("open");
    let holder = hold_write_lock(&path, Duration::from_millis(150));
    let tickets: Vec<_> = (0..20)
        .map(|i| outbox.submit(vec![item(format!("item {i}").as_bytes(), 0.5, &["a"])]).expect("submit"))
        .collect();
    outbox.close();
    holder.join().expect("holder");
    for ticket in tickets {
        // Already answered: close returned after the writer stored them.
        assert_eq!(ticket.wait(Duration::ZERO), Ok(accepted(1)));
    }
    assert_eq!(count(&path, "items"), 20);
    let late = outbox.submit(vec![item(b"late", 0.5, &["a"])]).expect_err("refused after close");
    assert!(matches!(&late, OutboxError::Other(m) if m.contains("closed")), "{late:?}");
    outbox.close(); // idempotent
}

#[test]
fn two_outboxes_and_an_uploader_share_one_file() {
    const THREADS_PER_OUTBOX: usize = 4;
    const APPENDS: usize = 200;
    let dir = tempdir().expect("temp dir");
    let path = outbox_path(&dir);
    // Two writers on one file, as two processes would have.
    let outboxes: Vec<Arc<Outbox>> = (0..2)
        .map(|_| Arc::new(Outbox::open(OutboxConfig { sync: SyncMode::Full, ..config(&dir) }).expect("open")))
        .collect();
    let uploading = Arc::new(AtomicBool::new(true));
    let uploader = spawn_uploader(path.clone(), Arc::clone(&uploading));
    let mut workers = Vec::new();
    for (outbox_index, outbox) in outboxes.iter().enumerate() {
        for thread_index in 0..THREADS_PER_OUTBOX {
            let outbox = Arc::clone(outbox);
            workers.push(thread::spawn(move || {
                for i in 0..APPENDS {
                    let asset = format!("outbox {outbox_index} thread {thread_index} item {i}");
                    let result = outbox.append(vec![item(asset.as_bytes(), 0.5, &["a"])], WAIT).expect("append");
                    assert_eq!(result, accepted(1));
                }
            }));
        }
    }
    for worker in workers {
        worker.join().expect("worker");
    }
    uploading.store(false, Ordering::Relaxed);
    let delivered = uploader.join().expect("uploader");
    let total = 2 * THREADS_PER_OUTBOX * APPENDS;
    assert!(delivered > 0, "the uploader never delivered anything meanwhile");
    assert_eq!(count(&path, "delivered") as u64, delivered);
    assert_eq!((count(&path, "items") + count(&path, "delivered")) as usize, total);
    assert_eq!(counter(&path, "appended") as usize, total);
}

/// Deliver queued items 16 at a time, as the Python uploader's mark_delivered does, until
/// told to stop; returns how many it delivered.
fn spawn_uploader(path: PathBuf, running: Arc<AtomicBool>) -> JoinHandle<u64> {
    thread::spawn(move || {
        let conn = reader(&path);
        let mut delivered = 0;
        while running.load(Ordering::Relaxed) {
            conn.execute_batch(
                "BEGIN IMMEDIATE; \
                 CREATE TEMP TABLE IF NOT EXISTS batch (id INTEGER PRIMARY KEY); DELETE FROM batch; \
                 INSERT INTO batch SELECT id FROM items ORDER BY id LIMIT 16; \
                 INSERT OR IGNORE INTO delivered SELECT upload_group, content_hash, 1.0 FROM items WHERE id IN batch; \
                 DELETE FROM items WHERE id IN batch; COMMIT;",
            )
            .expect("deliver");
            delivered += conn.changes(); // rows the DELETE removed
            thread::sleep(Duration::from_millis(1));
        }
        delivered
    })
}
