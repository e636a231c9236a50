//! The catalog's lineage and family queries: the [`LineageCatalog`] trait (a supertrait of
//! [`super::Catalog`]) and its SQLite implementation; the PostgreSQL one is in
//! [`super::lineage_postgres`]. Both run the SQL built here.
//!
//! Lineage records live in `image_lineage` (migration `0003_lineage.sql`), one row per derived
//! image. Recording a link is one transaction that takes the database's write lock (SQLite's
//! `BEGIN IMMEDIATE`, a PostgreSQL advisory lock), walks the new parent's ancestors to refuse a
//! cycle, upserts the row and mirrors it into the image's reserved properties, so two concurrent
//! links can never close a cycle between them.

use super::sql::SqlValue;
use super::sqlite::{to_sqlite, SqliteCatalog};
use super::Viewer;
use crate::error::{RegistryError, Result};
use crate::lineage::version::Version;
use crate::lineage::{
    LineageRecord, DERIVATION_PROP, FAMILY_PROP, MAX_CYCLE_WALK, PARENT_PROP, VERSION_PROP,
};
use crate::model::{ImageRecord, Status};
use async_trait::async_trait;
use rusqlite::{params, params_from_iter, OptionalExtension, Row, TransactionBehavior};

/// Lineage records and family names.
#[async_trait]
pub trait LineageCatalog: Send + Sync {
    /// The lineage record of `image_id`, if one was recorded.
    async fn get_lineage(&self, image_id: &str) -> Result<Option<LineageRecord>>;
    /// Record `rec` (and mirror it into the image's reserved properties). Conflict when the new
    /// parent descends from the image (a cycle), when the parent's ancestry is deeper than
    /// [`MAX_CYCLE_WALK`], or when the image already has a record and `replace` is false.
    async fn set_lineage(&self, rec: &LineageRecord, replace: bool) -> Result<()>;
    /// Direct children of `parent_id` that `viewer` may see, by child id, after `after`.
    async fn lineage_children(
        &self,
        parent_id: &str,
        viewer: &Viewer,
        after: Option<&str>,
        limit: u32,
    ) -> Result<Vec<LineageRecord>>;
    /// Distinct `(owner, family)` pairs among the non-deleted images `viewer` may see, by family
    /// then owner.
    async fn family_names(&self, q: &FamilyQuery) -> Result<Vec<(String, String)>>;
}

/// Which families [`LineageCatalog::family_names`] lists: those with an image `viewer` may see,
/// ordered by family name then owner, after `after` (a page's last `(family, owner)`).
#[derive(Debug, Clone)]
pub struct FamilyQuery {
    /// Who is asking.
    pub viewer: Viewer,
    /// Only this owner's families.
    pub owner: Option<String>,
    /// Keyset pagination: list what sorts after this `(family, owner)`.
    pub after: Option<(String, String)>,
    /// At most this many.
    pub limit: u32,
}

/// Columns of `image_lineage`, in the order [`LineageRow`] reads them.
pub(crate) const LINEAGE_COLS: &str = "l.image_id, l.parent_id, l.parent_sha256, \
    l.parent_os_hash_value, l.relation, l.build, l.recorded_by, l.recorded_project, l.recorded_at";

/// A lineage row as text columns, before validation.
pub(crate) struct LineageRow(pub(crate) [Option<String>; 9]);

impl LineageRow {
    pub(crate) fn into_record(self) -> Result<LineageRecord> {
        let [image_id, parent_id, parent_sha256, parent_os_hash_value, relation, build, by, project, at] =
            self.0;
        let req = |v: Option<String>, col: &str| {
            v.ok_or_else(|| {
                RegistryError::catalog("reading a lineage row", format!("{col} is NULL"))
            })
        };
        Ok(LineageRecord {
            image_id: req(image_id, "image_id")?,
            parent_id: req(parent_id, "parent_id")?,
            parent_sha256,
            parent_os_hash_value,
            relation: req(relation, "relation")?
                .parse()
                .map_err(|e: String| RegistryError::catalog("reading a lineage row", e))?,
            build,
            recorded_by: req(by, "recorded_by")?,
            recorded_project: req(project, "recorded_project")?,
            recorded_at: req(at, "recorded_at")?,
        })
    }
}

