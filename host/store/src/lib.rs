//! The store boundary: everything the engine persists goes through [`Backend`].
//!
//! The engine's rules (which transition is allowed, which events it writes, when
//! `job:parts-completed` fires, retry backoff, dead-lettering, routing of events to
//! subscriptions) are written once, in `jobhost-engine`, against the [`ReadTx`] and [`Tx`]
//! traits. A backend supplies the primitives and keeps these rules — the same whether one
//! process or a fleet of hosts uses the store:
//!
//! - **Atomic writes.** A write closure runs inside one transaction; if it returns an error,
//!   nothing it did is kept, while other closures committed with it are unaffected.
//! - **Retryable failures are marked.** A serialization failure, deadlock or busy database is
//!   returned as a [`StoreError`](jobhost_core::StoreError) with `retryable` set;
//!   [`Store::write`] then runs the write again.
//! - **Locks are stated.** [`Tx::job_for_update`], [`Tx::parts_in`] and
//!   [`Tx::due_deliveries`] lock what they return for the rest of the transaction. The engine
//!   takes them in one order — a part's parent before the part, parts by index — so two
//!   hosts never wait on each other in a cycle.
//! - **Leases are fenced.** A lease names its owner and attempt ([`Fence`]); ending a
//!   delivery with a fence that is no longer current changes nothing.
//! - **Hosts are registered** with a heartbeat ([`Tx::heartbeat`]); a host's identity
//!   belongs to its process, never to the database.
//! - **Notifications are hints** ([`Notifications`]): the engine polls behind them.
//!
//! `jobhost-store-sqlite` is the embedded default. Every backend runs the conformance suite
//! (`jobhost-engine`'s `conformance` feature) from its own tests.

use std::sync::Arc;

use serde_json::{Map, Value};
use tokio::sync::Notify;

use jobhost_core::error::{Error, Result};
use jobhost_core::model::{
    ApiToken, DeadLetter, Environment, Event, Execution, Job, JobStatus, JobType, Message, Millis, OpenDelivery,
    RecordCounts, Sheet,
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
    /// The lease's owner and attempt; ending the delivery must present it.
    pub fence: Fence,
    /// The event.
    pub event: Event,
}

impl Leased {
    /// 1-based attempt number of this lease.
    pub fn attempt(&self) -> u32 {
        self.fence.attempt
    }
}

/// Who holds a lease and which attempt it is: the fence every end of a delivery must pass.
///
/// A lease that expired and was handed to another host has a new owner and a higher attempt,
/// so a late end from the old holder matches no row and changes nothing.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Fence {
    /// The host that holds the lease.
    pub owner: String,
    /// 1-based attempt number of the lease.
    pub attempt: u32,
}

/// A due delivery found by [`Tx::due_deliveries`], locked for this transaction.
#[derive(Debug, Clone)]
pub struct DueDelivery {
    /// Delivery id.
    pub delivery_id: i64,
    /// The subscription it is for.
    pub subscription_id: String,
    /// Attempts spent so far (a lease that expired counts as one).
    pub attempts: u32,
    /// The error of the last failed attempt, if any.
    pub last_error: Option<String>,
    /// The event.
    pub event: Event,
}

/// How a delivery ends, decided by the engine's rules (retry backoff, dead-lettering).
#[derive(Debug, Clone, PartialEq)]
pub enum DeliveryEnd {
    /// Handled.
    Done,
    /// Failed; pending again from `due_at`.
    Retry {
        /// When it may be leased again.
        due_at: Millis,
        /// Why the attempt failed.
        error: String,
    },
    /// Failed for good: dead-lettered with `error`.
    Dead {
        /// Why.
        error: String,
    },
}

