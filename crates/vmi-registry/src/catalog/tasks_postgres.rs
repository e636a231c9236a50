//! [`TaskCatalog`] for the PostgreSQL catalog (table from
//! `migrations/postgres/0009_metadefs_tasks.sql`).

use super::{db, PostgresCatalog};
use crate::catalog::tasks::{TaskCatalog, TaskRecord};
use crate::error::Result;
use async_trait::async_trait;
use tokio_postgres::Row;

const COLS: &str = "id, type, status, owner, image_id, user_id, request_id, input, result, \
     message, created_at, updated_at, expires_at";

fn from_row(r: &Row) -> Result<TaskRecord> {
    let f = db("reading a task");
    Ok(TaskRecord {
        id: r.try_get(0).map_err(&f)?,
        task_type: r.try_get(1).map_err(&f)?,
        status: r.try_get(2).map_err(&f)?,
        owner: r.try_get(3).map_err(&f)?,
        image_id: r.try_get(4).map_err(&f)?,
        user_id: r.try_get(5).map_err(&f)?,
        request_id: r.try_get(6).map_err(&f)?,
        input: r.try_get(7).map_err(&f)?,
        result: r.try_get(8).map_err(&f)?,
        message: r.try_get(9).map_err(&f)?,
        created_at: r.try_get(10).map_err(&f)?,
        updated_at: r.try_get(11).map_err(&f)?,
        expires_at: r.try_get(12).map_err(&f)?,
    })
}

#[async_trait]
impl TaskCatalog for PostgresCatalog {
    async fn put_task(&self, t: &TaskRecord) -> Result<()> {
        let conn = self.conn().await?;
        conn.execute(
            &format!(
                "INSERT INTO tasks ({COLS}) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13) \
                 ON CONFLICT (id) DO UPDATE SET type = EXCLUDED.type, \
                 status = EXCLUDED.status, owner = EXCLUDED.owner, \
                 image_id = EXCLUDED.image_id, user_id = EXCLUDED.user_id, \
                 request_id = EXCLUDED.request_id, input = EXCLUDED.input, \
                 result = EXCLUDED.result, message = EXCLUDED.message, \
                 updated_at = EXCLUDED.updated_at, expires_at = EXCLUDED.expires_at"
            ),
            &[
                &t.id,
                &t.task_type,
                &t.status,
                &t.owner,
                &t.image_id,
                &t.user_id,
                &t.request_id,
                &t.input,
                &t.result,
                &t.message,
                &t.created_at,
                &t.updated_at,
                &t.expires_at,
            ],
        )
        .await
        .map_err(db("recording a task"))?;
        Ok(())
    }

    async fn get_task(&self, id: &str) -> Result<Option<TaskRecord>> {
        let conn = self.conn().await?;
        let row = conn
            .query_opt(&format!("SELECT {COLS} FROM tasks WHERE id = $1"), &[&id])
            .await
            .map_err(db("reading a task"))?;
        row.as_ref().map(from_row).transpose()
    }

    async fn list_tasks(&self, owner: Option<&str>, limit: u32) -> Result<Vec<TaskRecord>> {
        let limit = i64::from(limit);
        let conn = self.conn().await?;
        let rows = match owner {
            Some(o) => {
                conn.query(
                    &format!(
                        "SELECT {COLS} FROM tasks WHERE owner = $1 \
                         ORDER BY created_at DESC, id LIMIT $2"
                    ),
                    &[&o, &limit],
                )
                .await
            }
            None => {
                conn.query(
                    &format!("SELECT {COLS} FROM tasks ORDER BY created_at DESC, id LIMIT $1"),
                    &[&limit],
                )
                .await
            }
        }
        .map_err(db("listing tasks"))?;
        rows.iter().map(from_row).collect()
    }

    async fn image_tasks(&self, image_id: &str) -> Result<Vec<TaskRecord>> {
        let conn = self.conn().await?;
        let rows = conn
            .query(
                &format!(
                    "SELECT {COLS} FROM tasks WHERE image_id = $1 ORDER BY created_at DESC, id"
                ),
                &[&image_id],
            )
            .await
            .map_err(db("listing an image's tasks"))?;
        rows.iter().map(from_row).collect()
    }
}
