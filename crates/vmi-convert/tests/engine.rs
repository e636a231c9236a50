//! The copy engine against real files and qemu-img: raw→raw conversion with several worker counts,
//! hole preservation, compare and map agreeing with qemu-img, and clean failure.

use std::os::unix::fs::MetadataExt;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use vmi_convert::{
    compare, convert_to_path, map_entries, CompareOptions, CompareOutcome, ConvertOptions,
    MapEntry, Target, CONTENT_MISMATCH, SIZE_MISMATCH,
};
use vmi_disk::storage::{FailPoint, MemStorage, Storage};
use vmi_disk::{CreateOptions, Format, Gate, Image, OpenOptions};
use vmi_testkit::fixtures::{read_file, scattered_raw};
use vmi_testkit::qemu::{qemu_compare, qemu_img_status, qemu_map};

const MIB: u64 = 1 << 20;

fn open_raw(p: &Path) -> Image {
    Image::open(p, &OpenOptions::new().format(Some(Format::Raw))).expect("open raw")
}

fn raw_target(p: &Path) -> Target {
    Target {
        path: p.to_path_buf(),
        format: Format::Raw,
        create: CreateOptions::new(0),
    }
}

fn opts(workers: usize, out_of_order: bool, min_sparse: u64) -> ConvertOptions {
    ConvertOptions {
        workers,
        out_of_order,
        min_sparse,
        ..Default::default()
    }
}

/// Bytes the file occupies on disk.
fn allocated(p: &Path) -> u64 {
    std::fs::metadata(p).expect("metadata").blocks() * 512
}

fn dir_entries(d: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(d)
        .expect("read_dir")
        .map(|e| e.expect("entry").path())
        .collect();
    v.sort();
    v
}

#[test]
fn raw_to_raw_with_1_2_and_8_workers_copies_content_and_keeps_holes() {
    let dir = tempfile::tempdir().unwrap();
    let src_path = dir.path().join("src.raw");
    scattered_raw(&src_path, 64 * MIB, 24, 7);
    let expect = read_file(&src_path);
    let src = open_raw(&src_path);
    for workers in [1, 2, 8] {
        for ooo in [false, true] {
            let out = dir.path().join(format!("out-{workers}-{ooo}.raw"));
            convert_to_path(&src, &raw_target(&out), &opts(workers, ooo, 4096)).unwrap();
            assert!(read_file(&out) == expect, "{workers} workers, ooo {ooo}");
            let alloc = allocated(&out);
            assert!(alloc < 16 * MIB, "{} allocated of 64 MiB", alloc);
            assert!(qemu_compare(&src_path, "raw", &out, "raw"));
        }
    }
}

#[test]
fn zero_detection_turns_written_zeroes_into_holes_and_can_be_turned_off() {
    let dir = tempfile::tempdir().unwrap();
    let src_path = dir.path().join("zeroes.raw");
    // Fully allocated: 8 MiB of written zero bytes with one data block in the middle.
    let mut bytes = vec![0u8; 8 * MIB as usize];
    bytes[4 * MIB as usize..4 * MIB as usize + 4096].fill(0xab);
    std::fs::write(&src_path, &bytes).unwrap();
    let src = open_raw(&src_path);

    let sparse = dir.path().join("sparse.raw");
    let stats = convert_to_path(&src, &raw_target(&sparse), &opts(2, true, 4096)).unwrap();
    assert_eq!(stats.data_bytes, 4096);
    assert!(allocated(&sparse) <= MIB, "{}", allocated(&sparse));
    assert!(read_file(&sparse) == bytes);

    let full = dir.path().join("full.raw");
    let stats = convert_to_path(&src, &raw_target(&full), &opts(2, true, 0)).unwrap();
    assert_eq!(stats.data_bytes, 8 * MIB);
    assert!(allocated(&full) >= 8 * MIB, "{}", allocated(&full));
    assert!(read_file(&full) == bytes);
}