/// A host of the fleet as registered in the store.
#[derive(Debug, Clone, PartialEq)]
pub struct HostRecord {
    /// The host's id, fresh per process start.
    pub id: String,
    /// Host name and process id, for operators.
    pub label: String,
    /// When the process registered.
    pub started_at: Millis,
    /// Its last heartbeat.
    pub heartbeat_at: Millis,
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

/// A table of history that the retention sweep prunes (see [`Tx::history`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum History {
    /// Events, in the order they were written (SQLite: `seq`; PostgreSQL: `key`).
    Events,
    /// Deliveries, by id.
    Deliveries,
    /// Execution records, by id.
    Executions,
}

impl History {
    /// The table's name, for metrics and messages.
    pub fn name(self) -> &'static str {
        match self {
            Self::Events => "events",
            Self::Deliveries => "deliveries",
            Self::Executions => "executions",
        }
    }
}

/// One row of a [`History`] table as the retention sweep sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HistoryRow {
    /// Its key in the table's order (what [`Tx::delete_history`] takes).
    pub key: i64,
    /// When it became history: an event's creation, a done delivery's end, an execution's
    /// start. `None` for a row that is not history yet (a delivery not done).
    pub at: Option<Millis>,
    /// An event a delivery not done still points at (pending, leased or dead): kept whatever
    /// its age, so a dead letter can be retried.
    pub in_use: bool,
}

/// How large the store is, for `/metrics`: cheap to read (no table scans).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StoreSize {
    /// Bytes the database takes (SQLite: the main file's pages; PostgreSQL: the database).
    pub bytes: u64,
    /// Rows per table: SQLite's are exact for the small tables and the span of keys kept for
    /// events, deliveries and executions (an upper bound); PostgreSQL's are its planner's
    /// estimates.
    pub rows: Vec<(&'static str, u64)>,
}

