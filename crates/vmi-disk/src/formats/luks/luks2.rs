//! LUKS2 (cryptsetup's "LUKS2 On-Disk Format Specification", version 1.1.x), read support: the
//! 4096-byte binary header, its JSON metadata area (keyslots, segments, digests, config), key
//! slots protected by PBKDF2 or Argon2i/Argon2id, and one `crypt` data segment.
//!
//! Binary header (big-endian; the secondary copy follows the primary at `hdr_size`):
//!
//! | offset | size | field |
//! |--------|------|-------|
//! | 0      | 6    | magic `LUKS\xba\xbe` (secondary: `SKUL\xba\xbe`) |
//! | 6      | 2    | version (2) |
//! | 8      | 8    | header size: binary header plus JSON area (16 KiB to 4 MiB) |
//! | 16     | 8    | sequence id |
//! | 24     | 48   | label |
//! | 72     | 32   | checksum algorithm (`sha256`) |
//! | 104    | 64   | salt |
//! | 168    | 40   | UUID |
//! | 208    | 48   | subsystem |
//! | 256    | 8    | offset of this header copy |
//! | 448    | 64   | checksum of the header area with this field zeroed |
//!
//! qemu (10.0) does not read LUKS2; these volumes come from `cryptsetup luksFormat --type luks2`.

use super::crypto::{af_merge, CipherSpec, Hash, SectorCipher, SECTOR_SIZE};
use super::limits::{MAX_KEY_BYTES, MAX_KEY_MATERIAL, MAX_PBKDF2_ITERATIONS};
use crate::error::{Error, Result};
use crate::storage::Storage;
use base64::Engine as _;
use serde_json::Value;
use zeroize::Zeroizing;

/// Size of the binary header; the JSON area follows it.
pub const BINARY_LEN: u64 = 4096;
/// Smallest header area (binary header and JSON) cryptsetup writes.
pub const MIN_HDR_SIZE: u64 = 16 << 10;
/// Largest header area the specification allows.
pub const MAX_HDR_SIZE: u64 = 4 << 20;
/// Most key slots a LUKS2 header may hold (cryptsetup's `LUKS2_KEYSLOTS_MAX`).
pub const MAX_KEYSLOTS: usize = 32;
/// Most memory an Argon2 key slot may ask for, in KiB: 1 GiB, cryptsetup's default maximum.
/// Volumes formatted with a larger `--pbkdf-memory` are refused rather than allocated for.
pub const MAX_ARGON2_MEMORY_KIB: u32 = 1 << 20;
/// Most Argon2 passes (cryptsetup's 2-second benchmark gives 4 to a few tens).
pub const MAX_ARGON2_TIME: u32 = 256;
/// Most Argon2 lanes (cryptsetup uses at most 4).
pub const MAX_ARGON2_LANES: u32 = 16;
/// Most Argon2 work one unlock may need over all key slots, in KiB × passes: 64 GiB·passes
/// (cryptsetup's default, 1 GiB for about 4 to 10 passes, per slot, fits several times over; a
/// few tens of seconds at most).
pub const MAX_ARGON2_WORK: u64 = 64 << 20;
/// Largest encryption sector of a segment (dm-crypt's maximum).
pub const MAX_SECTOR_SIZE: u64 = 4096;

const OFF_HDR_SIZE: usize = 8;
const OFF_CSUM_ALG: usize = 72;
const OFF_UUID: usize = 168;
const OFF_CSUM: usize = 448;

/// A key slot's key derivation.
#[derive(Debug, Clone)]
enum Kdf {
    Pbkdf2 {
        hash: Hash,
        iterations: u32,
        salt: Vec<u8>,
    },
    Argon2 {
        id: bool,
        time: u32,
        memory: u32,
        lanes: u32,
        salt: Vec<u8>,
    },
}

/// One usable key slot.
#[derive(Debug, Clone)]
struct Keyslot {
    id: String,
    key_size: usize,
    area_offset: u64,
    area_spec: CipherSpec,
    kdf: Kdf,
    stripes: usize,
    af_hash: Hash,
}

/// The volume key digest.
#[derive(Debug, Clone)]
struct Digest {
    keyslots: Vec<String>,
    hash: Hash,
    iterations: u32,
    salt: Vec<u8>,
    digest: Vec<u8>,
}

/// A validated LUKS2 header.
#[derive(Debug)]
pub struct Header {
    /// Payload cipher.
    pub spec: CipherSpec,
    /// Payload start, in bytes.
    pub payload_offset: u64,
    /// Bytes per encryption sector of the segment.
    pub sector_size: u64,
    iv_tweak: u64,
    keyslots: Vec<Keyslot>,
    digests: Vec<Digest>,
    uuid: String,
    json: Value,
}

