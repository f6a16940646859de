//! What the operator granted this plugin: configuration values and environment secrets.
//!
//! Both come from the host, never from the plugin's own files: configuration is the `[config]`
//! table of the plugin's manifest (`NAME.toml` beside `NAME.wasm`), and a secret is stored per
//! environment and readable only when the manifest lists its name under `secrets`.
//!
//! ```no_run
//! # fn main() -> jobhost_plugin_sdk::Result<()> {
//! use jobhost_plugin_sdk::config;
//! let endpoint = config::get("endpoint").unwrap_or_else(|| "https://example.invalid".into());
//! let token = config::secret("API_TOKEN")?;
//! # let _ = (endpoint, token);
//! # Ok(())
//! # }
//! ```

use crate::bindings::jobhost::plugin::config as host;
use crate::{Error, Result};

/// A configuration value of this plugin; `None` when the manifest does not set `key`.
pub fn get(key: &str) -> Option<String> {
    host::get(key)
}

/// A secret of the event's environment. Fails with [`ErrorKind::Denied`](crate::ErrorKind)
/// when the plugin's manifest does not grant `name`, and [`ErrorKind::NotFound`](crate::ErrorKind)
/// when the environment has no such secret.
pub fn secret(name: &str) -> Result<String> {
    host::secret(name).map_err(Error::from)
}
