//! The `web-download` import method: fetch an image from an http(s) URL into the staging area.
//!
//! Every URL — the one the client gave and each redirect target — must pass the operator's
//! filter (Glance's `[import_filtering_opts]`, [`ImportFiltering`]): its scheme, host and port are
//! checked against the allow lists, or the deny lists when an allow list is empty. Only `http` and
//! `https` are ever fetched, whatever the lists say. The body is bounded by
//! `web_download_max_bytes` and `image_size_cap`, refused early when `Content-Length` already
//! says it is too large; the staged bytes then go through the same inspection as an upload.

use super::address::{resolve_allowed, AddressPolicy, FilteringResolver};
use super::{store_stream, ImportFiltering};
use crate::error::{RegistryError, Result};
use crate::server::App;
use futures_util::StreamExt;
use reqwest::Url;

/// Redirects followed at most (each one filtered).
const MAX_REDIRECTS: usize = 5;
/// How long connecting to the source may take.
const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);
/// How long the source may send nothing before the download fails.
const READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(300);
/// Schemes web-download can fetch at all.
const FETCHABLE: [&str; 2] = ["http", "https"];

/// Why `uri` may not be fetched, if it may not.
pub fn check_uri(filter: &ImportFiltering, uri: &Url) -> std::result::Result<(), String> {
    let scheme = uri.scheme();
    if !FETCHABLE.contains(&scheme) {
        return Err(format!("scheme '{scheme}' is not supported"));
    }
    let allowed = |allow: &[String], deny: &[String], v: &str| {
        if allow.is_empty() {
            !deny.iter().any(|d| d.eq_ignore_ascii_case(v))
        } else {
            allow.iter().any(|a| a.eq_ignore_ascii_case(v))
        }
    };
    if !allowed(&filter.allowed_schemes, &filter.disallowed_schemes, scheme) {
        return Err(format!("scheme '{scheme}' is not allowed"));
    }
    let host = uri.host_str().unwrap_or("");
    if host.is_empty() {
        return Err("the URI has no host".into());
    }
    let host_plain = host.trim_start_matches('[').trim_end_matches(']');
    if !allowed(&filter.allowed_hosts, &filter.disallowed_hosts, host)
        || !allowed(&filter.allowed_hosts, &filter.disallowed_hosts, host_plain)
    {
        return Err(format!("host '{host}' is not allowed"));
    }
    // A literal address is what the connection uses; names are checked when resolved.
    if let Some(ip) = literal_address(uri) {
        address_policy(filter)?.check(ip)?;
    }
    let port = uri
        .port_or_known_default()
        .ok_or_else(|| "the URI has no port".to_string())?;
    let port_ok = if filter.allowed_ports.is_empty() {
        !filter.disallowed_ports.contains(&port)
    } else {
        filter.allowed_ports.contains(&port)
    };
    if !port_ok {
        return Err(format!("port {port} is not allowed"));
    }
    Ok(())
}

/// The address a URI's host names literally (the URL parser has already normalised IPv4 forms
/// such as `127.1` and `0x7f000001`).
fn literal_address(uri: &Url) -> Option<std::net::IpAddr> {
    let host = uri.host_str()?;
    host.trim_start_matches('[')
        .trim_end_matches(']')
        .parse()
        .ok()
}

/// The address policy of `filter`.
fn address_policy(filter: &ImportFiltering) -> std::result::Result<AddressPolicy, String> {
    AddressPolicy::new(&filter.allowed_networks, &filter.disallowed_hosts)
}

/// [`validate`], then resolve the URI's host name and refuse it when none of its addresses may
/// be connected to (the download checks again when it connects).
pub async fn validate_resolving(filter: &ImportFiltering, uri: &str) -> Result<Url> {
    let u = validate(filter, uri)?;
    if let Some(name) = u.host_str().filter(|_| literal_address(&u).is_none()) {
        let policy = address_policy(filter).map_err(RegistryError::Config)?;
        resolve_allowed(&policy, name).await.map_err(|e| {
            RegistryError::BadRequest(format!("URI for web-download does not pass filtering: {e}"))
        })?;
    }
    Ok(u)
}

/// Parse and filter a client's web-download URI (400 when it does not pass, as Glance answers).
pub fn validate(filter: &ImportFiltering, uri: &str) -> Result<Url> {
    let u = Url::parse(uri)
        .map_err(|e| RegistryError::BadRequest(format!("Invalid URI '{uri}': {e}")))?;
    check_uri(filter, &u).map_err(|why| {
        RegistryError::BadRequest(format!(
            "URI for web-download does not pass filtering: {why}"
        ))
    })?;
    Ok(u)
}

