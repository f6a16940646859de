//! The job engine: the lifecycle rules of `docs/job-model.md`.
//!
//! [`Engine`] owns the store and the clock; [`Env`] is the API scoped to one environment and
//! one actor — every call takes ids *of that environment*, and an id from another environment
//! is answered as not-found. Each call is one store write closure (see [`crate::store`]): it
//! checks the job's status, changes it, and writes the events of the change in the same
//! transaction. A refused call returns an [`Error`] and changes nothing.
//!
//! The engine knows the store only through its boundary (`jobhost-store`): which backend it
//! runs on is decided by whoever builds it ([`Engine::with_backend`]), in the binary.
//!
//! # Layout
//!
//! - `lib.rs`: the [`Engine`] (one per host process, with its own [`host id`](Engine::host_id))
//!   and the environment API [`Env`].
//! - [`rules`]: the transitions, as functions over one write transaction.
//! - [`routing`]: which subscriptions an event goes to, cached and invalidated by the store.
//! - [`listener`]: native listeners, the handler API, and what a handler returns.
//! - [`delivery`]: the delivery loop — leases in batches, fair shares, retries and
//!   dead letters (engine rules, not the backend's), fencing, host heartbeats.
//! - [`watchdog`]: the sweep that promotes scheduled jobs, fails abandoned ones and
//!   reclaims the leases of hosts that stopped heartbeating.
//! - `records`: the record encoding and validation.
//! - [`scenario`]: the seeds' scenario as native listeners (the demo, tests and benchmarks).
//! - [`retention`]: the sweep that deletes history older than the retention setting.
//! - [`secrets`]: environment secrets sealed with the operator's key before they are stored.
//! - `waiting`: why a job that has not ended is not moving ([`Env::waiting`]), in words.
//! - `conformance` (feature `conformance`): the suite every store backend runs.

pub mod delivery;
pub mod listener;
mod records;
pub mod retention;
pub mod routing;
pub mod rules;
pub mod scenario;
pub mod secrets;
mod waiting;
pub mod watchdog;

#[cfg(feature = "conformance")]
pub mod conformance;

pub use jobhost_core::{Error, ErrorKind, Result, StoreError, clock, error, filter, model};
pub use jobhost_store as store;

pub use delivery::Running;
pub use listener::Listener;
pub use records::FieldKey;
pub use secrets::SecretKey;

use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;

use crate::clock::Clock;
use crate::model::{
    Ack, DeadLetter, Environment, Event, Job, MAX_PAGE_SIZE, Millis, NewJob, NewRecord, Outcome, RecordCounts,
    RecordPage, RecordUpdate, Sheet, Split, new_id,
};
use crate::routing::Router;
use crate::store::{Backend, DeliveryStats, HostRecord, RawRecord, RowSink, Store};

pub use rules::SplitResult;
pub use watchdog::SweepReport;

/// Engine settings. Every default is chosen so that nothing waits forever and nothing is lost.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// A `ready` job no listener acks within this long is failed by the watchdog. `None` disables.
    pub ack_timeout: Option<Duration>,
    /// An `executing` job with no ack/progress for this long is failed (a job's own
    /// `staleTimeoutMs` overrides it). A split parent is never stale while a part is open.
    pub stale_timeout: Option<Duration>,
    /// How often the watchdog sweeps.
    pub watchdog_interval: Duration,
    /// How long a listener may take with one delivery before it is handed out again.
    pub lease: Duration,
    /// Attempts per delivery before it is dead-lettered.
    pub max_attempts: u32,
    /// Delay before retrying a failed delivery; doubles per attempt.
    pub retry_backoff: Duration,
    /// Deliveries handled at once by this host.
    pub max_in_flight: usize,
    /// Deliveries of one environment handled at once, so a busy tenant cannot take every slot
    /// (`None`: three quarters of `max_in_flight`). A host serving one environment sets it to
    /// `max_in_flight`.
    pub max_in_flight_per_environment: Option<usize>,
    /// Loop guard: how deep a chain of events caused by listeners' own calls may go.
    pub max_chain_depth: u32,
    /// Loop guard: how many events one chain may write in all.
    pub max_chain_events: u64,
    /// How often this host writes its heartbeat.
    pub heartbeat_interval: Duration,
    /// A host whose last heartbeat is older than this is gone: its leases are handed out
    /// again by any other host's watchdog.
    pub host_timeout: Duration,
    /// The key environment secrets are sealed with (`None`: secrets cannot be stored or read).
    pub secret_key: Option<SecretKey>,
    /// How long history is kept: events (unless a delivery not done points at one), done
    /// deliveries, execution records and idle loop-guard chains older than this are deleted
    /// (see [`retention`]). `None` keeps everything. Jobs, records, sheets and dead letters
    /// are never pruned.
    pub retention: Option<Duration>,
    /// How often the retention sweep runs.
    pub retention_interval: Duration,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            ack_timeout: Some(Duration::from_secs(5 * 60)),
            stale_timeout: Some(Duration::from_secs(15 * 60)),
            watchdog_interval: Duration::from_secs(1),
            lease: Duration::from_secs(5 * 60),
            max_attempts: 5,
            retry_backoff: Duration::from_millis(500),
            max_in_flight: 64,
            max_in_flight_per_environment: None,
            max_chain_depth: 64,
            max_chain_events: 1_000_000,
            heartbeat_interval: Duration::from_secs(5),
            host_timeout: Duration::from_secs(30),
            secret_key: None,
            retention: Some(Duration::from_secs(30 * 24 * 3600)),
            retention_interval: Duration::from_secs(60),
        }
    }
}

