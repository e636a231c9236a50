//! Consistency checks: the report `vmi check` prints, with qemu-img's fields and exit-code meaning.

use serde::Serialize;

/// What `check` may repair (qemu-img's `-r`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CheckMode {
    /// Only report.
    #[default]
    ReadOnly,
    /// Repair leaked clusters (safe: nothing referenced is touched).
    RepairLeaks,
    /// Repair leaks and corruptions.
    RepairAll,
}

/// Result of a check. Serialises with qemu-img's JSON keys.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct CheckReport {
    /// Clusters referenced but with a wrong refcount, overlapping metadata, bad table entries.
    #[serde(skip_serializing_if = "is_zero")]
    pub corruptions: u64,
    /// Clusters with a refcount but no reference.
    #[serde(skip_serializing_if = "is_zero")]
    pub leaks: u64,
    /// Errors that stopped the check from completing part of its work.
    pub check_errors: u64,
    /// Corruptions repaired.
    #[serde(skip_serializing_if = "is_zero")]
    pub corruptions_fixed: u64,
    /// Leaks repaired.
    #[serde(skip_serializing_if = "is_zero")]
    pub leaks_fixed: u64,
    /// End of the last allocated host cluster.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub image_end_offset: Option<u64>,
    /// Guest clusters in the image.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub total_clusters: Option<u64>,
    /// Guest clusters allocated.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allocated_clusters: Option<u64>,
    /// Allocated guest clusters not contiguous with their predecessor on the host.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fragmented_clusters: Option<u64>,
    /// Compressed guest clusters.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub compressed_clusters: Option<u64>,
    /// Human-readable findings, one per line (qemu-img prints these as `ERROR ...`/`Leaked ...`).
    #[serde(skip)]
    pub messages: Vec<String>,
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

impl CheckReport {
    /// qemu-img's exit code: 0 clean, 2 corruptions (or check errors: 3 is leaks only), 3 leaks.
    pub fn exit_code(&self) -> u8 {
        if self.check_errors > 0 {
            1
        } else if self.corruptions > 0 {
            2
        } else if self.leaks > 0 {
            3
        } else {
            0
        }
    }
}
