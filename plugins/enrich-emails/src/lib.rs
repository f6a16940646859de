//! Enriches a sheet's email addresses through a verification service, over outbound HTTP.
//!
//! - Parent (`{job: "sheet:enrichEmails", isPart: false}`): on `job:ready` split into one part
//!   per 1,000 records; on `job:parts-completed` complete the parent with how many addresses
//!   its parts checked and flagged (or fail it when a part failed).
//! - Part: read its page, send the page's addresses in **one** `POST` to the service
//!   (`verify_url` in the manifest's `[config]`, granted in `allowed_outbound_hosts`), and
//!   write a `warn` message on the `email` cell of every record the service flags, keeping the
//!   record's other messages. A warning leaves the record valid.
//!
//! The service takes `{"emails": ["a@b.c", …]}` and answers
//! `{"flagged": [{"email": "a@b.c", "reason": "disposable domain"}, …]}`;
//! `plugins/enrich-emails/verify-service.py` is a small one for trying this out.

use std::collections::HashMap;

use jobhost_plugin_sdk::jobs::{self, Ack, Outcome, Split};
use jobhost_plugin_sdk::records::{self, Message, MessageKind, Update};
use jobhost_plugin_sdk::{Event, Listener, Result, config, http, json, log, tolerate_repeat};

const JOB: &str = "sheet:enrichEmails";
const BATCH: u32 = 1000;

fn listener() -> Listener {
    Listener::new()
        .filter(json!({ "job": JOB, "isPart": false }), |l| {
            l.on("job:ready", parent_ready).on("job:parts-completed", parent_done)
        })
        .filter(json!({ "job": JOB, "isPart": true }), |l| l.on("job:ready", part_ready))
}

jobhost_plugin_sdk::export!(listener);

fn parent_ready(event: &Event) -> Result<()> {
    let job_id = event.job_id()?;
    let counts = records::counts(event.sheet_id()?)?;
    if tolerate_repeat(jobs::ack(job_id, Ack::progress("Checking addresses", 10)))?.is_none() {
        return Ok(());
    }
    if counts.total == 0 {
        tolerate_repeat(jobs::complete(job_id, Outcome::message("The sheet has no records.")))?;
        return Ok(());
    }
    match jobs::split(job_id, Split::Count(counts.total.div_ceil(u64::from(BATCH)) as u32)) {
        Ok(_) => Ok(()),
        Err(e) if e.message().contains("already split") => Ok(()),
        Err(e) => Err(e),
    }
}

fn parent_done(event: &Event) -> Result<()> {
    let job_id = event.job_id()?;
    let parts = &event.payload()["parts"];
    let failed = parts["failed"].as_u64().unwrap_or(0) + parts["canceled"].as_u64().unwrap_or(0);
    // The parts' own outcomes say what each checked and flagged.
    let (mut checked, mut flagged) = (0, 0);
    for part in jobs::list_parts(job_id)? {
        let outcome = part.outcome()?;
        checked += outcome["checked"].as_u64().unwrap_or(0);
        flagged += outcome["flagged"].as_u64().unwrap_or(0);
    }
    let mut message = format!("{checked} addresses checked, {flagged} flagged");
    if failed > 0 {
        message.push_str(&format!("; {failed} of {} parts did not finish", parts["total"]));
    }
    let outcome = Outcome {
        outcome: json!({ "message": message, "checked": checked, "flagged": flagged, "parts": parts }),
        info: Some(message),
    };
    if failed > 0 {
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
    let url = config::get("verify_url").ok_or("set verify_url in the manifest's [config]")?;
    let page = event.data(BATCH, part + 1)?;
    let emails: Vec<&str> = page.records().filter_map(|r| r.str("email")).collect();
    let answer = http::post(&url).json(&json!({ "emails": emails })).send()?;
    if answer.status() != 200 {
        return Err(format!("the verification service answered {}: {}", answer.status(), answer.text()).into());
    }
    let flagged: HashMap<String, String> = answer.json()?["flagged"]
        .as_array()
        .map(|list| {
            list.iter()
                .filter_map(|f| {
                    Some((f["email"].as_str()?.to_owned(), f["reason"].as_str().unwrap_or("flagged").to_owned()))
                })
                .collect()
        })
        .unwrap_or_default();
    let mut updates = Vec::new();
    for record in page.records() {
        let Some(reason) = record.str("email").and_then(|e| flagged.get(e)) else { continue };
        let text = format!("the verification service flags this address: {reason}");
        if record.messages().iter().any(|m| m.text == text) {
            continue; // a repeated delivery: already written
        }
        let mut messages = record.messages().to_vec();
        messages.push(Message { field: Some("email".into()), kind: MessageKind::Warn, text });
        updates.push(Update { id: record.id(), values: Vec::new(), messages: Some(messages) });
    }
    if !updates.is_empty() {
        records::update(event.sheet_id()?, &updates)?;
    }
    let flagged_here = page.records().filter(|r| r.str("email").is_some_and(|e| flagged.contains_key(e))).count();
    let message = format!("checked {} addresses, {flagged_here} flagged", emails.len());
    log::info(&message);
    let outcome = json!({ "message": message, "checked": emails.len(), "flagged": flagged_here });
    tolerate_repeat(jobs::complete(job_id, Outcome { outcome, info: Some(message) }))?;
    Ok(())
}
