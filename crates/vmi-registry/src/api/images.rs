//! `/v2/images`: create, list, show, update (JSON patch), delete, upload and download data,
//! deactivate/reactivate, tags — Glance's Image API v2.
//!
//! Status transitions follow Glance: `queued → saving` when an upload starts (a compare-and-swap,
//! so of two concurrent uploads exactly one proceeds and the other gets 409), `saving → active`
//! once the data is stored, inspected and its digests recorded, `saving → queued` when an upload
//! fails, `active ⇄ deactivated`, and any status `→ deleted`.

use super::{media_type, parse_json};
use crate::auth::Context;
use crate::catalog::{save_changes, Cmp, Field, Filter, ImageQuery, MemberFilter, SortKey, Viewer};
use crate::error::{RegistryError, Result};
use crate::model::{
    now, ImageRecord, MemberStatus, Status, Visibility, CONTAINER_FORMATS, DISK_FORMATS,
    MAX_NAME_LEN, MAX_PROPERTIES, MAX_PROPERTY_VALUE_LEN, MAX_TAGS,
};
use crate::policy::{self, not_found};
use crate::server::App;
use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::stream::BoxStream;
use futures_util::{StreamExt, TryStreamExt};
use serde_json::{json, Map, Value};
use std::sync::Arc;
use vmi_disk::Format;

/// Glance's `limit_param_default`.
const DEFAULT_LIMIT: u32 = 25;
/// Glance's `api_limit_max`.
const MAX_LIMIT: u32 = 1000;
/// The media types Glance accepts for a JSON patch.
const PATCH_MEDIA_TYPES: [&str; 2] = [
    "application/openstack-images-v2.1-json-patch",
    "application/openstack-images-v2.0-json-patch",
];
/// Attributes clients may never set.
const READ_ONLY: [&str; 14] = [
    "id",
    "status",
    "created_at",
    "updated_at",
    "size",
    "virtual_size",
    "checksum",
    "os_hash_algo",
    "os_hash_value",
    "self",
    "file",
    "schema",
    "direct_url",
    "stores",
];
/// Core attributes clients may set (everything else is a custom property).
const CORE: [&str; 10] = [
    "name",
    "visibility",
    "protected",
    "os_hidden",
    "disk_format",
    "container_format",
    "min_disk",
    "min_ram",
    "tags",
    "owner",
];
/// Attributes Glance reserves.
const RESERVED: [&str; 3] = ["deleted", "deleted_at", "locations"];

/// An image as the API shows it.
pub fn image_json(img: &ImageRecord) -> Value {
    let mut m = Map::new();
    for (k, v) in &img.properties {
        m.insert(k.clone(), json!(v));
    }
    let fields = [
        ("id", json!(img.id)),
        ("name", json!(img.name)),
        ("status", json!(img.status.as_str())),
        ("visibility", json!(img.visibility.as_str())),
        ("protected", json!(img.protected)),
        ("os_hidden", json!(img.os_hidden)),
        ("checksum", json!(img.checksum)),
        ("os_hash_algo", json!(img.os_hash_algo)),
        ("os_hash_value", json!(img.os_hash_value)),
        ("owner", json!(img.owner)),
        ("size", json!(img.size)),
        ("virtual_size", json!(img.virtual_size)),
        ("min_ram", json!(img.min_ram)),
        ("min_disk", json!(img.min_disk)),
        ("disk_format", json!(img.disk_format)),
        ("container_format", json!(img.container_format)),
        ("created_at", json!(img.created_at)),
        ("updated_at", json!(img.updated_at)),
        ("tags", json!(img.tags)),
        ("self", json!(format!("/v2/images/{}", img.id))),
        ("file", json!(format!("/v2/images/{}/file", img.id))),
        ("schema", json!("/v2/schemas/image")),
    ];
    for (k, v) in fields {
        m.insert(k.into(), v);
    }
    if let Some(stores) = crate::api::stores::image_stores(img) {
        m.insert("stores".into(), json!(stores));
    }
    Value::Object(m)
}

/// The image if `ctx` may see it, else 404.
pub(crate) async fn load_visible(app: &App, ctx: &Context, id: &str) -> Result<ImageRecord> {
    let img = app
        .catalog
        .get_image(id)
        .await?
        .ok_or_else(|| not_found(id))?;
    let member =
        if img.visibility == Visibility::Shared && img.owner != ctx.project_id && !ctx.is_admin() {
            app.catalog.get_member(id, &ctx.project_id).await?
        } else {
            None
        };
    if !policy::can_see(ctx, &img, member.as_ref()) {
        return Err(not_found(id));
    }
    Ok(img)
}

fn bad(msg: impl Into<String>) -> RegistryError {
    RegistryError::BadRequest(msg.into())
}

