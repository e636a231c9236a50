//! VMDK: the conformance suite per subformat, qemu-img interoperability in both directions, and
//! hostile images (escaping extent names, truncation, tables beyond the file, mutations).

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::path::Path;
use vmi_disk::formats::vmdk::VmdkDriver;
use vmi_disk::{CheckMode, CreateOptions, ErrorKind, Format, FormatOptions, Image, OpenOptions};
use vmi_testkit::conformance::{run, Caps};
use vmi_testkit::fixtures::{assert_image_matches_raw, read_file, scattered_raw};
use vmi_testkit::qemu::{
    assert_qemu_check_clean, assert_qemu_identical, qemu_convert, qemu_create, qemu_info,
};

const SUBFORMATS: [&str; 5] = [
    "monolithicSparse",
    "monolithicFlat",
    "twoGbMaxExtentSparse",
    "twoGbMaxExtentFlat",
    "streamOptimized",
];

/// Fixture size: several grain tables (32 MiB each) plus a partial one.
const FIXTURE: u64 = 40 * 1024 * 1024;

fn opts(o: &str, size: u64) -> CreateOptions {
    let mut fo = FormatOptions::new();
    fo.parse(o).unwrap();
    CreateOptions::new(size).options(fo)
}

fn open(path: &Path) -> Image {
    Image::open(path, &OpenOptions::new().format(Some(Format::Vmdk))).unwrap()
}

/// Copy `raw` into a new vmdk at `dst` with vmi, skipping zero grains; streamOptimized goes
/// through the compressed writer.
fn vmi_convert(raw: &Path, dst: &Path, o: &str) {
    let src = Image::open(raw, &OpenOptions::new().format(Some(Format::Raw))).unwrap();
    let size = src.virtual_size();
    let img = Image::create(dst, Format::Vmdk, &opts(o, size)).unwrap();
    let unit = 64 * 1024u64;
    let mut buf = vec![0u8; unit as usize];
    let mut off = 0;
    while off < size {
        let n = unit.min(size - off) as usize;
        src.read_at(&mut buf[..n], off).unwrap();
        if buf[..n].iter().any(|&b| b != 0) {
            match img.driver().compressed_writer() {
                Some(cw) => {
                    assert_eq!(cw.unit_size(), unit);
                    let c = cw.compress(&buf[..n]).unwrap().unwrap();
                    cw.write_compressed(off, &c).unwrap();
                }
                None => img.write_at(&buf[..n], off).unwrap(),
            }
        }
        off += n as u64;
    }
    img.close().unwrap();
}

fn conform(sub: &str, random_writes: bool) {
    let dir = tempfile::tempdir().unwrap();
    run(
        dir.path(),
        Format::Vmdk,
        &format!("subformat={sub}"),
        Caps {
            random_writes,
            grow: false,
        },
    );
}

#[test]
fn monolithic_sparse_conforms() {
    conform("monolithicSparse", true);
}

#[test]
fn monolithic_flat_conforms() {
    conform("monolithicFlat", true);
}

#[test]
fn two_gb_sparse_conforms() {
    conform("twoGbMaxExtentSparse", true);
}

#[test]
fn two_gb_flat_conforms() {
    conform("twoGbMaxExtentFlat", true);
}

#[test]
fn stream_optimized_conforms() {
    conform("streamOptimized", false);
}

#[test]
fn vmi_reads_every_subformat_qemu_writes() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("src.raw");
    scattered_raw(&raw, FIXTURE, 40, 11);
    for sub in SUBFORMATS {
        let dst = dir.path().join(format!("q-{sub}.vmdk"));
        qemu_convert(&raw, "raw", &dst, "vmdk", &format!("subformat={sub}"), &[]);
        let img = open(&dst);
        assert_image_matches_raw(&img, &raw);
        let info = img.driver().info();
        assert_eq!(
            info.format_specific,
            qemu_info(&dst, "vmdk")["format-specific"],
            "{sub}"
        );
        if sub.contains("Sparse") || sub == "streamOptimized" {
            assert_eq!(info.cluster_size, Some(65536), "{sub}");
        }
        let report = img.driver().check(CheckMode::ReadOnly).unwrap();
        assert_eq!(report.corruptions, 0, "{sub}: {:?}", report.messages);
    }
}

