//! WebAssembly listeners: the seeds' scenario through the example plugin, routing, and
//! plugins that trap, loop, fail or do not load.

use std::sync::Arc;
use std::time::Duration;

use crate::support::{
    TestHost, WaitNamed, compiled_entries, events_of, load, test_config, test_runtime, until_terminal,
};
use jobhost::EngineConfig;
use jobhost::model::{ExecutionOutcome, JobStatus, JobType, NewJob};
use jobhost::scenario;
use jobhost_test_plugins as artifacts;
use serde_json::json;

/// The seeds' scenario through the Rust plugin; also the runtime's record pages `(asked, ahead)`.
async fn seeds(
    records: u64,
    input: serde_json::Value,
) -> (TestHost, jobhost::Env, jobhost::model::Job, String, u64, jobhost::runtime::PageStats) {
    let host = TestHost::new();
    let env = host.env().await;
    let rt = test_runtime();
    let plugin = load(&rt, artifacts::SUBMIT_LARGE_SHEET).await;
    let running = host.engine.run(vec![rt.listener(plugin, env.id())]).await.unwrap();
    let sheet = env.create_sheet("people").await.unwrap();
    let (rows, invalid) = scenario::sample_records(records);
    env.insert_records(&sheet.id, rows).await.unwrap();
    let job = env.create_job(NewJob { input, ..NewJob::sheet(scenario::OPERATION, &sheet.id) }).await.unwrap();
    let job = until_terminal(&env, &job.id).await;
    running.shutdown().await;
    (host, env, job, sheet.id, invalid, rt.stats().pages())
}

#[tokio::test]
async fn seeds_scenario_through_the_wasm_plugin() {
    let (_host, env, job, sheet, invalid, pages) = seeds(10_000, serde_json::Value::Null).await;
    assert_eq!(job.status, JobStatus::Complete, "{}", job.outcome);
    // Each part reads its one page and writes: nothing is read ahead for a single page.
    assert_eq!((pages.asked, pages.ahead, pages.discarded), (10, 0, 0));
    let parts = env.parts(&job.id).await.unwrap();
    assert_eq!(parts.len(), 10);
    assert!(parts.iter().all(|p| p.status == JobStatus::Complete));
    let pc = events_of(&env, &job.id, "job:parts-completed").await;
    assert_eq!(pc.len(), 1);
    assert_eq!(pc[0].payload["parts"], json!({"total": 10, "completed": 10, "failed": 0, "canceled": 0}));
    let counts = env.record_counts(&sheet).await.unwrap();
    assert_eq!((counts.total, counts.error), (10_000, invalid));
    assert_eq!(job.outcome["records"]["error"], json!(invalid));
    assert!(job.outcome["message"].as_str().unwrap().starts_with("10 of 10 parts completed"));

    // The plugin wrote its messages on the invalid cells (same rules as the native listener).
    let r = env.records(&sheet, 10, 1).await.unwrap().records.remove(3);
    assert!(!r.valid && !r.values["email"].valid);
    assert!(r.values["email"].messages[0].message.contains("not an email address"), "{:?}", r.values["email"]);
    let summed: u64 = parts.iter().map(|p| p.outcome["invalid"].as_u64().unwrap()).sum();
    assert_eq!(summed, invalid);

    // One execution record per delivery, routed to the right handler: route 0 is the
    // parent's job:ready, 1 its parts-completed, 2 the parts' job:ready.
    let execs = env.executions(None, 1000).await.unwrap();
    assert_eq!(execs.len(), 12);
    assert!(execs.iter().all(|e| e.outcome == ExecutionOutcome::Ok && e.plugin == "submit_large_sheet"));
    let route_of = |topic: &str, is_part: bool| -> Vec<u32> {
        execs
            .iter()
            .filter(|e| e.topic == topic && (e.job_id.as_deref() == Some(job.id.as_str())) != is_part)
            .map(|e| e.route)
            .collect()
    };
    assert_eq!(route_of("job:ready", false), [0]);
    assert_eq!(route_of("job:parts-completed", false), [1]);
    assert_eq!(route_of("job:ready", true), [2; 10]);
    assert!(execs.iter().all(|e| e.duration_us > 0));
    // The example plugins start with 2 MiB of memory (plugins/.cargo/config.toml), enough for
    // a page of 1,000 records: no delivery grew its memory.
    let peaks: Vec<u64> = execs.iter().map(|e| e.peak_memory).collect();
    assert!(peaks.iter().all(|&p| p == 2 << 20), "{peaks:?}");
    assert!(execs.iter().any(|e| e.logs.contains("INFO split")), "the parent logs through the log interface");
    assert_eq!(env.dead_letters().await.unwrap().len(), 0);
}

