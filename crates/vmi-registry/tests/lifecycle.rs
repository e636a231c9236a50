//! In-process tests of the image lifecycle, the recycle bin, operator policies and the audit
//! log: the router driven with tower's `oneshot` over SQLite and local files in a temporary
//! directory, time moved with a manual clock, and the lifecycle job run one pass at a time.

mod support;

use axum::body::Body;
use axum::http::{Method, StatusCode};
use chrono::{DateTime, Duration, Utc};
use serde_json::{json, Value};
use std::path::Path;
use std::sync::Arc;
use vmi_registry::clock::ManualClock;
use vmi_registry::lifecycle::job::Job;
use vmi_registry::lifecycle::LifecycleState;
use vmi_registry::{Config, Registry};

const ADMIN_TOKEN: &str = "admin-static-token";
const PATCH: &str = "application/openstack-images-v2.1-json-patch";

use support::Resp;

struct T {
    reg: Registry,
    clock: Arc<ManualClock>,
    dir: tempfile::TempDir,
}

fn start() -> DateTime<Utc> {
    DateTime::parse_from_rfc3339("2026-01-01T00:00:00Z")
        .unwrap()
        .with_timezone(&Utc)
}

fn config(dir: &Path) -> Config {
    let mut c = Config {
        data_dir: dir.to_path_buf(),
        public_url: Some("http://registry.test".into()),
        reap_grace_secs: 0,
        ..Config::default()
    };
    c.admin.password = Some("adminpw".into());
    c.admin.token = Some(ADMIN_TOKEN.into());
    c
}

/// The catalog every node of one test shares: SQLite in the data directory, or with the
/// postgres feature and VMI_TEST_POSTGRES_URL (see tests/postgres.sh) a fresh PostgreSQL
/// database.
async fn database() -> Option<String> {
    support::test_database().await
}

async fn open(
    dir: &Path,
    db: &Option<String>,
    clock: &Arc<ManualClock>,
    f: &dyn Fn(&mut Config),
) -> Registry {
    let mut c = config(dir);
    c.database = db.clone();
    f(&mut c);
    let reg = Registry::open(c).await.unwrap().with_clock(clock.clone());
    reg.bootstrap().await.unwrap();
    reg
}

async fn setup_with(f: impl Fn(&mut Config)) -> T {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(start()));
    let reg = open(dir.path(), &database().await, &clock, &f).await;
    T { reg, clock, dir }
}

impl T {
    async fn req(
        &self,
        method: Method,
        uri: &str,
        token: Option<&str>,
        ctype: Option<&str>,
        body: impl Into<Body>,
    ) -> Resp {
        support::send(&self.reg, method, uri, token, ctype, body.into(), &[]).await
    }

    async fn get(&self, uri: &str, token: &str) -> Resp {
        self.req(Method::GET, uri, Some(token), None, Body::empty())
            .await
    }

    async fn post(&self, uri: &str, token: &str, v: Value) -> Resp {
        self.req(
            Method::POST,
            uri,
            Some(token),
            Some("application/json"),
            v.to_string(),
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
        )
        .await
    }

    async fn delete(&self, id: &str, token: &str) -> Resp {
        self.req(
            Method::DELETE,
            &format!("/v2/images/{id}"),
            Some(token),
            None,
            Body::empty(),
        )
        .await
    }

    async fn upload(&self, id: &str, token: &str, data: &[u8]) -> Resp {
        self.req(
            Method::PUT,
            &format!("/v2/images/{id}/file"),
            Some(token),
            Some("application/octet-stream"),
            data.to_vec(),
        )
        .await
    }

    async fn lifecycle(&self, id: &str, token: &str, v: Value) -> Resp {
        self.post(&format!("/v2/images/{id}/actions/lifecycle"), token, v)
            .await
    }

    async fn image(&self, id: &str, token: &str) -> Value {
        let r = self.get(&format!("/v2/images/{id}"), token).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
        r.json()
    }

