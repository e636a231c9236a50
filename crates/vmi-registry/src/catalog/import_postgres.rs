//! [`ImportCatalog`] for the PostgreSQL catalog (tables from
//! `migrations/postgres/0002_import.sql`).

use super::{db, uint, PostgresCatalog};
use crate::catalog::import::{Conversion, ImportCatalog, ImportTask, TaskState};
use crate::error::{RegistryError, Result};
use async_trait::async_trait;
use tokio_postgres::{Client, Row};

const TASK_COLS: &str = "image_id, method, uri, staging_location, staging_size, state, \
     lease_token, lease_expires, attempts, message, created_at, updated_at";
const CONV_COLS: &str = "image_id, source_sha256, format, location, size, md5, created_at";

fn task_from_row(r: &Row) -> Result<ImportTask> {
    let f = db("reading an import task");
    let state: String = r.try_get(5).map_err(&f)?;
    let attempts: i64 = r.try_get(8).map_err(&f)?;
    Ok(ImportTask {
        image_id: r.try_get(0).map_err(&f)?,
        method: r.try_get(1).map_err(&f)?,
        uri: r.try_get(2).map_err(&f)?,
        staging_location: r.try_get(3).map_err(&f)?,
        staging_size: uint(r.try_get(4).map_err(&f)?),
        state: TaskState::parse(&state).ok_or_else(|| {
            RegistryError::catalog("reading an import task", format!("unknown state '{state}'"))
        })?,
        lease_token: r.try_get(6).map_err(&f)?,
        lease_expires: r.try_get(7).map_err(&f)?,
        attempts: u32::try_from(attempts).unwrap_or(u32::MAX),
        message: r.try_get(9).map_err(&f)?,
        created_at: r.try_get(10).map_err(&f)?,
        updated_at: r.try_get(11).map_err(&f)?,
    })
}

fn conv_from_row(r: &Row) -> Result<Conversion> {
    let f = db("reading a conversion");
    let size: i64 = r.try_get(4).map_err(&f)?;
    Ok(Conversion {
        image_id: r.try_get(0).map_err(&f)?,
        source_sha256: r.try_get(1).map_err(&f)?,
        format: r.try_get(2).map_err(&f)?,
        location: r.try_get(3).map_err(&f)?,
        size: uint(Some(size)).unwrap_or(0),
        md5: r.try_get(5).map_err(&f)?,
        created_at: r.try_get(6).map_err(&f)?,
    })
}

fn int(v: u64) -> Result<i64> {
    i64::try_from(v).map_err(|_| RegistryError::BadRequest(format!("{v} is too large")))
}

#[async_trait]
impl ImportCatalog for PostgresCatalog {
    async fn put_import_task(&self, t: &ImportTask) -> Result<()> {
        let size = t.staging_size.map(int).transpose()?;
        let attempts = i64::from(t.attempts);
        let conn = self.conn().await?;
        let c: &Client = &conn;
        c.execute(
            &format!(
                "INSERT INTO import_tasks ({TASK_COLS}) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12) \
                 ON CONFLICT (image_id) DO UPDATE SET method = EXCLUDED.method, \
                 uri = EXCLUDED.uri, staging_location = EXCLUDED.staging_location, \
                 staging_size = EXCLUDED.staging_size, state = EXCLUDED.state, \
                 lease_token = EXCLUDED.lease_token, lease_expires = EXCLUDED.lease_expires, \
                 attempts = EXCLUDED.attempts, message = EXCLUDED.message, \
                 created_at = EXCLUDED.created_at, updated_at = EXCLUDED.updated_at"
            ),
            &[
                &t.image_id,
                &t.method,
                &t.uri,
                &t.staging_location,
                &size,
                &t.state.as_str(),
                &t.lease_token,
                &t.lease_expires,
                &attempts,
                &t.message,
                &t.created_at,
                &t.updated_at,
            ],
        )
        .await
        .map_err(db("recording an import task"))?;
        Ok(())
    }

    async fn get_import_task(&self, image_id: &str) -> Result<Option<ImportTask>> {
        let conn = self.conn().await?;
        let c: &Client = &conn;
        let row = c
            .query_opt(
                &format!("SELECT {TASK_COLS} FROM import_tasks WHERE image_id = $1"),
                &[&image_id],
            )
            .await
            .map_err(db("reading an import task"))?;
        row.as_ref().map(task_from_row).transpose()
    }

