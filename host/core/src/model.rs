//! The resources of the job model: environments, sheets, records, jobs and events.
//!
//! Field names follow `docs/job-model.md` (camelCase on the wire). Timestamps are milliseconds
//! since the Unix epoch, taken from the engine's [`Clock`](crate::clock::Clock).

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// Milliseconds since the Unix epoch.
pub type Millis = i64;

/// `v` as compact JSON text, serialized straight into a buffer. Not `Value`'s `Display`
/// (`to_string`), which writes through the formatter a fragment at a time, several times
/// slower: the stores write every event's context and payload this way, and the runtime each
/// event it hands a plugin. The same bytes either way.
pub fn json_string(v: &Value) -> String {
    // Cannot fail: a `Value`'s map keys are strings and the sink is a `Vec`.
    serde_json::to_string(v).unwrap_or_default()
}

/// [`json_string`] of `v`, or `None` for JSON `null` (a column or field left empty).
pub fn json_text(v: &Value) -> Option<String> {
    (!v.is_null()).then(|| json_string(v))
}

/// Makes a new id with a resource prefix, e.g. `job_01k3n9x0q2m7abf4c8hz`.
///
/// Ten characters of creation time (milliseconds, base32) then ten of randomness (50 bits).
/// Time first, so new rows land at the end of the store's B-trees instead of on random pages
/// — that alone halves the pages a commit writes. The random half makes ids impossible to
/// guess; every lookup is also scoped to an environment.
pub fn new_id(prefix: &str) -> String {
    const ALPHABET: &[u8; 32] = b"0123456789abcdefghjkmnpqrstvwxyz";
    let millis = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
    let random = fastrand::u64(..);
    let mut id = String::with_capacity(prefix.len() + 21);
    id.push_str(prefix);
    id.push('_');
    for i in (0..10).rev() {
        id.push(ALPHABET[((millis >> (i * 5)) & 31) as usize] as char);
    }
    for i in 0..10 {
        id.push(ALPHABET[((random >> (i * 5)) & 31) as usize] as char);
    }
    id
}

/// JSON numbers for integer fields: `7` and also `7.0`, which JSON Schema calls an integer and
/// clients that only have floats (Python's `time.time() * 1000`, JavaScript arithmetic) send.
/// A fraction or a value out of range is refused with the field's name.
mod integral {
    use serde::de::{Deserialize, Deserializer, Error};
    use serde_json::Number;

    pub(super) fn from_number<T: TryFrom<i64>>(n: &Number) -> Option<T> {
        let whole =
            n.as_i64().or_else(|| n.as_f64().filter(|f| f.fract() == 0.0 && f.abs() < 9.0e15).map(|f| f as i64))?;
        T::try_from(whole).ok()
    }

    /// For `Option<integer>` fields.
    pub(super) fn option<'de, D: Deserializer<'de>, T: TryFrom<i64>>(d: D) -> Result<Option<T>, D::Error> {
        match Option::<Number>::deserialize(d)? {
            None => Ok(None),
            Some(n) => {
                from_number(&n).map(Some).ok_or_else(|| D::Error::custom(format!("{n} is not a whole number in range")))
            }
        }
    }
}

/// A string that names no variant of an enum of the model; the message lists the ones it could.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct UnknownValue(pub String);

