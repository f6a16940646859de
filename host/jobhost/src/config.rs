//! Settings of `jobhost serve`, from a config file, `JOBHOST_*` variables and flags — each
//! setting from the first of: the flag, the variable, the file, the default.
//!
//! ```toml
//! # jobhost.toml
//! listen = "0.0.0.0:7070"
//! data = "/var/lib/jobhost"
//! plugins = "/etc/jobhost/plugins"
//! environment = "default"
//! concurrency = 128
//! admin_token = "…"            # better: JOBHOST_ADMIN_TOKEN
//!
//! [limits]                     # defaults for plugins without a manifest (a manifest's keys)
//! memory_mib = 32
//! cpu_ms = 2000
//! ```
//!
//! Parsing is strict: an unknown key, a wrong type or a value out of range is an error that
//! names the file or variable and the key, and the host does not start.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, bail};
use serde::Deserialize;

use crate::runtime::{Ceiling, Limits, RuntimeConfig};

/// The config file as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    listen: Option<SocketAddr>,
    data: Option<PathBuf>,
    plugins: Option<PathBuf>,
    environment: Option<String>,
    concurrency: Option<usize>,
    admin_token: Option<String>,
    limits: Option<toml::Table>,
}

/// What `serve` runs with.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Where the API listens.
    pub listen: SocketAddr,
    /// The data directory; `None`: a temporary one.
    pub data: Option<PathBuf>,
    /// The plugins directory of `environment`.
    pub plugins: PathBuf,
    /// The environment the plugins directory serves.
    pub environment: String,
    /// Deliveries at once.
    pub concurrency: usize,
    /// The admin token, if any.
    pub admin_token: Option<String>,
    /// Limits of plugins without a manifest.
    pub limits: Limits,
}

/// Default address of the API.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:7070";

impl Settings {
    /// Resolves the settings of `serve` from its flags, the variables `var` finds, and the
    /// config file named by `--config` or `JOBHOST_CONFIG`.
    pub fn resolve(args: &ServeArgs, var: impl Fn(&str) -> Option<String>) -> anyhow::Result<Self> {
        let var = |k: &str| var(k).filter(|v| !v.is_empty());
        let path = args.config.clone().or_else(|| var("JOBHOST_CONFIG").map(PathBuf::from));
        let file: File = match &path {
            Some(p) => {
                let text =
                    std::fs::read_to_string(p).with_context(|| format!("cannot read the config {}", p.display()))?;
                toml::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {}", p.display(), e.to_string().trim_end()))?
            }
            None => File::default(),
        };
        let from_var = |k: &str| -> anyhow::Result<Option<SocketAddr>> {
            var(k)
                .map(|v| v.parse().with_context(|| format!("{k}={v} is not an address like 127.0.0.1:7070")))
                .transpose()
        };
        let listen = match (args.listen, from_var("JOBHOST_LISTEN")?, file.listen) {
            (Some(a), _, _) | (None, Some(a), _) | (None, None, Some(a)) => a,
            _ => DEFAULT_LISTEN.parse().expect("a valid default address"),
        };
        let concurrency = match (args.host.concurrency, var("JOBHOST_CONCURRENCY"), file.concurrency) {
            (Some(n), _, _) => n,
            (None, Some(v), _) => v.parse().with_context(|| format!("JOBHOST_CONCURRENCY={v} is not a number"))?,
            (None, None, Some(n)) => n,
            _ => crate::EngineConfig::default().max_in_flight,
        };
        if concurrency == 0 {
            bail!("concurrency must be at least 1");
        }
        let plugins = args
            .plugins
            .clone()
            .or_else(|| var("JOBHOST_PLUGINS").map(PathBuf::from))
            .or(file.plugins)
            .context("no plugins directory: pass --plugins DIR, set JOBHOST_PLUGINS, or `plugins` in the config")?;
        let data = args.host.data.clone().or_else(|| var("JOBHOST_DATA").map(PathBuf::from)).or(file.data);
        let environment = args
            .environment
            .clone()
            .or_else(|| var("JOBHOST_ENVIRONMENT"))
            .or(file.environment)
            .unwrap_or_else(|| "default".to_owned());
        let admin_token = var("JOBHOST_ADMIN_TOKEN").or(file.admin_token);
        let base = RuntimeConfig::default();
        let limits = match file.limits {
            None => base.limits.clone(),
            Some(table) => {
                let ceiling = Ceiling { memory: base.max_memory, fuel: base.fuel };
                crate::runtime::limits::limits_from_table(table, &base.limits, ceiling).map_err(|e| {
                    anyhow::anyhow!("{}: {e}", path.as_ref().map(|p| p.display().to_string()).unwrap_or_default())
                })?
            }
        };
        Ok(Self { listen, data, plugins, environment, concurrency, admin_token, limits })
    }
}