    async fn swap_import_task(&self, t: &ImportTask, expected_token: &str) -> Result<bool> {
        let size = t.staging_size.map(int).transpose()?;
        let attempts = i64::from(t.attempts);
        let conn = self.conn().await?;
        let c: &Client = &conn;
        let n = c
            .execute(
                "UPDATE import_tasks SET method = $2, uri = $3, staging_location = $4, \
                 staging_size = $5, state = $6, lease_token = $7, lease_expires = $8, \
                 attempts = $9, message = $10, updated_at = $11 \
                 WHERE image_id = $1 AND lease_token = $12",
                &[
                    &t.image_id,
                    &t.method,
                    &t.uri,
                    &t.staging_location,
                    &size,
                    &t.state.as_str(),
                    &t.lease_token,
                    &t.lease_expires,
                    &attempts,
                    &t.message,
                    &t.updated_at,
                    &expected_token,
                ],
            )
            .await
            .map_err(db("taking an import task"))?;
        Ok(n == 1)
    }

    async fn expired_import_tasks(&self, now: &str, limit: u32) -> Result<Vec<ImportTask>> {
        let conn = self.conn().await?;
        let c: &Client = &conn;
        let rows = c
            .query(
                &format!(
                    "SELECT {TASK_COLS} FROM import_tasks \
                     WHERE state = 'running' AND lease_expires < $1 \
                     ORDER BY lease_expires LIMIT $2"
                ),
                &[&now, &i64::from(limit)],
            )
            .await
            .map_err(db("listing expired import tasks"))?;
        rows.iter().map(task_from_row).collect()
    }

    async fn delete_import_task(&self, image_id: &str) -> Result<()> {
        let conn = self.conn().await?;
        let c: &Client = &conn;
        c.execute("DELETE FROM import_tasks WHERE image_id = $1", &[&image_id])
            .await
            .map_err(db("removing an import task"))?;
        Ok(())
    }

    async fn add_conversion(&self, v: &Conversion) -> Result<()> {
        let size = int(v.size)?;
        let conn = self.conn().await?;
        let c: &Client = &conn;
        c.execute(
            &format!(
                "INSERT INTO image_conversions ({CONV_COLS}) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7)"
            ),
            &[
                &v.image_id,
                &v.source_sha256,
                &v.format,
                &v.location,
                &size,
                &v.md5,
                &v.created_at,
            ],
        )
        .await
        .map_err(db("recording a conversion"))?;
        Ok(())
    }

    async fn get_conversion(
        &self,
        image_id: &str,
        sha256: &str,
        format: &str,
    ) -> Result<Option<Conversion>> {
        let conn = self.conn().await?;
        let c: &Client = &conn;
        let row = c
            .query_opt(
                &format!(
                    "SELECT {CONV_COLS} FROM image_conversions \
                     WHERE image_id = $1 AND source_sha256 = $2 AND format = $3"
                ),
                &[&image_id, &sha256, &format],
            )
            .await
            .map_err(db("reading a conversion"))?;
        row.as_ref().map(conv_from_row).transpose()
    }

    async fn take_conversions(&self, image_id: &str) -> Result<Vec<Conversion>> {
        let conn = self.conn().await?;
        let c: &Client = &conn;
        let rows = c
            .query(
                &format!("DELETE FROM image_conversions WHERE image_id = $1 RETURNING {CONV_COLS}"),
                &[&image_id],
            )
            .await
            .map_err(db("removing conversions"))?;
        rows.iter().map(conv_from_row).collect()
    }

    async fn import_locations(&self) -> Result<Vec<String>> {
        let f = db("listing import locations");
        let conn = self.conn().await?;
        let c: &Client = &conn;
        let rows = c
            .query(
                "SELECT staging_location FROM import_tasks WHERE staging_location IS NOT NULL \
                 UNION ALL SELECT location FROM image_conversions",
                &[],
            )
            .await
            .map_err(&f)?;
        rows.iter().map(|r| r.try_get(0).map_err(&f)).collect()
    }
}
