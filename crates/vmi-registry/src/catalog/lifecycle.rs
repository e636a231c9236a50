//! What the lifecycle features need from the catalog: the background job's leader lease, the
//! lifecycle state compare-and-swap, the recycle bin and the audit log.
//!
//! [`LifecycleCatalog`] is a supertrait of [`super::Catalog`]; the SQLite implementation is in
//! [`super::lifecycle_sqlite`], the PostgreSQL one in `lifecycle_postgres`. Every state change
//! here runs in one database transaction and checks the state it expects before it writes, so
//! two nodes (or two runs of the job) racing for the same change leave exactly one winner and
//! the loser changes nothing.

use crate::error::Result;
use crate::model::Status;
use async_trait::async_trait;

/// Image property holding the lifecycle state (absent means `active`).
pub const PROP_STATE: &str = "vmi_lifecycle_state";
/// Image property holding the replacement image id.
pub const PROP_REPLACEMENT: &str = "vmi_replacement";
/// Image property holding when the image becomes deprecated.
pub const PROP_DEPRECATE_AT: &str = "vmi_deprecate_at";
/// Image property holding when the image becomes obsolete.
pub const PROP_OBSOLETE_AT: &str = "vmi_obsolete_at";
/// Image property holding when the image is retired (deleted).
pub const PROP_DELETE_AT: &str = "vmi_delete_at";
/// Every lifecycle property: reserved, server-managed, shown in the image JSON.
pub const LIFECYCLE_PROPS: [&str; 5] = [
    PROP_STATE,
    PROP_REPLACEMENT,
    PROP_DEPRECATE_AT,
    PROP_OBSOLETE_AT,
    PROP_DELETE_AT,
];

/// An image in the recycle bin.
#[derive(Debug, Clone, PartialEq)]
pub struct RecycleEntry {
    /// The image.
    pub image_id: String,
    /// Its status before the deletion (restored by `restore`).
    pub previous_status: Status,
    /// When it was deleted.
    pub deleted_at: String,
    /// When its data is removed for good.
    pub purge_at: String,
    /// Who deleted it (user id, or the job).
    pub deleted_by: Option<String>,
}

/// One audit log entry.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct AuditEvent {
    /// Sequence number (assigned by the catalog; 0 before it is stored).
    pub id: i64,
    /// When.
    pub at: String,
    /// Who: the user id (`None` for the background job or an unidentified caller).
    pub user_id: Option<String>,
    /// The project the caller acted in (for the job: the image's owner).
    pub project_id: Option<String>,
    /// HTTP method (`JOB` for the background job).
    pub method: String,
    /// Request path, without the query string.
    pub path: String,
    /// The image concerned, if any.
    pub image_id: Option<String>,
    /// What was done, e.g. `image.create`, `lifecycle.deprecated`.
    pub action: String,
    /// Outcome: the HTTP status code.
    pub status: u16,
    /// Extra, secret-free detail (the job's reason, …).
    pub detail: Option<String>,
}

/// An audit log query, already validated; newest first.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AuditQuery {
    /// Only this project's events (non-admin callers).
    pub project_id: Option<String>,
    /// Only events about this image.
    pub image_id: Option<String>,
    /// Only this action.
    pub action: Option<String>,
    /// Only events at or after this time.
    pub since: Option<String>,
    /// Only events before this time.
    pub until: Option<String>,
    /// Only events older than this id (paging).
    pub before_id: Option<i64>,
    /// At most this many.
    pub limit: u32,
}

/// The catalog's lifecycle, recycle bin and audit operations.
#[async_trait]
pub trait LifecycleCatalog: Send + Sync {
    /// Take or renew the lease `name` for `holder` until `expires_at`: succeeds when nobody
    /// holds it, `holder` already does, or the current lease expired at or before `now`.
    /// Returns whether `holder` holds it now (one compare-and-swap upsert).
    async fn try_lease(
        &self,
        name: &str,
        holder: &str,
        now: &str,
        expires_at: &str,
    ) -> Result<bool>;
    /// Give up the lease if `holder` holds it.
    async fn release_lease(&self, name: &str, holder: &str) -> Result<bool>;

