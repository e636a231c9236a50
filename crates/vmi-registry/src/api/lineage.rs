//! vmi extensions for families, lineage and templates (none of these resources exist in Glance):
//!
//! - `GET /v2/families`: the families the caller can see, each with its latest image;
//! - `GET /v2/families/{family}/images`: a family's images, newest version first;
//! - `GET /v2/families/{family}/latest`: the newest active, non-excluded, non-deprecated image;
//! - `GET /v2/images/{id}/lineage`: ancestors (depth-limited) and direct children (paged);
//! - `POST /v2/images/{id}/lineage`: record what an image was derived from;
//! - `POST /v2/images/{id}/actions/derive`: a new image from a template.
//!
//! Family queries take `?owner=PROJECT`; without it a family resolves to the caller's project's
//! images of that name, else to public images of that name (409 when several projects publish
//! it). Images the caller may not see are never listed; an ancestor the caller may not see is
//! shown as `{"id": …, "visible": false}` and ends the walk.

use super::images::{encode, image_json, load_visible};
use super::parse_json;
use crate::auth::Context;
use crate::catalog::lineage::FamilyQuery;
use crate::catalog::{Cmp, Field, Filter, ImageQuery, MemberFilter, Viewer};
use crate::digest::DigestValues;
use crate::error::{RegistryError, Result};
use crate::lineage::{
    check_family, flag, latest, newest_first, refused_by_lifecycle, LineageRecord, Relation,
    DEFAULT_DEPTH, DEFAULT_FAMILY_PAGE, EXCLUDE_PROP, FAMILY_PROP, MAX_BUILD_RECORD, MAX_DEPTH,
    MAX_FAMILIES, MAX_FAMILY_SIZE, TEMPLATE_PROP, VERSION_PROP,
};
use crate::model::{ImageRecord, Status, Visibility};
use crate::policy;
use crate::server::App;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Map, Value};
use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

/// Children listed per page by default (Glance's `limit_param_default`).
const DEFAULT_CHILDREN: u32 = 25;
/// Most children per page (Glance's `api_limit_max`).
const MAX_CHILDREN: u32 = 1000;

/// The routes, nested under `/v2`.
pub fn router() -> Router<Arc<App>> {
    Router::new()
        .route("/families", get(families))
        .route("/families/{family}/images", get(family_images))
        .route("/families/{family}/latest", get(family_latest))
        .route("/images/{id}/lineage", get(show).post(record))
        .route("/images/{id}/actions/derive", post(derive))
}

fn bad(msg: impl Into<String>) -> RegistryError {
    RegistryError::BadRequest(msg.into())
}

fn viewer(ctx: &Context) -> Viewer {
    if ctx.is_admin() {
        Viewer::Admin
    } else {
        Viewer::Project(ctx.project_id.clone())
    }
}

fn no_family(family: &str) -> RegistryError {
    RegistryError::NotFound(format!("No image family {family} found"))
}

/// The images of `family` the caller may see, owned by `owner`.
async fn visible_members(
    app: &App,
    ctx: &Context,
    family: &str,
    owner: Option<&str>,
    public_only: bool,
) -> Result<Vec<ImageRecord>> {
    let mut q = ImageQuery::new(viewer(ctx));
    q.all_visibilities = true;
    q.member_status = MemberFilter::All;
    q.os_hidden = None;
    q.limit = MAX_FAMILY_SIZE;
    q.properties = vec![(FAMILY_PROP.to_string(), family.to_string())];
    if let Some(o) = owner {
        q.filters.push(Filter {
            field: Field::Owner,
            cmp: Cmp::Eq,
            value: o.to_string(),
        });
    }
    if public_only {
        q.visibility = Some(Visibility::Public);
    }
    app.catalog.list_images(&q).await
}

