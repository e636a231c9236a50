//! LUKS encrypted volumes (qemu's `luks` driver): a LUKS1 header (cryptsetup's "LUKS On-Disk
//! Format Specification" 1.2.3) or LUKS2 header (cryptsetup's "LUKS2 On-Disk Format
//! Specification") followed by the payload, the guest data encrypted sector by sector.
//!
//! Guest offset `g` is stored at file offset `payload_offset + g`, encrypted with the volume key;
//! the IV of each 512-byte sector is its guest sector number. The same LUKS header (version 1)
//! also protects qcow2 images with `encrypt.format=luks` ([`unlock_region`]).
//!
//! Without the passphrase an image still opens, for `info`, and its data cannot be read.

pub(crate) mod crypto;
pub(crate) mod luks1;
pub(crate) mod luks2;
pub(crate) mod storage;

use crate::driver::{Driver, FormatInfo, MapKind, Mapping};
use crate::error::{Error, ErrorKind, Result};
use crate::formats::{Confidence, CreateContext, Format, OpenContext, ProbeInput};
use crate::options::{CreateOptions, FormatOptions};
use crate::secret::Secret;
use crate::storage::Storage;
use crypto::{CipherSpec, Hash, IvGen, Mode, SectorCipher};
use std::any::Any;
use std::sync::Arc;
use storage::CryptStorage;

/// Named limits on what a LUKS header may ask for: each bounds memory or CPU time spent on an
/// untrusted header before the passphrase is known to be right.
pub(crate) mod limits {
    /// Longest volume key: 64 bytes, AES-256 in XTS mode (two 256-bit keys), the longest cipher
    /// vmi implements.
    pub const MAX_KEY_BYTES: usize = 64;
    /// Most key material one slot may have: 4 MiB. qemu and cryptsetup write 4000 stripes of at
    /// most 64 bytes (256000 bytes); this bounds the buffer a hostile stripe count would need.
    pub const MAX_KEY_MATERIAL: u64 = 4 << 20;
    /// Most PBKDF2 iterations vmi computes for one slot or digest: 2^24 (16.7 million), a few
    /// seconds of SHA-256. cryptsetup's default 2-second benchmark gives one to a few million on
    /// current machines; a header asking for up to 4.29 billion would take hours.
    pub const MAX_PBKDF2_ITERATIONS: u32 = 1 << 24;
    /// Most PBKDF2 iterations one unlock may need over all slots and digest checks: 2^26, four
    /// times the per-slot cap, so that eight hostile slots cannot add up to minutes.
    pub const MAX_UNLOCK_ITERATIONS: u64 = 1 << 26;
}

/// The message for an encrypted image opened without its key.
pub(crate) fn missing_key(path: &std::path::Path, prefix: &str) -> Error {
    Error::usage(format!(
        "image {} is encrypted: give its key with --object secret,id=ID,data=...|file=... and {prefix}key-secret=ID (or --key-file)",
        path.display()
    ))
}

pub(crate) fn probe(input: &ProbeInput) -> Option<Confidence> {
    let head = input.head;
    if head.len() < 8 || head[..6] != luks1::MAGIC {
        return None;
    }
    match u16::from_be_bytes([head[6], head[7]]) {
        1 => Some(if luks1::parse(head, input.len, true).is_ok() {
            Confidence::Certain
        } else {
            Confidence::Weak
        }),
        2 => Some(if luks2::parse_binary(head).is_ok() {
            Confidence::Certain
        } else {
            Confidence::Weak
        }),
        _ => Some(Confidence::Weak),
    }
}

/// A parsed LUKS header of either version.
#[derive(Debug)]
pub(crate) enum Volume {
    V1(Box<luks1::Header>),
    V2(luks2::Header),
}