fn opt_string(key: &str, v: &Value, allowed: Option<&[&str]>) -> Result<Option<String>> {
    match v {
        Value::Null => Ok(None),
        Value::String(s) => {
            if s.len() > MAX_NAME_LEN {
                return Err(bad(format!(
                    "{key} is longer than {MAX_NAME_LEN} characters"
                )));
            }
            if let Some(a) = allowed {
                if !a.contains(&s.as_str()) {
                    return Err(bad(format!("Invalid value '{s}' for {key}")));
                }
            }
            Ok(Some(s.clone()))
        }
        _ => Err(bad(format!("{key} must be a string or null"))),
    }
}

fn non_negative(key: &str, v: &Value) -> Result<u64> {
    v.as_u64()
        .filter(|n| i64::try_from(*n).is_ok())
        .ok_or_else(|| bad(format!("{key} must be a non-negative integer")))
}

fn boolean(key: &str, v: &Value) -> Result<bool> {
    v.as_bool()
        .ok_or_else(|| bad(format!("{key} must be a boolean")))
}

fn tag_list(v: &Value) -> Result<Vec<String>> {
    let arr = v.as_array().ok_or_else(|| bad("tags must be an array"))?;
    let mut tags = Vec::new();
    for t in arr {
        let t = t.as_str().ok_or_else(|| bad("each tag must be a string"))?;
        check_tag(t)?;
        tags.push(t.to_string());
    }
    tags.sort();
    tags.dedup();
    if tags.len() > MAX_TAGS {
        return Err(RegistryError::PayloadTooLarge(format!(
            "Maximum number of tags exceeded: {MAX_TAGS}"
        )));
    }
    Ok(tags)
}

fn check_tag(t: &str) -> Result<()> {
    if t.is_empty() || t.len() > MAX_NAME_LEN {
        return Err(bad(format!("tags must be 1 to {MAX_NAME_LEN} characters")));
    }
    Ok(())
}

/// Set (`Some`) or remove (`None`) attribute `key`. `patching` applies Glance's update-only rules.
fn apply_attr(
    ctx: &Context,
    img: &mut ImageRecord,
    key: &str,
    value: Option<&Value>,
    patching: bool,
) -> Result<()> {
    if READ_ONLY.contains(&key) {
        return Err(RegistryError::Forbidden(format!(
            "Attribute '{key}' is read-only."
        )));
    }
    if RESERVED.contains(&key) {
        return Err(RegistryError::Forbidden(format!(
            "Attribute '{key}' is reserved."
        )));
    }
    crate::lifecycle::check_user_attr(key)?;
    crate::import::check_property(key)?;
    let core = CORE.contains(&key);
    let Some(v) = value else {
        if core {
            return Err(RegistryError::Forbidden(format!(
                "Unable to remove core attribute '{key}'."
            )));
        }
        if img.properties.remove(key).is_none() {
            return Err(RegistryError::Conflict(format!(
                "Property {key} does not exist."
            )));
        }
        return Ok(());
    };
    match key {
        "name" => img.name = opt_string(key, v, None)?,
        "visibility" => {
            let s = v
                .as_str()
                .ok_or_else(|| bad("visibility must be a string"))?;
            let vis: Visibility = s.parse().map_err(bad)?;
            policy::check_visibility(ctx, vis)?;
            img.visibility = vis;
        }
        "protected" => img.protected = boolean(key, v)?,
        "os_hidden" => img.os_hidden = boolean(key, v)?,
        "disk_format" | "container_format" => {
            if patching && img.status != Status::Queued {
                return Err(RegistryError::Forbidden(format!(
                    "Attribute {key} can be only replaced for a queued image."
                )));
            }
            if key == "disk_format" {
                img.disk_format = opt_string(key, v, Some(&DISK_FORMATS))?;
            } else {
                img.container_format = opt_string(key, v, Some(&CONTAINER_FORMATS))?;
            }
        }
        "min_disk" => img.min_disk = non_negative(key, v)?,
        "min_ram" => img.min_ram = non_negative(key, v)?,
        "tags" => img.tags = tag_list(v)?,
        "owner" => {
            let o = v.as_str().ok_or_else(|| bad("owner must be a string"))?;
            if o.is_empty() || o.len() > MAX_NAME_LEN {
                return Err(bad("owner must be 1 to 255 characters"));
            }
            policy::check_owner(ctx, o)?;
            img.owner = o.to_string();
        }
        _ => {
            if key.is_empty() || key.len() > MAX_NAME_LEN {
                return Err(bad(format!(
                    "property names must be 1 to {MAX_NAME_LEN} characters"
                )));
            }
            let s = v
                .as_str()
                .ok_or_else(|| bad(format!("property {key} must be a string")))?;
            if s.len() > MAX_PROPERTY_VALUE_LEN {
                return Err(bad(format!("property {key} is too long")));
            }
            img.properties.insert(key.to_string(), s.to_string());
            if img.properties.len() > MAX_PROPERTIES {
                return Err(RegistryError::PayloadTooLarge(format!(
                    "Maximum number of properties exceeded: {MAX_PROPERTIES}"
                )));
            }
        }
    }
    Ok(())
}