/// Resolve `family` (with an optional `?owner=`) to its owner and its images, newest first.
async fn resolve_family(
    app: &App,
    ctx: &Context,
    family: &str,
    owner: Option<&str>,
) -> Result<(String, Vec<ImageRecord>)> {
    check_family(family)?;
    let (owner, mut imgs) = match owner {
        Some(o) => (
            o.to_string(),
            visible_members(app, ctx, family, Some(o), false).await?,
        ),
        None => {
            let own = visible_members(app, ctx, family, Some(&ctx.project_id), false).await?;
            if own.is_empty() {
                let public = visible_members(app, ctx, family, None, true).await?;
                let owners: BTreeSet<&str> = public.iter().map(|i| i.owner.as_str()).collect();
                if owners.len() > 1 {
                    return Err(RegistryError::Conflict(format!(
                        "Family {family} is published by {} projects; choose one with ?owner=",
                        owners.len()
                    )));
                }
                let o = owners.into_iter().next().unwrap_or_default().to_string();
                (o, public)
            } else {
                (ctx.project_id.clone(), own)
            }
        }
    };
    if imgs.is_empty() {
        return Err(no_family(family));
    }
    newest_first(&mut imgs);
    Ok((owner, imgs))
}

/// `GET /v2/families[?owner=][&limit=][&marker=FAMILY/OWNER]`: a page of families by name then
/// owner, with a `next` link while more may follow.
pub async fn families(
    State(app): State<Arc<App>>,
    ctx: Context,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<Value>> {
    let limit = match q.get("limit") {
        None => DEFAULT_FAMILY_PAGE,
        Some(l) => l
            .parse::<u32>()
            .ok()
            .filter(|l| (1..=MAX_FAMILIES).contains(l))
            .ok_or_else(|| bad(format!("limit must be 1 to {MAX_FAMILIES}")))?,
    };
    let after = match q.get("marker") {
        None => None,
        Some(m) => {
            let (family, owner) = m
                .split_once('/')
                .filter(|(f, o)| check_family(f).is_ok() && !o.is_empty())
                .ok_or_else(|| bad("marker must be FAMILY/OWNER from a previous page"))?;
            Some((family.to_string(), owner.to_string()))
        }
    };
    let query = FamilyQuery {
        viewer: viewer(&ctx),
        owner: q.get("owner").cloned(),
        after,
        limit,
    };
    let names = app.catalog.family_names(&query).await?;
    let next = (names.len() == limit as usize)
        .then(|| names.last().cloned())
        .flatten()
        .map(|(owner, family)| {
            let mut link = format!(
                "/v2/families?limit={limit}&marker={}",
                encode(&format!("{family}/{owner}"))
            );
            if let Some(o) = q.get("owner") {
                link.push_str(&format!("&owner={}", encode(o)));
            }
            link
        });
    let mut out = Vec::new();
    for (owner, family) in names {
        let mut imgs = visible_members(&app, &ctx, &family, Some(&owner), false).await?;
        if imgs.is_empty() {
            continue;
        }
        newest_first(&mut imgs);
        out.push(json!({
            "name": family,
            "owner": owner,
            "images": imgs.len(),
            "latest": latest(&imgs).map(image_json),
        }));
    }
    let mut body = json!({ "families": out });
    if let Some(n) = next {
        body["next"] = json!(n);
    }
    Ok(Json(body))
}

/// `GET /v2/families/{family}/images[?owner=]`
pub async fn family_images(
    State(app): State<Arc<App>>,
    ctx: Context,
    Path(family): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<Value>> {
    let (owner, imgs) =
        resolve_family(&app, &ctx, &family, q.get("owner").map(String::as_str)).await?;
    Ok(Json(json!({
        "family": family,
        "owner": owner,
        "latest": latest(&imgs).map(|i| i.id.clone()),
        "images": imgs.iter().map(image_json).collect::<Vec<_>>(),
    })))
}

/// `GET /v2/families/{family}/latest[?owner=]`
pub async fn family_latest(
    State(app): State<Arc<App>>,
    ctx: Context,
    Path(family): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<Value>> {
    let (_, imgs) = resolve_family(&app, &ctx, &family, q.get("owner").map(String::as_str)).await?;
    latest(&imgs).map(|i| Json(image_json(i))).ok_or_else(|| {
        RegistryError::NotFound(format!(
            "Family {family} has no active image that is not excluded from latest"
        ))
    })
}

/// A lineage record as JSON; the parent's digests only when `parent_visible`.
fn record_json(r: &LineageRecord, parent_visible: bool) -> Value {
    let build = r
        .build
        .as_deref()
        .and_then(|b| serde_json::from_str::<Value>(b).ok());
    json!({
        "parent_id": r.parent_id,
        "relation": r.relation.as_str(),
        "parent_sha256": if parent_visible { json!(r.parent_sha256) } else { Value::Null },
        "parent_os_hash_value":
            if parent_visible { json!(r.parent_os_hash_value) } else { Value::Null },
        "build": build,
        "recorded_by": r.recorded_by,
        "recorded_project": r.recorded_project,
        "recorded_at": r.recorded_at,
    })
}

/// `Some(image)` when the caller may see `id`, `None` when not (or it does not exist).
async fn visible(app: &App, ctx: &Context, id: &str) -> Result<Option<ImageRecord>> {
    match load_visible(app, ctx, id).await {
        Ok(i) => Ok(Some(i)),
        Err(RegistryError::NotFound(_)) => Ok(None),
        Err(e) => Err(e),
    }
}

fn bounded(
    q: &HashMap<String, String>,
    key: &str,
    default: u32,
    min: u32,
    max: u32,
) -> Result<u32> {
    match q.get(key) {
        None => Ok(default),
        Some(v) => v
            .parse::<u32>()
            .ok()
            .filter(|n| (min..=max).contains(n))
            .ok_or_else(|| bad(format!("{key} must be an integer from {min} to {max}"))),
    }
}

/// `GET /v2/images/{id}/lineage[?depth=N][&limit=N][&marker=CHILD]`
pub async fn show(
    State(app): State<Arc<App>>,
    ctx: Context,
    Path(id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<Value>> {
    let depth = bounded(&q, "depth", DEFAULT_DEPTH, 0, MAX_DEPTH)?;
    let limit = bounded(&q, "limit", DEFAULT_CHILDREN, 1, MAX_CHILDREN)?;
    let img = load_visible(&app, &ctx, &id).await?;
    let own = app.catalog.get_lineage(&img.id).await?;
    let mut ancestors = Vec::new();
    let mut next = own.as_ref().map(|r| r.parent_id.clone());
    let mut parent_visible = false;
    for step in 0..depth {
        let Some(pid) = next.take() else { break };
        let Some(a) = visible(&app, &ctx, &pid).await? else {
            // Nothing about an image the caller may not see, not even its own parent.
            ancestors.push(json!({"id": pid, "visible": false}));
            break;
        };
        if step == 0 {
            parent_visible = true;
        }
        let rec = app.catalog.get_lineage(&a.id).await?;
        let up_visible = match &rec {
            Some(r) => visible(&app, &ctx, &r.parent_id).await?.is_some(),
            None => false,
        };
        ancestors.push(json!({
            "id": a.id,
            "visible": true,
            "name": a.name,
            "status": a.status.as_str(),
            "owner": a.owner,
            "os_hash_value": a.os_hash_value,
            "family": a.properties.get(FAMILY_PROP),
            "version": a.properties.get(VERSION_PROP),
            "lineage": rec.as_ref().map(|r| record_json(r, up_visible)),
        }));
        next = rec.map(|r| r.parent_id);
    }
    if depth == 0 {
        if let Some(r) = &own {
            parent_visible = visible(&app, &ctx, &r.parent_id).await?.is_some();
        }
    }
    let marker = q.get("marker").map(String::as_str);
    let mut kids = app
        .catalog
        .lineage_children(&img.id, &viewer(&ctx), marker, limit.saturating_add(1))
        .await?;
    let more = kids.len() > limit as usize;
    kids.truncate(limit as usize);
    let mut children = Vec::with_capacity(kids.len());
    for k in &kids {
        let c = app.catalog.get_image(&k.image_id).await?;
        children.push(json!({
            "id": k.image_id,
            "name": c.as_ref().and_then(|c| c.name.clone()),
            "status": c.as_ref().map(|c| c.status.as_str()),
            "relation": k.relation.as_str(),
            "recorded_at": k.recorded_at,
        }));
    }
    let mut body = json!({
        "id": img.id,
        "lineage": own.as_ref().map(|r| record_json(r, parent_visible)),
        "ancestors": ancestors,
        "more_ancestors": next.is_some(),
        "children": children,
    });
    // Converted on import: the data as uploaded, before the registry converted it.
    if let Some(fmt) = img.properties.get(crate::import::PROP_SOURCE_FORMAT) {
        let p = |k: &str| img.properties.get(k).cloned();
        body["conversion"] = json!({
            "relation": "conversion",
            "source_disk_format": fmt,
            "source_size": p(crate::import::PROP_SOURCE_SIZE)
                .and_then(|v| v.parse::<u64>().ok()),
            "source_checksum": p(crate::import::PROP_SOURCE_CHECKSUM),
            "source_sha256": p(crate::import::PROP_SOURCE_SHA256),
            "source_os_hash_value": p(crate::import::PROP_SOURCE_HASH),
        });
    }
    if more {
        if let Some(last) = kids.last() {
            body["next"] = json!(format!(
                "/v2/images/{}/lineage?depth={depth}&limit={limit}&marker={}",
                img.id, last.image_id
            ));
        }
    }
    Ok(Json(body))
}

/// Record `parent` as the parent of `img` (already checked: caller may modify `img`).
async fn link(
    app: &App,
    ctx: &Context,
    img: &ImageRecord,
    parent: &ImageRecord,
    relation: Relation,
    build: Option<String>,
) -> Result<LineageRecord> {
    if !matches!(parent.status, Status::Active | Status::Deactivated) {
        return Err(RegistryError::Conflict(format!(
            "Parent image {} has no data (status {})",
            parent.id, parent.status
        )));
    }
    let rec = LineageRecord {
        image_id: img.id.clone(),
        parent_id: parent.id.clone(),
        parent_sha256: parent.sha256.clone(),
        parent_os_hash_value: parent.os_hash_value.clone(),
        relation,
        build,
        recorded_by: ctx.user_id.clone(),
        recorded_project: ctx.project_id.clone(),
        recorded_at: app.clock.now_string(),
    };
    // Once recorded, a link changes only while the image is queued, or by an administrator.
    let replace = img.status == Status::Queued || ctx.is_admin();
    app.catalog.set_lineage(&rec, replace).await?;
    Ok(rec)
}

/// The build record from a request: a JSON object, serialized, bounded.
fn build_record(v: Option<&Value>) -> Result<Option<String>> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(b @ Value::Object(_)) => {
            let s = b.to_string();
            if s.len() > MAX_BUILD_RECORD {
                return Err(RegistryError::PayloadTooLarge(format!(
                    "The build record is {} bytes; at most {MAX_BUILD_RECORD} are stored",
                    s.len()
                )));
            }
            Ok(Some(s))
        }
        Some(_) => Err(bad("build must be a JSON object")),
    }
}

/// `POST /v2/images/{id}/lineage` with `{"parent_id", "relation", "build"}`.
pub async fn record(
    State(app): State<Arc<App>>,
    ctx: Context,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<(StatusCode, Json<Value>)> {
    let img = load_visible(&app, &ctx, &id).await?;
    policy::check_modify(&ctx, &img)?;
    let v = parse_json(&body)?;
    let o = v
        .as_object()
        .ok_or_else(|| bad("the request body must be a JSON object"))?;
    if let Some(k) = o
        .keys()
        .find(|k| !["parent_id", "relation", "build"].contains(&k.as_str()))
    {
        return Err(bad(format!("unknown lineage attribute '{k}'")));
    }
    let parent_id = o
        .get("parent_id")
        .and_then(Value::as_str)
        .ok_or_else(|| bad("parent_id (a string) is required"))?;
    let relation: Relation = o
        .get("relation")
        .and_then(Value::as_str)
        .ok_or_else(|| bad("relation (a string) is required"))?
        .parse()
        .map_err(bad)?;
    let build = build_record(o.get("build"))?;
    let parent = load_visible(&app, &ctx, parent_id).await?;
    let rec = link(&app, &ctx, &img, &parent, relation, build).await?;
    Ok((StatusCode::CREATED, Json(record_json(&rec, true))))
}

/// Properties a derived image does not inherit from its template: family membership, flags,
/// server-managed (`vmi_*`), import state (`os_glance_*`) and signatures of other data.
fn inherited(key: &str) -> bool {
    ![FAMILY_PROP, VERSION_PROP, EXCLUDE_PROP, TEMPLATE_PROP].contains(&key)
        && !key.starts_with("vmi_")
        && !key.starts_with("os_glance_")
        && !key.starts_with("img_signature")
}

/// `POST /v2/images/{id}/actions/derive` with `{"name", "family", "version", "visibility",
/// "properties": {…}}`: a new image owned by the caller's project that shares the template's
/// data (no copy) and whose lineage points at it with relation `derive`.
pub async fn derive(
    State(app): State<Arc<App>>,
    ctx: Context,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<(StatusCode, Json<Value>)> {
    policy::check_create(&ctx)?;
    let tpl = load_visible(&app, &ctx, &id).await?;
    if !flag(&tpl, TEMPLATE_PROP) || tpl.status != Status::Active {
        return Err(RegistryError::Conflict(format!(
            "Image {id} is not an active template"
        )));
    }
    if refused_by_lifecycle(&tpl) {
        return Err(RegistryError::Conflict(format!(
            "Template {id} is obsolete or retired; derive from its replacement"
        )));
    }
    let (Some(location), Some(size)) = (tpl.location.clone(), tpl.size) else {
        return Err(RegistryError::Conflict(format!(
            "Template {id} has no data"
        )));
    };
    let v = parse_json(&body)?;
    let o = v
        .as_object()
        .ok_or_else(|| bad("the request body must be a JSON object"))?;
    if let Some(k) = o.keys().find(|k| {
        ![
            "name",
            "family",
            "version",
            "visibility",
            "properties",
            "tags",
        ]
        .contains(&k.as_str())
    }) {
        return Err(bad(format!("unknown derive attribute '{k}'")));
    }
    let mut attrs = Map::new();
    for (k, val) in &tpl.properties {
        if inherited(k) {
            attrs.insert(k.clone(), json!(val));
        }
    }
    attrs.insert("disk_format".into(), json!(tpl.disk_format));
    attrs.insert("container_format".into(), json!(tpl.container_format));
    attrs.insert("min_disk".into(), json!(tpl.min_disk));
    attrs.insert("min_ram".into(), json!(tpl.min_ram));
    match o.get("name") {
        Some(n @ Value::String(_)) => {
            attrs.insert("name".into(), n.clone());
        }
        _ => return Err(bad("name (a string) is required")),
    }
    for (k, prop) in [
        ("visibility", "visibility"),
        ("tags", "tags"),
        ("family", FAMILY_PROP),
        ("version", VERSION_PROP),
    ] {
        if let Some(val) = o.get(k) {
            attrs.insert(prop.into(), val.clone());
        }
    }
    match o.get("properties") {
        None | Some(Value::Null) => {}
        Some(Value::Object(p)) => {
            for (k, val) in p {
                attrs.insert(k.clone(), val.clone());
            }
        }
        Some(_) => return Err(bad("properties must be a JSON object")),
    }
    // The normal create path: the same validation and hooks as POST /v2/images.
    let (_, Json(created)) = super::images::create(
        State(app.clone()),
        ctx.clone(),
        Bytes::from(Value::Object(attrs).to_string()),
    )
    .await?;
    let new_id = created["id"].as_str().unwrap_or_default().to_string();
    match fill(&app, &ctx, &new_id, &tpl, &location, size).await {
        Ok(img) => Ok((StatusCode::CREATED, Json(image_json(&img)))),
        Err(e) => {
            // Leave nothing half-made behind (the template's object stays: it is not ours).
            if let Ok(Some(mut img)) = app.catalog.get_image(&new_id).await {
                let from = img.status;
                img.status = Status::Deleted;
                img.location = None;
                img.updated_at = app.clock.now_string();
                let _ = app.catalog.update_image(&img, from).await;
            }
            Err(e)
        }
    }
}

/// Link the new queued image `id` to `tpl` and make it active on the template's stored object.
///
/// No byte is copied: active images never change, so the derived image and its template share
/// one object (its digests are the template's) and deletion removes the object only when no
/// image refers to it any more ([`App::release_data`]). This is the linked clone a copy-on-write
/// overlay would give, without an overlay that Glance clients could not use on its own: the
/// derived image downloads as the same self-contained bytes, with the same checksums.
async fn fill(
    app: &App,
    ctx: &Context,
    id: &str,
    tpl: &ImageRecord,
    location: &str,
    size: u64,
) -> Result<ImageRecord> {
    let img = app
        .catalog
        .get_image(id)
        .await?
        .ok_or_else(|| policy::not_found(id))?;
    link(app, ctx, &img, tpl, Relation::Derive, None).await?;
    // Reload: recording the link added the reserved lineage properties.
    let queued = app
        .catalog
        .get_image(id)
        .await?
        .ok_or_else(|| policy::not_found(id))?;
    let (Some(md5), Some(sha256), Some(sha512)) = (
        tpl.checksum.clone(),
        tpl.sha256.clone(),
        tpl.os_hash_value.clone(),
    ) else {
        return Err(RegistryError::Conflict(format!(
            "Template {} has no recorded digests",
            tpl.id
        )));
    };
    let digests = DigestValues {
        md5,
        sha256,
        sha512,
        len: size,
    };
    let mut active = queued.clone();
    active.status = Status::Active;
    active.size = Some(size);
    active.virtual_size = tpl.virtual_size;
    active.checksum = Some(digests.md5.clone());
    active.os_hash_algo = tpl.os_hash_algo.clone();
    active.os_hash_value = Some(digests.sha512.clone());
    active.sha256 = Some(digests.sha256.clone());
    active.location = Some(location.to_string());
    active.updated_at = app.clock.now_string();
    // The checks an upload of these bytes would pass (the bytes were inspected when the
    // template was stored): the project's signature and metadata policies.
    crate::signing::verify_upload(app, &active, &digests, location).await?;
    crate::policies::check_metadata(app, &active).await?;
    let Some(stored) =
        crate::catalog::save_changes(app.catalog.as_ref(), &queued, &active, Status::Queued)
            .await?
    else {
        return Err(RegistryError::Conflict(format!(
            "Image {id} was changed by another request during derivation"
        )));
    };
    // A deletion of the template that committed before this image referred to the object may
    // remove the object; one that commits after sees this image and keeps it.
    let now = app.catalog.get_image(&tpl.id).await?;
    if now.as_ref().and_then(|t| t.location.as_deref()) != Some(location) {
        return Err(RegistryError::Conflict(format!(
            "Template {} was deleted during derivation",
            tpl.id
        )));
    }
    Ok(stored)
}
