//! The job lifecycle as functions over one write transaction.
//!
//! Each public function checks the job's status first and returns [`Error::WrongStatus`]
//! before touching anything; the caller's savepoint makes any later error roll back too. The
//! side effects of a job becoming terminal live in one place, `after_terminal`: part
//! bookkeeping (sequential promotion, `job:parts-completed`), dependents waiting on it, and
//! nothing else — so every path to a terminal status (listener, cancel cascade, watchdog)
//! behaves the same.

use serde_json::{Map, Value, json};

use crate::error::{Error, Result};
use crate::model::{
    Ack, Job, JobMode, JobStatus, JobType, MAX_PARTS, NewJob, Outcome, PartCounts, PartExecution, Split, SplitParts,
    Trigger, new_id,
};
use crate::routing::{Router, Routes};
use crate::store::Tx;

use std::sync::Arc;

/// Who is acting, where, and when — fixed for one call.
#[derive(Debug, Clone)]
pub struct Ctx {
    /// Routes new events to subscriptions.
    pub router: Arc<Router>,
    /// The routes this transaction read (at its first event), reused by its later events.
    pub routes: std::cell::OnceCell<Arc<Routes>>,
    /// The environment every id is looked up in.
    pub env: String,
    /// Written as `actorId` into events.
    pub actor: String,
    /// The call's timestamp.
    pub now: i64,
    /// The event whose handler made the call, when a listener made it.
    pub cause: Option<Cause>,
    /// Events written by the call so far (the loop guard charges them to the chain).
    pub emitted: std::cell::Cell<u64>,
}

/// Where a listener's call comes from: the chain of events it belongs to and how deep in it.
///
/// An event written by a call that a listener made while handling event `E` belongs to `E`'s
/// chain, one level deeper. The loop guard bounds both the depth and the events of a chain, so
/// a listener whose own actions re-trigger it is stopped with a `limit` error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cause {
    /// The id of the chain's first event.
    pub chain: String,
    /// The depth of events this call writes (the handled event's depth + 1).
    pub depth: u32,
    /// The event being handled.
    pub event: String,
}

impl Cause {
    /// The cause of calls made while handling `event`.
    pub fn of(event: &crate::model::Event) -> Self {
        let chain = event.context_str("chainId").unwrap_or(&event.id).to_owned();
        let depth = event.context.get("depth").and_then(Value::as_u64).unwrap_or(0) as u32;
        Self { chain, depth: depth.saturating_add(1), event: event.id.clone() }
    }

    fn stamp(&self, c: &mut Map<String, Value>) {
        c.insert("chainId".into(), json!(self.chain));
        c.insert("depth".into(), json!(self.depth));
        c.insert("causedBy".into(), json!(self.event));
    }
}

/// What `split` returns.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SplitResult {
    /// The parent after the split.
    pub parent: Job,
    /// How many parts were created.
    pub parts: u32,
}

const OPEN: &[JobStatus] =
    &[JobStatus::Created, JobStatus::Scheduled, JobStatus::Waiting, JobStatus::Ready, JobStatus::Executing];

/// A job of the context's environment, locked for this transaction (its parent first), or
/// not-found.
pub fn load(tx: &mut dyn Tx, ctx: &Ctx, id: &str) -> Result<Job> {
    tx.job_for_update(&ctx.env, id)?.ok_or_else(|| Error::not_found("job", id))
}

/// A job of the context's environment, locked without its parent (for a transition that
/// cannot end a part), or not-found.
pub fn load_alone(tx: &mut dyn Tx, ctx: &Ctx, id: &str) -> Result<Job> {
    tx.job_for_update_alone(&ctx.env, id)?.ok_or_else(|| Error::not_found("job", id))
}

impl Ctx {
    /// Stores `event` and a pending delivery of it for every subscription it matches.
    pub fn write_event(&self, tx: &mut dyn Tx, event: crate::model::Event) -> Result<()> {
        let seq = tx.insert_event(&event)?;
        let routes = match self.routes.get() {
            Some(r) => r.clone(),
            None => {
                let r = self.router.routes(tx)?;
                let _ = self.routes.set(r.clone());
                r
            }
        };
        let subscriptions = routes.matching(&event);
        if !subscriptions.is_empty() {
            let due_at = event.created_at;
            tx.insert_deliveries(seq, event, &subscriptions, due_at)?;
        }
        self.emitted.set(self.emitted.get() + 1);
        Ok(())
    }
}

