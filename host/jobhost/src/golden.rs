//! What one job run on a sheet produced, and golden tests built on it.
//!
//! - [`Snapshot`] is the observable result of a job: its status and outcome, its parts'
//!   counts, and the messages of every record (by position in the sheet, 1-based, as in the
//!   records file). `jobhost dev` prints the [`diff`] between two runs; `jobhost plugin test`
//!   the diff between a fixture's expectation and a run.
//! - [`Fixture`] is a golden test of a listener: a directory `tests/<name>/` beside the
//!   plugin's source with `fixture.toml` (the job, the records file, the job's input) and
//!   `expected.json` (a [`Snapshot`]). [`run_job`] runs it in a store of its own.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, bail};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::model::{JobStatus, JobType, Message, NewJob, NewRecord};
use crate::{Engine, Env};

/// The observable result of a job run on a sheet.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Snapshot {
    /// The job's final status.
    pub status: JobStatus,
    /// The job's outcome.
    pub outcome: Value,
    /// Its parts by status (all zero when it was not split).
    pub parts: PartCounts,
    /// Every record that carries messages, by its 1-based position in the sheet.
    pub records: Vec<RecordMessages>,
}

/// A job's parts by status.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PartCounts {
    /// All parts.
    pub total: u64,
    /// Parts that completed.
    pub completed: u64,
    /// Parts that failed.
    pub failed: u64,
    /// Parts that were canceled.
    pub canceled: u64,
}

/// The messages of one record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecordMessages {
    /// 1-based position in the sheet (the n-th record of the records file).
    pub record: u64,
    /// Its messages, the record's own and its cells', sorted by field and text.
    pub messages: Vec<Message>,
}

impl Snapshot {
    /// Reads the result of job `job_id` on sheet `sheet_id`.
    pub async fn capture(env: &Env, job_id: &str, sheet_id: &str) -> crate::Result<Self> {
        let job = env.job(job_id).await?;
        let mut parts = PartCounts::default();
        for part in env.parts(job_id).await? {
            parts.total += 1;
            match part.status {
                JobStatus::Complete => parts.completed += 1,
                JobStatus::Failed => parts.failed += 1,
                JobStatus::Canceled => parts.canceled += 1,
                _ => {}
            }
        }
        let mut records = Vec::new();
        let (page_size, mut position) = (crate::model::MAX_PAGE_SIZE, 0u64);
        for page_number in 1.. {
            let page = env.records(sheet_id, page_size, page_number).await?;
            for record in &page.records {
                position += 1;
                let mut messages: Vec<Message> = record.messages.clone();
                messages.extend(record.values.values().flat_map(|c| c.messages.iter().cloned()));
                if messages.is_empty() {
                    continue;
                }
                messages.sort_by(|a, b| (&a.field, &a.message).cmp(&(&b.field, &b.message)));
                messages.dedup();
                records.push(RecordMessages { record: position, messages });
            }
            if page.records.len() < page_size as usize {
                break;
            }
        }
        Ok(Self { status: job.status, outcome: job.outcome, parts, records })
    }

    /// Records that carry an error message.
    pub fn invalid(&self) -> usize {
        self.records.iter().filter(|r| r.messages.iter().any(|m| m.kind == crate::model::MessageType::Error)).count()
    }

    /// One line: status, parts and invalid records.
    pub fn summary(&self) -> String {
        let p = &self.parts;
        format!(
            "{}; parts: {} total, {} completed, {} failed, {} canceled; {} record(s) with messages, {} invalid",
            self.status,
            p.total,
            p.completed,
            p.failed,
            p.canceled,
            self.records.len(),
            self.invalid()
        )
    }
}

/// How a [`diff`] names its two sides.
#[derive(Debug, Clone, Copy)]
pub struct Sides {
    /// The reference side (`expected`, `before`).
    pub old: &'static str,
    /// The new side (`got`, `now`).
    pub new: &'static str,
}

/// A golden test's sides.
pub const EXPECTED_GOT: Sides = Sides { old: "expected", new: "got" };
/// Two runs' sides.
pub const BEFORE_NOW: Sides = Sides { old: "before", new: "now" };

