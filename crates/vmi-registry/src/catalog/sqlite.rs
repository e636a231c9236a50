//! The embedded catalog backend: one SQLite database file.
//!
//! Queries run on the blocking thread pool over one connection in WAL mode. Migrations in
//! `migrations/sqlite/` are applied at open inside an immediate transaction, so several
//! processes opening one database at once apply each migration exactly once.

use super::lineage::{
    backfill_row, version_row, version_taken, VERSION_BACKFILL_INSERT, VERSION_BACKFILL_SELECT,
    VERSION_DELETE_SQL, VERSION_INSERT_SQL, VERSION_MIGRATION,
};
use super::sql::{image_values, list_sql, update_sets, SqlValue, IMAGE_COLS, IMAGE_SELECT};
use super::{Catalog, ImageQuery};
use crate::error::{RegistryError, Result};
use crate::model::{
    ImageRecord, MemberRecord, MemberStatus, Project, Role, Status, TokenKind, TokenRecord, User,
};
use async_trait::async_trait;
use rusqlite::types::Value;
use rusqlite::{params, params_from_iter, Connection, OptionalExtension, Row, TransactionBehavior};
use std::path::Path;
use std::sync::{Arc, Mutex};

#[path = "identity_admin_sqlite.rs"]
mod identity_admin_sqlite;
#[path = "import_sqlite.rs"]
mod import_sqlite;
#[path = "metadefs_sqlite.rs"]
mod metadefs_sqlite;
#[path = "tasks_sqlite.rs"]
mod tasks_sqlite;

/// The migration set, in order: (version, SQL).
const MIGRATIONS: [(i64, &str); 9] = [
    (1, include_str!("../../migrations/sqlite/0001_init.sql")),
    (2, include_str!("../../migrations/sqlite/0002_import.sql")),
    (3, include_str!("../../migrations/sqlite/0003_lineage.sql")),
    (
        4,
        include_str!("../../migrations/sqlite/0004_lifecycle.sql"),
    ),
    (5, include_str!("../../migrations/sqlite/0005_signing.sql")),
    (6, include_str!("../../migrations/sqlite/0006_revision.sql")),
    (
        7,
        include_str!("../../migrations/sqlite/0007_family_versions.sql"),
    ),
    (
        8,
        include_str!("../../migrations/sqlite/0008_upload_leases.sql"),
    ),
    (
        9,
        include_str!("../../migrations/sqlite/0009_metadefs_tasks.sql"),
    ),
];

/// How long a writer waits for another process's lock before failing.
const BUSY_TIMEOUT_MS: u32 = 10_000;

/// A catalog in one SQLite file (or in memory, for tests).
#[derive(Clone)]
pub struct SqliteCatalog {
    conn: Arc<Mutex<Connection>>,
}

impl std::fmt::Debug for SqliteCatalog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SqliteCatalog")
    }
}

fn db(what: &'static str) -> impl Fn(rusqlite::Error) -> RegistryError {
    move |e| {
        if let rusqlite::Error::SqliteFailure(f, _) = &e {
            if f.code == rusqlite::ErrorCode::ConstraintViolation {
                return RegistryError::Conflict(format!("{what}: already exists"));
            }
        }
        RegistryError::catalog(what, e)
    }
}

fn uint(v: Option<i64>) -> Option<u64> {
    v.and_then(|v| u64::try_from(v).ok())
}

/// A shared-SQL value as rusqlite takes it.
pub(crate) fn to_sqlite(v: SqlValue) -> Value {
    match v {
        SqlValue::Int(Some(i)) => Value::Integer(i),
        SqlValue::Text(Some(s)) => Value::Text(s),
        SqlValue::Int(None) | SqlValue::Text(None) => Value::Null,
    }
}

