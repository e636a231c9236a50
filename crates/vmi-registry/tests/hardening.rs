//! Reliability and security limits of the registry, through real sockets: bounded password
//! hashing and login lockout (measured on a `vmi serve` child process), import filtering of
//! web-download URLs, size caps on converted data, and upload leases across a killed node.
//!
//! Child servers are this test binary run again with only the ignored test `serve_child` and
//! `VMI_TEST_SERVE_CHILD` set: it runs `vmi serve` with the `VMI_*` variables the parent gives.

use serde_json::{json, Value};
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// The variable that turns the `serve_child` test into a server.
const CHILD_VAR: &str = "VMI_TEST_SERVE_CHILD";
/// The admin password child servers are started with.
const ADMIN_PASSWORD: &str = "hardening-admin-pw";

#[test]
#[ignore = "runs only as the server child process of the other tests"]
fn serve_child() {
    if std::env::var_os(CHILD_VAR).is_none() {
        return;
    }
    let r = vmi_registry::cli::run_serve(vmi_registry::cli::ServeArgs::default());
    if let Err(e) = r {
        eprintln!("child server: {}", vmi_registry::error::chain(&e));
        std::process::exit(1);
    }
}

/// A `vmi serve` child process, killed when dropped.
struct ChildServer {
    child: Child,
    url: String,
}

impl ChildServer {
    /// Start a server on a free loopback port with data in `data_dir` and the extra `env`.
    fn start(data_dir: &std::path::Path, env: &[(&str, String)]) -> ChildServer {
        let exe = std::env::current_exe().unwrap();
        let mut cmd = Command::new(exe);
        cmd.args([
            "--exact",
            "serve_child",
            "--include-ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_VAR, "1")
        .env("VMI_LISTEN", "127.0.0.1:0")
        .env("VMI_DATA_DIR", data_dir)
        .env("VMI_ADMIN_PASSWORD", ADMIN_PASSWORD)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().unwrap();
        let out = BufReader::new(child.stdout.take().unwrap());
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in out.lines().map_while(Result::ok) {
                // libtest prints the test's name on the same line first.
                const READY: &str = "vmi registry listening on ";
                if let Some(at) = line.find(READY) {
                    let url = line[at + READY.len()..]
                        .split_whitespace()
                        .next()
                        .unwrap_or("")
                        .to_string();
                    let _ = tx.send(url);
                }
            }
        });
        let url = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("the child server starts");
        ChildServer { child, url }
    }

    /// The resident set size of the server process, KiB.
    fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .expect("VmRSS in /proc/PID/status")
    }

    /// SIGKILL, as a crash.
    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ChildServer {
    fn drop(&mut self) {
        self.kill();
    }
}

fn login_body(user: &str, password: &str) -> Value {
    json!({"auth": {"identity": {"methods": ["password"], "password": {"user": {
        "name": user, "domain": {"id": "default"}, "password": password}}},
        "scope": {"project": {"name": "admin", "domain": {"id": "default"}}}}})
}

