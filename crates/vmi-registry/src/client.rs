//! A client for the registry's Glance v2 API, used by `vmi image …`: authenticates with a token
//! or a password, follows `next` links when listing, streams uploads and downloads with progress
//! bars, resumes interrupted downloads with `Range`, and verifies downloads against the image's
//! MD5 (`checksum`) while writing.

use crate::error::{RegistryError, Result};
use futures_util::TryStreamExt;
use indicatif::{ProgressBar, ProgressStyle};
use md5::{Digest, Md5};
use serde_json::{json, Value};
use std::path::Path;
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};

/// How to authenticate.
#[derive(Debug, Clone)]
pub enum Auth {
    /// A token (`X-Auth-Token`).
    Token(String),
    /// Password authentication at `<url>/v3/auth/tokens`.
    Password {
        /// User name.
        user: String,
        /// Password.
        password: String,
        /// Project name to scope to; the user's default project when `None`.
        project: Option<String>,
    },
}

/// What a download did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Downloaded {
    /// Bytes written in this call.
    pub written: u64,
    /// Bytes that were already there (resumed download).
    pub resumed_from: u64,
    /// The verified MD5.
    pub md5: String,
}

/// A connection to one registry.
#[derive(Debug, Clone)]
pub struct RegistryClient {
    http: reqwest::Client,
    base: String,
    token: String,
    /// The project the token is scoped to.
    pub project_id: String,
}

fn transport(what: &str, e: reqwest::Error) -> RegistryError {
    RegistryError::Remote {
        status: 0,
        message: format!("{what}: {e}"),
    }
}

async fn check(resp: reqwest::Response) -> Result<reqwest::Response> {
    let status = resp.status();
    if status.is_success() {
        return Ok(resp);
    }
    let body = resp.bytes().await.unwrap_or_default();
    let message = serde_json::from_slice::<Value>(&body)
        .ok()
        .and_then(|v| {
            v.pointer("/error/message")
                .and_then(Value::as_str)
                .map(str::to_string)
        })
        .unwrap_or_else(|| String::from_utf8_lossy(&body).trim().to_string());
    Err(RegistryError::Remote {
        status: status.as_u16(),
        message,
    })
}

