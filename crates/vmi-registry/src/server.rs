//! Assembling the service: configuration → catalog + image data → HTTP router, the bootstrap
//! administrator, and the reaper for unreferenced data.

use crate::auth::{hash_token, new_password};
use crate::catalog::sqlite::SqliteCatalog;
use crate::catalog::{Catalog, Cmp, Field, Filter, ImageQuery, Viewer};
use crate::clock::{Clock, SystemClock};
use crate::config::{Config, DatabaseUrl, StoreUrl};
use crate::data::{ImageData, WholeObjectData};
use crate::error::{RegistryError, Result};
use crate::model::{now, Project, Role, Status, TokenKind, TokenRecord, User};
use axum::http::HeaderMap;
use object_store::local::LocalFileSystem;
use std::collections::HashSet;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

/// Stale uploads reset per reaper pass.
const STALE_BATCH: u32 = 1000;

/// Everything a request handler needs.
pub struct App {
    /// Effective configuration.
    pub config: Config,
    /// The catalog.
    pub catalog: Arc<dyn Catalog>,
    /// Image bytes.
    pub data: Arc<dyn ImageData>,
    /// The time source (a [`crate::clock::ManualClock`] in tests).
    pub clock: Arc<dyn Clock>,
    /// This node's limits on expensive work (password checks, conversions).
    pub guards: Arc<crate::guards::Guards>,
}

impl App {
    /// The base URL clients use, without a trailing slash.
    pub fn base_url(&self, headers: &HeaderMap) -> String {
        if let Some(u) = &self.config.public_url {
            return u.trim_end_matches('/').to_string();
        }
        let host = headers
            .get(axum::http::header::HOST)
            .and_then(|h| h.to_str().ok())
            .filter(|h| {
                !h.is_empty()
                    && h.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b".-:[]".contains(&b))
            })
            .unwrap_or(&self.config.listen);
        format!("http://{host}")
    }

    /// Remove the stored object of image `image_id`, which no longer refers to it, unless
    /// another image still does (a template and the images derived from it share one object).
    /// Failures are only logged: the reaper removes whatever is left.
    pub async fn release_data(&self, image_id: &str, location: &str) {
        let result = match self.catalog.location_in_use(location).await {
            Ok(true) => return,
            Ok(false) => self.data.delete(location).await,
            Err(e) => Err(e),
        };
        if let Err(e) = result {
            eprintln!(
                "vmi-registry: deleting data of image {image_id}: {}; the reaper will remove it",
                crate::error::chain(&e)
            );
        }
    }
}

/// A PostgreSQL catalog.
#[cfg(feature = "postgres")]
async fn postgres_catalog(url: &str) -> Result<Arc<dyn Catalog>> {
    Ok(Arc::new(
        crate::catalog::postgres::PostgresCatalog::connect(url).await?,
    ))
}

/// A PostgreSQL catalog: not compiled in.
#[cfg(not(feature = "postgres"))]
async fn postgres_catalog(_url: &str) -> Result<Arc<dyn Catalog>> {
    Err(RegistryError::Config(
        "this build has no PostgreSQL catalog (build vmi-registry with the `postgres` feature)"
            .into(),
    ))
}

/// Image data in an S3 bucket.
#[cfg(feature = "s3")]
fn s3_data(config: &Config, bucket: &str, prefix: &str) -> Result<Arc<dyn ImageData>> {
    use object_store::aws::AmazonS3Builder;
    use object_store::prefix::PrefixStore;
    use object_store::ObjectStore;
    let s3c = &config.s3;
    let mut b = AmazonS3Builder::from_env().with_bucket_name(bucket);
    if let Some(v) = &s3c.endpoint {
        b = b.with_endpoint(v);
    }
    if let Some(v) = &s3c.region {
        b = b.with_region(v);
    }
    if let Some(v) = &s3c.access_key_id {
        b = b.with_access_key_id(v);
    }
    if let Some(v) = &s3c.secret_access_key {
        b = b.with_secret_access_key(v);
    }
    if s3c.allow_http {
        b = b.with_allow_http(true);
    }
    let s3 = b
        .build()
        .map_err(|e| RegistryError::store(format!("opening bucket {bucket}"), e))?;
    let store: Arc<dyn ObjectStore> = if prefix.is_empty() {
        Arc::new(s3)
    } else {
        Arc::new(PrefixStore::new(s3, prefix))
    };
    Ok(Arc::new(WholeObjectData::new(store)))
}

