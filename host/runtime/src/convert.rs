//! Engine types ↔ WIT types.

use std::borrow::Cow;
use std::collections::HashMap;

use serde::Deserialize;
use serde_json::Value;

use super::bindings::jobhost::plugin::types as wit;
use crate::error::Error;
use crate::model::{Event, Job, JobStatus, Message, MessageType, RecordUpdate, json_string, json_text};
use crate::store::{RawRecord, RowSink};
use jobhost_engine::FieldKey;

pub fn error(e: Error) -> wit::Error {
    let kind = match e.kind() {
        crate::error::ErrorKind::NotFound => wit::ErrorKind::NotFound,
        crate::error::ErrorKind::Conflict => wit::ErrorKind::Conflict,
        crate::error::ErrorKind::Invalid => wit::ErrorKind::Invalid,
        crate::error::ErrorKind::Denied => wit::ErrorKind::Denied,
        crate::error::ErrorKind::Limit => wit::ErrorKind::Limit,
        _ => wit::ErrorKind::Internal,
    };
    let job_status = match &e {
        Error::WrongStatus { status, .. } => Some(status_to(*status)),
        _ => None,
    };
    wit::Error { kind, message: e.to_string(), job_status }
}

pub fn invalid(message: impl Into<String>) -> wit::Error {
    wit::Error { kind: wit::ErrorKind::Invalid, message: message.into(), job_status: None }
}

fn status_to(s: JobStatus) -> wit::JobStatus {
    match s {
        JobStatus::Created => wit::JobStatus::Created,
        JobStatus::Scheduled => wit::JobStatus::Scheduled,
        JobStatus::Waiting => wit::JobStatus::Waiting,
        JobStatus::Ready => wit::JobStatus::Ready,
        JobStatus::Executing => wit::JobStatus::Executing,
        JobStatus::Complete => wit::JobStatus::Complete,
        JobStatus::Failed => wit::JobStatus::Failed,
        _ => wit::JobStatus::Canceled,
    }
}

pub fn job(j: Job) -> wit::Job {
    wit::Job {
        kind: j.kind.as_str().to_owned(),
        status: status_to(j.status),
        input: json_text(&j.input),
        outcome: json_text(&j.outcome),
        part_data: json_text(&j.part_data),
        id: j.id,
        operation: j.operation,
        source: j.source,
        info: j.info,
        progress: j.progress,
        parent_id: j.parent_id,
        is_part: j.is_part,
        part_index: j.part_index,
        attempt: j.attempt,
        created_at: j.created_at,
        updated_at: j.updated_at,
    }
}

pub fn event(e: &Event, attempt: u32) -> wit::Event {
    wit::Event {
        id: e.id.clone(),
        topic: e.topic.clone(),
        environment_id: e.environment_id().to_owned(),
        job_id: e.job_id().map(str::to_owned),
        sheet_id: e.context_str("sheetId").map(str::to_owned),
        context: json_string(&e.context),
        payload: json_string(&e.payload),
        created_at: e.created_at,
        attempt,
    }
}

pub fn value_from_wit(v: wit::Value) -> Value {
    match v {
        wit::Value::Null => Value::Null,
        wit::Value::Boolean(b) => Value::Bool(b),
        wit::Value::Integer(i) => Value::from(i),
        wit::Value::Float(f) => serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number),
        wit::Value::Text(s) => Value::String(s),
    }
}

fn message_to_wit(m: Message) -> wit::Message {
    let kind = match m.kind {
        MessageType::Error => wit::MessageKind::Error,
        MessageType::Warn => wit::MessageKind::Warn,
        _ => wit::MessageKind::Info,
    };
    wit::Message { field: m.field, kind, text: m.message }
}

pub fn message_from_wit(m: wit::Message) -> Message {
    let kind = match m.kind {
        wit::MessageKind::Error => MessageType::Error,
        wit::MessageKind::Warn => MessageType::Warn,
        wit::MessageKind::Info => MessageType::Info,
    };
    Message { kind, message: m.text, field: m.field }
}

/// Stored rows straight to a WIT page: field names once, values in field order.
///
/// Each row's JSON is read in one pass straight into typed cells — no `serde_json::Map`, no
/// owned key per cell: the map, its key strings and the `Value` tree were two thirds of the
/// host's time per page.
pub fn page(rows: Vec<RawRecord>) -> Result<wit::RecordPage, Error> {
    let mut columns = Columns::default();
    let mut out = Vec::with_capacity(rows.len());
    for raw in rows {
        let mut values = vec![wit::Value::Null; columns.fields.len()];
        read_row(&raw.values, &mut columns, |i, cell| {
            if i >= values.len() {
                values.resize(i + 1, wit::Value::Null);
            }
            values[i] = cell.into_value();
            Ok(())
        })?;
        let (messages, valid) = messages(raw.messages)?;
        out.push(wit::Row { id: raw.rowid as u64, values, messages, valid });
    }
    // Rows made before a field was first seen are shorter; pad them so every row has one
    // value per field.
    for row in &mut out {
        row.values.resize(columns.fields.len(), wit::Value::Null);
    }
    Ok(wit::RecordPage { fields: columns.fields, rows: out })
}

/// Bytes of one cell of a packed page (see `packed-page` in the WIT): a kind byte and 8
/// bytes of value.
const PACKED_CELL: usize = 9;
type PackedCell = [u8; PACKED_CELL];

