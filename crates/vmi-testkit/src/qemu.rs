//! Thin wrappers over `qemu-img` and `qemu-io`, the reference implementation every format is
//! cross-checked against. Each helper panics with qemu's stderr on failure: they are for tests.

use serde_json::Value;
use std::path::Path;
use std::process::{Command, Output};

/// Run `qemu-img` with `args`; panic with its output unless it exits 0.
pub fn qemu_img(args: &[&str]) -> Output {
    let run = || {
        Command::new("qemu-img")
            .args(args)
            .output()
            .expect("qemu-img is installed")
    };
    let mut out = run();
    // qemu-img before 8.0 times its PBKDF benchmark with per-thread CPU time and gives up with
    // this message when the clock did not move (a loaded machine): not a result, run it again.
    for _ in 0..5 {
        if out.status.success()
            || !String::from_utf8_lossy(&out.stderr).contains("Unable to get accurate CPU usage")
        {
            break;
        }
        out = run();
    }
    assert!(
        out.status.success(),
        "qemu-img {} failed: {}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Run `qemu-img` and return its exit code and stdout, whatever the outcome.
pub fn qemu_img_status(args: &[&str]) -> (i32, String, String) {
    let out = Command::new("qemu-img")
        .args(args)
        .output()
        .expect("qemu-img is installed");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// qemu-img's (major, minor) version.
pub fn qemu_img_version() -> (u32, u32) {
    let out = qemu_img(&["--version"]);
    let s = String::from_utf8_lossy(&out.stdout);
    let v = s.split_whitespace().nth(2).unwrap_or("0.0");
    let mut it = v.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
    (it.next().unwrap_or(0), it.next().unwrap_or(0))
}

fn p(path: &Path) -> &str {
    path.to_str().expect("test paths are UTF-8")
}

/// `qemu-img create -f FMT [-o OPTS] PATH SIZE`.
pub fn qemu_create(path: &Path, fmt: &str, opts: &str, size: u64) {
    let size = size.to_string();
    let mut args = vec!["create", "-q", "-f", fmt];
    if !opts.is_empty() {
        args.extend(["-o", opts]);
    }
    args.extend([p(path), size.as_str()]);
    qemu_img(&args);
}

/// `qemu-img convert -f SRCFMT -O DSTFMT [-o OPTS] [extra...] SRC DST`.
pub fn qemu_convert(
    src: &Path,
    src_fmt: &str,
    dst: &Path,
    dst_fmt: &str,
    opts: &str,
    extra: &[&str],
) {
    let mut args = vec!["convert", "-f", src_fmt, "-O", dst_fmt];
    if !opts.is_empty() {
        args.extend(["-o", opts]);
    }
    args.extend_from_slice(extra);
    args.extend([p(src), p(dst)]);
    qemu_img(&args);
}

/// `qemu-img check -f FMT --output=json PATH`: (exit code, parsed JSON or Null).
pub fn qemu_check(path: &Path, fmt: &str) -> (i32, Value) {
    let (code, out, _) = qemu_img_status(&["check", "-f", fmt, "--output=json", p(path)]);
    (code, serde_json::from_str(&out).unwrap_or(Value::Null))
}

/// Assert `qemu-img check` finds nothing wrong.
pub fn assert_qemu_check_clean(path: &Path, fmt: &str) {
    let (code, out, err) = qemu_img_status(&["check", "-f", fmt, p(path)]);
    assert_eq!(
        code,
        0,
        "qemu-img check {} reported problems:\n{out}{err}",
        path.display()
    );
}

/// `qemu-img compare -f AFMT -F BFMT A B`: true when identical (exit 0), false when different
/// (exit 1); panics on error (exit 2).
pub fn qemu_compare(a: &Path, a_fmt: &str, b: &Path, b_fmt: &str) -> bool {
    let (code, out, err) = qemu_img_status(&["compare", "-f", a_fmt, "-F", b_fmt, p(a), p(b)]);
    match code {
        0 => true,
        1 => false,
        _ => panic!("qemu-img compare failed ({code}): {out}{err}"),
    }
}

/// Assert `qemu-img compare` finds the two images identical.
pub fn assert_qemu_identical(a: &Path, a_fmt: &str, b: &Path, b_fmt: &str) {
    assert!(
        qemu_compare(a, a_fmt, b, b_fmt),
        "qemu-img compare: {} ({a_fmt}) and {} ({b_fmt}) differ",
        a.display(),
        b.display()
    );
}

/// `qemu-img info --output=json -f FMT PATH` parsed.
pub fn qemu_info(path: &Path, fmt: &str) -> Value {
    let out = qemu_img(&["info", "--output=json", "-f", fmt, p(path)]);
    serde_json::from_slice(&out.stdout).expect("qemu-img info prints JSON")
}

/// `qemu-img map --output=json -f FMT PATH` parsed.
pub fn qemu_map(path: &Path, fmt: &str) -> Value {
    let out = qemu_img(&["map", "--output=json", "-f", fmt, p(path)]);
    serde_json::from_slice(&out.stdout).expect("qemu-img map prints JSON")
}

/// Run a `qemu-io` command (e.g. `write -P 0xab 0 64k`) on an image.
pub fn qemu_io(path: &Path, fmt: &str, cmd: &str) {
    let out = Command::new("qemu-io")
        .args(["-f", fmt, "-c", cmd, p(path)])
        .output()
        .expect("qemu-io is installed");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && !stdout.contains("failed"),
        "qemu-io {cmd} on {} failed: {stdout}{}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}
