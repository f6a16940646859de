//! A store with millions of events: what retention and `/metrics` cost at that size, and what
//! the host's memory does.
//!
//! `cargo bench -p jobhost --bench history` fills a SQLite store with 10,000,000 events (and a
//! done delivery per event, and an execution record per five events), written 40 days ago,
//! plus 100,000 of each written now and 1,000 dead letters among the old ones; under
//! `cargo test` the same with 20,000 events, to check the answers.
//!
//! Rows (each beside a baseline measured in the same run, on the same store):
//! - **metrics read**: what `/metrics` reads from the store (jobs by status, open deliveries
//!   from their indexes, the store's size). Baseline: counting deliveries by status and
//!   executions by outcome, as `/metrics` did before (scans).
//! - **sweep, nothing to prune**: one retention sweep over a store whose history is all
//!   newer than the cut. Baseline: the same sweep on an empty store.
//! - **sweep, everything old**: the first sweep after the history aged (rows deleted per
//!   second). Baseline: raw SQLite deleting the same rows with one `DELETE … WHERE` per table
//!   in one transaction (no batches, the writer held throughout).
//! - **RSS**: the process's resident memory after filling, after the sweep and at its peak.
//! - **a backlog of open deliveries**: 1,000,000 pending deliveries (5,000 under `cargo test`)
//!   drained by a native listener at 64 in flight: the rate, and the host's peak RSS while it
//!   drains. Baseline: the host's RSS before it starts.

use std::time::{Duration, Instant};

use jobhost::store::sqlite::SqliteOptions;
use jobhost::{Engine, EngineConfig};
use rusqlite::{Connection, params};

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const DAY_MS: i64 = 86_400_000;

#[derive(Clone, Copy)]
struct Sizes {
    old_events: i64,
    new_events: i64,
    dead: i64,
    backlog: i64,
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let sizes = if full {
        Sizes { old_events: 10_000_000, new_events: 100_000, dead: 1_000, backlog: 1_000_000 }
    } else {
        Sizes { old_events: 20_000, new_events: 2_000, dead: 50, backlog: 5_000 }
    };
    println!("jobhost history benchmarks ({} mode)", if full { "full" } else { "quick" });
    println!("{:<44} {:>14} {:>14} {:>8}", "benchmark", "jobhost", "baseline", "ratio");
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    let only = |row: &str| std::env::args().any(|a| a == row);
    if only("backlog") || !only("retention") {
        rt.block_on(backlog(sizes.backlog));
    }
    if only("retention") || !only("backlog") {
        rt.block_on(run(&sizes));
    }
}

/// A native listener that takes every `job:completed` and does nothing with it.
fn drain(env: &str) -> jobhost::listener::Listener {
    jobhost::listener::Listener::new("drain", env).on("job:completed", |_| async { Ok(()) })
}

