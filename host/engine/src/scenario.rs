//! The seeds' scenario, as native listeners.
//!
//! A sheet of people records; a `sheet:submitLargeSheet` parent job. The **parent listener**
//! reads the counts, acks, splits into `ceil(total / 1000)` parts and acks again; on
//! `job:parts-completed` it completes the parent, or fails it when any part failed or was
//! canceled, with an outcome that carries the counts. The **part listener** acks, reads page
//! `part + 1` of size 1000, validates every record, writes error messages back on the invalid
//! cells, and completes the part.
//!
//! Validation rules (so results can be checked): `firstName`, `lastName` and `email` are
//! required (empty is an error); `email` must be `local@domain` with a dot in the domain;
//! `age`, when present, an integer 0–150.
//!
//! Both listeners tolerate repeated deliveries: work already done is recognised by the job's
//! status and skipped.

use std::collections::HashSet;
use std::sync::Arc;

use serde_json::{Map, Value, json};

use crate::Env;
use crate::listener::{EventCtx, HandlerResult, Listener};
use crate::model::{Ack, Message, NewRecord, Outcome, Record, RecordUpdate, Split};

/// The job name both listeners filter on.
pub const JOB: &str = "sheet:submitLargeSheet";
/// The operation of [`JOB`].
pub const OPERATION: &str = "submitLargeSheet";
/// Records per part.
pub const BATCH: u32 = 1000;

/// Knobs for tests: parts that fail on purpose, parts left alone.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Part indexes whose listener fails the part instead of completing it.
    pub fail_parts: HashSet<u32>,
    /// Part indexes the listener does not touch (they stay `ready`), for tests that cancel them.
    pub skip_parts: HashSet<u32>,
}

/// The validation rules of the scenario; returns the error messages of one record.
pub fn validate(record: &Record) -> Vec<Message> {
    let mut errors = Vec::new();
    for field in ["firstName", "lastName", "email"] {
        let present = match record.value(field) {
            Some(Value::String(s)) => !s.trim().is_empty(),
            Some(_) => true,
            None => false,
        };
        if !present {
            errors.push(Message::error(field, format!("{field} is required")));
        }
    }
    if let Some(email) = record.str("email")
        && !email.trim().is_empty()
        && !valid_email(email)
    {
        errors.push(Message::error("email", format!("`{email}` is not an email address (local@domain.tld)")));
    }
    if let Some(age) = record.value("age") {
        let ok = match age {
            Value::Number(n) => n.as_u64().is_some_and(|a| a <= 150),
            Value::String(s) if s.trim().is_empty() => true,
            Value::String(s) => s.trim().parse::<u64>().is_ok_and(|a| a <= 150),
            _ => false,
        };
        if !ok {
            errors.push(Message::error("age", format!("age must be an integer from 0 to 150, not {age}")));
        }
    }
    errors
}

fn valid_email(email: &str) -> bool {
    let Some((local, domain)) = email.split_once('@') else { return false };
    !local.is_empty()
        && !domain.contains('@')
        && domain.contains('.')
        && !domain.starts_with('.')
        && !domain.ends_with('.')
        && !email.chars().any(char::is_whitespace)
}

/// Deterministic sample records: `n` people of which a known set is invalid. Returns the
/// records and how many of them break a rule (counted from how they were made, not by
/// [`validate`], so tests compare two independent answers).
pub fn sample_records(n: u64) -> (Vec<NewRecord>, u64) {
    sample_range(0..n)
}

/// Inserts the first `n` records of the deterministic sample into a sheet, in calls of
/// 100,000 (a large sheet without holding it all in memory). Returns how many are invalid.
pub async fn insert_sample(env: &Env, sheet_id: &str, n: u64) -> crate::Result<u64> {
    let mut invalid = 0;
    for start in (0..n).step_by(100_000) {
        let (rows, bad) = sample_range(start..(start + 100_000).min(n));
        invalid += bad;
        env.insert_records(sheet_id, rows).await?;
    }
    Ok(invalid)
}

/// Records `range` of the deterministic sample (so a large sheet can be made in chunks).
pub fn sample_range(range: std::ops::Range<u64>) -> (Vec<NewRecord>, u64) {
    let mut invalid = 0;
    let records = range
        .map(|i| {
            let (record, bad) = sample_record(i);
            invalid += u64::from(bad);
            record
        })
        .collect();
    (records, invalid)
}

/// Sample record `i` and whether it breaks a rule.
pub fn sample_record(i: u64) -> (NewRecord, bool) {
    const FIRST: [&str; 8] = ["Ada", "Grace", "Alan", "Edsger", "Barbara", "Ken", "Margaret", "Donald"];
    const LAST: [&str; 8] = ["Lovelace", "Hopper", "Turing", "Dijkstra", "Liskov", "Thompson", "Hamilton", "Knuth"];
    let mut values = Map::new();
    let mut bad = false;
    values.insert("firstName".into(), json!(FIRST[(i % 8) as usize]));
    if i % 97 == 13 {
        values.insert("lastName".into(), json!(""));
        bad = true;
    } else {
        values.insert("lastName".into(), json!(LAST[((i / 8) % 8) as usize]));
    }
    if i % 10 == 3 {
        values.insert("email".into(), json!(format!("person{i}.example.com")));
        bad = true;
    } else {
        values.insert("email".into(), json!(format!("person{i}@example.com")));
    }
    if i % 41 == 7 {
        values.insert("age".into(), json!(151 + i % 50));
        bad = true;
    } else if !i.is_multiple_of(5) {
        values.insert("age".into(), json!(18 + i % 60));
    }
    (NewRecord { values, ..Default::default() }, bad)
}

