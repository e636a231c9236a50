//! The catalog: everything the registry knows except image bytes.
//!
//! [`Catalog`] is the one interface the API layer uses; each database backend implements it in
//! its own module with its own migration set under `migrations/<backend>/`. [`sqlite`] is the
//! embedded backend. A PostgreSQL backend implements the same trait; the queries are written in
//! the subset of SQL both share, and every state change that can race (an upload starting, an
//! image being deleted during an upload) is a compare-and-swap on the image status, so several
//! service processes can share one database.

pub mod identity_admin;
pub mod import;
pub mod leases;
#[cfg(feature = "postgres")]
mod leases_postgres;
mod leases_sqlite;
pub mod lifecycle;
#[cfg(feature = "postgres")]
mod lifecycle_postgres;
mod lifecycle_sqlite;
pub mod lineage;
#[cfg(feature = "postgres")]
pub mod lineage_postgres;
pub mod metadefs;
#[cfg(feature = "postgres")]
pub mod postgres;
#[cfg(feature = "postgres")]
pub mod postgres_tls;
pub mod signing;
#[cfg(feature = "postgres")]
mod signing_postgres;
mod signing_sqlite;
pub(crate) mod sql;
pub mod sqlite;
pub mod tasks;

use crate::error::Result;
use crate::model::{
    ImageRecord, MemberRecord, MemberStatus, Project, Role, Status, TokenRecord, User, Visibility,
};
use async_trait::async_trait;

/// Sortable image columns (Glance's `sort_key` values).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SortKey {
    /// `name`
    Name,
    /// `status`
    Status,
    /// `container_format`
    ContainerFormat,
    /// `disk_format`
    DiskFormat,
    /// `size`
    Size,
    /// `id`
    Id,
    /// `created_at`
    CreatedAt,
    /// `updated_at`
    UpdatedAt,
    /// `visibility`
    Visibility,
    /// `owner`
    Owner,
    /// `min_disk`
    MinDisk,
    /// `min_ram`
    MinRam,
}

impl SortKey {
    /// Parse Glance's name.
    pub fn parse(s: &str) -> Option<SortKey> {
        Some(match s {
            "name" => SortKey::Name,
            "status" => SortKey::Status,
            "container_format" => SortKey::ContainerFormat,
            "disk_format" => SortKey::DiskFormat,
            "size" => SortKey::Size,
            "id" => SortKey::Id,
            "created_at" => SortKey::CreatedAt,
            "updated_at" => SortKey::UpdatedAt,
            "visibility" => SortKey::Visibility,
            "owner" => SortKey::Owner,
            "min_disk" => SortKey::MinDisk,
            "min_ram" => SortKey::MinRam,
            _ => return None,
        })
    }
}

/// A comparison in a list filter.
#[derive(Debug, Clone, PartialEq)]
pub enum Cmp {
    /// `=`
    Eq,
    /// `!=`
    Neq,
    /// `>`
    Gt,
    /// `>=`
    Gte,
    /// `<`
    Lt,
    /// `<=`
    Lte,
    /// One of several values (`in:a,b`).
    In(Vec<String>),
}

/// Filterable columns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Field {
    /// `id`
    Id,
    /// `name`
    Name,
    /// `status`
    Status,
    /// `owner`
    Owner,
    /// `disk_format`
    DiskFormat,
    /// `container_format`
    ContainerFormat,
    /// `size` (numeric)
    Size,
    /// `created_at`
    CreatedAt,
    /// `updated_at`
    UpdatedAt,
    /// `protected` (`true`/`false`)
    Protected,
}

/// One list filter: `field cmp value`.
#[derive(Debug, Clone, PartialEq)]
pub struct Filter {
    /// The column.
    pub field: Field,
    /// The comparison.
    pub cmp: Cmp,
    /// The value (ignored for [`Cmp::In`]).
    pub value: String,
}

/// Whose images a listing may include.
#[derive(Debug, Clone, PartialEq)]
pub enum Viewer {
    /// Every image.
    Admin,
    /// Images the project owns, public ones, shared ones it is a member of, community ones when
    /// asked for.
    Project(String),
}

/// Which member statuses make a shared image appear in a member's list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemberFilter {
    /// Only this status.
    Only(MemberStatus),
    /// Any status.
    All,
}

/// An image listing request, already validated by the API layer.
#[derive(Debug, Clone)]
pub struct ImageQuery {
    /// Whose view.
    pub viewer: Viewer,
    /// Restrict to one visibility; `None` is Glance's default view.
    pub visibility: Option<Visibility>,
    /// `visibility=all`: the default view plus every community image.
    pub all_visibilities: bool,
    /// Member statuses that include a shared image (default: accepted).
    pub member_status: MemberFilter,
    /// Column filters (all must hold).
    pub filters: Vec<Filter>,
    /// Tags the image must all have.
    pub tags: Vec<String>,
    /// Custom properties that must equal the value.
    pub properties: Vec<(String, String)>,
    /// `Some(v)` lists only images with `os_hidden = v`; `None` lists both.
    pub os_hidden: Option<bool>,
    /// Sort order; the id is always the final tie-breaker.
    pub sort: Vec<(SortKey, bool)>,
    /// Continue after this image (in sort order).
    pub marker: Option<ImageRecord>,
    /// At most this many.
    pub limit: u32,
}

impl ImageQuery {
    /// Glance's default listing for `viewer`.
    pub fn new(viewer: Viewer) -> Self {
        ImageQuery {
            viewer,
            visibility: None,
            all_visibilities: false,
            member_status: MemberFilter::Only(MemberStatus::Accepted),
            filters: Vec::new(),
            tags: Vec::new(),
            properties: Vec::new(),
            os_hidden: Some(false),
            sort: vec![(SortKey::CreatedAt, false)],
            marker: None,
            limit: 25,
        }
    }
}

