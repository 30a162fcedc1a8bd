//! Opening: a new file gets the schema, files the Python package made keep working, and
//! everything else fails with a message naming the path.

mod common;

use std::fs;
use std::path::Path;
use std::sync::{Arc, Barrier};

use common::{config, item, outbox_path, queued, reader, WAIT};
use rusqlite::Connection;
use tempfile::tempdir;
use triton_al_outbox::{Outbox, OutboxConfig, OutboxError, SCHEMA_VERSION};

/// The schema as it was at version 1, unchanged (shared with tests/test_outbox.py).
const SCHEMA_V1: &str = include_str!("../../../tests/outbox_schema_v1.sql");

fn open_error(settings: OutboxConfig) -> OutboxError {
    match Outbox::open(settings) {
        Ok(_) => panic!("expected opening to fail"),
        Err(error) => error,
    }
}

/// (type, name, sql) of every schema object, sorted.
fn schema_objects(conn: &Connection) -> Vec<(String, String, Option<String>)> {
    let mut statement = conn
        .prepare("SELECT type, name, sql FROM sqlite_master WHERE name NOT LIKE 'sqlite_%' ORDER BY type, name")
        .expect("prepare");
    statement
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .expect("query")
        .collect::<Result<_, _>>()
        .expect("rows")
}

#[test]
fn a_new_file_gets_the_schema_in_wal_mode() {
    let dir = tempdir().expect("temp dir");
    let path = outbox_path(&dir);
    let outbox = Outbox::open(config(&dir)).expect("open");
    let conn = reader(&path);
    let version: String =
        conn.query_row("SELECT value FROM meta WHERE key = 'schema_version'", [], |r| r.get(0)).expect("version");
    assert_eq!(version, SCHEMA_VERSION.to_string());
    let journal: String = conn.query_row("PRAGMA journal_mode", [], |r| r.get(0)).expect("journal mode");
    assert_eq!(journal, "wal");
    let names: Vec<String> = schema_objects(&conn).into_iter().map(|(_, name, _)| name).collect();
    for expected in [
        "meta",
        "assets",
        "items",
        "dead_letters",
        "delivered",
        "counters",
        "paused_groups",
        "items_added",
        "assets_removed",
    ] {
        assert!(names.iter().any(|name| name == expected), "{expected} missing from {names:?}");
    }
    drop(outbox);
    // Opening again leaves the file as it is.
    let before = schema_objects(&conn);
    Outbox::open(config(&dir)).expect("reopen").close();
    assert_eq!(schema_objects(&conn), before);
}

/// Files made before this crate existed (by the Python package, with SQLite's default 4 KiB
/// pages, at schema version 1) keep working.
#[test]
fn a_file_made_with_4_kib_pages_keeps_working() {
    let dir = tempdir().expect("temp dir");
    let older = dir.path().join("older.sqlite");
    let conn = Connection::open(&older).expect("open");
    conn.execute_batch("PRAGMA page_size=4096; PRAGMA journal_mode=WAL").expect("wal");
    conn.execute_batch(&format!("{SCHEMA_V1}INSERT OR IGNORE INTO meta VALUES ('schema_version', '1');")).expect("schema");
    let outbox = Outbox::open(OutboxConfig::new(&older)).expect("open an older file");
    outbox.append(vec![item(b"cat", 0.5, &["a"])], WAIT).expect("append");
    assert_eq!(queued(&older).len(), 1);
    let page_size: i64 = conn.query_row("PRAGMA page_size", [], |r| r.get(0)).expect("page size");
    assert_eq!(page_size, 4096, "an existing file keeps its page size");
}

#[test]
fn a_new_file_gets_small_pages() {
    let dir = tempdir().expect("temp dir");
    Outbox::open(config(&dir)).expect("create").close();
    let conn = Connection::open(outbox_path(&dir)).expect("open");
    let page_size: i64 = conn.query_row("PRAGMA page_size", [], |r| r.get(0)).expect("page size");
    assert_eq!(page_size, i64::from(triton_al_outbox::NEW_FILE_PAGE_SIZE));
}

