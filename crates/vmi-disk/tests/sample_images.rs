//! QEMU's own sample images (tests/fixtures/qemu-sample-images, from QEMU's
//! tests/qemu-iotests/sample_images): every one that qemu-img reads, vmi reads identically
//! (compared range by range against `qemu-img convert -O raw`, skipping ranges both sides know to
//! be zero, so the 10 GiB images cost no 10 GiB buffers), and every one qemu-img refuses, vmi
//! refuses.

use std::path::{Path, PathBuf};
use std::process::Command;
use vmi_disk::storage::{FileStorage, Storage};
use vmi_disk::{BlockKind, Image, OpenOptions};

const CHUNK: u64 = 1 << 20;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/qemu-sample-images")
}

fn unpack(name: &str, dir: &Path) -> PathBuf {
    let out = Command::new("bzip2")
        .args(["-dc"])
        .arg(fixtures().join(name))
        .output()
        .expect("bzip2 is installed");
    assert!(out.status.success(), "bunzip2 {name}");
    let p = dir.join(name.trim_end_matches(".bz2"));
    std::fs::write(&p, &out.stdout).unwrap();
    p
}

/// `qemu-img convert -O raw`. A VHDX whose log needs replaying qemu-img opens only after `check -r
/// all` replays it (read-only opens refuse); vmi replays such a log in memory on a read-only open,
/// so the comparison is with what qemu-img reads after its replay, on a copy.
fn qemu_reads(p: &Path, raw: &Path) -> bool {
    let convert = |src: &Path| {
        Command::new("qemu-img")
            .args(["convert", "-O", "raw"])
            .arg(src)
            .arg(raw)
            .output()
            .expect("qemu-img is installed")
    };
    let out = convert(p);
    if out.status.success() {
        return true;
    }
    if String::from_utf8_lossy(&out.stderr).contains("log that needs to be replayed") {
        let copy = p.with_extension("replayed");
        std::fs::copy(p, &copy).unwrap();
        let replay = Command::new("qemu-img")
            .args(["check", "-r", "all"])
            .arg(&copy)
            .output()
            .expect("qemu-img is installed");
        let ok = replay.status.success() && convert(&copy).status.success();
        std::fs::remove_file(&copy).unwrap();
        return ok;
    }
    false
}

/// vmi's guest bytes equal the raw file's, range by range.
fn assert_reads_like(img: &Image, raw: &Path, name: &str) {
    let st = FileStorage::open(raw, false).unwrap();
    let size = img.virtual_size();
    assert_eq!(st.len().unwrap(), size, "{name}: virtual size");
    let mut a = vec![0u8; CHUNK as usize];
    let mut b = vec![0u8; CHUNK as usize];
    let mut off = 0;
    while off < size {
        let bs = img.block_status(off, (size - off).min(CHUNK)).unwrap();
        let n = bs.len;
        let zero_here = matches!(bs.kind, BlockKind::Zero | BlockKind::Unallocated);
        // Both sides zero: vmi says so and the raw file has no data in the range.
        let raw_hole = st
            .next_data(off)
            .unwrap()
            .is_none_or(|(start, _)| start >= off + n);
        if !(zero_here && raw_hole) {
            let n = n as usize;
            img.read_at(&mut a[..n], off).unwrap();
            st.read_at(&mut b[..n], off).unwrap();
            assert!(a[..n] == b[..n], "{name}: differs in {off}+{n}");
        }
        off += n;
    }
}

#[test]
fn every_sample_image_qemu_reads_vmi_reads_identically_and_the_rest_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut names: Vec<String> = std::fs::read_dir(fixtures())
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.ends_with(".bz2"))
        .collect();
    names.sort();
    assert!(names.len() >= 16, "{names:?}");
    for name in &names {
        let p = unpack(name, dir.path());
        let raw = dir.path().join("out.raw");
        let _ = std::fs::remove_file(&raw);
        let theirs = qemu_reads(&p, &raw);
        let mine = Image::open(&p, &OpenOptions::new());
        match (theirs, mine) {
            (true, Ok(img)) => assert_reads_like(&img, &raw, name),
            (true, Err(e)) => panic!("{name}: qemu-img reads it, vmi refuses: {e}"),
            (false, Ok(img)) => {
                // Opening may succeed where qemu fails reading: then reading must fail too.
                let mut buf = vec![0u8; CHUNK as usize];
                let size = img.virtual_size();
                let mut failed = false;
                let mut off = 0;
                while off < size && !failed {
                    let n = (size - off).min(CHUNK);
                    failed = img.read_at(&mut buf[..n as usize], off).is_err();
                    off += n;
                }
                assert!(failed, "{name}: qemu-img refuses it, vmi reads it");
            }
            (false, Err(_)) => {}
        }
        std::fs::remove_file(&p).unwrap();
        let _ = std::fs::remove_file(&raw);
    }
}