#[test]
fn qemu_reads_every_subformat_vmi_writes() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("src.raw");
    scattered_raw(&raw, FIXTURE, 40, 12);
    for sub in SUBFORMATS {
        let dst = dir.path().join(format!("v-{sub}.vmdk"));
        vmi_convert(&raw, &dst, &format!("subformat={sub}"));
        assert_qemu_check_clean(&dst, "vmdk");
        assert_qemu_identical(&dst, "vmdk", &raw, "raw");
        let info = qemu_info(&dst, "vmdk");
        assert_eq!(info["virtual-size"], FIXTURE, "{sub}");
        assert_eq!(info["format"], "vmdk", "{sub}");
        assert_eq!(info["format-specific"]["data"]["create-type"], sub, "{sub}");
        // And vmi reads back what it wrote.
        assert_image_matches_raw(&open(&dst), &raw);
    }
}

#[test]
fn zeroed_grain_images_round_trip_with_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("z.vmdk");
    let img = Image::create(&path, Format::Vmdk, &opts("zeroed_grain=on", 8 << 20)).unwrap();
    img.write_at(&[0xabu8; 200_000], 0).unwrap();
    img.write_zeroes(65536, 65536).unwrap();
    img.close().unwrap();
    assert_qemu_check_clean(&path, "vmdk");
    let img = open(&path);
    let st = img.block_status(65536, 65536).unwrap();
    assert_eq!(st.kind, vmi_disk::BlockKind::Zero);
    let mut buf = vec![1u8; 65536];
    img.read_at(&mut buf, 65536).unwrap();
    assert!(buf.iter().all(|&b| b == 0));
    let raw = dir.path().join("z.raw");
    qemu_convert(&path, "vmdk", &raw, "raw", "", &[]);
    assert_image_matches_raw(&img, &raw);
}

#[test]
fn adapter_type_and_hwversion_are_written_like_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let ours = dir.path().join("ours.vmdk");
    let theirs = dir.path().join("theirs.vmdk");
    let o = "subformat=monolithicFlat,adapter_type=lsilogic,hwversion=7";
    Image::create(&ours, Format::Vmdk, &opts(o, 100 << 20))
        .unwrap()
        .close()
        .unwrap();
    qemu_create(&theirs, "vmdk", o, 100 << 20);
    let strip = |p: &Path| -> Vec<String> {
        String::from_utf8(read_file(p))
            .unwrap()
            .lines()
            // The CID is random; toolsVersion is only written by newer qemu-img.
            .filter(|l| !l.starts_with("CID=") && !l.starts_with("ddb.toolsVersion"))
            .map(|l| l.replace("ours", "NAME").replace("theirs", "NAME"))
            .collect()
    };
    assert_eq!(strip(&ours), strip(&theirs));
    let text = String::from_utf8(read_file(&ours)).unwrap();
    assert!(text.contains("ddb.adapterType = \"lsilogic\""), "{text}");
    assert!(text.contains("ddb.virtualHWVersion = \"7\""), "{text}");
    assert!(text.contains("ddb.geometry.heads = \"255\""), "{text}");
    assert!(text.contains("ddb.toolsVersion = \"2147483647\""), "{text}");
    for p in [&ours, &theirs] {
        let img = open(p);
        let d = img
            .driver()
            .as_any()
            .downcast_ref::<VmdkDriver>()
            .unwrap()
            .descriptor();
        assert_eq!(d.adapter_type.as_deref(), Some("lsilogic"));
        assert_eq!(d.hw_version.as_deref(), Some("7"));
        assert_eq!(d.geometry, Some((12, 255, 63)));
    }
}

