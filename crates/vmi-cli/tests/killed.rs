//! `vmi convert` killed with `SIGKILL` in the middle of its work: no file is left behind (the
//! output is an anonymous file until it is complete), a destination that existed is intact, and
//! where a temporary name cannot be avoided (images of several files are assembled in a temporary
//! folder) the next conversion to the same destination removes it.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// 64 MiB of incompressible data: seconds of compression on one worker.
fn noise(p: &Path) {
    let mut f = std::io::BufWriter::new(std::fs::File::create(p).expect("create"));
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut block = vec![0u8; 1 << 20];
    for _ in 0..64 {
        for b in block.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            b.copy_from_slice(&x.to_le_bytes());
        }
        f.write_all(&block).expect("write");
    }
}

fn vmi(dir: &Path, args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_vmi"));
    c.args(args).current_dir(dir);
    c
}

/// Start `vmi ARGS` with JSON progress, wait until it reports progress (so it is writing), and
/// kill it with `SIGKILL`.
fn kill_mid_run(dir: &Path, args: &[&str]) {
    let mut all = vec!["convert", "--progress=json", "-m", "1"];
    all.extend_from_slice(args);
    let mut child = vmi(dir, &all)
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn vmi");
    let mut err = BufReader::new(child.stderr.take().expect("stderr"));
    let mut first = String::new();
    err.read_line(&mut first).expect("progress line");
    assert!(first.contains("\"done\""), "no progress: {first}");
    // SAFETY: kill(2) on the child's pid, which has not been reaped yet.
    let rc = unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGKILL) };
    assert_eq!(rc, 0);
    let status = child.wait().expect("wait");
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(libc::SIGKILL),
        "the conversion finished before it was killed: {status:?}"
    );
}

/// Names in `dir`, sorted.
fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .expect("list")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

fn setup() -> (tempfile::TempDir, PathBuf) {
    let d = tempfile::tempdir().expect("temporary folder");
    let src = d.path().join("big.raw");
    noise(&src);
    (d, src)
}

#[test]
fn a_convert_killed_mid_run_leaves_no_file_behind() {
    let (d, _) = setup();
    kill_mid_run(d.path(), &["-c", "-O", "qcow2", "big.raw", "out.qcow2"]);
    assert_eq!(names(d.path()), ["big.raw"]);
}

#[test]
fn a_convert_killed_mid_run_leaves_the_existing_destination_intact_and_nothing_else() {
    let (d, _) = setup();
    let old = b"the previous image, which must survive".repeat(1000);
    std::fs::write(d.path().join("out.qcow2"), &old).expect("write");
    kill_mid_run(d.path(), &["-c", "-O", "qcow2", "big.raw", "out.qcow2"]);
    assert_eq!(names(d.path()), ["big.raw", "out.qcow2"]);
    assert_eq!(
        std::fs::read(d.path().join("out.qcow2")).expect("read"),
        old
    );
}

#[test]
fn the_temporary_folder_of_a_killed_multi_file_convert_is_removed_by_the_next_run() {
    let (d, _) = setup();
    let args = [
        "-O",
        "vmdk",
        "-o",
        "subformat=streamOptimized",
        "big.raw",
        "out.vmdk",
    ];
    kill_mid_run(d.path(), &args);
    // VMDK images are assembled under their final names in a temporary folder: that folder is
    // the one thing a kill can leave.
    let left = names(d.path());
    assert!(
        left.iter()
            .all(|n| n == "big.raw" || n.starts_with(".out.vmdk.vmi-tmp-")),
        "{left:?}"
    );
    let mut again = vec!["convert", "-q"];
    again.extend_from_slice(&args);
    let out = vmi(d.path(), &again).output().expect("run vmi");
    assert!(out.status.success(), "{out:?}");
    assert_eq!(names(d.path()), ["big.raw", "out.vmdk"]);
    vmi_testkit::assert_qemu_check_clean(&d.path().join("out.vmdk"), "vmdk");
}