#[tokio::test]
async fn a_failing_part_fails_the_parent() {
    let (_host, env, job, _, _, _) = seeds(5_000, json!({"failParts": [1, 3]})).await;
    assert_eq!(job.status, JobStatus::Failed);
    assert_eq!(job.outcome["parts"], json!({"total": 5, "completed": 3, "failed": 2, "canceled": 0}));
    let failed: Vec<u32> = env
        .parts(&job.id)
        .await
        .unwrap()
        .iter()
        .filter(|p| p.status == JobStatus::Failed)
        .map(|p| p.part_index.unwrap())
        .collect();
    assert_eq!(failed, [1, 3]);
}

/// A guest paging through a sheet gets every page after the second read ahead (while it
/// worked on the pages before; the second shows it reads the sheet through), also when it
/// reads or logs between pages; a guest that writes between pages gets each page read when
/// it asks, and so sees its own writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_are_read_ahead_for_a_reader_and_a_writer_between_pages_sees_its_writes() {
    let (_host, env, rt, running, sheet) = noop_host_with_sheet("pages").await;
    // Five full pages of 100 and a sixth of 7.
    env.insert_records(&sheet.id, scenario::sample_records(507).0).await.unwrap();
    let run = |operation: &'static str| {
        let (env, sheet) = (env.clone(), sheet.id.clone());
        async move {
            let new = NewJob { input: json!({"pageSize": 100}), ..NewJob::sheet(operation, &sheet) };
            let job = env.create_job(new).await.unwrap();
            let job = until_terminal(&env, &job.id).await;
            assert_eq!(job.status, JobStatus::Complete, "{operation}: {}", job.outcome);
            job.outcome
        }
    };

    let outcome = run("page").await;
    assert_eq!(outcome["records"], json!(507));
    // Pages 1 and 2 are read when asked (page 2 shows the guest reads the sheet through);
    // then two pages are kept being read ahead: pages 3–7 (page 6 is short, so no page is
    // read after the empty page 7 that ends the loop, which was read ahead with page 6).
    let pages = rt.stats().pages();
    assert_eq!((pages.asked, pages.ahead, pages.discarded), (2, 5, 0));

    // Pages 1 and 2 without a write between them, then a mark written on the first record
    // of each next page before asking for it, and checked.
    let outcome = run("page-own-writes").await;
    assert_eq!(outcome["checked"], json!(4));
    // Pages 3 and 4, read ahead after page 2, are discarded by the first write; a guest that
    // writes between pages then gets no page read ahead (each would be discarded).
    let pages = rt.stats().pages();
    assert_eq!((pages.asked, pages.ahead, pages.discarded), (2 + 6, 5, 2), "a write discards the pages read ahead");

    // A count and a log line between pages are reads: the pages read ahead are used.
    let new = NewJob { input: json!({"pageSize": 100, "readBetween": true}), ..NewJob::sheet("page", &sheet.id) };
    let job = until_terminal(&env, &env.create_job(new).await.unwrap().id).await;
    assert_eq!((job.status, &job.outcome["records"]), (JobStatus::Complete, &json!(507)), "{}", job.outcome);
    let pages = rt.stats().pages();
    assert_eq!((pages.asked, pages.ahead, pages.discarded), (2 + 6 + 2, 5 + 5, 2), "reads keep the pages read ahead");
    running.shutdown().await;
}

