//! Probing rules (docs/formats/probing.md): raw is the fallback, each format's probe answers with a
//! confidence, and a file that more than one non-raw format claims is refused as ambiguous.

use std::fs;
use std::path::Path;
use std::process::Command;
use vmi_disk::formats::{probe_all, ProbeInput, PROBE_HEAD, PROBE_TAIL};
use vmi_disk::storage::MemStorage;
use vmi_disk::{probe, Confidence, CreateOptions, ErrorKind, Format, Image, OpenOptions};
use vmi_testkit::fixtures::{pattern, read_file};
use vmi_testkit::qemu::{qemu_create, qemu_info};

const SECTOR: usize = 2048;
/// ECMA-119: the volume descriptor set starts at sector 16.
const VDS: usize = 16 * SECTOR;

/// A minimal ISO 9660 volume of `sectors` 2048-byte sectors: an empty system area, a primary
/// volume descriptor and a set terminator (ECMA-119 §8.3, §8.4).
fn minimal_iso(sectors: u32) -> Vec<u8> {
    let mut v = vec![0u8; sectors as usize * SECTOR];
    let pvd = &mut v[VDS..VDS + SECTOR];
    pvd[0] = 1;
    pvd[1..6].copy_from_slice(b"CD001");
    pvd[6] = 1;
    pvd[40..51].copy_from_slice(b"VMI_PROBING");
    pvd[80..84].copy_from_slice(&sectors.to_le_bytes());
    pvd[84..88].copy_from_slice(&sectors.to_be_bytes());
    pvd[128..130].copy_from_slice(&2048u16.to_le_bytes());
    pvd[130..132].copy_from_slice(&2048u16.to_be_bytes());
    pvd[881] = 1;
    let term = &mut v[VDS + SECTOR..VDS + 2 * SECTOR];
    term[0] = 255;
    term[1..6].copy_from_slice(b"CD001");
    term[6] = 1;
    v
}

/// What every format's probe says about `bytes`.
fn matches(bytes: &[u8]) -> Vec<(Format, Confidence)> {
    let head = &bytes[..bytes.len().min(PROBE_HEAD)];
    let tail = &bytes[bytes.len().saturating_sub(PROBE_TAIL)..];
    probe_all(&ProbeInput {
        head,
        tail,
        len: bytes.len() as u64,
    })
}

fn probe_bytes(bytes: &[u8]) -> vmi_disk::Result<vmi_disk::Probe> {
    probe(&MemStorage::from_bytes(bytes.to_vec()))
}

fn tool(name: &str) -> bool {
    Command::new(name)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

#[test]
fn unrecognised_bytes_fall_back_to_raw() {
    for bytes in [
        Vec::new(),
        vec![0u8; 100],
        vec![0u8; 1 << 20],
        pattern(1, 70_000),
    ] {
        let p = probe_bytes(&bytes).expect("probe");
        assert_eq!(p.format, Format::Raw, "{} bytes", bytes.len());
        assert_eq!(p.confidence, Confidence::Fallback);
        assert!(p.matches.is_empty());
    }
}

#[test]
fn minimal_iso_built_in_code_is_iso_and_reads_as_raw() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = minimal_iso(40);
    let p = probe_bytes(&bytes).expect("probe");
    assert_eq!((p.format, p.confidence), (Format::Iso, Confidence::Certain));
    let path = dir.path().join("min.iso");
    fs::write(&path, &bytes).unwrap();
    let img = Image::open(&path, &OpenOptions::new()).expect("open");
    assert_eq!(img.format(), Format::Iso);
    assert_eq!(img.virtual_size(), bytes.len() as u64);
    let mut pvd = vec![0u8; SECTOR];
    img.read_at(&mut pvd, VDS as u64).expect("read");
    assert_eq!(&pvd[..], &bytes[VDS..VDS + SECTOR]);
}

#[test]
fn iso_from_a_mastering_tool_is_iso() {
    let Some(maker) = ["xorriso", "genisoimage"].into_iter().find(|t| tool(t)) else {
        eprintln!(
            "SKIP iso_from_a_mastering_tool_is_iso: neither xorriso nor genisoimage is installed"
        );
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let content = dir.path().join("content");
    fs::create_dir(&content).unwrap();
    fs::write(content.join("readme.txt"), b"vmi iso probe\n").unwrap();
    let iso = dir.path().join("real.iso");
    let mut cmd = Command::new(maker);
    if maker == "xorriso" {
        cmd.args(["-as", "mkisofs"]);
    }
    let out = cmd
        .args(["-quiet", "-J", "-R", "-o"])
        .arg(&iso)
        .arg(&content)
        .output()
        .expect("run iso maker");
    assert!(
        out.status.success(),
        "{maker}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let bytes = read_file(&iso);
    let p = probe_bytes(&bytes).expect("probe");
    assert_eq!(
        (p.format, p.confidence),
        (Format::Iso, Confidence::Certain),
        "{maker}"
    );
    let img = Image::open(&iso, &OpenOptions::new()).expect("open");
    assert_eq!(img.format(), Format::Iso);
    assert_eq!(img.virtual_size(), bytes.len() as u64);
}

#[test]
fn vdi_images_probe_certain() {
    let dir = tempfile::tempdir().unwrap();
    let q = dir.path().join("q.vdi");
    qemu_create(&q, "vdi", "", 4 << 20);
    let v = dir.path().join("v.vdi");
    Image::create(&v, Format::Vdi, &CreateOptions::new(4 << 20))
        .unwrap()
        .close()
        .unwrap();
    for path in [&q, &v] {
        let p = probe_bytes(&read_file(path)).expect("probe");
        assert_eq!((p.format, p.confidence), (Format::Vdi, Confidence::Certain));
    }
}

#[test]
fn vdi_of_another_version_is_still_vdi_never_raw() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("v.vdi");
    Image::create(&path, Format::Vdi, &CreateOptions::new(1 << 20))
        .unwrap()
        .close()
        .unwrap();
    let mut bytes = read_file(&path);
    bytes[0x44..0x48].copy_from_slice(&0x0002_0000u32.to_le_bytes());
    fs::write(&path, &bytes).unwrap();
    let p = probe_bytes(&bytes).expect("probe");
    assert_eq!((p.format, p.confidence), (Format::Vdi, Confidence::Weak));
    let e = Image::open(&path, &OpenOptions::new()).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unsupported, "{e}");
}

