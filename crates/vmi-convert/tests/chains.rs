//! Backing chains: overlays made by vmi and by qemu-img read by the other, safe and unsafe
//! rebase, commit, full and linked clones with provenance, three-level templates, and hostile
//! chains. Every result is checked with `qemu-img check` and `qemu-img compare`.

use std::fs::OpenOptions as FsOpen;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use vmi_convert::{
    clone_full, clone_linked, commit, convert_to_path, read_provenance, rebase, verify_source,
    CommitOptions, ConvertOptions, RebaseOptions, Target,
};
use vmi_disk::driver::BackingSpec;
use vmi_disk::{CreateOptions, ErrorKind, Format, Gate, Image, OpenOptions};
use vmi_testkit::*;

const MIB: u64 = 1 << 20;

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn chain_gate(dir: &Path) -> Gate {
    Gate::new().allow_backing(true).confine_to(dir)
}

fn open_chain(p: &Path) -> Image {
    Image::open(p, &OpenOptions::new().gate(chain_gate(p.parent().unwrap()))).unwrap()
}

/// A qcow2 image converted by qemu-img from a scattered raw file; returns (raw, qcow2).
fn base_image(dir: &Path, name: &str, seed: u64) -> (PathBuf, PathBuf) {
    let raw = dir.join(format!("{name}.raw"));
    scattered_raw(&raw, 8 * MIB, 16, seed);
    let img = dir.join(format!("{name}.qcow2"));
    qemu_convert(&raw, "raw", &img, "qcow2", "", &[]);
    (raw, img)
}

/// `qemu-img create -f qcow2 -b BACKING -F FMT overlay`.
fn qemu_overlay(overlay: &Path, backing: &str, fmt: &str) {
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        backing,
        "-F",
        fmt,
        s(overlay),
    ]);
}

/// Flatten what qemu-img sees through the chain into a raw file.
fn qemu_flatten(img: &Path, out: &Path) {
    qemu_img(&["convert", "-O", "raw", s(img), s(out)]);
}

fn backing_of(img: &Path) -> (Option<String>, Option<String>) {
    let info = qemu_info(img, "qcow2");
    (
        info["backing-filename"].as_str().map(String::from),
        info["backing-filename-format"].as_str().map(String::from),
    )
}

#[test]
fn vmi_overlays_are_read_by_qemu_and_qemu_overlays_by_vmi() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (raw, base) = base_image(d, "base", 1);
    // vmi writes an overlay for each format that records a parent, over a base of that format.
    for (fmt, ext) in [
        (Format::Qcow2, "qcow2"),
        (Format::Vpc, "vhd"),
        (Format::Vhdx, "vhdx"),
        (Format::Vmdk, "vmdk"),
    ] {
        let qfmt = fmt.name();
        let parent = d.join(format!("parent.{ext}"));
        if fmt == Format::Qcow2 {
            std::fs::copy(&base, &parent).unwrap();
        } else {
            qemu_convert(&raw, "raw", &parent, qfmt, "", &[]);
        }
        let o = d.join(format!("o.{ext}"));
        let spec = BackingSpec {
            name: format!("parent.{ext}"),
            format: Some(fmt),
        };
        let size = Image::open(&parent, &OpenOptions::new())
            .unwrap()
            .virtual_size();
        let mut img = Image::create(&o, fmt, &CreateOptions::new(size).backing(spec)).unwrap();
        img.set_backing(Some(open_chain(&parent)));
        let data = pattern(9, 100_000);
        img.write_at(&data, 3 * MIB + 7).unwrap();
        img.close().unwrap();
        let expect = d.join(format!("{ext}.expect"));
        qemu_flatten(&parent, &expect);
        FsOpen::new()
            .write(true)
            .open(&expect)
            .unwrap()
            .write_all_at(&data, 3 * MIB + 7)
            .unwrap();
        // qemu follows qcow2 and VMDK parents; it refuses VHDX differencing disks and opens
        // VHD differencing disks without their parent, so only vmi reads those chains.
        let qemu_follows = matches!(fmt, Format::Qcow2 | Format::Vmdk);
        if qemu_follows {
            assert_qemu_check_clean(&o, qfmt);
        }
        if qemu_follows {
            assert_qemu_identical(&o, qfmt, &expect, "raw");
        }
        let vmi = open_chain(&o);
        assert_eq!(vmi.chain_len(), 2, "{ext}");
        assert_image_matches_raw(&vmi, &expect);
    }
    // qemu writes an overlay; vmi reads it with its chain.
    let q = d.join("q.qcow2");
    qemu_overlay(&q, "base.qcow2", "qcow2");
    qemu_io(&q, "qcow2", "write -P 0x61 1M 200k");
    let expect = d.join("q.expect");
    qemu_flatten(&q, &expect);
    assert_image_matches_raw(&open_chain(&q), &expect);
}

