//! Leases of direct uploads (`PUT /v2/images/{id}/file`): the node streaming an upload holds
//! one for the image and renews it while the body arrives, so that when the node dies another
//! node can tell a dead upload from a live one and reclaim it once the lease has run out.
//!
//! A lease is identified by an opaque token; renewing and releasing compare it, so a node whose
//! lease was reclaimed cannot renew or release another node's.

use crate::error::Result;
use async_trait::async_trait;

/// The lease of one upload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UploadLease {
    /// The image being uploaded.
    pub image_id: String,
    /// The node streaming it.
    pub node_id: String,
    /// The holder's token.
    pub token: String,
    /// When the lease runs out (catalog time format).
    pub expires_at: String,
}

/// Upload leases in the catalog (`migrations/*/0008_upload_leases.sql`).
#[async_trait]
pub trait UploadLeaseCatalog: Send + Sync {
    /// Record `lease`, replacing any lease of its image.
    async fn put_upload_lease(&self, lease: &UploadLease) -> Result<()>;
    /// Move the expiry of the lease of `image_id` held with `token`; false when it is not held.
    async fn renew_upload_lease(
        &self,
        image_id: &str,
        token: &str,
        expires_at: &str,
    ) -> Result<bool>;
    /// Remove the lease of `image_id` held with `token`; false when it is not held.
    async fn delete_upload_lease(&self, image_id: &str, token: &str) -> Result<bool>;
    /// The lease of `image_id`, if any.
    async fn get_upload_lease(&self, image_id: &str) -> Result<Option<UploadLease>>;
    /// Up to `limit` leases that ran out before `now`.
    async fn expired_upload_leases(&self, now: &str, limit: u32) -> Result<Vec<UploadLease>>;
}
