//! The embedded default backend: SQLite in WAL mode.
//!
//! * **One writer thread** owns the only write connection. Write closures queue on a channel;
//!   the thread runs them as they arrive within one open `BEGIN IMMEDIATE` transaction and
//!   commits once nothing more is queued (or, while the sync thread below is busy, once it is
//!   idle; at most `max_batch` closures either way) — group commit. When a closure returns
//!   an error the transaction is rolled back and the batch runs again with a `SAVEPOINT` per
//!   closure, so a refused call changes nothing while the rest of the batch commits. Replies
//!   are sent only after `COMMIT`, so an acknowledged write survives a crash of the process.
//! * **A sync thread** makes commits durable across power loss ([`Synchronous::Full`]): the
//!   writer commits without waiting for the disk (SQLite's WAL `NORMAL`) and hands the batch's
//!   replies to this thread, which syncs the WAL file once for every batch committed since its
//!   last sync and only then replies. The writer runs the next batch while the disk syncs. A
//!   reader may see a commit before the sync that answers its writer; after a power loss such a
//!   commit may be gone, but never one that was answered.
//! * **Readers** are a fixed number of threads ([`SqliteOptions::readers`]), each with a
//!   read-only connection of its own, taking reads from one queue; WAL lets them read committed
//!   data while the writer works.
//! * A **lock file** in the data directory keeps a second process from opening the same store:
//!   the backend is [`exclusive`](Backend::exclusive), so every other host registered in it is
//!   gone and the engine reclaims their leases at start.
//! * Rows are locked by the single writer: `…_for_update` reads are plain reads, and a busy
//!   database (another connection's lock) is reported as a retryable [`StoreError`].
//! * Migrations are numbered SQL scripts applied at open (`PRAGMA user_version`).

use std::collections::HashMap;
use std::fs::File;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use rusqlite::{Connection, OpenFlags, OptionalExtension, Row, Statement, params};
use serde_json::Value;
use tokio::sync::Notify;

use jobhost_core::error::{Error, Result, StoreError};
use jobhost_core::model::{
    ApiToken, DeadLetter, Environment, Event, Execution, Job, JobStatus, Millis, OpenDelivery, RecordCounts, Sheet,
    UnknownValue, json_string, json_text,
};
use jobhost_store::{
    Backend, DeliveryEnd, DeliveryStats, DueDelivery, EncodedRecord, Fence, History, HistoryRow, HostRecord, JobQuery,
    Notifications, Overdue, PartStatusCounts, QueryValue, RawRecord, ReadOp, ReadTx, Reply, RowSink, StoreSize,
    StoredRecord, StoredSecret, Subscription, Tx, WriteCounters, WriteOp, WriteStats,
};

/// A SQLite failure as the store's error: busy and locked databases may clear on a retry.
fn db_error(e: rusqlite::Error) -> Error {
    if e.sqlite_error_code() == Some(rusqlite::ErrorCode::DiskFull) {
        let dir = WRITER_DIR.with(|d| d.borrow().as_ref().map(|d| format!(" {}", d.display()))).unwrap_or_default();
        return Error::Store(StoreError::caused_by(
            format!(
                "the disk holding the data directory{dir} is full, so this call stored nothing \
                 (reads still work); free space there and retry"
            ),
            e,
        ));
    }
    let retryable =
        matches!(e.sqlite_error_code(), Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked));
    Error::Store(StoreError::caused_by("SQLite", e).retryable(retryable))
}

thread_local! {
    /// The data directory of the store whose writer runs on this thread (each store has a
    /// writer thread of its own): what a full-disk error names.
    static WRITER_DIR: std::cell::RefCell<Option<PathBuf>> = const { std::cell::RefCell::new(None) };
}

/// Column `i` of `row` as text borrowed from SQLite's buffer, not copied.
fn borrowed_text<'r>(row: &'r rusqlite::Row<'_>, i: usize) -> Result<&'r str> {
    row.get_ref(i)
        .and_then(|v| v.as_str().map_err(|e| rusqlite::Error::FromSqlConversionFailure(i, v.data_type(), Box::new(e))))
        .db()
}

/// `.db()?` turns a SQLite result into the store's.
trait Db<T> {
    fn db(self) -> Result<T>;
}

impl<T> Db<T> for rusqlite::Result<T> {
    fn db(self) -> Result<T> {
        self.map_err(db_error)
    }
}

/// How hard SQLite syncs on commit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Synchronous {
    /// Every write is on disk before it is acknowledged: nothing acknowledged is lost, even on
    /// power loss. The WAL is synced after commits by a thread of its own, one sync for every
    /// commit made since the last one, so the writer never waits for the disk.
    #[default]
    Full,
    /// WAL's `NORMAL`: survives a process crash; the last commits may be lost on power loss.
    Normal,
}

/// Options of the SQLite backend.
#[derive(Debug, Clone)]
pub struct SqliteOptions {
    /// The data directory; created if missing.
    pub dir: PathBuf,
    /// Commit durability.
    pub synchronous: Synchronous,
    /// Most write closures committed together. Bounds how long one commit holds the writer.
    pub max_batch: usize,
    /// Read connections, each on a thread of its own; reads beyond them wait their turn.
    pub readers: usize,
}

impl SqliteOptions {
    /// Defaults for a data directory.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into(), synchronous: Synchronous::Full, max_batch: 512, readers: default_readers() }
    }
}

/// Two read connections per core, 4 to 16: reads are mostly CPU on cached pages, and a few
/// spare ones keep a read that waits for the disk from holding up the rest.
fn default_readers() -> usize {
    std::thread::available_parallelism().map_or(4, |n| n.get() * 2).clamp(4, 16)
}

/// `open_deliveries`' query (public for the test that reads its plan). Deliveries are read
/// through their partial indexes (open ones, dead ones; `INDEXED BY`, since without it SQLite
/// scans the table) in the outer loop (`CROSS JOIN`), each joined to its event by key. Any
/// other plan scans every delivery, finished ones included (none is indexed by event).
#[doc(hidden)]
pub const OPEN_DELIVERIES_SQL: &str = "SELECT d.id, d.subscription_id, e.id, e.topic, d.status, d.attempts, d.due_at, d.lease_owner, d.last_error \
     FROM deliveries d INDEXED BY deliveries_due CROSS JOIN events e ON e.seq = d.event_seq \
     WHERE d.status IN ('pending', 'leased') AND e.job_id = ?2 AND e.environment_id = ?1 \
     UNION ALL \
     SELECT d.id, d.subscription_id, e.id, e.topic, d.status, d.attempts, d.due_at, d.lease_owner, d.last_error \
     FROM deliveries d INDEXED BY deliveries_dead CROSS JOIN events e ON e.seq = d.event_seq \
     WHERE d.status = 'dead' AND e.job_id = ?2 AND e.environment_id = ?1 \
     ORDER BY 1";

/// The SQLite backend. Dropping it finishes queued writes and reads and joins its threads.
pub struct SqliteBackend {
    writes: Mutex<Option<Sender<ToWriter>>>,
    readers: ReadPool,
    signal: Arc<Notify>,
    commits: tokio::sync::watch::Receiver<u64>,
    writer: Mutex<Option<JoinHandle<()>>>,
    stats: Arc<WriteCounters>,
    // Held for the backend's lifetime: the OS releases it when the process dies, even by SIGKILL.
    _lock: File,
}

impl std::fmt::Debug for SqliteBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteBackend").field("db", &self.readers.path).finish_non_exhaustive()
    }
}

const DB_FILE: &str = "jobhost.db";
const LOCK_FILE: &str = "jobhost.lock";

impl SqliteBackend {
    /// Opens (creating if needed) the store in `options.dir`, migrates it, and starts the writer.
    pub fn open(options: SqliteOptions) -> Result<Self> {
        std::fs::create_dir_all(&options.dir)
            .map_err(|e| StoreError::caused_by(format!("cannot create data directory {}", options.dir.display()), e))?;
        let lock_path = options.dir.join(LOCK_FILE);
        let lock = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| StoreError::caused_by(format!("cannot open {}", lock_path.display()), e))?;
        lock.try_lock().map_err(|_| {
            Error::store(format!("data directory {} is in use by another jobhost process", options.dir.display()))
        })?;

        let path = options.dir.join(DB_FILE);
        let conn = open_writer(&path)?;
        migrate(&conn)?;

        // Started before the writer: if a thread cannot start, the ones started so far see their
        // queue close and end, and no writer is left waiting for writes that never come.
        let readers = ReadPool::start(path.clone(), options.readers.max(1))?;
        let (tx, rx) = std::sync::mpsc::channel();
        let signal = Arc::new(Notify::new());
        let writer_signal = signal.clone();
        let (commits_tx, commits) = tokio::sync::watch::channel(0u64);
        let max_batch = options.max_batch.max(1);
        let stats = Arc::new(WriteCounters::default());
        let counted = stats.clone();
        let answer = match options.synchronous {
            Synchronous::Normal => Answer::AtCommit(commits_tx),
            Synchronous::Full => {
                let (to_sync, synced) = std::sync::mpsc::channel();
                let mut wal = path.clone().into_os_string();
                wal.push("-wal");
                let wal = PathBuf::from(wal);
                let idle = Arc::new(std::sync::atomic::AtomicBool::new(true));
                let thread = std::thread::Builder::new()
                    .name("jobhost-store-sync".into())
                    .spawn({
                        let (stats, idle, writer) = (stats.clone(), idle.clone(), tx.clone());
                        move || sync_loop(&wal, synced, writer, &idle, commits_tx, &stats)
                    })
                    .map_err(|e| StoreError::caused_by("cannot start the store sync thread", e))?;
                Answer::AfterSync(SyncThread { to_sync, thread, idle })
            }
        };
        let writer = std::thread::Builder::new()
            .name("jobhost-store-writer".into())
            .spawn({
                let dir = options.dir.clone();
                move || {
                    WRITER_DIR.with(|d| *d.borrow_mut() = Some(dir));
                    writer_loop(conn, rx, writer_signal, answer, max_batch, counted)
                }
            })
            .map_err(|e| StoreError::caused_by("cannot start the store writer thread", e))?;

        Ok(Self {
            writes: Mutex::new(Some(tx)),
            readers,
            signal,
            commits,
            writer: Mutex::new(Some(writer)),
            stats,
            _lock: lock,
        })
    }

    /// Path of the database file inside a data directory.
    pub fn db_path(dir: &Path) -> PathBuf {
        dir.join(DB_FILE)
    }
}

impl Drop for SqliteBackend {
    fn drop(&mut self) {
        // The writer finishes what is queued and exits (the sync thread holds a sender too, so
        // closing the channel alone would not end it).
        if let Ok(mut w) = self.writes.lock()
            && let Some(tx) = w.take()
        {
            let _ = tx.send(ToWriter::Stop);
        }
        if let Some(handle) = self.writer.lock().ok().and_then(|mut h| h.take()) {
            let _ = handle.join();
        }
        self.readers.stop();
    }
}

impl Backend for SqliteBackend {
    fn submit_write(&self, op: WriteOp) {
        // If the writer is gone the op is dropped, and its caller sees "the store's writer stopped".
        if let Ok(guard) = self.writes.lock()
            && let Some(tx) = guard.as_ref()
        {
            let _ = tx.send(ToWriter::Write(op));
        }
    }

    fn submit_read(&self, op: ReadOp) {
        // If the readers are gone the op is dropped, and its caller sees "the store's reader stopped".
        if let Ok(queue) = self.readers.queue.lock()
            && let Some(tx) = queue.as_ref()
        {
            let _ = tx.send(op);
        }
    }

    fn notifications(&self) -> Notifications {
        Notifications { deliveries: self.signal.clone(), commits: self.commits.clone() }
    }

    fn write_stats(&self) -> WriteStats {
        self.stats.stats(true)
    }

    fn exclusive(&self) -> bool {
        true
    }
}

/// The read connections: a fixed number of threads, each owning one connection, taking reads
/// from one queue. Reads used to take a blocking-pool thread and a connection each: a thousand
/// parts reading their first page at once then ran up to ~280 threads and connections (each
/// with its own page cache and file handles), and the host's peak memory followed them.
struct ReadPool {
    path: PathBuf,
    queue: Mutex<Option<Sender<ReadOp>>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl ReadPool {
    fn start(path: PathBuf, n: usize) -> Result<Self> {
        let (tx, rx) = std::sync::mpsc::channel::<ReadOp>();
        let rx = Arc::new(Mutex::new(rx));
        let threads = (0..n)
            .map(|i| {
                let (path, rx) = (path.clone(), rx.clone());
                std::thread::Builder::new()
                    .name(format!("jobhost-store-read-{i}"))
                    .spawn(move || read_loop(&path, &rx))
                    .map_err(|e| StoreError::caused_by("cannot start the store's read threads", e))
            })
            .collect::<std::result::Result<Vec<_>, _>>()?;
        Ok(Self { path, queue: Mutex::new(Some(tx)), threads: Mutex::new(threads) })
    }

    /// Closes the queue and waits for the reads already in it. A read that drops the last
    /// handle to the store runs this on a read thread, which cannot wait for itself: its
    /// siblings then finish on their own.
    fn stop(&self) {
        drop(self.queue.lock().ok().and_then(|mut q| q.take()));
        let threads = self.threads.lock().map(|mut t| std::mem::take(&mut *t)).unwrap_or_default();
        let me = std::thread::current().id();
        if threads.iter().all(|t| t.thread().id() != me) {
            for t in threads {
                let _ = t.join();
            }
        }
    }
}

/// One read thread: opens its connection at its first read and keeps it. A read that panics
/// may have left a statement half-stepped, so the connection goes with it (the next read
/// opens another); the panic itself reaches the caller as a failed read.
fn read_loop(path: &Path, queue: &Mutex<Receiver<ReadOp>>) {
    let mut conn: Option<Connection> = None;
    loop {
        // The lock is held while waiting, so idle threads queue on the mutex, one on `recv`.
        let Ok(op) = queue.lock().map_err(drop).and_then(|rx| rx.recv().map_err(drop)) else { return };
        let c = match conn.take().map_or_else(|| open_reader(path), Ok) {
            Ok(c) => c,
            // Dropping `op` tells the caller the read failed.
            Err(e) => {
                tracing::error!(error = %e, "cannot open a read connection");
                continue;
            }
        };
        let ran = std::panic::catch_unwind(AssertUnwindSafe(|| op(&mut Conn::reader(&c))));
        if ran.is_ok() {
            conn = Some(c);
        }
    }
}

fn open_reader(path: &Path) -> Result<Connection> {
    let conn =
        Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX).db()?;
    conn.busy_timeout(std::time::Duration::from_secs(10)).db()?;
    conn.set_prepared_statement_cache_capacity(64);
    plan_once(&conn)?;
    Ok(conn)
}

