//! The PostgreSQL backend: many jobhost hosts on one database.
//!
//! Layout:
//! - `lib.rs`: [`PgOptions`], [`PgBackend::open`], the [`Backend`] implementation, errors.
//! - `schema.rs`: numbered migrations, run once under an advisory lock.
//! - `workers.rs`: the writer, reader and notifier threads, each with its own connection.
//! - `conn.rs`: the store's [`ReadTx`](jobhost_store::ReadTx) and [`Tx`](jobhost_store::Tx)
//!   over one transaction.
//!
//! How the store's promises hold with many processes on one database:
//!
//! * **Writes**: a few writer threads per host, each with its own connection, take queued
//!   write closures in small batches: one transaction per batch, each closure in its own
//!   savepoint (group commit, as SQLite's writer does). A closure that fails is rolled back to
//!   its savepoint; a serialization failure, deadlock or lost connection before `COMMIT` is a
//!   retryable error, so [`Store::write`](jobhost_store::Store::write) runs the closure again.
//! * **Locks**: `READ COMMITTED` with the locks stated by the traits: `job_for_update` locks a
//!   part's parent, then the part (`SELECT … FOR UPDATE`); `parts_in` locks parts by index;
//!   `due_deliveries` uses `FOR UPDATE SKIP LOCKED`, so hosts leasing at once never wait on
//!   each other. Because every part's end locks its parent first, the counts read for
//!   `job:parts-completed` are exact and it fires once across hosts.
//! * **Event order**: an event's sequence number is given at commit, by a deferred trigger
//!   that holds one counter row's lock from there to the end of the commit, so sequence
//!   numbers follow commit order and a reader following a stream by sequence never skips an
//!   event committed late; only the last moment of each commit waits for another's.
//! * **Wake-ups**: `LISTEN`/`NOTIFY` as a hint, coalesced to at most a few per second per
//!   channel, with a poll every [`PgOptions::poll_interval`] behind it.
//! * **Not exclusive**: other hosts may be alive; their leases are reclaimed only when their
//!   heartbeats stop (the engine's watchdog).

mod conn;
mod schema;
mod workers;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use tokio::sync::Notify;

use jobhost_core::error::{Error, Result, StoreError};
use jobhost_store::{Backend, Health, Notifications, ReadOp, WriteOp, WriteStats};

pub use schema::SCHEMA_VERSION;

/// Options of the PostgreSQL backend.
#[derive(Debug, Clone)]
pub struct PgOptions {
    /// Connection URL (`postgres://user:password@host:port/database`) or key-value string.
    pub url: String,
    /// Writer connections (threads) of this host.
    pub writers: usize,
    /// Reader connections (threads) of this host.
    pub readers: usize,
    /// Most write closures committed together in one transaction.
    pub max_batch: usize,
    /// How often waiters look for work when no notification came: the most a lost
    /// notification delays work.
    pub poll_interval: Duration,
}

impl PgOptions {
    /// Defaults for a database URL.
    pub fn new(url: impl Into<String>) -> Self {
        Self { url: url.into(), writers: 4, readers: 4, max_batch: 64, poll_interval: Duration::from_secs(1) }
    }
}

/// A PostgreSQL failure as the store's error: serialization failures, deadlocks, lock
/// timeouts and lost connections may clear on a retry.
pub(crate) fn db_error(e: postgres::Error) -> Error {
    use postgres::error::SqlState;
    let retryable = e.is_closed()
        || e.code().is_some_and(|c| {
            [
                SqlState::T_R_SERIALIZATION_FAILURE,
                SqlState::T_R_DEADLOCK_DETECTED,
                SqlState::LOCK_NOT_AVAILABLE,
                SqlState::ADMIN_SHUTDOWN,
                SqlState::CRASH_SHUTDOWN,
                SqlState::CANNOT_CONNECT_NOW,
                SqlState::CONNECTION_FAILURE,
                SqlState::CONNECTION_EXCEPTION,
                // A statement after another failed in the same transaction: the whole
                // transaction is rolled back, so running the write again is safe.
                SqlState::IN_FAILED_SQL_TRANSACTION,
            ]
            .contains(c)
        })
        || std::error::Error::source(&e).is_some_and(|s| s.is::<std::io::Error>());
    Error::Store(StoreError::caused_by("PostgreSQL", e).retryable(retryable))
}

