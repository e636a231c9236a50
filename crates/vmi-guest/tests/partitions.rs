//! Partition tables built by util-linux's `sfdisk` and gdisk's `sgdisk`, read through vmi's
//! `Image` (raw and qcow2), and hand-damaged tables that must give clear errors.

use std::path::Path;
use std::process::{Command, Stdio};
use vmi_disk::{Image, OpenOptions};
use vmi_guest::{read_table, TableKind};

const MIB: u64 = 1 << 20;

fn have(tool: &str) -> bool {
    let ok = Command::new(tool)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok();
    if !ok {
        eprintln!("skipped: {tool} is not installed (apt-get install fdisk gdisk)");
    }
    ok
}

fn blank(path: &Path, size: u64) {
    std::fs::File::create(path).unwrap().set_len(size).unwrap();
}

fn sfdisk(path: &Path, script: &str) {
    let mut child = Command::new("sfdisk")
        .arg("-q")
        .arg(path)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(script.as_bytes())
        .unwrap();
    assert!(child.wait().unwrap().success(), "sfdisk failed");
}

fn run(cmd: &str, args: &[&str]) {
    let out = Command::new(cmd).args(args).output().unwrap();
    assert!(out.status.success(), "{cmd} {args:?}: {out:?}");
}

fn open(path: &Path) -> Image {
    Image::open(path, &OpenOptions::new()).unwrap()
}

#[test]
fn mbr_with_logical_partitions_reads_as_sfdisk_wrote_it() {
    if !have("sfdisk") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("mbr.raw");
    blank(&p, 64 * MIB);
    sfdisk(
        &p,
        "label: dos\nlabel-id: 0x12345678\nstart=2048, size=8M, type=83, bootable\n\
         start=18432, size=40M, type=5\nstart=20480, size=8M, type=82\nstart=40960, size=4M, type=83\n",
    );
    let t = read_table(&open(&p)).unwrap().unwrap();
    assert_eq!(t.kind, TableKind::Mbr);
    assert_eq!(t.disk_id, "0x12345678");
    let got: Vec<(u32, u64, u64, &str, bool)> = t
        .partitions
        .iter()
        .map(|p| (p.number, p.start, p.len, p.type_id.as_str(), p.bootable))
        .collect();
    assert_eq!(
        got,
        vec![
            (1, 2048 * 512, 8 * MIB, "0x83", true),
            (5, 20480 * 512, 8 * MIB, "0x82", false),
            (6, 40960 * 512, 4 * MIB, "0x83", false),
        ]
    );
}

#[test]
fn gpt_from_sgdisk_reads_the_same_through_qcow2() {
    if !have("sgdisk") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("gpt.raw");
    blank(&p, 64 * MIB);
    run(
        "sgdisk",
        &[
            "-U",
            "11111111-2222-3333-4444-555555555555",
            "-n",
            "1:2048:+16M",
            "-t",
            "1:EF00",
            "-c",
            "1:EFI system",
            "-n",
            "3:0:+8M",
            "-t",
            "3:8300",
            "-c",
            "3:root",
            p.to_str().unwrap(),
        ],
    );
    let q = dir.path().join("gpt.qcow2");
    vmi_testkit::qemu_img(&[
        "convert",
        "-O",
        "qcow2",
        p.to_str().unwrap(),
        q.to_str().unwrap(),
    ]);
    for path in [&p, &q] {
        let t = read_table(&open(path)).unwrap().unwrap();
        assert_eq!(t.kind, TableKind::Gpt);
        assert!(t.warnings.is_empty(), "{:?}", t.warnings);
        assert_eq!(t.disk_id, "11111111-2222-3333-4444-555555555555");
        let got: Vec<(u32, u64, u64, &str, &str)> = t
            .partitions
            .iter()
            .map(|p| {
                (
                    p.number,
                    p.start,
                    p.len,
                    p.type_id.as_str(),
                    p.name.as_deref().unwrap(),
                )
            })
            .collect();
        assert_eq!(
            got,
            vec![
                (
                    1,
                    MIB,
                    16 * MIB,
                    "C12A7328-F81F-11D2-BA4B-00A0C93EC93B",
                    "EFI system"
                ),
                (
                    3,
                    17 * MIB,
                    8 * MIB,
                    "0FC63DAF-8483-4772-8E79-3D69D8477DE4",
                    "root"
                ),
            ]
        );
    }
}

fn sgdisk_disk(dir: &Path) -> std::path::PathBuf {
    let p = dir.join("gpt.raw");
    blank(&p, 16 * MIB);
    run("sgdisk", &["-n", "1:2048:+4M", p.to_str().unwrap()]);
    p
}

fn poke(path: &Path, offset: u64, bytes: &[u8]) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(bytes, offset).unwrap();
}

#[test]
fn a_damaged_primary_gpt_header_falls_back_to_the_backup_with_a_warning() {
    if !have("sgdisk") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let p = sgdisk_disk(dir.path());
    poke(&p, 512 + 40, &[0xff]); // first_usable, under the header CRC
    let t = read_table(&open(&p)).unwrap().unwrap();
    assert_eq!(t.partitions.len(), 1);
    assert!(
        t.warnings[0].contains("primary GPT header unusable") && t.warnings[0].contains("CRC32"),
        "{:?}",
        t.warnings
    );
}

