//! The console under a large split: a parent with 10,000 parts.
//!
//! `cargo bench -p jobhost --bench console` runs the full sizes; under `cargo test` a quick
//! smoke (300 parts) checks every row still runs and the grid ends up right (nothing about time).
//!
//! Rows:
//! - **page**: `GET /console/jobs/{parent}` (HTML with the grid's statuses) and
//!   `GET /console/jobs/{parent}/grid` (the statuses the page's script fetches), median and p95
//!   of sequential requests over loopback. Baseline, same run: the API's `GET /v1/jobs/{parent}`
//!   (one job as JSON, the cheapest authenticated read there is).
//! - **live grid**: a real headless Chromium shows the parent while the bench completes its
//!   parts at a steady rate (1,000 a second). Every 200 ms it reads how many parts the page
//!   shows as ended and how many the store has ended; it reports the rate reached, how far the
//!   page was behind (parts and milliseconds at that rate), and how long after the last
//!   completion the grid showed all of them.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use jobhost::api::{ApiState, router, serve};
use jobhost::model::{Ack, JobType, NewJob, Outcome, Split};
use jobhost::{EngineConfig, Env};
use jobhost_test_browser::Locator;

const ADMIN: &str = "bench-admin";

// The same allocator as the `jobhost` binary, so the rows measure what users run.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let (parts, rate, requests) = if full { (10_000u32, 1_000u32, 50) } else { (300, 300, 5) };
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    println!("jobhost console benchmarks ({} mode): a parent with {parts} parts", if full { "full" } else { "quick" });
    rt.block_on(async {
        let s = Setup::start(parts).await;
        pages(&s, requests).await;
        live_grid(&s, parts, rate).await;
    });
}

struct Setup {
    base: String,
    token: String,
    cookie: String,
    env: Env,
    parent: String,
    parts: Vec<String>,
    http: reqwest::Client,
    _dir: tempfile::TempDir,
}

impl Setup {
    async fn start(parts: u32) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let engine = jobhost::open_engine(dir.path(), EngineConfig::single_environment(64)).unwrap();
        let app = router(ApiState { engine: engine.clone(), admin_token: Some(Arc::from(ADMIN)), plugins: None });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(serve(listener, app, std::future::pending()));
        let e = engine.create_environment("bench").await.unwrap();
        let (_, token) = engine.create_token(&e.id, "bench").await.unwrap();
        let env = engine.env(e.id);
        let parent = env.create_job(NewJob::new(JobType::Space, "import")).await.unwrap();
        env.ack(&parent.id, Ack::progress("splitting", 10)).await.unwrap();
        env.split(&parent.id, Split::count(parts)).await.unwrap();
        let parts = env.parts(&parent.id).await.unwrap().into_iter().map(|j| j.id).collect();
        let http = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap();
        let signed =
            http.post(format!("{base}/console/sign-in")).form(&[("token", token.as_str())]).send().await.unwrap();
        assert_eq!(signed.status(), 303);
        let cookie = signed.headers()["set-cookie"].to_str().unwrap().split(';').next().unwrap().to_owned();
        Setup { base, token, cookie, env, parent: parent.id, parts, http, _dir: dir }
    }
}

