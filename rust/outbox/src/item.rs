//! A flagged item as callers hand it over, and as the writer thread receives it: checked,
//! hashed, with its NaN score turned into SQL NULL and its embedding into bytes.

use std::fmt;
use std::sync::Arc;

use sha2::{Digest, Sha256};

/// One flagged item: the asset, the model's prediction and why it was flagged.
#[derive(Clone, PartialEq)]
pub struct NewItem {
    pub asset: Vec<u8>,
    pub media_type: String,
    pub model_name: String,
    pub model_version: String,
    /// Already-serialised JSON; not checked here (the caller's job).
    pub prediction_json: String,
    /// Confidence in [0, 1]; NaN stands for an invalid model output (stored as NULL).
    pub score: f64,
    pub strategy: String,
    pub threshold: f64,
    pub reason: String,
    /// One queued row per distinct group; shared because a model sends all its items to
    /// the same groups.
    pub upload_groups: Arc<[String]>,
    /// The model's embedding of the item (1 to [`MAX_EMBEDDING_DIMS`] finite values), stored
    /// as little-endian f32 bytes for the uploader (near duplicates, diverse selection).
    pub embedding: Option<Vec<f32>>,
}

/// The longest embedding an item may carry.
pub const MAX_EMBEDDING_DIMS: usize = 4096;

// By hand: a derived Debug would print every byte of the asset.
impl fmt::Debug for NewItem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NewItem")
            .field("asset", &format_args!("<{} bytes>", self.asset.len()))
            .field("media_type", &self.media_type)
            .field("model_name", &self.model_name)
            .field("model_version", &self.model_version)
            .field("prediction_json", &self.prediction_json)
            .field("score", &self.score)
            .field("strategy", &self.strategy)
            .field("threshold", &self.threshold)
            .field("reason", &self.reason)
            .field("upload_groups", &self.upload_groups)
            .field("embedding_values", &self.embedding.as_ref().map(Vec::len))
            .finish()
    }
}

/// The content hash the outbox deduplicates on: lowercase hex SHA-256.
pub fn content_hash(data: &[u8]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let digest = Sha256::digest(data);
    let mut hex = String::with_capacity(2 * digest.len());
    for byte in digest {
        hex.push(char::from(HEX[usize::from(byte >> 4)]));
        hex.push(char::from(HEX[usize::from(byte & 0x0f)]));
    }
    hex
}

const MAX_GROUP_NAME_LEN: usize = 128;

/// An upload-group name: 1-128 of `A-Z a-z 0-9 . _ -`, starting with a letter or digit,
/// with no `..` (safe as a folder name and a URL path segment). The same rule as the Python
/// package's `validate_group_name`, matched over the whole name (a trailing newline too).
pub fn validate_group_name(name: &str) -> Result<(), String> {
    let allowed = |c: u8| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-');
    let bytes = name.as_bytes();
    let valid = matches!(bytes.first(), Some(c) if c.is_ascii_alphanumeric())
        && bytes.len() <= MAX_GROUP_NAME_LEN
        && bytes.iter().all(|&c| allowed(c))
        && !name.contains("..");
    if valid {
        Ok(())
    } else {
        Err(format!(
            "upload group name '{name}' is not allowed: use 1-128 letters, digits, '.', '_' or '-', \
             starting with a letter or digit, with no '..' (no paths, no hidden names)"
        ))
    }
}

/// An item ready for the writer thread.
pub(crate) struct PreparedItem {
    pub content_hash: String,
    /// The item as given, but without its embedding (taken into `embedding`).
    pub item: NewItem,
    /// `None` for a NaN score.
    pub score: Option<f64>,
    /// The embedding as stored: little-endian f32 bytes (the item's values, converted once
    /// and dropped).
    pub embedding: Option<Vec<u8>>,
}

impl PreparedItem {
    /// The item's upload groups, each once, in the order given.
    pub fn distinct_groups(&self) -> impl Iterator<Item = &str> {
        let groups = &self.item.upload_groups;
        groups
            .iter()
            .enumerate()
            .filter(move |(i, group)| !groups[..*i].contains(group))
            .map(|(_, group)| group.as_str())
    }
}

