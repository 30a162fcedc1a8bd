//! What one append stores: rows per group, dedup, caps and overflow policies, refusals,
//! counters. The semantics of the Python package's `Outbox.append_many`.

mod common;

use std::time::{SystemTime, UNIX_EPOCH};

use common::{config, count, counter, item, outbox_path, queued, reader, stored_hashes, WAIT};
use tempfile::tempdir;
use triton_al_outbox::{content_hash, AppendResult, Outbox, OutboxConfig, OutboxError, OverflowPolicy};

fn accepted(n: u64) -> AppendResult {
    AppendResult { accepted: n, ..AppendResult::default() }
}

#[test]
fn one_row_per_distinct_group_and_the_asset_once() {
    let dir = tempdir().expect("temp dir");
    let path = outbox_path(&dir);
    let outbox = Outbox::open(config(&dir)).expect("open");
    let before = SystemTime::now().duration_since(UNIX_EPOCH).expect("clock").as_secs_f64();
    let result = outbox.append(vec![item(b"cat", 0.25, &["a", "b", "a"])], WAIT).expect("append");
    let after = SystemTime::now().duration_since(UNIX_EPOCH).expect("clock").as_secs_f64();
    assert_eq!(result, accepted(2));
    let hash = content_hash(b"cat");
    assert_eq!(queued(&path), [("a".into(), hash.clone(), Some(0.25)), ("b".into(), hash.clone(), Some(0.25))]);

    let conn = reader(&path);
    let (model, version, prediction, strategy, threshold, reason, created_at, attempts): (
        String,
        String,
        String,
        String,
        f64,
        String,
        f64,
        i64,
    ) = conn
        .query_row(
            "SELECT model_name, model_version, prediction, strategy, threshold, reason, created_at, attempts \
             FROM items WHERE upload_group = 'a'",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?, r.get(6)?, r.get(7)?)),
        )
        .expect("row");
    assert_eq!(
        (
            model.as_str(),
            version.as_str(),
            prediction.as_str(),
            strategy.as_str(),
            threshold,
            reason.as_str(),
            attempts
        ),
        ("resnet", "3", r#"{"probabilities":[0.25,0.75]}"#, "entropy", 0.4, "uncertain", 0)
    );
    assert!(before <= created_at && created_at <= after, "created_at {created_at} not in [{before}, {after}]");
    let (media_type, size, data): (String, i64, Vec<u8>) = conn
        .query_row("SELECT media_type, size, data FROM assets WHERE content_hash = ?1", [&hash], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?))
        })
        .expect("asset");
    assert_eq!((media_type.as_str(), size, data.as_slice()), ("image/png", 3, b"cat".as_slice()));
    assert_eq!(count(&path, "assets"), 1);
    assert_eq!((counter(&path, "appended"), counter(&path, "queued_items"), counter(&path, "stored_bytes")), (2, 2, 3));
}

#[test]
fn the_same_asset_twice_in_a_group_is_a_duplicate() {
    let dir = tempdir().expect("temp dir");
    let path = outbox_path(&dir);
    let outbox = Outbox::open(config(&dir)).expect("open");
    assert_eq!(outbox.append(vec![item(b"cat", 0.2, &["a"])], WAIT).expect("first"), accepted(1));
    let again = outbox.append(vec![item(b"cat", 0.1, &["a"])], WAIT).expect("second");
    assert_eq!(again, AppendResult { duplicates: 1, ..AppendResult::default() });
    // Within one append too.
    let twice = outbox.append(vec![item(b"dog", 0.2, &["a"]), item(b"dog", 0.3, &["a"])], WAIT).expect("third");
    assert_eq!(twice, AppendResult { accepted: 1, duplicates: 1, ..AppendResult::default() });
    assert_eq!(queued(&path).len(), 2);
    assert_eq!((counter(&path, "appended"), counter(&path, "duplicates")), (2, 2));
}

#[test]
fn another_group_later_reuses_the_stored_asset() {
    let dir = tempdir().expect("temp dir");
    let path = outbox_path(&dir);
    let outbox = Outbox::open(config(&dir)).expect("open");
    assert_eq!(outbox.append(vec![item(b"cat", 0.2, &["a"])], WAIT).expect("a"), accepted(1));
    assert_eq!(outbox.append(vec![item(b"cat", 0.2, &["b"])], WAIT).expect("b"), accepted(1));
    assert_eq!(queued(&path).len(), 2);
    assert_eq!(stored_hashes(&path), [content_hash(b"cat")]);
    assert_eq!(counter(&path, "stored_bytes"), 3);
}

