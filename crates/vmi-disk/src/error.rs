//! The crate's error type: a small kind, the context (file, operation) and the boxed source.
//!
//! Adding a format adds no variants: a format reports [`ErrorKind::Invalid`] with a message that
//! says which structure is wrong, and the access layer adds the file name.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

/// What went wrong, coarsely: callers (the CLI's exit codes, the registry's HTTP status) branch on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The operating system failed an I/O request.
    Io,
    /// The image's metadata is malformed or inconsistent (hostile or corrupt input).
    Invalid,
    /// The image uses a feature vmi does not implement.
    Unsupported,
    /// The image names another file (backing, data file, extent) that the gate did not allow, or asks for
    /// something unsafe.
    Refused,
    /// The caller asked for something impossible (bad option, bad size, write to a read-only image).
    Usage,
    /// The image is marked corrupt and may not be written.
    Corrupt,
    /// A limit was hit (chain depth, table size, memory bound).
    Limit,
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ErrorKind::Io => "I/O error",
            ErrorKind::Invalid => "invalid image",
            ErrorKind::Unsupported => "unsupported",
            ErrorKind::Refused => "refused",
            ErrorKind::Usage => "invalid request",
            ErrorKind::Corrupt => "image is marked corrupt",
            ErrorKind::Limit => "limit exceeded",
        })
    }
}

/// The error every `vmi-disk` function returns.
#[derive(Debug)]
pub struct Error {
    kind: ErrorKind,
    path: Option<PathBuf>,
    message: String,
    source: Option<Box<dyn std::error::Error + Send + Sync + 'static>>,
}

/// Shorthand for results in this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// A new error of `kind` with a message saying what is wrong.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Error {
            kind,
            path: None,
            message: message.into(),
            source: None,
        }
    }

    /// Malformed metadata.
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Invalid, message)
    }

    /// A feature that is not implemented.
    pub fn unsupported(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Unsupported, message)
    }

    /// Something the gate or a safety rule does not allow.
    pub fn refused(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Refused, message)
    }

    /// A bad request by the caller.
    pub fn usage(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Usage, message)
    }

    /// A limit was hit.
    pub fn limit(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Limit, message)
    }

    /// An I/O error while doing `operation` (e.g. "reading L2 table at offset 0x30000").
    pub fn io(operation: impl Into<String>, source: io::Error) -> Self {
        Error {
            kind: ErrorKind::Io,
            path: None,
            message: operation.into(),
            source: Some(Box::new(source)),
        }
    }

    /// Attach the underlying cause.
    pub fn with_source(mut self, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        self.source = Some(Box::new(source));
        self
    }

    /// Name the file the error concerns, unless a deeper layer already named one.
    pub fn with_path(mut self, path: &Path) -> Self {
        if self.path.is_none() {
            self.path = Some(path.to_path_buf());
        }
        self
    }

    /// Name `to` instead of `from` when the error concerns `from` (a file written under a
    /// temporary name: the user knows it by its final name); the temporary name stays in the
    /// message.
    pub fn renaming_path(mut self, from: &Path, to: &Path) -> Self {
        if self.path.as_deref() == Some(from) {
            self.message = format!("{} (writing {})", self.message, from.display());
            self.path = Some(to.to_path_buf());
        }
        self
    }

    /// Prefix the message with more context ("opening backing file: ...").
    pub fn context(mut self, what: impl fmt::Display) -> Self {
        self.message = format!("{what}: {}", self.message);
        self
    }

    /// The coarse kind.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The file the error concerns, if known.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// The message without the path.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(p) = &self.path {
            write!(f, "{}: ", p.display())?;
        }
        match self.kind {
            ErrorKind::Io | ErrorKind::Usage => write!(f, "{}", self.message),
            kind => write!(f, "{kind}: {}", self.message),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_deref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}

impl From<io::Error> for Error {
    fn from(e: io::Error) -> Self {
        Error::io("I/O", e)
    }
}

/// Return early with an [`ErrorKind::Invalid`] error built from a format string.
#[macro_export]
macro_rules! invalid {
    ($($arg:tt)*) => {
        return Err($crate::Error::invalid(format!($($arg)*)))
    };
}

/// Return early with an [`ErrorKind::Invalid`] error unless the condition holds.
#[macro_export]
macro_rules! ensure {
    ($cond:expr, $($arg:tt)*) => {
        if !($cond) {
            return Err($crate::Error::invalid(format!($($arg)*)));
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_names_file_kind_and_message() {
        let e = Error::invalid("L1 table beyond end of file").with_path(Path::new("/x/a.qcow2"));
        assert_eq!(
            e.to_string(),
            "/x/a.qcow2: invalid image: L1 table beyond end of file"
        );
    }

    #[test]
    fn with_path_keeps_the_innermost_path() {
        let e = Error::invalid("bad")
            .with_path(Path::new("inner"))
            .with_path(Path::new("outer"));
        assert_eq!(e.path(), Some(Path::new("inner")));
    }

    #[test]
    fn renaming_path_names_the_final_file_and_keeps_the_temporary_one_in_the_message() {
        let tmp = Path::new("/d/.out.qcow2.vmi-tmp-1-0");
        let e = Error::invalid("disk full")
            .with_path(tmp)
            .renaming_path(tmp, Path::new("/d/out.qcow2"));
        assert_eq!(e.path(), Some(Path::new("/d/out.qcow2")));
        assert!(
            e.to_string()
                .contains("(writing /d/.out.qcow2.vmi-tmp-1-0)"),
            "{e}"
        );
        // Errors about other files keep their path.
        let e = Error::invalid("bad")
            .with_path(Path::new("/d/src.raw"))
            .renaming_path(tmp, Path::new("/d/out.qcow2"));
        assert_eq!(e.path(), Some(Path::new("/d/src.raw")));
    }
}
