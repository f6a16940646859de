//! The SQLite backend against the store conformance suite, and what only this backend promises:
//! a data directory one process at a time, and everything still there after a reopen.

use std::path::Path;
use std::sync::Arc;

use jobhost_engine::conformance::{TestHost, test_config};
use jobhost_engine::model::{
    Ack, JobStatus, JobType, Message, MessageType, NewJob, NewRecord, RecordCounts, RecordUpdate,
};
use jobhost_engine::{Engine, EngineConfig};
use jobhost_store::Backend;
use jobhost_store_sqlite::{SqliteBackend, SqliteOptions};
use serde_json::json;

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

/// The statements the writer runs on every job build no temporary b-tree: SQLite codes an `IN`
/// list of three or more constants (as in a partial index's predicate, which runs on every
/// insert and update) as one built and freed each time, a tenth of the writer's time once.
#[test]
fn job_writes_build_no_temporary_btree() {
    let dir = tempfile::tempdir().unwrap();
    drop(SqliteBackend::open(SqliteOptions::new(dir.path())).unwrap());
    let conn = rusqlite::Connection::open(SqliteBackend::db_path(dir.path())).unwrap();
    for sql in [
        "INSERT INTO jobs (id, environment_id, kind, operation, status, trigger_, mode, progress, attempt, created_at, updated_at) \
         VALUES ('j', 'e', 'file', 'op', 'ready', 'immediate', 'foreground', 0, 0, 0, 0)",
        "UPDATE jobs SET status = 'executing', updated_at = 1 WHERE id = 'j'",
        "INSERT INTO deliveries (event_seq, subscription_id, status, attempts, due_at) VALUES (1, 's', 'pending', 0, 0)",
        "UPDATE deliveries SET status = 'done', due_at = NULL WHERE id = 1",
    ] {
        let ops: Vec<String> = conn
            .prepare(&format!("EXPLAIN {sql}"))
            .unwrap()
            .query_map([], |r| r.get::<_, String>(1))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert!(!ops.iter().any(|op| op == "OpenEphemeral"), "{sql} builds a temporary b-tree: {ops:?}");
    }
}

/// What a job waits on is read through the partial indexes of open and dead deliveries, never
/// by scanning every delivery (finished ones are most of them).
#[test]
fn open_deliveries_are_read_through_the_partial_indexes() {
    let dir = tempfile::tempdir().unwrap();
    drop(SqliteBackend::open(SqliteOptions::new(dir.path())).unwrap());
    let conn = jobhost_store_sqlite::reader_connection(dir.path()).unwrap();
    let plan: Vec<String> = conn
        .prepare(&format!("EXPLAIN QUERY PLAN {}", jobhost_store_sqlite::OPEN_DELIVERIES_SQL))
        .unwrap()
        .query_map(["e", "j"], |r| r.get::<_, String>(3))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let deliveries: Vec<&String> = plan.iter().filter(|l| l.contains(" d ") || l.ends_with(" d")).collect();
    assert_eq!(deliveries.len(), 2, "{plan:?}");
    assert!(deliveries[0].contains("USING INDEX deliveries_due"), "{plan:?}");
    assert!(deliveries[1].contains("USING INDEX deliveries_dead"), "{plan:?}");
    assert!(plan.iter().any(|l| l.contains("SEARCH e USING INTEGER PRIMARY KEY")), "{plan:?}");
}

/// SQL that takes a store of today's schema back to schema 8: messages in the record's row.
const BACK_TO_SCHEMA_8: &str = "ALTER TABLE records ADD COLUMN messages TEXT; \
     ALTER TABLE records ADD COLUMN has_error INTEGER NOT NULL DEFAULT 0; \
     UPDATE records SET messages = m.messages, has_error = m.has_error FROM record_messages m WHERE m.record_id = records.id; \
     DROP TABLE record_messages; \
     CREATE INDEX records_errors ON records (sheet_key) WHERE has_error = 1; \
     PRAGMA user_version = 8;";

