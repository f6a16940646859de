//! The delivery loop: hands leased deliveries to listeners and records how they ended.
//!
//! Everything that decides the fate of a delivery is an engine rule here, not the backend's:
//! leasing in batches within each listener's and environment's free slots, the retry backoff
//! (doubling per attempt), dead-lettering after the last attempt (also when a lease expired
//! on it), and the fence — a delivery ends only with the owner and attempt of its current
//! lease, so a host whose lease expired and was handed to another host changes nothing when
//! it finally answers. The backend supplies the primitives ([`Tx::due_deliveries`],
//! [`Tx::lease_delivery`], [`Tx::finish_delivery`]).
//!
//! Each host registers itself in the store with a heartbeat ([`Engine::run`] starts it); a
//! host that stops heartbeating is gone, and any other host's watchdog hands its leases out
//! again ([`crate::watchdog`]).

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;

use crate::Engine;
use crate::error::{Error, Result};
use crate::filter::Selector;
use crate::listener::{End, EventCtx, Handled, Handler, Listener};
use crate::model::Millis;
use crate::store::{DeliveryEnd, Fence, Leased, Subscription, Tx};

/// The delivery rules of an engine, from its [`EngineConfig`](crate::EngineConfig).
#[derive(Debug, Clone, Copy)]
pub struct Policy {
    /// How long a lease lasts before the delivery is handed out again.
    pub lease_ms: i64,
    /// Attempts before a delivery is dead-lettered.
    pub max_attempts: u32,
    /// Delay before a failed attempt is retried (doubles per attempt).
    pub backoff_ms: i64,
}

impl Policy {
    /// How attempt `attempt` that failed with `error` ends: retried after the backoff, or
    /// dead-lettered when it was the last.
    pub fn after_failure(&self, attempt: u32, error: String, now: Millis) -> DeliveryEnd {
        if attempt >= self.max_attempts {
            return DeliveryEnd::Dead { error };
        }
        let backoff = self.backoff_ms.saturating_mul(1i64 << attempt.saturating_sub(1).min(20));
        DeliveryEnd::Retry { due_at: now.saturating_add(backoff), error }
    }
}

/// Leases up to `limit` due deliveries of `subscriptions` to `owner`, oldest due first, each
/// only if `admit` accepts its subscription. A delivery whose lease expired on its last
/// attempt is dead-lettered instead (no host answered it in time, `max_attempts` times).
pub fn lease(
    tx: &mut dyn Tx,
    subscriptions: &[String],
    owner: &str,
    now: Millis,
    limit: u32,
    policy: Policy,
    admit: &mut dyn FnMut(&str) -> bool,
) -> Result<Vec<Leased>> {
    let mut leased = Vec::new();
    for due in tx.due_deliveries(subscriptions, now, limit)? {
        if !admit(&due.subscription_id) {
            continue;
        }
        if due.attempts >= policy.max_attempts {
            let mut error = String::from("no answer within the lease on the last attempt");
            if let Some(earlier) = &due.last_error {
                error.push_str(&format!(" (earlier: {earlier})"));
            }
            let end = DeliveryEnd::Dead { error };
            tx.finish_delivery(due.delivery_id, None, &end, now)?;
            tracing::warn!(delivery = due.delivery_id, subscription = %due.subscription_id, topic = %due.event.topic, attempts = due.attempts, "delivery dead-lettered: lease expired on the last attempt");
            continue;
        }
        let fence = Fence { owner: owner.to_owned(), attempt: due.attempts + 1 };
        tx.lease_delivery(due.delivery_id, &fence, now + policy.lease_ms)?;
        leased.push(Leased {
            delivery_id: due.delivery_id,
            subscription_id: due.subscription_id,
            fence,
            event: due.event,
        });
    }
    Ok(leased)
}

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
#[derive(Clone)]
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
    /// The heartbeat, stopped apart from the rest and last: while a handler of this host is
    /// still ending, the host must stay registered, or another host's watchdog takes the
    /// lease and the handler's answer is thrown away.
    stop_heartbeat: watch::Sender<bool>,
    heartbeat: tokio::sync::Mutex<JoinSet<()>>,
    routes: Arc<RouteTable>,
    _here: RunningHere,
}

/// The hosts running in this process. On a store no other process can open (`exclusive`),
/// they are the only live hosts: a host starting there reclaims the leases of every other.
static RUNNING_HERE: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());

/// Marks a host as running in this process until dropped.
struct RunningHere(String);

impl RunningHere {
    fn enter(id: &str) -> Self {
        RUNNING_HERE.lock().unwrap_or_else(|e| e.into_inner()).push(id.to_owned());
        Self(id.to_owned())
    }

