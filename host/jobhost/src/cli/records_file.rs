//! Record files: `.csv` (a header row of field keys) or `.jsonl`/`.ndjson` (one JSON object per
//! line), read one record at a time so a file of millions of records never sits in memory.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{Context as _, bail};
use serde_json::{Map, Value};

use crate::model::NewRecord;

/// Reads all records of a file.
pub fn read_records(path: &Path) -> anyhow::Result<Vec<NewRecord>> {
    RecordReader::open(path)?.collect()
}

/// Checks every record of a file without building it, as [`RecordReader`] would read it, and
/// counts them; the error names the record or line, as the reader's would.
pub fn check_records(path: &Path) -> anyhow::Result<u64> {
    let mut reader = RecordReader::open(path)?;
    let Rows::Lines(lines) = &mut reader.rows else {
        // CSV: a row is only split into strings; nothing can be wrong with it but its syntax.
        return reader.try_fold(0, |n, r| r.map(|_| n + 1));
    };
    let mut n = 0;
    for (i, line) in lines.enumerate() {
        let line = line.with_context(|| format!("cannot read {}", path.display()))?;
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str::<Checked>(&line) {
            Ok(Checked(true)) => n += 1,
            Ok(Checked(false)) => bail!("{} line {}: a field key must not be empty", path.display(), i + 1),
            // Not an object, or not JSON: the reader's message says which.
            Err(_) => return Err(reader_error(path, &line, i as u64 + 1)),
        }
    }
    Ok(n)
}

/// A JSON object with no empty key (true) or with one (false), read without keeping anything.
struct Checked(bool);

impl<'de> serde::Deserialize<'de> for Checked {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = Checked;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Checked, A::Error> {
                let mut ok = true;
                while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
                    ok &= !key.is_empty();
                    map.next_value::<serde::de::IgnoredAny>()?;
                }
                Ok(Checked(ok))
            }
        }
        d.deserialize_map(Visit)
    }
}

/// The reader's error for a line that is not a JSON object.
fn reader_error(path: &Path, line: &str, at: u64) -> anyhow::Error {
    match serde_json::from_str::<Value>(line) {
        Ok(other) => {
            let found = other.to_string();
            anyhow::anyhow!(
                "{} line {at}: expected a JSON object, found {}",
                path.display(),
                &found[..found.floor_char_boundary(80)]
            )
        }
        Err(e) => anyhow::anyhow!("{} line {at}: {e}", path.display()),
    }
}

/// Counts the bytes read through it, for progress by file position.
struct Counted<R> {
    inner: R,
    read: Arc<AtomicU64>,
}

impl<R: Read> Read for Counted<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.read.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}

type Source = Counted<std::fs::File>;

enum Rows {
    Csv { headers: Vec<String>, rows: csv::StringRecordsIntoIter<BufReader<Source>> },
    Lines(std::io::Lines<BufReader<Source>>),
}

/// An iterator over a record file's records; each item names the file and the record or
/// line it failed at.
pub struct RecordReader {
    path: PathBuf,
    rows: Rows,
    /// Records (CSV) or lines (JSON lines) read so far.
    at: u64,
    read: Arc<AtomicU64>,
    size: u64,
}

impl std::fmt::Debug for RecordReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecordReader").field("path", &self.path).field("at", &self.at).finish_non_exhaustive()
    }
}

impl RecordReader {
    /// Opens `path`; its extension says the format.
    pub fn open(path: &Path) -> anyhow::Result<Self> {
        let ext = path.extension().and_then(|e| e.to_str()).unwrap_or_default().to_ascii_lowercase();
        if !matches!(ext.as_str(), "csv" | "jsonl" | "ndjson") {
            bail!("{}: unsupported format; use .csv (header row of field keys) or .jsonl", path.display());
        }
        let file = std::fs::File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
        let size = file.metadata().map(|m| m.len()).unwrap_or(0);
        let read = Arc::new(AtomicU64::new(0));
        let source = BufReader::with_capacity(256 << 10, Counted { inner: file, read: read.clone() });
        let rows = if ext == "csv" {
            let mut reader = csv::ReaderBuilder::new().has_headers(true).from_reader(source);
            let headers: Vec<String> = reader
                .headers()
                .with_context(|| format!("{}: cannot read the header row", path.display()))?
                .iter()
                .map(|h| h.trim().to_owned())
                .collect();
            if headers.is_empty() || headers.iter().any(String::is_empty) {
                bail!("{}: the header row must name every column (found {headers:?})", path.display());
            }
            Rows::Csv { headers, rows: reader.into_records() }
        } else {
            Rows::Lines(source.lines())
        };
        Ok(Self { path: path.to_owned(), rows, at: 0, read, size })
    }

    /// Bytes of the file read so far and the file's size.
    pub fn position(&self) -> (u64, u64) {
        (self.read.load(Ordering::Relaxed), self.size)
    }

    /// A shared view of the bytes read, for a progress bar on another thread.
    pub fn bytes_read(&self) -> Arc<AtomicU64> {
        self.read.clone()
    }

    /// The file's size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }
}

impl Iterator for RecordReader {
    type Item = anyhow::Result<NewRecord>;

    fn next(&mut self) -> Option<Self::Item> {
        match &mut self.rows {
            Rows::Csv { headers, rows } => {
                let row = rows.next()?;
                self.at += 1;
                Some(row.with_context(|| format!("{}: bad CSV at record {}", self.path.display(), self.at)).map(
                    |row| {
                        let values: Map<String, Value> = headers
                            .iter()
                            .zip(row.iter())
                            .filter(|(_, v)| !v.is_empty())
                            .map(|(h, v)| (h.clone(), Value::String(v.to_owned())))
                            .collect();
                        NewRecord { values, ..Default::default() }
                    },
                ))
            }
            Rows::Lines(lines) => loop {
                let line = lines.next()?;
                self.at += 1;
                let line = match line {
                    Ok(l) => l,
                    Err(e) => return Some(Err(anyhow::anyhow!("cannot read {}: {e}", self.path.display()))),
                };
                if line.trim().is_empty() {
                    continue;
                }
                let at = self.at;
                return Some(match serde_json::from_str::<Value>(&line) {
                    Ok(Value::Object(values)) if values.keys().all(|k| !k.is_empty()) => {
                        Ok(NewRecord { values, ..Default::default() })
                    }
                    Ok(Value::Object(_)) => {
                        Err(anyhow::anyhow!("{} line {at}: a field key must not be empty", self.path.display()))
                    }
                    Ok(_) | Err(_) => Err(reader_error(&self.path, &line, at)),
                });
            },
        }
    }
}
