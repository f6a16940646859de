//! jobhost: a host that runs sandboxed job listeners against a durable job engine.
//!
//! The job model is Flatfile's Jobs API with multi-part jobs (`docs/job-model.md`): jobs move
//! `created → ready → executing → complete | failed | canceled`; a job can be split into
//! parts, and when every part has ended the host emits `job:parts-completed` on the parent
//! exactly once.
//!
//! This crate is the `jobhost` binary and the things only the binary does; the host itself is
//! a stack of crates, each re-exported here under the name it has always had, so a program
//! that embeds jobhost depends on this one crate:
//!
//! ```text
//! jobhost-core ← jobhost-store ← jobhost-store-sqlite, jobhost-store-postgres
//!                      ↑
//!               jobhost-engine ← jobhost-runtime ← jobhost-registry ← jobhost-api ← jobhost (this)
//! ```
//!
//! # Layout
//!
//! - Re-exported: [`model`], [`error`], [`filter`], [`clock`] (`jobhost-core`); [`store`]
//!   (`jobhost-store`, with the SQLite backend as [`store::sqlite`] and the PostgreSQL one as
//!   [`store::postgres`]); the engine, its
//!   [`listener`]s, [`delivery`] loop and [`scenario`] (`jobhost-engine`); [`runtime`]
//!   (`jobhost-runtime`); [`reload`] (`jobhost-registry`); [`api`] (`jobhost-api`).
//! - [`cli`]: the `jobhost` command line, one file per subcommand.
//! - [`config`]: the settings of `jobhost serve` from a file, variables and flags.
//! - [`client`]: a client of the HTTP API, used by the operator commands.
//! - [`build`]: building plugins from source in every guest language, with pinned tools and
//!   a content-hash cache.
//! - [`scaffold`]: `jobhost plugin new`, a plugin that runs at once in every language.
//! - [`golden`]: what a job run produced ([`golden::Snapshot`]), the difference between two
//!   runs, and golden tests of listeners (`jobhost plugin test`).
//! - [`demo_plugin`]: the example plugin `jobhost demo` runs, built from `plugins/` and
//!   embedded in the binary.
//! - [`open_engine`]: an engine on the embedded store in a data directory; `jobhost serve
//!   --store postgres://…` opens the PostgreSQL backend instead (`cli::serve`).

pub use jobhost_api as api;
pub use jobhost_engine::{Engine, EngineConfig, Env, Error, ErrorKind, Result, SecretKey};
pub use jobhost_engine::{clock, delivery, error, filter, listener, model, retention, scenario};
pub use jobhost_registry as reload;
pub use jobhost_runtime as runtime;

/// The store boundary and its backends.
pub mod store {
    pub use jobhost_store::*;
    pub use jobhost_store_postgres as postgres;
    pub use jobhost_store_sqlite as sqlite;
}

pub mod build;
pub mod cli;
pub mod client;
pub mod config;
pub mod golden;
pub mod scaffold;

/// The example plugin `jobhost demo` runs.
pub mod demo_plugin {
    include!(concat!(env!("OUT_DIR"), "/demo_plugin.rs"));
}

use std::path::Path;
use std::sync::Arc;

/// Opens the embedded SQLite store in `dir` (created if missing) and an engine on it. Call
/// inside a tokio runtime.
pub fn open_engine(dir: impl AsRef<Path>, config: EngineConfig) -> Result<Engine> {
    open_engine_with(store::sqlite::SqliteOptions::new(dir.as_ref()), config)
}

/// [`open_engine`] with explicit SQLite options.
pub fn open_engine_with(options: store::sqlite::SqliteOptions, config: EngineConfig) -> Result<Engine> {
    Ok(Engine::with_backend(Arc::new(store::sqlite::SqliteBackend::open(options)?), config))
}