    /// A new image with `attrs`, uploaded with `data` (raw), active.
    async fn active(&self, token: &str, attrs: Value, data: &[u8]) -> String {
        let mut a = json!({"disk_format": "raw", "container_format": "bare"});
        for (k, v) in attrs.as_object().unwrap() {
            a[k] = v.clone();
        }
        let r = self.post("/v2/images", token, a).await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.text());
        let id = r.json()["id"].as_str().unwrap().to_string();
        let r = self.upload(&id, token, data).await;
        assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.text());
        id
    }

    /// A project and a member user in it; returns (project id, token).
    async fn user(&self, project: &str, user: &str) -> (String, String) {
        let r = self
            .post(
                "/v3/projects",
                ADMIN_TOKEN,
                json!({"project": {"name": project}}),
            )
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.text());
        let pid = r.json()["project"]["id"].as_str().unwrap().to_string();
        let r = self
            .post(
                "/v3/users",
                ADMIN_TOKEN,
                json!({"user": {"name": user, "password": "pw", "default_project_id": pid}}),
            )
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.text());
        let uid = r.json()["user"]["id"].as_str().unwrap().to_string();
        let r = self
            .req(
                Method::PUT,
                &format!("/v3/projects/{pid}/users/{uid}/roles/member"),
                Some(ADMIN_TOKEN),
                None,
                Body::empty(),
            )
            .await;
        assert_eq!(r.status, StatusCode::NO_CONTENT);
        let auth = json!({"auth": {
            "identity": {"methods": ["password"], "password": {"user": {
                "name": user, "domain": {"name": "Default"}, "password": "pw"}}},
            "scope": {"project": {"name": project, "domain": {"name": "Default"}}}}});
        let r = self
            .req(
                Method::POST,
                "/v3/auth/tokens",
                None,
                Some("application/json"),
                auth.to_string(),
            )
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.text());
        let tok = r.headers["x-subject-token"].to_str().unwrap().to_string();
        (pid, tok)
    }

    fn job(&self, node: &str) -> Job {
        Job::new(self.reg.app.clone(), node)
    }

    fn advance(&self, d: Duration) {
        self.clock.advance(d);
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

fn at(d: Duration) -> String {
    (start() + d).format("%Y-%m-%dT%H:%M:%SZ").to_string()
}

#[tokio::test]
async fn scheduled_transitions_follow_the_clock_and_a_second_run_changes_nothing() {
    let t = setup_with(|_| {}).await;
    let (_, tok) = t.user("web", "alice").await;
    let new = t.active(&tok, json!({"name": "web-2"}), b"new").await;
    let old = t.active(&tok, json!({"name": "web-1"}), b"old").await;
    let r = t
        .lifecycle(
            &old,
            &tok,
            json!({"replacement": new, "deprecate_at": at(Duration::days(1)),
                   "obsolete_at": at(Duration::days(10)), "delete_at": at(Duration::days(20))}),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let img = r.json();
    assert_eq!(img["vmi_lifecycle_state"], "active");
    assert_eq!(img["vmi_replacement"], new.as_str());
    assert_eq!(img["vmi_deprecate_at"], "2026-01-02T00:00:00Z");

    let job = t.job("node-a");
    let r = job.run_once().await.unwrap();
    assert!(r.leader && r.transitions.is_empty(), "{r:?}");

    t.advance(Duration::days(1));
    let r = job.run_once().await.unwrap();
    assert_eq!(r.transitions, [(old.clone(), LifecycleState::Deprecated)]);
    let img = t.image(&old, &tok).await;
    assert_eq!(img["vmi_lifecycle_state"], "deprecated");
    assert!(img.get("vmi_deprecate_at").is_none(), "{img}");
    assert_eq!(img["vmi_obsolete_at"], "2026-01-11T00:00:00Z");
    // A second run at the same time finds nothing to do.
    assert!(job.run_once().await.unwrap().transitions.is_empty());

    // Skipping past two dates lands on the furthest state reached.
    t.advance(Duration::days(30));
    let r = job.run_once().await.unwrap();
    assert_eq!(r.transitions, [(old.clone(), LifecycleState::Retired)]);
    let r = t.get(&format!("/v2/images/{old}"), &tok).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert!(job.run_once().await.unwrap().transitions.is_empty());
    // The replacement is untouched, and the job's changes are in the audit log.
    assert_eq!(t.image(&new, &tok).await["status"], "active");
    let log = t
        .get(&format!("/v2/audit?image_id={old}"), ADMIN_TOKEN)
        .await
        .json();
    let actions: Vec<&str> = log["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    assert_eq!(
        &actions[..3],
        [
            "lifecycle.retired",
            "lifecycle.deprecated",
            "image.lifecycle"
        ]
    );
}

/// The lost update of a read-modify-write: a request reads an image, the lifecycle job changes
/// the image's lifecycle properties, then the request stores its change. The request's change
/// is replayed onto the job's (the revision moved on), so both survive; a plain stale write is
/// refused by the catalog.
#[tokio::test]
async fn a_change_stored_from_an_older_read_keeps_what_the_lifecycle_job_wrote_meanwhile() {
    use vmi_registry::catalog::save_changes;
    use vmi_registry::model::Status;
    let t = setup_with(|_| {}).await;
    let (_, tok) = t.user("web", "alice").await;
    let id = t.active(&tok, json!({"name": "web-1"}), b"data").await;
    let r = t
        .lifecycle(&id, &tok, json!({"deprecate_at": at(Duration::days(1))}))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let catalog = t.reg.app.catalog.clone();
    // A request reads the image...
    let base = catalog.get_image(&id).await.unwrap().unwrap();
    // ...the job deprecates it...
    t.advance(Duration::days(1));
    let r = t.job("node-a").run_once().await.unwrap();
    assert_eq!(r.transitions, [(id.clone(), LifecycleState::Deprecated)]);
    // ...and the request stores a new name and a property from what it read.
    let mut ours = base.clone();
    ours.name = Some("web-1-renamed".into());
    ours.properties.insert("purpose".into(), "web".into());
    assert!(
        !catalog.update_image(&ours, Status::Active).await.unwrap(),
        "a write from an older revision must be refused"
    );
    let stored = save_changes(catalog.as_ref(), &base, &ours, Status::Active)
        .await
        .unwrap()
        .expect("stored");
    assert_eq!(stored.name.as_deref(), Some("web-1-renamed"));
    let img = t.image(&id, &tok).await;
    assert_eq!(img["name"], "web-1-renamed");
    assert_eq!(img["purpose"], "web");
    assert_eq!(img["vmi_lifecycle_state"], "deprecated", "{img}");
    assert!(img.get("vmi_deprecate_at").is_none(), "{img}");
    // The stored record's revision is current: one more change from it goes straight in.
    let mut again = stored.clone();
    again.min_ram = 512;
    assert!(catalog.update_image(&again, Status::Active).await.unwrap());
    // A status that moved on is not overwritten: the change is dropped.
    let r = t
        .req(
            Method::POST,
            &format!("/v2/images/{id}/actions/deactivate"),
            Some(&tok),
            None,
            Body::empty(),
        )
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.text());
    let mut late = stored.clone();
    late.name = Some("too-late".into());
    assert!(
        save_changes(catalog.as_ref(), &stored, &late, Status::Active)
            .await
            .unwrap()
            .is_none()
    );
    assert_eq!(t.image(&id, &tok).await["name"], "web-1-renamed");
}

#[tokio::test]
async fn only_one_node_leads_until_its_lease_lapses() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(start()));
    let db = database().await;
    let a = open(dir.path(), &db, &clock, &|_| {}).await;
    let b = open(dir.path(), &db, &clock, &|_| {}).await;
    let (ja, jb) = (Job::new(a.app.clone(), "a"), Job::new(b.app.clone(), "b"));
    assert!(ja.run_once().await.unwrap().leader);
    assert!(!jb.run_once().await.unwrap().leader);
    // The leader renews its lease on every run, so it keeps it.
    clock.advance(Duration::seconds(200));
    assert!(ja.run_once().await.unwrap().leader);
    clock.advance(Duration::seconds(200));
    assert!(!jb.run_once().await.unwrap().leader);
    // A silent leader's lease lapses and the other node takes over.
    clock.advance(Duration::seconds(301));
    assert!(jb.run_once().await.unwrap().leader);
    assert!(!ja.run_once().await.unwrap().leader);
    // A leader that releases its lease lets the other one in at once.
    assert!(jb.release().await.unwrap());
    assert!(ja.run_once().await.unwrap().leader);
}

