//! The store boundary: everything the engine persists goes through [`Backend`].
//!
//! The engine's rules (which transition is allowed, which events it writes, when
//! `job:parts-completed` fires) are written once, in [`crate::engine`], against the [`ReadTx`] and
//! [`Tx`] traits. A backend supplies the primitives and one guarantee: a write closure runs
//! inside a serializable transaction and is atomic — if it returns an error, nothing it did is
//! kept, while the other closures committed with it are unaffected. [`sqlite`] is the embedded
//! default; a PostgreSQL backend is a second implementation of these traits (row locks on the
//! job row replace SQLite's single writer), not a rewrite of the engine.

pub mod sqlite;

use std::sync::Arc;

use serde_json::{Map, Value};
use tokio::sync::Notify;

use crate::error::Result;
use crate::model::{
    ApiToken, DeadLetter, Environment, Event, Execution, Job, JobStatus, Message, Millis, RecordCounts, Sheet,
};

/// A subscription as stored: who wants which events of one environment.
#[derive(Debug, Clone, PartialEq)]
pub struct Subscription {
    /// Stable id chosen by the subscriber (`listener-name#0`); re-registering upserts.
    pub id: String,
    /// The environment whose events it receives.
    pub environment_id: String,
    /// Topic pattern.
    pub topic: String,
    /// Filter object (`null` for none).
    pub filter: Value,
}

/// A delivery handed to a subscriber under a lease.
#[derive(Debug, Clone)]
pub struct Leased {
    /// Delivery id.
    pub delivery_id: i64,
    /// The subscription it is for.
    pub subscription_id: String,
    /// 1-based attempt number of this lease.
    pub attempt: u32,
    /// The event.
    pub event: Event,
}

/// Delivery bookkeeping the engine hands to the store.
#[derive(Debug, Clone, Copy)]
pub struct DeliveryPolicy {
    /// How long a lease lasts before the delivery is handed out again.
    pub lease_ms: i64,
    /// Attempts before a delivery is dead-lettered.
    pub max_attempts: u32,
    /// Delay before a failed attempt is retried (doubles per attempt).
    pub backoff_ms: i64,
}

/// Delivery counts by status, for observability and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DeliveryStats {
    /// Waiting to be leased (possibly backing off).
    pub pending: u64,
    /// Leased to a subscriber right now.
    pub leased: u64,
    /// Finished successfully.
    pub done: u64,
    /// Attempts exhausted.
    pub dead: u64,
}

/// Part statuses of a parent, counted from the parts themselves.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PartStatusCounts {
    /// All parts.
    pub total: u64,
    /// `complete` parts.
    pub completed: u64,
    /// `failed` parts.
    pub failed: u64,
    /// `canceled` parts.
    pub canceled: u64,
    /// `ready` or `executing` parts.
    pub active: u64,
}

impl PartStatusCounts {
    /// Parts not yet terminal.
    pub fn open(&self) -> u64 {
        self.total - self.completed - self.failed - self.canceled
    }
}

/// A record's stored values and messages, for read-modify-write updates.
#[derive(Debug, Clone)]
pub struct StoredRecord {
    /// Field → value.
    pub values: Map<String, Value>,
    /// All messages.
    pub messages: Vec<Message>,
}

/// A record encoded for storage, prepared off the writer.
#[derive(Debug, Clone)]
pub struct EncodedRecord {
    /// JSON object of values.
    pub values: String,
    /// JSON array of messages, `None` when empty.
    pub messages: Option<String>,
    /// JSON metadata, `None` when null.
    pub metadata: Option<String>,
    /// Whether any message is an error.
    pub has_error: bool,
}

/// How the watchdog finds overdue jobs.
#[derive(Debug, Clone, Copy)]
pub struct Overdue {
    /// `ready` jobs that became ready before this are un-acked.
    pub ready_before: Option<Millis>,
    /// `executing` jobs with no activity since this are stale (unless a per-job timeout says otherwise).
    pub now: Millis,
    /// The engine-wide stale timeout.
    pub stale_ms: Option<i64>,
}

