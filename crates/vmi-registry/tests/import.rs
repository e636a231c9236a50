//! Interoperable image import (`stage` + `import`, glance-direct and web-download against a
//! local HTTP server), recovery of imports whose node died, conversion to the storage format on
//! upload and import (checked with `qemu-img compare`), refusal of unsafe images on both paths,
//! and downloads converted to another format.

mod support;

use axum::body::Body;
use axum::http::{Method, StatusCode};
use md5::Md5;
use serde_json::{json, Value};
use sha2::{Digest, Sha256, Sha512};
use std::path::Path;
use std::sync::Arc;
use vmi_registry::catalog::import::{ImportTask, TaskState};
use vmi_registry::clock::{Clock, ManualClock};
use vmi_registry::model::Status;
use vmi_registry::{Config, Registry};
use vmi_testkit::qemu::{qemu_compare, qemu_convert, qemu_create};

const TOKEN: &str = "admin-static-token";
const PATCH: &str = "application/openstack-images-v2.1-json-patch";

use support::Resp;

struct T {
    reg: Registry,
    dir: tempfile::TempDir,
}

async fn setup_with(f: impl FnOnce(&mut Config)) -> T {
    let dir = tempfile::tempdir().unwrap();
    let mut c = Config {
        data_dir: dir.path().to_path_buf(),
        public_url: Some("http://registry.test".into()),
        ..Config::default()
    };
    c.admin.password = Some("adminpw".into());
    c.admin.token = Some(TOKEN.into());
    c.import.work_dir = Some(dir.path().join("work"));
    f(&mut c);
    // With the postgres feature and VMI_TEST_POSTGRES_URL (see tests/postgres.sh), every test
    // runs on a fresh PostgreSQL database instead of SQLite.
    if let Some(db) = support::test_database().await {
        c.database = Some(db);
    }
    let reg = Registry::open(c).await.unwrap();
    reg.bootstrap().await.unwrap();
    T { reg, dir }
}

impl T {
    async fn req(
        &self,
        method: Method,
        uri: &str,
        ctype: Option<&str>,
        body: impl Into<Body>,
        extra: &[(&str, &str)],
    ) -> Resp {
        support::send(
            &self.reg,
            method,
            uri,
            Some(TOKEN),
            ctype,
            body.into(),
            extra,
        )
        .await
    }

    async fn get(&self, uri: &str) -> Resp {
        self.req(Method::GET, uri, None, Body::empty(), &[]).await
    }

    async fn image(&self, id: &str) -> Value {
        self.get(&format!("/v2/images/{id}")).await.json()
    }

    async fn create(&self, disk_format: &str) -> String {
        let r = self
            .req(
                Method::POST,
                "/v2/images",
                Some("application/json"),
                json!({"disk_format": disk_format, "container_format": "bare"}).to_string(),
                &[],
            )
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.text());
        r.json()["id"].as_str().unwrap().to_string()
    }

    async fn put_data(&self, id: &str, what: &str, data: Vec<u8>) -> Resp {
        self.req(
            Method::PUT,
            &format!("/v2/images/{id}/{what}"),
            Some("application/octet-stream"),
            data,
            &[],
        )
        .await
    }

    async fn import(&self, id: &str, body: Value) -> Resp {
        self.req(
            Method::POST,
            &format!("/v2/images/{id}/import"),
            Some("application/json"),
            body.to_string(),
            &[],
        )
        .await
    }

    /// Wait (without a deadline the test asserts on) until the image leaves `importing`.
    async fn settled(&self, id: &str) -> Value {
        for _ in 0..3000 {
            let v = self.image(id).await;
            if v["status"] != "importing" {
                return v;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        panic!("image {id} is still importing");
    }

    /// Files under `area` of the image store.
    fn objects(&self, area: &str) -> usize {
        fn count(p: &Path) -> usize {
            std::fs::read_dir(p)
                .map(|d| {
                    d.flatten()
                        .map(|e| {
                            if e.path().is_dir() {
                                count(&e.path())
                            } else {
                                1
                            }
                        })
                        .sum()
                })
                .unwrap_or(0)
        }
        count(&self.dir.path().join("images").join(area))
    }

    fn work_files(&self) -> usize {
        std::fs::read_dir(self.dir.path().join("work"))
            .map(|d| d.count())
            .unwrap_or(0)
    }
}

fn md5_hex(b: &[u8]) -> String {
    hex::encode(Md5::digest(b))
}

fn sha256_hex(b: &[u8]) -> String {
    hex::encode(Sha256::digest(b))
}

fn stage_import() -> Value {
    json!({"method": {"name": "glance-direct"}})
}

#[tokio::test]
async fn glance_direct_stages_then_imports_to_active_with_glance_digests() {
    let t = setup_with(|_| {}).await;
    let r = t.get("/v2/info/import").await;
    assert_eq!(
        r.json()["import-methods"]["value"],
        json!(["glance-direct", "web-download", "copy-image"])
    );
    let statuses = t.get("/v2/schemas/image").await.json()["properties"]["status"]["enum"].clone();
    assert!(statuses.as_array().unwrap().contains(&json!("importing")));
    assert!(statuses.as_array().unwrap().contains(&json!("uploading")));

    let id = t.create("raw").await;
    let data: Vec<u8> = (0..3 << 20).map(|i: u32| (i % 251) as u8).collect();
    // Importing before anything was staged is a state conflict.
    assert_eq!(
        t.import(&id, stage_import()).await.status,
        StatusCode::CONFLICT
    );
    let r = t.put_data(&id, "stage", data.clone()).await;
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.text());
    assert_eq!(t.image(&id).await["status"], "uploading");
    assert_eq!(t.objects("staging"), 1);
    // Staging again is refused; so are an unknown method, copying an image that is not active
    // yet, and another store.
    assert_eq!(
        t.put_data(&id, "stage", vec![1]).await.status,
        StatusCode::CONFLICT
    );
    let r = t
        .import(&id, json!({"method": {"name": "glance-teleport"}}))
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    let r = t
        .import(&id, json!({"method": {"name": "copy-image"}}))
        .await;
    assert_eq!(r.status, StatusCode::CONFLICT);
    let r = t
        .import(
            &id,
            json!({"method": {"name": "glance-direct"}, "stores": ["elsewhere"]}),
        )
        .await;
    assert_eq!(r.status, StatusCode::CONFLICT);

    let r = t
        .import(
            &id,
            json!({"method": {"name": "glance-direct"}, "stores": ["default"],
                   "all_stores_must_succeed": true}),
        )
        .await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.text());
    let v = t.settled(&id).await;
    assert_eq!(v["status"], "active", "{v}");
    assert_eq!(v["size"], data.len());
    assert_eq!(v["checksum"], md5_hex(&data));
    assert_eq!(v["os_hash_algo"], "sha512");
    assert_eq!(v["os_hash_value"], hex::encode(Sha512::digest(&data)));
    assert_eq!(v["os_glance_importing_to_stores"], "");
    assert_eq!(v["os_glance_failed_import"], "");
    let r = t.get(&format!("/v2/images/{id}/file")).await;
    assert_eq!(r.body, data);
    // The staged bytes are gone once imported.
    assert_eq!(t.objects("staging"), 0);
    // Server-managed properties cannot be set by clients.
    let r = t
        .req(
            Method::PATCH,
            &format!("/v2/images/{id}"),
            Some(PATCH),
            json!([{"op": "replace", "path": "/os_glance_failed_import", "value": "x"}])
                .to_string(),
            &[],
        )
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
}

