//! Command-line arguments of `vmi serve` and `vmi image`, and their entry points [`run_serve`]
//! and [`run_image`].
//!
//! The `vmi` binary embeds [`ServeArgs`] as its `serve` subcommand and [`ImageArgs`] as its
//! `image` subcommand. `serve` settings come from defaults, then `--config FILE` (or
//! `VMI_CONFIG`), then `VMI_*` environment variables, then these flags.

use crate::client::{Auth, RegistryClient};
use crate::config::Config;
use crate::error::{chain, RegistryError, Result};
use crate::server::Registry;
use clap::{Args, Subcommand};
use serde_json::{json, Map, Value};
use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

/// Consecutive failures of one chunk before a resumable upload gives up.
const UPLOAD_RETRIES: u32 = 5;
/// How often the reaper looks for unreferenced image data.
const REAP_INTERVAL: Duration = Duration::from_secs(3600);

/// `vmi serve`: run the image registry.
#[derive(Debug, Clone, Default, Args)]
pub struct ServeArgs {
    /// TOML configuration file (default: $VMI_CONFIG, if set).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Address to listen on [default: 127.0.0.1:9292].
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<String>,
    /// Directory for the catalog and image data [default: ./vmi-data].
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Catalog URL: sqlite://PATH, or postgres://USER@HOST:PORT/DB?sslmode=… (built with the
    /// `postgres` feature) [default: sqlite://<data-dir>/catalog.db].
    #[arg(long, value_name = "URL")]
    pub database: Option<String>,
    /// Image store URL: file://PATH, or s3://BUCKET/PREFIX (built with the `s3` feature; see the
    /// [s3] table and AWS_* variables) [default: file://<data-dir>/images].
    #[arg(long, value_name = "URL")]
    pub store: Option<String>,
    /// Base URL clients reach the service at (used in the service catalog).
    #[arg(long, value_name = "URL")]
    pub public_url: Option<String>,
    /// Print the effective configuration (secrets redacted) and exit.
    #[arg(long)]
    pub print_config: bool,
}

/// The configuration `args` and the environment `vars` produce.
pub fn effective_config(
    args: &ServeArgs,
    vars: impl IntoIterator<Item = (String, String)>,
) -> Result<Config> {
    let vars: Vec<(String, String)> = vars.into_iter().collect();
    let file = args.config.clone().or_else(|| {
        vars.iter()
            .find(|(k, _)| k == "VMI_CONFIG")
            .map(|(_, v)| PathBuf::from(v))
    });
    let mut c = match file {
        Some(p) => Config::from_file(&p)?,
        None => Config::default(),
    };
    c.apply_env(vars)?;
    if let Some(v) = &args.listen {
        c.listen = v.clone();
    }
    if let Some(v) = &args.data_dir {
        c.data_dir = v.clone();
    }
    if let Some(v) = &args.database {
        c.database = Some(v.clone());
    }
    if let Some(v) = &args.store {
        c.store = Some(v.clone());
    }
    if let Some(v) = &args.public_url {
        c.public_url = Some(v.clone());
    }
    Ok(c)
}

/// Run `vmi serve` until interrupted (SIGINT or SIGTERM).
pub fn run_serve(args: ServeArgs) -> Result<()> {
    let config = effective_config(&args, std::env::vars())?;
    if args.print_config {
        print!("{}", config.redacted().to_toml()?);
        return Ok(());
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| RegistryError::io("starting the runtime", e))?;
    rt.block_on(serve(config))
}

async fn serve(config: Config) -> Result<()> {
    let listener = tokio::net::TcpListener::bind(&config.listen)
        .await
        .map_err(|e| RegistryError::io(format!("listening on {}", config.listen), e))?;
    let addr = listener
        .local_addr()
        .map_err(|e| RegistryError::io("reading the listen address", e))?;
    let registry = Registry::open(config).await?;
    let boot = registry.bootstrap().await?;
    let url = registry
        .app
        .config
        .public_url
        .clone()
        .unwrap_or_else(|| format!("http://{addr}"));
    println!(
        "vmi registry listening on {url} (data in {})",
        registry.app.config.data_dir.display()
    );
    if let Some(pw) = &boot.generated_password {
        println!(
            "created admin user '{}' in project '{}' with password: {pw}\n\
             (shown only now; set VMI_ADMIN_PASSWORD before the first start to choose it)",
            boot.user, boot.project
        );
    }
    println!(
        "get a token: OS_AUTH_URL={url}/v3 OS_USERNAME={} OS_PROJECT_NAME={} \
         OS_USER_DOMAIN_NAME=Default OS_PROJECT_DOMAIN_NAME=Default OS_PASSWORD=… \
         openstack token issue",
        boot.user, boot.project
    );
    registry.app.config.policies.validate()?;
    crate::lifecycle::job::spawn(registry.app.clone());
    let reaper = registry.clone();
    tokio::spawn(async move {
        loop {
            match reaper.reap().await {
                Ok(0) => {}
                Ok(n) => eprintln!("vmi registry: removed {n} unreferenced image objects"),
                Err(e) => eprintln!("vmi registry: reaper: {}", chain(&e)),
            }
            tokio::time::sleep(REAP_INTERVAL).await;
        }
    });
    registry.serve(listener, shutdown_signal()).await
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}

