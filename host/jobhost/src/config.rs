//! Settings of `jobhost serve`, from a config file, `JOBHOST_*` variables and flags — each
//! setting from the first of: the flag, the variable, the file, the default.
//!
//! ```toml
//! # jobhost.toml
//! listen = "0.0.0.0:7070"
//! data = "/var/lib/jobhost"
//! store = "postgres://jobhost@db/jobhost"  # a fleet; unset: SQLite in `data`
//! store_connections = 8
//! poll_interval_ms = 1000
//! host_timeout_ms = 30000      # a host silent this long is gone; its leases go to others
//! plugins = "/etc/jobhost/plugins"
//! environment = "default"
//! concurrency = 128
//! admin_token = "…"            # better: JOBHOST_ADMIN_TOKEN
//! secret_key_file = "/etc/jobhost/secret.key"  # mode 0600; or JOBHOST_SECRET_KEY
//! retention_days = 30          # history kept (events, executions, …); 0 keeps everything
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
    store: Option<String>,
    store_connections: Option<usize>,
    poll_interval_ms: Option<u64>,
    host_timeout_ms: Option<u64>,
    plugins: Option<PathBuf>,
    environment: Option<String>,
    concurrency: Option<usize>,
    admin_token: Option<String>,
    secret_key_file: Option<PathBuf>,
    retention_days: Option<f64>,
    limits: Option<toml::Table>,
}

/// Where the host keeps jobs, events and records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreSetting {
    /// The embedded SQLite store in the data directory (the default).
    Sqlite,
    /// A PostgreSQL database shared by a fleet of hosts.
    Postgres {
        /// Connection URL.
        url: String,
        /// Connections of this host (half write, half read; one more listens).
        connections: usize,
        /// The longest a lost notification delays work.
        poll_interval: std::time::Duration,
    },
}

/// Default connections of a host to PostgreSQL.
pub const DEFAULT_STORE_CONNECTIONS: usize = 8;

/// What `serve` runs with.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Where the API listens.
    pub listen: SocketAddr,
    /// The data directory (the SQLite store, deployed plugins, compiled code).
    pub data: PathBuf,
    /// The store.
    pub store: StoreSetting,
    /// A host whose heartbeat is older than this is gone (it heartbeats six times as often).
    pub host_timeout: std::time::Duration,
    /// The plugins directory of `environment`.
    pub plugins: PathBuf,
    /// The environment the plugins directory serves.
    pub environment: String,
    /// Deliveries at once.
    pub concurrency: usize,
    /// The admin token, if any.
    pub admin_token: Option<String>,
    /// The key environment secrets are sealed with, if any.
    pub secret_key: Option<crate::SecretKey>,
    /// How long history is kept (`None`: everything is kept).
    pub retention: Option<std::time::Duration>,
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
        let data = match args.host.data.clone().or_else(|| var("JOBHOST_DATA").map(PathBuf::from)).or(file.data) {
            Some(d) => d,
            // A server's data outlives it: never a temporary directory by default.
            None => default_data_dir(&var).context(
                "no data directory: pass --data DIR, set JOBHOST_DATA, or `data` in the config \
                 (the default, $XDG_DATA_HOME/jobhost or ~/.local/share/jobhost, needs HOME)",
            )?,
        };
        let store = match args.store.clone().or_else(|| var("JOBHOST_STORE")).or(file.store) {
            None => StoreSetting::Sqlite,
            Some(url) if url.starts_with("postgres://") || url.starts_with("postgresql://") => {
                let connections =
                    match (args.store_connections, var("JOBHOST_STORE_CONNECTIONS"), file.store_connections) {
                        (Some(n), _, _) => n,
                        (None, Some(v), _) => {
                            v.parse().with_context(|| format!("JOBHOST_STORE_CONNECTIONS={v} is not a number"))?
                        }
                        (None, None, Some(n)) => n,
                        _ => DEFAULT_STORE_CONNECTIONS,
                    };
                if !(2..=256).contains(&connections) {
                    bail!("store_connections must be 2..=256 (one writer and one reader at least), not {connections}");
                }
                let poll = match (args.poll_interval_ms, var("JOBHOST_POLL_INTERVAL_MS"), file.poll_interval_ms) {
                    (Some(n), _, _) => n,
                    (None, Some(v), _) => {
                        v.parse().with_context(|| format!("JOBHOST_POLL_INTERVAL_MS={v} is not a number"))?
                    }
                    (None, None, Some(n)) => n,
                    _ => 1000,
                };
                if !(10..=60_000).contains(&poll) {
                    bail!("poll_interval_ms must be 10..=60000, not {poll}");
                }
                StoreSetting::Postgres { url, connections, poll_interval: std::time::Duration::from_millis(poll) }
            }
            Some(other) => bail!(
                "store `{}` is not a PostgreSQL URL (postgres://user@host/database); leave it unset for the \
                 embedded SQLite store in the data directory",
                redact(&other)
            ),
        };
        let environment = args
            .environment
            .clone()
            .or_else(|| var("JOBHOST_ENVIRONMENT"))
            .or(file.environment)
            .unwrap_or_else(|| "default".to_owned());
        let admin_token = var("JOBHOST_ADMIN_TOKEN").or(file.admin_token);
        let secret_key = secret_key(args.secret_key_file.as_deref(), &var, file.secret_key_file.as_deref())?;
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
        let host_timeout = match (args.host_timeout_ms, var("JOBHOST_HOST_TIMEOUT_MS"), file.host_timeout_ms) {
            (Some(n), _, _) => n,
            (None, Some(v), _) => v.parse().with_context(|| format!("JOBHOST_HOST_TIMEOUT_MS={v} is not a number"))?,
            (None, None, Some(n)) => n,
            _ => crate::EngineConfig::default().host_timeout.as_millis() as u64,
        };
        if !(600..=3_600_000).contains(&host_timeout) {
            bail!("host_timeout_ms must be 600..=3600000, not {host_timeout}");
        }
        let host_timeout = std::time::Duration::from_millis(host_timeout);
        let days = match (args.retention_days, var("JOBHOST_RETENTION_DAYS"), file.retention_days) {
            (Some(d), _, _) => d,
            (None, Some(v), _) => v.parse().with_context(|| format!("JOBHOST_RETENTION_DAYS={v} is not a number"))?,
            (None, None, Some(d)) => d,
            _ => crate::EngineConfig::default().retention.map_or(0.0, |r| r.as_secs_f64() / 86_400.0),
        };
        if !(0.0..=36_500.0).contains(&days) {
            bail!("retention_days must be 0 (keep everything) to 36500, not {days}");
        }
        let retention = (days > 0.0).then(|| std::time::Duration::from_secs_f64(days * 86_400.0));
        Ok(Self {
            listen,
            data,
            store,
            host_timeout,
            plugins,
            environment,
            concurrency,
            admin_token,
            secret_key,
            retention,
            limits,
        })
    }
}