#[tokio::test]
async fn the_reaper_keeps_staged_and_cached_objects_and_removes_unreferenced_ones() {
    let t = setup_with(|c| c.reap_grace_secs = 0).await;
    let id = t.create("raw").await;
    let r = t.put_data(&id, "stage", vec![5u8; 4096]).await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    let other = t.create("raw").await;
    assert_eq!(
        t.put_data(&other, "file", vec![6u8; 4096]).await.status,
        StatusCode::NO_CONTENT
    );
    let r = t.get(&format!("/v2/images/{other}/file?format=vdi")).await;
    assert_eq!(r.status, StatusCode::OK);
    // What a node that died in the middle of a stage leaves: an object nothing references,
    // and an interrupted local multipart file.
    let dir = t.dir.path().join("images/staging").join(&id);
    std::fs::write(dir.join("0f0f0f"), b"orphan").unwrap();
    std::fs::write(dir.join("0e0e0e#1"), b"partial").unwrap();
    std::thread::sleep(std::time::Duration::from_millis(1100));
    assert_eq!(t.objects("staging"), 3);
    assert_eq!(t.reg.reap().await.unwrap(), 2);
    assert_eq!(t.objects("staging"), 1);
    assert_eq!(t.objects("cache"), 1);
    let r = t.import(&id, stage_import()).await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.text());
    assert_eq!(t.settled(&id).await["status"], "active");
}

#[tokio::test]
async fn disabled_methods_are_not_offered_or_accepted() {
    let t = setup_with(|c| c.import.enabled_methods = vec!["web-download".into()]).await;
    let r = t.get("/v2/info/import").await;
    assert_eq!(r.json()["import-methods"]["value"], json!(["web-download"]));
    let id = t.create("raw").await;
    assert_eq!(
        t.put_data(&id, "stage", vec![0; 512]).await.status,
        StatusCode::BAD_REQUEST
    );
    assert_eq!(t.image(&id).await["status"], "queued");
}

