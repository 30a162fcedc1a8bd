//! What can go wrong, as the caller needs to tell it apart.

use std::fmt;

/// An outbox operation that did not do what was asked. Every message names the outbox file
/// and says what happened, including whether anything was stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OutboxError {
    /// Waited too long: another connection held the write lock past `busy_timeout`, the
    /// writer thread had too many appends waiting, or a ticket's wait timed out.
    Busy(String),
    /// The file system is full (SQLite's `SQLITE_FULL`, even after a WAL checkpoint).
    Full(String),
    /// The caller asked for something impossible: a bad item or configuration value.
    Invalid(String),
    /// Anything else: not an outbox file, an I/O error, the writer thread gone.
    Other(String),
}

impl OutboxError {
    /// The message, without the kind.
    pub fn message(&self) -> &str {
        match self {
            OutboxError::Busy(m) | OutboxError::Full(m) | OutboxError::Invalid(m) | OutboxError::Other(m) => m,
        }
    }
}

impl fmt::Display for OutboxError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.message())
    }
}

impl std::error::Error for OutboxError {}
