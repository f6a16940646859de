//! Crash rounds: `jobhost serve` killed with SIGKILL at random moments, restarted on the same
//! data, and checked after every round.
//!
//! `cargo bench -p jobhost --bench soak` runs 20 rounds of the seeds' scenario at 1,000 parts
//! (1,000,000 records) through the WASM plugin; under `cargo test` it runs 3 rounds at 100
//! parts. `JOBHOST_SOAK_ROUNDS`, `JOBHOST_SOAK_PARTS` and `JOBHOST_SOAK_SEED` change that; the
//! seed is printed, so a failing round can be run again.
//!
//! Every round, on one data directory that lives through all of them:
//! 1. **import**: a new sheet, filled by `jobhost records import` from a CSV file; in every
//!    other round the host is killed while the import runs, restarted, and the import goes on
//!    with `--resume`. The sheet must then hold exactly the file's records, in order.
//! 2. **deploy** (every third round): a plugin deployed over the API while the host is killed.
//!    After the restart the plugin serves: the new version if the deploy was answered, the
//!    old or the new one if not — never neither.
//! 3. **reload** (every third round, another one): a plugin file replaced in the plugins
//!    directory, the host killed while it reloads; after the restart that file's version serves.
//! 4. **scenario**: the parent job created over the API and the host killed at a random moment
//!    of its run (up to its measured length), restarted, and the job followed to its end.
//!
//! Then, over every parent so far: exactly one `job:parts-completed` each; every part
//! complete, with exactly one `job:completed`; the parent's outcome counting exactly the
//! invalid records; no delivery left pending or leased and every dead letter with its reason;
//! and SQLite's `integrity_check` clean. Figures: the kill points hit, the time from a restart
//! to serving and to the killed job's end.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

#[path = "support/serve.rs"]
mod support;
use support::Serve as Host;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The longest anything here waits for the host.
const DEADLINE: Duration = Duration::from_secs(900);

/// A small deterministic generator (xorshift64*): the seed reproduces a run's kill moments.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in `0..=max`.
    fn upto(&mut self, max: Duration) -> Duration {
        Duration::from_micros(self.next() % (max.as_micros() as u64 + 1))
    }
}

struct Soak {
    dir: PathBuf,
    http: reqwest::Client,
    rng: Rng,
    token: String,
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let rounds: u32 = env_or("JOBHOST_SOAK_ROUNDS", if full { 20 } else { 3 });
    let parts: u64 = env_or("JOBHOST_SOAK_PARTS", if full { 1000 } else { 100 });
    let seed: u64 = env_or(
        "JOBHOST_SOAK_SEED",
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64 | 1,
    );
    println!("jobhost crash rounds: {rounds} rounds, {parts} parts each, seed {seed} (JOBHOST_SOAK_SEED)");
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    rt.block_on(run(rounds, parts, seed));
}

/// Starts `jobhost serve` on the soak's directories (`soak-data`, `soak-plugins`, kept across
/// restarts); returns it and how long it took to serve.
fn start(dir: &Path) -> (Host, Duration) {
    let started = Instant::now();
    let host = support::serve(dir, "soak", &["--concurrency", "8"]);
    (host, started.elapsed())
}

impl Soak {
    fn url(&self, host: &Host, path: &str) -> String {
        format!("http://{}{path}", host.addr)
    }

    async fn call(&self, host: &Host, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        let mut req = self.http.request(method, self.url(host, path)).bearer_auth(&self.token);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.unwrap_or_else(|e| panic!("{path}: {e}"));
        let status = resp.status();
        let body: Value = resp.json().await.unwrap_or(Value::Null);
        assert!(status.is_success(), "{path}: {status} {body}");
        body["data"].clone()
    }

    async fn get(&self, host: &Host, path: &str) -> Value {
        self.call(host, reqwest::Method::GET, path, None).await
    }

    /// Every event with `topic`, across pages.
    async fn events(&self, host: &Host, topic: &str) -> Vec<Value> {
        let (mut since, mut all) = (0i64, Vec::new());
        loop {
            let page = self.get(host, &format!("/v1/events?since={since}&limit=1000&topic={topic}")).await;
            let page = page.as_array().cloned().unwrap_or_default();
            let Some(last) = page.last() else { return all };
            since = last["seq"].as_i64().unwrap();
            all.extend(page);
        }
    }