async fn backlog(n: i64) {
    let dir = tempfile::tempdir().unwrap();
    let engine = open(dir.path());
    let env = engine.environment_named("bench").await.unwrap().id;
    engine.run(vec![drain(&env)]).await.unwrap().shutdown().await;
    let now = engine.now();
    drop(engine);
    let path = dir.path().join("jobhost.db");
    let env_id = env.clone();
    tokio::task::spawn_blocking(move || {
        let mut conn = Connection::open(path).unwrap();
        conn.pragma_update(None, "synchronous", "OFF").unwrap();
        let sub: String = conn.query_row("SELECT id FROM subscriptions", [], |r| r.get(0)).unwrap();
        let tx = conn.transaction().unwrap();
        {
            let mut event = tx
                .prepare(
                    "INSERT INTO events (seq, id, environment_id, topic, job_id, context, payload, created_at) \
                     VALUES (?1, ?2, ?3, 'job:completed', ?4, '{}', '{}', ?5)",
                )
                .unwrap();
            let mut delivery = tx
                .prepare(
                    "INSERT INTO deliveries (id, event_seq, subscription_id, status, attempts, due_at) \
                     VALUES (?1, ?1, ?2, 'pending', 0, ?3)",
                )
                .unwrap();
            for seq in 1..=n {
                event.execute(params![seq, format!("evt_{seq:016}"), env_id, format!("job_{seq:016}"), now]).unwrap();
                delivery.execute(params![seq, sub, now]).unwrap();
            }
        }
        tx.commit().unwrap();
    })
    .await
    .unwrap();
    let engine = open(dir.path());
    assert_eq!(engine.open_delivery_stats().await.unwrap().pending as i64, n);
    // Peak RSS from here on is the drain's (writing 5 to clear_refs resets VmHWM).
    let _ = std::fs::write("/proc/self/clear_refs", "5");
    let before = rss_mib("VmRSS:");
    let started = Instant::now();
    let running = engine.run(vec![drain(&env)]).await.unwrap();
    loop {
        let open = engine.open_delivery_stats().await.unwrap();
        if open.pending + open.leased == 0 {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(3600), "the backlog did not drain: {open:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let secs = started.elapsed().as_secs_f64();
    running.shutdown().await;
    assert_eq!(engine.delivery_stats().await.unwrap().done as i64, n, "every delivery handled once");
    let peak = rss_mib("VmHWM:");
    println!("{:<44} {:>10.0} d/s", format!("drain {n} pending deliveries"), n as f64 / secs);
    println!(
        "{:<44} {peak:>10.0} MiB {before:>10.0} MiB {:>7.2}x",
        "  peak RSS while draining (vs before)",
        peak / before
    );
}

fn config() -> EngineConfig {
    EngineConfig {
        ack_timeout: None,
        stale_timeout: None,
        retention: Some(Duration::from_secs(30 * 86_400)),
        ..EngineConfig::single_environment(64)
    }
}

fn open(dir: &std::path::Path) -> Engine {
    jobhost::open_engine_with(SqliteOptions::new(dir), config()).unwrap()
}

fn rss_mib(key: &str) -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        .map_or(0.0, |kib| kib / 1024.0)
}

/// Writes the history straight into the store's tables (the engine would take minutes to
/// write ten million events): old rows 40 days back, new rows now, dead letters among the old.
fn fill(dir: &std::path::Path, env: &str, s: &Sizes, now: i64) {
    let mut conn = Connection::open(dir.join("jobhost.db")).unwrap();
    conn.pragma_update(None, "journal_mode", "WAL").unwrap();
    conn.pragma_update(None, "synchronous", "OFF").unwrap();
    let total = s.old_events + s.new_events;
    let chunk = 200_000;
    let mut seq = 0i64;
    while seq < total {
        let tx = conn.transaction().unwrap();
        {
            let mut event = tx
                .prepare(
                    "INSERT INTO events (seq, id, environment_id, topic, job_id, context, payload, created_at) \
                     VALUES (?1, ?2, ?3, 'job:completed', ?4, '{}', '{\"status\":\"complete\"}', ?5)",
                )
                .unwrap();
            let mut delivery = tx
                .prepare(
                    "INSERT INTO deliveries (id, event_seq, subscription_id, status, attempts, due_at, lease_owner, last_error, finished_at) \
                     VALUES (?1, ?1, 'sub_bench', ?2, 1, NULL, NULL, ?3, ?4)",
                )
                .unwrap();
            let mut exec = tx
                .prepare(
                    "INSERT INTO executions (environment_id, plugin, plugin_version, route, event_id, topic, job_id, attempt, \
                     started_at, duration_us, cpu_us, outcome, error, peak_memory, logs) \
                     VALUES (?1, 'bench', 'v1', 0, ?2, 'job:completed', ?3, 1, ?4, 10, 5, 'ok', NULL, 0, 'INFO a line of log')",
                )
                .unwrap();
            for _ in 0..chunk.min(total - seq) {
                seq += 1;
                let old = seq <= s.old_events;
                let at = if old { now - 40 * DAY_MS + seq } else { now - 1000 };
                let (id, job) = (format!("evt_{seq:016}"), format!("job_{:016}", seq / 5));
                event.execute(params![seq, id, env, job, at]).unwrap();
                let dead = old && seq % (s.old_events / s.dead) == 0;
                let (status, error) = if dead { ("dead", Some("failed on purpose")) } else { ("done", None) };
                delivery.execute(params![seq, status, error, if dead { None } else { Some(at) }]).unwrap();
                if seq % 5 == 0 {
                    exec.execute(params![env, id, job, at]).unwrap();
                }
            }
        }
        tx.commit().unwrap();
    }
    conn.pragma_update(None, "wal_checkpoint", "TRUNCATE").unwrap();
}

fn row(name: &str, ours: f64, base: f64, unit: &str) {
    println!("{name:<44} {ours:>10.1} {unit:<3} {base:>10.1} {unit:<3} {:>7.2}x", base / ours);
}

fn row_rate(name: &str, ours: f64, base: f64, unit: &str) {
    println!("{name:<44} {ours:>10.0} {unit:<3} {base:>10.0} {unit:<3} {:>7.2}x", ours / base);
}

async fn run(s: &Sizes) {
    let dir = tempfile::tempdir().unwrap();
    let engine = open(dir.path());
    let env = engine.environment_named("bench").await.unwrap().id;
    let now = engine.now();
    drop(engine);
    let started = Instant::now();
    let (path, sizes) = (dir.path().to_owned(), *s);
    tokio::task::spawn_blocking(move || fill(&path, &env, &sizes, now)).await.unwrap();
    let file_mib = std::fs::metadata(dir.path().join("jobhost.db")).unwrap().len() as f64 / 1048576.0;
    println!(
        "filled {} events, {} deliveries, {} executions in {:.1} s ({file_mib:.0} MiB)",
        s.old_events + s.new_events,
        s.old_events + s.new_events,
        (s.old_events + s.new_events) / 5,
        started.elapsed().as_secs_f64()
    );
    // The baseline's copy, taken before the engine opens the store.
    let copy = tempfile::tempdir().unwrap();
    std::fs::copy(dir.path().join("jobhost.db"), copy.path().join("jobhost.db")).unwrap();
    let engine = open(dir.path());
    let rss_filled = rss_mib("VmRSS:");

    // What /metrics reads now, and what it used to read (full counts).
    let t = Instant::now();
    let (open_stats, size) = (engine.open_delivery_stats().await.unwrap(), engine.store_size().await.unwrap());
    engine.job_status_counts().await.unwrap();
    let ours = t.elapsed().as_secs_f64() * 1e3;
    assert_eq!((open_stats.dead, open_stats.pending), (s.dead as u64, 0));
    let events_span = size.rows.iter().find(|(t, _)| *t == "events").unwrap().1;
    assert_eq!(events_span as i64, s.old_events + s.new_events);
    let t = Instant::now();
    let all = engine.delivery_stats().await.unwrap();
    let (_, executions) = engine.store_metrics().await.unwrap();
    let base = t.elapsed().as_secs_f64() * 1e3;
    assert_eq!(all.done as i64, s.old_events + s.new_events - s.dead);
    assert_eq!(executions.iter().map(|e| e.1).sum::<u64>() as i64, (s.old_events + s.new_events) / 5);
    row("metrics read (store part)", ours, base, "ms");

    // A sweep with nothing old enough: everything is newer than a cut 50 days back.
    let empty_dir = tempfile::tempdir().unwrap();
    let empty = open(empty_dir.path());
    empty.environment_named("bench").await.unwrap();
    let cut = now - 50 * DAY_MS;
    let t = Instant::now();
    let base_pruned = jobhost::retention::prune(&empty, cut).await.unwrap();
    let base = t.elapsed().as_secs_f64() * 1e3;
    let t = Instant::now();
    let pruned = jobhost::retention::prune(&engine, cut).await.unwrap();
    let ours = t.elapsed().as_secs_f64() * 1e3;
    assert_eq!((pruned, base_pruned), Default::default());
    row("sweep, nothing to prune", ours, base, "ms");

    // The history ages: the first sweep deletes all of the old.
    let rss_before = rss_mib("VmRSS:");
    let t = Instant::now();
    let pruned = engine.prune().await.unwrap();
    let secs = t.elapsed().as_secs_f64();
    let deleted = pruned.events + pruned.deliveries + pruned.executions;
    assert_eq!(pruned.events as i64, s.old_events - s.dead, "the dead letters' events stay");
    assert_eq!(pruned.deliveries as i64, s.old_events - s.dead);
    assert_eq!(pruned.executions as i64, s.old_events / 5);
    let left = engine.delivery_stats().await.unwrap();
    assert_eq!((left.done as i64, left.dead as i64), (s.new_events, s.dead));
    let rss_after = rss_mib("VmRSS:");
    drop(engine);

    // Baseline: the same deletes as three statements in one transaction, on the copy.
    let _ = std::fs::remove_dir_all(dir.path());
    let path = copy.path().join("jobhost.db");
    let base_secs = tokio::task::spawn_blocking(move || {
        let mut conn = Connection::open(path).unwrap();
        conn.pragma_update(None, "synchronous", "FULL").unwrap();
        let before = now - 30 * DAY_MS;
        let t = Instant::now();
        let tx = conn.transaction().unwrap();
        let mut n = tx
            .execute(
                "DELETE FROM events WHERE created_at < ?1 AND seq NOT IN \
                 (SELECT event_seq FROM deliveries WHERE status <> 'done')",
                [before],
            )
            .unwrap();
        n += tx.execute("DELETE FROM deliveries WHERE status = 'done' AND finished_at < ?1", [before]).unwrap();
        n += tx.execute("DELETE FROM executions WHERE started_at < ?1", [before]).unwrap();
        tx.commit().unwrap();
        (t.elapsed().as_secs_f64(), n)
    })
    .await
    .unwrap();
    assert_eq!(base_secs.1 as u64, deleted, "the baseline deletes the same rows");
    row_rate("sweep, everything old (rows/s)", deleted as f64 / secs, deleted as f64 / base_secs.0, "r/s");
    println!(
        "RSS: {rss_filled:.0} MiB opened on the full store, {rss_before:.0} before the sweep, {rss_after:.0} after, \
         peak {:.0} MiB",
        rss_mib("VmHWM:")
    );
}