#[test]
fn the_result_matches_qemu_img_convert_of_the_same_source() {
    let dir = tempfile::tempdir().unwrap();
    let src_path = dir.path().join("src.raw");
    scattered_raw(&src_path, 32 * MIB, 40, 11);
    let ours = dir.path().join("ours.raw");
    let theirs = dir.path().join("theirs.raw");
    convert_to_path(
        &open_raw(&src_path),
        &raw_target(&ours),
        &opts(0, false, 4096),
    )
    .unwrap();
    vmi_testkit::qemu::qemu_convert(&src_path, "raw", &theirs, "raw", "", &[]);
    assert!(read_file(&ours) == read_file(&theirs));
    assert!(qemu_compare(&ours, "raw", &theirs, "raw"));
}

/// qemu-img compare's verdict and the offset it prints on a content mismatch.
fn qemu_verdict(a: &Path, b: &Path, strict: bool) -> (i32, Option<u64>) {
    let (a, b) = (a.to_str().unwrap(), b.to_str().unwrap());
    let mut args = vec!["compare", "-f", "raw", "-F", "raw"];
    if strict {
        args.push("-s");
    }
    args.extend([a, b]);
    let (code, out, _) = qemu_img_status(&args);
    let offset = out
        .split("Content mismatch at offset ")
        .nth(1)
        .and_then(|s| s.split('!').next())
        .and_then(|s| s.trim().parse().ok());
    (code, offset)
}

#[test]
fn compare_finds_a_single_flipped_byte_where_qemu_img_does() {
    let dir = tempfile::tempdir().unwrap();
    let a_path = dir.path().join("a.raw");
    scattered_raw(&a_path, 16 * MIB, 10, 3);
    let b_path = dir.path().join("b.raw");
    std::fs::copy(&a_path, &b_path).unwrap();
    let (a, b) = (open_raw(&a_path), open_raw(&b_path));
    assert_eq!(
        compare(&a, &b, &CompareOptions::default()).unwrap(),
        CompareOutcome::Identical
    );
    assert_eq!(qemu_verdict(&a_path, &b_path, false).0, 0);

    for at in [0u64, 5 * MIB + 777, 16 * MIB - 1] {
        let b_path = dir.path().join(format!("b-{at}.raw"));
        std::fs::copy(&a_path, &b_path).unwrap();
        let mut bytes = read_file(&b_path);
        bytes[at as usize] ^= 0x40;
        std::fs::write(&b_path, &bytes).unwrap();
        let b = open_raw(&b_path);
        let got = compare(&a, &b, &CompareOptions::default()).unwrap();
        assert_eq!(
            got,
            CompareOutcome::Differ {
                offset: at / 512 * 512,
                reason: CONTENT_MISMATCH.into()
            }
        );
        let (code, offset) = qemu_verdict(&a_path, &b_path, false);
        assert_eq!((code, offset), (1, Some(at / 512 * 512)));
    }
}

#[test]
fn different_sizes_are_equal_when_the_extra_part_is_zero_unless_strict() {
    let dir = tempfile::tempdir().unwrap();
    let a_path = dir.path().join("a.raw");
    scattered_raw(&a_path, 8 * MIB, 6, 5);
    let b_path = dir.path().join("b.raw");
    std::fs::copy(&a_path, &b_path).unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&b_path)
        .unwrap()
        .set_len(9 * MIB)
        .unwrap();
    let (a, b) = (open_raw(&a_path), open_raw(&b_path));
    let loose = CompareOptions::default();
    let strict = CompareOptions {
        strict: true,
        ..Default::default()
    };
    assert_eq!(compare(&a, &b, &loose).unwrap(), CompareOutcome::Identical);
    assert_eq!(compare(&b, &a, &loose).unwrap(), CompareOutcome::Identical);
    assert!(matches!(
        compare(&a, &b, &strict).unwrap(),
        CompareOutcome::Differ { reason, .. } if reason == SIZE_MISMATCH
    ));
    assert_eq!(qemu_verdict(&a_path, &b_path, false).0, 0);
    assert_eq!(qemu_verdict(&a_path, &b_path, true).0, 1);

    // Data in the extra part is a content mismatch at its offset.
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&b_path)
        .unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &[1], 8 * MIB + 1000).unwrap();
    let b = open_raw(&b_path);
    assert_eq!(
        compare(&a, &b, &loose).unwrap(),
        CompareOutcome::Differ {
            offset: 8 * MIB + 512,
            reason: CONTENT_MISMATCH.into()
        }
    );
    assert_eq!(
        qemu_verdict(&a_path, &b_path, false),
        (1, Some(8 * MIB + 512))
    );
}

