//! Records of the event's environment.
//!
//! A [`Page`] carries the field names once and one row of values per record, so reading a
//! page costs no per-cell field names or JSON parsing.

use crate::bindings::jobhost::plugin::records as host;
use crate::bindings::jobhost::plugin::types as wit;
use crate::{Error, Result};

pub use wit::Value as CellValue;

impl CellValue {
    /// The text of a `text` value.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            CellValue::Text(s) => Some(s),
            _ => None,
        }
    }

    /// An integer, from an `integer` value or a `text` holding one.
    pub fn as_i64(&self) -> Option<i64> {
        match self {
            CellValue::Integer(i) => Some(*i),
            CellValue::Text(s) => s.trim().parse().ok(),
            _ => None,
        }
    }

    /// True for `null` and for blank text.
    pub fn is_blank(&self) -> bool {
        match self {
            CellValue::Null => true,
            CellValue::Text(s) => s.trim().is_empty(),
            _ => false,
        }
    }
}

/// Record counts of a sheet.
pub type Counts = wit::RecordCounts;
/// A message on a record.
pub type Message = wit::Message;
/// The kind of a message.
pub type MessageKind = wit::MessageKind;

/// An error message on one field.
///
/// ```
/// let m = jobhost_plugin_sdk::records::error_message("email", "email must contain @");
/// assert_eq!(m.field.as_deref(), Some("email"));
/// ```
pub fn error_message(field: &str, text: impl Into<String>) -> Message {
    Message { field: Some(field.to_owned()), kind: MessageKind::Error, text: text.into() }
}

/// A page of records.
pub struct Page {
    raw: wit::RecordPage,
}

impl Page {
    /// Field names, in the order of each row's values.
    pub fn fields(&self) -> &[String] {
        &self.raw.fields
    }

    /// Records on the page.
    pub fn len(&self) -> usize {
        self.raw.rows.len()
    }

    /// True when the page is past the last record.
    pub fn is_empty(&self) -> bool {
        self.raw.rows.is_empty()
    }

    /// Index of `field` in [`Page::fields`]. A linear scan: pages have few fields, and
    /// comparing a few short strings beats hashing one.
    pub fn position(&self, field: &str) -> Option<usize> {
        self.raw.fields.iter().position(|f| f == field)
    }

    /// The records, in the sheet's stable order.
    pub fn records(&self) -> impl Iterator<Item = RecordRef<'_>> {
        self.raw.rows.iter().map(move |row| RecordRef { page: self, row })
    }
}

/// One record of a [`Page`].
#[derive(Clone, Copy)]
pub struct RecordRef<'a> {
    page: &'a Page,
    row: &'a wit::Row,
}

impl<'a> RecordRef<'a> {
    /// The record id.
    pub fn id(&self) -> u64 {
        self.row.id
    }

    /// The value of `field` (`None` when the sheet has no such field on this page).
    pub fn get(&self, field: &str) -> Option<&'a CellValue> {
        self.page.position(field).and_then(|i| self.row.values.get(i))
    }

    /// The values, in the order of [`Page::fields`].
    pub fn values(&self) -> &'a [CellValue] {
        &self.row.values
    }

    /// The text of `field`, when it is text.
    pub fn str(&self, field: &str) -> Option<&'a str> {
        self.get(field).and_then(CellValue::as_str)
    }

    /// The record's messages.
    pub fn messages(&self) -> &'a [Message] {
        &self.row.messages
    }

    /// False when any message is an error.
    pub fn valid(&self) -> bool {
        self.row.valid
    }
}

/// A change to one record.
pub type Update = wit::RecordUpdate;
/// A field and its value.
pub type FieldValue = wit::FieldValue;
/// A record to insert.
pub type NewRecord = wit::NewRecord;

/// Record counts `{total, valid, error}` of a sheet.
pub fn counts(sheet_id: &str) -> Result<Counts> {
    host::counts(sheet_id).map_err(Error::from)
}

/// Page `page_number` (1-based) of `page_size` (1..=10000) records.
pub fn page(sheet_id: &str, page_size: u32, page_number: u32) -> Result<Page> {
    Ok(Page { raw: host::page(sheet_id, page_size, page_number)? })
}

/// Updates records (values merged, messages replaced when given); all or none; returns how
/// many changed.
///
/// ```no_run
/// # use jobhost_plugin_sdk::{Event, Result, records};
/// # fn handler(event: &Event) -> Result<()> {
/// let page = event.data(1000, 1)?;
/// let updates: Vec<records::Update> = page
///     .records()
///     .filter(|r| !r.str("email").unwrap_or_default().contains('@'))
///     .map(|r| records::Update {
///         id: r.id(),
///         values: Vec::new(),
///         messages: Some(vec![records::error_message("email", "email must contain @")]),
///     })
///     .collect();
/// records::update(event.sheet_id()?, &updates)?;
/// # Ok(()) }
/// ```
pub fn update(sheet_id: &str, updates: &[Update]) -> Result<u64> {
    host::update(sheet_id, updates).map_err(Error::from)
}

/// Appends records; returns how many.
pub fn insert(sheet_id: &str, records: &[NewRecord]) -> Result<u64> {
    host::insert(sheet_id, records).map_err(Error::from)
}