/// `POST /v2/images`
pub async fn create(
    State(app): State<Arc<App>>,
    ctx: Context,
    body: Bytes,
) -> Result<(StatusCode, Json<Value>)> {
    policy::check_create(&ctx)?;
    let v = parse_json(&body)?;
    let obj = v
        .as_object()
        .ok_or_else(|| bad("the request body must be a JSON object"))?;
    let id = match obj.get("id") {
        None | Some(Value::Null) => uuid::Uuid::new_v4(),
        Some(Value::String(s)) => {
            uuid::Uuid::parse_str(s).map_err(|_| bad(format!("id '{s}' is not a valid UUID")))?
        }
        Some(_) => return Err(bad("id must be a string")),
    };
    let created = app.clock.now_string();
    let mut img = ImageRecord::new(id.hyphenated().to_string(), ctx.project_id.clone(), created);
    for (k, v) in obj {
        if k != "id" {
            apply_attr(&ctx, &mut img, k, Some(v), false)?;
        }
    }
    crate::lineage::check_image_update(&app, &ctx, None, &img).await?;
    crate::policies::check_naming(&app, None, &img).await?;
    match app.catalog.create_image(&img).await {
        Err(RegistryError::Conflict(_)) => Err(RegistryError::Conflict(format!(
            "Image with identifier {} already exists!",
            img.id
        ))),
        other => other,
    }?;
    Ok((StatusCode::CREATED, Json(image_json(&img))))
}

/// `GET /v2/images/{id}`
pub async fn show(
    State(app): State<Arc<App>>,
    ctx: Context,
    Path(id): Path<String>,
) -> Result<Response> {
    let img = load_visible(&app, &ctx, &id).await?;
    let mut resp = Json(image_json(&img)).into_response();
    // Deprecated and obsolete images say so where a client looks before it uses one.
    if let Some(w) = crate::lifecycle::state_warning(&img) {
        let v = HeaderValue::from_str(&w).map_err(|e| bad(e.to_string()))?;
        resp.headers_mut().insert(header::WARNING, v);
    }
    Ok(resp)
}

fn split_in(v: &str) -> (Cmp, String) {
    match v.strip_prefix("in:") {
        Some(list) => (
            Cmp::In(list.split(',').map(|s| s.trim().to_string()).collect()),
            String::new(),
        ),
        None => (Cmp::Eq, v.to_string()),
    }
}

fn time_filter(field: Field, v: &str) -> Result<Filter> {
    let (op, value) = v.split_once(':').unwrap_or(("eq", v));
    let cmp = match op {
        "eq" => Cmp::Eq,
        "neq" => Cmp::Neq,
        "gt" => Cmp::Gt,
        "gte" => Cmp::Gte,
        "lt" => Cmp::Lt,
        "lte" => Cmp::Lte,
        _ => return Err(bad(format!("Invalid operator '{op}'"))),
    };
    let t = chrono::DateTime::parse_from_rfc3339(value)
        .map_err(|_| bad(format!("Invalid time '{value}'")))?
        .with_timezone(&chrono::Utc)
        .format("%Y-%m-%dT%H:%M:%SZ")
        .to_string();
    Ok(Filter {
        field,
        cmp,
        value: t,
    })
}

fn parse_dir(s: &str) -> Result<bool> {
    match s {
        "asc" => Ok(true),
        "desc" => Ok(false),
        _ => Err(bad(format!("Invalid sort direction: {s}"))),
    }
}

fn parse_sort_key(s: &str) -> Result<SortKey> {
    SortKey::parse(s).ok_or_else(|| bad(format!("Invalid sort key: {s}")))
}

