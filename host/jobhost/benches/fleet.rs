//! The fleet against the single host, same run, same machine: `cargo bench -p jobhost --bench
//! fleet` (full sizes) or `cargo test -p jobhost --bench fleet` (a quick smoke run).
//!
//! A PostgreSQL server with its default durability (`fsync = on`) is started for the run
//! (`jobhost-test-postgres`); SQLite runs with `synchronous = FULL`. "N hosts" are N engines
//! in this process, each with a backend (connections) and a WebAssembly runtime of its own, as
//! N processes would have — on 2 cores they share the CPU with each other and with the
//! database, so these rows say what the database work costs, not what N machines would give.
//!
//! - **lifecycle**: create → ready → ack → complete of N jobs by a WASM listener, 64 creators
//!   spread over the hosts. Beside jobs/s: PostgreSQL's transactions and statements per job
//!   (`pg_stat_database.xact_commit`, `pg_stat_statements.calls`), which do not depend on the
//!   machine.
//! - **scenario**: the seeds' scenario (N records, N/1000 parts) through the WASM plugin.
//! - **parts**: one parent's parts ended one at a time on PostgreSQL, 10,000 parts against
//!   1,000: the time per end, which reading the parent's part counts must not grow with N.
//! - **insert**: N records into a sheet in calls of 100,000 (PostgreSQL: binary `COPY`).
//! - **deploy**: two `jobhost serve` processes on one database; a plugin version deployed
//!   through A, and the time until B lists it, against the time A took to answer the deploy.

use std::sync::Arc;
use std::time::{Duration, Instant};

use jobhost::model::{JobStatus, JobType, NewJob};
use jobhost::runtime::{Runtime, RuntimeConfig};
use jobhost::store::postgres::{PgBackend, PgOptions};
use jobhost::{Engine, EngineConfig, Env, scenario};
use jobhost_test_plugins as artifacts;

#[path = "support/serve.rs"]
mod support;
use support::{answer, environment_token, serve};

// The same allocator as the `jobhost` binary, so the rows measure what users run.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let only = |name: &str| {
        let named: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with('-')).collect();
        named.is_empty() || named.iter().any(|a| a == name)
    };
    let (lifecycles, records) = if full { (20_000, 1_000_000) } else { (200, 3_000) };
    // `--no-fsync`: the same server without syncing to disk, to see what durability costs.
    let server = if std::env::args().any(|a| a == "--no-fsync") {
        jobhost_test_postgres::Server::start_throwaway()
    } else {
        jobhost_test_postgres::Server::start_durable()
    }
    .expect("start PostgreSQL");
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    println!("jobhost fleet benchmarks ({} mode)", if full { "full" } else { "quick" });
    rt.block_on(async {
        if only("lifecycle") {
            lifecycle(&server, lifecycles).await;
        }
        if only("scenario") {
            scenario_rows(&server, records).await;
        }
        if only("parts") {
            part_ends(&server, if full { 10_000 } else { 100 }).await;
        }
        if only("insert") {
            insert(&server, records).await;
        }
        if only("deploy") {
            deploy(&server, if full { 20 } else { 3 }).await;
        }
    });
}

fn config() -> EngineConfig {
    EngineConfig { ack_timeout: None, stale_timeout: None, ..EngineConfig::single_environment(256) }
}

fn runtime() -> Arc<Runtime> {
    let limits = jobhost::runtime::Limits { max_instances: 256, ..Default::default() };
    Runtime::new(RuntimeConfig { cache_dir: None, limits, ..RuntimeConfig::default() }).unwrap()
}

/// Where a row runs: SQLite, or PostgreSQL with this many hosts.
#[derive(Clone, Copy)]
enum Store {
    Sqlite,
    Postgres(usize),
}

impl Store {
    fn name(self) -> String {
        match self {
            Store::Sqlite => "SQLite, 1 host".into(),
            Store::Postgres(n) => format!("PostgreSQL, {n} host{}", if n > 1 { "s" } else { "" }),
        }
    }
}

