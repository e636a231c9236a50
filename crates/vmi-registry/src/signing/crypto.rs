//! The cryptography of image signatures: parsing registered keys (PEM SubjectPublicKeyInfo,
//! RFC 5280 §4.1.2.7, or a PEM X.509 certificate, RFC 5280 §4.1), verifying a signature over an
//! image's data digest, and (for `vmi image sign`) making one with a PKCS#8, PKCS#1 or SEC1
//! private key.
//!
//! What is signed follows Glance (the `cursive` library behind it): the signature is computed
//! over the image data with the hash method named in `img_signature_hash_method`, so the value
//! the signature scheme consumes is the data's digest. For the schemes that take a prehashed
//! message this is exactly what vmi verifies, from the digests it computes while the data
//! streams:
//!
//! - `RSA-PSS` (RFC 8017 §8.1): MGF1 with the same hash as the message, as Glance does. Glance
//!   verifies with `PSS.MAX_LENGTH`, which OpenSSL treats as "recover the salt length from the
//!   signature"; the salt lengths signers produce in practice are the maximum
//!   (`emLen - hLen - 2`, OpenSSL's and `cryptography`'s default for signing) and the digest
//!   length (`rsa_pss_saltlen:digest`, OpenSSL 3.1's FIPS default), and both are accepted.
//! - `ECC_SECP256R1`, `ECC_SECP384R1`, `ECC_SECP521R1` (FIPS 186-5 ECDSA): the signature is the
//!   DER `Ecdsa-Sig-Value` (RFC 3279 §2.2.3) that OpenSSL and `cryptography` produce; the raw
//!   fixed-size `r || s` form is accepted too.
//! - `ED25519` (a vmi extension; RFC 8032 §5.1 PureEdDSA): Ed25519 cannot sign a prehash, so
//!   the message is the binary digest itself (`openssl dgst -sha256 -binary FILE`).

use crate::error::{RegistryError, Result};
use base64::Engine as _;
use chrono::{DateTime, Utc};
use p256::ecdsa::signature::hazmat::{PrehashSigner, PrehashVerifier};
use rsa::pkcs1::DecodeRsaPrivateKey;
use rsa::pkcs8::{DecodePrivateKey, DecodePublicKey};
use rsa::traits::PublicKeyParts;
use rsa::{Pss, RsaPrivateKey, RsaPublicKey};
use sha2::{Digest, Sha256, Sha384, Sha512};
use spki::der::{Decode, Encode};
use spki::ObjectIdentifier;

/// Largest PEM document accepted for a key or certificate (a 4096-bit RSA certificate chain
/// element is about 2 KiB of PEM; 64 KiB leaves room for long extensions).
pub const MAX_PEM_BYTES: usize = 64 << 10;
/// Largest decoded signature: a 4096-bit RSA signature is 512 bytes (RFC 8017 §8.1.1); the
/// rsa crate refuses larger moduli.
pub const MAX_SIGNATURE_BYTES: usize = 1024;
/// Smallest RSA modulus accepted for a signing key, bits (NIST SP 800-131A: 2048).
pub const MIN_RSA_BITS: usize = 2048;

/// `rsaEncryption` (RFC 8017 Appendix C).
const OID_RSA: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.1.1");
/// `id-ecPublicKey` (RFC 5480 §2.1.1).
const OID_EC: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.2.1");
/// `secp256r1` (RFC 5480 §2.1.1.1).
const OID_P256: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.3.1.7");
/// `secp384r1` (RFC 5480 §2.1.1.1).
const OID_P384: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.132.0.34");
/// `secp521r1` (RFC 5480 §2.1.1.1).
const OID_P521: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.132.0.35");
/// `id-Ed25519` (RFC 8410 §3).
const OID_ED25519: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.101.112");

fn bad(msg: impl Into<String>) -> RegistryError {
    RegistryError::BadRequest(msg.into())
}

/// `img_signature_hash_method` values (cursive's `HASH_METHODS`, less SHA-224).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HashMethod {
    /// `SHA-256`
    Sha256,
    /// `SHA-384`
    Sha384,
    /// `SHA-512`
    Sha512,
}

