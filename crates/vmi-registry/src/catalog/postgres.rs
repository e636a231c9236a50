//! The PostgreSQL catalog backend, for several service processes sharing one database.
//!
//! It runs the same SQL as [`super::sqlite`] (see [`super::sql`]) with numbered placeholders.
//! Migrations in `migrations/postgres/` run at start inside a transaction holding an advisory
//! lock, so nodes starting together apply each migration once. Concurrent writers to one image
//! are serialised by the compare-and-swap `UPDATE … WHERE id = $n AND status = $m`.
//!
//! Requests share a pool of connections (deadpool-postgres; `pool_size=N` in the URL, default
//! [`DEFAULT_POOL_SIZE`]); a connection found closed is replaced. Connections use TLS (rustls)
//! as libpq's `sslmode` and `sslrootcert` in the URL ask: see [`super::postgres_tls`].

use super::lineage::{
    backfill_row, version_row, version_taken, VERSION_BACKFILL_INSERT, VERSION_BACKFILL_SELECT,
    VERSION_DELETE_SQL, VERSION_INSERT_SQL, VERSION_MIGRATION,
};
use super::sql::{
    image_values, list_sql, numbered, update_sets, SqlValue, IMAGE_COLS, IMAGE_SELECT,
};
use super::{Catalog, ImageQuery};
use crate::error::{RegistryError, Result};
use crate::model::{
    ImageRecord, MemberRecord, MemberStatus, Project, Role, Status, TokenKind, TokenRecord, User,
};
use async_trait::async_trait;
use deadpool_postgres::{Manager, ManagerConfig, Object, Pool, RecyclingMethod};
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, GenericClient, Row};

pub use super::postgres_tls::DEFAULT_POOL_SIZE;
use super::postgres_tls::{ConnectOptions, PgTls};

#[path = "identity_admin_postgres.rs"]
mod identity_admin_postgres;
#[path = "import_postgres.rs"]
mod import_postgres;
#[path = "metadefs_postgres.rs"]
mod metadefs_postgres;
#[path = "tasks_postgres.rs"]
mod tasks_postgres;

/// The migration set, in order: (version, SQL).
const MIGRATIONS: [(i64, &str); 9] = [
    (1, include_str!("../../migrations/postgres/0001_init.sql")),
    (2, include_str!("../../migrations/postgres/0002_import.sql")),
    (
        3,
        include_str!("../../migrations/postgres/0003_lineage.sql"),
    ),
    (
        4,
        include_str!("../../migrations/postgres/0004_lifecycle.sql"),
    ),
    (
        5,
        include_str!("../../migrations/postgres/0005_signing.sql"),
    ),
    (
        6,
        include_str!("../../migrations/postgres/0006_revision.sql"),
    ),
    (
        7,
        include_str!("../../migrations/postgres/0007_family_versions.sql"),
    ),
    (
        8,
        include_str!("../../migrations/postgres/0008_upload_leases.sql"),
    ),
    (
        9,
        include_str!("../../migrations/postgres/0009_metadefs_tasks.sql"),
    ),
];

/// Advisory lock key held while migrating ("vmireg" in ASCII).
const MIGRATION_LOCK: i64 = 0x766d_6972_6567;

/// A catalog in a PostgreSQL database.
pub struct PostgresCatalog {
    pool: Pool,
}

impl std::fmt::Debug for PostgresCatalog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PostgresCatalog")
    }
}

pub(crate) fn db(what: &'static str) -> impl Fn(tokio_postgres::Error) -> RegistryError {
    move |e| {
        if e.code() == Some(&SqlState::UNIQUE_VIOLATION) {
            return RegistryError::Conflict(format!("{what}: already exists"));
        }
        RegistryError::catalog(what, e)
    }
}

/// A boxed query parameter.
pub(crate) type Param = Box<dyn ToSql + Sync + Send>;

/// Query parameters from shared-SQL values.
pub(crate) fn params(vals: Vec<SqlValue>) -> Vec<Param> {
    vals.into_iter()
        .map(|v| -> Param {
            match v {
                SqlValue::Int(i) => Box::new(i),
                SqlValue::Text(s) => Box::new(s),
            }
        })
        .collect()
}

