//! The WebAssembly listener runtime.
//!
//! - [`Runtime`] fixes jobhost's wasmtime choices in one place: the component model, async
//!   host calls, epoch interruption (a 10 ms ticker thread), the pooling allocator (a clear
//!   startup error if it cannot reserve its pool — never a silent fallback) and the
//!   compilation cache ([`compiled`]: a restart maps what it compiled before, it does not
//!   recompile).
//! - [`Plugin`] is one loaded component: compiled once, type-checked against the `plugin` world
//!   and pre-instantiated once (`InstancePre`), with the subscriptions it declared at load.
//! - [`Runtime::listener`] turns a plugin into a [`Listener`], so
//!   plugins get the same delivery loop as native listeners (leases, retries, dead letters).
//!   Each delivery runs in a **fresh `Store` and instance** with a memory cap, an epoch
//!   deadline for CPU and a wall-clock timeout that also covers time blocked in host calls,
//!   and leaves an [`Execution`] record.
//! - [`limits`] holds the per-plugin [`Limits`] and capabilities ([`Grants`]) and parses the
//!   operator's manifest (`NAME.toml` beside `NAME.wasm`) that overrides them.
//! - `host` implements the imports against the engine, always inside the event's
//!   environment and within the plugin's limits; `convert` maps engine types to WIT types.

mod bindings;
pub mod compiled;
mod convert;
mod digests;
mod host;
pub mod incremental;
pub mod limits;
pub mod outbound;

pub(crate) use jobhost_engine::{Env, error, filter, listener, model, store};

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use wasmtime::component::{Component, HasSelf, Linker};
use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig, Store, UpdateDeadline};

use crate::filter::Selector;
use crate::listener::{End, EventCtx, Handled, Listener};
use crate::model::{Execution, ExecutionOutcome};

pub use host::{HostState, PageStats};
pub use limits::{Ceiling, DirGrant, Grants, Limits, Manifest, ManifestError};

/// Settings of the runtime. Defaults are safe for untrusted plugins.
#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    /// Limits of a plugin without a manifest; a manifest overrides them key by key.
    pub limits: Limits,
    /// The most memory a manifest may give one instance (the pooling allocator's slot size).
    pub max_memory: usize,
    /// Instances that may exist at once, all plugins together (the pooling allocator's size).
    pub max_instances: u32,
    /// Meter fuel, so manifests may set a `fuel` limit. Off by default: it slows every guest.
    pub fuel: bool,
    /// Compilation cache directory (see [`compiled`]); `None` disables the cache.
    pub cache_dir: Option<PathBuf>,
    /// Bytes the compilation cache may hold; past it, the least recently used artifacts go.
    pub cache_max_bytes: u64,
    /// Bytes of Cranelift's incremental cache in memory (see [`incremental`]), which makes a
    /// new version of a large plugin compile only the functions that changed; `None` turns
    /// it off.
    pub incremental_cache: Option<usize>,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        Self {
            limits: Limits::default(),
            max_memory: 256 << 20,
            max_instances: 256,
            fuel: false,
            cache_dir: default_cache_dir(),
            cache_max_bytes: DEFAULT_CACHE_MAX_BYTES,
            incremental_cache: Some(DEFAULT_INCREMENTAL_CACHE),
        }
    }
}

/// The default budget of the compilation cache on disk: a few hundred versions of compiled
/// Rust plugins, or dozens of Python and JavaScript ones (~50–90 MB each).
pub const DEFAULT_CACHE_MAX_BYTES: u64 = 4 << 30;

/// The default size of the incremental compilation cache: enough for the code of a few
/// versions of an interpreted guest.
pub const DEFAULT_INCREMENTAL_CACHE: usize = 512 << 20;

/// `$XDG_CACHE_HOME/jobhost/wasmtime`, or `~/.cache/jobhost/wasmtime`.
pub fn default_cache_dir() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
    Some(base.join("jobhost").join("wasmtime"))
}

