//! Glance wire-compatibility details that Glance's own clients and Tempest depend on: the 2.0
//! JSON-patch form, the `stores` attribute and `/v2/info/stores`, booleans in filters as oslo
//! parses them, and the metadata definitions and tasks APIs.

mod support;

use axum::body::Body;
use axum::http::{Method, StatusCode};
use serde_json::{json, Value};
use support::Resp;
use vmi_registry::{Config, Registry};

const ADMIN_TOKEN: &str = "admin-static-token";
const PATCH_20: &str = "application/openstack-images-v2.0-json-patch";

struct T {
    reg: Registry,
    _dir: tempfile::TempDir,
}

async fn setup_with(f: impl FnOnce(&mut Config, &std::path::Path)) -> T {
    let dir = tempfile::tempdir().unwrap();
    let mut c = Config {
        data_dir: dir.path().to_path_buf(),
        public_url: Some("http://registry.test".into()),
        ..Config::default()
    };
    c.admin.password = Some("adminpw".into());
    c.admin.token = Some(ADMIN_TOKEN.into());
    f(&mut c, dir.path());
    if let Some(db) = support::test_database().await {
        c.database = Some(db);
    }
    let reg = Registry::open(c).await.unwrap();
    reg.bootstrap().await.unwrap();
    T { reg, _dir: dir }
}

async fn setup() -> T {
    setup_with(|_, _| {}).await
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
            Some(ADMIN_TOKEN),
            ctype,
            body.into(),
            extra,
        )
        .await
    }

    async fn get(&self, uri: &str) -> Resp {
        self.req(Method::GET, uri, None, Body::empty(), &[]).await
    }

    async fn send_json(&self, method: Method, uri: &str, v: Value) -> Resp {
        self.req(method, uri, Some("application/json"), v.to_string(), &[])
            .await
    }

    async fn delete(&self, uri: &str) -> Resp {
        self.req(Method::DELETE, uri, None, Body::empty(), &[])
            .await
    }

    async fn create(&self, v: Value) -> String {
        let r = self.send_json(Method::POST, "/v2/images", v).await;
        r.expect(StatusCode::CREATED)["id"]
            .as_str()
            .unwrap()
            .to_string()
    }

    async fn patch_20(&self, id: &str, ops: Value) -> Resp {
        self.req(
            Method::PATCH,
            &format!("/v2/images/{id}"),
            Some(PATCH_20),
            ops.to_string(),
            &[],
        )
        .await
    }

    async fn upload(&self, id: &str, data: Vec<u8>) {
        self.req(
            Method::PUT,
            &format!("/v2/images/{id}/file"),
            Some("application/octet-stream"),
            data,
            &[],
        )
        .await
        .expect(StatusCode::NO_CONTENT);
    }
}

#[tokio::test]
async fn a_2_0_json_patch_replaces_adds_and_removes() {
    let t = setup().await;
    let id = t
        .create(json!({"name": "before", "disk_format": "raw", "container_format": "bare"}))
        .await;
    let v = t
        .patch_20(
            &id,
            json!([{"replace": "/name", "value": "after"},
                   {"add": "/os_distro", "value": "debian"},
                   {"replace": "/protected", "value": true}]),
        )
        .await
        .expect(StatusCode::OK);
    assert_eq!(v["name"], "after");
    assert_eq!(v["os_distro"], "debian");
    assert_eq!(v["protected"], true);
    let v = t
        .patch_20(
            &id,
            json!([{"remove": "/os_distro"}, {"replace": "/protected", "value": false}]),
        )
        .await
        .expect(StatusCode::OK);
    assert!(v.get("os_distro").is_none());
    assert_eq!(v["protected"], false);
    // The 2.1 form is still understood under the 2.0 media type.
    let v = t
        .patch_20(
            &id,
            json!([{"op": "replace", "path": "/name", "value": "again"}]),
        )
        .await
        .expect(StatusCode::OK);
    assert_eq!(v["name"], "again");
}