    /// `jobhost records import` of `file` into `sheet`, as a child process.
    fn import(&self, host: &Host, file: &Path, sheet: &str, resume: bool) -> Child {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_jobhost"));
        cmd.args(["records", "import"]).arg(file).args(["--sheet", sheet, "--batch", "5000", "--json"]);
        if resume {
            cmd.arg("--resume");
        }
        cmd.env("JOBHOST_URL", format!("http://{}", host.addr))
            .env("JOBHOST_TOKEN", &self.token)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run jobhost records import")
    }
}

/// Writes the first `n` sample records as JSON lines; returns the file, how many break a
/// rule, and each record's `email` in file order (what the sheet's order is checked against).
fn write_records(dir: &Path, n: u64) -> (PathBuf, u64, Vec<Value>) {
    let path = dir.join("records.jsonl");
    let mut out = std::io::BufWriter::new(std::fs::File::create(&path).unwrap());
    let (rows, invalid) = jobhost::scenario::sample_records(n);
    let mut emails = Vec::new();
    for row in rows {
        emails.push(row.values.get("email").cloned().unwrap_or(Value::Null));
        serde_json::to_writer(&mut out, &row.values).unwrap();
        out.write_all(b"\n").unwrap();
    }
    out.flush().unwrap();
    (path, invalid, emails)
}

#[derive(Default)]
struct Figures {
    kills: HashMap<&'static str, u32>,
    to_serving: Vec<Duration>,
    to_end: Vec<Duration>,
}

