//! Interoperable image import (Glance's `stage` + `import`), conversion to the operator's storage
//! format, and converted copies for downloads in another format.
//!
//! The flow follows Glance's image import (Image API v2.6+):
//!
//! - `PUT /v2/images/{id}/stage` moves a `queued` image to `uploading` and streams the bytes into
//!   the image store's `staging/` area, which every node reaches, so the import may run anywhere.
//! - `POST /v2/images/{id}/import` moves the image to `importing` and starts a task:
//!   `glance-direct` imports the staged bytes, `web-download` first fetches a URL (filtered by
//!   the operator's `[import.filtering]` lists, see [`web`]) into the staging area. The task
//!   inspects the data exactly as a direct upload is inspected, converts it when the operator set
//!   `[import] convert_to` (see [`convert`]), stores it under `images/` while computing its
//!   digests, and makes the image `active`. A failure puts the image back to `queued` with
//!   Glance's `os_glance_failed_import` / `os_glance_importing_to_stores` properties.
//! - Tasks are recorded in the catalog with a lease that the running node renews. A node that
//!   dies leaves an expired lease; [`recover_stuck`] (run by the reaper) retries the task on
//!   another node, or returns the image to `queued` once the attempts are spent.

pub mod address;
pub mod convert;
pub mod stream;
pub mod web;

use crate::api::images::expected_format;
use crate::catalog::import::{ImportTask, TaskState};
use crate::digest::{DigestValues, HashPipeline, OS_HASH_ALGO};
use crate::error::{RegistryError, Result};
use crate::model::{now, ImageRecord, Status};
use crate::server::App;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use vmi_disk::inspect::{inspect, InspectOptions, Inspection};
use vmi_disk::Format;

/// Glance's name of the import method that imports staged data.
pub const GLANCE_DIRECT: &str = "glance-direct";
/// Glance's name of the import method that downloads a URL.
pub const WEB_DOWNLOAD: &str = "web-download";
/// Import method: copy an active image's data into more stores (every requested store that
/// does not hold it yet; with one store there is never anything to copy).
pub const COPY_IMAGE: &str = "copy-image";
/// The one store's id (as `/v2/info/stores` lists it).
pub const STORE_ID: &str = "default";
/// Glance's property: stores an import is still writing to (comma-separated).
pub const PROP_IMPORTING: &str = "os_glance_importing_to_stores";
/// Glance's property: stores an import failed for (comma-separated).
pub const PROP_FAILED: &str = "os_glance_failed_import";
/// vmi's property: why the last import failed.
pub const PROP_IMPORT_ERROR: &str = "vmi_import_error";
/// vmi's property: the disk format of the data as uploaded, before conversion.
pub const PROP_SOURCE_FORMAT: &str = "vmi_source_disk_format";
/// vmi's property: the size of the data as uploaded.
pub const PROP_SOURCE_SIZE: &str = "vmi_source_size";
/// vmi's property: the MD5 of the data as uploaded.
pub const PROP_SOURCE_CHECKSUM: &str = "vmi_source_checksum";
/// vmi's property: the multihash (`os_hash_algo`) of the data as uploaded.
pub const PROP_SOURCE_HASH: &str = "vmi_source_os_hash_value";
/// vmi's property: the SHA-256 of the data as uploaded.
pub const PROP_SOURCE_SHA256: &str = "vmi_source_sha256";

/// Properties the server manages: clients may not set or remove them (403, as Glance refuses
/// its own reserved `os_glance_*` names).
pub const SERVER_PROPERTIES: [&str; 8] = [
    PROP_IMPORTING,
    PROP_FAILED,
    PROP_IMPORT_ERROR,
    PROP_SOURCE_FORMAT,
    PROP_SOURCE_SIZE,
    PROP_SOURCE_CHECKSUM,
    PROP_SOURCE_HASH,
    PROP_SOURCE_SHA256,
];

/// Default lease of a running import task; the runner renews it every third of it.
pub const DEFAULT_TASK_LEASE_SECS: u64 = 300;
/// Default number of conversions one project may run at once on one node.
pub const DEFAULT_MAX_CONVERSIONS_PER_PROJECT: usize = 2;
/// Default number of runs of one import before it is given up.
pub const DEFAULT_MAX_ATTEMPTS: u32 = 2;
/// Expired tasks handled per recovery pass.
const RECOVER_BATCH: u32 = 100;

