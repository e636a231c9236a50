//! The cryptography LUKS needs, over RustCrypto crates: the hash names LUKS headers use, PBKDF2,
//! the anti-forensic splitter (cryptsetup's `AF_split`/`AF_merge`, LUKS1 spec section 2.4), and
//! the sector cipher: AES in XTS or CBC mode with dm-crypt's IV generators `plain`, `plain64` and
//! `essiv:<hash>` (qemu `crypto/ivgen-*.c`), over 512-byte sectors.

use crate::error::{Error, Result};
use aes::cipher::{BlockDecryptMut, BlockEncrypt, BlockEncryptMut, InnerIvInit, KeyInit};
use aes::{Aes128, Aes192, Aes256};
use sha2::Digest;
use zeroize::Zeroizing;

/// Sector size of the LUKS payload and key material: IVs count 512-byte sectors.
pub const SECTOR_SIZE: u64 = 512;
/// AES block size.
const BLOCK: usize = 16;

/// A hash algorithm named in a LUKS header (`hash-spec`, ESSIV hash, LUKS2 digests).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hash {
    /// SHA-1 (cryptsetup's LUKS1 default before 1.7).
    Sha1,
    /// SHA-224.
    Sha224,
    /// SHA-256 (qemu's and cryptsetup's default).
    Sha256,
    /// SHA-384.
    Sha384,
    /// SHA-512.
    Sha512,
}

impl Hash {
    /// Parse a header's hash name.
    pub fn parse(name: &str) -> Result<Hash> {
        Ok(match name.to_ascii_lowercase().as_str() {
            "sha1" => Hash::Sha1,
            "sha224" => Hash::Sha224,
            "sha256" => Hash::Sha256,
            "sha384" => Hash::Sha384,
            "sha512" => Hash::Sha512,
            _ => {
                return Err(Error::unsupported(format!(
                    "LUKS hash algorithm '{name}' (supported: sha1, sha224, sha256, sha384, sha512)"
                )))
            }
        })
    }

    /// The name qemu prints.
    pub fn name(self) -> &'static str {
        match self {
            Hash::Sha1 => "sha1",
            Hash::Sha224 => "sha224",
            Hash::Sha256 => "sha256",
            Hash::Sha384 => "sha384",
            Hash::Sha512 => "sha512",
        }
    }

    /// Digest length in bytes.
    pub fn len(self) -> usize {
        match self {
            Hash::Sha1 => 20,
            Hash::Sha224 => 28,
            Hash::Sha256 => 32,
            Hash::Sha384 => 48,
            Hash::Sha512 => 64,
        }
    }

    /// Digest of the concatenation of `parts`.
    pub fn digest(self, parts: &[&[u8]]) -> Zeroizing<Vec<u8>> {
        fn run<D: Digest>(parts: &[&[u8]]) -> Zeroizing<Vec<u8>> {
            let mut d = D::new();
            for p in parts {
                d.update(p);
            }
            Zeroizing::new(d.finalize().to_vec())
        }
        match self {
            Hash::Sha1 => run::<sha1::Sha1>(parts),
            Hash::Sha224 => run::<sha2::Sha224>(parts),
            Hash::Sha256 => run::<sha2::Sha256>(parts),
            Hash::Sha384 => run::<sha2::Sha384>(parts),
            Hash::Sha512 => run::<sha2::Sha512>(parts),
        }
    }

    /// PBKDF2-HMAC with this hash, filling `out`.
    pub fn pbkdf2(self, password: &[u8], salt: &[u8], rounds: u32, out: &mut [u8]) {
        use pbkdf2::pbkdf2_hmac;
        match self {
            Hash::Sha1 => pbkdf2_hmac::<sha1::Sha1>(password, salt, rounds, out),
            Hash::Sha224 => pbkdf2_hmac::<sha2::Sha224>(password, salt, rounds, out),
            Hash::Sha256 => pbkdf2_hmac::<sha2::Sha256>(password, salt, rounds, out),
            Hash::Sha384 => pbkdf2_hmac::<sha2::Sha384>(password, salt, rounds, out),
            Hash::Sha512 => pbkdf2_hmac::<sha2::Sha512>(password, salt, rounds, out),
        }
    }
}

