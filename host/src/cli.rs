//! The `jobhost` command line.
//!
//! `jobhost demo` runs the seeds' scenario on the embedded store with native listeners: it
//! makes a sheet of sample people records (some invalid), creates a `sheet:submitLargeSheet`
//! job, and lets the parent and part listeners split, validate and finish it. Given a data
//! directory that already holds a demo, it resumes that demo instead (this is how the crash
//! tests restart a killed host).
//!
//! Exit codes: 0 the job completed; 1 the job ended otherwise; 2 bad input or a host error.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::engine::{Engine, EngineConfig};
use crate::model::{JobStatus, NewJob};
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
    /// Run the seeds' multi-part scenario with native listeners on the embedded store.
    Demo(DemoArgs),
}

/// Arguments of `jobhost demo`.
#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// Records in the sample sheet (about 1 in 8 is invalid).
    #[arg(long, default_value_t = 100_000)]
    pub records: u64,
    /// Data directory. Default: a new temporary directory, removed afterwards. A directory that
    /// already holds a demo resumes it.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Print one JSON summary object on stdout instead of text.
    #[arg(long)]
    pub json: bool,
    /// Deliveries handled at once.
    #[arg(long, default_value_t = EngineConfig::default().max_in_flight)]
    pub concurrency: usize,
}

/// Entry point of the binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("JOBHOST_LOG").unwrap_or_else(|_| "warn".into()))
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
            Command::Demo(args) => demo(args).await,
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

/// What a demo data directory remembers, so a restarted host resumes the same job.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct DemoState {
    environment_id: String,
    sheet_id: String,
    job_id: String,
    expected_invalid: u64,
}

const STATE_FILE: &str = "demo.json";

