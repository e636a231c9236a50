//! Glance's interoperable image import — `PUT /v2/images/{id}/stage`,
//! `POST /v2/images/{id}/import`, `GET /v2/info/import` — and downloads in another format,
//! `GET /v2/images/{id}/file?format=…` (a vmi extension; see [`crate::import`]).

use super::media_type;
use super::parse_json;
use crate::auth::Context;
use crate::catalog::import::{Conversion, ImportTask, TaskState};
use crate::catalog::save_changes;
use crate::error::{RegistryError, Result};
use crate::import::convert::{convert_stored, DOWNLOAD_FORMATS};
use crate::import::stream::{convert_streaming, STREAMABLE};
use crate::import::{
    delete_quietly, fail, inspect_stored, mark_importing, start_task, store_stream, web,
    COPY_IMAGE, GLANCE_DIRECT, STORE_ID, WEB_DOWNLOAD,
};
use crate::model::{now, Status};
use crate::policy;
use crate::server::App;
use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::TryStreamExt;
use serde_json::{json, Value};
use std::sync::Arc;

use super::images::{expected_format, load_visible, parse_range};

fn bad(msg: impl Into<String>) -> RegistryError {
    RegistryError::BadRequest(msg.into())
}

/// `GET /v2/info/import`: the import methods this service has enabled.
pub async fn info(State(app): State<Arc<App>>, _ctx: Context) -> Json<Value> {
    Json(json!({"import-methods": {
        "description": "Import methods available.", "type": "array",
        "value": app.config.import.enabled_methods}}))
}

fn enabled(app: &App, method: &str) -> Result<()> {
    if app
        .config
        .import
        .enabled_methods
        .iter()
        .any(|m| m == method)
    {
        Ok(())
    } else {
        Err(bad(format!("Import method {method} is not enabled")))
    }
}