/// The anti-forensic diffusion: each digest-sized block `i` of `buf` becomes `H(be32(i) || block)`,
/// the last partial block truncated.
fn diffuse(hash: Hash, buf: &mut [u8]) {
    let ds = hash.len();
    for (i, chunk) in buf.chunks_mut(ds).enumerate() {
        let iv = (i as u32).to_be_bytes();
        let d = hash.digest(&[&iv, chunk]);
        let n = chunk.len();
        chunk.copy_from_slice(&d[..n]);
    }
}

/// Merge `stripes` stripes of `key_len` bytes (`split`, exactly `key_len * stripes` bytes) back into
/// the key they were split from.
pub fn af_merge(hash: Hash, split: &[u8], key_len: usize, stripes: usize) -> Zeroizing<Vec<u8>> {
    let mut d = Zeroizing::new(vec![0u8; key_len]);
    for (i, stripe) in split.chunks_exact(key_len).take(stripes).enumerate() {
        for (a, b) in d.iter_mut().zip(stripe) {
            *a ^= b;
        }
        if i + 1 < stripes {
            diffuse(hash, &mut d);
        }
    }
    d
}

/// Split `key` into `stripes` stripes (all random but the last), the inverse of [`af_merge`].
pub fn af_split(hash: Hash, key: &[u8], stripes: usize) -> Zeroizing<Vec<u8>> {
    use rand::RngCore;
    let n = key.len();
    let mut out = Zeroizing::new(vec![0u8; n * stripes]);
    let mut d = Zeroizing::new(vec![0u8; n]);
    let (random, last) = out.split_at_mut(n * (stripes - 1));
    rand::rngs::OsRng.fill_bytes(random);
    for stripe in random.chunks_exact(n) {
        for (a, b) in d.iter_mut().zip(stripe) {
            *a ^= b;
        }
        diffuse(hash, &mut d);
    }
    for ((o, a), b) in last.iter_mut().zip(d.iter()).zip(key) {
        *o = a ^ b;
    }
    out
}

/// Block cipher mode of a LUKS cipher spec.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// XEX-based tweaked codebook with ciphertext stealing (the default).
    Xts,
    /// Cipher block chaining.
    Cbc,
}

/// IV generator of a LUKS cipher spec (dm-crypt's names).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IvGen {
    /// The low 32 bits of the sector number, little-endian.
    Plain,
    /// The 64-bit sector number, little-endian.
    Plain64,
    /// The sector number encrypted with a key that is the hash of the volume key.
    Essiv(Hash),
}

/// A parsed cipher specification: `aes` + `xts-plain64` and a key length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CipherSpec {
    /// Bytes of the volume key (twice the AES key for XTS).
    pub key_bytes: usize,
    /// The mode.
    pub mode: Mode,
    /// The IV generator.
    pub ivgen: IvGen,
    /// An ESSIV hash given with `plain`/`plain64` (ignored, as dm-crypt does), kept for `info`.
    pub iv_hash: Option<Hash>,
}