/// Why a plugin could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The manifest beside the component is invalid.
    #[error("{reason}")]
    Manifest {
        /// Why, naming the file and the key.
        reason: String,
    },
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Not a valid component, or compilation failed.
    #[error("{path} is not a valid WebAssembly component: {reason}")]
    Compile {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The component does not fit the `jobhost:plugin` world.
    #[error("{path} does not fit the jobhost:plugin world: {reason}")]
    World {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// Its subscriptions could not be read or are invalid.
    #[error("{path}: bad subscriptions: {reason}")]
    Subscriptions {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
}

/// One route a plugin declared.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct Route {
    /// Topic pattern.
    pub topic: String,
    /// Filter object, `null` for none.
    pub filter: serde_json::Value,
}

impl Route {
    /// A key derived from the route's content: the same route in two versions of a plugin
    /// has the same key, so its subscription (and its pending deliveries) survive a swap.
    pub fn key(&self) -> String {
        crate::model::sha256_hex(format!("{}\n{}", self.topic, self.filter).as_bytes(), 6)
    }
}

/// A loaded plugin: compiled, type-checked and pre-instantiated.
pub struct Plugin {
    /// The file name without `.wasm`.
    pub name: String,
    /// First 16 hex digits of the SHA-256 of the file: the plugin's version.
    pub version: String,
    /// Where it was loaded from.
    pub path: PathBuf,
    /// Its routes, in the order the plugin declared them.
    pub routes: Vec<Route>,
    /// Each route's [`Route::key`], in the same order: a delivery looks its route up by key,
    /// and a key is a hash of the route's text, too dear to compute per delivery.
    route_keys: Arc<[String]>,
    /// Its limits, capabilities and configuration.
    pub manifest: Arc<Manifest>,
    pre: bindings::PluginPre<HostState>,
    /// Slots for its outbound HTTP requests in flight (`http_in_flight`).
    http_slots: Arc<tokio::sync::Semaphore>,
}

impl Plugin {
    /// The same component with another manifest (a manifest-only change reloads without
    /// compiling again).
    pub fn with_manifest(&self, manifest: Manifest) -> Plugin {
        Plugin {
            name: self.name.clone(),
            version: self.version.clone(),
            path: self.path.clone(),
            routes: self.routes.clone(),
            route_keys: self.route_keys.clone(),
            http_slots: Arc::new(tokio::sync::Semaphore::new(manifest.limits.http.max_in_flight)),
            manifest: Arc::new(manifest),
            pre: self.pre.clone(),
        }
    }

    /// The index of the route with `key` in this version.
    pub fn route_index(&self, key: &str) -> Option<u32> {
        self.route_keys.iter().position(|k| k == key).map(|i| i as u32)
    }
}

/// The current version of a plugin, swappable while deliveries run. A delivery takes the
/// version current when it starts and keeps it to the end; the next delivery sees the new one.
#[derive(Debug)]
pub struct PluginSlot {
    current: std::sync::RwLock<Arc<Plugin>>,
}

impl PluginSlot {
    /// A slot holding `plugin`.
    pub fn new(plugin: Arc<Plugin>) -> Arc<Self> {
        Arc::new(Self { current: std::sync::RwLock::new(plugin) })
    }

    /// The current version.
    pub fn get(&self) -> Arc<Plugin> {
        self.current.read().map(|p| p.clone()).unwrap_or_else(|e| e.into_inner().clone())
    }

    /// Makes `plugin` current; returns the version it replaced.
    pub fn set(&self, plugin: Arc<Plugin>) -> Arc<Plugin> {
        let mut guard = self.current.write().unwrap_or_else(|e| e.into_inner());
        std::mem::replace(&mut *guard, plugin)
    }
}

impl std::fmt::Debug for Plugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Plugin")
            .field("name", &self.name)
            .field("version", &self.version)
            .field("routes", &self.routes)
            .finish()
    }
}

/// The wasmtime engine, linker and epoch ticker, set up once.
pub struct Runtime {
    engine: Engine,
    linker: Linker<HostState>,
    config: RuntimeConfig,
    stats: RuntimeStats,
    incremental: Option<Arc<incremental::IncrementalCache>>,
    compiled: Option<compiled::CompiledCache>,
    _ticker: EpochTicker,
}

/// Counters for `/metrics`: how full the instance pool is and what reloads did.
#[derive(Debug, Default)]
pub struct RuntimeStats {
    in_use: AtomicUsize,
    instances: AtomicU64,
    /// Loaded, unchanged, failed, removed.
    reloads: [AtomicU64; 4],
    /// Plugins' outbound HTTP requests.
    http: Arc<outbound::HttpStats>,
    /// Components mapped from the compilation cache, and compiled.
    loads: [AtomicU64; 2],
    /// Component files read and hashed, and known by identity without a read.
    reads: [AtomicU64; 2],
    /// Record pages given to guests: read when asked, and read ahead.
    pages: Arc<host::PageCounts>,
    /// Deliveries run, by outcome: how many and their time in µs.
    deliveries: std::sync::Mutex<std::collections::BTreeMap<&'static str, (u64, u64)>>,
}

/// What one reload of a plugin did, as [`RuntimeStats::reloads`] counts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReloadOutcome {
    /// A new version serves.
    Loaded = 0,
    /// The content did not change.
    Unchanged = 1,
    /// Refused; the last good version keeps serving.
    Failed = 2,
    /// The plugin was removed.
    Removed = 3,
}

impl RuntimeStats {
    /// Delivery instances alive now.
    pub fn instances_in_use(&self) -> usize {
        self.in_use.load(Ordering::Relaxed)
    }

    /// Delivery instances created since start.
    pub fn instances_total(&self) -> u64 {
        self.instances.load(Ordering::Relaxed)
    }

    /// Plugins' outbound HTTP requests: `(plugin, origin, result)` and their counts.
    pub fn http(&self) -> Vec<(String, String, &'static str, outbound::HttpCount)> {
        self.http.snapshot()
    }

