//! The engine's notion of time.
//!
//! Timestamps are wall-clock milliseconds, but they advance with tokio's monotonic clock from
//! an anchor taken at start. Two things follow: timeouts (leases, the watchdog) never jump with
//! NTP adjustments, and tests that call `tokio::time::pause()` control every timestamp the
//! engine writes and every timer it waits on with one knob — no sleeps, no second fake clock.

use std::time::{SystemTime, UNIX_EPOCH};

use tokio::time::Instant;

use crate::model::Millis;

/// A clock anchored at wall time, advancing with `tokio::time::Instant`.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    wall_anchor: Millis,
    instant_anchor: Instant,
}

impl Clock {
    /// Anchors at the current system time. Call inside a tokio runtime.
    pub fn new() -> Self {
        let wall = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as Millis).unwrap_or(0);
        Self { wall_anchor: wall, instant_anchor: Instant::now() }
    }

    /// Milliseconds since the Unix epoch.
    pub fn now(&self) -> Millis {
        self.wall_anchor + self.instant_anchor.elapsed().as_millis() as Millis
    }

    /// The tokio instant at which [`Clock::now`] will read `at` (or now, if that is past).
    pub fn instant_at(&self, at: Millis) -> Instant {
        let now = self.now();
        Instant::now() + std::time::Duration::from_millis(at.saturating_sub(now).max(0) as u64)
    }
}

impl Default for Clock {
    fn default() -> Self {
        Self::new()
    }
}