/// A tiny HTTP server on 127.0.0.1: `/ok` (the image), `/missing` (404), `/big` (larger than
/// the cap), `/hop` (a redirect to `/ok`), `/away` (a redirect to a refused host).
async fn web_server(data: Vec<u8>, big: usize) -> u16 {
    use axum::response::Redirect;
    use axum::routing::get;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let app = axum::Router::new()
        .route("/ok", get(move || async move { data.clone() }))
        .route("/big", get(move || async move { vec![7u8; big] }))
        .route(
            "/hop",
            get(move || async move { Redirect::temporary(&format!("http://127.0.0.1:{port}/ok")) }),
        )
        .route(
            "/away",
            get(move || async move { Redirect::temporary(&format!("http://localhost:{port}/ok")) }),
        );
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    port
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn web_download_fetches_allowed_urls_and_fails_refused_missing_and_oversized_ones() {
    let data: Vec<u8> = (0..(1 << 20) + 17).map(|i: u32| (i % 13) as u8).collect();
    let port = web_server(data.clone(), 3 << 20).await;
    let t = setup_with(|c| {
        c.import.filtering.allowed_ports = vec![];
        c.import.filtering.disallowed_hosts = vec!["localhost".into()];
        c.import.filtering.allowed_networks = vec!["127.0.0.0/8".into()];
        c.import.web_download_max_bytes = Some(2 << 20);
    })
    .await;
    let web = |path: &str| json!({"method": {"name": "web-download", "uri": path}});

    let id = t.create("raw").await;
    let r = t
        .import(&id, web(&format!("http://127.0.0.1:{port}/ok")))
        .await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.text());
    let v = t.settled(&id).await;
    assert_eq!(v["status"], "active", "{v}");
    assert_eq!(v["checksum"], md5_hex(&data));
    assert_eq!(t.get(&format!("/v2/images/{id}/file")).await.body, data);
    // A redirect to an allowed place is followed.
    let id = t.create("raw").await;
    let r = t
        .import(&id, web(&format!("http://127.0.0.1:{port}/hop")))
        .await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.text());
    assert_eq!(t.settled(&id).await["checksum"], md5_hex(&data));

    // A refused host or scheme is refused at once, and the image stays queued.
    let id = t.create("raw").await;
    for uri in [
        format!("http://localhost:{port}/ok"),
        "file:///etc/passwd".to_string(),
        format!("ftp://127.0.0.1:{port}/ok"),
    ] {
        let r = t.import(&id, web(&uri)).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{uri}: {}", r.text());
        assert!(r.text().contains("does not pass filtering"), "{}", r.text());
    }
    assert_eq!(t.image(&id).await["status"], "queued");

    // A 404, a redirect to a refused host and a body over the cap fail the import: the image
    // goes back to queued with Glance's failure properties and nothing is left staged.
    for (path, why) in [
        ("/missing", "404"),
        ("/away", "redirect refused"),
        ("/big", "limit"),
    ] {
        let id = t.create("raw").await;
        let r = t
            .import(&id, web(&format!("http://127.0.0.1:{port}{path}")))
            .await;
        assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.text());
        let v = t.settled(&id).await;
        assert_eq!(v["status"], "queued", "{path}: {v}");
        assert_eq!(v["os_glance_failed_import"], "default", "{v}");
        assert_eq!(v["os_glance_importing_to_stores"], "", "{v}");
        let err = v["vmi_import_error"].as_str().unwrap_or("");
        assert!(err.contains(why), "{path}: {err}");
    }
    // https is spoken (rustls): against this plain-HTTP server the TLS handshake fails, which
    // a client without TLS support would never have attempted.
    let id = t.create("raw").await;
    let r = t
        .import(&id, web(&format!("https://127.0.0.1:{port}/ok")))
        .await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.text());
    let v = t.settled(&id).await;
    assert_eq!(v["status"], "queued", "{v}");
    let err = v["vmi_import_error"].as_str().unwrap_or("").to_lowercase();
    assert!(
        err.contains("tls") || err.contains("corrupt") || err.contains("handshake"),
        "{err}"
    );
    assert_eq!(t.objects("staging"), 0);
}