/// Glance's `[import_filtering_opts]`: where web-download may fetch from. An empty allow list
/// allows everything its deny list does not name; a non-empty allow list is used alone.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ImportFiltering {
    /// URL schemes allowed (only `http` and `https` are ever fetched).
    pub allowed_schemes: Vec<String>,
    /// URL schemes refused when `allowed_schemes` is empty.
    pub disallowed_schemes: Vec<String>,
    /// Host names or addresses allowed.
    pub allowed_hosts: Vec<String>,
    /// Host names or addresses refused when `allowed_hosts` is empty.
    pub disallowed_hosts: Vec<String>,
    /// Ports allowed.
    pub allowed_ports: Vec<u16>,
    /// Ports refused when `allowed_ports` is empty.
    pub disallowed_ports: Vec<u16>,
    /// Special-purpose networks (loopback, private, link-local, unique-local, …; see
    /// [`address`]) web-download may connect to nevertheless, in CIDR notation
    /// (`["10.20.0.0/16"]`). Empty by default: those are refused.
    pub allowed_networks: Vec<String>,
}

impl Default for ImportFiltering {
    /// Glance's defaults: http and https on ports 80 and 443, any host.
    fn default() -> Self {
        ImportFiltering {
            allowed_schemes: vec!["http".into(), "https".into()],
            disallowed_schemes: Vec::new(),
            allowed_hosts: Vec::new(),
            disallowed_hosts: Vec::new(),
            allowed_ports: vec![80, 443],
            disallowed_ports: Vec::new(),
            allowed_networks: Vec::new(),
        }
    }
}

/// `[import]`: interoperable import and conversion.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ImportConfig {
    /// Import methods offered (Glance's `enabled_import_methods`).
    pub enabled_methods: Vec<String>,
    /// Storage format imports and uploads are converted to (`qcow2` or `raw`; Glance's
    /// image-conversion `output_format`). Unset: data is stored as uploaded.
    pub convert_to: Option<String>,
    /// Lease of a running import task, seconds.
    pub task_lease_secs: u64,
    /// Runs of one import before it is given up.
    pub max_attempts: u32,
    /// Largest web-download, bytes (also bounded by `image_size_cap`).
    pub web_download_max_bytes: Option<u64>,
    /// Folder for conversion temporary files (default: the system's temporary folder).
    pub work_dir: Option<PathBuf>,
    /// Where web-download may fetch from.
    pub filtering: ImportFiltering,
    /// Conversions (downloads in another format, conversion on upload and import) one project
    /// may run at once on one node; downloads beyond it are answered 429, uploads and imports
    /// wait. 0: no limit.
    pub max_conversions_per_project: usize,
}

impl Default for ImportConfig {
    fn default() -> Self {
        ImportConfig {
            enabled_methods: vec![GLANCE_DIRECT.into(), WEB_DOWNLOAD.into(), COPY_IMAGE.into()],
            convert_to: None,
            task_lease_secs: DEFAULT_TASK_LEASE_SECS,
            max_attempts: DEFAULT_MAX_ATTEMPTS,
            web_download_max_bytes: None,
            work_dir: None,
            filtering: ImportFiltering::default(),
            max_conversions_per_project: DEFAULT_MAX_CONVERSIONS_PER_PROJECT,
        }
    }
}

impl ImportConfig {
    /// The storage format data is converted to, if any.
    pub fn storage_format(&self) -> Result<Option<&'static str>> {
        match self.convert_to.as_deref() {
            None | Some("") => Ok(None),
            Some("qcow2") => Ok(Some("qcow2")),
            Some("raw") => Ok(Some("raw")),
            Some(other) => Err(RegistryError::Config(format!(
                "import.convert_to = '{other}': expected qcow2 or raw"
            ))),
        }
    }
}

/// Refuse a client's attempt to set or remove a server-managed property.
pub fn check_property(key: &str) -> Result<()> {
    if SERVER_PROPERTIES.contains(&key) || key.starts_with("os_glance_") {
        return Err(RegistryError::Forbidden(format!(
            "Attribute '{key}' is reserved."
        )));
    }
    Ok(())
}

