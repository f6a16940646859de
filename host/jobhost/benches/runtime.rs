//! WebAssembly runtime benchmarks, each next to a baseline measured in the same run.
//!
//! `cargo bench -p jobhost --bench runtime` runs full sizes; under `cargo test` it runs a quick
//! smoke that checks results and asserts nothing about time.
//!
//! Rows:
//! - **dispatch**: a fresh `Store` + instance of the `test-noop` plugin, one call of its
//!   trivial `bench:noop` handler, drop — jobhost's `Runtime::execute` (limits, CPU meter,
//!   output capture, timeout) vs the bare baseline (same engine, pooling allocator and
//!   `InstancePre`, none of jobhost's per-delivery work).
//! - **lifecycle**: create → ready → ack → complete for N jobs (64 concurrent creators), the
//!   ack and complete made by the `test-noop` plugin vs by a native listener.
//! - **paging into a guest**: the `test-noop` plugin pages a whole sheet of 10-field records
//!   in pages of 1,000 inside one delivery, vs a native listener reading the same pages.
//! - **reload**: from a new version of a plugin renamed into a watched directory to the
//!   version being loaded, and to the first event handled by it; baseline: compiling that
//!   component once (what a reload cannot avoid). And a host restart to ready (runtime, three
//!   plugins loaded and subscribed) with a warm compilation cache vs a cold one.
//! - **concurrency**: the seeds' scenario with every part in flight at once (1,000 parts,
//!   1,000 deliveries and instances allowed): wall time and the growth of peak RSS.
//! - **parts**: the seeds' scenario with 10,000 parts (10M records) at a CLI host's defaults
//!   (the engine's in-flight cap, as many instance slots): wall time and peak RSS growth.
//! - **plugins**: 100 plugins (each its own component) loaded, run once and subscribed, then
//!   idle: RSS per plugin, against the host's RSS before loading them.
//! - **scenario**: the seeds' scenario (N records, N/1000 parts) with the WASM plugin vs the
//!   same listeners compiled into the host.
//! - **load**: loading a large component (the Python `test-noop`, ~19 MB) from the
//!   compilation cache a previous start filled, median of fresh runtimes (their start not
//!   timed), vs compiling it; and the part of a load that reads and hashes the file.
//! - **languages**: per-event cost (fresh instance + trivial call + drop) and the seeds'
//!   scenario with the Python, JavaScript and C plugins (`plugins/python|js|c/`, built by
//!   `jobhost::build`) against the Rust plugin, in the same run; and the Python and JavaScript
//!   listeners' scenario against the same code run natively (CPython, Node.js) on the
//!   in-memory host of `benches/native/`.
//! - **events**: the per-event half of `languages` alone.

use std::time::{Duration, Instant};

use jobhost::listener::{EventCtx, Listener};
use jobhost::model::{Event, JobStatus, NewJob, NewRecord, Outcome};
use jobhost::runtime::{Runtime, RuntimeConfig};
use jobhost::{EngineConfig, Env, scenario};
use jobhost_test_plugins as artifacts;

#[path = "support/inprocess.rs"]
mod inprocess;
use inprocess::{
    ScenarioRun, WRITER_THREAD, host, run_scenario_job, runtime, scenario_with, thread_cpu, wait_terminal,
};
use serde_json::json;

// The same allocator as the `jobhost` binary, so the rows measure what users run.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let only = |name: &str| {
        let named: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with('-')).collect();
        named.is_empty() || named.iter().any(|a| a == name)
    };
    let (dispatches, paging_records, scenario_records) =
        if full { (20_000, 200_000, 1_000_000) } else { (200, 3_000, 3_000) };
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    println!("jobhost runtime benchmarks ({} mode)", if full { "full" } else { "quick" });
    println!("{:<50} {:>14} {:>14} {:>8}", "benchmark", "jobhost", "baseline", "ratio");
    rt.block_on(async {
        if only("dispatch") {
            dispatch(dispatches).await;
        }
        if only("lifecycle") {
            lifecycle(if full { 20_000 } else { 200 }).await;
        }
        if only("paging") {
            paging(paging_records).await;
        }
        if only("reload") {
            reload(if full { 10 } else { 2 }).await;
        }
        if only("scenario") {
            scenario_wasm_vs_native(scenario_records).await;
        }
        if only("load") {
            load_cached(if full { 20 } else { 3 }).await;
        }
        if only("languages") {
            languages(dispatches / 10, Some(scenario_records)).await;
        } else if only("events") {
            languages(dispatches / 10, None).await;
        }
        if only("concurrency") {
            concurrency(if full { 1_000_000 } else { 5_000 }).await;
        }
        if only("parts") {
            many_parts(if full { 10_000_000 } else { 5_000 }).await;
        }
        if only("plugins") {
            many_plugins(if full { 100 } else { 3 }).await;
        }
    });
}

