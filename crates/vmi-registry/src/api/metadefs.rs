//! `/v2/metadefs`: Glance's metadata definitions catalog — namespaces, and in each namespace
//! its objects, properties, tags and resource type associations — and the
//! `/v2/schemas/metadefs/*` schemas that describe them.
//!
//! Rules as Glance's: anyone may read public namespaces and the private ones of their own
//! project; only admins create, change or delete anything. A protected namespace cannot be
//! deleted, nor can the objects, properties, tags or resource type associations in it, until
//! an update clears `protected`. The standard definitions Glance ships (`metadefs/*.json`,
//! Apache-2.0, see `metadefs/NOTICE`) are loaded on the first start, owned by the admin project.

use super::parse_json;
use crate::auth::Context;
use crate::catalog::metadefs::MetadefNamespace;
use crate::catalog::Catalog;
use crate::error::{RegistryError, Result};
use crate::model::now;
use crate::server::App;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Map, Value};
use std::collections::BTreeSet;
use std::sync::Arc;

/// Glance's limit on a namespace name.
const MAX_NAMESPACE_LEN: usize = 80;
/// Limit on every other name (objects, properties, tags, resource types).
const MAX_NAME_LEN: usize = 255;
/// Largest stored namespace document (its objects, properties, tags and associations), bytes.
const MAX_DOCUMENT_LEN: usize = 4 << 20;
/// Attempts of a compare-and-swap update before giving up with 409.
const UPDATE_ATTEMPTS: usize = 8;
/// Default and largest page of `GET /v2/metadefs/namespaces`.
const DEFAULT_LIMIT: usize = 25;
const MAX_LIMIT: usize = 1000;
/// Name of the standard definition set in the catalog's load record.
const STANDARD_SET: &str = "glance-standard";

/// The standard definition files, by name (`metadefs/*.json`, see `metadefs/NOTICE`).
pub const STANDARD: [(&str, &str); 33] = [
    (
        "cim-processor-allocation-setting-data.json",
        include_str!("../../metadefs/cim-processor-allocation-setting-data.json"),
    ),
    (
        "cim-resource-allocation-setting-data.json",
        include_str!("../../metadefs/cim-resource-allocation-setting-data.json"),
    ),
    (
        "cim-storage-allocation-setting-data.json",
        include_str!("../../metadefs/cim-storage-allocation-setting-data.json"),
    ),
    (
        "cim-virtual-system-setting-data.json",
        include_str!("../../metadefs/cim-virtual-system-setting-data.json"),
    ),
    (
        "compute-aggr-disk-filter.json",
        include_str!("../../metadefs/compute-aggr-disk-filter.json"),
    ),
    (
        "compute-aggr-iops-filter.json",
        include_str!("../../metadefs/compute-aggr-iops-filter.json"),
    ),
    (
        "compute-aggr-num-instances.json",
        include_str!("../../metadefs/compute-aggr-num-instances.json"),
    ),
    (
        "compute-cpu-mode.json",
        include_str!("../../metadefs/compute-cpu-mode.json"),
    ),
    (
        "compute-cpu-pinning.json",
        include_str!("../../metadefs/compute-cpu-pinning.json"),
    ),
    (
        "compute-guest-memory-backing.json",
        include_str!("../../metadefs/compute-guest-memory-backing.json"),
    ),
    (
        "compute-guest-shutdown.json",
        include_str!("../../metadefs/compute-guest-shutdown.json"),
    ),
    (
        "compute-host-capabilities.json",
        include_str!("../../metadefs/compute-host-capabilities.json"),
    ),
    (
        "compute-hypervisor.json",
        include_str!("../../metadefs/compute-hypervisor.json"),
    ),
    (
        "compute-instance-data.json",
        include_str!("../../metadefs/compute-instance-data.json"),
    ),
    (
        "compute-libvirt-image.json",
        include_str!("../../metadefs/compute-libvirt-image.json"),
    ),
    (
        "compute-libvirt.json",
        include_str!("../../metadefs/compute-libvirt.json"),
    ),
    (
        "compute-quota.json",
        include_str!("../../metadefs/compute-quota.json"),
    ),
    (
        "compute-randomgen.json",
        include_str!("../../metadefs/compute-randomgen.json"),
    ),
    (
        "compute-vcputopology.json",
        include_str!("../../metadefs/compute-vcputopology.json"),
    ),
    (
        "compute-vmware-flavor.json",
        include_str!("../../metadefs/compute-vmware-flavor.json"),
    ),
    (
        "compute-vmware-quota-flavor.json",
        include_str!("../../metadefs/compute-vmware-quota-flavor.json"),
    ),
    (
        "compute-vmware.json",
        include_str!("../../metadefs/compute-vmware.json"),
    ),
    (
        "compute-vtpm-hw.json",
        include_str!("../../metadefs/compute-vtpm-hw.json"),
    ),
    (
        "compute-vtpm.json",
        include_str!("../../metadefs/compute-vtpm.json"),
    ),
    (
        "compute-watchdog.json",
        include_str!("../../metadefs/compute-watchdog.json"),
    ),
    (
        "compute-xenapi.json",
        include_str!("../../metadefs/compute-xenapi.json"),
    ),
    (
        "glance-common-image-props.json",
        include_str!("../../metadefs/glance-common-image-props.json"),
    ),
    (
        "image-signature-verification.json",
        include_str!("../../metadefs/image-signature-verification.json"),
    ),
    (
        "operating-system.json",
        include_str!("../../metadefs/operating-system.json"),
    ),
    (
        "software-databases.json",
        include_str!("../../metadefs/software-databases.json"),
    ),
    (
        "software-runtimes.json",
        include_str!("../../metadefs/software-runtimes.json"),
    ),
    (
        "software-webservers.json",
        include_str!("../../metadefs/software-webservers.json"),
    ),
    (
        "storage-volume-type.json",
        include_str!("../../metadefs/storage-volume-type.json"),
    ),
];

