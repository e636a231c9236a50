//! End-to-end tests of the `vmi` binary: each test runs the real command in a fresh temporary
//! folder and, where qemu-img has the same command, checks that both agree.

use serde_json::Value;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use vmi_testkit::{
    assert_qemu_check_clean, qemu_compare, qemu_create, qemu_img, qemu_info, qemu_map,
    scattered_raw,
};

/// The outcome of one `vmi` run.
#[derive(Debug)]
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Run {
    /// Assert the exit code, showing the output when it is not the expected one.
    fn code(&self, expected: i32) -> &Self {
        assert_eq!(self.code, expected, "unexpected exit code: {self:#?}");
        self
    }

    fn ok(&self) -> &Self {
        self.code(0)
    }

    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {self:#?}"))
    }
}

/// A temporary folder to run `vmi` in.
struct Dir {
    dir: tempfile::TempDir,
}

impl Dir {
    fn new() -> Dir {
        Dir {
            dir: tempfile::tempdir().expect("temporary folder"),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_vmi"));
        c.args(args).current_dir(self.dir.path());
        c
    }

    /// Run `vmi ARGS` in the folder.
    fn vmi(&self, args: &[&str]) -> Run {
        let out = self.command(args).output().expect("run vmi");
        Run {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// A sparse raw file with data islands, for map and convert.
    fn sparse_raw(&self, name: &str, size: u64) -> PathBuf {
        let p = self.path(name);
        scattered_raw(&p, size, 12, 7);
        p
    }
}

/// Declare a test that gets a fresh [`Dir`].
macro_rules! vmitest {
    ($(#[$attr:meta])* $name:ident, |$dir:ident| $body:block) => {
        #[test]
        $(#[$attr])*
        fn $name() {
            let $dir = Dir::new();
            $body
        }
    };
}

fn s(p: &Path) -> &str {
    p.to_str().expect("UTF-8 test path")
}

fn file_size(p: &Path) -> u64 {
    std::fs::metadata(p).expect("stat").len()
}

// --- create / info -------------------------------------------------------------------------

vmitest!(create_prints_the_formatting_line_and_makes_the_file, |d| {
    let r = d.vmi(&["create", "-f", "raw", "disk.img", "64M"]);
    r.ok();
    assert_eq!(
        r.stdout, "Formatting 'disk.img', fmt=raw size=67108864\n",
        "{r:#?}"
    );
    assert_eq!(file_size(&d.path("disk.img")), 64 << 20);
});

vmitest!(create_replaces_an_existing_file_like_qemu_img, |d| {
    d.vmi(&["create", "-q", "disk.img", "1M"]).ok();
    d.vmi(&["create", "-q", "disk.img", "2M"]).ok();
    assert_eq!(file_size(&d.path("disk.img")), 2 << 20);
});

vmitest!(create_refuses_to_replace_its_own_backing_file, |d| {
    d.vmi(&["create", "-q", "-f", "qcow2", "disk.qcow2", "1M"])
        .ok();
    let r = d.vmi(&["create", "-f", "qcow2", "-b", "disk.qcow2", "disk.qcow2"]);
    r.code(1);
    assert!(r.stderr.contains("its own backing file"), "{r:#?}");
    assert_qemu_check_clean(&d.path("disk.qcow2"), "qcow2");
});

vmitest!(create_quiet_prints_nothing, |d| {
    let r = d.vmi(&["create", "-q", "disk.img", "1M"]);
    r.ok();
    assert_eq!(r.stdout, "");
});

vmitest!(create_without_a_size_fails_and_says_why, |d| {
    let r = d.vmi(&["create", "-f", "raw", "disk.img"]);
    r.code(1);
    assert!(r.stderr.starts_with("vmi: "), "{r:#?}");
    assert!(r.stderr.contains("SIZE"), "{r:#?}");
});

vmitest!(
    create_with_an_unknown_option_fails_clearly_and_leaves_no_file,
    |d| {
        let r = d.vmi(&["create", "-f", "raw", "-o", "bogus=1", "disk.img", "1M"]);
        r.code(1);
        assert!(r.stderr.contains("bogus"), "{r:#?}");
        assert!(r.stderr.contains("disk.img"), "{r:#?}");
        assert!(!d.path("disk.img").exists());
    }
);

vmitest!(create_option_help_lists_the_formats_options, |d| {
    for help in ["help", "?"] {
        let r = d.vmi(&["create", "-f", "qcow2", "-o", help]);
        r.ok();
        assert!(r.stdout.contains("Supported qcow2 options:"), "{r:#?}");
        assert!(r.stdout.contains("cluster_size=<size>"), "{r:#?}");
    }
});

vmitest!(info_json_has_qemus_keys_and_values_for_raw, |d| {
    let img = d.sparse_raw("disk.img", 8 << 20);
    let ours = d
        .vmi(&["info", "--output=json", "-f", "raw", "disk.img"])
        .ok()
        .json();
    let qemu = qemu_info(&img, "raw");
    for key in ["virtual-size", "format", "dirty-flag"] {
        assert_eq!(ours[key], qemu[key], "{key}: {ours:#} vs {qemu:#}");
    }
    assert!(ours["actual-size"].is_u64(), "{ours:#}");
    assert_eq!(ours["filename"], "disk.img");
    assert!(ours.get("probe").is_none(), "format was given, not probed");
});

vmitest!(info_reports_the_probe_when_the_format_was_detected, |d| {
    d.vmi(&["create", "-q", "disk.img", "1M"]).ok();
    let json = d.vmi(&["info", "--output=json", "disk.img"]).ok().json();
    assert_eq!(json["probe"]["format"], "raw");
    assert_eq!(json["probe"]["confidence"], "fallback");
    let human = d.vmi(&["info", "disk.img"]);
    human.ok();
    assert!(human.stdout.contains("image: disk.img\n"), "{human:#?}");
    assert!(human.stdout.contains("file format: raw\n"), "{human:#?}");
    assert!(
        human
            .stdout
            .contains("virtual size: 1 MiB (1048576 bytes)\n"),
        "{human:#?}"
    );
    assert!(human.stdout.contains("format probed: raw"), "{human:#?}");
});

vmitest!(errors_name_the_file, |d| {
    let r = d.vmi(&["info", "missing.img"]);
    r.code(1);
    assert!(r.stderr.starts_with("vmi: "), "{r:#?}");
    assert!(r.stderr.contains("missing.img"), "{r:#?}");
});

vmitest!(usage_errors_exit_1_and_help_exits_0, |d| {
    d.vmi(&["info"]).code(1);
    d.vmi(&["--help"]).ok();
    d.vmi(&["convert", "--help"]).ok();
});

// --- check ---------------------------------------------------------------------------------

vmitest!(check_on_raw_exits_63_like_qemu_img, |d| {
    let img = d.sparse_raw("disk.img", 1 << 20);
    let r = d.vmi(&["check", "-f", "raw", "disk.img"]);
    r.code(63);
    assert!(r.stderr.contains("does not support checks"), "{r:#?}");
    let (code, _, _) = vmi_testkit::qemu::qemu_img_status(&["check", "-f", "raw", s(&img)]);
    assert_eq!(code, 63);
});

// --- measure -------------------------------------------------------------------------------

/// The sizes qemu-img reports (other keys, such as `bitmaps`, vary between qemu versions).
fn assert_same_measure(ours: &Value, qemu: &Value) {
    for key in ["required", "fully-allocated"] {
        assert_eq!(ours[key], qemu[key], "{key}: {ours:#} vs {qemu:#}");
    }
}

/// Every field qemu-img prints for every range is the same in ours.
fn assert_map_has_qemus_fields(ours: &Value, qemu: &Value) {
    let (o, q) = (
        ours.as_array().expect("list"),
        qemu.as_array().expect("list"),
    );
    assert_eq!(o.len(), q.len(), "{ours:#}\n{qemu:#}");
    for (o, q) in o.iter().zip(q) {
        for (key, value) in q.as_object().expect("object") {
            assert_eq!(&o[key.as_str()], value, "{key}: {o} vs {q}");
        }
    }
}

fn qemu_measure(args: &[&str]) -> Value {
    let mut a = vec!["measure", "--output=json"];
    a.extend_from_slice(args);
    serde_json::from_slice(&qemu_img(&a).stdout).expect("qemu-img measure JSON")
}

vmitest!(measure_raw_equals_qemu_img, |d| {
    let img = d.sparse_raw("disk.img", 4 << 20);
    let ours = d
        .vmi(&["measure", "--output=json", "-O", "raw", "--size", "1G"])
        .ok()
        .json();
    assert_same_measure(&ours, &qemu_measure(&["-O", "raw", "--size", "1G"]));
    let ours = d
        .vmi(&[
            "measure",
            "--output=json",
            "-O",
            "raw",
            "-f",
            "raw",
            "disk.img",
        ])
        .ok()
        .json();
    assert_same_measure(&ours, &qemu_measure(&["-O", "raw", "-f", "raw", s(&img)]));
    let human = d.vmi(&["measure", "--size", "1G"]);
    human.ok();
    assert_eq!(
        human.stdout,
        "required size: 1073741824\nfully allocated size: 1073741824\n"
    );
});

vmitest!(measure_needs_a_size_or_a_file, |d| {
    d.vmi(&["measure", "-O", "raw"]).code(1);
});

// --- resize --------------------------------------------------------------------------------

vmitest!(resize_grows_absolutely_and_relatively, |d| {
    d.vmi(&["create", "-q", "disk.img", "1M"]).ok();
    let r = d.vmi(&["resize", "-f", "raw", "disk.img", "+1M"]);
    r.ok();
    assert_eq!(r.stdout, "Image resized.\n");
    assert_eq!(file_size(&d.path("disk.img")), 2 << 20);
    d.vmi(&["resize", "-f", "raw", "disk.img", "3M"]).ok();
    assert_eq!(file_size(&d.path("disk.img")), 3 << 20);
});

vmitest!(resize_refuses_to_shrink_without_the_shrink_flag, |d| {
    d.vmi(&["create", "-q", "disk.img", "2M"]).ok();
    let r = d.vmi(&["resize", "-f", "raw", "disk.img", "-1M"]);
    r.code(1);
    assert!(r.stderr.contains("--shrink"), "{r:#?}");
    assert_eq!(file_size(&d.path("disk.img")), 2 << 20);
    d.vmi(&["resize", "-f", "raw", "--shrink", "disk.img", "-1M"])
        .ok();
    assert_eq!(file_size(&d.path("disk.img")), 1 << 20);
});

// --- broken pipes --------------------------------------------------------------------------

vmitest!(a_closed_stdout_is_not_an_error, |d| {
    d.vmi(&["create", "-q", "disk.img", "1M"]).ok();
    let child = d
        .command(&["info", "disk.img"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn vmi");
    // Close the read end before vmi writes anything.
    let mut child = child;
    drop(child.stdout.take());
    let out = child.wait_with_output().expect("wait");
    assert!(out.status.success(), "{out:?}");
    assert!(out.stderr.is_empty(), "{out:?}");
});

// --- the copy engine: convert, compare, map -------------------------------------------------

/// A raw file with `islands` 4 KiB data blocks every 16 KiB: a long map.
fn many_islands(path: &Path, islands: u64) {
    let f = std::fs::File::create(path).expect("create");
    f.set_len(islands * 16384).expect("size");
    for i in 0..islands {
        f.write_all_at(&[0xab; 4096], i * 16384).expect("write");
    }
}

vmitest!(map_json_matches_qemu_img_on_sparse_raw, |d| {
    let img = d.path("disk.img");
    many_islands(&img, 8);
    let ours = d
        .vmi(&["map", "--output=json", "-f", "raw", "disk.img"])
        .ok()
        .json();
    let qemu = qemu_map(&img, "raw");
    let (ours, qemu) = (
        ours.as_array().expect("list"),
        qemu.as_array().expect("list"),
    );
    assert_eq!(ours.len(), qemu.len(), "{ours:#?}\n{qemu:#?}");
    for (o, q) in ours.iter().zip(qemu) {
        for key in ["start", "length", "depth", "present", "zero", "data"] {
            assert_eq!(o[key], q[key], "{key}: {o} vs {q}");
        }
        // qemu-img prints `compressed` since 8.0; vmi always does.
        if q.get("compressed").is_some() {
            assert_eq!(o["compressed"], q["compressed"], "compressed: {o} vs {q}");
        }
        if q["data"] == true {
            assert_eq!(o["offset"], q["offset"], "{o} vs {q}");
        }
    }
    let human = d.vmi(&["map", "-f", "raw", "disk.img"]);
    human.ok();
    let lines: Vec<&str> = human.stdout.lines().collect();
    assert!(lines[0].starts_with("Offset          Length          Mapped to       File"));
    assert_eq!(lines.len(), 1 + 8, "{human:#?}");
    assert!(lines[2].starts_with("0x4000          0x1000          0x4000          "));
});

vmitest!(map_into_a_closed_pipe_exits_0, |d| {
    many_islands(&d.path("disk.img"), 2048);
    let mut child = d
        .command(&["map", "--output=json", "-f", "raw", "disk.img"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn vmi");
    let mut stdout = child.stdout.take().expect("stdout");
    let mut one = [0u8; 1];
    std::io::Read::read_exact(&mut stdout, &mut one).expect("read a byte");
    drop(stdout);
    let out = child.wait_with_output().expect("wait");
    assert!(out.status.success(), "{out:?}");
});

vmitest!(convert_raw_to_raw_is_identical_for_qemu_img, |d| {
    let src = d.sparse_raw("src.img", 8 << 20);
    let r = d.vmi(&["convert", "-f", "raw", "-O", "raw", "src.img", "dst.img"]);
    r.ok();
    assert_eq!(r.stdout, "", "convert is silent on success");
    assert!(qemu_compare(&src, "raw", &d.path("dst.img"), "raw"));
});

vmitest!(convert_takes_qemu_cache_modes, |d| {
    let src = d.sparse_raw("src.img", 4 << 20);
    for (i, mode) in ["unsafe", "writeback", "none", "writethrough", "directsync"]
        .iter()
        .enumerate()
    {
        let dst = format!("dst{i}.qcow2");
        d.vmi(&["convert", "-t", mode, "-O", "qcow2", "src.img", &dst])
            .ok();
        assert!(qemu_compare(&src, "raw", &d.path(&dst), "qcow2"), "{mode}");
    }
    // -n into an existing image with -t unsafe.
    let n = [
        "convert",
        "-n",
        "-t",
        "unsafe",
        "-O",
        "qcow2",
        "src.img",
        "dst0.qcow2",
    ];
    d.vmi(&n).ok();
    assert!(qemu_compare(&src, "raw", &d.path("dst0.qcow2"), "qcow2"));
    let r = d.vmi(&["convert", "-t", "fast", "src.img", "x.img"]);
    assert_ne!(r.code, 0, "{r:#?}");
    assert!(r.stderr.contains("unsafe"), "{r:#?}");
    assert!(!d.path("x.img").exists());
});

vmitest!(convert_n_refuses_to_write_into_its_source, |d| {
    d.sparse_raw("src.img", 1 << 20);
    let before = std::fs::read(d.path("src.img")).expect("read");
    let r = d.vmi(&["convert", "-n", "-O", "raw", "src.img", "./src.img"]);
    r.code(1);
    assert!(r.stderr.contains("being read"), "{r:#?}");
    assert_eq!(std::fs::read(d.path("src.img")).expect("read"), before);
});

vmitest!(convert_progress_json_lines_parse, |d| {
    d.sparse_raw("src.img", 8 << 20);
    let r = d.vmi(&[
        "convert",
        "--progress=json",
        "-O",
        "raw",
        "src.img",
        "dst.img",
    ]);
    r.ok();
    let mut last = None;
    for line in r.stderr.lines() {
        let v: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert!(v["done"].is_u64() && v["total"].is_u64(), "{line}");
        last = v["percent"].as_f64();
    }
    assert_eq!(last, Some(100.0), "{r:#?}");
});

vmitest!(convert_interrupted_by_sigint_leaves_no_file, |d| {
    use std::io::{BufRead, BufReader, Write};
    // 128 MiB of incompressible data compressed on one worker: seconds of work, interrupted
    // as soon as the first progress line shows it is under way.
    let src = d.path("big.raw");
    {
        let mut f = std::io::BufWriter::new(std::fs::File::create(&src).expect("create"));
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut block = vec![0u8; 1 << 20];
        for _ in 0..128 {
            for b in block.chunks_mut(8) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                b.copy_from_slice(&x.to_le_bytes());
            }
            f.write_all(&block).expect("write");
        }
    }
    let mut child = d
        .command(&[
            "convert",
            "--progress=json",
            "-c",
            "-m",
            "1",
            "-O",
            "qcow2",
            "big.raw",
            "out.qcow2",
        ])
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn vmi");
    let mut err = BufReader::new(child.stderr.take().expect("stderr"));
    let mut first = String::new();
    err.read_line(&mut first).expect("progress line");
    assert!(first.contains("\"done\""), "no progress: {first}");
    // SAFETY: kill(2) on the child's pid, which has not been reaped yet.
    let rc = unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGINT) };
    assert_eq!(rc, 0);
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut err, &mut rest).expect("stderr");
    let status = child.wait().expect("wait");
    assert_eq!(status.code(), Some(130), "{first}{rest}");
    assert!(rest.contains("interrupted"), "{rest}");
    assert!(
        rest.contains("out.qcow2"),
        "the error names the destination: {rest}"
    );
    let left: Vec<_> = std::fs::read_dir(d.path("."))
        .expect("list")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .filter(|n| n != "big.raw")
        .collect();
    assert!(left.is_empty(), "files left behind: {left:?}");
});

vmitest!(compare_of_different_sizes_warns_like_qemu_img, |d| {
    d.vmi(&["create", "-q", "a.img", "1M"]).ok();
    d.vmi(&["create", "-q", "b.img", "2M"]).ok();
    let r = d.vmi(&["compare", "a.img", "b.img"]);
    r.ok();
    assert_eq!(
        r.stdout,
        "Warning: Image size mismatch!\nImages are identical.\n"
    );
    let r = d.vmi(&["compare", "-s", "a.img", "b.img"]);
    r.code(1);
    assert_eq!(r.stdout, "Strict mode: Image size mismatch!\n");
});

vmitest!(compare_exit_codes_are_qemus, |d| {
    let a = d.sparse_raw("a.img", 4 << 20);
    std::fs::copy(&a, d.path("b.img")).expect("copy");
    let r = d.vmi(&["compare", "a.img", "b.img"]);
    r.ok();
    assert_eq!(r.stdout, "Images are identical.\n");

    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(d.path("b.img"))
        .expect("open");
    f.write_all_at(b"different", 1 << 20).expect("write");
    let r = d.vmi(&["compare", "-f", "raw", "-F", "raw", "a.img", "b.img"]);
    r.code(1);
    assert_eq!(r.stdout, "Content mismatch at offset 1048576!\n");

    let r = d.vmi(&["compare", "a.img", "missing.img"]);
    r.code(2);
    assert!(r.stderr.contains("missing.img"), "{r:#?}");
    d.vmi(&["compare", "--bogus", "a.img", "b.img"]).code(2);
});

// --- qcow2 through the command line -----------------------------------------------------------

vmitest!(raw_to_qcow2_to_raw_round_trips, |d| {
    let src = d.sparse_raw("src.img", 8 << 20);
    d.vmi(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "qcow2",
        "src.img",
        "mid.qcow2",
    ])
    .ok();
    assert_qemu_check_clean(&d.path("mid.qcow2"), "qcow2");
    assert!(qemu_compare(&src, "raw", &d.path("mid.qcow2"), "qcow2"));
    d.vmi(&["convert", "-O", "raw", "mid.qcow2", "back.img"])
        .ok();
    assert!(qemu_compare(&src, "raw", &d.path("back.img"), "raw"));
    let r = d.vmi(&["check", "mid.qcow2"]);
    r.ok();
    assert!(
        r.stdout.contains("No errors were found on the image."),
        "{r:#?}"
    );
    let j = d.vmi(&["check", "--output=json", "mid.qcow2"]).ok().json();
    assert_eq!(j["filename"], "mid.qcow2");
    assert_eq!(j["format"], "qcow2");
    assert_eq!(j["check-errors"], 0);
});

vmitest!(info_on_a_qcow2_overlay_matches_qemu_img, |d| {
    d.sparse_raw("base.img", 4 << 20);
    let top = d.path("top.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.img",
        "-F",
        "raw",
        s(&top),
    ]);
    let ours = d.vmi(&["info", "--output=json", "top.qcow2"]).ok().json();
    let qemu = qemu_info(&top, "qcow2");
    for key in [
        "virtual-size",
        "format",
        "cluster-size",
        "backing-filename",
        "backing-filename-format",
        "dirty-flag",
    ] {
        assert_eq!(ours[key], qemu[key], "{key}: {ours:#} vs {qemu:#}");
    }
    assert_eq!(ours["format-specific"]["type"], "qcow2");
    let chain = d
        .vmi(&["info", "--backing-chain", "--output=json", "top.qcow2"])
        .ok()
        .json();
    assert_eq!(chain.as_array().map(Vec::len), Some(2), "{chain:#}");
    assert_eq!(chain[1]["format"], "raw");
});

vmitest!(backing_files_are_refused_unless_allowed, |d| {
    let base = d.sparse_raw("base.img", 4 << 20);
    let top = d.path("top.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.img",
        "-F",
        "raw",
        s(&top),
    ]);
    let r = d.vmi(&["compare", "top.qcow2", "base.img"]);
    r.code(2);
    assert!(r.stderr.contains("--allow-backing"), "{r:#?}");
    assert!(r.stderr.contains("base.img"), "{r:#?}");
    d.vmi(&["--allow-backing", "compare", "top.qcow2", "base.img"])
        .ok();
    d.vmi(&[
        "convert",
        "--allow-backing",
        "-O",
        "raw",
        "top.qcow2",
        "flat.img",
    ])
    .ok();
    assert!(qemu_compare(&base, "raw", &d.path("flat.img"), "raw"));
});

vmitest!(create_overlay_takes_the_backing_files_size, |d| {
    d.sparse_raw("base.img", 4 << 20);
    let r = d.vmi(&[
        "create",
        "-f",
        "qcow2",
        "-b",
        "base.img",
        "-F",
        "raw",
        "top.qcow2",
    ]);
    r.ok();
    assert!(r.stdout.contains("backing_file=base.img"), "{r:#?}");
    let q = qemu_info(&d.path("top.qcow2"), "qcow2");
    assert_eq!(q["virtual-size"], 4 << 20);
    assert_eq!(q["backing-filename"], "base.img");
    assert_qemu_check_clean(&d.path("top.qcow2"), "qcow2");
});

vmitest!(measure_qcow2_equals_qemu_img, |d| {
    let img = d.sparse_raw("disk.img", 8 << 20);
    let ours = d
        .vmi(&["measure", "--output=json", "-O", "qcow2", "--size", "1G"])
        .ok()
        .json();
    assert_same_measure(&ours, &qemu_measure(&["-O", "qcow2", "--size", "1G"]));
    let ours = d
        .vmi(&[
            "measure",
            "--output=json",
            "-O",
            "qcow2",
            "-f",
            "raw",
            "disk.img",
        ])
        .ok()
        .json();
    assert_same_measure(&ours, &qemu_measure(&["-O", "qcow2", "-f", "raw", s(&img)]));
});

vmitest!(qcow2_made_by_qemu_resizes_and_maps, |d| {
    let img = d.path("q.qcow2");
    qemu_create(&img, "qcow2", "", 4 << 20);
    d.vmi(&["resize", "q.qcow2", "+4M"]).ok();
    assert_eq!(qemu_info(&img, "qcow2")["virtual-size"], 8 << 20);
    let map = d.vmi(&["map", "--output=json", "q.qcow2"]).ok().json();
    assert_map_has_qemus_fields(&map, &qemu_map(&img, "qcow2"));
});

vmitest!(
    issue_13_resize_shrink_discards_qcow2_data_past_the_end,
    |d| {
        let img = d.path("q.qcow2");
        qemu_create(&img, "qcow2", "", 8 << 20);
        vmi_testkit::qemu_io(&img, "qcow2", "write -P 0x31 0 8M");
        let r = d.vmi(&["resize", "q.qcow2", "-6M"]);
        r.code(1);
        assert!(r.stderr.contains("--shrink"), "{r:#?}");
        d.vmi(&["resize", "--shrink", "q.qcow2", "-6M"]).ok();
        assert_eq!(qemu_info(&img, "qcow2")["virtual-size"], 2 << 20);
        vmi_testkit::assert_qemu_check_clean(&img, "qcow2");
        assert!(file_size(&img) < 3 << 20, "{}", file_size(&img));
        vmi_testkit::qemu_io(&img, "qcow2", "read -P 0x31 0 2M");
    }
);

/// Whether a `/proc/locks` line's byte range (its last two fields) covers byte `at`.
fn covers(line: &str, at: u64) -> bool {
    let mut f = line.split_whitespace().rev();
    let (Some(end), Some(start)) = (f.next(), f.next()) else {
        return false;
    };
    matches!((start.parse::<u64>(), end.parse::<u64>()), (Ok(s), Ok(e)) if s <= at && at <= e)
}

vmitest!(issue_12_convert_onto_its_own_source_is_refused, |d| {
    let img = d.path("a.qcow2");
    qemu_create(&img, "qcow2", "", 1 << 20);
    vmi_testkit::qemu_io(&img, "qcow2", "write -P 0x51 0 64k");
    let before = std::fs::read(&img).unwrap();
    let r = d.vmi(&["convert", "-O", "qcow2", "a.qcow2", "a.qcow2"]);
    r.code(1);
    assert!(r.stderr.contains("Failed to get \"write\" lock"), "{r:#?}");
    assert_eq!(std::fs::read(&img).unwrap(), before);
});

vmitest!(
    issue_12_a_running_qemu_writer_is_respected_and_force_share_reads,
    |d| {
        let img = d.path("a.qcow2");
        qemu_create(&img, "qcow2", "", 1 << 20);
        let sock = d.path("nbd.sock");
        let mut nbd = std::process::Command::new("qemu-nbd")
            .args(["--persistent", "-f", "qcow2", "-k"])
            .arg(&sock)
            .arg(&img)
            .spawn()
            .expect("qemu-nbd is installed");
        // Ready once its "write" lock (byte 101) shows in /proc/locks.
        let ino = std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&img).unwrap());
        for _ in 0..1000 {
            let locks = std::fs::read_to_string("/proc/locks").unwrap_or_default();
            if locks
                .lines()
                .any(|l| l.contains(&format!(":{ino} ")) && covers(l, 101))
            {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        let r = d.vmi(&["resize", "a.qcow2", "+1M"]);
        let refused = r.stderr.contains("Failed to get \"write\" lock");
        let info = d.vmi(&["info", "a.qcow2"]);
        let shared = info.stderr.contains("Failed to get shared \"write\" lock");
        let mut with_u = Vec::new();
        for args in [
            &["info", "-U", "a.qcow2"][..],
            &["check", "-U", "a.qcow2"],
            &["map", "-U", "a.qcow2"],
            &["measure", "-U", "-O", "qcow2", "a.qcow2"],
            &["compare", "-U", "a.qcow2", "a.qcow2"],
            &["convert", "-U", "-O", "raw", "a.qcow2", "b.raw"],
        ] {
            with_u.push((args.join(" "), d.vmi(args)));
        }
        let _ = nbd.kill();
        let _ = nbd.wait();
        r.code(1);
        assert!(refused, "{r:#?}");
        assert!(shared, "{info:#?}");
        for (args, run) in &with_u {
            assert_eq!(run.code, 0, "{args}: {run:#?}");
        }
        d.vmi(&["resize", "a.qcow2", "+1M"]).ok();
    }
);

vmitest!(convert_with_the_sources_backing_is_a_shallow_copy, |d| {
    let base = d.path("base.qcow2");
    let top = d.path("top.qcow2");
    qemu_create(&base, "qcow2", "", 4 << 20);
    vmi_testkit::qemu_io(&base, "qcow2", "write -P 0x11 0 2M");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        s(&top),
    ]);
    vmi_testkit::qemu_io(&top, "qcow2", "write -P 0x22 1M 64k");
    vmi_testkit::qemu_io(&top, "qcow2", "write -z 1536k 64k");
    // The backing file is not read, so no --allow-backing is needed.
    d.vmi(&[
        "convert",
        "-O",
        "qcow2",
        "-B",
        "base.qcow2",
        "-F",
        "qcow2",
        "top.qcow2",
        "new.qcow2",
    ])
    .ok();
    let new = d.path("new.qcow2");
    assert_qemu_check_clean(&new, "qcow2");
    assert_eq!(qemu_info(&new, "qcow2")["backing-filename"], "base.qcow2");
    assert!(qemu_compare(&top, "qcow2", &new, "qcow2"));
    let map = qemu_map(&new, "qcow2");
    let top_layer: u64 = map
        .as_array()
        .expect("list")
        .iter()
        .filter(|e| e["depth"] == 0 && e["present"] == true)
        .map(|e| e["length"].as_u64().unwrap_or(0))
        .sum();
    assert_eq!(top_layer, 128 << 10, "{map:#}");

    // Another backing file: everything is written, so the result still reads like the source.
    qemu_create(&d.path("other.qcow2"), "qcow2", "", 4 << 20);
    vmi_testkit::qemu_io(&d.path("other.qcow2"), "qcow2", "write -P 0x33 0 4M");
    d.vmi(&[
        "--allow-backing",
        "convert",
        "-O",
        "qcow2",
        "-B",
        "other.qcow2",
        "top.qcow2",
        "full.qcow2",
    ])
    .ok();
    assert!(qemu_compare(&top, "qcow2", &d.path("full.qcow2"), "qcow2"));
});

