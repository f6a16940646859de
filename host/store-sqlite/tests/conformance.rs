//! The SQLite backend against the store conformance suite, and what only this backend promises:
//! a data directory one process at a time, and everything still there after a reopen.

use std::path::Path;
use std::sync::Arc;

use jobhost_engine::conformance::{TestHost, test_config};
use jobhost_engine::model::{Ack, JobStatus, JobType, NewJob};
use jobhost_engine::{Engine, EngineConfig};
use jobhost_store::Backend;
use jobhost_store_sqlite::{SqliteBackend, SqliteOptions};

fn open(scratch: &Path) -> Arc<dyn Backend> {
    Arc::new(SqliteBackend::open(SqliteOptions::new(scratch.join("store"))).expect("open the SQLite store"))
}

jobhost_engine::conformance_suite!(open);

fn open_engine(dir: &Path, config: EngineConfig) -> jobhost_engine::Result<Engine> {
    Ok(Engine::with_backend(Arc::new(SqliteBackend::open(SqliteOptions::new(dir))?), config))
}

#[tokio::test]
async fn a_reopened_store_has_everything_and_a_second_process_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (env_id, job_id, first_host) = {
        let engine = open_engine(dir.path(), test_config()).unwrap();
        let err = open_engine(dir.path(), test_config()).unwrap_err();
        assert!(err.to_string().contains("in use by another jobhost process"), "{err}");
        let e = engine.create_environment("durable").await.unwrap();
        let env = engine.env(&e.id);
        let job = env.create_job(NewJob::new(JobType::File, "work")).await.unwrap();
        env.ack(&job.id, Ack::default()).await.unwrap();
        (e.id, job.id, engine.host_id())
    };
    let engine = open_engine(dir.path(), test_config()).unwrap();
    let job = engine.env(&env_id).job(&job_id).await.unwrap();
    assert_eq!(job.status, JobStatus::Executing);
    assert_ne!(engine.host_id(), first_host, "a host's identity belongs to its process, not to the database");
}

#[tokio::test]
async fn the_suite_runs_on_this_backend() {
    // The harness opens this backend: a TestHost's store is a SQLite file in its scratch dir.
    jobhost_engine::conformance::install(open);
    let host = TestHost::new();
    host.env().await;
    assert!(host.dir.path().join("store").join("jobhost.db").is_file());
}
