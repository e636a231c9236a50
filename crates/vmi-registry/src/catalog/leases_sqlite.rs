//! [`UploadLeaseCatalog`] on the SQLite catalog.

use super::leases::{UploadLease, UploadLeaseCatalog};
use super::sqlite::SqliteCatalog;
use crate::error::{RegistryError, Result};
use async_trait::async_trait;
use rusqlite::{params, OptionalExtension, Row};

const COLS: &str = "image_id, node_id, token, expires_at";

fn db(what: &'static str) -> impl Fn(rusqlite::Error) -> RegistryError {
    move |e| RegistryError::catalog(what, e)
}

fn from_row(r: &Row<'_>) -> rusqlite::Result<UploadLease> {
    Ok(UploadLease {
        image_id: r.get(0)?,
        node_id: r.get(1)?,
        token: r.get(2)?,
        expires_at: r.get(3)?,
    })
}

#[async_trait]
impl UploadLeaseCatalog for SqliteCatalog {
    async fn put_upload_lease(&self, lease: &UploadLease) -> Result<()> {
        let l = lease.clone();
        self.run("recording an upload lease", move |c| {
            c.execute(
                &format!("INSERT OR REPLACE INTO upload_leases ({COLS}) VALUES (?1, ?2, ?3, ?4)"),
                params![l.image_id, l.node_id, l.token, l.expires_at],
            )
            .map_err(db("recording an upload lease"))?;
            Ok(())
        })
        .await
    }

    async fn renew_upload_lease(
        &self,
        image_id: &str,
        token: &str,
        expires_at: &str,
    ) -> Result<bool> {
        let (i, t, e) = (
            image_id.to_string(),
            token.to_string(),
            expires_at.to_string(),
        );
        self.run("renewing an upload lease", move |c| {
            let n = c
                .execute(
                    "UPDATE upload_leases SET expires_at = ?3 WHERE image_id = ?1 AND token = ?2",
                    params![i, t, e],
                )
                .map_err(db("renewing an upload lease"))?;
            Ok(n == 1)
        })
        .await
    }

    async fn delete_upload_lease(&self, image_id: &str, token: &str) -> Result<bool> {
        let (i, t) = (image_id.to_string(), token.to_string());
        self.run("releasing an upload lease", move |c| {
            let n = c
                .execute(
                    "DELETE FROM upload_leases WHERE image_id = ?1 AND token = ?2",
                    params![i, t],
                )
                .map_err(db("releasing an upload lease"))?;
            Ok(n == 1)
        })
        .await
    }

    async fn get_upload_lease(&self, image_id: &str) -> Result<Option<UploadLease>> {
        let i = image_id.to_string();
        self.run("reading an upload lease", move |c| {
            c.query_row(
                &format!("SELECT {COLS} FROM upload_leases WHERE image_id = ?1"),
                params![i],
                from_row,
            )
            .optional()
            .map_err(db("reading an upload lease"))
        })
        .await
    }

    async fn expired_upload_leases(&self, now: &str, limit: u32) -> Result<Vec<UploadLease>> {
        let n = now.to_string();
        self.run("listing expired upload leases", move |c| {
            let mut st = c
                .prepare(&format!(
                    "SELECT {COLS} FROM upload_leases WHERE expires_at < ?1 \
                     ORDER BY expires_at LIMIT ?2"
                ))
                .map_err(db("listing expired upload leases"))?;
            let rows = st
                .query_map(params![n, i64::from(limit)], from_row)
                .map_err(db("listing expired upload leases"))?;
            rows.collect::<rusqlite::Result<Vec<_>>>()
                .map_err(db("listing expired upload leases"))
        })
        .await
    }
}
