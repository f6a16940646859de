//! The hostile plugin suite: each test runs one attack from a plugin in the attacker's
//! environment, asserts the exact attribution (execution record, job info, store contents),
//! and checks that a well-behaved plugin in a second environment keeps completing its jobs —
//! *while* the attack runs, for the attacks that take time.

use std::sync::Arc;

use crate::support::{
    TestHost, WaitNamed, test_config, test_runtime_config, until_terminal, wat_component, wat_listener,
};
use jobhost::model::{Execution, ExecutionOutcome, Job, JobStatus, JobType, NewJob};
use jobhost::runtime::{LoadError, Runtime, RuntimeConfig};
use jobhost::{EngineConfig, Env, scenario};
use jobhost_test_plugins as artifacts;
use serde_json::{Value, json};

/// The hostile plugin's manifest in most tests: tight limits, a few grants.
const HOSTILE: &str = r#"
[limits]
cpu_ms = 1500
wall_ms = 3000
memory_mib = 32
table_elements = 50000
max_log_bytes = 4096
max_split_parts = 1000
max_page_size = 500
max_records_per_write = 1000
max_records_per_delivery = 5000
max_jobs_per_delivery = 25
max_events_per_delivery = 30
max_instances = 4

[grants]
secrets = ["API_KEY", "UNSET"]
env = { REGION = "eu-west" }
dirs = [{ host = "@REFERENCE@", guest = "/reference" }]

[config]
greeting = "hello"
"#;

const MISBEHAVE: &str = "[limits]\ncpu_ms = 1500\nwall_ms = 3000\nmemory_mib = 16\n";

/// An attacker environment running the hostile plugins, and a victim environment running a
/// well-behaved one, on one host.
struct Arena {
    host: TestHost,
    attacker: Env,
    victim: Env,
    rt: Arc<Runtime>,
    running: jobhost::delivery::Running,
    _plugins: tempfile::TempDir,
}

impl Arena {
    async fn new(hostile_manifest: Option<&str>) -> Self {
        Self::with(hostile_manifest, EngineConfig { max_attempts: 1, ..test_config() }).await
    }

    async fn with(hostile_manifest: Option<&str>, config: EngineConfig) -> Self {
        let host = TestHost::with_config(EngineConfig { max_chain_depth: 6, max_chain_events: 40, ..config });
        let (attacker, victim) = (host.env().await, host.env().await);
        let dir = tempfile::tempdir().unwrap();
        let reference = dir.path().join("reference");
        std::fs::create_dir(&reference).unwrap();
        std::fs::write(reference.join("codes.txt"), "A1 B2 C3").unwrap();
        let copy = |from: &str, name: &str, manifest: Option<&str>| {
            let path = dir.path().join(format!("{name}.wasm"));
            std::fs::copy(from, &path).unwrap();
            if let Some(m) = manifest {
                let m = m.replace("@REFERENCE@", reference.to_str().unwrap());
                std::fs::write(dir.path().join(format!("{name}.toml")), m).unwrap();
            }
            path
        };
        let hostile = copy(artifacts::TEST_HOSTILE, "hostile", hostile_manifest);
        let misbehave = copy(artifacts::TEST_MISBEHAVE, "misbehave", Some(MISBEHAVE));
        let rt = Runtime::new(RuntimeConfig { max_instances: 64, ..test_runtime_config() }).unwrap();
        let load = |p: std::path::PathBuf| {
            let rt = rt.clone();
            async move { Arc::new(rt.load(&p).await.unwrap_or_else(|e| panic!("{e}"))) }
        };
        let (hostile, misbehave, noop) =
            (load(hostile).await, load(misbehave).await, load(artifacts::TEST_NOOP.into()).await);
        let running = host
            .engine
            .run(vec![
                rt.listener(hostile, attacker.id()),
                rt.listener(misbehave, attacker.id()),
                rt.listener(noop, victim.id()),
            ])
            .await
            .unwrap();
        Self { host, attacker, victim, rt, running, _plugins: dir }
    }

    /// Starts attack `op` (a `space:<op>` job in the attacker's environment).
    async fn start(&self, op: &str, input: Value) -> Job {
        self.attacker.create_job(NewJob { input, ..NewJob::new(JobType::Space, op) }).await.unwrap()
    }