/// Stored rows straight to a packed page: every cell 9 bytes of one buffer and every text
/// appended to the page's one `text`, so neither the host nor the guest allocates per cell,
/// and both buffers cross into the guest as one copy each.
pub fn packed_page(rows: Vec<RawRecord>) -> Result<wit::PackedPage, Error> {
    let mut out = Vec::with_capacity(rows.len());
    let cells = pack(rows, |id, stored| {
        let (messages, valid) = messages(stored)?;
        out.push(wit::PackedRow { id, messages, valid });
        Ok(())
    })?;
    Ok(wit::PackedPage { fields: cells.fields, rows: out, cells: cells.cells, text: cells.text })
}

/// Builds a page in flat buffers (`page-buffers` in the WIT) from rows the store hands over
/// one at a time, borrowed from its own buffers ([`RowSink`]), on the thread that reads them:
/// the cells as in [`packed_page`], the ids in one list and every message of the page in one
/// list, so lowering the page calls into the guest a fixed number of times plus at most two
/// per message, not once per record (wasmtime allocates even an empty list in the guest).
pub struct BuffersSink {
    packer: Packer,
    ids: Vec<u64>,
    /// The messages of the rows that have any, by the row's place on the page.
    messages: Vec<(usize, Vec<Message>)>,
}

impl BuffersSink {
    /// A sink for a page of at most `page_size` rows. How many there are is not known until
    /// they have come (a sheet's last page is short), so room is made for them as they come.
    pub fn new(page_size: usize) -> Self {
        // No page is longer than the largest the store reads, whatever a caller asks for.
        let ids = Vec::with_capacity(page_size.min(crate::model::MAX_PAGE_SIZE as usize));
        Self { packer: Packer::new(0), ids, messages: Vec::new() }
    }

    /// The page.
    pub fn finish(mut self) -> Result<wit::PageBuffers, Error> {
        self.messages.sort_by_key(|(at, _)| *at);
        let mut message_ends = Vec::with_capacity(self.ids.len());
        let mut messages = Vec::new();
        let mut own = self.messages.into_iter().peekable();
        for at in 0..self.ids.len() {
            if let Some((_, list)) = own.next_if(|(i, _)| *i == at) {
                messages.extend(list.into_iter().map(message_to_wit));
            }
            let end = u32::try_from(messages.len())
                .map_err(|_| Error::Invalid("the page has over 4 billion messages; ask for a smaller page".into()))?;
            message_ends.push(end);
        }
        let cells = self.packer.finish();
        Ok(wit::PageBuffers {
            fields: cells.fields,
            ids: self.ids,
            cells: cells.cells,
            text: cells.text,
            message_ends,
            messages,
        })
    }
}

impl RowSink for BuffersSink {
    fn row(&mut self, rowid: i64, values: &str, _metadata: Option<&str>) -> Result<(), Error> {
        self.packer.push(values)?;
        self.ids.push(rowid as u64);
        Ok(())
    }

    fn messages(&mut self, at: usize, stored: &str) -> Result<(), Error> {
        // The store hands messages only for rows it handed: anything else is its fault.
        if at >= self.ids.len() {
            let message = format!("messages for row {at}, which is not on the page ({} rows)", self.ids.len());
            return Err(Error::Store(jobhost_core::StoreError::new(message)));
        }
        let list: Vec<Message> = serde_json::from_str(stored)?;
        if !list.is_empty() {
            self.messages.push((at, list));
        }
        Ok(())
    }
}

/// The cells of a page (see `packed-page` in the WIT).
struct PackedCells {
    fields: Vec<String>,
    cells: Vec<u8>,
    text: String,
}

/// Packs stored rows' values, a row at a time, into one cell buffer and one text.
struct Packer {
    columns: Columns,
    text: String,
    /// Each row's cells, `widths[i]` long: the number of fields known when row `i` was read.
    cells: Vec<PackedCell>,
    widths: Vec<usize>,
    /// Rows known to come (0 when not known): room is made for them after the first.
    rows: usize,
}

impl Packer {
    fn new(rows: usize) -> Self {
        Self {
            columns: Columns::default(),
            text: String::new(),
            cells: Vec::new(),
            widths: Vec::with_capacity(rows),
            rows,
        }
    }

    fn push(&mut self, values: &str) -> Result<(), Error> {
        self.push_row(values, true)
    }

    /// Packs one row, trying the plain reader first when `plain` (false only in tests, to
    /// compare the two readers).
    fn push_row(&mut self, values: &str, plain: bool) -> Result<(), Error> {
        if self.widths.len() == 1 {
            // Rows of a sheet are mostly as wide and as long as the first; the text is never
            // longer than the rows' JSON.
            let more = self.rows.saturating_sub(1);
            self.cells.reserve(self.cells.len() * more);
            self.text.reserve(self.text.len().max(values.len()) * more);
        }
        let (start, text_start) = (self.cells.len(), self.text.len());
        self.cells.resize(start + self.columns.fields.len(), [0; PACKED_CELL]);
        let read =
            plain && read_plain_row(values, &mut self.columns, cell_writer(&mut self.cells, &mut self.text, start))?;
        if !read {
            // Not in the plain shape: read the row whole. It has the keys the plain reader met
            // (in `columns` already), so every cell that reader wrote is written again; only
            // their texts are taken back.
            self.text.truncate(text_start);
            read_row(values, &mut self.columns, cell_writer(&mut self.cells, &mut self.text, start))?;
        }
        self.widths.push(self.cells.len() - start);
        Ok(())
    }