/// A page of records walks the order index and reads its messages as one range of keys;
/// writing a record's messages finds the record by key and writes only the messages' table.
#[test]
fn records_and_their_messages_are_found_by_key() {
    let dir = tempfile::tempdir().unwrap();
    drop(SqliteBackend::open(SqliteOptions::new(dir.path())).unwrap());
    let conn = jobhost_store_sqlite::reader_connection(dir.path()).unwrap();
    let plan = |sql: &str, params: &[&dyn rusqlite::ToSql]| -> Vec<String> {
        conn.prepare(&format!("EXPLAIN QUERY PLAN {sql}"))
            .unwrap()
            .query_map(params, |r| r.get::<_, String>(3))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
    };
    let page = plan(jobhost_store_sqlite::RECORD_PAGE_SQL, &[&1, &0, &1000]);
    assert_eq!(page.len(), 1, "{page:?}");
    assert!(page[0].contains("SEARCH records USING INDEX records_order"), "{page:?}");
    let messages = plan(jobhost_store_sqlite::PAGE_MESSAGES_SQL, &[&1, &1000, &1]);
    assert_eq!(messages.len(), 1, "{messages:?}");
    assert!(
        messages[0].contains("SEARCH record_messages USING INTEGER PRIMARY KEY (rowid>? AND rowid<?)"),
        "{messages:?}"
    );
    assert!(!messages.iter().any(|l| l.contains("TEMP B-TREE")), "in key order as stored: {messages:?}");
    let record = plan(jobhost_store_sqlite::RECORD_IN_SHEET_SQL, &[&1, &1]);
    assert_eq!(record.len(), 1, "{record:?}");
    assert!(record[0].contains("SEARCH records USING INTEGER PRIMARY KEY (rowid=?)"), "{record:?}");
}

/// A store in a fresh directory with an environment and an empty sheet in it.
async fn store_with_a_sheet() -> (tempfile::TempDir, Engine, jobhost_engine::Env, jobhost_engine::model::Sheet) {
    let dir = tempfile::tempdir().unwrap();
    let engine = open_engine(dir.path(), test_config()).unwrap();
    let env = engine.env(engine.create_environment("records").await.unwrap().id);
    let sheet = env.create_sheet("s").await.unwrap();
    (dir, engine, env, sheet)
}

/// A sheet's record count is one descent of the order index to its highest `ord`, not a walk
/// of its entries: the seeds' job reads it twice on its critical path, and `COUNT(*)` over a
/// million records took ~60 ms each time. Counted here in SQLite's virtual-machine steps,
/// which a walk makes a few per record.
#[tokio::test]
async fn a_sheets_record_count_reads_no_more_for_more_records() {
    let (dir, _engine, env, sheet) = store_with_a_sheet().await;
    let conn = jobhost_store_sqlite::reader_connection(dir.path()).unwrap();
    let steps = |expected: i64| {
        let mut stmt = conn.prepare(jobhost_store_sqlite::SHEET_SIZE_SQL).unwrap();
        let n: i64 = stmt.query_row([1], |r| r.get(0)).unwrap();
        assert_eq!(n, expected);
        stmt.get_status(rusqlite::StatementStatus::VmStep)
    };
    steps(0); // An empty sheet counts 0.
    let (rows, _) = jobhost_engine::scenario::sample_records(5);
    env.insert_records(&sheet.id, rows).await.unwrap();
    let few = steps(5);
    let (rows, _) = jobhost_engine::scenario::sample_records(3000);
    env.insert_records(&sheet.id, rows).await.unwrap();
    let many = steps(3005);
    assert_eq!(few, many, "the same steps for 5 and 3,005 records");
    assert!(many < 100, "{many} steps");
    assert_eq!(env.record_counts(&sheet.id).await.unwrap().total, 3005);
}