fn image_from_row(r: &Row<'_>) -> rusqlite::Result<ImageRecord> {
    let bad = |i: usize, msg: String| {
        rusqlite::Error::FromSqlConversionFailure(i, rusqlite::types::Type::Text, msg.into())
    };
    let status: String = r.get(2)?;
    let visibility: String = r.get(3)?;
    Ok(ImageRecord {
        id: r.get(0)?,
        name: r.get(1)?,
        status: status.parse().map_err(|e| bad(2, e))?,
        visibility: visibility.parse().map_err(|e| bad(3, e))?,
        owner: r.get(4)?,
        disk_format: r.get(5)?,
        container_format: r.get(6)?,
        size: uint(r.get(7)?),
        virtual_size: uint(r.get(8)?),
        checksum: r.get(9)?,
        os_hash_algo: r.get(10)?,
        os_hash_value: r.get(11)?,
        sha256: r.get(12)?,
        min_disk: uint(r.get(13)?).unwrap_or(0),
        min_ram: uint(r.get(14)?).unwrap_or(0),
        protected: r.get(15)?,
        os_hidden: r.get(16)?,
        location: r.get(17)?,
        created_at: r.get(18)?,
        updated_at: r.get(19)?,
        revision: uint(r.get(20)?).unwrap_or(0),
        tags: Vec::new(),
        properties: Default::default(),
    })
}

