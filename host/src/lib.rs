//! jobhost: a host that runs job listeners against a durable job engine.
//!
//! The job model is Flatfile's Jobs API with multi-part jobs (`docs/job-model.md` in the
//! shared docs, summarised in `README.md`): jobs move `created → ready → executing →
//! complete | failed | canceled`; a job can be split into parts, and when every part has ended
//! the host emits `job:parts-completed` on the parent exactly once.
//!
//! # Layout
//!
//! - [`model`]: the resources (environments, sheets, records, jobs, events) and their fields.
//! - [`error`]: the engine's typed errors and their stable [`ErrorKind`](error::ErrorKind).
//! - [`store`]: the storage boundary ([`store::Backend`], [`store::Tx`]) and the embedded
//!   SQLite backend with group commit.
//! - [`engine`]: the lifecycle rules, the environment-scoped API ([`engine::Env`]) and the
//!   watchdog.
//! - [`filter`]: topic patterns and event filters.
//! - [`listener`]: native listeners and the delivery loop (leases, retries, dead letters).
//! - [`runtime`]: the WebAssembly listener runtime: engine setup, plugin loading, sandboxed
//!   dispatch in a fresh instance per delivery, host imports, execution records.
//! - [`reload`]: hot reload of a plugins directory: versions by content hash, atomic swaps,
//!   history and rollback.
//! - [`build`]: building plugins from source in every guest language, with pinned tools and
//!   a content-hash cache.
//! - [`scaffold`]: `jobhost plugin new`, a plugin that runs at once in every language.
//! - [`golden`]: what a job run produced ([`golden::Snapshot`]), the difference between two
//!   runs, and golden tests of listeners (`jobhost plugin test`).
//! - [`artifacts`]: paths of the plugins under `plugins/`, built by `build.rs`.
//! - [`clock`]: the engine's clock, driven by tokio time so tests can pause it.
//! - [`scenario`]: the seeds' scenario (sheet → parent → parts → parts-completed) as native
//!   listeners, used by the CLI's `demo`, the tests and the benchmarks.
//! - [`api`]: the HTTP API (axum): tokens per environment, routes, SSE, OpenAPI, metrics.
//! - [`config`]: the settings of `jobhost serve` from a file, variables and flags.
//! - [`client`]: a client of the HTTP API, used by the operator commands.
//! - [`cli`]: the `jobhost` command line.

pub mod api;
pub mod artifacts;
pub mod build;
pub mod cli;
pub mod client;
pub mod clock;
pub mod config;
pub mod engine;
pub mod error;
pub mod filter;
pub mod golden;
pub mod listener;
pub mod model;
pub mod reload;
pub mod runtime;
pub mod scaffold;
pub mod scenario;
pub mod store;

pub use engine::{Engine, EngineConfig, Env};
pub use error::{Error, ErrorKind, Result};
