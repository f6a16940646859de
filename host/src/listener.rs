//! Native (in-process, non-WASM) listeners and the delivery loop that feeds them.
//!
//! A [`Listener`] reads like `@flatfile/listener`:
//!
//! ```no_run
//! # use jobhost::listener::Listener;
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
//! pending deliveries and handed over when it comes back. [`Engine::run`] starts the delivery
//! loop and the watchdog; deliveries are leased, retried with backoff when a handler fails or
//! outlives its lease, and dead-lettered after the last attempt.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use serde_json::Value;
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;

use crate::engine::{Engine, Env};
use crate::error::{Error, Result};
use crate::filter::Selector;
use crate::model::{Event, Execution, RecordPage};
use crate::store::{Leased, Subscription};

/// What a handler returns. Any error fails the delivery, which is retried.
pub type HandlerResult = anyhow::Result<()>;
type HandlerFuture = Pin<Box<dyn Future<Output = HandlerResult> + Send>>;
type Handler = Arc<dyn Fn(EventCtx) -> HandlerFuture + Send + Sync>;

/// What a handler receives: the event and the API of the event's environment.
#[derive(Debug, Clone)]
pub struct EventCtx {
    /// The event.
    pub event: Event,
    /// The engine API of the event's environment, acting as `listener:<name>`.
    pub api: Env,
    /// 1-based delivery attempt.
    pub attempt: u32,
    /// Where a handler leaves its execution record when the delivery loop runs it: the loop
    /// stores the record in the same write that ends the delivery (one write instead of two
    /// per plugin delivery). `None` outside the loop.
    execution: Option<ExecutionSlot>,
}

type ExecutionSlot = Arc<std::sync::Mutex<Option<Execution>>>;

impl EventCtx {
    /// A context for `event` in `api`'s environment, outside the delivery loop.
    pub fn new(event: Event, api: Env, attempt: u32) -> Self {
        Self { event, api, attempt, execution: None }
    }

    /// Leaves the delivery's execution record to be stored with the end of the delivery.
    /// Outside the delivery loop nobody would store it, so it is handed back to the caller.
    pub fn leave_execution(&self, execution: Execution) -> Option<Execution> {
        match self.execution.as_ref().map(|slot| slot.lock()) {
            Some(Ok(mut slot)) => {
                *slot = Some(execution);
                None
            }
            _ => Some(execution),
        }
    }

    /// `context.jobId`, or an error for events that are not about a job.
    pub fn job_id(&self) -> anyhow::Result<&str> {
        self.event
            .job_id()
            .ok_or_else(|| anyhow::anyhow!("event {} ({}) has no jobId", self.event.id, self.event.topic))
    }

    /// `context.sheetId`, or an error.
    pub fn sheet_id(&self) -> anyhow::Result<&str> {
        self.event
            .context_str("sheetId")
            .ok_or_else(|| anyhow::anyhow!("event {} ({}) has no sheetId", self.event.id, self.event.topic))
    }

    /// A page of the records of the event's sheet (`event.data` of `@flatfile/listener`).
    pub async fn data(&self, page_size: u32, page_number: u32) -> anyhow::Result<RecordPage> {
        Ok(self.api.records(self.sheet_id()?, page_size, page_number).await?)
    }
}

struct Route {
    topic: String,
    filter: Value,
    /// Names the route's subscription (`<env>/<listener>#<key>`); the route's index when `None`.
    key: Option<String>,
    handler: Handler,
}

