//! The WAL really is flushed (SyncMode::Full) or not (Normal): the test binary runs a helper
//! under `strace` and counts the `fdatasync` calls on the `-wal` file.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::{env, fs};

use common::{item, WAIT};
use tempfile::tempdir;
use triton_al_outbox::{Outbox, OutboxConfig, SyncMode};

const DIR_VARIABLE: &str = "OUTBOX_STRACE_DIR";
const SYNC_VARIABLE: &str = "OUTBOX_STRACE_SYNC";
const APPENDS: usize = 3;
/// Stat'ed by the helper before and after its appends: the system calls between them are
/// the appends' (not opening's, nor closing's: SQLite syncs there on its own).
const START_MARKER: &str = "appends-start-marker";
const END_MARKER: &str = "appends-end-marker";

/// Run by `wal_flushes_follow_the_sync_mode` only, under strace.
#[test]
#[ignore = "a helper: runs under strace from wal_flushes_follow_the_sync_mode"]
fn strace_helper_appends() {
    let dir = PathBuf::from(env::var(DIR_VARIABLE).expect("run by wal_flushes_follow_the_sync_mode"));
    let sync = if env::var(SYNC_VARIABLE).as_deref() == Ok("full") { SyncMode::Full } else { SyncMode::Normal };
    let outbox = Outbox::open(OutboxConfig { sync, ..OutboxConfig::new(dir.join("outbox.sqlite")) }).expect("open");
    let _ = fs::metadata(dir.join(START_MARKER));
    for i in 0..APPENDS {
        outbox.append(vec![item(format!("item {i}").as_bytes(), 0.5, &["a"])], WAIT).expect("append");
    }
    let _ = fs::metadata(dir.join(END_MARKER));
    outbox.close();
}

/// The flush system calls (`fdatasync` / `fsync`, with the file's path) the helper's appends
/// made, or `None` when strace cannot run here.
fn flushes_during_appends(dir: &Path, sync: &str) -> Option<Vec<String>> {
    let log = dir.join("strace.log");
    let helper = env::current_exe().expect("test binary");
    let status = Command::new("strace")
        .args(["-f", "-y", "-e", "trace=fdatasync,fsync,statx,newfstatat,stat,lstat", "-o"])
        .arg(&log)
        .arg(&helper)
        .args(["--ignored", "--exact", "strace_helper_appends", "--test-threads=1"])
        .env(DIR_VARIABLE, dir)
        .env(SYNC_VARIABLE, sync)
        .stdout(Stdio::null())
        .status()
        .ok()?;
    let trace = fs::read_to_string(&log).ok()?;
    if !status.success() {
        // strace missing its permission (no ptrace in this container) is not a failure of
        // the outbox; a failing helper is.
        assert!(trace.contains("ptrace") || trace.is_empty(), "the helper failed under strace:\n{trace}");
        return None;
    }
    let start = trace.find(START_MARKER).expect("start marker traced");
    let end = trace.find(END_MARKER).expect("end marker traced");
    Some(trace[start..end].lines().filter(|line| line.contains("sync(")).map(str::to_string).collect())
}

#[test]
fn wal_flushes_follow_the_sync_mode() {
    let wal_flushes = |calls: &[String]| {
        calls.iter().filter(|c| c.contains("fdatasync(") && c.contains("outbox.sqlite-wal>")).count()
    };
    let full_dir = tempdir().expect("temp dir");
    let Some(full) = flushes_during_appends(full_dir.path(), "full") else {
        eprintln!("strace cannot run here: WAL flushes not checked");
        return;
    };
    assert_eq!(wal_flushes(&full), APPENDS, "one WAL flush per append (each its own group):\n{full:#?}");

    let normal_dir = tempdir().expect("temp dir");
    let normal = flushes_during_appends(normal_dir.path(), "normal").expect("strace ran a moment ago");
    assert_eq!(wal_flushes(&normal), 0, "SyncMode::Normal flushed the WAL:\n{normal:#?}");
}