/// The `/v2/metadefs` and `/v2/schemas/metadefs` routes.
pub fn router() -> Router<Arc<App>> {
    Router::new()
        .route("/schemas/metadefs/{name}", get(schema))
        .route("/metadefs/resource_types", get(list_resource_types))
        .route(
            "/metadefs/namespaces",
            get(list_namespaces).post(create_namespace),
        )
        .route(
            "/metadefs/namespaces/{ns}",
            get(show_namespace)
                .put(update_namespace)
                .delete(delete_namespace),
        )
        .route(
            "/metadefs/namespaces/{ns}/objects",
            get(list_objects).post(create_object).delete(delete_objects),
        )
        .route(
            "/metadefs/namespaces/{ns}/objects/{name}",
            get(show_object).put(update_object).delete(delete_object),
        )
        .route(
            "/metadefs/namespaces/{ns}/properties",
            get(list_properties)
                .post(create_property)
                .delete(delete_properties),
        )
        .route(
            "/metadefs/namespaces/{ns}/properties/{name}",
            get(show_property)
                .put(update_property)
                .delete(delete_property),
        )
        .route(
            "/metadefs/namespaces/{ns}/tags",
            get(list_tags).post(create_tags).delete(delete_tags),
        )
        .route(
            "/metadefs/namespaces/{ns}/tags/{name}",
            get(show_tag)
                .post(create_tag)
                .put(update_tag)
                .delete(delete_tag),
        )
        .route(
            "/metadefs/namespaces/{ns}/resource_types",
            get(list_associations).post(create_association),
        )
        .route(
            "/metadefs/namespaces/{ns}/resource_types/{name}",
            axum::routing::delete(delete_association),
        )
}

fn bad(msg: impl Into<String>) -> RegistryError {
    RegistryError::BadRequest(msg.into())
}

fn require_admin(ctx: &Context) -> Result<()> {
    if ctx.is_admin() {
        Ok(())
    } else {
        Err(RegistryError::Forbidden(
            "You are not authorized to perform the requested action.".into(),
        ))
    }
}

fn ns_not_found(ns: &str) -> RegistryError {
    RegistryError::NotFound(format!("Metadata definition namespace={ns} was not found."))
}

fn check_name(kind: &str, name: &str, max: usize) -> Result<()> {
    if name.is_empty()
        || name.len() > max
        || name.contains('/')
        || name.chars().any(char::is_control)
    {
        return Err(bad(format!(
            "{kind} name must be 1 to {max} characters, without '/' or control characters"
        )));
    }
    Ok(())
}

/// A namespace with its document parsed.
#[derive(Clone)]
struct Ns {
    rec: MetadefNamespace,
    body: Map<String, Value>,
}

impl Ns {
    fn parse(rec: MetadefNamespace) -> Result<Self> {
        let body = match serde_json::from_str(&rec.body) {
            Ok(Value::Object(m)) => m,
            _ => {
                return Err(RegistryError::catalog(
                    "reading a metadef namespace",
                    format!("namespace {} has a malformed document", rec.namespace),
                ))
            }
        };
        Ok(Ns { rec, body })
    }

    fn array_mut(&mut self, key: &str) -> &mut Vec<Value> {
        let v = self
            .body
            .entry(key.to_string())
            .or_insert_with(|| json!([]));
        if !v.is_array() {
            *v = json!([]);
        }
        match v {
            Value::Array(a) => a,
            _ => unreachable!("made an array above"),
        }
    }

    fn array(&self, key: &str) -> Vec<Value> {
        self.body
            .get(key)
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default()
    }

    fn properties_mut(&mut self) -> &mut Map<String, Value> {
        let v = self
            .body
            .entry("properties".to_string())
            .or_insert_with(|| json!({}));
        if !v.is_object() {
            *v = json!({});
        }
        match v {
            Value::Object(m) => m,
            _ => unreachable!("made an object above"),
        }
    }

    fn properties(&self) -> Map<String, Value> {
        self.body
            .get("properties")
            .and_then(Value::as_object)
            .cloned()
            .unwrap_or_default()
    }

    fn check_unprotected(&self, what: &str) -> Result<()> {
        if self.rec.protected {
            return Err(RegistryError::Forbidden(format!(
                "Delete of {what} in protected namespace {} is forbidden",
                self.rec.namespace
            )));
        }
        Ok(())
    }

    fn json(&self, full: bool) -> Value {
        let name = &self.rec.namespace;
        let mut m = Map::new();
        m.insert("namespace".into(), json!(name));
        for k in ["display_name", "description"] {
            if let Some(v) = self.body.get(k).filter(|v| !v.is_null()) {
                m.insert(k.into(), v.clone());
            }
        }
        m.insert("visibility".into(), json!(self.rec.visibility));
        m.insert("protected".into(), json!(self.rec.protected));
        m.insert("owner".into(), json!(self.rec.owner));
        m.insert("created_at".into(), json!(self.rec.created_at));
        m.insert("updated_at".into(), json!(self.rec.updated_at));
        m.insert("schema".into(), json!("/v2/schemas/metadefs/namespace"));
        m.insert(
            "self".into(),
            json!(format!("/v2/metadefs/namespaces/{name}")),
        );
        let assoc = self.array("resource_type_associations");
        if !assoc.is_empty() {
            m.insert("resource_type_associations".into(), json!(assoc));
        }
        if full {
            let props = self.properties();
            if !props.is_empty() {
                m.insert("properties".into(), Value::Object(props));
            }
            let objects: Vec<Value> = self
                .array("objects")
                .iter()
                .map(|o| object_json(name, o))
                .collect();
            if !objects.is_empty() {
                m.insert("objects".into(), json!(objects));
            }
            let tags = self.array("tags");
            if !tags.is_empty() {
                m.insert("tags".into(), json!(tags));
            }
        }
        Value::Object(m)
    }
}

fn object_json(ns: &str, o: &Value) -> Value {
    let mut o = o.clone();
    if let Some(m) = o.as_object_mut() {
        let name = m
            .get("name")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        m.insert("schema".into(), json!("/v2/schemas/metadefs/object"));
        m.insert(
            "self".into(),
            json!(format!("/v2/metadefs/namespaces/{ns}/objects/{name}")),
        );
        m.entry("required").or_insert_with(|| json!([]));
        m.entry("properties").or_insert_with(|| json!({}));
    }
    o
}

