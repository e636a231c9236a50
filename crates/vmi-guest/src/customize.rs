//! `customize`: change an installed Linux system without booting it, as libguestfs's
//! virt-customize does — hostname (/etc/hostname, /etc/hosts), timezone (/etc/localtime,
//! /etc/timezone), root password (SHA-512 crypt(5) into /etc/shadow), SSH authorized keys, files
//! written, uploaded, deleted, directories, permissions, and first-boot commands (a systemd
//! oneshot unit that runs each script once). Running a command inside the guest is refused: it
//! needs the guest's programs to execute, which needs a VM.
//!
//! The same steps come from the command line or from a TOML recipe:
//!
//! ```toml
//! [[step]]
//! hostname = "web01"
//! [[step]]
//! write = { path = "/etc/motd", content = "hello\n" }
//! [[step]]
//! chmod = { mode = "0600", path = "/etc/motd" }
//! ```

use crate::error::{Error, Result};
use crate::ext4::{split_path, Attrs, Ext4, FileKind};
use crate::inspect::{parse_passwd, read_text};
use serde::Deserialize;
use std::path::PathBuf;

/// Largest SSH key file `--ssh-inject USER:file:PATH` reads (uploads are streamed, not bounded).
const MAX_KEY_FILE: u64 = 1 << 20;
/// Where first-boot scripts wait for their boot.
pub const FIRSTBOOT_DIR: &str = "/var/lib/vmi-firstboot/scripts";
/// The runner the unit starts.
pub const FIRSTBOOT_RUNNER: &str = "/usr/local/sbin/vmi-firstboot";
/// The systemd unit.
pub const FIRSTBOOT_UNIT: &str = "/etc/systemd/system/vmi-firstboot.service";

/// One customisation step.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub enum Step {
    /// Set the hostname.
    Hostname(String),
    /// Set the timezone (a name under /usr/share/zoneinfo).
    Timezone(String),
    /// Set root's password: `password:SECRET`, `file:HOSTFILE`, `hash:CRYPT`, or `disabled`.
    RootPassword(String),
    /// Add an SSH key to a user's authorized_keys.
    SshInject {
        /// The account.
        user: String,
        /// The public key line.
        key: String,
    },
    /// Write a guest file.
    Write {
        /// Guest path.
        path: String,
        /// Contents.
        content: String,
    },
    /// Copy a host file into the guest.
    Upload {
        /// Host file.
        src: PathBuf,
        /// Guest path (a directory: the file keeps its name).
        dst: String,
    },
    /// Remove a guest file or directory tree.
    Delete(String),
    /// Create a guest directory and its parents.
    Mkdir(String),
    /// Change permission bits.
    Chmod {
        /// Octal mode.
        mode: String,
        /// Guest path.
        path: String,
    },
    /// Change owner.
    Chown {
        /// `UID:GID`.
        owner: String,
        /// Guest path.
        path: String,
    },
    /// Run a shell command at the guest's first boot.
    FirstbootCommand(String),
    /// Run a command in the guest now: refused.
    RunCommand(String),
}

/// A recipe file: `[[step]]` tables, applied in order.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Recipe {
    /// The steps.
    #[serde(default)]
    pub step: Vec<Step>,
}

/// Parse a TOML recipe.
pub fn parse_recipe(text: &str) -> Result<Vec<Step>> {
    toml::from_str::<Recipe>(text)
        .map(|r| r.step)
        .map_err(|e| Error::Usage(format!("recipe: {e}")))
}

/// Refuse steps that cannot be done offline, before anything changes.
pub fn check_steps(steps: &[Step]) -> Result<()> {
    for s in steps {
        if let Step::RunCommand(c) = s {
            return Err(Error::Unsupported(format!(
                "--run-command '{c}': running a program inside the guest needs the guest's \
                 architecture and kernel, i.e. a VM; vmi changes images offline only. Use \
                 --firstboot-command to run it at the guest's first boot"
            )));
        }
    }
    Ok(())
}

/// SHA-512 crypt(5) hash (`$6$…`) of a password, with a random salt.
pub fn hash_password(password: &str) -> Result<String> {
    let params = sha_crypt::Sha512Params::new(sha_crypt::ROUNDS_DEFAULT)
        .map_err(|e| Error::Usage(format!("password hash parameters: {e:?}")))?;
    sha_crypt::sha512_simple(password, &params)
        .map_err(|e| Error::Usage(format!("hashing the password: {e:?}")))
}

