//! [`IdentityAdminCatalog`] for the SQLite catalog (tables of `migrations/sqlite/0001_init.sql`).

use super::{db, user_from_row, SqliteCatalog};
use crate::catalog::identity_admin::{IdentityAdminCatalog, RoleAssignment};
use crate::error::Result;
use crate::model::{Role, User};
use async_trait::async_trait;
use rusqlite::params;

#[async_trait]
impl IdentityAdminCatalog for SqliteCatalog {
    async fn list_users(&self) -> Result<Vec<User>> {
        self.run("listing users", move |c| {
            let f = db("listing users");
            let mut st = c
                .prepare(
                    "SELECT id, name, password_hash, default_project_id, enabled FROM users \
                     ORDER BY name",
                )
                .map_err(&f)?;
            let rows = st.query_map([], user_from_row).map_err(&f)?;
            rows.collect::<rusqlite::Result<Vec<_>>>().map_err(&f)
        })
        .await
    }

    async fn role_assignments(&self) -> Result<Vec<RoleAssignment>> {
        self.run("listing role assignments", move |c| {
            let f = db("listing role assignments");
            let mut st = c
                .prepare(
                    "SELECT user_id, project_id, role FROM role_assignments \
                     ORDER BY project_id, user_id, role",
                )
                .map_err(&f)?;
            let rows = st
                .query_map([], |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, String>(2)?,
                    ))
                })
                .map_err(&f)?;
            let mut out = Vec::new();
            for row in rows {
                let (user_id, project_id, role) = row.map_err(&f)?;
                // A role this version does not know is skipped, not fatal.
                if let Ok(role) = role.parse::<Role>() {
                    out.push(RoleAssignment {
                        user_id,
                        project_id,
                        role,
                    });
                }
            }
            Ok(out)
        })
        .await
    }

    async fn unassign_role(&self, user_id: &str, project_id: &str, role: Role) -> Result<bool> {
        let (u, p) = (user_id.to_string(), project_id.to_string());
        self.run("removing a role assignment", move |c| {
            let n = c
                .execute(
                    "DELETE FROM role_assignments \
                     WHERE user_id = ?1 AND project_id = ?2 AND role = ?3",
                    params![u, p, role.as_str()],
                )
                .map_err(db("removing a role assignment"))?;
            Ok(n == 1)
        })
        .await
    }
}
