//! vmi extensions for the image lifecycle and policies:
//!
//! - `POST /v2/images/{id}/actions/lifecycle` (owner or admin): move an image forward through
//!   active → deprecated → obsolete → retired and/or schedule those moves, with a replacement.
//!   Body: `{"state": …, "replacement": id|null, "deprecate_at": time|null, "obsolete_at": …,
//!   "delete_at": …}`, every key optional (`null` clears). `"state": "active"` on a deprecated
//!   or obsolete image is the admin-only `undeprecate`, which also clears the schedule.
//! - `POST /v2/images/{id}/actions/restore` (owner or admin): bring a recycled
//!   (`pending_delete`) image back.
//! - `GET /v2/policies/retention/report[?family=F]`: the retention dry run (admins: every
//!   project's versions; others: their project's).
//! - `POST /v2/policies/retention/apply[?family=F]` (admin): move what the report removes to the
//!   recycle bin.
//!
//!   Without `family` both cover every family (the caller's project's, or every project's for an
//!   admin) and answer `{"families": [...]}` with the ids of all families together.

use super::images::{image_json, load_visible};
use super::parse_json;
use crate::auth::Context;
use crate::catalog::lineage::FamilyQuery;
use crate::catalog::Viewer;
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

/// The families a retention request covers: `?family=F`, or without it every family (of the
/// caller's project, or every project's for an admin).
async fn retention_families(
    app: &App,
    params: &HashMap<String, String>,
    project: Option<&str>,
) -> Result<Vec<String>> {
    if let Some(f) = params.get("family") {
        if f.is_empty() {
            return Err(bad("family must not be empty"));
        }
        return Ok(vec![f.clone()]);
    }
    let mut q = FamilyQuery {
        viewer: Viewer::Admin,
        owner: project.map(str::to_string),
        after: None,
        limit: crate::lineage::MAX_FAMILIES,
    };
    let mut names = std::collections::BTreeSet::new();
    loop {
        let page = app.catalog.family_names(&q).await?;
        let full = page.len() == q.limit as usize;
        q.after = page.last().map(|(o, f)| (f.clone(), o.clone()));
        names.extend(page.into_iter().map(|(_, f)| f));
        if !full {
            break;
        }
    }
    Ok(names.into_iter().collect())
}

/// The answer for several families: each family's report, and everything together.
fn retention_answer(
    params: &HashMap<String, String>,
    mut per_family: Vec<Value>,
    dry_run: bool,
    key: &str,
    ids: Vec<String>,
    failed: Vec<Value>,
) -> Value {
    if params.contains_key("family") {
        if let Some(mut one) = per_family.pop() {
            one["dry_run"] = json!(dry_run);
            if !dry_run {
                one["failed"] = json!(failed);
            }
            return one;
        }
    }
    let mut v = json!({ "dry_run": dry_run, "families": per_family, key: ids });
    if !dry_run {
        v["failed"] = json!(failed);
    }
    v
}

/// `GET /v2/policies/retention/report[?family=F]`
pub async fn retention_report(
    State(app): State<Arc<App>>,
    ctx: Context,
    Query(params): Query<HashMap<String, String>>,
) -> Result<Json<Value>> {
    let project = (!ctx.is_admin()).then_some(ctx.project_id.as_str());
    let mut per_family = Vec::new();
    let mut all = Vec::new();
    for family in retention_families(&app, &params, project).await? {
        let (items, _) = crate::policies::retention(&app, &family, project).await?;
        let removed: Vec<String> = items
            .iter()
            .filter(|i| i.remove)
            .map(|i| i.id.clone())
            .collect();
        all.extend(removed.iter().cloned());
        per_family.push(json!({"family": family, "images": items, "remove": removed}));
    }
    Ok(Json(retention_answer(
        &params,
        per_family,
        true,
        "remove",
        all,
        Vec::new(),
    )))
}

/// `POST /v2/policies/retention/apply[?family=F]` (admin)
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
    let mut per_family = Vec::new();
    let mut all = Vec::new();
    let mut failed = Vec::new();
    for family in retention_families(&app, &params, None).await? {
        let (items, imgs) = crate::policies::retention(&app, &family, None).await?;
        let mut removed = Vec::new();
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
        all.extend(removed.iter().cloned());
        per_family.push(json!({"family": family, "images": items, "removed": removed}));
    }
    Ok(Json(retention_answer(
        &params, per_family, false, "removed", all, failed,
    )))
}
