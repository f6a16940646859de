//! `jobhost dev --plugin-src DIR`: the plugin author's loop, in every guest language.
//!
//! Build (with `plugin build`'s pinned tools and cache) → publish into a watched plugins
//! directory → hot reload → run the job on the records (when given) → print the result and
//! what changed since the previous run. Then wait for the sources to change and go again.
//!
//! - A change is a file created, written, renamed or removed under DIR, outside build output
//!   and hidden entries (`target/`, `node_modules/`, `__pycache__/`, `.*`, `Cargo.lock`).
//!   Reads are not changes: a build opens every source, and on Linux an open is a filesystem
//!   event too. A change whose sources hash as the last build's does nothing.
//! - A build error is printed with the author's file and line; the last good version keeps
//!   serving (nothing is published).
//! - The job runs for the version loaded at start too, not only after a reload.
//! - A source change during a run abandons it (its jobs are canceled when the next run
//!   starts), so a handler that never ends its job does not hold up the fix. Failed
//!   deliveries are retried quickly (100 ms, doubling) and printed with their error and log.

use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use notify_debouncer_full::notify::{EventKind, RecursiveMode};

use crate::build::{self, Language};
use crate::golden::{self, Snapshot};
use crate::model::{JobType, NewRecord};
use crate::reload::ReloadEvent;
use crate::runtime::Runtime;
use crate::{EngineConfig, Env};

use super::{DataDir, DevArgs, open_engine_with, read_records, runtime_config, shutdown_signal, start_plugins};

/// Quiet time after a source change before building: an editor's save is several events.
const SOURCE_DEBOUNCE: Duration = Duration::from_millis(200);
/// Records lines printed per diff; the rest are counted.
const DIFF_LINES: usize = 20;

/// The job `dev` reruns after every reload.
struct DevJob {
    job: (JobType, String),
    records: Vec<NewRecord>,
    input: serde_json::Value,
    timeout: Duration,
    runs: u32,
    previous: Option<Snapshot>,
    /// Print every delivery's log lines, not only failures.
    logs: bool,
    /// The newest execution record already printed.
    seen_execution: i64,
    /// A Python plugin's source directory: tracebacks name its files by their guest path.
    python_src: Option<std::path::PathBuf>,
}

impl DevJob {
    /// Runs the job on a new sheet and prints its result and what changed since the last run.
    async fn run(&mut self, env: &Env, version: &str) {
        self.cancel_open_jobs(env).await;
        self.runs += 1;
        let started = Instant::now();
        let result = golden::run_job(
            env,
            &format!("dev-{}", self.runs),
            self.records.clone(),
            &self.job,
            self.input.clone(),
            self.timeout,
        )
        .await;
        self.report_deliveries(env).await;
        let snapshot = match result {
            Ok(s) => s,
            Err(e) => {
                eprintln!("run {} (version {version}): {e:#}", self.runs);
                return;
            }
        };
        eprintln!(
            "run {} (version {version}) in {:.2} s: job {}",
            self.runs,
            started.elapsed().as_secs_f64(),
            snapshot.summary()
        );
        if let Some(message) = snapshot.outcome.get("message").and_then(serde_json::Value::as_str) {
            eprintln!("  outcome: {message}");
        }
        if let Some(previous) = &self.previous {
            let lines = golden::diff(previous, &snapshot, golden::BEFORE_NOW);
            if lines.is_empty() {
                eprintln!("  no change since run {}", self.runs - 1);
            } else {
                eprintln!("  changed since run {}:", self.runs - 1);
                for line in lines.iter().take(DIFF_LINES) {
                    eprintln!("    {line}");
                }
                if lines.len() > DIFF_LINES {
                    eprintln!("    … and {} more", lines.len() - DIFF_LINES);
                }
            }
        }
        self.previous = Some(snapshot);
    }
}

