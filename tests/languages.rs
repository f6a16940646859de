//! Plugins in Python, JavaScript and C, built from `plugins/<language>/` by `jobhost::build`
//! (pinned tools, installed into the build's target directory on first use, builds cached by
//! content) and run against the same host as the Rust plugin: the seeds' scenario with the
//! same records, counts and outcome, and a handler's exception as a failed delivery.

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use crate::support::{TestHost, WaitNamed, events_of, until_terminal};
use jobhost::model::{ExecutionOutcome, JobStatus, JobType, NewJob};
use jobhost::runtime::{Plugin, Runtime, RuntimeConfig};
use jobhost::scenario;
use serde_json::json;

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().and_then(Path::parent).unwrap()
}

/// Builds `plugins/<dir>`; the tools and builds live in this build's target directory.
pub(crate) fn built(dir: &str) -> PathBuf {
    let tools = Path::new(env!("CARGO_TARGET_TMPDIR")).join("tools");
    jobhost::build::build_in(&repo().join("plugins").join(dir), &tools)
        .unwrap_or_else(|e| panic!("build plugins/{dir}: {e:#}"))
}

/// One runtime for the whole file, with a compilation cache in the target directory: a large
/// component is compiled once per content, not once per test.
pub(crate) fn runtime() -> Arc<Runtime> {
    static RT: OnceLock<Arc<Runtime>> = OnceLock::new();
    RT.get_or_init(|| {
        let mut config = RuntimeConfig {
            cache_dir: Some(Path::new(env!("CARGO_TARGET_TMPDIR")).join("wasmtime-cache")),
            max_instances: 32,
            ..RuntimeConfig::default()
        };
        config.limits.cpu = Duration::from_secs(5);
        Runtime::new(config).unwrap()
    })
    .clone()
}

async fn load(path: &Path) -> Arc<Plugin> {
    Arc::new(runtime().load(path).await.unwrap_or_else(|e| panic!("load {}: {e}", path.display())))
}

/// The seeds' scenario on `records` sample records through `plugins`; returns the environment,
/// the ended parent, the sheet and the invalid count by construction.
async fn seeds(plugins: Vec<Arc<Plugin>>, records: u64) -> (TestHost, jobhost::Env, jobhost::model::Job, String, u64) {
    let host = TestHost::new();
    let env = host.env().await;
    let rt = runtime();
    let listeners = plugins.into_iter().map(|p| rt.listener(p, env.id())).collect();
    let running = host.engine.run(listeners).await.unwrap();
    let sheet = env.create_sheet("people").await.unwrap();
    let (rows, invalid) = scenario::sample_records(records);
    env.insert_records(&sheet.id, rows).await.unwrap();
    let job = env.create_job(NewJob::sheet(scenario::OPERATION, &sheet.id)).await.unwrap();
    let job = until_terminal(&env, &job.id).await;
    running.shutdown().await;
    (host, env, job, sheet.id, invalid)
}

