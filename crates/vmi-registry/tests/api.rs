//! In-process tests of the registry's HTTP API (tower `oneshot` against the router, SQLite and
//! local files in a temporary directory), an authorisation matrix, and one real-socket test
//! that moves 64 MiB through a bound 127.0.0.1 port.

mod support;

use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use bytes::Bytes;
use md5::Md5;
use serde_json::{json, Value};
use sha2::{Digest, Sha256, Sha512};
use std::path::Path;
use tower::ServiceExt;
use vmi_registry::{Config, Registry};

const ADMIN_TOKEN: &str = "admin-static-token";
const PATCH: &str = "application/openstack-images-v2.1-json-patch";

use support::Resp;

struct T {
    reg: Registry,
    dir: tempfile::TempDir,
}

fn config(dir: &Path) -> Config {
    let mut c = Config {
        data_dir: dir.to_path_buf(),
        public_url: Some("http://registry.test".into()),
        ..Config::default()
    };
    c.admin.password = Some("adminpw".into());
    c.admin.token = Some(ADMIN_TOKEN.into());
    c
}

async fn setup_with(f: impl FnOnce(&mut Config)) -> T {
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(dir.path());
    f(&mut c);
    // With the postgres feature and VMI_TEST_POSTGRES_URL (postgres://user@host:port, see
    // tests/postgres.sh), every test runs on a fresh PostgreSQL database instead of SQLite.
    if let Some(db) = support::test_database().await {
        c.database = Some(db);
    }
    let reg = Registry::open(c).await.unwrap();
    reg.bootstrap().await.unwrap();
    T { reg, dir }
}

async fn setup() -> T {
    setup_with(|_| {}).await
}

impl T {
    async fn req(
        &self,
        method: Method,
        uri: &str,
        token: Option<&str>,
        ctype: Option<&str>,
        body: impl Into<Body>,
        extra: &[(&str, &str)],
    ) -> Resp {
        support::send(&self.reg, method, uri, token, ctype, body.into(), extra).await
    }

    async fn get(&self, uri: &str, token: &str) -> Resp {
        self.req(Method::GET, uri, Some(token), None, Body::empty(), &[])
            .await
    }

    async fn post(&self, uri: &str, token: &str, v: Value) -> Resp {
        self.req(
            Method::POST,
            uri,
            Some(token),
            Some("application/json"),
            v.to_string(),
            &[],
        )
        .await
    }

    async fn put_json(&self, uri: &str, token: &str, v: Value) -> Resp {
        self.req(
            Method::PUT,
            uri,
            Some(token),
            Some("application/json"),
            v.to_string(),
            &[],
        )
        .await
    }

    async fn patch(&self, id: &str, token: &str, ops: Value) -> Resp {
        self.req(
            Method::PATCH,
            &format!("/v2/images/{id}"),
            Some(token),
            Some(PATCH),
            ops.to_string(),
            &[],
        )
        .await
    }

    async fn delete(&self, uri: &str, token: &str) -> Resp {
        self.req(Method::DELETE, uri, Some(token), None, Body::empty(), &[])
            .await
    }

    async fn upload(&self, id: &str, token: &str, data: impl Into<Body>) -> Resp {
        self.req(
            Method::PUT,
            &format!("/v2/images/{id}/file"),
            Some(token),
            Some("application/octet-stream"),
            data,
            &[],
        )
        .await
    }

    async fn create(&self, token: &str, v: Value) -> String {
        let r = self.post("/v2/images", token, v).await;
        assert_eq!(
            r.status,
            StatusCode::CREATED,
            "{}",
            String::from_utf8_lossy(&r.body)
        );
        r.json()["id"].as_str().unwrap().to_string()
    }

    /// A project and a user with `role` on it; returns (project id, token).
    async fn user(&self, project: &str, user: &str, role: &str) -> (String, String) {
        let pid = match self
            .post(
                "/v3/projects",
                ADMIN_TOKEN,
                json!({"project": {"name": project}}),
            )
            .await
        {
            r if r.status == StatusCode::CREATED => {
                r.json()["project"]["id"].as_str().unwrap().to_string()
            }
            _ => {
                let all = self.get("/v3/projects", ADMIN_TOKEN).await.json();
                all["projects"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .find(|p| p["name"] == project)
                    .unwrap()["id"]
                    .as_str()
                    .unwrap()
                    .to_string()
            }
        };
        let r = self
            .post(
                "/v3/users",
                ADMIN_TOKEN,
                json!({"user": {"name": user, "password": "pw", "default_project_id": pid}}),
            )
            .await;
        assert_eq!(r.status, StatusCode::CREATED);
        let uid = r.json()["user"]["id"].as_str().unwrap().to_string();
        let r = self
            .req(
                Method::PUT,
                &format!("/v3/projects/{pid}/users/{uid}/roles/{role}"),
                Some(ADMIN_TOKEN),
                None,
                Body::empty(),
                &[],
            )
            .await;
        assert_eq!(r.status, StatusCode::NO_CONTENT);
        (pid, self.password_token(user, "pw", project).await)
    }

    async fn password_token(&self, user: &str, pw: &str, project: &str) -> String {
        let r = self
            .req(
                Method::POST,
                "/v3/auth/tokens",
                None,
                Some("application/json"),
                password_auth(user, pw, project).to_string(),
                &[],
            )
            .await;
        assert_eq!(
            r.status,
            StatusCode::CREATED,
            "{}",
            String::from_utf8_lossy(&r.body)
        );
        r.headers["x-subject-token"].to_str().unwrap().to_string()
    }

    fn stored_objects(&self) -> usize {
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
        count(&self.dir.path().join("images"))
    }
}

fn password_auth(user: &str, pw: &str, project: &str) -> Value {
    json!({"auth": {
        "identity": {"methods": ["password"], "password": {"user": {
            "name": user, "domain": {"name": "Default"}, "password": pw}}},
        "scope": {"project": {"name": project, "domain": {"name": "Default"}}}}})
}

fn hex_md5(b: &[u8]) -> String {
    hex::encode(Md5::digest(b))
}

#[tokio::test]
async fn version_discovery_answers_300_at_root_and_200_at_versions() {
    let t = setup().await;
    let r = t
        .req(Method::GET, "/", None, None, Body::empty(), &[])
        .await;
    assert_eq!(r.status, StatusCode::MULTIPLE_CHOICES);
    let v = r.json();
    assert_eq!(v["versions"][0]["status"], "CURRENT");
    assert_eq!(
        v["versions"][0]["links"][0]["href"],
        "http://registry.test/v2/"
    );
    let r = t
        .req(Method::GET, "/versions", None, None, Body::empty(), &[])
        .await;
    assert_eq!(r.status, StatusCode::OK);
}

#[tokio::test]
async fn schemas_are_served_and_the_image_api_requires_a_token() {
    let t = setup().await;
    for (path, name) in [
        ("image", "image"),
        ("images", "images"),
        ("member", "member"),
        ("members", "members"),
    ] {
        let r = t.get(&format!("/v2/schemas/{path}"), ADMIN_TOKEN).await;
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(r.json()["name"], name);
    }
    let r = t
        .req(Method::GET, "/v2/images", None, None, Body::empty(), &[])
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    let r = t.get("/v2/images", "bogus").await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn an_image_goes_from_queued_to_active_to_deleted_with_glance_digests() {
    let t = setup().await;
    let id = t
        .create(
            ADMIN_TOKEN,
            json!({"name": "cirros", "disk_format": "raw", "container_format": "bare",
                   "tags": ["b", "a"], "hw_disk_bus": "virtio", "min_ram": 64}),
        )
        .await;
    let v = t.get(&format!("/v2/images/{id}"), ADMIN_TOKEN).await.json();
    assert_eq!(v["status"], "queued");
    assert_eq!(v["visibility"], "shared");
    assert_eq!(v["tags"], json!(["a", "b"]));
    assert_eq!(v["hw_disk_bus"], "virtio");
    assert_eq!(v["min_ram"], 64);
    assert_eq!(v["size"], Value::Null);
    // Nothing to download yet.
    let r = t.get(&format!("/v2/images/{id}/file"), ADMIN_TOKEN).await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);

    let data: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let r = t.upload(&id, ADMIN_TOKEN, data.clone()).await;
    assert_eq!(
        r.status,
        StatusCode::NO_CONTENT,
        "{}",
        String::from_utf8_lossy(&r.body)
    );
    let v = t.get(&format!("/v2/images/{id}"), ADMIN_TOKEN).await.json();
    assert_eq!(v["status"], "active");
    assert_eq!(v["size"], data.len());
    assert_eq!(v["virtual_size"], data.len());
    assert_eq!(v["checksum"], hex_md5(&data));
    assert_eq!(v["os_hash_algo"], "sha512");
    assert_eq!(v["os_hash_value"], hex::encode(Sha512::digest(&data)));

    // A second upload to an active image is a forbidden transition.
    let r = t.upload(&id, ADMIN_TOKEN, b"x".to_vec()).await;
    assert_eq!(r.status, StatusCode::CONFLICT);

    let r = t.get(&format!("/v2/images/{id}/file"), ADMIN_TOKEN).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.headers["content-md5"], hex_md5(&data).as_str());
    assert_eq!(&r.body[..], &data[..]);