impl DevJob {
    /// `text` with the guest's paths of the author's files made the author's paths.
    fn author_paths(&self, text: &str) -> String {
        match &self.python_src {
            Some(src) => build::python_author_paths(text, src),
            None => text.to_owned(),
        }
    }

    /// Cancels the jobs an abandoned run left open, so their deliveries stop.
    async fn cancel_open_jobs(&self, env: &Env) {
        let Ok(jobs) = env.jobs(0, u32::MAX).await else { return };
        for job in jobs.iter().filter(|j| !j.status.is_terminal() && j.parent_id.is_none()) {
            let _ = env.cancel(&job.id, Some("abandoned by jobhost dev".into())).await;
        }
    }

    /// Prints the deliveries since the last report that failed (their error and log), or
    /// every delivery's log lines with `--logs`.
    async fn report_deliveries(&mut self, env: &Env) {
        let executions = match env.executions(None, u32::MAX).await {
            Ok(e) => e,
            Err(e) => return eprintln!("cannot read the execution records: {e}"),
        };
        let new: Vec<_> = executions.into_iter().filter(|e| e.id > self.seen_execution).collect();
        self.seen_execution = new.iter().map(|e| e.id).max().unwrap_or(self.seen_execution);
        let failed = new.iter().filter(|e| e.error.is_some()).count();
        for e in new.iter().filter(|e| self.logs || e.error.is_some()).take(DIFF_LINES) {
            let job = e.job_id.as_deref().unwrap_or("-");
            match &e.error {
                Some(error) => eprintln!(
                    "  delivery {} of {job} (attempt {}) failed: {}",
                    e.topic,
                    e.attempt,
                    self.author_paths(error)
                ),
                None => eprintln!("  delivery {} of {job}:", e.topic),
            }
            for line in e.logs.lines() {
                eprintln!("    | {}", self.author_paths(line));
            }
        }
        if failed > DIFF_LINES {
            eprintln!("  … {failed} deliveries failed in all");
        }
    }
}

/// Whether a filesystem event under `root` is a change to the plugin's sources.
fn is_source_change(root: &Path, kind: &EventKind, path: &Path) -> bool {
    crate::reload::is_content_change(kind)
        && path.strip_prefix(root).is_ok_and(|rel| {
            !rel.components().any(|c| {
                c.as_os_str().to_str().is_some_and(|s| {
                    s.starts_with('.') || matches!(s, "target" | "node_modules" | "__pycache__" | "Cargo.lock")
                })
            })
        })
}

/// Runs the job, unless the sources change first: then the run is abandoned and the change
/// built at once, so a fix saved while a run hangs is not held up by it. Returns whether a
/// component was published.
async fn run_or_rebuild(
    job: &mut DevJob,
    env: &Env,
    version: &str,
    changes: &mut Changes,
    src: &Path,
    plugins: &Path,
    built_key: &mut Option<String>,
) -> bool {
    tokio::select! {
        () = job.run(env, version) => false,
        Some(first) = changes.recv() => {
            let changed = drain(first, changes);
            job.report_deliveries(env).await;
            eprintln!("run {} abandoned: the sources changed", job.runs);
            rebuild(src, plugins, built_key, &changed).await
        }
    }
}

/// Changed files, relative to the source directory, a batch per debounced event (empty when
/// the watcher could not say).
type Changes = tokio::sync::mpsc::UnboundedReceiver<Vec<String>>;

/// `first` and every batch already queued behind it, sorted and without repeats.
fn drain(mut first: Vec<String>, changes: &mut Changes) -> Vec<String> {
    while let Ok(more) = changes.try_recv() {
        first.extend(more);
    }
    first.sort();
    first.dedup();
    first
}

/// Rebuilds after a change of `changed`, unless the sources hash as the last build's.
/// Returns whether a component was published.
async fn rebuild(src: &Path, plugins: &Path, built_key: &mut Option<String>, changed: &[String]) -> bool {
    let key = match build::source_key(src) {
        Ok(k) => Some(k),
        Err(e) => {
            eprintln!("cannot read the sources: {e:#}");
            return false;
        }
    };
    if key == *built_key {
        return false;
    }
    *built_key = key;
    let what = if changed.is_empty() { String::new() } else { format!(" ({})", changed.join(", ")) };
    eprintln!("sources changed{what}: rebuilding");
    build_and_publish(src, plugins).await
}