#[test]
fn a_delivered_item_is_a_duplicate_in_its_group_only() {
    let dir = tempdir().expect("temp dir");
    let path = outbox_path(&dir);
    let outbox = Outbox::open(config(&dir)).expect("open");
    outbox.append(vec![item(b"cat", 0.2, &["a"])], WAIT).expect("append");
    // What the uploader's mark_delivered does.
    reader(&path)
        .execute_batch(
            "BEGIN IMMEDIATE; INSERT INTO delivered SELECT upload_group, content_hash, 1.0 FROM items; \
             DELETE FROM items; COMMIT;",
        )
        .expect("deliver");
    assert_eq!(count(&path, "assets"), 0, "the trigger deletes an asset nothing refers to");
    let again = outbox.append(vec![item(b"cat", 0.2, &["a"])], WAIT).expect("again");
    assert_eq!(again, AppendResult { duplicates: 1, ..AppendResult::default() });
    assert_eq!(outbox.append(vec![item(b"cat", 0.2, &["b"])], WAIT).expect("other group"), accepted(1));
    assert_eq!(queued(&path), [("b".into(), content_hash(b"cat"), Some(0.2))]);
}

#[test]
fn a_dead_lettered_item_is_a_duplicate() {
    let dir = tempdir().expect("temp dir");
    let path = outbox_path(&dir);
    let outbox = Outbox::open(config(&dir)).expect("open");
    outbox.append(vec![item(b"cat", 0.2, &["a"])], WAIT).expect("append");
    // What the uploader's dead_letter does.
    reader(&path)
        .execute_batch(
            "BEGIN IMMEDIATE; \
             INSERT INTO dead_letters (id, upload_group, content_hash, model_name, model_version, prediction, \
               score, strategy, threshold, reason, created_at, attempts, failed_at, error, embedding) \
             SELECT id, upload_group, content_hash, model_name, model_version, prediction, \
               score, strategy, threshold, reason, created_at, attempts + 1, 2.0, 'rejected', embedding FROM items; \
             DELETE FROM items; COMMIT;",
        )
        .expect("dead-letter");
    let again = outbox.append(vec![item(b"cat", 0.2, &["a"])], WAIT).expect("again");
    assert_eq!(again, AppendResult { duplicates: 1, ..AppendResult::default() });
    assert_eq!(queued(&path).len(), 0);
}

#[test]
fn drop_newest_keeps_the_queue() {
    let dir = tempdir().expect("temp dir");
    let path = outbox_path(&dir);
    let outbox =
        Outbox::open(OutboxConfig { max_items: 2, overflow_policy: OverflowPolicy::DropNewest, ..config(&dir) })
            .expect("open");
    for (asset, score) in [(b"one", 0.9), (b"two", 0.5)] {
        assert_eq!(outbox.append(vec![item(asset, score, &["a"])], WAIT).expect("append"), accepted(1));
    }
    let third = outbox.append(vec![item(b"six", 0.1, &["a"])], WAIT).expect("third");
    assert_eq!(third, AppendResult { dropped: 1, ..AppendResult::default() });
    let hashes: Vec<String> = queued(&path).into_iter().map(|(_, hash, _)| hash).collect();
    assert_eq!(hashes, [content_hash(b"one"), content_hash(b"two")]);
    assert_eq!(stored_hashes(&path).len(), 2, "the dropped asset is not stored");
    assert_eq!((counter(&path, "dropped_overflow"), counter(&path, "evicted_overflow")), (1, 0));
}