async fn run(rounds: u32, parts: u64, seed: u64) {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path().to_owned();
    std::fs::create_dir_all(dir.join("soak-plugins")).unwrap();
    std::fs::copy(jobhost_test_plugins::SUBMIT_LARGE_SHEET, dir.join("soak-plugins/submit-large-sheet.wasm")).unwrap();
    let n = parts * 1000;
    let (file, invalid, emails) = write_records(&dir, n);
    let (mut host, _) = start(&dir);
    let http = reqwest::Client::new();
    let (_, token) = support::environment_token(&http, &host.addr).await;
    let mut soak = Soak { dir: dir.clone(), http, rng: Rng(seed), token };
    let mut figures = Figures::default();
    let mut parents: Vec<String> = Vec::new();
    let mut deployed: Option<String> = None;
    let mut reload_version = 0u32;

    // Round 0 is not killed: it measures how long an import and a scenario take here.
    let (import_time, scenario_time) = {
        let sheet = soak.call(&host, reqwest::Method::POST, "/v1/sheets", Some(json!({"name": "round-0"}))).await;
        let sheet = sheet["id"].as_str().unwrap().to_owned();
        let t = Instant::now();
        let out = soak.import(&host, &file, &sheet, false).wait_with_output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let import_time = t.elapsed();
        let t = Instant::now();
        let parent = create_parent(&soak, &host, &sheet).await;
        wait_end(&soak, &host, &parent).await;
        parents.push(parent);
        (import_time, t.elapsed())
    };
    println!(
        "round 0 (no kill): import {:.2} s, scenario {:.2} s",
        import_time.as_secs_f64(),
        scenario_time.as_secs_f64()
    );

    for round in 1..=rounds {
        let sheet = soak
            .call(&host, reqwest::Method::POST, "/v1/sheets", Some(json!({"name": format!("round-{round}")})))
            .await;
        let sheet = sheet["id"].as_str().unwrap().to_owned();
        let mut notes = Vec::new();

        // 1. Import, killed in every other round.
        let import = soak.import(&host, &file, &sheet, false);
        if round % 2 == 1 {
            tokio::time::sleep(soak.rng.upto(import_time)).await;
            drop(host);
            let failed = import.wait_with_output().unwrap();
            *figures
                .kills
                .entry(if failed.status.success() { "import (after it ended)" } else { "import" })
                .or_default() += 1;
            let (h, t) = start(&dir);
            host = h;
            figures.to_serving.push(t);
            let out = soak.import(&host, &file, &sheet, true).wait_with_output().unwrap();
            assert!(out.status.success(), "the resumed import: {}", String::from_utf8_lossy(&out.stderr));
            notes.push("import killed");
        } else {
            let out = import.wait_with_output().unwrap();
            assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        }
        check_sheet(&soak, &host, &sheet, &emails).await;

        // 2. A deploy, killed.
        if round % 3 == 1 {
            let bytes = std::fs::read(if round.is_multiple_of(2) {
                jobhost_test_plugins::TEST_NOOP
            } else {
                jobhost_test_plugins::TEST_MISBEHAVE
            })
            .unwrap();
            let put = soak
                .http
                .put(soak.url(&host, "/v1/plugins/extra"))
                .bearer_auth(&soak.token)
                .header("content-type", "application/wasm")
                .body(bytes);
            let answered = tokio::spawn(async move {
                put.send().await.ok().filter(|r| r.status().is_success())?.json::<Value>().await.ok()
            });
            tokio::time::sleep(soak.rng.upto(Duration::from_millis(40))).await;
            drop(host);
            let answered =
                answered.await.unwrap().map(|v| v["data"]["version"].as_str().unwrap_or_default().to_owned());
            *figures
                .kills
                .entry(if answered.is_some() { "deploy (answered)" } else { "deploy (unanswered)" })
                .or_default() += 1;
            let (h, t) = start(&dir);
            host = h;
            figures.to_serving.push(t);
            let plugins = soak.get(&host, "/v1/plugins").await;
            let serving = plugins
                .as_array()
                .unwrap()
                .iter()
                .find(|p| p["name"] == "extra")
                .map(|p| p["version"].as_str().unwrap().to_owned());
            match (&answered, &deployed, &serving) {
                (Some(new), _, Some(s)) => assert_eq!(s, new, "an answered deploy serves after the restart"),
                (None, Some(_), Some(_)) | (None, None, _) => {}
                (_, _, None) => {
                    panic!("round {round}: neither the old nor the new version of `extra` serves: {plugins}")
                }
            }
            deployed = serving.or(deployed);
            notes.push("deploy killed");
        }

        // 3. A hot reload, killed.
        if round % 3 == 2 {
            reload_version += 1;
            let source = if reload_version.is_multiple_of(2) {
                jobhost_test_plugins::TEST_NOOP
            } else {
                jobhost_test_plugins::TEST_MISBEHAVE
            };
            let tmp = dir.join("reloaded.wasm.tmp");
            std::fs::copy(source, &tmp).unwrap();
            std::fs::rename(&tmp, dir.join("soak-plugins/reloaded.wasm")).unwrap();
            tokio::time::sleep(soak.rng.upto(Duration::from_millis(300))).await;
            drop(host);
            *figures.kills.entry("reload").or_default() += 1;
            let (h, t) = start(&dir);
            host = h;
            figures.to_serving.push(t);
            let plugins = soak.get(&host, "/v1/plugins").await;
            assert!(
                plugins.as_array().unwrap().iter().any(|p| p["name"] == "reloaded" && p["version"].is_string()),
                "round {round}: the reloaded plugin serves after the restart: {plugins}"
            );
            notes.push("reload killed");
        }

        // 4. The scenario, killed at a random moment of its run.
        let parent = create_parent(&soak, &host, &sheet).await;
        parents.push(parent.clone());
        tokio::time::sleep(soak.rng.upto(scenario_time)).await;
        let status =
            soak.get(&host, &format!("/v1/jobs/{parent}")).await["status"].as_str().unwrap_or_default().to_owned();
        drop(host);
        *figures
            .kills
            .entry(if status == "complete" { "scenario (after it ended)" } else { "scenario" })
            .or_default() += 1;
        let restarted = Instant::now();
        let (h, t) = start(&dir);
        host = h;
        figures.to_serving.push(t);
        wait_end(&soak, &host, &parent).await;
        let to_end = restarted.elapsed();
        figures.to_end.push(to_end);
        notes.push("scenario killed");

        check(&soak, &host, &parents, parts, invalid).await;
        println!(
            "round {round}: {}; killed the scenario at status {status}; restart to serving {:.2} s, to the job's end {:.2} s; checks passed",
            notes.join(", "),
            t.as_secs_f64(),
            to_end.as_secs_f64()
        );
    }
    drop(host);
    let stats = |d: &[Duration]| {
        let mut v: Vec<f64> = d.iter().map(Duration::as_secs_f64).collect();
        v.sort_by(f64::total_cmp);
        (v.get(v.len() / 2).copied().unwrap_or_default(), v.last().copied().unwrap_or_default())
    };
    let (s_med, s_max) = stats(&figures.to_serving);
    let (e_med, e_max) = stats(&figures.to_end);
    let mut kills: Vec<_> = figures.kills.into_iter().collect();
    kills.sort();
    println!("kill points hit: {kills:?}");
    println!("restart to serving: median {s_med:.2} s, max {s_max:.2} s ({} restarts)", figures.to_serving.len());
    println!(
        "restart to the killed job's end: median {e_med:.2} s, max {e_max:.2} s (an uninterrupted scenario: {:.2} s)",
        scenario_time.as_secs_f64()
    );
    let _ = std::fs::remove_dir_all(&soak.dir);
}