macro_rules! string_enum {
    ($(#[$meta:meta])* $name:ident { $($(#[$vmeta:meta])* $variant:ident = $text:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
        #[non_exhaustive]
        pub enum $name {
            $($(#[$vmeta])* #[serde(rename = $text)] $variant),+
        }

        // By hand: the derive cannot read a `rename` passed through this macro and would
        // document the Rust variant names instead of the wire names.
        impl utoipa::PartialSchema for $name {
            fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
                utoipa::openapi::schema::ObjectBuilder::new()
                    .schema_type(utoipa::openapi::schema::Type::String)
                    .enum_values(Some([$($text),+]))
                    .into()
            }
        }

        impl utoipa::ToSchema for $name {}

        impl $name {
            /// The wire name of this value.
            pub fn as_str(self) -> &'static str {
                match self { $(Self::$variant => $text),+ }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl FromStr for $name {
            type Err = UnknownValue;
            fn from_str(s: &str) -> Result<Self, UnknownValue> {
                match s {
                    $($text => Ok(Self::$variant),)+
                    other => Err(UnknownValue(format!(
                        concat!("unknown ", stringify!($name), " `{}` (expected one of: {})"),
                        other,
                        [$($text),+].join(", ")
                    ))),
                }
            }
        }
    };
}

string_enum! {
    /// Where a job is in its lifecycle.
    JobStatus {
        /// Created with `trigger: manual`; waits for `execute`.
        Created = "created",
        /// Has a `runAt` in the future; becomes `ready` then.
        Scheduled = "scheduled",
        /// Waits for predecessors (or, for a sequential part, the part before it).
        Waiting = "waiting",
        /// Announced to listeners with `job:ready`; waits for an ack.
        Ready = "ready",
        /// A listener acknowledged it and is working on it.
        Executing = "executing",
        /// Ended successfully. Terminal.
        Complete = "complete",
        /// Ended with a failure. Terminal (but `retry` starts a new attempt).
        Failed = "failed",
        /// Canceled. Terminal.
        Canceled = "canceled",
    }
}

impl JobStatus {
    /// Every status, in lifecycle order.
    pub const ALL: [JobStatus; 8] = [
        Self::Created,
        Self::Scheduled,
        Self::Waiting,
        Self::Ready,
        Self::Executing,
        Self::Complete,
        Self::Failed,
        Self::Canceled,
    ];

    /// Terminal statuses never change again (except `failed` → `ready` by an explicit retry).
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Complete | Self::Failed | Self::Canceled)
    }
}

string_enum! {
    /// What kind of resource a job works on.
    JobType {
        /// A sheet; `source` is the sheet id.
        Sheet = "sheet",
        /// A workbook.
        Workbook = "workbook",
        /// A file.
        File = "file",
        /// A space.
        Space = "space",
        /// A document.
        Document = "document",
    }
}

string_enum! {
    /// How a job is started.
    Trigger {
        /// Becomes `ready` on creation.
        Immediate = "immediate",
        /// Stays `created` until `execute`.
        Manual = "manual",
    }
}

string_enum! {
    /// How a UI would present the job. Stored and returned; no behaviour in the host.
    JobMode {
        /// Shown in the foreground.
        Foreground = "foreground",
        /// Runs in the background.
        Background = "background",
        /// Blocks the toolbar.
        ToolbarBlocking = "toolbarBlocking",
        /// Not shown.
        Hidden = "hidden",
    }
}

string_enum! {
    /// Whether a split job's parts run all at once or one after another.
    PartExecution {
        /// Every part is `ready` at once.
        Parallel = "parallel",
        /// Part *i+1* becomes `ready` only when part *i* is terminal.
        Sequential = "sequential",
    }
}

string_enum! {
    /// The severity of a record message.
    MessageType {
        /// Makes the cell and the record invalid.
        Error = "error",
        /// A warning; the record stays valid.
        Warn = "warn",
        /// Information; the record stays valid.
        Info = "info",
    }
}

/// A tenant. Every other resource belongs to exactly one environment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Environment {
    /// `env_…`
    pub id: String,
    /// A human name, unique in nothing.
    pub name: String,
    /// When it was created.
    pub created_at: Millis,
}

/// A table of records.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Sheet {
    /// `sh_…`
    pub id: String,
    /// The owning environment.
    pub environment_id: String,
    /// A human name.
    pub name: String,
    /// The workbook grouping this sheet, if any.
    pub workbook_id: Option<String>,
    /// When it was created.
    pub created_at: Millis,
}

/// A message on a record, optionally about one field.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Message {
    /// Severity; only `error` makes a record invalid.
    #[serde(rename = "type")]
    pub kind: MessageType,
    /// The text shown to a person.
    pub message: String,
    /// The field it is about; `None` for the whole record.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(min_length = 1)]
    pub field: Option<String>,
}

impl Message {
    /// An error message on one field.
    pub fn error(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self { kind: MessageType::Error, message: message.into(), field: Some(field.into()) }
    }
}

/// One cell of a record as a reader sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Cell {
    /// The stored value (`null` when absent).
    pub value: Value,
    /// False when any error message names this field.
    pub valid: bool,
    /// The messages that name this field.
    pub messages: Vec<Message>,
}

