//! qcow2 driver: conformance suite, qemu-img interoperability in both directions, check/repair
//! against `qemu-img check`, hostile images and measure.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use vmi_disk::{
    BlockKind, CheckMode, CreateOptions, ErrorKind, Format, FormatOptions, Gate, Image, OpenOptions,
};
use vmi_testkit::conformance::{run, Caps};
use vmi_testkit::*;

const MIB: u64 = 1 << 20;

fn caps() -> Caps {
    Caps {
        random_writes: true,
        grow: true,
    }
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn opts(o: &str, size: u64) -> CreateOptions {
    let mut fo = FormatOptions::new();
    fo.parse(o).unwrap();
    CreateOptions::new(size).options(fo)
}

fn open_ro(p: &Path) -> Image {
    Image::open(p, &OpenOptions::new().format(Some(Format::Qcow2))).unwrap()
}

fn open_rw(p: &Path) -> Image {
    Image::open(
        p,
        &OpenOptions::new().format(Some(Format::Qcow2)).write(true),
    )
    .unwrap()
}

fn backing_gate(dir: &Path) -> OpenOptions {
    OpenOptions::new()
        .format(Some(Format::Qcow2))
        .gate(Gate::new().allow_backing(true).confine_to(dir))
}

#[test]
fn conforms_with_defaults() {
    let dir = tempfile::tempdir().unwrap();
    run(dir.path(), Format::Qcow2, "", caps());
    assert_qemu_check_clean(&dir.path().join("conf.qcow2"), "qcow2");
}

#[test]
fn conforms_as_compat_0_10() {
    let dir = tempfile::tempdir().unwrap();
    run(dir.path(), Format::Qcow2, "compat=0.10", caps());
    assert_qemu_check_clean(&dir.path().join("conf.qcow2"), "qcow2");
}

#[test]
fn conforms_with_512_byte_clusters() {
    let dir = tempfile::tempdir().unwrap();
    run(dir.path(), Format::Qcow2, "cluster_size=512", caps());
    assert_qemu_check_clean(&dir.path().join("conf.qcow2"), "qcow2");
}

#[test]
fn conforms_with_extended_l2_entries() {
    let dir = tempfile::tempdir().unwrap();
    run(dir.path(), Format::Qcow2, "extended_l2=on", caps());
    assert_qemu_check_clean(&dir.path().join("conf.qcow2"), "qcow2");
}

#[test]
fn conforms_with_2m_clusters() {
    let dir = tempfile::tempdir().unwrap();
    run(dir.path(), Format::Qcow2, "cluster_size=2M", caps());
    assert_qemu_check_clean(&dir.path().join("conf.qcow2"), "qcow2");
}

/// qemu-img -O qcow2 options (and convert flags) of the interop matrix.
const QEMU_MATRIX: &[(&str, &[&str])] = &[
    ("compat=0.10", &[]),
    ("compat=1.1", &[]),
    ("cluster_size=512", &[]),
    ("cluster_size=2M", &[]),
    ("", &["-c"]),
    ("compression_type=zstd", &["-c"]),
    ("cluster_size=4k", &["-c"]),
    ("refcount_bits=1", &[]),
    ("refcount_bits=64", &[]),
    ("extended_l2=on", &[]),
    ("extended_l2=on,cluster_size=128k", &[]),
    ("lazy_refcounts=on", &[]),
    ("preallocation=metadata", &[]),
];

#[test]
fn reads_what_qemu_img_writes() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("src.raw");
    scattered_raw(&raw, 12 * MIB + 4096, 40, 7);
    for (i, (o, extra)) in QEMU_MATRIX.iter().enumerate() {
        let q = dir.path().join(format!("q{i}.qcow2"));
        qemu_convert(&raw, "raw", &q, "qcow2", o, extra);
        let img = open_ro(&q);
        assert_image_matches_raw(&img, &raw);
        let rep = img.driver().check(CheckMode::ReadOnly).unwrap();
        assert_eq!(
            (rep.corruptions, rep.leaks),
            (0, 0),
            "-o {o} {extra:?}: {:?}",
            rep.messages
        );
        let (_, j) = qemu_check(&q, "qcow2");
        for (mine, key) in [
            (rep.allocated_clusters, "allocated-clusters"),
            (rep.fragmented_clusters, "fragmented-clusters"),
            (rep.compressed_clusters, "compressed-clusters"),
            (rep.image_end_offset, "image-end-offset"),
        ] {
            // qemu-img leaves zero counts out of its JSON.
            assert_eq!(
                mine.unwrap_or(0),
                j[key].as_u64().unwrap_or(0),
                "{key} for -o {o} {extra:?}"
            );
        }
    }
}

#[test]
fn reads_a_qemu_overlay_through_its_backing_file() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("src.raw");
    scattered_raw(&raw, 8 * MIB, 20, 11);
    let base = dir.path().join("base.qcow2");
    qemu_convert(&raw, "raw", &base, "qcow2", "", &[]);
    let top = dir.path().join("top.qcow2");
    for o in ["", "extended_l2=on"] {
        let _ = std::fs::remove_file(&top);
        let mut args = vec![
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
        ];
        if !o.is_empty() {
            args.extend(["-o", o]);
        }
        args.push(s(&top));
        qemu_img(&args);
        // Unaligned writes: with extended L2 entries qemu allocates single subclusters.
        qemu_io(&top, "qcow2", "write -P 0xab 1M 100k");
        qemu_io(&top, "qcow2", "write -P 0xcd 2052k 4k");
        let mut expect = read_file(&raw);
        expect[MIB as usize..MIB as usize + 100 * 1024].fill(0xab);
        expect[2052 * 1024..2056 * 1024].fill(0xcd);
        let img = Image::open(&top, &backing_gate(dir.path())).unwrap();
        assert_eq!(img.chain_len(), 2);
        assert!(read_image(&img) == expect, "{o}: overlay contents differ");
        drop(img);
        // vmi writes into the partly allocated cluster: the rest comes from the base.
        let img = Image::open(&top, &backing_gate(dir.path()).write(true)).unwrap();
        img.write_at(&[0xef; 700], 2060 * 1024).unwrap();
        img.write_at(&[0x12; 300], 2053 * 1024).unwrap();
        img.close().unwrap();
        expect[2060 * 1024..2060 * 1024 + 700].fill(0xef);
        expect[2053 * 1024..2053 * 1024 + 300].fill(0x12);
        let expect_path = dir.path().join("expect.raw");
        std::fs::write(&expect_path, &expect).unwrap();
        assert_qemu_check_clean(&top, "qcow2");
        assert_qemu_identical(&top, "qcow2", &expect_path, "raw");
    }
    // Without the gate's permission, the backing file is refused and named.
    let e = Image::open(&top, &OpenOptions::new()).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Refused);
    assert!(e.to_string().contains("base.qcow2"), "{e}");
}

/// Write a raw source's content into a new vmi image, skipping zero runs.
fn write_from_raw(img: &Image, raw: &Path) {
    let data = read_file(raw);
    let chunk = 64 * 1024;
    for (i, c) in data.chunks(chunk).enumerate() {
        if c.iter().any(|&b| b != 0) {
            img.write_at(c, (i * chunk) as u64).unwrap();
        }
    }
}