fn conflict(id: &str) -> RegistryError {
    RegistryError::Conflict(format!("Image {id} was changed by another request; retry"))
}

/// Store the bytes of `stream` as a new object (in `area`, or as image data when `None`),
/// computing the digests on other threads while the store writes.
pub(crate) async fn store_stream<S>(
    app: &App,
    image_id: &str,
    area: Option<&str>,
    mut stream: S,
    cap: u64,
) -> Result<(String, DigestValues)>
where
    S: futures_util::Stream<Item = Result<bytes::Bytes>> + Unpin,
{
    let mut sink = match area {
        Some(a) => app.data.begin_in(a, image_id).await?,
        None => app.data.begin(image_id).await?,
    };
    let mut hasher = HashPipeline::new();
    let mut total: u64 = 0;
    let streamed: Result<()> = async {
        while let Some(chunk) = stream.next().await {
            let chunk = chunk?;
            total = total.saturating_add(chunk.len() as u64);
            if total > cap {
                return Err(RegistryError::PayloadTooLarge(format!(
                    "Image exceeds the storage quota of {cap} bytes"
                )));
            }
            hasher
                .push(chunk.clone())
                .await
                .map_err(|e| RegistryError::io("hashing", e))?;
            sink.write(chunk).await?;
        }
        Ok(())
    }
    .await;
    if let Err(e) = streamed {
        sink.abort().await;
        return Err(e);
    }
    let location = sink.location().to_string();
    sink.finish().await?;
    match hasher.finish().await {
        Ok(d) => Ok((location, d)),
        Err(e) => {
            delete_quietly(app, &location).await;
            Err(RegistryError::io("hashing", e))
        }
    }
}

/// Delete stored bytes, logging (not failing) when the store refuses: the reaper retries.
pub(crate) async fn delete_quietly(app: &App, location: &str) {
    if let Err(e) = app.data.delete(location).await {
        eprintln!(
            "vmi-registry: removing {location}: {}",
            crate::error::chain(&e)
        );
    }
}

/// Inspect the stored object at `location` as an upload of `disk_format`; unsafe data is
/// [`RegistryError::Refused`] with every violation.
pub(crate) async fn inspect_stored(
    app: &App,
    image_id: &str,
    location: &str,
    size: u64,
    disk_format: Option<&str>,
) -> Result<Inspection> {
    let opts = InspectOptions {
        expected_format: disk_format.and_then(expected_format),
        allow_backing: false,
    };
    let data = app.data.clone();
    let (loc, id) = (location.to_string(), image_id.to_string());
    let inspection = tokio::task::spawn_blocking(move || {
        let storage = data.random_access(&loc, size)?;
        inspect(storage, std::path::Path::new(&id), &opts)
            .map_err(|e| RegistryError::store("inspecting the image data", e))
    })
    .await
    .map_err(|e| RegistryError::store("inspecting the image data", e))??;
    if !inspection.is_safe() {
        return Err(RegistryError::Refused {
            violations: inspection.violations,
        });
    }
    Ok(inspection)
}

/// Record the digests of the data as it was uploaded, before conversion.
fn record_source(img: &mut ImageRecord, format: &str, d: &DigestValues) {
    let p = &mut img.properties;
    p.insert(PROP_SOURCE_FORMAT.into(), format.into());
    p.insert(PROP_SOURCE_SIZE.into(), d.len.to_string());
    p.insert(PROP_SOURCE_CHECKSUM.into(), d.md5.clone());
    p.insert(PROP_SOURCE_HASH.into(), d.sha512.clone());
    p.insert(PROP_SOURCE_SHA256.into(), d.sha256.clone());
}

fn set_data(img: &mut ImageRecord, location: String, d: DigestValues, virtual_size: Option<u64>) {
    img.size = Some(d.len);
    img.virtual_size = virtual_size.or(Some(d.len));
    img.checksum = Some(d.md5);
    img.os_hash_algo = Some(OS_HASH_ALGO.into());
    img.os_hash_value = Some(d.sha512);
    img.sha256 = Some(d.sha256);
    img.location = Some(location);
}