fn visible_to(ctx: &Context, rec: &MetadefNamespace) -> bool {
    ctx.is_admin() || rec.visibility == "public" || rec.owner == ctx.project_id
}

async fn load(app: &App, ctx: &Context, ns: &str) -> Result<Ns> {
    let rec = app
        .catalog
        .metadef_namespace(ns)
        .await?
        .filter(|r| visible_to(ctx, r))
        .ok_or_else(|| ns_not_found(ns))?;
    Ns::parse(rec)
}

/// Apply `f` to namespace `ns` and store the result (admin only), retrying when another
/// writer changed the namespace in between.
async fn modify<T>(
    app: &App,
    ctx: &Context,
    ns: &str,
    mut f: impl FnMut(&mut Ns) -> Result<T>,
) -> Result<(T, Ns)> {
    require_admin(ctx)?;
    for _ in 0..UPDATE_ATTEMPTS {
        let mut n = load(app, ctx, ns).await?;
        let out = f(&mut n)?;
        n.rec.updated_at = now();
        n.rec.body = Value::Object(n.body.clone()).to_string();
        if n.rec.body.len() > MAX_DOCUMENT_LEN {
            return Err(RegistryError::PayloadTooLarge(format!(
                "Metadata definition namespace {ns} would exceed {MAX_DOCUMENT_LEN} bytes"
            )));
        }
        if app.catalog.metadef_update(ns, &n.rec).await? {
            n.rec.revision = n.rec.revision.saturating_add(1);
            return Ok((out, n));
        }
    }
    Err(RegistryError::Conflict(format!(
        "Metadata definition namespace {ns} is being changed by other requests; retry"
    )))
}

fn str_field<'a>(v: &'a Value, key: &str) -> Result<Option<&'a str>> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(bad(format!("'{key}' must be a string"))),
    }
}

fn visibility(v: &Value) -> Result<Option<String>> {
    match str_field(v, "visibility")? {
        None => Ok(None),
        Some(s @ ("public" | "private")) => Ok(Some(s.to_string())),
        Some(s) => Err(bad(format!(
            "visibility '{s}' is not one of 'public', 'private'"
        ))),
    }
}

fn bool_field(v: &Value, key: &str) -> Result<Option<bool>> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(_) => Err(bad(format!("'{key}' must be a boolean"))),
    }
}

/// A resource type association from a request or a definition file.
fn association(v: &Value, stamp: &str) -> Result<Value> {
    let name = str_field(v, "name")?.ok_or_else(|| bad("'name' is required"))?;
    check_name("Resource type", name, MAX_NAME_LEN)?;
    let mut m = Map::new();
    m.insert("name".into(), json!(name));
    for k in ["prefix", "properties_target"] {
        if let Some(s) = str_field(v, k)? {
            m.insert(k.into(), json!(s));
        }
    }
    m.insert("created_at".into(), json!(stamp));
    m.insert("updated_at".into(), json!(stamp));
    Ok(Value::Object(m))
}

/// An object from a request or a definition file.
fn object(v: &Value, stamp: &str, created: Option<&Value>) -> Result<Value> {
    let name = str_field(v, "name")?.ok_or_else(|| bad("'name' is required"))?;
    check_name("Object", name, MAX_NAME_LEN)?;
    let mut m = Map::new();
    m.insert("name".into(), json!(name));
    if let Some(d) = str_field(v, "description")? {
        m.insert("description".into(), json!(d));
    }
    match v.get("required") {
        None | Some(Value::Null) => {}
        Some(Value::Array(a)) if a.iter().all(Value::is_string) => {
            m.insert("required".into(), json!(a));
        }
        Some(_) => return Err(bad("'required' must be a list of strings")),
    }
    match v.get("properties") {
        None | Some(Value::Null) => {}
        Some(Value::Object(p)) => {
            let mut out = Map::new();
            for (k, pv) in p {
                out.insert(k.clone(), property(k, pv)?);
            }
            m.insert("properties".into(), Value::Object(out));
        }
        Some(_) => return Err(bad("'properties' must be an object")),
    }
    m.insert(
        "created_at".into(),
        created.cloned().unwrap_or_else(|| json!(stamp)),
    );
    m.insert("updated_at".into(), json!(stamp));
    Ok(Value::Object(m))
}

/// A property definition (stored without its `name`, which is its key).
fn property(name: &str, v: &Value) -> Result<Value> {
    check_name("Property", name, MAX_NAME_LEN)?;
    let mut m = v
        .as_object()
        .cloned()
        .ok_or_else(|| bad(format!("property '{name}' must be an object")))?;
    m.remove("name");
    match m.get("title") {
        Some(Value::String(_)) => {}
        // Glance requires a title on properties created through the API; definition files
        // of object properties sometimes omit it.
        None => {
            m.insert("title".into(), json!(name));
        }
        Some(_) => return Err(bad("'title' must be a string")),
    }
    match m.get("type") {
        None => {}
        Some(Value::String(t))
            if ["array", "boolean", "integer", "number", "object", "string"]
                .contains(&t.as_str()) => {}
        Some(t) => return Err(bad(format!("property type {t} is not a JSON schema type"))),
    }
    Ok(Value::Object(m))
}

fn property_json(name: &str, p: &Value) -> Value {
    let mut p = p.clone();
    if let Some(m) = p.as_object_mut() {
        m.insert("name".into(), json!(name));
    }
    p
}

fn tag(name: &str, stamp: &str, created: Option<&Value>) -> Result<Value> {
    check_name("Tag", name, MAX_NAME_LEN)?;
    Ok(json!({"name": name,
              "created_at": created.cloned().unwrap_or_else(|| json!(stamp)),
              "updated_at": stamp}))
}

fn name_of(v: &Value) -> &str {
    v.get("name").and_then(Value::as_str).unwrap_or("")
}