impl HashMethod {
    /// Parse Glance's name.
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "SHA-256" => Ok(HashMethod::Sha256),
            "SHA-384" => Ok(HashMethod::Sha384),
            "SHA-512" => Ok(HashMethod::Sha512),
            _ => Err(bad(format!(
                "img_signature_hash_method '{s}' is not supported: use SHA-256, SHA-384 or SHA-512"
            ))),
        }
    }

    /// Glance's name.
    pub fn name(self) -> &'static str {
        match self {
            HashMethod::Sha256 => "SHA-256",
            HashMethod::Sha384 => "SHA-384",
            HashMethod::Sha512 => "SHA-512",
        }
    }

    /// Digest length, bytes.
    pub fn digest_len(self) -> usize {
        match self {
            HashMethod::Sha256 => 32,
            HashMethod::Sha384 => 48,
            HashMethod::Sha512 => 64,
        }
    }

    /// A running hasher for this method.
    pub fn hasher(self) -> Hasher {
        match self {
            HashMethod::Sha256 => Hasher::Sha256(Sha256::new()),
            HashMethod::Sha384 => Hasher::Sha384(Sha384::new()),
            HashMethod::Sha512 => Hasher::Sha512(Sha512::new()),
        }
    }
}

/// A running digest of one [`HashMethod`].
#[derive(Clone)]
pub enum Hasher {
    /// SHA-256.
    Sha256(Sha256),
    /// SHA-384.
    Sha384(Sha384),
    /// SHA-512.
    Sha512(Sha512),
}

impl Hasher {
    /// Add data.
    pub fn update(&mut self, data: &[u8]) {
        match self {
            Hasher::Sha256(h) => h.update(data),
            Hasher::Sha384(h) => h.update(data),
            Hasher::Sha512(h) => h.update(data),
        }
    }

    /// The binary digest.
    pub fn finish(self) -> Vec<u8> {
        match self {
            Hasher::Sha256(h) => h.finalize().to_vec(),
            Hasher::Sha384(h) => h.finalize().to_vec(),
            Hasher::Sha512(h) => h.finalize().to_vec(),
        }
    }
}

/// `img_signature_key_type` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyType {
    /// `RSA-PSS`
    RsaPss,
    /// `ECC_SECP256R1` (not in cursive's list, which starts at 384-bit curves; accepted here)
    EccP256,
    /// `ECC_SECP384R1`
    EccP384,
    /// `ECC_SECP521R1`
    EccP521,
    /// `ED25519` (vmi extension)
    Ed25519,
}

impl KeyType {
    /// Parse Glance's name.
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "RSA-PSS" => Ok(KeyType::RsaPss),
            "ECC_SECP256R1" => Ok(KeyType::EccP256),
            "ECC_SECP384R1" => Ok(KeyType::EccP384),
            "ECC_SECP521R1" => Ok(KeyType::EccP521),
            "ED25519" => Ok(KeyType::Ed25519),
            _ => Err(bad(format!(
                "img_signature_key_type '{s}' is not supported: use RSA-PSS, ECC_SECP256R1, \
                 ECC_SECP384R1, ECC_SECP521R1 or ED25519"
            ))),
        }
    }

    /// Glance's name.
    pub fn name(self) -> &'static str {
        match self {
            KeyType::RsaPss => "RSA-PSS",
            KeyType::EccP256 => "ECC_SECP256R1",
            KeyType::EccP384 => "ECC_SECP384R1",
            KeyType::EccP521 => "ECC_SECP521R1",
            KeyType::Ed25519 => "ED25519",
        }
    }
}

/// A public key that can verify image signatures.
#[derive(Clone)]
pub enum PublicKey {
    /// RSA (verified with PSS).
    Rsa(RsaPublicKey),
    /// ECDSA on P-256.
    P256(p256::ecdsa::VerifyingKey),
    /// ECDSA on P-384.
    P384(p384::ecdsa::VerifyingKey),
    /// ECDSA on P-521.
    P521(Box<p521::ecdsa::VerifyingKey>),
    /// Ed25519.
    Ed25519(ed25519_dalek::VerifyingKey),
}

impl std::fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe())
    }
}

