//! A fleet: several `jobhost serve` processes on one PostgreSQL database (a real server,
//! started by the tests), driven only through their HTTP APIs, as operators and clients would.

use std::collections::HashMap;
use std::process::Command;
use std::sync::mpsc::{Receiver, channel};

use serde_json::{Value, json};

use crate::cli::{Reaped, default_environment_token, http, spawn_logged, wait_event};

const PLUGIN: &str = "submit-large-sheet";
const ADMIN: &str = "admin-for-tests";

/// One `jobhost serve` of the fleet, its stderr read on a thread of its own (a host that
/// logs a lot never blocks on a full pipe).
struct Host {
    child: Reaped,
    addr: String,
    lines: Receiver<String>,
    seen: Vec<String>,
}

impl Host {
    fn start(dir: &std::path::Path, name: &str, store: &str) -> Self {
        let plugins = dir.join(format!("{name}-plugins"));
        std::fs::create_dir_all(&plugins).unwrap();
        let (child, lines) = spawn_logged(
            Command::new(env!("CARGO_BIN_EXE_jobhost"))
                .args(["serve", "--plugins", plugins.to_str().unwrap(), "--listen", "127.0.0.1:0"])
                .args(["--data", dir.join(format!("{name}-data")).to_str().unwrap()])
                .args(["--store", store, "--store-connections", "4", "--poll-interval-ms", "200"])
                .args(["--host-timeout-ms", "2000"])
                .env("XDG_CACHE_HOME", dir.join(format!("{name}-cache")))
                .env("JOBHOST_ADMIN_TOKEN", ADMIN),
        );
        let (tx, rx) = channel();
        std::thread::spawn(move || {
            for line in lines.map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        let mut host = Host { child, addr: String::new(), lines: rx, seen: Vec::new() };
        let listening = host.wait_line("listening on http://");
        host.addr = listening.rsplit("http://").next().unwrap().trim().to_owned();
        host.wait_line("serving ");
        host
    }

    /// The next line of its stderr that contains `needle`.
    fn wait_line(&mut self, needle: &str) -> String {
        while let Ok(line) = self.lines.recv() {
            self.seen.push(line.clone());
            if line.contains(needle) {
                return line;
            }
        }
        panic!("the host ended before printing {needle:?}:\n{}", self.seen.join("\n"));
    }

    /// Plugin instances this process ran (its own count, not the fleet's).
    fn instances(&self) -> u64 {
        let metrics = crate::cli::http_get(&self.addr, "/metrics");
        metrics
            .lines()
            .find_map(|l| l.strip_prefix("jobhost_instances_total "))
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or_else(|| panic!("no jobhost_instances_total in {metrics}"))
    }

    fn kill9(&mut self) {
        assert!(Command::new("kill").args(["-KILL", &self.child.id().to_string()]).status().unwrap().success());
        let _ = self.child.wait();
    }
}

/// `PUT /v1/plugins/{name}` with a component's bytes.
fn deploy(addr: &str, token: &str, name: &str, bytes: &[u8]) -> (u16, Value) {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    write!(
        stream,
        "PUT /v1/plugins/{name} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nAuthorization: Bearer {token}\r\n\
         Content-Type: application/wasm\r\nContent-Length: {}\r\n\r\n",
        bytes.len()
    )
    .unwrap();
    stream.write_all(bytes).unwrap();
    let mut out = String::new();
    stream.read_to_string(&mut out).unwrap();
    let status = out[9..12].parse().unwrap();
    (status, out.split_once("\r\n\r\n").and_then(|(_, b)| serde_json::from_str(b).ok()).unwrap_or_default())
}

/// Every event of the environment, paged through with the `since` cursor.
fn all_events(addr: &str, token: &str) -> Vec<Value> {
    let mut out: Vec<Value> = Vec::new();
    let mut since = 0;
    loop {
        let (status, page) = http(addr, "GET", &format!("/v1/events?since={since}&limit=1000"), token, None);
        assert_eq!(status, 200, "{page}");
        let page = page["data"].as_array().unwrap().clone();
        let Some(last) = page.last() else { return out };
        since = last["seq"].as_i64().unwrap();
        out.extend(page);
    }
}

/// Creates a sheet through `at[0]`, fills it with `parts × 1000` sample records through the
/// hosts in turn, and starts the seeds' job through `at[1]`; returns the job id and the
/// number of invalid records the scenario must find.
fn start_scenario(at: &[&str], token: &str, parts: u64) -> (String, u64) {
    let (status, sheet) = http(at[0], "POST", "/v1/sheets", token, Some(&json!({"name": "people"})));
    assert_eq!(status, 201, "{sheet}");
    let sheet_id = sheet["data"]["id"].as_str().unwrap().to_owned();
    let (records, invalid) = jobhost::scenario::sample_records(parts * 1000);
    for (i, chunk) in records.chunks(10_000).enumerate() {
        let addr = at[i % at.len()];
        let body = serde_json::to_value(chunk).unwrap();
        let (status, body) = http(addr, "POST", &format!("/v1/sheets/{sheet_id}/records"), token, Some(&body));
        assert_eq!(status, 201, "{body}");
    }
    let new_job = json!({"type": "sheet", "operation": jobhost::scenario::OPERATION, "source": sheet_id});
    let (status, job) = http(at[1 % at.len()], "POST", "/v1/jobs", token, Some(&new_job));
    assert_eq!(status, 201, "{job}");
    (job["data"]["id"].as_str().unwrap().to_owned(), invalid)
}

/// What the scenario must end as, read through `addr`: the parent complete with every part
/// counted, exactly one `job:parts-completed`, every part ended exactly once, the sheet's
/// error count exact.
fn check_scenario(addr: &str, token: &str, job_id: &str, parts: u64, invalid: u64) {
    let (_, job) = http(addr, "GET", &format!("/v1/jobs/{job_id}"), token, None);
    assert_eq!(job["data"]["status"], "complete", "{job}");
    assert_eq!(job["data"]["outcome"]["parts"]["total"], parts, "{job}");
    let events = all_events(addr, token);
    let parts_completed: Vec<&Value> = events.iter().filter(|e| e["topic"] == "job:parts-completed").collect();
    assert_eq!(parts_completed.len(), 1, "exactly one job:parts-completed: {parts_completed:?}");
    assert_eq!(parts_completed[0]["payload"]["parts"]["total"], parts);
    assert_eq!(parts_completed[0]["payload"]["parts"]["completed"], parts);
    let mut ended: HashMap<&str, u32> = HashMap::new();
    for e in &events {
        if ["job:completed", "job:failed", "job:canceled"].contains(&e["topic"].as_str().unwrap())
            && e["context"]["jobId"] != job_id
        {
            *ended.entry(e["context"]["jobId"].as_str().unwrap()).or_default() += 1;
        }
    }
    assert_eq!(ended.len() as u64, parts, "every part ended");
    assert!(ended.values().all(|n| *n == 1), "no part ended twice: {:?}", ended.iter().find(|(_, n)| **n > 1));
    let sheet_id = job["data"]["source"].as_str().unwrap();
    let (_, counts) = http(addr, "GET", &format!("/v1/sheets/{sheet_id}/counts"), token, None);
    assert_eq!(counts["data"]["error"], invalid, "{counts}");
    assert_eq!(counts["data"]["total"], parts * 1000, "{counts}");
}

/// Three hosts, the plugin deployed once through one of them, the seeds' scenario at 1,000
/// parts through all three: every host handles parts, and the job ends exactly right.
#[test]
fn three_hosts_share_one_database_and_run_the_seeds_scenario_once() {
    const PARTS: u64 = 1000;
    let dir = tempfile::tempdir().unwrap();
    let store = jobhost_test_postgres::server().fresh_database();
    let mut hosts: Vec<Host> = ["a", "b", "c"].iter().map(|n| Host::start(dir.path(), n, &store)).collect();
    let token = default_environment_token(&hosts[0].addr);
    for h in &hosts[1..] {
        // One environment for the fleet: the token made through A works on B and C.
        let (status, body) = http(&h.addr, "GET", "/v1/plugins", &token, None);
        assert_eq!(status, 200, "{body}");
    }
    let bytes = std::fs::read(jobhost_test_plugins::SUBMIT_LARGE_SHEET).unwrap();
    let (status, body) = deploy(&hosts[0].addr, &token, PLUGIN, &bytes);
    assert_eq!(status, 200, "{body}");
    let version = body["data"]["version"].as_str().unwrap().to_owned();
    for h in &mut hosts[1..] {
        let line = h.wait_line(&format!("loaded plugin {PLUGIN} version"));
        assert!(line.contains(&version), "{line}");
    }

    let addrs: Vec<&str> = hosts.iter().map(|h| h.addr.as_str()).collect();
    let (job_id, invalid) = start_scenario(&addrs, &token, PARTS);
    // Created through B, on A's event stream.
    wait_event(&hosts[0].addr, &token, &["\"job:created\"", &format!("\"jobId\":\"{job_id}\"")]);
    wait_event(&hosts[2].addr, &token, &["\"job:completed\"", &format!("\"jobId\":\"{job_id}\""), "\"isPart\":false"]);
    check_scenario(&hosts[1].addr, &token, &job_id, PARTS, invalid);
    for h in &hosts {
        assert!(h.instances() > 0, "host {} handled no delivery", h.addr);
    }
}

/// A host killed with SIGKILL at several points — as the parent is split, with parts in
/// flight, right after the last part ended: the other two take over its leases once its
/// heartbeat stops, and the job ends exactly as without the kill.
#[test]
fn a_host_killed_at_any_point_loses_nothing() {
    const PARTS: u64 = 60;
    for (point, needles) in [
        ("as the parent is split", &["\"job:ready\"", "\"isPart\":false"][..]),
        ("with parts in flight", &["\"job:completed\"", "\"isPart\":true"][..]),
        ("right after the last part ended", &["\"job:parts-completed\""][..]),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let store = jobhost_test_postgres::server().fresh_database();
        let mut hosts: Vec<Host> = ["a", "b", "c"].iter().map(|n| Host::start(dir.path(), n, &store)).collect();
        let token = default_environment_token(&hosts[0].addr);
        let bytes = std::fs::read(jobhost_test_plugins::SUBMIT_LARGE_SHEET).unwrap();
        assert_eq!(deploy(&hosts[1].addr, &token, PLUGIN, &bytes).0, 200);
        for i in [0, 2] {
            hosts[i].wait_line(&format!("loaded plugin {PLUGIN} version"));
        }
        let addrs: Vec<&str> = hosts.iter().map(|h| h.addr.as_str()).collect();
        let (job_id, invalid) = start_scenario(&addrs, &token, PARTS);
        wait_event(&hosts[0].addr, &token, needles);
        hosts[2].kill9();
        wait_event(
            &hosts[0].addr,
            &token,
            &["\"job:completed\"", &format!("\"jobId\":\"{job_id}\""), "\"isPart\":false"],
        );
        eprintln!("killed {point}: the job ended");
        check_scenario(&hosts[1].addr, &token, &job_id, PARTS, invalid);
    }
}

/// A deploy through one host is served by the others; a rollback through another reaches
/// every host; a delete too — each within the fleet's poll interval.
#[test]
fn deploys_rollbacks_and_deletes_reach_every_host() {
    let dir = tempfile::tempdir().unwrap();
    let store = jobhost_test_postgres::server().fresh_database();
    let mut hosts: Vec<Host> = ["a", "b", "c"].iter().map(|n| Host::start(dir.path(), n, &store)).collect();
    let token = default_environment_token(&hosts[0].addr);
    let v1 = std::fs::read(jobhost_test_plugins::TEST_NOOP).unwrap();
    let mut v2 = v1.clone();
    v2.extend_from_slice(&[0, 4, 3, b'a', b'b', b'c']); // a custom section: a new version
    let listed = |h: &Host| -> Vec<Value> {
        let (_, body) = http(&h.addr, "GET", "/v1/plugins", &token, None);
        body["data"].as_array().unwrap().clone()
    };

    let (status, body) = deploy(&hosts[0].addr, &token, "noop", &v1);
    assert_eq!(status, 200, "{body}");
    let ver1 = body["data"]["version"].as_str().unwrap().to_owned();
    let (status, body) = deploy(&hosts[0].addr, &token, "noop", &v2);
    assert_eq!(status, 200, "{body}");
    let ver2 = body["data"]["version"].as_str().unwrap().to_owned();
    for h in &mut hosts[1..] {
        h.wait_line(&format!("loaded plugin noop version {ver2}"));
        assert_eq!(listed(h)[0]["version"], ver2.as_str());
    }

    // A bad component is refused by the host it reaches and never reaches the others.
    let (status, body) = deploy(&hosts[1].addr, &token, "noop", b"not a component");
    assert_eq!(status, 422, "{body}");

    let (status, body) = http(&hosts[2].addr, "POST", "/v1/plugins/noop/rollback", &token, Some(&json!({})));
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["data"]["version"], ver1.as_str());
    for i in [0, 1] {
        // Not the line of the first deploy: the one of the rollback.
        hosts[i].wait_line(&format!("loaded plugin noop version {ver1} (was {ver2})"));
        assert_eq!(listed(&hosts[i])[0]["version"], ver1.as_str());
    }

    let (status, body) = http(&hosts[1].addr, "DELETE", "/v1/plugins/noop", &token, None);
    assert_eq!(status, 200, "{body}");
    for i in [0, 2] {
        hosts[i].wait_line("unloaded plugin noop");
        assert!(listed(&hosts[i]).is_empty());
    }

    // A host that starts later serves what the fleet serves.
    let (status, _) = deploy(&hosts[2].addr, &token, "noop", &v2);
    assert_eq!(status, 200);
    let late = Host::start(dir.path(), "d", &store);
    assert_eq!(listed(&late)[0]["version"], ver2.as_str());
}

/// The database stopped and started again under a running fleet mid-scenario: `/readyz`
/// says so while it is away, the hosts reconnect, and the job ends exactly right.
#[test]
fn the_database_restarted_under_a_running_fleet_costs_time_not_the_job() {
    const PARTS: u64 = 30;
    let dir = tempfile::tempdir().unwrap();
    // A server of its own: the other tests keep theirs running.
    let server = jobhost_test_postgres::Server::start_throwaway().expect("start a server");
    let store = server.fresh_database();
    let mut hosts: Vec<Host> = ["a", "b"].iter().map(|n| Host::start(dir.path(), n, &store)).collect();
    let token = default_environment_token(&hosts[0].addr);
    let bytes = std::fs::read(jobhost_test_plugins::SUBMIT_LARGE_SHEET).unwrap();
    assert_eq!(deploy(&hosts[0].addr, &token, PLUGIN, &bytes).0, 200);
    hosts[1].wait_line(&format!("loaded plugin {PLUGIN} version"));
    let addrs: Vec<&str> = hosts.iter().map(|h| h.addr.as_str()).collect();
    let (job_id, invalid) = start_scenario(&addrs, &token, PARTS);
    wait_event(&hosts[0].addr, &token, &["\"job:completed\"", "\"isPart\":true"]);

    server.stop().expect("stop the database");
    let ready = crate::cli::http_get(&hosts[1].addr, "/readyz");
    assert!(ready.starts_with("HTTP/1.1 503"), "{ready}");
    server.restart().expect("start the database again");

    wait_event(&hosts[1].addr, &token, &["\"job:completed\"", &format!("\"jobId\":\"{job_id}\""), "\"isPart\":false"]);
    check_scenario(&hosts[0].addr, &token, &job_id, PARTS, invalid);
    for h in &hosts {
        let ready = crate::cli::http_get(&h.addr, "/readyz");
        assert!(ready.starts_with("HTTP/1.1 200"), "{ready}");
        let metrics = crate::cli::http_get(&h.addr, "/metrics");
        assert!(metrics.contains("jobhost_store_up 1"), "{metrics}");
        let reconnects: u64 = metrics
            .lines()
            .find_map(|l| l.strip_prefix("jobhost_store_reconnects_total "))
            .and_then(|n| n.trim().parse().ok())
            .unwrap();
        assert!(reconnects >= 1, "{metrics}");
    }
}