/// A sheet of the context's environment, or not-found.
pub fn require_sheet(tx: &mut dyn Tx, ctx: &Ctx, id: &str) -> Result<()> {
    tx.sheet(&ctx.env, id)?.map(|_| ()).ok_or_else(|| Error::not_found("sheet", id))
}

fn refuse(job: &Job, call: &'static str, needs: &'static str) -> Error {
    Error::WrongStatus { id: job.id.clone(), status: job.status, call, needs }
}

fn context(ctx: &Ctx, job: &Job) -> Value {
    let mut c = Map::new();
    c.insert("environmentId".into(), json!(job.environment_id));
    c.insert("jobId".into(), json!(job.id));
    if job.kind == JobType::Sheet
        && let Some(sheet) = &job.source
    {
        c.insert("sheetId".into(), json!(sheet));
    }
    c.insert("actorId".into(), json!(ctx.actor));
    if let Some(cause) = &ctx.cause {
        cause.stamp(&mut c);
    }
    Value::Object(c)
}

fn payload(job: &Job) -> Map<String, Value> {
    let mut p = Map::new();
    p.insert("domain".into(), json!(job.kind));
    p.insert("operation".into(), json!(job.operation));
    p.insert("job".into(), json!(job.job_name()));
    p.insert("status".into(), json!(job.status));
    if let Some(info) = &job.info {
        p.insert("info".into(), json!(info));
    }
    p.insert("isPart".into(), json!(job.is_part));
    if !job.input.is_null() {
        p.insert("input".into(), job.input.clone());
    }
    if let Some(parent) = &job.parent_id {
        p.insert("parentId".into(), json!(parent));
    }
    if !job.part_data.is_null() {
        p.insert("partData".into(), job.part_data.clone());
    }
    p
}

fn emit(tx: &mut dyn Tx, ctx: &Ctx, job: &Job, topic: &str, extra: Option<(&str, Value)>) -> Result<()> {
    let mut p = payload(job);
    if let Some((k, v)) = extra {
        p.insert(k.into(), v);
    }
    let event = crate::model::Event {
        id: new_id("evt"),
        seq: 0,
        topic: topic.to_owned(),
        context: context(ctx, job),
        payload: Value::Object(p),
        created_at: ctx.now,
    };
    ctx.write_event(tx, event)
}

/// Stores a `records:*` event for a write to a sheet.
pub fn emit_records_event(tx: &mut dyn Tx, ctx: &Ctx, sheet_id: &str, topic: &str, count: u64) -> Result<()> {
    let event = crate::model::Event {
        id: new_id("evt"),
        seq: 0,
        topic: topic.to_owned(),
        context: {
            let mut c = Map::new();
            c.insert("environmentId".into(), json!(ctx.env));
            c.insert("sheetId".into(), json!(sheet_id));
            c.insert("actorId".into(), json!(ctx.actor));
            if let Some(cause) = &ctx.cause {
                cause.stamp(&mut c);
            }
            Value::Object(c)
        },
        payload: json!({ "sheetId": sheet_id, "recordCount": count }),
        created_at: ctx.now,
    };
    ctx.write_event(tx, event)
}

fn save(tx: &mut dyn Tx, ctx: &Ctx, job: &mut Job) -> Result<()> {
    job.updated_at = ctx.now;
    tx.update_job(job)
}

/// Checks a new job and returns whether all its predecessors are complete.
fn validate_new(tx: &mut dyn Tx, ctx: &Ctx, new: &NewJob) -> Result<bool> {
    if new.operation.is_empty() || new.operation.contains(':') || new.operation.chars().any(char::is_whitespace) {
        return Err(Error::invalid(format!("operation `{}` must be non-empty, without `:` or spaces", new.operation)));
    }
    if new.kind == JobType::Sheet
        && let Some(sheet) = &new.source
    {
        require_sheet(tx, ctx, sheet)?;
    }
    if let Some(ms) = new.stale_timeout_ms
        && ms <= 0
    {
        return Err(Error::invalid(format!("staleTimeoutMs must be positive, not {ms}")));
    }
    let mut all_complete = true;
    for p in &new.predecessor_ids {
        let pred = load(tx, ctx, p)?;
        if pred.status == JobStatus::Canceled {
            return Err(Error::invalid(format!("predecessor job {p} is canceled; this job could never run")));
        }
        all_complete &= pred.status == JobStatus::Complete;
    }
    Ok(all_complete)
}

