//! Flushing the WAL file to disk after a commit (SyncMode::Full).
//!
//! The connection commits at `synchronous=NORMAL`: the frames are written to the `-wal` file,
//! not flushed. The writer then flushes that file itself, after COMMIT released SQLite's write
//! lock, so other processes commit while the disk works, and one flush covers every append
//! of the group. That gives the guarantee `synchronous=FULL` gives: a checkpoint that moves
//! our frames into the database syncs the WAL first, and SQLite syncs the WAL header when it
//! restarts the WAL.

use std::fs::File;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

pub(crate) struct WalFile {
    path: PathBuf,
    /// Kept open between flushes; `(dev, ino)` tells whether the path still names it.
    open: Option<(File, (u64, u64))>,
}

impl WalFile {
    pub fn new(database: &Path) -> Self {
        let mut name = database.as_os_str().to_owned();
        name.push("-wal");
        WalFile { path: PathBuf::from(name), open: None }
    }

    /// fdatasync the WAL as it is now (call after COMMIT).
    pub fn flush(&mut self) -> io::Result<()> {
        let current = identity(&std::fs::metadata(&self.path)?);
        let file = match &self.open {
            Some((file, id)) if *id == current => file,
            _ => self.reopen()?,
        };
        file.sync_data()
    }

    /// Open the WAL anew: the first time, or after it was deleted (the last connection of
    /// every process closed) and created again.
    fn reopen(&mut self) -> io::Result<&File> {
        self.open = None;
        // No directory flush needed: SQLite flushes the directory when it creates a WAL.
        let file = File::open(&self.path)?;
        let id = identity(&file.metadata()?);
        Ok(&self.open.insert((file, id)).0)
    }
}

fn identity(metadata: &std::fs::Metadata) -> (u64, u64) {
    (metadata.dev(), metadata.ino())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn follows_a_wal_file_replaced_under_the_same_name() {
        let dir = tempfile::tempdir().expect("temp dir");
        let database = dir.path().join("outbox.sqlite");
        let mut wal = WalFile::new(&database);
        assert_eq!(wal.path, dir.path().join("outbox.sqlite-wal"));
        assert!(wal.flush().is_err(), "no WAL file yet");
        std::fs::write(&wal.path, b"first").expect("write");
        wal.flush().expect("flush");
        let first = wal.open.as_ref().map(|(_, id)| *id);
        // Keep the old file alive so its inode cannot be reused by the new one.
        let kept = dir.path().join("old-wal");
        std::fs::rename(&wal.path, &kept).expect("rename");
        std::fs::write(&wal.path, b"second").expect("write");
        wal.flush().expect("flush");
        let second = wal.open.as_ref().map(|(_, id)| *id);
        assert_ne!(first, second);
        assert_eq!(second, Some(identity(&std::fs::metadata(&wal.path).expect("stat"))));
    }
}
