//! HTTP API benchmarks over loopback, each next to the same work done in-process (no HTTP)
//! in the same run — the ratio is what HTTP, JSON and authentication cost.
//!
//! `cargo bench -p jobhost --bench api` runs the full sizes; under `cargo test` a quick smoke
//! checks every row still runs and gets the right answers (nothing about time).
//!
//! Rows:
//! - **get job**: `GET /v1/jobs/{id}` from 32 concurrent keep-alive clients. Baseline:
//!   `Env::job` from 32 tasks.
//! - **records page**: `GET /v1/sheets/{id}/records?pageSize=1000` (10-field records) from 8
//!   clients. Baseline: `Env::records` for the same pages, encoded. A second line shows the
//!   route's own in-process work, `Env::records_json`, against the same baseline.
//! - **import**: N records uploaded as `POST /v1/sheets/{id}/records` pages of 10,000 from 4
//!   clients; and the same N from a JSON-lines file through `jobhost records import`'s code
//!   (check the file, then ordered batches, one in flight). Baseline: one in-process
//!   `insert_records` of the same N.

use std::sync::Arc;
use std::time::Instant;

use jobhost::api::{ApiState, router, serve};
use jobhost::model::{JobType, NewJob};
use jobhost::{EngineConfig, Env, scenario};

const ADMIN: &str = "bench-admin";

struct Sizes {
    gets: usize,
    pages: usize,
    records: u64,
}

// The same allocator as the `jobhost` binary, so the rows measure what users run.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let sizes = if full {
        Sizes { gets: 50_000, pages: 400, records: 1_000_000 }
    } else {
        Sizes { gets: 200, pages: 4, records: 20_000 }
    };
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    println!("jobhost API benchmarks ({} mode)", if full { "full" } else { "quick" });
    println!("{:<64} {:>14} {:>14} {:>8}", "benchmark", "over HTTP", "in-process", "ratio");
    rt.block_on(async {
        let wants = |row: &str| {
            let rows = ["get", "page", "import"];
            std::env::args().any(|a| a == row) || !std::env::args().any(|a| rows.contains(&a.as_str()))
        };
        let server = Server::start().await;
        if wants("get") {
            get_job(&server, sizes.gets).await;
        }
        if wants("page") {
            records_page(&server, sizes.pages).await;
        }
        if wants("import") {
            import(&server, sizes.records).await;
        }
    });
}

fn row(name: &str, http: f64, base: f64, unit: &str) {
    println!("{name:<64} {http:>10.0} {unit:<3} {base:>10.0} {unit:<3} {:>7.2}x", http / base);
}

struct Server {
    base: String,
    token: String,
    env: Env,
    http: reqwest::Client,
    _dir: tempfile::TempDir,
}

impl Server {
    async fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let engine = jobhost::open_engine(dir.path(), EngineConfig::single_environment(64)).unwrap();
        let app = router(ApiState { engine: engine.clone(), admin_token: Some(Arc::from(ADMIN)), plugins: None });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(serve(listener, app, std::future::pending()));
        let env = engine.create_environment("bench").await.unwrap();
        let (_, token) = engine.create_token(&env.id, "bench").await.unwrap();
        Self { base, token, env: engine.env(env.id), http: reqwest::Client::new(), _dir: dir }
    }
}

