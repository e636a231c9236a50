//! The audit log: who changed what, when, and how it ended.
//!
//! One axum middleware ([`middleware`]) wraps every route and records each mutating request
//! (POST, PUT, PATCH, DELETE) once its response is known: the caller's user and project (from
//! the presented token's catalog record, or for a token issue from the token just issued), the
//! method, the path without its query string, the image concerned, an action name derived from
//! the route ([`classify`]) and the status code. The background job records its own changes
//! with [`record_job`]. Request and response bodies are never recorded, nor query strings or
//! headers, so passwords and tokens cannot end up in the log. Requests whose caller cannot be
//! identified and that failed (a bad token, a failed login) changed nothing and are not
//! recorded.
//!
//! Events are read with `GET /v2/audit` ([`crate::api::audit`]).

use crate::auth::{hash_token, AUTH_HEADER, SUBJECT_HEADER};
use crate::catalog::lifecycle::AuditEvent;
use crate::model::ImageRecord;
use crate::server::App;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{Method, StatusCode};
use axum::middleware::Next;
use axum::response::Response;
use std::sync::Arc;

/// Longest path recorded (longer ones are cut).
pub const MAX_PATH_LEN: usize = 1024;
/// Longest token looked up (as in authentication).
const MAX_TOKEN_LEN: usize = 512;

/// The action name and image id of a mutating request to `path`.
pub fn classify(method: &Method, path: &str) -> (String, Option<String>) {
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let m = method.as_str();
    let image = |id: &str| Some(id.to_string());
    let (action, img): (&str, Option<String>) = match (m, segs.as_slice()) {
        ("POST", ["v2", "images"]) => ("image.create", None),
        ("PATCH", ["v2", "images", id]) => ("image.update", image(id)),
        ("DELETE", ["v2", "images", id]) => ("image.delete", image(id)),
        ("PUT", ["v2", "images", id, "file"]) => ("image.upload", image(id)),
        ("POST", ["v2", "images", id, "uploads"]) => ("upload.start", image(id)),
        ("PATCH", ["v2", "images", id, "uploads", _]) => ("upload.append", image(id)),
        ("PUT", ["v2", "images", id, "uploads", _]) => ("upload.finish", image(id)),
        ("DELETE", ["v2", "images", id, "uploads", _]) => ("upload.cancel", image(id)),
        ("POST", ["v2", "images", id, "actions", a]) => {
            return (format!("image.{a}"), image(id));
        }
        ("PUT", ["v2", "images", id, "tags", _]) => ("tag.add", image(id)),
        ("DELETE", ["v2", "images", id, "tags", _]) => ("tag.delete", image(id)),
        ("POST", ["v2", "images", id, "members"]) => ("member.create", image(id)),
        ("PUT", ["v2", "images", id, "members", _]) => ("member.update", image(id)),
        ("DELETE", ["v2", "images", id, "members", _]) => ("member.delete", image(id)),
        ("POST", ["v2", "policies", "retention", "apply"]) => ("policy.apply", None),
        ("POST", ["v3", "auth", "tokens"]) | ("POST", ["v3", "api-tokens"]) => {
            ("token.issue", None)
        }
        ("DELETE", ["v3", "auth", "tokens"]) => ("token.revoke", None),
        (_, ["v3", what, ..]) => {
            let verb = match m {
                "POST" => "create",
                "DELETE" => "delete",
                _ => "update",
            };
            return (
                format!("identity.{}.{verb}", what.trim_end_matches('s')),
                None,
            );
        }
        (_, ["v2", "images", id, ..]) => ("image.other", image(id)),
        _ => ("other", None),
    };
    (action.to_string(), img)
}

