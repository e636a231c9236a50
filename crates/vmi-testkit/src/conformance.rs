//! The conformance suite every writable format runs: read-after-write, zero ranges read as zero,
//! `block_status` agrees with reads, reopen preserves data, resize semantics.
//!
//! A format's test calls [`run`] with its format and `-o` options.

use crate::fixtures::pattern;
use std::path::Path;
use vmi_disk::{
    BlockKind, CreateOptions, Format, FormatOptions, Image, OpenOptions, Secret, Secrets,
};

/// Virtual size of the conformance image: a few allocation units of every format plus an odd tail.
pub const SIZE: u64 = 64 * 1024 * 1024;

/// Which optional parts of the suite a format supports.
#[derive(Debug, Clone, Copy, Default)]
pub struct Caps {
    /// Writes may arrive in any order (false for streamOptimized VMDK).
    pub random_writes: bool,
    /// Growing the image works.
    pub grow: bool,
}

fn opts(o: &str, size: u64, key: Option<&Secret>) -> CreateOptions {
    let mut fo = FormatOptions::new();
    fo.parse(o).expect("valid -o");
    if let Some(k) = key {
        let mut s = Secrets::new();
        s.insert(KEY_ID, k.clone()).expect("one secret");
        fo.set_secrets(s);
    }
    CreateOptions::new(size).options(fo)
}

/// The id under which [`run_keyed`] passes its key to `-o` (`key-secret=sec0`,
/// `encrypt.key-secret=sec0`).
pub const KEY_ID: &str = "sec0";

/// Run the whole suite in `dir`.
pub fn run(dir: &Path, format: Format, o: &str, caps: Caps) {
    run_keyed(dir, format, o, caps, None);
}

/// The suite for an encrypted image: `o` names the key as [`KEY_ID`] (e.g.
/// `key-secret=sec0`), and every reopen passes `key`.
pub fn run_keyed(dir: &Path, format: Format, o: &str, caps: Caps, key: Option<Secret>) {
    let open = |write: bool| {
        OpenOptions::new()
            .format(Some(format))
            .write(write)
            .secret(key.clone())
    };
    let path = dir.join(format!("conf.{}", format.name()));
    // Writes at unaligned offsets, across unit boundaries, at the very end, and a zeroed range.
    let writes: Vec<(u64, Vec<u8>)> = if caps.random_writes {
        vec![
            (SIZE - 4096, pattern(1, 4096)),
            (0, pattern(2, 512)),
            (65536 - 100, pattern(3, 300)),
            (3 * 1024 * 1024 + 7, pattern(4, 2 * 1024 * 1024 + 13)),
            (40 * 1024 * 1024, vec![0u8; 128 * 1024]),
            (20 * 1024 * 1024, pattern(5, 1024 * 1024)),
        ]
    } else {
        vec![
            (0, pattern(2, 1024 * 1024)),
            (3 * 1024 * 1024, pattern(4, 2 * 1024 * 1024)),
            (40 * 1024 * 1024, vec![0u8; 128 * 1024]),
            (SIZE - 1024 * 1024, pattern(1, 1024 * 1024)),
        ]
    };
    let mut expect = vec![0u8; SIZE as usize];
    {
        let img = Image::create(&path, format, &opts(o, SIZE, key.as_ref())).expect("create");
        assert_eq!(img.virtual_size(), SIZE, "virtual size after create");
        for (off, data) in &writes {
            img.write_at(data, *off).expect("write");
            expect[*off as usize..*off as usize + data.len()].copy_from_slice(data);
        }
        if caps.random_writes {
            // Read-after-write before any flush.
            let (off, data) = &writes[3];
            let mut buf = vec![0u8; data.len()];
            img.read_at(&mut buf, *off).expect("read back");
            assert!(buf == *data, "read-after-write mismatch at {off}");
            // Zeroing a written range.
            img.write_zeroes(20 * 1024 * 1024 + 65536, 131072)
                .expect("write_zeroes");
            expect[20 * 1024 * 1024 + 65536..20 * 1024 * 1024 + 65536 + 131072].fill(0);
        }
        img.close().expect("close");
    }
    // Reopen and compare everything, and check the map agrees with the data.
    let img = Image::open(&path, &open(false)).expect("reopen");
    assert_eq!(img.virtual_size(), SIZE);
    let got = crate::fixtures::read_image(&img);
    if let Some(i) = got.iter().zip(&expect).position(|(a, b)| a != b) {
        panic!(
            "{format}: byte {i} reads {:#04x}, wrote {:#04x}",
            got[i], expect[i]
        );
    }
    let mut off = 0;
    while off < SIZE {
        let st = img.block_status(off, SIZE - off).expect("block_status");
        assert!(st.len > 0 && st.start == off);
        let range = &got[off as usize..(off + st.len) as usize];
        if matches!(st.kind, BlockKind::Zero | BlockKind::Unallocated) {
            assert!(
                range.iter().all(|&b| b == 0),
                "{format}: map says zero at {off}+{} but data reads",
                st.len
            );
        }
        off += st.len;
    }
    drop(img);
    if caps.grow {
        let img = Image::open(&path, &open(true)).expect("open rw");
        img.resize(SIZE * 2).expect("grow");
        let mut tail = vec![1u8; 65536];
        img.read_at(&mut tail, SIZE * 2 - 65536)
            .expect("read grown tail");
        assert!(
            tail.iter().all(|&b| b == 0),
            "{format}: grown area must read as zero"
        );
        img.close().expect("close");
        let img = Image::open(&path, &open(false)).expect("reopen");
        assert_eq!(img.virtual_size(), SIZE * 2);
        let mut head = vec![0u8; 512];
        img.read_at(&mut head, 0).expect("read");
        assert_eq!(&head[..], &expect[..512]);
    }
}