/// Write through the compressed writer; clusters that do not shrink go plain.
fn write_compressed_from_raw(img: &Image, raw: &Path) {
    let data = read_file(raw);
    let w = img.driver().compressed_writer().expect("qcow2 compresses");
    let cs = w.unit_size() as usize;
    for (i, c) in data.chunks(cs).enumerate() {
        if c.iter().all(|&b| b == 0) {
            continue;
        }
        let off = (i * cs) as u64;
        // The partial last cluster is compressed too (padded by the writer).
        match w.compress(c).unwrap() {
            Some(z) => w.write_compressed(off, &z).unwrap(),
            None => img.write_at(c, off).unwrap(),
        }
    }
}

const VMI_MATRIX: &[&str] = &[
    "",
    "compat=0.10",
    "cluster_size=512",
    "cluster_size=2M",
    "refcount_bits=1",
    "refcount_bits=64",
    "lazy_refcounts=on",
    "compression_type=zstd",
    "preallocation=metadata",
    "preallocation=falloc",
    "preallocation=full,cluster_size=4k",
    "extended_l2=on",
    "extended_l2=on,cluster_size=2M",
];

#[test]
fn qemu_img_reads_what_vmi_writes() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("src.raw");
    scattered_raw(&raw, 10 * MIB + 512, 40, 3);
    for (i, o) in VMI_MATRIX.iter().enumerate() {
        let q = dir.path().join(format!("v{i}.qcow2"));
        let img = Image::create(&q, Format::Qcow2, &opts(o, 10 * MIB + 512)).unwrap();
        write_from_raw(&img, &raw);
        img.close().unwrap();
        assert_qemu_check_clean(&q, "qcow2");
        assert_qemu_identical(&q, "qcow2", &raw, "raw");
        let info = qemu_info(&q, "qcow2");
        assert_eq!(info["virtual-size"], 10 * MIB + 512, "{o}");
    }
}

#[test]
fn qemu_img_reads_what_vmi_compresses() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("src.raw");
    let size = 6 * MIB + 1536;
    scattered_raw(&raw, size, 30, 5);
    for (i, o) in [
        "",
        "compression_type=zstd",
        "cluster_size=512",
        "cluster_size=4k,refcount_bits=1",
        "extended_l2=on,compression_type=zstd",
        "compat=0.10",
        "cluster_size=2M",
    ]
    .iter()
    .enumerate()
    {
        let q = dir.path().join(format!("c{i}.qcow2"));
        let img = Image::create(&q, Format::Qcow2, &opts(o, size)).unwrap();
        write_compressed_from_raw(&img, &raw);
        img.close().unwrap();
        assert_qemu_check_clean(&q, "qcow2");
        assert_qemu_identical(&q, "qcow2", &raw, "raw");
        let (_, j) = qemu_check(&q, "qcow2");
        assert!(
            j["compressed-clusters"].as_u64().unwrap_or(0) > 0,
            "{o}: {j}"
        );
        // vmi reads its own compressed image and agrees with qemu's check.
        let img = open_ro(&q);
        assert_image_matches_raw(&img, &raw);
        let rep = img.driver().check(CheckMode::ReadOnly).unwrap();
        assert_eq!(rep.compressed_clusters, j["compressed-clusters"].as_u64());
        assert_eq!(rep.allocated_clusters, j["allocated-clusters"].as_u64());
        assert_eq!(rep.image_end_offset, j["image-end-offset"].as_u64(), "{o}");
        assert_eq!(
            rep.fragmented_clusters,
            j["fragmented-clusters"].as_u64(),
            "{o}"
        );
        assert_eq!(rep.total_clusters, j["total-clusters"].as_u64(), "{o}");
    }
}

#[test]
fn writes_from_several_threads_land_intact() {
    let dir = tempfile::tempdir().unwrap();
    let q = dir.path().join("t.qcow2");
    let img = Image::create(&q, Format::Qcow2, &opts("cluster_size=4k", 8 * MIB)).unwrap();
    let w = img.driver().compressed_writer().unwrap();
    std::thread::scope(|sc| {
        for t in 0..4u64 {
            let img = &img;
            sc.spawn(move || {
                for k in 0..64u64 {
                    // Interleaved, unaligned, plain and compressed writes.
                    let off = (k * 4 + t) * 32 * 1024 + 100;
                    img.write_at(&pattern(t * 1000 + k, 5000), off).unwrap();
                    let unit = ((k * 4 + t) * 32 + 16) * 1024;
                    let data = vec![(t + k) as u8; 4096];
                    let z = w.compress(&data).unwrap().unwrap();
                    w.write_compressed(unit, &z).unwrap();
                }
            });
        }
    });
    img.close().unwrap();
    assert_qemu_check_clean(&q, "qcow2");
    let mut expect = vec![0u8; 8 * MIB as usize];
    for t in 0..4u64 {
        for k in 0..64u64 {
            let off = ((k * 4 + t) * 32 * 1024 + 100) as usize;
            expect[off..off + 5000].copy_from_slice(&pattern(t * 1000 + k, 5000));
            let unit = (((k * 4 + t) * 32 + 16) * 1024) as usize;
            expect[unit..unit + 4096].fill((t + k) as u8);
        }
    }
    let raw = dir.path().join("expect.raw");
    std::fs::write(&raw, &expect).unwrap();
    assert_qemu_identical(&q, "qcow2", &raw, "raw");
}

#[test]
fn vmi_overlay_over_a_qemu_base_reads_right_in_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("src.raw");
    scattered_raw(&raw, 4 * MIB, 20, 9);
    let base = dir.path().join("base.qcow2");
    qemu_convert(&raw, "raw", &base, "qcow2", "", &[]);
    let top = dir.path().join("top.qcow2");
    let spec = vmi_disk::BackingSpec {
        name: "base.qcow2".into(),
        format: Some(Format::Qcow2),
    };
    for o in ["", "compat=0.10", "extended_l2=on"] {
        let _ = std::fs::remove_file(&top);
        let mut img =
            Image::create(&top, Format::Qcow2, &opts(o, 4 * MIB).backing(spec.clone())).unwrap();
        let b = Image::open(&base, &OpenOptions::new().format(Some(Format::Qcow2))).unwrap();
        img.set_backing(Some(b));
        // Partial-cluster writes must copy the rest of the cluster from the base.
        img.write_at(&[0xcd; 1000], 70_000).unwrap();
        img.write_zeroes(2 * MIB, 65536).unwrap();
        img.write_zeroes(3 * MIB + 100, 5000).unwrap();
        img.close().unwrap();
        let mut expect = read_file(&raw);
        expect[70_000..71_000].fill(0xcd);
        expect[2 * MIB as usize..2 * MIB as usize + 65536].fill(0);
        expect[3 * MIB as usize + 100..3 * MIB as usize + 5100].fill(0);
        let expect_path = dir.path().join("expect.raw");
        std::fs::write(&expect_path, &expect).unwrap();
        assert_qemu_check_clean(&top, "qcow2");
        assert_qemu_identical(&top, "qcow2", &expect_path, "raw");
        let info = qemu_info(&top, "qcow2");
        assert_eq!(info["backing-filename"], "base.qcow2");
        assert_eq!(info["backing-filename-format"], "qcow2");
        let img = Image::open(&top, &backing_gate(dir.path())).unwrap();
        assert_eq!(read_image(&img), expect, "{o}");
    }
}