/// Both packed shapes of a page reach a guest with the same records and the same messages on
/// each: `read-page` (the SDK's) and `page-packed`, which guests built before it still call.
#[tokio::test]
async fn a_guest_reads_the_same_pages_in_both_packed_shapes() {
    use jobhost::model::{Message, MessageType};
    let (_host, env, _rt, running, sheet) = noop_host_with_sheet("shapes").await;
    let message =
        |kind, text: &str, field: Option<&str>| Message { kind, message: text.into(), field: field.map(str::to_owned) };
    // 250 records: every 7th with a warning, every 11th with an error on a field and a note on
    // the whole record (so records with none, one and two messages sit side by side).
    let mut records = scenario::sample_records(250).0;
    let mut messages = 0;
    for (i, r) in records.iter_mut().enumerate() {
        if i % 7 == 0 {
            r.messages.push(message(MessageType::Warn, &format!("check {i}"), Some("email")));
        }
        if i % 11 == 0 {
            r.messages.push(message(MessageType::Error, "bad", Some("age")));
            r.messages.push(message(MessageType::Info, "note", None));
        }
        messages += r.messages.len();
    }
    env.insert_records(&sheet.id, records).await.unwrap();
    let new = NewJob { input: json!({"pageSize": 100}), ..NewJob::sheet("page-shapes", &sheet.id) };
    let job = until_terminal(&env, &env.create_job(new).await.unwrap().id).await;
    assert_eq!(job.status, JobStatus::Complete, "{}", job.outcome);
    assert_eq!(job.outcome, json!({"records": 250, "messages": messages}));
    running.shutdown().await;
}

/// A host running the `test-noop` plugin (on the runtime returned) in one environment, and an
/// empty sheet `name` there.
async fn noop_host_with_sheet(
    name: &str,
) -> (
    TestHost,
    jobhost::Env,
    std::sync::Arc<jobhost::runtime::Runtime>,
    jobhost::delivery::Running,
    jobhost::model::Sheet,
) {
    let host = TestHost::new();
    let env = host.env().await;
    let rt = test_runtime();
    let plugin = load(&rt, artifacts::TEST_NOOP).await;
    let running = host.engine.run(vec![rt.listener(plugin, env.id())]).await.unwrap();
    let sheet = env.create_sheet(name).await.unwrap();
    (host, env, rt, running, sheet)
}

/// A host with the well-behaved and the misbehaving plugin, in two environments.
async fn hostile_host(max_attempts: u32) -> (TestHost, jobhost::Env, jobhost::Env, jobhost::delivery::Running) {
    let host =
        TestHost::with_config(EngineConfig { max_attempts, retry_backoff: Duration::from_millis(1), ..test_config() });
    let (bad_env, good_env) = (host.env().await, host.env().await);
    let rt = test_runtime();
    let bad = load(&rt, artifacts::TEST_MISBEHAVE).await;
    let good = load(&rt, artifacts::TEST_NOOP).await;
    let running = host
        .engine
        .run(vec![
            rt.listener(bad.clone(), bad_env.id()),
            rt.listener(good.clone(), bad_env.id()),
            rt.listener(good, good_env.id()),
        ])
        .await
        .unwrap();
    (host, bad_env, good_env, running)
}

async fn dead_letter_for(host: &TestHost, env: &jobhost::Env, job_id: &str) -> jobhost::model::DeadLetter {
    let (env, id) = (env.clone(), job_id.to_owned());
    host.engine
        .wait_named("the delivery's dead letter", move || {
            let (env, id) = (env.clone(), id.clone());
            async move { Ok(env.dead_letters().await?.into_iter().find(|d| d.event.job_id() == Some(id.as_str()))) }
        })
        .await
        .unwrap()
}

