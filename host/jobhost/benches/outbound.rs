//! Outbound HTTP from plugins, each row next to a baseline measured in the same run.
//!
//! `cargo bench -p jobhost --bench outbound` runs full sizes; under `cargo test` a quick smoke
//! checks the answers (nothing about time).
//!
//! Rows:
//! - **get**: N sequential `GET`s of a loopback server from one delivery of the `test-http`
//!   plugin (through `wasi:http` and jobhost's checks: grant, resolve, address, limits,
//!   record), per request; baseline: the same `GET`s from native Rust (reqwest, a new
//!   connection per request as the plugin's are).
//! - **enrich**: the `enrich-emails` example on N records (one `POST` of 1,000 addresses per
//!   part to the example's own Python service); baseline: the seeds' `submit-large-sheet`
//!   plugin on the same records (the same split and paging, no HTTP). A second row times the
//!   service alone (the same requests from native Rust, 16 at once like the plugin's) against
//!   the same baseline, so the two rows' difference is what jobhost adds.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt as _;
use jobhost::model::{JobStatus, JobType, NewJob};
use jobhost::runtime::{Runtime, RuntimeConfig};
use jobhost::{EngineConfig, scenario};
use jobhost_test_plugins as artifacts;
use serde_json::json;

// The same allocator as the `jobhost` binary, so the rows measure what users run.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let (gets, records) = if full { (2_000u32, 100_000u64) } else { (20, 3_000) };
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    println!("jobhost outbound HTTP benchmarks ({} mode)", if full { "full" } else { "quick" });
    println!("{:<58} {:>12} {:>12} {:>8}", "benchmark", "jobhost", "baseline", "ratio");
    rt.block_on(async {
        get(gets).await;
        enrich(records).await;
    });
}

fn row(name: &str, ours: f64, base: f64, unit: &str) {
    println!("{name:<58} {ours:>9.1} {unit:<2} {base:>9.1} {unit:<2} {:>7.2}x", ours / base);
}

async fn loopback() -> u16 {
    let app = axum::Router::new().route("/hello", axum::routing::get(|| async { "hello" }));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move { axum::serve(listener, app).await });
    port
}

/// Loads `component` as `name` with `manifest` beside it.
async fn plugin(
    rt: &Arc<Runtime>,
    dir: &std::path::Path,
    component: &str,
    name: &str,
    manifest: &str,
) -> Arc<jobhost::runtime::Plugin> {
    let path = dir.join(format!("{name}.wasm"));
    std::fs::copy(component, &path).unwrap();
    std::fs::write(dir.join(format!("{name}.toml")), manifest).unwrap();
    Arc::new(rt.load(&path).await.unwrap_or_else(|e| panic!("{e}")))
}

fn runtime() -> Arc<Runtime> {
    Runtime::new(RuntimeConfig { cache_dir: None, ..RuntimeConfig::default() }).unwrap()
}

async fn get(n: u32) {
    let port = loopback().await;
    let url = format!("http://127.0.0.1:{port}/hello");
    // Native: a fresh connection per request, like the plugin's.
    let client = reqwest::Client::builder().pool_max_idle_per_host(0).build().unwrap();
    let start = Instant::now();
    for _ in 0..n {
        let body = client.get(&url).send().await.unwrap().text().await.unwrap();
        assert_eq!(body, "hello");
    }
    let native = start.elapsed();

    let dir = tempfile::tempdir().unwrap();
    let engine = jobhost::open_engine(dir.path(), EngineConfig::default()).unwrap();
    let env = engine.env(engine.create_environment("bench").await.unwrap().id);
    let rt = runtime();
    // Room for the outcome's N results (about 60 bytes each) past the 64 KiB default.
    let manifest = format!(
        "[limits]\nwall_ms = 600000\nhttp_requests = {n}\nmax_outcome_bytes = 1048576\n[grants]\nallowed_outbound_hosts = [\"http://127.0.0.1:{port}\"]\n"
    );
    let http = plugin(&rt, dir.path(), artifacts::TEST_HTTP, "http", &manifest).await;
    let running = engine.run(vec![rt.listener(http, env.id())]).await.unwrap();
    let input = json!({ "requests": [{ "url": url, "repeat": n }] });
    let job = env.create_job(NewJob { input, ..NewJob::new(JobType::Space, "http") }).await.unwrap();
    let job = jobhost_engine::conformance::until_terminal(&env, &job.id).await;
    running.shutdown().await;
    assert_eq!(job.status, JobStatus::Complete, "{job:?}");
    let results = job.outcome["results"].as_array().unwrap();
    assert!(results.len() == n as usize && results.iter().all(|r| r["status"] == 200));
    // The record is written after the delivery returns, so it may trail the job's status.
    let (env2, id) = (env.clone(), job.id.clone());
    let execution = jobhost_engine::conformance::wait_for(&engine, "the delivery's record", move || {
        let (env, id) = (env2.clone(), id.clone());
        async move { Ok(env.executions(Some(&id), 1).await?.into_iter().next()) }
    })
    .await
    .unwrap();
    assert_eq!(execution.http.len(), n as usize);
    let per = |d: Duration| d.as_secs_f64() * 1e6 / f64::from(n);
    row(
        &format!("GET over loopback, {n} in one delivery, per request"),
        execution.duration_us as f64 / f64::from(n),
        per(native),
        "µs",
    );
}

