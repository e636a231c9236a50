//! Keystone v3 identity administration beyond what authentication needs, so that
//! `openstack project create`, `openstack user create --password`, `openstack role add
//! --project P --user U ROLE`, `openstack role assignment list` and their `list`/`show`
//! counterparts work against vmi: lookups by id and by `?name=`, users, role assignments and
//! their removal, and the one domain. Everything here is admin-only.

use crate::auth::Context;
use crate::catalog::identity_admin::RoleAssignment;
use crate::error::{RegistryError, Result};
use crate::model::{Project, Role, User};
use crate::server::App;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::Arc;

/// Keystone's id of the one domain.
const DOMAIN: &str = "default";

/// The routes this module adds under `/v3`.
pub fn router() -> Router<Arc<App>> {
    Router::new()
        .route("/projects/{project}", get(show_project))
        .route("/users", get(list_users))
        .route("/users/{user}", get(show_user))
        .route("/roles/{role}", get(show_role))
        .route("/role_assignments", get(role_assignments))
        .route("/domains", get(list_domains))
        .route("/domains/{domain}", get(show_domain))
}

fn require_admin(ctx: &Context) -> Result<()> {
    if ctx.is_admin() {
        Ok(())
    } else {
        Err(RegistryError::Forbidden(
            "You are not authorized to perform the requested action.".into(),
        ))
    }
}

/// A project as Keystone shows one.
pub fn project_json(p: &Project) -> Value {
    json!({"id": p.id, "name": p.name, "domain_id": DOMAIN, "enabled": true,
           "description": "", "is_domain": false, "parent_id": DOMAIN, "tags": [],
           "options": {}, "links": {"self": format!("/v3/projects/{}", p.id)}})
}

/// A user as Keystone shows one (never its password).
pub fn user_json(u: &User) -> Value {
    json!({"id": u.id, "name": u.name, "domain_id": DOMAIN, "enabled": u.enabled,
           "default_project_id": u.default_project_id, "password_expires_at": null,
           "options": {}, "links": {"self": format!("/v3/users/{}", u.id)}})
}

/// A role as Keystone shows one (its id is its name).
pub fn role_json(r: Role) -> Value {
    json!({"id": r.as_str(), "name": r.as_str(), "domain_id": null, "description": null,
           "options": {}, "links": {"self": format!("/v3/roles/{}", r.as_str())}})
}

fn domain_json() -> Value {
    json!({"id": DOMAIN, "name": "Default", "enabled": true, "description": "The default domain",
           "tags": [], "options": {}, "links": {"self": format!("/v3/domains/{DOMAIN}")}})
}

async fn show_project(
    State(app): State<Arc<App>>,
    ctx: Context,
    Path(project): Path<String>,
) -> Result<Json<Value>> {
    if !ctx.is_admin() && ctx.project_id != project {
        return Err(RegistryError::Forbidden(
            "You are not authorized to perform the requested action.".into(),
        ));
    }
    let p =
        app.catalog.get_project(&project).await?.ok_or_else(|| {
            RegistryError::NotFound(format!("Could not find project: {project}."))
        })?;
    Ok(Json(json!({"project": project_json(&p)})))
}

