//! Plugins in other languages than Rust, built from `plugins/<language>/` by `jobhost::build`
//! (pinned tools, installed into the build's target directory on first use, builds cached by
//! content) and run against the same host as the Rust plugin: the seeds' scenario with the
//! same records, counts and outcome, and a handler's exception as a failed delivery.

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use jobhost::model::{ExecutionOutcome, JobStatus, JobType, NewJob};
use jobhost::runtime::{Plugin, Runtime, RuntimeConfig};
use jobhost::scenario;
use jobhost_tests::{TestHost, events_of, until_terminal};
use serde_json::json;

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap()
}

/// Builds `plugins/<dir>`; the tools and builds live in this build's target directory.
fn built(dir: &str) -> PathBuf {
    let tools = Path::new(env!("CARGO_TARGET_TMPDIR")).join("tools");
    jobhost::build::build_in(&repo().join("plugins").join(dir), &tools)
        .unwrap_or_else(|e| panic!("build plugins/{dir}: {e:#}"))
}

/// One runtime for the whole file, with a compilation cache in the target directory: a large
/// component is compiled once per content, not once per test.
fn runtime() -> Arc<Runtime> {
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_plugin_runs_the_seeds_scenario_like_the_rust_one() {
    let python = load(&built("python/submit-large-sheet")).await;
    let names: Vec<&str> = python.routes.iter().map(|r| r.topic.as_str()).collect();
    assert_eq!(names, ["job:ready", "job:parts-completed", "job:ready"], "routes, in declaration order");
    let (_h, env, job, sheet, invalid) = seeds(vec![python], 5_000).await;
    assert_eq!(job.status, JobStatus::Complete, "{}", job.outcome);
    assert_eq!(job.outcome["parts"], json!({"total": 5, "completed": 5, "failed": 0, "canceled": 0}));
    assert_eq!(job.outcome["records"], json!({"total": 5_000, "valid": 5_000 - invalid, "error": invalid}));
    assert!(job.outcome["message"].as_str().unwrap().starts_with("5 of 5 parts completed"));
    assert_eq!(events_of(&env, &job.id, "job:parts-completed").await.len(), 1);
    assert_eq!(env.record_counts(&sheet).await.unwrap().error, invalid);

    // Same messages as the Rust plugin writes, cell by cell.
    let (_h2, rust_env, rust_job, rust_sheet, _) =
        seeds(vec![jobhost_tests::load(&runtime(), jobhost::artifacts::SUBMIT_LARGE_SHEET).await], 5_000).await;
    assert_eq!(rust_job.status, JobStatus::Complete);
    for page in 1..=5 {
        let py = env.records(&sheet, 1000, page).await.unwrap().records;
        let rs = rust_env.records(&rust_sheet, 1000, page).await.unwrap().records;
        for (a, b) in py.iter().zip(&rs) {
            assert_eq!(a.values, b.values, "record {} vs {}", a.id, b.id);
        }
    }
    let execs = env.executions(None, 100).await.unwrap();
    assert_eq!(execs.len(), 7);
    assert!(execs.iter().all(|e| e.outcome == ExecutionOutcome::Ok), "{execs:?}");
    assert!(execs.iter().any(|e| e.logs.contains("split")), "log.info reaches the delivery's log");
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
                .wait_for(|| {
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
    assert_eq!(env.job(&job.id).await.unwrap().info.as_deref().map(|i| i.contains("ValueError")), Some(true));

    let e = failed(refused.id.clone()).await;
    let error = e.error.clone().unwrap_or_default();
    assert!(error.starts_with("not-found:"), "a host refusal keeps its kind: {error}");
    running.shutdown().await;
}