    /// Reload outcomes since start, by kind: `loaded`, `unchanged`, `failed`, `removed`.
    pub fn reloads(&self) -> [(&'static str, u64); 4] {
        let n = |i: usize| self.reloads[i].load(Ordering::Relaxed);
        [("loaded", n(0)), ("unchanged", n(1)), ("failed", n(2)), ("removed", n(3))]
    }

    /// Plugin deliveries this host ran since it started, by outcome: count and total time in µs
    /// (counted in memory: `/metrics` reads no history from the store).
    pub fn deliveries(&self) -> Vec<(&'static str, u64, u64)> {
        self.deliveries.lock().map(|d| d.iter().map(|(k, (n, us))| (*k, *n, *us)).collect()).unwrap_or_default()
    }

    fn count_delivery(&self, outcome: ExecutionOutcome, us: u64) {
        if let Ok(mut d) = self.deliveries.lock() {
            let e = d.entry(outcome.as_str()).or_default();
            e.0 += 1;
            e.1 += us;
        }
    }

    /// Counts what a reload did.
    pub fn count_reload(&self, outcome: ReloadOutcome) {
        self.reloads[outcome as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Components loaded since start: `(mapped from the compilation cache, compiled)`.
    pub fn component_loads(&self) -> (u64, u64) {
        (self.loads[0].load(Ordering::Relaxed), self.loads[1].load(Ordering::Relaxed))
    }

    /// Component files identified since start: `(read and hashed, known unread by identity)`.
    pub fn component_reads(&self) -> (u64, u64) {
        (self.reads[0].load(Ordering::Relaxed), self.reads[1].load(Ordering::Relaxed))
    }

    /// Record pages since start: given to guests when asked or read ahead, and read ahead
    /// for nothing.
    pub fn pages(&self) -> PageStats {
        self.pages.get()
    }

    fn count_load(&self, origin: compiled::Origin) {
        self.loads[usize::from(origin == compiled::Origin::Compiled)].fetch_add(1, Ordering::Relaxed);
    }

    fn enter(&self) -> InUse<'_> {
        self.instances.fetch_add(1, Ordering::Relaxed);
        self.in_use.fetch_add(1, Ordering::Relaxed);
        InUse(&self.in_use)
    }
}

/// One delivery instance counted in use until dropped.
struct InUse<'a>(&'a AtomicUsize);

impl Drop for InUse<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl std::fmt::Debug for Runtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runtime").field("config", &self.config).finish_non_exhaustive()
    }
}

/// The settings that decide the machine code: every engine that compiles for this runtime
/// (and shares its incremental cache) starts from these.
fn compile_config(config: &RuntimeConfig) -> Config {
    let mut wasm = Config::new();
    wasm.wasm_component_model(true);
    wasm.epoch_interruption(true);
    wasm.consume_fuel(config.fuel);
    wasm
}

/// Bytes of a pooled memory kept resident between instances (only touched pages are reset).
const KEEP_RESIDENT: usize = 2 << 20;

/// How often the epoch advances: how often a running guest is checked against its CPU budget
/// and yields to the executor.
const EPOCH_TICK: Duration = Duration::from_millis(10);

/// A failure to set up the runtime or to read what it needs.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RuntimeError {
    /// A file or directory could not be used.
    #[error("{context}: {cause}")]
    Io {
        /// What was being done.
        context: String,
        /// The I/O error.
        cause: std::io::Error,
    },
    /// wasmtime refused (engine settings, compilation, linking, a trap outside a delivery).
    #[error("{context}: {cause:#}")]
    Wasm {
        /// What was being done.
        context: String,
        /// wasmtime's error, with its chain.
        cause: wasmtime::Error,
    },
}

impl RuntimeError {
    fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Self {
        let context = context.into();
        move |cause| Self::Io { context, cause }
    }

    fn wasm(context: impl Into<String>) -> impl FnOnce(wasmtime::Error) -> Self {
        let context = context.into();
        move |cause| Self::Wasm { context, cause }
    }
}