fn load_extras(c: &Connection, img: &mut ImageRecord) -> rusqlite::Result<()> {
    let mut st = c.prepare_cached("SELECT tag FROM image_tags WHERE image_id = ?1 ORDER BY tag")?;
    img.tags = st
        .query_map([&img.id], |r| r.get(0))?
        .collect::<rusqlite::Result<_>>()?;
    let mut st =
        c.prepare_cached("SELECT name, value FROM image_properties WHERE image_id = ?1")?;
    img.properties = st
        .query_map([&img.id], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<rusqlite::Result<_>>()?;
    Ok(())
}

fn write_extras(c: &Connection, img: &ImageRecord) -> rusqlite::Result<()> {
    c.execute("DELETE FROM image_tags WHERE image_id = ?1", [&img.id])?;
    c.execute(
        "DELETE FROM image_properties WHERE image_id = ?1",
        [&img.id],
    )?;
    let mut st = c.prepare_cached("INSERT INTO image_tags (image_id, tag) VALUES (?1, ?2)")?;
    for t in &img.tags {
        st.execute(params![img.id, t])?;
    }
    let mut st = c.prepare_cached(
        "INSERT INTO image_properties (image_id, name, value) VALUES (?1, ?2, ?3)",
    )?;
    for (k, v) in &img.properties {
        st.execute(params![img.id, k, v])?;
    }
    Ok(())
}

fn member_from_row(r: &Row<'_>) -> rusqlite::Result<MemberRecord> {
    let s: String = r.get(2)?;
    Ok(MemberRecord {
        image_id: r.get(0)?,
        member_id: r.get(1)?,
        status: s.parse::<MemberStatus>().map_err(|e| {
            rusqlite::Error::FromSqlConversionFailure(2, rusqlite::types::Type::Text, e.into())
        })?,
        created_at: r.get(3)?,
        updated_at: r.get(4)?,
    })
}

fn user_from_row(r: &Row<'_>) -> rusqlite::Result<User> {
    Ok(User {
        id: r.get(0)?,
        name: r.get(1)?,
        password_hash: r.get(2)?,
        default_project_id: r.get(3)?,
        enabled: r.get(4)?,
    })
}

fn token_from_row(r: &Row<'_>) -> rusqlite::Result<TokenRecord> {
    let kind: String = r.get(3)?;
    Ok(TokenRecord {
        token_hash: r.get(0)?,
        user_id: r.get(1)?,
        project_id: r.get(2)?,
        kind: if kind == "api" {
            TokenKind::Api
        } else {
            TokenKind::Session
        },
        issued_at: r.get(4)?,
        expires_at: r.get(5)?,
    })
}

impl SqliteCatalog {
    /// Open (creating if needed) the database at `path` and apply pending migrations.
    pub fn open(path: &Path) -> Result<Self> {
        let conn = Connection::open(path).map_err(db("opening the catalog database"))?;
        Self::init(conn)
    }

    /// A private in-memory catalog (tests).
    pub fn in_memory() -> Result<Self> {
        let conn = Connection::open_in_memory().map_err(db("opening an in-memory catalog"))?;
        Self::init(conn)
    }

    fn init(mut conn: Connection) -> Result<Self> {
        conn.busy_timeout(std::time::Duration::from_millis(u64::from(BUSY_TIMEOUT_MS)))
            .map_err(db("setting the busy timeout"))?;
        conn.execute_batch(
            "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL; PRAGMA foreign_keys = ON;",
        )
        .map_err(db("setting pragmas"))?;
        migrate(&mut conn)?;
        Ok(SqliteCatalog {
            conn: Arc::new(Mutex::new(conn)),
        })
    }

    pub(crate) async fn run<T, F>(&self, what: &'static str, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T> + Send + 'static,
    {
        let conn = self.conn.clone();
        tokio::task::spawn_blocking(move || {
            let mut c = conn
                .lock()
                .map_err(|_| RegistryError::catalog(what, "the connection lock is poisoned"))?;
            f(&mut c)
        })
        .await
        .map_err(|e| RegistryError::catalog(what, e))?
    }
}

/// Apply every migration not yet recorded in `schema_migrations`.
fn migrate(conn: &mut Connection) -> Result<()> {
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(db("starting the migration"))?;
    tx.execute_batch(
        "CREATE TABLE IF NOT EXISTS schema_migrations \
         (version INTEGER PRIMARY KEY, applied_at TEXT NOT NULL)",
    )
    .map_err(db("creating schema_migrations"))?;
    for (version, sql) in MIGRATIONS {
        let done: Option<i64> = tx
            .query_row(
                "SELECT version FROM schema_migrations WHERE version = ?1",
                [version],
                |r| r.get(0),
            )
            .optional()
            .map_err(db("reading schema_migrations"))?;
        if done.is_none() {
            tx.execute_batch(sql).map_err(db("applying a migration"))?;
            if version == VERSION_MIGRATION {
                backfill_versions(&tx)?;
            }
            tx.execute(
                "INSERT INTO schema_migrations (version, applied_at) VALUES (?1, ?2)",
                params![version, crate::model::now()],
            )
            .map_err(db("recording a migration"))?;
        }
    }
    tx.commit().map_err(db("committing the migration"))
}

/// Migration 7's Rust part: a `family_versions` row for every image that has a version.
fn backfill_versions(c: &Connection) -> Result<()> {
    let f = db("backfilling family versions");
    let mut st = c.prepare(VERSION_BACKFILL_SELECT).map_err(&f)?;
    let rows: Vec<(String, String, String, String, String)> = st
        .query_map([], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
        })
        .map_err(&f)?
        .collect::<rusqlite::Result<_>>()
        .map_err(&f)?;
    for (id, owner, status, family, version) in rows {
        if let Some((id, owner, family, key)) = backfill_row(id, owner, &status, family, version) {
            c.execute(VERSION_BACKFILL_INSERT, params![id, owner, family, key])
                .map_err(&f)?;
        }
    }
    Ok(())
}

/// Keep `img`'s `family_versions` row in step with it, inside the transaction that writes it;
/// Conflict when another image holds the version.
fn sync_version(c: &Connection, img: &ImageRecord) -> Result<()> {
    let f = db("recording the image's version");
    c.execute(VERSION_DELETE_SQL, [&img.id]).map_err(&f)?;
    if let Some((owner, family, key)) = version_row(img) {
        match c.execute(VERSION_INSERT_SQL, params![img.id, owner, family, key]) {
            Ok(_) => {}
            Err(rusqlite::Error::SqliteFailure(e, _))
                if e.code == rusqlite::ErrorCode::ConstraintViolation =>
            {
                return Err(version_taken(img));
            }
            Err(e) => return Err(f(e)),
        }
    }
    Ok(())
}

#[async_trait]
impl Catalog for SqliteCatalog {
    async fn create_image(&self, image: &ImageRecord) -> Result<()> {
        let img = image.clone();
        self.run("creating an image", move |c| {
            let mut vals = vec![Value::Text(img.id.clone())];
            vals.extend(image_values(&img)?.into_iter().map(to_sqlite));
            let tx = c.transaction().map_err(db("creating an image"))?;
            tx.execute(
                &format!(
                    "INSERT INTO images ({}) VALUES ({})",
                    IMAGE_COLS.replace("i.", ""),
                    vec!["?"; vals.len()].join(", ")
                ),
                params_from_iter(vals),
            )
            .map_err(db("image"))?;
            write_extras(&tx, &img).map_err(db("writing tags and properties"))?;
            sync_version(&tx, &img)?;
            tx.commit().map_err(db("creating an image"))
        })
        .await
    }

    async fn get_image(&self, id: &str) -> Result<Option<ImageRecord>> {
        let id = id.to_string();
        self.run("reading an image", move |c| {
            let f = db("reading an image");
            let img = c
                .query_row(
                    &format!("SELECT {IMAGE_SELECT} FROM images i WHERE i.id = ?1"),
                    [&id],
                    image_from_row,
                )
                .optional()
                .map_err(&f)?;
            match img {
                Some(mut img) => {
                    load_extras(c, &mut img).map_err(&f)?;
                    Ok(Some(img))
                }
                None => Ok(None),
            }
        })
        .await
    }

    async fn list_images(&self, query: &ImageQuery) -> Result<Vec<ImageRecord>> {
        let (sql, p) = list_sql(query)?;
        self.run("listing images", move |c| {
            let f = db("listing images");
            let mut st = c.prepare(&sql).map_err(&f)?;
            let mut imgs: Vec<ImageRecord> = st
                .query_map(
                    params_from_iter(p.into_iter().map(to_sqlite)),
                    image_from_row,
                )
                .map_err(&f)?
                .collect::<rusqlite::Result<_>>()
                .map_err(&f)?;
            for img in &mut imgs {
                load_extras(c, img).map_err(&f)?;
            }
            Ok(imgs)
        })
        .await
    }

    async fn update_image(&self, image: &ImageRecord, expected: Status) -> Result<bool> {
        let img = image.clone();
        self.run("updating an image", move |c| {
            let f = db("updating an image");
            let mut vals: Vec<Value> = image_values(&img)?.into_iter().map(to_sqlite).collect();
            vals.push(Value::Text(img.id.clone()));
            vals.push(Value::Text(expected.as_str().into()));
            vals.push(Value::Integer(
                i64::try_from(img.revision).unwrap_or(i64::MAX),
            ));
            let tx = c.transaction().map_err(&f)?;
            let n = tx
                .execute(
                    &format!(
                        "UPDATE images SET {} WHERE id = ? AND status = ? AND revision = ?",
                        update_sets()
                    ),
                    params_from_iter(vals),
                )
                .map_err(&f)?;
            if n == 0 {
                return Ok(false);
            }
            write_extras(&tx, &img).map_err(&f)?;
            sync_version(&tx, &img)?;
            tx.commit().map_err(&f)?;
            Ok(true)
        })
        .await
    }

    async fn live_locations(&self) -> Result<Vec<String>> {
        self.run("listing image locations", |c| {
            let f = db("listing image locations");
            let mut st = c
                .prepare(
                    "SELECT location FROM images WHERE location IS NOT NULL \
                     AND status != 'deleted'",
                )
                .map_err(&f)?;
            let v = st
                .query_map([], |r| r.get(0))
                .map_err(&f)?
                .collect::<rusqlite::Result<_>>()
                .map_err(&f)?;
            Ok(v)
        })
        .await
    }

    async fn location_in_use(&self, location: &str) -> Result<bool> {
        let location = location.to_string();
        self.run("looking up an image location", move |c| {
            c.query_row(
                "SELECT EXISTS (SELECT 1 FROM images WHERE location = ?1 \
                 AND status != 'deleted')",
                [&location],
                |r| r.get(0),
            )
            .map_err(db("looking up an image location"))
        })
        .await
    }

    async fn add_member(&self, m: &MemberRecord) -> Result<()> {
        let m = m.clone();
        self.run("adding a member", move |c| {
            c.execute(
                "INSERT INTO image_members (image_id, member_id, status, created_at, updated_at) \
                 VALUES (?1, ?2, ?3, ?4, ?5)",
                params![
                    m.image_id,
                    m.member_id,
                    m.status.as_str(),
                    m.created_at,
                    m.updated_at
                ],
            )
            .map_err(db("member"))?;
            Ok(())
        })
        .await
    }

    async fn get_member(&self, image_id: &str, member_id: &str) -> Result<Option<MemberRecord>> {
        let (i, m) = (image_id.to_string(), member_id.to_string());
        self.run("reading a member", move |c| {
            c.query_row(
                "SELECT image_id, member_id, status, created_at, updated_at FROM image_members \
                 WHERE image_id = ?1 AND member_id = ?2",
                [&i, &m],
                member_from_row,
            )
            .optional()
            .map_err(db("reading a member"))
        })
        .await
    }

    async fn list_members(&self, image_id: &str) -> Result<Vec<MemberRecord>> {
        let i = image_id.to_string();
        self.run("listing members", move |c| {
            let f = db("listing members");
            let mut st = c
                .prepare(
                    "SELECT image_id, member_id, status, created_at, updated_at \
                     FROM image_members WHERE image_id = ?1 ORDER BY created_at, member_id",
                )
                .map_err(&f)?;
            let v = st
                .query_map([&i], member_from_row)
                .map_err(&f)?
                .collect::<rusqlite::Result<_>>()
                .map_err(&f)?;
            Ok(v)
        })
        .await
    }

    async fn update_member(&self, m: &MemberRecord) -> Result<bool> {
        let m = m.clone();
        self.run("updating a member", move |c| {
            let n = c
                .execute(
                    "UPDATE image_members SET status = ?1, updated_at = ?2 \
                     WHERE image_id = ?3 AND member_id = ?4",
                    params![m.status.as_str(), m.updated_at, m.image_id, m.member_id],
                )
                .map_err(db("updating a member"))?;
            Ok(n > 0)
        })
        .await
    }

    async fn delete_member(&self, image_id: &str, member_id: &str) -> Result<bool> {
        let (i, m) = (image_id.to_string(), member_id.to_string());
        self.run("deleting a member", move |c| {
            let n = c
                .execute(
                    "DELETE FROM image_members WHERE image_id = ?1 AND member_id = ?2",
                    [&i, &m],
                )
                .map_err(db("deleting a member"))?;
            Ok(n > 0)
        })
        .await
    }

    async fn create_project(&self, p: &Project) -> Result<()> {
        let p = p.clone();
        self.run("creating a project", move |c| {
            c.execute(
                "INSERT INTO projects (id, name) VALUES (?1, ?2)",
                [&p.id, &p.name],
            )
            .map_err(db("project"))?;
            Ok(())
        })
        .await
    }

    async fn get_project(&self, id: &str) -> Result<Option<Project>> {
        let id = id.to_string();
        self.run("reading a project", move |c| {
            c.query_row("SELECT id, name FROM projects WHERE id = ?1", [&id], |r| {
                Ok(Project {
                    id: r.get(0)?,
                    name: r.get(1)?,
                })
            })
            .optional()
            .map_err(db("reading a project"))
        })
        .await
    }

    async fn find_project(&self, name: &str) -> Result<Option<Project>> {
        let name = name.to_string();
        self.run("finding a project", move |c| {
            c.query_row(
                "SELECT id, name FROM projects WHERE name = ?1",
                [&name],
                |r| {
                    Ok(Project {
                        id: r.get(0)?,
                        name: r.get(1)?,
                    })
                },
            )
            .optional()
            .map_err(db("finding a project"))
        })
        .await
    }

    async fn list_projects(&self) -> Result<Vec<Project>> {
        self.run("listing projects", |c| {
            let f = db("listing projects");
            let mut st = c
                .prepare("SELECT id, name FROM projects ORDER BY name")
                .map_err(&f)?;
            let v = st
                .query_map([], |r| {
                    Ok(Project {
                        id: r.get(0)?,
                        name: r.get(1)?,
                    })
                })
                .map_err(&f)?
                .collect::<rusqlite::Result<_>>()
                .map_err(&f)?;
            Ok(v)
        })
        .await
    }

    async fn create_user(&self, u: &User) -> Result<()> {
        let u = u.clone();
        self.run("creating a user", move |c| {
            c.execute(
                "INSERT INTO users (id, name, password_hash, default_project_id, enabled) \
                 VALUES (?1, ?2, ?3, ?4, ?5)",
                params![
                    u.id,
                    u.name,
                    u.password_hash,
                    u.default_project_id,
                    u.enabled
                ],
            )
            .map_err(db("user"))?;
            Ok(())
        })
        .await
    }

    async fn get_user(&self, id: &str) -> Result<Option<User>> {
        let id = id.to_string();
        self.run("reading a user", move |c| {
            c.query_row(
                "SELECT id, name, password_hash, default_project_id, enabled FROM users \
                 WHERE id = ?1",
                [&id],
                user_from_row,
            )
            .optional()
            .map_err(db("reading a user"))
        })
        .await
    }

    async fn find_user(&self, name: &str) -> Result<Option<User>> {
        let name = name.to_string();
        self.run("finding a user", move |c| {
            c.query_row(
                "SELECT id, name, password_hash, default_project_id, enabled FROM users \
                 WHERE name = ?1",
                [&name],
                user_from_row,
            )
            .optional()
            .map_err(db("finding a user"))
        })
        .await
    }

    async fn assign_role(&self, user_id: &str, project_id: &str, role: Role) -> Result<()> {
        let (u, p) = (user_id.to_string(), project_id.to_string());
        self.run("assigning a role", move |c| {
            c.execute(
                "INSERT OR IGNORE INTO role_assignments (user_id, project_id, role) \
                 VALUES (?1, ?2, ?3)",
                params![u, p, role.as_str()],
            )
            .map_err(db("assigning a role"))?;
            Ok(())
        })
        .await
    }

    async fn roles(&self, user_id: &str, project_id: &str) -> Result<Vec<Role>> {
        let (u, p) = (user_id.to_string(), project_id.to_string());
        self.run("reading roles", move |c| {
            let f = db("reading roles");
            let mut st = c
                .prepare_cached(
                    "SELECT role FROM role_assignments WHERE user_id = ?1 AND project_id = ?2",
                )
                .map_err(&f)?;
            let names: Vec<String> = st
                .query_map([&u, &p], |r| r.get(0))
                .map_err(&f)?
                .collect::<rusqlite::Result<_>>()
                .map_err(&f)?;
            Ok(names.iter().filter_map(|n| n.parse().ok()).collect())
        })
        .await
    }

    async fn create_token(&self, t: &TokenRecord) -> Result<()> {
        let t = t.clone();
        self.run("storing a token", move |c| {
            c.execute(
                "INSERT INTO tokens (token_hash, user_id, project_id, kind, issued_at, expires_at) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![
                    t.token_hash,
                    t.user_id,
                    t.project_id,
                    t.kind.as_str(),
                    t.issued_at,
                    t.expires_at
                ],
            )
            .map_err(db("token"))?;
            Ok(())
        })
        .await
    }

    async fn get_token(&self, token_hash: &str) -> Result<Option<TokenRecord>> {
        let h = token_hash.to_string();
        self.run("reading a token", move |c| {
            c.prepare_cached(
                "SELECT token_hash, user_id, project_id, kind, issued_at, expires_at \
                 FROM tokens WHERE token_hash = ?1",
            )
            .and_then(|mut st| st.query_row([&h], token_from_row).optional())
            .map_err(db("reading a token"))
        })
        .await
    }

    async fn delete_token(&self, token_hash: &str) -> Result<bool> {
        let h = token_hash.to_string();
        self.run("revoking a token", move |c| {
            let n = c
                .execute("DELETE FROM tokens WHERE token_hash = ?1", [&h])
                .map_err(db("revoking a token"))?;
            Ok(n > 0)
        })
        .await
    }

    async fn delete_expired_tokens(&self, now: &str) -> Result<u64> {
        let now = now.to_string();
        self.run("removing expired tokens", move |c| {
            let n = c
                .execute(
                    "DELETE FROM tokens WHERE expires_at IS NOT NULL AND expires_at < ?1",
                    [&now],
                )
                .map_err(db("removing expired tokens"))?;
            Ok(n as u64)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::{SortKey, Viewer};

    fn image(id: &str, owner: &str, name: &str, created: &str) -> ImageRecord {
        let mut i = ImageRecord::new(id.into(), owner.into(), created.into());
        i.name = Some(name.into());
        i
    }

    #[tokio::test]
    async fn migrations_apply_once_and_reopen_cleanly() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.db");
        SqliteCatalog::open(&p).unwrap();
        SqliteCatalog::open(&p).unwrap();
    }

    /// A database written before migration 7 gets a `family_versions` row for each versioned
    /// image; of two images that already share a version (possible before 7), the older keeps it.
    #[test]
    fn migration_7_backfills_family_versions() {
        let mut conn = Connection::open_in_memory().unwrap();
        for (_, sql) in &MIGRATIONS[..6] {
            conn.execute_batch(sql).unwrap();
        }
        conn.execute_batch(
            "CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, applied_at TEXT NOT NULL);
             INSERT INTO schema_migrations VALUES (1,'t'),(2,'t'),(3,'t'),(4,'t'),(5,'t'),(6,'t');",
        )
        .unwrap();
        let rows = [
            (
                "old",
                "p",
                "active",
                "2020-01-01T00:00:00Z",
                Some("2024.06.01"),
            ),
            (
                "new",
                "p",
                "active",
                "2021-01-01T00:00:00Z",
                Some("20240601"),
            ),
            (
                "gone",
                "p",
                "deleted",
                "2019-01-01T00:00:00Z",
                Some("9.9.9"),
            ),
            (
                "bad",
                "p",
                "queued",
                "2019-01-01T00:00:00Z",
                Some("not-a-version"),
            ),
            ("plain", "p", "queued", "2019-01-01T00:00:00Z", None),
        ];
        for (id, owner, status, created, version) in rows {
            let mut img = image(id, owner, id, created);
            img.status = status.parse().unwrap();
            let mut vals = vec![Value::Text(img.id.clone())];
            vals.extend(image_values(&img).unwrap().into_iter().map(to_sqlite));
            conn.execute(
                &format!(
                    "INSERT INTO images ({}) VALUES ({})",
                    IMAGE_COLS.replace("i.", ""),
                    vec!["?"; vals.len()].join(", ")
                ),
                params_from_iter(vals),
            )
            .unwrap();
            conn.execute(
                "INSERT INTO image_properties VALUES (?1, 'family', 'os')",
                [id],
            )
            .unwrap();
            if let Some(v) = version {
                conn.execute(
                    "INSERT INTO image_properties VALUES (?1, 'version', ?2)",
                    [id, v],
                )
                .unwrap();
            }
        }
        migrate(&mut conn).unwrap();
        let mut st = conn
            .prepare("SELECT image_id, version_key FROM family_versions ORDER BY image_id")
            .unwrap();
        let got: Vec<(String, String)> = st
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap();
        assert_eq!(got, [("old".to_string(), "2024.6.1".to_string())]);
    }

    #[tokio::test]
    async fn update_is_a_compare_and_swap_on_status() {
        let c = SqliteCatalog::in_memory().unwrap();
        let mut i = image("a", "p", "x", "2020-01-01T00:00:00Z");
        c.create_image(&i).await.unwrap();
        i.status = Status::Saving;
        assert!(c.update_image(&i, Status::Queued).await.unwrap());
        assert!(!c.update_image(&i, Status::Queued).await.unwrap());
        assert_eq!(
            c.get_image("a").await.unwrap().unwrap().status,
            Status::Saving
        );
    }

    #[tokio::test]
    async fn expired_session_tokens_are_removed_and_api_tokens_kept() {
        let c = SqliteCatalog::in_memory().unwrap();
        c.create_project(&Project {
            id: "p".into(),
            name: "p".into(),
        })
        .await
        .unwrap();
        c.create_user(&User {
            id: "u".into(),
            name: "u".into(),
            password_hash: None,
            default_project_id: None,
            enabled: true,
        })
        .await
        .unwrap();
        for (h, kind, exp) in [
            (
                "old",
                TokenKind::Session,
                Some("2000-01-01T00:00:00.000000Z"),
            ),
            (
                "new",
                TokenKind::Session,
                Some("2999-01-01T00:00:00.000000Z"),
            ),
            ("api", TokenKind::Api, None),
        ] {
            c.create_token(&TokenRecord {
                token_hash: h.into(),
                user_id: "u".into(),
                project_id: "p".into(),
                kind,
                issued_at: "t".into(),
                expires_at: exp.map(str::to_string),
            })
            .await
            .unwrap();
        }
        let n = c
            .delete_expired_tokens("2026-01-01T00:00:00.000000Z")
            .await
            .unwrap();
        assert_eq!(n, 1);
        assert!(c.get_token("old").await.unwrap().is_none());
        assert!(c.get_token("new").await.unwrap().is_some());
        assert!(c.get_token("api").await.unwrap().is_some());
    }

    #[tokio::test]
    async fn duplicate_ids_conflict() {
        let c = SqliteCatalog::in_memory().unwrap();
        let i = image("a", "p", "x", "2020-01-01T00:00:00Z");
        c.create_image(&i).await.unwrap();
        assert!(matches!(
            c.create_image(&i).await,
            Err(RegistryError::Conflict(_))
        ));
    }

    #[tokio::test]
    async fn keyset_pagination_walks_every_image_once_in_order() {
        let c = SqliteCatalog::in_memory().unwrap();
        for n in 0..7 {
            let mut i = image(&format!("id{n}"), "p", &format!("n{}", n % 3), "2020");
            i.tags = vec!["t".into()];
            c.create_image(&i).await.unwrap();
        }
        let mut q = ImageQuery::new(Viewer::Project("p".into()));
        q.sort = vec![(SortKey::Name, true)];
        q.limit = 3;
        let mut seen = Vec::new();
        loop {
            let page = c.list_images(&q).await.unwrap();
            if page.is_empty() {
                break;
            }
            seen.extend(page.iter().map(|i| i.id.clone()));
            q.marker = page.last().cloned();
        }
        assert_eq!(seen, ["id0", "id3", "id6", "id1", "id4", "id2", "id5"]);
    }
}
