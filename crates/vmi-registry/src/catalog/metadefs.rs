//! What the catalog keeps for Glance's metadata definitions (`/v2/metadefs`): one
//! [`MetadefNamespace`] per namespace, whose objects, properties, tags and resource type
//! associations are one JSON document changed as a whole by compare-and-swap on its revision.

use crate::error::Result;
use async_trait::async_trait;

/// One metadata definition namespace.
#[derive(Debug, Clone, PartialEq)]
pub struct MetadefNamespace {
    /// The namespace's name (its key).
    pub namespace: String,
    /// Owning project id.
    pub owner: String,
    /// `public` or `private`.
    pub visibility: String,
    /// Deletion (of it and of its contents) is refused while set.
    pub protected: bool,
    /// JSON object: `display_name`, `description`, `objects`, `properties`, `tags`,
    /// `resource_type_associations`.
    pub body: String,
    /// When created.
    pub created_at: String,
    /// Last change.
    pub updated_at: String,
    /// Bumped at every stored change.
    pub revision: u64,
}

/// Storage of metadata definition namespaces.
#[async_trait]
pub trait MetadefCatalog {
    /// Every namespace, by name.
    async fn metadef_namespaces(&self) -> Result<Vec<MetadefNamespace>>;
    /// One namespace.
    async fn metadef_namespace(&self, namespace: &str) -> Result<Option<MetadefNamespace>>;
    /// Insert a namespace; [`crate::RegistryError::Conflict`] if the name exists.
    async fn metadef_create(&self, ns: &MetadefNamespace) -> Result<()>;
    /// Replace namespace `name` (possibly renaming it to `ns.namespace`) if its stored
    /// revision is still `ns.revision`; false when another writer got there first.
    async fn metadef_update(&self, name: &str, ns: &MetadefNamespace) -> Result<bool>;
    /// Delete a namespace; false if there was none.
    async fn metadef_delete(&self, namespace: &str) -> Result<bool>;
    /// Insert `set` (skipping names that exist) unless the definition set `what` was loaded
    /// before; true when it loaded them now.
    async fn metadef_load(&self, what: &str, set: &[MetadefNamespace]) -> Result<bool>;
}
