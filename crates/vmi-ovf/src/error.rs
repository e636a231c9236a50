//! The crate's error type: what went wrong, on which file or structure, with the cause attached.

use std::path::PathBuf;

/// Result alias for this crate.
pub type Result<T, E = OvfError> = std::result::Result<T, E>;

/// An error from OVF/OVA handling, profiles, configs or compatibility checks.
#[derive(Debug, thiserror::Error)]
pub enum OvfError {
    /// A descriptor, manifest, archive or config is malformed; the message names the structure.
    #[error("{0}")]
    Invalid(String),
    /// Well-formed input that uses something vmi does not handle.
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// A digest or signature does not match.
    #[error("verification failed: {0}")]
    Verify(String),
    /// A bad command-line argument or profile value.
    #[error("{0}")]
    Usage(String),
    /// An I/O operation failed.
    #[error("{op} {}", path.display())]
    Io {
        /// What was being done.
        op: &'static str,
        /// On which file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A disk image operation failed.
    #[error("disk {}", path.display())]
    Disk {
        /// Which disk.
        path: PathBuf,
        /// The cause.
        #[source]
        source: vmi_disk::Error,
    },
    /// XML could not be read.
    #[error("XML: {0}")]
    Xml(String),
}

impl OvfError {
    /// An I/O error on `path`.
    pub fn io(op: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        OvfError::Io {
            op,
            path: path.into(),
            source,
        }
    }

    /// A disk error on `path`.
    pub fn disk(path: impl Into<PathBuf>, source: vmi_disk::Error) -> Self {
        OvfError::Disk {
            path: path.into(),
            source,
        }
    }
}

/// Return `Err(OvfError::Invalid(format!(...)))`.
macro_rules! invalid {
    ($($arg:tt)*) => {
        return Err($crate::error::OvfError::Invalid(format!($($arg)*)))
    };
}
pub(crate) use invalid;
