//! Waiting for another connection's write lock.
//!
//! SQLite's default busy handler sleeps 1, 2, 5, 10 ... ms between attempts: a lock held for
//! 0.2 ms costs a writer at least 1 ms, straight into inference latency. This one polls every
//! 50 us at first and never sleeps more than 500 us, giving up after the outbox's
//! `busy_timeout`.
//!
//! rusqlite's busy handler is a plain `fn` with no state, so the timeout and the start of the
//! current wait live in thread-locals of the thread using the connection: only the outbox's
//! own writer thread installs and uses this handler.

use std::cell::Cell;
use std::thread;
use std::time::{Duration, Instant};

use rusqlite::Connection;

const FIRST_SLEEP: Duration = Duration::from_micros(50);
const LONGEST_SLEEP: Duration = Duration::from_micros(500);

thread_local! {
    static GIVE_UP_AFTER: Cell<Duration> = const { Cell::new(Duration::from_secs(2)) };
    static WAITING_SINCE: Cell<Option<Instant>> = const { Cell::new(None) };
}

/// Install the handler on `conn`, for use on the calling thread only.
pub(crate) fn install(conn: &Connection, timeout: Duration) -> rusqlite::Result<()> {
    GIVE_UP_AFTER.with(|limit| limit.set(timeout));
    conn.busy_handler(Some(wait_briefly))
}

/// SQLite calls this with the number of earlier calls for the same lock; `false` makes the
/// statement fail with SQLITE_BUSY.
fn wait_briefly(earlier_calls: i32) -> bool {
    let now = Instant::now();
    let since = if earlier_calls == 0 {
        WAITING_SINCE.with(|since| since.set(Some(now)));
        now
    } else {
        WAITING_SINCE.with(Cell::get).unwrap_or(now)
    };
    if now.duration_since(since) >= GIVE_UP_AFTER.with(Cell::get) {
        return false;
    }
    thread::sleep(sleep_before_attempt(earlier_calls));
    true
}

/// 50 us, 100 us, 150 us ... up to 500 us.
fn sleep_before_attempt(earlier_calls: i32) -> Duration {
    let step = u32::try_from(earlier_calls).unwrap_or(0).saturating_add(1);
    FIRST_SLEEP.saturating_mul(step).min(LONGEST_SLEEP)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sleeps_grow_from_50_to_500_microseconds() {
        assert_eq!(sleep_before_attempt(0), Duration::from_micros(50));
        assert_eq!(sleep_before_attempt(1), Duration::from_micros(100));
        assert_eq!(sleep_before_attempt(9), Duration::from_micros(500));
        assert_eq!(sleep_before_attempt(1_000_000), Duration::from_micros(500));
    }

    #[test]
    fn gives_up_after_the_timeout() {
        GIVE_UP_AFTER.with(|limit| limit.set(Duration::from_millis(20)));
        let started = Instant::now();
        let mut calls = 0;
        while wait_briefly(calls) {
            calls += 1;
        }
        let waited = started.elapsed();
        assert!(waited >= Duration::from_millis(20), "gave up after {waited:?}");
        assert!(waited < Duration::from_millis(200), "gave up only after {waited:?}");
        assert!(calls >= 10, "only {calls} attempts in {waited:?}: sleeps too long");
    }
}
