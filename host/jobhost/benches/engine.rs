//! Engine benchmarks, each reported next to a baseline measured in the same run.
//!
//! `cargo bench -p jobhost --bench engine` runs the full sizes; under `cargo test` (no
//! `--bench` argument) it runs a quick smoke with tiny sizes that only checks every
//! benchmark still executes and still computes the right answer — it asserts nothing about time.
//!
//! Rows:
//! - **lifecycle**: create → ready → ack → complete, with a native listener doing the ack and
//!   complete; and the same calls made directly (no listener). Baseline: raw SQLite doing the
//!   same row writes (job insert, four events, one delivery, three job updates, two delivery
//!   updates per job) in transactions of the same size, with the same durability.
//! - **records insert**: `insert_records` of N sample records. Baseline: raw SQLite inserting
//!   the same pre-encoded rows into the same table shape in one transaction.
//! - **records paging**: every page of 1,000 records, decoded into `Record`s. Baseline: raw
//!   SQLite reading the same rows' text without decoding.
//! - **records write-back**: page through the sheet and put an error message on every record,
//!   1,000 per `update_records` call. Baseline: raw SQLite reading each row and updating its
//!   messages, 1,000 per transaction.
//! - **cascade**: cancel a parent with N open parts (one transaction: each part canceled with
//!   its event). Baseline: splitting the same parent into those N parts (one transaction: each
//!   part created with its event) in the same run.
//! - **scenario**: the seeds' scenario with native listeners (N records, N/1000 parts): wall
//!   time, records/s and peak RSS.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use jobhost::listener::Listener;
use jobhost::model::{Ack, JobType, Message, NewJob, Outcome, RecordUpdate};
use jobhost::scenario;
use jobhost::store::sqlite::{SqliteOptions, Synchronous};
use jobhost::{Engine, EngineConfig};
use rusqlite::{Connection, params};

struct Sizes {
    lifecycles: usize,
    cascade_parts: u32,
    records: u64,
    scenario_records: u64,
}

// The same allocator as the `jobhost` binary, so the rows measure what users run.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let sizes = if full {
        Sizes { lifecycles: 20_000, cascade_parts: 10_000, records: 1_000_000, scenario_records: 1_000_000 }
    } else {
        Sizes { lifecycles: 300, cascade_parts: 50, records: 5_000, scenario_records: 3_000 }
    };
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    println!("jobhost engine benchmarks ({} mode, {} cores)", if full { "full" } else { "quick" }, num_cpus());
    println!("{:<44} {:>14} {:>14} {:>8}", "benchmark", "jobhost", "baseline", "ratio");
    // A row name runs that row; no row name runs them all.
    let rows = ["lifecycle", "records", "cascade", "scenario"];
    let named: Vec<String> = std::env::args().filter(|a| rows.contains(&a.as_str())).collect();
    let wants = |row: &str| named.is_empty() || named.iter().any(|a| a == row);
    rt.block_on(async {
        if wants("lifecycle") {
            lifecycle(&sizes).await;
        }
        if wants("records") {
            records(&sizes).await;
        }
        if wants("cascade") {
            cascade(sizes.cascade_parts).await;
        }
        if wants("scenario") {
            scenario_run(&sizes).await;
        }
    });
}

/// Split a parent into `n` parts, then cancel it: parts/s of each.
async fn cascade(n: u32) {
    let dir = tempfile::tempdir().unwrap();
    let engine = open(dir.path(), Synchronous::Full);
    let env = engine.env(engine.create_environment("bench").await.unwrap().id);
    let parent = env.create_job(NewJob::new(JobType::Space, "import")).await.unwrap();
    env.ack(&parent.id, Ack::default()).await.unwrap();
    let t = Instant::now();
    let split = env.split(&parent.id, jobhost::model::Split::count(n)).await.unwrap();
    let split_rate = f64::from(n) / t.elapsed().as_secs_f64();
    assert_eq!(split.parts, n);
    let t = Instant::now();
    let canceled = env.cancel(&parent.id, None).await.unwrap();
    let cancel_rate = f64::from(n) / t.elapsed().as_secs_f64();
    assert_eq!(canceled.status, jobhost::model::JobStatus::Canceled);
    let statuses = env.part_statuses(&parent.id).await.unwrap();
    assert!(statuses.len() == n as usize && statuses.iter().all(|s| *s == jobhost::model::JobStatus::Canceled));
    row(&format!("cancel a parent with {n} open parts (parts/s), vs split"), cancel_rate, split_rate, "/s");
}

fn num_cpus() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}