/// A `bench:noop` event of `env`, as a delivery would carry it.
fn noop_event(env: &Env) -> EventCtx {
    let event = Event {
        id: "evt_bench".into(),
        seq: 1,
        topic: "bench:noop".into(),
        context: json!({ "environmentId": env.id(), "actorId": "bench" }),
        payload: json!({}),
        created_at: 0,
    };
    EventCtx::new(event, env.clone(), 1)
}

async fn dispatch(n: usize) {
    let (_dir, _engine, env) = host().await;
    let rt = runtime();
    let plugin = rt.load(std::path::Path::new(artifacts::TEST_NOOP)).await.unwrap();
    let route = plugin.routes.iter().position(|r| r.topic == "bench:noop").unwrap() as u32;
    let ctx = noop_event(&env);
    // Warm both paths (pool slots, caches) before timing.
    for _ in 0..100 {
        assert!(rt.execute(&plugin, route, &ctx).await.error.is_none());
        rt.execute_bare(&plugin, route, &ctx).await.unwrap();
    }
    let (mut ours, mut bare) = (Duration::ZERO, Duration::ZERO);
    // Interleaved rounds so drift on a shared machine hits both sides alike.
    for _ in 0..10 {
        let t = Instant::now();
        for _ in 0..n / 10 {
            let e = rt.execute(&plugin, route, &ctx).await;
            assert!(e.error.is_none(), "{:?}", e.error);
        }
        ours += t.elapsed();
        let t = Instant::now();
        for _ in 0..n / 10 {
            rt.execute_bare(&plugin, route, &ctx).await.unwrap();
        }
        bare += t.elapsed();
    }
    let per = |d: Duration| d.as_secs_f64() * 1e6 / n as f64;
    println!(
        "{:<50} {:>10.1} µs {:>10.1} µs {:>7.2}x",
        "dispatch: fresh instance + trivial call + drop",
        per(ours),
        per(bare),
        per(ours) / per(bare)
    );
}

fn ten_field_records(n: u64) -> Vec<NewRecord> {
    (0..n)
        .map(|i| {
            let (mut r, _) = scenario::sample_record(i);
            for k in 0..6 {
                r.values.insert(format!("field{k}"), json!(format!("value {k} of record {i}")));
            }
            r
        })
        .collect()
}

