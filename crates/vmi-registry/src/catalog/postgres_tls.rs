//! PostgreSQL connection settings: the URL (or key=value string) with libpq's TLS parameters,
//! and the rustls configuration they call for.
//!
//! tokio-postgres understands `sslmode=disable|prefer|require` only and refuses unknown
//! parameters, so [`ConnectOptions::parse`] takes out the parameters it handles itself and
//! hands the rest to tokio-postgres:
//!
//! - `sslmode` with libpq's meanings (PostgreSQL documentation, "SSL Support", table
//!   "SSL Mode Descriptions"): `disable` (plain TCP), `prefer` (the default: TLS when the server
//!   offers it, without checking the certificate), `require` (TLS; the certificate is checked
//!   against `sslrootcert` only when one is given, as libpq does when a root file exists),
//!   `verify-ca` (the chain must lead to `sslrootcert`), `verify-full` (and the certificate
//!   must name the host).
//! - `sslrootcert=FILE` (PEM certificates), or `sslrootcert=system` for the system's trust
//!   store (`SSL_CERT_FILE`, else the usual bundle locations). Without it, `verify-ca` and
//!   `verify-full` read `~/.postgresql/root.crt` as libpq does.
//! - `pool_size=N`: connections the catalog keeps open at most (a vmi parameter; default
//!   [`DEFAULT_POOL_SIZE`]).
//!
//! - `sslcert=FILE` and `sslkey=FILE` (PEM; both or neither): a client certificate for servers
//!   that authenticate with `cert` in `pg_hba.conf` or ask for one. As libpq, a key file that
//!   group or others may read is refused. Unlike libpq, nothing is read from
//!   `~/.postgresql/postgresql.crt` unless named. `sslpassword` (encrypted keys) and `sslcrl` are
//!   not supported and are refused.

use crate::error::{RegistryError, Result};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WantsClientCert;
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{
    CertificateError, ClientConfig, ConfigBuilder, DigitallySignedStruct, RootCertStore,
    SignatureScheme,
};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_postgres::config::SslMode;
use tokio_postgres::tls::MakeTlsConnect;
use tokio_postgres_rustls::MakeRustlsConnect;

/// Connections kept open at most when the URL does not say (`pool_size`).
pub const DEFAULT_POOL_SIZE: usize = 16;
/// Largest accepted `pool_size` (PostgreSQL's default `max_connections` is 100).
pub const MAX_POOL_SIZE: usize = 1024;
/// Where the system trust store usually is, for `sslrootcert=system` (Debian/Ubuntu, Fedora/RHEL,
/// openSUSE, Alpine).
const SYSTEM_BUNDLES: [&str; 4] = [
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/ca-bundle.pem",
    "/etc/ssl/cert.pem",
];

/// libpq's `sslmode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsMode {
    /// No TLS.
    Disable,
    /// TLS if offered, certificate not checked.
    Prefer,
    /// TLS, certificate checked only against an explicit `sslrootcert`.
    Require,
    /// TLS, chain checked.
    VerifyCa,
    /// TLS, chain and host name checked.
    VerifyFull,
}

/// Where trusted roots come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RootSource {
    /// None given.
    Default,
    /// The system trust store.
    System,
    /// A PEM file.
    File(PathBuf),
}

/// A parsed catalog URL.
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    /// What tokio-postgres connects with.
    pub pg: tokio_postgres::Config,
    /// The TLS mode.
    pub mode: TlsMode,
    /// Trusted roots.
    pub roots: RootSource,
    /// Pool size.
    pub pool_size: usize,
    /// Client certificate chain and key files (`sslcert`, `sslkey`).
    pub client_cert: Option<(PathBuf, PathBuf)>,
}

fn config_err(msg: impl Into<String>) -> RegistryError {
    RegistryError::Config(msg.into())
}

