//! OpenStack's format_inspector test cases (oslo.utils `oslo_utils/tests/imageutils/
//! test_format_inspector.py`), ported: each builds the same image (with qemu-img where the original
//! does, by hand where it edits bytes) and asserts that `inspect` reaches at least
//! format_inspector's verdict — the same format and virtual size for a safe image, a violation
//! where format_inspector's safety check fails. Cases that exercise only format_inspector's own
//! machinery (its capture regions, its streaming wrapper, its class registry) have no counterpart.

use std::path::{Path, PathBuf};
use vmi_disk::inspect::{inspect_path, InspectOptions, Inspection, ViolationKind};
use vmi_disk::Format;
use vmi_testkit::qemu::{qemu_create, qemu_img, qemu_info};

const MI: u64 = 1 << 20;

fn inspect_as(path: &Path, expected: Option<Format>) -> Inspection {
    let o = InspectOptions {
        expected_format: expected,
        ..Default::default()
    };
    inspect_path(path, &o).unwrap_or_else(|e| panic!("inspect {}: {e}", path.display()))
}

fn kinds(i: &Inspection) -> Vec<ViolationKind> {
    i.violations.iter().map(|v| v.kind).collect()
}

#[track_caller]
fn assert_unsafe(path: &Path, expected: Option<Format>, kind: ViolationKind) {
    let i = inspect_as(path, expected);
    assert!(
        kinds(&i).contains(&kind),
        "{}: expected {kind:?}, got {:?}",
        path.display(),
        i.violations
    );
}

#[track_caller]
fn assert_safe(path: &Path, expected: Format) -> Inspection {
    let i = inspect_as(path, Some(expected));
    assert_eq!(i.format, expected, "{}", path.display());
    assert!(i.is_safe(), "{}: {:?}", path.display(), i.violations);
    i
}

fn qemu_virtual_size(path: &Path, fmt: &str) -> u64 {
    qemu_info(path, fmt)["virtual-size"].as_u64().unwrap()
}

/// format_inspector's `_create_gpt`: ten sectors, an EFI protective MBR entry in slot 0.
fn gpt_image(dir: &Path) -> PathBuf {
    let mut data = vec![0u8; 512 * 10];
    data[510] = 0x55;
    data[511] = 0xaa;
    data[446 + 2] = 0x02; // start head
    data[446 + 4] = 0xee; // OS type: GPT protective
    data[446 + 8..446 + 12].copy_from_slice(&1u32.to_le_bytes()); // start LBA
    let p = dir.join("gpt.img");
    std::fs::write(&p, &data).unwrap();
    p
}

/// An ISO 9660 volume (ECMA-119 §8.4) of `bytes`, or a UDF one (ECMA-167 volume recognition
/// sequence BEA01, NSR02, TEA01), as mkisofs makes them for format_inspector's `_create_iso`.
fn iso_image(dir: &Path, bytes: u64, udf: bool) -> PathBuf {
    const S: usize = 2048;
    let sectors = u32::try_from(bytes / S as u64).unwrap();
    let mut v = vec![0u8; sectors as usize * S];
    let vds = 16 * S;
    let pvd = &mut v[vds..vds + S];
    pvd[0] = 1;
    pvd[1..6].copy_from_slice(b"CD001");
    pvd[6] = 1;
    pvd[40..44].copy_from_slice(b"TEST");
    pvd[80..84].copy_from_slice(&sectors.to_le_bytes());
    pvd[84..88].copy_from_slice(&sectors.to_be_bytes());
    pvd[128..130].copy_from_slice(&2048u16.to_le_bytes());
    pvd[130..132].copy_from_slice(&2048u16.to_be_bytes());
    pvd[881] = 1;
    let term = &mut v[vds + S..vds + 2 * S];
    term[0] = 255;
    term[1..6].copy_from_slice(b"CD001");
    term[6] = 1;
    if udf {
        for (i, id) in [b"BEA01", b"NSR02", b"TEA01"].iter().enumerate() {
            let d = &mut v[vds + (2 + i) * S..vds + (3 + i) * S];
            d[1..6].copy_from_slice(*id);
            d[6] = 1;
        }
    }
    let p = dir.join(if udf { "udf.iso" } else { "9660.iso" });
    std::fs::write(&p, &v).unwrap();
    p
}

