//! Component digests remembered by file identity, so a host start neither reads nor hashes a
//! plugin file that has not changed since it was last hashed.
//!
//! A load needs the component's SHA-256 (its version and its key in the compilation cache); for
//! an 18 MB component, reading and hashing it was ~15 ms of a ~21 ms cached load. The memo maps
//! a file's identity — device, inode, size, modification and change times (nanoseconds) — to
//! the digest it had, and lives beside the compilation cache (`DIR/components/digests`), as
//! trusted as the artifacts there.
//!
//! A remembered digest is used only when the file's last change (its `ctime`, which no user
//! call can set back) was at least [`SETTLED`] before the file was hashed. A file rewritten in
//! place within one timestamp tick keeps its times, so a digest taken within that tick could
//! describe the earlier bytes; one taken a second later cannot (the rewrite would have moved
//! `ctime` past it). A file hashed too soon after its change is hashed again at the next load,
//! and that later digest is the one trusted. A file whose identity changed while it was read
//! is not remembered at all.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

/// How long before it was hashed a file must last have changed for its digest to be trusted.
pub(crate) const SETTLED: Duration = Duration::from_secs(1);

/// Most files remembered; the oldest hashed are forgotten first.
const MAX_ENTRIES: usize = 4096;

/// What identifies one content of one file without reading it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Identity {
    dev: u64,
    ino: u64,
    size: u64,
    mtime_ns: i128,
    ctime_ns: i128,
}

impl Identity {
    #[cfg(unix)]
    fn of(meta: &std::fs::Metadata) -> Option<Self> {
        use std::os::unix::fs::MetadataExt;
        let ns = |s: i64, n: i64| i128::from(s) * 1_000_000_000 + i128::from(n);
        Some(Self {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            mtime_ns: ns(meta.mtime(), meta.mtime_nsec()),
            ctime_ns: ns(meta.ctime(), meta.ctime_nsec()),
        })
    }

    #[cfg(not(unix))]
    fn of(_: &std::fs::Metadata) -> Option<Self> {
        None
    }
}

/// From when a digest of `meta`'s file is trusted: its last change plus [`SETTLED`].
pub(crate) fn trusted_from(meta: &std::fs::Metadata) -> Option<SystemTime> {
    let ns = Identity::of(meta)?.ctime_ns + SETTLED.as_nanos() as i128;
    Some(SystemTime::UNIX_EPOCH + Duration::from_nanos(u64::try_from(ns).ok()?))
}

#[derive(Debug, Clone)]
struct Remembered {
    digest: String,
    /// When the digest was taken (nanoseconds since the epoch).
    hashed_ns: i128,
}

/// The memo: in memory, written through to its file.
#[derive(Debug)]
pub(crate) struct DigestMemo {
    file: PathBuf,
    entries: Mutex<HashMap<Identity, Remembered>>,
}

fn now_ns() -> i128 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as i128)
}

impl DigestMemo {
    /// The memo kept in `file`; a missing or unreadable file is an empty memo, and lines that
    /// do not parse are skipped (the memo is only ever a shortcut).
    pub(crate) fn open(file: PathBuf) -> Self {
        let mut entries = HashMap::new();
        if let Ok(text) = std::fs::read_to_string(&file) {
            for line in text.lines() {
                if let Some((id, r)) = parse(line) {
                    entries.insert(id, r);
                }
            }
        }
        Self { file, entries: Mutex::new(entries) }
    }

    /// The digest of `meta`'s file when it is remembered and trusted.
    pub(crate) fn lookup(&self, meta: &std::fs::Metadata) -> Option<String> {
        let id = Identity::of(meta)?;
        let entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        let r = entries.get(&id)?;
        (r.hashed_ns >= id.ctime_ns + SETTLED.as_nanos() as i128).then(|| r.digest.clone())
    }

