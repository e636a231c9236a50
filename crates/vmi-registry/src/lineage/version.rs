//! Image versions within a family: semantic versions (Semantic Versioning 2.0.0, §2–§11) and
//! calendar versions (`YYYY.MM.DD` or `YYYYMMDD`).
//!
//! Both kinds order by their three numbers first — a date `2024.03.01` compares as `2024.3.1` —
//! so a family that switches from `1.4.2` to dated builds keeps a sensible order (dates sort
//! after every `major < 1000` release). Semantic pre-releases sort before their release and among
//! themselves by SemVer §11: identifier by identifier, numeric ones numerically and below
//! alphanumeric ones, which compare in ASCII order; a shorter list sorts first when all shared
//! identifiers are equal. Build metadata (§10) is kept for display but ignored by the ordering,
//! so `1.0.0+a` and `1.0.0+b` are the same version of a family.

use std::cmp::Ordering;
use std::fmt;

/// Longest version string accepted (Glance's property name width is the same).
pub const MAX_VERSION_LEN: usize = 255;

/// Which notation a version was written in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VersionKind {
    /// `MAJOR.MINOR.PATCH[-PRE][+BUILD]`.
    Semantic,
    /// `YYYY.MM.DD` or `YYYYMMDD`.
    Date,
}

/// One dot-separated pre-release identifier (SemVer §9).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Ident {
    /// Digits only, no leading zero.
    Numeric(u64),
    /// Anything else from `[0-9A-Za-z-]`.
    Alpha(String),
}

impl Ord for Ident {
    fn cmp(&self, other: &Self) -> Ordering {
        match (self, other) {
            (Ident::Numeric(a), Ident::Numeric(b)) => a.cmp(b),
            (Ident::Numeric(_), Ident::Alpha(_)) => Ordering::Less,
            (Ident::Alpha(_), Ident::Numeric(_)) => Ordering::Greater,
            (Ident::Alpha(a), Ident::Alpha(b)) => a.as_bytes().cmp(b.as_bytes()),
        }
    }
}

impl PartialOrd for Ident {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// A parsed image version. Equality and ordering are SemVer precedence (build metadata
/// ignored); [`fmt::Display`] gives back the text it was parsed from.
#[derive(Debug, Clone)]
pub struct Version {
    kind: VersionKind,
    numbers: [u64; 3],
    pre: Vec<Ident>,
    text: String,
}

impl Version {
    /// Parse a version, or say what is wrong with it.
    pub fn parse(s: &str) -> Result<Version, String> {
        if s.is_empty() || s.len() > MAX_VERSION_LEN {
            return Err(format!("version must be 1 to {MAX_VERSION_LEN} characters"));
        }
        if let Some(v) = parse_date(s) {
            return Ok(v);
        }
        parse_semver(s).map_err(|why| {
            format!(
                "invalid version '{s}': {why} (use MAJOR.MINOR.PATCH with an optional \
                 -PRERELEASE, or a date YYYY.MM.DD / YYYYMMDD)"
            )
        })
    }

    /// The notation it was written in.
    pub fn kind(&self) -> VersionKind {
        self.kind
    }

    /// Whether it is a pre-release (never true for dates).
    pub fn is_prerelease(&self) -> bool {
        !self.pre.is_empty()
    }