/// format_inspector's `_test_format`: 128 MiB, 129 MiB and 7 MiB images are detected, sized as
/// qemu-img sizes them, and safe.
#[test]
fn images_of_every_format_at_three_sizes_are_detected_sized_and_safe() {
    let dir = tempfile::tempdir().unwrap();
    for (fmt, opts, format) in [
        ("qcow2", "", Format::Qcow2),
        ("vpc", "", Format::Vpc),
        ("vhdx", "", Format::Vhdx),
        ("vmdk", "", Format::Vmdk),
        ("vmdk", "subformat=streamOptimized", Format::Vmdk),
        ("vdi", "", Format::Vdi),
    ] {
        for size in [128 * MI, 129 * MI, 7 * MI] {
            let p = dir.path().join(format!("{fmt}-{size}"));
            qemu_create(&p, fmt, opts, size);
            let i = assert_safe(&p, format);
            assert_eq!(
                i.virtual_size,
                Some(qemu_virtual_size(&p, fmt)),
                "{fmt} {opts} {size}"
            );
            std::fs::remove_file(&p).unwrap();
        }
    }
}

#[test]
fn a_gpt_disk_is_a_safe_raw_disk() {
    let dir = tempfile::tempdir().unwrap();
    let p = gpt_image(dir.path());
    let i = assert_safe(&p, Format::Raw);
    assert_eq!(i.virtual_size, Some(5120));
}

#[test]
fn iso9660_and_udf_volumes_are_safe_isos() {
    let dir = tempfile::tempdir().unwrap();
    for udf in [false, true] {
        let p = iso_image(dir.path(), 7 * MI, udf);
        let i = assert_safe(&p, Format::Iso);
        assert_eq!(i.virtual_size, Some(7 * MI));
        // Declared raw, an ISO is accepted (ISO images are raw bytes).
        assert!(inspect_as(&p, Some(Format::Raw)).is_safe());
    }
}

/// `_generate_bad_iso` / `test_bad_iso_qcow2`: a qcow2 header in an ISO's system area.
#[test]
fn an_iso_with_a_qcow2_header_in_its_system_area_matches_both_formats() {
    let dir = tempfile::tempdir().unwrap();
    let q = dir.path().join("orig.qcow2");
    qemu_create(&q, "qcow2", "", 5 * MI);
    let iso = iso_image(dir.path(), 64 * MI, false);
    let mut bad = std::fs::read(&iso).unwrap();
    let head = std::fs::read(&q).unwrap();
    bad[..32 * 1024].copy_from_slice(&head[..32 * 1024]);
    let p = dir.path().join("bad.iso");
    std::fs::write(&p, &bad).unwrap();
    let i = inspect_as(&p, Some(Format::Iso));
    assert_eq!(i.matches, vec![Format::Qcow2, Format::Iso]);
    assert!(kinds(&i).contains(&ViolationKind::MultipleFormats));
}

#[test]
fn qed_images_are_detected_and_refused_when_declared_anything_a_registry_accepts() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("a.qed");
    qemu_create(&p, "qed", "", 5 * MI);
    let i = inspect_as(&p, Some(Format::Raw));
    assert_eq!(i.format, Format::Qed);
    assert!(kinds(&i).contains(&ViolationKind::FormatMismatch));
    for declared in [Format::Qcow2, Format::Vmdk, Format::Vpc, Format::Iso] {
        assert!(!inspect_as(&p, Some(declared)).is_safe(), "{declared}");
    }
}

#[test]
fn a_monolithic_flat_vmdk_is_unsafe() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("flat.vmdk");
    qemu_create(&p, "vmdk", "subformat=monolithicFlat", 5 * MI);
    let i = inspect_as(&p, Some(Format::Vmdk));
    assert_eq!(i.format, Format::Vmdk);
    assert!(!i.is_safe());
}