/// The parameters as tokio-postgres takes them.
pub(crate) fn refs(p: &[Param]) -> Vec<&(dyn ToSql + Sync)> {
    p.iter()
        .map(|b| b.as_ref() as &(dyn ToSql + Sync))
        .collect()
}

fn uint(v: Option<i64>) -> Option<u64> {
    v.and_then(|v| u64::try_from(v).ok())
}

fn image_from_row(r: &Row) -> Result<ImageRecord> {
    let bad = |e: String| RegistryError::catalog("reading an image row", e);
    let get_i =
        |i: usize| -> Result<Option<i64>> { r.try_get(i).map_err(db("reading an image row")) };
    let get_s =
        |i: usize| -> Result<Option<String>> { r.try_get(i).map_err(db("reading an image row")) };
    let req_s = |i: usize| -> Result<String> {
        get_s(i)?.ok_or_else(|| bad(format!("column {i} is NULL")))
    };
    Ok(ImageRecord {
        id: req_s(0)?,
        name: get_s(1)?,
        status: req_s(2)?.parse().map_err(bad)?,
        visibility: req_s(3)?.parse().map_err(bad)?,
        owner: req_s(4)?,
        disk_format: get_s(5)?,
        container_format: get_s(6)?,
        size: uint(get_i(7)?),
        virtual_size: uint(get_i(8)?),
        checksum: get_s(9)?,
        os_hash_algo: get_s(10)?,
        os_hash_value: get_s(11)?,
        sha256: get_s(12)?,
        min_disk: uint(get_i(13)?).unwrap_or(0),
        min_ram: uint(get_i(14)?).unwrap_or(0),
        protected: get_i(15)?.unwrap_or(0) != 0,
        os_hidden: get_i(16)?.unwrap_or(0) != 0,
        location: get_s(17)?,
        created_at: req_s(18)?,
        updated_at: req_s(19)?,
        revision: uint(get_i(20)?).unwrap_or(0),
        tags: Vec::new(),
        properties: Default::default(),
    })
}

async fn load_extras<C: GenericClient>(c: &C, img: &mut ImageRecord) -> Result<()> {
    let f = db("reading tags and properties");
    img.tags = c
        .query(
            "SELECT tag FROM image_tags WHERE image_id = $1 ORDER BY tag",
            &[&img.id],
        )
        .await
        .map_err(&f)?
        .iter()
        .map(|r| r.try_get(0))
        .collect::<std::result::Result<_, _>>()
        .map_err(&f)?;
    img.properties = c
        .query(
            "SELECT name, value FROM image_properties WHERE image_id = $1",
            &[&img.id],
        )
        .await
        .map_err(&f)?
        .iter()
        .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
        .collect::<std::result::Result<_, tokio_postgres::Error>>()
        .map_err(&f)?;
    Ok(())
}

/// Migration 7's Rust part: a `family_versions` row for every image that has a version.
async fn backfill_versions<C: GenericClient>(c: &C) -> Result<()> {
    let f = db("backfilling family versions");
    let rows = c.query(VERSION_BACKFILL_SELECT, &[]).await.map_err(&f)?;
    let insert = numbered(VERSION_BACKFILL_INSERT);
    for r in rows {
        let get = |i: usize| -> Result<String> { r.try_get(i).map_err(&f) };
        if let Some((id, owner, family, key)) =
            backfill_row(get(0)?, get(1)?, &get(2)?, get(3)?, get(4)?)
        {
            c.execute(&insert, &[&id, &owner, &family, &key])
                .await
                .map_err(&f)?;
        }
    }
    Ok(())
}

/// Keep `img`'s `family_versions` row in step with it, inside the transaction that writes it;
/// Conflict when another image holds the version.
async fn sync_version<C: GenericClient>(c: &C, img: &ImageRecord) -> Result<()> {
    let f = db("recording the image's version");
    c.execute(&numbered(VERSION_DELETE_SQL), &[&img.id])
        .await
        .map_err(&f)?;
    if let Some((owner, family, key)) = version_row(img) {
        if let Err(e) = c
            .execute(
                &numbered(VERSION_INSERT_SQL),
                &[&img.id, &owner, &family, &key],
            )
            .await
        {
            if e.code() == Some(&SqlState::UNIQUE_VIOLATION) {
                return Err(version_taken(img));
            }
            return Err(f(e));
        }
    }
    Ok(())
}

