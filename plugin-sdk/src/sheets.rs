//! Sheets of the event's environment.

use crate::bindings::jobhost::plugin::sheets as host;
use crate::{Error, Result};

/// A sheet: `id` and `name`.
pub type Sheet = crate::bindings::jobhost::plugin::types::Sheet;

/// A sheet of this environment.
pub fn get(id: &str) -> Result<Sheet> {
    host::get(id).map_err(Error::from)
}