impl CipherSpec {
    /// Parse a header's cipher name (`aes`) and mode (`xts-plain64`, `cbc-essiv:sha256`).
    pub fn parse(cipher: &str, mode: &str, key_bytes: usize) -> Result<CipherSpec> {
        if !cipher.eq_ignore_ascii_case("aes") {
            return Err(Error::unsupported(format!(
                "LUKS cipher '{cipher}' (only aes is supported)"
            )));
        }
        let (m, iv) = mode.split_once('-').ok_or_else(|| {
            Error::invalid(format!("LUKS cipher mode '{mode}' has no IV generator"))
        })?;
        let mode = match m {
            "xts" => Mode::Xts,
            "cbc" => Mode::Cbc,
            _ => {
                return Err(Error::unsupported(format!(
                    "LUKS cipher mode '{m}' (supported: xts, cbc)"
                )))
            }
        };
        let (ivname, ivhash) = match iv.split_once(':') {
            Some((n, h)) => (n, Some(Hash::parse(h)?)),
            None => (iv, None),
        };
        let ivgen = match ivname {
            "plain" => IvGen::Plain,
            "plain64" => IvGen::Plain64,
            "essiv" => IvGen::Essiv(ivhash.ok_or_else(|| {
                Error::invalid("LUKS cipher mode essiv names no hash (essiv:sha256)")
            })?),
            _ => {
                return Err(Error::unsupported(format!(
                    "LUKS IV generator '{ivname}' (supported: plain, plain64, essiv)"
                )))
            }
        };
        let aes_bytes = match mode {
            Mode::Xts => key_bytes / 2,
            Mode::Cbc => key_bytes,
        };
        let valid = matches!(aes_bytes, 16 | 24 | 32) && (mode != Mode::Xts || key_bytes % 2 == 0);
        if !valid {
            return Err(Error::unsupported(format!(
                "LUKS key of {key_bytes} bytes for aes-{m}"
            )));
        }
        if let IvGen::Essiv(h) = ivgen {
            if !matches!(h.len(), 16 | 24 | 32) {
                return Err(Error::unsupported(format!(
                    "ESSIV with {}: no AES key of {} bytes",
                    h.name(),
                    h.len()
                )));
            }
        }
        Ok(CipherSpec {
            key_bytes,
            mode,
            ivgen,
            iv_hash: ivhash,
        })
    }

    /// The mode string as a LUKS header stores it (`xts-plain64`).
    pub fn mode_string(&self) -> String {
        let m = match self.mode {
            Mode::Xts => "xts",
            Mode::Cbc => "cbc",
        };
        match (self.ivgen, self.iv_hash) {
            (IvGen::Plain, None) => format!("{m}-plain"),
            (IvGen::Plain64, None) => format!("{m}-plain64"),
            (IvGen::Plain, Some(h)) => format!("{m}-plain:{}", h.name()),
            (IvGen::Plain64, Some(h)) => format!("{m}-plain64:{}", h.name()),
            (IvGen::Essiv(h), _) => format!("{m}-essiv:{}", h.name()),
        }
    }

    /// qemu's `cipher-alg` name (`aes-256`).
    pub fn alg_name(&self) -> &'static str {
        let aes = match self.mode {
            Mode::Xts => self.key_bytes / 2,
            Mode::Cbc => self.key_bytes,
        };
        match aes {
            16 => "aes-128",
            24 => "aes-192",
            _ => "aes-256",
        }
    }

    /// qemu's `cipher-mode` name.
    pub fn mode_name(&self) -> &'static str {
        match self.mode {
            Mode::Xts => "xts",
            Mode::Cbc => "cbc",
        }
    }

    /// qemu's `ivgen-alg` name.
    pub fn ivgen_name(&self) -> &'static str {
        match self.ivgen {
            IvGen::Plain => "plain",
            IvGen::Plain64 => "plain64",
            IvGen::Essiv(_) => "essiv",
        }
    }
}

/// AES with a key length chosen at run time.
#[derive(Clone)]
enum AnyAes {
    A128(Aes128),
    A192(Aes192),
    A256(Aes256),
}

impl AnyAes {
    fn new(key: &[u8]) -> Result<AnyAes> {
        let bad = |_| Error::invalid("AES key of the wrong length");
        Ok(match key.len() {
            16 => AnyAes::A128(Aes128::new_from_slice(key).map_err(bad)?),
            24 => AnyAes::A192(Aes192::new_from_slice(key).map_err(bad)?),
            32 => AnyAes::A256(Aes256::new_from_slice(key).map_err(bad)?),
            n => return Err(Error::unsupported(format!("AES key of {n} bytes"))),
        })
    }

    fn encrypt_block(&self, b: &mut [u8; BLOCK]) {
        let b = aes::Block::from_mut_slice(b);
        match self {
            AnyAes::A128(c) => c.encrypt_block(b),
            AnyAes::A192(c) => c.encrypt_block(b),
            AnyAes::A256(c) => c.encrypt_block(b),
        }
    }
}

/// The payload cipher engine for one key.
enum Engine {
    Xts128(Box<xts_mode::Xts128<Aes128>>),
    Xts192(Box<xts_mode::Xts128<Aes192>>),
    Xts256(Box<xts_mode::Xts128<Aes256>>),
    Cbc(Box<AnyAes>),
}

