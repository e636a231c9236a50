//! The service configuration: defaults, then a TOML file, then `VMI_*` environment variables,
//! then command-line flags, each overriding the one before.
//!
//! [`Config::redacted`] is what `vmi serve --print-config` prints: passwords, tokens and
//! credentials inside URLs are replaced by `***`.

use crate::error::{RegistryError, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Glance's default `image_size_cap`: 1 TiB.
pub const DEFAULT_IMAGE_SIZE_CAP: u64 = 1 << 40;
/// Keystone's default token lifetime: 24 hours.
pub const DEFAULT_TOKEN_TTL_SECS: u64 = 24 * 3600;
/// How old unreferenced stored data must be before the reaper removes it.
pub const DEFAULT_REAP_GRACE_SECS: u64 = 24 * 3600;
/// What secrets are replaced with when printed.
const REDACTED: &str = "***";

/// The bootstrap administrator.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdminConfig {
    /// Admin user name.
    pub user: String,
    /// Admin project name.
    pub project: String,
    /// Password for a newly created admin; random (and printed once) when unset.
    pub password: Option<String>,
    /// A static API token for the admin, created at start if missing.
    pub token: Option<String>,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            user: "admin".into(),
            project: "admin".into(),
            password: None,
            token: None,
        }
    }
}

/// S3-compatible object storage, used with `store = "s3://bucket/prefix"`. Unset values fall
/// back to the usual `AWS_*` environment variables.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct S3Config {
    /// Endpoint URL of a non-AWS service, e.g. `http://127.0.0.1:9000`.
    pub endpoint: Option<String>,
    /// Region.
    pub region: Option<String>,
    /// Access key id.
    pub access_key_id: Option<String>,
    /// Secret access key.
    pub secret_access_key: Option<String>,
    /// Allow plain-HTTP endpoints.
    pub allow_http: bool,
}

/// The effective configuration of `vmi serve`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Address to listen on.
    pub listen: String,
    /// Directory for the embedded catalog and the local image store.
    pub data_dir: PathBuf,
    /// Catalog URL: `sqlite://PATH`; defaults to `<data_dir>/catalog.db`.
    pub database: Option<String>,
    /// Image store URL: `file://PATH`; defaults to `<data_dir>/images`.
    pub store: Option<String>,
    /// Base URL clients use to reach the service (service catalog, links); defaults to
    /// `http://<Host header>`.
    pub public_url: Option<String>,
    /// Region name in the service catalog.
    pub region: String,
    /// Largest accepted upload, bytes.
    pub image_size_cap: u64,
    /// Lifetime of password-issued tokens, seconds.
    pub token_ttl_secs: u64,
    /// Age before unreferenced stored data is removed, seconds.
    pub reap_grace_secs: u64,
    /// The bootstrap administrator.
    pub admin: AdminConfig,
    /// S3 settings for an `s3://` store.
    pub s3: S3Config,
    /// Image signature policy.
    pub signing: crate::signing::SigningConfig,
    /// Recycle bin retention and the lifecycle job (`[lifecycle]`).
    pub lifecycle: crate::lifecycle::LifecycleConfig,
    /// Operator policies: naming, required metadata, retention (`[policies]`).
    pub policies: crate::policies::PoliciesConfig,
    /// Interoperable image import, conversion on import and format-converting downloads.
    pub import: crate::import::ImportConfig,
    /// Limits on password checks and login lockout (`[login]`).
    pub login: crate::login::LoginConfig,
    /// Leases of direct uploads (`[uploads]`).
    pub uploads: crate::leases::UploadsConfig,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: "127.0.0.1:9292".into(),
            data_dir: PathBuf::from("./vmi-data"),
            database: None,
            store: None,
            public_url: None,
            region: "RegionOne".into(),
            image_size_cap: DEFAULT_IMAGE_SIZE_CAP,
            token_ttl_secs: DEFAULT_TOKEN_TTL_SECS,
            reap_grace_secs: DEFAULT_REAP_GRACE_SECS,
            admin: AdminConfig::default(),
            s3: S3Config::default(),
            signing: Default::default(),
            lifecycle: Default::default(),
            policies: Default::default(),
            import: crate::import::ImportConfig::default(),
            login: Default::default(),
            uploads: Default::default(),
        }
    }
}

/// Where the catalog lives.
#[derive(Debug, Clone, PartialEq)]
pub enum DatabaseUrl {
    /// A SQLite file.
    Sqlite(PathBuf),
    /// A PostgreSQL connection URL.
    Postgres(String),
}