    /// The execution record of the first delivery of `job:ready` for `job`, once it ended.
    async fn execution(&self, job: &str) -> Execution {
        let (env, id) = (self.attacker.clone(), job.to_owned());
        self.host
            .engine
            .wait_named("the first job:ready execution record of the job", move || {
                let (env, id) = (env.clone(), id.clone());
                async move { Ok(env.executions(Some(&id), 100).await?.into_iter().find(|e| e.topic == "job:ready")) }
            })
            .await
            .unwrap()
    }

    /// Runs attack `op` to the end of its first delivery, then checks the victim still works.
    async fn attack(&self, op: &str, input: Value) -> (Job, Execution) {
        let job = self.start(op, input).await;
        let exec = self.execution(&job.id).await;
        self.witness().await;
        (job, exec)
    }

    /// A job in the victim's environment, run to completion by its well-behaved plugin.
    async fn witness(&self) -> Job {
        let job = self.victim.create_job(NewJob::new(JobType::Space, "work")).await.unwrap();
        let job = until_terminal(&self.victim, &job.id).await;
        assert_eq!(job.status, JobStatus::Complete, "the victim's work completes: {job:?}");
        job
    }

    /// Runs a witness while attack `job` is still running, and checks it finished first.
    async fn witness_during(&self, job: &str) -> Execution {
        let done = self.witness().await;
        let attack = self.execution(job).await;
        let attack_end = attack.started_at + attack.duration_us / 1000;
        assert!(
            done.updated_at <= attack_end,
            "the victim's job completed at {} while the attack ran until {attack_end}",
            done.updated_at
        );
        attack
    }

    async fn stop(self) -> (TestHost, Env, Env) {
        self.running.shutdown().await;
        (self.host, self.attacker, self.victim)
    }
}

#[tokio::test]
async fn an_infinite_loop_is_stopped_by_the_cpu_deadline() {
    let arena = Arena::new(Some(HOSTILE)).await;
    let job = arena.start("loop", Value::Null).await;
    let exec = arena.witness_during(&job.id).await;
    assert_eq!(exec.outcome, ExecutionOutcome::Cpu);
    assert_eq!(exec.error.as_deref(), Some("cpu deadline 1.5 s exceeded"));
    assert!(exec.cpu_us >= 1_500_000, "charged {} µs", exec.cpu_us);
    let job = arena.attacker.job(&job.id).await.unwrap();
    assert_eq!(job.status, JobStatus::Ready, "the runtime does not end the job; the watchdog decides");
    assert_eq!(
        job.info.as_deref(),
        Some("plugin misbehave failed on job:ready (attempt 1): cpu deadline 1.5 s exceeded"),
        "the job says why its listener failed"
    );
    arena.stop().await;
}

#[tokio::test]
async fn a_host_call_retry_loop_and_a_wasi_sleep_are_stopped_by_the_wall_clock() {
    let arena = Arena::new(Some(HOSTILE)).await;
    // A retry loop around a failing host call spends its time in the host; a sleep through
    // WASI clocks spends it blocked. Neither is guest CPU: only the wall clock stops them.
    for (op, max_cpu_us) in [("hostcall-loop", 1_500_000), ("sleep", 100_000)] {
        let job = arena.start(op, Value::Null).await;
        let exec = arena.witness_during(&job.id).await;
        assert_eq!(exec.outcome, ExecutionOutcome::Timeout, "{op}");
        assert_eq!(exec.error.as_deref(), Some("wall-clock limit 3 s exceeded (host calls included)"), "{op}");
        assert!(exec.cpu_us < max_cpu_us, "{op}: {} µs charged as guest CPU", exec.cpu_us);
    }
    arena.stop().await;
}

#[tokio::test]
async fn a_memory_bomb_hits_the_memory_limit() {
    let arena = Arena::new(Some(HOSTILE)).await;
    let (_, exec) = arena.attack("bomb", Value::Null).await;
    assert_eq!(exec.outcome, ExecutionOutcome::Memory);
    assert!(exec.error.as_deref().unwrap().starts_with("memory limit 16 MiB exceeded (trap: "), "{:?}", exec.error);
    arena.stop().await;
}

