//! `jobhost demo`: the seeds' scenario end to end, resumable from its data directory.

use super::*;

/// What a data directory remembers of the job it runs, so a restarted host resumes it.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct RunState {
    pub(super) environment_id: String,
    pub(super) sheet_id: String,
    pub(super) job_id: String,
    pub(super) expected_invalid: Option<u64>,
}

pub(super) const STATE_FILE: &str = "demo.json";

pub(super) async fn demo(args: DemoArgs) -> anyhow::Result<ExitCode> {
    let dir = DataDir::new(args.host.data.as_deref())?;
    let started = Instant::now();
    let runtime = if args.native { None } else { Some(Runtime::new(runtime_config(&args.host))?) };
    let engine = open_engine(&dir.path, &args.host, runtime.as_deref())?;
    let resumed = read_state(&dir.path)?;
    let environment_id = match &resumed {
        Some(s) => {
            eprintln!("resuming job {} in {}", s.job_id, dir.path.display());
            s.environment_id.clone()
        }
        None => engine.create_environment("demo").await?.id,
    };
    // Listeners subscribe before the job exists: an event is fanned out to the subscriptions
    // present when it is stored.
    let (running, plugins) = match &runtime {
        None => (Arc::new(engine.run(scenario::listeners(&environment_id, scenario::Options::default())).await?), None),
        Some(rt) => {
            let plugins_dir = dir.path.join("plugins");
            std::fs::create_dir_all(&plugins_dir).context("cannot create the plugins directory")?;
            let target = plugins_dir.join("submit-large-sheet.wasm");
            let tmp = plugins_dir.join(".submit-large-sheet.wasm.tmp");
            std::fs::write(&tmp, crate::demo_plugin::SUBMIT_LARGE_SHEET)
                .and_then(|_| std::fs::rename(&tmp, &target))
                .context("cannot copy the example plugin (was the host built with its build script?)")?;
            let running = Arc::new(engine.run(Vec::new()).await?);
            let plugins = start_plugins(rt, &running, &environment_id, &plugins_dir, args.host.json).await?;
            (running, Some(plugins))
        }
    };
    let state = match resumed {
        Some(s) => s,
        None => setup_demo(&engine, &dir.path, &environment_id, args.records, args.host.json).await?,
    };
    let loaded = match &plugins {
        Some((host, _)) => host.loaded().await,
        None => Vec::new(),
    };
    finish(&engine, &state, &running, &loaded, &args.host, started).await
}

pub(super) async fn setup_demo(
    engine: &Engine,
    dir: &Path,
    environment_id: &str,
    records: u64,
    quiet: bool,
) -> anyhow::Result<RunState> {
    let env = engine.env(environment_id);
    let sheet = env.create_sheet("people").await?;
    // Through a real CSV file, so the demo exercises the same loading path as `run`.
    let csv_path = dir.join("people.csv");
    let expected_invalid = write_sample_csv(&csv_path, records)?;
    let t = Instant::now();
    let rows = read_records(&csv_path)?;
    env.insert_records(&sheet.id, rows).await?;
    if !quiet {
        eprintln!(
            "loaded {records} records from {} into sheet {} in {:.2} s ({expected_invalid} invalid by construction)",
            csv_path.display(),
            sheet.id,
            t.elapsed().as_secs_f64()
        );
    }
    let job = env.create_job(NewJob::sheet(scenario::OPERATION, &sheet.id)).await?;
    let state = RunState {
        environment_id: environment_id.to_owned(),
        sheet_id: sheet.id,
        job_id: job.id,
        expected_invalid: Some(expected_invalid),
    };
    let tmp = dir.join(format!("{STATE_FILE}.tmp"));
    std::fs::write(&tmp, serde_json::to_vec_pretty(&state)?)
        .and_then(|_| std::fs::rename(&tmp, dir.join(STATE_FILE)))
        .context("cannot write the demo state")?;
    eprintln!("created job {} ({})", state.job_id, scenario::JOB);
    Ok(state)
}

/// Writes the deterministic sample sheet as CSV; returns how many rows are invalid.
pub(super) fn write_sample_csv(path: &Path, records: u64) -> anyhow::Result<u64> {
    let mut w = csv::Writer::from_path(path).with_context(|| format!("cannot write {}", path.display()))?;
    let fields = ["firstName", "lastName", "email", "age"];
    w.write_record(fields)?;
    let mut invalid = 0;
    for i in 0..records {
        let (record, bad) = scenario::sample_record(i);
        invalid += u64::from(bad);
        let cell = |f: &str| match record.values.get(f) {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Null) | None => String::new(),
            Some(other) => other.to_string(),
        };
        w.write_record(fields.map(cell))?;
    }
    w.flush()?;
    Ok(invalid)
}