vmitest!(allow_backing_dir_widens_the_confinement, |d| {
    std::fs::create_dir(d.path("base")).expect("mkdir");
    std::fs::create_dir(d.path("top")).expect("mkdir");
    let base = d.sparse_raw("base/base.img", 1 << 20);
    let top = d.path("top/top.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "../base/base.img",
        "-F",
        "raw",
        s(&top),
    ]);
    let r = d.vmi(&[
        "--allow-backing",
        "compare",
        "top/top.qcow2",
        "base/base.img",
    ]);
    r.code(2);
    assert!(r.stderr.contains("outside the allowed directory"), "{r:#?}");
    assert!(r.stderr.contains("--allow-backing=DIR"), "{r:#?}");
    d.vmi(&[
        "--allow-backing=.",
        "compare",
        "top/top.qcow2",
        "base/base.img",
    ])
    .ok();
    let human = d.vmi(&[
        "info",
        "--allow-backing=.",
        "--backing-chain",
        "top/top.qcow2",
    ]);
    human.ok();
    assert!(
        human.stdout.contains("backing file: ../base/base.img"),
        "{human:#?}"
    );
    assert!(
        human.stdout.contains(&format!(
            "image: {}",
            base.canonicalize().unwrap().display()
        )),
        "{human:#?}"
    );
});

