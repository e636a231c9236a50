//! `/v3`: the subset of Keystone's Identity API v3 that OpenStack clients need to authenticate
//! against vmi alone — version discovery, password and token authentication with a service
//! catalog listing the image endpoint, token validation and revocation — plus administration of
//! projects, users and role assignments, and static API tokens for scripts
//! (`POST /v3/api-tokens`, a vmi extension).

use super::parse_json;
use crate::auth::{
    effective_roles, hash_token, new_token, Context, MAX_PASSWORD_LEN, SUBJECT_HEADER,
};
use crate::error::{RegistryError, Result};
use crate::login::Verdict;
use crate::model::{now, Project, Role, TokenKind, TokenRecord, User};
use crate::server::App;
use axum::body::Bytes;
use axum::extract::{ConnectInfo, Path, Query, State};
use axum::http::{Extensions, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::sync::Arc;

/// Keystone's name and id for the one domain.
const DOMAIN: &str = "default";

/// Keystone's timestamp format.
pub fn keystone_time(t: chrono::DateTime<chrono::Utc>) -> String {
    t.format("%Y-%m-%dT%H:%M:%S%.6fZ").to_string()
}

/// The `/v3` routes.
pub fn router() -> Router<Arc<App>> {
    Router::new()
        .route("/", get(version))
        .route("/auth/tokens", post(issue).get(validate).delete(revoke))
        .route("/api-tokens", post(api_token))
        .route("/projects", get(list_projects).post(create_project))
        .route("/users", post(create_user))
        .route(
            "/projects/{project}/users/{user}/roles/{role}",
            put(assign_role).delete(super::identity_admin::unassign_role),
        )
        .route("/roles", get(list_roles))
        .merge(super::identity_admin::router())
}

async fn version(State(app): State<Arc<App>>, headers: HeaderMap) -> Json<Value> {
    let base = app.base_url(&headers);
    Json(json!({"version": {
        "id": "v3.14", "status": "stable", "updated": "2020-04-07T00:00:00Z",
        "links": [{"rel": "self", "href": format!("{base}/v3/")}],
        "media-types": [{"base": "application/json",
                         "type": "application/vnd.openstack.identity-v3+json"}]
    }}))
}

fn unauthorized() -> RegistryError {
    RegistryError::Unauthorized("The request you have made requires authentication.".into())
}

fn domain() -> Value {
    json!({"id": DOMAIN, "name": "Default"})
}

fn token_body(app: &App, headers: &HeaderMap, ctx: &Context, methods: &[&str]) -> Value {
    let base = app.base_url(headers);
    let region = &app.config.region;
    let endpoints = |svc: &str, url: &str| -> Vec<Value> {
        ["public", "internal", "admin"]
            .iter()
            .map(|i| {
                json!({"id": format!("{svc}-{i}"), "interface": i, "region": region,
                       "region_id": region, "url": url})
            })
            .collect()
    };
    json!({"token": {
        "methods": methods,
        "user": {"id": ctx.user_id, "name": ctx.user_name, "domain": domain(),
                 "password_expires_at": null},
        "project": {"id": ctx.project_id, "name": ctx.project_name, "domain": domain()},
        "roles": ctx.roles.iter().map(|r| json!({"id": r.as_str(), "name": r.as_str()}))
                    .collect::<Vec<_>>(),
        "issued_at": ctx.issued_at,
        "expires_at": ctx.expires_at,
        "audit_ids": [],
        "is_domain": false,
        "catalog": [
            {"type": "image", "name": "glance", "id": "image",
             "endpoints": endpoints("image", &base)},
            {"type": "identity", "name": "keystone", "id": "identity",
             "endpoints": endpoints("identity", &format!("{base}/v3"))}
        ]
    }})
}

/// Resolve `scope.project` (by id, or by name) or the user's default project.
async fn scope_project(app: &App, auth: &Value, user: &User) -> Result<Project> {
    let p = auth.pointer("/scope/project");
    let found = match p {
        Some(p) => {
            if let Some(id) = p.get("id").and_then(Value::as_str) {
                app.catalog.get_project(id).await?
            } else if let Some(name) = p.get("name").and_then(Value::as_str) {
                app.catalog.find_project(name).await?
            } else {
                return Err(RegistryError::BadRequest(
                    "scope.project needs an id or a name".into(),
                ));
            }
        }
        None if auth.get("scope").is_some() => {
            return Err(RegistryError::BadRequest(
                "only project scope is supported".into(),
            ))
        }
        None => match &user.default_project_id {
            Some(id) => app.catalog.get_project(id).await?,
            None => None,
        },
    };
    found.ok_or_else(unauthorized)
}

/// `POST /v3/auth/tokens`: password or token authentication.
async fn issue(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    extensions: Extensions,
    body: Bytes,
) -> Result<Response> {
    let v = parse_json(&body)?;
    let auth = v
        .get("auth")
        .ok_or_else(|| RegistryError::BadRequest("'auth' is required".into()))?;
    let methods: Vec<&str> = auth
        .pointer("/identity/methods")
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let user = if methods.contains(&"password") {
        let u = auth.pointer("/identity/password/user").ok_or_else(|| {
            RegistryError::BadRequest("identity.password.user is required".into())
        })?;
        let password = u
            .get("password")
            .and_then(Value::as_str)
            .filter(|p| p.len() <= MAX_PASSWORD_LEN)
            .ok_or_else(unauthorized)?
            .to_string();
        let (asked, user) = if let Some(id) = u.get("id").and_then(Value::as_str) {
            (format!("id:{id}"), app.catalog.get_user(id).await?)
        } else if let Some(name) = u.get("name").and_then(Value::as_str) {
            (format!("name:{name}"), app.catalog.find_user(name).await?)
        } else {
            return Err(unauthorized());
        };
        // Unknown, disabled and password-less accounts are checked against a dummy hash and
        // counted like the others (see crate::login).
        let user = user.filter(|u| u.enabled && u.password_hash.is_some());
        let key = user.as_ref().map_or(asked, |u| format!("user:{}", u.id));
        let stored = user.as_ref().and_then(|u| u.password_hash.clone());
        let peer = extensions
            .get::<ConnectInfo<SocketAddr>>()
            .map(|c| c.0.ip());
        let verdict = app.guards.login.check(&key, peer, stored, password).await?;
        match (verdict, user) {
            (Verdict::Accepted, Some(user)) => user,
            _ => return Err(unauthorized()),
        }
    } else if methods.contains(&"token") {
        let id = auth
            .pointer("/identity/token/id")
            .and_then(Value::as_str)
            .ok_or_else(unauthorized)?;
        let ctx = app.authenticate(id).await?;
        app.catalog
            .get_user(&ctx.user_id)
            .await?
            .ok_or_else(unauthorized)?
    } else {
        return Err(RegistryError::BadRequest(
            "identity.methods must include 'password' or 'token'".into(),
        ));
    };
    let project = scope_project(&app, auth, &user).await?;
    let roles = effective_roles(&app.catalog.roles(&user.id, &project.id).await?);
    if roles.is_empty() {
        return Err(unauthorized());
    }
    let token = new_token();
    let issued = chrono::Utc::now();
    let ttl = chrono::Duration::seconds(i64::try_from(app.config.token_ttl_secs).unwrap_or(86400));
    let rec = TokenRecord {
        token_hash: hash_token(&token),
        user_id: user.id.clone(),
        project_id: project.id.clone(),
        kind: TokenKind::Session,
        issued_at: keystone_time(issued),
        expires_at: Some(keystone_time(issued + ttl)),
    };
    app.catalog.create_token(&rec).await?;
    let ctx = Context {
        user_id: user.id,
        user_name: user.name,
        project_id: project.id,
        project_name: project.name,
        roles,
        kind: rec.kind,
        expires_at: rec.expires_at,
        issued_at: rec.issued_at,
    };
    let mut resp = (
        StatusCode::CREATED,
        Json(token_body(&app, &headers, &ctx, &methods)),
    )
        .into_response();
    let hv = HeaderValue::from_str(&token).map_err(|e| RegistryError::Config(e.to_string()))?;
    resp.headers_mut().insert(SUBJECT_HEADER, hv);
    Ok(resp)
}

fn subject(headers: &HeaderMap) -> Result<String> {
    headers
        .get(SUBJECT_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(|s| s.trim().to_string())
        .ok_or_else(|| RegistryError::BadRequest("X-Subject-Token is required".into()))
}

/// `GET /v3/auth/tokens`: validate `X-Subject-Token`.
async fn validate(
    State(app): State<Arc<App>>,
    _ctx: Context,
    headers: HeaderMap,
) -> Result<Response> {
    let token = subject(&headers)?;
    let sub = app
        .authenticate(&token)
        .await
        .map_err(|_| RegistryError::NotFound("Could not find token.".into()))?;
    let mut resp = Json(token_body(&app, &headers, &sub, &["token"])).into_response();
    if let Ok(hv) = HeaderValue::from_str(&token) {
        resp.headers_mut().insert(SUBJECT_HEADER, hv);
    }
    Ok(resp)
}

/// `DELETE /v3/auth/tokens`: revoke `X-Subject-Token` (one's own, or any as admin).
async fn revoke(
    State(app): State<Arc<App>>,
    ctx: Context,
    headers: HeaderMap,
) -> Result<StatusCode> {
    let token = subject(&headers)?;
    let sub = app
        .authenticate(&token)
        .await
        .map_err(|_| RegistryError::NotFound("Could not find token.".into()))?;
    if sub.user_id != ctx.user_id && !ctx.is_admin() {
        return Err(RegistryError::Forbidden(
            "You are not authorized to revoke this token".into(),
        ));
    }
    app.catalog.delete_token(&hash_token(&token)).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `POST /v3/api-tokens`: a non-expiring token for the caller's user and project, shown once.
async fn api_token(State(app): State<Arc<App>>, ctx: Context) -> Result<(StatusCode, Json<Value>)> {
    let token = new_token();
    let rec = TokenRecord {
        token_hash: hash_token(&token),
        user_id: ctx.user_id.clone(),
        project_id: ctx.project_id.clone(),
        kind: TokenKind::Api,
        issued_at: now(),
        expires_at: None,
    };
    app.catalog.create_token(&rec).await?;
    Ok((
        StatusCode::CREATED,
        Json(json!({"api_token": {"token": token, "user_id": ctx.user_id,
                                  "project_id": ctx.project_id}})),
    ))
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

/// `GET /v3/projects[?name=…]` (admin).
async fn list_projects(
    State(app): State<Arc<App>>,
    ctx: Context,
    Query(q): Query<std::collections::HashMap<String, String>>,
) -> Result<Json<Value>> {
    require_admin(&ctx)?;
    let ps = app.catalog.list_projects().await?;
    Ok(Json(json!({"projects": ps.iter()
        .filter(|p| q.get("name").is_none_or(|n| *n == p.name))
        .map(super::identity_admin::project_json).collect::<Vec<_>>()})))
}

/// `POST /v3/projects` with `{"project": {"name": …}}` (admin).
async fn create_project(
    State(app): State<Arc<App>>,
    ctx: Context,
    body: Bytes,
) -> Result<(StatusCode, Json<Value>)> {
    require_admin(&ctx)?;
    let v = parse_json(&body)?;
    let name = v
        .pointer("/project/name")
        .and_then(Value::as_str)
        .filter(|n| !n.is_empty() && n.len() <= 64)
        .ok_or_else(|| RegistryError::BadRequest("project.name is required".into()))?;
    let p = Project {
        id: uuid::Uuid::new_v4().simple().to_string(),
        name: name.to_string(),
    };
    app.catalog.create_project(&p).await?;
    Ok((
        StatusCode::CREATED,
        Json(json!({"project": super::identity_admin::project_json(&p)})),
    ))
}

/// `POST /v3/users` with `{"user": {"name", "password", "default_project_id"}}` (admin).
async fn create_user(
    State(app): State<Arc<App>>,
    ctx: Context,
    body: Bytes,
) -> Result<(StatusCode, Json<Value>)> {
    require_admin(&ctx)?;
    let v = parse_json(&body)?;
    let u = v
        .get("user")
        .ok_or_else(|| RegistryError::BadRequest("'user' is required".into()))?;
    let name = u
        .get("name")
        .and_then(Value::as_str)
        .filter(|n| !n.is_empty() && n.len() <= 255)
        .ok_or_else(|| RegistryError::BadRequest("user.name is required".into()))?;
    let password = u
        .get("password")
        .and_then(Value::as_str)
        .filter(|p| p.len() <= MAX_PASSWORD_LEN)
        .map(str::to_string);
    let default_project_id = u
        .get("default_project_id")
        .and_then(Value::as_str)
        .map(str::to_string);
    if let Some(p) = &default_project_id {
        if app.catalog.get_project(p).await?.is_none() {
            return Err(RegistryError::BadRequest(format!("no project {p}")));
        }
    }
    let password_hash = match password {
        Some(p) => Some(app.guards.login.hash(p).await?),
        None => None,
    };
    let user = User {
        id: uuid::Uuid::new_v4().simple().to_string(),
        name: name.to_string(),
        password_hash,
        default_project_id,
        enabled: u.get("enabled").and_then(Value::as_bool).unwrap_or(true),
    };
    app.catalog.create_user(&user).await?;
    Ok((
        StatusCode::CREATED,
        Json(json!({"user": super::identity_admin::user_json(&user)})),
    ))
}

/// `PUT /v3/projects/{project}/users/{user}/roles/{role}` (admin).
async fn assign_role(
    State(app): State<Arc<App>>,
    ctx: Context,
    Path((project, user, role)): Path<(String, String, String)>,
) -> Result<StatusCode> {
    require_admin(&ctx)?;
    let role: Role = role
        .parse()
        .map_err(|e: String| RegistryError::NotFound(e))?;
    if app.catalog.get_project(&project).await?.is_none() {
        return Err(RegistryError::NotFound(format!(
            "Could not find project: {project}"
        )));
    }
    if app.catalog.get_user(&user).await?.is_none() {
        return Err(RegistryError::NotFound(format!(
            "Could not find user: {user}"
        )));
    }
    app.catalog.assign_role(&user, &project, role).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `GET /v3/roles[?name=…]`
async fn list_roles(
    _ctx: Context,
    Query(q): Query<std::collections::HashMap<String, String>>,
) -> Json<Value> {
    Json(json!({"roles": Role::ALL.iter()
        .filter(|r| q.get("name").is_none_or(|n| n == r.as_str()))
        .map(|r| super::identity_admin::role_json(*r)).collect::<Vec<_>>()}))
}