#[test]
fn a_new_file_and_its_wal_are_private_to_their_owner() {
    use std::os::unix::fs::PermissionsExt;

    let dir = tempdir().expect("temp dir");
    let outbox = Outbox::open(config(&dir)).expect("create");
    outbox.append(vec![item(b"cat", 0.5, &["a"])], WAIT).expect("append");
    let path = outbox_path(&dir);
    for file in [path.clone(), dir.path().join("outbox.sqlite-wal"), dir.path().join("outbox.sqlite-shm")] {
        let mode = fs::metadata(&file).expect("stat").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{} is {mode:o}", file.display());
    }
}

#[test]
fn another_schema_version_is_refused() {
    let dir = tempdir().expect("temp dir");
    let path = outbox_path(&dir);
    Outbox::open(config(&dir)).expect("create").close();
    reader(&path).execute("UPDATE meta SET value = '3' WHERE key = 'schema_version'", []).expect("bump version");
    let error = open_error(config(&dir));
    assert!(matches!(error, OutboxError::Other(_)), "{error:?}");
    let message = error.to_string();
    assert!(message.contains("schema version 3, this triton-al-outbox expects 2") && message.contains(&path.display().to_string()), "{message}");
}

/// A version-1 file as the old code made it, with a queued item and a dead letter.
fn version_1_file(path: &Path) {
    let conn = Connection::open(path).expect("open");
    conn.execute_batch("PRAGMA journal_mode=WAL").expect("wal");
    conn.execute_batch(&format!(
        "{SCHEMA_V1}INSERT OR IGNORE INTO meta VALUES ('schema_version', '1');
         INSERT INTO assets VALUES ('h1', 'image/png', 3, x'010203'), ('h2', 'image/png', 1, x'04');
         INSERT INTO items (upload_group, content_hash, model_name, model_version, prediction, score, strategy,
             threshold, reason, created_at) VALUES ('a', 'h1', 'm', '1', '{{}}', 0.25, 'entropy', 0.5, 'uncertain', 1.0);
         INSERT INTO dead_letters VALUES (7, 'a', 'h2', 'm', '1', '{{}}', 0.1, 'entropy', 0.5, 'uncertain', 1.0, 3, 2.0, 'rejected');"
    ))
    .expect("a version-1 file");
}

/// (name, declared type) of a table's columns, in order.
fn columns(conn: &Connection, table: &str) -> Vec<(String, String)> {
    let mut statement = conn.prepare(&format!("SELECT name, type FROM pragma_table_info('{table}') ORDER BY cid")).expect("prepare");
    statement.query_map([], |r| Ok((r.get(0)?, r.get(1)?))).expect("query").collect::<Result<_, _>>().expect("rows")
}

#[test]
fn a_version_1_file_gets_the_embedding_columns_at_open_and_keeps_its_rows() {
    let dir = tempdir().expect("temp dir");
    let older = dir.path().join("v1.sqlite");
    version_1_file(&older);
    let outbox = Outbox::open(OutboxConfig::new(&older)).expect("open a version-1 file");
    let mut with_embedding = item(b"dog", 0.2, &["a"]);
    with_embedding.embedding = Some(vec![0.5, -1.0, 3.25]);
    outbox.append(vec![with_embedding], WAIT).expect("append");
    outbox.close();

    let conn = reader(&older);
    let version: String = conn.query_row("SELECT value FROM meta WHERE key = 'schema_version'", [], |r| r.get(0)).expect("version");
    assert_eq!(version, "2");
    let embeddings: Vec<(String, Option<Vec<u8>>)> = conn
        .prepare("SELECT content_hash, embedding FROM items ORDER BY id")
        .expect("prepare")
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .expect("query")
        .collect::<Result<_, _>>()
        .expect("rows");
    let floats: Vec<u8> = [0.5f32, -1.0, 3.25].iter().flat_map(|v| v.to_le_bytes()).collect();
    assert_eq!(embeddings, [("h1".to_string(), None), (triton_al_outbox::content_hash(b"dog"), Some(floats))]);
    let dead: (i64, Option<Vec<u8>>) = conn.query_row("SELECT id, embedding FROM dead_letters", [], |r| Ok((r.get(0)?, r.get(1)?))).expect("dead letter");
    assert_eq!(dead, (7, None));
    // The same columns, in the same order, as a file made at version 2.
    Outbox::open(config(&dir)).expect("new file").close();
    let new = reader(&outbox_path(&dir));
    for table in ["items", "dead_letters"] {
        assert_eq!(columns(&conn, table), columns(&new, table), "{table}");
        assert_eq!(columns(&conn, table).last(), Some(&("embedding".to_string(), "BLOB".to_string())), "{table}");
    }
    // Opening again changes nothing.
    let before = schema_objects(&conn);
    Outbox::open(OutboxConfig::new(&older)).expect("reopen").close();
    assert_eq!(schema_objects(&conn), before);
}

