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
//! - `jobhost plugin check FILE.wasm` prints a plugin's routes, or why it cannot be loaded.
//!
//! Exit codes: 0 the job completed (or the plugin loads); 1 the job ended otherwise (or the
//! plugin does not load); 2 bad input or a host error.

use std::io::IsTerminal as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

use crate::engine::{Engine, EngineConfig};
use crate::filter::Selector;
use crate::listener::Listener;
use crate::model::{Event, Job, JobStatus, JobType, NewJob, NewRecord};
use crate::runtime::{Plugin, Runtime, RuntimeConfig};
use crate::scenario;

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
    /// Plugin tools.
    #[command(subcommand)]
    Plugin(PluginCommand),
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
    /// Deliveries handled at once.
    #[arg(long, default_value_t = EngineConfig::default().max_in_flight)]
    pub concurrency: usize,
}

/// Arguments of `jobhost run`.
#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// Directory of plugin components (`*.wasm`).
    #[arg(long)]
    pub plugins: PathBuf,
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
            Command::Plugin(PluginCommand::Check { file, json }) => check(&file, json).await,
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
struct DataDir {
    path: PathBuf,
    temporary: bool,
}

impl DataDir {
    fn new(given: Option<&Path>) -> anyhow::Result<Self> {
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

fn open_engine(dir: &Path, host: &HostArgs, runtime: Option<&Runtime>) -> anyhow::Result<Engine> {
    if host.concurrency == 0 {
        bail!("--concurrency must be at least 1");
    }
    let cap = runtime.map_or(usize::MAX, |r| r.config().max_instances as usize);
    let config = EngineConfig { max_in_flight: host.concurrency.min(cap), ..EngineConfig::default() };
    Engine::open(dir, config).with_context(|| format!("cannot open the store in {}", dir.display()))
}

/// Parses `sheet:<operation>`.
fn parse_job(job: &str) -> anyhow::Result<(JobType, String)> {
    let (kind, operation) = job
        .split_once(':')
        .with_context(|| format!("--job `{job}` must be <type>:<operation>, e.g. sheet:submitLargeSheet"))?;
    let kind: JobType = kind.parse().with_context(|| format!("--job `{job}`"))?;
    if kind != JobType::Sheet {
        bail!("--job `{job}`: run loads records into a sheet, so the job must be a sheet job (sheet:<operation>)");
    }
    if operation.is_empty() || operation.contains(':') {
        bail!("--job `{job}`: the operation must be non-empty and without `:`");
    }
    Ok((kind, operation.to_owned()))
}

/// Reads `.csv` (header row of field keys) or `.jsonl` (one JSON object per line).
pub fn read_records(path: &Path) -> anyhow::Result<Vec<NewRecord>> {
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or_default().to_ascii_lowercase();
    let file = std::fs::File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
    match ext.as_str() {
        "csv" => {
            let mut reader = csv::ReaderBuilder::new().has_headers(true).from_reader(std::io::BufReader::new(file));
            let headers =
                reader.headers().with_context(|| format!("{}: cannot read the header row", path.display()))?.clone();
            if headers.is_empty() || headers.iter().any(|h| h.trim().is_empty()) {
                bail!(
                    "{}: the header row must name every column (found {:?})",
                    path.display(),
                    headers.iter().collect::<Vec<_>>()
                );
            }
            let mut out = Vec::new();
            for (i, row) in reader.records().enumerate() {
                let row = row.with_context(|| format!("{}: bad CSV at record {}", path.display(), i + 1))?;
                let values: Map<String, Value> = headers
                    .iter()
                    .zip(row.iter())
                    .filter(|(_, v)| !v.is_empty())
                    .map(|(h, v)| (h.trim().to_owned(), Value::String(v.to_owned())))
                    .collect();
                out.push(NewRecord { values, ..Default::default() });
            }
            Ok(out)
        }
        "jsonl" | "ndjson" => {
            use std::io::BufRead;
            let mut out = Vec::new();
            for (i, line) in std::io::BufReader::new(file).lines().enumerate() {
                let line = line.with_context(|| format!("cannot read {}", path.display()))?;
                if line.trim().is_empty() {
                    continue;
                }
                match serde_json::from_str::<Value>(&line) {
                    Ok(Value::Object(values)) => out.push(NewRecord { values, ..Default::default() }),
                    Ok(other) => bail!("{} line {}: expected a JSON object, found {other}", path.display(), i + 1),
                    Err(e) => bail!("{} line {}: {e}", path.display(), i + 1),
                }
            }
            Ok(out)
        }
        _ => bail!("{}: unsupported format; use .csv (header row of field keys) or .jsonl", path.display()),
    }
}

async fn load_plugins(runtime: &Arc<Runtime>, dir: &Path, quiet: bool) -> anyhow::Result<Vec<Arc<Plugin>>> {
    let (plugins, failed) = runtime.load_dir(dir).await?;
    for e in &failed {
        eprintln!("warning: plugin not loaded: {e}");
    }
    if plugins.is_empty() {
        bail!("no plugin could be loaded from {}", dir.display());
    }
    if !quiet {
        for p in &plugins {
            eprintln!("loaded plugin {} ({}) with {} route(s)", p.name, p.version, p.routes.len());
        }
    }
    Ok(plugins)
}

/// Refuses a job nobody would pick up, instead of waiting for the watchdog.
fn check_someone_listens(plugins: &[Arc<Plugin>], kind: JobType, operation: &str) -> anyhow::Result<()> {
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
    let runtime = Runtime::new(RuntimeConfig::default())?;
    let plugins = load_plugins(&runtime, &args.plugins, args.host.json).await?;
    check_someone_listens(&plugins, kind, &operation)?;
    let dir = DataDir::new(args.host.data.as_deref())?;
    let engine = open_engine(&dir.path, &args.host, Some(&runtime))?;
    let environment = engine.create_environment("run").await?;
    let listeners: Vec<Listener> = plugins.iter().map(|p| runtime.listener(p.clone(), &environment.id)).collect();
    let running = engine.run(listeners).await?;
    let env = engine.env(&environment.id);
    let sheet = env.create_sheet(args.records.file_stem().and_then(|s| s.to_str()).unwrap_or("records")).await?;
    let count = records.len();
    env.insert_records(&sheet.id, records).await?;
    let job = env.create_job(NewJob { input, source: Some(sheet.id.clone()), ..NewJob::new(kind, operation) }).await?;
    if !args.host.json {
        eprintln!("loaded {count} records into sheet {}; created job {} ({})", sheet.id, job.id, args.job);
    }
    let state = RunState { environment_id: environment.id, sheet_id: sheet.id, job_id: job.id, expected_invalid: None };
    finish(&engine, &state, running, &plugins, &args.host, Instant::now()).await
}

async fn demo(args: DemoArgs) -> anyhow::Result<ExitCode> {
    let dir = DataDir::new(args.host.data.as_deref())?;
    let started = Instant::now();
    let (runtime, plugins) = if args.native {
        (None, Vec::new())
    } else {
        let plugins_dir = dir.path.join("plugins");
        std::fs::create_dir_all(&plugins_dir).context("cannot create the plugins directory")?;
        std::fs::copy(crate::artifacts::SUBMIT_LARGE_SHEET, plugins_dir.join("submit-large-sheet.wasm"))
            .context("cannot copy the example plugin (was the host built with its build script?)")?;
        let runtime = Runtime::new(RuntimeConfig::default())?;
        let plugins = load_plugins(&runtime, &plugins_dir, args.host.json).await?;
        (Some(runtime), plugins)
    };
    let engine = open_engine(&dir.path, &args.host, runtime.as_deref())?;
    let listeners_for = |env_id: &str| -> Vec<Listener> {
        match &runtime {
            Some(rt) => plugins.iter().map(|p| rt.listener(p.clone(), env_id)).collect(),
            None => scenario::listeners(env_id, scenario::Options::default()),
        }
    };
    // Listeners subscribe before the job exists: an event is fanned out to the subscriptions
    // present when it is stored.
    let (state, running) = match read_state(&dir.path)? {
        Some(s) => {
            eprintln!("resuming job {} in {}", s.job_id, dir.path.display());
            let running = engine.run(listeners_for(&s.environment_id)).await?;
            (s, running)
        }
        None => {
            let environment = engine.create_environment("demo").await?;
            let running = engine.run(listeners_for(&environment.id)).await?;
            (setup_demo(&engine, &dir.path, &environment.id, args.records, args.host.json).await?, running)
        }
    };
    finish(&engine, &state, running, &plugins, &args.host, started).await
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
    running: crate::listener::Running,
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

/// Runs the demo from a test's child process (see `tests/crash.rs`).
pub async fn demo_for_tests(args: DemoArgs) -> anyhow::Result<ExitCode> {
    demo(args).await
}
