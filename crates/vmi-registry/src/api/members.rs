//! `/v2/images/{id}/members`: sharing an image with other projects.
//!
//! The owner adds and removes members of a `shared` image; each member project accepts or
//! rejects the share itself. A member sees only its own membership.

use super::images::load_visible;
use super::parse_json;
use crate::auth::Context;
use crate::error::{RegistryError, Result};
use crate::model::{now, ImageRecord, MemberRecord, MemberStatus, Visibility, MAX_MEMBERS};
use crate::policy;
use crate::server::App;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use serde_json::{json, Value};
use std::sync::Arc;

/// A member as the API shows it.
pub fn member_json(m: &MemberRecord) -> Value {
    json!({
        "created_at": m.created_at,
        "image_id": m.image_id,
        "member_id": m.member_id,
        "schema": "/v2/schemas/member",
        "status": m.status.as_str(),
        "updated_at": m.updated_at,
    })
}

fn member_not_found(image: &str, member: &str) -> RegistryError {
    RegistryError::NotFound(format!("Member {member} not found for image {image}"))
}

fn owns(ctx: &Context, img: &ImageRecord) -> bool {
    ctx.is_admin() || img.owner == ctx.project_id
}

/// `POST /v2/images/{id}/members` with `{"member": "<project id>"}`.
pub async fn create(
    State(app): State<Arc<App>>,
    ctx: Context,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Json<Value>> {
    let img = load_visible(&app, &ctx, &id).await?;
    policy::check_modify(&ctx, &img)?;
    if img.visibility != Visibility::Shared {
        return Err(RegistryError::Forbidden(
            "Only shared images have members.".into(),
        ));
    }
    let v = parse_json(&body)?;
    let member = v
        .get("member")
        .and_then(Value::as_str)
        .filter(|m| !m.is_empty() && m.len() <= 255)
        .ok_or_else(|| RegistryError::BadRequest("'member' must be a project id".into()))?;
    if app.catalog.list_members(&id).await?.len() >= MAX_MEMBERS {
        return Err(RegistryError::PayloadTooLarge(format!(
            "Maximum number of members exceeded: {MAX_MEMBERS}"
        )));
    }
    let t = now();
    let m = MemberRecord {
        image_id: id.clone(),
        member_id: member.to_string(),
        status: MemberStatus::Pending,
        created_at: t.clone(),
        updated_at: t,
    };
    match app.catalog.add_member(&m).await {
        Err(RegistryError::Conflict(_)) => Err(RegistryError::Conflict(format!(
            "Member {member} already associated with image {id}"
        ))),
        other => other,
    }?;
    Ok(Json(member_json(&m)))
}

/// `GET /v2/images/{id}/members`
pub async fn list(
    State(app): State<Arc<App>>,
    ctx: Context,
    Path(id): Path<String>,
) -> Result<Json<Value>> {
    let img = load_visible(&app, &ctx, &id).await?;
    let mut members = app.catalog.list_members(&id).await?;
    if !owns(&ctx, &img) {
        members.retain(|m| m.member_id == ctx.project_id);
    }
    Ok(Json(json!({
        "members": members.iter().map(member_json).collect::<Vec<_>>(),
        "schema": "/v2/schemas/members",
    })))
}

/// `GET /v2/images/{id}/members/{member}`
pub async fn show(
    State(app): State<Arc<App>>,
    ctx: Context,
    Path((id, member)): Path<(String, String)>,
) -> Result<Json<Value>> {
    let img = load_visible(&app, &ctx, &id).await?;
    if !owns(&ctx, &img) && member != ctx.project_id {
        return Err(member_not_found(&id, &member));
    }
    let m = app
        .catalog
        .get_member(&id, &member)
        .await?
        .ok_or_else(|| member_not_found(&id, &member))?;
    Ok(Json(member_json(&m)))
}

/// `PUT /v2/images/{id}/members/{member}` with `{"status": "accepted"}`: by the member only.
pub async fn update(
    State(app): State<Arc<App>>,
    ctx: Context,
    Path((id, member)): Path<(String, String)>,
    body: Bytes,
) -> Result<Json<Value>> {
    let img = load_visible(&app, &ctx, &id).await?;
    let mut m = app
        .catalog
        .get_member(&id, &member)
        .await?
        .filter(|_| owns(&ctx, &img) || member == ctx.project_id)
        .ok_or_else(|| member_not_found(&id, &member))?;
    if member != ctx.project_id || !ctx.can_write() {
        return Err(RegistryError::Forbidden(
            "You are not permitted to modify 'status' on this image member.".into(),
        ));
    }
    let v = parse_json(&body)?;
    let status = v
        .get("status")
        .and_then(Value::as_str)
        .ok_or_else(|| RegistryError::BadRequest("'status' is required".into()))?;
    m.status = status.parse().map_err(RegistryError::BadRequest)?;
    m.updated_at = now();
    if !app.catalog.update_member(&m).await? {
        return Err(member_not_found(&id, &member));
    }
    Ok(Json(member_json(&m)))
}

/// `DELETE /v2/images/{id}/members/{member}`: by the owner.
pub async fn delete(
    State(app): State<Arc<App>>,
    ctx: Context,
    Path((id, member)): Path<(String, String)>,
) -> Result<StatusCode> {
    let img = load_visible(&app, &ctx, &id).await?;
    if !owns(&ctx, &img) {
        return Err(if member == ctx.project_id {
            RegistryError::Forbidden("Only the image owner may remove members.".into())
        } else {
            member_not_found(&id, &member)
        });
    }
    policy::check_modify(&ctx, &img)?;
    if !app.catalog.delete_member(&id, &member).await? {
        return Err(member_not_found(&id, &member));
    }
    Ok(StatusCode::NO_CONTENT)
}