/// A record as a reader sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Record {
    /// `rec_…`
    pub id: String,
    /// Field key → cell.
    pub values: BTreeMap<String, Cell>,
    /// False when any error message is present.
    pub valid: bool,
    /// Messages not tied to a field.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub messages: Vec<Message>,
    /// Free-form metadata stored as given.
    #[serde(default, skip_serializing_if = "Value::is_null")]
    pub metadata: Value,
}

impl Record {
    /// The value of a field, `None` when the field is absent or null.
    pub fn value(&self, field: &str) -> Option<&Value> {
        self.values.get(field).map(|c| &c.value).filter(|v| !v.is_null())
    }

    /// The value of a field as a string slice, `None` when absent or not a string.
    pub fn str(&self, field: &str) -> Option<&str> {
        self.value(field).and_then(Value::as_str)
    }
}

/// A record to insert.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewRecord {
    /// Field key → value.
    pub values: Map<String, Value>,
    /// Initial messages.
    #[serde(default)]
    pub messages: Vec<Message>,
    /// Free-form metadata.
    #[serde(default)]
    pub metadata: Value,
}

/// A change to one record: new values for some fields and/or a new set of messages.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RecordUpdate {
    /// The record, `rec_…`.
    #[schema(pattern = "^rec_[1-9][0-9]{0,17}$")]
    pub id: String,
    /// Fields to set (merged over the existing values; `null` clears a field).
    #[serde(default)]
    pub values: Map<String, Value>,
    /// When `Some`, replaces all messages of the record.
    #[serde(default)]
    pub messages: Option<Vec<Message>>,
}

/// Record counts of a sheet. `valid + error == total`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RecordCounts {
    /// All records.
    pub total: u64,
    /// Records with no error message.
    pub valid: u64,
    /// Records with at least one error message.
    pub error: u64,
}

/// One page of records.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct RecordPage {
    /// The page's records in the sheet's stable order.
    pub records: Vec<Record>,
    /// 1-based page number asked for.
    pub page_number: u32,
    /// Page size asked for.
    pub page_size: u32,
}

/// The largest page a reader may ask for.
pub const MAX_PAGE_SIZE: u32 = 10_000;

/// A job, as stored and returned.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Job {
    /// `job_…`
    pub id: String,
    /// The owning environment.
    pub environment_id: String,
    /// What the job works on.
    #[serde(rename = "type")]
    pub kind: JobType,
    /// The operation, e.g. `submitLargeSheet`.
    pub operation: String,
    /// Id of the resource it works on (a sheet id for `sheet` jobs).
    pub source: Option<String>,
    /// Lifecycle status.
    pub status: JobStatus,
    /// How it starts.
    pub trigger: Trigger,
    /// Presentation hint.
    pub mode: JobMode,
    /// Input as given at creation.
    pub input: Value,
    /// Latest info text from ack/complete/fail/cancel.
    pub info: Option<String>,
    /// 0–100.
    pub progress: u8,
    /// As reported by the last ack.
    pub estimated_completion_at: Option<Millis>,
    /// Outcome as given to complete/fail (or written by the watchdog).
    pub outcome: Value,
    /// The parent job when this job is a part.
    pub parent_id: Option<String>,
    /// Derived: `parentId` is set.
    pub is_part: bool,
    /// 0-based position among its siblings when this job is a part.
    pub part_index: Option<u32>,
    /// Data given to this part by the split.
    pub part_data: Value,
    /// How this job's parts run (set when it is split).
    pub part_execution: Option<PartExecution>,
    /// Jobs that must be complete before this one runs.
    pub predecessor_ids: Vec<String>,
    /// Run no earlier than this.
    pub run_at: Option<Millis>,
    /// Fail the job when it is executing and not acked for this long (overrides the engine's).
    pub stale_timeout_ms: Option<i64>,
    /// 1 on creation, +1 per retry.
    pub attempt: u32,
    /// When it was created.
    pub created_at: Millis,
    /// When it last changed.
    pub updated_at: Millis,
    /// When it was first acknowledged.
    pub started_at: Option<Millis>,
    /// When it became terminal.
    pub finished_at: Option<Millis>,
    /// When its outcome was acknowledged.
    pub outcome_acknowledged_at: Option<Millis>,
    /// When it last became `ready` (the watchdog's ack clock).
    pub ready_at: Option<Millis>,
    /// Last ack, split or parts-completed (the watchdog's stale clock).
    pub last_activity_at: Option<Millis>,
    /// When it was split into parts.
    pub split_at: Option<Millis>,
    /// When `job:parts-completed` was emitted for it (at most once).
    pub parts_completed_at: Option<Millis>,
}