/// The hosts of a row, on a fresh store; the first made the environment. The temporary
/// directory lives as long as they do.
struct Fleet {
    engines: Vec<Engine>,
    envs: Vec<Env>,
    database: Option<String>,
    _dir: tempfile::TempDir,
}

impl Fleet {
    /// Every host runs the plugin at `path` as its listener, each with a runtime of its own.
    async fn run_plugin(&self, path: &str) -> Vec<jobhost::delivery::Running> {
        let mut running = Vec::new();
        for (engine, env) in self.engines.iter().zip(&self.envs) {
            let rt = runtime();
            let plugin = Arc::new(rt.load(std::path::Path::new(path)).await.unwrap());
            running.push(engine.run(vec![rt.listener(plugin, env.id())]).await.unwrap());
        }
        running
    }
}

async fn fleet(server: &jobhost_test_postgres::Server, store: Store) -> Fleet {
    let dir = tempfile::tempdir().unwrap();
    let (engines, database) = match store {
        Store::Sqlite => (vec![jobhost::open_engine(dir.path(), config()).unwrap()], None),
        Store::Postgres(n) => {
            let url = server.fresh_database();
            // Extension per database; the statistics are the server's, filtered by database.
            let admin = url.clone();
            tokio::task::spawn_blocking(move || {
                let mut c = postgres::Client::connect(&admin, postgres::NoTls).unwrap();
                c.batch_execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements").unwrap();
            })
            .await
            .unwrap();
            let mut engines = Vec::new();
            for _ in 0..n {
                let options = PgOptions::new(url.clone());
                let backend = tokio::task::spawn_blocking(move || PgBackend::open(options)).await.unwrap().unwrap();
                engines.push(Engine::with_backend(Arc::new(backend), config()));
            }
            (engines, Some(url))
        }
    };
    let e = engines[0].environment_named("bench").await.unwrap();
    let envs = engines.iter().map(|en| en.env(&e.id)).collect();
    Fleet { engines, envs, database, _dir: dir }
}

/// Runs `sql` against `url` off the runtime; returns the first column of the first row.
async fn scalar(url: &str, sql: &str) -> i64 {
    let (url, sql) = (url.to_owned(), sql.to_owned());
    tokio::task::spawn_blocking(move || {
        let mut c = postgres::Client::connect(&url, postgres::NoTls).unwrap();
        c.query_one(&sql, &[]).unwrap().get::<_, i64>(0)
    })
    .await
    .unwrap()
}

/// PostgreSQL's counts of committed transactions and of statements in `url`'s database.
async fn database_work(url: &str) -> (i64, i64) {
    let commits = scalar(url, "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()").await;
    let statements = scalar(
        url,
        "SELECT COALESCE(SUM(calls), 0)::bigint FROM pg_stat_statements s JOIN pg_database d ON d.oid = s.dbid \
         WHERE d.datname = current_database()",
    )
    .await;
    (commits, statements)
}

/// CPU seconds of process `pid` from `/proc` (user + system; with its reaped children's too
/// when `children`).
fn process_cpu(pid: &str, children: bool) -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    let ticks = *TICKS.get_or_init(|| {
        let out = std::process::Command::new("getconf").arg("CLK_TCK").output().expect("getconf CLK_TCK");
        String::from_utf8_lossy(&out.stdout).trim().parse().expect("CLK_TCK is a number")
    });
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return 0.0 };
    // Fields after the command name (which may hold spaces): state is the 3rd field overall.
    let Some((_, rest)) = stat.rsplit_once(')') else { return 0.0 };
    let f: Vec<f64> = rest.split_whitespace().map(|x| x.parse().unwrap_or(0.0)).collect();
    let (utime, stime, cutime, cstime) = (f[11], f[12], f[13], f[14]);
    (utime + stime + if children { cutime + cstime } else { 0.0 }) / ticks
}