impl Runtime {
    /// Sets up the engine. Fails with a clear message when the pooling allocator cannot
    /// reserve its instances or the cache directory cannot be used.
    pub fn new(config: RuntimeConfig) -> Result<Arc<Self>, RuntimeError> {
        let mut wasm = compile_config(&config);
        let n = config.max_instances.max(1);
        let mut pool = PoolingAllocationConfig::new();
        // A Rust component has a handful of core instances and tables (the module plus the
        // shims wit-component adds) and one or two memories.
        pool.total_component_instances(n)
            .total_core_instances(n * 16)
            .total_memories(n * 2)
            .total_tables(n * 8)
            .total_stacks(n)
            .max_memories_per_component(2)
            .max_tables_per_component(8)
            .max_core_instances_per_component(16)
            .max_memory_size(config.max_memory.max(config.limits.memory))
            .table_elements(config.limits.table_elements.max(10_000))
            // Reset a finished instance's memory by rewriting only the pages it touched (found
            // with PAGEMAP_SCAN, Linux 6.7+) instead of `madvise`: no page faults when the
            // slot is reused, and no TLB-shootdown IPIs on every drop. Falls back by itself
            // where the kernel lacks it.
            .pagemap_scan(wasmtime::Enabled::Auto)
            .linear_memory_keep_resident(KEEP_RESIDENT)
            .table_keep_resident(KEEP_RESIDENT / 16)
            .async_stack_keep_resident(KEEP_RESIDENT / 16);
        wasm.allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
        let incremental = config.incremental_cache.map(|bytes| Arc::new(incremental::IncrementalCache::new(bytes)));
        if let Some(store) = &incremental {
            wasm.enable_incremental_compilation(store.clone())
                .map_err(RuntimeError::wasm("cannot enable incremental compilation"))?;
        }
        let engine = Engine::new(&wasm).map_err(RuntimeError::wasm(format!(
            "cannot set up the WebAssembly engine with a pool of {n} instances of {} MiB \
             (lower max_instances or memory_limit, or raise the process's virtual memory limit)",
            config.max_memory >> 20
        )))?;
        let compiled = match &config.cache_dir {
            Some(dir) => Some(
                compiled::CompiledCache::open(dir, &engine, config.cache_max_bytes)
                    .map_err(RuntimeError::io(format!("cannot use the compilation cache {}", dir.display())))?,
            ),
            None => None,
        };
        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut linker).map_err(RuntimeError::wasm("cannot link WASI"))?;
        wasmtime_wasi_http::p2::add_only_http_to_linker_async(&mut linker)
            .map_err(RuntimeError::wasm("cannot link wasi:http"))?;
        bindings::Plugin::add_to_linker::<HostState, HasSelf<HostState>>(&mut linker, |s| s)
            .map_err(RuntimeError::wasm("cannot link the host's imports"))?;
        // Without the ticker no guest would ever be interrupted: no CPU limit, no time limit.
        let ticker = EpochTicker::start(engine.clone())
            .map_err(RuntimeError::io("cannot start the epoch ticker that enforces CPU and time limits"))?;
        Ok(Arc::new(Self {
            engine,
            linker,
            config,
            stats: RuntimeStats::default(),
            incremental,
            compiled,
            _ticker: ticker,
        }))
    }

    /// The settings.
    pub fn config(&self) -> &RuntimeConfig {
        &self.config
    }

    /// Pool use and reload counters.
    pub fn stats(&self) -> &RuntimeStats {
        &self.stats
    }

    /// Fills the incremental compilation cache with the functions of the component at `path`,
    /// so that its next version compiles only what changed, even when this version came from
    /// the compilation cache on disk (which skips Cranelift, and so fills nothing). Blocking
    /// and CPU-heavy: run it off the async runtime. Does nothing when the cache is off.
    pub fn warm_incremental(&self, path: &Path) -> Result<(), RuntimeError> {
        let Some(store) = &self.incremental else { return Ok(()) };
        let bytes = std::fs::read(path).map_err(RuntimeError::io(format!("cannot read {}", path.display())))?;
        // The same code-generation settings, so the functions key the same; no module cache,
        // so Cranelift runs; no pool, since nothing is instantiated.
        let mut config = compile_config(&self.config);
        let context = format!("cannot compile {} to warm the incremental cache", path.display());
        config.enable_incremental_compilation(store.clone()).map_err(RuntimeError::wasm(context.clone()))?;
        let engine = Engine::new(&config).map_err(RuntimeError::wasm(context.clone()))?;
        Component::new(&engine, &bytes).map_err(RuntimeError::wasm(context))?;
        Ok(())
    }

    /// Functions the incremental compilation cache reused and compiled (zeros when it is off).
    pub fn incremental_hits_and_misses(&self) -> (u64, u64) {
        self.incremental.as_ref().map_or((0, 0), |c| c.hits_and_misses())
    }

    /// What a manifest may ask for on this runtime.
    pub fn ceiling(&self) -> Ceiling {
        Ceiling { memory: self.config.max_memory.max(self.config.limits.memory), fuel: self.config.fuel }
    }

    /// The manifest of the component at `path` (`NAME.toml` beside it), or the defaults.
    pub fn manifest_for(&self, path: &Path) -> Result<Manifest, LoadError> {
        Manifest::for_component(path, &self.config.limits, self.ceiling())
            .map_err(|e| LoadError::Manifest { reason: e.0 })
    }

    /// The manifest of the component at `path` from its text (`None`: the defaults).
    pub fn parse_manifest(&self, path: &Path, text: Option<&str>) -> Result<Manifest, ManifestError> {
        Manifest::from_text(path, text, &self.config.limits, self.ceiling())
    }

    /// Loads a plugin file and its manifest: read, hash, compile (off the async runtime;
    /// cached), type-check against the world, and read its subscriptions.
    pub async fn load(self: &Arc<Self>, path: &Path) -> Result<Plugin, LoadError> {
        let bytes = self.read_component(path).map_err(|source| LoadError::Read { path: path.to_path_buf(), source })?;
        let manifest = self.manifest_for(path)?;
        self.load_with(path, bytes, manifest).await
    }

    /// A component file's digest, and its bytes when they had to be read for it. With a
    /// compilation cache, a file unchanged since it was last hashed (same device, inode,
    /// size and times, settled before it was hashed; see `digests.rs`) is neither read nor hashed.
    pub fn read_component(&self, path: &Path) -> std::io::Result<ComponentBytes> {
        let Some(memo) = self.compiled.as_ref().map(|c| &c.digests) else {
            let bytes = std::fs::read(path).map(ComponentBytes::new)?;
            self.stats.reads[0].fetch_add(1, Ordering::Relaxed);
            return Ok(bytes);
        };
        let before = std::fs::metadata(path)?;
        if let Some(digest) = memo.lookup(&before) {
            self.stats.reads[1].fetch_add(1, Ordering::Relaxed);
            return Ok(ComponentBytes { digest: digest.into(), source: Source::File(path.into()) });
        }
        let bytes = ComponentBytes::new(std::fs::read(path)?);
        self.stats.reads[0].fetch_add(1, Ordering::Relaxed);
        if let Ok(after) = std::fs::metadata(path) {
            memo.remember(&before, &after, bytes.digest());
        }
        Ok(bytes)
    }

    /// Loads a plugin from bytes already read from `path` (so a file that changes again
    /// while it compiles cannot mix two versions), with the manifest beside `path`.
    pub async fn load_bytes(self: &Arc<Self>, path: &Path, bytes: Vec<u8>) -> Result<Plugin, LoadError> {
        let manifest = self.manifest_for(path)?;
        self.load_with(path, bytes, manifest).await
    }

    /// Loads a plugin from bytes (hashed once: give [`ComponentBytes`] when they are hashed
    /// already) with the given manifest.
    pub async fn load_with(
        self: &Arc<Self>,
        path: &Path,
        bytes: impl Into<ComponentBytes>,
        manifest: Manifest,
    ) -> Result<Plugin, LoadError> {
        let (path, bytes) = (path.to_path_buf(), bytes.into());
        let rt = self.clone();
        let compiled = tokio::task::spawn_blocking(move || rt.compile(&path, &bytes)).await;
        let (name, version, path, pre) =
            compiled.map_err(|e| LoadError::Compile { path: PathBuf::new(), reason: e.to_string() })??;
        let routes =
            self.read_routes(&pre).await.map_err(|reason| LoadError::Subscriptions { path: path.clone(), reason })?;
        let http_slots = Arc::new(tokio::sync::Semaphore::new(manifest.limits.http.max_in_flight));
        let route_keys = routes.iter().map(Route::key).collect();
        Ok(Plugin { name, version, path, routes, route_keys, manifest: Arc::new(manifest), pre, http_slots })
    }

    #[allow(clippy::type_complexity)]
    fn compile(
        &self,
        path: &Path,
        bytes: &ComponentBytes,
    ) -> Result<(String, String, PathBuf, bindings::PluginPre<HostState>), LoadError> {
        let version = bytes.version().to_owned();
        let compiled = match &self.compiled {
            Some(cache) => cache.component(&self.engine, bytes),
            None => bytes
                .bytes()
                .map_err(wasmtime::Error::from)
                .and_then(|b| Component::new(&self.engine, &b[..]))
                .map(|c| (c, compiled::Origin::Compiled)),
        };
        let (component, origin) =
            compiled.map_err(|e| LoadError::Compile { path: path.to_path_buf(), reason: format!("{e:#}") })?;
        self.stats.count_load(origin);
        let pre = self
            .linker
            .instantiate_pre(&component)
            .and_then(bindings::PluginPre::new)
            .map_err(|e| LoadError::World { path: path.to_path_buf(), reason: format!("{e:#}") })?;
        let name = path.file_stem().and_then(|s| s.to_str()).unwrap_or("plugin").to_owned();
        Ok((name, version, path.to_path_buf(), pre))
    }

    async fn read_routes(&self, pre: &bindings::PluginPre<HostState>) -> Result<Vec<Route>, String> {
        let manifest = Arc::new(Manifest { limits: self.config.limits.clone(), ..Manifest::default() });
        let wall = manifest.limits.wall;
        let mut store = self.store(HostState::for_load(manifest), None);
        let call = async {
            let instance = pre.instantiate_async(&mut store).await?;
            instance.jobhost_plugin_listener().call_subscriptions(&mut store).await
        };
        let subs = tokio::time::timeout(wall, call)
            .await
            .map_err(|_| "subscriptions() did not return in time".to_owned())?
            .map_err(|e| format!("subscriptions() failed: {e:#}"))?;
        let mut routes = Vec::with_capacity(subs.len());
        for (i, s) in subs.into_iter().enumerate() {
            let filter = match &s.filter {
                Some(text) => serde_json::from_str(text).map_err(|e| format!("route {i}: filter is not JSON: {e}"))?,
                None => serde_json::Value::Null,
            };
            Selector::parse(&s.topic, &filter).map_err(|e| format!("route {i}: {e}"))?;
            routes.push(Route { topic: s.topic, filter });
        }
        if routes.is_empty() {
            return Err("the plugin declares no routes".into());
        }
        Ok(routes)
    }

    /// Loads every `*.wasm` in `dir`. A plugin that fails to load is returned with its reason
    /// and the others still load.
    pub async fn load_dir(self: &Arc<Self>, dir: &Path) -> Result<(Vec<Arc<Plugin>>, Vec<LoadError>), RuntimeError> {
        let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(RuntimeError::io(format!("cannot read the plugins directory {}", dir.display())))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "wasm") && p.is_file())
            .collect();
        paths.sort();
        let mut loaded = Vec::new();
        let mut failed = Vec::new();
        for p in paths {
            match self.load(&p).await {
                Ok(plugin) => {
                    tracing::info!(plugin = %plugin.name, version = %plugin.version, routes = plugin.routes.len(), "plugin loaded");
                    loaded.push(Arc::new(plugin));
                }
                Err(e) => {
                    tracing::error!(error = %e, "plugin not loaded");
                    failed.push(e);
                }
            }
        }
        Ok((loaded, failed))
    }

    fn store(&self, state: HostState, fuel: Option<u64>) -> Store<HostState> {
        let mut store = Store::new(&self.engine, state);
        if self.config.fuel {
            // Unlimited unless the manifest sets it; the setter only fails when fuel is off.
            let _ = store.set_fuel(fuel.unwrap_or(u64::MAX / 2));
        }
        store.limiter(|s| s.limiter());
        // Charge the guest only for CPU it uses in wasm (see `CpuMeter`).
        store.call_hook(|mut ctx, hook| {
            ctx.data_mut().cpu().hook(hook);
            Ok(())
        });
        // Every tick the guest is checked: over budget it is interrupted; otherwise it yields
        // to the executor, so a busy guest cannot starve the other tasks on its worker.
        store.set_epoch_deadline(1);
        store.epoch_deadline_callback(|mut ctx| {
            let cpu = ctx.data_mut().cpu();
            if !cpu.check() {
                return Ok(UpdateDeadline::Interrupt);
            }
            let mark = cpu.resume_mark();
            Ok(UpdateDeadline::YieldCustom(
                1,
                Box::pin(async move {
                    tokio::task::yield_now().await;
                    mark.store(host::running_ns(), std::sync::atomic::Ordering::Relaxed);
                }),
            ))
        });
        store
    }

    /// A listener that runs `plugin` for events of `environment_id`: one route per declared
    /// subscription, named `plugin:<name>`.
    pub fn listener(self: &Arc<Self>, plugin: Arc<Plugin>, environment_id: &str) -> Listener {
        let routes = plugin.routes.clone();
        self.slot_listener(PluginSlot::new(plugin), &routes, environment_id)
    }

    /// A listener for `routes` of the plugin in `slot`. Each delivery runs on the version
    /// current when it starts; if that version no longer has the route, the delivery is
    /// released back to pending (for a version that has it) instead of being handled.
    pub fn slot_listener(self: &Arc<Self>, slot: Arc<PluginSlot>, routes: &[Route], environment_id: &str) -> Listener {
        let current = slot.get();
        let name = format!("plugin:{}", current.name);
        let mut listener = Listener::new(name, environment_id).max_in_flight(current.manifest.limits.max_instances);
        for route in routes {
            let (rt, slot, key) = (self.clone(), slot.clone(), route.key());
            listener = listener.handled_route(&route.topic, route.filter.clone(), &key.clone(), move |ctx| {
                let (rt, plugin) = (rt.clone(), slot.get());
                let index = plugin
                    .route_index(&key)
                    .ok_or_else(|| format!("plugin {} version {} has no route {key}", plugin.name, plugin.version));
                async move {
                    match index {
                        Ok(index) => rt.invoke(&plugin, index, ctx).await,
                        Err(released) => Handled::new(End::Released(released)),
                    }
                }
            });
        }
        listener
    }

    /// Runs route `route` of `plugin` for one delivery in a fresh instance. Returns how the
    /// delivery ended with its execution record, which the delivery loop stores in the write
    /// that ends the delivery.
    pub async fn invoke(&self, plugin: &Plugin, route: u32, ctx: EventCtx) -> Handled {
        let (execution, over_budget) = self.run(plugin, route, &ctx).await;
        let end = match &execution.error {
            None => End::Done,
            // A retry would create the same jobs and events again, up to the budget each time.
            Some(e) if over_budget => End::FailedForGood(format!(
                "{e} (not retried: the delivery ran into a per-delivery budget, and a retry would repeat what it did)"
            )),
            Some(e) => End::Failed(e.clone()),
        };
        if let (Some(e), Some(job)) = (&execution.error, ctx.event.job_id()) {
            // Say on the job why its listener failed (the host's own write, outside the loop
            // guard); a job that already ended keeps its outcome.
            let info = format!("plugin {} failed on {} (attempt {}): {e}", plugin.name, ctx.event.topic, ctx.attempt);
            let system = ctx.api.engine().env(ctx.api.id());
            if let Err(err) = system.annotate(job, cut(&info, 1024)).await {
                tracing::debug!(error = %err, job, "cannot note the failure on the job");
            }
        }
        Handled { end, execution: Some(execution) }
    }

    /// Runs route `route` of `plugin` for one delivery in a fresh `Store` and instance, under
    /// the limits, and describes how it went. Stores nothing.
    pub async fn execute(&self, plugin: &Plugin, route: u32, ctx: &EventCtx) -> Execution {
        self.run(plugin, route, ctx).await.0
    }

    /// [`Runtime::execute`], and whether a host call was refused for a per-delivery budget.
    async fn run(&self, plugin: &Plugin, route: u32, ctx: &EventCtx) -> (Execution, bool) {
        let started_at = ctx.api.engine().now();
        let started = Instant::now();
        let event = convert::event(&ctx.event, ctx.attempt);
        let limits = &plugin.manifest.limits;
        let _in_use = self.stats.enter();
        let shared = outbound::Shared { in_flight: plugin.http_slots.clone(), stats: self.stats.http.clone() };
        let state = HostState::for_event(plugin.manifest.clone(), ctx.api.clone(), &plugin.name, &ctx.event, shared)
            .map(|s| s.counting_pages(self.stats.pages.clone()));
        let (mut store, setup) = match state {
            Ok(state) => (self.store(state, limits.fuel), None),
            // A granted directory that cannot be opened: the delivery fails and says why.
            Err(e) => (self.store(HostState::for_load(plugin.manifest.clone()), None), Some(format!("{e:#}"))),
        };
        let call = async {
            if let Some(e) = setup {
                return Err(wasmtime::Error::msg(e));
            }
            let instance = plugin.pre.instantiate_async(&mut store).await?;
            instance.jobhost_plugin_listener().call_handle(&mut store, route, &event).await
        };
        let result = tokio::time::timeout(limits.wall, call).await;
        let duration = started.elapsed();
        if let Ok(Ok(Ok(()))) = &result {
            let note = store.data().jobs_left_open();
            note.await;
        }
        let state = store.data();
        // A handler that finished after `handle` returned (`completion`) ends as it settled.
        let result = match (result, state.deferred()) {
            (Ok(Ok(Ok(()))), Some(Some(settled))) => Ok(Ok(settled.clone())),
            (Ok(Ok(Ok(()))), Some(None)) => Ok(Ok(Err(
                "the handler's promise never settled (it awaits something that does not resolve within the delivery)"
                    .to_owned(),
            ))),
            (result, _) => result,
        };
        let (outcome, error) = match result {
            Ok(Ok(Ok(()))) => (ExecutionOutcome::Ok, None),
            Ok(Ok(Err(message))) => {
                // The guest's own message, cut to size, and what the host refused it if it
                // swallowed that and failed for it.
                let mut message = cut(&message, limits.max_outcome_bytes);
                if let Some(refused) = state.refused()
                    && !message.contains(refused)
                {
                    message = format!("{message} (after the host refused: {refused})");
                }
                (ExecutionOutcome::Error, Some(message))
            }
            Ok(Err(trap)) => match (attribute(&trap, state, limits), state.deferred()) {
                // JavaScript's event loop stops the guest when it runs out of work with the
                // handler's promise pending: that is the handler's failure, not a crash.
                ((ExecutionOutcome::Trap, why), Some(None)) => (
                    ExecutionOutcome::Error,
                    Some(format!(
                        "the handler's promise never settled (the guest's event loop ran out of work with it pending: {})",
                        why.unwrap_or_default()
                    )),
                ),
                (attributed, _) => attributed,
            },
            Err(_) => (
                ExecutionOutcome::Timeout,
                Some(format!("wall-clock limit {} s exceeded (host calls included)", limits.wall.as_secs_f64())),
            ),
        };
        self.stats.count_delivery(outcome, duration.as_micros() as u64);
        let execution = Execution {
            id: 0,
            environment_id: ctx.api.id().to_owned(),
            plugin: plugin.name.clone(),
            plugin_version: plugin.version.clone(),
            route,
            event_id: ctx.event.id.clone(),
            topic: ctx.event.topic.clone(),
            job_id: ctx.event.job_id().map(str::to_owned),
            attempt: ctx.attempt,
            started_at,
            duration_us: duration.as_micros() as i64,
            cpu_us: state.cpu_used().as_micros() as i64,
            outcome,
            error: error.map(|e| state.mask(&e)),
            peak_memory: state.peak_memory() as u64,
            logs: state.take_logs(),
            http: state.http_calls(),
        };
        (execution, state.over_budget())
    }

    /// The benchmarks' baseline: the same engine and pre-instantiated component, a fresh
    /// `Store` per call, but none of jobhost's per-delivery work (no limiter, CPU meter,
    /// output capture, timeout or execution record).
    #[doc(hidden)]
    pub async fn execute_bare(&self, plugin: &Plugin, route: u32, ctx: &EventCtx) -> wasmtime::Result<()> {
        let event = convert::event(&ctx.event, ctx.attempt);
        let mut store = Store::new(&self.engine, HostState::for_load(plugin.manifest.clone()));
        store.set_epoch_deadline(u64::MAX / 2);
        if self.config.fuel {
            store.set_fuel(u64::MAX / 2)?;
        }
        let instance = plugin.pre.instantiate_async(&mut store).await?;
        instance.jobhost_plugin_listener().call_handle(&mut store, route, &event).await?.map_err(wasmtime::Error::msg)
    }
}

