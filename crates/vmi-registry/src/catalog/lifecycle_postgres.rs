//! [`LifecycleCatalog`] on PostgreSQL: each check-then-write runs in one transaction that first
//! locks the image row (`SELECT … FOR UPDATE`), so concurrent nodes serialise on it; the lease
//! is a single conditional upsert.

use super::lifecycle::{
    audit_sql, AuditEvent, AuditQuery, LifecycleCatalog, RecycleEntry, DUE_SQL, PROP_DELETE_AT,
    PROP_STATE,
};
use super::postgres::PostgresCatalog;
use super::sql::{numbered, SqlValue};
use crate::error::{RegistryError, Result};
use crate::model::Status;
use async_trait::async_trait;
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, Row};

fn db(what: &'static str) -> impl Fn(tokio_postgres::Error) -> RegistryError {
    move |e| RegistryError::catalog(what, e)
}

fn status_of(s: &str) -> Result<Status> {
    s.parse()
        .map_err(|e: String| RegistryError::catalog("reading the recycle bin", e))
}

fn entry_from_row(r: &Row) -> Result<RecycleEntry> {
    let f = db("reading the recycle bin");
    let prev: String = r.try_get(1).map_err(&f)?;
    Ok(RecycleEntry {
        image_id: r.try_get(0).map_err(&f)?,
        previous_status: status_of(&prev)?,
        deleted_at: r.try_get(2).map_err(&f)?,
        purge_at: r.try_get(3).map_err(&f)?,
        deleted_by: r.try_get(4).map_err(&f)?,
    })
}

fn event_from_row(r: &Row) -> Result<AuditEvent> {
    let f = db("reading the audit log");
    let status: i64 = r.try_get(8).map_err(&f)?;
    Ok(AuditEvent {
        id: r.try_get(0).map_err(&f)?,
        at: r.try_get(1).map_err(&f)?,
        user_id: r.try_get(2).map_err(&f)?,
        project_id: r.try_get(3).map_err(&f)?,
        method: r.try_get(4).map_err(&f)?,
        path: r.try_get(5).map_err(&f)?,
        image_id: r.try_get(6).map_err(&f)?,
        action: r.try_get(7).map_err(&f)?,
        status: u16::try_from(status).unwrap_or(0),
        detail: r.try_get(9).map_err(&f)?,
    })
}

const ENTRY_COLS: &str = "r.image_id, r.previous_status, r.deleted_at, r.purge_at, r.deleted_by";

type Param = Box<dyn ToSql + Sync + Send>;

fn boxed(vals: Vec<SqlValue>) -> Vec<Param> {
    vals.into_iter()
        .map(|v| -> Param {
            match v {
                SqlValue::Int(i) => Box::new(i),
                SqlValue::Text(s) => Box::new(s),
            }
        })
        .collect()
}

#[async_trait]
impl LifecycleCatalog for PostgresCatalog {
    async fn try_lease(
        &self,
        name: &str,
        holder: &str,
        now: &str,
        expires_at: &str,
    ) -> Result<bool> {
        let conn = self.conn().await?;
        let c: &Client = &conn;
        let n = c
            .execute(
                "INSERT INTO leases (name, holder, expires_at) VALUES ($1, $2, $3) \
                 ON CONFLICT (name) DO UPDATE SET holder = EXCLUDED.holder, \
                 expires_at = EXCLUDED.expires_at \
                 WHERE leases.holder = EXCLUDED.holder OR leases.expires_at <= $4",
                &[&name, &holder, &expires_at, &now],
            )
            .await
            .map_err(db("taking a lease"))?;
        Ok(n == 1)
    }

    async fn release_lease(&self, name: &str, holder: &str) -> Result<bool> {
        let conn = self.conn().await?;
        let c: &Client = &conn;
        let n = c
            .execute(
                "DELETE FROM leases WHERE name = $1 AND holder = $2",
                &[&name, &holder],
            )
            .await
            .map_err(db("releasing a lease"))?;
        Ok(n == 1)
    }