/// `_test_vmdk_bad_descriptor_offset`: the header's descriptor offset moved to sector 2.
#[test]
fn a_vmdk_whose_descriptor_is_not_at_sector_one_is_unsafe() {
    let dir = tempfile::tempdir().unwrap();
    for sub in ["monolithicSparse", "streamOptimized"] {
        let p = dir.path().join(format!("{sub}.vmdk"));
        qemu_create(&p, "vmdk", &format!("subformat={sub}"), 5 * MI);
        let mut b = std::fs::read(&p).unwrap();
        b[0x1c..0x24].copy_from_slice(&2u64.to_le_bytes());
        std::fs::write(&p, &b).unwrap();
        let i = inspect_as(&p, Some(Format::Vmdk));
        assert!(!i.is_safe(), "{sub}: {:?}", i.violations);
    }
}

/// `_test_vmdk_bad_descriptor_mem_limit`: the descriptor size claims 2 MiB of a fully allocated
/// image; the image is still a 5 MiB VMDK and inspection reads no more than its bound.
#[test]
fn a_vmdk_claiming_a_huge_descriptor_is_still_sized_right() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("r.raw");
    vmi_testkit::scattered_raw(&raw, 5 * MI, 40, 3);
    for sub in ["monolithicSparse", "streamOptimized"] {
        let p = dir.path().join(format!("{sub}.vmdk"));
        qemu_img(&[
            "convert",
            "-f",
            "raw",
            "-O",
            "vmdk",
            "-o",
            &format!("subformat={sub}"),
            "-S",
            "0",
            raw.to_str().unwrap(),
            p.to_str().unwrap(),
        ]);
        let mut b = std::fs::read(&p).unwrap();
        b[0x24..0x2c].copy_from_slice(&((2 * MI) / 512).to_le_bytes());
        std::fs::write(&p, &b).unwrap();
        let i = inspect_as(&p, Some(Format::Vmdk));
        assert_eq!(i.format, Format::Vmdk, "{sub}");
        assert_eq!(i.virtual_size, Some(5 * MI), "{sub}: {:?}", i.violations);
    }
}

/// `test_qcow2_safety_checks`.
#[test]
fn qcow2_with_a_backing_file_or_a_data_file_is_unsafe_and_text_is_not_qcow2() {
    let dir = tempfile::tempdir().unwrap();
    let backing = dir.path().join("backing");
    std::fs::write(&backing, "foobar").unwrap();
    let plain = dir.path().join("plain.qcow2");
    qemu_create(&plain, "qcow2", "", 5 * MI);
    assert_safe(&plain, Format::Qcow2);
    let with_backing = dir.path().join("b.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        backing.to_str().unwrap(),
        "-F",
        "raw",
        with_backing.to_str().unwrap(),
        &(5 * MI).to_string(),
    ]);
    assert_unsafe(
        &with_backing,
        Some(Format::Qcow2),
        ViolationKind::BackingFile,
    );
    let with_data = dir.path().join("d.qcow2");
    let o = format!(
        "data_file={},data_file_raw=on",
        dir.path().join("data").display()
    );
    qemu_create(&with_data, "qcow2", &o, 5 * MI);
    assert_unsafe(&with_data, Some(Format::Qcow2), ViolationKind::DataFile);
    assert_unsafe(&backing, Some(Format::Qcow2), ViolationKind::FormatMismatch);
}

fn qcow2_with(dir: &Path, name: &str, edit: impl FnOnce(&mut Vec<u8>)) -> PathBuf {
    let p = dir.join(name);
    qemu_create(&p, "qcow2", "", MI);
    let mut b = std::fs::read(&p).unwrap();
    edit(&mut b);
    std::fs::write(&p, &b).unwrap();
    p
}