/// Encrypts and decrypts whole 512-byte sectors with one volume (or slot) key.
pub struct SectorCipher {
    spec: CipherSpec,
    engine: Engine,
    essiv: Option<AnyAes>,
    /// Bytes per encryption sector: 512, or up to 4096 for LUKS2 segments.
    sector_size: u64,
    /// Added to every sector number (LUKS2 `iv_tweak`).
    iv_tweak: u64,
}

impl std::fmt::Debug for SectorCipher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SectorCipher")
            .field("spec", &self.spec)
            .finish_non_exhaustive()
    }
}

impl SectorCipher {
    /// A cipher for `spec` with `key` (exactly `spec.key_bytes` bytes).
    pub fn new(spec: CipherSpec, key: &[u8]) -> Result<SectorCipher> {
        if key.len() != spec.key_bytes {
            return Err(Error::invalid("LUKS key length does not match the cipher"));
        }
        let bad = |_| Error::invalid("AES key of the wrong length");
        let engine = match spec.mode {
            Mode::Xts => {
                let (k1, k2) = key.split_at(key.len() / 2);
                match k1.len() {
                    16 => Engine::Xts128(Box::new(xts_mode::Xts128::new(
                        Aes128::new_from_slice(k1).map_err(bad)?,
                        Aes128::new_from_slice(k2).map_err(bad)?,
                    ))),
                    24 => Engine::Xts192(Box::new(xts_mode::Xts128::new(
                        Aes192::new_from_slice(k1).map_err(bad)?,
                        Aes192::new_from_slice(k2).map_err(bad)?,
                    ))),
                    32 => Engine::Xts256(Box::new(xts_mode::Xts128::new(
                        Aes256::new_from_slice(k1).map_err(bad)?,
                        Aes256::new_from_slice(k2).map_err(bad)?,
                    ))),
                    n => {
                        return Err(Error::unsupported(format!(
                            "AES-XTS key of {} bytes",
                            2 * n
                        )))
                    }
                }
            }
            Mode::Cbc => Engine::Cbc(Box::new(AnyAes::new(key)?)),
        };
        let essiv = match spec.ivgen {
            IvGen::Essiv(h) => Some(AnyAes::new(&h.digest(&[key]))?),
            _ => None,
        };
        Ok(SectorCipher {
            spec,
            engine,
            essiv,
            sector_size: SECTOR_SIZE,
            iv_tweak: 0,
        })
    }

    /// The same cipher over sectors of `sector_size` bytes (a power of two from 512 to 4096)
    /// numbered from `iv_tweak`: LUKS2 segments, whose IVs count these larger sectors
    /// (dm-crypt's `iv_large_sectors`).
    pub fn with_sectors(mut self, sector_size: u64, iv_tweak: u64) -> SectorCipher {
        self.sector_size = sector_size;
        self.iv_tweak = iv_tweak;
        self
    }

    /// Bytes per encryption sector.
    pub fn sector_size(&self) -> u64 {
        self.sector_size
    }

    fn iv(&self, sector: u64) -> [u8; BLOCK] {
        let mut iv = [0u8; BLOCK];
        match self.spec.ivgen {
            IvGen::Plain => iv[..4].copy_from_slice(&(sector as u32).to_le_bytes()),
            IvGen::Plain64 => iv[..8].copy_from_slice(&sector.to_le_bytes()),
            IvGen::Essiv(_) => {
                iv[..8].copy_from_slice(&sector.to_le_bytes());
                if let Some(e) = &self.essiv {
                    e.encrypt_block(&mut iv);
                }
            }
        }
        iv
    }

    /// Encrypt `buf` (a whole number of sectors) in place; its first sector is number `sector`.
    pub fn encrypt(&self, buf: &mut [u8], sector: u64) {
        self.run(buf, sector, true);
    }

    /// Decrypt `buf` (a whole number of sectors) in place; its first sector is number `sector`.
    pub fn decrypt(&self, buf: &mut [u8], sector: u64) {
        self.run(buf, sector, false);
    }

