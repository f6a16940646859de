//! Why a job that has not ended is not moving: read from its open deliveries, its parts and
//! its status, in words an operator can act on. `jobhost run`, the API and the console all
//! say it the same way.

use std::time::Duration;

use crate::model::{DeliveryState, Job, JobStatus, Millis, OpenDelivery, Waiting};
use crate::{EngineConfig, Env, Result};

impl Env {
    /// What job `id` waits for; `None` once it has ended.
    pub async fn waiting(&self, id: &str) -> Result<Option<Waiting>> {
        let job = self.job(id).await?;
        if job.status.is_terminal() {
            return Ok(None);
        }
        let deliveries = self.open_deliveries(id).await?;
        let parts = if job.split_at.is_some() { self.part_statuses(id).await? } else { Vec::new() };
        let reason = reason(&job, &deliveries, &parts, self.engine().config(), self.engine().now());
        Ok(Some(Waiting { reason, deliveries }))
    }

    /// The deliveries of job `id`'s events that have not finished (pending, leased, dead).
    pub async fn open_deliveries(&self, id: &str) -> Result<Vec<OpenDelivery>> {
        let id = id.to_owned();
        self.read(move |r, env| {
            r.job(env, &id)?.ok_or_else(|| crate::Error::not_found("job", &id))?;
            r.open_deliveries(env, &id)
        })
        .await
    }
}

/// "in 3 s" / "now" / "3 s ago", from `now` to `at`.
fn from_now(at: Millis, now: Millis) -> String {
    let secs = |ms: i64| Duration::from_millis(ms.unsigned_abs()).as_secs_f64();
    match at - now {
        d if d.abs() < 500 => "now".to_owned(),
        d if d > 0 => format!("in {:.0} s", secs(d)),
        d => format!("{:.0} s ago", secs(d)),
    }
}

/// The reason, from what is in flight first (that is what moves next), then the job itself.
fn reason(job: &Job, deliveries: &[OpenDelivery], parts: &[JobStatus], config: &EngineConfig, now: Millis) -> String {
    let first = |state: DeliveryState, retried: bool| {
        deliveries.iter().find(|d| d.state == state && (d.attempts > 0) == retried)
    };
    if let Some(d) = deliveries.iter().find(|d| d.state == DeliveryState::Leased) {
        let until = d.due_at.map(|t| format!("; its lease ends {}", from_now(t, now))).unwrap_or_default();
        return format!("{} is handling its {} event (attempt {}){until}", d.subscription_id, d.topic, d.attempts);
    }
    if let Some(d) = first(DeliveryState::Pending, true) {
        let error = d.last_error.as_deref().map(|e| format!(": {e}")).unwrap_or_default();
        let next = d.due_at.map(|t| format!("; the next attempt is due {}", from_now(t, now))).unwrap_or_default();
        return format!("attempt {} of {} on its {} event failed{error}{next}", d.attempts, d.subscription_id, d.topic);
    }
    if let Some(d) = first(DeliveryState::Pending, false) {
        let due = d.due_at.map(|t| format!(", due {}", from_now(t, now))).unwrap_or_default();
        return format!("its {} event waits for {}{due}", d.topic, d.subscription_id);
    }
    if let Some(d) = deliveries.iter().find(|d| d.state == DeliveryState::Dead) {
        let error = d.last_error.as_deref().map(|e| format!(" ({e})")).unwrap_or_default();
        return format!(
            "its {} event was dead-lettered for {} after {} attempts{error}; retry the dead letter to deliver it again",
            d.topic, d.subscription_id, d.attempts
        );
    }
    let watchdog = |t: Option<Duration>, what: &str| match t {
        Some(d) => format!("the watchdog fails it after {} s {what}", d.as_secs()),
        None => "no timeout is set, so nothing fails it".to_owned(),
    };
    match job.status {
        JobStatus::Executing if parts.iter().any(|s| !s.is_terminal()) => {
            let ended = parts.iter().filter(|s| s.is_terminal()).count();
            format!("waiting for its parts: {ended} of {} ended", parts.len())
        }
        JobStatus::Executing if !parts.is_empty() => {
            "its parts all ended and no listener completed or failed it on job:parts-completed".to_owned()
        }
        JobStatus::Executing => format!(
            "a listener acked it and returned without completing or failing it; {}",
            watchdog(config.stale_timeout, "without activity")
        ),
        JobStatus::Ready => format!(
            "no listener acked it (no subscription took its job:ready event, or its listener is not running); {}",
            watchdog(config.ack_timeout, "unacknowledged")
        ),
        JobStatus::Waiting if job.is_part => "waiting for the part before it to end (sequential parts)".to_owned(),
        JobStatus::Waiting => "waiting for its predecessors to complete".to_owned(),
        JobStatus::Scheduled => match job.run_at {
            Some(at) => format!("scheduled: it becomes ready {}", from_now(at, now)),
            None => "scheduled".to_owned(),
        },
        JobStatus::Created => "created with trigger manual: it waits for an execute call".to_owned(),
        ended => format!("{ended}"),
    }
}