    /// Replace the lifecycle properties of an active or deactivated image (`Some` sets, `None`
    /// removes), but only if its current `vmi_lifecycle_state` (absent = `active`) is still
    /// `expected`. Returns false, changing nothing, when the state or status moved on.
    async fn set_lifecycle(
        &self,
        image_id: &str,
        expected: &str,
        props: &[(&'static str, Option<String>)],
        now: &str,
    ) -> Result<bool>;
    /// Ids of active or deactivated images with a scheduled transition due at `now` (or a
    /// retirement left half done), at most `limit`.
    async fn due_lifecycle(&self, now: &str, limit: u32) -> Result<Vec<String>>;

    /// Move an image from `expected` to `pending_delete` and record `entry`; false when its
    /// status was no longer `expected`.
    async fn recycle(&self, entry: &RecycleEntry, expected: Status, now: &str) -> Result<bool>;
    /// Bring a `pending_delete` image back to its previous status (a retired image comes back
    /// obsolete; a scheduled deletion is cancelled). Returns the restored status, or `None`
    /// when the image was not in the recycle bin.
    async fn restore(&self, image_id: &str, now: &str) -> Result<Option<Status>>;
    /// The recycle bin entry of an image.
    async fn recycle_entry(&self, image_id: &str) -> Result<Option<RecycleEntry>>;
    /// Recycled images whose retention ended at or before `now`, oldest first, at most `limit`.
    async fn expired_recycled(&self, now: &str, limit: u32) -> Result<Vec<RecycleEntry>>;
    /// Make a `pending_delete` image `deleted` and drop its entry. Returns `Some(location)` (the
    /// data to remove) when this call did it, `None` when it was not in the recycle bin.
    async fn purge(&self, image_id: &str, now: &str) -> Result<Option<Option<String>>>;

    /// Append an event to the audit log.
    async fn append_audit(&self, event: &AuditEvent) -> Result<()>;
    /// Audit events matching `query`, newest first.
    async fn list_audit(&self, query: &AuditQuery) -> Result<Vec<AuditEvent>>;
}

/// The `WHERE` clause and parameter layout of an audit query, shared by both backends: the
/// returned SQL uses `?` placeholders; the values are in order.
pub(crate) fn audit_sql(q: &AuditQuery) -> (String, Vec<super::sql::SqlValue>) {
    use super::sql::SqlValue;
    let mut w: Vec<&str> = Vec::new();
    let mut p = Vec::new();
    let text = |s: &String| SqlValue::Text(Some(s.clone()));
    if let Some(v) = &q.project_id {
        w.push("project_id = ?");
        p.push(text(v));
    }
    if let Some(v) = &q.image_id {
        w.push("image_id = ?");
        p.push(text(v));
    }
    if let Some(v) = &q.action {
        w.push("action = ?");
        p.push(text(v));
    }
    if let Some(v) = &q.since {
        w.push("at >= ?");
        p.push(text(v));
    }
    if let Some(v) = &q.until {
        w.push("at < ?");
        p.push(text(v));
    }
    if let Some(v) = q.before_id {
        w.push("id < ?");
        p.push(SqlValue::Int(Some(v)));
    }
    let filter = if w.is_empty() {
        String::new()
    } else {
        format!(" WHERE {}", w.join(" AND "))
    };
    p.push(SqlValue::Int(Some(i64::from(q.limit))));
    (
        format!(
            "SELECT id, at, user_id, project_id, method, path, image_id, action, status, detail \
             FROM audit_events{filter} ORDER BY id DESC LIMIT ?"
        ),
        p,
    )
}

/// The due-transition query shared by both backends (`?` placeholders: now, now, now, limit).
pub(crate) const DUE_SQL: &str = "SELECT DISTINCT i.id FROM images i \
     JOIN image_properties p ON p.image_id = i.id \
     LEFT JOIN image_properties s ON s.image_id = i.id AND s.name = 'vmi_lifecycle_state' \
     WHERE i.status IN ('active', 'deactivated') AND ( \
       (p.name = 'vmi_deprecate_at' AND p.value <= ? \
          AND COALESCE(s.value, 'active') = 'active') \
       OR (p.name = 'vmi_obsolete_at' AND p.value <= ? \
          AND COALESCE(s.value, 'active') IN ('active', 'deprecated')) \
       OR (p.name = 'vmi_delete_at' AND p.value <= ? AND i.protected = 0 \
          AND COALESCE(s.value, 'active') IN ('active', 'deprecated', 'obsolete')) \
       OR (p.name = 'vmi_lifecycle_state' AND p.value = 'retired' AND i.protected = 0)) \
     ORDER BY i.id LIMIT ?";