    fn finish(self) -> PackedCells {
        let Self { columns, text, mut cells, widths, .. } = self;
        // Rows read before a field was first seen are narrower: spread them to the page's width.
        let n = columns.fields.len();
        if widths.iter().any(|&w| w != n) {
            let mut wide = Vec::with_capacity(n * widths.len());
            let mut at = 0;
            for w in widths {
                wide.extend_from_slice(&cells[at..at + w]);
                wide.resize(wide.len() + n - w, [0; PACKED_CELL]);
                at += w;
            }
            cells = wide;
        }
        PackedCells { fields: columns.fields, cells: cells.into_flattened(), text }
    }
}

/// Puts a row's cell `i` at `cells[start + i]`, its text appended to `text`.
fn cell_writer<'a>(
    cells: &'a mut Vec<PackedCell>,
    text: &'a mut String,
    start: usize,
) -> impl FnMut(usize, Cell<'_>) -> Result<(), Error> + 'a {
    move |i, cell| {
        if start + i >= cells.len() {
            cells.resize(start + i + 1, [0; PACKED_CELL]);
        }
        cells[start + i] = cell.into_packed(text)?;
        Ok(())
    }
}

/// Packs stored rows' values into one cell buffer and one text; `row(id, messages)` is
/// called with each row's id and stored messages, in order.
fn pack(
    rows: Vec<RawRecord>,
    mut row: impl FnMut(u64, Option<String>) -> Result<(), Error>,
) -> Result<PackedCells, Error> {
    let mut packer = Packer::new(rows.len());
    for raw in rows {
        packer.push(&raw.values)?;
        row(raw.rowid as u64, raw.messages)?;
    }
    Ok(packer.finish())
}

/// A stored row's messages as WIT messages, and whether none is an error.
fn messages(stored: Option<String>) -> Result<(Vec<wit::Message>, bool), Error> {
    let messages = stored_messages(stored)?;
    let valid = !messages.iter().any(|m| m.kind == MessageType::Error);
    Ok((messages.into_iter().map(message_to_wit).collect(), valid))
}

/// A stored row's messages (none when the column is empty).
fn stored_messages(stored: Option<String>) -> Result<Vec<Message>, Error> {
    Ok(stored.map(|m| serde_json::from_str(&m)).transpose()?.unwrap_or_default())
}

/// Reads one stored row (a JSON object) in one pass, calling `put(column, cell)` for each
/// key and growing `columns` with keys not seen before.
fn read_row<'de>(
    json: &'de str,
    columns: &mut Columns,
    mut put: impl FnMut(usize, Cell<'de>) -> Result<(), Error>,
) -> Result<(), Error> {
    let mut de = serde_json::Deserializer::from_str(json);
    let mut failed = None;
    let seed = RowSeed { columns, put: &mut put, failed: &mut failed };
    let read = serde::de::DeserializeSeed::deserialize(seed, &mut de);
    if let Some(e) = failed {
        return Err(e);
    }
    read?;
    de.end()?;
    Ok(())
}

/// Reads a stored row in the shape the store writes nearly every row in — an object of
/// strings without escapes, `true`, `false`, `null` and integers of up to 18 digits, with no
/// whitespace — calling `put` like [`read_row`]. Returns `Ok(false)` at the first byte outside
/// that shape (floats, escapes, nested values, anything malformed), after which the caller
/// takes back the texts `put` kept and reads the row with [`read_row`]. The same cells: the
/// general reader's visitors cost more than the bytes of a small row (packing the seeds'
/// rows takes ~0.7× the time this way).
fn read_plain_row<'de>(
    json: &'de str,
    columns: &mut Columns,
    mut put: impl FnMut(usize, Cell<'de>) -> Result<(), Error>,
) -> Result<bool, Error> {
    let b = json.as_bytes();
    let mut at = 1;
    if b.first() != Some(&b'{') {
        return Ok(false);
    }
    if b.get(1) == Some(&b'}') {
        return Ok(b.len() == 2);
    }
    let mut next = 0;
    loop {
        let Some((key, end)) = plain_string(json, at) else { return Ok(false) };
        if b.get(end) != Some(&b':') {
            return Ok(false);
        }
        at = end + 1;
        let (cell, end) = match b.get(at) {
            Some(b'"') => match plain_string(json, at) {
                Some((text, end)) => (Cell::Text(Cow::Borrowed(text)), end),
                None => return Ok(false),
            },
            Some(b't') if b[at..].starts_with(b"true") => (Cell::Boolean(true), at + 4),
            Some(b'f') if b[at..].starts_with(b"false") => (Cell::Boolean(false), at + 5),
            Some(b'n') if b[at..].starts_with(b"null") => (Cell::Null, at + 4),
            Some(b'-' | b'0'..=b'9') => match plain_integer(b, at) {
                Some((i, end)) => (Cell::Integer(i), end),
                None => return Ok(false),
            },
            _ => return Ok(false),
        };
        let i = columns.column(key, next);
        next = i + 1;
        put(i, cell)?;
        match b.get(end) {
            Some(b',') => at = end + 1,
            Some(b'}') if end + 1 == b.len() => return Ok(true),
            _ => return Ok(false),
        }
    }
}

/// The string starting with the quote at `at`, and the index after its closing quote, when it
/// holds no escape and no control character (which JSON does not allow raw).
fn plain_string(json: &str, at: usize) -> Option<(&str, usize)> {
    let b = json.as_bytes();
    if b.get(at) != Some(&b'"') {
        return None;
    }
    let body = &b[at + 1..];
    let len = body.iter().position(|&c| c == b'"' || c == b'\\' || c < 0x20)?;
    // A quote is ASCII, so both ends are on character boundaries.
    (body[len] == b'"').then(|| (&json[at + 1..at + 1 + len], at + len + 2))
}

/// An integer of 1 to 18 digits (so it fits an `i64`) starting at `at`, and the index after
/// it, when a `,` or `}` follows: a fraction, an exponent, a leading zero or `-0` (which JSON
/// readers give as the float -0.0) are left to the general reader.
fn plain_integer(b: &[u8], at: usize) -> Option<(i64, usize)> {
    let negative = b[at] == b'-';
    let digits = at + usize::from(negative);
    let len = b[digits..].iter().take(19).take_while(|c| c.is_ascii_digit()).count();
    if len == 0 || len > 18 || (b[digits] == b'0' && (len > 1 || negative)) {
        return None;
    }
    if !matches!(b.get(digits + len), Some(b',' | b'}')) {
        return None;
    }
    let n = b[digits..digits + len].iter().fold(0i64, |n, c| n * 10 + i64::from(c - b'0'));
    Some((if negative { -n } else { n }, digits + len))
}

/// Pages with at most this many fields find a key's column by scanning the names.
const SCANNED_FIELDS: usize = 16;

/// The page's field names in first-seen order.
#[derive(Default)]
struct Columns {
    fields: Vec<String>,
    index: HashMap<String, usize>,
}

impl Columns {
    /// The column of `key`. Rows of a sheet mostly list the same keys in the same order, so
    /// the column after the previous key is tried first; then, for a page of a few fields, a
    /// scan (a row that skips a key — an empty cell — costs a few short compares, not a
    /// SipHash of the key), and the hash map for wide pages.
    fn column(&mut self, key: &str, guess: usize) -> usize {
        if self.fields.get(guess).is_some_and(|f| f == key) {
            return guess;
        }
        let found = if self.fields.len() <= SCANNED_FIELDS {
            self.fields.iter().position(|f| f == key)
        } else {
            self.index.get(key).copied()
        };
        if let Some(i) = found {
            return i;
        }
        self.index.insert(key.to_owned(), self.fields.len());
        self.fields.push(key.to_owned());
        self.fields.len() - 1
    }
}

/// Reads one stored row, handing each cell to `put`. An error of `put` (not a JSON error)
/// is kept in `failed` so that it reaches the caller as itself.
struct RowSeed<'a, F> {
    columns: &'a mut Columns,
    put: &'a mut F,
    failed: &'a mut Option<Error>,
}

