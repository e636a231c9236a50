//! The client side of image signatures: `vmi image keys add|list|show|delete`, `vmi image sign`
//! (prints the four `img_signature*` properties for a file), `vmi image create --sign` and
//! `vmi image download --verify` (checks the downloaded file against the image's signature
//! properties with the key fetched from the registry, or a local `--key`).

use super::crypto::{encode_signature, HashMethod, KeyMaterial, PrivateKey};
use super::{SignatureProps, CERT_UUID, HASH_METHOD, KEY_TYPE, SIGNATURE};
use crate::client::RegistryClient;
use crate::error::{RegistryError, Result};
use clap::Subcommand;
use serde_json::Value;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

/// Read size when hashing a local file.
const READ_BYTES: usize = 1 << 20;

/// `vmi image keys` subcommands.
#[derive(Debug, Clone, Subcommand)]
pub enum KeysCommand {
    /// Register a public key or certificate (PEM) with your project.
    Add {
        /// PEM file: a PUBLIC KEY (RSA, ECDSA P-256/P-384/P-521, Ed25519) or a CERTIFICATE.
        file: PathBuf,
        /// A name for the key.
        #[arg(long)]
        name: Option<String>,
    },
    /// List your project's signing keys.
    List,
    /// Show one key, with its PEM.
    Show {
        /// Key id.
        id: String,
    },
    /// Remove keys.
    Delete {
        /// Key ids.
        #[arg(required = true)]
        ids: Vec<String>,
    },
}

fn io_err(what: &str, p: &Path, e: std::io::Error) -> RegistryError {
    RegistryError::io(format!("{what} {}", p.display()), e)
}

fn read_text(p: &Path) -> Result<String> {
    let meta = std::fs::metadata(p).map_err(|e| io_err("reading", p, e))?;
    if meta.len() > super::crypto::MAX_PEM_BYTES as u64 {
        return Err(RegistryError::BadRequest(format!(
            "{} is too large for a PEM key ({} bytes)",
            p.display(),
            meta.len()
        )));
    }
    std::fs::read_to_string(p).map_err(|e| io_err("reading", p, e))
}

/// The digest of a local file with `hash`.
pub fn file_digest(path: &Path, hash: HashMethod) -> Result<Vec<u8>> {
    let mut f = std::fs::File::open(path).map_err(|e| io_err("opening", path, e))?;
    let mut h = hash.hasher();
    let mut buf = vec![0u8; READ_BYTES];
    loop {
        let n = f.read(&mut buf).map_err(|e| io_err("reading", path, e))?;
        if n == 0 {
            break;
        }
        h.update(buf.get(..n).unwrap_or_default());
    }
    Ok(h.finish())
}

/// The four signature properties for `file` signed with the private key in `key_file`;
/// `key_id` is the registered key's id.
pub fn sign_properties(
    file: &Path,
    key_file: &Path,
    key_id: &str,
    hash: HashMethod,
) -> Result<Vec<(String, String)>> {
    let key = PrivateKey::from_pem(&read_text(key_file)?)?;
    let digest = file_digest(file, hash)?;
    let sig = key.sign_digest(hash, &digest)?;
    Ok(vec![
        (SIGNATURE.into(), encode_signature(&sig)),
        (HASH_METHOD.into(), hash.name().into()),
        (KEY_TYPE.into(), key.key_type().name().into()),
        (CERT_UUID.into(), key_id.into()),
    ])
}

/// Check `file` against the signature properties of `image` (its JSON) with `key`.
pub fn verify_file(file: &Path, image: &Value, key: &KeyMaterial) -> Result<SignatureProps> {
    let props = SignatureProps::from_lookup(|k| image.get(k).and_then(Value::as_str))?.ok_or_else(
        || {
            RegistryError::BadRequest(format!(
                "image {} is not signed (it has no {SIGNATURE} property)",
                image["id"].as_str().unwrap_or("")
            ))
        },
    )?;
    key.check_valid_at(chrono::Utc::now())?;
    let digest = file_digest(file, props.hash)?;
    key.key
        .verify_digest(props.key_type, props.hash, &digest, &props.signature)
        .map_err(|e| {
            RegistryError::BadRequest(format!(
                "signature verification of {} failed: {e}",
                file.display()
            ))
        })?;
    Ok(props)
}