/// A namespace document (and its columns) from a create request or a definition file.
fn new_namespace(v: &Value, owner: &str, default_protected: bool) -> Result<Ns> {
    let name = str_field(v, "namespace")?.ok_or_else(|| bad("'namespace' is required"))?;
    check_name("Namespace", name, MAX_NAMESPACE_LEN)?;
    let stamp = now();
    let mut body = Map::new();
    for k in ["display_name", "description"] {
        if let Some(s) = str_field(v, k)? {
            body.insert(k.into(), json!(s));
        }
    }
    let mut seen = BTreeSet::new();
    let mut assoc = Vec::new();
    for a in v
        .get("resource_type_associations")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let a = association(a, &stamp)?;
        if seen.insert(name_of(&a).to_string()) {
            assoc.push(a);
        }
    }
    body.insert("resource_type_associations".into(), json!(assoc));
    let mut props = Map::new();
    if let Some(p) = v.get("properties").filter(|p| !p.is_null()) {
        for (k, pv) in p
            .as_object()
            .ok_or_else(|| bad("'properties' must be an object"))?
        {
            props.insert(k.clone(), property(k, pv)?);
        }
    }
    body.insert("properties".into(), Value::Object(props));
    let mut seen = BTreeSet::new();
    let mut objects = Vec::new();
    for o in v
        .get("objects")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let o = object(o, &stamp, None)?;
        if !seen.insert(name_of(&o).to_string()) {
            return Err(RegistryError::Conflict(format!(
                "Duplicate object name {}",
                name_of(&o)
            )));
        }
        objects.push(o);
    }
    body.insert("objects".into(), json!(objects));
    let mut seen = BTreeSet::new();
    let mut tags = Vec::new();
    for t in v
        .get("tags")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let n = str_field(t, "name")?.ok_or_else(|| bad("each tag needs a 'name'"))?;
        if seen.insert(n.to_string()) {
            tags.push(tag(n, &stamp, None)?);
        }
    }
    body.insert("tags".into(), json!(tags));
    let owner = str_field(v, "owner")?.unwrap_or(owner).to_string();
    Ok(Ns {
        rec: MetadefNamespace {
            namespace: name.to_string(),
            owner,
            visibility: visibility(v)?.unwrap_or_else(|| "private".into()),
            protected: bool_field(v, "protected")?.unwrap_or(default_protected),
            body: Value::Object(body.clone()).to_string(),
            created_at: stamp.clone(),
            updated_at: stamp,
            revision: 0,
        },
        body,
    })
}

/// Load Glance's standard definitions into the catalog, once (later starts, and other nodes,
/// find the load recorded). Returns how many namespaces were loaded now.
pub async fn load_standard(catalog: &dyn Catalog, admin_project: &str) -> Result<usize> {
    let mut set = Vec::with_capacity(STANDARD.len());
    for (file, text) in STANDARD {
        let v: Value = serde_json::from_str(text).map_err(|e| {
            RegistryError::Config(format!("standard metadata definition {file}: {e}"))
        })?;
        let mut ns = new_namespace(&v, admin_project, true).map_err(|e| {
            RegistryError::Config(format!("standard metadata definition {file}: {e}"))
        })?;
        if v.get("visibility").is_none() {
            ns.rec.visibility = "public".into();
        }
        set.push(ns.rec);
    }
    let n = set.len();
    Ok(if catalog.metadef_load(STANDARD_SET, &set).await? {
        n
    } else {
        0
    })
}

// --- namespaces ---------------------------------------------------------------------------

async fn list_namespaces(
    State(app): State<Arc<App>>,
    ctx: Context,
    Query(params): Query<Vec<(String, String)>>,
) -> Result<Json<Value>> {
    let mut limit = DEFAULT_LIMIT;
    let mut marker = None;
    let mut vis = None;
    let mut types: Vec<String> = Vec::new();
    for (k, v) in &params {
        match k.as_str() {
            "limit" => {
                limit = v
                    .parse::<usize>()
                    .map_err(|_| bad("limit param must be a non-negative integer"))?
                    .min(MAX_LIMIT)
            }
            "marker" => marker = Some(v.clone()),
            "visibility" => vis = visibility(&json!({"visibility": v}))?,
            "resource_types" => types.extend(v.split(',').map(|s| s.trim().to_string())),
            _ => {}
        }
    }
    let mut all = app.catalog.metadef_namespaces().await?;
    // Glance's default order: newest first.
    all.sort_by(|a, b| {
        b.created_at
            .cmp(&a.created_at)
            .then_with(|| a.namespace.cmp(&b.namespace))
    });
    let mut out = Vec::new();
    let mut more = false;
    let mut past_marker = marker.is_none();
    for rec in all {
        if !visible_to(&ctx, &rec) {
            continue;
        }
        if !past_marker {
            past_marker = marker.as_deref() == Some(rec.namespace.as_str());
            continue;
        }
        if vis.as_deref().is_some_and(|v| v != rec.visibility) {
            continue;
        }
        let n = Ns::parse(rec)?;
        if !types.is_empty()
            && !n
                .array("resource_type_associations")
                .iter()
                .any(|a| types.iter().any(|t| t == name_of(a)))
        {
            continue;
        }
        if out.len() == limit {
            more = true;
            break;
        }
        out.push(n);
    }
    if !past_marker {
        return Err(bad("Invalid marker: no such namespace"));
    }
    let mut body = json!({
        "namespaces": out.iter().map(|n| n.json(false)).collect::<Vec<_>>(),
        "first": "/v2/metadefs/namespaces",
        "schema": "/v2/schemas/metadefs/namespaces",
    });
    if more {
        if let Some(last) = out.last() {
            body["next"] = json!(format!(
                "/v2/metadefs/namespaces?marker={}&limit={limit}",
                super::images::encode(&last.rec.namespace)
            ));
        }
    }
    Ok(Json(body))
}

async fn create_namespace(
    State(app): State<Arc<App>>,
    ctx: Context,
    body: Bytes,
) -> Result<(StatusCode, Json<Value>)> {
    require_admin(&ctx)?;
    let v = parse_json(&body)?;
    let n = new_namespace(&v, &ctx.project_id, false)?;
    match app.catalog.metadef_create(&n.rec).await {
        Ok(()) => Ok((StatusCode::CREATED, Json(n.json(true)))),
        Err(RegistryError::Conflict(_)) => Err(RegistryError::Conflict(format!(
            "Metadata definition namespace={} already exists.",
            n.rec.namespace
        ))),
        Err(e) => Err(e),
    }
}

