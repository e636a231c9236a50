//! Test helpers shared by every crate's tests: qemu-img / qemu-io wrappers, fixture builders that
//! generate images at test time, and the conformance suite every format driver runs.

pub mod conformance;
pub mod fixtures;
pub mod qemu;

pub use fixtures::*;
pub use qemu::*;
