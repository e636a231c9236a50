//! The `vmi` command: qemu-img's verbs (create, info, convert, check, compare, map, measure,
//! resize) with qemu-img's option names, output and exit codes, over the vmi libraries.
//!
//! This crate only parses arguments, prints and chooses exit codes; every format decision is made
//! by `vmi-disk` and every copy by `vmi-convert`. Files named inside images (backing files, data
//! files) are opened only through the gate, which denies them unless `--allow-backing` /
//! `--allow-data-file` say otherwise. Exit codes are listed in `docs/cli.md`.

mod cmd;
mod common;
mod progress;

use clap::{Parser, Subcommand};
use common::GateArgs;
use std::process::ExitCode;

/// Exit code for a failed command (qemu-img's `EXIT_FAILURE`).
const EXIT_ERROR: u8 = 1;
/// Exit code `compare` uses for errors, so that 1 keeps meaning "the images differ".
const EXIT_COMPARE_ERROR: u8 = 2;
/// Exit code of a conversion stopped by SIGINT/SIGTERM (128 + SIGINT, as a shell reports it).
const EXIT_INTERRUPTED: u8 = 130;

/// The exit-code table shown by `vmi --help` (and in docs/cli.md).
const EXIT_CODES_HELP: &str = "\
Exit codes:
  0   success; compare: identical; check: no problems
  1   error; compare: the images differ; check: the check could not complete
  2   compare: error; check: corruptions found
  3   check: only leaked clusters found
  63  check: the format does not support checks
  130 convert: interrupted (SIGINT/SIGTERM); the temporary output was removed";

/// Virtual machine disk images: create, inspect, convert, check and compare them.
///
/// Options and output follow qemu-img. Images are untrusted: files an image names (backing
/// files, external data files) are not opened unless allowed with --allow-backing /
/// --allow-data-file.
#[derive(Debug, Parser)]
#[command(
    name = "vmi",
    version,
    propagate_version = true,
    max_term_width = 100,
    after_help = EXIT_CODES_HELP
)]
struct Cli {
    #[command(flatten)]
    gate: GateArgs,
    #[command(flatten)]
    keys: common::KeyArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create a new image.
    Create(cmd::create::Args),
    /// Show facts about an image (size, format, backing file, format-specific data).
    Info(cmd::info::Args),
    /// Copy an image into a new one, possibly of another format.
    Convert(cmd::convert::Args),
    /// Check an image's metadata for consistency (and repair it with -r).
    Check(cmd::check::Args),
    /// Compare the guest contents of two images.
    Compare(cmd::compare::Args),
    /// Show how the image's guest ranges are stored.
    Map(cmd::map::Args),
    /// Compute the file size an image needs.
    Measure(cmd::measure::Args),
    /// Change an image's virtual size.
    Resize(cmd::resize::Args),
    /// List, create, apply or delete internal snapshots (qcow2).
    Snapshot(cmd::snapshot::Args),
    /// Change the backing file of an overlay (safe, or header only with -u).
    Rebase(cmd::rebase::Args),
    /// Merge an overlay into its backing file.
    Commit(cmd::commit::Args),
    /// Clone an image: a full copy, or a thin linked overlay.
    Clone(cmd::clone::Args),
    /// Package, unpack, verify and inspect OVF/OVA appliances.
    Ovf(vmi_ovf::cli::OvfArgs),
    /// Check an image and hardware profile against a target hypervisor or cloud.
    Compat(vmi_ovf::cli::CompatArgs),
    /// Run the image registry (Glance v2 compatible API, Keystone v3 tokens).
    Serve(vmi_registry::cli::ServeArgs),
    /// Talk to an image registry: list, show, create, upload, download, set, delete, share.
    Image(vmi_registry::cli::ImageArgs),
    /// Inspect, sysprep, customize and sparsify the OS inside an image, without booting it.
    Guest(cmd::guest::Args),
    /// Administer a registry's projects, users and role assignments.
    Admin(vmi_registry::admin_cli::AdminArgs),
}