    async fn set_lifecycle(
        &self,
        image_id: &str,
        expected: &str,
        props: &[(&'static str, Option<String>)],
        now: &str,
    ) -> Result<bool> {
        let f = db("changing a lifecycle state");
        let mut conn = self.conn().await?;
        let c: &mut Client = &mut conn;
        let tx = c.transaction().await.map_err(&f)?;
        let row = tx
            .query_opt(
                "SELECT status FROM images WHERE id = $1 FOR UPDATE",
                &[&image_id],
            )
            .await
            .map_err(&f)?;
        let status: Option<String> = match row {
            Some(r) => Some(r.try_get(0).map_err(&f)?),
            None => None,
        };
        if !matches!(status.as_deref(), Some("active" | "deactivated")) {
            return Ok(false);
        }
        let state: Option<String> = match tx
            .query_opt(
                "SELECT value FROM image_properties WHERE image_id = $1 AND name = $2",
                &[&image_id, &PROP_STATE],
            )
            .await
            .map_err(&f)?
        {
            Some(r) => Some(r.try_get(0).map_err(&f)?),
            None => None,
        };
        if state.as_deref().unwrap_or("active") != expected {
            return Ok(false);
        }
        for (name, value) in props {
            tx.execute(
                "DELETE FROM image_properties WHERE image_id = $1 AND name = $2",
                &[&image_id, name],
            )
            .await
            .map_err(&f)?;
            if let Some(v) = value {
                tx.execute(
                    "INSERT INTO image_properties (image_id, name, value) VALUES ($1, $2, $3)",
                    &[&image_id, name, v],
                )
                .await
                .map_err(&f)?;
            }
        }
        tx.execute(
            "UPDATE images SET updated_at = $1, revision = revision + 1 WHERE id = $2",
            &[&now, &image_id],
        )
        .await
        .map_err(&f)?;
        tx.commit().await.map_err(&f)?;
        Ok(true)
    }

    async fn due_lifecycle(&self, now: &str, limit: u32) -> Result<Vec<String>> {
        let f = db("finding due lifecycle transitions");
        let conn = self.conn().await?;
        let c: &Client = &conn;
        let limit = i64::from(limit);
        let rows = c
            .query(&numbered(DUE_SQL), &[&now, &now, &now, &limit])
            .await
            .map_err(&f)?;
        rows.iter().map(|r| r.try_get(0).map_err(&f)).collect()
    }

    async fn recycle(&self, e: &RecycleEntry, expected: Status, now: &str) -> Result<bool> {
        let f = db("moving an image to the recycle bin");
        let mut conn = self.conn().await?;
        let c: &mut Client = &mut conn;
        let tx = c.transaction().await.map_err(&f)?;
        let n = tx
            .execute(
                "UPDATE images SET status = 'pending_delete', updated_at = $1, revision = revision + 1 \
                 WHERE id = $2 AND status = $3",
                &[&now, &e.image_id, &expected.as_str()],
            )
            .await
            .map_err(&f)?;
        if n == 0 {
            return Ok(false);
        }
        tx.execute(
            "DELETE FROM recycle_bin WHERE image_id = $1",
            &[&e.image_id],
        )
        .await
        .map_err(&f)?;
        tx.execute(
            "INSERT INTO recycle_bin (image_id, previous_status, deleted_at, purge_at, \
             deleted_by) VALUES ($1, $2, $3, $4, $5)",
            &[
                &e.image_id,
                &e.previous_status.as_str(),
                &e.deleted_at,
                &e.purge_at,
                &e.deleted_by,
            ],
        )
        .await
        .map_err(&f)?;
        tx.commit().await.map_err(&f)?;
        Ok(true)
    }

    async fn restore(&self, image_id: &str, now: &str) -> Result<Option<Status>> {
        let f = db("restoring an image");
        let mut conn = self.conn().await?;
        let c: &mut Client = &mut conn;
        let tx = c.transaction().await.map_err(&f)?;
        let locked = tx
            .query_opt(
                "SELECT status FROM images WHERE id = $1 AND status = 'pending_delete' FOR UPDATE",
                &[&image_id],
            )
            .await
            .map_err(&f)?;
        if locked.is_none() {
            return Ok(None);
        }
        let Some(row) = tx
            .query_opt(
                "SELECT previous_status FROM recycle_bin WHERE image_id = $1",
                &[&image_id],
            )
            .await
            .map_err(&f)?
        else {
            return Ok(None);
        };
        let prev: String = row.try_get(0).map_err(&f)?;
        let prev = status_of(&prev)?;
        // An upload cannot resume after its image was deleted: it starts again from queued.
        let back = if prev == Status::Saving {
            Status::Queued
        } else {
            prev
        };
        tx.execute(
            "UPDATE images SET status = $1, updated_at = $2, revision = revision + 1 WHERE id = $3",
            &[&back.as_str(), &now, &image_id],
        )
        .await
        .map_err(&f)?;
        tx.execute(
            "UPDATE image_properties SET value = 'obsolete' \
             WHERE image_id = $1 AND name = $2 AND value = 'retired'",
            &[&image_id, &PROP_STATE],
        )
        .await
        .map_err(&f)?;
        tx.execute(
            "DELETE FROM image_properties WHERE image_id = $1 AND name = $2",
            &[&image_id, &PROP_DELETE_AT],
        )
        .await
        .map_err(&f)?;
        tx.execute("DELETE FROM recycle_bin WHERE image_id = $1", &[&image_id])
            .await
            .map_err(&f)?;
        tx.commit().await.map_err(&f)?;
        Ok(Some(back))
    }

    async fn recycle_entry(&self, image_id: &str) -> Result<Option<RecycleEntry>> {
        let conn = self.conn().await?;
        let c: &Client = &conn;
        let row = c
            .query_opt(
                &format!("SELECT {ENTRY_COLS} FROM recycle_bin r WHERE r.image_id = $1"),
                &[&image_id],
            )
            .await
            .map_err(db("reading the recycle bin"))?;
        row.as_ref().map(entry_from_row).transpose()
    }

    async fn expired_recycled(&self, now: &str, limit: u32) -> Result<Vec<RecycleEntry>> {
        let conn = self.conn().await?;
        let c: &Client = &conn;
        let limit = i64::from(limit);
        let rows = c
            .query(
                &format!(
                    "SELECT {ENTRY_COLS} FROM recycle_bin r JOIN images i ON i.id = r.image_id \
                     WHERE r.purge_at <= $1 AND i.status = 'pending_delete' \
                     ORDER BY r.purge_at, r.image_id LIMIT $2"
                ),
                &[&now, &limit],
            )
            .await
            .map_err(db("listing expired recycled images"))?;
        rows.iter().map(entry_from_row).collect()
    }

    async fn purge(&self, image_id: &str, now: &str) -> Result<Option<Option<String>>> {
        let f = db("purging an image");
        let mut conn = self.conn().await?;
        let c: &mut Client = &mut conn;
        let tx = c.transaction().await.map_err(&f)?;
        let Some(row) = tx
            .query_opt(
                "SELECT location FROM images WHERE id = $1 AND status = 'pending_delete' \
                 FOR UPDATE",
                &[&image_id],
            )
            .await
            .map_err(&f)?
        else {
            return Ok(None);
        };
        let loc: Option<String> = row.try_get(0).map_err(&f)?;
        tx.execute(
            "UPDATE images SET status = 'deleted', location = NULL, updated_at = $1, revision = revision + 1 \
             WHERE id = $2",
            &[&now, &image_id],
        )
        .await
        .map_err(&f)?;
        // A purged image's version is free again.
        tx.execute(
            "DELETE FROM family_versions WHERE image_id = $1",
            &[&image_id],
        )
        .await
        .map_err(&f)?;
        tx.execute("DELETE FROM recycle_bin WHERE image_id = $1", &[&image_id])
            .await
            .map_err(&f)?;
        tx.commit().await.map_err(&f)?;
        Ok(Some(loc))
    }

    async fn append_audit(&self, e: &AuditEvent) -> Result<()> {
        let conn = self.conn().await?;
        let c: &Client = &conn;
        c.execute(
            "INSERT INTO audit_events (at, user_id, project_id, method, path, image_id, \
             action, status, detail) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
            &[
                &e.at,
                &e.user_id,
                &e.project_id,
                &e.method,
                &e.path,
                &e.image_id,
                &e.action,
                &i64::from(e.status),
                &e.detail,
            ],
        )
        .await
        .map_err(db("recording an audit event"))?;
        Ok(())
    }

    async fn list_audit(&self, q: &AuditQuery) -> Result<Vec<AuditEvent>> {
        let (sql, vals) = audit_sql(q);
        let p = boxed(vals);
        let refs: Vec<&(dyn ToSql + Sync)> = p
            .iter()
            .map(|b| b.as_ref() as &(dyn ToSql + Sync))
            .collect();
        let conn = self.conn().await?;
        let c: &Client = &conn;
        let rows = c
            .query(&numbered(&sql), &refs)
            .await
            .map_err(db("reading the audit log"))?;
        rows.iter().map(event_from_row).collect()
    }
}
