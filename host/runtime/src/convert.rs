//! Engine types ↔ WIT types.

use std::collections::HashMap;

use serde_json::{Map, Value};

use super::bindings::jobhost::plugin::types as wit;
use crate::error::Error;
use crate::model::{Event, Job, JobStatus, Message, MessageType, RecordUpdate};
use crate::store::RawRecord;

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

fn json_text(v: &Value) -> Option<String> {
    (!v.is_null()).then(|| v.to_string())
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
        context: e.context.to_string(),
        payload: e.payload.to_string(),
        created_at: e.created_at,
        attempt,
    }
}

pub fn value_to_wit(v: Value) -> wit::Value {
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
pub fn page(rows: Vec<RawRecord>) -> Result<wit::RecordPage, Error> {
    let mut fields: Vec<String> = Vec::new();
    let mut index: HashMap<String, usize> = HashMap::new();
    let mut out = Vec::with_capacity(rows.len());
    for raw in rows {
        let values: Map<String, Value> = serde_json::from_str(&raw.values)?;
        let mut row_values = vec![wit::Value::Null; fields.len()];
        for (k, v) in values {
            let i = match index.get(&k) {
                Some(&i) => i,
                None => {
                    index.insert(k.clone(), fields.len());
                    fields.push(k);
                    row_values.push(wit::Value::Null);
                    fields.len() - 1
                }
            };
            row_values[i] = value_to_wit(v);
        }
        let messages: Vec<Message> = raw.messages.map(|m| serde_json::from_str(&m)).transpose()?.unwrap_or_default();
        let valid = !messages.iter().any(|m| m.kind == MessageType::Error);
        out.push(wit::Row {
            id: raw.rowid as u64,
            values: row_values,
            messages: messages.into_iter().map(message_to_wit).collect(),
            valid,
        });
    }
    // Rows made before a field was first seen are shorter; pad them so every row has one
    // value per field.
    for row in &mut out {
        row.values.resize(fields.len(), wit::Value::Null);
    }
    Ok(wit::RecordPage { fields, rows: out })
}

pub fn update(u: wit::RecordUpdate) -> RecordUpdate {
    RecordUpdate {
        id: format!("rec_{}", u.id),
        values: u.values.into_iter().map(|fv| (fv.field, value_from_wit(fv.value))).collect(),
        messages: u.messages.map(|ms| ms.into_iter().map(message_from_wit).collect()),
    }
}