/// Read primitives. Reads see only committed data.
pub trait ReadTx {
    /// Execution records of an environment (optionally of one job), oldest first.
    fn executions(&mut self, env: &str, job_id: Option<&str>, limit: u32) -> Result<Vec<Execution>>;
    /// An environment by id.
    fn environment(&mut self, id: &str) -> Result<Option<Environment>>;
    /// The oldest environment with this name.
    fn environment_named(&mut self, name: &str) -> Result<Option<Environment>>;
    /// A sheet of an environment.
    fn sheet(&mut self, env: &str, id: &str) -> Result<Option<Sheet>>;
    /// Record counts of a sheet.
    fn record_counts(&mut self, sheet_id: &str) -> Result<RecordCounts>;
    /// Raw rows of one page (`offset` by stable order, at most `limit`): `(rowid, values, messages, metadata)`.
    fn record_rows(&mut self, sheet_id: &str, offset: u64, limit: u32) -> Result<Vec<RawRecord>>;
    /// A job of an environment.
    fn job(&mut self, env: &str, id: &str) -> Result<Option<Job>>;
    /// Jobs of an environment, optionally only the parts of `parent`, oldest first.
    fn jobs(&mut self, env: &str, parent: Option<&str>, offset: u64, limit: u32) -> Result<Vec<Job>>;
    /// Events of an environment after the cursor `after_seq`, oldest first.
    fn events(&mut self, env: &str, after_seq: i64, limit: u32) -> Result<Vec<Event>>;
    /// Events of one job, oldest first.
    fn job_events(&mut self, env: &str, job_id: &str) -> Result<Vec<Event>>;
    /// Dead-lettered deliveries of an environment.
    fn dead_letters(&mut self, env: &str) -> Result<Vec<DeadLetter>>;
    /// Delivery counts (all environments).
    fn delivery_stats(&mut self) -> Result<DeliveryStats>;
    /// Jobs per status (all environments).
    fn job_status_counts(&mut self) -> Result<Vec<(String, u64)>>;
    /// Plugin deliveries per outcome: count and total duration in µs (all environments).
    fn execution_stats(&mut self) -> Result<Vec<(String, u64, u64)>>;
    /// Earliest time a pending or leased delivery of these subscriptions becomes due.
    fn next_delivery_due(&mut self, subscriptions: &[String]) -> Result<Option<Millis>>;
    /// Every environment, oldest first.
    fn environments(&mut self) -> Result<Vec<Environment>>;
    /// The API token whose SHA-256 is `hash`.
    fn token(&mut self, hash: &str) -> Result<Option<ApiToken>>;
    /// The API tokens of an environment (never the tokens themselves).
    fn tokens(&mut self, env: &str) -> Result<Vec<ApiToken>>;
    /// A secret of an environment.
    fn secret(&mut self, env: &str, name: &str) -> Result<Option<String>>;
    /// Names of an environment's secrets, sorted.
    fn secret_names(&mut self, env: &str) -> Result<Vec<String>>;
}

/// One stored record row.
#[derive(Debug, Clone)]
pub struct RawRecord {
    /// Row id (`rec_<rowid>` publicly).
    pub rowid: i64,
    /// JSON values.
    pub values: String,
    /// JSON messages.
    pub messages: Option<String>,
    /// JSON metadata.
    pub metadata: Option<String>,
}

/// Write primitives, always inside a transaction.
pub trait Tx: ReadTx {
    /// Stores an execution record; returns its id.
    fn insert_execution(&mut self, execution: &Execution) -> Result<i64>;
    /// Stores an API token under its hash.
    fn insert_token(&mut self, hash: &str, token: &ApiToken) -> Result<()>;
    /// Deletes an API token of an environment; false when there was none.
    fn delete_token(&mut self, env: &str, id: &str) -> Result<bool>;
    /// Adds `events` to a chain's count (the loop guard); returns the new total.
    fn charge_chain(&mut self, chain: &str, events: u64, now: Millis) -> Result<u64>;
    /// Stores a secret, or deletes it with `None` (not-found when there was none).
    fn put_secret(&mut self, env: &str, name: &str, value: Option<&str>, now: Millis) -> Result<()>;
    /// Stores a new environment.
    fn insert_environment(&mut self, env: &Environment) -> Result<()>;
    /// Stores a new sheet.
    fn insert_sheet(&mut self, sheet: &Sheet) -> Result<()>;
    /// Appends records to a sheet in order; returns how many.
    fn insert_records(
        &mut self,
        sheet_id: &str,
        records: &mut dyn Iterator<Item = EncodedRecord>,
        now: Millis,
    ) -> Result<u64>;
    /// Reads a record of a sheet for update.
    fn stored_record(&mut self, sheet_id: &str, rowid: i64) -> Result<Option<StoredRecord>>;
    /// Replaces only a record's messages (values untouched); false when the record is not in the sheet.
    fn write_record_messages(
        &mut self,
        sheet_id: &str,
        rowid: i64,
        messages: Option<&str>,
        has_error: bool,
        now: Millis,
    ) -> Result<bool>;
    /// Overwrites a record's values and messages.
    fn write_record(&mut self, rowid: i64, record: &EncodedRecord, now: Millis) -> Result<()>;
    /// Deletes records of a sheet by rowid and closes the gaps in the sheet's dense order, so
    /// pages stay range scans. Returns the first rowid not in the sheet (nothing deleted then).
    fn delete_records(&mut self, sheet_id: &str, rowids: &[i64]) -> Result<Option<i64>>;
    /// Stores a new job (and its predecessor links).
    fn insert_job(&mut self, job: &Job) -> Result<()>;
    /// Overwrites a job's mutable fields.
    fn update_job(&mut self, job: &Job) -> Result<()>;
    /// Counts a parent's parts by status.
    fn part_counts(&mut self, parent_id: &str) -> Result<PartStatusCounts>;
    /// A parent's parts in the given statuses, by part index.
    fn parts_in(&mut self, parent_id: &str, statuses: &[JobStatus]) -> Result<Vec<Job>>;
    /// `waiting` jobs that name `predecessor_id` among their predecessors.
    fn waiting_dependents(&mut self, predecessor_id: &str) -> Result<Vec<Job>>;
    /// Statuses of a job's predecessors.
    fn predecessor_statuses(&mut self, job: &Job) -> Result<Vec<(String, JobStatus)>>;
    /// Jobs the watchdog or scheduler must act on now.
    fn overdue_jobs(&mut self, overdue: Overdue, limit: u32) -> Result<Vec<Job>>;
    /// Stores an event and fans it out to every matching active subscription as a pending
    /// delivery, in this transaction.
    fn insert_event(&mut self, event: &Event) -> Result<i64>;
    /// Adds or replaces a subscription; `active: false` stops new fan-out (pending deliveries stay).
    fn put_subscription(&mut self, sub: &Subscription, active: bool, now: Millis) -> Result<()>;
    /// Turns fan-out to an existing subscription on or off (its pending deliveries stay).
    fn set_subscription_active(&mut self, id: &str, active: bool, now: Millis) -> Result<()>;
    /// Leases up to `limit` due deliveries of these subscriptions to `owner`, oldest due first,
    /// each only if `admit` accepts its subscription. Deliveries whose lease expired with no
    /// attempts left are dead-lettered instead.
    fn lease_deliveries(
        &mut self,
        subscriptions: &[String],
        owner: &str,
        now: Millis,
        limit: u32,
        policy: DeliveryPolicy,
        admit: &mut dyn FnMut(&str) -> bool,
    ) -> Result<Vec<Leased>>;
    /// Ends the lease of attempt `attempt`: done on `Ok`, retried or dead-lettered on `Err`.
    /// A lease that is no longer current (expired and re-leased) is left alone.
    fn finish_delivery(
        &mut self,
        delivery_id: i64,
        attempt: u32,
        result: std::result::Result<(), String>,
        now: Millis,
        policy: DeliveryPolicy,
    ) -> Result<bool>;
    /// Hands a leased delivery back: pending and due now, its attempt not counted. A lease that
    /// is no longer current is left alone.
    fn release_delivery(&mut self, delivery_id: i64, attempt: u32, now: Millis) -> Result<bool>;
    /// Makes every delivery leased by `owner` due now (its previous process is gone).
    fn reclaim_leases(&mut self, owner: &str, now: Millis) -> Result<u64>;
}