    /// A text that two versions share exactly when they are equal (`2024.06.01` and `20240601`
    /// both give `2024.6.1`; build metadata is dropped): what the catalog's uniqueness index on
    /// a family's versions stores.
    pub fn key(&self) -> String {
        let [a, b, c] = self.numbers;
        let mut k = format!("{a}.{b}.{c}");
        for (i, id) in self.pre.iter().enumerate() {
            k.push(if i == 0 { '-' } else { '.' });
            match id {
                Ident::Numeric(n) => k.push_str(&n.to_string()),
                Ident::Alpha(s) => k.push_str(s),
            }
        }
        k
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl PartialEq for Version {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Version {}

impl Ord for Version {
    fn cmp(&self, other: &Self) -> Ordering {
        self.numbers.cmp(&other.numbers).then_with(|| {
            match (self.pre.is_empty(), other.pre.is_empty()) {
                (true, true) => Ordering::Equal,
                // A release has higher precedence than its pre-releases (§11.3).
                (true, false) => Ordering::Greater,
                (false, true) => Ordering::Less,
                // Identifier by identifier, then the longer list wins (§11.4).
                (false, false) => self.pre.cmp(&other.pre),
            }
        })
    }
}

impl PartialOrd for Version {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// `YYYY.MM.DD` or `YYYYMMDD` naming a real calendar day.
fn parse_date(s: &str) -> Option<Version> {
    let b = s.as_bytes();
    // Only ASCII digits and dots pass, so the slices below fall on character boundaries.
    if !b.iter().all(|c| c.is_ascii_digit() || *c == b'.') {
        return None;
    }
    let (y, m, d) = match b.len() {
        10 if b[4] == b'.' && b[7] == b'.' => (&s[0..4], &s[5..7], &s[8..10]),
        8 => (&s[0..4], &s[4..6], &s[6..8]),
        _ => return None,
    };
    if ![y, m, d]
        .iter()
        .all(|p| p.bytes().all(|c| c.is_ascii_digit()))
    {
        return None;
    }
    let (y, m, d): (i32, u32, u32) = (y.parse().ok()?, m.parse().ok()?, d.parse().ok()?);
    chrono::NaiveDate::from_ymd_opt(y, m, d)?;
    Some(Version {
        kind: VersionKind::Date,
        numbers: [u64::try_from(y).ok()?, u64::from(m), u64::from(d)],
        pre: Vec::new(),
        text: s.to_string(),
    })
}

/// A numeric identifier: digits, no leading zero (§2, §9).
fn numeric(part: &str, what: &str) -> Result<u64, String> {
    if part.is_empty() || !part.bytes().all(|c| c.is_ascii_digit()) {
        return Err(format!("{what} must be a number"));
    }
    if part.len() > 1 && part.starts_with('0') {
        return Err(format!("{what} must not have leading zeros"));
    }
    part.parse()
        .map_err(|_| format!("{what} {part} is too large"))
}

fn ident_chars_ok(part: &str) -> bool {
    !part.is_empty() && part.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'-')
}

fn parse_semver(s: &str) -> Result<Version, String> {
    let (rest, build) = match s.split_once('+') {
        Some((r, b)) => (r, Some(b)),
        None => (s, None),
    };
    if let Some(b) = build {
        if !b.split('.').all(ident_chars_ok) {
            return Err("build metadata must be dot-separated [0-9A-Za-z-] identifiers".into());
        }
    }
    let (core, pre) = match rest.split_once('-') {
        Some((c, p)) => (c, Some(p)),
        None => (rest, None),
    };
    let parts: Vec<&str> = core.split('.').collect();
    let [major, minor, patch] = parts.as_slice() else {
        return Err("expected three numbers MAJOR.MINOR.PATCH".into());
    };
    let numbers = [
        numeric(major, "MAJOR")?,
        numeric(minor, "MINOR")?,
        numeric(patch, "PATCH")?,
    ];
    let mut idents = Vec::new();
    if let Some(p) = pre {
        for part in p.split('.') {
            if !ident_chars_ok(part) {
                return Err(
                    "pre-release must be dot-separated non-empty [0-9A-Za-z-] identifiers".into(),
                );
            }
            if part.bytes().all(|c| c.is_ascii_digit()) {
                idents.push(Ident::Numeric(numeric(
                    part,
                    "a numeric pre-release identifier",
                )?));
            } else {
                idents.push(Ident::Alpha(part.to_string()));
            }
        }
    }
    Ok(Version {
        kind: VersionKind::Semantic,
        numbers,
        pre: idents,
        text: s.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_equal_exactly_when_versions_are() {
        let all = [
            "1.0.0",
            "1.0.0+build",
            "1.0.0-rc.1",
            "1.0.0-rc.1+x",
            "1.0.0-rc.01x",
            "1.0.0-rc-1",
            "1.0.0-1",
            "1.0.0-alpha",
            "2024.06.01",
            "20240601",
            "2024.6.1",
            "2024.06.02",
            "0.0.0",
        ];
        for a in all {
            for b in all {
                let (va, vb) = (Version::parse(a).unwrap(), Version::parse(b).unwrap());
                assert_eq!(va == vb, va.key() == vb.key(), "{a} vs {b}");
            }
        }
        assert_eq!(Version::parse("20240601").unwrap().key(), "2024.6.1");
        assert_eq!(Version::parse("1.2.3-rc.1+b").unwrap().key(), "1.2.3-rc.1");
    }

    fn v(s: &str) -> Version {
        Version::parse(s).unwrap()
    }

    #[test]
    fn semver_precedence_follows_the_specification_example() {
        // The chain from SemVer 2.0.0 §11.4.
        let chain = [
            "1.0.0-alpha",
            "1.0.0-alpha.1",
            "1.0.0-alpha.beta",
            "1.0.0-beta",
            "1.0.0-beta.2",
            "1.0.0-beta.11",
            "1.0.0-rc.1",
            "1.0.0",
            "1.0.1",
            "1.1.0",
            "2.0.0",
            "10.0.0",
        ];
        for w in chain.windows(2) {
            assert!(v(w[0]) < v(w[1]), "{} < {}", w[0], w[1]);
        }
    }

    #[test]
    fn build_metadata_is_ignored_by_precedence() {
        assert_eq!(v("1.0.0+a"), v("1.0.0+b.2"));
        assert_eq!(v("1.0.0+a").to_string(), "1.0.0+a");
    }

    #[test]
    fn dates_parse_in_both_forms_and_compare_by_day() {
        assert_eq!(v("2024.03.01"), v("20240301"));
        assert!(v("2024.02.29") < v("2024.03.01"));
        assert_eq!(v("20240301").kind(), VersionKind::Date);
        assert!(v("1.9.9") < v("2024.01.01"));
        assert!(Version::parse("2023.02.29").is_err());
        assert!(Version::parse("2024.13.01").is_err());
    }

    #[test]
    fn malformed_versions_are_refused_with_a_reason() {
        for bad in [
            "",
            "1",
            "1.2",
            "1.2.3.4",
            "01.2.3",
            "1.2.3-",
            "1.2.3-01",
            "1.2.3-a..b",
            "1.2.3+",
            "v1.2.3",
            "1.2.3-ä",
            "99999999999999999999.0.0",
        ] {
            assert!(Version::parse(bad).is_err(), "{bad:?} should be refused");
        }
        assert!(Version::parse("1.2.3-0a.x-y+build.007").is_ok());
    }
}
