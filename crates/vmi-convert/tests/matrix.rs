//! Conversions across every pair of formats round-trip the same content, with 1, 2 and 8 workers.
//!
//! A scattered raw fixture is converted by vmi into each format, and each of those into every other
//! format; each result must read back byte-for-byte as the fixture through vmi, and `qemu-img
//! compare` must find it identical to the fixture. Every worker count must give the same content,
//! so the parallel engine is held to the single-threaded result.

use std::path::{Path, PathBuf};
use vmi_convert::{convert_to_path, ConvertOptions, Target};
use vmi_disk::{CreateOptions, Format, FormatOptions, Image, OpenOptions};
use vmi_testkit::fixtures::{assert_image_matches_raw, scattered_raw};
use vmi_testkit::qemu::assert_qemu_identical;

/// 12 MiB: several allocation units of every format (VHDX blocks are 1 MiB at this size), small
/// enough for 90 conversions per worker count.
const SIZE: u64 = 12 << 20;

/// (label, format, -o options, qemu-img's format name); a label ending in `-c` is written compressed.
const TARGETS: &[(&str, Format, &str, &str)] = &[
    ("qcow2-c", Format::Qcow2, "", "qcow2"),
    (
        "qcow2-zstd-c",
        Format::Qcow2,
        "compression_type=zstd",
        "qcow2",
    ),
    ("raw", Format::Raw, "", "raw"),
    ("qcow2", Format::Qcow2, "", "qcow2"),
    ("qcow2-v2", Format::Qcow2, "compat=0.10", "qcow2"),
    (
        "vmdk-sparse",
        Format::Vmdk,
        "subformat=monolithicSparse",
        "vmdk",
    ),
    (
        "vmdk-stream",
        Format::Vmdk,
        "subformat=streamOptimized",
        "vmdk",
    ),
    (
        "vhd-fixed",
        Format::Vpc,
        "subformat=fixed,force_size=on",
        "vpc",
    ),
    (
        "vhd-dynamic",
        Format::Vpc,
        "subformat=dynamic,force_size=on",
        "vpc",
    ),
    ("vhdx", Format::Vhdx, "", "vhdx"),
    ("vdi", Format::Vdi, "", "vdi"),
];

fn convert(
    src: &Path,
    src_fmt: Format,
    dst: &Path,
    fmt: Format,
    o: &str,
    label: &str,
    workers: usize,
) {
    let img = Image::open(src, &OpenOptions::new().format(Some(src_fmt))).expect("open source");
    let mut fo = FormatOptions::new();
    fo.parse(o).expect("options");
    let target = Target {
        path: dst.to_path_buf(),
        format: fmt,
        create: CreateOptions::new(0).options(fo),
    };
    let opts = ConvertOptions {
        workers,
        compress: label.ends_with("-c"),
        min_sparse: 4096,
        ..Default::default()
    };
    convert_to_path(&img, &target, &opts)
        .unwrap_or_else(|e| panic!("convert {} -> {}: {e}", src.display(), dst.display()));
}

fn check(path: &Path, fmt: Format, qemu_fmt: &str, raw: &Path) {
    let img = Image::open(path, &OpenOptions::new().format(Some(fmt))).expect("open result");
    assert_image_matches_raw(&img, raw);
    assert_qemu_identical(path, qemu_fmt, raw, "raw");
}

fn every_format_pair_round_trips(workers: usize) {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("src.raw");
    scattered_raw(&raw, SIZE, 40, 0x6d61_7472);
    let mut sources: Vec<(PathBuf, Format, &str)> = Vec::new();
    for (label, fmt, o, qf) in TARGETS {
        let p = dir.path().join(format!("a-{label}.img"));
        convert(&raw, Format::Raw, &p, *fmt, o, label, workers);
        check(&p, *fmt, qf, &raw);
        sources.push((p, *fmt, label));
    }
    for (src, src_fmt, src_label) in &sources {
        for (label, fmt, o, qf) in TARGETS {
            let p = dir.path().join(format!("b-{src_label}-{label}.img"));
            convert(src, *src_fmt, &p, *fmt, o, label, workers);
            check(&p, *fmt, qf, &raw);
            std::fs::remove_file(&p).unwrap();
        }
    }
}

#[test]
fn every_format_pair_round_trips_with_1_worker() {
    every_format_pair_round_trips(1);
}

#[test]
fn every_format_pair_round_trips_with_2_workers() {
    every_format_pair_round_trips(2);
}

#[test]
fn every_format_pair_round_trips_with_8_workers() {
    every_format_pair_round_trips(8);
}