async fn login(c: &reqwest::Client, url: &str, user: &str, password: &str) -> reqwest::Response {
    c.post(format!("{url}/v3/auth/tokens"))
        .json(&login_body(user, password))
        .send()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_burst_of_wrong_password_logins_keeps_memory_bounded_and_a_right_login_succeeds_after() {
    let dir = tempfile::tempdir().unwrap();
    let srv = ChildServer::start(
        dir.path(),
        &[
            ("VMI_LOGIN_LOCKOUT_FAILURE_ATTEMPTS", "0".into()),
            ("VMI_LOGIN_ADDRESS_LOCKOUT_FAILURE_ATTEMPTS", "0".into()),
        ],
    );
    let c = reqwest::Client::new();
    let before = srv.rss_kib();
    let tasks: Vec<_> = (0..256)
        .map(|i| {
            let c = c.clone();
            let url = srv.url.clone();
            tokio::spawn(async move {
                let r = login(&c, &url, "admin", &format!("wrong-{i}")).await;
                let retry_after = r.headers().get("retry-after").is_some();
                (r.status().as_u16(), retry_after)
            })
        })
        .collect();
    let mut refused = 0;
    let mut busy = 0;
    for t in tasks {
        match t.await.unwrap() {
            (401, _) => refused += 1,
            (429, true) => busy += 1,
            other => panic!("unexpected answer to a wrong password: {other:?}"),
        }
    }
    let after = srv.rss_kib();
    eprintln!("RSS {before} KiB before, {after} KiB after; {refused} refused, {busy} busy");
    assert!(refused > 0, "some of the logins are checked");
    assert!(after < 300 * 1024, "RSS after the burst: {after} KiB");
    let r = login(&c, &srv.url, "admin", ADMIN_PASSWORD).await;
    assert_eq!(r.status(), 201);
    assert!(r.headers().get("x-subject-token").is_some());
}

#[tokio::test]
async fn a_user_is_locked_out_after_repeated_failures_and_unknown_names_answer_alike() {
    let dir = tempfile::tempdir().unwrap();
    let srv = ChildServer::start(
        dir.path(),
        &[
            ("VMI_LOGIN_LOCKOUT_FAILURE_ATTEMPTS", "3".into()),
            ("VMI_LOGIN_LOCKOUT_DURATION", "2".into()),
            ("VMI_LOGIN_ADDRESS_LOCKOUT_FAILURE_ATTEMPTS", "0".into()),
        ],
    );
    let c = reqwest::Client::new();
    let wrong = login(&c, &srv.url, "admin", "wrong").await;
    assert_eq!(wrong.status(), 401);
    let wrong_body: Value = wrong.json().await.unwrap();
    let unknown = login(&c, &srv.url, "nobody-here", "wrong").await;
    assert_eq!(unknown.status(), 401);
    let unknown_body: Value = unknown.json().await.unwrap();
    assert_eq!(wrong_body, unknown_body);
    for _ in 0..2 {
        assert_eq!(login(&c, &srv.url, "admin", "wrong").await.status(), 401);
    }
    let locked = login(&c, &srv.url, "admin", ADMIN_PASSWORD).await;
    assert_eq!(
        locked.status(),
        401,
        "locked out despite the right password"
    );
    assert_eq!(locked.json::<Value>().await.unwrap(), wrong_body);
    // The lockout ends after its duration.
    tokio::time::sleep(Duration::from_millis(2200)).await;
    let r = login(&c, &srv.url, "admin", ADMIN_PASSWORD).await;
    assert_eq!(r.status(), 201);
}

#[tokio::test]
async fn a_client_address_is_locked_out_after_failures_across_user_names() {
    let dir = tempfile::tempdir().unwrap();
    let srv = ChildServer::start(
        dir.path(),
        &[
            ("VMI_LOGIN_LOCKOUT_FAILURE_ATTEMPTS", "0".into()),
            ("VMI_LOGIN_ADDRESS_LOCKOUT_FAILURE_ATTEMPTS", "4".into()),
        ],
    );
    let c = reqwest::Client::new();
    for n in 0..4 {
        let r = login(&c, &srv.url, &format!("guess-{n}"), "pw").await;
        assert_eq!(r.status(), 401);
    }
    let r = login(&c, &srv.url, "admin", ADMIN_PASSWORD).await;
    assert_eq!(r.status(), 401, "this address is locked out");
}

/// With the `postgres` feature and `VMI_TEST_POSTGRES_URL`, a fresh PostgreSQL database for the
/// test (see tests/postgres.sh); otherwise `None`: SQLite in the data directory.
async fn test_database() -> Option<String> {
    #[cfg(feature = "postgres")]
    if let Ok(base) = std::env::var("VMI_TEST_POSTGRES_URL") {
        let name = format!("vmi_t_{}", uuid::Uuid::new_v4().simple());
        let (client, conn) =
            tokio_postgres::connect(&format!("{base}/postgres"), tokio_postgres::NoTls)
                .await
                .expect("connect to the test PostgreSQL server");
        tokio::spawn(conn);
        client
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .expect("create a test database");
        return Some(format!("{base}/{name}"));
    }
    None
}

const TOKEN: &str = "hardening-admin-token";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_whose_node_was_killed_is_reclaimed_after_its_lease_and_a_retry_succeeds() {
    let dir = tempfile::tempdir().unwrap();
    let mut env = vec![
        ("VMI_ADMIN_TOKEN", TOKEN.to_string()),
        ("VMI_UPLOADS_LEASE_SECS", "3".to_string()),
        ("VMI_UPLOADS_HEARTBEAT_SECS", "1".to_string()),
    ];
    if let Some(db) = test_database().await {
        env.push(("VMI_DATABASE", db));
    }
    let mut a = ChildServer::start(dir.path(), &env);
    let c = reqwest::Client::new();
    let r = c
        .post(format!("{}/v2/images", a.url))
        .header("x-auth-token", TOKEN)
        .json(&json!({"name": "lease", "disk_format": "raw", "container_format": "bare"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let id = r.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let image = |url: String| {
        let c = c.clone();
        let id = id.clone();
        async move {
            c.get(format!("{url}/v2/images/{id}"))
                .header("x-auth-token", TOKEN)
                .send()
                .await
                .unwrap()
                .json::<Value>()
                .await
                .unwrap()
        }
    };

    // An upload that sends 20 MiB, then nothing: node A is killed in the middle of it.
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Vec<u8>, std::io::Error>>(32);
    for _ in 0..20 {
        tx.send(Ok(vec![1u8; 1 << 20])).await.unwrap();
    }
    let body = reqwest::Body::wrap_stream(futures_util::stream::unfold(rx, |mut rx| async {
        rx.recv().await.map(|item| (item, rx))
    }));
    let upload = {
        let c = c.clone();
        let uri = format!("{}/v2/images/{id}/file", a.url);
        tokio::spawn(async move {
            c.put(uri)
                .header("x-auth-token", TOKEN)
                .header("content-type", "application/octet-stream")
                .body(body)
                .send()
                .await
        })
    };
    let partial = |dir: &std::path::Path| {
        std::fs::read_dir(dir.join("images/images").join(&id))
            .map(|d| d.flatten().count())
            .unwrap_or(0)
    };
    let mut status = Value::Null;
    for _ in 0..400 {
        status = image(a.url.clone()).await["status"].clone();
        if status == "saving" && partial(dir.path()) > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(status, "saving");
    assert!(
        partial(dir.path()) > 0,
        "the upload has written part of its data"
    );
    a.kill();
    drop(tx);
    let _ = upload.await;

    // Node B on the same catalog and store: a retry is refused while the dead upload's lease
    // lasts, then the upload is reclaimed and the retry succeeds.
    let b = ChildServer::start(dir.path(), &env);
    let data: Vec<u8> = (0..(3 << 20)).map(|i: u32| (i % 251) as u8).collect();
    let mut answers = Vec::new();
    for _ in 0..120 {
        let r = c
            .put(format!("{}/v2/images/{id}/file", b.url))
            .header("x-auth-token", TOKEN)
            .header("content-type", "application/octet-stream")
            .body(data.clone())
            .send()
            .await
            .unwrap();
        answers.push(r.status().as_u16());
        if r.status() != 409 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert_eq!(
        answers.last(),
        Some(&204),
        "answers to the retries: {answers:?}"
    );
    assert!(
        answers.iter().all(|s| *s == 409 || *s == 204),
        "{answers:?}"
    );
    let v = image(b.url.clone()).await;
    assert_eq!(v["status"], "active", "{v}");
    assert_eq!(v["size"], data.len());
    let got = c
        .get(format!("{}/v2/images/{id}/file", b.url))
        .header("x-auth-token", TOKEN)
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert!(got == data, "the image's data is the retry's");
    // The dead upload's partial data is gone: only the image's object is left.
    let files: Vec<String> = std::fs::read_dir(dir.path().join("images/images").join(&id))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(files.len(), 1, "{files:?}");
}