/// Values of a record in `LINEAGE_COLS` order.
pub(crate) fn lineage_values(r: &LineageRecord) -> Vec<SqlValue> {
    let t = |s: &str| SqlValue::Text(Some(s.to_string()));
    vec![
        t(&r.image_id),
        t(&r.parent_id),
        SqlValue::Text(r.parent_sha256.clone()),
        SqlValue::Text(r.parent_os_hash_value.clone()),
        t(r.relation.as_str()),
        SqlValue::Text(r.build.clone()),
        t(&r.recorded_by),
        t(&r.recorded_project),
        t(&r.recorded_at),
    ]
}

/// `INSERT` of a lineage row.
pub(crate) fn insert_sql() -> String {
    format!(
        "INSERT INTO image_lineage ({}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        LINEAGE_COLS.replace("l.", "")
    )
}

/// The condition (on `images i`) under which `viewer` may see an image — the same rule as
/// [`crate::policy::can_see`]: not deleted, and owned, public, community, or shared with the
/// viewer's project (any member status).
pub(crate) fn visible_sql(viewer: &Viewer, p: &mut Vec<SqlValue>) -> String {
    match viewer {
        Viewer::Admin => "i.status != 'deleted'".into(),
        Viewer::Project(project) => {
            p.push(SqlValue::Text(Some(project.clone())));
            p.push(SqlValue::Text(Some(project.clone())));
            "i.status != 'deleted' AND (i.owner = ? OR i.visibility IN ('public', 'community') \
             OR (i.visibility = 'shared' AND EXISTS (SELECT 1 FROM image_members m \
             WHERE m.image_id = i.id AND m.member_id = ?)))"
                .into()
        }
    }
}

/// The children query and its parameters.
pub(crate) fn children_sql(
    parent_id: &str,
    viewer: &Viewer,
    after: Option<&str>,
    limit: u32,
) -> (String, Vec<SqlValue>) {
    let mut p = vec![SqlValue::Text(Some(parent_id.to_string()))];
    let vis = visible_sql(viewer, &mut p);
    let mut sql = format!(
        "SELECT {LINEAGE_COLS} FROM image_lineage l JOIN images i ON i.id = l.image_id \
         WHERE l.parent_id = ? AND {vis}"
    );
    if let Some(a) = after {
        sql.push_str(" AND l.image_id > ?");
        p.push(SqlValue::Text(Some(a.to_string())));
    }
    sql.push_str(" ORDER BY l.image_id LIMIT ?");
    p.push(SqlValue::Int(Some(i64::from(limit))));
    (sql, p)
}

/// The family-names query and its parameters.
pub(crate) fn families_sql(q: &FamilyQuery) -> (String, Vec<SqlValue>) {
    let t = |s: &str| SqlValue::Text(Some(s.to_string()));
    let mut p = vec![t(FAMILY_PROP)];
    let mut w = vec![visible_sql(&q.viewer, &mut p)];
    if let Some(owner) = &q.owner {
        w.push("i.owner = ?".into());
        p.push(t(owner));
    }
    if let Some((family, owner)) = &q.after {
        w.push("(f.value > ? OR (f.value = ? AND i.owner > ?))".into());
        p.extend([t(family), t(family), t(owner)]);
    }
    p.push(SqlValue::Int(Some(i64::from(q.limit))));
    (
        format!(
            "SELECT DISTINCT i.owner, f.value FROM images i JOIN image_properties f \
             ON f.image_id = i.id AND f.name = ? WHERE {} ORDER BY f.value, i.owner LIMIT ?",
            w.join(" AND ")
        ),
        p,
    )
}

/// The `family_versions` row `img` should have — `(owner, family, version key)` — or `None`
/// (deleted, no family or version, or a version that does not parse: the API refuses those).
pub(crate) fn version_row(img: &ImageRecord) -> Option<(String, String, String)> {
    if img.status == Status::Deleted {
        return None;
    }
    let family = img.properties.get(FAMILY_PROP)?;
    let version = Version::parse(img.properties.get(VERSION_PROP)?).ok()?;
    Some((img.owner.clone(), family.clone(), version.key()))
}

