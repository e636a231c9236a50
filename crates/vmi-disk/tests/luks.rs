//! LUKS: volumes qemu-img creates read byte for byte, volumes vmi creates are read by qemu-img,
//! wrong and missing passphrases fail clearly, and hostile headers fail without panics and in
//! bounded time.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::fs;
use std::path::Path;
use vmi_disk::{
    CreateOptions, ErrorKind, Format, FormatOptions, Gate, Image, OpenOptions, Secret, Secrets,
};
use vmi_testkit::fixtures::{pattern, read_file, read_image};
use vmi_testkit::qemu::{qemu_img, qemu_img_status};

const MIB: u64 = 1 << 20;
const PASS: &str = "correct horse";
/// Byte offsets in the LUKS1 header.
const PAYLOAD_OFFSET: usize = 104;
const KEY_BYTES: usize = 108;
const MK_ITER: usize = 164;
const SLOT0: usize = 208;
const SLOT_ITER: usize = 4;
const SLOT_KEY_OFFSET: usize = 40;
const SLOT_STRIPES: usize = 44;

fn p(path: &Path) -> &str {
    path.to_str().expect("UTF-8 test path")
}

fn secret(s: &str) -> Option<Secret> {
    Some(Secret::new(s.as_bytes().to_vec()))
}

fn open_key(path: &Path, key: &str) -> vmi_disk::Result<Image> {
    Image::open(path, &OpenOptions::new().secret(secret(key)))
}

/// A raw file with a pattern in its first half and zeroes in its second.
fn raw_source(dir: &Path, size: u64) -> std::path::PathBuf {
    let path = dir.join("src.raw");
    let mut data = pattern(7, (size / 2) as usize);
    data.resize(size as usize, 0);
    fs::write(&path, data).expect("write raw");
    path
}

/// `qemu-img convert -O luks` from `raw` with the given extra `-o` options.
fn qemu_luks(raw: &Path, dst: &Path, o: &str) {
    let opts = format!("key-secret=sec0,iter-time=100{o}");
    let obj = format!("secret,id=sec0,data={PASS}");
    qemu_img(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "luks",
        "--object",
        &obj,
        "-o",
        &opts,
        p(raw),
        p(dst),
    ]);
}

fn create_opts(o: &str, size: u64, key: &str) -> CreateOptions {
    let mut fo = FormatOptions::new();
    fo.parse(o).expect("valid -o");
    let mut s = Secrets::new();
    s.insert("sec0", Secret::new(key.as_bytes().to_vec()))
        .expect("one secret");
    fo.set_secrets(s);
    CreateOptions::new(size).options(fo)
}

/// `qemu-img compare` of a LUKS image (opened with the passphrase) against a raw file.
fn qemu_compare_luks(img: &Path, driver: &str, raw: &Path) -> (i32, String) {
    let obj = format!("secret,id=sec0,data={PASS}");
    let key = if driver == "qcow2" {
        "encrypt.key-secret"
    } else {
        "key-secret"
    };
    let spec = format!("driver={driver},{key}=sec0,file.filename={}", p(img));
    let other = format!("driver=raw,file.filename={}", p(raw));
    let (code, out, err) =
        qemu_img_status(&["compare", "--object", &obj, "--image-opts", &spec, &other]);
    (code, format!("{out}{err}"))
}

fn reads_like_raw(cipher_opts: &str) {
    let dir = tempfile::tempdir().expect("tempdir");
    let raw = raw_source(dir.path(), 2 * MIB);
    let luks = dir.path().join("q.luks");
    qemu_luks(&raw, &luks, cipher_opts);
    let img = open_key(&luks, PASS).expect("open with the passphrase");
    assert_eq!(img.format(), Format::Luks);
    assert_eq!(img.virtual_size(), 2 * MIB);
    assert!(read_image(&img) == read_file(&raw), "guest data differs");
    // Unaligned reads decrypt the sectors around them.
    let mut buf = vec![0u8; 1000];
    img.read_at(&mut buf, 12345).expect("unaligned read");
    assert_eq!(&buf[..], &read_file(&raw)[12345..13345]);
}