#[test]
fn drop_least_uncertain_evicts_the_most_confident_for_a_less_confident_newcomer() {
    let dir = tempdir().expect("temp dir");
    let path = outbox_path(&dir);
    let settings = OutboxConfig { max_items: 2, ..config(&dir) };
    assert_eq!(settings.overflow_policy, OverflowPolicy::DropLeastUncertain, "the default, as in Python");
    let outbox = Outbox::open(settings).expect("open");
    outbox.append(vec![item(b"sure", 0.9, &["a"]), item(b"mid", 0.5, &["a"])], WAIT).expect("fill");
    assert_eq!(outbox.append(vec![item(b"unsure", 0.3, &["a"])], WAIT).expect("newcomer"), accepted(1));
    let scores: Vec<Option<f64>> = queued(&path).into_iter().map(|(_, _, score)| score).collect();
    assert_eq!(scores, [Some(0.5), Some(0.3)]);
    assert!(!stored_hashes(&path).contains(&content_hash(b"sure")), "the evicted item's asset is deleted");
    assert_eq!(counter(&path, "evicted_overflow"), 1);

    // More confident than, or as confident as, the most confident queued item: dropped.
    for (asset, score) in [(b"very sure".as_slice(), 0.95), (b"as sure".as_slice(), 0.5)] {
        let result = outbox.append(vec![item(asset, score, &["a"])], WAIT).expect("confident newcomer");
        assert_eq!(result, AppendResult { dropped: 1, ..AppendResult::default() }, "score {score}");
    }
    assert_eq!((counter(&path, "dropped_overflow"), counter(&path, "evicted_overflow")), (2, 1));
    assert_eq!(counter(&path, "queued_items"), 2);
}

#[test]
fn a_nan_newcomer_is_least_confident_and_nan_items_are_never_evicted() {
    let dir = tempdir().expect("temp dir");
    let path = outbox_path(&dir);
    // Here invalid outputs may fill the outbox (the share bound is tested below).
    let outbox = Outbox::open(OutboxConfig { max_items: 2, max_invalid_share: 1.0, ..config(&dir) }).expect("open");
    outbox.append(vec![item(b"low", 0.01, &["a"]), item(b"bad", f64::NAN, &["a"])], WAIT).expect("fill");
    // Even the least confident scored item goes for an invalid output.
    assert_eq!(outbox.append(vec![item(b"bad too", f64::NAN, &["a"])], WAIT).expect("nan"), accepted(1));
    assert_eq!(queued(&path), [("a".into(), content_hash(b"bad"), None), ("a".into(), content_hash(b"bad too"), None)]);
    // Nothing scored is left to evict: even a zero score is dropped.
    let result = outbox.append(vec![item(b"zero", 0.0, &["a"])], WAIT).expect("zero");
    assert_eq!(result, AppendResult { dropped: 1, ..AppendResult::default() });
    let third_nan = outbox.append(vec![item(b"bad three", f64::NAN, &["a"])], WAIT).expect("nan");
    assert_eq!(third_nan, AppendResult { dropped: 1, ..AppendResult::default() });
}

#[test]
fn invalid_outputs_hold_at_most_their_share_of_the_outbox() {
    let dir = tempdir().expect("temp dir");
    let path = outbox_path(&dir);
    let outbox = Outbox::open(OutboxConfig { max_items: 10, max_invalid_share: 0.2, ..config(&dir) }).expect("open");
    let junk: Vec<_> = (0..5u8).map(|k| item(&[b'j', k], f64::NAN, &["a"])).collect();
    let result = outbox.append(junk, WAIT).expect("junk");
    assert_eq!(result, AppendResult { accepted: 2, dropped: 3, ..AppendResult::default() });
    assert_eq!(counter(&path, "dropped_invalid_share"), 3);
    // Scored items still find room, and still cannot evict the invalid ones.
    let scored: Vec<_> = (0..8u8).map(|k| item(&[b's', k], 0.1, &["a"])).collect();
    assert_eq!(outbox.append(scored, WAIT).expect("scored"), accepted(8));
    assert_eq!(queued(&path).iter().filter(|(_, _, score)| score.is_none()).count(), 2);
    let bad = OutboxConfig { max_invalid_share: 0.0, ..config(&dir) };
    assert!(matches!(Outbox::open(bad), Err(triton_al_outbox::OutboxError::Invalid(m)) if m.contains("max_invalid_share")));
}

