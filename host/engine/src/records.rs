//! Record encoding: JSON values and messages in, [`Record`]s with derived validity out.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::io::Write as _;

use serde_json::value::RawValue;
use serde_json::{Map, Value};

use crate::error::{Error, Result};
use crate::model::{Cell, Message, MessageType, NewRecord, Record, RecordUpdate};
use crate::store::{EncodedRecord, RawRecord, Tx};

fn check_messages(messages: &[Message]) -> Result<()> {
    for m in messages {
        if m.field.as_deref() == Some("") {
            return Err(Error::invalid("a message's field, when given, must not be empty"));
        }
    }
    Ok(())
}

fn check_fields(values: &Map<String, Value>) -> Result<()> {
    if values.keys().any(String::is_empty) {
        return Err(Error::invalid("a record field key must not be empty"));
    }
    Ok(())
}

pub(super) fn encode(values: &Map<String, Value>, messages: &[Message], metadata: &Value) -> EncodedRecord {
    EncodedRecord {
        values: serde_json::to_string(values).unwrap_or_else(|_| "{}".into()),
        messages: (!messages.is_empty()).then(|| serde_json::to_string(messages).unwrap_or_else(|_| "[]".into())),
        metadata: (!metadata.is_null()).then(|| metadata.to_string()),
        has_error: messages.iter().any(|m| m.kind == MessageType::Error),
    }
}

/// Checks every record before anything is written, so one bad record refuses the whole call.
pub(super) fn validate_new(records: &[NewRecord]) -> Result<()> {
    for (i, r) in records.iter().enumerate() {
        check_fields(&r.values)
            .and_then(|_| check_messages(&r.messages))
            .map_err(|e| Error::invalid(format!("record {i}: {e}")))?;
    }
    Ok(())
}

/// Below this many records, encoding inline beats starting a thread.
const PIPELINE_MIN: usize = 4096;
/// Records per encoded chunk handed to the writer.
const CHUNK: usize = 2048;

/// Encodes `records` and appends them to the sheet. Large inserts encode on a second thread
/// while this one writes, so JSON encoding and SQLite inserts overlap on two cores.
pub(super) fn insert(tx: &mut dyn Tx, sheet_id: &str, records: &[NewRecord], now: i64) -> Result<u64> {
    let encode = |r: &NewRecord| encode(&r.values, &r.messages, &r.metadata);
    if records.len() < PIPELINE_MIN {
        return tx.insert_records(sheet_id, &mut records.iter().map(encode), now);
    }
    std::thread::scope(|scope| {
        let (send, recv) = std::sync::mpsc::sync_channel::<Vec<EncodedRecord>>(8);
        scope.spawn(move || {
            for chunk in records.chunks(CHUNK) {
                // A closed channel means the insert failed; stop encoding.
                if send.send(chunk.iter().map(encode).collect()).is_err() {
                    return;
                }
            }
        });
        tx.insert_records(sheet_id, &mut recv.into_iter().flatten(), now)
    })
}

/// `rec_<rowid>` → rowid.
pub(super) fn parse_record_id(id: &str) -> Result<i64> {
    id.strip_prefix("rec_")
        .and_then(|n| n.parse::<i64>().ok())
        .filter(|n| *n > 0)
        .ok_or_else(|| Error::invalid(format!("`{id}` is not a record id (rec_<number>)")))
}

/// An update checked and made ready before it is queued for the store's writer.
pub(super) struct ParsedUpdate {
    rowid: i64,
    change: Change,
}

enum Change {
    /// Only the messages replaced (what validators write), already encoded — on the caller's
    /// thread, not the writer's, which every write queues on: the stored text (`None` for no
    /// messages) and whether one of them is an error.
    Messages { text: Option<String>, has_error: bool },
    /// Values merged into the stored record (and its messages replaced, when given).
    Record(RecordUpdate),
}