#[tokio::test]
async fn deprecated_images_download_with_a_warning_and_obsolete_ones_only_for_admins() {
    let t = setup_with(|_| {}).await;
    let (_, tok) = t.user("web", "alice").await;
    let new = t.active(&tok, json!({"name": "new"}), b"new data").await;
    let old = t.active(&tok, json!({"name": "old"}), b"old data").await;
    let file = format!("/v2/images/{old}/file");
    let r = t.get(&file, &tok).await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(r.headers.get("warning").is_none());

    let r = t
        .lifecycle(
            &old,
            &tok,
            json!({"state": "deprecated", "replacement": new}),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let r = t.get(&file, &tok).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(&r.body[..], b"old data");
    assert_eq!(
        r.headers["warning"],
        format!("299 - \"image {old} is deprecated; use {new}\"").as_str()
    );
    // The image's record warns too; an active image's does not.
    let r = t.get(&format!("/v2/images/{old}"), &tok).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(
        r.headers["warning"],
        format!("299 - \"image {old} is deprecated; use {new}\"").as_str()
    );
    let r = t.get(&format!("/v2/images/{new}"), &tok).await;
    assert!(r.headers.get("warning").is_none());

    let r = t.lifecycle(&old, &tok, json!({"state": "obsolete"})).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let r = t.get(&file, &tok).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    assert!(
        r.text().contains(&format!("use its replacement {new}")),
        "{}",
        r.text()
    );
    let r = t.get(&file, ADMIN_TOKEN).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(&r.body[..], b"old data");
}

#[tokio::test]
async fn lifecycle_requests_are_validated_and_its_properties_are_read_only() {
    let t = setup_with(|_| {}).await;
    let (_, tok) = t.user("web", "alice").await;
    let (_, other) = t.user("db", "bob").await;
    let img = t.active(&tok, json!({"name": "a"}), b"a").await;
    let queued = t
        .post("/v2/images", &tok, json!({"name": "q"}))
        .await
        .json()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let private = t
        .active(&other, json!({"name": "p", "visibility": "private"}), b"p")
        .await;

    let r = t
        .lifecycle(
            &img,
            &tok,
            json!({"obsolete_at": "2026-03-01T00:00:00Z", "deprecate_at": "2026-04-01T00:00:00Z"}),
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert!(r.text().contains("must not be later"), "{}", r.text());
    let r = t
        .lifecycle(&img, &tok, json!({"delete_at": "tomorrow"}))
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    let r = t
        .lifecycle(&img, &tok, json!({"replacement": private}))
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert!(r.text().contains("not found"), "{}", r.text());
    let r = t
        .lifecycle(&img, &tok, json!({"replacement": queued}))
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert!(r.text().contains("not active"), "{}", r.text());
    let r = t
        .lifecycle(&queued, &tok, json!({"state": "deprecated"}))
        .await;
    assert_eq!(r.status, StatusCode::CONFLICT);
    // Another project may not change it (it cannot even see it unless shared).
    let r = t
        .lifecycle(&img, &other, json!({"state": "deprecated"}))
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);

    let r = t.lifecycle(&img, &tok, json!({"state": "obsolete"})).await;
    assert_eq!(r.status, StatusCode::OK);
    let r = t
        .lifecycle(&img, &tok, json!({"deprecate_at": "2027-01-01T00:00:00Z"}))
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.text());
    // No going back, except an admin's undeprecate.
    let r = t
        .lifecycle(&img, &tok, json!({"state": "deprecated"}))
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    let r = t.lifecycle(&img, &tok, json!({"state": "active"})).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    let r = t
        .lifecycle(&img, ADMIN_TOKEN, json!({"state": "active"}))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.json()["vmi_lifecycle_state"], "active");

    // The properties are the server's: PATCH and create refuse them with 403.
    let r = t
        .patch(
            &img,
            &tok,
            json!([{"op": "add", "path": "/vmi_lifecycle_state", "value": "active"}]),
        )
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    let r = t
        .patch(
            &img,
            &tok,
            json!([{"op": "remove", "path": "/vmi_lifecycle_state"}]),
        )
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    let r = t
        .post(
            "/v2/images",
            &tok,
            json!({"name": "x", "vmi_replacement": img}),
        )
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);

    // Protected images cannot be retired; others are deleted at once (no recycle bin here).
    let r = t
        .patch(
            &img,
            &tok,
            json!([{"op": "replace", "path": "/protected", "value": true}]),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    let r = t.lifecycle(&img, &tok, json!({"state": "retired"})).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    let r = t
        .patch(
            &img,
            &tok,
            json!([{"op": "replace", "path": "/protected", "value": false}]),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    let r = t.lifecycle(&img, &tok, json!({"state": "retired"})).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.json()["status"], "deleted");
    assert_eq!(r.json()["vmi_lifecycle_state"], "retired");
}