/// The differences between two snapshots, one line each: status, outcome, parts, then every
/// record whose messages differ, in sheet order.
pub fn diff(old: &Snapshot, new: &Snapshot, sides: Sides) -> Vec<String> {
    let Sides { old: o, new: n } = sides;
    let mut lines = Vec::new();
    if old.status != new.status {
        lines.push(format!("job status: {o} {}, {n} {}", old.status, new.status));
    }
    if old.outcome != new.outcome {
        lines.push(format!("outcome: {o} {}, {n} {}", old.outcome, new.outcome));
    }
    if old.parts != new.parts {
        let show = |p: &PartCounts| format!("{}/{}/{}/{}", p.total, p.completed, p.failed, p.canceled);
        lines.push(format!(
            "parts (total/completed/failed/canceled): {o} {}, {n} {}",
            show(&old.parts),
            show(&new.parts)
        ));
    }
    let (a, b) = (by_record(old), by_record(new));
    let mut positions: Vec<u64> = a.keys().chain(b.keys()).copied().collect();
    positions.sort_unstable();
    positions.dedup();
    let none = Vec::new();
    for p in positions {
        let (x, y) = (a.get(&p).copied().unwrap_or(&none), b.get(&p).copied().unwrap_or(&none));
        if x != y {
            lines.push(format!("record {p}: {o} {}, {n} {}", show_messages(x), show_messages(y)));
        }
    }
    lines
}

fn by_record(s: &Snapshot) -> BTreeMap<u64, &Vec<Message>> {
    s.records.iter().map(|r| (r.record, &r.messages)).collect()
}

fn show_messages(messages: &[Message]) -> String {
    if messages.is_empty() {
        return "no messages".into();
    }
    let each: Vec<String> = messages
        .iter()
        .map(|m| {
            let kind =
                serde_json::to_value(m.kind).ok().and_then(|v| v.as_str().map(str::to_owned)).unwrap_or_default();
            format!("{}{kind} {:?}", m.field.as_deref().map(|f| format!("{f}: ")).unwrap_or_default(), m.message)
        })
        .collect();
    each.join("; ")
}

/// A golden test of a listener, read from `tests/<name>/fixture.toml`.
#[derive(Debug, Clone)]
pub struct Fixture {
    /// The directory's name.
    pub name: String,
    /// The fixture's directory.
    pub dir: PathBuf,
    /// The job to run: its type and operation.
    pub job: (JobType, String),
    /// The records file (`.csv` or `.jsonl`), resolved against the fixture's directory.
    pub records: PathBuf,
    /// The job's input.
    pub input: Value,
}

/// `fixture.toml` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FixtureFile {
    job: String,
    records: PathBuf,
    #[serde(default)]
    input: Option<toml::Value>,
}

/// The file of a fixture's expectation.
pub const EXPECTED: &str = "expected.json";

impl Fixture {
    /// Reads the fixture in `dir`.
    pub fn read(dir: &Path) -> anyhow::Result<Self> {
        let file = dir.join("fixture.toml");
        let text = std::fs::read_to_string(&file).with_context(|| format!("cannot read {}", file.display()))?;
        let parsed: FixtureFile = toml::from_str(&text).with_context(|| format!("{} is not valid", file.display()))?;
        let job = parse_job(&parsed.job).with_context(|| format!("{}: `job`", file.display()))?;
        let input = match parsed.input {
            Some(v) => serde_json::to_value(v).with_context(|| format!("{}: `input`", file.display()))?,
            None => Value::Null,
        };
        let name = dir.file_name().and_then(|n| n.to_str()).unwrap_or("fixture").to_owned();
        Ok(Self { name, dir: dir.to_path_buf(), job, records: dir.join(parsed.records), input })
    }

    /// Every fixture under `plugin_dir/tests/`, sorted by name.
    pub fn all(plugin_dir: &Path) -> anyhow::Result<Vec<Self>> {
        let tests = plugin_dir.join("tests");
        let entries = match std::fs::read_dir(&tests) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                bail!("{} has no tests/ directory: a fixture is tests/<name>/fixture.toml", plugin_dir.display())
            }
            Err(e) => return Err(e).with_context(|| format!("cannot read {}", tests.display())),
        };
        let mut dirs: Vec<PathBuf> =
            entries.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| p.join("fixture.toml").is_file()).collect();
        dirs.sort();
        if dirs.is_empty() {
            bail!("{} holds no fixture (tests/<name>/fixture.toml)", tests.display());
        }
        dirs.iter().map(|d| Self::read(d)).collect()
    }

    /// The expectation, or `None` when the fixture has none yet.
    pub fn expected(&self) -> anyhow::Result<Option<Snapshot>> {
        let path = self.dir.join(EXPECTED);
        match std::fs::read(&path) {
            Ok(bytes) => {
                Ok(Some(serde_json::from_slice(&bytes).with_context(|| format!("{} is not valid", path.display()))?))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
        }
    }

    /// Writes `snapshot` as the expectation (atomically).
    pub fn write_expected(&self, snapshot: &Snapshot) -> anyhow::Result<()> {
        write_snapshot(&self.dir.join(EXPECTED), snapshot)
    }
}