/// `vmi image`: talk to a registry.
#[derive(Debug, Clone, Args)]
pub struct ImageArgs {
    /// Registry URL (default: $VMI_REGISTRY_URL, else http://127.0.0.1:9292).
    #[arg(long, global = true, value_name = "URL")]
    pub url: Option<String>,
    /// Token (default: $VMI_TOKEN, else $OS_AUTH_TOKEN).
    #[arg(long, global = true, value_name = "TOKEN")]
    pub token: Option<String>,
    /// User for password authentication (default: $OS_USERNAME); the password is read from
    /// $OS_PASSWORD.
    #[arg(long, global = true, value_name = "NAME")]
    pub user: Option<String>,
    /// Project to scope a password login to (default: $OS_PROJECT_NAME).
    #[arg(long, global = true, value_name = "NAME")]
    pub project: Option<String>,
    /// Print JSON instead of text.
    #[arg(long, global = true)]
    pub json: bool,
    /// What to do.
    #[command(subcommand)]
    pub command: ImageCommand,
}

/// `vmi image` subcommands.
#[derive(Debug, Clone, Subcommand)]
pub enum ImageCommand {
    /// List images.
    List {
        /// Glance filter, e.g. `status=active`, `name=in:a,b`, `sort=name:asc` (repeatable).
        #[arg(long = "filter", value_name = "KEY=VALUE")]
        filters: Vec<String>,
    },
    /// Show one image (by id or unique name).
    Show {
        /// Image id or name.
        image: String,
    },
    /// Create an image, and upload its data when --file is given.
    Create {
        /// Image name.
        name: String,
        /// Disk format.
        #[arg(long, default_value = "raw")]
        disk_format: String,
        /// Container format.
        #[arg(long, default_value = "bare")]
        container_format: String,
        /// private, shared, community or public.
        #[arg(long)]
        visibility: Option<String>,
        /// Custom property (repeatable).
        #[arg(long = "property", value_name = "KEY=VALUE")]
        properties: Vec<String>,
        /// Tag (repeatable).
        #[arg(long = "tag")]
        tags: Vec<String>,
        /// Image data to upload.
        #[arg(long, value_name = "PATH")]
        file: Option<PathBuf>,
        /// Sign --file with this private key (PEM) and set the img_signature* properties.
        #[arg(long, value_name = "PRIVATE.pem", requires_all = ["file", "sign_key_id"])]
        sign: Option<PathBuf>,
        /// The registered signing key's id, for --sign.
        #[arg(long, value_name = "ID")]
        sign_key_id: Option<String>,
    },
    /// Upload the data of a queued image.
    Upload {
        /// Image id or name.
        image: String,
        /// The data.
        file: PathBuf,
        /// Upload through a resumable session (vmi registries), in chunks, retrying failed ones.
        #[arg(long)]
        resumable: bool,
        /// Chunk size for --resumable, MiB.
        #[arg(long, default_value_t = 64, value_name = "MIB")]
        chunk_mib: u64,
        /// Continue the session another run opened (the URL its error printed).
        #[arg(long, value_name = "URL")]
        session: Option<String>,
    },
    /// Download image data, verifying its checksum.
    Download {
        /// Image id or name.
        image: String,
        /// Output file.
        #[arg(long, short)]
        output: PathBuf,
        /// Continue a partial download in --output.
        #[arg(long)]
        resume: bool,
        /// Verify the image signature (img_signature*) of the downloaded file.
        #[arg(long)]
        verify: bool,
        /// Verify with this PEM public key or certificate instead of the registry's key.
        #[arg(long, value_name = "FILE", requires = "verify")]
        key: Option<PathBuf>,
        /// Have the registry convert the image to this format (raw, qcow2, vmdk, vhd, vhdx,
        /// vdi): raw, streamOptimized VMDK and fixed VHD stream as they are converted.
        #[arg(long, value_name = "FORMAT", conflicts_with_all = ["resume", "verify"])]
        format: Option<String>,
    },
    /// Change attributes.
    Set {
        /// Image id or name.
        image: String,
        /// New name.
        #[arg(long)]
        name: Option<String>,
        /// New visibility.
        #[arg(long)]
        visibility: Option<String>,
        /// Set a custom property (repeatable).
        #[arg(long = "property", value_name = "KEY=VALUE")]
        properties: Vec<String>,
        /// Remove a custom property (repeatable).
        #[arg(long = "remove-property", value_name = "KEY")]
        remove: Vec<String>,
        /// Protect against deletion (true/false).
        #[arg(long)]
        protected: Option<bool>,
        /// Minimum disk, GiB.
        #[arg(long)]
        min_disk: Option<u64>,
        /// Minimum RAM, MiB.
        #[arg(long)]
        min_ram: Option<u64>,
    },
    /// Delete images.
    Delete {
        /// Image ids or names.
        #[arg(required = true)]
        images: Vec<String>,
    },
    /// Share a (shared-visibility) image with a project.
    Share {
        /// Image id or name.
        image: String,
        /// Project id.
        project: String,
    },
    /// Accept an image shared with your project.
    Accept {
        /// Image id.
        image: String,
    },
    /// Reject an image shared with your project.
    Reject {
        /// Image id.
        image: String,
    },
    /// Image families: list them, or one family's versions (newest first) or its latest image.
    Family {
        /// Family name (omit to list every family you can see).
        family: Option<String>,
        /// Project that owns the family (default: yours, then public images).
        #[arg(long, value_name = "PROJECT")]
        owner: Option<String>,
        /// Show only the family's latest image.
        #[arg(long)]
        latest: bool,
    },
    /// Show an image's ancestors and children, or record its parent with --parent.
    Lineage {
        /// Image id or name.
        image: String,
        /// Ancestors to walk (at most 64).
        #[arg(long, default_value_t = 16)]
        depth: u32,
        /// Record this image (id or name) as the parent.
        #[arg(long, value_name = "IMAGE")]
        parent: Option<String>,
        /// How it was derived: snapshot, clone, rebuild, import, conversion or derive.
        #[arg(long, default_value = "clone", requires = "parent")]
        relation: String,
        /// Build record to store with --parent: a JSON object (tool, source spec, …).
        #[arg(long, value_name = "JSON", requires = "parent")]
        build: Option<String>,
    },
    /// Create an image from a template: it shares the template's stored data (no copy).
    Derive {
        /// Template image id or name.
        template: String,
        /// Name of the new image.
        name: String,
        /// Family of the new image.
        #[arg(long)]
        family: Option<String>,
        /// Version of the new image in its family.
        #[arg(long)]
        version: Option<String>,
        /// private, shared, community or public.
        #[arg(long)]
        visibility: Option<String>,
        /// Custom property (repeatable).
        #[arg(long = "property", value_name = "KEY=VALUE")]
        properties: Vec<String>,
    },
    /// Manage your project's image signing keys.
    Keys {
        /// What to do.
        #[command(subcommand)]
        command: crate::signing::cli::KeysCommand,
    },
    /// Sign a file: print the img_signature* properties to set on its image.
    Sign {
        /// The image data.
        file: PathBuf,
        /// Private key (PEM: PKCS#8, or PKCS#1 RSA, or SEC1 EC).
        #[arg(long, value_name = "PRIVATE.pem")]
        key: PathBuf,
        /// Id of the matching key registered with `vmi image keys add`.
        #[arg(long, value_name = "ID")]
        key_id: String,
        /// Hash method: SHA-256, SHA-384 or SHA-512.
        #[arg(long, default_value = "SHA-256")]
        hash: String,
    },
    /// Lifecycle, recycle bin and audit log.
    #[command(flatten)]
    Lifecycle(crate::lifecycle::cli::LifecycleCommand),
    /// Import data into a queued image: stage a file and import it (glance-direct), or have the
    /// registry download a URL (web-download). Waits for the import unless --no-wait.
    Import {
        /// Image id or name.
        image: String,
        /// Local file to stage and import.
        #[arg(
            long,
            value_name = "PATH",
            conflicts_with = "uri",
            required_unless_present = "uri"
        )]
        file: Option<PathBuf>,
        /// URL the registry downloads from.
        #[arg(long, value_name = "URL")]
        uri: Option<String>,
        /// Return once the import started.
        #[arg(long)]
        no_wait: bool,
    },
}