impl EngineConfig {
    /// The defaults for a host serving one environment with `max_in_flight` handlers: that
    /// environment's share is the whole host (the CLI and the benchmarks run this way).
    pub fn single_environment(max_in_flight: usize) -> Self {
        Self { max_in_flight, max_in_flight_per_environment: Some(max_in_flight), ..Self::default() }
    }

    /// Deliveries of one environment handled at once.
    pub fn environment_share(&self) -> usize {
        self.max_in_flight_per_environment
            .unwrap_or(self.max_in_flight.max(1) * 3 / 4)
            .clamp(1, self.max_in_flight.max(1))
    }

    pub(crate) fn delivery_policy(&self) -> delivery::Policy {
        delivery::Policy {
            lease_ms: self.lease.as_millis() as i64,
            max_attempts: self.max_attempts.max(1),
            backoff_ms: self.retry_backoff.as_millis() as i64,
        }
    }
}

/// The job engine. Cheap to clone; all clones share one store.
#[derive(Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

struct Inner {
    store: Store,
    clock: Clock,
    config: EngineConfig,
    router: Arc<Router>,
    /// Environments known to exist (committed). Environments are never deleted, so once seen
    /// an environment needs no lookup on each write; a deletion, if one is ever added, must
    /// clear this on every host.
    known_environments: std::sync::RwLock<std::collections::HashSet<Arc<str>>>,
    /// This process as a host of the store: a fresh id per engine, never the database's.
    host: HostRecord,
    /// Rows the retention sweep of this host deleted, per table.
    pruned: retention::Counters,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine").field("host_id", &self.host_id()).field("config", &self.inner.config).finish()
    }
}

impl Engine {
    /// An engine over a backend: one host of that store, with an id of its own. Call inside
    /// a tokio runtime.
    pub fn with_backend(backend: Arc<dyn Backend>, config: EngineConfig) -> Self {
        let clock = Clock::new();
        let now = clock.now();
        let label = format!(
            "{} pid {}",
            std::fs::read_to_string("/proc/sys/kernel/hostname").map(|h| h.trim().to_owned()).unwrap_or_default(),
            std::process::id()
        );
        let host = HostRecord { id: new_id("host"), label, started_at: now, heartbeat_at: now };
        Self {
            inner: Arc::new(Inner {
                store: Store::new(backend),
                clock,
                config,
                router: Arc::new(Router::default()),
                known_environments: Default::default(),
                host,
                pruned: Default::default(),
            }),
        }
    }

    /// The routing cache.
    pub(crate) fn router(&self) -> &Arc<Router> {
        &self.inner.router
    }

    /// This host's registration.
    pub(crate) fn host(&self) -> &HostRecord {
        &self.inner.host
    }

    /// The store.
    pub fn store(&self) -> &Store {
        &self.inner.store
    }

    /// The settings.
    pub fn config(&self) -> &EngineConfig {
        &self.inner.config
    }

    /// Current time on the engine's clock.
    pub fn now(&self) -> Millis {
        self.inner.clock.now()
    }

    /// The clock.
    pub fn clock(&self) -> Clock {
        self.inner.clock
    }

    /// This host's id: fresh per engine (per process start), the owner of its leases.
    pub fn host_id(&self) -> String {
        self.inner.host.id.clone()
    }

    /// Creates an environment.
    pub async fn create_environment(&self, name: &str) -> Result<Environment> {
        if name.trim().is_empty() {
            return Err(Error::invalid("an environment needs a name"));
        }
        let env = Environment { id: new_id("env"), name: name.to_owned(), created_at: self.now() };
        let stored = env.clone();
        self.inner.store.write(move |tx| tx.insert_environment(&stored)).await?;
        Ok(env)
    }

    /// An environment by id.
    pub async fn environment(&self, id: &str) -> Result<Environment> {
        let id = id.to_owned();
        self.inner.store.read(move |r| r.environment(&id)?.ok_or_else(|| Error::not_found("environment", id))).await
    }

    /// The environment called `name`, created if there is none.
    ///
    /// Hosts starting together on one store get the same one: the lookup and the creation
    /// run under a lock on the name.
    pub async fn environment_named(&self, name: &str) -> Result<Environment> {
        let n = name.to_owned();
        if let Some(e) = self.inner.store.read(move |r| r.environment_named(&n)).await? {
            return Ok(e);
        }
        if name.trim().is_empty() {
            return Err(Error::invalid("an environment needs a name"));
        }
        let fresh = Environment { id: new_id("env"), name: name.to_owned(), created_at: self.now() };
        self.inner
            .store
            .write(move |tx| {
                tx.lock_key(&format!("environment:{}", fresh.name))?;
                if let Some(e) = tx.environment_named(&fresh.name)? {
                    return Ok(e);
                }
                tx.insert_environment(&fresh)?;
                Ok(fresh.clone())
            })
            .await
    }

