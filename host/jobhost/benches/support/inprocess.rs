//! The in-process host the runtime benchmarks measure, and the seeds' scenario on it: the
//! baseline of the benchmarks that run the same scenario through `jobhost serve`.

use std::time::{Duration, Instant};

use jobhost::model::{JobStatus, NewJob};
use jobhost::runtime::{Runtime, RuntimeConfig};
use jobhost::{Engine, EngineConfig, Env, scenario};
use serde_json::Value;

fn config() -> EngineConfig {
    EngineConfig { ack_timeout: None, stale_timeout: None, ..EngineConfig::single_environment(256) }
}

pub fn runtime() -> std::sync::Arc<Runtime> {
    // One plugin may use every slot, as the CLI allows with `--concurrency`.
    let limits = jobhost::runtime::Limits { max_instances: 256, ..Default::default() };
    Runtime::new(RuntimeConfig { cache_dir: None, limits, ..RuntimeConfig::default() }).unwrap()
}

pub async fn host() -> (tempfile::TempDir, Engine, Env) {
    let dir = tempfile::tempdir().unwrap();
    let engine = jobhost::open_engine(dir.path(), config()).unwrap();
    let env = engine.env(engine.create_environment("bench").await.unwrap().id);
    (dir, engine, env)
}

pub async fn wait_terminal(engine: &Engine, env: &Env, id: &str) -> jobhost::model::Job {
    engine
        .wait_for(|| {
            let (env, id) = (env.clone(), id.to_owned());
            async move { Ok(Some(env.job(&id).await?).filter(|j| j.status.is_terminal())) }
        })
        .await
        .unwrap()
}

/// The seeds' scenario through the plugin at `plugin` (on that runtime), or natively.
pub async fn scenario_with(n: u64, plugin: Option<(std::sync::Arc<Runtime>, std::path::PathBuf)>) -> ScenarioRun {
    let (_dir, engine, env) = host().await;
    let listeners = match plugin {
        Some((rt, path)) => {
            let plugin = std::sync::Arc::new(rt.load(&path).await.unwrap());
            vec![rt.listener(plugin, env.id())]
        }
        None => scenario::listeners(env.id(), scenario::Options::default()),
    };
    let running = engine.run(listeners).await.unwrap();
    let sheet = env.create_sheet("people").await.unwrap();
    let invalid = scenario::insert_sample(&env, &sheet.id, n).await.unwrap();
    let took = run_scenario_job(&engine, &env, &sheet.id, n, invalid).await;
    running.shutdown().await;
    took
}

/// One run of the seeds' job: its time from creation to its end, and the CPU spent meanwhile
/// by the store's writer thread and by every thread of the process that lived through it.
#[derive(Debug, Clone, Copy)]
#[allow(dead_code)] // the serve bench reads only the time
pub struct ScenarioRun {
    pub took: Duration,
    pub writer_cpu: Duration,
    pub all_cpu: Duration,
}

/// Creates the seeds' job on `sheet` (of `n` records, `invalid` of them breaking a rule),
/// waits for it to end and checks its answer.
pub async fn run_scenario_job(engine: &Engine, env: &Env, sheet: &str, n: u64, invalid: u64) -> ScenarioRun {
    let (writer, all) = (thread_cpu(WRITER_THREAD), thread_cpu(""));
    let t = Instant::now();
    let job = env.create_job(NewJob::sheet(scenario::OPERATION, sheet)).await.unwrap();
    let job = wait_terminal(engine, env, &job.id).await;
    let took = t.elapsed();
    let (writer_cpu, all_cpu) = (thread_cpu(WRITER_THREAD).saturating_sub(writer), thread_cpu("").saturating_sub(all));
    assert_eq!(job.status, JobStatus::Complete, "{}", job.outcome);
    assert_eq!(env.record_counts(sheet).await.unwrap().error, invalid);
    assert_eq!(job.outcome["parts"]["completed"], Value::from(n.div_ceil(1000)));
    ScenarioRun { took, writer_cpu, all_cpu }
}

/// The store writer thread's name as the kernel shows it (15 bytes).
pub const WRITER_THREAD: &str = "jobhost-store-w";

/// CPU time spent so far by this process's threads whose name starts with `prefix` (all
/// threads for `""`), from the scheduler's own per-thread accounting
/// (`/proc/self/task/*/schedstat`, nanoseconds). A thread that exits takes its time with it:
/// measure across a window in which the threads of interest live.
pub fn thread_cpu(prefix: &str) -> Duration {
    let mut total = Duration::ZERO;
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else { return total };
    for task in tasks.flatten() {
        let path = task.path();
        let name = std::fs::read_to_string(path.join("comm")).unwrap_or_default();
        if !name.starts_with(prefix) {
            continue;
        }
        let ns = std::fs::read_to_string(path.join("schedstat"))
            .ok()
            .and_then(|s| s.split_whitespace().next()?.parse::<u64>().ok())
            .unwrap_or(0);
        total += Duration::from_nanos(ns);
    }
    total
}