/// A read connection as the store's readers open it, for tests of what SQLite does with it.
#[doc(hidden)]
pub fn reader_connection(dir: &Path) -> Result<Connection> {
    open_reader(&SqliteBackend::db_path(dir))
}

/// Plans each statement once, at prepare, not again for the values bound to it. Without this
/// (SQLite's query planner stability guarantee), a statement whose plan could depend on a bound
/// value — `ORDER BY … LIMIT ?`, as a page of records or a lease is read — is parsed and planned
/// anew at every execution after a new bind: every page a guest read, every lease. The store's
/// statements are written for one plan whatever the values (tests check the plans).
fn plan_once(conn: &Connection) -> Result<()> {
    conn.set_db_config(rusqlite::config::DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG, true).db()?;
    Ok(())
}

/// The write connection. SQLite never waits for the disk at commit (`NORMAL`: it still syncs
/// around checkpoints); [`Synchronous::Full`] is the sync thread's job.
///
/// Its page cache is 8 MiB. A commit that grew a file smaller than 1 GiB leaves the page at
/// 1 GiB (SQLite's lock page) as the highest the cache has seen, so the commit's drop of pages
/// past the end walks the cache's whole hash table: with 64 MiB cached, ~170 µs a commit for
/// nothing (BENCHMARKS.md, "the writer's page cache").
fn open_writer(path: &Path) -> Result<Connection> {
    let conn =
        Connection::open(path).map_err(|e| StoreError::caused_by(format!("cannot open {}", path.display()), e))?;
    conn.execute_batch(
        "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL; PRAGMA temp_store = MEMORY; PRAGMA cache_size = -8192;",
    )
    .db()?;
    conn.busy_timeout(std::time::Duration::from_secs(10)).db()?;
    conn.set_prepared_statement_cache_capacity(128);
    plan_once(&conn)?;
    Ok(conn)
}

/// Numbered schema migrations; entry *i* takes the schema from version *i* to *i + 1*.
const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE environments (id TEXT PRIMARY KEY, name TEXT NOT NULL, created_at INTEGER NOT NULL);
CREATE TABLE sheets (
    key INTEGER PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    environment_id TEXT NOT NULL,
    name TEXT NOT NULL,
    workbook_id TEXT,
    created_at INTEGER NOT NULL
);
-- `ord` is dense per sheet (0, 1, 2, …) so a page is a range scan, not an OFFSET walk.
CREATE TABLE records (
    id INTEGER PRIMARY KEY,
    sheet_key INTEGER NOT NULL,
    ord INTEGER NOT NULL,
    vals TEXT NOT NULL,
    messages TEXT,
    metadata TEXT,
    has_error INTEGER NOT NULL,
    updated_at INTEGER NOT NULL
);
CREATE UNIQUE INDEX records_order ON records (sheet_key, ord);
CREATE INDEX records_errors ON records (sheet_key) WHERE has_error = 1;
CREATE TABLE jobs (
    id TEXT PRIMARY KEY,
    environment_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    operation TEXT NOT NULL,
    source TEXT,
    status TEXT NOT NULL,
    trigger_ TEXT NOT NULL,
    mode TEXT NOT NULL,
    input TEXT,
    info TEXT,
    progress INTEGER NOT NULL,
    estimated_completion_at INTEGER,
    outcome TEXT,
    parent_id TEXT,
    part_index INTEGER,
    part_data TEXT,
    part_execution TEXT,
    predecessor_ids TEXT,
    run_at INTEGER,
    stale_timeout_ms INTEGER,
    attempt INTEGER NOT NULL,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL,
    started_at INTEGER,
    finished_at INTEGER,
    outcome_acknowledged_at INTEGER,
    ready_at INTEGER,
    last_activity_at INTEGER,
    split_at INTEGER,
    parts_completed_at INTEGER
);
CREATE INDEX jobs_env ON jobs (environment_id);
CREATE INDEX jobs_parts ON jobs (parent_id, status) WHERE parent_id IS NOT NULL;
CREATE INDEX jobs_live ON jobs (status) WHERE status IN ('scheduled', 'ready', 'executing');
CREATE TABLE job_predecessors (
    job_id TEXT NOT NULL,
    predecessor_id TEXT NOT NULL,
    PRIMARY KEY (job_id, predecessor_id)
) WITHOUT ROWID;
CREATE INDEX job_predecessors_rev ON job_predecessors (predecessor_id);
CREATE TABLE events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    environment_id TEXT NOT NULL,
    topic TEXT NOT NULL,
    job_id TEXT,
    context TEXT NOT NULL,
    payload TEXT NOT NULL,
    created_at INTEGER NOT NULL
);
CREATE INDEX events_env ON events (environment_id, seq);
CREATE INDEX events_job ON events (job_id) WHERE job_id IS NOT NULL;
CREATE TABLE subscriptions (
    id TEXT PRIMARY KEY,
    environment_id TEXT NOT NULL,
    topic TEXT NOT NULL,
    filter TEXT,
    active INTEGER NOT NULL,
    updated_at INTEGER NOT NULL
);
-- status: pending | leased | done | dead. `due_at` is when a pending delivery may be leased or
-- when a lease expires; NULL once finished.
CREATE TABLE deliveries (
    id INTEGER PRIMARY KEY,
    event_seq INTEGER NOT NULL,
    subscription_id TEXT NOT NULL,
    status TEXT NOT NULL,
    attempts INTEGER NOT NULL,
    due_at INTEGER,
    lease_owner TEXT,
    last_error TEXT,
    finished_at INTEGER
);
CREATE INDEX deliveries_due ON deliveries (due_at) WHERE status IN ('pending', 'leased');
CREATE INDEX deliveries_dead ON deliveries (subscription_id) WHERE status = 'dead';
"#,
    r#"
-- One row per plugin delivery: who ran, on what, how it ended, what it printed.
CREATE TABLE executions (
    id INTEGER PRIMARY KEY,
    environment_id TEXT NOT NULL,
    plugin TEXT NOT NULL,
    plugin_version TEXT NOT NULL,
    route INTEGER NOT NULL,
    event_id TEXT NOT NULL,
    topic TEXT NOT NULL,
    job_id TEXT,
    attempt INTEGER NOT NULL,
    started_at INTEGER NOT NULL,
    duration_us INTEGER NOT NULL,
    cpu_us INTEGER NOT NULL,
    outcome TEXT NOT NULL,
    error TEXT,
    peak_memory INTEGER NOT NULL,
    logs TEXT NOT NULL
);
CREATE INDEX executions_env ON executions (environment_id, id);
CREATE INDEX executions_job ON executions (job_id) WHERE job_id IS NOT NULL;
"#,
    r#"
-- Loop guard: events written per chain of listener-caused events.
CREATE TABLE chains (id TEXT PRIMARY KEY, events INTEGER NOT NULL, updated_at INTEGER NOT NULL) WITHOUT ROWID;
-- Secrets per environment, read by plugins granted them.
CREATE TABLE secrets (
    environment_id TEXT NOT NULL,
    name TEXT NOT NULL,
    value TEXT NOT NULL,
    updated_at INTEGER NOT NULL,
    PRIMARY KEY (environment_id, name)
) WITHOUT ROWID;
"#,
    r#"
-- API tokens: the SHA-256 of each token (never the token), scoped to one environment.
CREATE TABLE tokens (
    hash TEXT PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    environment_id TEXT NOT NULL,
    name TEXT NOT NULL,
    created_at INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX tokens_env ON tokens (environment_id);
"#,
    r#"
-- Hosts by process: a fresh id per start, alive while its heartbeat is recent. The host id
-- stored here before (one per database) named the database, not a process.
CREATE TABLE hosts (
    id TEXT PRIMARY KEY,
    label TEXT NOT NULL,
    started_at INTEGER NOT NULL,
    heartbeat_at INTEGER NOT NULL
);
DELETE FROM meta WHERE key = 'host_id';
"#,
    r#"
-- A delivery's outbound HTTP requests (JSON), beside its logs.
ALTER TABLE executions ADD COLUMN http TEXT;
"#,
    r#"
-- SQLite codes an IN list of three or more constants as a temporary b-tree built each time the
-- expression runs, and a partial index's predicate runs on every insert and update of the
-- table: two temporary b-trees per job update. The same predicate spelled with OR compares.
DROP INDEX jobs_live;
CREATE INDEX jobs_live ON jobs (status) WHERE status = 'scheduled' OR status = 'ready' OR status = 'executing';
"#,
    r#"
-- Events lose what every insert paid for and nothing read: the unique index on `id` (this store
-- never looks an event up by id; ids are a millisecond time and 50 random bits) and
-- AUTOINCREMENT, which updated `sqlite_sequence` on every insert. A seq still never comes back:
-- a new row's key is one past the largest, and retention turns the newest event into a
-- placeholder in no environment (no tenant sees it) rather than delete it. If retention had
-- deleted the newest events, such a placeholder keeps the high-water mark AUTOINCREMENT kept,
-- until a newer event lets retention delete it.
CREATE TABLE events_v8 (
    seq INTEGER PRIMARY KEY,
    id TEXT NOT NULL,
    environment_id TEXT NOT NULL,
    topic TEXT NOT NULL,
    job_id TEXT,
    context TEXT NOT NULL,
    payload TEXT NOT NULL,
    created_at INTEGER NOT NULL
);
INSERT INTO events_v8 (seq, id, environment_id, topic, job_id, context, payload, created_at)
    SELECT seq, id, environment_id, topic, job_id, context, payload, created_at FROM events;
INSERT INTO events_v8 (seq, id, environment_id, topic, job_id, context, payload, created_at)
    SELECT s.seq, 'evt_high_water', '', 'jobhost:high-water', NULL, '{}', '{}', 0 FROM sqlite_sequence s
    WHERE s.name = 'events' AND s.seq > (SELECT COALESCE(MAX(seq), 0) FROM events);
DROP TABLE events;
ALTER TABLE events_v8 RENAME TO events;
CREATE INDEX events_env ON events (environment_id, seq);
CREATE INDEX events_job ON events (job_id) WHERE job_id IS NOT NULL;
"#,
    r#"
-- Messages leave the record's row for a table of their own. A validator writes messages on a
-- share of a sheet's records, spread over all of it: kept in the row, each write rewrote a page
-- of values that had not changed (and grew the row, splitting pages), so marking a tenth of a
-- sheet rewrote nearly every page of it. Here the messages a part writes sit together in a few
-- pages, and the values' pages are written once, at import. `updated_at` stays on the record
-- for its values; the messages carry their own.
CREATE TABLE record_messages (
    record_id INTEGER PRIMARY KEY,
    sheet_key INTEGER NOT NULL,
    messages TEXT NOT NULL,
    has_error INTEGER NOT NULL,
    updated_at INTEGER NOT NULL
);
INSERT INTO record_messages (record_id, sheet_key, messages, has_error, updated_at)
    SELECT id, sheet_key, messages, has_error, updated_at FROM records WHERE messages IS NOT NULL;
CREATE INDEX record_messages_errors ON record_messages (sheet_key) WHERE has_error = 1;
DROP INDEX records_errors;
ALTER TABLE records DROP COLUMN messages;
ALTER TABLE records DROP COLUMN has_error;
"#,
];

