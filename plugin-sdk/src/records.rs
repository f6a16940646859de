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

/// A page of records, as the host packs it: the field names once, every cell 9 bytes of one
/// buffer, every text in one string, every id in one list and the page's messages in one
/// list, so a page crosses into the guest in a handful of allocations and is read in place.
pub struct Page {
    raw: wit::PageBuffers,
}

impl Page {
    /// Field names, in the order of each record's values.
    pub fn fields(&self) -> &[String] {
        &self.raw.fields
    }

    /// Records on the page.
    pub fn len(&self) -> usize {
        self.raw.ids.len()
    }

    /// True when the page is past the last record.
    pub fn is_empty(&self) -> bool {
        self.raw.ids.is_empty()
    }

    /// Index of `field` in [`Page::fields`]. A linear scan: pages have few fields, and
    /// comparing a few short strings beats hashing one.
    pub fn position(&self, field: &str) -> Option<usize> {
        self.raw.fields.iter().position(|f| f == field)
    }

    /// The records, in the sheet's stable order.
    pub fn records(&self) -> impl ExactSizeIterator<Item = RecordRef<'_>> {
        let row_bytes = self.raw.fields.len() * CELL;
        (0..self.raw.ids.len()).map(move |i| RecordRef {
            page: self,
            index: i,
            cells: &self.raw.cells[i * row_bytes..(i + 1) * row_bytes],
        })
    }

    /// Decodes one cell's 9 bytes (the layout is `packed-page`'s in the WIT).
    fn cell(&self, c: &[u8]) -> Cell<'_> {
        let mut value = [0; 8];
        value.copy_from_slice(&c[1..CELL]);
        let value = u64::from_le_bytes(value);
        match c[0] {
            1 => Cell::Boolean(value != 0),
            2 => Cell::Integer(value as i64),
            3 => Cell::Float(f64::from_bits(value)),
            4 => {
                let (start, len) = ((value & 0xffff_ffff) as usize, (value >> 32) as usize);
                Cell::Text(&self.raw.text[start..start + len])
            }
            // 0 is null; a kind this SDK does not know (from a newer host) reads as null too.
            _ => Cell::Null,
        }
    }
}

/// Bytes of one cell of a packed page.
const CELL: usize = 9;

/// One record of a [`Page`].
#[derive(Clone, Copy)]
pub struct RecordRef<'a> {
    page: &'a Page,
    /// The record's place on the page.
    index: usize,
    /// The record's cells, `CELL` bytes each.
    cells: &'a [u8],
}

impl<'a> RecordRef<'a> {
    /// The record id.
    pub fn id(&self) -> u64 {
        self.page.raw.ids[self.index]
    }