#[tokio::test]
async fn a_2_0_json_patch_with_two_or_no_operations_is_refused() {
    let t = setup().await;
    let id = t
        .create(json!({"disk_format": "raw", "container_format": "bare"}))
        .await;
    let r = t
        .patch_20(
            &id,
            json!([{"replace": "/name", "add": "/x", "value": "v"}]),
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.text());
    let r = t.patch_20(&id, json!([{"value": "v"}])).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.text());
    let r = t.patch_20(&id, json!([{"replace": 7, "value": "v"}])).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.text());
}

#[tokio::test]
async fn active_images_name_their_stores_and_the_default_store_is_flagged_as_glance_does() {
    let t = setup().await;
    let id = t
        .create(json!({"disk_format": "raw", "container_format": "bare"}))
        .await;
    let v = t
        .get(&format!("/v2/images/{id}"))
        .await
        .expect(StatusCode::OK);
    assert!(v.get("stores").is_none(), "a queued image has no stores");
    t.upload(&id, vec![7u8; 4096]).await;
    let v = t
        .get(&format!("/v2/images/{id}"))
        .await
        .expect(StatusCode::OK);
    let info = t.get("/v2/info/stores").await.expect(StatusCode::OK);
    let default: Vec<&Value> = info["stores"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["default"] == "true")
        .collect();
    assert_eq!(default.len(), 1, "{info}");
    assert_eq!(v["stores"], default[0]["id"]);
}

#[tokio::test]
async fn boolean_filters_are_read_as_oslo_reads_them() {
    let t = setup().await;
    let hidden = t
        .create(json!({"disk_format": "raw", "container_format": "bare", "os_hidden": true}))
        .await;
    let shown = t
        .create(json!({"disk_format": "raw", "container_format": "bare", "protected": true}))
        .await;
    let ids = |v: Value| -> Vec<String> {
        v["images"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["id"].as_str().unwrap().to_string())
            .collect()
    };
    for q in ["True", "TRUE", "true", "1", "yes"] {
        let v = t
            .get(&format!("/v2/images?os_hidden={q}"))
            .await
            .expect(StatusCode::OK);
        assert_eq!(ids(v), vec![hidden.clone()], "os_hidden={q}");
    }
    for q in ["False", "false", "0", "off"] {
        let v = t
            .get(&format!("/v2/images?os_hidden={q}"))
            .await
            .expect(StatusCode::OK);
        assert!(ids(v).contains(&shown), "os_hidden={q}");
    }
    let v = t
        .get("/v2/images?protected=True")
        .await
        .expect(StatusCode::OK);
    assert_eq!(ids(v), vec![shown.clone()]);
    let r = t.get("/v2/images?os_hidden=maybe").await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    let r = t.get("/v2/images?protected=maybe").await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    // Keep the image deletable for the fixtures' cleanup.
    t.delete(&format!("/v2/images/{hidden}")).await;
}

async fn member_token(t: &T, project: &str, user: &str) -> (String, String) {
    let p = t
        .send_json(
            Method::POST,
            "/v3/projects",
            json!({"project": {"name": project}}),
        )
        .await
        .expect(StatusCode::CREATED);
    let pid = p["project"]["id"].as_str().unwrap().to_string();
    let u = t
        .send_json(
            Method::POST,
            "/v3/users",
            json!({"user": {"name": user, "password": "pw", "default_project_id": pid}}),
        )
        .await
        .expect(StatusCode::CREATED);
    let uid = u["user"]["id"].as_str().unwrap().to_string();
    t.req(
        Method::PUT,
        &format!("/v3/projects/{pid}/users/{uid}/roles/member"),
        None,
        Body::empty(),
        &[],
    )
    .await
    .expect(StatusCode::NO_CONTENT);
    let r = support::send(
        &t.reg,
        Method::POST,
        "/v3/auth/tokens",
        None,
        Some("application/json"),
        Body::from(
            json!({"auth": {"identity": {"methods": ["password"],
                "password": {"user": {"name": user, "password": "pw"}}}}})
            .to_string(),
        ),
        &[],
    )
    .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text());
    let tok = r.headers["x-subject-token"].to_str().unwrap().to_string();
    (pid, tok)
}

