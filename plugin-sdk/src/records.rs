//! Records of the event's environment.
//!
//! A [`Page`] carries the field names once, every cell in one list and every text in one
//! string, so reading a page costs no per-cell field names, JSON parsing or allocation.

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

/// A cell of a record, borrowed from its [`Page`]: reading a page allocates nothing per
/// cell. [`Cell::to_value`] makes an owned [`CellValue`] (to write back, or to keep).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Cell<'a> {
    /// No value.
    Null,
    /// `true` or `false`.
    Boolean(bool),
    /// A whole number.
    Integer(i64),
    /// A number with a fraction (or a whole number past `i64`).
    Float(f64),
    /// Text, borrowed from the page.
    Text(&'a str),
}

impl<'a> Cell<'a> {
    /// The text of a `text` value.
    pub fn as_str(self) -> Option<&'a str> {
        match self {
            Cell::Text(s) => Some(s),
            _ => None,
        }
    }

    /// An integer, from an `integer` value or a `text` holding one.
    pub fn as_i64(self) -> Option<i64> {
        match self {
            Cell::Integer(i) => Some(i),
            Cell::Text(s) => s.trim().parse().ok(),
            _ => None,
        }
    }

    /// A number, from a `float` or `integer` value or a `text` holding one.
    pub fn as_f64(self) -> Option<f64> {
        match self {
            Cell::Float(f) => Some(f),
            Cell::Integer(i) => Some(i as f64),
            Cell::Text(s) => s.trim().parse().ok(),
            _ => None,
        }
    }

    /// The value of a `boolean` cell.
    pub fn as_bool(self) -> Option<bool> {
        match self {
            Cell::Boolean(b) => Some(b),
            _ => None,
        }
    }

    /// True for `null`.
    pub fn is_null(self) -> bool {
        self == Cell::Null
    }

    /// True for `null` and for blank text.
    pub fn is_blank(self) -> bool {
        match self {
            Cell::Null => true,
            Cell::Text(s) => s.trim().is_empty(),
            _ => false,
        }
    }

    /// The cell as an owned value.
    ///
    /// ```
    /// use jobhost_plugin_sdk::{Cell, CellValue};
    /// assert!(matches!(Cell::Text("a@b.c").to_value(), CellValue::Text(t) if t == "a@b.c"));
    /// assert!(matches!(Cell::Integer(7).to_value(), CellValue::Integer(7)));
    /// ```
    pub fn to_value(self) -> CellValue {
        match self {
            Cell::Null => CellValue::Null,
            Cell::Boolean(b) => CellValue::Boolean(b),
            Cell::Integer(i) => CellValue::Integer(i),
            Cell::Float(f) => CellValue::Float(f),
            Cell::Text(s) => CellValue::Text(s.to_owned()),
        }
    }
}

impl From<Cell<'_>> for CellValue {
    fn from(c: Cell<'_>) -> Self {
        c.to_value()
    }
}

/// A page of records, as the host packs it: the field names once, every cell in one list and
/// every text in one string, so a page crosses into the guest in a handful of allocations.
pub struct Page {
    raw: wit::PackedPage,
}

impl Page {
    /// Field names, in the order of each record's values.
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
    pub fn records(&self) -> impl ExactSizeIterator<Item = RecordRef<'_>> {
        let width = self.raw.fields.len();
        self.raw.rows.iter().enumerate().map(move |(i, row)| RecordRef {
            page: self,
            row,
            cells: &self.raw.cells[i * width..(i + 1) * width],
        })
    }

    fn cell(&self, c: &wit::Cell) -> Cell<'_> {
        match *c {
            wit::Cell::Null => Cell::Null,
            wit::Cell::Boolean(b) => Cell::Boolean(b),
            wit::Cell::Integer(i) => Cell::Integer(i),
            wit::Cell::Float(f) => Cell::Float(f),
            wit::Cell::Text(span) => {
                let start = span.start as usize;
                Cell::Text(&self.raw.text[start..start + span.len as usize])
            }
        }
    }
}

/// One record of a [`Page`].
#[derive(Clone, Copy)]
pub struct RecordRef<'a> {
    page: &'a Page,
    row: &'a wit::PackedRow,
    cells: &'a [wit::Cell],
}

impl<'a> RecordRef<'a> {
    /// The record id.
    pub fn id(&self) -> u64 {
        self.row.id
    }

    /// The value of `field` (`None` when the sheet has no such field on this page).
    pub fn get(&self, field: &str) -> Option<Cell<'a>> {
        let page = self.page;
        page.position(field).map(|i| page.cell(&self.cells[i]))
    }

    /// The values, in the order of [`Page::fields`].
    pub fn values(&self) -> impl ExactSizeIterator<Item = Cell<'a>> + 'a {
        let page = self.page;
        self.cells.iter().map(move |c| page.cell(c))
    }

    /// The text of `field`, when it is text.
    pub fn str(&self, field: &str) -> Option<&'a str> {
        self.get(field).and_then(Cell::as_str)
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
    Ok(Page { raw: host::page_packed(sheet_id, page_size, page_number)? })
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

#[cfg(test)]
mod tests {
    use super::Cell;

    #[test]
    fn a_cell_reads_as_the_type_asked_for_when_it_holds_one() {
        assert_eq!(Cell::Text(" 42 ").as_i64(), Some(42));
        assert_eq!(Cell::Text("4.5").as_i64(), None);
        assert_eq!(Cell::Text("4.5").as_f64(), Some(4.5));
        assert_eq!(Cell::Integer(3).as_f64(), Some(3.0));
        assert_eq!(Cell::Float(3.5).as_i64(), None);
        assert_eq!(Cell::Boolean(true).as_bool(), Some(true));
        assert_eq!(Cell::Text("true").as_bool(), None);
        assert_eq!(Cell::Integer(1).as_str(), None);
        assert!(Cell::Null.is_blank() && Cell::Text(" \t").is_blank() && Cell::Null.is_null());
        assert!(!Cell::Integer(0).is_blank() && !Cell::Text("x").is_blank() && !Cell::Text("").is_null());
    }
}