/// Runs (or resumes) the demo scenario; see the module docs.
pub async fn demo(args: DemoArgs) -> anyhow::Result<ExitCode> {
    let (_temp, dir) = match &args.data {
        Some(d) => (None, d.clone()),
        None => {
            let t = tempfile_dir()?;
            let p = t.clone();
            (Some(TempDir(t)), p)
        }
    };
    if args.concurrency == 0 {
        anyhow::bail!("--concurrency must be at least 1");
    }
    let config = EngineConfig { max_in_flight: args.concurrency, ..EngineConfig::default() };
    let engine = Engine::open(&dir, config).with_context(|| format!("cannot open the store in {}", dir.display()))?;
    let started = Instant::now();
    // Listeners subscribe before the job exists: events are fanned out to the subscriptions
    // present when they are stored.
    let (state, running) = match read_state(&dir)? {
        Some(s) => {
            eprintln!("resuming job {} in {}", s.job_id, dir.display());
            let running = engine.run(scenario::listeners(&s.environment_id, scenario::Options::default())).await?;
            (s, running)
        }
        None => {
            let environment = engine.create_environment("demo").await?;
            let running = engine.run(scenario::listeners(&environment.id, scenario::Options::default())).await?;
            (setup(&engine, &dir, &environment.id, args.records).await?, running)
        }
    };
    let env = engine.env(&state.environment_id);

    let job = watch_progress(&engine, &state).await?;
    running.shutdown().await;

    let parts = env.parts(&job.id).await?;
    let count = |s: JobStatus| parts.iter().filter(|p| p.status == s).count();
    let records = env.record_counts(&state.sheet_id).await?;
    let dead = env.dead_letters().await?.len();
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
        "deadLetters": dead,
        "elapsedMs": started.elapsed().as_millis() as u64,
        "dataDir": args.data.as_ref().map(|d| d.display().to_string()),
    });
    if args.json {
        println!("{summary}");
    } else {
        println!(
            "job {} {}: {}",
            job.id,
            job.status,
            job.outcome.get("message").and_then(|m| m.as_str()).unwrap_or("")
        );
        println!(
            "parts: {} total, {} completed, {} failed, {} canceled",
            parts.len(),
            count(JobStatus::Complete),
            count(JobStatus::Failed),
            count(JobStatus::Canceled)
        );
        println!(
            "records: {} total, {} valid, {} invalid (expected {} invalid)",
            records.total, records.valid, records.error, state.expected_invalid
        );
        println!("took {:.2} s", started.elapsed().as_secs_f64());
    }
    Ok(if job.status == JobStatus::Complete { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

async fn setup(engine: &Engine, dir: &Path, environment_id: &str, records: u64) -> anyhow::Result<DemoState> {
    let env = engine.env(environment_id);
    let sheet = env.create_sheet("people").await?;
    let (rows, expected_invalid) = scenario::sample_records(records);
    let t = Instant::now();
    env.insert_records(&sheet.id, rows).await?;
    eprintln!(
        "loaded {records} records into sheet {} in {:.2} s ({expected_invalid} invalid by construction)",
        sheet.id,
        t.elapsed().as_secs_f64()
    );
    let job = env.create_job(NewJob::sheet(scenario::OPERATION, &sheet.id)).await?;
    let state =
        DemoState { environment_id: environment_id.to_owned(), sheet_id: sheet.id, job_id: job.id, expected_invalid };
    let text = serde_json::to_vec_pretty(&state)?;
    let tmp = dir.join(format!("{STATE_FILE}.tmp"));
    std::fs::write(&tmp, text)
        .and_then(|_| std::fs::rename(&tmp, dir.join(STATE_FILE)))
        .context("cannot write the demo state")?;
    eprintln!("created job {} ({})", state.job_id, scenario::JOB);
    Ok(state)
}

fn read_state(dir: &Path) -> anyhow::Result<Option<DemoState>> {
    match std::fs::read(dir.join(STATE_FILE)) {
        Ok(bytes) => Ok(Some(serde_json::from_slice(&bytes).context("demo.json is unreadable")?)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).context("cannot read demo.json"),
    }
}

/// Prints progress lines on stderr until the parent job is terminal, and returns it.
async fn watch_progress(engine: &Engine, state: &DemoState) -> anyhow::Result<crate::model::Job> {
    let env = engine.env(&state.environment_id);
    let mut commits = engine.store().backend().commits();
    let (mut cursor, mut parts_total, mut parts_ended, mut last_printed) = (0i64, 0u64, 0u64, u64::MAX);
    loop {
        commits.borrow_and_update();
        loop {
            let events = env.events(cursor, 10_000).await?;
            let Some(last) = events.last() else { break };
            cursor = last.seq;
            for e in &events {
                let is_part = e.payload.get("isPart").and_then(|v| v.as_bool()) == Some(true);
                let status = e.payload.get("status").and_then(|s| s.as_str());
                match (e.topic.as_str(), is_part) {
                    ("job:created", true) => parts_total += 1,
                    ("job:completed" | "job:failed", true) => parts_ended += 1,
                    ("job:updated", true) if status == Some("canceled") => parts_ended += 1,
                    ("job:parts-completed", _) => eprintln!("parts-completed: {}", e.payload["parts"]),
                    _ => {}
                }
            }
        }
        // Every part end for small jobs, every 1% for large ones: fine-grained enough for the
        // crash tests to choose kill points.
        let step = (parts_total / 100).max(1);
        if parts_total > 0 && parts_ended != last_printed && (parts_ended % step == 0 || parts_ended == parts_total) {
            eprintln!("parts ended: {parts_ended}/{parts_total}");
            last_printed = parts_ended;
        }
        let job = env.job(&state.job_id).await?;
        if job.status.is_terminal() {
            eprintln!("parent {}", job.status);
            return Ok(job);
        }
        commits.changed().await.context("the store closed")?;
    }
}

struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn tempfile_dir() -> anyhow::Result<PathBuf> {
    let dir = std::env::temp_dir().join(crate::model::new_id("jobhost-demo"));
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    Ok(dir)
}