/// Writes a snapshot as pretty JSON, atomically (write, then rename).
fn write_snapshot(path: &Path, snapshot: &Snapshot) -> anyhow::Result<()> {
    let mut text = serde_json::to_string_pretty(snapshot)?;
    text.push('\n');
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, text)
        .and_then(|()| std::fs::rename(&tmp, path))
        .with_context(|| format!("cannot write {}", path.display()))
}

/// Parses `<type>:<operation>` of a job that works on a sheet.
pub fn parse_job(job: &str) -> anyhow::Result<(JobType, String)> {
    let (kind, operation) = job
        .split_once(':')
        .with_context(|| format!("`{job}` must be <type>:<operation>, e.g. sheet:submitLargeSheet"))?;
    let kind: JobType = kind.parse().with_context(|| format!("`{job}`"))?;
    if kind != JobType::Sheet {
        bail!("`{job}`: the records are loaded into a sheet, so the job must be a sheet job (sheet:<operation>)");
    }
    if operation.is_empty() || operation.contains(':') {
        bail!("`{job}`: the operation must be non-empty and without `:`");
    }
    Ok((kind, operation.to_owned()))
}

/// Loads `records` into a new sheet, creates the job on it, waits until it ends (at most
/// `timeout`), and returns what it produced. The listeners must already run on `env`.
pub async fn run_job(
    env: &Env,
    sheet_name: &str,
    records: Vec<NewRecord>,
    job: &(JobType, String),
    input: Value,
    timeout: Duration,
) -> anyhow::Result<Snapshot> {
    let sheet = env.create_sheet(sheet_name).await?;
    env.insert_records(&sheet.id, records).await?;
    let created =
        env.create_job(NewJob { input, source: Some(sheet.id.clone()), ..NewJob::new(job.0, job.1.clone()) }).await?;
    wait_terminal(env, &created.id, timeout).await?;
    Ok(Snapshot::capture(env, &created.id, &sheet.id).await?)
}

/// Runs `job` on `records` through `plugin` in a new store in `dir` (which it owns for the
/// run), as `plugin test` runs a fixture: one environment, the plugin its only listener,
/// failed deliveries retried quickly (100 ms, doubling), so a failing handler is dead-lettered
/// in seconds.
pub async fn run_in_store(
    dir: &Path,
    runtime: &std::sync::Arc<crate::runtime::Runtime>,
    plugin: std::sync::Arc<crate::runtime::Plugin>,
    records: Vec<NewRecord>,
    job: &(JobType, String),
    input: Value,
    timeout: Duration,
) -> anyhow::Result<Snapshot> {
    let concurrency = runtime.config().limits.max_instances.max(1);
    let config = crate::EngineConfig {
        retry_backoff: Duration::from_millis(100),
        ..crate::EngineConfig::single_environment(concurrency)
    };
    let engine =
        crate::open_engine(dir, config).with_context(|| format!("cannot open a store in {}", dir.display()))?;
    let env = engine.env(engine.create_environment("test").await?.id);
    let running = engine.run(vec![runtime.listener(plugin, env.id())]).await?;
    let result = run_job(&env, "records", records, job, input, timeout).await;
    running.shutdown().await;
    result
}

/// Waits until job `id` ends; after `timeout`, an error that says what is still open.
pub async fn wait_terminal(env: &Env, id: &str, timeout: Duration) -> anyhow::Result<()> {
    let engine: &Engine = env.engine();
    let (env2, id2) = (env.clone(), id.to_owned());
    let ended = engine.wait_for(move || {
        let (env, id) = (env2.clone(), id2.clone());
        async move { Ok(Some(env.job(&id).await?).filter(|j| j.status.is_terminal())) }
    });
    match tokio::time::timeout(timeout, ended).await {
        Ok(result) => result.map(drop).map_err(Into::into),
        Err(_) => {
            let job = env.job(id).await?;
            let open: Vec<String> =
                env.parts(id).await?.into_iter().filter(|p| !p.status.is_terminal()).map(|p| p.id).collect();
            // The newest failure among the deliveries about the job and its open parts.
            let mut last_error = None;
            for about in std::iter::once(id.to_owned()).chain(open.iter().cloned()) {
                let failed = env.executions(Some(&about), u32::MAX).await?.into_iter().filter(|e| e.error.is_some());
                if let Some(e) = failed.max_by_key(|e| e.id)
                    && last_error.as_ref().is_none_or(|(at, _)| *at < e.id)
                {
                    last_error = Some((e.id, e.error.unwrap_or_default()));
                }
            }
            let (open, last_error) = (open.len(), last_error.map(|(_, e)| e));
            bail!(
                "job {id} is still {} after {} s ({open} open part(s)){}",
                job.status,
                timeout.as_secs(),
                last_error.map(|e| format!("; its last delivery failed: {e}")).unwrap_or_default()
            )
        }
    }
}
