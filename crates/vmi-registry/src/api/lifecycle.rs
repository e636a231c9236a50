//! vmi extensions for the image lifecycle and policies:
//!
//! - `POST /v2/images/{id}/actions/lifecycle` (owner or admin): move an image forward through
//!   active → deprecated → obsolete → retired and/or schedule those moves, with a replacement.
//!   Body: `{"state": …, "replacement": id|null, "deprecate_at": time|null, "obsolete_at": …,
//!   "delete_at": …}`, every key optional (`null` clears). `"state": "active"` on a deprecated
//!   or obsolete image is the admin-only `undeprecate`, which also clears the schedule.
//! - `POST /v2/images/{id}/actions/restore` (owner or admin): bring a recycled
//!   (`pending_delete`) image back.
//! - `GET /v2/policies/retention/report?family=F`: the retention dry run (admins: every
//!   project's versions; others: their project's).
//! - `POST /v2/policies/retention/apply?family=F` (admin): move what the report removes to the
//!   recycle bin.

use super::images::{image_json, load_visible};
use super::parse_json;
use crate::auth::Context;
use crate::error::{RegistryError, Result};
use crate::lifecycle::job::transition;
use crate::lifecycle::recycle;
use crate::lifecycle::{parse_date, Lifecycle, LifecycleState};
use crate::model::Status;
use crate::policy;
use crate::server::App;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::Json;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::Arc;

fn bad(msg: impl Into<String>) -> RegistryError {
    RegistryError::BadRequest(msg.into())
}

/// A `string | null` field of the request: `None` when absent, `Some(None)` when null.
fn nullable<'a>(
    obj: &'a serde_json::Map<String, Value>,
    key: &str,
) -> Result<Option<Option<&'a str>>> {
    match obj.get(key) {
        None => Ok(None),
        Some(Value::Null) => Ok(Some(None)),
        Some(Value::String(s)) => Ok(Some(Some(s.as_str()))),
        Some(_) => Err(bad(format!("{key} must be a string or null"))),
    }
}