/// A page's messages are read as one range of record keys, from its lowest to its highest;
/// when a sheet's order is not its keys' order (SQLite past the highest key picks a lower one
/// at random), a record of another page falls in that range, and its messages are not this
/// page's. Made here by swapping two records' places in the sheet by hand.
#[tokio::test]
async fn a_page_gets_only_its_own_records_messages_when_keys_are_out_of_order() {
    let (dir, _engine, env, sheet) = store_with_a_sheet().await;
    let (rows, _) = jobhost_engine::scenario::sample_records(6);
    env.insert_records(&sheet.id, rows).await.unwrap();
    let ids: Vec<String> = env.records(&sheet.id, 6, 1).await.unwrap().records.into_iter().map(|r| r.id).collect();
    let mark = |id: &str| RecordUpdate {
        id: id.to_owned(),
        messages: Some(vec![Message::error("email", "marked")]),
        ..Default::default()
    };
    env.update_records(&sheet.id, vec![mark(&ids[1])]).await.unwrap();
    // Records 1 and 4 trade places: page 1 of 3 is now keys 0, 4, 2 and holds record 1's key
    // in its range; record 1, with the only messages, is on page 2.
    let conn = rusqlite::Connection::open(SqliteBackend::db_path(dir.path())).unwrap();
    let rowid = |id: &str| id.trim_start_matches("rec_").parse::<i64>().unwrap();
    conn.execute_batch(&format!(
        "BEGIN; UPDATE records SET ord = -1 WHERE id = {one}; UPDATE records SET ord = 1 WHERE id = {four}; \
         UPDATE records SET ord = 4 WHERE id = {one}; COMMIT;",
        one = rowid(&ids[1]),
        four = rowid(&ids[4])
    ))
    .unwrap();
    let page = env.records(&sheet.id, 3, 1).await.unwrap().records;
    assert_eq!(page.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(), [&ids[0], &ids[4], &ids[2]]);
    assert!(page.iter().all(|r| r.valid), "{page:?}");
    let buffers = env.record_page_into(&sheet.id, 3, 1, Messages::default()).await.unwrap();
    assert!(buffers.marked.is_empty(), "record 1's messages handed with page 1: {:?}", buffers.marked);
    let second = env.record_page_into(&sheet.id, 3, 2, Messages::default()).await.unwrap();
    assert_eq!(second.marked, [rowid(&ids[1])]);
    assert!(!env.records(&sheet.id, 3, 2).await.unwrap().records[1].valid);
}

/// The ids of the rows a page hands messages for.
#[derive(Default)]
struct Messages {
    rows: Vec<i64>,
    marked: Vec<i64>,
}

impl jobhost_store::RowSink for Messages {
    fn row(&mut self, rowid: i64, _: &str, _: Option<&str>) -> jobhost_engine::Result<()> {
        self.rows.push(rowid);
        Ok(())
    }

    fn messages(&mut self, at: usize, _: &str) -> jobhost_engine::Result<()> {
        self.marked.push(self.rows[at]);
        Ok(())
    }
}

/// A statement is planned once: binding new values to it (a page of records, a lease, each
/// with `ORDER BY … LIMIT ?`) does not make SQLite parse and plan it again.
#[test]
fn a_statement_is_not_planned_again_for_new_values() {
    let dir = tempfile::tempdir().unwrap();
    drop(SqliteBackend::open(SqliteOptions::new(dir.path())).unwrap());
    let conn = jobhost_store_sqlite::reader_connection(dir.path()).unwrap();
    for sql in [
        jobhost_store_sqlite::RECORD_PAGE_SQL,
        "SELECT d.id FROM deliveries d WHERE d.status IN ('pending', 'leased') AND d.due_at <= ?1 \
         AND d.subscription_id IN (SELECT value FROM json_each(?2)) ORDER BY d.due_at, d.id LIMIT ?3",
    ] {
        let mut stmt = conn.prepare(sql).unwrap();
        for i in 0..3 {
            let rows = stmt.query_map(rusqlite::params![i, format!("[\"sub_{i}\"]"), 10 + i], |r| r.get::<_, i64>(0));
            assert_eq!(rows.unwrap().count(), 0);
        }
        assert_eq!(stmt.get_status(rusqlite::StatementStatus::RePrepare), 0, "{sql}");
    }
}