#[test]
fn iso_with_a_vdi_header_in_its_system_area_is_ambiguous() {
    let mut bytes = minimal_iso(40);
    bytes[0x40..0x44].copy_from_slice(&0xbeda_107fu32.to_le_bytes());
    bytes[0x44..0x48].copy_from_slice(&0x0001_0001u32.to_le_bytes());
    let e = probe_bytes(&bytes).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Refused, "{e}");
    assert!(e.to_string().contains("ambiguous"), "{e}");
    assert!(
        e.to_string().contains("vdi") && e.to_string().contains("iso"),
        "{e}"
    );

    // Naming the format explicitly is how a caller who knows better opens it.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("poly.iso");
    fs::write(&path, &bytes).unwrap();
    let img = Image::open(&path, &OpenOptions::new().format(Some(Format::Iso))).expect("open");
    assert_eq!(img.virtual_size(), bytes.len() as u64);
}

/// A polyglot: a real qcow2 image (qemu-img would open it as qcow2) whose first cluster also
/// carries an ISO 9660 volume descriptor set at sector 16.
fn qcow2_iso_polyglot(dir: &Path) -> (Vec<u8>, Vec<u8>) {
    let q = dir.join("plain.qcow2");
    qemu_create(&q, "qcow2", "", 1 << 20);
    assert_eq!(qemu_info(&q, "qcow2")["format"], "qcow2");
    let plain = read_file(&q);
    assert!(
        plain[VDS..VDS + 2 * SECTOR].iter().all(|&b| b == 0),
        "qcow2 header cluster is empty where the descriptors go"
    );
    let sectors = u32::try_from(plain.len() / SECTOR).unwrap();
    let iso = minimal_iso(sectors);
    let mut poly = plain.clone();
    poly[VDS..VDS + 2 * SECTOR].copy_from_slice(&iso[VDS..VDS + 2 * SECTOR]);
    (plain, poly)
}

#[test]
fn iso_with_a_qcow2_header_in_its_system_area_is_refused_as_ambiguous() {
    let dir = tempfile::tempdir().unwrap();
    let (plain, poly) = qcow2_iso_polyglot(dir.path());
    assert!(
        matches(&plain).iter().any(|(f, _)| *f == Format::Qcow2),
        "a plain qcow2 header probes as qcow2"
    );
    let found = matches(&poly);
    assert!(
        found.iter().any(|(f, _)| *f == Format::Iso),
        "the ISO descriptors are seen: {found:?}"
    );
    assert!(
        found.iter().any(|(f, _)| *f == Format::Qcow2),
        "the qcow2 header is seen: {found:?}"
    );
    let e = probe_bytes(&poly).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Refused, "{e}");
    assert!(e.to_string().contains("ambiguous"), "{e}");
}

#[test]
fn qcow_magic_of_any_version_and_qed_magic_are_never_raw() {
    let dir = tempfile::tempdir().unwrap();
    let q = dir.path().join("a.qcow2");
    qemu_create(&q, "qcow2", "", 1 << 20);
    let orig = read_file(&q);
    for (version, format, confidence) in [
        (0u8, Format::Qcow2, Confidence::Weak),
        (1, Format::Qcow, Confidence::Weak),
        (3, Format::Qcow2, Confidence::Certain),
        (4, Format::Qcow2, Confidence::Weak),
        (255, Format::Qcow2, Confidence::Weak),
    ] {
        let mut b = orig.clone();
        b[7] = version;
        let p = probe_bytes(&b).unwrap();
        assert_eq!(
            (p.format, p.confidence),
            (format, confidence),
            "version {version}"
        );
        if confidence == Confidence::Weak {
            let path = dir.path().join(format!("v{version}"));
            fs::write(&path, &b).unwrap();
            let e = Image::open(&path, &OpenOptions::new()).unwrap_err();
            assert_ne!(e.kind(), ErrorKind::Io, "version {version}: {e}");
        }
    }
    let qed = dir.path().join("a.qed");
    qemu_create(&qed, "qed", "", 1 << 20);
    let p = probe_bytes(&read_file(&qed)).unwrap();
    assert_eq!((p.format, p.confidence), (Format::Qed, Confidence::Certain));
    let qcow = dir.path().join("a.qcow");
    qemu_create(&qcow, "qcow", "", 1 << 20);
    let p = probe_bytes(&read_file(&qcow)).unwrap();
    assert_eq!(
        (p.format, p.confidence),
        (Format::Qcow, Confidence::Certain)
    );
    // Only a magic: still claimed, weakly.
    for magic in [&b"QFI\xfb"[..], &b"QED\0"[..]] {
        let mut b = magic.to_vec();
        b.resize(4096, 0);
        let p = probe_bytes(&b).unwrap();
        assert_ne!(p.format, Format::Raw, "{magic:?}");
        assert_eq!(p.confidence, Confidence::Weak);
    }
}