impl<'de, F: FnMut(usize, Cell<'de>) -> Result<(), Error>> serde::de::DeserializeSeed<'de> for RowSeed<'_, F> {
    type Value = ();

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de, F: FnMut(usize, Cell<'de>) -> Result<(), Error>> serde::de::Visitor<'de> for RowSeed<'_, F> {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a stored record: a JSON object of cell values")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let mut next = 0;
        while let Some(key) = map.next_key::<FieldKey<'de>>()? {
            let i = self.columns.column(&key.0, next);
            next = i + 1;
            if let Err(e) = (self.put)(i, map.next_value::<Cell<'de>>()?) {
                let message = e.to_string();
                *self.failed = Some(e);
                return Err(serde::de::Error::custom(message));
            }
        }
        Ok(())
    }
}

/// One stored cell, its text borrowed from the row unless it holds escapes. Lists and
/// objects are rare in cells; they cross as their JSON text.
enum Cell<'de> {
    Null,
    Boolean(bool),
    Integer(i64),
    Float(f64),
    Text(Cow<'de, str>),
}

impl Cell<'_> {
    fn into_value(self) -> wit::Value {
        match self {
            Cell::Null => wit::Value::Null,
            Cell::Boolean(b) => wit::Value::Boolean(b),
            Cell::Integer(i) => wit::Value::Integer(i),
            Cell::Float(f) => wit::Value::Float(f),
            Cell::Text(s) => wit::Value::Text(s.into_owned()),
        }
    }

    /// The packed cell, its text appended to `text`.
    fn into_packed(self, text: &mut String) -> Result<PackedCell, Error> {
        let (kind, value) = match self {
            Cell::Null => (0, [0; 8]),
            Cell::Boolean(b) => (1, u64::from(b).to_le_bytes()),
            Cell::Integer(i) => (2, i.to_le_bytes()),
            Cell::Float(f) => (3, f.to_bits().to_le_bytes()),
            Cell::Text(s) => {
                // Spans are u32 offsets, so a page's text stops at 4 GiB (far past what a
                // guest's memory limit lets it receive).
                let (start, len) = match (u32::try_from(text.len()), u32::try_from(s.len())) {
                    (Ok(start), Ok(len)) if start.checked_add(len).is_some() => (start, len),
                    _ => return Err(Error::Invalid("the page's text passes 4 GiB; ask for a smaller page".into())),
                };
                text.push_str(&s);
                (4, (u64::from(start) | u64::from(len) << 32).to_le_bytes())
            }
        };
        let mut cell = [kind; PACKED_CELL];
        cell[1..].copy_from_slice(&value);
        Ok(cell)
    }
}