async fn paging(n: u64) {
    let (_dir, engine, env) = host().await;
    let rt = runtime();
    let plugin = std::sync::Arc::new(rt.load(std::path::Path::new(artifacts::TEST_NOOP)).await.unwrap());
    let running = engine.run(vec![rt.listener(plugin, env.id())]).await.unwrap();
    let sheet = env.create_sheet("wide").await.unwrap();
    env.insert_records(&sheet.id, ten_field_records(n)).await.unwrap();

    let t = Instant::now();
    let job =
        env.create_job(NewJob { input: json!({"pageSize": 1000}), ..NewJob::sheet("page", &sheet.id) }).await.unwrap();
    let job = wait_terminal(&engine, &env, &job.id).await;
    let wasm = t.elapsed();
    running.shutdown().await;
    assert_eq!(job.status, JobStatus::Complete, "{}", job.outcome);
    assert_eq!(job.outcome["records"], json!(n));
    assert!(job.outcome["cells"].as_u64().unwrap() >= n * 9);

    // Native: the same pages, read by a listener in the host.
    let listener = Listener::new("native-pager", env.id()).filter(json!({"job": "sheet:page"}), |l| {
        l.on("job:ready", |event| async move {
            let mut records = 0u64;
            for page in 1.. {
                let p = event.data(1000, page).await?;
                if p.records.is_empty() {
                    break;
                }
                records += p.records.len() as u64;
            }
            event.api.complete(event.job_id()?, Outcome { outcome: json!({ "records": records }), info: None }).await?;
            Ok(())
        })
    });
    let running = engine.run(vec![listener]).await.unwrap();
    let t = Instant::now();
    let job = env.create_job(NewJob::sheet("page", &sheet.id)).await.unwrap();
    let job = wait_terminal(&engine, &env, &job.id).await;
    let native = t.elapsed();
    running.shutdown().await;
    assert_eq!(job.outcome["records"], json!(n));
    let rate = |d: Duration| n as f64 / d.as_secs_f64();
    println!(
        "{:<50} {:>10.0} /s {:>10.0} /s {:>7.2}x",
        format!("paging {n} 10-field records into a guest"),
        rate(wasm),
        rate(native),
        rate(wasm) / rate(native)
    );
}

async fn scenario_once(n: u64, wasm: bool) -> ScenarioRun {
    let plugin = wasm.then(|| (runtime(), std::path::PathBuf::from(artifacts::SUBMIT_LARGE_SHEET)));
    scenario_with(n, plugin).await
}

async fn scenario_wasm_vs_native(n: u64) {
    let native = scenario_once(n, false).await;
    let wasm = scenario_once(n, true).await;
    println!(
        "{:<50} {:>11.2} s {:>11.2} s {:>7.2}x",
        format!("scenario {n} records / {} parts (time)", n.div_ceil(1000)),
        wasm.took.as_secs_f64(),
        native.took.as_secs_f64(),
        wasm.took.as_secs_f64() / native.took.as_secs_f64()
    );
    // CPU beside the time: on a shared machine it moves less than the time does.
    let per_record = |d: Duration| d.as_secs_f64() * 1e6 / n as f64;
    for (who, run) in [("WASM", wasm), ("native", native)] {
        println!(
            "  per record, {who:<6}: {:.2} µs CPU in the store's writer thread, {:.2} µs in the whole process",
            per_record(run.writer_cpu),
            per_record(run.all_cpu)
        );
    }
}

/// A host start with a large component: mapped from the compilation cache vs compiled.
async fn load_cached(rounds: usize) {
    let tmp = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"));
    let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let python = jobhost::build::build_in(&repo.join("plugins/python/test-noop"), &tmp.join("tools")).unwrap();
    let size = std::fs::metadata(&python).unwrap().len();
    let cache = tempfile::tempdir().unwrap();
    let fresh = || {
        let config = RuntimeConfig { cache_dir: Some(cache.path().to_owned()), ..RuntimeConfig::default() };
        Runtime::new(config).unwrap()
    };
    let rt = fresh();
    let t = Instant::now();
    rt.load(&python).await.unwrap();
    let cold = t.elapsed();
    assert_eq!(rt.stats().component_loads(), (0, 1), "compiled");
    // A digest is trusted only when the file last changed ≥ 1 s before it was hashed: let the
    // clock pass that point (a just-built file), so every round after the first can use it.
    let settled = jobhost::runtime::digest_trusted_from(&python).unwrap().expect("a Unix change time");
    if let Ok(left) = settled.duration_since(std::time::SystemTime::now()) {
        std::thread::sleep(left);
    }
    let (mut warm, mut hashing, mut unread) = (Vec::new(), Vec::new(), 0);
    for _ in 0..rounds {
        let rt = fresh();
        let t = Instant::now();
        let plugin = rt.load(&python).await.unwrap();
        warm.push(t.elapsed());
        assert_eq!(rt.stats().component_loads(), (1, 0), "mapped");
        // Known by the file's identity, unread (all but the first round or two: a file hashed
        // within a second of its last change is hashed again once).
        unread += rt.stats().component_reads().1;
        assert_eq!(plugin.routes[0].topic, "bench:noop");
        let t = Instant::now();
        let bytes = std::fs::read(&python).unwrap();
        assert_eq!(jobhost::runtime::version_of(&bytes), plugin.version);
        hashing.push(t.elapsed());
    }
    let median = |mut v: Vec<Duration>| {
        v.sort();
        v[v.len() / 2]
    };
    let (warm, hashing) = (median(warm), median(hashing));
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!(
        "{:<50} {:>11.1} ms {:>11.1} ms {:>7.3}x",
        format!("load Python ({} MB): cached vs compiling", size >> 20),
        ms(warm),
        ms(cold),
        ms(warm) / ms(cold)
    );
    println!(
        "{:<50} {:>11.1} ms {:>11.1} ms {:>7.3}x",
        "  reading + hashing the file (not done when unread)",
        ms(hashing),
        ms(warm),
        ms(hashing) / ms(warm)
    );
    println!("  cached loads that did not read the file: {unread} of {rounds}");
    assert!(unread as usize + 1 >= rounds, "a settled, unchanged file is known by its identity: {unread} of {rounds}");
}