impl Volume {
    /// Parse the header at `base` in `st`, whose key material lies within `region` bytes.
    pub(crate) fn read(st: &dyn Storage, base: u64, region: u64, raw: bool) -> Result<Volume> {
        let mut head = vec![0u8; region.min(luks2::BINARY_LEN) as usize];
        st.read_at(&mut head, base)
            .map_err(|e| Error::io("reading LUKS header", e))?;
        if head.len() < 8 || head[..6] != luks1::MAGIC {
            return Err(Error::invalid("not a LUKS volume (bad magic)"));
        }
        match u16::from_be_bytes([head[6], head[7]]) {
            1 => Ok(Volume::V1(Box::new(luks1::parse(&head, region, raw)?))),
            2 if raw => Ok(Volume::V2(luks2::Header::read(st, region)?)),
            v => Err(Error::unsupported(format!("LUKS version {v}"))),
        }
    }

    fn payload_offset(&self) -> u64 {
        match self {
            Volume::V1(h) => h.payload_offset,
            Volume::V2(h) => h.payload_offset,
        }
    }

    /// Bytes per encryption sector of the payload: the guest size is a whole number of them.
    fn sector_size(&self) -> u64 {
        match self {
            Volume::V1(_) => crypto::SECTOR_SIZE,
            Volume::V2(h) => h.sector_size,
        }
    }

    fn spec(&self) -> CipherSpec {
        match self {
            Volume::V1(h) => h.spec,
            Volume::V2(h) => h.spec,
        }
    }

    /// The cipher the passphrase unlocks.
    pub(crate) fn unlock(
        &self,
        st: &dyn Storage,
        base: u64,
        secret: &Secret,
    ) -> Result<SectorCipher> {
        match self {
            Volume::V1(h) => SectorCipher::new(self.spec(), &h.unlock(st, base, secret.expose())?),
            Volume::V2(h) => h.payload_cipher(&h.unlock(st, secret.expose())?),
        }
    }

    /// qemu's `format-specific` data of the LUKS header.
    pub(crate) fn info(&self) -> serde_json::Value {
        match self {
            Volume::V1(h) => h.info(),
            Volume::V2(h) => h.info(),
        }
    }
}

/// An open LUKS volume.
#[derive(Debug)]
pub struct LuksDriver {
    st: Arc<dyn Storage>,
    /// The payload, decrypted; `None` when opened without the key.
    crypt: Option<CryptStorage>,
    path: std::path::PathBuf,
    payload: u64,
    size: std::sync::atomic::AtomicU64,
    info: serde_json::Value,
    writable: bool,
}

pub(crate) fn open(storage: Box<dyn Storage>, ctx: &OpenContext) -> Result<Box<dyn Driver>> {
    let st: Arc<dyn Storage> = Arc::from(storage);
    let file_len = st.len().map_err(|e| Error::io("reading file size", e))?;
    let vol = Volume::read(st.as_ref(), 0, file_len, true)?;
    let payload = vol.payload_offset();
    if payload > file_len {
        return Err(Error::invalid(format!(
            "LUKS payload offset {payload} lies past the end of the file ({file_len} bytes)"
        )));
    }
    let crypt = match &ctx.secret {
        Some(s) => {
            let cipher = vol.unlock(st.as_ref(), 0, s)?;
            Some(CryptStorage::new(
                Arc::clone(&st),
                Arc::new(cipher),
                payload,
            ))
        }
        None if ctx.writable => return Err(missing_key(&ctx.path, "")),
        None => None,
    };
    Ok(Box::new(LuksDriver {
        crypt,
        path: ctx.path.clone(),
        payload,
        // A partial last sector cannot be decrypted: the guest sees whole sectors only.
        size: ((file_len - payload) / vol.sector_size() * vol.sector_size()).into(),
        info: vol.info(),
        writable: ctx.writable,
        st,
    }))
}

/// Parsed `-o` options of a new LUKS header (qemu's `QCryptoBlockCreateOptionsLUKS`), with the
/// option names under `prefix` (`""` for `-f luks`, `"encrypt."` for qcow2).
pub(crate) struct NewLuks {
    pub spec: CipherSpec,
    pub hash: Hash,
    pub iter_time: u64,
    pub secret: Secret,
}

/// qemu's default PBKDF2 time per key slot, in milliseconds.
const DEFAULT_ITER_TIME_MS: u64 = 2000;