impl<'de> serde::Deserialize<'de> for Cell<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Cell<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a cell value")
            }
            fn visit_unit<E>(self) -> Result<Cell<'de>, E> {
                Ok(Cell::Null)
            }
            fn visit_none<E>(self) -> Result<Cell<'de>, E> {
                Ok(Cell::Null)
            }
            fn visit_bool<E>(self, b: bool) -> Result<Cell<'de>, E> {
                Ok(Cell::Boolean(b))
            }
            fn visit_i64<E>(self, i: i64) -> Result<Cell<'de>, E> {
                Ok(Cell::Integer(i))
            }
            fn visit_u64<E>(self, u: u64) -> Result<Cell<'de>, E> {
                Ok(i64::try_from(u).map_or(Cell::Float(u as f64), Cell::Integer))
            }
            fn visit_f64<E>(self, f: f64) -> Result<Cell<'de>, E> {
                Ok(Cell::Float(f))
            }
            fn visit_borrowed_str<E>(self, s: &'de str) -> Result<Cell<'de>, E> {
                Ok(Cell::Text(s.into()))
            }
            fn visit_str<E>(self, s: &str) -> Result<Cell<'de>, E> {
                Ok(Cell::Text(s.to_owned().into()))
            }
            fn visit_string<E>(self, s: String) -> Result<Cell<'de>, E> {
                Ok(Cell::Text(s.into()))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, seq: A) -> Result<Cell<'de>, A::Error> {
                let v = Value::deserialize(serde::de::value::SeqAccessDeserializer::new(seq))?;
                Ok(Cell::Text(v.to_string().into()))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<Cell<'de>, A::Error> {
                let v = Value::deserialize(serde::de::value::MapAccessDeserializer::new(map))?;
                Ok(Cell::Text(v.to_string().into()))
            }
        }
        d.deserialize_any(V)
    }
}