    let range = |spec: &str| {
        let spec = spec.to_string();
        let t = &t;
        let id = id.clone();
        async move {
            t.req(
                Method::GET,
                &format!("/v2/images/{id}/file"),
                Some(ADMIN_TOKEN),
                None,
                Body::empty(),
                &[("range", &spec)],
            )
            .await
        }
    };
    let r = range("bytes=1000-1999").await;
    assert_eq!(r.status, StatusCode::PARTIAL_CONTENT);
    assert_eq!(r.headers["content-range"], "bytes 1000-1999/300000");
    assert_eq!(&r.body[..], &data[1000..2000]);
    let r = range("bytes=-10").await;
    assert_eq!(&r.body[..], &data[data.len() - 10..]);
    let r = range("bytes=300000-").await;
    assert_eq!(r.status, StatusCode::RANGE_NOT_SATISFIABLE);
    assert_eq!(r.headers["content-range"], "bytes */300000");

    // Deactivate blocks downloads for non-admins; reactivate restores them.
    let (_, other) = t.user("p2", "u2", "member").await;
    let r = t
        .patch(
            &id,
            ADMIN_TOKEN,
            json!([{"op": "replace", "path": "/visibility", "value": "public"}]),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    let r = t
        .req(
            Method::POST,
            &format!("/v2/images/{id}/actions/deactivate"),
            Some(ADMIN_TOKEN),
            None,
            Body::empty(),
            &[],
        )
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    assert_eq!(
        t.get(&format!("/v2/images/{id}"), ADMIN_TOKEN).await.json()["status"],
        "deactivated"
    );
    assert_eq!(
        t.get(&format!("/v2/images/{id}/file"), &other).await.status,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        t.get(&format!("/v2/images/{id}/file"), ADMIN_TOKEN)
            .await
            .status,
        StatusCode::OK
    );
    let r = t
        .req(
            Method::POST,
            &format!("/v2/images/{id}/actions/reactivate"),
            Some(ADMIN_TOKEN),
            None,
            Body::empty(),
            &[],
        )
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    assert_eq!(
        t.get(&format!("/v2/images/{id}/file"), &other).await.status,
        StatusCode::OK
    );

    // Tags.
    let r = t
        .req(
            Method::PUT,
            &format!("/v2/images/{id}/tags/new"),
            Some(ADMIN_TOKEN),
            None,
            Body::empty(),
            &[],
        )
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    let r = t
        .delete(&format!("/v2/images/{id}/tags/a"), ADMIN_TOKEN)
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    let r = t
        .delete(&format!("/v2/images/{id}/tags/zzz"), ADMIN_TOKEN)
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert_eq!(
        t.get(&format!("/v2/images/{id}"), ADMIN_TOKEN).await.json()["tags"],
        json!(["b", "new"])
    );

    // Protected images cannot be deleted.
    t.patch(
        &id,
        ADMIN_TOKEN,
        json!([{"op": "replace", "path": "/protected", "value": true}]),
    )
    .await;
    assert_eq!(
        t.delete(&format!("/v2/images/{id}"), ADMIN_TOKEN)
            .await
            .status,
        StatusCode::FORBIDDEN
    );
    t.patch(
        &id,
        ADMIN_TOKEN,
        json!([{"op": "replace", "path": "/protected", "value": false}]),
    )
    .await;
    assert_eq!(t.stored_objects(), 1);
    assert_eq!(
        t.delete(&format!("/v2/images/{id}"), ADMIN_TOKEN)
            .await
            .status,
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        t.get(&format!("/v2/images/{id}"), ADMIN_TOKEN).await.status,
        StatusCode::NOT_FOUND
    );
    assert_eq!(t.stored_objects(), 0);
}

#[tokio::test]
async fn json_patch_follows_glance_rules() {
    let t = setup().await;
    let id = t.create(ADMIN_TOKEN, json!({"name": "x"})).await;
    let r = t
        .patch(
            &id,
            ADMIN_TOKEN,
            json!([
                {"op": "replace", "path": "/name", "value": "y"},
                {"op": "add", "path": "/os_distro", "value": "debian"},
                {"op": "add", "path": "/disk_format", "value": "qcow2"},
                {"op": "add", "path": "/min_disk", "value": 3}
            ]),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    let v = r.json();
    assert_eq!(
        (
            v["name"].clone(),
            v["os_distro"].clone(),
            v["min_disk"].clone()
        ),
        (json!("y"), json!("debian"), json!(3))
    );
    let r = t
        .patch(
            &id,
            ADMIN_TOKEN,
            json!([{"op": "remove", "path": "/os_distro"}]),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(r.json().get("os_distro").is_none());
    let cases = [
        (
            json!([{"op": "remove", "path": "/os_distro"}]),
            StatusCode::CONFLICT,
        ),
        (
            json!([{"op": "replace", "path": "/nope", "value": "v"}]),
            StatusCode::CONFLICT,
        ),
        (
            json!([{"op": "replace", "path": "/status", "value": "active"}]),
            StatusCode::FORBIDDEN,
        ),
        (
            json!([{"op": "replace", "path": "/checksum", "value": "0"}]),
            StatusCode::FORBIDDEN,
        ),
        (
            json!([{"op": "remove", "path": "/name"}]),
            StatusCode::FORBIDDEN,
        ),
        (
            json!([{"op": "replace", "path": "/disk_format", "value": "floppy"}]),
            StatusCode::BAD_REQUEST,
        ),
        (
            json!([{"op": "move", "path": "/name", "from": "/x"}]),
            StatusCode::BAD_REQUEST,
        ),
        (
            json!([{"op": "add", "path": "/prop", "value": 5}]),
            StatusCode::BAD_REQUEST,
        ),
        (json!({"op": "add"}), StatusCode::BAD_REQUEST),
    ];
    for (ops, want) in cases {
        let r = t.patch(&id, ADMIN_TOKEN, ops.clone()).await;
        assert_eq!(r.status, want, "{ops}");
    }
    let r = t
        .req(
            Method::PATCH,
            &format!("/v2/images/{id}"),
            Some(ADMIN_TOKEN),
            Some("application/json"),
            "[]",
            &[],
        )
        .await;
    assert_eq!(r.status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    // Creation rules: read-only attributes, bad ids, duplicates.
    assert_eq!(
        t.post("/v2/images", ADMIN_TOKEN, json!({"status": "active"}))
            .await
            .status,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        t.post("/v2/images", ADMIN_TOKEN, json!({"id": "nope"}))
            .await
            .status,
        StatusCode::BAD_REQUEST
    );
    assert_eq!(
        t.post("/v2/images", ADMIN_TOKEN, json!({"id": id}))
            .await
            .status,
        StatusCode::CONFLICT
    );
    assert_eq!(
        t.post("/v2/images", ADMIN_TOKEN, json!([1])).await.status,
        StatusCode::BAD_REQUEST
    );
    // Changing formats after data is stored is refused.
    let id2 = t
        .create(
            ADMIN_TOKEN,
            json!({"disk_format": "raw", "container_format": "bare"}),
        )
        .await;
    assert_eq!(
        t.upload(&id2, ADMIN_TOKEN, vec![1u8; 1024]).await.status,
        StatusCode::NO_CONTENT
    );
    let r = t
        .patch(
            &id2,
            ADMIN_TOKEN,
            json!([{"op": "replace", "path": "/disk_format", "value": "qcow2"}]),
        )
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
}

#[tokio::test]
async fn uploads_need_formats_and_octet_stream() {
    let t = setup().await;
    let id = t.create(ADMIN_TOKEN, json!({"name": "x"})).await;
    assert_eq!(
        t.upload(&id, ADMIN_TOKEN, b"abc".to_vec()).await.status,
        StatusCode::BAD_REQUEST
    );
    t.patch(
        &id,
        ADMIN_TOKEN,
        json!([{"op": "add", "path": "/disk_format", "value": "raw"},
                                     {"op": "add", "path": "/container_format", "value": "bare"}]),
    )
    .await;
    let r = t
        .req(
            Method::PUT,
            &format!("/v2/images/{id}/file"),
            Some(ADMIN_TOKEN),
            Some("text/plain"),
            "abc",
            &[],
        )
        .await;
    assert_eq!(r.status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    assert_eq!(
        t.get(&format!("/v2/images/{id}"), ADMIN_TOKEN).await.json()["status"],
        "queued"
    );
}

#[tokio::test]
async fn a_failed_upload_leaves_the_image_queued_and_no_data() {
    let t = setup_with(|c| c.image_size_cap = 1 << 20).await;
    let id = t
        .create(
            ADMIN_TOKEN,
            json!({"disk_format": "raw", "container_format": "bare"}),
        )
        .await;
    // A body that breaks halfway.
    let chunks: Vec<Result<Bytes, std::io::Error>> = vec![
        Ok(Bytes::from(vec![0u8; 100_000])),
        Err(std::io::Error::other("connection reset")),
    ];
    let r = t
        .upload(
            &id,
            ADMIN_TOKEN,
            Body::from_stream(futures_util::stream::iter(chunks)),
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(
        t.get(&format!("/v2/images/{id}"), ADMIN_TOKEN).await.json()["status"],
        "queued"
    );
    assert_eq!(t.stored_objects(), 0);
    // Over the size cap.
    let r = t.upload(&id, ADMIN_TOKEN, vec![0u8; (1 << 20) + 1]).await;
    assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE);
    let chunks: Vec<Result<Bytes, std::io::Error>> = (0..3)
        .map(|_| Ok(Bytes::from(vec![0u8; 400_000])))
        .collect();
    let r = t
        .upload(
            &id,
            ADMIN_TOKEN,
            Body::from_stream(futures_util::stream::iter(chunks)),
        )
        .await;
    assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE);
    let v = t.get(&format!("/v2/images/{id}"), ADMIN_TOKEN).await.json();
    assert_eq!(
        (v["status"].clone(), v["size"].clone()),
        (json!("queued"), Value::Null)
    );
    assert_eq!(t.stored_objects(), 0);
    // The image still accepts a good upload afterwards.
    assert_eq!(
        t.upload(&id, ADMIN_TOKEN, vec![5u8; 4096]).await.status,
        StatusCode::NO_CONTENT
    );
}

#[tokio::test]
async fn concurrent_uploads_to_one_image_let_exactly_one_win() {
    let t = setup().await;
    let id = t
        .create(
            ADMIN_TOKEN,
            json!({"disk_format": "raw", "container_format": "bare"}),
        )
        .await;
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(4);
    let body = Body::from_stream(tokio_stream(rx));
    let router = t.reg.router();
    let req = Request::builder()
        .method(Method::PUT)
        .uri(format!("/v2/images/{id}/file"))
        .header("x-auth-token", ADMIN_TOKEN)
        .header("content-type", "application/octet-stream")
        .body(body)
        .unwrap();
    let first = tokio::spawn(async move { router.oneshot(req).await.unwrap().status() });
    tx.send(Ok(Bytes::from(vec![1u8; 1000]))).await.unwrap();
    // Wait until the first upload holds the image in `saving`.
    for _ in 0..200 {
        if t.get(&format!("/v2/images/{id}"), ADMIN_TOKEN).await.json()["status"] == "saving" {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let second = t.upload(&id, ADMIN_TOKEN, vec![2u8; 10]).await;
    assert_eq!(second.status, StatusCode::CONFLICT);
    tx.send(Ok(Bytes::from(vec![1u8; 1000]))).await.unwrap();
    drop(tx);
    assert_eq!(first.await.unwrap(), StatusCode::NO_CONTENT);
    let v = t.get(&format!("/v2/images/{id}"), ADMIN_TOKEN).await.json();
    assert_eq!(
        (v["status"].clone(), v["size"].clone()),
        (json!("active"), json!(2000))
    );
}

fn tokio_stream(
    mut rx: tokio::sync::mpsc::Receiver<Result<Bytes, std::io::Error>>,
) -> impl futures_util::Stream<Item = Result<Bytes, std::io::Error>> {
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

fn qemu_image(dir: &Path, fmt: &str, size: &str) -> Vec<u8> {
    let p = dir.join(format!("img.{fmt}"));
    let out = std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", fmt])
        .arg(&p)
        .arg(size)
        .output()
        .expect("qemu-img runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::read(&p).unwrap()
}

#[tokio::test]
async fn uploads_whose_content_differs_from_disk_format_are_refused_with_violations() {
    let t = setup().await;
    let scratch = tempfile::tempdir().unwrap();
    let vdi = qemu_image(scratch.path(), "vdi", "4M");
    let id = t
        .create(
            ADMIN_TOKEN,
            json!({"disk_format": "raw", "container_format": "bare"}),
        )
        .await;
    let r = t.upload(&id, ADMIN_TOKEN, vdi.clone()).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    let v = r.json();
    assert_eq!(
        v["error"]["violations"][0]["kind"], "format-mismatch",
        "{v}"
    );
    assert_eq!(
        t.get(&format!("/v2/images/{id}"), ADMIN_TOKEN).await.json()["status"],
        "queued"
    );
    assert_eq!(t.stored_objects(), 0);
    // Declared correctly, the same bytes are accepted and the virtual size is recorded.
    let id = t
        .create(
            ADMIN_TOKEN,
            json!({"disk_format": "vdi", "container_format": "bare"}),
        )
        .await;
    assert_eq!(
        t.upload(&id, ADMIN_TOKEN, vdi.clone()).await.status,
        StatusCode::NO_CONTENT
    );
    let v = t.get(&format!("/v2/images/{id}"), ADMIN_TOKEN).await.json();
    assert_eq!(v["virtual_size"], 4 << 20);
    assert_eq!(v["size"], vdi.len());
}

#[tokio::test]
async fn listing_filters_sorts_and_pages_like_glance() {
    let t = setup().await;
    let mut ids = Vec::new();
    for (n, (name, fmt, size, tag)) in [
        ("alpha", "raw", 100usize, "x"),
        ("beta", "raw", 2000, "y"),
        ("gamma", "iso", 0, "x"),
        ("delta", "vdi", 0, "y"),
        ("eps", "raw", 5000, "x"),
    ]
    .into_iter()
    .enumerate()
    {
        let id = t
            .create(
                ADMIN_TOKEN,
                json!({"name": name, "disk_format": fmt, "container_format": "bare",
                                         "tags": [tag], "rank": n.to_string()}),
            )
            .await;
        if size > 0 {
            assert_eq!(
                t.upload(&id, ADMIN_TOKEN, vec![0u8; size]).await.status,
                StatusCode::NO_CONTENT
            );
        }
        ids.push(id);
    }
    let names = |r: &Resp| -> Vec<String> {
        r.json()["images"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["name"].as_str().unwrap().to_string())
            .collect()
    };
    let q = |s: &str| {
        let s = s.to_string();
        let t = &t;
        async move { t.get(&format!("/v2/images?{s}"), ADMIN_TOKEN).await }
    };
    assert_eq!(
        names(&q("sort_key=name&sort_dir=asc").await),
        ["alpha", "beta", "delta", "eps", "gamma"]
    );
    assert_eq!(
        names(&q("sort=name:desc").await),
        ["gamma", "eps", "delta", "beta", "alpha"]
    );
    assert_eq!(names(&q("name=beta").await), ["beta"]);
    assert_eq!(
        names(&q("name=in:beta,eps&sort_key=name&sort_dir=asc").await),
        ["beta", "eps"]
    );
    assert_eq!(
        names(&q("disk_format=raw&status=active&sort=name:asc").await),
        ["alpha", "beta", "eps"]
    );
    assert_eq!(
        names(&q("status=queued&sort=name:asc").await),
        ["delta", "gamma"]
    );
    assert_eq!(names(&q("tag=y&sort=name:asc").await), ["beta", "delta"]);
    assert_eq!(names(&q("size_min=1000&size_max=3000").await), ["beta"]);
    assert_eq!(names(&q("rank=3").await), ["delta"]);
    assert_eq!(
        names(&q("container_format=bare&sort=size:desc,name:asc").await),
        ["eps", "beta", "alpha", "delta", "gamma"]
    );
    assert_eq!(
        names(&q("created_at=gte:2000-01-01T00:00:00Z&sort=name:asc&limit=1").await),
        ["alpha"]
    );
    assert_eq!(q("sort=name:up").await.status, StatusCode::BAD_REQUEST);
    assert_eq!(
        q("sort=name&sort_key=name").await.status,
        StatusCode::BAD_REQUEST
    );
    assert_eq!(q("limit=-1").await.status, StatusCode::BAD_REQUEST);
    assert_eq!(
        q("marker=00000000-0000-0000-0000-000000000000")
            .await
            .status,
        StatusCode::BAD_REQUEST
    );
    // Paging with next links visits every image once.
    let mut seen = Vec::new();
    let mut url = "/v2/images?limit=2&sort_key=name&sort_dir=asc".to_string();
    loop {
        let r = t.get(&url, ADMIN_TOKEN).await;
        assert_eq!(r.status, StatusCode::OK);
        seen.extend(names(&r));
        match r.json()["next"].as_str() {
            Some(n) => url = n.to_string(),
            None => break,
        }
    }
    assert_eq!(seen, ["alpha", "beta", "delta", "eps", "gamma"]);
    // Hidden images are listed only on request.
    t.patch(
        &ids[0],
        ADMIN_TOKEN,
        json!([{"op": "replace", "path": "/os_hidden", "value": true}]),
    )
    .await;
    assert_eq!(names(&q("tag=x&sort=name:asc").await), ["eps", "gamma"]);
    assert_eq!(names(&q("os_hidden=true").await), ["alpha"]);
}

#[tokio::test]
async fn members_accept_shares_and_only_then_see_them_listed() {
    let t = setup().await;
    let (_, owner) = t.user("owner", "o", "member").await;
    let (pb, b) = t.user("pb", "b", "member").await;
    let (_, c) = t.user("pc", "c", "member").await;
    let id = t
        .create(&owner, json!({"name": "s", "visibility": "shared"}))
        .await;
    let private = t
        .create(&owner, json!({"name": "p", "visibility": "private"}))
        .await;
    let listed = |tok: String| {
        let t = &t;
        async move {
            t.get("/v2/images", &tok).await.json()["images"]
                .as_array()
                .unwrap()
                .iter()
                .map(|i| i["id"].as_str().unwrap().to_string())
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(
        t.get(&format!("/v2/images/{id}"), &b).await.status,
        StatusCode::NOT_FOUND
    );
    let r = t
        .post(
            &format!("/v2/images/{id}/members"),
            &owner,
            json!({"member": pb}),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.json()["status"], "pending");
    assert_eq!(
        t.post(
            &format!("/v2/images/{id}/members"),
            &owner,
            json!({"member": pb})
        )
        .await
        .status,
        StatusCode::CONFLICT
    );
    assert_eq!(
        t.post(
            &format!("/v2/images/{private}/members"),
            &owner,
            json!({"member": pb})
        )
        .await
        .status,
        StatusCode::FORBIDDEN
    );
    // Pending: visible by id, not listed.
    assert_eq!(
        t.get(&format!("/v2/images/{id}"), &b).await.status,
        StatusCode::OK
    );
    assert!(!listed(b.clone()).await.contains(&id));
    let r = t
        .get("/v2/images?member_status=pending&visibility=shared", &b)
        .await;
    assert_eq!(r.json()["images"].as_array().unwrap().len(), 1);
    // Only the member answers.
    let m = format!("/v2/images/{id}/members/{pb}");
    assert_eq!(
        t.put_json(&m, &owner, json!({"status": "accepted"}))
            .await
            .status,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        t.put_json(&m, &b, json!({"status": "maybe"})).await.status,
        StatusCode::BAD_REQUEST
    );
    let r = t.put_json(&m, &b, json!({"status": "accepted"})).await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(listed(b.clone()).await.contains(&id));
    assert_eq!(t.get(&m, &b).await.json()["status"], "accepted");
    // Strangers see neither image nor membership.
    assert_eq!(
        t.get(&format!("/v2/images/{id}"), &c).await.status,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        t.get(&format!("/v2/images/{id}/members"), &c).await.status,
        StatusCode::NOT_FOUND
    );
    assert!(!listed(c.clone()).await.contains(&id));
    // The owner lists every member; the member only itself.
    assert_eq!(
        t.get(&format!("/v2/images/{id}/members"), &owner)
            .await
            .json()["members"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    assert_eq!(
        t.get(&format!("/v2/images/{id}/members"), &b).await.json()["members"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    // Rejecting hides it from the list again; removal hides it entirely.
    t.put_json(&m, &b, json!({"status": "rejected"})).await;
    assert!(!listed(b.clone()).await.contains(&id));
    assert_eq!(t.delete(&m, &b).await.status, StatusCode::FORBIDDEN);
    assert_eq!(t.delete(&m, &owner).await.status, StatusCode::NO_CONTENT);
    assert_eq!(
        t.get(&format!("/v2/images/{id}"), &b).await.status,
        StatusCode::NOT_FOUND
    );
}

/// Visibility × role × operation, checked against Glance's default policy.
#[tokio::test]
async fn authorisation_matrix_follows_glance_default_policy() {
    let t = setup().await;
    let (po, owner_member) = t.user("own", "own-member", "member").await;
    let (_, owner_reader) = t.user("own", "own-reader", "reader").await;
    let (pq, q_member) = t.user("q", "q-member", "member").await;
    let (_, q_reader) = t.user("q", "q-reader", "reader").await;
    let (_, q_admin) = t.user("q", "q-admin", "admin").await;
    let (_, stranger) = t.user("z", "z-member", "member").await;
    // Reader cannot create; nobody but an admin makes an image public.
    assert_eq!(
        t.post("/v2/images", &owner_reader, json!({})).await.status,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        t.post("/v2/images", &owner_member, json!({"visibility": "public"}))
            .await
            .status,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        t.post("/v2/images", &q_admin, json!({"visibility": "public"}))
            .await
            .status,
        StatusCode::CREATED
    );

    #[derive(Clone, Copy, PartialEq, Debug)]
    enum Who {
        OwnerMember,
        OwnerReader,
        QMember,
        QReader,
        QAdmin,
        Stranger,
    }
    let callers = [
        (Who::OwnerMember, owner_member.clone()),
        (Who::OwnerReader, owner_reader.clone()),
        (Who::QMember, q_member.clone()),
        (Who::QReader, q_reader.clone()),
        (Who::QAdmin, q_admin.clone()),
        (Who::Stranger, stranger.clone()),
    ];
    for vis in [
        "private",
        "shared-pending",
        "shared-accepted",
        "community",
        "public",
    ] {
        let api_vis = vis.split('-').next().unwrap();
        let id = t
            .create(
                &q_admin,
                json!({"name": vis, "visibility": api_vis, "owner": po,
                                      "disk_format": "raw", "container_format": "bare"}),
            )
            .await;
        assert_eq!(
            t.upload(&id, &owner_member, vec![9u8; 512]).await.status,
            StatusCode::NO_CONTENT
        );
        if vis.starts_with("shared") {
            t.post(
                &format!("/v2/images/{id}/members"),
                &owner_member,
                json!({"member": pq}),
            )
            .await;
            if vis == "shared-accepted" {
                let r = t
                    .put_json(
                        &format!("/v2/images/{id}/members/{pq}"),
                        &q_member,
                        json!({"status": "accepted"}),
                    )
                    .await;
                assert_eq!(r.status, StatusCode::OK);
            }
        }
        for (who, tok) in &callers {
            let in_owner = matches!(who, Who::OwnerMember | Who::OwnerReader);
            let admin = *who == Who::QAdmin;
            let in_q = matches!(who, Who::QMember | Who::QReader);
            let sees = in_owner
                || admin
                || match vis {
                    "private" => false,
                    "shared-pending" | "shared-accepted" => in_q,
                    _ => true,
                };
            let modifies = admin || *who == Who::OwnerMember;
            let expect_write = if !sees {
                StatusCode::NOT_FOUND
            } else if !modifies {
                StatusCode::FORBIDDEN
            } else {
                StatusCode::OK
            };
            let ctx = format!("{vis} {who:?}");
            let show = t.get(&format!("/v2/images/{id}"), tok).await.status;
            assert_eq!(
                show,
                if sees {
                    StatusCode::OK
                } else {
                    StatusCode::NOT_FOUND
                },
                "show {ctx}"
            );
            let dl = t.get(&format!("/v2/images/{id}/file"), tok).await.status;
            assert_eq!(
                dl,
                if sees {
                    StatusCode::OK
                } else {
                    StatusCode::NOT_FOUND
                },
                "download {ctx}"
            );
            let r = t
                .patch(&id, tok, json!([{"op": "add", "path": "/k", "value": "v"}]))
                .await;
            assert_eq!(r.status, expect_write, "update {ctx}");
            let r = t
                .req(
                    Method::PUT,
                    &format!("/v2/images/{id}/tags/t"),
                    Some(tok),
                    None,
                    Body::empty(),
                    &[],
                )
                .await;
            let tag_expect = if expect_write == StatusCode::OK {
                StatusCode::NO_CONTENT
            } else {
                expect_write
            };
            assert_eq!(r.status, tag_expect, "tag {ctx}");
            let r = t
                .req(
                    Method::POST,
                    &format!("/v2/images/{id}/actions/deactivate"),
                    Some(tok),
                    None,
                    Body::empty(),
                    &[],
                )
                .await;
            assert_eq!(r.status, tag_expect, "deactivate {ctx}");
            if r.status == StatusCode::NO_CONTENT {
                t.req(
                    Method::POST,
                    &format!("/v2/images/{id}/actions/reactivate"),
                    Some(tok),
                    None,
                    Body::empty(),
                    &[],
                )
                .await;
            }
            let r = t
                .patch(
                    &id,
                    tok,
                    json!([{"op": "replace", "path": "/visibility", "value": "public"}]),
                )
                .await;
            let pub_expect = if !sees {
                StatusCode::NOT_FOUND
            } else if admin {
                StatusCode::OK
            } else {
                StatusCode::FORBIDDEN
            };
            assert_eq!(r.status, pub_expect, "publicize {ctx}");
            if r.status == StatusCode::OK {
                t.patch(
                    &id,
                    tok,
                    json!([{"op": "replace", "path": "/visibility", "value": api_vis}]),
                )
                .await;
            }
            let listed = t
                .get("/v2/images?visibility=all&member_status=all", tok)
                .await
                .json()["images"]
                .as_array()
                .unwrap()
                .iter()
                .any(|i| i["id"] == id.as_str());
            assert_eq!(listed, sees, "list {ctx}");
            if *who != Who::OwnerMember && *who != Who::QAdmin {
                let r = t.delete(&format!("/v2/images/{id}"), tok).await;
                assert_eq!(r.status, expect_write, "delete {ctx}");
            }
        }
        assert_eq!(
            t.delete(&format!("/v2/images/{id}"), &owner_member)
                .await
                .status,
            StatusCode::NO_CONTENT
        );
    }
}

#[tokio::test]
async fn keystone_password_tokens_validate_revoke_and_list_the_image_endpoint() {
    let t = setup().await;
    let r = t
        .req(Method::GET, "/v3", None, None, Body::empty(), &[])
        .await;
    assert_eq!(r.json()["version"]["id"], "v3.14");
    let r = t
        .req(
            Method::POST,
            "/v3/auth/tokens",
            None,
            Some("application/json"),
            password_auth("admin", "adminpw", "admin").to_string(),
            &[],
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED);
    let tok = r.headers["x-subject-token"].to_str().unwrap().to_string();
    let v = r.json();
    assert_eq!(v["token"]["project"]["name"], "admin");
    assert!(v["token"]["roles"]
        .as_array()
        .unwrap()
        .iter()
        .any(|r| r["name"] == "admin"));
    let image = v["token"]["catalog"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["type"] == "image")
        .unwrap();
    assert_eq!(image["endpoints"][0]["url"], "http://registry.test");
    let r = t
        .req(
            Method::POST,
            "/v3/auth/tokens",
            None,
            Some("application/json"),
            password_auth("admin", "wrong", "admin").to_string(),
            &[],
        )
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    let r = t
        .req(
            Method::GET,
            "/v3/auth/tokens",
            Some(ADMIN_TOKEN),
            None,
            Body::empty(),
            &[("x-subject-token", &tok)],
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(t.get("/v2/images", &tok).await.status, StatusCode::OK);
    // A static API token for scripts.
    let r = t
        .req(
            Method::POST,
            "/v3/api-tokens",
            Some(&tok),
            None,
            Body::empty(),
            &[],
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED);
    let api = r.json()["api_token"]["token"].as_str().unwrap().to_string();
    assert_eq!(t.get("/v2/images", &api).await.status, StatusCode::OK);
    let r = t
        .req(
            Method::DELETE,
            "/v3/auth/tokens",
            Some(ADMIN_TOKEN),
            None,
            Body::empty(),
            &[("x-subject-token", &tok)],
        )
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    assert_eq!(
        t.get("/v2/images", &tok).await.status,
        StatusCode::UNAUTHORIZED
    );
    // Non-admins cannot administer identity.
    let (_, m) = t.user("p", "m", "member").await;
    assert_eq!(
        t.post("/v3/projects", &m, json!({"project": {"name": "x"}}))
            .await
            .status,
        StatusCode::FORBIDDEN
    );
}

/// A real socket: 64 MiB up and down with digest verification and ranged reads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_four_mib_round_trip_over_a_real_socket() {
    let t = setup_with(|c| c.public_url = None).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(t.reg.clone().serve(listener, async {
        let _ = stop_rx.await;
    }));
    let base = format!("http://{addr}");
    let client = reqwest::Client::new();
    let r = client
        .post(format!("{base}/v2/images"))
        .header("x-auth-token", ADMIN_TOKEN)
        .header("content-type", "application/json")
        .body(json!({"name": "big", "disk_format": "raw", "container_format": "bare"}).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let id = serde_json::from_slice::<Value>(&r.bytes().await.unwrap()).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let mut data = vec![0u8; 64 << 20];
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    for chunk in data.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
    let data = Bytes::from(data);
    let r = client
        .put(format!("{base}/v2/images/{id}/file"))
        .header("x-auth-token", ADMIN_TOKEN)
        .header("content-type", "application/octet-stream")
        .body(data.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    let v: Value = serde_json::from_slice(
        &client
            .get(format!("{base}/v2/images/{id}"))
            .header("x-auth-token", ADMIN_TOKEN)
            .send()
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap(),
    )
    .unwrap();
    assert_eq!(v["checksum"], hex_md5(&data));
    assert_eq!(v["os_hash_value"], hex::encode(Sha512::digest(&data)));
    let r = client
        .get(format!("{base}/v2/images/{id}/file"))
        .header("x-auth-token", ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-md5"], hex_md5(&data).as_str());
    let got = r.bytes().await.unwrap();
    assert_eq!(got.len(), data.len());
    assert_eq!(Sha256::digest(&got), Sha256::digest(&data));
    for (s, e) in [
        (0u64, 0u64),
        (12_345, 1_234_567),
        ((64 << 20) - 100, (64 << 20) - 1),
    ] {
        let r = client
            .get(format!("{base}/v2/images/{id}/file"))
            .header("x-auth-token", ADMIN_TOKEN)
            .header("range", format!("bytes={s}-{e}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 206);
        let got = r.bytes().await.unwrap();
        assert_eq!(&got[..], &data[s as usize..=e as usize]);
    }
    let r = client
        .get(format!("{base}/v2/images/{id}/file"))
        .header("x-auth-token", ADMIN_TOKEN)
        .header("range", format!("bytes={}-", 64 << 20))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 416);
    let _ = stop_tx.send(());
    server.await.unwrap().unwrap();
}

/// `vmi image …` against a served registry: create with upload, list, show, set, resumed
/// download with verification, share/accept with password login, delete.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_image_client_drives_a_served_registry() {
    use clap::Parser;
    use vmi_registry::cli::{image_command, ImageArgs};

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        image: ImageArgs,
    }

    let t = setup_with(|c| c.public_url = None).await;
    let (pb, _) = t.user("beta", "bob", "member").await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(t.reg.clone().serve(listener, async {
        let _ = stop_rx.await;
    }));
    let scratch = tempfile::tempdir().unwrap();
    let src = scratch.path().join("disk.raw");
    let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 253) as u8).collect();
    std::fs::write(&src, &data).unwrap();
    let admin_env = vec![("VMI_TOKEN".to_string(), ADMIN_TOKEN.to_string())];
    let bob_env = vec![
        ("OS_USERNAME".to_string(), "bob".to_string()),
        ("OS_PASSWORD".to_string(), "pw".to_string()),
    ];
    let run = |argv: Vec<String>, env: Vec<(String, String)>| {
        let url = url.clone();
        async move {
            let mut full = vec!["vmi-image".to_string(), "--url".to_string(), url];
            full.extend(argv);
            let cli = Cli::try_parse_from(full).unwrap();
            let mut out = Vec::new();
            let r = image_command(&cli.image, &env, &mut out, false).await;
            (r, String::from_utf8(out).unwrap())
        }
    };
    let args = |s: &str| s.split_whitespace().map(str::to_string).collect::<Vec<_>>();

    let mut create =
        args("--json create disk1 --visibility shared --property os_distro=debian --file");
    create.push(src.display().to_string());
    let (r, out) = run(create, admin_env.clone()).await;
    r.unwrap();
    let img: Value = serde_json::from_str(&out).unwrap();
    let id = img["id"].as_str().unwrap().to_string();
    assert_eq!(img["status"], "active");
    assert_eq!(img["checksum"], hex_md5(&data));
    assert_eq!(img["os_distro"], "debian");

    let (r, out) = run(args("list --filter status=active"), admin_env.clone()).await;
    r.unwrap();
    assert!(out.contains(&id) && out.contains("disk1"), "{out}");
    let (r, out) = run(
        args("set disk1 --property hw_disk_bus=scsi --remove-property os_distro --min-ram 256"),
        admin_env.clone(),
    )
    .await;
    r.unwrap();
    assert!(
        out.contains("hw_disk_bus        scsi") && !out.contains("os_distro"),
        "{out}"
    );

    // A partial file is completed with a ranged request and verified as a whole.
    let dst = scratch.path().join("out.raw");
    std::fs::write(&dst, &data[..1_000_000]).unwrap();
    let mut dl = args(&format!("download {id} --resume -o"));
    dl.push(dst.display().to_string());
    let (r, out) = run(dl.clone(), admin_env.clone()).await;
    r.unwrap();
    assert!(
        out.contains("2000000 bytes written after 1000000 already present"),
        "{out}"
    );
    assert_eq!(std::fs::read(&dst).unwrap(), data);
    // A corrupt partial file fails verification.
    std::fs::write(&dst, vec![0u8; 10]).unwrap();
    let (r, _) = run(dl, admin_env.clone()).await;
    assert!(r.unwrap_err().to_string().contains("checksum mismatch"));

    // Resumable uploads in 1 MiB chunks, and continuing a session another process opened.
    for name in ["disk2", "disk3"] {
        let (r, _) = run(args(&format!("create {name}")), admin_env.clone()).await;
        r.unwrap();
    }
    let mut up = args("--json upload disk2 --resumable --chunk-mib 1");
    up.insert(3, src.display().to_string());
    let (r, out) = run(up, admin_env.clone()).await;
    r.unwrap();
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        (v["status"].clone(), v["checksum"].clone()),
        (json!("active"), json!(hex_md5(&data)))
    );
    let http = reqwest::Client::new();
    let (_, out) = run(args("--json show disk3"), admin_env.clone()).await;
    let id3 = serde_json::from_str::<Value>(&out).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let r = http
        .post(format!("{url}/v2/images/{id3}/uploads"))
        .header("x-auth-token", ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    let loc = format!("{url}{}", r.headers()["location"].to_str().unwrap());
    let r = http
        .patch(&loc)
        .header("x-auth-token", ADMIN_TOKEN)
        .header("upload-offset", "0")
        .body(data[..700_000].to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    let mut up = args("--json upload disk3 --session");
    up.insert(3, src.display().to_string());
    up.push(loc);
    let (r, out) = run(up, admin_env.clone()).await;
    r.unwrap();
    assert_eq!(
        serde_json::from_str::<Value>(&out).unwrap()["checksum"],
        hex_md5(&data)
    );

    // Share with project beta; bob (password login) accepts and then sees it listed.
    let (r, _) = run(args(&format!("share {id} {pb}")), admin_env.clone()).await;
    r.unwrap();
    let (r, out) = run(args("list"), bob_env.clone()).await;
    r.unwrap();
    assert!(!out.contains(&id));
    let (r, _) = run(args(&format!("accept {id}")), bob_env.clone()).await;
    r.unwrap();
    let (r, out) = run(args("list"), bob_env.clone()).await;
    r.unwrap();
    assert!(out.contains(&id), "{out}");
    let (r, _) = run(args(&format!("delete {id}")), bob_env.clone()).await;
    assert!(matches!(
        r,
        Err(vmi_registry::RegistryError::Remote { status: 403, .. })
    ));

    let (r, out) = run(args("delete disk1"), admin_env.clone()).await;
    r.unwrap();
    assert!(out.contains(&id));
    let (r, _) = run(args(&format!("show {id}")), admin_env.clone()).await;
    assert!(matches!(
        r,
        Err(vmi_registry::RegistryError::Remote { status: 404, .. })
    ));
    let (r, _) = run(args("list"), vec![]).await;
    assert!(r.is_err());
    let _ = stop_tx.send(());
    server.await.unwrap().unwrap();
}

#[tokio::test]
async fn the_reaper_requeues_abandoned_uploads_and_spares_recent_unreferenced_data() {
    let t = setup_with(|c| c.reap_grace_secs = 3600).await;
    let id = t
        .create(
            ADMIN_TOKEN,
            json!({"disk_format": "raw", "container_format": "bare"}),
        )
        .await;
    let cat = &t.reg.app.catalog;
    // An uploader that died two hours ago, and one that is still running.
    let mut img = cat.get_image(&id).await.unwrap().unwrap();
    img.status = vmi_registry::model::Status::Saving;
    img.updated_at = "2000-01-01T00:00:00Z".into();
    assert!(cat
        .update_image(&img, vmi_registry::model::Status::Queued)
        .await
        .unwrap());
    let fresh = t
        .create(
            ADMIN_TOKEN,
            json!({"disk_format": "raw", "container_format": "bare"}),
        )
        .await;
    let mut f = cat.get_image(&fresh).await.unwrap().unwrap();
    f.status = vmi_registry::model::Status::Saving;
    assert!(cat
        .update_image(&f, vmi_registry::model::Status::Queued)
        .await
        .unwrap());
    // Data that no image references, written just now, is kept during the grace period.
    let mut sink = t.reg.app.data.begin(&id).await.unwrap();
    sink.write(Bytes::from_static(b"orphan")).await.unwrap();
    sink.finish().await.unwrap();
    assert_eq!(t.reg.reap().await.unwrap(), 0);
    assert_eq!(t.stored_objects(), 1);
    assert_eq!(
        t.get(&format!("/v2/images/{id}"), ADMIN_TOKEN).await.json()["status"],
        "queued"
    );
    assert_eq!(
        t.get(&format!("/v2/images/{fresh}"), ADMIN_TOKEN)
            .await
            .json()["status"],
        "saving"
    );
    assert_eq!(
        t.upload(&id, ADMIN_TOKEN, vec![1u8; 10]).await.status,
        StatusCode::NO_CONTENT
    );
}

/// The same data path on an S3-compatible store. Runs when `VMI_TEST_S3_ENDPOINT` names one
/// (`tests/s3.sh` starts a local S3 server and sets it); any credentials the server accepts.
#[cfg(feature = "s3")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_store_keeps_the_data_path_guarantees() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(dir.path());
    if !support::s3_store(&mut c).await {
        return;
    }
    c.reap_grace_secs = 0;
    let reg = Registry::open(c).await.unwrap();
    reg.bootstrap().await.unwrap();
    let t = T { reg, dir };

    let id = t
        .create(
            ADMIN_TOKEN,
            json!({"disk_format": "raw", "container_format": "bare"}),
        )
        .await;
    // Three multipart parts.
    let data: Vec<u8> = (0..(20u32 << 20)).map(|i| (i % 241) as u8).collect();
    let r = t.upload(&id, ADMIN_TOKEN, data.clone()).await;
    assert_eq!(
        r.status,
        StatusCode::NO_CONTENT,
        "{}",
        String::from_utf8_lossy(&r.body)
    );
    let v = t.get(&format!("/v2/images/{id}"), ADMIN_TOKEN).await.json();
    assert_eq!(v["checksum"], hex_md5(&data));
    let r = t.get(&format!("/v2/images/{id}/file"), ADMIN_TOKEN).await;
    assert_eq!(Sha256::digest(&r.body), Sha256::digest(&data));
    let r = t
        .req(
            Method::GET,
            &format!("/v2/images/{id}/file"),
            Some(ADMIN_TOKEN),
            None,
            Body::empty(),
            &[("range", "bytes=9000000-9000099")],
        )
        .await;
    assert_eq!(r.status, StatusCode::PARTIAL_CONTENT);
    assert_eq!(&r.body[..], &data[9_000_000..9_000_100]);
    // A refused upload leaves no object behind: the reaper finds nothing to remove.
    let scratch = tempfile::tempdir().unwrap();
    let vdi = qemu_image(scratch.path(), "vdi", "1M");
    let bad = t
        .create(
            ADMIN_TOKEN,
            json!({"disk_format": "raw", "container_format": "bare"}),
        )
        .await;
    assert_eq!(
        t.upload(&bad, ADMIN_TOKEN, vdi).await.status,
        StatusCode::BAD_REQUEST
    );
    assert_eq!(t.reg.reap().await.unwrap(), 0);
    // A resumable upload in two chunks.
    let rid = t
        .create(
            ADMIN_TOKEN,
            json!({"disk_format": "raw", "container_format": "bare"}),
        )
        .await;
    let r = t
        .req(
            Method::POST,
            &format!("/v2/images/{rid}/uploads"),
            Some(ADMIN_TOKEN),
            None,
            Body::empty(),
            &[],
        )
        .await;
    let loc = r.headers["location"].to_str().unwrap().to_string();
    for (off, part) in [(0usize, &data[..6 << 20]), (6 << 20, &data[6 << 20..])] {
        let r = t
            .req(
                Method::PATCH,
                &loc,
                Some(ADMIN_TOKEN),
                None,
                Body::from(part.to_vec()),
                &[("upload-offset", &off.to_string())],
            )
            .await;
        assert_eq!(r.status, StatusCode::NO_CONTENT);
    }
    let sha = hex::encode(Sha256::digest(&data));
    let r = t
        .req(
            Method::PUT,
            &format!("{loc}?digest=sha256:{sha}"),
            Some(ADMIN_TOKEN),
            None,
            Body::empty(),
            &[],
        )
        .await;
    assert_eq!(
        r.status,
        StatusCode::NO_CONTENT,
        "{}",
        String::from_utf8_lossy(&r.body)
    );
    assert_eq!(
        t.get(&format!("/v2/images/{rid}"), ADMIN_TOKEN)
            .await
            .json()["checksum"],
        hex_md5(&data)
    );
    assert_eq!(t.reg.reap().await.unwrap(), 0);
    // Deleting the image deletes its object; the live one survives reaping.
    assert_eq!(
        t.delete(&format!("/v2/images/{id}"), ADMIN_TOKEN)
            .await
            .status,
        StatusCode::NO_CONTENT
    );
    assert_eq!(t.reg.reap().await.unwrap(), 0);
}

#[tokio::test]
async fn deleting_an_image_during_its_upload_makes_the_upload_lose_without_leftovers() {
    let t = setup().await;
    let id = t
        .create(
            ADMIN_TOKEN,
            json!({"disk_format": "raw", "container_format": "bare"}),
        )
        .await;
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(4);
    let router = t.reg.router();
    let req = Request::builder()
        .method(Method::PUT)
        .uri(format!("/v2/images/{id}/file"))
        .header("x-auth-token", ADMIN_TOKEN)
        .body(Body::from_stream(tokio_stream(rx)))
        .unwrap();
    let upload = tokio::spawn(async move { router.oneshot(req).await.unwrap().status() });
    tx.send(Ok(Bytes::from(vec![3u8; 5000]))).await.unwrap();
    for _ in 0..200 {
        if t.get(&format!("/v2/images/{id}"), ADMIN_TOKEN).await.json()["status"] == "saving" {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert_eq!(
        t.delete(&format!("/v2/images/{id}"), ADMIN_TOKEN)
            .await
            .status,
        StatusCode::NO_CONTENT
    );
    drop(tx);
    assert_eq!(upload.await.unwrap(), StatusCode::CONFLICT);
    assert_eq!(
        t.get(&format!("/v2/images/{id}"), ADMIN_TOKEN).await.status,
        StatusCode::NOT_FOUND
    );
    assert_eq!(t.stored_objects(), 0);
}

#[tokio::test]
async fn info_endpoints_roles_and_head_requests_answer() {
    let t = setup().await;
    let r = t.get("/v2/info/import", ADMIN_TOKEN).await;
    assert_eq!(
        r.json()["import-methods"]["value"],
        json!(["glance-direct", "web-download", "copy-image"])
    );
    let r = t.get("/v2/info/stores", ADMIN_TOKEN).await;
    assert_eq!(r.json()["stores"][0]["default"], "true");
    let r = t.get("/v3/roles", ADMIN_TOKEN).await;
    assert_eq!(r.json()["roles"].as_array().unwrap().len(), 3);
    let id = t
        .create(
            ADMIN_TOKEN,
            json!({"disk_format": "raw", "container_format": "bare"}),
        )
        .await;
    t.upload(&id, ADMIN_TOKEN, vec![1u8; 100]).await;
    let r = t
        .req(
            Method::HEAD,
            &format!("/v2/images/{id}/file"),
            Some(ADMIN_TOKEN),
            None,
            Body::empty(),
            &[],
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.headers["content-length"], "100");
    assert!(r.body.is_empty());
    let r = t.get("/v2/no-such-thing", ADMIN_TOKEN).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert_eq!(r.json()["error"]["code"], 404);
}

/// Two service processes on one PostgreSQL catalog and one image store: concurrent uploads to
/// one image are serialised by the catalog (exactly one wins, the other gets 409), and what one
/// node stored the other serves.
#[cfg(feature = "postgres")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_on_one_postgres_catalog_behave_as_one_service() {
    if std::env::var("VMI_TEST_POSTGRES_URL").is_err() {
        eprintln!("two-node test skipped: VMI_TEST_POSTGRES_URL is not set");
        return;
    }
    let a = setup().await;
    let b = Registry::open(a.reg.app.config.clone()).await.unwrap();
    b.bootstrap().await.unwrap();
    let b = T {
        reg: b,
        dir: tempfile::tempdir().unwrap(),
    };
    let id = a
        .create(
            ADMIN_TOKEN,
            json!({"disk_format": "raw", "container_format": "bare"}),
        )
        .await;
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(4);
    let router = a.reg.router();
    let req = Request::builder()
        .method(Method::PUT)
        .uri(format!("/v2/images/{id}/file"))
        .header("x-auth-token", ADMIN_TOKEN)
        .body(Body::from_stream(tokio_stream(rx)))
        .unwrap();
    let first = tokio::spawn(async move { router.oneshot(req).await.unwrap().status() });
    tx.send(Ok(Bytes::from(vec![4u8; 70_000]))).await.unwrap();
    for _ in 0..300 {
        if b.get(&format!("/v2/images/{id}"), ADMIN_TOKEN).await.json()["status"] == "saving" {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert_eq!(
        b.upload(&id, ADMIN_TOKEN, vec![5u8; 10]).await.status,
        StatusCode::CONFLICT
    );
    drop(tx);
    assert_eq!(first.await.unwrap(), StatusCode::NO_CONTENT);
    let v = b.get(&format!("/v2/images/{id}"), ADMIN_TOKEN).await.json();
    assert_eq!(v["status"], "active");
    assert_eq!(v["checksum"], hex_md5(&vec![4u8; 70_000]));
    let r = b.get(&format!("/v2/images/{id}/file"), ADMIN_TOKEN).await;
    assert_eq!(r.body.len(), 70_000);
    // A token issued by one node works on the other.
    let tok = b.password_token("admin", "adminpw", "admin").await;
    assert_eq!(
        a.get(&format!("/v2/images/{id}"), &tok).await.status,
        StatusCode::OK
    );
    // A resumable upload started on one node completes through the other.
    let id = a
        .create(
            ADMIN_TOKEN,
            json!({"disk_format": "raw", "container_format": "bare"}),
        )
        .await;
    let data: Vec<u8> = (0..500_000u32).map(|i| (i % 211) as u8).collect();
    let r = a
        .req(
            Method::POST,
            &format!("/v2/images/{id}/uploads"),
            Some(ADMIN_TOKEN),
            None,
            Body::empty(),
            &[],
        )
        .await;
    let loc = r.headers["location"].to_str().unwrap().to_string();
    let r = a
        .req(
            Method::PATCH,
            &loc,
            Some(ADMIN_TOKEN),
            None,
            Body::from(data[..200_000].to_vec()),
            &[("upload-offset", "0")],
        )
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    let r = b.get(&loc, ADMIN_TOKEN).await;
    assert_eq!(r.headers["upload-offset"], "200000");
    let r = b
        .req(
            Method::PATCH,
            &loc,
            Some(ADMIN_TOKEN),
            None,
            Body::from(data[200_000..].to_vec()),
            &[("upload-offset", "200000")],
        )
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    let sha = hex::encode(Sha256::digest(&data));
    let r = b
        .req(
            Method::PUT,
            &format!("{loc}?digest=sha256:{sha}"),
            Some(ADMIN_TOKEN),
            None,
            Body::empty(),
            &[],
        )
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    let v = a.get(&format!("/v2/images/{id}"), ADMIN_TOKEN).await.json();
    assert_eq!(
        (v["status"].clone(), v["checksum"].clone()),
        (json!("active"), json!(hex_md5(&data)))
    );
}

#[tokio::test]
async fn resumable_uploads_survive_dropped_chunks_and_verify_the_digest() {
    let t = setup().await;
    let id = t
        .create(
            ADMIN_TOKEN,
            json!({"disk_format": "raw", "container_format": "bare"}),
        )
        .await;
    let data: Vec<u8> = (0..(3u32 << 20)).map(|i| (i % 239) as u8).collect();
    let sha = hex::encode(Sha256::digest(&data));
    let open = |id: String| {
        let t = &t;
        async move {
            let r = t
                .req(
                    Method::POST,
                    &format!("/v2/images/{id}/uploads"),
                    Some(ADMIN_TOKEN),
                    None,
                    Body::empty(),
                    &[],
                )
                .await;
            assert_eq!(
                r.status,
                StatusCode::ACCEPTED,
                "{}",
                String::from_utf8_lossy(&r.body)
            );
            assert_eq!(r.headers["upload-offset"], "0");
            r.headers["location"].to_str().unwrap().to_string()
        }
    };
    let patch = |loc: String, offset: u64, body: Body| {
        let t = &t;
        async move {
            t.req(
                Method::PATCH,
                &loc,
                Some(ADMIN_TOKEN),
                None,
                body,
                &[("upload-offset", &offset.to_string())],
            )
            .await
        }
    };
    let offset_of = |loc: String| {
        let t = &t;
        async move {
            let r = t.get(&loc, ADMIN_TOKEN).await;
            assert_eq!(r.status, StatusCode::NO_CONTENT);
            r.headers["upload-offset"]
                .to_str()
                .unwrap()
                .parse::<u64>()
                .unwrap()
        }
    };
    let loc = open(id.clone()).await;
    // The image is being uploaded: a direct upload or a second session is refused.
    assert_eq!(
        t.upload(&id, ADMIN_TOKEN, vec![0u8; 4]).await.status,
        StatusCode::CONFLICT
    );
    let r = t
        .req(
            Method::POST,
            &format!("/v2/images/{id}/uploads"),
            Some(ADMIN_TOKEN),
            None,
            Body::empty(),
            &[],
        )
        .await;
    assert_eq!(r.status, StatusCode::CONFLICT);

    let mib = 1usize << 20;
    let r = patch(loc.clone(), 0, Body::from(data[..mib].to_vec())).await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    assert_eq!(r.headers["upload-offset"], mib.to_string().as_str());
    // A chunk whose connection drops is not kept.
    let broken: Vec<Result<Bytes, std::io::Error>> = vec![
        Ok(Bytes::from(data[mib..mib + 1000].to_vec())),
        Err(std::io::Error::other("connection reset")),
    ];
    let r = patch(
        loc.clone(),
        mib as u64,
        Body::from_stream(futures_util::stream::iter(broken)),
    )
    .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(offset_of(loc.clone()).await, mib as u64);
    // A chunk at the wrong offset is refused and told where to resume.
    let r = patch(loc.clone(), 5, Body::from(vec![1u8; 10])).await;
    assert_eq!(r.status, StatusCode::CONFLICT);
    assert_eq!(r.headers["upload-offset"], mib.to_string().as_str());
    // Resume with Content-Range, as OCI clients send it.
    let r = t
        .req(
            Method::PATCH,
            &loc,
            Some(ADMIN_TOKEN),
            None,
            Body::from(data[mib..].to_vec()),
            &[(
                "content-range",
                &format!("bytes {mib}-{}/*", data.len() - 1),
            )],
        )
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    assert_eq!(offset_of(loc.clone()).await, data.len() as u64);
    // The wrong digest ends the session: nothing stored, image queued.
    let wrong = format!("{loc}?digest=sha256:{}", "0".repeat(64));
    let r = t
        .req(
            Method::PUT,
            &wrong,
            Some(ADMIN_TOKEN),
            None,
            Body::empty(),
            &[],
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(t.get(&loc, ADMIN_TOKEN).await.status, StatusCode::NOT_FOUND);
    assert_eq!(
        t.get(&format!("/v2/images/{id}"), ADMIN_TOKEN).await.json()["status"],
        "queued"
    );
    assert_eq!(t.stored_objects(), 0);

    // Again, in two chunks, finished with the right digest.
    let loc = open(id.clone()).await;
    assert_eq!(
        patch(loc.clone(), 0, Body::from(data[..2 * mib].to_vec()))
            .await
            .status,
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        patch(
            loc.clone(),
            2 * mib as u64,
            Body::from(data[2 * mib..].to_vec())
        )
        .await
        .status,
        StatusCode::NO_CONTENT
    );
    let r = t
        .req(
            Method::PUT,
            &format!("{loc}?digest=sha256:{sha}"),
            Some(ADMIN_TOKEN),
            None,
            Body::empty(),
            &[],
        )
        .await;
    assert_eq!(
        r.status,
        StatusCode::NO_CONTENT,
        "{}",
        String::from_utf8_lossy(&r.body)
    );
    let v = t.get(&format!("/v2/images/{id}"), ADMIN_TOKEN).await.json();
    assert_eq!(v["status"], "active");
    assert_eq!(v["size"], data.len());
    assert_eq!(v["checksum"], hex_md5(&data));
    assert_eq!(
        &t.get(&format!("/v2/images/{id}/file"), ADMIN_TOKEN)
            .await
            .body[..],
        &data[..]
    );
    assert_eq!(t.stored_objects(), 1);

    // Cancelling puts the image back to queued and removes the chunks.
    let id2 = t
        .create(
            ADMIN_TOKEN,
            json!({"disk_format": "raw", "container_format": "bare"}),
        )
        .await;
    let loc = open(id2.clone()).await;
    patch(loc.clone(), 0, Body::from(vec![7u8; 1000])).await;
    assert_eq!(
        t.delete(&loc, ADMIN_TOKEN).await.status,
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        t.get(&format!("/v2/images/{id2}"), ADMIN_TOKEN)
            .await
            .json()["status"],
        "queued"
    );
    assert_eq!(t.stored_objects(), 1);
    // Other projects cannot see sessions of images they cannot see.
    let (_, other) = t.user("x", "x", "member").await;
    let loc = open(id2.clone()).await;
    assert_eq!(t.get(&loc, &other).await.status, StatusCode::NOT_FOUND);
}