fn main() -> ExitCode {
    // The global flags take their values with `=`, so the first plain word is the command.
    // `--object` and `--key-file` take the next word as their value.
    let args: Vec<String> = std::env::args().skip(1).collect();
    let is_compare = args
        .iter()
        .enumerate()
        .find(|(i, a)| {
            !a.starts_with('-')
                && (*i == 0 || !matches!(args[i - 1].as_str(), "--object" | "--key-file"))
        })
        .is_some_and(|(_, a)| a == "compare");
    let error_code = if is_compare {
        EXIT_COMPARE_ERROR
    } else {
        EXIT_ERROR
    };
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(error_code)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    match run(cli) {
        Ok(code) => ExitCode::from(code),
        Err(e) if common::is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) if common::cancelled() => {
            // Interrupted by SIGINT/SIGTERM after cleaning up: the shell's 128 + SIGINT.
            eprintln!("vmi: {e:#}");
            ExitCode::from(EXIT_INTERRUPTED)
        }
        Err(e) => {
            eprintln!("vmi: {e:#}");
            ExitCode::from(error_code)
        }
    }
}

/// Run one command; `Ok` carries the exit code of a command that completed (check and compare
/// report their findings through it).
fn run(cli: Cli) -> anyhow::Result<u8> {
    common::init_keys(&cli.keys)?;
    let gate = &cli.gate;
    match cli.command {
        Command::Create(a) => cmd::create::run(gate, a),
        Command::Info(a) => cmd::info::run(gate, a),
        Command::Convert(a) => cmd::convert::run(gate, a),
        Command::Check(a) => cmd::check::run(gate, a),
        Command::Compare(a) => cmd::compare::run(gate, a),
        Command::Map(a) => cmd::map::run(gate, a),
        Command::Measure(a) => cmd::measure::run(gate, a),
        Command::Resize(a) => cmd::resize::run(gate, a),
        Command::Snapshot(a) => cmd::snapshot::run(gate, a),
        Command::Rebase(a) => cmd::rebase::run(gate, a),
        Command::Commit(a) => cmd::commit::run(gate, a),
        Command::Clone(a) => cmd::clone::run(gate, a),
        Command::Ovf(a) => exit_code(vmi_ovf::cli::run_ovf(&a, &mut std::io::stdout().lock())?),
        Command::Compat(a) => {
            exit_code(vmi_ovf::cli::run_compat(&a, &mut std::io::stdout().lock())?)
        }
        Command::Serve(a) => vmi_registry::cli::run_serve(a)
            .map(|()| 0)
            .map_err(Into::into),
        Command::Image(a) => vmi_registry::cli::run_image(a)
            .map(|()| 0)
            .map_err(Into::into),
        Command::Guest(a) => cmd::guest::run(gate, a),
        Command::Admin(a) => vmi_registry::admin_cli::run_admin(a)
            .map(|()| 0)
            .map_err(Into::into),
    }
}

/// A subcommand's exit status as a process exit code.
fn exit_code(code: i32) -> anyhow::Result<u8> {
    u8::try_from(code).map_err(|_| anyhow::anyhow!("exit code {code} out of range"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Cli {
        Cli::try_parse_from(std::iter::once("vmi").chain(args.iter().copied())).unwrap()
    }

    #[test]
    fn backing_files_are_denied_without_the_flag() {
        let cli = parse(&["info", "a.img"]);
        assert!(!cli.gate.gate(false).backing_allowed());
        assert!(
            cli.gate.gate(true).backing_allowed(),
            "--backing-chain allows"
        );
    }

    #[test]
    fn allow_backing_without_a_folder_confines_to_the_image_folder() {
        let cli = parse(&["--allow-backing", "info", "a.img"]);
        let gate = cli.gate.gate(false);
        assert!(gate.backing_allowed());
        assert_eq!(gate.root(), None, "rooted at the image when opened");
    }

    #[test]
    fn allow_backing_with_a_folder_confines_to_it_after_the_command_too() {
        let cli = parse(&["info", "--allow-backing=/srv/images", "a.img"]);
        let gate = cli.gate.gate(false);
        assert!(gate.backing_allowed());
        assert_eq!(gate.root(), Some(std::path::Path::new("/srv/images")));
    }

    #[test]
    fn resize_accepts_a_negative_size() {
        assert!(matches!(
            parse(&["resize", "--shrink", "a.img", "-1G"]).command,
            Command::Resize(_)
        ));
    }
}