/// The secret key, from the first of: `--secret-key-file`, `JOBHOST_SECRET_KEY` (64 hex
/// digits), `JOBHOST_SECRET_KEY_FILE`, the config file's `secret_key_file`. A key file must be
/// readable by its owner only.
pub fn secret_key(
    flag: Option<&std::path::Path>,
    var: &impl Fn(&str) -> Option<String>,
    file: Option<&std::path::Path>,
) -> anyhow::Result<Option<crate::SecretKey>> {
    let from_file = |p: &std::path::Path| {
        crate::SecretKey::from_file(p).map_err(|e| anyhow::anyhow!(jobhost_engine::secrets::reason(&e)))
    };
    if let Some(p) = flag {
        return from_file(p).map(Some);
    }
    if let Some(text) = var("JOBHOST_SECRET_KEY") {
        let text = zeroize::Zeroizing::new(text);
        return crate::SecretKey::parse(&text)
            .map(Some)
            .map_err(|e| anyhow::anyhow!("JOBHOST_SECRET_KEY: {}", jobhost_engine::secrets::reason(&e)));
    }
    match var("JOBHOST_SECRET_KEY_FILE").map(PathBuf::from).as_deref().or(file) {
        Some(p) => from_file(p).map(Some),
        None => Ok(None),
    }
}

/// `$XDG_DATA_HOME/jobhost`, else `$HOME/.local/share/jobhost`.
fn default_data_dir(var: &impl Fn(&str) -> Option<String>) -> Option<PathBuf> {
    var("XDG_DATA_HOME")
        .map(PathBuf::from)
        .or_else(|| var("HOME").map(|h| PathBuf::from(h).join(".local/share")))
        .map(|d| d.join("jobhost"))
}