fn key_value(s: &str) -> Result<(String, String)> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| RegistryError::BadRequest(format!("expected KEY=VALUE, got '{s}'")))
}

fn env_of(vars: &[(String, String)], key: &str) -> Option<String> {
    vars.iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.clone())
        .filter(|v| !v.is_empty())
}

/// Run `vmi image …`, printing to stdout.
pub fn run_image(args: ImageArgs) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| RegistryError::io("starting the runtime", e))?;
    let vars: Vec<(String, String)> = std::env::vars().collect();
    let mut out = std::io::stdout().lock();
    rt.block_on(image_command(&args, &vars, &mut out, true))
}

fn print_image(out: &mut dyn Write, img: &Value, as_json: bool) -> Result<()> {
    let text = if as_json {
        serde_json::to_string_pretty(img).unwrap_or_default()
    } else {
        let mut lines = Vec::new();
        if let Some(m) = img.as_object() {
            let mut keys: Vec<&String> = m.keys().collect();
            keys.sort();
            for k in keys {
                let v = &m[k];
                let s = match v {
                    Value::String(s) => s.clone(),
                    Value::Null => String::new(),
                    other => other.to_string(),
                };
                lines.push(format!("{k:<18} {s}"));
            }
        }
        lines.join("\n")
    };
    writeln!(out, "{text}").map_err(|e| RegistryError::io("writing output", e))
}

