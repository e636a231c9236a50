//! The catalog's part for image signatures: signing keys registered per project.
//!
//! [`SigningCatalog`] is a supertrait of [`super::Catalog`]; each backend implements it in its
//! own file ([`super::signing_sqlite`], `signing_postgres`) over the `signing_keys` table of
//! migration 5.

use crate::error::Result;
use async_trait::async_trait;

/// A registered signing key (public key or certificate), as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct SigningKeyRecord {
    /// UUID; what images name in `img_signature_certificate_uuid`.
    pub id: String,
    /// Owning project.
    pub project_id: String,
    /// Display name.
    pub name: Option<String>,
    /// `public_key` or `certificate`.
    pub form: String,
    /// The `img_signature_key_type` its signatures have.
    pub key_type: String,
    /// The PEM as registered.
    pub pem: String,
    /// Hex SHA-256 of the DER.
    pub fingerprint: String,
    /// Certificate `notBefore` (Glance time format).
    pub not_before: Option<String>,
    /// Certificate `notAfter` (Glance time format).
    pub not_after: Option<String>,
    /// Certificate subject.
    pub subject: Option<String>,
    /// The user who registered it.
    pub created_by: String,
    /// When registered.
    pub created_at: String,
}

/// Signing keys in the catalog.
#[async_trait]
pub trait SigningCatalog: Send + Sync {
    /// Store a key; Conflict if the project already has this key (same fingerprint).
    async fn create_signing_key(&self, key: &SigningKeyRecord) -> Result<()>;
    /// A key by id.
    async fn get_signing_key(&self, id: &str) -> Result<Option<SigningKeyRecord>>;
    /// The keys of `project_id`, or of every project when `None`, oldest first.
    async fn list_signing_keys(&self, project_id: Option<&str>) -> Result<Vec<SigningKeyRecord>>;
    /// Remove a key; false if there was none.
    async fn delete_signing_key(&self, id: &str) -> Result<bool>;
}

/// The columns, in the order the backends read them.
pub(crate) const KEY_COLS: &str = "id, project_id, name, form, key_type, pem, fingerprint, \
     not_before, not_after, subject, created_by, created_at";