/// The storage format `img`'s data (detected as `detected`) must be converted to, if any.
fn conversion_target(
    app: &App,
    img: &ImageRecord,
    detected: Format,
) -> Result<Option<&'static str>> {
    let Some(target) = app.config.import.storage_format()? else {
        return Ok(None);
    };
    let target_fmt = expected_format(target)
        .ok_or_else(|| RegistryError::Config(format!("unknown format {target}")))?;
    // An ISO is a CD-ROM image, not a disk: converting it would change how it boots.
    if detected == target_fmt
        || detected == Format::Iso
        || img.disk_format.as_deref() == Some("iso")
    {
        return Ok(None);
    }
    Ok(Some(target))
}

/// Convert `src` into `target`, store it, and describe the result in `img`, keeping the
/// source's format and digests as `vmi_source_*` properties.
async fn convert_into(
    app: &App,
    img: &mut ImageRecord,
    src: &str,
    source: &DigestValues,
    detected: Format,
    target: &'static str,
) -> Result<()> {
    let source_format = img
        .disk_format
        .clone()
        .unwrap_or_else(|| detected.name().into());
    let slot = app.guards.conversions.acquire(&img.owner).await?;
    let c = convert::convert_stored(app, &img.id, None, src, source.len, detected, target).await?;
    drop(slot);
    record_source(img, &source_format, source);
    set_data(img, c.location, c.digests, Some(c.virtual_size));
    img.disk_format = Some(target.into());
    Ok(())
}

/// Bytes received for an image and stored at `location`.
pub(crate) struct Received {
    /// Where the bytes are.
    pub location: String,
    /// Their length.
    pub size: u64,
    /// Their digests when the receiving path computed them (a direct upload); `None` for
    /// staged data, which is hashed here.
    pub digests: Option<DigestValues>,
    /// A staging object (import): never the image's data, left for the caller to remove. A
    /// direct upload's object becomes the image's data, or is deleted here once converted.
    pub staged: bool,
}

/// What every path that gives an image its data runs, in one order, so that no check can be
/// added to one path only: the size cap; inspection of the stored bytes (the detected format
/// must match `disk_format`; backing files, data files, external extents, unknown incompatible
/// features and polyglots are refused); the operator's required metadata; the image's
/// signature (over the data as uploaded); then the storage the operator chose (`[import]
/// convert_to`: converted, keeping the upload's format and digests as `vmi_source_*`).
///
/// Returns the active record to store with a compare-and-swap on status `saving`/`importing`.
/// Its data is stored but not yet referenced by the catalog: if the swap fails the caller
/// deletes `location` of the returned record. On error nothing this function stored is left;
/// `received.location` is the caller's to remove.
pub(crate) async fn admit(app: &App, img: &ImageRecord, received: Received) -> Result<ImageRecord> {
    let cap = app.config.image_size_cap;
    let size = received.size;
    if size > cap {
        return Err(RegistryError::PayloadTooLarge(format!(
            "Image exceeds the storage quota: {size} > {cap} bytes"
        )));
    }
    let src = received.location.as_str();
    let inspection = inspect_stored(app, &img.id, src, size, img.disk_format.as_deref()).await?;
    crate::policies::check_metadata(app, img).await?;
    let target = conversion_target(app, img, inspection.format)?;
    let mut active = img.clone();
    match (target, received.digests) {
        (Some(target), digests) => {
            // Converted straight from where the bytes are: hashed if need be, never copied.
            let source = match digests {
                Some(d) => d,
                None => hash_stored(app, src).await?,
            };
            // A signature covers the data as uploaded, before any conversion.
            crate::signing::verify_upload(app, img, &source, src).await?;
            convert_into(app, &mut active, src, &source, inspection.format, target).await?;
            if !received.staged {
                delete_quietly(app, src).await;
            }
        }
        (None, Some(digests)) if !received.staged => {
            crate::signing::verify_upload(app, img, &digests, src).await?;
            set_data(
                &mut active,
                src.to_string(),
                digests,
                inspection.virtual_size,
            );
        }
        (None, _) => {
            // Staged bytes are the image's data only as a copy of their own.
            let stream = app
                .data
                .read(src, None)
                .await?
                .map(|r| r.map_err(|e| RegistryError::io("reading staged data", e)));
            let (location, digests) = store_stream(app, &img.id, None, stream, cap).await?;
            if let Err(e) = crate::signing::verify_upload(app, img, &digests, &location).await {
                delete_quietly(app, &location).await;
                return Err(e);
            }
            set_data(&mut active, location, digests, inspection.virtual_size);
        }
    }
    active.status = Status::Active;
    active.updated_at = now();
    Ok(active)
}