#[test]
fn info_matches_qemu_format_specific() {
    let dir = tempfile::tempdir().unwrap();
    for o in [
        "",
        "compat=0.10",
        "lazy_refcounts=on,refcount_bits=64",
        "compression_type=zstd",
        "extended_l2=on",
    ] {
        let q = dir.path().join("i.qcow2");
        let _ = std::fs::remove_file(&q);
        qemu_create(&q, "qcow2", o, 16 * MIB);
        let info = qemu_info(&q, "qcow2");
        let img = open_ro(&q);
        let mine = img.driver().info();
        let mut theirs = info["format-specific"].clone();
        // Fields vmi does not model.
        if let Some(d) = theirs["data"].as_object_mut() {
            d.remove("bitmaps");
            d.remove("data-file-raw");
        }
        assert_eq!(mine.format_specific, theirs, "-o {o}");
        assert_eq!(mine.cluster_size, info["cluster-size"].as_u64());
    }
}

#[test]
fn snapshots_are_listed_and_active_data_stays_right() {
    let dir = tempfile::tempdir().unwrap();
    let q = dir.path().join("s.qcow2");
    qemu_create(&q, "qcow2", "", 4 * MIB);
    qemu_io(&q, "qcow2", "write -P 0x11 0 256k");
    qemu_img(&["snapshot", "-c", "first", s(&q)]);
    {
        // vmi writes over clusters shared with the snapshot: copy-on-write.
        let img = open_rw(&q);
        img.write_at(&[0x22; 4096], 4096).unwrap();
        img.close().unwrap();
    }
    assert_qemu_check_clean(&q, "qcow2");
    let img = open_ro(&q);
    let info = img.driver().info();
    assert_eq!(info.snapshots.len(), 1);
    assert_eq!(info.snapshots[0].name, "first");
    let mut buf = vec![0u8; 12288];
    img.read_at(&mut buf, 0).unwrap();
    assert!(buf[..4096].iter().all(|&b| b == 0x11));
    assert!(buf[4096..8192].iter().all(|&b| b == 0x22));
    assert!(buf[8192..].iter().all(|&b| b == 0x11));
    // The snapshot still holds the old data (qemu-img may write once vmi lets go of the image).
    drop(img);
    qemu_img(&["snapshot", "-a", "first", s(&q)]);
    let img = open_ro(&q);
    img.read_at(&mut buf, 0).unwrap();
    assert!(buf.iter().all(|&b| b == 0x11));
}

#[test]
fn resize_grows_and_shrinking_discards_what_lies_past_the_end() {
    let dir = tempfile::tempdir().unwrap();
    let q = dir.path().join("r.qcow2");
    let img = Image::create(&q, Format::Qcow2, &opts("cluster_size=512", MIB)).unwrap();
    img.write_at(&[7; 512], MIB - 512).unwrap();
    // Growing past what the first L1 cluster maps moves the L1 table.
    img.resize(200 * MIB).unwrap();
    img.write_at(&[8; 512], 200 * MIB - 512).unwrap();
    assert_eq!(
        img.resize(MIB / 2 + 1).unwrap_err().kind(),
        ErrorKind::Usage
    );
    img.resize(MIB).unwrap();
    img.close().unwrap();
    assert_qemu_check_clean(&q, "qcow2");
    assert_eq!(qemu_info(&q, "qcow2")["virtual-size"], MIB);
    let mut buf = [0u8; 512];
    open_ro(&q).read_at(&mut buf, MIB - 512).unwrap();
    assert_eq!(buf, [7; 512]);
    // Growing again shows zeroes where the discarded data was.
    let img = open_rw(&q);
    img.resize(200 * MIB).unwrap();
    img.close().unwrap();
    open_ro(&q).read_at(&mut buf, 200 * MIB - 512).unwrap();
    assert_eq!(buf, [0; 512]);
    assert_qemu_check_clean(&q, "qcow2");
}

#[test]
fn shrinking_matches_qemu_img_resize_shrink() {
    let dir = tempfile::tempdir().unwrap();
    // (options, size, data written by qemu-io, new size, snapshot taken first)
    let cases: &[(&str, u64, &str, u64, bool)] = &[
        ("", 64 * MIB, "write -P 0x21 0 64M", 24 * MIB + 4096, false),
        (
            "cluster_size=4096",
            8 * MIB,
            "write -P 0x22 1M 6M",
            2 * MIB,
            false,
        ),
        (
            "cluster_size=512",
            4 * MIB,
            "write -P 0x23 0 4M",
            33280,
            false,
        ),
        (
            "extended_l2=on",
            16 * MIB,
            "write -P 0x24 0 16M",
            3 * MIB + 512,
            false,
        ),
        ("", 64 * MIB, "write -P 0x25 0 64M", 8 * MIB, true),
        (
            "compat=0.10",
            16 * MIB,
            "write -P 0x26 0 16M",
            5 * MIB,
            false,
        ),
    ];
    for &(o, size, data, new, snap) in cases {
        let q = dir.path().join("vmi.qcow2");
        let qq = dir.path().join("qemu.qcow2");
        let _ = std::fs::remove_file(&q);
        let _ = std::fs::remove_file(&qq);
        qemu_create(&q, "qcow2", o, size);
        qemu_io(&q, "qcow2", data);
        if snap {
            qemu_img(&["snapshot", "-c", "s1", s(&q)]);
        }
        std::fs::copy(&q, &qq).unwrap();
        qemu_img(&["resize", "--shrink", s(&qq), &new.to_string()]);
        let img = open_rw(&q);
        img.resize(new).unwrap();
        img.close().unwrap();
        assert_qemu_check_clean(&q, "qcow2");
        assert_eq!(qemu_info(&q, "qcow2")["virtual-size"], new, "{o}");
        assert_qemu_identical(&q, "qcow2", &qq, "qcow2");
        let (vlen, qlen) = (
            std::fs::metadata(&q).unwrap().len(),
            std::fs::metadata(&qq).unwrap().len(),
        );
        assert!(
            vlen <= qlen + 65536,
            "{o}: vmi file {vlen} bytes, qemu {qlen}"
        );
        if snap {
            // The snapshot keeps the discarded data.
            let view = vmi_disk::formats::qcow2::snapshot::open_snapshot(
                &q,
                &OpenOptions::new().format(Some(Format::Qcow2)),
                "s1",
            )
            .unwrap();
            let mut buf = vec![0u8; 4096];
            view.read_at(&mut buf, size - 4096).unwrap();
            assert!(buf.iter().all(|&b| b == 0x25));
        }
    }
}

#[test]
fn freed_clusters_are_reused() {
    let dir = tempfile::tempdir().unwrap();
    let q = dir.path().join("reuse.qcow2");
    let img = Image::create(&q, Format::Qcow2, &opts("", 16 * MIB)).unwrap();
    img.write_at(&pattern(3, MIB as usize), 0).unwrap();
    img.flush().unwrap();
    let before = std::fs::metadata(&q).unwrap().len();
    img.write_zeroes(0, MIB).unwrap();
    img.flush().unwrap();
    img.write_at(&pattern(4, MIB as usize), 8 * MIB).unwrap();
    img.close().unwrap();
    assert_eq!(std::fs::metadata(&q).unwrap().len(), before);
    assert_qemu_check_clean(&q, "qcow2");
    let mut expect = vec![0u8; 16 * MIB as usize];
    expect[8 * MIB as usize..9 * MIB as usize].copy_from_slice(&pattern(4, MIB as usize));
    assert_eq!(read_image(&open_ro(&q)), expect);
}

