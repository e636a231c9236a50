//! Image signatures: Glance's `img_signature*` properties verified on upload against signing
//! keys registered per project, and the per-project "signed images only" policy.
//!
//! An image is signed when it carries Glance's four signature properties
//! ([`SIGNATURE`], [`HASH_METHOD`], [`KEY_TYPE`], [`CERT_UUID`]). Glance looks the certificate
//! up in a key manager (Barbican) by `img_signature_certificate_uuid`; vmi looks it up among the
//! keys registered with `POST /v2/signing-keys` in the image owner's project (see
//! [`crate::api::signing`]), so clients send the vmi key id there. [`verify_upload`] is called
//! once the data is stored and its digests are known, before the image becomes active: a bad
//! signature refuses the upload (400) and the caller discards the data and puts the image back
//! to `queued`, as Glance's `image_data.upload` does (`_restore`).
//!
//! [`crypto`] holds the key parsing and the signature schemes; [`cli`] the client side
//! (`vmi image keys …`, `vmi image sign`, `vmi image download --verify`).

pub mod cli;
pub mod crypto;

use crate::catalog::signing::SigningKeyRecord;
use crate::digest::DigestValues;
use crate::error::{RegistryError, Result};
use crate::model::ImageRecord;
use crate::server::App;
use crypto::{decode_signature, HashMethod, KeyMaterial, KeyType};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};

/// Glance's property holding the base64 signature.
pub const SIGNATURE: &str = "img_signature";
/// Glance's property naming the hash method (`SHA-256`, …).
pub const HASH_METHOD: &str = "img_signature_hash_method";
/// Glance's property naming the signature scheme (`RSA-PSS`, `ECC_SECP384R1`, …).
pub const KEY_TYPE: &str = "img_signature_key_type";
/// Glance's property naming the certificate; in vmi, the id of a registered signing key.
pub const CERT_UUID: &str = "img_signature_certificate_uuid";
/// The four signature properties, all required once one is set.
pub const PROPERTIES: [&str; 4] = [SIGNATURE, HASH_METHOD, KEY_TYPE, CERT_UUID];

/// `[signing]` in the service configuration.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SigningConfig {
    /// Every project must sign its images.
    pub require_signed: bool,
    /// Projects (names or ids) that must sign their images.
    pub require_signed_projects: Vec<String>,
}

/// An image's signature properties, parsed.
#[derive(Debug, Clone)]
pub struct SignatureProps {
    /// The decoded signature.
    pub signature: Vec<u8>,
    /// The hash method.
    pub hash: HashMethod,
    /// The scheme.
    pub key_type: KeyType,
    /// The signing key's id.
    pub key_id: String,
}

impl SignatureProps {
    /// The signature properties of `props` (an image's properties, or the client's view of
    /// the image JSON): `None` when none is set, an error when only some are or one is invalid.
    pub fn from_lookup<'a>(get: impl Fn(&str) -> Option<&'a str>) -> Result<Option<Self>> {
        let present: Vec<&str> = PROPERTIES
            .iter()
            .copied()
            .filter(|p| get(p).is_some())
            .collect();
        if present.is_empty() {
            return Ok(None);
        }
        let missing: Vec<&str> = PROPERTIES
            .iter()
            .copied()
            .filter(|p| get(p).is_none())
            .collect();
        if !missing.is_empty() {
            return Err(RegistryError::BadRequest(format!(
                "Signature verification failed: the image has {} but not {}",
                present.join(", "),
                missing.join(", ")
            )));
        }
        let v = |k: &str| get(k).unwrap_or_default();
        Ok(Some(SignatureProps {
            signature: decode_signature(v(SIGNATURE))?,
            hash: HashMethod::parse(v(HASH_METHOD))?,
            key_type: KeyType::parse(v(KEY_TYPE))?,
            key_id: v(CERT_UUID).trim().to_string(),
        }))
    }

    /// The signature properties of a stored image.
    pub fn of_image(img: &ImageRecord) -> Result<Option<Self>> {
        Self::from_lookup(|k| img.properties.get(k).map(String::as_str))
    }
}

/// Whether `project_id` (named `project_name`) must sign its images.
pub fn requires_signature(
    cfg: &SigningConfig,
    project_id: &str,
    project_name: Option<&str>,
) -> bool {
    cfg.require_signed
        || cfg
            .require_signed_projects
            .iter()
            .any(|p| p == project_id || Some(p.as_str()) == project_name)
}

/// The registered key `id` as seen from images of `owner`: keys of other projects are
/// "unknown", like keys that do not exist.
pub async fn owner_key(app: &App, owner: &str, id: &str) -> Result<SigningKeyRecord> {
    match app.catalog.get_signing_key(id).await? {
        Some(k) if k.project_id == owner => Ok(k),
        _ => Err(RegistryError::BadRequest(format!(
            "Signature verification failed: no signing key {id} is registered in the image's \
             project (img_signature_certificate_uuid must be the id of a key from \
             POST /v2/signing-keys)"
        ))),
    }
}