async fn as_user(t: &T, token: &str, method: Method, uri: &str, body: Option<Value>) -> Resp {
    support::send(
        &t.reg,
        method,
        uri,
        Some(token),
        body.as_ref().map(|_| "application/json"),
        body.map(|b| Body::from(b.to_string()))
            .unwrap_or_else(Body::empty),
        &[],
    )
    .await
}

#[tokio::test]
async fn the_standard_metadata_definitions_are_loaded_once_and_readable_by_members() {
    let t = setup().await;
    let (_, tok) = member_token(&t, "p1", "u1").await;
    let v = as_user(
        &t,
        &tok,
        Method::GET,
        "/v2/metadefs/namespaces?limit=1000",
        None,
    )
    .await
    .expect(StatusCode::OK);
    let names: Vec<&str> = v["namespaces"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["namespace"].as_str().unwrap())
        .collect();
    assert_eq!(names.len(), 33, "{names:?}");
    assert!(names.contains(&"OS::Compute::Watchdog"));
    let w = as_user(
        &t,
        &tok,
        Method::GET,
        "/v2/metadefs/namespaces/OS::Compute::Watchdog",
        None,
    )
    .await
    .expect(StatusCode::OK);
    assert_eq!(w["protected"], true);
    assert_eq!(w["properties"]["watchdog_action"]["type"], "string");
    let rt = t
        .get("/v2/metadefs/resource_types")
        .await
        .expect(StatusCode::OK);
    assert!(rt["resource_types"]
        .as_array()
        .unwrap()
        .iter()
        .any(|r| r["name"] == "OS::Glance::Image"));
    // A second bootstrap (a restart) loads nothing again, and a deleted standard namespace
    // stays deleted.
    t.send_json(
        Method::PUT,
        "/v2/metadefs/namespaces/OS::Compute::Watchdog",
        json!({"namespace": "OS::Compute::Watchdog", "protected": false}),
    )
    .await
    .expect(StatusCode::OK);
    t.delete("/v2/metadefs/namespaces/OS::Compute::Watchdog")
        .await
        .expect(StatusCode::NO_CONTENT);
    t.reg.bootstrap().await.unwrap();
    let r = t.get("/v2/metadefs/namespaces/OS::Compute::Watchdog").await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn metadef_namespaces_follow_glance_visibility_protection_and_admin_rules() {
    let t = setup().await;
    let (_, tok) = member_token(&t, "p1", "u1").await;
    // Members may not create.
    let r = as_user(
        &t,
        &tok,
        Method::POST,
        "/v2/metadefs/namespaces",
        Some(json!({"namespace": "mine"})),
    )
    .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    let v = t
        .send_json(
            Method::POST,
            "/v2/metadefs/namespaces",
            json!({"namespace": "secret", "visibility": "private", "protected": true,
                   "resource_type_associations": [{"name": "OS::Glance::Image", "prefix": "s_"}],
                   "properties": {"size": {"title": "Size", "type": "integer"}},
                   "objects": [{"name": "o1"}], "tags": [{"name": "t1"}]}),
        )
        .await
        .expect(StatusCode::CREATED);
    assert_eq!(v["visibility"], "private");
    let r = t
        .send_json(
            Method::POST,
            "/v2/metadefs/namespaces",
            json!({"namespace": "secret"}),
        )
        .await;
    assert_eq!(r.status, StatusCode::CONFLICT);
    // Private: invisible to another project's member.
    let r = as_user(
        &t,
        &tok,
        Method::GET,
        "/v2/metadefs/namespaces/secret",
        None,
    )
    .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    // Protected: neither it nor its contents can be deleted.
    for uri in [
        "/v2/metadefs/namespaces/secret",
        "/v2/metadefs/namespaces/secret/objects/o1",
        "/v2/metadefs/namespaces/secret/properties/size",
        "/v2/metadefs/namespaces/secret/tags/t1",
        "/v2/metadefs/namespaces/secret/resource_types/OS::Glance::Image",
    ] {
        assert_eq!(t.delete(uri).await.status, StatusCode::FORBIDDEN, "{uri}");
    }
    // ?resource_type= finds a property by its prefixed name.
    let p = t
        .get("/v2/metadefs/namespaces/secret/properties/s_size?resource_type=OS::Glance::Image")
        .await
        .expect(StatusCode::OK);
    assert_eq!(p["type"], "integer");
    let v = t
        .send_json(
            Method::PUT,
            "/v2/metadefs/namespaces/secret",
            json!({"namespace": "secret", "visibility": "public", "protected": false}),
        )
        .await
        .expect(StatusCode::OK);
    assert_eq!(v["protected"], false);
    as_user(
        &t,
        &tok,
        Method::GET,
        "/v2/metadefs/namespaces/secret",
        None,
    )
    .await
    .expect(StatusCode::OK);
    t.delete("/v2/metadefs/namespaces/secret/objects/o1")
        .await
        .expect(StatusCode::NO_CONTENT);
    t.delete("/v2/metadefs/namespaces/secret")
        .await
        .expect(StatusCode::NO_CONTENT);
}

#[tokio::test]
async fn metadef_objects_properties_tags_and_associations_can_be_edited() {
    let t = setup().await;
    t.send_json(
        Method::POST,
        "/v2/metadefs/namespaces",
        json!({"namespace": "ns"}),
    )
    .await
    .expect(StatusCode::CREATED);
    let base = "/v2/metadefs/namespaces/ns";
    let o = t
        .send_json(
            Method::POST,
            &format!("{base}/objects"),
            json!({"name": "obj", "required": ["a"],
                   "properties": {"a": {"title": "A", "type": "string"}}}),
        )
        .await
        .expect(StatusCode::CREATED);
    assert_eq!(o["self"], "/v2/metadefs/namespaces/ns/objects/obj");
    let o = t
        .send_json(
            Method::PUT,
            &format!("{base}/objects/obj"),
            json!({"name": "obj2"}),
        )
        .await
        .expect(StatusCode::OK);
    assert_eq!(o["name"], "obj2");
    assert_eq!(
        t.get(&format!("{base}/objects/obj")).await.status,
        StatusCode::NOT_FOUND
    );
    let p = t
        .send_json(
            Method::POST,
            &format!("{base}/properties"),
            json!({"name": "hypervisor", "title": "Hypervisor", "type": "string",
                   "enum": ["kvm", "xen"]}),
        )
        .await
        .expect(StatusCode::CREATED);
    assert_eq!(p["name"], "hypervisor");
    let r = t
        .send_json(
            Method::POST,
            &format!("{base}/properties"),
            json!({"name": "bad", "title": "Bad", "type": "nonsense"}),
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    let v = t
        .get(&format!("{base}/properties"))
        .await
        .expect(StatusCode::OK);
    assert_eq!(v["properties"]["hypervisor"]["enum"], json!(["kvm", "xen"]));
    t.send_json(
        Method::POST,
        &format!("{base}/tags"),
        json!({"tags": [{"name": "a"}, {"name": "b"}]}),
    )
    .await
    .expect(StatusCode::CREATED);
    t.req(
        Method::POST,
        &format!("{base}/tags/c"),
        None,
        Body::empty(),
        &[],
    )
    .await
    .expect(StatusCode::CREATED);
    let tag = t
        .send_json(Method::PUT, &format!("{base}/tags/c"), json!({"name": "d"}))
        .await
        .expect(StatusCode::OK);
    assert_eq!(tag["name"], "d");
    let v = t.get(&format!("{base}/tags")).await.expect(StatusCode::OK);
    let names: Vec<&str> = v["tags"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["a", "b", "d"]);
    t.delete(&format!("{base}/tags"))
        .await
        .expect(StatusCode::NO_CONTENT);
    let a = t
        .send_json(
            Method::POST,
            &format!("{base}/resource_types"),
            json!({"name": "OS::Nova::Flavor", "prefix": "hw:"}),
        )
        .await
        .expect(StatusCode::CREATED);
    assert_eq!(a["prefix"], "hw:");
    let v = t
        .get(&format!("{base}/resource_types"))
        .await
        .expect(StatusCode::OK);
    assert_eq!(
        v["resource_type_associations"][0]["name"],
        "OS::Nova::Flavor"
    );
    t.delete(&format!("{base}/resource_types/OS::Nova::Flavor"))
        .await
        .expect(StatusCode::NO_CONTENT);
    for s in [
        ("namespace", "namespace"),
        ("namespaces", "namespaces"),
        ("resource_type", "resource_type_association"),
        ("resource_types", "resource_type_associations"),
        ("object", "object"),
        ("objects", "objects"),
        ("property", "property"),
        ("properties", "properties"),
        ("tag", "tag"),
        ("tags", "tags"),
    ] {
        let v = t
            .get(&format!("/v2/schemas/metadefs/{}", s.0))
            .await
            .expect(StatusCode::OK);
        assert_eq!(v["name"], s.1);
    }
}

#[tokio::test]
async fn an_import_request_is_an_image_task_and_a_refused_task_url_is_a_400() {
    let t = setup().await;
    let id = t
        .create(json!({"disk_format": "raw", "container_format": "bare"}))
        .await;
    t.req(
        Method::PUT,
        &format!("/v2/images/{id}/stage"),
        Some("application/octet-stream"),
        vec![3u8; 8192],
        &[],
    )
    .await
    .expect(StatusCode::NO_CONTENT);
    t.send_json(
        Method::POST,
        &format!("/v2/images/{id}/import"),
        json!({"method": {"name": "glance-direct"}}),
    )
    .await
    .expect(StatusCode::ACCEPTED);
    let mut status = String::new();
    for _ in 0..200 {
        let v = t
            .get(&format!("/v2/images/{id}/tasks"))
            .await
            .expect(StatusCode::OK);
        assert_eq!(v["tasks"].as_array().unwrap().len(), 1);
        assert_eq!(v["tasks"][0]["type"], "api_image_import");
        assert_eq!(v["tasks"][0]["image_id"], id.as_str());
        status = v["tasks"][0]["status"].as_str().unwrap().to_string();
        if status == "success" {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(status, "success");
    let v = t.get("/v2/tasks").await.expect(StatusCode::OK);
    let task_id = v["tasks"][0]["id"].as_str().unwrap().to_string();
    let v = t
        .get(&format!("/v2/tasks/{task_id}"))
        .await
        .expect(StatusCode::OK);
    assert_eq!(v["result"]["image_id"], id.as_str());
    // The deprecated import task: a URL outside the import filter is refused at once.
    let r = t
        .send_json(
            Method::POST,
            "/v2/tasks",
            json!({"type": "import", "input": {"import_from": "http://nowhere.invalid:9/x.qcow2",
                   "import_from_format": "qcow2",
                   "image_properties": {"disk_format": "qcow2", "container_format": "bare"}}}),
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.text());
    let r = t
        .send_json(
            Method::POST,
            "/v2/tasks",
            json!({"type": "export", "input": {}}),
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    // Tasks are an admin API.
    let (_, tok) = member_token(&t, "p1", "u1").await;
    let r = as_user(&t, &tok, Method::GET, "/v2/tasks", None).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
}

#[tokio::test]
async fn copy_image_of_an_active_image_succeeds_with_nothing_left_to_copy() {
    let t = setup().await;
    let id = t
        .create(json!({"disk_format": "raw", "container_format": "bare"}))
        .await;
    t.upload(&id, vec![5u8; 4096]).await;
    t.send_json(
        Method::POST,
        &format!("/v2/images/{id}/import"),
        json!({"method": {"name": "copy-image"}, "all_stores": true,
               "all_stores_must_succeed": false}),
    )
    .await
    .expect(StatusCode::ACCEPTED);
    let v = t
        .get(&format!("/v2/images/{id}"))
        .await
        .expect(StatusCode::OK);
    assert_eq!(v["os_glance_importing_to_stores"], "");
    assert_eq!(v["os_glance_failed_import"], "");
    assert_eq!(v["status"], "active");
    // Only admins copy.
    let (pid, tok) = member_token(&t, "p1", "u1").await;
    let own = as_user(
        &t,
        &tok,
        Method::POST,
        "/v2/images",
        Some(json!({"disk_format": "raw", "container_format": "bare"})),
    )
    .await
    .expect(StatusCode::CREATED);
    assert_eq!(own["owner"], pid.as_str());
    let r = as_user(
        &t,
        &tok,
        Method::POST,
        &format!("/v2/images/{}/import", own["id"].as_str().unwrap()),
        Some(json!({"method": {"name": "copy-image"}})),
    )
    .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
}

#[tokio::test]
async fn keystone_lookups_assignments_and_role_removal_work_as_the_openstack_cli_uses_them() {
    let t = setup().await;
    let (pid, _) = member_token(&t, "p1", "u1").await;
    let v = t.get("/v3/projects?name=p1").await.expect(StatusCode::OK);
    assert_eq!(v["projects"].as_array().unwrap().len(), 1);
    assert_eq!(v["projects"][0]["id"], pid.as_str());
    let v = t.get("/v3/users?name=u1").await.expect(StatusCode::OK);
    let uid = v["users"][0]["id"].as_str().unwrap().to_string();
    assert!(v["users"][0].get("password").is_none());
    t.get(&format!("/v3/users/{uid}"))
        .await
        .expect(StatusCode::OK);
    t.get(&format!("/v3/projects/{pid}"))
        .await
        .expect(StatusCode::OK);
    assert_eq!(t.get("/v3/users/u1").await.status, StatusCode::NOT_FOUND);
    let v = t.get("/v3/roles/member").await.expect(StatusCode::OK);
    assert_eq!(v["role"]["name"], "member");
    let v = t.get("/v3/roles?name=reader").await.expect(StatusCode::OK);
    assert_eq!(v["roles"].as_array().unwrap().len(), 1);
    t.get("/v3/domains/default").await.expect(StatusCode::OK);
    let v = t
        .get(&format!(
            "/v3/role_assignments?scope.project.id={pid}&include_names"
        ))
        .await
        .expect(StatusCode::OK);
    assert_eq!(v["role_assignments"].as_array().unwrap().len(), 1);
    assert_eq!(v["role_assignments"][0]["user"]["name"], "u1");
    assert_eq!(v["role_assignments"][0]["role"]["id"], "member");
    let uri = format!("/v3/projects/{pid}/users/{uid}/roles/member");
    t.delete(&uri).await.expect(StatusCode::NO_CONTENT);
    assert_eq!(t.delete(&uri).await.status, StatusCode::NOT_FOUND);
    let v = t
        .get(&format!("/v3/role_assignments?user.id={uid}"))
        .await
        .expect(StatusCode::OK);
    assert!(v["role_assignments"].as_array().unwrap().is_empty());
    // Without a role, no login.
    let r = support::send(
        &t.reg,
        Method::POST,
        "/v3/auth/tokens",
        None,
        Some("application/json"),
        Body::from(
            json!({"auth": {"identity": {"methods": ["password"],
                "password": {"user": {"name": "u1", "password": "pw"}}}}})
            .to_string(),
        ),
        &[],
    )
    .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
}
