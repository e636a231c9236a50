//! vmi-ovf: OVF envelopes (DSP0243), OVA archives, `.mf` manifests and `.cert` signatures, the
//! hardware profile every hypervisor config is generated from, native configs (VMware `.vmx`,
//! libvirt domain XML, VirtualBox), and target compatibility checks.

pub mod cli;
pub mod compat;
pub mod envelope;
pub mod error;
pub mod fuzzing;
pub mod manifest;
pub mod native;
pub mod ova;
pub mod package;
pub mod profile;
pub mod sign;
pub mod strict;
pub mod targets;
pub mod units;
pub mod xml;

pub use envelope::{Descriptor, OvfVersion, WriteOptions};
pub use error::{OvfError, Result};
pub use profile::HardwareProfile;