#[test]
fn eviction_spares_items_sharing_the_newcomers_asset() {
    let dir = tempdir().expect("temp dir");
    let path = outbox_path(&dir);
    let outbox = Outbox::open(OutboxConfig { max_items: 2, ..config(&dir) }).expect("open");
    outbox.append(vec![item(b"shared", 0.9, &["a"]), item(b"other", 0.5, &["a"])], WAIT).expect("fill");
    // The most confident queued item is the newcomer's own asset (in group a): evicting it
    // would delete the asset; the next most confident goes instead.
    assert_eq!(outbox.append(vec![item(b"shared", 0.1, &["b"])], WAIT).expect("newcomer"), accepted(1));
    let shared = content_hash(b"shared");
    assert_eq!(queued(&path), [("a".into(), shared.clone(), Some(0.9)), ("b".into(), shared.clone(), Some(0.1))]);
    assert_eq!(stored_hashes(&path), [shared]);
}

#[test]
fn max_bytes_counts_each_asset_once() {
    let dir = tempdir().expect("temp dir");
    let path = outbox_path(&dir);
    let outbox =
        Outbox::open(OutboxConfig { max_bytes: 100, overflow_policy: OverflowPolicy::DropNewest, ..config(&dir) })
            .expect("open");
    let sixty_a = [b'a'; 60];
    let sixty_b = [b'b'; 60];
    assert_eq!(outbox.append(vec![item(&sixty_a, 0.5, &["a"])], WAIT).expect("first"), accepted(1));
    let over = outbox.append(vec![item(&sixty_b, 0.1, &["a"])], WAIT).expect("second");
    assert_eq!(over, AppendResult { dropped: 1, ..AppendResult::default() });
    // The stored asset costs no new bytes for another group.
    assert_eq!(outbox.append(vec![item(&sixty_a, 0.5, &["b"])], WAIT).expect("other group"), accepted(1));
    assert_eq!(counter(&path, "stored_bytes"), 60);
    assert_eq!(queued(&path).len(), 2);
}

#[test]
fn max_bytes_evicts_under_drop_least_uncertain_but_never_for_an_asset_bigger_than_the_cap() {
    let dir = tempdir().expect("temp dir");
    let path = outbox_path(&dir);
    let outbox = Outbox::open(OutboxConfig { max_bytes: 100, ..config(&dir) }).expect("open");
    outbox.append(vec![item(&[b'a'; 60], 0.9, &["a"])], WAIT).expect("first");
    assert_eq!(outbox.append(vec![item(&[b'b'; 60], 0.2, &["a"])], WAIT).expect("second"), accepted(1));
    assert_eq!(stored_hashes(&path), [content_hash(&[b'b'; 60])]);
    assert_eq!(counter(&path, "stored_bytes"), 60);
    // Bigger than max_bytes: dropped without evicting anything, however unsure.
    let huge = outbox.append(vec![item(&[b'c'; 101], f64::NAN, &["a"])], WAIT).expect("huge");
    assert_eq!(huge, AppendResult { dropped: 1, ..AppendResult::default() });
    assert_eq!(queued(&path).len(), 1);
}

#[test]
fn an_oversize_asset_is_refused_and_counted_and_the_rest_is_stored() {
    let dir = tempdir().expect("temp dir");
    let path = outbox_path(&dir);
    let outbox = Outbox::open(OutboxConfig { max_asset_bytes: 10, ..config(&dir) }).expect("open");
    let result = outbox
        .append(vec![item(&[b'x'; 11], 0.1, &["a", "b", "a"]), item(&[b'y'; 10], 0.1, &["a"])], WAIT)
        .expect("append");
    assert_eq!(result, AppendResult { accepted: 1, refused: 2, ..AppendResult::default() });
    assert_eq!(stored_hashes(&path), [content_hash(&[b'y'; 10])]);
    assert_eq!((counter(&path, "refused_oversize"), counter(&path, "appended")), (2, 1));
    // Only refused: still counted.
    let only = outbox.append(vec![item(&[b'z'; 100], 0.1, &["a"])], WAIT).expect("append");
    assert_eq!(only, AppendResult { refused: 1, ..AppendResult::default() });
    assert_eq!(counter(&path, "refused_oversize"), 3);
}