/// Python, JavaScript and C against Rust, same host, same run. Their components are built (and
/// cached by content) by `jobhost::build`, and compiled once into a compilation cache in the
/// target directory, as a host with its default cache would.
async fn languages(events: usize, n: Option<u64>) {
    let tmp = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"));
    let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let build = |dir: &str| jobhost::build::build_in(&repo.join("plugins").join(dir), &tmp.join("tools")).unwrap();
    let limits = jobhost::runtime::Limits { max_instances: 256, ..Default::default() };
    let config = RuntimeConfig { cache_dir: Some(tmp.join("wasmtime-cache")), limits, ..RuntimeConfig::default() };
    let rt = Runtime::new(config).unwrap();
    let (_dir, _engine, env) = host().await;
    let ctx = noop_event(&env);
    let rust = rt.load(std::path::Path::new(artifacts::TEST_NOOP)).await.unwrap();
    let route = |p: &jobhost::runtime::Plugin| p.routes.iter().position(|r| r.topic == "bench:noop").unwrap() as u32;
    let rust_route = route(&rust);
    let rust_time = match n {
        Some(n) => scenario_with(n, Some((rt.clone(), artifacts::SUBMIT_LARGE_SHEET.into()))).await.took,
        None => Duration::ZERO,
    };
    // The native runs' copy of the sample, written once for both interpreters.
    let native_records = n.map(|n| write_sample(n, tmp));
    for (language, dir) in [("Python", "python"), ("JavaScript", "js"), ("C", "c")] {
        let guest = rt.load(&build(&format!("{dir}/test-noop"))).await.unwrap();
        let guest_route = route(&guest);
        for _ in 0..20 {
            assert!(rt.execute(&rust, rust_route, &ctx).await.error.is_none());
            let e = rt.execute(&guest, guest_route, &ctx).await;
            assert!(e.error.is_none(), "{:?}", e.error);
        }
        let (mut theirs, mut ours) = (Duration::ZERO, Duration::ZERO);
        for _ in 0..10 {
            let t = Instant::now();
            for _ in 0..events / 10 {
                rt.execute(&guest, guest_route, &ctx).await;
            }
            theirs += t.elapsed();
            let t = Instant::now();
            for _ in 0..events / 10 {
                rt.execute(&rust, rust_route, &ctx).await;
            }
            ours += t.elapsed();
        }
        let per = |d: Duration| d.as_secs_f64() * 1e6 / (events / 10 * 10) as f64;
        println!(
            "{:<50} {:>10.1} µs {:>10.1} µs {:>7.2}x",
            format!("per event, {language} vs Rust (instance+call+drop)"),
            per(theirs),
            per(ours),
            per(theirs) / per(ours)
        );
        let Some(n) = n else { continue };
        let time = scenario_with(n, Some((rt.clone(), build(&format!("{dir}/submit-large-sheet"))))).await.took;
        println!(
            "{:<50} {:>11.2} s {:>11.2} s {:>7.2}x",
            format!("scenario {n} records, {language} vs Rust (time)"),
            time.as_secs_f64(),
            rust_time.as_secs_f64(),
            time.as_secs_f64() / rust_time.as_secs_f64()
        );
        let native = match dir {
            "python" => ["python3", "host.py", "plugin-sdk/python", "plugins/python/submit-large-sheet"],
            "js" => ["node", "host.mjs", "plugin-sdk/js/jobhost-listener.js", "plugins/js/submit-large-sheet/app.js"],
            _ => continue,
        };
        let (records, invalid) = native_records.clone().unwrap();
        let repo = repo.clone();
        let native_time =
            tokio::task::spawn_blocking(move || native_scenario(&repo, native, &records, n, invalid)).await.unwrap();
        println!(
            "{:<50} {:>11.2} s {:>11.2} s {:>7.2}x",
            format!("scenario {n}, {language}: WASM in jobhost vs {}", native[0]),
            time.as_secs_f64(),
            native_time.as_secs_f64(),
            time.as_secs_f64() / native_time.as_secs_f64()
        );
    }
    if let Some((records, _)) = native_records {
        std::fs::remove_file(records).unwrap();
    }
}

