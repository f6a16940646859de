//! A test plugin that attacks the sandbox from inside, one attack per job operation
//! (`space:<attack>` jobs, parameters in the job's input). What each attack got back is
//! logged (`[hostile] …` lines in the execution record) or returned as the delivery's error,
//! so the tests can assert the exact refusal.
//!
//! - `probe`: files, env vars, args, a socket, and another environment's job, sheet and
//!   records by id (`input.jobId`, `input.sheetId`): the outcome reports what it got.
//! - `hostcall-loop`: retries a failing host call forever.
//! - `recurse`: recurses until the stack overflows.
//! - `log-flood`: prints `input.bytes` bytes of logs, then completes its job.
//! - `huge-outcome`: completes its job with a 4 MiB outcome.
//! - `split-huge`: splits its job into 10⁹ parts.
//! - `page-huge`: reads a page of 10⁹ records of `input.sheetId`.
//! - `write-huge`: writes 10⁹ records into `input.sheetId`, in calls as large as allowed.
//! - `retrigger`: creates another `space:retrigger` job for every one it sees.
//! - `fanout`: creates two `space:fanout` jobs for every one it sees.
//! - `create-storm`: creates manual `space:idle` jobs until a call is refused, logs how many,
//!   and fails with the refusal.
//! - `event-storm`: inserts one record per call into `input.sheetId` until a call is refused
//!   (each call writes one event), logs how many, and fails with the refusal.
//! - `twice`: completes its job twice.
//! - `other-job`: completes `input.jobId`, a job of its environment it was not dispatched for.
//! - `granted`: reads what its manifest grants: a config value, a secret, an env var, a file.
//! - `use-secret`: reads the secret `API_KEY`, prints it, logs it, then fails with it in the
//!   message (`input.fail`) or completes its job: the host must keep none of it in plain text.

use jobhost_plugin_sdk::jobs::{self, Outcome, Split};
use jobhost_plugin_sdk::records::{self, FieldValue, NewRecord};
use jobhost_plugin_sdk::{Event, Listener, Result, Value, config, json, log, sheets};

fn describe<T: std::fmt::Debug, E: std::fmt::Display>(r: std::result::Result<T, E>) -> Value {
    match r {
        Ok(v) => json!({ "ok": format!("{v:?}") }),
        Err(e) => json!({ "err": e.to_string() }),
    }
}

fn kind<T>(r: Result<T>) -> String {
    match r {
        Ok(_) => "ok".to_owned(),
        Err(e) => format!("{:?}", e.kind()),
    }
}

fn input(event: &Event) -> Result<Value> {
    jobs::get(event.job_id()?)?.input()
}

fn probe(event: &Event) -> Result<()> {
    let id = event.job_id()?;
    let input = input(event)?;
    let foreign_job = input["jobId"].as_str().unwrap_or("job_unknown");
    let foreign_sheet = input["sheetId"].as_str().unwrap_or("sh_unknown");
    let row = || NewRecord {
        values: vec![FieldValue { field: "x".into(), value: records::CellValue::Null }],
        messages: vec![],
    };
    let report = json!({
        "file": describe(std::fs::read_to_string("/etc/hostname")),
        "dir": describe(std::fs::read_dir("/").map(|d| d.count())),
        "env": std::env::vars().count(),
        "args": std::env::args().count(),
        "socket": describe(std::net::TcpStream::connect("127.0.0.1:9")),
        "udp": describe(std::net::UdpSocket::bind("0.0.0.0:0")),
        "foreignGet": kind(jobs::get(foreign_job)),
        "foreignAck": kind(jobs::ack(foreign_job, jobs::Ack::default())),
        "foreignComplete": kind(jobs::complete(foreign_job, Outcome::message("hijacked"))),
        "foreignFail": kind(jobs::fail(foreign_job, Outcome::message("hijacked"))),
        "foreignCancel": kind(jobs::cancel(foreign_job, None)),
        "foreignSplit": kind(jobs::split(foreign_job, Split::Count(2))),
        "foreignParts": kind(jobs::list_parts(foreign_job)),
        "foreignSheet": kind(sheets::get(foreign_sheet)),
        "foreignCounts": kind(records::counts(foreign_sheet)),
        "foreignPage": kind(records::page(foreign_sheet, 10, 1)),
        "foreignInsert": kind(records::insert(foreign_sheet, &[row()])),
        "foreignUpdate": kind(records::update(foreign_sheet, &[records::Update { id: 1, values: vec![], messages: None }])),
        "foreignSecret": kind(config::secret("API_KEY")),
    });
    jobs::complete(id, Outcome { outcome: report, info: None })?;
    Ok(())
}

