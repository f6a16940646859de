//! The `jobhost` command line.
//!
//! - `jobhost run --plugins DIR --records FILE --job sheet:OPERATION` loads the plugins in DIR
//!   into a new environment, loads FILE (CSV with a header row of field keys, or JSON lines)
//!   into a sheet, creates the job, shows progress while the plugins work, and prints a
//!   summary (`--json`: one JSON object).
//! - `jobhost demo` is the seeds' scenario end to end: it writes a sample CSV of people records
//!   (about 1 in 8 invalid), puts the example `submit-large-sheet` plugin in a plugins
//!   directory, and runs it like `run`. `--native` runs the same listeners compiled into the
//!   host instead (the baseline). Given a `--data` directory that already holds a demo, it
//!   resumes it (this is how the crash tests restart a killed host).
//! - `jobhost serve --plugins DIR` runs the host until SIGINT/SIGTERM, hot-reloading DIR.
//! - `dev`: `jobhost dev --plugin-src DIR` rebuilds a plugin (any language) on every source
//!   change, hot-reloads it and reruns a job, printing what changed.
//! - `jobhost plugin new|build|test`: write a plugin that runs at once ([`crate::scaffold`]),
//!   build one from source ([`crate::build`]), run its golden tests (`test`).
//! - `jobhost plugin check FILE.wasm` prints a plugin's routes, or why it cannot be loaded;
//!   `plugin list` and `plugin rollback` show and restore kept versions (of a directory with
//!   `--plugins`, otherwise of a running host).
//! - [`remote`]: the operator commands that drive a running host over its HTTP API —
//!   `jobs list|get|cancel|retry`, `plugin deploy|list|rollback`, `records import`.
//! - [`records_file`]: CSV and JSON-lines record files, read one record at a time.
//!
//! Exit codes: 0 the job completed (or the plugin loads, or the operator command did what it
//! was asked); 1 the job ended otherwise (or the plugin does not load); 2 bad input, an error
//! answered by the host, or a host that cannot be reached.

use std::io::IsTerminal as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::filter::Selector;
use crate::model::{Event, Job, JobStatus, JobType, NewJob};
use crate::reload::{PluginHost, ReloadEvent};
use crate::runtime::{Limits, Plugin, Runtime, RuntimeConfig};
use crate::scenario;
use crate::{Engine, EngineConfig};

mod demo;
mod dev;
mod plugin;
pub mod records_file;
pub mod remote;
mod run;
mod secret;
mod serve;
mod test;

pub use demo::demo_for_tests;
use demo::*;
use plugin::*;
use run::*;
use secret::*;
use serve::*;

pub use crate::config::{HostArgs, ServeArgs};
pub use records_file::{RecordReader, read_records};

/// jobhost: sandboxed job listeners on a durable job engine.
#[derive(Debug, Parser)]
#[command(name = "jobhost", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Load plugins and records, run one job through the plugins, and summarise.
    Run(RunArgs),
    /// The seeds' scenario with the example plugin on a generated sheet.
    Demo(DemoArgs),
    /// Run the host: the engine and the plugins of a directory, hot-reloaded, until SIGINT or
    /// SIGTERM, and the HTTP API on `--listen`.
    Serve(ServeArgs),
    /// Develop a plugin in any language: rebuild it on every source change and hot-reload it;
    /// with `--records` and `--job`, run the job after every reload and print what changed.
    Dev(DevArgs),
    /// Plugin tools.
    #[command(subcommand)]
    Plugin(PluginCommand),
    /// Secrets of an environment, read by plugins whose manifest grants them. Works on a data
    /// directory no host is running on.
    #[command(subcommand)]
    Secret(SecretCommand),
    /// Jobs of a running host's environment (over the HTTP API).
    #[command(subcommand)]
    Jobs(remote::JobsCommand),
    /// Records of a running host's environment (over the HTTP API).
    #[command(subcommand)]
    Records(remote::RecordsCommand),
}

/// `jobhost secret …`
#[derive(Debug, Subcommand)]
pub enum SecretCommand {
    /// Store a secret; its value is read from stdin (never from the command line, where other
    /// users of the machine could see it). A trailing newline is dropped.
    Set {
        /// The secret's name.
        name: String,
        /// Where the secret goes.
        #[command(flatten)]
        at: SecretArgs,
    },
    /// List the names of an environment's secrets (never their values).
    List {
        /// Where the secrets are.
        #[command(flatten)]
        at: SecretArgs,
    },
    /// Delete a secret.
    Delete {
        /// The secret's name.
        name: String,
        /// Where the secret is.
        #[command(flatten)]
        at: SecretArgs,
    },
    /// Write a new random key to a file (created with mode 0600; an existing file is never
    /// replaced). Give it to hosts with --secret-key-file or JOBHOST_SECRET_KEY_FILE.
    NewKey {
        /// The key file to create.
        path: PathBuf,
    },
    /// Re-seal every secret of every environment with a new key, in one write. Stop the hosts
    /// first and restart them with the new key: a host still on the old key refuses to read
    /// secrets until then.
    RotateKey {
        /// The new key file (made with `jobhost secret new-key`).
        #[arg(long)]
        new_key_file: PathBuf,
        /// Where the secrets are.
        #[command(flatten)]
        at: SecretArgs,
    },
}