    /// Every environment, oldest first.
    pub async fn environments(&self) -> Result<Vec<Environment>> {
        self.inner.store.read(|r| r.environments()).await
    }

    /// Creates an API token for an environment. Returns its record and the token itself, which
    /// is not stored (only its SHA-256 is) and cannot be shown again.
    pub async fn create_token(&self, environment_id: &str, name: &str) -> Result<(crate::model::ApiToken, String)> {
        if name.trim().is_empty() || name.chars().count() > 200 {
            return Err(Error::invalid("a token needs a name of 1 to 200 characters"));
        }
        let secret = random_hex(32).map_err(|e| StoreError::caused_by("cannot read random bytes", e))?;
        let token = format!("jh_{secret}");
        let record = crate::model::ApiToken {
            id: new_id("tok"),
            environment_id: environment_id.to_owned(),
            name: name.to_owned(),
            created_at: self.now(),
        };
        let (hash, stored) = (token_hash(&token), record.clone());
        self.inner
            .store
            .write(move |tx| {
                if tx.environment(&stored.environment_id)?.is_none() {
                    return Err(Error::not_found("environment", &stored.environment_id));
                }
                tx.insert_token(&hash, &stored)
            })
            .await?;
        Ok((record, token))
    }

    /// Checks the store's secrets against this host's key before it serves: every sealed
    /// secret must be sealed with this key, and secrets stored before sealing existed are
    /// sealed now (in one write). Returns how many were sealed. Without a key, a store that
    /// holds any secret is refused, with what to do.
    pub async fn seal_secrets(&self) -> Result<usize> {
        let (key, now) = (self.inner.config.secret_key.clone(), self.now());
        self.inner
            .store
            .write(move |tx| {
                let all = tx.all_secrets()?;
                let Some(key) = &key else {
                    return match all.first() {
                        None => Ok(0),
                        Some(s) => Err(Error::Conflict(format!(
                            "the store holds {} secret(s) and this host has no secret key; set JOBHOST_SECRET_KEY \
                             or JOBHOST_SECRET_KEY_FILE (or --secret-key-file){}",
                            all.len(),
                            match secrets::sealed_with(&s.value) {
                                Some(fp) => format!(" to the key with fingerprint {fp}"),
                                None => ", and they will be sealed with it".into(),
                            }
                        ))),
                    };
                };
                let mut sealed = 0;
                for s in &all {
                    match secrets::sealed_with(&s.value) {
                        Some(fp) if fp == key.fingerprint() => {}
                        Some(fp) => return Err(secrets::wrong_key(&s.name, fp, Some(key))),
                        None => {
                            let value = key.seal(&s.environment_id, &s.name, &s.value)?;
                            tx.put_secret(&s.environment_id, &s.name, Some(&value), now)?;
                            sealed += 1;
                        }
                    }
                }
                Ok(sealed)
            })
            .await
    }

    /// Re-seals every secret of every environment with `new` in one write, opening each with
    /// this host's key; returns how many. Hosts still running with the old key then refuse to
    /// read secrets (naming both keys) until restarted with the new one.
    pub async fn rotate_secret_key(&self, new: &SecretKey) -> Result<usize> {
        let (old, new, now) = (self.inner.config.secret_key.clone(), new.clone(), self.now());
        self.inner
            .store
            .write(move |tx| {
                let all = tx.all_secrets()?;
                for s in &all {
                    let value = secrets::open(old.as_ref(), &s.environment_id, &s.name, &s.value)?;
                    let value = zeroize::Zeroizing::new(value);
                    tx.put_secret(
                        &s.environment_id,
                        &s.name,
                        Some(&new.seal(&s.environment_id, &s.name, &value)?),
                        now,
                    )?;
                }
                Ok(all.len())
            })
            .await
    }

    /// The token's record, when `token` is a valid API token.
    pub async fn token(&self, token: &str) -> Result<Option<crate::model::ApiToken>> {
        let hash = token_hash(token);
        self.inner.store.read(move |r| r.token(&hash)).await
    }

    /// The API token whose SHA-256 is `hash` (what a console session keeps instead of the token).
    pub async fn token_by_hash(&self, hash: &str) -> Result<Option<crate::model::ApiToken>> {
        let hash = hash.to_owned();
        self.inner.store.read(move |r| r.token(&hash)).await
    }

    /// The API tokens of an environment.
    pub async fn tokens(&self, environment_id: &str) -> Result<Vec<crate::model::ApiToken>> {
        let env = environment_id.to_owned();
        self.inner.store.read(move |r| r.tokens(&env)).await
    }

    /// Revokes a token of an environment; false when it has no such token.
    pub async fn revoke_token(&self, environment_id: &str, id: &str) -> Result<bool> {
        let (env, id) = (environment_id.to_owned(), id.to_owned());
        self.inner.store.write(move |tx| tx.delete_token(&env, &id)).await
    }

    /// The API of one environment, acting as `system`.
    pub fn env(&self, environment_id: impl Into<String>) -> Env {
        Env {
            engine: self.clone(),
            env: Arc::from(environment_id.into()),
            actor: Arc::from("system"),
            cause: None,
            budget: None,
        }
    }