/// Writes the `n` sample records as JSON lines to `native-records-{n}.jsonl` in `dir`; returns
/// the file and how many of the records break a rule.
fn write_sample(n: u64, dir: &std::path::Path) -> (std::path::PathBuf, u64) {
    use std::io::Write;
    let path = dir.join(format!("native-records-{n}.jsonl"));
    let mut out = std::io::BufWriter::new(std::fs::File::create(&path).unwrap());
    let mut invalid = 0;
    for start in (0..n).step_by(100_000) {
        let (rows, bad) = scenario::sample_range(start..(start + 100_000).min(n));
        invalid += bad;
        for row in rows {
            serde_json::to_writer(&mut out, &row.values).unwrap();
            out.write_all(b"\n").unwrap();
        }
    }
    out.flush().unwrap();
    (path, invalid)
}

/// The seeds' scenario's listener code run natively — `[interpreter, host script, SDK, app]`,
/// the script under `benches/native/` — on that script's in-memory host, over the `n` sample
/// records in `records` (`invalid` of them breaking a rule): the time from the job's creation
/// to its end, checked like the WASM run's.
fn native_scenario(
    repo: &std::path::Path,
    [interpreter, script, sdk, app]: [&str; 4],
    records: &std::path::Path,
    n: u64,
    invalid: u64,
) -> Duration {
    let run = std::process::Command::new(interpreter)
        .arg(repo.join("host/jobhost/benches/native").join(script))
        .args([repo.join(sdk), repo.join(app), records.to_owned()])
        .output()
        .unwrap_or_else(|e| panic!("running {interpreter}: {e}"));
    assert!(run.status.success(), "{interpreter} {script}: {}", String::from_utf8_lossy(&run.stderr));
    let answer: serde_json::Value = serde_json::from_slice(&run.stdout).unwrap();
    assert_eq!(answer["status"], "complete", "{answer}");
    assert_eq!(answer["records"]["total"], n, "{answer}");
    assert_eq!(answer["records"]["error"], invalid, "{answer}");
    assert_eq!(answer["outcome"]["parts"]["completed"], n.div_ceil(1000), "{answer}");
    Duration::from_secs_f64(answer["seconds"].as_f64().unwrap())
}

/// The same component with a custom section appended: same behaviour, another version.
fn variant(bytes: &[u8], tag: u32) -> Vec<u8> {
    let mut payload = vec![5u8];
    payload.extend_from_slice(b"bench");
    payload.extend_from_slice(&tag.to_le_bytes());
    let mut out = bytes.to_vec();
    out.push(0);
    out.push(payload.len() as u8);
    out.extend_from_slice(&payload);
    out
}