/// `test_qcow2_feature_flag_checks`, on real images: the incompatible-feature bytes at 0x48.
#[test]
fn qcow2_unknown_feature_bits_and_versions_are_unsafe() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let high = qcow2_with(d, "high.qcow2", |b| b[0x48] = 0x01);
    assert_unsafe(&high, Some(Format::Qcow2), ViolationKind::UnknownFeatures);
    let dirty = qcow2_with(d, "dirty.qcow2", |b| b[0x4f] = 0x01);
    assert_safe(&dirty, Format::Qcow2);
    let bit7 = qcow2_with(d, "bit7.qcow2", |b| b[0x4f] = 0x80);
    assert_unsafe(&bit7, Some(Format::Qcow2), ViolationKind::UnknownFeatures);
    // Version 1 is the older qcow format: not a qcow2.
    let v1 = qcow2_with(d, "v1.qcow2", |b| b[7] = 1);
    let i = inspect_as(&v1, Some(Format::Qcow2));
    assert_eq!(i.format, Format::Qcow);
    assert!(!i.is_safe());
    // Version 4 does not exist: refused, never read as raw.
    let v4 = qcow2_with(d, "v4.qcow2", |b| b[7] = 4);
    let i = inspect_as(&v4, Some(Format::Qcow2));
    assert_eq!(i.format, Format::Qcow2);
    assert!(
        kinds(&i).contains(&ViolationKind::UnknownFeatures),
        "{:?}",
        i.violations
    );
    assert_unsafe(&v4, Some(Format::Raw), ViolationKind::FormatMismatch);
    // Version 2 has no feature fields: those bytes are not read as features.
    let p = dir.path().join("v2.qcow2");
    qemu_create(&p, "qcow2", "compat=0.10", MI);
    let mut b = std::fs::read(&p).unwrap();
    b[0x48] = 0x01;
    b[0x4f] = 0x80;
    std::fs::write(&p, &b).unwrap();
    let i = inspect_as(&p, Some(Format::Qcow2));
    assert!(
        !kinds(&i).contains(&ViolationKind::UnknownFeatures),
        "{:?}",
        i.violations
    );
}

/// `test_invalid_data` / `test_invalid_data_without_raw`: this source file is raw, not anything else.
#[test]
fn a_text_file_is_raw_and_nothing_else() {
    let me = Path::new(file!()).canonicalize().unwrap_or_else(|_| {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/format_inspector.rs")
    });
    let i = inspect_as(&me, Some(Format::Raw));
    assert_eq!((i.format, i.matches.len()), (Format::Raw, 0));
    assert!(i.is_safe(), "{:?}", i.violations);
    for declared in [Format::Qcow2, Format::Vmdk] {
        assert_unsafe(&me, Some(declared), ViolationKind::FormatMismatch);
    }
}

/// A monolithicSparse VMDK made by qemu-img with its embedded descriptor (at sector 1) replaced.
fn sparse_vmdk_with_descriptor(dir: &Path, name: &str, edit: impl Fn(&str) -> String) -> PathBuf {
    let p = dir.join(name);
    qemu_create(&p, "vmdk", "", 5 * MI);
    let mut b = std::fs::read(&p).unwrap();
    let area = &mut b[512..512 * 21];
    let end = area.iter().position(|&c| c == 0).unwrap();
    let text = edit(std::str::from_utf8(&area[..end]).unwrap());
    assert!(text.len() < area.len(), "descriptor fits");
    area.fill(0);
    area[..text.len()].copy_from_slice(text.as_bytes());
    std::fs::write(&p, &b).unwrap();
    p
}

/// `test_vmdk_invalid_type`.
#[test]
fn a_vmdk_with_an_unknown_create_type_is_unsafe() {
    let dir = tempfile::tempdir().unwrap();
    let p = sparse_vmdk_with_descriptor(dir.path(), "t.vmdk", |t| {
        t.replace("monolithicSparse", "someunknownformat")
    });
    assert!(!inspect_as(&p, Some(Format::Vmdk)).is_safe());
}