/// `POST /v2/images/{id}/actions/lifecycle`
pub async fn lifecycle(
    State(app): State<Arc<App>>,
    ctx: Context,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Json<Value>> {
    let img = load_visible(&app, &ctx, &id).await?;
    policy::check_modify(&ctx, &img)?;
    if !matches!(img.status, Status::Active | Status::Deactivated) {
        return Err(RegistryError::Conflict(format!(
            "Image {id} is {}: only active or deactivated images have a lifecycle",
            img.status
        )));
    }
    let v = parse_json(&body)?;
    let obj = v
        .as_object()
        .ok_or_else(|| bad("the request body must be a JSON object"))?;
    for k in obj.keys() {
        if ![
            "state",
            "replacement",
            "deprecate_at",
            "obsolete_at",
            "delete_at",
        ]
        .contains(&k.as_str())
        {
            return Err(bad(format!("unknown lifecycle field '{k}'")));
        }
    }
    let from = Lifecycle::of(&img);
    let mut to = from.clone();
    if let Some(s) = nullable(obj, "state")? {
        let target: LifecycleState = s
            .ok_or_else(|| bad("state cannot be null"))?
            .parse()
            .map_err(bad)?;
        if target < from.state {
            if target != LifecycleState::Active || !ctx.is_admin() {
                return Err(RegistryError::Forbidden(format!(
                    "Image {id} is {}: lifecycle states only move forward (an admin may \
                     undeprecate it to active)",
                    from.state
                )));
            }
            // Undeprecate: back to active, schedule and replacement cleared.
            to = Lifecycle {
                state: LifecycleState::Active,
                replacement: None,
                deprecate_at: None,
                obsolete_at: None,
                delete_at: None,
            };
        } else if target > from.state {
            to.advance(target);
        }
    }
    if let Some(r) = nullable(obj, "replacement")? {
        to.replacement = match r {
            None => None,
            Some(r) => Some(check_replacement(&app, &ctx, &id, r).await?),
        };
    }
    for (key, slot, reached) in [
        (
            "deprecate_at",
            &mut to.deprecate_at,
            LifecycleState::Deprecated,
        ),
        ("obsolete_at", &mut to.obsolete_at, LifecycleState::Obsolete),
        ("delete_at", &mut to.delete_at, LifecycleState::Retired),
    ] {
        if let Some(d) = nullable(obj, key)? {
            match d {
                None => *slot = None,
                Some(d) => {
                    if to.state >= reached {
                        return Err(bad(format!("{key}: image {id} is already {}", to.state)));
                    }
                    *slot = Some(parse_date(key, d)?);
                }
            }
        }
    }
    to.check_order()?;
    if to.state == LifecycleState::Retired && img.protected {
        return Err(RegistryError::Forbidden(format!(
            "Image {id} is protected and cannot be retired."
        )));
    }
    if !transition(&app, &img, &from, &to, Some(ctx.user_id.clone())).await? {
        return Err(RegistryError::Conflict(format!(
            "Image {id} was changed by another request; retry"
        )));
    }
    let now = app
        .catalog
        .get_image(&id)
        .await?
        .ok_or_else(|| policy::not_found(&id))?;
    Ok(Json(image_json(&now)))
}

/// The replacement `r` of image `id`, if `ctx` may see it and it is active and not itself
/// deprecated.
async fn check_replacement(app: &App, ctx: &Context, id: &str, r: &str) -> Result<String> {
    if r == id {
        return Err(bad("an image cannot replace itself"));
    }
    let rep = load_visible(app, ctx, r)
        .await
        .map_err(|_| bad(format!("replacement image {r} not found")))?;
    if rep.status != Status::Active {
        return Err(bad(format!(
            "replacement image {r} is {}, not active",
            rep.status
        )));
    }
    let state = Lifecycle::of(&rep).state;
    if state != LifecycleState::Active {
        return Err(bad(format!("replacement image {r} is itself {state}")));
    }
    Ok(rep.id)
}

/// `POST /v2/images/{id}/actions/restore`
pub async fn restore(
    State(app): State<Arc<App>>,
    ctx: Context,
    Path(id): Path<String>,
) -> Result<Json<Value>> {
    let img = load_visible(&app, &ctx, &id).await?;
    policy::check_modify(&ctx, &img)?;
    if img.status != Status::PendingDelete {
        return Err(RegistryError::Conflict(format!(
            "Image {id} is {}, not in the recycle bin",
            img.status
        )));
    }
    recycle::restore(&app, &id).await?;
    let now = app
        .catalog
        .get_image(&id)
        .await?
        .ok_or_else(|| policy::not_found(&id))?;
    Ok(Json(image_json(&now)))
}

fn family_param(params: &HashMap<String, String>) -> Result<&str> {
    params
        .get("family")
        .map(String::as_str)
        .filter(|f| !f.is_empty())
        .ok_or_else(|| bad("the family query parameter is required"))
}

/// `GET /v2/policies/retention/report?family=F`
pub async fn retention_report(
    State(app): State<Arc<App>>,
    ctx: Context,
    Query(params): Query<HashMap<String, String>>,
) -> Result<Json<Value>> {
    let family = family_param(&params)?;
    let project = (!ctx.is_admin()).then_some(ctx.project_id.as_str());
    let (items, _) = crate::policies::retention(&app, family, project).await?;
    let removed: Vec<&str> = items
        .iter()
        .filter(|i| i.remove)
        .map(|i| i.id.as_str())
        .collect();
    Ok(Json(json!({
        "family": family,
        "dry_run": true,
        "images": items,
        "remove": removed,
    })))
}

/// `POST /v2/policies/retention/apply?family=F` (admin)
pub async fn retention_apply(
    State(app): State<Arc<App>>,
    ctx: Context,
    Query(params): Query<HashMap<String, String>>,
) -> Result<Json<Value>> {
    if !ctx.is_admin() {
        return Err(RegistryError::Forbidden(
            "Applying a retention policy is an admin operation".into(),
        ));
    }
    let family = family_param(&params)?;
    let (items, imgs) = crate::policies::retention(&app, family, None).await?;
    let mut removed = Vec::new();
    let mut failed = Vec::new();
    for item in items.iter().filter(|i| i.remove) {
        let Some(img) = imgs.iter().find(|i| i.id == item.id) else {
            continue;
        };
        match recycle::remove(&app, img, Some(ctx.user_id.clone())).await {
            Ok(_) => {
                crate::audit::record_for(
                    &app,
                    &ctx,
                    img,
                    "image.delete",
                    format!("retention of family {family}: {}", item.reason),
                )
                .await;
                removed.push(item.id.clone());
            }
            Err(e) => failed.push(json!({"id": item.id, "error": e.to_string()})),
        }
    }
    Ok(Json(json!({
        "family": family,
        "dry_run": false,
        "images": items,
        "removed": removed,
        "failed": failed,
    })))
}
