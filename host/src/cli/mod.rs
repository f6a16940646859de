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
//! - [`dev`]: `jobhost dev --plugin-src DIR` rebuilds a plugin (any language) on every source
//!   change, hot-reloads it and reruns a job, printing what changed.
//! - `jobhost plugin new|build|test`: write a plugin that runs at once ([`crate::scaffold`]),
//!   build one from source ([`crate::build`]), run its golden tests ([`test`]).
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

use crate::engine::{Engine, EngineConfig};
use crate::filter::Selector;
use crate::model::{Event, Job, JobStatus, JobType, NewJob};
use crate::reload::{PluginHost, ReloadEvent};
use crate::runtime::{Limits, Plugin, Runtime, RuntimeConfig};
use crate::scenario;

mod dev;
pub mod records_file;
pub mod remote;
mod test;

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
        self.concurrency.unwrap_or(EngineConfig::default().max_in_flight)
    }
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

/// What a data directory remembers of the job it runs, so a restarted host resumes it.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RunState {
    environment_id: String,
    sheet_id: String,
    job_id: String,
    expected_invalid: Option<u64>,
}

const STATE_FILE: &str = "demo.json";

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
    if host.concurrency() == 0 {
        bail!("--concurrency must be at least 1");
    }
    let cap = runtime.map_or(usize::MAX, |r| r.config().max_instances as usize);
    let n = host.concurrency().min(cap);
    // Every CLI mode serves one environment, so its share is the whole host.
    let config = adjust(EngineConfig::single_environment(n));
    Engine::open(dir, config).with_context(|| format!("cannot open the store in {}", dir.display()))
}

/// Parses `--job sheet:<operation>`.
fn parse_job(job: &str) -> anyhow::Result<(JobType, String)> {
    crate::golden::parse_job(job).context("--job")
}