#[tokio::test]
async fn a_trapping_or_looping_plugin_fails_only_its_own_delivery() {
    let (host, bad_env, good_env, running) = hostile_host(2).await;
    let trap = bad_env.create_job(NewJob::new(JobType::Space, "trap")).await.unwrap();
    let spin = bad_env.create_job(NewJob::new(JobType::Space, "loop")).await.unwrap();
    // Work keeps flowing in both environments while the bad plugin misbehaves.
    let mut work = Vec::new();
    for env in [&bad_env, &good_env] {
        for _ in 0..5 {
            work.push((env.clone(), env.create_job(NewJob::new(JobType::Space, "work")).await.unwrap().id));
        }
    }
    let trap_dead = dead_letter_for(&host, &bad_env, &trap.id).await;
    let loop_dead = dead_letter_for(&host, &bad_env, &spin.id).await;
    for (env, id) in &work {
        assert_eq!(until_terminal(env, id).await.status, JobStatus::Complete);
    }
    running.shutdown().await;

    assert_eq!(trap_dead.attempts, 2, "retried per the delivery policy");
    assert!(trap_dead.last_error.starts_with("trap: "), "{}", trap_dead.last_error);
    assert_eq!(loop_dead.attempts, 2);
    assert_eq!(loop_dead.last_error, "cpu deadline 0.3 s exceeded");

    let execs = bad_env.executions(Some(&trap.id), 100).await.unwrap();
    let trap_execs: Vec<_> = execs.iter().filter(|e| e.topic == "job:ready").collect();
    assert_eq!(trap_execs.len(), 2);
    assert!(trap_execs.iter().all(|e| e.outcome == ExecutionOutcome::Trap));
    assert!(trap_execs[0].logs.contains("boom"), "the panic message is in the logs: {:?}", trap_execs[0].logs);
    let loop_execs = bad_env.executions(Some(&spin.id), 100).await.unwrap();
    assert!(loop_execs.iter().filter(|e| e.plugin == "test_misbehave").all(|e| e.outcome == ExecutionOutcome::Cpu));
    // The jobs themselves are untouched: the watchdog, not the runtime, decides about them.
    assert_eq!(bad_env.job(&trap.id).await.unwrap().status, JobStatus::Ready);
}

#[tokio::test]
async fn a_failed_attempt_is_retried_and_output_is_captured() {
    let (_host, env, _good, running) = hostile_host(3).await;
    let flaky = env.create_job(NewJob::new(JobType::Space, "flaky")).await.unwrap();
    let print = env.create_job(NewJob::new(JobType::Space, "print")).await.unwrap();
    let flaky = until_terminal(&env, &flaky.id).await;
    until_terminal(&env, &print.id).await;
    running.shutdown().await;
    assert_eq!(flaky.outcome, json!({"message": "attempt 2"}));
    let execs = env.executions(Some(&flaky.id), 100).await.unwrap();
    let ready: Vec<_> = execs.iter().filter(|e| e.topic == "job:ready" && e.plugin == "test_misbehave").collect();
    assert_eq!(ready.len(), 2);
    assert_eq!((ready[0].outcome, ready[0].error.as_deref()), (ExecutionOutcome::Error, Some("first attempt fails")));
    assert_eq!(ready[1].outcome, ExecutionOutcome::Ok);
    let logs = &env
        .executions(Some(&print.id), 100)
        .await
        .unwrap()
        .into_iter()
        .find(|e| e.plugin == "test_misbehave" && e.topic == "job:ready")
        .unwrap()
        .logs;
    for line in ["to stdout", "to stderr", "WARN through the log interface"] {
        assert!(logs.contains(line), "{line:?} missing from {logs:?}");
    }
}

/// A handler that acks its job and returns without ending it succeeds, and its execution
/// record says the job was left executing; one that ends its job gets no such note.
#[tokio::test]
async fn an_execution_record_says_when_the_handler_left_its_job_executing() {
    let (host, env, _good, running) = hostile_host(1).await;
    let sheet = env.create_sheet("left").await.unwrap();
    let left = NewJob { source: Some(sheet.id.clone()), ..NewJob::new(JobType::Sheet, "abandon") };
    let left = env.create_job(left).await.unwrap();
    let print = env.create_job(NewJob::new(JobType::Space, "print")).await.unwrap();
    until_terminal(&env, &print.id).await;
    let ran = |job: String| {
        let env = env.clone();
        move || {
            let (env, job) = (env.clone(), job.clone());
            async move {
                let execs = env.executions(Some(&job), 100).await?;
                Ok(execs.into_iter().find(|e| e.plugin == "test_misbehave" && e.topic == "job:ready"))
            }
        }
    };
    let deadline = Duration::from_secs(60);
    let left_exec =
        tokio::time::timeout(deadline, host.engine.wait_named("the left job's execution record", ran(left.id.clone())))
            .await
            .expect("the abandon handler's execution record within 60 s")
            .unwrap();
    running.shutdown().await;
    assert_eq!((left_exec.outcome, left_exec.error.as_deref()), (ExecutionOutcome::Ok, None));
    let note = format!("[jobhost] the handler returned but job {} is still executing", left.id);
    assert!(left_exec.logs.contains(&note), "{:?}", left_exec.logs);
    assert_eq!(env.job(&left.id).await.unwrap().status, JobStatus::Executing);
    let print_exec = ran(print.id.clone())().await.unwrap().expect("the print handler ran");
    assert!(!print_exec.logs.contains("[jobhost]"), "{:?}", print_exec.logs);
}