/// `PUT /v2/images/{id}/stage`: `queued → uploading`, bytes into the staging area.
pub async fn stage(
    State(app): State<Arc<App>>,
    ctx: Context,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<StatusCode> {
    enabled(&app, GLANCE_DIRECT)?;
    if let Some(mt) = media_type(&headers) {
        if mt != "application/octet-stream" {
            return Err(RegistryError::UnsupportedMediaType(format!(
                "Unsupported Content-Type '{mt}'; use application/octet-stream"
            )));
        }
    }
    let img = load_visible(&app, &ctx, &id).await?;
    policy::check_modify(&ctx, &img)?;
    let cap = app.config.image_size_cap;
    super::images::check_declared_length(&headers, cap)?;
    if img.status != Status::Queued {
        return Err(RegistryError::Conflict(format!(
            "Image status transition from {} to uploading is not allowed",
            img.status
        )));
    }
    crate::signing::check_before_data(&app, &img).await?;
    let mut uploading = img.clone();
    uploading.status = Status::Uploading;
    uploading.updated_at = now();
    let Some(uploading) =
        save_changes(app.catalog.as_ref(), &img, &uploading, Status::Queued).await?
    else {
        return Err(RegistryError::Conflict(format!(
            "Image {id} is already being uploaded by another request"
        )));
    };
    let stream = body
        .into_data_stream()
        .map_err(|e| bad(format!("Error reading the request body: {e}")));
    let staged = store_stream(&app, &id, Some("staging"), stream, cap).await;
    let back_to_queued = || async {
        let mut queued = uploading.clone();
        queued.status = Status::Queued;
        queued.updated_at = now();
        // If the image was deleted meanwhile this does nothing, which is right.
        let _ = save_changes(app.catalog.as_ref(), &uploading, &queued, Status::Uploading).await;
    };
    let (location, digests) = match staged {
        Ok(s) => s,
        Err(e) => {
            back_to_queued().await;
            return Err(e);
        }
    };
    let t = now();
    let task = ImportTask {
        image_id: id.clone(),
        method: String::new(),
        uri: None,
        staging_location: Some(location.clone()),
        staging_size: Some(digests.len),
        state: TaskState::Staged,
        lease_token: None,
        lease_expires: None,
        attempts: 0,
        message: None,
        created_at: t.clone(),
        updated_at: t,
    };
    // A second stage replaces the first: drop the older staged bytes.
    let previous = app.catalog.get_import_task(&id).await?;
    if let Err(e) = app.catalog.put_import_task(&task).await {
        delete_quietly(&app, &location).await;
        back_to_queued().await;
        return Err(e);
    }
    if let Some(old) = previous.and_then(|p| p.staging_location) {
        delete_quietly(&app, &old).await;
    }
    Ok(StatusCode::NO_CONTENT)
}

/// The `stores` / `all_stores` of an import request: only the one store exists.
fn check_stores(body: &Value) -> Result<()> {
    if let Some(stores) = body.get("stores") {
        let list = stores
            .as_array()
            .ok_or_else(|| bad("stores must be a list of store identifiers"))?;
        for s in list {
            if s.as_str() != Some(STORE_ID) {
                return Err(RegistryError::Conflict(format!(
                    "Store {s} is not available; the only store is '{STORE_ID}'"
                )));
            }
        }
    }
    if let Some(all) = body.get("all_stores") {
        if !all.is_boolean() {
            return Err(bad("all_stores must be a boolean"));
        }
    }
    if let Some(v) = body.get("all_stores_must_succeed") {
        if !v.is_boolean() {
            return Err(bad("all_stores_must_succeed must be a boolean"));
        }
    }
    Ok(())
}

/// `POST /v2/images/{id}/import`: start a `glance-direct` or `web-download` import (202),
/// recorded as a task that `GET /v2/images/{id}/tasks` shows.
pub async fn import(
    State(app): State<Arc<App>>,
    ctx: Context,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<StatusCode> {
    let v = parse_json(&body)?;
    start_import(&app, &ctx, &id, &v).await?;
    super::tasks::record(&app, &ctx, &id, super::tasks::IMAGE_IMPORT, v).await?;
    Ok(StatusCode::ACCEPTED)
}

/// Start the import an import request `v` asks for.
pub(crate) async fn start_import(app: &Arc<App>, ctx: &Context, id: &str, v: &Value) -> Result<()> {
    let (app, ctx, id) = (app.clone(), ctx.clone(), id.to_string());
    let method = v
        .get("method")
        .and_then(|m| m.get("name"))
        .and_then(Value::as_str)
        .ok_or_else(|| bad("Import request requires a 'method' field with a 'name'"))?
        .to_string();
    if method != GLANCE_DIRECT && method != WEB_DOWNLOAD && method != COPY_IMAGE {
        return Err(bad(format!("Unknown import method name '{method}'")));
    }
    enabled(&app, &method)?;
    check_stores(v)?;
    let img = load_visible(&app, &ctx, &id).await?;
    if method == COPY_IMAGE {
        return copy_image(&app, &ctx, &img).await;
    }
    policy::check_modify(&ctx, &img)?;
    if img.disk_format.is_none() || img.container_format.is_none() {
        return Err(RegistryError::Conflict(
            "Properties disk_format, container_format must be set prior to importing data.".into(),
        ));
    }
    crate::signing::check_before_data(&app, &img).await?;
    let mut importing = img.clone();
    importing.status = Status::Importing;
    importing.updated_at = now();
    mark_importing(&mut importing);
    if method == WEB_DOWNLOAD {
        let uri = v
            .get("method")
            .and_then(|m| m.get("uri"))
            .and_then(Value::as_str)
            .ok_or_else(|| bad("web-download requires a 'uri'"))?;
        web::validate_resolving(&app.config.import.filtering, uri).await?;
        if img.status != Status::Queued {
            return Err(RegistryError::Conflict(format!(
                "Image {id} must be queued for web-download, not {}",
                img.status
            )));
        }
        if save_changes(app.catalog.as_ref(), &img, &importing, Status::Queued)
            .await?
            .is_none()
        {
            return Err(RegistryError::Conflict(format!(
                "Image {id} was changed by another request; retry"
            )));
        }
        start_task(&app, &id, WEB_DOWNLOAD, Some(uri.to_string()), None).await?;
        return Ok(());
    }
    // glance-direct: the image must have staged data.
    let staged = app
        .catalog
        .get_import_task(&id)
        .await?
        .filter(|t| t.state == TaskState::Staged);
    let (Status::Uploading, Some(task)) = (img.status, staged) else {
        return Err(RegistryError::Conflict(format!(
            "Image {id} has no staged data to import (status {})",
            img.status
        )));
    };
    let (Some(loc), Some(size)) = (task.staging_location.clone(), task.staging_size) else {
        return Err(RegistryError::Conflict(format!(
            "Image {id} has no staged data to import"
        )));
    };
    if save_changes(app.catalog.as_ref(), &img, &importing, Status::Uploading)
        .await?
        .is_none()
    {
        return Err(RegistryError::Conflict(format!(
            "Image {id} was changed by another request; retry"
        )));
    }
    // Inspect now, so an unsafe image is refused with its reasons in this response.
    if let Err(e) = inspect_stored(&app, &id, &loc, size, img.disk_format.as_deref()).await {
        fail(&app, &task, &e).await?;
        return Err(e);
    }
    start_task(&app, &id, GLANCE_DIRECT, None, Some((loc, size))).await?;
    Ok(())
}

/// `copy-image` (admin, as Glance's default policy): copy an active image's data into the
/// requested stores (`stores`, or `all_stores`) that do not hold it. The one store holds the data
/// of every active image, so there is nothing to copy: the request succeeds at once with
/// `os_glance_importing_to_stores` and `os_glance_failed_import` empty, as Glance reports a copy
/// that skipped every store.
async fn copy_image(app: &App, ctx: &Context, img: &crate::model::ImageRecord) -> Result<()> {
    if !ctx.is_admin() {
        return Err(RegistryError::Forbidden(
            "You are not authorized to copy images".into(),
        ));
    }
    if img.status != Status::Active {
        return Err(RegistryError::Conflict(format!(
            "Image {} must be active to be copied, not {}",
            img.id, img.status
        )));
    }
    let mut done = img.clone();
    done.properties
        .insert(crate::import::PROP_IMPORTING.into(), String::new());
    done.properties
        .insert(crate::import::PROP_FAILED.into(), String::new());
    done.updated_at = now();
    match save_changes(app.catalog.as_ref(), img, &done, Status::Active).await? {
        Some(_) => Ok(()),
        None => Err(RegistryError::Conflict(format!(
            "Image {} was changed by another request; retry",
            img.id
        ))),
    }
}

/// `GET /v2/images/{id}/file[?format=…]`: the image data, or a converted copy of it.
pub async fn download(
    State(app): State<Arc<App>>,
    ctx: Context,
    Path(id): Path<String>,
    Query(params): Query<Vec<(String, String)>>,
    headers: HeaderMap,
) -> Result<Response> {
    let format = params
        .iter()
        .find(|(k, _)| k == "format")
        .map(|(_, v)| v.clone());
    let Some(format) = format else {
        return super::images::download(State(app), ctx, Path(id), headers).await;
    };
    if !DOWNLOAD_FORMATS.contains(&format.as_str()) {
        return Err(bad(format!(
            "format must be one of {}",
            DOWNLOAD_FORMATS.join(", ")
        )));
    }
    let img = load_visible(&app, &ctx, &id).await?;
    if img.disk_format.as_deref() == Some(format.as_str()) {
        return super::images::download(State(app), ctx, Path(id), headers).await;
    }
    policy::check_download(&ctx, &img)?;
    // Deprecated images warn, obsolete ones refuse, whatever the format asked for.
    let warning = crate::lifecycle::download_warning(&ctx, &img)?;
    let warning = match warning {
        Some(w) => Some(HeaderValue::from_str(&w).map_err(|e| bad(e.to_string()))?),
        None => None,
    };
    let (Some(location), Some(size), Some(sha256), Status::Active | Status::Deactivated) = (
        img.location.clone(),
        img.size,
        img.sha256.clone(),
        img.status,
    ) else {
        return Ok(StatusCode::NO_CONTENT.into_response());
    };
    let from = img
        .disk_format
        .as_deref()
        .and_then(expected_format)
        .ok_or_else(|| {
            bad(format!(
                "images in disk format {} cannot be converted",
                img.disk_format.as_deref().unwrap_or("(none)")
            ))
        })?;
    let cached = app.catalog.get_conversion(&id, &sha256, &format).await?;
    // A converted copy holds the whole guest: refuse early what the conversion would refuse.
    if let (None, Some(vs)) = (&cached, img.virtual_size) {
        crate::import::convert::check_virtual_size(vs, app.config.image_size_cap)?;
    }
    // Each conversion this request starts holds one of its project's slots.
    let slot = match cached {
        Some(_) => None,
        None => Some(app.guards.conversions.try_acquire(&ctx.project_id)?),
    };
    let streamable = STREAMABLE.contains(&format.as_str()) && !headers.contains_key(header::RANGE);
    let (stream_slot, convert_slot) = if streamable {
        (slot, None)
    } else {
        (None, slot)
    };
    if let Some(slot) = stream_slot {
        // Converted on the fly: no digest is known before the end, the length only for
        // formats that fix it (raw, fixed VHD).
        let s = convert_streaming(&app, &id, &location, size, from, &format, slot)?;
        let length = match s.length.await {
            Ok(Ok(length)) => length,
            Ok(Err(e)) => return Err(e),
            Err(_) => {
                return Err(RegistryError::store(
                    format!("converting image {id} to {format}"),
                    "the conversion stopped before it started",
                ))
            }
        };
        let stream = futures_util::stream::unfold(s.data, |mut rx| async move {
            rx.recv().await.map(|item| (item, rx))
        });
        let mut resp = Response::new(Body::from_stream(stream));
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/octet-stream"),
        );
        if let Some(n) = length {
            resp.headers_mut()
                .insert(header::CONTENT_LENGTH, HeaderValue::from(n));
        }
        if let Some(w) = warning {
            resp.headers_mut().insert(header::WARNING, w);
        }
        return Ok(resp);
    }
    let conv = match cached {
        Some(c) => c,
        None => {
            let _slot = convert_slot;
            let c =
                convert_stored(&app, &id, Some("cache"), &location, size, from, &format).await?;
            let rec = Conversion {
                image_id: id.clone(),
                source_sha256: sha256.clone(),
                format: format.clone(),
                location: c.location.clone(),
                size: c.digests.len,
                md5: c.digests.md5.clone(),
                created_at: now(),
            };
            match app.catalog.add_conversion(&rec).await {
                Ok(()) => rec,
                // Another request converted it at the same time: use theirs.
                Err(RegistryError::Conflict(_)) => {
                    delete_quietly(&app, &c.location).await;
                    app.catalog
                        .get_conversion(&id, &sha256, &format)
                        .await?
                        .ok_or_else(|| RegistryError::Conflict("conversion vanished".into()))?
                }
                Err(e) => {
                    delete_quietly(&app, &c.location).await;
                    return Err(e);
                }
            }
        }
    };
    // The image may have been deleted while converting: the deletion removes cached copies,
    // but this one may have been recorded after it.
    if app
        .catalog
        .get_image(&id)
        .await?
        .is_none_or(|i| i.status == Status::Deleted)
    {
        crate::import::forget_image(&app, &id).await?;
        return Err(policy::not_found(&id));
    }
    let range = parse_range(headers.get(header::RANGE), conv.size)?;
    let stream = app
        .data
        .read(&conv.location, range.map(|(s, e)| s..e))
        .await?;
    let mut resp = Response::new(Body::from_stream(stream));
    let hv = |s: String| HeaderValue::from_str(&s).map_err(|e| bad(e.to_string()));
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    match range {
        Some((s, e)) => {
            *resp.status_mut() = StatusCode::PARTIAL_CONTENT;
            let h = resp.headers_mut();
            h.insert(header::CONTENT_LENGTH, hv((e - s).to_string())?);
            h.insert(
                header::CONTENT_RANGE,
                hv(format!("bytes {s}-{}/{}", e - 1, conv.size))?,
            );
        }
        None => {
            let h = resp.headers_mut();
            h.insert(header::CONTENT_LENGTH, hv(conv.size.to_string())?);
            h.insert("content-md5", hv(conv.md5.clone())?);
        }
    }
    if let Some(w) = warning {
        resp.headers_mut().insert(header::WARNING, w);
    }
    Ok(resp)
}