/// A closed store in `dir` with an environment and one job in it: their ids.
async fn store_with_one_job(dir: &Path) -> (String, String) {
    let engine = open_engine(dir, test_config()).unwrap();
    let e = engine.create_environment("old").await.unwrap();
    let job = engine.env(&e.id).create_job(NewJob::new(JobType::File, "work")).await.unwrap();
    (e.id, job.id)
}

/// A store made before the live-jobs index was respelled (schema 6) opens with its jobs intact
/// and the index in its new form, still used by the watchdog's query.
#[tokio::test]
async fn a_schema_6_store_migrates_its_live_jobs_index() {
    let dir = tempfile::tempdir().unwrap();
    let (env_id, job_id) = store_with_one_job(dir.path()).await;
    let index_sql = |conn: &rusqlite::Connection| -> String {
        conn.query_row("SELECT sql FROM sqlite_master WHERE name = 'jobs_live'", [], |r| r.get(0)).unwrap()
    };
    {
        // Back to schema 6 as it was shipped.
        let conn = rusqlite::Connection::open(SqliteBackend::db_path(dir.path())).unwrap();
        conn.execute_batch(BACK_TO_SCHEMA_8).unwrap();
        conn.execute_batch(
            "DROP INDEX jobs_live; \
             CREATE INDEX jobs_live ON jobs (status) WHERE status IN ('scheduled', 'ready', 'executing'); \
             PRAGMA user_version = 6;",
        )
        .unwrap();
        assert!(index_sql(&conn).contains("IN ("));
    }
    let engine = open_engine(dir.path(), test_config()).unwrap();
    assert_eq!(engine.env(&env_id).job(&job_id).await.unwrap().status, JobStatus::Ready);
    drop(engine);
    let conn = jobhost_store_sqlite::reader_connection(dir.path()).unwrap();
    let sql = index_sql(&conn);
    assert!(!sql.contains("IN (") && sql.contains("status = 'executing'"), "{sql}");
    let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0)).unwrap();
    assert!(version >= 7, "{version}");
    let plan: Vec<String> = conn
        .prepare(
            "EXPLAIN QUERY PLAN SELECT id FROM jobs WHERE (status = 'scheduled' OR status = 'ready' OR status = 'executing') \
             AND run_at <= 0",
        )
        .unwrap()
        .query_map([], |r| r.get::<_, String>(3))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert!(plan.iter().any(|p| p.contains("jobs_live")), "{plan:?}");
}

/// Writes `ids` as sheets straight through the backend; the receiver gets each answer.
fn submit_sheets(
    backend: &SqliteBackend,
    ids: std::ops::Range<usize>,
) -> std::sync::mpsc::Receiver<jobhost_engine::Result<()>> {
    let (answers, rx) = std::sync::mpsc::channel();
    for i in ids {
        let answers = answers.clone();
        backend.submit_write(jobhost_store::WriteOp {
            run: Box::new(move |tx| {
                let sheet = jobhost_engine::model::Sheet {
                    id: format!("sh_{i}"),
                    environment_id: "env_sync".into(),
                    name: format!("n{i}"),
                    workbook_id: None,
                    created_at: 1,
                };
                tx.insert_sheet(&sheet).is_ok()
            }),
            reply: Box::new(move |r| {
                let _ = answers.send(r);
            }),
        });
    }
    rx
}

fn answer(rx: &std::sync::mpsc::Receiver<jobhost_engine::Result<()>>) -> jobhost_engine::Result<()> {
    rx.recv_timeout(std::time::Duration::from_secs(60)).expect("a write is answered within a minute")
}

