//! Creation options: qemu-img's `-o key=value,...` syntax, sizes with suffixes, and the typed
//! accessors drivers use to consume them. Every key must be consumed: an unknown option is an error,
//! never silently ignored.

use crate::driver::BackingSpec;
use crate::error::{Error, Result};
use crate::secret::{Secret, Secrets};
use std::collections::BTreeMap;
use std::sync::Mutex;

/// Parse a size as qemu-img does: a number with an optional suffix `b`, `k`/`K`, `M`, `G`, `T`, `P`,
/// `E` (powers of 1024); decimals are allowed with a suffix (`1.5G`).
pub fn parse_size(s: &str) -> Result<u64> {
    let s = s.trim();
    let bad = || Error::usage(format!("invalid size '{s}'"));
    let (num, shift) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let shift = match c.to_ascii_lowercase() {
                'b' => 0,
                'k' => 10,
                'm' => 20,
                'g' => 30,
                't' => 40,
                'p' => 50,
                'e' => 60,
                _ => return Err(bad()),
            };
            (&s[..i], shift)
        }
        _ => (s, 0),
    };
    if num.is_empty() || num.starts_with('-') || num.starts_with('+') {
        return Err(bad());
    }
    if let Ok(v) = num.parse::<u64>() {
        return v
            .checked_mul(1u64 << shift)
            .ok_or_else(|| Error::usage(format!("size '{s}' is too large")));
    }
    let f: f64 = num.parse().map_err(|_| bad())?;
    let v = f * (1u64 << shift) as f64;
    if !v.is_finite() || v < 0.0 || v >= u64::MAX as f64 {
        return Err(Error::usage(format!("size '{s}' is too large")));
    }
    Ok(v as u64)
}

/// `-o` options as given, consumed by the driver that creates the image.
#[derive(Debug, Default)]
pub struct FormatOptions {
    values: BTreeMap<String, String>,
    used: Mutex<Vec<String>>,
    /// Secrets that `key-secret`-style options name by id.
    secrets: Secrets,
}

impl Clone for FormatOptions {
    fn clone(&self) -> Self {
        FormatOptions {
            values: self.values.clone(),
            used: Mutex::new(Vec::new()),
            secrets: self.secrets.clone(),
        }
    }
}

impl FormatOptions {
    /// No options.
    pub fn new() -> Self {
        Self::default()
    }

    /// Parse `key=value,key=value` (qemu's syntax; `,,` escapes a comma in a value). Several `-o`
    /// arguments may be merged by calling this repeatedly.
    pub fn parse(&mut self, s: &str) -> Result<()> {
        let mut items = Vec::new();
        let mut cur = String::new();
        let mut chars = s.chars().peekable();
        while let Some(c) = chars.next() {
            if c == ',' {
                if chars.peek() == Some(&',') {
                    chars.next();
                    cur.push(',');
                } else {
                    items.push(std::mem::take(&mut cur));
                }
            } else {
                cur.push(c);
            }
        }
        items.push(cur);
        for item in items.into_iter().filter(|i| !i.is_empty()) {
            let (k, v) = match item.split_once('=') {
                Some((k, v)) => (k.trim().to_string(), v.to_string()),
                None => (item.trim().to_string(), "on".to_string()),
            };
            if k.is_empty() {
                return Err(Error::usage(format!("invalid option '{item}'")));
            }
            self.values.insert(k.replace('-', "_"), v);
        }
        Ok(())
    }

    /// Set one option.
    pub fn set(&mut self, key: &str, value: impl Into<String>) {
        self.values.insert(key.replace('-', "_"), value.into());
    }

    /// Whether an option was given (does not consume it).
    pub fn contains(&self, key: &str) -> bool {
        self.values.contains_key(key)
    }

    fn mark(&self, key: &str) {
        self.used
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(key.to_string());
    }

    /// Take a string option.
    pub fn str(&self, key: &str) -> Option<String> {
        let v = self.values.get(key).cloned();
        if v.is_some() {
            self.mark(key);
        }
        v
    }

    /// Take a size option (`cluster_size=64k`).
    pub fn size(&self, key: &str) -> Result<Option<u64>> {
        self.str(key)
            .map(|v| parse_size(&v).map_err(|e| e.context(format!("option {key}"))))
            .transpose()
    }