/// Image data in an S3 bucket: not compiled in.
#[cfg(not(feature = "s3"))]
fn s3_data(_config: &Config, _bucket: &str, _prefix: &str) -> Result<Arc<dyn ImageData>> {
    Err(RegistryError::Config(
        "this build has no S3 image store (build vmi-registry with the `s3` feature)".into(),
    ))
}

/// What the bootstrap did.
#[derive(Debug, Clone, PartialEq)]
pub struct Bootstrap {
    /// Admin user name.
    pub user: String,
    /// Admin project name.
    pub project: String,
    /// The generated password, when the admin was created just now without a configured one.
    pub generated_password: Option<String>,
}

/// A configured registry, ready to serve.
#[derive(Clone)]
pub struct Registry {
    /// Shared state.
    pub app: Arc<App>,
}

impl Registry {
    /// Open the catalog and image store the configuration names (creating the data directory).
    pub async fn open(config: Config) -> Result<Self> {
        let catalog: Arc<dyn Catalog> = match config.database_url()? {
            DatabaseUrl::Sqlite(path) => {
                if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                    std::fs::create_dir_all(dir)
                        .map_err(|e| RegistryError::io(format!("creating {}", dir.display()), e))?;
                }
                let p = path.clone();
                Arc::new(
                    tokio::task::spawn_blocking(move || SqliteCatalog::open(&p))
                        .await
                        .map_err(|e| RegistryError::catalog("opening", e))??,
                )
            }
            DatabaseUrl::Postgres(url) => postgres_catalog(&url).await?,
        };
        let data: Arc<dyn ImageData> = match config.store_url()? {
            StoreUrl::File(dir) => {
                std::fs::create_dir_all(&dir)
                    .map_err(|e| RegistryError::io(format!("creating {}", dir.display()), e))?;
                let fs = LocalFileSystem::new_with_prefix(&dir)
                    .map_err(|e| RegistryError::store(format!("opening {}", dir.display()), e))?;
                Arc::new(WholeObjectData::local(Arc::new(fs), dir))
            }
            StoreUrl::S3 { bucket, prefix } => s3_data(&config, &bucket, &prefix)?,
        };
        Ok(Self::with_parts(config, catalog, data))
    }

    /// The same registry with another time source (tests move time with a
    /// [`crate::clock::ManualClock`]).
    pub fn with_clock(self, clock: Arc<dyn Clock>) -> Self {
        let app = Arc::try_unwrap(self.app).unwrap_or_else(|a| App {
            config: a.config.clone(),
            catalog: a.catalog.clone(),
            data: a.data.clone(),
            clock: a.clock.clone(),
            guards: a.guards.clone(),
        });
        Registry {
            app: Arc::new(App { clock, ..app }),
        }
    }

    /// A registry over the given backends.
    pub fn with_parts(config: Config, catalog: Arc<dyn Catalog>, data: Arc<dyn ImageData>) -> Self {
        Registry {
            app: Arc::new(App {
                guards: Arc::new(crate::guards::Guards::new(&config)),
                config,
                catalog,
                data,
                clock: Arc::new(SystemClock),
            }),
        }
    }

    /// Create the admin project, user, role and configured token if missing.
    pub async fn bootstrap(&self) -> Result<Bootstrap> {
        let c = &self.app.catalog;
        let cfg = &self.app.config.admin;
        let project = match c.find_project(&cfg.project).await? {
            Some(p) => p,
            None => {
                let p = Project {
                    id: uuid::Uuid::new_v4().simple().to_string(),
                    name: cfg.project.clone(),
                };
                match c.create_project(&p).await {
                    Ok(()) => p,
                    // Another node created it first.
                    Err(RegistryError::Conflict(_)) => c
                        .find_project(&cfg.project)
                        .await?
                        .ok_or_else(|| RegistryError::Config("admin project vanished".into()))?,
                    Err(e) => return Err(e),
                }
            }
        };
        let mut generated_password = None;
        let user = match c.find_user(&cfg.user).await? {
            Some(u) => u,
            None => {
                let password = match &cfg.password {
                    Some(p) => p.clone(),
                    None => {
                        let p = new_password();
                        generated_password = Some(p.clone());
                        p
                    }
                };
                let hash = self.app.guards.login.hash(password).await?;
                let u = User {
                    id: uuid::Uuid::new_v4().simple().to_string(),
                    name: cfg.user.clone(),
                    password_hash: Some(hash),
                    default_project_id: Some(project.id.clone()),
                    enabled: true,
                };
                match c.create_user(&u).await {
                    Ok(()) => u,
                    Err(RegistryError::Conflict(_)) => {
                        generated_password = None;
                        c.find_user(&cfg.user)
                            .await?
                            .ok_or_else(|| RegistryError::Config("admin user vanished".into()))?
                    }
                    Err(e) => return Err(e),
                }
            }
        };
        c.assign_role(&user.id, &project.id, Role::Admin).await?;
        if let Some(tok) = &cfg.token {
            let h = hash_token(tok);
            if c.get_token(&h).await?.is_none() {
                let rec = TokenRecord {
                    token_hash: h,
                    user_id: user.id.clone(),
                    project_id: project.id.clone(),
                    kind: TokenKind::Api,
                    issued_at: now(),
                    expires_at: None,
                };
                match c.create_token(&rec).await {
                    Ok(()) | Err(RegistryError::Conflict(_)) => {}
                    Err(e) => return Err(e),
                }
            }
        }
        crate::api::metadefs::load_standard(c.as_ref(), &project.id).await?;
        Ok(Bootstrap {
            user: user.name,
            project: project.name,
            generated_password,
        })
    }

    /// Put images stuck in `saving` for longer than the grace (their uploader died) back to
    /// `queued`, drop expired tokens, then remove stored data that no live image references and
    /// that is older than the grace. Returns the number of objects removed.
    pub async fn reap(&self) -> Result<usize> {
        let grace = Duration::from_secs(self.app.config.reap_grace_secs);
        let cutoff = chrono::Utc::now()
            - chrono::Duration::from_std(grace).unwrap_or(chrono::Duration::zero());
        let mut q = ImageQuery::new(Viewer::Admin);
        q.os_hidden = None;
        q.limit = STALE_BATCH;
        q.filters = vec![
            Filter {
                field: Field::Status,
                cmp: Cmp::Eq,
                value: Status::Saving.as_str().into(),
            },
            Filter {
                field: Field::UpdatedAt,
                cmp: Cmp::Lt,
                value: cutoff.format("%Y-%m-%dT%H:%M:%SZ").to_string(),
            },
        ];
        for mut img in self.app.catalog.list_images(&q).await? {
            img.status = Status::Queued;
            img.updated_at = now();
            if self.app.catalog.update_image(&img, Status::Saving).await? {
                eprintln!(
                    "vmi registry: image {} was saving for longer than {}s; back to queued",
                    img.id,
                    grace.as_secs()
                );
            }
        }
        crate::import::recover_stuck(&self.app).await?;
        self.app
            .catalog
            .delete_expired_tokens(&crate::api::identity::keystone_time(chrono::Utc::now()))
            .await?;
        let mut keep: HashSet<String> = self
            .app
            .catalog
            .live_locations()
            .await?
            .into_iter()
            .collect();
        keep.extend(self.app.catalog.import_locations().await?);
        self.app
            .data
            .reap(&keep, Duration::from_secs(self.app.config.reap_grace_secs))
            .await
    }

    /// The HTTP application.
    pub fn router(&self) -> axum::Router {
        crate::api::router(self.app.clone())
    }

    /// Serve on `listener` until `shutdown` resolves.
    pub async fn serve(
        self,
        listener: tokio::net::TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<()> {
        crate::leases::spawn_sweeper(self.app.clone());
        let app = self
            .router()
            .into_make_service_with_connect_info::<std::net::SocketAddr>();
        axum::serve(listener, app)
            .with_graceful_shutdown(shutdown)
            .await
            .map_err(|e| RegistryError::io("serving", e))
    }
}