#[test]
fn a_huge_sparse_image_stays_small() {
    let dir = tempfile::tempdir().unwrap();
    let q = dir.path().join("huge.qcow2");
    let size = 8u64 << 40;
    let img = Image::create(&q, Format::Qcow2, &opts("", size)).unwrap();
    img.write_at(b"first", 0).unwrap();
    img.write_at(b"last", size - 4).unwrap();
    img.close().unwrap();
    assert!(std::fs::metadata(&q).unwrap().len() < 4 * MIB);
    assert_qemu_check_clean(&q, "qcow2");
    let img = open_ro(&q);
    // The rest of the first L2 table's range, then every empty L2 range in one answer.
    let st = img.block_status(65536, size - 65536).unwrap();
    assert_eq!(
        (st.kind, st.len),
        (BlockKind::Unallocated, 512 * MIB - 65536)
    );
    let st = img.block_status(512 * MIB, size - 512 * MIB).unwrap();
    assert_eq!(
        (st.kind, st.len),
        (BlockKind::Unallocated, size - 1024 * MIB)
    );
    let mut buf = [0u8; 4];
    img.read_at(&mut buf, size - 4).unwrap();
    assert_eq!(&buf, b"last");
}

#[test]
fn persistent_bitmaps_are_counted_and_invalidated_by_writes() {
    let dir = tempfile::tempdir().unwrap();
    let q = small_image(dir.path(), "bm.qcow2");
    qemu_img(&["bitmap", "--add", s(&q), "b0"]);
    qemu_io(&q, "qcow2", "write -P 0x33 1M 64k");
    // Read-only: the bitmap clusters are referenced, nothing leaks.
    let r = vmi_check(&q, CheckMode::ReadOnly);
    assert_eq!((r.leaks, r.corruptions), (0, 0), "{:?}", r.messages);
    // A writable open clears the bitmaps autoclear bit, as the spec asks of programs that do
    // not maintain bitmaps; qemu then counts their clusters as leaks, and so does vmi.
    assert_eq!(
        be64(&read_file(&q), 88),
        1,
        "bitmaps autoclear bit set by qemu"
    );
    let img = open_rw(&q);
    assert_eq!(
        be64(&read_file(&q), 88),
        0,
        "autoclear bits cleared on writable open"
    );
    img.write_at(&[1; 512], 0).unwrap();
    img.close().unwrap();
    assert_same_as_qemu(&q);
    vmi_check(&q, CheckMode::RepairLeaks);
    assert_qemu_check_clean(&q, "qcow2");
}

#[test]
fn a_crash_at_any_write_leaves_no_corruption() {
    use vmi_disk::storage::{FailPoint, MemStorage};
    let dir = tempfile::tempdir().unwrap();
    let q = dir.path().join("base.qcow2");
    let img = Image::create(&q, Format::Qcow2, &opts("cluster_size=4k", 4 * MIB)).unwrap();
    img.write_at(&pattern(1, 64 * 1024), 0).unwrap();
    let w = img.driver().compressed_writer().unwrap();
    let z = w.compress(&[9u8; 4096]).unwrap().unwrap();
    w.write_compressed(MIB, &z).unwrap();
    img.close().unwrap();
    let base = read_file(&q);
    let crashed = dir.path().join("crashed.qcow2");
    for n in 0.. {
        let mem = std::sync::Arc::new(MemStorage::from_bytes(base.clone()));
        mem.fail(FailPoint::WritesAfter(n));
        let done = (|| -> vmi_disk::Result<()> {
            let img = Image::from_storage(
                Box::new(mem.clone()),
                &q,
                Some(Format::Qcow2),
                true,
                &Gate::new(),
            )?;
            // Overwrite in place, copy-on-write a compressed cluster, allocate new tables far
            // away, zero clusters, reuse freed ones and grow the image.
            img.write_at(&[1; 100], 10)?;
            img.write_at(&[2; 100], MIB + 10)?;
            img.write_at(&[3; 8192], 3 * MIB)?;
            img.write_zeroes(4096, 8192)?;
            img.flush()?;
            // Reuses the clusters freed above.
            img.write_at(&[5; 8192], 2 * MIB)?;
            img.resize(64 * MIB)?;
            img.write_at(&[4; 4096], 60 * MIB)?;
            img.close()
        })();
        std::fs::write(&crashed, mem.to_vec()).unwrap();
        let (code, j) = qemu_check(&crashed, "qcow2");
        assert_eq!(
            j["corruptions"].as_u64().unwrap_or(0),
            0,
            "crash after {n} writes: qemu-img check exit {code}: {j}"
        );
        if done.is_ok() {
            assert_eq!(code, 0, "{j}");
            break;
        }
        assert!(n < 500, "the update never completed");
    }
}

// ----- check and repair -----

fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().unwrap())
}

/// (L1 offset, refcount table offset, cluster size) of a qcow2 file.
fn layout(p: &Path) -> (u64, u64, u64) {
    let b = read_file(p);
    (
        be64(&b, 40),
        be64(&b, 48),
        1 << u32::from_be_bytes(b[20..24].try_into().unwrap()),
    )
}

fn small_image(dir: &Path, name: &str) -> PathBuf {
    let q = dir.join(name);
    qemu_create(&q, "qcow2", "", 4 * MIB);
    qemu_io(&q, "qcow2", "write -P 0x5a 0 192k");
    q
}

/// Set the 16-bit refcount of host cluster `c` (first refcount block only).
fn poke_refcount(p: &Path, c: u64, v: u16) {
    let (_, rt, _) = layout(p);
    let b = read_file(p);
    let block = be64(&b, rt as usize);
    let f = std::fs::OpenOptions::new().write(true).open(p).unwrap();
    f.write_all_at(&v.to_be_bytes(), block + 2 * c).unwrap();
}

fn vmi_check(p: &Path, mode: CheckMode) -> vmi_disk::CheckReport {
    let img = if mode == CheckMode::ReadOnly {
        open_ro(p)
    } else {
        open_rw(p)
    };
    let r = img.driver().check(mode).unwrap();
    img.close().unwrap();
    r
}

fn assert_same_as_qemu(p: &Path) {
    let (_, j) = qemu_check(p, "qcow2");
    let r = vmi_check(p, CheckMode::ReadOnly);
    assert_eq!(
        (r.leaks, r.corruptions),
        (
            j["leaks"].as_u64().unwrap_or(0),
            j["corruptions"].as_u64().unwrap_or(0)
        ),
        "vmi {:?} vs qemu {j}",
        r.messages
    );
}

#[test]
fn check_reports_and_repairs_a_leaked_cluster() {
    let dir = tempfile::tempdir().unwrap();
    let q = small_image(dir.path(), "leak.qcow2");
    // Grow the file by one cluster and give it a refcount nobody references.
    let len = std::fs::metadata(&q).unwrap().len();
    let f = std::fs::OpenOptions::new().write(true).open(&q).unwrap();
    f.set_len(len + 65536).unwrap();
    poke_refcount(&q, len / 65536, 1);
    assert_same_as_qemu(&q);
    let r = vmi_check(&q, CheckMode::ReadOnly);
    assert_eq!(r.leaks, 1);
    let r = vmi_check(&q, CheckMode::RepairLeaks);
    assert_eq!(r.leaks_fixed, 1);
    assert_qemu_check_clean(&q, "qcow2");
}