impl NewLuks {
    /// Read the LUKS creation options (`key-secret`, `cipher-alg`, `cipher-mode`, `ivgen-alg`,
    /// `ivgen-hash-alg`, `hash-alg`, `iter-time`) under `prefix`.
    pub(crate) fn from_options(o: &FormatOptions, prefix: &str) -> Result<NewLuks> {
        let k = |n: &str| format!("{prefix}{n}");
        let secret = o.secret(&k("key_secret"))?.ok_or_else(|| {
            Error::usage(format!(
                "parameter '{prefix}key-secret' is required for cipher"
            ))
        })?;
        let alg = o
            .choice(&k("cipher_alg"), &["aes-128", "aes-192", "aes-256"])?
            .unwrap_or_else(|| "aes-256".into());
        let mode = match o.choice(&k("cipher_mode"), &["xts", "cbc"])?.as_deref() {
            Some("cbc") => Mode::Cbc,
            _ => Mode::Xts,
        };
        let ivhash = o
            .str(&k("ivgen_hash_alg"))
            .map(|h| Hash::parse(&h))
            .transpose()?;
        let ivgen = match o
            .choice(&k("ivgen_alg"), &["plain", "plain64", "essiv"])?
            .as_deref()
        {
            Some("plain") => IvGen::Plain,
            Some("essiv") => IvGen::Essiv(ivhash.unwrap_or(Hash::Sha256)),
            _ => IvGen::Plain64,
        };
        let hash = o
            .str(&k("hash_alg"))
            .map(|h| Hash::parse(&h))
            .transpose()?
            .unwrap_or(Hash::Sha256);
        let iter_time = o.u64(&k("iter_time"))?.unwrap_or(DEFAULT_ITER_TIME_MS);
        let aes: usize = match alg.as_str() {
            "aes-128" => 16,
            "aes-192" => 24,
            _ => 32,
        };
        let key_bytes = if mode == Mode::Xts { aes * 2 } else { aes };
        let mode_s = match mode {
            Mode::Xts => "xts",
            Mode::Cbc => "cbc",
        };
        let iv_s = match ivgen {
            IvGen::Plain => "plain".to_string(),
            IvGen::Plain64 => "plain64".to_string(),
            IvGen::Essiv(h) => format!("essiv:{}", h.name()),
        };
        let spec = CipherSpec::parse("aes", &format!("{mode_s}-{iv_s}"), key_bytes)?;
        Ok(NewLuks {
            spec,
            hash,
            iter_time,
            secret,
        })
    }

    /// Build the header area (exactly the payload offset long) and the payload cipher.
    pub(crate) fn build(&self) -> Result<(Vec<u8>, SectorCipher)> {
        let (area, key) =
            luks1::create(self.spec, self.hash, self.secret.expose(), self.iter_time)?;
        let cipher = SectorCipher::new(self.spec, &key)?;
        Ok((area, cipher))
    }
}

pub(crate) fn create(
    storage: Box<dyn Storage>,
    ctx: &CreateContext,
    opts: &CreateOptions,
) -> Result<Box<dyn Driver>> {
    let o = &opts.options;
    let new = NewLuks::from_options(o, "")?;
    match o.str("preallocation").as_deref() {
        None | Some("off") => {}
        Some(p) => {
            return Err(Error::unsupported(format!(
                "preallocation={p} for luks images (only off)"
            )))
        }
    }
    o.finish("luks")?;
    if opts.backing.is_some() {
        return Err(Error::usage("luks images have no backing file"));
    }
    let (area, cipher) = new.build()?;
    let st: Arc<dyn Storage> = Arc::from(storage);
    let io = |what: &'static str| move |e| Error::io(what, e);
    st.write_at(&area, 0).map_err(io("writing LUKS header"))?;
    let payload = area.len() as u64;
    let end = payload
        .checked_add(opts.size)
        .ok_or_else(|| Error::usage("image size overflows"))?;
    let crypt = CryptStorage::new(Arc::clone(&st), Arc::new(cipher), payload);
    // A sparse payload would decrypt to noise: store encrypted zeroes, as a guest expects.
    crate::storage::write_zero_bytes(&crypt, payload, opts.size)
        .map_err(io("writing the LUKS payload"))?;
    st.set_len(end).map_err(io("sizing the LUKS payload"))?;
    st.sync().map_err(io("syncing"))?;
    let vol = Volume::read(st.as_ref(), 0, end, true)?;
    Ok(Box::new(LuksDriver {
        crypt: Some(crypt),
        path: ctx.path.clone(),
        payload,
        size: opts.size.into(),
        info: vol.info(),
        writable: true,
        st,
    }))
}

