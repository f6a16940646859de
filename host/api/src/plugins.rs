//! Plugins over the API: one plugins directory per environment, each a hot-reloaded
//! [`PluginHost`]. A deploy is validated (compiled and type-checked) **before** it is written,
//! then published like a file dropped in the directory (temporary name, rename) and synced at
//! once — so a bad upload changes nothing and a good one serves the next event.
//!
//! The directory of `serve --plugins DIR` belongs to `serve --environment`; any other
//! environment gets `DATA/plugins/<environment id>/` on its first deploy. Manifests
//! (`NAME.toml`: limits and grants) stay files the operator writes: a tenant cannot grant
//! itself more than the host's defaults over the API.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::reload::{PluginHost, PluginInfo, ReloadEvent, Watch};
use crate::runtime::{Runtime, version_of};
use jobhost_engine::Running;

/// An environment's plugin host, and the watch on its directory when this registry started it.
type Hosted = (Arc<PluginHost>, Option<Watch>);

/// The plugin hosts of every environment that has plugins.
pub struct Plugins {
    runtime: Arc<Runtime>,
    running: Arc<Running>,
    root: PathBuf,
    hosts: tokio::sync::Mutex<HashMap<String, Hosted>>,
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
        Arc::new(Self { runtime, running, root, hosts: tokio::sync::Mutex::new(HashMap::new()) })
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

    /// Validates `bytes` as plugin `name` and, when it loads, publishes and loads it.
    pub async fn deploy(&self, environment_id: &str, name: &str, bytes: Vec<u8>) -> Result<ReloadEvent, PluginError> {
        check_name(name)?;
        let host = self.host(environment_id, true).await?.ok_or_else(|| PluginError::Io("no plugin host".into()))?;
        let path = host.dir().join(format!("{name}.wasm"));
        // Validate first: the manifest beside the target path applies, as it will after the swap.
        self.runtime.load_bytes(&path, bytes.clone()).await.map_err(|e| PluginError::Invalid(e.to_string()))?;
        publish(host.dir(), name, &bytes)
            .map_err(|e| PluginError::Io(format!("cannot write {}: {e}", path.display())))?;
        let event = host.sync(name).await;
        match &event {
            ReloadEvent::Failed { reason, .. } => Err(PluginError::Invalid(reason.clone())),
            _ => Ok(event),
        }
    }

    /// Puts a kept version back (the newest other one without `to`) and loads it.
    pub async fn rollback(
        &self,
        environment_id: &str,
        name: &str,
        to: Option<&str>,
    ) -> Result<ReloadEvent, PluginError> {
        check_name(name)?;
        let host = self.existing(environment_id, name).await?;
        crate::reload::rollback(host.dir(), name, to).map_err(|e| PluginError::NotFound(format!("{e:#}")))?;
        Ok(host.sync(name).await)
    }

    /// Unloads a plugin and deletes its file (its history stays for a rollback).
    pub async fn delete(&self, environment_id: &str, name: &str) -> Result<ReloadEvent, PluginError> {
        check_name(name)?;
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

/// Writes `bytes` beside the target and renames it into place.
fn publish(dir: &Path, name: &str, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = dir.join(format!(".{name}.{}.upload", &version_of(bytes)[..8]));
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, dir.join(format!("{name}.wasm")))
}
