//! A test plugin that probes the sandbox from inside and reports what it got, as the outcome
//! of a `space:probe` job: reading a file, the environment variables and arguments, opening a
//! socket, and reaching the job and sheet named in the job's input (ids of another
//! environment, guessed or leaked).

use jobhost_plugin_sdk::jobs::{self, Outcome};
use jobhost_plugin_sdk::{Event, Listener, Result, Value, json, records};

fn describe<T: std::fmt::Debug, E: std::fmt::Display>(r: std::result::Result<T, E>) -> Value {
    match r {
        Ok(v) => json!({ "ok": format!("{v:?}") }),
        Err(e) => json!({ "err": e.to_string() }),
    }
}

fn listener() -> Listener {
    Listener::new().filter(json!({ "job": "space:probe" }), |l| {
        l.on("job:ready", |event: &Event| -> Result<()> {
            let id = event.job_id()?;
            let input = jobs::get(id)?.input()?;
            let foreign_job = input["jobId"].as_str().unwrap_or("job_unknown");
            let foreign_sheet = input["sheetId"].as_str().unwrap_or("sh_unknown");
            let kind = |e: jobhost_plugin_sdk::Error| format!("{:?}", e.kind());
            let report = json!({
                "file": describe(std::fs::read_to_string("/etc/hostname")),
                "dir": describe(std::fs::read_dir(".").map(|d| d.count())),
                "env": std::env::vars().count(),
                "args": std::env::args().count(),
                "socket": describe(std::net::TcpStream::connect("127.0.0.1:9")),
                "foreignGet": jobs::get(foreign_job).map(|_| "found".to_owned()).unwrap_or_else(kind),
                "foreignComplete": jobs::complete(foreign_job, Outcome::message("hijacked")).map(|_| "completed".to_owned()).unwrap_or_else(kind),
                "foreignCounts": records::counts(foreign_sheet).map(|c| c.total.to_string()).unwrap_or_else(kind),
                "foreignPage": records::page(foreign_sheet, 10, 1).map(|p| p.len().to_string()).unwrap_or_else(kind),
            });
            jobs::complete(id, Outcome { outcome: report, info: None })?;
            Ok(())
        })
    })
}

jobhost_plugin_sdk::export!(listener);