#[tokio::test]
async fn plugins_that_cannot_load_are_reported_and_the_rest_still_load() {
    let dir = tempfile::tempdir().unwrap();
    let good = std::fs::read(artifacts::TEST_NOOP).unwrap();
    std::fs::write(dir.path().join("good.wasm"), &good).unwrap();
    std::fs::write(dir.path().join("garbage.wasm"), b"this is not wasm").unwrap();
    std::fs::write(dir.path().join("truncated.wasm"), &good[..good.len() / 2]).unwrap();
    // A valid core module (not a component): the magic and version of wasm 1.0.
    std::fs::write(dir.path().join("core-module.wasm"), b"\0asm\x01\0\0\0").unwrap();
    std::fs::write(dir.path().join("notes.txt"), b"ignored: not a .wasm file").unwrap();
    let rt = test_runtime();
    let (loaded, failed) = rt.load_dir(dir.path()).await.unwrap();
    assert_eq!(loaded.iter().map(|p| p.name.as_str()).collect::<Vec<_>>(), ["good"]);
    assert_eq!(failed.len(), 3, "{failed:?}");
    let text: Vec<String> = failed.iter().map(|e| e.to_string()).collect();
    for name in ["garbage.wasm", "truncated.wasm", "core-module.wasm"] {
        let e = text.iter().find(|t| t.contains(name)).unwrap_or_else(|| panic!("{name} not reported: {text:?}"));
        assert!(e.contains("not a valid WebAssembly component") || e.contains("does not fit"), "{e}");
    }
    assert!(
        rt.load_dir(&dir.path().join("missing"))
            .await
            .unwrap_err()
            .to_string()
            .contains("cannot read the plugins directory")
    );
}

#[tokio::test]
async fn routes_are_read_at_load_and_versions_are_content_hashes() {
    let rt = test_runtime();
    let plugin = load(&rt, artifacts::SUBMIT_LARGE_SHEET).await;
    let routes: Vec<(String, serde_json::Value)> =
        plugin.routes.iter().map(|r| (r.topic.clone(), r.filter.clone())).collect();
    let parent = json!({"job": "sheet:submitLargeSheet", "isPart": false});
    let part = json!({"job": "sheet:submitLargeSheet", "isPart": true});
    assert_eq!(
        routes,
        [("job:ready".into(), parent.clone()), ("job:parts-completed".into(), parent), ("job:ready".into(), part)]
    );
    assert_eq!(plugin.version.len(), 16);
    let again = load(&rt, artifacts::SUBMIT_LARGE_SHEET).await;
    assert_eq!(again.version, plugin.version);
    assert_ne!(load(&rt, artifacts::TEST_NOOP).await.version, plugin.version);
}

#[tokio::test]
async fn a_delivery_finds_its_route_by_key_in_whichever_version_serves_it() {
    let rt = test_runtime();
    let noop = load(&rt, artifacts::TEST_NOOP).await;
    let sheet = load(&rt, artifacts::SUBMIT_LARGE_SHEET).await;
    // Each route at its own place, in the order the plugin declared them.
    for (i, route) in noop.routes.iter().enumerate() {
        assert_eq!(noop.route_index(&route.key()), Some(i as u32), "{route:?}");
    }
    // Another program's routes are not this one's; a manifest-only reload keeps them all.
    assert!(sheet.routes.iter().all(|r| noop.route_index(&r.key()).is_none()));
    assert_eq!(noop.route_index("not a key"), None);
    let reloaded = noop.with_manifest(jobhost::runtime::Manifest::default());
    for (i, route) in noop.routes.iter().enumerate() {
        assert_eq!(reloaded.route_index(&route.key()), Some(i as u32));
    }
}