async fn reload(rounds: u32) {
    use jobhost::reload::{PluginHost, ReloadEvent};
    let (_dir, engine, env) = host().await;
    let plugins = tempfile::tempdir().unwrap();
    let base = std::fs::read(artifacts::TEST_NOOP).unwrap();
    std::fs::write(plugins.path().join("noop.wasm"), &base).unwrap();
    let rt = runtime();
    let running = std::sync::Arc::new(engine.run(vec![]).await.unwrap());
    let (host, _) = PluginHost::start(rt.clone(), running.clone(), env.id(), plugins.path()).await.unwrap();
    let _watch = host.watch(Duration::from_millis(50)).unwrap();
    let mut events = host.subscribe();
    let (mut to_loaded, mut to_handled, mut compile) = (Duration::ZERO, Duration::ZERO, Duration::ZERO);
    for round in 0..rounds {
        let bytes = variant(&base, round);
        let version = jobhost::runtime::version_of(&bytes);
        let tmp = plugins.path().join(".noop.tmp");
        std::fs::write(&tmp, &bytes).unwrap();
        let t = Instant::now();
        std::fs::rename(&tmp, plugins.path().join("noop.wasm")).unwrap();
        loop {
            if let ReloadEvent::Loaded { version: v, .. } = events.recv().await.unwrap()
                && v == version
            {
                break;
            }
        }
        to_loaded += t.elapsed();
        let job = env.create_job(NewJob::new(jobhost::model::JobType::Space, "work")).await.unwrap();
        let (e2, id, v) = (env.clone(), job.id.clone(), version.clone());
        engine
            .wait_for(move || {
                let (e2, id, v) = (e2.clone(), id.clone(), v.clone());
                async move {
                    Ok(e2.executions(Some(&id), 10).await?.into_iter().find(|x| x.plugin_version == v).map(|_| ()))
                }
            })
            .await
            .unwrap();
        to_handled += t.elapsed();
        // Baseline: compiling that same content once, with nothing cached.
        let other = variant(&base, 1_000_000 + round);
        let t = Instant::now();
        rt.load_bytes(std::path::Path::new("noop.wasm"), other).await.unwrap();
        compile += t.elapsed();
    }
    running.shutdown().await;
    let ms = |d: Duration| d.as_secs_f64() * 1000.0 / f64::from(rounds);
    println!(
        "{:<50} {:>10.1} ms {:>10.1} ms {:>7.2}x",
        "reload: new file → version loaded",
        ms(to_loaded),
        ms(compile),
        ms(to_loaded) / ms(compile)
    );
    println!(
        "{:<50} {:>10.1} ms {:>10.1} ms {:>7.2}x",
        "reload: new file → first event on it",
        ms(to_handled),
        ms(compile),
        ms(to_handled) / ms(compile)
    );

    // Restart to ready: a runtime with a compilation cache, three plugins loaded and subscribed.
    let cache = tempfile::tempdir().unwrap();
    for (name, path) in artifacts::ALL {
        std::fs::copy(path, plugins.path().join(format!("{name}.wasm"))).unwrap();
    }
    std::fs::remove_file(plugins.path().join("noop.wasm")).unwrap();
    let start = |label: &'static str| {
        let cache_dir = cache.path().to_path_buf();
        let dir = plugins.path().to_path_buf();
        let (engine, env) = (engine.clone(), env.clone());
        async move {
            let t = Instant::now();
            let rt = Runtime::new(RuntimeConfig { cache_dir: Some(cache_dir), ..RuntimeConfig::default() }).unwrap();
            let running = std::sync::Arc::new(engine.run(vec![]).await.unwrap());
            let (host, loaded) = PluginHost::start(rt, running.clone(), env.id(), &dir).await.unwrap();
            let took = t.elapsed();
            assert_eq!(host.plugins().await.len(), artifacts::ALL.len(), "{label}: {loaded:?}");
            running.shutdown().await;
            took
        }
    };
    let cold = start("cold").await;
    let warm = start("warm").await;
    println!(
        "{:<50} {:>10.1} ms {:>10.1} ms {:>7.2}x",
        format!("restart to ready, {} plugins, warm cache vs cold", artifacts::ALL.len()),
        warm.as_secs_f64() * 1000.0,
        cold.as_secs_f64() * 1000.0,
        warm.as_secs_f64() / cold.as_secs_f64()
    );
}

