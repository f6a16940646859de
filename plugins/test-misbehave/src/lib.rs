//! A test plugin that misbehaves on purpose, one way per job operation:
//! `space:trap` panics (a trap), `space:loop` never returns (CPU deadline), `space:flaky`
//! fails its first attempt with an error and completes the job on the next,
//! `space:print` writes to stdout and stderr and logs before completing the job,
//! `space:bomb` allocates 1 GiB (memory limit), `space:sleep` sleeps for an hour through WASI
//! clocks (blocked in a host call: only the wall-clock limit stops it), `sheet:xss` writes
//! markup and script into everything the console shows — its logs, a record of its sheet
//! (a value and an error message), the job's info and outcome — and fails the job: the
//! console must show all of it as text. `sheet:abandon` acks its job and returns without
//! ending it (the job waits for the watchdog).

use jobhost_plugin_sdk::jobs::{self, Ack, Outcome};
use jobhost_plugin_sdk::records::{self, CellValue, Message, MessageKind, NewRecord};
use jobhost_plugin_sdk::{Event, Listener, Result, json, log};

fn listener() -> Listener {
    Listener::new()
        .filter(json!({ "job": "space:trap" }), |l| l.on("job:ready", |_: &Event| -> Result<()> { panic!("boom") }))
        .filter(json!({ "job": "space:loop" }), |l| {
            l.on("job:ready", |event: &Event| -> Result<()> {
                let mut n: u64 = event.attempt() as u64;
                loop {
                    n = std::hint::black_box(n.wrapping_mul(6364136223846793005).wrapping_add(1));
                }
            })
        })
        .filter(json!({ "job": "space:flaky" }), |l| {
            l.on("job:ready", |event: &Event| -> Result<()> {
                if event.attempt() == 1 {
                    return Err("first attempt fails".into());
                }
                jobs::complete(event.job_id()?, Outcome::message(format!("attempt {}", event.attempt())))?;
                Ok(())
            })
        })
        .filter(json!({ "job": "space:bomb" }), |l| {
            l.on("job:ready", |_: &Event| -> Result<()> {
                let big = vec![7u8; 1 << 30];
                Err(format!("allocated {} bytes", std::hint::black_box(big).len()).into())
            })
        })
        .filter(json!({ "job": "space:sleep" }), |l| {
            l.on("job:ready", |_: &Event| -> Result<()> {
                std::thread::sleep(std::time::Duration::from_secs(3600));
                Err("woke up".into())
            })
        })
        .filter(json!({ "job": "sheet:xss" }), |l| l.on("job:ready", xss))
        .filter(json!({ "job": "sheet:abandon" }), |l| {
            l.on("job:ready", |event: &Event| -> Result<()> {
                jobs::ack(event.job_id()?, Ack::progress("started, then left", 10))?;
                Ok(())
            })
        })
        .filter(json!({ "job": "space:print" }), |l| {
            l.on("job:ready", |event: &Event| -> Result<()> {
                println!("to stdout");
                eprintln!("to stderr");
                log::warn("through the log interface");
                jobs::complete(event.job_id()?, Outcome::message("printed"))?;
                Ok(())
            })
        })
}

jobhost_plugin_sdk::export!(listener);

/// What a hostile plugin would write: a script element, an image whose error handler runs
/// script, and a `javascript:` link. Each sets `document.title` when it runs, which the
/// console's tests check never happens.
const PAYLOADS: [&str; 3] = [
    "<script>document.title='XSS-script'</script>",
    "<img src=x onerror=\"document.title='XSS-img'\">",
    "<a href=\"javascript:document.title='XSS-link'\">click</a>",
];

fn xss(event: &Event) -> Result<()> {
    let job_id = event.job_id()?;
    let all = PAYLOADS.join(" ");
    println!("stdout {all}");
    log::warn(&format!("log {all}"));
    let sheet = event.sheet_id()?;
    let field = |name: &str, text: &str| jobhost_plugin_sdk::records::FieldValue {
        field: name.to_owned(),
        value: CellValue::Text(text.to_owned()),
    };
    records::insert(
        sheet,
        &[NewRecord {
            values: vec![field("name", PAYLOADS[0]), field("email", PAYLOADS[1])],
            messages: vec![Message {
                field: Some("email".into()),
                kind: MessageKind::Error,
                text: PAYLOADS[2].to_owned(),
            }],
        }],
    )?;
    jobs::ack(job_id, Ack::progress(format!("info {all}"), 50))?;
    jobs::fail(
        job_id,
        Outcome { outcome: json!({ "message": all, "html": PAYLOADS }), info: Some(format!("failed {all}")) },
    )?;
    Ok(())
}