fn count_distinct(groups: &[String]) -> u64 {
    let distinct = groups.iter().enumerate().filter(|(i, group)| !groups[..*i].contains(group)).count();
    u64::try_from(distinct).unwrap_or(u64::MAX)
}

/// An append split into what goes to the database and what was refused for its size.
pub(crate) struct PreparedAppend {
    pub items: Vec<PreparedItem>,
    /// Rows (item, distinct group) refused because the asset exceeds `max_asset_bytes`.
    pub refused_rows: u64,
    pub asset_bytes: u64,
}

/// Check every item (any problem refuses the whole append), hash the assets that fit. Done on
/// the caller's thread so that many model instances hash in parallel, not on the writer.
/// Each embedding is taken out of its item and converted to bytes in the pass that checks it.
pub(crate) fn prepare(items: Vec<NewItem>, max_asset_bytes: u64) -> Result<PreparedAppend, String> {
    for (index, item) in items.iter().enumerate() {
        check(item).map_err(|problem| format!("item {index}: {problem}"))?;
    }
    let mut embeddings = Vec::with_capacity(items.len());
    let mut items = items;
    for (index, item) in items.iter_mut().enumerate() {
        let bytes = item.embedding.take().map(|values| checked_embedding_bytes(&values)).transpose();
        embeddings.push(bytes.map_err(|problem| format!("item {index}: {problem}"))?);
    }
    let mut prepared = PreparedAppend { items: Vec::with_capacity(items.len()), refused_rows: 0, asset_bytes: 0 };
    for (item, embedding) in items.into_iter().zip(embeddings) {
        let size = u64::try_from(item.asset.len()).unwrap_or(u64::MAX);
        if size > max_asset_bytes {
            prepared.refused_rows += count_distinct(&item.upload_groups);
            continue;
        }
        prepared.asset_bytes = prepared.asset_bytes.saturating_add(size);
        let score = if item.score.is_nan() { None } else { Some(item.score) };
        prepared.items.push(PreparedItem { content_hash: content_hash(&item.asset), item, score, embedding });
    }
    Ok(prepared)
}

fn check(item: &NewItem) -> Result<(), String> {
    if item.asset.is_empty() {
        return Err("asset: expected non-empty bytes".into());
    }
    if item.upload_groups.is_empty() {
        return Err("upload_groups: expected at least one group".into());
    }
    for group in item.upload_groups.iter() {
        validate_group_name(group)?;
    }
    // The column is NOT NULL and SQLite stores NaN as NULL: refuse it here, clearly.
    if item.threshold.is_nan() {
        return Err("threshold: expected a number, got NaN".into());
    }
    if let Some(embedding) = &item.embedding {
        if embedding.is_empty() || embedding.len() > MAX_EMBEDDING_DIMS {
            return Err(format!("embedding: expected 1 to {MAX_EMBEDDING_DIMS} values, got {}", embedding.len()));
        }
        // Finite values: checked by `checked_embedding_bytes`, while converting.
    }
    Ok(())
}

/// An embedding as stored (each value's little-endian bytes, in order), or the first value
/// that is not finite. One pass: the check is a branch that is never taken for a good one.
fn checked_embedding_bytes(values: &[f32]) -> Result<Vec<u8>, String> {
    let mut bytes = vec![0u8; values.len() * 4];
    let mut finite = true;
    for (out, value) in bytes.chunks_exact_mut(4).zip(values) {
        finite &= value.is_finite();
        out.copy_from_slice(&value.to_le_bytes());
    }
    if finite {
        return Ok(bytes);
    }
    let (index, value) = values.iter().enumerate().find(|(_, v)| !v.is_finite()).unwrap_or((0, &f32::NAN));
    Err(format!("embedding: expected finite values, got {value} at index {index}"))
}

