//! Families, versions, lineage and templates through the HTTP API (tower `oneshot` against the
//! router; SQLite, or a fresh PostgreSQL database per test with the `postgres` feature and
//! `VMI_TEST_POSTGRES_URL`), plus the `vmi image family|lineage|derive` commands against a
//! served registry.

mod support;

use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use serde_json::{json, Value};
use std::path::Path;
use std::sync::Arc;
use tower::ServiceExt;
use vmi_registry::{Config, Registry};

const ADMIN: &str = "admin-static-token";
const PATCH: &str = "application/openstack-images-v2.1-json-patch";

use support::Resp;

struct T {
    reg: Registry,
    _dir: tempfile::TempDir,
}

async fn setup() -> T {
    let dir = tempfile::tempdir().unwrap();
    let mut c = Config {
        data_dir: dir.path().to_path_buf(),
        public_url: Some("http://registry.test".into()),
        ..Config::default()
    };
    c.admin.password = Some("adminpw".into());
    c.admin.token = Some(ADMIN.into());
    if let Some(db) = support::test_database().await {
        c.database = Some(db);
    }
    let reg = Registry::open(c).await.unwrap();
    reg.bootstrap().await.unwrap();
    T { reg, _dir: dir }
}

impl T {
    async fn req(
        &self,
        method: Method,
        uri: &str,
        token: &str,
        ctype: Option<&str>,
        body: impl Into<Body>,
    ) -> Resp {
        support::send(&self.reg, method, uri, Some(token), ctype, body.into(), &[]).await
    }

    async fn get(&self, uri: &str, token: &str) -> Resp {
        self.req(Method::GET, uri, token, None, Body::empty()).await
    }

    async fn post(&self, uri: &str, token: &str, v: Value) -> Resp {
        self.req(
            Method::POST,
            uri,
            token,
            Some("application/json"),
            v.to_string(),
        )
        .await
    }

    async fn patch(&self, id: &str, token: &str, ops: Value) -> Resp {
        self.req(
            Method::PATCH,
            &format!("/v2/images/{id}"),
            token,
            Some(PATCH),
            ops.to_string(),
        )
        .await
    }

    async fn upload(&self, id: &str, token: &str, data: Vec<u8>) -> Resp {
        self.req(
            Method::PUT,
            &format!("/v2/images/{id}/file"),
            token,
            Some("application/octet-stream"),
            data,
        )
        .await
    }

    async fn create(&self, token: &str, v: Value) -> String {
        let r = self.post("/v2/images", token, v).await;
        r.expect(StatusCode::CREATED)["id"]
            .as_str()
            .unwrap()
            .to_string()
    }

    /// A raw image with `props`, active with `data`.
    async fn active(&self, token: &str, props: Value, data: Vec<u8>) -> String {
        let mut v = json!({"disk_format": "raw", "container_format": "bare"});
        for (k, x) in props.as_object().unwrap() {
            v[k] = x.clone();
        }
        let id = self.create(token, v).await;
        self.upload(&id, token, data)
            .await
            .expect(StatusCode::NO_CONTENT);
        id
    }

    /// An image in `family` at `version` with 4 KiB of data.
    async fn version(&self, token: &str, family: &str, version: &str) -> String {
        self.active(
            token,
            json!({"name": format!("{family}-{version}"), "family": family, "version": version}),
            pattern(4096, version.len() as u8),
        )
        .await
    }

    /// A project and a user with `role` on it; returns (project id, token).
    async fn user(&self, project: &str, user: &str, role: &str) -> (String, String) {
        let pid = self
            .post("/v3/projects", ADMIN, json!({"project": {"name": project}}))
            .await
            .expect(StatusCode::CREATED)["project"]["id"]
            .as_str()
            .unwrap()
            .to_string();
        let uid = self
            .post(
                "/v3/users",
                ADMIN,
                json!({"user": {"name": user, "password": "pw", "default_project_id": pid}}),
            )
            .await
            .expect(StatusCode::CREATED)["user"]["id"]
            .as_str()
            .unwrap()
            .to_string();
        self.req(
            Method::PUT,
            &format!("/v3/projects/{pid}/users/{uid}/roles/{role}"),
            ADMIN,
            None,
            Body::empty(),
        )
        .await
        .expect(StatusCode::NO_CONTENT);
        let auth = json!({"auth": {
            "identity": {"methods": ["password"], "password": {"user": {
                "name": user, "domain": {"name": "Default"}, "password": "pw"}}},
            "scope": {"project": {"name": project, "domain": {"name": "Default"}}}}});
        let r = self
            .reg
            .router()
            .oneshot(
                Request::post("/v3/auth/tokens")
                    .header("content-type", "application/json")
                    .body(Body::from(auth.to_string()))
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::CREATED);
        let token = r.headers()["x-subject-token"].to_str().unwrap().to_string();
        (pid, token)
    }

    async fn latest(&self, family: &str, token: &str) -> Resp {
        self.get(&format!("/v2/families/{family}/latest"), token)
            .await
    }

    async fn latest_version(&self, family: &str, token: &str) -> String {
        self.latest(family, token).await.expect(StatusCode::OK)["version"]
            .as_str()
            .unwrap()
            .to_string()
    }