#[test]
fn map_entries_of_a_sparse_raw_file_agree_with_qemu_img_map() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("sparse.raw");
    scattered_raw(&p, 32 * MIB, 12, 9);
    let mut ours: Vec<MapEntry> = Vec::new();
    map_entries(&open_raw(&p), &mut |e| {
        ours.push(e);
        Ok(())
    })
    .unwrap();
    let theirs = qemu_map(&p, "raw");
    let theirs = theirs.as_array().expect("qemu-img map prints an array");
    assert_eq!(ours.len(), theirs.len(), "{ours:#?} vs {theirs:#?}");
    for (o, t) in ours.iter().zip(theirs) {
        assert_eq!(Some(o.start), t["start"].as_u64());
        assert_eq!(Some(o.length), t["length"].as_u64());
        assert_eq!(Some(o.present), t["present"].as_bool());
        assert_eq!(Some(o.zero), t["zero"].as_bool());
        assert_eq!(Some(o.data), t["data"].as_bool());
        assert_eq!(Some(o.depth as u64), t["depth"].as_u64());
        // Data always has its host offset; holes do where qemu-img prints one (older versions
        // may not).
        match t["offset"].as_u64() {
            Some(off) => assert_eq!(o.offset, Some(off)),
            None => assert!(!o.data),
        }
    }
}

/// A raw source in memory that fails reading at `fail_at`.
fn failing_source(size: u64, fail_at: u64) -> Image {
    let s = MemStorage::from_bytes((0..size).map(|i| (i % 253 + 1) as u8).collect());
    s.fail(FailPoint::ReadAt(fail_at));
    Image::from_storage(
        Box::new(s),
        Path::new("failing.raw"),
        Some(Format::Raw),
        false,
        &Gate::new(),
    )
    .unwrap()
}

#[test]
fn an_interrupted_conversion_leaves_nothing_at_the_destination() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.raw");
    let src = failing_source(16 * MIB, 9 * MIB);
    for (workers, ooo) in [(1, false), (1, true), (4, false), (4, true)] {
        let e = convert_to_path(&src, &raw_target(&out), &opts(workers, ooo, 4096)).unwrap_err();
        assert_eq!(e.path(), Some(Path::new("failing.raw")), "{e}");
        assert!(
            dir_entries(dir.path()).is_empty(),
            "{:?}",
            dir_entries(dir.path())
        );
    }
}

#[test]
fn a_cancelled_conversion_stops_and_leaves_nothing_at_the_destination() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let dir = tempfile::tempdir().unwrap();
    let src_path = dir.path().join("src.raw");
    scattered_raw(&src_path, 64 * MIB, 64, 3);
    let src = Image::open(&src_path, &OpenOptions::new()).unwrap();
    let out = dir.path().join("out.qcow2");
    for workers in [1, 4] {
        let cancel = Arc::new(AtomicBool::new(false));
        let flag = cancel.clone();
        let seen = Arc::new(std::sync::Mutex::new(0u64));
        let seen2 = seen.clone();
        let o = ConvertOptions {
            workers,
            cancel: Some(cancel),
            // Cancel as soon as the first window is done, as a signal handler would.
            progress: Some(Arc::new(move |p: vmi_convert::Progress| {
                *seen2.lock().unwrap() = p.done;
                flag.store(true, Ordering::SeqCst);
            })),
            ..Default::default()
        };
        let target = Target {
            path: out.clone(),
            format: Format::Qcow2,
            create: CreateOptions::new(0),
        };
        let e = convert_to_path(&src, &target, &o).unwrap_err();
        assert!(e.to_string().contains("interrupted"), "{e}");
        assert!(
            *seen.lock().unwrap() < 64 * MIB,
            "the conversion ran to the end"
        );
        assert_eq!(dir_entries(dir.path()), vec![src_path.clone()]);
    }
}