/// The digests of stored bytes (read once, not copied).
async fn hash_stored(app: &App, location: &str) -> Result<DigestValues> {
    let mut stream = app.data.read(location, None).await?;
    let mut hasher = HashPipeline::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| RegistryError::io("reading staged data", e))?;
        hasher
            .push(chunk)
            .await
            .map_err(|e| RegistryError::io("hashing", e))?;
    }
    hasher
        .finish()
        .await
        .map_err(|e| RegistryError::io("hashing", e))
}

/// A node-unique lease token.
fn new_token() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

fn lease_expiry(app: &App) -> String {
    let secs = i64::try_from(app.config.import.task_lease_secs).unwrap_or(i64::MAX / 2);
    crate::clock::format_time(app.clock.now() + chrono::Duration::seconds(secs))
}

/// Glance's properties while an import runs.
pub(crate) fn mark_importing(img: &mut ImageRecord) {
    img.properties
        .insert(PROP_IMPORTING.into(), STORE_ID.into());
    img.properties.insert(PROP_FAILED.into(), String::new());
    img.properties.remove(PROP_IMPORT_ERROR);
}

/// Start the import task of an image the caller has just moved to `importing`.
pub(crate) async fn start_task(
    app: &Arc<App>,
    image_id: &str,
    method: &str,
    uri: Option<String>,
    staged: Option<(String, u64)>,
) -> Result<()> {
    let t = now();
    let task = ImportTask {
        image_id: image_id.to_string(),
        method: method.to_string(),
        uri,
        staging_location: staged.as_ref().map(|s| s.0.clone()),
        staging_size: staged.map(|s| s.1),
        state: TaskState::Running,
        lease_token: Some(new_token()),
        lease_expires: Some(lease_expiry(app)),
        attempts: 1,
        message: None,
        created_at: t.clone(),
        updated_at: t,
    };
    app.catalog.put_import_task(&task).await?;
    spawn_run(app.clone(), task);
    Ok(())
}

fn spawn_run(app: Arc<App>, task: ImportTask) {
    tokio::spawn(async move {
        let id = task.image_id.clone();
        if let Err(e) = run_task(&app, task).await {
            eprintln!(
                "vmi-registry: import of image {id}: {}",
                crate::error::chain(&e)
            );
        }
    });
}

/// Run an import while renewing its lease; on failure the image goes back to `queued`.
async fn run_task(app: &Arc<App>, task: ImportTask) -> Result<()> {
    let id = task.image_id.clone();
    let lease = Arc::new(tokio::sync::Mutex::new(task.clone()));
    let renew_every = Duration::from_secs((app.config.import.task_lease_secs / 3).max(1));
    let work = perform(app, task, lease.clone());
    tokio::pin!(work);
    let mut ticker = tokio::time::interval(renew_every);
    ticker.tick().await;
    let outcome = loop {
        tokio::select! {
            r = &mut work => break r,
            _ = ticker.tick() => {
                let mut t = lease.lock().await;
                let old = t.lease_token.clone().unwrap_or_default();
                let mut renewed = t.clone();
                renewed.lease_expires = Some(lease_expiry(app));
                renewed.updated_at = now();
                if app.catalog.swap_import_task(&renewed, &old).await? {
                    *t = renewed;
                } else {
                    // Another node took the task over: stop without touching the image.
                    return Err(RegistryError::Conflict(format!(
                        "the import task of image {id} was taken over by another node"
                    )));
                }
            }
        }
    };
    let task = lease.lock().await.clone();
    match outcome {
        Ok(()) => {
            if let Some(loc) = &task.staging_location {
                delete_quietly(app, loc).await;
            }
            app.catalog.delete_import_task(&id).await?;
            Ok(())
        }
        Err(e) => {
            fail(app, &task, &e).await?;
            Err(e)
        }
    }
}

