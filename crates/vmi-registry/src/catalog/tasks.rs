//! What the catalog keeps for Glance's tasks API (`/v2/tasks`): one [`TaskRecord`] per import
//! request, whether made through `POST /v2/tasks` or `POST /v2/images/{id}/import`.

use crate::error::Result;
use async_trait::async_trait;

/// One task.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskRecord {
    /// UUID.
    pub id: String,
    /// `import` (the only type Glance has left) or `api_image_import` (an import request).
    pub task_type: String,
    /// `pending`, `processing`, `success` or `failure`.
    pub status: String,
    /// Owning project id.
    pub owner: String,
    /// The image the task imports into.
    pub image_id: Option<String>,
    /// Who asked.
    pub user_id: Option<String>,
    /// The request's id.
    pub request_id: Option<String>,
    /// The task input, JSON.
    pub input: String,
    /// The task result, JSON.
    pub result: Option<String>,
    /// Why it failed, or empty.
    pub message: String,
    /// When created.
    pub created_at: String,
    /// Last change.
    pub updated_at: String,
    /// When a finished task may be forgotten.
    pub expires_at: Option<String>,
}

/// Storage of tasks.
#[async_trait]
pub trait TaskCatalog {
    /// Insert or replace a task.
    async fn put_task(&self, task: &TaskRecord) -> Result<()>;
    /// One task.
    async fn get_task(&self, id: &str) -> Result<Option<TaskRecord>>;
    /// Tasks, newest first, of `owner` (every owner when `None`), at most `limit`.
    async fn list_tasks(&self, owner: Option<&str>, limit: u32) -> Result<Vec<TaskRecord>>;
    /// The tasks of an image, newest first.
    async fn image_tasks(&self, image_id: &str) -> Result<Vec<TaskRecord>>;
}
