//! Plugin versions: a plugins directory, hot reload, history and rollback.
//!
//! [`PluginHost`] keeps one [`PluginSlot`] per plugin file of a directory and swaps a new
//! version into it only after the file was read, hashed, compiled and type-checked:
//!
//! - a plugin's manifest (`NAME.toml`, its limits, grants and configuration — see
//!   [`Manifest`](jobhost_runtime::Manifest)) is part of the version: a changed manifest swaps
//!   in the same compiled component under the new manifest, and an invalid one is refused like
//!   a bad component;
//! - unchanged content (same SHA-256 and manifest) does nothing;
//! - content that fails to load is reported with the reason and remembered, so the same bad
//!   bytes are not retried; the **last good version keeps serving**;
//! - a swap makes the new version current for every delivery that starts afterwards, while
//!   deliveries in flight finish on the version they started on; routes are keyed by content,
//!   so routes both versions share keep their subscriptions and pending deliveries, new routes
//!   subscribe, and dropped routes stop receiving events (their pending deliveries stay
//!   stored for a version that has them again);
//! - a deleted file unloads the plugin: nothing is delivered to it any more and handlers in
//!   flight finish, but its subscriptions stay, so events keep being stored for it and are
//!   delivered when a plugin with those routes returns;
//! - every loaded version is copied to `DIR/.history/NAME/` (the newest `keep` are kept) for
//!   [`rollback`].
//!
//! [`PluginHost::watch`] drives this from filesystem events (`notify`, debounced, renames
//! stitched together). Publish a plugin atomically by writing it elsewhere in the same
//! filesystem and renaming it to `NAME.wasm`; a plain in-place copy also works — a truncated
//! file fails validation and is never loaded, and the completed file loads on the next event.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::{Mutex, broadcast};

use jobhost_engine::Running;
use jobhost_runtime as runtime;
use jobhost_runtime::{ComponentBytes, Plugin, PluginSlot, ReloadOutcome, Route, Runtime, version_of};

/// A failure of the registry outside a reload (a reload reports its own as an event).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RegistryError {
    /// The plugins directory, or a kept version, could not be used.
    #[error("{context}: {cause}")]
    Io {
        /// What was being done.
        context: String,
        /// The I/O error.
        cause: std::io::Error,
    },
    /// The directory could not be watched.
    #[error("cannot watch {dir}: {cause}")]
    Watch {
        /// The plugins directory.
        dir: PathBuf,
        /// The watcher's error.
        cause: notify_debouncer_full::notify::Error,
    },
    /// A rollback asked for something that is not there.
    #[error("{0}")]
    Rollback(String),
}

fn io_error(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> RegistryError {
    let context = context.into();
    move |cause| RegistryError::Io { context, cause }
}

/// What happened to a plugin file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(tag = "kind", rename_all = "camelCase")]
pub enum ReloadEvent {
    /// A version was loaded and is now current.
    Loaded {
        /// Plugin name (file stem).
        name: String,
        /// The new version.
        version: String,
        /// The version it replaced.
        previous: Option<String>,
    },
    /// The file changed on disk but its content is the current version's.
    Unchanged {
        /// Plugin name.
        name: String,
        /// The current version.
        version: String,
    },
    /// The file could not be loaded; the previous version (if any) keeps serving.
    Failed {
        /// Plugin name.
        name: String,
        /// The content that failed, when it could be read.
        version: Option<String>,
        /// Why.
        reason: String,
    },
    /// The file is gone and the plugin was unloaded.
    Removed {
        /// Plugin name.
        name: String,
        /// The version that was unloaded.
        version: String,
    },
}

/// A loaded plugin as [`PluginHost::plugins`] reports it.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PluginInfo {
    /// Name (file stem).
    pub name: String,
    /// Current version.
    pub version: String,
    /// Its routes.
    pub routes: Vec<Route>,
    /// Versions kept for rollback, newest first (the current one among them).
    pub kept: Vec<String>,
}

/// A plugin file as read from the directory.
struct PluginFile {
    path: PathBuf,
    bytes: ComponentBytes,
    manifest_text: Option<String>,
    /// Component and manifest together: what a failure is remembered by.
    content: String,
}