/// A secret as the store holds it: the value is sealed by the engine before it is written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredSecret {
    /// The environment.
    pub environment_id: String,
    /// The secret's name.
    pub name: String,
    /// The stored (sealed) value.
    pub value: String,
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
    /// The same page as [`record_rows`](Self::record_rows), handed to `sink` as text borrowed
    /// from the store's own buffers: every row in stable order, then the messages of each row
    /// that has any. A reader that turns rows into its own shape skips a `String` per row. The
    /// default reads [`record_rows`](Self::record_rows); a backend may stream instead.
    fn visit_record_rows(&mut self, sheet_id: &str, offset: u64, limit: u32, sink: &mut dyn RowSink) -> Result<()> {
        let rows = self.record_rows(sheet_id, offset, limit)?;
        for row in &rows {
            sink.row(row.rowid, &row.values, row.metadata.as_deref())?;
        }
        for (at, row) in rows.iter().enumerate() {
            if let Some(messages) = &row.messages {
                sink.messages(at, messages)?;
            }
        }
        Ok(())
    }
    /// A job of an environment.
    fn job(&mut self, env: &str, id: &str) -> Result<Option<Job>>;
    /// Jobs of an environment, optionally only the parts of `parent`, oldest first.
    fn jobs(&mut self, env: &str, parent: Option<&str>, offset: u64, limit: u32) -> Result<Vec<Job>>;
    /// Jobs of an environment that match `query`: newest first, or by part index when
    /// `query.parent` is set.
    fn find_jobs(&mut self, env: &str, query: &JobQuery, offset: u64, limit: u32) -> Result<Vec<Job>>;
    /// How many jobs match `query` (its `statuses` ignored), per status, in status order.
    fn count_jobs(&mut self, env: &str, query: &JobQuery) -> Result<Vec<(JobStatus, u64)>>;
    /// The statuses of a job's parts, by part index (a part grid reads 10,000 in one go).
    fn part_statuses(&mut self, env: &str, parent: &str) -> Result<Vec<JobStatus>>;
    /// Sheets of an environment, newest first.
    fn sheets(&mut self, env: &str, offset: u64, limit: u32) -> Result<Vec<Sheet>>;
    /// Events of an environment after the cursor `after_seq`, oldest first.
    fn events(&mut self, env: &str, after_seq: i64, limit: u32) -> Result<Vec<Event>>;
    /// The `seq` of the environment's newest event (0 when it has none): where a stream that
    /// wants only what happens from now on starts.
    fn last_event_seq(&mut self, env: &str) -> Result<i64>;
    /// Events of one job, oldest first.
    fn job_events(&mut self, env: &str, job_id: &str) -> Result<Vec<Event>>;
    /// Dead-lettered deliveries of an environment.
    fn dead_letters(&mut self, env: &str) -> Result<Vec<DeadLetter>>;
    /// The deliveries of a job's events that have not finished (pending, leased or dead),
    /// by delivery id. Reads the open and the dead deliveries, never the finished ones.
    fn open_deliveries(&mut self, env: &str, job_id: &str) -> Result<Vec<OpenDelivery>>;
    /// Delivery counts (all environments).
    fn delivery_stats(&mut self) -> Result<DeliveryStats>;
    /// Delivery counts of the deliveries not done (all environments), read through the open
    /// and dead deliveries' indexes: `done` is 0. For `/metrics`, which must not scan history.
    fn open_delivery_stats(&mut self) -> Result<DeliveryStats>;
    /// The store's size, without scanning tables.
    fn size(&mut self) -> Result<StoreSize>;
    /// Jobs per status (all environments).
    fn job_status_counts(&mut self) -> Result<Vec<(String, u64)>>;
    /// Plugin deliveries per outcome: count and total duration in µs (all environments).
    fn execution_stats(&mut self) -> Result<Vec<(String, u64, u64)>>;
    /// Earliest time a pending or leased delivery of these subscriptions becomes due.
    fn next_delivery_due(&mut self, subscriptions: &[String]) -> Result<Option<Millis>>;
    /// A value that changes whenever a subscription is added, changed, turned on or off, by
    /// any process, and is never used twice (not even after a rollback): the engine's routing
    /// cache is valid while it stays the same.
    fn subscriptions_version(&mut self) -> Result<u64>;
    /// Every active subscription, by id.
    fn active_subscriptions(&mut self) -> Result<Vec<Subscription>>;
    /// The hosts registered in the store.
    fn hosts(&mut self) -> Result<Vec<HostRecord>>;
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
    /// Every secret of every environment as stored (sealed), by environment and name: for
    /// sealing and re-sealing them all under a key.
    fn all_secrets(&mut self) -> Result<Vec<StoredSecret>>;
    /// Plugin deployments after `after_seq`, oldest first (a shared store keeps plugins; an
    /// embedded one leaves them to the plugins directory and refuses).
    fn deployments(&mut self, _after_seq: i64, _limit: u32) -> Result<Vec<Deployment>> {
        Err(no_plugins())
    }
    /// The deployments of one plugin, oldest first.
    fn plugin_deployments(&mut self, _env: &str, _name: &str) -> Result<Vec<Deployment>> {
        Err(no_plugins())
    }
    /// A stored component by its content address.
    fn plugin_blob(&mut self, _version: &str) -> Result<Option<Vec<u8>>> {
        Err(no_plugins())
    }
}

/// A plugin deployment in a shared store: plugin `name` of an environment is `version` from
/// now on (`None`: deleted). Every host of a fleet follows them in `seq` order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Deployment {
    /// Order of the deployments (commit order: deployments are written one at a time).
    pub seq: i64,
    /// The environment.
    pub environment_id: String,
    /// The plugin's name.
    pub name: String,
    /// The component's SHA-256 (hex), its content address; `None` when the plugin was deleted.
    pub version: Option<String>,
    /// When.
    pub deployed_at: Millis,
}

fn no_plugins() -> Error {
    Error::store("this store does not keep plugins (plugins are files in the host's plugins directory)")
}

