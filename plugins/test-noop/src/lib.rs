//! A well-behaved test plugin: completes every `space:work` job it is given, acks and
//! completes `space:lifecycle` jobs (the lifecycle benchmark), and returns at once for
//! `bench:noop` events (the trivial handler that the dispatch-overhead benchmark measures). `sheet:page` jobs page through their whole sheet in
//! pages of `input.pageSize` and complete with the number of records and cells seen.
//! `sheet:page-own-writes` jobs page the same way but, before asking for each next page, mark
//! its first record (`mark` = the page number); they fail if a page does not show the mark —
//! a guest must see its own writes even when the host reads pages ahead.
//! `sheet:page-shapes` jobs page through their sheet with both packed shapes of the WIT
//! (`read-page`, which the SDK uses, and `page-packed`, kept for guests built before it) and
//! fail the job at the first page on which they disagree; they complete with the number of
//! records and messages seen.

use jobhost_plugin_sdk::bindings::jobhost::plugin::records as raw;
use jobhost_plugin_sdk::jobs::{self, Outcome};
use jobhost_plugin_sdk::{Cell, CellValue, Error, Event, Listener, Result, json, records};

fn listener() -> Listener {
    Listener::new()
        .filter(json!({ "job": "space:work" }), |l| {
            l.on("job:ready", |event: &Event| -> Result<()> {
                jobs::complete(event.job_id()?, Outcome::message("worked"))?;
                Ok(())
            })
        })
        .on("bench:noop", |_: &Event| -> Result<()> { Ok(()) })
        .filter(json!({ "job": "space:lifecycle" }), |l| {
            l.on("job:ready", |event: &Event| -> Result<()> {
                let id = event.job_id()?;
                jobs::ack(id, jobs::Ack::default())?;
                jobs::complete(id, Outcome::default())?;
                Ok(())
            })
        })
        .filter(json!({ "job": "sheet:page" }), |l| {
            l.on("job:ready", |event: &Event| -> Result<()> {
                let job = jobs::get(event.job_id()?)?;
                let size = job.input()?["pageSize"].as_u64().unwrap_or(1000) as u32;
                // Reads between pages (a count, a log line) must not cost the page read ahead.
                let read_between = job.input()?["readBetween"].as_bool().unwrap_or(false);
                let (mut records, mut cells) = (0u64, 0u64);
                for n in 1.. {
                    let page = event.data(size, n)?;
                    if page.is_empty() {
                        break;
                    }
                    if read_between {
                        let total = records::counts(event.sheet_id()?)?.total;
                        jobhost_plugin_sdk::log::info(&format!("page {n} of a sheet of {total}"));
                    }
                    records += page.len() as u64;
                    cells += page.records().map(|r| r.values().filter(|v| !v.is_null()).count() as u64).sum::<u64>();
                }
                jobs::complete(
                    event.job_id()?,
                    Outcome { outcome: json!({ "records": records, "cells": cells }), info: None },
                )?;
                Ok(())
            })
        })
        .filter(json!({ "job": "sheet:page-own-writes" }), |l| {
            l.on("job:ready", |event: &Event| -> Result<()> {
                let size = jobs::get(event.job_id()?)?.input()?["pageSize"].as_u64().unwrap_or(1000) as u32;
                let total = records::counts(event.sheet_id()?)?.total;
                let mut checked = 0u64;
                let mut page = event.data(size, 1)?;
                for n in 2.. {
                    let Some(last) = page.records().last().map(|r| r.id()) else { break };
                    if (n as u64 - 1) * u64::from(size) >= total {
                        break;
                    }
                    // Pages 1 and 2 are read without a write between them (so the host reads
                    // ahead); before each later page, its first record is marked.
                    if n == 2 {
                        page = event.data(size, 2)?;
                        continue;
                    }
                    // Records inserted in one call have consecutive ids: `last + 1` opens page n.
                    let mark = records::FieldValue { field: "mark".into(), value: CellValue::Integer(n) };
                    records::update(
                        event.sheet_id()?,
                        &[records::Update { id: last + 1, values: vec![mark], messages: None }],
                    )?;
                    page = event.data(size, n as u32)?;
                    let first = page.records().next().ok_or_else(|| Error::msg(format!("page {n} is empty")))?;
                    if first.get("mark").and_then(Cell::as_i64) != Some(n) {
                        return Err(Error::msg(format!(
                            "page {n} does not show the mark just written on record {}",
                            last + 1
                        )));
                    }
                    checked += 1;
                }
                jobs::complete(event.job_id()?, Outcome { outcome: json!({ "checked": checked }), info: None })?;
                Ok(())
            })
        })
        .filter(json!({ "job": "sheet:page-shapes" }), |l| l.on("job:ready", page_shapes))
}

/// Reads every page in both packed shapes and checks they carry the same page.
fn page_shapes(event: &Event) -> Result<()> {
    let job_id = event.job_id()?;
    let size = jobs::get(job_id)?.input()?["pageSize"].as_u64().unwrap_or(1000) as u32;
    match compare_shapes(event.sheet_id()?, size) {
        Ok((records, messages)) => jobs::complete(
            job_id,
            Outcome { outcome: json!({ "records": records, "messages": messages }), info: None },
        )?,
        // A failed job, not a failed delivery: a retry would read the same pages.
        Err(e) => jobs::fail(job_id, Outcome::message(e.message()))?,
    };
    Ok(())
}

/// `(records, messages)` of the sheet when both shapes agree on every page.
fn compare_shapes(sheet: &str, size: u32) -> Result<(u64, u64)> {
    let (mut records, mut messages) = (0u64, 0u64);
    for n in 1.. {
        let buffers = raw::read_page(sheet, size, n)?;
        let packed = raw::page_packed(sheet, size, n)?;
        let differ = |what: &str| Err(Error::msg(format!("page {n}: the two shapes differ in {what}")));
        if buffers.fields != packed.fields || buffers.cells != packed.cells || buffers.text != packed.text {
            return differ("fields, cells or text");
        }
        if buffers.ids != packed.rows.iter().map(|r| r.id).collect::<Vec<_>>() {
            return differ("record ids");
        }
        if buffers.message_ends.len() != packed.rows.len() {
            return differ("the number of message ends");
        }
        let mut start = 0;
        for (row, &end) in packed.rows.iter().zip(&buffers.message_ends) {
            let own = buffers.messages.get(start as usize..end as usize).unwrap_or_default();
            let valid = !own.iter().any(|m| matches!(m.kind, records::MessageKind::Error));
            let same = |a: &records::Message, b: &records::Message| {
                (&a.field, &a.text, a.kind as u8) == (&b.field, &b.text, b.kind as u8)
            };
            let agree = own.len() == row.messages.len() && own.iter().zip(&row.messages).all(|(a, b)| same(a, b));
            if !agree || valid != row.valid {
                return differ(&format!("the messages of record {}", row.id));
            }
            start = end;
        }
        if start as usize != buffers.messages.len() {
            return differ("messages that belong to no record");
        }
        if packed.rows.is_empty() {
            break;
        }
        records += packed.rows.len() as u64;
        messages += buffers.messages.len() as u64;
    }
    Ok((records, messages))
}

jobhost_plugin_sdk::export!(listener);