impl PublicKey {
    /// The signature key type this key verifies.
    pub fn key_type(&self) -> KeyType {
        match self {
            PublicKey::Rsa(_) => KeyType::RsaPss,
            PublicKey::P256(_) => KeyType::EccP256,
            PublicKey::P384(_) => KeyType::EccP384,
            PublicKey::P521(_) => KeyType::EccP521,
            PublicKey::Ed25519(_) => KeyType::Ed25519,
        }
    }

    /// A short description: algorithm and size.
    pub fn describe(&self) -> String {
        match self {
            PublicKey::Rsa(k) => format!("RSA {} bits", k.n().bits()),
            PublicKey::P256(_) => "ECDSA P-256".into(),
            PublicKey::P384(_) => "ECDSA P-384".into(),
            PublicKey::P521(_) => "ECDSA P-521".into(),
            PublicKey::Ed25519(_) => "Ed25519".into(),
        }
    }

    /// Parse a DER SubjectPublicKeyInfo (RFC 5280 §4.1.2.7).
    pub fn from_spki_der(der: &[u8]) -> Result<Self> {
        let info = spki::SubjectPublicKeyInfoRef::from_der(der).map_err(|e| {
            bad(format!(
                "the public key is not a valid SubjectPublicKeyInfo: {e}"
            ))
        })?;
        let oid = info.algorithm.oid;
        let point = info.subject_public_key.raw_bytes();
        if oid == OID_RSA {
            let k = RsaPublicKey::from_public_key_der(der)
                .map_err(|e| bad(format!("the RSA public key is invalid: {e}")))?;
            let bits = k.n().bits();
            if bits < MIN_RSA_BITS {
                return Err(bad(format!(
                    "the RSA key has {bits} bits; at least {MIN_RSA_BITS} are required"
                )));
            }
            Ok(PublicKey::Rsa(k))
        } else if oid == OID_EC {
            let curve: ObjectIdentifier = info
                .algorithm
                .parameters
                .and_then(|p| p.decode_as().ok())
                .ok_or_else(|| bad("the EC public key names no curve"))?;
            let ec = |e: p256::ecdsa::Error| bad(format!("the EC public key is invalid: {e}"));
            if curve == OID_P256 {
                Ok(PublicKey::P256(
                    p256::ecdsa::VerifyingKey::from_sec1_bytes(point).map_err(ec)?,
                ))
            } else if curve == OID_P384 {
                Ok(PublicKey::P384(
                    p384::ecdsa::VerifyingKey::from_sec1_bytes(point).map_err(ec)?,
                ))
            } else if curve == OID_P521 {
                Ok(PublicKey::P521(Box::new(
                    p521::ecdsa::VerifyingKey::from_sec1_bytes(point).map_err(ec)?,
                )))
            } else {
                Err(bad(format!(
                    "EC curve {curve} is not supported: use P-256, P-384 or P-521"
                )))
            }
        } else if oid == OID_ED25519 {
            let bytes: [u8; 32] = point
                .try_into()
                .map_err(|_| bad(format!("an Ed25519 key is 32 bytes, not {}", point.len())))?;
            Ok(PublicKey::Ed25519(
                ed25519_dalek::VerifyingKey::from_bytes(&bytes)
                    .map_err(|e| bad(format!("the Ed25519 public key is invalid: {e}")))?,
            ))
        } else {
            Err(bad(format!(
                "public key algorithm {oid} is not supported: use RSA, ECDSA (P-256, P-384, \
                 P-521) or Ed25519"
            )))
        }
    }