/// Which jobs a listing shows; every field left empty matches every job.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct JobQuery {
    /// Any of these statuses (none: any status).
    pub statuses: Vec<JobStatus>,
    /// Of this type.
    pub kind: Option<JobType>,
    /// With this operation.
    pub operation: Option<String>,
    /// Parts of this job only.
    pub parent: Option<String>,
    /// Jobs that are not parts only (ignored with `parent`).
    pub top_level: bool,
    /// Created at or after this.
    pub created_from: Option<Millis>,
    /// Created before this.
    pub created_before: Option<Millis>,
}

/// A value bound to a [`JobQuery`]'s condition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QueryValue {
    /// Text.
    Text(String),
    /// An integer.
    Int(i64),
}

impl JobQuery {
    /// The conditions after `environment_id = <first parameter>`, each starting with ` AND `,
    /// and the values they bind in order. `placeholder(n)` writes the n-th parameter (1-based;
    /// the environment is 1) in the backend's syntax. Columns are the `jobs` table's:
    /// `status`, `kind`, `operation`, `parent_id`, `created_at`.
    pub fn conditions(&self, placeholder: impl Fn(usize) -> String) -> (String, Vec<QueryValue>) {
        let mut sql = String::new();
        let mut values = Vec::new();
        let mut bind = |sql: &mut String, value: QueryValue| {
            values.push(value);
            sql.push_str(&placeholder(values.len() + 1));
        };
        if !self.statuses.is_empty() {
            sql.push_str(" AND status IN (");
            for (i, status) in self.statuses.iter().enumerate() {
                if i > 0 {
                    sql.push_str(", ");
                }
                bind(&mut sql, QueryValue::Text(status.as_str().to_owned()));
            }
            sql.push(')');
        }
        let mut equal = |sql: &mut String, column: &str, value: Option<QueryValue>| {
            if let Some(value) = value {
                sql.push_str(" AND ");
                sql.push_str(column);
                bind(sql, value);
            }
        };
        equal(&mut sql, "kind = ", self.kind.map(|k| QueryValue::Text(k.as_str().to_owned())));
        equal(&mut sql, "operation = ", self.operation.clone().map(QueryValue::Text));
        equal(&mut sql, "parent_id = ", self.parent.clone().map(QueryValue::Text));
        if self.top_level && self.parent.is_none() {
            sql.push_str(" AND parent_id IS NULL");
        }
        equal(&mut sql, "created_at >= ", self.created_from.map(QueryValue::Int));
        equal(&mut sql, "created_at < ", self.created_before.map(QueryValue::Int));
        (sql, values)
    }

