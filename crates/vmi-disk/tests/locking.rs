//! QEMU-compatible image locking against real QEMU processes: `qemu-nbd` holding an image open
//! (as a running VM would) keeps vmi from writing it, and vmi holding an image keeps `qemu-img`
//! and `qemu-io` out, with QEMU's own messages on both sides.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use vmi_disk::{Format, Image, OpenOptions};
use vmi_testkit::*;

const MIB: u64 = 1 << 20;

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A `qemu-nbd` serving an image on a UNIX socket, as a child of the test; killed and reaped
/// when dropped.
struct Nbd {
    child: std::process::Child,
}

impl Nbd {
    fn start(dir: &Path, img: &Path, read_only: bool) -> Nbd {
        let sock = dir.join("nbd.sock");
        let _ = std::fs::remove_file(&sock);
        let mut cmd = Command::new("qemu-nbd");
        cmd.args(["--persistent", "-f", "qcow2", "-k", s(&sock)]);
        if read_only {
            cmd.arg("--read-only");
        }
        let child = cmd
            .arg(img)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("qemu-nbd is installed");
        let mut nbd = Nbd { child };
        // Ready once its locks show in /proc/locks (byte 101 "write" for a writer).
        let ino = std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(img).unwrap());
        let want = if read_only { 100 } else { 101 };
        for _ in 0..1000 {
            let locks = std::fs::read_to_string("/proc/locks").unwrap_or_default();
            if locks
                .lines()
                .any(|l| l.contains(&format!(":{ino} ")) && covers(l, want))
            {
                return nbd;
            }
            if let Ok(Some(st)) = nbd.child.try_wait() {
                panic!("qemu-nbd exited: {st}");
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        panic!("qemu-nbd did not start serving");
    }
}

impl Drop for Nbd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Whether a `/proc/locks` line's byte range (its last two fields) covers byte `at`.
fn covers(line: &str, at: u64) -> bool {
    let mut f = line.split_whitespace().rev();
    let (Some(end), Some(start)) = (f.next(), f.next()) else {
        return false;
    };
    matches!((start.parse::<u64>(), end.parse::<u64>()), (Ok(s), Ok(e)) if s <= at && at <= e)
}

fn open(p: &Path, writable: bool, share: bool) -> vmi_disk::Result<Image> {
    Image::open(
        p,
        &OpenOptions::new()
            .format(Some(Format::Qcow2))
            .write(writable)
            .force_share(share),
    )
}

fn message(e: &vmi_disk::Error) -> String {
    let mut m = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(s) = src {
        m.push_str(&format!(": {s}"));
        src = s.source();
    }
    m
}

fn image(dir: &Path) -> PathBuf {
    let q = dir.join("img.qcow2");
    qemu_create(&q, "qcow2", "", 4 * MIB);
    qemu_io(&q, "qcow2", "write -P 0x42 0 64k");
    q
}

fn qemu_io_output(p: &Path, cmd: &str) -> Output {
    Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", cmd, s(p)])
        .output()
        .unwrap()
}

#[test]
fn a_running_qemu_writer_keeps_vmi_out_and_force_share_still_reads() {
    let dir = tempfile::tempdir().unwrap();
    let q = image(dir.path());
    {
        let _nbd = Nbd::start(dir.path(), &q, false);
        let e = open(&q, true, false).unwrap_err();
        assert!(
            message(&e)
                .contains("Failed to get \"write\" lock: Is another process using the image"),
            "{}",
            message(&e)
        );
        let e = open(&q, false, false).unwrap_err();
        assert!(
            message(&e).contains("Failed to get shared \"write\" lock"),
            "{}",
            message(&e)
        );
        let img = open(&q, false, true).unwrap();
        let mut buf = vec![0u8; 4096];
        img.read_at(&mut buf, 0).unwrap();
        assert!(buf.iter().all(|&b| b == 0x42));
    }
    // Once the server is gone the image is free again.
    let img = open(&q, true, false).unwrap();
    img.write_at(&[1; 512], 0).unwrap();
    img.close().unwrap();
}

#[test]
fn a_running_qemu_reader_lets_vmi_read_but_not_write() {
    let dir = tempfile::tempdir().unwrap();
    let q = image(dir.path());
    let _nbd = Nbd::start(dir.path(), &q, true);
    let img = open(&q, false, false).unwrap();
    drop(img);
    let e = open(&q, true, false).unwrap_err();
    assert!(
        message(&e).contains("Failed to get \"write\" lock"),
        "{}",
        message(&e)
    );
}

#[test]
fn qemu_is_kept_out_while_vmi_writes_and_may_read_while_vmi_reads() {
    let dir = tempfile::tempdir().unwrap();
    let q = image(dir.path());
    let img = open(&q, true, false).unwrap();
    img.write_at(&[7; 4096], 0).unwrap();
    let (code, _, err) = qemu_img_status(&["info", "-f", "qcow2", s(&q)]);
    assert_ne!(code, 0);
    assert!(err.contains("Failed to get shared \"write\" lock"), "{err}");
    let out = qemu_io_output(&q, "write 0 512");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Failed to get \"write\" lock"),
        "{out:?}"
    );
    // qemu-img's own -U reads anyway.
    let (code, _, err) = qemu_img_status(&["info", "-U", "-f", "qcow2", s(&q)]);
    assert_eq!(code, 0, "{err}");
    img.close().unwrap();
    // A vmi reader and a qemu reader share the image; a qemu writer is refused.
    let img = open(&q, false, false).unwrap();
    let (code, _, err) = qemu_img_status(&["check", "-f", "qcow2", s(&q)]);
    assert_eq!(code, 0, "{err}");
    let out = qemu_io_output(&q, "write 0 512");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Failed to get \"write\" lock"),
        "{out:?}"
    );
    drop(img);
    qemu_io(&q, "qcow2", "write -P 0x43 0 512");
}

#[test]
fn one_process_may_hold_an_image_for_reading_and_writing() {
    let dir = tempfile::tempdir().unwrap();
    let q = image(dir.path());
    // As commit does: the base is open read-only as a backing file and for writing.
    let ro = open(&q, false, false).unwrap();
    let rw = open(&q, true, false).unwrap();
    rw.write_at(&[9; 512], 0).unwrap();
    rw.close().unwrap();
    // The reader's locks stay: qemu may read but not write.
    let (code, _, err) = qemu_img_status(&["info", "-f", "qcow2", s(&q)]);
    assert_eq!(code, 0, "{err}");
    let out = qemu_io_output(&q, "write 0 512");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Failed to get \"write\" lock"),
        "{out:?}"
    );
    drop(ro);
    qemu_io(&q, "qcow2", "write -P 0x44 0 512");
}