/// The binary digest of the stored data with `hash`: from the digests computed while the data
/// streamed where possible, else by reading the stored object again.
async fn data_digest(
    app: &App,
    hash: HashMethod,
    digests: &DigestValues,
    location: &str,
) -> Result<Vec<u8>> {
    let from_hex =
        |h: &str| hex::decode(h).map_err(|e| RegistryError::store("decoding a computed digest", e));
    match hash {
        HashMethod::Sha256 => from_hex(&digests.sha256),
        HashMethod::Sha512 => from_hex(&digests.sha512),
        HashMethod::Sha384 => {
            let mut stream = app.data.read(location, None).await?;
            let mut h = hash.hasher();
            while let Some(chunk) = stream.next().await {
                let chunk = chunk.map_err(|e| RegistryError::io("re-reading the upload", e))?;
                h.update(&chunk);
            }
            Ok(h.finish())
        }
    }
}

/// The signature checks that need no data, run before a byte of an upload, stage, resumable
/// upload or import is received: an unsigned image of a project that requires signatures, and
/// signature properties that are malformed or name a key the project does not have, are refused
/// at once instead of after the transfer. [`verify_upload`] checks everything again with the
/// data.
pub async fn check_before_data(app: &App, img: &ImageRecord) -> Result<()> {
    match SignatureProps::of_image(img)? {
        None => refuse_unsigned(app, img).await,
        Some(props) => owner_key(app, &img.owner, &props.key_id).await.map(|_| ()),
    }
}

/// Refuse an unsigned image when its project requires signatures.
async fn refuse_unsigned(app: &App, img: &ImageRecord) -> Result<()> {
    let cfg = &app.config.signing;
    if !cfg.require_signed && cfg.require_signed_projects.is_empty() {
        return Ok(());
    }
    let name = app.catalog.get_project(&img.owner).await?.map(|p| p.name);
    if requires_signature(&app.config.signing, &img.owner, name.as_deref()) {
        return Err(RegistryError::Forbidden(format!(
            "Project {} accepts only signed images: set {} before uploading",
            name.as_deref().unwrap_or(&img.owner),
            PROPERTIES.join(", ")
        )));
    }
    Ok(())
}

/// Verify the signature of the data just stored at `location` for `img`, or refuse an
/// unsigned image of a project that requires signatures. Called after the digests are computed
/// and before the image becomes active; an error means the data must not be kept.
pub async fn verify_upload(
    app: &App,
    img: &ImageRecord,
    digests: &DigestValues,
    location: &str,
) -> Result<()> {
    let Some(props) = SignatureProps::of_image(img)? else {
        return refuse_unsigned(app, img).await;
    };
    let rec = owner_key(app, &img.owner, &props.key_id).await?;
    let key = KeyMaterial::from_pem(&rec.pem)?;
    let fail = |e: RegistryError| {
        RegistryError::BadRequest(format!(
            "Signature verification failed for image {}: {e}",
            img.id
        ))
    };
    key.check_valid_at(app.clock.now()).map_err(fail)?;
    let digest = data_digest(app, props.hash, digests, location).await?;
    key.key
        .verify_digest(props.key_type, props.hash, &digest, &props.signature)
        .map_err(fail)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn props(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn unsigned_images_have_no_signature_and_partial_ones_are_errors() {
        let none = props(&[("os_distro", "debian")]);
        assert!(
            SignatureProps::from_lookup(|k| none.get(k).map(String::as_str))
                .unwrap()
                .is_none()
        );
        let partial = props(&[(SIGNATURE, "AAAA"), (KEY_TYPE, "ED25519")]);
        let e = SignatureProps::from_lookup(|k| partial.get(k).map(String::as_str)).unwrap_err();
        assert!(
            e.to_string().contains(
                "has img_signature, img_signature_key_type but not \
                 img_signature_hash_method, img_signature_certificate_uuid"
            ),
            "{e}"
        );
        let full = props(&[
            (SIGNATURE, "AAEC"),
            (HASH_METHOD, "SHA-512"),
            (KEY_TYPE, "ED25519"),
            (CERT_UUID, " k1 "),
        ]);
        let p = SignatureProps::from_lookup(|k| full.get(k).map(String::as_str))
            .unwrap()
            .unwrap();
        assert_eq!(p.signature, vec![0, 1, 2]);
        assert_eq!(p.hash, HashMethod::Sha512);
        assert_eq!(p.key_id, "k1");
    }

    #[test]
    fn the_policy_names_projects_by_id_or_name_or_covers_all() {
        let mut cfg = SigningConfig::default();
        assert!(!requires_signature(&cfg, "p1", Some("alpha")));
        cfg.require_signed_projects = vec!["alpha".into(), "p2".into()];
        assert!(requires_signature(&cfg, "p1", Some("alpha")));
        assert!(requires_signature(&cfg, "p2", None));
        assert!(!requires_signature(&cfg, "p3", Some("gamma")));
        cfg.require_signed = true;
        assert!(requires_signature(&cfg, "p3", Some("gamma")));
    }

    #[test]
    fn the_signing_section_parses_from_the_configuration_file() {
        let c = crate::Config::from_toml("[signing]\nrequire_signed_projects = [\"releases\"]\n")
            .unwrap();
        assert_eq!(c.signing.require_signed_projects, vec!["releases"]);
        assert!(!c.signing.require_signed);
        assert!(crate::Config::from_toml("[signing]\nrequire = true\n").is_err());
    }
}