/// A tiny HTTP server on `ip`: `/ok` (the image) and `/to-name` (a redirect to `localhost`).
async fn web_server_on(ip: &str, data: Vec<u8>) -> u16 {
    use axum::response::Redirect;
    use axum::routing::get;
    let listener = tokio::net::TcpListener::bind((ip, 0)).await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let app = axum::Router::new()
        .route("/ok", get(move || async move { data.clone() }))
        .route(
            "/to-name",
            get(move || async move { Redirect::temporary(&format!("http://localhost:{port}/ok")) }),
        );
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    port
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn web_download_refuses_loopback_link_local_and_private_addresses_in_every_form() {
    let port = web_server_on("127.0.0.1", vec![5u8; 4096]).await;
    let web = |uri: &str| json!({"method": {"name": "web-download", "uri": uri}});
    // By default: special-purpose addresses are refused however they are written, and names
    // are resolved and their addresses checked.
    let t = setup_with(|c| c.import.filtering.allowed_ports = vec![]).await;
    let id = t.create("raw").await;
    for (host, why) in [
        ("127.0.0.1", "loopback"),
        ("127.1", "loopback"),
        ("2130706433", "loopback"),
        ("0x7f000001", "loopback"),
        ("[::ffff:127.0.0.1]", "loopback"),
        ("[::127.0.0.1]", "loopback"),
        ("[::1]", "loopback"),
        ("localhost", "loopback"),
        ("0.0.0.0", "unspecified"),
        ("169.254.169.254", "link-local"),
        ("[::ffff:169.254.169.254]", "link-local"),
        ("10.0.0.1", "private"),
        ("192.168.0.1", "private"),
        ("[fd00::1]", "unique-local"),
        ("[fe80::1]", "link-local"),
        ("224.0.0.1", "multicast"),
    ] {
        let uri = format!("http://{host}:{port}/ok");
        let r = t.import(&id, web(&uri)).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{uri}: {}", r.text());
        let msg = r.json()["error"]["message"]
            .as_str()
            .unwrap_or("")
            .to_string();
        assert!(
            msg.contains("does not pass filtering") && msg.contains(why),
            "{uri}: {msg}"
        );
    }
    assert_eq!(t.image(&id).await["status"], "queued");

    // An address written in disallowed_hosts is refused in every form, also when a name
    // resolves to it, also on a redirect hop where the name is resolved when connecting.
    let port = web_server_on("127.0.0.2", vec![5u8; 4096]).await;
    let t = setup_with(|c| {
        c.import.filtering.allowed_ports = vec![];
        c.import.filtering.allowed_networks = vec!["127.0.0.0/8".into()];
        c.import.filtering.disallowed_hosts = vec!["127.0.0.1".into(), "::1".into()];
    })
    .await;
    let id = t.create("raw").await;
    for host in ["[::ffff:127.0.0.1]", "[::127.0.0.1]", "localhost", "127.1"] {
        let uri = format!("http://{host}:{port}/ok");
        let r = t.import(&id, web(&uri)).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{uri}: {}", r.text());
        assert!(r.text().contains("not allowed"), "{uri}: {}", r.text());
    }
    let r = t
        .import(&id, web(&format!("http://127.0.0.2:{port}/to-name")))
        .await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.text());
    let v = t.settled(&id).await;
    assert_eq!(v["status"], "queued", "{v}");
    let err = v["vmi_import_error"].as_str().unwrap_or("");
    assert!(err.contains("resolves to refused addresses"), "{err}");

    // An explicitly allowed loopback network is fetched from.
    let id = t.create("raw").await;
    let r = t
        .import(&id, web(&format!("http://127.0.0.2:{port}/ok")))
        .await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.text());
    assert_eq!(t.settled(&id).await["status"], "active");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_import_whose_node_died_is_retried_after_its_lease_or_returned_to_queued() {
    let start = chrono::DateTime::parse_from_rfc3339("2026-05-01T00:00:00Z")
        .unwrap()
        .with_timezone(&chrono::Utc);
    let clock = Arc::new(ManualClock::new(start));
    let mut t = setup_with(|c| {
        c.import.task_lease_secs = 60;
        c.import.max_attempts = 2;
    })
    .await;
    t.reg = t.reg.clone().with_clock(clock.clone());
    let app = t.reg.app.clone();

    // Two images staged, then "imported" by a node that died: importing, with a task whose
    // lease nobody renews.
    let mut ids = Vec::new();
    for attempts in [1, 2] {
        let id = t.create("raw").await;
        let r = t.put_data(&id, "stage", vec![9u8; 4096]).await;
        assert_eq!(r.status, StatusCode::NO_CONTENT);
        let mut img = app.catalog.get_image(&id).await.unwrap().unwrap();
        img.status = Status::Importing;
        assert!(app
            .catalog
            .update_image(&img, Status::Uploading)
            .await
            .unwrap());
        let staged = app.catalog.get_import_task(&id).await.unwrap().unwrap();
        let task = ImportTask {
            method: "glance-direct".into(),
            state: TaskState::Running,
            lease_token: Some("dead-node".into()),
            lease_expires: Some("2026-05-01T00:01:00Z".into()),
            attempts,
            ..staged
        };
        app.catalog.put_import_task(&task).await.unwrap();
        ids.push(id);
    }
    // Within the lease nothing is touched.
    assert_eq!(vmi_registry::import::recover_stuck(&app).await.unwrap(), 0);
    assert_eq!(t.image(&ids[0]).await["status"], "importing");
    clock.advance(chrono::Duration::minutes(5));
    assert_eq!(vmi_registry::import::recover_stuck(&app).await.unwrap(), 2);
    // The first still had an attempt left: retried to active. The second had none: queued.
    let v = t.settled(&ids[0]).await;
    assert_eq!(v["status"], "active", "{v}");
    assert_eq!(v["size"], 4096);
    let v = t.settled(&ids[1]).await;
    assert_eq!(v["status"], "queued", "{v}");
    assert_eq!(v["os_glance_failed_import"], "default");
    assert!(app
        .catalog
        .get_import_task(&ids[1])
        .await
        .unwrap()
        .is_none());
    // Once done, nothing is left to recover.
    assert_eq!(vmi_registry::import::recover_stuck(&app).await.unwrap(), 0);
    assert_eq!(t.objects("staging"), 0);

    // A node that died between moving the image to importing and recording its task leaves
    // no lease at all: after the reap grace the image is returned to queued as well.
    let id = t.create("raw").await;
    let r = t.put_data(&id, "stage", vec![3u8; 512]).await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    let mut img = app.catalog.get_image(&id).await.unwrap().unwrap();
    img.status = Status::Importing;
    img.updated_at = clock.now_string();
    assert!(app
        .catalog
        .update_image(&img, Status::Uploading)
        .await
        .unwrap());
    assert_eq!(vmi_registry::import::recover_stuck(&app).await.unwrap(), 0);
    clock.advance(chrono::Duration::days(2));
    assert_eq!(vmi_registry::import::recover_stuck(&app).await.unwrap(), 1);
    assert_eq!(t.image(&id).await["status"], "queued");
    assert_eq!(t.objects("staging"), 0);
}

