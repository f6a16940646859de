//! Plugins over the API: one plugins directory per environment, each a hot-reloaded
//! [`PluginHost`]. A deploy is validated (compiled and type-checked) **before** it is written,
//! then published like a file dropped in the directory (temporary name, rename) and synced at
//! once — so a bad upload changes nothing and a good one serves the next event.
//!
//! The directory of `serve --plugins DIR` belongs to `serve --environment`; any other
//! environment gets `DATA/plugins/<environment id>/` on its first deploy. Manifests
//! (`NAME.toml`: limits and grants) stay files the operator writes: a tenant cannot grant
//! itself more than the host's defaults over the API.
//!
//! **In a fleet** (a shared store, [`Plugins::share_through`]) the store is where plugins
//! live: a deploy, rollback or delete through any host is validated there, written to the
//! store (the component under its SHA-256, and a deployment row), and applied locally; every
//! host follows the deployments ([`Plugins::follow`]) and mirrors each into its own plugin
//! directory, where the usual sync — validate, swap, resubscribe; in-flight deliveries finish
//! on their version; the last good version keeps serving — takes over. A host that starts
//! replays every deployment, so it serves what the fleet serves.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::reload::{PluginHost, PluginInfo, ReloadEvent, Watch};
use crate::runtime::{Runtime, version_of};
use jobhost_engine::store::Deployment;
use jobhost_engine::{Engine, Running};

/// An environment's plugin host, and the watch on its directory when this registry started it.
type Hosted = (Arc<PluginHost>, Option<Watch>);

/// Proof that the caller holds [`Plugins`]' one-plugin-change-at-a-time lock.
type OneAtATime<'a> = tokio::sync::MutexGuard<'a, ()>;

/// The plugin hosts of every environment that has plugins.
pub struct Plugins {
    runtime: Arc<Runtime>,
    running: Arc<Running>,
    root: PathBuf,
    hosts: tokio::sync::Mutex<HashMap<String, Hosted>>,
    /// The engine whose (shared) store keeps the fleet's plugins; unset on a single host.
    fleet: std::sync::OnceLock<Engine>,
    /// Held while a plugin is brought in line with the fleet's deployments.
    converging: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for Plugins {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Plugins").field("root", &self.root).finish_non_exhaustive()
    }
}

/// What a deploy, rollback or delete did.
#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    /// The name is not a plugin name.
    #[error("`{0}` is not a plugin name (1 to 64 of A-Z, a-z, 0-9, `_`, `-`)")]
    BadName(String),
    /// The component does not load; nothing changed.
    #[error("{0}")]
    Invalid(String),
    /// No such plugin or version.
    #[error("{0}")]
    NotFound(String),
    /// The host failed.
    #[error("{0}")]
    Io(String),
}

/// What a plugin name may be, as the OpenAPI document states it; `check_name` is the rule.
pub const NAME_PATTERN: &str = "^[A-Za-z0-9_-]{1,64}$";

fn check_name(name: &str) -> Result<(), PluginError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if ok { Ok(()) } else { Err(PluginError::BadName(name.to_owned())) }
}

impl Plugins {
    /// Plugins under `root` (`DATA/plugins`), delivered by `running`.
    pub fn new(runtime: Arc<Runtime>, running: Arc<Running>, root: PathBuf) -> Arc<Self> {
        Arc::new(Self {
            runtime,
            running,
            root,
            hosts: tokio::sync::Mutex::new(HashMap::new()),
            fleet: std::sync::OnceLock::new(),
            converging: tokio::sync::Mutex::new(()),
        })
    }

    /// Keeps plugins in `engine`'s store from now on: deploys, rollbacks and deletes go
    /// through it to every host of the fleet. Call [`Plugins::follow`] to apply theirs here.
    pub fn share_through(&self, engine: Engine) {
        let _ = self.fleet.set(engine);
    }

    /// Applies every deployment of the fleet made so far, as a starting host does before it
    /// serves; returns where [`Plugins::follow`] goes on from.
    pub async fn catch_up(&self) -> i64 {
        let mut cursor = 0;
        while let Some((next, full)) = self.pass(cursor).await {
            cursor = next;
            if !full {
                break;
            }
        }
        cursor
    }

    /// Follows the fleet's deployments after `cursor` until `stop` resolves: each is applied
    /// here within a poll interval of the store (a notification makes it sooner).
    pub async fn follow(self: Arc<Self>, mut cursor: i64, stop: impl std::future::Future<Output = ()>) {
        let Some(engine) = self.fleet.get().cloned() else { return };
        let mut commits = engine.store().backend().notifications().commits;
        tokio::pin!(stop);
        loop {
            commits.borrow_and_update();
            if let Some((next, full)) = self.pass(cursor).await {
                cursor = next;
                if full {
                    continue;
                }
            }
            // Every commit of the store may carry a deployment (the shared store also wakes
            // this at its poll interval); at most a few looks a second under load.
            tokio::select! {
                _ = &mut stop => return,
                _ = async {
                    let _ = commits.changed().await;
                    tokio::time::sleep(FOLLOW_PAUSE).await;
                } => {}
            }
        }
    }

