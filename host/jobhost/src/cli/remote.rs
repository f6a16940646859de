//! Operator commands that drive a running host over its HTTP API (through [`Client`]):
//! `jobs list|get|cancel|retry`, `plugin deploy|list|rollback`, `records import`. Each takes
//! `--url` and `--token` (or `JOBHOST_URL`, `JOBHOST_TOKEN`: a token on the command line is
//! visible to other users of the machine) and prints a table or, with `--json`, the API's JSON.

use std::io::IsTerminal as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context as _, bail};
use clap::Subcommand;
use serde_json::{Value, json};

use super::PluginCommand;
use super::records_file::{RecordReader, check_records};
use crate::client::Client;
use crate::model::{Job, MAX_PAGE_SIZE, Sheet};
use crate::reload::{PluginInfo, ReloadEvent};

/// Where the host is and who is asking.
#[derive(Debug, Clone, clap::Args)]
pub struct Remote {
    /// The host's API.
    #[arg(long, env = "JOBHOST_URL", default_value = "http://127.0.0.1:7070")]
    pub url: String,
    /// An environment's API token (`jobhost serve` prints how to make one).
    #[arg(long, env = "JOBHOST_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
}

impl Remote {
    fn client(&self) -> anyhow::Result<Client> {
        let token = self.token.clone().filter(|t| !t.is_empty()).context(
            "no token: pass --token or set JOBHOST_TOKEN to an environment's token (POST /v1/environments/{id}/tokens)",
        )?;
        Ok(Client::new(&self.url, Some(token))?)
    }
}

