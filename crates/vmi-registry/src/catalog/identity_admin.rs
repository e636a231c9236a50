//! What Keystone-style identity administration needs from the catalog beyond authentication:
//! listing users and role assignments, and removing an assignment.

use crate::error::Result;
use crate::model::{Role, User};
use async_trait::async_trait;

/// One role of one user on one project.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoleAssignment {
    /// The user.
    pub user_id: String,
    /// The project.
    pub project_id: String,
    /// The role.
    pub role: Role,
}

/// Identity administration queries.
#[async_trait]
pub trait IdentityAdminCatalog {
    /// Every user, by name.
    async fn list_users(&self) -> Result<Vec<User>>;
    /// Every role assignment.
    async fn role_assignments(&self) -> Result<Vec<RoleAssignment>>;
    /// Remove one assignment; false if there was none.
    async fn unassign_role(&self, user_id: &str, project_id: &str, role: Role) -> Result<bool>;
}