fn bar(len: u64, show: bool) -> ProgressBar {
    if !show {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new(len);
    if let Ok(style) = ProgressStyle::with_template(
        "{bar:40} {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}",
    ) {
        pb.set_style(style);
    }
    pb
}

impl RegistryClient {
    /// Authenticate against `base` (e.g. `http://127.0.0.1:9292`).
    pub async fn connect(base: &str, auth: &Auth) -> Result<Self> {
        let http = reqwest::Client::new();
        let base = base.trim_end_matches('/').to_string();
        let url = format!("{base}/v3/auth/tokens");
        let (token, body) = match auth {
            Auth::Token(t) => {
                let resp = http
                    .get(&url)
                    .header("x-auth-token", t)
                    .header("x-subject-token", t)
                    .send()
                    .await
                    .map_err(|e| transport("validating the token", e))?;
                let v: Value = check(resp)
                    .await?
                    .json()
                    .await
                    .map_err(|e| transport("reading the token", e))?;
                (t.clone(), v)
            }
            Auth::Password {
                user,
                password,
                project,
            } => {
                let mut req = json!({"auth": {"identity": {"methods": ["password"],
                    "password": {"user": {"name": user, "domain": {"name": "Default"},
                                          "password": password}}}}});
                if let Some(p) = project {
                    req["auth"]["scope"] =
                        json!({"project": {"name": p, "domain": {"name": "Default"}}});
                }
                let resp = http
                    .post(&url)
                    .json(&req)
                    .send()
                    .await
                    .map_err(|e| transport("authenticating", e))?;
                let resp = check(resp).await?;
                let token = resp
                    .headers()
                    .get("x-subject-token")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string)
                    .ok_or_else(|| RegistryError::Remote {
                        status: 0,
                        message: "no X-Subject-Token in the answer".into(),
                    })?;
                let v: Value = resp
                    .json()
                    .await
                    .map_err(|e| transport("reading the token", e))?;
                (token, v)
            }
        };
        let project_id = body
            .pointer("/token/project/id")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        Ok(RegistryClient {
            http,
            base,
            token,
            project_id,
        })
    }

    /// A request to `path` (relative to the registry, or an absolute URL it returned).
    fn req(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let url = if path.starts_with("http://") || path.starts_with("https://") {
            path.to_string()
        } else {
            format!("{}{path}", self.base)
        };
        self.http
            .request(method, url)
            .header("x-auth-token", &self.token)
    }

    async fn json(&self, rb: reqwest::RequestBuilder, what: &str) -> Result<Value> {
        let resp = rb.send().await.map_err(|e| transport(what, e))?;
        check(resp)
            .await?
            .json()
            .await
            .map_err(|e| transport(what, e))
    }

    async fn empty(&self, rb: reqwest::RequestBuilder, what: &str) -> Result<()> {
        let resp = rb.send().await.map_err(|e| transport(what, e))?;
        check(resp).await.map(|_| ())
    }

    /// Every image matching `filters` (Glance query parameters), following `next` links.
    pub async fn list(&self, filters: &[(String, String)]) -> Result<Vec<Value>> {
        let mut out = Vec::new();
        let mut rb = self.req(reqwest::Method::GET, "/v2/images").query(filters);
        loop {
            let page = self.json(rb, "listing images").await?;
            if let Some(imgs) = page["images"].as_array() {
                out.extend(imgs.iter().cloned());
            }
            match page["next"].as_str() {
                Some(next) => rb = self.req(reqwest::Method::GET, next),
                None => return Ok(out),
            }
        }
    }

    /// The image `id_or_name` (a UUID, or a name that matches exactly one image).
    pub async fn show(&self, id_or_name: &str) -> Result<Value> {
        let id = self.resolve(id_or_name).await?;
        self.json(
            self.req(reqwest::Method::GET, &format!("/v2/images/{id}")),
            "showing an image",
        )
        .await
    }

    /// The id of `id_or_name`.
    pub async fn resolve(&self, id_or_name: &str) -> Result<String> {
        if uuid::Uuid::parse_str(id_or_name).is_ok() {
            return Ok(id_or_name.to_string());
        }
        let found = self
            .list(&[("name".to_string(), id_or_name.to_string())])
            .await?;
        match found.as_slice() {
            [one] => Ok(one["id"].as_str().unwrap_or_default().to_string()),
            [] => Err(RegistryError::NotFound(format!(
                "no image named '{id_or_name}'"
            ))),
            _ => Err(RegistryError::Conflict(format!(
                "{} images are named '{id_or_name}'; use the id",
                found.len()
            ))),
        }
    }

    /// Create an image from Glance attributes.
    pub async fn create(&self, attrs: &Value) -> Result<Value> {
        self.json(
            self.req(reqwest::Method::POST, "/v2/images").json(attrs),
            "creating an image",
        )
        .await
    }

    /// Apply a JSON patch.
    pub async fn patch(&self, id: &str, ops: &Value) -> Result<Value> {
        self.json(
            self.req(reqwest::Method::PATCH, &format!("/v2/images/{id}"))
                .header(
                    "content-type",
                    "application/openstack-images-v2.1-json-patch",
                )
                .body(ops.to_string()),
            "updating an image",
        )
        .await
    }

    /// Delete an image.
    pub async fn delete(&self, id: &str) -> Result<()> {
        self.empty(
            self.req(reqwest::Method::DELETE, &format!("/v2/images/{id}")),
            "deleting an image",
        )
        .await
    }

    /// Share an image with `project`.
    pub async fn share(&self, id: &str, project: &str) -> Result<Value> {
        self.json(
            self.req(reqwest::Method::POST, &format!("/v2/images/{id}/members"))
                .json(&json!({"member": project})),
            "sharing an image",
        )
        .await
    }

    /// Answer a share for the caller's project (`accepted`, `rejected`, `pending`).
    pub async fn answer(&self, id: &str, status: &str) -> Result<Value> {
        let path = format!("/v2/images/{id}/members/{}", self.project_id);
        self.json(
            self.req(reqwest::Method::PUT, &path)
                .json(&json!({"status": status})),
            "answering a share",
        )
        .await
    }

    /// Upload `file` as the data of image `id`.
    pub async fn upload(&self, id: &str, file: &Path, progress: bool) -> Result<()> {
        self.put_file(
            &format!("/v2/images/{id}/file"),
            file,
            progress,
            "uploading",
        )
        .await
    }

    /// Stream `file` as an `application/octet-stream` PUT body to `path`, with a progress bar.
    async fn put_file(&self, path: &str, file: &Path, progress: bool, what: &str) -> Result<()> {
        let f = tokio::fs::File::open(file)
            .await
            .map_err(|e| RegistryError::io(format!("opening {}", file.display()), e))?;
        let len = f
            .metadata()
            .await
            .map_err(|e| RegistryError::io(format!("reading {}", file.display()), e))?
            .len();
        let pb = bar(len, progress);
        let pb2 = pb.clone();
        let stream = tokio_util::io::ReaderStream::with_capacity(f, 1 << 20)
            .inspect_ok(move |c| pb2.inc(c.len() as u64));
        let r = self
            .empty(
                self.req(reqwest::Method::PUT, path)
                    .header("content-type", "application/octet-stream")
                    .header("content-length", len)
                    .body(reqwest::Body::wrap_stream(stream)),
                what,
            )
            .await;
        pb.finish_and_clear();
        r
    }

    /// Upload `file` through a resumable upload session in chunks of `chunk` bytes, retrying a
    /// failed chunk from the offset the server reports (up to `retries` times in a row).
    /// `session` continues a session another process opened (its `Location`). On failure the
    /// error names the session so that a later call can continue it.
    pub async fn upload_resumable(
        &self,
        id: &str,
        file: &Path,
        chunk: u64,
        session: Option<&str>,
        retries: u32,
        progress: bool,
    ) -> Result<()> {
        let io = |what: &str, e| RegistryError::io(format!("{what} {}", file.display()), e);
        // The digest the server verifies at the end: one local pass before sending.
        let mut f = tokio::fs::File::open(file)
            .await
            .map_err(|e| io("opening", e))?;
        let mut sha = sha2::Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        let mut len = 0u64;
        loop {
            let n = f.read(&mut buf).await.map_err(|e| io("reading", e))?;
            if n == 0 {
                break;
            }
            sha.update(&buf[..n]);
            len += n as u64;
        }
        let digest = hex::encode(sha.finalize());
        let loc = match session {
            Some(s) => s.to_string(),
            None => {
                let resp = self
                    .req(reqwest::Method::POST, &format!("/v2/images/{id}/uploads"))
                    .send()
                    .await
                    .map_err(|e| transport("opening an upload session", e))?;
                let resp = check(resp).await?;
                resp.headers()
                    .get("location")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string)
                    .ok_or_else(|| RegistryError::Remote {
                        status: 0,
                        message: "no Location for the upload session".into(),
                    })?
            }
        };
        let failed = |e: RegistryError| RegistryError::Remote {
            status: match &e {
                RegistryError::Remote { status, .. } => *status,
                _ => 0,
            },
            message: format!("{e}; continue with --session {loc}"),
        };
        let pb = bar(len, progress);
        let mut offset = self.session_offset(&loc).await.map_err(failed)?;
        let mut tries = 0;
        while offset < len {
            pb.set_position(offset);
            let n = chunk.min(len - offset);
            let mut part = vec![0u8; usize::try_from(n).unwrap_or(usize::MAX)];
            f.seek(std::io::SeekFrom::Start(offset))
                .await
                .map_err(|e| io("seeking in", e))?;
            f.read_exact(&mut part)
                .await
                .map_err(|e| io("reading", e))?;
            let sent = self
                .req(reqwest::Method::PATCH, &loc)
                .header("upload-offset", offset)
                .header("content-type", "application/octet-stream")
                .body(part)
                .send()
                .await;
            let ok = match sent {
                Ok(resp) => check(resp).await.is_ok(),
                Err(_) => false,
            };
            if ok {
                tries = 0;
            } else {
                tries += 1;
                if tries > retries {
                    pb.finish_and_clear();
                    return Err(failed(RegistryError::Remote {
                        status: 0,
                        message: format!("chunk at offset {offset} failed {tries} times"),
                    }));
                }
            }
            offset = self.session_offset(&loc).await.map_err(failed)?;
        }
        pb.finish_and_clear();
        self.empty(
            self.req(
                reqwest::Method::PUT,
                &format!("{loc}?digest=sha256:{digest}"),
            ),
            "finishing the upload",
        )
        .await
    }

    async fn session_offset(&self, loc: &str) -> Result<u64> {
        let resp = self
            .req(reqwest::Method::HEAD, loc)
            .send()
            .await
            .map_err(|e| transport("querying the upload session", e))?;
        let resp = check(resp).await?;
        resp.headers()
            .get("upload-offset")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| RegistryError::Remote {
                status: 0,
                message: "no Upload-Offset in the answer".into(),
            })
    }

    /// Download image `id` to `out`, resuming a partial file when `resume` is set, and verify
    /// the MD5 against the image's `checksum`.
    pub async fn download(
        &self,
        id: &str,
        out: &Path,
        resume: bool,
        progress: bool,
    ) -> Result<Downloaded> {
        let img = self.show(id).await?;
        let size = img["size"].as_u64().unwrap_or(0);
        let want = img["checksum"].as_str().map(str::to_string);
        let mut md5 = Md5::new();
        let mut have = 0u64;
        let io = |what: &str, e| RegistryError::io(format!("{what} {}", out.display()), e);
        let mut file = if resume && out.exists() {
            let mut f = tokio::fs::OpenOptions::new()
                .read(true)
                .append(true)
                .open(out)
                .await
                .map_err(|e| io("opening", e))?;
            let mut buf = vec![0u8; 1 << 20];
            loop {
                let n = f.read(&mut buf).await.map_err(|e| io("reading", e))?;
                if n == 0 {
                    break;
                }
                md5.update(&buf[..n]);
                have += n as u64;
            }
            if have > size {
                return Err(RegistryError::BadRequest(format!(
                    "{} is larger than the image ({have} > {size} bytes)",
                    out.display()
                )));
            }
            f
        } else {
            tokio::fs::File::create(out)
                .await
                .map_err(|e| io("creating", e))?
        };
        let mut written = 0u64;
        if have < size || size == 0 {
            let mut rb = self.req(reqwest::Method::GET, &format!("/v2/images/{id}/file"));
            if have > 0 {
                rb = rb.header("range", format!("bytes={have}-"));
            }
            let resp = check(rb.send().await.map_err(|e| transport("downloading", e))?).await?;
            if have > 0 && resp.status() != reqwest::StatusCode::PARTIAL_CONTENT {
                return Err(RegistryError::Remote {
                    status: resp.status().as_u16(),
                    message: "the server did not resume the download".into(),
                });
            }
            let pb = bar(size, progress);
            pb.set_position(have);
            let mut stream = resp.bytes_stream();
            while let Some(chunk) = stream
                .try_next()
                .await
                .map_err(|e| transport("downloading", e))?
            {
                md5.update(&chunk);
                file.write_all(&chunk).await.map_err(|e| io("writing", e))?;
                written += chunk.len() as u64;
                pb.inc(chunk.len() as u64);
            }
            pb.finish_and_clear();
        }
        file.flush().await.map_err(|e| io("writing", e))?;
        let got = hex::encode(md5.finalize());
        if let Some(want) = want {
            if want != got {
                return Err(RegistryError::Remote {
                    status: 0,
                    message: format!(
                        "checksum mismatch for {}: got md5 {got}, the image has {want}",
                        out.display()
                    ),
                });
            }
        }
        Ok(Downloaded {
            written,
            resumed_from: have,
            md5: got,
        })
    }
}