#[test]
fn qemu_luks_aes_256_xts_plain64_reads_byte_for_byte() {
    reads_like_raw("");
}

#[test]
fn qemu_luks_aes_128_cbc_essiv_sha256_reads_byte_for_byte() {
    reads_like_raw(",cipher-alg=aes-128,cipher-mode=cbc,ivgen-alg=essiv,ivgen-hash-alg=sha256");
}

#[test]
fn qemu_luks_cbc_plain64_sha512_cbc_plain_sha1_and_aes_192_xts_read_byte_for_byte() {
    reads_like_raw(",cipher-mode=cbc,ivgen-alg=plain64,hash-alg=sha512");
    reads_like_raw(",cipher-alg=aes-128,cipher-mode=cbc,ivgen-alg=plain,hash-alg=sha1");
    reads_like_raw(",cipher-alg=aes-192,cipher-mode=xts,hash-alg=sha384");
}

#[test]
fn vmi_created_luks_reads_identically_in_qemu_img() {
    let dir = tempfile::tempdir().expect("tempdir");
    for (i, o) in [
        "key-secret=sec0,iter-time=100",
        "key-secret=sec0,iter-time=100,cipher-alg=aes-128,cipher-mode=cbc,ivgen-alg=essiv",
        "key-secret=sec0,iter-time=100,cipher-mode=cbc,ivgen-alg=plain64,hash-alg=sha1",
    ]
    .into_iter()
    .enumerate()
    {
        let raw = raw_source(dir.path(), 3 * MIB);
        let data = read_file(&raw);
        let luks = dir.path().join(format!("v{i}.luks"));
        let img =
            Image::create(&luks, Format::Luks, &create_opts(o, 3 * MIB, PASS)).expect("create");
        // Odd-sized, unaligned chunks exercise the partial-sector path.
        let chunk = 100_000 + 3;
        for (k, c) in data.chunks(chunk).enumerate() {
            img.write_at(c, (k * chunk) as u64).expect("write");
        }
        img.close().expect("close");
        let (code, out) = qemu_compare_luks(&luks, "luks", &raw);
        assert_eq!(code, 0, "{o}: qemu-img compare: {out}");
        let reopened = open_key(&luks, PASS).expect("reopen");
        assert!(
            read_image(&reopened) == data,
            "{o}: vmi reads back other data"
        );
    }
}

#[test]
fn a_wrong_passphrase_is_refused_clearly() {
    let dir = tempfile::tempdir().expect("tempdir");
    let luks = dir.path().join("w.luks");
    let img = Image::create(
        &luks,
        Format::Luks,
        &create_opts("key-secret=sec0,iter-time=1", MIB, PASS),
    )
    .expect("create");
    img.close().expect("close");
    let e = open_key(&luks, "wrong").expect_err("wrong passphrase");
    assert_eq!(e.kind(), ErrorKind::Refused, "{e}");
    assert!(e.to_string().contains("invalid password"), "{e}");
}

#[test]
fn without_a_key_the_image_opens_for_info_but_its_data_cannot_be_read() {
    let dir = tempfile::tempdir().expect("tempdir");
    let luks = dir.path().join("n.luks");
    Image::create(
        &luks,
        Format::Luks,
        &create_opts("key-secret=sec0,iter-time=1,cipher-mode=cbc", MIB, PASS),
    )
    .expect("create")
    .close()
    .expect("close");
    let img = Image::open(&luks, &OpenOptions::new()).expect("open for info");
    assert_eq!(img.format(), Format::Luks);
    assert_eq!(img.virtual_size(), MIB);
    let info = img.driver().info().format_specific;
    assert_eq!(info["type"], "luks");
    assert_eq!(info["data"]["cipher-mode"], "cbc");
    assert_eq!(info["data"]["slots"][0]["active"], true);
    let mut buf = [0u8; 512];
    let e = img.read_at(&mut buf, 0).expect_err("no key");
    assert!(e.to_string().contains("is encrypted"), "{e}");
    let e = Image::open(&luks, &OpenOptions::new().write(true)).expect_err("write needs a key");
    assert!(e.to_string().contains("key-secret"), "{e}");
}

