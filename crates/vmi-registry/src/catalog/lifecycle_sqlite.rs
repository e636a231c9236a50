//! [`LifecycleCatalog`] on SQLite: each operation is one immediate transaction, which takes the
//! database's write lock first, so its read-check-write is atomic across processes sharing the
//! file.

use super::lifecycle::{
    audit_sql, AuditEvent, AuditQuery, LifecycleCatalog, RecycleEntry, DUE_SQL, PROP_DELETE_AT,
    PROP_STATE,
};
use super::sqlite::{to_sqlite, SqliteCatalog};
use crate::error::{RegistryError, Result};
use crate::model::Status;
use async_trait::async_trait;
use rusqlite::{params, params_from_iter, OptionalExtension, Row, TransactionBehavior};

fn db(what: &'static str) -> impl Fn(rusqlite::Error) -> RegistryError {
    move |e| RegistryError::catalog(what, e)
}

fn status_of(i: usize, s: String) -> rusqlite::Result<Status> {
    s.parse().map_err(|e: String| {
        rusqlite::Error::FromSqlConversionFailure(i, rusqlite::types::Type::Text, e.into())
    })
}

fn entry_from_row(r: &Row<'_>) -> rusqlite::Result<RecycleEntry> {
    Ok(RecycleEntry {
        image_id: r.get(0)?,
        previous_status: status_of(1, r.get(1)?)?,
        deleted_at: r.get(2)?,
        purge_at: r.get(3)?,
        deleted_by: r.get(4)?,
    })
}

fn event_from_row(r: &Row<'_>) -> rusqlite::Result<AuditEvent> {
    let status: i64 = r.get(8)?;
    Ok(AuditEvent {
        id: r.get(0)?,
        at: r.get(1)?,
        user_id: r.get(2)?,
        project_id: r.get(3)?,
        method: r.get(4)?,
        path: r.get(5)?,
        image_id: r.get(6)?,
        action: r.get(7)?,
        status: u16::try_from(status).unwrap_or(0),
        detail: r.get(9)?,
    })
}

const ENTRY_COLS: &str = "r.image_id, r.previous_status, r.deleted_at, r.purge_at, r.deleted_by";

#[async_trait]
impl LifecycleCatalog for SqliteCatalog {
    async fn try_lease(
        &self,
        name: &str,
        holder: &str,
        now: &str,
        expires_at: &str,
    ) -> Result<bool> {
        let (n, h, now, exp) = (
            name.to_string(),
            holder.to_string(),
            now.to_string(),
            expires_at.to_string(),
        );
        self.run("taking a lease", move |c| {
            let changed = c
                .execute(
                    "INSERT INTO leases (name, holder, expires_at) VALUES (?1, ?2, ?3) \
                     ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, \
                     expires_at = excluded.expires_at \
                     WHERE leases.holder = excluded.holder OR leases.expires_at <= ?4",
                    params![n, h, exp, now],
                )
                .map_err(db("taking a lease"))?;
            Ok(changed == 1)
        })
        .await
    }

    async fn release_lease(&self, name: &str, holder: &str) -> Result<bool> {
        let (n, h) = (name.to_string(), holder.to_string());
        self.run("releasing a lease", move |c| {
            let changed = c
                .execute(
                    "DELETE FROM leases WHERE name = ?1 AND holder = ?2",
                    params![n, h],
                )
                .map_err(db("releasing a lease"))?;
            Ok(changed == 1)
        })
        .await
    }