/// A new `created` job in the context's environment with every optional field empty.
fn blank_job(ctx: &Ctx, kind: JobType, operation: String) -> Job {
    Job {
        id: new_id("job"),
        environment_id: ctx.env.clone(),
        kind,
        operation,
        source: None,
        status: JobStatus::Created,
        trigger: Trigger::Immediate,
        mode: JobMode::Background,
        input: Value::Null,
        info: None,
        progress: 0,
        estimated_completion_at: None,
        outcome: Value::Null,
        parent_id: None,
        is_part: false,
        part_index: None,
        part_data: Value::Null,
        part_execution: None,
        predecessor_ids: Vec::new(),
        run_at: None,
        stale_timeout_ms: None,
        attempt: 1,
        created_at: ctx.now,
        updated_at: ctx.now,
        started_at: None,
        finished_at: None,
        outcome_acknowledged_at: None,
        ready_at: None,
        last_activity_at: None,
        split_at: None,
        parts_completed_at: None,
    }
}

/// Creates a job; emits `job:created` and, by its starting status, `job:ready` or `job:scheduled`.
pub fn create(tx: &mut dyn Tx, ctx: &Ctx, new: NewJob) -> Result<Job> {
    let predecessors_complete = validate_new(tx, ctx, &new)?;
    let mut predecessor_ids = new.predecessor_ids;
    predecessor_ids.sort();
    predecessor_ids.dedup();
    let trigger = new.trigger.unwrap_or(Trigger::Immediate);
    let mut job = Job {
        source: new.source,
        trigger,
        mode: new.mode.unwrap_or(JobMode::Background),
        input: new.input,
        predecessor_ids,
        run_at: new.run_at,
        stale_timeout_ms: new.stale_timeout_ms,
        ..blank_job(ctx, new.kind, new.operation)
    };
    if trigger == Trigger::Immediate {
        job.status = if !predecessors_complete {
            JobStatus::Waiting
        } else if job.run_at.is_some_and(|at| at > ctx.now) {
            JobStatus::Scheduled
        } else {
            job.ready_at = Some(ctx.now);
            JobStatus::Ready
        };
    }
    tx.insert_job(&job)?;
    emit(tx, ctx, &job, "job:created", None)?;
    announce(tx, ctx, &job)?;
    Ok(job)
}

/// Where a job that may start goes: `waiting` on predecessors, `scheduled` until `runAt`, or `ready`.
fn runnable_status(tx: &mut dyn Tx, ctx: &Ctx, job: &Job) -> Result<JobStatus> {
    if !job.predecessor_ids.is_empty() && tx.predecessor_statuses(job)?.iter().any(|(_, s)| *s != JobStatus::Complete) {
        return Ok(JobStatus::Waiting);
    }
    if job.run_at.is_some_and(|at| at > ctx.now) {
        return Ok(JobStatus::Scheduled);
    }
    Ok(JobStatus::Ready)
}

/// The event that says a job now waits for listeners or for time.
fn announce(tx: &mut dyn Tx, ctx: &Ctx, job: &Job) -> Result<()> {
    match job.status {
        JobStatus::Ready => emit(tx, ctx, job, "job:ready", None),
        JobStatus::Scheduled => emit(tx, ctx, job, "job:scheduled", None),
        _ => Ok(()),
    }
}

fn start(tx: &mut dyn Tx, ctx: &Ctx, job: &mut Job) -> Result<()> {
    job.status = runnable_status(tx, ctx, job)?;
    if job.status == JobStatus::Ready {
        job.ready_at = Some(ctx.now);
    }
    save(tx, ctx, job)?;
    announce(tx, ctx, job)
}