#[test]
fn a_gpt_with_both_entry_arrays_damaged_is_refused_naming_the_crc() {
    if !have("sgdisk") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let p = sgdisk_disk(dir.path());
    poke(&p, 1024 + 32, &[0x99]); // primary entry 1's first LBA
    let size = 16 * MIB;
    poke(&p, size - 33 * 512 + 32, &[0x99]); // backup array's entry 1
    let e = read_table(&open(&p)).unwrap_err().to_string();
    assert!(e.contains("entry array") && e.contains("bad CRC32"), "{e}");
}

/// A raw disk with the given sector 0 (and nothing else).
fn disk_with_mbr(dir: &Path, entries: &[(u8, u8, u32, u32)], extra: &[(u64, Vec<u8>)]) -> Image {
    let p = dir.join("hostile.raw");
    blank(&p, 8 * MIB);
    let mut s = vec![0u8; 512];
    for (i, &(status, kind, lba, sectors)) in entries.iter().enumerate() {
        let o = 446 + 16 * i;
        s[o] = status;
        s[o + 4] = kind;
        s[o + 8..o + 12].copy_from_slice(&lba.to_le_bytes());
        s[o + 12..o + 16].copy_from_slice(&sectors.to_le_bytes());
    }
    s[510] = 0x55;
    s[511] = 0xaa;
    poke(&p, 0, &s);
    for (off, b) in extra {
        poke(&p, *off, b);
    }
    open(&p)
}

fn ebr(logical: (u8, u32, u32), next: Option<(u32, u32)>) -> Vec<u8> {
    let mut s = vec![0u8; 512];
    s[446 + 4] = logical.0;
    s[446 + 8..446 + 12].copy_from_slice(&logical.1.to_le_bytes());
    s[446 + 12..446 + 16].copy_from_slice(&logical.2.to_le_bytes());
    if let Some((lba, n)) = next {
        s[462 + 4] = 0x05;
        s[462 + 8..462 + 12].copy_from_slice(&lba.to_le_bytes());
        s[462 + 12..462 + 16].copy_from_slice(&n.to_le_bytes());
    }
    s[510] = 0x55;
    s[511] = 0xaa;
    s
}

#[test]
fn overlapping_mbr_partitions_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let img = disk_with_mbr(
        dir.path(),
        &[(0, 0x83, 2048, 4096), (0, 0x83, 4000, 100)],
        &[],
    );
    let e = read_table(&img).unwrap_err().to_string();
    assert!(e.contains("partitions 1 and 2 overlap"), "{e}");
}

#[test]
fn a_partition_past_the_disk_end_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let img = disk_with_mbr(dir.path(), &[(0, 0x83, 2048, u32::MAX)], &[]);
    let e = read_table(&img).unwrap_err().to_string();
    assert!(e.contains("past the disk's end"), "{e}");
}

#[test]
fn an_extended_chain_that_loops_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    // EBR at 4096 links to itself (relative 0).
    let img = disk_with_mbr(
        dir.path(),
        &[(0, 0x05, 4096, 8192)],
        &[(4096 * 512, ebr((0x83, 2048, 100), Some((0, 4096))))],
    );
    let e = read_table(&img).unwrap_err().to_string();
    assert!(e.contains("loops back"), "{e}");
}

#[test]
fn a_logical_partition_outside_its_extended_partition_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let img = disk_with_mbr(
        dir.path(),
        &[(0, 0x05, 4096, 4096)],
        &[(4096 * 512, ebr((0x83, 2048, 8192), None))],
    );
    let e = read_table(&img).unwrap_err().to_string();
    assert!(e.contains("outside its extended partition"), "{e}");
}

#[test]
fn a_boot_sector_that_is_not_a_table_reads_as_no_table() {
    let dir = tempfile::tempdir().unwrap();
    let img = disk_with_mbr(dir.path(), &[(0x3c, 0x90, 1, 1)], &[]);
    assert!(read_table(&img).unwrap().is_none());
}

/// A protective MBR and a GPT header at LBA 1 with the given fields, CRC correct.
fn gpt_header(num_entries: u32, entry_size: u32) -> Vec<u8> {
    let mut h = vec![0u8; 512];
    h[..8].copy_from_slice(b"EFI PART");
    h[8..12].copy_from_slice(&0x0001_0000u32.to_le_bytes());
    h[12..16].copy_from_slice(&92u32.to_le_bytes());
    h[24..32].copy_from_slice(&1u64.to_le_bytes());
    h[32..40].copy_from_slice(&(16383u64).to_le_bytes());
    h[40..48].copy_from_slice(&34u64.to_le_bytes());
    h[48..56].copy_from_slice(&16350u64.to_le_bytes());
    h[72..80].copy_from_slice(&2u64.to_le_bytes());
    h[80..84].copy_from_slice(&num_entries.to_le_bytes());
    h[84..88].copy_from_slice(&entry_size.to_le_bytes());
    let crc = crc32fast::hash(&h[..92]);
    h[16..20].copy_from_slice(&crc.to_le_bytes());
    h
}

#[test]
fn a_gpt_with_a_huge_entry_count_is_refused_before_reading_it() {
    let dir = tempfile::tempdir().unwrap();
    let img = disk_with_mbr(
        dir.path(),
        &[(0, 0xee, 1, 16383)],
        &[(512, gpt_header(u32::MAX, 128))],
    );
    let e = read_table(&img).unwrap_err().to_string();
    assert!(e.contains("partition entries (at most 65536"), "{e}");
}

#[test]
fn a_gpt_with_an_odd_entry_size_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let img = disk_with_mbr(
        dir.path(),
        &[(0, 0xee, 1, 16383)],
        &[(512, gpt_header(128, 129))],
    );
    let e = read_table(&img).unwrap_err().to_string();
    assert!(e.contains("entry size 129"), "{e}");
}