async fn show_namespace(
    State(app): State<Arc<App>>,
    ctx: Context,
    Path(ns): Path<String>,
) -> Result<Json<Value>> {
    Ok(Json(load(&app, &ctx, &ns).await?.json(true)))
}

async fn update_namespace(
    State(app): State<Arc<App>>,
    ctx: Context,
    Path(ns): Path<String>,
    body: Bytes,
) -> Result<Json<Value>> {
    let v = parse_json(&body)?;
    if !v.is_object() {
        return Err(bad("the request body must be an object"));
    }
    let new_name = str_field(&v, "namespace")?
        .unwrap_or(ns.as_str())
        .to_string();
    check_name("Namespace", &new_name, MAX_NAMESPACE_LEN)?;
    let vis = visibility(&v)?;
    let protected = bool_field(&v, "protected")?;
    let owner = str_field(&v, "owner")?.map(str::to_string);
    let texts: Vec<(&str, Option<String>)> = ["display_name", "description"]
        .into_iter()
        .map(|k| Ok((k, str_field(&v, k)?.map(str::to_string))))
        .collect::<Result<_>>()?;
    let result = modify(&app, &ctx, &ns, |n| {
        n.rec.namespace = new_name.clone();
        if let Some(vis) = &vis {
            n.rec.visibility = vis.clone();
        }
        if let Some(p) = protected {
            n.rec.protected = p;
        }
        if let Some(o) = &owner {
            n.rec.owner = o.clone();
        }
        for (k, t) in &texts {
            match t {
                Some(t) => n.body.insert((*k).into(), json!(t)),
                None => n.body.remove(*k),
            };
        }
        Ok(())
    })
    .await;
    match result {
        Ok(((), n)) => Ok(Json(n.json(true))),
        Err(RegistryError::Conflict(m)) if m.contains("already exists") => {
            Err(RegistryError::Conflict(format!(
                "Metadata definition namespace={new_name} already exists."
            )))
        }
        Err(e) => Err(e),
    }
}

async fn delete_namespace(
    State(app): State<Arc<App>>,
    ctx: Context,
    Path(ns): Path<String>,
) -> Result<StatusCode> {
    require_admin(&ctx)?;
    let n = load(&app, &ctx, &ns).await?;
    if n.rec.protected {
        return Err(RegistryError::Forbidden(format!(
            "Namespace {ns} is protected and cannot be deleted."
        )));
    }
    if !app.catalog.metadef_delete(&ns).await? {
        return Err(ns_not_found(&ns));
    }
    Ok(StatusCode::NO_CONTENT)
}

// --- objects ------------------------------------------------------------------------------

fn object_not_found(ns: &str, name: &str) -> RegistryError {
    RegistryError::NotFound(format!(
        "Metadata definition object={name} was not found in namespace={ns}."
    ))
}

async fn list_objects(
    State(app): State<Arc<App>>,
    ctx: Context,
    Path(ns): Path<String>,
) -> Result<Json<Value>> {
    let n = load(&app, &ctx, &ns).await?;
    let objects: Vec<Value> = n
        .array("objects")
        .iter()
        .map(|o| object_json(&ns, o))
        .collect();
    Ok(Json(
        json!({"objects": objects, "schema": "v2/schemas/metadefs/objects"}),
    ))
}

async fn create_object(
    State(app): State<Arc<App>>,
    ctx: Context,
    Path(ns): Path<String>,
    body: Bytes,
) -> Result<(StatusCode, Json<Value>)> {
    let v = parse_json(&body)?;
    let (o, _) = modify(&app, &ctx, &ns, |n| {
        let o = object(&v, &now(), None)?;
        let objects = n.array_mut("objects");
        if objects.iter().any(|x| name_of(x) == name_of(&o)) {
            return Err(RegistryError::Conflict(format!(
                "A metadata definition object with name={} already exists in namespace={ns}.",
                name_of(&o)
            )));
        }
        objects.push(o.clone());
        Ok(o)
    })
    .await?;
    Ok((StatusCode::CREATED, Json(object_json(&ns, &o))))
}

async fn show_object(
    State(app): State<Arc<App>>,
    ctx: Context,
    Path((ns, name)): Path<(String, String)>,
) -> Result<Json<Value>> {
    let n = load(&app, &ctx, &ns).await?;
    n.array("objects")
        .iter()
        .find(|o| name_of(o) == name)
        .map(|o| Json(object_json(&ns, o)))
        .ok_or_else(|| object_not_found(&ns, &name))
}

async fn update_object(
    State(app): State<Arc<App>>,
    ctx: Context,
    Path((ns, name)): Path<(String, String)>,
    body: Bytes,
) -> Result<Json<Value>> {
    let v = parse_json(&body)?;
    let (o, _) = modify(&app, &ctx, &ns, |n| {
        let objects = n.array_mut("objects");
        let i = objects
            .iter()
            .position(|o| name_of(o) == name)
            .ok_or_else(|| object_not_found(&ns, &name))?;
        let o = object(&v, &now(), objects[i].get("created_at"))?;
        if name_of(&o) != name && objects.iter().any(|x| name_of(x) == name_of(&o)) {
            return Err(RegistryError::Conflict(format!(
                "A metadata definition object with name={} already exists in namespace={ns}.",
                name_of(&o)
            )));
        }
        objects[i] = o.clone();
        Ok(o)
    })
    .await?;
    Ok(Json(object_json(&ns, &o)))
}