fn row(name: &str, ours: f64, base: f64, unit: &str) {
    // Ratio is ours ÷ baseline in throughput terms: 1.0 means as fast as the baseline.
    println!("{name:<44} {:>10.0} {unit:<3} {:>10.0} {unit:<3} {:>7.2}x", ours, base, ours / base);
}

fn config() -> EngineConfig {
    EngineConfig { ack_timeout: None, stale_timeout: None, ..EngineConfig::single_environment(256) }
}

fn open(dir: &std::path::Path, sync: Synchronous) -> Engine {
    jobhost::open_engine_with(SqliteOptions { synchronous: sync, ..SqliteOptions::new(dir) }, config()).unwrap()
}

async fn lifecycle(s: &Sizes) {
    let base = tokio::task::spawn_blocking({
        let n = s.lifecycles;
        move || raw_lifecycles(n)
    })
    .await
    .unwrap();
    for (sync, creators) in [(Synchronous::Full, 64), (Synchronous::Full, 512), (Synchronous::Normal, 64)] {
        let (with_listener, direct) = lifecycle_with(s.lifecycles, sync, creators).await;
        row(&format!("lifecycle, native listener, {sync:?}, {creators} clients"), with_listener, base, "/s");
        row(&format!("lifecycle, direct calls, {sync:?}, {creators} clients"), direct, base, "/s");
    }
}