/// `test_vmdk_safety_checks`, and the four embedded-descriptor tricks.
#[test]
fn a_sparse_vmdk_whose_descriptor_names_other_extents_is_unsafe() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let plain = sparse_vmdk_with_descriptor(d, "plain.vmdk", |t| t.to_string());
    assert_safe(&plain, Format::Vmdk);
    let flat_type = sparse_vmdk_with_descriptor(d, "ct.vmdk", |t| {
        t.replace(
            "createType=\"monolithicSparse\"",
            "createType monolithicFlat",
        )
    });
    assert!(!inspect_as(&flat_type, Some(Format::Vmdk)).is_safe());
    let flat_type = sparse_vmdk_with_descriptor(d, "ct2.vmdk", |t| {
        t.replace("monolithicSparse", "monolithicFlat")
    });
    assert_unsafe(&flat_type, Some(Format::Vmdk), ViolationKind::CreateType);
    let added = sparse_vmdk_with_descriptor(d, "added.vmdk", |t| {
        t.replace(
            "# The Disk Data Base",
            "RW 2048 FLAT \"/etc/hosts\" 0\n# The Disk Data Base",
        )
    });
    assert_unsafe(&added, Some(Format::Vmdk), ViolationKind::Extents);
    let replaced = sparse_vmdk_with_descriptor(d, "replaced.vmdk", |t| {
        let l = t.lines().find(|l| l.starts_with("RW ")).unwrap();
        t.replace(l, "RW 10240 FLAT \"/etc/passwd\" 0")
    });
    assert_unsafe(&replaced, Some(Format::Vmdk), ViolationKind::Extents);
    let wronly = sparse_vmdk_with_descriptor(d, "wronly.vmdk", |t| {
        format!("{t}wronly 2048 somefile2.vmdk\n")
    });
    assert_unsafe(&wronly, Some(Format::Vmdk), ViolationKind::Descriptor);
    let slash =
        sparse_vmdk_with_descriptor(d, "slash.vmdk", |t| format!("{t}rw 2048 /etc/hosts\n"));
    assert_unsafe(&slash, Some(Format::Vmdk), ViolationKind::Extents);
    let none = sparse_vmdk_with_descriptor(d, "none.vmdk", |t| {
        t.lines()
            .filter(|l| !l.starts_with("RW "))
            .map(|l| format!("{l}\n"))
            .collect()
    });
    assert_unsafe(&none, Some(Format::Vmdk), ViolationKind::Extents);
    let unknown =
        sparse_vmdk_with_descriptor(d, "unknown.vmdk", |t| format!("{t}someUnknownThing=foo\n"));
    assert_safe(&unknown, Format::Vmdk);
}

/// `test_vmdk_format_checks`: a KDMV magic with an unknown version, or with no descriptor.
#[test]
fn a_vmdk_header_with_a_bad_version_or_no_descriptor_is_unsafe() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("a.vmdk");
    qemu_create(&p, "vmdk", "", 5 * MI);
    let orig = std::fs::read(&p).unwrap();
    let mut b = orig.clone();
    b[4..8].copy_from_slice(&0u32.to_le_bytes());
    std::fs::write(&p, &b).unwrap();
    assert!(!inspect_as(&p, Some(Format::Vmdk)).is_safe());
    let mut b = orig.clone();
    b[0x1c..0x2c].fill(0);
    std::fs::write(&p, &b).unwrap();
    assert_unsafe(&p, Some(Format::Vmdk), ViolationKind::Descriptor);
    let zeros = dir.path().join("zeros");
    std::fs::write(&zeros, vec![0u8; 512]).unwrap();
    assert_unsafe(&zeros, Some(Format::Vmdk), ViolationKind::FormatMismatch);
}

/// `test_vmdk_with_footer` and `test_vmdk_footer_checks`: a streamOptimized image that says its
/// directory is in a footer must have a footer that agrees with its header.
#[test]
fn a_stream_optimized_footer_must_agree_with_the_header() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("s.vmdk");
    qemu_create(&p, "vmdk", "subformat=streamOptimized", 5 * MI);
    let orig = std::fs::read(&p).unwrap();
    let header: Vec<u8> = orig[..512].to_vec();
    let gd = u64::from_le_bytes(header[56..64].try_into().unwrap());
    // With the header's directory at the end and three zero sectors appended: no valid footer.
    let mut b = orig.clone();
    b[56..64].copy_from_slice(&u64::MAX.to_le_bytes());
    b.extend(vec![0u8; 512 * 3]);
    std::fs::write(&p, &b).unwrap();
    assert!(!inspect_as(&p, Some(Format::Vmdk)).is_safe());
    let footer = |edit: &dyn Fn(&mut [u8])| {
        let mut b = b.clone();
        let n = b.len();
        b[n - 3 * 512 + 12..n - 3 * 512 + 16].copy_from_slice(&3u32.to_le_bytes());
        let f = &mut b[n - 2 * 512..n - 512];
        f.copy_from_slice(&header);
        f[56..64].copy_from_slice(&gd.to_le_bytes());
        edit(&mut b);
        std::fs::write(&p, &b).unwrap();
        inspect_as(&p, Some(Format::Vmdk))
    };
    let i = footer(&|_| {});
    assert!(i.is_safe(), "{:?}", i.violations);
    let n = b.len();
    let (fm, ft, eos) = (n - 3 * 512, n - 2 * 512, n - 512);
    let cases: Vec<(&str, Edit)> = vec![
        (
            "signature",
            Box::new(move |b| b[ft..ft + 4].copy_from_slice(b"leak")),
        ),
        ("version", Box::new(move |b| b[ft + 4] = 2)),
        ("descriptor size", Box::new(move |b| b[ft + 0x24] += 1)),
        ("descriptor offset", Box::new(move |b| b[ft + 0x1c] += 1)),
        (
            "another footer",
            Box::new(move |b| b[ft + 56..ft + 64].copy_from_slice(&u64::MAX.to_le_bytes())),
        ),
        ("footer marker type", Box::new(move |b| b[fm + 12] = 7)),
        ("footer marker size", Box::new(move |b| b[fm + 8] = 1)),
        ("footer marker padding", Box::new(move |b| b[fm + 100] = 1)),
        ("eos marker type", Box::new(move |b| b[eos + 12] = 7)),
        ("eos marker size", Box::new(move |b| b[eos + 8] = 1)),
        ("eos marker padding", Box::new(move |b| b[eos + 100] = 1)),
    ];
    for (what, edit) in cases {
        let i = footer(edit.as_ref());
        assert!(!i.is_safe(), "{what}: accepted");
    }
}