/// Forget an image's version row (before writing the one it has now).
pub(crate) const VERSION_DELETE_SQL: &str = "DELETE FROM family_versions WHERE image_id = ?";

/// Claim a version: fails on the `(owner, family, version_key)` uniqueness constraint when
/// another image holds it.
pub(crate) const VERSION_INSERT_SQL: &str =
    "INSERT INTO family_versions (image_id, owner, family, version_key) VALUES (?, ?, ?, ?)";

/// Rows for migration 7's backfill: images that are not deleted, with family and version,
/// oldest first (the oldest keeps a version two images claim).
pub(crate) const VERSION_BACKFILL_SELECT: &str =
    "SELECT i.id, i.owner, i.status, f.value, v.value FROM images i \
     JOIN image_properties f ON f.image_id = i.id AND f.name = 'family' \
     JOIN image_properties v ON v.image_id = i.id AND v.name = 'version' \
     WHERE i.status != 'deleted' ORDER BY i.created_at, i.id";

/// The backfill's insert: a version already claimed stays with the older image.
pub(crate) const VERSION_BACKFILL_INSERT: &str =
    "INSERT INTO family_versions (image_id, owner, family, version_key) VALUES (?, ?, ?, ?) \
     ON CONFLICT DO NOTHING";

/// The migration whose backfill runs in Rust.
pub(crate) const VERSION_MIGRATION: i64 = 7;

/// The error when the database refuses a version another image holds.
pub(crate) fn version_taken(img: &ImageRecord) -> RegistryError {
    RegistryError::Conflict(format!(
        "Version {} of family {} already exists in project {}",
        img.properties
            .get(VERSION_PROP)
            .map(String::as_str)
            .unwrap_or(""),
        img.properties
            .get(FAMILY_PROP)
            .map(String::as_str)
            .unwrap_or(""),
        img.owner
    ))
}

/// The backfill row for one selected `(id, owner, status, family, version)`.
pub(crate) fn backfill_row(
    id: String,
    owner: String,
    status: &str,
    family: String,
    version: String,
) -> Option<(String, String, String, String)> {
    let mut img = ImageRecord::new(id, owner, String::new());
    img.status = status.parse().ok()?;
    img.properties.insert(FAMILY_PROP.into(), family);
    img.properties.insert(VERSION_PROP.into(), version);
    let (owner, family, key) = version_row(&img)?;
    Some((img.id, owner, family, key))
}

/// The error for a link that would close a cycle.
pub(crate) fn cycle(rec: &LineageRecord) -> RegistryError {
    RegistryError::Conflict(format!(
        "Image {} descends from image {}: recording it as the parent would make a cycle",
        rec.parent_id, rec.image_id
    ))
}

/// The error for an ancestry too deep to check.
pub(crate) fn too_deep(rec: &LineageRecord) -> RegistryError {
    RegistryError::Conflict(format!(
        "The ancestry of image {} is deeper than {MAX_CYCLE_WALK} images",
        rec.parent_id
    ))
}

/// The error for a second record without `replace`.
pub(crate) fn already(rec: &LineageRecord) -> RegistryError {
    RegistryError::Conflict(format!(
        "The lineage of image {} is already recorded",
        rec.image_id
    ))
}

/// Statements that mirror a record into the image's reserved properties and bump the image's
/// revision: (SQL, params).
pub(crate) fn mirror_sql(rec: &LineageRecord) -> [(String, Vec<SqlValue>); 4] {
    let t = |s: &str| SqlValue::Text(Some(s.to_string()));
    let ins = "INSERT INTO image_properties (image_id, name, value) VALUES (?, ?, ?)".to_string();
    [
        (
            "DELETE FROM image_properties WHERE image_id = ? AND name IN (?, ?)".into(),
            vec![t(&rec.image_id), t(PARENT_PROP), t(DERIVATION_PROP)],
        ),
        (
            ins.clone(),
            vec![t(&rec.image_id), t(PARENT_PROP), t(&rec.parent_id)],
        ),
        (
            ins,
            vec![
                t(&rec.image_id),
                t(DERIVATION_PROP),
                t(rec.relation.as_str()),
            ],
        ),
        (
            "UPDATE images SET revision = revision + 1 WHERE id = ?".into(),
            vec![t(&rec.image_id)],
        ),
    ]
}