#[test]
fn check_reports_a_bumped_refcount_like_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let q = small_image(dir.path(), "bump.qcow2");
    let b = read_file(&q);
    let (l1, _, _) = layout(&q);
    let l2 = be64(&b, l1 as usize) & 0x00ff_ffff_ffff_fe00;
    let data = be64(&b, l2 as usize) & 0x00ff_ffff_ffff_fe00;
    poke_refcount(&q, data / 65536, 2);
    assert_same_as_qemu(&q);
    let r = vmi_check(&q, CheckMode::RepairAll);
    assert!(r.leaks_fixed >= 1, "{r:?}");
    assert_qemu_check_clean(&q, "qcow2");
}

#[test]
fn check_reports_and_repairs_a_zeroed_refcount() {
    let dir = tempfile::tempdir().unwrap();
    let q = small_image(dir.path(), "zero.qcow2");
    let b = read_file(&q);
    let (l1, _, _) = layout(&q);
    let l2 = be64(&b, l1 as usize) & 0x00ff_ffff_ffff_fe00;
    let data = be64(&b, l2 as usize + 8) & 0x00ff_ffff_ffff_fe00;
    poke_refcount(&q, data / 65536, 0);
    assert_same_as_qemu(&q);
    assert!(vmi_check(&q, CheckMode::ReadOnly).corruptions >= 1);
    let r = vmi_check(&q, CheckMode::RepairAll);
    assert!(r.corruptions_fixed >= 1, "{r:?}");
    assert_eq!(r.corruptions, 0, "{:?}", r.messages);
    assert_qemu_check_clean(&q, "qcow2");
}

#[test]
fn check_reports_an_l2_entry_past_the_end_of_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let q = small_image(dir.path(), "eof.qcow2");
    let b = read_file(&q);
    let (l1, _, _) = layout(&q);
    let l2 = be64(&b, l1 as usize) & 0x00ff_ffff_ffff_fe00;
    let f = std::fs::OpenOptions::new().write(true).open(&q).unwrap();
    let far: u64 = (1 << 63) | (100 << 20);
    f.write_all_at(&far.to_be_bytes(), l2 + 16).unwrap();
    assert_same_as_qemu(&q);
    let r = vmi_check(&q, CheckMode::RepairAll);
    assert_eq!(r.corruptions, 0, "{:?}", r.messages);
    assert_qemu_check_clean(&q, "qcow2");
}

/// Offsets of a small image's structures: (L1 table, first L2 table, refcount table).
fn structures(b: &[u8]) -> (u64, u64, u64) {
    let l1 = be64(b, 40);
    let l2 = be64(b, l1 as usize) & 0x00ff_ffff_ffff_fe00;
    (l1, l2, be64(b, 48))
}

#[test]
fn check_matches_qemu_on_assorted_corruptions_and_repair_cleans_them() {
    let dir = tempfile::tempdir().unwrap();
    type Poke = fn(&[u8]) -> (u64, u64);
    let cases: &[(&str, Poke)] = &[
        ("refcount block past the end", |b| {
            let (_, _, rt) = structures(b);
            (rt, 100 << 20)
        }),
        ("refcount block unaligned", |b| {
            let (_, _, rt) = structures(b);
            (rt, be64(b, rt as usize) + 512)
        }),
        ("L2 table past the end", |b| {
            let (l1, _, _) = structures(b);
            (l1, (1 << 63) | (100 << 20))
        }),
        ("data cluster unaligned", |b| {
            let (_, l2, _) = structures(b);
            (l2, be64(b, l2 as usize) + 512)
        }),
        ("data cluster is the L1 table", |b| {
            let (l1, l2, _) = structures(b);
            (l2 + 8, l1 | (1 << 63))
        }),
        ("copied flag cleared", |b| {
            let (_, l2, _) = structures(b);
            (l2, be64(b, l2 as usize) & !(1 << 63))
        }),
        ("compressed cluster past the end", |b| {
            let (_, l2, _) = structures(b);
            (l2 + 16, (1 << 62) | (100 << 20))
        }),
    ];
    for (name, poke) in cases {
        let q = dir.path().join("c.qcow2");
        let _ = std::fs::remove_file(&q);
        qemu_create(&q, "qcow2", "", 4 * MIB);
        qemu_io(&q, "qcow2", "write -P 0x5a 0 192k");
        let (at, v) = poke(&read_file(&q));
        patch(&q, at, &v.to_be_bytes());
        let (_, j) = qemu_check(&q, "qcow2");
        let r = vmi_check(&q, CheckMode::ReadOnly);
        let count = |k: &str| j[k].as_u64().unwrap_or(0);
        assert_eq!(
            (r.corruptions, r.leaks, r.check_errors),
            (count("corruptions"), count("leaks"), count("check-errors")),
            "{name}: vmi {:?} vs qemu {j}",
            r.messages
        );
        let r = vmi_check(&q, CheckMode::RepairAll);
        assert_eq!((r.corruptions, r.leaks), (0, 0), "{name}: {:?}", r.messages);
        assert_qemu_check_clean(&q, "qcow2");
    }
}

#[test]
fn dirty_image_gets_refcounts_rebuilt_on_writable_open() {
    let dir = tempfile::tempdir().unwrap();
    let q = small_image(dir.path(), "dirty.qcow2");
    let len = std::fs::metadata(&q).unwrap().len();
    let f = std::fs::OpenOptions::new().write(true).open(&q).unwrap();
    f.set_len(len + 65536).unwrap();
    poke_refcount(&q, len / 65536, 1);
    f.write_all_at(&1u64.to_be_bytes(), 72).unwrap();
    assert!(open_ro(&q).driver().info().dirty);
    let img = open_rw(&q);
    img.write_at(&[1; 512], 3 * MIB).unwrap();
    img.close().unwrap();
    assert!(!open_ro(&q).driver().info().dirty);
    assert_qemu_check_clean(&q, "qcow2");
}

#[test]
fn corrupt_image_is_written_only_by_check_repair_which_clears_the_bit() {
    let dir = tempfile::tempdir().unwrap();
    let q = small_image(dir.path(), "corrupt.qcow2");
    let f = std::fs::OpenOptions::new().write(true).open(&q).unwrap();
    f.write_all_at(&2u64.to_be_bytes(), 72).unwrap();
    let _ = open_ro(&q);
    let before = read_file(&q);
    let img = open_rw(&q);
    let e = img.write_at(&[1; 512], 0).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Corrupt, "{e}");
    assert_eq!(img.resize(8 * MIB).unwrap_err().kind(), ErrorKind::Corrupt);
    img.close().unwrap();
    assert_eq!(read_file(&q), before, "a refused write changed the file");
    // The image is consistent apart from the bit: check -r clears it, as qemu-img check -r does.
    vmi_check(&q, CheckMode::RepairLeaks);
    assert_eq!(
        qemu_info(&q, "qcow2")["format-specific"]["data"]["corrupt"],
        false
    );
    let img = open_rw(&q);
    img.write_at(&[1; 512], 0).unwrap();
    img.close().unwrap();
    assert_qemu_check_clean(&q, "qcow2");
}