/// Downloads converted by the registry (`?format=`, a vmi extension).
impl RegistryClient {
    /// Download image `id` converted to `format` into `out` (written under a temporary name and
    /// renamed when complete). A cached conversion carries `Content-MD5`, which is verified; an
    /// on-the-fly conversion has none, and `md5` is then empty.
    pub async fn download_as(
        &self,
        id: &str,
        format: &str,
        out: &Path,
        progress: bool,
    ) -> Result<Downloaded> {
        let io = |what: &str, e| RegistryError::io(format!("{what} {}", out.display()), e);
        let rb = self
            .req(reqwest::Method::GET, &format!("/v2/images/{id}/file"))
            .query(&[("format", format)]);
        let resp = check(rb.send().await.map_err(|e| transport("downloading", e))?).await?;
        let want = resp
            .headers()
            .get("content-md5")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let len = resp.content_length().unwrap_or(0);
        let mut name = out.file_name().unwrap_or_default().to_os_string();
        name.push(format!(".part-{}", std::process::id()));
        let tmp = out.with_file_name(name);
        let mut file = tokio::fs::File::create(&tmp)
            .await
            .map_err(|e| io("creating", e))?;
        let mut md5 = Md5::new();
        let mut written = 0u64;
        let pb = bar(len, progress);
        let mut stream = resp.bytes_stream();
        let copied: Result<()> = async {
            while let Some(chunk) = stream
                .try_next()
                .await
                .map_err(|e| transport("downloading", e))?
            {
                md5.update(&chunk);
                file.write_all(&chunk).await.map_err(|e| io("writing", e))?;
                written += chunk.len() as u64;
                pb.inc(chunk.len() as u64);
            }
            file.flush().await.map_err(|e| io("writing", e))?;
            Ok(())
        }
        .await;
        pb.finish_and_clear();
        let got = hex::encode(md5.finalize());
        let verdict = match (copied, &want) {
            (Err(e), _) => Err(e),
            (Ok(()), Some(w)) if *w != got => Err(RegistryError::Remote {
                status: 0,
                message: format!(
                    "checksum mismatch for {}: got md5 {got}, the registry sent {w}",
                    out.display()
                ),
            }),
            (Ok(()), _) => Ok(()),
        };
        if let Err(e) = verdict {
            let _ = tokio::fs::remove_file(&tmp).await;
            return Err(e);
        }
        tokio::fs::rename(&tmp, out)
            .await
            .map_err(|e| io("renaming into", e))?;
        Ok(Downloaded {
            written,
            resumed_from: 0,
            md5: if want.is_some() { got } else { String::new() },
        })
    }
}