impl LuksDriver {
    fn crypt(&self) -> Result<&CryptStorage> {
        self.crypt
            .as_ref()
            .ok_or_else(|| missing_key(&self.path, ""))
    }

    fn host(&self, offset: u64) -> Result<u64> {
        self.payload
            .checked_add(offset)
            .ok_or_else(|| Error::usage("offset overflow"))
    }
}

impl Driver for LuksDriver {
    fn format(&self) -> Format {
        Format::Luks
    }

    fn virtual_size(&self) -> u64 {
        self.size.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn map(&self, offset: u64, len: u64) -> Result<Mapping> {
        self.crypt()?;
        Ok(Mapping {
            start: offset,
            len: len.min(self.virtual_size().saturating_sub(offset)).max(1),
            kind: MapKind::Data {
                file: 1,
                offset: self.host(offset)?,
            },
        })
    }

    fn file(&self, index: usize) -> Result<&dyn Storage> {
        match index {
            0 => Ok(self.st.as_ref()),
            1 => Ok(self.crypt()?),
            _ => Err(Error::invalid(format!("luks image has no file {index}"))),
        }
    }

    fn info(&self) -> FormatInfo {
        FormatInfo {
            format_specific: serde_json::json!({"type": "luks", "data": self.info}),
            ..FormatInfo::default()
        }
    }

    fn is_writable(&self) -> bool {
        self.writable
    }

    fn write_at(&self, buf: &[u8], offset: u64, _backing: Option<&crate::Image>) -> Result<()> {
        if !self.writable {
            return Err(Error::usage("luks image is not open for writing"));
        }
        self.crypt()?
            .write_at(buf, self.host(offset)?)
            .map_err(|e| Error::io(format!("writing encrypted data at {offset:#x}"), e))
    }

    fn flush(&self) -> Result<()> {
        self.st.sync().map_err(|e| Error::io("syncing", e))
    }

    fn resize(&self, new_size: u64) -> Result<()> {
        if !self.writable {
            return Err(Error::usage("luks image is not open for writing"));
        }
        let old = self.virtual_size();
        let crypt = self.crypt()?;
        let end = self.host(new_size)?;
        self.st.set_len(end).map_err(|e| Error::io("resizing", e))?;
        if new_size > old {
            crate::storage::write_zero_bytes(crypt, self.host(old)?, new_size - old)
                .map_err(|e| Error::io("writing encrypted zeroes", e))?;
        }
        self.size
            .store(new_size, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// Whether an error means the passphrase was wrong (for callers that retry or explain).
pub fn is_wrong_key(e: &Error) -> bool {
    e.kind() == ErrorKind::Refused && e.message().contains("cannot unlock")
}

/// The LUKS header inside a qcow2 image (`encrypt.format=luks`, header extension 0x0537be77):
/// what `info` shows, and the data clusters' view when the key was given.
#[derive(Debug)]
pub(crate) struct Embedded {
    /// qemu's `encrypt` block of the qcow2 format-specific data.
    pub info: serde_json::Value,
    /// Encrypted view of the image file (IVs from host offsets); `None` without the key.
    pub data: Option<Arc<dyn Storage>>,
    path: std::path::PathBuf,
}

/// Most bytes a qcow2 image's LUKS header area may span: 64 MiB (qemu writes about 2 MiB).
const MAX_EMBEDDED_HEADER: u64 = 64 << 20;

impl Embedded {
    /// The data view, or the "give its key" error.
    pub(crate) fn data(&self) -> Result<&Arc<dyn Storage>> {
        self.data
            .as_ref()
            .ok_or_else(|| missing_key(&self.path, "encrypt."))
    }
}

/// Open the LUKS header at `offset` (`len` bytes, cluster-aligned inside a file of `file_len`
/// bytes) of a qcow2 image and unlock it with the context's secret.
pub(crate) fn open_embedded(
    st: &Arc<dyn Storage>,
    ctx: &OpenContext,
    offset: u64,
    len: u64,
    cluster_size: u64,
    file_len: u64,
) -> Result<Embedded> {
    if offset == 0 || offset % cluster_size != 0 {
        return Err(Error::invalid(format!(
            "qcow2 LUKS header offset {offset:#x} is not a non-zero multiple of the cluster size"
        )));
    }
    if len > MAX_EMBEDDED_HEADER {
        return Err(Error::limit(format!(
            "qcow2 LUKS header of {len} bytes, more than {MAX_EMBEDDED_HEADER}"
        )));
    }
    if offset.checked_add(len).is_none_or(|e| e > file_len) {
        return Err(Error::invalid(format!(
            "qcow2 LUKS header at {offset:#x} ({len} bytes) lies past the end of the file"
        )));
    }
    let vol = Volume::read(st.as_ref(), offset, len, false)?;
    let data: Option<Arc<dyn Storage>> = match &ctx.secret {
        Some(s) => {
            let cipher = vol.unlock(st.as_ref(), offset, s)?;
            Some(Arc::new(CryptStorage::new(
                Arc::clone(st),
                Arc::new(cipher),
                0,
            )))
        }
        None if ctx.writable => return Err(missing_key(&ctx.path, "encrypt.")),
        None => None,
    };
    Ok(Embedded {
        info: encrypt_info(vol.info()),
        data,
        path: ctx.path.clone(),
    })
}

/// qemu's qcow2 `encrypt` block: the LUKS info with `"format": "luks"` after the UUID.
fn encrypt_info(luks: serde_json::Value) -> serde_json::Value {
    let mut out = serde_json::Map::new();
    if let serde_json::Value::Object(m) = luks {
        for (k, v) in m {
            let uuid = k == "uuid";
            out.insert(k, v);
            if uuid {
                out.insert("format".into(), "luks".into());
            }
        }
    }
    serde_json::Value::Object(out)
}

/// A new qcow2 LUKS header from `-o encrypt.*` options, when `encrypt.format=luks` (or the old
/// `encryption=on`, refused as qemu refuses creating legacy AES): the header area, and the
/// cipher for data clusters.
pub(crate) fn create_embedded(o: &FormatOptions) -> Result<Option<(Vec<u8>, SectorCipher)>> {
    if o.bool("encryption")?.unwrap_or(false) {
        return Err(Error::unsupported(
            "encryption=on (legacy qcow2 AES) is not supported: use encrypt.format=luks",
        ));
    }
    match o.str("encrypt.format").as_deref() {
        None => Ok(None),
        Some("luks") => NewLuks::from_options(o, "encrypt.")?.build().map(Some),
        Some("aes") => Err(Error::unsupported(
            "encrypt.format=aes (legacy qcow2 AES) is not supported: use encrypt.format=luks",
        )),
        Some(f) => Err(Error::usage(format!(
            "encrypt.format={f}: only luks is supported"
        ))),
    }
}

/// The encrypted view of a new qcow2 image's file.
pub(crate) fn embedded_data(st: &Arc<dyn Storage>, cipher: SectorCipher) -> Arc<dyn Storage> {
    Arc::new(CryptStorage::new(Arc::clone(st), Arc::new(cipher), 0))
}

/// `Embedded` for a newly created qcow2 image.
pub(crate) fn embedded_new(
    st: &Arc<dyn Storage>,
    offset: u64,
    len: u64,
    data: Arc<dyn Storage>,
    path: &std::path::Path,
) -> Result<Embedded> {
    let vol = Volume::read(st.as_ref(), offset, len, false)?;
    Ok(Embedded {
        info: encrypt_info(vol.info()),
        data: Some(data),
        path: path.to_path_buf(),
    })
}
