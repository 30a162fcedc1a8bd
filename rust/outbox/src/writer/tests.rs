//! Faults the public API cannot provoke: a full disk, SQLite errors inside one append, panics.

use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use rusqlite::Connection;
use tempfile::{tempdir, TempDir};

use super::test_hooks::{DIE_MODEL_NAME, PANIC_MODEL_NAME};
use super::*;
use crate::item::{prepare, NewItem};
use crate::{Outbox, OutboxConfig};

const WAIT: Duration = Duration::from_secs(30);

fn new_item(asset: &[u8], model_name: &str) -> NewItem {
    NewItem {
        asset: asset.to_vec(),
        media_type: "image/png".into(),
        model_name: model_name.into(),
        model_version: "1".into(),
        prediction_json: "[]".into(),
        score: 0.5,
        strategy: "entropy".into(),
        threshold: 0.6,
        reason: "uncertain".into(),
        upload_groups: Arc::from(vec!["a".to_string()]),
        embedding: None,
    }
}

fn pending(asset: &[u8], model_name: &str) -> Pending {
    let (reply, _outcome) = mpsc::sync_channel(1);
    let append = prepare(vec![new_item(asset, model_name)], u64::MAX).expect("valid item");
    Pending { append, created_at: 1.0, reply }
}

fn settings(dir: &TempDir) -> OutboxConfig {
    OutboxConfig { sync: SyncMode::Normal, ..OutboxConfig::new(dir.path().join("outbox.sqlite")) }
}

/// A writer used directly, without its thread, so a test can tamper with its connection.
fn writer(config: &OutboxConfig) -> Writer {
    let conn = database::open(&config.path, config.busy_timeout).expect("open");
    Writer::new(conn, config, Arc::new(Shared::new(config.path.clone(), 100)))
}

fn queued_models(path: &Path) -> Vec<String> {
    let conn = Connection::open(path).expect("open");
    let mut statement = conn.prepare("SELECT model_name FROM items ORDER BY id").expect("prepare");
    statement.query_map([], |row| row.get(0)).expect("query").collect::<Result<_, _>>().expect("rows")
}

fn path_of(config: &OutboxConfig) -> PathBuf {
    config.path.clone()
}

#[test]
fn a_full_disk_fails_the_group_with_full_and_stores_nothing() {
    let dir = tempdir().expect("temp dir");
    let config = settings(&dir);
    let mut writer = writer(&config);
    // SQLite answers SQLITE_FULL when the file would grow past max_page_count: a full disk
    // as SQLite reports it, without filling one.
    let pages: i64 = writer.conn.query_row("PRAGMA page_count", [], |row| row.get(0)).expect("page count");
    writer.conn.execute_batch(&format!("PRAGMA max_page_count = {}", pages + 2)).expect("cap the file");
    let outcomes = writer.commit_group(&[pending(&[7; 1 << 20], "big"), pending(b"small", "small")]);
    for outcome in &outcomes {
        assert!(matches!(outcome, Err(OutboxError::Full(m)) if m.contains("disk is full")), "{outcome:?}");
    }
    assert!(writer.conn.is_autocommit(), "no transaction left open");
    assert_eq!(queued_models(&path_of(&config)), Vec::<String>::new());
    // The next group, which fits, is stored.
    let outcomes = writer.commit_group(&[pending(b"small", "small")]);
    assert_eq!(outcomes, [Ok(AppendResult { accepted: 1, ..AppendResult::default() })]);
    assert_eq!(queued_models(&path_of(&config)), ["small"]);
}

#[test]
fn an_sqlite_error_in_one_append_fails_only_that_append() {
    let dir = tempdir().expect("temp dir");
    let config = settings(&dir);
    let mut writer = writer(&config);
    // ABORT undoes the statement only; ROLLBACK makes SQLite roll back the whole transaction.
    writer
        .conn
        .execute_batch(
            "CREATE TEMP TRIGGER refuse_abort BEFORE INSERT ON items WHEN NEW.model_name = 'abort' \
               BEGIN SELECT RAISE(ABORT, 'refused by a test trigger'); END; \
             CREATE TEMP TRIGGER refuse_rollback BEFORE INSERT ON items WHEN NEW.model_name = 'rollback' \
               BEGIN SELECT RAISE(ROLLBACK, 'rolled back by a test trigger'); END;",
        )
        .expect("triggers");
    let group = [
        pending(b"1", "first"),
        pending(b"2", "abort"),
        pending(b"3", "middle"),
        pending(b"4", "rollback"),
        pending(b"5", "last"),
    ];
    let outcomes = writer.commit_group(&group);
    let stored = Ok(AppendResult { accepted: 1, ..AppendResult::default() });
    assert_eq!(outcomes[0], stored);
    assert!(
        matches!(&outcomes[1], Err(OutboxError::Other(m)) if m.contains("refused by a test trigger")),
        "{:?}",
        outcomes[1]
    );
    assert_eq!(outcomes[2], stored);
    assert!(
        matches!(&outcomes[3], Err(OutboxError::Other(m)) if m.contains("rolled back by a test trigger")),
        "{:?}",
        outcomes[3]
    );
    assert_eq!(outcomes[4], stored);
    assert_eq!(queued_models(&path_of(&config)), ["first", "middle", "last"]);
    // The failed appends' assets went with their savepoints.
    let assets: i64 = writer.conn.query_row("SELECT count(*) FROM assets", [], |row| row.get(0)).expect("count");
    assert_eq!(assets, 3);
    let appended: i64 = writer
        .conn
        .query_row("SELECT value FROM counters WHERE name = 'appended'", [], |row| row.get(0))
        .expect("counter");
    assert_eq!(appended, 3, "counted once, after the restart");
}

#[test]
fn a_panic_fails_its_group_and_the_writer_goes_on() {
    let dir = tempdir().expect("temp dir");
    let config = settings(&dir);
    let outbox = Outbox::open(config.clone()).expect("open");
    let error = outbox.append(vec![new_item(b"boom", PANIC_MODEL_NAME)], WAIT).expect_err("panicked append");
    let message = error.to_string();
    assert!(matches!(error, OutboxError::Other(_)), "{error:?}");
    assert!(message.contains("injected by a test") && message.contains("nothing of it was stored"), "{message}");
    let after = outbox.append(vec![new_item(b"fine", "fine")], WAIT);
    assert_eq!(after, Ok(AppendResult { accepted: 1, ..AppendResult::default() }));
    assert_eq!(queued_models(&config.path), ["fine"]);
}

#[test]
fn after_the_writer_thread_dies_appends_fail_instead_of_hanging() {
    let dir = tempdir().expect("temp dir");
    let config = settings(&dir);
    let outbox = Outbox::open(config.clone()).expect("open");
    // Stored, then the thread dies outside any catch_unwind.
    let last = outbox.append(vec![new_item(b"last", DIE_MODEL_NAME)], WAIT);
    assert_eq!(last, Ok(AppendResult { accepted: 1, ..AppendResult::default() }));
    let started = std::time::Instant::now();
    let error = outbox.append(vec![new_item(b"after", "after")], WAIT).expect_err("refused");
    assert!(matches!(&error, OutboxError::Other(m) if m.contains("writer thread")), "{error:?}");
    assert!(started.elapsed() < Duration::from_secs(5), "waited {:?}", started.elapsed());
    outbox.close();
    assert_eq!(queued_models(&config.path), [DIE_MODEL_NAME]);
}