async fn write_extras<C: GenericClient>(c: &C, img: &ImageRecord) -> Result<()> {
    let f = db("writing tags and properties");
    c.execute("DELETE FROM image_tags WHERE image_id = $1", &[&img.id])
        .await
        .map_err(&f)?;
    c.execute(
        "DELETE FROM image_properties WHERE image_id = $1",
        &[&img.id],
    )
    .await
    .map_err(&f)?;
    for t in &img.tags {
        c.execute(
            "INSERT INTO image_tags (image_id, tag) VALUES ($1, $2)",
            &[&img.id, t],
        )
        .await
        .map_err(&f)?;
    }
    for (k, v) in &img.properties {
        c.execute(
            "INSERT INTO image_properties (image_id, name, value) VALUES ($1, $2, $3)",
            &[&img.id, k, v],
        )
        .await
        .map_err(&f)?;
    }
    Ok(())
}

fn member_from_row(r: &Row) -> Result<MemberRecord> {
    let f = db("reading a member row");
    let status: String = r.try_get(2).map_err(&f)?;
    Ok(MemberRecord {
        image_id: r.try_get(0).map_err(&f)?,
        member_id: r.try_get(1).map_err(&f)?,
        status: status
            .parse::<MemberStatus>()
            .map_err(|e| RegistryError::catalog("reading a member row", e))?,
        created_at: r.try_get(3).map_err(&f)?,
        updated_at: r.try_get(4).map_err(&f)?,
    })
}

fn user_from_row(r: &Row) -> Result<User> {
    let f = db("reading a user row");
    let enabled: i64 = r.try_get(4).map_err(&f)?;
    Ok(User {
        id: r.try_get(0).map_err(&f)?,
        name: r.try_get(1).map_err(&f)?,
        password_hash: r.try_get(2).map_err(&f)?,
        default_project_id: r.try_get(3).map_err(&f)?,
        enabled: enabled != 0,
    })
}

fn project_from_row(r: &Row) -> Result<Project> {
    let f = db("reading a project row");
    Ok(Project {
        id: r.try_get(0).map_err(&f)?,
        name: r.try_get(1).map_err(&f)?,
    })
}

fn token_from_row(r: &Row) -> Result<TokenRecord> {
    let f = db("reading a token row");
    let kind: String = r.try_get(3).map_err(&f)?;
    Ok(TokenRecord {
        token_hash: r.try_get(0).map_err(&f)?,
        user_id: r.try_get(1).map_err(&f)?,
        project_id: r.try_get(2).map_err(&f)?,
        kind: if kind == "api" {
            TokenKind::Api
        } else {
            TokenKind::Session
        },
        issued_at: r.try_get(4).map_err(&f)?,
        expires_at: r.try_get(5).map_err(&f)?,
    })
}

impl PostgresCatalog {
    /// Connect to `url` (`postgres://user:password@host:port/db?sslmode=…` or key=value form)
    /// and apply pending migrations.
    pub async fn connect(url: &str) -> Result<Self> {
        let opts = ConnectOptions::parse(url)?;
        let tls = PgTls::new(&opts)?;
        let manager = Manager::from_config(
            opts.pg.clone(),
            tls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(opts.pool_size)
            .build()
            .map_err(|e| RegistryError::catalog("creating the connection pool", e))?;
        let catalog = PostgresCatalog { pool };
        let mut conn = catalog.conn().await?;
        migrate(&mut conn).await?;
        Ok(catalog)
    }

    /// The pool's size limit.
    pub fn pool_size(&self) -> usize {
        self.pool.status().max_size
    }

    /// A connection from the pool (waits while every connection is in use).
    pub(crate) async fn conn(&self) -> Result<Object> {
        self.pool.get().await.map_err(|e| match e {
            deadpool_postgres::PoolError::Backend(e) => db("connecting to PostgreSQL")(e),
            other => RegistryError::catalog("connecting to PostgreSQL", other),
        })
    }
}

/// Apply pending migrations, holding the advisory lock so that nodes starting together apply
/// each one once.
async fn migrate(client: &mut Client) -> Result<()> {
    let tx = client
        .transaction()
        .await
        .map_err(db("starting the migration"))?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await
        .map_err(db("locking for migration"))?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations \
         (version BIGINT PRIMARY KEY, applied_at TEXT NOT NULL)",
    )
    .await
    .map_err(db("creating schema_migrations"))?;
    for (version, sql) in MIGRATIONS {
        let done = tx
            .query_opt(
                "SELECT version FROM schema_migrations WHERE version = $1",
                &[&version],
            )
            .await
            .map_err(db("reading schema_migrations"))?;
        if done.is_none() {
            tx.batch_execute(sql)
                .await
                .map_err(db("applying a migration"))?;
            if version == VERSION_MIGRATION {
                backfill_versions(&tx).await?;
            }
            tx.execute(
                "INSERT INTO schema_migrations (version, applied_at) VALUES ($1, $2)",
                &[&version, &crate::model::now()],
            )
            .await
            .map_err(db("recording a migration"))?;
        }
    }
    tx.commit().await.map_err(db("committing the migration"))
}

