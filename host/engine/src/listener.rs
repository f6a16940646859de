//! Native (in-process, non-WASM) listeners: routes `(topic, filter) → handler` and what a
//! handler receives and returns. The loop that feeds them is [`crate::delivery`].
//!
//! A [`Listener`] reads like `@flatfile/listener`:
//!
//! ```no_run
//! # use jobhost_engine::listener::Listener;
//! # use serde_json::json;
//! let listener = Listener::new("submit-large-sheet", "env_…").filter(json!({"job": "sheet:submitLargeSheet", "isPart": false}), |l| {
//!     l.on("job:ready", |event| async move {
//!         let job = event.job_id()?.to_owned();
//!         event.api.ack(&job, Default::default()).await?;
//!         Ok(())
//!     })
//! });
//! ```
//!
//! Each `(topic, filter)` route is stored as a durable subscription with the id
//! `<environment>/<listener>#<n>` (or `#<key>` for keyed routes), so events that happen while the listener is not running are kept as
//! pending deliveries and handed over when it comes back. [`Engine::run`](crate::Engine::run)
//! starts the delivery loop and the watchdog.
//!
//! A native handler returns [`HandlerResult`]; any error fails the delivery. A handler that
//! needs more — the WebAssembly runtime, which reports an execution record and may hand a
//! delivery back — returns a [`Handled`] through [`Listener::handled_route`].

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use serde_json::Value;

use crate::Env;
use crate::error::{Error, Result};
use crate::model::{Event, Execution, RecordPage};

/// The error of a native handler: anything that is an error. `?` works on the engine's
/// errors, I/O errors, `anyhow` errors and the like.
pub type HandlerError = Box<dyn std::error::Error + Send + Sync>;
/// What a native handler returns. Any error fails the delivery, which is retried.
pub type HandlerResult = std::result::Result<(), HandlerError>;
/// A boxed future of a handler's [`Handled`].
pub type HandledFuture = Pin<Box<dyn Future<Output = Handled> + Send>>;
pub(crate) type Handler = Arc<dyn Fn(EventCtx) -> HandledFuture + Send + Sync>;

/// How a handler's delivery ended, as the delivery loop records it.
#[derive(Debug, Clone, PartialEq)]
pub enum End {
    /// Handled.
    Done,
    /// Failed with this message; retried with backoff, dead-lettered after the last attempt.
    Failed(String),
    /// Failed in a way a retry would only repeat (a plugin that ran into a per-delivery
    /// budget): dead-lettered with this message at once, whatever attempts are left.
    FailedForGood(String),
    /// Handed back untouched: pending again without spending an attempt, for a subscriber
    /// that can take it (a plugin's new version no longer has the route it was leased for).
    Released(String),
}

/// What a handler returns to the delivery loop: how the delivery ended, and the execution
/// record to store in the same write that ends it.
#[derive(Debug, Clone)]
pub struct Handled {
    /// How it ended.
    pub end: End,
    /// The plugin run's record, if the handler made one.
    pub execution: Option<Execution>,
}

impl Handled {
    /// Ended as `end`, with no execution record.
    pub fn new(end: End) -> Self {
        Self { end, execution: None }
    }

    /// From a native handler's result; an error's message includes its causes.
    pub fn from_result(result: HandlerResult) -> Self {
        Self::new(match result {
            Ok(()) => End::Done,
            Err(e) => End::Failed(error_chain(&*e)),
        })
    }
}

/// An error with its causes, `outer: inner: root`.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let next = s.to_string();
        // Errors that print their source themselves would repeat it.
        if !text.ends_with(&next) {
            text.push_str(": ");
            text.push_str(&next);
        }
        source = s.source();
    }
    text
}

/// What a handler receives: the event and the API of the event's environment.
#[derive(Debug, Clone)]
pub struct EventCtx {
    /// The event.
    pub event: Event,
    /// The engine API of the event's environment, acting as `listener:<name>`.
    pub api: Env,
    /// 1-based delivery attempt.
    pub attempt: u32,
}

impl EventCtx {
    /// A context for `event` in `api`'s environment.
    pub fn new(event: Event, api: Env, attempt: u32) -> Self {
        Self { event, api, attempt }
    }

    /// `context.jobId`, or an error for events that are not about a job.
    pub fn job_id(&self) -> Result<&str> {
        self.event
            .job_id()
            .ok_or_else(|| Error::invalid(format!("event {} ({}) has no jobId", self.event.id, self.event.topic)))
    }