/// Builds `src` and publishes the component into `plugins`; prints what happened. Returns
/// whether a component was published.
async fn build_and_publish(src: &Path, plugins: &Path) -> bool {
    let started = Instant::now();
    let from = src.to_owned();
    let built = tokio::task::spawn_blocking(move || build::build(&from)).await.map_err(anyhow::Error::from);
    match built.and_then(|r| r).and_then(|wasm| super::publish(src, &wasm, plugins)) {
        Ok(name) => {
            eprintln!("built {name} in {:.2} s", started.elapsed().as_secs_f64());
            true
        }
        Err(e) => {
            eprintln!("build failed: {e:#}");
            eprintln!("the last good version keeps serving; fix the error and save again");
            false
        }
    }
}

pub(super) async fn dev(args: DevArgs) -> anyhow::Result<ExitCode> {
    let src = args.plugin_src.canonicalize().with_context(|| format!("cannot find {}", args.plugin_src.display()))?;
    let language = Language::detect(&src)?;
    if args.timeout == 0 {
        bail!("--timeout must be at least 1 second");
    }
    let mut job = match (&args.job, &args.records) {
        (Some(job), Some(records)) => Some(DevJob {
            job: golden::parse_job(job).context("--job")?,
            records: read_records(records)?,
            input: match &args.input {
                Some(text) => serde_json::from_str(text).context("--input is not JSON")?,
                None => serde_json::Value::Null,
            },
            timeout: Duration::from_secs(args.timeout),
            runs: 0,
            previous: None,
            logs: args.logs,
            seen_execution: 0,
            python_src: (language == Language::Python).then(|| src.clone()),
        }),
        _ => None,
    };
    let dir = DataDir::new(args.host.data.as_deref())?;
    let plugins_dir = args.plugins.clone().unwrap_or_else(|| dir.path.join("plugins"));
    std::fs::create_dir_all(&plugins_dir)
        .with_context(|| format!("cannot create the plugins directory {}", plugins_dir.display()))?;
    let runtime: Arc<Runtime> = Runtime::new(runtime_config(&args.host))?;
    // A failing handler is dead-lettered within seconds, not minutes: the author is watching.
    let quick_retries = |c| EngineConfig { retry_backoff: Duration::from_millis(100), ..c };
    let engine = open_engine_with(&dir.path, &args.host, Some(&runtime), quick_retries)?;
    let environment = engine.environment_named("dev").await?;
    let env = engine.env(&environment.id);
    let running = Arc::new(engine.run(Vec::new()).await?);

    eprintln!("building {} ({language:?})", src.display());
    let mut built_key = build::source_key(&src).ok();
    build_and_publish(&src, &plugins_dir).await;
    let (plugins, _watch) = start_plugins(&runtime, &running, &environment.id, &plugins_dir, false).await?;
    let mut reloads = plugins.subscribe();
    // A version loaded from the compilation cache on disk was not compiled in this process,
    // so the incremental cache knows none of its functions: compile it once in the background
    // so the first edit recompiles only what changed.
    for plugin in plugins.loaded().await {
        let (rt, path) = (runtime.clone(), plugin.path.clone());
        tokio::task::spawn_blocking(move || {
            if let Err(e) = rt.warm_incremental(&path) {
                tracing::warn!(error = %e, "cannot warm the incremental compilation cache");
            }
        });
    }
    let (tx, mut changes) = tokio::sync::mpsc::unbounded_channel::<Vec<String>>();
    let root = src.clone();
    let mut debouncer = notify_debouncer_full::new_debouncer(
        SOURCE_DEBOUNCE,
        None,
        move |r: notify_debouncer_full::DebounceEventResult| {
            let changed = r.map(|events| {
                let changed = events.iter().flat_map(|e| e.event.paths.iter().map(move |p| (&e.event.kind, p)));
                changed
                    .filter(|(kind, p)| is_source_change(&root, kind, p))
                    .filter_map(|(_, p)| p.strip_prefix(&root).ok().map(|rel| rel.display().to_string()))
                    .collect::<Vec<_>>()
            });
            match changed {
                Ok(files) if files.is_empty() => {}
                Ok(files) => {
                    let _ = tx.send(files);
                }
                // A watcher error (e.g. its queue overflowed) may hide a change: check the sources.
                Err(_) => {
                    let _ = tx.send(Vec::new());
                }
            }
        },
    )?;
    debouncer.watch(&src, RecursiveMode::Recursive)?;
    eprintln!("watching {} (publishing to {}); Ctrl-C to stop", src.display(), plugins_dir.display());
    // The version loaded at start runs the job too.
    // Whether a build was published and its reload not seen yet: then an unchanged reload
    // means the new build is byte for byte the running version.
    let mut published = false;
    if let Some(job) = &mut job {
        match plugins.loaded().await.first() {
            Some(plugin) => {
                published =
                    run_or_rebuild(job, &env, &plugin.version, &mut changes, &src, &plugins_dir, &mut built_key).await;
            }
            None => eprintln!("no version loaded yet: the job runs after the first good build"),
        }
    }
    let stop = shutdown_signal();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = &mut stop => break,
            Some(first) = changes.recv() => {
                let changed = drain(first, &mut changes);
                published |= rebuild(&src, &plugins_dir, &mut built_key, &changed).await;
            }
            event = reloads.recv() => match event {
                Ok(ReloadEvent::Loaded { name, version, .. }) => {
                    eprintln!("loaded {name} version {version}");
                    published = false;
                    if let Some(job) = &mut job {
                        published =
                            run_or_rebuild(job, &env, &version, &mut changes, &src, &plugins_dir, &mut built_key).await;
                    }
                }
                Ok(ReloadEvent::Unchanged { name, version }) if published => {
                    published = false;
                    eprintln!("{name}: the new build is the running version {version}");
                }
                Ok(ReloadEvent::Failed { name, reason, .. }) if reason != crate::reload::ALREADY_FAILED => {
                    eprintln!("{name} not loaded: {reason}; the last good version keeps serving");
                }
                _ => {}
            },
        }
    }
    running.shutdown().await;
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;
    use notify_debouncer_full::notify::event::{
        AccessKind, AccessMode, CreateKind, DataChange, ModifyKind, RenameMode,
    };

    #[test]
    fn reads_build_output_and_hidden_files_are_not_source_changes() {
        let root = Path::new("/src/p");
        let file = root.join("app.py");
        let write = EventKind::Modify(ModifyKind::Data(DataChange::Any));
        assert!(is_source_change(root, &write, &file));
        assert!(is_source_change(root, &EventKind::Create(CreateKind::File), &file));
        assert!(is_source_change(root, &EventKind::Modify(ModifyKind::Name(RenameMode::To)), &file));
        assert!(is_source_change(root, &EventKind::Access(AccessKind::Close(AccessMode::Write)), &file));
        // A build opens and reads every source: none of that is a change.
        assert!(!is_source_change(root, &EventKind::Access(AccessKind::Open(AccessMode::Any)), &file));
        assert!(!is_source_change(root, &EventKind::Access(AccessKind::Close(AccessMode::Read)), &file));
        assert!(!is_source_change(root, &EventKind::Access(AccessKind::Read), &file));
        for out in ["target/release/x.wasm", "node_modules/a.js", "__pycache__/app.pyc", ".app.py.swp", "Cargo.lock"] {
            assert!(!is_source_change(root, &write, &root.join(out)), "{out}");
        }
        assert!(!is_source_change(root, &write, Path::new("/elsewhere/app.py")));
    }
}
