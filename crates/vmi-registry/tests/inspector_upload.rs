//! Uploads of hostile images, each declared as `raw` and as what it is (or the nearest Glance
//! disk format), through the in-process router: every one is refused with 400 and its violations,
//! and the image stays `queued`. These are OpenStack format_inspector's unsafe cases
//! (crates/vmi-disk/tests/format_inspector.rs inspects the same constructions) plus the formats
//! vmi knows that Glance has no name for (qcow version 1, QED), which can never pass as a disk
//! format a registry accepts.

mod support;

use axum::body::Body;
use axum::http::{Method, StatusCode};
use serde_json::json;
use std::path::{Path, PathBuf};
use vmi_registry::{Config, Registry};
use vmi_testkit::qemu::{qemu_create, qemu_img};

const ADMIN_TOKEN: &str = "admin-static-token";
const MI: u64 = 1 << 20;

async fn registry(dir: &Path) -> Registry {
    let mut c = Config {
        data_dir: dir.to_path_buf(),
        public_url: Some("http://registry.test".into()),
        ..Config::default()
    };
    c.admin.password = Some("adminpw".into());
    c.admin.token = Some(ADMIN_TOKEN.into());
    if let Some(db) = support::test_database().await {
        c.database = Some(db);
    }
    let reg = Registry::open(c).await.unwrap();
    reg.bootstrap().await.unwrap();
    reg
}

/// Create an image declared `disk_format`, upload `data`; the status of the upload and the
/// image's status afterwards.
async fn upload(reg: &Registry, disk_format: &str, data: Vec<u8>) -> (StatusCode, String, String) {
    let r = support::send(
        reg,
        Method::POST,
        "/v2/images",
        Some(ADMIN_TOKEN),
        Some("application/json"),
        Body::from(json!({"disk_format": disk_format, "container_format": "bare"}).to_string()),
        &[],
    )
    .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text());
    let id = r.json()["id"].as_str().unwrap().to_string();
    let r = support::send(
        reg,
        Method::PUT,
        &format!("/v2/images/{id}/file"),
        Some(ADMIN_TOKEN),
        Some("application/octet-stream"),
        Body::from(data),
        &[],
    )
    .await;
    let status = support::send(
        reg,
        Method::GET,
        &format!("/v2/images/{id}"),
        Some(ADMIN_TOKEN),
        None,
        Body::empty(),
        &[],
    )
    .await
    .json()["status"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    (r.status, r.text(), status)
}

#[track_caller]
fn must_refuse(what: &str, declared: &str, (code, body, status): (StatusCode, String, String)) {
    assert_eq!(
        code,
        StatusCode::BAD_REQUEST,
        "{what} as {declared}: {body}"
    );
    assert!(body.contains("violations"), "{what} as {declared}: {body}");
    assert_eq!(status, "queued", "{what} as {declared}");
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

fn edited(path: &Path, edit: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    let mut b = std::fs::read(path).unwrap();
    edit(&mut b);
    b
}

/// A monolithicSparse VMDK whose embedded descriptor (sector 1) is rewritten by `edit`.
fn sparse_vmdk(dir: &Path, edit: impl Fn(&str) -> String) -> Vec<u8> {
    let f = dir.join("d.vmdk");
    let _ = std::fs::remove_file(&f);
    qemu_create(&f, "vmdk", "", 5 * MI);
    edited(&f, |b| {
        let area = &mut b[512..512 * 21];
        let end = area.iter().position(|&c| c == 0).unwrap();
        let text = edit(std::str::from_utf8(&area[..end]).unwrap());
        area.fill(0);
        area[..text.len()].copy_from_slice(text.as_bytes());
    })
}

/// Every hostile image: (what, the Glance disk formats to declare it as, bytes).
fn hostile(dir: &Path) -> Vec<(&'static str, Vec<&'static str>, Vec<u8>)> {
    let mut v = Vec::new();
    let f = |n: &str| dir.join(n);
    // qcow version 1 naming a host file as its backing file.
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow",
        "-b",
        "/etc/hostname",
        "-F",
        "raw",
        p(&f("v1.qcow")),
        "1M",
    ]);
    v.push((
        "qcow v1 with backing file",
        vec!["raw", "qcow2", "ami"],
        std::fs::read(f("v1.qcow")).unwrap(),
    ));
    // qcow2 version 4 with a backing file: no reader knows version 4, qemu-img 1.x probed it.
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "/etc/hostname",
        "-F",
        "raw",
        p(&f("b.qcow2")),
        "1M",
    ]);
    v.push((
        "qcow2 v4 with backing file",
        vec!["raw", "qcow2"],
        edited(&f("b.qcow2"), |b| b[7] = 4),
    ));
    v.push((
        "qcow2 with backing file",
        vec!["raw", "qcow2"],
        std::fs::read(f("b.qcow2")).unwrap(),
    ));
    qemu_create(
        &f("d.qcow2"),
        "qcow2",
        &format!("data_file={},data_file_raw=on", p(&f("data"))),
        MI,
    );
    v.push((
        "qcow2 with data file",
        vec!["raw", "qcow2"],
        std::fs::read(f("d.qcow2")).unwrap(),
    ));
    // QED, with and without a backing file (format_inspector: always unsafe).
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qed",
        "-b",
        "/etc/hostname",
        "-F",
        "raw",
        p(&f("b.qed")),
        "1M",
    ]);
    v.push((
        "QED with backing file",
        vec!["raw", "qcow2", "aki"],
        std::fs::read(f("b.qed")).unwrap(),
    ));
    qemu_create(&f("a.qed"), "qed", "", MI);
    v.push((
        "plain QED",
        vec!["raw", "qcow2"],
        std::fs::read(f("a.qed")).unwrap(),
    ));
    // VMDK: a descriptor file naming a flat extent, and the embedded-descriptor tricks.
    qemu_create(&f("flat.vmdk"), "vmdk", "subformat=monolithicFlat", MI);
    v.push((
        "VMDK flat descriptor",
        vec!["raw", "vmdk"],
        std::fs::read(f("flat.vmdk")).unwrap(),
    ));
    v.push((
        "VMDK with an added FLAT extent",
        vec!["raw", "vmdk"],
        sparse_vmdk(dir, |t| {
            t.replace(
                "# The Disk Data Base",
                "RW 2048 FLAT \"/etc/hosts\" 0\n# The Disk Data Base",
            )
        }),
    ));
    v.push((
        "VMDK with its extent replaced",
        vec!["raw", "vmdk"],
        sparse_vmdk(dir, |t| {
            let l = t.lines().find(|l| l.starts_with("RW ")).unwrap();
            t.replace(l, "RW 10240 FLAT \"/etc/passwd\" 0")
        }),
    ));
    v.push((
        "VMDK with a wronly line",
        vec!["raw", "vmdk"],
        sparse_vmdk(dir, |t| format!("{t}wronly 2048 somefile2.vmdk\n")),
    ));
    v.push((
        "VMDK with no extent",
        vec!["raw", "vmdk"],
        sparse_vmdk(dir, |t| {
            t.lines()
                .filter(|l| !l.starts_with("RW "))
                .map(|l| format!("{l}\n"))
                .collect()
        }),
    ));
    // A raw disk whose protective MBR has an invalid boot flag.
    let mut mbr = vec![0u8; 4096];
    mbr[510] = 0x55;
    mbr[511] = 0xaa;
    mbr[446] = 0x0a;
    mbr[446 + 4] = 0xee;
    v.push(("MBR with an invalid boot flag", vec!["raw", "ami"], mbr));
    v
}