/// Why a sync did not swap a new version in. Every refusal is reported one way: a
/// [`ReloadEvent::Failed`] with the reason, and the last good version keeps serving.
#[derive(Debug)]
enum Refused {
    /// The file (or its manifest) could not be read.
    Unreadable(String),
    /// The manifest or the component is invalid.
    Invalid(String),
    /// This exact content failed before.
    AlreadyFailed,
    /// The new plugin's routes could not be subscribed.
    Subscribe(jobhost_engine::Error),
}

impl Refused {
    fn event(self, name: &str, version: Option<String>) -> ReloadEvent {
        let reason = match self {
            Self::Unreadable(r) | Self::Invalid(r) => r,
            Self::AlreadyFailed => ALREADY_FAILED.into(),
            Self::Subscribe(e) => format!("cannot subscribe: {e}"),
        };
        ReloadEvent::Failed { name: name.to_owned(), version, reason }
    }
}

struct Entry {
    slot: Arc<PluginSlot>,
    /// Route key → subscription id, for the routes currently subscribed.
    subscribed: HashMap<String, String>,
}

/// The plugins of one directory, served in one environment.
pub struct PluginHost {
    runtime: Arc<Runtime>,
    running: Arc<Running>,
    environment_id: String,
    dir: PathBuf,
    keep: usize,
    plugins: Mutex<HashMap<String, Entry>>,
    /// Content that failed to load, per plugin (the last few): not compiled again.
    failed: Mutex<HashMap<String, Vec<String>>>,
    /// Why the newest file of a plugin did not load, until a version loads or the file goes.
    load_errors: std::sync::Mutex<HashMap<String, LoadError>>,
    events: broadcast::Sender<ReloadEvent>,
}

/// A plugin file that did not load: the previous version (if any) keeps serving.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct LoadError {
    /// Plugin name.
    pub name: String,
    /// The content that failed, when it could be read.
    pub version: Option<String>,
    /// Why.
    pub reason: String,
}

impl std::fmt::Debug for PluginHost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PluginHost").field("dir", &self.dir).field("environment_id", &self.environment_id).finish()
    }
}

/// Versions kept in the history by default.
pub const KEEP_VERSIONS: usize = 5;

const HISTORY: &str = ".history";

/// Bad contents remembered per plugin.
const REMEMBERED_FAILURES: usize = 16;

/// The reason reported for content that failed before (it is not compiled again).
pub const ALREADY_FAILED: &str = "this content already failed to load; waiting for a change";

fn plugin_name(path: &Path) -> Option<String> {
    let ext = path.extension()?;
    if ext != "wasm" && ext != "toml" {
        return None;
    }
    let stem = path.file_stem()?.to_str()?;
    (!stem.starts_with('.')).then(|| stem.to_owned())
}

impl PluginHost {
    /// Loads every `*.wasm` of `dir` into `environment_id` (a file that fails is reported and
    /// skipped) and returns the host with what the first load did. Call [`PluginHost::watch`] to follow changes.
    pub async fn start(
        runtime: Arc<Runtime>,
        running: Arc<Running>,
        environment_id: &str,
        dir: &Path,
    ) -> Result<(Arc<Self>, Vec<ReloadEvent>), RegistryError> {
        std::fs::read_dir(dir).map_err(io_error(format!("cannot read the plugins directory {}", dir.display())))?;
        let (events, _) = broadcast::channel(1024);
        let host = Arc::new(Self {
            runtime,
            running,
            environment_id: environment_id.to_owned(),
            dir: dir.to_path_buf(),
            keep: KEEP_VERSIONS,
            plugins: Mutex::new(HashMap::new()),
            failed: Mutex::new(HashMap::new()),
            load_errors: std::sync::Mutex::new(HashMap::new()),
            events,
        });
        let loaded = host.scan().await;
        Ok((host, loaded))
    }