async fn enrich(n: u64) {
    let service =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../plugins/enrich-emails/verify-service.py");
    let mut child = std::process::Command::new("python3")
        .arg(service)
        .arg("0")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("python3 runs the example's service");
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(child.stdout.take().unwrap()), &mut line).unwrap();
    let port: u16 = line.trim().strip_prefix("listening on ").and_then(|p| p.parse().ok()).expect("the port");

    let run = |component: &'static str, name: &'static str, operation: &'static str, manifest: String| async move {
        let dir = tempfile::tempdir().unwrap();
        let engine = jobhost::open_engine(dir.path(), EngineConfig::default()).unwrap();
        let env = engine.env(engine.create_environment("bench").await.unwrap().id);
        let rt = runtime();
        let p = plugin(&rt, dir.path(), component, name, &manifest).await;
        let running = engine.run(vec![rt.listener(p, env.id())]).await.unwrap();
        let sheet = env.create_sheet("people").await.unwrap();
        scenario::insert_sample(&env, &sheet.id, n).await.unwrap();
        let start = Instant::now();
        let job = env.create_job(NewJob::sheet(operation, &sheet.id)).await.unwrap();
        let job = jobhost_engine::conformance::until_terminal(&env, &job.id).await;
        let took = start.elapsed();
        running.shutdown().await;
        assert_eq!(job.status, JobStatus::Complete, "{job:?}");
        // The requests the parts sent: each page's addresses, as the plugin posts them.
        let mut bodies = Vec::new();
        for page in 1..=n.div_ceil(1000) as u32 {
            let records = env.records(&sheet.id, 1000, page).await.unwrap().records;
            let emails: Vec<_> = records.iter().filter_map(|r| r.values.get("email")?.value.as_str()).collect();
            bodies.push(json!({ "emails": emails }).to_string());
        }
        (took, bodies)
    };
    let manifest = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../plugins/enrich-emails/enrich-emails.toml"),
    )
    .unwrap()
    .replace("8787", &port.to_string());
    let (enriched, bodies) = run(artifacts::ENRICH_EMAILS, "enrich-emails", "enrichEmails", manifest).await;
    let (validated, _) =
        run(artifacts::SUBMIT_LARGE_SHEET, "submit-large-sheet", scenario::OPERATION, String::new()).await;
    // The service alone: the same requests from native Rust, as many at once as the plugin may
    // have in flight (`http_in_flight`, 16 by default).
    let client = reqwest::Client::new();
    let url = format!("http://127.0.0.1:{port}/verify");
    let start = Instant::now();
    let answers: Vec<_> = futures_util::stream::iter(bodies.into_iter().map(|body| {
        let (client, url) = (client.clone(), url.clone());
        async move {
            let r = client.post(&url).header("content-type", "application/json").body(body).send().await.unwrap();
            assert_eq!(r.status(), 200);
            r.bytes().await.unwrap()
        }
    }))
    .buffer_unordered(16)
    .collect()
    .await;
    let service = start.elapsed();
    assert_eq!(answers.len() as u64, n.div_ceil(1000));
    let _ = child.kill();
    let _ = child.wait();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    row(&format!("enrich-emails on {n} records (one POST per 1,000)"), ms(enriched), ms(validated), "ms");
    row("  the service alone (same POSTs, native Rust, 16 at once)", ms(service), ms(validated), "ms");
}
