//! The seeds' two listeners, deployed together as one plugin.
//!
//! - Parent (`{job: "sheet:submitLargeSheet", isPart: false}`): on `job:ready` read the
//!   sheet's counts, ack, split into `ceil(total / 1000)` parts, ack again; on
//!   `job:parts-completed` complete the parent, or fail it when a part failed or was canceled,
//!   with an outcome carrying the counts.
//! - Part (`{…, isPart: true}`): ack, read page `part + 1` of 1000 records, validate every
//!   record, write error messages back on the invalid cells, complete the part.
//!
//! Rules: `firstName`, `lastName`, `email` required; `email` is `local@domain` with a dot in
//! the domain; `age`, when present, an integer 0–150.
//!
//! For demonstrations and tests, a parent created with input `{"failParts": [i, …]}` makes
//! those parts fail instead of validating.
//!
//! Every handler tolerates a repeated delivery: work already done is recognised and skipped.

use jobhost_plugin_sdk::jobs::{self, Ack, Outcome, Split};
use jobhost_plugin_sdk::records::{self, Cell, Message, RecordRef, Update};
use jobhost_plugin_sdk::{Event, Listener, Result, json, log, tolerate_repeat};

const JOB: &str = "sheet:submitLargeSheet";
const BATCH: u32 = 1000;

fn listener() -> Listener {
    Listener::new()
        .filter(json!({ "job": JOB, "isPart": false }), |l| {
            l.on("job:ready", parent_ready).on("job:parts-completed", parent_parts_completed)
        })
        .filter(json!({ "job": JOB, "isPart": true }), |l| l.on("job:ready", part_ready))
}

jobhost_plugin_sdk::export!(listener);

fn parent_ready(event: &Event) -> Result<()> {
    let job_id = event.job_id()?;
    let job = jobs::get(job_id)?;
    if job.status().is_terminal() {
        return Ok(());
    }
    let counts = records::counts(event.sheet_id()?)?;
    if tolerate_repeat(jobs::ack(job_id, Ack::progress("Splitting Job", 10)))?.is_none() {
        return Ok(());
    }
    if counts.total == 0 {
        tolerate_repeat(jobs::complete(job_id, Outcome::message("The sheet has no records; nothing to do.")))?;
        return Ok(());
    }
    let parts = counts.total.div_ceil(u64::from(BATCH)) as u32;
    match jobs::split(job_id, Split::Count(parts)) {
        Ok(_) => {}
        // A repeated delivery after a split that already happened.
        Err(e) if e.message().contains("already split") => {}
        Err(e) => return Err(e),
    }
    log::info(&format!("split {job_id} into {parts} parts"));
    tolerate_repeat(jobs::ack(job_id, Ack::progress(format!("Job split into {parts} parts."), 20)))?;
    Ok(())
}

fn parent_parts_completed(event: &Event) -> Result<()> {
    let job_id = event.job_id()?;
    let parts = &event.payload()["parts"];
    let counts = records::counts(event.sheet_id()?)?;
    let n = |k: &str| parts[k].as_u64().unwrap_or(0);
    let summary = format!(
        "{} of {} parts completed, {} failed, {} canceled; {} records: {} valid, {} invalid.",
        n("completed"),
        n("total"),
        n("failed"),
        n("canceled"),
        counts.total,
        counts.valid,
        counts.error
    );
    let outcome = Outcome {
        outcome: json!({
            "message": summary,
            "parts": parts,
            "records": { "total": counts.total, "valid": counts.valid, "error": counts.error },
        }),
        info: Some(summary.clone()),
    };
    if n("failed") > 0 || n("canceled") > 0 {
        tolerate_repeat(jobs::fail(job_id, outcome))?;
    } else {
        tolerate_repeat(jobs::complete(job_id, outcome))?;
    }
    Ok(())
}

fn part_ready(event: &Event) -> Result<()> {
    let job_id = event.job_id()?;
    let Some(job) = tolerate_repeat(jobs::ack(job_id, Ack::default()))? else { return Ok(()) };
    let part = job.part_data()?["part"].as_u64().ok_or("the part has no partData.part")? as u32;
    if let Some(parent) = job.parent_id() {
        let input = jobs::get(parent)?.input()?;
        if input["failParts"].as_array().is_some_and(|l| l.iter().any(|p| p.as_u64() == Some(u64::from(part)))) {
            log::warn(&format!("part {part} is listed in the parent's failParts: failing it on purpose"));
            tolerate_repeat(jobs::fail(job_id, Outcome::message(format!("part {part} failed on purpose"))))?;
            return Ok(());
        }
    }
    let page = event.data(BATCH, part + 1)?;
    let mut updates = Vec::new();
    let mut invalid = 0u64;
    for record in page.records() {
        let errors = validate(&record);
        invalid += u64::from(!errors.is_empty());
        if !same_messages(record.messages(), &errors) {
            updates.push(Update { id: record.id(), values: Vec::new(), messages: Some(errors) });
        }
    }
    if !updates.is_empty() {
        records::update(event.sheet_id()?, &updates)?;
    }
    let message = format!("validated {} records, {invalid} invalid", page.len());
    tolerate_repeat(jobs::complete(
        job_id,
        Outcome { outcome: json!({ "message": message, "invalid": invalid }), info: Some(message) },
    ))?;
    Ok(())
}

fn same_messages(current: &[Message], wanted: &[Message]) -> bool {
    if current.len() != wanted.len() {
        return false;
    }
    fn key(m: &Message) -> (Option<&str>, &str) {
        (m.field.as_deref(), m.text.as_str())
    }
    let mut a: Vec<_> = current.iter().map(key).collect();
    let mut b: Vec<_> = wanted.iter().map(key).collect();
    a.sort();
    b.sort();
    a == b
}

fn validate(record: &RecordRef<'_>) -> Vec<Message> {
    let mut errors = Vec::new();
    for field in ["firstName", "lastName", "email"] {
        if record.get(field).is_none_or(Cell::is_blank) {
            errors.push(records::error_message(field, format!("{field} is required")));
        }
    }
    if let Some(email) = record.str("email")
        && !email.trim().is_empty()
        && !valid_email(email)
    {
        errors.push(records::error_message("email", format!("`{email}` is not an email address (local@domain.tld)")));
    }
    if let Some(age) = record.get("age")
        && !age.is_blank()
        && !age.as_i64().is_some_and(|a| (0..=150).contains(&a))
    {
        errors.push(records::error_message("age", format!("age must be an integer from 0 to 150, not {}", show(age))));
    }
    errors
}

fn show(v: Cell<'_>) -> String {
    match v {
        Cell::Null => "null".into(),
        Cell::Boolean(b) => b.to_string(),
        Cell::Integer(i) => i.to_string(),
        Cell::Float(f) => f.to_string(),
        Cell::Text(s) => format!("\"{s}\""),
    }
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