/// Families, lineage and templates (vmi extensions).
impl RegistryClient {
    fn family_req(&self, family: &str, what: &str, owner: Option<&str>) -> reqwest::RequestBuilder {
        let rb = self.req(
            reqwest::Method::GET,
            &format!("/v2/families/{family}/{what}"),
        );
        match owner {
            Some(o) => rb.query(&[("owner", o)]),
            None => rb,
        }
    }

    /// The families the caller can see, each with its latest image (every page, following
    /// `next` links): `{"families": [...]}`.
    pub async fn families(&self, owner: Option<&str>) -> Result<Value> {
        let mut rb = self.req(reqwest::Method::GET, "/v2/families");
        if let Some(o) = owner {
            rb = rb.query(&[("owner", o)]);
        }
        let mut all = Vec::new();
        loop {
            let page = self.json(rb, "listing families").await?;
            if let Some(f) = page["families"].as_array() {
                all.extend(f.iter().cloned());
            }
            match page["next"].as_str() {
                Some(next) => rb = self.req(reqwest::Method::GET, next),
                None => break,
            }
        }
        Ok(serde_json::json!({ "families": all }))
    }

    /// A family's images, newest version first, and its latest image's id.
    pub async fn family_images(&self, family: &str, owner: Option<&str>) -> Result<Value> {
        self.json(self.family_req(family, "images", owner), "listing a family")
            .await
    }

