//! The SQL of one append, inside a transaction the writer thread holds: the same steps and
//! queries as the Python package's `Outbox.append_many` / `_append_one` / `_make_room`.

use rusqlite::{params, Connection, OptionalExtension};

use crate::config::OverflowPolicy;
use crate::item::{PreparedAppend, PreparedItem};
use crate::AppendResult;

/// The caps an append must respect.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Caps {
    pub max_items: u64,
    pub max_bytes: u64,
    pub overflow_policy: OverflowPolicy,
    /// Rows with an invalid output (NULL score) queued at most: they are never evicted and
    /// would win every eviction, so without a bound a client sending junk fills the outbox.
    pub max_invalid_items: u64,
}

/// Counter names shared with the Python package (the `counters` table).
pub(crate) mod counter {
    pub const APPENDED: &str = "appended";
    pub const DUPLICATES: &str = "duplicates";
    pub const DROPPED_OVERFLOW: &str = "dropped_overflow";
    /// Invalid-output rows not queued because they already hold their share of the outbox.
    pub const DROPPED_INVALID_SHARE: &str = "dropped_invalid_share";
    pub const REFUSED_OVERSIZE: &str = "refused_oversize";
    pub const EVICTED_OVERFLOW: &str = "evicted_overflow";
    pub const QUEUED_ITEMS: &str = "queued_items";
    pub const STORED_BYTES: &str = "stored_bytes";
}

/// Queue every (item, distinct group) row of one append; counters are bumped by the caller,
/// once per transaction.
pub(crate) fn store_append(
    conn: &Connection,
    caps: Caps,
    append: &PreparedAppend,
    created_at: f64,
) -> rusqlite::Result<AppendResult> {
    let mut result = AppendResult { refused: append.refused_rows, ..AppendResult::default() };
    for item in &append.items {
        #[cfg(test)]
        crate::writer::test_hooks::maybe_panic(&item.item.model_name);
        for group in item.distinct_groups() {
            store_row(conn, caps, item, group, created_at, &mut result)?;
        }
    }
    Ok(result)
}

fn store_row(
    conn: &Connection,
    caps: Caps,
    item: &PreparedItem,
    group: &str,
    created_at: f64,
    result: &mut AppendResult,
) -> rusqlite::Result<()> {
    let hash = item.content_hash.as_str();
    let seen = conn
        .prepare_cached(
            "SELECT 1 FROM items WHERE upload_group = ?1 AND content_hash = ?2 \
             UNION ALL SELECT 1 FROM delivered WHERE upload_group = ?1 AND content_hash = ?2 \
             UNION ALL SELECT 1 FROM dead_letters WHERE upload_group = ?1 AND content_hash = ?2 LIMIT 1",
        )?
        .exists(params![group, hash])?;
    if seen {
        result.duplicates += 1;
        return Ok(());
    }
    if item.score.is_none() {
        let invalid: i64 = conn.prepare_cached("SELECT count(*) FROM items WHERE score IS NULL")?.query_row([], |r| r.get(0))?;
        if u64::try_from(invalid).unwrap_or(0) >= caps.max_invalid_items {
            bump(conn, counter::DROPPED_INVALID_SHARE, 1)?;
            result.dropped += 1;
            return Ok(());
        }
    }
    let have_asset = conn.prepare_cached("SELECT 1 FROM assets WHERE content_hash = ?1")?.exists([hash])?;
    let asset_size = u64::try_from(item.item.asset.len()).unwrap_or(u64::MAX);
    // Each row stores its own copy of the embedding (counted by the items triggers).
    let embedding_size = item.embedding.as_ref().map_or(0, |bytes| u64::try_from(bytes.len()).unwrap_or(u64::MAX));
    let new_bytes = embedding_size.saturating_add(if have_asset { 0 } else { asset_size });
    if !make_room(conn, caps, new_bytes, item.score, hash)? {
        result.dropped += 1;
        return Ok(());
    }
    let new = &item.item;
    if !have_asset {
        conn.prepare_cached("INSERT INTO assets VALUES (?1, ?2, ?3, ?4)")?.execute(params![
            hash,
            new.media_type,
            i64::try_from(asset_size).unwrap_or(i64::MAX),
            new.asset
        ])?;
    }
    conn.prepare_cached(
        "INSERT INTO items (upload_group, content_hash, model_name, model_version, prediction, score, \
         strategy, threshold, reason, created_at, embedding) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
    )?
    .execute(params![
        group,
        hash,
        new.model_name,
        new.model_version,
        new.prediction_json,
        item.score,
        new.strategy,
        new.threshold,
        new.reason,
        created_at,
        item.embedding
    ])?;
    result.accepted += 1;
    Ok(())
}