async fn list_users(
    State(app): State<Arc<App>>,
    ctx: Context,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<Value>> {
    require_admin(&ctx)?;
    let users: Vec<Value> = app
        .catalog
        .list_users()
        .await?
        .iter()
        .filter(|u| q.get("name").is_none_or(|n| *n == u.name))
        .filter(|u| {
            q.get("enabled")
                .is_none_or(|e| super::images::glance_bool(e) == Some(u.enabled))
        })
        .map(user_json)
        .collect();
    Ok(Json(json!({"users": users})))
}

async fn show_user(
    State(app): State<Arc<App>>,
    ctx: Context,
    Path(user): Path<String>,
) -> Result<Json<Value>> {
    if !ctx.is_admin() && ctx.user_id != user {
        return Err(RegistryError::Forbidden(
            "You are not authorized to perform the requested action.".into(),
        ));
    }
    let u = app
        .catalog
        .get_user(&user)
        .await?
        .ok_or_else(|| RegistryError::NotFound(format!("Could not find user: {user}.")))?;
    Ok(Json(json!({"user": user_json(&u)})))
}

async fn show_role(_ctx: Context, Path(role): Path<String>) -> Result<Json<Value>> {
    let r: Role = role
        .parse()
        .map_err(|_| RegistryError::NotFound(format!("Could not find role: {role}.")))?;
    Ok(Json(json!({"role": role_json(r)})))
}

/// `GET /v3/role_assignments` with Keystone's filters `user.id`, `scope.project.id` and
/// `role.id`, and `include_names`.
async fn role_assignments(
    State(app): State<Arc<App>>,
    ctx: Context,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<Value>> {
    require_admin(&ctx)?;
    let names = q
        .get("include_names")
        .is_some_and(|v| v.is_empty() || super::images::glance_bool(v) == Some(true));
    let keep = |a: &RoleAssignment| {
        q.get("user.id").is_none_or(|u| *u == a.user_id)
            && q.get("scope.project.id").is_none_or(|p| *p == a.project_id)
            && q.get("role.id").is_none_or(|r| r == a.role.as_str())
    };
    let assignments: Vec<RoleAssignment> = app
        .catalog
        .role_assignments()
        .await?
        .into_iter()
        .filter(keep)
        .collect();
    let (mut users, mut projects) = (HashMap::new(), HashMap::new());
    if names {
        for u in app.catalog.list_users().await? {
            users.insert(u.id.clone(), u.name);
        }
        for p in app.catalog.list_projects().await? {
            projects.insert(p.id.clone(), p.name);
        }
    }
    let out: Vec<Value> = assignments
        .iter()
        .map(|a| {
            let mut user = json!({"id": a.user_id});
            let mut project = json!({"id": a.project_id});
            let mut role = json!({"id": a.role.as_str()});
            if names {
                user["name"] = json!(users.get(&a.user_id));
                user["domain"] = json!({"id": DOMAIN, "name": "Default"});
                project["name"] = json!(projects.get(&a.project_id));
                project["domain"] = json!({"id": DOMAIN, "name": "Default"});
                role["name"] = json!(a.role.as_str());
            }
            json!({"user": user, "scope": {"project": project}, "role": role,
                   "links": {"assignment": format!("/v3/projects/{}/users/{}/roles/{}",
                                                   a.project_id, a.user_id, a.role.as_str())}})
        })
        .collect();
    Ok(Json(json!({"role_assignments": out})))
}

/// `DELETE /v3/projects/{project}/users/{user}/roles/{role}` (admin).
pub async fn unassign_role(
    State(app): State<Arc<App>>,
    ctx: Context,
    Path((project, user, role)): Path<(String, String, String)>,
) -> Result<StatusCode> {
    require_admin(&ctx)?;
    let r: Role = role
        .parse()
        .map_err(|_| RegistryError::NotFound(format!("Could not find role: {role}.")))?;
    if !app.catalog.unassign_role(&user, &project, r).await? {
        return Err(RegistryError::NotFound(format!(
            "Could not find role assignment with role: {role}, user or group: {user}, \
             project, domain, or system: {project}."
        )));
    }
    Ok(StatusCode::NO_CONTENT)
}

async fn list_domains(_ctx: Context, Query(q): Query<HashMap<String, String>>) -> Json<Value> {
    let all = q.get("name").is_none_or(|n| n == "Default" || n == DOMAIN);
    Json(json!({"domains": if all { vec![domain_json()] } else { vec![] }}))
}

async fn show_domain(_ctx: Context, Path(domain): Path<String>) -> Result<Json<Value>> {
    if domain == DOMAIN || domain == "Default" {
        Ok(Json(json!({"domain": domain_json()})))
    } else {
        Err(RegistryError::NotFound(format!(
            "Could not find domain: {domain}."
        )))
    }
}