    /// This query without its status filter (what [`ReadTx::count_jobs`] counts).
    pub fn any_status(&self) -> Self {
        Self { statuses: Vec::new(), ..self.clone() }
    }
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

/// Receives one page of stored rows from [`ReadTx::visit_record_rows`].
pub trait RowSink {
    /// The page's next row, in stable order: its id, its values' JSON and its metadata's.
    fn row(&mut self, rowid: i64, values: &str, metadata: Option<&str>) -> Result<()>;
    /// The stored messages' JSON of the row handed `at`-th to [`row`](Self::row) (from 0).
    /// Called after the last row, at most once per row, in any order, and only for rows that
    /// have messages.
    fn messages(&mut self, at: usize, messages: &str) -> Result<()>;
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
    /// Up to `limit` rows of `table` with keys above `after`, in key order (oldest first).
    /// `in_use` is only looked up for the events before the first one written at or after
    /// `before` (where the sweep's walk stops).
    fn history(&mut self, table: History, after: i64, before: Millis, limit: u32) -> Result<Vec<HistoryRow>>;
    /// Deletes these rows of `table` (a delivery only if it is done); returns how many went.
    fn delete_history(&mut self, table: History, keys: &[i64]) -> Result<u64>;
    /// Deletes up to `limit` loop-guard chains, with ids above `after` in id order, last
    /// charged before `before`; returns how many went and the last id looked at (`None` at
    /// the end of the table).
    fn prune_chains(&mut self, after: &str, before: Millis, limit: u32) -> Result<(u64, Option<String>)>;
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
    /// Replaces the messages of many records of a sheet, in order (a record named twice ends
    /// with its last messages): `(rowid, messages, has_error)`. Returns the first rowid not in
    /// the sheet (the caller then discards the write). A backend with round trips to a server
    /// overrides this with one statement.
    fn write_records_messages(
        &mut self,
        sheet_id: &str,
        records: &[(i64, Option<&str>, bool)],
        now: Millis,
    ) -> Result<Option<i64>> {
        for &(rowid, messages, has_error) in records {
            if !self.write_record_messages(sheet_id, rowid, messages, has_error, now)? {
                return Ok(Some(rowid));
            }
        }
        Ok(None)
    }
    /// Overwrites a record's values and messages.
    fn write_record(&mut self, rowid: i64, record: &EncodedRecord, now: Millis) -> Result<()>;
    /// Deletes records of a sheet by rowid and closes the gaps in the sheet's dense order, so
    /// pages stay range scans. Returns the first rowid not in the sheet (nothing deleted then).
    fn delete_records(&mut self, sheet_id: &str, rowids: &[i64]) -> Result<Option<i64>>;
    /// Stores a new job (and its predecessor links).
    fn insert_job(&mut self, job: &Job) -> Result<()>;
    /// A job of an environment, locked for the rest of this transaction (`SELECT … FOR
    /// UPDATE`); a part's parent is locked first. This is the one lock order of the engine:
    /// a parent before its parts, parts by part index.
    fn job_for_update(&mut self, env: &str, id: &str) -> Result<Option<Job>>;
    /// A job locked for this transaction without its parent: for a transition that cannot end
    /// a part (an ack, an execute, an outcome acknowledgement), so parts of one parent do not
    /// queue on the parent for those. The default locks the parent too.
    fn job_for_update_alone(&mut self, env: &str, id: &str) -> Result<Option<Job>> {
        self.job_for_update(env, id)
    }
    /// Overwrites a job's mutable fields. The job must have been locked by this transaction.
    fn update_job(&mut self, job: &Job) -> Result<()>;
    /// Counts a parent's parts by status (the parent is locked by the caller).
    fn part_counts(&mut self, parent_id: &str) -> Result<PartStatusCounts>;
    /// A parent's parts in the given statuses, by part index, locked for this transaction
    /// (the parent is locked by the caller first).
    fn parts_in(&mut self, parent_id: &str, statuses: &[JobStatus]) -> Result<Vec<Job>>;
    /// `waiting` jobs that name `predecessor_id` among their predecessors, locked.
    fn waiting_dependents(&mut self, predecessor_id: &str) -> Result<Vec<Job>>;
    /// Statuses of a job's predecessors.
    fn predecessor_statuses(&mut self, job: &Job) -> Result<Vec<(String, JobStatus)>>;
    /// Jobs the watchdog or scheduler must act on now (not locked: the watchdog locks each
    /// one and re-checks it).
    fn overdue_jobs(&mut self, overdue: Overdue, limit: u32) -> Result<Vec<Job>>;
    /// Stores an event; returns the key [`Tx::insert_deliveries`] takes. Its sequence number
    /// (the stream's cursor) follows commit order: a backend may give it at commit, and
    /// readers never see an event without one. Fan-out is the engine's.
    fn insert_event(&mut self, event: &Event) -> Result<i64>;
    /// Stores a pending delivery of the event `event_seq` (the key [`Tx::insert_event`]
    /// returned) to each subscription, due at `due_at`. `event` is the event as given to
    /// [`Tx::insert_event`] (its `seq` not yet set), for a backend that keeps what it will
    /// soon lease instead of reading it back; it is handed over, so keeping it copies nothing.
    /// A backend signals [`Notifications::deliveries`] once the transaction commits.
    fn insert_deliveries(&mut self, event_seq: i64, event: Event, subscriptions: &[&str], due_at: Millis)
    -> Result<()>;
    /// Adds or replaces a subscription; `active: false` stops new fan-out (pending deliveries
    /// stay). Changes [`ReadTx::subscriptions_version`].
    fn put_subscription(&mut self, sub: &Subscription, active: bool, now: Millis) -> Result<()>;
    /// Turns fan-out to an existing subscription on or off (its pending deliveries stay).
    /// Changes [`ReadTx::subscriptions_version`].
    fn set_subscription_active(&mut self, id: &str, active: bool, now: Millis) -> Result<()>;
    /// Up to `limit` deliveries of these subscriptions that are due at `now` (pending, or
    /// leased with an expired lease), oldest due first, locked for this transaction; rows
    /// another transaction holds are skipped (`FOR UPDATE SKIP LOCKED`), never waited for.
    fn due_deliveries(&mut self, subscriptions: &[String], now: Millis, limit: u32) -> Result<Vec<DueDelivery>>;
    /// Leases a delivery returned by [`Tx::due_deliveries`] in this transaction to
    /// `fence.owner` as attempt `fence.attempt`, until `until`.
    fn lease_delivery(&mut self, delivery_id: i64, fence: &Fence, until: Millis) -> Result<()>;
    /// Ends a delivery as `end` decides. With a fence, only while the lease it names is current
    /// (false otherwise: the lease expired and was handed on, and nothing changes); without
    /// one, unconditionally (the engine dead-letters an expired lease it has locked).
    fn finish_delivery(
        &mut self,
        delivery_id: i64,
        fence: Option<&Fence>,
        end: &DeliveryEnd,
        now: Millis,
    ) -> Result<bool>;
    /// Hands a leased delivery back: pending and due now, its attempt not counted. Only while
    /// the fence's lease is current.
    fn release_delivery(&mut self, delivery_id: i64, fence: &Fence, now: Millis) -> Result<bool>;
    /// Gives a dead-lettered delivery of an environment's event a new round of attempts, due
    /// now; false when there is no such dead letter (already retried, or another environment's).
    fn redeliver_dead(&mut self, env: &str, delivery_id: i64, now: Millis) -> Result<bool>;
    /// Makes due now every leased delivery whose owner is not in `live` (those hosts are
    /// gone); returns how many.
    fn reclaim_leases_except(&mut self, live: &[String], now: Millis) -> Result<u64>;
    /// Registers a host, or refreshes its heartbeat.
    fn heartbeat(&mut self, host: &HostRecord) -> Result<()>;
    /// Holds a lock named `key` until this transaction ends: transactions that take the same
    /// key run one after another (check-then-insert of a name, across hosts).
    fn lock_key(&mut self, key: &str) -> Result<()>;
    /// Stores a component under its content address (`version`, its SHA-256); storing it
    /// again changes nothing.
    fn put_plugin_blob(&mut self, _version: &str, _bytes: &[u8], _now: Millis) -> Result<()> {
        Err(no_plugins())
    }
    /// Records a deployment (its blob stored first); returns its `seq`. Deployments are
    /// written one at a time, so their `seq` is their commit order.
    fn insert_deployment(&mut self, _env: &str, _name: &str, _version: Option<&str>, _now: Millis) -> Result<i64> {
        Err(no_plugins())
    }
    /// Removes a host's registration (it stopped, or it is gone).
    fn remove_host(&mut self, id: &str) -> Result<()>;
}

/// A write submitted to a backend.
///
/// `run` applies it inside the backend's transaction and says whether to keep its changes. A
/// backend may run it more than once before replying (after rolling back what an earlier run
/// did, e.g. when it ran a batch without savepoints and another write in it failed); the last
/// run is the one that counts. `reply` is called once, with the fate of the transaction that
/// last run was in. A write that must be retried after that is submitted again by
/// [`Store::write`].
pub struct WriteOp {
    /// Applies the write; `true` keeps its changes.
    pub run: WriteRun,
    /// Told the commit's result (or why the write never committed).
    pub reply: Reply,
}
/// The body of a [`WriteOp`]: may run more than once; `true` keeps its changes.
pub type WriteRun = Box<dyn FnMut(&mut dyn Tx) -> bool + Send>;
/// A boxed read closure.
pub type ReadOp = Box<dyn FnOnce(&mut dyn ReadTx) + Send>;
/// Called with the commit result after the batch a write was in has committed (or failed).
pub type Reply = Box<dyn FnOnce(Result<()>) + Send>;

/// Whether a backend reaches its storage, for `/readyz` and `/metrics`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Health {
    /// Why the last attempt to reach the storage failed, while no later attempt succeeded.
    pub error: Option<String>,
    /// Connections made again after one was lost, since the backend opened.
    pub reconnects: u64,
}