#[test]
fn counters_add_up_over_mixed_appends() {
    let dir = tempdir().expect("temp dir");
    let path = outbox_path(&dir);
    let outbox = Outbox::open(OutboxConfig {
        max_items: 3,
        max_asset_bytes: 8,
        overflow_policy: OverflowPolicy::DropNewest,
        ..config(&dir)
    })
    .expect("open");
    let mut total = AppendResult::default();
    let appends = [
        vec![item(b"one", 0.1, &["a", "b"])],
        vec![item(b"one", 0.1, &["a", "c"]), item(b"too large", 0.1, &["a"])],
        vec![item(b"two", 0.1, &["a"]), item(b"three", 0.1, &["a"])],
    ];
    for items in appends {
        let result = outbox.append(items, WAIT).expect("append");
        total.accepted += result.accepted;
        total.duplicates += result.duplicates;
        total.dropped += result.dropped;
        total.refused += result.refused;
    }
    assert_eq!(total, AppendResult { accepted: 3, duplicates: 1, dropped: 2, refused: 1 });
    let counters = ["appended", "duplicates", "dropped_overflow", "refused_oversize", "queued_items"]
        .map(|name| counter(&path, name));
    assert_eq!(counters, [3, 1, 2, 1, 3]);
}

#[test]
fn a_bad_item_refuses_the_whole_append() {
    let dir = tempdir().expect("temp dir");
    let path = outbox_path(&dir);
    let outbox = Outbox::open(config(&dir)).expect("open");
    let mut empty_asset = item(b"", 0.1, &["a"]);
    empty_asset.asset.clear();
    let mut nan_threshold = item(b"t", 0.1, &["a"]);
    nan_threshold.threshold = f64::NAN;
    let mut nan_embedding = item(b"e", 0.1, &["a"]);
    nan_embedding.embedding = Some(vec![0.0, f32::NAN]);
    let mut long_embedding = item(b"l", 0.1, &["a"]);
    long_embedding.embedding = Some(vec![0.0; 4097]);
    let cases = [
        (empty_asset, "asset"),
        (item(b"no group", 0.1, &[]), "upload_groups"),
        (item(b"newline", 0.1, &["a\n"]), "not allowed"),
        (item(b"dots", 0.1, &["a..b"]), "not allowed"),
        (nan_threshold, "threshold"),
        (nan_embedding, "embedding: expected finite values, got NaN at index 1"),
        (long_embedding, "embedding: expected 1 to 4096 values, got 4097"),
    ];
    for (bad, expected) in cases {
        let error = outbox.submit(vec![item(b"good", 0.1, &["a"]), bad]).expect_err("refused");
        match &error {
            OutboxError::Invalid(message) => {
                assert!(message.contains(expected) && message.contains("item 1"), "{message}");
                assert!(message.contains(path.to_str().expect("utf-8 path")), "{message}");
            }
            other => panic!("expected Invalid, got {other:?}"),
        }
    }
    assert_eq!(outbox.append(vec![], WAIT).expect("empty append"), AppendResult::default());
    outbox.close();
    assert_eq!(outbox.stats().transactions, 0, "nothing reached the database");
    assert_eq!(count(&path, "items"), 0);
}

#[test]
fn an_embedding_is_stored_as_little_endian_f32_bytes_and_none_as_null() {
    let dir = tempdir().expect("temp dir");
    let path = outbox_path(&dir);
    let outbox = Outbox::open(config(&dir)).expect("open");
    let values: Vec<f32> = (0..4096).map(|i| i as f32 * 0.5 - 1000.0).collect();
    let mut with = item(b"with", 0.1, &["a", "b"]);
    with.embedding = Some(values.clone());
    outbox.append(vec![with, item(b"without", 0.1, &["a"])], WAIT).expect("append");
    let conn = reader(&path);
    let rows: Vec<(String, String, Option<Vec<u8>>)> = conn
        .prepare("SELECT upload_group, content_hash, embedding FROM items ORDER BY id")
        .expect("prepare")
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .expect("query")
        .collect::<Result<_, _>>()
        .expect("rows");
    let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    assert_eq!(
        rows,
        [
            ("a".into(), content_hash(b"with"), Some(bytes.clone())),
            ("b".into(), content_hash(b"with"), Some(bytes)),
            ("a".into(), content_hash(b"without"), None),
        ]
    );
    // Counted in the byte cap: the assets once, the embedding once per row.
    assert_eq!(counter(&path, "stored_bytes"), (b"with".len() + b"without".len() + 2 * 4 * 4096) as i64);
}

