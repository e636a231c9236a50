//! LUKS2 (cryptsetup's "LUKS2 On-Disk Format Specification"): placeholder until read support lands.

use super::crypto::CipherSpec;
use crate::error::{Error, Result};
use crate::storage::Storage;
use zeroize::Zeroizing;

/// A parsed LUKS2 header.
#[derive(Debug)]
pub struct Header {
    /// Payload cipher.
    pub spec: CipherSpec,
    /// Payload start.
    pub payload_offset: u64,
}

/// Check the binary header.
pub fn parse_binary(_head: &[u8]) -> Result<()> {
    Err(Error::unsupported("LUKS version 2"))
}

impl Header {
    /// Read the header.
    pub fn read(_st: &dyn Storage, _region: u64) -> Result<Header> {
        Err(Error::unsupported("LUKS version 2"))
    }
    /// Unlock.
    pub fn unlock(&self, _st: &dyn Storage, _pass: &[u8]) -> Result<Zeroizing<Vec<u8>>> {
        Err(Error::unsupported("LUKS version 2"))
    }
    /// Info.
    pub fn info(&self) -> serde_json::Value {
        serde_json::Value::Null
    }
}
