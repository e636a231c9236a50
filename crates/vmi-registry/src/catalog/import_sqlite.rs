//! [`ImportCatalog`] for the SQLite catalog (tables from `migrations/sqlite/0002_import.sql`).

use super::{db, uint, SqliteCatalog};
use crate::catalog::import::{Conversion, ImportCatalog, ImportTask, TaskState};
use crate::error::{RegistryError, Result};
use async_trait::async_trait;
use rusqlite::{params, OptionalExtension, Row};

const TASK_COLS: &str = "image_id, method, uri, staging_location, staging_size, state, \
     lease_token, lease_expires, attempts, message, created_at, updated_at";
const CONV_COLS: &str = "image_id, source_sha256, format, location, size, md5, created_at";

fn task_from_row(r: &Row<'_>) -> rusqlite::Result<ImportTask> {
    let state: String = r.get(5)?;
    let attempts: i64 = r.get(8)?;
    Ok(ImportTask {
        image_id: r.get(0)?,
        method: r.get(1)?,
        uri: r.get(2)?,
        staging_location: r.get(3)?,
        staging_size: uint(r.get(4)?),
        state: TaskState::parse(&state).ok_or_else(|| {
            rusqlite::Error::FromSqlConversionFailure(
                5,
                rusqlite::types::Type::Text,
                format!("unknown import task state '{state}'").into(),
            )
        })?,
        lease_token: r.get(6)?,
        lease_expires: r.get(7)?,
        attempts: u32::try_from(attempts).unwrap_or(u32::MAX),
        message: r.get(9)?,
        created_at: r.get(10)?,
        updated_at: r.get(11)?,
    })
}

fn conv_from_row(r: &Row<'_>) -> rusqlite::Result<Conversion> {
    Ok(Conversion {
        image_id: r.get(0)?,
        source_sha256: r.get(1)?,
        format: r.get(2)?,
        location: r.get(3)?,
        size: uint(r.get(4)?).unwrap_or(0),
        md5: r.get(5)?,
        created_at: r.get(6)?,
    })
}

fn int(v: u64) -> Result<i64> {
    i64::try_from(v).map_err(|_| RegistryError::BadRequest(format!("{v} is too large")))
}

#[async_trait]
impl ImportCatalog for SqliteCatalog {
    async fn put_import_task(&self, task: &ImportTask) -> Result<()> {
        let t = task.clone();
        let size = t.staging_size.map(int).transpose()?;
        self.run("recording an import task", move |c| {
            c.execute(
                &format!(
                    "INSERT OR REPLACE INTO import_tasks ({TASK_COLS}) \
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)"
                ),
                params![
                    t.image_id,
                    t.method,
                    t.uri,
                    t.staging_location,
                    size,
                    t.state.as_str(),
                    t.lease_token,
                    t.lease_expires,
                    i64::from(t.attempts),
                    t.message,
                    t.created_at,
                    t.updated_at
                ],
            )
            .map_err(db("recording an import task"))?;
            Ok(())
        })
        .await
    }

    async fn get_import_task(&self, image_id: &str) -> Result<Option<ImportTask>> {
        let id = image_id.to_string();
        self.run("reading an import task", move |c| {
            c.query_row(
                &format!("SELECT {TASK_COLS} FROM import_tasks WHERE image_id = ?1"),
                [&id],
                task_from_row,
            )
            .optional()
            .map_err(db("reading an import task"))
        })
        .await
    }

    async fn swap_import_task(&self, task: &ImportTask, expected_token: &str) -> Result<bool> {
        let t = task.clone();
        let expected = expected_token.to_string();
        let size = t.staging_size.map(int).transpose()?;
        self.run("taking an import task", move |c| {
            let n = c
                .execute(
                    "UPDATE import_tasks SET method = ?2, uri = ?3, staging_location = ?4, \
                     staging_size = ?5, state = ?6, lease_token = ?7, lease_expires = ?8, \
                     attempts = ?9, message = ?10, updated_at = ?11 \
                     WHERE image_id = ?1 AND lease_token = ?12",
                    params![
                        t.image_id,
                        t.method,
                        t.uri,
                        t.staging_location,
                        size,
                        t.state.as_str(),
                        t.lease_token,
                        t.lease_expires,
                        i64::from(t.attempts),
                        t.message,
                        t.updated_at,
                        expected
                    ],
                )
                .map_err(db("taking an import task"))?;
            Ok(n == 1)
        })
        .await
    }

