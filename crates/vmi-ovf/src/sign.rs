//! `.cert` files (DSP0243 §5.2): the signature of the manifest, `SHA256(name.mf)= hex`, made with
//! the signer's RSA private key (PKCS#1 v1.5), followed by the signer's X.509 certificate in PEM.

use crate::error::{OvfError, Result};
use crate::manifest::{hex, unhex};
use rsa::pkcs1::DecodeRsaPrivateKey;
use rsa::pkcs1v15::Pkcs1v15Sign;
use rsa::pkcs8::{DecodePrivateKey, DecodePublicKey};
use rsa::traits::PublicKeyParts;
use rsa::{RsaPrivateKey, RsaPublicKey};
use sha2::{Digest, Sha256};
use x509_cert::der::{DecodePem, Encode};
use x509_cert::Certificate;

/// Largest `.cert` file read.
pub const MAX_CERT_BYTES: u64 = 1024 * 1024;

/// What a verified certificate file says.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct SignatureInfo {
    /// Manifest name the signature covers.
    pub manifest: String,
    /// Certificate subject (RFC 4514 form).
    pub subject: String,
    /// Certificate issuer.
    pub issuer: String,
    /// Whether the certificate is self-signed (issuer equals subject).
    pub self_signed: bool,
}

fn certificate(cert_pem: &str) -> Result<(Certificate, RsaPublicKey)> {
    let begin = cert_pem
        .find("-----BEGIN CERTIFICATE-----")
        .ok_or_else(|| OvfError::Invalid("no PEM certificate found".into()))?;
    let cert = Certificate::from_pem(&cert_pem.as_bytes()[begin..])
        .map_err(|e| OvfError::Invalid(format!("certificate: {e}")))?;
    let spki = cert
        .tbs_certificate
        .subject_public_key_info
        .to_der()
        .map_err(|e| OvfError::Invalid(format!("certificate public key: {e}")))?;
    let key = RsaPublicKey::from_public_key_der(&spki)
        .map_err(|e| OvfError::Unsupported(format!("certificate key is not RSA: {e}")))?;
    Ok((cert, key))
}

fn private_key(key_pem: &str) -> Result<RsaPrivateKey> {
    RsaPrivateKey::from_pkcs8_pem(key_pem)
        .or_else(|_| RsaPrivateKey::from_pkcs1_pem(key_pem))
        .map_err(|e| OvfError::Invalid(format!("private key (PKCS#8 or PKCS#1 PEM RSA): {e}")))
}

/// Sign the manifest bytes `mf` (named `mf_name` in the package) and return the `.cert` text.
pub fn sign(mf_name: &str, mf: &[u8], key_pem: &str, cert_pem: &str) -> Result<String> {
    let key = private_key(key_pem)?;
    let (_, public) = certificate(cert_pem)?;
    if public.n() != key.n() || public.e() != key.e() {
        return Err(OvfError::Usage(
            "the private key does not belong to the certificate".into(),
        ));
    }
    let digest = Sha256::digest(mf);
    let sig = key
        .sign(Pkcs1v15Sign::new::<Sha256>(), &digest)
        .map_err(|e| OvfError::Invalid(format!("signing: {e}")))?;
    let begin = cert_pem.find("-----BEGIN CERTIFICATE-----").unwrap_or(0);
    let mut out = format!("SHA256({mf_name})= {}\n", hex(&sig));
    out.push_str(cert_pem[begin..].trim_end());
    out.push('\n');
    Ok(out)
}

/// Verify the `.cert` text against the manifest bytes. Checks the signature with the embedded
/// certificate's key; trust in the certificate itself (chain, validity dates) is the caller's.
pub fn verify(cert_text: &str, mf_name: &str, mf: &[u8]) -> Result<SignatureInfo> {
    let first = cert_text
        .lines()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("");
    let open = first
        .find('(')
        .ok_or_else(|| OvfError::Invalid("certificate file: no ALGO(name)= line".into()))?;
    let close = first
        .rfind(")=")
        .filter(|&c| c > open)
        .ok_or_else(|| OvfError::Invalid("certificate file: no ALGO(name)= line".into()))?;
    let algo = first[..open].trim().to_ascii_uppercase();
    let name = &first[open + 1..close];
    if name != mf_name {
        return Err(OvfError::Verify(format!(
            "the signature covers '{name}', not '{mf_name}'"
        )));
    }
    let sig = unhex(first[close + 2..].trim())
        .ok_or_else(|| OvfError::Invalid("certificate file: signature is not hex".into()))?;
    let (cert, key) = certificate(cert_text)?;
    let ok = match algo.as_str() {
        "SHA256" => key.verify(Pkcs1v15Sign::new::<Sha256>(), &Sha256::digest(mf), &sig),
        "SHA512" => key.verify(
            Pkcs1v15Sign::new::<sha2::Sha512>(),
            &sha2::Sha512::digest(mf),
            &sig,
        ),
        "SHA1" => key.verify(
            Pkcs1v15Sign::new::<sha1::Sha1>(),
            &sha1::Sha1::digest(mf),
            &sig,
        ),
        other => return Err(OvfError::Unsupported(format!("signature digest {other}"))),
    };
    ok.map_err(|_| OvfError::Verify(format!("the signature of '{mf_name}' does not match")))?;
    let subject = cert.tbs_certificate.subject.to_string();
    let issuer = cert.tbs_certificate.issuer.to_string();
    Ok(SignatureInfo {
        manifest: name.to_string(),
        self_signed: subject == issuer,
        subject,
        issuer,
    })
}