/// `vmi image download --verify`: verify the downloaded `file` of image `id`, with the key
/// from `key_file` or else the one the image names, fetched from the registry. Returns a line
/// describing what was verified.
pub async fn verify_download(
    c: &RegistryClient,
    id: &str,
    file: &Path,
    key_file: Option<&Path>,
) -> Result<String> {
    let image = c.show(id).await?;
    let (key, source) = match key_file {
        Some(p) => (
            KeyMaterial::from_pem(&read_text(p)?)?,
            p.display().to_string(),
        ),
        None => {
            let kid = image[CERT_UUID].as_str().ok_or_else(|| {
                RegistryError::BadRequest(format!(
                    "image {id} is not signed (it has no {CERT_UUID} property)"
                ))
            })?;
            let k = c.signing_key(kid).await?;
            let pem = k["pem"].as_str().unwrap_or_default();
            (KeyMaterial::from_pem(pem)?, format!("registry key {kid}"))
        }
    };
    let f = file.to_path_buf();
    let props = tokio::task::spawn_blocking(move || verify_file(&f, &image, &key))
        .await
        .map_err(|e| RegistryError::io("verifying", std::io::Error::other(e)))??;
    Ok(format!(
        "{}: {} {} signature verified with {source}",
        file.display(),
        props.key_type.name(),
        props.hash.name()
    ))
}

/// `vmi image sign FILE --key PRIVATE.pem --key-id ID`: print the properties, as
/// `KEY=VALUE` lines ready for `--property`, or as JSON.
pub fn run_sign(
    out: &mut dyn Write,
    file: &Path,
    key_file: &Path,
    key_id: &str,
    hash: &str,
    as_json: bool,
) -> Result<()> {
    let props = sign_properties(file, key_file, key_id, HashMethod::parse(hash)?)?;
    let text = if as_json {
        let m: serde_json::Map<String, Value> = props
            .into_iter()
            .map(|(k, v)| (k, Value::String(v)))
            .collect();
        serde_json::to_string_pretty(&m).unwrap_or_default()
    } else {
        props
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join("\n")
    };
    writeln!(out, "{text}").map_err(|e| RegistryError::io("writing output", e))
}

/// `vmi image keys …`
pub async fn run_keys(
    c: &RegistryClient,
    cmd: &KeysCommand,
    out: &mut dyn Write,
    as_json: bool,
) -> Result<()> {
    let w = |out: &mut dyn Write, s: String| {
        writeln!(out, "{s}").map_err(|e| RegistryError::io("writing output", e))
    };
    let pretty = |v: &Value| serde_json::to_string_pretty(v).unwrap_or_default();
    match cmd {
        KeysCommand::Add { file, name } => {
            let pem = read_text(file)?;
            // Parse locally first for a clear error before anything is sent.
            KeyMaterial::from_pem(&pem)?;
            let k = c.signing_key_add(&pem, name.as_deref()).await?;
            if as_json {
                return w(out, pretty(&k));
            }
            w(
                out,
                format!(
                    "registered {} ({} {}, sha256 {})",
                    k["id"].as_str().unwrap_or(""),
                    k["form"].as_str().unwrap_or(""),
                    k["key_type"].as_str().unwrap_or(""),
                    k["fingerprint"].as_str().unwrap_or("")
                ),
            )
        }
        KeysCommand::List => {
            let keys = c.signing_keys().await?;
            if as_json {
                return w(out, pretty(&Value::Array(keys)));
            }
            w(
                out,
                format!(
                    "{:<36}  {:<20}  {:<13}  {:<11}  {}",
                    "ID", "NAME", "KEY TYPE", "FORM", "NOT AFTER"
                ),
            )?;
            for k in keys {
                w(
                    out,
                    format!(
                        "{:<36}  {:<20}  {:<13}  {:<11}  {}",
                        k["id"].as_str().unwrap_or(""),
                        k["name"].as_str().unwrap_or(""),
                        k["key_type"].as_str().unwrap_or(""),
                        k["form"].as_str().unwrap_or(""),
                        k["not_after"].as_str().unwrap_or("")
                    ),
                )?;
            }
            Ok(())
        }
        KeysCommand::Show { id } => {
            let k = c.signing_key(id).await?;
            if as_json {
                return w(out, pretty(&k));
            }
            let mut lines = Vec::new();
            if let Some(m) = k.as_object() {
                for (key, v) in m {
                    if key != "pem" {
                        lines.push(format!("{key:<12} {}", v.as_str().unwrap_or("")));
                    }
                }
            }
            lines.push(k["pem"].as_str().unwrap_or("").trim_end().to_string());
            w(out, lines.join("\n"))
        }
        KeysCommand::Delete { ids } => {
            for id in ids {
                c.signing_key_delete(id).await?;
                w(out, format!("deleted signing key {id}"))?;
            }
            Ok(())
        }
    }
}