fn be64(b: &[u8], at: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(w)
}

fn cstr(b: &[u8]) -> String {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end]).into_owned()
}

/// Check the binary header's magic, version and header size (probing, before any JSON).
pub fn parse_binary(head: &[u8]) -> Result<u64> {
    if head.len() < BINARY_LEN as usize {
        return Err(Error::invalid("LUKS2 binary header is truncated"));
    }
    if head[..6] != super::luks1::MAGIC && &head[..6] != b"SKUL\xba\xbe" {
        return Err(Error::invalid("not a LUKS2 header (bad magic)"));
    }
    if u16::from_be_bytes([head[6], head[7]]) != 2 {
        return Err(Error::invalid("not a LUKS2 header (version)"));
    }
    let hdr_size = be64(head, OFF_HDR_SIZE);
    if !(MIN_HDR_SIZE..=MAX_HDR_SIZE).contains(&hdr_size) || !hdr_size.is_power_of_two() {
        return Err(Error::invalid(format!(
            "LUKS2 header size {hdr_size} is not a power of two from {MIN_HDR_SIZE} to {MAX_HDR_SIZE}"
        )));
    }
    Ok(hdr_size)
}

/// Read one header copy at `at`; `Ok(None)` when its checksum does not match.
fn read_copy(st: &dyn Storage, at: u64, file_len: u64) -> Result<Option<(Vec<u8>, u64)>> {
    if at.checked_add(BINARY_LEN).is_none_or(|e| e > file_len) {
        return Err(Error::invalid("LUKS2 header lies past the end of the file"));
    }
    let mut head = vec![0u8; BINARY_LEN as usize];
    st.read_at(&mut head, at)
        .map_err(|e| Error::io("reading LUKS2 header", e))?;
    let hdr_size = parse_binary(&head)?;
    if at.checked_add(hdr_size).is_none_or(|e| e > file_len) {
        return Err(Error::invalid(format!(
            "LUKS2 header area of {hdr_size} bytes lies past the end of the file"
        )));
    }
    let mut area = vec![0u8; hdr_size as usize];
    st.read_at(&mut area, at)
        .map_err(|e| Error::io("reading LUKS2 metadata", e))?;
    let alg = Hash::parse(&cstr(&area[OFF_CSUM_ALG..OFF_CSUM_ALG + 32]))?;
    let stored = area[OFF_CSUM..OFF_CSUM + alg.len()].to_vec();
    area[OFF_CSUM..OFF_CSUM + 64].fill(0);
    if alg.digest(&[&area])[..] != stored[..] {
        return Ok(None);
    }
    Ok(Some((area, hdr_size)))
}

fn num(v: &Value, what: &str) -> Result<u64> {
    match v {
        Value::String(s) => s.parse::<u64>().ok(),
        Value::Number(n) => n.as_u64(),
        _ => None,
    }
    .ok_or_else(|| Error::invalid(format!("LUKS2 metadata: {what} is not a number")))
}

fn text<'a>(v: &'a Value, what: &str) -> Result<&'a str> {
    v.as_str()
        .ok_or_else(|| Error::invalid(format!("LUKS2 metadata: {what} is missing")))
}

fn b64(v: &Value, what: &str) -> Result<Vec<u8>> {
    base64::engine::general_purpose::STANDARD
        .decode(text(v, what)?)
        .map_err(|_| Error::invalid(format!("LUKS2 metadata: {what} is not base64")))
}

/// `aes-xts-plain64` → a cipher spec for a key of `key_size` bytes.
fn encryption(s: &str, key_size: usize) -> Result<CipherSpec> {
    let (cipher, mode) = s
        .split_once('-')
        .ok_or_else(|| Error::invalid(format!("LUKS2 encryption '{s}' is malformed")))?;
    CipherSpec::parse(cipher, mode, key_size)
}

fn small(n: u64, max: u64, what: &str) -> Result<u32> {
    if n == 0 || n > max {
        return Err(Error::limit(format!(
            "LUKS2 {what} is {n}, outside 1..={max}"
        )));
    }
    Ok(n as u32)
}