    /// What `/metrics` reports about the store: jobs per status, and plugin deliveries per
    /// outcome with their total duration (µs). All environments.
    pub async fn store_metrics(&self) -> Result<(Vec<(String, u64)>, Vec<(String, u64, u64)>)> {
        self.inner.store.read(|r| Ok((r.job_status_counts()?, r.execution_stats()?))).await
    }

    /// Delivery counts across all environments.
    pub async fn delivery_stats(&self) -> Result<DeliveryStats> {
        self.inner.store.read(|r| r.delivery_stats()).await
    }

    /// Jobs per status (all environments).
    pub async fn job_status_counts(&self) -> Result<Vec<(String, u64)>> {
        self.inner.store.read(|r| r.job_status_counts()).await
    }

    /// Delivery counts of the deliveries not done, read without scanning history (`done` is 0).
    pub async fn open_delivery_stats(&self) -> Result<DeliveryStats> {
        self.inner.store.read(|r| r.open_delivery_stats()).await
    }

    /// The store's size, read without scanning tables.
    pub async fn store_size(&self) -> Result<crate::store::StoreSize> {
        self.inner.store.read(|r| r.size()).await
    }

    /// Runs one retention sweep now (the background task runs it every `retention_interval`):
    /// deletes the history older than `retention`.
    pub async fn prune(&self) -> Result<retention::Pruned> {
        match self.inner.config.retention {
            Some(keep) => retention::prune(self, self.now() - keep.as_millis() as Millis).await,
            None => Ok(retention::Pruned::default()),
        }
    }

    /// Rows the retention sweeps of this host deleted since it started.
    pub fn pruned_total(&self) -> retention::Pruned {
        self.inner.pruned.total()
    }

    /// Runs one watchdog sweep now (the background task calls this every `watchdog_interval`).
    pub async fn sweep(&self) -> Result<SweepReport> {
        watchdog::sweep(self).await
    }
}

/// The engine API scoped to one environment and one actor.
#[derive(Clone)]
pub struct Env {
    engine: Engine,
    env: Arc<str>,
    actor: Arc<str>,
    cause: Option<Arc<rules::Cause>>,
    budget: Option<Arc<EventBudget>>,
}

/// The events one delivery's calls may write, all calls together ([`Env::with_event_budget`]).
///
/// A call whose events would pass the budget is refused with [`Error::Limit`] inside its
/// transaction, so it writes nothing; the events of calls that committed are counted.
#[derive(Debug)]
pub struct EventBudget {
    max: u64,
    used: std::sync::atomic::AtomicU64,
    refused: std::sync::atomic::AtomicBool,
}

impl EventBudget {
    /// A budget of `max` events.
    pub fn new(max: u64) -> Self {
        Self { max, used: Default::default(), refused: Default::default() }
    }