/// `created` → ready/waiting/scheduled.
pub fn execute(tx: &mut dyn Tx, ctx: &Ctx, mut job: Job) -> Result<Job> {
    if job.status != JobStatus::Created {
        return Err(refuse(&job, "execute", "created"));
    }
    start(tx, ctx, &mut job)?;
    Ok(job)
}

/// `ready`/`executing` → `executing`.
pub fn ack(tx: &mut dyn Tx, ctx: &Ctx, mut job: Job, a: Ack) -> Result<Job> {
    if !matches!(job.status, JobStatus::Ready | JobStatus::Executing) {
        return Err(refuse(&job, "ack", "ready or executing"));
    }
    if let Some(p) = a.progress
        && p > 100
    {
        return Err(Error::invalid(format!("progress must be 0..=100, not {p}")));
    }
    job.status = JobStatus::Executing;
    job.started_at.get_or_insert(ctx.now);
    job.last_activity_at = Some(ctx.now);
    if a.info.is_some() {
        job.info = a.info;
    }
    if let Some(p) = a.progress {
        job.progress = p;
    }
    if a.estimated_completion_at.is_some() {
        job.estimated_completion_at = a.estimated_completion_at;
    }
    save(tx, ctx, &mut job)?;
    emit(tx, ctx, &job, "job:updated", None)?;
    Ok(job)
}

/// `ready`/`executing` → `complete`.
pub fn complete(tx: &mut dyn Tx, ctx: &Ctx, job: Job, o: Outcome) -> Result<Job> {
    if !matches!(job.status, JobStatus::Ready | JobStatus::Executing) {
        return Err(refuse(&job, "complete", "ready or executing"));
    }
    end(tx, ctx, job, JobStatus::Complete, o)
}

/// `ready`/`executing` → `failed`.
pub fn fail(tx: &mut dyn Tx, ctx: &Ctx, job: Job, o: Outcome) -> Result<Job> {
    if !matches!(job.status, JobStatus::Ready | JobStatus::Executing) {
        return Err(refuse(&job, "fail", "ready or executing"));
    }
    end(tx, ctx, job, JobStatus::Failed, o)
}

fn end(tx: &mut dyn Tx, ctx: &Ctx, mut job: Job, status: JobStatus, o: Outcome) -> Result<Job> {
    job.status = status;
    job.outcome = o.outcome;
    if o.info.is_some() {
        job.info = o.info;
    }
    if status == JobStatus::Complete {
        job.progress = 100;
    }
    job.finished_at = Some(ctx.now);
    save(tx, ctx, &mut job)?;
    let topic = if status == JobStatus::Complete { "job:completed" } else { "job:failed" };
    emit(tx, ctx, &job, topic, None)?;
    after_terminal(tx, ctx, &job)?;
    Ok(job)
}

/// Any open status → `canceled`; the job's open parts are canceled with it.
pub fn cancel(tx: &mut dyn Tx, ctx: &Ctx, mut job: Job, info: Option<String>) -> Result<Job> {
    if job.status.is_terminal() {
        return Err(refuse(&job, "cancel", "a status that is not terminal"));
    }
    set_canceled(tx, ctx, &mut job, info)?;
    // The parent is terminal first, so the parts' own bookkeeping neither promotes a
    // sequential sibling nor emits parts-completed for a parent nobody can finish.
    // A part has no parts (a part cannot be split): no query per part of a large cascade.
    let parts = if job.is_part { Vec::new() } else { tx.parts_in(&job.id, OPEN)? };
    let info = format!("canceled with parent job {}", job.id);
    for mut part in parts {
        // `cancel` of the part, without looking its parent up again: it is this job, now
        // terminal, so the part's parent bookkeeping has nothing to do (a statement per part
        // saved, a round trip per part on PostgreSQL).
        set_canceled(tx, ctx, &mut part, Some(info.clone()))?;
        after_dependents(tx, ctx, &part)?;
    }
    after_terminal(tx, ctx, &job)?;
    Ok(job)
}