/// `Synchronous::Full` (the default) answers a write only after a sync of the log that came
/// after its commit; `Normal` answers at commit and never syncs. Writes still queued when the
/// store closes are committed, synced and answered, and are there after a reopen.
#[test]
fn full_answers_a_write_after_its_sync_and_closing_loses_nothing_queued() {
    use jobhost_store_sqlite::Synchronous;
    for sync in [Synchronous::Full, Synchronous::Normal] {
        let dir = tempfile::tempdir().unwrap();
        let options = SqliteOptions { synchronous: sync, ..SqliteOptions::new(dir.path()) };
        let backend = SqliteBackend::open(options.clone()).unwrap();
        // One write at a time: each needs a sync of its own before its answer.
        for k in 1..=5u64 {
            answer(&submit_sheets(&backend, k as usize..k as usize + 1)).unwrap();
            let stats = backend.write_stats();
            assert_eq!(stats.transactions, k, "{sync:?}: {stats:?}");
            let syncs = if sync == Synchronous::Full { k } else { 0 };
            assert_eq!(stats.syncs, Some(syncs), "{sync:?}: the answer to write {k} came before its sync: {stats:?}");
        }
        // Many at once: a sync covers every commit before it.
        let rx = submit_sheets(&backend, 100..400);
        for _ in 100..400 {
            answer(&rx).unwrap();
        }
        let stats = backend.write_stats();
        assert_eq!(stats.writes, 305, "{stats:?}");
        assert!(stats.syncs.unwrap() <= stats.transactions && stats.transactions <= stats.writes, "{stats:?}");
        // Closed with writes still queued: each is answered, and kept.
        let rx = submit_sheets(&backend, 1000..1200);
        drop(backend);
        for _ in 1000..1200 {
            answer(&rx).unwrap();
        }
        let conn = rusqlite::Connection::open(SqliteBackend::db_path(dir.path())).unwrap();
        let sheets: i64 =
            conn.query_row("SELECT COUNT(*) FROM sheets WHERE environment_id = 'env_sync'", [], |r| r.get(0)).unwrap();
        assert_eq!(sheets, 505, "{sync:?}");
    }
}

/// Schema 8 drops the events' unique id index and AUTOINCREMENT. A store of schema 7 keeps its
/// events, and a seq it gave out never comes back, not even one whose event retention deleted.
#[tokio::test]
async fn a_schema_7_store_keeps_its_events_and_their_high_water_mark() {
    let dir = tempfile::tempdir().unwrap();
    let (env_id, job_id) = store_with_one_job(dir.path()).await;
    let high_water = {
        // Back to schema 7's events table, with its newest events deleted since (as retention
        // could): AUTOINCREMENT remembers their seqs.
        let conn = rusqlite::Connection::open(SqliteBackend::db_path(dir.path())).unwrap();
        conn.execute_batch(BACK_TO_SCHEMA_8).unwrap();
        conn.execute_batch(
            "ALTER TABLE events RENAME TO events_8; DROP INDEX events_env; DROP INDEX events_job; \
             CREATE TABLE events (seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE, \
                 environment_id TEXT NOT NULL, topic TEXT NOT NULL, job_id TEXT, context TEXT NOT NULL, \
                 payload TEXT NOT NULL, created_at INTEGER NOT NULL); \
             CREATE INDEX events_env ON events (environment_id, seq); \
             CREATE INDEX events_job ON events (job_id) WHERE job_id IS NOT NULL; \
             INSERT INTO events SELECT * FROM events_8; DROP TABLE events_8; \
             INSERT INTO events (id, environment_id, topic, context, payload, created_at) \
                 VALUES ('evt_gone_1', 'x', 't', '{}', '{}', 1), ('evt_gone_2', 'x', 't', '{}', '{}', 1); \
             DELETE FROM events WHERE environment_id = 'x'; \
             PRAGMA user_version = 7;",
        )
        .unwrap();
        conn.query_row("SELECT seq FROM sqlite_sequence WHERE name = 'events'", [], |r| r.get::<_, i64>(0)).unwrap()
    };
    let engine = open_engine(dir.path(), test_config()).unwrap();
    let env = engine.env(&env_id);
    let events = env.events(0, 100).await.unwrap();
    assert_eq!(events.iter().filter(|e| e.job_id() == Some(job_id.as_str())).count(), 2, "{events:?}");
    let next = env.create_job(NewJob::new(JobType::File, "after")).await.unwrap();
    let seqs: Vec<i64> = env
        .events(0, 100)
        .await
        .unwrap()
        .iter()
        .filter(|e| e.job_id() == Some(next.id.as_str()))
        .map(|e| e.seq)
        .collect();
    assert!(!seqs.is_empty() && seqs.iter().all(|s| *s > high_water), "{seqs:?} after {high_water}");
    drop((env, engine));
    let conn = rusqlite::Connection::open(SqliteBackend::db_path(dir.path())).unwrap();
    let sql: String = conn.query_row("SELECT sql FROM sqlite_master WHERE name = 'events'", [], |r| r.get(0)).unwrap();
    assert!(!sql.contains("AUTOINCREMENT") && !sql.contains("UNIQUE"), "{sql}");
    let autoindexes: i64 = conn
        .query_row(
            "SELECT COUNT(*) FROM sqlite_master WHERE tbl_name = 'events' AND name LIKE 'sqlite_autoindex%'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(autoindexes, 0);
    let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0)).unwrap();
    assert!(version >= 8, "{version}");
}

