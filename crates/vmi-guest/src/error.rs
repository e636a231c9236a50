//! The crate's error type: what failed (a partition table, a filesystem call, a guest path) with
//! the disk layer's error or libext2fs's error code as the source.

use std::fmt;

/// Errors of the guest layer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The disk layer failed (I/O, a malformed image).
    #[error(transparent)]
    Disk(#[from] vmi_disk::Error),
    /// A partition table is malformed or hostile.
    #[error("partition table: {0}")]
    Partition(String),
    /// A libext2fs call failed.
    #[error("{op}: {message}")]
    Ext2 {
        /// What was being done (with the guest path where there is one).
        op: String,
        /// libext2fs's message for the error code.
        message: String,
        /// The `errcode_t`.
        code: i64,
    },
    /// A guest path does not exist.
    #[error("{0}: no such file or directory in the guest")]
    NotFound(String),
    /// The guest holds something this layer does not handle (a filesystem, a feature).
    #[error("{0}")]
    Unsupported(String),
    /// The request cannot be done (wrong kind of file, bad argument).
    #[error("{0}")]
    Usage(String),
    /// A host-side file could not be read or written.
    #[error("{context}")]
    Io {
        /// What was being done.
        context: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    /// A host I/O error with context.
    pub fn io(context: impl fmt::Display, source: std::io::Error) -> Self {
        Error::Io {
            context: context.to_string(),
            source,
        }
    }
}

/// Shorthand for results in this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