    /// Applies the deployments after `cursor` (one page); returns the new cursor and whether
    /// the page was full. `None` when the store could not be read.
    async fn pass(&self, cursor: i64) -> Option<(i64, bool)> {
        let engine = self.fleet.get()?;
        let deployments = match engine.store().read(move |r| r.deployments(cursor, FOLLOW_PAGE)).await {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the fleet's plugin deployments; trying again");
                return None;
            }
        };
        let full = deployments.len() == FOLLOW_PAGE as usize;
        let next = deployments.last().map_or(cursor, |d| d.seq);
        // Each plugin touched, once: converging reads its latest deployment anyway.
        let mut touched: Vec<(String, String)> = Vec::new();
        for d in deployments {
            let key = (d.environment_id, d.name);
            if !touched.contains(&key) {
                touched.push(key);
            }
        }
        for (env, name) in touched {
            match self.converge(engine, &env, &name).await {
                Ok(ReloadEvent::Unchanged { .. }) | Err(PluginError::NotFound(_)) => {}
                Ok(event) => {
                    tracing::info!(plugin = %name, environment = %env, event = ?event, "applied the fleet's deployment")
                }
                Err(e) => tracing::error!(plugin = %name, environment = %env, error = %e,
                    "cannot apply the fleet's deployment here; the last good version keeps serving"),
            }
        }
        Some((next, full))
    }

    /// Brings this host's copy of one plugin in line with the fleet's latest deployment of it.
    /// One plugin change at a time on this host: each reads the latest deployment under the
    /// lock, so what runs here ends as what the store says last.
    async fn converge(&self, engine: &Engine, env: &str, name: &str) -> Result<ReloadEvent, PluginError> {
        let held = self.converging.lock().await;
        self.converge_held(&held, engine, env, name).await
    }

    /// [`converge`](Self::converge) for a caller that holds the lock (`_held` proves it).
    async fn converge_held(
        &self,
        _held: &OneAtATime<'_>,
        engine: &Engine,
        env: &str,
        name: &str,
    ) -> Result<ReloadEvent, PluginError> {
        let latest = deployed(engine, env, name).await?.pop().and_then(|d| d.version);
        let host = self.host(env, true).await?.ok_or_else(|| PluginError::Io("no plugin host".into()))?;
        let current = host.plugins().await.into_iter().find(|p| p.name == name).map(|p| p.version);
        match (latest, current) {
            (Some(digest), Some(current)) if current == short(&digest) => {
                Ok(ReloadEvent::Unchanged { name: name.to_owned(), version: current })
            }
            (Some(digest), _) => {
                let bytes = blob(engine, &digest).await?;
                self.apply(&host, name, Some(&bytes)).await
            }
            (None, Some(_)) => self.apply(&host, name, None).await,
            (None, None) => Err(PluginError::NotFound(format!("no plugin {name} in this environment"))),
        }
    }

    /// Publishes `bytes` as the plugin's file (or removes it) and syncs it.
    async fn apply(&self, host: &PluginHost, name: &str, bytes: Option<&[u8]>) -> Result<ReloadEvent, PluginError> {
        let path = host.dir().join(format!("{name}.wasm"));
        match bytes {
            Some(bytes) => publish(host.dir(), name, bytes)
                .map_err(|e| PluginError::Io(format!("cannot write {}: {e}", path.display())))?,
            None => match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(PluginError::Io(format!("cannot delete {}: {e}", path.display()))),
            },
        }
        let event = host.sync(name).await;
        match &event {
            ReloadEvent::Failed { reason, .. } => Err(PluginError::Invalid(reason.clone())),
            _ => Ok(event),
        }
    }

    /// Records a deployment in the fleet's store — plugin `name` is the component `digest` from
    /// now on (`None`: deleted), storing `new_blob` under it first when given — and applies it
    /// here. The caller holds the plugin lock from before it decided on the deployment until
    /// this returns: otherwise the follower, woken by the record's commit, could apply it
    /// first, and the caller would report "already current" instead of the change it made.
    async fn record(
        &self,
        held: &OneAtATime<'_>,
        engine: &Engine,
        (env, name): (&str, &str),
        digest: Option<String>,
        new_blob: Option<Arc<[u8]>>,
    ) -> Result<ReloadEvent, PluginError> {
        let (e, n, now) = (env.to_owned(), name.to_owned(), engine.now());
        engine
            .store()
            .write(move |tx| {
                if let (Some(digest), Some(bytes)) = (&digest, &new_blob) {
                    tx.put_plugin_blob(digest, bytes, now)?;
                }
                tx.insert_deployment(&e, &n, digest.as_deref(), now)
            })
            .await
            .map_err(|e| PluginError::Io(format!("cannot record the deployment in the store: {e}")))?;
        self.converge_held(held, engine, env, name).await
    }

    /// The runtime the plugins run on.
    pub fn runtime(&self) -> &Arc<Runtime> {
        &self.runtime
    }

    /// Starts the plugins of every environment deployed before (each subdirectory of the root
    /// named after an existing environment), so a restarted host serves them at once. Returns
    /// the plugins that loaded, by environment.
    pub async fn start_all(&self, engine: &jobhost_engine::Engine) -> Vec<(String, PluginInfo)> {
        let known: std::collections::HashSet<String> =
            engine.environments().await.unwrap_or_default().into_iter().map(|e| e.id).collect();
        let mut out = Vec::new();
        let Ok(dirs) = std::fs::read_dir(&self.root) else { return out };
        let mut envs: Vec<String> = dirs
            .flatten()
            .filter(|d| d.path().is_dir())
            .filter_map(|d| d.file_name().to_str().map(str::to_owned))
            .filter(|name| known.contains(name))
            .collect();
        envs.sort();
        for env in envs {
            match self.host(&env, false).await {
                Ok(Some(h)) => out.extend(h.plugins().await.into_iter().map(|p| (env.clone(), p))),
                Ok(None) => {}
                Err(e) => tracing::error!(environment = %env, error = %e, "cannot start the environment's plugins"),
            }
        }
        out
    }

    /// Registers a host already running for an environment (the directory of `serve --plugins`).
    pub async fn adopt(&self, environment_id: &str, host: Arc<PluginHost>) {
        self.hosts.lock().await.insert(environment_id.to_owned(), (host, None));
    }

    /// The host of an environment, started (and watched) on first use when `create`.
    async fn host(&self, environment_id: &str, create: bool) -> Result<Option<Arc<PluginHost>>, PluginError> {
        let mut hosts = self.hosts.lock().await;
        if let Some((h, _)) = hosts.get(environment_id) {
            return Ok(Some(h.clone()));
        }
        let dir = self.root.join(environment_id);
        if !create && !dir.is_dir() {
            return Ok(None);
        }
        std::fs::create_dir_all(&dir).map_err(|e| PluginError::Io(format!("cannot create {}: {e}", dir.display())))?;
        let (host, _) = PluginHost::start(self.runtime.clone(), self.running.clone(), environment_id, &dir)
            .await
            .map_err(|e| PluginError::Io(format!("{e:#}")))?;
        let watch = host.watch(std::time::Duration::from_millis(50)).map_err(|e| PluginError::Io(format!("{e:#}")))?;
        hosts.insert(environment_id.to_owned(), (host.clone(), Some(watch)));
        Ok(Some(host))
    }

    /// Plugins loaded, all environments.
    pub async fn loaded_count(&self) -> usize {
        let hosts: Vec<Arc<PluginHost>> = self.hosts.lock().await.values().map(|(h, _)| h.clone()).collect();
        let mut n = 0;
        for h in hosts {
            n += h.plugins().await.len();
        }
        n
    }

    /// The environment's plugins.
    pub async fn list(&self, environment_id: &str) -> Result<Vec<PluginInfo>, PluginError> {
        Ok(match self.host(environment_id, false).await? {
            Some(h) => h.plugins().await,
            None => Vec::new(),
        })
    }

    /// The environment's plugins whose newest file did not load, with the reason.
    pub async fn load_errors(&self, environment_id: &str) -> Result<Vec<crate::reload::LoadError>, PluginError> {
        Ok(match self.host(environment_id, false).await? {
            Some(h) => h.load_errors(),
            None => Vec::new(),
        })
    }

    /// Validates `bytes` as plugin `name` and, when it loads, publishes and loads it.
    pub async fn deploy(&self, environment_id: &str, name: &str, bytes: Vec<u8>) -> Result<ReloadEvent, PluginError> {
        check_name(name)?;
        let host = self.host(environment_id, true).await?.ok_or_else(|| PluginError::Io("no plugin host".into()))?;
        let path = host.dir().join(format!("{name}.wasm"));
        // Validate first: the manifest beside the target path applies, as it will after the swap.
        self.runtime.load_bytes(&path, bytes.clone()).await.map_err(|e| PluginError::Invalid(e.to_string()))?;
        if let Some(engine) = self.fleet.get() {
            let digest = jobhost_core::model::sha256_hex(&bytes, 32);
            let held = self.converging.lock().await;
            return self.record(&held, engine, (environment_id, name), Some(digest), Some(bytes.into())).await;
        }
        self.apply(&host, name, Some(&bytes)).await
    }

    /// Puts a kept version back (the newest other one without `to`) and loads it.
    pub async fn rollback(
        &self,
        environment_id: &str,
        name: &str,
        to: Option<&str>,
    ) -> Result<ReloadEvent, PluginError> {
        check_name(name)?;
        if let Some(engine) = self.fleet.get() {
            // The fleet's history is the store's: every host rolls back to the same version.
            let held = self.converging.lock().await;
            let history = deployed(engine, environment_id, name).await?;
            let current = history.last().and_then(|d| d.version.clone());
            let mut versions: Vec<&String> = history.iter().filter_map(|d| d.version.as_ref()).collect();
            versions.dedup();
            let target = match to {
                Some(to) => versions.iter().rev().find(|v| short(v) == to || v.as_str() == to).copied(),
                None => versions.iter().rev().find(|v| Some(v.as_str()) != current.as_deref()).copied(),
            };
            let Some(target) = target.cloned() else {
                return Err(PluginError::NotFound(match to {
                    Some(to) => format!("plugin {name} has no deployed version {to}"),
                    None => format!("plugin {name} has no other deployed version to roll back to"),
                }));
            };
            // The component is stored already: the deployment names it; converging fetches it.
            return self.record(&held, engine, (environment_id, name), Some(target), None).await;
        }
        let host = self.existing(environment_id, name).await?;
        crate::reload::rollback(host.dir(), name, to).map_err(|e| PluginError::NotFound(format!("{e:#}")))?;
        Ok(host.sync(name).await)
    }

    /// Unloads a plugin and deletes its file (its history stays for a rollback).
    pub async fn delete(&self, environment_id: &str, name: &str) -> Result<ReloadEvent, PluginError> {
        check_name(name)?;
        if let Some(engine) = self.fleet.get() {
            let held = self.converging.lock().await;
            let history = deployed(engine, environment_id, name).await?;
            if history.last().is_none_or(|d| d.version.is_none()) {
                return Err(PluginError::NotFound(format!("no plugin {name} in this environment")));
            }
            return self.record(&held, engine, (environment_id, name), None, None).await;
        }
        let host = self.existing(environment_id, name).await?;
        let path = host.dir().join(format!("{name}.wasm"));
        std::fs::remove_file(&path).map_err(|e| PluginError::Io(format!("cannot delete {}: {e}", path.display())))?;
        Ok(host.sync(name).await)
    }

    async fn existing(&self, environment_id: &str, name: &str) -> Result<Arc<PluginHost>, PluginError> {
        let host = self.host(environment_id, false).await?;
        match host {
            Some(h)
                if h.dir().join(format!("{name}.wasm")).is_file()
                    || !crate::reload::history(h.dir(), name).unwrap_or_default().is_empty() =>
            {
                Ok(h)
            }
            _ => Err(PluginError::NotFound(format!("no plugin {name} in this environment"))),
        }
    }
}