/// Schema 9 moves records' messages out of their rows. A store of schema 8 keeps every
/// record's values and messages and its counts; a message written after the migration
/// replaces the migrated one, and clearing it makes the record valid.
#[tokio::test]
async fn a_schema_8_store_keeps_its_records_messages() {
    let dir = tempfile::tempdir().unwrap();
    let (env_id, sheet_id, before) = {
        let engine = open_engine(dir.path(), test_config()).unwrap();
        let env = engine.env(engine.create_environment("old").await.unwrap().id);
        let sheet = env.create_sheet("people").await.unwrap();
        let records = (0..6)
            .map(|i| NewRecord {
                values: [("n".to_owned(), json!(i))].into_iter().collect(),
                messages: match i % 3 {
                    0 => vec![],
                    1 => vec![Message::error("n", format!("{i} is odd"))],
                    _ => vec![Message { kind: MessageType::Warn, message: "look again".into(), field: None }],
                },
                ..Default::default()
            })
            .collect();
        env.insert_records(&sheet.id, records).await.unwrap();
        let before = env.records(&sheet.id, 10, 1).await.unwrap().records;
        (env.id().to_owned(), sheet.id, before)
    };
    {
        let conn = rusqlite::Connection::open(SqliteBackend::db_path(dir.path())).unwrap();
        conn.execute_batch(BACK_TO_SCHEMA_8).unwrap();
        let in_rows: i64 =
            conn.query_row("SELECT COUNT(*) FROM records WHERE messages IS NOT NULL", [], |r| r.get(0)).unwrap();
        assert_eq!(in_rows, 4, "schema 8 keeps messages in the record's row");
    }
    let engine = open_engine(dir.path(), test_config()).unwrap();
    let env = engine.env(&env_id);
    assert_eq!(env.records(&sheet_id, 10, 1).await.unwrap().records, before);
    assert_eq!(env.record_counts(&sheet_id).await.unwrap(), RecordCounts { total: 6, valid: 4, error: 2 });
    let fixed = before.iter().find(|r| !r.valid).unwrap();
    let update = |messages| RecordUpdate { id: fixed.id.clone(), values: Default::default(), messages: Some(messages) };
    env.update_records(&sheet_id, vec![update(vec![Message::error("n", "still odd")])]).await.unwrap();
    let page = env.records(&sheet_id, 10, 1).await.unwrap().records;
    let again = page.iter().find(|r| r.id == fixed.id).unwrap();
    assert_eq!(again.values["n"].messages, vec![Message::error("n", "still odd")], "{again:?}");
    env.update_records(&sheet_id, vec![update(vec![])]).await.unwrap();
    assert_eq!(env.record_counts(&sheet_id).await.unwrap(), RecordCounts { total: 6, valid: 5, error: 1 });
    drop((env, engine));
    let conn = rusqlite::Connection::open(SqliteBackend::db_path(dir.path())).unwrap();
    let sql: String = conn.query_row("SELECT sql FROM sqlite_master WHERE name = 'records'", [], |r| r.get(0)).unwrap();
    assert!(!sql.contains("messages") && !sql.contains("has_error"), "{sql}");
    let kept: i64 = conn.query_row("SELECT COUNT(*) FROM record_messages", [], |r| r.get(0)).unwrap();
    assert_eq!(kept, 3, "two warnings and one error are left");
}

