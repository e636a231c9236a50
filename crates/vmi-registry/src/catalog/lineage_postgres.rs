//! [`LineageCatalog`] for the PostgreSQL catalog: the SQL of [`super::lineage`] with numbered
//! placeholders. Recording a link holds a transaction-scoped advisory lock, so links recorded
//! by several nodes at once are checked for cycles one after the other.

use super::lineage::{
    already, children_sql, cycle, families_sql, insert_sql, lineage_values, mirror_sql, too_deep,
    FamilyQuery, LineageCatalog, LineageRow, LINEAGE_COLS,
};
use super::postgres::{params, refs, PostgresCatalog};
use super::sql::numbered;
use super::Viewer;
use crate::error::{RegistryError, Result};
use crate::lineage::{LineageRecord, MAX_CYCLE_WALK};
use async_trait::async_trait;
use tokio_postgres::{Client, Row};

/// Advisory lock key held while recording lineage ("vmilin" in ASCII).
const LINEAGE_LOCK: i64 = 0x766d_696c_696e;

fn pg(what: &'static str) -> impl Fn(tokio_postgres::Error) -> RegistryError {
    move |e| RegistryError::catalog(what, e)
}

fn row(r: &Row) -> Result<LineageRecord> {
    let mut cols: [Option<String>; 9] = Default::default();
    for (i, c) in cols.iter_mut().enumerate() {
        *c = r.try_get(i).map_err(pg("reading a lineage row"))?;
    }
    LineageRow(cols).into_record()
}

#[async_trait]
impl LineageCatalog for PostgresCatalog {
    async fn get_lineage(&self, image_id: &str) -> Result<Option<LineageRecord>> {
        let conn = self.conn().await?;
        let c: &Client = &conn;
        let r = c
            .query_opt(
                &format!("SELECT {LINEAGE_COLS} FROM image_lineage l WHERE l.image_id = $1"),
                &[&image_id],
            )
            .await
            .map_err(pg("reading a lineage record"))?;
        r.as_ref().map(row).transpose()
    }

    async fn set_lineage(&self, rec: &LineageRecord, replace: bool) -> Result<()> {
        let f = pg("recording lineage");
        let mut conn = self.conn().await?;
        let c: &mut Client = &mut conn;
        let tx = c.transaction().await.map_err(&f)?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&LINEAGE_LOCK])
            .await
            .map_err(&f)?;
        let mut cur = rec.parent_id.clone();
        let mut steps = 0u32;
        loop {
            if cur == rec.image_id {
                return Err(cycle(rec));
            }
            if steps >= MAX_CYCLE_WALK {
                return Err(too_deep(rec));
            }
            steps += 1;
            let next = tx
                .query_opt(
                    "SELECT parent_id FROM image_lineage WHERE image_id = $1",
                    &[&cur],
                )
                .await
                .map_err(&f)?;
            match next {
                Some(r) => cur = r.try_get(0).map_err(&f)?,
                None => break,
            }
        }
        let exists = tx
            .query_opt(
                "SELECT 1 FROM image_lineage WHERE image_id = $1",
                &[&rec.image_id],
            )
            .await
            .map_err(&f)?;
        if exists.is_some() {
            if !replace {
                return Err(already(rec));
            }
            tx.execute(
                "DELETE FROM image_lineage WHERE image_id = $1",
                &[&rec.image_id],
            )
            .await
            .map_err(&f)?;
        }
        let p = params(lineage_values(rec));
        tx.execute(&numbered(&insert_sql()), &refs(&p))
            .await
            .map_err(&f)?;
        for (sql, vals) in mirror_sql(rec) {
            let p = params(vals);
            tx.execute(&numbered(&sql), &refs(&p)).await.map_err(&f)?;
        }
        tx.commit().await.map_err(&f)
    }

    async fn lineage_children(
        &self,
        parent_id: &str,
        viewer: &Viewer,
        after: Option<&str>,
        limit: u32,
    ) -> Result<Vec<LineageRecord>> {
        let (sql, vals) = children_sql(parent_id, viewer, after, limit);
        let p = params(vals);
        let conn = self.conn().await?;
        let c: &Client = &conn;
        let rows = c
            .query(&numbered(&sql), &refs(&p))
            .await
            .map_err(pg("listing lineage children"))?;
        rows.iter().map(row).collect()
    }

    async fn family_names(&self, q: &FamilyQuery) -> Result<Vec<(String, String)>> {
        let (sql, vals) = families_sql(q);
        let p = params(vals);
        let conn = self.conn().await?;
        let c: &Client = &conn;
        let rows = c
            .query(&numbered(&sql), &refs(&p))
            .await
            .map_err(pg("listing families"))?;
        rows.iter()
            .map(|r| {
                Ok((
                    r.try_get(0).map_err(pg("listing families"))?,
                    r.try_get(1).map_err(pg("listing families"))?,
                ))
            })
            .collect()
    }
}
