//! Progress reporting: the engine calls a callback with bytes done and total.

use std::sync::Arc;

/// A progress update.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    /// Guest bytes processed so far.
    pub done: u64,
    /// Guest bytes in all.
    pub total: u64,
}

/// A progress callback, shared between worker threads.
pub type ProgressFn = Arc<dyn Fn(Progress) + Send + Sync>;