/// Arguments of `jobhost serve`. Each setting comes from the flag, else its `JOBHOST_*`
/// variable, else the config file, else its default (see [`crate::config`]).
#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// A config file (TOML; unknown keys are errors).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Directory of plugin components (`*.wasm`), watched for changes [env: JOBHOST_PLUGINS].
    #[arg(long)]
    pub plugins: Option<PathBuf>,
    /// The environment the plugins serve, created if missing [env: JOBHOST_ENVIRONMENT] [default: default].
    #[arg(long)]
    pub environment: Option<String>,
    /// Where the HTTP API listens; `127.0.0.1:0` picks a free port and prints it
    /// [env: JOBHOST_LISTEN] [default: 127.0.0.1:7070].
    #[arg(long)]
    pub listen: Option<std::net::SocketAddr>,
    /// Host options.
    #[command(flatten)]
    pub host: HostArgs,
}

/// Options shared by the commands that run jobs.
#[derive(Debug, Clone, clap::Args)]
pub struct HostArgs {
    /// Data directory. Default: a new temporary directory, removed afterwards.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Print one JSON summary object on stdout instead of text.
    #[arg(long)]
    pub json: bool,
    /// Deliveries handled at once [default: 64].
    #[arg(long)]
    pub concurrency: Option<usize>,
}

impl HostArgs {
    /// `--concurrency`, or its default.
    pub fn concurrency(&self) -> usize {
        self.concurrency.unwrap_or(crate::EngineConfig::default().max_in_flight)
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Serve {
        #[command(flatten)]
        args: ServeArgs,
    }

    fn serve_args(argv: &[&str]) -> ServeArgs {
        let mut full = vec!["serve"];
        full.extend_from_slice(argv);
        Serve::parse_from(full).args
    }

    fn config(text: &str) -> tempfile::NamedTempFile {
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), text).unwrap();
        f
    }

    #[test]
    fn flags_beat_variables_beat_the_file_beats_the_defaults() {
        let file = config(
            "listen = \"127.0.0.1:1111\"\nplugins = \"/from/file\"\nenvironment = \"file-env\"\nconcurrency = 3\n[limits]\ncpu_ms = 250\n",
        );
        let path = file.path().to_str().unwrap();
        let env = |k: &str| match k {
            "JOBHOST_LISTEN" => Some("127.0.0.1:2222".to_owned()),
            "JOBHOST_ENVIRONMENT" => Some("var-env".to_owned()),
            _ => None,
        };
        let s = Settings::resolve(&serve_args(&["--config", path, "--listen", "127.0.0.1:3333"]), env).unwrap();
        assert_eq!(s.listen.port(), 3333, "the flag wins");
        assert_eq!(s.environment, "var-env", "the variable beats the file");
        assert_eq!(s.plugins, PathBuf::from("/from/file"), "the file beats the default");
        assert_eq!(s.concurrency, 3);
        assert_eq!(s.limits.cpu, std::time::Duration::from_millis(250));
        assert_eq!(s.limits.wall, Limits::default().wall, "unset limits keep their defaults");

        let s = Settings::resolve(&serve_args(&["--plugins", "p"]), |_| None).unwrap();
        assert_eq!((s.listen.to_string().as_str(), s.environment.as_str()), (DEFAULT_LISTEN, "default"));
        assert_eq!(s.concurrency, 64);
    }

    #[test]
    fn bad_settings_are_refused_with_their_source_named() {
        for (text, needle) in [
            ("listn = \"x\"\n", "unknown field `listn`"),
            ("concurrency = \"many\"\n", "concurrency"),
            ("plugins = \"p\"\n[limits]\nmemory_mib = 100000\n", "memory_mib = 100000 is out of range"),
            ("plugins = \"p\"\n[limits]\nmemroy = 1\n", "memroy"),
        ] {
            let file = config(text);
            let err = Settings::resolve(&serve_args(&["--config", file.path().to_str().unwrap()]), |_| None)
                .unwrap_err()
                .to_string();
            assert!(err.contains(needle), "{text:?}: {err}");
        }
        let err = Settings::resolve(&serve_args(&["--plugins", "p"]), |k| {
            (k == "JOBHOST_LISTEN").then(|| "nowhere".to_owned())
        })
        .unwrap_err();
        assert!(err.to_string().contains("JOBHOST_LISTEN=nowhere"), "{err}");
        let err = Settings::resolve(&serve_args(&[]), |_| None).unwrap_err();
        assert!(err.to_string().contains("no plugins directory"), "{err}");
    }
}
