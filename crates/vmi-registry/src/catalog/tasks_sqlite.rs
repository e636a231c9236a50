//! [`TaskCatalog`] for the SQLite catalog (table from
//! `migrations/sqlite/0009_metadefs_tasks.sql`).

use super::{db, SqliteCatalog};
use crate::catalog::tasks::{TaskCatalog, TaskRecord};
use crate::error::Result;
use async_trait::async_trait;
use rusqlite::{params, OptionalExtension, Row};

const COLS: &str = "id, type, status, owner, image_id, user_id, request_id, input, result, \
     message, created_at, updated_at, expires_at";

fn from_row(r: &Row<'_>) -> rusqlite::Result<TaskRecord> {
    Ok(TaskRecord {
        id: r.get(0)?,
        task_type: r.get(1)?,
        status: r.get(2)?,
        owner: r.get(3)?,
        image_id: r.get(4)?,
        user_id: r.get(5)?,
        request_id: r.get(6)?,
        input: r.get(7)?,
        result: r.get(8)?,
        message: r.get(9)?,
        created_at: r.get(10)?,
        updated_at: r.get(11)?,
        expires_at: r.get(12)?,
    })
}

fn select(
    c: &rusqlite::Connection,
    sql: &str,
    p: impl rusqlite::Params,
) -> rusqlite::Result<Vec<TaskRecord>> {
    let mut st = c.prepare(sql)?;
    let rows = st.query_map(p, from_row)?;
    rows.collect()
}

#[async_trait]
impl TaskCatalog for SqliteCatalog {
    async fn put_task(&self, task: &TaskRecord) -> Result<()> {
        let t = task.clone();
        self.run("recording a task", move |c| {
            c.execute(
                &format!(
                    "INSERT OR REPLACE INTO tasks ({COLS}) \
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)"
                ),
                params![
                    t.id,
                    t.task_type,
                    t.status,
                    t.owner,
                    t.image_id,
                    t.user_id,
                    t.request_id,
                    t.input,
                    t.result,
                    t.message,
                    t.created_at,
                    t.updated_at,
                    t.expires_at
                ],
            )
            .map_err(db("recording a task"))?;
            Ok(())
        })
        .await
    }

    async fn get_task(&self, id: &str) -> Result<Option<TaskRecord>> {
        let id = id.to_string();
        self.run("reading a task", move |c| {
            c.query_row(
                &format!("SELECT {COLS} FROM tasks WHERE id = ?1"),
                [&id],
                from_row,
            )
            .optional()
            .map_err(db("reading a task"))
        })
        .await
    }

    async fn list_tasks(&self, owner: Option<&str>, limit: u32) -> Result<Vec<TaskRecord>> {
        let owner = owner.map(str::to_string);
        self.run("listing tasks", move |c| {
            match owner {
                Some(o) => select(
                    c,
                    &format!(
                        "SELECT {COLS} FROM tasks WHERE owner = ?1 \
                         ORDER BY created_at DESC, id LIMIT ?2"
                    ),
                    params![o, limit],
                ),
                None => select(
                    c,
                    &format!("SELECT {COLS} FROM tasks ORDER BY created_at DESC, id LIMIT ?1"),
                    params![limit],
                ),
            }
            .map_err(db("listing tasks"))
        })
        .await
    }

    async fn image_tasks(&self, image_id: &str) -> Result<Vec<TaskRecord>> {
        let id = image_id.to_string();
        self.run("listing an image's tasks", move |c| {
            select(
                c,
                &format!(
                    "SELECT {COLS} FROM tasks WHERE image_id = ?1 ORDER BY created_at DESC, id"
                ),
                params![id],
            )
            .map_err(db("listing an image's tasks"))
        })
        .await
    }
}