#[tokio::test]
async fn the_recycle_bin_keeps_restores_and_finally_purges_deleted_images() {
    let t = setup_with(|c| {
        c.lifecycle.recycle_retention = "7d".parse().unwrap();
    })
    .await;
    let (_, tok) = t.user("web", "alice").await;
    let (_, other) = t.user("db", "bob").await;
    let id = t
        .active(
            &tok,
            json!({"name": "img", "visibility": "community"}),
            b"keep me",
        )
        .await;
    assert_eq!(t.stored_objects(), 1);

    let r = t.delete(&id, &tok).await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    assert_eq!(t.image(&id, &tok).await["status"], "pending_delete");
    // Hidden from default listings; the owner lists it by status; others do not see it.
    let ids = |v: Value| -> Vec<String> {
        v["images"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["id"].as_str().unwrap().to_string())
            .collect()
    };
    assert!(ids(t.get("/v2/images", &tok).await.json()).is_empty());
    assert_eq!(
        ids(t.get("/v2/images?status=pending_delete", &tok).await.json()),
        vec![id.clone()]
    );
    assert!(ids(t
        .get("/v2/images?status=pending_delete", &other)
        .await
        .json())
    .is_empty());
    assert_eq!(
        t.get(&format!("/v2/images/{id}"), &other).await.status,
        StatusCode::NOT_FOUND
    );
    let r = t
        .post(
            &format!("/v2/images/{id}/actions/restore"),
            &other,
            json!({}),
        )
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    // The reaper keeps the data of recycled images.
    t.reg.reap().await.unwrap();
    assert_eq!(t.stored_objects(), 1);

    let r = t
        .post(&format!("/v2/images/{id}/actions/restore"), &tok, json!({}))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.json()["status"], "active");
    let r = t.get(&format!("/v2/images/{id}/file"), &other).await;
    assert_eq!(&r.body[..], b"keep me");
    let r = t
        .post(&format!("/v2/images/{id}/actions/restore"), &tok, json!({}))
        .await;
    assert_eq!(r.status, StatusCode::CONFLICT);

    // Deleted again: the job purges it once the retention has passed, not before.
    assert_eq!(t.delete(&id, &tok).await.status, StatusCode::NO_CONTENT);
    let job = t.job("n");
    t.advance(Duration::days(6));
    assert!(job.run_once().await.unwrap().purged.is_empty());
    t.advance(Duration::days(2));
    assert_eq!(job.run_once().await.unwrap().purged, vec![id.clone()]);
    assert_eq!(
        t.get(&format!("/v2/images/{id}"), &tok).await.status,
        StatusCode::NOT_FOUND
    );
    assert_eq!(t.stored_objects(), 0);

    // Deleting a recycled image again removes it at once; protected images stay.
    let b = t.active(&tok, json!({"name": "b"}), b"b").await;
    assert_eq!(t.delete(&b, &tok).await.status, StatusCode::NO_CONTENT);
    assert_eq!(t.delete(&b, &tok).await.status, StatusCode::NO_CONTENT);
    assert_eq!(
        t.get(&format!("/v2/images/{b}"), &tok).await.status,
        StatusCode::NOT_FOUND
    );
    assert_eq!(t.stored_objects(), 0);
    let p = t
        .active(&tok, json!({"name": "p", "protected": true}), b"p")
        .await;
    assert_eq!(t.delete(&p, &tok).await.status, StatusCode::FORBIDDEN);
}