pub fn update(u: wit::RecordUpdate) -> RecordUpdate {
    RecordUpdate {
        id: format!("rec_{}", u.id),
        values: u.values.into_iter().map(|fv| (fv.field, value_from_wit(fv.value))).collect(),
        messages: u.messages.map(|ms| ms.into_iter().map(message_from_wit).collect()),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::{Map, Value, json};

    use super::*;

    fn value_to_wit(v: Value) -> wit::Value {
        match v {
            Value::Null => wit::Value::Null,
            Value::Bool(b) => wit::Value::Boolean(b),
            Value::Number(n) => match n.as_i64() {
                Some(i) => wit::Value::Integer(i),
                None => wit::Value::Float(n.as_f64().unwrap_or(f64::NAN)),
            },
            Value::String(s) => wit::Value::Text(s),
            // Lists and objects are rare in cells; they cross as their JSON text.
            other => wit::Value::Text(other.to_string()),
        }
    }

    /// The page as the host built it before the one-pass reader: each row through a
    /// `serde_json::Map`. The reader must give exactly this.
    fn page_via_map(rows: Vec<RawRecord>) -> wit::RecordPage {
        let mut fields: Vec<String> = Vec::new();
        let mut out = Vec::new();
        for raw in rows {
            let values: Map<String, Value> = serde_json::from_str(&raw.values).unwrap();
            let mut row = vec![wit::Value::Null; fields.len()];
            for (k, v) in values {
                let i = fields.iter().position(|f| *f == k).unwrap_or_else(|| {
                    fields.push(k);
                    row.push(wit::Value::Null);
                    fields.len() - 1
                });
                row[i] = value_to_wit(v);
            }
            let messages: Vec<Message> = raw.messages.map(|m| serde_json::from_str(&m).unwrap()).unwrap_or_default();
            let valid = !messages.iter().any(|m| m.kind == MessageType::Error);
            out.push(wit::Row {
                id: raw.rowid as u64,
                values: row,
                messages: messages.into_iter().map(message_to_wit).collect(),
                valid,
            });
        }
        for row in &mut out {
            row.values.resize(fields.len(), wit::Value::Null);
        }
        wit::RecordPage { fields, rows: out }
    }

    /// The page a [`BuffersSink`] builds from `rows`, handed over as the store's default
    /// `visit_record_rows` does.
    fn page_buffers(rows: Vec<RawRecord>) -> Result<wit::PageBuffers, Error> {
        let mut sink = BuffersSink::new(rows.len());
        for raw in &rows {
            sink.row(raw.rowid, &raw.values, None)?;
        }
        for (at, raw) in rows.iter().enumerate() {
            if let Some(m) = &raw.messages {
                sink.messages(at, m)?;
            }
        }
        sink.finish()
    }

    fn raw(rowid: i64, values: &Value) -> RawRecord {
        RawRecord { rowid, values: values.to_string(), messages: None, metadata: None }
    }

    /// xorshift: the same cases on every run, no dependency.
    struct Gen(u64);

    impl Gen {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
        fn text(&mut self) -> String {
            const PIECES: &[&str] =
                &["a", "Z", " ", "\"", "\\", "\n", "\t", "é", "漢", "🦀", "\u{0}", "\u{1f}", "/", ","];
            (0..self.below(12)).map(|_| PIECES[self.below(PIECES.len() as u64) as usize]).collect()
        }
        fn value(&mut self, depth: u32) -> Value {
            match self.below(if depth > 1 { 7 } else { 9 }) {
                0 => Value::Null,
                1 => json!(self.below(2) == 1),
                2 => json!(self.next() as i64),
                3 => json!(self.next()),
                4 => json!((self.next() as f64) / 7.0e3),
                5 | 6 => json!(self.text()),
                7 => Value::Array((0..self.below(3)).map(|_| self.value(depth + 1)).collect()),
                _ => Value::Object((0..self.below(3)).map(|_| (self.text(), self.value(depth + 1))).collect()),
            }
        }
    }

    #[test]
    fn the_one_pass_reader_gives_the_page_the_map_gave_for_generated_rows() {
        let mut g = Gen(0x9e37_79b9_7f4a_7c15);
        for case in 0..300 {
            // Keys drawn from a small set (so rows share, skip and reorder columns) and from
            // generated text (escapes, unicode, new columns late in the page).
            let rows: Vec<RawRecord> = (0..g.below(20))
                .map(|i| {
                    let mut values = Map::new();
                    for _ in 0..g.below(8) {
                        let key = match g.below(3) {
                            0 => g.text(),
                            _ => format!("f{}", g.below(6)),
                        };
                        values.insert(key, g.value(0));
                    }
                    let mut row = raw(i as i64 + 1, &Value::Object(values));
                    if g.below(4) == 0 {
                        let kinds = ["error", "warn", "info"];
                        let list: Vec<Value> = (0..g.below(3))
                            .map(|_| json!({"type": kinds[g.below(3) as usize], "message": g.text(), "field": "f1"}))
                            .collect();
                        row.messages = Some(Value::Array(list).to_string());
                    }
                    row
                })
                .collect();
            let want = format!("{:?}", page_via_map(rows.clone()));
            assert_eq!(format!("{:?}", page(rows.clone()).unwrap()), want, "case {case}");
            assert_eq!(format!("{:?}", unpack(packed_page(rows.clone()).unwrap())), want, "case {case}, packed");
            assert_eq!(
                format!("{:?}", unpack_buffers(page_buffers(rows.clone()).unwrap())),
                want,
                "case {case}, buffers"
            );
            let mut order: Vec<usize> = (0..rows.len()).collect();
            order.reverse();
            assert_eq!(
                format!("{:?}", unpack_buffers(sink_page(&rows, &order).unwrap())),
                want,
                "case {case}, reversed"
            );
        }
    }

    /// A packed page spelled out as rows of values, every cell decoded as the WIT says and
    /// every span checked against the text.
    fn unpack(p: wit::PackedPage) -> wit::RecordPage {
        let rows = p.rows.into_iter().map(|r| (r.id, r.messages, r.valid)).collect();
        spell_out(p.fields, rows, &p.cells, &p.text)
    }

    /// The same for a page in flat buffers, each record's messages sliced as the WIT says.
    fn unpack_buffers(p: wit::PageBuffers) -> wit::RecordPage {
        assert_eq!(p.message_ends.len(), p.ids.len(), "one end per record");
        assert_eq!(p.message_ends.last().map_or(0, |&e| e as usize), p.messages.len(), "every message is a record's");
        let mut messages = p.messages.into_iter();
        let mut start = 0;
        let rows = p
            .ids
            .iter()
            .zip(&p.message_ends)
            .map(|(&id, &end)| {
                let own: Vec<_> = messages.by_ref().take((end - start) as usize).collect();
                start = end;
                let valid = !own.iter().any(|m| matches!(m.kind, wit::MessageKind::Error));
                (id, own, valid)
            })
            .collect();
        spell_out(p.fields, rows, &p.cells, &p.text)
    }

    fn spell_out(
        fields: Vec<String>,
        rows: Vec<(u64, Vec<wit::Message>, bool)>,
        cells: &[u8],
        text: &str,
    ) -> wit::RecordPage {
        let width = fields.len();
        assert_eq!(cells.len(), rows.len() * width * 9, "9 bytes per row and field");
        let cell = |c: &[u8]| {
            let word = |at: usize| u32::from_le_bytes(c[at..at + 4].try_into().unwrap());
            let value = u64::from(word(1)) | u64::from(word(5)) << 32;
            match c[0] {
                0 => wit::Value::Null,
                1 => wit::Value::Boolean(value == 1),
                2 => wit::Value::Integer(value as i64),
                3 => wit::Value::Float(f64::from_bits(value)),
                4 => wit::Value::Text(text.get(word(1) as usize..(word(1) + word(5)) as usize).unwrap().to_owned()),
                kind => panic!("cell kind {kind}"),
            }
        };
        let rows = rows
            .into_iter()
            .enumerate()
            .map(|(i, (id, messages, valid))| wit::Row {
                id,
                values: cells[i * width * 9..(i + 1) * width * 9].chunks(9).map(cell).collect(),
                messages,
                valid,
            })
            .collect();
        wit::RecordPage { fields, rows }
    }

    #[test]
    fn a_packed_page_keeps_each_rows_messages_and_validity() {
        let mut rows = vec![raw(1, &json!({"a": "x"})), raw(2, &json!({"b": 2})), raw(3, &json!({}))];
        rows[0].messages = Some(json!([{"type": "warn", "message": "check", "field": "a"}]).to_string());
        rows[1].messages = Some(json!([{"type": "error", "message": "bad", "field": "b"}]).to_string());
        let p = packed_page(rows).unwrap();
        assert_eq!(p.fields, ["a", "b"]);
        assert_eq!(p.cells.len(), 6 * 9, "the first row, read before `b` was seen, is widened");
        assert_eq!(p.cells[9..18], [0; 9], "with a null");
        assert_eq!(p.cells[..9], [4, 0, 0, 0, 0, 1, 0, 0, 0], "text at 0, 1 byte long");
        assert_eq!(p.cells[27..36], [2, 2, 0, 0, 0, 0, 0, 0, 0], "the integer 2");
        assert_eq!(p.rows.iter().map(|r| r.valid).collect::<Vec<_>>(), [true, false, true]);
        assert_eq!(p.rows[0].messages[0].text, "check");
        assert!(matches!(p.rows[1].messages[0].kind, wit::MessageKind::Error));
        assert_eq!(p.text, "x");
    }

    #[test]
    fn a_page_in_buffers_gives_each_record_its_own_messages() {
        let mut rows: Vec<RawRecord> = (1..=5).map(|i| raw(i, &json!({"a": i}))).collect();
        rows[0].messages = Some(json!([{"type": "warn", "message": "w1", "field": "a"}]).to_string());
        rows[2].messages = Some(json!([]).to_string());
        rows[3].messages = Some(
            json!([{"type": "info", "message": "i4"}, {"type": "error", "message": "e4", "field": "a"}]).to_string(),
        );
        let p = page_buffers(rows.clone()).unwrap();
        assert_eq!(p.ids, [1, 2, 3, 4, 5]);
        assert_eq!(p.message_ends, [1, 1, 1, 3, 3]);
        assert_eq!(p.messages.iter().map(|m| m.text.as_str()).collect::<Vec<_>>(), ["w1", "i4", "e4"]);
        assert_eq!(p.messages[1].field, None);
        // The same records, messages and validity as the other two shapes.
        let want = format!("{:?}", page(rows.clone()).unwrap());
        assert_eq!(format!("{:?}", unpack_buffers(p)), want);
        assert_eq!(format!("{:?}", unpack(packed_page(rows).unwrap())), want);
    }

    /// Rows fed to a sink in page order, then their messages in the order `order` gives.
    fn sink_page(rows: &[RawRecord], order: &[usize]) -> Result<wit::PageBuffers, Error> {
        let mut sink = BuffersSink::new(crate::model::MAX_PAGE_SIZE as usize);
        for raw in rows {
            sink.row(raw.rowid, &raw.values, None)?;
        }
        for &i in order {
            if let Some(m) = &rows[i].messages {
                sink.messages(i, m)?;
            }
        }
        sink.finish()
    }

    #[test]
    fn a_sink_gives_each_record_its_messages_whatever_order_they_come_in() {
        let message = |text: &str| json!([{"type": "error", "message": text, "field": "a"}]).to_string();
        // Ids ascending (a sheet's usual order) and not.
        for ids in [[1, 2, 5, 9], [9, 2, 5, 1]] {
            let mut rows: Vec<RawRecord> = ids.iter().map(|&i| raw(i, &json!({"a": i}))).collect();
            rows[0].messages = Some(message("first"));
            rows[2].messages = Some(message("third"));
            rows[3].messages = Some(message("last"));
            let want = format!("{:?}", page(rows.clone()).unwrap());
            for order in [[0, 1, 2, 3], [3, 2, 1, 0], [2, 0, 3, 1]] {
                let p = sink_page(&rows, &order).unwrap();
                assert_eq!(p.message_ends, [1, 1, 2, 3], "{ids:?}, {order:?}");
                assert_eq!(format!("{:?}", unpack_buffers(p)), want, "{ids:?}, {order:?}");
            }
        }
    }

    #[test]
    fn a_sink_refuses_messages_of_a_record_not_on_its_page_and_stored_messages_that_are_not_a_list() {
        let rows: Vec<RawRecord> = (1..=3).map(|i| raw(i, &json!({"a": i}))).collect();
        for ascending in [true, false] {
            let mut sink = BuffersSink::new(3);
            for raw in &rows {
                let id = if ascending { raw.rowid } else { 4 - raw.rowid };
                sink.row(id, &raw.values, None).unwrap();
            }
            let err = sink.messages(7, "[]").unwrap_err();
            assert!(err.to_string().contains("row 7, which is not on the page"), "{err}");
            assert_eq!(err.kind(), crate::error::ErrorKind::Internal, "the store's fault, not the caller's");
            assert!(sink.messages(2, "{\"type\": \"error\"}").is_err());
        }
    }

    /// A sheet's last page is short: a sink made for the largest page holds room for the rows
    /// that came, not for the page size (a page of 10,000 wide rows would be megabytes).
    #[test]
    fn a_short_page_in_a_sink_holds_room_for_its_rows_only() {
        let wide: Map<String, Value> = (0..100).map(|i| (format!("field{i}"), json!("x".repeat(20)))).collect();
        let rows: Vec<RawRecord> = (1..=3).map(|i| raw(i, &Value::Object(wide.clone()))).collect();
        let p = sink_page(&rows, &[]).unwrap();
        assert_eq!((p.ids.len(), p.fields.len(), p.text.len()), (3, 100, 3 * 100 * 20));
        assert!(BuffersSink::new(usize::MAX).finish().unwrap().ids.is_empty(), "a page size past any page");
        assert!(p.cells.capacity() <= 2 * p.cells.len(), "cells: {} bytes of room", p.cells.capacity());
        assert!(p.text.capacity() <= 2 * p.text.len(), "text: {} bytes of room", p.text.capacity());
    }

    #[test]
    fn extreme_numbers_and_escaped_keys_keep_their_values() {
        let rows = vec![raw(
            7,
            &json!({ "big": u64::MAX, "min": i64::MIN, "float": 1.5e300, "tab\tkey": "x", "nested": {"a": [1, null]} }),
        )];
        let p = page(rows).unwrap();
        let cell = |name: &str| p.rows[0].values[p.fields.iter().position(|f| f == name).unwrap()].clone();
        assert!(matches!(cell("big"), wit::Value::Float(f) if f == u64::MAX as f64));
        assert!(matches!(cell("min"), wit::Value::Integer(i64::MIN)));
        assert!(matches!(cell("float"), wit::Value::Float(f) if f == 1.5e300));
        assert!(matches!(cell("tab\tkey"), wit::Value::Text(t) if t == "x"));
        assert!(matches!(cell("nested"), wit::Value::Text(t) if t == r#"{"a":[1,null]}"#));
    }

    #[test]
    fn a_guest_gets_the_events_context_and_payload_as_compact_json_that_reads_back_the_same() {
        let context = json!({ "environmentId": "env_1", "jobId": "job_2", "sheetId": "sh_3", "depth": 2 });
        let payload = json!({
            "text": "quote \" slash \\ line\n\u{1} é 😀", "big": u64::MAX, "neg": i64::MIN, "ratio": 0.1,
            "nested": { "list": [null, true, false, [], {}] }
        });
        let e = Event {
            id: "evt_1".into(),
            seq: 9,
            topic: "job:ready".into(),
            context: context.clone(),
            payload: payload.clone(),
            created_at: 1_700_000_000_000,
        };
        let w = event(&e, 3);
        assert_eq!((w.id.as_str(), w.topic.as_str(), w.attempt), ("evt_1", "job:ready", 3));
        assert_eq!(
            (w.environment_id.as_str(), w.job_id.as_deref(), w.sheet_id.as_deref()),
            ("env_1", Some("job_2"), Some("sh_3"))
        );
        assert_eq!(serde_json::from_str::<Value>(&w.context).unwrap(), context);
        assert_eq!(serde_json::from_str::<Value>(&w.payload).unwrap(), payload);
        // Compact: what the stored text and the API's event stream carry, byte for byte.
        assert_eq!(w.context, serde_json::to_string(&context).unwrap());
        assert_eq!(w.payload, serde_json::to_string(&payload).unwrap());
        assert!(!w.payload.contains(": ") && !w.payload.contains('\n'), "{}", w.payload);
    }

    /// A page's fields, cells and text, each row read by the plain reader when `plain` allows.
    fn packed(rows: &[&str], plain: bool) -> Result<(Vec<String>, Vec<u8>, String), Error> {
        let mut packer = Packer::new(rows.len());
        for row in rows {
            packer.push_row(row, plain)?;
        }
        let p = packer.finish();
        Ok((p.fields, p.cells, p.text))
    }

    #[test]
    fn the_plain_reader_takes_the_stores_own_shape_and_a_page_packs_the_same_either_way() {
        let plain = [
            r#"{}"#,
            r#"{"a":"x","b":"","c":true,"d":false,"e":null}"#,
            r#"{"n":0,"m":-7,"big":999999999999999999,"small":-999999999999999999}"#,
            // A repeated key: the last value wins, as with the general reader.
            r#"{"name":"Adaé漢🦀","a":1,"a":2}"#,
            r#"{"late":"a column first seen here","a":"x"}"#,
        ];
        // Valid JSON the plain reader leaves to the general one, most after reading cells
        // (whose text it must take back).
        let general = [
            r#"{"a":"x","b":"esc\"aped"}"#,
            r#"{"a":"x","k\ney":"y"}"#,
            r#"{"a":"x","b":1.5}"#,
            r#"{"a":"x","b":1e3}"#,
            r#"{"a":"x","b":-0}"#,
            r#"{"a":"x","b":1000000000000000000}"#,
            r#"{"a":"x","b":-9223372036854775808}"#,
            r#"{"a":"x","b":[1,"y"]}"#,
            r#"{"a":"x","b":{"c":"y"}}"#,
            r#"{"a":"x", "b":"y"}"#,
            r#" {"a":"x"}"#,
            r#"{"a":"x"} "#,
        ];
        let ignore = |_: usize, _: Cell<'_>| Ok(());
        for row in plain {
            assert!(read_plain_row(row, &mut Columns::default(), ignore).unwrap(), "{row}");
        }
        for row in general {
            assert!(!read_plain_row(row, &mut Columns::default(), ignore).unwrap(), "{row}");
        }
        // Interleaved, so rows read the general way sit between plain ones in one text.
        let rows: Vec<&str> = plain.iter().cycle().zip(general).flat_map(|(p, g)| [*p, g]).collect();
        let (either, general_only) = (packed(&rows, true).unwrap(), packed(&rows, false).unwrap());
        assert_eq!(either, general_only);
        // Not JSON at all: refused by both, whatever the plain reader read first.
        for bad in [r#"{"a":"x","b":truex}"#, r#"{"a":"x",}"#, r#"{"a":01}"#, "{\"a\":\"raw\ttab\"}", r#"{"a":"x""#] {
            assert!(packed(&[bad], true).is_err(), "{bad}");
            assert!(packed(&[bad], false).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_stored_row_that_is_not_an_object_is_an_error_not_a_page() {
        for bad in ["[1,2]", "{\"a\":1} trailing", "{\"a\":", "3"] {
            let rows = vec![RawRecord { rowid: 1, values: bad.into(), messages: None, metadata: None }];
            assert!(page(rows.clone()).is_err(), "{bad}");
            assert!(packed_page(rows.clone()).is_err(), "{bad}, packed");
            assert!(page_buffers(rows).is_err(), "{bad}, buffers");
        }
    }
}
