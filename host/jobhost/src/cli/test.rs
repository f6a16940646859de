//! `jobhost plugin test DIR`: golden tests of a listener (see [`crate::golden`]).
//!
//! Every fixture is read before anything is built, so a broken fixture is bad input (exit 2)
//! rather than a failed test. The plugin is built and compiled once; each fixture then runs
//! in a store of its own, so fixtures cannot see each other's records or jobs.

use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use serde_json::json;

use crate::golden::{self, Fixture, Snapshot};
use crate::runtime::{Limits, Runtime, RuntimeConfig};

use super::{DataDir, read_records};

/// Deliveries at once inside one fixture's store.
const CONCURRENCY: usize = 16;

pub(super) async fn run(
    dir: &Path,
    update: bool,
    only: &[String],
    timeout: u64,
    json_out: bool,
) -> anyhow::Result<ExitCode> {
    if timeout == 0 {
        bail!("--timeout must be at least 1 second");
    }
    let mut fixtures = Fixture::all(dir)?;
    if !only.is_empty() {
        if let Some(missing) = only.iter().find(|n| !fixtures.iter().any(|f| &f.name == *n)) {
            bail!("{} has no fixture named {missing}", dir.join("tests").display());
        }
        fixtures.retain(|f| only.contains(&f.name));
    }
    let mut inputs = Vec::with_capacity(fixtures.len());
    for f in &fixtures {
        let records = read_records(&f.records).with_context(|| format!("fixture {}", f.name))?;
        let expected = if update { None } else { f.expected()? };
        if !update && expected.is_none() {
            bail!(
                "fixture {} has no {}: run `jobhost plugin test {} --update` to record the current result",
                f.name,
                golden::EXPECTED,
                dir.display()
            );
        }
        inputs.push((records, expected));
    }

    let src = dir.to_owned();
    let component = tokio::task::spawn_blocking(move || crate::build::build(&src)).await??;
    let defaults = RuntimeConfig::default();
    let limits = Limits { max_instances: CONCURRENCY, ..defaults.limits.clone() };
    let runtime = Runtime::new(RuntimeConfig { limits, max_instances: CONCURRENCY as u32, ..defaults })?;
    let plugin = Arc::new(runtime.load(&component).await.with_context(|| format!("{} does not load", dir.display()))?);

    let (mut passed, mut failed) = (0usize, 0usize);
    let mut report = Vec::new();
    for (fixture, (records, expected)) in fixtures.iter().zip(inputs) {
        let started = Instant::now();
        let store = DataDir::new(None)?;
        let timeout = Duration::from_secs(timeout);
        let result = golden::run_in_store(
            &store.path,
            &runtime,
            plugin.clone(),
            records,
            &fixture.job,
            fixture.input.clone(),
            timeout,
        )
        .await;
        let seconds = started.elapsed().as_secs_f64();
        let (ok, lines, got): (bool, Vec<String>, Option<Snapshot>) = match (result, expected) {
            (Err(e), _) => (false, vec![format!("{e:#}")], None),
            (Ok(got), None) => {
                fixture.write_expected(&got)?;
                (true, vec![format!("wrote {}", fixture.dir.join(golden::EXPECTED).display())], Some(got))
            }
            (Ok(got), Some(expected)) => {
                let lines = golden::diff(&expected, &got, golden::EXPECTED_GOT);
                (lines.is_empty(), lines, Some(got))
            }
        };
        if ok {
            passed += 1;
        } else {
            failed += 1;
        }
        if json_out {
            report.push(
                json!({ "fixture": fixture.name, "ok": ok, "differences": lines, "result": got, "seconds": seconds }),
            );
        } else {
            let verdict = if !ok {
                "FAILED"
            } else if update {
                "updated"
            } else {
                "ok"
            };
            println!(
                "{verdict:>7} {} ({seconds:.2} s){}",
                fixture.name,
                got.map(|g| format!(": {}", g.summary())).unwrap_or_default()
            );
            for line in &lines {
                println!("          {line}");
            }
        }
    }
    if json_out {
        println!("{}", json!({ "passed": passed, "failed": failed, "fixtures": report }));
    } else {
        println!("{passed} passed, {failed} failed");
        if failed > 0 && !update {
            println!("(if the new results are right: jobhost plugin test {} --update)", dir.display());
        }
    }
    Ok(if failed == 0 { ExitCode::SUCCESS } else { ExitCode::from(1) })
}