/// A store URL fit for messages and logs: its password replaced.
pub fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else { return url.to_owned() };
    let Some((userinfo, host)) = rest.split_once('@') else { return url.to_owned() };
    match userinfo.split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:***@{host}"),
        None => url.to_owned(),
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
    /// A PostgreSQL URL: this host joins the fleet on that database; unset, the embedded SQLite
    /// store in the data directory [env: JOBHOST_STORE].
    #[arg(long)]
    pub store: Option<String>,
    /// Connections to PostgreSQL, half for writes and half for reads
    /// [env: JOBHOST_STORE_CONNECTIONS] [default: 8].
    #[arg(long)]
    pub store_connections: Option<usize>,
    /// With PostgreSQL, how often to look for work a lost notification would hide
    /// [env: JOBHOST_POLL_INTERVAL_MS] [default: 1000].
    #[arg(long)]
    pub poll_interval_ms: Option<u64>,
    /// A host whose heartbeat is older than this is gone and its leases go to the others
    /// [env: JOBHOST_HOST_TIMEOUT_MS] [default: 30000].
    #[arg(long)]
    pub host_timeout_ms: Option<u64>,
    /// The key file environment secrets are sealed with (mode 0600; make one with
    /// `jobhost secret new-key`) [env: JOBHOST_SECRET_KEY_FILE, or the key itself in
    /// JOBHOST_SECRET_KEY].
    #[arg(long)]
    pub secret_key_file: Option<PathBuf>,
    /// Days of history kept: older events (but those a delivery not done needs), done
    /// deliveries, execution records and loop-guard chains are deleted; 0 keeps everything
    /// [env: JOBHOST_RETENTION_DAYS] [default: 30].
    #[arg(long)]
    pub retention_days: Option<f64>,
    /// Host options.
    #[command(flatten)]
    pub host: HostArgs,
}