// --- check on damaged qcow2 images -------------------------------------------------------------

fn read_be64(f: &std::fs::File, at: u64) -> u64 {
    let mut b = [0u8; 8];
    f.read_exact_at(&mut b, at).expect("read");
    u64::from_be_bytes(b)
}

/// A qcow2 image with data in its first cluster, and the host offsets of that cluster's L2 entry
/// and refcount entry, for damaging it.
fn qcow2_with_one_cluster(d: &Dir, name: &str) -> (PathBuf, u64, u64) {
    let img = d.path(name);
    qemu_create(&img, "qcow2", "", 1 << 20);
    vmi_testkit::qemu_io(&img, "qcow2", "write -P 0x42 0 64k");
    let f = std::fs::File::open(&img).expect("open");
    // qcow2 header: l1_table_offset at byte 40, refcount_table_offset at byte 48.
    let l1 = read_be64(&f, 40);
    let l2 = read_be64(&f, l1) & 0x00ff_ffff_ffff_fe00;
    let data = read_be64(&f, l2) & 0x00ff_ffff_ffff_fe00;
    let rt = read_be64(&f, 48);
    let rb = read_be64(&f, rt);
    // 16-bit refcounts, 64 KiB clusters.
    let refcount_entry = rb + (data / 65536) * 2;
    (img, l2, refcount_entry)
}