/// qemu-img check's counts as (corruptions, leaks, check errors).
fn qemu_counts(p: &Path) -> (u64, u64, u64) {
    let (_, j) = qemu_check(p, "qcow2");
    let count = |k: &str| j[k].as_u64().unwrap_or(0);
    (count("corruptions"), count("leaks"), count("check-errors"))
}

fn vmi_counts(p: &Path) -> (u64, u64, u64) {
    let r = vmi_check(p, CheckMode::ReadOnly);
    (r.corruptions, r.leaks, r.check_errors)
}

/// qemu-img's image with 24 data clusters behind the first L1 entry (issue 13's layout).
fn l1_image(dir: &Path, name: &str) -> PathBuf {
    let q = dir.join(name);
    qemu_create(&q, "qcow2", "", 64 * MIB);
    qemu_io(&q, "qcow2", "write -P 0x11 0 1536k");
    q
}

#[test]
fn issue_13_an_l1_entry_naming_the_header_is_counted_like_qemu_and_refused_for_writes() {
    let dir = tempfile::tempdir().unwrap();
    let q = l1_image(dir.path(), "l1hdr.qcow2");
    let (l1, _, _) = layout(&q);
    patch(&q, l1, &(1u64 << 63).to_be_bytes());
    // qemu reads the header cluster as the L2 table: 45 errors and 25 leaks with qemu-img 10.
    assert_eq!(vmi_counts(&q), qemu_counts(&q));
    assert!(vmi_counts(&q).0 > 0);
    let before = read_file(&q);
    let img = open_rw(&q);
    assert_eq!(
        img.resize(128 * MIB).unwrap_err().kind(),
        ErrorKind::Corrupt
    );
    let e = vmi_disk::formats::qcow2::snapshot::create(&img, "s1").unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Corrupt, "{e}");
    // A guest write through the entry would write into the header: refused, image marked.
    assert_eq!(
        img.write_at(&[7; 4096], 0).unwrap_err().kind(),
        ErrorKind::Corrupt
    );
    assert_eq!(
        img.write_at(&[7; 4096], 32 * MIB).unwrap_err().kind(),
        ErrorKind::Corrupt
    );
    let _ = img.close();
    let mut marked = before.clone();
    marked[79] |= 2;
    assert_eq!(read_file(&q), marked, "only the corrupt bit may change");
    // Repair drops the entry (its data is unreachable in qemu too) and qemu agrees.
    let r = vmi_check(&q, CheckMode::RepairAll);
    assert_eq!((r.corruptions, r.leaks), (0, 0), "{:?}", r.messages);
    assert_qemu_check_clean(&q, "qcow2");
    assert_eq!(
        qemu_info(&q, "qcow2")["format-specific"]["data"]["corrupt"],
        false
    );
    let img = open_rw(&q);
    img.write_at(&[7; 4096], 0).unwrap();
    img.close().unwrap();
    assert_qemu_check_clean(&q, "qcow2");
}

#[test]
fn issue_13_snapshot_create_refuses_an_image_whose_first_refcount_table_entry_is_zero() {
    let dir = tempfile::tempdir().unwrap();
    let q = l1_image(dir.path(), "rt0.qcow2");
    let (_, rt, _) = layout(&q);
    patch(&q, rt, &[0; 8]);
    assert_eq!(vmi_counts(&q), qemu_counts(&q));
    assert!(vmi_counts(&q).0 > 0);
    let before = read_file(&q);
    let img = open_rw(&q);
    let e = vmi_disk::formats::qcow2::snapshot::create(&img, "s1").unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Corrupt, "{e}");
    // Rewriting a data cluster that has no refcount is refused too.
    assert_eq!(
        img.write_at(&[7; 512], 0).unwrap_err().kind(),
        ErrorKind::Corrupt
    );
    let _ = img.close();
    let mut marked = before.clone();
    marked[79] |= 2;
    assert_eq!(read_file(&q), marked);
    let r = vmi_check(&q, CheckMode::RepairLeaks);
    assert!(r.corruptions > 0, "-r leaks must not rebuild: {r:?}");
    let r = vmi_check(&q, CheckMode::RepairAll);
    assert_eq!((r.corruptions, r.leaks), (0, 0), "{:?}", r.messages);
    assert_qemu_check_clean(&q, "qcow2");
    let img = open_rw(&q);
    vmi_disk::formats::qcow2::snapshot::create(&img, "s1").unwrap();
    img.close().unwrap();
    assert_qemu_check_clean(&q, "qcow2");
}

#[test]
fn a_write_landing_on_metadata_is_refused_and_marks_the_image_corrupt_as_qemu_does() {
    let dir = tempfile::tempdir().unwrap();
    // Data cluster 1 is the L1 table (refcount 1, "copied"), or the refcount table or block.
    for target in ["L1 table", "refcount table", "refcount block"] {
        let q = dir.path().join("ovl.qcow2");
        let _ = std::fs::remove_file(&q);
        qemu_create(&q, "qcow2", "", 4 * MIB);
        qemu_io(&q, "qcow2", "write -P 0x5a 0 192k");
        let b = read_file(&q);
        let (l1, l2, rt) = structures(&b);
        let host = match target {
            "L1 table" => l1,
            "refcount table" => rt,
            _ => be64(&b, rt as usize),
        };
        patch(&q, l2 + 8, &(host | (1 << 63)).to_be_bytes());
        assert_eq!(vmi_counts(&q), qemu_counts(&q), "{target}");
        // qemu itself refuses the write and marks the image corrupt.
        let qc = dir.path().join("ovl-qemu.qcow2");
        std::fs::copy(&q, &qc).unwrap();
        let _ = std::process::Command::new("qemu-io")
            .args(["-f", "qcow2", "-c", "write -P 0x77 64k 4k", s(&qc)])
            .output()
            .unwrap();
        assert_eq!(
            qemu_info(&qc, "qcow2")["format-specific"]["data"]["corrupt"],
            true
        );
        let mut marked = read_file(&q);
        marked[79] |= 2;
        let img = open_rw(&q);
        let e = img.write_at(&[0x77; 4096], 65536).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Corrupt, "{target}: {e}");
        assert!(e.to_string().contains(target), "{target}: {e}");
        let e = img.write_at(&[0x77; 4096], 3 * MIB).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Corrupt, "further writes: {e}");
        let _ = img.close();
        assert_eq!(
            qemu_info(&q, "qcow2")["format-specific"]["data"]["corrupt"],
            true
        );
        assert!(
            read_file(&q) == marked,
            "{target}: more than the corrupt bit changed"
        );
        let r = vmi_check(&q, CheckMode::RepairAll);
        assert_eq!(
            (r.corruptions, r.leaks),
            (0, 0),
            "{target}: {:?}",
            r.messages
        );
        assert_qemu_check_clean(&q, "qcow2");
        assert_eq!(
            qemu_info(&q, "qcow2")["format-specific"]["data"]["corrupt"],
            false
        );
    }
}

// ----- hostile images -----

fn patch(p: &Path, at: u64, bytes: &[u8]) {
    let f = std::fs::OpenOptions::new().write(true).open(p).unwrap();
    f.write_all_at(bytes, at).unwrap();
}