impl Job {
    /// `"<type>:<operation>"`, the `job` key of event payloads.
    pub fn job_name(&self) -> String {
        format!("{}:{}", self.kind, self.operation)
    }
}

/// What to create.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
#[serde(deny_unknown_fields)]
pub struct NewJob {
    /// Resource kind.
    #[serde(rename = "type")]
    pub kind: JobType,
    /// Operation name; non-empty, no `:`, no spaces.
    #[schema(min_length = 1, pattern = "^[^:\\s]+$")]
    pub operation: String,
    /// Resource id (must be a sheet of the environment for `sheet` jobs, when given).
    #[serde(default)]
    pub source: Option<String>,
    /// Default `immediate`.
    #[serde(default)]
    pub trigger: Option<Trigger>,
    /// Default `background`.
    #[serde(default)]
    pub mode: Option<JobMode>,
    /// Free-form input.
    #[serde(default)]
    pub input: Value,
    /// Run no earlier than this.
    #[serde(default, deserialize_with = "integral::option")]
    pub run_at: Option<Millis>,
    /// Jobs that must complete first (same environment).
    #[serde(default)]
    pub predecessor_ids: Vec<String>,
    /// Per-job stale timeout override.
    #[serde(default, deserialize_with = "integral::option")]
    #[schema(minimum = 1)]
    pub stale_timeout_ms: Option<i64>,
}

impl NewJob {
    /// A job of `kind` and `operation` with every option at its default.
    pub fn new(kind: JobType, operation: impl Into<String>) -> Self {
        Self {
            kind,
            operation: operation.into(),
            source: None,
            trigger: None,
            mode: None,
            input: Value::Null,
            run_at: None,
            predecessor_ids: Vec::new(),
            stale_timeout_ms: None,
        }
    }

    /// A `sheet` job working on `sheet_id`.
    pub fn sheet(operation: impl Into<String>, sheet_id: impl Into<String>) -> Self {
        Self { source: Some(sheet_id.into()), ..Self::new(JobType::Sheet, operation) }
    }

    /// Sets the trigger.
    pub fn trigger(mut self, trigger: Trigger) -> Self {
        self.trigger = Some(trigger);
        self
    }
}

/// Arguments of `ack`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
#[serde(deny_unknown_fields)]
pub struct Ack {
    /// Replaces the job's info.
    #[serde(default)]
    pub info: Option<String>,
    /// 0–100.
    #[serde(default, deserialize_with = "integral::option")]
    #[schema(minimum = 0, maximum = 100)]
    pub progress: Option<u8>,
    /// Expected completion.
    #[serde(default, deserialize_with = "integral::option")]
    pub estimated_completion_at: Option<Millis>,
}

impl Ack {
    /// An ack with info and progress.
    pub fn progress(info: impl Into<String>, progress: u8) -> Self {
        Self { info: Some(info.into()), progress: Some(progress), estimated_completion_at: None }
    }
}

/// Arguments of `complete` and `fail`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Outcome {
    /// Stored as given (`message`, `heading`, `acknowledge`, …).
    #[serde(default)]
    pub outcome: Value,
    /// Replaces the job's info.
    #[serde(default)]
    pub info: Option<String>,
}

impl Outcome {
    /// An outcome carrying just `{"message": …}`.
    pub fn message(message: impl Into<String>) -> Self {
        Self { outcome: serde_json::json!({ "message": message.into() }), info: None }
    }
}

/// Arguments of `split`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
#[serde(deny_unknown_fields)]
pub struct Split {
    /// How many parts, or one `partData` object per part.
    pub parts: SplitParts,
    /// Default true; false makes the parts sequential.
    #[serde(default)]
    pub run_in_parallel: Option<bool>,
}

/// The `parts` of a split.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum SplitParts {
    /// N parts; part *i* gets `{"part": i, "total": N}`.
    Count(u32),
    /// One part per element, whose `partData` is the element as given.
    Data(Vec<Value>),
}