/// From when a digest taken of the file at `path` is trusted at the next start (known unread
/// by [`Runtime::read_component`]): the file's last change plus a settling time. `None` where
/// files have no change time (not Unix).
pub fn digest_trusted_from(path: &Path) -> std::io::Result<Option<std::time::SystemTime>> {
    Ok(digests::trusted_from(&std::fs::metadata(path)?))
}

/// A plugin's version: the first 16 hex digits of the SHA-256 of its file.
pub fn version_of(bytes: &[u8]) -> String {
    crate::model::sha256_hex(bytes, VERSION_HEX / 2)
}

/// Hex digits of a version: the first 8 bytes of the content's SHA-256.
const VERSION_HEX: usize = 16;

/// A component's whole SHA-256 and where its bytes are: a load needs the digest (the version
/// is its prefix, the compilation cache's key is all of it), and the bytes only to compile or
/// to keep a copy. Hashed once; a file whose digest was remembered by identity is not read at
/// all until its bytes are needed ([`Runtime::read_component`]). Cloning shares the bytes.
#[derive(Debug, Clone)]
pub struct ComponentBytes {
    digest: Arc<str>,
    source: Source,
}

#[derive(Debug, Clone)]
enum Source {
    Bytes(Arc<Vec<u8>>),
    /// A file not read yet, whose digest is known.
    File(Arc<Path>),
}