fn open_err(p: &Path, opts: &OpenOptions) -> vmi_disk::Error {
    Image::open(p, opts).unwrap_err()
}

#[test]
fn hostile_backing_names_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let q = dir.path().join("evil.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-u",
        "-b",
        "/etc/passwd",
        "-F",
        "raw",
        s(&q),
        "1M",
    ]);
    let allow = backing_gate(dir.path());
    let e = open_err(&q, &allow);
    assert_eq!(e.kind(), ErrorKind::Refused, "{e}");
    assert!(e.to_string().contains("/etc/passwd"), "{e}");
    let j = dir.path().join("json.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-u",
        "-b",
        "json:{\"file.filename\":\"/etc/passwd\"}",
        "-F",
        "raw",
        s(&j),
        "1M",
    ]);
    let e = open_err(&j, &allow);
    assert_eq!(e.kind(), ErrorKind::Refused, "{e}");
}

#[test]
fn external_data_file_is_refused_by_default() {
    let dir = tempfile::tempdir().unwrap();
    let q = dir.path().join("ext.qcow2");
    let ext = dir.path().join("ext.raw");
    qemu_create(&q, "qcow2", &format!("data_file={}", s(&ext)), 4 * MIB);
    qemu_io(&q, "qcow2", "write -P 0x77 0 64k");
    let e = open_err(&q, &OpenOptions::new());
    assert_eq!(e.kind(), ErrorKind::Refused, "{e}");
    // Allowed explicitly, it reads through the data file.
    let img = Image::open(
        &q,
        &OpenOptions::new().gate(Gate::new().allow_data_file(true).confine_to(dir.path())),
    )
    .unwrap();
    let mut buf = vec![0u8; 65536];
    img.read_at(&mut buf, 0).unwrap();
    assert!(buf.iter().all(|&b| b == 0x77));
}

#[test]
fn hostile_header_fields_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let base = small_image(dir.path(), "base.qcow2");
    let bytes = read_file(&base);
    let cases: &[(&str, u64, &[u8], &str)] = &[
        ("l1", 36, &(1u32 << 31).to_be_bytes(), "L1"),
        ("order", 96, &7u32.to_be_bytes(), "refcount_order 7"),
        ("bits", 20, &30u32.to_be_bytes(), "cluster_bits"),
        ("rt", 48, &(1u64 << 50).to_be_bytes(), "refcount table"),
    ];
    for (name, at, val, expect) in cases {
        let p = dir.path().join(format!("{name}.qcow2"));
        std::fs::write(&p, &bytes).unwrap();
        patch(&p, *at, val);
        let e = open_err(&p, &OpenOptions::new().format(Some(Format::Qcow2)));
        assert!(e.to_string().contains(expect), "{name}: {e}");
    }
    // L1 size 2^40 entries cannot even be stated in the 32-bit field; a huge virtual size with
    // a small L1 is refused.
    let p = dir.path().join("size.qcow2");
    std::fs::write(&p, &bytes).unwrap();
    patch(&p, 24, &(1u64 << 60).to_be_bytes());
    let e = open_err(&p, &OpenOptions::new().format(Some(Format::Qcow2)));
    assert!(e.to_string().contains("L1"), "{e}");
    // Truncated.
    let p = dir.path().join("trunc.qcow2");
    std::fs::write(&p, &bytes[..100]).unwrap();
    let e = open_err(&p, &OpenOptions::new().format(Some(Format::Qcow2)));
    assert_eq!(e.kind(), ErrorKind::Invalid, "{e}");
    let p = dir.path().join("trunc2.qcow2");
    std::fs::write(&p, &bytes[..3 * 65536 + 10]).unwrap();
    let img = open_ro(&p);
    let mut buf = vec![0u8; 65536];
    assert!(img.read_at(&mut buf, 0).is_err());
}

#[test]
fn compressed_cluster_inflating_beyond_its_cluster_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let q = dir.path().join("bomb.qcow2");
    let img = Image::create(&q, Format::Qcow2, &opts("cluster_size=4k", MIB)).unwrap();
    let w = img.driver().compressed_writer().unwrap();
    // 64 KiB of zeroes deflated with the same window, stored as one 4 KiB cluster.
    let mut c = flate2::Compress::new(flate2::Compression::default(), false);
    let mut z = Vec::with_capacity(4096);
    c.compress_vec(&[0u8; 65536], &mut z, flate2::FlushCompress::Finish)
        .unwrap();
    w.write_compressed(0, &z).unwrap();
    img.close().unwrap();
    let img = open_ro(&q);
    let mut buf = vec![0u8; 4096];
    let e = img.read_at(&mut buf, 0).unwrap_err();
    assert!(e.to_string().contains("more than"), "{e}");
}

#[test]
fn mutated_images_never_panic() {
    let dir = tempfile::tempdir().unwrap();
    let mut bases = Vec::new();
    for (i, o) in [
        "cluster_size=512",
        "cluster_size=16k,extended_l2=on",
        "cluster_size=1k,compression_type=zstd",
    ]
    .iter()
    .enumerate()
    {
        let q = dir.path().join(format!("m{i}.qcow2"));
        qemu_create(&q, "qcow2", o, 256 * 1024);
        qemu_io(&q, "qcow2", "write -P 0x5a 0 8k");
        qemu_io(&q, "qcow2", "write -c -P 0x11 64k 16k");
        qemu_io(&q, "qcow2", "write -z 128k 16k");
        qemu_img(&["snapshot", "-c", "s1", s(&q)]);
        bases.push(read_file(&q));
    }
    let mut rng = StdRng::seed_from_u64(0x9c02);
    for n in 0..2000 {
        let mut b = bases[n % bases.len()].clone();
        for _ in 0..rng.gen_range(1..8) {
            // Half the mutations hit the header, the rest the tables and data after it.
            let at = if rng.gen_bool(0.5) {
                rng.gen_range(0..112.min(b.len()))
            } else {
                rng.gen_range(0..b.len())
            };
            match rng.gen_range(0..4) {
                0 => b[at] ^= 1 << rng.gen_range(0..8),
                1 => b[at] = rng.gen(),
                2 => b[at] = 0xff,
                _ => b[at] = 0,
            }
        }
        if n % 50 == 0 {
            b.truncate(rng.gen_range(0..b.len()));
        }
        vmi_disk::fuzzing::exercise(Some(Format::Qcow2), &b);
    }
}

// ----- measure -----

