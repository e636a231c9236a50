//! What the catalog keeps for interoperable image import: one [`ImportTask`] per image (the
//! staged data, the import method and the lease of the node running it) and the
//! [`Conversion`]s of an image's data made for downloads in another format.
//!
//! A task's lease is a compare-and-swap on an opaque token: a node takes a task by replacing
//! the token it read with its own, so of two nodes recovering one expired task exactly one wins.

use crate::error::Result;
use async_trait::async_trait;

/// Where an import task is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskState {
    /// Data is staged (or being staged); no import was requested yet.
    Staged,
    /// A node holds the lease and is importing.
    Running,
}

impl TaskState {
    /// Stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            TaskState::Staged => "staged",
            TaskState::Running => "running",
        }
    }

    /// Parse a stored name.
    pub fn parse(s: &str) -> Option<TaskState> {
        match s {
            "staged" => Some(TaskState::Staged),
            "running" => Some(TaskState::Running),
            _ => None,
        }
    }
}

/// The import of one image.
#[derive(Debug, Clone, PartialEq)]
pub struct ImportTask {
    /// The image.
    pub image_id: String,
    /// `glance-direct` or `web-download` (empty while only staged).
    pub method: String,
    /// The URL of a web-download.
    pub uri: Option<String>,
    /// The staged bytes in the image store (`staging/…`).
    pub staging_location: Option<String>,
    /// Their length.
    pub staging_size: Option<u64>,
    /// Staged or running.
    pub state: TaskState,
    /// The lease holder's token.
    pub lease_token: Option<String>,
    /// When the lease runs out (catalog time format); another node may then take the task.
    pub lease_expires: Option<String>,
    /// Runs started so far.
    pub attempts: u32,
    /// Why the last run failed.
    pub message: Option<String>,
    /// When created.
    pub created_at: String,
    /// Last change.
    pub updated_at: String,
}

/// A converted copy of an image's data, for `GET …/file?format=`.
#[derive(Debug, Clone, PartialEq)]
pub struct Conversion {
    /// The image.
    pub image_id: String,
    /// SHA-256 of the data it was made from.
    pub source_sha256: String,
    /// The Glance disk format it is in.
    pub format: String,
    /// Where it is stored (`cache/…`).
    pub location: String,
    /// Its length.
    pub size: u64,
    /// Its MD5, hex (for `Content-MD5`).
    pub md5: String,
    /// When made.
    pub created_at: String,
}

/// Import tasks and conversions.
#[async_trait]
pub trait ImportCatalog: Send + Sync + 'static {
    /// Insert or replace the task of `task.image_id`.
    async fn put_import_task(&self, task: &ImportTask) -> Result<()>;
    /// The task of an image.
    async fn get_import_task(&self, image_id: &str) -> Result<Option<ImportTask>>;
    /// Replace the task only if its lease token is still `expected_token`: the
    /// compare-and-swap by which one node takes or renews a lease. False when another node won.
    async fn swap_import_task(&self, task: &ImportTask, expected_token: &str) -> Result<bool>;
    /// Running tasks whose lease ran out before `now`, at most `limit`.
    async fn expired_import_tasks(&self, now: &str, limit: u32) -> Result<Vec<ImportTask>>;
    /// Forget an image's task.
    async fn delete_import_task(&self, image_id: &str) -> Result<()>;

    /// Record a conversion; Conflict if one with the same key exists.
    async fn add_conversion(&self, c: &Conversion) -> Result<()>;
    /// The conversion of `image_id`'s data with digest `sha256` into `format`.
    async fn get_conversion(
        &self,
        image_id: &str,
        sha256: &str,
        format: &str,
    ) -> Result<Option<Conversion>>;
    /// Remove and return every conversion of an image.
    async fn take_conversions(&self, image_id: &str) -> Result<Vec<Conversion>>;
    /// Every staged and converted object the catalog references (the reaper keeps these).
    async fn import_locations(&self) -> Result<Vec<String>>;
}
