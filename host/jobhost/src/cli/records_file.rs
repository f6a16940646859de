//! Record files: `.csv` (a header row of field keys) or `.jsonl`/`.ndjson` (one JSON object per
//! line), read one record at a time so a file of millions of records never sits in memory.
//!
//! What a file must be, each refused with the file and the record or line named: UTF-8 (a
//! leading byte-order mark is skipped); a CSV header naming every column once (names are
//! trimmed, so `a` and ` a` are the same column); every CSV row as long as the header; no
//! record (a CSV row or a JSON line) longer than [`MAX_RECORD_BYTES`]. An empty `.csv` has no
//! header and is refused; a header alone, or an empty `.jsonl`, is zero records.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{Context as _, bail};
use serde_json::{Map, Value};

use crate::model::NewRecord;

/// The longest record a file may hold, as a CSV row or a JSON line: the API takes at most
/// 32 MiB per request, and a record must fit in one with room for its neighbours.
pub const MAX_RECORD_BYTES: usize = 16 << 20;

/// The error for a record over [`MAX_RECORD_BYTES`], after `place` ("f.jsonl line 3:").
fn too_long(place: String) -> anyhow::Error {
    anyhow::anyhow!("{place} longer than {} MiB, the most a record may be", MAX_RECORD_BYTES >> 20)
}

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
    while let Some((at, line)) = lines.next_line(path) {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str::<Checked>(&line) {
            Ok(Checked(true)) => n += 1,
            Ok(Checked(false)) => bail!("{} line {at}: a field key must not be empty", path.display()),
            // Not an object, or not JSON: the reader's message says which.
            Err(_) => return Err(reader_error(path, &line, at)),
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
    Lines(Lines),
}

/// A JSON-lines file's lines, each checked for UTF-8 and length before it is kept.
struct Lines {
    source: BufReader<Source>,
    buf: Vec<u8>,
    /// Lines read so far (the number of the last one).
    at: u64,
}

impl Lines {
    /// The next line and its number; `None` at the end of the file.
    fn next_line(&mut self, path: &Path) -> Option<(u64, anyhow::Result<String>)> {
        self.buf.clear();
        // Room for a line at the limit and its `\r\n`: a read that fills it without reaching a
        // newline is a line over the limit, and no more than this of it is ever held.
        let limit = MAX_RECORD_BYTES as u64 + 2;
        let read = (&mut self.source).take(limit).read_until(b'\n', &mut self.buf);
        self.at += 1;
        let at = self.at;
        match read {
            Ok(0) => return None,
            Ok(_) => {}
            Err(e) => return Some((at, Err(anyhow::anyhow!("cannot read {} at line {at}: {e}", path.display())))),
        }
        let mut line: &[u8] = &self.buf;
        let ended = line.last() == Some(&b'\n');
        if ended {
            line = &line[..line.len() - 1];
            line = line.strip_suffix(b"\r").unwrap_or(line);
        }
        if at == 1 {
            line = line.strip_prefix("\u{feff}".as_bytes()).unwrap_or(line);
        }
        // Cut off by `take` (no newline at the limit) or over it: a runaway line ends the read.
        if line.len() > MAX_RECORD_BYTES || (!ended && self.buf.len() as u64 == limit) {
            return Some((at, Err(too_long(format!("{} line {at}:", path.display())))));
        }
        Some((
            at,
            std::str::from_utf8(line).map(str::to_owned).map_err(|e| {
                anyhow::anyhow!(
                    "{} line {at}: not UTF-8 (invalid bytes at column {})",
                    path.display(),
                    e.valid_up_to() + 1
                )
            }),
        ))
    }
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
            if size == 0 {
                bail!("{}: the file is empty; a CSV file starts with a header row of field keys", path.display());
            }
            let mut reader = csv::ReaderBuilder::new().has_headers(true).from_reader(source);
            let headers: Vec<String> = reader
                .headers()
                .with_context(|| format!("{}: cannot read the header row", path.display()))?
                .iter()
                .enumerate()
                // The csv crate keeps a byte-order mark in the first name.
                .map(|(i, h)| if i == 0 { h.trim_start_matches('\u{feff}') } else { h }.trim().to_owned())
                .collect();
            if headers.is_empty() || headers.iter().any(String::is_empty) {
                bail!("{}: the header row must name every column (found {headers:?})", path.display());
            }
            let mut seen = std::collections::HashMap::new();
            for (i, h) in headers.iter().enumerate() {
                if let Some(first) = seen.insert(h.as_str(), i) {
                    bail!(
                        "{}: the header row names `{h}` twice (columns {} and {}); a field key may name one column",
                        path.display(),
                        first + 1,
                        i + 1
                    );
                }
            }
            Rows::Csv { headers, rows: reader.into_records() }
        } else {
            Rows::Lines(Lines { source, buf: Vec::new(), at: 0 })
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
                if let Ok(row) = &row
                    && row.as_slice().len() > MAX_RECORD_BYTES
                {
                    return Some(Err(too_long(format!("{}: record {} is", self.path.display(), self.at))));
                }
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
                let (at, line) = lines.next_line(&self.path)?;
                self.at = at;
                let line = match line {
                    Ok(l) => l,
                    Err(e) => return Some(Err(e)),
                };
                if line.trim().is_empty() {
                    continue;
                }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn file(dir: &tempfile::TempDir, name: &str, bytes: &[u8]) -> PathBuf {
        let path = dir.path().join(name);
        std::fs::write(&path, bytes).unwrap();
        path
    }

    /// The reader's and the check's error for a file (both must refuse it the same way).
    fn refused(path: &Path) -> String {
        let read = read_records(path).unwrap_err().to_string();
        let checked = check_records(path).unwrap_err().to_string();
        assert_eq!(read, checked, "the check and the reader disagree on {}", path.display());
        read
    }

    #[test]
    fn csv_headers_name_each_column_once() {
        let dir = tempfile::tempdir().unwrap();
        let dup = file(&dir, "dup.csv", b"email,name,email\na@b.co,Ada,c@d.co\n");
        let e = refused(&dup);
        assert!(e.contains("names `email` twice (columns 1 and 3)"), "{e}");
        let trimmed = file(&dir, "trimmed.csv", b"name, age,age \nAda,36,37\n");
        let e = refused(&trimmed);
        assert!(e.contains("names `age` twice (columns 2 and 3)"), "{e}");
        let empty = file(&dir, "empty.csv", b"");
        assert!(refused(&empty).contains("the file is empty"));
        let ragged = file(&dir, "ragged.csv", b"a,b\n1,2\n3\n");
        assert!(refused(&ragged).contains("bad CSV at record 2"));
        let header_only = file(&dir, "header.csv", b"a,b\n");
        assert_eq!(read_records(&header_only).unwrap().len(), 0);
        assert_eq!(check_records(&header_only).unwrap(), 0);
    }

    #[test]
    fn a_byte_order_mark_is_skipped_and_crlf_lines_are_read() {
        let dir = tempfile::tempdir().unwrap();
        let csv = file(&dir, "bom.csv", b"\xef\xbb\xbfname,\"note, quoted\"\r\nAda,\"two\r\nlines\"\r\n");
        let records = read_records(&csv).unwrap();
        assert_eq!(records.len(), 1);
        assert_eq!(records[0].values["name"], "Ada");
        assert_eq!(records[0].values["note, quoted"], "two\r\nlines");
        let jsonl = file(&dir, "bom.jsonl", b"\xef\xbb\xbf{\"a\": 1}\r\n\r\n{\"b\": \"\xc3\xa9\"}");
        let records = read_records(&jsonl).unwrap();
        assert_eq!(records.len(), 2);
        assert_eq!(records[0].values["a"], 1);
        assert_eq!(records[1].values["b"], "é");
        assert_eq!(check_records(&jsonl).unwrap(), 2);
        // Only at the start of the file: elsewhere it is a character JSON does not allow there.
        let late = file(&dir, "late.jsonl", b"{\"a\": 1}\n\xef\xbb\xbf{\"a\": 2}\n");
        assert!(refused(&late).contains("late.jsonl line 2"));
        let empty = file(&dir, "empty.jsonl", b"");
        assert_eq!(read_records(&empty).unwrap().len(), 0);
    }

    #[test]
    fn invalid_utf8_names_its_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = file(&dir, "latin1.jsonl", b"{\"a\": 1}\n{\"a\": 2}\n{\"name\": \"Jos\xe9\"}\n{\"a\": 4}\n");
        let e = refused(&path);
        assert!(e.contains("latin1.jsonl line 3: not UTF-8 (invalid bytes at column 14)"), "{e}");
        let csv = file(&dir, "latin1.csv", b"name\nJos\xe9\n");
        assert!(refused(&csv).contains("bad CSV at record 1"));
    }

    #[test]
    fn a_record_longer_than_the_limit_is_refused_with_its_place() {
        let dir = tempfile::tempdir().unwrap();
        let cell = "x".repeat(MAX_RECORD_BYTES + 1);
        let jsonl =
            file(&dir, "big.jsonl", format!("{{\"a\": 1}}\n{{\"big\": \"{cell}\"}}\n{{\"a\": 3}}\n").as_bytes());
        let e = refused(&jsonl);
        assert!(e.contains("big.jsonl line 2: longer than 16 MiB"), "{e}");
        let csv = file(&dir, "big.csv", format!("a\n1\n{cell}\n").as_bytes());
        let e = refused(&csv);
        assert!(e.contains("record 2 is longer than 16 MiB"), "{e}");
        // At the limit is accepted: the JSON around the cell takes the rest.
        let fits = "y".repeat(MAX_RECORD_BYTES - 11);
        let ok = file(&dir, "fits.jsonl", format!("{{\"big\": \"{fits}\"}}\n").as_bytes());
        assert_eq!(format!("{{\"big\": \"{fits}\"}}").len(), MAX_RECORD_BYTES);
        assert_eq!(read_records(&ok).unwrap()[0].values["big"].as_str().unwrap().len(), fits.len());
    }

    /// Files written from generated records by a plain encoder, read back whole.
    mod generated {
        use proptest::prelude::*;

        use super::*;

        /// Cells that stress CSV: quotes, commas, both line ends, a lone CR, unicode, empty.
        fn cell() -> impl Strategy<Value = String> {
            prop_oneof![
                any::<String>(),
                proptest::collection::vec(
                    proptest::sample::select(vec!["\"", ",", "\n", "\r\n", "\r", "é", "🦀", " ", "a", ""]),
                    0..8
                )
                .prop_map(|v| v.concat()),
            ]
        }

        /// Distinct column names, already trimmed (the reader trims them) and non-empty.
        fn headers() -> impl Strategy<Value = Vec<String>> {
            proptest::collection::btree_set(any::<String>().prop_map(|s| s.trim().to_owned()), 1..6).prop_map(|set| {
                set.into_iter().filter(|h| !h.is_empty() && !h.starts_with('\u{feff}')).collect::<Vec<_>>()
            })
        }

        fn quoted(cell: &str) -> String {
            format!("\"{}\"", cell.replace('"', "\"\""))
        }

        proptest! {
            #![proptest_config(ProptestConfig { cases: 128, failure_persistence: None, ..ProptestConfig::default() })]

            /// Every cell comes back as written (an empty cell as no value), whatever it holds,
            /// with either line end and with or without a byte-order mark.
            #[test]
            fn csv_cells_come_back_as_written(
                headers in headers(),
                rows in proptest::collection::vec(proptest::collection::vec(cell(), 6), 0..8),
                crlf in any::<bool>(),
                bom in any::<bool>(),
            ) {
                prop_assume!(!headers.is_empty());
                let end = if crlf { "\r\n" } else { "\n" };
                let line = |cells: Vec<String>| cells.join(",") + end;
                let mut text = if bom { "\u{feff}".to_owned() } else { String::new() };
                text += &line(headers.iter().map(|h| quoted(h)).collect());
                for row in &rows {
                    text += &line(row[..headers.len()].iter().map(|c| quoted(c)).collect());
                }
                let dir = tempfile::tempdir().unwrap();
                let path = file(&dir, "gen.csv", text.as_bytes());
                let got = read_records(&path).map_err(|e| TestCaseError::fail(format!("{e:#}")))?;
                prop_assert_eq!(check_records(&path).unwrap(), rows.len() as u64);
                let want: Vec<Map<String, Value>> = rows
                    .iter()
                    .map(|row| {
                        headers.iter().zip(row).filter(|(_, c)| !c.is_empty()).map(|(h, c)| (h.clone(), Value::from(c.as_str()))).collect()
                    })
                    .collect();
                prop_assert_eq!(got.into_iter().map(|r| r.values).collect::<Vec<_>>(), want);
            }

            /// Every JSON line comes back equal: any unicode in keys and values, integers at the
            /// ends of i64 and u64, floats, nulls, nesting; blank lines between records are skipped.
            #[test]
            fn json_lines_come_back_equal(
                records in proptest::collection::vec(jobhost_core::generate::record_values(5), 0..8),
                crlf in any::<bool>(),
                bom in any::<bool>(),
                blank in any::<bool>(),
            ) {
                let end = if crlf { "\r\n" } else { "\n" };
                let mut text = if bom { "\u{feff}".to_owned() } else { String::new() };
                for r in &records {
                    text += &serde_json::to_string(r).unwrap();
                    text += end;
                    if blank {
                        text += end;
                    }
                }
                let dir = tempfile::tempdir().unwrap();
                let path = file(&dir, "gen.jsonl", text.as_bytes());
                let got = read_records(&path).map_err(|e| TestCaseError::fail(format!("{e:#}")))?;
                prop_assert_eq!(check_records(&path).unwrap(), records.len() as u64);
                prop_assert_eq!(got.into_iter().map(|r| r.values).collect::<Vec<_>>(), records);
            }
        }
    }
}