/// Runs one job through `plugin` on a fresh host and checks it completes.
async fn completes_a_job(rt: &Arc<jobhost::runtime::Runtime>, plugin: Arc<jobhost::runtime::Plugin>) {
    let host = TestHost::new();
    let env = host.env().await;
    let running = host.engine.run(vec![rt.listener(plugin, env.id())]).await.unwrap();
    let job = env.create_job(NewJob::new(JobType::Space, "work")).await.unwrap();
    assert_eq!(until_terminal(&env, &job.id).await.status, JobStatus::Complete);
    running.shutdown().await;
}

/// The tests' runtime settings with a compilation cache in `dir`.
fn cached_in(dir: &std::path::Path) -> jobhost::runtime::RuntimeConfig {
    jobhost::runtime::RuntimeConfig { cache_dir: Some(dir.to_owned()), ..crate::support::test_runtime_config() }
}

/// Waits (on the clock, at most the settling time) until a file's last change is far enough
/// in the past that a digest taken now is trusted at the next start.
fn settled(path: &std::path::Path) {
    let from = jobhost::runtime::digest_trusted_from(path).unwrap().expect("a Unix change time");
    if let Ok(left) = from.duration_since(std::time::SystemTime::now()) {
        std::thread::sleep(left);
    }
}

#[tokio::test]
async fn a_restart_maps_an_unchanged_plugin_without_reading_it_and_reads_a_rewritten_one() {
    let cache = tempfile::tempdir().unwrap();
    let plugins = tempfile::tempdir().unwrap();
    let file = plugins.path().join("p.wasm");
    std::fs::copy(artifacts::TEST_NOOP, &file).unwrap();
    settled(&file);
    let config = cached_in(cache.path());
    let first = jobhost::runtime::Runtime::new(config.clone()).unwrap();
    let version = load(&first, file.to_str().unwrap()).await.version.clone();
    assert_eq!(first.stats().component_reads(), (1, 0), "read and hashed once");
    // A restart: known by the file's identity, mapped, never read.
    let again = jobhost::runtime::Runtime::new(config.clone()).unwrap();
    let plugin = load(&again, file.to_str().unwrap()).await;
    assert_eq!(again.stats().component_reads(), (0, 1), "known unread");
    assert_eq!(again.stats().component_loads(), (1, 0), "mapped");
    assert_eq!(plugin.version, version);
    completes_a_job(&again, plugin).await;
    // The same path rewritten in place with another component: read, hashed, its own version.
    std::fs::write(&file, std::fs::read(artifacts::TEST_MISBEHAVE).unwrap()).unwrap();
    let third = jobhost::runtime::Runtime::new(config).unwrap();
    let other = load(&third, file.to_str().unwrap()).await;
    assert_eq!(third.stats().component_reads(), (1, 0), "a changed file is read");
    assert_ne!(other.version, version);
    assert_eq!(other.version, jobhost::runtime::version_of(&std::fs::read(artifacts::TEST_MISBEHAVE).unwrap()));
}

#[tokio::test]
async fn compiled_plugins_go_to_the_compilation_cache() {
    let cache = tempfile::tempdir().unwrap();
    let config = cached_in(&cache.path().join("wasmtime"));
    let rt = jobhost::runtime::Runtime::new(config.clone()).unwrap();
    load(&rt, artifacts::TEST_NOOP).await;
    assert_eq!(rt.stats().component_loads(), (0, 1), "compiled");
    let entries = compiled_entries(cache.path());
    assert_eq!(entries.len(), 1, "one artifact: {entries:?}");
    // A second runtime (a restarted host) maps the artifact: nothing compiled, nothing new.
    let again = jobhost::runtime::Runtime::new(config).unwrap();
    let plugin = load(&again, artifacts::TEST_NOOP).await;
    assert_eq!(again.stats().component_loads(), (1, 0), "mapped from the cache");
    assert_eq!(compiled_entries(cache.path()), entries);
    // And it works like the compiled one.
    completes_a_job(&again, plugin).await;
}

