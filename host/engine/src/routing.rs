//! Routing: which subscriptions a new event is delivered to.
//!
//! Subscriptions are rows any host may write, so routing cannot trust a process-local list.
//! The [`Router`] keeps the active subscriptions parsed (topic patterns and filters compiled
//! once) together with the store's [`subscriptions_version`](crate::store::ReadTx::subscriptions_version)
//! they were read at. Each write transaction that emits events reads the version once, inside
//! the transaction, and reloads the list when it changed — so an event committed after a
//! subscription sees it, whichever host wrote either, and a write that emits nothing pays
//! nothing.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use crate::error::Result;
use crate::filter::{Selector, flatten_event};
use crate::model::Event;
use crate::store::{ReadTx, Tx};

/// Active subscriptions by environment, as of one version of the store's subscriptions.
#[derive(Debug, Default)]
pub struct Routes {
    version: u64,
    by_env: HashMap<String, Vec<(String, Selector)>>,
}

impl Routes {
    /// The subscriptions of the event's environment whose topic and filter match it.
    pub fn matching<'a>(&'a self, event: &Event) -> Vec<&'a str> {
        let Some(candidates) = self.by_env.get(event.environment_id()) else { return Vec::new() };
        let mut flat = None;
        let mut out = Vec::new();
        for (id, sel) in candidates {
            if !sel.topic.matches(&event.topic) {
                continue;
            }
            let flat = flat.get_or_insert_with(|| flatten_event(event));
            if sel.filter.matches_flat(flat) {
                out.push(id.as_str());
            }
        }
        out
    }
}

/// The engine's routing cache, invalidated by the store's subscriptions version.
#[derive(Debug, Default)]
pub struct Router {
    current: RwLock<Option<Arc<Routes>>>,
}

impl Router {
    /// The routes valid in this transaction: the cached ones when the store's version is the
    /// one they were read at, else freshly read (and cached for the next transaction).
    pub fn routes(&self, tx: &mut dyn Tx) -> Result<Arc<Routes>> {
        let version = tx.subscriptions_version()?;
        if let Some(cached) = self.current.read().ok().and_then(|c| c.clone())
            && cached.version == version
        {
            return Ok(cached);
        }
        let fresh = Arc::new(load(tx, version)?);
        if let Ok(mut slot) = self.current.write() {
            *slot = Some(fresh.clone());
        }
        Ok(fresh)
    }
}

fn load(tx: &mut dyn ReadTx, version: u64) -> Result<Routes> {
    let mut by_env: HashMap<String, Vec<(String, Selector)>> = HashMap::new();
    for sub in tx.active_subscriptions()? {
        match Selector::parse(&sub.topic, &sub.filter) {
            Ok(sel) => by_env.entry(sub.environment_id).or_default().push((sub.id, sel)),
            // Stored by an older or newer host whose patterns this one cannot read: routing
            // the rest matters more than refusing every write.
            Err(e) => {
                tracing::error!(subscription = %sub.id, error = %e, "stored subscription does not parse; skipped")
            }
        }
    }
    Ok(Routes { version, by_env })
}