/// CPU seconds the server has used: its postmaster, every live process it started, and those
/// that have ended (their time is added to the postmaster's when it reaps them).
fn server_cpu(server: &jobhost_test_postgres::Server) -> f64 {
    let Some(postmaster) = server.postmaster_pid() else { return 0.0 };
    let postmaster = postmaster.to_string();
    let mut total = process_cpu(&postmaster, true);
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let parent = std::fs::read_to_string(format!("/proc/{name}/stat"))
            .ok()
            .and_then(|s| s.rsplit_once(')').and_then(|(_, r)| r.split_whitespace().nth(1).map(str::to_owned)));
        if parent.as_deref() == Some(postmaster.as_str()) {
            total += process_cpu(&name, false);
        }
    }
    total
}

/// `--statements`: the statements of a row that took the most time, per job or part (where to
/// cut).
async fn statements(url: &str, n: usize) {
    let url = url.to_owned();
    let rows = tokio::task::spawn_blocking(move || {
        let mut c = postgres::Client::connect(&url, postgres::NoTls).unwrap();
        c.query(
            "SELECT calls, total_exec_time, left(regexp_replace(query, '\\s+', ' ', 'g'), 160) \
             FROM pg_stat_statements s JOIN pg_database d ON d.oid = s.dbid \
             WHERE d.datname = current_database() ORDER BY total_exec_time DESC LIMIT 12",
            &[],
        )
        .unwrap()
    })
    .await
    .unwrap();
    for r in rows {
        let (calls, ms, query): (i64, f64, String) = (r.get(0), r.get(1), r.get(2));
        println!("    {:>6.2}/job {:>7.3} ms/job  {query}", calls as f64 / n as f64, ms / n as f64);
    }
}