/// Percent-encode a query-string component (unreserved characters, `:` and `,` kept).
pub(crate) fn encode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~:,".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The listing query of `GET /v2/images` from its query parameters (filters, sort keys and
/// directions, limit, visibility); also returns the marker image id, which the caller loads.
pub(crate) fn parse_list_query(
    params: &[(String, String)],
    viewer: Viewer,
) -> Result<(ImageQuery, Option<String>)> {
    let mut q = ImageQuery::new(viewer);
    q.limit = DEFAULT_LIMIT;
    let mut sort_keys = Vec::new();
    let mut sort_dirs = Vec::new();
    let mut sort_param = None;
    let mut marker = None;
    for (k, v) in params {
        match k.as_str() {
            "limit" => {
                let n: i64 = v
                    .parse()
                    .map_err(|_| bad("limit param must be an integer"))?;
                q.limit = u32::try_from(n)
                    .map_err(|_| bad("limit param must be positive"))?
                    .min(MAX_LIMIT);
            }
            "marker" => marker = Some(v.clone()),
            "sort_key" => sort_keys.push(parse_sort_key(v)?),
            "sort_dir" => sort_dirs.push(parse_dir(v)?),
            "sort" => sort_param = Some(v.clone()),
            "visibility" => {
                if v == "all" {
                    q.all_visibilities = true;
                } else {
                    q.visibility = Some(v.parse().map_err(bad)?);
                }
            }
            "member_status" => {
                q.member_status = if v == "all" {
                    MemberFilter::All
                } else {
                    MemberFilter::Only(v.parse::<MemberStatus>().map_err(bad)?)
                }
            }
            "os_hidden" => {
                q.os_hidden =
                    Some(glance_bool(v).ok_or_else(|| bad("os_hidden must be true or false"))?)
            }
            "tag" => q.tags.push(v.clone()),
            "size_min" | "size_max" => {
                let n: u64 = v
                    .parse()
                    .map_err(|_| bad(format!("{k} must be a non-negative integer")))?;
                q.filters.push(Filter {
                    field: Field::Size,
                    cmp: if k == "size_min" { Cmp::Gte } else { Cmp::Lte },
                    value: n.to_string(),
                });
            }
            "created_at" => q.filters.push(time_filter(Field::CreatedAt, v)?),
            "updated_at" => q.filters.push(time_filter(Field::UpdatedAt, v)?),
            "protected" => q.filters.push(Filter {
                field: Field::Protected,
                cmp: Cmp::Eq,
                value: glance_bool(v)
                    .ok_or_else(|| bad(format!("invalid protected filter '{v}'")))?
                    .to_string(),
            }),
            "id" | "name" | "status" | "owner" | "disk_format" | "container_format" => {
                let field = match k.as_str() {
                    "id" => Field::Id,
                    "name" => Field::Name,
                    "status" => Field::Status,
                    "owner" => Field::Owner,
                    "disk_format" => Field::DiskFormat,
                    _ => Field::ContainerFormat,
                };
                let (cmp, value) = split_in(v);
                q.filters.push(Filter { field, cmp, value });
            }
            _ => q.properties.push((k.clone(), v.clone())),
        }
    }
    if let Some(s) = sort_param {
        if !sort_keys.is_empty() || !sort_dirs.is_empty() {
            return Err(bad(
                "The 'sort' parameter cannot be combined with 'sort_key' or 'sort_dir'",
            ));
        }
        q.sort = Vec::new();
        for part in s.split(',') {
            let (k, d) = part.split_once(':').unwrap_or((part, "desc"));
            q.sort
                .push((parse_sort_key(k.trim())?, parse_dir(d.trim())?));
        }
    } else if !sort_keys.is_empty() || !sort_dirs.is_empty() {
        if sort_keys.is_empty() {
            sort_keys.push(SortKey::CreatedAt);
        }
        let dirs = match sort_dirs.len() {
            0 => vec![false; sort_keys.len()],
            1 => vec![sort_dirs[0]; sort_keys.len()],
            n if n == sort_keys.len() => sort_dirs,
            _ => return Err(bad("The number of sort_dir and sort_key values differ")),
        };
        q.sort = sort_keys.into_iter().zip(dirs).collect();
    }
    Ok((q, marker))
}

/// `GET /v2/images`
pub async fn list(
    State(app): State<Arc<App>>,
    ctx: Context,
    Query(params): Query<Vec<(String, String)>>,
) -> Result<Json<Value>> {
    let viewer = if ctx.is_admin() {
        Viewer::Admin
    } else {
        Viewer::Project(ctx.project_id.clone())
    };
    let (mut q, marker) = parse_list_query(&params, viewer)?;
    if let Some(m) = &marker {
        let img = load_visible(&app, &ctx, m)
            .await
            .map_err(|_| bad(format!("Invalid marker. Image {m} could not be found.")))?;
        q.marker = Some(img);
    }
    crate::lifecycle::recycle::scope_listing(&ctx, &mut q);
    let limit = q.limit;
    q.limit = limit.saturating_add(1);
    let mut imgs = app.catalog.list_images(&q).await?;
    let more = imgs.len() > limit as usize;
    imgs.truncate(limit as usize);
    let mut body = json!({
        "images": imgs.iter().map(image_json).collect::<Vec<_>>(),
        "first": "/v2/images",
        "schema": "/v2/schemas/images",
    });
    if more {
        if let Some(last) = imgs.last() {
            let mut qs: Vec<String> = params
                .iter()
                .filter(|(k, _)| k != "marker")
                .map(|(k, v)| format!("{}={}", encode(k), encode(v)))
                .collect();
            qs.push(format!("marker={}", encode(&last.id)));
            body["next"] = json!(format!("/v2/images?{}", qs.join("&")));
        }
    }
    Ok(Json(body))
}