#[tokio::test]
async fn a_damaged_artifact_is_compiled_again_and_replaced() {
    let cache = tempfile::tempdir().unwrap();
    let config = cached_in(cache.path());
    load(&jobhost::runtime::Runtime::new(config.clone()).unwrap(), artifacts::TEST_NOOP).await;
    let artifact = compiled_entries(cache.path()).remove(0);
    let whole = std::fs::read(&artifact).unwrap();
    // Truncated, as a writer that crashed without the rename could never leave it, but a disk might.
    std::fs::write(&artifact, &whole[..whole.len() / 2]).unwrap();
    let rt = jobhost::runtime::Runtime::new(config.clone()).unwrap();
    load(&rt, artifacts::TEST_NOOP).await;
    assert_eq!(rt.stats().component_loads(), (0, 1), "compiled again");
    assert_eq!(std::fs::read(&artifact).unwrap().len(), whole.len(), "and replaced whole");
    let rt = jobhost::runtime::Runtime::new(config).unwrap();
    load(&rt, artifacts::TEST_NOOP).await;
    assert_eq!(rt.stats().component_loads(), (1, 0), "mapped again");
}

#[tokio::test]
async fn the_compilation_cache_keeps_to_its_budget_least_recently_used_first() {
    let cache = tempfile::tempdir().unwrap();
    // Room for one artifact of these: each write trims the others.
    let config = jobhost::runtime::RuntimeConfig { cache_max_bytes: 1, ..cached_in(cache.path()) };
    let rt = jobhost::runtime::Runtime::new(config.clone()).unwrap();
    load(&rt, artifacts::TEST_NOOP).await;
    let noop = compiled_entries(cache.path());
    load(&rt, artifacts::SUBMIT_LARGE_SHEET).await;
    let sheet = compiled_entries(cache.path());
    assert_eq!(sheet.len(), 1, "over budget, only the newest stays: {sheet:?}");
    assert_ne!(sheet, noop);
    // Plugins loaded before keep working: a removed artifact stays mapped while in use.
    assert_eq!(rt.stats().component_loads(), (0, 2));
}

#[tokio::test]
async fn a_cache_that_cannot_be_written_costs_a_compile_never_a_load() {
    let cache = tempfile::tempdir().unwrap();
    let config = cached_in(cache.path());
    let rt = jobhost::runtime::Runtime::new(config).unwrap();
    // The engine's directory replaced by a file: nothing can be written under it.
    let dir = std::fs::read_dir(cache.path().join("components")).unwrap().next().unwrap().unwrap().path();
    std::fs::remove_dir(&dir).unwrap();
    std::fs::write(&dir, b"not a directory").unwrap();
    let plugin = load(&rt, artifacts::TEST_NOOP).await;
    assert!(!plugin.routes.is_empty());
    assert_eq!(rt.stats().component_loads(), (0, 1));
}

#[tokio::test]
async fn memory_and_wall_clock_limits_are_attributed() {
    let host = TestHost::with_config(EngineConfig { max_attempts: 1, ..test_config() });
    let env = host.env().await;
    let base = crate::support::test_runtime_config();
    let rt = jobhost::runtime::Runtime::new(jobhost::runtime::RuntimeConfig {
        limits: jobhost::runtime::Limits { wall: Duration::from_millis(500), memory: 16 << 20, ..base.limits.clone() },
        ..base
    })
    .unwrap();
    let bad = load(&rt, artifacts::TEST_MISBEHAVE).await;
    let running = host.engine.run(vec![rt.listener(bad, env.id())]).await.unwrap();
    let bomb = env.create_job(NewJob::new(JobType::Space, "bomb")).await.unwrap();
    let sleep = env.create_job(NewJob::new(JobType::Space, "sleep")).await.unwrap();
    let bomb_dead = dead_letter_for(&host, &env, &bomb.id).await;
    let sleep_dead = dead_letter_for(&host, &env, &sleep.id).await;
    running.shutdown().await;

    assert!(bomb_dead.last_error.starts_with("memory limit 16 MiB exceeded"), "{}", bomb_dead.last_error);
    let exec = env.executions(Some(&bomb.id), 10).await.unwrap().into_iter().find(|e| e.topic == "job:ready").unwrap();
    assert_eq!(exec.outcome, ExecutionOutcome::Memory);

    assert_eq!(sleep_dead.last_error, "wall-clock limit 0.5 s exceeded (host calls included)");
    let exec = env.executions(Some(&sleep.id), 10).await.unwrap().into_iter().find(|e| e.topic == "job:ready").unwrap();
    assert_eq!(exec.outcome, ExecutionOutcome::Timeout);
    assert!(exec.cpu_us < 100_000, "sleeping is not CPU: {} µs charged", exec.cpu_us);
}
