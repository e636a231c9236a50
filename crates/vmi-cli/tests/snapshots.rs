//! End-to-end tests of `vmi snapshot`, `convert -l`, `rebase`, `commit`, `clone` and `resize`,
//! and of `info --backing-chain` / `map` on a three-level template chain, each cross-checked with
//! qemu-img.

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;
use vmi_testkit::*;

const MIB: u64 = 1 << 20;

struct Dir {
    dir: tempfile::TempDir,
}

#[derive(Debug)]
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Run {
    fn ok(&self) -> &Self {
        assert_eq!(self.code, 0, "vmi failed: {self:#?}");
        self
    }
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {self:#?}"))
    }
}

impl Dir {
    fn new() -> Dir {
        Dir {
            dir: tempfile::tempdir().unwrap(),
        }
    }
    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
    fn vmi(&self, args: &[&str]) -> Run {
        let out = Command::new(env!("CARGO_BIN_EXE_vmi"))
            .args(args)
            .current_dir(self.dir.path())
            .output()
            .unwrap();
        Run {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }
    fn qemu(&self, args: &[&str]) -> String {
        let out = Command::new("qemu-img")
            .args(args)
            .current_dir(self.dir.path())
            .output()
            .unwrap();
        assert!(out.status.success(), "qemu-img {args:?}: {out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
    /// A qcow2 image with scattered data, and the raw file it was made from.
    fn image(&self, name: &str, seed: u64) -> (PathBuf, PathBuf) {
        let raw = self.path(&format!("{name}.raw"));
        scattered_raw(&raw, 8 * MIB, 12, seed);
        let img = self.path(&format!("{name}.qcow2"));
        qemu_convert(&raw, "raw", &img, "qcow2", "", &[]);
        (raw, img)
    }
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn snapshot_commands_interoperate_with_qemu_img() {
    let d = Dir::new();
    let (raw, img) = d.image("disk", 1);
    d.vmi(&["snapshot", "-c", "clean", "disk.qcow2"]).ok();
    qemu_io(&img, "qcow2", "write -P 0x42 0 128k");
    d.qemu(&["snapshot", "-c", "dirty", "disk.qcow2"]);
    assert_qemu_check_clean(&img, "qcow2");
    // Both tools list both snapshots.
    let list = d.vmi(&["snapshot", "-l", "disk.qcow2"]).ok().stdout.clone();
    assert!(list.starts_with("Snapshot list:\nID"), "{list}");
    assert!(list.contains("clean") && list.contains("dirty"), "{list}");
    let q = d.qemu(&["snapshot", "-l", "disk.qcow2"]);
    assert!(q.contains("clean") && q.contains("dirty"), "{q}");
    let info = d.vmi(&["info", "--output=json", "disk.qcow2"]).ok().json();
    let qinfo = qemu_info(&img, "qcow2");
    for (a, b) in info["snapshots"]
        .as_array()
        .unwrap()
        .iter()
        .zip(qinfo["snapshots"].as_array().unwrap())
    {
        for k in ["id", "name", "vm-state-size", "date-sec", "vm-clock-sec"] {
            assert_eq!(a[k], b[k], "{k}");
        }
    }
    // convert -l reads the vmi snapshot as qemu does.
    d.vmi(&[
        "convert",
        "-l",
        "clean",
        "-O",
        "raw",
        "disk.qcow2",
        "clean.raw",
    ])
    .ok();
    assert_qemu_identical(&d.path("clean.raw"), "raw", &raw, "raw");
    d.vmi(&[
        "convert",
        "-l",
        "snapshot.name=dirty",
        "-O",
        "raw",
        "disk.qcow2",
        "dirty.raw",
    ])
    .ok();
    assert_qemu_identical(&d.path("dirty.raw"), "raw", &img, "qcow2");
    // vmi applies and deletes; qemu checks.
    d.vmi(&["snapshot", "-a", "clean", "disk.qcow2"]).ok();
    assert_qemu_check_clean(&img, "qcow2");
    assert_qemu_identical(&img, "qcow2", &raw, "raw");
    d.vmi(&["snapshot", "-d", "dirty", "disk.qcow2"]).ok();
    d.vmi(&["snapshot", "-d", "1", "disk.qcow2"]).ok();
    assert_qemu_check_clean(&img, "qcow2");
    assert!(d
        .vmi(&["snapshot", "-l", "disk.qcow2"])
        .ok()
        .stdout
        .is_empty());
    let r = d.vmi(&["snapshot", "-a", "gone", "disk.qcow2"]);
    assert_eq!(r.code, 1);
    assert!(r.stderr.contains("no snapshot"), "{r:#?}");
    let r = d.vmi(&["snapshot", "-c", "x", "clean.raw"]);
    assert_eq!(r.code, 1);
    assert!(r.stderr.contains("qcow2"), "{r:#?}");
}

#[test]
fn rebase_commit_and_resize_commands_keep_qemu_happy() {
    let d = Dir::new();
    let (_, base) = d.image("base", 2);
    let other = d.path("other.qcow2");
    std::fs::copy(&base, &other).unwrap();
    qemu_io(&other, "qcow2", "write -P 0x99 4M 64k");
    let o = d.path("o.qcow2");
    d.vmi(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        "o.qcow2",
    ])
    .ok();
    qemu_io(&o, "qcow2", "write -P 0x11 1M 64k");
    let expect = d.path("expect.raw");
    qemu_convert(&o, "qcow2", &expect, "raw", "", &[]);
    d.vmi(&["rebase", "-b", "other.qcow2", "-F", "qcow2", "o.qcow2"])
        .ok();
    assert_qemu_check_clean(&o, "qcow2");
    assert_qemu_identical(&o, "qcow2", &expect, "raw");
    assert_eq!(qemu_info(&o, "qcow2")["backing-filename"], "other.qcow2");
    d.vmi(&["rebase", "-u", "-b", "base.qcow2", "-F", "qcow2", "o.qcow2"])
        .ok();
    assert_eq!(qemu_info(&o, "qcow2")["backing-filename"], "base.qcow2");
    // commit into base, then the overlay is empty and both read the expected contents.
    d.vmi(&["rebase", "-b", "other.qcow2", "o.qcow2"]).ok();
    let r = d.vmi(&["commit", "o.qcow2"]);
    assert_eq!(r.ok().stdout, "Image committed.\n");
    assert_qemu_check_clean(&other, "qcow2");
    assert_qemu_check_clean(&o, "qcow2");
    assert_qemu_identical(&other, "qcow2", &expect, "raw");
    assert_qemu_identical(&o, "qcow2", &expect, "raw");
    // resize grows and refuses to shrink over data without --shrink.
    d.vmi(&["resize", "-q", "o.qcow2", "+8M"]).ok();
    assert_qemu_check_clean(&o, "qcow2");
    assert_eq!(qemu_info(&o, "qcow2")["virtual-size"], 16 * MIB);
    d.vmi(&["rebase", "-b", "", "o.qcow2"]).ok();
    assert!(qemu_info(&o, "qcow2")["backing-filename"].is_null());
    let r = d.vmi(&["resize", "o.qcow2", "4M"]);
    assert_eq!(r.code, 1, "{r:#?}");
}

#[test]
fn clones_and_a_three_level_template_chain_match_qemu() {
    let d = Dir::new();
    let (_, _) = d.image("os", 3);
    d.vmi(&["clone", "--linked", "os.qcow2", "role.qcow2"]).ok();
    qemu_io(&d.path("role.qcow2"), "qcow2", "write -P 0x21 2M 256k");
    d.vmi(&["clone", "--linked", "role.qcow2", "app.qcow2"])
        .ok();
    qemu_io(&d.path("app.qcow2"), "qcow2", "write -P 0x31 2M 64k");
    let app = d.path("app.qcow2");
    for f in ["role.qcow2", "app.qcow2"] {
        assert_qemu_check_clean(&d.path(f), "qcow2");
    }
    // info --backing-chain: same images, formats, sizes and backing names as qemu-img.
    let ours = d
        .vmi(&["info", "--backing-chain", "--output=json", "app.qcow2"])
        .ok()
        .json();
    let theirs: Value =
        serde_json::from_str(&d.qemu(&["info", "--backing-chain", "--output=json", "app.qcow2"]))
            .unwrap();
    let (ours, theirs) = (ours.as_array().unwrap(), theirs.as_array().unwrap());
    assert_eq!(ours.len(), 3);
    assert_eq!(ours.len(), theirs.len());
    for (a, b) in ours.iter().zip(theirs) {
        for k in [
            "virtual-size",
            "format",
            "backing-filename",
            "backing-filename-format",
        ] {
            assert_eq!(a[k], b[k], "{k}");
        }
        let (fa, fb) = (
            a["filename"].as_str().unwrap(),
            b["filename"].as_str().unwrap(),
        );
        assert_eq!(
            Path::new(fa).file_name(),
            Path::new(fb).file_name(),
            "{fa} vs {fb}"
        );
    }
    assert_eq!(ours[0]["vmi-provenance"]["kind"], "linked");
    let human = d.vmi(&["info", "app.qcow2"]).ok().stdout.clone();
    assert!(
        human.contains("clone of: ") && human.contains("role.qcow2"),
        "{human}"
    );
    // map: the depth of every data range matches qemu-img map.
    let ours = d
        .vmi(&["--allow-backing", "map", "--output=json", "app.qcow2"])
        .ok()
        .json();
    let theirs = qemu_map(&app, "qcow2");
    let depth_at = |m: &Value, off: u64| -> (u64, bool) {
        m.as_array()
            .unwrap()
            .iter()
            .find(|e| {
                let st = e["start"].as_u64().unwrap();
                off >= st && off < st + e["length"].as_u64().unwrap()
            })
            .map(|e| (e["depth"].as_u64().unwrap(), e["data"].as_bool().unwrap()))
            .unwrap()
    };
    for off in (0..8 * MIB).step_by(64 * 1024) {
        let (qd, qdata) = depth_at(&theirs, off);
        let (vd, vdata) = depth_at(&ours, off);
        assert_eq!(qdata, vdata, "data at {off}");
        if qdata {
            assert_eq!(qd, vd, "depth at {off}");
        }
    }
    // A full clone flattens the chain into any format.
    d.vmi(&[
        "--allow-backing",
        "clone",
        "-O",
        "vhdx",
        "app.qcow2",
        "full.vhdx",
    ])
    .ok();
    assert_qemu_check_clean(&d.path("full.vhdx"), "vhdx");
    assert_qemu_identical(&d.path("full.vhdx"), "vhdx", &app, "qcow2");
    let info = d.vmi(&["info", "--output=json", "full.vhdx"]).ok().json();
    assert_eq!(info["vmi-provenance"]["kind"], "full");
    assert!(info["backing-filename"].is_null());
    let _ = s(&app);
}
