//! The seeds' scenario as users run it, against the in-process benchmark in the same run:
//! `cargo bench -p jobhost --bench serve` (full sizes) or `cargo test -p jobhost --bench serve`
//! (a quick smoke run that checks the answers, nothing about time).
//!
//! - **scenario through `jobhost serve`**: a `jobhost serve` process on SQLite (its defaults:
//!   `--concurrency 64`), the `submit-large-sheet` plugin in its plugins directory; the
//!   records imported over the API (pages of 10,000, not timed), the job created with
//!   `POST /v1/jobs`, and the time until the parent's `job:completed` arrives on
//!   `/v1/events/stream`. The same with `--concurrency 256`, the in-process host's cap.
//!   Baseline: the in-process scenario of `--bench runtime -- scenario` (engine and runtime
//!   in the benchmark's process, completion seen by the engine's wait), alternating rounds.
//! - **peer**: the same `serve` run with the WASM plugin against a `serve` without plugins
//!   driven by `peer/flatfile-style-listener.mjs` — a Node.js process that follows the event
//!   stream and does every step over the REST API, as Flatfile users' listeners do —
//!   alternating rounds; both checked the same way. Needs Node.js (`node`).

use std::time::{Duration, Instant};

use jobhost::scenario;
use jobhost_test_plugins as artifacts;
use serde_json::{Value, json};

#[path = "support/inprocess.rs"]
mod inprocess;
#[path = "support/serve.rs"]
mod support;
use support::{answer, environment_token, serve};

/// No single wait of the benchmark takes longer; a stuck run fails instead of hanging.
const DEADLINE: Duration = Duration::from_secs(600);

// The same allocator as the `jobhost` binary, so the rows measure what users run.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let only = |name: &str| {
        let named: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with('-')).collect();
        named.is_empty() || named.iter().any(|a| a == name)
    };
    let (sizes, rounds): (&[u64], usize) = if full { (&[100_000, 1_000_000], 3) } else { (&[3_000], 1) };
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    println!("jobhost serve benchmarks ({} mode)", if full { "full" } else { "quick" });
    println!("{:<58} {:>10} {:>10} {:>8}", "benchmark (median time)", "jobhost", "baseline", "ratio");
    rt.block_on(async {
        for &n in sizes {
            if only("scenario") {
                against_in_process(n, rounds).await;
            }
            if only("peer") {
                against_peer(n, rounds).await;
            }
        }
    });
}

/// The scenario through `serve` (its default cap and 256) vs in-process, alternating rounds.
async fn against_in_process(n: u64, rounds: usize) {
    let (mut served, mut wide, mut inproc) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..rounds {
        served.push(through_serve(n, &[], Listening::Plugin).await);
        inproc.push(inprocess::scenario_with(n, Some(wasm())).await.took);
        wide.push(through_serve(n, &["--concurrency", "256"], Listening::Plugin).await);
    }
    let base = median(&mut inproc);
    for (label, times) in [("", &mut served), (", --concurrency 256", &mut wide)] {
        let t = median(times);
        println!(
            "{:<58} {:>8.2} s {:>8.2} s {:>7.2}x",
            format!("scenario {n} records through serve{label}"),
            t,
            base,
            t / base
        );
    }
}

/// The scenario through `serve` with the WASM plugin vs the same `serve` driven by the
/// Flatfile-style Node.js peer over the API, alternating rounds: how many times faster.
async fn against_peer(n: u64, rounds: usize) {
    let (mut wasm, mut peer) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        peer.push(through_serve(n, &[], Listening::Peer).await);
        wasm.push(through_serve(n, &[], Listening::Plugin).await);
    }
    let (w, p) = (median(&mut wasm), median(&mut peer));
    println!(
        "{:<58} {:>8.2} s {:>8.2} s {:>7.1}x faster",
        format!("scenario {n} records: WASM plugin vs Node.js peer over the API"),
        w,
        p,
        p / w
    );
}

/// Who does the listener's work in a run through `serve`.
#[derive(Clone, Copy, PartialEq)]
enum Listening {
    /// `submit-large-sheet`, in the host's plugins directory.
    Plugin,
    /// `peer/flatfile-style-listener.mjs`: a Node.js process following the event stream.
    Peer,
}

fn wasm() -> (std::sync::Arc<jobhost::runtime::Runtime>, std::path::PathBuf) {
    (inprocess::runtime(), artifacts::SUBMIT_LARGE_SHEET.into())
}