    async fn expired_import_tasks(&self, now: &str, limit: u32) -> Result<Vec<ImportTask>> {
        let now = now.to_string();
        self.run("listing expired import tasks", move |c| {
            let mut st = c
                .prepare(&format!(
                    "SELECT {TASK_COLS} FROM import_tasks \
                     WHERE state = 'running' AND lease_expires < ?1 \
                     ORDER BY lease_expires LIMIT ?2"
                ))
                .map_err(db("listing expired import tasks"))?;
            let rows = st
                .query_map(params![now, i64::from(limit)], task_from_row)
                .map_err(db("listing expired import tasks"))?
                .collect::<rusqlite::Result<Vec<_>>>()
                .map_err(db("listing expired import tasks"))?;
            Ok(rows)
        })
        .await
    }

    async fn delete_import_task(&self, image_id: &str) -> Result<()> {
        let id = image_id.to_string();
        self.run("removing an import task", move |c| {
            c.execute("DELETE FROM import_tasks WHERE image_id = ?1", [&id])
                .map_err(db("removing an import task"))?;
            Ok(())
        })
        .await
    }

    async fn add_conversion(&self, conv: &Conversion) -> Result<()> {
        let v = conv.clone();
        let size = int(v.size)?;
        self.run("recording a conversion", move |c| {
            c.execute(
                &format!(
                    "INSERT INTO image_conversions ({CONV_COLS}) \
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)"
                ),
                params![
                    v.image_id,
                    v.source_sha256,
                    v.format,
                    v.location,
                    size,
                    v.md5,
                    v.created_at
                ],
            )
            .map_err(db("recording a conversion"))?;
            Ok(())
        })
        .await
    }

    async fn get_conversion(
        &self,
        image_id: &str,
        sha256: &str,
        format: &str,
    ) -> Result<Option<Conversion>> {
        let (id, sha, fmt) = (image_id.to_string(), sha256.to_string(), format.to_string());
        self.run("reading a conversion", move |c| {
            c.query_row(
                &format!(
                    "SELECT {CONV_COLS} FROM image_conversions \
                     WHERE image_id = ?1 AND source_sha256 = ?2 AND format = ?3"
                ),
                params![id, sha, fmt],
                conv_from_row,
            )
            .optional()
            .map_err(db("reading a conversion"))
        })
        .await
    }

    async fn take_conversions(&self, image_id: &str) -> Result<Vec<Conversion>> {
        let id = image_id.to_string();
        self.run("removing conversions", move |c| {
            let tx = c.transaction().map_err(db("removing conversions"))?;
            let rows = {
                let mut st = tx
                    .prepare(&format!(
                        "SELECT {CONV_COLS} FROM image_conversions WHERE image_id = ?1"
                    ))
                    .map_err(db("removing conversions"))?;
                let rows = st
                    .query_map([&id], conv_from_row)
                    .map_err(db("removing conversions"))?
                    .collect::<rusqlite::Result<Vec<_>>>()
                    .map_err(db("removing conversions"))?;
                rows
            };
            tx.execute("DELETE FROM image_conversions WHERE image_id = ?1", [&id])
                .map_err(db("removing conversions"))?;
            tx.commit().map_err(db("removing conversions"))?;
            Ok(rows)
        })
        .await
    }

    async fn import_locations(&self) -> Result<Vec<String>> {
        self.run("listing import locations", |c| {
            let mut st = c
                .prepare(
                    "SELECT staging_location FROM import_tasks \
                     WHERE staging_location IS NOT NULL \
                     UNION ALL SELECT location FROM image_conversions",
                )
                .map_err(db("listing import locations"))?;
            let rows = st
                .query_map([], |r| r.get(0))
                .map_err(db("listing import locations"))?
                .collect::<rusqlite::Result<Vec<String>>>()
                .map_err(db("listing import locations"))?;
            Ok(rows)
        })
        .await
    }
}
