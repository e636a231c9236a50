//! One module per command; each has clap `Args` and a `run` returning the exit code.

pub mod check;
pub mod compare;
pub mod convert;
pub mod create;
pub mod info;
pub mod map;
pub mod measure;
pub mod resize;
