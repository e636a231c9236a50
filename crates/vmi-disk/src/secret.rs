//! Secrets for encrypted images, as qemu names them: a `secret` object has an id and bytes
//! (`--object secret,id=sec0,data=...`), and an image's options refer to it by id
//! (`key-secret=sec0`, `encrypt.key-secret=sec0`).
//!
//! The bytes live in [`zeroize::Zeroizing`] buffers that are wiped when the last reference goes,
//! and `Debug` never prints them.

use crate::error::{Error, Result};
use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use zeroize::Zeroizing;

/// A passphrase (or any key material), wiped from memory when dropped.
#[derive(Clone)]
pub struct Secret(Arc<Zeroizing<Vec<u8>>>);

impl Secret {
    /// A secret holding `bytes` (taken, so the caller keeps no copy).
    pub fn new(bytes: Vec<u8>) -> Self {
        Secret(Arc::new(Zeroizing::new(bytes)))
    }

    /// The secret's bytes.
    pub fn expose(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// Secrets by id, as `--object secret,id=...` defines them.
#[derive(Clone, Default)]
pub struct Secrets(BTreeMap<String, Secret>);

impl Secrets {
    /// No secrets.
    pub fn new() -> Self {
        Self::default()
    }

    /// Define secret `id` (a later definition of the same id is an error, as in qemu).
    pub fn insert(&mut self, id: &str, secret: Secret) -> Result<()> {
        if self.0.contains_key(id) {
            return Err(Error::usage(format!(
                "attempt to add duplicate secret object '{id}'"
            )));
        }
        self.0.insert(id.to_string(), secret);
        Ok(())
    }

    /// The secret named `id`.
    pub fn get(&self, id: &str) -> Result<Secret> {
        self.0.get(id).cloned().ok_or_else(|| {
            Error::usage(format!(
                "no secret with id '{id}' (define it with --object secret,id={id},...)"
            ))
        })
    }

    /// Whether no secret is defined.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Secrets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.0.keys()).finish()
    }
}