#[test]
fn safe_rebase_copies_only_what_differs_and_qemu_agrees() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (_, old) = base_image(d, "old", 1);
    // The new base differs from the old one in one 64 KiB cluster only.
    let new = d.join("new.qcow2");
    std::fs::copy(&old, &new).unwrap();
    qemu_io(&new, "qcow2", "write -P 0x77 2M 64k");
    let o = d.join("o.qcow2");
    qemu_overlay(&o, "old.qcow2", "qcow2");
    qemu_io(&o, "qcow2", "write -P 0x11 5M 128k");
    let expect = d.join("expect.raw");
    qemu_flatten(&o, &expect);
    let q = d.join("q.qcow2");
    std::fs::copy(&o, &q).unwrap();
    let stats = rebase(
        &o,
        &RebaseOptions {
            backing: Some("new.qcow2".into()),
            gate: chain_gate(d),
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(stats.copied_bytes, 65536);
    assert_qemu_check_clean(&o, "qcow2");
    assert_eq!(
        backing_of(&o),
        (Some("new.qcow2".into()), Some("qcow2".into()))
    );
    assert_qemu_identical(&o, "qcow2", &expect, "raw");
    // qemu-img rebase of the same overlay gives the same guest contents.
    qemu_img(&["rebase", "-q", "-b", "new.qcow2", "-F", "qcow2", s(&q)]);
    assert_qemu_identical(&o, "qcow2", &q, "qcow2");
    assert_image_matches_raw(&open_chain(&o), &expect);
}

#[test]
fn rebase_onto_nothing_flattens_and_unsafe_rebase_rewrites_the_header_only() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (_, base) = base_image(d, "base", 2);
    let o = d.join("o.qcow2");
    qemu_overlay(&o, "base.qcow2", "qcow2");
    qemu_io(&o, "qcow2", "write -P 0x22 0 64k");
    let expect = d.join("expect.raw");
    qemu_flatten(&o, &expect);
    let flat = d.join("flat.qcow2");
    std::fs::copy(&o, &flat).unwrap();
    rebase(
        &flat,
        &RebaseOptions {
            backing: Some(String::new()),
            gate: chain_gate(d),
            ..Default::default()
        },
    )
    .unwrap();
    assert_qemu_check_clean(&flat, "qcow2");
    assert_eq!(backing_of(&flat), (None, None));
    assert_qemu_identical(&flat, "qcow2", &expect, "raw");
    // Unsafe: point the overlay at a copy of its base under another name, with a format.
    let moved = d.join("moved-base.qcow2");
    std::fs::rename(&base, &moved).unwrap();
    rebase(
        &o,
        &RebaseOptions {
            backing: Some("moved-base.qcow2".into()),
            backing_format: Some(Format::Qcow2),
            header_only: true,
            ..Default::default()
        },
    )
    .unwrap();
    assert_qemu_check_clean(&o, "qcow2");
    assert_eq!(
        backing_of(&o),
        (Some("moved-base.qcow2".into()), Some("qcow2".into()))
    );
    assert_qemu_identical(&o, "qcow2", &expect, "raw");
    // A long name still fits the header cluster; one past the limit is refused clearly.
    let long = "x".repeat(2000);
    let e = rebase(
        &o,
        &RebaseOptions {
            backing: Some(long),
            backing_format: Some(Format::Qcow2),
            header_only: true,
            ..Default::default()
        },
    )
    .unwrap_err();
    assert!(e.to_string().contains("backing"), "{e}");
    assert_eq!(backing_of(&o).0.as_deref(), Some("moved-base.qcow2"));
}