#[tokio::test]
async fn retention_reports_what_it_would_remove_and_apply_moves_it_to_the_recycle_bin() {
    let t = setup_with(|c| {
        c.lifecycle.recycle_retention = "1d".parse().unwrap();
        c.policies.retention.keep_newest = Some(2);
        c.policies.retention.max_age_days = Some(30);
    })
    .await;
    let (_, tok) = t.user("web", "alice").await;
    let mut ids = Vec::new();
    for n in 0..5 {
        ids.push(
            t.active(
                &tok,
                json!({"name": format!("v{n}"), "family": "web"}),
                b"x",
            )
            .await,
        );
        t.advance(Duration::days(20));
    }
    let other = t
        .active(&tok, json!({"name": "o", "family": "db"}), b"x")
        .await;
    // Now v0 is 100 days old, v1 80, v2 60, v3 40, v4 20: v4 and v3 are the newest two, and
    // nothing else is younger than 30 days.
    let r = t
        .get("/v2/policies/retention/report?family=web", &tok)
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let rep = r.json();
    assert_eq!(rep["remove"], json!([ids[2], ids[1], ids[0]]));
    let v2 = &rep["images"][2];
    assert_eq!(v2["id"], ids[2].as_str());
    assert_eq!(
        v2["reason"],
        "not among the newest 2 (version 3) and 60 days old (limit 30)"
    );
    assert_eq!(rep["images"][0]["reason"], "among the newest 2");
    // A dry run changes nothing; the apply is for admins.
    assert_eq!(t.image(&ids[0], &tok).await["status"], "active");
    let r = t
        .post("/v2/policies/retention/apply?family=web", &tok, json!({}))
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    // Without a family, every family of the caller's project.
    let r = t.get("/v2/policies/retention/report", &tok).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let all = r.json();
    let families: Vec<&str> = all["families"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["family"].as_str().unwrap())
        .collect();
    assert_eq!(families, ["db", "web"]);
    assert_eq!(all["families"][0]["remove"], json!([]));
    assert_eq!(all["remove"], json!([ids[2], ids[1], ids[0]]));
    let r = t.get("/v2/policies/retention/report?family=", &tok).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);

    let r = t
        .post(
            "/v2/policies/retention/apply?family=web",
            ADMIN_TOKEN,
            json!({}),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.json()["removed"], json!([ids[2], ids[1], ids[0]]));
    for id in &ids[..3] {
        assert_eq!(t.image(id, &tok).await["status"], "pending_delete");
    }
    for id in ids[3..].iter().chain([&other]) {
        assert_eq!(t.image(id, &tok).await["status"], "active");
    }
    let r = t
        .get("/v2/policies/retention/report?family=web", &tok)
        .await
        .json();
    assert_eq!(r["remove"], json!([]));
}

