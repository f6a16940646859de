//! Jobs of the event's environment.

use crate::bindings::jobhost::plugin::jobs as host;
use crate::bindings::jobhost::plugin::types as wit;
use crate::{Error, Result, Value};

/// Where a job is in its lifecycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobStatus {
    /// Waits for `execute`.
    Created,
    /// Waits for its `runAt`.
    Scheduled,
    /// Waits for predecessors or a sequential sibling.
    Waiting,
    /// Waits for an ack.
    Ready,
    /// Being worked on.
    Executing,
    /// Ended successfully.
    Complete,
    /// Ended with a failure.
    Failed,
    /// Canceled.
    Canceled,
}

impl JobStatus {
    /// `complete`, `failed` or `canceled`.
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Complete | Self::Failed | Self::Canceled)
    }
}

impl From<wit::JobStatus> for JobStatus {
    fn from(s: wit::JobStatus) -> Self {
        match s {
            wit::JobStatus::Created => Self::Created,
            wit::JobStatus::Scheduled => Self::Scheduled,
            wit::JobStatus::Waiting => Self::Waiting,
            wit::JobStatus::Ready => Self::Ready,
            wit::JobStatus::Executing => Self::Executing,
            wit::JobStatus::Complete => Self::Complete,
            wit::JobStatus::Failed => Self::Failed,
            wit::JobStatus::Canceled => Self::Canceled,
        }
    }
}

/// A job.
#[derive(Debug, Clone)]
pub struct Job {
    raw: wit::Job,
}

impl Job {
    /// `job_…`
    pub fn id(&self) -> &str {
        &self.raw.id
    }

    /// Lifecycle status.
    pub fn status(&self) -> JobStatus {
        self.raw.status.into()
    }

    /// True for a part of a split job.
    pub fn is_part(&self) -> bool {
        self.raw.is_part
    }

    /// The parent of a part.
    pub fn parent_id(&self) -> Option<&str> {
        self.raw.parent_id.as_deref()
    }

    /// 0-based position of a part among its siblings.
    pub fn part_index(&self) -> Option<u32> {
        self.raw.part_index
    }

    /// The data a split gave this part (`{"part": i, "total": n}` for a split by count).
    pub fn part_data(&self) -> Result<Value> {
        parse_json(self.raw.part_data.as_deref())
    }

    /// The input given at creation.
    pub fn input(&self) -> Result<Value> {
        parse_json(self.raw.input.as_deref())
    }

    /// The outcome given to complete/fail.
    pub fn outcome(&self) -> Result<Value> {
        parse_json(self.raw.outcome.as_deref())
    }

    /// Latest info text.
    pub fn info(&self) -> Option<&str> {
        self.raw.info.as_deref()
    }

    /// 0–100.
    pub fn progress(&self) -> u8 {
        self.raw.progress
    }

    /// 1 on creation, +1 per retry.
    pub fn attempt(&self) -> u32 {
        self.raw.attempt
    }

    /// `"<type>:<operation>"`.
    pub fn job_name(&self) -> String {
        format!("{}:{}", self.raw.kind, self.raw.operation)
    }
}

fn parse_json(text: Option<&str>) -> Result<Value> {
    Ok(match text {
        Some(t) => serde_json::from_str(t)?,
        None => Value::Null,
    })
}

fn job(r: std::result::Result<wit::Job, wit::Error>) -> Result<Job> {
    r.map(|raw| Job { raw }).map_err(Error::from)
}

/// Arguments of [`ack`].
#[derive(Debug, Clone, Default)]
pub struct Ack {
    /// Replaces the job's info.
    pub info: Option<String>,
    /// 0–100.
    pub progress: Option<u8>,
    /// Expected completion, ms since the epoch.
    pub estimated_completion_at: Option<i64>,
}

impl Ack {
    /// An ack with info and progress.
    pub fn progress(info: impl Into<String>, progress: u8) -> Self {
        Self { info: Some(info.into()), progress: Some(progress), estimated_completion_at: None }
    }
}

/// Arguments of [`complete`] and [`fail`].
#[derive(Debug, Clone, Default)]
pub struct Outcome {
    /// Stored as given (`message`, `heading`, …).
    pub outcome: Value,
    /// Replaces the job's info.
    pub info: Option<String>,
}