async fn lifecycle(n: usize) {
    let mut rates = Vec::new();
    let mut writes = Vec::new();
    for wasm in [true, false] {
        let (_dir, engine, env) = host().await;
        // Handlers that have ended, counted in memory: the wait below runs after every commit,
        // and a store query there would compete with the writes it measures.
        let ended = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let rt = runtime();
        let listener = if wasm {
            let plugin = std::sync::Arc::new(rt.load(std::path::Path::new(artifacts::TEST_NOOP)).await.unwrap());
            rt.listener(plugin, env.id())
        } else {
            let ended = ended.clone();
            Listener::new("native", env.id()).filter(json!({"job": "space:lifecycle"}), move |l| {
                l.on("job:ready", move |event| {
                    let ended = ended.clone();
                    async move {
                        let id = event.job_id()?.to_owned();
                        event.api.ack(&id, Default::default()).await?;
                        event.api.complete(&id, Outcome::default()).await?;
                        ended.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        Ok(())
                    }
                })
            })
        };
        let running = engine.run(vec![listener]).await.unwrap();
        let before = engine.store().backend().write_stats();
        let (writer_before, all_before) = (thread_cpu(WRITER_THREAD), process_cpu());
        let t = Instant::now();
        let mut tasks = tokio::task::JoinSet::new();
        for c in 0..64 {
            let env = env.clone();
            tasks.spawn(async move {
                for _ in (c..n).step_by(64) {
                    env.create_job(NewJob::new(jobhost::model::JobType::Space, "lifecycle")).await.unwrap();
                }
            });
        }
        while tasks.join_next().await.is_some() {}
        engine
            .wait_for(|| {
                let done = if wasm {
                    let stats = rt.stats();
                    stats.instances_total() as usize >= n && stats.instances_in_use() == 0
                } else {
                    ended.load(std::sync::atomic::Ordering::Relaxed) >= n
                };
                async move { Ok(done.then_some(())) }
            })
            .await
            .unwrap();
        rates.push(n as f64 / t.elapsed().as_secs_f64());
        let per = |d: Duration| d.as_secs_f64() * 1e6 / n as f64;
        let cpu = format!(
            "{:.1} µs CPU in the store's writer thread, {:.1} µs in the whole process",
            per(thread_cpu(WRITER_THREAD).saturating_sub(writer_before)),
            per(process_cpu().saturating_sub(all_before))
        );
        running.shutdown().await;
        let after = engine.store().backend().write_stats();
        writes.push(format!("{}; {cpu}", after.since(&before, n)));
        let done = env.jobs(0, u32::MAX).await.unwrap().iter().filter(|j| j.status == JobStatus::Complete).count();
        assert_eq!(done, n);
        assert_eq!(engine.delivery_stats().await.unwrap().done as usize, n);
    }
    println!(
        "{:<50} {:>10.0} /s {:>10.0} /s {:>7.2}x",
        "lifecycle, WASM listener vs native (jobs/s)",
        rates[0],
        rates[1],
        rates[0] / rates[1]
    );
    for (who, w) in ["WASM", "native"].iter().zip(&writes) {
        println!("  per lifecycle, {who:<6}: {w}");
    }
}

/// CPU time of the whole process so far, exited threads included (`/proc/self/stat`).
fn process_cpu() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command's closing parenthesis; utime and stime are the 14th and 15th
    // fields of the line, in clock ticks (100 a second on Linux).
    let fields: Vec<&str> =
        stat.rsplit_once(')').map(|(_, rest)| rest.split_whitespace().collect()).unwrap_or_default();
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok()).unwrap_or(0);
    Duration::from_millis((ticks(11) + ticks(12)) * 10)
}

fn rss_mib(key: &str) -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with(key)).and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(0.0, |kib| kib / 1024.0)
}

async fn concurrency(n: u64) {
    let parts = n.div_ceil(1000) as usize;
    let config = EngineConfig { ack_timeout: None, stale_timeout: None, ..EngineConfig::single_environment(parts) };
    let runtime = RuntimeConfig { max_instances: parts as u32, ..RuntimeConfig::default() };
    parts_in_flight(n, config, runtime, format!("{parts} parts all in flight (WASM, {n} records)")).await;
}

