//! Append latency under a steady load: THREADS callers (model instances) together append
//! RATE single-item appends per second for SECONDS, each waiting for its outcome.
//!
//! cargo run -p triton-al-outbox --release --example append_latency -- \
//!     [--threads 4] [--rate 1000] [--seconds 10] [--asset-bytes 8192] [--sync full|normal] [--dir DIR]
//!     [--checkpoint-ms MS]
//!
//! `--checkpoint-ms` runs a PASSIVE checkpoint from another connection every MS, as the
//! uploader does after each batch in production: the WAL is then reused from its start
//! instead of growing, so a flush rewrites blocks instead of extending the file.
//!
//! DIR (default: a new temporary directory under the current one) decides which disk is
//! measured; it must exist.

use std::env;
use std::error::Error;
use std::path::PathBuf;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use triton_al_outbox::{NewItem, Outbox, OutboxConfig, SyncMode};

struct Options {
    threads: usize,
    rate: f64,
    seconds: f64,
    asset_bytes: usize,
    sync: SyncMode,
    dir: Option<PathBuf>,
    checkpoint_ms: Option<u64>,
}

fn options() -> Result<Options, Box<dyn Error>> {
    let mut options =
        Options { threads: 4, rate: 1000.0, seconds: 10.0, asset_bytes: 8192, sync: SyncMode::Full, dir: None, checkpoint_ms: None };
    let mut args = env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args.next().ok_or_else(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--threads" => options.threads = value.parse()?,
            "--rate" => options.rate = value.parse()?,
            "--seconds" => options.seconds = value.parse()?,
            "--asset-bytes" => options.asset_bytes = value.parse()?,
            "--sync" => {
                options.sync = match value.as_str() {
                    "full" => SyncMode::Full,
                    "normal" => SyncMode::Normal,
                    other => return Err(format!("--sync: expected full or normal, got {other}").into()),
                }
            }
            "--dir" => options.dir = Some(PathBuf::from(value)),
            "--checkpoint-ms" => options.checkpoint_ms = Some(value.parse()?),
            other => return Err(format!("unknown option {other}").into()),
        }
    }
    if options.threads == 0 || options.rate <= 0.0 || options.seconds <= 0.0 || options.asset_bytes == 0 {
        return Err("--threads, --rate, --seconds and --asset-bytes must be positive".into());
    }
    Ok(options)
}

fn flagged_item(thread_index: usize, sequence: usize, asset_bytes: usize) -> NewItem {
    // Distinct per append, so none is deduplicated away.
    let mut asset = format!("thread {thread_index} item {sequence} ").into_bytes();
    asset.resize(asset_bytes, b'.');
    NewItem {
        asset,
        media_type: "image/png".into(),
        model_name: "bench".into(),
        model_version: "1".into(),
        prediction_json: r#"{"probabilities":[0.48,0.52]}"#.into(),
        score: 0.04,
        strategy: "margin".into(),
        threshold: 0.1,
        reason: "uncertain".into(),
        upload_groups: Arc::from(vec!["bench".to_string()]),
        embedding: None,
    }
}

fn percentile(sorted: &[Duration], fraction: f64) -> Duration {
    let rank = ((sorted.len() as f64 - 1.0) * fraction).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

fn main() -> Result<(), Box<dyn Error>> {
    let options = options()?;
    let scratch = tempfile::Builder::new()
        .prefix("outbox-bench-")
        .tempdir_in(options.dir.clone().unwrap_or_else(|| ".".into()))?;
    let outbox = Arc::new(Outbox::open(OutboxConfig {
        sync: options.sync,
        max_items: 10_000_000,
        max_bytes: u64::MAX / 2,
        ..OutboxConfig::new(scratch.path().join("outbox.sqlite"))
    })?);
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let checkpointer = options.checkpoint_ms.map(|ms| {
        let (path, done) = (scratch.path().join("outbox.sqlite"), Arc::clone(&done));
        thread::spawn(move || -> Result<(), String> {
            let conn = rusqlite::Connection::open(path).map_err(|e| e.to_string())?;
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                thread::sleep(Duration::from_millis(ms));
                conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())).map_err(|e| e.to_string())?;
            }
            Ok(())
        })
    });
    let interval = Duration::from_secs_f64(options.threads as f64 / options.rate);
    let per_thread = (options.seconds * options.rate / options.threads as f64).ceil() as usize;
    let started = Instant::now();
    let workers: Vec<_> = (0..options.threads)
        .map(|thread_index| {
            let outbox = Arc::clone(&outbox);
            let asset_bytes = options.asset_bytes;
            thread::spawn(move || -> Result<Vec<Duration>, String> {
                // Spread the threads over one interval; then a fixed schedule (open loop), so
                // a slow append does not lower the offered load.
                let offset = interval.mul_f64(thread_index as f64 / options.threads as f64);
                let mut latencies = Vec::with_capacity(per_thread);
                for sequence in 0..per_thread {
                    let due = started + offset + interval * u32::try_from(sequence).map_err(|e| e.to_string())?;
                    if let Some(wait) = due.checked_duration_since(Instant::now()) {
                        thread::sleep(wait);
                    }
                    let item = flagged_item(thread_index, sequence, asset_bytes);
                    let call = Instant::now();
                    outbox.append(vec![item], Duration::from_secs(30)).map_err(|e| e.to_string())?;
                    latencies.push(call.elapsed());
                }
                Ok(latencies)
            })
        })
        .collect();
    let mut latencies = Vec::new();
    for worker in workers {
        latencies.extend(worker.join().map_err(|_| "a worker panicked")??);
    }
    let elapsed = started.elapsed();
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    if let Some(c) = checkpointer {
        c.join().map_err(|_| "the checkpointer panicked")??;
    }
    latencies.sort();
    let stats = outbox.stats();
    println!(
        "{} appends of {} bytes from {} threads in {:.2} s ({:.0}/s offered {:.0}/s), sync {:?}, dir {}",
        latencies.len(),
        options.asset_bytes,
        options.threads,
        elapsed.as_secs_f64(),
        latencies.len() as f64 / elapsed.as_secs_f64(),
        options.rate,
        options.sync,
        scratch.path().display()
    );
    println!(
        "latency p50 {:?}  p90 {:?}  p99 {:?}  p99.9 {:?}  max {:?}",
        percentile(&latencies, 0.50),
        percentile(&latencies, 0.90),
        percentile(&latencies, 0.99),
        percentile(&latencies, 0.999),
        latencies[latencies.len() - 1]
    );
    println!(
        "{} transactions, {} WAL flushes: {:.2} appends per transaction",
        stats.transactions,
        stats.flushes,
        stats.appends as f64 / stats.transactions.max(1) as f64
    );
    Ok(())
}