pub(super) fn parse_updates(updates: Vec<RecordUpdate>) -> Result<Vec<ParsedUpdate>> {
    updates
        .into_iter()
        .map(|u| {
            check_fields(&u.values)?;
            if let Some(m) = &u.messages {
                check_messages(m)?;
            }
            let rowid = parse_record_id(&u.id)?;
            let change = match &u.messages {
                // Validators only replace messages: no need to read and re-encode the values.
                Some(messages) if u.values.is_empty() => Change::Messages {
                    text: (!messages.is_empty()).then(|| serde_json::to_string(messages)).transpose()?,
                    has_error: messages.iter().any(|m| m.kind == MessageType::Error),
                },
                _ => Change::Record(u),
            };
            Ok(ParsedUpdate { rowid, change })
        })
        .collect()
}

/// Applies updates; any unknown record refuses the whole call (the caller's savepoint rolls back).
pub(super) fn apply_updates(tx: &mut dyn Tx, sheet_id: &str, updates: &[ParsedUpdate], now: i64) -> Result<u64> {
    let mut changed = 0;
    // Messages-only updates go to the store together; any other update flushes them first, so
    // every update applies in the caller's order.
    let mut messages_only: Vec<(i64, Option<&str>, bool)> = Vec::new();
    let flush = |tx: &mut dyn Tx, batch: &mut Vec<(i64, Option<&str>, bool)>| -> Result<()> {
        if let Some(missing) = tx.write_records_messages(sheet_id, batch, now)? {
            return Err(Error::not_found("record", format!("rec_{missing}")));
        }
        batch.clear();
        Ok(())
    };
    for ParsedUpdate { rowid, change } in updates {
        let update = match change {
            Change::Messages { text, has_error } => {
                messages_only.push((*rowid, text.as_deref(), *has_error));
                changed += 1;
                continue;
            }
            Change::Record(update) => update,
        };
        flush(tx, &mut messages_only)?;
        let mut stored = tx.stored_record(sheet_id, *rowid)?.ok_or_else(|| Error::not_found("record", &update.id))?;
        for (k, v) in &update.values {
            if v.is_null() {
                stored.values.remove(k);
            } else {
                stored.values.insert(k.clone(), v.clone());
            }
        }
        if let Some(messages) = &update.messages {
            stored.messages = messages.clone();
        }
        tx.write_record(*rowid, &encode(&stored.values, &stored.messages, &Value::Null), now)?;
        changed += 1;
    }
    flush(tx, &mut messages_only)?;
    Ok(changed)
}

pub(super) fn decode_rows(rows: Vec<RawRecord>) -> Result<Vec<Record>> {
    rows.into_iter().map(decode).collect()
}

/// A stored row's values read straight into cells: no `serde_json::Map` built and walked
/// again per record (that map was most of the time of a page read).
struct StoredCells(BTreeMap<String, Cell>);

impl<'de> serde::Deserialize<'de> for StoredCells {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = StoredCells;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a stored record: a JSON object of cell values")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> std::result::Result<StoredCells, A::Error> {
                let mut cells = BTreeMap::new();
                // A repeated key keeps its last value, as a map would.
                while let Some((key, value)) = map.next_entry::<String, Value>()? {
                    cells.insert(key, Cell { value, valid: true, messages: Vec::new() });
                }
                Ok(StoredCells(cells))
            }
        }
        d.deserialize_map(V)
    }
}

/// A stored row's key, borrowed from the row's text unless it has escapes (then owned). The
/// runtime reads rows with it too.
pub struct FieldKey<'a>(pub Cow<'a, str>);

impl<'de> serde::Deserialize<'de> for FieldKey<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = FieldKey<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a field name")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> std::result::Result<FieldKey<'de>, E> {
                Ok(FieldKey(Cow::Borrowed(v)))
            }
            fn visit_str<E>(self, v: &str) -> std::result::Result<FieldKey<'de>, E> {
                Ok(FieldKey(Cow::Owned(v.to_owned())))
            }
            fn visit_string<E>(self, v: String) -> std::result::Result<FieldKey<'de>, E> {
                Ok(FieldKey(Cow::Owned(v)))
            }
        }
        d.deserialize_str(V)
    }
}

