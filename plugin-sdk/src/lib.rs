//! The Rust SDK for jobhost listener plugins.
//!
//! A plugin is a WebAssembly component built for `wasm32-wasip2` against the contract in
//! `wit/`. This crate hides the generated bindings behind an API shaped like
//! `@flatfile/listener`: build a [`Listener`] of routes (topic pattern, optional filter,
//! handler), and [`export!`] it.
//!
//! ```no_run
//! use jobhost_plugin_sdk::{Event, Listener, Result, jobs, json};
//!
//! fn listener() -> Listener {
//!     Listener::new().filter(json!({"job": "sheet:submitLargeSheet", "isPart": true}), |l| {
//!         l.on("job:ready", |event: &Event| -> Result<()> {
//!             let job = event.job_id()?;
//!             jobs::ack(job, jobs::Ack::default())?;
//!             let page = event.data(1000, 1)?;
//!             jobhost_plugin_sdk::log::info(&format!("{} records", page.len()));
//!             jobs::complete(job, jobs::Outcome::message("done"))?;
//!             Ok(())
//!         })
//!     })
//! }
//!
//! jobhost_plugin_sdk::export!(listener);
//! ```
//!
//! # Layout
//! - [`Listener`], [`Event`]: routes and what a handler receives.
//! - [`jobs`], [`records`], [`sheets`], [`log`]: the host calls, scoped by the host to the
//!   event's environment; [`config`]: configuration values and secrets the operator granted.
//! - [`http`]: outbound HTTP to the hosts the manifest grants (`wasi:http`).
//! - [`Error`]: every host call returns `Result<_, Error>`; a handler returning an error fails
//!   the delivery (which the host retries).
//! - [`export!`]: makes a `fn() -> Listener` the plugin's entry point.
//!
//! Handlers must tolerate being called again for the same event (delivery is at least once):
//! [`Error::is_already_terminal`] recognises a call on a job that already ended.

use std::cell::OnceCell;

pub use serde_json::{Value, json};

#[doc(hidden)]
pub mod bindings {
    wit_bindgen::generate!({
        path: "../wit",
        world: "plugin",
        pub_export_macro: true,
        export_macro_name: "__export_world_plugin",
        default_bindings_module: "jobhost_plugin_sdk::bindings",
    });
}

use bindings::jobhost::plugin::types as wit;

pub mod config;
pub mod http;
pub mod jobs;
pub mod log;
pub mod records;
pub mod sheets;

pub use jobs::{Job, JobStatus};
pub use records::{Cell, CellValue, Page, RecordRef};

/// What went wrong: a host call that was refused, or a handler's own failure.
#[derive(Debug, Clone, PartialEq)]
pub struct Error {
    kind: ErrorKind,
    message: String,
    job_status: Option<JobStatus>,
}

/// The class of an [`Error`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The resource does not exist in this environment.
    NotFound,
    /// The resource's state refuses the call.
    Conflict,
    /// Malformed or out-of-range input.
    Invalid,
    /// Not allowed.
    Denied,
    /// A limit was reached.
    Limit,
    /// The host failed; retrying may help.
    Internal,
    /// The handler's own error.
    Handler,
}

impl Error {
    /// A handler error with a message.
    ///
    /// ```
    /// let e = jobhost_plugin_sdk::Error::msg("age column missing");
    /// assert_eq!(e.to_string(), "age column missing");
    /// ```
    pub fn msg(message: impl Into<String>) -> Self {
        Self { kind: ErrorKind::Handler, message: message.into(), job_status: None }
    }

    /// The class of the error.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The message.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// When a job call was refused because of the job's status: that status.
    pub fn job_status(&self) -> Option<JobStatus> {
        self.job_status
    }