fn attack(event: &Event, op: &str) -> Result<()> {
    let id = event.job_id()?;
    match op {
        "hostcall-loop" => loop {
            // A retry loop around a call that keeps failing: almost no time in wasm.
            let _ = std::hint::black_box(jobs::get("job_does_not_exist"));
        },
        "recurse" => {
            // Frames of wasm locals only (nothing on Rust's shadow stack in linear memory), so
            // it is the engine's call stack that runs out.
            fn deeper(n: u64) -> u64 {
                if std::hint::black_box(n) == u64::MAX {
                    return n;
                }
                std::hint::black_box(deeper(n + 1)) ^ n
            }
            let n = deeper(0);
            Err(format!("recursion ended at {n}").into())
        }
        "log-flood" => {
            let bytes = input(event)?["bytes"].as_u64().unwrap_or(1 << 20);
            let line = "x".repeat(1023);
            for i in 0..bytes / 1024 {
                if i % 2 == 0 {
                    println!("{line}");
                } else {
                    log::info(&line);
                }
            }
            jobs::complete(id, Outcome::message("flooded"))?;
            Ok(())
        }
        "huge-outcome" => {
            let blob = "y".repeat(4 << 20);
            jobs::complete(id, Outcome { outcome: json!({ "blob": blob }), info: None })?;
            Ok(())
        }
        "split-huge" => {
            jobs::ack(id, jobs::Ack::default())?;
            let n = jobs::split(id, Split::Count(1_000_000_000))?;
            Err(format!("split into {n} parts").into())
        }
        "page-huge" => {
            let sheet = input(event)?["sheetId"].as_str().unwrap_or_default().to_owned();
            let page = records::page(&sheet, 1_000_000_000, 1)?;
            Err(format!("read {} records", page.len()).into())
        }
        "write-huge" => {
            let sheet = input(event)?["sheetId"].as_str().unwrap_or_default().to_owned();
            let rec = NewRecord {
                values: vec![FieldValue { field: "n".into(), value: records::CellValue::Integer(1) }],
                messages: vec![],
            };
            // First one call as large as memory allows, then as many allowed calls as it takes.
            let big = vec![rec.clone(); 20_000];
            log::info(&format!("[hostile] one call of {}: {}", big.len(), kind(records::insert(&sheet, &big))));
            drop(big);
            let batch = vec![rec; 1000];
            let mut written: u64 = 0;
            while written < 1_000_000_000 {
                written += records::insert(&sheet, &batch)?;
            }
            Err(format!("wrote {written} records").into())
        }
        "retrigger" => {
            jobs::create("space", "retrigger", None, None, false)?;
            jobs::complete(id, Outcome::message("passed it on"))?;
            Ok(())
        }
        "fanout" => {
            jobs::create("space", "fanout", None, None, false)?;
            jobs::create("space", "fanout", None, None, false)?;
            jobs::complete(id, Outcome::message("passed it on twice"))?;
            Ok(())
        }
        "create-storm" => {
            let mut created: u64 = 0;
            let refused = loop {
                match jobs::create("space", "idle", None, None, true) {
                    Ok(_) => created += 1,
                    Err(e) => break e,
                }
            };
            log::info(&format!("[hostile] created {created} jobs, then {:?}", refused.kind()));
            Err(refused)
        }
        "event-storm" => {
            let sheet = input(event)?["sheetId"].as_str().unwrap_or_default().to_owned();
            let rec = NewRecord {
                values: vec![FieldValue { field: "n".into(), value: records::CellValue::Integer(1) }],
                messages: vec![],
            };
            let mut written: u64 = 0;
            let refused = loop {
                match records::insert(&sheet, std::slice::from_ref(&rec)) {
                    Ok(n) => written += n,
                    Err(e) => break e,
                }
            };
            log::info(&format!("[hostile] inserted {written} records, then {:?}", refused.kind()));
            Err(refused)
        }
        "twice" => {
            let first = kind(jobs::complete(id, Outcome::message("first")));
            let second = jobs::complete(id, Outcome::message("second"));
            let status = second.as_ref().err().and_then(|e| e.job_status()).map(|s| format!("{s:?}"));
            log::info(&format!("[hostile] first: {first}; second: {}; status: {status:?}", kind(second)));
            Ok(())
        }
        "other-job" => {
            let other = input(event)?["jobId"].as_str().unwrap_or_default().to_owned();
            let got = jobs::complete(&other, Outcome::message("not mine"));
            log::info(&format!("[hostile] complete other job: {}", kind(got)));
            jobs::complete(id, Outcome::message("tried"))?;
            Ok(())
        }
        "granted" => {
            let report = json!({
                "greeting": config::get("greeting"),
                "missing": config::get("missing"),
                "secret": describe(config::secret("API_KEY")),
                "ungranted": kind(config::secret("OTHER")),
                "unset": kind(config::secret("UNSET")),
                "env": std::env::var("REGION").ok(),
                "envCount": std::env::vars().count(),
                "file": describe(std::fs::read_to_string("/reference/codes.txt")),
                "write": describe(std::fs::write("/reference/new.txt", "x")),
                "outside": describe(std::fs::read_to_string("/etc/hostname")),
            });
            jobs::complete(id, Outcome { outcome: report, info: None })?;
            Ok(())
        }
        "use-secret" => {
            let key = config::secret("API_KEY")?;
            println!("[hostile] printed {key}");
            log::warn(&format!("[hostile] logged {key}"));
            if input(event)?["fail"] == json!(true) {
                return Err(format!("[hostile] failed with {key}").into());
            }
            jobs::complete(id, Outcome::message(format!("used a secret of {} bytes", key.len())))?;
            Ok(())
        }
        other => Err(format!("unknown attack {other}").into()),
    }
}

const ATTACKS: &[&str] = &[
    "hostcall-loop",
    "recurse",
    "log-flood",
    "huge-outcome",
    "split-huge",
    "page-huge",
    "write-huge",
    "retrigger",
    "fanout",
    "create-storm",
    "event-storm",
    "twice",
    "other-job",
    "granted",
    "use-secret",
];

fn listener() -> Listener {
    let mut l = Listener::new().filter(json!({ "job": "space:probe" }), |l| l.on("job:ready", probe));
    for op in ATTACKS {
        l = l.filter(json!({ "job": format!("space:{op}") }), |f| {
            f.on("job:ready", move |event: &Event| attack(event, op))
        });
    }
    l
}

jobhost_plugin_sdk::export!(listener);