/// The seeds' scenario through the plugin built from `dir`: the same counts, outcome and
/// messages, cell by cell, as the Rust plugin on the same records.
async fn runs_the_seeds_scenario_like_the_rust_plugin(dir: &str) {
    let plugin = load(&built(dir)).await;
    let topics: Vec<&str> = plugin.routes.iter().map(|r| r.topic.as_str()).collect();
    assert_eq!(topics, ["job:ready", "job:parts-completed", "job:ready"], "routes, in declaration order");
    let (_h, env, job, sheet, invalid) = seeds(vec![plugin], 5_000).await;
    assert_eq!(job.status, JobStatus::Complete, "{}", job.outcome);
    assert_eq!(job.outcome["parts"], json!({"total": 5, "completed": 5, "failed": 0, "canceled": 0}));
    assert_eq!(job.outcome["records"], json!({"total": 5_000, "valid": 5_000 - invalid, "error": invalid}));
    assert!(job.outcome["message"].as_str().unwrap().starts_with("5 of 5 parts completed"));
    assert_eq!(events_of(&env, &job.id, "job:parts-completed").await.len(), 1);
    assert_eq!(env.record_counts(&sheet).await.unwrap().error, invalid);

    let (_h2, rust_env, rust_job, rust_sheet, _) =
        seeds(vec![crate::support::load(&runtime(), jobhost_test_plugins::SUBMIT_LARGE_SHEET).await], 5_000).await;
    assert_eq!(rust_job.status, JobStatus::Complete);
    for page in 1..=5 {
        let ours = env.records(&sheet, 1000, page).await.unwrap().records;
        let rust = rust_env.records(&rust_sheet, 1000, page).await.unwrap().records;
        for (a, b) in ours.iter().zip(&rust) {
            assert_eq!(a.values, b.values, "{dir}: record {} vs {}", a.id, b.id);
        }
    }
    let execs = env.executions(None, 100).await.unwrap();
    assert_eq!(execs.len(), 7);
    assert!(execs.iter().all(|e| e.outcome == ExecutionOutcome::Ok), "{execs:?}");
    assert!(execs.iter().any(|e| e.logs.contains("split")), "the log reaches the delivery's log");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_plugin_runs_the_seeds_scenario_like_the_rust_one() {
    runs_the_seeds_scenario_like_the_rust_plugin("python/submit-large-sheet").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_javascript_plugin_runs_the_seeds_scenario_like_the_rust_one() {
    runs_the_seeds_scenario_like_the_rust_plugin("js/submit-large-sheet").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_c_plugin_runs_the_seeds_scenario_like_the_rust_one() {
    runs_the_seeds_scenario_like_the_rust_plugin("c/submit-large-sheet").await;
}

/// The first failed delivery of each job, by job id.
async fn first_failures(dir: &str, jobs: &[&str]) -> Vec<jobhost::model::Execution> {
    let plugin = load(&built(dir)).await;
    // No retry while the test looks: a second attempt's `ack` would set the job's info again
    // before the test reads the note the first attempt's failure left there.
    let config = jobhost::EngineConfig { retry_backoff: Duration::from_secs(3600), ..crate::support::test_config() };
    let host = TestHost::with_config(config);
    let env = host.env().await;
    let running = host.engine.run(vec![runtime().listener(plugin, env.id())]).await.unwrap();
    let mut out = Vec::new();
    for op in jobs {
        let job = env.create_job(NewJob::new(JobType::Space, *op)).await.unwrap();
        let execution = env
            .engine()
            .wait_named("the job's execution record", || {
                let (env, job_id) = (env.clone(), job.id.clone());
                async move {
                    let execs = env.executions(Some(&job_id), 10).await?;
                    Ok(execs.into_iter().find(|e| e.outcome != ExecutionOutcome::Ok))
                }
            })
            .await
            .unwrap();
        let info = env.job(&job.id).await.unwrap().info.unwrap_or_default();
        assert!(info.contains(execution.error.as_deref().unwrap_or("?").lines().next().unwrap()), "{info}");
        out.push(execution);
    }
    running.shutdown().await;
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_javascript_exception_fails_the_delivery_with_its_message() {
    let failed = first_failures("js/test-raise", &["explode", "refused", "hang"]).await;
    let error = |i: usize| failed[i].error.clone().unwrap_or_default();
    assert!(failed.iter().all(|e| e.outcome == ExecutionOutcome::Error), "{failed:?}");
    // A rejected promise (the handler is async): the error and where it was thrown.
    assert!(error(0).starts_with("TypeError: bad input in {\"row\":7}"), "{}", error(0));
    assert!(error(0).contains("@__bundle.js:"), "the stack names lines of the bundle: {}", error(0));
    assert!(failed[0].logs.contains("throwing now"), "{}", failed[0].logs);
    // A synchronous handler and a host refusal it did not catch: the refusal's kind.
    assert!(error(1).starts_with("not-found:"), "{}", error(1));
    // A promise that never settles cannot pass for success.
    assert!(error(2).contains("never settled"), "{}", error(2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_exception_fails_the_delivery_with_its_message() {
    let plugin = load(&built("python/test-raise")).await;
    let host = TestHost::new();
    let env = host.env().await;
    let running = host.engine.run(vec![runtime().listener(plugin, env.id())]).await.unwrap();
    let job = env.create_job(NewJob::new(JobType::Space, "explode")).await.unwrap();
    let refused = env.create_job(NewJob::new(JobType::Space, "refused")).await.unwrap();
    // The first failed delivery of a job (it is retried; the first one is enough).
    let failed = |job_id: String| {
        let env = env.clone();
        async move {
            env.engine()
                .wait_named("a failed delivery's execution record", || {
                    let (env, job_id) = (env.clone(), job_id.clone());
                    async move {
                        let execs = env.executions(Some(&job_id), 10).await?;
                        Ok(execs.into_iter().find(|e| e.outcome != ExecutionOutcome::Ok))
                    }
                })
                .await
                .unwrap()
        }
    };
    let e = failed(job.id.clone()).await;
    assert_eq!(e.outcome, ExecutionOutcome::Error, "{e:?}");
    let error = e.error.clone().unwrap_or_default();
    assert!(error.contains("ValueError: bad input in {'row': 7}"), "{error}");
    assert!(error.contains("Traceback") && error.contains("app.py"), "the traceback names the line: {error}");
    assert!(e.logs.contains("raising now"), "{}", e.logs);
    // The host notes the failure on the job. A retry's `ack` (5 ms later here) sets its own info
    // again, so wait for the note rather than read it once: after the last attempt it stays.
    let noted = tokio::time::timeout(
        std::time::Duration::from_secs(60),
        env.engine().wait_named("the failure noted on the job", || {
            let (env, id) = (env.clone(), job.id.clone());
            async move { Ok(env.job(&id).await?.info.filter(|i| i.contains("ValueError"))) }
        }),
    )
    .await
    .expect("the job's info never noted the ValueError")
    .unwrap();
    assert!(noted.contains("failed on job:ready (attempt "), "{noted}");

    let e = failed(refused.id.clone()).await;
    let error = e.error.clone().unwrap_or_default();
    assert!(error.starts_with("not-found:"), "a host refusal keeps its kind: {error}");
    running.shutdown().await;
}

/// A plugin of `language` that serves only one side of the seeds' example: the example's own
/// source as a module, and an app that keeps the routes of that side.
fn one_side(language: &str, parts: bool) -> PathBuf {
    let dir =
        Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("{language}-{}", if parts { "parts" } else { "parent" }));
    std::fs::create_dir_all(&dir).unwrap();
    let example = repo().join("plugins").join(language).join("submit-large-sheet");
    let app = match language {
        "js" => {
            std::fs::copy(example.join("app.js"), dir.join("example.js")).unwrap();
            format!(
                "import setup from \"./example.js\";\n\
                 export default function (listener) {{\n\
                 \x20 setup({{ filter(f, configure) {{ if (f.isPart === {parts}) listener.filter(f, configure); return this; }} }});\n\
                 }}\n"
            )
        }
        _ => {
            std::fs::copy(example.join("app.py"), dir.join("example.py")).unwrap();
            let side = if parts { "True" } else { "False" };
            format!(
                "from jobhost_listener import Listener, listener  # noqa: F401\n\
                 import example  # noqa: F401 (registers every route of the example)\n\n\
                 listener.routes[:] = [r for r in listener.routes if (r[1] or {{}}).get(\"isPart\") is {side}]\n"
            )
        }
    };
    std::fs::write(dir.join(if language == "js" { "app.js" } else { "app.py" }), app).unwrap();
    let tools = Path::new(env!("CARGO_TARGET_TMPDIR")).join("tools");
    jobhost::build::build_in(&dir, &tools).unwrap_or_else(|e| panic!("build {}: {e:#}", dir.display()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_javascript_parent_with_python_parts_runs_the_seeds_scenario() {
    let parent = load(&one_side("js", false)).await;
    let parts = load(&one_side("python", true)).await;
    assert_eq!(parent.routes.len(), 2, "job:ready and job:parts-completed of the parent");
    assert_eq!(parts.routes.len(), 1, "job:ready of the parts");
    let (_h, env, job, sheet, invalid) = seeds(vec![parent, parts], 5_000).await;
    assert_eq!(job.status, JobStatus::Complete, "{}", job.outcome);
    assert_eq!(job.outcome["parts"], json!({"total": 5, "completed": 5, "failed": 0, "canceled": 0}));
    assert_eq!(env.record_counts(&sheet).await.unwrap().error, invalid);
    let execs = env.executions(None, 100).await.unwrap();
    let by = |plugin: &str| execs.iter().filter(|e| e.plugin == plugin).count();
    assert_eq!((by("js-parent"), by("python-parts")), (2, 5), "{execs:?}");
    assert!(execs.iter().all(|e| e.outcome == ExecutionOutcome::Ok));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_or_trapping_c_handler_fails_only_its_delivery() {
    let failed = first_failures("c/test-raise", &["explode", "refused", "trap"]).await;
    let error = |i: usize| failed[i].error.clone().unwrap_or_default();
    assert_eq!(failed[0].outcome, ExecutionOutcome::Error);
    assert_eq!(error(0), "bad input in row 7");
    assert!(failed[0].logs.contains("failing now"), "{}", failed[0].logs);
    assert!(error(1).starts_with("not-found:"), "{}", error(1));
    assert_eq!(failed[2].outcome, ExecutionOutcome::Trap, "{:?}", failed[2]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_component_is_compiled_once_then_loaded_from_the_cache() {
    let component = built("python/test-noop");
    let cache = tempfile::tempdir().unwrap();
    let config = RuntimeConfig { cache_dir: Some(cache.path().join("wasmtime")), ..RuntimeConfig::default() };
    let cold = Runtime::new(config.clone()).unwrap();
    cold.load(&component).await.unwrap();
    assert_eq!(cold.stats().component_loads(), (0, 1));
    let entries = crate::support::compiled_entries(cache.path());
    assert_eq!(entries.len(), 1, "the compiled component was cached");
    // A restarted host: a new runtime on the same cache maps it without compiling again.
    let warm = Runtime::new(config).unwrap();
    let plugin = warm.load(&component).await.unwrap();
    assert_eq!(plugin.routes[0].topic, "bench:noop");
    assert_eq!(warm.stats().component_loads(), (1, 0), "mapped, not compiled");
    assert_eq!(crate::support::compiled_entries(cache.path()), entries, "nothing new was compiled");
}