fn parse_mode(m: &str) -> Result<u32> {
    u32::from_str_radix(m.trim_start_matches("0o"), 8)
        .ok()
        .filter(|m| *m <= 0o7777)
        .ok_or_else(|| Error::Usage(format!("'{m}' is not an octal mode")))
}

fn write_text(fs: &Ext4<'_>, path: &str, text: &str, attrs: Option<Attrs>) -> Result<()> {
    fs.write_file(path, &mut text.as_bytes(), attrs)
}

/// Apply steps in order; returns one line per step saying what was done.
pub fn apply(fs: &Ext4<'_>, steps: &[Step]) -> Result<Vec<String>> {
    check_steps(steps)?;
    let mut log = Vec::new();
    for s in steps {
        log.push(apply_one(fs, s)?);
    }
    Ok(log)
}

fn apply_one(fs: &Ext4<'_>, step: &Step) -> Result<String> {
    Ok(match step {
        Step::Hostname(h) => {
            if h.is_empty() || h.len() > 253 || h.contains(|c: char| c.is_whitespace() || c == '/')
            {
                return Err(Error::Usage(format!("'{h}' is not a hostname")));
            }
            write_text(fs, "/etc/hostname", &format!("{h}\n"), None)?;
            let short = h.split('.').next().unwrap_or(h);
            let hosts = read_text(fs, "/etc/hosts")?.unwrap_or_default();
            let entry = if short == h {
                format!("127.0.1.1\t{h}")
            } else {
                format!("127.0.1.1\t{h} {short}")
            };
            let mut replaced = false;
            let mut lines: Vec<String> = hosts
                .lines()
                .map(|l| {
                    if l.split_whitespace().next() == Some("127.0.1.1") {
                        replaced = true;
                        entry.clone()
                    } else {
                        l.to_string()
                    }
                })
                .collect();
            if !replaced {
                lines.push(entry);
            }
            write_text(fs, "/etc/hosts", &(lines.join("\n") + "\n"), None)?;
            format!("hostname set to {h}")
        }
        Step::Timezone(tz) => {
            if tz.is_empty() || tz.split('/').any(|p| p == ".." || p.is_empty()) {
                return Err(Error::Usage(format!("'{tz}' is not a timezone name")));
            }
            let zone = format!("/usr/share/zoneinfo/{tz}");
            match fs.stat_follow(&zone) {
                Ok(st) if st.kind == FileKind::File => {}
                _ => {
                    return Err(Error::Usage(format!(
                        "timezone '{tz}': {zone} is not in the guest (is tzdata installed?)"
                    )))
                }
            }
            if fs.exists("/etc/localtime")? {
                fs.remove_tree("/etc/localtime")?;
            }
            fs.symlink("/etc/localtime", &zone)?;
            write_text(fs, "/etc/timezone", &format!("{tz}\n"), None)?;
            format!("timezone set to {tz}")
        }
        Step::RootPassword(spec) => {
            let hash = match spec.split_once(':') {
                Some(("password", p)) => hash_password(p)?,
                Some(("file", f)) => {
                    let p = std::fs::read_to_string(f)
                        .map_err(|e| Error::io(format!("reading {f}"), e))?;
                    hash_password(p.lines().next().unwrap_or(""))?
                }
                Some(("hash", h)) => h.to_string(),
                None if spec == "disabled" => "*".to_string(),
                _ => {
                    return Err(Error::Usage(format!(
                        "root password '{spec}': use password:SECRET, file:FILE, hash:CRYPT or disabled"
                    )))
                }
            };
            set_shadow(fs, "root", &hash)?;
            "root password set".to_string()
        }
        Step::SshInject { user, key } => {
            let users = read_text(fs, "/etc/passwd")?
                .map(|t| parse_passwd(&t))
                .unwrap_or_default();
            let u = users.iter().find(|u| &u.name == user).ok_or_else(|| {
                Error::Usage(format!("no user '{user}' in the guest's /etc/passwd"))
            })?;
            if !u.home.starts_with('/') {
                return Err(Error::Usage(format!(
                    "{user}'s home '{}' is not absolute",
                    u.home
                )));
            }
            let owner = Attrs {
                perm: 0o700,
                uid: u.uid,
                gid: u.gid,
            };
            fs.mkdir_p(
                &u.home,
                Attrs {
                    perm: 0o755,
                    ..owner
                },
            )?;
            let dir = format!("{}/.ssh", u.home.trim_end_matches('/'));
            if !fs.exists(&dir)? {
                fs.mkdir(&dir, owner)?;
            }
            let ak = format!("{dir}/authorized_keys");
            let mut text = read_text(fs, &ak)?.unwrap_or_default();
            let key = key.trim();
            if !text.lines().any(|l| l.trim() == key) {
                if !text.is_empty() && !text.ends_with('\n') {
                    text.push('\n');
                }
                text.push_str(key);
                text.push('\n');
            }
            write_text(
                fs,
                &ak,
                &text,
                Some(Attrs {
                    perm: 0o600,
                    ..owner
                }),
            )?;
            format!("SSH key added for {user}")
        }
        Step::Write { path, content } => {
            write_text(fs, path, content, None)?;
            format!("wrote {path}")
        }
        Step::Upload { src, dst } => {
            let mut f = std::fs::File::open(src)
                .map_err(|e| Error::io(format!("opening {}", src.display()), e))?;
            let target = match fs.stat_follow(dst) {
                Ok(st) if st.kind == FileKind::Dir => {
                    let name = src
                        .file_name()
                        .and_then(|n| n.to_str())
                        .ok_or_else(|| Error::Usage(format!("{}: no file name", src.display())))?;
                    format!("{}/{name}", dst.trim_end_matches('/'))
                }
                _ => dst.clone(),
            };
            fs.write_file(&target, &mut f, None)?;
            format!("uploaded {} to {target}", src.display())
        }
        Step::Delete(p) => match fs.remove_tree(p) {
            Ok(n) => format!("deleted {p} ({n} entries)"),
            Err(Error::NotFound(_)) => format!("{p} does not exist"),
            Err(e) => return Err(e),
        },
        Step::Mkdir(p) => {
            fs.mkdir_p(p, Attrs::root(0o755))?;
            format!("created {p}")
        }
        Step::Chmod { mode, path } => {
            fs.set_attrs(path, Some(parse_mode(mode)?), None)?;
            format!("mode of {path} set to {mode}")
        }
        Step::Chown { owner, path } => {
            let (u, g) = owner
                .split_once(':')
                .and_then(|(u, g)| Some((u.parse().ok()?, g.parse().ok()?)))
                .ok_or_else(|| Error::Usage(format!("owner '{owner}': use UID:GID")))?;
            fs.set_attrs(path, None, Some((u, g)))?;
            format!("owner of {path} set to {owner}")
        }
        Step::FirstbootCommand(cmd) => {
            install_firstboot(fs)?;
            // Scripts already waiting keep their place: number after them.
            let existing = fs.read_dir(FIRSTBOOT_DIR)?.len();
            let name = format!("{FIRSTBOOT_DIR}/{:04}-command", existing + 1);
            write_text(
                fs,
                &name,
                &format!("#!/bin/sh\n# added by vmi guest customize\n{cmd}\n"),
                Some(Attrs::root(0o755)),
            )?;
            format!("first-boot command {name}")
        }
        Step::RunCommand(_) => unreachable_refused()?,
    })
}