    /// True when a job call was refused because the job already ended — what a handler sees
    /// when an event comes again after its work was done. Treat it as success.
    pub fn is_already_terminal(&self) -> bool {
        self.kind == ErrorKind::Conflict && self.job_status.is_some_and(JobStatus::is_terminal)
    }
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Error {}

impl From<wit::Error> for Error {
    fn from(e: wit::Error) -> Self {
        let kind = match e.kind {
            wit::ErrorKind::NotFound => ErrorKind::NotFound,
            wit::ErrorKind::Conflict => ErrorKind::Conflict,
            wit::ErrorKind::Invalid => ErrorKind::Invalid,
            wit::ErrorKind::Denied => ErrorKind::Denied,
            wit::ErrorKind::Limit => ErrorKind::Limit,
            wit::ErrorKind::Internal => ErrorKind::Internal,
        };
        Self { kind, message: e.message, job_status: e.job_status.map(JobStatus::from) }
    }
}

impl From<serde_json::Error> for Error {
    fn from(e: serde_json::Error) -> Self {
        Self::msg(format!("JSON: {e}"))
    }
}

impl From<String> for Error {
    fn from(message: String) -> Self {
        Self::msg(message)
    }
}

impl From<&str> for Error {
    fn from(message: &str) -> Self {
        Self::msg(message)
    }
}

/// `Result<T, Error>`.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Runs a job call and turns "the job already ended" into `Ok(None)`: the call repeats work
/// that a previous delivery of the same event finished.
///
/// ```no_run
/// # use jobhost_plugin_sdk::{jobs, tolerate_repeat};
/// # fn f() -> jobhost_plugin_sdk::Result<()> {
/// if tolerate_repeat(jobs::ack("job_…", jobs::Ack::default()))?.is_none() {
///     return Ok(()); // done before
/// }
/// # Ok(()) }
/// ```
pub fn tolerate_repeat<T>(result: Result<T>) -> Result<Option<T>> {
    match result {
        Ok(v) => Ok(Some(v)),
        Err(e) if e.is_already_terminal() => Ok(None),
        Err(e) => Err(e),
    }
}

/// An event as a handler receives it.
pub struct Event {
    raw: wit::Event,
    payload: OnceCell<Value>,
    context: OnceCell<Value>,
}

impl Event {
    #[doc(hidden)]
    pub fn from_raw(raw: wit::Event) -> Self {
        Self { raw, payload: OnceCell::new(), context: OnceCell::new() }
    }

    /// The event id.
    pub fn id(&self) -> &str {
        &self.raw.id
    }

    /// The topic, e.g. `job:ready`.
    pub fn topic(&self) -> &str {
        &self.raw.topic
    }

    /// The environment the event (and every host call of this handler) belongs to.
    pub fn environment_id(&self) -> &str {
        &self.raw.environment_id
    }

    /// `context.jobId`, or an error for events not about a job.
    pub fn job_id(&self) -> Result<&str> {
        self.raw
            .job_id
            .as_deref()
            .ok_or_else(|| Error::msg(format!("event {} ({}) has no jobId", self.raw.id, self.raw.topic)))
    }

    /// `context.sheetId`, or an error for events not about a sheet.
    pub fn sheet_id(&self) -> Result<&str> {
        self.raw
            .sheet_id
            .as_deref()
            .ok_or_else(|| Error::msg(format!("event {} ({}) has no sheetId", self.raw.id, self.raw.topic)))
    }

    /// The payload (`{domain, operation, job, status, isPart, partData?, parts?, …}`), parsed once.
    pub fn payload(&self) -> &Value {
        self.payload.get_or_init(|| serde_json::from_str(&self.raw.payload).unwrap_or(Value::Null))
    }

    /// The context (`{environmentId, jobId, sheetId?, actorId}`), parsed once.
    pub fn context(&self) -> &Value {
        self.context.get_or_init(|| serde_json::from_str(&self.raw.context).unwrap_or(Value::Null))
    }

    /// 1-based delivery attempt; greater than 1 when the event is delivered again.
    pub fn attempt(&self) -> u32 {
        self.raw.attempt
    }