/// A named set of routes `(topic, filter) → handler` in one environment.
pub struct Listener {
    name: String,
    environment_id: String,
    routes: Vec<Route>,
    max_in_flight: Option<usize>,
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
            handler: Arc::new(move |e| Box::pin(handler(e))),
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
    pub fn keyed_route<F, Fut>(mut self, topic: &str, filter: Value, key: &str, handler: F) -> Self
    where
        F: Fn(EventCtx) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = HandlerResult> + Send + 'static,
    {
        self.routes.push(Route {
            topic: topic.to_owned(),
            filter,
            key: Some(key.to_owned()),
            handler: Arc::new(move |e| Box::pin(handler(e))),
        });
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

/// Returned by a handler (as its error) to hand a delivery back untouched: it goes back to
/// pending without spending an attempt, and waits for a subscriber that can take it. Used
/// when a plugin's new version no longer has the route a leased delivery was for.
#[derive(Debug, thiserror::Error)]
#[error("delivery released: {0}")]
pub struct Release(pub String);

/// Deliveries running in one group (a listener, or an environment) and how many may.
#[derive(Debug)]
struct Slots {
    used: AtomicUsize,
    cap: AtomicUsize,
}

impl Slots {
    fn new(cap: usize) -> Arc<Self> {
        Arc::new(Self { used: AtomicUsize::new(0), cap: AtomicUsize::new(cap) })
    }

    fn free(&self) -> usize {
        self.cap.load(Ordering::Relaxed).saturating_sub(self.used.load(Ordering::Relaxed))
    }
}

/// Holds a slot of a listener and of its environment while a delivery runs.
struct SlotGuard {
    held: [Arc<Slots>; 2],
    freed: Arc<tokio::sync::Notify>,
}

impl SlotGuard {
    fn take(held: [Arc<Slots>; 2], freed: Arc<tokio::sync::Notify>) -> Self {
        for s in &held {
            s.used.fetch_add(1, Ordering::Relaxed);
        }
        Self { held, freed }
    }
}

impl Drop for SlotGuard {
    fn drop(&mut self) {
        let mut was_full = false;
        for s in &self.held {
            was_full |= s.used.fetch_sub(1, Ordering::Relaxed) >= s.cap.load(Ordering::Relaxed);
        }
        // Only a group that was full held deliveries back; waking the loop for any other end
        // would cost a lease transaction per delivery.
        if was_full {
            self.freed.notify_one();
        }
    }
}

#[derive(Clone)]
struct RouteEntry {
    listener: String,
    handler: Handler,
    /// The listener's slots, then its environment's.
    slots: [Arc<Slots>; 2],
}

/// The routes the delivery loop serves, changeable while it runs.
struct RouteTable {
    map: std::sync::RwLock<HashMap<String, RouteEntry>>,
    /// Slots per listener (`L:<env>/<name>`) and per environment (`E:<env>`).
    groups: std::sync::Mutex<HashMap<String, Arc<Slots>>>,
    env_cap: usize,
    /// Wakes the delivery loop when routes were added.
    changed: tokio::sync::Notify,
    /// Wakes the delivery loop when a delivery ended and freed a listener's or environment's slot.
    freed: Arc<tokio::sync::Notify>,
}

/// A route as [`prepare`] hands it over: subscription id, listener, environment, cap, handler.
struct Prepared1 {
    id: String,
    listener: String,
    environment_id: String,
    max_in_flight: Option<usize>,
    handler: Handler,
}

impl RouteTable {
    fn new(env_cap: usize) -> Self {
        Self {
            map: std::sync::RwLock::new(HashMap::new()),
            groups: std::sync::Mutex::new(HashMap::new()),
            env_cap: env_cap.max(1),
            changed: tokio::sync::Notify::new(),
            freed: Arc::new(tokio::sync::Notify::new()),
        }
    }

    fn group(&self, key: String, cap: usize) -> Arc<Slots> {
        let mut groups = self.groups.lock().unwrap_or_else(|e| e.into_inner());
        let slots = groups.entry(key).or_insert_with(|| Slots::new(cap));
        slots.cap.store(cap, Ordering::Relaxed);
        slots.clone()
    }

    fn insert(&self, routes: Vec<Prepared1>) {
        let entries: Vec<(String, RouteEntry)> = routes
            .into_iter()
            .map(|r| {
                let listener_slots =
                    self.group(format!("L:{}/{}", r.environment_id, r.listener), r.max_in_flight.unwrap_or(usize::MAX));
                let env_slots = self.group(format!("E:{}", r.environment_id), self.env_cap);
                (r.id, RouteEntry { listener: r.listener, handler: r.handler, slots: [listener_slots, env_slots] })
            })
            .collect();
        self.update(|map| map.extend(entries));
    }

    /// Changes how many deliveries of a listener may run at once.
    fn set_cap(&self, environment_id: &str, listener: &str, cap: usize) {
        self.group(format!("L:{environment_id}/{listener}"), cap.max(1));
        self.freed.notify_one();
    }

    /// The subscriptions that may take deliveries now (their listener and environment both have
    /// a free slot), and the admission state that keeps a lease within those free slots.
    fn plan(&self) -> (Vec<String>, Admission) {
        let map = self.map.read().unwrap_or_else(|e| e.into_inner());
        let mut subs = Vec::new();
        let mut admission = Admission { of: HashMap::new(), free: HashMap::new() };
        for (id, entry) in map.iter() {
            let free = entry.slots.iter().map(|s| s.free()).min().unwrap_or(0);
            if free == 0 {
                continue;
            }
            subs.push(id.clone());
            let keys = entry.slots.clone().map(|s| Arc::as_ptr(&s) as usize);
            for (k, s) in keys.iter().zip(&entry.slots) {
                admission.free.entry(*k).or_insert_with(|| s.free());
            }
            admission.of.insert(id.clone(), keys);
        }
        (subs, admission)
    }

    /// Changes the map.
    fn update(&self, f: impl FnOnce(&mut HashMap<String, RouteEntry>)) {
        if let Ok(mut map) = self.map.write() {
            f(&mut map);
        }
    }

    fn get(&self, id: &str) -> Option<RouteEntry> {
        self.map.read().ok().and_then(|m| m.get(id).cloned())
    }
}

/// Decides, candidate by candidate inside the lease transaction, whether a delivery fits in its
/// listener's and environment's free slots.
struct Admission {
    of: HashMap<String, [usize; 2]>,
    free: HashMap<usize, usize>,
}

impl Admission {
    fn admit(&mut self, subscription: &str) -> bool {
        let Some(keys) = self.of.get(subscription) else { return false };
        if keys.iter().any(|k| self.free.get(k).copied().unwrap_or(0) == 0) {
            return false;
        }
        for k in keys {
            if let Some(f) = self.free.get_mut(k) {
                *f -= 1;
            }
        }
        true
    }
}

/// Running listeners and watchdog. [`Running::shutdown`] stops taking deliveries and waits for
/// in-flight handlers; dropping it without shutdown aborts them (their leases expire and the
/// deliveries are handed out again). Listeners can be added and removed while it runs.
pub struct Running {
    engine: Engine,
    stop: watch::Sender<bool>,
    tasks: tokio::sync::Mutex<JoinSet<()>>,
    routes: Arc<RouteTable>,
}

impl Running {
    /// Stops taking new deliveries, lets in-flight handlers finish, and returns.
    pub async fn shutdown(&self) {
        let _ = self.stop.send(true);
        let mut tasks = self.tasks.lock().await;
        while tasks.join_next().await.is_some() {}
    }

    /// Subscribes a listener's routes (durably) and starts delivering to them. Returns the
    /// subscription ids.
    pub async fn add(&self, listener: Listener) -> Result<Vec<String>> {
        let (subscriptions, handlers) = prepare(vec![listener])?;
        let ids: Vec<String> = subscriptions.iter().map(|s| s.id.clone()).collect();
        let now = self.engine.now();
        self.engine.store().write(move |tx| subscribe(tx, &subscriptions, now)).await?;
        self.routes.insert(handlers);
        self.routes.changed.notify_one();
        Ok(ids)
    }

    /// Changes how many deliveries of listener `name` in `environment_id` may run at once.
    pub fn set_max_in_flight(&self, environment_id: &str, name: &str, n: usize) {
        self.routes.set_cap(environment_id, name, n);
    }

    /// Stops new events from being fanned out to these subscriptions and stops delivering
    /// them. Their pending deliveries stay stored and are delivered if a listener with the same
    /// subscription returns; handlers already running finish.
    pub async fn remove(&self, ids: &[String]) -> Result<()> {
        let now = self.engine.now();
        let owned: Vec<String> = ids.to_vec();
        self.engine
            .store()
            .write(move |tx| {
                for id in &owned {
                    tx.set_subscription_active(id, false, now)?;
                }
                Ok(())
            })
            .await?;
        self.detach(ids);
        Ok(())
    }

    /// Stops delivering to these subscriptions but keeps them subscribed: new events are still
    /// stored for them as pending deliveries, delivered when a listener with the same
    /// subscription is added again. Handlers already running finish.
    pub fn detach(&self, ids: &[String]) {
        self.routes.update(|map| {
            for id in ids {
                map.remove(id);
            }
        });
    }

    /// The subscription ids being delivered to.
    pub fn subscription_ids(&self) -> Vec<String> {
        self.routes.map.read().map(|m| m.keys().cloned().collect()).unwrap_or_default()
    }
}

type Prepared = (Vec<Subscription>, Vec<Prepared1>);

/// Stores subscriptions as active, refusing any whose environment does not exist.
fn subscribe(tx: &mut dyn crate::store::Tx, subscriptions: &[Subscription], now: crate::model::Millis) -> Result<()> {
    for s in subscriptions {
        if tx.environment(&s.environment_id)?.is_none() {
            return Err(Error::not_found("environment", &s.environment_id));
        }
        tx.put_subscription(s, true, now)?;
    }
    Ok(())
}

/// Checks listeners and turns their routes into subscriptions and handlers.
fn prepare(listeners: Vec<Listener>) -> Result<Prepared> {
    let mut handlers: Vec<Prepared1> = Vec::new();
    let mut seen = std::collections::HashSet::new();
    let mut subscriptions = Vec::new();
    for listener in listeners {
        if listener.name.is_empty() || listener.name.contains('#') || listener.name.contains('/') {
            return Err(Error::invalid(format!(
                "listener name `{}` must be non-empty and without `#` or `/`",
                listener.name
            )));
        }
        for (i, route) in listener.routes.into_iter().enumerate() {
            Selector::parse(&route.topic, &route.filter)?;
            // Scoped by environment: the same plugin deployed to two tenants is two listeners.
            let key = route.key.unwrap_or_else(|| i.to_string());
            let id = Listener::subscription_id(&listener.environment_id, &listener.name, &key);
            subscriptions.push(Subscription {
                id: id.clone(),
                environment_id: listener.environment_id.clone(),
                topic: route.topic,
                filter: route.filter,
            });
            if !seen.insert(id.clone()) {
                return Err(Error::invalid(format!("subscription {id} is declared twice")));
            }
            handlers.push(Prepared1 {
                id,
                listener: listener.name.clone(),
                environment_id: listener.environment_id.clone(),
                max_in_flight: listener.max_in_flight,
                handler: route.handler,
            });
        }
    }
    Ok((subscriptions, handlers))
}

impl Engine {
    /// Registers the listeners' subscriptions, reclaims this host's stale leases, and starts
    /// the delivery loop and the watchdog.
    pub async fn run(&self, listeners: Vec<Listener>) -> Result<Running> {
        let (subscriptions, handlers) = prepare(listeners)?;
        let owner = self.host_id();
        let now = self.now();
        let reclaimed = self
            .store()
            .write(move |tx| {
                subscribe(tx, &subscriptions, now)?;
                tx.reclaim_leases(&owner, now)
            })
            .await?;
        if reclaimed > 0 {
            tracing::info!(reclaimed, "deliveries leased by this host before a restart are due again");
        }
        let routes = Arc::new(RouteTable::new(self.config().environment_share()));
        routes.insert(handlers);
        let (stop, stop_rx) = watch::channel(false);
        let mut tasks = JoinSet::new();
        tasks.spawn(dispatch_loop(self.clone(), routes.clone(), stop_rx.clone()));
        tasks.spawn(watchdog_loop(self.clone(), stop_rx));
        Ok(Running { engine: self.clone(), stop, tasks: tokio::sync::Mutex::new(tasks), routes })
    }

    /// Waits until `check` returns `Some`, re-checking after every store commit. No polling
    /// interval: it wakes exactly when something changed.
    pub async fn wait_for<T, F, Fut>(&self, mut check: F) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<Option<T>>>,
    {
        let mut commits = self.store().backend().commits();
        loop {
            commits.borrow_and_update();
            if let Some(t) = check().await? {
                return Ok(t);
            }
            commits.changed().await.map_err(|_| Error::Store("the store closed".into()))?;
        }
    }
}

async fn watchdog_loop(engine: Engine, mut stop: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(engine.config().watchdog_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => return,
        }
        if let Err(e) = engine.sweep().await {
            tracing::error!(error = %e, "watchdog sweep failed");
        }
    }
}

/// Most deliveries leased in one transaction.
const LEASE_BATCH: usize = 256;

async fn dispatch_loop(engine: Engine, routes: Arc<RouteTable>, mut stop: watch::Receiver<bool>) {
    let policy = engine.config().delivery_policy();
    let sem = Arc::new(Semaphore::new(engine.config().max_in_flight.max(1)));
    let signal = engine.store().backend().deliveries_signal();
    let owner = engine.host_id();
    let mut handlers = JoinSet::new();
    loop {
        // Registered before looking for work, so a commit in between still wakes us.
        let notified = signal.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let routes_changed = routes.changed.notified();
        tokio::pin!(routes_changed);
        routes_changed.as_mut().enable();
        let freed = routes.freed.notified();
        tokio::pin!(freed);
        freed.as_mut().enable();

        let permit = tokio::select! {
            p = sem.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
            _ = stop.changed() => break,
        };
        while handlers.try_join_next().is_some() {}
        // Only subscriptions whose listener and environment have a free slot take work.
        let (eligible, mut admission) = routes.plan();
        let eligible = Arc::new(eligible);
        let want = (1 + sem.available_permits()).min(LEASE_BATCH) as u32;
        let (s, o, now) = (eligible.clone(), owner.clone(), engine.now());
        let leased = if eligible.is_empty() {
            Ok(Vec::new())
        } else {
            engine
                .store()
                .write(move |tx| tx.lease_deliveries(&s, &o, now, want, policy, &mut |sub| admission.admit(sub)))
                .await
        };
        let leased = match leased {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(error = %e, "cannot lease deliveries; retrying");
                drop(permit);
                tokio::select! {
                    _ = tokio::time::sleep(std::time::Duration::from_millis(200)) => continue,
                    _ = stop.changed() => break,
                }
            }
        };
        if leased.is_empty() {
            drop(permit);
            let s = eligible.clone();
            let due = if s.is_empty() {
                None
            } else {
                engine.store().read(move |r| r.next_delivery_due(&s)).await.unwrap_or_else(|e| {
                    tracing::error!(error = %e, "cannot read the next delivery time");
                    Some(engine.now() + 1000)
                })
            };
            let wake = due.map(|d| engine.clock().instant_at(d.max(engine.now() + 1)));
            tokio::select! {
                _ = &mut notified => {}
                _ = &mut routes_changed => {}
                _ = &mut freed => {}
                _ = async { tokio::time::sleep_until(wake.unwrap_or_else(tokio::time::Instant::now)).await }, if wake.is_some() => {}
                _ = stop.changed() => break,
            }
            continue;
        }
        let mut first = Some(permit);
        for delivery in leased {
            let permit = match first.take() {
                Some(p) => p,
                // Only this loop takes permits and it counted them, so one is free.
                None => match sem.clone().acquire_owned().await {
                    Ok(p) => p,
                    Err(_) => break,
                },
            };
            let engine = engine.clone();
            let routes = routes.clone();
            let entry = routes.get(&delivery.subscription_id);
            let slots = entry.as_ref().map(|e| SlotGuard::take(e.slots.clone(), routes.freed.clone()));
            handlers.spawn(async move {
                handle(&engine, entry, delivery).await;
                drop(slots);
                drop(permit);
            });
        }
    }
    while handlers.join_next().await.is_some() {}
}