fn with_embedding(asset: &[u8], score: f64, groups: &[&str], dims: usize) -> triton_al_outbox::NewItem {
    let mut flagged = item(asset, score, groups);
    flagged.embedding = Some(vec![0.5; dims]);
    flagged
}

/// `stored_bytes` as the tables say it should be: the assets (no dead letters here) and every
/// queued row's embedding.
fn recounted_bytes(path: &std::path::Path) -> i64 {
    reader(path)
        .query_row(
            "SELECT (SELECT coalesce(sum(size), 0) FROM assets) + (SELECT coalesce(sum(length(embedding)), 0) FROM items)",
            [],
            |r| r.get(0),
        )
        .expect("recount")
}

#[test]
fn max_bytes_counts_embeddings_so_drop_newest_refuses_what_would_pass_the_cap() {
    let dir = tempdir().expect("temp dir");
    let path = outbox_path(&dir);
    // Room for 3 rows of a 100-byte asset with a 4,096-value embedding (16,484 bytes each), not 4.
    let cap = 3 * (100 + 4 * 4096) + 50;
    let outbox =
        Outbox::open(OutboxConfig { max_bytes: cap, overflow_policy: OverflowPolicy::DropNewest, ..config(&dir) })
            .expect("open");
    let assets: Vec<[u8; 100]> = (0..4u8).map(|k| [k; 100]).collect();
    let items = assets.iter().map(|asset| with_embedding(asset, 0.1, &["a"], 4096)).collect();
    assert_eq!(outbox.append(items, WAIT).expect("append"), AppendResult { accepted: 3, dropped: 1, ..AppendResult::default() });
    // Another group for a stored asset costs its embedding again: no room for it either.
    let again = outbox.append(vec![with_embedding(&assets[0], 0.1, &["b"], 4096)], WAIT).expect("append");
    assert_eq!(again, AppendResult { dropped: 1, ..AppendResult::default() });
    // Without an embedding it costs nothing new.
    assert_eq!(outbox.append(vec![item(&assets[0], 0.1, &["b"])], WAIT).expect("append"), accepted(1));
    assert_eq!(counter(&path, "stored_bytes"), 3 * (100 + 4 * 4096));
    assert_eq!(counter(&path, "stored_bytes"), recounted_bytes(&path));
    assert!(counter(&path, "stored_bytes") <= cap as i64);
}

#[test]
fn drop_least_uncertain_evicts_enough_rows_to_make_room_for_a_newcomers_embedding() {
    let dir = tempdir().expect("temp dir");
    let path = outbox_path(&dir);
    let cap = 4 * (10 + 4 * 64) + 5;
    let outbox = Outbox::open(OutboxConfig { max_bytes: cap, ..config(&dir) }).expect("open");
    let small: Vec<_> = (0..4u8).map(|k| with_embedding(&[k; 10], 0.5 + f64::from(k) * 0.1, &["a"], 64)).collect();
    assert_eq!(outbox.append(small, WAIT).expect("append"), accepted(4));
    // A newcomer whose embedding needs the room of two rows: the two most confident go.
    let big = with_embedding(&[9; 10], 0.1, &["a"], 2 * 64);
    assert_eq!(outbox.append(vec![big], WAIT).expect("append"), accepted(1));
    assert_eq!(counter(&path, "evicted_overflow"), 2);
    let scores: Vec<Option<f64>> = queued(&path).into_iter().map(|(_, _, score)| score).collect();
    assert_eq!(scores, [Some(0.5), Some(0.6), Some(0.1)]);
    assert_eq!(counter(&path, "stored_bytes"), recounted_bytes(&path));
    assert!(counter(&path, "stored_bytes") <= cap as i64);
    // An embedding alone bigger than the cap is dropped without evicting anything.
    let huge = with_embedding(&[8; 1], f64::NAN, &["a"], cap as usize / 4 + 1);
    assert_eq!(outbox.append(vec![huge], WAIT).expect("append"), AppendResult { dropped: 1, ..AppendResult::default() });
    assert_eq!(queued(&path).len(), 3);
    // Rows leaving the queue take their embedding's bytes with them.
    reader(&path).execute("DELETE FROM items", []).expect("deliver everything");
    assert_eq!(counter(&path, "stored_bytes"), 0);
}
