-- The outbox schema, version 2 (`SCHEMA_VERSION`): the same as the Python package's, so a file
-- created by either side works with the other. Every statement is idempotent (IF NOT EXISTS);
-- the caller records the version in `meta` after running it. A version-1 file gets version 2's
-- `embedding` columns when it is opened (`MIGRATIONS`, in one transaction): they come last, as
-- ALTER TABLE ... ADD COLUMN puts them, so both kinds of file have the same columns in order.
-- `SCHEMA` is this file followed by embedding_bytes.sql (the triggers counting embedding bytes).
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS assets (
    content_hash TEXT PRIMARY KEY,
    media_type TEXT NOT NULL,
    size INTEGER NOT NULL,
    data BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS items (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    upload_group TEXT NOT NULL,
    content_hash TEXT NOT NULL REFERENCES assets (content_hash),
    model_name TEXT NOT NULL,
    model_version TEXT NOT NULL,
    prediction TEXT NOT NULL,
    score REAL,                -- NULL stands for NaN (invalid model output)
    strategy TEXT NOT NULL,
    threshold REAL NOT NULL,
    reason TEXT NOT NULL,
    created_at REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL DEFAULT 0,
    last_error TEXT,
    embedding BLOB,            -- the model's embedding of the item: little-endian f32; NULL = none
    UNIQUE (upload_group, content_hash)
);
CREATE INDEX IF NOT EXISTS items_by_hash ON items (content_hash);
CREATE INDEX IF NOT EXISTS items_by_score ON items (score);
CREATE INDEX IF NOT EXISTS items_due ON items (next_attempt_at, id);
CREATE TABLE IF NOT EXISTS dead_letters (
    id INTEGER PRIMARY KEY,
    upload_group TEXT NOT NULL,
    content_hash TEXT NOT NULL,
    model_name TEXT NOT NULL,
    model_version TEXT NOT NULL,
    prediction TEXT NOT NULL,
    score REAL,
    strategy TEXT NOT NULL,
    threshold REAL NOT NULL,
    reason TEXT NOT NULL,
    created_at REAL NOT NULL,
    attempts INTEGER NOT NULL,
    failed_at REAL NOT NULL,
    error TEXT NOT NULL,
    embedding BLOB,
    UNIQUE (upload_group, content_hash)
);
CREATE INDEX IF NOT EXISTS dead_by_hash ON dead_letters (content_hash);
CREATE TABLE IF NOT EXISTS delivered (
    upload_group TEXT NOT NULL,
    content_hash TEXT NOT NULL,
    delivered_at REAL NOT NULL,
    PRIMARY KEY (upload_group, content_hash)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS delivered_by_time ON delivered (upload_group, delivered_at);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS paused_groups (upload_group TEXT PRIMARY KEY) WITHOUT ROWID;

-- Running totals for the caps, kept by the database itself so no code path can forget.
CREATE TRIGGER IF NOT EXISTS items_added AFTER INSERT ON items BEGIN
    INSERT INTO counters VALUES ('queued_items', 1) ON CONFLICT (name) DO UPDATE SET value = value + 1;
END;
CREATE TRIGGER IF NOT EXISTS items_removed AFTER DELETE ON items BEGIN
    UPDATE counters SET value = value - 1 WHERE name = 'queued_items';
    -- An asset goes when nothing refers to it any more.
    DELETE FROM assets WHERE content_hash = OLD.content_hash
        AND NOT EXISTS (SELECT 1 FROM items WHERE content_hash = OLD.content_hash)
        AND NOT EXISTS (SELECT 1 FROM dead_letters WHERE content_hash = OLD.content_hash);
END;
CREATE TRIGGER IF NOT EXISTS dead_removed AFTER DELETE ON dead_letters BEGIN
    DELETE FROM assets WHERE content_hash = OLD.content_hash
        AND NOT EXISTS (SELECT 1 FROM items WHERE content_hash = OLD.content_hash)
        AND NOT EXISTS (SELECT 1 FROM dead_letters WHERE content_hash = OLD.content_hash);
END;
CREATE TRIGGER IF NOT EXISTS assets_added AFTER INSERT ON assets BEGIN
    INSERT INTO counters VALUES ('stored_bytes', NEW.size) ON CONFLICT (name) DO UPDATE SET value = value + NEW.size;
END;
CREATE TRIGGER IF NOT EXISTS assets_removed AFTER DELETE ON assets BEGIN
    UPDATE counters SET value = value - OLD.size WHERE name = 'stored_bytes';
END;
