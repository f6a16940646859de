//! The retention sweep: history older than [`EngineConfig::retention`] is deleted.
//!
//! History is what the store writes for every lifecycle and nobody edits afterwards: events,
//! deliveries, execution records, loop-guard chains. Left alone it grows without bound (a
//! busy host writes millions of rows a day), and so do the store, its backups and every scan
//! an operator runs. What is kept whatever its age:
//!
//! - an event that a delivery not done points at (pending, leased, or dead: a dead letter can
//!   be retried, and its event must be there when it is);
//! - a delivery not done;
//! - jobs, sheets, records, dead letters, tokens, secrets and plugins (what users own).
//!
//! Each table is walked in key order from its oldest row, a batch per transaction so the
//! writer is never held for long, and the walk stops at the first row that is not old enough:
//! keys follow time closely enough that the rest is newer. Rows kept on purpose are stepped
//! over, so they cost a read per sweep and never stop the sweep. Chains have random ids and
//! are walked whole, a batch at a time. Every host of a fleet may sweep: each delete is
//! idempotent.
//!
//! [`EngineConfig::retention`]: crate::EngineConfig::retention

use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

use crate::Engine;
use crate::error::Result;
use crate::model::Millis;
use crate::store::History;

/// Rows looked at per transaction.
const BATCH: u32 = 2000;

/// Rows deleted, per table.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Pruned {
    /// Events.
    pub events: u64,
    /// Deliveries.
    pub deliveries: u64,
    /// Execution records.
    pub executions: u64,
    /// Loop-guard chain rows.
    pub chains: u64,
}

impl Pruned {
    fn get_mut(&mut self, table: History) -> &mut u64 {
        match table {
            History::Events => &mut self.events,
            History::Deliveries => &mut self.deliveries,
            History::Executions => &mut self.executions,
        }
    }

    /// The tables and their counts, for metrics.
    pub fn by_table(&self) -> [(&'static str, u64); 4] {
        [
            ("events", self.events),
            ("deliveries", self.deliveries),
            ("executions", self.executions),
            ("chains", self.chains),
        ]
    }
}

/// What this host's sweeps deleted since it started.
#[derive(Debug, Default)]
pub(crate) struct Counters([AtomicU64; 4]);

impl Counters {
    fn add(&self, p: &Pruned) {
        for (i, (_, n)) in p.by_table().into_iter().enumerate() {
            self.0[i].fetch_add(n, Ordering::Relaxed);
        }
    }

    pub(crate) fn total(&self) -> Pruned {
        let n = |i: usize| self.0[i].load(Ordering::Relaxed);
        Pruned { events: n(0), deliveries: n(1), executions: n(2), chains: n(3) }
    }
}

/// Deletes the history written before `before`.
pub async fn prune(engine: &Engine, before: Millis) -> Result<Pruned> {
    let mut pruned = Pruned::default();
    for table in [History::Events, History::Deliveries, History::Executions] {
        let mut after = 0;
        loop {
            let (deleted, last, end) = engine
                .store()
                .write(move |tx| {
                    let rows = tx.history(table, after, before, BATCH)?;
                    let mut end = rows.len() < BATCH as usize;
                    let (mut old, mut last) = (Vec::new(), after);
                    for row in &rows {
                        match row.at {
                            Some(at) if at >= before => {
                                end = true;
                                break;
                            }
                            Some(_) if !row.in_use => old.push(row.key),
                            _ => {}
                        }
                        last = row.key;
                    }
                    Ok((tx.delete_history(table, &old)?, last, end))
                })
                .await?;
            *pruned.get_mut(table) += deleted;
            if end {
                break;
            }
            after = last;
        }
    }
    let mut after = String::new();
    loop {
        let from = after.clone();
        let (deleted, next) = engine.store().write(move |tx| tx.prune_chains(&from, before, BATCH)).await?;
        pruned.chains += deleted;
        match next {
            Some(next) => after = next,
            None => break,
        }
    }
    engine.inner.pruned.add(&pruned);
    if pruned != Pruned::default() {
        tracing::info!(
            events = pruned.events,
            deliveries = pruned.deliveries,
            executions = pruned.executions,
            chains = pruned.chains,
            "retention sweep deleted old history"
        );
    }
    Ok(pruned)
}