#[test]
fn commit_merges_into_the_backing_file_and_empties_the_overlay() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (_, base) = base_image(d, "base", 3);
    let o = d.join("o.qcow2");
    qemu_overlay(&o, "base.qcow2", "qcow2");
    qemu_io(&o, "qcow2", "write -P 0x33 1M 300k");
    qemu_io(&o, "qcow2", "write -z 4M 128k");
    let expect = d.join("expect.raw");
    qemu_flatten(&o, &expect);
    let out = commit(
        &o,
        &CommitOptions {
            gate: chain_gate(d),
            ..Default::default()
        },
    )
    .unwrap();
    assert!(out.emptied);
    // 300 KiB of data (in whole clusters) and 128 KiB of zeroes.
    assert_eq!(out.committed_bytes, 320 * 1024 + 128 * 1024);
    assert_qemu_check_clean(&base, "qcow2");
    assert_qemu_check_clean(&o, "qcow2");
    assert_qemu_identical(&base, "qcow2", &expect, "raw");
    assert_qemu_identical(&o, "qcow2", &expect, "raw");
    // The overlay is empty: qemu maps every range to the base.
    let map = qemu_map(&o, "qcow2");
    for e in map.as_array().unwrap() {
        assert_ne!(e["depth"], 0, "overlay still allocates {e}");
    }
}

#[test]
fn commit_into_a_deeper_base_keeps_the_top_and_qemu_agrees() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (_, base) = base_image(d, "base", 4);
    let mid = d.join("mid.qcow2");
    qemu_overlay(&mid, "base.qcow2", "qcow2");
    qemu_io(&mid, "qcow2", "write -P 0x44 2M 64k");
    let top = d.join("top.qcow2");
    qemu_overlay(&top, "mid.qcow2", "qcow2");
    qemu_io(&top, "qcow2", "write -P 0x55 2M 4k");
    qemu_io(&top, "qcow2", "write -P 0x56 7M 64k");
    let expect = d.join("expect.raw");
    qemu_flatten(&top, &expect);
    // Same operation by qemu on copies, for comparison.
    let qd = d.join("q");
    std::fs::create_dir(&qd).unwrap();
    for f in ["base.qcow2", "mid.qcow2", "top.qcow2"] {
        std::fs::copy(d.join(f), qd.join(f)).unwrap();
    }
    qemu_img(&[
        "commit",
        "-q",
        "-b",
        s(&qd.join("base.qcow2")),
        s(&qd.join("top.qcow2")),
    ]);
    let out = commit(
        &top,
        &CommitOptions {
            base: Some(base.clone()),
            gate: chain_gate(d),
            ..Default::default()
        },
    )
    .unwrap();
    assert!(!out.emptied);
    assert_qemu_check_clean(&base, "qcow2");
    assert_qemu_identical(&base, "qcow2", &expect, "raw");
    assert_qemu_identical(&base, "qcow2", &qd.join("base.qcow2"), "qcow2");
    assert_qemu_identical(&top, "qcow2", &expect, "raw");
    let e = commit(
        &top,
        &CommitOptions {
            base: Some(d.join("expect.raw")),
            gate: chain_gate(d),
            ..Default::default()
        },
    )
    .unwrap_err();
    assert!(e.to_string().contains("not in the backing chain"), "{e}");
}

#[test]
fn commit_grows_a_smaller_base() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (_, base) = base_image(d, "base", 5);
    let o = d.join("o.qcow2");
    qemu_overlay(&o, "base.qcow2", "qcow2");
    qemu_img(&["resize", "-q", s(&o), "12M"]);
    qemu_io(&o, "qcow2", "write -P 0x66 10M 64k");
    let expect = d.join("expect.raw");
    qemu_flatten(&o, &expect);
    commit(
        &o,
        &CommitOptions {
            gate: chain_gate(d),
            ..Default::default()
        },
    )
    .unwrap();
    assert_qemu_check_clean(&base, "qcow2");
    assert_eq!(qemu_info(&base, "qcow2")["virtual-size"], 12 * MIB);
    assert_qemu_identical(&base, "qcow2", &expect, "raw");
}