fn percent_decode(s: &str) -> String {
    let hex = |c: u8| (c as char).to_digit(16);
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while let Some(&c) = b.get(i) {
        if c == b'%' {
            if let (Some(h), Some(l)) = (
                b.get(i + 1).copied().and_then(hex),
                b.get(i + 2).copied().and_then(hex),
            ) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(c);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

impl ConnectOptions {
    /// Parse `postgres://…?…` or a key=value connection string.
    pub fn parse(url: &str) -> Result<Self> {
        let mut mode = TlsMode::Prefer;
        let mut roots = RootSource::Default;
        let mut pool_size = DEFAULT_POOL_SIZE;
        let (mut cert, mut key) = (None, None);
        let mut take = |k: &str, v: &str| -> Result<bool> {
            match k {
                "sslmode" => {
                    mode = match v {
                        "disable" => TlsMode::Disable,
                        "allow" | "prefer" => TlsMode::Prefer,
                        "require" => TlsMode::Require,
                        "verify-ca" => TlsMode::VerifyCa,
                        "verify-full" => TlsMode::VerifyFull,
                        _ => {
                            return Err(config_err(format!(
                                "database sslmode '{v}': expected disable, prefer, require, \
                                 verify-ca or verify-full"
                            )))
                        }
                    }
                }
                "sslrootcert" => {
                    roots = if v == "system" {
                        RootSource::System
                    } else {
                        RootSource::File(PathBuf::from(v))
                    }
                }
                "pool_size" => {
                    pool_size = v
                        .parse::<usize>()
                        .ok()
                        .filter(|n| (1..=MAX_POOL_SIZE).contains(n))
                        .ok_or_else(|| {
                            config_err(format!(
                                "database pool_size '{v}': expected 1 to {MAX_POOL_SIZE}"
                            ))
                        })?
                }
                "sslcert" => cert = Some(PathBuf::from(v)),
                "sslkey" => key = Some(PathBuf::from(v)),
                "sslpassword" | "sslcrl" => {
                    return Err(config_err(format!(
                        "database parameter {k} is not supported (use an unencrypted key file \
                         readable by this user only)"
                    )))
                }
                _ => return Ok(false),
            }
            Ok(true)
        };
        let rest = if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            match url.split_once('?') {
                None => url.to_string(),
                Some((base, query)) => {
                    let mut keep = Vec::new();
                    for kv in query.split('&').filter(|kv| !kv.is_empty()) {
                        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
                        if !take(&percent_decode(k), &percent_decode(v))? {
                            keep.push(kv);
                        }
                    }
                    if keep.is_empty() {
                        base.to_string()
                    } else {
                        format!("{base}?{}", keep.join("&"))
                    }
                }
            }
        } else {
            let mut keep = Vec::new();
            for kv in url.split_whitespace() {
                let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
                if !take(k, v.trim_matches('\''))? {
                    keep.push(kv);
                }
            }
            keep.join(" ")
        };
        let mut pg = tokio_postgres::Config::from_str(&rest).map_err(|e| {
            config_err(format!(
                "database '{}': {e}",
                crate::config::redact_url(url)
            ))
        })?;
        // libpq ignores sslmode on Unix-domain sockets (PostgreSQL never offers TLS there), so a
        // URL that asks for verify-full still connects through a local socket.
        let unix_only = !pg.get_hosts().is_empty()
            && pg
                .get_hosts()
                .iter()
                .all(|h| matches!(h, tokio_postgres::config::Host::Unix(_)));
        pg.ssl_mode(match mode {
            _ if unix_only => SslMode::Disable,
            TlsMode::Disable => SslMode::Disable,
            TlsMode::Prefer => SslMode::Prefer,
            TlsMode::Require | TlsMode::VerifyCa | TlsMode::VerifyFull => SslMode::Require,
        });
        let client_cert = match (cert, key) {
            (None, None) => None,
            (Some(c), Some(k)) => Some((c, k)),
            _ => {
                return Err(config_err(
                    "database parameters sslcert and sslkey go together: name both files",
                ))
            }
        };
        Ok(ConnectOptions {
            pg,
            mode,
            roots,
            pool_size,
            client_cert,
        })
    }

    /// The rustls configuration for this mode.
    pub fn tls_config(&self) -> Result<ClientConfig> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| config_err(format!("TLS: {e}")))?;
        let check_chain = match (self.mode, &self.roots) {
            (TlsMode::Disable | TlsMode::Prefer, _) | (TlsMode::Require, RootSource::Default) => {
                None
            }
            (TlsMode::Require | TlsMode::VerifyCa, _) => Some(false),
            (TlsMode::VerifyFull, _) => Some(true),
        };
        let Some(check_name) = check_chain else {
            return self.client_auth(
                builder
                    .dangerous()
                    .with_custom_certificate_verifier(Arc::new(NoCertificateCheck(provider))),
            );
        };
        let roots = Arc::new(load_roots(&self.roots)?);
        let webpki = WebPkiServerVerifier::builder_with_provider(roots, provider)
            .build()
            .map_err(|e| config_err(format!("TLS: {e}")))?;
        if check_name {
            return self.client_auth(builder.with_webpki_verifier(webpki));
        }
        self.client_auth(
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(ChainOnly(webpki))),
        )
    }

    /// Finish `builder` with the client certificate, if one is configured.
    fn client_auth(
        &self,
        builder: ConfigBuilder<ClientConfig, WantsClientCert>,
    ) -> Result<ClientConfig> {
        let Some((cert, key)) = &self.client_cert else {
            return Ok(builder.with_no_client_auth());
        };
        let err = |f: &Path, e: &dyn std::fmt::Display| {
            config_err(format!("database client certificate {}: {e}", f.display()))
        };
        let chain = CertificateDer::pem_file_iter(cert)
            .map_err(|e| err(cert, &e))?
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|e| err(cert, &e))?;
        if chain.is_empty() {
            return Err(err(cert, &"no certificate in the file"));
        }
        check_key_permissions(key)?;
        let k = PrivateKeyDer::from_pem_file(key).map_err(|e| err(key, &e))?;
        builder
            .with_client_auth_cert(chain, k)
            .map_err(|e| err(cert, &e))
    }
}