/// Where image data lives.
#[derive(Debug, Clone, PartialEq)]
pub enum StoreUrl {
    /// A local directory.
    File(PathBuf),
    /// An S3 bucket, and a key prefix inside it (may be empty).
    S3 {
        /// Bucket name.
        bucket: String,
        /// Key prefix, without leading or trailing `/`.
        prefix: String,
    },
}

/// Sections whose keys `VMI_<SECTION>_<KEY>` sets (see [`Config::apply_env`]).
const ENV_SECTIONS: [&str; 6] = [
    "signing",
    "lifecycle",
    "policies",
    "import",
    "login",
    "uploads",
];

fn parse_u64(key: &str, v: &str) -> Result<u64> {
    v.parse()
        .map_err(|_| RegistryError::Config(format!("{key}: '{v}' is not a whole number")))
}

impl Config {
    /// Parse a TOML configuration file's text over the defaults.
    pub fn from_toml(text: &str) -> Result<Self> {
        toml::from_str(text).map_err(|e| RegistryError::Config(e.to_string()))
    }

    /// Read a TOML configuration file.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| RegistryError::io(format!("reading {}", path.display()), e))?;
        Self::from_toml(&text)
            .map_err(|e| RegistryError::Config(format!("{}: {e}", path.display())))
    }

    /// Apply `VMI_*` variables from `vars` (usually `std::env::vars()`).
    ///
    /// Besides the named variables below, `VMI_<SECTION>_<KEY>` sets `<key>` of the sections
    /// `[signing]`, `[lifecycle]`, `[policies]` and `[import]` (e.g. `VMI_IMPORT_CONVERT_TO=qcow2`,
    /// `VMI_LIFECYCLE_RECYCLE_RETENTION=7d`, `VMI_SIGNING_REQUIRE_SIGNED_PROJECTS='["rel"]'`): the
    /// value is read as a TOML value (number, boolean, array, inline table) and otherwise as a
    /// string, and checked like the file's (unknown keys and wrong types are errors).
    pub fn apply_env(&mut self, vars: impl IntoIterator<Item = (String, String)>) -> Result<()> {
        let mut sections: Vec<(String, String, String)> = Vec::new();
        for (k, v) in vars {
            if let Some((section, key)) = ENV_SECTIONS.iter().find_map(|s| {
                let prefix = format!("VMI_{}_", s.to_ascii_uppercase());
                k.strip_prefix(&prefix)
                    .filter(|key| !key.is_empty())
                    .map(|key| (*s, key.to_ascii_lowercase()))
            }) {
                sections.push((k.clone(), format!("{section}.{key}"), v));
                continue;
            }
            match k.as_str() {
                "VMI_LISTEN" => self.listen = v,
                "VMI_DATA_DIR" => self.data_dir = v.into(),
                "VMI_DATABASE" => self.database = Some(v),
                "VMI_STORE" => self.store = Some(v),
                "VMI_PUBLIC_URL" => self.public_url = Some(v),
                "VMI_REGION" => self.region = v,
                "VMI_IMAGE_SIZE_CAP" => self.image_size_cap = parse_u64(&k, &v)?,
                "VMI_TOKEN_TTL" => self.token_ttl_secs = parse_u64(&k, &v)?,
                "VMI_REAP_GRACE" => self.reap_grace_secs = parse_u64(&k, &v)?,
                "VMI_ADMIN_USER" => self.admin.user = v,
                "VMI_ADMIN_PROJECT" => self.admin.project = v,
                "VMI_ADMIN_PASSWORD" => self.admin.password = Some(v),
                "VMI_ADMIN_TOKEN" => self.admin.token = Some(v),
                "VMI_S3_ENDPOINT" => self.s3.endpoint = Some(v),
                "VMI_S3_REGION" => self.s3.region = Some(v),
                "VMI_S3_ACCESS_KEY_ID" => self.s3.access_key_id = Some(v),
                "VMI_S3_SECRET_ACCESS_KEY" => self.s3.secret_access_key = Some(v),
                "VMI_S3_ALLOW_HTTP" => self.s3.allow_http = matches!(v.as_str(), "1" | "true"),
                _ => {}
            }
        }
        // Sorted so that the result does not depend on the environment's order.
        sections.sort();
        for (var, path, value) in sections {
            self.set_section_key(&var, &path, &value)?;
        }
        Ok(())
    }

    /// Set `section.key` from an environment variable's text, through the same deserialisation
    /// as the configuration file.
    fn set_section_key(&mut self, var: &str, path: &str, text: &str) -> Result<()> {
        let (section, key) = path.split_once('.').unwrap_or((path, ""));
        let err = |e: String| RegistryError::Config(format!("{var}: {e}"));
        let parsed = toml::from_str::<toml::Table>(&format!("v = {text}"))
            .ok()
            .and_then(|mut t| t.remove("v"));
        let mut attempts = Vec::new();
        if let Some(p) = parsed {
            attempts.push(p);
        }
        attempts.push(toml::Value::String(text.to_string()));
        let mut last = String::new();
        for value in attempts {
            let mut doc = toml::Value::try_from(&*self).map_err(|e| err(e.to_string()))?;
            let table = doc
                .get_mut(section)
                .and_then(toml::Value::as_table_mut)
                .ok_or_else(|| err(format!("no section [{section}]")))?;
            table.insert(key.to_string(), value);
            match doc.try_into::<Config>() {
                Ok(c) => {
                    *self = c;
                    return Ok(());
                }
                Err(e) => last = e.to_string(),
            }
        }
        Err(err(last))
    }

    /// The catalog location.
    pub fn database_url(&self) -> Result<DatabaseUrl> {
        match &self.database {
            None => Ok(DatabaseUrl::Sqlite(self.data_dir.join("catalog.db"))),
            Some(u) => {
                if let Some(p) = u.strip_prefix("sqlite://") {
                    Ok(DatabaseUrl::Sqlite(PathBuf::from(p)))
                } else if u.starts_with("postgres://") || u.starts_with("postgresql://") {
                    Ok(DatabaseUrl::Postgres(u.clone()))
                } else {
                    Err(RegistryError::Config(format!(
                        "database '{}': expected sqlite://PATH or postgres://…",
                        redact_url(u)
                    )))
                }
            }
        }
    }

    /// The image store location.
    pub fn store_url(&self) -> Result<StoreUrl> {
        match &self.store {
            None => Ok(StoreUrl::File(self.data_dir.join("images"))),
            Some(u) => {
                if let Some(p) = u.strip_prefix("file://") {
                    Ok(StoreUrl::File(PathBuf::from(p)))
                } else if let Some(rest) = u.strip_prefix("s3://") {
                    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
                    if bucket.is_empty() {
                        return Err(RegistryError::Config(format!(
                            "store '{}': no bucket",
                            redact_url(u)
                        )));
                    }
                    Ok(StoreUrl::S3 {
                        bucket: bucket.to_string(),
                        prefix: prefix.trim_matches('/').to_string(),
                    })
                } else {
                    Err(RegistryError::Config(format!(
                        "store '{}': expected file://PATH or s3://BUCKET/PREFIX",
                        redact_url(u)
                    )))
                }
            }
        }
    }

    /// This configuration with every secret replaced by `***`.
    pub fn redacted(&self) -> Config {
        let mut c = self.clone();
        if c.admin.password.is_some() {
            c.admin.password = Some(REDACTED.into());
        }
        if c.admin.token.is_some() {
            c.admin.token = Some(REDACTED.into());
        }
        if c.s3.secret_access_key.is_some() {
            c.s3.secret_access_key = Some(REDACTED.into());
        }
        c.database = c.database.as_deref().map(redact_url);
        c.store = c.store.as_deref().map(redact_url);
        c
    }

    /// TOML text of this configuration.
    pub fn to_toml(&self) -> Result<String> {
        toml::to_string_pretty(self).map_err(|e| RegistryError::Config(e.to_string()))
    }
}