#[test]
fn clones_flatten_or_link_and_record_their_source() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (_, base) = base_image(d, "base", 6);
    let o = d.join("o.qcow2");
    qemu_overlay(&o, "base.qcow2", "qcow2");
    qemu_io(&o, "qcow2", "write -P 0x77 0 64k");
    let expect = d.join("expect.raw");
    qemu_flatten(&o, &expect);
    // Full clone of the overlay into VHDX: flattened, standalone.
    let full = d.join("full.vhdx");
    let src = open_chain(&o);
    let p = clone_full(
        &src,
        &Target {
            path: full.clone(),
            format: Format::Vhdx,
            create: CreateOptions::new(0),
        },
        &ConvertOptions::default(),
    )
    .unwrap();
    assert_eq!(p.kind, "full");
    assert_qemu_check_clean(&full, "vhdx");
    assert_qemu_identical(&full, "vhdx", &expect, "raw");
    assert!(qemu_info(&full, "vhdx")["backing-filename"].is_null());
    // Linked clone of the base: a thin overlay qemu follows.
    let linked = d.join("linked.qcow2");
    let p = clone_linked(&base, None, &linked).unwrap();
    assert_eq!(p.kind, "linked");
    assert_eq!(p.source_format, "qcow2");
    assert_eq!(
        backing_of(&linked),
        (Some("base.qcow2".into()), Some("qcow2".into()))
    );
    assert_qemu_check_clean(&linked, "qcow2");
    assert_qemu_identical(&linked, "qcow2", &base, "qcow2");
    assert!(std::fs::metadata(&linked).unwrap().len() < MIB);
    let read = read_provenance(&linked).unwrap().unwrap();
    assert_eq!(read, p);
    assert!(read.source_digest.starts_with("sha256:"));
    assert!(verify_source(&read).unwrap());
    assert!(
        clone_linked(&base, None, &linked).is_err(),
        "refuses to overwrite"
    );
    // Changing the source changes its identity (qemu-io may write once vmi lets go of it).
    drop(src);
    qemu_io(&base, "qcow2", "write -P 0x01 0 512");
    assert!(!verify_source(&read).unwrap());
    assert_eq!(read_provenance(&d.join("none.qcow2")).unwrap(), None);
}

#[test]
fn three_level_templates_map_and_flatten_like_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (_, _) = base_image(d, "os", 7);
    // role and app made by vmi (linked clones), written by vmi.
    let role = d.join("role.qcow2");
    clone_linked(&d.join("os.qcow2"), None, &role).unwrap();
    {
        let img = Image::open(&role, &OpenOptions::new().write(true).gate(chain_gate(d))).unwrap();
        img.write_at(&pattern(21, 200_000), MIB).unwrap();
        img.close().unwrap();
    }
    let app = d.join("app.qcow2");
    clone_linked(&role, None, &app).unwrap();
    {
        let img = Image::open(&app, &OpenOptions::new().write(true).gate(chain_gate(d))).unwrap();
        img.write_at(&pattern(22, 70_000), MIB + 50_000).unwrap();
        img.write_zeroes(6 * MIB, 64 * 1024).unwrap();
        img.close().unwrap();
    }
    for f in [&role, &app] {
        assert_qemu_check_clean(f, "qcow2");
    }
    let chain = qemu_img(&["info", "--backing-chain", "--output=json", s(&app)]);
    let chain: serde_json::Value = serde_json::from_slice(&chain.stdout).unwrap();
    let names: Vec<&str> = chain
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["filename"].as_str().unwrap())
        .collect();
    assert_eq!(names.len(), 3);
    assert!(names[2].ends_with("os.qcow2"));
    // vmi's layer for every range equals qemu's map depth.
    let img = open_chain(&app);
    assert_eq!(img.chain_len(), 3);
    for e in qemu_map(&app, "qcow2").as_array().unwrap() {
        let start = e["start"].as_u64().unwrap();
        let len = e["length"].as_u64().unwrap();
        let mut off = start;
        while off < start + len {
            let st = img.block_status(off, start + len - off).unwrap();
            let data = e["data"].as_bool().unwrap();
            if data {
                assert_eq!(
                    st.depth as u64,
                    e["depth"].as_u64().unwrap(),
                    "at {off}: {e}"
                );
            }
            off += st.len;
        }
    }
    // Flattening the top through vmi equals qemu's flattening.
    let flat = d.join("flat.raw");
    convert_to_path(
        &img,
        &Target {
            path: flat.clone(),
            format: Format::Raw,
            create: CreateOptions::new(0),
        },
        &ConvertOptions::default(),
    )
    .unwrap();
    let qflat = d.join("qflat.raw");
    qemu_flatten(&app, &qflat);
    assert_qemu_identical(&flat, "raw", &qflat, "raw");
}

