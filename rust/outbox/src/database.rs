//! Opening the outbox file: connection settings, the schema on a new file, the migration of
//! an older one, the version check.

use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use rusqlite::{Connection, ErrorCode, OpenFlags, OptionalExtension, TransactionBehavior};

use crate::error::OutboxError;
use crate::{busy, MIGRATIONS, SCHEMA, SCHEMA_VERSION, UPGRADES};

/// Let SQLite checkpoint inside a commit only when the WAL has grown past this many pages
/// (64 MiB): the uploader checkpoints after each batch, so writers on the inference path
/// rarely pay for one. The Python package's default.
const WAL_AUTOCHECKPOINT_PAGES: u32 = 16_384;

/// Page size of a new outbox file (an existing file keeps its own). An append rewrites about
/// ten pages (tables, indexes, counters) whatever their size, and the WAL flush writes them
/// all: measured here, 4 callers at 1,000 appends/s, 1 KiB pages gave p50 0.91-1.05 ms against
/// 1.43-1.51 ms with SQLite's default 4 KiB (examples/append_latency.rs).
pub const NEW_FILE_PAGE_SIZE: u32 = 1024;

/// Statements one append uses, with room to spare: all stay prepared.
const STATEMENT_CACHE_CAPACITY: usize = 32;

/// Between attempts to open a file another connection is setting up: 1, 2, 3 ... 20 ms.
const OPEN_RETRY_STEP: Duration = Duration::from_millis(1);
const OPEN_RETRY_LONGEST: Duration = Duration::from_millis(20);

/// A connection ready for appends, on the calling thread (see `busy`).
///
/// Opening is retried, whole, while it fails as busy, for up to `busy_timeout`: switching a
/// new file to WAL upgrades a read lock to a write lock, and SQLite fails such an upgrade at
/// once (SQLITE_BUSY, without the busy handler) when another connection reads the file, so
/// two models opening the same new outbox together could lose one of them its outbox (8
/// threads opening new files together: an opener failed within 24 to 153 rounds, in each of
/// 5 runs of tests/open.rs `writers_creating_a_new_file_at_once_all_open_it`). Every step of
/// opening is idempotent, so trying again is safe.
pub(crate) fn open(path: &Path, busy_timeout: Duration) -> Result<Connection, OutboxError> {
    let started = Instant::now();
    let mut attempt: u32 = 0;
    loop {
        match open_once(path, busy_timeout) {
            Err(OutboxError::Busy(_)) if started.elapsed() < busy_timeout => {
                attempt = attempt.saturating_add(1);
                std::thread::sleep(OPEN_RETRY_STEP.saturating_mul(attempt).min(OPEN_RETRY_LONGEST));
            }
            opened => return opened,
        }
    }
}

fn open_once(path: &Path, busy_timeout: Duration) -> Result<Connection, OutboxError> {
    let shown = path.display();
    let directory = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    };
    if !directory.is_dir() {
        return Err(OutboxError::Invalid(format!("outbox {shown}: directory {} does not exist", directory.display())));
    }
    let cannot_open = |e: rusqlite::Error| {
        let problem = format!("outbox {shown}: cannot open it as an SQLite outbox ({e})");
        match e.sqlite_error_code() {
            Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked) => OutboxError::Busy(problem),
            Some(ErrorCode::DiskFull) => OutboxError::Full(problem),
            _ => OutboxError::Other(problem),
        }
    };
    // Flagged images are private: a new file is created readable by its owner only (SQLite
    // gives the -wal and -shm files the database file's permissions).
    if let Err(e) = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path) {
        if e.kind() != std::io::ErrorKind::AlreadyExists {
            return Err(OutboxError::Other(format!("outbox {shown}: cannot create it ({e})")));
        }
    }
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_CREATE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let conn = Connection::open_with_flags(path, flags).map_err(cannot_open)?;
    busy::install(&conn, busy_timeout).map_err(cannot_open)?;
    conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE_CAPACITY);
    // Only takes effect on a new (empty) file: it must come before anything is written.
    conn.execute_batch(&format!("PRAGMA page_size={NEW_FILE_PAGE_SIZE}")).map_err(cannot_open)?;
    let journal_mode: String = conn.query_row("PRAGMA journal_mode=WAL", [], |row| row.get(0)).map_err(cannot_open)?;
    if !journal_mode.eq_ignore_ascii_case("wal") {
        return Err(OutboxError::Other(format!(
            "outbox {shown}: SQLite could not switch it to WAL mode (journal mode {journal_mode})"
        )));
    }
    // NORMAL even for SyncMode::Full: the writer flushes the WAL itself after the commit,
    // once for a whole group and without holding the write lock. secure_delete=OFF: the
    // system SQLite of Debian zeroes every freed page, which doubles what evicting an asset
    // writes to the WAL (the Python side sets the same, and says what was measured).
    conn.execute_batch(&format!(
        "PRAGMA synchronous=NORMAL; PRAGMA foreign_keys=ON; PRAGMA wal_autocheckpoint={WAL_AUTOCHECKPOINT_PAGES}; \
         PRAGMA secure_delete=OFF;"
    ))
    .map_err(cannot_open)?;
    let version = match schema_version(&conn).map_err(cannot_open)? {
        Some(version) if needs_migration(&conn, &version).map_err(cannot_open)? => migrate(&conn).map_err(cannot_open)?,
        Some(version) => version,
        None => {
            create_schema(&conn).map_err(cannot_open)?;
            schema_version(&conn).map_err(cannot_open)?.unwrap_or_default()
        }
    };
    if version.trim().parse::<i64>() != Ok(SCHEMA_VERSION) {
        return Err(OutboxError::Other(format!(
            "outbox {shown}: schema version {version}, this triton-al-outbox expects {SCHEMA_VERSION}"
        )));
    }
    Ok(conn)
}