    /// Take an integer option.
    pub fn u64(&self, key: &str) -> Result<Option<u64>> {
        self.str(key)
            .map(|v| {
                v.parse::<u64>()
                    .map_err(|_| Error::usage(format!("option {key}: '{v}' is not a number")))
            })
            .transpose()
    }

    /// Take a boolean option (`on`/`off`, `true`/`false`, `yes`/`no`, `1`/`0`).
    pub fn bool(&self, key: &str) -> Result<Option<bool>> {
        self.str(key)
            .map(|v| match v.as_str() {
                "on" | "true" | "yes" | "1" => Ok(true),
                "off" | "false" | "no" | "0" => Ok(false),
                _ => Err(Error::usage(format!("option {key}: '{v}' is not on/off"))),
            })
            .transpose()
    }

    /// Take an option that must be one of `choices`.
    pub fn choice(&self, key: &str, choices: &[&str]) -> Result<Option<String>> {
        match self.str(key) {
            Some(v) if choices.contains(&v.as_str()) => Ok(Some(v)),
            Some(v) => Err(Error::usage(format!(
                "option {key}: '{v}' is not one of {}",
                choices.join(", ")
            ))),
            None => Ok(None),
        }
    }

    /// Fail if any option was not consumed by the driver (qemu: "Invalid parameter").
    pub fn finish(&self, format: &str) -> Result<()> {
        let used = self.used.lock().unwrap_or_else(|e| e.into_inner());
        let unknown: Vec<&str> = self
            .values
            .keys()
            .filter(|k| !used.contains(k))
            .map(String::as_str)
            .collect();
        if unknown.is_empty() {
            Ok(())
        } else {
            Err(Error::usage(format!(
                "format {format} does not support option(s): {}",
                unknown.join(", ")
            )))
        }
    }

    /// Make `secrets` available to options that name a secret by id ([`FormatOptions::secret`]).
    pub fn set_secrets(&mut self, secrets: Secrets) {
        self.secrets = secrets;
    }

    /// Take an option that names a secret (`key-secret=sec0`) and return that secret.
    pub fn secret(&self, key: &str) -> Result<Option<Secret>> {
        self.str(key)
            .map(|id| {
                self.secrets
                    .get(&id)
                    .map_err(|e| e.context(format!("option {key}")))
            })
            .transpose()
    }

    /// Iterate over all options (for help and measure).
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.values.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }
}

/// Everything a driver needs to create an image.
#[derive(Debug, Clone, Default)]
pub struct CreateOptions {
    /// Virtual size in bytes.
    pub size: u64,
    /// Backing file to record (the caller has already validated it and taken the size from it).
    pub backing: Option<BackingSpec>,
    /// Format-specific `-o` options.
    pub options: FormatOptions,
}

impl CreateOptions {
    /// Options for a standalone image of `size` bytes.
    pub fn new(size: u64) -> Self {
        CreateOptions {
            size,
            ..Default::default()
        }
    }

    /// Record a backing file.
    pub fn backing(mut self, spec: BackingSpec) -> Self {
        self.backing = Some(spec);
        self
    }

    /// Add `-o` options.
    pub fn options(mut self, opts: FormatOptions) -> Self {
        self.options = opts;
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_binary_suffixes() {
        assert_eq!(parse_size("512").unwrap(), 512);
        assert_eq!(parse_size("64k").unwrap(), 65536);
        assert_eq!(parse_size("10G").unwrap(), 10 << 30);
        assert_eq!(parse_size("1.5M").unwrap(), 3 << 19);
        assert!(parse_size("-1").is_err());
        assert!(parse_size("16E").is_err());
        assert!(parse_size("12Q").is_err());
    }

    #[test]
    fn unknown_options_are_reported_by_finish() {
        let mut o = FormatOptions::new();
        o.parse("cluster_size=64k,bogus=1").unwrap();
        assert_eq!(o.size("cluster_size").unwrap(), Some(65536));
        let e = o.finish("qcow2").unwrap_err();
        assert!(e.to_string().contains("bogus"), "{e}");
    }

    #[test]
    fn doubled_commas_escape_commas_in_values() {
        let mut o = FormatOptions::new();
        o.parse("backing_file=a,,b.img,compat=1.1").unwrap();
        assert_eq!(o.str("backing_file").as_deref(), Some("a,b.img"));
        assert_eq!(o.str("compat").as_deref(), Some("1.1"));
    }
}