/// `jobhost jobs …`
#[derive(Debug, Subcommand)]
pub enum JobsCommand {
    /// List jobs, oldest first (or the parts of `--parent`).
    List {
        /// Only the parts of this job.
        #[arg(long)]
        parent: Option<String>,
        /// 1-based page.
        #[arg(long, default_value_t = 1)]
        page: u32,
        /// Jobs per page, 1..=1000.
        #[arg(long, default_value_t = 100)]
        page_size: u32,
        /// The host and token.
        #[command(flatten)]
        remote: Remote,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show a job.
    Get {
        /// The job's id.
        id: String,
        /// The host and token.
        #[command(flatten)]
        remote: Remote,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Cancel a job (and its open parts).
    Cancel {
        /// The job's id.
        id: String,
        /// Why, kept in the job's `info`.
        #[arg(long)]
        info: Option<String>,
        /// The host and token.
        #[command(flatten)]
        remote: Remote,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Retry a failed or canceled job.
    Retry {
        /// The job's id.
        id: String,
        /// The host and token.
        #[command(flatten)]
        remote: Remote,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

/// `jobhost records …`
#[derive(Debug, Subcommand)]
pub enum RecordsCommand {
    /// Append the records of a file to a sheet, in the file's order.
    ///
    /// The whole file is checked before anything is sent, so a malformed file changes nothing.
    /// Records go in batches; each batch is stored entirely or not at all. If the host refuses
    /// a batch or the connection breaks, the message says how many records were stored and the
    /// `--skip` that resumes after them.
    Import {
        /// `.csv` (a header row of field keys) or `.jsonl` (one JSON object per line).
        file: PathBuf,
        /// The sheet's id.
        #[arg(long)]
        sheet: String,
        /// Records per request, 1..=10000.
        #[arg(long, default_value_t = 10_000)]
        batch: usize,
        /// Skip this many records at the start of the file (to resume an import).
        #[arg(long, default_value_t = 0, conflicts_with = "resume")]
        skip: u64,
        /// Skip as many records as the sheet already holds: for a sheet that only this file
        /// fills, the exact place to go on from, even when the host stopped before answering
        /// the last batch (which it then stored entirely or not at all).
        #[arg(long)]
        resume: bool,
        /// The host and token.
        #[command(flatten)]
        remote: Remote,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

fn print_json(value: &impl serde::Serialize) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

fn job_line(j: &Job) -> String {
    let part = j.part_index.map(|i| format!(" part {i}")).unwrap_or_default();
    let info = j.info.as_deref().map(|i| format!("  {i}")).unwrap_or_default();
    format!("{:<28} {:<10} {:>3}%  {}{part}{info}", j.id, j.status.to_string(), j.progress, j.job_name())
}

/// `jobhost jobs …`
pub async fn jobs(cmd: JobsCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        JobsCommand::List { parent, page, page_size, remote, json } => {
            let mut path = format!("/v1/jobs?pageSize={page_size}&pageNumber={page}");
            if let Some(p) = &parent {
                path.push_str(&format!("&parentId={p}"));
            }
            let jobs: Vec<Job> = remote.client()?.get(&path).await?;
            if json {
                print_json(&jobs)?;
            } else if jobs.is_empty() {
                println!("no jobs");
            } else {
                println!("{:<28} {:<10} {:>4}  JOB", "ID", "STATUS", "DONE");
                for j in &jobs {
                    println!("{}", job_line(j));
                }
            }
        }
        JobsCommand::Get { id, remote, json } => {
            let job: Job = remote.client()?.get(&format!("/v1/jobs/{id}")).await?;
            if json {
                print_json(&job)?;
            } else {
                print_job(&job);
            }
        }
        JobsCommand::Cancel { id, info, remote, json } => {
            let job: Job = remote.client()?.post(&format!("/v1/jobs/{id}/cancel"), &json!({ "info": info })).await?;
            if json { print_json(&job)? } else { println!("{}", job_line(&job)) }
        }
        JobsCommand::Retry { id, remote, json } => {
            let job: Job = remote.client()?.post(&format!("/v1/jobs/{id}/retry"), &json!({})).await?;
            if json { print_json(&job)? } else { println!("{}", job_line(&job)) }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn print_job(j: &Job) {
    println!("{}  {}", j.id, j.job_name());
    println!("  status     {} ({}%), attempt {}", j.status, j.progress, j.attempt);
    if let Some(p) = &j.parent_id {
        println!("  part       {} of {p}", j.part_index.unwrap_or_default());
    }
    if let Some(s) = &j.source {
        println!("  source     {s}");
    }
    if let Some(i) = &j.info {
        println!("  info       {i}");
    }
    if !j.outcome.is_null() {
        println!("  outcome    {}", j.outcome);
    }
}

/// `jobhost plugin deploy|list|rollback` against a host.
pub async fn plugin(cmd: PluginCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        PluginCommand::Deploy { file, name, remote, json } => {
            // A source directory is built first and named after the directory.
            let (file, name) = if file.is_dir() {
                let src = file.clone();
                let built = tokio::task::spawn_blocking(move || crate::build::build(&src)).await??;
                let dir_name = file.canonicalize()?.file_name().and_then(|n| n.to_str()).map(str::to_owned);
                (built, name.or(dir_name))
            } else {
                (file, name)
            };
            let name = match name {
                Some(n) => n,
                None => file
                    .file_stem()
                    .and_then(|s| s.to_str())
                    .with_context(|| format!("{}: no file name to take the plugin's name from", file.display()))?
                    .to_owned(),
            };
            let bytes = std::fs::read(&file).with_context(|| format!("cannot read {}", file.display()))?;
            let event: ReloadEvent =
                remote.client()?.put_bytes(&format!("/v1/plugins/{name}"), "application/wasm", bytes).await?;
            if json {
                print_json(&event)?;
            } else {
                print_reload(&event);
            }
        }
        PluginCommand::List { remote, json, .. } => {
            let plugins: Vec<PluginInfo> = remote.client()?.get("/v1/plugins").await?;
            if json {
                print_json(&plugins)?;
            } else if plugins.is_empty() {
                println!("no plugins");
            } else {
                for p in &plugins {
                    println!("{} {} ({} route(s)); kept: {}", p.name, p.version, p.routes.len(), p.kept.join(", "));
                    for r in &p.routes {
                        let filter = if r.filter.is_null() { String::new() } else { format!(" {}", r.filter) };
                        println!("  {}{filter}", r.topic);
                    }
                }
            }
        }
        PluginCommand::Rollback { name, to, remote, json, .. } => {
            let event: ReloadEvent =
                remote.client()?.post(&format!("/v1/plugins/{name}/rollback"), &json!({ "to": to })).await?;
            if json {
                print_json(&event)?;
            } else {
                print_reload(&event);
            }
        }
        PluginCommand::Check { .. }
        | PluginCommand::Build { .. }
        | PluginCommand::New { .. }
        | PluginCommand::Test { .. } => {
            unreachable!("runs locally")
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn print_reload(event: &ReloadEvent) {
    match event {
        ReloadEvent::Loaded { name, version, previous: Some(p) } => println!("{name}: {p} → {version}"),
        ReloadEvent::Loaded { name, version, previous: None } => println!("{name}: {version} loaded"),
        ReloadEvent::Unchanged { name, version } => println!("{name}: {version} already current"),
        ReloadEvent::Removed { name, version } => println!("{name}: {version} removed"),
        ReloadEvent::Failed { name, reason, .. } => println!("{name}: not loaded: {reason}"),
    }
}

/// `jobhost records …`
pub async fn records(cmd: RecordsCommand) -> anyhow::Result<ExitCode> {
    let RecordsCommand::Import { file, sheet, batch, skip, resume, remote, json } = cmd;
    if batch == 0 || batch > MAX_PAGE_SIZE as usize {
        bail!("--batch must be 1..={MAX_PAGE_SIZE}, not {batch}");
    }
    let client = remote.client()?;
    let progress = !json && std::io::stderr().is_terminal();

    // Check the whole file first: a malformed file must change nothing.
    let checked = {
        let file = file.clone();
        tokio::task::spawn_blocking(move || check_records(&file)).await.context("the file check stopped")??
    };
    let sheet: Sheet = client.get(&format!("/v1/sheets/{sheet}")).await?;
    let skip = if resume {
        let counts: crate::model::RecordCounts = client.get(&format!("/v1/sheets/{}/counts", sheet.id)).await?;
        if counts.total > checked {
            bail!(
                "--resume: sheet {} holds {} records, more than {} has ({checked}); it is not this file's alone",
                sheet.id,
                counts.total,
                file.display()
            );
        }
        counts.total
    } else {
        skip
    };
    if skip > checked {
        bail!("--skip {skip} is past the end of {} ({checked} records)", file.display());
    }
    let outcome = import(&client, &file, &sheet.id, batch, skip, checked - skip, progress).await;
    let report = |sent: u64, seconds: f64| {
        json!({ "sheetId": sheet.id, "file": file, "imported": sent, "skipped": skip, "seconds": seconds,
                "recordsPerSecond": (sent as f64 / seconds.max(1e-9)).round() })
    };
    match outcome {
        Ok((sent, seconds)) => {
            if json {
                print_json(&report(sent, seconds))?;
            } else {
                println!(
                    "imported {sent} records into sheet {} in {seconds:.2} s ({:.0} records/s)",
                    sheet.id,
                    sent as f64 / seconds.max(1e-9)
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(Stopped { sent, error }) => Err(error.context(format!(
            "{sent} records of this run were acknowledged ({} of the file with the skipped ones); go on with --resume \
             (or --skip {} when no batch was left unanswered)",
            skip + sent,
            skip + sent
        ))),
    }
}

/// Why an import stopped and how far it got.
#[derive(Debug)]
pub struct Stopped {
    /// Records stored before it stopped.
    pub sent: u64,
    /// Why.
    pub error: anyhow::Error,
}

/// Sends the records after the first `skip` in batches, one request at a time so the sheet keeps
/// the file's order; the next batch is read and encoded on another thread meanwhile. Returns
/// the records sent and the seconds it took.
pub async fn import(
    client: &Client,
    file: &Path,
    sheet_id: &str,
    batch: usize,
    skip: u64,
    total: u64,
    progress: bool,
) -> Result<(u64, f64), Stopped> {
    let started = Instant::now();
    let reader = RecordReader::open(file).map_err(|error| Stopped { sent: 0, error })?;
    let (send, mut recv) = tokio::sync::mpsc::channel::<anyhow::Result<(u64, Vec<u8>)>>(2);
    let encoder = tokio::task::spawn_blocking(move || {
        let mut records = reader.skip(skip as usize);
        loop {
            let chunk: anyhow::Result<Vec<_>> = records.by_ref().take(batch).collect();
            let item = chunk.and_then(|c| Ok((c.len() as u64, serde_json::to_vec(&c)?)));
            let done = matches!(&item, Ok((0, _)) | Err(_));
            if done {
                if let Err(e) = item {
                    let _ = send.blocking_send(Err(e));
                }
                return;
            }
            if send.blocking_send(item).is_err() {
                return;
            }
        }
    });
    let bar = if progress {
        let style = indicatif::ProgressStyle::with_template(
            "{spinner} [{bar:40}] {human_pos}/{human_len} records {per_sec} eta {eta}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
        .progress_chars("=> ");
        indicatif::ProgressBar::new(total).with_style(style)
    } else {
        indicatif::ProgressBar::hidden()
    };
    let path = format!("/v1/sheets/{sheet_id}/records");
    let mut sent = 0u64;
    while let Some(item) = recv.recv().await {
        let (n, body) = item.map_err(|error| Stopped { sent, error })?;
        let written: Value = client.post_json_bytes(&path, body).await.map_err(|e| {
            let what = match e {
                crate::client::ClientError::Api { .. } => "the host refused a batch; nothing of it was stored",
                _ => "a batch was sent but not answered; it was stored entirely or not at all: go on with --resume",
            };
            Stopped { sent, error: anyhow::Error::new(e).context(what) }
        })?;
        if written["count"].as_u64() != Some(n) {
            return Err(Stopped {
                sent,
                error: anyhow::anyhow!("the host stored {} of a batch of {n}", written["count"]),
            });
        }
        sent += n;
        bar.inc(n);
    }
    bar.finish_and_clear();
    let _ = encoder.await;
    Ok((sent, started.elapsed().as_secs_f64()))
}