/// An event's seq is its row key, one past the largest: retention turns the newest event into a
/// placeholder no tenant sees, so a seq a client has seen is never given to a later event.
#[tokio::test]
async fn retention_deletes_every_old_event_and_no_seq_comes_back_even_after_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let (env_id, newest) = {
        let engine = open_engine(dir.path(), test_config()).unwrap();
        let env = engine.env(engine.create_environment("seqs").await.unwrap().id);
        for _ in 0..3 {
            env.create_job(NewJob::new(JobType::File, "work")).await.unwrap();
        }
        let before = env.events(0, 100).await.unwrap();
        let newest = before.iter().map(|e| e.seq).max().unwrap();
        let pruned = jobhost_engine::retention::prune(&engine, i64::MAX).await.unwrap();
        assert_eq!(pruned.events as usize, before.len(), "every old event, the newest too: {pruned:?}");
        assert_eq!(env.events(0, 100).await.unwrap(), vec![], "the tenant sees none of them");
        let again = jobhost_engine::retention::prune(&engine, i64::MAX).await.unwrap();
        assert_eq!(again.events, 0, "what holds the high-water mark is not counted twice: {again:?}");
        (env.id().to_owned(), newest)
    };
    // The high-water mark is in the file, not in the process.
    let engine = open_engine(dir.path(), test_config()).unwrap();
    let env = engine.env(&env_id);
    env.create_job(NewJob::new(JobType::File, "after")).await.unwrap();
    let after = env.events(0, 100).await.unwrap();
    assert!(!after.is_empty() && after.iter().all(|e| e.seq > newest), "{newest} then {after:?}");
    let pruned = jobhost_engine::retention::prune(&engine, i64::MAX).await.unwrap();
    assert_eq!(pruned.events as usize, after.len(), "the placeholder goes uncounted: {pruned:?}");
    assert_eq!(env.events(0, 100).await.unwrap(), vec![]);
}