    /// Every reload event from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<ReloadEvent> {
        self.events.subscribe()
    }

    /// The plugins directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The loaded plugins and their current versions.
    pub async fn plugins(&self) -> Vec<PluginInfo> {
        let plugins = self.plugins.lock().await;
        let mut out: Vec<PluginInfo> = plugins
            .iter()
            .map(|(name, e)| {
                let p = e.slot.get();
                let kept = history(&self.dir, name).unwrap_or_default().into_iter().map(|k| k.version).collect();
                PluginInfo { name: name.clone(), version: p.version.clone(), routes: p.routes.clone(), kept }
            })
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    /// The loaded plugins (current versions).
    pub async fn loaded(&self) -> Vec<Arc<Plugin>> {
        self.plugins.lock().await.values().map(|e| e.slot.get()).collect()
    }

    /// Brings every plugin in line with the directory: loads new and changed files, unloads
    /// plugins whose file is gone.
    pub async fn scan(&self) -> Vec<ReloadEvent> {
        let mut names: HashSet<String> = match std::fs::read_dir(&self.dir) {
            Ok(rd) => rd.filter_map(|e| e.ok()).filter_map(|e| plugin_name(&e.path())).collect(),
            Err(e) => {
                tracing::error!(dir = %self.dir.display(), error = %e, "cannot read the plugins directory");
                return Vec::new();
            }
        };
        names.extend(self.plugins.lock().await.keys().cloned());
        let mut names: Vec<String> = names.into_iter().collect();
        names.sort();
        let mut out = Vec::new();
        for name in names {
            out.push(self.sync(&name).await);
        }
        out
    }

    /// Brings one plugin in line with its file `DIR/NAME.wasm`.
    pub async fn sync(&self, name: &str) -> ReloadEvent {
        let event = self.sync_inner(name).await;
        match &event {
            ReloadEvent::Loaded { name, version, previous } => {
                tracing::info!(plugin = %name, version = %version, previous = ?previous, "plugin loaded")
            }
            ReloadEvent::Failed { name, reason, .. } if reason == ALREADY_FAILED => {
                tracing::debug!(plugin = %name, "plugin content unchanged since it failed to load")
            }
            ReloadEvent::Failed { name, reason, .. } => {
                tracing::error!(plugin = %name, reason = %reason, "plugin not loaded")
            }
            ReloadEvent::Removed { name, version } => {
                tracing::info!(plugin = %name, version = %version, "plugin unloaded")
            }
            ReloadEvent::Unchanged { .. } => {}
        }
        self.runtime.stats().count_reload(match &event {
            ReloadEvent::Loaded { .. } => ReloadOutcome::Loaded,
            ReloadEvent::Unchanged { .. } => ReloadOutcome::Unchanged,
            ReloadEvent::Failed { .. } => ReloadOutcome::Failed,
            ReloadEvent::Removed { .. } => ReloadOutcome::Removed,
        });
        if let Ok(mut errors) = self.load_errors.lock() {
            match &event {
                ReloadEvent::Failed { reason, .. } if reason == ALREADY_FAILED => {}
                ReloadEvent::Failed { name, version, reason } => {
                    errors.insert(
                        name.clone(),
                        LoadError { name: name.clone(), version: version.clone(), reason: reason.clone() },
                    );
                }
                ReloadEvent::Loaded { name, .. } | ReloadEvent::Removed { name, .. } => {
                    errors.remove(name);
                }
                ReloadEvent::Unchanged { .. } => {}
            }
        }
        let _ = self.events.send(event.clone());
        event
    }

    /// Plugins whose newest file did not load, by name, with the reason.
    pub fn load_errors(&self) -> Vec<LoadError> {
        let mut out: Vec<LoadError> =
            self.load_errors.lock().map(|e| e.values().cloned().collect()).unwrap_or_default();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    /// One sync, in its steps: read → validate → swap → resubscribe. Each step that refuses
    /// says why with a [`Refused`], which becomes the one `Failed` event of the sync.
    async fn sync_inner(&self, name: &str) -> ReloadEvent {
        // One change at a time: a swap is read, compile, subscribe — never interleaved.
        let mut plugins = self.plugins.lock().await;
        let file = match self.read(name) {
            Ok(Some(file)) => file,
            Ok(None) => return self.unload(&mut plugins, name),
            Err(refused) => return refused.event(name, None),
        };
        let current = plugins.get(name).map(|e| e.slot.get());
        let plugin = match self.validate(name, &file, current.as_deref()).await {
            Ok(Some(plugin)) => plugin,
            Ok(None) => {
                return ReloadEvent::Unchanged { name: name.to_owned(), version: file.bytes.version().to_owned() };
            }
            Err(refused) => {
                if !matches!(refused, Refused::AlreadyFailed) {
                    self.remember_failure(name, file.content.clone()).await;
                }
                return refused.event(name, Some(file.bytes.version().to_owned()));
            }
        };
        if current.as_ref().is_none_or(|c| c.version != file.bytes.version())
            && let Err(e) = self.remember(name, &file.bytes)
        {
            // A manifest-only change has its component in the history already.
            tracing::warn!(plugin = name, error = %e, "cannot keep this version for rollback");
        }
        match self.swap_and_resubscribe(&mut plugins, name, plugin).await {
            Ok(previous) => {
                ReloadEvent::Loaded { name: name.to_owned(), version: file.bytes.version().to_owned(), previous }
            }
            Err(refused) => refused.event(name, Some(file.bytes.version().to_owned())),
        }
    }

    /// Step 1: the plugin's file and manifest; `None` when the file is gone.
    fn read(&self, name: &str) -> Result<Option<PluginFile>, Refused> {
        let path = self.dir.join(format!("{name}.wasm"));
        // Hashed once, here (or known by the file's identity, unread): the version and the
        // compilation cache's key both come from it.
        let bytes = match self.runtime.read_component(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Refused::Unreadable(format!("cannot read {}: {e}", path.display()))),
        };
        let manifest_text = crate::runtime::Manifest::read_text(&path).map_err(|e| Refused::Invalid(e.0))?;
        // What failed is remembered by component and manifest together.
        let content = format!(
            "{}/{}",
            bytes.version(),
            manifest_text.as_deref().map_or_else(String::new, |t| version_of(t.as_bytes()))
        );
        Ok(Some(PluginFile { path, bytes, manifest_text, content }))
    }

    /// Step 2: the new version, compiled and type-checked against the contract; `None` when
    /// it is the current one.
    async fn validate(
        &self,
        name: &str,
        file: &PluginFile,
        current: Option<&Plugin>,
    ) -> Result<Option<Arc<Plugin>>, Refused> {
        if self.failed.lock().await.get(name).is_some_and(|bad| bad.contains(&file.content)) {
            return Err(Refused::AlreadyFailed);
        }
        let manifest = self
            .runtime
            .parse_manifest(&file.path, file.manifest_text.as_deref())
            .map_err(|e| Refused::Invalid(e.0))?;
        match current {
            Some(c) if c.version == file.bytes.version() && *c.manifest == manifest => Ok(None),
            // Only the manifest changed: same compiled component, new limits and grants.
            Some(c) if c.version == file.bytes.version() => Ok(Some(Arc::new(c.with_manifest(manifest)))),
            _ => self
                .runtime
                .load_with(&file.path, file.bytes.clone(), manifest)
                .await
                .map(|p| Some(Arc::new(p)))
                .map_err(|e| Refused::Invalid(e.to_string())),
        }
    }

    /// Steps 3 and 4: makes `plugin` current for every delivery that starts from now on, and
    /// subscribes its new routes / unsubscribes the routes it dropped. Returns the version it
    /// replaced.
    async fn swap_and_resubscribe(
        &self,
        plugins: &mut HashMap<String, Entry>,
        name: &str,
        plugin: Arc<Plugin>,
    ) -> Result<Option<String>, Refused> {
        self.running.set_max_in_flight(
            &self.environment_id,
            &format!("plugin:{name}"),
            plugin.manifest.limits.max_instances,
        );
        let Some(entry) = plugins.get_mut(name) else {
            let slot = PluginSlot::new(plugin.clone());
            let listener = self.runtime.slot_listener(slot.clone(), &plugin.routes, &self.environment_id);
            let ids = self.running.add(listener).await.map_err(Refused::Subscribe)?;
            let subscribed = plugin.routes.iter().map(Route::key).zip(ids).collect();
            plugins.insert(name.to_owned(), Entry { slot, subscribed });
            return Ok(None);
        };
        let previous = entry.slot.set(plugin.clone());
        let new_keys: HashMap<String, &Route> = plugin.routes.iter().map(|r| (r.key(), r)).collect();
        let added: Vec<Route> =
            new_keys.iter().filter(|(k, _)| !entry.subscribed.contains_key(*k)).map(|(_, r)| (*r).clone()).collect();
        let dropped: Vec<String> = entry.subscribed.keys().filter(|k| !new_keys.contains_key(*k)).cloned().collect();
        // The new version serves already; a route that could not be (un)subscribed is logged,
        // and the next sync of the plugin tries again.
        if !added.is_empty() {
            let listener = self.runtime.slot_listener(entry.slot.clone(), &added, &self.environment_id);
            match self.running.add(listener).await {
                Ok(ids) => entry.subscribed.extend(added.iter().map(Route::key).zip(ids)),
                Err(e) => tracing::error!(plugin = name, error = %e, "cannot subscribe the new routes"),
            }
        }
        let dropped_ids: Vec<String> = dropped.iter().filter_map(|k| entry.subscribed.remove(k)).collect();
        if let Err(e) = self.running.remove(&dropped_ids).await {
            tracing::error!(plugin = name, error = %e, "cannot unsubscribe dropped routes");
        }
        Ok(Some(previous.version.clone()))
    }

    /// The plugin's file is gone: unloads it.
    fn unload(&self, plugins: &mut HashMap<String, Entry>, name: &str) -> ReloadEvent {
        match plugins.remove(name) {
            Some(entry) => {
                // Detached, not unsubscribed: events keep being stored for the plugin and are
                // delivered when it returns (a delete-then-copy replacement loses nothing in
                // the gap).
                let ids: Vec<String> = entry.subscribed.values().cloned().collect();
                self.running.detach(&ids);
                ReloadEvent::Removed { name: name.to_owned(), version: entry.slot.get().version.clone() }
            }
            None => Refused::Unreadable(format!("{} does not exist", self.dir.join(format!("{name}.wasm")).display()))
                .event(name, None),
        }
    }

    async fn remember_failure(&self, name: &str, content: String) {
        let mut failed = self.failed.lock().await;
        let bad = failed.entry(name.to_owned()).or_default();
        bad.push(content);
        if bad.len() > REMEMBERED_FAILURES {
            bad.remove(0);
        }
    }

    /// Copies a loaded version into the history and trims it to the newest `keep`.
    fn remember(&self, name: &str, bytes: &ComponentBytes) -> std::io::Result<()> {
        let version = bytes.version();
        // The newest kept version already (a host start loads what it ran before): keeping it
        // again would push an older version out of the rollback window.
        if history(&self.dir, name)?.first().is_some_and(|newest| newest.version == version) {
            return Ok(());
        }
        let dir = history_dir(&self.dir, name);
        std::fs::create_dir_all(&dir)?;
        let stamp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis());
        let file = dir.join(format!("{stamp:015}-{version}.wasm"));
        let tmp = dir.join(format!(".{stamp:015}-{version}.tmp"));
        std::fs::write(&tmp, &bytes.bytes()?[..])?;
        std::fs::rename(&tmp, &file)?;
        let entries = history(&self.dir, name)?;
        for old in entries.iter().skip(self.keep) {
            let _ = std::fs::remove_file(&old.path);
        }
        Ok(())
    }

    /// Follows the directory: every create, change, rename or delete of a `*.wasm` file is
    /// synced after `debounce` of quiet ([`is_content_change`]: reads are not changes). Returns a guard; dropping it stops watching.
    pub fn watch(self: &Arc<Self>, debounce: Duration) -> Result<Watch, RegistryError> {
        use notify_debouncer_full::notify::RecursiveMode;
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Vec<PathBuf>>();
        let mut debouncer = notify_debouncer_full::new_debouncer(
            debounce,
            None,
            move |result: notify_debouncer_full::DebounceEventResult| {
                let paths: Vec<PathBuf> = match result {
                    Ok(events) => events
                        .into_iter()
                        .filter(|e| is_content_change(&e.event.kind))
                        .flat_map(|e| e.event.paths)
                        .collect(),
                    // Errors (e.g. the watch queue overflowed): resync everything.
                    Err(_) => vec![PathBuf::new()],
                };
                if !paths.is_empty() {
                    let _ = tx.send(paths);
                }
            },
        )
        .map_err(|cause| RegistryError::Watch { dir: self.dir.clone(), cause })?;
        debouncer
            .watch(&self.dir, RecursiveMode::NonRecursive)
            .map_err(|cause| RegistryError::Watch { dir: self.dir.clone(), cause })?;
        let host = self.clone();
        let task = tokio::spawn(async move {
            while let Some(paths) = rx.recv().await {
                if paths.iter().any(|p| p.as_os_str().is_empty()) {
                    host.scan().await;
                    continue;
                }
                let mut names: Vec<String> = paths.iter().filter_map(|p| plugin_name(p)).collect();
                names.sort();
                names.dedup();
                for name in names {
                    host.sync(&name).await;
                }
            }
        });
        Ok(Watch { _debouncer: Box::new(debouncer), task })
    }
}

