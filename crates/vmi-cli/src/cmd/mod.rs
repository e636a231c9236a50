//! One module per command; each has clap `Args` and a `run` returning the exit code.

pub mod check;
pub mod clone;
pub mod commit;
pub mod compare;
pub mod convert;
pub mod create;
pub mod guest;
pub mod info;
pub mod map;
pub mod measure;
pub mod rebase;
pub mod resize;
pub mod snapshot;