/// Options shared by the commands that run jobs.
#[derive(Debug, Clone, clap::Args)]
pub struct HostArgs {
    /// Data directory. Default: `jobhost serve` keeps it in $XDG_DATA_HOME/jobhost
    /// (~/.local/share/jobhost); the other commands use a new temporary directory, removed
    /// afterwards.
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
            "HOME" => Some("/home/op".to_owned()),
            _ => None,
        };
        let s = Settings::resolve(&serve_args(&["--config", path, "--listen", "127.0.0.1:3333"]), env).unwrap();
        assert_eq!(s.listen.port(), 3333, "the flag wins");
        assert_eq!(s.environment, "var-env", "the variable beats the file");
        assert_eq!(s.plugins, PathBuf::from("/from/file"), "the file beats the default");
        assert_eq!(s.concurrency, 3);
        assert_eq!(s.limits.cpu, std::time::Duration::from_millis(250));
        assert_eq!(s.limits.wall, Limits::default().wall, "unset limits keep their defaults");

        let home = |k: &str| (k == "HOME").then(|| "/home/op".to_owned());
        let s = Settings::resolve(&serve_args(&["--plugins", "p"]), home).unwrap();
        assert_eq!((s.listen.to_string().as_str(), s.environment.as_str()), (DEFAULT_LISTEN, "default"));
        assert_eq!(s.concurrency, 64);
        assert_eq!(s.data, PathBuf::from("/home/op/.local/share/jobhost"), "data outlives the server by default");
        assert_eq!(s.store, StoreSetting::Sqlite);
    }

    #[test]
    fn a_postgres_url_makes_a_fleet_member() {
        let file = config("plugins = \"p\"\ndata = \"d\"\nstore = \"postgres://jh@db/jobs\"\nstore_connections = 6\n");
        let path = file.path().to_str().unwrap();
        let s = Settings::resolve(&serve_args(&["--config", path]), |_| None).unwrap();
        assert_eq!(
            s.store,
            StoreSetting::Postgres {
                url: "postgres://jh@db/jobs".into(),
                connections: 6,
                poll_interval: std::time::Duration::from_secs(1)
            }
        );
        let var = |k: &str| match k {
            "JOBHOST_STORE" => Some("postgresql://jh:pw@other/jobs".to_owned()),
            "JOBHOST_POLL_INTERVAL_MS" => Some("250".to_owned()),
            _ => None,
        };
        let s = Settings::resolve(&serve_args(&["--config", path, "--store-connections", "4"]), var).unwrap();
        assert_eq!(
            s.store,
            StoreSetting::Postgres {
                url: "postgresql://jh:pw@other/jobs".into(),
                connections: 4,
                poll_interval: std::time::Duration::from_millis(250)
            }
        );
    }

    #[test]
    fn bad_settings_are_refused_with_their_source_named() {
        for (text, needle) in [
            ("listn = \"x\"\n", "unknown field `listn`"),
            ("concurrency = \"many\"\n", "concurrency"),
            ("plugins = \"p\"\n[limits]\nmemory_mib = 100000\n", "memory_mib = 100000 is out of range"),
            ("plugins = \"p\"\n[limits]\nmemroy = 1\n", "memroy"),
            ("plugins = \"p\"\nretention_days = \"a month\"\n", "retention_days"),
            ("plugins = \"p\"\nretention_days = -1\n", "retention_days must be 0 (keep everything) to 36500, not -1"),
        ] {
            let file = config(text);
            let home = |k: &str| (k == "HOME").then(|| "/home/op".to_owned());
            let err = Settings::resolve(&serve_args(&["--config", file.path().to_str().unwrap()]), home)
                .unwrap_err()
                .to_string();
            assert!(err.contains(needle), "{text:?}: {err}");
        }
        let err = Settings::resolve(&serve_args(&["--plugins", "p"]), |k| {
            (k == "JOBHOST_LISTEN").then(|| "nowhere".to_owned())
        })
        .unwrap_err();
        assert!(err.to_string().contains("JOBHOST_LISTEN=nowhere"), "{err}");
        let err = Settings::resolve(&serve_args(&["--plugins", "p", "--data", "d"]), |k| {
            (k == "JOBHOST_RETENTION_DAYS").then(|| "forever".to_owned())
        })
        .unwrap_err();
        assert!(err.to_string().contains("JOBHOST_RETENTION_DAYS=forever is not a number"), "{err}");
        let days = |argv: &[&str]| Settings::resolve(&serve_args(argv), |_| None).unwrap().retention;
        assert_eq!(days(&["--plugins", "p", "--data", "d"]), Some(std::time::Duration::from_secs(30 * 86_400)));
        assert_eq!(days(&["--plugins", "p", "--data", "d", "--retention-days", "0"]), None, "0 keeps everything");
        assert_eq!(
            days(&["--plugins", "p", "--data", "d", "--retention-days", "0.5"]),
            Some(std::time::Duration::from_secs(43_200))
        );
        let err = Settings::resolve(&serve_args(&[]), |_| None).unwrap_err();
        assert!(err.to_string().contains("no plugins directory"), "{err}");
        let err = Settings::resolve(&serve_args(&["--plugins", "p"]), |_| None).unwrap_err();
        assert!(format!("{err:#}").contains("no data directory"), "{err:#}");
        for (flags, needle) in [
            (&["--store", "mysql://u:secret@h/db"][..], "is not a PostgreSQL URL"),
            (&["--store", "postgres://h/db", "--store-connections", "1"][..], "store_connections must be 2..=256"),
            (&["--store", "postgres://h/db", "--poll-interval-ms", "0"][..], "poll_interval_ms must be 10..=60000"),
        ] {
            let mut argv = vec!["--plugins", "p", "--data", "d"];
            argv.extend_from_slice(flags);
            let err = Settings::resolve(&serve_args(&argv), |_| None).unwrap_err().to_string();
            assert!(err.contains(needle), "{flags:?}: {err}");
            assert!(!err.contains("secret"), "a password never shows in a message: {err}");
        }
    }

    #[test]
    fn the_secret_key_comes_from_the_flag_then_the_variables_then_the_file() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let keys: Vec<_> = (0..3).map(|_| crate::SecretKey::generate().unwrap()).collect();
        let files: Vec<_> = keys
            .iter()
            .enumerate()
            .map(|(i, k)| {
                let p = dir.path().join(format!("key{i}"));
                std::fs::write(&p, &*k.to_hex()).unwrap();
                std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
                p
            })
            .collect();
        let inline = crate::SecretKey::generate().unwrap();
        let hex = inline.to_hex().to_string();
        let (f0, f1) = (files[1].display().to_string(), hex.clone());
        let all = |k: &str| match k {
            "JOBHOST_SECRET_KEY" => Some(f1.clone()),
            "JOBHOST_SECRET_KEY_FILE" => Some(f0.clone()),
            _ => None,
        };
        let fp = |k: anyhow::Result<Option<crate::SecretKey>>| k.unwrap().map(|k| k.fingerprint().to_owned());
        let want = |k: &crate::SecretKey| Some(k.fingerprint().to_owned());
        assert_eq!(fp(secret_key(Some(&files[0]), &all, Some(&files[2]))), want(&keys[0]), "the flag first");
        assert_eq!(fp(secret_key(None, &all, Some(&files[2]))), want(&inline), "then the key in a variable");
        let file_var = |k: &str| (k == "JOBHOST_SECRET_KEY_FILE").then(|| f0.clone());
        assert_eq!(fp(secret_key(None, &file_var, Some(&files[2]))), want(&keys[1]), "then a key file's variable");
        assert_eq!(fp(secret_key(None, &|_: &str| None, Some(&files[2]))), want(&keys[2]), "then the config file");
        assert_eq!(fp(secret_key(None, &|_: &str| None, None)), None);
        let bad = |k: &str| (k == "JOBHOST_SECRET_KEY").then(|| "not-a-key".to_owned());
        let err = secret_key(None, &bad, None).unwrap_err().to_string();
        assert!(
            err.starts_with("JOBHOST_SECRET_KEY: a secret key is 64 hex digits") && !err.contains("invalid input"),
            "{err}"
        );
        let file = config(&format!("plugins = \"p\"\ndata = \"d\"\nsecret_key_file = \"{}\"\n", files[2].display()));
        let settings = Settings::resolve(&serve_args(&["--config", file.path().to_str().unwrap()]), |_| None).unwrap();
        assert_eq!(settings.secret_key.map(|k| k.fingerprint().to_owned()), want(&keys[2]));
    }
}