/// An embedding as stored: each value's little-endian bytes, in order.
#[cfg(test)]
pub fn embedding_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_hash_is_lowercase_hex_sha256() {
        assert_eq!(content_hash(b"abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
        assert_eq!(content_hash(b""), "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
    }

    #[test]
    fn group_names_follow_the_python_rule_with_a_full_match() {
        let longest = "a".repeat(128);
        for good in ["a", "A", "0", "a.b_c-d", "Group-2024.v1", longest.as_str()] {
            assert_eq!(validate_group_name(good), Ok(()), "{good:?} should be allowed");
        }
        let too_long = "a".repeat(129);
        for bad in ["", "a\n", "\na", ".a", "-a", "_a", "a..b", "a/b", "a b", "é", "a\0", too_long.as_str()] {
            let error = validate_group_name(bad).expect_err(bad);
            assert!(error.contains("is not allowed"), "{error}");
        }
    }

    fn with_embedding(embedding: Option<Vec<f32>>) -> NewItem {
        NewItem {
            asset: vec![1],
            media_type: "image/png".into(),
            model_name: "m".into(),
            model_version: "1".into(),
            prediction_json: "{}".into(),
            score: 0.5,
            strategy: "entropy".into(),
            threshold: 0.5,
            reason: "uncertain".into(),
            upload_groups: Arc::from(vec!["a".to_string()]),
            embedding,
        }
    }

    #[test]
    fn embeddings_of_1_to_4096_finite_values_are_accepted_as_little_endian_bytes() {
        for embedding in [None, Some(vec![1.5]), Some(vec![-0.0; MAX_EMBEDDING_DIMS]), Some(vec![f32::MAX, f32::MIN_POSITIVE])] {
            let expected = embedding.as_deref().map(embedding_bytes);
            let prepared = prepare(vec![with_embedding(embedding)], u64::MAX).expect("accepted");
            assert_eq!(prepared.items[0].embedding, expected);
        }
        assert_eq!(embedding_bytes(&[1.0, -2.5]), [0, 0, 0x80, 0x3f, 0, 0, 0x20, 0xc0]);
    }

    #[test]
    fn a_bad_embedding_refuses_the_append_naming_it() {
        let cases = [
            (vec![], "item 1: embedding: expected 1 to 4096 values, got 0"),
            (vec![0.5; MAX_EMBEDDING_DIMS + 1], "item 1: embedding: expected 1 to 4096 values, got 4097"),
            (vec![0.5, f32::NAN], "item 1: embedding: expected finite values, got NaN at index 1"),
            (vec![f32::NEG_INFINITY], "item 1: embedding: expected finite values, got -inf at index 0"),
        ];
        for (embedding, message) in cases {
            let error = prepare(vec![with_embedding(None), with_embedding(Some(embedding))], u64::MAX).err();
            assert_eq!(error.as_deref(), Some(message));
        }
    }

    #[test]
    fn distinct_groups_keep_the_first_of_each_in_order() {
        let item = NewItem {
            asset: vec![1],
            media_type: String::new(),
            model_name: String::new(),
            model_version: String::new(),
            prediction_json: String::new(),
            score: 0.5,
            strategy: String::new(),
            threshold: 0.5,
            reason: String::new(),
            upload_groups: Arc::from(vec![
                "b".to_string(),
                "a".to_string(),
                "b".to_string(),
                "c".to_string(),
                "a".to_string(),
            ]),
            embedding: None,
        };
        let prepared = PreparedItem { content_hash: content_hash(&item.asset), item, score: Some(0.5), embedding: None };
        assert_eq!(prepared.distinct_groups().collect::<Vec<_>>(), ["b", "a", "c"]);
        assert_eq!(count_distinct(&prepared.item.upload_groups), 3);
    }

    /// Not a check: how long `prepare` takes for flagged items with a 4,096-value embedding
    /// and a 64-byte asset (the embedding's work, not hashing, dominates). Run with
    /// `cargo test --profile release-tests -p triton-al-outbox prepare_timing -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn prepare_timing() {
        let template = NewItem { asset: vec![7; 64], ..with_embedding(Some((0..4096).map(|i| i as f32 * 0.001).collect())) };
        for round in 0..3 {
            let batches: Vec<Vec<NewItem>> = (0..2000).map(|_| vec![template.clone(); 8]).collect();
            let start = std::time::Instant::now();
            let mut kept = 0usize;
            for batch in batches {
                let prepared = prepare(batch, u64::MAX).expect("prepared");
                kept += prepared.items.len();
                std::hint::black_box(&prepared);
            }
            let per_item = start.elapsed().as_nanos() as f64 / kept as f64;
            println!("round {round}: prepare {per_item:.0} ns per item (D=4096, 64-byte asset, 8 items per append)");
        }
    }
}