fn migrate(conn: &Connection) -> Result<()> {
    let version: usize = conn.query_row("PRAGMA user_version", [], |r| r.get::<_, i64>(0)).db()? as usize;
    if version > MIGRATIONS.len() {
        return Err(Error::store(format!(
            "the store has schema version {version}, newer than this jobhost knows ({}); upgrade jobhost",
            MIGRATIONS.len()
        )));
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(version) {
        let tx = conn.unchecked_transaction().db()?;
        tx.execute_batch(sql).map_err(|e| StoreError::caused_by(format!("migration {} failed", i + 1), e))?;
        tx.execute_batch(&format!("PRAGMA user_version = {}", i + 1)).db()?;
        tx.commit().db()?;
    }
    Ok(())
}

/// Who answers a committed batch's writers, and when.
enum Answer {
    /// The writer, right after `COMMIT` ([`Synchronous::Normal`]).
    AtCommit(tokio::sync::watch::Sender<u64>),
    /// The sync thread, once the WAL is on disk ([`Synchronous::Full`]).
    AfterSync(SyncThread),
}

/// The sync thread and the writer's view of it.
struct SyncThread {
    to_sync: Sender<Vec<Reply>>,
    thread: JoinHandle<()>,
    /// Set by the sync thread when it has nothing left to sync.
    idle: Arc<std::sync::atomic::AtomicBool>,
}

/// What the writer thread is sent.
enum ToWriter {
    Write(WriteOp),
    /// The sync thread finished: a transaction held open for it may commit.
    Synced,
    /// The backend is closing: finish what is queued and stop.
    Stop,
}

/// The writer thread: runs writes as they arrive in one open transaction and commits it when
/// nothing more is queued — or, with a sync thread, when that thread is idle. A commit while
/// the disk is still syncing the previous one would only wait for that sync anyway; holding the
/// transaction open instead lets the writes that arrive meanwhile run (the CPU's work overlaps
/// the disk's) and join one commit, so the commit rate follows the disk while the batches grow
/// with the load. `max_batch` bounds a transaction either way.
fn writer_loop(
    conn: Connection,
    rx: Receiver<ToWriter>,
    signal: Arc<Notify>,
    answer: Answer,
    max_batch: usize,
    stats: Arc<WriteCounters>,
) {
    let mut batch: Vec<WriteOp> = Vec::with_capacity(max_batch);
    let mut writer = Writer {
        conn: &conn,
        held: Held::new(&conn),
        memory: Memory::default(),
        careful: 0,
        stats,
        changes_at_begin: 0,
        open: None,
    };
    let sync_busy = || match &answer {
        Answer::AfterSync(s) => !s.idle.load(std::sync::atomic::Ordering::Acquire),
        Answer::AtCommit(_) => false,
    };
    let mut stopping = false;
    loop {
        // Block for the next message while there is nothing to commit, or while the commit
        // waits for the sync thread; otherwise take only what is already queued.
        let wait = batch.is_empty() || (sync_busy() && batch.len() < max_batch);
        let message = if stopping && batch.is_empty() {
            match rx.try_recv() {
                Ok(m) => Some(m),
                Err(_) => break,
            }
        } else if wait && !stopping {
            match rx.recv() {
                Ok(m) => Some(m),
                Err(_) => break,
            }
        } else {
            rx.try_recv().ok()
        };
        match message {
            Some(ToWriter::Write(op)) => {
                if let Err(e) = writer.add(&mut batch, op) {
                    // The transaction was rolled back: nothing of the batch was kept.
                    for op in batch.drain(..) {
                        (op.reply)(Err(e.clone()));
                    }
                }
                if batch.len() < max_batch {
                    continue;
                }
            }
            Some(ToWriter::Synced) => {}
            Some(ToWriter::Stop) => stopping = true,
            None => {}
        }
        if batch.is_empty() || (sync_busy() && batch.len() < max_batch && !stopping) {
            continue;
        }
        let (committed, new_deliveries) = writer.commit(batch.len());
        let notify = committed.is_ok() && new_deliveries > 0;
        let replies = batch.drain(..).map(|op| op.reply);
        match (&answer, &committed) {
            (Answer::AfterSync(s), Ok(())) => {
                s.idle.store(false, std::sync::atomic::Ordering::Release);
                // The sync thread outlives this loop (joined below), so the send cannot fail.
                let _ = s.to_sync.send(replies.collect());
            }
            (answer, _) => {
                for reply in replies {
                    reply(committed.clone());
                }
                if let (Answer::AtCommit(commits), Ok(())) = (answer, &committed) {
                    commits.send_modify(|n| *n += 1);
                }
            }
        }
        // At once, not after the sync: the delivery loop's answer to this is a lease, a write
        // of a later commit, and a sync makes every earlier commit durable with its own, so
        // nothing runs on a delivery the disk does not have.
        if notify {
            signal.notify_waiters();
            signal.notify_one();
        }
    }
    if let Answer::AfterSync(s) = answer {
        drop(s.to_sync);
        let _ = s.thread.join();
    }
}

/// Syncs the WAL for every batch committed since the last sync, then answers their writers.
///
/// The WAL is written in order, so one `fdatasync` makes every commit before it durable
/// (what SQLite's `FULL` does at each commit, here once for many). A failed sync stops the
/// process, as PostgreSQL does: the kernel may have dropped the pages it could not write, so
/// no later sync can vouch for them, and the commits must not be acknowledged. Recovery at
/// the next start reads what is on disk.
fn sync_loop(
    wal: &Path,
    batches: Receiver<Vec<Reply>>,
    writer: Sender<ToWriter>,
    idle: &std::sync::atomic::AtomicBool,
    commits: tokio::sync::watch::Sender<u64>,
    stats: &WriteCounters,
) {
    let mut file: Option<File> = None;
    while let Ok(first) = batches.recv() {
        let mut waiting = vec![first];
        waiting.extend(batches.try_iter());
        // Opened at the first commit, which made sure the WAL exists; the writer's connection
        // keeps it (the same file) until the store closes.
        let synced = match &file {
            Some(f) => f.sync_data(),
            None => File::open(wal).and_then(|f| f.sync_data().map(|()| file = Some(f))),
        };
        if let Err(e) = synced {
            tracing::error!(error = %e, wal = %wal.display(), "cannot sync the store's log; stopping");
            eprintln!("jobhost: cannot sync {}: {e}; stopping so that nothing unsynced is acknowledged", wal.display());
            std::process::abort();
        }
        stats.synced();
        // Idle before answering: the writer may commit what it holds as soon as it hears.
        idle.store(true, std::sync::atomic::Ordering::Release);
        let _ = writer.send(ToWriter::Synced);
        let n = waiting.len() as u64;
        for reply in waiting.into_iter().flatten() {
            reply(Ok(()));
        }
        commits.send_modify(|c| *c += n);
    }
}

/// After a batch in which a write failed, this many batches run with a savepoint per write from
/// the start, so a stream of failing writes does not make every batch run twice.
const CAREFUL_BATCHES: u32 = 16;

/// What the writer remembers of the store instead of reading it again. Only this process
/// writes the store, so a remembered value stays true until a write changes it (which updates
/// or forgets it) or a transaction, or a write's savepoint, is rolled back (which forgets all).
#[derive(Default)]
struct Memory {
    /// The subscriptions' version as the writer last read it: every event written reads it.
    version: Option<u64>,
    /// Loop-guard totals of recent chains (see [`Tx::charge_chain`]): each listener call that
    /// writes events adds to its chain and reads the total; remembered, that is one statement
    /// instead of two, and a chain's first charge (nearly every chain is new) is one insert.
    chains: HashMap<String, u64>,
    /// Recently written or read jobs, as stored: a job is read again by the next call on it (a
    /// listener's ack, then its complete), and a remembered job saves the query and the parse.
    /// Only [`Tx::insert_job`] and [`Tx::update_job`] write the jobs table, and both keep this
    /// true.
    jobs: HashMap<String, Job>,
    /// Part counts of parents, by status: every part that ends reads its parent's, and counting
    /// them in the table reads every part — a split of N parts read N² rows as its parts ended.
    /// Kept true by the same two writes: a new part adds to its parent's counts, an update moves
    /// a part between them (its old status from `jobs`; a part not remembered there makes its
    /// parent's counts forgotten).
    parts: HashMap<String, PartStatusCounts>,
    /// Events with deliveries, by seq, as stored, each with how many of its deliveries have not
    /// yet taken it: leasing hands each delivery its event, and a remembered one is neither
    /// read back nor parsed from JSON again. Only [`Tx::insert_deliveries`] adds one (an event
    /// without deliveries is never leased); the last delivery to take it takes it away (a
    /// retry reads it back), and retention, the only other write to events, forgets what it
    /// deletes.
    events: HashMap<i64, (Event, usize)>,
    /// Rowids of records this writer inserted, by sheet key: a validator marks a share of a
    /// sheet's records, and each mark must first be shown to be in its sheet. Asked of the table,
    /// that is a descent to a page of values the writer never otherwise reads (a `pread` each,
    /// ~40% of a mark's time); remembered, it is a binary search. Only
    /// [`Tx::insert_records`] adds rowids and [`Tx::delete_records`] (the only other write
    /// that moves a record out of a sheet) forgets the sheet's.
    records: RecordRanges,
}

/// Runs of consecutive rowids known to be records of a sheet, by sheet key, each sorted.
#[derive(Default)]
struct RecordRanges {
    sheets: HashMap<i64, Vec<(i64, i64)>>,
    /// Runs held, all sheets together (bounded by [`REMEMBERED`]).
    runs: usize,
}

impl RecordRanges {
    /// Notes that records `first..=last` were just inserted into sheet `key`. SQLite gives a
    /// new row the highest rowid yet plus one, so a batch of inserts extends one run; a run
    /// below a sheet's last one (only after the highest rowid was taken) is not remembered.
    fn inserted(&mut self, key: i64, first: i64, last: i64) {
        let runs = self.sheets.entry(key).or_default();
        match runs.last_mut() {
            Some((_, end)) if end.checked_add(1) == Some(first) => *end = last,
            Some((_, end)) if first <= *end => {}
            _ => {
                if self.runs >= REMEMBERED {
                    self.forget();
                }
                self.sheets.entry(key).or_default().push((first, last));
                self.runs += 1;
            }
        }
    }

    /// True when `rowid` is known to be a record of sheet `key`; false when not known either way.
    fn contains(&self, key: i64, rowid: i64) -> bool {
        let Some(runs) = self.sheets.get(&key) else { return false };
        let i = runs.partition_point(|&(_, last)| last < rowid);
        runs.get(i).is_some_and(|&(first, _)| first <= rowid)
    }

    fn forget_sheet(&mut self, key: i64) {
        if let Some(runs) = self.sheets.remove(&key) {
            self.runs -= runs.len();
        }
    }

    fn forget(&mut self) {
        self.sheets.clear();
        self.runs = 0;
    }
}

/// Chains, and jobs, remembered at most (a few MiB of jobs): a chain lives for the few calls of
/// one burst of listener work, a job for the calls of one delivery, so forgetting them all now
/// and then costs only a read per chain or job still in use.
const REMEMBERED: usize = 4096;

/// Remembers `value` under `key` in a memory bounded by [`REMEMBERED`].
fn remember<K: std::hash::Hash + Eq, V>(memory: &mut HashMap<K, V>, key: K, value: V) {
    if memory.len() >= REMEMBERED {
        memory.clear();
    }
    memory.insert(key, value);
}

impl Memory {
    fn forget(&mut self) {
        self.version = None;
        self.chains.clear();
        self.jobs.clear();
        self.parts.clear();
        self.events.clear();
        self.records.forget();
    }
}

/// Adds `n` parts of `status` to `counts` (negative: takes them away). The one place a status
/// is mapped to its bucket, for counts read from the table and counts kept by the writer.
fn count_part(counts: &mut PartStatusCounts, status: JobStatus, n: i64) {
    let add = |c: &mut u64| *c = c.saturating_add_signed(n);
    add(&mut counts.total);
    match status {
        JobStatus::Complete => add(&mut counts.completed),
        JobStatus::Failed => add(&mut counts.failed),
        JobStatus::Canceled => add(&mut counts.canceled),
        JobStatus::Ready | JobStatus::Executing => add(&mut counts.active),
        _ => {}
    }
}

/// The statements every job lifecycle runs, prepared once and held by the writer, keyed by
/// the address and length of their `'static` SQL text. rusqlite's statement cache hashes the
/// whole SQL text on the way out and back and copies it into a new `Arc` each use (its lookup
/// and return were ~10% of the writer's instructions per lifecycle, reset included; holding
/// them saved 3.4%, callgrind, 2026-12-06); a held statement costs a lookup of two words.
struct Held<'c> {
    conn: &'c Connection,
    by_sql: HashMap<(usize, usize), Statement<'c>>,
}

impl<'c> Held<'c> {
    fn new(conn: &'c Connection) -> Self {
        Self { conn, by_sql: HashMap::new() }
    }

    fn get(&mut self, sql: &'static str) -> rusqlite::Result<&mut Statement<'c>> {
        Ok(match self.by_sql.entry((sql.as_ptr() as usize, sql.len())) {
            std::collections::hash_map::Entry::Occupied(held) => held.into_mut(),
            std::collections::hash_map::Entry::Vacant(slot) => slot.insert(self.conn.prepare(sql)?),
        })
    }
}

/// The writer thread's connection and what it remembers between batches.
struct Writer<'c> {
    conn: &'c Connection,
    held: Held<'c>,
    memory: Memory,
    /// Batches still to run with a savepoint per write (see [`CAREFUL_BATCHES`]).
    careful: u32,
    stats: Arc<WriteCounters>,
    /// The connection's row-change count when the current transaction began.
    changes_at_begin: u64,
    /// The open transaction, if any.
    open: Option<OpenTx>,
}

/// A transaction the writer holds open while writes join it.
struct OpenTx {
    /// Whether it runs each write in a savepoint of its own.
    careful: bool,
    /// Deliveries made by the writes kept so far.
    new_deliveries: usize,
}