async fn delete_object(
    State(app): State<Arc<App>>,
    ctx: Context,
    Path((ns, name)): Path<(String, String)>,
) -> Result<StatusCode> {
    modify(&app, &ctx, &ns, |n| {
        n.check_unprotected("objects")?;
        let objects = n.array_mut("objects");
        let before = objects.len();
        objects.retain(|o| name_of(o) != name);
        if objects.len() == before {
            return Err(object_not_found(&ns, &name));
        }
        Ok(())
    })
    .await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn delete_objects(
    State(app): State<Arc<App>>,
    ctx: Context,
    Path(ns): Path<String>,
) -> Result<StatusCode> {
    modify(&app, &ctx, &ns, |n| {
        n.check_unprotected("objects")?;
        n.array_mut("objects").clear();
        Ok(())
    })
    .await?;
    Ok(StatusCode::NO_CONTENT)
}

// --- properties ---------------------------------------------------------------------------

fn property_not_found(ns: &str, name: &str) -> RegistryError {
    RegistryError::NotFound(format!(
        "Metadata definition property={name} was not found in namespace={ns}."
    ))
}

async fn list_properties(
    State(app): State<Arc<App>>,
    ctx: Context,
    Path(ns): Path<String>,
) -> Result<Json<Value>> {
    let n = load(&app, &ctx, &ns).await?;
    Ok(Json(json!({"properties": n.properties()})))
}

fn named_property(v: &Value) -> Result<(String, Value)> {
    let name = str_field(v, "name")?
        .ok_or_else(|| bad("'name' is required"))?
        .to_string();
    let p = property(&name, v)?;
    Ok((name, p))
}

async fn create_property(
    State(app): State<Arc<App>>,
    ctx: Context,
    Path(ns): Path<String>,
    body: Bytes,
) -> Result<(StatusCode, Json<Value>)> {
    let v = parse_json(&body)?;
    let (name, p) = named_property(&v)?;
    modify(&app, &ctx, &ns, |n| {
        let props = n.properties_mut();
        if props.contains_key(&name) {
            return Err(RegistryError::Conflict(format!(
                "A metadata definition property with name={name} already exists in namespace={ns}."
            )));
        }
        props.insert(name.clone(), p.clone());
        Ok(())
    })
    .await?;
    Ok((StatusCode::CREATED, Json(property_json(&name, &p))))
}

/// The property `name`, or the property whose name with the namespace's prefix for
/// `resource_type` is `name` (Glance's `?resource_type=` lookup).
async fn show_property(
    State(app): State<Arc<App>>,
    ctx: Context,
    Path((ns, name)): Path<(String, String)>,
    Query(params): Query<Vec<(String, String)>>,
) -> Result<Json<Value>> {
    let n = load(&app, &ctx, &ns).await?;
    let props = n.properties();
    let mut key = name.clone();
    if let Some((_, rt)) = params.iter().find(|(k, _)| k == "resource_type") {
        let prefix = n
            .array("resource_type_associations")
            .iter()
            .find(|a| name_of(a) == rt)
            .and_then(|a| a.get("prefix").and_then(Value::as_str).map(str::to_string))
            .unwrap_or_default();
        key = name
            .strip_prefix(prefix.as_str())
            .ok_or_else(|| property_not_found(&ns, &name))?
            .to_string();
    }
    props
        .get(&key)
        .map(|p| Json(property_json(&name, p)))
        .ok_or_else(|| property_not_found(&ns, &name))
}

async fn update_property(
    State(app): State<Arc<App>>,
    ctx: Context,
    Path((ns, name)): Path<(String, String)>,
    body: Bytes,
) -> Result<Json<Value>> {
    let v = parse_json(&body)?;
    let mut v2 = v.clone();
    if v2.get("name").is_none() {
        if let Some(m) = v2.as_object_mut() {
            m.insert("name".into(), json!(name));
        }
    }
    let (new_name, p) = named_property(&v2)?;
    modify(&app, &ctx, &ns, |n| {
        let props = n.properties_mut();
        if !props.contains_key(&name) {
            return Err(property_not_found(&ns, &name));
        }
        if new_name != name && props.contains_key(&new_name) {
            return Err(RegistryError::Conflict(format!(
                "A metadata definition property with name={new_name} already exists in namespace={ns}."
            )));
        }
        props.remove(&name);
        props.insert(new_name.clone(), p.clone());
        Ok(())
    })
    .await?;
    Ok(Json(property_json(&new_name, &p)))
}

async fn delete_property(
    State(app): State<Arc<App>>,
    ctx: Context,
    Path((ns, name)): Path<(String, String)>,
) -> Result<StatusCode> {
    modify(&app, &ctx, &ns, |n| {
        n.check_unprotected("properties")?;
        n.properties_mut()
            .remove(&name)
            .map(|_| ())
            .ok_or_else(|| property_not_found(&ns, &name))
    })
    .await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn delete_properties(
    State(app): State<Arc<App>>,
    ctx: Context,
    Path(ns): Path<String>,
) -> Result<StatusCode> {
    modify(&app, &ctx, &ns, |n| {
        n.check_unprotected("properties")?;
        n.properties_mut().clear();
        Ok(())
    })
    .await?;
    Ok(StatusCode::NO_CONTENT)
}

// --- tags ---------------------------------------------------------------------------------

fn tag_not_found(ns: &str, name: &str) -> RegistryError {
    RegistryError::NotFound(format!(
        "Metadata definition tag={name} was not found in namespace={ns}."
    ))
}

fn tag_exists(ns: &str, name: &str) -> RegistryError {
    RegistryError::Conflict(format!(
        "A metadata tag with name={name} already exists in namespace={ns}."
    ))
}

async fn list_tags(
    State(app): State<Arc<App>>,
    ctx: Context,
    Path(ns): Path<String>,
) -> Result<Json<Value>> {
    let n = load(&app, &ctx, &ns).await?;
    Ok(Json(json!({"tags": n.array("tags")})))
}

/// `POST …/tags` with `{"tags": [{"name": …}, …]}`: replaces the namespace's tags, or adds to
/// them with `X-Openstack-Append: true`.
async fn create_tags(
    State(app): State<Arc<App>>,
    ctx: Context,
    Path(ns): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<(StatusCode, Json<Value>)> {
    let v = parse_json(&body)?;
    let append = headers
        .get("x-openstack-append")
        .and_then(|h| h.to_str().ok())
        .and_then(super::images::glance_bool)
        .unwrap_or(false);
    let names: Vec<String> = v
        .get("tags")
        .and_then(Value::as_array)
        .ok_or_else(|| bad("'tags' must be a list"))?
        .iter()
        .map(|t| {
            str_field(t, "name")?
                .map(str::to_string)
                .ok_or_else(|| bad("each tag needs a 'name'"))
        })
        .collect::<Result<_>>()?;
    let (created, _) = modify(&app, &ctx, &ns, |n| {
        let stamp = now();
        let tags = n.array_mut("tags");
        if !append {
            tags.clear();
        }
        let mut created = Vec::new();
        for name in &names {
            if tags.iter().any(|t| name_of(t) == name) {
                return Err(tag_exists(&ns, name));
            }
            let t = tag(name, &stamp, None)?;
            tags.push(t.clone());
            created.push(t);
        }
        Ok(created)
    })
    .await?;
    Ok((StatusCode::CREATED, Json(json!({"tags": created}))))
}

async fn delete_tags(
    State(app): State<Arc<App>>,
    ctx: Context,
    Path(ns): Path<String>,
) -> Result<StatusCode> {
    modify(&app, &ctx, &ns, |n| {
        n.check_unprotected("tags")?;
        n.array_mut("tags").clear();
        Ok(())
    })
    .await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn show_tag(
    State(app): State<Arc<App>>,
    ctx: Context,
    Path((ns, name)): Path<(String, String)>,
) -> Result<Json<Value>> {
    let n = load(&app, &ctx, &ns).await?;
    n.array("tags")
        .into_iter()
        .find(|t| name_of(t) == name)
        .map(Json)
        .ok_or_else(|| tag_not_found(&ns, &name))
}

async fn create_tag(
    State(app): State<Arc<App>>,
    ctx: Context,
    Path((ns, name)): Path<(String, String)>,
) -> Result<(StatusCode, Json<Value>)> {
    let (t, _) = modify(&app, &ctx, &ns, |n| {
        let t = tag(&name, &now(), None)?;
        let tags = n.array_mut("tags");
        if tags.iter().any(|x| name_of(x) == name) {
            return Err(tag_exists(&ns, &name));
        }
        tags.push(t.clone());
        Ok(t)
    })
    .await?;
    Ok((StatusCode::CREATED, Json(t)))
}

async fn update_tag(
    State(app): State<Arc<App>>,
    ctx: Context,
    Path((ns, name)): Path<(String, String)>,
    body: Bytes,
) -> Result<Json<Value>> {
    let v = parse_json(&body)?;
    let new_name = str_field(&v, "name")?
        .ok_or_else(|| bad("'name' is required"))?
        .to_string();
    let (t, _) = modify(&app, &ctx, &ns, |n| {
        let tags = n.array_mut("tags");
        let i = tags
            .iter()
            .position(|t| name_of(t) == name)
            .ok_or_else(|| tag_not_found(&ns, &name))?;
        if new_name != name && tags.iter().any(|t| name_of(t) == new_name) {
            return Err(tag_exists(&ns, &new_name));
        }
        let t = tag(&new_name, &now(), tags[i].get("created_at"))?;
        tags[i] = t.clone();
        Ok(t)
    })
    .await?;
    Ok(Json(t))
}

async fn delete_tag(
    State(app): State<Arc<App>>,
    ctx: Context,
    Path((ns, name)): Path<(String, String)>,
) -> Result<StatusCode> {
    modify(&app, &ctx, &ns, |n| {
        n.check_unprotected("tags")?;
        let tags = n.array_mut("tags");
        let before = tags.len();
        tags.retain(|t| name_of(t) != name);
        if tags.len() == before {
            return Err(tag_not_found(&ns, &name));
        }
        Ok(())
    })
    .await?;
    Ok(StatusCode::NO_CONTENT)
}

// --- resource types -----------------------------------------------------------------------

/// `GET /v2/metadefs/resource_types`: every resource type some namespace is associated with.
async fn list_resource_types(State(app): State<Arc<App>>, _ctx: Context) -> Result<Json<Value>> {
    let mut types: std::collections::BTreeMap<String, Value> = Default::default();
    for rec in app.catalog.metadef_namespaces().await? {
        let n = Ns::parse(rec)?;
        for a in n.array("resource_type_associations") {
            let name = name_of(&a).to_string();
            types.entry(name.clone()).or_insert_with(|| {
                json!({"name": name, "created_at": a.get("created_at"),
                       "updated_at": a.get("updated_at")})
            });
        }
    }
    Ok(Json(
        json!({"resource_types": types.into_values().collect::<Vec<_>>()}),
    ))
}

async fn list_associations(
    State(app): State<Arc<App>>,
    ctx: Context,
    Path(ns): Path<String>,
) -> Result<Json<Value>> {
    let n = load(&app, &ctx, &ns).await?;
    Ok(Json(
        json!({"resource_type_associations": n.array("resource_type_associations")}),
    ))
}

async fn create_association(
    State(app): State<Arc<App>>,
    ctx: Context,
    Path(ns): Path<String>,
    body: Bytes,
) -> Result<(StatusCode, Json<Value>)> {
    let v = parse_json(&body)?;
    let (a, _) = modify(&app, &ctx, &ns, |n| {
        let a = association(&v, &now())?;
        let list = n.array_mut("resource_type_associations");
        if list.iter().any(|x| name_of(x) == name_of(&a)) {
            return Err(RegistryError::Conflict(format!(
                "The metadata definition resource-type association of resource-type={} to \
                 namespace={ns}, already exists.",
                name_of(&a)
            )));
        }
        list.push(a.clone());
        Ok(a)
    })
    .await?;
    Ok((StatusCode::CREATED, Json(a)))
}

async fn delete_association(
    State(app): State<Arc<App>>,
    ctx: Context,
    Path((ns, name)): Path<(String, String)>,
) -> Result<StatusCode> {
    modify(&app, &ctx, &ns, |n| {
        n.check_unprotected("resource type associations")?;
        let list = n.array_mut("resource_type_associations");
        let before = list.len();
        list.retain(|a| name_of(a) != name);
        if list.len() == before {
            return Err(RegistryError::NotFound(format!(
                "The metadata definition resource-type association of resource-type={name} to \
                 namespace={ns}, was not found."
            )));
        }
        Ok(())
    })
    .await?;
    Ok(StatusCode::NO_CONTENT)
}

// --- schemas ------------------------------------------------------------------------------

fn property_schema() -> Value {
    json!({
        "type": "object",
        "required": ["title", "type"],
        "properties": {
            "name": {"type": "string", "maxLength": MAX_NAME_LEN},
            "title": {"type": "string"},
            "description": {"type": "string"},
            "operators": {"type": "array", "items": {"type": "string"}},
            "type": {"type": "string",
                     "enum": ["array", "boolean", "integer", "number", "object", "string", null]},
            "required": {"type": "array", "items": {"type": "string"}, "uniqueItems": true},
            "minimum": {"type": "number"},
            "maximum": {"type": "number"},
            "maxLength": {"type": "integer", "minimum": 0},
            "minLength": {"type": "integer", "minimum": 0},
            "pattern": {"type": "string", "format": "regex"},
            "enum": {"type": "array"},
            "readonly": {"type": "boolean"},
            "default": {},
            "items": {"type": "object"},
            "maxItems": {"type": "integer", "minimum": 0},
            "minItems": {"type": "integer", "minimum": 0},
            "uniqueItems": {"type": "boolean", "default": false},
            "additionalItems": {"type": "boolean"}
        }
    })
}

fn stamps() -> Value {
    json!({
        "created_at": {"type": "string", "readOnly": true, "format": "date-time",
                       "description": "Date and time of creation"},
        "updated_at": {"type": "string", "readOnly": true, "format": "date-time",
                       "description": "Date and time of the last modification"}
    })
}

fn with_stamps(mut props: Value) -> Value {
    if let (Some(m), Value::Object(s)) = (props.as_object_mut(), stamps()) {
        m.extend(s);
    }
    props
}

fn association_schema() -> Value {
    json!({
        "name": "resource_type_association",
        "properties": with_stamps(json!({
            "name": {"type": "string", "maxLength": MAX_NAME_LEN,
                     "description": "Resource type names should be aligned with Heat resource types whenever possible: http://docs.openstack.org/developer/heat/template_guide/openstack.html"},
            "prefix": {"type": "string", "maxLength": 80,
                       "description": "Specifies the prefix to use for the given resource type."},
            "properties_target": {"type": "string", "maxLength": 80,
                                  "description": "Some resource types allow more than one key / value pair per instance."}
        })),
        "required": ["name"],
        "additionalProperties": false
    })
}

fn object_schema() -> Value {
    json!({
        "name": "object",
        "properties": with_stamps(json!({
            "name": {"type": "string", "maxLength": MAX_NAME_LEN},
            "description": {"type": "string"},
            "required": {"type": "array", "items": {"type": "string"}},
            "properties": {"type": "object", "additionalProperties": property_schema()},
            "schema": {"type": "string", "readOnly": true},
            "self": {"type": "string", "readOnly": true}
        })),
        "required": ["name"],
        "additionalProperties": false
    })
}

fn tag_schema() -> Value {
    json!({
        "name": "tag",
        "properties": with_stamps(json!({
            "name": {"type": "string", "maxLength": MAX_NAME_LEN}
        })),
        "required": ["name"],
        "additionalProperties": false
    })
}

fn namespace_schema() -> Value {
    json!({
        "name": "namespace",
        "properties": with_stamps(json!({
            "namespace": {"type": "string", "maxLength": MAX_NAMESPACE_LEN,
                          "description": "The unique namespace text."},
            "display_name": {"type": "string", "maxLength": 80,
                             "description": "The user friendly name for the namespace."},
            "description": {"type": "string", "maxLength": 500,
                            "description": "Provides a user friendly description of the namespace."},
            "visibility": {"type": "string", "enum": ["public", "private"],
                           "description": "Scope of namespace accessibility."},
            "protected": {"type": "boolean",
                          "description": "If true, namespace will not be deletable."},
            "owner": {"type": "string", "maxLength": 255,
                      "description": "Owner of the namespace."},
            "schema": {"type": "string", "readOnly": true},
            "self": {"type": "string", "readOnly": true},
            "resource_type_associations": {"type": "array",
                                           "items": association_schema()},
            "properties": {"type": "object", "additionalProperties": property_schema()},
            "objects": {"type": "array", "items": object_schema()},
            "tags": {"type": "array", "items": tag_schema()}
        })),
        "required": ["namespace"],
        "additionalProperties": false
    })
}

fn list_schema(name: &str, item: Value) -> Value {
    json!({
        "name": name,
        "links": [
            {"href": "{first}", "rel": "first"},
            {"href": "{next}", "rel": "next"},
            {"href": "{schema}", "rel": "describedby"}
        ],
        "properties": {
            name: {"type": "array", "items": item},
            "first": {"type": "string"},
            "next": {"type": "string"},
            "schema": {"type": "string"}
        }
    })
}

/// `GET /v2/schemas/metadefs/{name}`.
async fn schema(_ctx: Context, Path(name): Path<String>) -> Result<Json<Value>> {
    let mut property = property_schema();
    property["name"] = json!("property");
    let v = match name.as_str() {
        "namespace" => namespace_schema(),
        "namespaces" => list_schema("namespaces", namespace_schema()),
        "resource_type" => association_schema(),
        "resource_types" => list_schema("resource_type_associations", association_schema()),
        "object" => object_schema(),
        "objects" => list_schema("objects", object_schema()),
        "property" => property,
        "properties" => json!({
            "name": "properties",
            "properties": {
                "properties": {"type": "object", "additionalProperties": property_schema()}
            },
            "links": [{"href": "{schema}", "rel": "describedby"}]
        }),
        "tag" => tag_schema(),
        "tags" => list_schema("tags", tag_schema()),
        _ => {
            return Err(RegistryError::NotFound(
                "The resource could not be found.".into(),
            ))
        }
    };
    Ok(Json(v))
}