    /// Remembers that the file had `digest` when it was read: `before` and `after` are its
    /// metadata from just before and just after the read (a file that changed in between is
    /// not remembered). Writing the memo is best effort.
    pub(crate) fn remember(&self, before: &std::fs::Metadata, after: &std::fs::Metadata, digest: &str) {
        let (Some(id), Some(again)) = (Identity::of(before), Identity::of(after)) else { return };
        if id != again {
            return;
        }
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        entries.insert(id, Remembered { digest: digest.to_owned(), hashed_ns: now_ns() });
        if entries.len() > MAX_ENTRIES {
            let mut by_age: Vec<(i128, Identity)> = entries.iter().map(|(k, v)| (v.hashed_ns, *k)).collect();
            by_age.sort_by_key(|(hashed, _)| *hashed);
            for (_, k) in by_age.iter().take(entries.len() - MAX_ENTRIES) {
                entries.remove(k);
            }
        }
        let text: String = entries.iter().map(|(id, r)| line(id, r)).collect();
        // Written under the lock: two threads of one process share the temporary name.
        if let Err(e) = write_whole(&self.file, &text) {
            tracing::debug!(memo = %self.file.display(), error = %e, "cannot write the digest memo; the next start hashes again");
        }
    }
}

fn line(id: &Identity, r: &Remembered) -> String {
    format!("{} {} {} {} {} {} {}\n", id.dev, id.ino, id.size, id.mtime_ns, id.ctime_ns, r.hashed_ns, r.digest)
}

fn parse(line: &str) -> Option<(Identity, Remembered)> {
    let f: Vec<&str> = line.split(' ').collect();
    let [dev, ino, size, mtime, ctime, hashed, digest] = f.as_slice() else { return None };
    if digest.len() != 64 || !digest.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let id = Identity {
        dev: dev.parse().ok()?,
        ino: ino.parse().ok()?,
        size: size.parse().ok()?,
        mtime_ns: mtime.parse().ok()?,
        ctime_ns: ctime.parse().ok()?,
    };
    Some((id, Remembered { digest: (*digest).to_owned(), hashed_ns: hashed.parse().ok()? }))
}

/// Writes under a temporary name and renames into place: a reader sees the old memo or the
/// new one, never half of one.
fn write_whole(file: &Path, text: &str) -> std::io::Result<()> {
    let tmp = file.with_extension(format!("{}.tmp", std::process::id()));
    std::fs::write(&tmp, text).and_then(|()| std::fs::rename(&tmp, file)).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_digest_is_trusted_only_for_a_file_settled_before_it_was_hashed_and_unchanged_since() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("p.wasm");
        std::fs::write(&file, b"one").unwrap();
        let memo = DigestMemo::open(dir.path().join("digests"));
        let meta = std::fs::metadata(&file).unwrap();
        let digest = "a".repeat(64);
        memo.remember(&meta, &meta, &digest);
        // Just written and just hashed: the same tick could hold another write.
        assert_eq!(memo.lookup(&meta), None);
        // Hashed well after its last change (set back the hash time instead of waiting).
        let id = Identity::of(&meta).unwrap();
        memo.entries.lock().unwrap().get_mut(&id).unwrap().hashed_ns = id.ctime_ns + SETTLED.as_nanos() as i128;
        assert_eq!(memo.lookup(&meta), Some(digest.clone()));
        // The same file rewritten: another size, change time or inode misses.
        std::fs::write(&file, b"three").unwrap();
        assert_eq!(memo.lookup(&std::fs::metadata(&file).unwrap()), None);
        // A file that changed while it was read is not remembered.
        let before = std::fs::metadata(&file).unwrap();
        std::fs::write(&file, b"four").unwrap();
        let after = std::fs::metadata(&file).unwrap();
        let entries = memo.entries.lock().unwrap().len();
        memo.remember(&before, &after, &digest);
        assert_eq!(memo.entries.lock().unwrap().len(), entries);
    }

    #[test]
    fn the_memo_survives_a_reopen_and_ignores_damaged_lines() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("p.wasm");
        std::fs::write(&file, b"one").unwrap();
        let meta = std::fs::metadata(&file).unwrap();
        let path = dir.path().join("digests");
        let digest = "b".repeat(64);
        DigestMemo::open(path.clone()).remember(&meta, &meta, &digest);
        let mut text = std::fs::read_to_string(&path).unwrap();
        text.push_str("not a line\n1 2 3 4 5 6 nothex\n");
        std::fs::write(&path, text).unwrap();
        let memo = DigestMemo::open(path);
        let entries = memo.entries.lock().unwrap();
        assert_eq!(entries.len(), 1);
        assert_eq!(entries.values().next().unwrap().digest, digest);
    }
}