#[test]
fn writers_opening_a_version_1_file_at_once_migrate_it_once() {
    let dir = tempdir().expect("temp dir");
    let older = dir.path().join("v1.sqlite");
    version_1_file(&older);
    let openers = 8;
    let barrier = Arc::new(Barrier::new(openers));
    let threads: Vec<_> = (0..openers)
        .map(|k| {
            let (barrier, path) = (Arc::clone(&barrier), older.clone());
            std::thread::spawn(move || {
                barrier.wait();
                let outbox = Outbox::open(OutboxConfig::new(&path)).expect("open while others migrate");
                let mut flagged = item(format!("item {k}").as_bytes(), 0.2, &["a"]);
                flagged.embedding = Some(vec![k as f32; 4]);
                outbox.append(vec![flagged], WAIT).expect("append")
            })
        })
        .collect();
    for thread in threads {
        assert_eq!(thread.join().expect("opener").accepted, 1);
    }
    let conn = reader(&older);
    let embeddings: i64 = conn.query_row("SELECT count(*) FROM items WHERE length(embedding) = 16", [], |r| r.get(0)).expect("count");
    assert_eq!(embeddings, openers as i64);
    assert_eq!(columns(&conn, "items").iter().filter(|(name, _)| name == "embedding").count(), 1);
}

/// The embedding-bytes triggers present in a file.
fn embedding_triggers(conn: &Connection) -> Vec<String> {
    let mut statement = conn
        .prepare("SELECT name FROM sqlite_master WHERE type = 'trigger' AND name LIKE '%embedding%' ORDER BY name")
        .expect("prepare");
    statement.query_map([], |r| r.get(0)).expect("query").collect::<Result<_, _>>().expect("rows")
}

const ALL_EMBEDDING_TRIGGERS: [&str; 4] =
    ["dead_embedding_added", "dead_embedding_removed", "items_embedding_added", "items_embedding_removed"];

#[test]
fn a_version_1_file_gets_the_embedding_bytes_triggers_when_migrated() {
    let dir = tempdir().expect("temp dir");
    let older = dir.path().join("v1.sqlite");
    version_1_file(&older);
    let stored_before = counter_value(&reader(&older), "stored_bytes");
    let outbox = Outbox::open(OutboxConfig::new(&older)).expect("open a version-1 file");
    let mut with_embedding = item(b"dog", 0.2, &["a"]);
    with_embedding.embedding = Some(vec![0.5; 10]);
    outbox.append(vec![with_embedding], WAIT).expect("append");
    outbox.close();
    let conn = reader(&older);
    assert_eq!(embedding_triggers(&conn), ALL_EMBEDDING_TRIGGERS);
    assert_eq!(counter_value(&conn, "stored_bytes"), stored_before + 3 + 40);
}

fn counter_value(conn: &Connection, name: &str) -> i64 {
    conn.query_row("SELECT coalesce((SELECT value FROM counters WHERE name = ?1), 0)", [name], |r| r.get(0)).expect("counter")
}

/// A version-2 file as the build before the embedding-bytes triggers left it: embeddings in
/// the queue and the dead letters, counted nowhere.
fn version_2_file_without_triggers(path: &Path) {
    Outbox::open(OutboxConfig::new(path)).expect("create").close();
    let conn = reader(path);
    for trigger in ALL_EMBEDDING_TRIGGERS {
        conn.execute_batch(&format!("DROP TRIGGER {trigger}")).expect("drop trigger");
    }
    conn.execute_batch(
        "INSERT INTO assets VALUES ('h1', 'image/png', 3, x'010203'), ('h2', 'image/png', 1, x'04');
         INSERT INTO items (upload_group, content_hash, model_name, model_version, prediction, score, strategy,
             threshold, reason, created_at, embedding) VALUES ('a', 'h1', 'm', '1', '{}', 0.25, 'entropy', 0.5, 'uncertain', 1.0, zeroblob(400)),
             ('b', 'h1', 'm', '1', '{}', 0.25, 'entropy', 0.5, 'uncertain', 1.0, zeroblob(400));
         INSERT INTO dead_letters VALUES (7, 'a', 'h2', 'm', '1', '{}', 0.1, 'entropy', 0.5, 'uncertain', 1.0, 3, 2.0, 'rejected', zeroblob(80));",
    )
    .expect("rows");
    assert_eq!(counter_value(&conn, "stored_bytes"), 4, "the assets only, as the triggers then counted");
}