#[async_trait]
impl Catalog for PostgresCatalog {
    async fn create_image(&self, image: &ImageRecord) -> Result<()> {
        let mut vals = vec![SqlValue::Text(Some(image.id.clone()))];
        vals.extend(image_values(image)?);
        let marks: Vec<String> = (1..=vals.len()).map(|i| format!("${i}")).collect();
        let p = params(vals);
        let mut conn = self.conn().await?;
        let c: &mut Client = &mut conn;
        let tx = c.transaction().await.map_err(db("creating an image"))?;
        tx.execute(
            &format!(
                "INSERT INTO images ({}) VALUES ({})",
                IMAGE_COLS.replace("i.", ""),
                marks.join(", ")
            ),
            &refs(&p),
        )
        .await
        .map_err(db("image"))?;
        write_extras(&tx, image).await?;
        sync_version(&tx, image).await?;
        tx.commit().await.map_err(db("creating an image"))
    }

    async fn get_image(&self, id: &str) -> Result<Option<ImageRecord>> {
        let conn = self.conn().await?;
        let c: &Client = &conn;
        let row = c
            .query_opt(
                &format!("SELECT {IMAGE_SELECT} FROM images i WHERE i.id = $1"),
                &[&id],
            )
            .await
            .map_err(db("reading an image"))?;
        match row {
            Some(r) => {
                let mut img = image_from_row(&r)?;
                load_extras(c, &mut img).await?;
                Ok(Some(img))
            }
            None => Ok(None),
        }
    }

    async fn list_images(&self, query: &ImageQuery) -> Result<Vec<ImageRecord>> {
        let (sql, vals) = list_sql(query)?;
        let p = params(vals);
        let conn = self.conn().await?;
        let c: &Client = &conn;
        let rows = c
            .query(&numbered(&sql), &refs(&p))
            .await
            .map_err(db("listing images"))?;
        let mut out = Vec::with_capacity(rows.len());
        for r in &rows {
            let mut img = image_from_row(r)?;
            load_extras(c, &mut img).await?;
            out.push(img);
        }
        Ok(out)
    }

    async fn update_image(&self, image: &ImageRecord, expected: Status) -> Result<bool> {
        let mut vals = image_values(image)?;
        vals.push(SqlValue::Text(Some(image.id.clone())));
        vals.push(SqlValue::Text(Some(expected.as_str().into())));
        vals.push(SqlValue::Int(Some(
            i64::try_from(image.revision).unwrap_or(i64::MAX),
        )));
        let sql = numbered(&format!(
            "UPDATE images SET {} WHERE id = ? AND status = ? AND revision = ?",
            update_sets()
        ));
        let p = params(vals);
        let mut conn = self.conn().await?;
        let c: &mut Client = &mut conn;
        let tx = c.transaction().await.map_err(db("updating an image"))?;
        let n = tx
            .execute(&sql, &refs(&p))
            .await
            .map_err(db("updating an image"))?;
        if n == 0 {
            return Ok(false);
        }
        write_extras(&tx, image).await?;
        sync_version(&tx, image).await?;
        tx.commit().await.map_err(db("updating an image"))?;
        Ok(true)
    }