    /// Verify `signature` over `digest` (the data's digest with `hash`) as `key_type` says.
    pub fn verify_digest(
        &self,
        key_type: KeyType,
        hash: HashMethod,
        digest: &[u8],
        signature: &[u8],
    ) -> Result<()> {
        if key_type != self.key_type() {
            return Err(bad(format!(
                "img_signature_key_type is {} but the key is {}",
                key_type.name(),
                self.describe()
            )));
        }
        if digest.len() != hash.digest_len() {
            return Err(bad(format!(
                "a {} digest is {} bytes, not {}",
                hash.name(),
                hash.digest_len(),
                digest.len()
            )));
        }
        let invalid = || bad("the signature does not match the image data and key");
        let ok = match self {
            PublicKey::Rsa(k) => {
                let em_len = (k.n().bits() + 6) / 8;
                let max_salt = em_len.saturating_sub(hash.digest_len() + 2);
                [max_salt, hash.digest_len()].into_iter().any(|salt| {
                    let pss = match hash {
                        HashMethod::Sha256 => Pss::new_with_salt::<Sha256>(salt),
                        HashMethod::Sha384 => Pss::new_with_salt::<Sha384>(salt),
                        HashMethod::Sha512 => Pss::new_with_salt::<Sha512>(salt),
                    };
                    k.verify(pss, digest, signature).is_ok()
                })
            }
            PublicKey::P256(k) => {
                let sig = p256::ecdsa::Signature::from_der(signature)
                    .or_else(|_| p256::ecdsa::Signature::from_slice(signature))
                    .map_err(|_| invalid())?;
                k.verify_prehash(digest, &sig).is_ok()
            }
            PublicKey::P384(k) => {
                let sig = p384::ecdsa::Signature::from_der(signature)
                    .or_else(|_| p384::ecdsa::Signature::from_slice(signature))
                    .map_err(|_| invalid())?;
                k.verify_prehash(digest, &sig).is_ok()
            }
            PublicKey::P521(k) => {
                let sig = p521::ecdsa::Signature::from_der(signature)
                    .or_else(|_| p521::ecdsa::Signature::from_slice(signature))
                    .map_err(|_| invalid())?;
                k.verify_prehash(digest, &sig).is_ok()
            }
            PublicKey::Ed25519(k) => {
                let sig = ed25519_dalek::Signature::from_slice(signature).map_err(|_| invalid())?;
                k.verify_strict(digest, &sig).is_ok()
            }
        };
        if ok {
            Ok(())
        } else {
            Err(invalid())
        }
    }
}

/// What a registered key was given as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyForm {
    /// A bare public key.
    PublicKey,
    /// An X.509 certificate, with its validity period (RFC 5280 §4.1.2.5) and subject.
    Certificate {
        /// `notBefore`.
        not_before: DateTime<Utc>,
        /// `notAfter`.
        not_after: DateTime<Utc>,
        /// The subject's distinguished name (RFC 4514 text).
        subject: String,
    },
}

/// A parsed registered key: a public key or a certificate.
#[derive(Debug, Clone)]
pub struct KeyMaterial {
    /// The key that verifies.
    pub key: PublicKey,
    /// Bare key or certificate.
    pub form: KeyForm,
    /// Hex SHA-256 of the DER (of the certificate, or of the SubjectPublicKeyInfo).
    pub fingerprint: String,
}

fn to_utc(t: x509_cert::time::Time) -> Result<DateTime<Utc>> {
    let secs = i64::try_from(t.to_unix_duration().as_secs())
        .map_err(|_| bad("the certificate has a validity date out of range"))?;
    DateTime::from_timestamp(secs, 0).ok_or_else(|| bad("the certificate has an invalid date"))
}

impl KeyMaterial {
    /// Parse a PEM `PUBLIC KEY` (SubjectPublicKeyInfo) or `CERTIFICATE`.
    pub fn from_pem(pem: &str) -> Result<Self> {
        if pem.len() > MAX_PEM_BYTES {
            return Err(bad(format!(
                "the key is {} bytes of PEM; at most {MAX_PEM_BYTES} are accepted",
                pem.len()
            )));
        }
        let (label, doc) = spki::Document::from_pem(pem.trim())
            .map_err(|e| bad(format!("the key is not valid PEM: {e}")))?;
        let der = doc.as_bytes();
        let fingerprint = hex::encode(Sha256::digest(der));
        match label {
            "PUBLIC KEY" => Ok(KeyMaterial {
                key: PublicKey::from_spki_der(der)?,
                form: KeyForm::PublicKey,
                fingerprint,
            }),
            "CERTIFICATE" => {
                let cert = x509_cert::Certificate::from_der(der)
                    .map_err(|e| bad(format!("the certificate is invalid: {e}")))?;
                let tbs = &cert.tbs_certificate;
                let spki_der = tbs
                    .subject_public_key_info
                    .to_der()
                    .map_err(|e| bad(format!("the certificate's public key is invalid: {e}")))?;
                Ok(KeyMaterial {
                    key: PublicKey::from_spki_der(&spki_der)?,
                    form: KeyForm::Certificate {
                        not_before: to_utc(tbs.validity.not_before)?,
                        not_after: to_utc(tbs.validity.not_after)?,
                        subject: tbs.subject.to_string(),
                    },
                    fingerprint,
                })
            }
            other => Err(bad(format!(
                "expected a PEM PUBLIC KEY or CERTIFICATE, found {other}"
            ))),
        }
    }