#[test]
fn a_version_2_file_without_the_embedding_bytes_triggers_gets_them_and_counts_its_embeddings_once() {
    let dir = tempdir().expect("temp dir");
    let path = outbox_path(&dir);
    version_2_file_without_triggers(&path);
    let conn = reader(&path);
    for _ in 0..3 {
        // Opening again neither adds the triggers twice nor counts the embeddings twice.
        Outbox::open(OutboxConfig::new(&path)).expect("open").close();
        assert_eq!(embedding_triggers(&conn), ALL_EMBEDDING_TRIGGERS);
        assert_eq!(counter_value(&conn, "stored_bytes"), 4 + 2 * 400);
        assert_eq!(counter_value(&conn, "dead_letter_bytes"), 80);
    }
    // From now on the triggers keep them.
    conn.execute_batch("DELETE FROM items WHERE upload_group = 'a'; DELETE FROM dead_letters").expect("delete");
    assert_eq!(counter_value(&conn, "stored_bytes"), 4 + 400 - 1, "h2's asset went with its dead letter");
    assert_eq!(counter_value(&conn, "dead_letter_bytes"), 0);
}

#[test]
fn a_file_that_is_not_sqlite_is_refused_naming_it() {
    let dir = tempdir().expect("temp dir");
    let path = outbox_path(&dir);
    let text = "this is a text file, not an SQLite database\n".repeat(100);
    fs::write(&path, &text).expect("write");
    let error = open_error(config(&dir));
    let message = error.to_string();
    assert!(matches!(error, OutboxError::Other(_)), "{error:?}");
    assert!(message.contains(&format!("outbox {}: cannot open it as an SQLite outbox", path.display())), "{message}");
    assert!(message.contains("not a database"), "{message}");
    assert_eq!(fs::read_to_string(&path).expect("read"), text, "the file is left alone");
}

#[test]
fn a_missing_directory_is_named() {
    let dir = tempdir().expect("temp dir");
    let missing = dir.path().join("no such dir");
    let error = open_error(OutboxConfig::new(missing.join("outbox.sqlite")));
    assert!(matches!(error, OutboxError::Invalid(_)), "{error:?}");
    let message = error.to_string();
    assert!(message.contains(&format!("directory {} does not exist", missing.display())), "{message}");
    assert!(!missing.exists());
}

#[test]
fn zero_caps_are_refused() {
    let dir = tempdir().expect("temp dir");
    for settings in [
        OutboxConfig { max_items: 0, ..config(&dir) },
        OutboxConfig { max_bytes: 0, ..config(&dir) },
        OutboxConfig { max_asset_bytes: 0, ..config(&dir) },
        OutboxConfig { max_pending_items: 0, ..config(&dir) },
    ] {
        let error = open_error(settings);
        assert!(matches!(&error, OutboxError::Invalid(m) if m.contains("must be positive")), "{error:?}");
    }
    assert!(!outbox_path(&dir).exists(), "nothing is created for a bad configuration");
}

#[test]
fn writers_creating_a_new_file_at_once_all_open_it() {
    for round in 0..200 {
        let dir = tempdir().expect("temp dir");
        let path = outbox_path(&dir);
        let openers = 8;
        let barrier = Arc::new(Barrier::new(openers));
        let threads: Vec<_> = (0..openers)
            .map(|_| {
                let (barrier, path) = (Arc::clone(&barrier), path.clone());
                std::thread::spawn(move || {
                    barrier.wait();
                    Outbox::open(OutboxConfig::new(&path)).map(|_| ())
                })
            })
            .collect();
        for thread in threads {
            if let Err(e) = thread.join().expect("opener") {
                panic!("round {round}: {e}");
            }
        }
    }
}