/// `vmi image …` against the environment `vars`, writing to `out`.
pub async fn image_command(
    args: &ImageArgs,
    vars: &[(String, String)],
    out: &mut dyn Write,
    progress: bool,
) -> Result<()> {
    if let ImageCommand::Sign {
        file,
        key,
        key_id,
        hash,
    } = &args.command
    {
        return crate::signing::cli::run_sign(out, file, key, key_id, hash, args.json);
    }
    let (url, auth) = connection(
        args.url.as_deref(),
        args.token.as_deref(),
        args.user.as_deref(),
        args.project.as_deref(),
        vars,
    )?;
    let c = RegistryClient::connect(&url, &auth).await?;
    image_with(args, c, out, progress).await
}

/// The registry URL and credentials from flags, else the environment `vars`.
pub(crate) fn connection(
    url: Option<&str>,
    token: Option<&str>,
    user: Option<&str>,
    project: Option<&str>,
    vars: &[(String, String)],
) -> Result<(String, Auth)> {
    let url = url
        .map(str::to_string)
        .or_else(|| env_of(vars, "VMI_REGISTRY_URL"))
        .unwrap_or_else(|| "http://127.0.0.1:9292".into());
    let token = token
        .map(str::to_string)
        .or_else(|| env_of(vars, "VMI_TOKEN"))
        .or_else(|| env_of(vars, "OS_AUTH_TOKEN"));
    let auth = match (
        token,
        user.map(str::to_string)
            .or_else(|| env_of(vars, "OS_USERNAME")),
    ) {
        (Some(t), _) => Auth::Token(t),
        (None, Some(user)) => Auth::Password {
            user,
            password: env_of(vars, "OS_PASSWORD").ok_or_else(|| {
                RegistryError::BadRequest("set OS_PASSWORD for password authentication".into())
            })?,
            project: project
                .map(str::to_string)
                .or_else(|| env_of(vars, "OS_PROJECT_NAME")),
        },
        (None, None) => {
            return Err(RegistryError::BadRequest(
                "no credentials: pass --token (or set VMI_TOKEN), or --user with OS_PASSWORD"
                    .into(),
            ))
        }
    };
    Ok((url, auth))
}

