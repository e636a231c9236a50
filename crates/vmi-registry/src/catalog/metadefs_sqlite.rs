//! [`MetadefCatalog`] for the SQLite catalog (tables from
//! `migrations/sqlite/0009_metadefs_tasks.sql`).

use super::{db, SqliteCatalog};
use crate::catalog::metadefs::{MetadefCatalog, MetadefNamespace};
use crate::error::Result;
use async_trait::async_trait;
use rusqlite::{params, OptionalExtension, Row};

const COLS: &str =
    "namespace, owner, visibility, protected, body, created_at, updated_at, revision";

fn from_row(r: &Row<'_>) -> rusqlite::Result<MetadefNamespace> {
    let protected: i64 = r.get(3)?;
    let revision: i64 = r.get(7)?;
    Ok(MetadefNamespace {
        namespace: r.get(0)?,
        owner: r.get(1)?,
        visibility: r.get(2)?,
        protected: protected != 0,
        body: r.get(4)?,
        created_at: r.get(5)?,
        updated_at: r.get(6)?,
        revision: u64::try_from(revision).unwrap_or(0),
    })
}

fn insert(
    c: &rusqlite::Connection,
    ns: &MetadefNamespace,
    or_ignore: bool,
) -> rusqlite::Result<usize> {
    c.execute(
        &format!(
            "INSERT {} INTO metadef_namespaces ({COLS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, 0)",
            if or_ignore { "OR IGNORE" } else { "" }
        ),
        params![
            ns.namespace,
            ns.owner,
            ns.visibility,
            i64::from(ns.protected),
            ns.body,
            ns.created_at,
            ns.updated_at
        ],
    )
}

#[async_trait]
impl MetadefCatalog for SqliteCatalog {
    async fn metadef_namespaces(&self) -> Result<Vec<MetadefNamespace>> {
        self.run("listing metadef namespaces", move |c| {
            let mut st = c
                .prepare(&format!(
                    "SELECT {COLS} FROM metadef_namespaces ORDER BY namespace"
                ))
                .map_err(db("listing metadef namespaces"))?;
            let rows = st
                .query_map([], from_row)
                .map_err(db("listing metadef namespaces"))?;
            rows.collect::<rusqlite::Result<Vec<_>>>()
                .map_err(db("listing metadef namespaces"))
        })
        .await
    }

    async fn metadef_namespace(&self, namespace: &str) -> Result<Option<MetadefNamespace>> {
        let name = namespace.to_string();
        self.run("reading a metadef namespace", move |c| {
            c.query_row(
                &format!("SELECT {COLS} FROM metadef_namespaces WHERE namespace = ?1"),
                [&name],
                from_row,
            )
            .optional()
            .map_err(db("reading a metadef namespace"))
        })
        .await
    }

    async fn metadef_create(&self, ns: &MetadefNamespace) -> Result<()> {
        let ns = ns.clone();
        self.run("creating a metadef namespace", move |c| {
            insert(c, &ns, false).map_err(db("creating a metadef namespace"))?;
            Ok(())
        })
        .await
    }

    async fn metadef_update(&self, name: &str, ns: &MetadefNamespace) -> Result<bool> {
        let name = name.to_string();
        let ns = ns.clone();
        let revision = i64::try_from(ns.revision).unwrap_or(i64::MAX);
        self.run("updating a metadef namespace", move |c| {
            let n = c
                .execute(
                    "UPDATE metadef_namespaces SET namespace = ?1, owner = ?2, visibility = ?3, \
                     protected = ?4, body = ?5, updated_at = ?6, revision = revision + 1 \
                     WHERE namespace = ?7 AND revision = ?8",
                    params![
                        ns.namespace,
                        ns.owner,
                        ns.visibility,
                        i64::from(ns.protected),
                        ns.body,
                        ns.updated_at,
                        name,
                        revision
                    ],
                )
                .map_err(db("updating a metadef namespace"))?;
            Ok(n == 1)
        })
        .await
    }

    async fn metadef_delete(&self, namespace: &str) -> Result<bool> {
        let name = namespace.to_string();
        self.run("deleting a metadef namespace", move |c| {
            let n = c
                .execute(
                    "DELETE FROM metadef_namespaces WHERE namespace = ?1",
                    [&name],
                )
                .map_err(db("deleting a metadef namespace"))?;
            Ok(n == 1)
        })
        .await
    }

    async fn metadef_load(&self, what: &str, set: &[MetadefNamespace]) -> Result<bool> {
        let what = what.to_string();
        let set = set.to_vec();
        self.run("loading metadef namespaces", move |c| {
            let f = db("loading metadef namespaces");
            let tx = c
                .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
                .map_err(&f)?;
            let done: Option<String> = tx
                .query_row(
                    "SELECT what FROM metadef_loads WHERE what = ?1",
                    [&what],
                    |r| r.get(0),
                )
                .optional()
                .map_err(&f)?;
            if done.is_some() {
                return Ok(false);
            }
            for ns in &set {
                insert(&tx, ns, true).map_err(&f)?;
            }
            tx.execute(
                "INSERT INTO metadef_loads (what, loaded_at) VALUES (?1, ?2)",
                params![what, crate::model::now()],
            )
            .map_err(&f)?;
            tx.commit().map_err(&f)?;
            Ok(true)
        })
        .await
    }
}