/// Starts a plugin host on `dir` for `environment_id` (watching it), reporting what loaded.
async fn start_plugins(
    runtime: &Arc<Runtime>,
    running: &Arc<crate::listener::Running>,
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

async fn run(args: RunArgs) -> anyhow::Result<ExitCode> {
    let (kind, operation) = parse_job(&args.job)?;
    let input: Value = match &args.input {
        Some(text) => serde_json::from_str(text).context("--input is not JSON")?,
        None => Value::Null,
    };
    let records = read_records(&args.records)?;
    let dir = DataDir::new(args.host.data.as_deref())?;
    let plugins_dir = match &args.plugins {
        Some(p) => {
            std::fs::read_dir(p)
                .map_err(|e| anyhow::anyhow!("cannot read the plugins directory {}: {e}", p.display()))?;
            p.clone()
        }
        // Built from source: published into the data directory's own plugins directory.
        None => {
            let p = dir.path.join("plugins");
            std::fs::create_dir_all(&p).with_context(|| format!("cannot create {}", p.display()))?;
            for src in &args.plugin_src {
                let from = src.clone();
                let built = tokio::task::spawn_blocking(move || crate::build::build(&from)).await??;
                publish(&built, &p)?;
            }
            p
        }
    };
    let runtime = Runtime::new(runtime_config(&args.host))?;
    let engine = open_engine(&dir.path, &args.host, Some(&runtime))?;
    let environment = engine.create_environment("run").await?;
    let running = Arc::new(engine.run(Vec::new()).await?);
    let (plugins, _watch) = start_plugins(&runtime, &running, &environment.id, &plugins_dir, args.host.json).await?;
    check_someone_listens(&plugins.loaded().await, kind, &operation)?;
    let env = engine.env(&environment.id);
    let sheet = env.create_sheet(args.records.file_stem().and_then(|s| s.to_str()).unwrap_or("records")).await?;
    let count = records.len();
    env.insert_records(&sheet.id, records).await?;
    let job = env.create_job(NewJob { input, source: Some(sheet.id.clone()), ..NewJob::new(kind, operation) }).await?;
    if !args.host.json {
        eprintln!("loaded {count} records into sheet {}; created job {} ({})", sheet.id, job.id, args.job);
    }
    let state = RunState { environment_id: environment.id, sheet_id: sheet.id, job_id: job.id, expected_invalid: None };
    finish(&engine, &state, &running, &plugins.loaded().await, &args.host, Instant::now()).await
}

async fn demo(args: DemoArgs) -> anyhow::Result<ExitCode> {
    let dir = DataDir::new(args.host.data.as_deref())?;
    let started = Instant::now();
    let runtime = if args.native { None } else { Some(Runtime::new(runtime_config(&args.host))?) };
    let engine = open_engine(&dir.path, &args.host, runtime.as_deref())?;
    let resumed = read_state(&dir.path)?;
    let environment_id = match &resumed {
        Some(s) => {
            eprintln!("resuming job {} in {}", s.job_id, dir.path.display());
            s.environment_id.clone()
        }
        None => engine.create_environment("demo").await?.id,
    };
    // Listeners subscribe before the job exists: an event is fanned out to the subscriptions
    // present when it is stored.
    let (running, plugins) = match &runtime {
        None => (Arc::new(engine.run(scenario::listeners(&environment_id, scenario::Options::default())).await?), None),
        Some(rt) => {
            let plugins_dir = dir.path.join("plugins");
            std::fs::create_dir_all(&plugins_dir).context("cannot create the plugins directory")?;
            let target = plugins_dir.join("submit-large-sheet.wasm");
            let tmp = plugins_dir.join(".submit-large-sheet.wasm.tmp");
            std::fs::copy(crate::artifacts::SUBMIT_LARGE_SHEET, &tmp)
                .and_then(|_| std::fs::rename(&tmp, &target))
                .context("cannot copy the example plugin (was the host built with its build script?)")?;
            let running = Arc::new(engine.run(Vec::new()).await?);
            let plugins = start_plugins(rt, &running, &environment_id, &plugins_dir, args.host.json).await?;
            (running, Some(plugins))
        }
    };
    let state = match resumed {
        Some(s) => s,
        None => setup_demo(&engine, &dir.path, &environment_id, args.records, args.host.json).await?,
    };
    let loaded = match &plugins {
        Some((host, _)) => host.loaded().await,
        None => Vec::new(),
    };
    finish(&engine, &state, &running, &loaded, &args.host, started).await
}

async fn setup_demo(
    engine: &Engine,
    dir: &Path,
    environment_id: &str,
    records: u64,
    quiet: bool,
) -> anyhow::Result<RunState> {
    let env = engine.env(environment_id);
    let sheet = env.create_sheet("people").await?;
    // Through a real CSV file, so the demo exercises the same loading path as `run`.
    let csv_path = dir.join("people.csv");
    let expected_invalid = write_sample_csv(&csv_path, records)?;
    let t = Instant::now();
    let rows = read_records(&csv_path)?;
    env.insert_records(&sheet.id, rows).await?;
    if !quiet {
        eprintln!(
            "loaded {records} records from {} into sheet {} in {:.2} s ({expected_invalid} invalid by construction)",
            csv_path.display(),
            sheet.id,
            t.elapsed().as_secs_f64()
        );
    }
    let job = env.create_job(NewJob::sheet(scenario::OPERATION, &sheet.id)).await?;
    let state = RunState {
        environment_id: environment_id.to_owned(),
        sheet_id: sheet.id,
        job_id: job.id,
        expected_invalid: Some(expected_invalid),
    };
    let tmp = dir.join(format!("{STATE_FILE}.tmp"));
    std::fs::write(&tmp, serde_json::to_vec_pretty(&state)?)
        .and_then(|_| std::fs::rename(&tmp, dir.join(STATE_FILE)))
        .context("cannot write the demo state")?;
    eprintln!("created job {} ({})", state.job_id, scenario::JOB);
    Ok(state)
}

/// Writes the deterministic sample sheet as CSV; returns how many rows are invalid.
fn write_sample_csv(path: &Path, records: u64) -> anyhow::Result<u64> {
    let mut w = csv::Writer::from_path(path).with_context(|| format!("cannot write {}", path.display()))?;
    let fields = ["firstName", "lastName", "email", "age"];
    w.write_record(fields)?;
    let mut invalid = 0;
    for i in 0..records {
        let (record, bad) = scenario::sample_record(i);
        invalid += u64::from(bad);
        let cell = |f: &str| match record.values.get(f) {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Null) | None => String::new(),
            Some(other) => other.to_string(),
        };
        w.write_record(fields.map(cell))?;
    }
    w.flush()?;
    Ok(invalid)
}