#[test]
fn companion_files_lists_the_extents() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("d.vmdk");
    qemu_create(&path, "vmdk", "subformat=twoGbMaxExtentSparse", 5 << 30);
    let files = vmi_disk::formats::companion_files(Format::Vmdk, &path);
    let names: Vec<String> = files
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, ["d-s001.vmdk", "d-s002.vmdk", "d-s003.vmdk"]);
    let img = open(&path);
    assert_eq!(img.virtual_size(), 5 << 30);
    let mut buf = [1u8; 512];
    img.read_at(&mut buf, (4 << 30) + 12345 * 512).unwrap();
    assert_eq!(buf, [0u8; 512]);
}

#[test]
fn probe_recognises_sparse_and_descriptor_files() {
    let dir = tempfile::tempdir().unwrap();
    for sub in ["monolithicSparse", "monolithicFlat", "streamOptimized"] {
        let path = dir.path().join(format!("{sub}.vmdk"));
        qemu_create(&path, "vmdk", &format!("subformat={sub}"), 1 << 20);
        let img = Image::open(&path, &OpenOptions::new()).unwrap();
        assert_eq!(img.format(), Format::Vmdk, "{sub}");
    }
}

fn descriptor_naming(extent: &str) -> String {
    format!(
        "# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=ffffffff\n\
         createType=\"monolithicFlat\"\n\nRW 2048 FLAT \"{extent}\" 0\n"
    )
}

#[test]
fn extents_outside_the_descriptor_folder_are_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("sub")).unwrap();
    std::fs::write(dir.path().join("sub/x"), vec![0u8; 1 << 20]).unwrap();
    std::fs::write(dir.path().join("x"), vec![0u8; 1 << 20]).unwrap();
    for name in ["/etc/passwd", "../x", "sub/x", "json:{}"] {
        let path = dir.path().join("sub/evil.vmdk");
        std::fs::write(&path, descriptor_naming(name)).unwrap();
        let e = Image::open(&path, &OpenOptions::new()).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Refused, "{name}: {e}");
        assert!(e.to_string().contains(name), "{name}: {e}");
    }
}

#[test]
fn truncated_and_corrupt_sparse_images_fail_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.vmdk");
    qemu_create(&path, "vmdk", "", 64 << 20);
    vmi_disk::Image::open(&path, &OpenOptions::new())
        .unwrap()
        .close()
        .unwrap();
    qemu_io_write(&path);
    let good = read_file(&path);
    let try_open = |bytes: &[u8]| {
        let p = dir.path().join("bad.vmdk");
        std::fs::write(&p, bytes).unwrap();
        Image::open(&p, &OpenOptions::new().format(Some(Format::Vmdk))).map(|img| {
            let mut buf = vec![0u8; 1 << 20];
            let r = img.read_at(&mut buf, 0);
            (img, r)
        })
    };
    // Truncated inside the metadata.
    assert!(try_open(&good[..4096]).is_err());
    // Grain directory beyond the end.
    let mut b = good.clone();
    b[56..64].copy_from_slice(&(1u64 << 40).to_le_bytes());
    let e = try_open(&b).unwrap_err();
    assert!(e.to_string().contains("grain directory"), "{e}");
    // A grain directory entry (grain table) beyond the end: reading fails.
    let gd = u64::from_le_bytes(good[56..64].try_into().unwrap());
    let mut b = good.clone();
    b[gd as usize * 512..gd as usize * 512 + 4].copy_from_slice(&0x0fff_ffffu32.to_le_bytes());
    let (_, r) = try_open(&b).unwrap();
    let e = r.unwrap_err();
    assert!(e.to_string().contains("grain table 0"), "{e}");
    // A grain table entry beyond the end: reading fails, check reports it.
    let gt = u32::from_le_bytes(
        good[gd as usize * 512..gd as usize * 512 + 4]
            .try_into()
            .unwrap(),
    );
    let mut b = good.clone();
    let at = gt as usize * 512;
    b[at..at + 4].copy_from_slice(&0x00ff_ffffu32.to_le_bytes());
    let (img, r) = try_open(&b).unwrap();
    assert!(r.unwrap_err().to_string().contains("beyond the end"));
    assert!(img.driver().check(CheckMode::ReadOnly).unwrap().corruptions > 0);
    // Two entries pointing at the same grain.
    let mut b = good.clone();
    let first = b[at..at + 4].to_vec();
    b[at + 4..at + 8].copy_from_slice(&first);
    let (img, _) = try_open(&b).unwrap();
    assert!(img.driver().check(CheckMode::ReadOnly).unwrap().corruptions > 0);
    // Huge capacity.
    let mut b = good.clone();
    b[12..20].copy_from_slice(&(u64::MAX / 2).to_le_bytes());
    assert!(try_open(&b).is_err());
}