#[tokio::test]
async fn hostile_images_are_refused_whatever_disk_format_says() {
    let dir = tempfile::tempdir().unwrap();
    let reg = registry(dir.path()).await;
    let scratch = tempfile::tempdir().unwrap();
    for (what, declared, data) in hostile(scratch.path()) {
        for d in declared {
            must_refuse(what, d, upload(&reg, d, data.clone()).await);
        }
    }
}

#[tokio::test]
async fn the_same_formats_made_plainly_are_accepted_as_themselves() {
    let dir = tempfile::tempdir().unwrap();
    let reg = registry(dir.path()).await;
    let scratch = tempfile::tempdir().unwrap();
    let q = scratch.path().join("a.qcow2");
    qemu_create(&q, "qcow2", "", MI);
    let (code, body, status) = upload(&reg, "qcow2", std::fs::read(&q).unwrap()).await;
    assert_eq!(
        (code, status.as_str()),
        (StatusCode::NO_CONTENT, "active"),
        "{body}"
    );
    let v = scratch.path().join("a.vmdk");
    qemu_create(&v, "vmdk", "", MI);
    let (code, body, _) = upload(&reg, "vmdk", std::fs::read(&v).unwrap()).await;
    assert_eq!(code, StatusCode::NO_CONTENT, "{body}");
    // A GPT disk with its protective MBR is a raw disk (also as Amazon's raw formats).
    let mut gpt = vec![0u8; 5120];
    gpt[510] = 0x55;
    gpt[511] = 0xaa;
    gpt[446 + 2] = 2;
    gpt[446 + 4] = 0xee;
    gpt[446 + 8] = 1;
    for d in ["raw", "ami"] {
        let (code, body, _) = upload(&reg, d, gpt.clone()).await;
        assert_eq!(code, StatusCode::NO_CONTENT, "{d}: {body}");
    }
}

fn luks(dir: &Path) -> PathBuf {
    let f = dir.join("a.luks");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "luks",
        "--object",
        "secret,id=sec0,data=secret-passphrase",
        "-o",
        "key-secret=sec0,iter-time=10",
        p(&f),
        "4M",
    ]);
    f
}

/// Waiting for the LUKS probe (formats/luks), written beside this work.
#[tokio::test]
async fn a_luks_container_declared_raw_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let reg = registry(dir.path()).await;
    let scratch = tempfile::tempdir().unwrap();
    let data = std::fs::read(luks(scratch.path())).unwrap();
    for d in ["raw", "ami"] {
        must_refuse("LUKS container", d, upload(&reg, d, data.clone()).await);
    }
}