async fn create_parent(soak: &Soak, host: &Host, sheet: &str) -> String {
    let job = json!({"type": "sheet", "operation": "submitLargeSheet", "source": sheet});
    let job = soak.call(host, reqwest::Method::POST, "/v1/jobs", Some(job)).await;
    job["id"].as_str().unwrap().to_owned()
}

/// Waits (polling; this is a soak, not a test of timing) until `job` is terminal.
async fn wait_end(soak: &Soak, host: &Host, job: &str) -> Value {
    let started = Instant::now();
    loop {
        let j = soak.get(host, &format!("/v1/jobs/{job}")).await;
        if ["complete", "failed", "canceled"].contains(&j["status"].as_str().unwrap_or_default()) {
            return j;
        }
        assert!(started.elapsed() < DEADLINE, "job {job} did not end within {DEADLINE:?}: {j}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The sheet holds exactly the file's records, in the file's order.
async fn check_sheet(soak: &Soak, host: &Host, sheet: &str, emails: &[Value]) {
    let counts = soak.get(host, &format!("/v1/sheets/{sheet}/counts")).await;
    assert_eq!(counts["total"].as_u64(), Some(emails.len() as u64), "no record lost or doubled: {counts}");
    for page in [1, emails.len().div_ceil(1000)] {
        let got = soak.get(host, &format!("/v1/sheets/{sheet}/records?pageSize=1000&pageNumber={page}")).await;
        let records = got["records"].as_array().unwrap();
        for (i, r) in records.iter().enumerate() {
            let email = r["values"].get("email").map_or(Value::Null, |c| c["value"].clone());
            assert_eq!(email, emails[(page - 1) * 1000 + i], "record {} of page {page} is in the file's place", i + 1);
        }
    }
}

/// The invariants over every parent so far.
async fn check(soak: &Soak, host: &Host, parents: &[String], parts: u64, invalid: u64) {
    let mut per_parent: HashMap<String, u32> = HashMap::new();
    for e in soak.events(host, "job:parts-completed").await {
        *per_parent.entry(e["context"]["jobId"].as_str().unwrap().to_owned()).or_default() += 1;
    }
    let mut completed: HashMap<String, u32> = HashMap::new();
    for e in soak.events(host, "job:completed").await {
        *completed.entry(e["context"]["jobId"].as_str().unwrap().to_owned()).or_default() += 1;
    }
    for parent in parents {
        assert_eq!(per_parent.get(parent), Some(&1), "exactly one job:parts-completed for {parent}");
        let job = soak.get(host, &format!("/v1/jobs/{parent}")).await;
        assert_eq!(job["status"], "complete", "{job}");
        assert_eq!(job["outcome"]["parts"]["completed"].as_u64(), Some(parts), "{job}");
        assert_eq!(job["outcome"]["records"]["error"].as_u64(), Some(invalid), "the error count is exact: {job}");
        let mut listed = Vec::new();
        for page in 1.. {
            let got = soak.get(host, &format!("/v1/jobs?parentId={parent}&pageSize=500&pageNumber={page}")).await;
            let got = got.as_array().cloned().unwrap_or_default();
            let last = got.len() < 500;
            listed.extend(got);
            if last {
                break;
            }
        }
        assert_eq!(listed.len() as u64, parts);
        for part in &listed {
            let id = part["id"].as_str().unwrap();
            assert_eq!(part["status"], "complete", "{part}");
            assert_eq!(completed.get(id), Some(&1), "part {id} ended once");
        }
    }
    // No delivery is left open once the jobs ended (the last ones finish just after).
    let started = Instant::now();
    loop {
        let metrics = soak.http.get(soak.url(host, "/metrics")).send().await.unwrap().text().await.unwrap();
        let open: u64 = metrics
            .lines()
            .filter(|l| {
                l.starts_with("jobhost_deliveries{status=\"pending\"}")
                    || l.starts_with("jobhost_deliveries{status=\"leased\"}")
            })
            .filter_map(|l| l.split(' ').nth(1)?.parse::<u64>().ok())
            .sum();
        if open == 0 {
            break;
        }
        assert!(started.elapsed() < DEADLINE, "{open} deliveries still open:\n{metrics}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for dead in soak.get(host, "/v1/dead-letters").await.as_array().unwrap() {
        assert!(!dead["lastError"].as_str().unwrap_or_default().is_empty(), "a dead letter says why: {dead}");
    }
    let db = soak.dir.join("soak-data/jobhost.db");
    let conn = rusqlite::Connection::open_with_flags(&db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY).unwrap();
    let check: String = conn.query_row("PRAGMA integrity_check", [], |r| r.get(0)).unwrap();
    assert_eq!(check, "ok", "SQLite's integrity check");
}