#[test]
fn a_cancellation_from_outside_stops_workers_waiting_for_their_turn() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Barrier};
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.raw");
    for (workers, ooo) in [(4, false), (4, true), (1, false)] {
        let barrier = Arc::new(Barrier::new(2));
        let data = MemStorage::from_bytes((0..32 * MIB).map(|i| (i % 251 + 1) as u8).collect());
        let src = Image::from_storage(
            Box::new(OnRead(data, {
                let first = std::sync::Mutex::new(Some(barrier.clone()));
                move |offset: u64, _: usize| {
                    let b = if offset == 0 {
                        first.lock().unwrap().take()
                    } else {
                        None
                    };
                    if let Some(b) = b {
                        // Let the test cancel while this read is in flight and the other
                        // workers wait for their turn behind it.
                        b.wait();
                        std::thread::sleep(std::time::Duration::from_millis(100));
                    }
                }
            })),
            Path::new("slow.raw"),
            Some(Format::Raw),
            false,
            &Gate::new(),
        )
        .unwrap();
        let cancel = Arc::new(AtomicBool::new(false));
        let flag = cancel.clone();
        // Like a signal handler: set the flag and nothing else, while the conversion runs.
        let canceller = std::thread::spawn(move || {
            barrier.wait();
            flag.store(true, Ordering::SeqCst);
        });
        let o = ConvertOptions {
            cancel: Some(cancel),
            ..opts(workers, ooo, 4096)
        };
        let e = convert_to_path(&src, &raw_target(&out), &o).unwrap_err();
        canceller.join().unwrap();
        assert!(e.to_string().contains("interrupted"), "{e}");
        assert!(
            dir_entries(dir.path()).is_empty(),
            "{:?}",
            dir_entries(dir.path())
        );
    }
}

#[test]
fn a_failed_conversion_keeps_an_existing_destination() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.raw");
    std::fs::write(&out, b"previous image").unwrap();
    let src = failing_source(4 * MIB, MIB);
    convert_to_path(&src, &raw_target(&out), &opts(2, false, 4096)).unwrap_err();
    assert_eq!(std::fs::read(&out).unwrap(), b"previous image");
    assert_eq!(dir_entries(dir.path()), vec![out]);
}

/// Memory storage that calls a hook with `(offset, length)` before each read: a driver bug
/// (the hook panics) or a slow disk (it waits), simulated.
struct OnRead<F>(MemStorage, F);

impl<F> std::fmt::Debug for OnRead<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("OnRead")
    }
}

impl<F: Fn(u64, usize) + Send + Sync> Storage for OnRead<F> {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        (self.1)(offset, buf.len());
        self.0.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        self.0.write_at(buf, offset)
    }
    fn len(&self) -> std::io::Result<u64> {
        self.0.len()
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.0.set_len(len)
    }
    fn sync(&self) -> std::io::Result<()> {
        self.0.sync()
    }
}

#[test]
fn a_panic_during_conversion_removes_the_temporary_file() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.raw");
    let s = OnRead(
        MemStorage::from_bytes(vec![1; 8 * MIB as usize]),
        |offset: u64, len: usize| {
            assert!(
                !(offset..offset + len as u64).contains(&(5 * MIB)),
                "simulated driver bug"
            )
        },
    );
    let src = Image::from_storage(
        Box::new(s),
        Path::new("buggy.raw"),
        Some(Format::Raw),
        false,
        &Gate::new(),
    )
    .unwrap();
    for ooo in [false, true] {
        let r = std::panic::catch_unwind(AssertUnwindSafe(|| {
            convert_to_path(&src, &raw_target(&out), &opts(2, ooo, 4096))
        }));
        assert!(r.is_err(), "the panic propagates");
        assert!(
            dir_entries(dir.path()).is_empty(),
            "{:?}",
            dir_entries(dir.path())
        );
    }
}

