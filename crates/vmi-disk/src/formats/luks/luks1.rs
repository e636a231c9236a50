//! The LUKS1 on-disk header (cryptsetup's "LUKS On-Disk Format Specification" 1.2.3, qemu's
//! `crypto/block-luks.c`): the 592-byte big-endian `phdr` with eight key slots, the key material
//! each active slot points at (the volume key, AF-split into `stripes` stripes and encrypted with
//! a PBKDF2-derived key), and the volume key digest that tells a right passphrase from a wrong one.
//!
//! | offset | size | field |
//! |--------|------|-------|
//! | 0      | 6    | magic `LUKS\xba\xbe` |
//! | 6      | 2    | version (1) |
//! | 8      | 32   | cipher name (`aes`) |
//! | 40     | 32   | cipher mode (`xts-plain64`) |
//! | 72     | 32   | hash spec (`sha256`) |
//! | 104    | 4    | payload offset, in 512-byte sectors |
//! | 108    | 4    | key bytes |
//! | 112    | 20   | volume key digest (PBKDF2 of the volume key) |
//! | 132    | 32   | volume key digest salt |
//! | 164    | 4    | volume key digest iterations |
//! | 168    | 40   | UUID (text) |
//! | 208    | 8×48 | key slots: active, iterations, salt\[32\], key material sector, stripes |

use super::crypto::{af_merge, af_split, CipherSpec, Hash, SectorCipher, SECTOR_SIZE};
use super::limits::{
    MAX_KEY_BYTES, MAX_KEY_MATERIAL, MAX_PBKDF2_ITERATIONS, MAX_UNLOCK_ITERATIONS,
};
use crate::error::{Error, Result};
use crate::storage::Storage;
use zerocopy::big_endian::{U16, U32};
use zerocopy::{FromBytes, FromZeros, Immutable, IntoBytes, KnownLayout, Unaligned};
use zeroize::Zeroizing;

/// Every LUKS header begins with these six bytes (both versions).
pub const MAGIC: [u8; 6] = *b"LUKS\xba\xbe";
/// Size of the LUKS1 header with its key slot table.
pub const HEADER_LEN: usize = 592;
/// Key slots in a LUKS1 header.
pub const NUM_SLOTS: usize = 8;
/// `active` of a slot that holds key material.
pub const SLOT_ENABLED: u32 = 0x00ac_71f3;
/// `active` of an empty slot.
pub const SLOT_DISABLED: u32 = 0x0000_dead;
/// Stripes cryptsetup and qemu split the key into.
pub const STRIPES: u32 = 4000;
/// Where slot 0's key material starts, and the alignment of every slot (cryptsetup, qemu).
pub const KEY_SLOT_ALIGN: u64 = 4096;
/// Length of the volume key digest.
pub const DIGEST_LEN: usize = 20;
/// Length of every salt.
pub const SALT_LEN: usize = 32;
/// The fewest PBKDF2 iterations qemu and cryptsetup write.
pub const MIN_ITERATIONS: u32 = 1000;

/// One key slot as stored.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct RawSlot {
    /// [`SLOT_ENABLED`] or [`SLOT_DISABLED`].
    pub active: U32,
    /// PBKDF2 iterations for the passphrase.
    pub iterations: U32,
    /// PBKDF2 salt.
    pub salt: [u8; SALT_LEN],
    /// First sector of the slot's key material.
    pub key_offset: U32,
    /// Anti-forensic stripes.
    pub stripes: U32,
}

/// The LUKS1 header as stored.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct RawHeader {
    /// [`MAGIC`].
    pub magic: [u8; 6],
    /// 1.
    pub version: U16,
    /// NUL-terminated cipher name.
    pub cipher_name: [u8; 32],
    /// NUL-terminated cipher mode.
    pub cipher_mode: [u8; 32],
    /// NUL-terminated hash name.
    pub hash_spec: [u8; 32],
    /// Payload start, in sectors.
    pub payload_offset: U32,
    /// Volume key length.
    pub key_bytes: U32,
    /// PBKDF2 digest of the volume key.
    pub mk_digest: [u8; DIGEST_LEN],
    /// Salt of that digest.
    pub mk_digest_salt: [u8; SALT_LEN],
    /// Iterations of that digest.
    pub mk_digest_iter: U32,
    /// UUID text, NUL-padded.
    pub uuid: [u8; 40],
    /// The key slots.
    pub slots: [RawSlot; NUM_SLOTS],
}