/// Deployments read at once by the fleet follower.
const FOLLOW_PAGE: u32 = 1024;
/// How long the fleet follower rests between two looks at the deployments.
const FOLLOW_PAUSE: std::time::Duration = std::time::Duration::from_millis(100);

/// The version hosts show (`version_of`: the first 8 bytes of the SHA-256) of a content address.
fn short(digest: &str) -> &str {
    &digest[..digest.len().min(16)]
}

/// A stored component, checked against its content address.
async fn blob(engine: &Engine, digest: &str) -> Result<Vec<u8>, PluginError> {
    let d = digest.to_owned();
    let bytes = engine
        .store()
        .read(move |r| r.plugin_blob(&d))
        .await
        .map_err(|e| PluginError::Io(format!("cannot read plugin {digest} from the store: {e}")))?
        .ok_or_else(|| PluginError::NotFound(format!("the store has no component {digest}")))?;
    if jobhost_core::model::sha256_hex(&bytes, 32) != digest {
        return Err(PluginError::Io(format!("the store's component {digest} does not match its SHA-256")));
    }
    Ok(bytes)
}

/// The deployments of one plugin, oldest first.
async fn deployed(engine: &Engine, env: &str, name: &str) -> Result<Vec<Deployment>, PluginError> {
    let (e, n) = (env.to_owned(), name.to_owned());
    engine
        .store()
        .read(move |r| r.plugin_deployments(&e, &n))
        .await
        .map_err(|e| PluginError::Io(format!("cannot read the plugin's deployments: {e}")))
}

/// Writes `bytes` beside the target and renames it into place.
fn publish(dir: &Path, name: &str, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = dir.join(format!(".{name}.{}.upload", &version_of(bytes)[..8]));
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, dir.join(format!("{name}.wasm")))
}