/// An open job → `canceled`, saved with its `job:updated` event.
fn set_canceled(tx: &mut dyn Tx, ctx: &Ctx, job: &mut Job, info: Option<String>) -> Result<()> {
    job.status = JobStatus::Canceled;
    if info.is_some() {
        job.info = info;
    }
    job.finished_at = Some(ctx.now);
    save(tx, ctx, job)?;
    emit(tx, ctx, job, "job:updated", None)
}

/// `failed` → `ready` (or `waiting` behind a running sequential sibling), attempt + 1.
pub fn retry(tx: &mut dyn Tx, ctx: &Ctx, mut job: Job) -> Result<Job> {
    if job.status != JobStatus::Failed {
        return Err(refuse(&job, "retry", "failed"));
    }
    if job.split_at.is_some() {
        return Err(Error::Conflict(format!(
            "job {} was split into parts and cannot be retried; create a new job",
            job.id
        )));
    }
    let mut sequential_sibling_running = false;
    if let Some(parent_id) = &job.parent_id {
        let parent = load(tx, ctx, parent_id)?;
        if parent.status.is_terminal() || parent.parts_completed_at.is_some() {
            return Err(Error::Conflict(format!(
                "part {} cannot be retried: its parent job {} already {}",
                job.id,
                parent.id,
                if parent.status.is_terminal() { "ended" } else { "received job:parts-completed" }
            )));
        }
        sequential_sibling_running =
            parent.part_execution == Some(PartExecution::Sequential) && tx.part_counts(parent_id)?.active > 0;
    }
    job.attempt += 1;
    job.outcome = Value::Null;
    job.finished_at = None;
    job.progress = 0;
    if sequential_sibling_running {
        job.status = JobStatus::Waiting;
        save(tx, ctx, &mut job)?;
        emit(tx, ctx, &job, "job:updated", None)?;
    } else {
        job.status = JobStatus::Ready;
        job.ready_at = Some(ctx.now);
        save(tx, ctx, &mut job)?;
        emit(tx, ctx, &job, "job:ready", None)?;
    }
    Ok(job)
}

/// Records that a terminal job's outcome was seen (once).
pub fn acknowledge_outcome(tx: &mut dyn Tx, ctx: &Ctx, mut job: Job) -> Result<Job> {
    if !job.status.is_terminal() {
        return Err(refuse(&job, "outcome acknowledgement", "a terminal status"));
    }
    if job.outcome_acknowledged_at.is_some() {
        return Err(Error::Conflict(format!("the outcome of job {} was already acknowledged", job.id)));
    }
    job.outcome_acknowledged_at = Some(ctx.now);
    save(tx, ctx, &mut job)?;
    emit(tx, ctx, &job, "job:outcome-acknowledged", None)?;
    Ok(job)
}

/// Splits an `executing` top-level job that was not split before into parts.
pub fn split(tx: &mut dyn Tx, ctx: &Ctx, mut parent: Job, s: Split) -> Result<SplitResult> {
    if parent.status != JobStatus::Executing {
        return Err(refuse(&parent, "split", "executing (ack the job first)"));
    }
    if parent.is_part {
        return Err(Error::Conflict(format!("job {} is a part; parts cannot be split", parent.id)));
    }
    if parent.split_at.is_some() {
        return Err(Error::Conflict(format!("job {} was already split", parent.id)));
    }
    let data: Vec<Value> = match s.parts {
        SplitParts::Count(0) => return Err(Error::invalid("a split needs at least one part")),
        SplitParts::Count(n) if n > MAX_PARTS => {
            return Err(Error::Limit(format!("{n} parts requested; at most {MAX_PARTS} per split")));
        }
        SplitParts::Count(n) => (0..n).map(|i| json!({ "part": i, "total": n })).collect(),
        SplitParts::Data(list) if list.is_empty() => return Err(Error::invalid("a split needs at least one part")),
        SplitParts::Data(list) if list.len() > MAX_PARTS as usize => {
            return Err(Error::Limit(format!("{} parts requested; at most {MAX_PARTS} per split", list.len())));
        }
        SplitParts::Data(list) => {
            if let Some(i) = list.iter().position(|d| !d.is_object()) {
                return Err(Error::invalid(format!("partData {i} must be an object")));
            }
            list
        }
    };
    let execution = if s.run_in_parallel.unwrap_or(true) { PartExecution::Parallel } else { PartExecution::Sequential };
    let count = data.len() as u32;
    parent.split_at = Some(ctx.now);
    parent.part_execution = Some(execution);
    parent.last_activity_at = Some(ctx.now);
    save(tx, ctx, &mut parent)?;
    for (i, part_data) in data.into_iter().enumerate() {
        let ready = execution == PartExecution::Parallel || i == 0;
        let part = Job {
            status: if ready { JobStatus::Ready } else { JobStatus::Waiting },
            source: parent.source.clone(),
            trigger: parent.trigger,
            mode: parent.mode,
            parent_id: Some(parent.id.clone()),
            is_part: true,
            part_index: Some(i as u32),
            part_data,
            stale_timeout_ms: parent.stale_timeout_ms,
            ready_at: ready.then_some(ctx.now),
            ..blank_job(ctx, parent.kind, parent.operation.clone())
        };
        tx.insert_job(&part)?;
        emit(tx, ctx, &part, "job:created", None)?;
        if ready {
            emit(tx, ctx, &part, "job:ready", None)?;
        }
    }
    Ok(SplitResult { parent, parts: count })
}