#[tokio::test]
async fn naming_and_metadata_policies_refuse_with_the_rule_they_enforce() {
    let t = setup_with(|c| {
        let toml = "[policies.required_metadata]\n\
                    os_distro = { enum = [\"ubuntu\", \"debian\"] }\n\
                    patch_level = { regex = \"^[0-9]{4}-[0-9]{2}$\" }\n\
                    [policies.projects.web]\nnaming = \"^web-[a-z0-9-]+$\"\n";
        c.policies = Config::from_toml(toml).unwrap().policies;
    })
    .await;
    let (_, tok) = t.user("web", "alice").await;
    let (_, other) = t.user("db", "bob").await;

    let r = t
        .post("/v2/images", &tok, json!({"name": "Web Server"}))
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert!(
        r.text().contains("naming rule of project web") && r.text().contains("/^web-[a-z0-9-]+$/"),
        "{}",
        r.text()
    );
    let r = t.post("/v2/images", &tok, json!({})).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    // The rule is the web project's: db has none.
    let r = t
        .post("/v2/images", &other, json!({"name": "Anything"}))
        .await;
    assert_eq!(r.status, StatusCode::CREATED);

    let r = t
        .post(
            "/v2/images",
            &tok,
            json!({"name": "web-1", "disk_format": "raw", "container_format": "bare",
                   "os_distro": "fedora"}),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text());
    let id = r.json()["id"].as_str().unwrap().to_string();
    let r = t
        .patch(
            &id,
            &tok,
            json!([{"op": "replace", "path": "/name", "value": "db-1"}]),
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    // Metadata is checked when the image becomes active: the upload is refused and the
    // image stays queued.
    let r = t.upload(&id, &tok, b"data").await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert!(
        r.text().contains("missing patch_level")
            && r.text()
                .contains("os_distro 'fedora' is not one of ubuntu, debian"),
        "{}",
        r.text()
    );
    assert_eq!(t.image(&id, &tok).await["status"], "queued");
    assert_eq!(t.stored_objects(), 0);
    let r = t
        .patch(
            &id,
            &tok,
            json!([{"op": "replace", "path": "/os_distro", "value": "ubuntu"},
                   {"op": "add", "path": "/patch_level", "value": "2026-01"}]),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(
        t.upload(&id, &tok, b"data").await.status,
        StatusCode::NO_CONTENT
    );
    // An active image must stay compliant.
    let r = t
        .patch(
            &id,
            &tok,
            json!([{"op": "replace", "path": "/patch_level", "value": "jan"}]),
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert!(
        r.text().contains("patch_level 'jan' does not match"),
        "{}",
        r.text()
    );
    let r = t
        .patch(&id, &tok, json!([{"op": "remove", "path": "/os_distro"}]))
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert!(r.text().contains("missing os_distro"), "{}", r.text());
    let r = t
        .patch(
            &id,
            &tok,
            json!([{"op": "add", "path": "/note", "value": "ok"}]),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
}

#[tokio::test]
async fn the_audit_log_records_who_did_what_when_without_secrets() {
    let t = setup_with(|_| {}).await;
    let (pid, tok) = t.user("web", "alice").await;
    let (_, other) = t.user("db", "bob").await;
    let r = t
        .post(
            "/v2/images",
            &tok,
            json!({"name": "a", "disk_format": "raw", "container_format": "bare"}),
        )
        .await;
    let id = r.json()["id"].as_str().unwrap().to_string();
    t.advance(Duration::hours(1));
    assert_eq!(
        t.upload(&id, &tok, b"data").await.status,
        StatusCode::NO_CONTENT
    );
    let r = t
        .req(
            Method::PUT,
            &format!("/v2/images/{id}/tags/golden"),
            Some(&tok),
            None,
            Body::empty(),
        )
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    t.advance(Duration::hours(1));
    let r = t
        .patch(
            &id,
            &tok,
            json!([{"op": "add", "path": "/os_distro", "value": "x"}]),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    // A refused change is recorded with its outcome.
    let r = t
        .patch(
            &id,
            &other,
            json!([{"op": "add", "path": "/x", "value": "y"}]),
        )
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    let r = t.lifecycle(&id, &tok, json!({"state": "deprecated"})).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(t.delete(&id, &tok).await.status, StatusCode::NO_CONTENT);
    // Reads and unidentified failures are not changes.
    t.get("/v2/images", &tok).await;
    t.req(
        Method::DELETE,
        &format!("/v2/images/{id}"),
        Some("bogus"),
        None,
        Body::empty(),
    )
    .await;

    let all = t
        .get(&format!("/v2/audit?image_id={id}"), ADMIN_TOKEN)
        .await;
    assert_eq!(all.status, StatusCode::OK, "{}", all.text());
    let events = all.json()["events"].as_array().unwrap().clone();
    let summary: Vec<(String, u64)> = events
        .iter()
        .rev()
        .map(|e| {
            (
                e["action"].as_str().unwrap().to_string(),
                e["status"].as_u64().unwrap(),
            )
        })
        .collect();
    let expect = [
        ("image.create", 201),
        ("image.upload", 204),
        ("tag.add", 204),
        ("image.update", 200),
        ("image.update", 404),
        ("image.lifecycle", 200),
        ("image.delete", 204),
    ];
    let expect: Vec<(String, u64)> = expect.iter().map(|(a, s)| (a.to_string(), *s)).collect();
    assert_eq!(summary, expect);
    let first = &events[events.len() - 1];
    assert_eq!(first["project_id"], pid.as_str());
    assert_eq!(first["method"], "POST");
    assert_eq!(first["path"], "/v2/images");
    assert_eq!(first["at"], "2026-01-01T00:00:00Z");
    assert!(first["user_id"].as_str().is_some_and(|u| !u.is_empty()));
    // Token issues are recorded too, without the token.
    let tokens = t
        .get("/v2/audit?action=token.issue", ADMIN_TOKEN)
        .await
        .json();
    assert_eq!(tokens["events"].as_array().unwrap().len(), 2);
    let whole = t.get("/v2/audit?limit=1000", ADMIN_TOKEN).await.text();
    assert!(!whole.contains(&tok) && !whole.contains(&other) && !whole.contains("pw\""));

    // Filters and pages.
    let r = t
        .get(
            &format!(
                "/v2/audit?image_id={id}&since=2026-01-01T01:00:00Z&until=2026-01-01T02:00:00Z"
            ),
            ADMIN_TOKEN,
        )
        .await
        .json();
    let actions: Vec<&str> = r["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    assert_eq!(actions, ["tag.add", "image.upload"]);
    let mut seen = Vec::new();
    let mut next = Some(format!("/v2/audit?image_id={id}&limit=3"));
    while let Some(url) = next {
        let page = t.get(&url, ADMIN_TOKEN).await.json();
        seen.extend(
            page["events"]
                .as_array()
                .unwrap()
                .iter()
                .map(|e| e["id"].clone()),
        );
        next = page["next"].as_str().map(str::to_string);
    }
    assert_eq!(seen.len(), 7);
    // Other projects read only their own events.
    let theirs = t
        .get(&format!("/v2/audit?image_id={id}"), &other)
        .await
        .json();
    let theirs = theirs["events"].as_array().unwrap();
    assert_eq!(theirs.len(), 1);
    assert_eq!(theirs[0]["status"], 404);
    let r = t.get(&format!("/v2/audit?project_id={pid}"), &other).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_image_client_drives_the_lifecycle_recycle_bin_and_audit_log() {
    use clap::Parser;
    use vmi_registry::cli::{image_command, ImageArgs};

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        image: ImageArgs,
    }

    let t = setup_with(|c| {
        c.public_url = None;
        c.lifecycle.recycle_retention = "7d".parse().unwrap();
        c.policies.retention.keep_newest = Some(1);
    })
    .await;
    let f1 = t
        .active(
            ADMIN_TOKEN,
            json!({"name": "f1", "family": "fam", "version": "1.0.0"}),
            b"1",
        )
        .await;
    let f2 = t
        .active(
            ADMIN_TOKEN,
            json!({"name": "f2", "family": "fam", "version": "2.0.0"}),
            b"2",
        )
        .await;
    let new = t.active(ADMIN_TOKEN, json!({"name": "new"}), b"n").await;
    let old = t.active(ADMIN_TOKEN, json!({"name": "old"}), b"o").await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(t.reg.clone().serve(listener, async {
        let _ = stop_rx.await;
    }));
    let env = vec![("VMI_TOKEN".to_string(), ADMIN_TOKEN.to_string())];
    let run = |line: String| {
        let (url, env) = (url.clone(), env.clone());
        async move {
            let mut argv = vec!["vmi-image".to_string(), "--url".to_string(), url];
            argv.extend(line.split_whitespace().map(str::to_string));
            let cli = Cli::try_parse_from(argv).unwrap();
            let mut out = Vec::new();
            image_command(&cli.image, &env, &mut out, false)
                .await
                .unwrap();
            String::from_utf8(out).unwrap()
        }
    };

    let out = run("deprecate old --replacement new".into()).await;
    assert!(out.contains("vmi_lifecycle_state  deprecated"), "{out}");
    assert!(
        out.contains(&format!("vmi_replacement      {new}")),
        "{out}"
    );
    let out = run("obsolete old --at 2030-01-01T00:00:00Z".into()).await;
    assert!(
        out.contains("vmi_obsolete_at      2030-01-01T00:00:00Z"),
        "{out}"
    );
    let out = run("undeprecate old".into()).await;
    assert!(out.contains("vmi_lifecycle_state  active") && !out.contains("vmi_obsolete_at"));
    let out = run("retire old".into()).await;
    assert!(out.contains("status               pending_delete"), "{out}");
    let out = run(format!("restore {old}")).await;
    assert!(
        out.contains("status               active")
            && out.contains("vmi_lifecycle_state  obsolete"),
        "{out}"
    );
    let out = run(format!("--json audit --image {old} --limit 3")).await;
    let events: Value = serde_json::from_str(&out).unwrap();
    let actions: Vec<&str> = events
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    assert_eq!(
        actions,
        ["image.restore", "image.lifecycle", "image.lifecycle"]
    );
    let out = run("audit --action image.restore".into()).await;
    assert!(out.contains("image.restore") && out.contains(&old), "{out}");

    // Retention: a dry run over every family, then the removal.
    let out = run("retention".into()).await;
    let line = |id: &str| {
        out.lines()
            .find(|l| l.contains(id))
            .unwrap_or("")
            .to_string()
    };
    assert!(line(&f2).contains(" keep "), "{out}");
    assert!(line(&f1).contains(" remove "), "{out}");
    let out = run("retention --family fam --apply".into()).await;
    assert!(
        out.lines()
            .any(|l| l.contains(&f1) && l.contains(" removed ")),
        "{out}"
    );
    assert_eq!(t.image(&f1, ADMIN_TOKEN).await["status"], "pending_delete");
    assert_eq!(t.image(&f2, ADMIN_TOKEN).await["status"], "active");

    let _ = stop_tx.send(());
    server.await.unwrap().unwrap();
}

#[tokio::test]
async fn families_skip_deprecated_versions_and_retention_follows_version_order() {
    let t = setup_with(|c| {
        c.policies.retention.keep_newest = Some(1);
    })
    .await;
    let (_, tok) = t.user("web", "alice").await;
    // Created newest-version-first, so creation order and version order disagree.
    let v2 = t
        .active(
            &tok,
            json!({"name": "a", "family": "web", "version": "2.0.0"}),
            b"2",
        )
        .await;
    t.advance(Duration::days(1));
    let v1 = t
        .active(
            &tok,
            json!({"name": "b", "family": "web", "version": "1.0.0"}),
            b"1",
        )
        .await;
    let latest = t.get("/v2/families/web/latest", &tok).await;
    assert_eq!(latest.status, StatusCode::OK, "{}", latest.text());
    assert_eq!(latest.json()["id"], v2.as_str());
    let r = t
        .get("/v2/policies/retention/report?family=web", &tok)
        .await
        .json();
    assert_eq!(r["remove"], json!([v1]));

    let r = t
        .lifecycle(&v2, &tok, json!({"state": "deprecated", "replacement": v1}))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let latest = t.get("/v2/families/web/latest", &tok).await;
    assert_eq!(latest.json()["id"], v1.as_str());
}