/// Replace the password (or the whole user-info) in `scheme://user:pass@host/…`, and any
/// `secret`/`password`/`key` query parameter.
pub fn redact_url(u: &str) -> String {
    let mut out = u.to_string();
    if let Some(scheme_end) = out.find("://") {
        let rest_start = scheme_end + 3;
        let authority_end = out[rest_start..]
            .find('/')
            .map(|i| rest_start + i)
            .unwrap_or(out.len());
        if let Some(at) = out[rest_start..authority_end].rfind('@') {
            let at = rest_start + at;
            let userinfo = &out[rest_start..at];
            let user = userinfo.split(':').next().unwrap_or("");
            let replaced = if userinfo.contains(':') {
                format!("{user}:{REDACTED}")
            } else {
                REDACTED.to_string()
            };
            out.replace_range(rest_start..at, &replaced);
        }
    }
    if let Some(q) = out.find('?') {
        let (base, query) = out.split_at(q + 1);
        let parts: Vec<String> = query
            .split('&')
            .map(|kv| {
                let k = kv.split('=').next().unwrap_or("");
                let lk = k.to_ascii_lowercase();
                if lk.contains("secret") || lk.contains("password") || lk.contains("key") {
                    format!("{k}={REDACTED}")
                } else {
                    kv.to_string()
                }
            })
            .collect();
        out = format!("{base}{}", parts.join("&"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_then_environment_override_the_defaults() {
        let mut c =
            Config::from_toml("listen = \"0.0.0.0:1\"\n[admin]\npassword = \"pw\"\n").unwrap();
        assert_eq!(c.listen, "0.0.0.0:1");
        assert_eq!(c.data_dir, PathBuf::from("./vmi-data"));
        c.apply_env([("VMI_LISTEN".to_string(), "127.0.0.1:2".to_string())])
            .unwrap();
        assert_eq!(c.listen, "127.0.0.1:2");
        assert_eq!(c.admin.password.as_deref(), Some("pw"));
    }

    #[test]
    fn section_keys_come_from_the_environment_with_the_file_s_checks() {
        let mut c = Config::default();
        let env = |k: &str, v: &str| [(k.to_string(), v.to_string())];
        c.apply_env(env("VMI_IMPORT_CONVERT_TO", "qcow2")).unwrap();
        assert_eq!(c.import.storage_format().unwrap(), Some("qcow2"));
        c.apply_env(env("VMI_LIFECYCLE_RECYCLE_RETENTION", "7d"))
            .unwrap();
        assert_eq!(c.lifecycle.recycle_retention.secs(), 7 * 86_400);
        c.apply_env(env("VMI_SIGNING_REQUIRE_SIGNED", "true"))
            .unwrap();
        assert!(c.signing.require_signed);
        c.apply_env(env(
            "VMI_SIGNING_REQUIRE_SIGNED_PROJECTS",
            r#"["rel", "ops"]"#,
        ))
        .unwrap();
        assert_eq!(c.signing.require_signed_projects, ["rel", "ops"]);
        c.apply_env(env("VMI_POLICIES_NAMING", "^[a-z0-9-]+$"))
            .unwrap();
        assert_eq!(c.policies.naming.as_deref(), Some("^[a-z0-9-]+$"));
        c.apply_env(env(
            "VMI_POLICIES_PROJECTS",
            r#"{ web = { naming = "^web-" } }"#,
        ))
        .unwrap();
        assert_eq!(c.policies.projects["web"].naming.as_deref(), Some("^web-"));
        // What came before is kept.
        assert_eq!(c.import.storage_format().unwrap(), Some("qcow2"));
        for (k, v) in [
            ("VMI_IMPORT_NO_SUCH_KEY", "1"),
            ("VMI_SIGNING_REQUIRE_SIGNED", "maybe"),
            ("VMI_LIFECYCLE_RECYCLE_RETENTION", "soon"),
        ] {
            let e = Config::default().apply_env(env(k, v)).unwrap_err();
            assert!(e.to_string().contains(k), "{e}");
        }
    }

    #[test]
    fn unknown_keys_in_the_file_are_errors() {
        assert!(Config::from_toml("lisen = \"x\"").is_err());
    }

    #[test]
    fn printed_config_hides_every_secret() {
        let mut c = Config::default();
        c.admin.password = Some("hunter2".into());
        c.admin.token = Some("tok".into());
        c.s3.secret_access_key = Some("s3cr3t".into());
        c.database = Some("postgres://u:pw@db/x?sslpassword=zz".into());
        let text = c.redacted().to_toml().unwrap();
        assert!(!text.contains("hunter2") && !text.contains("tok\"") && !text.contains("pw@"));
        assert!(!text.contains("zz") && !text.contains("s3cr3t"));
        assert!(text.contains("postgres://u:***@db/x"));
    }

    #[test]
    fn s3_store_urls_name_a_bucket_and_a_prefix() {
        let c = Config {
            store: Some("s3://images/vmi/prod/".into()),
            ..Config::default()
        };
        assert_eq!(
            c.store_url().unwrap(),
            StoreUrl::S3 {
                bucket: "images".into(),
                prefix: "vmi/prod".into()
            }
        );
        let c = Config {
            store: Some("s3:///x".into()),
            ..Config::default()
        };
        assert!(c.store_url().is_err());
    }

    #[test]
    fn default_locations_are_under_the_data_dir() {
        let c = Config::default();
        assert_eq!(
            c.database_url().unwrap(),
            DatabaseUrl::Sqlite(PathBuf::from("./vmi-data/catalog.db"))
        );
        assert_eq!(
            c.store_url().unwrap(),
            StoreUrl::File(PathBuf::from("./vmi-data/images"))
        );
    }
}