/// Give an import up: the image goes back to `queued` with Glance's failure properties, the
/// staged data and the task are removed.
pub(crate) async fn fail(app: &App, task: &ImportTask, e: &RegistryError) -> Result<()> {
    if let Some(mut img) = app.catalog.get_image(&task.image_id).await? {
        if img.status == Status::Importing || img.status == Status::Uploading {
            let from = img.status;
            let before = img.clone();
            img.status = Status::Queued;
            img.properties.insert(PROP_IMPORTING.into(), String::new());
            img.properties.insert(PROP_FAILED.into(), STORE_ID.into());
            let mut msg = if e.status().is_server_error() {
                "the import failed on the server".to_string()
            } else {
                e.to_string()
            };
            msg.truncate(crate::model::MAX_PROPERTY_VALUE_LEN);
            img.properties.insert(PROP_IMPORT_ERROR.into(), msg);
            img.updated_at = now();
            crate::catalog::save_changes(app.catalog.as_ref(), &before, &img, from).await?;
        }
    }
    if let Some(loc) = &task.staging_location {
        delete_quietly(app, loc).await;
    }
    app.catalog.delete_import_task(&task.image_id).await
}

/// The import itself: fetch (web-download), inspect, convert or copy, activate.
async fn perform(
    app: &Arc<App>,
    task: ImportTask,
    lease: Arc<tokio::sync::Mutex<ImportTask>>,
) -> Result<()> {
    let id = task.image_id.clone();
    let (staging, size) = match (&task.staging_location, task.staging_size) {
        (Some(l), Some(s)) => (l.clone(), s),
        _ => {
            let uri = task.uri.clone().ok_or_else(|| {
                RegistryError::BadRequest("the import task has no staged data and no URI".into())
            })?;
            let (loc, size) = web::fetch_to_staging(app, &id, &uri).await?;
            let mut t = lease.lock().await;
            let old = t.lease_token.clone().unwrap_or_default();
            let mut updated = t.clone();
            updated.staging_location = Some(loc.clone());
            updated.staging_size = Some(size);
            updated.updated_at = now();
            if !app.catalog.swap_import_task(&updated, &old).await? {
                delete_quietly(app, &loc).await;
                return Err(conflict(&id));
            }
            *t = updated;
            (loc, size)
        }
    };
    let img = app
        .catalog
        .get_image(&id)
        .await?
        .ok_or_else(|| crate::policy::not_found(&id))?;
    if img.status != Status::Importing {
        return Err(conflict(&id));
    }
    let before = img.clone();
    let active = import_staged(app, img, &staging, size).await?;
    if crate::catalog::save_changes(app.catalog.as_ref(), &before, &active, Status::Importing)
        .await?
        .is_none()
    {
        if let Some(loc) = &active.location {
            delete_quietly(app, loc).await;
        }
        return Err(conflict(&id));
    }
    Ok(())
}

/// Inspect staged data and store it (converted when configured) as the image's data; returns
/// the active image to record (its data stored but not yet referenced by the catalog).
pub(crate) async fn import_staged(
    app: &App,
    img: ImageRecord,
    staging: &str,
    size: u64,
) -> Result<ImageRecord> {
    let received = Received {
        location: staging.to_string(),
        size,
        digests: None,
        staged: true,
    };
    let mut active = admit(app, &img, received).await?;
    active
        .properties
        .insert(PROP_IMPORTING.into(), String::new());
    Ok(active)
}