/// A raw disk with scattered data, converted by qemu-img into `fmt`; returns (path, bytes).
fn source_image(dir: &Path, fmt: &str, opts: &str) -> (std::path::PathBuf, Vec<u8>) {
    let raw = dir.join("src.raw");
    if !raw.exists() {
        vmi_testkit::scattered_raw(&raw, 8 << 20, 24, 11);
    }
    let p = dir.join(format!("src.{fmt}"));
    qemu_convert(&raw, "raw", &p, fmt, opts, &[]);
    let b = std::fs::read(&p).unwrap();
    (p, b)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vmdk_vhdx_and_vdi_uploads_are_stored_as_qcow2_equal_to_the_upload() {
    let t = setup_with(|c| c.import.convert_to = Some("qcow2".into())).await;
    let scratch = tempfile::tempdir().unwrap();
    for (fmt, glance, via_import) in [
        ("vmdk", "vmdk", false),
        ("vhdx", "vhdx", true),
        ("vdi", "vdi", false),
        ("vmdk", "vmdk", true),
    ] {
        let (src, bytes) = source_image(scratch.path(), fmt, "");
        let id = t.create(glance).await;
        let v = if via_import {
            let r = t.put_data(&id, "stage", bytes.clone()).await;
            assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.text());
            let r = t.import(&id, stage_import()).await;
            assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.text());
            t.settled(&id).await
        } else {
            let r = t.put_data(&id, "file", bytes.clone()).await;
            assert_eq!(r.status, StatusCode::NO_CONTENT, "{fmt}: {}", r.text());
            t.image(&id).await
        };
        assert_eq!(v["status"], "active", "{v}");
        assert_eq!(v["disk_format"], "qcow2", "{v}");
        assert_eq!(v["virtual_size"], 8 << 20);
        assert_eq!(v["vmi_source_disk_format"], glance);
        assert_eq!(v["vmi_source_sha256"], sha256_hex(&bytes));
        assert_eq!(v["vmi_source_checksum"], md5_hex(&bytes));
        assert_eq!(v["vmi_source_size"], bytes.len().to_string());
        // The lineage keeps the upload's digests.
        let l = t.get(&format!("/v2/images/{id}/lineage")).await.json();
        assert_eq!(l["conversion"]["source_disk_format"], glance, "{l}");
        assert_eq!(l["conversion"]["source_sha256"], sha256_hex(&bytes), "{l}");
        let stored = t.get(&format!("/v2/images/{id}/file")).await.body;
        assert_eq!(v["size"], stored.len());
        assert_eq!(v["checksum"], md5_hex(&stored));
        assert_eq!(v["os_hash_value"], hex::encode(Sha512::digest(&stored)));
        let out = scratch.path().join(format!("stored-{id}.qcow2"));
        std::fs::write(&out, &stored).unwrap();
        assert!(
            qemu_compare(&out, "qcow2", &src, fmt),
            "{fmt}: stored qcow2 differs from the upload"
        );
        // Only the converted object remains.
        assert_eq!(t.objects(&format!("images/{id}")), 1);
    }
    assert_eq!(t.work_files(), 0, "conversion temporary files were left");
}

/// Unsafe images, each with the violation kind that must be reported and its declared format.
fn malicious(dir: &Path) -> Vec<(&'static str, &'static str, Vec<u8>)> {
    let mut out = Vec::new();
    let base = dir.join("base.raw");
    qemu_create(&base, "raw", "", 1 << 20);
    let top = dir.join("backed.qcow2");
    let o = format!("backing_file={},backing_fmt=raw", base.display());
    qemu_create(&top, "qcow2", &o, 1 << 20);
    out.push(("backing-file", "qcow2", std::fs::read(&top).unwrap()));
    let ext = dir.join("ext.qcow2");
    let o = format!("data_file={}", dir.join("ext-data.raw").display());
    qemu_create(&ext, "qcow2", &o, 1 << 20);
    out.push(("data-file", "qcow2", std::fs::read(&ext).unwrap()));
    let flat = dir.join("flat.vmdk");
    qemu_create(&flat, "vmdk", "subformat=monolithicFlat", 1 << 20);
    let evil = std::fs::read_to_string(&flat)
        .unwrap()
        .replace("\"flat-flat.vmdk\"", "\"/etc/passwd\"");
    out.push(("extents", "vmdk", evil.into_bytes()));
    // A VDI header inside an ISO 9660 volume: both formats claim the file.
    let vdi = dir.join("poly.vdi");
    qemu_create(&vdi, "vdi", "", 1 << 20);
    let mut b = std::fs::read(&vdi).unwrap();
    b.resize(b.len().max(64 * 1024), 0);
    let sectors = u32::try_from(b.len() / 2048).unwrap();
    let pvd = &mut b[32768..34816];
    pvd[0] = 1;
    pvd[1..6].copy_from_slice(b"CD001");
    pvd[6] = 1;
    pvd[80..84].copy_from_slice(&sectors.to_le_bytes());
    pvd[84..88].copy_from_slice(&sectors.to_be_bytes());
    pvd[128..130].copy_from_slice(&2048u16.to_le_bytes());
    pvd[130..132].copy_from_slice(&2048u16.to_be_bytes());
    pvd[881] = 1;
    let term = &mut b[34816..36864];
    term[0] = 255;
    term[1..6].copy_from_slice(b"CD001");
    term[6] = 1;
    out.push(("multiple-formats", "vdi", b));
    let q = dir.join("plain.qcow2");
    qemu_create(&q, "qcow2", "", 1 << 20);
    out.push(("format-mismatch", "raw", std::fs::read(&q).unwrap()));
    out
}