/// Whether a filesystem event can change what a file holds: a create, a write, a rename, a
/// removal. Opening and reading a file are events too on Linux (inotify's `IN_OPEN`,
/// `IN_CLOSE_NOWRITE`), and so are metadata changes; a watcher that acted on them would
/// react to its own reads of the file, forever.
pub fn is_content_change(kind: &notify_debouncer_full::notify::EventKind) -> bool {
    use notify_debouncer_full::notify::EventKind;
    use notify_debouncer_full::notify::event::{AccessKind, AccessMode, ModifyKind};
    match kind {
        EventKind::Create(_) | EventKind::Remove(_) | EventKind::Any | EventKind::Other => true,
        EventKind::Modify(ModifyKind::Metadata(_)) => false,
        EventKind::Modify(_) => true,
        // A writer closing its file: the content is complete now.
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
        EventKind::Access(_) => false,
    }
}

/// Keeps a directory watched; dropping it stops the watcher.
pub struct Watch {
    _debouncer: Box<dyn std::any::Any + Send>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn history_dir(plugins: &Path, name: &str) -> PathBuf {
    plugins.join(HISTORY).join(name)
}

/// A version kept for rollback.
#[derive(Debug, Clone, Serialize)]
pub struct HistoryEntry {
    /// The version.
    pub version: String,
    /// When it was loaded, ms since the epoch.
    pub loaded_at: u64,
    /// Its copy.
    pub path: PathBuf,
}

/// The kept versions of plugin `name` in `plugins`, newest first.
pub fn history(plugins: &Path, name: &str) -> std::io::Result<Vec<HistoryEntry>> {
    let dir = history_dir(plugins, name);
    let mut out = Vec::new();
    let rd = match std::fs::read_dir(&dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(e),
    };
    for e in rd.flatten() {
        let path = e.path();
        let Some(stem) =
            path.file_stem().and_then(|s| s.to_str()).filter(|_| path.extension().is_some_and(|x| x == "wasm"))
        else {
            continue;
        };
        if let Some((stamp, version)) = stem.split_once('-')
            && let Ok(loaded_at) = stamp.parse()
        {
            out.push(HistoryEntry { version: version.to_owned(), loaded_at, path });
        }
    }
    out.sort_by(|a, b| b.loaded_at.cmp(&a.loaded_at).then(b.version.cmp(&a.version)));
    Ok(out)
}

/// Puts a kept version of plugin `name` back into `plugins/NAME.wasm` (write, then rename),
/// so a watching host loads it like any new version. Without `to`, the newest kept version
/// that differs from the current file. Returns the version restored.
pub fn rollback(plugins: &Path, name: &str, to: Option<&str>) -> Result<String, RegistryError> {
    let file = plugins.join(format!("{name}.wasm"));
    let current = std::fs::read(&file).ok().map(|b| version_of(&b));
    let kept = history(plugins, name).map_err(io_error(format!("cannot read the kept versions of {name}")))?;
    if kept.is_empty() {
        return Err(RegistryError::Rollback(format!(
            "no kept versions of plugin {name} in {}",
            history_dir(plugins, name).display()
        )));
    }
    let target = match to {
        Some(v) => kept.iter().find(|e| e.version == v).ok_or_else(|| {
            RegistryError::Rollback(format!(
                "version {v} of plugin {name} is not kept (kept: {})",
                kept.iter().map(|e| e.version.as_str()).collect::<Vec<_>>().join(", ")
            ))
        })?,
        None => kept.iter().find(|e| Some(&e.version) != current.as_ref()).ok_or_else(|| {
            RegistryError::Rollback(format!("plugin {name} has no kept version other than the current one"))
        })?,
    };
    let tmp = plugins.join(format!(".{name}.wasm.rollback"));
    let restore = io_error(format!("cannot restore version {} of {name}", target.version));
    std::fs::copy(&target.path, &tmp).and_then(|_| std::fs::rename(&tmp, &file)).map_err(restore)?;
    Ok(target.version.clone())
}