fn qemu_io_write(path: &Path) {
    vmi_testkit::qemu::qemu_io(path, "vmdk", "write -P 0x5a 0 200k");
}

#[test]
fn mutated_images_never_panic() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.vmdk");
    let raw = dir.path().join("m.raw");
    scattered_raw(&raw, 2 << 20, 8, 3);
    let mut seeds = Vec::new();
    for sub in ["monolithicSparse", "streamOptimized"] {
        let _ = std::fs::remove_file(&path);
        qemu_convert(&raw, "raw", &path, "vmdk", &format!("subformat={sub}"), &[]);
        seeds.push(read_file(&path));
        let _ = std::fs::remove_file(&path);
        vmi_convert(&raw, &path, &format!("subformat={sub}"));
        seeds.push(read_file(&path));
    }
    // 500 per seed image (2000 in all) by default; set VMDK_MUTATIONS for a longer run.
    let per_seed: usize = std::env::var("VMDK_MUTATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(500);
    let mut rng = StdRng::seed_from_u64(0x766d_646b);
    for seed in &seeds {
        assert!(vmi_disk::fuzzing::exercise(Some(Format::Vmdk), seed));
        // Metadata lives in the first 64 KiB (header, descriptor, directories, tables) and, for
        // streams, in the last few sectors.
        for _ in 0..per_seed {
            let mut b = seed.clone();
            for _ in 0..rng.gen_range(1..8) {
                let i = if rng.gen_bool(0.8) {
                    rng.gen_range(0..b.len().min(65536))
                } else {
                    rng.gen_range(b.len().saturating_sub(2048)..b.len())
                };
                b[i] = rng.gen();
            }
            vmi_disk::fuzzing::exercise(Some(Format::Vmdk), &b);
        }
    }
}

#[test]
fn writes_across_the_2_gib_extent_boundary_reach_both_extents() {
    let dir = tempfile::tempdir().unwrap();
    for sub in ["twoGbMaxExtentSparse", "twoGbMaxExtentFlat"] {
        let path = dir.path().join(format!("{sub}.vmdk"));
        let size = (4 << 30) + (1 << 20);
        let img = Image::create(
            &path,
            Format::Vmdk,
            &opts(&format!("subformat={sub}"), size),
        )
        .unwrap();
        let at = (2 << 30) - 1000;
        img.write_at(&[0x3cu8; 3000], at).unwrap();
        img.write_at(&[0x7eu8; 512], size - 512).unwrap();
        img.close().unwrap();
        assert_eq!(
            vmi_disk::formats::companion_files(Format::Vmdk, &path).len(),
            3,
            "{sub}"
        );
        assert_qemu_check_clean(&path, "vmdk");
        vmi_testkit::qemu::qemu_io(&path, "vmdk", &format!("read -P 0x3c {at} 3000"));
        vmi_testkit::qemu::qemu_io(&path, "vmdk", &format!("read -P 0x7e {} 512", size - 512));
        vmi_testkit::qemu::qemu_io(&path, "vmdk", &format!("read -P 0 {} 4096", at + 3000));
        let img = open(&path);
        let mut buf = vec![0u8; 3000];
        img.read_at(&mut buf, at).unwrap();
        assert!(buf.iter().all(|&b| b == 0x3c), "{sub}");
    }
}

