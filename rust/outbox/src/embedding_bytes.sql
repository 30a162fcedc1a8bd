-- Embedding bytes count like asset bytes: a queued row's in `stored_bytes` (what `max_bytes`
-- bounds), a dead letter's in `dead_letter_bytes` (kept by the uploader; see the Python
-- package's `triton_al.outbox`). Moving a row to the dead letters or back is an INSERT into
-- one table and a DELETE from the other, so these triggers count it too. No code updates the
-- `embedding` column of a stored row. Part of schema version 2 (included in `SCHEMA`), but
-- added after its first files were written: opening a file without them creates them
-- (`UPGRADES`), and counts the embeddings already stored once (`EMBEDDING_BYTES_RECOUNT`).
CREATE TRIGGER IF NOT EXISTS items_embedding_added AFTER INSERT ON items WHEN NEW.embedding IS NOT NULL BEGIN
    INSERT INTO counters VALUES ('stored_bytes', length(NEW.embedding))
        ON CONFLICT (name) DO UPDATE SET value = value + excluded.value;
END;
CREATE TRIGGER IF NOT EXISTS items_embedding_removed AFTER DELETE ON items WHEN OLD.embedding IS NOT NULL BEGIN
    UPDATE counters SET value = value - length(OLD.embedding) WHERE name = 'stored_bytes';
END;
CREATE TRIGGER IF NOT EXISTS dead_embedding_added AFTER INSERT ON dead_letters WHEN NEW.embedding IS NOT NULL BEGIN
    INSERT INTO counters VALUES ('dead_letter_bytes', length(NEW.embedding))
        ON CONFLICT (name) DO UPDATE SET value = value + excluded.value;
END;
CREATE TRIGGER IF NOT EXISTS dead_embedding_removed AFTER DELETE ON dead_letters WHEN OLD.embedding IS NOT NULL BEGIN
    UPDATE counters SET value = value - length(OLD.embedding) WHERE name = 'dead_letter_bytes';
END;