impl Writer<'_> {
    /// Runs `op` in the open transaction (beginning one if none) and appends it to `batch`.
    ///
    /// First without savepoints: a savepoint per write journals every page the write touches
    /// a second time (a large share of the writer's time), and writes rarely fail. If one does
    /// (it asks to discard its changes, or panics), the transaction is rolled back and the batch
    /// runs again with a savepoint per write, so the failing write is undone alone. Writes may
    /// run more than once ([`WriteRun`](jobhost_store::WriteRun)); only the last run's result
    /// is replied. An error means the whole transaction was rolled back (`op` is in `batch`).
    fn add(&mut self, batch: &mut Vec<WriteOp>, op: WriteOp) -> Result<()> {
        batch.push(op);
        if self.open.is_none() {
            self.begin()?;
        }
        let careful = self.open.as_ref().is_some_and(|t| t.careful);
        let last = batch.len() - 1;
        if careful {
            return self.run_careful(&mut batch[last]);
        }
        let (kept, added) = self.run_op(&mut batch[last]);
        if kept {
            if let Some(t) = &mut self.open {
                t.new_deliveries += added;
            }
            return Ok(());
        }
        // Run the whole batch again, a savepoint per write.
        self.rollback();
        self.careful = CAREFUL_BATCHES;
        self.stats.careful();
        self.begin()?;
        for op in batch.iter_mut() {
            self.run_careful(op)?;
        }
        Ok(())
    }

    /// Runs `op` in a savepoint of its own, undoing it alone if it discards its changes.
    fn run_careful(&mut self, op: &mut WriteOp) -> Result<()> {
        if let Err(e) = run(self.conn, "SAVEPOINT op") {
            tracing::error!(error = %e, "cannot open a savepoint");
            // Without a savepoint the write cannot be undone alone: the whole batch is
            // rolled back and every caller sees an error (retryable).
            self.rollback();
            return Err(Error::Store(StoreError::caused_by("cannot open a savepoint", e).retryable(true)));
        }
        let (kept, added) = self.run_op(op);
        let end = if kept {
            if let Some(t) = &mut self.open {
                t.new_deliveries += added;
            }
            run(self.conn, "RELEASE op")
        } else {
            // It may have remembered what it wrote itself, which the rollback undoes.
            self.memory.forget();
            run(self.conn, "ROLLBACK TO op").and_then(|_| run(self.conn, "RELEASE op"))
        };
        if let Err(e) = end {
            tracing::error!(error = %e, "cannot end a savepoint");
            self.rollback();
            return Err(Error::Store(StoreError::caused_by("cannot end a savepoint", e).retryable(true)));
        }
        Ok(())
    }

    /// Runs one write; returns whether it keeps its changes (a panic counts as discarding them)
    /// and how many deliveries it made.
    fn run_op(&mut self, op: &mut WriteOp) -> (bool, usize) {
        let mut tx = Conn::writer(self.conn, &mut self.memory, &mut self.held);
        let kept = std::panic::catch_unwind(AssertUnwindSafe(|| (op.run)(&mut tx))).unwrap_or_else(|_| {
            tracing::error!("a write panicked; its changes are rolled back");
            false
        });
        (kept, tx.new_deliveries)
    }

    fn begin(&mut self) -> Result<()> {
        if let Err(e) = run(self.conn, "BEGIN IMMEDIATE") {
            tracing::error!(error = %e, "cannot begin a write transaction");
            return Err(Error::Store(StoreError::caused_by("cannot begin a write transaction", e).retryable(true)));
        }
        self.changes_at_begin = self.conn.total_changes();
        self.open = Some(OpenTx { careful: self.careful > 0, new_deliveries: 0 });
        Ok(())
    }

    /// Commits the open transaction of a batch of `writes` writes, counting it: the commit's
    /// result and how many deliveries the kept writes made.
    fn commit(&mut self, writes: usize) -> (Result<()>, usize) {
        let Some(open) = self.open.take() else {
            return (Err(Error::store("no write transaction is open")), 0);
        };
        if open.careful {
            self.careful = self.careful.saturating_sub(1);
        }
        let rows = self.conn.total_changes().saturating_sub(self.changes_at_begin);
        let committed = run(self.conn, "COMMIT").db();
        if committed.is_err() {
            self.rollback();
        } else {
            self.stats.committed(writes, rows);
        }
        (committed, open.new_deliveries)
    }

    fn rollback(&mut self) {
        let _ = self.conn.execute_batch("ROLLBACK");
        self.open = None;
        // It may have remembered what it wrote itself, which the rollback undoes.
        self.memory.forget();
    }
}

/// The remembered event `seq` for one of its deliveries: a copy while others are still to take
/// it, the event itself for the last.
fn take_event(events: &mut HashMap<i64, (Event, usize)>, seq: i64) -> Option<Event> {
    let (event, left) = events.get_mut(&seq)?;
    if *left > 1 {
        *left -= 1;
        return Some(event.clone());
    }
    events.remove(&seq).map(|(event, _)| event)
}

/// Runs a parameterless statement through the statement cache (no re-parse per call).
fn run(conn: &Connection, sql: &str) -> rusqlite::Result<()> {
    conn.prepare_cached(sql)?.execute([]).map(drop)
}

/// A connection seen through the store traits (`'c` is the writer's connection, which its held
/// statements borrow).
struct Conn<'a, 'c> {
    conn: &'a Connection,
    new_deliveries: usize,
    /// The writer's memory of the store (`None` for readers: they query).
    memory: Option<&'a mut Memory>,
    /// The writer's held statements (`None` for readers: rusqlite's cache).
    held: Option<&'a mut Held<'c>>,
    /// The last sheet id → key looked up: a record write-back touches one sheet a thousand
    /// times in one call. Keys never change, so this can outlive nothing but this closure.
    sheet: std::cell::RefCell<Option<(String, i64)>>,
}

impl<'a, 'c> Conn<'a, 'c> {
    fn reader(conn: &'a Connection) -> Self {
        Self { conn, new_deliveries: 0, memory: None, held: None, sheet: Default::default() }
    }

    fn writer(conn: &'a Connection, memory: &'a mut Memory, held: &'a mut Held<'c>) -> Self {
        Self { memory: Some(memory), held: Some(held), ..Self::reader(conn) }
    }

    /// Runs `f` on the prepared statement for `sql`: one the writer holds, for the statements
    /// every job lifecycle runs, or else one from rusqlite's cache.
    fn hot<T>(&mut self, sql: &'static str, f: impl FnOnce(&mut Statement<'_>) -> rusqlite::Result<T>) -> Result<T> {
        match self.held.as_deref_mut() {
            Some(held) => f(held.get(sql).db()?).db(),
            None => f(&mut *self.conn.prepare_cached(sql).db()?).db(),
        }
    }

    fn sheet_key(&self, sheet_id: &str) -> Result<i64> {
        if let Some((id, key)) = &*self.sheet.borrow()
            && id == sheet_id
        {
            return Ok(*key);
        }
        let key = self
            .conn
            .prepare_cached("SELECT key FROM sheets WHERE id = ?1")
            .db()?
            .query_row([sheet_id], |r| r.get(0))
            .optional()
            .db()?
            .ok_or_else(|| Error::not_found("sheet", sheet_id))?;
        *self.sheet.borrow_mut() = Some((sheet_id.to_owned(), key));
        Ok(key)
    }

    /// Replaces a record's messages (none: removes them). False when the sheet has no such
    /// record; then nothing is written.
    fn put_messages(
        &mut self,
        rowid: i64,
        key: i64,
        messages: Option<&str>,
        has_error: bool,
        now: Millis,
    ) -> Result<bool> {
        // The record is read (is it in the sheet?) but not written: its values' page stays clean.
        // Two statements, not one `INSERT … SELECT`: that form is planned as a many-row insert,
        // which opens a statement journal per call (1.34× the writer's instructions on the
        // engine bench's records row, callgrind).
        let exists = self.memory.as_deref().is_some_and(|m| m.records.contains(key, rowid))
            || self.hot(RECORD_IN_SHEET_SQL, |s| s.query_row([rowid, key], |_| Ok(())).optional())?.is_some();
        if exists {
            match messages {
                Some(text) => self.hot(PUT_MESSAGES, |s| s.execute(params![rowid, key, text, has_error, now]))?,
                None => self.hot("DELETE FROM record_messages WHERE record_id = ?1", |s| s.execute([rowid]))?,
            };
        }
        Ok(exists)
    }
}

/// A page of a sheet's records: a range of the order index.
#[doc(hidden)]
pub const RECORD_PAGE_SQL: &str =
    "SELECT id, vals, metadata FROM records WHERE sheet_key = ?1 AND ord >= ?2 ORDER BY ord LIMIT ?3";

/// The messages of a page of records: the range of record keys from its lowest (`?1`) to its
/// highest (`?2`), in sheet `?3`. A page's keys are close together (records are keyed in the
/// order they were added), and most records have no messages: one range read in place of a
/// probe per record.
#[doc(hidden)]
pub const PAGE_MESSAGES_SQL: &str = "SELECT record_id, messages FROM record_messages \
     WHERE record_id BETWEEN ?1 AND ?2 AND sheet_key = ?3 ORDER BY record_id";

/// Stores the messages of a record known to exist (`?1` its rowid, `?2` its sheet's key).
const PUT_MESSAGES: &str = "INSERT INTO record_messages (record_id, sheet_key, messages, has_error, updated_at) \
     VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT (record_id) DO UPDATE SET messages = excluded.messages, \
     has_error = excluded.has_error, updated_at = excluded.updated_at";

/// How many records the sheet whose key is `?1` has, which is also the `ord` its next record
/// takes: its records' `ord`s run from 0 without a gap.
#[doc(hidden)]
pub const SHEET_SIZE_SQL: &str = "SELECT COALESCE(MAX(ord) + 1, 0) FROM records WHERE sheet_key = ?1";

/// Whether record `?1` is in the sheet whose key is `?2`.
#[doc(hidden)]
pub const RECORD_IN_SHEET_SQL: &str = "SELECT 1 FROM records WHERE id = ?1 AND sheet_key = ?2";

fn json_value(text: Option<String>) -> Result<Value> {
    Ok(match text {
        Some(t) => serde_json::from_str(&t)?,
        None => Value::Null,
    })
}

fn parse_enum<T: std::str::FromStr<Err = UnknownValue>>(text: &str) -> rusqlite::Result<T> {
    text.parse().map_err(|e: UnknownValue| {
        rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, Box::new(e))
    })
}

/// The jobs table's columns in [`job_from_row`]'s order; a macro so that the statements run on
/// every lifecycle are `concat!`ed at compile time instead of formatted on every call.
macro_rules! job_columns {
    () => {
        "id, environment_id, kind, operation, source, status, trigger_, mode, input, info, progress, \
         estimated_completion_at, outcome, parent_id, part_index, part_data, part_execution, predecessor_ids, run_at, \
         stale_timeout_ms, attempt, created_at, updated_at, started_at, finished_at, outcome_acknowledged_at, ready_at, \
         last_activity_at, split_at, parts_completed_at"
    };
}
const JOB_COLUMNS: &str = job_columns!();

fn sql_value(value: &QueryValue) -> &dyn rusqlite::ToSql {
    match value {
        QueryValue::Text(t) => t,
        QueryValue::Int(i) => i,
    }
}

fn job_from_row(r: &Row<'_>) -> rusqlite::Result<Job> {
    let json = |i: usize| -> rusqlite::Result<Value> {
        let t: Option<String> = r.get(i)?;
        json_value(t)
            .map_err(|e| rusqlite::Error::FromSqlConversionFailure(i, rusqlite::types::Type::Text, Box::new(e)))
    };
    let preds: Value = json(17)?;
    Ok(Job {
        id: r.get(0)?,
        environment_id: r.get(1)?,
        kind: parse_enum(&r.get::<_, String>(2)?)?,
        operation: r.get(3)?,
        source: r.get(4)?,
        status: parse_enum(&r.get::<_, String>(5)?)?,
        trigger: parse_enum(&r.get::<_, String>(6)?)?,
        mode: parse_enum(&r.get::<_, String>(7)?)?,
        input: json(8)?,
        info: r.get(9)?,
        progress: r.get(10)?,
        estimated_completion_at: r.get(11)?,
        outcome: json(12)?,
        parent_id: r.get(13)?,
        is_part: r.get::<_, Option<String>>(13)?.is_some(),
        part_index: r.get(14)?,
        part_data: json(15)?,
        part_execution: r.get::<_, Option<String>>(16)?.map(|s| parse_enum(&s)).transpose()?,
        predecessor_ids: match preds {
            Value::Null => Vec::new(),
            v => serde_json::from_value(v)
                .map_err(|e| rusqlite::Error::FromSqlConversionFailure(17, rusqlite::types::Type::Text, Box::new(e)))?,
        },
        run_at: r.get(18)?,
        stale_timeout_ms: r.get(19)?,
        attempt: r.get(20)?,
        created_at: r.get(21)?,
        updated_at: r.get(22)?,
        started_at: r.get(23)?,
        finished_at: r.get(24)?,
        outcome_acknowledged_at: r.get(25)?,
        ready_at: r.get(26)?,
        last_activity_at: r.get(27)?,
        split_at: r.get(28)?,
        parts_completed_at: r.get(29)?,
    })
}

macro_rules! event_columns {
    () => {
        "e.seq, e.id, e.topic, e.context, e.payload, e.created_at"
    };
}
const EVENT_COLUMNS: &str = event_columns!();

fn event_from_row(r: &Row<'_>, at: usize) -> rusqlite::Result<Event> {
    let parse = |i: usize| -> rusqlite::Result<Value> {
        let t: String = r.get(i)?;
        serde_json::from_str(&t)
            .map_err(|e| rusqlite::Error::FromSqlConversionFailure(i, rusqlite::types::Type::Text, Box::new(e)))
    };
    Ok(Event {
        seq: r.get(at)?,
        id: r.get(at + 1)?,
        topic: r.get(at + 2)?,
        context: parse(at + 3)?,
        payload: parse(at + 4)?,
        created_at: r.get(at + 5)?,
    })
}

fn status_list(statuses: &[JobStatus]) -> String {
    Value::from(statuses.iter().map(|s| s.as_str()).collect::<Vec<_>>()).to_string()
}

macro_rules! execution_columns {
    () => {
        "id, environment_id, plugin, plugin_version, route, event_id, topic, job_id, attempt, \
         started_at, duration_us, cpu_us, outcome, error, peak_memory, logs, http"
    };
}
const EXECUTION_COLUMNS: &str = execution_columns!();

fn execution_from_row(r: &Row<'_>) -> rusqlite::Result<Execution> {
    Ok(Execution {
        id: r.get(0)?,
        environment_id: r.get(1)?,
        plugin: r.get(2)?,
        plugin_version: r.get(3)?,
        route: r.get(4)?,
        event_id: r.get(5)?,
        topic: r.get(6)?,
        job_id: r.get(7)?,
        attempt: r.get(8)?,
        started_at: r.get(9)?,
        duration_us: r.get(10)?,
        cpu_us: r.get(11)?,
        outcome: parse_enum(&r.get::<_, String>(12)?)?,
        error: r.get(13)?,
        peak_memory: r.get::<_, i64>(14)? as u64,
        logs: r.get(15)?,
        http: match r.get::<_, Option<String>>(16)? {
            Some(text) => serde_json::from_str(&text)
                .map_err(|e| rusqlite::Error::FromSqlConversionFailure(16, rusqlite::types::Type::Text, Box::new(e)))?,
            None => Vec::new(),
        },
    })
}

impl ReadTx for Conn<'_, '_> {
    fn executions(&mut self, env: &str, job_id: Option<&str>, limit: u32) -> Result<Vec<Execution>> {
        let mut stmt = self.conn.prepare_cached(&format!(
            "SELECT {EXECUTION_COLUMNS} FROM executions WHERE environment_id = ?1 AND (?2 IS NULL OR job_id = ?2) ORDER BY id LIMIT ?3"
        )).db()?;
        let rows = stmt.query_map(params![env, job_id, limit], execution_from_row).db()?;
        rows.collect::<rusqlite::Result<_>>().db()
    }