    async fn set_lifecycle(
        &self,
        image_id: &str,
        expected: &str,
        props: &[(&'static str, Option<String>)],
        now: &str,
    ) -> Result<bool> {
        let (id, expected, now) = (image_id.to_string(), expected.to_string(), now.to_string());
        let props = props.to_vec();
        self.run("changing a lifecycle state", move |c| {
            let f = db("changing a lifecycle state");
            let tx = c
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(&f)?;
            let status: Option<String> = tx
                .query_row("SELECT status FROM images WHERE id = ?1", [&id], |r| {
                    r.get(0)
                })
                .optional()
                .map_err(&f)?;
            if !matches!(status.as_deref(), Some("active" | "deactivated")) {
                return Ok(false);
            }
            let state: Option<String> = tx
                .query_row(
                    "SELECT value FROM image_properties WHERE image_id = ?1 AND name = ?2",
                    params![id, PROP_STATE],
                    |r| r.get(0),
                )
                .optional()
                .map_err(&f)?;
            if state.as_deref().unwrap_or("active") != expected {
                return Ok(false);
            }
            for (name, value) in &props {
                tx.execute(
                    "DELETE FROM image_properties WHERE image_id = ?1 AND name = ?2",
                    params![id, name],
                )
                .map_err(&f)?;
                if let Some(v) = value {
                    tx.execute(
                        "INSERT INTO image_properties (image_id, name, value) VALUES (?1, ?2, ?3)",
                        params![id, name, v],
                    )
                    .map_err(&f)?;
                }
            }
            tx.execute(
                "UPDATE images SET updated_at = ?1, revision = revision + 1 WHERE id = ?2",
                params![now, id],
            )
            .map_err(&f)?;
            tx.commit().map_err(&f)?;
            Ok(true)
        })
        .await
    }

    async fn due_lifecycle(&self, now: &str, limit: u32) -> Result<Vec<String>> {
        let now = now.to_string();
        self.run("finding due lifecycle transitions", move |c| {
            let f = db("finding due lifecycle transitions");
            let mut st = c.prepare(DUE_SQL).map_err(&f)?;
            let v = st
                .query_map(params![now, now, now, limit], |r| r.get(0))
                .map_err(&f)?
                .collect::<rusqlite::Result<_>>()
                .map_err(&f)?;
            Ok(v)
        })
        .await
    }

    async fn recycle(&self, e: &RecycleEntry, expected: Status, now: &str) -> Result<bool> {
        let (e, now) = (e.clone(), now.to_string());
        self.run("moving an image to the recycle bin", move |c| {
            let f = db("moving an image to the recycle bin");
            let tx = c
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(&f)?;
            let n = tx
                .execute(
                    "UPDATE images SET status = 'pending_delete', updated_at = ?1, revision = revision + 1 \
                     WHERE id = ?2 AND status = ?3",
                    params![now, e.image_id, expected.as_str()],
                )
                .map_err(&f)?;
            if n == 0 {
                return Ok(false);
            }
            tx.execute("DELETE FROM recycle_bin WHERE image_id = ?1", [&e.image_id])
                .map_err(&f)?;
            tx.execute(
                "INSERT INTO recycle_bin (image_id, previous_status, deleted_at, purge_at, \
                 deleted_by) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![
                    e.image_id,
                    e.previous_status.as_str(),
                    e.deleted_at,
                    e.purge_at,
                    e.deleted_by
                ],
            )
            .map_err(&f)?;
            tx.commit().map_err(&f)?;
            Ok(true)
        })
        .await
    }

    async fn restore(&self, image_id: &str, now: &str) -> Result<Option<Status>> {
        let (id, now) = (image_id.to_string(), now.to_string());
        self.run("restoring an image", move |c| {
            let f = db("restoring an image");
            let tx = c
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(&f)?;
            let prev: Option<String> = tx
                .query_row(
                    "SELECT r.previous_status FROM recycle_bin r JOIN images i \
                     ON i.id = r.image_id WHERE r.image_id = ?1 AND i.status = 'pending_delete'",
                    [&id],
                    |r| r.get(0),
                )
                .optional()
                .map_err(&f)?;
            let Some(prev) = prev else {
                return Ok(None);
            };
            let prev = status_of(0, prev).map_err(&f)?;
            // An upload cannot resume after its image was deleted: it starts again from queued.
            let back = if prev == Status::Saving {
                Status::Queued
            } else {
                prev
            };
            tx.execute(
                "UPDATE images SET status = ?1, updated_at = ?2, revision = revision + 1 WHERE id = ?3",
                params![back.as_str(), now, id],
            )
            .map_err(&f)?;
            tx.execute(
                "UPDATE image_properties SET value = 'obsolete' \
                 WHERE image_id = ?1 AND name = ?2 AND value = 'retired'",
                params![id, PROP_STATE],
            )
            .map_err(&f)?;
            tx.execute(
                "DELETE FROM image_properties WHERE image_id = ?1 AND name = ?2",
                params![id, PROP_DELETE_AT],
            )
            .map_err(&f)?;
            tx.execute("DELETE FROM recycle_bin WHERE image_id = ?1", [&id])
                .map_err(&f)?;
            tx.commit().map_err(&f)?;
            Ok(Some(back))
        })
        .await
    }

    async fn recycle_entry(&self, image_id: &str) -> Result<Option<RecycleEntry>> {
        let id = image_id.to_string();
        self.run("reading the recycle bin", move |c| {
            c.query_row(
                &format!("SELECT {ENTRY_COLS} FROM recycle_bin r WHERE r.image_id = ?1"),
                [&id],
                entry_from_row,
            )
            .optional()
            .map_err(db("reading the recycle bin"))
        })
        .await
    }

    async fn expired_recycled(&self, now: &str, limit: u32) -> Result<Vec<RecycleEntry>> {
        let now = now.to_string();
        self.run("listing expired recycled images", move |c| {
            let f = db("listing expired recycled images");
            let mut st = c
                .prepare(&format!(
                    "SELECT {ENTRY_COLS} FROM recycle_bin r JOIN images i ON i.id = r.image_id \
                     WHERE r.purge_at <= ?1 AND i.status = 'pending_delete' \
                     ORDER BY r.purge_at, r.image_id LIMIT ?2"
                ))
                .map_err(&f)?;
            let v = st
                .query_map(params![now, limit], entry_from_row)
                .map_err(&f)?
                .collect::<rusqlite::Result<_>>()
                .map_err(&f)?;
            Ok(v)
        })
        .await
    }

    async fn purge(&self, image_id: &str, now: &str) -> Result<Option<Option<String>>> {
        let (id, now) = (image_id.to_string(), now.to_string());
        self.run("purging an image", move |c| {
            let f = db("purging an image");
            let tx = c
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(&f)?;
            let loc: Option<Option<String>> = tx
                .query_row(
                    "SELECT location FROM images WHERE id = ?1 AND status = 'pending_delete'",
                    [&id],
                    |r| r.get(0),
                )
                .optional()
                .map_err(&f)?;
            let Some(loc) = loc else {
                return Ok(None);
            };
            tx.execute(
                "UPDATE images SET status = 'deleted', location = NULL, updated_at = ?1, revision = revision + 1 \
                 WHERE id = ?2",
                params![now, id],
            )
            .map_err(&f)?;
            // A purged image's version is free again.
            tx.execute("DELETE FROM family_versions WHERE image_id = ?1", [&id])
                .map_err(&f)?;
            tx.execute("DELETE FROM recycle_bin WHERE image_id = ?1", [&id])
                .map_err(&f)?;
            tx.commit().map_err(&f)?;
            Ok(Some(loc))
        })
        .await
    }

    async fn append_audit(&self, e: &AuditEvent) -> Result<()> {
        let e = e.clone();
        self.run("recording an audit event", move |c| {
            c.execute(
                "INSERT INTO audit_events (at, user_id, project_id, method, path, image_id, \
                 action, status, detail) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
                params![
                    e.at,
                    e.user_id,
                    e.project_id,
                    e.method,
                    e.path,
                    e.image_id,
                    e.action,
                    i64::from(e.status),
                    e.detail
                ],
            )
            .map_err(db("recording an audit event"))?;
            Ok(())
        })
        .await
    }

    async fn list_audit(&self, q: &AuditQuery) -> Result<Vec<AuditEvent>> {
        let (sql, p) = audit_sql(q);
        self.run("reading the audit log", move |c| {
            let f = db("reading the audit log");
            let mut st = c.prepare(&sql).map_err(&f)?;
            let v = st
                .query_map(
                    params_from_iter(p.into_iter().map(to_sqlite)),
                    event_from_row,
                )
                .map_err(&f)?
                .collect::<rusqlite::Result<_>>()
                .map_err(&f)?;
            Ok(v)
        })
        .await
    }
}