    /// Refuse a certificate outside its validity period at `now`.
    pub fn check_valid_at(&self, now: DateTime<Utc>) -> Result<()> {
        if let KeyForm::Certificate {
            not_before,
            not_after,
            ..
        } = &self.form
        {
            if now < *not_before {
                return Err(bad(format!(
                    "the signing certificate is not valid before {}",
                    not_before.to_rfc3339()
                )));
            }
            if now > *not_after {
                return Err(bad(format!(
                    "the signing certificate expired at {}",
                    not_after.to_rfc3339()
                )));
            }
        }
        Ok(())
    }
}

/// Decode `img_signature` (standard base64, padding optional, whitespace ignored).
pub fn decode_signature(b64: &str) -> Result<Vec<u8>> {
    let clean: String = b64.chars().filter(|c| !c.is_whitespace()).collect();
    if clean.len() > MAX_SIGNATURE_BYTES * 4 / 3 + 4 {
        return Err(bad(format!(
            "img_signature is longer than a {MAX_SIGNATURE_BYTES}-byte signature"
        )));
    }
    base64::engine::general_purpose::STANDARD
        .decode(clean.trim_end_matches('='))
        .or_else(|_| {
            base64::engine::general_purpose::STANDARD_NO_PAD.decode(clean.trim_end_matches('='))
        })
        .map_err(|e| bad(format!("img_signature is not valid base64: {e}")))
}

/// Encode a signature for `img_signature`.
pub fn encode_signature(sig: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(sig)
}

/// A private key for signing images (client side).
pub enum PrivateKey {
    /// RSA, signing with PSS (salt length = digest length).
    Rsa(Box<RsaPrivateKey>),
    /// ECDSA P-256.
    P256(p256::ecdsa::SigningKey),
    /// ECDSA P-384.
    P384(p384::ecdsa::SigningKey),
    /// ECDSA P-521.
    P521(Box<p521::ecdsa::SigningKey>),
    /// Ed25519.
    Ed25519(Box<ed25519_dalek::SigningKey>),
}