    /// A family's latest image.
    pub async fn family_latest(&self, family: &str, owner: Option<&str>) -> Result<Value> {
        self.json(
            self.family_req(family, "latest", owner),
            "resolving a family's latest image",
        )
        .await
    }

    /// An image's lineage: up to `depth` ancestors and every direct child (following `next`).
    pub async fn lineage(&self, id: &str, depth: u32) -> Result<Value> {
        let mut v = self
            .json(
                self.req(reqwest::Method::GET, &format!("/v2/images/{id}/lineage"))
                    .query(&[("depth", depth)]),
                "reading lineage",
            )
            .await?;
        let mut next = v["next"].as_str().map(str::to_string);
        while let Some(n) = next {
            let page = self
                .json(self.req(reqwest::Method::GET, &n), "reading lineage")
                .await?;
            if let (Some(all), Some(more)) =
                (v["children"].as_array_mut(), page["children"].as_array())
            {
                all.extend(more.iter().cloned());
            }
            next = page["next"].as_str().map(str::to_string);
        }
        if let Some(o) = v.as_object_mut() {
            o.remove("next");
        }
        Ok(v)
    }

    /// Record what image `id` was derived from (`{"parent_id", "relation", "build"}`).
    pub async fn record_lineage(&self, id: &str, body: &Value) -> Result<Value> {
        self.json(
            self.req(reqwest::Method::POST, &format!("/v2/images/{id}/lineage"))
                .json(body),
            "recording lineage",
        )
        .await
    }

