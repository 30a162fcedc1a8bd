//! The outbox's one writer.
//!
//! Flagged items wait in an SQLite file (WAL mode) until the uploader delivers them; see the
//! Python package's `triton_al.outbox` for the reader side and the schema's meaning. In a
//! process, every append goes through one `Outbox`, whose writer thread commits all appends
//! waiting at that moment in one transaction and (with `SyncMode::Full`) flushes the WAL once
//! for all of them, after releasing the write lock. Other processes may write the same file
//! at the same time; SQLite's write lock orders them.
//!
//! ```no_run
//! use std::sync::Arc;
//! use std::time::Duration;
//! use triton_al_outbox::{NewItem, Outbox, OutboxConfig};
//!
//! let outbox = Outbox::open(OutboxConfig::new("/var/lib/triton-al/outbox.sqlite"))?;
//! let item = NewItem {
//!     asset: b"...".to_vec(),
//!     media_type: "image/png".into(),
//!     model_name: "resnet".into(),
//!     model_version: "3".into(),
//!     prediction_json: r#"{"probabilities":[0.4,0.6]}"#.into(),
//!     score: 0.12,
//!     strategy: "entropy".into(),
//!     threshold: 0.3,
//!     reason: "uncertain".into(),
//!     upload_groups: Arc::from(vec!["to-label".to_string()]),
//!     embedding: Some(vec![0.25, -1.5, 3.0]),
//! };
//! let result = outbox.append(vec![item], Duration::from_secs(5))?;
//! assert_eq!(result.accepted, 1);
//! # Ok::<(), triton_al_outbox::OutboxError>(())
//! ```

mod append;
mod busy;
mod config;
mod database;
mod error;
mod item;
mod outbox;
mod queue;
mod wal;
mod writer;

pub use database::NEW_FILE_PAGE_SIZE;
pub use config::{OutboxConfig, OverflowPolicy, SyncMode};
pub use error::OutboxError;
pub use item::{content_hash, validate_group_name, NewItem, MAX_EMBEDDING_DIMS};
pub use outbox::{AppendResult, Outbox, Ticket};
pub use queue::WriterStats;

/// The outbox schema (tables, indexes, triggers); idempotent. After running it on a new file,
/// record the version: `INSERT OR IGNORE INTO meta VALUES ('schema_version', '2')`.
pub const SCHEMA: &str = concat!(include_str!("schema.sql"), include_str!("embedding_bytes.sql"));

/// The triggers that count embedding bytes (`items` in `stored_bytes`, `dead_letters` in
/// `dead_letter_bytes`); part of [`SCHEMA`].
pub const EMBEDDING_BYTES_TRIGGERS: &str = include_str!("embedding_bytes.sql");

/// Run once, right after [`EMBEDDING_BYTES_TRIGGERS`] are added to a file that had none: the
/// embeddings already stored were counted nowhere, so their bytes are added to the counters
/// (which were exact for the assets). Counters at 0 stay absent, as on a new file.
pub const EMBEDDING_BYTES_RECOUNT: &str = "\
INSERT INTO counters SELECT 'stored_bytes', total FROM (SELECT sum(length(embedding)) AS total FROM items) \
    WHERE total > 0 ON CONFLICT (name) DO UPDATE SET value = value + excluded.value;
INSERT INTO counters SELECT 'dead_letter_bytes', total FROM (SELECT sum(length(embedding)) AS total FROM dead_letters) \
    WHERE total > 0 ON CONFLICT (name) DO UPDATE SET value = value + excluded.value;
";

/// The schema version this crate reads and writes (`meta.schema_version`).
pub const SCHEMA_VERSION: i64 = 2;

/// How an older file is brought to [`SCHEMA_VERSION`] when it is opened: per version, the
/// (table, column definition) pairs added to reach the next one. The Python package's
/// `triton_al.outbox` makes the same changes.
pub const MIGRATIONS: &[(i64, &[(&str, &str)])] = &[
    // 1 -> 2: the model's embedding of an item (`NewItem::embedding`), in the queue and the dead letters.
    (1, &[("items", "embedding BLOB"), ("dead_letters", "embedding BLOB")]),
];

/// What opening a file of [`SCHEMA_VERSION`] adds when it is missing (a file migrated from an
/// older version, or one written by an earlier build of the same version), in the same
/// transaction as the migration: per upgrade, (trigger whose absence says it is missing,
/// idempotent statements creating it, statements run once right after). The Python package's
/// `triton_al.outbox` applies the same list (`_core.OUTBOX_UPGRADES`).
pub const UPGRADES: &[(&str, &str, &str)] =
    &[("dead_embedding_removed", EMBEDDING_BYTES_TRIGGERS, EMBEDDING_BYTES_RECOUNT)];