    fn environment(&mut self, id: &str) -> Result<Option<Environment>> {
        self.conn
            .prepare_cached("SELECT id, name, created_at FROM environments WHERE id = ?1")
            .db()?
            .query_row([id], |r| Ok(Environment { id: r.get(0)?, name: r.get(1)?, created_at: r.get(2)? }))
            .optional()
            .db()
    }

    fn environment_named(&mut self, name: &str) -> Result<Option<Environment>> {
        self.conn
            .prepare_cached(
                "SELECT id, name, created_at FROM environments WHERE name = ?1 ORDER BY created_at, id LIMIT 1",
            )
            .db()?
            .query_row([name], |r| Ok(Environment { id: r.get(0)?, name: r.get(1)?, created_at: r.get(2)? }))
            .optional()
            .db()
    }

    fn sheet(&mut self, env: &str, id: &str) -> Result<Option<Sheet>> {
        self
            .conn
            .prepare_cached("SELECT id, environment_id, name, workbook_id, created_at FROM sheets WHERE id = ?1 AND environment_id = ?2").db()?
            .query_row([id, env], |r| {
                Ok(Sheet { id: r.get(0)?, environment_id: r.get(1)?, name: r.get(2)?, workbook_id: r.get(3)?, created_at: r.get(4)? })
            })
            .optional().db()
    }

    fn record_counts(&mut self, sheet_id: &str) -> Result<RecordCounts> {
        let key = self.sheet_key(sheet_id)?;
        // A sheet's `ord`s are 0..n with no gap (inserts append at the highest plus one,
        // deletes close the gaps; pages are read by `ord` ranges and rely on it), so the count
        // is the highest plus one: one descent of the order index, where `COUNT(*)` walked all
        // of it (~60 ms for a million records, twice on the seeds' job's critical path).
        let total =
            self.conn.prepare_cached(SHEET_SIZE_SQL).db()?.query_row([key], |r| r.get::<_, i64>(0)).db()? as u64;
        let error = self
            .conn
            .prepare_cached("SELECT COUNT(*) FROM record_messages WHERE sheet_key = ?1 AND has_error = 1")
            .db()?
            .query_row([key], |r| r.get::<_, i64>(0))
            .db()? as u64;
        Ok(RecordCounts { total, valid: total - error, error })
    }

    fn record_rows(&mut self, sheet_id: &str, offset: u64, limit: u32) -> Result<Vec<RawRecord>> {
        /// The page as owned rows.
        struct Rows(Vec<RawRecord>);
        impl RowSink for Rows {
            fn row(&mut self, rowid: i64, values: &str, metadata: Option<&str>) -> Result<()> {
                let (values, metadata) = (values.to_owned(), metadata.map(str::to_owned));
                self.0.push(RawRecord { rowid, values, messages: None, metadata });
                Ok(())
            }
            fn messages(&mut self, at: usize, messages: &str) -> Result<()> {
                self.0[at].messages = Some(messages.to_owned());
                Ok(())
            }
        }
        let mut rows = Rows(Vec::new());
        self.visit_record_rows(sheet_id, offset, limit, &mut rows)?;
        Ok(rows.0)
    }

    fn visit_record_rows(&mut self, sheet_id: &str, offset: u64, limit: u32, sink: &mut dyn RowSink) -> Result<()> {
        let key = self.sheet_key(sheet_id)?;
        // Each row's id and its place on the page.
        let mut ids: Vec<(i64, usize)> = Vec::with_capacity(limit.min(jobhost_core::model::MAX_PAGE_SIZE) as usize);
        let mut stmt = self.conn.prepare_cached(RECORD_PAGE_SQL).db()?;
        let mut rows = stmt.query(params![key, offset as i64, limit]).db()?;
        while let Some(r) = rows.next().db()? {
            let rowid: i64 = r.get(0).db()?;
            let metadata = r.get_ref(2).db()?;
            let metadata = if metadata == rusqlite::types::ValueRef::Null { None } else { Some(borrowed_text(r, 2)?) };
            sink.row(rowid, borrowed_text(r, 1)?, metadata)?;
            ids.push((rowid, ids.len()));
        }
        drop(rows);
        if !ids.is_sorted() {
            ids.sort_unstable();
        }
        let (Some(&(low, _)), Some(&(high, _))) = (ids.first(), ids.last()) else { return Ok(()) };
        // The page's messages in one range of keys, sorted by key, not a probe per record. The
        // range may hold the sheet's records of other pages (when its order is not its keys'):
        // only the page's own are handed.
        let mut stmt = self.conn.prepare_cached(PAGE_MESSAGES_SQL).db()?;
        let mut found = stmt.query(params![low, high, key]).db()?;
        while let Some(r) = found.next().db()? {
            let rowid: i64 = r.get(0).db()?;
            if let Ok(i) = ids.binary_search_by_key(&rowid, |&(id, _)| id) {
                sink.messages(ids[i].1, borrowed_text(r, 1)?)?;
            }
        }
        Ok(())
    }

    fn job(&mut self, env: &str, id: &str) -> Result<Option<Job>> {
        if let Some(job) = self.memory.as_deref().and_then(|m| m.jobs.get(id)) {
            // Ids are the table's key: a job remembered in another environment is none of this one's.
            return Ok((job.environment_id == env).then(|| job.clone()));
        }
        let job = self
            .hot(concat!("SELECT ", job_columns!(), " FROM jobs WHERE id = ?1 AND environment_id = ?2"), |s| {
                s.query_row([id, env], job_from_row).optional()
            })?;
        if let Some(job) = &job {
            self.remember_job(job);
        }
        Ok(job)
    }

    fn jobs(&mut self, env: &str, parent: Option<&str>, offset: u64, limit: u32) -> Result<Vec<Job>> {
        let mut stmt = match parent {
            Some(_) => self.conn.prepare_cached(&format!(
                "SELECT {JOB_COLUMNS} FROM jobs WHERE environment_id = ?1 AND parent_id = ?2 ORDER BY part_index LIMIT ?3 OFFSET ?4"
            )).db()?,
            None => self
                .conn
                .prepare_cached(&format!("SELECT {JOB_COLUMNS} FROM jobs WHERE environment_id = ?1 AND ?2 IS NULL ORDER BY rowid LIMIT ?3 OFFSET ?4")).db()?,
        };
        let rows = stmt.query_map(params![env, parent, limit, offset as i64], job_from_row).db()?;
        rows.collect::<rusqlite::Result<_>>().db()
    }

    fn last_event_seq(&mut self, env: &str) -> Result<i64> {
        self.conn
            .prepare_cached("SELECT COALESCE(MAX(seq), 0) FROM events WHERE environment_id = ?1")
            .db()?
            .query_row([env], |r| r.get(0))
            .db()
    }

    fn find_jobs(&mut self, env: &str, query: &JobQuery, offset: u64, limit: u32) -> Result<Vec<Job>> {
        let (conditions, values) = query.conditions(|n| format!("?{n}"));
        // Newest first is rowid order backwards: `jobs_env` holds the rowid, so no sort.
        let order = if query.parent.is_some() { "part_index" } else { "rowid DESC" };
        let n = values.len();
        let sql = format!(
            "SELECT {JOB_COLUMNS} FROM jobs WHERE environment_id = ?1{conditions} ORDER BY {order} LIMIT ?{} OFFSET ?{}",
            n + 2,
            n + 3
        );
        let mut stmt = self.conn.prepare_cached(&sql).db()?;
        let mut bound: Vec<&dyn rusqlite::ToSql> = vec![&env];
        bound.extend(values.iter().map(sql_value));
        let (limit, offset) = (i64::from(limit), offset as i64);
        bound.push(&limit);
        bound.push(&offset);
        let rows = stmt.query_map(bound.as_slice(), job_from_row).db()?;
        rows.collect::<rusqlite::Result<_>>().db()
    }

    fn count_jobs(&mut self, env: &str, query: &JobQuery) -> Result<Vec<(JobStatus, u64)>> {
        let (conditions, values) = query.any_status().conditions(|n| format!("?{n}"));
        let sql = format!(
            "SELECT status, COUNT(*) FROM jobs WHERE environment_id = ?1{conditions} GROUP BY status ORDER BY status"
        );
        let mut stmt = self.conn.prepare_cached(&sql).db()?;
        let mut bound: Vec<&dyn rusqlite::ToSql> = vec![&env];
        bound.extend(values.iter().map(sql_value));
        let rows = stmt
            .query_map(bound.as_slice(), |r| Ok((parse_enum(&r.get::<_, String>(0)?)?, r.get::<_, i64>(1)? as u64)))
            .db()?;
        rows.collect::<rusqlite::Result<_>>().db()
    }

