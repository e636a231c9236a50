//! `/v2/images/{id}/uploads`: resumable uploads (a vmi extension, shaped like the OCI
//! distribution spec's chunked uploads and tus' offsets) so that a multi-GB upload survives a
//! dropped connection and can continue on any node.
//!
//! - `POST …/uploads` opens a session (`queued → saving`): 202, `Location`, `Upload-Offset: 0`.
//! - `PATCH …/uploads/{session}` with `Upload-Offset: N` (or `Content-Range: bytes N-…`)
//!   appends the body as a chunk starting at N; N must be the session's offset (else 409 with
//!   the current `Upload-Offset`). A chunk is stored whole or not at all.
//! - `HEAD`/`GET …/uploads/{session}`: 204 with the current `Upload-Offset`.
//! - `PUT …/uploads/{session}?digest=sha256:HEX` assembles the chunks into the image while
//!   computing Glance's digests, checks the SHA-256, inspects and activates like a direct upload.
//! - `DELETE …/uploads/{session}` cancels (`saving → queued`).
//!
//! All session state lives in the image store and the catalog, so any node can take the next
//! request. Each chunk refreshes the image's `updated_at`, so only sessions idle for longer than
//! the reaper's grace are abandoned (image back to `queued`, chunks removed).

use super::images::{load_visible, receive};
use crate::auth::Context;
use crate::catalog::save_changes;
use crate::data::Chunk;
use crate::error::{RegistryError, Result};
use crate::model::{now, ImageRecord, Status};
use crate::policy;
use crate::server::App;
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use futures_util::{StreamExt, TryStreamExt};
use std::collections::HashMap;
use std::sync::Arc;

/// The offset header (tus' name).
pub const OFFSET_HEADER: &str = "upload-offset";

fn no_session(sid: &str) -> RegistryError {
    RegistryError::NotFound(format!("No upload session {sid}"))
}

fn offset_response(status: StatusCode, offset: u64, location: Option<String>) -> Response {
    let mut r = status.into_response();
    let h = r.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&offset.to_string()) {
        h.insert(OFFSET_HEADER, v);
    }
    if offset > 0 {
        if let Ok(v) = HeaderValue::from_str(&format!("0-{}", offset - 1)) {
            h.insert(header::RANGE, v);
        }
    }
    if let Some(l) = location.and_then(|l| HeaderValue::from_str(&l).ok()) {
        h.insert(header::LOCATION, l);
    }
    r
}

fn end_of(chunks: &[Chunk]) -> u64 {
    chunks
        .last()
        .map(|c| c.offset.saturating_add(c.len))
        .unwrap_or(0)
}

/// The image (saving, modifiable by `ctx`) and the session's chunks, or 404.
async fn open_session(
    app: &App,
    ctx: &Context,
    id: &str,
    sid: &str,
) -> Result<(ImageRecord, Vec<Chunk>)> {
    if uuid::Uuid::parse_str(sid).is_err() {
        return Err(no_session(sid));
    }
    let img = load_visible(app, ctx, id).await?;
    policy::check_modify(ctx, &img)?;
    if img.status != Status::Saving {
        return Err(no_session(sid));
    }
    let chunks = app
        .data
        .session_chunks(&img.id, sid)
        .await?
        .ok_or_else(|| no_session(sid))?;
    Ok((img, chunks))
}

async fn requeue(app: &App, img: &ImageRecord) {
    let mut q = img.clone();
    q.status = Status::Queued;
    q.updated_at = now();
    let _ = save_changes(app.catalog.as_ref(), img, &q, Status::Saving).await;
}

/// `POST /v2/images/{id}/uploads`
pub async fn create(
    State(app): State<Arc<App>>,
    ctx: Context,
    Path(id): Path<String>,
) -> Result<Response> {
    let img = load_visible(&app, &ctx, &id).await?;
    policy::check_modify(&ctx, &img)?;
    if img.disk_format.is_none() || img.container_format.is_none() {
        return Err(RegistryError::BadRequest(
            "Properties disk_format, container_format must be set prior to saving data.".into(),
        ));
    }
    if img.status != Status::Queued {
        return Err(RegistryError::Conflict(format!(
            "Image status transition from {} to saving is not allowed",
            img.status
        )));
    }
    crate::signing::check_before_data(&app, &img).await?;
    let mut saving = img.clone();
    saving.status = Status::Saving;
    saving.updated_at = now();
    let Some(saving) = save_changes(app.catalog.as_ref(), &img, &saving, Status::Queued).await?
    else {
        return Err(RegistryError::Conflict(format!(
            "Image {id} is already being uploaded by another request"
        )));
    };
    let sid = uuid::Uuid::new_v4().to_string();
    if let Err(e) = app.data.session_create(&id, &sid).await {
        requeue(&app, &saving).await;
        return Err(e);
    }
    Ok(offset_response(
        StatusCode::ACCEPTED,
        0,
        Some(format!("/v2/images/{id}/uploads/{sid}")),
    ))
}