/// The seeds' scenario with `n / 1000` parts at a CLI host's defaults (the engine's default
/// in-flight cap, one instance slot per delivery in flight): the parts wait as deliveries,
/// not as instances, so peak RSS should not grow with the number of parts.
async fn many_parts(n: u64) {
    let config = EngineConfig::default();
    let slots = config.max_in_flight;
    let label = format!("{} parts, {slots} in flight (WASM, {n} records)", n.div_ceil(1000));
    parts_in_flight(n, config, RuntimeConfig::default(), label).await;
}

/// The seeds' scenario through the WASM plugin on `config` and `runtime` (each plugin may use
/// every instance slot): wall time and the growth of peak RSS while the job runs.
async fn parts_in_flight(n: u64, config: EngineConfig, runtime: RuntimeConfig, label: String) {
    let parts = n.div_ceil(1000);
    let dir = tempfile::tempdir().unwrap();
    let slots = config.max_in_flight;
    let engine = jobhost::open_engine(dir.path(), config).unwrap();
    let env = engine.env(engine.create_environment("bench").await.unwrap().id);
    let limits = jobhost::runtime::Limits { max_instances: slots, ..runtime.limits.clone() };
    let rt = Runtime::new(RuntimeConfig { cache_dir: None, limits, ..runtime }).unwrap();
    let plugin = std::sync::Arc::new(rt.load(std::path::Path::new(artifacts::SUBMIT_LARGE_SHEET)).await.unwrap());
    let running = engine.run(vec![rt.listener(plugin, env.id())]).await.unwrap();
    let sheet = env.create_sheet("people").await.unwrap();
    let invalid = scenario::insert_sample(&env, &sheet.id, n).await.unwrap();
    // Peak RSS from here on is the run's (writing 5 to clear_refs resets VmHWM).
    let _ = std::fs::write("/proc/self/clear_refs", "5");
    let before = rss_mib("VmRSS:");
    let took = run_scenario_job(&engine, &env, &sheet.id, n, invalid).await.took;
    running.shutdown().await;
    let peak = rss_mib("VmHWM:");
    println!(
        "{:<50} {:>11.2} s   {:.0} parts/s, RSS {before:.0} MiB before, peak {peak:.0} MiB (+{:.0})",
        label,
        took.as_secs_f64(),
        parts as f64 / took.as_secs_f64(),
        peak - before
    );
}

/// A host with `n` plugins loaded and subscribed, idle: RSS per plugin. Each plugin is
/// `test-noop` with its own custom section, so each is its own component, compiled and
/// mapped on its own, as `n` different plugins would be. Baseline: the host before loading.
async fn many_plugins(n: u32) {
    let (_dir, engine, env) = host().await;
    let rt = runtime();
    let bytes = std::fs::read(artifacts::TEST_NOOP).unwrap();
    let files = tempfile::tempdir().unwrap();
    let paths: Vec<_> = (0..n)
        .map(|i| {
            let path = files.path().join(format!("noop-{i}.wasm"));
            std::fs::write(&path, variant(&bytes, i)).unwrap();
            path
        })
        .collect();
    let ctx = noop_event(&env);
    let before = rss_mib("VmRSS:");
    let mut listeners = Vec::new();
    let mut versions = std::collections::HashSet::new();
    for path in &paths {
        let plugin = std::sync::Arc::new(rt.load(path).await.unwrap());
        // One event each: the plugin's code has run (its pages are in), as on a host that
        // has seen traffic and gone idle.
        let route = plugin.routes.iter().position(|r| r.topic == "bench:noop").unwrap() as u32;
        assert!(rt.execute(&plugin, route, &ctx).await.error.is_none());
        versions.insert(plugin.version.clone());
        listeners.push(rt.listener(plugin, env.id()));
    }
    assert_eq!(versions.len(), n as usize, "every plugin is its own component");
    let running = engine.run(listeners).await.unwrap();
    let after = rss_mib("VmRSS:");
    running.shutdown().await;
    println!(
        "{:<50} {:>10.2} MiB {:>10.0} MiB {:>7}",
        format!("{n} plugins loaded, idle (RSS per plugin)"),
        (after - before) / f64::from(n),
        before,
        "",
    );
}
