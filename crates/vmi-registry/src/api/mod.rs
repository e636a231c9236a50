//! The HTTP API: Glance's Image API v2 under `/v2`, version discovery at `/` and `/versions`,
//! and the Keystone v3 subset under `/v3` (see [`identity`]).
//!
//! Handlers authenticate with the [`crate::auth::Context`] extractor, decide with
//! [`crate::policy`], and fail with [`crate::RegistryError`], which alone maps errors to status
//! codes and bodies.

pub mod audit;
pub mod identity;
pub mod identity_admin;
pub mod images;
pub mod import;
pub mod lifecycle;
pub mod lineage;
pub mod members;
pub mod metadefs;
pub mod schemas;
pub mod signing;
pub mod stores;
pub mod tasks;
pub mod uploads;

use crate::error::{RegistryError, Result};
use crate::server::App;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use serde_json::{json, Value};
use std::sync::Arc;

/// Largest JSON request body (metadata, patches, token requests).
pub const MAX_JSON_BODY: usize = 1 << 20;

/// Image API versions this service answers to, newest first (Glance 2.0 … 2.16 share the
/// wire format implemented here).
const VERSIONS: [(&str, &str); 4] = [
    ("v2.16", "CURRENT"),
    ("v2.9", "SUPPORTED"),
    ("v2.1", "SUPPORTED"),
    ("v2.0", "SUPPORTED"),
];

/// The whole application.
pub fn router(app: Arc<App>) -> Router {
    let v2 = Router::new()
        .route("/schemas/image", get(schemas::image))
        .route("/schemas/images", get(schemas::images))
        .route("/schemas/member", get(schemas::member))
        .route("/schemas/members", get(schemas::members))
        .route("/images", get(images::list).post(images::create))
        .route(
            "/images/{id}",
            get(images::show)
                .patch(images::update)
                .delete(images::delete),
        )
        .route(
            "/images/{id}/file",
            put(images::upload)
                .get(import::download)
                .layer(DefaultBodyLimit::disable()),
        )
        .route("/images/{id}/uploads", post(uploads::create))
        .route(
            "/images/{id}/uploads/{session}",
            get(uploads::status)
                .patch(uploads::append)
                .put(uploads::finish)
                .delete(uploads::cancel)
                .layer(DefaultBodyLimit::disable()),
        )
        .route("/images/{id}/actions/deactivate", post(images::deactivate))
        .route("/images/{id}/actions/reactivate", post(images::reactivate))
        .route(
            "/images/{id}/tags/{tag}",
            put(images::add_tag).delete(images::delete_tag),
        )
        .route(
            "/images/{id}/members",
            get(members::list).post(members::create),
        )
        .route(
            "/images/{id}/members/{member}",
            get(members::show)
                .put(members::update)
                .delete(members::delete),
        )
        .route("/images/{id}/actions/lifecycle", post(lifecycle::lifecycle))
        .route("/images/{id}/actions/restore", post(lifecycle::restore))
        .route(
            "/policies/retention/report",
            get(lifecycle::retention_report),
        )
        .route(
            "/policies/retention/apply",
            post(lifecycle::retention_apply),
        )
        .route("/audit", get(audit::list))
        .route("/signing-keys", get(signing::list).post(signing::create))
        .route(
            "/signing-keys/{id}",
            get(signing::show).delete(signing::delete),
        )
        .route(
            "/images/{id}/stage",
            put(import::stage).layer(DefaultBodyLimit::disable()),
        )
        .route("/images/{id}/import", post(import::import))
        .route("/info/import", get(import::info))
        .route("/info/stores", get(stores::info))
        .merge(lineage::router())
        .merge(metadefs::router())
        .merge(tasks::router());
    Router::new()
        .route("/", get(versions_multiple))
        .route("/versions", get(versions))
        .route("/v2", get(versions))
        .route("/v2/", get(versions))
        .nest("/v2", v2)
        .nest("/v3", identity::router())
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(MAX_JSON_BODY))
        .layer(axum::middleware::from_fn_with_state(
            app.clone(),
            crate::audit::middleware,
        ))
        .with_state(app)
}

async fn not_found() -> RegistryError {
    RegistryError::NotFound("The resource could not be found.".into())
}

fn versions_body(app: &App, headers: &HeaderMap) -> Value {
    let base = app.base_url(headers);
    let v: Vec<Value> = VERSIONS
        .iter()
        .map(|(id, status)| {
            json!({"id": id, "status": status,
                   "links": [{"rel": "self", "href": format!("{base}/v2/")}]})
        })
        .collect();
    json!({ "versions": v })
}

/// `GET /`: 300 Multiple Choices with the version list, as Glance answers.
async fn versions_multiple(State(app): State<Arc<App>>, headers: HeaderMap) -> Response {
    (
        StatusCode::MULTIPLE_CHOICES,
        Json(versions_body(&app, &headers)),
    )
        .into_response()
}

/// `GET /versions`: the version list.
async fn versions(State(app): State<Arc<App>>, headers: HeaderMap) -> Json<Value> {
    Json(versions_body(&app, &headers))
}

/// Parse a JSON request body.
pub(crate) fn parse_json(body: &[u8]) -> Result<Value> {
    serde_json::from_slice(body)
        .map_err(|e| RegistryError::BadRequest(format!("Malformed JSON in request body: {e}")))
}

/// The request's media type, lowercased, without parameters.
pub(crate) fn media_type(headers: &HeaderMap) -> Option<String> {
    headers
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| {
            v.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase()
        })
}