pub(super) fn read_state(dir: &Path) -> anyhow::Result<Option<RunState>> {
    match std::fs::read(dir.join(STATE_FILE)) {
        Ok(bytes) => Ok(Some(serde_json::from_slice(&bytes).context("demo.json is unreadable")?)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).context("cannot read demo.json"),
    }
}

/// Waits for the job to end (showing progress), stops the listeners, prints the summary.
pub(super) async fn finish(
    engine: &Engine,
    state: &RunState,
    running: &crate::delivery::Running,
    plugins: &[Arc<Plugin>],
    host: &HostArgs,
    started: Instant,
) -> anyhow::Result<ExitCode> {
    let job = watch_progress(engine, state, host.json).await?;
    settle(engine, host.json).await?;
    running.shutdown().await;
    let env = engine.env(&state.environment_id);
    let parts = env.parts(&job.id).await?;
    let count = |s: JobStatus| parts.iter().filter(|p| p.status == s).count();
    let records = env.record_counts(&state.sheet_id).await?;
    let dead = env.dead_letters().await?.len();
    let executions = env.executions(None, u32::MAX).await?;
    let failed_executions = executions.iter().filter(|e| e.error.is_some()).count();
    let summary = json!({
        "job": { "id": job.id, "status": job.status, "outcome": job.outcome },
        "parts": {
            "total": parts.len(),
            "completed": count(JobStatus::Complete),
            "failed": count(JobStatus::Failed),
            "canceled": count(JobStatus::Canceled),
        },
        "records": records,
        "expectedInvalid": state.expected_invalid,
        "plugins": plugins.iter().map(|p| json!({ "name": p.name, "version": p.version })).collect::<Vec<_>>(),
        "executions": { "total": executions.len(), "failed": failed_executions },
        "deadLetters": dead,
        "elapsedMs": started.elapsed().as_millis() as u64,
    });
    if host.json {
        println!("{summary}");
    } else {
        println!("job {} {}: {}", job.id, job.status, job.outcome.get("message").and_then(Value::as_str).unwrap_or(""));
        println!(
            "parts: {} total, {} completed, {} failed, {} canceled",
            parts.len(),
            count(JobStatus::Complete),
            count(JobStatus::Failed),
            count(JobStatus::Canceled)
        );
        let expected = state.expected_invalid.map(|n| format!(" (expected {n} invalid)")).unwrap_or_default();
        println!("records: {} total, {} valid, {} invalid{expected}", records.total, records.valid, records.error);
        if !plugins.is_empty() {
            println!("plugin deliveries: {} ({} failed), dead letters: {dead}", executions.len(), failed_executions);
        }
        println!("took {:.2} s", started.elapsed().as_secs_f64());
    }
    Ok(if job.status == JobStatus::Complete { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

/// How long the host keeps delivering after the job ended, for deliveries still due.
const SETTLE_FOR: std::time::Duration = std::time::Duration::from_secs(30);

/// Lets the deliveries still due run before the host stops: those the job's end caused, and
/// the redelivery of one whose work finished just before a restart (its listener sees the repeat
/// and ends it). Bounded, because a listener that keeps failing retries on its own schedule; what
/// is left then stays stored for the next start.
async fn settle(engine: &Engine, quiet: bool) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + SETTLE_FOR;
    let mut commits = engine.store().backend().notifications().commits;
    loop {
        commits.borrow_and_update();
        let stats = engine.delivery_stats().await?;
        if stats.pending + stats.leased == 0 {
            return Ok(());
        }
        let Ok(changed) = tokio::time::timeout_at(deadline, commits.changed()).await else {
            if !quiet {
                eprintln!(
                    "{} deliveries still pending after {} s; they run when a host next starts on this data",
                    stats.pending + stats.leased,
                    SETTLE_FOR.as_secs()
                );
            }
            return Ok(());
        };
        changed.context("the store closed")?;
    }
}

/// Shows progress until the parent job is terminal, and returns it: progress bars on a
/// terminal, plain lines otherwise (the crash tests read those lines), nothing with `--json`.
pub(super) async fn watch_progress(engine: &Engine, state: &RunState, quiet: bool) -> anyhow::Result<Job> {
    use indicatif::{ProgressBar, ProgressStyle};
    let env = engine.env(&state.environment_id);
    let bars = !quiet && std::io::stderr().is_terminal();
    let multi = indicatif::MultiProgress::new();
    let style = ProgressStyle::with_template("{prefix:>7} [{bar:40}] {pos}/{len} {msg}")
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
    let parent_bar = multi.add(ProgressBar::new(100).with_style(style.clone()).with_prefix("parent"));
    let parts_bar = multi.add(ProgressBar::new(0).with_style(style).with_prefix("parts"));
    if !bars {
        multi.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let mut commits = engine.store().backend().notifications().commits;
    let (mut cursor, mut parts_total, mut parts_ended, mut last_printed) = (0i64, 0u64, 0u64, u64::MAX);
    let (mut next_check, mut stalled) = (tokio::time::Instant::now() + STALL_CHECK, None::<String>);
    loop {
        commits.borrow_and_update();
        loop {
            let events = env.events(cursor, 10_000).await?;
            let Some(last) = events.last() else { break };
            cursor = last.seq;
            for e in &events {
                let is_part = e.payload.get("isPart").and_then(Value::as_bool) == Some(true);
                let status = e.payload.get("status").and_then(Value::as_str);
                match (e.topic.as_str(), is_part) {
                    ("job:created", true) => parts_total += 1,
                    ("job:completed" | "job:failed", true) => parts_ended += 1,
                    ("job:updated", true) if status == Some("canceled") => parts_ended += 1,
                    ("job:parts-completed", _) if !bars && !quiet => {
                        eprintln!("parts-completed: {}", e.payload["parts"])
                    }
                    _ => {}
                }
            }
        }
        let job = env.job(&state.job_id).await?;
        if bars {
            parent_bar.set_position(u64::from(job.progress));
            parent_bar.set_message(job.info.clone().unwrap_or_default());
            parts_bar.set_length(parts_total);
            parts_bar.set_position(parts_ended);
        } else if !quiet {
            // Every part end for small jobs, every 1% for large ones: fine-grained enough for
            // the crash tests to choose kill points.
            let step = (parts_total / 100).max(1);
            if parts_total > 0 && parts_ended != last_printed && (parts_ended % step == 0 || parts_ended == parts_total)
            {
                eprintln!("parts ended: {parts_ended}/{parts_total}");
                last_printed = parts_ended;
            }
        }
        if job.status.is_terminal() {
            parent_bar.finish_and_clear();
            parts_bar.finish_and_clear();
            if !quiet {
                eprintln!("parent {}", job.status);
            }
            return Ok(job);
        }
        // Once a second at most (counting deliveries scans their table): is anything still
        // due or running that could move the job? If not, say which jobs wait and why.
        let woke = tokio::time::timeout_at(next_check, commits.changed()).await;
        if let Ok(changed) = woke {
            changed.context("the store closed")?;
        }
        if tokio::time::Instant::now() >= next_check {
            next_check = tokio::time::Instant::now() + STALL_CHECK;
            let note = stall_note(engine, &env, &job).await?;
            if let Some(note) = &note
                && stalled.as_ref() != Some(note)
            {
                // Even with `--json`: stdout stays the summary, and a silent wait is the problem.
                multi.suspend(|| eprintln!("{note}"));
            }
            stalled = note;
        }
    }
}

/// How often [`watch_progress`] checks whether the job can still move.
const STALL_CHECK: std::time::Duration = std::time::Duration::from_secs(1);

/// When no delivery is pending or in flight, the jobs of this run that are not ended (the
/// parent, then its parts) and why they wait; `None` while deliveries remain.
async fn stall_note(engine: &Engine, env: &crate::Env, parent: &Job) -> anyhow::Result<Option<String>> {
    let stats = engine.delivery_stats().await?;
    if stats.pending + stats.leased > 0 {
        return Ok(None);
    }
    let parts = env.parts(&parent.id).await?;
    let open: Vec<&Job> = std::iter::once(parent).chain(parts.iter()).filter(|j| !j.status.is_terminal()).collect();
    let mut lines = vec![format!(
        "waiting: no delivery is pending or in flight, and {} job(s) of this run have not ended:",
        open.len()
    )];
    for j in open.iter().take(5) {
        // The engine's words, as the API and the console say them.
        let why = match env.waiting(&j.id).await? {
            Some(w) => w.reason,
            None => "it has just ended".to_owned(),
        };
        let info = j.info.as_deref().map(|i| format!(" (info: {i})")).unwrap_or_default();
        lines.push(format!("  job {} {}{info}: {}: {why}", j.id, j.job_name(), j.status));
    }
    if open.len() > 5 {
        lines.push(format!("  … and {} more", open.len() - 5));
    }
    Ok(Some(lines.join("\n")))
}

/// Runs the demo from a test's child process (see `tests/crash.rs`).
pub async fn demo_for_tests(args: DemoArgs) -> anyhow::Result<ExitCode> {
    demo(args).await
}