/// A stored row's values as (key, value text) pairs in key order, a repeated key keeping its
/// last value: the cells of [`decode`] without building a `Value` per cell.
struct RawCells<'a>(Vec<(Cow<'a, str>, &'a RawValue)>);

impl<'de> serde::Deserialize<'de> for RawCells<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = RawCells<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a stored record: a JSON object of cell values")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> std::result::Result<RawCells<'de>, A::Error> {
                let mut cells: Vec<(Cow<'de, str>, &'de RawValue)> = Vec::with_capacity(map.size_hint().unwrap_or(16));
                while let Some((FieldKey(key), value)) = map.next_entry::<FieldKey<'de>, &'de RawValue>()? {
                    cells.push((key, value));
                }
                // Rows are written from a sorted map, so this is one pass over sorted keys.
                if !cells.windows(2).all(|w| w[0].0 < w[1].0) {
                    cells.sort_by(|a, b| a.0.cmp(&b.0));
                    let mut kept: Vec<(Cow<'de, str>, &'de RawValue)> = Vec::with_capacity(cells.len());
                    for (k, v) in cells {
                        match kept.last_mut() {
                            Some(last) if last.0 == k => last.1 = v,
                            _ => kept.push((k, v)),
                        }
                    }
                    cells = kept;
                }
                Ok(RawCells(cells))
            }
        }
        d.deserialize_map(V)
    }
}

/// Appends to `out` the JSON of `{"records": [...], "pageNumber": n, "pageSize": s}` for these
/// rows: byte for byte what serializing the decoded [`RecordPage`](crate::model::RecordPage)
/// gives, written straight from the stored text (each value is copied as stored, not parsed
/// into a `Value` and printed again), which is what an API page costs the host.
pub(super) fn write_page_json(rows: &[RawRecord], page_number: u32, page_size: u32, out: &mut Vec<u8>) -> Result<()> {
    out.extend_from_slice(b"{\"records\":[");
    for (i, row) in rows.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        write_record_json(row, out)?;
    }
    // Writing into a `Vec` cannot fail.
    let _ = write!(out, "],\"pageNumber\":{page_number},\"pageSize\":{page_size}}}");
    Ok(())
}

fn write_messages<'m>(out: &mut Vec<u8>, messages: impl Iterator<Item = &'m Message>) -> Result<()> {
    out.push(b'[');
    for (i, m) in messages.enumerate() {
        if i > 0 {
            out.push(b',');
        }
        serde_json::to_writer(&mut *out, m)?;
    }
    out.push(b']');
    Ok(())
}

/// One record as [`decode`] and `serde_json` would write it (see [`write_page_json`]).
fn write_record_json(raw: &RawRecord, out: &mut Vec<u8>) -> Result<()> {
    let RawCells(mut cells) = serde_json::from_str(&raw.values)?;
    let messages: Vec<Message> = raw.messages.as_deref().map(serde_json::from_str).transpose()?.unwrap_or_default();
    let metadata: Option<&RawValue> = raw.metadata.as_deref().map(serde_json::from_str).transpose()?;
    // Field messages by field (stable: each field's messages keep their order); a field that
    // only a message names is a cell with a null value.
    let mut by_field: Vec<(&str, &Message)> =
        messages.iter().filter_map(|m| m.field.as_deref().map(|f| (f, m))).collect();
    by_field.sort_by(|a, b| a.0.cmp(b.0));
    let known = cells.len();
    for (field, _) in &by_field {
        let named = |cells: &[(Cow<str>, &RawValue)]| cells.binary_search_by(|(k, _)| k.as_ref().cmp(field)).is_ok();
        if !named(&cells[..known]) && cells[known..].last().is_none_or(|(k, _)| k != field) {
            cells.push((Cow::Borrowed(field), RawValue::NULL));
        }
    }
    if cells.len() > known {
        cells.sort_by(|a, b| a.0.cmp(&b.0));
    }
    let _ = write!(out, "{{\"id\":\"rec_{}\",\"values\":{{", raw.rowid);
    for (i, (key, value)) in cells.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        serde_json::to_writer(&mut *out, key.as_ref())?;
        out.extend_from_slice(b":{\"value\":");
        out.extend_from_slice(value.get().as_bytes());
        let from = by_field.partition_point(|(f, _)| *f < key.as_ref());
        let to = from + by_field[from..].partition_point(|(f, _)| *f == key.as_ref());
        let mine = &by_field[from..to];
        let valid = !mine.iter().any(|(_, m)| m.kind == MessageType::Error);
        out.extend_from_slice(if valid { b",\"valid\":true,\"messages\":" } else { b",\"valid\":false,\"messages\":" });
        write_messages(out, mine.iter().map(|(_, m)| *m))?;
        out.push(b'}');
    }
    out.extend_from_slice(b"},\"valid\":");
    let valid = !messages.iter().any(|m| m.kind == MessageType::Error);
    out.extend_from_slice(if valid { b"true" } else { b"false" });
    if messages.iter().any(|m| m.field.is_none()) {
        out.extend_from_slice(b",\"messages\":");
        write_messages(out, messages.iter().filter(|m| m.field.is_none()))?;
    }
    if let Some(m) = metadata.filter(|m| m.get() != "null") {
        out.extend_from_slice(b",\"metadata\":");
        out.extend_from_slice(m.get().as_bytes());
    }
    out.push(b'}');
    Ok(())
}

