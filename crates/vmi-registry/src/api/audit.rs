//! `GET /v2/audit` (a vmi extension): the audit log, newest first. Admins read every event
//! (optionally `project_id=`); others read their project's. Filters: `image_id`, `action`,
//! `since` and `until` (RFC 3339; since inclusive, until exclusive); paging with `limit`
//! (default 100, at most 1000) and `marker` (the last event id of the previous page), and a
//! `next` link while more remain.

use super::images::encode;
use crate::auth::Context;
use crate::catalog::lifecycle::AuditQuery;
use crate::error::{RegistryError, Result};
use crate::lifecycle::parse_date;
use crate::server::App;
use axum::extract::{Query, State};
use axum::Json;
use serde_json::{json, Value};
use std::sync::Arc;

/// Events per page unless `limit` says otherwise.
const DEFAULT_LIMIT: u32 = 100;
/// Most events per page.
const MAX_LIMIT: u32 = 1000;

fn bad(msg: impl Into<String>) -> RegistryError {
    RegistryError::BadRequest(msg.into())
}

/// `GET /v2/audit`
pub async fn list(
    State(app): State<Arc<App>>,
    ctx: Context,
    Query(params): Query<Vec<(String, String)>>,
) -> Result<Json<Value>> {
    let mut q = AuditQuery {
        limit: DEFAULT_LIMIT,
        ..AuditQuery::default()
    };
    for (k, v) in &params {
        match k.as_str() {
            "image_id" => q.image_id = Some(v.clone()),
            "action" => q.action = Some(v.clone()),
            "since" => q.since = Some(parse_date("since", v)?),
            "until" => q.until = Some(parse_date("until", v)?),
            "project_id" => q.project_id = Some(v.clone()),
            "marker" => {
                q.before_id = Some(
                    v.parse()
                        .map_err(|_| bad("marker must be an audit event id"))?,
                )
            }
            "limit" => {
                let n: u32 = v
                    .parse()
                    .map_err(|_| bad("limit must be a non-negative integer"))?;
                q.limit = n.min(MAX_LIMIT);
            }
            _ => return Err(bad(format!("unknown audit filter '{k}'"))),
        }
    }
    if !ctx.is_admin() {
        if q.project_id.as_ref().is_some_and(|p| *p != ctx.project_id) {
            return Err(RegistryError::Forbidden(
                "Only admins read other projects' audit events".into(),
            ));
        }
        q.project_id = Some(ctx.project_id.clone());
    }
    let limit = q.limit;
    q.limit = limit.saturating_add(1);
    let mut events = app.catalog.list_audit(&q).await?;
    let more = events.len() > limit as usize;
    events.truncate(limit as usize);
    let mut body = json!({ "events": events });
    if more {
        if let Some(last) = events.last() {
            let mut qs: Vec<String> = params
                .iter()
                .filter(|(k, _)| k != "marker")
                .map(|(k, v)| format!("{}={}", encode(k), encode(v)))
                .collect();
            qs.push(format!("marker={}", last.id));
            body["next"] = json!(format!("/v2/audit?{}", qs.join("&")));
        }
    }
    Ok(Json(body))
}