fn sqlite_row(r: &Row<'_>) -> rusqlite::Result<LineageRow> {
    let mut cols: [Option<String>; 9] = Default::default();
    for (i, c) in cols.iter_mut().enumerate() {
        *c = r.get(i)?;
    }
    Ok(LineageRow(cols))
}

fn sq(what: &'static str) -> impl Fn(rusqlite::Error) -> RegistryError {
    move |e| RegistryError::catalog(what, e)
}

#[async_trait]
impl LineageCatalog for SqliteCatalog {
    async fn get_lineage(&self, image_id: &str) -> Result<Option<LineageRecord>> {
        let id = image_id.to_string();
        self.run("reading a lineage record", move |c| {
            c.query_row(
                &format!("SELECT {LINEAGE_COLS} FROM image_lineage l WHERE l.image_id = ?1"),
                [&id],
                sqlite_row,
            )
            .optional()
            .map_err(sq("reading a lineage record"))?
            .map(LineageRow::into_record)
            .transpose()
        })
        .await
    }

    async fn set_lineage(&self, rec: &LineageRecord, replace: bool) -> Result<()> {
        let rec = rec.clone();
        self.run("recording lineage", move |c| {
            let f = sq("recording lineage");
            let tx = c
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(&f)?;
            let mut cur = rec.parent_id.clone();
            let mut steps = 0u32;
            loop {
                if cur == rec.image_id {
                    return Err(cycle(&rec));
                }
                if steps >= MAX_CYCLE_WALK {
                    return Err(too_deep(&rec));
                }
                steps += 1;
                let next: Option<String> = tx
                    .query_row(
                        "SELECT parent_id FROM image_lineage WHERE image_id = ?1",
                        [&cur],
                        |r| r.get(0),
                    )
                    .optional()
                    .map_err(&f)?;
                match next {
                    Some(n) => cur = n,
                    None => break,
                }
            }
            let exists: Option<i64> = tx
                .query_row(
                    "SELECT 1 FROM image_lineage WHERE image_id = ?1",
                    [&rec.image_id],
                    |r| r.get(0),
                )
                .optional()
                .map_err(&f)?;
            if exists.is_some() {
                if !replace {
                    return Err(already(&rec));
                }
                tx.execute(
                    "DELETE FROM image_lineage WHERE image_id = ?1",
                    params![rec.image_id],
                )
                .map_err(&f)?;
            }
            tx.execute(
                &insert_sql(),
                params_from_iter(lineage_values(&rec).into_iter().map(to_sqlite)),
            )
            .map_err(&f)?;
            for (sql, p) in mirror_sql(&rec) {
                tx.execute(&sql, params_from_iter(p.into_iter().map(to_sqlite)))
                    .map_err(&f)?;
            }
            tx.commit().map_err(&f)
        })
        .await
    }

    async fn lineage_children(
        &self,
        parent_id: &str,
        viewer: &Viewer,
        after: Option<&str>,
        limit: u32,
    ) -> Result<Vec<LineageRecord>> {
        let (sql, p) = children_sql(parent_id, viewer, after, limit);
        self.run("listing lineage children", move |c| {
            let f = sq("listing lineage children");
            let mut st = c.prepare(&sql).map_err(&f)?;
            let rows: Vec<LineageRow> = st
                .query_map(params_from_iter(p.into_iter().map(to_sqlite)), sqlite_row)
                .map_err(&f)?
                .collect::<rusqlite::Result<_>>()
                .map_err(&f)?;
            rows.into_iter().map(LineageRow::into_record).collect()
        })
        .await
    }

    async fn family_names(&self, q: &FamilyQuery) -> Result<Vec<(String, String)>> {
        let (sql, p) = families_sql(q);
        self.run("listing families", move |c| {
            let f = sq("listing families");
            let mut st = c.prepare(&sql).map_err(&f)?;
            let v = st
                .query_map(params_from_iter(p.into_iter().map(to_sqlite)), |r| {
                    Ok((r.get(0)?, r.get(1)?))
                })
                .map_err(&f)?
                .collect::<rusqlite::Result<_>>()
                .map_err(&f)?;
            Ok(v)
        })
        .await
    }
}