#[test]
fn a_multi_file_format_is_built_in_a_temporary_folder_and_leaves_no_trace_on_failure() {
    // VMDK images may consist of several files, so they are created in a temporary folder under
    // their final names. Where VMDK creation is available the result lands at the destination with
    // its extents; where it is not, the error leaves the folder as it was.
    let dir = tempfile::tempdir().unwrap();
    let src_path = dir.path().join("src.raw");
    scattered_raw(&src_path, 4 * MIB, 4, 1);
    let out = dir.path().join("out.vmdk");
    let target = Target {
        path: out.clone(),
        format: Format::Vmdk,
        create: CreateOptions::new(0),
    };
    let r = convert_to_path(&open_raw(&src_path), &target, &opts(2, false, 4096));
    let leftovers: Vec<PathBuf> = dir_entries(dir.path())
        .into_iter()
        .filter(|p| {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            name.starts_with('.') && name.contains(".vmi-tmp-")
        })
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    match r {
        Ok(_) => assert!(out.exists()),
        Err(_) => assert_eq!(dir_entries(dir.path()), vec![src_path]),
    }
}

#[test]
fn strict_compare_tells_a_hole_from_written_zeroes_as_qemu_img_does() {
    let dir = tempfile::tempdir().unwrap();
    let hole = dir.path().join("hole.raw");
    let zeroes = dir.path().join("zeroes.raw");
    std::fs::File::create(&hole).unwrap().set_len(MIB).unwrap();
    std::fs::write(&zeroes, vec![0u8; MIB as usize]).unwrap();
    let (a, b) = (open_raw(&hole), open_raw(&zeroes));
    let strict = CompareOptions {
        strict: true,
        ..Default::default()
    };
    assert_eq!(
        compare(&a, &b, &CompareOptions::default()).unwrap(),
        CompareOutcome::Identical
    );
    assert_eq!(qemu_verdict(&hole, &zeroes, false).0, 0);
    assert_eq!(
        compare(&a, &b, &strict).unwrap(),
        CompareOutcome::Differ {
            offset: 0,
            reason: vmi_convert::STATUS_MISMATCH.into()
        }
    );
    assert_eq!(qemu_verdict(&hole, &zeroes, true).0, 1);
}

#[test]
fn converting_into_an_existing_image_overwrites_its_old_data_with_zeroes_where_needed() {
    let dir = tempfile::tempdir().unwrap();
    let src_path = dir.path().join("src.raw");
    scattered_raw(&src_path, 8 * MIB, 8, 21);
    let dst_path = dir.path().join("existing.raw");
    std::fs::write(&dst_path, vec![0xee; 8 * MIB as usize]).unwrap();
    let src = open_raw(&src_path);
    let dst = Image::open(
        &dst_path,
        &OpenOptions::new().format(Some(Format::Raw)).write(true),
    )
    .unwrap();
    let o = ConvertOptions {
        target_has_data: true,
        ..opts(2, false, 4096)
    };
    vmi_convert::convert(&src, &dst, &o).unwrap();
    dst.close().unwrap();
    assert!(read_file(&dst_path) == read_file(&src_path));
    assert!(qemu_compare(&src_path, "raw", &dst_path, "raw"));
}

#[test]
fn cache_modes_parse_like_qemu_img_and_unknown_names_are_usage_errors() {
    use vmi_convert::CacheMode;
    assert_eq!(CacheMode::default(), CacheMode::Writeback);
    assert_eq!("unsafe".parse::<CacheMode>().unwrap(), CacheMode::Unsafe);
    for name in ["writeback", "none", "writethrough", "directsync"] {
        assert_eq!(
            name.parse::<CacheMode>().unwrap(),
            CacheMode::Writeback,
            "{name}"
        );
    }
    for name in CacheMode::NAMES {
        assert!(name.parse::<CacheMode>().is_ok(), "{name}");
    }
    let e = "fast".parse::<CacheMode>().unwrap_err();
    assert_eq!(e.kind(), vmi_disk::ErrorKind::Usage, "{e}");
    assert!(e.to_string().contains("unsafe"), "{e}");
}