/// A boolean query parameter as Glance reads one (oslo's `bool_from_string`, strict): `true`,
/// `True`, `1`, `yes`, `on`, … and their false counterparts, case-insensitively.
pub(crate) fn glance_bool(v: &str) -> Option<bool> {
    match v.trim().to_ascii_lowercase().as_str() {
        "1" | "t" | "true" | "on" | "y" | "yes" => Some(true),
        "0" | "f" | "false" | "off" | "n" | "no" => Some(false),
        _ => None,
    }
}

fn json_pointer_key(path: &str) -> Result<String> {
    let rest = path
        .strip_prefix('/')
        .ok_or_else(|| bad(format!("Invalid JSON pointer '{path}'")))?;
    if rest.is_empty() || rest.contains('/') {
        return Err(bad(format!("Invalid JSON pointer '{path}'")));
    }
    Ok(rest.replace("~1", "/").replace("~0", "~"))
}

/// The operation name and path of one patch operation: the 2.1 form
/// (`{"op": "replace", "path": "/name"}`) or the 2.0 form (`{"replace": "/name"}`), whichever
/// media type announced it, as Glance reads both.
fn patch_operation(o: &Map<String, Value>) -> Result<(&str, &str)> {
    if let Some(op) = o.get("op") {
        let name = op.as_str().unwrap_or("");
        let path = o
            .get("path")
            .and_then(Value::as_str)
            .ok_or_else(|| bad("Unable to find 'path' in JSON Schema change"))?;
        return Ok((name, path));
    }
    let mut found = None;
    for name in ["add", "remove", "replace"] {
        if let Some(p) = o.get(name) {
            if found.is_some() {
                return Err(bad(
                    "Operation objects must contain only one member named \"add\", \"remove\", or \"replace\".",
                ));
            }
            let path = p
                .as_str()
                .ok_or_else(|| bad(format!("the path of '{name}' must be a string")))?;
            found = Some((name, path));
        }
    }
    found.ok_or_else(|| {
        bad("Operation objects must contain exactly one member named \"add\", \"remove\", or \"replace\".")
    })
}

/// Apply a JSON patch (`body`, Glance's `openstack-images-v2.1-json-patch`) to `img` as `ctx`.
pub(crate) fn apply_patch(ctx: &Context, img: &mut ImageRecord, body: &[u8]) -> Result<()> {
    let ops = parse_json(body)?;
    let ops = ops
        .as_array()
        .ok_or_else(|| bad("a JSON patch must be an array of operations"))?;
    for op in ops {
        let o = op
            .as_object()
            .ok_or_else(|| bad("each patch operation must be an object"))?;
        let (name, path) = patch_operation(o)?;
        let key = json_pointer_key(path)?;
        match name {
            "add" | "replace" => {
                let v = o
                    .get("value")
                    .ok_or_else(|| bad(format!("operation '{name}' needs a value")))?;
                let k = key.as_str();
                let custom =
                    !CORE.contains(&k) && !READ_ONLY.contains(&k) && !RESERVED.contains(&k);
                if name == "replace" && custom && !img.properties.contains_key(&key) {
                    return Err(RegistryError::Conflict(format!(
                        "Property {key} does not exist."
                    )));
                }
                apply_attr(ctx, img, &key, Some(v), true)?;
            }
            "remove" => apply_attr(ctx, img, &key, None, true)?,
            _ => return Err(bad(format!("Invalid operation: '{name}'"))),
        }
    }
    Ok(())
}

