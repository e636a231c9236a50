//! FAT through the `fatfs` crate over vmi volumes: an EFI system partition made by `mkfs.vfat` in a
//! GPT disk, changed through qcow2, then checked with `fsck.fat -n` and read back with mtools'
//! `mcopy`; a directory whose cluster chain loops gives an error, not a hang.

mod common;

use common::run;
use std::path::Path;
use vmi_disk::{Image, OpenOptions};
use vmi_guest::fat::Fat;
use vmi_guest::{read_table, Volume};

fn have() -> bool {
    for t in ["mkfs.vfat", "fsck.fat", "mcopy", "sfdisk"] {
        if std::process::Command::new("sh")
            .args(["-c", &format!("command -v {t}")])
            .output()
            .map(|o| !o.status.success())
            .unwrap_or(true)
        {
            eprintln!("skipped: {t} is not installed (apt-get install dosfstools mtools fdisk)");
            return false;
        }
    }
    true
}

const ESP: u64 = 40 << 20;

/// A FAT32 ESP file and a GPT disk (raw) holding it as partition 1 at 1 MiB.
fn esp_disk(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let part = dir.join("esp.img");
    std::fs::File::create(&part).unwrap().set_len(ESP).unwrap();
    run(
        "mkfs.vfat",
        &["-F", "32", "-n", "ESP", part.to_str().unwrap()],
    );
    run(
        "mmd",
        &["-i", part.to_str().unwrap(), "::/EFI", "::/EFI/BOOT"],
    );
    let disk = common::disk_with(dir, &part, "gpt");
    (part, disk)
}

fn open(p: &Path, write: bool) -> Image {
    Image::open(p, &OpenOptions::new().write(write)).unwrap()
}

/// Partition 1 of `disk` (raw) copied out to `to`.
fn extract(disk: &Path, to: &Path) {
    run(
        "dd",
        &[
            &format!("if={}", disk.display()),
            &format!("of={}", to.display()),
            "bs=1M",
            "skip=1",
            &format!("count={}", ESP >> 20),
            "status=none",
        ],
    );
}