#[test]
fn children_record_their_parent_like_qemu_and_read_through_it() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.vmdk");
    qemu_create(&base, "vmdk", "", 8 << 20);
    vmi_testkit::qemu::qemu_io(&base, "vmdk", "write -P 0x11 0 8M");
    let base_cid = {
        let img = open(&base);
        let d = img.driver().as_any().downcast_ref::<VmdkDriver>().unwrap();
        d.descriptor().cid
    };
    for sub in ["monolithicSparse", "twoGbMaxExtentSparse"] {
        let child = dir.path().join(format!("child-{sub}.vmdk"));
        let spec = vmi_disk::BackingSpec {
            name: "base.vmdk".into(),
            format: Some(Format::Vmdk),
        };
        let mut img = Image::create(
            &child,
            Format::Vmdk,
            &opts(&format!("subformat={sub}"), 8 << 20).backing(spec),
        )
        .unwrap();
        img.set_backing(Some(open(&base)));
        img.write_at(&[0x22u8; 100], 70000).unwrap();
        img.close().unwrap();
        assert_qemu_check_clean(&child, "vmdk");
        let info = qemu_info(&child, "vmdk");
        assert_eq!(info["backing-filename"], "base.vmdk", "{sub}");
        assert_eq!(
            info["format-specific"]["data"]["parent-cid"], base_cid,
            "{sub}"
        );
        for cmd in [
            "read -P 0x11 0 70000",
            "read -P 0x22 70000 100",
            "read -P 0x11 70100 8318508",
        ] {
            vmi_testkit::qemu::qemu_io(&child, "vmdk", cmd);
        }
        let gate = vmi_disk::Gate::new().allow_backing(true);
        let img = Image::open(&child, &OpenOptions::new().gate(gate)).unwrap();
        assert_eq!(img.chain_len(), 2);
        let mut buf = vec![0u8; 200];
        img.read_at(&mut buf, 69950).unwrap();
        assert_eq!(&buf[..50], &[0x11u8; 50][..]);
        assert_eq!(&buf[50..150], &[0x22u8; 100][..]);
        assert_eq!(&buf[150..], &[0x11u8; 50][..]);
    }
}

#[test]
fn the_first_write_gives_the_image_a_new_cid() {
    let dir = tempfile::tempdir().unwrap();
    for sub in ["monolithicSparse", "monolithicFlat"] {
        let path = dir.path().join(format!("{sub}.vmdk"));
        qemu_create(&path, "vmdk", &format!("subformat={sub}"), 4 << 20);
        let before = qemu_info(&path, "vmdk")["format-specific"]["data"]["cid"].clone();
        let img = Image::open(
            &path,
            &OpenOptions::new().format(Some(Format::Vmdk)).write(true),
        )
        .unwrap();
        img.write_at(&[1u8; 4096], 0).unwrap();
        img.close().unwrap();
        let info = qemu_info(&path, "vmdk");
        assert_ne!(info["format-specific"]["data"]["cid"], before, "{sub}");
        let cid = open(&path)
            .driver()
            .as_any()
            .downcast_ref::<VmdkDriver>()
            .unwrap()
            .descriptor()
            .cid;
        assert_eq!(info["format-specific"]["data"]["cid"], cid, "{sub}");
        assert_qemu_check_clean(&path, "vmdk");
        vmi_testkit::qemu::qemu_io(&path, "vmdk", "read -P 1 0 4096");
    }
}

