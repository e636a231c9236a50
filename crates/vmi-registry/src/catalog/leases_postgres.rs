//! [`UploadLeaseCatalog`] on the PostgreSQL catalog.

use super::leases::{UploadLease, UploadLeaseCatalog};
use super::postgres::{db, PostgresCatalog};
use crate::error::Result;
use async_trait::async_trait;
use tokio_postgres::{Client, Row};

const COLS: &str = "image_id, node_id, token, expires_at";

fn from_row(r: &Row) -> Result<UploadLease> {
    let f = db("reading an upload lease");
    Ok(UploadLease {
        image_id: r.try_get(0).map_err(&f)?,
        node_id: r.try_get(1).map_err(&f)?,
        token: r.try_get(2).map_err(&f)?,
        expires_at: r.try_get(3).map_err(&f)?,
    })
}

#[async_trait]
impl UploadLeaseCatalog for PostgresCatalog {
    async fn put_upload_lease(&self, l: &UploadLease) -> Result<()> {
        let conn = self.conn().await?;
        let c: &Client = &conn;
        c.execute(
            &format!(
                "INSERT INTO upload_leases ({COLS}) VALUES ($1, $2, $3, $4) \
                 ON CONFLICT (image_id) DO UPDATE SET node_id = EXCLUDED.node_id, \
                 token = EXCLUDED.token, expires_at = EXCLUDED.expires_at"
            ),
            &[&l.image_id, &l.node_id, &l.token, &l.expires_at],
        )
        .await
        .map_err(db("recording an upload lease"))?;
        Ok(())
    }

    async fn renew_upload_lease(
        &self,
        image_id: &str,
        token: &str,
        expires_at: &str,
    ) -> Result<bool> {
        let conn = self.conn().await?;
        let c: &Client = &conn;
        let n = c
            .execute(
                "UPDATE upload_leases SET expires_at = $3 WHERE image_id = $1 AND token = $2",
                &[&image_id, &token, &expires_at],
            )
            .await
            .map_err(db("renewing an upload lease"))?;
        Ok(n == 1)
    }

    async fn delete_upload_lease(&self, image_id: &str, token: &str) -> Result<bool> {
        let conn = self.conn().await?;
        let c: &Client = &conn;
        let n = c
            .execute(
                "DELETE FROM upload_leases WHERE image_id = $1 AND token = $2",
                &[&image_id, &token],
            )
            .await
            .map_err(db("releasing an upload lease"))?;
        Ok(n == 1)
    }

    async fn get_upload_lease(&self, image_id: &str) -> Result<Option<UploadLease>> {
        let conn = self.conn().await?;
        let c: &Client = &conn;
        let row = c
            .query_opt(
                &format!("SELECT {COLS} FROM upload_leases WHERE image_id = $1"),
                &[&image_id],
            )
            .await
            .map_err(db("reading an upload lease"))?;
        row.as_ref().map(from_row).transpose()
    }

    async fn expired_upload_leases(&self, now: &str, limit: u32) -> Result<Vec<UploadLease>> {
        let conn = self.conn().await?;
        let c: &Client = &conn;
        let rows = c
            .query(
                &format!(
                    "SELECT {COLS} FROM upload_leases WHERE expires_at < $1 \
                     ORDER BY expires_at LIMIT $2"
                ),
                &[&now, &i64::from(limit)],
            )
            .await
            .map_err(db("listing expired upload leases"))?;
        rows.iter().map(from_row).collect()
    }
}