impl PrivateKey {
    /// Parse a PEM `PRIVATE KEY` (PKCS#8, RFC 5208), `RSA PRIVATE KEY` (PKCS#1, RFC 8017
    /// Appendix A.1.2) or `EC PRIVATE KEY` (SEC1, RFC 5915). Encrypted keys are not supported.
    pub fn from_pem(pem: &str) -> Result<Self> {
        let (label, doc) = spki::Document::from_pem(pem.trim())
            .map_err(|e| bad(format!("the private key is not valid PEM: {e}")))?;
        let der = doc.as_bytes();
        let inv = |e: String| bad(format!("the private key is invalid: {e}"));
        match label {
            "PRIVATE KEY" => {
                let info =
                    rsa::pkcs8::PrivateKeyInfo::try_from(der).map_err(|e| inv(e.to_string()))?;
                let oid = info.algorithm.oid;
                if oid == OID_RSA {
                    Ok(PrivateKey::Rsa(Box::new(
                        RsaPrivateKey::from_pkcs8_der(der).map_err(|e| inv(e.to_string()))?,
                    )))
                } else if oid == OID_ED25519 {
                    Ok(PrivateKey::Ed25519(Box::new(
                        ed25519_dalek::SigningKey::from_pkcs8_der(der)
                            .map_err(|e| inv(e.to_string()))?,
                    )))
                } else if oid == OID_EC {
                    if let Ok(k) = p256::SecretKey::from_pkcs8_der(der) {
                        Ok(PrivateKey::P256(k.into()))
                    } else if let Ok(k) = p384::SecretKey::from_pkcs8_der(der) {
                        Ok(PrivateKey::P384(k.into()))
                    } else {
                        let k = p521::SecretKey::from_pkcs8_der(der)
                            .map_err(|e| inv(format!("unsupported or invalid EC key: {e}")))?;
                        Ok(PrivateKey::P521(Box::new(p521_signing_key(&k)?)))
                    }
                } else {
                    Err(inv(format!("algorithm {oid} is not supported")))
                }
            }
            "RSA PRIVATE KEY" => Ok(PrivateKey::Rsa(Box::new(
                RsaPrivateKey::from_pkcs1_der(der).map_err(|e| inv(e.to_string()))?,
            ))),
            "EC PRIVATE KEY" => {
                if let Ok(k) = p256::SecretKey::from_sec1_der(der) {
                    Ok(PrivateKey::P256(k.into()))
                } else if let Ok(k) = p384::SecretKey::from_sec1_der(der) {
                    Ok(PrivateKey::P384(k.into()))
                } else {
                    let k = p521::SecretKey::from_sec1_der(der)
                        .map_err(|e| inv(format!("unsupported or invalid EC key: {e}")))?;
                    Ok(PrivateKey::P521(Box::new(p521_signing_key(&k)?)))
                }
            }
            other => Err(bad(format!(
                "expected a PEM PRIVATE KEY, RSA PRIVATE KEY or EC PRIVATE KEY, found {other}"
            ))),
        }
    }

    /// The key type its signatures have.
    pub fn key_type(&self) -> KeyType {
        match self {
            PrivateKey::Rsa(_) => KeyType::RsaPss,
            PrivateKey::P256(_) => KeyType::EccP256,
            PrivateKey::P384(_) => KeyType::EccP384,
            PrivateKey::P521(_) => KeyType::EccP521,
            PrivateKey::Ed25519(_) => KeyType::Ed25519,
        }
    }

    /// The matching public key as PEM SubjectPublicKeyInfo.
    pub fn public_key_pem(&self) -> Result<String> {
        use spki::EncodePublicKey;
        let le = spki::der::pem::LineEnding::LF;
        let r = match self {
            PrivateKey::Rsa(k) => k.to_public_key().to_public_key_pem(le),
            PrivateKey::P256(k) => k.verifying_key().to_public_key_pem(le),
            PrivateKey::P384(k) => k.verifying_key().to_public_key_pem(le),
            PrivateKey::P521(k) => {
                let point = p521::ecdsa::VerifyingKey::from(&**k).to_encoded_point(false);
                p521::PublicKey::from_sec1_bytes(point.as_bytes())
                    .map_err(|e| bad(e.to_string()))?
                    .to_public_key_pem(le)
            }
            PrivateKey::Ed25519(k) => k.verifying_key().to_public_key_pem(le),
        };
        r.map_err(|e| bad(format!("encoding the public key: {e}")))
    }

    /// Sign `digest`, the data's digest with `hash`.
    pub fn sign_digest(&self, hash: HashMethod, digest: &[u8]) -> Result<Vec<u8>> {
        let fail = |e: String| bad(format!("signing failed: {e}"));
        match self {
            PrivateKey::Rsa(k) => {
                let mut rng = rand::rngs::OsRng;
                let pss = match hash {
                    HashMethod::Sha256 => Pss::new::<Sha256>(),
                    HashMethod::Sha384 => Pss::new::<Sha384>(),
                    HashMethod::Sha512 => Pss::new::<Sha512>(),
                };
                k.sign_with_rng(&mut rng, pss, digest)
                    .map_err(|e| fail(e.to_string()))
            }
            PrivateKey::P256(k) => {
                let s: p256::ecdsa::Signature =
                    k.sign_prehash(digest).map_err(|e| fail(e.to_string()))?;
                Ok(s.to_der().as_bytes().to_vec())
            }
            PrivateKey::P384(k) => {
                let s: p384::ecdsa::Signature =
                    k.sign_prehash(digest).map_err(|e| fail(e.to_string()))?;
                Ok(s.to_der().as_bytes().to_vec())
            }
            PrivateKey::P521(k) => {
                use p256::ecdsa::signature::hazmat::RandomizedPrehashSigner;
                let s: p521::ecdsa::Signature = k
                    .sign_prehash_with_rng(&mut rand::rngs::OsRng, digest)
                    .map_err(|e| fail(e.to_string()))?;
                Ok(s.to_der().as_bytes().to_vec())
            }
            PrivateKey::Ed25519(k) => {
                use ed25519_dalek::Signer;
                Ok(k.sign(digest).to_bytes().to_vec())
            }
        }
    }
}