fn unreachable_refused() -> Result<String> {
    Err(Error::Unsupported(
        "--run-command is refused (see check_steps)".into(),
    ))
}

/// Replace `user`'s password field in /etc/shadow.
fn set_shadow(fs: &Ext4<'_>, user: &str, hash: &str) -> Result<()> {
    if hash.contains([':', '\n']) {
        return Err(Error::Usage(
            "a password hash cannot contain ':' or a newline".into(),
        ));
    }
    let text = read_text(fs, "/etc/shadow")?
        .ok_or_else(|| Error::Unsupported("the guest has no /etc/shadow".into()))?;
    let mut found = false;
    let days = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() / 86400)
        .unwrap_or(0);
    let lines: Vec<String> = text
        .lines()
        .map(|l| {
            let mut f: Vec<String> = l.split(':').map(str::to_string).collect();
            if f.len() >= 3 && f[0] == user {
                found = true;
                f[1] = hash.to_string();
                f[2] = days.to_string();
                f.join(":")
            } else {
                l.to_string()
            }
        })
        .collect();
    if !found {
        return Err(Error::Usage(format!(
            "no '{user}' entry in the guest's /etc/shadow"
        )));
    }
    write_text(fs, "/etc/shadow", &(lines.join("\n") + "\n"), None)
}