    /// `context.sheetId`, or an error.
    pub fn sheet_id(&self) -> Result<&str> {
        self.event
            .context_str("sheetId")
            .ok_or_else(|| Error::invalid(format!("event {} ({}) has no sheetId", self.event.id, self.event.topic)))
    }

    /// A page of the records of the event's sheet (`event.data` of `@flatfile/listener`).
    pub async fn data(&self, page_size: u32, page_number: u32) -> Result<RecordPage> {
        self.api.records(self.sheet_id()?, page_size, page_number).await
    }
}

fn native<F, Fut>(handler: F) -> Handler
where
    F: Fn(EventCtx) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = HandlerResult> + Send + 'static,
{
    Arc::new(move |e| {
        let fut = handler(e);
        Box::pin(async move { Handled::from_result(fut.await) })
    })
}

pub(crate) struct Route {
    pub(crate) topic: String,
    pub(crate) filter: Value,
    /// Names the route's subscription (`<env>/<listener>#<key>`); the route's index when `None`.
    pub(crate) key: Option<String>,
    pub(crate) handler: Handler,
}

/// A named set of routes `(topic, filter) → handler` in one environment.
pub struct Listener {
    pub(crate) name: String,
    pub(crate) environment_id: String,
    pub(crate) routes: Vec<Route>,
    pub(crate) max_in_flight: Option<usize>,
}

impl std::fmt::Debug for Listener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Listener")
            .field("name", &self.name)
            .field("environment_id", &self.environment_id)
            .field("routes", &self.routes.len())
            .finish()
    }
}

/// Routes that share one filter, built inside [`Listener::filter`].
pub struct Filtered {
    filter: Value,
    routes: Vec<Route>,
}

impl Filtered {
    /// Handles `topic` (a pattern) for events that pass the enclosing filter.
    pub fn on<F, Fut>(mut self, topic: &str, handler: F) -> Self
    where
        F: Fn(EventCtx) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = HandlerResult> + Send + 'static,
    {
        self.routes.push(Route {
            topic: topic.to_owned(),
            filter: self.filter.clone(),
            key: None,
            handler: native(handler),
        });
        self
    }
}

impl Listener {
    /// A listener called `name` (stable across restarts: it names the durable subscriptions).
    pub fn new(name: impl Into<String>, environment_id: impl Into<String>) -> Self {
        Self { name: name.into(), environment_id: environment_id.into(), routes: Vec::new(), max_in_flight: None }
    }

    /// At most `n` deliveries of this listener run at once (unbounded by default; the
    /// environment's share, [`EngineConfig::max_in_flight_per_environment`](crate::EngineConfig),
    /// still applies).
    pub fn max_in_flight(mut self, n: usize) -> Self {
        self.max_in_flight = Some(n.max(1));
        self
    }

    /// Handles `topic` for every event.
    pub fn on<F, Fut>(self, topic: &str, handler: F) -> Self
    where
        F: Fn(EventCtx) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = HandlerResult> + Send + 'static,
    {
        self.filter(Value::Null, |l| l.on(topic, handler))
    }

    /// Routes added inside `build` only receive events that pass `filter`.
    pub fn filter(mut self, filter: Value, build: impl FnOnce(Filtered) -> Filtered) -> Self {
        let built = build(Filtered { filter, routes: Vec::new() });
        self.routes.extend(built.routes);
        self
    }

    /// A route whose subscription is named by `key` instead of its position, so it keeps its
    /// id (and its pending deliveries) when other routes come and go — how plugin versions
    /// with different routes swap without losing events.
    pub fn keyed_route<F, Fut>(self, topic: &str, filter: Value, key: &str, handler: F) -> Self
    where
        F: Fn(EventCtx) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = HandlerResult> + Send + 'static,
    {
        self.push(topic, filter, Some(key), native(handler))
    }

    /// A keyed route (see [`Listener::keyed_route`]) whose handler says how the delivery ended
    /// and hands over an execution record ([`Handled`]).
    pub fn handled_route<F, Fut>(self, topic: &str, filter: Value, key: &str, handler: F) -> Self
    where
        F: Fn(EventCtx) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Handled> + Send + 'static,
    {
        self.push(topic, filter, Some(key), Arc::new(move |e| Box::pin(handler(e))))
    }

    fn push(mut self, topic: &str, filter: Value, key: Option<&str>, handler: Handler) -> Self {
        self.routes.push(Route { topic: topic.to_owned(), filter, key: key.map(str::to_owned), handler });
        self
    }

    /// The listener's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The subscription id of route `key` of listener `name` in `environment_id`.
    pub fn subscription_id(environment_id: &str, name: &str, key: &str) -> String {
        format!("{environment_id}/{name}#{key}")
    }
}