/// A boxed write closure: runs on the store's writer, returns whether to keep its changes and
/// a reply to send once the transaction's fate is known.
pub type WriteOp = Box<dyn FnOnce(&mut dyn Tx) -> (bool, Reply) + Send>;
/// A boxed read closure.
pub type ReadOp = Box<dyn FnOnce(&mut dyn ReadTx) + Send>;
/// Called with the commit result after the batch a write was in has committed (or failed).
pub type Reply = Box<dyn FnOnce(Result<()>) + Send>;

/// A storage backend.
pub trait Backend: Send + Sync + 'static {
    /// Queues a write. Writes may be committed together (group commit) but each is atomic on its own.
    fn submit_write(&self, op: WriteOp);
    /// Runs a read off the async runtime.
    fn submit_read(&self, op: ReadOp);
    /// Signalled after a commit that added due deliveries.
    fn deliveries_signal(&self) -> Arc<Notify>;
    /// A stable id of this host for lease ownership.
    fn host_id(&self) -> &str;
    /// Counts commits; changes after every committed write batch (for waiting on state).
    fn commits(&self) -> tokio::sync::watch::Receiver<u64>;
}

/// Typed helpers over a [`Backend`].
#[derive(Clone)]
pub struct Store {
    backend: Arc<dyn Backend>,
}

impl Store {
    /// Wraps a backend.
    pub fn new(backend: Arc<dyn Backend>) -> Self {
        Self { backend }
    }

    /// The backend.
    pub fn backend(&self) -> &Arc<dyn Backend> {
        &self.backend
    }

    /// Runs `f` in a write transaction and returns its result once committed.
    pub async fn write<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut dyn Tx) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.backend.submit_write(Box::new(move |t: &mut dyn Tx| {
            let result = f(t);
            let keep = result.is_ok();
            let reply: Reply = Box::new(move |commit: Result<()>| {
                let _ = tx.send(commit.and(result));
            });
            (keep, reply)
        }));
        rx.await.unwrap_or_else(|_| Err(crate::error::Error::Store("the store's writer stopped".into())))
    }

    /// Runs `f` against committed data.
    pub async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut dyn ReadTx) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.backend.submit_read(Box::new(move |r: &mut dyn ReadTx| {
            let _ = tx.send(f(r));
        }));
        rx.await.unwrap_or_else(|_| Err(crate::error::Error::Store("the store's reader stopped".into())))
    }
}