    fn part_statuses(&mut self, env: &str, parent: &str) -> Result<Vec<JobStatus>> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT status FROM jobs WHERE parent_id = ?1 AND environment_id = ?2 ORDER BY part_index")
            .db()?;
        let rows = stmt.query_map([parent, env], |r| parse_enum(&r.get::<_, String>(0)?)).db()?;
        rows.collect::<rusqlite::Result<_>>().db()
    }

    fn sheets(&mut self, env: &str, offset: u64, limit: u32) -> Result<Vec<Sheet>> {
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT id, environment_id, name, workbook_id, created_at FROM sheets WHERE environment_id = ?1 \
                 ORDER BY rowid DESC LIMIT ?2 OFFSET ?3",
            )
            .db()?;
        let rows = stmt
            .query_map(params![env, limit, offset as i64], |r| {
                Ok(Sheet {
                    id: r.get(0)?,
                    environment_id: r.get(1)?,
                    name: r.get(2)?,
                    workbook_id: r.get(3)?,
                    created_at: r.get(4)?,
                })
            })
            .db()?;
        rows.collect::<rusqlite::Result<_>>().db()
    }

    fn events(&mut self, env: &str, after_seq: i64, limit: u32) -> Result<Vec<Event>> {
        let mut stmt = self.conn.prepare_cached(&format!(
            "SELECT {EVENT_COLUMNS} FROM events e WHERE e.environment_id = ?1 AND e.seq > ?2 ORDER BY e.seq LIMIT ?3"
        )).db()?;
        let rows = stmt.query_map(params![env, after_seq, limit], |r| event_from_row(r, 0)).db()?;
        rows.collect::<rusqlite::Result<_>>().db()
    }

    fn job_events(&mut self, env: &str, job_id: &str) -> Result<Vec<Event>> {
        let mut stmt = self
            .conn
            .prepare_cached(&format!(
                "SELECT {EVENT_COLUMNS} FROM events e WHERE e.job_id = ?1 AND e.environment_id = ?2 ORDER BY e.seq"
            ))
            .db()?;
        let rows = stmt.query_map(params![job_id, env], |r| event_from_row(r, 0)).db()?;
        rows.collect::<rusqlite::Result<_>>().db()
    }

    fn dead_letters(&mut self, env: &str) -> Result<Vec<DeadLetter>> {
        let mut stmt = self
            .conn
            .prepare_cached(&format!(
                "SELECT d.id, d.subscription_id, d.attempts, d.last_error, {EVENT_COLUMNS} FROM deliveries d \
             JOIN events e ON e.seq = d.event_seq WHERE d.status = 'dead' AND e.environment_id = ?1 ORDER BY d.id"
            ))
            .db()?;
        let rows = stmt
            .query_map([env], |r| {
                Ok(DeadLetter {
                    delivery_id: r.get(0)?,
                    subscription_id: r.get(1)?,
                    attempts: r.get(2)?,
                    last_error: r.get::<_, Option<String>>(3)?.unwrap_or_default(),
                    event: event_from_row(r, 4)?,
                })
            })
            .db()?;
        rows.collect::<rusqlite::Result<_>>().db()
    }

    fn open_deliveries(&mut self, env: &str, job_id: &str) -> Result<Vec<OpenDelivery>> {
        let mut stmt = self.conn.prepare_cached(OPEN_DELIVERIES_SQL).db()?;
        let rows = stmt
            .query_map([env, job_id], |r| {
                Ok(OpenDelivery {
                    delivery_id: r.get(0)?,
                    subscription_id: r.get(1)?,
                    event_id: r.get(2)?,
                    topic: r.get(3)?,
                    state: parse_enum(&r.get::<_, String>(4)?)?,
                    attempts: r.get(5)?,
                    due_at: r.get(6)?,
                    lease_owner: r.get(7)?,
                    last_error: r.get(8)?,
                })
            })
            .db()?;
        rows.collect::<rusqlite::Result<_>>().db()
    }

    fn job_status_counts(&mut self) -> Result<Vec<(String, u64)>> {
        let mut stmt =
            self.conn.prepare_cached("SELECT status, COUNT(*) FROM jobs GROUP BY status ORDER BY status").db()?;
        let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)? as u64))).db()?;
        rows.collect::<rusqlite::Result<_>>().db()
    }

    fn execution_stats(&mut self) -> Result<Vec<(String, u64, u64)>> {
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT outcome, COUNT(*), SUM(duration_us) FROM executions GROUP BY outcome ORDER BY outcome",
            )
            .db()?;
        let rows = stmt
            .query_map([], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)? as u64, r.get::<_, i64>(2)?.max(0) as u64))
            })
            .db()?;
        rows.collect::<rusqlite::Result<_>>().db()
    }

    fn delivery_stats(&mut self) -> Result<DeliveryStats> {
        let mut stats = DeliveryStats::default();
        let mut stmt = self.conn.prepare_cached("SELECT status, COUNT(*) FROM deliveries GROUP BY status").db()?;
        let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)? as u64))).db()?;
        for row in rows {
            let (status, n) = row.db()?;
            match status.as_str() {
                "pending" => stats.pending = n,
                "leased" => stats.leased = n,
                "done" => stats.done = n,
                "dead" => stats.dead = n,
                _ => {}
            }
        }
        Ok(stats)
    }

    fn secret(&mut self, env: &str, name: &str) -> Result<Option<String>> {
        self.conn
            .prepare_cached("SELECT value FROM secrets WHERE environment_id = ?1 AND name = ?2")
            .db()?
            .query_row([env, name], |r| r.get(0))
            .optional()
            .db()
    }

    fn environments(&mut self) -> Result<Vec<Environment>> {
        let mut stmt =
            self.conn.prepare_cached("SELECT id, name, created_at FROM environments ORDER BY created_at, id").db()?;
        let rows =
            stmt.query_map([], |r| Ok(Environment { id: r.get(0)?, name: r.get(1)?, created_at: r.get(2)? })).db()?;
        rows.collect::<rusqlite::Result<_>>().db()
    }

    fn token(&mut self, hash: &str) -> Result<Option<ApiToken>> {
        self.conn
            .prepare_cached("SELECT id, environment_id, name, created_at FROM tokens WHERE hash = ?1")
            .db()?
            .query_row([hash], |r| {
                Ok(ApiToken { id: r.get(0)?, environment_id: r.get(1)?, name: r.get(2)?, created_at: r.get(3)? })
            })
            .optional()
            .db()
    }

    fn tokens(&mut self, env: &str) -> Result<Vec<ApiToken>> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT id, environment_id, name, created_at FROM tokens WHERE environment_id = ?1 ORDER BY created_at, id",
        ).db()?;
        let rows = stmt
            .query_map([env], |r| {
                Ok(ApiToken { id: r.get(0)?, environment_id: r.get(1)?, name: r.get(2)?, created_at: r.get(3)? })
            })
            .db()?;
        rows.collect::<rusqlite::Result<_>>().db()
    }

    fn secret_names(&mut self, env: &str) -> Result<Vec<String>> {
        let mut stmt =
            self.conn.prepare_cached("SELECT name FROM secrets WHERE environment_id = ?1 ORDER BY name").db()?;
        let rows = stmt.query_map([env], |r| r.get(0)).db()?;
        rows.collect::<rusqlite::Result<_>>().db()
    }

    fn open_delivery_stats(&mut self) -> Result<DeliveryStats> {
        let mut stats = DeliveryStats::default();
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT status, COUNT(*) FROM deliveries INDEXED BY deliveries_due \
                 WHERE status IN ('pending', 'leased') GROUP BY status",
            )
            .db()?;
        let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)? as u64))).db()?;
        for row in rows {
            match row.db()? {
                (s, n) if s == "pending" => stats.pending = n,
                (_, n) => stats.leased = n,
            }
        }
        stats.dead = self
            .conn
            .prepare_cached("SELECT COUNT(*) FROM deliveries INDEXED BY deliveries_dead WHERE status = 'dead'")
            .db()?
            .query_row([], |r| r.get::<_, i64>(0))
            .db()? as u64;
        Ok(stats)
    }

    fn size(&mut self) -> Result<StoreSize> {
        let pragma = |conn: &rusqlite::Connection, name: &str| -> Result<u64> {
            conn.query_row(&format!("PRAGMA {name}"), [], |r| r.get::<_, i64>(0)).db().map(|n| n.max(0) as u64)
        };
        let bytes = pragma(self.conn, "page_count")? * pragma(self.conn, "page_size")?;
        let mut rows = Vec::new();
        // MIN and MAX of an integer primary key are a b-tree descent each, but only as queries
        // of their own: `SELECT MAX(k) - MIN(k)` scans the table.
        for (table, key) in [("events", "seq"), ("deliveries", "id"), ("executions", "id")] {
            let end = |f: &str| -> Result<i64> {
                self.conn
                    .prepare_cached(&format!("SELECT COALESCE({f}({key}), 0) FROM {table}"))
                    .db()?
                    .query_row([], |r| r.get(0))
                    .db()
            };
            let (max, min) = (end("MAX")?, end("MIN")?);
            rows.push((table, if max == 0 { 0 } else { (max - min + 1).max(0) as u64 }));
        }
        Ok(StoreSize { bytes, rows })
    }

    fn all_secrets(&mut self) -> Result<Vec<StoredSecret>> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT environment_id, name, value FROM secrets ORDER BY environment_id, name")
            .db()?;
        let rows = stmt
            .query_map([], |r| Ok(StoredSecret { environment_id: r.get(0)?, name: r.get(1)?, value: r.get(2)? }))
            .db()?;
        rows.collect::<rusqlite::Result<_>>().db()
    }

    fn next_delivery_due(&mut self, subscriptions: &[String]) -> Result<Option<Millis>> {
        let subs = serde_json::to_string(subscriptions)?;
        self.conn
            .prepare_cached(
                "SELECT MIN(due_at) FROM deliveries WHERE status IN ('pending', 'leased') \
                 AND subscription_id IN (SELECT value FROM json_each(?1))",
            )
            .db()?
            .query_row([subs], |r| r.get(0))
            .db()
    }

    fn subscriptions_version(&mut self) -> Result<u64> {
        if let Some(v) = self.memory.as_deref().and_then(|m| m.version) {
            return Ok(v);
        }
        let v: Option<String> = self
            .conn
            .prepare_cached("SELECT value FROM meta WHERE key = 'subscriptions_version'")
            .db()?
            .query_row([], |r| r.get(0))
            .optional()
            .db()?;
        let v = v.and_then(|v| v.parse().ok()).unwrap_or(0);
        if let Some(memory) = self.memory.as_deref_mut() {
            memory.version = Some(v);
        }
        Ok(v)
    }

    fn active_subscriptions(&mut self) -> Result<Vec<Subscription>> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT id, environment_id, topic, filter FROM subscriptions WHERE active = 1 ORDER BY id")
            .db()?;
        let rows = stmt
            .query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, Option<String>>(3)?,
                ))
            })
            .db()?;
        let mut out = Vec::new();
        for row in rows {
            let (id, environment_id, topic, filter) = row.db()?;
            let filter = json_value(filter)?;
            out.push(Subscription { id, environment_id, topic, filter });
        }
        Ok(out)
    }

    fn hosts(&mut self) -> Result<Vec<HostRecord>> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT id, label, started_at, heartbeat_at FROM hosts ORDER BY started_at")
            .db()?;
        let rows = stmt
            .query_map([], |r| {
                Ok(HostRecord { id: r.get(0)?, label: r.get(1)?, started_at: r.get(2)?, heartbeat_at: r.get(3)? })
            })
            .db()?;
        rows.collect::<rusqlite::Result<_>>().db()
    }
}

impl Tx for Conn<'_, '_> {
    fn insert_token(&mut self, hash: &str, token: &ApiToken) -> Result<()> {
        self.conn
            .prepare_cached(
                "INSERT INTO tokens (hash, id, environment_id, name, created_at) VALUES (?1, ?2, ?3, ?4, ?5)",
            )
            .db()?
            .execute(params![hash, token.id, token.environment_id, token.name, token.created_at])
            .db()?;
        Ok(())
    }

    fn delete_token(&mut self, env: &str, id: &str) -> Result<bool> {
        Ok(self
            .conn
            .prepare_cached("DELETE FROM tokens WHERE environment_id = ?1 AND id = ?2")
            .db()?
            .execute([env, id])
            .db()?
            > 0)
    }

    fn charge_chain(&mut self, chain: &str, events: u64, now: Millis) -> Result<u64> {
        let remembered = self.memory.as_deref().and_then(|m| m.chains.get(chain).copied());
        let charge = params![chain, events as i64, now];
        if let Some(total) = remembered {
            // Always 1 row while remembered (whatever deletes chains forgets them); if not, ask.
            if self
                .hot("UPDATE chains SET events = events + ?2, updated_at = ?3 WHERE id = ?1", |s| s.execute(charge))?
                == 1
            {
                return Ok(self.remember_chain(chain, total + events));
            }
        } else if self.memory.is_some()
            && self.hot("INSERT OR IGNORE INTO chains (id, events, updated_at) VALUES (?1, ?2, ?3)", |s| {
                s.execute(charge)
            })? == 1
        {
            return Ok(self.remember_chain(chain, events));
        }
        // Two statements, not one with RETURNING: SQLite buffers RETURNING rows in a temporary
        // b-tree that it builds and frees on every run.
        self.conn
            .prepare_cached(
                "INSERT INTO chains (id, events, updated_at) VALUES (?1, ?2, ?3) \
                 ON CONFLICT (id) DO UPDATE SET events = events + excluded.events, updated_at = excluded.updated_at",
            )
            .db()?
            .execute(params![chain, events as i64, now])
            .db()?;
        Ok(self
            .conn
            .prepare_cached("SELECT events FROM chains WHERE id = ?1")
            .db()?
            .query_row([chain], |r| r.get::<_, i64>(0))
            .db()? as u64)
        .map(|total| self.remember_chain(chain, total))
    }

    fn history(&mut self, table: History, after: i64, before: Millis, limit: u32) -> Result<Vec<HistoryRow>> {
        let sql = match table {
            History::Events => "SELECT seq, created_at, NULL FROM events WHERE seq > ?1 ORDER BY seq LIMIT ?2",
            History::Deliveries => {
                "SELECT id, finished_at, status = 'done' FROM deliveries WHERE id > ?1 ORDER BY id LIMIT ?2"
            }
            History::Executions => "SELECT id, started_at, NULL FROM executions WHERE id > ?1 ORDER BY id LIMIT ?2",
        };
        let mut rows: Vec<HistoryRow> = self
            .conn
            .prepare_cached(sql)
            .db()?
            .query_map(params![after, limit], |r| {
                let done: Option<bool> = r.get(2)?;
                let at: Option<Millis> = r.get(1)?;
                Ok(HistoryRow { key: r.get(0)?, at: if done == Some(false) { None } else { at }, in_use: false })
            })
            .db()?
            .collect::<rusqlite::Result<_>>()
            .db()?;
        // The old rows at the head of the batch: only they can be deleted.
        let old = rows.iter().take_while(|r| r.at.is_some_and(|at| at < before)).count();
        if let (History::Events, Some(first), Some(last)) = (table, rows.first(), rows[..old].last()) {
            // Events a delivery not done points at, through the open and dead deliveries'
            // indexes (the backlog, not the history).
            let (lo, hi) = (first.key, last.key);
            let mut in_use = std::collections::HashSet::new();
            for sql in [
                "SELECT event_seq FROM deliveries INDEXED BY deliveries_due \
                 WHERE status IN ('pending', 'leased') AND event_seq BETWEEN ?1 AND ?2",
                "SELECT event_seq FROM deliveries INDEXED BY deliveries_dead WHERE status = 'dead' AND event_seq BETWEEN ?1 AND ?2",
            ] {
                let mut stmt = self.conn.prepare_cached(sql).db()?;
                for seq in stmt.query_map([lo, hi], |r| r.get::<_, i64>(0)).db()? {
                    in_use.insert(seq.db()?);
                }
            }
            for row in &mut rows {
                row.in_use = in_use.contains(&row.key);
            }
        }
        Ok(rows)
    }

    fn delete_history(&mut self, table: History, keys: &[i64]) -> Result<u64> {
        // The newest row of a table is never deleted: SQLite would give its rowid to the next
        // row (ids that an operator may have seen must not come back).
        let sql = match table {
            History::Events => return self.delete_events(keys),
            History::Deliveries => {
                "DELETE FROM deliveries WHERE id = ?1 AND status = 'done' AND id < (SELECT MAX(id) FROM deliveries)"
            }
            History::Executions => "DELETE FROM executions WHERE id = ?1 AND id < (SELECT MAX(id) FROM executions)",
        };
        let mut stmt = self.conn.prepare_cached(sql).db()?;
        let mut n = 0;
        for key in keys {
            n += stmt.execute([key]).db()? as u64;
        }
        Ok(n)
    }

    fn prune_chains(&mut self, after: &str, before: Millis, limit: u32) -> Result<(u64, Option<String>)> {
        if let Some(memory) = self.memory.as_deref_mut() {
            memory.chains.clear();
        }
        let seen: Vec<(String, Millis)> = self
            .conn
            .prepare_cached("SELECT id, updated_at FROM chains WHERE id > ?1 ORDER BY id LIMIT ?2")
            .db()?
            .query_map(params![after, limit], |r| Ok((r.get(0)?, r.get(1)?)))
            .db()?
            .collect::<rusqlite::Result<_>>()
            .db()?;
        let mut stmt = self.conn.prepare_cached("DELETE FROM chains WHERE id = ?1").db()?;
        let mut n = 0;
        for (id, _) in seen.iter().filter(|(_, at)| *at < before) {
            n += stmt.execute([id]).db()? as u64;
        }
        let next = if seen.len() < limit as usize { None } else { seen.last().map(|(id, _)| id.clone()) };
        Ok((n, next))
    }

    fn put_secret(&mut self, env: &str, name: &str, value: Option<&str>, now: Millis) -> Result<()> {
        match value {
            Some(v) => {
                self.conn
                    .prepare_cached(
                        "INSERT INTO secrets (environment_id, name, value, updated_at) VALUES (?1, ?2, ?3, ?4) \
                         ON CONFLICT (environment_id, name) DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at",
                    ).db()?
                    .execute(params![env, name, v, now]).db()?;
            }
            None => {
                let n = self
                    .conn
                    .prepare_cached("DELETE FROM secrets WHERE environment_id = ?1 AND name = ?2")
                    .db()?
                    .execute([env, name])
                    .db()?;
                if n == 0 {
                    return Err(Error::not_found("secret", name));
                }
            }
        }
        Ok(())
    }

    fn insert_execution(&mut self, e: &Execution) -> Result<i64> {
        let http = (!e.http.is_empty()).then(|| serde_json::to_string(&e.http)).transpose()?;
        let sql = concat!(
            "INSERT INTO executions (",
            execution_columns!(),
            ") VALUES (NULL, ?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16)"
        );
        self.hot(sql, |s| {
            s.execute(params![
                e.environment_id,
                e.plugin,
                e.plugin_version,
                e.route,
                e.event_id,
                e.topic,
                e.job_id,
                e.attempt,
                e.started_at,
                e.duration_us,
                e.cpu_us,
                e.outcome.as_str(),
                e.error,
                e.peak_memory as i64,
                e.logs,
                http,
            ])
        })?;
        Ok(self.conn.last_insert_rowid())
    }