#[test]
fn creating_without_a_key_secret_is_an_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let e = Image::create(
        &dir.path().join("x.luks"),
        Format::Luks,
        &create_opts("iter-time=1", MIB, PASS),
    )
    .expect_err("no key-secret");
    assert!(e.to_string().contains("key-secret"), "{e}");
    let e = Image::create(
        &dir.path().join("y.luks"),
        Format::Luks,
        &create_opts("key-secret=nope", MIB, PASS),
    )
    .expect_err("unknown secret id");
    assert!(e.to_string().contains("nope"), "{e}");
}

/// A small valid volume to corrupt: header bytes and the whole file.
fn small_volume(dir: &Path) -> Vec<u8> {
    let luks = dir.join("small.luks");
    let _ = fs::remove_file(&luks);
    Image::create(
        &luks,
        Format::Luks,
        &create_opts("key-secret=sec0,iter-time=1", 64 * 1024, PASS),
    )
    .expect("create")
    .close()
    .expect("close");
    read_file(&luks)
}

/// One way to damage a header.
type Corruption = Box<dyn Fn(&mut Vec<u8>)>;

fn put32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_be_bytes());
}

/// Open `bytes` as LUKS with the passphrase; the result's error kind, or `None` on success.
fn open_bytes(dir: &Path, bytes: &[u8], key: Option<&str>) -> Result<(), vmi_disk::Error> {
    let path = dir.join("hostile.luks");
    fs::write(&path, bytes).expect("write");
    let opts = OpenOptions::new()
        .format(Some(Format::Luks))
        .gate(Gate::deny_all())
        .secret(key.and_then(secret));
    Image::open(&path, &opts).map(|_| ())
}

#[test]
fn hostile_headers_are_refused_before_any_key_derivation() {
    let dir = tempfile::tempdir().expect("tempdir");
    let good = small_volume(dir.path());
    open_bytes(dir.path(), &good, Some(PASS)).expect("the unmodified volume opens");
    let len = good.len() as u32;
    let cases: Vec<(&str, Corruption)> = vec![
        (
            "key slot offset past the end of the file",
            Box::new(move |b| put32(b, SLOT0 + SLOT_KEY_OFFSET, len / 512 + 1)),
        ),
        (
            "huge stripe count",
            Box::new(|b| put32(b, SLOT0 + SLOT_STRIPES, u32::MAX)),
        ),
        (
            "absurd slot iteration count",
            Box::new(|b| put32(b, SLOT0 + SLOT_ITER, u32::MAX)),
        ),
        (
            "absurd volume key digest iterations",
            Box::new(|b| put32(b, MK_ITER, 0xffff_fff0)),
        ),
        (
            "payload offset beyond the file",
            Box::new(move |b| put32(b, PAYLOAD_OFFSET, len / 512 + 8)),
        ),
        ("key of 4 GiB", Box::new(|b| put32(b, KEY_BYTES, u32::MAX))),
        (
            "unterminated cipher name",
            Box::new(|b| b[8..40].fill(b'a')),
        ),
        (
            "unknown cipher",
            Box::new(|b| b[8..12].copy_from_slice(b"des\0")),
        ),
        (
            "slot state neither enabled nor disabled",
            Box::new(|b| put32(b, SLOT0, 7)),
        ),
        ("truncated header", Box::new(|b| b.truncate(300))),
        (
            "eight slots that add up to too many iterations",
            Box::new(|b| {
                for i in 0..8 {
                    put32(b, SLOT0 + 48 * i, 0x00ac_71f3);
                    put32(b, SLOT0 + 48 * i + SLOT_ITER, 1 << 23);
                }
            }),
        ),
    ];
    for (what, corrupt) in cases {
        let mut b = good.clone();
        corrupt(&mut b);
        let started = std::time::Instant::now();
        let e = open_bytes(dir.path(), &b, Some(PASS)).expect_err(what);
        assert!(
            matches!(
                e.kind(),
                ErrorKind::Invalid | ErrorKind::Limit | ErrorKind::Unsupported
            ),
            "{what}: {e}"
        );
        assert!(
            started.elapsed() < std::time::Duration::from_secs(30),
            "{what}: took {:?}",
            started.elapsed()
        );
    }
}