/// A validated LUKS1 header.
#[derive(Debug, Clone)]
pub struct Header {
    /// The raw header (for the digest, salts and slots).
    pub raw: RawHeader,
    /// Cipher and IV generator.
    pub spec: CipherSpec,
    /// PBKDF2 and AF hash.
    pub hash: Hash,
    /// Payload start in bytes from the header.
    pub payload_offset: u64,
    /// UUID text.
    pub uuid: String,
}

fn cstr(field: &[u8], what: &str) -> Result<String> {
    let end = field
        .iter()
        .position(|&b| b == 0)
        .ok_or_else(|| Error::invalid(format!("LUKS header {what} is not NUL-terminated")))?;
    std::str::from_utf8(&field[..end])
        .map(str::to_string)
        .map_err(|_| Error::invalid(format!("LUKS header {what} is not text")))
}

/// Parse and validate a LUKS1 header whose key material must lie in the first `region` bytes
/// (the file for a raw volume, the crypto header clusters inside qcow2). `payload_must_fit`:
/// the payload offset must lie inside the region too (raw volumes; qcow2 ignores the payload).
pub fn parse(buf: &[u8], region: u64, payload_must_fit: bool) -> Result<Header> {
    let (raw, _) = RawHeader::read_from_prefix(buf)
        .map_err(|_| Error::invalid("LUKS header is shorter than 592 bytes"))?;
    if raw.magic != MAGIC {
        return Err(Error::invalid("not a LUKS volume (bad magic)"));
    }
    if raw.version.get() != 1 {
        return Err(Error::unsupported(format!(
            "LUKS version {}",
            raw.version.get()
        )));
    }
    let key_bytes = raw.key_bytes.get() as usize;
    if key_bytes == 0 || key_bytes > MAX_KEY_BYTES {
        return Err(Error::invalid(format!(
            "LUKS key of {key_bytes} bytes (at most {MAX_KEY_BYTES})"
        )));
    }
    let cipher = cstr(&raw.cipher_name, "cipher name")?;
    let mode = cstr(&raw.cipher_mode, "cipher mode")?;
    let hash = Hash::parse(&cstr(&raw.hash_spec, "hash spec")?)?;
    let spec = CipherSpec::parse(&cipher, &mode, key_bytes)?;
    let uuid = cstr(&raw.uuid, "UUID").unwrap_or_default();
    let payload_offset = u64::from(raw.payload_offset.get()) * SECTOR_SIZE;
    if payload_offset < HEADER_LEN as u64 && payload_must_fit {
        return Err(Error::invalid(format!(
            "LUKS payload offset {payload_offset} overlaps the header"
        )));
    }
    if payload_must_fit && payload_offset > region {
        return Err(Error::invalid(format!(
            "LUKS payload offset {payload_offset} lies past the end of the file ({region} bytes)"
        )));
    }
    check_iterations(raw.mk_digest_iter.get(), "volume key digest")?;
    let mut active = 0;
    for (i, s) in raw.slots.iter().enumerate() {
        match s.active.get() {
            SLOT_DISABLED => continue,
            SLOT_ENABLED => active += 1,
            v => {
                return Err(Error::invalid(format!(
                    "LUKS key slot {i} has state {v:#x}, neither enabled nor disabled"
                )))
            }
        }
        check_iterations(s.iterations.get(), &format!("key slot {i}"))?;
        let stripes = u64::from(s.stripes.get());
        let material = (key_bytes as u64) * stripes;
        if stripes == 0 || material > MAX_KEY_MATERIAL {
            return Err(Error::limit(format!(
                "LUKS key slot {i} has {stripes} stripes ({material} bytes of key material, at most {MAX_KEY_MATERIAL})"
            )));
        }
        let start = u64::from(s.key_offset.get()) * SECTOR_SIZE;
        let end = start + material.div_ceil(SECTOR_SIZE) * SECTOR_SIZE;
        if start < HEADER_LEN as u64 || end > region {
            return Err(Error::invalid(format!(
                "LUKS key slot {i} key material at {start}..{end} lies outside the header area (0..{region})"
            )));
        }
        if payload_must_fit && end > payload_offset {
            return Err(Error::invalid(format!(
                "LUKS key slot {i} key material at {start}..{end} overlaps the payload at {payload_offset}"
            )));
        }
    }
    if active == 0 {
        return Err(Error::invalid("LUKS header has no active key slot"));
    }
    let work: u64 = raw
        .slots
        .iter()
        .filter(|s| s.active.get() == SLOT_ENABLED)
        .map(|s| u64::from(s.iterations.get()) + u64::from(raw.mk_digest_iter.get()))
        .sum();
    if work > MAX_UNLOCK_ITERATIONS {
        return Err(Error::limit(format!(
            "LUKS key slots need {work} PBKDF2 iterations to try, more than {MAX_UNLOCK_ITERATIONS}"
        )));
    }
    Ok(Header {
        raw,
        spec,
        hash,
        payload_offset,
        uuid,
    })
}