/// Runs `n` calls of `call` spread over `clients` concurrent tasks; returns calls per second.
async fn rate<F, Fut>(n: usize, clients: usize, call: F) -> f64
where
    F: Fn() -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let t = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for c in 0..clients {
        let call = call.clone();
        let mine = n / clients + usize::from(c < n % clients);
        tasks.spawn(async move {
            for _ in 0..mine {
                call().await;
            }
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.unwrap();
    }
    n as f64 / t.elapsed().as_secs_f64()
}

async fn get_job(s: &Server, n: usize) {
    let job = s.env.create_job(NewJob::new(JobType::Space, "bench")).await.unwrap();
    let (http, url, token) = (s.http.clone(), format!("{}/v1/jobs/{}", s.base, job.id), s.token.clone());
    let over_http = rate(n, 32, move || {
        let (http, url, token) = (http.clone(), url.clone(), token.clone());
        async move {
            let resp = http.get(&url).bearer_auth(&token).send().await.unwrap();
            assert_eq!(resp.status(), 200);
            let body: serde_json::Value = resp.json().await.unwrap();
            assert_eq!(body["data"]["status"], "ready");
        }
    })
    .await;
    let (env, id) = (s.env.clone(), job.id.clone());
    let direct = rate(n, 32, move || {
        let (env, id) = (env.clone(), id.clone());
        async move {
            let job = env.job(&id).await.unwrap();
            assert_eq!(job.status, jobhost::model::JobStatus::Ready);
            std::hint::black_box(serde_json::to_vec(&job).unwrap());
        }
    })
    .await;
    row("GET /v1/jobs/{id}, 32 clients (requests/s)", over_http, direct, "/s");
}

#[derive(serde::Deserialize)]
struct Data<T> {
    data: T,
}

#[derive(serde::Deserialize)]
struct PageOf {
    records: Vec<serde::de::IgnoredAny>,
}

async fn records_page(s: &Server, n: usize) {
    let sheet = s.env.create_sheet("paged").await.unwrap();
    s.env.insert_records(&sheet.id, scenario::sample_records(10_000).0).await.unwrap();
    let base = format!("{}/v1/sheets/{}/records?pageSize=1000&pageNumber=", s.base, sheet.id);
    let counter = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    // One `GET` of the next of the ten pages: its body.
    let get = {
        let (http, token, c) = (s.http.clone(), s.token.clone(), counter.clone());
        move || {
            let (http, token, base, c) = (http.clone(), token.clone(), base.clone(), c.clone());
            async move {
                let page = c.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % 10 + 1;
                let resp = http.get(format!("{base}{page}")).bearer_auth(&token).send().await.unwrap();
                assert_eq!(resp.status(), 200);
                resp.bytes().await.unwrap()
            }
        }
    };
    let g = get.clone();
    let over_http = rate(n, 8, move || {
        let g = g.clone();
        async move {
            let body: serde_json::Value = serde_json::from_slice(&g().await).unwrap();
            assert_eq!(body["data"]["records"].as_array().unwrap().len(), 1000);
        }
    })
    .await;
    // The same requests from a client that checks the whole body is JSON and counts the
    // records without building them: the client's own parse (a tree of ~60,000 JSON values a
    // page, on the same two cores) is most of the row above.
    let light = rate(n, 8, move || {
        let get = get.clone();
        async move {
            let body: Data<PageOf> = serde_json::from_slice(&get().await).unwrap();
            assert_eq!(body.data.records.len(), 1000);
        }
    })
    .await;
    let (env, id, c) = (s.env.clone(), sheet.id.clone(), counter.clone());
    let direct = rate(n, 8, move || {
        let (env, id, c) = (env.clone(), id.clone(), c.clone());
        async move {
            let page = (c.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % 10 + 1) as u32;
            let p = env.records(&id, 1000, page).await.unwrap();
            assert_eq!(p.records.len(), 1000);
            std::hint::black_box(serde_json::to_vec(&p).unwrap());
        }
    })
    .await;
    row("GET …/records, 1,000 records per page, 8 clients (pages/s)", over_http, direct, "/s");
    row("  the same, a client that checks and counts without building values", light, direct, "/s");
    // What the route itself does in-process: the page's JSON written straight from the rows.
    let (env, id, c) = (s.env.clone(), sheet.id.clone(), counter.clone());
    let json = rate(n, 8, move || {
        let (env, id, c) = (env.clone(), id.clone(), c.clone());
        async move {
            let page = (c.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % 10 + 1) as u32;
            let mut out = Vec::new();
            env.records_json(&id, 1000, page, &mut out).await.unwrap();
            assert!(out.len() > 1000 * 10);
            std::hint::black_box(out);
        }
    })
    .await;
    row("  in-process: Env::records_json (the route's own work) vs Env::records + encode", json, direct, "/s");
}

async fn import(s: &Server, n: u64) {
    let (records, _) = scenario::sample_records(n);
    let pages: Vec<String> = records.chunks(10_000).map(|c| serde_json::to_string(c).unwrap()).collect();
    let file = s._dir.path().join("import.jsonl");
    let mut text = String::new();
    for r in &records {
        text.push_str(&serde_json::to_string(&r.values).unwrap());
        text.push('\n');
    }
    std::fs::write(&file, text).unwrap();
    let sheet = s.env.create_sheet("imported").await.unwrap();
    let url = format!("{}/v1/sheets/{}/records", s.base, sheet.id);
    let t = Instant::now();
    let pages = Arc::new(std::sync::Mutex::new(pages));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..4 {
        let (http, token, url, pages) = (s.http.clone(), s.token.clone(), url.clone(), pages.clone());
        tasks.spawn(async move {
            loop {
                let Some(body) = pages.lock().unwrap().pop() else { return };
                let resp = http
                    .post(&url)
                    .bearer_auth(&token)
                    .header("content-type", "application/json")
                    .body(body)
                    .send()
                    .await
                    .unwrap();
                assert_eq!(resp.status(), 201);
            }
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.unwrap();
    }
    let over_http = n as f64 / t.elapsed().as_secs_f64();
    assert_eq!(s.env.record_counts(&sheet.id).await.unwrap().total, n);
    let direct_sheet = s.env.create_sheet("direct").await.unwrap();
    let t = Instant::now();
    s.env.insert_records(&direct_sheet.id, records).await.unwrap();
    let direct = n as f64 / t.elapsed().as_secs_f64();
    row(&format!("import {n} records, pages of 10,000, 4 clients (records/s)"), over_http, direct, "/s");

    // What an operator runs: `jobhost records import FILE.jsonl` — check the whole file, then
    // send it in order, one batch at a time.
    let cli_sheet = s.env.create_sheet("cli").await.unwrap();
    let client = jobhost::client::Client::new(&s.base, Some(s.token.clone())).unwrap();
    let t = Instant::now();
    let checked = jobhost::cli::records_file::check_records(&file).unwrap();
    let (sent, _) = jobhost::cli::remote::import(&client, &file, &cli_sheet.id, 10_000, 0, checked, false)
        .await
        .map_err(|s| s.error)
        .unwrap();
    let over_cli = n as f64 / t.elapsed().as_secs_f64();
    assert_eq!((checked, sent), (n, n));
    assert_eq!(s.env.record_counts(&cli_sheet.id).await.unwrap().total, n);
    row(&format!("`jobhost records import` of {n} records, in file order (records/s)"), over_cli, direct, "/s");
}