    /// The value of `field` (`None` when the sheet has no such field on this page).
    pub fn get(&self, field: &str) -> Option<Cell<'a>> {
        let page = self.page;
        page.position(field).map(|i| page.cell(&self.cells[i * CELL..(i + 1) * CELL]))
    }

    /// The values, in the order of [`Page::fields`].
    pub fn values(&self) -> impl ExactSizeIterator<Item = Cell<'a>> + 'a {
        let page = self.page;
        self.cells.chunks_exact(CELL).map(move |c| page.cell(c))
    }

    /// The text of `field`, when it is text.
    pub fn str(&self, field: &str) -> Option<&'a str> {
        self.get(field).and_then(Cell::as_str)
    }

    /// The record's messages.
    pub fn messages(&self) -> &'a [Message] {
        let raw = &self.page.raw;
        let end_of = |i: usize| raw.message_ends.get(i).map_or(0, |&e| e as usize);
        let start = self.index.checked_sub(1).map_or(0, end_of);
        // Ends that do not fit the list (never sent by a jobhost host) read as no messages
        // rather than trapping the guest.
        raw.messages.get(start..end_of(self.index)).unwrap_or_default()
    }

    /// False when any message is an error.
    pub fn valid(&self) -> bool {
        !self.messages().iter().any(|m| m.kind == MessageKind::Error)
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
    Ok(Page { raw: host::read_page(sheet_id, page_size, page_number)? })
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
    use super::{Cell, Page, wit};

    /// A page as a host packs it: `cells` 9 bytes each, texts in `text`, no messages.
    fn page(fields: &[&str], ids: &[u64], cells: &[[u8; 9]], text: &str) -> Page {
        Page {
            raw: wit::PageBuffers {
                fields: fields.iter().map(|f| f.to_string()).collect(),
                ids: ids.to_vec(),
                cells: cells.concat(),
                text: text.into(),
                message_ends: vec![0; ids.len()],
                messages: Vec::new(),
            },
        }
    }

    fn cell(kind: u8, value: u64) -> [u8; 9] {
        let mut c = [kind; 9];
        c[1..].copy_from_slice(&value.to_le_bytes());
        c
    }

    #[test]
    fn a_packed_page_reads_every_kind_of_cell_in_place() {
        let text = "Adaé漢";
        let p = page(
            &["name", "age", "score", "ok", "none"],
            &[7, 8],
            &[
                cell(4, 3 << 32),                     // "Ada"
                cell(2, (-4i64) as u64),              // -4
                cell(3, 2.5f64.to_bits()),            // 2.5
                cell(1, 1),                           // true
                cell(0, 0),                           // null
                cell(4, 3 | (5 << 32)),               // "é漢"
                cell(2, i64::MAX as u64),             // i64::MAX
                cell(3, f64::NEG_INFINITY.to_bits()), // -inf
                cell(1, 0),                           // false
                cell(9, 1),                           // a kind from a newer host: null
            ],
            text,
        );
        let records: Vec<_> = p.records().collect();
        assert_eq!(records.iter().map(|r| r.id()).collect::<Vec<_>>(), [7, 8]);
        let values = |i: usize| records[i].values().collect::<Vec<_>>();
        assert_eq!(
            values(0),
            [Cell::Text("Ada"), Cell::Integer(-4), Cell::Float(2.5), Cell::Boolean(true), Cell::Null]
        );
        assert_eq!(
            values(1),
            [
                Cell::Text("é漢"),
                Cell::Integer(i64::MAX),
                Cell::Float(f64::NEG_INFINITY),
                Cell::Boolean(false),
                Cell::Null
            ]
        );
        assert_eq!(records[1].str("name"), Some("é漢"));
        assert_eq!(records[0].get("score"), Some(Cell::Float(2.5)));
        assert_eq!(records[0].get("missing"), None);
    }

    #[test]
    fn each_record_has_its_own_slice_of_the_pages_messages() {
        let mut p = page(&["a"], &[1, 2, 3, 4], &[cell(0, 0); 4], "");
        let m = |kind, text: &str| super::Message { field: Some("a".into()), kind, text: text.into() };
        use super::wit::MessageKind::{Error, Warn};
        // Record 1 has one warning, record 2 none, record 3 a warning and an error, record 4 none.
        p.raw.messages = vec![m(Warn, "w1"), m(Warn, "w3"), m(Error, "e3")];
        p.raw.message_ends = vec![1, 1, 3, 3];
        let texts = |r: super::RecordRef<'_>| r.messages().iter().map(|m| m.text.clone()).collect::<Vec<_>>();
        let records: Vec<_> = p.records().collect();
        assert_eq!(
            records.iter().map(|r| texts(*r)).collect::<Vec<_>>(),
            [vec!["w1"], vec![], vec!["w3", "e3"], vec![]]
        );
        assert_eq!(records.iter().map(|r| r.valid()).collect::<Vec<_>>(), [true, true, false, true]);
        // Ends that do not fit the list read as no messages.
        p.raw.message_ends = vec![1, 9, 0];
        let records: Vec<_> = p.records().collect();
        assert_eq!(records.iter().map(|r| texts(*r)).collect::<Vec<_>>(), [vec!["w1"], vec![], vec![], vec![]]);
    }

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