fn median(v: &mut [Duration]) -> f64 {
    v.sort();
    v[v.len() / 2].as_secs_f64()
}

/// A Node.js process running the peer against `base` with `token`, killed when dropped.
async fn start_peer(base: &str, token: &str) -> tokio::process::Child {
    use tokio::io::AsyncBufReadExt;
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/peer/flatfile-style-listener.mjs");
    let mut child = tokio::process::Command::new("node")
        .arg(script)
        .args([base, token])
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start node (Node.js is needed for the peer)");
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let line = tokio::time::timeout(DEADLINE, lines.next_line()).await.expect("the peer did not start").unwrap();
    assert_eq!(line.as_deref(), Some("following the event stream"), "the peer did not start");
    child
}

/// One run of the scenario through a fresh `jobhost serve` with `args`: the time from the
/// job's `POST` to its `job:completed` on the event stream.
async fn through_serve(n: u64, args: &[&str], listening: Listening) -> Duration {
    let dir = tempfile::tempdir().unwrap();
    let plugins = dir.path().join("s-plugins");
    std::fs::create_dir_all(&plugins).unwrap();
    if listening == Listening::Plugin {
        std::fs::copy(artifacts::SUBMIT_LARGE_SHEET, plugins.join("submit.wasm")).unwrap();
    }
    let s = serve(dir.path(), "s", args);
    let http = reqwest::Client::new();
    let (_, token) = environment_token(&http, &s.addr).await;
    let base = format!("http://{}/v1", s.addr);
    let sheet = answer(http.post(format!("{base}/sheets")).bearer_auth(&token).json(&json!({"name": "people"}))).await;
    let sheet = sheet["data"]["id"].as_str().unwrap().to_owned();
    let mut invalid = 0;
    for start in (0..n).step_by(10_000) {
        let (rows, bad) = scenario::sample_range(start..(start + 10_000).min(n));
        invalid += bad;
        let resp =
            http.post(format!("{base}/sheets/{sheet}/records")).bearer_auth(&token).json(&rows).send().await.unwrap();
        assert_eq!(resp.status(), 201, "{}", resp.text().await.unwrap());
    }
    let mut peer = match listening {
        Listening::Peer => Some(start_peer(&base, &token).await),
        Listening::Plugin => None,
    };

    // Follow the stream before the job exists, so its completion cannot be missed.
    let mut stream =
        http.get(format!("{base}/events/stream?since=0&topic=job:completed")).bearer_auth(&token).send().await.unwrap();
    assert_eq!(stream.status(), 200);
    let t = Instant::now();
    let job = answer(
        http.post(format!("{base}/jobs"))
            .bearer_auth(&token)
            .json(&json!({"type": "sheet", "operation": scenario::OPERATION, "source": sheet})),
    )
    .await;
    let id = job["data"]["id"].as_str().unwrap_or_else(|| panic!("job refused: {job}")).to_owned();
    let needle = format!("\"jobId\":\"{id}\"");
    let mut text = String::new();
    loop {
        let next = async {
            match &mut peer {
                // A peer that ends (a failed call) ends the run at once.
                Some(p) => tokio::select! {
                    chunk = stream.chunk() => chunk,
                    status = p.wait() => panic!("the peer ended ({:?}) before job:completed for {id}", status),
                },
                None => stream.chunk().await,
            }
        };
        let chunk = tokio::time::timeout(DEADLINE, next)
            .await
            .unwrap_or_else(|_| panic!("no job:completed for {id} within {DEADLINE:?}"))
            .unwrap()
            .unwrap_or_else(|| panic!("the event stream ended before job:completed for {id}"));
        text.push_str(&String::from_utf8_lossy(&chunk));
        if text.lines().any(|l| l.starts_with("data:") && l.contains(&needle)) {
            break;
        }
        // Keep only the unfinished last line.
        let keep = text.rfind('\n').map_or(0, |i| i + 1);
        text.drain(..keep);
    }
    let took = t.elapsed();
    drop(peer);

    let job = answer(http.get(format!("{base}/jobs/{id}")).bearer_auth(&token)).await;
    assert_eq!(job["data"]["status"], "complete", "{job}");
    assert_eq!(job["data"]["outcome"]["parts"]["completed"], Value::from(n.div_ceil(1000)), "{job}");
    let counts = answer(http.get(format!("{base}/sheets/{sheet}/counts")).bearer_auth(&token)).await;
    assert_eq!(counts["data"]["error"], Value::from(invalid), "{counts}");
    took
}