    async fn live_locations(&self) -> Result<Vec<String>> {
        let conn = self.conn().await?;
        let c: &Client = &conn;
        let rows = c
            .query(
                "SELECT location FROM images WHERE location IS NOT NULL \
                 AND status != 'deleted'",
                &[],
            )
            .await
            .map_err(db("listing image locations"))?;
        rows.iter()
            .map(|r| r.try_get(0).map_err(db("listing image locations")))
            .collect()
    }

    async fn location_in_use(&self, location: &str) -> Result<bool> {
        let conn = self.conn().await?;
        let c: &Client = &conn;
        let row = c
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM images WHERE location = $1 \
                 AND status != 'deleted')",
                &[&location],
            )
            .await
            .map_err(db("looking up an image location"))?;
        row.try_get(0).map_err(db("looking up an image location"))
    }

    async fn add_member(&self, m: &MemberRecord) -> Result<()> {
        let conn = self.conn().await?;
        let c: &Client = &conn;
        c.execute(
            "INSERT INTO image_members (image_id, member_id, status, created_at, updated_at) \
             VALUES ($1, $2, $3, $4, $5)",
            &[
                &m.image_id,
                &m.member_id,
                &m.status.as_str(),
                &m.created_at,
                &m.updated_at,
            ],
        )
        .await
        .map_err(db("member"))?;
        Ok(())
    }

    async fn get_member(&self, image_id: &str, member_id: &str) -> Result<Option<MemberRecord>> {
        let conn = self.conn().await?;
        let c: &Client = &conn;
        c.query_opt(
            "SELECT image_id, member_id, status, created_at, updated_at FROM image_members \
             WHERE image_id = $1 AND member_id = $2",
            &[&image_id, &member_id],
        )
        .await
        .map_err(db("reading a member"))?
        .map(|r| member_from_row(&r))
        .transpose()
    }

    async fn list_members(&self, image_id: &str) -> Result<Vec<MemberRecord>> {
        let conn = self.conn().await?;
        let c: &Client = &conn;
        c.query(
            "SELECT image_id, member_id, status, created_at, updated_at FROM image_members \
             WHERE image_id = $1 ORDER BY created_at, member_id",
            &[&image_id],
        )
        .await
        .map_err(db("listing members"))?
        .iter()
        .map(member_from_row)
        .collect()
    }

    async fn update_member(&self, m: &MemberRecord) -> Result<bool> {
        let conn = self.conn().await?;
        let c: &Client = &conn;
        let n = c
            .execute(
                "UPDATE image_members SET status = $1, updated_at = $2 \
                 WHERE image_id = $3 AND member_id = $4",
                &[&m.status.as_str(), &m.updated_at, &m.image_id, &m.member_id],
            )
            .await
            .map_err(db("updating a member"))?;
        Ok(n > 0)
    }

    async fn delete_member(&self, image_id: &str, member_id: &str) -> Result<bool> {
        let conn = self.conn().await?;
        let c: &Client = &conn;
        let n = c
            .execute(
                "DELETE FROM image_members WHERE image_id = $1 AND member_id = $2",
                &[&image_id, &member_id],
            )
            .await
            .map_err(db("deleting a member"))?;
        Ok(n > 0)
    }

    async fn create_project(&self, p: &Project) -> Result<()> {
        let conn = self.conn().await?;
        let c: &Client = &conn;
        c.execute(
            "INSERT INTO projects (id, name) VALUES ($1, $2)",
            &[&p.id, &p.name],
        )
        .await
        .map_err(db("project"))?;
        Ok(())
    }

    async fn get_project(&self, id: &str) -> Result<Option<Project>> {
        let conn = self.conn().await?;
        let c: &Client = &conn;
        c.query_opt("SELECT id, name FROM projects WHERE id = $1", &[&id])
            .await
            .map_err(db("reading a project"))?
            .map(|r| project_from_row(&r))
            .transpose()
    }

    async fn find_project(&self, name: &str) -> Result<Option<Project>> {
        let conn = self.conn().await?;
        let c: &Client = &conn;
        c.query_opt("SELECT id, name FROM projects WHERE name = $1", &[&name])
            .await
            .map_err(db("finding a project"))?
            .map(|r| project_from_row(&r))
            .transpose()
    }

    async fn list_projects(&self) -> Result<Vec<Project>> {
        let conn = self.conn().await?;
        let c: &Client = &conn;
        c.query("SELECT id, name FROM projects ORDER BY name", &[])
            .await
            .map_err(db("listing projects"))?
            .iter()
            .map(project_from_row)
            .collect()
    }

    async fn create_user(&self, u: &User) -> Result<()> {
        let conn = self.conn().await?;
        let c: &Client = &conn;
        c.execute(
            "INSERT INTO users (id, name, password_hash, default_project_id, enabled) \
             VALUES ($1, $2, $3, $4, $5)",
            &[
                &u.id,
                &u.name,
                &u.password_hash,
                &u.default_project_id,
                &i64::from(u.enabled),
            ],
        )
        .await
        .map_err(db("user"))?;
        Ok(())
    }

    async fn get_user(&self, id: &str) -> Result<Option<User>> {
        let conn = self.conn().await?;
        let c: &Client = &conn;
        c.query_opt(
            "SELECT id, name, password_hash, default_project_id, enabled FROM users \
             WHERE id = $1",
            &[&id],
        )
        .await
        .map_err(db("reading a user"))?
        .map(|r| user_from_row(&r))
        .transpose()
    }

    async fn find_user(&self, name: &str) -> Result<Option<User>> {
        let conn = self.conn().await?;
        let c: &Client = &conn;
        c.query_opt(
            "SELECT id, name, password_hash, default_project_id, enabled FROM users \
             WHERE name = $1",
            &[&name],
        )
        .await
        .map_err(db("finding a user"))?
        .map(|r| user_from_row(&r))
        .transpose()
    }

    async fn assign_role(&self, user_id: &str, project_id: &str, role: Role) -> Result<()> {
        let conn = self.conn().await?;
        let c: &Client = &conn;
        c.execute(
            "INSERT INTO role_assignments (user_id, project_id, role) VALUES ($1, $2, $3) \
             ON CONFLICT DO NOTHING",
            &[&user_id, &project_id, &role.as_str()],
        )
        .await
        .map_err(db("assigning a role"))?;
        Ok(())
    }

    async fn roles(&self, user_id: &str, project_id: &str) -> Result<Vec<Role>> {
        let conn = self.conn().await?;
        let c: &Client = &conn;
        let rows = c
            .query(
                "SELECT role FROM role_assignments WHERE user_id = $1 AND project_id = $2",
                &[&user_id, &project_id],
            )
            .await
            .map_err(db("reading roles"))?;
        let mut roles = Vec::new();
        for r in rows {
            let name: String = r.try_get(0).map_err(db("reading roles"))?;
            if let Ok(role) = name.parse() {
                roles.push(role);
            }
        }
        Ok(roles)
    }

    async fn create_token(&self, t: &TokenRecord) -> Result<()> {
        let conn = self.conn().await?;
        let c: &Client = &conn;
        c.execute(
            "INSERT INTO tokens (token_hash, user_id, project_id, kind, issued_at, expires_at) \
             VALUES ($1, $2, $3, $4, $5, $6)",
            &[
                &t.token_hash,
                &t.user_id,
                &t.project_id,
                &t.kind.as_str(),
                &t.issued_at,
                &t.expires_at,
            ],
        )
        .await
        .map_err(db("token"))?;
        Ok(())
    }

    async fn get_token(&self, token_hash: &str) -> Result<Option<TokenRecord>> {
        let conn = self.conn().await?;
        let c: &Client = &conn;
        c.query_opt(
            "SELECT token_hash, user_id, project_id, kind, issued_at, expires_at \
             FROM tokens WHERE token_hash = $1",
            &[&token_hash],
        )
        .await
        .map_err(db("reading a token"))?
        .map(|r| token_from_row(&r))
        .transpose()
    }

    async fn delete_token(&self, token_hash: &str) -> Result<bool> {
        let conn = self.conn().await?;
        let c: &Client = &conn;
        let n = c
            .execute("DELETE FROM tokens WHERE token_hash = $1", &[&token_hash])
            .await
            .map_err(db("revoking a token"))?;
        Ok(n > 0)
    }

    async fn delete_expired_tokens(&self, now: &str) -> Result<u64> {
        let conn = self.conn().await?;
        let c: &Client = &conn;
        c.execute(
            "DELETE FROM tokens WHERE expires_at IS NOT NULL AND expires_at < $1",
            &[&now],
        )
        .await
        .map_err(db("removing expired tokens"))
    }
}