impl Header {
    /// Read and validate the header of a file of `file_len` bytes.
    pub fn read(st: &dyn Storage, file_len: u64) -> Result<Header> {
        let (area, hdr_size) = match read_copy(st, 0, file_len)? {
            Some(c) => c,
            None => {
                // The primary copy is damaged: the secondary follows it at its own size.
                let mut head = vec![0u8; BINARY_LEN as usize];
                st.read_at(&mut head, 0)
                    .map_err(|e| Error::io("reading LUKS2 header", e))?;
                let size = parse_binary(&head)?;
                read_copy(st, size, file_len)?.ok_or_else(|| {
                    Error::invalid("LUKS2 header checksums do not match (both copies)")
                })?
            }
        };
        let json_area = &area[BINARY_LEN as usize..];
        let end = json_area
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(json_area.len());
        let json: Value = serde_json::from_slice(&json_area[..end])
            .map_err(|e| Error::invalid("LUKS2 metadata is not valid JSON").with_source(e))?;
        let uuid = cstr(&area[OFF_UUID..OFF_UUID + 40]);
        Self::from_json(json, uuid, hdr_size, file_len)
    }

    fn from_json(json: Value, uuid: String, hdr_size: u64, file_len: u64) -> Result<Header> {
        if let Some(req) = json["config"]["requirements"]["mandatory"].as_array() {
            if !req.is_empty() {
                return Err(Error::unsupported(format!(
                    "LUKS2 volume with mandatory requirements {req:?} (e.g. an unfinished re-encryption)"
                )));
            }
        }
        let segments = json["segments"]
            .as_object()
            .ok_or_else(|| Error::invalid("LUKS2 metadata has no segments"))?;
        if segments.len() != 1 {
            return Err(Error::unsupported(format!(
                "LUKS2 volume with {} data segments (only one is supported)",
                segments.len()
            )));
        }
        let seg = segments.values().next().unwrap_or(&Value::Null);
        if seg["type"] != "crypt" {
            return Err(Error::unsupported(format!(
                "LUKS2 segment of type {}",
                seg["type"]
            )));
        }
        if seg.get("integrity").is_some() {
            return Err(Error::unsupported(
                "LUKS2 segment with integrity protection",
            ));
        }
        let payload_offset = num(&seg["offset"], "segment offset")?;
        if payload_offset < hdr_size * 2 || payload_offset > file_len {
            return Err(Error::invalid(format!(
                "LUKS2 segment offset {payload_offset} overlaps the header or lies past the end of the file ({file_len} bytes)"
            )));
        }
        if seg["size"] != "dynamic" {
            return Err(Error::unsupported(
                "LUKS2 segment of a fixed size (only \"dynamic\", the whole device, is supported)",
            ));
        }
        let sector_size = num(&seg["sector_size"], "segment sector size")?;
        if !sector_size.is_power_of_two() || !(SECTOR_SIZE..=MAX_SECTOR_SIZE).contains(&sector_size)
        {
            return Err(Error::invalid(format!(
                "LUKS2 segment sector size {sector_size}"
            )));
        }
        let iv_tweak = num(&seg["iv_tweak"], "segment iv_tweak")?;
        let seg_enc = text(&seg["encryption"], "segment encryption")?.to_string();

        let mut keyslots = Vec::new();
        let slots = json["keyslots"]
            .as_object()
            .ok_or_else(|| Error::invalid("LUKS2 metadata has no keyslots"))?;
        if slots.len() > MAX_KEYSLOTS {
            return Err(Error::limit(format!(
                "LUKS2 header has {} keyslots, more than {MAX_KEYSLOTS}",
                slots.len()
            )));
        }
        for (id, k) in slots {
            if k["type"] != "luks2" {
                continue; // reencrypt slots and unknown types hold no passphrase key
            }
            let key_size = num(&k["key_size"], "keyslot key_size")?;
            if key_size == 0 || key_size > MAX_KEY_BYTES as u64 {
                return Err(Error::invalid(format!(
                    "LUKS2 keyslot {id} key of {key_size} bytes"
                )));
            }
            let key_size = key_size as usize;
            let area = &k["area"];
            if area["type"] != "raw" {
                return Err(Error::unsupported(format!(
                    "LUKS2 keyslot {id} area type {}",
                    area["type"]
                )));
            }
            let area_offset = num(&area["offset"], "keyslot area offset")?;
            let area_size = num(&area["size"], "keyslot area size")?;
            let area_key = num(&area["key_size"], "keyslot area key_size")?;
            if area_key == 0 || area_key > MAX_KEY_BYTES as u64 {
                return Err(Error::invalid(format!(
                    "LUKS2 keyslot {id} area key of {area_key} bytes"
                )));
            }
            let area_spec = encryption(
                text(&area["encryption"], "keyslot encryption")?,
                area_key as usize,
            )?;
            let af = &k["af"];
            if af["type"] != "luks1" {
                return Err(Error::unsupported(format!(
                    "LUKS2 keyslot {id} anti-forensic type {}",
                    af["type"]
                )));
            }
            let stripes = num(&af["stripes"], "keyslot stripes")?;
            let material = stripes.saturating_mul(key_size as u64);
            if stripes == 0 || material > MAX_KEY_MATERIAL || material > area_size {
                return Err(Error::limit(format!(
                    "LUKS2 keyslot {id} has {stripes} stripes ({material} bytes; area {area_size}, at most {MAX_KEY_MATERIAL})"
                )));
            }
            if area_offset < hdr_size
                || area_offset
                    .checked_add(material.div_ceil(SECTOR_SIZE) * SECTOR_SIZE)
                    .is_none_or(|e| e > payload_offset.min(file_len))
            {
                return Err(Error::invalid(format!(
                    "LUKS2 keyslot {id} area at {area_offset} ({area_size} bytes) lies outside the keyslots area"
                )));
            }
            let af_hash = Hash::parse(text(&af["hash"], "keyslot AF hash")?)?;
            let kdf = &k["kdf"];
            let salt = b64(&kdf["salt"], "keyslot salt")?;
            let kdf = match text(&kdf["type"], "keyslot kdf type")? {
                "pbkdf2" => Kdf::Pbkdf2 {
                    hash: Hash::parse(text(&kdf["hash"], "keyslot pbkdf2 hash")?)?,
                    iterations: small(
                        num(&kdf["iterations"], "keyslot iterations")?,
                        u64::from(MAX_PBKDF2_ITERATIONS),
                        &format!("keyslot {id} PBKDF2 iterations"),
                    )?,
                    salt,
                },
                t @ ("argon2i" | "argon2id") => Kdf::Argon2 {
                    id: t == "argon2id",
                    time: small(
                        num(&kdf["time"], "keyslot argon2 time")?,
                        u64::from(MAX_ARGON2_TIME),
                        &format!("keyslot {id} Argon2 time cost"),
                    )?,
                    memory: small(
                        num(&kdf["memory"], "keyslot argon2 memory")?,
                        u64::from(MAX_ARGON2_MEMORY_KIB),
                        &format!("keyslot {id} Argon2 memory (KiB)"),
                    )?,
                    lanes: small(
                        num(&kdf["cpus"], "keyslot argon2 cpus")?,
                        u64::from(MAX_ARGON2_LANES),
                        &format!("keyslot {id} Argon2 lanes"),
                    )?,
                    salt,
                },
                t => {
                    return Err(Error::unsupported(format!(
                        "LUKS2 keyslot {id} key derivation {t}"
                    )))
                }
            };
            keyslots.push(Keyslot {
                id: id.clone(),
                key_size,
                area_offset,
                area_spec,
                kdf,
                stripes: stripes as usize,
                af_hash,
            });
        }
        if keyslots.is_empty() {
            return Err(Error::invalid("LUKS2 header has no usable keyslot"));
        }
        let work: u64 = keyslots
            .iter()
            .map(|k| match k.kdf {
                Kdf::Argon2 { time, memory, .. } => u64::from(time) * u64::from(memory),
                Kdf::Pbkdf2 { .. } => 0,
            })
            .sum();
        if work > MAX_ARGON2_WORK {
            return Err(Error::limit(format!(
                "LUKS2 keyslots need {work} KiB x passes of Argon2 to try, more than {MAX_ARGON2_WORK}"
            )));
        }
        let key_size = keyslots[0].key_size;
        let spec = encryption(&seg_enc, key_size)?;
        let mut digests = Vec::new();
        for (id, d) in json["digests"].as_object().into_iter().flatten() {
            if d["type"] != "pbkdf2" {
                return Err(Error::unsupported(format!(
                    "LUKS2 digest {id} of type {}",
                    d["type"]
                )));
            }
            let keyslots = d["keyslots"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|v| v.as_str().map(str::to_string))
                        .collect()
                })
                .unwrap_or_default();
            digests.push(Digest {
                keyslots,
                hash: Hash::parse(text(&d["hash"], "digest hash")?)?,
                iterations: small(
                    num(&d["iterations"], "digest iterations")?,
                    u64::from(MAX_PBKDF2_ITERATIONS),
                    &format!("digest {id} PBKDF2 iterations"),
                )?,
                salt: b64(&d["salt"], "digest salt")?,
                digest: b64(&d["digest"], "digest")?,
            });
        }
        if digests.is_empty() {
            return Err(Error::invalid("LUKS2 header has no digest"));
        }
        Ok(Header {
            spec,
            payload_offset,
            sector_size,
            iv_tweak,
            keyslots,
            digests,
            uuid,
            json,
        })
    }

    /// The payload cipher for the unlocked volume key.
    pub fn payload_cipher(&self, key: &[u8]) -> Result<SectorCipher> {
        Ok(SectorCipher::new(self.spec, key)?.with_sectors(self.sector_size, self.iv_tweak))
    }

    /// Find the volume key `passphrase` unlocks.
    pub fn unlock(&self, st: &dyn Storage, passphrase: &[u8]) -> Result<Zeroizing<Vec<u8>>> {
        for k in &self.keyslots {
            let Some(digest) = self.digests.iter().find(|d| d.keyslots.contains(&k.id)) else {
                continue;
            };
            if k.key_size != self.spec.key_bytes {
                continue;
            }
            let mut slot_key = Zeroizing::new(vec![0u8; k.area_spec.key_bytes]);
            match &k.kdf {
                Kdf::Pbkdf2 {
                    hash,
                    iterations,
                    salt,
                } => hash.pbkdf2(passphrase, salt, *iterations, &mut slot_key),
                Kdf::Argon2 {
                    id,
                    time,
                    memory,
                    lanes,
                    salt,
                } => {
                    let alg = if *id {
                        argon2::Algorithm::Argon2id
                    } else {
                        argon2::Algorithm::Argon2i
                    };
                    let params = argon2::Params::new(*memory, *time, *lanes, Some(slot_key.len()))
                        .map_err(|e| {
                            Error::invalid(format!("LUKS2 keyslot {} Argon2 parameters: {e}", k.id))
                        })?;
                    argon2::Argon2::new(alg, argon2::Version::V0x13, params)
                        .hash_password_into(passphrase, salt, &mut slot_key)
                        .map_err(|e| {
                            Error::invalid(format!("LUKS2 keyslot {} Argon2: {e}", k.id))
                        })?;
                }
            }
            let len =
                (k.key_size * k.stripes).div_ceil(SECTOR_SIZE as usize) * SECTOR_SIZE as usize;
            let mut material = Zeroizing::new(vec![0u8; len]);
            st.read_at(&mut material, k.area_offset).map_err(|e| {
                Error::io(format!("reading LUKS2 keyslot {} key material", k.id), e)
            })?;
            SectorCipher::new(k.area_spec, &slot_key)?.decrypt(&mut material, 0);
            let key = af_merge(
                k.af_hash,
                &material[..k.key_size * k.stripes],
                k.key_size,
                k.stripes,
            );
            let mut d = Zeroizing::new(vec![0u8; digest.digest.len()]);
            digest
                .hash
                .pbkdf2(&key, &digest.salt, digest.iterations, &mut d);
            if d[..] == digest.digest[..] {
                return Ok(key);
            }
        }
        Err(Error::refused(
            "invalid password, cannot unlock any LUKS key slot",
        ))
    }

    /// `format-specific` data for `info`: qemu's LUKS fields where they apply, and the LUKS2
    /// metadata's keyslots as the slots.
    pub fn info(&self) -> Value {
        let slots: Vec<Value> = self.json["keyslots"]
            .as_object()
            .into_iter()
            .flatten()
            .map(|(id, k)| {
                let mut m = serde_json::Map::new();
                m.insert(
                    "id".into(),
                    id.parse::<u64>().map_or(Value::Null, Value::from),
                );
                m.insert("active".into(), true.into());
                m.insert("kdf".into(), k["kdf"]["type"].clone());
                if let Ok(o) = num(&k["area"]["offset"], "") {
                    m.insert("key-offset".into(), o.into());
                }
                m.insert("stripes".into(), k["af"]["stripes"].clone());
                Value::Object(m)
            })
            .collect();
        let mut m = serde_json::Map::new();
        m.insert("version".into(), 2.into());
        m.insert("ivgen-alg".into(), self.spec.ivgen_name().into());
        m.insert("detached-header".into(), false.into());
        m.insert("cipher-alg".into(), self.spec.alg_name().into());
        m.insert("uuid".into(), self.uuid.clone().into());
        m.insert("cipher-mode".into(), self.spec.mode_name().into());
        m.insert("sector-size".into(), self.sector_size.into());
        m.insert("slots".into(), slots.into());
        m.insert("payload-offset".into(), self.payload_offset.into());
        Value::Object(m)
    }
}