#[test]
fn read_only_extents_refuse_writes_and_zero_extents_read_as_zero() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("a.bin"), vec![0x42u8; 1 << 20]).unwrap();
    let path = dir.path().join("ro.vmdk");
    std::fs::write(
        &path,
        "# Disk DescriptorFile\nversion=1\nCID=00000001\nparentCID=ffffffff\n\
         createType=\"monolithicFlat\"\n\nRDONLY 2048 FLAT \"a.bin\" 0\nRW 2048 ZERO\n",
    )
    .unwrap();
    let img = Image::open(&path, &OpenOptions::new().write(true)).unwrap();
    assert_eq!(img.virtual_size(), 2 << 20);
    let e = img.write_at(&[1u8; 512], 0).unwrap_err();
    assert!(e.to_string().contains("a.bin"), "{e}");
    let mut buf = vec![0u8; 1024];
    img.read_at(&mut buf, (1 << 20) - 512).unwrap();
    assert!(buf[..512].iter().all(|&b| b == 0x42));
    assert!(buf[512..].iter().all(|&b| b == 0));
}

#[test]
fn create_never_overwrites_an_existing_extent_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("x.vmdk");
    std::fs::write(dir.path().join("x-s002.vmdk"), b"keep me").unwrap();
    let o = opts("subformat=twoGbMaxExtentSparse", 3 << 30);
    let e = Image::create(&path, Format::Vmdk, &o).unwrap_err();
    assert!(e.to_string().contains("x-s002.vmdk"), "{e}");
    assert_eq!(read_file(&dir.path().join("x-s002.vmdk")), b"keep me");
    assert!(!path.exists());
    assert!(!dir.path().join("x-s001.vmdk").exists());
}

#[test]
fn create_refuses_values_that_would_break_the_descriptor() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("v.vmdk");
    for o in ["hwversion=4\"\nRW 1 FLAT \"/etc/passwd", "toolsversion=1\n"] {
        let mut fo = FormatOptions::new();
        fo.set(o.split_once('=').unwrap().0, o.split_once('=').unwrap().1);
        let e = Image::create(
            &path,
            Format::Vmdk,
            &CreateOptions::new(1 << 20).options(fo),
        )
        .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Usage, "{e}");
        assert!(!path.exists());
    }
}

#[test]
fn zeroing_unallocated_grains_allocates_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("z.vmdk");
    let img = Image::create(&path, Format::Vmdk, &opts("", 8 << 20)).unwrap();
    let before = std::fs::metadata(&path).unwrap().len();
    img.write_zeroes(100, 1000).unwrap();
    img.write_zeroes(65536, 3 << 20).unwrap();
    img.close().unwrap();
    assert_eq!(std::fs::metadata(&path).unwrap().len(), before);
    assert_qemu_check_clean(&path, "vmdk");
}

#[test]
fn concurrent_writers_allocate_distinct_grains() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.vmdk");
    let raw = dir.path().join("c.raw");
    let size = 16u64 << 20;
    let img = Image::create(&path, Format::Vmdk, &opts("", size)).unwrap();
    let mut expect = vec![0u8; size as usize];
    let chunks: Vec<(u64, Vec<u8>)> = (0..64u64)
        .map(|i| {
            (
                i * 256 * 1024 + i * 7,
                vmi_testkit::fixtures::pattern(i, 100_000),
            )
        })
        .collect();
    for (off, data) in &chunks {
        expect[*off as usize..*off as usize + data.len()].copy_from_slice(data);
    }
    std::thread::scope(|s| {
        for part in chunks.chunks(16) {
            let img = &img;
            s.spawn(move || {
                for (off, data) in part {
                    img.write_at(data, *off).unwrap();
                }
            });
        }
    });
    img.close().unwrap();
    std::fs::write(&raw, &expect).unwrap();
    assert_qemu_check_clean(&path, "vmdk");
    assert_qemu_identical(&path, "vmdk", &raw, "raw");
    assert!(
        open(&path)
            .driver()
            .check(CheckMode::ReadOnly)
            .unwrap()
            .corruptions
            == 0
    );
}