/// One edit of a file's bytes.
type Edit = Box<dyn Fn(&mut [u8])>;

fn mbr_disk(dir: &Path, entries: &[(usize, u8, u8, u8, u32)]) -> PathBuf {
    let mut data = vec![0u8; 1024];
    data[510] = 0x55;
    data[511] = 0xaa;
    for &(n, boot, ostype, starth, startlba) in entries {
        let e = &mut data[446 + n * 16..446 + n * 16 + 16];
        e[0] = boot;
        e[2] = starth;
        e[4] = ostype;
        e[8..12].copy_from_slice(&startlba.to_le_bytes());
    }
    let p = dir.join("mbr.img");
    std::fs::write(&p, &data).unwrap();
    p
}

/// `test_gpt_mbr_check`.
#[test]
fn a_raw_disk_with_an_inconsistent_mbr_is_unsafe() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let efi = (0, 0, 0xee, 2, 1);
    assert_safe(&mbr_disk(d, &[efi]), Format::Raw);
    for (what, entries) in [
        ("boot flag", vec![(0, 0x0a, 0xee, 2, 1)]),
        ("no partitions", vec![(0, 0, 0, 2, 1)]),
        ("extra partitions", vec![efi, (1, 0, 0xee, 2, 1)]),
        ("start CHS", vec![(0, 0, 0xee, 1, 1)]),
        ("start LBA", vec![(0, 0, 0xee, 2, 2)]),
    ] {
        let p = mbr_disk(d, &entries);
        assert_unsafe(&p, Some(Format::Raw), ViolationKind::PartitionTable);
        let _ = what;
    }
    // Any start CHS and LBA is fine for other partition types, beside other partitions.
    assert_safe(
        &mbr_disk(d, &[(0, 0, 0x8e, 1, 2), (1, 0x80, 2, 0, 63)]),
        Format::Raw,
    );
    // A FAT boot sector carries the signature too; it is not an MBR.
    let mut fat = vec![0u8; 1024];
    fat[510] = 0x55;
    fat[511] = 0xaa;
    fat[0x10] = 2;
    fat[0x15] = 0xf8;
    let p = d.join("fat.img");
    std::fs::write(&p, &fat).unwrap();
    assert_safe(&p, Format::Raw);
}

/// `_create_luks` / the LUKS inspector: a LUKS container is never a raw disk. Waiting for the LUKS
/// probe (formats/luks), written beside this work.
#[test]
fn a_luks_container_is_not_raw() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("a.luks");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "luks",
        "--object",
        "secret,id=sec0,data=secret-passphrase",
        "-o",
        "key-secret=sec0,iter-time=10",
        p.to_str().unwrap(),
        &(7 * MI).to_string(),
    ]);
    let i = inspect_as(&p, Some(Format::Raw));
    assert_eq!(i.format, Format::Luks);
    assert!(!i.is_safe());
}