/// What a backend's writers have done since it opened: how writes turn into transactions
/// and rows. Counted by the writer itself, so reading them costs no query.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WriteStats {
    /// Writes ([`WriteOp`]s) committed.
    pub writes: u64,
    /// Transactions committed (a group commit carries many writes).
    pub transactions: u64,
    /// Rows inserted, updated or deleted by committed transactions (`None`: not counted).
    pub rows: Option<u64>,
    /// Batches run a second time, one savepoint per write, because a write in them failed.
    pub careful_batches: u64,
    /// Syncs that made committed transactions durable before their writers were answered
    /// (one may cover several transactions; `None`: the backend's server syncs, not counted).
    pub syncs: Option<u64>,
}

impl WriteStats {
    /// The work done between `earlier` and `self`, per `units` units of work (e.g. per job
    /// lifecycle), as `writes, transactions, syncs, rows`.
    pub fn since(&self, earlier: &WriteStats, units: usize) -> String {
        let per = |a: u64, b: u64| (a.saturating_sub(b)) as f64 / units.max(1) as f64;
        let counted = |a: Option<u64>, b: Option<u64>, places: usize| match (a, b) {
            (Some(a), Some(b)) => format!("{:.places$}", per(a, b)),
            _ => "-".into(),
        };
        format!(
            "{:.2} writes, {:.3} transactions, {} syncs, {} rows",
            per(self.writes, earlier.writes),
            per(self.transactions, earlier.transactions),
            counted(self.syncs, earlier.syncs, 3),
            counted(self.rows, earlier.rows, 2),
        )
    }
}