impl utoipa::PartialSchema for SplitParts {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        use utoipa::openapi::schema::{ArrayBuilder, ObjectBuilder, OneOfBuilder, Type};
        OneOfBuilder::new()
            .item(
                ObjectBuilder::new()
                    .schema_type(Type::Integer)
                    .minimum(Some(1))
                    .maximum(Some(MAX_PARTS))
                    .description(Some("How many parts")),
            )
            .item(
                ArrayBuilder::new()
                    .items(ObjectBuilder::new().schema_type(Type::Object))
                    .min_items(Some(1))
                    .max_items(Some(MAX_PARTS as usize))
                    .description(Some("One `partData` object per part")),
            )
            .into()
    }
}

impl utoipa::ToSchema for SplitParts {}

impl<'de> Deserialize<'de> for SplitParts {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error as _;
        match Value::deserialize(d)? {
            Value::Number(n) => integral::from_number(&n)
                .map(SplitParts::Count)
                .ok_or_else(|| D::Error::custom(format!("parts: {n} is not a whole number of parts"))),
            Value::Array(data) => Ok(SplitParts::Data(data)),
            other => Err(D::Error::custom(format!("parts must be a count or an array of part data, not {other}"))),
        }
    }
}

impl Split {
    /// N parallel parts.
    pub fn count(n: u32) -> Self {
        Self { parts: SplitParts::Count(n), run_in_parallel: None }
    }
}

/// The upper bound on parts per split, so a bad input cannot flood the store.
pub const MAX_PARTS: u32 = 100_000;

/// Part counts carried by `job:parts-completed`. `total = completed + failed + canceled`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PartCounts {
    /// Number of parts.
    pub total: u64,
    /// Parts that completed.
    pub completed: u64,
    /// Parts that failed.
    pub failed: u64,
    /// Parts that were canceled.
    pub canceled: u64,
}

/// An event: what listeners receive.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Event {
    /// `evt_…`
    pub id: String,
    /// Position in the store's event log; a cursor for listing.
    pub seq: i64,
    /// e.g. `job:ready`.
    pub topic: String,
    /// `{environmentId, jobId, sheetId?, workbookId?, spaceId?, actorId}`.
    pub context: Value,
    /// Topic-specific payload.
    pub payload: Value,
    /// When it was stored.
    pub created_at: Millis,
}

impl Event {
    /// A string field of the context (`environmentId`, `jobId`, `sheetId`, …).
    pub fn context_str(&self, key: &str) -> Option<&str> {
        self.context.get(key).and_then(Value::as_str)
    }

    /// The environment the event belongs to.
    pub fn environment_id(&self) -> &str {
        self.context_str("environmentId").unwrap_or_default()
    }

    /// The job the event is about, for job events.
    pub fn job_id(&self) -> Option<&str> {
        self.context_str("jobId")
    }

    /// `payload.parts` of `job:parts-completed`.
    pub fn part_counts(&self) -> Option<PartCounts> {
        serde_json::from_value(self.payload.get("parts")?.clone()).ok()
    }
}

string_enum! {
    /// Where a delivery that has not finished is.
    DeliveryState {
        /// Waits to be leased: first due, or backing off after a failed attempt.
        Pending = "pending",
        /// A host is handling it under a lease.
        Leased = "leased",
        /// Its attempts ran out; it waits for an operator's retry.
        Dead = "dead",
    }
}

/// A delivery of one of a job's events to a subscriber that has not finished: what a job
/// that does not move is waiting on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct OpenDelivery {
    /// Delivery id.
    pub delivery_id: i64,
    /// The subscriber (`listener:route`).
    pub subscription_id: String,
    /// The event.
    pub event_id: String,
    /// Its topic.
    pub topic: String,
    /// Pending, leased or dead.
    pub state: DeliveryState,
    /// Attempts made so far.
    pub attempts: u32,
    /// Pending: when the next attempt is due (after a failure, the end of its backoff).
    /// Leased: when the lease expires. Dead: none.
    pub due_at: Option<Millis>,
    /// Leased: the host handling it.
    pub lease_owner: Option<String>,
    /// Why the last attempt failed, after a failure.
    pub last_error: Option<String>,
}

/// What a job that has not ended waits for (`Env::waiting`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Waiting {
    /// One sentence: what it waits for and what ends the wait.
    pub reason: String,
    /// The deliveries of its events that have not finished, by delivery id: a retried one
    /// shows its attempts, its last error and when the next attempt is due (`dueAt`).
    pub deliveries: Vec<OpenDelivery>,
}