    /// Create an image from template `id` (`{"name", "family", "version", "visibility",
    /// "properties"}`).
    pub async fn derive(&self, id: &str, body: &Value) -> Result<Value> {
        self.json(
            self.req(
                reqwest::Method::POST,
                &format!("/v2/images/{id}/actions/derive"),
            )
            .json(body),
            "deriving an image",
        )
        .await
    }
}

/// Signing keys (`/v2/signing-keys`, a vmi extension).
impl RegistryClient {
    /// Register a PEM public key or certificate with the token's project.
    pub async fn signing_key_add(&self, pem: &str, name: Option<&str>) -> Result<Value> {
        let rb = self
            .req(reqwest::Method::POST, "/v2/signing-keys")
            .json(&json!({"key": pem, "name": name}));
        self.json(rb, "registering a signing key").await
    }

    /// The project's signing keys.
    pub async fn signing_keys(&self) -> Result<Vec<Value>> {
        let v = self
            .json(
                self.req(reqwest::Method::GET, "/v2/signing-keys"),
                "listing signing keys",
            )
            .await?;
        Ok(v["signing_keys"].as_array().cloned().unwrap_or_default())
    }

    /// One signing key, with its PEM.
    pub async fn signing_key(&self, id: &str) -> Result<Value> {
        self.json(
            self.req(reqwest::Method::GET, &format!("/v2/signing-keys/{id}")),
            "reading a signing key",
        )
        .await
    }

    /// Remove a signing key.
    pub async fn signing_key_delete(&self, id: &str) -> Result<()> {
        self.empty(
            self.req(reqwest::Method::DELETE, &format!("/v2/signing-keys/{id}")),
            "deleting a signing key",
        )
        .await
    }
}

