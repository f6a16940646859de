//! Cranelift's incremental compilation cache, kept in memory for the life of the runtime.
//!
//! A new version of a plugin is mostly the code of the previous one: a Python or JavaScript
//! component is an interpreter of ~10–20 MB whose code does not change when the app's source
//! does (the app lives in its data). Cranelift keys each function by its IR and reuses the
//! machine code of a function it compiled before, so a reload compiles only what changed.
//!
//! Entries live in memory only: the module-level cache on disk already makes a restart with
//! unchanged plugins free, and what this cache serves is the next version in the same process
//! (`dev`, hot reload, `plugin test` runs of several fixtures). It is bounded: when an insert
//! would pass [`IncrementalCache::capacity`] bytes, the cache starts over empty.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

/// The cache store handed to wasmtime.
#[derive(Debug)]
pub struct IncrementalCache {
    entries: Mutex<Entries>,
    capacity: usize,
    hits: AtomicU64,
    misses: AtomicU64,
}

#[derive(Debug, Default)]
struct Entries {
    map: HashMap<Vec<u8>, Vec<u8>>,
    bytes: usize,
}

impl IncrementalCache {
    /// A cache of at most `capacity` bytes of keys and values.
    pub fn new(capacity: usize) -> Self {
        Self { entries: Mutex::default(), capacity, hits: AtomicU64::new(0), misses: AtomicU64::new(0) }
    }

    /// The most bytes it holds.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Functions whose code was reused, and functions compiled, since the runtime started.
    pub fn hits_and_misses(&self) -> (u64, u64) {
        (self.hits.load(Ordering::Relaxed), self.misses.load(Ordering::Relaxed))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Entries> {
        // A panic while holding the lock leaves a map that is still a valid cache.
        self.entries.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl wasmtime::CacheStore for IncrementalCache {
    fn get(&self, key: &[u8]) -> Option<Cow<'_, [u8]>> {
        let found = self.lock().map.get(key).cloned();
        let counter = if found.is_some() { &self.hits } else { &self.misses };
        counter.fetch_add(1, Ordering::Relaxed);
        found.map(Cow::Owned)
    }

    fn insert(&self, key: &[u8], value: Vec<u8>) -> bool {
        let size = key.len() + value.len();
        if size > self.capacity {
            return false;
        }
        let mut entries = self.lock();
        if entries.bytes + size > self.capacity {
            entries.map.clear();
            entries.bytes = 0;
        }
        if let Some(old) = entries.map.insert(key.to_vec(), value) {
            entries.bytes -= key.len() + old.len();
        }
        entries.bytes += size;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use wasmtime::CacheStore as _;

    #[test]
    fn keeps_what_fits_and_starts_over_when_full() {
        let cache = IncrementalCache::new(100);
        assert!(cache.insert(b"a", vec![0; 40]));
        assert!(cache.insert(b"b", vec![1; 40]));
        assert_eq!(cache.get(b"a").as_deref(), Some(&[0u8; 40][..]));
        assert!(cache.insert(b"c", vec![2; 40]), "over capacity: starts over");
        assert!(cache.get(b"a").is_none() && cache.get(b"b").is_none());
        assert_eq!(cache.get(b"c").as_deref(), Some(&[2u8; 40][..]));
        assert!(!cache.insert(b"d", vec![3; 200]), "larger than the whole cache: refused");
        assert_eq!(cache.hits_and_misses(), (2, 2));
    }
}