/// Download `uri` into the staging area; returns the staged location and size.
pub async fn fetch_to_staging(app: &App, image_id: &str, uri: &str) -> Result<(String, u64)> {
    let cfg = &app.config.import;
    let url = validate(&cfg.filtering, uri)?;
    let cap = cfg
        .web_download_max_bytes
        .unwrap_or(u64::MAX)
        .min(app.config.image_size_cap);
    let filter = cfg.filtering.clone();
    let resolver = FilteringResolver::new(std::sync::Arc::new(
        address_policy(&filter).map_err(RegistryError::Config)?,
    ));
    let policy = reqwest::redirect::Policy::custom(move |attempt| {
        if attempt.previous().len() >= MAX_REDIRECTS {
            return attempt.error(format!("more than {MAX_REDIRECTS} redirects"));
        }
        match check_uri(&filter, attempt.url()) {
            Ok(()) => attempt.follow(),
            Err(why) => attempt.error(format!("redirect refused: {why}")),
        }
    });
    let client = reqwest::Client::builder()
        .redirect(policy)
        // Every connection goes to an address the resolver allowed: no proxy in between.
        .no_proxy()
        .dns_resolver(std::sync::Arc::new(resolver))
        .connect_timeout(CONNECT_TIMEOUT)
        .read_timeout(READ_TIMEOUT)
        .build()
        .map_err(|e| RegistryError::store("building the download client", e))?;
    let fetch_err = |e: reqwest::Error| {
        let mut msg = e.to_string();
        let mut src = std::error::Error::source(&e);
        while let Some(s) = src {
            msg.push_str(": ");
            msg.push_str(&s.to_string());
            src = s.source();
        }
        RegistryError::BadRequest(format!("web-download of {url} failed: {msg}"))
    };
    let resp = client.get(url.clone()).send().await.map_err(fetch_err)?;
    let status = resp.status();
    if !status.is_success() {
        return Err(RegistryError::BadRequest(format!(
            "web-download of {url} failed: the server answered {status}"
        )));
    }
    if let Some(len) = resp.content_length() {
        if len > cap {
            return Err(RegistryError::PayloadTooLarge(format!(
                "web-download of {url}: {len} bytes exceed the limit of {cap} bytes"
            )));
        }
    }
    let stream = resp.bytes_stream().map(move |r| r.map_err(fetch_err));
    let (location, digests) = store_stream(app, image_id, Some("staging"), stream, cap).await?;
    Ok((location, digests.len))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(f: &ImportFiltering, u: &str) -> bool {
        check_uri(f, &Url::parse(u).unwrap()).is_ok()
    }

    #[test]
    fn glance_defaults_allow_http_and_https_on_standard_ports_only() {
        let f = ImportFiltering::default();
        assert!(ok(&f, "http://example.com/a.img"));
        assert!(ok(&f, "https://example.com/a.img"));
        assert!(!ok(&f, "http://example.com:8080/a.img"));
        assert!(!ok(&f, "ftp://example.com/a.img"));
        assert!(!ok(&f, "file:///etc/passwd"));
    }

    #[test]
    fn an_allow_list_is_used_alone_and_a_deny_list_otherwise() {
        let f = ImportFiltering {
            allowed_hosts: vec!["mirror.example".into()],
            disallowed_hosts: vec!["mirror.example".into()],
            ..ImportFiltering::default()
        };
        assert!(ok(&f, "http://mirror.example/x"));
        assert!(!ok(&f, "http://other.example/x"));
        let f = ImportFiltering {
            disallowed_hosts: vec!["169.254.169.254".into(), "::1".into()],
            ..ImportFiltering::default()
        };
        assert!(!ok(&f, "http://169.254.169.254/latest"));
        assert!(!ok(&f, "http://[::1]/x"));
        assert!(ok(&f, "http://93.184.216.34/x"));
        // Private addresses need allowed_networks.
        assert!(!ok(&f, "http://10.0.0.1/x"));
        let f = ImportFiltering {
            allowed_ports: vec![],
            disallowed_ports: vec![22],
            ..ImportFiltering::default()
        };
        assert!(ok(&f, "http://h:8080/x"));
        assert!(!ok(&f, "http://h:22/x"));
    }
}