/// The runner: runs each waiting script once, in name order, and moves it to `done/` with its
/// output, so the next boot finds nothing to run.
const RUNNER: &str = r#"#!/bin/sh
# vmi first-boot runner: runs each script in /var/lib/vmi-firstboot/scripts once.
dir=/var/lib/vmi-firstboot
mkdir -p "$dir/done"
for s in "$dir"/scripts/*; do
    [ -f "$s" ] || continue
    n=$(basename "$s")
    sh "$s" >"$dir/done/$n.log" 2>&1
    echo "exit status $?" >>"$dir/done/$n.log"
    mv "$s" "$dir/done/$n"
done
"#;

/// The systemd unit: a oneshot that runs only while scripts wait.
const UNIT: &str = "[Unit]
Description=vmi first-boot commands
After=network-online.target
Wants=network-online.target
ConditionDirectoryNotEmpty=/var/lib/vmi-firstboot/scripts

[Service]
Type=oneshot
ExecStart=/usr/local/sbin/vmi-firstboot
RemainAfterExit=no

[Install]
WantedBy=multi-user.target
";

fn install_firstboot(fs: &Ext4<'_>) -> Result<()> {
    fs.mkdir_p(FIRSTBOOT_DIR, Attrs::root(0o755))?;
    let (runner_dir, _) = split_path(FIRSTBOOT_RUNNER)?;
    fs.mkdir_p(runner_dir, Attrs::root(0o755))?;
    write_text(fs, FIRSTBOOT_RUNNER, RUNNER, Some(Attrs::root(0o755)))?;
    let (unit_dir, _) = split_path(FIRSTBOOT_UNIT)?;
    fs.mkdir_p(unit_dir, Attrs::root(0o755))?;
    write_text(fs, FIRSTBOOT_UNIT, UNIT, Some(Attrs::root(0o644)))?;
    let wants = "/etc/systemd/system/multi-user.target.wants";
    fs.mkdir_p(wants, Attrs::root(0o755))?;
    let link = format!("{wants}/vmi-firstboot.service");
    if !fs.exists(&link)? {
        fs.symlink(&link, FIRSTBOOT_UNIT)?;
    }
    Ok(())
}

/// Read a key argument: `USER:file:PATH` or `USER:string:KEY`.
pub fn parse_ssh_inject(arg: &str) -> Result<Step> {
    let (user, rest) = arg.split_once(':').ok_or_else(|| {
        Error::Usage(format!(
            "--ssh-inject '{arg}': use USER:file:PATH or USER:string:KEY"
        ))
    })?;
    let key = match rest.split_once(':') {
        Some(("file", p)) => {
            let len = std::fs::metadata(p)
                .map_err(|e| Error::io(format!("reading {p}"), e))?
                .len();
            if len > MAX_KEY_FILE {
                return Err(Error::Usage(format!("{p}: too large for a key file")));
            }
            std::fs::read_to_string(p).map_err(|e| Error::io(format!("reading {p}"), e))?
        }
        Some(("string", k)) => k.to_string(),
        _ => {
            return Err(Error::Usage(format!(
                "--ssh-inject '{arg}': use USER:file:PATH or USER:string:KEY"
            )))
        }
    };
    Ok(Step::SshInject {
        user: user.to_string(),
        key,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_recipe_reads_as_ordered_steps() {
        let steps = parse_recipe(
            "[[step]]\nhostname = \"web01\"\n[[step]]\nwrite = { path = \"/etc/motd\", content = \"hi\" }\n\
             [[step]]\nchmod = { mode = \"0600\", path = \"/etc/motd\" }\n[[step]]\nfirstboot-command = \"echo hi\"\n",
        )
        .unwrap();
        assert_eq!(
            steps,
            vec![
                Step::Hostname("web01".into()),
                Step::Write {
                    path: "/etc/motd".into(),
                    content: "hi".into()
                },
                Step::Chmod {
                    mode: "0600".into(),
                    path: "/etc/motd".into()
                },
                Step::FirstbootCommand("echo hi".into()),
            ]
        );
        assert!(parse_recipe("[[step]]\nformat = \"/\"\n").is_err());
    }

    #[test]
    fn run_command_is_refused_before_anything_changes() {
        let e = check_steps(&[
            Step::Hostname("a".into()),
            Step::RunCommand("apt-get update".into()),
        ])
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("needs") && e.contains("VM") && e.contains("--firstboot-command"),
            "{e}"
        );
    }

    #[test]
    fn passwords_hash_as_sha512_crypt_that_verifies() {
        let h = hash_password("s3cret").unwrap();
        assert!(h.starts_with("$6$"), "{h}");
        assert!(sha_crypt::sha512_check("s3cret", &h).is_ok());
        assert!(sha_crypt::sha512_check("other", &h).is_err());
    }
}