#[test]
fn an_esp_written_through_qcow2_passes_fsck_fat_and_mcopy_reads_the_files() {
    if !have() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (_, raw) = esp_disk(dir.path());
    let q = dir.path().join("d.qcow2");
    common::convert(&raw, "qcow2", &q);
    let loader = vmi_testkit::pattern(3, 200 * 1024);
    {
        let img = open(&q, true);
        let t = read_table(&img).unwrap().unwrap();
        let fat = Fat::open(Volume::of(&img, &t.partitions[0]).unwrap()).unwrap();
        assert_eq!((fat.label().as_str(), fat.fat_type()), ("ESP", "FAT32"));
        let e = fat.mkdir("/EFI/debian").unwrap_err().to_string();
        assert!(
            e.contains("creating directories on FAT is not supported"),
            "{e}"
        );
        fat.write_file("/EFI/BOOT/BOOTX64.EFI", &mut &loader[..])
            .unwrap();
        fat.write_file(
            "/startup.nsh",
            &mut &b"fs0:\\EFI\\BOOT\\BOOTX64.EFI\r\n"[..],
        )
        .unwrap();
        fat.write_file("/remove-me.txt", &mut &b"x"[..]).unwrap();
        fat.remove("/remove-me.txt").unwrap();
        let mut back = Vec::new();
        fat.read_file("/efi/boot/bootx64.efi", &mut back).unwrap();
        assert_eq!(back, loader, "names are case-insensitive, contents intact");
        let names: Vec<String> = fat
            .read_dir("/")
            .unwrap()
            .into_iter()
            .map(|e| e.name)
            .collect();
        assert_eq!(names, ["EFI", "startup.nsh"]);
        assert!(matches!(
            fat.read_file("/nope", &mut Vec::new()),
            Err(vmi_guest::Error::NotFound(_))
        ));
        fat.close().unwrap();
        img.close().unwrap();
    }
    let back = dir.path().join("back.raw");
    common::convert(&q, "raw", &back);
    let part = dir.path().join("back-esp.img");
    extract(&back, &part);
    let fsck = std::process::Command::new("fsck.fat")
        .args(["-n", part.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        fsck.status.success(),
        "{}",
        String::from_utf8_lossy(&fsck.stdout)
    );
    let out = dir.path().join("BOOTX64.EFI");
    run(
        "mcopy",
        &[
            "-n",
            "-i",
            part.to_str().unwrap(),
            "::/EFI/BOOT/BOOTX64.EFI",
            out.to_str().unwrap(),
        ],
    );
    assert_eq!(std::fs::read(&out).unwrap(), loader);
    let listing = run("mdir", &["-b", "-i", part.to_str().unwrap(), "::/"]);
    assert!(!listing.contains("remove-me"), "{listing}");
}

#[test]
fn a_directory_whose_cluster_chain_loops_is_an_error_not_a_hang() {
    if !have() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (part, _) = esp_disk(dir.path());
    // Enough 8.3 entries to fill the directory's first cluster and spill into a second.
    let files = dir.path().join("files");
    std::fs::create_dir(&files).unwrap();
    let mut args = vec!["-i".to_string(), part.display().to_string()];
    for i in 0..200 {
        let f = files.join(format!("F{i:04}.TXT"));
        std::fs::write(&f, "").unwrap();
        args.push(f.display().to_string());
    }
    args.push("::/LOOP/".into());
    run("mmd", &["-i", part.to_str().unwrap(), "::/LOOP"]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    run("mcopy", &args);
    // Point the first cluster of /LOOP at itself in the FAT.
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&part)
        .unwrap();
    let mut bs = [0u8; 512];
    f.read_exact_at(&mut bs, 0).unwrap();
    let bps = u64::from(u16::from_le_bytes([bs[11], bs[12]]));
    let spc = u64::from(bs[13]);
    let reserved = u64::from(u16::from_le_bytes([bs[14], bs[15]]));
    let fats = u64::from(bs[16]);
    let fat_sectors = u64::from(u32::from_le_bytes([bs[36], bs[37], bs[38], bs[39]]));
    let root_cluster = u64::from(u32::from_le_bytes([bs[44], bs[45], bs[46], bs[47]]));
    let data = (reserved + fats * fat_sectors) * bps;
    let cluster_off = |c: u64| data + (c - 2) * spc * bps;
    // Find LOOP's entry in the root directory.
    let mut root = vec![0u8; (spc * bps) as usize];
    f.read_exact_at(&mut root, cluster_off(root_cluster))
        .unwrap();
    let e = root
        .chunks(32)
        .find(|e| &e[..11] == b"LOOP       ")
        .unwrap();
    let first = u64::from(u16::from_le_bytes([e[26], e[27]]))
        | (u64::from(u16::from_le_bytes([e[20], e[21]])) << 16);
    for copy in 0..fats {
        let at = reserved * bps + copy * fat_sectors * bps + first * 4;
        f.write_all_at(&(first as u32).to_le_bytes(), at).unwrap();
    }
    drop(f);
    let img = open(&part, false);
    let fat = Fat::open(Volume::whole(&img)).unwrap();
    let chain = |e: vmi_guest::Error| {
        let mut s = e.to_string();
        let mut src = std::error::Error::source(&e);
        while let Some(c) = src {
            s.push_str(&format!(": {c}"));
            src = c.source();
        }
        s
    };
    let e = chain(fat.read_dir("/LOOP").unwrap_err());
    assert!(e.contains("more than 65536 entries"), "{e}");
    let e = chain(
        fat.read_file("/LOOP/NOPE.TXT", &mut Vec::new())
            .unwrap_err(),
    );
    assert!(e.contains("more than 65536 entries"), "{e}");
}

/// Bytes the file occupies on the host.
fn allocated(p: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(p).unwrap().blocks() * 512
}

#[test]
fn sparsify_gives_back_a_deleted_files_clusters_on_fat12_fat16_and_fat32() {
    if !have() {
        return;
    }
    for (bits, size, big) in [
        ("12", 8u64 << 20, 2usize << 20),
        ("16", 32 << 20, 8 << 20),
        ("32", 40 << 20, 8 << 20),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let part = dir.path().join("fat.img");
        std::fs::File::create(&part).unwrap().set_len(size).unwrap();
        run("mkfs.vfat", &["-F", bits, part.to_str().unwrap()]);
        let img_s = part.to_str().unwrap();
        let keep = dir.path().join("KEEP.BIN");
        let gone = dir.path().join("GONE.BIN");
        std::fs::write(&keep, vmi_testkit::pattern(1, 300_000)).unwrap();
        std::fs::write(&gone, vmi_testkit::pattern(2, big)).unwrap();
        run(
            "mcopy",
            &[
                "-i",
                img_s,
                keep.to_str().unwrap(),
                gone.to_str().unwrap(),
                "::/",
            ],
        );
        run("mdel", &["-i", img_s, "::/GONE.BIN"]);
        let before = allocated(&part);
        let img = open(&part, true);
        let rep = vmi_guest::sparsify::sparsify(&img, false).unwrap();
        img.close().unwrap();
        assert_eq!(rep.volumes[0].fs_type, "vfat", "FAT{bits}: {rep:?}");
        assert!(rep.zeroed >= big as u64, "FAT{bits}: {rep:?}");
        let after = allocated(&part);
        assert!(
            before - after >= big as u64 - 8192,
            "FAT{bits}: allocated {before} -> {after}"
        );
        let fsck = std::process::Command::new("fsck.fat")
            .args(["-n", img_s])
            .output()
            .unwrap();
        assert!(
            fsck.status.success(),
            "FAT{bits}: {}",
            String::from_utf8_lossy(&fsck.stdout)
        );
        let out = dir.path().join("out.bin");
        run(
            "mcopy",
            &["-n", "-i", img_s, "::/KEEP.BIN", out.to_str().unwrap()],
        );
        assert_eq!(
            std::fs::read(&out).unwrap(),
            std::fs::read(&keep).unwrap(),
            "FAT{bits}"
        );
    }
}

#[test]
fn a_fat_boot_sector_with_impossible_sizes_is_refused_by_sparsify() {
    if !have() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let part = dir.path().join("fat.img");
    std::fs::File::create(&part)
        .unwrap()
        .set_len(32 << 20)
        .unwrap();
    run("mkfs.vfat", &["-F", "16", part.to_str().unwrap()]);
    // A total sector count (the 32-bit field, with the 16-bit one zero) far past the volume.
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(&part).unwrap();
    f.write_all_at(&0u16.to_le_bytes(), 19).unwrap();
    f.write_all_at(&u32::MAX.to_le_bytes(), 32).unwrap();
    drop(f);
    let img = open(&part, true);
    let rep = vmi_guest::sparsify::sparsify(&img, false).unwrap();
    assert_eq!(rep.zeroed, 0);
    assert!(
        rep.skipped[0].contains("more sectors than the volume holds"),
        "{rep:?}"
    );
}
