//! Threads for big batches only.
//!
//! The pool is sized by `TRITON_AL_NUM_THREADS` (default: the CPUs available) and is rebuilt
//! when the process id changes: Triton's Python backend forks, and a forked child inherits a
//! pool whose worker threads do not exist in it.

use std::sync::{Arc, Mutex};

use rayon::prelude::*;

/// Below this many input elements a call stays on the calling thread: waking workers costs
/// more than it saves (measured: see benchmarks/RESULTS.md).
pub const PARALLEL_MIN_ELEMENTS: usize = 1 << 16;

struct Pool {
    pid: u32,
    pool: Arc<rayon::ThreadPool>,
}

static POOL: Mutex<Option<Pool>> = Mutex::new(None);

/// Threads to use: `TRITON_AL_NUM_THREADS` if it is a positive integer, else the CPU count.
pub fn configured_threads() -> usize {
    std::env::var("TRITON_AL_NUM_THREADS")
        .ok()
        .and_then(|v| v.trim().parse::<usize>().ok())
        .filter(|&n| n > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1))
}

fn pool() -> Option<Arc<rayon::ThreadPool>> {
    let pid = std::process::id();
    let mut guard = POOL.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(p) = guard.as_ref() {
        if p.pid == pid {
            return Some(p.pool.clone());
        }
        // Forked child: the parent's workers are gone. Leak the stale pool (dropping it
        // would wait for threads that will never answer) and build a fresh one.
        std::mem::forget(guard.take());
    }
    let threads = configured_threads();
    if threads < 2 {
        return None;
    }
    let built = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(|i| format!("triton-al-{i}"))
        .build()
        .ok()?;
    let built = Arc::new(built);
    *guard = Some(Pool { pid, pool: built.clone() });
    Some(built)
}

/// Run `work(first_item, out_chunk)` over `out` split into chunks of `chunk_items` items
/// (`out_per_item` outputs each), in parallel when the input is big enough.
pub fn for_each_chunk<F>(
    out: &mut [f32],
    out_per_item: usize,
    chunk_items: usize,
    input_elements: usize,
    work: F,
) where
    F: Fn(usize, &mut [f32]) + Sync + Send,
{
    let chunk_items = chunk_items.max(1);
    let chunk = chunk_items * out_per_item.max(1);
    if input_elements >= PARALLEL_MIN_ELEMENTS && out.len() > chunk {
        if let Some(pool) = pool() {
            pool.install(|| {
                out.par_chunks_mut(chunk)
                    .enumerate()
                    .for_each(|(k, c)| work(k * chunk_items, c));
            });
            return;
        }
    }
    for (k, c) in out.chunks_mut(chunk).enumerate() {
        work(k * chunk_items, c);
    }
}
