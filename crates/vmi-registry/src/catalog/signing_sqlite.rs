//! [`SigningCatalog`] on the SQLite catalog.

use super::signing::{SigningCatalog, SigningKeyRecord, KEY_COLS};
use super::sqlite::SqliteCatalog;
use crate::error::{RegistryError, Result};
use async_trait::async_trait;
use rusqlite::{params, OptionalExtension, Row};

fn db(what: &'static str) -> impl Fn(rusqlite::Error) -> RegistryError {
    move |e| {
        if let rusqlite::Error::SqliteFailure(f, _) = &e {
            if f.code == rusqlite::ErrorCode::ConstraintViolation {
                return RegistryError::Conflict(format!(
                    "{what}: this key is already registered in the project"
                ));
            }
        }
        RegistryError::catalog(what, e)
    }
}

fn key_from_row(r: &Row<'_>) -> rusqlite::Result<SigningKeyRecord> {
    Ok(SigningKeyRecord {
        id: r.get(0)?,
        project_id: r.get(1)?,
        name: r.get(2)?,
        form: r.get(3)?,
        key_type: r.get(4)?,
        pem: r.get(5)?,
        fingerprint: r.get(6)?,
        not_before: r.get(7)?,
        not_after: r.get(8)?,
        subject: r.get(9)?,
        created_by: r.get(10)?,
        created_at: r.get(11)?,
    })
}

#[async_trait]
impl SigningCatalog for SqliteCatalog {
    async fn create_signing_key(&self, k: &SigningKeyRecord) -> Result<()> {
        let k = k.clone();
        self.run("registering a signing key", move |c| {
            c.execute(
                &format!(
                    "INSERT INTO signing_keys ({KEY_COLS}) \
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)"
                ),
                params![
                    k.id,
                    k.project_id,
                    k.name,
                    k.form,
                    k.key_type,
                    k.pem,
                    k.fingerprint,
                    k.not_before,
                    k.not_after,
                    k.subject,
                    k.created_by,
                    k.created_at
                ],
            )
            .map_err(db("signing key"))?;
            Ok(())
        })
        .await
    }

    async fn get_signing_key(&self, id: &str) -> Result<Option<SigningKeyRecord>> {
        let id = id.to_string();
        self.run("reading a signing key", move |c| {
            c.query_row(
                &format!("SELECT {KEY_COLS} FROM signing_keys WHERE id = ?1"),
                [&id],
                key_from_row,
            )
            .optional()
            .map_err(db("reading a signing key"))
        })
        .await
    }

    async fn list_signing_keys(&self, project_id: Option<&str>) -> Result<Vec<SigningKeyRecord>> {
        let project_id = project_id.map(str::to_string);
        self.run("listing signing keys", move |c| {
            let mut st = c
                .prepare_cached(&format!(
                    "SELECT {KEY_COLS} FROM signing_keys \
                     WHERE ?1 IS NULL OR project_id = ?1 ORDER BY created_at, id"
                ))
                .map_err(db("listing signing keys"))?;
            let rows = st
                .query_map([&project_id], key_from_row)
                .map_err(db("listing signing keys"))?
                .collect::<rusqlite::Result<Vec<_>>>()
                .map_err(db("listing signing keys"))?;
            Ok(rows)
        })
        .await
    }

    async fn delete_signing_key(&self, id: &str) -> Result<bool> {
        let id = id.to_string();
        self.run("deleting a signing key", move |c| {
            let n = c
                .execute("DELETE FROM signing_keys WHERE id = ?1", [&id])
                .map_err(db("deleting a signing key"))?;
            Ok(n > 0)
        })
        .await
    }
}