/// The counts behind [`WriteStats`], kept by a backend's writer threads as they commit.
#[derive(Debug, Default)]
pub struct WriteCounters {
    writes: std::sync::atomic::AtomicU64,
    transactions: std::sync::atomic::AtomicU64,
    rows: std::sync::atomic::AtomicU64,
    careful_batches: std::sync::atomic::AtomicU64,
    syncs: std::sync::atomic::AtomicU64,
}

impl WriteCounters {
    /// Counts a committed transaction of `writes` writes that changed `rows` rows.
    pub fn committed(&self, writes: usize, rows: u64) {
        use std::sync::atomic::Ordering::Relaxed;
        self.writes.fetch_add(writes as u64, Relaxed);
        self.transactions.fetch_add(1, std::sync::atomic::Ordering::Release);
        self.rows.fetch_add(rows, Relaxed);
    }

    /// Counts a batch run again with a savepoint per write.
    pub fn careful(&self) {
        self.careful_batches.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// Counts a sync that made committed transactions durable.
    pub fn synced(&self) {
        self.syncs.fetch_add(1, std::sync::atomic::Ordering::Release);
    }

    /// The counts so far; `local` says whether the backend writes the storage itself (and so
    /// counts rows and syncs).
    pub fn stats(&self, local: bool) -> WriteStats {
        use std::sync::atomic::Ordering::{Acquire, Relaxed};
        // Syncs first: a sync is counted after the transactions it covers, so read in this
        // order the counts never show more syncs than transactions.
        let syncs = local.then(|| self.syncs.load(Acquire));
        WriteStats {
            writes: self.writes.load(Relaxed),
            transactions: self.transactions.load(Acquire),
            rows: local.then(|| self.rows.load(Relaxed)),
            careful_batches: self.careful_batches.load(Relaxed),
            syncs,
        }
    }
}

/// What a backend tells the engine without being asked. Both are hints that let waiters
/// skip polling: a lost or coalesced signal only delays work until the next poll.
#[derive(Debug, Clone)]
pub struct Notifications {
    /// Signalled after a commit that made a delivery due now (new, retried, released,
    /// reclaimed) — by this process or, for a shared database, by any host.
    pub deliveries: Arc<Notify>,
    /// Changes after every committed write (for waiting on state and the event stream).
    pub commits: tokio::sync::watch::Receiver<u64>,
}

/// A storage backend.
pub trait Backend: Send + Sync + 'static {
    /// Queues a write. Writes may be committed together (group commit) but each is atomic on
    /// its own: a closure that asks to discard its changes leaves the others committed.
    fn submit_write(&self, op: WriteOp);
    /// Runs a read off the async runtime.
    fn submit_read(&self, op: ReadOp);
    /// Wake-ups for the delivery loop and for waiters on state.
    fn notifications(&self) -> Notifications;
    /// True when this process is the only one that can use the store (SQLite's lock file):
    /// every other host registered in it is gone, so its leases can be reclaimed at once.
    fn exclusive(&self) -> bool;
    /// Whether the storage is reachable right now (an embedded store always is).
    fn health(&self) -> Health {
        Health::default()
    }
    /// What the backend's writers have done since it opened.
    fn write_stats(&self) -> WriteStats {
        WriteStats::default()
    }
}