async fn lifecycle_with(n: usize, sync: Synchronous, creators: usize) -> (f64, f64) {
    // With a native listener: the listener acks and completes each job.
    let dir = tempfile::tempdir().unwrap();
    let engine = open(dir.path(), sync);
    let env = engine.env(engine.create_environment("bench").await.unwrap().id);
    let done = Arc::new(AtomicUsize::new(0));
    let d = done.clone();
    let listener = Listener::new("bench", env.id()).on("job:ready", move |event| {
        let d = d.clone();
        async move {
            let id = event.job_id()?.to_owned();
            event.api.ack(&id, Ack::default()).await?;
            event.api.complete(&id, Outcome::default()).await?;
            d.fetch_add(1, Ordering::Relaxed);
            Ok(())
        }
    });
    let running = engine.run(vec![listener]).await.unwrap();
    let t = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for c in 0..creators {
        let env = env.clone();
        tasks.spawn(async move {
            for _ in (c..n).step_by(creators) {
                env.create_job(NewJob::new(JobType::Space, "bench")).await.unwrap();
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    engine
        .wait_for(|| {
            let d = done.clone();
            async move { Ok((d.load(Ordering::Relaxed) >= n).then_some(())) }
        })
        .await
        .unwrap();
    let with_listener = n as f64 / t.elapsed().as_secs_f64();
    running.shutdown().await;
    assert_eq!(engine.delivery_stats().await.unwrap().done as usize, n);

    // The same lifecycle driven by direct calls.
    let dir2 = tempfile::tempdir().unwrap();
    let engine2 = open(dir2.path(), sync);
    let env2 = engine2.env(engine2.create_environment("bench").await.unwrap().id);
    let t = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for c in 0..creators {
        let env = env2.clone();
        tasks.spawn(async move {
            for _ in (c..n).step_by(creators) {
                let j = env.create_job(NewJob::new(JobType::Space, "bench")).await.unwrap();
                env.ack(&j.id, Ack::default()).await.unwrap();
                env.complete(&j.id, Outcome::default()).await.unwrap();
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    let direct = n as f64 / t.elapsed().as_secs_f64();
    (with_listener, direct)
}

/// The row writes of `n` lifecycles on raw SQLite, 512 lifecycles per transaction.
fn raw_lifecycles(n: usize) -> f64 {
    let dir = tempfile::tempdir().unwrap();
    let conn = Connection::open(dir.path().join("raw.db")).unwrap();
    conn.execute_batch(
        "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL;
         CREATE TABLE jobs (id TEXT PRIMARY KEY, env TEXT, status TEXT, info TEXT, updated_at INTEGER, body TEXT);
         CREATE TABLE events (seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT UNIQUE, env TEXT, topic TEXT, job_id TEXT, payload TEXT);
         CREATE INDEX events_env ON events (env, seq);
         CREATE TABLE deliveries (id INTEGER PRIMARY KEY, event_seq INTEGER, status TEXT, due_at INTEGER);
         CREATE INDEX deliveries_due ON deliveries (due_at) WHERE status IN ('pending', 'leased');",
    )
    .unwrap();
    let payload = r#"{"domain":"space","operation":"bench","job":"space:bench","status":"ready","isPart":false}"#;
    let t = Instant::now();
    for chunk in (0..n).collect::<Vec<_>>().chunks(512) {
        let tx = conn.unchecked_transaction().unwrap();
        for &i in chunk {
            let id = format!("job_{i:016}");
            tx.prepare_cached("INSERT INTO jobs VALUES (?1, 'env', 'ready', NULL, 0, ?2)")
                .unwrap()
                .execute(params![id, payload])
                .unwrap();
            let event = |topic: &str, k: usize| {
                tx.prepare_cached(
                    "INSERT INTO events (id, env, topic, job_id, payload) VALUES (?1, 'env', ?2, ?3, ?4)",
                )
                .unwrap()
                .execute(params![format!("evt_{i}_{k}"), topic, id, payload])
                .unwrap();
                tx.last_insert_rowid()
            };
            event("job:created", 0);
            let ready = event("job:ready", 1);
            tx.prepare_cached("INSERT INTO deliveries (event_seq, status, due_at) VALUES (?1, 'pending', 0)")
                .unwrap()
                .execute([ready])
                .unwrap();
            let delivery = tx.last_insert_rowid();
            tx.prepare_cached("UPDATE deliveries SET status = 'leased', due_at = 1 WHERE id = ?1")
                .unwrap()
                .execute([delivery])
                .unwrap();
            for (status, topic, k) in [("executing", "job:updated", 2), ("complete", "job:completed", 3)] {
                tx.prepare_cached("UPDATE jobs SET status = ?2, updated_at = 1 WHERE id = ?1")
                    .unwrap()
                    .execute(params![id, status])
                    .unwrap();
                event(topic, k);
            }
            tx.prepare_cached("UPDATE deliveries SET status = 'done', due_at = NULL WHERE id = ?1")
                .unwrap()
                .execute([delivery])
                .unwrap();
            tx.prepare_cached("UPDATE jobs SET info = 'x' WHERE id = ?1").unwrap().execute([&id]).unwrap();
        }
        tx.commit().unwrap();
    }
    n as f64 / t.elapsed().as_secs_f64()
}

async fn records(s: &Sizes) {
    let n = s.records;
    let dir = tempfile::tempdir().unwrap();
    let engine = jobhost::open_engine(dir.path(), config()).unwrap();
    let env = engine.env(engine.create_environment("bench").await.unwrap().id);
    let sheet = env.create_sheet("bench").await.unwrap();
    let (rows, _) = scenario::sample_records(n);
    let encoded: Vec<String> = rows.iter().map(|r| serde_json::Value::Object(r.values.clone()).to_string()).collect();
    let t = Instant::now();
    assert_eq!(env.insert_records(&sheet.id, rows).await.unwrap(), n);
    let insert = n as f64 / t.elapsed().as_secs_f64();

    let t = Instant::now();
    let mut seen = 0;
    for page in 1.. {
        let p = env.records(&sheet.id, 1000, page).await.unwrap();
        if p.records.is_empty() {
            break;
        }
        seen += p.records.len() as u64;
    }
    assert_eq!(seen, n);
    let paging = n as f64 / t.elapsed().as_secs_f64();

    // Write-back: an error message on every record, 1,000 records per call (what a part does).
    let t = Instant::now();
    for page in 1.. {
        let p = env.records(&sheet.id, 1000, page).await.unwrap();
        if p.records.is_empty() {
            break;
        }
        let updates = p
            .records
            .iter()
            .map(|r| RecordUpdate {
                id: r.id.clone(),
                values: Default::default(),
                messages: Some(vec![Message::error("email", "bad")]),
            })
            .collect();
        assert_eq!(env.update_records(&sheet.id, updates).await.unwrap(), p.records.len() as u64);
    }
    let write_back = n as f64 / t.elapsed().as_secs_f64();
    assert_eq!(env.record_counts(&sheet.id).await.unwrap().error, n);

    let (raw_insert, raw_page, raw_update) = tokio::task::spawn_blocking(move || raw_records(&encoded)).await.unwrap();
    row("records insert (records/s)", insert, raw_insert, "/s");
    row("records paging, 1,000 per page (records/s)", paging, raw_page, "/s");
    row("records write-back, read + update 1,000/call (rec/s)", write_back, raw_update, "/s");
}

fn raw_records(encoded: &[String]) -> (f64, f64, f64) {
    let dir = tempfile::tempdir().unwrap();
    let conn = Connection::open(dir.path().join("raw.db")).unwrap();
    conn.execute_batch(
        "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL;
         CREATE TABLE records (id INTEGER PRIMARY KEY, sheet_key INTEGER NOT NULL, ord INTEGER NOT NULL, vals TEXT NOT NULL,
             messages TEXT, metadata TEXT, has_error INTEGER NOT NULL, updated_at INTEGER NOT NULL);
         CREATE UNIQUE INDEX records_order ON records (sheet_key, ord);
         CREATE INDEX records_errors ON records (sheet_key) WHERE has_error = 1;",
    )
    .unwrap();
    let t = Instant::now();
    let tx = conn.unchecked_transaction().unwrap();
    {
        let mut stmt = tx
            .prepare("INSERT INTO records (sheet_key, ord, vals, has_error, updated_at) VALUES (1, ?1, ?2, 0, 0)")
            .unwrap();
        for (i, v) in encoded.iter().enumerate() {
            stmt.execute(params![i as i64, v]).unwrap();
        }
    }
    tx.commit().unwrap();
    let insert = encoded.len() as f64 / t.elapsed().as_secs_f64();
    let t = Instant::now();
    let mut stmt = conn.prepare("SELECT id, vals, messages, metadata FROM records WHERE sheet_key = 1 AND ord >= ?1 ORDER BY ord LIMIT 1000").unwrap();
    let mut seen = 0usize;
    let mut offset = 0i64;
    loop {
        let rows: Vec<(i64, String, Option<String>, Option<String>)> = stmt
            .query_map([offset], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
            .unwrap()
            .map(Result::unwrap)
            .collect();
        if rows.is_empty() {
            break;
        }
        seen += rows.len();
        offset += 1000;
    }
    assert_eq!(seen, encoded.len());
    let page = encoded.len() as f64 / t.elapsed().as_secs_f64();
    drop(stmt);
    // The same write-back on raw SQLite: read each row's values, write messages, 1,000 per
    // transaction.
    let messages = r#"[{"type":"error","message":"bad","field":"email"}]"#;
    let t = Instant::now();
    for chunk in (1..=encoded.len() as i64).collect::<Vec<_>>().chunks(1000) {
        let tx = conn.unchecked_transaction().unwrap();
        for id in chunk {
            let vals: String = tx
                .prepare_cached("SELECT vals FROM records WHERE id = ?1")
                .unwrap()
                .query_row([id], |r| r.get(0))
                .unwrap();
            tx.prepare_cached("UPDATE records SET vals = ?2, messages = ?3, has_error = 1 WHERE id = ?1")
                .unwrap()
                .execute(params![id, vals, messages])
                .unwrap();
        }
        tx.commit().unwrap();
    }
    (insert, page, encoded.len() as f64 / t.elapsed().as_secs_f64())
}

fn reset_peak_rss() {
    // Writing 5 to clear_refs resets VmHWM to the current RSS (Linux ≥ 4.0).
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

fn rss_mib(key: &str) -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with(key)).and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(0.0, |kib| kib / 1024.0)
}

async fn scenario_run(s: &Sizes) {
    let n = s.scenario_records;
    let dir = tempfile::tempdir().unwrap();
    let engine = jobhost::open_engine(dir.path(), config()).unwrap();
    let env = engine.env(engine.create_environment("bench").await.unwrap().id);
    let running = engine.run(scenario::listeners(env.id(), scenario::Options::default())).await.unwrap();
    let sheet = env.create_sheet("people").await.unwrap();
    let invalid = scenario::insert_sample(&env, &sheet.id, n).await.unwrap();
    // Peak RSS from here on is the scenario's, not the earlier benchmarks' or the sample data's.
    reset_peak_rss();
    let rss_before = rss_mib("VmRSS:");
    let t = Instant::now();
    let job = env.create_job(NewJob::sheet(scenario::OPERATION, &sheet.id)).await.unwrap();
    let job = engine
        .wait_for(|| {
            let (env, id) = (env.clone(), job.id.clone());
            async move { Ok(Some(env.job(&id).await?).filter(|j| j.status.is_terminal())) }
        })
        .await
        .unwrap();
    let took = t.elapsed();
    running.shutdown().await;
    assert_eq!(job.status, jobhost::model::JobStatus::Complete);
    assert_eq!(env.record_counts(&sheet.id).await.unwrap().error, invalid);
    println!(
        "{:<44} {:>10.2} s   {:>10.0} records/s, {} parts, RSS {:.0} MiB before the job, peak {:.0} MiB",
        format!("scenario, native listeners, {n} records"),
        took.as_secs_f64(),
        n as f64 / took.max(Duration::from_micros(1)).as_secs_f64(),
        n.div_ceil(1000),
        rss_before,
        rss_mib("VmHWM:")
    );
}