/// The TLS connector the pool connects with: rustls, configured by [`ConnectOptions::tls_config`].
#[derive(Clone)]
pub struct PgTls(MakeRustlsConnect);

impl PgTls {
    /// The connector for `opts`.
    pub fn new(opts: &ConnectOptions) -> Result<Self> {
        Ok(PgTls(MakeRustlsConnect::new(opts.tls_config()?)))
    }
}

impl<S> MakeTlsConnect<S> for PgTls
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = <MakeRustlsConnect as MakeTlsConnect<S>>::Stream;
    type TlsConnect = <MakeRustlsConnect as MakeTlsConnect<S>>::TlsConnect;
    type Error = <MakeRustlsConnect as MakeTlsConnect<S>>::Error;

    fn make_tls_connect(
        &mut self,
        hostname: &str,
    ) -> std::result::Result<Self::TlsConnect, Self::Error> {
        // A Unix-domain socket has no host name (PostgreSQL never offers TLS on one, so the
        // name is never checked); rustls still needs a valid one to build the connector.
        let name = if hostname.is_empty() {
            "localhost"
        } else {
            hostname
        };
        MakeTlsConnect::<S>::make_tls_connect(&mut self.0, name)
    }
}

fn home_root() -> Option<PathBuf> {
    std::env::var_os("HOME").map(|h| Path::new(&h).join(".postgresql/root.crt"))
}

/// libpq's rule for `sslkey`: a key file that its group or others may access is refused (a key
/// that leaked through permissions is a key that leaked).
fn check_key_permissions(key: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(key)
        .map_err(|e| config_err(format!("database client key {}: {e}", key.display())))?;
    if !meta.is_file() {
        return Err(config_err(format!(
            "database client key {} is not a regular file",
            key.display()
        )));
    }
    if meta.permissions().mode() & 0o077 != 0 {
        return Err(config_err(format!(
            "database client key {} has group or world access; permissions should be u=rw \
             (0600) or less",
            key.display()
        )));
    }
    Ok(())
}