/// Everything the registry stores except image bytes.
#[async_trait]
pub trait Catalog:
    lineage::LineageCatalog
    + lifecycle::LifecycleCatalog
    + signing::SigningCatalog
    + import::ImportCatalog
    + metadefs::MetadefCatalog
    + tasks::TaskCatalog
    + identity_admin::IdentityAdminCatalog
    + leases::UploadLeaseCatalog
    + Send
    + Sync
    + 'static
{
    /// Insert a new image with its tags and properties; [`crate::RegistryError::Conflict`] if
    /// the id exists (even as a deleted tombstone).
    async fn create_image(&self, image: &ImageRecord) -> Result<()>;
    /// The image with this id, including deleted tombstones.
    async fn get_image(&self, id: &str) -> Result<Option<ImageRecord>>;
    /// Images matching `query`, never deleted ones.
    async fn list_images(&self, query: &ImageQuery) -> Result<Vec<ImageRecord>>;
    /// Replace every mutable field, tags and properties of `image` and bump its revision, but
    /// only if the stored status is still `expected` and the stored revision is still
    /// `image.revision`. Returns false (and changes nothing) when another writer got there first:
    /// the compare-and-swap that serialises concurrent writers. Most callers want
    /// [`save_changes`], which replays a change onto a newer revision.
    async fn update_image(&self, image: &ImageRecord, expected: Status) -> Result<bool>;
    /// Store locations of every image that is not deleted (the reaper keeps these).
    async fn live_locations(&self) -> Result<Vec<String>>;
    /// Whether an image that is not deleted refers to `location` (objects are shared by an
    /// image and the images derived from it).
    async fn location_in_use(&self, location: &str) -> Result<bool>;

    /// Add a member; Conflict if it exists.
    async fn add_member(&self, member: &MemberRecord) -> Result<()>;
    /// One member of an image.
    async fn get_member(&self, image_id: &str, member_id: &str) -> Result<Option<MemberRecord>>;
    /// All members of an image.
    async fn list_members(&self, image_id: &str) -> Result<Vec<MemberRecord>>;
    /// Change a member's status; false if there is no such member.
    async fn update_member(&self, member: &MemberRecord) -> Result<bool>;
    /// Remove a member; false if there was none.
    async fn delete_member(&self, image_id: &str, member_id: &str) -> Result<bool>;

    /// Add a project; Conflict if the name exists.
    async fn create_project(&self, project: &Project) -> Result<()>;
    /// A project by id.
    async fn get_project(&self, id: &str) -> Result<Option<Project>>;
    /// A project by name.
    async fn find_project(&self, name: &str) -> Result<Option<Project>>;
    /// Every project.
    async fn list_projects(&self) -> Result<Vec<Project>>;
    /// Add a user; Conflict if the name exists.
    async fn create_user(&self, user: &User) -> Result<()>;
    /// A user by id.
    async fn get_user(&self, id: &str) -> Result<Option<User>>;
    /// A user by name.
    async fn find_user(&self, name: &str) -> Result<Option<User>>;
    /// Give `user_id` `role` on `project_id` (idempotent).
    async fn assign_role(&self, user_id: &str, project_id: &str, role: Role) -> Result<()>;
    /// The roles `user_id` holds on `project_id`.
    async fn roles(&self, user_id: &str, project_id: &str) -> Result<Vec<Role>>;
    /// Store a token (by hash).
    async fn create_token(&self, token: &TokenRecord) -> Result<()>;
    /// A token by hash.
    async fn get_token(&self, token_hash: &str) -> Result<Option<TokenRecord>>;
    /// Revoke a token; false if there was none.
    async fn delete_token(&self, token_hash: &str) -> Result<bool>;
    /// Remove tokens that expired before `now` (Keystone time format); returns the count.
    async fn delete_expired_tokens(&self, now: &str) -> Result<u64>;
}

/// How often [`save_changes`] replays a change onto a newer revision before giving up.
const SAVE_ATTEMPTS: usize = 16;

/// Store `ours` — `base`, the image as this request read it, with this request's changes — if
/// the image's status is still `expected`.
///
/// When another request stored a change since `base` was read (the revision moved on), the
/// image is read again and this request's changes are replayed onto it
/// ([`ImageRecord::replay`]), so neither change is lost: a PATCH racing the lifecycle job keeps
/// the job's properties, an upload finishing keeps a name changed meanwhile. Returns the stored
/// record (with its new revision), or `None` when the image is gone or its status is no longer
/// `expected`.
pub async fn save_changes(
    catalog: &dyn Catalog,
    base: &ImageRecord,
    ours: &ImageRecord,
    expected: Status,
) -> Result<Option<ImageRecord>> {
    let mut base = base.clone();
    let mut ours = ours.clone();
    ours.revision = base.revision;
    for _ in 0..SAVE_ATTEMPTS {
        if catalog.update_image(&ours, expected).await? {
            ours.revision = ours.revision.saturating_add(1);
            return Ok(Some(ours));
        }
        let Some(current) = catalog.get_image(&ours.id).await? else {
            return Ok(None);
        };
        if current.status != expected {
            return Ok(None);
        }
        let mut merged = current.clone();
        merged.replay(&base, &ours);
        base = current;
        ours = merged;
    }
    Err(crate::error::RegistryError::Conflict(format!(
        "Image {} keeps changing; retry",
        ours.id
    )))
}