async fn image_with(
    args: &ImageArgs,
    c: RegistryClient,
    out: &mut dyn Write,
    progress: bool,
) -> Result<()> {
    let w = |out: &mut dyn Write, s: String| {
        writeln!(out, "{s}").map_err(|e| RegistryError::io("writing output", e))
    };
    match &args.command {
        ImageCommand::List { filters } => {
            let f = filters
                .iter()
                .map(|s| key_value(s))
                .collect::<Result<Vec<_>>>()?;
            let imgs = c.list(&f).await?;
            if args.json {
                return w(out, serde_json::to_string_pretty(&imgs).unwrap_or_default());
            }
            w(
                out,
                format!(
                    "{:<36}  {:<24}  {:<11}  {:>12}",
                    "ID", "NAME", "STATUS", "SIZE"
                ),
            )?;
            for i in imgs {
                let size = i["size"]
                    .as_u64()
                    .map(|s| s.to_string())
                    .unwrap_or_default();
                w(
                    out,
                    format!(
                        "{:<36}  {:<24}  {:<11}  {:>12}",
                        i["id"].as_str().unwrap_or(""),
                        i["name"].as_str().unwrap_or(""),
                        i["status"].as_str().unwrap_or(""),
                        size
                    ),
                )?;
            }
            Ok(())
        }
        ImageCommand::Show { image } => print_image(out, &c.show(image).await?, args.json),
        ImageCommand::Create {
            name,
            disk_format,
            container_format,
            visibility,
            properties,
            tags,
            file,
            sign,
            sign_key_id,
        } => {
            let mut attrs = Map::new();
            if let (Some(k), Some(f), Some(kid)) = (sign, file, sign_key_id) {
                let hash = crate::signing::crypto::HashMethod::Sha256;
                for (k, v) in crate::signing::cli::sign_properties(f, k, kid, hash)? {
                    attrs.insert(k, json!(v));
                }
            }
            for p in properties {
                let (k, v) = key_value(p)?;
                attrs.insert(k, json!(v));
            }
            attrs.insert("name".into(), json!(name));
            attrs.insert("disk_format".into(), json!(disk_format));
            attrs.insert("container_format".into(), json!(container_format));
            attrs.insert("tags".into(), json!(tags));
            if let Some(v) = visibility {
                attrs.insert("visibility".into(), json!(v));
            }
            let img = c.create(&Value::Object(attrs)).await?;
            let id = img["id"].as_str().unwrap_or_default().to_string();
            if let Some(f) = file {
                c.upload(&id, f, progress).await?;
            }
            print_image(out, &c.show(&id).await?, args.json)
        }
        ImageCommand::Upload {
            image,
            file,
            resumable,
            chunk_mib,
            session,
        } => {
            let id = c.resolve(image).await?;
            if *resumable || session.is_some() {
                let chunk = chunk_mib.saturating_mul(1 << 20).max(1);
                c.upload_resumable(
                    &id,
                    file,
                    chunk,
                    session.as_deref(),
                    UPLOAD_RETRIES,
                    progress,
                )
                .await?;
            } else {
                c.upload(&id, file, progress).await?;
            }
            print_image(out, &c.show(&id).await?, args.json)
        }
        ImageCommand::Download {
            image,
            output,
            resume,
            verify,
            key,
            format: Some(format),
        } => {
            let id = c.resolve(image).await?;
            let d = c.download_as(&id, format, output, progress).await?;
            let check = if d.md5.is_empty() {
                String::from("converted on the fly, no checksum to verify")
            } else {
                format!("md5 {} verified", d.md5)
            };
            let _ = (resume, verify, key);
            w(
                out,
                format!(
                    "{}: {} bytes written as {format}, {check}",
                    output.display(),
                    d.written
                ),
            )
        }
        ImageCommand::Download {
            image,
            output,
            resume,
            verify,
            key,
            format: None,
        } => {
            let id = c.resolve(image).await?;
            let d = c.download(&id, output, *resume, progress).await?;
            if *verify {
                let line =
                    crate::signing::cli::verify_download(&c, &id, output, key.as_deref()).await?;
                w(out, line)?;
            }
            w(
                out,
                format!(
                    "{}: {} bytes written{}, md5 {} verified",
                    output.display(),
                    d.written,
                    if d.resumed_from > 0 {
                        format!(" after {} already present", d.resumed_from)
                    } else {
                        String::new()
                    },
                    d.md5
                ),
            )
        }
        ImageCommand::Set {
            image,
            name,
            visibility,
            properties,
            remove,
            protected,
            min_disk,
            min_ram,
        } => {
            let id = c.resolve(image).await?;
            let mut ops = Vec::new();
            let mut set = |k: &str, v: Value| {
                ops.push(json!({"op": "add", "path": format!("/{}", k.replace('~', "~0").replace('/', "~1")), "value": v}))
            };
            if let Some(v) = name {
                set("name", json!(v));
            }
            if let Some(v) = visibility {
                set("visibility", json!(v));
            }
            if let Some(v) = protected {
                set("protected", json!(v));
            }
            if let Some(v) = min_disk {
                set("min_disk", json!(v));
            }
            if let Some(v) = min_ram {
                set("min_ram", json!(v));
            }
            for p in properties {
                let (k, v) = key_value(p)?;
                set(&k, json!(v));
            }
            for k in remove {
                ops.push(json!({"op": "remove",
                    "path": format!("/{}", k.replace('~', "~0").replace('/', "~1"))}));
            }
            print_image(out, &c.patch(&id, &Value::Array(ops)).await?, args.json)
        }
        ImageCommand::Delete { images } => {
            for i in images {
                let id = c.resolve(i).await?;
                c.delete(&id).await?;
                w(out, format!("deleted {id}"))?;
            }
            Ok(())
        }
        ImageCommand::Share { image, project } => {
            let id = c.resolve(image).await?;
            let m = c.share(&id, project).await?;
            w(
                out,
                format!(
                    "shared {id} with {project}: {}",
                    m["status"].as_str().unwrap_or("")
                ),
            )
        }
        ImageCommand::Accept { image } | ImageCommand::Reject { image } => {
            let status = if matches!(args.command, ImageCommand::Accept { .. }) {
                "accepted"
            } else {
                "rejected"
            };
            let m = c.answer(image, status).await?;
            w(
                out,
                format!("{image}: {}", m["status"].as_str().unwrap_or("")),
            )
        }
        ImageCommand::Family { .. }
        | ImageCommand::Lineage { .. }
        | ImageCommand::Derive { .. } => lineage_command(&c, &args.command, args.json, out).await,
        ImageCommand::Import {
            image,
            file,
            uri,
            no_wait,
        } => {
            let id = c.resolve(image).await?;
            if let Some(f) = file {
                c.stage(&id, f, progress).await?;
            }
            c.import(&id, uri.as_deref()).await?;
            let img = if *no_wait {
                c.show(&id).await?
            } else {
                c.wait_imported(&id, std::time::Duration::from_millis(250))
                    .await?
            };
            if img["status"] == "queued" {
                return Err(RegistryError::Remote {
                    status: 0,
                    message: format!(
                        "the import of {id} failed: {}",
                        img["vmi_import_error"]
                            .as_str()
                            .unwrap_or("no reason given")
                    ),
                });
            }
            print_image(out, &img, args.json)
        }
        ImageCommand::Keys { command } => {
            crate::signing::cli::run_keys(&c, command, out, args.json).await
        }
        ImageCommand::Sign { .. } => Ok(()),
        ImageCommand::Lifecycle(cmd) => crate::lifecycle::cli::run(&c, cmd, args.json, out).await,
    }
}

