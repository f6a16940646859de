//! The `{{name}}` listener: checks a sheet in parts.
//!
//! - The parent job (`sheet:{{name}}`) is split into one part per `PART_SIZE` records.
//! - Each part reads its page, checks every record with [`check`], writes an error message
//!   on the records that break the rule, and completes.
//! - When every part has ended the host emits `job:parts-completed`; the parent completes
//!   with the counts, or fails when a part failed.
//!
//! Delivery is at least once: `tolerate_repeat` skips work a repeated event finds done.

use jobhost_plugin_sdk::jobs::{self, Ack, Outcome, Split};
use jobhost_plugin_sdk::records::{self, Message, RecordRef, Update};
use jobhost_plugin_sdk::{Event, Listener, Result, json, tolerate_repeat};

const JOB: &str = "sheet:{{name}}";
/// Records per part (the sample's 24 records make 3 parts; raise it for real sheets).
const PART_SIZE: u32 = 10;
/// The rule: every email contains this.
const REQUIRED: &str = "@";

/// The messages for one record: none when it is valid.
fn check(record: &RecordRef<'_>) -> Vec<Message> {
    let email = record.str("email").unwrap_or_default();
    if email.contains(REQUIRED) {
        Vec::new()
    } else {
        vec![records::error_message("email", format!("email must contain {REQUIRED}"))]
    }
}

fn listener() -> Listener {
    Listener::new()
        .filter(json!({ "job": JOB, "isPart": false }), |l| {
            l.on("job:ready", split).on("job:parts-completed", finish)
        })
        .filter(json!({ "job": JOB, "isPart": true }), |l| l.on("job:ready", check_part))
}

jobhost_plugin_sdk::export!(listener);

fn split(event: &Event) -> Result<()> {
    let id = event.job_id()?;
    let total = records::counts(event.sheet_id()?)?.total;
    if tolerate_repeat(jobs::ack(id, Ack::progress("splitting", 10)))?.is_none() {
        return Ok(());
    }
    if total == 0 {
        tolerate_repeat(jobs::complete(id, Outcome::message("the sheet has no records")))?;
        return Ok(());
    }
    match jobs::split(id, Split::Count(total.div_ceil(u64::from(PART_SIZE)) as u32)) {
        Err(e) if !e.message().contains("already split") => Err(e),
        _ => Ok(()),
    }
}

fn check_part(event: &Event) -> Result<()> {
    let id = event.job_id()?;
    let Some(job) = tolerate_repeat(jobs::ack(id, Ack::progress("checking", 10)))? else { return Ok(()) };
    let part = job.part_data()?["part"].as_u64().ok_or("the part has no partData.part")? as u32;
    let page = event.data(PART_SIZE, part + 1)?;
    let mut updates = Vec::new();
    for record in page.records() {
        let messages = check(&record);
        if !messages.is_empty() {
            updates.push(Update { id: record.id(), values: Vec::new(), messages: Some(messages) });
        }
    }
    if !updates.is_empty() {
        records::update(event.sheet_id()?, &updates)?;
    }
    let outcome = json!({ "checked": page.len(), "invalid": updates.len() });
    tolerate_repeat(jobs::complete(id, Outcome { outcome, info: None }))?;
    Ok(())
}

fn finish(event: &Event) -> Result<()> {
    let id = event.job_id()?;
    let parts = &event.payload()["parts"];
    let counts = records::counts(event.sheet_id()?)?;
    let outcome = Outcome {
        outcome: json!({
            "message": format!("{} records, {} invalid", counts.total, counts.error),
            "parts": parts,
            "records": { "total": counts.total, "valid": counts.valid, "error": counts.error },
        }),
        info: None,
    };
    let failed = parts["failed"].as_u64().unwrap_or(0) + parts["canceled"].as_u64().unwrap_or(0);
    tolerate_repeat(if failed == 0 { jobs::complete(id, outcome) } else { jobs::fail(id, outcome) })?;
    Ok(())
}