enum Outcome {
    Done(std::result::Result<(), String>),
    Release(String),
}

async fn handle(engine: &Engine, entry: Option<RouteEntry>, d: Leased) {
    let policy = engine.config().delivery_policy();
    let execution_slot: ExecutionSlot = Arc::default();
    let outcome = match entry {
        // The route went away after the lease (a plugin was removed or replaced).
        None => Outcome::Release(format!("no handler for subscription {} any more", d.subscription_id)),
        Some(RouteEntry { listener, handler, .. }) => {
            let api = engine.env(d.event.environment_id()).as_actor(format!("listener:{listener}")).caused_by(&d.event);
            let ctx =
                EventCtx { execution: Some(execution_slot.clone()), ..EventCtx::new(d.event.clone(), api, d.attempt) };
            let fut = handler(ctx);
            // A task of its own, so a panicking handler fails its delivery, not the host.
            let task = tokio::spawn(fut);
            let abort = task.abort_handle();
            match tokio::time::timeout(engine.config().lease, task).await {
                Ok(Ok(Ok(()))) => Outcome::Done(Ok(())),
                Ok(Ok(Err(e))) => match e.downcast::<Release>() {
                    Ok(release) => Outcome::Release(release.0),
                    Err(e) => Outcome::Done(Err(format!("{e:#}"))),
                },
                Ok(Err(join)) => Outcome::Done(Err(format!("handler panicked: {join}"))),
                Err(_) => {
                    abort.abort();
                    Outcome::Done(Err(format!(
                        "handler did not finish within its lease of {} s",
                        engine.config().lease.as_secs_f64()
                    )))
                }
            }
        }
    };
    let now = engine.now();
    let (id, attempt) = (d.delivery_id, d.attempt);
    let execution = execution_slot.lock().ok().and_then(|mut s| s.take());
    let written = match outcome {
        Outcome::Release(why) => {
            tracing::info!(delivery = id, subscription = %d.subscription_id, reason = %why, "delivery released");
            engine
                .store()
                .write(move |tx| {
                    if let Some(e) = &execution {
                        tx.insert_execution(e)?;
                    }
                    tx.release_delivery(id, attempt, now)
                })
                .await
        }
        Outcome::Done(result) => {
            if let Err(e) = &result {
                tracing::warn!(delivery = id, subscription = %d.subscription_id, topic = %d.event.topic, attempt, error = %e, "delivery failed");
            }
            engine
                .store()
                .write(move |tx| {
                    if let Some(e) = &execution {
                        tx.insert_execution(e)?;
                    }
                    tx.finish_delivery(id, attempt, result, now, policy)
                })
                .await
        }
    };
    if let Err(e) = written {
        // The lease will expire and the delivery will be handed out again.
        tracing::error!(delivery = id, error = %e, "cannot record the end of a delivery");
    }
}
