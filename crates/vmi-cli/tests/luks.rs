//! End-to-end tests of encrypted images through the `vmi` binary: keys given as qemu-img takes
//! them (`--object secret,...`, `key-secret=`, `--image-opts`) or with `--key-file`, checked
//! against qemu-img in both directions.

use std::path::{Path, PathBuf};
use std::process::Command;
use vmi_testkit::qemu::{qemu_img, qemu_img_status};

const PASS: &str = "s3cret passphrase";

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl std::fmt::Debug for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exit {}\nstdout:\n{}\nstderr:\n{}",
            self.code, self.stdout, self.stderr
        )
    }
}

fn vmi(dir: &Path, args: &[&str]) -> Run {
    let out = Command::new(env!("CARGO_BIN_EXE_vmi"))
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run vmi");
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn ok(r: Run) -> Run {
    assert_eq!(r.code, 0, "{r:?}");
    r
}

fn s(p: &Path) -> &str {
    p.to_str().expect("UTF-8 path")
}

/// A 3 MiB raw file: a byte pattern with a zero hole in the middle.
fn pattern_raw(dir: &Path) -> PathBuf {
    let p = dir.join("pattern.raw");
    let mut data: Vec<u8> = (0..3u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    data[1 << 20..2 << 20].fill(0);
    std::fs::write(&p, data).expect("write raw");
    p
}

fn object() -> String {
    format!("secret,id=sec0,data={PASS}")
}

fn qemu_compare_opts(driver: &str, key: &str, img: &Path, raw: &Path) -> (i32, String) {
    let a = format!("driver={driver},{key}=sec0,file.filename={}", s(img));
    let b = format!("driver=raw,file.filename={}", s(raw));
    let (code, out, err) =
        qemu_img_status(&["compare", "--object", &object(), "--image-opts", &a, &b]);
    (code, format!("{out}{err}"))
}

#[test]
fn convert_to_luks_with_an_object_secret_is_read_by_qemu_img() {
    let d = tempfile::tempdir().expect("tempdir");
    let raw = pattern_raw(d.path());
    let obj = object();
    ok(vmi(
        d.path(),
        &[
            "convert",
            "--object",
            &obj,
            "-O",
            "luks",
            "-o",
            "key-secret=sec0,iter-time=100",
            s(&raw),
            "out.luks",
        ],
    ));
    let (code, out) = qemu_compare_opts("luks", "key-secret", &d.path().join("out.luks"), &raw);
    assert_eq!(code, 0, "{out}");
}

#[test]
fn qemu_luks_images_convert_and_compare_with_image_opts_or_a_key_file() {
    let d = tempfile::tempdir().expect("tempdir");
    let raw = pattern_raw(d.path());
    let luks = d.path().join("q.luks");
    qemu_img(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "luks",
        "--object",
        &object(),
        "-o",
        "key-secret=sec0,iter-time=100",
        s(&raw),
        s(&luks),
    ]);
    let opts = format!("driver=luks,key-secret=sec0,file.filename={}", s(&luks));
    ok(vmi(
        d.path(),
        &[
            "convert",
            "--object",
            &object(),
            "--image-opts",
            &opts,
            "-O",
            "raw",
            "back.raw",
        ],
    ));
    assert!(
        std::fs::read(d.path().join("back.raw")).expect("read")
            == std::fs::read(&raw).expect("read"),
        "decrypted data differs"
    );
    std::fs::write(d.path().join("key"), PASS).expect("key file");
    ok(vmi(
        d.path(),
        &["compare", "--key-file", "key", s(&luks), s(&raw)],
    ));
    // base64 secrets decode as qemu's do.
    let b64 = "czNjcmV0IHBhc3NwaHJhc2U="; // base64 of PASS
    let obj = format!("secret,id=k,data={b64},format=base64");
    let opts = format!("driver=luks,key-secret=k,file.filename={}", s(&luks));
    ok(vmi(
        d.path(),
        &["compare", "--object", &obj, "--image-opts", &opts, s(&raw)],
    ));
}

#[test]
fn info_without_a_key_prints_the_luks_block_as_qemu_img_does() {
    let d = tempfile::tempdir().expect("tempdir");
    let luks = d.path().join("i.luks");
    ok(vmi(
        d.path(),
        &[
            "create",
            "-q",
            "-f",
            "luks",
            "--object",
            &object(),
            "-o",
            "key-secret=sec0,iter-time=100,cipher-mode=cbc,ivgen-alg=essiv",
            s(&luks),
            "1M",
        ],
    ));
    let mut ours: serde_json::Value =
        serde_json::from_str(&ok(vmi(d.path(), &["info", "--output", "json", s(&luks)])).stdout)
            .expect("JSON");
    let out = qemu_img(&["info", "--output=json", s(&luks)]);
    let qemu: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    if qemu["format-specific"]["data"]
        .get("detached-header")
        .is_none()
    {
        // qemu-img before 9.0 does not print the key.
        if let Some(d) = ours["format-specific"]["data"].as_object_mut() {
            d.remove("detached-header");
        }
    }
    assert_eq!(ours["format-specific"], qemu["format-specific"]);
    assert_eq!(ours["encrypted"], true);
    assert_eq!(ours["virtual-size"], qemu["virtual-size"]);
    let human = ok(vmi(d.path(), &["info", s(&luks)])).stdout;
    assert!(human.contains("encrypted: yes"), "{human}");
    assert!(human.contains("ivgen alg: essiv"), "{human}");
}

#[test]
fn reading_without_a_key_or_with_a_wrong_one_fails_clearly_and_never_prints_the_secret() {
    let d = tempfile::tempdir().expect("tempdir");
    let luks = d.path().join("k.luks");
    ok(vmi(
        d.path(),
        &[
            "create",
            "-q",
            "-f",
            "luks",
            "--object",
            &object(),
            "-o",
            "key-secret=sec0,iter-time=100",
            s(&luks),
            "1M",
        ],
    ));
    let r = vmi(d.path(), &["convert", "-O", "raw", s(&luks), "x.raw"]);
    assert_eq!(r.code, 1, "{r:?}");
    assert!(r.stderr.contains("is encrypted"), "{r:?}");
    assert!(r.stderr.contains("--object secret"), "{r:?}");
    let wrong = "secret,id=sec0,data=not-the-passphrase";
    let opts = format!("driver=luks,key-secret=sec0,file.filename={}", s(&luks));
    let r = vmi(
        d.path(),
        &[
            "convert",
            "--object",
            wrong,
            "--image-opts",
            &opts,
            "-O",
            "raw",
            "x.raw",
        ],
    );
    assert_eq!(r.code, 1, "{r:?}");
    assert!(r.stderr.contains("invalid password"), "{r:?}");
    assert!(!r.stderr.contains("not-the-passphrase"), "{r:?}");
    let r = vmi(
        d.path(),
        &[
            "create",
            "-f",
            "luks",
            "-o",
            "key-secret=missing",
            "y.luks",
            "1M",
        ],
    );
    assert_eq!(r.code, 1, "{r:?}");
    assert!(r.stderr.contains("missing"), "{r:?}");
}

#[test]
fn encrypted_qcow2_converts_both_ways_with_a_key_file_and_checks_clean_in_qemu_img() {
    let d = tempfile::tempdir().expect("tempdir");
    let raw = pattern_raw(d.path());
    std::fs::write(d.path().join("key"), PASS).expect("key file");
    ok(vmi(
        d.path(),
        &[
            "convert",
            "--key-file",
            "key",
            "-O",
            "qcow2",
            "-o",
            "encrypt.format=luks,encrypt.iter-time=100",
            s(&raw),
            "enc.qcow2",
        ],
    ));
    let enc = d.path().join("enc.qcow2");
    let (code, out) = qemu_compare_opts("qcow2", "encrypt.key-secret", &enc, &raw);
    assert_eq!(code, 0, "{out}");
    let spec = format!(
        "driver=qcow2,encrypt.key-secret=sec0,file.filename={}",
        s(&enc)
    );
    let (code, out, err) =
        qemu_img_status(&["check", "--object", &object(), "--image-opts", &spec]);
    assert_eq!(code, 0, "qemu-img check: {out}{err}");
    ok(vmi(d.path(), &["check", "enc.qcow2"]));
    let info = ok(vmi(d.path(), &["info", "enc.qcow2"])).stdout;
    assert!(info.contains("encrypted: yes"), "{info}");
    assert!(info.contains("format: luks"), "{info}");
    // And back out, with the qemu spelling of the key.
    let opts = format!(
        "driver=qcow2,encrypt.key-secret=sec0,file.filename={}",
        s(&enc)
    );
    ok(vmi(
        d.path(),
        &[
            "convert",
            "--object",
            &object(),
            "--image-opts",
            &opts,
            "-O",
            "vmdk",
            "plain.vmdk",
        ],
    ));
    ok(vmi(d.path(), &["compare", "plain.vmdk", s(&raw)]));
    let help = ok(vmi(d.path(), &["create", "-f", "qcow2", "-o", "help"])).stdout;
    assert!(help.contains("encrypt.key-secret"), "{help}");
}