/// What a delivery ended as.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeadLetter {
    /// Delivery id.
    pub delivery_id: i64,
    /// The subscription that never finished it.
    pub subscription_id: String,
    /// The event.
    pub event: Event,
    /// Attempts made.
    pub attempts: u32,
    /// Why the last attempt failed.
    pub last_error: String,
}

string_enum! {
    /// How a plugin delivery ended.
    ExecutionOutcome {
        /// The handler returned `ok`.
        Ok = "ok",
        /// The handler returned an error.
        Error = "error",
        /// The guest trapped (panic, unreachable, stack overflow, …).
        Trap = "trap",
        /// The guest hit its memory limit.
        Memory = "memory",
        /// The guest used up its CPU time (epoch deadline).
        Cpu = "cpu",
        /// The delivery outlived its wall-clock limit (host calls included).
        Timeout = "timeout",
        /// The guest ran out of fuel.
        Fuel = "fuel",
        /// Another limit stopped the guest (its tables grew past the table limit).
        Limit = "limit",
    }
}

/// The record of one plugin delivery.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Execution {
    /// Assigned by the store.
    pub id: i64,
    /// The environment of the event.
    pub environment_id: String,
    /// Plugin name.
    pub plugin: String,
    /// Plugin version (content hash).
    pub plugin_version: String,
    /// Index of the plugin route that ran.
    pub route: u32,
    /// The event.
    pub event_id: String,
    /// The event's topic.
    pub topic: String,
    /// The job the event is about.
    pub job_id: Option<String>,
    /// Delivery attempt.
    pub attempt: u32,
    /// When it started.
    pub started_at: Millis,
    /// How long it took, in microseconds (instantiation included).
    pub duration_us: i64,
    /// CPU time spent in guest code, in microseconds.
    pub cpu_us: i64,
    /// How it ended.
    pub outcome: ExecutionOutcome,
    /// What went wrong, naming the limit when one was hit.
    pub error: Option<String>,
    /// Peak linear memory, bytes.
    pub peak_memory: u64,
    /// stdout, stderr and `log` lines, capped.
    pub logs: String,
    /// The plugin's outbound HTTP requests, in the order they were made (granted or refused).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub http: Vec<HttpCall>,
}

/// One outbound HTTP request of a delivery: where it went and how it ended — never its
/// headers, its body or its query string.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct HttpCall {
    /// `GET`, `POST`, …
    pub method: String,
    /// `scheme://host:port`.
    pub origin: String,
    /// The path, without its query string.
    pub path: String,
    /// The response's status, when one came.
    pub status: Option<u16>,
    /// Request body bytes sent.
    pub sent_bytes: u64,
    /// Response body bytes received (up to the limit).
    pub received_bytes: u64,
    /// From the request to the end of its response body (or its refusal), in microseconds.
    pub duration_us: i64,
    /// Why it was refused or cut: not granted, a denied address, a limit, a timeout.
    pub error: Option<String>,
}

/// Largest secret value, in bytes.
pub const MAX_SECRET_BYTES: usize = 64 << 10;

/// A secret's name: 1 to 128 ASCII letters, digits, `_`, `-` or `.`.
pub fn validate_secret_name(name: &str) -> std::result::Result<(), InvalidName> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(InvalidName(format!("`{name}` is not a secret name (1 to 128 of A-Z, a-z, 0-9, `_`, `-`, `.`)")))
    }
}

/// A name that breaks its rule; the message says the rule.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidName(pub String);

/// An API token's record. The token itself is shown once, when it is created, and stored only
/// as its SHA-256.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ApiToken {
    /// `tok_…`, to refer to the token (e.g. to revoke it).
    pub id: String,
    /// The only environment the token reaches.
    pub environment_id: String,
    /// What it is for.
    pub name: String,
    /// When it was created.
    pub created_at: Millis,
}

/// The first `bytes` bytes of the SHA-256 of `data`, in hex: content versions, route keys and
/// token hashes.
pub fn sha256_hex(data: &[u8], bytes: usize) -> String {
    use sha2::{Digest, Sha256};
    Sha256::digest(data).iter().take(bytes).map(|b| format!("{b:02x}")).collect()
}