    fn run(&self, buf: &mut [u8], first: u64, enc: bool) {
        let base = first.wrapping_add(self.iv_tweak);
        for (i, s) in buf.chunks_exact_mut(self.sector_size as usize).enumerate() {
            let iv = self.iv(base.wrapping_add(i as u64));
            match &self.engine {
                Engine::Xts128(x) if enc => x.encrypt_sector(s, iv),
                Engine::Xts128(x) => x.decrypt_sector(s, iv),
                Engine::Xts192(x) if enc => x.encrypt_sector(s, iv),
                Engine::Xts192(x) => x.decrypt_sector(s, iv),
                Engine::Xts256(x) if enc => x.encrypt_sector(s, iv),
                Engine::Xts256(x) => x.decrypt_sector(s, iv),
                Engine::Cbc(c) => cbc_sector(c, &iv, s, enc),
            }
        }
    }
}

fn cbc_sector(c: &AnyAes, iv: &[u8; BLOCK], s: &mut [u8], enc: bool) {
    macro_rules! go {
        ($aes:expr) => {{
            let blocks = s.chunks_exact_mut(BLOCK).map(aes::Block::from_mut_slice);
            if enc {
                let mut e = cbc::Encryptor::inner_iv_init($aes.clone(), iv.into());
                for b in blocks {
                    e.encrypt_block_mut(b);
                }
            } else {
                let mut d = cbc::Decryptor::inner_iv_init($aes.clone(), iv.into());
                for b in blocks {
                    d.decrypt_block_mut(b);
                }
            }
        }};
    }
    match c {
        AnyAes::A128(a) => go!(a),
        AnyAes::A192(a) => go!(a),
        AnyAes::A256(a) => go!(a),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn af_merge_undoes_af_split_for_every_hash() {
        let key: Vec<u8> = (0..64u8).collect();
        for h in [Hash::Sha1, Hash::Sha256, Hash::Sha512] {
            let split = af_split(h, &key, 4000);
            assert_eq!(split.len(), 64 * 4000);
            assert_eq!(&af_merge(h, &split, 64, 4000)[..], &key[..], "{h:?}");
            assert_ne!(&af_merge(h, &split, 64, 3999)[..], &key[..]);
        }
    }

    #[test]
    fn cipher_specs_parse_as_headers_spell_them_and_refuse_the_rest() {
        let s = CipherSpec::parse("aes", "cbc-essiv:sha256", 16).unwrap();
        assert_eq!(s.ivgen, IvGen::Essiv(Hash::Sha256));
        assert_eq!(s.mode_string(), "cbc-essiv:sha256");
        assert_eq!(s.alg_name(), "aes-128");
        assert_eq!(
            CipherSpec::parse("aes", "xts-plain64", 64)
                .unwrap()
                .alg_name(),
            "aes-256"
        );
        assert!(CipherSpec::parse("serpent", "xts-plain64", 64).is_err());
        assert!(CipherSpec::parse("aes", "xts-plain64", 63).is_err());
        assert!(CipherSpec::parse("aes", "ecb", 32).is_err());
        assert!(CipherSpec::parse("aes", "cbc-essiv", 32).is_err());
        assert!(
            CipherSpec::parse("aes", "cbc-essiv:sha1", 32).is_err(),
            "no AES-160"
        );
        assert!(CipherSpec::parse("aes", "cbc-benbi", 32).is_err());
    }

    #[test]
    fn sectors_decrypt_to_what_was_encrypted_and_depend_on_the_sector_number() {
        for (mode, kb) in [
            ("xts-plain64", 32),
            ("cbc-plain", 24),
            ("cbc-essiv:sha256", 16),
        ] {
            let spec = CipherSpec::parse("aes", mode, kb).unwrap();
            let key: Vec<u8> = (0..kb as u8).collect();
            let c = SectorCipher::new(spec, &key).unwrap();
            let plain: Vec<u8> = (0..1024u32).map(|i| i as u8).collect();
            let mut a = plain.clone();
            c.encrypt(&mut a, 7);
            let mut b = plain.clone();
            c.encrypt(&mut b, 8);
            assert_ne!(a, plain, "{mode}");
            assert_ne!(a[..512], b[..512], "{mode}: the IV follows the sector");
            c.decrypt(&mut a, 7);
            assert_eq!(a, plain, "{mode}");
        }
    }
}