    fn insert_environment(&mut self, env: &Environment) -> Result<()> {
        self.conn
            .prepare_cached("INSERT INTO environments (id, name, created_at) VALUES (?1, ?2, ?3)")
            .db()?
            .execute(params![env.id, env.name, env.created_at])
            .db()?;
        Ok(())
    }

    fn insert_sheet(&mut self, sheet: &Sheet) -> Result<()> {
        self.conn
            .prepare_cached(
                "INSERT INTO sheets (id, environment_id, name, workbook_id, created_at) VALUES (?1, ?2, ?3, ?4, ?5)",
            )
            .db()?
            .execute(params![sheet.id, sheet.environment_id, sheet.name, sheet.workbook_id, sheet.created_at])
            .db()?;
        Ok(())
    }

    fn insert_records(
        &mut self,
        sheet_id: &str,
        records: &mut dyn Iterator<Item = EncodedRecord>,
        now: Millis,
    ) -> Result<u64> {
        let key = self.sheet_key(sheet_id)?;
        let first: i64 = self.conn.prepare_cached(SHEET_SIZE_SQL).db()?.query_row([key], |r| r.get(0)).db()?;
        let mut stmt = self
            .conn
            .prepare_cached(
                "INSERT INTO records (sheet_key, ord, vals, metadata, updated_at) VALUES (?1, ?2, ?3, ?4, ?5)",
            )
            .db()?;
        let mut n = 0;
        // The rowids inserted, as runs handed to the writer's memory one at a time (a batch is
        // one run): not a map lookup per record on the import's path.
        let mut run: Option<(i64, i64)> = None;
        for (ord, r) in (first..).zip(records) {
            stmt.execute(params![key, ord, r.values, r.metadata, now]).db()?;
            let rowid = self.conn.last_insert_rowid();
            run = match run {
                Some((from, to)) if to.checked_add(1) == Some(rowid) => Some((from, rowid)),
                ended => {
                    if let (Some(memory), Some((from, to))) = (self.memory.as_deref_mut(), ended) {
                        memory.records.inserted(key, from, to);
                    }
                    Some((rowid, rowid))
                }
            };
            if let Some(messages) = &r.messages {
                self.conn
                    .prepare_cached(PUT_MESSAGES)
                    .db()?
                    .execute(params![rowid, key, messages, r.has_error, now])
                    .db()?;
            }
            n += 1;
        }
        if let (Some(memory), Some((from, to))) = (self.memory.as_deref_mut(), run) {
            memory.records.inserted(key, from, to);
        }
        Ok(n)
    }

    fn stored_record(&mut self, sheet_id: &str, rowid: i64) -> Result<Option<StoredRecord>> {
        let key = self.sheet_key(sheet_id)?;
        let row = self
            .conn
            .prepare_cached(
                "SELECT r.vals, m.messages FROM records r LEFT JOIN record_messages m ON m.record_id = r.id \
                 WHERE r.id = ?1 AND r.sheet_key = ?2",
            )
            .db()?
            .query_row(params![rowid, key], |r| Ok((r.get::<_, String>(0)?, r.get::<_, Option<String>>(1)?)))
            .optional()
            .db()?;
        let Some((vals, messages)) = row else { return Ok(None) };
        Ok(Some(StoredRecord {
            values: serde_json::from_str(&vals)?,
            messages: messages.map(|m| serde_json::from_str(&m)).transpose()?.unwrap_or_default(),
        }))
    }

    fn write_record_messages(
        &mut self,
        sheet_id: &str,
        rowid: i64,
        messages: Option<&str>,
        has_error: bool,
        now: Millis,
    ) -> Result<bool> {
        let key = self.sheet_key(sheet_id)?;
        self.put_messages(rowid, key, messages, has_error, now)
    }

    fn write_record(&mut self, rowid: i64, record: &EncodedRecord, now: Millis) -> Result<()> {
        let key = self
            .conn
            .prepare_cached("UPDATE records SET vals = ?2, updated_at = ?3 WHERE id = ?1 RETURNING sheet_key")
            .db()?
            .query_row(params![rowid, record.values, now], |r| r.get::<_, i64>(0))
            .db()?;
        self.put_messages(rowid, key, record.messages.as_deref(), record.has_error, now)?;
        Ok(())
    }

    fn delete_records(&mut self, sheet_id: &str, rowids: &[i64]) -> Result<Option<i64>> {
        let key = self.sheet_key(sheet_id)?;
        if let Some(memory) = self.memory.as_deref_mut() {
            memory.records.forget_sheet(key);
        }
        let mut ords = Vec::with_capacity(rowids.len());
        {
            let mut find = self.conn.prepare_cached("SELECT ord FROM records WHERE id = ?1 AND sheet_key = ?2").db()?;
            for &rowid in rowids {
                match find.query_row(params![rowid, key], |r| r.get::<_, i64>(0)).optional().db()? {
                    Some(ord) => ords.push(ord),
                    None => return Ok(Some(rowid)),
                }
            }
        }
        ords.sort_unstable();
        ords.dedup();
        let mut delete = self.conn.prepare_cached("DELETE FROM records WHERE sheet_key = ?1 AND ord = ?2").db()?;
        for ord in &ords {
            delete.execute(params![key, ord]).db()?;
        }
        let mut delete = self.conn.prepare_cached("DELETE FROM record_messages WHERE record_id = ?1").db()?;
        for rowid in rowids {
            delete.execute([rowid]).db()?;
        }
        // Each run of survivors between two deleted positions moves down by the number of
        // deletions before it. SQLite checks UNIQUE(sheet_key, ord) row by row, so a run moved
        // in place could collide with itself: park each run at its new place negated
        // (-new - 1, unique and below every live ord), then flip all of them back at once.
        let mut shift = self
            .conn
            .prepare_cached("UPDATE records SET ord = ?4 - ord - 1 WHERE sheet_key = ?1 AND ord > ?2 AND ord < ?3")
            .db()?;
        for (i, &from) in ords.iter().enumerate() {
            let until = ords.get(i + 1).copied().unwrap_or(i64::MAX);
            let moved_by = i as i64 + 1;
            shift.execute(params![key, from, until, moved_by]).db()?;
        }
        self.conn
            .prepare_cached("UPDATE records SET ord = -ord - 1 WHERE sheet_key = ?1 AND ord < 0")
            .db()?
            .execute([key])
            .db()?;
        Ok(None)
    }

    fn insert_job(&mut self, j: &Job) -> Result<()> {
        let sql = concat!(
            "INSERT INTO jobs (",
            job_columns!(),
            ") VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, \
                 ?19, ?20, ?21, ?22, ?23, ?24, ?25, ?26, ?27, ?28, ?29, ?30)"
        );
        self.hot(sql, |s| {
            s.execute(params![
                j.id,
                j.environment_id,
                j.kind.as_str(),
                j.operation,
                j.source,
                j.status.as_str(),
                j.trigger.as_str(),
                j.mode.as_str(),
                json_text(&j.input),
                j.info,
                j.progress,
                j.estimated_completion_at,
                json_text(&j.outcome),
                j.parent_id,
                j.part_index,
                json_text(&j.part_data),
                j.part_execution.map(|p| p.as_str()),
                (!j.predecessor_ids.is_empty()).then(|| Value::from(j.predecessor_ids.clone()).to_string()),
                j.run_at,
                j.stale_timeout_ms,
                j.attempt,
                j.created_at,
                j.updated_at,
                j.started_at,
                j.finished_at,
                j.outcome_acknowledged_at,
                j.ready_at,
                j.last_activity_at,
                j.split_at,
                j.parts_completed_at,
            ])
        })?;
        if !j.predecessor_ids.is_empty() {
            let mut stmt = self
                .conn
                .prepare_cached("INSERT OR IGNORE INTO job_predecessors (job_id, predecessor_id) VALUES (?1, ?2)")
                .db()?;
            for p in &j.predecessor_ids {
                stmt.execute([&j.id, p]).db()?;
            }
        }
        if let (Some(memory), Some(parent)) = (self.memory.as_deref_mut(), &j.parent_id)
            && let Some(counts) = memory.parts.get_mut(parent)
        {
            count_part(counts, j.status, 1);
        }
        self.remember_job(j);
        Ok(())
    }

    fn job_for_update(&mut self, env: &str, id: &str) -> Result<Option<Job>> {
        // The writer thread is the only writer: a row read in its transaction stays as read.
        self.job(env, id)
    }

    fn update_job(&mut self, j: &Job) -> Result<()> {
        let changed = self.hot(
                "UPDATE jobs SET status = ?2, info = ?3, progress = ?4, estimated_completion_at = ?5, outcome = ?6, \
                 part_execution = ?7, attempt = ?8, updated_at = ?9, started_at = ?10, finished_at = ?11, \
                 outcome_acknowledged_at = ?12, ready_at = ?13, last_activity_at = ?14, split_at = ?15, parts_completed_at = ?16 \
                 WHERE id = ?1",
            |s| s.execute(params![
                j.id,
                j.status.as_str(),
                j.info,
                j.progress,
                j.estimated_completion_at,
                json_text(&j.outcome),
                j.part_execution.map(|p| p.as_str()),
                j.attempt,
                j.updated_at,
                j.started_at,
                j.finished_at,
                j.outcome_acknowledged_at,
                j.ready_at,
                j.last_activity_at,
                j.split_at,
                j.parts_completed_at,
            ]),
        )?;
        if changed != 1 {
            return Err(Error::not_found("job", &j.id));
        }
        if let (Some(memory), Some(parent)) = (self.memory.as_deref_mut(), &j.parent_id)
            && memory.parts.contains_key(parent)
        {
            match memory.jobs.get(&j.id).map(|m| m.status) {
                Some(old) if old == j.status => {}
                Some(old) => {
                    let counts = memory.parts.get_mut(parent).expect("checked above");
                    count_part(counts, old, -1);
                    count_part(counts, j.status, 1);
                }
                // Its status before this update is not known here: count the parent's parts again.
                None => {
                    memory.parts.remove(parent);
                }
            }
        }
        // What the statement above wrote, and only that: the other columns never change.
        if let Some(m) = self.memory.as_deref_mut().and_then(|m| m.jobs.get_mut(&j.id)) {
            m.status = j.status;
            m.info.clone_from(&j.info);
            m.progress = j.progress;
            m.estimated_completion_at = j.estimated_completion_at;
            m.outcome.clone_from(&j.outcome);
            m.part_execution = j.part_execution;
            m.attempt = j.attempt;
            m.updated_at = j.updated_at;
            m.started_at = j.started_at;
            m.finished_at = j.finished_at;
            m.outcome_acknowledged_at = j.outcome_acknowledged_at;
            m.ready_at = j.ready_at;
            m.last_activity_at = j.last_activity_at;
            m.split_at = j.split_at;
            m.parts_completed_at = j.parts_completed_at;
        }
        Ok(())
    }