fn p521_signing_key(k: &p521::SecretKey) -> Result<p521::ecdsa::SigningKey> {
    p521::ecdsa::SigningKey::from_bytes(&k.to_bytes())
        .map_err(|e| bad(format!("the private key is invalid: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest(h: HashMethod, data: &[u8]) -> Vec<u8> {
        let mut x = h.hasher();
        x.update(data);
        x.finish()
    }

    fn round_trip(k: &PrivateKey, h: HashMethod) {
        let pubk = KeyMaterial::from_pem(&k.public_key_pem().unwrap()).unwrap();
        let d = digest(h, b"image data");
        let sig = k.sign_digest(h, &d).unwrap();
        pubk.key.verify_digest(k.key_type(), h, &d, &sig).unwrap();
        let other = digest(h, b"image dat4");
        assert!(pubk
            .key
            .verify_digest(k.key_type(), h, &other, &sig)
            .is_err());
    }

    #[test]
    fn every_key_type_signs_and_verifies_and_rejects_other_data() {
        let ed = PrivateKey::Ed25519(Box::new(ed25519_dalek::SigningKey::from_bytes(&[7; 32])));
        round_trip(&ed, HashMethod::Sha256);
        round_trip(&ed, HashMethod::Sha512);
        let p256 = p256::ecdsa::SigningKey::random(&mut rand::rngs::OsRng);
        round_trip(&PrivateKey::P256(p256), HashMethod::Sha256);
        round_trip(
            &PrivateKey::P256(p256::ecdsa::SigningKey::random(&mut rand::rngs::OsRng)),
            HashMethod::Sha384,
        );
        let p384 = p384::ecdsa::SigningKey::random(&mut rand::rngs::OsRng);
        round_trip(&PrivateKey::P384(p384), HashMethod::Sha384);
        let p521 = p521::ecdsa::SigningKey::random(&mut rand::rngs::OsRng);
        round_trip(&PrivateKey::P521(Box::new(p521)), HashMethod::Sha512);
    }

    #[test]
    fn key_type_must_match_the_key() {
        let ed = PrivateKey::Ed25519(Box::new(ed25519_dalek::SigningKey::from_bytes(&[7; 32])));
        let pubk = KeyMaterial::from_pem(&ed.public_key_pem().unwrap()).unwrap();
        let d = digest(HashMethod::Sha256, b"x");
        let sig = ed.sign_digest(HashMethod::Sha256, &d).unwrap();
        let e = pubk
            .key
            .verify_digest(KeyType::RsaPss, HashMethod::Sha256, &d, &sig)
            .unwrap_err();
        assert!(
            e.to_string().contains("img_signature_key_type is RSA-PSS"),
            "{e}"
        );
    }

    #[test]
    fn names_parse_as_glance_spells_them() {
        assert_eq!(HashMethod::parse("SHA-384").unwrap(), HashMethod::Sha384);
        assert!(HashMethod::parse("sha256").is_err());
        assert_eq!(KeyType::parse("ECC_SECP521R1").unwrap(), KeyType::EccP521);
        assert!(KeyType::parse("DSA").is_err());
    }

    #[test]
    fn non_pem_and_oversized_keys_are_refused() {
        assert!(KeyMaterial::from_pem("hello").is_err());
        let big = "A".repeat(MAX_PEM_BYTES + 1);
        assert!(KeyMaterial::from_pem(&big)
            .unwrap_err()
            .to_string()
            .contains("at most"));
        assert!(decode_signature("!!!").is_err());
        assert_eq!(decode_signature("AAEC").unwrap(), vec![0, 1, 2]);
    }
}