#[test]
fn measure_matches_qemu_img() {
    let dir = tempfile::tempdir().unwrap();
    for (size, o) in [
        (MIB, ""),
        (10 << 30, ""),
        (100 * MIB + 3, "cluster_size=512"),
        (7 << 30, "cluster_size=2M"),
        (1 << 30, "refcount_bits=1"),
        (3 << 30, "preallocation=full"),
        (5 << 30, "extended_l2=on"),
        (MIB + 1, "compat=0.10,preallocation=metadata"),
    ] {
        let mut args = vec!["measure", "--output=json", "-O", "qcow2"];
        if !o.is_empty() {
            args.extend(["-o", o]);
        }
        let sz = size.to_string();
        args.extend(["--size", &sz]);
        let out = qemu_img(&args);
        let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let m = vmi_disk::formats::measure(Format::Qcow2, &opts(o, size), None).unwrap();
        assert_eq!(Some(m.required), j["required"].as_u64(), "{size} {o}");
        assert_eq!(
            Some(m.fully_allocated),
            j["fully-allocated"].as_u64(),
            "{size} {o}"
        );
    }
    // From a source image.
    let raw = dir.path().join("src.raw");
    scattered_raw(&raw, 32 * MIB, 30, 1);
    let q = dir.path().join("src.qcow2");
    qemu_convert(&raw, "raw", &q, "qcow2", "", &[]);
    for o in ["", "cluster_size=512", "cluster_size=2M", "extended_l2=on"] {
        let mut args = vec!["measure", "--output=json", "-O", "qcow2", "-f", "qcow2"];
        if !o.is_empty() {
            args.extend(["-o", o]);
        }
        args.push(s(&q));
        let out = qemu_img(&args);
        let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let src = open_ro(&q);
        let m = vmi_disk::formats::measure(Format::Qcow2, &opts(o, 0), Some(&src)).unwrap();
        assert_eq!(Some(m.required), j["required"].as_u64(), "source {o}");
        assert_eq!(
            Some(m.fully_allocated),
            j["fully-allocated"].as_u64(),
            "source {o}"
        );
    }
}

#[test]
fn large_writes_over_fresh_clusters_land_as_runs_qemu_reads() {
    // Whole fresh clusters of one write are allocated as one run and written at once: across L2
    // table boundaries (512-byte clusters: one table covers 32 KiB), around partial clusters and
    // over clusters already written.
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("src.raw");
    let size = 6 * MIB + 1536;
    scattered_raw(&raw, size, 30, 11);
    let data = read_file(&raw);
    for (i, o) in ["", "cluster_size=512", "extended_l2=on", "compat=0.10"]
        .iter()
        .enumerate()
    {
        let q = dir.path().join(format!("r{i}.qcow2"));
        let img = Image::create(&q, Format::Qcow2, &opts(o, size)).unwrap();
        // An early overlapping write, so later runs meet allocated clusters in their middle.
        img.write_at(&data[MIB as usize..MIB as usize + 70_000], MIB)
            .unwrap();
        let mut at = 0usize;
        let mut step = 3 * MIB as usize + 777;
        while at < data.len() {
            let end = (at + step).min(data.len());
            img.write_at(&data[at..end], at as u64).unwrap();
            at = end;
            step = step / 2 + 4096;
        }
        img.close().unwrap();
        assert_qemu_check_clean(&q, "qcow2");
        assert_qemu_identical(&q, "qcow2", &raw, "raw");
        assert_image_matches_raw(&open_ro(&q), &raw);
    }
}

/// Writers of fresh clusters copy their data without the metadata lock. Eight threads writing
/// overlapping ranges of one image at once (whole clusters, partial clusters, spans of two L2
/// tables) must leave an image `qemu-img check` finds clean — no cluster allocated twice or
/// leaked — in which every cluster holds what one writer wrote to it, whole.
#[test]
fn concurrent_writers_of_fresh_clusters_leave_a_clean_image() {
    let dir = tempfile::tempdir().unwrap();
    for o in [
        "cluster_size=4k",
        "cluster_size=64k",
        "cluster_size=64k,extended_l2=on",
    ] {
        let q = dir.path().join("c.qcow2");
        let _ = std::fs::remove_file(&q);
        let cs: u64 = if o.contains("4k") { 4096 } else { 65536 };
        // With 4 KiB clusters an L2 table maps 2 MiB: runs cross tables.
        let size = 24 * MIB;
        let img = Image::create(&q, Format::Qcow2, &opts(o, size)).unwrap();
        std::thread::scope(|s| {
            for t in 0..8u8 {
                let img = &img;
                s.spawn(move || {
                    let mut rng = StdRng::seed_from_u64(u64::from(t) + 7);
                    for _ in 0..40 {
                        let clusters = rng.gen_range(1..48u64);
                        let start = rng.gen_range(0..size / cs - clusters) * cs;
                        // Now and then a write that is not cluster-aligned at its end.
                        let len = clusters * cs - if rng.gen_bool(0.2) { 512 } else { 0 };
                        let fill = (t + 1) * 16 + (clusters % 16) as u8;
                        img.write_at(&vec![fill; len as usize], start).unwrap();
                    }
                });
            }
        });
        img.close().unwrap();
        assert_qemu_check_clean(&q, "qcow2");
        // Every cluster is whole: the first byte of a written 512-byte sector repeats through
        // it (a write covers whole sectors of one cluster, overlapping writers take turns).
        let img = open_ro(&q);
        let mut buf = vec![0u8; cs as usize];
        for c in 0..size / cs {
            img.read_at(&mut buf, c * cs).unwrap();
            for sector in buf.chunks(512) {
                assert!(
                    sector.iter().all(|&b| b == sector[0]),
                    "{o}: cluster {c} has a torn sector"
                );
            }
        }
    }
}

#[test]
fn compressed_clusters_are_packed_back_to_back_at_byte_granularity_as_qemu_packs_them() {
    let dir = tempfile::tempdir().unwrap();
    let q = dir.path().join("packed.qcow2");
    let cs = 65536usize;
    let img = Image::create(&q, Format::Qcow2, &opts("", 8 * cs as u64)).unwrap();
    let w = img.driver().compressed_writer().unwrap();
    let mut rng = StdRng::seed_from_u64(11);
    let mut lens = Vec::new();
    let mut raw = vec![0u8; 8 * cs];
    for (i, c) in raw.chunks_mut(cs).enumerate() {
        // Compressible, of different sizes: a few random bytes between runs.
        for (j, b) in c.iter_mut().enumerate() {
            *b = if j % (64 + 16 * i) < 8 {
                rng.gen()
            } else {
                b'x'
            };
        }
        let z = w.compress(c).unwrap().unwrap();
        w.write_compressed((i * cs) as u64, &z).unwrap();
        lens.push(z.len() as u64);
    }
    img.close().unwrap();
    let rawp = dir.path().join("packed.raw");
    std::fs::write(&rawp, &raw).unwrap();
    assert_qemu_check_clean(&q, "qcow2");
    assert_qemu_identical(&q, "qcow2", &rawp, "raw");
    // The L2 entries: each compressed cluster starts where the previous one ended, not at the
    // next sector.
    let f = std::fs::File::open(&q).unwrap();
    let mut b8 = [0u8; 8];
    f.read_exact_at(&mut b8, 40).unwrap();
    let l1 = u64::from_be_bytes(b8);
    f.read_exact_at(&mut b8, l1).unwrap();
    let l2 = u64::from_be_bytes(b8) & 0x00ff_ffff_ffff_fe00;
    let host_mask = (1u64 << 54) - 1;
    let mut hosts = Vec::new();
    for i in 0..8u64 {
        f.read_exact_at(&mut b8, l2 + 8 * i).unwrap();
        let e = u64::from_be_bytes(b8);
        assert_ne!(e & (1 << 62), 0, "cluster {i} is compressed");
        hosts.push(e & host_mask);
    }
    for i in 1..8 {
        assert_eq!(
            hosts[i],
            hosts[i - 1] + lens[i - 1],
            "cluster {i}: {hosts:?} {lens:?}"
        );
    }
    assert!(hosts.iter().any(|h| h % 512 != 0), "{hosts:?}");
}