#[test]
fn mutated_headers_never_panic() {
    let dir = tempfile::tempdir().expect("tempdir");
    let good = small_volume(dir.path());
    let mut rng = StdRng::seed_from_u64(12);
    for _ in 0..300 {
        let mut b = good.clone();
        for _ in 0..rng.gen_range(1..6) {
            let i = rng.gen_range(0..592);
            b[i] = rng.gen();
        }
        // Parsing only (no key): key derivation on mutated iteration counts would be slow.
        let _ = open_bytes(dir.path(), &b, None);
    }
}

/// `qemu-io` with the passphrase on an encrypted qcow2 image.
fn qemu_io_qcow2(img: &Path, cmd: &str) {
    let obj = format!("secret,id=sec0,data={PASS}");
    let spec = format!(
        "driver=qcow2,encrypt.key-secret=sec0,file.filename={}",
        p(img)
    );
    let out = std::process::Command::new("qemu-io")
        .args(["--object", &obj, "--image-opts", &spec, "-c", cmd])
        .output()
        .expect("qemu-io is installed");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && !stdout.contains("failed"),
        "qemu-io {cmd}: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn qemu_check_qcow2(img: &Path) -> (i32, String) {
    let obj = format!("secret,id=sec0,data={PASS}");
    let spec = format!(
        "driver=qcow2,encrypt.key-secret=sec0,file.filename={}",
        p(img)
    );
    let (code, out, err) = qemu_img_status(&["check", "--object", &obj, "--image-opts", &spec]);
    (code, format!("{out}{err}"))
}

#[test]
fn qemu_encrypted_qcow2_reads_byte_for_byte() {
    let dir = tempfile::tempdir().expect("tempdir");
    let raw = raw_source(dir.path(), 2 * MIB);
    let q = dir.path().join("q.qcow2");
    let obj = format!("secret,id=sec0,data={PASS}");
    qemu_img(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "qcow2",
        "--object",
        &obj,
        "-o",
        "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=100,cluster_size=4096",
        p(&raw),
        p(&q),
    ]);
    // Partial-cluster writes by qemu land at host offsets unrelated to guest offsets.
    qemu_io_qcow2(&q, "write -P 0x5a 1536k 1000");
    qemu_io_qcow2(&q, "write -P 0xa5 7 513");
    let mut expect = read_file(&raw);
    expect[1536 * 1024..1536 * 1024 + 1000].fill(0x5a);
    expect[7..520].fill(0xa5);
    let img = open_key(&q, PASS).expect("open");
    assert_eq!(img.format(), Format::Qcow2);
    assert!(read_image(&img) == expect, "guest data differs");
    let mut info = img.driver().info().format_specific;
    let out = qemu_img(&["info", "--output=json", p(&q)]);
    let qemu: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    if qemu["format-specific"]["data"]["encrypt"]
        .get("detached-header")
        .is_none()
    {
        // qemu-img before 9.0 does not print the key.
        if let Some(e) = info["data"]["encrypt"].as_object_mut() {
            e.remove("detached-header");
        }
    }
    assert_eq!(
        info["data"]["encrypt"], qemu["format-specific"]["data"]["encrypt"],
        "the encrypt block as qemu-img info prints it"
    );
    // Without the key: info works, reading says how to give the key.
    let locked = Image::open(&q, &OpenOptions::new()).expect("open for info");
    let mut buf = [0u8; 16];
    let e = locked.read_at(&mut buf, 0).expect_err("no key");
    assert!(e.to_string().contains("encrypt.key-secret"), "{e}");
    let e = open_key(&q, "nope").expect_err("wrong key");
    assert_eq!(e.kind(), ErrorKind::Refused, "{e}");
}

