//! `vmi serve` without the `vmi` binary: runs the registry with the same arguments, for
//! scripts (`tests/glanceclient.sh`, `bench/registry.sh`) and local development.
//!
//! `cargo run -p vmi-registry --example serve -- --data-dir /tmp/reg --listen 127.0.0.1:9292`

use clap::Parser;
use std::process::ExitCode;
use vmi_registry::cli::{run_serve, ServeArgs};

#[derive(Parser)]
#[command(name = "vmi-serve", about = "Run the vmi image registry")]
struct Cli {
    #[command(flatten)]
    serve: ServeArgs,
}

fn main() -> ExitCode {
    match run_serve(Cli::parse().serve) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vmi serve: {}", vmi_registry::error::chain(&e));
            ExitCode::FAILURE
        }
    }
}