impl Outcome {
    /// `{"message": …}`.
    pub fn message(message: impl Into<String>) -> Self {
        Self { outcome: serde_json::json!({ "message": message.into() }), info: None }
    }
}

fn outcome_text(o: &Outcome) -> Option<String> {
    (!o.outcome.is_null()).then(|| o.outcome.to_string())
}

/// A job of this environment.
pub fn get(id: &str) -> Result<Job> {
    job(host::get(id))
}

/// `ready`/`executing` → `executing`; repeatable, updating info/progress. Refused with a
/// conflict ([`Error::is_already_terminal`](crate::Error::is_already_terminal)) when the job
/// already ended.
///
/// ```no_run
/// # use jobhost_plugin_sdk::{Event, Result, jobs};
/// # fn handler(event: &Event) -> Result<()> {
/// let job = jobs::ack(event.job_id()?, jobs::Ack::progress("checking", 10))?;
/// let part = job.part_data()?["part"].as_u64().unwrap_or(0);
/// # Ok(()) }
/// ```
pub fn ack(id: &str, a: Ack) -> Result<Job> {
    job(host::ack(id, a.info.as_deref(), a.progress, a.estimated_completion_at))
}

/// `ready`/`executing` → `complete`, with an outcome (any JSON) and an optional info line.
///
/// ```no_run
/// # use jobhost_plugin_sdk::{Result, jobs, json};
/// # fn f(id: &str) -> Result<()> {
/// jobs::complete(id, jobs::Outcome { outcome: json!({"message": "done", "invalid": 3}), info: None })?;
/// # Ok(()) }
/// ```
pub fn complete(id: &str, o: Outcome) -> Result<Job> {
    job(host::complete(id, outcome_text(&o).as_deref(), o.info.as_deref()))
}

/// `ready`/`executing` → `failed`.
pub fn fail(id: &str, o: Outcome) -> Result<Job> {
    job(host::fail(id, outcome_text(&o).as_deref(), o.info.as_deref()))
}

/// Cancels a job and its open parts.
pub fn cancel(id: &str, info: Option<&str>) -> Result<Job> {
    job(host::cancel(id, info))
}

/// How to split a job.
#[derive(Debug, Clone)]
pub enum Split {
    /// N parallel parts; part *i* gets `{"part": i, "total": N}`.
    Count(u32),
    /// One parallel part per object.
    Data(Vec<Value>),
    /// N parts run one after another.
    Sequential(u32),
}

/// Splits an `executing` top-level job into parts; returns how many. When every part has
/// ended, the host emits `job:parts-completed` on the parent once, with `payload.parts`
/// `{total, completed, failed, canceled}`. Splitting again is refused ("already split").
///
/// ```no_run
/// # use jobhost_plugin_sdk::{Event, Result, jobs, records};
/// # fn handler(event: &Event) -> Result<()> {
/// let total = records::counts(event.sheet_id()?)?.total;
/// jobs::split(event.job_id()?, jobs::Split::Count(total.div_ceil(1000) as u32))?;
/// # Ok(()) }
/// ```
pub fn split(id: &str, how: Split) -> Result<u32> {
    let (parts, parallel) = match how {
        Split::Count(n) => (host::SplitParts::Count(n), true),
        Split::Sequential(n) => (host::SplitParts::Count(n), false),
        Split::Data(list) => (host::SplitParts::Data(list.iter().map(Value::to_string).collect()), true),
    };
    host::split(id, &parts, parallel).map_err(Error::from)
}

/// Creates a job in this environment.
pub fn create(kind: &str, operation: &str, source: Option<&str>, input: Option<&Value>, manual: bool) -> Result<Job> {
    let new = host::NewJob {
        kind: kind.to_owned(),
        operation: operation.to_owned(),
        source: source.map(str::to_owned),
        input: input.map(Value::to_string),
        manual,
    };
    job(host::create(&new))
}

/// The parts of a job, by index.
pub fn list_parts(id: &str) -> Result<Vec<Job>> {
    host::list_parts(id).map(|v| v.into_iter().map(|raw| Job { raw }).collect()).map_err(Error::from)
}