    fn ids() -> Vec<String> {
        RUNNING_HERE.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl Drop for RunningHere {
    fn drop(&mut self) {
        let mut here = RUNNING_HERE.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(i) = here.iter().position(|id| *id == self.0) {
            here.swap_remove(i);
        }
    }
}

impl Running {
    /// Stops taking new deliveries, lets in-flight handlers finish and their ends be written,
    /// then removes this host's registration, and returns.
    pub async fn shutdown(&self) {
        let _ = self.stop.send(true);
        let mut tasks = self.tasks.lock().await;
        while tasks.join_next().await.is_some() {}
        let _ = self.stop_heartbeat.send(true);
        let mut heartbeat = self.heartbeat.lock().await;
        while heartbeat.join_next().await.is_some() {}
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
fn subscribe(tx: &mut dyn Tx, subscriptions: &[Subscription], now: Millis) -> Result<()> {
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
    /// Registers this host (with a heartbeat) and the listeners' subscriptions, hands out
    /// again the leases of hosts that are gone, and starts the delivery loop, the heartbeat
    /// and the watchdog.
    pub async fn run(&self, listeners: Vec<Listener>) -> Result<Running> {
        let (subscriptions, handlers) = prepare(listeners)?;
        let mut host = self.host().clone();
        host.heartbeat_at = self.now();
        let exclusive = self.store().backend().exclusive();
        let host_timeout = self.config().host_timeout.as_millis() as i64;
        let running_here = RunningHere::enter(&host.id);
        // A store only this process can open has no live host but the ones running in this
        // process; on a shared store, only hosts whose heartbeat stopped lose their leases.
        let live = if exclusive { RunningHere::ids() } else { vec![host.id.clone()] };
        let reclaimed = self
            .store()
            .write(move |tx| {
                tx.heartbeat(&host)?;
                subscribe(tx, &subscriptions, host.heartbeat_at)?;
                crate::watchdog::reclaim_gone_hosts(tx, &live, host.heartbeat_at, (!exclusive).then_some(host_timeout))
            })
            .await?;
        if reclaimed > 0 {
            tracing::info!(reclaimed, "deliveries leased by hosts that are gone are due again");
        }
        let routes = Arc::new(RouteTable::new(self.config().environment_share()));
        routes.insert(handlers);
        let (stop, stop_rx) = watch::channel(false);
        let mut tasks = JoinSet::new();
        tasks.spawn(dispatch_loop(self.clone(), routes.clone(), stop_rx.clone()));
        tasks.spawn(watchdog_loop(self.clone(), stop_rx.clone()));
        tasks.spawn(retention_loop(self.clone(), stop_rx));
        let (stop_heartbeat, heartbeat_rx) = watch::channel(false);
        let mut heartbeat = JoinSet::new();
        heartbeat.spawn(heartbeat_loop(self.clone(), heartbeat_rx));
        Ok(Running {
            engine: self.clone(),
            stop,
            tasks: tokio::sync::Mutex::new(tasks),
            stop_heartbeat,
            heartbeat: tokio::sync::Mutex::new(heartbeat),
            routes,
            _here: running_here,
        })
    }

    /// Waits until `check` returns `Some`, re-checking after every store commit. No polling
    /// interval: it wakes exactly when something changed.
    pub async fn wait_for<T, F, Fut>(&self, mut check: F) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<Option<T>>>,
    {
        let mut commits = self.store().backend().notifications().commits;
        loop {
            commits.borrow_and_update();
            if let Some(t) = check().await? {
                return Ok(t);
            }
            commits.changed().await.map_err(|_| Error::store("the store closed"))?;
        }
    }
}

/// Writes this host's heartbeat every `heartbeat_interval`; removes its registration on stop
/// (which [`Running::shutdown`] signals only once every handler's end is written).
async fn heartbeat_loop(engine: Engine, mut stop: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(engine.config().heartbeat_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => break,
        }
        let mut host = engine.host().clone();
        host.heartbeat_at = engine.now();
        if let Err(e) = engine.store().write(move |tx| tx.heartbeat(&host)).await {
            tracing::error!(error = %e, "cannot write this host's heartbeat");
        }
    }
    let id = engine.host_id();
    if let Err(e) = engine.store().write(move |tx| tx.remove_host(&id)).await {
        tracing::warn!(error = %e, "cannot remove this host's registration");
    }
}

/// Runs `work` at `first` and every `every` after, until stopped; a failure is logged as
/// `what` failing and the next tick tries again.
async fn every<F, Fut, T>(
    first: tokio::time::Instant,
    every: std::time::Duration,
    what: &'static str,
    mut stop: watch::Receiver<bool>,
    mut work: F,
) where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = crate::Result<T>>,
{
    let mut tick = tokio::time::interval_at(first, every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => return,
        }
        if let Err(e) = work().await {
            tracing::error!(error = %e, "{what} failed");
        }
    }
}

async fn watchdog_loop(engine: Engine, stop: watch::Receiver<bool>) {
    let interval = engine.config().watchdog_interval;
    every(tokio::time::Instant::now(), interval, "watchdog sweep", stop, || engine.sweep()).await;
}

async fn retention_loop(engine: Engine, stop: watch::Receiver<bool>) {
    if engine.config().retention.is_none() {
        return;
    }
    // The first sweep one interval after start: a short run (the CLI, a test) never sweeps.
    let interval = engine.config().retention_interval;
    let first = tokio::time::Instant::now() + interval;
    every(first, interval, "retention sweep", stop, || engine.prune()).await;
}

/// Most deliveries leased in one transaction.
const LEASE_BATCH: usize = 256;

async fn dispatch_loop(engine: Engine, routes: Arc<RouteTable>, mut stop: watch::Receiver<bool>) {
    let policy = engine.config().delivery_policy();
    let sem = Arc::new(Semaphore::new(engine.config().max_in_flight.max(1)));
    let signal = engine.store().backend().notifications().deliveries;
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
        let (eligible, admission) = routes.plan();
        let eligible = Arc::new(eligible);
        let want = (1 + sem.available_permits()).min(LEASE_BATCH) as u32;
        let (s, o, now) = (eligible.clone(), owner.clone(), engine.now());
        let leased = if eligible.is_empty() {
            Ok(Vec::new())
        } else {
            // The admission counts are per attempt: a retried write starts from the same slots.
            let admission = std::sync::Mutex::new(admission);
            engine
                .store()
                .write(move |tx| {
                    let mut admission = admission.lock().unwrap_or_else(|e| e.into_inner()).clone();
                    lease(tx, &s, &o, now, want, policy, &mut |sub| admission.admit(sub))
                })
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

async fn handle(engine: &Engine, entry: Option<RouteEntry>, d: Leased) {
    let policy = engine.config().delivery_policy();
    let Leased { delivery_id: id, subscription_id, fence, event } = d;
    // The handler takes the event itself (a copy is a dozen allocations); its topic stays for
    // the log lines below.
    let topic = event.topic.clone();
    let handled = match entry {
        // The route went away after the lease (a plugin was removed or replaced).
        None => Handled::new(End::Released(format!("no handler for subscription {subscription_id} any more"))),
        Some(RouteEntry { listener, handler, .. }) => {
            let api = engine.env(event.environment_id()).as_actor(format!("listener:{listener}")).caused_by(&event);
            let fut = handler(EventCtx::new(event, api, fence.attempt));
            // A task of its own, so a panicking handler fails its delivery, not the host.
            let task = tokio::spawn(fut);
            let abort = task.abort_handle();
            match tokio::time::timeout(engine.config().lease, task).await {
                Ok(Ok(handled)) => handled,
                Ok(Err(join)) => Handled::new(End::Failed(format!("handler panicked: {join}"))),
                Err(_) => {
                    abort.abort();
                    Handled::new(End::Failed(format!(
                        "handler did not finish within its lease of {} s",
                        engine.config().lease.as_secs_f64()
                    )))
                }
            }
        }
    };
    let now = engine.now();
    let Handled { end, execution } = handled;
    let end = match end {
        End::Released(why) => {
            tracing::info!(delivery = id, subscription = %subscription_id, reason = %why, "delivery released");
            None
        }
        End::Done => Some(crate::store::DeliveryEnd::Done),
        End::Failed(e) => {
            tracing::warn!(delivery = id, subscription = %subscription_id, topic = %topic, attempt = fence.attempt, error = %e, "delivery failed");
            Some(policy.after_failure(fence.attempt, e, now))
        }
        End::FailedForGood(error) => {
            tracing::warn!(delivery = id, subscription = %subscription_id, topic = %topic, attempt = fence.attempt, error = %error, "delivery dead-lettered without a retry");
            Some(crate::store::DeliveryEnd::Dead { error })
        }
    };
    let (owner, attempt) = (fence.owner.clone(), fence.attempt);
    let written = engine
        .store()
        .write(move |tx| {
            // The record of what ran is kept even when the fence refuses the end: it ran.
            if let Some(e) = &execution {
                tx.insert_execution(e)?;
            }
            match &end {
                None => tx.release_delivery(id, &fence, now),
                Some(end) => tx.finish_delivery(id, Some(&fence), end, now),
            }
        })
        .await;
    match written {
        Ok(true) => {}
        Ok(false) => tracing::warn!(
            delivery = id,
            owner = %owner,
            attempt = attempt,
            "the lease of this delivery expired and was handed on; this host's answer was not applied"
        ),
        // The lease will expire and the delivery will be handed out again.
        Err(e) => tracing::error!(delivery = id, error = %e, "cannot record the end of a delivery"),
    }
}
