//! The watchdog: promotes `scheduled` jobs whose time came, and fails jobs nobody is working on.
//!
//! Flatfile has no such thing; without it a parent whose part was never acked would wait
//! forever. A `ready` job not acked within `ack_timeout` and an `executing` job without an ack
//! for its stale timeout are failed through the same path as a listener's `fail`, with an
//! outcome that says why — so part bookkeeping and `job:parts-completed` still happen.
//!
//! It also hands out again the leases of hosts that stopped heartbeating. Every host runs a
//! watchdog, and each of its steps is idempotent: a job is locked and re-checked before it is
//! moved, so two hosts sweeping at once move it once.

use serde::Serialize;

use super::Engine;
use super::rules::{self, Ctx};
use crate::error::Result;
use crate::model::{JobStatus, Millis};
use crate::store::{Overdue, Tx};

/// What one sweep did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct SweepReport {
    /// Scheduled jobs moved on.
    pub promoted: u64,
    /// Ready jobs failed because no listener acked them.
    pub unacked: u64,
    /// Executing jobs failed because they went stale.
    pub stale: u64,
    /// Deliveries leased by hosts that stopped heartbeating, due again.
    pub reclaimed: u64,
}

/// Makes due again every delivery leased by a host that is gone: a host is live when it is in
/// `live`, or — with a `timeout` — when its heartbeat is more recent than that. Leases whose
/// owner never registered are gone too. Removes the registrations of the hosts that are gone.
/// Returns how many deliveries it reclaimed.
pub fn reclaim_gone_hosts(tx: &mut dyn Tx, live: &[String], now: Millis, timeout: Option<i64>) -> Result<u64> {
    let hosts = tx.hosts()?;
    let recent = hosts
        .iter()
        .filter(|h| !live.contains(&h.id) && timeout.is_some_and(|t| h.heartbeat_at >= now - t))
        .map(|h| h.id.clone());
    let live: Vec<String> = live.iter().cloned().chain(recent).collect();
    for gone in hosts.iter().filter(|h| !live.contains(&h.id)) {
        tracing::warn!(host = %gone.id, label = %gone.label, last_heartbeat = gone.heartbeat_at, "host is gone; its leases are handed out again");
        tx.remove_host(&gone.id)?;
    }
    tx.reclaim_leases_except(&live, now)
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
        let router = engine.router().clone();
        let (report, seen) = engine
            .store()
            .write(move |tx| {
                let mut report = SweepReport::default();
                let jobs = tx.overdue_jobs(overdue, BATCH)?;
                let seen = jobs.len() as u32;
                for found in jobs {
                    let ctx = Ctx {
                        router: router.clone(),
                        routes: Default::default(),
                        env: found.environment_id.clone(),
                        actor: "watchdog".into(),
                        now,
                        cause: None,
                        emitted: Default::default(),
                    };
                    // An earlier job of this batch may have changed this one (a cascade).
                    let Some(job) = tx.job_for_update(&ctx.env, &found.id)? else { continue };
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
            let (me, timeout, now) = (engine.host_id(), engine.config().host_timeout.as_millis() as i64, engine.now());
            total.reclaimed = engine
                .store()
                .write(move |tx| reclaim_gone_hosts(tx, std::slice::from_ref(&me), now, Some(timeout)))
                .await?;
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