/// `PATCH /v2/images/{id}` with `application/openstack-images-v2.1-json-patch` (or the 2.0
/// media type and its operation form).
pub async fn update(
    State(app): State<Arc<App>>,
    ctx: Context,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<Value>> {
    let mt = media_type(&headers).unwrap_or_default();
    if !PATCH_MEDIA_TYPES.contains(&mt.as_str()) {
        return Err(RegistryError::UnsupportedMediaType(format!(
            "Unsupported Content-Type '{mt}'; use {}",
            PATCH_MEDIA_TYPES[0]
        )));
    }
    let mut img = load_visible(&app, &ctx, &id).await?;
    policy::check_modify(&ctx, &img)?;
    let expected = img.status;
    let before = img.clone();
    apply_patch(&ctx, &mut img, &body)?;
    crate::lineage::check_image_update(&app, &ctx, Some(&before), &img).await?;
    crate::policies::check_update(&app, &before, &img).await?;
    img.updated_at = now();
    // Another request may have stored a change since `before` was read (the lifecycle job, a
    // tag): replay this patch onto it rather than overwrite it.
    match save_changes(app.catalog.as_ref(), &before, &img, expected).await? {
        Some(stored) => Ok(Json(image_json(&stored))),
        None => Err(RegistryError::Conflict(format!(
            "Image {id} was changed by another request; retry"
        ))),
    }
}

/// `DELETE /v2/images/{id}`
pub async fn delete(
    State(app): State<Arc<App>>,
    ctx: Context,
    Path(id): Path<String>,
) -> Result<StatusCode> {
    let mut img = load_visible(&app, &ctx, &id).await?;
    policy::check_modify(&ctx, &img)?;
    if img.protected {
        return Err(RegistryError::Forbidden(format!(
            "Image {id} is protected and cannot be deleted."
        )));
    }
    if crate::lifecycle::recycle::intercept_delete(&app, &ctx, &img).await? {
        return Ok(StatusCode::NO_CONTENT);
    }
    let expected = img.status;
    let before = img.clone();
    let location = img.location.take();
    img.status = Status::Deleted;
    img.updated_at = now();
    if save_changes(app.catalog.as_ref(), &before, &img, expected)
        .await?
        .is_none()
    {
        return Err(RegistryError::Conflict(format!(
            "Image {id} was changed by another request; retry"
        )));
    }
    crate::import::forget_image(&app, &id).await?;
    if let Some(loc) = location {
        app.release_data(&id, &loc).await;
    }
    Ok(StatusCode::NO_CONTENT)
}

async fn set_status(
    app: &App,
    ctx: &Context,
    id: &str,
    from: Status,
    to: Status,
    verb: &str,
) -> Result<StatusCode> {
    let mut img = load_visible(app, ctx, id).await?;
    policy::check_modify(ctx, &img)?;
    if img.status == to {
        return Ok(StatusCode::NO_CONTENT);
    }
    if img.status != from {
        return Err(RegistryError::Forbidden(format!(
            "Not allowed to {verb} image in status '{}'",
            img.status
        )));
    }
    let before = img.clone();
    img.status = to;
    img.updated_at = now();
    if save_changes(app.catalog.as_ref(), &before, &img, from)
        .await?
        .is_none()
    {
        return Err(RegistryError::Conflict(format!(
            "Image {id} was changed by another request; retry"
        )));
    }
    Ok(StatusCode::NO_CONTENT)
}

/// `POST /v2/images/{id}/actions/deactivate`
pub async fn deactivate(
    State(app): State<Arc<App>>,
    ctx: Context,
    Path(id): Path<String>,
) -> Result<StatusCode> {
    set_status(
        &app,
        &ctx,
        &id,
        Status::Active,
        Status::Deactivated,
        "deactivate",
    )
    .await
}

/// `POST /v2/images/{id}/actions/reactivate`
pub async fn reactivate(
    State(app): State<Arc<App>>,
    ctx: Context,
    Path(id): Path<String>,
) -> Result<StatusCode> {
    set_status(
        &app,
        &ctx,
        &id,
        Status::Deactivated,
        Status::Active,
        "reactivate",
    )
    .await
}

/// `PUT /v2/images/{id}/tags/{tag}`
pub async fn add_tag(
    State(app): State<Arc<App>>,
    ctx: Context,
    Path((id, tag)): Path<(String, String)>,
) -> Result<StatusCode> {
    check_tag(&tag)?;
    let mut img = load_visible(&app, &ctx, &id).await?;
    policy::check_modify(&ctx, &img)?;
    if !img.tags.contains(&tag) {
        let before = img.clone();
        img.tags.push(tag);
        img.tags.sort();
        if img.tags.len() > MAX_TAGS {
            return Err(RegistryError::PayloadTooLarge(format!(
                "Maximum number of tags exceeded: {MAX_TAGS}"
            )));
        }
        img.updated_at = now();
        let expected = img.status;
        if save_changes(app.catalog.as_ref(), &before, &img, expected)
            .await?
            .is_none()
        {
            return Err(RegistryError::Conflict(format!(
                "Image {id} was changed by another request; retry"
            )));
        }
    }
    Ok(StatusCode::NO_CONTENT)
}

/// `DELETE /v2/images/{id}/tags/{tag}`
pub async fn delete_tag(
    State(app): State<Arc<App>>,
    ctx: Context,
    Path((id, tag)): Path<(String, String)>,
) -> Result<StatusCode> {
    let mut img = load_visible(&app, &ctx, &id).await?;
    policy::check_modify(&ctx, &img)?;
    let before = img.clone();
    img.tags.retain(|t| *t != tag);
    if img.tags.len() == before.tags.len() {
        return Err(RegistryError::NotFound(format!("Tag {tag} not found")));
    }
    img.updated_at = now();
    let expected = img.status;
    if save_changes(app.catalog.as_ref(), &before, &img, expected)
        .await?
        .is_none()
    {
        return Err(RegistryError::Conflict(format!(
            "Image {id} was changed by another request; retry"
        )));
    }
    Ok(StatusCode::NO_CONTENT)
}

/// The vmi format a Glance `disk_format` must be, when vmi knows it. Amazon's kernel, ramdisk
/// and machine images are raw bytes; `ploop` is Virtuozzo's Parallels disk.
pub(crate) fn expected_format(disk_format: &str) -> Option<Format> {
    match disk_format {
        "raw" | "ami" | "ari" | "aki" => Some(Format::Raw),
        "ploop" => Some(Format::Parallels),
        "qcow2" => Some(Format::Qcow2),
        "vmdk" => Some(Format::Vmdk),
        "vhd" => Some(Format::Vpc),
        "vhdx" => Some(Format::Vhdx),
        "vdi" => Some(Format::Vdi),
        "iso" => Some(Format::Iso),
        _ => None,
    }
}

/// `PUT /v2/images/{id}/file`
pub async fn upload(
    State(app): State<Arc<App>>,
    ctx: Context,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<StatusCode> {
    if let Some(mt) = media_type(&headers) {
        if mt != "application/octet-stream" {
            return Err(RegistryError::UnsupportedMediaType(format!(
                "Unsupported Content-Type '{mt}'; use application/octet-stream"
            )));
        }
    }
    let img = load_visible(&app, &ctx, &id).await?;
    policy::check_modify(&ctx, &img)?;
    if img.disk_format.is_none() || img.container_format.is_none() {
        return Err(bad(
            "Properties disk_format, container_format must be set prior to saving data.",
        ));
    }
    let cap = app.config.image_size_cap;
    check_declared_length(&headers, cap)?;
    // An upload whose node died (its lease ran out) is reclaimed first: back to queued.
    let img = if img.status == Status::Saving && crate::leases::reclaim_image(&app, &id).await? {
        load_visible(&app, &ctx, &id).await?
    } else {
        img
    };
    let transition = || {
        RegistryError::Conflict(format!(
            "Image status transition from {} to saving is not allowed",
            img.status
        ))
    };
    if img.status != Status::Queued {
        return Err(transition());
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
    let stream = body
        .into_data_stream()
        .map_err(|e| bad(format!("Error reading the request body: {e}")))
        .boxed();
    let lease = crate::leases::hold(&app, &id).await;
    let received = match &lease {
        Ok(_) => receive(&app, &saving, stream, cap, None).await,
        Err(_) => Ok(()),
    };
    let received = match lease {
        Ok(l) => {
            l.release().await;
            received
        }
        Err(e) => Err(e),
    };
    match received {
        Ok(()) => Ok(StatusCode::NO_CONTENT),
        Err(e) => {
            let mut queued = saving.clone();
            queued.status = Status::Queued;
            queued.updated_at = now();
            // If the image was deleted meanwhile this does nothing, which is right.
            let _ = save_changes(app.catalog.as_ref(), &saving, &queued, Status::Saving).await;
            Err(e)
        }
    }
}

/// Refuse a request body whose declared `Content-Length` exceeds `cap` before reading it.
pub(crate) fn check_declared_length(headers: &HeaderMap, cap: u64) -> Result<()> {
    if let Some(len) = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
    {
        if len > cap {
            return Err(RegistryError::PayloadTooLarge(format!(
                "Image exceeds the storage quota: {len} > {cap} bytes"
            )));
        }
    }
    Ok(())
}

/// Stream the body to a new object while hashing, inspect it, and make the image active.
pub(crate) async fn receive(
    app: &App,
    img: &ImageRecord,
    stream: BoxStream<'static, Result<Bytes>>,
    cap: u64,
    expected_sha256: Option<&str>,
) -> Result<()> {
    let (location, digests) = crate::import::store_stream(app, &img.id, None, stream, cap).await?;
    let discard = |e: RegistryError| async {
        if let Err(d) = app.data.delete(&location).await {
            eprintln!(
                "vmi-registry: removing refused data: {}",
                crate::error::chain(&d)
            );
        }
        Err::<(), _>(e)
    };
    if let Some(want) = expected_sha256 {
        if !want.eq_ignore_ascii_case(&digests.sha256) {
            return discard(bad(format!(
                "digest mismatch: the data has sha256:{}, expected sha256:{want}",
                digests.sha256
            )))
            .await;
        }
    }
    // Safe upload: the bytes are inspected (and checked against the project's policies, and
    // converted when the operator says so) before anyone can download them.
    let received = crate::import::Received {
        location: location.clone(),
        size: digests.len,
        digests: Some(digests),
        staged: false,
    };
    let active = match crate::import::admit(app, img, received).await {
        Ok(a) => a,
        Err(e) => return discard(e).await,
    };
    // A PATCH during the upload (Glance allows one while saving) is kept: the upload's fields
    // are replayed onto it.
    if save_changes(app.catalog.as_ref(), img, &active, Status::Saving)
        .await?
        .is_none()
    {
        // The stored data (converted or not) is referenced by nobody.
        if let Some(stored) = active.location.as_deref().filter(|l| *l != location) {
            crate::import::delete_quietly(app, stored).await;
        }
        return discard(RegistryError::Conflict(format!(
            "Image {} was changed or deleted during the upload",
            img.id
        )))
        .await;
    }
    Ok(())
}

/// Parse a single `bytes=` range against `size`: `Ok(None)` means serve everything.
pub(crate) fn parse_range(h: Option<&HeaderValue>, size: u64) -> Result<Option<(u64, u64)>> {
    let Some(spec) = h
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().strip_prefix("bytes="))
    else {
        return Ok(None);
    };
    if spec.contains(',') {
        // Several ranges: serving the whole representation is allowed (RFC 9110 §14.2).
        return Ok(None);
    }
    let Some((a, b)) = spec.trim().split_once('-') else {
        return Ok(None);
    };
    let unsatisfiable = RegistryError::RangeNotSatisfiable { size };
    let (start, end) = if a.is_empty() {
        let Ok(n) = b.parse::<u64>() else {
            return Ok(None);
        };
        if n == 0 || size == 0 {
            return Err(unsatisfiable);
        }
        (size.saturating_sub(n), size)
    } else {
        let Ok(start) = a.parse::<u64>() else {
            return Ok(None);
        };
        let end = if b.is_empty() {
            size
        } else {
            let Ok(last) = b.parse::<u64>() else {
                return Ok(None);
            };
            if last < start {
                return Ok(None);
            }
            last.saturating_add(1).min(size)
        };
        if start >= size {
            return Err(unsatisfiable);
        }
        (start, end)
    };
    Ok(Some((start, end)))
}

/// `GET /v2/images/{id}/file`
pub async fn download(
    State(app): State<Arc<App>>,
    ctx: Context,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response> {
    let img = load_visible(&app, &ctx, &id).await?;
    policy::check_download(&ctx, &img)?;
    let warning = crate::lifecycle::download_warning(&ctx, &img)?;
    let (Some(location), Some(size), Status::Active | Status::Deactivated) =
        (img.location.as_deref(), img.size, img.status)
    else {
        // Glance answers 204 for an image without data.
        return Ok(StatusCode::NO_CONTENT.into_response());
    };
    let range = parse_range(headers.get(header::RANGE), size)?;
    let stream = app.data.read(location, range.map(|(s, e)| s..e)).await?;
    let mut resp = Response::new(Body::from_stream(stream));
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    let hv = |s: String| HeaderValue::from_str(&s).map_err(|e| bad(e.to_string()));
    if let Some(w) = warning {
        resp.headers_mut().insert(header::WARNING, hv(w)?);
    }
    match range {
        Some((s, e)) => {
            *resp.status_mut() = StatusCode::PARTIAL_CONTENT;
            let h = resp.headers_mut();
            h.insert(header::CONTENT_LENGTH, hv((e - s).to_string())?);
            h.insert(
                header::CONTENT_RANGE,
                hv(format!("bytes {s}-{}/{size}", e - 1))?,
            );
        }
        None => {
            let h = resp.headers_mut();
            h.insert(header::CONTENT_LENGTH, hv(size.to_string())?);
            if let Some(md5) = &img.checksum {
                h.insert("content-md5", hv(md5.clone())?);
            }
        }
    }
    Ok(resp)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(s: &str, size: u64) -> Result<Option<(u64, u64)>> {
        parse_range(Some(&HeaderValue::from_str(s).unwrap()), size)
    }

    #[test]
    fn ranges_follow_rfc_9110() {
        assert_eq!(r("bytes=0-9", 100).unwrap(), Some((0, 10)));
        assert_eq!(r("bytes=90-", 100).unwrap(), Some((90, 100)));
        assert_eq!(r("bytes=-10", 100).unwrap(), Some((90, 100)));
        assert_eq!(r("bytes=95-200", 100).unwrap(), Some((95, 100)));
        assert_eq!(r("bytes=0-1,5-6", 100).unwrap(), None);
        assert_eq!(r("items=0-1", 100).unwrap(), None);
        assert!(matches!(
            r("bytes=100-", 100),
            Err(RegistryError::RangeNotSatisfiable { size: 100 })
        ));
        assert!(r("bytes=-0", 100).is_err());
        assert!(r("bytes=0-", 0).is_err());
    }

    #[test]
    fn read_only_and_reserved_attributes_are_refused() {
        let ctx = Context::for_tests("p", crate::model::Role::Member);
        let mut i = ImageRecord::new("i".into(), "p".into(), "t".into());
        for k in ["status", "size", "checksum", "deleted", "locations"] {
            assert!(matches!(
                apply_attr(&ctx, &mut i, k, Some(&json!("x")), false),
                Err(RegistryError::Forbidden(_))
            ));
        }
        assert!(apply_attr(&ctx, &mut i, "hw_disk_bus", Some(&json!("virtio")), false).is_ok());
        assert!(apply_attr(&ctx, &mut i, "hw_x", Some(&json!(3)), false).is_err());
    }
}
