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