/// `.db()?` turns a PostgreSQL result into the store's.
pub(crate) trait Db<T> {
    fn db(self) -> Result<T>;
}

impl<T> Db<T> for std::result::Result<T, postgres::Error> {
    fn db(self) -> Result<T> {
        self.map_err(db_error)
    }
}

/// What the backend's threads share.
pub(crate) struct Shared {
    pub config: postgres::Config,
    pub stop: AtomicBool,
    /// Set by a writer after a commit; the notifier sends one `NOTIFY` for many.
    pub notify_deliveries: AtomicBool,
    pub notify_commits: AtomicBool,
    pub signal: Arc<Notify>,
    pub commits: tokio::sync::watch::Sender<u64>,
    /// This backend's id in `NOTIFY` payloads, so it ignores its own.
    pub instance: String,
    pub poll_interval: Duration,
    pub health: Mutex<Health>,
    /// Counts the losses any thread saw: a connection older than the last one is checked
    /// before it is used.
    pub outages: std::sync::atomic::AtomicU64,
    /// Whether the notifier is listening for the other hosts' notifications.
    pub listening: tokio::sync::watch::Sender<bool>,
    /// The database's schema version when the notifier's poll found it newer than this build
    /// knows (0 otherwise): a newer jobhost migrated it, and this host stops writing.
    pub newer_schema: std::sync::atomic::AtomicI64,
    /// What the writers committed (rows are not counted here).
    pub written: jobhost_store::WriteCounters,
}

impl Shared {
    /// Wakes this process's waiters: the delivery loop and everything waiting on a commit.
    pub fn wake(&self, deliveries: bool) {
        if deliveries {
            self.signal.notify_waiters();
            self.signal.notify_one();
        }
        self.commits.send_modify(|n| *n += 1);
    }

    /// A new connection with this backend's settings; `again` when it replaces a lost one.
    pub fn connect(&self, again: bool) -> Result<postgres::Client> {
        // Custom plans only: a generic plan cached while the tables were small (a fresh
        // database, statistics not yet gathered) would stay, e.g. scanning a whole
        // environment's jobs for a lookup by primary key.
        let connected = self.config.connect(postgres::NoTls).and_then(|mut c| {
            c.batch_execute("SET plan_cache_mode = force_custom_plan")?;
            Ok(c)
        });
        match connected {
            Ok(c) => {
                if let Ok(mut h) = self.health.lock() {
                    h.error = None;
                    h.reconnects += u64::from(again);
                }
                Ok(c)
            }
            Err(e) => {
                self.lost(&e.to_string());
                Err(db_error(e))
            }
        }
    }

    /// Why this host no longer writes, once a newer jobhost migrated the database.
    pub fn refusal(&self) -> Option<String> {
        let newer = self.newer_schema.load(Ordering::SeqCst);
        (newer > 0).then(|| {
            format!(
                "the database was migrated to jobhost schema version {newer} by a newer jobhost; this host knows \
                 version {SCHEMA_VERSION} and no longer writes: stop it and start the new version"
            )
        })
    }

    /// Records that a connection was lost or could not be made.
    pub fn lost(&self, error: &str) {
        self.outages.fetch_add(1, Ordering::SeqCst);
        if let Ok(mut h) = self.health.lock() {
            h.error = Some(error.to_owned());
        }
    }
}

/// The PostgreSQL backend. Dropping it finishes queued writes and closes its connections.
pub struct PgBackend {
    writes: Mutex<Option<Sender<WriteOp>>>,
    reads: Mutex<Option<Sender<ReadOp>>>,
    shared: Arc<Shared>,
    commits: tokio::sync::watch::Receiver<u64>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl std::fmt::Debug for PgBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgBackend")
            .field("host", &self.shared.config.get_hosts())
            .field("database", &self.shared.config.get_dbname())
            .finish_non_exhaustive()
    }
}

impl PgBackend {
    /// Connects, migrates the schema (refusing a newer one) and starts the threads.
    pub fn open(options: PgOptions) -> Result<Self> {
        let mut config: postgres::Config =
            options.url.parse().map_err(|e| StoreError::caused_by("invalid PostgreSQL connection URL", e))?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(Duration::from_secs(10));
        }
        if config.get_application_name().is_none() {
            config.application_name("jobhost");
        }
        // The synchronous client runs a runtime of its own: never on the caller's, which may
        // be a tokio worker.
        let migrate_config = config.clone();
        std::thread::spawn(move || -> Result<()> {
            let mut client = migrate_config
                .connect(postgres::NoTls)
                .map_err(|e| StoreError::caused_by("cannot connect to PostgreSQL", e))?;
            schema::migrate(&mut client)
        })
        .join()
        .map_err(|_| Error::store("the PostgreSQL migration thread panicked"))??;

