//! Record encoding: JSON values and messages in, [`Record`]s with derived validity out.

use std::collections::BTreeMap;

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

pub(super) fn parse_updates(updates: Vec<RecordUpdate>) -> Result<Vec<(i64, RecordUpdate)>> {
    updates
        .into_iter()
        .map(|u| {
            check_fields(&u.values)?;
            if let Some(m) = &u.messages {
                check_messages(m)?;
            }
            Ok((parse_record_id(&u.id)?, u))
        })
        .collect()
}

/// Applies updates; any unknown record refuses the whole call (the caller's savepoint rolls back).
pub(super) fn apply_updates(tx: &mut dyn Tx, sheet_id: &str, updates: &[(i64, RecordUpdate)], now: i64) -> Result<u64> {
    let mut changed = 0;
    // Messages-only updates (what validators write) go to the store together; any other
    // update flushes them first, so every update applies in the caller's order.
    let mut messages_only: Vec<(i64, Option<String>, bool)> = Vec::new();
    let flush = |tx: &mut dyn Tx, batch: &mut Vec<(i64, Option<String>, bool)>| -> Result<()> {
        if let Some(missing) = tx.write_records_messages(sheet_id, batch, now)? {
            return Err(Error::not_found("record", format!("rec_{missing}")));
        }
        batch.clear();
        Ok(())
    };
    for &(rowid, ref update) in updates {
        // Validators only replace messages: no need to read and re-encode the values.
        if update.values.is_empty()
            && let Some(messages) = &update.messages
        {
            let text = (!messages.is_empty()).then(|| serde_json::to_string(messages).unwrap_or_else(|_| "[]".into()));
            let has_error = messages.iter().any(|m| m.kind == MessageType::Error);
            messages_only.push((rowid, text, has_error));
            changed += 1;
            continue;
        }
        flush(tx, &mut messages_only)?;
        let mut stored = tx.stored_record(sheet_id, rowid)?.ok_or_else(|| Error::not_found("record", &update.id))?;
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
        tx.write_record(rowid, &encode(&stored.values, &stored.messages, &Value::Null), now)?;
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

    #[test]
    fn a_repeated_key_keeps_its_last_value_and_a_row_that_is_not_an_object_is_an_error() {
        let r = decode(raw(r#"{"a":1,"a":2}"#, None)).unwrap();
        assert_eq!(r.values["a"].value, json!(2));
        for bad in ["[1]", "3", r#"{"a":"#, r#"{"a":1} x"#] {
            assert!(decode(raw(bad, None)).is_err(), "{bad}");
        }
    }
}