/// `vmi image family|lineage|derive`.
async fn lineage_command(
    c: &RegistryClient,
    command: &ImageCommand,
    as_json: bool,
    out: &mut dyn Write,
) -> Result<()> {
    let w = |out: &mut dyn Write, s: String| {
        writeln!(out, "{s}").map_err(|e| RegistryError::io("writing output", e))
    };
    let s = |v: &Value| v.as_str().unwrap_or("").to_string();
    match command {
        ImageCommand::Family {
            family: None,
            owner,
            ..
        } => {
            let v = c.families(owner.as_deref()).await?;
            if as_json {
                return w(out, serde_json::to_string_pretty(&v).unwrap_or_default());
            }
            w(
                out,
                format!(
                    "{:<32}  {:<32}  {:>6}  {:<36}  VERSION",
                    "FAMILY", "OWNER", "IMAGES", "LATEST"
                ),
            )?;
            for f in v["families"].as_array().into_iter().flatten() {
                w(
                    out,
                    format!(
                        "{:<32}  {:<32}  {:>6}  {:<36}  {}",
                        s(&f["name"]),
                        s(&f["owner"]),
                        f["images"],
                        s(&f["latest"]["id"]),
                        s(&f["latest"]["version"])
                    ),
                )?;
            }
            Ok(())
        }
        ImageCommand::Family {
            family: Some(family),
            owner,
            latest: true,
        } => print_image(
            out,
            &c.family_latest(family, owner.as_deref()).await?,
            as_json,
        ),
        ImageCommand::Family {
            family: Some(family),
            owner,
            latest: false,
        } => {
            let v = c.family_images(family, owner.as_deref()).await?;
            if as_json {
                return w(out, serde_json::to_string_pretty(&v).unwrap_or_default());
            }
            let latest = s(&v["latest"]);
            w(
                out,
                format!("  {:<24}  {:<36}  {:<11}  NAME", "VERSION", "ID", "STATUS"),
            )?;
            for i in v["images"].as_array().into_iter().flatten() {
                let mark = if s(&i["id"]) == latest { "*" } else { " " };
                w(
                    out,
                    format!(
                        "{mark} {:<24}  {:<36}  {:<11}  {}",
                        s(&i["version"]),
                        s(&i["id"]),
                        s(&i["status"]),
                        s(&i["name"])
                    ),
                )?;
            }
            Ok(())
        }
        ImageCommand::Lineage {
            image,
            depth,
            parent,
            relation,
            build,
        } => {
            let id = c.resolve(image).await?;
            if let Some(p) = parent {
                let pid = c.resolve(p).await?;
                let mut body = json!({"parent_id": pid, "relation": relation});
                if let Some(b) = build {
                    body["build"] = serde_json::from_str(b).map_err(|e| {
                        RegistryError::BadRequest(format!("--build is not JSON: {e}"))
                    })?;
                }
                c.record_lineage(&id, &body).await?;
            }
            let v = c.lineage(&id, *depth).await?;
            if as_json {
                return w(out, serde_json::to_string_pretty(&v).unwrap_or_default());
            }
            match v["lineage"].as_object() {
                Some(l) => w(
                    out,
                    format!("{id}: {} of {}", s(&l["relation"]), s(&l["parent_id"])),
                )?,
                None => w(out, format!("{id}: no recorded parent"))?,
            }
            w(out, "ancestors:".into())?;
            for (n, a) in v["ancestors"].as_array().into_iter().flatten().enumerate() {
                let line = if a["visible"] == json!(true) {
                    format!(
                        "  {:>2}  {}  {:<24}  {}",
                        n + 1,
                        s(&a["id"]),
                        s(&a["name"]),
                        s(&a["lineage"]["relation"])
                    )
                } else {
                    format!("  {:>2}  {}  (not visible)", n + 1, s(&a["id"]))
                };
                w(out, line)?;
            }
            if v["more_ancestors"] == json!(true) {
                w(out, "  … (more; raise --depth)".into())?;
            }
            w(out, "children:".into())?;
            for ch in v["children"].as_array().into_iter().flatten() {
                w(
                    out,
                    format!(
                        "      {}  {:<24}  {}",
                        s(&ch["id"]),
                        s(&ch["name"]),
                        s(&ch["relation"])
                    ),
                )?;
            }
            Ok(())
        }
        ImageCommand::Derive {
            template,
            name,
            family,
            version,
            visibility,
            properties,
        } => {
            let id = c.resolve(template).await?;
            let mut body = json!({ "name": name });
            if let Some(v) = family {
                body["family"] = json!(v);
            }
            if let Some(v) = version {
                body["version"] = json!(v);
            }
            if let Some(v) = visibility {
                body["visibility"] = json!(v);
            }
            let mut props = Map::new();
            for p in properties {
                let (k, v) = key_value(p)?;
                props.insert(k, json!(v));
            }
            body["properties"] = Value::Object(props);
            print_image(out, &c.derive(&id, &body).await?, as_json)
        }
        _ => Err(RegistryError::BadRequest(
            "not a family, lineage or derive command".into(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_override_environment_which_overrides_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("c.toml");
        std::fs::write(
            &f,
            "listen = \"1.1.1.1:1\"\ndata_dir = \"/d\"\nregion = \"R\"\n",
        )
        .unwrap();
        let args = ServeArgs {
            listen: Some("127.0.0.1:3".into()),
            ..Default::default()
        };
        let env = vec![
            ("VMI_CONFIG".to_string(), f.display().to_string()),
            ("VMI_LISTEN".to_string(), "127.0.0.1:2".to_string()),
            ("VMI_DATA_DIR".to_string(), "/e".to_string()),
        ];
        let c = effective_config(&args, env).unwrap();
        assert_eq!(c.listen, "127.0.0.1:3");
        assert_eq!(c.data_dir, PathBuf::from("/e"));
        assert_eq!(c.region, "R");
    }
}