/// Reads run on the backend's own read threads, never more at once than `readers` however
/// many are submitted together (they used to take a blocking-pool thread and a connection
/// each); a read that panics fails only its own caller and its thread goes on; reads still
/// queued when the store closes are answered.
#[test]
fn reads_share_a_fixed_set_of_read_threads_and_closing_answers_queued_reads() {
    use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
    use std::sync::{Condvar, Mutex};
    const READERS: usize = 3;
    const READS: usize = 60;
    let dir = tempfile::tempdir().unwrap();
    let options = SqliteOptions { readers: READERS, ..SqliteOptions::new(dir.path()) };
    let backend = SqliteBackend::open(options.clone()).unwrap();
    answer(&submit_sheets(&backend, 0..1)).unwrap();

    // A panicking read: its caller sees the read fail (its answer is dropped), and its thread
    // goes on (the gate below needs every thread).
    let (failed, failure) = std::sync::mpsc::channel::<()>();
    backend.submit_read(Box::new(move |_| {
        let _keep = failed;
        panic!("a read that panics");
    }));
    assert!(
        failure.recv_timeout(std::time::Duration::from_secs(60))
            == Err(std::sync::mpsc::RecvTimeoutError::Disconnected),
        "the panicking read's caller is told"
    );

    // Each read waits at a gate that opens once READERS reads are inside at the same time: the
    // pool really runs that many side by side, and (counted) never more.
    let gate = Arc::new((Mutex::new(false), Condvar::new()));
    let inside = Arc::new(AtomicUsize::new(0));
    let most = Arc::new(AtomicUsize::new(0));
    let (answers, rx) = std::sync::mpsc::channel();
    for _ in 0..READS {
        let (gate, inside, most, answers) = (gate.clone(), inside.clone(), most.clone(), answers.clone());
        backend.submit_read(Box::new(move |r| {
            let now = inside.fetch_add(1, SeqCst) + 1;
            most.fetch_max(now, SeqCst);
            let (open, opened) = &*gate;
            let mut is_open = open.lock().unwrap();
            if now >= READERS {
                *is_open = true;
                opened.notify_all();
            }
            let deadline = std::time::Duration::from_secs(60);
            let (is_open, waited) = opened.wait_timeout_while(is_open, deadline, |o| !*o).unwrap();
            assert!(!waited.timed_out() && *is_open, "{READERS} reads were never inside at once");
            drop(is_open);
            let sheet = r.sheet("env_sync", "sh_0").map(|s| s.is_some());
            inside.fetch_sub(1, SeqCst);
            let _ = answers.send((std::thread::current().name().map(str::to_owned), sheet));
        }));
    }
    let mut threads = std::collections::BTreeSet::new();
    for _ in 0..READS {
        let (name, found) = rx.recv_timeout(std::time::Duration::from_secs(60)).expect("every read is answered");
        assert!(found.unwrap(), "a read sees the committed sheet");
        threads.insert(name.expect("read threads are named"));
    }
    assert_eq!(most.load(SeqCst), READERS, "reads inside at once");
    assert!(threads.len() <= READERS && threads.iter().all(|n| n.starts_with("jobhost-store-read-")), "{threads:?}");

    let (answers, rx) = std::sync::mpsc::channel();
    for _ in 0..READS {
        let answers = answers.clone();
        backend.submit_read(Box::new(move |r| {
            let _ = answers.send(r.sheet("env_sync", "sh_0").map(|s| s.is_some()));
        }));
    }
    // Closing drops nothing queued: every read is still answered.
    drop(backend);
    drop(answers);
    for _ in 0..READS {
        let found =
            rx.recv_timeout(std::time::Duration::from_secs(60)).expect("a read queued at the close is answered");
        assert!(found.unwrap(), "a read queued at the close sees the sheet");
    }
}

/// One writer runs every write in turn: charges made at once, every third refused after
/// charging, each see a total of their own (the conformance case checks what racing writers
/// of any backend see).
#[tokio::test]
async fn charges_made_at_once_each_see_one_more() {
    let dir = tempfile::tempdir().unwrap();
    let engine = open_engine(dir.path(), test_config()).unwrap();
    let store = engine.store().clone();
    let mut writes = tokio::task::JoinSet::new();
    for i in 0..24usize {
        let store = store.clone();
        writes.spawn(async move {
            let refuse = i % 3 == 2;
            let r = store
                .write(move |tx| {
                    let total = tx.charge_chain("chain", 1, 1)?;
                    if refuse {
                        return Err(jobhost_engine::Error::invalid(format!("refused at {total}")));
                    }
                    Ok(total)
                })
                .await;
            (refuse, r)
        });
    }
    let mut totals = Vec::new();
    for (refuse, r) in writes.join_all().await {
        match r {
            Ok(total) if !refuse => totals.push(total),
            Err(_) if refuse => {}
            other => panic!("{other:?}"),
        }
    }
    totals.sort_unstable();
    assert_eq!(totals, (1..=16).collect::<Vec<u64>>(), "16 kept charges, each seeing one more");
}