/// The parent and part listeners for one environment.
pub fn listeners(environment_id: &str, options: Options) -> Vec<Listener> {
    let options = Arc::new(options);
    let parent = Listener::new("submit-large-sheet-parent", environment_id)
        .filter(json!({ "job": JOB, "isPart": false }), |l| {
            l.on("job:ready", parent_ready).on("job:parts-completed", parent_parts_completed)
        });
    let part = Listener::new("submit-large-sheet-part", environment_id)
        .filter(json!({ "job": JOB, "isPart": true }), move |l| {
            l.on("job:ready", move |event| part_ready(event, options.clone()))
        });
    vec![parent, part]
}

/// Runs a job call and treats "the job already ended" as done: the call is a repeat of work
/// that finished before a redelivery.
async fn tolerate_repeat<T>(call: impl Future<Output = crate::Result<T>>) -> crate::Result<Option<T>> {
    match call.await {
        Ok(v) => Ok(Some(v)),
        Err(e) if e.is_already_terminal() => Ok(None),
        Err(e) => Err(e),
    }
}

async fn parent_ready(event: EventCtx) -> HandlerResult {
    let job_id = event.job_id()?.to_owned();
    let api = &event.api;
    let job = api.job(&job_id).await?;
    if job.status.is_terminal() {
        return Ok(());
    }
    let counts = api.record_counts(event.sheet_id()?).await?;
    if tolerate_repeat(api.ack(&job_id, Ack::progress("Splitting Job", 10))).await?.is_none() {
        return Ok(());
    }
    if counts.total == 0 {
        tolerate_repeat(api.complete(&job_id, Outcome::message("The sheet has no records; nothing to do."))).await?;
        return Ok(());
    }
    let parts = counts.total.div_ceil(u64::from(BATCH)) as u32;
    if job.split_at.is_none() {
        api.split(&job_id, Split::count(parts)).await?;
    }
    tolerate_repeat(api.ack(&job_id, Ack::progress(format!("Job split into {parts} parts."), 20))).await?;
    Ok(())
}

async fn parent_parts_completed(event: EventCtx) -> HandlerResult {
    let job_id = event.job_id()?.to_owned();
    let parts =
        event.event.part_counts().ok_or_else(|| crate::Error::invalid("job:parts-completed without payload.parts"))?;
    let records = event.api.record_counts(event.sheet_id()?).await?;
    let summary = format!(
        "{} of {} parts completed, {} failed, {} canceled; {} records: {} valid, {} invalid.",
        parts.completed, parts.total, parts.failed, parts.canceled, records.total, records.valid, records.error
    );
    let outcome = Outcome {
        outcome: json!({ "message": summary, "parts": parts, "records": records }),
        info: Some(summary.clone()),
    };
    if parts.failed > 0 || parts.canceled > 0 {
        tolerate_repeat(event.api.fail(&job_id, outcome)).await?;
    } else {
        tolerate_repeat(event.api.complete(&job_id, outcome)).await?;
    }
    Ok(())
}

async fn part_ready(event: EventCtx, options: Arc<Options>) -> HandlerResult {
    let job_id = event.job_id()?.to_owned();
    let api: &Env = &event.api;
    let part = event.event.payload.pointer("/partData/part").and_then(Value::as_u64);
    if part.is_some_and(|p| options.skip_parts.contains(&(p as u32))) {
        return Ok(());
    }
    if tolerate_repeat(api.ack(&job_id, Ack::default())).await?.is_none() {
        return Ok(());
    }
    let job = api.job(&job_id).await?;
    let part = job
        .part_data
        .get("part")
        .and_then(Value::as_u64)
        .ok_or_else(|| crate::Error::invalid(format!("part {job_id} has no partData.part")))? as u32;
    if options.fail_parts.contains(&part) {
        tolerate_repeat(api.fail(&job_id, Outcome::message(format!("part {part} failed on purpose")))).await?;
        return Ok(());
    }
    let page = event.data(BATCH, part + 1).await?;
    let mut updates = Vec::new();
    let mut invalid = 0;
    for record in &page.records {
        let errors = validate(record);
        invalid += u64::from(!errors.is_empty());
        let mut current: Vec<&Message> =
            record.values.values().flat_map(|c| &c.messages).chain(&record.messages).collect();
        let mut wanted: Vec<&Message> = errors.iter().collect();
        let key = |m: &&Message| (m.field.clone(), m.message.clone());
        current.sort_by_key(key);
        wanted.sort_by_key(key);
        if current != wanted {
            updates.push(RecordUpdate { id: record.id.clone(), values: Map::new(), messages: Some(errors) });
        }
    }
    if !updates.is_empty() {
        api.update_records(event.sheet_id()?, updates).await?;
    }
    let message = format!("validated {} records, {invalid} invalid", page.records.len());
    tolerate_repeat(api.complete(
        &job_id,
        Outcome { outcome: json!({ "message": message, "invalid": invalid }), info: Some(message) },
    ))
    .await?;
    Ok(())
}
