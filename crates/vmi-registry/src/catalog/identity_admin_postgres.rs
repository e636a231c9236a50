//! [`IdentityAdminCatalog`] for the PostgreSQL catalog (tables of
//! `migrations/postgres/0001_init.sql`).

use super::{db, user_from_row, PostgresCatalog};
use crate::catalog::identity_admin::{IdentityAdminCatalog, RoleAssignment};
use crate::error::Result;
use crate::model::{Role, User};
use async_trait::async_trait;

#[async_trait]
impl IdentityAdminCatalog for PostgresCatalog {
    async fn list_users(&self) -> Result<Vec<User>> {
        let conn = self.conn().await?;
        let rows = conn
            .query(
                "SELECT id, name, password_hash, default_project_id, enabled FROM users \
                 ORDER BY name",
                &[],
            )
            .await
            .map_err(db("listing users"))?;
        rows.iter().map(user_from_row).collect()
    }

    async fn role_assignments(&self) -> Result<Vec<RoleAssignment>> {
        let f = db("listing role assignments");
        let conn = self.conn().await?;
        let rows = conn
            .query(
                "SELECT user_id, project_id, role FROM role_assignments \
                 ORDER BY project_id, user_id, role",
                &[],
            )
            .await
            .map_err(&f)?;
        let mut out = Vec::new();
        for r in rows {
            let role: String = r.try_get(2).map_err(&f)?;
            // A role this version does not know is skipped, not fatal.
            if let Ok(role) = role.parse::<Role>() {
                out.push(RoleAssignment {
                    user_id: r.try_get(0).map_err(&f)?,
                    project_id: r.try_get(1).map_err(&f)?,
                    role,
                });
            }
        }
        Ok(out)
    }

    async fn unassign_role(&self, user_id: &str, project_id: &str, role: Role) -> Result<bool> {
        let conn = self.conn().await?;
        let n = conn
            .execute(
                "DELETE FROM role_assignments \
                 WHERE user_id = $1 AND project_id = $2 AND role = $3",
                &[&user_id, &project_id, &role.as_str()],
            )
            .await
            .map_err(db("removing a role assignment"))?;
        Ok(n == 1)
    }
}