/// True when one more row (and `new_bytes`: its asset if not stored yet, and its embedding)
/// fits, after evicting per the policy.
fn make_room(conn: &Connection, caps: Caps, new_bytes: u64, score: Option<f64>, hash: &str) -> rusqlite::Result<bool> {
    if new_bytes > caps.max_bytes {
        return Ok(false);
    }
    loop {
        let items = read_counter(conn, counter::QUEUED_ITEMS)?;
        let stored = read_counter(conn, counter::STORED_BYTES)?;
        if items.saturating_add(1) <= caps.max_items && stored.saturating_add(new_bytes) <= caps.max_bytes {
            return Ok(true);
        }
        if caps.overflow_policy == OverflowPolicy::DropNewest {
            return Ok(false);
        }
        // Evict the most confident queued item if the newcomer is less confident (NULL = an
        // invalid output counts as the least confident of all). Never one sharing the
        // newcomer's asset: evicting it could delete the asset the newcomer relies on.
        let victim: Option<(i64, f64)> = conn
            .prepare_cached(
                "SELECT id, score FROM items WHERE score IS NOT NULL AND content_hash != ?1 \
                 ORDER BY score DESC, id DESC LIMIT 1",
            )?
            .query_row([hash], |row| Ok((row.get(0)?, row.get(1)?)))
            .optional()?;
        let Some((victim_id, victim_score)) = victim else {
            return Ok(false);
        };
        if matches!(score, Some(newcomer) if victim_score <= newcomer) {
            return Ok(false);
        }
        conn.prepare_cached("DELETE FROM items WHERE id = ?1")?.execute([victim_id])?;
        bump(conn, counter::EVICTED_OVERFLOW, 1)?;
    }
}

/// Add `by` to a counter (nothing when 0, like the Python package).
pub(crate) fn bump(conn: &Connection, name: &str, by: u64) -> rusqlite::Result<()> {
    if by > 0 {
        conn.prepare_cached(
            "INSERT INTO counters VALUES (?1, ?2) ON CONFLICT (name) DO UPDATE SET value = value + excluded.value",
        )?
        .execute(params![name, i64::try_from(by).unwrap_or(i64::MAX)])?;
    }
    Ok(())
}

fn read_counter(conn: &Connection, name: &str) -> rusqlite::Result<u64> {
    let value: Option<i64> = conn
        .prepare_cached("SELECT value FROM counters WHERE name = ?1")?
        .query_row([name], |row| row.get(0))
        .optional()?;
    // Triggers keep these non-negative; a negative value (hand-edited file) counts as empty.
    Ok(value.map_or(0, |v| u64::try_from(v).unwrap_or(0)))
}

/// Bump the per-transaction counters with the totals of the appends it stored.
pub(crate) fn bump_totals(conn: &Connection, totals: &AppendResult) -> rusqlite::Result<()> {
    bump(conn, counter::APPENDED, totals.accepted)?;
    bump(conn, counter::DUPLICATES, totals.duplicates)?;
    bump(conn, counter::DROPPED_OVERFLOW, totals.dropped)?;
    bump(conn, counter::REFUSED_OVERSIZE, totals.refused)
}