#[test]
fn unsafe_cache_mode_gives_the_same_images_and_leaves_no_temporary_files() {
    let dir = tempfile::tempdir().unwrap();
    let src_path = dir.path().join("src.raw");
    scattered_raw(&src_path, 8 * MIB + 4096, 12, 5);
    let src = open_raw(&src_path);
    for (format, opts_str, qemu_name) in [
        (Format::Raw, "", "raw"),
        (Format::Qcow2, "", "qcow2"),
        (Format::Vmdk, "subformat=twoGbMaxExtentSparse", "vmdk"),
        (Format::Vmdk, "subformat=streamOptimized", "vmdk"),
        (Format::Vhdx, "", "vhdx"),
    ] {
        let out = dir
            .path()
            .join(format!("out-{qemu_name}-{}.img", opts_str.len()));
        let mut fo = vmi_disk::FormatOptions::new();
        fo.parse(opts_str).unwrap();
        let target = Target {
            path: out.clone(),
            format,
            create: CreateOptions {
                size: 0,
                backing: None,
                options: fo,
            },
        };
        for workers in [1, 4] {
            let o = ConvertOptions {
                cache: vmi_convert::CacheMode::Unsafe,
                ..opts(workers, false, 4096)
            };
            convert_to_path(&src, &target, &o).unwrap();
            if format != Format::Raw {
                vmi_testkit::qemu::assert_qemu_check_clean(&out, qemu_name);
            }
            vmi_testkit::qemu::assert_qemu_identical(&out, qemu_name, &src_path, "raw");
        }
        let tmp: Vec<PathBuf> = dir_entries(dir.path())
            .into_iter()
            .filter(|p| p.to_string_lossy().contains(".vmi-tmp-"))
            .collect();
        assert!(tmp.is_empty(), "{tmp:?}");
    }
}

#[test]
fn unsafe_cache_mode_still_leaves_nothing_when_the_conversion_fails() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.raw");
    let src = failing_source(16 * MIB, 9 * MIB);
    let o = ConvertOptions {
        cache: vmi_convert::CacheMode::Unsafe,
        ..opts(4, false, 4096)
    };
    assert!(convert_to_path(&src, &raw_target(&out), &o).is_err());
    assert!(
        dir_entries(dir.path()).is_empty(),
        "{:?}",
        dir_entries(dir.path())
    );
}

#[test]
fn qemu_compressed_qcow2_and_stream_vmdk_convert_to_the_same_bytes_on_every_worker_count() {
    // The inflate path (libdeflate, zlib-rs when it refuses) on what qemu-img writes, with
    // several threads decompressing at once.
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("src.raw");
    scattered_raw(&raw, 12 * MIB + 512, 40, 9);
    let expect = read_file(&raw);
    let qc = dir.path().join("q.qcow2");
    vmi_testkit::qemu::qemu_convert(&raw, "raw", &qc, "qcow2", "", &["-c"]);
    let qs = dir.path().join("q.vmdk");
    vmi_testkit::qemu::qemu_convert(&raw, "raw", &qs, "vmdk", "subformat=streamOptimized", &[]);
    for (src_path, fmt) in [(&qc, Format::Qcow2), (&qs, Format::Vmdk)] {
        let src = Image::open(src_path, &OpenOptions::new().format(Some(fmt))).unwrap();
        for workers in [1, 2, 8] {
            let out = dir.path().join(format!("out-{fmt}-{workers}.raw"));
            convert_to_path(&src, &raw_target(&out), &opts(workers, workers > 1, 4096)).unwrap();
            assert!(read_file(&out) == expect, "{fmt} with {workers} workers");
        }
    }
}
