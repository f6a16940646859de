//! Shared helpers for the integration tests: a host on a temporary data directory and a few
//! ways to wait on observable state.

use std::time::Duration;

use jobhost::model::{Event, Job, JobStatus};
use jobhost::{Engine, EngineConfig, Env};
use tempfile::TempDir;

/// An engine on a temporary data directory, removed when dropped.
pub struct TestHost {
    /// The engine.
    pub engine: Engine,
    /// Keeps the directory alive.
    pub dir: TempDir,
}

/// Settings for tests: quick retries, watchdog off unless a test turns it on.
pub fn test_config() -> EngineConfig {
    EngineConfig {
        ack_timeout: None,
        stale_timeout: None,
        retry_backoff: Duration::from_millis(5),
        lease: Duration::from_secs(60),
        ..EngineConfig::default()
    }
}

impl TestHost {
    /// A host with [`test_config`].
    pub fn new() -> Self {
        Self::with_config(test_config())
    }

    /// A host with explicit settings.
    pub fn with_config(config: EngineConfig) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let engine = Engine::open(dir.path(), config).expect("open engine");
        Self { engine, dir }
    }

    /// A new environment's API.
    pub async fn env(&self) -> Env {
        let e = self.engine.create_environment("test").await.expect("create environment");
        self.engine.env(e.id)
    }
}

impl Default for TestHost {
    fn default() -> Self {
        Self::new()
    }
}

/// Waits until job `id` is terminal and returns it.
pub async fn until_terminal(env: &Env, id: &str) -> Job {
    let (env2, id) = (env.clone(), id.to_owned());
    env.engine()
        .wait_for(move || {
            let (env, id) = (env2.clone(), id.clone());
            async move { Ok(Some(env.job(&id).await?).filter(|j| j.status.is_terminal())) }
        })
        .await
        .expect("wait for a terminal job")
}

/// Waits until job `id` has `status`.
pub async fn until_status(env: &Env, id: &str, status: JobStatus) -> Job {
    let (env2, id) = (env.clone(), id.to_owned());
    env.engine()
        .wait_for(move || {
            let (env, id) = (env2.clone(), id.clone());
            async move { Ok(Some(env.job(&id).await?).filter(|j| j.status == status)) }
        })
        .await
        .expect("wait for a job status")
}

/// Every event of the environment, oldest first.
pub async fn all_events(env: &Env) -> Vec<Event> {
    env.events(0, u32::MAX).await.expect("events")
}

/// The events of `topic` about `job_id`.
pub async fn events_of(env: &Env, job_id: &str, topic: &str) -> Vec<Event> {
    env.job_events(job_id).await.expect("job events").into_iter().filter(|e| e.topic == topic).collect()
}

/// Runtime settings for tests: short CPU and wall limits, no compilation cache shared with
/// anything outside the test.
pub fn test_runtime_config() -> jobhost::runtime::RuntimeConfig {
    jobhost::runtime::RuntimeConfig {
        limits: jobhost::runtime::Limits {
            cpu: Duration::from_millis(300),
            wall: Duration::from_secs(10),
            ..Default::default()
        },
        max_instances: 32,
        cache_dir: None,
        ..Default::default()
    }
}

/// A runtime with [`test_runtime_config`].
pub fn test_runtime() -> std::sync::Arc<jobhost::runtime::Runtime> {
    jobhost::runtime::Runtime::new(test_runtime_config()).expect("runtime")
}

/// Loads a plugin that must load.
pub async fn load(
    rt: &std::sync::Arc<jobhost::runtime::Runtime>,
    path: &str,
) -> std::sync::Arc<jobhost::runtime::Plugin> {
    std::sync::Arc::new(rt.load(std::path::Path::new(path)).await.unwrap_or_else(|e| panic!("load {path}: {e}")))
}