    fn part_counts(&mut self, parent_id: &str) -> Result<PartStatusCounts> {
        if let Some(counts) = self.memory.as_deref().and_then(|m| m.parts.get(parent_id)) {
            return Ok(*counts);
        }
        let mut counts = PartStatusCounts::default();
        let mut stmt =
            self.conn.prepare_cached("SELECT status, COUNT(*) FROM jobs WHERE parent_id = ?1 GROUP BY status").db()?;
        let rows = stmt.query_map([parent_id], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?))).db()?;
        for row in rows {
            let (status, n) = row.db()?;
            count_part(&mut counts, parse_enum::<JobStatus>(&status).db()?, n);
        }
        if let Some(memory) = self.memory.as_deref_mut() {
            remember(&mut memory.parts, parent_id.to_owned(), counts);
        }
        Ok(counts)
    }

    fn parts_in(&mut self, parent_id: &str, statuses: &[JobStatus]) -> Result<Vec<Job>> {
        let mut stmt = self.conn.prepare_cached(&format!(
            "SELECT {JOB_COLUMNS} FROM jobs WHERE parent_id = ?1 AND status IN (SELECT value FROM json_each(?2)) ORDER BY part_index"
        )).db()?;
        let rows = stmt.query_map(params![parent_id, status_list(statuses)], job_from_row).db()?;
        rows.collect::<rusqlite::Result<_>>().db()
    }

    fn waiting_dependents(&mut self, predecessor_id: &str) -> Result<Vec<Job>> {
        // Nearly every job ends with no dependents: a probe of the reverse index answers that
        // without the full query's temporary b-tree for its IN subquery.
        let any = self
            .hot("SELECT 1 FROM job_predecessors WHERE predecessor_id = ?1 LIMIT 1", |s| s.exists([predecessor_id]))?;
        if !any {
            return Ok(Vec::new());
        }
        let mut stmt = self
            .conn
            .prepare_cached(&format!(
                "SELECT {JOB_COLUMNS} FROM jobs WHERE status = 'waiting' AND id IN \
             (SELECT job_id FROM job_predecessors WHERE predecessor_id = ?1) ORDER BY rowid"
            ))
            .db()?;
        let rows = stmt.query_map([predecessor_id], job_from_row).db()?;
        rows.collect::<rusqlite::Result<_>>().db()
    }

    fn predecessor_statuses(&mut self, job: &Job) -> Result<Vec<(String, JobStatus)>> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT p.predecessor_id, j.status FROM job_predecessors p JOIN jobs j ON j.id = p.predecessor_id WHERE p.job_id = ?1",
        ).db()?;
        let rows = stmt
            .query_map([&job.id], |r| Ok((r.get::<_, String>(0)?, parse_enum::<JobStatus>(&r.get::<_, String>(1)?)?)))
            .db()?;
        rows.collect::<rusqlite::Result<_>>().db()
    }

    fn overdue_jobs(&mut self, o: Overdue, limit: u32) -> Result<Vec<Job>> {
        let mut stmt = self
            .conn
            .prepare_cached(&format!(
                "SELECT {JOB_COLUMNS} FROM jobs WHERE (status = 'scheduled' OR status = 'ready' OR status = 'executing') AND ( \
               (status = 'scheduled' AND run_at <= ?1) \
               OR (status = 'ready' AND ?2 IS NOT NULL AND ready_at <= ?2) \
               OR (status = 'executing' AND COALESCE(stale_timeout_ms, ?3) IS NOT NULL \
                   AND last_activity_at + COALESCE(stale_timeout_ms, ?3) <= ?1 \
                   AND NOT EXISTS (SELECT 1 FROM jobs p WHERE p.parent_id = jobs.id \
                                   AND p.status NOT IN ('complete', 'failed', 'canceled')))) \
             ORDER BY rowid LIMIT ?4"
            ))
            .db()?;
        let rows = stmt.query_map(params![o.now, o.ready_before, o.stale_ms, limit], job_from_row).db()?;
        rows.collect::<rusqlite::Result<_>>().db()
    }

    fn insert_event(&mut self, event: &Event) -> Result<i64> {
        let (context, payload) = (json_string(&event.context), json_string(&event.payload));
        self.hot(
            "INSERT INTO events (id, environment_id, topic, job_id, context, payload, created_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            |s| {
                s.execute(params![
                    event.id,
                    event.environment_id(),
                    event.topic,
                    event.job_id(),
                    context,
                    payload,
                    event.created_at
                ])
            },
        )?;
        Ok(self.conn.last_insert_rowid())
    }

    fn insert_deliveries(
        &mut self,
        event_seq: i64,
        event: Event,
        subscriptions: &[&str],
        due_at: Millis,
    ) -> Result<()> {
        self.hot(
            "INSERT INTO deliveries (event_seq, subscription_id, status, attempts, due_at) VALUES (?1, ?2, 'pending', 0, ?3)",
            |s| subscriptions.iter().try_for_each(|id| s.execute(params![event_seq, id, due_at]).map(drop)),
        )?;
        self.new_deliveries += subscriptions.len();
        if let Some(memory) = self.memory.as_deref_mut()
            && !subscriptions.is_empty()
        {
            remember(&mut memory.events, event_seq, (Event { seq: event_seq, ..event }, subscriptions.len()));
        }
        Ok(())
    }

    fn put_subscription(&mut self, sub: &Subscription, active: bool, now: Millis) -> Result<()> {
        self.conn
            .prepare_cached(
                "INSERT INTO subscriptions (id, environment_id, topic, filter, active, updated_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6) \
                 ON CONFLICT (id) DO UPDATE SET environment_id = ?2, topic = ?3, filter = ?4, active = ?5, updated_at = ?6",
            )
            .db()?
            .execute(params![sub.id, sub.environment_id, sub.topic, json_text(&sub.filter), active, now])
            .db()?;
        self.bump_subscriptions()
    }

    fn set_subscription_active(&mut self, id: &str, active: bool, now: Millis) -> Result<()> {
        self.conn
            .prepare_cached("UPDATE subscriptions SET active = ?2, updated_at = ?3 WHERE id = ?1")
            .db()?
            .execute(params![id, active, now])
            .db()?;
        self.bump_subscriptions()
    }

    fn due_deliveries(&mut self, subscriptions: &[String], now: Millis, limit: u32) -> Result<Vec<DueDelivery>> {
        // The single writer holds every row of this transaction: nothing to skip.
        let subs = serde_json::to_string(subscriptions)?;
        // The deliveries first, then each one's event: from the writer's memory when it wrote it
        // (nearly always: a delivery is leased soon after its event), else read. A delivery
        // whose event is gone is not due, as a join would have it.
        let due = self.hot(
            "SELECT d.id, d.subscription_id, d.attempts, d.last_error, d.event_seq FROM deliveries d \
                 WHERE d.status IN ('pending', 'leased') AND d.due_at <= ?1 \
                   AND d.subscription_id IN (SELECT value FROM json_each(?2)) \
                 ORDER BY d.due_at, d.id LIMIT ?3",
            |s| {
                s.query_map(params![now, subs, limit], |r| {
                    Ok((
                        r.get::<_, i64>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, u32>(2)?,
                        r.get(3)?,
                        r.get::<_, i64>(4)?,
                    ))
                })?
                .collect::<rusqlite::Result<Vec<(i64, String, u32, Option<String>, i64)>>>()
            },
        )?;
        let mut out = Vec::with_capacity(due.len());
        for (delivery_id, subscription_id, attempts, last_error, seq) in due {
            let event = match self.memory.as_deref_mut().and_then(|m| take_event(&mut m.events, seq)) {
                Some(event) => event,
                None => {
                    let read = self
                        .hot(concat!("SELECT ", event_columns!(), " FROM events e WHERE e.seq = ?1"), |s| {
                            s.query_row([seq], |r| event_from_row(r, 0)).optional()
                        })?;
                    let Some(event) = read else { continue };
                    event
                }
            };
            out.push(DueDelivery { delivery_id, subscription_id, attempts, last_error, event });
        }
        Ok(out)
    }

    fn lease_delivery(&mut self, id: i64, fence: &Fence, until: Millis) -> Result<()> {
        self.hot(
            "UPDATE deliveries SET status = 'leased', attempts = ?2, due_at = ?3, lease_owner = ?4 WHERE id = ?1",
            |s| s.execute(params![id, fence.attempt, until, fence.owner]),
        )?;
        Ok(())
    }

    fn finish_delivery(&mut self, id: i64, fence: Option<&Fence>, end: &DeliveryEnd, now: Millis) -> Result<bool> {
        // The fence is part of the update's condition (`?2 IS NULL`: no fence to check), so a
        // lease that is no longer current matches no row, in one statement.
        let (attempt, owner) = fence.map(|f| (f.attempt, f.owner.as_str())).unzip();
        macro_rules! fenced {
            () => {
                " WHERE id = ?1 AND (?2 IS NULL OR (status = 'leased' AND attempts = ?2 AND lease_owner = ?3))"
            };
        }
        let changed = match end {
            DeliveryEnd::Done => self.hot(
                concat!("UPDATE deliveries SET status = 'done', due_at = NULL, finished_at = ?4", fenced!()),
                |s| s.execute(params![id, attempt, owner, now]),
            )?,
            DeliveryEnd::Dead { error } => self
                .conn
                .prepare_cached(concat!(
                    "UPDATE deliveries SET status = 'dead', due_at = NULL, finished_at = ?4, last_error = ?5",
                    fenced!()
                ))
                .db()?
                .execute(params![id, attempt, owner, now, error])
                .db()?,
            DeliveryEnd::Retry { due_at, error } => {
                let changed = self
                    .conn
                    .prepare_cached(concat!(
                        "UPDATE deliveries SET status = 'pending', due_at = ?4, lease_owner = NULL, last_error = ?5",
                        fenced!()
                    ))
                    .db()?
                    .execute(params![id, attempt, owner, due_at, error])
                    .db()?;
                self.new_deliveries += changed;
                changed
            }
        };
        Ok(fence.is_none() || changed == 1)
    }

    fn release_delivery(&mut self, id: i64, fence: &Fence, now: Millis) -> Result<bool> {
        let n = self
            .conn
            .prepare_cached(
                "UPDATE deliveries SET status = 'pending', attempts = attempts - 1, due_at = ?3, lease_owner = NULL \
                 WHERE id = ?1 AND status = 'leased' AND attempts = ?2 AND lease_owner = ?4",
            )
            .db()?
            .execute(params![id, fence.attempt, now, fence.owner])
            .db()?;
        self.new_deliveries += n;
        Ok(n == 1)
    }

    fn redeliver_dead(&mut self, env: &str, delivery_id: i64, now: Millis) -> Result<bool> {
        let n = self
            .conn
            .prepare_cached(
                "UPDATE deliveries SET status = 'pending', attempts = 0, due_at = ?3, lease_owner = NULL, \
                 finished_at = NULL WHERE id = ?1 AND status = 'dead' \
                 AND event_seq IN (SELECT seq FROM events WHERE environment_id = ?2)",
            )
            .db()?
            .execute(params![delivery_id, env, now])
            .db()?;
        self.new_deliveries += n;
        Ok(n == 1)
    }

    fn reclaim_leases_except(&mut self, live: &[String], now: Millis) -> Result<u64> {
        let live = serde_json::to_string(live)?;
        let n = self
            .conn
            .prepare_cached(
                "UPDATE deliveries SET status = 'pending', due_at = ?2, lease_owner = NULL \
                 WHERE status = 'leased' AND lease_owner NOT IN (SELECT value FROM json_each(?1))",
            )
            .db()?
            .execute(params![live, now])
            .db()?;
        self.new_deliveries += n;
        Ok(n as u64)
    }

    fn heartbeat(&mut self, host: &HostRecord) -> Result<()> {
        self.conn
            .prepare_cached(
                "INSERT INTO hosts (id, label, started_at, heartbeat_at) VALUES (?1, ?2, ?3, ?4) \
                 ON CONFLICT (id) DO UPDATE SET heartbeat_at = ?4",
            )
            .db()?
            .execute(params![host.id, host.label, host.started_at, host.heartbeat_at])
            .db()?;
        Ok(())
    }

    fn remove_host(&mut self, id: &str) -> Result<()> {
        self.conn.prepare_cached("DELETE FROM hosts WHERE id = ?1").db()?.execute([id]).db()?;
        Ok(())
    }

    fn lock_key(&mut self, _key: &str) -> Result<()> {
        // The single writer runs one transaction at a time: every key is already held.
        Ok(())
    }
}

impl Conn<'_, '_> {
    /// Deletes old events. The newest event's seq is the table's high-water mark (a new row's
    /// key is one past the largest), so when it is due it becomes a placeholder in no
    /// environment instead: gone for its tenant, and its seq never comes back. A placeholder is
    /// deleted, uncounted, once a newer event holds the mark.
    fn delete_events(&mut self, keys: &[i64]) -> Result<u64> {
        // Retention's transaction adds no event: the largest seq is the same for every key.
        let max: i64 = self
            .conn
            .prepare_cached("SELECT COALESCE(MAX(seq), 0) FROM events")
            .db()?
            .query_row([], |r| r.get(0))
            .db()?;
        let mut n = 0;
        for &seq in keys {
            let real = self
                .conn
                .prepare_cached("SELECT environment_id <> '' FROM events WHERE seq = ?1")
                .db()?
                .query_row([seq], |r| r.get::<_, bool>(0))
                .optional()
                .db()?;
            let sql = match real {
                // Gone already, or the placeholder that holds the mark.
                None => continue,
                Some(false) if seq == max => continue,
                Some(true) if seq == max => {
                    "UPDATE events SET id = 'evt_high_water', environment_id = '', topic = 'jobhost:high-water', \
                     job_id = NULL, context = '{}', payload = '{}', created_at = 0 WHERE seq = ?1"
                }
                Some(_) => "DELETE FROM events WHERE seq = ?1",
            };
            self.conn.prepare_cached(sql).db()?.execute([seq]).db()?;
            if let Some(memory) = self.memory.as_deref_mut() {
                memory.events.remove(&seq);
            }
            n += u64::from(real == Some(true));
        }
        Ok(n)
    }

    /// Remembers a job as stored, on the writer (readers remember nothing).
    fn remember_job(&mut self, job: &Job) {
        if let Some(memory) = self.memory.as_deref_mut() {
            remember(&mut memory.jobs, job.id.clone(), job.clone());
        }
    }

    /// Remembers a chain's total on the writer (readers remember nothing); returns it.
    fn remember_chain(&mut self, chain: &str, total: u64) -> u64 {
        if let Some(memory) = self.memory.as_deref_mut() {
            remember(&mut memory.chains, chain.to_owned(), total);
        }
        total
    }

    /// Changes the subscriptions' version, which every host's routing cache checks.
    fn bump_subscriptions(&mut self) -> Result<()> {
        // Forgotten before the write: if this write is rolled back, the next read asks again.
        if let Some(memory) = self.memory.as_deref_mut() {
            memory.version = None;
        }
        self.conn
            .prepare_cached(
                "INSERT INTO meta (key, value) VALUES ('subscriptions_version', ?1) \
                 ON CONFLICT (key) DO UPDATE SET value = ?1",
            )
            .db()?
            // Random, not a counter: a version written by a batch that was rolled back must
            // never be written again for different subscriptions.
            .execute([fastrand::u64(1..).to_string()])
            .db()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::{REMEMBERED, RecordRanges};

    #[test]
    fn record_ranges_know_only_what_was_inserted_into_each_sheet() {
        let mut r = RecordRanges::default();
        for rowid in 10..=14 {
            r.inserted(1, rowid, rowid);
        }
        r.inserted(2, 15, 15);
        r.inserted(1, 16, 16);
        assert_eq!(r.sheets[&1], [(10, 14), (16, 16)], "a batch is one run; a rowid past a gap starts one");
        assert!([10, 12, 14, 16].iter().all(|&id| r.contains(1, id)));
        assert!([9, 15, 17].iter().all(|&id| !r.contains(1, id)), "not known is not a record of the sheet");
        assert!(r.contains(2, 15) && !r.contains(2, 14) && !r.contains(3, 15));

        // A rowid at or below a sheet's last run (SQLite past the highest rowid) is not kept.
        r.inserted(1, 12, 12);
        r.inserted(1, 5, 5);
        assert!(!r.contains(1, 5));
        assert_eq!(r.runs, 3);

        r.forget_sheet(1);
        assert!(!r.contains(1, 10) && r.contains(2, 15));
        assert_eq!(r.runs, 1);
        r.forget();
        assert!(!r.contains(2, 15));
        assert_eq!(r.runs, 0);

        // Past the highest rowid SQLite can give, the next is chosen at random, below it.
        r.inserted(3, i64::MAX, i64::MAX);
        r.inserted(3, 7, 7);
        assert!(r.contains(3, i64::MAX) && !r.contains(3, 7));
    }

    #[test]
    fn record_ranges_stay_bounded() {
        let mut r = RecordRanges::default();
        // Every other rowid: a run each.
        for i in 0..REMEMBERED as i64 {
            r.inserted(i % 7, i * 2, i * 2);
        }
        assert_eq!(r.runs, REMEMBERED);
        r.inserted(99, 1_000_000, 1_000_000);
        assert_eq!(r.runs, 1, "past the bound, everything is forgotten and the new run kept");
        assert!(r.contains(99, 1_000_000) && !r.contains(0, 0));
    }
}