#[test]
fn vmi_encrypted_qcow2_reads_identically_in_qemu_img_and_checks_clean() {
    let dir = tempfile::tempdir().expect("tempdir");
    let raw = raw_source(dir.path(), 3 * MIB);
    let data = read_file(&raw);
    let q = dir.path().join("v.qcow2");
    let o = "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=100,\
             encrypt.cipher-alg=aes-128,encrypt.cipher-mode=cbc,encrypt.ivgen-alg=essiv";
    let img = Image::create(&q, Format::Qcow2, &create_opts(o, 3 * MIB, PASS)).expect("create");
    let chunk = 70_000 + 1;
    for (k, c) in data.chunks(chunk).enumerate() {
        if c.iter().any(|&b| b != 0) {
            img.write_at(c, (k * chunk) as u64).expect("write");
        }
    }
    img.close().expect("close");
    let (code, out) = qemu_compare_luks(&q, "qcow2", &raw);
    assert_eq!(code, 0, "qemu-img compare: {out}");
    let (code, out) = qemu_check_qcow2(&q);
    assert_eq!(code, 0, "qemu-img check: {out}");
    // vmi rewrites parts of clusters qemu then reads.
    let img = Image::open(&q, &OpenOptions::new().write(true).secret(secret(PASS))).expect("rw");
    img.write_at(&[0x77; 300], 65536 + 100)
        .expect("partial write");
    img.close().expect("close");
    let mut expect = data.clone();
    expect[65636..65936].fill(0x77);
    let patched = dir.path().join("patched.raw");
    fs::write(&patched, &expect).expect("write");
    let (code, out) = qemu_compare_luks(&q, "qcow2", &patched);
    assert_eq!(code, 0, "after a partial write: {out}");
    let img = open_key(&q, PASS).expect("reopen");
    assert!(read_image(&img) == expect, "vmi reads back other data");
    assert!(
        img.driver().compressed_writer().is_none(),
        "no compressed writes into encrypted images"
    );
}

#[test]
fn legacy_aes_qcow2_is_refused_as_unsupported() {
    let dir = tempfile::tempdir().expect("tempdir");
    let q = dir.path().join("aes.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", p(&q), "1M"]);
    let mut b = read_file(&q);
    b[32..36].copy_from_slice(&1u32.to_be_bytes());
    fs::write(&q, &b).expect("write");
    let e = Image::open(&q, &OpenOptions::new()).expect_err("legacy AES");
    assert_eq!(e.kind(), ErrorKind::Unsupported, "{e}");
    assert!(e.to_string().contains("legacy AES"), "{e}");
    let e = Image::create(
        &dir.path().join("new.qcow2"),
        Format::Qcow2,
        &create_opts("encrypt.format=aes,encrypt.key-secret=sec0", MIB, PASS),
    )
    .expect_err("creating legacy AES");
    assert_eq!(e.kind(), ErrorKind::Unsupported, "{e}");
}

#[test]
fn qcow2_crypto_header_pointers_out_of_bounds_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let q = dir.path().join("h.qcow2");
    Image::create(
        &q,
        Format::Qcow2,
        &create_opts(
            "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=1",
            MIB,
            PASS,
        ),
    )
    .expect("create")
    .close()
    .expect("close");
    let good = read_file(&q);
    // The extension follows the 112-byte v3 header: kind, length, offset, length.
    let ext = 112;
    assert_eq!(&good[ext..ext + 4], &0x0537_be77u32.to_be_bytes());
    for (what, off, len) in [
        ("past the end", good.len() as u64, 4096u64),
        ("unaligned", 0x10001, 4096),
        ("huge", 0x10000, u64::MAX - 10),
        ("at the header", 0, 4096),
    ] {
        let mut b = good.clone();
        b[ext + 8..ext + 16].copy_from_slice(&off.to_be_bytes());
        b[ext + 16..ext + 24].copy_from_slice(&len.to_be_bytes());
        fs::write(&q, &b).expect("write");
        let e = open_key(&q, PASS).expect_err(what);
        assert!(
            matches!(e.kind(), ErrorKind::Invalid | ErrorKind::Limit),
            "{what}: {e}"
        );
    }
    let mut b = good.clone();
    b[32..36].copy_from_slice(&0u32.to_be_bytes());
    fs::write(&q, &b).expect("write");
    let e = open_key(&q, PASS).expect_err("crypto extension without crypt_method");
    assert_eq!(e.kind(), ErrorKind::Invalid, "{e}");
}