fn check_iterations(n: u32, what: &str) -> Result<()> {
    if n == 0 {
        return Err(Error::invalid(format!(
            "LUKS {what} has 0 PBKDF2 iterations"
        )));
    }
    if n > MAX_PBKDF2_ITERATIONS {
        return Err(Error::limit(format!(
            "LUKS {what} asks for {n} PBKDF2 iterations, more than the {MAX_PBKDF2_ITERATIONS} vmi computes"
        )));
    }
    Ok(())
}

impl Header {
    /// Find the volume key `passphrase` unlocks, reading key material at `base` + its offset.
    pub fn unlock(
        &self,
        st: &dyn Storage,
        base: u64,
        passphrase: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>> {
        let kb = self.spec.key_bytes;
        for (i, s) in self.raw.slots.iter().enumerate() {
            if s.active.get() != SLOT_ENABLED {
                continue;
            }
            let mut slot_key = Zeroizing::new(vec![0u8; kb]);
            self.hash
                .pbkdf2(passphrase, &s.salt, s.iterations.get(), &mut slot_key);
            let stripes = s.stripes.get() as usize;
            let len = (kb * stripes).div_ceil(SECTOR_SIZE as usize) * SECTOR_SIZE as usize;
            let mut material = Zeroizing::new(vec![0u8; len]);
            let at = base + u64::from(s.key_offset.get()) * SECTOR_SIZE;
            st.read_at(&mut material, at)
                .map_err(|e| Error::io(format!("reading LUKS key slot {i} key material"), e))?;
            SectorCipher::new(self.spec, &slot_key)?.decrypt(&mut material, 0);
            let key = af_merge(self.hash, &material[..kb * stripes], kb, stripes);
            if self.key_matches(&key) {
                return Ok(key);
            }
        }
        Err(Error::refused(
            "invalid password, cannot unlock any LUKS key slot",
        ))
    }

    fn key_matches(&self, key: &[u8]) -> bool {
        let mut d = [0u8; DIGEST_LEN];
        self.hash.pbkdf2(
            key,
            &self.raw.mk_digest_salt,
            self.raw.mk_digest_iter.get(),
            &mut d,
        );
        // Not secret-dependent timing that matters here: the digest is public.
        d == self.raw.mk_digest
    }

    /// qemu's `format-specific` data for a LUKS volume (`qemu-img info`).
    pub fn info(&self) -> serde_json::Value {
        let slots: Vec<serde_json::Value> = self
            .raw
            .slots
            .iter()
            .map(|s| {
                let off = u64::from(s.key_offset.get()) * SECTOR_SIZE;
                if s.active.get() == SLOT_ENABLED {
                    serde_json::json!({"active": true, "iters": s.iterations.get(),
                        "key-offset": off, "stripes": s.stripes.get()})
                } else {
                    serde_json::json!({"active": false, "key-offset": off})
                }
            })
            .collect();
        let mut m = serde_json::Map::new();
        m.insert("ivgen-alg".into(), self.spec.ivgen_name().into());
        if let super::crypto::IvGen::Essiv(h) = self.spec.ivgen {
            m.insert("ivgen-hash-alg".into(), h.name().into());
        }
        m.insert("detached-header".into(), false.into());
        m.insert("hash-alg".into(), self.hash.name().into());
        m.insert("cipher-alg".into(), self.spec.alg_name().into());
        m.insert("uuid".into(), self.uuid.clone().into());
        m.insert("cipher-mode".into(), self.spec.mode_name().into());
        m.insert("slots".into(), slots.into());
        m.insert("payload-offset".into(), self.payload_offset.into());
        m.insert(
            "master-key-iters".into(),
            self.raw.mk_digest_iter.get().into(),
        );
        serde_json::Value::Object(m)
    }
}

/// PBKDF2 iterations that take about `millis` milliseconds here (qemu's
/// `qcrypto_pbkdf2_count_iters`, scaled), never fewer than [`MIN_ITERATIONS`] nor more than
/// [`MAX_PBKDF2_ITERATIONS`].
pub fn iterations_for(hash: Hash, out_len: usize, millis: u64) -> u32 {
    let mut out = vec![0u8; out_len];
    let mut n: u32 = 1 << 10;
    loop {
        let t = std::time::Instant::now();
        hash.pbkdf2(b"benchmark", &[0u8; SALT_LEN], n, &mut out);
        let took = t.elapsed().as_micros().max(1);
        if took >= 20_000 || n >= 1 << 22 {
            let per_ms = u128::from(n) * 1000 / took;
            let want = per_ms.saturating_mul(u128::from(millis));
            return want.clamp(
                u128::from(MIN_ITERATIONS),
                u128::from(MAX_PBKDF2_ITERATIONS),
            ) as u32;
        }
        n *= 2;
    }
}

/// A new LUKS1 header area (header and key material, exactly `payload_offset` bytes) with slot 0
/// holding a fresh random volume key for `passphrase`. Returns the area and the volume key.
pub fn create(
    spec: CipherSpec,
    hash: Hash,
    passphrase: &[u8],
    iter_time_ms: u64,
) -> Result<(Vec<u8>, Zeroizing<Vec<u8>>)> {
    use rand::RngCore;
    let kb = spec.key_bytes;
    let mut rng = rand::rngs::OsRng;
    let mut key = Zeroizing::new(vec![0u8; kb]);
    rng.fill_bytes(&mut key);
    let mut raw = RawHeader::new_zeroed();
    raw.magic = MAGIC;
    raw.version = 1.into();
    put_str(&mut raw.cipher_name, "aes")?;
    put_str(&mut raw.cipher_mode, &spec.mode_string())?;
    put_str(&mut raw.hash_spec, hash.name())?;
    raw.key_bytes = (kb as u32).into();
    rng.fill_bytes(&mut raw.mk_digest_salt);
    let iters = iterations_for(hash, kb, iter_time_ms);
    let mk_iters = (iters / 8).max(MIN_ITERATIONS);
    raw.mk_digest_iter = mk_iters.into();
    hash.pbkdf2(&key, &raw.mk_digest_salt, mk_iters, &mut raw.mk_digest);
    put_str(&mut raw.uuid, &uuid::Uuid::new_v4().to_string())?;
    let split_len = kb as u64 * u64::from(STRIPES);
    let slot_sectors = split_len.div_ceil(KEY_SLOT_ALIGN) * KEY_SLOT_ALIGN / SECTOR_SIZE;
    let first = KEY_SLOT_ALIGN / SECTOR_SIZE;
    for (i, s) in raw.slots.iter_mut().enumerate() {
        s.active = if i == 0 { SLOT_ENABLED } else { SLOT_DISABLED }.into();
        s.stripes = STRIPES.into();
        s.key_offset = ((first + slot_sectors * i as u64) as u32).into();
    }
    let payload_sectors = first + slot_sectors * NUM_SLOTS as u64;
    raw.payload_offset = (payload_sectors as u32).into();
    let slot0 = &mut raw.slots[0];
    rng.fill_bytes(&mut slot0.salt);
    slot0.iterations = iters.into();
    let mut slot_key = Zeroizing::new(vec![0u8; kb]);
    hash.pbkdf2(passphrase, &slot0.salt, iters, &mut slot_key);
    let mut split = af_split(hash, &key, STRIPES as usize);
    let padded = split_len.div_ceil(SECTOR_SIZE) * SECTOR_SIZE;
    split.resize(padded as usize, 0);
    SectorCipher::new(spec, &slot_key)?.encrypt(&mut split, 0);
    let mut area = vec![0u8; (payload_sectors * SECTOR_SIZE) as usize];
    area[..HEADER_LEN].copy_from_slice(raw.as_bytes());
    let at = (first * SECTOR_SIZE) as usize;
    area[at..at + split.len()].copy_from_slice(&split);
    Ok((area, key))
}

fn put_str(field: &mut [u8], s: &str) -> Result<()> {
    if s.len() >= field.len() {
        return Err(Error::usage(format!(
            "'{s}' is too long for a LUKS header field"
        )));
    }
    field[..s.len()].copy_from_slice(s.as_bytes());
    Ok(())
}