/// Lifecycle, recycle bin and audit log (vmi extensions).
impl RegistryClient {
    /// `POST /v2/images/{id}/actions/lifecycle` with `body` (state, replacement, dates).
    pub async fn lifecycle(&self, id: &str, body: &Value) -> Result<Value> {
        self.json(
            self.req(
                reqwest::Method::POST,
                &format!("/v2/images/{id}/actions/lifecycle"),
            )
            .json(body),
            "changing the lifecycle",
        )
        .await
    }

    /// Bring a recycled image back.
    pub async fn restore(&self, id: &str) -> Result<Value> {
        self.json(
            self.req(
                reqwest::Method::POST,
                &format!("/v2/images/{id}/actions/restore"),
            ),
            "restoring an image",
        )
        .await
    }

    /// One page of the audit log (`filters`: image_id, action, since, until, limit, marker).
    pub async fn audit(&self, filters: &[(String, String)]) -> Result<Value> {
        self.json(
            self.req(reqwest::Method::GET, "/v2/audit").query(filters),
            "reading the audit log",
        )
        .await
    }

    /// The retention report of `family` (every family when `None`), or with `apply` (admin)
    /// the removal of what it lists. Always the every-family shape: `{"families": [...]}`.
    pub async fn retention(&self, family: Option<&str>, apply: bool) -> Result<Value> {
        let (method, path) = if apply {
            (reqwest::Method::POST, "/v2/policies/retention/apply")
        } else {
            (reqwest::Method::GET, "/v2/policies/retention/report")
        };
        let mut rb = self.req(method, path);
        if let Some(f) = family {
            rb = rb.query(&[("family", f)]);
        }
        let v = self.json(rb, "applying the retention policy").await?;
        Ok(match family {
            Some(_) => serde_json::json!({ "families": [v] }),
            None => v,
        })
    }
}

/// Interoperable import (`stage` + `import`) and converted downloads.
impl RegistryClient {
    /// Stage `file` for a glance-direct import of image `id` (`PUT …/stage`).
    pub async fn stage(&self, id: &str, file: &Path, progress: bool) -> Result<()> {
        self.put_file(&format!("/v2/images/{id}/stage"), file, progress, "staging")
            .await
    }

    /// Start an import of image `id`: glance-direct when `uri` is `None`, else web-download.
    pub async fn import(&self, id: &str, uri: Option<&str>) -> Result<()> {
        let method = match uri {
            None => json!({"name": "glance-direct"}),
            Some(u) => json!({"name": "web-download", "uri": u}),
        };
        self.empty(
            self.req(reqwest::Method::POST, &format!("/v2/images/{id}/import"))
                .json(&json!({ "method": method })),
            "starting the import",
        )
        .await
    }

    /// `GET path` as JSON (identity administration and other plain JSON resources).
    pub async fn get_json(&self, path: &str) -> Result<Value> {
        self.json(self.req(reqwest::Method::GET, path), path).await
    }

    /// `POST path` with a JSON body, answered with JSON.
    pub async fn post_json(&self, path: &str, body: &Value) -> Result<Value> {
        self.json(self.req(reqwest::Method::POST, path).json(body), path)
            .await
    }

    /// `method path` without a body, answered without one (`PUT`/`DELETE` of a relation).
    pub async fn send_empty(&self, method: reqwest::Method, path: &str) -> Result<()> {
        self.empty(self.req(method, path), path).await
    }

    /// Wait until image `id` is no longer `importing` (polling every `every`) and return it.
    pub async fn wait_imported(&self, id: &str, every: std::time::Duration) -> Result<Value> {
        loop {
            let img = self.show(id).await?;
            if img["status"] != "importing" {
                return Ok(img);
            }
            tokio::time::sleep(every).await;
        }
    }
}