fn assert_refused(r: &Resp, kind: &str, what: &str) {
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{what}: {}", r.text());
    let v = r.json();
    let kinds: Vec<&str> = v["error"]["violations"]
        .as_array()
        .unwrap_or_else(|| panic!("{what}: no violations in {v}"))
        .iter()
        .filter_map(|x| x["kind"].as_str())
        .collect();
    assert!(kinds.contains(&kind), "{what}: {kinds:?} lacks {kind}: {v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("was refused"),
        "{v}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsafe_images_are_refused_with_the_reason_on_upload_and_on_import() {
    let t = setup_with(|c| c.import.convert_to = Some("qcow2".into())).await;
    let scratch = tempfile::tempdir().unwrap();
    for (kind, declared, bytes) in malicious(scratch.path()) {
        let id = t.create(declared).await;
        let r = t.put_data(&id, "file", bytes.clone()).await;
        assert_refused(&r, kind, &format!("PUT file {kind}"));
        assert_eq!(t.image(&id).await["status"], "queued");

        let id = t.create(declared).await;
        let r = t.put_data(&id, "stage", bytes.clone()).await;
        assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.text());
        let r = t.import(&id, stage_import()).await;
        assert_refused(&r, kind, &format!("import {kind}"));
        let v = t.image(&id).await;
        assert_eq!(v["status"], "queued", "{v}");
        assert_eq!(v["os_glance_failed_import"], "default");
    }
    assert_eq!(t.objects(""), 0, "refused data was left in the store");
    assert_eq!(t.work_files(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn converted_downloads_and_conversions_obey_the_size_cap_on_virtual_size() {
    // A qcow2 of a few hundred KiB that declares a 100 GiB guest: within the cap as uploaded,
    // far beyond it converted.
    let cap: u64 = 8 << 20;
    let scratch = tempfile::tempdir().unwrap();
    let src = scratch.path().join("huge.qcow2");
    qemu_create(&src, "qcow2", "", 100 << 30);
    let bytes = std::fs::read(&src).unwrap();
    assert!((bytes.len() as u64) < cap);
    let t = setup_with(|c| c.image_size_cap = cap).await;
    let id = t.create("qcow2").await;
    let r = t.put_data(&id, "file", bytes.clone()).await;
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.text());
    for glance in ["raw", "vmdk", "vhd", "vhdx", "vdi"] {
        for range in [None, Some(("range", "bytes=0-"))] {
            let uri = format!("/v2/images/{id}/file?format={glance}");
            let extra: Vec<(&str, &str)> = range.into_iter().collect();
            let r = t.req(Method::GET, &uri, None, Body::empty(), &extra).await;
            assert_eq!(
                r.status,
                StatusCode::PAYLOAD_TOO_LARGE,
                "{uri}: {}",
                r.text()
            );
            assert!(r.text().contains("virtual size"), "{}", r.text());
        }
    }
    assert_eq!(t.objects("cache"), 0);

    // Conversion on upload and on import to the storage format: refused the same way, and the
    // image stays queued with nothing stored.
    let t = setup_with(|c| {
        c.image_size_cap = cap;
        c.import.convert_to = Some("raw".into());
    })
    .await;
    let id = t.create("qcow2").await;
    let r = t.put_data(&id, "file", bytes.clone()).await;
    assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE, "{}", r.text());
    assert_eq!(t.image(&id).await["status"], "queued");
    let id = t.create("qcow2").await;
    assert_eq!(
        t.put_data(&id, "stage", bytes.clone()).await.status,
        StatusCode::NO_CONTENT
    );
    let r = t.import(&id, stage_import()).await;
    if r.status == StatusCode::ACCEPTED {
        let v = t.settled(&id).await;
        assert_eq!(v["status"], "queued", "{v}");
        let err = v["vmi_import_error"].as_str().unwrap_or("");
        assert!(err.contains("image size cap"), "{err}");
    } else {
        assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE, "{}", r.text());
    }
    assert_eq!(t.objects("images"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_project_may_run_only_its_share_of_conversions_at_once() {
    use http_body_util::BodyExt;
    use tower::ServiceExt;
    let t = setup_with(|c| c.import.max_conversions_per_project = 1).await;
    let scratch = tempfile::tempdir().unwrap();
    let src = scratch.path().join("a.qcow2");
    qemu_create(&src, "qcow2", "", 64 << 20);
    let id = t.create("qcow2").await;
    let r = t.put_data(&id, "file", std::fs::read(&src).unwrap()).await;
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.text());
    let uri = format!("/v2/images/{id}/file?format=raw");
    // A streamed conversion whose client does not read: it holds the project's one slot.
    let held = t
        .reg
        .router()
        .oneshot(
            axum::http::Request::get(&uri)
                .header("x-auth-token", TOKEN)
                .body(Body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(held.status(), StatusCode::OK);
    for other in [uri.clone(), format!("/v2/images/{id}/file?format=vdi")] {
        let r = t.get(&other).await;
        assert_eq!(
            r.status,
            StatusCode::TOO_MANY_REQUESTS,
            "{other}: {}",
            r.text()
        );
        assert!(r.headers.contains_key("retry-after"));
    }
    // Reading the held download to its end frees the slot.
    let body = held.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body.len(), 64 << 20);
    let mut status = StatusCode::TOO_MANY_REQUESTS;
    for _ in 0..500 {
        status = t.get(&uri).await.status;
        if status != StatusCode::TOO_MANY_REQUESTS {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn downloads_in_another_format_convert_back_equal_and_are_cached_until_deletion() {
    let t = setup_with(|_| {}).await;
    let scratch = tempfile::tempdir().unwrap();
    let (src, bytes) = source_image(scratch.path(), "qcow2", "");
    let id = t.create("qcow2").await;
    assert_eq!(
        t.put_data(&id, "file", bytes.clone()).await.status,
        StatusCode::NO_CONTENT
    );
    for (glance, qemu) in [
        ("raw", "raw"),
        ("vmdk", "vmdk"),
        ("vhd", "vpc"),
        ("vhdx", "vhdx"),
        ("vdi", "vdi"),
    ] {
        // Raw, streamOptimized VMDK and fixed VHD are converted on the fly (no length known
        // ahead); the others are converted once into the cache and served with a length.
        let streamed = ["raw", "vmdk", "vhd"].contains(&glance);
        let r = t
            .get(&format!("/v2/images/{id}/file?format={glance}"))
            .await;
        assert_eq!(r.status, StatusCode::OK, "{glance}: {}", r.text());
        assert_eq!(r.headers.contains_key("content-md5"), !streamed, "{glance}");
        // Every download but the streamOptimized VMDK (as long as its compressed grains) says
        // its length up front; it is the length sent.
        match r.headers.get("content-length") {
            Some(l) => assert_eq!(l.to_str().unwrap(), r.body.len().to_string(), "{glance}"),
            None => assert_eq!(glance, "vmdk", "{glance}: no Content-Length"),
        }
        if !streamed {
            assert_eq!(r.headers["content-md5"], md5_hex(&r.body).as_str());
        }
        let out = scratch.path().join(format!("down.{glance}"));
        std::fs::write(&out, &r.body).unwrap();
        assert!(
            qemu_compare(&out, qemu, &src, "qcow2"),
            "{glance}: the download differs from the image"
        );
        // Range requests are served from the cached copy (made now for streamed formats).
        let uri = format!("/v2/images/{id}/file?format={glance}");
        let whole = t
            .req(
                Method::GET,
                &uri,
                None,
                Body::empty(),
                &[("range", "bytes=0-")],
            )
            .await;
        assert_eq!(whole.status, StatusCode::PARTIAL_CONTENT);
        let part = t
            .req(
                Method::GET,
                &uri,
                None,
                Body::empty(),
                &[("range", "bytes=100-1123")],
            )
            .await;
        assert_eq!(part.status, StatusCode::PARTIAL_CONTENT);
        assert_eq!(&part.body[..], &whole.body[100..1124]);
        let cached = scratch.path().join(format!("cached.{glance}"));
        std::fs::write(&cached, &whole.body).unwrap();
        assert!(
            qemu_compare(&cached, qemu, &src, "qcow2"),
            "{glance} cached"
        );
        if !streamed {
            assert_eq!(whole.body, r.body);
        }
    }
    // A conversion that cannot start (the stored object vanished) is an error response, not a
    // 200 whose body breaks off.
    let lost = t.create("qcow2").await;
    assert_eq!(
        t.put_data(&lost, "file", bytes.clone()).await.status,
        StatusCode::NO_CONTENT
    );
    std::fs::remove_dir_all(t.dir.path().join("images/images").join(&lost)).unwrap();
    let r = t.get(&format!("/v2/images/{lost}/file?format=raw")).await;
    assert_eq!(r.status, StatusCode::INTERNAL_SERVER_ERROR, "{}", r.text());
    // The image's own format is the stored bytes; unknown formats are refused.
    let r = t.get(&format!("/v2/images/{id}/file?format=qcow2")).await;
    assert_eq!(r.body, bytes);
    let r = t.get(&format!("/v2/images/{id}/file?format=ploop")).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(t.objects("cache"), 5);
    let r = t
        .req(
            Method::DELETE,
            &format!("/v2/images/{id}"),
            None,
            Body::empty(),
            &[],
        )
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    assert_eq!(t.objects("cache"), 0);
    assert_eq!(t.work_files(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vmi_image_import_stages_a_file_or_has_the_registry_download_a_url() {
    use clap::Parser;
    use vmi_registry::cli::{image_command, ImageArgs};

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        image: ImageArgs,
    }
    let data: Vec<u8> = (0..700_000u32).map(|i| (i % 241) as u8).collect();
    let port = web_server(data.clone(), 16).await;
    let t = setup_with(|c| {
        c.public_url = None;
        c.import.filtering.allowed_ports = vec![];
        c.import.filtering.allowed_networks = vec!["127.0.0.0/8".into()];
    })
    .await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(t.reg.clone().serve(listener, async {
        let _ = stop_rx.await;
    }));
    let env = vec![("VMI_TOKEN".to_string(), TOKEN.to_string())];
    let run = |argv: Vec<String>| {
        let (url, env) = (url.clone(), env.clone());
        async move {
            let mut full = vec![
                "vmi-image".to_string(),
                "--url".to_string(),
                url,
                "--json".into(),
            ];
            full.extend(argv);
            let cli = Cli::try_parse_from(full).unwrap();
            let mut out = Vec::new();
            let r = image_command(&cli.image, &env, &mut out, false).await;
            (r, String::from_utf8(out).unwrap())
        }
    };
    let scratch = tempfile::tempdir().unwrap();
    let src = scratch.path().join("disk.raw");
    std::fs::write(&src, &data).unwrap();

    let id = t.create("raw").await;
    let (r, out) = run(vec![
        "import".into(),
        id.clone(),
        "--file".into(),
        src.display().to_string(),
    ])
    .await;
    r.unwrap();
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["status"], "active");
    assert_eq!(v["checksum"], md5_hex(&data));

    let id = t.create("raw").await;
    let (r, out) = run(vec![
        "import".into(),
        id.clone(),
        "--uri".into(),
        format!("http://127.0.0.1:{port}/ok"),
    ])
    .await;
    r.unwrap();
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["status"], "active");
    assert_eq!(v["checksum"], md5_hex(&data));

    // `vmi image download --format`: streamed (VMDK) and cached (qcow2, MD5 verified)
    // conversions, each equal to the stored raw image.
    let disk: Vec<u8> = (0..(1u32 << 20)).map(|i| (i / 4096 % 251) as u8).collect();
    let raw = scratch.path().join("one-mib.raw");
    std::fs::write(&raw, &disk).unwrap();
    let id = t.create("raw").await;
    let r = t.put_data(&id, "file", disk.clone()).await;
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.text());
    for (fmt, qemu, streamed) in [("vmdk", "vmdk", true), ("qcow2", "qcow2", false)] {
        let dst = scratch.path().join(format!("converted.{fmt}"));
        let (r, out) = run(vec![
            "download".into(),
            id.clone(),
            "-o".into(),
            dst.display().to_string(),
            "--format".into(),
            fmt.into(),
        ])
        .await;
        r.unwrap();
        assert_eq!(out.contains("md5"), !streamed, "{out}");
        assert!(
            qemu_compare(&dst, qemu, &raw, "raw"),
            "{fmt} download differs"
        );
    }

    // A failed import is an error that says why.
    let id = t.create("raw").await;
    let (r, _) = run(vec![
        "import".into(),
        id,
        "--uri".into(),
        format!("http://127.0.0.1:{port}/missing"),
    ])
    .await;
    let e = r.unwrap_err().to_string();
    assert!(e.contains("404"), "{e}");
    let _ = stop_tx.send(());
    server.await.unwrap().unwrap();
}

/// Staging, conversion on import and converted downloads (streamed and cached) on an
/// S3-compatible store, where inspection and conversion read the objects through ranged GETs.
/// Runs when `VMI_TEST_S3_ENDPOINT` names a server (CI starts one; see tests/s3.sh).
#[cfg(feature = "s3")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn staging_conversion_and_converted_downloads_work_on_s3() {
    let mut s3 = vmi_registry::Config::default();
    if !support::s3_store(&mut s3).await {
        return;
    }
    let t = setup_with(|c| {
        c.store = s3.store;
        c.s3 = s3.s3;
        c.import.convert_to = Some("qcow2".into());
    })
    .await;
    let scratch = tempfile::tempdir().unwrap();
    let (src, bytes) = source_image(scratch.path(), "vmdk", "");
    let id = t.create("vmdk").await;
    let r = t.put_data(&id, "stage", bytes.clone()).await;
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.text());
    let r = t.import(&id, stage_import()).await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.text());
    let v = t.settled(&id).await;
    assert_eq!(v["status"], "active", "{v}");
    assert_eq!(v["disk_format"], "qcow2");
    assert_eq!(v["vmi_source_sha256"], sha256_hex(&bytes));
    let stored = t.get(&format!("/v2/images/{id}/file")).await.body;
    assert_eq!(v["checksum"], md5_hex(&stored));
    let out = scratch.path().join("stored.qcow2");
    std::fs::write(&out, &stored).unwrap();
    assert!(qemu_compare(&out, "qcow2", &src, "vmdk"));
    // Converted downloads: raw streamed, VHDX through the cache (twice: the second from it).
    for (glance, qemu) in [("raw", "raw"), ("vhdx", "vhdx"), ("vhdx", "vhdx")] {
        let r = t
            .get(&format!("/v2/images/{id}/file?format={glance}"))
            .await;
        assert_eq!(r.status, StatusCode::OK, "{glance}: {}", r.text());
        let out = scratch.path().join(format!("down.{glance}"));
        std::fs::write(&out, &r.body).unwrap();
        assert!(qemu_compare(&out, qemu, &src, "vmdk"), "{glance}");
    }
    // A refused upload through the stage leaves the image queued with the reason.
    let bad = t.create("raw").await;
    let vdi = source_image(scratch.path(), "vdi", "").1;
    let r = t.put_data(&bad, "stage", vdi).await;
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.text());
    let r = t.import(&bad, stage_import()).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.text());
    assert_eq!(t.image(&bad).await["status"], "queued");
}