impl ComponentBytes {
    /// Hashes `bytes`.
    pub fn new(bytes: Vec<u8>) -> Self {
        let digest = crate::model::sha256_hex(&bytes, 32).into();
        Self { digest, source: Source::Bytes(Arc::new(bytes)) }
    }

    /// The bytes: those given, or the file read now. A file whose content no longer has the
    /// digest (changed since it was identified) is an error, never another version's bytes.
    pub fn bytes(&self) -> std::io::Result<Arc<Vec<u8>>> {
        match &self.source {
            Source::Bytes(b) => Ok(b.clone()),
            Source::File(path) => {
                let bytes = std::fs::read(path)?;
                if crate::model::sha256_hex(&bytes, 32) != *self.digest {
                    return Err(std::io::Error::other(format!(
                        "{} changed while it was being loaded; it is loaded again when it settles",
                        path.display()
                    )));
                }
                Ok(Arc::new(bytes))
            }
        }
    }

    /// The plugin version they make (as [`version_of`]).
    pub fn version(&self) -> &str {
        &self.digest[..VERSION_HEX]
    }

    /// The whole SHA-256, in hex.
    pub fn digest(&self) -> &str {
        &self.digest
    }
}

impl From<Vec<u8>> for ComponentBytes {
    fn from(bytes: Vec<u8>) -> Self {
        Self::new(bytes)
    }
}