fn decode(raw: RawRecord) -> Result<Record> {
    let StoredCells(mut cells) = serde_json::from_str(&raw.values)?;
    let messages: Vec<Message> = raw.messages.map(|m| serde_json::from_str(&m)).transpose()?.unwrap_or_default();
    let mut record_messages = Vec::new();
    let valid = !messages.iter().any(|m| m.kind == MessageType::Error);
    for m in messages {
        match &m.field {
            Some(field) => {
                let cell = cells.entry(field.clone()).or_insert_with(|| Cell {
                    value: Value::Null,
                    valid: true,
                    messages: Vec::new(),
                });
                if m.kind == MessageType::Error {
                    cell.valid = false;
                }
                cell.messages.push(m);
            }
            None => record_messages.push(m),
        }
    }
    Ok(Record {
        id: format!("rec_{}", raw.rowid),
        values: cells,
        valid,
        messages: record_messages,
        metadata: raw.metadata.map(|m| serde_json::from_str(&m)).transpose()?.unwrap_or(Value::Null),
    })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    /// The record as decoded before the one-pass reader: through a `serde_json::Map`.
    fn decode_via_map(raw: RawRecord) -> Record {
        let values: Map<String, Value> = serde_json::from_str(&raw.values).unwrap();
        let mut record = decode(RawRecord { values: "{}".into(), ..raw }).unwrap();
        for (k, value) in values {
            record
                .values
                .entry(k)
                .or_insert_with(|| Cell { value: Value::Null, valid: true, messages: Vec::new() })
                .value = value;
        }
        record
    }

    fn raw(values: &str, messages: Option<Value>) -> RawRecord {
        RawRecord { rowid: 9, values: values.into(), messages: messages.map(|m| m.to_string()), metadata: None }
    }

    #[test]
    fn a_stored_row_decodes_to_the_record_the_map_gave() {
        let rows = [
            r#"{"b":"2","a":1,"c":null}"#,
            r#"{"tab\tkey":"x\"y","é":"漢🦀","nested":{"z":[1,null,{"q":true}]},"big":18446744073709551615,"min":-9223372036854775808,"f":1.5e300}"#,
            r#"{}"#,
        ];
        let messages = json!([
            {"type": "error", "message": "bad", "field": "a"},
            {"type": "warn", "message": "odd", "field": "missing"},
            {"type": "info", "message": "whole record"}
        ]);
        for values in rows {
            for m in [None, Some(messages.clone())] {
                assert_eq!(decode(raw(values, m.clone())).unwrap(), decode_via_map(raw(values, m)), "{values}");
            }
        }
    }

    /// The JSON written straight from the rows against the JSON of the decoded page: the same
    /// bytes for rows as the host writes them, the same JSON value for any other row.
    fn same_json(rows: Vec<RawRecord>, canonical: bool) {
        let mut direct = Vec::new();
        write_page_json(&rows, 3, 7, &mut direct).unwrap();
        let page = crate::model::RecordPage { records: decode_rows(rows).unwrap(), page_number: 3, page_size: 7 };
        let via_model = serde_json::to_vec(&page).unwrap();
        if canonical {
            assert_eq!(String::from_utf8(direct).unwrap(), String::from_utf8(via_model).unwrap());
        } else {
            let parse = |b: &[u8]| serde_json::from_slice::<Value>(b).unwrap();
            assert_eq!(parse(&direct), parse(&via_model));
        }
    }

    #[test]
    fn a_page_written_from_the_rows_is_the_serialized_decoded_page() {
        let values = [
            (r#"{"b":"2","a":1,"c":null}"#, true),
            (
                r#"{"tab\tkey":"x\"y","é":"漢🦀","nested":{"z":[1,null,{"q":true}],"a":"\u0001"},"big":18446744073709551615,"min":-9223372036854775808,"f":1.5e300,"g":-0.0,"h":0.1}"#,
                true,
            ),
            (r#"{}"#, true),
            // Not as the host writes rows (unsorted, a repeated key, an escaped key, spaces):
            // the decoded record's JSON value, though not its bytes.
            (r#"{ "b" : 1, "a\u0041" : [ 1 , 2 ], "b" : {"y":2,"x":1}, "a" : -0.0 }"#, false),
        ];
        let messages = [
            None,
            Some(json!([
                {"type": "error", "message": "bad", "field": "a"},
                {"type": "warn", "message": "odd", "field": "missing"},
                {"type": "info", "message": "whole record"},
                {"type": "info", "message": "again", "field": "a"},
                {"type": "warn", "message": "twice \"quoted\"", "field": "missing"},
                {"type": "error", "message": "also missing", "field": "0"}
            ])),
            Some(json!([{"type": "warn", "message": "record only"}])),
        ];
        let metadata = [None, Some(json!({"from": "upload", "n": [1, 2.5]}))];
        let mut rows = Vec::new();
        for (v, canonical) in values {
            // As `encode` stores a row: the serialized map of the values.
            let stored = if canonical {
                let map: Map<String, Value> = serde_json::from_str(v).unwrap();
                serde_json::to_string(&map).unwrap()
            } else {
                v.to_owned()
            };
            for m in &messages {
                for meta in &metadata {
                    let row = RawRecord { metadata: meta.as_ref().map(Value::to_string), ..raw(&stored, m.clone()) };
                    rows.push((row, canonical));
                }
            }
        }
        let all_canonical = rows.iter().filter(|(_, c)| *c).map(|(r, _)| r.clone()).collect();
        same_json(all_canonical, true);
        same_json(Vec::new(), true);
        for (row, canonical) in rows {
            same_json(vec![row], canonical);
        }
    }

    #[test]
    fn a_row_that_does_not_decode_does_not_write_either() {
        for bad in ["[1]", "3", r#"{"a":"#, r#"{"a":1} x"#] {
            assert!(write_page_json(&[raw(bad, None)], 1, 1, &mut Vec::new()).is_err(), "{bad}");
        }
        let bad_messages = RawRecord { messages: Some("[{".into()), ..raw("{}", None) };
        assert!(write_page_json(&[bad_messages], 1, 1, &mut Vec::new()).is_err());
        let bad_metadata = RawRecord { metadata: Some("{".into()), ..raw("{}", None) };
        assert!(write_page_json(&[bad_metadata], 1, 1, &mut Vec::new()).is_err());
    }

    #[test]
    fn a_repeated_key_keeps_its_last_value_and_a_row_that_is_not_an_object_is_an_error() {
        let r = decode(raw(r#"{"a":1,"a":2}"#, None)).unwrap();
        assert_eq!(r.values["a"].value, json!(2));
        for bad in ["[1]", "3", r#"{"a":"#, r#"{"a":1} x"#] {
            assert!(decode(raw(bad, None)).is_err(), "{bad}");
        }
    }
}
