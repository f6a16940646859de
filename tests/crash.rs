//! A host killed with SIGKILL mid-scenario loses nothing.
//!
//! The test re-runs its own binary as the host process (the ignored test `crash_child`, which
//! runs `jobhost demo` on a given data directory), reads the child's progress lines, and kills
//! it at chosen points: after the job is created, after some parts ended, right after
//! `job:parts-completed`. Each restart on the same directory resumes the scenario. At the end
//! the store must show every part ended, one `job:parts-completed`, the parent complete, every
//! record validated, and every delivery done.

use std::io::{BufRead, BufReader};
use std::process::{Command, ExitCode, Stdio};

use crate::support::test_config;
use jobhost::cli::{DemoArgs, HostArgs};
use jobhost::model::JobStatus;

const RECORDS: u64 = 20_000;
const PARTS: u64 = RECORDS / 1000;

#[derive(Debug, Clone, Copy)]
enum KillAt {
    JobCreated,
    PartsEnded(u64),
    PartsCompleted,
    Never,
}

impl KillAt {
    fn hit(self, line: &str) -> bool {
        match self {
            KillAt::JobCreated => line.starts_with("created job"),
            KillAt::PartsEnded(n) => line
                .strip_prefix("parts ended: ")
                .and_then(|r| r.split('/').next())
                .and_then(|k| k.parse::<u64>().ok())
                .is_some_and(|k| k >= n),
            KillAt::PartsCompleted => line.starts_with("parts-completed"),
            KillAt::Never => false,
        }
    }
}

/// Runs the child host until `kill_at` shows in its output (then SIGKILLs it) or it exits.
/// Returns whether it was killed and the lines it printed.
fn run_host(dir: &std::path::Path, kill_at: KillAt) -> (bool, Option<i32>, Vec<String>) {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["crash::crash_child", "--exact", "--ignored", "--nocapture", "--test-threads=1"])
        .env("JOBHOST_CRASH_DATA", dir)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn the child host");
    // The deadline of every wait below: a child that hangs is killed, and the test fails.
    crate::cli::kill_after(child.id(), 300);
    let stderr = BufReader::new(child.stderr.take().unwrap());
    let mut lines = Vec::new();
    let mut killed = false;
    for line in stderr.lines() {
        let line = line.unwrap();
        let hit = kill_at.hit(&line);
        lines.push(line);
        if hit {
            child.kill().expect("SIGKILL the child host");
            killed = true;
            break;
        }
    }
    let status = child.wait().unwrap();
    (killed, status.code(), lines)
}

#[test]
fn a_host_killed_mid_scenario_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let plan = [
        KillAt::JobCreated,
        KillAt::PartsEnded(3),
        KillAt::PartsEnded(8),
        KillAt::PartsEnded(13),
        KillAt::PartsCompleted,
        KillAt::Never,
    ];
    let mut kills = 0;
    for (i, kill_at) in plan.into_iter().enumerate() {
        let (killed, code, lines) = run_host(dir.path(), kill_at);
        kills += usize::from(killed);
        eprintln!("run {i} {kill_at:?}: killed={killed} code={code:?} last={:?}", lines.last());
        if !killed {
            assert_eq!(code, Some(0), "run {i} ({kill_at:?}) ended without completing the job:\n{}", lines.join("\n"));
            break;
        }
    }
    assert!(kills >= 3, "the host was killed only {kills} times; the test would prove little");

    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let state: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.path().join("demo.json")).unwrap()).unwrap();
        let engine = jobhost::open_engine(dir.path(), test_config()).unwrap();
        let env = engine.env(state["environmentId"].as_str().unwrap());
        let job_id = state["jobId"].as_str().unwrap();
        let job = env.job(job_id).await.unwrap();
        assert_eq!(job.status, JobStatus::Complete, "{}", job.outcome);
        let parts = env.parts(job_id).await.unwrap();
        assert_eq!(parts.len() as u64, PARTS);
        assert!(parts.iter().all(|p| p.status == JobStatus::Complete));
        let pc: Vec<_> =
            env.job_events(job_id).await.unwrap().into_iter().filter(|e| e.topic == "job:parts-completed").collect();
        assert_eq!(pc.len(), 1, "parts-completed exactly once across {kills} kills");
        assert_eq!(
            pc[0].payload["parts"],
            serde_json::json!({"total": PARTS, "completed": PARTS, "failed": 0, "canceled": 0})
        );
        let counts = env.record_counts(state["sheetId"].as_str().unwrap()).await.unwrap();
        assert_eq!((counts.total, counts.error), (RECORDS, state["expectedInvalid"].as_u64().unwrap()));
        let stats = engine.delivery_stats().await.unwrap();
        assert_eq!((stats.pending, stats.leased, stats.dead), (0, 0, 0), "every delivery finished: {stats:?}");
        assert!(stats.done > PARTS, "parent ready, part readies, parts-completed: {stats:?}");
    });
}

/// The child host of the crash test; does nothing useful on its own.
#[tokio::test]
#[ignore = "run as a child process by a_host_killed_mid_scenario_loses_nothing"]
async fn crash_child() {
    let dir = std::env::var("JOBHOST_CRASH_DATA").expect("JOBHOST_CRASH_DATA is set by the parent test");
    let host = HostArgs { data: Some(dir.into()), json: false, concurrency: Some(2) };
    let code = jobhost::cli::demo_for_tests(DemoArgs { records: RECORDS, native: true, host }).await.unwrap();
    std::process::exit(if code == ExitCode::SUCCESS { 0 } else { 1 });
}