/// Languages `plugin new` writes.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum NewLanguage {
    /// Rust, with the `jobhost-plugin-sdk` crate.
    Rust,
    /// Python, with the `jobhost_listener` module (componentize-py).
    Python,
    /// JavaScript, with the `jobhost-listener` module (componentize-js).
    Js,
    /// C, with `jobhost.h` over bindings generated from the WIT (clang, wasi-libc).
    C,
}

/// The environment a secret command acts on.
#[derive(Debug, clap::Args)]
pub struct SecretArgs {
    /// The host's data directory.
    #[arg(long)]
    pub data: PathBuf,
    /// The environment, by name (created if missing).
    #[arg(long, default_value = "default")]
    pub environment: String,
    /// The key file secrets are sealed with [env: JOBHOST_SECRET_KEY_FILE, or the key itself in
    /// JOBHOST_SECRET_KEY].
    #[arg(long)]
    pub secret_key_file: Option<PathBuf>,
}

/// `jobhost plugin …`
#[derive(Debug, Subcommand)]
pub enum PluginCommand {
    /// Load a plugin and print its routes, or why it cannot be loaded.
    Check {
        /// The component.
        file: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Build the plugin whose source is in DIR (Rust: `Cargo.toml`; Python: `app.py`;
    /// JavaScript: `app.js`; C: `app.c`) with
    /// pinned tools (installed on first use) and print the component's path.
    Build {
        /// The plugin's source directory.
        dir: PathBuf,
        /// Copy the component here.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Write a plugin that runs at once: a `sheet:NAME` listener that splits the sheet into
    /// parts, checks a rule on each part's records and completes the parent, with a sample
    /// CSV, a golden test and a README of the next commands.
    New {
        /// The plugin's name (a-z, 0-9, `-`).
        name: String,
        /// Its language.
        #[arg(long, value_enum)]
        lang: NewLanguage,
        /// Where (default: ./NAME).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// The Rust SDK's directory (default: the one this binary was built with).
        #[arg(long)]
        sdk: Option<PathBuf>,
    },
    /// Run a plugin's golden tests: build DIR, run every `DIR/tests/<name>/fixture.toml` in a
    /// store of its own and compare the result with its `expected.json`. Exit code 0 when all
    /// pass, 1 when one differs (the differences printed record by record), 2 on bad input.
    Test {
        /// The plugin's source directory.
        dir: PathBuf,
        /// Write each fixture's result as its new expectation instead of comparing.
        #[arg(long)]
        update: bool,
        /// Run only the fixtures with these names.
        #[arg(long = "fixture")]
        fixtures: Vec<String>,
        /// Seconds a fixture's job may take before it fails.
        #[arg(long, default_value_t = 120)]
        timeout: u64,
        /// Print JSON (one object: every fixture's result and differences).
        #[arg(long)]
        json: bool,
    },
    /// Upload a plugin to a running host as plugin NAME; the host validates it before
    /// anything changes and swaps it in atomically. Given a source directory, builds it first.
    Deploy {
        /// The component (`.wasm`), or a plugin's source directory to build.
        file: PathBuf,
        /// The plugin's name.
        #[arg(long)]
        name: Option<String>,
        /// The host and token.
        #[command(flatten)]
        remote: remote::Remote,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// List plugins with their version, routes and the versions kept for rollback: those of a
    /// running host's environment, or with `--plugins` those of a directory.
    List {
        /// A plugins directory to read instead of asking a host.
        #[arg(long)]
        plugins: Option<PathBuf>,
        /// The host and token.
        #[command(flatten)]
        remote: remote::Remote,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Put a kept version of a plugin back in place: on a running host, or with `--plugins` in a
    /// directory (a host watching it loads it).
    Rollback {
        /// The plugin (file stem).
        name: String,
        /// A plugins directory to change instead of asking a host.
        #[arg(long)]
        plugins: Option<PathBuf>,
        /// The version to restore (default: the newest kept version that is not current).
        #[arg(long)]
        to: Option<String>,
        /// The host and token.
        #[command(flatten)]
        remote: remote::Remote,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

/// Arguments of `jobhost dev`.
#[derive(Debug, clap::Args)]
pub struct DevArgs {
    /// The plugin's source directory: a Cargo package (Rust), `app.py`, `app.js` or `app.c`.
    #[arg(long)]
    pub plugin_src: PathBuf,
    /// Where to publish the built component (default: `plugins` in the data directory).
    #[arg(long)]
    pub plugins: Option<PathBuf>,
    /// Records to run a job on after every reload (`.csv` or `.jsonl`).
    #[arg(long, requires = "job")]
    pub records: Option<PathBuf>,
    /// The job to run after every reload, `sheet:<operation>`.
    #[arg(long, requires = "records")]
    pub job: Option<String>,
    /// The job's input, JSON.
    #[arg(long, requires = "job")]
    pub input: Option<String>,
    /// Seconds a run of the job may take before `dev` reports it as stuck.
    #[arg(long, default_value_t = 120)]
    pub timeout: u64,
    /// Print every delivery's log lines after a run (failed deliveries are always printed).
    #[arg(long)]
    pub logs: bool,
    /// Host options.
    #[command(flatten)]
    pub host: HostArgs,
}

/// Arguments of `jobhost run`.
#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// Directory of plugin components (`*.wasm`).
    #[arg(long, required_unless_present = "plugin_src", conflicts_with = "plugin_src")]
    pub plugins: Option<PathBuf>,
    /// A plugin's source directory, built (as `plugin build` does) and loaded; repeatable.
    #[arg(long = "plugin-src")]
    pub plugin_src: Vec<PathBuf>,
    /// Records to load: `.csv` (header row of field keys) or `.jsonl` (one object per line).
    #[arg(long)]
    pub records: PathBuf,
    /// The job to run, `sheet:<operation>`.
    #[arg(long)]
    pub job: String,
    /// The job's input, JSON.
    #[arg(long)]
    pub input: Option<String>,
    /// Seconds a job may sit executing without activity, or ready without an ack, before the
    /// watchdog fails it (a listener that returned without ending its job); `serve` uses
    /// 15 min and 5 min.
    #[arg(long, value_name = "SECONDS", default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub stale_timeout: u64,
    /// Host options.
    #[command(flatten)]
    pub host: HostArgs,
}

/// Arguments of `jobhost demo`.
#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// Records in the sample sheet (about 1 in 8 is invalid).
    #[arg(long, default_value_t = 100_000)]
    pub records: u64,
    /// Run the listeners compiled into the host instead of the WebAssembly plugin.
    #[arg(long)]
    pub native: bool,
    /// Host options.
    #[command(flatten)]
    pub host: HostArgs,
}

/// Entry point of the binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("JOBHOST_LOG").unwrap_or_else(|_| "error".into()))
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(2);
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Run(args) => run(args).await,
            Command::Demo(args) => demo(args).await,
            Command::Serve(args) => serve(args).await,
            Command::Dev(args) => dev::dev(args).await,
            Command::Plugin(PluginCommand::Check { file, json }) => check(&file, json).await,
            Command::Plugin(PluginCommand::List { plugins: Some(plugins), json, .. }) => list(&plugins, json).await,
            Command::Plugin(PluginCommand::Rollback { name, plugins: Some(plugins), to, json, .. }) => {
                let version = crate::reload::rollback(&plugins, &name, to.as_deref())?;
                if json {
                    println!("{}", json!({ "name": name, "version": version }));
                } else {
                    println!("restored {name} version {version} in {}", plugins.display());
                }
                Ok(ExitCode::SUCCESS)
            }
            Command::Plugin(PluginCommand::Build { dir, out, json }) => build(&dir, out.as_deref(), json).await,
            Command::Plugin(PluginCommand::New { name, lang, dir, sdk }) => new_plugin(&name, lang, dir, sdk),
            Command::Plugin(PluginCommand::Test { dir, update, fixtures, timeout, json }) => {
                test::run(&dir, update, &fixtures, timeout, json).await
            }
            Command::Plugin(cmd) => remote::plugin(cmd).await,
            Command::Secret(cmd) => secret(cmd).await,
            Command::Jobs(cmd) => remote::jobs(cmd).await,
            Command::Records(cmd) => remote::records(cmd).await,
        }
    });
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// A data directory: the given one, or a temporary one removed on drop.
pub(crate) struct DataDir {
    path: PathBuf,
    temporary: bool,
}

impl DataDir {
    pub(crate) fn new(given: Option<&Path>) -> anyhow::Result<Self> {
        match given {
            Some(p) => Ok(Self { path: p.to_path_buf(), temporary: false }),
            None => {
                let path = std::env::temp_dir().join(crate::model::new_id("jobhost"));
                std::fs::create_dir_all(&path).with_context(|| format!("cannot create {}", path.display()))?;
                Ok(Self { path, temporary: true })
            }
        }
    }
}

impl Drop for DataDir {
    fn drop(&mut self) {
        if self.temporary {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

/// The runtime of a CLI host: plugins without a manifest may use every slot `--concurrency` gives.
fn runtime_config(host: &HostArgs) -> RuntimeConfig {
    let defaults = RuntimeConfig::default();
    let limits = Limits { max_instances: host.concurrency().max(1), ..defaults.limits.clone() };
    RuntimeConfig { limits, ..defaults }
}

fn open_engine(dir: &Path, host: &HostArgs, runtime: Option<&Runtime>) -> anyhow::Result<Engine> {
    open_engine_with(dir, host, runtime, |c| c)
}

/// [`open_engine`] with the engine's settings adjusted by `adjust`.
fn open_engine_with(
    dir: &Path,
    host: &HostArgs,
    runtime: Option<&Runtime>,
    adjust: impl FnOnce(EngineConfig) -> EngineConfig,
) -> anyhow::Result<Engine> {
    let config = engine_config(host, runtime, adjust)?;
    crate::open_engine(dir, config).with_context(|| format!("cannot open the store in {}", dir.display()))
}

/// The engine's settings for a CLI host.
fn engine_config(
    host: &HostArgs,
    runtime: Option<&Runtime>,
    adjust: impl FnOnce(EngineConfig) -> EngineConfig,
) -> anyhow::Result<EngineConfig> {
    if host.concurrency() == 0 {
        bail!("--concurrency must be at least 1");
    }
    let cap = runtime.map_or(usize::MAX, |r| r.config().max_instances as usize);
    let n = host.concurrency().min(cap);
    // The key from the environment (`serve` resolves its own, from flags and config too).
    let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    let secret_key = crate::config::secret_key(None, &var, None)?;
    // Every CLI mode serves one environment, so its share is the whole host.
    Ok(adjust(EngineConfig { secret_key, ..EngineConfig::single_environment(n) }))
}

/// Parses `--job sheet:<operation>`.
fn parse_job(job: &str) -> anyhow::Result<(JobType, String)> {
    crate::golden::parse_job(job).context("--job")
}

/// Starts a plugin host on `dir` for `environment_id` (watching it), reporting what loaded.
async fn start_plugins(
    runtime: &Arc<Runtime>,
    running: &Arc<crate::delivery::Running>,
    environment_id: &str,
    dir: &Path,
    quiet: bool,
) -> anyhow::Result<(Arc<PluginHost>, crate::reload::Watch)> {
    let (host, loaded) = PluginHost::start(runtime.clone(), running.clone(), environment_id, dir).await?;
    for event in &loaded {
        match event {
            ReloadEvent::Failed { reason, .. } => eprintln!("warning: plugin not loaded: {reason}"),
            ReloadEvent::Loaded { name, version, .. } if !quiet => eprintln!("loaded plugin {name} ({version})"),
            _ => {}
        }
    }
    let watch = host.watch(RELOAD_DEBOUNCE)?;
    Ok((host, watch))
}

/// Quiet time after a file event before the file is read: long enough to stitch a rename's
/// events together, short enough for a swap well under 200 ms.
const RELOAD_DEBOUNCE: std::time::Duration = std::time::Duration::from_millis(50);

/// Refuses a job nobody would pick up, instead of waiting for the watchdog.
fn check_someone_listens(plugins: &[Arc<Plugin>], kind: JobType, operation: &str) -> anyhow::Result<()> {
    if plugins.is_empty() {
        bail!("no plugin could be loaded");
    }
    let job = format!("{kind}:{operation}");
    let probe = Event {
        id: "evt_probe".into(),
        seq: 0,
        topic: "job:ready".into(),
        context: json!({ "environmentId": "", "jobId": "", "sheetId": "", "actorId": "" }),
        payload: json!({ "domain": kind, "operation": operation, "job": job, "status": "ready", "isPart": false }),
        created_at: 0,
    };
    let listens = plugins
        .iter()
        .flat_map(|p| &p.routes)
        .any(|r| Selector::parse(&r.topic, &r.filter).is_ok_and(|s| s.matches(&probe)));
    if !listens {
        bail!(
            "no loaded plugin handles job:ready for {job}; check --job and the plugins' routes (jobhost plugin check)"
        );
    }
    Ok(())
}