vmitest!(check_reports_leaks_with_exit_3, |d| {
    let (img, l2_entry, _) = qcow2_with_one_cluster(&d, "leak.qcow2");
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&img)
        .expect("open");
    f.write_all_at(&[0u8; 8], l2_entry)
        .expect("drop the reference");
    drop(f);
    let (qemu_code, _) = vmi_testkit::qemu_check(&img, "qcow2");
    assert_eq!(qemu_code, 3);

    let r = d.vmi(&["check", "leak.qcow2"]);
    r.code(3);
    assert!(
        r.stdout
            .contains("1 leaked clusters were found on the image."),
        "{r:#?}"
    );
    assert!(
        r.stdout
            .contains("This means waste of disk space, but no harm to data."),
        "{r:#?}"
    );
    let j = d
        .vmi(&["check", "--output=json", "leak.qcow2"])
        .code(3)
        .json();
    assert_eq!(j["leaks"], 1);
});

vmitest!(check_repairs_leaks_with_r_leaks, |d| {
    let (img, l2_entry, _) = qcow2_with_one_cluster(&d, "leak.qcow2");
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&img)
        .expect("open");
    f.write_all_at(&[0u8; 8], l2_entry)
        .expect("drop the reference");
    drop(f);
    let r = d.vmi(&["check", "-r", "leaks", "leak.qcow2"]);
    r.ok();
    assert!(
        r.stdout
            .contains("The following inconsistencies were found and repaired:"),
        "{r:#?}"
    );
    assert_qemu_check_clean(&img, "qcow2");
});

vmitest!(check_reports_corruptions_with_exit_2, |d| {
    let (img, _, refcount_entry) = qcow2_with_one_cluster(&d, "bad.qcow2");
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&img)
        .expect("open");
    f.write_all_at(&[0u8; 2], refcount_entry)
        .expect("zero the refcount");
    drop(f);
    let (qemu_code, _) = vmi_testkit::qemu_check(&img, "qcow2");
    assert_eq!(qemu_code, 2);
    let r = d.vmi(&["check", "bad.qcow2"]);
    r.code(2);
    assert!(
        r.stdout.contains("errors were found on the image."),
        "{r:#?}"
    );
});
