//! `.mf` manifests (DSP0243 §5.1): one line per package file, `ALGO(name)= hexdigest`. vmi writes
//! SHA256 and reads SHA1, SHA256 and SHA512.

use crate::error::{OvfError, Result};
use sha1::Sha1;
use sha2::{Digest as _, Sha256, Sha512};
use std::io::Read;

/// Largest manifest read; a line per file, and packages have a handful of files.
pub const MAX_MANIFEST_BYTES: usize = 1024 * 1024;
/// Most entries in one manifest.
pub const MAX_MANIFEST_ENTRIES: usize = 10_000;

/// A digest algorithm a manifest may name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum Algorithm {
    /// SHA-1 (OVF 1.x default; read only).
    Sha1,
    /// SHA-256 (what vmi writes).
    Sha256,
    /// SHA-512.
    Sha512,
}

impl Algorithm {
    /// The name in a manifest line.
    pub fn name(self) -> &'static str {
        match self {
            Algorithm::Sha1 => "SHA1",
            Algorithm::Sha256 => "SHA256",
            Algorithm::Sha512 => "SHA512",
        }
    }

    fn from_name(s: &str) -> Option<Self> {
        match s.to_ascii_uppercase().as_str() {
            "SHA1" => Some(Algorithm::Sha1),
            "SHA256" => Some(Algorithm::Sha256),
            "SHA512" => Some(Algorithm::Sha512),
            _ => None,
        }
    }

    fn hex_len(self) -> usize {
        match self {
            Algorithm::Sha1 => 40,
            Algorithm::Sha256 => 64,
            Algorithm::Sha512 => 128,
        }
    }
}

/// One manifest line.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Entry {
    /// Digest algorithm.
    pub algorithm: Algorithm,
    /// File name inside the package.
    pub name: String,
    /// Lower-case hex digest.
    pub digest: String,
}

/// A parsed manifest.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Manifest {
    /// Entries in file order.
    pub entries: Vec<Entry>,
}

impl Manifest {
    /// Parse manifest text.
    pub fn parse(text: &str) -> Result<Manifest> {
        if text.len() > MAX_MANIFEST_BYTES {
            return Err(OvfError::Invalid(format!(
                "manifest is {} bytes, more than {MAX_MANIFEST_BYTES}",
                text.len()
            )));
        }
        let mut entries = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() {
                continue;
            }
            if entries.len() >= MAX_MANIFEST_ENTRIES {
                return Err(OvfError::Invalid(format!(
                    "manifest has more than {MAX_MANIFEST_ENTRIES} entries"
                )));
            }
            entries.push(parse_line(line).ok_or_else(|| {
                OvfError::Invalid(format!(
                    "manifest line {}: '{line}' is not ALGO(name)= hex",
                    n + 1
                ))
            })?);
        }
        Ok(Manifest { entries })
    }

    /// The entry for `name`.
    pub fn get(&self, name: &str) -> Option<&Entry> {
        self.entries.iter().find(|e| e.name == name)
    }

    /// Manifest text.
    pub fn to_text(&self) -> String {
        let mut s = String::new();
        for e in &self.entries {
            s.push_str(&format!(
                "{}({})= {}\n",
                e.algorithm.name(),
                e.name,
                e.digest
            ));
        }
        s
    }
}

/// Parse `ALGO(name)= hex` (the space after `=` is optional; names may contain parentheses).
fn parse_line(line: &str) -> Option<Entry> {
    let open = line.find('(')?;
    let algorithm = Algorithm::from_name(line[..open].trim())?;
    let close = line.rfind(")=")?;
    if close <= open {
        return None;
    }
    let name = line[open + 1..close].to_string();
    let digest = line[close + 2..].trim().to_ascii_lowercase();
    if name.is_empty()
        || digest.len() != algorithm.hex_len()
        || !digest.chars().all(|c| c.is_ascii_hexdigit())
    {
        return None;
    }
    Some(Entry {
        algorithm,
        name,
        digest,
    })
}

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

/// Parse hex into bytes.
pub fn unhex(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| s.get(i..i + 2).and_then(|h| u8::from_str_radix(h, 16).ok()))
        .collect()
}

/// Stream `r` through `algorithm` and return the hex digest.
pub fn digest_reader(algorithm: Algorithm, r: &mut dyn Read) -> std::io::Result<String> {
    fn run<D: sha2::Digest>(mut d: D, r: &mut dyn Read) -> std::io::Result<Vec<u8>> {
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = r.read(&mut buf)?;
            if n == 0 {
                break;
            }
            d.update(&buf[..n]);
        }
        Ok(d.finalize().to_vec())
    }
    let out = match algorithm {
        Algorithm::Sha1 => run(Sha1::new(), r)?,
        Algorithm::Sha256 => run(Sha256::new(), r)?,
        Algorithm::Sha512 => run(Sha512::new(), r)?,
    };
    Ok(hex(&out))
}

/// Digest of a byte slice.
pub fn digest_bytes(algorithm: Algorithm, mut bytes: &[u8]) -> String {
    // Reading from a slice cannot fail.
    digest_reader(algorithm, &mut bytes).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_all_three_algorithms_and_odd_names() {
        let m = Manifest::parse(&format!(
            "SHA1(a.ovf)= {}\nSHA256(disk (1).vmdk)={}\r\nSHA512(x)= {}\n",
            "a".repeat(40),
            "B".repeat(64),
            "0".repeat(128)
        ))
        .unwrap();
        assert_eq!(m.entries.len(), 3);
        assert_eq!(m.entries[1].name, "disk (1).vmdk");
        assert_eq!(m.entries[1].digest, "b".repeat(64));
        assert_eq!(m.entries[2].algorithm, Algorithm::Sha512);
    }

    #[test]
    fn rejects_wrong_digest_length_and_unknown_algorithms() {
        assert!(Manifest::parse("SHA256(a)= abcd\n").is_err());
        assert!(Manifest::parse(&format!("MD5(a)= {}\n", "0".repeat(32))).is_err());
        assert!(Manifest::parse("garbage\n").is_err());
    }

    #[test]
    fn text_round_trips_and_digests_match_known_values() {
        let d = digest_bytes(Algorithm::Sha256, b"abc");
        assert_eq!(
            d,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        let m = Manifest {
            entries: vec![Entry {
                algorithm: Algorithm::Sha256,
                name: "x".into(),
                digest: d,
            }],
        };
        assert_eq!(Manifest::parse(&m.to_text()).unwrap(), m);
        assert_eq!(unhex(&hex(&[0, 255, 16])).unwrap(), vec![0, 255, 16]);
    }
}