fn load_roots(src: &RootSource) -> Result<RootCertStore> {
    let files: Vec<PathBuf> = match src {
        RootSource::File(p) => vec![p.clone()],
        RootSource::Default => home_root().into_iter().collect(),
        RootSource::System => std::env::var_os("SSL_CERT_FILE")
            .map(PathBuf::from)
            .into_iter()
            .chain(SYSTEM_BUNDLES.iter().map(PathBuf::from))
            .filter(|p| p.exists())
            .take(1)
            .collect(),
    };
    let mut store = RootCertStore::empty();
    for f in &files {
        let certs = CertificateDer::pem_file_iter(f)
            .map_err(|e| config_err(format!("sslrootcert {}: {e}", f.display())))?;
        for c in certs {
            let c = c.map_err(|e| config_err(format!("sslrootcert {}: {e}", f.display())))?;
            store
                .add(c)
                .map_err(|e| config_err(format!("sslrootcert {}: {e}", f.display())))?;
        }
    }
    if store.is_empty() {
        return Err(config_err(
            "the database sslmode verifies the server certificate but no root certificate was \
             found: set sslrootcert=FILE (or sslrootcert=system), or create \
             ~/.postgresql/root.crt",
        ));
    }
    Ok(store)
}

/// `sslmode=prefer|require` without roots: encryption without authentication, as libpq.
#[derive(Debug)]
struct NoCertificateCheck(Arc<CryptoProvider>);

impl ServerCertVerifier for NoCertificateCheck {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// `sslmode=verify-ca`: the chain must lead to a trusted root; the host name is not checked.
#[derive(Debug)]
struct ChainOnly(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libpq_tls_parameters_are_taken_out_of_the_url() {
        let o = ConnectOptions::parse(
            "postgres://u:p@db.example:5433/vmi?sslmode=verify-full&sslrootcert=%2Ftmp%2Fca.pem\
             &application_name=vmi&pool_size=4",
        )
        .unwrap();
        assert_eq!(o.mode, TlsMode::VerifyFull);
        assert_eq!(o.roots, RootSource::File("/tmp/ca.pem".into()));
        assert_eq!(o.pool_size, 4);
        assert_eq!(o.pg.get_ssl_mode(), SslMode::Require);
        assert_eq!(o.pg.get_application_name(), Some("vmi"));
        assert_eq!(o.pg.get_dbname(), Some("vmi"));
    }

    #[test]
    fn defaults_are_prefer_and_sixteen_connections() {
        let o = ConnectOptions::parse("postgres://postgres@127.0.0.1:5432").unwrap();
        assert_eq!(o.mode, TlsMode::Prefer);
        assert_eq!(o.pool_size, DEFAULT_POOL_SIZE);
        assert!(o.tls_config().is_ok());
        let o = ConnectOptions::parse("host=/run/pg user=x sslmode=require sslrootcert=system")
            .unwrap();
        assert_eq!(o.mode, TlsMode::Require);
        assert_eq!(o.roots, RootSource::System);
        // As libpq: no TLS over a Unix-domain socket, whatever sslmode says.
        assert_eq!(o.pg.get_ssl_mode(), SslMode::Disable);
        let o = ConnectOptions::parse("host=db.example user=x sslmode=require").unwrap();
        assert_eq!(o.pg.get_ssl_mode(), SslMode::Require);
    }

    #[test]
    fn bad_tls_parameters_are_configuration_errors() {
        for u in [
            "postgres://h/db?sslmode=maybe",
            "postgres://h/db?pool_size=0",
            "postgres://h/db?sslcert=/c.pem",
            "postgres://h/db?sslkey=/k.pem",
            "postgres://h/db?sslpassword=x",
        ] {
            assert!(matches!(
                ConnectOptions::parse(u),
                Err(RegistryError::Config(_))
            ));
        }
        let o =
            ConnectOptions::parse("postgres://h/db?sslmode=verify-full&sslrootcert=/nonexistent")
                .unwrap();
        assert!(o.tls_config().is_err());
    }
}