    /// Events written so far by calls that committed.
    pub fn used(&self) -> u64 {
        self.used.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The budget.
    pub fn max(&self) -> u64 {
        self.max
    }

    /// Whether a call was refused for passing it.
    pub fn refused(&self) -> bool {
        self.refused.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl std::fmt::Debug for Env {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Env").field("environment_id", &self.env).field("actor", &self.actor).finish()
    }
}

/// The calls that move a job, for [`Env::transition`].
#[derive(Debug, Clone)]
enum Call {
    Execute,
    Ack(Ack),
    Complete(Outcome),
    Fail(Outcome),
    Cancel(Option<String>),
    Retry,
    AcknowledgeOutcome,
}

impl Env {
    /// The same environment, acting as `actor` (recorded as `actorId` in events).
    pub fn as_actor(&self, actor: impl Into<String>) -> Env {
        Env { actor: Arc::from(actor.into()), ..self.clone() }
    }

    /// The same environment and actor, for calls made while handling `event`: the events
    /// they write join `event`'s chain one level deeper, and the loop guard
    /// ([`EngineConfig::max_chain_depth`], [`EngineConfig::max_chain_events`]) applies.
    pub fn caused_by(&self, event: &Event) -> Env {
        Env { cause: Some(Arc::new(rules::Cause::of(event))), ..self.clone() }
    }

    /// The same environment, actor and cause, with every write charged to `budget`: a call
    /// whose events would pass it is refused with a `limit` error and changes nothing.
    pub fn with_event_budget(&self, budget: Arc<EventBudget>) -> Env {
        Env { budget: Some(budget), ..self.clone() }
    }

    /// The environment id.
    pub fn id(&self) -> &str {
        &self.env
    }

    /// The engine.
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    fn ctx(&self) -> rules::Ctx {
        rules::Ctx {
            router: self.engine.inner.router.clone(),
            routes: Default::default(),
            env: self.env.to_string(),
            actor: self.actor.to_string(),
            now: self.engine.now(),
            cause: self.cause.as_deref().cloned(),
            emitted: Default::default(),
        }
    }

    /// Runs `f` as one write of this environment. `f` may run more than once (a retried
    /// serialization failure), each time with a fresh context and nothing of the earlier run kept.
    async fn write<T: Send + 'static>(
        &self,
        f: impl Fn(&mut dyn crate::store::Tx, &rules::Ctx) -> Result<T> + Send + Sync + 'static,
    ) -> Result<T> {
        // The context is made here, on the caller's task: the clock reads tokio's time, which
        // a test may have paused, and the store's writer is not a tokio thread.
        let seed = self.ctx();
        let (env, actor, now, cause, router) = (seed.env, seed.actor, seed.now, seed.cause, seed.router);
        let known = self.engine.inner.known_environments.read().is_ok_and(|k| k.contains(&self.env));
        let config = &self.engine.inner.config;
        let (max_depth, max_events) = (config.max_chain_depth, config.max_chain_events);
        let budget = self.budget.clone();
        let (budget_used, budget_max) = budget.as_ref().map_or((0, u64::MAX), |b| (b.used(), b.max));
        let charged = budget.clone();
        if let Some(cause) = &self.cause
            && cause.depth > max_depth
        {
            return Err(Error::Limit(format!(
                "loop guard: this call would write events at depth {} of chain {} (at most {max_depth}); \
                 a listener's actions keep re-triggering listeners",
                cause.depth, cause.chain
            )));
        }
        let written = self
            .engine
            .inner
            .store
            .write(move |tx| {
                let ctx = rules::Ctx {
                    router: router.clone(),
                    routes: Default::default(),
                    env: env.clone(),
                    actor: actor.clone(),
                    now,
                    cause: cause.clone(),
                    emitted: Default::default(),
                };
                if !known && tx.environment(&ctx.env)?.is_none() {
                    return Err(Error::not_found("environment", &ctx.env));
                }
                let out = f(tx, &ctx)?;
                let emitted = ctx.emitted.get();
                if let Some(b) = charged.as_ref().filter(|_| budget_used.saturating_add(emitted) > budget_max) {
                    b.refused.store(true, std::sync::atomic::Ordering::Relaxed);
                    let events = if emitted == 1 { "1 event" } else { &format!("{emitted} events") };
                    return Err(Error::Limit(format!(
                        "this call would write {events} after the {budget_used} this delivery wrote; \
                         the plugin's max_events_per_delivery is {budget_max}"
                    )));
                }
                if let Some(cause) = &ctx.cause
                    && emitted > 0
                {
                    let total = tx.charge_chain(&cause.chain, emitted, ctx.now)?;
                    if total > max_events {
                        return Err(Error::Limit(format!(
                            "loop guard: chain {} would reach {total} events (at most {max_events}); \
                             a listener's actions keep re-triggering listeners",
                            cause.chain
                        )));
                    }
                }
                Ok((out, emitted))
            })
            .await;
        let written = written.map(|(out, emitted)| {
            if let Some(b) = &budget {
                b.used.fetch_add(emitted, std::sync::atomic::Ordering::Relaxed);
            }
            out
        });
        // Committed, so the environment it found is committed too.
        if !known
            && written.is_ok()
            && let Ok(mut k) = self.engine.inner.known_environments.write()
        {
            k.insert(self.env.clone());
        }
        written
    }

    async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut dyn crate::store::ReadTx, &str) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let env = self.env.clone();
        self.engine.inner.store.read(move |r| f(r, &env)).await
    }

    // ---- sheets and records ----

    /// Creates a sheet.
    pub async fn create_sheet(&self, name: &str) -> Result<Sheet> {
        if name.trim().is_empty() {
            return Err(Error::invalid("a sheet needs a name"));
        }
        let name = name.to_owned();
        self.write(move |tx, ctx| {
            let sheet = Sheet {
                id: new_id("sh"),
                environment_id: ctx.env.clone(),
                name: name.clone(),
                workbook_id: None,
                created_at: ctx.now,
            };
            tx.insert_sheet(&sheet)?;
            Ok(sheet)
        })
        .await
    }

    /// Sheets of the environment, newest first.
    pub async fn sheets(&self, offset: u64, limit: u32) -> Result<Vec<Sheet>> {
        self.read(move |r, env| r.sheets(env, offset, limit)).await
    }

    /// A sheet by id.
    pub async fn sheet(&self, id: &str) -> Result<Sheet> {
        let id = id.to_owned();
        self.read(move |r, env| r.sheet(env, &id)?.ok_or_else(|| Error::not_found("sheet", id))).await
    }

    /// Appends records to a sheet, atomically: either all are stored or none. Returns how many.
    pub async fn insert_records(&self, sheet_id: &str, records: Vec<NewRecord>) -> Result<u64> {
        records::validate_new(&records)?;
        let sheet_id = sheet_id.to_owned();
        self.write(move |tx, ctx| {
            rules::require_sheet(tx, ctx, &sheet_id)?;
            let n = records::insert(tx, &sheet_id, &records, ctx.now)?;
            rules::emit_records_event(tx, ctx, &sheet_id, "records:created", n)?;
            Ok(n)
        })
        .await
    }

    /// Updates records of a sheet by id (values merged, messages replaced when given),
    /// atomically. Returns how many records changed.
    pub async fn update_records(&self, sheet_id: &str, updates: Vec<RecordUpdate>) -> Result<u64> {
        let updates = records::parse_updates(updates)?;
        let sheet_id = sheet_id.to_owned();
        self.write(move |tx, ctx| {
            rules::require_sheet(tx, ctx, &sheet_id)?;
            let n = records::apply_updates(tx, &sheet_id, &updates, ctx.now)?;
            rules::emit_records_event(tx, ctx, &sheet_id, "records:updated", n)?;
            Ok(n)
        })
        .await
    }

    /// Deletes records of a sheet by id, atomically: an id that is not a record of this sheet
    /// refuses the whole call. Later records move up, so pages stay dense; a deletion costs a
    /// write per record after the first one deleted. Returns how many were deleted.
    pub async fn delete_records(&self, sheet_id: &str, ids: Vec<String>) -> Result<u64> {
        if ids.len() > MAX_PAGE_SIZE as usize {
            return Err(Error::invalid(format!("at most {MAX_PAGE_SIZE} ids per deletion, not {}", ids.len())));
        }
        let mut rowids = ids.iter().map(|id| records::parse_record_id(id)).collect::<Result<Vec<_>>>()?;
        rowids.sort_unstable();
        rowids.dedup();
        let sheet_id = sheet_id.to_owned();
        self.write(move |tx, ctx| {
            rules::require_sheet(tx, ctx, &sheet_id)?;
            if let Some(missing) = tx.delete_records(&sheet_id, &rowids)? {
                return Err(Error::not_found("record", format!("rec_{missing}")));
            }
            let n = rowids.len() as u64;
            if n > 0 {
                rules::emit_records_event(tx, ctx, &sheet_id, "records:deleted", n)?;
            }
            Ok(n)
        })
        .await
    }

    /// Record counts of a sheet.
    pub async fn record_counts(&self, sheet_id: &str) -> Result<RecordCounts> {
        let sheet_id = sheet_id.to_owned();
        self.read(move |r, env| {
            r.sheet(env, &sheet_id)?.ok_or_else(|| Error::not_found("sheet", &sheet_id))?;
            r.record_counts(&sheet_id)
        })
        .await
    }

    /// One page of a sheet's records, in stable order. `page_size` ≤ 10,000; `page_number` ≥ 1.
    pub async fn records(&self, sheet_id: &str, page_size: u32, page_number: u32) -> Result<RecordPage> {
        let rows = self.record_rows(sheet_id, page_size, page_number).await?;
        Ok(RecordPage { records: records::decode_rows(rows)?, page_number, page_size })
    }

    /// Appends to `out` the JSON of [`records`](Self::records)' page, written straight from the
    /// stored rows: the same bytes as serializing that page, at a fraction of the cost (what
    /// the API serves). Nothing is appended when the call fails.
    pub async fn records_json(
        &self,
        sheet_id: &str,
        page_size: u32,
        page_number: u32,
        out: &mut Vec<u8>,
    ) -> Result<()> {
        let rows = self.record_rows(sheet_id, page_size, page_number).await?;
        let start = out.len();
        out.reserve(64 + rows.iter().map(|r| 2 * r.values.len() + 64).sum::<usize>());
        records::write_page_json(&rows, page_number, page_size, out).inspect_err(|_| out.truncate(start))
    }

    /// One page as stored rows, undecoded — for runtimes that convert rows into their own
    /// shape without building [`Record`](crate::model::Record)s first.
    pub async fn record_rows(&self, sheet_id: &str, page_size: u32, page_number: u32) -> Result<Vec<RawRecord>> {
        let offset = page_offset(page_size, page_number)?;
        let sheet_id = sheet_id.to_owned();
        self.read(move |r, env| {
            r.sheet(env, &sheet_id)?.ok_or_else(|| Error::not_found("sheet", &sheet_id))?;
            r.record_rows(&sheet_id, offset, page_size)
        })
        .await
    }

    /// One page handed to `sink` on the store's read thread, its rows borrowed from the
    /// store's buffers ([`ReadTx::visit_record_rows`](crate::store::ReadTx::visit_record_rows)):
    /// for runtimes that turn rows into their own shape, with no `String` per row and the work
    /// done where the rows are read. Returns the sink, filled; the same checks and errors as
    /// [`record_rows`](Self::record_rows).
    pub async fn record_page_into<S: RowSink + Send + 'static>(
        &self,
        sheet_id: &str,
        page_size: u32,
        page_number: u32,
        mut sink: S,
    ) -> Result<S> {
        let offset = page_offset(page_size, page_number)?;
        let sheet_id = sheet_id.to_owned();
        self.read(move |r, env| {
            r.sheet(env, &sheet_id)?.ok_or_else(|| Error::not_found("sheet", &sheet_id))?;
            r.visit_record_rows(&sheet_id, offset, page_size, &mut sink)?;
            Ok(sink)
        })
        .await
    }

    // ---- jobs ----

    /// Creates a job (`ready` for `immediate`, `created` for `manual`, or `waiting`/`scheduled`).
    pub async fn create_job(&self, new: NewJob) -> Result<Job> {
        self.write(move |tx, ctx| rules::create(tx, ctx, new.clone())).await
    }

    /// A job by id.
    pub async fn job(&self, id: &str) -> Result<Job> {
        let id = id.to_owned();
        self.read(move |r, env| r.job(env, &id)?.ok_or_else(|| Error::not_found("job", id))).await
    }

    /// Jobs of the environment, oldest first (`offset`/`limit` paging).
    pub async fn jobs(&self, offset: u64, limit: u32) -> Result<Vec<Job>> {
        self.read(move |r, env| r.jobs(env, None, offset, limit)).await
    }

    /// Jobs that match `query`, newest first (a parent's parts by index), `offset`/`limit`
    /// paging. A `query.parent` of another environment (or none) is not found.
    pub async fn find_jobs(&self, query: crate::store::JobQuery, offset: u64, limit: u32) -> Result<Vec<Job>> {
        self.read(move |r, env| {
            if let Some(parent) = &query.parent {
                r.job(env, parent)?.ok_or_else(|| Error::not_found("job", parent))?;
            }
            r.find_jobs(env, &query, offset, limit)
        })
        .await
    }

    /// How many jobs match `query` (whatever their status), per status.
    pub async fn count_jobs(&self, query: crate::store::JobQuery) -> Result<Vec<(crate::model::JobStatus, u64)>> {
        self.read(move |r, env| r.count_jobs(env, &query)).await
    }

    /// The statuses of a job's parts, by part index.
    pub async fn part_statuses(&self, id: &str) -> Result<Vec<crate::model::JobStatus>> {
        let id = id.to_owned();
        self.read(move |r, env| {
            r.job(env, &id)?.ok_or_else(|| Error::not_found("job", &id))?;
            r.part_statuses(env, &id)
        })
        .await
    }

    /// The parts of a job, by part index.
    pub async fn parts(&self, id: &str) -> Result<Vec<Job>> {
        let id = id.to_owned();
        self.read(move |r, env| {
            r.job(env, &id)?.ok_or_else(|| Error::not_found("job", &id))?;
            r.jobs(env, Some(&id), 0, u32::MAX)
        })
        .await
    }

    async fn transition(&self, id: &str, call: Call) -> Result<Job> {
        let id = id.to_owned();
        self.write(move |tx, ctx| {
            // Only what can end a part (and so change its parent's counts) locks the parent.
            let job = match call {
                Call::Execute | Call::Ack(_) | Call::AcknowledgeOutcome => rules::load_alone(tx, ctx, &id)?,
                _ => rules::load(tx, ctx, &id)?,
            };
            match call.clone() {
                Call::Execute => rules::execute(tx, ctx, job),
                Call::Ack(a) => rules::ack(tx, ctx, job, a),
                Call::Complete(o) => rules::complete(tx, ctx, job, o),
                Call::Fail(o) => rules::fail(tx, ctx, job, o),
                Call::Cancel(info) => rules::cancel(tx, ctx, job, info),
                Call::Retry => rules::retry(tx, ctx, job),
                Call::AcknowledgeOutcome => rules::acknowledge_outcome(tx, ctx, job),
            }
        })
        .await
    }

    /// `created` → `ready` (or `waiting`/`scheduled`).
    pub async fn execute(&self, id: &str) -> Result<Job> {
        self.transition(id, Call::Execute).await
    }

    /// `ready`/`executing` → `executing`, updating info/progress/estimate. Repeatable.
    pub async fn ack(&self, id: &str, ack: Ack) -> Result<Job> {
        self.transition(id, Call::Ack(ack)).await
    }

    /// `ready`/`executing` → `complete`.
    pub async fn complete(&self, id: &str, outcome: Outcome) -> Result<Job> {
        self.transition(id, Call::Complete(outcome)).await
    }

    /// `ready`/`executing` → `failed`.
    pub async fn fail(&self, id: &str, outcome: Outcome) -> Result<Job> {
        self.transition(id, Call::Fail(outcome)).await
    }

    /// Any non-terminal status → `canceled`, cascading to the job's open parts.
    pub async fn cancel(&self, id: &str, info: Option<String>) -> Result<Job> {
        self.transition(id, Call::Cancel(info)).await
    }

    /// `failed` → `ready` with `attempt + 1`.
    pub async fn retry(&self, id: &str) -> Result<Job> {
        self.transition(id, Call::Retry).await
    }

    /// Records that a terminal job's outcome was seen.
    pub async fn acknowledge_outcome(&self, id: &str) -> Result<Job> {
        self.transition(id, Call::AcknowledgeOutcome).await
    }

    /// Splits an `executing` job into parts.
    pub async fn split(&self, id: &str, split: Split) -> Result<SplitResult> {
        let id = id.to_owned();
        self.write(move |tx, ctx| {
            let job = rules::load(tx, ctx, &id)?;
            rules::split(tx, ctx, job, split.clone())
        })
        .await
    }

    /// Sets the `info` of a job that has not ended, without changing its status or writing an
    /// event: how the host says on the job why a listener's delivery for it failed. Returns
    /// false when the job already ended (its outcome stands).
    pub async fn annotate(&self, id: &str, info: String) -> Result<bool> {
        let id = id.to_owned();
        self.write(move |tx, ctx| {
            let mut job = rules::load(tx, ctx, &id)?;
            if job.status.is_terminal() {
                return Ok(false);
            }
            job.info = Some(info.clone());
            job.updated_at = ctx.now;
            tx.update_job(&job)?;
            Ok(true)
        })
        .await
    }

    // ---- secrets ----

    /// Stores (or replaces) a secret of this environment.
    pub async fn set_secret(&self, name: &str, value: &str) -> Result<()> {
        crate::model::validate_secret_name(name).map_err(|e| Error::invalid(e.0))?;
        if value.len() > crate::model::MAX_SECRET_BYTES {
            return Err(Error::invalid(format!(
                "a secret is at most {} bytes, not {}",
                crate::model::MAX_SECRET_BYTES,
                value.len()
            )));
        }
        let key = self.engine.inner.config.secret_key.as_ref().ok_or_else(secrets::no_key)?;
        let sealed = key.seal(&self.env, name, value)?;
        let name = name.to_owned();
        self.write(move |tx, ctx| tx.put_secret(&ctx.env, &name, Some(&sealed), ctx.now)).await
    }

    /// Deletes a secret; false when there was none.
    pub async fn delete_secret(&self, name: &str) -> Result<bool> {
        let name = name.to_owned();
        self.write(move |tx, ctx| tx.put_secret(&ctx.env, &name, None, ctx.now))
            .await
            .map(|_| true)
            .or_else(|e| if e.kind() == crate::ErrorKind::NotFound { Ok(false) } else { Err(e) })
    }

    /// A secret's value.
    pub async fn secret(&self, name: &str) -> Result<String> {
        let key = self.engine.inner.config.secret_key.clone();
        let name = name.to_owned();
        self.read(move |r, env| {
            let stored = r.secret(env, &name)?.ok_or_else(|| Error::not_found("secret", &name))?;
            secrets::open(key.as_ref(), env, &name, &stored)
        })
        .await
    }

    /// The names of the environment's secrets (never their values), sorted.
    pub async fn secret_names(&self) -> Result<Vec<String>> {
        self.read(|r, env| r.secret_names(env)).await
    }

    // ---- events ----

    /// Events after the cursor `after_seq` (0 for the start), oldest first.
    pub async fn events(&self, after_seq: i64, limit: u32) -> Result<Vec<Event>> {
        self.read(move |r, env| r.events(env, after_seq, limit)).await
    }

    /// The `seq` of the environment's newest event (0 when there is none yet).
    pub async fn last_event_seq(&self) -> Result<i64> {
        self.read(|r, env| r.last_event_seq(env)).await
    }

    /// Every event of one job, oldest first.
    pub async fn job_events(&self, job_id: &str) -> Result<Vec<Event>> {
        let job_id = job_id.to_owned();
        self.read(move |r, env| r.job_events(env, &job_id)).await
    }

    /// Stores the record of one plugin delivery.
    pub async fn record_execution(&self, execution: crate::model::Execution) -> Result<i64> {
        self.engine.inner.store.write(move |tx| tx.insert_execution(&execution)).await
    }

    /// Execution records of this environment (optionally of one job), oldest first.
    pub async fn executions(&self, job_id: Option<&str>, limit: u32) -> Result<Vec<crate::model::Execution>> {
        let job_id = job_id.map(str::to_owned);
        self.read(move |r, env| r.executions(env, job_id.as_deref(), limit)).await
    }

    /// Deliveries that exhausted their attempts.
    pub async fn dead_letters(&self) -> Result<Vec<DeadLetter>> {
        self.read(|r, env| r.dead_letters(env)).await
    }

    /// Gives a dead letter a new round of attempts, due now: its listener gets the event
    /// again. Not found when it is not (or no longer) a dead letter of this environment.
    pub async fn redeliver(&self, delivery_id: i64) -> Result<()> {
        self.write(move |tx, ctx| {
            if tx.redeliver_dead(&ctx.env, delivery_id, ctx.now)? {
                Ok(())
            } else {
                Err(Error::not_found("dead letter", delivery_id.to_string()))
            }
        })
        .await
    }

    /// Builds an event's context for a custom event emitter (used by listener tests).
    pub fn context(&self, job_id: Option<&str>) -> Value {
        serde_json::json!({ "environmentId": &*self.env, "jobId": job_id, "actorId": &*self.actor })
    }
}

/// Where page `page_number` (1-based) of `page_size` records starts, or why it is no page.
fn page_offset(page_size: u32, page_number: u32) -> Result<u64> {
    if page_size == 0 || page_size > MAX_PAGE_SIZE {
        return Err(Error::invalid(format!("pageSize must be 1..={MAX_PAGE_SIZE}, not {page_size}")));
    }
    if page_number == 0 {
        return Err(Error::invalid("pageNumber is 1-based; 0 is not a page"));
    }
    Ok(u64::from(page_number - 1) * u64::from(page_size))
}

/// The SHA-256 of a token, hex: what the store keeps.
pub fn token_hash(token: &str) -> String {
    crate::model::sha256_hex(token.as_bytes(), 32)
}

/// `n` bytes from the operating system's random source, in hex: tokens and session ids.
pub fn random_hex(n: usize) -> std::io::Result<String> {
    use std::io::Read;
    let mut bytes = vec![0u8; n];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}