/// The recorded version (as stored: text), or `None` for a file without one (a new file).
fn schema_version(conn: &Connection) -> rusqlite::Result<Option<String>> {
    let has_meta = conn.prepare("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta'")?.exists([])?;
    if !has_meta {
        return Ok(None);
    }
    conn.query_row("SELECT value FROM meta WHERE key = 'schema_version'", [], |row| row.get(0)).optional()
}

/// The columns to add to a file of this version to reach the next one, when it is older.
fn migration_from(version: &str) -> Option<&'static [(&'static str, &'static str)]> {
    let version: i64 = version.trim().parse().ok()?;
    MIGRATIONS.iter().find(|(from, _)| *from == version).map(|(_, columns)| *columns)
}

/// Whether opening must write: an older version, or an upgrade of this one missing.
fn needs_migration(conn: &Connection, version: &str) -> rusqlite::Result<bool> {
    if migration_from(version).is_some() {
        return Ok(true);
    }
    if version.trim().parse::<i64>() != Ok(SCHEMA_VERSION) {
        return Ok(false);
    }
    Ok(!missing_upgrades(conn)?.is_empty())
}

/// The upgrades (`UPGRADES`) a file lacks.
fn missing_upgrades(conn: &Connection) -> rusqlite::Result<Vec<&'static (&'static str, &'static str, &'static str)>> {
    let mut missing = Vec::new();
    for upgrade in UPGRADES {
        let present = conn.prepare_cached("SELECT 1 FROM sqlite_master WHERE type = 'trigger' AND name = ?1")?.exists([upgrade.0])?;
        if !present {
            missing.push(upgrade);
        }
    }
    Ok(missing)
}

/// Bring an older file to `SCHEMA_VERSION`, and a file of that version to its upgrades, in
/// one IMMEDIATE transaction. The version and the upgrades are read again under the write
/// lock, so of several processes opening the same old file at once the first migrates and the
/// others find it done; a column already there is not added again, an upgrade present is not
/// run again (its once-only statements neither). Returns the version the file has after (one
/// this crate does not know is left as it is, without upgrades).
fn migrate(conn: &Connection) -> rusqlite::Result<String> {
    let transaction = rusqlite::Transaction::new_unchecked(conn, TransactionBehavior::Immediate)?;
    let mut version = schema_version(&transaction)?.unwrap_or_default();
    let mut migrated = false;
    while let Some(columns) = migration_from(&version) {
        for (table, column) in columns {
            let name = column.split_whitespace().next().unwrap_or(column);
            let present = transaction.prepare(&format!("SELECT 1 FROM pragma_table_info('{table}') WHERE name = ?1"))?.exists([name])?;
            if !present {
                transaction.execute_batch(&format!("ALTER TABLE {table} ADD COLUMN {column}"))?;
            }
        }
        version = (version.trim().parse::<i64>().unwrap_or_default() + 1).to_string();
        migrated = true;
    }
    if migrated {
        transaction.execute("UPDATE meta SET value = ?1 WHERE key = 'schema_version'", [&version])?;
    }
    if version.trim().parse::<i64>() == Ok(SCHEMA_VERSION) {
        for (_, create, once) in missing_upgrades(&transaction)? {
            transaction.execute_batch(create)?;
            transaction.execute_batch(once)?;
        }
    }
    transaction.commit()?;
    Ok(version)
}

/// The only write at open. Idempotent, so two processes creating the same file race safely.
fn create_schema(conn: &Connection) -> rusqlite::Result<()> {
    let transaction = rusqlite::Transaction::new_unchecked(conn, TransactionBehavior::Immediate)?;
    transaction.execute_batch(SCHEMA)?;
    transaction.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?1)", [SCHEMA_VERSION.to_string()])?;
    transaction.commit()
}
