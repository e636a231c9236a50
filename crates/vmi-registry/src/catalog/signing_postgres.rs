//! [`SigningCatalog`] on the PostgreSQL catalog.

use super::postgres::{db, PostgresCatalog};
use super::signing::{SigningCatalog, SigningKeyRecord, KEY_COLS};
use crate::error::{RegistryError, Result};
use async_trait::async_trait;
use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, Row};

fn key_from_row(r: &Row) -> Result<SigningKeyRecord> {
    let f = db("reading a signing key row");
    Ok(SigningKeyRecord {
        id: r.try_get(0).map_err(&f)?,
        project_id: r.try_get(1).map_err(&f)?,
        name: r.try_get(2).map_err(&f)?,
        form: r.try_get(3).map_err(&f)?,
        key_type: r.try_get(4).map_err(&f)?,
        pem: r.try_get(5).map_err(&f)?,
        fingerprint: r.try_get(6).map_err(&f)?,
        not_before: r.try_get(7).map_err(&f)?,
        not_after: r.try_get(8).map_err(&f)?,
        subject: r.try_get(9).map_err(&f)?,
        created_by: r.try_get(10).map_err(&f)?,
        created_at: r.try_get(11).map_err(&f)?,
    })
}

#[async_trait]
impl SigningCatalog for PostgresCatalog {
    async fn create_signing_key(&self, k: &SigningKeyRecord) -> Result<()> {
        let conn = self.conn().await?;
        let c: &Client = &conn;
        c.execute(
            &format!(
                "INSERT INTO signing_keys ({KEY_COLS}) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)"
            ),
            &[
                &k.id,
                &k.project_id,
                &k.name,
                &k.form,
                &k.key_type,
                &k.pem,
                &k.fingerprint,
                &k.not_before,
                &k.not_after,
                &k.subject,
                &k.created_by,
                &k.created_at,
            ],
        )
        .await
        .map_err(|e| {
            if e.code() == Some(&SqlState::UNIQUE_VIOLATION) {
                RegistryError::Conflict(
                    "signing key: this key is already registered in the project".into(),
                )
            } else {
                RegistryError::catalog("registering a signing key", e)
            }
        })?;
        Ok(())
    }

    async fn get_signing_key(&self, id: &str) -> Result<Option<SigningKeyRecord>> {
        let conn = self.conn().await?;
        let c: &Client = &conn;
        c.query_opt(
            &format!("SELECT {KEY_COLS} FROM signing_keys WHERE id = $1"),
            &[&id],
        )
        .await
        .map_err(db("reading a signing key"))?
        .map(|r| key_from_row(&r))
        .transpose()
    }

    async fn list_signing_keys(&self, project_id: Option<&str>) -> Result<Vec<SigningKeyRecord>> {
        let conn = self.conn().await?;
        let c: &Client = &conn;
        c.query(
            &format!(
                "SELECT {KEY_COLS} FROM signing_keys \
                 WHERE $1::TEXT IS NULL OR project_id = $1 ORDER BY created_at, id"
            ),
            &[&project_id],
        )
        .await
        .map_err(db("listing signing keys"))?
        .iter()
        .map(key_from_row)
        .collect()
    }

    async fn delete_signing_key(&self, id: &str) -> Result<bool> {
        let conn = self.conn().await?;
        let c: &Client = &conn;
        let n = c
            .execute("DELETE FROM signing_keys WHERE id = $1", &[&id])
            .await
            .map_err(db("deleting a signing key"))?;
        Ok(n > 0)
    }
}