/// Polls the store until `done` deliveries are finished (a measurement, not a test). Every
/// 50 ms: the count scans the deliveries, and looking more often would load the database it
/// measures (at 20,000 jobs, the slack is under 1%).
async fn until_done(engine: &Engine, done: u64) {
    while engine.delivery_stats().await.unwrap().done < done {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn lifecycle(server: &jobhost_test_postgres::Server, n: usize) {
    println!(
        "{:<44} {:>12} {:>12} {:>14} {:>17}",
        "lifecycle, WASM listener", "jobs/s", "vs SQLite", "txns / stmts per job", "CPU per job: hosts / database"
    );
    let mut baseline = None;
    for store in [Store::Sqlite, Store::Postgres(1), Store::Postgres(2), Store::Postgres(3)] {
        let f = fleet(server, store).await;
        let running = f.run_plugin(artifacts::TEST_NOOP).await;
        let before = match &f.database {
            Some(url) => Some(database_work(url).await),
            None => None,
        };
        let cpu_before = (process_cpu("self", false), server_cpu(server));
        let t = Instant::now();
        let mut tasks = tokio::task::JoinSet::new();
        for c in 0..64 {
            let env = f.envs[c % f.envs.len()].clone();
            tasks.spawn(async move {
                for _ in (c..n).step_by(64) {
                    env.create_job(NewJob::new(JobType::Space, "lifecycle")).await.unwrap();
                }
            });
        }
        while tasks.join_next().await.is_some() {}
        until_done(&f.engines[0], n as u64).await;
        let rate = n as f64 / t.elapsed().as_secs_f64();
        // Per job, in µs: the hosts (this process) and the database server (0 for SQLite).
        let cpu = (
            (process_cpu("self", false) - cpu_before.0) * 1e6 / n as f64,
            (server_cpu(server) - cpu_before.1) * 1e6 / n as f64,
        );
        let cpu = if f.database.is_some() { cpu } else { (cpu.0, 0.0) };
        for r in &running {
            r.shutdown().await;
        }
        let done =
            f.envs[0].jobs(0, u32::MAX).await.unwrap().iter().filter(|j| j.status == JobStatus::Complete).count();
        assert_eq!(done, n);
        let Fleet { engines, envs, database, _dir } = f;
        drop((running, envs, engines));
        // A session reports its counts when it ends: with the hosts' connections closed, the
        // server's statistics hold all of their work.
        let work = match (&database, before) {
            (Some(url), Some((c0, s0))) => {
                let (c1, s1) = database_work(url).await;
                format!("{:.2} / {:.1}", (c1 - c0) as f64 / n as f64, (s1 - s0) as f64 / n as f64)
            }
            _ => String::new(),
        };
        let base = *baseline.get_or_insert(rate);
        println!(
            "{:<44} {:>10.0} /s {:>11.2}x {:>14} {:>8.0} / {:.0} µs",
            store.name(),
            rate,
            rate / base,
            work,
            cpu.0,
            cpu.1
        );
        if let Some(url) = database.filter(|_| std::env::args().any(|a| a == "--statements")) {
            statements(&url, n).await;
        }
    }
}

/// The seeds' scenario through the WASM plugin on every host; the time from the job's creation
/// to its end.
async fn scenario_once(server: &jobhost_test_postgres::Server, store: Store, n: u64) -> Duration {
    let f = fleet(server, store).await;
    let running = f.run_plugin(artifacts::SUBMIT_LARGE_SHEET).await;
    let env = &f.envs[0];
    let sheet = env.create_sheet("people").await.unwrap();
    let invalid = scenario::insert_sample(env, &sheet.id, n).await.unwrap();
    let t = Instant::now();
    let job = env.create_job(NewJob::sheet(scenario::OPERATION, &sheet.id)).await.unwrap();
    let job = loop {
        let j = env.job(&job.id).await.unwrap();
        if j.status.is_terminal() {
            break j;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let took = t.elapsed();
    for r in &running {
        r.shutdown().await;
    }
    assert_eq!(job.status, JobStatus::Complete, "{}", job.outcome);
    assert_eq!(env.record_counts(&sheet.id).await.unwrap().error, invalid);
    assert_eq!(job.outcome["parts"]["completed"], serde_json::Value::from(n.div_ceil(1000)));
    if let Some(url) = f.database.as_ref().filter(|_| std::env::args().any(|a| a == "--statements")) {
        statements(url, n.div_ceil(1000) as usize).await;
    }
    took
}

async fn scenario_rows(server: &jobhost_test_postgres::Server, n: u64) {
    println!(
        "{:<44} {:>12} {:>12}",
        format!("scenario, {n} records / {} parts", n.div_ceil(1000)),
        "time",
        "vs SQLite"
    );
    let mut baseline = None;
    for store in [Store::Sqlite, Store::Postgres(1), Store::Postgres(3)] {
        let took = scenario_once(server, store, n).await.as_secs_f64();
        let base = *baseline.get_or_insert(took);
        println!("{:<44} {:>10.2} s {:>11.2}x", store.name(), took, took / base);
    }
}

/// One parent's parts ended one at a time on PostgreSQL (one host), each end a write of its
/// own: the time per end with `n` parts against with `n / 10`, same run. Every end reads its
/// parent's part counts; were they counted from the parts, the larger parent's ends would each
/// read ten times the rows.
async fn part_ends(server: &jobhost_test_postgres::Server, n: u32) {
    use jobhost::model::{Ack, Outcome, Split};
    println!("{:<44} {:>12} {:>12}", "part ends, one parent, one at a time", "per end", "vs n / 10");
    let mut baseline = None;
    for parts in [n / 10, n] {
        let f = fleet(server, Store::Postgres(1)).await;
        let env = &f.envs[0];
        let parent = env.create_job(NewJob::new(JobType::Sheet, "parts")).await.unwrap();
        env.ack(&parent.id, Ack::default()).await.unwrap();
        env.split(&parent.id, Split::count(parts)).await.unwrap();
        let ids: Vec<String> = env.parts(&parent.id).await.unwrap().into_iter().map(|p| p.id).collect();
        let t = Instant::now();
        for id in &ids {
            env.complete(id, Outcome::default()).await.unwrap();
        }
        let per = t.elapsed().as_secs_f64() * 1e6 / f64::from(parts);
        let fired: Vec<_> = env
            .job_events(&parent.id)
            .await
            .unwrap()
            .into_iter()
            .filter(|e| e.topic == "job:parts-completed")
            .collect();
        assert_eq!(fired.len(), 1, "one job:parts-completed");
        assert_eq!(fired[0].payload["parts"]["completed"], serde_json::Value::from(parts));
        let base = *baseline.get_or_insert(per);
        println!("{:<44} {:>9.0} µs {:>11.2}x", format!("{parts} parts"), per, per / base);
    }
}

async fn insert(server: &jobhost_test_postgres::Server, n: u64) {
    println!("{:<44} {:>12} {:>12}", format!("insert {n} records, 100,000 per call"), "records/s", "vs SQLite");
    let mut baseline = None;
    for store in [Store::Sqlite, Store::Postgres(1)] {
        let f = fleet(server, store).await;
        let env = &f.envs[0];
        let sheet = env.create_sheet("people").await.unwrap();
        let batches: Vec<_> =
            (0..n).step_by(100_000).map(|s| scenario::sample_range(s..(s + 100_000).min(n)).0).collect();
        let t = Instant::now();
        for rows in batches {
            env.insert_records(&sheet.id, rows).await.unwrap();
        }
        let rate = n as f64 / t.elapsed().as_secs_f64();
        assert_eq!(env.record_counts(&sheet.id).await.unwrap().total, n);
        let base = *baseline.get_or_insert(rate);
        println!("{:<44} {:>10.0} /s {:>11.2}x", store.name(), rate, rate / base);
    }
}

async fn deploy(server: &jobhost_test_postgres::Server, n: usize) {
    use serde_json::Value;
    println!("{:<44} {:>12} {:>12}", format!("deploy through A, served by B ({n} deploys)"), "median", "max");
    let dir = tempfile::tempdir().unwrap();
    let store = server.fresh_database();
    let (a, b) = (serve(dir.path(), "a", &["--store", &store]), serve(dir.path(), "b", &["--store", &store]));
    let http = reqwest::Client::new();
    let (_, token) = environment_token(&http, &a.addr).await;
    let component = std::fs::read(artifacts::TEST_NOOP).unwrap();
    let (mut answered, mut served) = (Vec::new(), Vec::new());
    for i in 0..n {
        // A custom section makes each deploy a new version of the same plugin.
        let mut bytes = component.clone();
        bytes.extend_from_slice(&[0, 5, 4]);
        bytes.extend_from_slice(&(i as u32).to_le_bytes());
        let t = Instant::now();
        let body: Value = answer(
            http.put(format!("http://{}/v1/plugins/noop", a.addr))
                .bearer_auth(&token)
                .header("content-type", "application/wasm")
                .body(bytes),
        )
        .await;
        answered.push(t.elapsed());
        let version = body["data"]["version"].as_str().unwrap_or_else(|| panic!("deploy refused: {body}")).to_owned();
        // Asking B every 2 ms (a measurement, not a test): what B's API lists is what it serves.
        loop {
            let listed: Value = answer(http.get(format!("http://{}/v1/plugins", b.addr)).bearer_auth(&token)).await;
            if listed["data"][0]["version"] == version.as_str() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        served.push(t.elapsed());
    }
    let stats = |v: &mut Vec<Duration>| {
        v.sort();
        (v[v.len() / 2].as_secs_f64() * 1e3, v[v.len() - 1].as_secs_f64() * 1e3)
    };
    let (a_med, a_max) = stats(&mut answered);
    let (b_med, b_max) = stats(&mut served);
    println!("{:<44} {:>9.1} ms {:>9.1} ms", "A answers the deploy", a_med, a_max);
    println!(
        "{:<44} {:>9.1} ms {:>9.1} ms  ({:.2}x A's median)",
        "B serves it (from the deploy's start)",
        b_med,
        b_max,
        b_med / a_med
    );
}
