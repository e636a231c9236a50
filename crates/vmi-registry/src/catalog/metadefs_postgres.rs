//! [`MetadefCatalog`] for the PostgreSQL catalog (tables from
//! `migrations/postgres/0009_metadefs_tasks.sql`).

use super::{db, PostgresCatalog};
use crate::catalog::metadefs::{MetadefCatalog, MetadefNamespace};
use crate::error::Result;
use async_trait::async_trait;
use deadpool_postgres::GenericClient;
use tokio_postgres::Row;

const COLS: &str =
    "namespace, owner, visibility, protected, body, created_at, updated_at, revision";

fn from_row(r: &Row) -> Result<MetadefNamespace> {
    let f = db("reading a metadef namespace");
    let revision: i64 = r.try_get(7).map_err(&f)?;
    Ok(MetadefNamespace {
        namespace: r.try_get(0).map_err(&f)?,
        owner: r.try_get(1).map_err(&f)?,
        visibility: r.try_get(2).map_err(&f)?,
        protected: r.try_get(3).map_err(&f)?,
        body: r.try_get(4).map_err(&f)?,
        created_at: r.try_get(5).map_err(&f)?,
        updated_at: r.try_get(6).map_err(&f)?,
        revision: u64::try_from(revision).unwrap_or(0),
    })
}

async fn insert(
    c: &impl GenericClient,
    ns: &MetadefNamespace,
    or_ignore: bool,
) -> std::result::Result<u64, tokio_postgres::Error> {
    c.execute(
        &format!(
            "INSERT INTO metadef_namespaces ({COLS}) VALUES ($1, $2, $3, $4, $5, $6, $7, 0) {}",
            if or_ignore {
                "ON CONFLICT (namespace) DO NOTHING"
            } else {
                ""
            }
        ),
        &[
            &ns.namespace,
            &ns.owner,
            &ns.visibility,
            &ns.protected,
            &ns.body,
            &ns.created_at,
            &ns.updated_at,
        ],
    )
    .await
}

#[async_trait]
impl MetadefCatalog for PostgresCatalog {
    async fn metadef_namespaces(&self) -> Result<Vec<MetadefNamespace>> {
        let conn = self.conn().await?;
        let rows = conn
            .query(
                &format!("SELECT {COLS} FROM metadef_namespaces ORDER BY namespace"),
                &[],
            )
            .await
            .map_err(db("listing metadef namespaces"))?;
        rows.iter().map(from_row).collect()
    }

    async fn metadef_namespace(&self, namespace: &str) -> Result<Option<MetadefNamespace>> {
        let conn = self.conn().await?;
        let row = conn
            .query_opt(
                &format!("SELECT {COLS} FROM metadef_namespaces WHERE namespace = $1"),
                &[&namespace],
            )
            .await
            .map_err(db("reading a metadef namespace"))?;
        row.as_ref().map(from_row).transpose()
    }

    async fn metadef_create(&self, ns: &MetadefNamespace) -> Result<()> {
        let conn = self.conn().await?;
        insert(&conn, ns, false)
            .await
            .map_err(db("creating a metadef namespace"))?;
        Ok(())
    }

    async fn metadef_update(&self, name: &str, ns: &MetadefNamespace) -> Result<bool> {
        let revision = i64::try_from(ns.revision).unwrap_or(i64::MAX);
        let conn = self.conn().await?;
        let n = conn
            .execute(
                "UPDATE metadef_namespaces SET namespace = $1, owner = $2, visibility = $3, \
                 protected = $4, body = $5, updated_at = $6, revision = revision + 1 \
                 WHERE namespace = $7 AND revision = $8",
                &[
                    &ns.namespace,
                    &ns.owner,
                    &ns.visibility,
                    &ns.protected,
                    &ns.body,
                    &ns.updated_at,
                    &name,
                    &revision,
                ],
            )
            .await
            .map_err(db("updating a metadef namespace"))?;
        Ok(n == 1)
    }

    async fn metadef_delete(&self, namespace: &str) -> Result<bool> {
        let conn = self.conn().await?;
        let n = conn
            .execute(
                "DELETE FROM metadef_namespaces WHERE namespace = $1",
                &[&namespace],
            )
            .await
            .map_err(db("deleting a metadef namespace"))?;
        Ok(n == 1)
    }

    async fn metadef_load(&self, what: &str, set: &[MetadefNamespace]) -> Result<bool> {
        let f = db("loading metadef namespaces");
        let mut conn = self.conn().await?;
        let tx = conn.transaction().await.map_err(&f)?;
        // Nodes starting together load the set once: the first insert of the marker wins.
        let n = tx
            .execute(
                "INSERT INTO metadef_loads (what, loaded_at) VALUES ($1, $2) \
                 ON CONFLICT (what) DO NOTHING",
                &[&what, &crate::model::now()],
            )
            .await
            .map_err(&f)?;
        if n == 0 {
            return Ok(false);
        }
        for ns in set {
            insert(&tx, ns, true).await.map_err(&f)?;
        }
        tx.commit().await.map_err(&f)?;
        Ok(true)
    }
}