/// The middleware that records every mutating request (see the module documentation).
pub async fn middleware(State(app): State<Arc<App>>, req: Request, next: Next) -> Response {
    let method = req.method().clone();
    if !matches!(
        method,
        Method::POST | Method::PUT | Method::PATCH | Method::DELETE
    ) {
        return next.run(req).await;
    }
    let mut path = req.uri().path().to_string();
    if path.len() > MAX_PATH_LEN {
        let mut cut = MAX_PATH_LEN;
        while !path.is_char_boundary(cut) {
            cut -= 1;
        }
        path.truncate(cut);
    }
    let presented = req
        .headers()
        .get(AUTH_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(|t| t.trim().to_string());
    let mut who = match presented {
        Some(t) => caller_of(&app, &t).await,
        None => None,
    };
    let (action, mut image_id) = classify(&method, &path);
    let mut resp = next.run(req).await;
    let status = resp.status();
    if who.is_none() && action == "token.issue" && status.is_success() {
        if let Some(t) = resp
            .headers()
            .get(SUBJECT_HEADER)
            .and_then(|v| v.to_str().ok())
        {
            who = caller_of(&app, t).await;
        }
    }
    if who.is_none() && !status.is_success() {
        return resp;
    }
    if action == "image.create" && status == StatusCode::CREATED {
        let (parts, body) = resp.into_parts();
        let bytes = axum::body::to_bytes(body, usize::MAX)
            .await
            .unwrap_or_default();
        image_id = serde_json::from_slice::<serde_json::Value>(&bytes)
            .ok()
            .and_then(|v| v["id"].as_str().map(str::to_string));
        resp = Response::from_parts(parts, Body::from(bytes));
    }
    let (user_id, project_id) = match who {
        Some((u, p)) => (Some(u), Some(p)),
        None => (None, None),
    };
    let event = AuditEvent {
        id: 0,
        at: app.clock.now_string(),
        user_id,
        project_id,
        method: method.as_str().to_string(),
        path,
        image_id,
        action,
        status: status.as_u16(),
        detail: None,
    };
    append(&app, &event).await;
    resp
}

/// The (user id, project id) a token was issued to, if it is known.
async fn caller_of(app: &App, token: &str) -> Option<(String, String)> {
    if token.is_empty() || token.len() > MAX_TOKEN_LEN {
        return None;
    }
    match app.catalog.get_token(&hash_token(token)).await {
        Ok(Some(t)) => Some((t.user_id, t.project_id)),
        _ => None,
    }
}

async fn append(app: &App, event: &AuditEvent) {
    if let Err(e) = app.catalog.append_audit(event).await {
        eprintln!(
            "vmi-registry: audit log: recording {} {}: {}",
            event.action,
            event.path,
            crate::error::chain(&e)
        );
    }
}

/// Record a change the background job made to `img` (attributed to the image's owner project).
pub async fn record_job(app: &App, img: &ImageRecord, action: &str, detail: String) {
    let event = AuditEvent {
        id: 0,
        at: app.clock.now_string(),
        user_id: None,
        project_id: Some(img.owner.clone()),
        method: "JOB".into(),
        path: format!("/v2/images/{}", img.id),
        image_id: Some(img.id.clone()),
        action: action.into(),
        status: StatusCode::OK.as_u16(),
        detail: Some(detail),
    };
    append(app, &event).await;
}

/// Record a change a request made to one image beyond the request's own event (a retention
/// apply deleting each image), attributed to the caller.
pub async fn record_for(
    app: &App,
    ctx: &crate::auth::Context,
    img: &ImageRecord,
    action: &str,
    detail: String,
) {
    let event = AuditEvent {
        id: 0,
        at: app.clock.now_string(),
        user_id: Some(ctx.user_id.clone()),
        project_id: Some(ctx.project_id.clone()),
        method: "POST".into(),
        path: format!("/v2/images/{}", img.id),
        image_id: Some(img.id.clone()),
        action: action.into(),
        status: StatusCode::OK.as_u16(),
        detail: Some(detail),
    };
    append(app, &event).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_map_to_action_names_and_image_ids() {
        let c = |m: Method, p: &str| classify(&m, p);
        assert_eq!(c(Method::POST, "/v2/images"), ("image.create".into(), None));
        assert_eq!(
            c(Method::PUT, "/v2/images/abc/file"),
            ("image.upload".into(), Some("abc".into()))
        );
        assert_eq!(
            c(Method::POST, "/v2/images/abc/actions/lifecycle").0,
            "image.lifecycle"
        );
        assert_eq!(c(Method::PUT, "/v2/images/abc/tags/x").0, "tag.add");
        assert_eq!(c(Method::POST, "/v3/auth/tokens").0, "token.issue");
        assert_eq!(c(Method::POST, "/v3/projects").0, "identity.project.create");
        assert_eq!(
            c(Method::DELETE, "/v2/images/abc/members/p").0,
            "member.delete"
        );
    }
}
