//! Command-line arguments of `vmi serve`, and its entry point [`run_serve`].
//!
//! The `vmi` binary embeds [`ServeArgs`] as its `serve` subcommand and calls [`run_serve`].
//! Settings come from defaults, then `--config FILE` (or `VMI_CONFIG`), then `VMI_*`
//! environment variables, then these flags.

use crate::config::Config;
use crate::error::{chain, RegistryError, Result};
use crate::server::Registry;
use clap::Args;
use std::path::PathBuf;
use std::time::Duration;

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
    /// Catalog URL: sqlite://PATH [default: <data-dir>/catalog.db].
    #[arg(long, value_name = "URL")]
    pub database: Option<String>,
    /// Image store URL: file://PATH [default: <data-dir>/images].
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