    /// A page of the records of the event's sheet (`event.data` of `@flatfile/listener`).
    pub fn data(&self, page_size: u32, page_number: u32) -> Result<Page> {
        records::page(self.sheet_id()?, page_size, page_number)
    }
}

type Handler = Box<dyn Fn(&Event) -> Result<()>>;

struct Route {
    topic: String,
    filter: Option<Value>,
    handler: Handler,
}

/// A plugin's routes: `(topic pattern, filter) → handler`.
#[derive(Default)]
pub struct Listener {
    routes: Vec<Route>,
}

/// Routes sharing one filter, built inside [`Listener::filter`].
pub struct Filtered {
    filter: Value,
    routes: Vec<Route>,
}

impl Filtered {
    /// Handles `topic` (a pattern: `job:ready`, `job:*`, `**`) for events passing the filter.
    pub fn on(mut self, topic: &str, handler: impl Fn(&Event) -> Result<()> + 'static) -> Self {
        self.routes.push(Route {
            topic: topic.to_owned(),
            filter: Some(self.filter.clone()),
            handler: Box::new(handler),
        });
        self
    }
}

impl Listener {
    /// A listener without routes.
    pub fn new() -> Self {
        Self::default()
    }

    /// Handles `topic` for every event of the plugin's environment.
    ///
    /// ```
    /// # use jobhost_plugin_sdk::{Listener, Event, Result};
    /// let l = Listener::new().on("job:*", |event: &Event| -> Result<()> { Ok(()) });
    /// ```
    pub fn on(mut self, topic: &str, handler: impl Fn(&Event) -> Result<()> + 'static) -> Self {
        self.routes.push(Route { topic: topic.to_owned(), filter: None, handler: Box::new(handler) });
        self
    }

    /// Routes added inside `build` only receive events that pass `filter` (keys match
    /// flattened event keys by suffix; lists mean any of; strings are globs).
    ///
    /// ```
    /// # use jobhost_plugin_sdk::{Listener, Event, Result, json};
    /// let l = Listener::new().filter(json!({"job": "sheet:*", "isPart": false}), |l| {
    ///     l.on("job:ready", |_: &Event| -> Result<()> { Ok(()) })
    /// });
    /// ```
    pub fn filter(mut self, filter: Value, build: impl FnOnce(Filtered) -> Filtered) -> Self {
        self.routes.extend(build(Filtered { filter, routes: Vec::new() }).routes);
        self
    }
}

#[doc(hidden)]
pub mod __private {
    use super::*;

    thread_local! {
        static LISTENER: OnceCell<Listener> = const { OnceCell::new() };
    }

    fn with_listener<T>(build: fn() -> Listener, f: impl FnOnce(&Listener) -> T) -> T {
        LISTENER.with(|cell| f(cell.get_or_init(build)))
    }

    pub fn subscriptions(build: fn() -> Listener) -> Vec<wit::Subscription> {
        with_listener(build, |l| {
            l.routes
                .iter()
                .map(|r| wit::Subscription { topic: r.topic.clone(), filter: r.filter.as_ref().map(Value::to_string) })
                .collect()
        })
    }

    pub fn handle(build: fn() -> Listener, route: u32, event: wit::Event) -> std::result::Result<(), String> {
        with_listener(build, |l| {
            let route = l.routes.get(route as usize).ok_or_else(|| format!("the plugin has no route {route}"))?;
            (route.handler)(&Event::from_raw(event)).map_err(|e| e.to_string())
        })
    }
}

/// Makes `fn() -> Listener` the plugin's entry point. Use it once, at the crate root.
///
/// ```ignore
/// fn listener() -> jobhost_plugin_sdk::Listener { jobhost_plugin_sdk::Listener::new() }
/// jobhost_plugin_sdk::export!(listener);
/// ```
#[macro_export]
macro_rules! export {
    ($listener:path) => {
        #[doc(hidden)]
        pub struct __JobhostPlugin;

        impl $crate::bindings::exports::jobhost::plugin::listener::Guest for __JobhostPlugin {
            fn subscriptions() -> ::std::vec::Vec<$crate::bindings::jobhost::plugin::types::Subscription> {
                $crate::__private::subscriptions($listener)
            }

            fn handle(
                route: u32,
                event: $crate::bindings::jobhost::plugin::types::Event,
            ) -> ::std::result::Result<(), ::std::string::String> {
                $crate::__private::handle($listener, route, event)
            }
        }

        $crate::bindings::__export_world_plugin!(__JobhostPlugin with_types_in $crate::bindings);
    };
}