/// Names the limit behind a trap: memory, table, CPU, fuel, stack, or the trap itself.
fn attribute(trap: &wasmtime::Error, state: &HostState, limits: &Limits) -> (ExecutionOutcome, Option<String>) {
    let code = trap_code(trap);
    let kind = trap.downcast_ref::<wasmtime::Trap>();
    if let Some(limit) = state.memory_exceeded() {
        (ExecutionOutcome::Memory, Some(format!("memory limit {} MiB exceeded (trap: {code})", limit >> 20)))
    } else if let Some(limit) = state.table_exceeded() {
        (ExecutionOutcome::Limit, Some(format!("table limit {limit} elements exceeded (trap: {code})")))
    } else if state.cpu_exceeded() {
        (ExecutionOutcome::Cpu, Some(format!("cpu deadline {} s exceeded", limits.cpu.as_secs_f64())))
    } else if kind == Some(&wasmtime::Trap::OutOfFuel) {
        (ExecutionOutcome::Fuel, Some(format!("fuel limit {} exhausted", limits.fuel.unwrap_or_default())))
    } else if kind == Some(&wasmtime::Trap::StackOverflow) {
        (ExecutionOutcome::Trap, Some(format!("stack overflow (trap: {code})")))
    } else {
        (ExecutionOutcome::Trap, Some(format!("trap: {code}")))
    }
}