        let (commits_tx, commits) = tokio::sync::watch::channel(0u64);
        let shared = Arc::new(Shared {
            config,
            stop: AtomicBool::new(false),
            notify_deliveries: AtomicBool::new(false),
            notify_commits: AtomicBool::new(false),
            signal: Arc::new(Notify::new()),
            commits: commits_tx,
            instance: format!("{:016x}", fastrand::u64(..)),
            poll_interval: options.poll_interval.max(Duration::from_millis(10)),
            health: Mutex::new(Health::default()),
            outages: std::sync::atomic::AtomicU64::new(0),
            listening: tokio::sync::watch::Sender::new(false),
            newer_schema: std::sync::atomic::AtomicI64::new(0),
            written: Default::default(),
        });
        let (writes, write_rx) = std::sync::mpsc::channel::<WriteOp>();
        let (reads, read_rx) = std::sync::mpsc::channel::<ReadOp>();
        let write_rx = Arc::new(Mutex::new(write_rx));
        let read_rx = Arc::new(Mutex::new(read_rx));
        let mut threads = Vec::new();
        let spawn = |name: String, f: Box<dyn FnOnce() + Send>| {
            std::thread::Builder::new()
                .name(name)
                .spawn(f)
                .map_err(|e| Error::Store(StoreError::caused_by("cannot start a store thread", e)))
        };
        for i in 0..options.writers.max(1) {
            let (s, rx, max_batch) = (shared.clone(), write_rx.clone(), options.max_batch.max(1));
            threads.push(spawn(
                format!("jobhost-pg-writer-{i}"),
                Box::new(move || workers::writer_loop(&s, &rx, max_batch)),
            )?);
        }
        for i in 0..options.readers.max(1) {
            let (s, rx) = (shared.clone(), read_rx.clone());
            threads.push(spawn(format!("jobhost-pg-reader-{i}"), Box::new(move || workers::reader_loop(&s, &rx)))?);
        }
        let s = shared.clone();
        threads.push(spawn("jobhost-pg-notifier".into(), Box::new(move || workers::notifier_loop(&s)))?);
        Ok(Self {
            writes: Mutex::new(Some(writes)),
            reads: Mutex::new(Some(reads)),
            shared,
            commits,
            threads: Mutex::new(threads),
        })
    }

    /// Waits until this host listens for the other hosts' notifications (it polls until then).
    pub async fn until_listening(&self) {
        let mut rx = self.shared.listening.subscribe();
        let _ = rx.wait_for(|l| *l).await;
    }
}

impl Drop for PgBackend {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        // Closing the channels lets the threads drain what is queued and exit.
        if let Ok(mut w) = self.writes.lock() {
            w.take();
        }
        if let Ok(mut r) = self.reads.lock() {
            r.take();
        }
        let threads = self.threads.lock().map(|mut t| std::mem::take(&mut *t)).unwrap_or_default();
        for t in threads {
            let _ = t.join();
        }
    }
}

impl Backend for PgBackend {
    fn submit_write(&self, op: WriteOp) {
        // If the writers are gone the op is dropped, and its caller sees an error.
        if let Ok(guard) = self.writes.lock()
            && let Some(tx) = guard.as_ref()
        {
            let _ = tx.send(op);
        }
    }

    fn submit_read(&self, op: ReadOp) {
        if let Ok(guard) = self.reads.lock()
            && let Some(tx) = guard.as_ref()
        {
            let _ = tx.send(op);
        }
    }

    fn notifications(&self) -> Notifications {
        Notifications { deliveries: self.shared.signal.clone(), commits: self.commits.clone() }
    }

    fn exclusive(&self) -> bool {
        false
    }

    fn write_stats(&self) -> WriteStats {
        self.shared.written.stats(false)
    }

    fn health(&self) -> Health {
        let mut health = self.shared.health.lock().map(|h| h.clone()).unwrap_or_default();
        if let Some(refusal) = self.shared.refusal() {
            health.error = Some(refusal);
        }
        health
    }
}