/// Whether `cryptsetup` (Debian's cryptsetup-bin) is installed: LUKS2 volumes come from it,
/// since qemu-img does not write (or read) LUKS2.
fn have_cryptsetup() -> bool {
    let found = std::process::Command::new("cryptsetup")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        eprintln!("SKIPPED: cryptsetup is not installed (apt-get install cryptsetup-bin)");
    }
    found
}

fn run_with_stdin(cmd: &str, args: &[&str], input: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut child = std::process::Command::new(cmd)
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(input)
        .expect("write stdin");
    let out = child.wait_with_output().expect("wait");
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The volume key cryptsetup unlocks with the passphrase (`luksDump --dump-volume-key`).
fn cryptsetup_volume_key(img: &Path) -> Vec<u8> {
    let out = run_with_stdin(
        "cryptsetup",
        &[
            "luksDump",
            "--dump-volume-key",
            "--batch-mode",
            "--key-file",
            "-",
            p(img),
        ],
        PASS.as_bytes(),
    );
    let text = String::from_utf8_lossy(&out);
    let dump = text.split("MK dump:").nth(1).expect("MK dump in output");
    dump.split_whitespace()
        .filter_map(|w| u8::from_str_radix(w, 16).ok().filter(|_| w.len() == 2))
        .collect()
}

/// Encrypt (or decrypt) one sector with openssl, an implementation independent of vmi's. `openssl
/// enc` has no XTS, so XTS is built here from its AES-ECB (IEEE 1619: the tweak is the IV
/// encrypted with the second key half, multiplied by x in GF(2^128) for each block).
fn openssl_sector(cipher: &str, key: &[u8], iv: &[u8; 16], data: &[u8], enc: bool) -> Vec<u8> {
    let dir = if enc { "-e" } else { "-d" };
    let ecb = |k: &[u8], d: &[u8], dir: &str| {
        let name = format!("-aes-{}-ecb", k.len() * 8);
        run_with_stdin("openssl", &["enc", dir, &name, "-K", &hex(k), "-nopad"], d)
    };
    if !cipher.ends_with("-xts") {
        let (k, i) = (hex(key), hex(iv));
        return run_with_stdin(
            "openssl",
            &[
                "enc",
                dir,
                &format!("-{cipher}"),
                "-K",
                &k,
                "-iv",
                &i,
                "-nopad",
            ],
            data,
        );
    }
    let (k1, k2) = key.split_at(key.len() / 2);
    let mut t: [u8; 16] = ecb(k2, iv, "-e").try_into().expect("one block");
    let mut tweaks = Vec::new();
    let mut x = Vec::new();
    for block in data.chunks(16) {
        tweaks.push(t);
        x.extend(block.iter().zip(t.iter()).map(|(a, b)| a ^ b));
        let carry = t[15] >> 7;
        for i in (1..16).rev() {
            t[i] = (t[i] << 1) | (t[i - 1] >> 7);
        }
        t[0] = (t[0] << 1) ^ (0x87 * carry);
    }
    let y = ecb(k1, &x, dir);
    y.chunks(16)
        .zip(tweaks)
        .flat_map(|(b, t)| b.iter().zip(t).map(|(a, b)| a ^ b).collect::<Vec<u8>>())
        .collect()
}

/// Format a LUKS2 volume with cryptsetup, fill its payload through openssl, and check that vmi
/// reads the plaintext and writes what openssl decrypts.
fn luks2_case(format_args: &[&str], openssl_cipher: &str, sector: usize) {
    let dir = tempfile::tempdir().expect("tempdir");
    let img = dir.path().join("l2.img");
    let payload_len = 64 * 1024;
    let f = fs::File::create(&img).expect("create");
    f.set_len(16 * MIB + payload_len as u64).expect("size");
    drop(f);
    let mut args = vec![
        "luksFormat",
        "--type",
        "luks2",
        "--batch-mode",
        "--key-file",
        "-",
    ];
    args.extend_from_slice(format_args);
    args.push(p(&img));
    run_with_stdin("cryptsetup", &args, PASS.as_bytes());
    let key = cryptsetup_volume_key(&img);
    let plain = pattern(9, payload_len);
    let mut bytes = read_file(&img);
    for (i, s) in plain.chunks(sector).enumerate() {
        let mut iv = [0u8; 16];
        iv[..8].copy_from_slice(&(i as u64).to_le_bytes());
        let c = openssl_sector(openssl_cipher, &key, &iv, s, true);
        let at = 16 * MIB as usize + i * sector;
        bytes[at..at + sector].copy_from_slice(&c);
    }
    fs::write(&img, &bytes).expect("write payload");
    let image = open_key(&img, PASS).expect("open LUKS2 with the passphrase");
    assert_eq!(image.format(), Format::Luks);
    assert_eq!(image.virtual_size(), payload_len as u64);
    assert!(
        read_image(&image) == plain,
        "{format_args:?}: plaintext differs"
    );
    drop(image);
    // A write through vmi decrypts with openssl to what was written.
    let rw = Image::open(&img, &OpenOptions::new().write(true).secret(secret(PASS))).expect("rw");
    rw.write_at(&[0x42; 100], sector as u64 + 10)
        .expect("write");
    rw.close().expect("close");
    let bytes = read_file(&img);
    let at = 16 * MIB as usize + sector;
    let mut iv = [0u8; 16];
    iv[..8].copy_from_slice(&1u64.to_le_bytes());
    let back = openssl_sector(openssl_cipher, &key, &iv, &bytes[at..at + sector], false);
    let mut expect = plain[sector..2 * sector].to_vec();
    expect[10..110].fill(0x42);
    assert!(back == expect, "{format_args:?}: written sector differs");
    let e = open_key(&img, "wrong").expect_err("wrong passphrase");
    assert_eq!(e.kind(), ErrorKind::Refused, "{e}");
}

#[test]
fn cryptsetup_luks2_argon2id_xts_4k_sectors_reads_and_writes() {
    if !have_cryptsetup() {
        return;
    }
    luks2_case(
        &[
            "--pbkdf",
            "argon2id",
            "--pbkdf-force-iterations",
            "4",
            "--pbkdf-memory",
            "1024",
            "--pbkdf-parallel",
            "1",
            "--sector-size",
            "4096",
        ],
        "aes-256-xts",
        4096,
    );
}

#[test]
fn cryptsetup_luks2_argon2i_and_pbkdf2_with_512_byte_sectors_read_and_write() {
    if !have_cryptsetup() {
        return;
    }
    luks2_case(
        &[
            "--pbkdf",
            "argon2i",
            "--pbkdf-force-iterations",
            "4",
            "--pbkdf-memory",
            "1024",
            "--pbkdf-parallel",
            "2",
            "--sector-size",
            "512",
            "--key-size",
            "256",
        ],
        "aes-128-xts",
        512,
    );
    luks2_case(
        &[
            "--pbkdf",
            "pbkdf2",
            "--pbkdf-force-iterations",
            "1000",
            "--hash",
            "sha512",
            "--sector-size",
            "512",
            "--cipher",
            "aes-cbc-plain64",
            "--key-size",
            "256",
        ],
        "aes-256-cbc",
        512,
    );
}

#[test]
fn luks2_metadata_that_asks_too_much_is_refused() {
    if !have_cryptsetup() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let img = dir.path().join("h.img");
    let f = fs::File::create(&img).expect("create");
    f.set_len(16 * MIB + 4096).expect("size");
    drop(f);
    run_with_stdin(
        "cryptsetup",
        &[
            "luksFormat",
            "--type",
            "luks2",
            "--batch-mode",
            "--key-file",
            "-",
            "--pbkdf",
            "argon2id",
            "--pbkdf-force-iterations",
            "4",
            "--pbkdf-memory",
            "1024",
            "--pbkdf-parallel",
            "1",
            p(&img),
        ],
        PASS.as_bytes(),
    );
    let good = read_file(&img);
    // Rewrite the JSON of the primary header, fix its checksum, and drop the secondary copy.
    let json_end = 4096 + good[4096..16384].iter().position(|&b| b == 0).expect("NUL");
    let json = String::from_utf8(good[4096..json_end].to_vec()).expect("UTF-8");
    let cases = [
        ("\"memory\":1024", "\"memory\":4194304", "Argon2 memory"),
        ("\"time\":4", "\"time\":100000", "Argon2 time cost"),
        ("\"stripes\":4000", "\"stripes\":4000000000", "stripes"),
        (
            "\"offset\":\"16777216\"",
            "\"offset\":\"99999999999\"",
            "segment offset",
        ),
        (
            "\"offset\":\"32768\"",
            "\"offset\":\"99999999999\"",
            "keyslot area",
        ),
        ("\"keyslots\":{", "\"keyslots\":", "broken JSON"),
    ];
    for (from, to, what) in cases {
        assert!(json.contains(from), "{what}: {from} not in {json}");
        let new = json.replacen(from, to, 1);
        let mut b = good.clone();
        b[4096..16384].fill(0);
        b[4096..4096 + new.len()].copy_from_slice(new.as_bytes());
        b[448..512].fill(0);
        let sum = {
            use sha2::Digest;
            sha2::Sha256::digest(&b[..16384])
        };
        b[448..480].copy_from_slice(&sum);
        b[16384..32768].fill(0);
        let e = open_bytes(dir.path(), &b, Some(PASS)).expect_err(what);
        assert!(
            matches!(
                e.kind(),
                ErrorKind::Invalid | ErrorKind::Limit | ErrorKind::Unsupported
            ),
            "{what}: {e}"
        );
    }
    // A file whose payload ends in a partial sector shows whole sectors only.
    let mut b = good.clone();
    b.extend_from_slice(&[0u8; 100]);
    let path = dir.path().join("odd.img");
    fs::write(&path, &b).expect("write");
    let odd = open_key(&path, PASS).expect("open");
    assert_eq!(odd.virtual_size(), 4096);
    read_image(&odd);
    // A damaged primary copy falls back to the secondary.
    let mut b = good.clone();
    b[4096 + 10] ^= 1;
    open_bytes(dir.path(), &b, Some(PASS)).expect("secondary header copy");
}

#[test]
fn resizing_a_luks_volume_reads_zeroes_in_the_new_part_as_qemu_img_does() {
    let dir = tempfile::tempdir().expect("tempdir");
    let luks = dir.path().join("r.luks");
    let img = Image::create(
        &luks,
        Format::Luks,
        &create_opts("key-secret=sec0,iter-time=1", MIB, PASS),
    )
    .expect("create");
    img.write_at(&[0xee; 4096], MIB - 4096).expect("write");
    img.close().expect("close");
    let img = Image::open(&luks, &OpenOptions::new().write(true).secret(secret(PASS))).expect("rw");
    img.resize(2 * MIB).expect("grow");
    img.close().expect("close");
    let mut expect = vec![0u8; 2 * MIB as usize];
    expect[MIB as usize - 4096..MIB as usize].fill(0xee);
    let raw = dir.path().join("expect.raw");
    fs::write(&raw, &expect).expect("write");
    let (code, out) = qemu_compare_luks(&luks, "luks", &raw);
    assert_eq!(code, 0, "{out}");
    assert!(read_image(&open_key(&luks, PASS).expect("open")) == expect);
}