/// `GET`/`HEAD /v2/images/{id}/uploads/{session}`
pub async fn status(
    State(app): State<Arc<App>>,
    ctx: Context,
    Path((id, sid)): Path<(String, String)>,
) -> Result<Response> {
    let (_, chunks) = open_session(&app, &ctx, &id, &sid).await?;
    Ok(offset_response(
        StatusCode::NO_CONTENT,
        end_of(&chunks),
        None,
    ))
}

/// The start offset a `PATCH` names.
fn requested_offset(headers: &HeaderMap) -> Result<u64> {
    let bad = |m: &str| RegistryError::BadRequest(m.into());
    if let Some(v) = headers.get(OFFSET_HEADER) {
        return v
            .to_str()
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .ok_or_else(|| bad("Upload-Offset must be a number"));
    }
    if let Some(v) = headers.get(header::CONTENT_RANGE) {
        let s = v.to_str().unwrap_or("").trim();
        let s = s.strip_prefix("bytes ").unwrap_or(s);
        return s
            .split(['-', '/'])
            .next()
            .and_then(|n| n.trim().parse().ok())
            .ok_or_else(|| bad("Content-Range must be 'bytes START-END'"));
    }
    Err(bad("a chunk needs Upload-Offset or Content-Range"))
}

/// `PATCH /v2/images/{id}/uploads/{session}`
pub async fn append(
    State(app): State<Arc<App>>,
    ctx: Context,
    Path((id, sid)): Path<(String, String)>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response> {
    let (img, chunks) = open_session(&app, &ctx, &id, &sid).await?;
    let offset = end_of(&chunks);
    let asked = requested_offset(&headers)?;
    if asked != offset {
        let mut r =
            RegistryError::Conflict(format!("the session is at offset {offset}, not {asked}"))
                .into_response();
        if let Ok(v) = HeaderValue::from_str(&offset.to_string()) {
            r.headers_mut().insert(OFFSET_HEADER, v);
        }
        return Ok(r);
    }
    let cap = app.config.image_size_cap;
    let mut sink = app.data.session_append(&id, &sid, offset).await?;
    let mut stream = body.into_data_stream();
    let mut total = offset;
    let streamed: Result<()> = async {
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| {
                RegistryError::BadRequest(format!("Error reading the request body: {e}"))
            })?;
            total = total.saturating_add(chunk.len() as u64);
            if total > cap {
                return Err(RegistryError::PayloadTooLarge(format!(
                    "Image exceeds the storage quota of {cap} bytes"
                )));
            }
            sink.write(chunk).await?;
        }
        Ok(())
    }
    .await;
    if let Err(e) = streamed {
        sink.abort().await;
        return Err(e);
    }
    if total == offset {
        sink.abort().await;
    } else {
        sink.finish().await?;
    }
    // Keep the session from looking abandoned.
    let mut fresh = img.clone();
    fresh.updated_at = now();
    let _ = save_changes(app.catalog.as_ref(), &img, &fresh, Status::Saving).await?;
    Ok(offset_response(StatusCode::NO_CONTENT, total, None))
}

/// `PUT /v2/images/{id}/uploads/{session}?digest=sha256:HEX`
pub async fn finish(
    State(app): State<Arc<App>>,
    ctx: Context,
    Path((id, sid)): Path<(String, String)>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<StatusCode> {
    let digest = q
        .get("digest")
        .and_then(|d| d.strip_prefix("sha256:"))
        .filter(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
        .ok_or_else(|| {
            RegistryError::BadRequest("digest=sha256:<64 hex digits> is required".into())
        })?
        .to_string();
    let (img, chunks) = open_session(&app, &ctx, &id, &sid).await?;
    let data = app.data.clone();
    let stream = futures_util::stream::iter(chunks)
        .then(move |c| {
            let data = data.clone();
            async move {
                data.read(&c.location, None)
                    .await
                    .map(|s| s.map_err(|e| RegistryError::io("reading an upload chunk", e)))
            }
        })
        .try_flatten()
        .boxed();
    let r = receive(&app, &img, stream, app.config.image_size_cap, Some(&digest)).await;
    match &r {
        Ok(()) => {}
        // Wrong or refused data: the session is over.
        Err(e) if e.status().is_client_error() => requeue(&app, &img).await,
        // A server-side failure: keep the session so the client can retry the PUT.
        Err(_) => return r.map(|()| StatusCode::NO_CONTENT),
    }
    if let Err(e) = app.data.session_delete(&id, &sid).await {
        eprintln!(
            "vmi-registry: removing upload session {sid}: {}; the reaper will remove it",
            crate::error::chain(&e)
        );
    }
    r.map(|()| StatusCode::NO_CONTENT)
}

/// `DELETE /v2/images/{id}/uploads/{session}`
pub async fn cancel(
    State(app): State<Arc<App>>,
    ctx: Context,
    Path((id, sid)): Path<(String, String)>,
) -> Result<StatusCode> {
    let (img, _) = open_session(&app, &ctx, &id, &sid).await?;
    app.data.session_delete(&id, &sid).await?;
    requeue(&app, &img).await;
    Ok(StatusCode::NO_CONTENT)
}
