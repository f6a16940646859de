//! The compilation cache: each component is compiled once per content and engine settings,
//! kept as a precompiled file, and **mapped** by every later load.
//!
//! wasmtime's own cache stores compressed artifacts and deserializes them from bytes (a 19 MB
//! Python component took ~128 ms to come back from it); `Component::deserialize_file` maps a
//! precompiled file instead, so a load costs a few page-table entries and the code pages are
//! shared with the page cache (and between hosts on one machine).
//!
//! - **Layout**: `DIR/components/ENGINE/DIGEST.cwasm`. `ENGINE` hashes what makes artifacts
//!   compatible (wasmtime's version, the target, the compiler's settings), so a changed engine
//!   never reads an old artifact; `DIGEST` is the component's whole SHA-256.
//! - **Never changed in place**: an artifact is written under a temporary name and renamed
//!   into place, so a mapped file is never modified under a running host — not even by another
//!   host sharing the directory writing the same artifact.
//! - **Self-healing**: an artifact that does not deserialize (truncated, from a crashed
//!   writer, edited) is compiled again and replaced; a cache that cannot be written (read-only,
//!   disk full) costs a compile, never a load.
//! - **Digests by file identity**: the digest memo (`digests.rs`) remembers each file's digest, so a
//!   restart maps an unchanged plugin's artifact without reading or hashing the plugin.
//! - **Bounded**: after each write the directory is trimmed to its budget, least recently
//!   used first (a load touches its artifact's modification time).
//!
//! Trust: an artifact is machine code that wasmtime runs without validating it again, so the
//! directory must be writable only by the host's user (as `~/.cache` is); SECURITY.md says so.

use std::hash::{Hash as _, Hasher as _};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

use wasmtime::Engine;
use wasmtime::component::Component;

/// Where a loaded component came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// Mapped from an artifact a previous compile left.
    Mapped,
    /// Compiled now (and stored, when the cache is on and writable).
    Compiled,
}

/// A directory of precompiled components for one engine configuration.
#[derive(Debug)]
pub(crate) struct CompiledCache {
    dir: PathBuf,
    budget: u64,
    /// Digests of component files by identity (`DIR/components/digests`), shared by every
    /// engine setting: a file's content does not depend on them.
    pub(crate) digests: crate::digests::DigestMemo,
}

/// Numbers this process's temporary files: with the process id, no two writers — two
/// runtimes of one process on one directory included — ever share one.
static WRITES: AtomicU64 = AtomicU64::new(0);

impl CompiledCache {
    /// The cache under `root` for `engine`'s settings, trimmed to `budget` bytes.
    pub(crate) fn open(root: &Path, engine: &Engine, budget: u64) -> std::io::Result<Self> {
        // SipHash with fixed keys: the same settings name the same directory in every process.
        let mut h = std::hash::DefaultHasher::new();
        engine.precompile_compatibility_hash().hash(&mut h);
        let dir = root.join("components").join(format!("{:016x}", h.finish()));
        std::fs::create_dir_all(&dir)?;
        let digests = crate::digests::DigestMemo::open(root.join("components").join("digests"));
        Ok(Self { dir, budget, digests })
    }

    /// The component: mapped from its artifact, or compiled and stored. Its bytes are read
    /// only to compile (a mapped load needs nothing but the digest).
    pub(crate) fn component(
        &self,
        engine: &Engine,
        bytes: &crate::ComponentBytes,
    ) -> wasmtime::Result<(Component, Origin)> {
        let path = self.dir.join(format!("{}.cwasm", bytes.digest()));
        if path.is_file() {
            // SAFETY: the artifact is this cache's own, written by `Component::serialize` for an
            // engine with these exact settings (the directory name) and renamed into place
            // whole; the directory is as trusted as the host's binary (see the module doc).
            // wasmtime still checks its header and settings, and refuses a mismatch.
            #[allow(unsafe_code)]
            let mapped = unsafe { Component::deserialize_file(engine, &path) };
            match mapped {
                Ok(component) => {
                    // For the budget's least-recently-used order; best effort.
                    let _ = std::fs::File::options()
                        .write(true)
                        .open(&path)
                        .and_then(|f| f.set_modified(SystemTime::now()));
                    return Ok((component, Origin::Mapped));
                }
                Err(e) => {
                    tracing::warn!(artifact = %path.display(), error = %e, "compiling again: the cached artifact does not load")
                }
            }
        }
        let component = Component::new(engine, &bytes.bytes()?[..])?;
        if let Err(e) = self.store(&path, &component) {
            tracing::warn!(artifact = %path.display(), error = %e, "cannot store the compiled component; the next load compiles again");
        }
        Ok((component, Origin::Compiled))
    }

    fn store(&self, path: &Path, component: &Component) -> wasmtime::Result<()> {
        let bytes = component.serialize()?;
        let n = WRITES.fetch_add(1, Ordering::Relaxed);
        let tmp = self.dir.join(format!(".{}-{n}.tmp", std::process::id()));
        std::fs::write(&tmp, &bytes).and_then(|()| std::fs::rename(&tmp, path)).inspect_err(|_| {
            let _ = std::fs::remove_file(&tmp);
        })?;
        self.trim(path);
        Ok(())
    }

    /// Removes the least recently used artifacts until the directory fits its budget; never
    /// `keep`, the one just written. Removing a mapped artifact is safe: the mapping keeps its
    /// pages until the component is dropped.
    fn trim(&self, keep: &Path) {
        let Ok(entries) = std::fs::read_dir(&self.dir) else { return };
        let mut artifacts: Vec<(SystemTime, u64, PathBuf)> = entries
            .filter_map(|e| {
                let e = e.ok()?;
                let meta = e.metadata().ok()?;
                let path = e.path();
                (meta.is_file() && path.extension().is_some_and(|x| x == "cwasm"))
                    .then(|| (meta.modified().unwrap_or(SystemTime::UNIX_EPOCH), meta.len(), path))
            })
            .collect();
        let mut total: u64 = artifacts.iter().map(|(_, len, _)| len).sum();
        artifacts.sort();
        for (_, len, path) in artifacts {
            if total <= self.budget {
                break;
            }
            if path != keep && std::fs::remove_file(&path).is_ok() {
                total -= len;
            }
        }
    }
}