    async fn link(&self, child: &str, parent: &str, token: &str) -> Resp {
        self.post(
            &format!("/v2/images/{child}/lineage"),
            token,
            json!({"parent_id": parent, "relation": "clone"}),
        )
        .await
    }

    async fn download(&self, id: &str, token: &str) -> Vec<u8> {
        let r = self.get(&format!("/v2/images/{id}/file"), token).await;
        assert_eq!(r.status, StatusCode::OK);
        r.body.to_vec()
    }
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

#[tokio::test]
async fn a_family_resolves_to_its_newest_eligible_version_in_semver_order() {
    let t = setup().await;
    for v in [
        "1.0.0",
        "1.10.0",
        "1.9.0",
        "1.10.0-rc.1",
        "1.10.0-beta.11",
        "1.10.0-beta.2",
    ] {
        t.version(ADMIN, "web", v).await;
    }
    // 1.10.0 beats 1.9.0 numerically and its own pre-releases.
    assert_eq!(t.latest_version("web", ADMIN).await, "1.10.0");
    let list = t
        .get("/v2/families/web/images", ADMIN)
        .await
        .expect(StatusCode::OK);
    let order: Vec<&str> = list["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["version"].as_str().unwrap())
        .collect();
    assert_eq!(
        order,
        [
            "1.10.0",
            "1.10.0-rc.1",
            "1.10.0-beta.11",
            "1.10.0-beta.2",
            "1.9.0",
            "1.0.0"
        ]
    );
    assert_eq!(list["latest"], list["images"][0]["id"]);

    // A newer pre-release is the latest until excluded; a newer queued image never is.
    let rc = t.version(ADMIN, "web", "2.0.0-rc.1").await;
    assert_eq!(t.latest_version("web", ADMIN).await, "2.0.0-rc.1");
    t.patch(
        &rc,
        ADMIN,
        json!([{"op": "add", "path": "/exclude_from_latest", "value": "true"}]),
    )
    .await
    .expect(StatusCode::OK);
    t.create(
        ADMIN,
        json!({"name": "web-3", "family": "web", "version": "3.0.0"}),
    )
    .await;
    assert_eq!(t.latest_version("web", ADMIN).await, "1.10.0");

    // Deactivated and deprecated images are skipped too.
    let newest = t
        .get("/v2/families/web/latest", ADMIN)
        .await
        .expect(StatusCode::OK)["id"]
        .as_str()
        .unwrap()
        .to_string();
    let mut rec = t.reg.app.catalog.get_image(&newest).await.unwrap().unwrap();
    rec.properties
        .insert("vmi_lifecycle_state".into(), "deprecated".into());
    assert!(t
        .reg
        .app
        .catalog
        .update_image(&rec, rec.status)
        .await
        .unwrap());
    assert_eq!(t.latest_version("web", ADMIN).await, "1.10.0-rc.1");
    let rc1 = t
        .get("/v2/families/web/latest", ADMIN)
        .await
        .expect(StatusCode::OK)["id"]
        .as_str()
        .unwrap()
        .to_string();
    t.post(
        &format!("/v2/images/{rc1}/actions/deactivate"),
        ADMIN,
        json!({}),
    )
    .await
    .expect(StatusCode::NO_CONTENT);
    assert_eq!(t.latest_version("web", ADMIN).await, "1.10.0-beta.11");

    // Calendar versions: both spellings, ordered by day.
    for v in ["2024.01.15", "20240301", "2023.12.31"] {
        t.version(ADMIN, "nightly", v).await;
    }
    assert_eq!(t.latest_version("nightly", ADMIN).await, "20240301");
    let fams = t.get("/v2/families", ADMIN).await.expect(StatusCode::OK);
    let names: Vec<(&str, &str)> = fams["families"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            (
                f["name"].as_str().unwrap(),
                f["latest"]["version"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(names, [("nightly", "20240301"), ("web", "1.10.0-beta.11")]);
    assert!(fams.get("next").is_none(), "{fams}");
    // Pages: one family each, linked by `next` until the last (empty) page.
    let mut seen = Vec::new();
    let mut uri = "/v2/families?limit=1".to_string();
    for _ in 0..4 {
        let page = t.get(&uri, ADMIN).await.expect(StatusCode::OK);
        for f in page["families"].as_array().unwrap() {
            seen.push(f["name"].as_str().unwrap().to_string());
        }
        match page["next"].as_str() {
            Some(n) => uri = n.to_string(),
            None => break,
        }
    }
    assert_eq!(seen, ["nightly", "web"]);
    for bad in ["limit=0", "limit=1001", "marker=nightly", "marker=Bad/x"] {
        t.get(&format!("/v2/families?{bad}"), ADMIN)
            .await
            .expect(StatusCode::BAD_REQUEST);
    }
    t.latest("nope", ADMIN).await.expect(StatusCode::NOT_FOUND);
    t.latest("Bad%20Name", ADMIN)
        .await
        .expect(StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn families_follow_image_visibility_and_owner_resolution() {
    let t = setup().await;
    let (pa, alice) = t.user("alpha", "alice", "member").await;
    let (_, bob) = t.user("beta", "bob", "member").await;
    let (_, carol) = t.user("gamma", "carol", "member").await;
    // Alpha's private family is invisible to beta.
    let a1 = t
        .active(
            &alice,
            json!({"family": "base", "version": "1.0.0", "visibility": "private"}),
            pattern(512, 1),
        )
        .await;
    assert_eq!(t.latest_version("base", &alice).await, "1.0.0");
    t.latest("base", &bob).await.expect(StatusCode::NOT_FOUND);
    t.get(&format!("/v2/families/base/images?owner={pa}"), &bob)
        .await
        .expect(StatusCode::NOT_FOUND);
    let fams = t.get("/v2/families", &bob).await.expect(StatusCode::OK);
    assert_eq!(fams["families"], json!([]));

    // Once public, beta resolves it through the public fallback.
    t.patch(
        &a1,
        ADMIN,
        json!([{"op": "replace", "path": "/visibility", "value": "public"}]),
    )
    .await
    .expect(StatusCode::OK);
    assert_eq!(t.latest_version("base", &bob).await, "1.0.0");
    // Beta's own family of the same name wins over the public one.
    t.version(&bob, "base", "0.1.0").await;
    assert_eq!(t.latest_version("base", &bob).await, "0.1.0");
    let r = t
        .get(&format!("/v2/families/base/latest?owner={pa}"), &bob)
        .await
        .expect(StatusCode::OK);
    assert_eq!(r["id"], json!(a1));
    // Two public publishers of one name: the caller must choose.
    let b2 = t.version(&bob, "base", "0.2.0").await;
    t.patch(
        &b2,
        ADMIN,
        json!([{"op": "replace", "path": "/visibility", "value": "public"}]),
    )
    .await
    .expect(StatusCode::OK);
    t.latest("base", &carol).await.expect(StatusCode::CONFLICT);
    let r = t
        .get(&format!("/v2/families/base/latest?owner={pa}"), &carol)
        .await
        .expect(StatusCode::OK);
    assert_eq!(r["id"], json!(a1));
    let fams = t.get("/v2/families", &carol).await.expect(StatusCode::OK);
    assert_eq!(fams["families"].as_array().unwrap().len(), 2);
    // Beta's private 0.1.0 is not visible to gamma, so beta's latest for gamma is 0.2.0.
    let fams = t.get("/v2/families", &carol).await.expect(StatusCode::OK);
    let beta = fams["families"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["latest"]["id"] == json!(b2));
    assert!(beta.is_some(), "{fams}");
}

/// The catalog itself refuses a second image with an owner's family version, so requests that
/// pass the API's check at the same moment (on one node or several) cannot both store it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_database_keeps_versions_unique_under_concurrent_creates() {
    use vmi_registry::model::{ImageRecord, Status};
    let t = Arc::new(setup().await);
    let tasks: Vec<_> = (0..8)
        .map(|i| {
            let t = t.clone();
            // Equal versions spelled two ways.
            let v = if i % 2 == 0 { "2024.06.01" } else { "20240601" };
            tokio::spawn(async move {
                t.post("/v2/images", ADMIN, json!({"family": "race", "version": v}))
                    .await
                    .status
            })
        })
        .collect();
    let mut created = 0;
    for task in tasks {
        match task.await.unwrap() {
            StatusCode::CREATED => created += 1,
            StatusCode::CONFLICT => {}
            other => panic!("unexpected {other}"),
        }
    }
    assert_eq!(created, 1);

    // Below the API: the catalog refuses the duplicate and writes nothing of it.
    let catalog = &t.reg.app.catalog;
    let owner = catalog
        .list_images(&vmi_registry::catalog::ImageQuery::new(
            vmi_registry::catalog::Viewer::Admin,
        ))
        .await
        .unwrap()
        .into_iter()
        .find(|i| i.properties.get("family").map(String::as_str) == Some("race"))
        .unwrap()
        .owner;
    let mut dup = ImageRecord::new("dup-1".into(), owner.clone(), "2026-01-01T00:00:00Z".into());
    dup.properties.insert("family".into(), "race".into());
    dup.properties.insert("version".into(), "2024.6.1".into());
    let e = catalog.create_image(&dup).await.unwrap_err();
    assert!(e.to_string().contains("already exists"), "{e}");
    assert!(catalog.get_image("dup-1").await.unwrap().is_none());
    // An update onto a taken version is refused as a whole.
    let mut other = dup.clone();
    other.id = "dup-2".into();
    other.properties.insert("version".into(), "1.0.0".into());
    catalog.create_image(&other).await.unwrap();
    let mut moved = catalog.get_image("dup-2").await.unwrap().unwrap();
    moved.properties.insert("version".into(), "20240601".into());
    moved.name = Some("renamed".into());
    assert!(catalog.update_image(&moved, Status::Queued).await.is_err());
    let kept = catalog.get_image("dup-2").await.unwrap().unwrap();
    assert_eq!(kept.properties["version"], "1.0.0");
    assert_eq!(kept.name, None);
    // Deleting the holder frees the version.
    let holder = catalog
        .list_images(&vmi_registry::catalog::ImageQuery::new(
            vmi_registry::catalog::Viewer::Admin,
        ))
        .await
        .unwrap()
        .into_iter()
        .find(|i| {
            i.properties.get("version").map(String::as_str) != Some("1.0.0")
                && i.properties.get("family").map(String::as_str) == Some("race")
        })
        .unwrap();
    t.req(
        Method::DELETE,
        &format!("/v2/images/{}", holder.id),
        ADMIN,
        None,
        Body::empty(),
    )
    .await
    .expect(StatusCode::NO_CONTENT);
    assert!(catalog.update_image(&moved, Status::Queued).await.unwrap());
}

#[tokio::test]
async fn versions_are_validated_unique_per_family_and_frozen_once_the_image_has_data() {
    let t = setup().await;
    let (_, bob) = t.user("beta", "bob", "member").await;
    let a = t.version(ADMIN, "os", "1.2.3").await;
    // The same version (build metadata does not count) is a conflict in the same project…
    for v in ["1.2.3", "1.2.3+build.7"] {
        t.post("/v2/images", ADMIN, json!({"family": "os", "version": v}))
            .await
            .expect(StatusCode::CONFLICT);
    }
    // …but not in another project, or another family.
    t.post(
        "/v2/images",
        &bob,
        json!({"family": "os", "version": "1.2.3"}),
    )
    .await
    .expect(StatusCode::CREATED);
    t.post(
        "/v2/images",
        ADMIN,
        json!({"family": "os2", "version": "1.2.3"}),
    )
    .await
    .expect(StatusCode::CREATED);
    // A queued image may move to a taken version only if it is free.
    let q = t
        .create(ADMIN, json!({"family": "os", "version": "1.3.0"}))
        .await;
    t.patch(
        &q,
        ADMIN,
        json!([{"op": "replace", "path": "/version", "value": "1.2.3"}]),
    )
    .await
    .expect(StatusCode::CONFLICT);
    t.patch(
        &q,
        ADMIN,
        json!([{"op": "replace", "path": "/version", "value": "1.4.0"}]),
    )
    .await
    .expect(StatusCode::OK);
    // Malformed values.
    for body in [
        json!({"family": "Web", "version": "1.0.0"}),
        json!({"family": "web", "version": "1.0"}),
        json!({"family": "web", "version": "01.0.0"}),
        json!({"family": "web", "version": "2023.02.30"}),
        json!({"version": "1.0.0"}),
        json!({"family": "web", "exclude_from_latest": "yes"}),
        json!({"family": &"x".repeat(64)}),
    ] {
        t.post("/v2/images", ADMIN, body.clone())
            .await
            .expect(StatusCode::BAD_REQUEST);
    }
    // Active: family and version are frozen; other properties are not.
    for (path, value) in [("/version", "1.2.4"), ("/family", "other")] {
        t.patch(
            &a,
            ADMIN,
            json!([{"op": "replace", "path": path, "value": value}]),
        )
        .await
        .expect(StatusCode::FORBIDDEN);
    }
    t.patch(&a, ADMIN, json!([{"op": "remove", "path": "/version"}]))
        .await
        .expect(StatusCode::FORBIDDEN);
    t.patch(
        &a,
        ADMIN,
        json!([{"op": "add", "path": "/os_distro", "value": "debian"}]),
    )
    .await
    .expect(StatusCode::OK);
    // A deleted image frees its version.
    t.req(
        Method::DELETE,
        &format!("/v2/images/{a}"),
        ADMIN,
        None,
        Body::empty(),
    )
    .await
    .expect(StatusCode::NO_CONTENT);
    t.post(
        "/v2/images",
        ADMIN,
        json!({"family": "os", "version": "1.2.3"}),
    )
    .await
    .expect(StatusCode::CREATED);
}

#[tokio::test]
async fn the_data_of_an_active_or_deactivated_image_never_changes() {
    let t = setup().await;
    let data = pattern(8192, 9);
    let id = t
        .active(ADMIN, json!({"name": "frozen"}), data.clone())
        .await;
    t.upload(&id, ADMIN, pattern(8192, 10))
        .await
        .expect(StatusCode::CONFLICT);
    t.post(&format!("/v2/images/{id}/uploads"), ADMIN, json!({}))
        .await
        .expect(StatusCode::CONFLICT);
    t.post(
        &format!("/v2/images/{id}/actions/deactivate"),
        ADMIN,
        json!({}),
    )
    .await
    .expect(StatusCode::NO_CONTENT);
    t.upload(&id, ADMIN, pattern(8192, 10))
        .await
        .expect(StatusCode::CONFLICT);
    t.post(&format!("/v2/images/{id}/uploads"), ADMIN, json!({}))
        .await
        .expect(StatusCode::CONFLICT);
    t.post(
        &format!("/v2/images/{id}/actions/reactivate"),
        ADMIN,
        json!({}),
    )
    .await
    .expect(StatusCode::NO_CONTENT);

    // A session finished once cannot append to or re-finish the active image.
    let s = t
        .create(
            ADMIN,
            json!({"name": "resumable", "disk_format": "raw", "container_format": "bare"}),
        )
        .await;
    let r = t
        .reg
        .router()
        .oneshot(
            Request::post(format!("/v2/images/{s}/uploads"))
                .header("x-auth-token", ADMIN)
                .body(Body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    let loc = r.headers()["location"].to_str().unwrap().to_string();
    let chunk = |body: Vec<u8>, offset: &str| {
        Request::patch(loc.clone())
            .header("x-auth-token", ADMIN)
            .header("upload-offset", offset.to_string())
            .body(Body::from(body))
            .unwrap()
    };
    let r = t
        .reg
        .router()
        .oneshot(chunk(data.clone(), "0"))
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    // While saving, a direct upload is refused as well.
    t.upload(&s, ADMIN, pattern(16, 1))
        .await
        .expect(StatusCode::CONFLICT);
    use sha2::Digest;
    let digest = hex::encode(sha2::Sha256::digest(&data));
    t.req(
        Method::PUT,
        &format!("{loc}?digest=sha256:{digest}"),
        ADMIN,
        None,
        Body::empty(),
    )
    .await
    .expect(StatusCode::NO_CONTENT);
    let r = t
        .reg
        .router()
        .oneshot(chunk(pattern(16, 2), "8192"))
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    t.req(
        Method::PUT,
        &format!("{loc}?digest=sha256:{digest}"),
        ADMIN,
        None,
        Body::empty(),
    )
    .await
    .expect(StatusCode::NOT_FOUND);
    assert_eq!(t.download(&s, ADMIN).await, data);
    assert_eq!(t.download(&id, ADMIN).await, data);
}

#[tokio::test]
async fn lineage_walks_are_depth_limited_and_never_show_hidden_ancestors() {
    let t = setup().await;
    // A chain of 20 images: c0 <- c1 <- … <- c19.
    let mut chain: Vec<String> = Vec::new();
    for n in 0..20u8 {
        let id = t
            .active(ADMIN, json!({"name": format!("c{n}")}), pattern(256, n))
            .await;
        if let Some(parent) = chain.last() {
            t.link(&id, parent, ADMIN).await.expect(StatusCode::CREATED);
        }
        chain.push(id);
    }
    let last = chain.last().unwrap().clone();
    let v = t
        .get(&format!("/v2/images/{last}/lineage"), ADMIN)
        .await
        .expect(StatusCode::OK);
    let ids: Vec<&str> = v["ancestors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["id"].as_str().unwrap())
        .collect();
    let expected: Vec<&str> = chain
        .iter()
        .rev()
        .skip(1)
        .take(16)
        .map(String::as_str)
        .collect();
    assert_eq!(ids, expected);
    assert_eq!(v["more_ancestors"], json!(true));
    assert_eq!(v["lineage"]["relation"], "clone");
    let parent = t
        .get(&format!("/v2/images/{}", chain[18]), ADMIN)
        .await
        .expect(StatusCode::OK);
    assert_eq!(
        v["lineage"]["parent_os_hash_value"],
        parent["os_hash_value"]
    );
    let v = t
        .get(&format!("/v2/images/{last}/lineage?depth=64"), ADMIN)
        .await
        .expect(StatusCode::OK);
    assert_eq!(v["ancestors"].as_array().unwrap().len(), 19);
    assert_eq!(v["more_ancestors"], json!(false));
    for bad in ["65", "-1", "x"] {
        t.get(&format!("/v2/images/{last}/lineage?depth={bad}"), ADMIN)
            .await
            .expect(StatusCode::BAD_REQUEST);
    }
    // The link shows as reserved properties, which clients cannot set.
    let img = t
        .get(&format!("/v2/images/{last}"), ADMIN)
        .await
        .expect(StatusCode::OK);
    assert_eq!(img["vmi_parent_id"], json!(chain[18]));
    assert_eq!(img["vmi_derivation"], "clone");
    t.patch(
        &last,
        ADMIN,
        json!([{"op": "replace", "path": "/vmi_parent_id", "value": chain[0]}]),
    )
    .await
    .expect(StatusCode::FORBIDDEN);
    t.patch(
        &last,
        ADMIN,
        json!([{"op": "remove", "path": "/vmi_derivation"}]),
    )
    .await
    .expect(StatusCode::FORBIDDEN);
    t.post("/v2/images", ADMIN, json!({"vmi_parent_id": chain[0]}))
        .await
        .expect(StatusCode::FORBIDDEN);

    // Hidden ancestors: beta derives from alpha's public image, which alpha later hides.
    let (pa, alice) = t.user("alpha", "alice", "member").await;
    let (_, bob) = t.user("beta", "bob", "member").await;
    let root = t
        .active(
            &alice,
            json!({"name": "root", "visibility": "private"}),
            pattern(64, 1),
        )
        .await;
    let mid = t
        .active(
            &alice,
            json!({"name": "mid", "visibility": "private"}),
            pattern(64, 2),
        )
        .await;
    t.link(&mid, &root, &alice)
        .await
        .expect(StatusCode::CREATED);
    // Not visible: bob cannot link to it.
    let kid = t
        .active(
            &bob,
            json!({"name": "kid", "visibility": "private"}),
            pattern(64, 3),
        )
        .await;
    t.link(&kid, &mid, &bob).await.expect(StatusCode::NOT_FOUND);
    t.patch(
        &mid,
        ADMIN,
        json!([{"op": "replace", "path": "/visibility", "value": "public"}]),
    )
    .await
    .expect(StatusCode::OK);
    t.link(&kid, &mid, &bob).await.expect(StatusCode::CREATED);
    let v = t
        .get(&format!("/v2/images/{kid}/lineage"), &bob)
        .await
        .expect(StatusCode::OK);
    assert_eq!(v["ancestors"][0]["name"], "mid");
    assert_eq!(v["ancestors"][1], json!({"id": root, "visible": false}));
    assert_eq!(v["ancestors"].as_array().unwrap().len(), 2);
    // The visible ancestor's own link does not reveal the hidden parent's digests.
    assert_eq!(
        v["ancestors"][0]["lineage"]["parent_os_hash_value"],
        Value::Null
    );
    t.patch(
        &mid,
        ADMIN,
        json!([{"op": "replace", "path": "/visibility", "value": "private"}]),
    )
    .await
    .expect(StatusCode::OK);
    let v = t
        .get(&format!("/v2/images/{kid}/lineage"), &bob)
        .await
        .expect(StatusCode::OK);
    assert_eq!(v["ancestors"], json!([{"id": mid, "visible": false}]));
    assert_eq!(v["lineage"]["parent_sha256"], Value::Null);
    assert_eq!(v["lineage"]["parent_os_hash_value"], Value::Null);
    // Alice sees mid's children only if she may see them: bob's private kid is not listed.
    let v = t
        .get(&format!("/v2/images/{mid}/lineage"), &alice)
        .await
        .expect(StatusCode::OK);
    assert_eq!(v["children"], json!([]));
    let v = t
        .get(&format!("/v2/images/{mid}/lineage"), ADMIN)
        .await
        .expect(StatusCode::OK);
    assert_eq!(v["children"][0]["id"], json!(kid));
    // Strangers do not learn that an image exists.
    t.get(&format!("/v2/images/{root}/lineage"), &bob)
        .await
        .expect(StatusCode::NOT_FOUND);
    let _ = pa;
}

#[tokio::test]
async fn lineage_records_are_written_once_children_page_and_cycles_are_refused() {
    let t = setup().await;
    let (_, alice) = t.user("alpha", "alice", "member").await;
    let a = t.active(&alice, json!({"name": "a"}), pattern(64, 1)).await;
    let b = t.active(&alice, json!({"name": "b"}), pattern(64, 2)).await;
    let c = t.active(&alice, json!({"name": "c"}), pattern(64, 3)).await;
    t.link(&b, &a, &alice).await.expect(StatusCode::CREATED);
    t.link(&c, &b, &alice).await.expect(StatusCode::CREATED);
    // a <- b <- c: making c the parent of a would close a cycle, as would a self link.
    t.link(&a, &c, &alice).await.expect(StatusCode::CONFLICT);
    t.link(&a, &a, &alice).await.expect(StatusCode::CONFLICT);
    // An active image's link is not rewritten, except by an administrator (cycle-checked too).
    t.link(&c, &a, &alice).await.expect(StatusCode::CONFLICT);
    t.link(&b, &c, ADMIN).await.expect(StatusCode::CONFLICT);
    t.link(&c, &a, ADMIN).await.expect(StatusCode::CREATED);
    // A queued image's link may be rewritten by its owner.
    let q = t.create(&alice, json!({"name": "q"})).await;
    t.link(&q, &a, &alice).await.expect(StatusCode::CREATED);
    t.link(&q, &b, &alice).await.expect(StatusCode::CREATED);
    // The parent must have data; relations and build records are checked.
    let empty = t.create(&alice, json!({"name": "empty"})).await;
    t.link(&q, &empty, &alice)
        .await
        .expect(StatusCode::CONFLICT);
    let url = format!("/v2/images/{q}/lineage");
    t.post(&url, &alice, json!({"parent_id": a, "relation": "fork"}))
        .await
        .expect(StatusCode::BAD_REQUEST);
    t.post(
        &url,
        &alice,
        json!({"parent_id": a, "relation": "snapshot", "build": "x"}),
    )
    .await
    .expect(StatusCode::BAD_REQUEST);
    t.post(
        &url,
        &alice,
        json!({"parent_id": a, "relation": "snapshot", "build": {"spec": "x".repeat(20_000)}}),
    )
    .await
    .expect(StatusCode::PAYLOAD_TOO_LARGE);
    let r = t
        .post(
            &url,
            &alice,
            json!({"parent_id": a, "relation": "rebuild",
                   "build": {"tool": "packer 1.11", "source": {"template": "web.pkr.hcl"}}}),
        )
        .await
        .expect(StatusCode::CREATED);
    assert_eq!(r["build"]["tool"], "packer 1.11");
    // Two concurrent links that would close a cycle between them: exactly one wins.
    let x = t.active(&alice, json!({"name": "x"}), pattern(64, 4)).await;
    let y = t.active(&alice, json!({"name": "y"}), pattern(64, 5)).await;
    let (r1, r2) = tokio::join!(t.link(&x, &y, &alice), t.link(&y, &x, &alice));
    let mut got = [r1.status, r2.status];
    got.sort();
    assert_eq!(got, [StatusCode::CREATED, StatusCode::CONFLICT]);
    // Another project's member may not record lineage of alice's image.
    let (_, bob) = t.user("beta", "bob", "member").await;
    t.link(&q, &a, &bob).await.expect(StatusCode::NOT_FOUND);

    // Children of a: b, c and q (after the rewrites), in pages of two.
    let mut seen = Vec::new();
    let mut next = Some(format!("/v2/images/{a}/lineage?limit=2"));
    while let Some(u) = next {
        let v = t.get(&u, &alice).await.expect(StatusCode::OK);
        assert!(v["children"].as_array().unwrap().len() <= 2);
        seen.extend(
            v["children"]
                .as_array()
                .unwrap()
                .iter()
                .map(|c| c["id"].as_str().unwrap().to_string()),
        );
        next = v["next"].as_str().map(str::to_string);
    }
    let mut want = vec![b.clone(), c.clone(), q.clone()];
    want.sort();
    assert_eq!(seen, want);
    // Glance clients find children by property too.
    let v = t
        .get(&format!("/v2/images?vmi_parent_id={a}"), &alice)
        .await
        .expect(StatusCode::OK);
    assert_eq!(v["images"].as_array().unwrap().len(), 3);
}

fn qemu_qcow2(dir: &Path) -> Option<Vec<u8>> {
    let raw = dir.join("t.raw");
    std::fs::write(&raw, pattern(1 << 20, 7)).ok()?;
    let out = dir.join("t.qcow2");
    let ok = std::process::Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "qcow2"])
        .arg(&raw)
        .arg(&out)
        .status()
        .ok()?
        .success();
    if ok {
        std::fs::read(out).ok()
    } else {
        None
    }
}

#[tokio::test]
async fn deriving_from_a_template_shares_its_data_and_records_the_lineage() {
    let t = setup().await;
    let scratch = tempfile::tempdir().unwrap();
    let (data, fmt) = match qemu_qcow2(scratch.path()) {
        Some(q) => (q, "qcow2"),
        None => (pattern(1 << 20, 7), "raw"),
    };
    // template=true is refused before the image is active.
    t.post(
        "/v2/images",
        ADMIN,
        json!({"name": "golden", "disk_format": fmt, "template": "true"}),
    )
    .await
    .expect(StatusCode::FORBIDDEN);
    let tpl = t
        .create(
            ADMIN,
            json!({"name": "golden", "disk_format": fmt, "container_format": "bare",
                   "visibility": "public", "family": "golden", "version": "1.0.0",
                   "os_distro": "debian", "min_ram": 512}),
        )
        .await;
    t.patch(
        &tpl,
        ADMIN,
        json!([{"op": "add", "path": "/template", "value": "true"}]),
    )
    .await
    .expect(StatusCode::FORBIDDEN);
    t.upload(&tpl, ADMIN, data.clone())
        .await
        .expect(StatusCode::NO_CONTENT);
    let (_, bob) = t.user("beta", "bob", "member").await;
    // Not a template yet.
    t.post(
        &format!("/v2/images/{tpl}/actions/derive"),
        &bob,
        json!({"name": "web"}),
    )
    .await
    .expect(StatusCode::CONFLICT);
    // Only the owner (or an admin) marks it a template.
    t.patch(
        &tpl,
        &bob,
        json!([{"op": "add", "path": "/template", "value": "true"}]),
    )
    .await
    .expect(StatusCode::FORBIDDEN);
    t.patch(
        &tpl,
        ADMIN,
        json!([{"op": "add", "path": "/template", "value": "true"}]),
    )
    .await
    .expect(StatusCode::OK);
    let d = t
        .post(
            &format!("/v2/images/{tpl}/actions/derive"),
            &bob,
            json!({"name": "web", "family": "web", "version": "2024.06.01",
                   "properties": {"purpose": "frontend"}}),
        )
        .await
        .expect(StatusCode::CREATED);
    let did = d["id"].as_str().unwrap().to_string();
    let template = t
        .get(&format!("/v2/images/{tpl}"), ADMIN)
        .await
        .expect(StatusCode::OK);
    assert_eq!(d["status"], "active");
    assert_eq!(d["disk_format"], fmt);
    assert_eq!(d["min_ram"], 512);
    assert_eq!(d["os_distro"], "debian");
    assert_eq!(d["purpose"], "frontend");
    assert_eq!(d["family"], "web");
    assert_eq!(d["visibility"], "shared");
    assert_eq!(d["template"], Value::Null);
    assert_eq!(d["checksum"], template["checksum"]);
    assert_eq!(d["os_hash_value"], template["os_hash_value"]);
    assert_ne!(d["owner"], template["owner"]);
    assert_eq!(d["vmi_parent_id"], json!(tpl));
    assert_eq!(d["vmi_derivation"], "derive");
    // A Glance client downloads a self-contained copy: the template's exact bytes.
    assert_eq!(t.download(&did, &bob).await, data);
    let v = t
        .get(&format!("/v2/images/{did}/lineage"), &bob)
        .await
        .expect(StatusCode::OK);
    assert_eq!(v["lineage"]["relation"], "derive");
    assert_eq!(
        v["lineage"]["parent_os_hash_value"],
        template["os_hash_value"]
    );
    assert_eq!(v["ancestors"][0]["name"], "golden");
    // Derivation goes through the family rules: the same version again is a conflict, and
    // nothing is left behind.
    let before = t.get("/v2/images", &bob).await.expect(StatusCode::OK);
    t.post(
        &format!("/v2/images/{tpl}/actions/derive"),
        &bob,
        json!({"name": "web", "family": "web", "version": "20240601"}),
    )
    .await
    .expect(StatusCode::CONFLICT);
    let after = t.get("/v2/images", &bob).await.expect(StatusCode::OK);
    assert_eq!(before["images"], after["images"]);
    // Obsolete templates are not derived from.
    let mut rec = t.reg.app.catalog.get_image(&tpl).await.unwrap().unwrap();
    rec.properties
        .insert("vmi_lifecycle_state".into(), "obsolete".into());
    assert!(t
        .reg
        .app
        .catalog
        .update_image(&rec, rec.status)
        .await
        .unwrap());
    t.post(
        &format!("/v2/images/{tpl}/actions/derive"),
        &bob,
        json!({"name": "web2"}),
    )
    .await
    .expect(StatusCode::CONFLICT);

    // No byte was copied: the derived image refers to the template's stored object, which
    // outlives the template and goes with the last image that refers to it.
    let catalog = &t.reg.app.catalog;
    let loc = catalog
        .get_image(&did)
        .await
        .unwrap()
        .unwrap()
        .location
        .unwrap();
    let tpl_rec = catalog.get_image(&tpl).await.unwrap().unwrap();
    assert_eq!(tpl_rec.location.as_deref(), Some(loc.as_str()));
    let store = t.reg.app.data.clone();
    let stored = |loc: String| {
        let store = store.clone();
        async move { store.read(&loc, Some(0..1)).await.is_ok() }
    };
    t.req(
        Method::DELETE,
        &format!("/v2/images/{tpl}"),
        ADMIN,
        None,
        Body::empty(),
    )
    .await
    .expect(StatusCode::NO_CONTENT);
    assert!(
        stored(loc.clone()).await,
        "the template's deletion removed shared data"
    );
    // The reaper keeps what a live image refers to.
    let keep = catalog
        .live_locations()
        .await
        .unwrap()
        .into_iter()
        .collect();
    store.reap(&keep, std::time::Duration::ZERO).await.unwrap();
    assert!(stored(loc.clone()).await, "the reaper removed shared data");
    assert_eq!(t.download(&did, &bob).await, data);
    t.req(
        Method::DELETE,
        &format!("/v2/images/{did}"),
        &bob,
        None,
        Body::empty(),
    )
    .await
    .expect(StatusCode::NO_CONTENT);
    assert!(
        !stored(loc).await,
        "the last image's deletion left its data behind"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_image_client_shows_families_lineage_and_derives() {
    use clap::Parser;
    use vmi_registry::cli::{image_command, ImageArgs};

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        image: ImageArgs,
    }

    let t = setup().await;
    let base = t.version(ADMIN, "base", "1.0.0").await;
    t.version(ADMIN, "base", "1.1.0").await;
    t.patch(
        &base,
        ADMIN,
        json!([{"op": "add", "path": "/template", "value": "true"}]),
    )
    .await
    .expect(StatusCode::OK);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(t.reg.clone().serve(listener, async {
        let _ = stop_rx.await;
    }));
    let run = |line: String| {
        let url = url.clone();
        async move {
            let mut argv = vec!["vmi-image".to_string(), "--url".into(), url];
            argv.extend(line.split_whitespace().map(str::to_string));
            let cli = Cli::try_parse_from(argv).unwrap();
            let env = vec![("VMI_TOKEN".to_string(), ADMIN.to_string())];
            let mut out = Vec::new();
            image_command(&cli.image, &env, &mut out, false)
                .await
                .unwrap();
            String::from_utf8(out).unwrap()
        }
    };
    let out = run("family".into()).await;
    assert!(out.contains("base") && out.contains("1.1.0"), "{out}");
    let out = run("family base".into()).await;
    assert!(out.contains("* 1.1.0") && out.contains("  1.0.0"), "{out}");
    let out = run("--json family base --latest".into()).await;
    assert_eq!(
        serde_json::from_str::<Value>(&out).unwrap()["version"],
        "1.1.0"
    );
    let out = run(format!(
        "--json derive {base} web1 --family web --version 1.0.0 --property purpose=test"
    ))
    .await;
    let derived: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(derived["status"], "active");
    let did = derived["id"].as_str().unwrap().to_string();
    let out = run(format!("lineage {did}")).await;
    assert!(
        out.contains(&format!("{did}: derive of {base}")) && out.contains("base-1.0.0"),
        "{out}"
    );
    let other = t.version(ADMIN, "tools", "0.1.0").await;
    let out = run(format!(
        "lineage {other} --parent {did} --relation snapshot"
    ))
    .await;
    assert!(out.contains(&format!("snapshot of {did}")), "{out}");
    let out = run(format!("lineage {base}")).await;
    assert!(
        out.contains(&did) && out.contains("no recorded parent"),
        "{out}"
    );
    let _ = stop_tx.send(());
    server.await.unwrap().unwrap();
}
