//! The vmi image registry: a Glance v2 compatible HTTP service.
//!
//! The service is layered so that each layer can be replaced without touching the others:
//!
//! - [`api`] speaks HTTP (axum): Glance's Image API v2, a Keystone v3 subset for tokens, and maps
//!   every error to a status code and JSON body in one place ([`error`]).
//! - [`policy`] decides who may see and change what (Glance's default policy).
//! - [`catalog`] stores images, tags, properties, members, projects, users, role assignments and
//!   tokens behind the [`catalog::Catalog`] trait; [`catalog::sqlite`] is the embedded backend,
//!   with its migrations in `migrations/sqlite/`.
//! - [`data`] stores image bytes behind the [`data::ImageData`] trait; [`data::WholeObjectData`]
//!   keeps one object per upload in an `object_store` (local files now, S3-compatible later).
//! - [`config`] builds the effective configuration from defaults, a TOML file, environment
//!   variables and flags; [`server`] assembles everything and runs it; [`cli`] holds the
//!   command-line arguments the `vmi` binary exposes; [`client`] is the HTTP client behind
//!   `vmi image …`.

pub mod admin_cli;
pub mod api;
pub mod audit;
pub mod auth;
pub mod catalog;
pub mod cli;
pub mod client;
pub mod clock;
pub mod config;
pub mod data;
pub mod digest;
pub mod error;
#[doc(hidden)]
pub mod fuzzing;
pub mod guards;
pub mod import;
pub mod leases;
pub mod lifecycle;
pub mod lineage;
pub mod login;
pub mod model;
pub mod policies;
pub mod policy;
pub mod server;
pub mod signing;

pub use config::Config;
pub use error::{RegistryError, Result};
pub use server::{App, Registry};