/// Median and p95 of `n` sequential GETs of `path`, in ms.
async fn time_gets(s: &Setup, path: &str, auth: (&str, String), n: usize) -> (f64, f64, usize) {
    let mut times = Vec::with_capacity(n);
    let mut size = 0;
    for _ in 0..n {
        let start = Instant::now();
        let r = s.http.get(format!("{}{path}", s.base)).header(auth.0, &auth.1).send().await.unwrap();
        assert_eq!(r.status(), 200, "{path}");
        size = r.bytes().await.unwrap().len();
        times.push(start.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(f64::total_cmp);
    (times[n / 2], times[(n * 95 / 100).min(n - 1)], size)
}

async fn pages(s: &Setup, n: usize) {
    let cookie = ("cookie", s.cookie.clone());
    let bearer = ("authorization", format!("Bearer {}", s.token));
    let (api, api95, _) = time_gets(s, &format!("/v1/jobs/{}", s.parent), bearer, n).await;
    let (page, page95, page_size) = time_gets(s, &format!("/console/jobs/{}", s.parent), cookie.clone(), n).await;
    let (grid, grid95, grid_size) = time_gets(s, &format!("/console/jobs/{}/grid", s.parent), cookie, n).await;
    println!("{:<44} {:>10} {:>10} {:>10} {:>8}", "request", "median", "p95", "bytes", "ratio");
    println!("{:<44} {:>7.2} ms {:>7.2} ms {:>10} {:>8}", "GET /v1/jobs/{parent} (baseline)", api, api95, "-", "1.00x");
    let row = |name: &str, m: f64, p: f64, size: usize| {
        println!("{name:<44} {m:>7.2} ms {p:>7.2} ms {size:>10} {:>7.2}x", m / api);
    };
    row("GET /console/jobs/{parent} (page)", page, page95, page_size);
    row("GET /console/jobs/{parent}/grid (statuses)", grid, grid95, grid_size);
}

async fn shown_ended(b: &jobhost_test_browser::Client) -> u64 {
    let text = b.find(Locator::Css("#partcounts [data-count=done]")).await.unwrap().text().await.unwrap();
    text.split_whitespace().next().and_then(|n| n.parse().ok()).unwrap_or(0)
}

async fn live_grid(s: &Setup, parts: u32, rate: u32) {
    let shots = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/console-screenshots");
    let b = jobhost_test_browser::session(&shots).await.unwrap();
    b.goto(&format!("{}/console/sign-in", s.base)).await.unwrap();
    b.find(Locator::Css("input[name=token]")).await.unwrap().send_keys(&s.token).await.unwrap();
    b.find(Locator::Css("form button")).await.unwrap().click().await.unwrap();
    b.wait().for_element(Locator::Css("header.top nav")).await.unwrap();
    b.goto(&format!("{}/console/jobs/{}", s.base, s.parent)).await.unwrap();
    jobhost_test_browser::until("the page to go live", Duration::from_secs(60), || async {
        let live = b.find(Locator::Css(".livestate.on")).await.is_ok();
        Ok(live.then_some(()))
    })
    .await
    .unwrap();
    let cells = b.find_all(Locator::Css("#grid a.cell")).await.unwrap().len();
    assert_eq!(cells, parts as usize, "one cell per part");

    // The driver: `rate` completions a second, in 10 ms ticks.
    let ended = Arc::new(AtomicU64::new(0));
    let driver = {
        let (env, ids, ended) = (s.env.clone(), s.parts.clone(), ended.clone());
        tokio::spawn(async move {
            let per_tick = (rate / 100).max(1) as usize;
            let mut tick = tokio::time::interval(Duration::from_millis(10));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            let start = Instant::now();
            for chunk in ids.chunks(per_tick) {
                tick.tick().await;
                let done =
                    futures_util::future::join_all(chunk.iter().map(|id| env.complete(id, Outcome::message("done"))))
                        .await;
                for d in done {
                    d.unwrap();
                }
                ended.fetch_add(chunk.len() as u64, Ordering::SeqCst);
            }
            start.elapsed()
        })
    };
    // The sampler: how far behind the store the page is.
    let mut behind = Vec::new();
    let mut sample = tokio::time::interval(Duration::from_millis(200));
    while !driver.is_finished() {
        sample.tick().await;
        let store = ended.load(Ordering::SeqCst);
        let shown = shown_ended(&b).await;
        behind.push(store.saturating_sub(shown));
    }
    let took = driver.await.unwrap();
    let last = Instant::now();
    jobhost_test_browser::until("the grid to show every part ended", Duration::from_secs(120), || async {
        Ok((shown_ended(&b).await == u64::from(parts)).then_some(()))
    })
    .await
    .unwrap();
    let catch_up = last.elapsed();
    let complete = b.find_all(Locator::Css("#grid a.cell.s-complete")).await.unwrap().len();
    assert_eq!(complete, parts as usize, "every cell shows its part complete");
    b.close().await.unwrap();
    let reached = f64::from(parts) / took.as_secs_f64();
    behind.sort_unstable();
    let median = behind.get(behind.len() / 2).copied().unwrap_or(0);
    let max = behind.last().copied().unwrap_or(0);
    let ms = |n: u64| n as f64 / reached * 1e3;
    println!(
        "live grid: {parts} parts completed at {reached:.0}/s (asked {rate}/s) in {:.1} s; page behind the store: \
         median {median} parts ({:.0} ms), max {max} parts ({:.0} ms) over {} samples; all shown {:.0} ms after the last",
        took.as_secs_f64(),
        ms(median),
        ms(max),
        behind.len(),
        catch_up.as_secs_f64() * 1e3
    );
}
