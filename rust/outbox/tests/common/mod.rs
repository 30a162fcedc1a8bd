//! Helpers shared by the integration tests: items, configurations, and a plain SQLite
//! connection to look at what the writer stored.

#![allow(dead_code)] // each test file uses a different part

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rusqlite::{Connection, OptionalExtension};
use tempfile::TempDir;
use triton_al_outbox::{NewItem, OutboxConfig, SyncMode};

/// Long enough never to be the reason a test fails on a slow machine.
pub const WAIT: Duration = Duration::from_secs(30);

pub fn groups(names: &[&str]) -> Arc<[String]> {
    names.iter().map(|name| name.to_string()).collect()
}

pub fn item(asset: &[u8], score: f64, upload_groups: &[&str]) -> NewItem {
    NewItem {
        asset: asset.to_vec(),
        media_type: "image/png".into(),
        model_name: "resnet".into(),
        model_version: "3".into(),
        prediction_json: r#"{"probabilities":[0.25,0.75]}"#.into(),
        score,
        strategy: "entropy".into(),
        threshold: 0.4,
        reason: "uncertain".into(),
        upload_groups: groups(upload_groups),
        embedding: None,
    }
}

pub fn outbox_path(dir: &TempDir) -> PathBuf {
    dir.path().join("outbox.sqlite")
}

/// Defaults, except `SyncMode::Normal`: most tests are about what is stored, not flushing.
pub fn config(dir: &TempDir) -> OutboxConfig {
    OutboxConfig { sync: SyncMode::Normal, ..OutboxConfig::new(outbox_path(dir)) }
}

pub fn reader(path: &Path) -> Connection {
    let conn = Connection::open(path).expect("open the outbox with a plain connection");
    conn.busy_timeout(WAIT).expect("busy timeout");
    conn
}

/// (group, content hash, score) of every queued row, oldest first.
pub fn queued(path: &Path) -> Vec<(String, String, Option<f64>)> {
    let conn = reader(path);
    let mut statement =
        conn.prepare("SELECT upload_group, content_hash, score FROM items ORDER BY id").expect("prepare");
    statement
        .query_map([], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)))
        .expect("query")
        .collect::<Result<_, _>>()
        .expect("rows")
}

pub fn stored_hashes(path: &Path) -> Vec<String> {
    let conn = reader(path);
    let mut statement = conn.prepare("SELECT content_hash FROM assets ORDER BY content_hash").expect("prepare");
    statement.query_map([], |row| row.get(0)).expect("query").collect::<Result<_, _>>().expect("rows")
}

/// A counter's value; 0 when it was never bumped.
pub fn counter(path: &Path, name: &str) -> i64 {
    reader(path)
        .query_row("SELECT value FROM counters WHERE name = ?1", [name], |row| row.get(0))
        .optional()
        .expect("read counter")
        .unwrap_or(0)
}

pub fn count(path: &Path, table: &str) -> i64 {
    reader(path).query_row(&format!("SELECT count(*) FROM {table}"), [], |row| row.get(0)).expect("count")
}
