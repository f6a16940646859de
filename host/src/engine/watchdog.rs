//! The watchdog: promotes `scheduled` jobs whose time came, and fails jobs nobody is working on.
//!
//! Flatfile has no such thing; without it a parent whose part was never acked would wait
//! forever. A `ready` job not acked within `ack_timeout` and an `executing` job without an ack
//! for its stale timeout are failed through the same path as a listener's `fail`, with an
//! outcome that says why — so part bookkeeping and `job:parts-completed` still happen.

use serde::Serialize;

use super::Engine;
use super::rules::{self, Ctx};
use crate::error::Result;
use crate::model::JobStatus;
use crate::store::Overdue;

/// What one sweep did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct SweepReport {
    /// Scheduled jobs moved on.
    pub promoted: u64,
    /// Ready jobs failed because no listener acked them.
    pub unacked: u64,
    /// Executing jobs failed because they went stale.
    pub stale: u64,
}

/// Jobs handled per transaction, so a large backlog does not hold the writer for long.
const BATCH: u32 = 256;

pub(super) async fn sweep(engine: &Engine) -> Result<SweepReport> {
    let mut total = SweepReport::default();
    loop {
        let now = engine.now();
        let config = engine.config().clone();
        let overdue = Overdue {
            ready_before: config.ack_timeout.map(|t| now - t.as_millis() as i64),
            now,
            stale_ms: config.stale_timeout.map(|t| t.as_millis() as i64),
        };
        let (report, seen) = engine
            .store()
            .write(move |tx| {
                let mut report = SweepReport::default();
                let jobs = tx.overdue_jobs(overdue, BATCH)?;
                let seen = jobs.len() as u32;
                for found in jobs {
                    let ctx = Ctx {
                        env: found.environment_id.clone(),
                        actor: "watchdog".into(),
                        now,
                        cause: None,
                        emitted: Default::default(),
                    };
                    // An earlier job of this batch may have changed this one (a cascade).
                    let Some(job) = tx.job(&ctx.env, &found.id)? else { continue };
                    if job.status != found.status {
                        continue;
                    }
                    match job.status {
                        JobStatus::Scheduled => {
                            rules::promote_scheduled(tx, &ctx, job)?;
                            report.promoted += 1;
                        }
                        JobStatus::Ready => {
                            let secs = config.ack_timeout.map(|t| t.as_secs_f64()).unwrap_or_default();
                            let message =
                                format!("no listener acknowledged job {} within {secs} s of it becoming ready", job.id);
                            rules::fail_overdue(tx, &ctx, job, "Not acknowledged", message)?;
                            report.unacked += 1;
                        }
                        JobStatus::Executing => {
                            let ms = job.stale_timeout_ms.or(overdue.stale_ms).unwrap_or_default();
                            let message = format!("no ack or progress on job {} for {} s", job.id, ms as f64 / 1000.0);
                            rules::fail_overdue(tx, &ctx, job, "Stale", message)?;
                            report.stale += 1;
                        }
                        _ => {}
                    }
                }
                Ok((report, seen))
            })
            .await?;
        total.promoted += report.promoted;
        total.unacked += report.unacked;
        total.stale += report.stale;
        if seen < BATCH {
            if total != SweepReport::default() {
                tracing::info!(
                    promoted = total.promoted,
                    unacked = total.unacked,
                    stale = total.stale,
                    "watchdog sweep"
                );
            }
            return Ok(total);
        }
    }
}