#[tokio::test]
async fn a_table_growth_bomb_hits_the_table_limit() {
    let arena = Arena::new(Some(HOSTILE)).await;
    // Grows its table by 10,000 elements until a growth is refused, then traps.
    let wat = wat_listener(
        "space:tablebomb",
        "",
        "(loop $grow (br_if $grow (i32.ne (table.grow $t (ref.null func) (i32.const 10000)) (i32.const -1))))",
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tablebomb.wasm");
    std::fs::write(&path, wat_component(&wat, None)).unwrap();
    std::fs::write(dir.path().join("tablebomb.toml"), "[limits]\ntable_elements = 50000\n").unwrap();
    let plugin = Arc::new(arena.rt.load(&path).await.unwrap());
    arena.running.add(arena.rt.listener(plugin, arena.attacker.id())).await.unwrap();
    let (_, exec) = arena.attack("tablebomb", Value::Null).await;
    assert_eq!(exec.outcome, ExecutionOutcome::Limit);
    assert_eq!(
        exec.error.as_deref(),
        Some("table limit 50000 elements exceeded (trap: wasm `unreachable` instruction executed)")
    );
    arena.stop().await;
}

#[tokio::test]
async fn a_stack_overflow_is_a_trap_named_as_such() {
    let arena = Arena::new(Some(HOSTILE)).await;
    let (_, exec) = arena.attack("recurse", Value::Null).await;
    assert_eq!(exec.outcome, ExecutionOutcome::Trap);
    assert_eq!(exec.error.as_deref(), Some("stack overflow (trap: call stack exhausted)"));
    arena.stop().await;
}

#[tokio::test]
async fn a_panic_is_a_trap_with_its_message_in_the_logs() {
    let arena = Arena::new(Some(HOSTILE)).await;
    let (_, exec) = arena.attack("trap", Value::Null).await;
    assert_eq!(exec.outcome, ExecutionOutcome::Trap);
    assert_eq!(exec.error.as_deref(), Some("trap: wasm `unreachable` instruction executed"));
    assert!(exec.logs.contains("boom"), "{}", exec.logs);
    arena.stop().await;
}

#[tokio::test]
async fn huge_log_output_is_cut_at_the_limit_and_the_delivery_succeeds() {
    let arena = Arena::new(Some(HOSTILE)).await;
    let (job, exec) = arena.attack("log-flood", json!({"bytes": 4 << 20})).await;
    assert_eq!(exec.outcome, ExecutionOutcome::Ok, "{:?}", exec.error);
    assert!(exec.logs.len() <= 4096 + 64, "{} bytes kept", exec.logs.len());
    assert!(exec.logs.ends_with("[log truncated at 4096 bytes]\n"), "{}", &exec.logs[exec.logs.len() - 60..]);
    assert_eq!(arena.attacker.job(&job.id).await.unwrap().status, JobStatus::Complete);
    arena.stop().await;
}

#[tokio::test]
async fn a_huge_outcome_is_refused_and_the_job_says_why() {
    let arena = Arena::new(Some(HOSTILE)).await;
    let (job, exec) = arena.attack("huge-outcome", Value::Null).await;
    assert_eq!(exec.outcome, ExecutionOutcome::Error);
    let error = exec.error.unwrap();
    assert!(
        error.starts_with("outcome of 4194315 bytes is over the plugin's max_outcome_bytes (65536)")
            && !error.contains("after the host refused"),
        "{error}"
    );
    let job = arena.attacker.job(&job.id).await.unwrap();
    assert_eq!(job.status, JobStatus::Ready, "nothing was completed");
    assert!(job.info.unwrap().contains("max_outcome_bytes"));
    arena.stop().await;
}

#[tokio::test]
async fn splitting_into_a_billion_parts_is_refused() {
    let arena = Arena::new(Some(HOSTILE)).await;
    let (job, exec) = arena.attack("split-huge", Value::Null).await;
    assert!(
        exec.error.as_deref().unwrap().contains("split into 1000000000 parts; the plugin's max_split_parts is 1000"),
        "{:?}",
        exec.error
    );
    assert!(exec.logs.contains("[jobhost] limit: split into 1000000000 parts"), "{}", exec.logs);
    assert_eq!(arena.attacker.parts(&job.id).await.unwrap().len(), 0, "no part was created");
    arena.stop().await;
}

#[tokio::test]
async fn a_page_of_a_billion_records_is_refused() {
    let arena = Arena::new(Some(HOSTILE)).await;
    let sheet = arena.attacker.create_sheet("own").await.unwrap();
    let (_, exec) = arena.attack("page-huge", json!({"sheetId": sheet.id})).await;
    assert!(
        exec.error.as_deref().unwrap().contains("page size 1000000000; the plugin's max_page_size is 500"),
        "{:?}",
        exec.error
    );
    arena.stop().await;
}

#[tokio::test]
async fn writing_a_billion_records_stops_at_the_write_limits() {
    let arena = Arena::new(Some(HOSTILE)).await;
    let sheet = arena.attacker.create_sheet("own").await.unwrap();
    let (_, exec) = arena.attack("write-huge", json!({"sheetId": sheet.id})).await;
    assert!(exec.logs.contains("[hostile] one call of 20000: Limit"), "one oversized call is refused: {}", exec.logs);
    let error = exec.error.unwrap();
    assert!(
        error.contains(
            "5000 records written in this delivery and 1000 more asked; the plugin's max_records_per_delivery is 5000"
        ),
        "{error}"
    );
    assert_eq!(arena.attacker.record_counts(&sheet.id).await.unwrap().total, 5000, "exactly the budget was written");
    arena.stop().await;
}

/// An arena whose host would retry a failed delivery twice.
async fn retrying_arena() -> Arena {
    Arena::with(Some(HOSTILE), EngineConfig { max_attempts: 3, ..test_config() }).await
}

/// Runs attack `op` with `input` until its delivery is dead-lettered; returns the job, its one
/// execution record and its dead letter.
async fn storm(arena: &Arena, op: &str, input: Value) -> (Job, Execution, jobhost::model::DeadLetter) {
    let job = arena.start(op, input).await;
    let env = arena.attacker.clone();
    let dead = arena
        .host
        .engine
        .wait_named("the storm's dead letter", move || {
            let env = env.clone();
            async move { Ok(env.dead_letters().await?.into_iter().next()) }
        })
        .await
        .unwrap();
    arena.witness().await;
    let runs: Vec<Execution> = arena
        .attacker
        .executions(Some(&job.id), 100)
        .await
        .unwrap()
        .into_iter()
        .filter(|e| e.topic == "job:ready")
        .collect();
    assert_eq!(runs.len(), 1, "one attempt only, though two retries were left: {runs:?}");
    let exec = runs.into_iter().next().unwrap();
    (job, exec, dead)
}

#[tokio::test]
async fn a_job_storm_stops_at_the_delivery_budget_and_is_not_retried() {
    let arena = retrying_arena().await;
    let (job, exec, dead) = storm(&arena, "create-storm", Value::Null).await;
    let budget = "25 jobs created in this delivery and 1 more asked; the plugin's max_jobs_per_delivery is 25";
    assert!(exec.logs.contains("[hostile] created 25 jobs, then Limit"), "{}", exec.logs);
    assert!(exec.logs.contains(&format!("[jobhost] limit: {budget}")), "{}", exec.logs);
    assert_eq!(exec.outcome, ExecutionOutcome::Error);
    assert!(exec.error.as_deref().unwrap().contains(budget), "{:?}", exec.error);
    assert_eq!(dead.attempts, 1);
    assert!(dead.last_error.contains(budget) && dead.last_error.contains("not retried"), "{}", dead.last_error);
    let idle = arena.attacker.jobs(0, 1000).await.unwrap().into_iter().filter(|j| j.operation == "idle").count();
    assert_eq!(idle, 25, "exactly the budget was created");
    assert!(arena.attacker.job(&job.id).await.unwrap().info.unwrap().contains("max_jobs_per_delivery"));
    arena.stop().await;
}

#[tokio::test]
async fn an_event_storm_stops_at_the_delivery_budget_writes_nothing_more_and_is_not_retried() {
    let arena = retrying_arena().await;
    let sheet = arena.attacker.create_sheet("storm").await.unwrap().id;
    let (_, exec, dead) = storm(&arena, "event-storm", json!({ "sheetId": sheet })).await;
    let budget =
        "this call would write 1 event after the 30 this delivery wrote; the plugin's max_events_per_delivery is 30";
    assert!(exec.logs.contains("[hostile] inserted 30 records, then Limit"), "{}", exec.logs);
    assert!(exec.logs.contains(&format!("[jobhost] limit: {budget}")), "{}", exec.logs);
    assert!(exec.error.as_deref().unwrap().contains(budget), "{:?}", exec.error);
    assert_eq!(dead.attempts, 1);
    assert!(dead.last_error.contains("not retried"), "{}", dead.last_error);
    assert_eq!(arena.attacker.record_counts(&sheet).await.unwrap().total, 30, "the refused call wrote nothing");
    arena.stop().await;
}

#[tokio::test]
async fn another_environment_is_unreachable_and_nothing_is_granted_by_default() {
    let arena = Arena::new(None).await;
    let sheet = arena.victim.create_sheet("private").await.unwrap();
    arena.victim.insert_records(&sheet.id, scenario::sample_records(5).0).await.unwrap();
    arena.victim.set_secret("API_KEY", "victim's").await.unwrap();
    let target = arena.victim.create_job(NewJob::new(JobType::Space, "idle")).await.unwrap();
    let probe = arena.start("probe", json!({"jobId": target.id, "sheetId": sheet.id})).await;
    let report = until_terminal(&arena.attacker, &probe.id).await.outcome;
    arena.witness().await;
    let (_host, _attacker, victim) = arena.stop().await;

    assert!(report["file"]["err"].is_string(), "reading a file must fail: {report}");
    assert!(report["dir"]["err"].is_string(), "listing a directory must fail: {report}");
    assert_eq!(report["env"], 0, "no environment variables");
    assert_eq!(report["args"], 0, "no arguments");
    assert!(report["socket"]["err"].is_string(), "opening a socket must fail: {report}");
    assert!(report["udp"]["err"].is_string(), "binding a socket must fail: {report}");
    for call in [
        "foreignGet",
        "foreignAck",
        "foreignComplete",
        "foreignFail",
        "foreignCancel",
        "foreignSplit",
        "foreignParts",
        "foreignSheet",
        "foreignCounts",
        "foreignPage",
        "foreignInsert",
        "foreignUpdate",
    ] {
        assert_eq!(report[call], "NotFound", "{call}: another environment's ids are not-found: {report}");
    }
    assert_eq!(report["foreignSecret"], "Denied", "no secret is granted without a manifest");
    assert_eq!(victim.job(&target.id).await.unwrap(), target, "the other environment's job is untouched");
    assert_eq!(victim.record_counts(&sheet.id).await.unwrap().total, 5);
    let page = victim.records(&sheet.id, 10, 1).await.unwrap();
    assert!(page.records.iter().all(|r| !r.values.contains_key("x")), "no record was changed");
}

#[tokio::test]
async fn granted_config_secrets_env_and_directories_are_visible_and_nothing_more() {
    let arena = Arena::new(Some(HOSTILE)).await;
    arena.attacker.set_secret("API_KEY", "s3cret").await.unwrap();
    arena.attacker.set_secret("OTHER", "not granted").await.unwrap();
    arena.victim.set_secret("API_KEY", "the victim's").await.unwrap();
    let job = arena.start("granted", Value::Null).await;
    let job = until_terminal(&arena.attacker, &job.id).await;
    arena.witness().await;
    let r = job.outcome;
    assert_eq!(r["greeting"], "hello");
    assert_eq!(r["missing"], Value::Null);
    assert_eq!(r["secret"]["ok"], "\"s3cret\"", "its own environment's secret: {r}");
    assert_eq!(r["ungranted"], "Denied");
    assert_eq!(r["unset"], "NotFound");
    assert_eq!(r["env"], "eu-west");
    assert_eq!(r["envCount"], 1);
    assert_eq!(r["file"]["ok"], "\"A1 B2 C3\"");
    assert!(r["write"]["err"].is_string(), "granted directories are read-only: {r}");
    assert!(r["outside"]["err"].is_string(), "nothing outside the grant: {r}");
    let exec = arena.execution(&job.id).await;
    assert!(exec.logs.contains("[jobhost] denied: secret `OTHER` is not granted"), "{}", exec.logs);
    arena.stop().await;
}

#[tokio::test]
async fn a_secret_a_plugin_prints_logs_or_fails_with_is_masked_in_what_the_host_keeps() {
    let arena = Arena::new(Some(HOSTILE)).await;
    arena.attacker.set_secret("API_KEY", "tok-7f3a9c").await.unwrap();
    let job = arena.start("use-secret", serde_json::json!({ "fail": true })).await;
    let exec = arena.execution(&job.id).await;
    arena.witness().await;
    let error = exec.error.clone().unwrap_or_default();
    for kept in [&exec.logs, &error] {
        assert!(!kept.contains("tok-7f3a9c"), "{kept}");
    }
    assert!(exec.logs.contains("[hostile] printed [secret API_KEY]"), "{}", exec.logs);
    assert!(exec.logs.contains("WARN [hostile] logged [secret API_KEY]"), "{}", exec.logs);
    assert!(error.contains("[hostile] failed with [secret API_KEY]"), "{error}");
    let env = arena.attacker.clone();
    let dead = (arena.host.engine)
        .wait_named("the failed delivery's dead letter", move || {
            let env = env.clone();
            async move { Ok(env.dead_letters().await?.into_iter().next()) }
        })
        .await
        .unwrap();
    assert!(dead.last_error.contains("[secret API_KEY]") && !dead.last_error.contains("tok-7f3a9c"), "{dead:?}");
    arena.stop().await;
}

#[tokio::test]
async fn a_self_retriggering_listener_is_stopped_by_the_chain_depth() {
    let arena = Arena::new(Some(HOSTILE)).await;
    let first = arena.start("retrigger", Value::Null).await;
    // Depth d handles job:ready of the d-th job; its create writes events at depth d + 1.
    let jobs = retrigger_jobs(&arena, "retrigger", 7).await;
    let last = jobs.last().unwrap();
    let exec = arena.execution(&last.id).await;
    arena.witness().await;
    assert!(
        exec.error.as_deref().unwrap().starts_with(&format!(
            "limit exceeded: loop guard: this call would write events at depth 7 of chain {} (at most 6)",
            first_event(&arena.attacker, &first.id).await
        )),
        "{:?}",
        exec.error
    );
    assert_eq!(retrigger_jobs(&arena, "retrigger", 7).await.len(), 7, "no job beyond the limit");
    let last = arena.attacker.job(&last.id).await.unwrap();
    assert_eq!(last.status, JobStatus::Ready);
    assert!(last.info.unwrap().contains("loop guard"));
    arena.stop().await;
}

#[tokio::test]
async fn a_fanning_out_listener_is_stopped_by_the_chain_budget() {
    let arena = Arena::new(Some(HOSTILE)).await;
    let first = arena.start("fanout", Value::Null).await;
    let root = first_event(&arena.attacker, &first.id).await;
    let env = arena.attacker.clone();
    let refused =
        arena
            .host
            .engine
            .wait_named("an execution refused by the chain budget", move || {
                let env = env.clone();
                async move {
                    Ok(env.executions(None, 10_000).await?.into_iter().find(|e| {
                        e.error.as_deref().is_some_and(|m| m.starts_with("limit exceeded: loop guard: chain"))
                    }))
                }
            })
            .await
            .unwrap();
    arena.witness().await;
    assert!(refused.error.unwrap().contains(&format!("chain {root} would reach")));
    let in_chain = arena
        .attacker
        .events(0, u32::MAX)
        .await
        .unwrap()
        .into_iter()
        .filter(|e| e.context_str("chainId") == Some(root.as_str()))
        .count();
    assert!(in_chain <= 40, "{in_chain} events in the chain: the budget holds");
    arena.stop().await;
}

/// The `space:<op>` jobs of the attacker, once there are `n`.
async fn retrigger_jobs(arena: &Arena, op: &str, n: usize) -> Vec<Job> {
    let (env, op) = (arena.attacker.clone(), op.to_owned());
    arena
        .host
        .engine
        .wait_named("the retriggered jobs", move || {
            let (env, op) = (env.clone(), op.clone());
            async move {
                let jobs: Vec<Job> = env.jobs(0, 1000).await?.into_iter().filter(|j| j.operation == op).collect();
                Ok((jobs.len() >= n).then_some(jobs))
            }
        })
        .await
        .unwrap()
}

/// The id of the first event of job `id` (the root of the chains its listeners start).
async fn first_event(env: &Env, id: &str) -> String {
    env.job_events(id).await.unwrap().into_iter().find(|e| e.topic == "job:ready").unwrap().id
}

#[tokio::test]
async fn completing_a_job_twice_is_a_conflict_that_names_the_status() {
    let arena = Arena::new(Some(HOSTILE)).await;
    let (job, exec) = arena.attack("twice", Value::Null).await;
    assert_eq!(exec.outcome, ExecutionOutcome::Ok);
    assert!(exec.logs.contains("[hostile] first: ok; second: Conflict; status: Some(\"Complete\")"), "{}", exec.logs);
    assert_eq!(arena.attacker.job(&job.id).await.unwrap().outcome, json!({"message": "first"}));
    arena.stop().await;
}

#[tokio::test]
async fn a_job_the_delivery_is_not_about_cannot_be_moved() {
    let arena = Arena::new(Some(HOSTILE)).await;
    let other = arena.attacker.create_job(NewJob::new(JobType::Space, "idle")).await.unwrap();
    let (_, exec) = arena.attack("other-job", json!({"jobId": other.id})).await;
    assert!(exec.logs.contains("[hostile] complete other job: Denied"), "{}", exec.logs);
    assert!(exec.logs.contains(&format!("[jobhost] denied: job {} is not one this delivery may move", other.id)));
    assert_eq!(arena.attacker.job(&other.id).await.unwrap(), other, "untouched");
    arena.stop().await;

    // `any_job` lifts the rule.
    let arena = Arena::new(Some("[grants]\nany_job = true\n")).await;
    let other = arena.attacker.create_job(NewJob::new(JobType::Space, "idle")).await.unwrap();
    let job = arena.start("other-job", json!({"jobId": other.id})).await;
    let exec = arena.execution(&job.id).await;
    assert!(exec.logs.contains("[hostile] complete other job: ok"), "{}", exec.logs);
    assert_eq!(arena.attacker.job(&other.id).await.unwrap().status, JobStatus::Complete);
    arena.stop().await;
}

#[tokio::test]
async fn a_component_importing_an_unknown_interface_does_not_load() {
    let arena = Arena::new(Some(HOSTILE)).await;
    let wit = "package test:evil;\ninterface spy { peek: func() -> u32; }\nworld evil { import spy; export jobhost:plugin/listener@0.1.0; }\n";
    let wat = wat_listener(
        "space:spy",
        r#"(import "test:evil/spy" "peek" (func $peek (result i32)))"#,
        "(drop (call $peek))",
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("spy.wasm");
    std::fs::write(&path, wat_component(&wat, Some((wit, "evil")))).unwrap();
    let err = arena.rt.load(&path).await.unwrap_err();
    assert!(matches!(err, LoadError::World { .. }), "{err}");
    assert!(err.to_string().contains("test:evil/spy"), "the error names the import: {err}");
    arena.witness().await;
    arena.stop().await;
}

#[tokio::test]
async fn a_busy_tenant_cannot_take_every_slot() {
    // 8 slots in all, 4 per environment: eight deliveries that each hold a slot for the full
    // wall-clock limit leave the victim's plugin room to run.
    let config =
        EngineConfig { max_attempts: 1, max_in_flight: 8, max_in_flight_per_environment: Some(4), ..test_config() };
    let manifest =
        HOSTILE.replace("max_instances = 4", "max_instances = 8").replace("wall_ms = 3000", "wall_ms = 1500");
    let arena = Arena::with(Some(&manifest), config).await;
    let mut attacks = Vec::new();
    for _ in 0..8 {
        attacks.push(arena.start("hostcall-loop", Value::Null).await);
    }
    let done = arena.witness().await;
    let mut execs = Vec::new();
    for a in &attacks {
        execs.push(arena.execution(&a.id).await);
    }
    let first_end = execs.iter().map(|e| e.started_at + e.duration_us / 1000).min().unwrap();
    assert!(
        done.updated_at <= first_end,
        "the victim finished at {} before any attack ended ({first_end})",
        done.updated_at
    );
    // Never more than 4 of the attacker's deliveries at once.
    let most = most_at_once(&execs);
    assert!(most <= 4, "{most} attacker deliveries overlapped");
    assert!(execs.iter().all(|e| e.outcome == ExecutionOutcome::Timeout));
    arena.stop().await;
}

/// The most executions that overlapped in time.
fn most_at_once(execs: &[Execution]) -> i32 {
    let mut edges: Vec<(i64, i32)> =
        execs.iter().flat_map(|e| [(e.started_at, 1), (e.started_at + e.duration_us / 1000, -1)]).collect();
    edges.sort_by_key(|&(t, d)| (t, d));
    let (mut now, mut most) = (0, 0);
    for (_, d) in edges {
        now += d;
        most = most.max(now);
    }
    most
}

#[tokio::test]
async fn a_plugin_runs_at_most_its_max_instances_at_once() {
    // The host and the environment would allow 8; the plugin's manifest allows 2.
    let config = EngineConfig { max_attempts: 1, ..EngineConfig::single_environment(8) };
    let config = EngineConfig { ack_timeout: None, stale_timeout: None, ..config };
    let manifest = HOSTILE.replace("max_instances = 4", "max_instances = 2").replace("wall_ms = 3000", "wall_ms = 600");
    let arena = Arena::with(Some(&manifest), config).await;
    let mut attacks = Vec::new();
    for _ in 0..6 {
        attacks.push(arena.start("hostcall-loop", Value::Null).await);
    }
    let mut execs = Vec::new();
    for a in &attacks {
        execs.push(arena.execution(&a.id).await);
    }
    arena.witness().await;
    let most = most_at_once(&execs);
    assert!(most <= 2, "{most} deliveries of a plugin with max_instances = 2 overlapped");
    arena.stop().await;
}

#[tokio::test]
async fn an_invalid_manifest_refuses_the_plugin_with_the_key_named() {
    let rt = Runtime::new(test_runtime_config()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("noop.wasm");
    std::fs::copy(artifacts::TEST_NOOP, &path).unwrap();
    for (manifest, needle) in [
        ("[limits]\nmemroy_mib = 8\n", "unknown field `memroy_mib`"),
        ("[limits]\nmemory_mib = 100000\n", "memory_mib = 100000 is out of range"),
        ("[limits]\nfuel = 100\n", "does not meter fuel"),
        ("[grants]\nnetwork = true\n", "unknown field `network`"),
    ] {
        std::fs::write(dir.path().join("noop.toml"), manifest).unwrap();
        let err = rt.load(&path).await.unwrap_err();
        assert!(matches!(err, LoadError::Manifest { .. }), "{err}");
        assert!(err.to_string().contains(needle) && err.to_string().contains("noop.toml"), "{manifest}: {err}");
    }
}

#[tokio::test]
async fn fuel_limits_a_plugin_when_the_host_meters_it() {
    let host = TestHost::with_config(EngineConfig { max_attempts: 1, ..test_config() });
    let env = host.env().await;
    let rt = Runtime::new(RuntimeConfig { fuel: true, ..test_runtime_config() }).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("misbehave.wasm");
    std::fs::copy(artifacts::TEST_MISBEHAVE, &path).unwrap();
    std::fs::write(dir.path().join("misbehave.toml"), "[limits]\nfuel = 5000000\ncpu_ms = 60000\n").unwrap();
    let plugin = Arc::new(rt.load(&path).await.unwrap());
    let running = host.engine.run(vec![rt.listener(plugin, env.id())]).await.unwrap();
    let job = env.create_job(NewJob::new(JobType::Space, "loop")).await.unwrap();
    let (env2, id) = (env.clone(), job.id.clone());
    let exec = host
        .engine
        .wait_named("the looping job's execution record", move || {
            let (env, id) = (env2.clone(), id.clone());
            async move { Ok(env.executions(Some(&id), 10).await?.into_iter().next()) }
        })
        .await
        .unwrap();
    running.shutdown().await;
    assert_eq!(exec.outcome, ExecutionOutcome::Fuel);
    assert_eq!(exec.error.as_deref(), Some("fuel limit 5000000 exhausted"));
}