/// Retry or give up import tasks whose node stopped renewing the lease (it crashed or was
/// restarted). Each expired task is taken with a compare-and-swap on its lease, so with several
/// nodes recovering at once each task is handled once. Returns how many tasks were handled.
pub async fn recover_stuck(app: &Arc<App>) -> Result<usize> {
    let expired = app
        .catalog
        .expired_import_tasks(&app.clock.now_string(), RECOVER_BATCH)
        .await?;
    let mut n = 0;
    for task in expired {
        let old = task.lease_token.clone().unwrap_or_default();
        let mut mine = task.clone();
        mine.lease_token = Some(new_token());
        mine.lease_expires = Some(lease_expiry(app));
        mine.attempts = task.attempts.saturating_add(1);
        mine.updated_at = now();
        if !app.catalog.swap_import_task(&mine, &old).await? {
            continue;
        }
        n += 1;
        let image_importing = matches!(
            app.catalog.get_image(&task.image_id).await?,
            Some(i) if i.status == Status::Importing
        );
        if image_importing && task.attempts < app.config.import.max_attempts {
            eprintln!(
                "vmi-registry: import of image {} lost its node; retrying (attempt {})",
                task.image_id, mine.attempts
            );
            spawn_run(app.clone(), mine);
        } else {
            let e = RegistryError::Conflict(format!(
                "the import was interrupted {} times",
                task.attempts
            ));
            fail(app, &mine, &e).await?;
        }
    }
    n += requeue_orphans(app).await?;
    Ok(n)
}

/// Images left `uploading` or `importing` for longer than the reap grace with no running task
/// (a node died in the middle of a stage, or between moving the image to `importing` and
/// recording the task) go back to `queued`; their staged data, if any, is removed.
async fn requeue_orphans(app: &Arc<App>) -> Result<usize> {
    use crate::catalog::{Cmp, Field, Filter, ImageQuery, Viewer};
    let grace = i64::try_from(app.config.reap_grace_secs).unwrap_or(i64::MAX / 2);
    let cutoff = crate::clock::format_time(app.clock.now() - chrono::Duration::seconds(grace));
    let mut q = ImageQuery::new(Viewer::Admin);
    q.os_hidden = None;
    q.limit = RECOVER_BATCH;
    q.filters = vec![
        Filter {
            field: Field::Status,
            cmp: Cmp::In(vec![
                Status::Uploading.as_str().into(),
                Status::Importing.as_str().into(),
            ]),
            value: String::new(),
        },
        Filter {
            field: Field::UpdatedAt,
            cmp: Cmp::Lt,
            value: cutoff,
        },
    ];
    let mut n = 0;
    for img in app.catalog.list_images(&q).await? {
        let task = app.catalog.get_import_task(&img.id).await?;
        let orphan = match &task {
            None => true,
            Some(t) => t.state == TaskState::Staged && img.status == Status::Importing,
        };
        if !orphan {
            continue;
        }
        let task = task.unwrap_or_else(|| ImportTask {
            image_id: img.id.clone(),
            method: String::new(),
            uri: None,
            staging_location: None,
            staging_size: None,
            state: TaskState::Staged,
            lease_token: None,
            lease_expires: None,
            attempts: 0,
            message: None,
            created_at: img.updated_at.clone(),
            updated_at: img.updated_at.clone(),
        });
        eprintln!(
            "vmi-registry: image {} was {} with no running import; back to queued",
            img.id, img.status
        );
        let e = RegistryError::Conflict("the stage or import was interrupted".into());
        fail(app, &task, &e).await?;
        n += 1;
    }
    Ok(n)
}

/// The hook image deletion calls: remove converted copies, staged data and the import task.
pub async fn forget_image(app: &App, image_id: &str) -> Result<()> {
    for c in app.catalog.take_conversions(image_id).await? {
        delete_quietly(app, &c.location).await;
    }
    if let Some(t) = app.catalog.get_import_task(image_id).await? {
        if let Some(loc) = &t.staging_location {
            delete_quietly(app, loc).await;
        }
        app.catalog.delete_import_task(image_id).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_qcow2_and_raw_are_storage_formats() {
        let mut c = ImportConfig::default();
        assert_eq!(c.storage_format().unwrap(), None);
        c.convert_to = Some("qcow2".into());
        assert_eq!(c.storage_format().unwrap(), Some("qcow2"));
        c.convert_to = Some("vhd".into());
        assert!(c.storage_format().is_err());
    }

    #[test]
    fn server_managed_properties_are_reserved() {
        assert!(check_property(PROP_FAILED).is_err());
        assert!(check_property("os_glance_anything").is_err());
        assert!(check_property(PROP_SOURCE_SHA256).is_err());
        assert!(check_property("hw_disk_bus").is_ok());
    }
}
