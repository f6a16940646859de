//! `jobhost run`: load plugins, load a records file, run a job, show progress, summarise.

use super::*;

pub(super) async fn run(args: RunArgs) -> anyhow::Result<ExitCode> {
    let (kind, operation) = parse_job(&args.job)?;
    let input: Value = match &args.input {
        Some(text) => serde_json::from_str(text).context("--input is not JSON")?,
        None => Value::Null,
    };
    let records = read_records(&args.records)?;
    let dir = DataDir::new(args.host.data.as_deref())?;
    let plugins_dir = match &args.plugins {
        Some(p) => {
            std::fs::read_dir(p)
                .map_err(|e| anyhow::anyhow!("cannot read the plugins directory {}: {e}", p.display()))?;
            p.clone()
        }
        // Built from source: published into the data directory's own plugins directory.
        None => {
            let p = dir.path.join("plugins");
            std::fs::create_dir_all(&p).with_context(|| format!("cannot create {}", p.display()))?;
            for src in &args.plugin_src {
                let from = src.clone();
                let built = tokio::task::spawn_blocking(move || crate::build::build(&from)).await??;
                publish(src, &built, &p)?;
            }
            p
        }
    };
    let runtime = Runtime::new(runtime_config(&args.host))?;
    let stale = std::time::Duration::from_secs(args.stale_timeout);
    let engine = open_engine_with(&dir.path, &args.host, Some(&runtime), |c| EngineConfig {
        stale_timeout: Some(stale),
        ack_timeout: Some(stale),
        ..c
    })?;
    let environment = engine.create_environment("run").await?;
    let running = Arc::new(engine.run(Vec::new()).await?);
    let (plugins, _watch) = start_plugins(&runtime, &running, &environment.id, &plugins_dir, args.host.json).await?;
    check_someone_listens(&plugins.loaded().await, kind, &operation)?;
    let env = engine.env(&environment.id);
    let sheet = env.create_sheet(args.records.file_stem().and_then(|s| s.to_str()).unwrap_or("records")).await?;
    let count = records.len();
    env.insert_records(&sheet.id, records).await?;
    let job = env.create_job(NewJob { input, source: Some(sheet.id.clone()), ..NewJob::new(kind, operation) }).await?;
    if !args.host.json {
        eprintln!("loaded {count} records into sheet {}; created job {} ({})", sheet.id, job.id, args.job);
    }
    let state = RunState { environment_id: environment.id, sheet_id: sheet.id, job_id: job.id, expected_invalid: None };
    finish(&engine, &state, &running, &plugins.loaded().await, &args.host, Instant::now()).await
}