fn read_state(dir: &Path) -> anyhow::Result<Option<RunState>> {
    match std::fs::read(dir.join(STATE_FILE)) {
        Ok(bytes) => Ok(Some(serde_json::from_slice(&bytes).context("demo.json is unreadable")?)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).context("cannot read demo.json"),
    }
}

/// Waits for the job to end (showing progress), stops the listeners, prints the summary.
async fn finish(
    engine: &Engine,
    state: &RunState,
    running: &crate::listener::Running,
    plugins: &[Arc<Plugin>],
    host: &HostArgs,
    started: Instant,
) -> anyhow::Result<ExitCode> {
    let job = watch_progress(engine, state, host.json).await?;
    running.shutdown().await;
    let env = engine.env(&state.environment_id);
    let parts = env.parts(&job.id).await?;
    let count = |s: JobStatus| parts.iter().filter(|p| p.status == s).count();
    let records = env.record_counts(&state.sheet_id).await?;
    let dead = env.dead_letters().await?.len();
    let executions = env.executions(None, u32::MAX).await?;
    let failed_executions = executions.iter().filter(|e| e.error.is_some()).count();
    let summary = json!({
        "job": { "id": job.id, "status": job.status, "outcome": job.outcome },
        "parts": {
            "total": parts.len(),
            "completed": count(JobStatus::Complete),
            "failed": count(JobStatus::Failed),
            "canceled": count(JobStatus::Canceled),
        },
        "records": records,
        "expectedInvalid": state.expected_invalid,
        "plugins": plugins.iter().map(|p| json!({ "name": p.name, "version": p.version })).collect::<Vec<_>>(),
        "executions": { "total": executions.len(), "failed": failed_executions },
        "deadLetters": dead,
        "elapsedMs": started.elapsed().as_millis() as u64,
    });
    if host.json {
        println!("{summary}");
    } else {
        println!("job {} {}: {}", job.id, job.status, job.outcome.get("message").and_then(Value::as_str).unwrap_or(""));
        println!(
            "parts: {} total, {} completed, {} failed, {} canceled",
            parts.len(),
            count(JobStatus::Complete),
            count(JobStatus::Failed),
            count(JobStatus::Canceled)
        );
        let expected = state.expected_invalid.map(|n| format!(" (expected {n} invalid)")).unwrap_or_default();
        println!("records: {} total, {} valid, {} invalid{expected}", records.total, records.valid, records.error);
        if !plugins.is_empty() {
            println!("plugin deliveries: {} ({} failed), dead letters: {dead}", executions.len(), failed_executions);
        }
        println!("took {:.2} s", started.elapsed().as_secs_f64());
    }
    Ok(if job.status == JobStatus::Complete { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

/// Shows progress until the parent job is terminal, and returns it: progress bars on a
/// terminal, plain lines otherwise (the crash tests read those lines), nothing with `--json`.
async fn watch_progress(engine: &Engine, state: &RunState, quiet: bool) -> anyhow::Result<Job> {
    use indicatif::{ProgressBar, ProgressStyle};
    let env = engine.env(&state.environment_id);
    let bars = !quiet && std::io::stderr().is_terminal();
    let multi = indicatif::MultiProgress::new();
    let style = ProgressStyle::with_template("{prefix:>7} [{bar:40}] {pos}/{len} {msg}")
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
    let parent_bar = multi.add(ProgressBar::new(100).with_style(style.clone()).with_prefix("parent"));
    let parts_bar = multi.add(ProgressBar::new(0).with_style(style).with_prefix("parts"));
    if !bars {
        multi.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let mut commits = engine.store().backend().commits();
    let (mut cursor, mut parts_total, mut parts_ended, mut last_printed) = (0i64, 0u64, 0u64, u64::MAX);
    loop {
        commits.borrow_and_update();
        loop {
            let events = env.events(cursor, 10_000).await?;
            let Some(last) = events.last() else { break };
            cursor = last.seq;
            for e in &events {
                let is_part = e.payload.get("isPart").and_then(Value::as_bool) == Some(true);
                let status = e.payload.get("status").and_then(Value::as_str);
                match (e.topic.as_str(), is_part) {
                    ("job:created", true) => parts_total += 1,
                    ("job:completed" | "job:failed", true) => parts_ended += 1,
                    ("job:updated", true) if status == Some("canceled") => parts_ended += 1,
                    ("job:parts-completed", _) if !bars && !quiet => {
                        eprintln!("parts-completed: {}", e.payload["parts"])
                    }
                    _ => {}
                }
            }
        }
        let job = env.job(&state.job_id).await?;
        if bars {
            parent_bar.set_position(u64::from(job.progress));
            parent_bar.set_message(job.info.clone().unwrap_or_default());
            parts_bar.set_length(parts_total);
            parts_bar.set_position(parts_ended);
        } else if !quiet {
            // Every part end for small jobs, every 1% for large ones: fine-grained enough for
            // the crash tests to choose kill points.
            let step = (parts_total / 100).max(1);
            if parts_total > 0 && parts_ended != last_printed && (parts_ended % step == 0 || parts_ended == parts_total)
            {
                eprintln!("parts ended: {parts_ended}/{parts_total}");
                last_printed = parts_ended;
            }
        }
        if job.status.is_terminal() {
            parent_bar.finish_and_clear();
            parts_bar.finish_and_clear();
            if !quiet {
                eprintln!("parent {}", job.status);
            }
            return Ok(job);
        }
        commits.changed().await.context("the store closed")?;
    }
}

async fn check(file: &Path, json_out: bool) -> anyhow::Result<ExitCode> {
    let runtime = Runtime::new(RuntimeConfig::default())?;
    match runtime.load(file).await {
        Ok(plugin) => {
            if json_out {
                println!(
                    "{}",
                    json!({ "ok": true, "name": plugin.name, "version": plugin.version, "routes": plugin.routes })
                );
            } else {
                println!("{} ({}): {} route(s)", plugin.name, plugin.version, plugin.routes.len());
                for (i, r) in plugin.routes.iter().enumerate() {
                    let filter = if r.filter.is_null() { String::new() } else { format!(" {}", r.filter) };
                    println!("  #{i} {}{filter}", r.topic);
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            if json_out {
                println!("{}", json!({ "ok": false, "error": e.to_string() }));
            } else {
                eprintln!("error: {e}");
            }
            Ok(ExitCode::from(1))
        }
    }
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(s) => s,
            Err(_) => {
                let _ = ctrl_c.await;
                return;
            }
        };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

async fn serve(args: ServeArgs) -> anyhow::Result<ExitCode> {
    let settings = crate::config::Settings::resolve(&args, |k| std::env::var(k).ok())?;
    let host = HostArgs { data: settings.data.clone(), json: false, concurrency: Some(settings.concurrency) };
    let limits = Limits { max_instances: settings.concurrency, ..settings.limits.clone() };
    let runtime = Runtime::new(RuntimeConfig { limits, ..RuntimeConfig::default() })?;
    let dir = DataDir::new(host.data.as_deref())?;
    let engine = open_engine(&dir.path, &host, Some(&runtime))?;
    let environment = engine.environment_named(&settings.environment).await?;
    let running = Arc::new(engine.run(Vec::new()).await?);
    let (plugins, watch) = start_plugins(&runtime, &running, &environment.id, &settings.plugins, false).await?;
    let mut events = plugins.subscribe();
    let listener = tokio::net::TcpListener::bind(settings.listen)
        .await
        .with_context(|| format!("cannot listen on {}", settings.listen))?;
    let admin_token = settings.admin_token.clone().map(Arc::from);
    if admin_token.is_none() {
        eprintln!("no admin token (JOBHOST_ADMIN_TOKEN or admin_token in the config): the admin routes answer 401");
    }
    let registry = crate::api::plugins::Plugins::new(runtime.clone(), running.clone(), dir.path.join("plugins"));
    registry.adopt(&environment.id, plugins.clone()).await;
    for (env, plugin) in registry.start_all(&engine).await {
        eprintln!("loaded plugin {} ({}) of environment {env}", plugin.name, plugin.version);
    }
    let api = crate::api::router(crate::api::ApiState { engine: engine.clone(), admin_token, plugins: Some(registry) });
    let (api_stop, api_stopped) = tokio::sync::oneshot::channel::<()>();
    eprintln!("listening on http://{}", listener.local_addr()?);
    let server = tokio::spawn(crate::api::serve(listener, api, async move {
        let _ = api_stopped.await;
    }));
    eprintln!(
        "serving {} plugin(s) from {} in environment {} ({}); data in {}; Ctrl-C to stop",
        plugins.plugins().await.len(),
        settings.plugins.display(),
        environment.name,
        environment.id,
        dir.path.display()
    );
    let stop = shutdown_signal();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = &mut stop => break,
            event = events.recv() => match event {
                Ok(ReloadEvent::Loaded { name, version, previous }) => {
                    eprintln!("loaded plugin {name} version {version}{}", previous.map(|p| format!(" (was {p})")).unwrap_or_default())
                }
                Ok(ReloadEvent::Failed { name, reason, .. }) if reason != crate::reload::ALREADY_FAILED => {
                    eprintln!("plugin {name} not reloaded, previous version keeps serving: {reason}")
                }
                Ok(ReloadEvent::Removed { name, version }) => eprintln!("unloaded plugin {name} version {version}"),
                _ => {}
            },
        }
    }
    eprintln!("stopping: finishing requests and deliveries in flight");
    let _ = api_stop.send(());
    drop(watch);
    running.shutdown().await;
    match server.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => eprintln!("the API stopped with an error: {e}"),
        Err(e) => eprintln!("the API task failed: {e}"),
    }
    Ok(ExitCode::SUCCESS)
}

async fn list(plugins: &Path, json_out: bool) -> anyhow::Result<ExitCode> {
    let runtime = Runtime::new(RuntimeConfig::default())?;
    let mut files: Vec<PathBuf> = std::fs::read_dir(plugins)
        .with_context(|| format!("cannot read the plugins directory {}", plugins.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "wasm") && p.is_file())
        .collect();
    files.sort();
    let mut out = Vec::new();
    for f in files {
        let name = f.file_stem().and_then(|s| s.to_str()).unwrap_or_default().to_owned();
        let kept = crate::reload::history(plugins, &name).unwrap_or_default();
        let entry = match runtime.load(&f).await {
            Ok(p) => {
                json!({ "name": name, "version": p.version, "routes": p.routes, "kept": kept.iter().map(|k| &k.version).collect::<Vec<_>>() })
            }
            Err(e) => {
                json!({ "name": name, "error": e.to_string(), "kept": kept.iter().map(|k| &k.version).collect::<Vec<_>>() })
            }
        };
        out.push(entry);
    }
    if json_out {
        println!("{}", Value::from(out));
    } else {
        for p in &out {
            match p.get("version") {
                Some(v) => println!(
                    "{} {} ({} route(s)); kept: {}",
                    p["name"].as_str().unwrap_or(""),
                    v.as_str().unwrap_or(""),
                    p["routes"].as_array().map_or(0, Vec::len),
                    p["kept"]
                ),
                None => {
                    println!("{} cannot load: {}", p["name"].as_str().unwrap_or(""), p["error"].as_str().unwrap_or(""))
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn build(dir: &Path, out: Option<&Path>, json_out: bool) -> anyhow::Result<ExitCode> {
    let started = Instant::now();
    let src = dir.to_owned();
    let built = tokio::task::spawn_blocking(move || crate::build::build(&src)).await??;
    let path = match out {
        Some(out) => {
            std::fs::copy(&built, out).with_context(|| format!("cannot write {}", out.display()))?;
            out.to_owned()
        }
        None => built,
    };
    let bytes = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
    if json_out {
        println!("{}", json!({ "component": path, "bytes": bytes, "seconds": started.elapsed().as_secs_f64() }));
    } else {
        println!("{}", path.display());
    }
    Ok(ExitCode::SUCCESS)
}

fn new_plugin(name: &str, lang: NewLanguage, dir: Option<PathBuf>, sdk: Option<PathBuf>) -> anyhow::Result<ExitCode> {
    let dir = dir.unwrap_or_else(|| PathBuf::from(name));
    let (language, sdk) = match lang {
        NewLanguage::Rust => {
            let sdk = sdk.unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../plugin-sdk"));
            let sdk =
                sdk.canonicalize().with_context(|| format!("the Rust SDK is not at {} (pass --sdk)", sdk.display()))?;
            (crate::build::Language::Rust, sdk)
        }
        // The Python SDK is part of this binary.
        NewLanguage::Python => (crate::build::Language::Python, PathBuf::new()),
        NewLanguage::Js => (crate::build::Language::JavaScript, PathBuf::new()),
        NewLanguage::C => (crate::build::Language::C, PathBuf::new()),
    };
    for path in crate::scaffold::scaffold(language, name, &dir, &sdk)? {
        println!("wrote {}", path.display());
    }
    let d = dir.display();
    println!("run it on the sample:   jobhost run --plugin-src {d} --records {d}/sample.csv --job sheet:{name}");
    println!("edit, save, see:        jobhost dev --plugin-src {d} --records {d}/sample.csv --job sheet:{name}");
    println!("golden tests:           jobhost plugin test {d}");
    Ok(ExitCode::SUCCESS)
}

/// Copies a component into a plugins directory the atomic way (write, then rename).
pub(crate) fn publish(component: &Path, plugins: &Path) -> anyhow::Result<String> {
    let name = component.file_stem().and_then(|s| s.to_str()).context("component file name")?.to_owned();
    let tmp = plugins.join(format!(".{name}.wasm.tmp"));
    std::fs::copy(component, &tmp).and_then(|_| std::fs::rename(&tmp, plugins.join(format!("{name}.wasm"))))?;
    Ok(name)
}

/// Runs the demo from a test's child process (see `tests/crash.rs`).
pub async fn demo_for_tests(args: DemoArgs) -> anyhow::Result<ExitCode> {
    demo(args).await
}

async fn secret(cmd: SecretCommand) -> anyhow::Result<ExitCode> {
    let at = match &cmd {
        SecretCommand::Set { at, .. } | SecretCommand::List { at } | SecretCommand::Delete { at, .. } => at,
    };
    let engine = Engine::open(&at.data, EngineConfig::default())
        .with_context(|| format!("cannot open the store in {}", at.data.display()))?;
    let env = engine.env(engine.environment_named(&at.environment).await?.id);
    match &cmd {
        SecretCommand::Set { name, .. } => {
            let mut value = String::new();
            std::io::Read::read_to_string(&mut std::io::stdin(), &mut value)
                .context("cannot read the value from stdin")?;
            let value = value.strip_suffix('\n').map(|v| v.strip_suffix('\r').unwrap_or(v)).unwrap_or(&value);
            env.set_secret(name, value).await?;
            eprintln!("secret {name} stored in environment {}", at.environment);
        }
        SecretCommand::List { .. } => {
            for name in env.secret_names().await? {
                println!("{name}");
            }
        }
        SecretCommand::Delete { name, .. } => {
            if !env.delete_secret(name).await? {
                bail!("environment {} has no secret {name}", at.environment);
            }
            eprintln!("secret {name} deleted from environment {}", at.environment);
        }
    }
    Ok(ExitCode::SUCCESS)
}