/// `text` cut to at most `max` bytes at a character boundary, saying so.
fn cut(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    format!("{}… [cut at {max} bytes of {}]", &text[..text.floor_char_boundary(max)], text.len())
}

/// The trap's code (e.g. `wasm trap: wasm `unreachable` instruction executed`) without the
/// backtrace, which goes to the debug log.
fn trap_code(err: &wasmtime::Error) -> String {
    tracing::debug!(error = ?err, "guest trap");
    let text = match err.downcast_ref::<wasmtime::Trap>() {
        Some(t) => t.to_string(),
        None => err.to_string(),
    };
    text.strip_prefix("wasm trap: ").map(str::to_owned).unwrap_or(text)
}

/// Advances the engine's epoch every [`EPOCH_TICK`] until dropped.
struct EpochTicker {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl EpochTicker {
    fn start(engine: Engine) -> std::io::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new().name("jobhost-epoch".into()).spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                std::thread::sleep(EPOCH_TICK);
                engine.increment_epoch();
            }
        })?;
        Ok(Self { stop, thread: Some(thread) })
    }
}

impl Drop for EpochTicker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_known_file_whose_bytes_no_longer_have_its_digest_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.wasm");
        std::fs::write(&path, b"first").unwrap();
        let known = ComponentBytes::new(b"first".to_vec());
        let unread = ComponentBytes { digest: known.digest.clone(), source: Source::File(path.as_path().into()) };
        assert_eq!(*unread.bytes().unwrap(), b"first");
        std::fs::write(&path, b"second").unwrap();
        let err = unread.bytes().unwrap_err();
        assert!(err.to_string().contains("changed while it was being loaded"), "{err}");
    }
}