/// What follows from `job` having become terminal, in the same transaction.
fn after_terminal(tx: &mut dyn Tx, ctx: &Ctx, job: &Job) -> Result<()> {
    if let Some(parent_id) = &job.parent_id {
        let mut parent = load(tx, ctx, parent_id)?;
        if !parent.status.is_terminal() {
            let counts = tx.part_counts(parent_id)?;
            if parent.part_execution == Some(PartExecution::Sequential)
                && counts.active == 0
                && let Some(mut next) = tx.parts_in(parent_id, &[JobStatus::Waiting])?.into_iter().next()
            {
                next.status = JobStatus::Ready;
                next.ready_at = Some(ctx.now);
                save(tx, ctx, &mut next)?;
                emit(tx, ctx, &next, "job:ready", None)?;
            } else if counts.open() == 0 && parent.parts_completed_at.is_none() {
                // Derived from the parts' own statuses, in the transaction that ended the last
                // one; the marker on the parent makes a second emission impossible.
                let parts = PartCounts {
                    total: counts.total,
                    completed: counts.completed,
                    failed: counts.failed,
                    canceled: counts.canceled,
                };
                parent.parts_completed_at = Some(ctx.now);
                parent.last_activity_at = Some(ctx.now);
                save(tx, ctx, &mut parent)?;
                emit(tx, ctx, &parent, "job:parts-completed", Some(("parts", serde_json::to_value(parts)?)))?;
            }
        }
    }
    after_dependents(tx, ctx, job)
}

/// The jobs waiting on `job`, which just became terminal: started, canceled, or left waiting.
fn after_dependents(tx: &mut dyn Tx, ctx: &Ctx, job: &Job) -> Result<()> {
    for mut dependent in tx.waiting_dependents(&job.id)? {
        match job.status {
            // A canceled predecessor can never complete: the dependent is canceled with it.
            JobStatus::Canceled => {
                let info = Some(format!("canceled because predecessor job {} was canceled", job.id));
                cancel(tx, ctx, dependent, info)?;
            }
            // A failed predecessor may still be retried, so the dependent keeps waiting.
            JobStatus::Failed => {}
            _ => start(tx, ctx, &mut dependent)?,
        }
    }
    Ok(())
}

/// Fails a job for the watchdog, through the same path as a listener's `fail`.
pub fn fail_overdue(tx: &mut dyn Tx, ctx: &Ctx, job: Job, heading: &str, message: String) -> Result<Job> {
    let info = Some(format!("watchdog: {message}"));
    end(tx, ctx, job, JobStatus::Failed, Outcome { outcome: json!({ "heading": heading, "message": message }), info })
}

/// Moves a `scheduled` job whose time has come on (to `ready`, or `waiting`).
pub fn promote_scheduled(tx: &mut dyn Tx, ctx: &Ctx, mut job: Job) -> Result<Job> {
    if job.status != JobStatus::Scheduled {
        return Err(refuse(&job, "promote", "scheduled"));
    }
    start(tx, ctx, &mut job)?;
    Ok(job)
}