/// How often [`Store::write`] runs a write whose attempt met a retryable failure.
const WRITE_ATTEMPTS: u32 = 8;

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
    ///
    /// `f` is a unit that can run again: when an attempt fails with a retryable store error
    /// (a serialization failure, a deadlock, a busy database), nothing of it was kept and `f`
    /// runs again in a new transaction, a few times with a growing pause. Callers never see
    /// those failures unless every attempt met one.
    pub async fn write<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: Fn(&mut dyn Tx) -> Result<T> + Send + Sync + 'static,
    {
        let f = Arc::new(f);
        let mut attempt = 0;
        loop {
            attempt += 1;
            let (tx, rx) = tokio::sync::oneshot::channel();
            let g = f.clone();
            // The last run's result, for the reply.
            let slot: Arc<std::sync::Mutex<Option<Result<T>>>> = Arc::default();
            let last = slot.clone();
            self.backend.submit_write(WriteOp {
                run: Box::new(move |t: &mut dyn Tx| {
                    // An earlier run's result must not outlive this run (if this one panics, no
                    // result is the truth).
                    *last.lock().unwrap_or_else(|e| e.into_inner()) = None;
                    let result = g(t);
                    let keep = result.is_ok();
                    *last.lock().unwrap_or_else(|e| e.into_inner()) = Some(result);
                    keep
                }),
                reply: Box::new(move |commit: Result<()>| {
                    let result = slot.lock().unwrap_or_else(|e| e.into_inner()).take();
                    let result = result.unwrap_or_else(|| Err(Error::store("the write failed before it returned")));
                    let _ = tx.send(commit.and(result));
                }),
            });
            let result = rx.await.unwrap_or_else(|_| Err(Error::store("the store's writer stopped")));
            match result {
                Err(e) if e.is_retryable() && attempt < WRITE_ATTEMPTS => {
                    tracing::debug!(attempt, error = %e, "write met a retryable store failure; running it again");
                    // Backs off so the transaction it collided with can finish.
                    let pause = 2u64.pow(attempt.min(6)) + fastrand::u64(0..4);
                    tokio::time::sleep(std::time::Duration::from_millis(pause)).await;
                }
                other => return other,
            }
        }
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
        rx.await.unwrap_or_else(|_| Err(Error::store("the store's reader stopped")))
    }
}
