//! A well-behaved test plugin: completes every `space:work` job it is given, acks and
//! completes `space:lifecycle` jobs (the lifecycle benchmark), and returns at once for
//! `bench:noop` events (the trivial handler that the dispatch-overhead benchmark measures). `sheet:page` jobs page through their whole sheet in
//! pages of `input.pageSize` and complete with the number of records and cells seen.

use jobhost_plugin_sdk::jobs::{self, Outcome};
use jobhost_plugin_sdk::{CellValue, Event, Listener, Result, json};

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
                let (mut records, mut cells) = (0u64, 0u64);
                for n in 1.. {
                    let page = event.data(size, n)?;
                    if page.is_empty() {
                        break;
                    }
                    records += page.len() as u64;
                    cells += page
                        .records()
                        .map(|r| r.values().iter().filter(|v| !matches!(v, CellValue::Null)).count() as u64)
                        .sum::<u64>();
                }
                jobs::complete(
                    event.job_id()?,
                    Outcome { outcome: json!({ "records": records, "cells": cells }), info: None },
                )?;
                Ok(())
            })
        })
}

jobhost_plugin_sdk::export!(listener);