#[test]
fn hostile_chains_give_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // A loop: a -> b -> a.
    let a = d.join("a.qcow2");
    let b = d.join("b.qcow2");
    qemu_create(&a, "qcow2", "", MIB);
    qemu_create(&b, "qcow2", "", MIB);
    qemu_img(&["rebase", "-u", "-b", "b.qcow2", "-F", "qcow2", s(&a)]);
    qemu_img(&["rebase", "-u", "-b", "a.qcow2", "-F", "qcow2", s(&b)]);
    let e = Image::open(&a, &OpenOptions::new().gate(chain_gate(d))).unwrap_err();
    assert!(e.to_string().contains("loops"), "{e}");
    // Deeper than the limit.
    let mut prev = d.join("l0.qcow2");
    qemu_create(&prev, "qcow2", "", MIB);
    for k in 1..=5 {
        let next = d.join(format!("l{k}.qcow2"));
        let name = prev.file_name().unwrap().to_str().unwrap().to_string();
        qemu_overlay(&next, &name, "qcow2");
        prev = next;
    }
    let e = Image::open(&prev, &OpenOptions::new().gate(chain_gate(d).max_depth(3))).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Limit, "{e}");
    assert!(e.to_string().contains("deeper than 3"), "{e}");
    // A backing file outside the allowed folder.
    let inner = d.join("inner");
    std::fs::create_dir(&inner).unwrap();
    let o = inner.join("o.qcow2");
    qemu_overlay(&o, "../l0.qcow2", "qcow2");
    let e = Image::open(
        &o,
        &OpenOptions::new().gate(Gate::new().allow_backing(true)),
    )
    .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Refused, "{e}");
    assert!(
        e.to_string().contains("outside the allowed directory"),
        "{e}"
    );
    // Operations on such chains fail with the same errors.
    let e = commit(
        &b,
        &CommitOptions {
            gate: chain_gate(d),
            ..Default::default()
        },
    )
    .unwrap_err();
    assert!(e.to_string().contains("loops"), "{e}");
    let e = rebase(
        &o,
        &RebaseOptions {
            backing: Some(String::new()),
            gate: Gate::new().allow_backing(true),
            ..Default::default()
        },
    )
    .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Refused, "{e}");
}

#[test]
fn vmdk_overlays_rebase_and_commit_and_vhd_refuses_a_header_rewrite() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let raw = d.join("p.raw");
    scattered_raw(&raw, 8 * MIB, 8, 11);
    let parent = d.join("p.vmdk");
    qemu_convert(&raw, "raw", &parent, "vmdk", "", &[]);
    let o = d.join("o.vmdk");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "vmdk",
        "-b",
        "p.vmdk",
        "-F",
        "vmdk",
        s(&o),
    ]);
    qemu_io(&o, "vmdk", "write -P 0x12 1M 64k");
    let expect = d.join("expect.raw");
    qemu_flatten(&o, &expect);
    // Header-only rebase onto a copy: parentFileNameHint and parentCID rewritten, qemu follows.
    let copy = d.join("p2.vmdk");
    std::fs::copy(&parent, &copy).unwrap();
    rebase(
        &o,
        &RebaseOptions {
            backing: Some("p2.vmdk".into()),
            header_only: true,
            ..Default::default()
        },
    )
    .unwrap();
    let info = qemu_info(&o, "vmdk");
    assert_eq!(info["backing-filename"], "p2.vmdk");
    assert_qemu_check_clean(&o, "vmdk");
    assert_qemu_identical(&o, "vmdk", &expect, "raw");
    // Safe rebase onto a parent that differs, then commit into it.
    qemu_io(&parent, "vmdk", "write -P 0x34 5M 64k");
    rebase(
        &o,
        &RebaseOptions {
            backing: Some("p.vmdk".into()),
            gate: chain_gate(d),
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(qemu_info(&o, "vmdk")["backing-filename"], "p.vmdk");
    assert_qemu_identical(&o, "vmdk", &expect, "raw");
    let out = commit(
        &o,
        &CommitOptions {
            gate: chain_gate(d),
            ..Default::default()
        },
    )
    .unwrap();
    assert!(!out.emptied);
    assert_qemu_check_clean(&parent, "vmdk");
    assert_qemu_identical(&parent, "vmdk", &expect, "raw");
    // Writing the parent gave it a new CID (as qemu does), so qemu now refuses the child whose
    // parentCID is the old one; vmi still reads it, and it reads the same.
    assert_image_matches_raw(&open_chain(&o), &expect);
    // VHD differencing disks: no header rewrite yet, a clear refusal.
    let vparent = d.join("p.vhd");
    qemu_convert(&raw, "raw", &vparent, "vpc", "", &[]);
    let size = Image::open(&vparent, &OpenOptions::new())
        .unwrap()
        .virtual_size();
    let vo = d.join("o.vhd");
    let spec = BackingSpec {
        name: "p.vhd".into(),
        format: Some(Format::Vpc),
    };
    Image::create(&vo, Format::Vpc, &CreateOptions::new(size).backing(spec))
        .unwrap()
        .close()
        .unwrap();
    let e = rebase(
        &vo,
        &RebaseOptions {
            backing: Some("p.vhd".into()),
            header_only: true,
            ..Default::default()
        },
    )
    .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unsupported, "{e}");
    assert!(e.to_string().contains("vpc"), "{e}");
}
